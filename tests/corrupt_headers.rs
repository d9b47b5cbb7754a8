//! Truncated, zeroed and garbled qcow2 headers and tables: `img info` and `img convert` end
//! within a deadline, never panic, and, when they fail, say so on stderr naming the file. Where
//! qemu-img refuses an image, `img` must refuse it too (qemu-img is the oracle: a few
//! corruptions, such as a truncated data area, are readable for it, and `img` may then either
//! read or refuse them).

mod common;

use common::{Env, Output};
use std::time::Duration;

/// Time allowed for one command on a broken image: all images here are small, so anything
/// slower is a hang (an endless loop over a garbled table, a huge allocation...).
const DEADLINE: Duration = Duration::from_secs(20);

// Offsets of qcow2 header fields (docs/interop/qcow2.rst).
const MAGIC: usize = 0;
const VERSION: usize = 4;
const BACKING_FILE_OFFSET: usize = 8;
const BACKING_FILE_SIZE: usize = 16;
const CLUSTER_BITS: usize = 20;
const SIZE: usize = 24;
const CRYPT_METHOD: usize = 32;
const L1_SIZE: usize = 36;
const L1_TABLE_OFFSET: usize = 40;
const REFCOUNT_TABLE_OFFSET: usize = 48;
const REFCOUNT_TABLE_CLUSTERS: usize = 56;
const NB_SNAPSHOTS: usize = 60;
const SNAPSHOTS_OFFSET: usize = 64;
const INCOMPATIBLE_FEATURES: usize = 72;
const AUTOCLEAR_FEATURES: usize = 88;
const REFCOUNT_ORDER: usize = 96;
const HEADER_LENGTH: usize = 100;
const COMPRESSION_TYPE: usize = 104;

/// A valid v3 image with data, 64 KiB clusters (layout: header, refcount table, refcount
/// block, L1, L2, data), returned as bytes.
fn good_image(env: &Env) -> Vec<u8> {
    env.qemu_img(&["create", "-f", "qcow2", "good.qcow2", "4M"])
        .ok();
    env.qemu_io(
        "qcow2",
        "good.qcow2",
        &[
            "write -P 0x11 0 100k",
            "write -P 0x22 3M 64k",
            "write -z 1M 64k",
        ],
    );
    env.read("good.qcow2")
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}

fn put64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_be_bytes());
}

/// Does one command on a broken image behave? Returns a description of what went wrong.
fn judge(file: &str, ours: &Output, theirs: Option<&Output>) -> Option<String> {
    if ours.stderr.contains("panicked") || ours.code.is_none() {
        return Some(format!("panicked or killed by a signal:{ours}"));
    }
    if ours.code != Some(0) {
        if ours.stderr.trim().is_empty() {
            return Some(format!("failed without a message on stderr:{ours}"));
        }
        if !ours.stderr.contains(file) {
            return Some(format!("error message does not name {file}:{ours}"));
        }
    }
    if let Some(theirs) = theirs {
        if theirs.code != Some(0) && ours.code == Some(0) {
            return Some(format!(
                "qemu-img refuses this image but img accepts it:{ours}\nqemu-img:{theirs}"
            ));
        }
    }
    None
}

/// Runs `img info` and `img convert`, with the format probed and named, on `bytes` written
/// as `name`; compares with qemu-img. `qemu_must_fail` is a sanity check on the test itself.
fn check_broken(env: &Env, name: &str, bytes: &[u8], qemu_must_fail: bool) -> Vec<String> {
    env.write(name, bytes);
    let out = format!("{name}.out");
    let mut problems = Vec::new();
    let runs: [Vec<&str>; 4] = [
        vec!["info", "-f", "qcow2", name],
        vec!["info", name],
        vec!["convert", "-f", "qcow2", "-O", "raw", name, &out],
        vec!["convert", "-O", "raw", name, &out],
    ];
    for args in &runs {
        let theirs = env.qemu_img_timeout(args, DEADLINE);
        if qemu_must_fail && args.contains(&"-f") && theirs.code == Some(0) {
            problems.push(format!("test bug? qemu-img accepts {name}:{theirs}"));
        }
        let ours = env.img_timeout(args, DEADLINE);
        if let Some(p) = judge(name, &ours, Some(&theirs)) {
            problems.push(format!("{name}: {p}"));
        }
    }
    // The format-probing runs may legitimately succeed (as raw); the file must be left alone.
    assert_eq!(
        env.read(name),
        bytes,
        "{name} was modified by a read-only command"
    );
    problems
}

fn report(problems: Vec<String>) {
    assert!(
        problems.is_empty(),
        "{} problem(s):\n\n{}",
        problems.len(),
        problems.join("\n\n")
    );
}

#[test]
fn truncated_image_info_convert_fail_cleanly() {
    let env = Env::with_qemu();
    let good = good_image(&env);
    let rt = usize::try_from(be64(&good, REFCOUNT_TABLE_OFFSET)).expect("offset");
    let l1 = usize::try_from(be64(&good, L1_TABLE_OFFSET)).expect("offset");
    let mut problems = Vec::new();
    for len in [
        0,
        1,
        3,
        4,
        7,
        8,
        20,
        47,
        48,
        71,
        72,
        99,
        100,
        103,
        104,
        111,
        112,
        200,
        511,
        4096,
        rt,
        rt + 4,
        rt + 8,
        l1,
        l1 + 4,
        l1 + 8,
        good.len() - 65536,
        good.len() - 1,
    ] {
        let name = format!("trunc{len}.qcow2");
        // Until the header's fixed 72 bytes (v2 part) are there, qemu-img -f qcow2 must fail.
        problems.extend(check_broken(&env, &name, &good[..len], len < 72));
    }
    report(problems);
}

#[test]
fn zeroed_header_info_convert_fail_cleanly() {
    let env = Env::with_qemu();
    let good = good_image(&env);
    let mut problems = Vec::new();
    for (what, len) in [("header", 112), ("first_cluster", 65536), ("magic", 4)] {
        let mut b = good.clone();
        b[..len].fill(0);
        problems.extend(check_broken(&env, &format!("zero_{what}.qcow2"), &b, true));
    }
    // Zeroed refcount table and L1 table: qemu-img reads these (as unallocated / leaking)
    // but img must still not panic or hang.
    for (what, at) in [("reftable", REFCOUNT_TABLE_OFFSET), ("l1", L1_TABLE_OFFSET)] {
        let mut b = good.clone();
        let off = usize::try_from(be64(&good, at)).expect("offset");
        b[off..off + 65536].fill(0);
        problems.extend(check_broken(&env, &format!("zero_{what}.qcow2"), &b, false));
    }
    report(problems);
}

/// One header field set to a bad value. `must_fail`: qemu-img refuses it at open.
struct Garble {
    name: &'static str,
    apply: fn(&mut Vec<u8>),
    must_fail: bool,
}

#[test]
fn garbled_header_field_info_convert_fail_cleanly() {
    let cases: &[Garble] = &[
        Garble {
            name: "magic_flipped",
            apply: |b| b[MAGIC] ^= 0xff,
            must_fail: true,
        },
        Garble {
            name: "version_0",
            apply: |b| put32(b, VERSION, 0),
            must_fail: true,
        },
        Garble {
            name: "version_1",
            apply: |b| put32(b, VERSION, 1),
            must_fail: true,
        },
        Garble {
            name: "version_4",
            apply: |b| put32(b, VERSION, 4),
            must_fail: true,
        },
        Garble {
            name: "version_max",
            apply: |b| put32(b, VERSION, u32::MAX),
            must_fail: true,
        },
        Garble {
            name: "backing_offset_past_end",
            apply: |b| {
                put64(b, BACKING_FILE_OFFSET, 1 << 40);
                put32(b, BACKING_FILE_SIZE, 16);
            },
            must_fail: false,
        },
        Garble {
            name: "backing_size_huge",
            apply: |b| {
                put64(b, BACKING_FILE_OFFSET, 512);
                put32(b, BACKING_FILE_SIZE, u32::MAX);
            },
            must_fail: true,
        },
        Garble {
            name: "cluster_bits_0",
            apply: |b| put32(b, CLUSTER_BITS, 0),
            must_fail: true,
        },
        Garble {
            name: "cluster_bits_8",
            apply: |b| put32(b, CLUSTER_BITS, 8),
            must_fail: true,
        },
        Garble {
            name: "cluster_bits_22",
            apply: |b| put32(b, CLUSTER_BITS, 22),
            must_fail: true,
        },
        Garble {
            name: "cluster_bits_63",
            apply: |b| put32(b, CLUSTER_BITS, 63),
            must_fail: true,
        },
        Garble {
            name: "cluster_bits_max",
            apply: |b| put32(b, CLUSTER_BITS, u32::MAX),
            must_fail: true,
        },
        Garble {
            name: "size_max",
            apply: |b| put64(b, SIZE, u64::MAX),
            must_fail: true,
        },
        Garble {
            name: "size_2p62",
            apply: |b| put64(b, SIZE, 1 << 62),
            must_fail: true,
        },
        // Bigger than the L1 table can map: qemu says "L1 table is too small".
        Garble {
            name: "size_1t",
            apply: |b| put64(b, SIZE, 1 << 40),
            must_fail: true,
        },
        Garble {
            name: "crypt_method_5",
            apply: |b| put32(b, CRYPT_METHOD, 5),
            must_fail: true,
        },
        Garble {
            name: "l1_size_0",
            apply: |b| put32(b, L1_SIZE, 0),
            must_fail: true,
        },
        Garble {
            name: "l1_size_max",
            apply: |b| put32(b, L1_SIZE, u32::MAX),
            must_fail: true,
        },
        Garble {
            name: "l1_size_2p28",
            apply: |b| put32(b, L1_SIZE, 1 << 28),
            must_fail: true,
        },
        Garble {
            name: "l1_offset_misaligned",
            apply: |b| {
                let v = be64(b, L1_TABLE_OFFSET);
                put64(b, L1_TABLE_OFFSET, v + 8);
            },
            must_fail: true,
        },
        Garble {
            name: "l1_offset_0",
            apply: |b| put64(b, L1_TABLE_OFFSET, 0),
            must_fail: false,
        },
        Garble {
            name: "l1_offset_past_end",
            apply: |b| put64(b, L1_TABLE_OFFSET, 1 << 50),
            must_fail: false,
        },
        Garble {
            name: "l1_offset_max",
            apply: |b| put64(b, L1_TABLE_OFFSET, !0xffff),
            must_fail: true,
        },
        Garble {
            name: "reftable_offset_misaligned",
            apply: |b| {
                let v = be64(b, REFCOUNT_TABLE_OFFSET);
                put64(b, REFCOUNT_TABLE_OFFSET, v + 8);
            },
            must_fail: true,
        },
        Garble {
            name: "reftable_offset_0",
            apply: |b| put64(b, REFCOUNT_TABLE_OFFSET, 0),
            must_fail: false,
        },
        Garble {
            name: "reftable_offset_max",
            apply: |b| put64(b, REFCOUNT_TABLE_OFFSET, !0xffff),
            must_fail: true,
        },
        Garble {
            name: "reftable_clusters_0",
            apply: |b| put32(b, REFCOUNT_TABLE_CLUSTERS, 0),
            must_fail: false,
        },
        Garble {
            name: "reftable_clusters_max",
            apply: |b| put32(b, REFCOUNT_TABLE_CLUSTERS, u32::MAX),
            must_fail: true,
        },
        Garble {
            name: "nb_snapshots_max",
            apply: |b| {
                put32(b, NB_SNAPSHOTS, u32::MAX);
                put64(b, SNAPSHOTS_OFFSET, 65536);
            },
            must_fail: true,
        },
        Garble {
            name: "snapshots_offset_misaligned",
            apply: |b| {
                put32(b, NB_SNAPSHOTS, 1);
                put64(b, SNAPSHOTS_OFFSET, 65537);
            },
            must_fail: true,
        },
        Garble {
            name: "snapshots_offset_past_end",
            apply: |b| {
                put32(b, NB_SNAPSHOTS, 1);
                put64(b, SNAPSHOTS_OFFSET, 1 << 40);
            },
            must_fail: false,
        },
        Garble {
            name: "snapshot_table_garbage",
            apply: |b| {
                // Point the snapshot table at the L2/data area, which holds 0x11 bytes.
                put32(b, NB_SNAPSHOTS, 3);
                let at = b.len() as u64 - 65536;
                put64(b, SNAPSHOTS_OFFSET, at);
            },
            must_fail: false,
        },
        Garble {
            name: "incompatible_unknown_bit",
            apply: |b| put64(b, INCOMPATIBLE_FEATURES, 1 << 40),
            must_fail: true,
        },
        Garble {
            name: "incompatible_all_bits",
            apply: |b| put64(b, INCOMPATIBLE_FEATURES, u64::MAX),
            must_fail: true,
        },
        Garble {
            name: "incompatible_external_data_without_name",
            apply: |b| put64(b, INCOMPATIBLE_FEATURES, 1 << 2),
            must_fail: false,
        },
        Garble {
            name: "compression_bit_bad_type",
            apply: |b| {
                put64(b, INCOMPATIBLE_FEATURES, 1 << 3);
                b[COMPRESSION_TYPE] = 7;
            },
            must_fail: true,
        },
        Garble {
            name: "compression_type_without_bit",
            apply: |b| b[COMPRESSION_TYPE] = 1,
            must_fail: true,
        },
        // Unknown autoclear bits are allowed (and cleared on write).
        Garble {
            name: "autoclear_unknown_bits",
            apply: |b| put64(b, AUTOCLEAR_FEATURES, !0b11),
            must_fail: false,
        },
        // Bit 1 (raw external data) is known: without an external data file qemu-img info
        // still works, but convert refuses ("data-file-raw requires a data file").
        Garble {
            name: "autoclear_data_file_raw_without_data_file",
            apply: |b| put64(b, AUTOCLEAR_FEATURES, 1 << 1),
            must_fail: false,
        },
        Garble {
            name: "refcount_order_7",
            apply: |b| put32(b, REFCOUNT_ORDER, 7),
            must_fail: true,
        },
        Garble {
            name: "refcount_order_max",
            apply: |b| put32(b, REFCOUNT_ORDER, u32::MAX),
            must_fail: true,
        },
        Garble {
            name: "header_length_0",
            apply: |b| put32(b, HEADER_LENGTH, 0),
            must_fail: true,
        },
        Garble {
            name: "header_length_50",
            apply: |b| put32(b, HEADER_LENGTH, 50),
            must_fail: true,
        },
        Garble {
            name: "header_length_max",
            apply: |b| put32(b, HEADER_LENGTH, u32::MAX),
            must_fail: true,
        },
        Garble {
            name: "header_extensions_garbage",
            apply: |b| b[112..512].fill(0xff),
            must_fail: true,
        },
        Garble {
            name: "header_extension_length_huge",
            apply: |b| {
                // An unknown extension type whose length runs past the cluster.
                put32(b, 112, 0x1234_5678);
                put32(b, 116, 0x7fff_fff0);
            },
            must_fail: true,
        },
        Garble {
            name: "l1_entries_garbage",
            apply: |b| {
                let l1 = usize::try_from(be64(b, L1_TABLE_OFFSET)).expect("offset");
                b[l1..l1 + 64].fill(0xa5);
            },
            must_fail: false,
        },
        Garble {
            name: "l1_entry_past_end",
            apply: |b| {
                let l1 = usize::try_from(be64(b, L1_TABLE_OFFSET)).expect("offset");
                put64(b, l1, (1 << 63) | (1 << 45));
            },
            must_fail: false,
        },
        Garble {
            name: "l2_entries_garbage",
            apply: |b| {
                let l1 = usize::try_from(be64(b, L1_TABLE_OFFSET)).expect("offset");
                let l2 = usize::try_from(be64(b, l1) & 0x00ff_ffff_ffff_fe00).expect("offset");
                b[l2..l2 + 256].fill(0x5a);
            },
            must_fail: false,
        },
        Garble {
            name: "l2_entry_compressed_garbage",
            apply: |b| {
                let l1 = usize::try_from(be64(b, L1_TABLE_OFFSET)).expect("offset");
                let l2 = usize::try_from(be64(b, l1) & 0x00ff_ffff_ffff_fe00).expect("offset");
                // Compressed flag, an absurd length, an offset past the end.
                put64(b, l2, (1 << 62) | 0x3fff_ffff_ffff_ffff);
            },
            must_fail: false,
        },
        Garble {
            name: "refcount_table_garbage",
            apply: |b| {
                let rt = usize::try_from(be64(b, REFCOUNT_TABLE_OFFSET)).expect("offset");
                b[rt..rt + 64].fill(0xa5);
            },
            must_fail: false,
        },
    ];
    let env = Env::with_qemu();
    let good = good_image(&env);
    // Sanity: the unmodified image works with both tools.
    assert_eq!(be32(&good, VERSION), 3);
    assert_eq!(
        be32(&good, HEADER_LENGTH),
        112,
        "qemu 10 writes a 112-byte v3 header"
    );
    let mut problems = Vec::new();
    for g in cases {
        let mut b = good.clone();
        (g.apply)(&mut b);
        problems.extend(check_broken(
            &env,
            &format!("{}.qcow2", g.name),
            &b,
            g.must_fail,
        ));
    }
    report(problems);
}

/// The same for a v2 image (72-byte header, no feature fields): garbling version, cluster
/// bits and the L1 table still fails cleanly.
#[test]
fn garbled_v2_header_info_convert_fail_cleanly() {
    let env = Env::with_qemu();
    env.qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-o",
        "compat=0.10",
        "v2.qcow2",
        "4M",
    ])
    .ok();
    env.qemu_io("qcow2", "v2.qcow2", &["write -P 0x11 0 100k"]);
    let good = env.read("v2.qcow2");
    assert_eq!(be32(&good, VERSION), 2);
    let mut problems = Vec::new();
    let mut b = good.clone();
    put32(&mut b, CLUSTER_BITS, 40);
    problems.extend(check_broken(&env, "v2_cluster_bits.qcow2", &b, true));
    let mut b = good.clone();
    put32(&mut b, L1_SIZE, u32::MAX);
    problems.extend(check_broken(&env, "v2_l1_size.qcow2", &b, true));
    // qemu reads a header cut short as if zero-padded: this one it accepts.
    problems.extend(check_broken(&env, "v2_trunc60.qcow2", &good[..60], false));
    problems.extend(check_broken(&env, "v2_trunc30.qcow2", &good[..30], true));
    report(problems);
}
