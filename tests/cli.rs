//! The `img` command line speaks qemu-img's language: size suffixes, `-o help`, info on raw
//! files, compare's and check's exit codes, map on sparse raw files.

mod common;

use std::process::{Command, Stdio};

use common::{run_timeout, Env, DEFAULT_TIMEOUT, KIB, MIB};

/// qemu-img's size syntax: plain bytes (rounded up to a whole 512-byte sector), k/M/G/T
/// suffixes, fractions. `img create` makes files of the same virtual size.
#[test]
fn create_size_suffixes_match_qemu() {
    let env = Env::with_qemu();
    for (i, size) in [
        "512", "100", "1000000", "64k", "64K", "1M", "1.5M", "2G", "1T",
    ]
    .iter()
    .enumerate()
    {
        for fmt in ["raw", "qcow2"] {
            let ours = format!("ours{i}.{fmt}");
            let theirs = format!("theirs{i}.{fmt}");
            env.qemu_img(&["create", "-q", "-f", fmt, &theirs, size])
                .ok();
            env.img(&["create", "-q", "-f", fmt, &ours, size]).ok();
            let t = env
                .qemu_img(&["info", "--output=json", &theirs])
                .ok()
                .json();
            let o = env.qemu_img(&["info", "--output=json", &ours]).ok().json();
            assert_eq!(
                o["virtual-size"], t["virtual-size"],
                "size {size:?} as {fmt}: img made {o:#}, qemu-img made {t:#}"
            );
            assert_eq!(o["format"], fmt);
        }
    }
    // A fresh raw image of a size with a suffix is the expected length and sparse.
    assert_eq!(env.len("ours8.raw"), 1 << 40);
    assert!(env.allocated("ours8.raw") < MIB);
}

#[test]
fn create_bad_size_fails_with_message() {
    let env = Env::new();
    for size in ["1e", "-5", "12Q", "abc"] {
        let out = env
            .img(&["create", "-f", "raw", "bad.raw", size])
            .no_panic();
        assert_ne!(out.code, Some(0), "size {size:?} was accepted:{out}");
        assert!(
            !out.stderr.trim().is_empty(),
            "no message for size {size:?}:{out}"
        );
    }
}

/// `img create -f qcow2 -o help` lists the qcow2 creation options by qemu-img's names and exits
/// 0; so does `-o help` for raw.
#[test]
fn create_o_help_lists_options() {
    let env = Env::new();
    let out = env.img(&["create", "-f", "qcow2", "-o", "help"]).ok();
    for opt in [
        "size",
        "compat",
        "backing_file",
        "backing_fmt",
        "cluster_size",
        "compression_type",
        "data_file",
        "data_file_raw",
        "extended_l2",
        "lazy_refcounts",
        "preallocation",
        "refcount_bits",
    ] {
        assert!(
            out.stdout.contains(&format!("{opt}=")),
            "-o help does not list {opt}:{out}"
        );
    }
    let out = env.img(&["create", "-f", "raw", "-o", "help"]).ok();
    assert!(out.stdout.contains("size="), "{out}");
}

#[test]
fn create_unknown_option_fails_with_message() {
    let env = Env::new();
    let out = env
        .img(&[
            "create",
            "-f",
            "qcow2",
            "-o",
            "no_such_option=1",
            "x.qcow2",
            "1M",
        ])
        .no_panic();
    assert_ne!(out.code, Some(0), "{out}");
    assert!(out.stderr.contains("no_such_option"), "{out}");
}

/// `img info` on a raw file: JSON fields as qemu-img prints them (bar "children", qemu's
/// protocol-layer node, and "actual-size", which is compared loosely), and the human form's
/// first lines.
#[test]
fn info_raw_matches_qemu() {
    let env = Env::with_qemu();
    env.sparse_file("disk.raw", 4 * MIB);
    env.write_at("disk.raw", MIB, &[7; 65536]);
    let t = env
        .qemu_img(&["info", "--output=json", "disk.raw"])
        .ok()
        .json();
    let o = env.img(&["info", "--output=json", "disk.raw"]).ok().json();
    for field in [
        "virtual-size",
        "filename",
        "format",
        "dirty-flag",
        "format-specific",
    ] {
        assert_eq!(
            o.get(field),
            t.get(field),
            "{field}: img {o:#}\nqemu-img {t:#}"
        );
    }
    let (a, b) = (o["actual-size"].as_u64(), t["actual-size"].as_u64());
    assert!(
        matches!((a, b), (Some(a), Some(b)) if a.abs_diff(b) <= MIB),
        "actual-size: img {o:#}\nqemu-img {t:#}"
    );
    let human = env.img(&["info", "disk.raw"]).ok();
    let theirs = env.qemu_img(&["info", "disk.raw"]).ok();
    // image:, file format:, virtual size: lines are identical; "disk size" may be measured
    // differently.
    let head = |s: &str| s.lines().take(3).map(str::to_owned).collect::<Vec<_>>();
    assert_eq!(
        head(&human.stdout),
        head(&theirs.stdout),
        "img:{human}\nqemu-img:{theirs}"
    );
    assert!(
        human.stdout.contains("virtual size: 4 MiB (4194304 bytes)"),
        "{human}"
    );
}

#[test]
fn info_missing_file_fails_naming_it() {
    let env = Env::new();
    let out = env.img(&["info", "nonexistent.qcow2"]).no_panic();
    assert_eq!(out.code, Some(1), "qemu-img exits 1 here:{out}");
    assert!(out.stderr.contains("nonexistent.qcow2"), "{out}");
}

#[test]
fn convert_missing_source_fails_naming_it() {
    let env = Env::new();
    let out = env
        .img(&["convert", "-O", "raw", "nonexistent.qcow2", "out.raw"])
        .no_panic();
    assert_eq!(out.code, Some(1), "qemu-img exits 1 here:{out}");
    assert!(out.stderr.contains("nonexistent.qcow2"), "{out}");
}

/// compare: 0 and "Images are identical." when equal; 1 and "Content mismatch at offset N!"
/// when not (qemu-img reports the start of the first differing 512-byte sector); 2 on error.
#[test]
fn compare_exit_codes_match_qemu() {
    let env = Env::with_qemu();
    env.sparse_file("a.raw", 4 * MIB);
    env.write_at("a.raw", MIB, &[1; 4096]);
    std::fs::copy(env.path("a.raw"), env.path("b.raw")).expect("copy");
    let out = env.img(&["compare", "a.raw", "b.raw"]).code_is(0);
    assert!(out.stdout.contains("Images are identical."), "{out}");

    // Equal contents, different layout: a qcow2 copy made by qemu-img.
    env.qemu_img(&["convert", "-O", "qcow2", "a.raw", "a.qcow2"])
        .ok();
    env.img(&["compare", "a.raw", "a.qcow2"]).code_is(0);
    env.img(&["compare", "-f", "raw", "-F", "qcow2", "a.raw", "a.qcow2"])
        .code_is(0);

    env.write_at("b.raw", 3 * MIB + 1000, &[9]);
    let theirs = env.qemu_img(&["compare", "a.raw", "b.raw"]).code_is(1);
    let ours = env.img(&["compare", "a.raw", "b.raw"]).code_is(1);
    assert!(ours.stdout.contains("Content mismatch at offset"), "{ours}");
    assert_eq!(
        ours.stdout, theirs.stdout,
        "same message and offset as qemu-img"
    );

    let ours = env.img(&["compare", "a.raw", "missing.raw"]).code_is(2);
    assert!(ours.stderr.contains("missing.raw"), "{ours}");
    env.qemu_img(&["compare", "a.raw", "missing.raw"])
        .code_is(2);
}

/// Different sizes: without -s the larger image's tail must be zeros and the result is
/// "identical" (after a warning); with -s (strict) it is a mismatch, exit 1.
#[test]
fn compare_size_mismatch_matches_qemu() {
    let env = Env::with_qemu();
    env.sparse_file("a.raw", 4 * MIB);
    env.write_at("a.raw", MIB, &[1; 4096]);
    std::fs::copy(env.path("a.raw"), env.path("b.raw")).expect("copy");
    env.set_len("b.raw", 5 * MIB);
    env.qemu_img(&["compare", "a.raw", "b.raw"]).code_is(0);
    env.img(&["compare", "a.raw", "b.raw"]).code_is(0);
    env.qemu_img(&["compare", "-s", "a.raw", "b.raw"])
        .code_is(1);
    env.img(&["compare", "-s", "a.raw", "b.raw"]).code_is(1);
    env.write_at("b.raw", 5 * MIB - 1, &[1]);
    env.qemu_img(&["compare", "a.raw", "b.raw"]).code_is(1);
    env.img(&["compare", "a.raw", "b.raw"]).code_is(1);
}

/// Strict compare steps through each image as qemu's drivers answer block status: vmdk one
/// grain at a time, vdi one 1 MiB block at a time. Fully written, such an image differs from a
/// raw or qcow2 copy at offset 0 (only the copy's first answer reaches the end), from each other
/// at the start of the last vdi block, and not at all from itself.
#[test]
fn compare_strict_steps_like_qemu_block_status() {
    let env = Env::with_qemu();
    let files = ["f.raw", "f.qcow2", "f.vmdk", "f.vdi", "s.vdi"];
    for f in files {
        let (fmt, opts) = match f {
            "s.vdi" => ("vdi", "static=on"),
            _ => (f.trim_start_matches(['f', '.']), ""),
        };
        let mut args = vec!["create", "-q", "-f", fmt, f, "2M"];
        if !opts.is_empty() {
            args.extend_from_slice(&["-o", opts]);
        }
        env.qemu_img(&args).ok();
        env.qemu_io(fmt, f, &["write -P 7 0 2M"]);
    }
    for a in files {
        for b in files {
            same_output_as_qemu(&env, &["compare", "-s", a, b]);
        }
    }
}

/// check on a raw image: qemu-img says "This image format does not support checks" and exits
/// 63.
#[test]
fn check_raw_exits_63() {
    let env = Env::new();
    env.sparse_file("disk.raw", MIB);
    let out = env.img(&["check", "disk.raw"]).code_is(63);
    assert!(out.stderr.contains("does not support checks"), "{out}");
}

#[test]
fn check_fresh_qcow2_exits_0() {
    let env = Env::new();
    env.img(&["create", "-f", "qcow2", "x.qcow2", "16M"]).ok();
    env.img(&["check", "x.qcow2"]).ok();
    let json = env.img(&["check", "--output=json", "x.qcow2"]).ok().json();
    assert_eq!(json["check-errors"], 0, "{json:#}");
    assert_eq!(json["filename"], "x.qcow2", "{json:#}");
    assert_eq!(json["format"], "qcow2", "{json:#}");
}

/// map --output=json on a sparse raw file (made without qemu, so its first block is a hole):
/// exactly qemu-img's entries. Also the human form.
#[test]
fn map_sparse_raw_equals_qemu() {
    let env = Env::with_qemu();
    env.sparse_file("disk.raw", 8 * MIB);
    env.write_at("disk.raw", MIB, &[3; 4096]);
    env.write_at("disk.raw", 3 * MIB - 100, &[4; 300]);
    env.write_at("disk.raw", 8 * MIB - 4096, &[5; 4096]);
    let theirs = env
        .qemu_img(&["map", "--output=json", "disk.raw"])
        .ok()
        .json();
    let ours = env.img(&["map", "--output=json", "disk.raw"]).ok().json();
    assert_eq!(ours, theirs, "img: {ours:#}\nqemu-img: {theirs:#}");
    let theirs = env.qemu_img(&["map", "disk.raw"]).ok();
    let ours = env.img(&["map", "disk.raw"]).ok();
    assert_eq!(ours.stdout, theirs.stdout, "img:{ours}\nqemu-img:{theirs}");
}

/// A raw file whose length is not a whole number of sectors is a disk of whole sectors, its
/// tail reading as zeroes, as in qemu: info, map and what convert writes agree with qemu-img.
#[test]
fn raw_file_of_partial_sector_is_sized_in_whole_sectors() {
    let env = Env::with_qemu();
    env.write("six.raw", b"abcdef");
    for args in [
        &["info", "--output=json", "six.raw"][..],
        &["map", "--output=json", "six.raw"][..],
    ] {
        let theirs = env.qemu_img(args).ok().json();
        let ours = env.img(args).ok().json();
        assert_eq!(
            ours, theirs,
            "{args:?}\nimg: {ours:#}\nqemu-img: {theirs:#}"
        );
    }
    env.img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "qcow2",
        "six.raw",
        "six.qcow2",
    ])
    .ok();
    let info = env
        .qemu_img(&["info", "--output=json", "six.qcow2"])
        .ok()
        .json();
    assert_eq!(info["virtual-size"], 512, "{info:#}");
    env.qemu_img(&["compare", "six.raw", "six.qcow2"]).ok();
}

/// A raw file made by qemu-img create (qemu allocates its first 4 KiB block) and a fully
/// sparse one: both maps as qemu-img prints them.
#[test]
fn map_qemu_created_raw_equals_qemu() {
    let env = Env::with_qemu();
    env.qemu_img(&["create", "-f", "raw", "q.raw", "2M"]).ok();
    env.sparse_file("empty.raw", 2 * MIB);
    for f in ["q.raw", "empty.raw"] {
        let theirs = env.qemu_img(&["map", "--output=json", f]).ok().json();
        let ours = env.img(&["map", "--output=json", f]).ok().json();
        assert_eq!(ours, theirs, "{f}: img: {ours:#}\nqemu-img: {theirs:#}");
    }
}

/// qcow2 map: zero clusters, discarded clusters, unallocated ranges and merging of runs with
/// contiguous host offsets, as qemu-img prints them.
#[test]
fn map_qcow2_equals_qemu() {
    let env = Env::with_qemu();
    for opts in ["cluster_size=4k", "extended_l2=on", "compat=0.10"] {
        let name = format!("{}.qcow2", opts.replace(['=', ','], "_"));
        env.qemu_img(&["create", "-f", "qcow2", "-o", opts, &name, "4M"])
            .ok();
        env.qemu_io("qcow2", &name, common::EDITS);
        let theirs = env.qemu_img(&["map", "--output=json", &name]).ok().json();
        let ours = env.img(&["map", "--output=json", &name]).ok().json();
        assert_eq!(ours, theirs, "{name}: img: {ours:#}\nqemu-img: {theirs:#}");
    }
}

/// convert: raw to raw keeps holes (sparse output by default) and concatenates several
/// sources like qemu-img.
#[test]
fn convert_raw_sparse_and_concatenation_match_qemu() {
    let env = Env::with_qemu();
    common::patterned_raw(&env, "a.raw");
    env.sparse_file("b.raw", MIB);
    env.write_at("b.raw", 1000, &[0x3c; 5000]);
    env.img(&["convert", "-O", "raw", "a.raw", "a2.raw"]).ok();
    env.assert_same_bytes("a.raw", "a2.raw");
    assert!(
        env.allocated("a2.raw") < env.len("a2.raw") / 2,
        "raw output is not sparse"
    );
    env.qemu_img(&["convert", "-O", "raw", "a.raw", "b.raw", "cat.qemu.raw"])
        .ok();
    env.img(&["convert", "-O", "raw", "a.raw", "b.raw", "cat.img.raw"])
        .ok();
    env.assert_same_bytes("cat.img.raw", "cat.qemu.raw");
}

/// `-n` writes into an existing target; `-q` prints nothing; `-S 0` fully allocates.
#[test]
fn convert_flags_n_q_s_behave_like_qemu() {
    let env = Env::with_qemu();
    common::patterned_raw(&env, "a.raw");
    env.img(&["create", "-q", "-f", "qcow2", "t.qcow2", "4M"])
        .ok();
    let out = env
        .img(&["convert", "-q", "-n", "-O", "qcow2", "a.raw", "t.qcow2"])
        .ok();
    assert!(out.stdout.is_empty(), "-q printed:{out}");
    env.qemu_img(&["compare", "a.raw", "t.qcow2"]).ok();
    env.img(&["convert", "-S", "0", "-O", "raw", "a.raw", "full.raw"])
        .ok();
    env.assert_same_bytes("a.raw", "full.raw");
    assert!(
        env.allocated("full.raw") >= env.len("full.raw"),
        "-S 0 should allocate every block"
    );
}

/// `convert` onto its own source, or onto the source's backing file, fails on the lock as in
/// qemu-img, and leaves that file as it was: the target is emptied only once it is locked.
#[test]
fn convert_onto_its_own_source_is_refused_and_leaves_it_intact() {
    let env = Env::with_qemu();
    env.qemu_img(&["create", "-q", "-f", "qcow2", "b.qcow2", "4M"])
        .ok();
    env.qemu_io("qcow2", "b.qcow2", &["write -P 0x11 0 1M"]);
    env.qemu_img(&[
        "create", "-q", "-f", "qcow2", "-b", "b.qcow2", "-F", "qcow2", "o.qcow2",
    ])
    .ok();
    common::patterned_raw(&env, "r.raw");
    for (args, victim) in [
        (
            &["convert", "-O", "qcow2", "b.qcow2", "b.qcow2"][..],
            "b.qcow2",
        ),
        (
            &["convert", "-O", "raw", "o.qcow2", "b.qcow2"][..],
            "b.qcow2",
        ),
        (
            &["convert", "-f", "raw", "-O", "raw", "r.raw", "r.raw"][..],
            "r.raw",
        ),
    ] {
        let before = env.read(victim);
        let out = env.img(args).code_is(1);
        assert!(out.stderr.contains("Failed to get \"write\" lock"), "{out}");
        assert!(env.read(victim) == before, "{args:?} changed {victim}");
    }
    env.qemu_io("qcow2", "b.qcow2", &["read -P 0x11 0 1M"]);
}

/// -U shares the image with writers, so it is for reading only: commands that write refuse it
/// with qemu-img's words and leave the image alone.
#[test]
fn force_share_on_a_writing_command_is_refused() {
    let env = Env::with_qemu();
    env.qemu_img(&["create", "-q", "-f", "qcow2", "x.qcow2", "4M"])
        .ok();
    let before = env.read("x.qcow2");
    for args in [
        &["snapshot", "-U", "-c", "s1", "x.qcow2"][..],
        &["check", "-U", "-r", "all", "x.qcow2"][..],
    ] {
        let ours = env.img(args).code_is(1);
        let theirs = env.qemu_img(args).code_is(1);
        let msg = "Could not open 'x.qcow2': force-share=on can only be used with read-only images";
        assert!(ours.stderr.contains(msg), "{ours}");
        assert!(theirs.stderr.contains(msg), "{theirs}");
    }
    assert!(env.read("x.qcow2") == before, "x.qcow2 changed");
}

/// Option combinations qemu-img refuses are refused with its words, before anything is made.
#[test]
fn option_misuse_is_refused_as_qemu_refuses_it() {
    let env = Env::with_qemu();
    env.qemu_img(&["create", "-q", "-f", "qcow2", "b.qcow2", "1M"])
        .ok();
    env.qemu_img(&["create", "-q", "-f", "raw", "r.raw", "1M"])
        .ok();
    let cases: &[&[&str]] = &[
        &["create", "-f", "qcow2", "-F", "qcow2", "x.qcow2", "1M"],
        &[
            "convert", "-O", "qcow2", "-B", "b.qcow2", "r.raw", "x.qcow2",
        ],
        &[
            "convert",
            "-O",
            "qcow2",
            "-o",
            "backing_file=b.qcow2",
            "r.raw",
            "x.qcow2",
        ],
        &[
            "convert", "-O", "qcow2", "-B", "b.qcow2", "-F", "qcow2", "r.raw", "r.raw", "x.qcow2",
        ],
        &[
            "convert",
            "-n",
            "-O",
            "qcow2",
            "-o",
            "cluster_size=4k",
            "r.raw",
            "b.qcow2",
        ],
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4k,",
            "x.qcow2",
            "1M",
        ],
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            ",cluster_size=4k",
            "x.qcow2",
            "1M",
        ],
        &["convert", "-O", "qcow2", "-o", "", "r.raw", "x.qcow2"],
    ];
    for args in cases {
        let theirs = env.qemu_img(args).code_is(1);
        let ours = env.img(args).code_is(1);
        let words = |s: &str| {
            s.lines()
                .next()
                .unwrap_or("")
                .split_once(": ")
                .map(|x| x.1.to_owned())
                .unwrap_or_default()
        };
        assert_eq!(words(&ours.stderr), words(&theirs.stderr), "{args:?}");
        assert!(!env.path("x.qcow2").exists(), "{args:?} made x.qcow2");
    }
}

/// The file protocol's creation options (`nocow`, `extent_size_hint`; libvirt passes `nocow`)
/// are taken beside every format's own, printed and checked as qemu-img does. (Whether they
/// take effect is up to the filesystem: btrfs honours `nocow`, XFS the hint, ext4 neither.)
#[test]
fn create_takes_the_file_protocol_options_as_qemu_does() {
    let env = Env::with_qemu();
    for (fmt, extra) in [
        ("raw", ""),
        ("qcow2", ""),
        ("vmdk", "subformat=twoGbMaxExtentSparse,"),
        ("vdi", ""),
    ] {
        let o = format!("{extra}nocow=on,extent_size_hint=2M");
        let ours = format!("ours.{fmt}");
        let theirs = format!("theirs.{fmt}");
        let a = env.img(&["create", "-f", fmt, "-o", &o, &ours, "3M"]).ok();
        let b = env
            .qemu_img(&["create", "-f", fmt, "-o", &o, &theirs, "3M"])
            .ok();
        assert_eq!(a.stdout.replace("ours", "theirs"), b.stdout, "{fmt}");
        if fmt != "raw" {
            env.qemu_img(&["check", &ours]).ok();
        }
        env.qemu_img(&["compare", &ours, &theirs]).ok();
    }
    let out = env
        .img(&[
            "create",
            "-f",
            "raw",
            "-o",
            "extent_size_hint=8G",
            "x.raw",
            "1M",
        ])
        .code_is(1);
    assert!(
        out.stderr.contains("x.raw: Extent size hint is too large"),
        "{out}"
    );
    let out = env
        .img(&["create", "-f", "raw", "-o", "nocow=maybe", "x.raw", "1M"])
        .code_is(1);
    assert!(
        out.stderr
            .contains("Parameter 'nocow' expects 'on' or 'off'"),
        "{out}"
    );
}

/// Runs `args` (one file name among them) through `img` and qemu-img on the same files and
/// asserts equal exit codes, stdout and stderr (`qemu-img` read as `img`).
#[track_caller]
fn same_output_as_qemu(env: &Env, args: &[&str]) -> common::Output {
    let q = env.qemu_img(args);
    let i = env.img(args).no_panic();
    assert_eq!(q.code, i.code, "exit codes differ:{q}{i}");
    assert_eq!(q.stdout, i.stdout, "stdout differs:{q}{i}");
    assert_eq!(
        q.stderr.replace("qemu-img", "img"),
        i.stderr,
        "stderr differs:{q}{i}"
    );
    i
}

/// qemu counts fragmentation within each L2 table: with 512-byte clusters 64 KiB of data
/// spans two tables laid out one after the other, and nothing is fragmented.
#[test]
fn check_fragmentation_across_l2_tables_counts_like_qemu() {
    let env = Env::with_qemu();
    env.qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=512",
        "f.qcow2",
        "1M",
    ])
    .ok();
    env.qemu_io("qcow2", "f.qcow2", &["write -P 1 0 64k"]);
    same_output_as_qemu(&env, &["check", "--output=json", "f.qcow2"]);
    same_output_as_qemu(&env, &["check", "f.qcow2"]);
}

/// `info` counts the image file's own allocation, not its external data file's.
#[test]
fn info_actual_size_leaves_out_data_file_like_qemu() {
    let env = Env::with_qemu();
    env.qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-o",
        "data_file=d.raw",
        "x.qcow2",
        "4M",
    ])
    .ok();
    env.qemu_io("qcow2", "x.qcow2", &["write -P 1 0 2M"]);
    let q = env
        .qemu_img(&["info", "--output=json", "x.qcow2"])
        .ok()
        .json();
    let i = env.img(&["info", "--output=json", "x.qcow2"]).ok().json();
    assert_eq!(i["actual-size"], q["actual-size"]);
    let line = |s: &str| {
        s.lines()
            .find(|l| l.starts_with("disk size:"))
            .map(str::to_owned)
    };
    let q = env.qemu_img(&["info", "x.qcow2"]).ok().stdout;
    let i = env.img(&["info", "x.qcow2"]).ok().stdout;
    assert_eq!(line(&i), line(&q));
    assert!(line(&i).is_some());
}

/// `info` describes a qcow2 image whose external data file is missing (it names the file it
/// wants), alone or under an overlay; commands that read the data still fail.
#[test]
fn info_without_the_data_file_works_like_qemu() {
    let env = Env::with_qemu();
    env.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "data_file=d.data",
        "x.qcow2",
        "1M",
    ])
    .ok();
    env.qemu_io("qcow2", "x.qcow2", &["write -P 1 0 64k"]);
    env.qemu_img(&[
        "create", "-q", "-f", "qcow2", "-b", "x.qcow2", "-F", "qcow2", "o.qcow2",
    ])
    .ok();
    std::fs::remove_file(env.path("d.data")).expect("rm");
    same_output_as_qemu(&env, &["info", "x.qcow2"]).code_is(0);
    same_output_as_qemu(&env, &["info", "--output=json", "x.qcow2"]);
    same_output_as_qemu(&env, &["info", "--backing-chain", "o.qcow2"]);
    same_output_as_qemu(&env, &["map", "x.qcow2"]).code_is(1);
    same_output_as_qemu(&env, &["map", "o.qcow2"]).code_is(1);
}

/// An external data file's name is taken as written, relative to the working directory and not
/// to the image's directory (unlike a backing file): qemu-img creates `-o data_file=sub/d.data`
/// there, records `sub/d.data`, and opens it from there again.
#[test]
fn data_file_in_a_subdirectory_is_named_from_the_working_directory_like_qemu() {
    let env = Env::with_qemu();
    std::fs::create_dir(env.path("sub")).expect("mkdir");
    for (tool, name) in [("qemu-img", "q"), ("img", "i")] {
        let data = format!("data_file=sub/{name}.data");
        let file = format!("sub/{name}.qcow2");
        let args = ["create", "-q", "-f", "qcow2", "-o", &data, &file, "1M"];
        if tool == "img" {
            env.img(&args).ok();
        } else {
            env.qemu_img(&args).ok();
        }
        assert!(env.path(&format!("sub/{name}.data")).exists(), "{tool}");
        env.qemu_io("qcow2", &file, &["write -P 5 64k 64k"]);
        same_output_as_qemu(&env, &["map", "--output=json", &file]);
        same_output_as_qemu(&env, &["compare", "-f", "qcow2", &file, "sub/q.qcow2"]);
    }
}

/// A snapshot without an instruction count (icount -1) lists it as "--", in `snapshot -l` and
/// in `info`.
#[test]
fn snapshot_list_unknown_icount_prints_dashes_like_qemu() {
    let env = Env::with_qemu();
    env.qemu_img(&["create", "-f", "qcow2", "s.qcow2", "1M"])
        .ok();
    env.qemu_img(&["snapshot", "-c", "snap", "s.qcow2"]).ok();
    let mut bytes = env.read("s.qcow2");
    let table = usize::try_from(u64::from_be_bytes(bytes[64..72].try_into().unwrap())).unwrap();
    // Entry: 40 fixed bytes, then extra data (vm state size, disk size, icount).
    assert_eq!(&bytes[table + 36..table + 40], &24u32.to_be_bytes());
    bytes[table + 56..table + 64].copy_from_slice(&u64::MAX.to_be_bytes());
    env.write("s.qcow2", &bytes);
    let out = same_output_as_qemu(&env, &["snapshot", "-l", "s.qcow2"]);
    assert!(out.stdout.contains(" --\n"), "{out}");
    let q = env.qemu_img(&["info", "s.qcow2"]).ok().stdout;
    let i = env.img(&["info", "s.qcow2"]).ok().stdout;
    let list = |s: &str| {
        s[s.find("Snapshot list:").unwrap()..]
            .lines()
            .take(3)
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert_eq!(list(&i), list(&q));
}

/// A v2 target cannot hold bitmaps: qemu-img measure leaves the field out.
#[test]
fn measure_v2_target_omits_bitmaps_like_qemu() {
    let env = Env::with_qemu();
    env.qemu_img(&["create", "-f", "qcow2", "s.qcow2", "1M"])
        .ok();
    for out in ["human", "json"] {
        let o = format!("--output={out}");
        for opts in ["compat=0.10", "compat=1.1"] {
            same_output_as_qemu(&env, &["measure", &o, "-O", "qcow2", "-o", opts, "s.qcow2"]);
        }
    }
}

/// Compression and preallocation together are refused before the target is made.
#[test]
fn convert_compressed_with_preallocation_is_refused_like_qemu() {
    let env = Env::with_qemu();
    env.sparse_file("s.raw", MIB);
    for mode in ["metadata", "falloc", "full"] {
        let o = format!("preallocation={mode}");
        same_output_as_qemu(
            &env,
            &["convert", "-c", "-O", "qcow2", "-o", &o, "s.raw", "t.qcow2"],
        );
        assert!(!env.path("t.qcow2").exists());
    }
    same_output_as_qemu(
        &env,
        &[
            "convert",
            "-c",
            "-O",
            "qcow2",
            "-o",
            "preallocation=off",
            "s.raw",
            "t.qcow2",
        ],
    );
}

/// `convert -c` refuses what qemu-img refuses, in its words and at the same point: formats
/// without compression, encryption or preallocation before the target exists; a qcow2 with an
/// external data file at its first data write, flat vmdk for its missing cluster size (the
/// target made). Sparse vmdk takes -c. The same with -n onto existing targets.
#[test]
fn convert_compress_refusals_match_qemu() {
    let env = Env::with_qemu();
    env.sparse_file("r.raw", 4 * MIB);
    env.write_at("r.raw", MIB, &[7; 65536]);
    let secret = "secret,id=s0,data=pw";
    for (fmt, opts) in [
        ("vdi", ""),
        ("raw", ""),
        ("luks", "key-secret=s0"),
        ("vdi", "preallocation=metadata"),
        ("qcow2", "data_file=@.data"),
        ("qcow2", "encrypt.format=luks,encrypt.key-secret=s0"),
        ("qcow2", "encryption=on,encrypt.key-secret=s0"),
        ("qcow2", "encrypt.format=luks,preallocation=full"),
        ("qcow2", "preallocation=metadata"),
        ("qcow2", "preallocation=off"),
        ("vmdk", ""),
        ("vmdk", "subformat=twoGbMaxExtentSparse"),
        ("vmdk", "subformat=monolithicFlat"),
        ("vmdk", "subformat=twoGbMaxExtentFlat"),
    ] {
        let mut out = Vec::new();
        for t in ["q", "i"] {
            let target = format!("{t}.{fmt}");
            let o = opts.replace('@', t);
            let mut a = vec!["convert", "--object", secret, "-c", "-O", fmt];
            if !o.is_empty() {
                a.extend(["-o", &o]);
            }
            a.extend(["r.raw", &target]);
            let r = if t == "q" {
                env.qemu_img(&a)
            } else {
                env.img(&a).no_panic()
            };
            let made = env.path(&target).exists();
            out.push((r, made));
            for f in [target, format!("{t}.data")] {
                let _ = std::fs::remove_file(env.path(&f));
            }
        }
        let (q, i) = (&out[0], &out[1]);
        let what = format!("-c -O {fmt} -o {opts}");
        assert_eq!(
            i.0.code, q.0.code,
            "{what}: exit codes differ:{}{}",
            q.0, i.0
        );
        assert_eq!(
            i.0.stderr,
            q.0.stderr.replace("qemu-img", "img"),
            "{what}:{}{}",
            q.0,
            i.0
        );
        assert_eq!(i.1, q.1, "{what}: target made by one tool only");
    }
    // -n: the format given with -O decides, then the target itself.
    for t in ["q", "i"] {
        env.sparse_file(&format!("{t}n.raw"), 4 * MIB);
        env.qemu_img(&["create", "-q", "-f", "vdi", &format!("{t}n.vdi"), "4M"])
            .ok();
        let data = format!("data_file={t}n.data");
        env.qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            &data,
            &format!("{t}n.qcow2"),
            "4M",
        ])
        .ok();
        env.qemu_img(&[
            "create",
            "-q",
            "-f",
            "vmdk",
            "-o",
            "subformat=monolithicFlat",
            &format!("{t}nf.vmdk"),
            "4M",
        ])
        .ok();
        env.qemu_img(&["create", "-q", "-f", "vmdk", &format!("{t}ns.vmdk"), "4M"])
            .ok();
    }
    for (fmt, target) in [
        ("raw", "@n.raw"),
        ("vdi", "@n.vdi"),
        ("qcow2", "@n.qcow2"),
        ("vmdk", "@nf.vmdk"),
        ("vmdk", "@ns.vmdk"),
    ] {
        let (qt, it) = (target.replace('@', "q"), target.replace('@', "i"));
        let q = env.qemu_img(&["convert", "-n", "-c", "-O", fmt, "r.raw", &qt]);
        let i = env
            .img(&["convert", "-n", "-c", "-O", fmt, "r.raw", &it])
            .no_panic();
        assert_eq!(i.code, q.code, "-n {target}: exit codes differ:{q}{i}");
        assert_eq!(i.stderr, q.stderr.replace("qemu-img", "img"), "{q}{i}");
    }
    env.qemu_img(&["compare", "r.raw", "ins.vmdk"]).ok();
}

/// An option given twice takes its last value, as in qemu-img (getopt): `-f qcow2 -f raw`,
/// `-U -U`, `-O raw -O qcow2`, `-S 0 -S 4k`, `--output=json --output=human`.
#[test]
fn repeated_options_last_value_wins_like_qemu() {
    let env = Env::with_qemu();
    env.sparse_file("x.raw", MIB);
    env.write_at("x.raw", 4096, &[1; 4096]);
    for tool in ["img", "qemu-img"] {
        let run = |args: &[&str]| {
            if tool == "img" {
                env.img(args)
            } else {
                env.qemu_img(args)
            }
        };
        let info = run(&["info", "-f", "qcow2", "-f", "raw", "--output=json", "x.raw"])
            .ok()
            .json();
        assert_eq!(info["format"], "raw", "{tool}: {info:#}");
        let human = run(&[
            "info",
            "-U",
            "-U",
            "--output=json",
            "--output=human",
            "x.raw",
        ])
        .ok();
        assert!(human.stdout.starts_with("image: x.raw\n"), "{tool}:{human}");
        let out = format!("{tool}.out");
        run(&[
            "convert", "-O", "raw", "-O", "qcow2", "-S", "0", "-S", "4k", "x.raw", &out,
        ])
        .ok();
        let info = env.qemu_img(&["info", "--output=json", &out]).ok().json();
        assert_eq!(info["format"], "qcow2", "{tool}: {info:#}");
        env.qemu_img(&["compare", "x.raw", &out]).ok();
    }
}

/// One step of [`long_options_of_qemu_img_10_work`]: what `img` runs, what qemu-img runs
/// beside it (the same, or short options where qemu-img 10.0 documents a long spelling its
/// parser does not take yet), and whether their stdout must be equal.
struct Step<'a> {
    img: &'a [&'a str],
    qemu: Option<&'a [&'a str]>,
    same_stdout: bool,
}

const fn both<'a>(args: &'a [&'a str], same_stdout: bool) -> Step<'a> {
    Step {
        img: args,
        qemu: None,
        same_stdout,
    }
}

const fn img_only<'a>(args: &'a [&'a str], short: &'a [&'a str]) -> Step<'a> {
    Step {
        img: args,
        qemu: Some(short),
        same_stdout: false,
    }
}

/// qemu-img 10's long option names, as its per-command `--help` documents them and as its
/// parser takes them (`--output-format`, `--left-format`...), in every subcommand: `img` runs
/// a lifecycle with them in one directory, qemu-img the same in another, and the exit codes,
/// outputs and resulting images agree.
#[test]
fn long_options_of_qemu_img_10_work() {
    let envs = [Env::with_qemu(), Env::with_qemu()];
    for env in &envs {
        env.qemu_img(&["create", "-q", "-f", "qcow2", "base.qcow2", "4M"])
            .ok();
        env.qemu_io("qcow2", "base.qcow2", &["write -P 1 0 64k"]);
        env.qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "ov.qcow2",
        ])
        .ok();
        env.qemu_io("qcow2", "ov.qcow2", &["write -P 2 1M 64k"]);
        env.sparse_file("x.raw", MIB);
        env.write_at("x.raw", 4096, &[3; 4096]);
    }
    let steps = [
        both(
            &[
                "create",
                "--quiet",
                "--format=qcow2",
                "--options=cluster_size=4k",
                "--backing=base.qcow2",
                "--backing-format=qcow2",
                "new.qcow2",
            ],
            true,
        ),
        both(
            &[
                "create",
                "--quiet",
                "--format",
                "qcow2",
                "--backing-unsafe",
                "--backing",
                "missing.qcow2",
                "--backing-format",
                "qcow2",
                "unsafe.qcow2",
                "1M",
            ],
            true,
        ),
        both(
            &[
                "info",
                "--format=qcow2",
                "--backing-chain",
                "--force-share",
                "new.qcow2",
            ],
            false,
        ),
        both(&["info", "-b", "new.qcow2"], false),
        both(
            &["map", "--format=qcow2", "--output=json", "ov.qcow2"],
            true,
        ),
        both(&["check", "--format=qcow2", "--quiet", "ov.qcow2"], true),
        both(&["check", "--repair=leaks", "ov.qcow2"], true),
        both(
            &[
                "compare",
                "--a-format=qcow2",
                "--b-format=raw",
                "--strict",
                "--quiet",
                "--progress",
                "--force-share",
                "ov.qcow2",
                "x.raw",
            ],
            true,
        ),
        both(
            &[
                "compare",
                "--left-format=qcow2",
                "--right-format=qcow2",
                "ov.qcow2",
                "ov.qcow2",
            ],
            true,
        ),
        img_only(
            &[
                "convert",
                "--quiet",
                "--progress",
                "--source-format=qcow2",
                "--target-format=qcow2",
                "--target-options=cluster_size=8k",
                "--sparse-size=8k",
                "--parallel=2",
                "--target-cache=unsafe",
                "--source-cache=writeback",
                "--oob-writes",
                "--force-share",
                "ov.qcow2",
                "c1.qcow2",
            ],
            &[
                "convert",
                "-q",
                "-p",
                "-f",
                "qcow2",
                "-O",
                "qcow2",
                "-o",
                "cluster_size=8k",
                "-S",
                "8k",
                "-m",
                "2",
                "-t",
                "unsafe",
                "-T",
                "writeback",
                "-W",
                "-U",
                "ov.qcow2",
                "c1.qcow2",
            ],
        ),
        both(
            &[
                "convert",
                "--output-format=qcow2",
                "--options=cluster_size=8k",
                "--output-cache=unsafe",
                "ov.qcow2",
                "c2.qcow2",
            ],
            true,
        ),
        img_only(
            &[
                "convert",
                "--no-create",
                "--target-format=qcow2",
                "x.raw",
                "c2.qcow2",
            ],
            &["convert", "-n", "-O", "qcow2", "x.raw", "c2.qcow2"],
        ),
        img_only(
            &[
                "convert",
                "--compress",
                "--target-format=qcow2",
                "ov.qcow2",
                "c5.qcow2",
            ],
            &["convert", "-c", "-O", "qcow2", "ov.qcow2", "c5.qcow2"],
        ),
        both(
            &[
                "convert",
                "--output-format=qcow2",
                "--backing=base.qcow2",
                "--backing-format=qcow2",
                "ov.qcow2",
                "c3.qcow2",
            ],
            true,
        ),
        both(
            &[
                "convert",
                "--source-image-opts",
                "driver=qcow2,file.filename=ov.qcow2",
                "c4.raw",
            ],
            true,
        ),
        img_only(
            &[
                "snapshot",
                "--quiet",
                "--format=qcow2",
                "--create=s1",
                "ov.qcow2",
            ],
            &["snapshot", "-q", "-f", "qcow2", "-c", "s1", "ov.qcow2"],
        ),
        img_only(
            &["snapshot", "--create", "s2", "ov.qcow2"],
            &["snapshot", "-c", "s2", "ov.qcow2"],
        ),
        both(&["snapshot", "--list", "--force-share", "ov.qcow2"], false),
        both(&["convert", "--snapshot=s1", "ov.qcow2", "snap1.raw"], true),
        img_only(
            &[
                "convert",
                "--source-snapshot=snapshot.name=s2",
                "ov.qcow2",
                "snap2.raw",
            ],
            &["convert", "-l", "snapshot.name=s2", "ov.qcow2", "snap2.raw"],
        ),
        both(
            &[
                "measure",
                "--format=qcow2",
                "--snapshot=s1",
                "--target-format=raw",
                "ov.qcow2",
            ],
            true,
        ),
        img_only(
            &["snapshot", "--apply=s1", "ov.qcow2"],
            &["snapshot", "-a", "s1", "ov.qcow2"],
        ),
        img_only(
            &["snapshot", "--delete", "s1", "ov.qcow2"],
            &["snapshot", "-d", "s1", "ov.qcow2"],
        ),
        both(&["resize", "--format=raw", "--quiet", "x.raw", "2M"], true),
        both(
            &[
                "rebase",
                "--format=qcow2",
                "--cache=writeback",
                "--backing-cache=writeback",
                "--backing-unsafe",
                "--backing=x.raw",
                "--backing-format=raw",
                "--quiet",
                "--force-share",
                "--progress",
                "unsafe.qcow2",
            ],
            true,
        ),
        both(
            &[
                "amend",
                "--format=qcow2",
                "--cache=writeback",
                "--options=lazy_refcounts=on",
                "--quiet",
                "--progress",
                "new.qcow2",
            ],
            true,
        ),
        both(
            &[
                "commit",
                "--format=qcow2",
                "--cache=writeback",
                "--drop",
                "--quiet",
                "new.qcow2",
            ],
            true,
        ),
        both(
            &[
                "commit",
                "--progress",
                "--base=base.qcow2",
                "-q",
                "new.qcow2",
            ],
            true,
        ),
        both(
            &[
                "measure",
                "--target-format=qcow2",
                "--options=cluster_size=64k",
                "--size=1G",
                "--output=json",
            ],
            true,
        ),
        img_only(&["measure", "-s", "1G"], &["measure", "--size", "1G"]),
    ];
    for step in &steps {
        let ours = envs[0].img(step.img).no_panic();
        let theirs = envs[1].qemu_img(step.qemu.unwrap_or(step.img));
        assert_eq!(ours.code, theirs.code, "img:{ours}\nqemu-img:{theirs}");
        if step.same_stdout {
            assert_eq!(ours.stdout, theirs.stdout, "img:{ours}\nqemu-img:{theirs}");
        }
    }
    for f in [
        "base.qcow2",
        "ov.qcow2",
        "x.raw",
        "c1.qcow2",
        "c2.qcow2",
        "c3.qcow2",
        "c4.raw",
        "c5.qcow2",
        "snap1.raw",
        "snap2.raw",
        "unsafe.qcow2",
    ] {
        let (a, b) = (envs[0].path(f), envs[1].path(f));
        let (a, b) = (
            a.to_str().expect("utf-8 path"),
            b.to_str().expect("utf-8 path"),
        );
        envs[0].qemu_img(&["compare", "-U", a, b]).ok();
    }
    let a = envs[0]
        .qemu_img(&["info", "--output=json", "c1.qcow2"])
        .ok()
        .json();
    assert_eq!(a["cluster-size"], 8192, "{a:#}");
}

/// Long options may be abbreviated to any prefix that names one option, as getopt_long lets
/// qemu-img's be; an ambiguous prefix fails in both.
#[test]
fn abbreviated_long_options_work_like_qemu() {
    let env = Env::with_qemu();
    env.sparse_file("x.raw", MIB);
    env.write_at("x.raw", 0, &[1; 4096]);
    for args in [
        &["info", "--out=json", "x.raw"][..],
        &["info", "--back", "--form=raw", "--out", "json", "x.raw"],
        &["map", "--out=json", "--form", "raw", "x.raw"],
        &["measure", "--si=1G", "--target-f=qcow2", "--out=json"],
    ] {
        let ours = env.img(args).ok();
        let theirs = env.qemu_img(args).ok();
        let (o, t) = (ours.json(), theirs.json());
        if args[0] == "info" {
            assert_eq!(o["format"], t["format"], "img:{ours}\nqemu-img:{theirs}");
            assert_eq!(
                o["virtual-size"], t["virtual-size"],
                "img:{ours}\nqemu-img:{theirs}"
            );
        } else {
            assert_eq!(o, t, "img:{ours}\nqemu-img:{theirs}");
        }
    }
    for args in [
        &["info", "--fo=raw", "x.raw"][..],
        &["map", "--o=json", "x.raw"],
    ] {
        let ours = env.img(args).no_panic();
        let theirs = env.qemu_img(args);
        assert_eq!(ours.code, Some(1), "{ours}");
        assert_eq!(ours.code, theirs.code, "img:{ours}\nqemu-img:{theirs}");
    }
}

/// Sizes in qemu's syntax (`qemu_strtosz`): hex without fraction or suffix, decimal fractions
/// with a unit, blanks and `+` in front; and its two messages for text that is not a size and
/// for one out of range. create, resize, measure and convert -S agree with qemu-img.
#[test]
fn sizes_in_qemu_syntax_match_qemu() {
    let env = Env::with_qemu();
    for (i, size) in [
        "0x100000",
        "0X10",
        "0x1b",
        " +1M",
        "1.",
        "1.k",
        ".5M",
        "12.345M",
        "1.0009765625k",
        "0x1E",
        "1k",
        "abc",
        "1.5",
        "0x20M",
        "0x1.8",
        "-1",
        "-2M",
        "99E",
        "1e3",
        "",
    ]
    .iter()
    .enumerate()
    {
        let ours = format!("ours{i}.qcow2");
        let theirs = format!("theirs{i}.qcow2");
        let o = env
            .img(&["create", "-q", "-f", "qcow2", &ours, "--", size])
            .no_panic();
        let t = env.qemu_img(&["create", "-q", "-f", "qcow2", &theirs, "--", size]);
        assert_eq!(o.code, t.code, "size {size:?}: img:{o}\nqemu-img:{t}");
        assert_eq!(
            o.stderr
                .replacen("img:", "qemu-img:", 1)
                .replace(&ours, &theirs),
            t.stderr,
            "size {size:?}"
        );
        if t.code == Some(0) {
            let a = env.qemu_img(&["info", "--output=json", &ours]).ok().json();
            let b = env
                .qemu_img(&["info", "--output=json", &theirs])
                .ok()
                .json();
            assert_eq!(a["virtual-size"], b["virtual-size"], "size {size:?}");
        }
    }
    env.sparse_file("o.raw", MIB);
    env.sparse_file("t.raw", MIB);
    for args in [
        &["resize", "-f", "raw", "R", "0x200000"][..],
        &["resize", "-f", "raw", "R", "+0x100000"],
        &["resize", "-f", "raw", "R", "99E"],
        &["resize", "-f", "raw", "R", "0x"],
        &["measure", "--size", "0x100000", "-O", "qcow2"],
        &["measure", "--size", "99E"],
        &["convert", "-S", "0x1000", "-O", "raw", "R", "s.raw"],
        &["convert", "-S", "abc", "-O", "raw", "R", "s.raw"],
        &["convert", "-S", "99E", "-O", "raw", "R", "s.raw"],
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=0x1000,size=0x100000",
            "c.qcow2",
        ],
        &["create", "-f", "qcow2", "-o", "size=12x", "c.qcow2"],
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=99E",
            "c.qcow2",
            "1M",
        ],
    ] {
        // Each tool resizes its own file.
        let with = |name: &'static str| -> Vec<&str> {
            args.iter()
                .map(|a| if *a == "R" { name } else { a })
                .collect()
        };
        let o = env.img(&with("o.raw")).no_panic();
        let t = env.qemu_img(&with("t.raw"));
        assert_eq!(o.code, t.code, "img:{o}\nqemu-img:{t}");
        assert_eq!(
            o.stderr.replacen("img:", "qemu-img:", 1),
            t.stderr,
            "img:{o}\nqemu-img:{t}"
        );
        if args[0] == "resize" || args[0] == "measure" {
            assert_eq!(o.stdout, t.stdout, "img:{o}\nqemu-img:{t}");
        }
    }
    assert_eq!(env.len("o.raw"), 3 * MIB);
    assert_eq!(env.len("t.raw"), 3 * MIB);
}

/// Runs `program args` in `env` with stdout going to `stdout` (nothing read back) and returns
/// the exit code and stderr.
fn run_to(env: &Env, program: &str, args: &[&str], stdout: Stdio) -> (Option<i32>, String) {
    let out = Command::new(program)
        .args(args)
        .current_dir(env.dir.path())
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(Stdio::piped())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Commands that print, over images of every kind they take.
fn printing_commands(env: &Env) -> Vec<Vec<&'static str>> {
    env.img(&["create", "-q", "-f", "qcow2", "q.qcow2", "1M"])
        .ok();
    env.img(&["snapshot", "-c", "s1", "q.qcow2"]).ok();
    // Long enough (6400 lines) to fill a pipe that nobody reads.
    env.sparse_file("holes.raw", 400 * MIB);
    for i in 0..6400 {
        env.write_at("holes.raw", i * 64 * KIB, &[1; 512]);
    }
    [
        &["info", "q.qcow2"][..],
        &["info", "--output=json", "q.qcow2"],
        &["check", "q.qcow2"],
        &["check", "--output=json", "q.qcow2"],
        &["snapshot", "-l", "q.qcow2"],
        &["measure", "--size", "1G"],
        &["compare", "q.qcow2", "q.qcow2"],
        &["map", "holes.raw"],
        &["map", "--output=json", "holes.raw"],
        &["create", "-f", "raw", "new.raw", "1M"],
    ]
    .iter()
    .map(|a| a.to_vec())
    .collect()
}

/// A full stdout (`> /dev/full`) is one clear line on stderr and exit status 1, never a panic.
/// (qemu-img ignores the error and exits 0; img does not let a script take lost output for
/// complete output.)
#[test]
fn stdout_write_error_fails_with_one_line() {
    let env = Env::new();
    for args in printing_commands(&env) {
        let full = std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/full")
            .expect("open /dev/full");
        let (code, stderr) = run_to(&env, common::IMG, &args, Stdio::from(full));
        assert_eq!(code, Some(1), "{args:?}: {stderr}");
        assert_eq!(
            stderr, "img: error writing to stdout: No space left on device\n",
            "{args:?}"
        );
    }
}

/// A reader that goes away (`img map x | head -1`, `| true`) ends the output quietly: exit
/// status 0 and nothing on stderr, as with qemu-img, which matters under `set -o pipefail`.
#[test]
fn stdout_reader_gone_exits_0_like_qemu() {
    let env = Env::with_qemu();
    for args in printing_commands(&env) {
        for program in [common::IMG, "qemu-img"] {
            // The read end is closed before the command starts: every write meets a broken pipe.
            let mut child = Command::new(program)
                .args(&args)
                .current_dir(env.dir.path())
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn");
            drop(child.stdout.take());
            let out = child.wait_with_output().expect("wait");
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(0), "{program} {args:?}: {stderr}");
            assert_eq!(stderr, "", "{program} {args:?}");
        }
        // Each tool created it once.
        let _ = std::fs::remove_file(env.path("new.raw"));
    }
    // The same through a shell pipeline, reading one line.
    let script = format!("set -o pipefail; '{}' map holes.raw | head -1", common::IMG);
    let out = run_timeout(env.dir.path(), "bash", &["-c", &script], DEFAULT_TIMEOUT);
    assert_eq!(out.code, Some(0), "{out}");
    assert_eq!(
        out.stdout,
        "Offset          Length          Mapped to       File\n"
    );
    assert_eq!(out.stderr, "", "{out}");
}

/// map --start-offset/-s and --max-length/-l restrict the map to a range, in both output
/// formats, exactly as qemu-img prints it: unaligned ends, a range past the end (one empty
/// entry at the start offset), a zero length; and qemu's messages for bad values.
#[test]
fn map_start_offset_and_max_length_match_qemu() {
    let env = Env::with_qemu();
    env.sparse_file("disk.raw", 8 * MIB);
    env.write_at("disk.raw", MIB, &[3; 65536]);
    env.write_at("disk.raw", 3 * MIB - 100, &[4; 300]);
    env.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4k",
        "q.qcow2",
        "4M",
    ])
    .ok();
    env.qemu_io("qcow2", "q.qcow2", common::EDITS);
    for file in ["disk.raw", "q.qcow2"] {
        for range in [
            &["--start-offset=1M"][..],
            &["--max-length=1M"],
            &["-s", "1000", "-l", "100000"],
            &["-s", "1048576", "-l", "4096"],
            &["--start-offset", "0x2ff000", "--max-length", "0x2000"],
            &["-s", "65000", "-l", "140000"],
            &["-s", "100M"],
            &["-l", "0"],
            &["-s", "9223372036854775807", "-l", "9223372036854775807"],
        ] {
            for output in ["--output=json", "--output=human"] {
                let mut args = vec!["map", output];
                args.extend_from_slice(range);
                args.push(file);
                let ours = env.img(&args).ok();
                let theirs = env.qemu_img(&args).ok();
                assert_eq!(ours.stdout, theirs.stdout, "img:{ours}\nqemu-img:{theirs}");
            }
        }
    }
    for bad in [
        &["-s", "abc"][..],
        &["-s", "-1"],
        &["-l", "-1"],
        &["--max-length=99E"],
    ] {
        let mut args = vec!["map"];
        args.extend_from_slice(bad);
        args.push("disk.raw");
        let ours = env.img(&args).code_is(1);
        let theirs = env.qemu_img(&args).code_is(1);
        assert_eq!(
            ours.stderr.replacen("img:", "qemu-img:", 1),
            theirs.stderr,
            "img:{ours}\nqemu-img:{theirs}"
        );
    }
}

/// check -T and compare -T (--cache) take the source cache modes, validated as qemu-img does
/// (same message, same status: 1 for check, 2 for compare); `none` and `directsync` read
/// around the page cache and give the same results.
#[test]
fn check_and_compare_take_source_cache_like_qemu() {
    let env = Env::with_qemu();
    env.qemu_img(&["create", "-q", "-f", "qcow2", "q.qcow2", "4M"])
        .ok();
    env.qemu_io("qcow2", "q.qcow2", common::EDITS);
    env.qemu_img(&["convert", "-O", "raw", "q.qcow2", "q.raw"])
        .ok();
    env.write_at("q.raw", 3 * MIB + 7, &[0x99]);
    for mode in [
        "none",
        "writeback",
        "writethrough",
        "directsync",
        "unsafe",
        "bogus",
        "",
    ] {
        for args in [
            &["check", "-T", mode, "q.qcow2"][..],
            &["check", "--cache", mode, "--output=json", "q.qcow2"],
            &["compare", "-T", mode, "q.qcow2", "q.qcow2"],
            &["compare", "--cache", mode, "q.qcow2", "q.raw"],
        ] {
            let ours = env.img(args).no_panic();
            let theirs = env.qemu_img(args);
            assert_eq!(ours.code, theirs.code, "img:{ours}\nqemu-img:{theirs}");
            assert_eq!(ours.stdout, theirs.stdout, "img:{ours}\nqemu-img:{theirs}");
            assert_eq!(
                ours.stderr.replacen("img:", "qemu-img:", 1),
                theirs.stderr,
                "img:{ours}\nqemu-img:{theirs}"
            );
        }
    }
}

/// Bytes of `name` in the page cache, by util-linux's fincore.
fn cached_bytes(env: &Env, name: &str) -> u64 {
    let out = common::run_timeout(
        env.dir.path(),
        "fincore",
        &["--bytes", "--noheadings", "--output", "RES", name],
        common::DEFAULT_TIMEOUT,
    )
    .ok();
    out.stdout
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("fincore's answer: {out}"))
}

/// convert's target goes around the page cache unless `-t` names a cached mode or the output
/// is compressed: a default convert leaves (almost) nothing of its output in the cache, while
/// `-t writeback` and `-c` leave all of it there. Every output holds the source's data.
#[test]
fn convert_writes_around_the_page_cache_unless_compressing_or_told() {
    let env = Env::with_qemu();
    let probe = common::run_timeout(
        env.dir.path(),
        "dd",
        &[
            "if=/dev/zero",
            "of=probe",
            "bs=4096",
            "count=1",
            "oflag=direct",
        ],
        common::DEFAULT_TIMEOUT,
    );
    if probe.code != Some(0) {
        eprintln!(
            "NOT TESTED: the test directory's filesystem refuses O_DIRECT ({probe}); every \
             convert goes through the page cache there"
        );
        return;
    }
    let data = 8 * MIB;
    let mut src = common::noise(7, (data / 2) as usize);
    src.extend((0..data / 2).map(|i| (i % 251) as u8));
    env.write("src.raw", &src);
    for (args, cached) in [
        (&["-O", "qcow2"][..], false),
        (&["-O", "raw"], false),
        (&["-O", "vmdk"], false),
        // Its blocks lie 512 bytes off page boundaries: only their edges are cached.
        (&["-O", "vdi"], false),
        (&["-O", "qcow2", "-t", "none"], false),
        (&["-O", "qcow2", "-t", "writeback"], true),
        (&["-O", "raw", "-t", "unsafe"], true),
        (&["-O", "qcow2", "-c"], true),
        (&["-O", "vmdk", "-o", "subformat=streamOptimized"], true),
    ] {
        let out = "out.img";
        let _ = std::fs::remove_file(env.path(out));
        let mut cmd = vec!["convert", "-f", "raw"];
        cmd.extend_from_slice(args);
        cmd.extend(["src.raw", out]);
        env.img(&cmd).ok();
        let res = cached_bytes(&env, out);
        let stored = env.allocated(out);
        if cached {
            assert!(
                res >= stored * 3 / 4,
                "{cmd:?}: {res} of {stored} bytes cached"
            );
        } else {
            assert!(res < data / 16, "{cmd:?}: {res} of {stored} bytes cached");
        }
        env.qemu_img(&["compare", "-q", "-f", "raw", "src.raw", out])
            .ok();
    }
}

/// convert --target-is-zero: with -n, zeroes in the source are not written (the target is
/// taken to read as zeroes), unless -S 0 asks for everything; the target's bytes are what
/// qemu-img leaves. Without -n, with -B, or with other faults, qemu-img's messages in its
/// order.
#[test]
fn convert_target_is_zero_matches_qemu() {
    let env = Env::with_qemu();
    env.sparse_file("src.raw", MIB);
    env.write_at("src.raw", 4096, &[0x11; 4096]);
    env.write_at("src.raw", 512 * KIB, &[0x22; 65536]);
    env.qemu_img(&["create", "-q", "-f", "qcow2", "base.qcow2", "1M"])
        .ok();
    for (fmt, sparse) in [("raw", "4k"), ("raw", "0"), ("qcow2", "4k")] {
        for tool in ["img", "qemu"] {
            // A target full of 0xff, which --target-is-zero claims is zero.
            let t = format!("{tool}-{fmt}-{sparse}.{fmt}");
            env.write("ff.raw", &[0xff; 1 << 20]);
            env.qemu_img(&["convert", "-f", "raw", "-O", fmt, "ff.raw", &t])
                .ok();
            let args = [
                "convert",
                "-n",
                "--target-is-zero",
                "-S",
                sparse,
                "-f",
                "raw",
                "-O",
                fmt,
                "src.raw",
                &t,
            ];
            if tool == "img" {
                env.img(&args).ok();
            } else {
                env.qemu_img(&args).ok();
            }
        }
        let (a, b) = (
            format!("img-{fmt}-{sparse}.{fmt}"),
            format!("qemu-{fmt}-{sparse}.{fmt}"),
        );
        env.qemu_img(&["compare", &a, &b]).ok();
        // Where the source is zero the old 0xff stays, unless -S 0 wrote the zeroes.
        env.qemu_img(&["convert", "-O", "raw", &a, "check.raw"])
            .ok();
        let expect = if sparse == "0" { 0 } else { 0xff };
        assert_eq!(env.read("check.raw")[0], expect, "{a}");
    }
    for args in [
        &["convert", "--target-is-zero", "src.raw", "t.raw"][..],
        &["convert", "--target-is-zero"],
        &["convert", "--target-is-zero", "-O", "qcow2", "-o", "help"],
        &[
            "convert",
            "--target-is-zero",
            "-c",
            "-C",
            "src.raw",
            "t.raw",
        ],
        &[
            "convert",
            "--target-image-opts",
            "--target-is-zero",
            "src.raw",
            "t.raw",
        ],
        &["convert", "--target-is-zero", "-n"],
        &[
            "convert",
            "-n",
            "--target-is-zero",
            "-O",
            "qcow2",
            "missing.raw",
            "t.qcow2",
        ],
        &["convert", "-n", "-o", "help", "-O", "qcow2"],
        &[
            "convert",
            "-n",
            "-o",
            "cluster_size=4k",
            "--target-image-opts",
            "a",
            "b",
        ],
        &[
            "convert",
            "-c",
            "-o",
            "preallocation=full",
            "-O",
            "qcow2",
            "missing.raw",
            "t.qcow2",
        ],
        &[
            "convert",
            "-c",
            "-o",
            "preallocation=full",
            "-O",
            "qcow2",
            "-B",
            "base.qcow2",
            "src.raw",
            "t.qcow2",
        ],
    ] {
        let ours = env.img(args).code_is(1);
        let theirs = env.qemu_img(args).code_is(1);
        assert_eq!(
            ours.stderr.replacen("img:", "qemu-img:", 1),
            theirs.stderr,
            "img:{ours}\nqemu-img:{theirs}"
        );
    }
    // With a backing file: qemu-img's message, but a failure (qemu-img exits 0 there, having
    // written nothing).
    env.qemu_img(&["create", "-q", "-f", "qcow2", "t.qcow2", "1M"])
        .ok();
    let args = [
        "convert",
        "-n",
        "--target-is-zero",
        "-B",
        "base.qcow2",
        "-O",
        "qcow2",
        "src.raw",
        "t.qcow2",
    ];
    let ours = env.img(&args).code_is(1);
    let theirs = env.qemu_img(&args);
    assert_eq!(
        ours.stderr.replacen("img:", "qemu-img:", 1),
        theirs.stderr,
        "img:{ours}\nqemu-img:{theirs}"
    );
}

/// convert -r and commit -r (--rate) cap the bytes written per second, as qemu-img's rate
/// limit does: 2 MiB of data in a 64 MiB image at 1 MiB/s take about two seconds (holes and
/// ranges left unallocated cost nothing) and give the same image; bad rates get qemu-img's
/// messages.
#[test]
fn convert_and_commit_rate_limit_like_qemu() {
    let env = Env::with_qemu();
    env.sparse_file("src.raw", 64 * MIB);
    env.write_at("src.raw", 10 * MIB, &common::noise(1, 2 << 20));
    let timed = |args: &[&str]| {
        let t = std::time::Instant::now();
        env.img(args).ok();
        t.elapsed()
    };
    let took = timed(&["convert", "-r", "1M", "-O", "qcow2", "src.raw", "out.qcow2"]);
    assert!(took.as_secs_f64() > 1.5, "convert -r 1M took {took:?}");
    assert!(took.as_secs_f64() < 30.0, "convert -r 1M took {took:?}");
    env.qemu_img(&["compare", "src.raw", "out.qcow2"]).ok();
    timed(&["convert", "--rate=0", "-O", "raw", "src.raw", "fast.raw"]);
    env.assert_same_bytes("src.raw", "fast.raw");

    env.qemu_img(&["create", "-q", "-f", "qcow2", "base.qcow2", "64M"])
        .ok();
    env.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        "top.qcow2",
    ])
    .ok();
    env.qemu_io("qcow2", "top.qcow2", &["write -P 7 20M 2M"]);
    env.qemu_img(&["convert", "-O", "raw", "top.qcow2", "want.raw"])
        .ok();
    let took = timed(&["commit", "-q", "-r", "1M", "top.qcow2"]);
    assert!(took.as_secs_f64() > 1.5, "commit -r 1M took {took:?}");
    assert!(took.as_secs_f64() < 30.0, "commit -r 1M took {took:?}");
    env.qemu_img(&["compare", "want.raw", "base.qcow2"]).ok();

    for rate in ["abc", "-1", "99E", "1.5"] {
        for args in [
            &["convert", "-r", rate, "src.raw", "x.raw"][..],
            &["commit", "-r", rate, "top.qcow2"],
        ] {
            let ours = env.img(args).code_is(1);
            let theirs = env.qemu_img(args).code_is(1);
            assert_eq!(
                ours.stderr.replacen("img:", "qemu-img:", 1),
                theirs.stderr,
                "img:{ours}\nqemu-img:{theirs}"
            );
        }
    }
}

/// rebase -c (--compress) stores the clusters a safe rebase copies compressed, as qemu-img
/// does: the same contents and the same map (compressed where the data shrinks, plain where it
/// does not); a format without compressed clusters is refused first, even with -u.
#[test]
fn rebase_compress_matches_qemu() {
    let env = Env::with_qemu();
    // A base with compressible data and, at 2M, data that does not shrink.
    env.sparse_file("noise.raw", 4 * MIB);
    env.write_at("noise.raw", 2 * MIB, &common::noise(5, 128 * 1024));
    env.qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "qcow2",
        "noise.raw",
        "base.qcow2",
    ])
    .ok();
    env.qemu_io(
        "qcow2",
        "base.qcow2",
        &["write -P 1 0 1M", "write -P 2 3M 64k"],
    );
    env.qemu_img(&["create", "-q", "-f", "qcow2", "new.qcow2", "4M"])
        .ok();
    env.qemu_io("qcow2", "new.qcow2", &["write -P 1 0 512k"]);
    let mut maps = Vec::new();
    for tool in ["img", "qemu"] {
        for (name, backing) in [("top", "new.qcow2"), ("flat", "")] {
            let f = format!("{tool}-{name}.qcow2");
            env.qemu_img(&[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-b",
                "base.qcow2",
                "-F",
                "qcow2",
                &f,
            ])
            .ok();
            env.qemu_io("qcow2", &f, &["write -P 9 1536k 64k"]);
            env.qemu_img(&["convert", "-O", "raw", &f, &format!("{f}.want.raw")])
                .ok();
            let args = ["rebase", "-c", "-b", backing, "-F", "qcow2", &f];
            let args = if backing.is_empty() {
                vec!["rebase", "--compress", "-b", "", &f]
            } else {
                args.to_vec()
            };
            if tool == "img" {
                env.img(&args).ok();
            } else {
                env.qemu_img(&args).ok();
            }
            env.qemu_img(&["compare", &format!("{f}.want.raw"), &f])
                .ok();
            env.qemu_img(&["check", &f]).ok();
            // Where the clusters landed in the file may differ: compare the guest's view,
            // runs of equal kind merged.
            let map = env.qemu_img(&["map", "--output=json", &f]).ok().json();
            let mut runs: Vec<serde_json::Value> = Vec::new();
            for mut e in map.as_array().expect("array").iter().cloned() {
                let o = e.as_object_mut().expect("entry");
                o.remove("offset");
                let len = o.remove("length").and_then(|l| l.as_u64()).expect("length");
                o.remove("start");
                match runs.last_mut() {
                    Some(last) if last["kind"] == e => {
                        let total = last["length"].as_u64().expect("length") + len;
                        last["length"] = total.into();
                    }
                    _ => runs.push(serde_json::json!({"kind": e, "length": len})),
                }
            }
            maps.push(serde_json::Value::Array(runs));
        }
    }
    assert_eq!(
        maps[0], maps[2],
        "img: {:#}\nqemu-img: {:#}",
        maps[0], maps[2]
    );
    assert_eq!(
        maps[1], maps[3],
        "img: {:#}\nqemu-img: {:#}",
        maps[1], maps[3]
    );
    assert!(
        maps[1].to_string().contains("\"compressed\":true"),
        "{:#}",
        maps[1]
    );

    env.sparse_file("r.raw", MIB);
    for args in [
        &["rebase", "-c", "-f", "raw", "-b", "", "r.raw"][..],
        &["rebase", "-c", "-u", "-f", "raw", "-b", "", "r.raw"],
        &[
            "rebase",
            "-c",
            "-f",
            "raw",
            "-b",
            "missing.qcow2",
            "-F",
            "qcow2",
            "r.raw",
        ],
    ] {
        let ours = env.img(args).code_is(1);
        let theirs = env.qemu_img(args).code_is(1);
        assert_eq!(
            ours.stderr.replacen("img:", "qemu-img:", 1),
            theirs.stderr,
            "img:{ours}\nqemu-img:{theirs}"
        );
    }
}

/// Garbles the compressed data of cluster `index` of a qcow2 image with one L2 table (read
/// from its header and tables as the spec lays them out).
fn garble_compressed_cluster(env: &Env, name: &str, index: usize) {
    let d = env.read(name);
    let be64 = |at: usize| u64::from_be_bytes(d[at..at + 8].try_into().expect("8 bytes"));
    let cluster_bits = u32::from_be_bytes(d[20..24].try_into().expect("4 bytes"));
    let l1 = usize::try_from(be64(40)).expect("offset");
    let l2 = usize::try_from(be64(l1) & 0x00ff_ffff_ffff_fe00).expect("offset");
    let entry = be64(l2 + 8 * index);
    assert_eq!(entry >> 62 & 1, 1, "cluster {index} is not compressed");
    let offset_bits = 62 - (cluster_bits - 8);
    let host = usize::try_from(entry & ((1 << offset_bits) - 1)).expect("offset");
    let junk: Vec<u8> = d[host + 4..host + 40].iter().map(|b| b ^ 0x5a).collect();
    env.write_at(name, (host + 4) as u64, &junk);
}

/// convert --salvage: a source cluster that cannot be read (garbled compressed data) becomes
/// zeroes in the target, with one warning per 512-byte sector (none with -q), and the rest is
/// copied: the same target and the same number of warnings as qemu-img, in plain, compressed
/// and out-of-order conversions. Without --salvage the conversion fails.
#[test]
fn convert_salvage_matches_qemu() {
    let env = Env::with_qemu();
    let mut data = vec![b'A'; 64 * 1024];
    data.extend(common::noise(3, 1000));
    data.resize(128 * 1024, b'B');
    data.resize(192 * 1024, b'C');
    env.write("src.raw", &data);
    env.qemu_img(&[
        "convert",
        "-c",
        "-f",
        "raw",
        "-O",
        "qcow2",
        "-o",
        "cluster_size=4k",
        "src.raw",
        "bad.qcow2",
    ])
    .ok();
    garble_compressed_cluster(&env, "bad.qcow2", 16);
    env.img(&["convert", "-O", "raw", "bad.qcow2", "x.raw"])
        .code_is(1);
    env.qemu_img(&["convert", "-O", "raw", "bad.qcow2", "x.raw"])
        .code_is(1);
    for extra in [
        &["-O", "raw"][..],
        &["-c", "-O", "qcow2"],
        &["-W", "-m", "4", "-O", "qcow2"],
    ] {
        let mut ours = vec!["convert", "--salvage"];
        ours.extend_from_slice(extra);
        let mut theirs = ours.clone();
        ours.extend_from_slice(&["bad.qcow2", "ours"]);
        theirs.extend_from_slice(&["bad.qcow2", "theirs"]);
        let o = env.img(&ours).ok();
        let t = env.qemu_img(&theirs).ok();
        let warnings = |s: &str| {
            s.lines()
                .filter(|l| l.contains("warning: error while reading offset"))
                .count()
        };
        assert_eq!(warnings(&o.stderr), 8, "{o}");
        assert_eq!(
            warnings(&o.stderr),
            warnings(&t.stderr),
            "img:{o}\nqemu-img:{t}"
        );
        assert!(
            o.stderr
                .contains("img: warning: error while reading offset 65536: "),
            "{o}"
        );
        env.qemu_img(&["compare", "ours", "theirs"]).ok();
    }
    let mut want = data.clone();
    want[64 * 1024..68 * 1024].fill(0);
    let quiet = env
        .img(&[
            "convert",
            "-q",
            "--salvage",
            "-O",
            "raw",
            "bad.qcow2",
            "q.raw",
        ])
        .ok();
    assert_eq!(quiet.stderr, "", "{quiet}");
    assert!(env.read("q.raw") == want, "salvaged data differs");
}

/// Files that cannot be opened or created (missing, in a missing directory, a directory) are
/// refused in qemu-img's words and with its exit codes; convert names the conversion that
/// failed, as qemu-img does.
#[test]
fn open_and_create_failures_use_qemu_img_words() {
    let env = Env::with_qemu();
    env.qemu_img(&["create", "-q", "-f", "qcow2", "x.qcow2", "1M"])
        .ok();
    std::fs::create_dir(env.path("dir")).unwrap();
    let cases: &[&[&str]] = &[
        &["info", "missing.qcow2"],
        &["info", "dir"],
        &["convert", "-O", "raw", "dir", "o.raw"],
        &["convert", "-O", "raw", "missing.qcow2", "o.raw"],
        &["convert", "-O", "qcow2", "x.qcow2", "nodir/o.qcow2"],
        &["convert", "-O", "raw", "x.qcow2", "dir"],
        &[
            "convert",
            "-O",
            "qcow2",
            "-o",
            "cluster_size=3k",
            "x.qcow2",
            "o.qcow2",
        ],
        &[
            "convert",
            "-O",
            "vmdk",
            "-o",
            "subformat=bogus",
            "x.qcow2",
            "o.vmdk",
        ],
        &["create", "-q", "-f", "qcow2", "nodir/n.qcow2", "1M"],
        &["create", "-q", "-f", "raw", "dir", "1M"],
        &["compare", "dir", "x.qcow2"],
        &["check", "missing.qcow2"],
    ];
    for args in cases {
        let o = env.img(args).no_panic();
        let q = env.qemu_img(args);
        assert_eq!(o.code, q.code, "{args:?}: {o}{q}");
        let ours = o.stderr.strip_prefix("img: ").unwrap_or(&o.stderr);
        let theirs = q.stderr.strip_prefix("qemu-img: ").unwrap_or(&q.stderr);
        assert_eq!(ours, theirs, "{args:?}");
    }
}

/// A command line without its file names (or size) gets qemu-img's words and exit code.
#[test]
fn missing_file_names_use_qemu_img_words() {
    let env = Env::with_qemu();
    let cases: &[&[&str]] = &[
        &["info"],
        &["check", "-r", "all"],
        &["map", "--output=json"],
        &["commit"],
        &["rebase", "-u", "-b", ""],
        &["snapshot", "-c", "x.qcow2"],
        &["compare", "-f", "qcow2", "x.qcow2"],
        &["resize", "x.qcow2"],
    ];
    for args in cases {
        let o = env.img(args).no_panic();
        let q = env.qemu_img(args);
        assert_eq!(o.code, q.code, "{args:?}: {o}{q}");
        assert_eq!(o.stderr, q.stderr.replace("qemu-img", "img"), "{args:?}");
    }
}

/// Sizes a format or the filesystem cannot hold are refused in qemu-img's words, and the
/// qcow2 and luks files begun for them are deleted again, as qemu-img deletes them (a raw file
/// stays, empty, as qemu-img leaves it). img used to leave a 192 KiB qcow2 behind, and to say
/// "out of range integral type conversion attempted" of a luks image past 2^63 bytes.
#[test]
fn create_of_a_size_too_large_fails_like_qemu() {
    let env = Env::with_qemu();
    let luks = "--object secret,id=s,data=x -o key-secret=s,iter-time=1";
    let cases: &[(&str, &str, &str)] = &[
        ("raw", "", "1P"),
        ("qcow2", "", "1E"),
        ("qcow2", "-o cluster_size=512", "2T"),
        ("qcow2", "-o cluster_size=16k,extended_l2=on", "128T"),
        ("qcow2", "-o data_file=d.raw", "4096T"),
        ("vdi", "", "1P"),
        ("luks", luks, "1P"),
        ("luks", luks, "9223372036854775807"),
    ];
    for &(fmt, opts, size) in cases {
        let run = |tool: &str, name: &str| {
            let mut args = vec!["create", "-q", "-f", fmt];
            args.extend(opts.split_whitespace());
            args.extend([name, size]);
            let out = if tool == "img" {
                env.img(&args)
            } else {
                env.qemu_img(&args)
            };
            let prog = format!("{tool}: ");
            let said = out.stderr.trim_end().replace(name, "IMAGE");
            let said = said.strip_prefix(&prog).unwrap_or(&said).to_owned();
            let left = [name, "d.raw"].map(|f| env.path(f).exists());
            for f in [name, "d.raw"] {
                let _ = std::fs::remove_file(env.path(f));
            }
            (out.code, said, left)
        };
        let theirs = run("qemu-img", "q.img");
        let ours = run("img", "i.img");
        let case = format!("{fmt} {opts} {size}");
        assert_eq!(theirs.0, Some(1), "{case}: qemu-img accepts it");
        assert_eq!(ours.0, theirs.0, "{case}");
        assert_eq!(ours.1, theirs.1, "{case}: messages differ");
        // qemu-img's vdi leaves an empty file behind; img makes none.
        if fmt != "vdi" {
            assert_eq!(ours.2, theirs.2, "{case}: files left (image, data file)");
        } else {
            assert_eq!(ours.2, [false, false], "{case}");
        }
    }
}

/// `measure` of a luks target (its header area plus the payload, for a size or a source, with
/// each cipher's key length) and of a qcow2 whose L1 table would pass qemu's limit: the same
/// output and exit code as qemu-img, human and JSON. img said luks had no measurement, and
/// measured the too-large qcow2. (qemu-img spends seconds on each luks measurement, timing
/// PBKDF2 it does not need: the cases are few.)
#[test]
fn measure_luks_and_oversized_qcow2_like_qemu() {
    let env = Env::with_qemu();
    env.qemu_img(&["create", "-q", "-f", "qcow2", "src.qcow2", "1G"])
        .ok();
    env.qemu_io("qcow2", "src.qcow2", &["write -P 1 0 10M"]);
    let cases: &[&str] = &[
        "-O luks -o key-secret=s --size 513",
        "-O luks -o key-secret=s,cipher-alg=aes-128 --size 1G",
        "--output=json -O luks -o key-secret=s src.qcow2",
        "-O luks --size 1M",
        "-O luks -o key-secret=s,cipher-alg=foo --size 1M",
        "-O qcow2 -o cluster_size=512 --size 1T",
        "-O qcow2 -o cluster_size=512 --size 274877939200",
        "-O qcow2 -o cluster_size=4k,extended_l2=on --size 2T",
    ];
    for case in cases {
        let mut args = vec!["measure", "--object", "secret,id=s,data=x"];
        args.extend(case.split_whitespace());
        let ours = env.img(&args);
        let theirs = env.qemu_img(&args);
        assert_eq!(ours.code, theirs.code, "{case}\n{ours}\n{theirs}");
        assert_eq!(ours.stdout, theirs.stdout, "{case}");
        assert_eq!(
            ours.stderr.strip_prefix("img: "),
            theirs.stderr.strip_prefix("qemu-img: "),
            "{case}"
        );
    }
}

/// An option's value may start with a hyphen, as getopt takes the next argument whatever it
/// is: `snapshot -c -l F` makes a snapshot named `-l` in qemu-img, and in img (clap read `-l` as
/// the list flag and refused the line).
#[test]
fn option_values_starting_with_a_hyphen_are_taken_as_qemu_takes_them() {
    let env = Env::with_qemu();
    for (tool, name) in [("qemu-img", "q.qcow2"), ("img", "i.qcow2")] {
        let run = |args: &[&str]| {
            if tool == "img" {
                env.img(args)
            } else {
                env.qemu_img(args)
            }
        };
        run(&["create", "-q", "-f", "qcow2", name, "1M"]).ok();
        run(&["snapshot", "-c", "-l", name]).ok();
        run(&["snapshot", "-c", "--x", name]).ok();
        run(&["snapshot", "-c", "-", name]).ok();
    }
    let names = |name: &str| {
        let out = env.qemu_img(&["info", "--output=json", name]).ok().json();
        out["snapshots"]
            .as_array()
            .map(|v| v.iter().map(|s| s["name"].clone()).collect::<Vec<_>>())
            .unwrap_or_default()
    };
    assert_eq!(names("i.qcow2"), names("q.qcow2"));
    assert_eq!(names("i.qcow2").len(), 3);
}

/// Options a subcommand does not have and file names too many are refused in qemu-img's words
/// (getopt's for options), where img printed clap's usage text; a rebase onto the image itself
/// names the new backing file as qemu-img does.
#[test]
fn unknown_options_and_extra_arguments_are_refused_in_qemu_words() {
    let env = Env::with_qemu();
    for f in ["a.qcow2", "b.qcow2"] {
        env.qemu_img(&["create", "-q", "-f", "qcow2", f, "1M"]).ok();
    }
    env.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "a.qcow2",
        "-F",
        "qcow2",
        "top.qcow2",
    ])
    .ok();
    let cases: &[&str] = &[
        "rebase -o x a.qcow2",
        "info --bogus a.qcow2",
        "info --bogus=3 a.qcow2",
        "check -Z a.qcow2",
        "convert -qZ a.qcow2 b",
        "info a.qcow2 extra",
        "create -f qcow2 x.qcow2 1M extra",
        "compare a.qcow2 b.qcow2 c",
        "resize a.qcow2 1M extra",
        "map a.qcow2 b",
        "snapshot -l a.qcow2 b",
        "measure a b",
        "amend -o x a b",
        "amend -o encrypt.format=luks a.qcow2",
        "rebase -b top.qcow2 -F qcow2 top.qcow2",
    ];
    for case in cases {
        let args: Vec<&str> = case.split_whitespace().collect();
        let ours = env.img(&args);
        let theirs = env.qemu_img(&args);
        assert_eq!(ours.code, theirs.code, "{case}\n{ours}\n{theirs}");
        assert_eq!(
            ours.stderr.replace("img", "TOOL"),
            theirs.stderr.replace("qemu-img", "TOOL"),
            "{case}"
        );
    }
}

/// Images in formats qemu reads and img does not (vpc, vhdx, qed, parallels, legacy qcow, and
/// `.dmg` by name) are refused by name, never read as raw disks; `-f raw` still reads the bytes.
/// Writing those formats is refused before anything is made.
#[test]
fn formats_img_does_not_read_are_refused_by_name() {
    let env = Env::with_qemu();
    for (fmt, file) in [
        ("vpc", "d.vhd"),
        ("vhdx", "d.vhdx"),
        ("qed", "d.qed"),
        ("parallels", "d.hds"),
        ("qcow", "d.qcow"),
    ] {
        env.qemu_img(&["create", "-q", "-f", fmt, file, "1M"]).ok();
        for args in [
            &["info", file][..],
            &["info", "--output=json", file],
            &["map", file],
            &["compare", file, file],
            &["convert", "-O", "raw", file, "out.raw"],
            &["info", "-f", fmt, file],
        ] {
            let out = env.img(args).no_panic();
            assert!(matches!(out.code, Some(1 | 2)), "{fmt} {args:?}: {out}");
            assert!(
                out.stderr
                    .contains(&format!("image format '{fmt}' is not supported")),
                "{fmt} {args:?}: {out}"
            );
        }
        let raw = env.img(&["info", "--output=json", "-f", "raw", file]).ok();
        assert_eq!(raw.json()["format"], "raw", "{raw}");
        let out = env.img(&["create", "-f", fmt, "new.img", "1M"]).no_panic();
        assert_eq!(out.code, Some(1), "{out}");
        assert!(out.stderr.contains("is not supported"), "{out}");
        assert!(!env.path("new.img").exists());
    }
    env.qemu_img(&["create", "-q", "-f", "raw", "mac.dmg", "1M"])
        .ok();
    let out = env.img(&["info", "mac.dmg"]).no_panic();
    assert!(
        out.stderr.contains("image format 'dmg' is not supported"),
        "{out}"
    );
}

/// What qemu-img refuses as it reads the command line is refused alike (message and exit
/// code): every `--object` is defined, used or not; `--image-opts` with `-f`; base64 secrets
/// with characters outside the alphabet. `amend -f FMT -o help` needs no image.
#[test]
fn objects_image_opts_and_amend_help_are_read_as_qemu_reads_them() {
    let env = Env::with_qemu();
    env.qemu_img(&["create", "-q", "-f", "raw", "r.raw", "1M"])
        .ok();
    let img_opts = "driver=raw,file.filename=r.raw";
    let cases: &[&[&str]] = &[
        &["info", "--object", "secret,id=x", "r.raw"],
        &["info", "--object", "foo=bar", "r.raw"],
        &[
            "info",
            "--object",
            "secret,id=a,data=1",
            "--object",
            "secret,id=a,data=2",
            "r.raw",
        ],
        &["compare", "--object", "secret,id=x", "r.raw", "r.raw"],
        &["check", "--object", "secret,id=x,data=1,file=/x", "r.raw"],
        &[
            "info",
            "--object",
            "secret,id=s,data=cH c=,format=base64",
            "--image-opts",
            img_opts,
        ],
        &["info", "--image-opts", "-f", "raw", img_opts],
        &["map", "--image-opts", "-f", "raw", img_opts],
        &["compare", "--image-opts", "-f", "raw", img_opts, img_opts],
        &["amend", "-f", "qcow2", "-o", "help", "missing.qcow2"],
        &["amend", "-f", "luks", "-o", "help", "missing.luks"],
        &["amend", "-f", "raw", "-o", "help", "missing.raw"],
        &["amend", "-f", "vmdk", "-o", "help"],
        &["amend", "-o", "help", "r.raw"],
    ];
    for args in cases {
        let q = env.qemu_img(args);
        let i = env.img(args).no_panic();
        assert_eq!(i.code, q.code, "{args:?}:{q}{i}");
        assert_eq!(i.stdout, q.stdout, "{args:?}:{q}{i}");
        assert_eq!(
            i.stderr.replace("img:", "qemu-img:"),
            q.stderr,
            "{args:?}:{q}{i}"
        );
    }
}

/// A value of the wrong type (a size, a boolean, a number) is refused before the `Formatting`
/// line, as qemu-img refuses it, for every format: same output, same exit code, no file.
#[test]
fn create_refuses_mistyped_values_before_formatting_like_qemu() {
    let env = Env::with_qemu();
    for fmt in ["qcow2", "raw", "vdi", "vmdk"] {
        for o in [
            "cluster_size=abc",
            "cluster_size=64k,,x",
            "lazy_refcounts=x",
            "refcount_bits=x",
            "nocow=maybe",
            "size=1x",
        ] {
            let args = ["create", "-f", fmt, "-o", o, "x.disk", "1M"];
            let q = env.qemu_img(&args);
            let _ = std::fs::remove_file(env.path("x.disk"));
            let i = env.img(&args).no_panic();
            assert_eq!(i.code, q.code, "{fmt} {o}:{q}{i}");
            assert_eq!(i.stdout, q.stdout, "{fmt} {o}:{q}{i}");
            assert_eq!(
                i.stderr.replace("img:", "qemu-img:"),
                q.stderr,
                "{fmt} {o}:{q}{i}"
            );
            assert!(!env.path("x.disk").exists(), "{fmt} {o}");
        }
    }
}

#[test]
fn version_and_help_speak_to_tools_that_probe_qemu_img() {
    // Run under the name qemu-img (a drop-in link), --version starts as qemu-img's does, so
    // that version checks such as OpenStack Cinder's `qemu-img version ([0-9.]*)` pass; the
    // help lists the formats, as scripts grep `--help` for one.
    let env = Env::new();
    let own = env.img(&["--version"]).ok();
    assert!(own.stdout.starts_with("img version "), "{own}");
    let link = env.path("qemu-img");
    std::os::unix::fs::symlink(common::IMG, &link).unwrap();
    for flag in ["--version", "-V"] {
        let out = run_timeout(
            &env.path(""),
            link.to_str().unwrap(),
            &[flag],
            DEFAULT_TIMEOUT,
        );
        let first = out.stdout.lines().next().unwrap_or_default().to_owned();
        let version = first
            .strip_prefix("qemu-img version ")
            .and_then(|v| v.split(' ').next())
            .unwrap_or_else(|| panic!("{out}"));
        let parts: Vec<u32> = version.split('.').map(|p| p.parse().unwrap()).collect();
        assert!(parts.len() == 3 && parts[0] >= 10, "{out}");
        assert_eq!(out.code, Some(0), "{out}");
    }
    let help = env.img(&["--help"]).ok();
    let formats = help
        .stdout
        .split("Supported image formats:")
        .nth(1)
        .unwrap_or_else(|| panic!("{help}"));
    for f in ["raw", "qcow2", "vmdk", "vdi", "luks"] {
        assert!(formats.split_whitespace().any(|w| w == f), "{f}: {help}");
    }
}

#[test]
fn network_protocol_names_are_refused_by_protocol() {
    // KubeVirt CDI and Proxmox hand qemu-img NBD URIs; img reads local files only and says
    // so, rather than "No such file or directory".
    let env = Env::new();
    for (name, proto) in [
        ("nbd+unix:///?socket=/run/nbd.sock", "nbd+unix"),
        ("nbd:unix:/run/nbd.sock", "nbd"),
        ("https://example.com/disk.qcow2", "https"),
    ] {
        let out = env.img(&["info", "--output=json", name]).no_panic();
        assert_eq!(out.code, Some(1), "{out}");
        assert!(
            out.stderr.contains(&format!("Unknown protocol '{proto}'")),
            "{out}"
        );
    }
    let missing = env.img(&["info", "nosuch.qcow2"]).no_panic();
    assert!(
        missing.stderr.contains("No such file or directory"),
        "{missing}"
    );
}
