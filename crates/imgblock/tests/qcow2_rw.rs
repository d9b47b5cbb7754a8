//! Write-then-read properties of the qcow2 driver through every write path, checked against an
//! in-memory model (`fmt_common::model`) through the library, `qemu-img check` and
//! `qemu-img compare`.

#![allow(clippy::cast_possible_truncation)] // test sizes are small constants
mod fmt_common;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use fmt_common::model::{self, Caps, Discard, Op, Subject};
use imgblock::{create, CreateOptions, Format, Image, OpenOptions};
use proptest::prelude::*;

const SIZE: u64 = 3 << 20;

fn qemu_check(path: &Path) {
    let o = fmt_common::output(Command::new("qemu-img").arg("check").arg(path));
    assert!(
        o.status.success(),
        "qemu-img check {} failed:\n{}{}",
        path.display(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

fn new_image(dir: &Path, opts: &str) -> Image {
    let p = dir.join("t.qcow2");
    let mut o = CreateOptions::new(SIZE);
    o.parse_opts(opts).unwrap();
    create(&p, Format::Qcow2, &o).unwrap();
    Image::open(&p, &OpenOptions::writable()).unwrap()
}

/// The backing image's content: no zero bytes, so that it shows wherever it reads through.
fn backing_content() -> Vec<u8> {
    (0..SIZE).map(|i| (i % 253) as u8 | 1).collect()
}

/// Runs `ops` on a new image with options `opts`, over a raw backing file when `with_backing`,
/// and checks it against the model through the library, `qemu-img check` and
/// `qemu-img compare`.
fn run(opts: &str, with_backing: bool, ops: &[Op]) {
    let backing = with_backing.then(backing_content);
    let s = Subject::create(Format::Qcow2, opts, SIZE, caps(opts), backing.as_deref());
    model::run(&s, ops);
}

/// Discard drops whole clusters (or subclusters): v3 makes them read as zeroes, v2 leaves
/// them unallocated, so that the backing file shows through again. qemu resizes a v2 image
/// only without snapshots.
fn caps(opts: &str) -> Caps {
    let v2 = opts.contains("compat=0.10");
    Caps {
        discard: if v2 {
            Discard::Backing
        } else {
            Discard::Zeroes
        },
        reopen: true,
        snapshots: true,
        grow: Some(512),
        grow_with_snapshots: !v2,
        refcount_max: if opts.contains("refcount_bits=2") {
            3
        } else {
            u64::MAX
        },
        check: true,
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, .. ProptestConfig::default() })]

    #[test]
    fn v3_default_matches_model(ops in model::ops(caps(""), SIZE)) {
        run("", false, &ops);
    }

    #[test]
    fn v2_small_clusters_match_model(ops in model::ops(caps("compat=0.10"), SIZE)) {
        run("compat=0.10,cluster_size=4k", false, &ops);
    }

    #[test]
    fn extended_l2_over_backing_matches_model(ops in model::ops(caps(""), SIZE)) {
        run("extended_l2=on,cluster_size=32k", true, &ops);
    }

    #[test]
    fn backing_chain_cow_matches_model(ops in model::ops(caps("refcount_bits=2"), SIZE)) {
        run("cluster_size=8k,refcount_bits=2", true, &ops);
    }

    #[test]
    fn v2_over_backing_matches_model(ops in model::ops(caps("compat=0.10"), SIZE)) {
        run("compat=0.10,cluster_size=16k", true, &ops);
    }
}

#[test]
fn parallel_writers_all_land() {
    let dir = tempfile::tempdir().unwrap();
    let img = Arc::new(new_image(dir.path(), "cluster_size=4k"));
    let threads: Vec<_> = (0..4u8)
        .map(|t| {
            let img = img.clone();
            std::thread::spawn(move || {
                // Interleaved 3 KiB writes: neighbours share clusters, so allocation races.
                for i in 0..200u64 {
                    let off = (i * 4 + u64::from(t)) * 3072;
                    img.write_at(&[t + 1; 3072], off).unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    img.flush().unwrap();
    for i in 0..800u64 {
        let mut b = [0u8; 3072];
        img.read_at(&mut b, i * 3072).unwrap();
        let want = (i % 4) as u8 + 1;
        assert!(b.iter().all(|&x| x == want), "block {i}");
    }
    drop(img);
    qemu_check(&dir.path().join("t.qcow2"));
}

#[test]
fn many_clusters_grow_the_refcount_table() {
    // 512-byte clusters with 64-bit refcounts: 64 refcounts per block, so 8 MiB of data needs
    // hundreds of blocks and several refcount-table growths.
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("g.qcow2");
    let mut o = CreateOptions::new(8 << 20);
    o.parse_opts("cluster_size=512,refcount_bits=64").unwrap();
    create(&p, Format::Qcow2, &o).unwrap();
    let img = Image::open(&p, &OpenOptions::writable()).unwrap();
    let data: Vec<u8> = (0..(8u32 << 20)).map(|i| (i % 251) as u8).collect();
    img.write_at(&data, 0).unwrap();
    img.flush().unwrap();
    drop(img);
    let img = Image::open(&p, &OpenOptions::read_only()).unwrap();
    let mut got = vec![0u8; data.len()];
    img.read_at(&mut got, 0).unwrap();
    assert!(got == data);
    qemu_check(&p);
}

#[test]
fn read_past_end_is_out_of_bounds() {
    let dir = tempfile::tempdir().unwrap();
    let img = new_image(dir.path(), "");
    let mut b = [0u8; 16];
    assert!(matches!(
        img.read_at(&mut b, SIZE - 8),
        Err(imgblock::Error::OutOfBounds { .. })
    ));
}

#[test]
fn read_only_image_refuses_writes_and_never_writes() {
    let dir = tempfile::tempdir().unwrap();
    drop(new_image(dir.path(), ""));
    let p = dir.path().join("t.qcow2");
    let before = std::fs::read(&p).unwrap();
    let img = Image::open(&p, &OpenOptions::read_only()).unwrap();
    assert!(matches!(
        img.write_at(&[1], 0),
        Err(imgblock::Error::ReadOnly { .. })
    ));
    drop(img);
    assert_eq!(std::fs::read(&p).unwrap(), before);
}

fn compressed_round_trip(opts: &str) {
    let dir = tempfile::tempdir().unwrap();
    let img = new_image(dir.path(), opts);
    let cs = img.driver().cluster_size().unwrap() as usize;
    let mut model = vec![0u8; SIZE as usize];
    let mut seed = 7u32;
    for (i, chunk) in model.chunks_mut(cs).enumerate() {
        // Mixed compressibility: text-like clusters, noise clusters, and zero clusters.
        for (j, b) in chunk.iter_mut().enumerate() {
            seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12345);
            *b = match i % 3 {
                0 => b"the quick brown fox "[j % 20],
                1 => (seed >> 16) as u8,
                _ => 0,
            };
        }
    }
    // Compressed clusters go in batches (runs of them), the others one by one.
    let packed: Vec<Option<Vec<u8>>> = model.chunks(cs).map(|c| img.compress_cluster(c)).collect();
    let mut batch: Vec<(u64, &[u8])> = Vec::new();
    for (i, (chunk, c)) in model.chunks(cs).zip(&packed).enumerate() {
        match c {
            Some(c) => batch.push(((i * cs) as u64, c)),
            None => {
                img.write_compressed_clusters(&batch).unwrap();
                batch.clear();
                img.write_cluster((i * cs) as u64, chunk, None).unwrap();
            }
        }
    }
    img.write_compressed_clusters(&batch).unwrap();
    // A second batch over every cluster of a stretch replaces compressed, plain and zero
    // clusters alike; what they held is freed.
    let start = model.len() / cs / 3;
    let mut redo = Vec::new();
    for i in start..(start + 40).min(model.len() / cs) {
        let chunk = &mut model[i * cs..(i + 1) * cs];
        for (j, b) in chunk.iter_mut().enumerate() {
            *b = b"jumps over the lazy dog "[(j + i) % 24];
        }
        let c = img.compress_cluster(chunk).expect("text compresses");
        redo.push(((i * cs) as u64, c));
    }
    let redo: Vec<(u64, &[u8])> = redo.iter().map(|(o, c)| (*o, c.as_slice())).collect();
    img.write_compressed_clusters(&redo).unwrap();
    // Overwrite parts of compressed clusters: they become plain clusters.
    img.write_at(&[0xee; 3000], cs as u64 / 2).unwrap();
    model[cs / 2..cs / 2 + 3000].fill(0xee);
    img.flush().unwrap();
    let mut got = vec![0u8; SIZE as usize];
    img.read_at(&mut got, 0).unwrap();
    assert!(got == model, "compressed content differs for {opts}");
    drop(img);
    let p = dir.path().join("t.qcow2");
    qemu_check(&p);
    let raw = dir.path().join("m.raw");
    std::fs::write(&raw, &model).unwrap();
    let o = fmt_common::output(
        Command::new("qemu-img")
            .args(["compare", "-f", "qcow2", "-F", "raw"])
            .arg(&p)
            .arg(&raw),
    );
    assert!(
        o.status.success(),
        "qemu-img compare: {}",
        String::from_utf8_lossy(&o.stdout)
    );
}

#[test]
fn compressed_zlib_clusters_read_back_in_qemu() {
    compressed_round_trip("");
    compressed_round_trip("cluster_size=4k");
    compressed_round_trip("cluster_size=512,refcount_bits=1");
}

#[test]
fn compressed_zstd_clusters_read_back_in_qemu() {
    compressed_round_trip("compression_type=zstd");
    compressed_round_trip("compression_type=zstd,cluster_size=2M");
    compressed_round_trip("compression_type=zstd,extended_l2=on");
}

/// A zero write covering part of a cluster: the cluster becomes a zero cluster when the rest of
/// it already reads as zeroes (as in qemu), and gets the zeroes as data when the rest holds data
/// (here, of the backing file); either way it reads right and checks clean.
#[test]
fn partial_cluster_zero_write_makes_a_zero_cluster_only_where_the_rest_reads_zeroes() {
    let dir = tempfile::tempdir().unwrap();
    // The backing file holds data in its first MiB only, and holes after it (block status
    // says those read as zeroes; written zero bytes would count as data, as in qemu).
    let b = dir.path().join("base.raw");
    let mut content = vec![0u8; SIZE as usize];
    content[..1 << 20].fill(0x5a);
    std::fs::write(&b, &content[..1 << 20]).unwrap();
    std::fs::File::options()
        .write(true)
        .open(&b)
        .unwrap()
        .set_len(SIZE)
        .unwrap();
    let p = dir.path().join("t.qcow2");
    let mut o = CreateOptions::new(SIZE);
    o.backing_file = Some("base.raw".into());
    o.backing_fmt = Some("raw".into());
    create(&p, Format::Qcow2, &o).unwrap();
    let img = Image::open(&p, &OpenOptions::writable()).unwrap();
    let len0 = std::fs::metadata(&p).unwrap().len();
    // Over backing zeroes, unaligned at both ends and inside one cluster.
    img.write_zeroes((2 << 20) + 1000, 100_000, false).unwrap();
    img.write_zeroes((2 << 20) + 300_000, 512, false).unwrap();
    // Over backing data: the head and tail clusters must keep the 0x5a around the zeroes.
    img.write_zeroes(70_000, 100_000, false).unwrap();
    content[70_000..170_000].fill(0);
    img.flush().unwrap();
    let zero_at = |off: u64| {
        let st = img.block_status(off, 1).unwrap();
        (st.depth, st.zero, st.data)
    };
    for off in [2 << 20, (2 << 20) + 65_536, (2 << 20) + 300_000] {
        assert_eq!(zero_at(off), (0, true, false), "at {off}");
    }
    assert_eq!(zero_at(65_536), (0, false, true));
    assert_eq!(zero_at(131_072), (0, false, true));
    let mut got = vec![0u8; SIZE as usize];
    img.read_at(&mut got, 0).unwrap();
    assert!(got == content);
    drop(img);
    // Only an L2 table and the two data clusters were allocated, after the L1 table's cluster.
    assert_eq!(
        std::fs::metadata(&p).unwrap().len(),
        len0.div_ceil(65_536) * 65_536 + 3 * 65_536
    );
    qemu_check(&p);
}
