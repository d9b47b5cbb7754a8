//! ESXi seSparse snapshots (read only), built from the layout by `fmt_common::sesparse` since
//! qemu-img cannot create them, read against qemu-img: alone and over a parent qemu-img made;
//! and one corrupted field at a time, each refused with its own error and no panic.

#![allow(clippy::cast_possible_truncation)] // test sizes are small constants
mod fmt_common;

use std::path::Path;

use fmt_common::sesparse::{self, Built, Grain, Spec};
use fmt_common::*;
use imgblock::vmdk::Error as VErr;
use imgblock::{FormatSpecific, Image, OpenOptions};

/// A 40 MiB monolithicSparse parent made by qemu-img, with data almost everywhere (and a
/// zeroed hole), and its CID.
fn parent(dir: &Path) -> (String, u32) {
    let p = dir.join("base.vmdk");
    qemu_img(&["create", "-q", "-f", "vmdk", p.to_str().unwrap(), "40M"]);
    qemu_io(
        "vmdk",
        &p,
        &[
            "write -P 0x11 0 40M",
            "write -z 1M 64k",
            "write -P 0x22 32M 8k",
        ],
    );
    ("base.vmdk".into(), sesparse::read_cid(&p))
}

/// What `spec` reads as over `base` (all zero when there is none).
fn model(spec: &Spec, base: Option<&[u8]>) -> Vec<u8> {
    let mut m = base.map_or_else(|| vec![0u8; spec.size as usize], <[u8]>::to_vec);
    for (g, grain) in &spec.grains {
        let at = (g * sesparse::GRAIN) as usize;
        let end = (at + sesparse::GRAIN as usize).min(m.len());
        let dst = &mut m[at..end];
        match grain {
            Grain::Unmapped | Grain::Zero => dst.fill(0),
            Grain::Data { data, .. } => dst.copy_from_slice(&data[..end - at]),
        }
    }
    m
}

#[test]
fn sesparse_snapshot_over_qemu_parent_reads_like_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let p = parent(dir.path());
    let base = read_lib(&dir.path().join("base.vmdk"));
    let spec = sesparse::mixed(Some(p));
    let b = sesparse::build(dir.path(), "snap", &spec);
    assert_reads_like_qemu(&b.descriptor);
    assert!(read_lib(&b.descriptor) == model(&spec, Some(&base)));

    let img = Image::open(&b.descriptor, &OpenOptions::read_only()).unwrap();
    assert_eq!(img.size(), 40 << 20);
    assert_eq!(img.chain().len(), 2);
    assert_eq!(img.driver().cluster_size(), Some(4096));
    match img.driver().specific() {
        FormatSpecific::Vmdk(v) => {
            assert_eq!(v.create_type, "seSparse");
            assert_eq!(v.extents.len(), 1);
            assert_eq!(v.extents[0].format, "SESPARSE");
            assert_eq!(v.extents[0].cluster_size, Some(4096));
            assert_eq!(v.extents[0].virtual_size, 40 << 20);
        }
        other => panic!("{other:?}"),
    }
    // Block status: allocated grains are data here, zeroed and unmapped ones zero here,
    // the rest comes from the parent.
    let st = img.block_status(0, 1 << 20).unwrap();
    assert_eq!((st.depth, st.data, st.len), (0, true, 8192));
    let st = img.block_status(8192, 1 << 20).unwrap();
    assert_eq!((st.depth, st.zero, st.data, st.len), (0, true, false, 8192));
    let st = img.block_status(400 << 10, 1 << 20).unwrap();
    assert_eq!(
        (st.depth, st.zero, st.data, st.len),
        (0, true, false, 13 * 4096)
    );
    let st = img.block_status(5 * 4096, 4096).unwrap();
    assert_eq!((st.depth, st.data), (1, true));
    // The absent middle grain table reads from the parent.
    let st = img.block_status(16 << 20, 16 << 20).unwrap();
    assert_eq!(st.depth, 1);
}

#[test]
fn sesparse_snapshot_without_parent_reads_like_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let spec = sesparse::mixed(None);
    let b = sesparse::build(dir.path(), "alone", &spec);
    assert_reads_like_qemu(&b.descriptor);
    assert!(read_lib(&b.descriptor) == model(&spec, None));
    // A disk that is not a whole number of grain tables, with a directory larger than needed.
    let mut s = Spec::new((17 << 20) + 512);
    s.gd_sectors = 3;
    s.grains.insert(4096, Grain::Zero);
    s.grains.insert(
        4352,
        Grain::Data {
            slot: 1,
            data: vec![0x5a; 4096],
        },
    );
    let b = sesparse::build(dir.path(), "odd", &s);
    assert_reads_like_qemu(&b.descriptor);
    assert!(read_lib(&b.descriptor) == model(&s, None));
}

/// ESXi's own chain: a `vmfs` base (descriptor and flat file) and two seSparse snapshots.
#[test]
fn sesparse_two_snapshots_over_vmfs_flat_base_read_like_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let size = 20u64 << 20;
    let flat = pattern(size as usize, 9);
    std::fs::write(d.join("disk-flat.vmdk"), &flat).unwrap();
    std::fs::write(
        d.join("disk.vmdk"),
        format!(
            "# Disk DescriptorFile\nversion=1\nencoding=\"UTF-8\"\nCID=1a2b3c4d\n\
parentCID=ffffffff\ncreateType=\"vmfs\"\n\n# Extent description\n\
RW {} VMFS \"disk-flat.vmdk\"\n\n# The Disk Data Base\n#DDB\n\nddb.adapterType = \"lsilogic\"\n",
            size / 512
        ),
    )
    .unwrap();
    let mut s1 = Spec::new(size);
    s1.parent = Some(("disk.vmdk".into(), 0x1a2b_3c4d));
    s1.cid = 0x0000_0001;
    for g in 0..64 {
        s1.grains.insert(
            g * 3,
            Grain::Data {
                slot: g,
                data: vec![g as u8 + 1; 4096],
            },
        );
    }
    s1.grains.insert(4100, Grain::Unmapped);
    sesparse::build(d, "disk-000001", &s1);
    let mut s2 = Spec::new(size);
    s2.parent = Some(("disk-000001.vmdk".into(), 1));
    s2.cid = 2;
    s2.grains.insert(0, Grain::Zero);
    s2.grains.insert(
        3,
        Grain::Data {
            slot: 0,
            data: vec![0xee; 4096],
        },
    );
    s2.grains.insert(4099, Grain::Zero);
    let b2 = sesparse::build(d, "disk-000002", &s2);
    assert_reads_like_qemu(&b2.descriptor);
    let want = model(&s2, Some(&model(&s1, Some(&flat))));
    assert!(read_lib(&b2.descriptor) == want);
    let img = Image::open(&b2.descriptor, &OpenOptions::read_only()).unwrap();
    assert_eq!(img.chain().len(), 3);
}

#[test]
fn sesparse_opened_writable_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let b = sesparse::build(dir.path(), "ro", &sesparse::mixed(None));
    let e = Image::open(&b.descriptor, &OpenOptions::writable()).unwrap_err();
    assert!(
        matches!(
            &e,
            imgblock::Error::Vmdk {
                source: VErr::SeSparseReadOnly,
                ..
            }
        ),
        "{e}"
    );
    // qemu refuses it too.
    let out = output(
        std::process::Command::new("qemu-io")
            .args(["-c", "write 0 4k"])
            .arg(&b.descriptor),
    );
    assert!(!out.status.success());
}

/// Committing a seSparse snapshot fails before anything is written, as in qemu-img (the top
/// of a commit is opened for writing first): the parent keeps every byte.
#[test]
fn commit_of_a_sesparse_snapshot_fails_before_touching_the_parent() {
    let dir = tempfile::tempdir().unwrap();
    let p = parent(dir.path());
    let parent_file = dir.path().join("base.vmdk");
    let before = std::fs::read(&parent_file).unwrap();
    let b = sesparse::build(dir.path(), "snap", &sesparse::mixed(Some(p)));
    for keep in [false, true] {
        let e = imgblock::ops::commit(
            &b.descriptor,
            None,
            &imgblock::crypto::Secrets::none(),
            None,
            keep,
            &imgblock::ops::no_progress,
        )
        .unwrap_err();
        assert!(
            matches!(
                &e,
                imgblock::Error::Vmdk {
                    source: VErr::SeSparseReadOnly,
                    ..
                }
            ),
            "{e}"
        );
        assert!(
            std::fs::read(&parent_file).unwrap() == before,
            "the parent was written (keep={keep})"
        );
    }
}

/// Opens `path` and reads all of it and its block status; the first error.
fn lib_error(path: &Path) -> imgblock::Error {
    let img = match Image::open(path, &OpenOptions::read_only()) {
        Ok(i) => i,
        Err(e) => return e,
    };
    let mut buf = vec![0u8; img.size() as usize];
    if let Err(e) = img.read_at(&mut buf, 0) {
        return e;
    }
    let mut off = 0;
    while off < img.size() {
        match img.block_status(off, img.size() - off) {
            Ok(s) => off += s.len,
            Err(e) => return e,
        }
    }
    panic!("{}: no error", path.display());
}

/// Whether `qemu-img convert` refuses the image.
fn qemu_refuses(path: &Path) -> bool {
    let dir = tempfile::tempdir().unwrap();
    let out = output(
        std::process::Command::new("qemu-img")
            .args(["convert", "-O", "raw"])
            .arg(path)
            .arg(dir.path().join("o.raw")),
    );
    !out.status.success()
}

type Corrupt = fn(&Built);
type Expect = fn(&VErr) -> bool;

#[test]
fn sesparse_corrupt_fields_give_their_error_without_panic() {
    let dir = tempfile::tempdir().unwrap();
    // (what, corruption, expected error, whether qemu refuses it as well)
    let cases: &[(&str, Corrupt, Expect, bool)] = &[
        (
            "const magic",
            |b| sesparse::poke(&b.extent, 0, 0xcafe_bab0),
            |e| {
                matches!(
                    e,
                    VErr::SeSparseConstMagic {
                        offset: 0,
                        found: 0xcafe_bab0
                    }
                )
            },
            true,
        ),
        (
            "version",
            |b| sesparse::poke(&b.extent, 8, 0x1_0000_0001),
            |e| {
                matches!(
                    e,
                    VErr::SeSparseVersion {
                        offset: 8,
                        found: 0x1_0000_0001
                    }
                )
            },
            true,
        ),
        (
            "grain size",
            |b| sesparse::poke(&b.extent, 24, 16),
            |e| {
                matches!(
                    e,
                    VErr::SeSparseGrainSize {
                        offset: 24,
                        found: 16
                    }
                )
            },
            true,
        ),
        (
            "grain table size",
            |b| sesparse::poke(&b.extent, 32, 128),
            |e| matches!(e, VErr::SeSparseGtSize { found: 128, .. }),
            true,
        ),
        (
            "flags",
            |b| sesparse::poke(&b.extent, 40, 1),
            |e| matches!(e, VErr::SeSparseFlags { offset: 40, .. }),
            true,
        ),
        (
            "reserved2",
            |b| sesparse::poke(&b.extent, 56, 1),
            |e| matches!(e, VErr::SeSparseReserved { offset: 56 }),
            true,
        ),
        (
            "const padding",
            |b| sesparse::poke(&b.extent, 504, 1),
            |e| matches!(e, VErr::SeSparseReserved { offset: 504 }),
            true,
        ),
        (
            "volatile magic",
            |b| sesparse::poke(&b.extent, b.volatile, 0),
            |e| {
                matches!(
                    e,
                    VErr::SeSparseVolatileMagic {
                        offset: 512,
                        found: 0
                    }
                )
            },
            true,
        ),
        (
            "replay_journal",
            |b| sesparse::poke(&b.extent, b.volatile + 24, 1),
            |e| matches!(e, VErr::SeSparseDirty { offset: 536 }),
            true,
        ),
        (
            "volatile header past the end",
            |b| sesparse::poke(&b.extent, 80, 1 << 30),
            |e| {
                matches!(
                    e,
                    VErr::OutOfFile {
                        what: "volatile header",
                        ..
                    }
                )
            },
            true,
        ),
        (
            "huge grain_dir_size",
            |b| sesparse::poke(&b.extent, 136, 1 << 40),
            |e| matches!(e, VErr::GdTooLarge(_)),
            true,
        ),
        (
            "grain_dir_size 0",
            |b| sesparse::poke(&b.extent, 136, 0),
            |e| {
                matches!(
                    e,
                    VErr::SeSparseGdTooSmall {
                        entries: 0,
                        needed: 3
                    }
                )
            },
            true,
        ),
        (
            "capacity overflows",
            |b| sesparse::poke(&b.extent, 16, u64::MAX),
            |e| matches!(e, VErr::BadCapacity(_)),
            true,
        ),
        (
            "grains area overflows",
            |b| sesparse::poke(&b.extent, 192, u64::MAX - 1),
            |e| matches!(e, VErr::OutOfFile { what: "grains", .. }),
            false,
        ),
        (
            "GD entry type",
            |b| sesparse::poke(&b.extent, b.gde(0), 0x2000_0000_0000_0000),
            |e| matches!(e, VErr::SeSparseBadGdEntry { index: 0, .. }),
            true,
        ),
        (
            "GD entry past the grain tables area",
            |b| sesparse::poke(&b.extent, b.gde(0), 0x1000_0000_0000_0002),
            |e| {
                matches!(
                    e,
                    VErr::SeSparseBadGdEntry {
                        index: 0,
                        entry: 0x1000_0000_0000_0002
                    }
                )
            },
            false,
        ),
        (
            "grain tables past the end",
            |b| sesparse::poke(&b.extent, 144, 1 << 30),
            |e| matches!(e, VErr::GtOutOfFile { .. }),
            false,
        ),
        (
            "GT entry type",
            |b| sesparse::poke(&b.extent, b.gte(0), 0x4000_0000_0000_0000),
            |e| matches!(e, VErr::SeSparseBadGte { guest: 0, .. }),
            true,
        ),
        (
            "unallocated GT entry with bits set",
            |b| sesparse::poke(&b.extent, b.gte(4), 5),
            |e| {
                matches!(
                    e,
                    VErr::SeSparseBadGte {
                        guest: 0x4000,
                        entry: 5
                    }
                )
            },
            true,
        ),
        (
            "GT entry past the end of the file",
            |b| sesparse::poke(&b.extent, b.gte(1), sesparse::allocated(1 << 30)),
            |e| matches!(e, VErr::GrainOutOfFile { guest: 4096, .. }),
            false,
        ),
        (
            "GT entry whose offset overflows",
            |b| sesparse::poke(&b.extent, b.gte(1), u64::MAX >> 2),
            |e| {
                matches!(
                    e,
                    VErr::GrainOutOfFile {
                        guest: 4096,
                        sector: u64::MAX
                    }
                )
            },
            false,
        ),
    ];
    for (i, (what, corrupt, expect, qemu_too)) in cases.iter().enumerate() {
        let d = dir.path().join(i.to_string());
        std::fs::create_dir(&d).unwrap();
        let b = sesparse::build(&d, "c", &sesparse::mixed(None));
        corrupt(&b);
        let e = lib_error(&b.descriptor);
        match &e {
            imgblock::Error::Vmdk { path, source } => {
                assert!(expect(source), "{what}: {e}");
                assert_eq!(path, &b.extent, "{what}: the error names the extent file");
            }
            other => panic!("{what}: {other}"),
        }
        if *qemu_too {
            assert!(qemu_refuses(&b.descriptor), "{what}: qemu-img reads it");
        }
    }
    // A truncated extent file.
    let b = sesparse::build(dir.path(), "t", &sesparse::mixed(None));
    std::fs::write(&b.extent, [0u8; 100]).unwrap();
    assert!(matches!(
        lib_error(&b.descriptor),
        imgblock::Error::Vmdk {
            source: VErr::Truncated(100),
            ..
        }
    ));
}

/// The fuzz target's exercise writes each input beside a descriptor in a directory of its own:
/// whole, cut short or empty, it reads what it can and removes the directory after each input.
#[test]
fn the_fuzzers_exercise_reads_an_extent_and_leaves_no_files() {
    let dir = tempfile::tempdir().unwrap();
    sesparse::build(dir.path(), "d", &sesparse::mixed(None));
    let extent = std::fs::read(dir.path().join("d-sesparse.vmdk")).unwrap();
    let work = std::env::temp_dir().join(format!("imgblock-fuzz-{}", std::process::id()));
    for input in [&extent[..], &extent[..extent.len() / 3], &[][..]] {
        imgblock::fuzzing::exercise_vmdk_sesparse(input);
        assert!(!work.exists(), "{} left behind", work.display());
    }
}
