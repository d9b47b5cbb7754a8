//! Persistent dirty bitmaps (qcow2's bitmaps extension): images whose bitmaps qemu-img made,
//! read, checked and written by `img`, and compared with what qemu-img says about them.

mod common;

use common::{Env, MIB};

/// `t.qcow2`, 8 MiB, with an enabled bitmap `b0`, a disabled `b1` of 128 KiB granularity and an
/// enabled `b2` of 512-byte granularity, all made by qemu-img; qemu-io then writes 1 MiB, which
/// dirties the enabled bitmaps.
fn image_with_bitmaps(env: &Env) {
    env.qemu_img(&["create", "-f", "qcow2", "t.qcow2", "8M"])
        .ok();
    env.qemu_img(&["bitmap", "--add", "t.qcow2", "b0"]).ok();
    env.qemu_img(&[
        "bitmap",
        "--add",
        "--disable",
        "-g",
        "128k",
        "t.qcow2",
        "b1",
    ])
    .ok();
    env.qemu_img(&["bitmap", "--add", "-g", "512", "t.qcow2", "b2"])
        .ok();
    env.qemu_io("qcow2", "t.qcow2", &["write -P 0x11 0 1M"]);
}

#[test]
fn info_qemu_bitmaps_equals_qemu() {
    let env = Env::with_qemu();
    image_with_bitmaps(&env);
    for args in [
        &["info", "t.qcow2"][..],
        &["info", "--output=json", "t.qcow2"],
    ] {
        let ours = env.img(args).ok();
        let theirs = env.qemu_img(args).ok();
        assert_eq!(ours.stdout, theirs.stdout, "{args:?}");
    }
    assert!(env
        .img(&["info", "t.qcow2"])
        .ok()
        .stdout
        .contains("bitmaps:"));
}

#[test]
fn check_qemu_bitmaps_is_clean_like_qemu() {
    let env = Env::with_qemu();
    image_with_bitmaps(&env);
    let theirs = env.qemu_img(&["check", "t.qcow2"]).ok();
    let ours = env.img(&["check", "t.qcow2"]).ok();
    assert_eq!(ours.stdout, theirs.stdout);
}

#[test]
fn check_bad_bitmap_table_entry_is_corruption() {
    let env = Env::with_qemu();
    image_with_bitmaps(&env);
    // Set a reserved bit in the first table entry of the first bitmap.
    let b = env.read("t.qcow2");
    let be64 = |o: usize| u64::from_be_bytes(b[o..o + 8].try_into().unwrap());
    let ext = b
        .windows(4)
        .position(|w| w == [0x23, 0x85, 0x28, 0x75])
        .unwrap();
    let dir = usize::try_from(be64(ext + 8 + 16)).unwrap();
    let table = be64(dir);
    let entry = be64(usize::try_from(table).unwrap());
    env.write_at("t.qcow2", table, &(entry | 2).to_be_bytes());
    let out = env.img(&["check", "t.qcow2"]).code_is(2);
    assert!(out.stderr.contains("reserved bits set"), "{out}");
}

/// One bitmap as the test reads it from the file: name, flags, and its dirty ranges in guest
/// bytes, `[start, end)`.
#[derive(Debug, PartialEq, Eq)]
struct Dirty {
    name: String,
    flags: u32,
    ranges: Vec<(u64, u64)>,
}

/// A small independent reader of the bitmaps extension, directory, tables and data clusters
/// (none without the extension).
fn read_bitmaps(env: &Env, file: &str) -> Vec<Dirty> {
    let b = env.read(file);
    let be16 = |o: usize| u64::from(u16::from_be_bytes(b[o..o + 2].try_into().unwrap()));
    let be32 = |o: usize| u64::from(u32::from_be_bytes(b[o..o + 4].try_into().unwrap()));
    let be64 = |o: usize| u64::from_be_bytes(b[o..o + 8].try_into().unwrap());
    let us = |v: u64| usize::try_from(v).unwrap();
    let cs = 1u64 << be32(20);
    let size = be64(24);
    let mut o = us(be32(100));
    loop {
        let (kind, len) = (be32(o), be32(o + 4));
        if kind == 0 {
            return Vec::new(); // no bitmaps extension
        }
        if kind == 0x2385_2875 {
            break;
        }
        o += 8 + us(len.div_ceil(8) * 8);
    }
    let n = be32(o + 8);
    let mut p = us(be64(o + 8 + 16));
    let mut out = Vec::new();
    for _ in 0..n {
        let (table, table_size, flags) = (be64(p), be32(p + 8), be32(p + 12));
        let (gbits, name_len, extra) = (b[p + 17], be16(p + 18), be32(p + 20));
        let name_at = p + 24 + us(extra);
        let name = String::from_utf8(b[name_at..name_at + us(name_len)].to_vec()).unwrap();
        p += us((24 + extra + name_len).div_ceil(8) * 8);
        let g = 1u64 << gbits;
        let nbits = size.div_ceil(g);
        let mut ranges: Vec<(u64, u64)> = Vec::new();
        for i in 0..table_size {
            let e = be64(us(table + i * 8));
            let off = e & 0x00ff_ffff_ffff_fe00;
            for k in 0..cs * 8 {
                let bit = i * cs * 8 + k;
                if bit >= nbits {
                    break;
                }
                let set = if off != 0 {
                    b[us(off + k / 8)] >> (k % 8) & 1 == 1
                } else {
                    e & 1 == 1
                };
                if set {
                    match ranges.last_mut() {
                        Some(r) if r.1 == bit * g => r.1 += g,
                        _ => ranges.push((bit * g, bit * g + g)),
                    }
                }
            }
        }
        out.push(Dirty {
            name,
            flags: u32::try_from(flags).unwrap(),
            ranges,
        });
    }
    out
}

/// qemu-img's verdict: the image checks clean and no bitmap is inconsistent.
#[track_caller]
fn assert_qemu_accepts(env: &Env, file: &str) {
    let out = env.qemu_img(&["check", file]).ok();
    assert!(out.stdout.contains("No errors were found"), "{out}");
    assert!(!out.stderr.contains("inconsistent"), "{out}");
    let info = env.qemu_img(&["info", file]).ok();
    assert!(!info.stdout.contains("in-use"), "{info}");
    assert!(info.stdout.contains("name: b2"), "{info}");
}

#[test]
fn commit_into_image_with_bitmaps_dirties_enabled_bitmaps() {
    let env = Env::with_qemu();
    image_with_bitmaps(&env);
    env.qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-b",
        "t.qcow2",
        "-F",
        "qcow2",
        "top.qcow2",
    ])
    .ok();
    env.qemu_io(
        "qcow2",
        "top.qcow2",
        &["write -P 0x22 3M 64k", "write -P 0x33 6M 64k"],
    );
    env.img(&["commit", "top.qcow2"]).ok();
    assert_qemu_accepts(&env, "t.qcow2");
    let bms = read_bitmaps(&env, "t.qcow2");
    let (first, second) = ((0, MIB), (3 * MIB, 3 * MIB + 65536));
    let third = (6 * MIB, 6 * MIB + 65536);
    assert_eq!(bms[0].name, "b0");
    assert_eq!(bms[0].flags, 2);
    assert_eq!(bms[0].ranges, vec![first, second, third]);
    assert_eq!(bms[1].ranges, vec![], "the disabled bitmap stays clean");
    assert_eq!(bms[2].ranges, vec![first, second, third]);
    // qemu can use the bitmaps: merge one into another image, and copy them all.
    env.qemu_img(&["create", "-f", "qcow2", "m.qcow2", "8M"])
        .ok();
    env.qemu_img(&["bitmap", "--add", "m.qcow2", "m"]).ok();
    env.qemu_img(&["bitmap", "--merge", "b2", "-b", "t.qcow2", "m.qcow2", "m"])
        .ok();
    assert_eq!(
        read_bitmaps(&env, "m.qcow2")[0].ranges,
        vec![first, second, third]
    );
    env.qemu_img(&["convert", "--bitmaps", "-O", "qcow2", "t.qcow2", "c.qcow2"])
        .ok();
    assert_eq!(read_bitmaps(&env, "c.qcow2"), bms);
}

#[test]
fn convert_into_image_with_bitmaps_leaves_them_consistent() {
    let env = Env::with_qemu();
    image_with_bitmaps(&env);
    env.sparse_file("src.raw", 8 * MIB);
    env.write_at("src.raw", 2 * MIB, &[7; 4096]);
    env.img(&[
        "convert", "-n", "-f", "raw", "-O", "qcow2", "src.raw", "t.qcow2",
    ])
    .ok();
    assert_qemu_accepts(&env, "t.qcow2");
    let bms = read_bitmaps(&env, "t.qcow2");
    // convert -n writes the whole disk (data, and zeroes elsewhere): all of it is dirty.
    assert_eq!(bms[0].ranges, vec![(0, 8 * MIB)]);
    assert_eq!(bms[1].ranges, vec![]);
}

#[test]
fn resize_image_with_bitmaps_equals_qemu() {
    let env = Env::with_qemu();
    image_with_bitmaps(&env);
    env.qemu_io("qcow2", "t.qcow2", &["write 7M 1k"]);
    std::fs::copy(env.path("t.qcow2"), env.path("q.qcow2")).unwrap();
    // 300M needs a second table entry at 512-byte granularity; 5M drops it again.
    for size in ["16M", "300M"] {
        env.img(&["resize", "t.qcow2", size]).ok();
        env.qemu_img(&["resize", "q.qcow2", size]).ok();
        assert_qemu_accepts(&env, "t.qcow2");
        assert_eq!(read_bitmaps(&env, "t.qcow2"), read_bitmaps(&env, "q.qcow2"));
    }
    env.img(&["resize", "--shrink", "t.qcow2", "5M"]).ok();
    env.qemu_img(&["resize", "--shrink", "q.qcow2", "5M"]).ok();
    assert_qemu_accepts(&env, "t.qcow2");
    assert_eq!(read_bitmaps(&env, "t.qcow2"), read_bitmaps(&env, "q.qcow2"));
    env.img(&["check", "t.qcow2"]).ok();
}

#[test]
fn snapshot_apply_with_bitmaps_fails_like_qemu() {
    let env = Env::with_qemu();
    image_with_bitmaps(&env);
    env.img(&["snapshot", "-c", "s1", "t.qcow2"]).ok();
    assert_qemu_accepts(&env, "t.qcow2");
    let theirs = env
        .qemu_img(&["snapshot", "-a", "s1", "t.qcow2"])
        .code_is(1);
    let ours = env.img(&["snapshot", "-a", "s1", "t.qcow2"]).code_is(1);
    assert_eq!(
        ours.stderr.replacen("img:", "qemu-img:", 1),
        theirs.stderr,
        "{ours}"
    );
}

#[test]
fn check_repair_leaks_keeps_bitmap_clusters() {
    let env = Env::with_qemu();
    image_with_bitmaps(&env);
    env.img(&["check", "-r", "leaks", "t.qcow2"]).ok();
    let out = env.qemu_img(&["check", "t.qcow2"]).ok();
    assert!(out.stdout.contains("No errors were found"), "{out}");
    assert!(!out.stderr.contains("inconsistent"), "{out}");
    let info = env.qemu_img(&["info", "t.qcow2"]).ok();
    assert!(info.stdout.contains("name: b2"), "{info}");
}

#[test]
fn measure_image_with_bitmaps_equals_qemu() {
    let env = Env::with_qemu();
    image_with_bitmaps(&env);
    for extra in [&[][..], &["-o", "cluster_size=4k"], &["--output=json"]] {
        let mut args = vec!["measure", "-O", "qcow2"];
        args.extend_from_slice(extra);
        args.push("t.qcow2");
        let ours = env.img(&args).ok();
        let theirs = env.qemu_img(&args).ok();
        assert_eq!(ours.stdout, theirs.stdout, "{args:?}");
    }
}

/// qemu-img's stderr in `img`'s words: the program name, and the file where qemu names its
/// block node (`#block123`).
fn as_img_stderr(qemu: &str, file: &str) -> String {
    let mut out = String::new();
    let mut rest = qemu.replace("qemu-img: ", "img: ");
    while let Some(i) = rest.find("#block") {
        out.push_str(&rest[..i]);
        out.push_str(file);
        rest = rest[i + 6..]
            .trim_start_matches(|c: char| c.is_ascii_digit())
            .to_owned();
    }
    out + &rest
}

/// The `format-specific` data of `qemu-img info --output=json`, where the bitmaps are listed.
fn qemu_specific(env: &Env, file: &str) -> serde_json::Value {
    env.qemu_img(&["info", "--output=json", file]).ok().json()["format-specific"].clone()
}

/// Flips the in-use flag of the bitmap `index` of `file`, as a crash with the image open leaves
/// it.
fn mark_in_use(env: &Env, file: &str, index: usize) {
    let b = env.read(file);
    let be16 = |o: usize| usize::from(u16::from_be_bytes(b[o..o + 2].try_into().unwrap()));
    let be32 = |o: usize| u32::from_be_bytes(b[o..o + 4].try_into().unwrap());
    let be64 = |o: usize| u64::from_be_bytes(b[o..o + 8].try_into().unwrap());
    let ext = b
        .windows(4)
        .position(|w| w == [0x23, 0x85, 0x28, 0x75])
        .unwrap();
    let mut p = usize::try_from(be64(ext + 8 + 16)).unwrap();
    for _ in 0..index {
        let extra = usize::try_from(be32(p + 20)).unwrap();
        p += (24 + extra + be16(p + 18)).div_ceil(8) * 8;
    }
    let flags = be32(p + 12) | 1;
    env.write_at(file, p as u64 + 12, &flags.to_be_bytes());
}

/// Runs the same `bitmap` command with qemu-img on `q.qcow2` and with img on `i.qcow2` (the
/// file name last but one, as the command line has it) and asserts the same outcome: exit
/// status, message, bitmaps as qemu-img info lists them, their bits, and the data.
#[track_caller]
fn same_bitmap_command(env: &Env, args: &[&str]) {
    let with = |file: &'static str| -> Vec<String> {
        let n = args.len();
        args.iter()
            .enumerate()
            .map(|(i, a)| if i == n - 2 { file } else { a }.to_string())
            .collect()
    };
    let q_args = with("q.qcow2");
    let i_args = with("i.qcow2");
    let q_refs: Vec<&str> = q_args.iter().map(String::as_str).collect();
    let i_refs: Vec<&str> = i_args.iter().map(String::as_str).collect();
    let theirs = env.qemu_img(&q_refs);
    let ours = env.img(&i_refs).no_panic();
    assert_eq!(ours.code, theirs.code, "{args:?}: {ours}{theirs}");
    assert_eq!(
        ours.stderr,
        as_img_stderr(&theirs.stderr, "i.qcow2").replace("q.qcow2", "i.qcow2"),
        "{args:?}"
    );
    assert_eq!(
        qemu_specific(env, "i.qcow2"),
        qemu_specific(env, "q.qcow2"),
        "{args:?}"
    );
    let check = env.qemu_img(&["check", "i.qcow2"]).ok();
    assert!(check.stdout.contains("No errors were found"), "{check}");
    assert_eq!(
        read_bitmaps(env, "i.qcow2"),
        read_bitmaps(env, "q.qcow2"),
        "{args:?}"
    );
    env.qemu_img(&["compare", "q.qcow2", "i.qcow2"]).ok();
}

/// `q.qcow2` and `i.qcow2`: copies of [`image_with_bitmaps`]'s image; `o.qcow2`, another image
/// of the same size with a bitmap `ob` of 4 KiB granularity dirtied at 5 MiB; `small.qcow2`, a
/// 4 MiB one with a bitmap `sb`.
fn two_copies(env: &Env) {
    image_with_bitmaps(env);
    std::fs::copy(env.path("t.qcow2"), env.path("q.qcow2")).unwrap();
    std::fs::copy(env.path("t.qcow2"), env.path("i.qcow2")).unwrap();
    env.qemu_img(&["create", "-f", "qcow2", "o.qcow2", "8M"])
        .ok();
    env.qemu_img(&["bitmap", "--add", "-g", "4k", "o.qcow2", "ob"])
        .ok();
    env.qemu_io("qcow2", "o.qcow2", &["write 5M 10k"]);
    env.qemu_img(&["create", "-f", "qcow2", "small.qcow2", "4M"])
        .ok();
    env.qemu_img(&["bitmap", "--add", "small.qcow2", "sb"]).ok();
}

#[test]
fn bitmap_actions_equal_qemu() {
    let env = Env::with_qemu();
    two_copies(&env);
    for args in [
        &["bitmap", "--add", "F", "n1"][..],
        &["bitmap", "--add", "--disable", "-g", "512", "F", "n2"],
        // From the same image, at another granularity, and in order with other actions.
        &["bitmap", "--merge", "b0", "F", "n2"],
        &[
            "bitmap", "--merge", "b2", "--enable", "--merge", "b1", "F", "n1",
        ],
        // From another image, with and without its format.
        &[
            "bitmap", "--merge", "ob", "-b", "o.qcow2", "-F", "qcow2", "F", "n1",
        ],
        &["bitmap", "--merge", "ob", "-b", "o.qcow2", "F", "b1"],
        &["bitmap", "--clear", "F", "b0"],
        &["bitmap", "--disable", "--disable", "F", "b2"],
        &["bitmap", "--remove", "F", "b1"],
        &["bitmap", "--add", "-g", "2G", "F", "big"],
        &["bitmap", "--add", "-g", "0", "F", "d0"],
        &["bitmap", "--add", "--remove", "--add", "F", "again"],
        &["bitmap", "--a", "--gran=1k", "--di", "F", "prefixes"],
        &[
            "bitmap",
            "--add",
            "--image-opts",
            "driver=qcow2,file.filename=F",
            "opts",
        ],
    ] {
        let args: Vec<&str> = args.to_vec();
        let fixed: Vec<String> = args
            .iter()
            .map(|a| a.replace("file.filename=F", "file.filename=FILE"))
            .collect();
        if fixed.iter().any(|a| a.contains("FILE")) {
            // --image-opts: the file name sits inside the option list.
            let q: Vec<String> = fixed.iter().map(|a| a.replace("FILE", "q.qcow2")).collect();
            let i: Vec<String> = fixed.iter().map(|a| a.replace("FILE", "i.qcow2")).collect();
            let q: Vec<&str> = q.iter().map(String::as_str).collect();
            let i: Vec<&str> = i.iter().map(String::as_str).collect();
            env.qemu_img(&q).ok();
            env.img(&i).ok();
            assert_eq!(
                qemu_specific(&env, "i.qcow2"),
                qemu_specific(&env, "q.qcow2")
            );
            continue;
        }
        same_bitmap_command(&env, &args);
    }
    let bms = read_bitmaps(&env, "i.qcow2");
    assert!(bms.iter().any(|b| b.name == "n1" && !b.ranges.is_empty()));
    // qemu uses the bitmaps img made: it records writes in the enabled ones and copies all.
    env.qemu_io("qcow2", "i.qcow2", &["write 7M 4k"]);
    env.qemu_io("qcow2", "q.qcow2", &["write 7M 4k"]);
    assert_eq!(read_bitmaps(&env, "i.qcow2"), read_bitmaps(&env, "q.qcow2"));
    env.qemu_img(&["convert", "--bitmaps", "-O", "qcow2", "i.qcow2", "c.qcow2"])
        .ok();
    assert_eq!(read_bitmaps(&env, "c.qcow2"), read_bitmaps(&env, "i.qcow2"));
}

#[test]
fn bitmap_errors_equal_qemu() {
    let env = Env::with_qemu();
    two_copies(&env);
    let long = "x".repeat(1024);
    for args in [
        &["bitmap", "--add", "F", "b0"][..],
        &["bitmap", "--remove", "F", "nope"],
        &["bitmap", "--clear", "F", "nope"],
        &["bitmap", "--enable", "F", "nope"],
        &["bitmap", "--disable", "F", "nope"],
        &["bitmap", "--merge", "nope", "F", "b0"],
        &["bitmap", "--merge", "b0", "F", "nope"],
        &["bitmap", "--merge", "nope", "-b", "o.qcow2", "F", "b0"],
        &["bitmap", "--merge", "sb", "-b", "small.qcow2", "F", "b0"],
        &["bitmap", "--merge", "ob", "-b", "missing.qcow2", "F", "b0"],
        &[
            "bitmap", "--merge", "ob", "-b", "o.qcow2", "-F", "bogus", "F", "b0",
        ],
        &[
            "bitmap", "--merge", "ob", "-b", "o.qcow2", "-F", "raw", "F", "b0",
        ],
        &["bitmap", "--add", "-g", "256", "F", "g"],
        &["bitmap", "--add", "-g", "3000", "F", "g"],
        &["bitmap", "--add", "-g", "4G", "F", "g"],
        &["bitmap", "--add", "-g", "abc", "F", "g"],
        &["bitmap", "--add", "-g", "-1", "F", "g"],
        &["bitmap", "--add", "F", ""],
        &["bitmap", "--add", "F", &long],
        // The first actions stay done when a later one fails.
        &["bitmap", "--add", "--add", "F", "twice"],
        &["bitmap", "--remove", "--merge", "b0", "F", "b2"],
        &["bitmap", "F", "b0"],
        &["bitmap", "--add", "F", "b0", "extra"],
        &["bitmap", "--remove", "-g", "64k", "F", "b0"],
        &["bitmap", "--add", "-F", "qcow2", "F", "b0"],
        &["bitmap", "--add", "-b", "o.qcow2", "F", "b0"],
        &["bitmap", "--add", "-f", "qcow2", "--image-opts", "F", "b0"],
        &["bitmap", "--add", "-f", "bogus", "F", "b0"],
        &["bitmap", "--add", "-f", "raw", "F", "b0"],
        &["bitmap", "--add", "F", "missing.qcow2"],
    ] {
        same_bitmap_command(&env, args);
    }
}

#[test]
fn bitmap_other_formats_equal_qemu() {
    let env = Env::with_qemu();
    for fmt in ["raw", "vmdk", "vdi"] {
        let (q, i) = (format!("q.{fmt}"), format!("i.{fmt}"));
        env.qemu_img(&["create", "-f", fmt, &q, "1M"]).ok();
        env.qemu_img(&["create", "-f", fmt, &i, "1M"]).ok();
        for action in ["--add", "--remove", "--clear", "--enable"] {
            let theirs = env.qemu_img(&["bitmap", action, &q, "b"]).code_is(1);
            let ours = env.img(&["bitmap", action, &i, "b"]).code_is(1);
            assert_eq!(
                ours.stderr,
                as_img_stderr(&theirs.stderr, &i).replace(&q, &i),
                "{fmt} {action}"
            );
        }
    }
    // qcow2 version 2 cannot hold bitmaps.
    env.qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-o",
        "compat=0.10",
        "q.qcow2",
        "1M",
    ])
    .ok();
    env.qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-o",
        "compat=0.10",
        "i.qcow2",
        "1M",
    ])
    .ok();
    same_bitmap_command(&env, &["bitmap", "--add", "F", "b"]);
}

#[test]
fn bitmap_inconsistent_equals_qemu() {
    let env = Env::with_qemu();
    two_copies(&env);
    mark_in_use(&env, "q.qcow2", 2);
    mark_in_use(&env, "i.qcow2", 2);
    mark_in_use(&env, "o.qcow2", 0);
    for args in [
        &["bitmap", "--clear", "F", "b2"][..],
        &["bitmap", "--enable", "F", "b2"],
        &["bitmap", "--disable", "F", "b2"],
        &["bitmap", "--merge", "b0", "F", "b2"],
        &["bitmap", "--merge", "b2", "F", "b0"],
        &["bitmap", "--merge", "ob", "-b", "o.qcow2", "F", "b0"],
        &["bitmap", "--add", "F", "more"],
        &["bitmap", "--remove", "F", "b2"],
    ] {
        same_bitmap_command(&env, args);
    }
}

#[test]
fn bitmap_remove_last_leaves_no_extension_like_qemu() {
    let env = Env::with_qemu();
    for f in ["q.qcow2", "i.qcow2"] {
        env.qemu_img(&["create", "-f", "qcow2", f, "1M"]).ok();
    }
    same_bitmap_command(&env, &["bitmap", "--add", "F", "only"]);
    same_bitmap_command(&env, &["bitmap", "--remove", "F", "only"]);
    let (q, i) = (env.read("q.qcow2"), env.read("i.qcow2"));
    // The autoclear bits, and no bitmaps extension.
    assert_eq!(i[88..96], q[88..96]);
    assert!(!i.windows(4).any(|w| w == [0x23, 0x85, 0x28, 0x75]));
}

/// Runs `convert` with qemu-img into `q.*` and with img into `i.*` (the last argument's
/// extension kept) and asserts the same status and message, and, when both made a qcow2
/// target, the same bitmaps, bits and data.
#[track_caller]
fn same_convert(env: &Env, args: &[&str]) {
    let dst = args.last().unwrap();
    let ext = dst.rsplit('.').next().unwrap();
    let (q, i) = (format!("q.{ext}"), format!("i.{ext}"));
    let mut q_args: Vec<&str> = args.to_vec();
    let mut i_args: Vec<&str> = args.to_vec();
    *q_args.last_mut().unwrap() = &q;
    *i_args.last_mut().unwrap() = &i;
    let theirs = env.qemu_img(&q_args);
    let ours = env.img(&i_args).no_panic();
    assert_eq!(ours.code, theirs.code, "{args:?}: {ours}{theirs}");
    assert_eq!(
        ours.stderr,
        theirs.stderr.replace("qemu-img", "img"),
        "{args:?}"
    );
    assert_eq!(env.path(&i).exists(), env.path(&q).exists(), "{args:?}");
    if ext == "qcow2" && env.path(&q).exists() {
        assert_eq!(qemu_specific(env, &i), qemu_specific(env, &q), "{args:?}");
        let check = env.qemu_img(&["check", &i]).ok();
        assert!(check.stdout.contains("No errors were found"), "{check}");
        assert_eq!(read_bitmaps(env, &i), read_bitmaps(env, &q), "{args:?}");
        env.qemu_img(&["compare", &q, &i]).ok();
    }
}

#[test]
fn convert_bitmaps_equals_qemu() {
    let env = Env::with_qemu();
    image_with_bitmaps(&env);
    for args in [
        &["convert", "--bitmaps", "-O", "qcow2", "t.qcow2", "x.qcow2"][..],
        &[
            "convert",
            "--bitmaps",
            "-c",
            "-O",
            "qcow2",
            "t.qcow2",
            "x.qcow2",
        ],
        &[
            "convert",
            "--bitmaps",
            "-O",
            "qcow2",
            "-o",
            "cluster_size=4k",
            "t.qcow2",
            "x.qcow2",
        ],
        &[
            "convert",
            "--bitmaps",
            "--skip-broken-bitmaps",
            "-O",
            "qcow2",
            "t.qcow2",
            "x.qcow2",
        ],
    ] {
        same_convert(&env, args);
    }
    let bms = read_bitmaps(&env, "i.qcow2");
    assert_eq!(bms.len(), 3);
    assert_eq!(bms[2].ranges, vec![(0, MIB)]);
    // img reads its own copies back into another one.
    env.img(&[
        "convert",
        "--bitmaps",
        "-O",
        "qcow2",
        "i.qcow2",
        "again.qcow2",
    ])
    .ok();
    assert_eq!(read_bitmaps(&env, "again.qcow2"), bms);
}

#[test]
fn convert_bitmaps_from_a_snapshot_copies_the_images_bitmaps_like_qemu() {
    let env = Env::with_qemu();
    image_with_bitmaps(&env);
    env.qemu_img(&["snapshot", "-c", "s1", "t.qcow2"]).ok();
    env.qemu_io("qcow2", "t.qcow2", &["write -P 0x22 4M 64k"]);
    same_convert(
        &env,
        &[
            "convert",
            "--bitmaps",
            "-l",
            "s1",
            "-O",
            "qcow2",
            "t.qcow2",
            "x.qcow2",
        ],
    );
    let bms = read_bitmaps(&env, "i.qcow2");
    assert_eq!(bms.len(), 3);
    // The bits are the image's own, the write after the snapshot included.
    assert_eq!(bms[2].ranges, vec![(0, MIB), (4 * MIB, 4 * MIB + 65536)]);
}

#[test]
fn convert_bitmaps_errors_equal_qemu() {
    let env = Env::with_qemu();
    image_with_bitmaps(&env);
    env.qemu_img(&["create", "-f", "raw", "r.raw", "8M"]).ok();
    env.qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-o",
        "compat=0.10",
        "v2.qcow2",
        "8M",
    ])
    .ok();
    for args in [
        &["convert", "--bitmaps", "-O", "raw", "t.qcow2", "x.raw"][..],
        &["convert", "--bitmaps", "-O", "vmdk", "t.qcow2", "x.vmdk"],
        &[
            "convert",
            "--bitmaps",
            "-O",
            "qcow2",
            "-o",
            "compat=0.10",
            "t.qcow2",
            "x.qcow2",
        ],
        &["convert", "--bitmaps", "-O", "qcow2", "r.raw", "x.qcow2"],
        &["convert", "--bitmaps", "-O", "qcow2", "v2.qcow2", "x.qcow2"],
        &[
            "convert",
            "--bitmaps",
            "-O",
            "qcow2",
            "t.qcow2",
            "r.raw",
            "x.qcow2",
        ],
        &[
            "convert",
            "--skip-broken-bitmaps",
            "-O",
            "qcow2",
            "t.qcow2",
            "x.qcow2",
        ],
    ] {
        for f in ["q.qcow2", "i.qcow2", "q.raw", "i.raw", "q.vmdk", "i.vmdk"] {
            let _ = std::fs::remove_file(env.path(f));
        }
        same_convert(&env, args);
    }
}

#[test]
fn convert_inconsistent_bitmaps_equal_qemu() {
    let env = Env::with_qemu();
    image_with_bitmaps(&env);
    mark_in_use(&env, "t.qcow2", 0);
    mark_in_use(&env, "t.qcow2", 1);
    same_convert(
        &env,
        &["convert", "--bitmaps", "-O", "qcow2", "t.qcow2", "x.qcow2"],
    );
    same_convert(
        &env,
        &[
            "convert",
            "--bitmaps",
            "--skip-broken-bitmaps",
            "-O",
            "qcow2",
            "t.qcow2",
            "x.qcow2",
        ],
    );
    assert_eq!(read_bitmaps(&env, "i.qcow2").len(), 1);
}

#[test]
fn convert_bitmaps_into_existing_target_equals_qemu() {
    let env = Env::with_qemu();
    image_with_bitmaps(&env);
    for f in ["q.qcow2", "i.qcow2"] {
        env.qemu_img(&["create", "-f", "qcow2", f, "8M"]).ok();
        env.qemu_img(&["bitmap", "--add", f, "own"]).ok();
    }
    same_convert(
        &env,
        &[
            "convert",
            "-n",
            "--bitmaps",
            "-O",
            "qcow2",
            "t.qcow2",
            "x.qcow2",
        ],
    );
    // A name the target has already: qemu made the newer bitmaps before it stopped.
    for f in ["q.qcow2", "i.qcow2"] {
        env.qemu_img(&["create", "-f", "qcow2", f, "8M"]).ok();
        env.qemu_img(&["bitmap", "--add", "-g", "4k", f, "b1"]).ok();
    }
    same_convert(
        &env,
        &[
            "convert",
            "-n",
            "--bitmaps",
            "-O",
            "qcow2",
            "t.qcow2",
            "x.qcow2",
        ],
    );
    assert_eq!(read_bitmaps(&env, "i.qcow2").len(), 2);
}

/// A persistent bitmap cannot be added to an image of size 0 (its table would be empty, which
/// neither tool opens): refused as qemu-img fails it, and the image still opens.
#[test]
fn bitmap_add_on_a_zero_size_image_is_refused_and_leaves_it_readable() {
    let env = Env::with_qemu();
    for (tool, f) in [("img", "i.qcow2"), ("qemu", "q.qcow2")] {
        env.qemu_img(&["create", "-q", "-f", "qcow2", f, "0"]).ok();
        let args = ["bitmap", "--add", f, "b1"];
        let out = if tool == "img" {
            env.img(&args).no_panic()
        } else {
            env.qemu_img(&args)
        };
        assert_eq!(out.code, Some(1), "{tool}: {out}");
        env.qemu_img(&["info", f]).ok();
        env.qemu_img(&["check", f]).ok();
    }
    let out = env.img(&["bitmap", "--add", "i.qcow2", "b1"]);
    assert!(out.stderr.contains("size 0"), "{out}");
}

/// Emptying the overlay after `commit` leaves what the guest reads unchanged (the data now
/// lies in the base): the overlay's dirty bitmaps keep exactly the bits they had, as with
/// qemu-img's commit, instead of being all set.
#[test]
fn commit_leaves_the_overlays_bitmaps_as_they_were_like_qemu() {
    let env = Env::with_qemu();
    for t in ["q", "i"] {
        let (b, o) = (format!("{t}b.qcow2"), format!("{t}.qcow2"));
        env.qemu_img(&["create", "-q", "-f", "qcow2", &b, "8M"])
            .ok();
        env.qemu_img(&["create", "-q", "-f", "qcow2", "-b", &b, "-F", "qcow2", &o])
            .ok();
        env.qemu_img(&["bitmap", "--add", &o, "b0"]).ok();
        env.qemu_io("qcow2", &o, &["write -P 1 1M 64k", "write -P 2 5M 128k"]);
    }
    let before = read_bitmaps(&env, "i.qcow2");
    assert_eq!(
        before[0].ranges,
        vec![(MIB, MIB + 65536), (5 * MIB, 5 * MIB + 131072)]
    );
    env.qemu_img(&["commit", "-q", "q.qcow2"]).ok();
    env.img(&["commit", "-q", "i.qcow2"]).ok();
    assert_eq!(read_bitmaps(&env, "i.qcow2"), before);
    assert_eq!(read_bitmaps(&env, "q.qcow2"), before);
    let check = env.qemu_img(&["check", "i.qcow2"]).ok();
    assert!(check.stdout.contains("No errors were found"), "{check}");
    env.qemu_img(&["compare", "i.qcow2", "q.qcow2"]).ok();
}

/// Shrinking cuts the bitmaps at the new end: bits past it are cleared even when the table
/// keeps its size, so that growing again finds the re-created space clean, as in qemu.
#[test]
fn shrink_then_grow_leaves_no_stale_dirty_bits_like_qemu() {
    let env = Env::with_qemu();
    for t in ["q", "i"] {
        let f = format!("{t}.qcow2");
        env.qemu_img(&["create", "-q", "-f", "qcow2", &f, "64M"])
            .ok();
        env.qemu_img(&["bitmap", "--add", "-g", "64k", &f, "x"])
            .ok();
        env.qemu_io("qcow2", &f, &["write 2M 64k", "write 60M 1M"]);
    }
    let run = |tool: &dyn Fn(&[&str]), f: &str| {
        tool(&["resize", "-q", "--shrink", f, "50M"]);
        tool(&["resize", "-q", f, "64M"]);
    };
    run(&|a| drop(env.qemu_img(a).ok()), "q.qcow2");
    run(&|a| drop(env.img(a).ok()), "i.qcow2");
    let bms = read_bitmaps(&env, "i.qcow2");
    assert_eq!(bms[0].ranges, vec![(2 * MIB, 2 * MIB + 65536)]);
    assert_eq!(bms, read_bitmaps(&env, "q.qcow2"));
    let check = env.qemu_img(&["check", "i.qcow2"]).ok();
    assert!(check.stdout.contains("No errors were found"), "{check}");
}
