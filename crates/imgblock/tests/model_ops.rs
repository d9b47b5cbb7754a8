//! Random sequences of writes, zero writes, discards, flushes, reopens, internal snapshots and
//! growth against every writable format and variant the library creates, each checked against
//! an in-memory model through the library, `qemu-img check` and `qemu-img compare`
//! (`fmt_common::model`). A streamOptimized vmdk is written once and in guest order, so it
//! gets sequences that move forward only.

#![allow(clippy::cast_possible_truncation)] // test sizes are small constants

mod fmt_common;

use fmt_common::model::{self, data, ops, run, Caps, Discard, Subject};
use imgblock::{Format, OpenOptions};
use proptest::prelude::*;

/// Cases per variant: enough to reach every op kind, few enough for 2 cores.
const CASES: u32 = 10;

/// A small disk that ends inside a cluster, a grain and a vdi block.
const SIZE: u64 = (3 << 20) + 3584;

/// A disk just past 2 GiB, tested in a 3 MiB window that straddles the first extent boundary of
/// the twoGbMaxExtent subformats and reaches the end of the disk.
const BIG: u64 = (2 << 30) + (3 << 19);
const BIG_WINDOW: u64 = (2 << 30) - (3 << 19);

const RAW: Caps = Caps {
    discard: Discard::OldOrZero,
    reopen: true,
    snapshots: false,
    // qemu sizes a raw file in whole sectors when it opens it.
    grow: Some(512),
    grow_with_snapshots: true,
    refcount_max: u64::MAX,
    check: false,
};

const QCOW2: Caps = Caps {
    discard: Discard::Zeroes,
    reopen: true,
    snapshots: true,
    // qemu resizes qcow2 in whole sectors.
    grow: Some(512),
    grow_with_snapshots: true,
    refcount_max: u64::MAX,
    check: true,
};

/// qemu refuses internal snapshots of an image with an external data file.
const QCOW2_DATA_FILE: Caps = Caps {
    snapshots: false,
    ..QCOW2
};

/// A 1-bit refcount cannot count a cluster that a snapshot shares: such an image takes
/// snapshots only while it holds no clusters (as in qemu).
const QCOW2_REFCOUNT_1: Caps = Caps {
    refcount_max: 1,
    ..QCOW2
};

/// vmdk and vdi: no discard (the data stays, as in qemu), no resize.
const VMDK_VDI: Caps = Caps {
    discard: Discard::Keeps,
    reopen: true,
    snapshots: false,
    grow: None,
    grow_with_snapshots: false,
    refcount_max: u64::MAX,
    check: true,
};

/// The luks format: discard keeps the data (host zeroes would decrypt to noise); the library
/// does not resize it; qemu-img has no check for it.
const LUKS: Caps = Caps {
    check: false,
    ..VMDK_VDI
};

const QCOW2_LUKS: &str = "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10";

fn small(format: Format, opts: &str, caps: Caps, ops: &[model::Op]) {
    run(&Subject::create(format, opts, SIZE, caps, None), ops);
}

fn big(opts: &str, ops: &[model::Op]) {
    let mut s = Subject::create(Format::Vmdk, opts, BIG, VMDK_VDI, None);
    s.window = BIG_WINDOW;
    run(&s, ops);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: CASES, ..ProptestConfig::default() })]

    #[test]
    fn raw_matches_model(ops in ops(RAW, SIZE)) {
        small(Format::Raw, "", RAW, &ops);
    }

    #[test]
    fn vmdk_monolithic_sparse_matches_model(ops in ops(VMDK_VDI, SIZE)) {
        small(Format::Vmdk, "", VMDK_VDI, &ops);
    }

    #[test]
    fn vmdk_monolithic_flat_matches_model(ops in ops(VMDK_VDI, SIZE)) {
        small(Format::Vmdk, "subformat=monolithicFlat", VMDK_VDI, &ops);
    }

    #[test]
    fn vmdk_zeroed_grain_matches_model(ops in ops(VMDK_VDI, SIZE)) {
        small(Format::Vmdk, "zeroed_grain=on", VMDK_VDI, &ops);
    }

    #[test]
    fn vmdk_two_gb_sparse_across_extents_matches_model(ops in ops(VMDK_VDI, BIG - BIG_WINDOW)) {
        big("subformat=twoGbMaxExtentSparse", &ops);
    }

    #[test]
    fn vmdk_two_gb_flat_across_extents_matches_model(ops in ops(VMDK_VDI, BIG - BIG_WINDOW)) {
        big("subformat=twoGbMaxExtentFlat", &ops);
    }

    #[test]
    fn vdi_dynamic_matches_model(ops in ops(VMDK_VDI, SIZE)) {
        small(Format::Vdi, "", VMDK_VDI, &ops);
    }

    #[test]
    fn vdi_static_matches_model(ops in ops(VMDK_VDI, SIZE)) {
        small(Format::Vdi, "static=on", VMDK_VDI, &ops);
    }

    #[test]
    fn luks_matches_model(ops in ops(LUKS, SIZE)) {
        small(Format::Luks, "key-secret=s0,iter-time=10", LUKS, &ops);
    }

    #[test]
    fn qcow2_luks_matches_model(ops in ops(QCOW2, SIZE)) {
        small(Format::Qcow2, QCOW2_LUKS, QCOW2, &ops);
    }

    #[test]
    fn qcow2_legacy_aes_matches_model(ops in ops(QCOW2, SIZE)) {
        small(Format::Qcow2, "encrypt.format=aes,encrypt.key-secret=s0", QCOW2, &ops);
    }

    #[test]
    fn qcow2_data_file_matches_model(ops in ops(QCOW2_DATA_FILE, SIZE)) {
        small(Format::Qcow2, "data_file=t.data", QCOW2_DATA_FILE, &ops);
    }

    #[test]
    fn qcow2_data_file_raw_matches_model(ops in ops(QCOW2_DATA_FILE, SIZE)) {
        small(Format::Qcow2, "data_file=t.data,data_file_raw=on", QCOW2_DATA_FILE, &ops);
    }

    #[test]
    fn qcow2_lazy_refcounts_matches_model(ops in ops(QCOW2, SIZE)) {
        small(Format::Qcow2, "lazy_refcounts=on", QCOW2, &ops);
    }

    #[test]
    fn qcow2_refcount_bits_1_matches_model(ops in ops(QCOW2_REFCOUNT_1, SIZE)) {
        small(Format::Qcow2, "refcount_bits=1", QCOW2_REFCOUNT_1, &ops);
    }

    #[test]
    fn qcow2_refcount_bits_64_matches_model(ops in ops(QCOW2, SIZE)) {
        small(Format::Qcow2, "refcount_bits=64", QCOW2, &ops);
    }

    #[test]
    fn qcow2_cluster_512_matches_model(ops in ops(QCOW2, SIZE)) {
        small(Format::Qcow2, "cluster_size=512", QCOW2, &ops);
    }

    #[test]
    fn qcow2_cluster_2m_matches_model(ops in ops(QCOW2, SIZE)) {
        small(Format::Qcow2, "cluster_size=2M", QCOW2, &ops);
    }

    #[test]
    fn qcow2_preallocation_metadata_matches_model(ops in ops(QCOW2, SIZE)) {
        small(Format::Qcow2, "preallocation=metadata", QCOW2, &ops);
    }

    #[test]
    fn qcow2_preallocation_full_matches_model(ops in ops(QCOW2, SIZE)) {
        small(Format::Qcow2, "preallocation=full", QCOW2, &ops);
    }

    #[test]
    fn qcow2_extended_l2_matches_model(ops in ops(QCOW2, SIZE)) {
        small(Format::Qcow2, "extended_l2=on", QCOW2, &ops);
    }

    #[test]
    fn vmdk_stream_optimized_in_order_matches_model(ops in stream_ops()) {
        stream_run(&ops);
    }
}

/// The grain of a streamOptimized vmdk.
const GRAIN: u64 = 64 << 10;

/// One step of a forward-only sequence: skip `gap` bytes from where the last one ended, then
/// write `len` bytes there (or zeroes), or flush.
#[derive(Debug, Clone, PartialEq, Eq)]
enum StreamOp {
    Write(u64, u64, u8),
    Zero(u64, u64),
    /// Ends the stream as it stands (grain tables, directory, footer); the next op starts at a
    /// grain boundary, as a grain once written cannot be written again.
    Flush,
}

fn gap() -> impl Strategy<Value = u64> {
    prop_oneof![
        3 => Just(0u64),
        1 => 1..4096u64,
        1 => 1..(200u64 << 10),
        1 => (1..8u64).prop_map(|g| g * GRAIN),
    ]
}

fn stream_ops() -> impl Strategy<Value = Vec<StreamOp>> {
    let len = prop_oneof![
        1..4096u64,
        1..(300u64 << 10),
        (1..8u64).prop_map(|g| g * GRAIN)
    ];
    let op = prop_oneof![
        6 => (gap(), len.clone(), any::<u8>()).prop_map(|(g, l, s)| StreamOp::Write(g, l, s)),
        2 => (gap(), len).prop_map(|(g, l)| StreamOp::Zero(g, l)),
        1 => Just(StreamOp::Flush),
    ];
    proptest::collection::vec(op, 1..25)
}

/// Writes a streamOptimized vmdk forward only, as the format allows, then checks it like the
/// other variants; opened again, it reads the same and refuses writes without changing.
fn stream_run(ops: &[StreamOp]) {
    let caps = Caps {
        reopen: false,
        ..VMDK_VDI
    };
    let s = Subject::create(Format::Vmdk, "subformat=streamOptimized", SIZE, caps, None);
    let img = s.open().unwrap();
    let mut model = vec![0u8; SIZE as usize];
    let mut pos = 0u64;
    let mut done = Vec::new();
    for op in ops {
        let (g, l, seed) = match *op {
            StreamOp::Write(g, l, seed) => (g, l, Some(seed)),
            StreamOp::Zero(g, l) => (g, l, None),
            StreamOp::Flush => {
                pos = pos.div_ceil(GRAIN) * GRAIN;
                done.push(StreamOp::Flush);
                let r = img.flush();
                r.unwrap_or_else(|e| panic!("flush failed: {e}; after {done:?}"));
                continue;
            }
        };
        if pos + g >= SIZE {
            break;
        }
        pos += g;
        let l = l.min(SIZE - pos);
        let (p, e) = (pos as usize, (pos + l) as usize);
        let r = match seed {
            Some(seed) => {
                done.push(StreamOp::Write(g, l, seed));
                for (b, q) in model[p..e].iter_mut().zip(pos..) {
                    *b = data(q, seed);
                }
                img.write_at(&model[p..e], pos)
            }
            None => {
                done.push(StreamOp::Zero(g, l));
                model[p..e].fill(0);
                img.write_zeroes(pos, l, false)
            }
        };
        r.unwrap_or_else(|e| panic!("{:?} failed: {e}; after {done:?}", done.last()));
        pos += l;
    }
    let ctx = format!("streamOptimized after {done:?}");
    img.flush().unwrap();
    model::assert_reads_as(&img, 0, &model, &ctx);
    drop(img);
    let img = s.open_with(&OpenOptions::read_only()).unwrap();
    model::assert_reads_as(&img, 0, &model, &ctx);
    drop(img);
    if done
        .iter()
        .any(|o| matches!(o, StreamOp::Write(_, _, s) if *s != 0))
    {
        // A stream with grains is finished: writing it again is refused, and changes nothing.
        let before = std::fs::read(&s.path).unwrap();
        let img = s.open().unwrap();
        assert!(img.write_at(&[1], 0).is_err(), "{ctx}");
        drop(img);
        assert!(std::fs::read(&s.path).unwrap() == before, "{ctx}");
    }
    model::verify_with_qemu(&s, &model, &ctx);
}
