//! Writes that would land on qcow2 metadata: refcounts that call a metadata cluster free, or an
//! L2 entry pointing into a table. Like qemu, the library refuses the write, names the offset
//! and the structure, marks the image corrupt and leaves everything else as it was.

mod fmt_common;

use std::path::{Path, PathBuf};
use std::process::Command;

use fmt_common::*;
use imgblock::{Image, OpenOptions};

/// A 4 MiB qcow2 image made by qemu with data at 0-128k and 1M-1M+64k.
fn image(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    qemu_img(&["create", "-q", "-f", "qcow2", p.to_str().unwrap(), "4M"]);
    qemu_io("qcow2", &p, &["write -P 1 0 128k", "write -P 2 1M 64k"]);
    p
}

fn be64_at(b: &[u8], off: u64) -> u64 {
    let o = usize::try_from(off).unwrap();
    u64::from_be_bytes(b[o..o + 8].try_into().unwrap())
}

/// Writes a big-endian value into the file.
fn poke(path: &Path, offset: u64, bytes: &[u8]) {
    let mut b = std::fs::read(path).unwrap();
    let o = usize::try_from(offset).unwrap();
    b[o..o + bytes.len()].copy_from_slice(bytes);
    std::fs::write(path, b).unwrap();
}

/// (refcount table, first refcount block, L1 table, first L2 table) offsets.
fn layout(path: &Path) -> (u64, u64, u64, u64) {
    let b = std::fs::read(path).unwrap();
    let rt = be64_at(&b, 48);
    let l1 = be64_at(&b, 40);
    let mask = 0x00ff_ffff_ffff_fe00;
    (rt, be64_at(&b, rt) & mask, l1, be64_at(&b, l1) & mask)
}

/// What `qemu-img info` says about the corrupt flag.
fn qemu_says_corrupt(path: &Path) -> bool {
    let out = qemu_img(&["info", "--output=json", "-U", path.to_str().unwrap()]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        v["format"],
        "qcow2",
        "{}: no longer a qcow2 image",
        path.display()
    );
    v["format-specific"]["data"]["corrupt"]
        .as_bool()
        .expect("a v3 image reports the corrupt flag")
}

/// Runs qemu-io's write and returns its messages, expecting it to fail.
fn qemu_io_write_fails(path: &Path, cmd: &str) -> String {
    let o =
        output(Command::new("qemu-io").args(["-f", "qcow2", "-c", cmd, path.to_str().unwrap()]));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(text.contains("write failed"), "qemu-io {cmd}: {text}");
    text
}

/// The file's bytes with the corrupt bit set, as the refused operation must leave them.
fn with_corrupt_bit(mut b: Vec<u8>) -> Vec<u8> {
    b[79] |= 2;
    b
}

/// Asserts the library error is a prevented overlap with `what` at `offset`.
fn assert_overlap(r: imgblock::Result<()>, what: &str, offset: u64) {
    match r {
        Err(imgblock::Error::Qcow2 {
            source: imgblock::qcow2::Error::MetadataOverlap { offset: o, what: w },
            ..
        }) => {
            assert_eq!((o, w), (offset, what));
        }
        other => panic!("expected an overlap with {what}, got {other:?}"),
    }
}

#[test]
fn snapshot_create_reftable_entry_without_refblock_refused_like_qemu() {
    // Entry 0 past the end of the file (its block reads as zeroes), inside free space past the
    // end, and missing: every cluster then looks free, the header first.
    for entry in [0x400_0000u64, 0x10_0000, 0] {
        let dir = tempfile::tempdir().unwrap();
        let ours = image(dir.path(), "ours.qcow2");
        let (rt, ..) = layout(&ours);
        poke(&ours, rt, &entry.to_be_bytes());
        let theirs = dir.path().join("theirs.qcow2");
        std::fs::copy(&ours, &theirs).unwrap();
        let before = std::fs::read(&ours).unwrap();

        let img = Image::open(&ours, &OpenOptions::writable()).unwrap();
        assert_overlap(img.snapshot_create("s"), "qcow2_header", 0);
        // Nothing further is written in this session.
        assert!(img.write_at(&[7u8; 512], 3 << 20).is_err());
        drop(img);
        assert!(
            std::fs::read(&ours).unwrap() == with_corrupt_bit(before),
            "entry {entry:#x}: more than the corrupt bit changed"
        );

        let o = output(Command::new("qemu-img").args([
            "snapshot",
            "-c",
            "s",
            theirs.to_str().unwrap(),
        ]));
        assert!(!o.status.success(), "qemu-img snapshot -c succeeded");
        assert_eq!(qemu_says_corrupt(&ours), qemu_says_corrupt(&theirs));
        assert!(qemu_says_corrupt(&ours));
        // The guest data is untouched.
        assert_reads_like_qemu(&ours);
        assert_eq!(read_lib(&ours)[..128 << 10], [1u8; 128 << 10][..]);
    }
}

#[test]
fn write_refcount_of_l2_table_zero_refused_like_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let ours = image(dir.path(), "ours.qcow2");
    let (_, rb, _, l2) = layout(&ours);
    // 16-bit refcounts: the L2 table's cluster looks free and is the first free one.
    poke(&ours, rb + (l2 >> 16) * 2, &0u16.to_be_bytes());
    let theirs = dir.path().join("theirs.qcow2");
    std::fs::copy(&ours, &theirs).unwrap();
    let before = std::fs::read(&ours).unwrap();

    let img = Image::open(&ours, &OpenOptions::writable()).unwrap();
    assert_overlap(img.write_at(&[9u8; 65536], 2 << 20), "active L2 table", l2);
    drop(img);
    assert!(std::fs::read(&ours).unwrap() == with_corrupt_bit(before));

    let msg = qemu_io_write_fails(&theirs, "write -P 9 2M 64k");
    assert!(msg.contains("overlaps with active L2 table"), "{msg}");
    assert!(qemu_says_corrupt(&ours) && qemu_says_corrupt(&theirs));
    assert_reads_like_qemu(&ours);
}

#[test]
fn write_in_place_through_l2_entry_pointing_at_l1_refused_like_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let ours = image(dir.path(), "ours.qcow2");
    let (_, _, l1, l2) = layout(&ours);
    // Guest cluster 0 claims the L1 table's cluster as its data, with refcount one.
    poke(&ours, l2, &((1u64 << 63) | l1).to_be_bytes());
    let theirs = dir.path().join("theirs.qcow2");
    std::fs::copy(&ours, &theirs).unwrap();
    let before = std::fs::read(&ours).unwrap();

    let img = Image::open(&ours, &OpenOptions::writable()).unwrap();
    assert_overlap(img.write_at(&[9u8; 4096], 0), "active L1 table", l1);
    drop(img);
    assert!(std::fs::read(&ours).unwrap() == with_corrupt_bit(before));

    let msg = qemu_io_write_fails(&theirs, "write -P 9 0 4k");
    assert!(msg.contains("overlaps with active L1 table"), "{msg}");
    assert!(qemu_says_corrupt(&ours) && qemu_says_corrupt(&theirs));
}

/// Offset of the persistent bitmaps' directory, from the bitmaps header extension.
fn bitmap_directory(path: &Path) -> u64 {
    let b = std::fs::read(path).unwrap();
    let header_len = u64::from(u32::from_be_bytes(b[100..104].try_into().unwrap()));
    let mut off = usize::try_from(header_len).unwrap();
    loop {
        let kind = u32::from_be_bytes(b[off..off + 4].try_into().unwrap());
        let len = u32::from_be_bytes(b[off + 4..off + 8].try_into().unwrap()) as usize;
        assert_ne!(kind, 0, "no bitmaps extension");
        if kind == 0x2385_2875 {
            return be64_at(&b, (off + 24) as u64);
        }
        off += 8 + len.div_ceil(8) * 8;
    }
}

#[test]
fn write_refcount_of_bitmap_directory_zero_refused_like_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let ours = image(dir.path(), "ours.qcow2");
    qemu_img(&["bitmap", "--add", ours.to_str().unwrap(), "b0"]);
    let (_, rb, _, _) = layout(&ours);
    let directory = bitmap_directory(&ours);
    // The directory's cluster looks free, and is the first free one.
    poke(&ours, rb + (directory >> 16) * 2, &0u16.to_be_bytes());
    let theirs = dir.path().join("theirs.qcow2");
    std::fs::copy(&ours, &theirs).unwrap();

    let img = Image::open(&ours, &OpenOptions::writable()).unwrap();
    assert_overlap(
        img.write_at(&[9u8; 65536], 2 << 20),
        "bitmap directory",
        directory,
    );
    drop(img);
    assert_eq!(bitmap_directory(&ours), directory);

    let msg = qemu_io_write_fails(&theirs, "write -P 9 2M 64k");
    assert!(msg.contains("overlaps with bitmap directory"), "{msg}");
    assert!(qemu_says_corrupt(&ours) && qemu_says_corrupt(&theirs));
    assert_reads_like_qemu(&ours);
}

#[test]
fn write_on_sound_image_allocates_past_metadata() {
    // The checks see the tables they must protect and nothing else.
    let dir = tempfile::tempdir().unwrap();
    let p = image(dir.path(), "ok.qcow2");
    let img = Image::open(&p, &OpenOptions::writable()).unwrap();
    img.write_at(&[3u8; 3 << 20], 1 << 20).unwrap();
    img.snapshot_create("a").unwrap();
    img.write_at(&[4u8; 1 << 20], 0).unwrap();
    img.flush().unwrap();
    drop(img);
    qemu_check(&p);
    assert!(!qemu_says_corrupt(&p));
    assert_reads_like_qemu(&p);
}
