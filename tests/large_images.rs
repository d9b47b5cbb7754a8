//! Images past 4 GiB, kept sparse so they cost little disk and time: no 32-bit offset bugs, and
//! conversion streams with bounded memory.

mod common;

use common::{noise, Env, GIB, MIB};
use std::path::Path;
use std::time::Duration;

/// A 6 GiB raw file with data across the 2 GiB and 4 GiB marks and in its last megabytes.
fn six_gib_raw(env: &Env, name: &str) {
    env.sparse_file(name, 6 * GIB);
    env.write_at(name, 2 * GIB - 4096, &noise(1, 8192));
    env.write_at(name, 4 * GIB - 3000, &noise(2, 6000));
    env.write_at(name, 6 * GIB - 3 * MIB, &noise(3, 2 << 20));
    env.write_at(name, 6 * GIB - 512, &[0xfe; 512]);
}

#[test]
fn six_gib_raw_qcow2_raw_roundtrip_equal() {
    let env = Env::with_qemu();
    six_gib_raw(&env, "big.raw");
    env.img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "qcow2",
        "big.raw",
        "big.qcow2",
    ])
    .ok();
    env.qemu_img(&["check", "big.qcow2"]).ok();
    env.qemu_img(&[
        "compare",
        "-f",
        "raw",
        "-F",
        "qcow2",
        "big.raw",
        "big.qcow2",
    ])
    .ok();
    env.img(&[
        "convert",
        "-f",
        "qcow2",
        "-O",
        "raw",
        "big.qcow2",
        "back.raw",
    ])
    .ok();
    assert_eq!(env.len("back.raw"), 6 * GIB);
    env.qemu_img(&["compare", "-f", "raw", "-F", "raw", "big.raw", "back.raw"])
        .ok();
    // The output stays sparse: only the few MiB of data are written.
    let used = env.allocated("back.raw");
    assert!(
        used < 64 * MIB,
        "back.raw uses {used} bytes of disk: not sparse"
    );
}

/// The other direction: a 6 GiB qcow2 made and written by qemu, read by img.
#[test]
fn six_gib_qemu_qcow2_converts_like_qemu() {
    let env = Env::with_qemu();
    env.qemu_img(&["create", "-f", "qcow2", "big.qcow2", "6G"])
        .ok();
    env.qemu_io(
        "qcow2",
        "big.qcow2",
        &[
            "write -P 0x61 2097148k 8k",
            "write -P 0x62 4194300k 8k",
            "write -P 0x63 6141M 2M",
            "write -z 6142M 64k",
            "write -P 0x64 6291455k 1k",
        ],
    );
    env.img(&["convert", "-O", "raw", "big.qcow2", "ours.raw"])
        .ok();
    assert_eq!(env.len("ours.raw"), 6 * GIB);
    env.qemu_img(&["compare", "-F", "raw", "big.qcow2", "ours.raw"])
        .ok();
    let info = env.img(&["info", "--output=json", "big.qcow2"]).ok().json();
    assert_eq!(info["virtual-size"], 6 * GIB, "{info:#}");
}

/// Peak resident memory (KiB) of a successful `img args...` run in `dir`.
fn peak_rss_kib(dir: &Path, args: &[&str]) -> u64 {
    let (out, kib) = common::img_peak_rss(dir, args, Duration::from_secs(300));
    out.ok();
    kib
}

/// Converting a 4 GiB image with about 100 MiB of scattered, incompressible data peaks under
/// 64 MiB of RSS, in both directions.
#[test]
fn four_gib_convert_peak_rss_under_64_mib() {
    let env = Env::with_qemu();
    env.sparse_file("src.raw", 4 * GIB);
    // Three solid 32 MiB runs (more than the budget if a tool buffered a run whole) and
    // scattered 64 KiB pieces across the image.
    let block = noise(9, 32 << 20);
    for at in [100 * MIB, 2 * GIB - 16 * MIB, 4 * GIB - 40 * MIB] {
        env.write_at("src.raw", at, &block);
    }
    for i in 0..64u64 {
        env.write_at("src.raw", i * 64 * MIB + 12345, &noise(i + 100, 64 * 1024));
    }
    let dir = env.dir.path();
    let to_qcow2 = peak_rss_kib(dir, &["convert", "-O", "qcow2", "src.raw", "dst.qcow2"]);
    let to_raw = peak_rss_kib(dir, &["convert", "-O", "raw", "dst.qcow2", "back.raw"]);
    eprintln!(
        "peak RSS converting a 4 GiB image: raw->qcow2 {:.1} MiB, qcow2->raw {:.1} MiB",
        to_qcow2 as f64 / 1024.0,
        to_raw as f64 / 1024.0
    );
    println!("PEAK_RSS_KIB raw->qcow2={to_qcow2} qcow2->raw={to_raw}");
    env.qemu_img(&[
        "compare",
        "-f",
        "raw",
        "-F",
        "qcow2",
        "src.raw",
        "dst.qcow2",
    ])
    .ok();
    env.qemu_img(&["compare", "-f", "raw", "-F", "raw", "src.raw", "back.raw"])
        .ok();
    assert!(to_qcow2 < 64 * 1024, "raw->qcow2 peaked at {to_qcow2} KiB");
    assert!(to_raw < 64 * 1024, "qcow2->raw peaked at {to_raw} KiB");
}

/// qemu-img makes VDI images of up to 512 TiB, with a block map of up to 2 GiB; img read and
/// made only up to 16 TiB, whose 64 MiB map it held whole. A 17 TiB image (a 68 MiB map) made
/// and written by qemu now reads as qemu reads it, in a few MiB, and img's own image of that
/// size takes the same data where qemu finds it.
#[test]
fn vdi_past_sixteen_tib_both_ways_in_bounded_memory() {
    const TIB: u64 = 1 << 40;
    let env = Env::with_qemu();
    env.qemu_img(&["create", "-f", "vdi", "q.vdi", "17T"]).ok();
    let at = [0, 8 * TIB + 3 * MIB, 17 * TIB - MIB];
    let writes: Vec<String> = at
        .iter()
        .zip(0x61..)
        .map(|(o, p)| format!("write -P {p:#x} {o} 1M"))
        .collect();
    env.qemu_io(
        "vdi",
        "q.vdi",
        &writes.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    for args in [["info", "--output=json"], ["map", "--output=json"]] {
        let ours = env.img(&[args[0], args[1], "q.vdi"]).ok();
        let theirs = env.qemu_img(&[args[0], args[1], "q.vdi"]).ok();
        assert_eq!(ours.json(), theirs.json(), "{args:?}");
    }
    let dir = env.dir.path();
    let check = peak_rss_kib(dir, &["check", "q.vdi"]);

    env.img(&["create", "-f", "vdi", "i.vdi", "17T"]).ok();
    env.qemu_img(&["create", "-f", "vdi", "fresh.vdi", "17T"])
        .ok();
    assert_eq!(env.len("i.vdi"), env.len("fresh.vdi"));
    let copy = peak_rss_kib(dir, &["convert", "-n", "-O", "vdi", "q.vdi", "i.vdi"]);
    eprintln!("17 TiB vdi: img check peak {check} KiB, convert -n peak {copy} KiB");
    env.qemu_img(&["check", "i.vdi"]).ok();
    let reads: Vec<String> = at
        .iter()
        .zip(0x61..)
        .map(|(o, p)| format!("read -P {p:#x} {o} 1M"))
        .chain([format!("read -P 0 {} 1M", 4 * TIB)])
        .collect();
    let mut cmd = std::process::Command::new("qemu-io");
    cmd.args(["-f", "vdi", "-r"]).current_dir(dir);
    for r in &reads {
        cmd.args(["-c", r]);
    }
    let out = cmd.arg("i.vdi").output().expect("qemu-io runs");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && !text.contains("fail") && text.matches("read 1048576").count() == 4,
        "{text}"
    );
    env.img(&["compare", "q.vdi", "i.vdi"]).ok();
    assert!(check < 32 * 1024, "img check peaked at {check} KiB");
    assert!(copy < 64 * 1024, "img convert -n peaked at {copy} KiB");
}

#[test]
fn safe_rebase_of_a_mostly_empty_terabyte_chain_reads_only_what_differs() {
    // A 1 TiB overlay moved from one nearly empty base to another: where both chains read as
    // zeroes by their metadata nothing is read, so the rebase takes a moment (qemu-img 10
    // reads the whole terabyte: minutes). What differs is copied as qemu-img copies it.
    let env = Env::with_qemu();
    for b in ["base1.qcow2", "base2.qcow2"] {
        env.qemu_img(&["create", "-q", "-f", "qcow2", b, "1T"]).ok();
    }
    env.qemu_io(
        "qcow2",
        "base1.qcow2",
        &["write -P 1 100G 1M", "write -P 2 500G 64k"],
    );
    env.qemu_io(
        "qcow2",
        "base2.qcow2",
        &["write -P 1 100G 1M", "write -P 3 700G 64k"],
    );
    for (top, compress) in [("ov.qcow2", false), ("ovc.qcow2", true)] {
        env.qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base1.qcow2",
            "-F",
            "qcow2",
            top,
        ])
        .ok();
        env.qemu_io("qcow2", top, &["write -P 9 200G 1M"]);
        let mut args = vec!["rebase", "-b", "base2.qcow2", "-F", "qcow2", top];
        if compress {
            args.insert(1, "-c");
        }
        let started = std::time::Instant::now();
        env.img_timeout(&args, Duration::from_secs(60)).ok();
        let took = started.elapsed();
        assert!(took < Duration::from_secs(20), "rebase took {took:?}");
        env.qemu_img(&["check", top]).ok();
        let out = std::process::Command::new("qemu-io")
            .current_dir(env.dir.path())
            .args(["-f", "qcow2", "-r"])
            .args(["-c", "read -P 9 200G 1M", "-c", "read -P 2 500G 64k"])
            .args(["-c", "read -P 0 700G 64k", "-c", "read -P 1 100G 1M"])
            .arg(top)
            .output()
            .expect("qemu-io runs");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && !text.contains("fail") && text.matches("read ").count() == 4,
            "{text}"
        );
        // The top holds its own data and the two ranges where the chains differ, no more.
        let map = env.qemu_img(&["map", "--output=json", top]).ok().json();
        let own: Vec<u64> = map
            .as_array()
            .expect("a map")
            .iter()
            .filter(|e| e["depth"] == 0 && e["present"] == true)
            .map(|e| e["start"].as_u64().unwrap_or(0) / GIB)
            .collect();
        assert_eq!(own, [200, 500, 700], "{map}");
    }
}

#[test]
fn converting_a_terabyte_over_a_backing_file_zeroes_whole_l2_tables_at_once() {
    // convert -B over a 1 TiB source that holds little: every cluster the source leaves as
    // zeroes is marked zero in the new overlay (its backing file must not show through), as
    // qemu-img does, one L2 table per write: the file comes out byte for byte as qemu-img's,
    // in comparable time (one write per cluster took six times qemu-img's).
    let env = Env::with_qemu();
    for b in ["base1.qcow2", "base2.qcow2"] {
        env.qemu_img(&["create", "-q", "-f", "qcow2", b, "1T"]).ok();
    }
    env.qemu_io("qcow2", "base1.qcow2", &["write -P 1 100G 1M"]);
    env.qemu_io("qcow2", "base2.qcow2", &["write -P 3 700G 64k"]);
    let args = |out: &'static str| {
        [
            "convert",
            "-O",
            "qcow2",
            "-B",
            "base1.qcow2",
            "-F",
            "qcow2",
            "base2.qcow2",
            out,
        ]
    };
    let t = std::time::Instant::now();
    env.qemu_img(&args("q.qcow2")).ok();
    let theirs = t.elapsed();
    let t = std::time::Instant::now();
    env.img(&args("i.qcow2")).ok();
    let ours = t.elapsed();
    env.assert_same_bytes("i.qcow2", "q.qcow2");
    assert!(
        ours < theirs * 3 + Duration::from_secs(1),
        "img {ours:?}, qemu-img {theirs:?}"
    );
}

#[test]
fn small_clusters_with_a_large_l1_table_create_resize_and_snapshot_like_qemu() {
    // 512-byte clusters over 32 GiB: the L1 table alone spans dozens of refcount blocks, which
    // one allocation must place. img refused such images as inconsistent.
    let env = Env::with_qemu();
    let create = |f| {
        [
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=512",
            f,
            "32G",
        ]
    };
    env.img(&create("i.qcow2")).ok();
    env.qemu_img(&["check", "i.qcow2"]).ok();
    env.qemu_img(&create("q.qcow2")).ok();
    env.qemu_io("qcow2", "q.qcow2", &["write -P 0x42 20G 64k"]);
    for args in [
        &["resize", "q.qcow2", "+1G"][..],
        &["snapshot", "-c", "s1", "q.qcow2"],
        &["resize", "i.qcow2", "33G"],
    ] {
        env.img(args).ok();
    }
    for f in ["i.qcow2", "q.qcow2"] {
        env.qemu_img(&["check", f]).ok();
    }
    let info = env
        .qemu_img(&["info", "--output=json", "q.qcow2"])
        .ok()
        .json();
    assert_eq!(info["virtual-size"], 33 * GIB, "{info}");
    assert_eq!(info["snapshots"][0]["name"], "s1", "{info}");
    env.qemu_io("qcow2", "q.qcow2", &["read -P 0x42 20G 64k"]);
}

#[test]
fn downgrading_an_image_with_many_snapshots_reads_one_l1_table_at_a_time() {
    // 64 TiB (a 1 MiB L1 table) with 60 internal snapshots: amend to compat=0.10 held every
    // snapshot's L1 table at once (70 MiB here); one at a time it stays small, as qemu-img.
    let env = Env::with_qemu();
    env.qemu_img(&["create", "-q", "-f", "qcow2", "hs.qcow2", "64T"])
        .ok();
    env.qemu_io(
        "qcow2",
        "hs.qcow2",
        &["write -P 1 1G 64k", "write -P 2 40T 64k"],
    );
    for i in 0..60 {
        env.qemu_img(&["snapshot", "-c", &format!("s{i}"), "hs.qcow2"])
            .ok();
    }
    let kib = peak_rss_kib(env.dir.path(), &["amend", "-o", "compat=0.10", "hs.qcow2"]);
    env.qemu_img(&["check", "hs.qcow2"]).ok();
    env.qemu_io("qcow2", "hs.qcow2", &["read -P 2 40T 64k"]);
    assert!(kib < 32 * 1024, "img amend peaked at {kib} KiB");
}

#[test]
fn split_vmdks_past_two_tib_open_like_qemu() {
    // twoGbMaxExtentSparse over 2 TiB lists more than 1024 extents, the cap img had: it made
    // such disks and could not open them. Just past it (1025 extents), both ways.
    let env = Env::with_qemu();
    env.img(&[
        "create",
        "-q",
        "-f",
        "vmdk",
        "-o",
        "subformat=twoGbMaxExtentSparse",
        "s.vmdk",
        "2050G",
    ])
    .ok();
    env.qemu_img(&["create", "-q", "-f", "qcow2", "src.qcow2", "2050G"])
        .ok();
    env.qemu_io(
        "qcow2",
        "src.qcow2",
        &["write -P 7 2049G 1M", "write -P 8 100G 64k"],
    );
    env.img(&["convert", "-n", "-O", "vmdk", "src.qcow2", "s.vmdk"])
        .ok();
    for args in [&["info", "--output=json"][..], &["map", "--output=json"]] {
        let args = [args, &["s.vmdk"]].concat();
        assert_eq!(env.img(&args).ok().json(), env.qemu_img(&args).ok().json());
    }
    env.qemu_img(&["check", "s.vmdk"]).ok();
    env.qemu_io(
        "vmdk",
        "s.vmdk",
        &["read -P 7 2049G 1M", "read -P 8 100G 64k"],
    );
    env.img(&["compare", "src.qcow2", "s.vmdk"]).ok();
}
