//! The qcow2 lifecycle subcommands against qemu-img: snapshot, resize, rebase, commit, amend
//! and measure. Each runs `img` and qemu-img on twin images and compares what they print and
//! what the images hold afterwards (read back by qemu-img).

#![allow(clippy::cast_possible_truncation)] // test sizes are small constants

mod common;

use common::{Env, MIB};

/// The guest contents of `file` as qemu-img reads them.
#[track_caller]
fn qemu_contents(env: &Env, file: &str) -> Vec<u8> {
    let raw = format!("{file}.contents.raw");
    env.qemu_img(&["convert", "-O", "raw", file, &raw]).ok();
    let data = env.read(&raw);
    std::fs::remove_file(env.path(&raw)).expect("remove contents file");
    data
}

/// qemu-img check must call the image clean.
#[track_caller]
fn qemu_clean(env: &Env, file: &str) {
    let out = env.qemu_img(&["check", file]);
    assert_eq!(out.code, Some(0), "qemu-img check is not clean: {out}");
}

/// Runs the same arguments through qemu-img and `img` and asserts equal exit codes, stdout and
/// stderr (with `qemu-img:` read as `img:`). `{}` in an argument becomes `q` or `i`, so each
/// tool works on its own twin of the images.
#[track_caller]
fn same_as_qemu(env: &Env, args: &[&str]) -> common::Output {
    let q: Vec<String> = args.iter().map(|a| a.replace("{}", "q")).collect();
    let i: Vec<String> = args.iter().map(|a| a.replace("{}", "i")).collect();
    let qo = env.qemu_img(&q.iter().map(String::as_str).collect::<Vec<_>>());
    let io = env
        .img(&i.iter().map(String::as_str).collect::<Vec<_>>())
        .no_panic();
    let norm = |s: &str, tag: &str| {
        s.replace("qemu-img", "img")
            .replace(&format!("{tag}."), "X.")
            .replace(&format!("{tag}0."), "X0.")
            .replace(&format!("{tag}1."), "X1.")
            .replace(&format!("{tag}2."), "X2.")
    };
    assert_eq!(qo.code, io.code, "exit codes differ:{qo}{io}");
    assert_eq!(
        norm(&qo.stdout, "q"),
        norm(&io.stdout, "i"),
        "stdout differs:{qo}{io}"
    );
    assert_eq!(
        norm(&qo.stderr, "q"),
        norm(&io.stderr, "i"),
        "stderr differs:{qo}{io}"
    );
    io
}

/// A qcow2 image with data in a few places, twice: `q.qcow2` and `i.qcow2`.
fn twins(env: &Env, size: &str, opts: &str) {
    for t in ["q", "i"] {
        let f = format!("{t}.qcow2");
        env.qemu_img(&["create", "-q", "-f", "qcow2", "-o", opts, &f, size])
            .ok();
        env.qemu_io(
            "qcow2",
            &f,
            &["write -P 0x11 0 100k", "write -P 0x22 700k 300k"],
        );
    }
}

/// A three-image chain `{t}0 <- {t}1 <- {t}2` with data, zeroes and overrides at each level.
fn chain(env: &Env, t: &str) {
    let (b, m, top) = (
        format!("{t}0.qcow2"),
        format!("{t}1.qcow2"),
        format!("{t}2.qcow2"),
    );
    env.qemu_img(&["create", "-q", "-f", "qcow2", &b, "4M"])
        .ok();
    env.qemu_io("qcow2", &b, &["write -P 1 0 1M", "write -P 2 2M 512k"]);
    env.qemu_img(&["create", "-q", "-f", "qcow2", "-b", &b, "-F", "qcow2", &m])
        .ok();
    env.qemu_io("qcow2", &m, &["write -P 3 512k 1M", "write -z 2M 64k"]);
    env.qemu_img(&["create", "-q", "-f", "qcow2", "-b", &m, "-F", "qcow2", &top])
        .ok();
    env.qemu_io("qcow2", &top, &["write -P 4 3M 100k", "write -z 600k 4k"]);
}

// ---------------------------------------------------------------------------------------------
// snapshot

/// The whole interop sequence of the issue: img creates, qemu-io edits, img applies and
/// deletes, qemu-img applies what img made; qemu-img check is clean after every step.
#[test]
fn snapshot_interop_both_ways() {
    let env = Env::with_qemu();
    env.qemu_img(&["create", "-q", "-f", "qcow2", "s.qcow2", "4M"])
        .ok();
    env.qemu_io("qcow2", "s.qcow2", &["write -P 0x5a 0 1M"]);
    let original = qemu_contents(&env, "s.qcow2");
    env.img(&["snapshot", "-c", "s1", "s.qcow2"]).ok();
    qemu_clean(&env, "s.qcow2");
    env.qemu_io(
        "qcow2",
        "s.qcow2",
        &["write -P 0xa5 512k 1M", "write -z 0 64k", "discard 3M 1M"],
    );
    let edited = qemu_contents(&env, "s.qcow2");
    env.img(&["snapshot", "-c", "s2", "s.qcow2"]).ok();
    qemu_clean(&env, "s.qcow2");
    env.img(&["snapshot", "-a", "s1", "s.qcow2"]).ok();
    qemu_clean(&env, "s.qcow2");
    assert!(qemu_contents(&env, "s.qcow2") == original, "apply s1");
    env.img(&["snapshot", "-d", "s1", "s.qcow2"]).ok();
    qemu_clean(&env, "s.qcow2");
    env.qemu_img(&["snapshot", "-a", "s2", "s.qcow2"]).ok();
    qemu_clean(&env, "s.qcow2");
    assert!(
        qemu_contents(&env, "s.qcow2") == edited,
        "qemu applies img's s2"
    );
    // And the other way: qemu-img makes one, img applies and deletes it.
    env.qemu_img(&["snapshot", "-c", "q1", "s.qcow2"]).ok();
    env.qemu_io("qcow2", "s.qcow2", &["write -P 0x77 0 2M"]);
    env.img(&["snapshot", "-a", "q1", "s.qcow2"]).ok();
    assert!(
        qemu_contents(&env, "s.qcow2") == edited,
        "img applies qemu's q1"
    );
    env.img(&["snapshot", "-d", "q1", "s.qcow2"]).ok();
    env.img(&["snapshot", "-d", "s2", "s.qcow2"]).ok();
    qemu_clean(&env, "s.qcow2");
    let list = env.qemu_img(&["snapshot", "-l", "s.qcow2"]).ok();
    assert_eq!(list.stdout, "", "all snapshots deleted");
}

/// `img snapshot -l` prints qemu-img's table byte for byte (for snapshots made by either tool),
/// and nothing for an image without snapshots.
#[test]
fn snapshot_listing_matches_qemu() {
    let env = Env::with_qemu();
    env.qemu_img(&["create", "-q", "-f", "qcow2", "l.qcow2", "1M"])
        .ok();
    assert_eq!(env.img(&["snapshot", "-l", "l.qcow2"]).ok().stdout, "");
    env.qemu_img(&["snapshot", "-c", "from-qemu", "l.qcow2"])
        .ok();
    env.img(&["snapshot", "-c", "from-img", "l.qcow2"]).ok();
    env.img(&["snapshot", "-c", "a-rather-long-snapshot-tag", "l.qcow2"])
        .ok();
    for args in [&["snapshot", "-l", "l.qcow2"][..], &["snapshot", "l.qcow2"]] {
        let q = env.qemu_img(args).ok();
        let i = env.img(args).ok();
        assert_eq!(i.stdout, q.stdout, "listing differs:{q}{i}");
        assert!(i.stdout.starts_with("Snapshot list:\nID      TAG"));
    }
    // `info` shows the same table.
    let q = env.qemu_img(&["info", "l.qcow2"]).ok();
    let i = env.img(&["info", "l.qcow2"]).ok();
    assert_eq!(i.stdout, q.stdout);
    // Dated as qemu dates them: microseconds, stored in the nanoseconds field.
    let info = env
        .qemu_img(&["info", "--output=json", "l.qcow2"])
        .ok()
        .json();
    for s in info["snapshots"].as_array().expect("snapshots") {
        let nsec = s["date-nsec"].as_u64().expect("date-nsec");
        assert_eq!(nsec % 1000, 0, "{s}");
    }
}

/// A snapshot of a disk that has since grown, or shrunk, reads at the disk's current size (qemu
/// swaps in the snapshot's L1 table and keeps the size): `convert -l` and `measure -l` give what
/// qemu-img gives.
#[test]
fn snapshot_of_a_resized_disk_converts_and_measures_like_qemu() {
    let env = Env::with_qemu();
    env.qemu_img(&["create", "-q", "-f", "qcow2", "r.qcow2", "1M"])
        .ok();
    env.qemu_io("qcow2", "r.qcow2", &["write -P 0x11 0 64k"]);
    env.qemu_img(&["snapshot", "-c", "small", "r.qcow2"]).ok();
    env.qemu_img(&["resize", "-q", "r.qcow2", "3M"]).ok();
    env.qemu_io("qcow2", "r.qcow2", &["write -P 0x22 2M 64k"]);
    env.qemu_img(&["snapshot", "-c", "big", "r.qcow2"]).ok();
    env.qemu_img(&["resize", "-q", "--shrink", "r.qcow2", "2M"])
        .ok();
    for snap in ["small", "big"] {
        let l = format!("snapshot.name={snap}");
        env.qemu_img(&["convert", "-l", &l, "-O", "raw", "r.qcow2", "q.raw"])
            .ok();
        env.img(&["convert", "-l", &l, "-O", "raw", "r.qcow2", "i.raw"])
            .ok();
        assert_eq!(env.len("q.raw"), 2 * MIB, "{snap}");
        env.assert_same_bytes("i.raw", "q.raw");
        for out in ["--output=human", "--output=json"] {
            for fmt in ["raw", "qcow2"] {
                let q = env
                    .qemu_img(&["measure", out, "-O", fmt, "-l", snap, "r.qcow2"])
                    .ok();
                let i = env
                    .img(&["measure", out, "-O", fmt, "-l", snap, "r.qcow2"])
                    .ok();
                assert_eq!(i.stdout, q.stdout, "{snap} {out} {fmt}:{q}{i}");
            }
        }
    }
}

/// `-l` picks snapshots as qemu-img does when names look like IDs: `snapshot.name=` by name
/// only, `snapshot.id=` by ID only, a bare string by ID first, both keys only a snapshot with
/// both; what each finds (or the failure) is qemu-img's.
#[test]
fn snapshot_selection_by_id_and_name_matches_qemu() {
    let env = Env::with_qemu();
    // ID 1 is named "2"; ID 2 is named "x".
    env.snapshot_history(
        "s.qcow2",
        "1M",
        &[
            (1, "64k", Some("2")),
            (2, "64k", Some("x")),
            (3, "64k", None),
        ],
    );
    for l in [
        "snapshot.name=2",
        "snapshot.id=2",
        "2",
        "x",
        "snapshot.id=2,snapshot.name=x",
        "snapshot.id=1,snapshot.name=x",
        "snapshot.id=3",
    ] {
        let q = env.qemu_img(&["convert", "-l", l, "-O", "raw", "s.qcow2", "q.raw"]);
        let i = env
            .img(&["convert", "-l", l, "-O", "raw", "s.qcow2", "i.raw"])
            .no_panic();
        assert_eq!(i.code, q.code, "{l}:{q}{i}");
        if q.code == Some(0) {
            env.assert_same_bytes("i.raw", "q.raw");
        }
    }
}

/// Reverting to or deleting a snapshot gives the host back the space of the clusters it frees,
/// as qemu-img does (it discards them): the file holds about what qemu-img's holds.
#[test]
fn snapshot_apply_and_delete_give_freed_space_back_like_qemu() {
    let env = Env::with_qemu();
    env.snapshot_history(
        "s.qcow2",
        "64M",
        &[(1, "8M", Some("a")), (2, "8M", Some("b")), (3, "4M", None)],
    );
    let src = env.read("s.qcow2");
    for op in [["-a", "a"], ["-d", "a"], ["-d", "b"]] {
        env.space_like_qemu(&src, &["snapshot", op[0], op[1], "{}"], 512 << 10);
    }
}

/// Errors and exit codes: unknown names, two actions, formats without snapshots.
#[test]
fn snapshot_errors_match_qemu() {
    let env = Env::with_qemu();
    for t in ["q", "i"] {
        env.qemu_img(&["create", "-q", "-f", "qcow2", &format!("{t}.qcow2"), "1M"])
            .ok();
        env.qemu_img(&["snapshot", "-c", "s1", &format!("{t}.qcow2")])
            .ok();
        env.qemu_img(&["create", "-q", "-f", "raw", &format!("{t}.raw"), "1M"])
            .ok();
    }
    for args in [
        &["snapshot", "-a", "nope", "{}.qcow2"][..],
        &["snapshot", "-d", "nope", "{}.qcow2"],
        // qemu-img deletes by name only.
        &["snapshot", "-d", "1", "{}.qcow2"],
        &["snapshot", "-l", "-c", "x", "{}.qcow2"],
        &["snapshot", "-c", "a", "-c", "b", "{}.qcow2"],
        &["snapshot", "-f", "raw", "-c", "x", "{}.raw"],
        &["snapshot", "-f", "raw", "-a", "x", "{}.raw"],
        &["snapshot", "-f", "raw", "-d", "x", "{}.raw"],
        &["snapshot", "-l", "{}.raw"],
        &["snapshot", "-l", "missing.qcow2"],
        // Apply by ID works in both.
        &["snapshot", "-a", "1", "{}.qcow2"],
        &["snapshot", "-q", "-d", "s1", "{}.qcow2"],
    ] {
        same_as_qemu(&env, args);
    }
}

// ---------------------------------------------------------------------------------------------
// resize

/// A sequence of resizes, relative and absolute, refused and accepted, with preallocation:
/// messages, exit codes and the resulting images equal qemu-img's.
#[test]
fn resize_grow_shrink_and_refusals_match_qemu() {
    let env = Env::with_qemu();
    twins(&env, "1M", "compat=1.1");
    for args in [
        &["resize", "{}.qcow2", "2M"][..],
        &["resize", "{}.qcow2", "1M"],
        &["resize", "--shrink", "{}.qcow2", "1536k"],
        &["resize", "{}.qcow2", "+1000"],
        &["resize", "{}.qcow2", "-512"],
        &["resize", "--shrink", "{}.qcow2", "-512"],
        &["resize", "-q", "{}.qcow2", "+1M"],
        &["resize", "{}.qcow2", "-10M"],
        &["resize", "{}.qcow2", "abc"],
        &["resize", "{}.qcow2", "0"],
        &["resize", "--preallocation=foo", "{}.qcow2", "3M"],
        &["resize", "--preallocation=full", "{}.qcow2", "3M"],
        &["resize", "--preallocation=metadata", "{}.qcow2", "4M"],
        &["resize", "--preallocation=falloc", "{}.qcow2", "4M"],
        &["resize", "--shrink", "{}.qcow2", "-3M"],
        &["resize", "{}.qcow2", "3M"],
    ] {
        same_as_qemu(&env, args);
        qemu_clean(&env, "i.qcow2");
        assert!(
            qemu_contents(&env, "i.qcow2") == qemu_contents(&env, "q.qcow2"),
            "contents differ after {args:?}"
        );
    }
    // Data written before the shrink below 1 MiB survives; the regrown tail reads as zeroes.
    let data = qemu_contents(&env, "i.qcow2");
    assert_eq!(data.len(), 3 * MIB as usize);
    assert!(data[..100 * 1024].iter().all(|&b| b == 0x11));
    assert!(data[(MIB as usize)..].iter().all(|&b| b == 0));
}

/// raw resizes (qemu allows sizes that are not sector multiples there) and refusals for
/// formats and images qemu refuses: metadata preallocation of raw, v2 qcow2 with snapshots.
#[test]
fn resize_raw_and_v2_snapshots_match_qemu() {
    let env = Env::with_qemu();
    for t in ["q", "i"] {
        env.qemu_img(&["create", "-q", "-f", "raw", &format!("{t}.raw"), "1M"])
            .ok();
        let v2 = format!("{t}.v2.qcow2");
        env.qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "compat=0.10",
            &v2,
            "1M",
        ])
        .ok();
        env.qemu_img(&["snapshot", "-c", "s", &v2]).ok();
    }
    for args in [
        &["resize", "-f", "raw", "{}.raw", "+1000"][..],
        &["resize", "-f", "raw", "{}.raw", "1000"],
        &["resize", "-f", "raw", "--shrink", "{}.raw", "-1000"],
        &[
            "resize",
            "-f",
            "raw",
            "--preallocation=metadata",
            "{}.raw",
            "3M",
        ],
        &[
            "resize",
            "-f",
            "raw",
            "--preallocation=falloc",
            "{}.raw",
            "3M",
        ],
        &["resize", "{}.v2.qcow2", "2M"],
        &["resize", "missing.qcow2", "2M"],
    ] {
        same_as_qemu(&env, args);
    }
    assert_eq!(env.len("i.raw"), env.len("q.raw"));
    // A v3 image with snapshots grows.
    env.qemu_img(&["create", "-q", "-f", "qcow2", "v3.qcow2", "1M"])
        .ok();
    env.img(&["snapshot", "-c", "s", "v3.qcow2"]).ok();
    env.img(&["resize", "v3.qcow2", "2M"]).ok();
    qemu_clean(&env, "v3.qcow2");
}

// ---------------------------------------------------------------------------------------------
// rebase and commit

fn assert_chains_equal(env: &Env, levels: &[usize]) {
    for n in levels {
        let (q, i) = (format!("q{n}.qcow2"), format!("i{n}.qcow2"));
        qemu_clean(env, &i);
        assert!(
            qemu_contents(env, &q) == qemu_contents(env, &i),
            "level {n} differs from qemu-img's"
        );
    }
}

/// Safe rebase onto the bottom image, unsafe rebase, and flattening with `-b ""`: the results
/// equal qemu-img's (contents, backing reference, and which ranges the overlay holds).
#[test]
fn rebase_safe_unsafe_flatten_match_qemu() {
    let env = Env::with_qemu();
    for (name, args) in [
        (
            "safe",
            &["rebase", "-b", "{}0.qcow2", "-F", "qcow2", "{}2.qcow2"][..],
        ),
        (
            "unsafe",
            &[
                "rebase",
                "-u",
                "-b",
                "{}0.qcow2",
                "-F",
                "qcow2",
                "{}2.qcow2",
            ],
        ),
        ("flatten", &["rebase", "-b", "", "{}2.qcow2"]),
        ("unsafe without -b", &["rebase", "-u", "{}2.qcow2"]),
    ] {
        chain(&env, "q");
        chain(&env, "i");
        let before = qemu_contents(&env, "i2.qcow2");
        same_as_qemu(&env, args);
        assert_chains_equal(&env, &[0, 1, 2]);
        let qi = env
            .qemu_img(&["info", "--output=json", "q2.qcow2"])
            .ok()
            .json();
        let ii = env
            .qemu_img(&["info", "--output=json", "i2.qcow2"])
            .ok()
            .json();
        assert_eq!(
            ii["backing-filename"].as_str().map(|s| s.replace('i', "q")),
            qi["backing-filename"].as_str().map(str::to_owned),
            "{name}: backing files differ"
        );
        let strip = |v: serde_json::Value| {
            v.as_array()
                .unwrap()
                .iter()
                .map(|e| {
                    (
                        e["start"].clone(),
                        e["length"].clone(),
                        e["depth"].clone(),
                        e["data"].clone(),
                    )
                })
                .collect::<Vec<_>>()
        };
        let qm = env
            .qemu_img(&["map", "--output=json", "q2.qcow2"])
            .ok()
            .json();
        let im = env
            .qemu_img(&["map", "--output=json", "i2.qcow2"])
            .ok()
            .json();
        assert_eq!(strip(im), strip(qm), "{name}: allocation differs");
        if name == "safe" || name == "flatten" {
            assert!(
                qemu_contents(&env, "i2.qcow2") == before,
                "{name} changed the contents"
            );
        }
    }
}

#[test]
fn rebase_errors_match_qemu() {
    let env = Env::with_qemu();
    chain(&env, "q");
    chain(&env, "i");
    for args in [
        &["rebase", "{}2.qcow2"][..],
        &["rebase", "-F", "qcow2", "{}2.qcow2"],
        &["rebase", "-b", "missing.qcow2", "-F", "qcow2", "{}2.qcow2"],
        &["rebase", "-u", "-b", "missing.qcow2", "{}2.qcow2"],
        &[
            "rebase",
            "-t",
            "foo",
            "-b",
            "{}0.qcow2",
            "-F",
            "qcow2",
            "{}2.qcow2",
        ],
    ] {
        same_as_qemu(&env, args);
    }
    // qemu-img copies the data before it notices the missing -F; img refuses up front, with
    // the same message.
    let out = env
        .img(&["rebase", "-b", "i0.qcow2", "i2.qcow2"])
        .code_is(1);
    assert_eq!(
        out.stderr,
        "img: Could not change the backing file to 'i0.qcow2': backing format must be specified\n"
    );
}

/// Rebasing onto an image already in the chain (dropping the layers between) compares only
/// what those layers and the image hold, as qemu does: the rest of the new base is never read.
/// Here the base's one data cluster is corrupt, so a rebase that read it would fail; like
/// qemu-img's, img's succeeds and moves the dropped layer's data into the image.
#[test]
fn rebase_onto_a_base_in_the_chain_reads_only_the_dropped_layers_like_qemu() {
    let env = Env::with_qemu();
    let mut text = Vec::new();
    while text.len() < 65536 {
        text.extend_from_slice(b"The quick brown fox jumps over the lazy dog. ");
    }
    env.sparse_file("s.raw", MIB);
    env.write_at("s.raw", 0, &text[..65536]);
    for t in ["q", "i"] {
        let (b, m, top) = (
            format!("{t}b.qcow2"),
            format!("{t}m.qcow2"),
            format!("{t}.qcow2"),
        );
        env.qemu_img(&[
            "convert", "-q", "-c", "-f", "raw", "-O", "qcow2", "s.raw", &b,
        ])
        .ok();
        // The first cluster's compressed bytes, found through L1[0] and L2[0], made garbage.
        let mut bytes = env.read(&b);
        let be = |d: &[u8], o: u64| {
            let o = usize::try_from(o).unwrap();
            u64::from_be_bytes(d[o..o + 8].try_into().unwrap())
        };
        let l2 = be(&bytes, be(&bytes, 40)) & 0x00ff_ffff_ffff_fe00;
        let host = usize::try_from(be(&bytes, l2) & ((1 << 54) - 1)).unwrap();
        bytes[host..host + 256].fill(0xff);
        env.write(&b, &bytes);
        env.qemu_img(&["create", "-q", "-f", "qcow2", "-b", &b, "-F", "qcow2", &m])
            .ok();
        env.qemu_io("qcow2", &m, &["write -P 1 512k 64k"]);
        env.qemu_img(&["create", "-q", "-f", "qcow2", "-b", &m, "-F", "qcow2", &top])
            .ok();
        env.qemu_io("qcow2", &top, &["write -P 2 768k 64k"]);
    }
    same_as_qemu(
        &env,
        &["rebase", "-b", "{}b.qcow2", "-F", "qcow2", "{}.qcow2"],
    );
    qemu_clean(&env, "i.qcow2");
    let info = env
        .qemu_img(&["info", "--output=json", "i.qcow2"])
        .ok()
        .json();
    assert_eq!(info["backing-filename"], "ib.qcow2", "{info:#}");
    env.qemu_io(
        "qcow2",
        "i.qcow2",
        &[
            "read -P 1 512k 64k",
            "read -P 2 768k 64k",
            "read -P 0 64k 448k",
        ],
    );
}

/// `rebase -c` asks the format whether it compresses, not the image: a qcow2 with an external
/// data file takes `-u -c` and a safe rebase that only records zeroes, as in qemu. Where data
/// must be copied, the rebase fails with qemu's message, before writing anything.
#[test]
fn rebase_compressed_on_a_data_file_image_like_qemu() {
    let env = Env::with_qemu();
    for t in ["q", "i"] {
        let b = format!("{t}b.qcow2");
        env.qemu_img(&["create", "-q", "-f", "qcow2", &b, "4M"])
            .ok();
        env.qemu_io("qcow2", &b, &["write -P 3 0 1M"]);
        let opts = format!("data_file={t}.data");
        let f = format!("{t}.qcow2");
        env.qemu_img(&["create", "-q", "-f", "qcow2", "-o", &opts, &f, "4M"])
            .ok();
        env.qemu_io("qcow2", &f, &["write -P 4 2M 64k"]);
    }
    same_as_qemu(
        &env,
        &[
            "rebase",
            "-u",
            "-c",
            "-b",
            "{}b.qcow2",
            "-F",
            "qcow2",
            "{}.qcow2",
        ],
    );
    same_as_qemu(&env, &["rebase", "-u", "-c", "-b", "", "{}.qcow2"]);
    // Only zeroes to record over the new backing file's data.
    same_as_qemu(
        &env,
        &["rebase", "-c", "-b", "{}b.qcow2", "-F", "qcow2", "{}.qcow2"],
    );
    assert!(qemu_contents(&env, "i.qcow2") == qemu_contents(&env, "q.qcow2"));
    qemu_clean(&env, "i.qcow2");
    // Data to copy: refused, and the image is as it was.
    for t in ["q", "i"] {
        env.qemu_io("qcow2", &format!("{t}b.qcow2"), &["write -P 5 3M 64k"]);
    }
    let before = qemu_contents(&env, "i.qcow2");
    let out = same_as_qemu(&env, &["rebase", "-c", "-b", "", "{}.qcow2"]);
    assert_eq!(out.code, Some(1), "{out}");
    let info = env
        .qemu_img(&["info", "--output=json", "i.qcow2"])
        .ok()
        .json();
    assert_eq!(info["backing-filename"], "ib.qcow2", "{info:#}");
    assert!(qemu_contents(&env, "i.qcow2") == before);
    qemu_clean(&env, "i.qcow2");
}

/// Commit into the immediate backing file, with -d, and into the bottom with -b (which
/// implies -d): every level of the chain equals what qemu-img commit leaves.
#[test]
fn commit_matches_qemu() {
    let env = Env::with_qemu();
    for args in [
        &["commit", "{}2.qcow2"][..],
        &["commit", "-d", "{}2.qcow2"],
        &["commit", "-b", "{}0.qcow2", "{}2.qcow2"],
        &["commit", "-q", "-p", "{}2.qcow2"],
    ] {
        chain(&env, "q");
        chain(&env, "i");
        let out = same_as_qemu(&env, args);
        assert_eq!(
            out.stdout,
            if args.contains(&"-q") {
                ""
            } else {
                "Image committed.\n"
            }
        );
        assert_chains_equal(&env, &[0, 1, 2]);
    }
    for args in [
        &["commit", "{}0.qcow2"][..],
        &["commit", "-b", "missing.qcow2", "{}2.qcow2"],
        &["commit", "-b", "{}2.qcow2", "{}2.qcow2"],
        &["commit", "-f", "raw", "{}2.qcow2"],
        &["commit", "missing.qcow2"],
    ] {
        same_as_qemu(&env, args);
    }
}

/// An overlay emptied by commit gives its freed clusters back to the filesystem and ends at its
/// last cluster in use, as qemu-img's emptying truncates it (img left it at its full length:
/// 17 MiB here, against qemu-img's 256 KiB; then at its last L2 table, past the data); it
/// stays usable.
#[test]
fn commit_empties_the_overlay_file() {
    let env = Env::with_qemu();
    env.qemu_img(&["create", "-q", "-f", "qcow2", "base.qcow2", "1G"])
        .ok();
    env.qemu_io("qcow2", "base.qcow2", &["write -P 1 0 8M"]);
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
    // The second L2 table lands after the first 16 MiB of data.
    env.qemu_io(
        "qcow2",
        "ov.qcow2",
        &["write -P 2 4M 16M", "write -P 4 600M 1M"],
    );
    env.img(&["commit", "-q", "ov.qcow2"]).ok();
    env.qemu_img(&["compare", "base.qcow2", "ov.qcow2"]).ok();
    let check = env
        .qemu_img(&["check", "--output=json", "ov.qcow2"])
        .ok()
        .json();
    assert_eq!(check["image-end-offset"], env.len("ov.qcow2"));
    assert!(env.len("ov.qcow2") < 512 * 1024, "{}", env.len("ov.qcow2"));
    env.qemu_io("qcow2", "ov.qcow2", &["write -P 3 1M 1M"]);
    env.qemu_img(&["check", "ov.qcow2"]).ok();
}

// ---------------------------------------------------------------------------------------------
// amend

/// compat down and up, refcount_bits, lazy_refcounts and size: `qemu-img info` describes the
/// amended image as it describes qemu-img's, the contents are unchanged, checks are clean.
#[test]
fn amend_matches_qemu_info() {
    let env = Env::with_qemu();
    twins(&env, "2M", "compat=1.1");
    let contents = qemu_contents(&env, "q.qcow2");
    for opts in [
        "compat=0.10",
        "compat=1.1,refcount_bits=8",
        "refcount_bits=64",
        "lazy_refcounts=on",
        "lazy_refcounts=off,refcount_bits=16",
        "size=4M",
        "size=2M",
        "compat=v2",
        "compat=v3",
    ] {
        same_as_qemu(&env, &["amend", "-o", opts, "{}.qcow2"]);
        qemu_clean(&env, "i.qcow2");
        let q = env
            .qemu_img(&["info", "--output=json", "q.qcow2"])
            .ok()
            .json();
        let i = env
            .qemu_img(&["info", "--output=json", "i.qcow2"])
            .ok()
            .json();
        assert_eq!(i["format-specific"], q["format-specific"], "after {opts}");
        assert_eq!(i["virtual-size"], q["virtual-size"], "after {opts}");
        let now = qemu_contents(&env, "i.qcow2");
        assert!(
            now == qemu_contents(&env, "q.qcow2"),
            "contents after {opts}"
        );
        assert!(now[..contents.len().min(now.len())] == contents[..contents.len().min(now.len())]);
    }
}

#[test]
fn amend_refusals_match_qemu() {
    let env = Env::with_qemu();
    twins(&env, "1M", "compat=1.1");
    for t in ["q", "i"] {
        env.qemu_img(&["create", "-q", "-f", "raw", &format!("{t}.raw"), "1M"])
            .ok();
        let data = format!("data_file={t}.data");
        let f = format!("{t}2.qcow2");
        env.qemu_img(&["create", "-q", "-f", "qcow2", "-o", &data, &f, "1M"])
            .ok();
    }
    for args in [
        &["amend", "-o", "compat=0.10", "{}2.qcow2"][..],
        &["amend", "-o", "cluster_size=4k", "{}.qcow2"],
        &["amend", "-o", "foo=bar", "{}.qcow2"],
        &["amend", "{}.qcow2"],
        &["amend", "-f", "raw", "-o", "size=1M", "{}.raw"],
        &[
            "amend",
            "-o",
            "compat=0.10",
            "-o",
            "lazy_refcounts=on",
            "{}.qcow2",
        ],
        &["amend", "-o", "refcount_bits=3", "{}.qcow2"],
        &["amend", "-o", "compat=2", "{}.qcow2"],
        &["amend", "-o", "help", "{}.qcow2"],
    ] {
        same_as_qemu(&env, args);
    }
}

/// Growing an overlay through `amend -o size=` over a larger backing image: as with `resize`,
/// the new space reads as zeroes (qemu writes zero clusters there), never as the backing
/// image's old data; also when the same amend downgrades to compat=0.10, and from an old end
/// that is not on a cluster boundary.
#[test]
fn amend_growing_over_a_larger_backing_reads_zeroes_like_qemu() {
    let env = Env::with_qemu();
    for (n, opts) in ["size=8M", "compat=v2,size=8M", "size=8M,lazy_refcounts=on"]
        .iter()
        .enumerate()
    {
        for t in ["q", "i"] {
            let (b, o) = (format!("{t}{n}b.qcow2"), format!("{t}{n}.qcow2"));
            env.qemu_img(&["create", "-q", "-f", "qcow2", &b, "8M"])
                .ok();
            env.qemu_io("qcow2", &b, &["write -P 7 0 8M"]);
            env.qemu_img(&[
                "create", "-q", "-f", "qcow2", "-b", &b, "-F", "qcow2", &o, "4100K",
            ])
            .ok();
            env.qemu_io("qcow2", &o, &["write -P 9 1M 64k"]);
        }
        same_as_qemu(&env, &["amend", "-o", opts, &format!("{{}}{n}.qcow2")]);
        let (q, i) = (format!("q{n}.qcow2"), format!("i{n}.qcow2"));
        qemu_clean(&env, &i);
        let contents = qemu_contents(&env, &i);
        assert!(contents == qemu_contents(&env, &q), "contents after {opts}");
        assert!(contents[4100 << 10..].iter().all(|&b| b == 0), "{opts}");
        assert!(contents[..1 << 20].iter().all(|&b| b == 7), "{opts}");
        // Where each 64 KiB comes from (host offsets aside: the two lay clusters out apart).
        let map = |f: &str| {
            let j = env.qemu_img(&["map", "--output=json", f]).ok().json();
            let mut m = Vec::new();
            for e in j.as_array().expect("a map") {
                let n = e["length"].as_u64().expect("a length").div_ceil(1 << 16);
                let what = ["depth", "zero", "data"].map(|k| e[k].to_string());
                m.extend(std::iter::repeat_n(what, n as usize));
            }
            m
        };
        assert_eq!(map(&i), map(&q), "{opts}");
    }
}

/// A compat=0.10 snapshot entry has no disk size of its own: `amend -o compat=0.10` is refused
/// while a snapshot was taken at another size than the image has (after the amend's own
/// resize, which stays, as in qemu), and accepted once the sizes agree.
#[test]
fn amend_downgrade_refused_while_a_snapshot_has_another_size_like_qemu() {
    let env = Env::with_qemu();
    twins(&env, "2M", "compat=1.1");
    for t in ["q", "i"] {
        env.qemu_img(&["snapshot", "-c", "s", &format!("{t}.qcow2")])
            .ok();
    }
    same_as_qemu(&env, &["amend", "-o", "compat=0.10,size=4M", "{}.qcow2"]);
    same_as_qemu(&env, &["info", "{}.qcow2"]);
    qemu_clean(&env, "i.qcow2");
    same_as_qemu(&env, &["amend", "-o", "compat=0.10,size=2M", "{}.qcow2"]);
    let info = |f: &str| {
        let mut j = env.qemu_img(&["info", "--output=json", f]).ok().json();
        (
            j["virtual-size"].take(),
            j["format-specific"].take(),
            j["snapshots"][0]["name"].take(),
        )
    };
    assert_eq!(info("i.qcow2"), info("q.qcow2"));
    same_as_qemu(&env, &["snapshot", "-a", "s", "{}.qcow2"]);
    qemu_clean(&env, "i.qcow2");
    assert!(qemu_contents(&env, "i.qcow2") == qemu_contents(&env, "q.qcow2"));
}

/// qemu 10 refuses to change the backing reference through amend (rebase does it): a new file,
/// a new format, or either one alone refuse with qemu's message and leave the header as it was;
/// repeating exactly the current pair is accepted. An image without a backing file refuses any.
#[test]
fn amend_backing_change_refused_like_qemu() {
    let env = Env::with_qemu();
    for t in ["q", "i"] {
        env.qemu_img(&["create", "-q", "-f", "raw", &format!("{t}.raw"), "1M"])
            .ok();
        env.qemu_img(&["create", "-q", "-f", "raw", &format!("{t}0.raw"), "1M"])
            .ok();
        let b = format!("{t}.raw");
        env.qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            &b,
            "-F",
            "raw",
            &format!("{t}.qcow2"),
        ])
        .ok();
        env.qemu_img(&["create", "-q", "-f", "qcow2", &format!("{t}0.qcow2"), "1M"])
            .ok();
    }
    for args in [
        &["amend", "-o", "backing_file={}0.raw", "{}.qcow2"][..],
        &["amend", "-o", "backing_fmt=raw", "{}.qcow2"],
        &["amend", "-o", "backing_fmt=qcow2", "{}.qcow2"],
        &["amend", "-o", "backing_file={}.raw", "{}.qcow2"],
        &[
            "amend",
            "-o",
            "backing_file={}0.raw,backing_fmt=raw",
            "{}.qcow2",
        ],
        &[
            "amend",
            "-o",
            "backing_file={}.raw,backing_fmt=raw",
            "{}.qcow2",
        ],
        &[
            "amend",
            "-o",
            "backing_file={}.raw,backing_fmt=raw",
            "{}0.qcow2",
        ],
        &["amend", "-o", "backing_fmt=raw", "{}0.qcow2"],
    ] {
        same_as_qemu(&env, args);
    }
    for (t, img) in [("q", "q.qcow2"), ("i", "i.qcow2")] {
        let info = env.qemu_img(&["info", "--output=json", img]).ok().json();
        assert_eq!(info["backing-filename"], format!("{t}.raw"), "{img}");
        assert_eq!(info["backing-filename-format"], "raw", "{img}");
        let info = env
            .qemu_img(&["info", "--output=json", &format!("{t}0.qcow2")])
            .ok()
            .json();
        assert!(info.get("backing-filename").is_none(), "{t}0.qcow2");
    }
    qemu_clean(&env, "i.qcow2");
}

// ---------------------------------------------------------------------------------------------
// measure

/// The figures (and the exact text, human and JSON) equal qemu-img measure's for sizes,
/// images in several formats, options, and snapshots.
#[test]
fn measure_matches_qemu() {
    let env = Env::with_qemu();
    twins(&env, "8M", "compat=1.1");
    env.qemu_img(&["snapshot", "-c", "snap", "q.qcow2"]).ok();
    env.qemu_io("qcow2", "q.qcow2", &["write -P 0x33 4M 2M"]);
    common::patterned_raw(&env, "p.raw");
    env.qemu_img(&["create", "-q", "-f", "vmdk", "v.vmdk", "3M"])
        .ok();
    env.qemu_io("vmdk", "v.vmdk", &["write -P 9 1M 100k"]);
    // A version 2 source cannot hold bitmaps: qemu leaves the bitmaps field out.
    env.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "compat=0.10",
        "v2.qcow2",
        "4M",
    ])
    .ok();
    env.qemu_io("qcow2", "v2.qcow2", &["write -P 7 0 1M"]);
    let mut cases: Vec<Vec<&str>> = Vec::new();
    for out in ["--output=human", "--output=json"] {
        cases.push(vec!["measure", out, "-O", "qcow2", "v2.qcow2"]);
        cases.push(vec!["measure", out, "--size", "1G", "-O", "qcow2"]);
        cases.push(vec!["measure", out, "--size", "1G"]);
        cases.push(vec!["measure", out, "-O", "qcow2", "q.qcow2"]);
        cases.push(vec!["measure", out, "-O", "raw", "q.qcow2"]);
        cases.push(vec!["measure", out, "-O", "qcow2", "-f", "raw", "p.raw"]);
        cases.push(vec!["measure", out, "-O", "qcow2", "v.vmdk"]);
        cases.push(vec![
            "measure",
            out,
            "-O",
            "qcow2",
            "-l",
            "snapshot.name=snap",
            "q.qcow2",
        ]);
        cases.push(vec!["measure", out, "-O", "qcow2", "-l", "snap", "q.qcow2"]);
    }
    for o in [
        // qemu measures these as they are, without the checks create makes.
        "encryption=on",
        "encrypt.format=aes",
        "nocow=on",
        "extent_size_hint=1M",
        "compat=0.10,lazy_refcounts=on",
        "compat=0.10,compression_type=zstd",
        "compat=0.10,data_file=x",
        "cluster_size=4k,refcount_bits=1",
        "cluster_size=2M",
        "preallocation=full",
        "preallocation=metadata",
        "extended_l2=on",
        "compat=0.10",
    ] {
        cases.push(vec!["measure", "--size", "100M", "-O", "qcow2", "-o", o]);
        cases.push(vec![
            "measure", "-O", "qcow2", "-o", o, "-f", "raw", "p.raw",
        ]);
    }
    for bad in [
        &["measure", "-O", "qcow2"][..],
        &["measure", "--size", "1G", "-O", "qcow2", "q.qcow2"],
        &["measure", "--size", "1G", "-O", "vmdk"],
        &["measure", "--size", "abc", "-O", "qcow2"],
        &["measure", "--size", "-1", "-O", "qcow2"],
        &["measure", "-O", "qcow2", "--size", "1M", "-o", "foo=bar"],
        // What qemu's measure refuses: compat spelled as create takes it, values of the wrong
        // type (in the order given, with the format named), a v2 refcount width.
        &["measure", "-O", "qcow2", "--size", "1M", "-o", "compat=v3"],
        &["measure", "-O", "qcow2", "--size", "1M", "-o", "nocow=x"],
        &[
            "measure",
            "-O",
            "qcow2",
            "--size",
            "1M",
            "-o",
            "cluster_size=abc,lazy_refcounts=x",
        ],
        &[
            "measure",
            "-O",
            "qcow2",
            "--size",
            "1M",
            "-o",
            "refcount_bits=a",
        ],
        &["measure", "-O", "raw", "--size", "1M", "-o", "size=1x"],
        &[
            "measure",
            "-O",
            "qcow2",
            "--size",
            "1M",
            "-o",
            "preallocation=foo",
        ],
        &[
            "measure",
            "-O",
            "qcow2",
            "--size",
            "1M",
            "-o",
            "compat=0.10,refcount_bits=8",
        ],
        &["measure", "-O", "qcow2", "--size", "1M", "--output=xml"],
        &["measure", "-O", "qcow2", "missing.qcow2"],
    ] {
        cases.push(bad.to_vec());
    }
    for c in &cases {
        same_as_qemu(&env, c);
    }
}

// ---------------------------------------------------------------------------------------------
// data_file_raw

/// `{t}.qcow2` over the raw data file `{t}.data`, 1 MiB of 0xab, made by qemu-img.
fn raw_data_file_twins(env: &Env) {
    for t in ["q", "i"] {
        let f = format!("{t}.qcow2");
        let opts = format!("data_file={t}.data,data_file_raw=on");
        env.qemu_img(&["create", "-q", "-f", "qcow2", "-o", &opts, &f, "1M"])
            .ok();
        env.qemu_io("qcow2", &f, &["write -P 0xab 0 1M"]);
    }
}

/// Zero writes, a commit of zeroes, and resizes keep the raw data file equal to the disk,
/// byte for byte as qemu-img leaves it; setting a backing file is refused as qemu-img does.
#[test]
fn data_file_raw_zeroes_resize_rebase_keep_raw_file_like_qemu() {
    let env = Env::with_qemu();
    raw_data_file_twins(&env);
    env.write("zero.raw", &vec![0u8; 256 * 1024]);
    same_as_qemu(
        &env,
        &[
            "convert", "-n", "-f", "raw", "-O", "qcow2", "zero.raw", "{}.qcow2",
        ],
    );
    env.assert_same_bytes("i.data", "q.data");
    for t in ["q", "i"] {
        let top = format!("{t}.top.qcow2");
        let base = format!("{t}.qcow2");
        env.qemu_img(&[
            "create", "-q", "-f", "qcow2", "-b", &base, "-F", "qcow2", &top,
        ])
        .ok();
        env.qemu_io(
            "qcow2",
            &top,
            &["write -z 512k 128k", "write -P 0x22 768k 64k"],
        );
    }
    same_as_qemu(&env, &["commit", "{}.top.qcow2"]);
    env.assert_same_bytes("i.data", "q.data");
    for args in [
        &["resize", "{}.qcow2", "3M"][..],
        &["resize", "--shrink", "{}.qcow2", "512k"],
        &["rebase", "-u", "-b", "b.qcow2", "-F", "qcow2", "{}.qcow2"],
    ] {
        if args[1] == "-u" {
            env.qemu_img(&["create", "-q", "-f", "qcow2", "b.qcow2", "1M"])
                .ok();
        }
        same_as_qemu(&env, args);
        qemu_clean(&env, "i.qcow2");
        env.assert_same_bytes("i.data", "q.data");
    }
    assert_eq!(env.len("i.data"), 512 * 1024);
}

/// Incus keeps a VM's data on a block device and names it with the `data-file` option when it
/// resizes: growing with metadata preallocation into a bigger file, then shrinking, leave both
/// files as qemu-img leaves them. The option is refused where qemu refuses it.
#[test]
fn data_file_option_names_the_data_file_as_incus_resizes_like_qemu() {
    let env = Env::with_qemu();
    raw_data_file_twins(&env);
    for t in ["q", "i"] {
        let data = env.read(&format!("{t}.data"));
        env.write(&format!("{t}.big"), &data);
        env.set_len(&format!("{t}.big"), 4 << 20);
    }
    let opts = |more: &str| format!("driver=qcow2,file.filename={{}}.qcow2,{more}");
    for args in [
        vec![
            "resize".to_owned(),
            "--preallocation=metadata".into(),
            "--image-opts".into(),
            opts("data-file.driver=file,data-file.filename={}.big"),
            "4194304".into(),
        ],
        vec![
            "resize".to_owned(),
            "--shrink".into(),
            "--image-opts".into(),
            opts("data-file.driver=file,data-file.filename={}.big"),
            "2097152".into(),
        ],
        vec![
            "map".to_owned(),
            "--output=json".into(),
            format!(
                r#"json:{{"driver":"qcow2","file":{{"driver":"file","filename":"{{}}.qcow2"}},"data-file":{{"driver":"file","filename":"{{}}.big"}}}}"#
            ),
        ],
    ] {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        same_as_qemu(&env, &args);
        // The same metadata, but for the data file's name in the header.
        let ours = env.read("i.qcow2");
        let at = ours
            .windows(6)
            .position(|w| w == b"i.data")
            .expect("the data file's name");
        let mut theirs = env.read("q.qcow2");
        theirs[at] = b'i';
        assert!(ours == theirs, "{args:?}: the metadata differs");
        env.assert_same_bytes("i.big", "q.big");
    }
    env.qemu_img(&["create", "-q", "-f", "qcow2", "plain.qcow2", "1M"])
        .ok();
    for name in [
        "driver=qcow2,file.filename=plain.qcow2,data-file.filename=i.big",
        "driver=raw,file.filename=i.big,data-file.filename=i.big",
    ] {
        let args = ["convert", "-O", "raw", "--image-opts", name, "out.raw"];
        let (q, i) = (env.qemu_img(&args), env.img(&args).no_panic());
        assert_eq!((i.code, q.code), (Some(1), Some(1)), "{q}{i}");
    }
}

// ---------------------------------------------------------------------------------------------
// snapshots with an external data file, and across a resize

/// qemu-img refuses snapshots of an image whose data lives in an external file, and `check`
/// counts a snapshot table in such an image as a corruption.
#[test]
fn snapshot_with_data_file_is_refused_and_checked_like_qemu() {
    let env = Env::with_qemu();
    for t in ["q", "i"] {
        let opts = format!("data_file={t}.data");
        env.qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            &opts,
            &format!("{t}.qcow2"),
            "1M",
        ])
        .ok();
    }
    same_as_qemu(&env, &["snapshot", "-c", "s1", "{}.qcow2"]);
    same_as_qemu(&env, &["snapshot", "-l", "{}.qcow2"]);
    // A snapshot table that got there anyway: a copy of the image with one, made without the
    // data file.
    for t in ["q", "i"] {
        let f = format!("{t}.snap.qcow2");
        env.qemu_img(&["create", "-q", "-f", "qcow2", &f, "1M"])
            .ok();
        env.qemu_img(&["snapshot", "-c", "s1", &f]).ok();
    }
    // Both are qemu-img's 1 MiB layout: the header fields from byte 72 on (features, header
    // length, extensions) of the data file image turn the other into one with a data file.
    let mut patched = env.read("q.snap.qcow2");
    let plain = env.read("q.qcow2");
    patched[72..65536].copy_from_slice(&plain[72..65536]);
    env.write("q.snap.qcow2", &patched);
    env.write("i.snap.qcow2", &patched);
    same_as_qemu(&env, &["check", "{}.snap.qcow2"]);
    same_as_qemu(&env, &["check", "--output=json", "{}.snap.qcow2"]);
}

/// Reverting to a snapshot taken before a resize brings its size back, as qemu-img does.
#[test]
fn snapshot_apply_after_resize_reverts_size_like_qemu() {
    let env = Env::with_qemu();
    twins(&env, "1M", "compat=1.1");
    for t in ["q", "i"] {
        let f = format!("{t}.qcow2");
        env.qemu_img(&["snapshot", "-c", "s", &f]).ok();
    }
    for (size, shrink) in [("3M", false), ("512k", true)] {
        same_as_qemu(&env, &["resize", "--shrink", "{}.qcow2", size]);
        for t in ["q", "i"] {
            let pattern = if shrink {
                "write -P 0x44 0 512k"
            } else {
                "write -P 0x33 0 3M"
            };
            env.qemu_io("qcow2", &format!("{t}.qcow2"), &[pattern]);
        }
        same_as_qemu(&env, &["snapshot", "-a", "s", "{}.qcow2"]);
        qemu_clean(&env, "i.qcow2");
        assert!(qemu_contents(&env, "i.qcow2") == qemu_contents(&env, "q.qcow2"));
        let info = env
            .qemu_img(&["info", "--output=json", "i.qcow2"])
            .ok()
            .json();
        assert_eq!(info["virtual-size"], MIB);
    }
}

/// With `-o backing_file=`, qemu cannot know what the new image's backing chain shares with the
/// source and counts every cluster as written; `backing_fmt` alone and `--size` count as
/// without it.
#[test]
fn measure_with_backing_file_counts_every_cluster() {
    let env = Env::with_qemu();
    twins(&env, "8M", "compat=1.1");
    env.qemu_img(&["create", "-q", "-f", "raw", "b.raw", "8M"])
        .ok();
    for out in ["--output=human", "--output=json"] {
        for o in [
            "backing_file=b.raw",
            "backing_file=b.raw,backing_fmt=raw",
            "backing_file=missing.raw",
            "backing_file=b.raw,preallocation=metadata",
            "backing_fmt=raw",
        ] {
            same_as_qemu(&env, &["measure", out, "-O", "qcow2", "-o", o, "q.qcow2"]);
        }
        same_as_qemu(
            &env,
            &[
                "measure",
                out,
                "-O",
                "qcow2",
                "-o",
                "backing_file=b.raw",
                "--size",
                "8M",
            ],
        );
    }
}

/// `resize` side by side with qemu-img on copies of one written image, for sizes that grow the
/// L1 table, shrink the disk past its data, or cannot be held: the same exit code and words,
/// the same virtual size, the same file length (qemu-img cuts the file after its last used
/// cluster on shrinking, and writes only the entries of a grown L1 table), and equal data.
#[test]
fn resize_matches_qemu_in_words_sizes_and_file_length() {
    let env = Env::with_qemu();
    let cases: &[(&str, &[&str], &str)] = &[
        ("qcow2", &[], "3G"),
        ("qcow2", &["--shrink"], "1k"),
        ("qcow2", &["--shrink"], "32M"),
        ("qcow2", &["--shrink"], "-24M"),
        ("qcow2", &[], "+1E"),
        ("raw", &[], "1P"),
        ("vdi", &["--shrink"], "1M"),
        ("vmdk", &[], "+1M"),
    ];
    for &(fmt, flags, size) in cases {
        env.qemu_img(&["create", "-q", "-f", fmt, "base", "64M"])
            .ok();
        env.qemu_io(fmt, "base", &["write -P 1 0 1M", "write -P 2 40M 1M"]);
        let run = |tool: &str, name: &str| {
            std::fs::copy(env.path("base"), env.path(name)).unwrap();
            let mut args = vec!["resize", "-q", "-f", fmt];
            args.extend_from_slice(flags);
            args.extend([name, "--", size]);
            let out = if tool == "img" {
                env.img(&args)
            } else {
                env.qemu_img(&args)
            };
            let said = out.stderr.trim_end().replace(name, "IMAGE");
            let said = said
                .strip_prefix(&format!("{tool}: "))
                .unwrap_or(&said)
                .to_owned();
            let vsize =
                env.qemu_img(&["info", "--output=json", name]).ok().json()["virtual-size"].clone();
            (out.code, said, vsize, env.len(name))
        };
        let theirs = run("qemu-img", "q.img");
        let ours = run("img", "i.img");
        assert_eq!(ours, theirs, "{fmt} {flags:?} {size}");
        if ours.0 == Some(0) && fmt != "raw" {
            env.qemu_img(&["check", "i.img"]).ok();
        }
        env.qemu_img(&["compare", "-f", fmt, "-F", fmt, "q.img", "i.img"])
            .ok();
    }
}

/// `amend -o data_file=NAME` renames the external data file and `data_file_raw=off` drops the
/// raw flag, as qemu-img does (the header reads the same afterwards); setting the raw flag on an
/// image without it, or a data file on an image without one, is refused in qemu's words.
#[test]
fn amend_data_file_name_and_raw_flag_match_qemu() {
    let env = Env::with_qemu();
    for t in ["q", "i"] {
        for (opts, file) in [
            (format!("data_file={t}.d"), format!("{t}.qcow2")),
            (
                format!("data_file={t}.rd,data_file_raw=on"),
                format!("{t}.r.qcow2"),
            ),
            ("cluster_size=64k".to_owned(), format!("{t}.plain.qcow2")),
        ] {
            env.qemu_img(&["create", "-q", "-f", "qcow2", "-o", &opts, &file, "8M"])
                .ok();
        }
    }
    for args in [
        &["amend", "-o", "data_file_raw=on", "{}.qcow2"][..],
        &["amend", "-o", "data_file=x.d", "{}.plain.qcow2"],
        &["amend", "-o", "data_file_raw=off", "{}.r.qcow2"],
        &["amend", "-o", "data_file={}.moved", "{}.qcow2"],
    ] {
        same_as_qemu(&env, args);
    }
    for f in ["qcow2", "r.qcow2"] {
        let info = |t: &str| {
            let mut v = env
                .qemu_img(&["info", "-U", "--output=json", &format!("{t}.{f}")])
                .ok()
                .json();
            let spec = v["format-specific"]["data"].take();
            (spec, v["dirty-flag"].take())
        };
        let (q, i) = (info("q"), info("i"));
        assert_eq!(
            i.0["data-file"].as_str().map(|s| s.replace("i.", "q.")),
            q.0["data-file"].as_str().map(str::to_owned),
            "{f}"
        );
        assert_eq!(i.0["data-file-raw"], q.0["data-file-raw"], "{f}");
        assert_eq!(i.1, q.1, "{f}");
    }
    assert_eq!(
        env.qemu_img(&["info", "--output=json", "-U", "i.r.qcow2"])
            .ok()
            .json()["format-specific"]["data"]["data-file-raw"],
        false
    );
}

/// Growing an image over a raw data file maps the new clusters one to one, as qemu-img does, so
/// the data file stays a valid raw image of the whole disk.
#[test]
fn resize_grow_over_raw_data_file_maps_new_clusters_like_qemu() {
    let env = Env::with_qemu();
    raw_data_file_twins(&env);
    same_as_qemu(&env, &["resize", "{}.qcow2", "3M"]);
    let map = |t: &str| {
        env.qemu_img(&["map", "--output=json", &format!("{t}.qcow2")])
            .ok()
            .stdout
            .replace(&format!("{t}.data"), "X")
    };
    assert_eq!(map("i"), map("q"));
    let allocated = |t: &str| {
        env.qemu_img(&["check", "--output=json", &format!("{t}.qcow2")])
            .ok()
            .json()["allocated-clusters"]
            .clone()
    };
    assert_eq!(allocated("i"), allocated("q"));
    assert_eq!(env.len("i.data"), env.len("q.data"));
}

/// Downgrading an overlay to compat=0.10 turns its zero clusters into clusters of zeroes (the
/// backing file must not show through), which the file system zeroes, as qemu-img leaves them:
/// the same contents, a clean image, no more space taken than qemu-img takes.
#[test]
fn downgrading_an_overlay_with_zero_clusters_matches_qemu() {
    let env = Env::with_qemu();
    env.qemu_img(&["create", "-q", "-f", "qcow2", "b.qcow2", "64M"])
        .ok();
    env.qemu_io("qcow2", "b.qcow2", &["write -P 0x5a 0 64M"]);
    for t in ["q", "i"] {
        let f = format!("{t}.qcow2");
        env.qemu_img(&[
            "create", "-q", "-f", "qcow2", "-b", "b.qcow2", "-F", "qcow2", &f,
        ])
        .ok();
        env.qemu_io(
            "qcow2",
            &f,
            &[
                "write -z 0 32M",
                "write -P 0x11 1M 64k",
                "write -z -u 40M 8M",
            ],
        );
    }
    same_as_qemu(&env, &["amend", "-o", "compat=0.10", "{}.qcow2"]);
    qemu_clean(&env, "i.qcow2");
    assert_eq!(
        qemu_contents(&env, "i.qcow2"),
        qemu_contents(&env, "q.qcow2")
    );
    let info = env
        .qemu_img(&["info", "--output=json", "i.qcow2"])
        .ok()
        .json();
    assert_eq!(info["format-specific"]["data"]["compat"], "0.10", "{info}");
    assert!(
        env.allocated("i.qcow2") <= env.allocated("q.qcow2") + MIB,
        "img took {} bytes, qemu-img {}",
        env.allocated("i.qcow2"),
        env.allocated("q.qcow2")
    );
}
