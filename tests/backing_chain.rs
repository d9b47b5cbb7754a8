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
