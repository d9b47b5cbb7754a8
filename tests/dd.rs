//! `img dd` against `qemu-img dd`: the same operands make images with the same size and bytes,
//! the same refusals, and `img`'s output stays sparse.

mod common;

use common::{patterned_raw, Env, MIB, SMALL};

/// The message after the program's name (`qemu-img: X` / `img: X`), line by line.
fn messages(stderr: &str) -> Vec<String> {
    stderr
        .lines()
        .map(|l| {
            l.strip_prefix("qemu-img: ")
                .or_else(|| l.strip_prefix("img: "))
                .unwrap_or(l)
                .to_owned()
        })
        .collect()
}

fn virtual_size(env: &Env, file: &str) -> u64 {
    env.qemu_img(&["info", "--output=json", file]).ok().json()["virtual-size"]
        .as_u64()
        .expect("virtual-size")
}

/// Runs the same `dd` with both tools, each with its own output `of=<stem>-<tool>.<fmt>` (none
/// when `fmt` is `None`), and asserts equal exit codes, messages, virtual sizes and contents;
/// an output of `img` in a format qemu checks must pass `qemu-img check`.
#[track_caller]
fn assert_dd_like_qemu(env: &Env, stem: &str, fmt: Option<&str>, args: &[&str]) {
    let run = |tool: &str| {
        let mut a = vec!["dd"];
        a.extend_from_slice(args);
        let of = fmt.map(|f| format!("of={stem}-{tool}.{f}"));
        a.extend(of.as_deref());
        if tool == "qemu" {
            env.qemu_img(&a)
        } else {
            env.img(&a)
        }
    };
    let theirs = run("qemu");
    let ours = run("img").no_panic();
    assert_eq!(ours.code, theirs.code, "{args:?}: {theirs}{ours}");
    assert_eq!(
        messages(&ours.stderr),
        messages(&theirs.stderr),
        "{args:?}: {theirs}{ours}"
    );
    let Some(fmt) = fmt.filter(|_| theirs.code == Some(0)) else {
        return;
    };
    let (q, i) = (format!("{stem}-qemu.{fmt}"), format!("{stem}-img.{fmt}"));
    assert_eq!(virtual_size(env, &i), virtual_size(env, &q), "{args:?}");
    env.qemu_img(&["compare", "-q", &q, &i]).ok();
    if fmt != "raw" {
        env.qemu_img(&["check", &i]).ok();
    }
}

#[test]
fn dd_matches_qemu_for_every_format_and_operand_mix() {
    let env = Env::with_qemu();
    patterned_raw(&env, "in.raw");
    // A qcow2 overlay over the same data: dd reads through the chain.
    env.qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-b",
        "in.raw",
        "-F",
        "raw",
        "top.qcow2",
    ])
    .ok();
    env.qemu_io("qcow2", "top.qcow2", &["write -P 0x9c 1536k 100k"]);
    // The operands, and whether they make an empty output.
    let cases: &[(&[&str], bool)] = &[
        (&[], false),
        (&["bs=1M"], false),
        (&["bs=64k", "skip=3"], false),
        (&["bs=1M", "count=3", "skip=1"], false),
        (&["bs=1M", "count=1", "skip=1"], true),
        (&["bs=100", "count=7"], false),
        (&["bs=4097", "count=0x200", "skip=010"], false),
        (&["bs=1M", "count=99"], false),
        (&["bs=1M", "skip=4"], true),
        (&["bs=2147483647"], false),
    ];
    for (n, &(case, empty)) in cases.iter().enumerate() {
        for fmt in ["raw", "qcow2", "vmdk", "vdi"] {
            for (src, f) in [("in.raw", "raw"), ("top.qcow2", "qcow2")] {
                let input = format!("if={src}");
                let mut args = vec!["-f", f, "-O", fmt, &input];
                args.extend_from_slice(case);
                if fmt == "vmdk" && empty {
                    // qemu-img makes the empty vmdk but then cannot open it ("Unsupported
                    // image type"), as it cannot open what `qemu-img create` makes of size 0.
                    let of = format!("of=empty-{f}.vmdk");
                    args.push(&of);
                    let mut a = vec!["dd"];
                    a.extend_from_slice(&args);
                    env.img(&a).ok();
                    let info = env.img(&["info", "--output=json", &format!("empty-{f}.vmdk")]);
                    assert_eq!(info.ok().json()["virtual-size"], 0);
                    continue;
                }
                assert_dd_like_qemu(&env, &format!("o{n}-{f}"), Some(fmt), &args);
            }
        }
    }
}

#[test]
fn dd_skip_past_the_end_warns_and_makes_an_empty_image() {
    let env = Env::with_qemu();
    patterned_raw(&env, "in.raw");
    for case in [&["bs=1M", "skip=5"][..], &["bs=1M", "count=1", "skip=2"]] {
        for fmt in ["raw", "qcow2", "vdi"] {
            let mut args = vec!["-f", "raw", "-O", fmt, "if=in.raw"];
            args.extend_from_slice(case);
            assert_dd_like_qemu(&env, "skip", Some(fmt), &args);
        }
        let mut args = vec!["dd", "-f", "raw", "if=in.raw", "of=e.raw"];
        args.extend_from_slice(case);
        let out = env.img(&args).ok();
        assert_eq!(out.stderr, "img: in.raw: cannot skip to specified offset\n");
        assert_eq!(env.len("e.raw"), 0);
    }
}

#[test]
fn dd_refuses_what_qemu_refuses_in_its_words() {
    let env = Env::with_qemu();
    patterned_raw(&env, "in.raw");
    let cases: &[&[&str]] = &[
        &["if=in.raw"],
        &["bs=1M", "of=x.raw"],
        &["if=in.raw", "of=x.raw", "extra"],
        &["if=in.raw", "of=x.raw", "foo=1"],
        &["if=in.raw", "of=x.raw", "bs=0"],
        &["if=in.raw", "of=x.raw", "bs=2G"],
        &["if=in.raw", "of=x.raw", "bs=1x"],
        &["if=in.raw", "of=x.raw", "bs="],
        &["if=in.raw", "of=x.raw", "count=1k"],
        &["if=in.raw", "of=x.raw", "count=-1"],
        &["if=in.raw", "of=x.raw", "count=08"],
        &["if=in.raw", "of=x.raw", "count=99999999999999999999"],
        &["if=in.raw", "of=x.raw", "skip=1.5"],
        &["if=in.raw", "of=x.raw", "skip=-2"],
        &["if=missing.raw", "of=x.raw"],
        &["-O", "bogus", "if=in.raw", "of=x.raw"],
    ];
    for (n, case) in cases.iter().enumerate() {
        assert_dd_like_qemu(&env, &format!("r{n}"), None, case);
    }
}

/// Options may follow the operands, as getopt lets them in qemu-img: `-O` and `-f` after
/// `of=` still pick the formats, and an unknown one is refused as an option, not an operand.
#[test]
fn dd_takes_options_after_the_operands_like_qemu() {
    let env = Env::with_qemu();
    patterned_raw(&env, "in.raw");
    for tool in ["qemu", "img"] {
        let of = format!("of=o-{tool}.qcow2");
        let args = ["dd", "if=in.raw", &of, "bs=64k", "-O", "qcow2", "-f", "raw"];
        if tool == "qemu" {
            env.qemu_img(&args).ok();
        } else {
            env.img(&args).ok();
        }
        let info = env
            .qemu_img(&["info", "--output=json", &format!("o-{tool}.qcow2")])
            .ok()
            .json();
        assert_eq!(info["format"], "qcow2", "{tool}");
    }
    env.qemu_img(&["compare", "-q", "o-qemu.qcow2", "o-img.qcow2"])
        .ok();
    let bad = ["dd", "if=in.raw", "of=x.raw", "-x"];
    let (q, i) = (env.qemu_img(&bad), env.img(&bad));
    assert_eq!(i.code, q.code, "{q}{i}");
    assert_eq!(i.stderr, q.stderr.replace("qemu-img", "img"), "{q}{i}");
    assert_dd_like_qemu(&env, "y", Some("raw"), &["if=in.raw", "--", "bs=1k"]);
}

#[test]
fn dd_output_stays_sparse_where_the_input_reads_as_zeroes() {
    let env = Env::with_qemu();
    env.sparse_file("in.raw", SMALL);
    env.write_at("in.raw", MIB, &[0x42; 65536]);
    env.img(&[
        "dd",
        "-f",
        "raw",
        "-O",
        "qcow2",
        "bs=1M",
        "if=in.raw",
        "of=out.qcow2",
    ])
    .ok();
    env.qemu_img(&["compare", "-q", "in.raw", "out.qcow2"]).ok();
    let map = env
        .qemu_img(&["map", "--output=json", "out.qcow2"])
        .ok()
        .json();
    let data: Vec<(u64, u64)> = map
        .as_array()
        .expect("map is a list")
        .iter()
        .filter(|e| e["data"] == true)
        .map(|e| {
            (
                e["start"].as_u64().expect("start"),
                e["length"].as_u64().expect("length"),
            )
        })
        .collect();
    assert_eq!(data, vec![(MIB, 65536)], "{map}");
    // A raw output: at most the first block (which creating a raw file allocates, as qemu's
    // does) and the data take space.
    env.img(&["dd", "-f", "raw", "bs=1M", "if=in.raw", "of=out.raw"])
        .ok();
    env.assert_same_bytes("in.raw", "out.raw");
    assert!(
        env.allocated("out.raw") <= 4096 + 65536,
        "{}",
        env.allocated("out.raw")
    );
}

#[test]
fn dd_reads_an_encrypted_input_named_with_image_opts() {
    let env = Env::with_qemu();
    patterned_raw(&env, "in.raw");
    let object = "secret,id=s0,data=pw";
    env.qemu_img(&[
        "convert",
        "--object",
        object,
        "-f",
        "raw",
        "-O",
        "qcow2",
        "-o",
        "encrypt.format=luks,encrypt.key-secret=s0",
        "in.raw",
        "enc.qcow2",
    ])
    .ok();
    env.img(&[
        "dd",
        "--object",
        object,
        "--image-opts",
        "bs=64k",
        "skip=2",
        "if=driver=qcow2,file.filename=enc.qcow2,encrypt.key-secret=s0",
        "of=plain.raw",
    ])
    .ok();
    env.qemu_img(&[
        "dd",
        "-f",
        "raw",
        "bs=64k",
        "skip=2",
        "if=in.raw",
        "of=want.raw",
    ])
    .ok();
    env.assert_same_bytes("plain.raw", "want.raw");
}

#[test]
fn dd_onto_its_own_input_is_refused_and_leaves_it_intact() {
    // qemu-img truncates the input before it reads it; img cannot take the write lock that
    // creating the output needs while the input is open, and touches nothing.
    let env = Env::with_qemu();
    patterned_raw(&env, "in.raw");
    let before = env.read("in.raw");
    let out = env
        .img(&["dd", "-f", "raw", "if=in.raw", "of=in.raw"])
        .code_is(1);
    assert!(
        out.stderr.starts_with(
            "img: in.raw: error while creating output image: Failed to get \"write\" lock"
        ),
        "{out}"
    );
    assert!(env.read("in.raw") == before, "the input changed");
}
