//! vdi against qemu-img, both ways: qemu-made images (after qemu-io data writes, zero writes and
//! discards) read byte for byte through the library; library-made images pass `qemu-img check`
//! and compare equal to their source. Also VirtualBox's layout and differencing images.

#![allow(clippy::cast_possible_truncation)] // test sizes are small constants
mod fmt_common;

use std::path::Path;

use fmt_common::*;
use imgblock::vdi::header::{Header, ImageType, Uuid, VBOX_TEXT};
use imgblock::{create, CreateOptions, Format, FormatSpecific, Image, OpenOptions, Repair};

/// Every -o option qemu-img 10 offers for vdi, as qemu-img create would be given them.
const QEMU_OPTION_SETS: &[&str] = &[
    "",
    "static=on",
    "static=off",
    "preallocation=off",
    "preallocation=falloc",
    "preallocation=full",
    "nocow=on",
    "extent_size_hint=1M",
];

fn edit_with_qemu_io(p: &Path) {
    qemu_io(
        "vdi",
        p,
        &[
            "write -P 0xab 0 100k",
            "write -P 0x11 1500k 700k",
            "write -z 1600k 64k",
            "write -P 0x22 3m 4k",
            "discard 3m 1m",
            "write -z 4m 1m",
            "write -P 0x33 5119k 1k",
        ],
    );
}

#[test]
fn vdi_qemu_made_images_read_byte_for_byte() {
    let dir = tempfile::tempdir().unwrap();
    for (i, opts) in QEMU_OPTION_SETS.iter().enumerate() {
        let p = dir.path().join(format!("q{i}.vdi"));
        let ps = p.to_str().unwrap();
        let mut args = vec!["create", "-q", "-f", "vdi"];
        if !opts.is_empty() {
            args.extend(["-o", opts]);
        }
        args.extend([ps, "5M"]);
        qemu_img(&args);
        assert_reads_like_qemu(&p);
        edit_with_qemu_io(&p);
        assert_reads_like_qemu(&p);
        let img = Image::open(&p, &OpenOptions::read_only()).unwrap();
        let r = img.check(Repair::None).unwrap();
        assert_eq!(r.corruptions, 0, "{opts}: {:?}", r.messages);
    }
}

#[test]
fn vdi_odd_size_reads_like_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("odd.vdi");
    qemu_img(&["create", "-q", "-f", "vdi", p.to_str().unwrap(), "1234567"]);
    qemu_io("vdi", &p, &["write -P 0x5a 1200000 34567"]);
    assert_reads_like_qemu(&p);
}

#[test]
fn vdi_library_made_images_pass_qemu_check_and_compare() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    let mut content = vec![0u8; 5 << 20];
    content[..300_000].copy_from_slice(&pattern(300_000, 1));
    content[(3 << 20) + 7..(3 << 20) + 70_007].copy_from_slice(&pattern(70_000, 2));
    let n = content.len();
    content[n - 1000..].fill(0xee);
    std::fs::write(&src, &content).unwrap();
    let srcimg = Image::open(&src, &OpenOptions::read_only().format(Some(Format::Raw))).unwrap();
    for opts in ["", "static=on"] {
        let dst = dir.path().join(format!("lib{}.vdi", opts.len()));
        lib_convert(&srcimg, &dst, Format::Vdi, opts);
        qemu_check(&dst);
        qemu_compare(&src, &dst);
        assert_eq!(read_lib(&dst), content);
        // Zero writes over allocated and unallocated blocks keep qemu-img check clean.
        let img = Image::open(&dst, &OpenOptions::writable()).unwrap();
        img.write_zeroes(0, 2 << 20, true).unwrap();
        img.discard(3 << 20, 1 << 20).unwrap();
        img.flush().unwrap();
        drop(img);
        qemu_check(&dst);
        assert_reads_like_qemu(&dst);
    }
}

#[test]
fn vdi_create_options_are_refused_like_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("x.vdi");
    let mut o = CreateOptions::new(1 << 20);
    o.set("cluster_size", "64k");
    assert!(create(&p, Format::Vdi, &o).is_err());
    let mut o = CreateOptions::new(1 << 20);
    o.set("preallocation", "metadata");
    assert!(create(&p, Format::Vdi, &o).is_err());
    let mut o = CreateOptions::new(1 << 20);
    o.backing_file = Some("base.vdi".into());
    assert!(create(&p, Format::Vdi, &o).is_err());
}

#[test]
fn vdi_6gib_with_data_at_the_end_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let size: u64 = 6 << 30;
    // Library-made, read by qemu.
    let p = dir.path().join("big.vdi");
    create(&p, Format::Vdi, &CreateOptions::new(size)).unwrap();
    let img = Image::open(&p, &OpenOptions::writable()).unwrap();
    img.write_at(&vec![0x5c; 2 << 20], size - (3 << 20))
        .unwrap();
    img.write_at(&[0x5d; 4096], size - 4096).unwrap();
    img.write_at(b"first", 0).unwrap();
    img.flush().unwrap();
    drop(img);
    qemu_check(&p);
    qemu_io(
        "vdi",
        &p,
        &[
            "read -P 0x5c 6141m 2m",
            "read -P 0 6143m 1020k",
            "read -P 0x5d 6291452k 4k",
        ],
    );
    let out = qemu_io_out(
        "vdi",
        &p,
        &["read -P 0x5d 6291452k 4k", "read -P 0x5c 6141m 4k"],
    );
    assert!(!out.contains("Pattern verification failed"), "{out}");
    // qemu-made, read by the library.
    let q = dir.path().join("bigq.vdi");
    qemu_img(&["create", "-q", "-f", "vdi", q.to_str().unwrap(), "6G"]);
    qemu_io("vdi", &q, &["write -P 0x77 6143m 1m"]);
    let img = Image::open(&q, &OpenOptions::read_only()).unwrap();
    let mut buf = vec![0u8; 2 << 20];
    img.read_at(&mut buf, size - (2 << 20)).unwrap();
    assert!(buf[..1 << 20].iter().all(|&b| b == 0));
    assert!(buf[1 << 20..].iter().all(|&b| b == 0x77));
}

/// Writes a VDI the way VirtualBox lays it out: its text, the block map at 1 MiB, data at
/// 2 MiB, blocks stored out of guest order.
fn build_vbox_vdi(path: &Path, size: u64, blocks: &[(u32, u8)], kind: ImageType) -> Header {
    let nblocks = size.div_ceil(1 << 20) as u32;
    let mut h = Header::new(size, nblocks, kind);
    h.text = [0; 64];
    h.text[..VBOX_TEXT.len()].copy_from_slice(VBOX_TEXT.as_bytes());
    h.offset_bmap = 1 << 20;
    h.offset_data = 2 << 20;
    h.blocks_allocated = blocks.len() as u32;
    let mut f = vec![0u8; (2 << 20) + blocks.len() * (1 << 20)];
    let mut bmap = vec![0xffu8; nblocks as usize * 4];
    // Data blocks in reverse order of the guest blocks they hold.
    for (i, &(guest, fill)) in blocks.iter().rev().enumerate() {
        bmap[guest as usize * 4..guest as usize * 4 + 4].copy_from_slice(&(i as u32).to_le_bytes());
        let at = (2 << 20) + i * (1 << 20);
        f[at..at + (1 << 20)].fill(fill);
    }
    f[..512].copy_from_slice(&h.to_bytes());
    f[1 << 20..(1 << 20) + bmap.len()].copy_from_slice(&bmap);
    std::fs::write(path, &f).unwrap();
    h
}

#[test]
fn vdi_virtualbox_layout_reads_in_qemu_and_library() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("vbox.vdi");
    build_vbox_vdi(
        &p,
        6 << 20,
        &[(1, 0x41), (4, 0x42), (5, 0x43)],
        ImageType::Dynamic,
    );
    assert_reads_like_qemu(&p);
    let data = read_lib(&p);
    assert!(data[(1 << 20)..(2 << 20)].iter().all(|&b| b == 0x41));
    assert!(data[(4 << 20)..(5 << 20)].iter().all(|&b| b == 0x42));
    qemu_check(&p);
    // Writing through the library keeps VirtualBox's layout valid for qemu.
    let img = Image::open(&p, &OpenOptions::writable()).unwrap();
    img.write_at(&[0x99; 4096], 2 << 20).unwrap();
    img.flush().unwrap();
    drop(img);
    qemu_check(&p);
    assert_reads_like_qemu(&p);
}

#[test]
fn vdi_differencing_image_opens_its_parent_by_uuid() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.vdi");
    let bh = build_vbox_vdi(
        &base,
        4 << 20,
        &[(0, 0x10), (1, 0x11), (2, 0x12)],
        ImageType::Dynamic,
    );
    std::fs::create_dir(dir.path().join("Snapshots")).unwrap();
    let child = dir.path().join("Snapshots").join("{child}.vdi");
    let mut ch = build_vbox_vdi(&child, 4 << 20, &[(1, 0x21)], ImageType::Diff);
    ch.uuid_link = bh.uuid_image;
    ch.uuid_parent = bh.uuid_last_snap;
    let mut bytes = std::fs::read(&child).unwrap();
    bytes[..512].copy_from_slice(&ch.to_bytes());
    // Block 2 explicitly zero in the child.
    bytes[(1 << 20) + 8..(1 << 20) + 12].copy_from_slice(&0xffff_fffeu32.to_le_bytes());
    std::fs::write(&child, &bytes).unwrap();
    let img = Image::open(&child, &OpenOptions::read_only()).unwrap();
    assert_eq!(img.chain().len(), 2);
    assert_eq!(img.driver().backing().unwrap().filename, "../base.vdi");
    let data = read_image(&img);
    assert!(data[..1 << 20].iter().all(|&b| b == 0x10));
    assert!(data[1 << 20..2 << 20].iter().all(|&b| b == 0x21));
    assert!(data[2 << 20..3 << 20].iter().all(|&b| b == 0));
    assert!(data[3 << 20..].iter().all(|&b| b == 0));
    match img.driver().specific() {
        FormatSpecific::Vdi(v) => {
            assert_eq!(v.image_type, "differencing");
            assert_eq!(v.parent_uuid, Some(bh.uuid_image.to_string()));
        }
        other => panic!("{other:?}"),
    }
    // Older copies of the base next to it (same image UUID, another modification UUID, other
    // data): the one the child was made on is still the parent, whatever the directory order.
    for name in ["a-old.vdi", "z-old.vdi", "base (copy).vdi"] {
        let old = dir.path().join(name);
        let mut oh = build_vbox_vdi(&old, 4 << 20, &[(0, 0x66)], ImageType::Dynamic);
        oh.uuid_image = bh.uuid_image;
        let mut bytes = std::fs::read(&old).unwrap();
        bytes[..512].copy_from_slice(&oh.to_bytes());
        std::fs::write(&old, &bytes).unwrap();
    }
    let img = Image::open(&child, &OpenOptions::read_only()).unwrap();
    assert_eq!(img.driver().backing().unwrap().filename, "../base.vdi");
    assert!(read_image(&img)[..1 << 20].iter().all(|&b| b == 0x10));
    // An exact copy of the base cannot be told from it: refused, not guessed.
    std::fs::copy(&base, dir.path().join("backup.vdi")).unwrap();
    let ambiguous = || {
        let e = Image::open(&child, &OpenOptions::read_only()).unwrap_err();
        assert!(
            matches!(
                e,
                imgblock::Error::Vdi {
                    source: imgblock::vdi::Error::AmbiguousParent(_),
                    ..
                }
            ),
            "{e}"
        );
        e
    };
    let e = ambiguous();
    assert!(e.to_string().contains("{child}.vdi"), "{e}");
    // Only the stale copies left: none has the modification UUID the child names.
    std::fs::remove_file(dir.path().join("backup.vdi")).unwrap();
    std::fs::remove_file(&base).unwrap();
    ambiguous();
    // A parent that cannot be found is a clear error.
    for name in ["a-old.vdi", "z-old.vdi", "base (copy).vdi"] {
        std::fs::remove_file(dir.path().join(name)).unwrap();
    }
    let e = Image::open(&child, &OpenOptions::read_only()).unwrap_err();
    assert!(matches!(
        e,
        imgblock::Error::Vdi {
            source: imgblock::vdi::Error::ParentNotFound(_),
            ..
        }
    ));
    let _ = Uuid::random();
}

/// A differencing image cannot be emptied (qemu's vdi has no make_empty): commit writes its
/// data into the parent and leaves the child as it is, without an error.
#[test]
fn vdi_differencing_commit_keeps_child_without_error() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.vdi");
    let bh = build_vbox_vdi(&base, 4 << 20, &[(0, 0x10), (1, 0x11)], ImageType::Dynamic);
    let child = dir.path().join("child.vdi");
    let mut ch = build_vbox_vdi(&child, 4 << 20, &[(1, 0x21), (3, 0x23)], ImageType::Diff);
    ch.uuid_link = bh.uuid_image;
    ch.uuid_parent = bh.uuid_last_snap;
    let mut bytes = std::fs::read(&child).unwrap();
    bytes[..512].copy_from_slice(&ch.to_bytes());
    std::fs::write(&child, &bytes).unwrap();
    let before = read_lib(&child);
    imgblock::ops::commit(
        &child,
        None,
        &imgblock::crypto::Secrets::none(),
        None,
        false,
        &imgblock::ops::no_progress,
    )
    .unwrap();
    assert!(
        read_lib(&base) == before,
        "the parent reads as the child did"
    );
    assert!(read_lib(&child) == before, "the child still reads the same");
    assert_eq!(
        std::fs::read(&child).unwrap(),
        bytes,
        "the child is unchanged"
    );
}

#[test]
fn vdi_fixtures_read_like_qemu() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures");
    assert_reads_like_qemu(&dir.join("dynamic.vdi"));
}
