//! `img` on encrypted images against qemu-img: secrets given as `--object secret,...` with
//! `-o encrypt.key-secret=ID` and `--image-opts`, the `encrypt` block of `info`, a wrong or
//! missing passphrase, LUKS and legacy AES qcow2 and the `luks` format both ways, chains with
//! an encrypted layer, and key-slot management with `amend`.

mod common;

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
    for (fmt, f) in [("qcow2", "w.qcow2"), ("luks", "w.luks")] {
        let bad = "secret,id=s0,data=nope";
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
    env.qemu_img(&[
        "convert",
        "--object",
        OBJ,
        "--image-opts",
        chain,
        "-O",
        "raw",
        "theirs.raw",
    ])
    .ok();
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
