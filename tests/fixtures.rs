//! Every qcow2 fixture (made by qemu-img 10.0.2, see fixtures/README.md) reads through `img`
//! exactly as qemu-img reads it, and `img info` reports what qemu-img reports.

mod common;

use common::Env;
use std::path::PathBuf;

fn fixture(name: &str) -> String {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fixtures")
        .join(name);
    assert!(p.exists(), "fixture {} is missing", p.display());
    p.display().to_string()
}

/// Converts fixture `name` with both tools (plus `extra` arguments) and compares the outputs.
fn converts_like_qemu(name: &str, extra: &[&str]) {
    let env = Env::with_qemu();
    let src = fixture(name);
    let mut args = vec!["convert"];
    args.extend_from_slice(extra);
    args.extend_from_slice(&["-O", "raw", &src]);
    let mut theirs = args.clone();
    theirs.push("qemu.raw");
    env.qemu_img(&theirs).ok();
    args.push("img.raw");
    env.img(&args).ok();
    env.assert_same_bytes("img.raw", "qemu.raw");
}

/// `img info --output=json` on fixture `name` agrees with qemu-img's, field by field ("children"
/// is qemu's protocol node; "actual-size" depends on the checkout's file system).
fn info_like_qemu(name: &str) {
    let env = Env::with_qemu();
    let src = fixture(name);
    let theirs = env.qemu_img(&["info", "--output=json", &src]).ok().json();
    let ours = env.img(&["info", "--output=json", &src]).ok().json();
    for field in [
        "virtual-size",
        "filename",
        "format",
        "cluster-size",
        "backing-filename",
        "dirty-flag",
        "snapshots",
        "format-specific",
    ] {
        assert_eq!(
            ours.get(field),
            theirs.get(field),
            "{name}: field {field:?}\nimg: {ours:#}\nqemu-img: {theirs:#}"
        );
    }
}

#[test]
fn fixture_disk_converts_to_its_raw_twin() {
    let env = Env::new();
    let src = fixture("disk.qcow2");
    env.img(&["convert", "-O", "raw", &src, "out.raw"]).ok();
    common::assert_files_equal(&env.path("out.raw"), &PathBuf::from(fixture("disk.raw")));
    env.img(&["compare", &src, &fixture("disk.raw")]).ok();
}

macro_rules! fixtures {
    ($($file:literal => $convert:ident, $info:ident;)*) => {
        $(
            #[test]
            fn $convert() {
                converts_like_qemu($file, &[]);
            }
            #[test]
            fn $info() {
                info_like_qemu($file);
            }
        )*
    };
}

fixtures! {
    "disk.qcow2" => fixture_disk_converts_like_qemu, fixture_disk_info_like_qemu;
    "v2.qcow2" => fixture_v2_converts_like_qemu, fixture_v2_info_like_qemu;
    "v3.qcow2" => fixture_v3_converts_like_qemu, fixture_v3_info_like_qemu;
    "zlib.qcow2" => fixture_zlib_converts_like_qemu, fixture_zlib_info_like_qemu;
    "zstd.qcow2" => fixture_zstd_converts_like_qemu, fixture_zstd_info_like_qemu;
    "extended_l2.qcow2" => fixture_extended_l2_converts_like_qemu, fixture_extended_l2_info_like_qemu;
    "snapshot.qcow2" => fixture_snapshot_converts_like_qemu, fixture_snapshot_info_like_qemu;
}

/// The encrypted fixtures' passphrase (the fuzzers open every input with it).
const SECRET: &str = "secret,id=s0,data=fuzz";

/// Converts encrypted fixture `name` (`driver` and its key option) to raw with both tools and
/// compares the outputs, then checks it with both.
fn encrypted_converts_like_qemu(name: &str, driver: &str, key: &str) {
    let env = Env::with_qemu();
    let o = format!("driver={driver},file.filename={},{key}=s0", fixture(name));
    let convert = |out: &'static str| {
        [
            "convert",
            "--object",
            SECRET,
            "--image-opts",
            o.as_str(),
            "-O",
            "raw",
            out,
        ]
    };
    env.qemu_img(&convert("qemu.raw")).ok();
    env.img(&convert("img.raw")).ok();
    env.assert_same_bytes("img.raw", "qemu.raw");
    // The data is really there: not an image that reads as zeroes.
    assert!(env.read("img.raw").iter().any(|&b| b != 0), "{name}");
    // qcow2 checks clean; LUKS has no check in qemu-img (exit 63), nor here.
    let check = ["check", "--object", SECRET, "--image-opts", o.as_str()];
    let theirs = env.qemu_img(&check).no_panic();
    let ours = env.img(&check).no_panic();
    assert_eq!(
        ours.code, theirs.code,
        "{name}\nimg: {ours}\nqemu-img: {theirs}"
    );
    assert_eq!(ours.code == Some(0), driver == "qcow2", "{ours}");
}

#[test]
fn fixture_luks_converts_like_qemu() {
    encrypted_converts_like_qemu("disk.luks", "luks", "key-secret");
}

#[test]
fn fixture_luks_qcow2_converts_like_qemu() {
    encrypted_converts_like_qemu("luks.qcow2", "qcow2", "encrypt.key-secret");
}

#[test]
fn fixture_aes_qcow2_converts_like_qemu() {
    encrypted_converts_like_qemu("aes.qcow2", "qcow2", "encrypt.key-secret");
}

/// `info` needs no secret: the encrypted fixtures report what qemu-img reports.
#[test]
fn fixture_encrypted_info_like_qemu() {
    for name in ["disk.luks", "luks.qcow2", "aes.qcow2"] {
        info_like_qemu(name);
    }
}

/// Reading internal snapshots by name: `-l snapshot.name=NAME` gives the snapshot's contents.
#[test]
fn fixture_snapshot_by_name_converts_like_qemu() {
    converts_like_qemu("snapshot.qcow2", &["-l", "snapshot.name=snap1"]);
    converts_like_qemu("snapshot.qcow2", &["-l", "snapshot.name=snap2"]);
}

/// The snapshots really differ from each other and from the active layer, so the test above
/// cannot pass by ignoring `-l`.
#[test]
fn fixture_snapshot_contents_differ() {
    let env = Env::with_qemu();
    let src = fixture("snapshot.qcow2");
    env.qemu_img(&[
        "convert",
        "-l",
        "snapshot.name=snap1",
        "-O",
        "raw",
        &src,
        "s1.raw",
    ])
    .ok();
    env.qemu_img(&["convert", "-O", "raw", &src, "top.raw"])
        .ok();
    assert_ne!(env.read("s1.raw"), env.read("top.raw"));
}

/// A missing snapshot name is an error naming it, as in qemu-img.
#[test]
fn fixture_snapshot_missing_name_fails() {
    let env = Env::new();
    let src = fixture("snapshot.qcow2");
    let out = env
        .img(&[
            "convert",
            "-l",
            "snapshot.name=nope",
            "-O",
            "raw",
            &src,
            "x.raw",
        ])
        .no_panic();
    assert_ne!(out.code, Some(0), "{out}");
    assert!(out.stderr.contains("nope"), "{out}");
}

/// `img check` finds every fixture clean, like qemu-img.
#[test]
fn fixtures_img_check_clean() {
    let env = Env::new();
    for f in [
        "disk.qcow2",
        "v2.qcow2",
        "v3.qcow2",
        "zlib.qcow2",
        "zstd.qcow2",
        "extended_l2.qcow2",
        "snapshot.qcow2",
    ] {
        env.img(&["check", &fixture(f)]).ok();
    }
}
