//! `img` on encrypted images against qemu-img: secrets given as `--object secret,...` with
//! `-o encrypt.key-secret=ID` and `--image-opts`, the `encrypt` block of `info`, a wrong or
//! missing passphrase, LUKS and legacy AES qcow2 and the `luks` format both ways, chains with
//! an encrypted layer, and key-slot management with `amend`.

mod common;

use std::sync::OnceLock;

use common::{run_timeout, Env, DEFAULT_TIMEOUT};

const OBJ: &str = "secret,id=s0,data=pw";
const MARKER: &[u8] = b"CLEARTEXT-CANARY-7f3a";

fn opts(fmt: &str, file: &str) -> String {
    let key = if fmt == "luks" {
        "key-secret"
    } else {
        "encrypt.key-secret"
    };
    format!("driver={fmt},file.filename={file},{key}=s0")
}

/// qemu-io with a secret, asserting success.
fn qemu_io(env: &Env, fmt: &str, file: &str, cmds: &[&str]) {
    qemu_io_opts(env, &opts(fmt, file), cmds);
}

/// qemu-io on `--image-opts` with the secret defined.
fn qemu_io_opts(env: &Env, o: &str, cmds: &[&str]) {
    let mut args = vec!["--object", OBJ, "--image-opts", o];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    let out = run_timeout(env.dir.path(), "qemu-io", &args, DEFAULT_TIMEOUT).ok();
    assert!(
        !out.stdout.contains("error") && !out.stdout.contains("failed"),
        "{out}"
    );
}

/// A raw file holding the marker, patterns and zeroes.
fn source_raw(env: &Env) {
    env.sparse_file("src.raw", 8 << 20);
    let m: Vec<u8> = MARKER.iter().copied().cycle().take(1 << 20).collect();
    env.write_at("src.raw", 0, &m);
    env.write_at("src.raw", (5 << 20) + 123, &m[..70_000]);
}

fn to_raw_with_qemu(env: &Env, fmt: &str, file: &str, out: &str) {
    env.qemu_img(&[
        "convert",
        "--object",
        OBJ,
        "--image-opts",
        &opts(fmt, file),
        "-O",
        "raw",
        out,
    ])
    .ok();
}

#[test]
fn qemu_made_luks_qcow2_converts_byte_for_byte_and_info_matches() {
    let env = Env::with_qemu();
    for (i, extra) in ["", ",encrypt.cipher-alg=aes-128,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv,encrypt.hash-alg=sha1"]
        .iter()
        .enumerate()
    {
        let f = format!("q{i}.qcow2");
        let o = format!("encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10{extra}");
        env.qemu_img(&["create", "-q", "-f", "qcow2", "--object", OBJ, "-o", &o, &f, "8M"]).ok();
        qemu_io(&env, "qcow2", &f, &["write -P 0xa5 0 1M", "write -P 0x5a 3M 77k"]);
        let ours = format!("q{i}.ours.raw");
        let theirs = format!("q{i}.theirs.raw");
        env.img(&["convert", "--object", OBJ, "--image-opts", &opts("qcow2", &f), "-O", "raw", &ours]).ok();
        to_raw_with_qemu(&env, "qcow2", &f, &theirs);
        env.assert_same_bytes(&ours, &theirs);
        // info needs no secret, and prints exactly what qemu-img prints.
        for out in ["--output=json", "--output=human"] {
            let a = env.img(&["info", out, &f]).ok();
            let b = env.qemu_img(&["info", out, &f]).ok();
            assert_eq!(a.stdout, b.stdout);
        }
        // map and check with the secret.
        let a = env.img(&["map", "--output=json", "--object", OBJ, "--image-opts", &opts("qcow2", &f)]).ok();
        let b = env.qemu_img(&["map", "--output=json", "--object", OBJ, "--image-opts", &opts("qcow2", &f)]).ok();
        assert_eq!(a.stdout, b.stdout);
        env.img(&["check", "--object", OBJ, "--image-opts", &opts("qcow2", &f)]).ok();
    }
}

#[test]
fn wrong_or_missing_secret_is_refused_with_a_clear_message() {
    let env = Env::with_qemu();
    env.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "--object",
        OBJ,
        "-o",
        "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10",
        "w.qcow2",
        "1M",
    ])
    .ok();
    env.qemu_img(&[
        "create",
        "-q",
        "-f",
        "luks",
        "--object",
        OBJ,
        "-o",
        "key-secret=s0,iter-time=10",
        "w.luks",
        "1M",
    ])
    .ok();
    let bad = "secret,id=s0,data=nope";
    for (fmt, f) in [("qcow2", "w.qcow2"), ("luks", "w.luks")] {
        for cmd in ["convert", "check", "map", "compare"] {
            let o = opts(fmt, f);
            let mut args = vec![cmd, "--object", bad, "--image-opts", &o];
            if cmd == "convert" {
                args.extend(["-O", "raw", "out.raw"]);
            }
            if cmd == "compare" {
                args.push(&o);
            }
            let out = env.img(&args).no_panic();
            assert_ne!(out.code, Some(0), "{out}");
            assert!(
                out.stderr
                    .contains("Invalid password, cannot unlock any keyslot"),
                "{out}"
            );
        }
        let out = env.img(&["convert", "-O", "raw", f, "out.raw"]).code_is(1);
        assert!(
            out.stderr.contains("key-secret' is required for cipher"),
            "{out}"
        );
        // info reads the header alone, as qemu-img's does: a wrong secret does not matter.
        // (qemu names the image by its options here; img by its file.)
        let o = opts(fmt, f);
        let args = ["info", "--output=json", "--object", bad, "--image-opts", &o];
        let unnamed = |mut v: serde_json::Value| {
            v.as_object_mut().map(|m| m.remove("filename"));
            v
        };
        assert_eq!(
            unnamed(env.img(&args).ok().json()),
            unnamed(env.qemu_img(&args).ok().json())
        );
    }
}

#[test]
fn img_made_luks_qcow2_opens_in_qemu_checks_compares_and_hides_plaintext() {
    let env = Env::with_qemu();
    source_raw(&env);
    env.img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "qcow2",
        "--object",
        OBJ,
        "-o",
        "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10",
        "src.raw",
        "e.qcow2",
    ])
    .ok();
    env.qemu_img(&[
        "check",
        "--object",
        OBJ,
        "--image-opts",
        &opts("qcow2", "e.qcow2"),
    ])
    .ok();
    let cmp = env
        .qemu_img(&[
            "compare",
            "--object",
            OBJ,
            "--image-opts",
            "driver=raw,file.filename=src.raw",
            &opts("qcow2", "e.qcow2"),
        ])
        .ok();
    assert!(cmp.stdout.contains("Images are identical"), "{cmp}");
    to_raw_with_qemu(&env, "qcow2", "e.qcow2", "back.raw");
    env.assert_same_bytes("src.raw", "back.raw");
    let bytes = env.read("e.qcow2");
    assert!(
        !bytes.windows(MARKER.len()).any(|w| w == MARKER),
        "plaintext in the image"
    );
    // And back through img.
    env.img(&[
        "compare",
        "--object",
        OBJ,
        "--image-opts",
        "driver=raw,file.filename=src.raw",
        &opts("qcow2", "e.qcow2"),
    ])
    .ok();
}

#[test]
fn legacy_aes_both_ways_and_create_warns() {
    let env = Env::with_qemu();
    source_raw(&env);
    let out = env
        .img(&[
            "convert",
            "-f",
            "raw",
            "-O",
            "qcow2",
            "--object",
            OBJ,
            "-o",
            "encrypt.format=aes,encrypt.key-secret=s0",
            "src.raw",
            "a.qcow2",
        ])
        .ok();
    assert!(out.stderr.contains("insecure and deprecated"), "{out}");
    to_raw_with_qemu(&env, "qcow2", "a.qcow2", "a.raw");
    env.assert_same_bytes("src.raw", "a.raw");
    assert!(!env
        .read("a.qcow2")
        .windows(MARKER.len())
        .any(|w| w == MARKER));
    env.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "--object",
        OBJ,
        "-o",
        "encrypt.format=aes,encrypt.key-secret=s0",
        "qa.qcow2",
        "2M",
    ])
    .ok();
    qemu_io(&env, "qcow2", "qa.qcow2", &["write -P 0x77 4096 100k"]);
    env.img(&[
        "convert",
        "--object",
        OBJ,
        "--image-opts",
        &opts("qcow2", "qa.qcow2"),
        "-O",
        "raw",
        "qa.ours",
    ])
    .ok();
    to_raw_with_qemu(&env, "qcow2", "qa.qcow2", "qa.theirs");
    env.assert_same_bytes("qa.ours", "qa.theirs");
    let a = env.img(&["info", "--output=json", "qa.qcow2"]).ok();
    let b = env.qemu_img(&["info", "--output=json", "qa.qcow2"]).ok();
    assert_eq!(a.stdout, b.stdout);
}

#[test]
fn luks_format_both_ways() {
    let env = Env::with_qemu();
    source_raw(&env);
    let out = env
        .img(&[
            "convert",
            "-f",
            "raw",
            "-O",
            "luks",
            "--object",
            OBJ,
            "-o",
            "key-secret=s0,iter-time=10",
            "src.raw",
            "o.luks",
        ])
        .ok();
    assert!(out.stderr.is_empty(), "{out}");
    to_raw_with_qemu(&env, "luks", "o.luks", "o.raw");
    env.assert_same_bytes("src.raw", "o.raw");
    assert!(!env
        .read("o.luks")
        .windows(MARKER.len())
        .any(|w| w == MARKER));
    env.qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "luks",
        "--object",
        OBJ,
        "-o",
        "key-secret=s0,iter-time=10",
        "src.raw",
        "q.luks",
    ])
    .ok();
    env.img(&[
        "convert",
        "--object",
        OBJ,
        "--image-opts",
        &opts("luks", "q.luks"),
        "-O",
        "raw",
        "q.raw",
    ])
    .ok();
    env.assert_same_bytes("src.raw", "q.raw");
    let a = env.img(&["info", "q.luks"]).ok();
    let b = env.qemu_img(&["info", "q.luks"]).ok();
    assert_eq!(a.stdout, b.stdout);
    let a = env
        .img(&[
            "create",
            "-f",
            "luks",
            "--object",
            OBJ,
            "-o",
            "key-secret=s0,iter-time=10",
            "n.luks",
            "1M",
        ])
        .ok();
    let b = env
        .qemu_img(&[
            "create",
            "-f",
            "luks",
            "--object",
            OBJ,
            "-o",
            "key-secret=s0,iter-time=10",
            "m.luks",
            "1M",
        ])
        .ok();
    assert_eq!(
        a.stdout.replace("n.luks", "X"),
        b.stdout.replace("m.luks", "X")
    );
}

#[test]
fn chains_with_an_encrypted_layer_read_correctly() {
    let env = Env::with_qemu();
    // LUKS base, plain overlay: the base's secret given per layer as qemu takes it.
    env.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "--object",
        OBJ,
        "-o",
        "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10",
        "base.qcow2",
        "4M",
    ])
    .ok();
    qemu_io(&env, "qcow2", "base.qcow2", &["write -P 0x11 0 2M"]);
    env.img(&[
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
    let chain = "driver=qcow2,file.filename=top.qcow2,backing.encrypt.key-secret=s0";
    qemu_io_opts(&env, chain, &["write -P 0x22 1M 64k"]);
    env.img(&[
        "convert",
        "--object",
        OBJ,
        "--image-opts",
        chain,
        "-O",
        "raw",
        "ours.raw",
    ])
    .ok();
    qemu_to_raw(&env, chain, "theirs.raw");
    env.assert_same_bytes("ours.raw", "theirs.raw");
    let info = env
        .img(&["info", "--backing-chain", "--output=json", "top.qcow2"])
        .ok();
    assert!(info.stdout.contains("\"encrypted\": true"), "{info}");
    // Plain base, LUKS overlay made by img.
    env.qemu_img(&["create", "-q", "-f", "qcow2", "pbase.qcow2", "4M"])
        .ok();
    env.qemu_io("qcow2", "pbase.qcow2", &["write -P 0x33 0 4M"]);
    env.img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "pbase.qcow2",
        "-F",
        "qcow2",
        "--object",
        OBJ,
        "-o",
        "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10",
        "etop.qcow2",
    ])
    .ok();
    qemu_io(&env, "qcow2", "etop.qcow2", &["write -P 0x44 100k 8k"]);
    env.img(&[
        "convert",
        "--object",
        OBJ,
        "--image-opts",
        &opts("qcow2", "etop.qcow2"),
        "-O",
        "raw",
        "e.ours",
    ])
    .ok();
    to_raw_with_qemu(&env, "qcow2", "etop.qcow2", "e.theirs");
    env.assert_same_bytes("e.ours", "e.theirs");
}

#[test]
fn amend_manages_key_slots_like_qemu() {
    let env = Env::with_qemu();
    env.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "--object",
        OBJ,
        "-o",
        "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10",
        "k.qcow2",
        "1M",
    ])
    .ok();
    qemu_io(&env, "qcow2", "k.qcow2", &["write -P 0x66 0 64k"]);
    let two = "secret,id=s1,data=second";
    env.img(&[
        "amend",
        "--object",
        OBJ,
        "--object",
        two,
        "--image-opts",
        &opts("qcow2", "k.qcow2"),
        "-o",
        "encrypt.state=active,encrypt.new-secret=s1,encrypt.keyslot=2,encrypt.iter-time=10",
    ])
    .ok();
    // qemu opens it with the new passphrase.
    let o2 = "driver=qcow2,file.filename=k.qcow2,encrypt.key-secret=s1";
    env.qemu_img(&[
        "convert",
        "--object",
        two,
        "--image-opts",
        o2,
        "-O",
        "raw",
        "k2.raw",
    ])
    .ok();
    to_raw_with_qemu(&env, "qcow2", "k.qcow2", "k1.raw");
    env.assert_same_bytes("k1.raw", "k2.raw");
    // Erasing the only remaining slot needs --force; erasing slot 0 does not.
    env.img(&[
        "amend",
        "--object",
        two,
        "--image-opts",
        o2,
        "-o",
        "encrypt.state=inactive,encrypt.keyslot=0",
    ])
    .ok();
    let out = env.img(&[
        "amend",
        "--object",
        two,
        "--image-opts",
        o2,
        "-o",
        "encrypt.state=inactive,encrypt.keyslot=2",
    ]);
    assert_ne!(out.code, Some(0));
    assert!(out.stderr.contains("only active keyslot"), "{out}");
    let info = env
        .qemu_img(&["info", "--output=json", "k.qcow2"])
        .ok()
        .json();
    let slots = &info["format-specific"]["data"]["encrypt"]["slots"];
    assert_eq!(slots[0]["active"], false);
    assert_eq!(slots[2]["active"], true);
    env.qemu_img(&["check", "--object", two, "--image-opts", o2])
        .ok();
}

#[test]
fn create_takes_every_qemu_cipher_family_and_refuses_what_qemu_refuses() {
    // The CLI passes encrypt.* through to the library; one image per new cipher family, mode
    // and hash, made by `img convert`, checked and compared by qemu-img.
    let env = Env::with_qemu();
    source_raw(&env);
    for (i, (fmt, extra)) in [
        (
            "qcow2",
            "cipher-alg=serpent-256,cipher-mode=ctr,ivgen-alg=essiv,hash-alg=ripemd160",
        ),
        // Twofish only over little data: the RustCrypto crate runs at a few MB/s.
        (
            "qcow2",
            "cipher-alg=twofish-128,cipher-mode=ecb,hash-alg=md5",
        ),
        (
            "luks",
            "cipher-alg=cast5-128,cipher-mode=cbc,ivgen-alg=essiv,ivgen-hash-alg=md5,hash-alg=sm3",
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let f = format!("n{i}.{fmt}");
        let (mut o, prefix) = if fmt == "luks" {
            (String::new(), "")
        } else {
            ("encrypt.format=luks,".to_owned(), "encrypt.")
        };
        for kv in format!("key-secret=s0,iter-time=10,{extra}").split(',') {
            o.push_str(&format!("{prefix}{kv},"));
        }
        o.pop();
        env.img(&[
            "convert", "-f", "raw", "-O", fmt, "--object", OBJ, "-o", &o, "src.raw", &f,
        ])
        .ok();
        if fmt == "qcow2" {
            env.qemu_img(&["check", "--object", OBJ, "--image-opts", &opts(fmt, &f)])
                .ok();
        }
        let cmp = env
            .qemu_img(&[
                "compare",
                "--object",
                OBJ,
                "--image-opts",
                "driver=raw,file.filename=src.raw",
                &opts(fmt, &f),
            ])
            .ok();
        assert!(
            cmp.stdout.contains("Images are identical"),
            "{extra}: {cmp}"
        );
        let info = env.qemu_img(&["info", "--output=json", &f]).ok().json();
        let e = if fmt == "luks" {
            &info["format-specific"]["data"]
        } else {
            &info["format-specific"]["data"]["encrypt"]
        };
        let alg = extra
            .split("cipher-alg=")
            .nth(1)
            .unwrap()
            .split(',')
            .next()
            .unwrap();
        assert_eq!(e["cipher-alg"], alg, "{extra}");
    }
    // cast5 has a 64-bit block: no XTS (the default mode). Refused, with no file left behind.
    let out = env
        .img(&[
            "create",
            "-f",
            "qcow2",
            "--object",
            OBJ,
            "-o",
            "encrypt.format=luks,encrypt.key-secret=s0,encrypt.cipher-alg=cast5-128",
            "bad.qcow2",
            "1M",
        ])
        .code_is(1);
    assert!(out.stderr.contains("Unsupported cipher mode xts"), "{out}");
    assert!(!env.path("bad.qcow2").exists());
}

const LUKS_OPTS: &str = "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10";

/// The bytes of a 1 MiB image qemu-img made with the secret `s0`: LUKS qcow2, or the `luks`
/// format. Made once per test binary: qemu-img spends a second or more timing its key
/// derivation for every LUKS image it creates, whatever the iter-time.
fn qemu_made(luks_format: bool) -> &'static [u8] {
    static QCOW2: OnceLock<Vec<u8>> = OnceLock::new();
    static LUKS: OnceLock<Vec<u8>> = OnceLock::new();
    let (cell, fmt, o) = if luks_format {
        (&LUKS, "luks", "key-secret=s0,iter-time=10")
    } else {
        (&QCOW2, "qcow2", LUKS_OPTS)
    };
    cell.get_or_init(|| {
        let env = Env::with_qemu();
        env.qemu_img(&[
            "create", "-q", "-f", fmt, "--object", OBJ, "-o", o, "t", "1M",
        ])
        .ok();
        env.read("t")
    })
}

/// A qemu-made 1 MiB LUKS qcow2 image, over the qcow2 image `backing` when given.
fn luks_qcow2(env: &Env, name: &str, backing: Option<&str>) {
    env.write(name, qemu_made(false));
    if let Some(b) = backing {
        let o = opts("qcow2", name);
        env.qemu_img(&[
            "rebase",
            "-u",
            "--object",
            OBJ,
            "--image-opts",
            &o,
            "-b",
            b,
            "-F",
            "qcow2",
        ])
        .ok();
    }
}

/// qemu-img reads `image` (an option list) as the raw file `raw` holds.
#[track_caller]
fn qemu_sees(env: &Env, raw: &str, image: &str) {
    let raw = format!("driver=raw,file.filename={raw}");
    let out = env
        .qemu_img(&["compare", "--object", OBJ, "--image-opts", &raw, image])
        .ok();
    assert!(out.stdout.contains("Images are identical"), "{out}");
}

/// qemu-img's guest view of `image` (image options, with the secret) written to `raw`.
fn qemu_to_raw(env: &Env, image: &str, raw: &str) {
    env.qemu_img(&[
        "convert",
        "--object",
        OBJ,
        "--image-opts",
        image,
        "-O",
        "raw",
        raw,
    ])
    .ok();
}

/// qemu-img check, with the secret, finds nothing wrong.
#[track_caller]
fn qemu_check_clean(env: &Env, image: &str) {
    let out = env
        .qemu_img(&["check", "--object", OBJ, "--image-opts", image])
        .ok();
    assert!(out.stdout.contains("No errors were found"), "{out}");
}

/// `img` refused to open `file` (exit 1, no panic) and said why, naming the file.
#[track_caller]
fn refused(out: common::Output, file: &str, why: &str) {
    let out = out.no_panic().code_is(1);
    assert!(
        out.stderr.contains(&format!("Could not open '{file}'")) && out.stderr.contains(why),
        "{out}"
    );
}

const NO_KEY: &str = "Parameter 'encrypt.key-secret' is required for cipher";
const BAD_KEY: &str = "Invalid password, cannot unlock any keyslot";
const BAD_OBJ: &str = "secret,id=s0,data=nope";

#[test]
fn commit_into_encrypted_bases_with_the_chain_secrets() {
    let env = Env::with_qemu();
    // LUKS overlay over a LUKS base.
    luks_qcow2(&env, "base.qcow2", None);
    qemu_io(&env, "qcow2", "base.qcow2", &["write -P 0x11 0 1M"]);
    luks_qcow2(&env, "top.qcow2", Some("base.qcow2"));
    let top =
        "driver=qcow2,file.filename=top.qcow2,encrypt.key-secret=s0,backing.encrypt.key-secret=s0";
    qemu_io_opts(&env, top, &["write -P 0x22 200k 300k", "write -z 700k 64k"]);
    qemu_to_raw(&env, top, "before.raw");
    refused(env.img(&["commit", "top.qcow2"]), "top.qcow2", NO_KEY);
    refused(
        env.img(&["commit", "--object", BAD_OBJ, "--image-opts", top]),
        "top.qcow2",
        BAD_KEY,
    );
    let out = env
        .img(&["commit", "--object", OBJ, "--image-opts", top])
        .ok();
    assert_eq!(out.stdout, "Image committed.\n");
    qemu_sees(&env, "before.raw", &opts("qcow2", "base.qcow2"));
    qemu_sees(&env, "before.raw", top);
    qemu_check_clean(&env, &opts("qcow2", "base.qcow2"));
    qemu_check_clean(&env, top);

    // A plain overlay over a LUKS-format base: only the base has a secret.
    env.write("lbase.luks", qemu_made(true));
    qemu_io(&env, "luks", "lbase.luks", &["write -P 0x33 0 1M"]);
    env.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "lbase.luks",
        "-F",
        "luks",
        "ptop.qcow2",
    ])
    .ok();
    let ptop = "driver=qcow2,file.filename=ptop.qcow2,backing.key-secret=s0";
    qemu_io_opts(&env, ptop, &["write -P 0x44 64k 100k", "write -z 512k 64k"]);
    qemu_to_raw(&env, ptop, "pbefore.raw");
    refused(
        env.img(&["commit", "ptop.qcow2"]),
        "ptop.qcow2",
        "Could not open backing file: Parameter 'key-secret' is required for cipher",
    );
    env.img(&["commit", "-q", "--object", OBJ, "--image-opts", ptop])
        .ok();
    qemu_sees(&env, "pbefore.raw", &opts("luks", "lbase.luks"));
    qemu_sees(&env, "pbefore.raw", ptop);
    qemu_check_clean(&env, ptop);
}

#[test]
fn rebase_reads_the_encrypted_old_chain_and_refuses_an_encrypted_new_one_like_qemu() {
    let env = Env::with_qemu();
    luks_qcow2(&env, "old.qcow2", None);
    qemu_io(&env, "qcow2", "old.qcow2", &["write -P 0x11 0 1M"]);
    luks_qcow2(&env, "top.qcow2", Some("old.qcow2"));
    let top =
        "driver=qcow2,file.filename=top.qcow2,encrypt.key-secret=s0,backing.encrypt.key-secret=s0";
    qemu_io_opts(&env, top, &["write -P 0x22 200k 300k"]);
    env.qemu_img(&["create", "-q", "-f", "qcow2", "new.qcow2", "1M"])
        .ok();
    env.qemu_io("qcow2", "new.qcow2", &["write -P 0x11 0 128k"]);
    luks_qcow2(&env, "enew.qcow2", None);
    qemu_to_raw(&env, top, "before.raw");

    refused(
        env.img(&["rebase", "-b", "new.qcow2", "-F", "qcow2", "top.qcow2"]),
        "top.qcow2",
        NO_KEY,
    );
    // qemu-img opens the new backing file without a secret, so it cannot rebase onto an
    // encrypted one; img says the same. (qemu wants an absolute -b with --image-opts.)
    let enew = env.path("enew.qcow2").to_str().unwrap().to_owned();
    let ours = env.img(&[
        "rebase",
        "--object",
        OBJ,
        "--image-opts",
        top,
        "-b",
        &enew,
        "-F",
        "qcow2",
    ]);
    let theirs = env.qemu_img(&[
        "rebase",
        "--object",
        OBJ,
        "--image-opts",
        top,
        "-b",
        &enew,
        "-F",
        "qcow2",
    ]);
    assert_eq!(theirs.code, Some(1), "{theirs}");
    let ours = ours.no_panic().code_is(1);
    assert_eq!(
        ours.stderr.strip_prefix("img: "),
        theirs.stderr.strip_prefix("qemu-img: "),
        "{ours}{theirs}"
    );
    assert!(ours.stderr.contains(&format!(
        "Could not open new backing file '{enew}': {NO_KEY}"
    )));

    env.img(&[
        "rebase",
        "--object",
        OBJ,
        "--image-opts",
        top,
        "-b",
        "new.qcow2",
        "-F",
        "qcow2",
    ])
    .ok();
    let info = env
        .qemu_img(&["info", "--output=json", "top.qcow2"])
        .ok()
        .json();
    assert_eq!(info["backing-filename"], "new.qcow2");
    let top_now = opts("qcow2", "top.qcow2");
    qemu_sees(&env, "before.raw", &top_now);
    qemu_check_clean(&env, &top_now);

    // A plain image over an encrypted backing file becomes standalone (-b "").
    luks_qcow2(&env, "ebase.qcow2", None);
    qemu_io(&env, "qcow2", "ebase.qcow2", &["write -P 0x55 0 1M"]);
    env.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "ebase.qcow2",
        "-F",
        "qcow2",
        "p.qcow2",
    ])
    .ok();
    let p = "driver=qcow2,file.filename=p.qcow2,backing.encrypt.key-secret=s0";
    qemu_io_opts(&env, p, &["write -P 0x66 64k 64k"]);
    qemu_to_raw(&env, p, "p.raw");
    refused(
        env.img(&["rebase", "-b", "", "p.qcow2"]),
        "p.qcow2",
        &format!("Could not open backing file: {NO_KEY}"),
    );
    env.img(&["rebase", "--object", OBJ, "--image-opts", p, "-b", ""])
        .ok();
    env.assert_converts_like_qemu("p.qcow2", &[]);
    env.assert_same_bytes("p.raw", "p.qcow2.qemu.raw");
    env.qemu_img(&["check", "p.qcow2"]).ok();
}

#[test]
fn snapshot_and_resize_take_the_secret() {
    let env = Env::with_qemu();
    luks_qcow2(&env, "e.qcow2", None);
    let e = opts("qcow2", "e.qcow2");
    qemu_io(&env, "qcow2", "e.qcow2", &["write -P 0x11 0 1M"]);
    qemu_to_raw(&env, &e, "s1.raw");
    refused(env.img(&["snapshot", "-l", "e.qcow2"]), "e.qcow2", NO_KEY);
    refused(
        env.img(&["snapshot", "-c", "s1", "e.qcow2"]),
        "e.qcow2",
        NO_KEY,
    );
    refused(
        env.img(&[
            "snapshot",
            "--object",
            BAD_OBJ,
            "--image-opts",
            &e,
            "-c",
            "s1",
        ]),
        "e.qcow2",
        BAD_KEY,
    );
    env.img(&["snapshot", "--object", OBJ, "--image-opts", &e, "-c", "s1"])
        .ok();
    let list = env
        .qemu_img(&["snapshot", "--object", OBJ, "--image-opts", &e, "-l"])
        .ok();
    assert!(list.stdout.contains(" s1 "), "{list}");
    let ours = env
        .img(&["snapshot", "--object", OBJ, "--image-opts", &e, "-l"])
        .ok();
    assert_eq!(ours.stdout, list.stdout);
    qemu_io(&env, "qcow2", "e.qcow2", &["write -P 0x22 0 64k"]);
    env.img(&["snapshot", "--object", OBJ, "--image-opts", &e, "-a", "s1"])
        .ok();
    qemu_sees(&env, "s1.raw", &e);
    env.img(&["snapshot", "--object", OBJ, "--image-opts", &e, "-d", "s1"])
        .ok();
    qemu_check_clean(&env, &e);

    refused(env.img(&["resize", "e.qcow2", "2M"]), "e.qcow2", NO_KEY);
    refused(
        env.img(&["resize", "--object", BAD_OBJ, "--image-opts", &e, "2M"]),
        "e.qcow2",
        BAD_KEY,
    );
    let out = env
        .img(&["resize", "--object", OBJ, "--image-opts", &e, "2M"])
        .ok();
    assert_eq!(out.stdout, "Image resized.\n");
    let info = env
        .qemu_img(&["info", "--output=json", "e.qcow2"])
        .ok()
        .json();
    assert_eq!(info["virtual-size"], 2 << 20);
    env.set_len("s1.raw", 2 << 20);
    qemu_sees(&env, "s1.raw", &e);
    qemu_check_clean(&env, &e);

    // Grown with preallocation, as qemu-img allows: the new clusters hold plaintext zeroes and
    // read as noise, the same noise for both tools; the old data stays.
    for (prealloc, size) in [("metadata", "3M"), ("falloc", "4M"), ("full", "5M")] {
        let arg = format!("--preallocation={prealloc}");
        env.img(&["resize", "--object", OBJ, "--image-opts", &e, &arg, size])
            .ok();
        qemu_check_clean(&env, &e);
        qemu_to_raw(&env, &e, "theirs.raw");
        env.img(&[
            "convert",
            "--object",
            OBJ,
            "--image-opts",
            &e,
            "-O",
            "raw",
            "ours.raw",
        ])
        .ok();
        env.assert_same_bytes("ours.raw", "theirs.raw");
        assert!(env.read("theirs.raw")[..1 << 20] == env.read("s1.raw")[..1 << 20]);
    }
}

#[test]
fn convert_n_writes_an_encrypted_target_named_by_target_image_opts() {
    let env = Env::with_qemu();
    env.sparse_file("src.raw", 1 << 20);
    let m: Vec<u8> = MARKER.iter().copied().cycle().take(300_000).collect();
    env.write_at("src.raw", 4096, &m);
    luks_qcow2(&env, "t.qcow2", None);
    let t = opts("qcow2", "t.qcow2");
    qemu_io(&env, "qcow2", "t.qcow2", &["write -P 0x99 0 1M"]);
    // The option mistakes qemu-img refuses before it opens anything, in its words.
    for extra in [&[][..], &["-n", "-O", "qcow2"]] {
        let mut args = vec!["convert", "--object", OBJ, "--target-image-opts"];
        args.extend_from_slice(extra);
        args.extend(["src.raw", t.as_str()]);
        let ours = env.img(&args).no_panic().code_is(1);
        let theirs = env.qemu_img(&args).code_is(1);
        assert_eq!(
            ours.stderr.strip_prefix("img: "),
            theirs.stderr.strip_prefix("qemu-img: "),
            "{ours}{theirs}"
        );
    }
    refused(
        env.img(&["convert", "-n", "-O", "qcow2", "src.raw", "t.qcow2"]),
        "t.qcow2",
        NO_KEY,
    );
    let no_secret = "driver=qcow2,file.filename=t.qcow2";
    refused(
        env.img(&["convert", "-n", "--target-image-opts", "src.raw", no_secret]),
        "t.qcow2",
        NO_KEY,
    );
    refused(
        env.img(&[
            "convert",
            "-n",
            "--object",
            BAD_OBJ,
            "--target-image-opts",
            "src.raw",
            &t,
        ]),
        "t.qcow2",
        BAD_KEY,
    );
    env.img(&[
        "convert",
        "-n",
        "--object",
        OBJ,
        "--target-image-opts",
        "src.raw",
        &t,
    ])
    .ok();
    qemu_sees(&env, "src.raw", &t);
    qemu_check_clean(&env, &t);
    assert!(!env
        .read("t.qcow2")
        .windows(MARKER.len())
        .any(|w| w == MARKER));
}

#[test]
fn measure_counts_the_luks_header_and_reads_an_encrypted_source() {
    let env = Env::with_qemu();
    env.write("e.luks", qemu_made(true));
    qemu_io(&env, "luks", "e.luks", &["write -P 0x77 0 300k"]);
    let e = opts("luks", "e.luks");
    // qemu-img spends a second timing its key derivation even to measure: once is enough.
    let enc =
        "encrypt.format=luks,encrypt.key-secret=s0,encrypt.cipher-alg=aes-128,encrypt.iter-time=10";
    for args in [
        &["--object", OBJ, "--image-opts", &e, "-O", "qcow2"][..],
        &[
            "--object",
            OBJ,
            "--image-opts",
            &e,
            "-O",
            "qcow2",
            "-o",
            enc,
            "--output=json",
        ],
    ] {
        let mut a = vec!["measure"];
        a.extend_from_slice(args);
        assert_eq!(
            env.img(&a).ok().stdout,
            env.qemu_img(&a).ok().stdout,
            "{a:?}"
        );
    }
    refused(
        env.img(&["measure", "-O", "qcow2", "e.luks"]),
        "e.luks",
        "Parameter 'key-secret' is required for cipher",
    );
}

#[test]
fn luks_format_resizes_like_qemu() {
    let env = Env::with_qemu();
    env.write("base.luks", qemu_made(true));
    qemu_io(&env, "luks", "base.luks", &["write -P 0x3c 0 1M"]);
    // Each step runs on two copies of the same image, one per tool: file lengths, virtual sizes
    // and every guest byte (new space included: both decrypt the same host bytes) must agree.
    let steps: &[&[&str]] = &[
        &["2M"],
        &["+100"],
        &["--preallocation=falloc", "+1M"],
        &["--preallocation=full", "+64k"],
        &["--shrink", "1536k"],
        &["--shrink", "--", "-512"],
    ];
    env.write("ours.luks", &env.read("base.luks"));
    env.write("theirs.luks", &env.read("base.luks"));
    for step in steps {
        let mut ours = vec!["resize", "--object", OBJ, "--image-opts"];
        let o = opts("luks", "ours.luks");
        let t = opts("luks", "theirs.luks");
        let mut theirs = ours.clone();
        ours.push(&o);
        theirs.push(&t);
        ours.extend_from_slice(step);
        theirs.extend_from_slice(step);
        let a = env.img(&ours).ok();
        env.qemu_img(&theirs).ok();
        assert_eq!(a.stdout, "Image resized.\n", "{step:?}");
        assert_eq!(env.len("ours.luks"), env.len("theirs.luks"), "{step:?}");
        let size = |f: &str| {
            env.qemu_img(&["info", "--output=json", f]).ok().json()["virtual-size"].clone()
        };
        assert_eq!(size("ours.luks"), size("theirs.luks"), "{step:?}");
        let out = env.img(&["info", "--output=json", "ours.luks"]).ok().json();
        assert_eq!(out["virtual-size"], size("theirs.luks"), "{step:?}");
        qemu_to_raw(&env, &t, "theirs.raw");
        qemu_sees(&env, "theirs.raw", &o);
    }
    // What qemu refuses, img refuses in its words, and the image is left as it was.
    let before = env.read("ours.luks");
    let o = opts("luks", "ours.luks");
    for (args, why) in [
        (
            &["--preallocation=metadata", "+1M"][..],
            "Unsupported preallocation mode: metadata",
        ),
        (&["1M"][..], "Use the --shrink option"),
    ] {
        let mut a = vec!["resize", "--object", OBJ, "--image-opts", &o];
        a.extend_from_slice(args);
        let out = env.img(&a).no_panic().code_is(1);
        assert!(out.stderr.contains(why), "{args:?}: {out}");
    }
    assert!(
        env.read("ours.luks") == before,
        "a refused resize changed the image"
    );
    refused(
        env.img(&["resize", "ours.luks", "+1M"]),
        "ours.luks",
        "key-secret",
    );
}

#[test]
fn cinders_encrypted_volume_commands_work_as_with_qemu() {
    // OpenStack Cinder's command lines for encrypted volumes on file-based back ends: they
    // give `encrypt.format`, the backing node's file, and secrets inside a json: backing name.
    let env = Env::with_qemu();
    luks_qcow2(&env, "base.qcow2", None);
    qemu_io(&env, "qcow2", "base.qcow2", &["write -P 0x5b 0 512k"]);
    luks_qcow2(&env, "top.qcow2", Some("base.qcow2"));
    let top =
        "driver=qcow2,file.filename=top.qcow2,encrypt.key-secret=s0,backing.encrypt.key-secret=s0";
    qemu_io_opts(&env, top, &["write -P 0x6c 256k 512k"]);
    qemu_to_raw(&env, top, "chain.raw");
    qemu_to_raw(&env, &opts("qcow2", "base.qcow2"), "base.raw");
    let sec = |id: &str| format!("secret,id={id},format=raw,data=pw");

    // Upload or clone: the volume to a LUKS image.
    let src = "encrypt.format=luks,encrypt.key-secret=sec1,file.filename=base.qcow2";
    env.img(&[
        "convert",
        "-t",
        "none",
        "-S",
        "0",
        "--object",
        &sec("sec1"),
        "--object",
        &sec("sec2"),
        "--image-opts",
        src,
        "-O",
        "luks",
        "-o",
        "key-secret=sec2,iter-time=10",
        "up.luks",
    ])
    .ok();
    qemu_sees(&env, "base.raw", &opts("luks", "up.luks"));

    // Snapshot: a new overlay over a json: name holding both layers' secrets.
    let json = r#"json:{"driver": "qcow2", "encrypt.key-secret": "s0", "backing.encrypt.key-secret": "s0", "backing.file.filename": "base.qcow2", "file": {"driver": "file", "filename": "top.qcow2"}}"#;
    env.img(&[
        "create",
        "-q",
        "-fqcow2",
        "-o",
        LUKS_OPTS,
        "-F",
        "qcow2",
        "-b",
        json,
        "--object",
        OBJ,
        "snap.qcow2",
    ])
    .ok();
    let snap = "driver=qcow2,file.filename=snap.qcow2,encrypt.key-secret=s0,backing.encrypt.key-secret=s0,backing.backing.encrypt.key-secret=s0";
    qemu_sees(&env, "chain.raw", snap);

    // Snapshot deletion: commit the top into the base named in the options.
    let commit = "file.filename=top.qcow2,encrypt.format=luks,encrypt.key-secret=s0,backing.file.filename=base.qcow2,backing.encrypt.key-secret=s0";
    let out = env
        .img(&["commit", "--object", OBJ, "--image-opts", "-d", commit])
        .ok();
    assert_eq!(out.stdout, "Image committed.\n");
    qemu_sees(&env, "chain.raw", &opts("qcow2", "base.qcow2"));
    qemu_check_clean(&env, &opts("qcow2", "base.qcow2"));

    // encrypt.format must be the image's, in qemu's words; `backing=` opens the top alone.
    let wrong = "driver=qcow2,file.filename=top.qcow2,encrypt.format=aes,encrypt.key-secret=s0";
    let args = ["info", "--object", OBJ, "--image-opts", wrong];
    let (q, i) = (env.qemu_img(&args), env.img(&args).no_panic());
    assert_eq!((i.code, q.code), (Some(1), Some(1)), "{q}{i}");
    let why = "Header reported 'luks' encryption format but options specify 'aes'";
    assert!(i.stderr.contains(why) && q.stderr.contains(why), "{q}{i}");
    let alone = "driver=qcow2,file.filename=top.qcow2,encrypt.key-secret=s0,backing=";
    let args = [
        "map",
        "--output=json",
        "--object",
        OBJ,
        "--image-opts",
        alone,
    ];
    assert_eq!(env.img(&args).ok().stdout, env.qemu_img(&args).ok().stdout);
}
