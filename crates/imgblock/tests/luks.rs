//! Encrypted images against qemu-img, both ways: qcow2 with LUKS and the plain `luks` format
//! over every cipher, mode, IV generator and hash qemu-img 10 offers (aes, twofish, serpent,
//! cast5; xts, cbc, ctr, ecb; plain, plain64, essiv; md5 to sm3), and qcow2 with legacy AES.
//! Images qemu-img makes read back byte for byte; images the library makes open in qemu-img
//! with the same secret, pass `qemu-img check`, compare equal and hold no plaintext. Key slots
//! are kept cheap with `iter-time=10`.
//!
//! qemu-img spends about 2.5 s of CPU timing PBKDF2 for every LUKS image it creates, whatever
//! `iter-time` says, so each qemu-made LUKS image is made once per test process, all in
//! parallel, in a pool that the tests share (copying an image before they change it).

#![allow(clippy::cast_possible_truncation)] // test sizes are small constants

mod fmt_common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

use imgblock::crypto::{CipherAlg, CipherMode, EncryptionInfo, HashAlg, IvGenAlg, Secret, Secrets};
use imgblock::{create, CreateOptions, Format, Image, OpenOptions};

const PW: &str = "correct horse";
const SIZE: u64 = 4 << 20;

fn run(prog: &str, args: &[&str]) -> std::process::Output {
    fmt_common::output(Command::new(prog).args(args))
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

/// A qemu-made encrypted image with data at several offsets: whole and partial sectors, and a
/// zeroed range inside written data (kept to about 200 KiB: the `twofish` crate is slow).
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
            "write -P 0x33 3M 128k",
            "write -z 3136k 32k",
        ],
    );
    p
}

fn check_reads_like_qemu(p: &Path, fmt: &str) {
    let img = open(p, PW, false).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    assert!(img.driver().encrypted());
    let theirs = qemu_read(fmt, p, PW);
    // qemu reads back what qemu-io wrote (so the comparison is not noise against noise).
    assert!(
        theirs[..64 << 10].iter().all(|&b| b == 0x11),
        "{}",
        p.display()
    );
    assert!(
        theirs[3 << 20..3136 << 10].iter().all(|&b| b == 0x33)
            && theirs[3136 << 10..3168 << 10].iter().all(|&b| b == 0)
            && theirs[3168 << 10..3200 << 10].iter().all(|&b| b == 0x33),
        "{}",
        p.display()
    );
    assert!(
        read_all(&img) == theirs,
        "{} reads differently through the library",
        p.display()
    );
}

fn with_iter(v: &str) -> String {
    if v.is_empty() {
        "iter-time=10".into()
    } else {
        format!("{v},iter-time=10")
    }
}

/// qemu-made LUKS images: one per cipher x mode pair qemu-img 10 accepts (10 ciphers x 4
/// modes, less cast5-xts, which qemu refuses, and 192-bit keys outside XTS, on which qemu-img
/// aborts: 30), with the IV generators, ESSIV hashes and PBKDF2 hashes spread over them so that
/// each IV generator meets each mode that uses an IV and each hash appears three or four
/// times. Most are qcow2 (`encrypt.format=luks`), six are the `luks` format (the cipher code is
/// shared; the formats differ in where the header is and how sectors are numbered). Twofish
/// stays in qcow2, where only written clusters are decrypted: the RustCrypto `twofish` crate
/// computes its S-boxes per block and runs at a few MB/s.
/// `qemu_matrix_covers_every_option_qemu_accepts` checks the coverage.
const QEMU_MATRIX: &[(&str, &str)] = &[
    ("qcow2", "cipher-alg=aes-128,cipher-mode=xts,ivgen-alg=plain,hash-alg=ripemd160"),
    ("qcow2", "cipher-alg=aes-128,cipher-mode=cbc,ivgen-alg=essiv,hash-alg=sha1"),
    ("luks", "cipher-alg=aes-128,cipher-mode=ctr,ivgen-alg=plain,hash-alg=sha224"),
    ("qcow2", "cipher-alg=aes-128,cipher-mode=ecb,hash-alg=sha384"),
    ("qcow2", "cipher-alg=aes-192,cipher-mode=xts,ivgen-alg=essiv,ivgen-hash-alg=md5,hash-alg=sha512"),
    ("luks", "cipher-alg=aes-256,cipher-mode=xts"),
    ("luks", "cipher-alg=aes-256,cipher-mode=cbc,ivgen-alg=plain64,hash-alg=md5"),
    ("qcow2", "cipher-alg=aes-256,cipher-mode=ctr,ivgen-alg=essiv,ivgen-hash-alg=sm3,hash-alg=sm3"),
    ("qcow2", "cipher-alg=aes-256,cipher-mode=ecb,ivgen-alg=plain,hash-alg=sha256"),
    ("qcow2", "cipher-alg=twofish-128,cipher-mode=xts,ivgen-alg=essiv,hash-alg=md5"),
    ("qcow2", "cipher-alg=twofish-128,cipher-mode=cbc,ivgen-alg=plain,hash-alg=sha1"),
    ("qcow2", "cipher-alg=twofish-128,cipher-mode=ctr,ivgen-alg=plain64,hash-alg=sha224"),
    ("qcow2", "cipher-alg=twofish-128,cipher-mode=ecb,hash-alg=sha384"),
    ("qcow2", "cipher-alg=twofish-192,cipher-mode=xts,ivgen-alg=plain64,hash-alg=sha512"),
    ("qcow2", "cipher-alg=twofish-256,cipher-mode=xts,ivgen-alg=plain,hash-alg=ripemd160"),
    ("qcow2", "cipher-alg=twofish-256,cipher-mode=cbc,ivgen-alg=essiv,ivgen-hash-alg=md5,hash-alg=sm3"),
    ("qcow2", "cipher-alg=twofish-256,cipher-mode=ctr,ivgen-alg=essiv,ivgen-hash-alg=sha256,hash-alg=sha256"),
    ("qcow2", "cipher-alg=twofish-256,cipher-mode=ecb,hash-alg=md5"),
    ("qcow2", "cipher-alg=serpent-128,cipher-mode=xts,ivgen-alg=plain,hash-alg=sha1"),
    ("qcow2", "cipher-alg=serpent-128,cipher-mode=cbc,ivgen-alg=essiv,ivgen-hash-alg=md5,hash-alg=sha224"),
    ("luks", "cipher-alg=serpent-128,cipher-mode=ctr,ivgen-alg=plain64,hash-alg=sha384"),
    ("qcow2", "cipher-alg=serpent-128,cipher-mode=ecb,hash-alg=sha512"),
    ("qcow2", "cipher-alg=serpent-192,cipher-mode=xts,ivgen-alg=essiv,hash-alg=ripemd160"),
    ("qcow2", "cipher-alg=serpent-256,cipher-mode=xts,ivgen-alg=plain64,hash-alg=sm3"),
    ("qcow2", "cipher-alg=serpent-256,cipher-mode=cbc,ivgen-alg=plain,hash-alg=sha256"),
    ("qcow2", "cipher-alg=serpent-256,cipher-mode=ctr,ivgen-alg=essiv,ivgen-hash-alg=md5,hash-alg=md5"),
    ("luks", "cipher-alg=serpent-256,cipher-mode=ecb,hash-alg=sha1"),
    ("qcow2", "cipher-alg=cast5-128,cipher-mode=cbc,ivgen-alg=plain64,hash-alg=sha224"),
    ("luks", "cipher-alg=cast5-128,cipher-mode=ctr,ivgen-alg=essiv,ivgen-hash-alg=md5,hash-alg=sha384"),
    ("qcow2", "cipher-alg=cast5-128,cipher-mode=ecb,ivgen-alg=plain,hash-alg=sha512"),
];

/// A matrix entry's settings, with qemu's defaults for what it leaves out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Variant {
    alg: CipherAlg,
    mode: CipherMode,
    ivgen: IvGenAlg,
    ivgen_hash: HashAlg,
    hash: HashAlg,
}

fn variant(opts: &str) -> Variant {
    let mut v = Variant {
        alg: CipherAlg::Aes256,
        mode: CipherMode::Xts,
        ivgen: IvGenAlg::Plain64,
        ivgen_hash: HashAlg::Sha256,
        hash: HashAlg::Sha256,
    };
    for kv in opts.split(',').filter(|s| !s.is_empty()) {
        let (k, val) = kv.split_once('=').unwrap();
        match k {
            "cipher-alg" => v.alg = CipherAlg::parse(val).unwrap(),
            "cipher-mode" => v.mode = CipherMode::parse(val).unwrap(),
            "ivgen-alg" => v.ivgen = IvGenAlg::parse(val).unwrap(),
            "ivgen-hash-alg" => v.ivgen_hash = HashAlg::parse(val).unwrap(),
            "hash-alg" => v.hash = HashAlg::parse(val).unwrap(),
            _ => {}
        }
    }
    v
}

/// The qemu-made images, made once per test process.
struct Pool {
    dir: PathBuf,
    /// Per [`QEMU_MATRIX`] entry: the image, or why qemu could not make it.
    images: Vec<Result<PathBuf, String>>,
}

/// Tests that use the pool; the last one to finish removes it. A run of only some of them
/// leaves it behind, for the next run to sweep (its directory is named by process id).
const POOL_USERS: usize = 7;
static POOL: OnceLock<Pool> = OnceLock::new();
static POOL_LEFT: AtomicUsize = AtomicUsize::new(POOL_USERS);
const POOL_PREFIX: &str = "luks-qemu-pool-";

/// Removes pools of test processes that are gone.
fn sweep_old_pools(tmp: &Path) {
    let Ok(entries) = std::fs::read_dir(tmp) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(pid) = name.strip_prefix(POOL_PREFIX) {
            if !Path::new("/proc").join(pid).exists() {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
}

/// Holds the pool for one test; dropping the last holder (even in a panic) removes the files.
struct PoolUse(&'static Pool);

impl Drop for PoolUse {
    fn drop(&mut self) {
        if POOL_LEFT.fetch_sub(1, Ordering::SeqCst) == 1 {
            let _ = std::fs::remove_dir_all(&self.0.dir);
        }
    }
}

impl PoolUse {
    fn get() -> PoolUse {
        PoolUse(POOL.get_or_init(|| {
            let tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
            sweep_old_pools(tmp);
            let dir = tmp.join(format!("{POOL_PREFIX}{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            let images = std::thread::scope(|s| {
                let handles: Vec<_> = QEMU_MATRIX
                    .iter()
                    .enumerate()
                    .map(|(i, &(fmt, opts))| {
                        let dir = &dir;
                        s.spawn(move || {
                            let opts = if fmt == "qcow2" {
                                format!("format=luks,{}", with_iter(opts))
                            } else {
                                with_iter(opts)
                            };
                            qemu_image(dir, &format!("m{i}.{fmt}"), fmt, &opts)
                        })
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|h| {
                        h.join().map_err(|e| {
                            e.downcast_ref::<String>()
                                .cloned()
                                .unwrap_or_else(|| "qemu-img failed".into())
                        })
                    })
                    .collect()
            });
            Pool { dir, images }
        }))
    }

    /// The pool's image for a [`QEMU_MATRIX`] entry (read-only: copy it to change it).
    fn image(&self, fmt: &str, opts: &str) -> &Path {
        let i = QEMU_MATRIX
            .iter()
            .position(|&(f, o)| f == fmt && o == opts)
            .unwrap_or_else(|| panic!("{fmt} {opts} is not in QEMU_MATRIX"));
        match &self.0.images[i] {
            Ok(p) => p,
            Err(e) => panic!("qemu could not make {fmt} {opts}: {e}"),
        }
    }

    /// A copy of a pool image in `dir`, to change.
    fn copy(&self, fmt: &str, opts: &str, dir: &Path, name: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::copy(self.image(fmt, opts), &p).unwrap();
        p
    }

    /// Reads every pool image of format `fmt` through the library and qemu-img, in parallel.
    fn check_all(&self, fmt: &str) -> usize {
        let mine: Vec<_> = QEMU_MATRIX
            .iter()
            .filter(|&&(f, _)| f == fmt)
            .map(|&(f, o)| self.image(f, o))
            .collect();
        std::thread::scope(|s| {
            for p in &mine {
                s.spawn(move || check_reads_like_qemu(p, fmt));
            }
        });
        mine.len()
    }
}

#[test]
fn qemu_matrix_covers_every_option_qemu_accepts() {
    let vs: Vec<Variant> = QEMU_MATRIX.iter().map(|(_, o)| variant(o)).collect();
    // Every cipher x mode pair qemu-img accepts, once.
    let pairs: BTreeSet<(&str, &str)> = vs.iter().map(|v| (v.alg.name(), v.mode.name())).collect();
    assert_eq!(
        pairs.len(),
        vs.len(),
        "a cipher x mode pair is listed twice"
    );
    let mut want = BTreeSet::new();
    for a in CipherAlg::ALL {
        for m in CipherMode::ALL {
            let cast5_xts = a == CipherAlg::Cast5_128 && m == CipherMode::Xts;
            let short_material = a.key_len() == 24 && m != CipherMode::Xts;
            if !cast5_xts && !short_material {
                want.insert((a.name(), m.name()));
            }
        }
    }
    assert_eq!(want.len(), 30);
    assert_eq!(pairs, want);
    // Every PBKDF2 hash at least three times.
    for h in HashAlg::ALL {
        let n = vs.iter().filter(|v| v.hash == h).count();
        assert!(n >= 3, "hash-alg={} appears {n} times", h.name());
    }
    // Every IV generator with every mode that uses an IV, and with each new cipher family.
    for g in [IvGenAlg::Plain, IvGenAlg::Plain64, IvGenAlg::Essiv] {
        for m in [CipherMode::Xts, CipherMode::Cbc, CipherMode::Ctr] {
            assert!(
                vs.iter().any(|v| v.ivgen == g && v.mode == m),
                "ivgen-alg={} with {}",
                g.name(),
                m.name()
            );
        }
        for fam in ["aes", "twofish", "serpent"] {
            assert!(
                vs.iter()
                    .any(|v| v.ivgen == g && v.mode != CipherMode::Ecb && v.alg.luks_name() == fam),
                "ivgen-alg={} with {fam}",
                g.name()
            );
        }
    }
    // ESSIV with several hashes, including one that picks another key size of the cipher
    // (aes-128 with sha256 runs ESSIV with aes-256) and CAST5's only one, md5.
    let essiv: BTreeSet<&str> = vs
        .iter()
        .filter(|v| v.ivgen == IvGenAlg::Essiv)
        .map(|v| v.ivgen_hash.name())
        .collect();
    assert_eq!(essiv, BTreeSet::from(["md5", "sha256", "sm3"]));
    assert!(vs
        .iter()
        .any(|v| v.ivgen == IvGenAlg::Essiv && v.alg == CipherAlg::Cast5_128));
    // Both formats.
    assert!(QEMU_MATRIX.iter().filter(|(f, _)| *f == "luks").count() >= 6);
}

#[test]
fn qemu_luks_qcow2_every_cipher_reads_back() {
    let pool = PoolUse::get();
    assert_eq!(pool.check_all("qcow2"), 24);
}

#[test]
fn qemu_luks_format_each_mode_reads_back() {
    let pool = PoolUse::get();
    assert_eq!(pool.check_all("luks"), 6);
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
    let pool = PoolUse::get();
    for (fmt, opts) in [
        ("qcow2", QEMU_MATRIX[0].1),
        ("luks", "cipher-alg=cast5-128,cipher-mode=ctr,ivgen-alg=essiv,ivgen-hash-alg=md5,hash-alg=sha384"),
    ] {
        let p = pool.image(fmt, opts);
        match open(p, "wrong", false) {
            Err(e @ imgblock::Error::Crypto { .. }) => {
                assert!(
                    e.to_string()
                        .contains("Invalid password, cannot unlock any keyslot"),
                    "{e}"
                );
            }
            other => panic!("{other:?}"),
        }
        match Image::open(p, &OpenOptions::read_only()) {
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
    // Every qemu-made image: the names of every cipher, mode, IV generator and hash as qemu
    // shows them.
    let pool = PoolUse::get();
    for &(fmt, opts) in QEMU_MATRIX {
        let p = pool.image(fmt, opts);
        let secrets = Secrets::for_metadata();
        let img = Image::open_with_secrets(p, &OpenOptions::read_only(), &secrets).unwrap();
        let Some(EncryptionInfo::Luks(info)) = img.driver().encryption_info() else {
            panic!("no LUKS info")
        };
        let want = variant(opts);
        assert_eq!(info.cipher_alg, want.alg.name());
        assert_eq!(info.cipher_mode, want.mode.name());
        assert_eq!(info.ivgen_alg, want.ivgen.name());
        assert_eq!(info.hash_alg, want.hash.name());
        let e = &qemu_encrypt_block(p, fmt);
        assert_eq!(e["cipher-alg"], info.cipher_alg, "{opts}");
        assert_eq!(e["cipher-mode"], info.cipher_mode);
        assert_eq!(e["ivgen-alg"], info.ivgen_alg);
        match info.ivgen_hash_alg {
            Some(h) => {
                assert_eq!(h, want.ivgen_hash.name());
                assert_eq!(e["ivgen-hash-alg"], h);
            }
            None => assert!(e.get("ivgen-hash-alg").is_none(), "{opts}"),
        }
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
    assert!(
        qemu_read(fmt, p, PW) == want,
        "qemu reads what the library wrote in {}",
        p.display()
    );
    let obj = secret_obj(PW);
    let opts = image_opts(fmt, p);
    if fmt == "qcow2" {
        ok(
            "qemu-img",
            &["check", "--object", &obj, "--image-opts", &opts],
        );
    }
    // qemu-img compare against the expected guest view as a raw file.
    let raw = p.with_extension("want.raw");
    std::fs::write(&raw, want).unwrap();
    let raw_opts = format!("driver=raw,file.filename={}", raw.display());
    let out = ok(
        "qemu-img",
        &[
            "compare",
            "--object",
            &obj,
            "--image-opts",
            &opts,
            &raw_opts,
        ],
    );
    assert!(out.contains("Images are identical"), "{out}");
    std::fs::remove_file(&raw).unwrap();
    let bytes = std::fs::read(p).unwrap();
    assert!(
        !contains(&bytes, MARKER),
        "plaintext reached {}",
        p.display()
    );
    let img = open(p, PW, false).unwrap();
    assert!(read_all(&img) == want, "{} reads back", p.display());
}

/// The LUKS block of `qemu-img info --output=json` (inside "encrypt" for qcow2).
fn qemu_encrypt_block(p: &Path, fmt: &str) -> serde_json::Value {
    let mut q: serde_json::Value = serde_json::from_str(&ok(
        "qemu-img",
        &["info", "--output=json", p.to_str().unwrap()],
    ))
    .unwrap();
    let mut data = q["format-specific"]["data"].take();
    if fmt == "luks" {
        data
    } else {
        data["encrypt"].take()
    }
}

/// qemu-img's view of a LUKS image's settings: (cipher-alg, cipher-mode, ivgen-alg,
/// ivgen-hash-alg or "", hash-alg).
fn qemu_luks_settings(p: &Path, fmt: &str) -> [String; 5] {
    let e = qemu_encrypt_block(p, fmt);
    let f = |k: &str| e[k].as_str().unwrap_or_default().to_owned();
    [
        f("cipher-alg"),
        f("cipher-mode"),
        f("ivgen-alg"),
        f("ivgen-hash-alg"),
        f("hash-alg"),
    ]
}

/// What qemu-img should show for LUKS options `opts` (qemu's defaults filled in).
fn expected_settings(opts: &str) -> [String; 5] {
    let v = variant(opts);
    [
        v.alg.name().to_owned(),
        v.mode.name().to_owned(),
        v.ivgen.name().to_owned(),
        if v.ivgen == IvGenAlg::Essiv {
            v.ivgen_hash.name().to_owned()
        } else {
            String::new()
        },
        v.hash.name().to_owned(),
    ]
}

/// Creates a LUKS image of format `fmt` through the library with options `v` (names without
/// `encrypt.`), writes through every path, and checks it in qemu: settings, data, `check`,
/// `compare`, no plaintext.
fn library_variant(dir: &Path, name: &str, fmt: &str, v: &str) {
    let p = dir.join(name);
    let (format, mut o, prefix) = if fmt == "qcow2" {
        (
            Format::Qcow2,
            "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10".to_owned(),
            "encrypt.",
        )
    } else {
        (Format::Luks, "key-secret=s0,iter-time=10".to_owned(), "")
    };
    for kv in v.split(',').filter(|s| !s.is_empty()) {
        o.push_str(&format!(",{prefix}{kv}"));
    }
    lib_create(&p, format, &o, PW);
    assert_eq!(qemu_luks_settings(&p, fmt), expected_settings(v), "{v}");
    if fmt == "luks" && v.is_empty() {
        // qemu's layout for a 64-byte key: eight 256000-byte slots rounded to 4 KiB, after 4 KiB.
        assert_eq!(std::fs::metadata(&p).unwrap().len(), 2_068_480 + SIZE);
    }
    let img = open(&p, PW, true).unwrap();
    assert_eq!(img.size(), SIZE);
    if fmt == "luks" {
        // A fresh luks payload reads as noise: write zeroes over it first, as convert does.
        img.write_zeroes(0, SIZE, false).unwrap();
    }
    let want = write_mix(&img);
    drop(img);
    lib_image_checks(&p, fmt, &want);
}

/// Library-made LUKS variants, in parallel threads.
fn library_variants(fmt: &str, variants: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    std::thread::scope(|s| {
        for (i, v) in variants.iter().enumerate() {
            let d = dir.path();
            s.spawn(move || library_variant(d, &format!("lib{i}.{fmt}"), fmt, v));
        }
    });
}

#[test]
fn library_luks_qcow2_opens_in_qemu_and_hides_plaintext() {
    // Each new cipher family, CTR, each new hash and ESSIV with each family at least once (the
    // data cipher is the same code in every format; what differs here is the header qemu reads).
    library_variants(
        "qcow2",
        &[
            "",
            "cipher-alg=aes-128,cipher-mode=cbc,ivgen-alg=essiv,hash-alg=sha1",
            "cipher-mode=ecb",
            "cipher-alg=twofish-256,cipher-mode=ctr,ivgen-alg=essiv,hash-alg=md5",
            "cipher-alg=serpent-128,cipher-mode=xts,ivgen-alg=plain,hash-alg=ripemd160",
            "cipher-alg=serpent-192,cipher-mode=xts,ivgen-alg=essiv,ivgen-hash-alg=sm3,hash-alg=sha384",
            "cipher-alg=cast5-128,cipher-mode=cbc,ivgen-alg=essiv,ivgen-hash-alg=md5,hash-alg=sm3",
        ],
    );
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
    library_variants(
        "luks",
        &[
            "",
            "cipher-alg=serpent-256,cipher-mode=cbc,ivgen-alg=essiv,ivgen-hash-alg=md5,hash-alg=ripemd160",
            "cipher-alg=cast5-128,cipher-mode=ctr,hash-alg=sm3",
        ],
    );
}

#[test]
fn library_refuses_what_qemu_refuses() {
    // (options, what our message says, whether to ask qemu-img too: on a 192-bit key outside
    // XTS it aborts on an assertion rather than refusing).
    let cases = [
        ("cipher-alg=cast5-128", "Unsupported cipher mode xts", true),
        (
            "cipher-alg=cast5-128,cipher-mode=cbc,ivgen-alg=essiv",
            "Cipher cast5-128 not supported with essiv",
            true,
        ),
        (
            "cipher-alg=twofish-128,ivgen-alg=essiv,ivgen-hash-alg=sha1",
            "No Twofish cipher with key size 20 available",
            true,
        ),
        (
            "cipher-alg=serpent-256,cipher-mode=ctr,ivgen-alg=essiv,ivgen-hash-alg=sha512",
            "No Serpent cipher with key size 64 available",
            true,
        ),
        (
            "cipher-alg=aes-128,ivgen-alg=essiv,ivgen-hash-alg=ripemd160",
            "No AES cipher with key size 20 available",
            true,
        ),
        ("cipher-alg=sm4", "Algorithm 'sm4' not supported", true),
        ("cipher-mode=ofb", "ofb", true),
        ("hash-alg=whirlpool", "whirlpool", true),
        ("ivgen-alg=benbi", "benbi", true),
        (
            "cipher-alg=aes-192,cipher-mode=cbc",
            "key material is not a whole number of sectors",
            false,
        ),
        (
            "cipher-alg=twofish-192,cipher-mode=ctr",
            "key material is not a whole number of sectors",
            false,
        ),
    ];
    let dir = tempfile::tempdir().unwrap();
    for (i, (v, msg, ask_qemu)) in cases.into_iter().enumerate() {
        for fmt in ["qcow2", "luks"] {
            let p = dir.path().join(format!("r{i}.{fmt}"));
            let (format, mut o, prefix) = if fmt == "qcow2" {
                (
                    Format::Qcow2,
                    "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10".to_owned(),
                    "encrypt.",
                )
            } else {
                (Format::Luks, "key-secret=s0,iter-time=10".to_owned(), "")
            };
            for kv in v.split(',') {
                o.push_str(&format!(",{prefix}{kv}"));
            }
            let mut co = CreateOptions::new(SIZE);
            let e = match co.parse_opts(&o) {
                Err(e) => e,
                Ok(()) => {
                    co.secrets.insert("s0".into(), Secret::from(PW));
                    create(&p, format, &co).expect_err(v)
                }
            };
            assert!(e.to_string().contains(msg), "{fmt} {v}: {e}");
            assert!(!p.exists(), "{fmt} {v} left a file behind");
            if ask_qemu {
                let q = run(
                    "qemu-img",
                    &[
                        "create",
                        "-q",
                        "-f",
                        fmt,
                        "--object",
                        &secret_obj(PW),
                        "-o",
                        &o,
                        p.to_str().unwrap(),
                        "1M",
                    ],
                );
                assert_eq!(q.status.code(), Some(1), "qemu-img accepts {fmt} {v}");
                assert!(!p.exists());
            }
        }
    }
}

#[test]
fn writes_into_qemu_made_luks_image_read_back_in_qemu() {
    let pool = PoolUse::get();
    let dir = tempfile::tempdir().unwrap();
    let p = pool.copy(
        "qcow2",
        "cipher-alg=twofish-128,cipher-mode=xts,ivgen-alg=essiv,hash-alg=md5",
        dir.path(),
        "q.qcow2",
    );
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
    let pool = PoolUse::get();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // qemu-made LUKS base, library-made plain overlay.
    let base = pool.copy(
        "qcow2",
        "cipher-alg=serpent-192,cipher-mode=xts,ivgen-alg=essiv,hash-alg=ripemd160",
        d,
        "base.qcow2",
    );
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
    let pool = PoolUse::get();
    let dir = tempfile::tempdir().unwrap();
    for (name, fmt, prefix, opts) in [
        (
            "k.qcow2",
            "qcow2",
            "encrypt.",
            "cipher-alg=serpent-256,cipher-mode=cbc,ivgen-alg=plain,hash-alg=sha256",
        ),
        (
            "k.luks",
            "luks",
            "",
            "cipher-alg=aes-128,cipher-mode=ctr,ivgen-alg=plain,hash-alg=sha224",
        ),
    ] {
        let p = pool.copy(fmt, opts, dir.path(), name);
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
