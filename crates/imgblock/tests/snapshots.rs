//! Internal snapshots made here are read, applied and deleted by qemu-img, and the reverse.

mod fmt_common;

use std::path::Path;

use imgblock::{create, CreateOptions, Format, Image, OpenOptions};

const SIZE: u64 = 4 << 20;

fn qemu(args: &[&str]) -> String {
    fmt_common::run(args[0], &args[1..])
}

fn content(p: &Path, snapshot: Option<&str>) -> Vec<u8> {
    let img = Image::open(
        p,
        &OpenOptions {
            snapshot: snapshot.map(imgblock::SnapshotRef::from),
            ..OpenOptions::read_only()
        },
    )
    .unwrap();
    let mut v = vec![0u8; usize::try_from(img.size()).unwrap()];
    img.read_at(&mut v, 0).unwrap();
    v
}

fn qemu_content(dir: &Path, p: &Path, snapshot: Option<&str>) -> Vec<u8> {
    let out = dir.join("q.raw");
    let ps = p.to_str().unwrap();
    let os = out.to_str().unwrap();
    match snapshot {
        Some(s) => qemu(&[
            "qemu-img",
            "convert",
            "-l",
            &format!("snapshot.name={s}"),
            "-O",
            "raw",
            ps,
            os,
        ]),
        None => qemu(&["qemu-img", "convert", "-O", "raw", ps, os]),
    };
    std::fs::read(out).unwrap()
}

fn check_clean(p: &Path) {
    let out = qemu(&["qemu-img", "check", p.to_str().unwrap()]);
    assert!(out.contains("No errors were found"), "{out}");
}

fn make(dir: &Path, opts: &str) -> std::path::PathBuf {
    let p = dir.join("s.qcow2");
    let mut o = CreateOptions::new(SIZE);
    o.parse_opts(opts).unwrap();
    create(&p, Format::Qcow2, &o).unwrap();
    p
}

fn snapshot_cycle(opts: &str) {
    let dir = tempfile::tempdir().unwrap();
    let p = make(dir.path(), opts);
    let img = Image::open(&p, &OpenOptions::writable()).unwrap();
    img.write_at(&[0xaa; 300_000], 10_000).unwrap();
    img.write_at(&[0xbb; 70_000], 2_000_000).unwrap();
    img.snapshot_create("first").unwrap();
    img.write_at(&[0xcc; 100_000], 50_000).unwrap();
    img.write_zeroes(2_000_000, 65536, false).unwrap();
    img.snapshot_create("second").unwrap();
    img.write_at(&[0xdd; 5000], 1_000_000).unwrap();
    drop(img);
    check_clean(&p);
    let first = content(&p, Some("first"));
    let second = content(&p, Some("second"));
    let active = content(&p, None);
    assert_eq!(first, qemu_content(dir.path(), &p, Some("first")));
    assert_eq!(second, qemu_content(dir.path(), &p, Some("second")));
    assert_eq!(active, qemu_content(dir.path(), &p, None));
    assert!(first[10_000..310_000].iter().all(|&b| b == 0xaa) && first[50_000] == 0xaa);
    assert_eq!(second[50_000], 0xcc);
    let list = qemu(&["qemu-img", "snapshot", "-l", p.to_str().unwrap()]);
    assert!(list.contains("first") && list.contains("second"), "{list}");

    // Apply ours, check, then delete with qemu and ours.
    let mut img = Image::open(&p, &OpenOptions::writable()).unwrap();
    img.snapshot_apply("first").unwrap();
    drop(img);
    check_clean(&p);
    assert_eq!(content(&p, None), first);
    qemu(&["qemu-img", "snapshot", "-d", "second", p.to_str().unwrap()]);
    check_clean(&p);
    let img = Image::open(&p, &OpenOptions::writable()).unwrap();
    img.snapshot_delete("first").unwrap();
    img.write_at(&[0xee; 4096], 0).unwrap();
    drop(img);
    check_clean(&p);
    let mut expect = first.clone();
    expect[..4096].fill(0xee);
    assert_eq!(content(&p, None), expect);
    assert_eq!(qemu_content(dir.path(), &p, None), expect);
}

#[test]
fn snapshot_create_apply_delete_agree_with_qemu() {
    snapshot_cycle("");
    snapshot_cycle("compat=0.10,cluster_size=4k");
    snapshot_cycle("extended_l2=on,refcount_bits=4");
}

#[test]
fn qemu_snapshots_apply_and_delete_here() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("q.qcow2");
    let ps = p.to_str().unwrap();
    qemu(&["qemu-img", "create", "-f", "qcow2", ps, "4M"]);
    qemu(&["qemu-io", "-c", "write -P 0x11 0 1M", ps]);
    qemu(&["qemu-img", "snapshot", "-c", "base", ps]);
    qemu(&["qemu-io", "-c", "write -P 0x22 512k 1M", ps]);
    let base = qemu_content(dir.path(), &p, Some("base"));
    let mut img = Image::open(&p, &OpenOptions::writable()).unwrap();
    assert_eq!(img.driver().snapshots().unwrap()[0].name, "base");
    img.snapshot_apply("base").unwrap();
    drop(img);
    check_clean(&p);
    assert_eq!(qemu_content(dir.path(), &p, None), base);
    let img = Image::open(&p, &OpenOptions::writable()).unwrap();
    img.snapshot_delete("1").unwrap();
    drop(img);
    check_clean(&p);
    let out = qemu(&["qemu-img", "check", "--output=json", ps]);
    assert!(!out.contains("leaks"), "{out}");
    assert_eq!(qemu_content(dir.path(), &p, None), base);
}

#[test]
fn snapshot_errors_name_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let p = make(dir.path(), "");
    let mut img = Image::open(&p, &OpenOptions::writable()).unwrap();
    img.snapshot_create("a").unwrap();
    // Names may repeat, as in qemu; IDs stay unique.
    img.snapshot_create("a").unwrap();
    let ids: Vec<String> = img
        .driver()
        .snapshots()
        .unwrap()
        .into_iter()
        .map(|s| s.id)
        .collect();
    assert_eq!(ids, ["1", "2"]);
    assert!(matches!(
        img.snapshot_apply("nope"),
        Err(imgblock::Error::NoSuchSnapshot { .. })
    ));
    assert!(matches!(
        img.snapshot_delete("nope"),
        Err(imgblock::Error::NoSuchSnapshot { .. })
    ));
}

fn refused_as_overflow(r: imgblock::Result<()>) -> bool {
    matches!(
        r,
        Err(imgblock::Error::Qcow2 {
            source: imgblock::qcow2::Error::RefcountOverflow(_),
            ..
        })
    )
}

fn snapshot_names(p: &Path) -> Vec<String> {
    let img = Image::open(p, &OpenOptions::read_only()).unwrap();
    let list = img.driver().snapshots().unwrap();
    list.into_iter().map(|s| s.name).collect()
}

/// With 1-bit refcounts no cluster can be shared: a snapshot of an image that holds one is
/// refused as a refcount overflow, as qemu refuses it, before anything is written. It used to
/// fail with amend's message about refcount widths and leave the clusters it had taken leaked.
/// A snapshot of an empty image shares nothing and is made.
#[test]
fn snapshot_past_one_bit_refcounts_is_refused_and_leaks_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let p = make(dir.path(), "refcount_bits=1");
    let img = Image::open(&p, &OpenOptions::writable()).unwrap();
    img.snapshot_create("empty").unwrap();
    img.write_at(&[0], 0).unwrap();
    assert!(refused_as_overflow(img.snapshot_create("full")));
    img.write_at(&[5; 4096], 8192).unwrap();
    drop(img);
    check_clean(&p);
    assert_eq!(snapshot_names(&p), ["empty"]);
    let active = content(&p, None);
    assert!(active[8192..12288].iter().all(|&b| b == 5));
    assert_eq!(active, qemu_content(dir.path(), &p, None));
}

/// With 2-bit refcounts a cluster can be shared by the active state and two snapshots: a third
/// snapshot of it is refused the same way, and leaks nothing.
#[test]
fn third_snapshot_past_two_bit_refcounts_is_refused_and_leaks_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let p = make(dir.path(), "cluster_size=8k,refcount_bits=2");
    let img = Image::open(&p, &OpenOptions::writable()).unwrap();
    img.write_at(&[0], 0).unwrap();
    img.snapshot_create("a").unwrap();
    img.snapshot_create("b").unwrap();
    assert!(refused_as_overflow(img.snapshot_create("c")));
    drop(img);
    check_clean(&p);
    assert_eq!(snapshot_names(&p), ["a", "b"]);
}
