//! Image locks interoperate with qemu's: a running qemu-io keeps `img` from writing (and from
//! reading without -U), and an image open for writing here keeps qemu-img out.

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use imgblock::{create, CreateOptions, Format, Image, OpenOptions};

fn qemu_available() {
    assert!(
        Command::new("qemu-io").arg("--version").output().is_ok(),
        "qemu-io is needed for this test and could not run"
    );
}

#[test]
fn running_qemu_io_locks_out_writers_and_plain_readers() {
    qemu_available();
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("l.qcow2");
    create(&p, Format::Qcow2, &CreateOptions::new(1 << 20)).unwrap();
    // qemu-io in interactive mode keeps the image open for writing until stdin closes.
    let mut child = Command::new("qemu-io")
        .arg(&p)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // qemu-io prints its prompt once the image is open and locked.
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
    child.stdin.take().unwrap().write_all(b"quit\n").unwrap();
    child.wait().unwrap();
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
