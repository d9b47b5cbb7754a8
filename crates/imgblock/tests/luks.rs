//! Encrypted images against qemu-img, both ways: qcow2 with LUKS (every cipher, mode, IV
//! generator and hash qemu-img offers with AES) and with legacy AES, and the plain `luks`
//! format. Images qemu-img makes read back byte for byte; images the library makes open in
//! qemu-img with the same secret, pass `qemu-img check`, compare equal and hold no plaintext.
//! Key slots are kept cheap with `iter-time=10`.

#![allow(clippy::cast_possible_truncation)] // test sizes are small constants

use std::path::{Path, PathBuf};
use std::process::Command;

use imgblock::crypto::{EncryptionInfo, Secret, Secrets};
use imgblock::{create, CreateOptions, Format, Image, OpenOptions};

const PW: &str = "correct horse";
const SIZE: u64 = 4 << 20;

fn run(prog: &str, args: &[&str]) -> std::process::Output {
    Command::new(prog)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{prog} is needed for this test and could not run: {e}"))
}

#[track_caller]
fn ok(prog: &str, args: &[&str]) -> String {
    let o = run(prog, args);
    assert!(
        o.status.success(),
        "{prog} {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn secret_obj(pw: &str) -> String {
    format!("secret,id=s0,data={pw}")
}

/// qemu's `--image-opts` for an encrypted image.
fn image_opts(fmt: &str, p: &Path) -> String {
    let key = if fmt == "luks" {
        "key-secret"
    } else {
        "encrypt.key-secret"
    };
    format!("driver={fmt},file.filename={},{key}=s0", p.display())
}

/// Runs qemu-io commands on an encrypted image.
fn qemu_io(fmt: &str, p: &Path, pw: &str, cmds: &[&str]) {
    let obj = secret_obj(pw);
    let opts = image_opts(fmt, p);
    let mut args = vec!["--object", &obj, "--image-opts", &opts];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    let out = ok("qemu-io", &args);
    assert!(!out.contains("error") && !out.contains("failed"), "{out}");
}

/// The guest view through qemu-img (convert to raw with the secret).
fn qemu_read(fmt: &str, p: &Path, pw: &str) -> Vec<u8> {
    let out = p.with_extension("qemu.raw");
    let obj = secret_obj(pw);
    let opts = image_opts(fmt, p);
    let o = out.to_str().unwrap();
    ok(
        "qemu-img",
        &[
            "convert",
            "--object",
            &obj,
            "--image-opts",
            &opts,
            "-O",
            "raw",
            o,
        ],
    );
    let v = std::fs::read(&out).unwrap();
    std::fs::remove_file(&out).unwrap();
    v
}

fn open(p: &Path, pw: &str, writable: bool) -> imgblock::Result<Image> {
    let opts = OpenOptions {
        writable,
        ..OpenOptions::default()
    };
    Image::open_with_secrets(p, &opts, &Secrets::all(Secret::from(pw)))
}

fn read_all(img: &Image) -> Vec<u8> {
    let mut v = vec![0u8; img.size() as usize];
    img.read_at(&mut v, 0).unwrap();
    v
}

/// A qemu-made encrypted image with data at several offsets.
fn qemu_image(dir: &Path, name: &str, fmt: &str, opts: &str) -> PathBuf {
    let p = dir.join(name);
    let obj = secret_obj(PW);
    let (key, prefix) = if fmt == "luks" {
        ("key-secret", "")
    } else {
        ("encrypt.key-secret", "encrypt.")
    };
    let mut o = format!("{key}=s0");
    for kv in opts.split(',').filter(|s| !s.is_empty()) {
        o.push_str(&format!(",{prefix}{kv}"));
    }
    ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            fmt,
            "--object",
            &obj,
            "-o",
            &o,
            p.to_str().unwrap(),
            "4M",
        ],
    );
    qemu_io(
        fmt,
        &p,
        PW,
        &[
            "write -P 0x11 0 64k",
            "write -P 0x22 100000 5000",
            "write -P 0x33 3M 1M",
            "write -z 3200k 64k",
        ],
    );
    p
}

fn check_reads_like_qemu(p: &Path, fmt: &str) {
    let img = open(p, PW, false).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    assert!(img.driver().encrypted());
    assert_eq!(read_all(&img), qemu_read(fmt, p, PW), "{}", p.display());
}

/// Every AES cipher, mode and IV generator qemu-img can create with LUKS (aes-192 outside XTS
/// makes qemu-img abort, so it is not in the list), and the PBKDF2 hashes.
const LUKS_VARIANTS: &[&str] = &[
    "",
    "cipher-alg=aes-128",
    "cipher-alg=aes-192",
    "cipher-alg=aes-256,cipher-mode=xts,ivgen-alg=plain",
    "cipher-alg=aes-128,cipher-mode=xts,ivgen-alg=essiv",
    "cipher-alg=aes-192,cipher-mode=xts,ivgen-alg=essiv,ivgen-hash-alg=sha256",
    "cipher-alg=aes-128,cipher-mode=cbc,ivgen-alg=plain",
    "cipher-alg=aes-128,cipher-mode=cbc,ivgen-alg=plain64",
    "cipher-alg=aes-128,cipher-mode=cbc,ivgen-alg=essiv",
    "cipher-alg=aes-256,cipher-mode=cbc,ivgen-alg=plain",
    "cipher-alg=aes-256,cipher-mode=cbc,ivgen-alg=plain64",
    "cipher-alg=aes-256,cipher-mode=cbc,ivgen-alg=essiv",
    "cipher-alg=aes-128,cipher-mode=ecb",
    "cipher-alg=aes-256,cipher-mode=ecb",
    "hash-alg=sha1",
    "hash-alg=sha224",
    "hash-alg=sha384",
    "hash-alg=sha512",
    "cipher-alg=aes-128,cipher-mode=cbc,ivgen-alg=essiv,hash-alg=sha1",
];

fn with_iter(v: &str) -> String {
    if v.is_empty() {
        "iter-time=10".into()
    } else {
        format!("{v},iter-time=10")
    }
}

/// Makes one qemu image per variant (in parallel: qemu-img spends about a second timing
/// PBKDF2 for each) and reads each back through the library.
fn every_variant(fmt: &str, variants: &[&str], opts: impl Fn(&str) -> String + Sync) {
    let dir = tempfile::tempdir().unwrap();
    std::thread::scope(|s| {
        for (i, v) in variants.iter().enumerate() {
            let (d, opts) = (dir.path(), &opts);
            s.spawn(move || {
                let p = qemu_image(d, &format!("l{i}.{fmt}"), fmt, &opts(v));
                check_reads_like_qemu(&p, fmt);
            });
        }
    });
}

#[test]
fn qemu_luks_qcow2_every_cipher_reads_back() {
    every_variant("qcow2", LUKS_VARIANTS, |v| {
        format!("format=luks,{}", with_iter(v))
    });
}

#[test]
fn qemu_luks_format_each_mode_reads_back() {
    // The cipher code is shared with qcow2 (tested on every variant above); here one of each
    // mode, key size and a non-default hash, to keep qemu-img's PBKDF2 timing runs few.
    let some = [
        LUKS_VARIANTS[0],
        LUKS_VARIANTS[2],
        LUKS_VARIANTS[8],
        LUKS_VARIANTS[13],
        LUKS_VARIANTS[14],
    ];
    every_variant("luks", &some, with_iter);
}

#[test]
fn qemu_legacy_aes_qcow2_reads_back() {
    let dir = tempfile::tempdir().unwrap();
    let p = qemu_image(dir.path(), "a.qcow2", "qcow2", "format=aes");
    check_reads_like_qemu(&p, "qcow2");
    // A passphrase longer than 16 bytes: only the first 16 count.
    let q = dir.path().join("b.qcow2");
    let long = "0123456789abcdefTAIL";
    ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "--object",
            &secret_obj(long),
            "-o",
            "encrypt.format=aes,encrypt.key-secret=s0",
            q.to_str().unwrap(),
            "1M",
        ],
    );
    qemu_io("qcow2", &q, long, &["write -P 0x5a 512 4k"]);
    let img = open(&q, "0123456789abcdef", false).unwrap();
    assert_eq!(read_all(&img), qemu_read("qcow2", &q, long));
}

#[test]
fn wrong_secret_is_refused_for_luks_and_missing_secret_names_the_option() {
    let dir = tempfile::tempdir().unwrap();
    for (name, fmt, opts) in [
        ("w.qcow2", "qcow2", "format=luks,iter-time=10"),
        ("w.luks", "luks", "iter-time=10"),
    ] {
        let p = qemu_image(dir.path(), name, fmt, opts);
        match open(&p, "wrong", false) {
            Err(e @ imgblock::Error::Crypto { .. }) => {
                assert!(
                    e.to_string()
                        .contains("Invalid password, cannot unlock any keyslot"),
                    "{e}"
                );
            }
            other => panic!("{other:?}"),
        }
        match Image::open(&p, &OpenOptions::read_only()) {
            Err(e @ imgblock::Error::KeyRequired { .. }) => {
                assert!(
                    e.to_string().contains("key-secret' is required for cipher"),
                    "{e}"
                );
            }
            other => panic!("{other:?}"),
        }
    }
}

#[test]
fn metadata_only_open_shows_qemu_encrypt_block() {
    let dir = tempfile::tempdir().unwrap();
    let p = qemu_image(
        dir.path(),
        "m.qcow2",
        "qcow2",
        "format=luks,cipher-alg=aes-128,cipher-mode=cbc,ivgen-alg=essiv,iter-time=10",
    );
    let secrets = Secrets::for_metadata();
    let img = Image::open_with_secrets(&p, &OpenOptions::read_only(), &secrets).unwrap();
    let Some(EncryptionInfo::Luks(info)) = img.driver().encryption_info() else {
        panic!("no LUKS info")
    };
    let q: serde_json::Value = serde_json::from_str(&ok(
        "qemu-img",
        &["info", "--output=json", p.to_str().unwrap()],
    ))
    .unwrap();
    let e = &q["format-specific"]["data"]["encrypt"];
    assert_eq!(e["cipher-alg"], info.cipher_alg);
    assert_eq!(e["cipher-mode"], info.cipher_mode);
    assert_eq!(e["ivgen-alg"], info.ivgen_alg);
    assert_eq!(e["ivgen-hash-alg"], info.ivgen_hash_alg.unwrap());
    assert_eq!(e["hash-alg"], info.hash_alg);
    assert_eq!(e["uuid"], info.uuid.as_str());
    assert_eq!(e["payload-offset"], info.payload_offset);
    assert_eq!(e["master-key-iters"], info.master_key_iters);
    for (i, s) in info.slots.iter().enumerate() {
        assert_eq!(e["slots"][i]["active"], s.active);
        assert_eq!(e["slots"][i]["key-offset"], s.key_offset);
        assert_eq!(
            e["slots"][i].get("iters").and_then(|v| v.as_u64()),
            s.iters.map(u64::from)
        );
    }
    // Data cannot be read without the key.
    let mut b = [0u8; 512];
    assert!(matches!(
        img.read_at(&mut b, 0),
        Err(imgblock::Error::KeyRequired { .. })
    ));
}

/// Creates an encrypted image through the library.
fn lib_create(p: &Path, fmt: Format, opts: &str, pw: &str) {
    let mut o = CreateOptions::new(SIZE);
    o.parse_opts(opts).unwrap();
    o.secrets.insert("s0".into(), Secret::from(pw));
    create(p, fmt, &o).unwrap();
}

/// A recognisable plaintext: must not appear in the encrypted file.
const MARKER: &[u8] = b"PLAINTEXT-MARKER-0123456789";

fn marker_data(len: usize) -> Vec<u8> {
    MARKER.iter().copied().cycle().take(len).collect()
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// Writes through every path: aligned in place, unaligned (partial sectors), cluster
/// allocation, zeroes; returns the expected guest view.
fn write_mix(img: &Image) -> Vec<u8> {
    let mut want = vec![0u8; img.size() as usize];
    let mut put = |off: usize, data: &[u8]| {
        img.write_at(data, off as u64).unwrap();
        want[off..off + data.len()].copy_from_slice(data);
    };
    put(0, &marker_data(128 << 10));
    put(70_001, &marker_data(3001));
    put(65_536 + 100, b"short");
    put(1 << 20, &marker_data(1 << 20));
    put((3 << 20) + 511, &marker_data(1025));
    img.write_zeroes(1 << 20, 64 << 10, false).unwrap();
    want[1 << 20..(1 << 20) + (64 << 10)].fill(0);
    img.flush().unwrap();
    want
}

fn lib_image_checks(p: &Path, fmt: &str, want: &[u8]) {
    assert_eq!(
        qemu_read(fmt, p, PW),
        want,
        "qemu reads what the library wrote"
    );
    if fmt == "qcow2" {
        let obj = secret_obj(PW);
        let opts = image_opts(fmt, p);
        ok(
            "qemu-img",
            &["check", "--object", &obj, "--image-opts", &opts],
        );
    }
    let bytes = std::fs::read(p).unwrap();
    assert!(
        !contains(&bytes, MARKER),
        "plaintext reached {}",
        p.display()
    );
    let img = open(p, PW, false).unwrap();
    assert_eq!(read_all(&img), want);
}

#[test]
fn library_luks_qcow2_opens_in_qemu_and_hides_plaintext() {
    let dir = tempfile::tempdir().unwrap();
    for (i, v) in [
        "",
        "cipher-alg=aes-128,cipher-mode=cbc,ivgen-alg=essiv,hash-alg=sha1",
        "cipher-mode=ecb",
    ]
    .iter()
    .enumerate()
    {
        let p = dir.path().join(format!("lib{i}.qcow2"));
        let mut o = "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10".to_owned();
        for kv in v.split(',').filter(|s| !s.is_empty()) {
            o.push_str(&format!(",encrypt.{kv}"));
        }
        lib_create(&p, Format::Qcow2, &o, PW);
        let img = open(&p, PW, true).unwrap();
        let want = write_mix(&img);
        drop(img);
        lib_image_checks(&p, "qcow2", &want);
    }
}

#[test]
fn library_legacy_aes_qcow2_opens_in_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("aes.qcow2");
    lib_create(
        &p,
        Format::Qcow2,
        "encrypt.format=aes,encrypt.key-secret=s0",
        PW,
    );
    let img = open(&p, PW, true).unwrap();
    let want = write_mix(&img);
    drop(img);
    lib_image_checks(&p, "qcow2", &want);
    let info = ok("qemu-img", &["info", "--output=json", p.to_str().unwrap()]);
    assert!(info.contains("\"format\": \"aes\""), "{info}");
}

#[test]
fn library_luks_format_opens_in_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("plain.luks");
    lib_create(&p, Format::Luks, "key-secret=s0,iter-time=10", PW);
    assert_eq!(std::fs::metadata(&p).unwrap().len(), 2_068_480 + SIZE);
    let img = open(&p, PW, true).unwrap();
    assert_eq!(img.size(), SIZE);
    // A fresh luks payload reads as noise: write zeroes over it first, as convert does.
    img.write_zeroes(0, SIZE, false).unwrap();
    let want = write_mix(&img);
    drop(img);
    lib_image_checks(&p, "luks", &want);
}

#[test]
fn writes_into_qemu_made_luks_image_read_back_in_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let p = qemu_image(dir.path(), "q.qcow2", "qcow2", "format=luks,iter-time=10");
    let before = qemu_read("qcow2", &p, PW);
    let img = open(&p, PW, true).unwrap();
    let mut want = before;
    for (off, len) in [(100_000usize, 5000usize), (65_000, 1000), (2 << 20, 70_000)] {
        let d = marker_data(len);
        img.write_at(&d, off as u64).unwrap();
        want[off..off + len].copy_from_slice(&d);
    }
    img.flush().unwrap();
    drop(img);
    assert_eq!(qemu_read("qcow2", &p, PW), want);
}

#[test]
fn luks_base_under_plain_overlay_and_plain_base_under_luks_overlay() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // qemu-made LUKS base, library-made plain overlay.
    let base = qemu_image(d, "base.qcow2", "qcow2", "format=luks,iter-time=10");
    let top = d.join("top.qcow2");
    let mut o = CreateOptions::new(SIZE);
    o.backing_file = Some("base.qcow2".into());
    o.backing_fmt = Some("qcow2".into());
    o.unsafe_backing = true;
    create(&top, Format::Qcow2, &o).unwrap();
    let mut secrets = Secrets::none();
    secrets.set_layer(1, Secret::from(PW));
    let img = Image::open_with_secrets(
        &top,
        &OpenOptions {
            writable: true,
            ..OpenOptions::default()
        },
        &secrets,
    )
    .unwrap();
    let mut want = qemu_read("qcow2", &base, PW);
    // A partial-cluster write copies the rest of the cluster up from the encrypted base.
    img.write_at(b"overlay", 100_003).unwrap();
    want[100_003..100_010].copy_from_slice(b"overlay");
    img.flush().unwrap();
    assert_eq!(read_all(&img), want);
    drop(img);
    // qemu agrees (backing secret given per layer).
    let obj = secret_obj(PW);
    let opts = format!(
        "driver=qcow2,file.filename={},backing.encrypt.key-secret=s0",
        top.display()
    );
    let out = d.join("top.raw");
    ok(
        "qemu-img",
        &[
            "convert",
            "--object",
            &obj,
            "--image-opts",
            &opts,
            "-O",
            "raw",
            out.to_str().unwrap(),
        ],
    );
    assert_eq!(std::fs::read(&out).unwrap(), want);

    // Plain qemu-made base, library-made LUKS overlay.
    let pbase = d.join("pbase.qcow2");
    ok(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", pbase.to_str().unwrap(), "4M"],
    );
    ok(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0x44 0 2M",
            pbase.to_str().unwrap(),
        ],
    );
    let etop = d.join("etop.qcow2");
    let mut o = CreateOptions::new(SIZE);
    o.backing_file = Some("pbase.qcow2".into());
    o.backing_fmt = Some("qcow2".into());
    o.parse_opts("encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10")
        .unwrap();
    o.secrets.insert("s0".into(), Secret::from(PW));
    create(&etop, Format::Qcow2, &o).unwrap();
    let img = open(&etop, PW, true).unwrap();
    let mut want = vec![0u8; SIZE as usize];
    want[..2 << 20].fill(0x44);
    img.write_at(&marker_data(1000), 4097).unwrap();
    want[4097..5097].copy_from_slice(&marker_data(1000));
    img.flush().unwrap();
    assert_eq!(read_all(&img), want);
    drop(img);
    assert_eq!(qemu_read("qcow2", &etop, PW), want);
    assert!(!contains(&std::fs::read(&etop).unwrap(), MARKER));
    // Copy-on-write pulled 0x44 up into the encrypted cluster: it must not be there in clear.
    let bytes = std::fs::read(&etop).unwrap();
    assert!(!contains(&bytes, &[0x44u8; 4096]));
}

#[test]
fn amend_adds_and_erases_key_slots_qemu_agrees() {
    let dir = tempfile::tempdir().unwrap();
    for (name, fmt, prefix) in [("k.qcow2", "qcow2", "encrypt."), ("k.luks", "luks", "")] {
        let p = qemu_image(
            dir.path(),
            name,
            fmt,
            if fmt == "luks" {
                "iter-time=10"
            } else {
                "format=luks,iter-time=10"
            },
        );
        let want = qemu_read(fmt, &p, PW);
        let mut img = open(&p, PW, true).unwrap();
        let mut o = CreateOptions::default();
        o.parse_opts(&format!(
            "{prefix}state=active,{prefix}new-secret=s1,{prefix}iter-time=10,{prefix}keyslot=3"
        ))
        .unwrap();
        o.secrets.insert("s1".into(), Secret::from("second"));
        img.amend(&o).unwrap();
        drop(img);
        assert_eq!(qemu_read(fmt, &p, "second"), want);
        // Erase the original passphrase's slot; the new one still opens, the old one does not.
        let mut img = open(&p, "second", true).unwrap();
        let mut o = CreateOptions::default();
        o.parse_opts(&format!("{prefix}state=inactive,{prefix}old-secret=s2"))
            .unwrap();
        o.secrets.insert("s2".into(), Secret::from(PW));
        img.amend(&o).unwrap();
        // The last slot is protected.
        let mut o = CreateOptions::default();
        o.parse_opts(&format!("{prefix}state=inactive,{prefix}keyslot=3"))
            .unwrap();
        let e = img.amend(&o).unwrap_err();
        assert!(e.to_string().contains("only active keyslot"), "{e}");
        drop(img);
        assert!(open(&p, PW, false).is_err());
        assert_eq!(read_all(&open(&p, "second", false).unwrap()), want);
        let info = ok("qemu-img", &["info", "--output=json", p.to_str().unwrap()]);
        let v: serde_json::Value = serde_json::from_str(&info).unwrap();
        let enc = if fmt == "luks" {
            &v["format-specific"]["data"]
        } else {
            &v["format-specific"]["data"]["encrypt"]
        };
        let active: Vec<bool> = enc["slots"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["active"].as_bool().unwrap())
            .collect();
        assert_eq!(
            active,
            [false, false, false, true, false, false, false, false]
        );
        if fmt == "qcow2" {
            let obj = "secret,id=s0,data=second";
            ok(
                "qemu-img",
                &[
                    "check",
                    "--object",
                    obj,
                    "--image-opts",
                    &image_opts(fmt, &p),
                ],
            );
        }
    }
}
