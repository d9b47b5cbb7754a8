//! commit and rebase on backing chains, checked against qemu-img's view of the result.

mod fmt_common;

use std::path::{Path, PathBuf};

use imgblock::crypto::Secrets;
use imgblock::ops::{commit, no_progress, rebase};
use imgblock::{BackingSpec, Image, OpenOptions};

fn run(args: &[&str]) -> String {
    fmt_common::run(args[0], &args[1..])
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// base.raw <- mid.qcow2 <- top.qcow2, each with writes of its own.
fn chain(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let base = dir.join("base.raw");
    let mid = dir.join("mid.qcow2");
    let top = dir.join("top.qcow2");
    run(&["qemu-img", "create", "-f", "raw", s(&base), "4M"]);
    run(&["qemu-io", "-f", "raw", "-c", "write -P 0x11 0 4M", s(&base)]);
    run(&[
        "qemu-img",
        "create",
        "-f",
        "qcow2",
        "-b",
        "base.raw",
        "-F",
        "raw",
        s(&mid),
    ]);
    run(&[
        "qemu-io",
        "-c",
        "write -P 0x22 64k 200k",
        "-c",
        "write -z 1M 128k",
        s(&mid),
    ]);
    run(&[
        "qemu-img",
        "create",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4k",
        "-b",
        "mid.qcow2",
        "-F",
        "qcow2",
        s(&top),
    ]);
    run(&[
        "qemu-io",
        "-c",
        "write -P 0x33 100k 10k",
        "-c",
        "write -z 2M 8k",
        "-c",
        "write -P 0x44 3000k 5k",
        s(&top),
    ]);
    (base, mid, top)
}

fn raw_of(p: &Path, out: &Path) -> Vec<u8> {
    run(&["qemu-img", "convert", "-O", "raw", s(p), s(out)]);
    std::fs::read(out).unwrap()
}

#[test]
fn commit_into_backing_matches_qemu() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    let (_, mid_a, top_a) = chain(a.path());
    let (_, mid_b, top_b) = chain(b.path());
    let before = raw_of(&top_a, &a.path().join("before.raw"));
    commit(&top_a, None, &Secrets::none(), None, false, &no_progress).unwrap();
    run(&["qemu-img", "commit", s(&top_b)]);
    run(&["qemu-img", "check", s(&mid_a)]);
    run(&["qemu-img", "check", s(&top_a)]);
    assert_eq!(
        raw_of(&mid_a, &a.path().join("m.raw")),
        raw_of(&mid_b, &b.path().join("m.raw"))
    );
    assert_eq!(raw_of(&mid_a, &a.path().join("m.raw")), before);
    // The top is empty now: everything reads through to the committed base.
    let img = Image::open(&top_a, &OpenOptions::read_only()).unwrap();
    assert!(!img.allocated_above(1, 0, img.size()).unwrap().0);
    assert_eq!(raw_of(&top_a, &a.path().join("t.raw")), before);
}

#[test]
fn commit_to_deeper_base_and_keep_top() {
    let a = tempfile::tempdir().unwrap();
    let (base, _, top) = chain(a.path());
    let before = raw_of(&top, &a.path().join("before.raw"));
    commit(
        &top,
        None,
        &Secrets::none(),
        Some(&base),
        true,
        &no_progress,
    )
    .unwrap();
    assert_eq!(std::fs::read(&base).unwrap(), before);
}

#[test]
fn safe_rebase_keeps_content() {
    let a = tempfile::tempdir().unwrap();
    let (_, _, top) = chain(a.path());
    let before = raw_of(&top, &a.path().join("before.raw"));
    // Onto the raw base directly (skipping mid), then flattened.
    let spec = BackingSpec {
        filename: "base.raw".into(),
        format: Some("raw".into()),
    };
    rebase(
        &top,
        None,
        &Secrets::none(),
        Some(&spec),
        false,
        &no_progress,
    )
    .unwrap();
    run(&["qemu-img", "check", s(&top)]);
    let info = run(&["qemu-img", "info", "--output=json", s(&top)]);
    assert!(
        info.contains("\"backing-filename\": \"base.raw\""),
        "{info}"
    );
    assert_eq!(raw_of(&top, &a.path().join("r1.raw")), before);
    rebase(&top, None, &Secrets::none(), None, false, &no_progress).unwrap();
    run(&["qemu-img", "check", s(&top)]);
    let info = run(&["qemu-img", "info", "--output=json", s(&top)]);
    assert!(!info.contains("backing-filename"), "{info}");
    assert_eq!(raw_of(&top, &a.path().join("r2.raw")), before);
}

#[test]
fn unsafe_rebase_rewrites_only_the_header() {
    let a = tempfile::tempdir().unwrap();
    let (_, _, top) = chain(a.path());
    std::fs::rename(a.path().join("mid.qcow2"), a.path().join("moved.qcow2")).unwrap();
    let spec = BackingSpec {
        filename: "moved.qcow2".into(),
        format: Some("qcow2".into()),
    };
    rebase(
        &top,
        None,
        &Secrets::none(),
        Some(&spec),
        true,
        &no_progress,
    )
    .unwrap();
    run(&["qemu-img", "check", s(&top)]);
    let info = run(&["qemu-img", "info", "--output=json", s(&top)]);
    assert!(info.contains("moved.qcow2"), "{info}");
}
