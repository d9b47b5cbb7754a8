//! `img check` on images with planted leaks and planted corruptions: the same counts and exit
//! code as `qemu-img check`, and after `img check -r all` qemu-img finds the image clean.

mod common;

use common::*;

/// A qemu-made image with data, and the offset of its first refcount block.
fn image(env: &Env, name: &str) -> u64 {
    env.qemu_img(&["create", "-q", "-f", "qcow2", name, "4M"])
        .ok();
    env.qemu_io(
        "qcow2",
        name,
        &["write -P 0x33 0 300k", "write -P 0x44 2M 64k"],
    );
    let h = env.read(name);
    let reftable = u64::from_be_bytes(h[48..56].try_into().unwrap());
    let rt = usize::try_from(reftable).unwrap();
    u64::from_be_bytes(h[rt..rt + 8].try_into().unwrap())
}

/// Sets the 16-bit refcount of cluster `c` (64 KiB clusters).
fn set_refcount(env: &Env, name: &str, refblock: u64, c: u64, v: u16) {
    env.write_at(name, refblock + c * 2, &v.to_be_bytes());
}

fn counts(out: &Output) -> (i64, i64) {
    let j = out.json();
    let get = |k: &str| j.get(k).and_then(serde_json::Value::as_i64).unwrap_or(0);
    (get("leaks"), get("corruptions"))
}

fn same_verdict(env: &Env, name: &str) -> Option<i32> {
    let q = env.qemu_img(&["check", "--output=json", name]);
    let i = env.img(&["check", "--output=json", name]).no_panic();
    assert_eq!(
        i.code, q.code,
        "exit codes differ:\nimg: {i}\nqemu-img: {q}"
    );
    assert_eq!(
        counts(&i),
        counts(&q),
        "counts differ:\nimg: {i}\nqemu-img: {q}"
    );
    i.code
}

#[test]
fn planted_leak_is_reported_like_qemu_and_repaired() {
    let env = Env::with_qemu();
    let rb = image(&env, "l.qcow2");
    // A cluster past the data, inside the file, claimed by nobody.
    let end = env.len("l.qcow2");
    env.set_len("l.qcow2", end + 2 * 65536);
    set_refcount(&env, "l.qcow2", rb, end / 65536 + 1, 1);
    assert_eq!(same_verdict(&env, "l.qcow2"), Some(3));
    env.img(&["check", "-r", "leaks", "l.qcow2"]).no_panic();
    env.qemu_img(&["check", "l.qcow2"]).ok();
}

#[test]
fn planted_corruption_is_reported_like_qemu_and_repaired() {
    let env = Env::with_qemu();
    let rb = image(&env, "c.qcow2");
    // The first data cluster in use loses its reference count.
    let before = env
        .qemu_img(&["map", "--output=json", "c.qcow2"])
        .ok()
        .json();
    let host = before[0]["offset"]
        .as_u64()
        .expect("first extent has an offset");
    set_refcount(&env, "c.qcow2", rb, host / 65536, 0);
    assert_eq!(same_verdict(&env, "c.qcow2"), Some(2));
    env.img(&["check", "-r", "all", "c.qcow2"]).no_panic();
    env.qemu_img(&["check", "c.qcow2"]).ok();
    // The data is still there.
    env.qemu_img(&["convert", "-O", "raw", "c.qcow2", "c.raw"])
        .ok();
    let raw = env.read("c.raw");
    assert!(raw[..300 * 1024].iter().all(|&b| b == 0x33));
}

#[test]
fn planted_refcount_too_high_and_too_low_together() {
    let env = Env::with_qemu();
    let rb = image(&env, "b.qcow2");
    let before = env
        .qemu_img(&["map", "--output=json", "b.qcow2"])
        .ok()
        .json();
    let host = before[0]["offset"].as_u64().unwrap();
    set_refcount(&env, "b.qcow2", rb, host / 65536, 5);
    set_refcount(&env, "b.qcow2", rb, 0, 0);
    assert_eq!(same_verdict(&env, "b.qcow2"), Some(2));
    env.img(&["check", "-r", "all", "b.qcow2"]).no_panic();
    env.qemu_img(&["check", "b.qcow2"]).ok();
}

/// qemu-img info's corrupt flag.
fn marked_corrupt(env: &Env, name: &str) -> bool {
    env.qemu_img(&["info", "--output=json", name]).ok().json()["format-specific"]["data"]["corrupt"]
        .as_bool()
        .expect("a v3 image reports the corrupt flag")
}

/// Runs `check ARGS` with img on `name` and with qemu-img on a copy; returns both exit codes,
/// and whether each image is still marked corrupt.
fn check_both(env: &Env, name: &str, args: &[&str]) -> ((Option<i32>, bool), (Option<i32>, bool)) {
    let copy = format!("qemu-{name}");
    std::fs::copy(env.path(name), env.path(&copy)).unwrap();
    let mut a = vec!["check"];
    a.extend_from_slice(args);
    let i = env.img(&[a.as_slice(), &[name]].concat()).no_panic();
    let q = env.qemu_img(&[a.as_slice(), &[copy.as_str()]].concat());
    (
        (i.code, marked_corrupt(env, name)),
        (q.code, marked_corrupt(env, &copy)),
    )
}

#[test]
fn check_repair_image_marked_corrupt_clears_flag_like_qemu() {
    for (args, code, corrupt) in [
        (&[][..], 0, true),
        (&["-r", "leaks"][..], 0, false),
        (&["-r", "all"][..], 0, false),
    ] {
        let env = Env::with_qemu();
        image(&env, "m.qcow2");
        // incompatible_features bit 1: corrupt.
        env.write_at("m.qcow2", 79, &[2]);
        let (ours, theirs) = check_both(&env, "m.qcow2", args);
        assert_eq!(ours, theirs, "check {args:?}");
        assert_eq!(ours, (Some(code), corrupt), "check {args:?}");
    }
}

#[test]
fn check_repair_leaks_corruption_left_keeps_corrupt_flag_like_qemu() {
    let env = Env::with_qemu();
    image(&env, "m.qcow2");
    env.write_at("m.qcow2", 79, &[2]);
    // Two guest clusters share one host cluster whose refcount is 1: only -r all fixes that.
    let map = env
        .qemu_img(&["map", "--output=json", "m.qcow2"])
        .ok()
        .json();
    let host = map[0]["offset"].as_u64().unwrap();
    let h = env.read("m.qcow2");
    let l1 = u64::from_be_bytes(h[40..48].try_into().unwrap());
    let l1 = usize::try_from(l1).unwrap();
    let l2 = u64::from_be_bytes(h[l1..l1 + 8].try_into().unwrap()) & 0x00ff_ffff_ffff_fe00;
    env.write_at("m.qcow2", l2 + 8, &((1u64 << 63) | host).to_be_bytes());
    let before = env.read("m.qcow2");
    let (ours, theirs) = check_both(&env, "m.qcow2", &["-r", "leaks"]);
    assert_eq!(ours, theirs);
    assert_eq!(ours, (Some(2), true));
    env.write("m.qcow2", &before);
    let (ours, theirs) = check_both(&env, "m.qcow2", &["-r", "all"]);
    assert_eq!(ours, theirs);
    assert_eq!(ours, (Some(0), false));
    env.qemu_img(&["check", "m.qcow2"]).ok();
}

/// (refcount table, L1 table, first L2 table) offsets of an image made by [`image`].
fn tables(env: &Env, name: &str) -> (u64, u64, u64) {
    let h = env.read(name);
    let at = |o: u64| {
        let o = usize::try_from(o).unwrap();
        u64::from_be_bytes(h[o..o + 8].try_into().unwrap())
    };
    let l1 = at(40);
    (at(48), l1, at(l1) & 0x00ff_ffff_ffff_fe00)
}

#[test]
fn check_entries_with_reserved_bits_are_corruption_like_qemu() {
    // (what, which entry: 0 refcount table, 1 L1, 2 L2; the reserved bit set in it)
    let cases = [
        ("l2", 2, 1u64 << 1),
        ("l2-high", 2, 1 << 57),
        ("l1", 1, 1),
        ("reftable", 0, 1),
    ];
    for (what, table, bit) in cases {
        let env = Env::with_qemu();
        image(&env, "r.qcow2");
        let (rt, l1, l2) = tables(&env, "r.qcow2");
        let off = [rt, l1, l2][table];
        let h = env.read("r.qcow2");
        let o = usize::try_from(off).unwrap();
        let entry = u64::from_be_bytes(h[o..o + 8].try_into().unwrap()) | bit;
        env.write_at("r.qcow2", off, &entry.to_be_bytes());
        assert_eq!(same_verdict(&env, "r.qcow2"), Some(2), "{what}");
        let q = env.qemu_img(&["check", "r.qcow2"]);
        let i = env.img(&["check", "r.qcow2"]);
        let line = |o: &Output| {
            o.stderr
                .lines()
                .find(|l| l.contains("reserved bits"))
                .map(str::to_owned)
        };
        assert!(line(&q).is_some(), "{what}: {q}");
        assert_eq!(line(&i), line(&q), "{what}");
    }
}

/// Runs `check ARGS` with img on `name` and with qemu-img on a copy made first, and asserts
/// the same exit code, the same report, the same messages, the same file length and the same
/// verdict of a plain `qemu-img check` afterwards.
fn assert_checks_like_qemu(env: &Env, name: &str, args: &[&str], what: &str) {
    let copy = format!("qemu-{name}");
    std::fs::copy(env.path(name), env.path(&copy)).unwrap();
    let mut a = vec!["check"];
    a.extend_from_slice(args);
    let i = env.img(&[a.as_slice(), &[name]].concat()).no_panic();
    let q = env.qemu_img(&[a.as_slice(), &[copy.as_str()]].concat());
    let ctx = format!("{what}, check {args:?}:\nimg: {i}\nqemu-img: {q}");
    assert_eq!(i.code, q.code, "exit codes differ: {ctx}");
    assert_eq!(i.stdout, q.stdout, "reports differ: {ctx}");
    assert_eq!(
        i.stderr.replace("img: ", "qemu-img: "),
        q.stderr,
        "messages differ: {ctx}"
    );
    assert_eq!(env.len(name), env.len(&copy), "file lengths differ: {ctx}");
    let after = |n: &str| env.qemu_img(&["check", "--output=json", n]);
    let (ia, qa) = (after(name), after(&copy));
    assert_eq!(ia.code, qa.code, "verdicts afterwards differ: {ctx}");
    assert_eq!(
        counts(&ia),
        counts(&qa),
        "verdicts afterwards differ: {ctx}"
    );
}

/// Where to plant what, given the offsets of the refcount table, the first refcount block and
/// the first L2 table.
type Plant = fn(u64, u64, u64) -> (u64, Vec<u8>);

#[test]
fn check_repair_broken_refcount_structures_like_qemu() {
    let cases: [(&str, Plant); 6] = [
        // Refcount table entry 0 past the end of the file: qemu grows the file over it.
        ("reftable entry past the end", |rt, _, _| {
            (rt, 0x400_0000u64.to_be_bytes().to_vec())
        }),
        // ... in free space just past the end.
        ("reftable entry just past the end", |rt, _, _| {
            (rt, 0x10_0000u64.to_be_bytes().to_vec())
        }),
        // ... missing.
        ("reftable entry missing", |rt, _, _| (rt, vec![0; 8])),
        // A data cluster in use with refcount 0.
        ("refcount zero", |_, rb, _| (rb + 7 * 2, vec![0, 0])),
        // OFLAG_COPIED cleared on an L2 entry whose refcount is 1.
        ("copied flag cleared", |_, _, l2| (l2, vec![0])),
        // A refcount too high: a leak, repaired under either mode.
        ("refcount too high", |_, rb, _| (rb + 5 * 2, vec![0, 2])),
    ];
    for (what, plant) in cases {
        for args in [&[][..], &["-r", "leaks"][..], &["-r", "all"][..]] {
            let env = Env::with_qemu();
            env.qemu_img(&["create", "-q", "-f", "qcow2", "x.qcow2", "4M"])
                .ok();
            env.qemu_io(
                "qcow2",
                "x.qcow2",
                &["write -P 1 0 128k", "write -P 2 1M 64k"],
            );
            let (rt, _, l2) = tables(&env, "x.qcow2");
            let h = env.read("x.qcow2");
            let o = usize::try_from(rt).unwrap();
            let rb = u64::from_be_bytes(h[o..o + 8].try_into().unwrap());
            let (off, bytes) = plant(rt, rb, l2);
            env.write_at("x.qcow2", off, &bytes);
            assert_checks_like_qemu(&env, "x.qcow2", args, what);
        }
    }
}

/// `check --output=json` with no repair, `-r leaks` and `-r all`, each with img on `name` and
/// with qemu-img on a copy: the same exit code and the same report (the file name aside), and
/// afterwards the same verdict from `qemu-img check` and the same guest data.
fn assert_reports_like_qemu(env: &Env, name: &str, what: &str) {
    let corrupted = env.read(name);
    let report = |o: &Output| {
        let mut j =
            serde_json::from_str::<serde_json::Value>(&o.stdout).unwrap_or(serde_json::Value::Null);
        if let Some(m) = j.as_object_mut() {
            m.remove("filename");
        }
        j
    };
    for mode in [&[][..], &["-r", "leaks"][..], &["-r", "all"][..]] {
        let copy = format!("qemu-{name}");
        env.write(name, &corrupted);
        env.write(&copy, &corrupted);
        let args = [&["check", "--output=json"][..], mode].concat();
        let i = env.img(&[args.as_slice(), &[name]].concat()).no_panic();
        let q = env.qemu_img(&[args.as_slice(), &[copy.as_str()]].concat());
        let ctx = format!("{what}, check {mode:?}:\nimg: {i}\nqemu-img: {q}");
        assert_eq!(i.code, q.code, "exit codes differ: {ctx}");
        assert_eq!(report(&i), report(&q), "reports differ: {ctx}");
        if mode.is_empty() {
            continue;
        }
        let after = |n: &str| report(&env.qemu_img(&["check", "--output=json", n]));
        assert_eq!(
            after(name),
            after(&copy),
            "verdicts afterwards differ: {ctx}"
        );
        let raw = |n: &str| {
            let out = format!("{n}.raw");
            let c = env.qemu_img(&["convert", "-O", "raw", n, &out]);
            (
                c.code,
                if c.code == Some(0) {
                    env.read(&out)
                } else {
                    Vec::new()
                },
            )
        };
        // Where qemu-img's repair leaves readable data, ours leaves the same. (It may free a
        // cluster an entry it calls corrupt still points at, and discard its data.)
        let theirs = raw(&copy);
        if theirs.0 == Some(0) {
            assert!(raw(name) == theirs, "data afterwards differs: {ctx}");
        }
    }
}

/// A qcow2 image (64 KiB clusters, refcounts of `refcount_bits`) with data, a zero cluster
/// and two compressed clusters sharing the last host cluster of the file.
fn mixed_image(env: &Env, name: &str, refcount_bits: u32) {
    env.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        &format!("refcount_bits={refcount_bits}"),
        name,
        "8M",
    ])
    .ok();
    env.qemu_io(
        "qcow2",
        name,
        &[
            "write -P 0x33 0 300k",
            "write -P 0x44 2M 64k",
            "write -z 1M 64k",
            "write -c -P 0x55 3M 64k",
            "write -c -P 0x66 3584k 64k",
        ],
    );
}

/// The L2 entry `index` of the first L2 table of `name`.
fn l2_entry(env: &Env, name: &str, index: u64) -> (u64, u64) {
    let (_, _, l2) = tables(env, name);
    let at = l2 + index * 8;
    let h = env.read(name);
    let o = usize::try_from(at).unwrap();
    (at, u64::from_be_bytes(h[o..o + 8].try_into().unwrap()))
}

#[test]
fn check_counts_references_near_the_end_and_overflows_like_qemu() {
    // A compressed cluster whose length runs two clusters past the end of the file: one
    // corruption, and nothing of it counted (its cluster leaks).
    let env = Env::with_qemu();
    mixed_image(&env, "c.qcow2", 16);
    let (at, e) = l2_entry(&env, "c.qcow2", 48);
    assert_ne!(e & (1 << 62), 0, "guest cluster 48 is compressed");
    env.write_at("c.qcow2", at, &(e | 0x3fc0_0000_0000_0000).to_be_bytes());
    assert_reports_like_qemu(&env, "c.qcow2", "compressed length past the end");

    // The file ends inside its last cluster: what lies there still counts.
    let env = Env::with_qemu();
    mixed_image(&env, "t.qcow2", 1);
    env.set_len("t.qcow2", env.len("t.qcow2") - 100);
    assert_reports_like_qemu(&env, "t.qcow2", "last cluster cut short");

    // Two guest clusters on one host cluster with 1-bit refcounts: the second reference
    // overflows the refcount width.
    let env = Env::with_qemu();
    mixed_image(&env, "o.qcow2", 1);
    let (_, first) = l2_entry(&env, "o.qcow2", 0);
    let (at, _) = l2_entry(&env, "o.qcow2", 1);
    env.write_at("o.qcow2", at, &first.to_be_bytes());
    assert_reports_like_qemu(&env, "o.qcow2", "refcount overflow");

    // Two refcount table entries name one refcount block, with 1-bit refcounts: the second
    // reference overflows too, and no new refcount structures are called for.
    let env = Env::with_qemu();
    mixed_image(&env, "r.qcow2", 1);
    let (rt, _, _) = tables(&env, "r.qcow2");
    let h = env.read("r.qcow2");
    let o = usize::try_from(rt).unwrap();
    env.write_at("r.qcow2", rt + 8, &h[o..o + 8]);
    assert_reports_like_qemu(&env, "r.qcow2", "refcount block named twice");
}

/// How a test changes a table entry.
type Change = fn(u64) -> u64;

#[test]
fn check_misaligned_and_flagged_entries_like_qemu() {
    // (what, L2 index, how the entry changes) on a `mixed_image`: guest cluster 0 holds data,
    // 16 is a zero cluster, 48 compressed.
    let cases: [(&str, u64, Change); 4] = [
        // Still counted, in the cluster it starts in and the next.
        ("data entry misaligned", 0, |e| e + 0x200),
        // -r all makes it a plain zero entry, and its cluster leaks.
        ("preallocated zero entry misaligned", 0, |e| (e + 0x200) | 1),
        ("compressed entry with the copied flag", 48, |e| {
            e | (1 << 63)
        }),
        // The L1 entry: the table is read where it points all the same.
        ("L1 entry misaligned", u64::MAX, |e| e + 0x200),
    ];
    for (what, index, change) in cases {
        let env = Env::with_qemu();
        mixed_image(&env, "m.qcow2", 16);
        let (at, e) = if index == u64::MAX {
            let (_, l1, _) = tables(&env, "m.qcow2");
            let h = env.read("m.qcow2");
            let o = usize::try_from(l1).unwrap();
            (l1, u64::from_be_bytes(h[o..o + 8].try_into().unwrap()))
        } else {
            l2_entry(&env, "m.qcow2", index)
        };
        env.write_at("m.qcow2", at, &change(e).to_be_bytes());
        assert_reports_like_qemu(&env, "m.qcow2", what);
    }
}

#[test]
fn check_subcluster_bitmaps_like_qemu() {
    // (what, L2 index, the bitmap) with extended L2 entries and 128 KiB clusters: guest
    // cluster 0 holds data, 24 is compressed.
    let cases = [
        ("allocated and zero at once", 0, 0xffff_ffff_ffff_ffffu64),
        ("compressed with a bitmap", 24, 1),
    ];
    for (what, index, bitmap) in cases {
        let env = Env::with_qemu();
        env.qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "extended_l2=on,cluster_size=128k",
            "x.qcow2",
            "8M",
        ])
        .ok();
        env.qemu_io(
            "qcow2",
            "x.qcow2",
            &["write -P 0x33 0 300k", "write -c -P 0x55 3M 128k"],
        );
        let (_, _, l2) = tables(&env, "x.qcow2");
        env.write_at("x.qcow2", l2 + index * 16 + 8, &bitmap.to_be_bytes());
        assert_reports_like_qemu(&env, "x.qcow2", what);
    }
}

#[test]
fn check_vmdk_grain_past_the_end_fails_like_qemu() {
    let env = Env::with_qemu();
    env.qemu_img(&["create", "-q", "-f", "vmdk", "s.vmdk", "8M"])
        .ok();
    env.qemu_io(
        "vmdk",
        "s.vmdk",
        &["write -P 0x33 0 300k", "write -P 0x44 2M 64k"],
    );
    // The first grain table entry (sparse header: gd_offset at byte 56, in sectors) points a
    // long way past the end of the file.
    let h = env.read("s.vmdk");
    let sector = |at: usize| {
        usize::try_from(u64::from_le_bytes(h[at..at + 8].try_into().unwrap())).unwrap() * 512
    };
    let gd = sector(56);
    let gt = usize::try_from(u32::from_le_bytes(h[gd..gd + 4].try_into().unwrap())).unwrap() * 512;
    env.write_at(
        "s.vmdk",
        u64::try_from(gt).unwrap(),
        &0x10_0000u32.to_le_bytes(),
    );
    for args in [
        &["check", "s.vmdk"][..],
        &["check", "--output=json", "s.vmdk"][..],
    ] {
        let i = env.img(args).no_panic();
        let q = env.qemu_img(args);
        assert_eq!(
            i.code, q.code,
            "exit codes differ:\nimg: {i}\nqemu-img: {q}"
        );
        assert_eq!(
            i.stdout, q.stdout,
            "reports differ:\nimg: {i}\nqemu-img: {q}"
        );
        assert_eq!(
            i.stderr.replace("img: ", "qemu-img: "),
            q.stderr,
            "messages differ:\nimg: {i}\nqemu-img: {q}"
        );
    }
}

#[test]
fn check_snapshot_count_past_the_table_like_qemu() {
    // The header claims more snapshots than the table holds: the zeroes after the one entry
    // read as version 3 entries without their extra data, which qemu-img reports and `-r all`
    // writes out whole.
    for args in [&[][..], &["-r", "leaks"][..], &["-r", "all"][..]] {
        let env = Env::with_qemu();
        env.qemu_img(&["create", "-q", "-f", "qcow2", "s.qcow2", "4M"])
            .ok();
        env.qemu_io("qcow2", "s.qcow2", &["write -P 0x33 0 128k"]);
        env.qemu_img(&["snapshot", "-c", "s1", "s.qcow2"]).ok();
        env.qemu_io("qcow2", "s.qcow2", &["write -P 0x77 0 64k"]);
        env.write_at("s.qcow2", 60, &3u32.to_be_bytes());
        assert_checks_like_qemu(&env, "s.qcow2", args, "snapshot count past the table");
        if args.len() == 2 && args[1] == "all" {
            let list = |o: Output| o.stdout.lines().count();
            assert_eq!(
                list(env.img(&["snapshot", "-l", "s.qcow2"]).ok()),
                list(env.qemu_img(&["snapshot", "-l", "qemu-s.qcow2"]).ok()),
            );
            env.qemu_img(&["check", "s.qcow2"]).ok();
        }
    }
}

#[test]
fn check_repair_leaks_bitmap_image_with_lost_refcount_keeps_guest_data() {
    // A data cluster in use has refcount 0 in an image with persistent bitmaps. `-r leaks`
    // cannot repair that and fails, as qemu-img's does; ours then leaves the file as it was.
    // qemu-img's stores its bitmaps when it closes the image and may put them in that cluster,
    // which the refcounts say is free: the guest data there is lost. Ours writes nothing the
    // refcounts have not first been made to account for.
    let env = Env::with_qemu();
    env.qemu_img(&["create", "-q", "-f", "qcow2", "b.qcow2", "4M"])
        .ok();
    env.qemu_io("qcow2", "b.qcow2", &["write -P 0x33 0 300k"]);
    env.qemu_img(&["bitmap", "--add", "b.qcow2", "b0"]).ok();
    env.qemu_io("qcow2", "b.qcow2", &["write -P 1 0 64k"]);
    let (rt, _, l2) = tables(&env, "b.qcow2");
    let h = env.read("b.qcow2");
    let at = |o: u64| {
        let o = usize::try_from(o).unwrap();
        u64::from_be_bytes(h[o..o + 8].try_into().unwrap()) & 0x00ff_ffff_ffff_fe00
    };
    let (rb, data) = (at(rt), at(l2));
    set_refcount(&env, "b.qcow2", rb, data / 65536, 0);
    env.qemu_img(&["convert", "-O", "raw", "b.qcow2", "before.raw"])
        .ok();
    let corrupted = env.read("b.qcow2");
    let out = env.img(&["check", "-r", "leaks", "b.qcow2"]).no_panic();
    assert_eq!(out.code, Some(1), "{out}");
    assert!(env.read("b.qcow2") == corrupted, "the file changed: {out}");
    env.qemu_img(&["convert", "-O", "raw", "b.qcow2", "after.raw"])
        .ok();
    env.assert_same_bytes("before.raw", "after.raw");
    // `-r all` rebuilds the refcounts around the data and the bitmap.
    env.img(&["check", "-r", "all", "b.qcow2"]).ok();
    env.qemu_img(&["check", "b.qcow2"]).ok();
    env.qemu_img(&["convert", "-O", "raw", "b.qcow2", "after.raw"])
        .ok();
    env.assert_same_bytes("before.raw", "after.raw");
}

/// Leaks a repair frees go back to the host, as qemu-img discards them: an image whose
/// snapshot entry was lost (its clusters leak) holds about what qemu-img's holds afterwards,
/// not the leaked data too.
#[test]
fn repaired_leaks_give_their_space_back_like_qemu() {
    let env = Env::with_qemu();
    env.snapshot_history("s.qcow2", "64M", &[(1, "8M", Some("a")), (2, "8M", None)]);
    // No snapshots any more: the snapshot's L1 table and its 8 MiB of data leak.
    env.write_at("s.qcow2", 60, &0u32.to_be_bytes());
    let src = env.read("s.qcow2");
    for mode in ["leaks", "all"] {
        env.space_like_qemu(&src, &["check", "-r", mode, "{}"], 512 << 10);
    }
}
