//! vmdk against qemu-img, both ways, for every option qemu-img 10 offers; delta chains;
//! streamOptimized in VMware's layout (written by the library, and built here from the spec);
//! descriptors with several extent kinds; a 6 GiB twoGbMaxExtentSparse image.

#![allow(clippy::cast_possible_truncation)] // test sizes are small constants
mod fmt_common;

use std::path::Path;

use fmt_common::*;
use imgblock::vmdk::sparse::{self, SparseHeader};
use imgblock::{create, CreateOptions, Format, FormatSpecific, Image, OpenOptions};

const SUBFORMATS: &[&str] = &[
    "monolithicSparse",
    "monolithicFlat",
    "twoGbMaxExtentSparse",
    "twoGbMaxExtentFlat",
    "streamOptimized",
];

/// Option sets covering every -o option of qemu-img 10's vmdk driver.
const OPTION_SETS: &[&str] = &[
    "",
    "adapter_type=lsilogic",
    "adapter_type=buslogic",
    "adapter_type=legacyESX",
    "hwversion=7",
    "compat6=on",
    "zeroed_grain=on",
    "toolsversion=12345",
    "preallocation=falloc",
    "preallocation=full",
    "nocow=on",
    "extent_size_hint=1M",
];

fn edits(p: &Path, stream: bool) {
    if stream {
        // qemu appends whole compressed grains to its streams.
        qemu_io("vmdk", p, &["write -P 0xab 0 128k", "write -P 0x11 3m 64k"]);
    } else {
        qemu_io(
            "vmdk",
            p,
            &[
                "write -P 0xab 0 100k",
                "write -P 0x11 1500k 700k",
                "write -z 1600k 64k",
                "write -z 4m 128k",
                "write -P 0x22 3m 4k",
                "discard 3m 1m",
                "write -P 0x33 5119k 1k",
            ],
        );
    }
}

#[test]
fn vmdk_qemu_made_images_read_byte_for_byte() {
    let dir = tempfile::tempdir().unwrap();
    for sub in SUBFORMATS {
        for (i, opts) in OPTION_SETS.iter().enumerate() {
            if sub.contains("Flat") && opts.contains("zeroed_grain") {
                continue; // qemu: "Flat image can't enable zeroed grain"
            }
            let p = dir.path().join(format!("{sub}{i}.vmdk"));
            let ps = p.to_str().unwrap();
            let o = if opts.is_empty() {
                format!("subformat={sub}")
            } else {
                format!("subformat={sub},{opts}")
            };
            qemu_img(&["create", "-q", "-f", "vmdk", "-o", &o, ps, "5M"]);
            assert_reads_like_qemu(&p);
            edits(&p, *sub == "streamOptimized");
            assert_reads_like_qemu(&p);
            let img = Image::open(&p, &OpenOptions::read_only()).unwrap();
            match img.driver().specific() {
                FormatSpecific::Vmdk(v) => assert_eq!(v.create_type, *sub),
                other => panic!("{other:?}"),
            }
        }
    }
}

#[test]
fn vmdk_qemu_converted_stream_reads_byte_for_byte() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    let mut content = vec![0u8; 3 << 20];
    content[..200_000].copy_from_slice(&pattern(200_000, 3));
    content[(2 << 20) + 1..(2 << 20) + 5000].fill(0x44);
    std::fs::write(&src, &content).unwrap();
    let dst = dir.path().join("s.vmdk");
    qemu_img(&[
        "convert",
        "-O",
        "vmdk",
        "-o",
        "subformat=streamOptimized",
        src.to_str().unwrap(),
        dst.to_str().unwrap(),
    ]);
    assert_eq!(read_lib(&dst), content);
    assert_reads_like_qemu(&dst);
}

fn source(dir: &Path, size: usize) -> (std::path::PathBuf, Vec<u8>) {
    let src = dir.join("src.raw");
    let mut content = vec![0u8; size];
    content[..300_000].copy_from_slice(&pattern(300_000, 1));
    content[(3 << 20) + 7..(3 << 20) + 70_007].copy_from_slice(&pattern(70_000, 2));
    let n = content.len();
    content[n - 1000..].fill(0xee);
    std::fs::write(&src, &content).unwrap();
    (src, content)
}

#[test]
fn vmdk_library_made_images_pass_qemu_check_and_compare() {
    let dir = tempfile::tempdir().unwrap();
    let (src, content) = source(dir.path(), (5 << 20) + 512);
    let srcimg = Image::open(&src, &OpenOptions::read_only().format(Some(Format::Raw))).unwrap();
    for sub in SUBFORMATS {
        for (i, opts) in OPTION_SETS.iter().enumerate() {
            if sub.contains("Flat") && opts.contains("zeroed_grain") {
                continue;
            }
            let dst = dir.path().join(format!("lib-{sub}{i}.vmdk"));
            let o = if opts.is_empty() {
                format!("subformat={sub}")
            } else {
                format!("subformat={sub},{opts}")
            };
            lib_convert(&srcimg, &dst, Format::Vmdk, &o);
            qemu_check(&dst);
            qemu_compare(&src, &dst);
            assert!(
                read_lib(&dst) == content,
                "{sub} {opts}: library reads differ"
            );
            let info = qemu_img(&["info", "--output=json", dst.to_str().unwrap()]);
            assert!(
                info.contains(&format!("\"create-type\": \"{sub}\"")),
                "{info}"
            );
            if *sub != "streamOptimized" {
                // Zero writes (zeroed grains where enabled) keep qemu-img check clean.
                let img = Image::open(&dst, &OpenOptions::writable()).unwrap();
                img.write_zeroes(0, 1 << 20, false).unwrap();
                img.write_at(&[0x77; 5000], 4 << 20).unwrap();
                img.flush().unwrap();
                drop(img);
                qemu_check(&dst);
                assert_reads_like_qemu(&dst);
            }
        }
    }
}

#[test]
fn vmdk_create_descriptor_matches_qemu() {
    let dir = tempfile::tempdir().unwrap();
    for (sub, opts) in [
        (
            "monolithicFlat",
            "adapter_type=lsilogic,hwversion=7,toolsversion=99",
        ),
        ("twoGbMaxExtentSparse", "compat6=on"),
    ] {
        let a = dir.path().join(format!("a-{sub}.vmdk"));
        let b = dir.path().join(format!("b-{sub}.vmdk"));
        let mut o = CreateOptions::new(5 << 30);
        o.parse_opts(&format!("subformat={sub},{opts}")).unwrap();
        create(&a, Format::Vmdk, &o).unwrap();
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "vmdk",
            "-o",
            &format!("subformat={sub},{opts}"),
            b.to_str().unwrap(),
            "5G",
        ]);
        let strip = |t: String, name: &str| {
            t.lines()
                .filter(|l| !l.starts_with("CID="))
                .collect::<Vec<_>>()
                .join("\n")
                .replace(name, "X")
        };
        let ta = strip(std::fs::read_to_string(&a).unwrap(), &format!("a-{sub}"));
        let tb = strip(std::fs::read_to_string(&b).unwrap(), &format!("b-{sub}"));
        assert_eq!(ta, tb);
    }
    // Invalid option combinations are refused as qemu refuses them.
    let p = dir.path().join("x.vmdk");
    for bad in [
        "compat6=on,hwversion=7",
        "adapter_type=scsi",
        "subformat=vmfs",
        "preallocation=metadata",
        "cluster_size=64k",
        "subformat=monolithicFlat,zeroed_grain=on",
    ] {
        let mut o = CreateOptions::new(1 << 20);
        o.parse_opts(bad).unwrap();
        assert!(create(&p, Format::Vmdk, &o).is_err(), "{bad}");
    }
}

#[test]
fn vmdk_delta_chain_vmdk_vmdk_qcow2_reads_correctly() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.vmdk");
    let mid = dir.path().join("mid.vmdk");
    let top = dir.path().join("top.qcow2");
    qemu_img(&["create", "-q", "-f", "vmdk", base.to_str().unwrap(), "4M"]);
    qemu_io("vmdk", &base, &["write -P 0x11 0 4m"]);
    // The library makes the delta on the qemu-made base.
    let o = CreateOptions {
        backing_file: Some("base.vmdk".into()),
        backing_fmt: Some("vmdk".into()),
        ..CreateOptions::default()
    };
    create(&mid, Format::Vmdk, &o).unwrap();
    let img = Image::open(&mid, &OpenOptions::writable()).unwrap();
    assert_eq!(img.size(), 4 << 20);
    img.write_at(&[0x22; 4096], 1 << 20).unwrap();
    img.write_zeroes(2 << 20, 64 << 10, false).unwrap();
    img.flush().unwrap();
    drop(img);
    qemu_check(&mid);
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "mid.vmdk",
        "-F",
        "vmdk",
        top.to_str().unwrap(),
    ]);
    qemu_io("qcow2", &top, &["write -P 0x33 3m 4k", "write -z 0 4k"]);
    assert_reads_like_qemu(&top);
    let data = read_lib(&top);
    assert!(data[..4096].iter().all(|&b| b == 0));
    assert!(data[4096..1 << 20].iter().all(|&b| b == 0x11));
    assert!(data[1 << 20..(1 << 20) + 4096].iter().all(|&b| b == 0x22));
    assert!(data[2 << 20..(2 << 20) + 65536].iter().all(|&b| b == 0));
    assert!(data[3 << 20..(3 << 20) + 4096].iter().all(|&b| b == 0x33));
    let img = Image::open(&top, &OpenOptions::read_only()).unwrap();
    assert_eq!(img.chain().len(), 3);
    match img.chain()[1].driver().specific() {
        FormatSpecific::Vmdk(v) => {
            let b = Image::open(&base, &OpenOptions::read_only()).unwrap();
            let FormatSpecific::Vmdk(bv) = b.driver().specific() else {
                panic!()
            };
            assert_eq!(v.parent_cid, bv.cid);
        }
        other => panic!("{other:?}"),
    }
    // A delta that qemu-img makes reads too.
    let qd = dir.path().join("qdelta.vmdk");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "vmdk",
        "-b",
        "base.vmdk",
        "-F",
        "vmdk",
        qd.to_str().unwrap(),
    ]);
    qemu_io("vmdk", &qd, &["write -P 0x44 100k 8k"]);
    assert_reads_like_qemu(&qd);
}

#[test]
fn vmdk_6gib_two_gb_sparse_with_data_at_the_end_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let size: u64 = 6 << 30;
    let p = dir.path().join("big.vmdk");
    let mut o = CreateOptions::new(size);
    o.parse_opts("subformat=twoGbMaxExtentSparse").unwrap();
    create(&p, Format::Vmdk, &o).unwrap();
    let img = Image::open(&p, &OpenOptions::writable()).unwrap();
    img.write_at(&vec![0x5c; 2 << 20], size - (3 << 20))
        .unwrap();
    img.write_at(&[0x5d; 4096], size - 4096).unwrap();
    img.write_at(&[0x5e; 4096], (2 << 30) - 2048).unwrap(); // across the first extent boundary
    img.flush().unwrap();
    drop(img);
    qemu_check(&p);
    qemu_io(
        "vmdk",
        &p,
        &[
            "read -P 0x5c 6141m 2m",
            "read -P 0 6143m 1020k",
            "read -P 0x5d 6291452k 4k",
            "read -P 0x5e 2147481600 4096",
        ],
    );
    // qemu-made, read by the library.
    let q = dir.path().join("bigq.vmdk");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "vmdk",
        "-o",
        "subformat=twoGbMaxExtentSparse",
        q.to_str().unwrap(),
        "6G",
    ]);
    qemu_io(
        "vmdk",
        &q,
        &["write -P 0x77 6143m 1m", "write -P 0x78 2047m 2m"],
    );
    let img = Image::open(&q, &OpenOptions::read_only()).unwrap();
    let mut buf = vec![0u8; 2 << 20];
    img.read_at(&mut buf, size - (2 << 20)).unwrap();
    assert!(buf[..1 << 20].iter().all(|&b| b == 0));
    assert!(buf[1 << 20..].iter().all(|&b| b == 0x77));
    img.read_at(&mut buf, 2047 << 20).unwrap();
    assert!(buf.iter().all(|&b| b == 0x78));
}

/// Walks a stream in VMware's layout and returns (grain markers, GT markers, GD markers),
/// checking each structure against the spec on the way. The header names the directory as
/// the footer does (qemu opens a stream for writing through its header), and every directory
/// entry has its table (qemu allocates grains, never tables).
fn walk_stream(bytes: &[u8]) -> (usize, usize, usize) {
    let h = SparseHeader::parse(&bytes[..512]).unwrap();
    assert_eq!(h.version, 3);
    assert_eq!(h.flags & sparse::FLAG_COMPRESS, sparse::FLAG_COMPRESS);
    assert_eq!(h.flags & sparse::FLAG_MARKER, sparse::FLAG_MARKER);
    assert_eq!(h.compress, sparse::COMPRESSION_DEFLATE);
    let mut pos = (h.overhead * 512) as usize;
    let (mut grains, mut gts, mut gds) = (0, 0, 0);
    let mut gd_sector = 0;
    loop {
        let m: [u8; 512] = bytes[pos..pos + 512].try_into().unwrap();
        let (val, size, kind) = sparse::parse_marker(&m);
        if size != 0 {
            // Grain marker: lba, size, zlib data.
            assert_eq!(bytes[pos + 12], 0x78, "zlib header at {pos:#x}");
            assert_eq!(val % h.grain_size, 0);
            grains += 1;
            pos += (12 + size as usize).div_ceil(512) * 512;
            continue;
        }
        match kind {
            sparse::MARKER_GT => {
                gts += 1;
                pos += 512 + val as usize * 512;
            }
            sparse::MARKER_GD => {
                gds += 1;
                gd_sector = (pos + 512) / 512;
                pos += 512 + val as usize * 512;
            }
            sparse::MARKER_FOOTER => {
                assert_eq!(val, 1);
                let f = SparseHeader::parse(&bytes[pos + 512..pos + 1024]).unwrap();
                assert_eq!(f.gd_offset as usize, gd_sector);
                assert_eq!(h.gd_offset as usize, gd_sector, "the header names the GD");
                assert_eq!(f.capacity, h.capacity);
                let entries = h.capacity.div_ceil(h.grain_size * 512) as usize;
                for e in bytes[gd_sector * 512..][..entries * 4].chunks(4) {
                    assert_ne!(u32::from_le_bytes(e.try_into().unwrap()), 0, "a GD hole");
                }
                assert_eq!(gts, entries, "one table per directory entry");
                pos += 1024;
                let eos: [u8; 512] = bytes[pos..pos + 512].try_into().unwrap();
                assert_eq!(sparse::parse_marker(&eos), (0, 0, sparse::MARKER_EOS));
                assert_eq!(pos + 512, bytes.len(), "EOS is the last sector");
                return (grains, gts, gds);
            }
            other => panic!("unexpected marker type {other} at {pos:#x}"),
        }
    }
}

#[test]
fn vmdk_stream_written_by_library_has_vmware_layout_and_reads_in_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let (src, content) = source(dir.path(), 40 << 20);
    let srcimg = Image::open(&src, &OpenOptions::read_only().format(Some(Format::Raw))).unwrap();
    // Plain writes (staged and compressed by the driver).
    let a = dir.path().join("a.vmdk");
    lib_convert(&srcimg, &a, Format::Vmdk, "subformat=streamOptimized");
    // Compressed cluster writes, as convert issues them.
    let b = dir.path().join("b.vmdk");
    let mut o = CreateOptions::new(srcimg.size());
    o.parse_opts("subformat=streamOptimized").unwrap();
    create(&b, Format::Vmdk, &o).unwrap();
    let img = Image::open(&b, &OpenOptions::writable()).unwrap();
    let cs = img.driver().cluster_size().unwrap() as usize;
    assert_eq!(cs, 65536);
    for (i, chunk) in content.chunks(cs).enumerate() {
        if chunk.iter().all(|&x| x == 0) {
            continue;
        }
        let c = img.compress_cluster(chunk);
        assert!(c.is_some());
        img.write_cluster((i * cs) as u64, chunk, c.as_deref())
            .unwrap();
    }
    img.flush().unwrap();
    drop(img);
    for p in [&a, &b] {
        let bytes = std::fs::read(p).unwrap();
        let (grains, gts, gds) = walk_stream(&bytes);
        assert_eq!(grains, 8, "grains with data");
        assert_eq!(gts, 2, "grain tables with grains (0..32M and 32..40M)");
        assert_eq!(gds, 1);
        qemu_check(p);
        qemu_compare(&src, p);
        assert!(read_lib(p) == content);
    }
    // Mostly empty: the tables of ranges without data are written too, so that qemu can
    // write whole grains anywhere into the stream afterwards, and both read them back.
    let big = dir.path().join("big.raw");
    let mut data = vec![0u8; 100 << 20];
    data[..300_000].copy_from_slice(&content[..300_000]);
    std::fs::write(&big, &data).unwrap();
    let bigimg = Image::open(&big, &OpenOptions::read_only().format(Some(Format::Raw))).unwrap();
    let c = dir.path().join("c.vmdk");
    lib_convert(&bigimg, &c, Format::Vmdk, "subformat=streamOptimized");
    let (grains, gts, _) = walk_stream(&std::fs::read(&c).unwrap());
    assert_eq!((grains, gts), (5, 4));
    qemu_io(
        "vmdk",
        &c,
        &[
            "write -P 0x31 70M 64k",
            "write -P 0x32 99M 1M",
            "write -P 0x33 1M 64k",
        ],
    );
    qemu_check(&c);
    qemu_io(
        "vmdk",
        &c,
        &[
            "read -P 0x31 70M 64k",
            "read -P 0x32 99M 1M",
            "read -P 0x33 1M 64k",
        ],
    );
    data[70 << 20..(70 << 20) + 65536].fill(0x31);
    data[99 << 20..].fill(0x32);
    data[1 << 20..(1 << 20) + 65536].fill(0x33);
    assert!(read_lib(&c) == data);
}

/// Builds a streamOptimized vmdk the way VMware's tools write it, from the spec: header with
/// GD_AT_END, a CRLF descriptor with VMware's keys, grains with markers, a GT marker and GT per
/// table, GD marker and GD, footer marker and footer, EOS.
fn build_vmware_stream(path: &Path, size: u64, grains: &[(u64, Vec<u8>)]) {
    let sectors = size / 512;
    let desc = format!(
        "# Disk DescriptorFile\r\nversion=1\r\nencoding=\"UTF-8\"\r\nCID=a5b2c3d4\r\n\
parentCID=ffffffff\r\nisNativeSnapshot=\"no\"\r\ncreateType=\"streamOptimized\"\r\n\r\n\
# Extent description\r\nRW {sectors} SPARSE \"disk1.vmdk\"\r\n\r\n# The Disk Data Base \r\n#DDB\r\n\r\n\
ddb.adapterType = \"lsilogic\"\r\nddb.geometry.cylinders = \"2\"\r\nddb.geometry.heads = \"255\"\r\n\
ddb.geometry.sectors = \"63\"\r\nddb.longContentID = \"0123456789abcdef0123456789abcdef\"\r\n\
ddb.toolsInstallType = \"4\"\r\nddb.toolsVersion = \"12389\"\r\nddb.uuid = \"60 00 C2 9a 6b 2a 36 c1-d9 3e 93 4e 58 2d 1b 5e\"\r\n\
ddb.virtualHWVersion = \"14\"\r\n"
    );
    let mut h = SparseHeader {
        version: 3,
        flags: sparse::FLAG_NL_DETECT | sparse::FLAG_COMPRESS | sparse::FLAG_MARKER,
        capacity: sectors,
        grain_size: 128,
        desc_offset: 1,
        desc_size: 2,
        gtes_per_gt: 512,
        rgd_offset: 0,
        gd_offset: sparse::GD_AT_END,
        overhead: 128,
        unclean: 0,
        check_bytes: *b"\n \r\n",
        compress: sparse::COMPRESSION_DEFLATE,
    };
    let mut f = vec![0u8; 128 * 512];
    f[..512].copy_from_slice(&h.to_bytes());
    f[512..512 + desc.len()].copy_from_slice(desc.as_bytes());
    let pad = |f: &mut Vec<u8>| f.resize(f.len().div_ceil(512) * 512, 0);
    let gd_entries = sectors.div_ceil(128 * 512) as usize;
    let mut gd = vec![0u32; gd_entries];
    let mut gt = vec![0u32; 512];
    let mut cur_gt = None;
    let flush_gt = |f: &mut Vec<u8>, gd: &mut Vec<u32>, gt: &mut Vec<u32>, k: usize| {
        f.extend_from_slice(&sparse::marker(4, sparse::MARKER_GT));
        gd[k] = (f.len() / 512) as u32;
        for e in gt.iter() {
            f.extend_from_slice(&e.to_le_bytes());
        }
        gt.iter_mut().for_each(|e| *e = 0);
    };
    for (grain, data) in grains {
        let k = (*grain / 512) as usize;
        if let Some(c) = cur_gt {
            if c != k {
                flush_gt(&mut f, &mut gd, &mut gt, c);
            }
        }
        cur_gt = Some(k);
        let c = imgblock::vmdk::deflate(data);
        gt[(*grain % 512) as usize] = (f.len() / 512) as u32;
        f.extend_from_slice(&sparse::grain_marker(grain * 128, c.len() as u32));
        f.extend_from_slice(&c);
        pad(&mut f);
    }
    if let Some(c) = cur_gt {
        flush_gt(&mut f, &mut gd, &mut gt, c);
    }
    let gd_sectors = (gd_entries * 4).div_ceil(512) as u64;
    f.extend_from_slice(&sparse::marker(gd_sectors, sparse::MARKER_GD));
    let gd_at = f.len() / 512;
    for e in &gd {
        f.extend_from_slice(&e.to_le_bytes());
    }
    pad(&mut f);
    f.extend_from_slice(&sparse::marker(1, sparse::MARKER_FOOTER));
    h.gd_offset = gd_at as u64;
    f.extend_from_slice(&h.to_bytes());
    f.extend_from_slice(&sparse::marker(0, sparse::MARKER_EOS));
    std::fs::write(path, &f).unwrap();
}

#[test]
fn vmdk_vmware_layout_stream_built_from_spec_reads_in_qemu_and_library() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("disk1.vmdk");
    let size = 70u64 << 20;
    let grains = vec![
        (0u64, vec![0x61u8; 65536]),
        (1, pattern(65536, 5)),
        (600, vec![0x62; 65536]),  // second grain table
        (1119, pattern(65536, 6)), // last grain
    ];
    build_vmware_stream(&p, size, &grains);
    assert_reads_like_qemu(&p);
    let data = read_lib(&p);
    for (g, d) in &grains {
        let at = (*g * 65536) as usize;
        assert!(data[at..at + 65536] == d[..], "grain {g}");
    }
    assert!(data[2 * 65536..600 * 65536].iter().all(|&b| b == 0));
    qemu_check(&p);
    let img = Image::open(&p, &OpenOptions::read_only()).unwrap();
    match img.driver().specific() {
        FormatSpecific::Vmdk(v) => {
            assert_eq!(v.cid, 0xa5b2_c3d4);
            assert_eq!(v.create_type, "streamOptimized");
            assert!(v.extents[0].compressed);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn vmdk_descriptor_with_flat_sparse_vmfs_and_zero_extents_reads() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // A qemu-made sparse extent with data, a flat file with data at an offset, a VMFS flat.
    let sp = d.join("sp.vmdk");
    qemu_img(&["create", "-q", "-f", "vmdk", sp.to_str().unwrap(), "1M"]);
    qemu_io("vmdk", &sp, &["write -P 0x41 0 1m"]);
    let mut flat = vec![0u8; 3 << 20];
    flat[1 << 20..].fill(0x42);
    std::fs::write(d.join("fl.raw"), &flat).unwrap();
    std::fs::write(d.join("vm.raw"), vec![0x43u8; 1 << 20]).unwrap();
    let desc = "# Disk DescriptorFile\r\nversion=1\r\nCID=12345678\r\nparentCID=ffffffff\r\n\
createType=\"vmfs\"\r\n\r\n# Extent description\r\nRW 2048 SPARSE \"sp.vmdk\"\r\n\
RW 2048 FLAT \"fl.raw\" 2048\r\nRW 2048 VMFS \"vm.raw\"\r\n\r\n#DDB\r\nddb.adapterType = \"lsilogic\"\r\n";
    let p = d.join("multi.vmdk");
    std::fs::write(&p, desc).unwrap();
    assert_reads_like_qemu(&p);
    let data = read_lib(&p);
    assert!(data[..1 << 20].iter().all(|&b| b == 0x41));
    assert!(data[1 << 20..2 << 20].iter().all(|&b| b == 0x42));
    assert!(data[2 << 20..].iter().all(|&b| b == 0x43));
    // A ZERO extent in the middle (qemu skips ZERO lines; the spec says it reads as zeroes).
    let desc0 = desc.replace(
        "RW 2048 FLAT \"fl.raw\" 2048\r\n",
        "RW 2048 ZERO\r\nRW 2048 FLAT \"fl.raw\" 2048\r\n",
    );
    let p0 = d.join("zero.vmdk");
    std::fs::write(&p0, desc0).unwrap();
    let img = Image::open(&p0, &OpenOptions::read_only()).unwrap();
    assert_eq!(img.size(), 4 << 20);
    let data = read_image(&img);
    assert!(data[..1 << 20].iter().all(|&b| b == 0x41));
    assert!(data[1 << 20..2 << 20].iter().all(|&b| b == 0));
    assert!(data[2 << 20..3 << 20].iter().all(|&b| b == 0x42));
    let FormatSpecific::Vmdk(v) = img.driver().specific() else {
        panic!()
    };
    let kinds: Vec<_> = v.extents.iter().map(|e| e.format.as_str()).collect();
    assert_eq!(kinds, ["SPARSE", "ZERO", "FLAT", "VMFS"]);
}

#[test]
fn vmdk_fixtures_read_like_qemu() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures");
    for f in ["sparse.vmdk", "zeroed_grain.vmdk", "stream.vmdk"] {
        assert_reads_like_qemu(&dir.join(f));
    }
}

#[test]
fn vmdk_empty_stream_optimized_from_create_opens_in_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("empty-stream.vmdk");
    let mut o = imgblock::CreateOptions::new(1 << 20);
    o.parse_opts("subformat=streamOptimized").unwrap();
    imgblock::create(&p, imgblock::Format::Vmdk, &o).unwrap();
    let out = fmt_common::output(std::process::Command::new("qemu-img").arg("check").arg(&p));
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let img = imgblock::Image::open(&p, &imgblock::OpenOptions::read_only()).unwrap();
    let mut b = vec![1u8; 1 << 20];
    img.read_at(&mut b, 0).unwrap();
    assert!(b.iter().all(|&x| x == 0));
}

/// A disk whose size is not a whole number of grains: writing into its last, partial grain
/// allocates that grain once, so the extent file is as long as qemu's for the same write, and
/// the image reads as the written model.
#[test]
fn vmdk_write_into_partial_last_grain_allocates_one_grain() {
    let dir = tempfile::tempdir().unwrap();
    let size = (1u64 << 20) + 512;
    let ours = dir.path().join("ours.vmdk");
    let theirs = dir.path().join("theirs.vmdk");
    create(&ours, Format::Vmdk, &CreateOptions::new(size)).unwrap();
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "vmdk",
        theirs.to_str().unwrap(),
        &size.to_string(),
    ]);
    let img = Image::open(&ours, &OpenOptions::writable()).unwrap();
    img.write_at(b"x", (1 << 20) + 24).unwrap();
    img.flush().unwrap();
    drop(img);
    qemu_io("vmdk", &theirs, &["write -P 0x78 1048600 1"]);
    assert_eq!(
        std::fs::metadata(&ours).unwrap().len(),
        std::fs::metadata(&theirs).unwrap().len()
    );
    qemu_check(&ours);
    qemu_compare(&ours, &theirs);
}
