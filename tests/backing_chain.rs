//! A three-level chain raw ← qcow2 ← qcow2, with data and zero writes at every level: `img`
//! reads it like qemu-img, and `img info --backing-chain` / `img map` print what qemu-img
//! prints.

mod common;

use common::{Env, MIB, SMALL};
use serde_json::Value;

/// Builds base.raw ← mid.qcow2 ← top.qcow2 (relative backing names, formats given with -F).
fn chain(env: &Env) {
    let size = SMALL.to_string();
    env.qemu_img(&["create", "-f", "raw", "base.raw", &size])
        .ok();
    env.qemu_io(
        "raw",
        "base.raw",
        &[
            "write -P 0xa1 0 1M",
            "write -P 0xa2 2M 512k",
            "write -z 256k 64k",
            "write -P 0xa3 4190000 4304",
        ],
    );
    env.qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-b",
        "base.raw",
        "-F",
        "raw",
        "mid.qcow2",
    ])
    .ok();
    env.qemu_io(
        "qcow2",
        "mid.qcow2",
        &[
            "write -P 0xb1 512k 1M",
            "write -z 2304k 64k",
            "write -P 0xb2 3000000 70000",
            "write -z 100000 1000",
        ],
    );
    // The top layer uses 4 KiB clusters, so that cluster sizes differ along the chain.
    env.qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4k",
        "-b",
        "mid.qcow2",
        "-F",
        "qcow2",
        "top.qcow2",
    ])
    .ok();
    env.qemu_io(
        "qcow2",
        "top.qcow2",
        &[
            "write -P 0xc1 1000 5000",
            "write -z 768k 128k",
            "write -P 0xc2 2200k 300k",
            "write -z 3M 4k",
            "discard 2300k 8k",
        ],
    );
}

#[test]
fn chain_convert_equals_qemu() {
    let env = Env::with_qemu();
    chain(&env);
    env.assert_converts_like_qemu("top.qcow2", &[]);
    env.assert_converts_like_qemu("mid.qcow2", &[]);
    // And img compare agrees that the chain reads as qemu-img's conversion of it.
    env.img(&["compare", "top.qcow2", "top.qcow2.qemu.raw"])
        .ok();
}

/// The fields of `qemu-img info --output=json` that `img` must reproduce. Left out:
/// "actual-size" (the host file's allocated bytes: it depends on the file system and on how
/// the two tools allocate; compared loosely below) and "children" (qemu's block-graph nodes,
/// such as the protocol layer "file", which `img` has no notion of).
const INFO_FIELDS: &[&str] = &[
    "virtual-size",
    "filename",
    "format",
    "cluster-size",
    "backing-filename",
    "full-backing-filename",
    "backing-filename-format",
    "dirty-flag",
    "snapshots",
    "format-specific",
    "encrypted",
];

fn assert_info_equal(ours: &Value, theirs: &Value, what: &str) {
    for field in INFO_FIELDS {
        assert_eq!(
            ours.get(field),
            theirs.get(field),
            "{what}: field {field:?} differs\nimg: {ours:#}\nqemu-img: {theirs:#}"
        );
    }
    // actual-size: st_blocks of the same files, so equal here in practice; allow slack so
    // that a different way of measuring (or a file system's preallocation) does not matter.
    let a = ours["actual-size"].as_u64();
    let b = theirs["actual-size"].as_u64();
    match (a, b) {
        (Some(a), Some(b)) => assert!(
            a.abs_diff(b) <= (b / 10).max(MIB),
            "{what}: actual-size {a} is far from qemu-img's {b}"
        ),
        _ => panic!("{what}: actual-size missing\nimg: {ours:#}\nqemu-img: {theirs:#}"),
    }
}

fn info_agrees(top: &str) {
    let env = Env::with_qemu();
    chain(&env);
    let top = if top.is_empty() {
        "top.qcow2".to_string()
    } else {
        env.path("top.qcow2").display().to_string()
    };
    let theirs = env
        .qemu_img(&["info", "--output=json", "--backing-chain", &top])
        .ok()
        .json();
    let ours = env
        .img(&["info", "--output=json", "--backing-chain", &top])
        .ok()
        .json();
    let (Some(t), Some(o)) = (theirs.as_array(), ours.as_array()) else {
        panic!("--backing-chain must print a JSON array\nimg: {ours:#}\nqemu-img: {theirs:#}");
    };
    assert_eq!(o.len(), 3, "three images in the chain: {ours:#}");
    assert_eq!(o.len(), t.len());
    for (i, (o, t)) in o.iter().zip(t).enumerate() {
        assert_info_equal(o, t, &format!("chain element {i}"));
    }
    // Without --backing-chain: a single object, equal to the first element.
    let theirs = env.qemu_img(&["info", "--output=json", &top]).ok().json();
    let ours = env.img(&["info", "--output=json", &top]).ok().json();
    assert_info_equal(&ours, &theirs, "top alone");
}

#[test]
fn chain_info_json_relative_path_equals_qemu() {
    info_agrees("");
}

/// Opened by absolute path, qemu-img prints absolute "filename"s and resolves
/// "full-backing-filename" against the overlay's directory.
#[test]
fn chain_info_json_absolute_path_equals_qemu() {
    info_agrees("absolute");
}

#[test]
fn chain_map_json_equals_qemu() {
    let env = Env::with_qemu();
    chain(&env);
    for file in ["top.qcow2", "mid.qcow2", "base.raw"] {
        let theirs = env.qemu_img(&["map", "--output=json", file]).ok().json();
        let ours = env.img(&["map", "--output=json", file]).ok().json();
        assert_eq!(
            ours, theirs,
            "map of {file}\nimg: {ours:#}\nqemu-img: {theirs:#}"
        );
    }
}

/// The human map output is what scripts grep; it lists only allocated ranges, with the file
/// each one lives in.
#[test]
fn chain_map_human_equals_qemu() {
    let env = Env::with_qemu();
    chain(&env);
    let theirs = env.qemu_img(&["map", "top.qcow2"]).ok();
    let ours = env.img(&["map", "top.qcow2"]).ok();
    assert_eq!(ours.stdout, theirs.stdout, "img:{ours}\nqemu-img:{theirs}");
}

/// Zeroes move down the chain as zeroes, not as data: `commit` drops the base's allocation
/// where the overlay reads as zeroes, and `rebase` records as zeroes what the image read past
/// its old backing file's end; maps and lengths equal qemu-img's.
#[test]
fn commit_and_rebase_carry_zeroes_without_data() {
    let env = Env::with_qemu();
    for tool in ["img", "qemu"] {
        let base = format!("{tool}-base.qcow2");
        let top = format!("{tool}-top.qcow2");
        env.qemu_img(&["create", "-q", "-f", "qcow2", &base, "8M"])
            .ok();
        env.qemu_io("qcow2", &base, &["write -P 1 0 4M"]);
        env.qemu_img(&[
            "create", "-q", "-f", "qcow2", "-b", &base, "-F", "qcow2", &top,
        ])
        .ok();
        env.qemu_io("qcow2", &top, &["write -z 0 2M", "write -P 2 4M 1M"]);
        if tool == "img" {
            env.img(&["commit", &top]).ok();
        } else {
            env.qemu_img(&["commit", &top]).ok();
        }
    }
    let map = |f: &str| env.qemu_img(&["map", "--output=json", f]).ok().stdout;
    assert_eq!(map("img-base.qcow2"), map("qemu-base.qcow2"));
    assert_eq!(env.len("img-base.qcow2"), env.len("qemu-base.qcow2"));
    env.qemu_img(&["check", "img-base.qcow2"]).ok();

    // The old backing file is shorter than the image: past its end the image read zeroes.
    env.qemu_img(&["create", "-q", "-f", "qcow2", "old.qcow2", "1M"])
        .ok();
    env.qemu_img(&["create", "-q", "-f", "qcow2", "new.qcow2", "4M"])
        .ok();
    env.qemu_io("qcow2", "new.qcow2", &["write -P 7 0 4M"]);
    for compat in ["1.1", "0.10"] {
        let ours = format!("ours-{compat}.qcow2");
        let theirs = format!("theirs-{compat}.qcow2");
        for f in [&ours, &theirs] {
            env.qemu_img(&[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                &format!("compat={compat}"),
                "-b",
                "old.qcow2",
                "-F",
                "qcow2",
                f,
                "4M",
            ])
            .ok();
            env.qemu_io("qcow2", f, &["write -P 3 1M 64k"]);
        }
        env.img(&["rebase", "-b", "new.qcow2", "-F", "qcow2", &ours])
            .ok();
        env.qemu_img(&["rebase", "-b", "new.qcow2", "-F", "qcow2", &theirs])
            .ok();
        env.qemu_img(&["check", &ours]).ok();
        env.qemu_img(&["compare", &ours, &theirs]).ok();
        assert_eq!(map(&ours), map(&theirs), "compat={compat}");
        assert_eq!(env.len(&ours), env.len(&theirs), "compat={compat}");
    }
}

/// A safe rebase of an image that has no backing file yet keeps what the guest reads: where
/// the new backing file holds data, the image records zeroes (zero clusters on compat=1.1, as
/// qemu-img; zeroes as data on compat=0.10, where qemu-img lets the backing file show through).
#[test]
fn safe_rebase_of_a_standalone_image_keeps_its_zeroes() {
    let env = Env::with_qemu();
    env.qemu_img(&["create", "-q", "-f", "qcow2", "b.qcow2", "8M"])
        .ok();
    env.qemu_io(
        "qcow2",
        "b.qcow2",
        &["write -P 0x8d 0 64k", "write -P 0x11 1000k 3k"],
    );
    env.qemu_img(&["create", "-q", "-f", "raw", "b.raw", "8M"])
        .ok();
    env.qemu_io("raw", "b.raw", &["write -P 0x22 2M 4k"]);
    let map = |f: &str| env.qemu_img(&["map", "--output=json", f]).ok().stdout;
    for (compat, backing, bfmt) in [
        ("1.1", "b.qcow2", "qcow2"),
        ("0.10", "b.qcow2", "qcow2"),
        ("1.1", "b.raw", "raw"),
    ] {
        let ours = format!("ours-{compat}-{bfmt}.qcow2");
        let theirs = format!("theirs-{compat}-{bfmt}.qcow2");
        for f in [&ours, &theirs] {
            let o = format!("compat={compat}");
            env.qemu_img(&["create", "-q", "-f", "qcow2", "-o", &o, f, "8M"])
                .ok();
            env.qemu_io("qcow2", f, &["write -P 3 4M 64k"]);
        }
        env.img(&["rebase", "-f", "qcow2", "-b", backing, "-F", bfmt, &ours])
            .ok();
        env.qemu_img(&["rebase", "-f", "qcow2", "-b", backing, "-F", bfmt, &theirs])
            .ok();
        env.qemu_img(&["check", &ours]).ok();
        env.qemu_io(
            "qcow2",
            &ours,
            &[
                "read -P 0 0 4M",
                "read -P 3 4M 64k",
                "read -P 0 4160k 3968k",
            ],
        );
        let info = env.img(&["info", "--output=json", &ours]).ok().json();
        assert_eq!(info["backing-filename"], backing, "{compat}");
        if compat == "1.1" {
            assert_eq!(map(&ours), map(&theirs), "compat={compat} onto {bfmt}");
        }
    }
}

/// A 4 MiB qcow2 base filled with 0x5a.
fn filled_base(env: &Env) {
    env.qemu_img(&["create", "-f", "qcow2", "base.qcow2", "4M"])
        .ok();
    env.qemu_io("qcow2", "base.qcow2", &["write -P 0x5a 0 4M"]);
}

#[test]
fn extended_l2_preallocated_overlay_reads_backing_like_qemu() {
    let env = Env::with_qemu();
    filled_base(&env);
    for mode in ["metadata", "falloc", "full"] {
        let opts = format!("extended_l2=on,preallocation={mode}");
        for (tool, name) in [("img", "ours.qcow2"), ("qemu", "theirs.qcow2")] {
            let args = [
                "create",
                "-f",
                "qcow2",
                "-o",
                &opts,
                "-b",
                "base.qcow2",
                "-F",
                "qcow2",
                name,
            ];
            if tool == "img" {
                env.img(&args).ok();
            } else {
                env.qemu_img(&args).ok();
            }
        }
        env.qemu_img(&["check", "ours.qcow2"]).ok();
        env.qemu_img(&["compare", "ours.qcow2", "base.qcow2"]).ok();
        let map = |tool: &str| {
            let name = if tool == "img" {
                "ours.qcow2"
            } else {
                "theirs.qcow2"
            };
            let args = ["map", "--output=json", name];
            let mut out = if tool == "img" {
                env.img(&args).ok().json()
            } else {
                env.qemu_img(&args).ok().json()
            };
            // Host offsets depend on the layout of each file; the kinds must agree.
            for e in out.as_array_mut().into_iter().flatten() {
                e.as_object_mut().map(|o| o.remove("offset"));
            }
            out
        };
        assert_eq!(map("img"), map("qemu"), "{mode}");
        std::fs::remove_file(env.path("ours.qcow2")).unwrap();
        std::fs::remove_file(env.path("theirs.qcow2")).unwrap();
    }
    // Without a backing file the clusters are preallocated but unallocated, as qemu maps them.
    env.img(&[
        "create",
        "-f",
        "qcow2",
        "-o",
        "extended_l2=on,preallocation=metadata",
        "a.qcow2",
        "4M",
    ])
    .ok();
    env.qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-o",
        "extended_l2=on,preallocation=metadata",
        "b.qcow2",
        "4M",
    ])
    .ok();
    let a = env.img(&["map", "--output=json", "a.qcow2"]).ok().stdout;
    let b = env
        .qemu_img(&["map", "--output=json", "b.qcow2"])
        .ok()
        .stdout;
    assert_eq!(a, b);
}

#[test]
fn extended_l2_preallocated_convert_onto_backing_reads_like_qemu() {
    let env = Env::with_qemu();
    filled_base(&env);
    env.qemu_img(&["create", "-f", "qcow2", "top.qcow2", "4M"])
        .ok();
    env.qemu_io("qcow2", "top.qcow2", &["write -P 0x11 1M 64k"]);
    env.img(&[
        "convert",
        "-O",
        "qcow2",
        "-o",
        "extended_l2=on,preallocation=metadata",
        "-B",
        "base.qcow2",
        "-F",
        "qcow2",
        "top.qcow2",
        "out.qcow2",
    ])
    .ok();
    env.qemu_img(&["check", "out.qcow2"]).ok();
    env.qemu_img(&["compare", "out.qcow2", "top.qcow2"]).ok();
}

#[test]
fn resize_past_shorter_end_with_backing_reads_zeroes_like_qemu() {
    let env = Env::with_qemu();
    filled_base(&env);
    for (ext, mode) in [
        ("off", "off"),
        ("off", "metadata"),
        ("off", "falloc"),
        ("on", "off"),
        ("on", "metadata"),
        ("on", "falloc"),
        ("on", "full"),
    ] {
        let opts = format!("extended_l2={ext}");
        let prealloc = format!("--preallocation={mode}");
        for name in ["ours.qcow2", "theirs.qcow2"] {
            let _ = std::fs::remove_file(env.path(name));
            env.qemu_img(&[
                "create",
                "-f",
                "qcow2",
                "-o",
                &opts,
                "-b",
                "base.qcow2",
                "-F",
                "qcow2",
                name,
                "2M",
            ])
            .ok();
        }
        env.img(&["resize", &prealloc, "ours.qcow2", "6M"]).ok();
        env.qemu_img(&["resize", &prealloc, "theirs.qcow2", "6M"])
            .ok();
        env.qemu_img(&["check", "ours.qcow2"]).ok();
        let out = env.qemu_img(&["compare", "ours.qcow2", "theirs.qcow2"]);
        assert_eq!(out.code, Some(0), "{ext} {mode}: {out}");
    }
    // A v2 image has no zero clusters: qemu refuses and leaves the size.
    env.qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-o",
        "compat=0.10",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        "v2.qcow2",
        "2M",
    ])
    .ok();
    let out = env.img(&["resize", "v2.qcow2", "6M"]).code_is(1);
    assert!(
        out.stderr
            .contains("Failed to zero out new clusters: Operation not supported"),
        "{out}"
    );
    let info = env
        .qemu_img(&["info", "--output=json", "v2.qcow2"])
        .ok()
        .json();
    assert_eq!(info["virtual-size"], 2 * MIB);
}

/// An overlay larger than its backing image: past the backing image's end qemu reports zeroes at
/// the overlay's depth (0, not present), in both output formats, over raw and qcow2 backings.
#[test]
fn map_overlay_past_backing_end_reports_depth_zero() {
    let env = Env::with_qemu();
    env.qemu_img(&["create", "-q", "-f", "raw", "b.raw", "4M"])
        .ok();
    env.qemu_io(
        "raw",
        "b.raw",
        &["write -P 1 0 64k", "write -P 2 4032k 64k"],
    );
    env.qemu_img(&["create", "-q", "-f", "qcow2", "b.qcow2", "4M"])
        .ok();
    env.qemu_io(
        "qcow2",
        "b.qcow2",
        &["write -P 1 0 64k", "write -P 2 4032k 64k"],
    );
    for (base, fmt) in [("b.raw", "raw"), ("b.qcow2", "qcow2")] {
        let top = format!("top-{fmt}.qcow2");
        env.qemu_img(&[
            "create", "-q", "-f", "qcow2", "-b", base, "-F", fmt, &top, "6M",
        ])
        .ok();
        env.qemu_io("qcow2", &top, &["write -P 3 5M 64k"]);
        let theirs = env.qemu_img(&["map", "--output=json", &top]).ok().json();
        let ours = env.img(&["map", "--output=json", &top]).ok().json();
        assert_eq!(
            ours, theirs,
            "map of {top}\nimg: {ours:#}\nqemu-img: {theirs:#}"
        );
        let theirs = env.qemu_img(&["map", &top]).ok();
        let ours = env.img(&["map", &top]).ok();
        assert_eq!(ours.stdout, theirs.stdout, "img:{ours}\nqemu-img:{theirs}");
    }
}

/// A qemu-io holding an image open for writing until it is killed.
struct Writer(std::process::Child);

impl Writer {
    /// Starts an interactive `qemu-io FILE` in the test's directory and waits for its prompt,
    /// which it shows once the image is open and locked. (Polling with a plain `qemu-img info`
    /// instead would race: while info holds its shared lock, qemu-io cannot take its own.)
    fn hold(env: &Env, file: &str) -> Writer {
        use std::io::Read;
        let mut child = std::process::Command::new("qemu-io")
            .arg(file)
            .current_dir(env.dir.path())
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start qemu-io");
        let mut out = child.stdout.take().expect("piped stdout");
        let mut seen = Vec::new();
        let mut byte = [0u8; 1];
        while !String::from_utf8_lossy(&seen).contains("qemu-io>") {
            if out.read(&mut byte).unwrap_or(0) == 0 {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "qemu-io exited before its prompt: {}",
                    String::from_utf8_lossy(&seen)
                );
            }
            seen.push(byte[0]);
        }
        Writer(child)
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// qemu reads a new overlay's backing size sharing the file with any writer, so a running
/// writer does not stop `create -b`; a vmdk overlay, which opens its parent for the CID without
/// sharing, is refused in both. Output and exit codes as qemu-img's.
#[test]
fn create_over_backing_held_by_writer_matches_qemu() {
    let env = Env::with_qemu();
    env.qemu_img(&["create", "-q", "-f", "qcow2", "X", "4M"])
        .ok();
    env.qemu_img(&["create", "-q", "-f", "vmdk", "V.vmdk", "4M"])
        .ok();
    let _x = Writer::hold(&env, "X");
    let _v = Writer::hold(&env, "V.vmdk");
    for args in [
        &["create", "-f", "qcow2", "-b", "X", "-F", "qcow2", "@.qcow2"][..],
        &[
            "create", "-f", "qcow2", "-b", "X", "-F", "qcow2", "@8.qcow2", "8M",
        ],
        &["create", "-f", "qcow2", "-b", "X", "@nofmt.qcow2"],
        &[
            "create", "-f", "qcow2", "-b", "V.vmdk", "-F", "vmdk", "@v.qcow2",
        ],
        &[
            "create", "-f", "vmdk", "-b", "V.vmdk", "-F", "vmdk", "@.vmdk",
        ],
    ] {
        let q: Vec<String> = args.iter().map(|a| a.replace('@', "q")).collect();
        let i: Vec<String> = args.iter().map(|a| a.replace('@', "i")).collect();
        let qo = env.qemu_img(&q.iter().map(String::as_str).collect::<Vec<_>>());
        let io = env
            .img(&i.iter().map(String::as_str).collect::<Vec<_>>())
            .no_panic();
        let norm = |s: &str, t: &str| {
            s.replace("qemu-img", "img")
                .replace(&format!("'{t}"), "'@")
                .replace(&format!("{t}."), "@.")
                .replace(&format!("{t}8."), "@8.")
                .replace(&format!("{t}nofmt."), "@nofmt.")
                .replace(&format!("{t}v."), "@v.")
        };
        assert_eq!(qo.code, io.code, "exit codes differ:{qo}{io}");
        assert_eq!(norm(&qo.stdout, "q"), norm(&io.stdout, "i"), "{qo}{io}");
        assert_eq!(norm(&qo.stderr, "q"), norm(&io.stderr, "i"), "{qo}{io}");
    }
    for f in ["i.qcow2", "i8.qcow2", "iv.qcow2"] {
        let info = env
            .qemu_img(&["info", "-U", "--output=json", f])
            .ok()
            .json();
        let want = if f == "i8.qcow2" { 8 * MIB } else { 4 * MIB };
        assert_eq!(info["virtual-size"], want, "{f}: {info:#}");
    }
}

/// Backing files named by qemu `json:{...}` options (as libvirt writes them), nested or dotted,
/// with a format driver or without (probed), and a `json:` name on the command line:
/// `info` (human, JSON, whole chain), `map`, `compare` and `convert` give what qemu-img gives.
#[test]
fn json_backing_names_read_like_qemu() {
    let env = Env::with_qemu();
    env.qemu_img(&["create", "-q", "-f", "qcow2", "base.qcow2", "4M"])
        .ok();
    env.qemu_io("qcow2", "base.qcow2", &["write -P 7 0 1M"]);
    env.qemu_img(&["create", "-q", "-f", "raw", "base.raw", "4M"])
        .ok();
    env.qemu_io("raw", "base.raw", &["write -P 9 1M 1M"]);
    let names = [
        r#"json:{"driver":"qcow2","file":{"driver":"file","filename":"base.qcow2"}}"#,
        r#"json:{"driver":"qcow2","file.driver":"file","file.filename":"base.qcow2"}"#,
        r#"json:{"file":{"driver":"file","filename":"base.qcow2"}}"#,
        r#"json:{"driver":"raw","file":{"driver":"file","filename":"base.raw"}}"#,
    ];
    for (n, name) in names.iter().enumerate() {
        let top = format!("top{n}.qcow2");
        let fmt = if name.contains("base.raw") {
            "raw"
        } else {
            "qcow2"
        };
        env.qemu_img(&[
            "create", "-q", "-u", "-f", "qcow2", "-b", name, "-F", fmt, &top, "4M",
        ])
        .ok();
        env.qemu_io("qcow2", &top, &["write -P 8 2M 64k"]);
        for args in [
            &["info", top.as_str()][..],
            &["info", "--output=json", &top],
            &["info", "--backing-chain", "--output=json", &top],
            &["map", "--output=json", &top],
            &["compare", &top, &top],
        ] {
            let q = env.qemu_img(args);
            let i = env.img(args).no_panic();
            assert_eq!(i.code, q.code, "{args:?}:{q}{i}");
            assert_eq!(i.stdout, q.stdout, "{args:?}:{q}{i}");
        }
        env.img(&["convert", "-O", "raw", &top, "i.raw"]).ok();
        env.qemu_img(&["convert", "-O", "raw", &top, "q.raw"]).ok();
        env.assert_same_bytes("i.raw", "q.raw");
        assert!(env.read("i.raw").contains(&7) || env.read("i.raw").contains(&9));
    }
    let args = ["info", "--output=json", names[0]];
    let q = env.qemu_img(&args).ok();
    let i = env.img(&args).ok();
    assert_eq!(i.json()["format"], q.json()["format"]);
    assert_eq!(i.json()["virtual-size"], q.json()["virtual-size"]);
    // What is not a local file is refused by name.
    let nbd = r#"json:{"driver":"qcow2","file":{"driver":"nbd","host":"localhost"}}"#;
    let out = env.img(&["info", nbd]).no_panic();
    assert_eq!(out.code, Some(1), "{out}");
    assert!(out.stderr.contains("'nbd'"), "{out}");
}

/// qemu's raw `offset` and `size` show a window of a file as the disk (a partition of a
/// whole-disk image): read, written, resized and committed into, named in `--image-opts` or a
/// `json:` name (a backing file's included), byte for byte as qemu-img does.
#[test]
fn raw_windows_read_and_write_like_qemu() {
    let env = Env::with_qemu();
    env.qemu_img(&["create", "-q", "-f", "raw", "disk.img", "64M"])
        .ok();
    env.qemu_io(
        "raw",
        "disk.img",
        &[
            "write -P 0x11 0 1M",
            "write -P 0x22 8M 4M",
            "write -P 0x33 30M 1M",
        ],
    );
    let opts = |o: &str, file: &str| format!("driver=raw,{o},file.filename={file}");
    let part = opts("offset=8M,size=16M", "disk.img");
    // Inspecting: the same name, size, map and errors as qemu-img.
    for o in [
        "offset=8M,size=16M",
        "offset=1000",
        "size=1024",
        "offset=64M",
        "offset=abc",
        "offset=-1",
        "offset=65M",
        "size=1023",
        "offset=1M,size=64M",
    ] {
        for cmd in [
            &["info"][..],
            &["info", "--output=json"],
            &["map", "--output=json"],
        ] {
            let name = opts(o, "disk.img");
            let args = [cmd, &["--image-opts", &name]].concat();
            let q = env.qemu_img(&args);
            let i = env.img(&args).no_panic();
            if q.code.is_none() {
                // qemu-img 10 aborts mapping a window that starts inside a sector.
                assert_eq!(i.code, Some(0), "{args:?}:{q}{i}");
                continue;
            }
            assert_eq!(i.code, q.code, "{args:?}:{q}{i}");
            assert_eq!(i.stdout, q.stdout, "{args:?}:{q}{i}");
            if q.code != Some(0) {
                let why = |o: &common::Output| o.stderr.rsplit(": ").next().map(str::to_owned);
                assert_eq!(why(&i), why(&q), "{args:?}:{q}{i}");
            }
        }
    }
    // Only raw has a window: qcow2 and the file protocol refuse the options, as in qemu.
    env.qemu_img(&["create", "-q", "-f", "qcow2", "q.qcow2", "1M"])
        .ok();
    for name in [
        "offset=512,file.filename=q.qcow2",
        "driver=qcow2,offset=512,file.filename=q.qcow2",
        "driver=file,size=512,filename=disk.img",
    ] {
        let q = env.qemu_img(&["info", "--image-opts", name]);
        let i = env.img(&["info", "--image-opts", name]).no_panic();
        assert_eq!((i.code, q.code), (Some(1), Some(1)), "{name}:{q}{i}");
        let why = |o: &common::Output| o.stderr.split("': ").nth(1).map(str::to_owned);
        assert_eq!(why(&i), why(&q), "{name}:{q}{i}");
    }
    // Read out of the window, written into one.
    env.img(&["convert", "--image-opts", &part, "-O", "qcow2", "i.qcow2"])
        .ok();
    env.qemu_img(&["convert", "--image-opts", &part, "-O", "qcow2", "q.qcow2"])
        .ok();
    env.qemu_img(&["compare", "i.qcow2", "q.qcow2"]).ok();
    env.qemu_img(&["check", "i.qcow2"]).ok();
    env.qemu_img(&["create", "-q", "-f", "qcow2", "src.qcow2", "16M"])
        .ok();
    env.qemu_io("qcow2", "src.qcow2", &["write -P 0x77 1M 2M"]);
    for (tool, copy) in [("img", "i.img"), ("qemu", "q.img")] {
        std::fs::copy(env.path("disk.img"), env.path(copy)).unwrap();
        let target = opts("offset=8M,size=16M", copy);
        let args = [
            "convert",
            "-n",
            "-f",
            "qcow2",
            "src.qcow2",
            "--target-image-opts",
            &target,
        ];
        if tool == "img" {
            env.img(&args).ok();
        } else {
            env.qemu_img(&args).ok();
        }
    }
    env.assert_same_bytes("i.img", "q.img");
    // Resized: a fixed size cannot be; an open end moves the file's end.
    for (o, size) in [("offset=8M,size=16M", "+1M"), ("offset=8M", "+3M")] {
        let i = env.img(&["resize", "--image-opts", &opts(o, "i.img"), size]);
        let q = env.qemu_img(&["resize", "--image-opts", &opts(o, "q.img"), size]);
        assert_eq!(i.no_panic().code, q.code, "{o}:{q}");
    }
    env.assert_same_bytes("i.img", "q.img");
    assert_eq!(env.len("i.img"), (64 + 3) << 20);
    // A json: backing name with a window: the overlay reads, maps and commits through it.
    let json = r#"json:{"driver":"raw","offset":8388608,"size":16777216,"file":{"driver":"file","filename":"disk.img"}}"#;
    env.img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        json,
        "-F",
        "raw",
        "top.qcow2",
    ])
    .ok();
    env.qemu_io("qcow2", "top.qcow2", &["write -P 0x55 2M 64k"]);
    std::fs::copy(env.path("top.qcow2"), env.path("qtop.qcow2")).unwrap();
    for args in [
        &["info", "top.qcow2"][..],
        &["info", "--backing-chain", "top.qcow2"],
        &["map", "--output=json", "top.qcow2"],
    ] {
        let q = env.qemu_img(args);
        let i = env.img(args).no_panic();
        assert_eq!(i.stdout, q.stdout, "{args:?}:{q}{i}");
    }
    std::fs::copy(env.path("disk.img"), env.path("before.img")).unwrap();
    env.img(&["commit", "top.qcow2"]).ok();
    std::fs::rename(env.path("disk.img"), env.path("i.img")).unwrap();
    std::fs::copy(env.path("before.img"), env.path("disk.img")).unwrap();
    env.qemu_img(&["commit", "qtop.qcow2"]).ok();
    env.assert_same_bytes("i.img", "disk.img");
    env.qemu_io("raw", "disk.img", &["read -P 0x55 10M 64k"]);
}

#[test]
fn json_backing_option_cuts_or_replaces_the_chain_as_qemu() {
    // oVirt measures one volume (`"backing": null`) or a sub-chain (a nested backing node
    // ending in null) with json: names; the same names read, map and convert like qemu-img.
    let env = Env::with_qemu();
    chain(&env);
    let node = |file: &str, fmt: &str, backing: &str| {
        format!(
            r#"{{"driver": "{fmt}", "file": {{"driver": "file", "filename": "{file}"}}, "backing": {backing}}}"#
        )
    };
    let alone = format!("json:{}", node("top.qcow2", "qcow2", "null"));
    let sub = format!(
        "json:{}",
        node("top.qcow2", "qcow2", &node("mid.qcow2", "qcow2", "null"))
    );
    // Over a different image than the header names.
    let other = format!(
        "json:{}",
        node("top.qcow2", "qcow2", &node("base.raw", "raw", "null"))
    );
    for name in [&alone, &sub, &other] {
        for cmd in [
            &["measure", "--output=json", "-O", "qcow2"][..],
            &["measure", "--output=json", "-O", "raw", "--force-share"],
            &["map", "--output=json"],
        ] {
            let args = [cmd, &[name.as_str()]].concat();
            let q = env.qemu_img(&args).ok();
            let i = env.img(&args).ok();
            assert_eq!(i.stdout, q.stdout, "{args:?}:{q}{i}");
        }
        env.qemu_img(&["convert", "-O", "raw", name, "q.raw"]).ok();
        env.img(&["convert", "-O", "raw", name, "i.raw"]).ok();
        env.assert_same_bytes("i.raw", "q.raw");
    }
    let args = ["info", "--output=json", alone.as_str()];
    assert_info_equal(
        &env.img(&args).ok().json(),
        &env.qemu_img(&args).ok().json(),
        "backing: null",
    );
    // A node named by a string cannot be defined on a command line.
    let named = format!("json:{}", node("top.qcow2", "qcow2", "\"n0\""));
    let q = env.qemu_img(&["measure", "-O", "raw", &named]);
    let i = env.img(&["measure", "-O", "raw", &named]).no_panic();
    assert_eq!((i.code, q.code), (Some(1), Some(1)), "{q}{i}");
    assert!(i.stderr.contains("nor node-name='n0'"), "{i}");
}

#[test]
fn chains_hundreds_of_images_deep_read_like_qemu() {
    // A snapshot per backup makes chains of hundreds of images; img read at most 64. Data at
    // a few depths, read through 250 images, as qemu-img reads it.
    let env = Env::with_qemu();
    env.qemu_img(&["create", "-q", "-f", "qcow2", "c0.qcow2", "64M"])
        .ok();
    env.qemu_io("qcow2", "c0.qcow2", &["write -P 1 0 1M"]);
    let depth = 250;
    for i in 1..=depth {
        let (me, below) = (format!("c{i}.qcow2"), format!("c{}.qcow2", i - 1));
        env.qemu_img(&[
            "create", "-q", "-u", "-f", "qcow2", "-b", &below, "-F", "qcow2", &me, "64M",
        ])
        .ok();
        if i % 100 == 0 {
            let w = format!("write -P {} {}M 1M", i / 100 + 1, i / 50);
            env.qemu_io("qcow2", &me, &[w.as_str()]);
        }
    }
    let top = format!("c{depth}.qcow2");
    for args in [&["map", "--output=json"][..], &["check"]] {
        let args = [args, &[top.as_str()]].concat();
        assert_eq!(env.img(&args).ok().stdout, env.qemu_img(&args).ok().stdout);
    }
    env.assert_converts_like_qemu(&top, &[]);
    env.img(&["commit", &top]).ok();
    env.qemu_img(&["check", &format!("c{}.qcow2", depth - 1)])
        .ok();
}
