//! Micro-benchmarks of convert's hot paths: L2 lookups through block status, zero detection,
//! and compressing one cluster (qcow2 zlib and zstd, streamOptimized vmdk grains, and
//! incompressible data).
//!
//! `cargo bench -p imgblock --bench hot_paths` (not part of `cargo test`). The side-by-side
//! comparison with qemu-img is `benches/convert.sh` at the top of the workspace.

use std::hint::black_box;
use std::path::Path;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use imgblock::{CreateOptions, Format, Image, OpenOptions};

/// Virtual size of the mapped image: 65536 clusters of 4 KiB, every other one allocated, so that
/// no two neighbouring L2 entries merge into one run.
const MAPPED_SIZE: u64 = 256 << 20;
const MAPPED_CLUSTER: u64 = 4096;
const MAPPED_CLUSTER_BYTES: usize = 4096;

fn create(dir: &Path, name: &str, format: Format, size: u64, opts: &str) -> Image {
    let path = dir.join(name);
    let mut o = CreateOptions::new(size);
    o.parse_opts(opts).expect("options");
    imgblock::create(&path, format, &o).expect("create");
    Image::open(&path, &OpenOptions::writable().format(Some(format))).expect("open")
}

fn qcow2(dir: &Path, name: &str, size: u64, opts: &str) -> Image {
    create(dir, name, Format::Qcow2, size, opts)
}

/// Deterministic text-like data that compresses about as well as binaries under /usr.
fn texty(len: usize) -> Vec<u8> {
    let words: [&[u8]; 8] = [
        b"qcow2 ",
        b"cluster ",
        b"refcount ",
        b"\x00\x00\x01",
        b"table ",
        b"\x7fELF",
        b"l2 ",
        b"\n",
    ];
    let mut x = 0x2545_f491_u32;
    let mut v = Vec::with_capacity(len + 16);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        v.extend_from_slice(words[(x % 8) as usize]);
        v.push(x.to_le_bytes()[1]);
    }
    v.truncate(len);
    v
}

fn noise(len: usize) -> Vec<u8> {
    let mut x = 0x9e37_79b9_u32;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x.to_le_bytes()[0]
        })
        .collect()
}

fn l2_lookup(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let img = qcow2(dir.path(), "mapped.qcow2", MAPPED_SIZE, "cluster_size=4k");
    let data = vec![0xa5u8; MAPPED_CLUSTER_BYTES];
    let mut off = 0;
    while off < MAPPED_SIZE {
        img.write_at(&data, off).expect("write");
        off += 2 * MAPPED_CLUSTER;
    }
    img.flush().expect("flush");
    let mut g = c.benchmark_group("l2_lookup");
    g.throughput(Throughput::Elements(MAPPED_SIZE / MAPPED_CLUSTER));
    // Every run of the image, the way convert's planner walks it.
    g.bench_function("block_status_walk_65536_clusters", |b| {
        b.iter(|| {
            let mut pos = 0;
            let mut runs = 0u64;
            while pos < MAPPED_SIZE {
                let st = img.block_status(pos, MAPPED_SIZE - pos).expect("status");
                pos += st.len.max(1);
                runs += 1;
            }
            black_box(runs)
        })
    });
    g.finish();
    c.bench_function("l2_lookup/block_status_one", |b| {
        let mut pos = 0;
        b.iter(|| {
            pos = (pos + 7 * MAPPED_CLUSTER) % MAPPED_SIZE;
            black_box(img.block_status(pos, MAPPED_CLUSTER).expect("status"))
        })
    });
}

fn zero_detection(c: &mut Criterion) {
    let mut g = c.benchmark_group("zero_detection");
    for len in [4096usize, 64 << 10, 2 << 20] {
        let zero = vec![0u8; len];
        g.throughput(Throughput::Bytes(len as u64));
        g.bench_with_input(BenchmarkId::new("all_zero", len), &zero, |b, z| {
            b.iter(|| black_box(imgblock::scan::is_zero(black_box(z))))
        });
    }
    let mut late = vec![0u8; 2 << 20];
    late[(2 << 20) - 1] = 1;
    g.bench_function("nonzero_last_byte_2MiB", |b| {
        b.iter(|| black_box(imgblock::scan::is_zero(black_box(&late))))
    });
    g.finish();
}

fn compression(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let zlib = qcow2(dir.path(), "zlib.qcow2", 1 << 20, "compression_type=zlib");
    let zstd = qcow2(dir.path(), "zstd.qcow2", 1 << 20, "compression_type=zstd");
    let stream = create(
        dir.path(),
        "stream.vmdk",
        Format::Vmdk,
        1 << 20,
        "subformat=streamOptimized",
    );
    let text = texty(64 << 10);
    let random = noise(64 << 10);
    let mut g = c.benchmark_group("compress_cluster_64k");
    g.throughput(Throughput::Bytes(64 << 10));
    for (name, img) in [("zlib", &zlib), ("zstd", &zstd), ("vmdk_stream", &stream)] {
        g.bench_function(BenchmarkId::new(name, "text"), |b| {
            b.iter(|| black_box(img.compress_cluster(black_box(&text))))
        });
        g.bench_function(BenchmarkId::new(name, "random"), |b| {
            b.iter(|| black_box(img.compress_cluster(black_box(&random))))
        });
    }
    g.bench_function("incompressible_probe", |b| {
        b.iter(|| black_box(imgblock::scan::incompressible(black_box(&random))))
    });
    g.finish();
}

/// Reading one compressed 64 KiB cluster of text back: the qcow2 read path (L2 entry, the
/// compressed bytes, inflate or zstd), and a streamOptimized grain's inflate.
fn decompression(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let text = texty(64 << 10);
    let mut g = c.benchmark_group("decompress_cluster_64k");
    g.throughput(Throughput::Bytes(64 << 10));
    for kind in ["zlib", "zstd"] {
        let img = qcow2(
            dir.path(),
            &format!("{kind}.qcow2"),
            1 << 20,
            &format!("compression_type={kind}"),
        );
        let packed = img.compress_cluster(&text).expect("text compresses");
        img.write_compressed_clusters(&[(0, &packed)])
            .expect("write compressed");
        let mut out = vec![0u8; 64 << 10];
        img.read_at(&mut out, 0).expect("read back");
        assert_eq!(out, text);
        g.bench_function(BenchmarkId::new(kind, "text"), |b| {
            b.iter(|| img.read_at(black_box(&mut out), 0).expect("read"))
        });
    }
    let grain = imgblock::vmdk::deflate(&text);
    let mut out = vec![0u8; 64 << 10];
    g.bench_function(BenchmarkId::new("vmdk_stream", "text"), |b| {
        b.iter(|| black_box(imgblock::vmdk::inflate(black_box(&grain), &mut out)))
    });
    g.finish();
}

criterion_group!(
    benches,
    l2_lookup,
    zero_detection,
    compression,
    decompression
);
criterion_main!(benches);
