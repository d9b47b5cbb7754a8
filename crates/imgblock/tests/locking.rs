//! Image locks interoperate with qemu's: a running qemu-io keeps `img` from writing (and from
//! reading without -U), and an image open for writing here keeps qemu-img out.

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use imgblock::{create, CreateOptions, Format, Image, OpenOptions};

fn qemu_available() {
    assert!(
        Command::new("qemu-io").arg("--version").output().is_ok(),
        "qemu-io is needed for this test and could not run"
    );
}

/// Starts qemu-io in interactive mode on `p`: it keeps the image open for writing, locked,
/// until [`release`]. Returns once qemu-io shows its prompt (the image is open by then).
fn hold(p: &Path) -> Child {
    let mut child = Command::new("qemu-io")
        .arg(p)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut out = child.stdout.take().unwrap();
    let mut seen = Vec::new();
    let mut byte = [0u8; 1];
    let deadline = Instant::now() + Duration::from_secs(20);
    while !String::from_utf8_lossy(&seen).contains("qemu-io>") {
        assert!(Instant::now() < deadline, "qemu-io never showed its prompt");
        if out.read(&mut byte).unwrap() == 0 {
            panic!(
                "qemu-io exited before its prompt: {}",
                String::from_utf8_lossy(&seen)
            );
        }
        seen.push(byte[0]);
    }
    child
}

/// Ends a [`hold`].
fn release(child: &mut Child) {
    child.stdin.take().unwrap().write_all(b"quit\n").unwrap();
    child.wait().unwrap();
}

/// Runs qemu-io's commands on `p` (format `fmt`), asserting success.
fn qemu_io(fmt: &str, p: &Path, cmds: &[&str]) {
    let mut c = Command::new("qemu-io");
    c.args(["-f", fmt]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    let out = c.arg(p).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && !text.contains("failed"),
        "qemu-io {cmds:?} on {}: {text}{}",
        p.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn running_qemu_io_locks_out_writers_and_plain_readers() {
    qemu_available();
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("l.qcow2");
    create(&p, Format::Qcow2, &CreateOptions::new(1 << 20)).unwrap();
    let mut child = hold(&p);
    let err = Image::open(&p, &OpenOptions::writable()).expect_err("a second writer got in");
    let msg = err.to_string();
    assert!(matches!(err, imgblock::Error::Locked { .. }), "{msg}");
    assert!(
        msg.contains("Failed to get \"write\" lock")
            && msg.contains("Is another process using the image"),
        "{msg}"
    );
    // A plain reader refuses to let others write, which qemu-io does: refused too.
    assert!(matches!(
        Image::open(&p, &OpenOptions::read_only()),
        Err(imgblock::Error::Locked { shared: true, .. })
    ));
    // With force-share (-U) it reads.
    let img = Image::open(
        &p,
        &OpenOptions {
            force_share: true,
            ..OpenOptions::read_only()
        },
    )
    .unwrap();
    let mut b = [1u8; 512];
    img.read_at(&mut b, 0).unwrap();
    drop(img);
    release(&mut child);
    assert!(Image::open(&p, &OpenOptions::writable()).is_ok());
}

#[test]
fn open_writer_keeps_qemu_img_out() {
    qemu_available();
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("w.qcow2");
    create(&p, Format::Qcow2, &CreateOptions::new(1 << 20)).unwrap();
    let img = Image::open(&p, &OpenOptions::writable()).unwrap();
    let out = Command::new("qemu-io")
        .args(["-c", "write 0 512"])
        .arg(&p)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("lock"), "{err}");
    let out = Command::new("qemu-img")
        .args(["info", "-U"])
        .arg(&p)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    drop(img);
    let out = Command::new("qemu-io")
        .args(["-c", "write 0 512"])
        .arg(&p)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Creating an image over one another process has open (a running VM) is refused before the
/// file is touched, as qemu's file driver does: its data is still there. (qemu-io shares write
/// access to a raw image, so qemu lets a raw image it holds be created over; raw is covered by
/// the next test.)
#[test]
fn create_over_an_image_in_use_is_refused_and_leaves_it_intact() {
    qemu_available();
    let dir = tempfile::tempdir().unwrap();
    for (fmt, format) in [
        ("qcow2", Format::Qcow2),
        ("vmdk", Format::Vmdk),
        ("vdi", Format::Vdi),
    ] {
        let p = dir.path().join(format!("busy.{fmt}"));
        create(&p, format, &CreateOptions::new(4 << 20)).unwrap();
        qemu_io(fmt, &p, &["write -P 0xab 0 1M"]);
        let len = std::fs::metadata(&p).unwrap().len();
        let mut child = hold(&p);
        for f in [Format::Qcow2, Format::Raw, format] {
            let err = create(&p, f, &CreateOptions::new(8 << 20))
                .expect_err(&format!("created {f:?} over a busy {fmt}"));
            assert!(
                matches!(err, imgblock::Error::Locked { .. }),
                "{fmt}: {err}"
            );
        }
        release(&mut child);
        assert_eq!(std::fs::metadata(&p).unwrap().len(), len, "{fmt}");
        qemu_io(fmt, &p, &["read -P 0xab 0 1M"]);
        // Once it is free, it can be created over.
        create(&p, Format::Qcow2, &CreateOptions::new(1 << 20)).unwrap();
    }
}

/// An image this process reads (a convert's source) cannot be created over either.
#[test]
fn create_over_an_image_open_here_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("src.raw");
    std::fs::write(&p, [0x5au8; 4096]).unwrap();
    let src = Image::open(&p, &OpenOptions::read_only()).unwrap();
    let err = create(&p, Format::Raw, &CreateOptions::new(4096)).expect_err("created over it");
    assert!(matches!(err, imgblock::Error::Locked { .. }), "{err}");
    drop(src);
    assert_eq!(std::fs::read(&p).unwrap(), [0x5au8; 4096]);
}

/// Sharing every permission (-U) is for readers: a writable open with it is refused with
/// qemu's words, and nothing is written.
#[test]
fn writable_open_with_force_share_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("f.qcow2");
    create(&p, Format::Qcow2, &CreateOptions::new(1 << 20)).unwrap();
    let before = std::fs::read(&p).unwrap();
    let err = Image::open(
        &p,
        &OpenOptions {
            force_share: true,
            ..OpenOptions::writable()
        },
    )
    .expect_err("a writer shared everything");
    assert!(
        matches!(err, imgblock::Error::ForceShareWritable { .. }),
        "{err}"
    );
    assert_eq!(
        err.to_string(),
        "force-share=on can only be used with read-only images"
    );
    assert_eq!(std::fs::read(&p).unwrap(), before);
}
