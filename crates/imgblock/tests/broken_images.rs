//! A corpus of broken images: truncated and garbled headers, tables past the end or inside the
//! header, loops, absurd sizes, bad descriptors. Each must give a clear error naming the file
//! and the problem — or, where qemu-img still reads the image, the same data qemu-img reads —
//! never a panic, a hang or a write to a file opened read-only.

mod fmt_common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc;
use std::time::Duration;

use imgblock::{create, CreateOptions, Format, Image, OpenOptions, Repair};

/// How one case must end.
enum Expect {
    /// Opening or reading fails with a message containing this text (and the file name).
    Error(&'static str),
    /// The image opens and reads exactly what `qemu-img convert` reads from it.
    SameAsQemu,
}

struct Case {
    name: &'static str,
    /// Builds the broken image in the directory and returns the path to open.
    make: fn(&Path) -> PathBuf,
    format: Option<Format>,
    expect: Expect,
}

fn be32(v: u32) -> [u8; 4] {
    v.to_be_bytes()
}
fn be64(v: u64) -> [u8; 8] {
    v.to_be_bytes()
}

/// A 4 MiB qcow2 image with some data, 64 KiB clusters, made here.
fn qcow2(dir: &Path, opts: &str) -> Vec<u8> {
    let p = dir.join("base-good.qcow2");
    let mut o = CreateOptions::new(4 << 20);
    o.parse_opts(opts).unwrap();
    create(&p, Format::Qcow2, &o).unwrap();
    let img = Image::open(&p, &OpenOptions::writable()).unwrap();
    img.write_at(&[0x5a; 200_000], 10_000).unwrap();
    img.write_at(&[0xa5; 4096], 3 << 20).unwrap();
    drop(img);
    std::fs::read(&p).unwrap()
}

fn patched(dir: &Path, name: &str, mut bytes: Vec<u8>, patches: &[(usize, &[u8])]) -> PathBuf {
    for (off, data) in patches {
        if bytes.len() < off + data.len() {
            bytes.resize(off + data.len(), 0);
        }
        bytes[*off..off + data.len()].copy_from_slice(data);
    }
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

fn q(dir: &Path, name: &str, patches: &[(usize, &[u8])]) -> PathBuf {
    patched(dir, name, qcow2(dir, ""), patches)
}

/// Offset of the first L2 table of a qcow2 image made by [`qcow2`].
fn first_l2(bytes: &[u8]) -> usize {
    let l1 = u64::from_be_bytes(bytes[40..48].try_into().unwrap());
    let l1 = usize::try_from(l1).unwrap();
    let e = u64::from_be_bytes(bytes[l1..l1 + 8].try_into().unwrap());
    usize::try_from(e & 0x00ff_ffff_ffff_fe00).unwrap()
}

fn vmdk(dir: &Path) -> Vec<u8> {
    let p = dir.join("base-good.vmdk");
    let mut o = CreateOptions::new(4 << 20);
    o.parse_opts("subformat=monolithicSparse").unwrap();
    create(&p, Format::Vmdk, &o).unwrap();
    let img = Image::open(&p, &OpenOptions::writable()).unwrap();
    img.write_at(&[0x11; 100_000], 0).unwrap();
    drop(img);
    std::fs::read(&p).unwrap()
}

fn vdi(dir: &Path) -> Vec<u8> {
    let p = dir.join("base-good.vdi");
    create(&p, Format::Vdi, &CreateOptions::new(4 << 20)).unwrap();
    let img = Image::open(&p, &OpenOptions::writable()).unwrap();
    img.write_at(&[0x22; 100_000], 0).unwrap();
    drop(img);
    std::fs::read(&p).unwrap()
}

fn le32(v: u32) -> [u8; 4] {
    v.to_le_bytes()
}

const CASES: &[Case] = &[
    Case {
        name: "qcow2 empty file",
        make: |d| patched(d, "a.qcow2", Vec::new(), &[]),
        format: Some(Format::Qcow2),
        expect: Expect::Error("too short"),
    },
    Case {
        name: "qcow2 truncated in the header",
        make: |d| {
            let mut b = qcow2(d, "");
            b.truncate(50);
            patched(d, "a.qcow2", b, &[])
        },
        format: Some(Format::Qcow2),
        expect: Expect::Error("too short"),
    },
    Case {
        name: "qcow2 truncated after the header",
        make: |d| {
            let mut b = qcow2(d, "");
            b.truncate(4096);
            patched(d, "a.qcow2", b, &[])
        },
        format: None,
        expect: Expect::Error("outside the image file"),
    },
    Case {
        name: "qcow2 zeroed header",
        make: |d| q(d, "a.qcow2", &[(0, &[0u8; 104])]),
        format: Some(Format::Qcow2),
        expect: Expect::Error("bad magic"),
    },
    Case {
        name: "qcow2 version 4",
        make: |d| q(d, "a.qcow2", &[(4, &be32(4))]),
        format: None,
        expect: Expect::Error("unsupported qcow2 version 4"),
    },
    Case {
        name: "qcow2 cluster_bits 8",
        make: |d| q(d, "a.qcow2", &[(20, &be32(8))]),
        format: None,
        expect: Expect::Error("cluster size"),
    },
    Case {
        name: "qcow2 cluster_bits 40",
        make: |d| q(d, "a.qcow2", &[(20, &be32(40))]),
        format: None,
        expect: Expect::Error("cluster size"),
    },
    Case {
        name: "qcow2 size past 2^63",
        make: |d| q(d, "a.qcow2", &[(24, &be64(u64::MAX))]),
        format: None,
        expect: Expect::Error("too large"),
    },
    Case {
        name: "qcow2 L1 too small for size",
        make: |d| q(d, "a.qcow2", &[(24, &be64(1 << 50))]),
        format: None,
        expect: Expect::Error("too small"),
    },
    Case {
        name: "qcow2 huge L1 size",
        make: |d| q(d, "a.qcow2", &[(36, &be32(0xffff_ffff))]),
        format: None,
        expect: Expect::Error("too large"),
    },
    Case {
        name: "qcow2 L1 past end of file",
        make: |d| q(d, "a.qcow2", &[(40, &be64(1 << 40))]),
        format: None,
        expect: Expect::Error("L1 table at offset"),
    },
    Case {
        name: "qcow2 L1 misaligned",
        make: |d| q(d, "a.qcow2", &[(40, &be64(0x30200))]),
        format: None,
        expect: Expect::Error("not cluster aligned"),
    },
    Case {
        name: "qcow2 L1 inside the header",
        make: |d| q(d, "a.qcow2", &[(40, &be64(0))]),
        format: None,
        expect: Expect::Error("overlaps the image header"),
    },
    Case {
        name: "qcow2 refcount table past end",
        make: |d| q(d, "a.qcow2", &[(48, &be64(1 << 45))]),
        format: None,
        expect: Expect::Error("refcount table"),
    },
    Case {
        name: "qcow2 refcount table of no clusters",
        make: |d| q(d, "a.qcow2", &[(56, &be32(0))]),
        format: None,
        expect: Expect::Error("does not contain a reference count table"),
    },
    Case {
        name: "qcow2 huge refcount table",
        make: |d| q(d, "a.qcow2", &[(56, &be32(u32::MAX))]),
        format: None,
        expect: Expect::Error("too large"),
    },
    Case {
        name: "qcow2 unknown incompatible feature",
        make: |d| q(d, "a.qcow2", &[(72, &be64(1 << 40))]),
        format: None,
        expect: Expect::Error("unsupported qcow2 feature"),
    },
    Case {
        name: "qcow2 absurd snapshot count",
        make: |d| q(d, "a.qcow2", &[(60, &be32(u32::MAX)), (64, &be64(0x10000))]),
        format: None,
        expect: Expect::Error("too many snapshots"),
    },
    Case {
        // The refcount block read as three snapshot entries, each without the extra data a v3
        // entry must have: qemu-img opens it (check reports each entry) and so does img.
        name: "qcow2 garbage snapshot table",
        make: |d| q(d, "a.qcow2", &[(60, &be32(3)), (64, &be64(0x20000))]),
        format: None,
        expect: Expect::SameAsQemu,
    },
    Case {
        name: "qcow2 backing name past the cluster",
        make: |d| q(d, "a.qcow2", &[(8, &be64(65530)), (16, &be32(100))]),
        format: None,
        expect: Expect::Error("backing file name"),
    },
    Case {
        name: "qcow2 backing name too long",
        make: |d| q(d, "a.qcow2", &[(8, &be64(512)), (16, &be32(5000))]),
        format: None,
        expect: Expect::Error("backing file name"),
    },
    Case {
        name: "qcow2 header extension overrunning the cluster",
        make: |d| q(d, "a.qcow2", &[(116, &be32(0x00ff_ffff))]),
        format: None,
        expect: Expect::Error("header extension"),
    },
    Case {
        name: "qcow2 backing file that does not exist",
        make: |d| {
            let mut b = qcow2(d, "");
            let name = b"missing.qcow2";
            b[1024..1024 + name.len()].copy_from_slice(name);
            patched(d, "a.qcow2", b, &[(8, &be64(1024)), (16, &be32(13))])
        },
        format: None,
        expect: Expect::Error("Could not open backing file"),
    },
    Case {
        name: "qcow2 backing file that is itself",
        make: |d| {
            let mut b = qcow2(d, "");
            b[1024..1031].copy_from_slice(b"a.qcow2");
            patched(d, "a.qcow2", b, &[(8, &be64(1024)), (16, &be32(7))])
        },
        format: None,
        expect: Expect::Error("loops back"),
    },
    Case {
        name: "qcow2 backing loop of two",
        make: |d| {
            for (me, other) in [("a.qcow2", "b.qcow2"), ("b.qcow2", "a.qcow2")] {
                let mut b = qcow2(d, "");
                b[1024..1031].copy_from_slice(other.as_bytes());
                patched(d, me, b, &[(8, &be64(1024)), (16, &be32(7))]);
            }
            d.join("a.qcow2")
        },
        format: None,
        expect: Expect::Error("loops back"),
    },
    Case {
        name: "qcow2 chain deeper than the limit",
        make: |d| {
            // Two descriptors an image: past the usual soft limit of 1024 files.
            imgblock::storage::raise_open_file_limit();
            let n = imgblock::MAX_CHAIN_DEPTH + 1;
            create(
                &d.join("c0.qcow2"),
                Format::Qcow2,
                &CreateOptions::new(1 << 20),
            )
            .unwrap();
            for i in 1..n {
                let o = CreateOptions {
                    backing_file: Some(format!("c{}.qcow2", i - 1)),
                    backing_fmt: Some("qcow2".into()),
                    ..CreateOptions::new(1 << 20)
                };
                create(&d.join(format!("c{i}.qcow2")), Format::Qcow2, &o).unwrap();
            }
            d.join(format!("c{}.qcow2", n - 1))
        },
        format: None,
        expect: Expect::Error("deeper than"),
    },
    Case {
        name: "qcow2 L2 entry misaligned",
        make: |d| {
            let b = qcow2(d, "");
            let l2 = first_l2(&b);
            patched(d, "a.qcow2", b, &[(l2, &be64((1 << 63) | 0x50200))])
        },
        format: None,
        expect: Expect::Error("not cluster aligned"),
    },
    Case {
        name: "qcow2 L2 entry pointing into the header",
        make: |d| {
            let b = qcow2(d, "");
            let l2 = first_l2(&b);
            patched(d, "a.qcow2", b, &[(l2 + 8, &be64(1 << 63))])
        },
        format: None,
        expect: Expect::SameAsQemu,
    },
    Case {
        name: "qcow2 L2 entry past the end of the file",
        make: |d| {
            let b = qcow2(d, "");
            let l2 = first_l2(&b);
            patched(d, "a.qcow2", b, &[(l2, &be64((1 << 63) | (1 << 40)))])
        },
        format: None,
        expect: Expect::SameAsQemu,
    },
    Case {
        name: "qcow2 compressed descriptor past the end",
        make: |d| {
            let b = qcow2(d, "");
            let l2 = first_l2(&b);
            patched(d, "a.qcow2", b, &[(l2, &be64((1 << 62) | (1 << 40)))])
        },
        format: None,
        expect: Expect::Error("compressed cluster"),
    },
    Case {
        name: "qcow2 compressed garbage",
        make: |d| {
            let b = qcow2(d, "");
            let l2 = first_l2(&b);
            patched(d, "a.qcow2", b, &[(l2, &be64((1 << 62) | (l2 as u64)))])
        },
        format: None,
        expect: Expect::Error("compressed cluster"),
    },
    Case {
        name: "qcow2 L1 entry pointing at the header",
        make: |d| {
            let b = qcow2(d, "");
            let l1 = usize::try_from(u64::from_be_bytes(b[40..48].try_into().unwrap())).unwrap();
            patched(d, "a.qcow2", b, &[(l1, &be64(1 << 63))])
        },
        format: None,
        expect: Expect::SameAsQemu,
    },
    Case {
        name: "vmdk grain directory past the end",
        make: |d| patched(d, "a.vmdk", vmdk(d), &[(56, &(1u64 << 40).to_le_bytes())]),
        format: Some(Format::Vmdk),
        expect: Expect::Error(""),
    },
    Case {
        name: "vmdk grain table past the end",
        make: |d| {
            let b = vmdk(d);
            let gd =
                usize::try_from(u64::from_le_bytes(b[56..64].try_into().unwrap()) * 512).unwrap();
            patched(d, "a.vmdk", b, &[(gd, &le32(0x7fff_ffff))])
        },
        format: Some(Format::Vmdk),
        expect: Expect::Error(""),
    },
    Case {
        name: "vmdk absurd capacity",
        make: |d| patched(d, "a.vmdk", vmdk(d), &[(12, &u64::MAX.to_le_bytes())]),
        format: Some(Format::Vmdk),
        expect: Expect::Error(""),
    },
    Case {
        name: "vmdk truncated header",
        make: |d| {
            let mut b = vmdk(d);
            b.truncate(30);
            patched(d, "a.vmdk", b, &[])
        },
        format: Some(Format::Vmdk),
        expect: Expect::Error(""),
    },
    Case {
        name: "vmdk huge descriptor file",
        make: |d| {
            let p = d.join("a.vmdk");
            let mut t = b"# Disk DescriptorFile\nversion=1\n".to_vec();
            t.resize(8 << 20, b'#');
            std::fs::write(&p, t).unwrap();
            p
        },
        format: Some(Format::Vmdk),
        expect: Expect::Error(""),
    },
    Case {
        name: "vdi block map past the end",
        make: |d| patched(d, "a.vdi", vdi(d), &[(0x154, &le32(0x7fff_0000))]),
        format: Some(Format::Vdi),
        expect: Expect::Error(""),
    },
    Case {
        name: "vdi block entry past the data",
        make: |d| {
            let b = vdi(d);
            let map =
                usize::try_from(u32::from_le_bytes(b[0x154..0x158].try_into().unwrap())).unwrap();
            patched(d, "a.vdi", b, &[(map, &le32(0x00ff_fff0))])
        },
        format: Some(Format::Vdi),
        expect: Expect::Error(""),
    },
    Case {
        name: "vdi absurd disk size",
        make: |d| patched(d, "a.vdi", vdi(d), &[(0x170, &u64::MAX.to_le_bytes())]),
        format: Some(Format::Vdi),
        expect: Expect::Error(""),
    },
    Case {
        name: "vdi absurd block count",
        make: |d| patched(d, "a.vdi", vdi(d), &[(0x180, &le32(u32::MAX))]),
        format: Some(Format::Vdi),
        expect: Expect::Error(""),
    },
];

fn qemu_raw(path: &Path, format: Option<Format>, out: &Path) -> Option<Vec<u8>> {
    let mut cmd = Command::new("qemu-img");
    cmd.arg("convert");
    if let Some(f) = format {
        cmd.args(["-f", f.name()]);
    }
    cmd.args(["-O", "raw"]).arg(path).arg(out);
    let o = fmt_common::output(&mut cmd);
    o.status.success().then(|| std::fs::read(out).unwrap())
}

/// Opens, reads all, block-status walks and checks; the first error, if any.
fn exercise(path: &Path, format: Option<Format>) -> Result<Vec<u8>, String> {
    let opts = OpenOptions {
        format,
        ..OpenOptions::read_only()
    };
    let img = Image::open(path, &opts).map_err(|e| e.to_string())?;
    let size = usize::try_from(img.size().min(64 << 20)).unwrap();
    let mut v = vec![0u8; size];
    img.read_at(&mut v, 0).map_err(|e| e.to_string())?;
    let mut off = 0;
    while off < img.size() {
        off += img
            .block_status(off, img.size() - off)
            .map_err(|e| e.to_string())?
            .len
            .max(1);
    }
    let _ = img.check(Repair::None);
    Ok(v)
}

#[test]
fn broken_images_give_clear_errors_and_never_panic_hang_or_write() {
    assert!(
        CASES.len() >= 30,
        "the corpus has only {} cases",
        CASES.len()
    );
    let mut failures = Vec::new();
    for case in CASES {
        let dir = tempfile::tempdir().unwrap();
        let path = (case.make)(dir.path());
        let before = std::fs::read(&path).unwrap();
        let (tx, rx) = mpsc::channel();
        let (p, f) = (path.clone(), case.format);
        std::thread::spawn(move || {
            let r = std::panic::catch_unwind(|| exercise(&p, f));
            let _ = tx.send(r);
        });
        let outcome = match rx.recv_timeout(Duration::from_secs(30)) {
            Err(_) => {
                failures.push(format!("{}: hung", case.name));
                continue;
            }
            Ok(Err(_)) => {
                failures.push(format!("{}: panicked", case.name));
                continue;
            }
            Ok(Ok(r)) => r,
        };
        if std::fs::read(&path).unwrap() != before {
            failures.push(format!("{}: a read-only open changed the file", case.name));
        }
        let file = path.file_name().unwrap().to_string_lossy().into_owned();
        match (&case.expect, outcome) {
            (Expect::Error(text), Err(msg)) => {
                if !msg.contains(text) {
                    failures.push(format!(
                        "{}: error {msg:?} does not say {text:?}",
                        case.name
                    ));
                }
                let names_a_file = msg.contains(&file)
                    || msg.contains(".qcow2")
                    || msg.contains(".vmdk")
                    || msg.contains(".vdi");
                if !names_a_file {
                    failures.push(format!("{}: error {msg:?} names no file", case.name));
                }
            }
            (Expect::Error(text), Ok(_)) => failures.push(format!(
                "{}: opened and read, expected an error about {text:?}",
                case.name
            )),
            (Expect::SameAsQemu, Ok(data)) => {
                match qemu_raw(&path, case.format, &dir.path().join("q.raw")) {
                    Some(q) if q == data => {}
                    Some(_) => {
                        failures.push(format!("{}: reads differently from qemu-img", case.name))
                    }
                    None => failures.push(format!(
                        "{}: qemu-img refuses it but it opened here",
                        case.name
                    )),
                }
            }
            (Expect::SameAsQemu, Err(msg)) => {
                if qemu_raw(&path, case.format, &dir.path().join("q.raw")).is_some() {
                    failures.push(format!("{}: qemu-img reads it but here: {msg}", case.name));
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        CASES.len(),
        failures.join("\n")
    );
}
