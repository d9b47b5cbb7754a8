//! Growing and shrinking images, judged by qemu-img check and by reading the data back.

mod fmt_common;

use std::path::Path;
use std::process::Command;

use imgblock::raw::Preallocation;
use imgblock::{create, CreateOptions, Format, Image, OpenOptions};

fn qemu_check_json(p: &Path) -> String {
    let o = fmt_common::output(
        Command::new("qemu-img")
            .args(["check", "--output=json"])
            .arg(p),
    );
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        o.status.success(),
        "qemu-img check {}: {out}{}",
        p.display(),
        String::from_utf8_lossy(&o.stderr)
    );
    out
}

fn make(dir: &Path, size: u64, opts: &str) -> std::path::PathBuf {
    let p = dir.join("r.qcow2");
    let mut o = CreateOptions::new(size);
    o.parse_opts(opts).unwrap();
    create(&p, Format::Qcow2, &o).unwrap();
    p
}

#[test]
fn grow_past_l1_table_keeps_data() {
    let dir = tempfile::tempdir().unwrap();
    let p = make(dir.path(), 1 << 20, "cluster_size=512");
    let mut img = Image::open(&p, &OpenOptions::writable()).unwrap();
    img.write_at(&[5u8; 3000], 1000).unwrap();
    img.resize(6 << 30, Preallocation::Off).unwrap();
    assert_eq!(img.size(), 6 << 30);
    img.write_at(&[6u8; 4096], (6 << 30) - 4096).unwrap();
    drop(img);
    qemu_check_json(&p);
    let img = Image::open(&p, &OpenOptions::read_only()).unwrap();
    let mut b = [0u8; 4096];
    img.read_at(&mut b[..3000], 1000).unwrap();
    assert!(b[..3000].iter().all(|&x| x == 5));
    img.read_at(&mut b, (6 << 30) - 4096).unwrap();
    assert!(b.iter().all(|&x| x == 6));
}

#[test]
fn shrink_frees_clusters_and_regrow_reads_zeroes() {
    let dir = tempfile::tempdir().unwrap();
    let p = make(dir.path(), 8 << 20, "cluster_size=64k");
    let mut img = Image::open(&p, &OpenOptions::writable()).unwrap();
    img.write_at(&vec![7u8; 8 << 20], 0).unwrap();
    img.resize((2 << 20) + 1536, Preallocation::Off).unwrap();
    drop(img);
    let out = qemu_check_json(&p);
    assert!(!out.contains("leaks"), "{out}");
    let mut img = Image::open(&p, &OpenOptions::writable()).unwrap();
    img.resize(8 << 20, Preallocation::Off).unwrap();
    let mut b = vec![0u8; 8 << 20];
    img.read_at(&mut b, 0).unwrap();
    let cut = (2 << 20) + 1536;
    assert!(b[..cut].iter().all(|&x| x == 7));
    assert!(
        b[cut..].iter().all(|&x| x == 0),
        "data past the shrunken end came back"
    );
    drop(img);
    qemu_check_json(&p);
}

#[test]
fn grow_with_each_preallocation_mode_is_clean() {
    for mode in [
        Preallocation::Metadata,
        Preallocation::Falloc,
        Preallocation::Full,
    ] {
        let dir = tempfile::tempdir().unwrap();
        let p = make(dir.path(), 1 << 20, "");
        let mut img = Image::open(&p, &OpenOptions::writable()).unwrap();
        img.resize(5 << 20, mode).unwrap();
        let st = img.block_status(4 << 20, 1 << 20).unwrap();
        assert!(st.offset.is_some(), "{mode:?}: new area not allocated");
        drop(img);
        qemu_check_json(&p);
    }
}

#[test]
fn v2_with_snapshots_refuses_resize() {
    let dir = tempfile::tempdir().unwrap();
    let p = make(dir.path(), 1 << 20, "compat=0.10");
    let mut img = Image::open(&p, &OpenOptions::writable()).unwrap();
    img.snapshot_create("s").unwrap();
    assert!(matches!(
        img.resize(2 << 20, Preallocation::Off),
        Err(imgblock::Error::Unsupported { .. })
    ));
}

#[test]
fn raw_resize_grows_and_shrinks_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("r.raw");
    create(&p, Format::Raw, &CreateOptions::new(1 << 20)).unwrap();
    let mut img = Image::open(&p, &OpenOptions::writable().format(Some(Format::Raw))).unwrap();
    img.resize(3 << 20, Preallocation::Full).unwrap();
    assert_eq!(std::fs::metadata(&p).unwrap().len(), 3 << 20);
    img.resize(1 << 19, Preallocation::Off).unwrap();
    assert_eq!(std::fs::metadata(&p).unwrap().len(), 1 << 19);
}
