//! Images on block devices (a loop device over a sparse file): V2V writes a converted disk
//! straight onto an LVM volume or a LUN, and qcow2 lives on logical volumes. A device keeps its
//! length and what it held before, so nothing may count on it reading as zeroes.

mod common;

use common::{Env, MIB};
use std::process::Command;

/// A loop device over a sparse file, detached when dropped.
struct Loop {
    dev: String,
}

impl Loop {
    /// A `size`-byte loop device, or `None` (said loudly) where this machine cannot make one.
    fn new(env: &Env, size: u64) -> Option<Loop> {
        env.sparse_file("backing.img", size);
        let out = Command::new("losetup")
            .args(["-f", "--show"])
            .arg(env.path("backing.img"))
            .output();
        match out {
            Ok(o) if o.status.success() => Some(Loop {
                dev: String::from_utf8_lossy(&o.stdout).trim().to_owned(),
            }),
            other => {
                eprintln!(
                    "\n*** SKIPPED: no loop device here (losetup needs root and /dev/loop-control): \
                     {other:?} ***\n"
                );
                None
            }
        }
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.dev]).status();
    }
}

/// Fills the device with a byte that is not zero, as an old disk would be.
fn fill(dev: &str, byte: u8, len: u64) {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new().write(true).open(dev).unwrap();
    let chunk = vec![byte; usize::try_from(MIB).unwrap()];
    for _ in 0..len / MIB {
        f.write_all(&chunk).unwrap();
    }
    f.sync_all().unwrap();
}

/// The first `len` bytes of the device.
fn head(dev: &str, len: u64) -> Vec<u8> {
    let mut v = std::fs::read(dev).unwrap();
    v.truncate(usize::try_from(len).unwrap());
    v
}

#[test]
fn raw_and_qcow2_onto_a_block_device_like_qemu() {
    let env = Env::with_qemu();
    let Some(lo) = Loop::new(&env, 64 * MIB) else {
        return;
    };
    let dev = lo.dev.as_str();
    env.qemu_img(&["create", "-q", "-f", "qcow2", "src.qcow2", "32M"])
        .ok();
    env.qemu_io(
        "qcow2",
        "src.qcow2",
        &["write -P 0x17 1M 1M", "write -P 0x18 20M 64k"],
    );
    env.qemu_img(&["convert", "-O", "raw", "src.qcow2", "want.raw"])
        .ok();
    let want = env.read("want.raw");

    // A raw disk written onto an old device: the zeroes in it are written too (a new file would
    // read as zeroes; the device holds 0xa5 there). img read the device as 0 bytes long and
    // could not "create" it.
    for extra in [&[][..], &["-n"]] {
        fill(dev, 0xa5, 64 * MIB);
        let mut args = vec!["convert", "-O", "raw"];
        args.extend_from_slice(extra);
        args.extend(["src.qcow2", dev]);
        env.img(&args).ok();
        assert!(
            head(dev, 32 * MIB) == want,
            "convert {extra:?}: data differs"
        );
    }
    for args in [["info", "--output=json"], ["map", "--output=json"]] {
        let ours = env.img(&[args[0], args[1], "-f", "raw", dev]).ok();
        let theirs = env.qemu_img(&[args[0], args[1], "-f", "raw", dev]).ok();
        assert_eq!(ours.json(), theirs.json(), "{args:?}");
    }

    // What a device cannot do, refused in qemu-img's words; nothing is deleted.
    let refusals: &[&[&str]] = &[
        &["create", "-q", "-f", "raw", dev, "128M"],
        &["resize", "-f", "raw", dev, "128M"],
        &[
            "create",
            "-q",
            "-f",
            "luks",
            "--object",
            "secret,id=s,data=x",
            "-o",
            "key-secret=s,iter-time=1",
            dev,
            "1G",
        ],
    ];
    for args in refusals {
        let ours = env.img(args);
        let theirs = env.qemu_img(args);
        assert_eq!(ours.code, Some(1), "{ours}");
        assert_eq!(ours.code, theirs.code, "{ours}\n{theirs}");
        assert_eq!(
            ours.stderr.strip_prefix("img: "),
            theirs.stderr.strip_prefix("qemu-img: "),
            "{args:?}"
        );
        assert!(std::path::Path::new(dev).exists(), "{args:?} removed {dev}");
    }
    let vmdk = env.img(&["create", "-q", "-f", "vmdk", dev, "32M"]);
    assert_eq!(vmdk.code, Some(1), "{vmdk}");
    assert!(vmdk.stderr.contains("block device"), "{vmdk}");

    // qcow2 on a device full of old data: made, filled, checked and read by qemu-img.
    fill(dev, 0x5a, 64 * MIB);
    env.img(&["create", "-q", "-f", "qcow2", dev, "1G"]).ok();
    env.qemu_img(&["check", dev]).ok();
    env.img(&["convert", "-n", "-O", "qcow2", "src.qcow2", dev])
        .ok();
    env.qemu_img(&["check", dev]).ok();
    env.qemu_img(&["compare", "-F", "qcow2", "src.qcow2", dev])
        .ok();
    let ours = env.img(&["info", "--output=json", dev]).ok();
    let theirs = env.qemu_img(&["info", "--output=json", dev]).ok();
    assert_eq!(ours.json(), theirs.json());
}
