//! img → qemu-img: images made by `img create` and `img convert -O qcow2 -o ...` with each qcow2
//! creation option pass `qemu-img check` (exit 0: no corruption, no leaks) and `qemu-img
//! compare` finds them equal to their source; qemu-io can then write into them and `img` reads
//! back what it wrote.

mod common;

use common::{patterned_raw, Env, EDITS, SMALL};

/// `img create -f qcow2 -o OPTS t.qcow2 4M`: clean for qemu-img check, reads as zeros, takes
/// qemu-io's edits and stays clean, and `img` reads the edits back like qemu-img does.
fn img_created_image_works_in_qemu(opts: &str) {
    let env = Env::with_qemu();
    let size = SMALL.to_string();
    let mut args = vec!["create", "-f", "qcow2"];
    if !opts.is_empty() {
        args.extend_from_slice(&["-o", opts]);
    }
    args.extend_from_slice(&["t.qcow2", &size]);
    env.img(&args).ok();
    env.qemu_img(&["check", "t.qcow2"]).ok();
    let info = env
        .qemu_img(&["info", "--output=json", "t.qcow2"])
        .ok()
        .json();
    assert_eq!(info["format"], "qcow2", "{info:#}");
    assert_eq!(info["virtual-size"], SMALL, "{info:#}");
    env.sparse_file("zero.raw", SMALL);
    env.qemu_img(&["compare", "-f", "qcow2", "-F", "raw", "t.qcow2", "zero.raw"])
        .ok();
    env.qemu_io("qcow2", "t.qcow2", EDITS);
    env.qemu_img(&["check", "t.qcow2"]).ok();
    env.assert_converts_like_qemu("t.qcow2", &[]);
}

/// `img convert -O qcow2 -o OPTS src.raw t.qcow2` from a raw file with data and holes: clean
/// for qemu-img check, equal to the source for qemu-img compare. (Not `compare -s`: strict
/// mode also fails when allocation differs, e.g. a hole in the source that is an allocated
/// zero range in the copy, which is not a bug.)
fn img_converted_image_works_in_qemu(opts: &str) {
    let env = Env::with_qemu();
    patterned_raw(&env, "src.raw");
    let mut args = vec!["convert", "-f", "raw", "-O", "qcow2"];
    if !opts.is_empty() {
        args.extend_from_slice(&["-o", opts]);
    }
    args.extend_from_slice(&["src.raw", "t.qcow2"]);
    env.img(&args).ok();
    env.qemu_img(&["check", "t.qcow2"]).ok();
    env.qemu_img(&["compare", "-f", "raw", "-F", "qcow2", "src.raw", "t.qcow2"])
        .ok();
    // And qemu-io can keep writing into it.
    env.qemu_io("qcow2", "t.qcow2", EDITS);
    env.qemu_img(&["check", "t.qcow2"]).ok();
    env.assert_converts_like_qemu("t.qcow2", &[]);
}

macro_rules! matrix {
    ($($opts:literal => $create:ident, $convert:ident;)*) => {
        $(
            #[test]
            fn $create() {
                img_created_image_works_in_qemu($opts);
            }
            #[test]
            fn $convert() {
                img_converted_image_works_in_qemu($opts);
            }
        )*
    };
}

matrix! {
    "" => img_create_defaults_passes_qemu_check, img_convert_defaults_passes_qemu_check;
    "compat=0.10" => img_create_compat_0_10_passes_qemu_check, img_convert_compat_0_10_passes_qemu_check;
    "compat=1.1" => img_create_compat_1_1_passes_qemu_check, img_convert_compat_1_1_passes_qemu_check;
    "cluster_size=512" => img_create_cluster_512_passes_qemu_check, img_convert_cluster_512_passes_qemu_check;
    "cluster_size=1k" => img_create_cluster_1k_passes_qemu_check, img_convert_cluster_1k_passes_qemu_check;
    "cluster_size=2k" => img_create_cluster_2k_passes_qemu_check, img_convert_cluster_2k_passes_qemu_check;
    "cluster_size=4k" => img_create_cluster_4k_passes_qemu_check, img_convert_cluster_4k_passes_qemu_check;
    "cluster_size=8k" => img_create_cluster_8k_passes_qemu_check, img_convert_cluster_8k_passes_qemu_check;
    "cluster_size=16k" => img_create_cluster_16k_passes_qemu_check, img_convert_cluster_16k_passes_qemu_check;
    "cluster_size=32k" => img_create_cluster_32k_passes_qemu_check, img_convert_cluster_32k_passes_qemu_check;
    "cluster_size=64k" => img_create_cluster_64k_passes_qemu_check, img_convert_cluster_64k_passes_qemu_check;
    "cluster_size=128k" => img_create_cluster_128k_passes_qemu_check, img_convert_cluster_128k_passes_qemu_check;
    "cluster_size=256k" => img_create_cluster_256k_passes_qemu_check, img_convert_cluster_256k_passes_qemu_check;
    "cluster_size=512k" => img_create_cluster_512k_passes_qemu_check, img_convert_cluster_512k_passes_qemu_check;
    "cluster_size=1M" => img_create_cluster_1m_passes_qemu_check, img_convert_cluster_1m_passes_qemu_check;
    "cluster_size=2M" => img_create_cluster_2m_passes_qemu_check, img_convert_cluster_2m_passes_qemu_check;
    "compat=0.10,cluster_size=512" =>
        img_create_v2_cluster_512_passes_qemu_check, img_convert_v2_cluster_512_passes_qemu_check;
    "refcount_bits=1" => img_create_refcount_1_passes_qemu_check, img_convert_refcount_1_passes_qemu_check;
    "refcount_bits=2" => img_create_refcount_2_passes_qemu_check, img_convert_refcount_2_passes_qemu_check;
    "refcount_bits=4" => img_create_refcount_4_passes_qemu_check, img_convert_refcount_4_passes_qemu_check;
    "refcount_bits=8" => img_create_refcount_8_passes_qemu_check, img_convert_refcount_8_passes_qemu_check;
    "refcount_bits=16" => img_create_refcount_16_passes_qemu_check, img_convert_refcount_16_passes_qemu_check;
    "refcount_bits=32" => img_create_refcount_32_passes_qemu_check, img_convert_refcount_32_passes_qemu_check;
    "refcount_bits=64" => img_create_refcount_64_passes_qemu_check, img_convert_refcount_64_passes_qemu_check;
    "refcount_bits=1,cluster_size=512" =>
        img_create_refcount_1_cluster_512_passes_qemu_check,
        img_convert_refcount_1_cluster_512_passes_qemu_check;
    "refcount_bits=64,cluster_size=512" =>
        img_create_refcount_64_cluster_512_passes_qemu_check,
        img_convert_refcount_64_cluster_512_passes_qemu_check;
    "lazy_refcounts=on" => img_create_lazy_refcounts_passes_qemu_check, img_convert_lazy_refcounts_passes_qemu_check;
    "extended_l2=on,cluster_size=16k" =>
        img_create_extended_l2_16k_passes_qemu_check, img_convert_extended_l2_16k_passes_qemu_check;
    "extended_l2=on" => img_create_extended_l2_64k_passes_qemu_check, img_convert_extended_l2_64k_passes_qemu_check;
    "extended_l2=on,cluster_size=2M" =>
        img_create_extended_l2_2m_passes_qemu_check, img_convert_extended_l2_2m_passes_qemu_check;
    "data_file=t.data" => img_create_data_file_passes_qemu_check, img_convert_data_file_passes_qemu_check;
    "data_file=t.data,data_file_raw=on" =>
        img_create_data_file_raw_passes_qemu_check, img_convert_data_file_raw_passes_qemu_check;
    "preallocation=off" => img_create_prealloc_off_passes_qemu_check, img_convert_prealloc_off_passes_qemu_check;
    "preallocation=metadata" =>
        img_create_prealloc_metadata_passes_qemu_check, img_convert_prealloc_metadata_passes_qemu_check;
    "preallocation=falloc" =>
        img_create_prealloc_falloc_passes_qemu_check, img_convert_prealloc_falloc_passes_qemu_check;
    "preallocation=full" => img_create_prealloc_full_passes_qemu_check, img_convert_prealloc_full_passes_qemu_check;
    "compat=0.10,preallocation=metadata" =>
        img_create_v2_prealloc_metadata_passes_qemu_check,
        img_convert_v2_prealloc_metadata_passes_qemu_check;
}

/// A data_file made by `img convert` with data_file_raw=on is itself a valid raw image of the
/// source: qemu-img compare finds them equal.
#[test]
fn img_convert_data_file_raw_data_file_equals_source() {
    let env = Env::with_qemu();
    patterned_raw(&env, "src.raw");
    env.img(&[
        "convert",
        "-O",
        "qcow2",
        "-o",
        "data_file=t.data,data_file_raw=on",
        "src.raw",
        "t.qcow2",
    ])
    .ok();
    env.qemu_img(&["compare", "-f", "raw", "-F", "raw", "src.raw", "t.data"])
        .ok();
}

/// `img create` with data_file_raw=on preallocates the metadata, as qemu-img does: the image
/// is the same bytes as qemu-img's, maps every cluster to its own offset in the data file, and
/// data written straight into the raw data file reads back through the qcow2 image.
#[test]
fn img_create_data_file_raw_maps_whole_data_file_like_qemu() {
    let env = Env::with_qemu();
    std::fs::create_dir(env.path("q")).unwrap();
    let opts = "data_file=t.data,data_file_raw=on";
    env.img(&["create", "-q", "-f", "qcow2", "-o", opts, "t.qcow2", "1M"])
        .ok();
    env.qemu_img(&["create", "-q", "-f", "qcow2", "-o", opts, "q/t.qcow2", "1M"])
        .ok();
    env.assert_same_bytes("t.qcow2", "q/t.qcow2");
    let map = |f: &str| env.qemu_img(&["map", "--output=json", f]).ok().stdout;
    assert_eq!(map("t.qcow2"), map("q/t.qcow2"));
    let m = env
        .qemu_img(&["map", "--output=json", "t.qcow2"])
        .ok()
        .json();
    assert_eq!(m[0]["data"], true, "{m:#}");
    assert_eq!(m[0]["offset"], 0, "{m:#}");
    assert_eq!(m[0]["length"], 1 << 20, "{m:#}");
    env.qemu_io("raw", "t.data", &["write -P 0x5a 64k 64k"]);
    env.img(&["convert", "-O", "raw", "t.qcow2", "t.raw"]).ok();
    env.assert_same_bytes("t.raw", "t.data");
    env.qemu_img(&["check", "t.qcow2"]).ok();
}

/// qemu decides from the metadata file alone whether an image looks metadata-preallocated,
/// external data file or not: once it does (here after a bitmap adds metadata clusters), the
/// data file's holes map as zeroes. `img map` says what qemu-img says, before and after.
#[test]
fn data_file_images_map_the_data_files_holes_like_qemu() {
    let env = Env::with_qemu();
    for raw in ["on", "off"] {
        let opts = format!("data_file=t{raw}.data,data_file_raw={raw}");
        let f = format!("t{raw}.qcow2");
        env.qemu_img(&["create", "-q", "-f", "qcow2", "-o", &opts, &f, "4M"])
            .ok();
        env.qemu_io("qcow2", &f, &["write -P 5 1M 64k", "write -z 2M 64k"]);
        for step in ["written", "with a bitmap"] {
            if step == "with a bitmap" {
                env.qemu_img(&["bitmap", "--add", &f, "b"]).ok();
            }
            for args in [&["map", &f][..], &["map", "--output=json", &f]] {
                let q = env.qemu_img(args).ok().stdout;
                assert_eq!(env.img(args).ok().stdout, q, "{raw} {step} {args:?}");
            }
        }
    }
}

/// `img create -b` with no size takes the backing image's size; qemu-img sees the backing file
/// and format, the overlay is clean, and reads through to the backing data.
#[test]
fn img_create_backing_without_size_takes_backing_size() {
    let env = Env::with_qemu();
    patterned_raw(&env, "base.raw");
    env.img(&[
        "create",
        "-f",
        "qcow2",
        "-b",
        "base.raw",
        "-F",
        "raw",
        "over.qcow2",
    ])
    .ok();
    env.qemu_img(&["check", "over.qcow2"]).ok();
    let info = env
        .qemu_img(&["info", "--output=json", "over.qcow2"])
        .ok()
        .json();
    assert_eq!(info["virtual-size"], SMALL, "{info:#}");
    assert_eq!(info["backing-filename"], "base.raw", "{info:#}");
    assert_eq!(info["backing-filename-format"], "raw", "{info:#}");
    env.qemu_img(&["compare", "over.qcow2", "base.raw"]).ok();
    env.qemu_io("qcow2", "over.qcow2", EDITS);
    env.qemu_img(&["check", "over.qcow2"]).ok();
    env.assert_converts_like_qemu("over.qcow2", &[]);
}

/// `img convert -O qcow2 -B BACKING` writes only what differs from the backing image, and the
/// result reads as the source through qemu-img.
#[test]
fn img_convert_with_backing_equals_source() {
    let env = Env::with_qemu();
    patterned_raw(&env, "base.raw");
    env.qemu_img(&["convert", "-O", "raw", "base.raw", "src.raw"])
        .ok();
    env.qemu_io(
        "raw",
        "src.raw",
        &["write -P 0x31 64k 64k", "write -z 0 4k"],
    );
    env.img(&[
        "convert", "-O", "qcow2", "-B", "base.raw", "-F", "raw", "src.raw", "t.qcow2",
    ])
    .ok();
    env.qemu_img(&["check", "t.qcow2"]).ok();
    env.qemu_img(&["compare", "-F", "raw", "t.qcow2", "src.raw"])
        .ok();
    let info = env
        .qemu_img(&["info", "--output=json", "t.qcow2"])
        .ok()
        .json();
    assert_eq!(info["backing-filename"], "base.raw", "{info:#}");
}

/// `img convert -B` from a source without a backing file: what the source leaves unallocated
/// reads as zeroes, so the target must hide its backing file there (past the end of a shorter
/// backing file it reads as zeroes already). A source whose own backing file is shorter than it
/// is left to the target's backing file wherever it leaves a range to its own, even past that
/// file's end, as in qemu. Every result reads and maps as qemu-img's.
#[test]
fn img_convert_with_backing_hides_it_where_the_source_reads_zeroes() {
    let env = Env::with_qemu();
    // 3 MiB of 0xee behind a 4 MiB target: the last MiB lies past its end.
    env.qemu_img(&["create", "-q", "-f", "qcow2", "back.qcow2", "3M"])
        .ok();
    env.qemu_io("qcow2", "back.qcow2", &["write -P 0xee 0 3M"]);
    env.qemu_img(&["create", "-q", "-f", "qcow2", "short.qcow2", "2M"])
        .ok();
    env.qemu_io("qcow2", "short.qcow2", &["write -P 0x77 0 2M"]);
    env.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "short.qcow2",
        "-F",
        "qcow2",
        "over.qcow2",
        "4M",
    ])
    .ok();
    for (fmt, src) in [
        ("qcow2", "src.qcow2"),
        ("vmdk", "src.vmdk"),
        ("vdi", "src.vdi"),
        ("qcow2", "over.qcow2"),
    ] {
        if src != "over.qcow2" {
            env.qemu_img(&["create", "-q", "-f", fmt, src, "4M"]).ok();
        }
        env.qemu_io(
            fmt,
            src,
            &["write -P 0xab 1M 512k", "write -P 0xcd 3584k 256k"],
        );
        // Compressed too: only what the source's top layer holds is written.
        for c in ["", "-c"] {
            let ours = format!("img{c}-{fmt}-{src}.qcow2");
            let theirs = format!("qemu{c}-{fmt}-{src}.qcow2");
            for (tool, out) in [("img", &ours), ("qemu", &theirs)] {
                let mut args = vec![
                    "convert",
                    "-f",
                    fmt,
                    "-O",
                    "qcow2",
                    "-B",
                    "back.qcow2",
                    "-F",
                    "qcow2",
                    src,
                    out,
                ];
                if !c.is_empty() {
                    args.insert(1, c);
                }
                if tool == "img" {
                    env.img(&args).ok();
                } else {
                    env.qemu_img(&args).ok();
                }
            }
            env.qemu_img(&["check", &ours]).ok();
            env.qemu_img(&["compare", &ours, &theirs]).ok();
            if src != "over.qcow2" {
                env.qemu_img(&["compare", "-f", fmt, "-F", "qcow2", src, &ours])
                    .ok();
            }
            let map = |f: &str| env.qemu_img(&["map", "--output=json", f]).ok().stdout;
            assert_eq!(map(&ours), map(&theirs), "{src} {c}");
            let allocated = |f: &str| {
                env.qemu_img(&["check", "--output=json", f]).ok().json()["allocated-clusters"]
                    .clone()
            };
            assert_eq!(allocated(&ours), allocated(&theirs), "{src} {c}");
        }
    }
}

/// `convert -C` (copy offloading): raw to raw copies data inside the kernel, holes stay holes
/// and zeroes in the data are copied as data, as qemu-img does; a qcow2 target (not plain
/// data yet) takes the buffered path with the same result; -c and -S are refused with qemu's
/// words.
#[test]
fn img_convert_copy_offloading_matches_qemu() {
    let env = Env::with_qemu();
    env.sparse_file("src.raw", 8 << 20);
    env.write_at("src.raw", 0, &common::noise(7, 1 << 20));
    // Explicit zeroes (allocated, not a hole), then more data after a hole.
    env.write_at("src.raw", 2 << 20, &vec![0u8; 1 << 20]);
    env.write_at("src.raw", 5 << 20, &common::noise(8, 300 << 10));
    env.img(&[
        "convert", "-C", "-f", "raw", "-O", "raw", "src.raw", "img.raw",
    ])
    .ok();
    env.qemu_img(&[
        "convert", "-C", "-f", "raw", "-O", "raw", "src.raw", "qemu.raw",
    ])
    .ok();
    env.assert_same_bytes("img.raw", "src.raw");
    assert_eq!(env.len("img.raw"), env.len("qemu.raw"));
    assert_eq!(
        env.allocated("img.raw"),
        env.allocated("qemu.raw"),
        "the zeroes are copied and the holes kept, as qemu-img does"
    );
    assert!(env.allocated("img.raw") >= 2 << 20);

    env.img(&[
        "convert", "-C", "-f", "raw", "-O", "qcow2", "src.raw", "t.qcow2",
    ])
    .ok();
    env.qemu_img(&["check", "t.qcow2"]).ok();
    env.qemu_img(&["compare", "-F", "raw", "t.qcow2", "src.raw"])
        .ok();
    // The source's holes stay unallocated in a qcow2 target: at most qemu-img's clusters.
    env.qemu_img(&[
        "convert", "-C", "-f", "raw", "-O", "qcow2", "src.raw", "q.qcow2",
    ])
    .ok();
    let allocated = |f: &str| {
        env.qemu_img(&["check", "--output=json", f]).ok().json()["allocated-clusters"]
            .as_u64()
            .unwrap()
    };
    assert!(
        allocated("t.qcow2") <= allocated("q.qcow2"),
        "{} > {}",
        allocated("t.qcow2"),
        allocated("q.qcow2")
    );

    for bad in [
        &["-c"][..],
        &["-S", "4k"],
        &["--salvage"],
        &["-c", "--salvage"],
    ] {
        let mut args = vec!["convert", "-C"];
        args.extend_from_slice(bad);
        args.extend_from_slice(&["-O", "qcow2", "src.raw", "bad.qcow2"]);
        let ours = env.img(&args);
        let theirs = env.qemu_img(&args);
        assert_eq!(ours.code, theirs.code, "{args:?}");
        assert_eq!(
            ours.stderr.replace("img:", "qemu-img:"),
            theirs.stderr,
            "{args:?}"
        );
    }
}

/// The extensions of a qcow2 header, as (type, length) pairs.
fn header_extensions(bytes: &[u8]) -> Vec<(u32, u32)> {
    let be32 = |o: usize| u32::from_be_bytes(bytes[o..o + 4].try_into().unwrap());
    let mut off = usize::try_from(be32(100)).unwrap();
    let mut out = Vec::new();
    loop {
        let (kind, len) = (be32(off), be32(off + 4));
        if kind == 0 {
            return out;
        }
        out.push((kind, len));
        off += 8 + usize::try_from(len.div_ceil(8) * 8).unwrap();
    }
}

/// With 512-byte clusters the header cluster has no room for a feature name table next to a
/// backing name, a data file name or the LUKS header extension: like qemu-img, `img` leaves it
/// out, and header updates of such images succeed.
#[test]
fn small_cluster_header_leaves_out_feature_table_like_qemu() {
    let env = Env::with_qemu();
    env.qemu_img(&["create", "-f", "qcow2", "base.qcow2", "1M"])
        .ok();
    env.qemu_io("qcow2", "base.qcow2", &["write -P 0x5a 0 1M"]);
    let cases: &[&[&str]] = &[
        &["-o", "cluster_size=512", "-b", "base.qcow2", "-F", "qcow2"],
        &["-o", "cluster_size=512,data_file={}.data"],
        &["-o", "cluster_size=4k"],
        &["-o", "cluster_size=8k"],
        &[
            "--object",
            "secret,id=s0,data=pw",
            "-o",
            "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10,cluster_size=512",
        ],
    ];
    for extra in cases {
        for (t, name) in [("i", "i.qcow2"), ("q", "q.qcow2")] {
            let _ = std::fs::remove_file(env.path(name));
            let mut args = vec!["create", "-q", "-f", "qcow2"];
            let extra: Vec<String> = extra.iter().map(|a| a.replace("{}", t)).collect();
            args.extend(extra.iter().map(String::as_str));
            args.extend_from_slice(&[name, "1M"]);
            if t == "i" {
                env.img(&args).ok();
            } else {
                env.qemu_img(&args).ok();
            }
        }
        assert_eq!(
            header_extensions(&env.read("i.qcow2")),
            header_extensions(&env.read("q.qcow2")),
            "{extra:?}"
        );
    }
    // convert -B onto a base, and rebase -u of an image whose header holds a full feature
    // table (as earlier versions wrote it) both fit.
    env.img(&[
        "convert",
        "-O",
        "qcow2",
        "-o",
        "cluster_size=512",
        "-B",
        "base.qcow2",
        "-F",
        "qcow2",
        "base.qcow2",
        "c.qcow2",
    ])
    .ok();
    env.qemu_img(&["check", "c.qcow2"]).ok();
    env.qemu_img(&["compare", "c.qcow2", "base.qcow2"]).ok();
    env.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=512",
        "r.qcow2",
        "1M",
    ])
    .ok();
    let mut bytes = env.read("r.qcow2");
    let names = [
        (0u8, 0u8, "dirty bit"),
        (0, 1, "corrupt bit"),
        (0, 2, "external data file"),
        (0, 3, "compression type"),
        (0, 4, "extended L2 entries"),
        (1, 0, "lazy refcounts"),
        (2, 0, "bitmaps"),
        (2, 1, "raw external data"),
    ];
    let mut ext = 0x6803_f857u32.to_be_bytes().to_vec();
    ext.extend_from_slice(&(48 * u32::try_from(names.len()).unwrap()).to_be_bytes());
    for (kind, bit, name) in names {
        let mut e = [0u8; 48];
        e[0] = kind;
        e[1] = bit;
        e[2..2 + name.len()].copy_from_slice(name.as_bytes());
        ext.extend_from_slice(&e);
    }
    ext.extend_from_slice(&[0u8; 8]);
    bytes[112..112 + ext.len()].copy_from_slice(&ext);
    env.write("r.qcow2", &bytes);
    env.img(&["rebase", "-u", "-b", "base.qcow2", "-F", "qcow2", "r.qcow2"])
        .ok();
    env.qemu_img(&["check", "r.qcow2"]).ok();
    env.qemu_img(&["compare", "r.qcow2", "base.qcow2"]).ok();
}

#[test]
fn created_qcow2_files_are_the_length_qemu_img_makes() {
    let env = Env::with_qemu();
    // The L1 table is written entry by entry, so its length shows in the file's.
    for (size, opts) in [
        ("1M", "cluster_size=65536"),
        ("10G", "cluster_size=65536"),
        ("1T", "cluster_size=65536"),
        ("3G", "cluster_size=4096"),
        ("100G", "cluster_size=2M"),
        ("7G", "compat=0.10,cluster_size=512"),
    ] {
        for (tool, name) in [("img", "i.qcow2"), ("qemu", "q.qcow2")] {
            let _ = std::fs::remove_file(env.path(name));
            let args = ["create", "-q", "-f", "qcow2", "-o", opts, name, size];
            if tool == "img" {
                env.img(&args).ok();
            } else {
                env.qemu_img(&args).ok();
            }
        }
        assert_eq!(env.len("i.qcow2"), env.len("q.qcow2"), "{size} {opts}");
        // With 512-byte clusters the refcount blocks land elsewhere than qemu puts them (both
        // valid); otherwise the files are the same bytes.
        if !opts.contains("cluster_size=512") {
            assert!(
                env.read("i.qcow2") == env.read("q.qcow2"),
                "{size} {opts}: bytes differ"
            );
        }
        env.qemu_img(&["check", "i.qcow2"]).ok();
    }
}

/// A run of zeroes that covers clusters only in part, next to holes, over a backing file that
/// reads as zeroes there: qemu-img makes zero clusters of them rather than data, and so does
/// img, so both files are the same length and map the same.
#[test]
fn img_convert_with_backing_makes_zero_clusters_of_partial_zero_runs_like_qemu() {
    let env = Env::with_qemu();
    patterned_raw(&env, "src.raw");
    env.qemu_img(&["create", "-q", "-f", "qcow2", "base.qcow2", "4M"])
        .ok();
    env.qemu_io(
        "qcow2",
        "base.qcow2",
        &["write -P 0x13 0 2M", "write -P 0x14 3M 100k"],
    );
    for opts in [
        "",
        ",cluster_size=4k",
        ",extended_l2=on",
        ",cluster_size=128k",
    ] {
        let o = format!("backing_file=base.qcow2,backing_fmt=qcow2{opts}");
        for out in ["i.qcow2", "q.qcow2"] {
            let _ = std::fs::remove_file(env.path(out));
        }
        env.img(&["convert", "-O", "qcow2", "-o", &o, "src.raw", "i.qcow2"])
            .ok();
        env.qemu_img(&["convert", "-O", "qcow2", "-o", &o, "src.raw", "q.qcow2"])
            .ok();
        env.qemu_img(&["check", "i.qcow2"]).ok();
        env.qemu_img(&["compare", "-F", "raw", "i.qcow2", "src.raw"])
            .ok();
        let map = |f: &str| env.qemu_img(&["map", "--output=json", f]).ok().stdout;
        assert_eq!(map("i.qcow2"), map("q.qcow2"), "{o}");
        assert_eq!(env.len("i.qcow2"), env.len("q.qcow2"), "{o}");
    }
}

/// `convert -n -B BACKING` into an existing image needs no `-F` (qemu asks for the backing
/// format only of an image it creates): only what the source's top layer holds is written.
#[test]
fn img_convert_n_with_backing_needs_no_format_like_qemu() {
    let env = Env::with_qemu();
    env.qemu_img(&["create", "-q", "-f", "qcow2", "base.qcow2", "4M"])
        .ok();
    env.qemu_io("qcow2", "base.qcow2", &["write -P 1 0 2M"]);
    env.qcow2_overlay("base.qcow2", "top.qcow2");
    env.qemu_io("qcow2", "top.qcow2", &["write -P 2 0 256k"]);
    for t in ["i", "q"] {
        let out = format!("{t}.qcow2");
        env.qemu_img(&["create", "-q", "-f", "qcow2", &out, "4M"])
            .ok();
        let args = [
            "convert",
            "-n",
            "-B",
            "base.qcow2",
            "-O",
            "qcow2",
            "top.qcow2",
            &out,
        ];
        if t == "i" {
            env.img(&args).ok();
        } else {
            env.qemu_img(&args).ok();
        }
    }
    env.qemu_img(&["compare", "i.qcow2", "q.qcow2"]).ok();
    let map = |f: &str| env.qemu_img(&["map", "--output=json", f]).ok().stdout;
    assert_eq!(map("i.qcow2"), map("q.qcow2"));
}
