//! amend changes images the way qemu-img amend does, and refuses what it refuses.

mod fmt_common;

use std::path::Path;

use imgblock::{create, CreateOptions, Format, Image, OpenOptions};

fn run(args: &[&str]) -> String {
    fmt_common::run(args[0], &args[1..])
}

fn amend(p: &Path, opts: &str) -> imgblock::Result<()> {
    let mut img = Image::open(p, &OpenOptions::writable())?;
    let mut o = CreateOptions::default();
    o.parse_opts(opts)?;
    img.amend(&o)
}

fn content(p: &Path) -> Vec<u8> {
    let img = Image::open(p, &OpenOptions::read_only()).unwrap();
    let mut v = vec![0u8; usize::try_from(img.size()).unwrap()];
    img.read_at(&mut v, 0).unwrap();
    v
}

fn populated(dir: &Path, opts: &str) -> std::path::PathBuf {
    let p = dir.join("a.qcow2");
    let mut o = CreateOptions::new(4 << 20);
    o.parse_opts(opts).unwrap();
    create(&p, Format::Qcow2, &o).unwrap();
    let ps = p.to_str().unwrap();
    run(&[
        "qemu-io",
        "-c",
        "write -P 0x5a 0 1M",
        "-c",
        "write -z 64k 64k",
        "-c",
        "write -P 7 3M 100k",
        ps,
    ]);
    p
}

#[test]
fn refcount_width_changes_keep_data_and_pass_check() {
    let dir = tempfile::tempdir().unwrap();
    let p = populated(dir.path(), "");
    let before = content(&p);
    for bits in ["1", "64", "8", "2", "16"] {
        amend(&p, &format!("refcount_bits={bits}")).unwrap();
        run(&["qemu-img", "check", p.to_str().unwrap()]);
        let info = run(&["qemu-img", "info", "--output=json", p.to_str().unwrap()]);
        assert!(
            info.contains(&format!("\"refcount-bits\": {bits}")),
            "{info}"
        );
        assert_eq!(content(&p), before);
    }
}

#[test]
fn downgrade_and_upgrade_keep_data() {
    let dir = tempfile::tempdir().unwrap();
    let p = populated(dir.path(), "lazy_refcounts=on");
    run(&["qemu-img", "snapshot", "-c", "s", p.to_str().unwrap()]);
    let before = content(&p);
    amend(&p, "compat=0.10").unwrap();
    run(&["qemu-img", "check", p.to_str().unwrap()]);
    let info = run(&["qemu-img", "info", "--output=json", p.to_str().unwrap()]);
    assert!(info.contains("\"compat\": \"0.10\""), "{info}");
    assert_eq!(content(&p), before);
    amend(&p, "compat=1.1,lazy_refcounts=on").unwrap();
    run(&["qemu-img", "check", p.to_str().unwrap()]);
    let info = run(&["qemu-img", "info", "--output=json", p.to_str().unwrap()]);
    assert!(
        info.contains("\"compat\": \"1.1\"") && info.contains("\"lazy-refcounts\": true"),
        "{info}"
    );
    assert_eq!(content(&p), before);
}

#[test]
fn amend_refuses_what_qemu_refuses() {
    let dir = tempfile::tempdir().unwrap();
    let p = populated(dir.path(), "");
    for bad in [
        "cluster_size=4k",
        "compression_type=zstd",
        "extended_l2=on",
        "compat=0.10,refcount_bits=8",
        "data_file=x",
    ] {
        assert!(
            matches!(amend(&p, bad), Err(imgblock::Error::InvalidOption(_))),
            "{bad}"
        );
    }
    let p2 = populated(dir.path(), "extended_l2=on");
    assert!(amend(&p2, "compat=0.10").is_err());
}

#[test]
fn amend_size_resizes() {
    let dir = tempfile::tempdir().unwrap();
    let p = populated(dir.path(), "");
    amend(&p, "size=8M").unwrap();
    assert_eq!(
        Image::open(&p, &OpenOptions::read_only()).unwrap().size(),
        8 << 20
    );
    run(&["qemu-img", "check", p.to_str().unwrap()]);
}

#[test]
fn upgrade_and_refcount_width_in_one_call() {
    let dir = tempfile::tempdir().unwrap();
    let p = populated(dir.path(), "compat=0.10");
    let before = content(&p);
    amend(&p, "compat=1.1,refcount_bits=4").unwrap();
    run(&["qemu-img", "check", p.to_str().unwrap()]);
    let info = run(&["qemu-img", "info", "--output=json", p.to_str().unwrap()]);
    assert!(
        info.contains("\"refcount-bits\": 4") && info.contains("\"compat\": \"1.1\""),
        "{info}"
    );
    assert_eq!(content(&p), before);
}
