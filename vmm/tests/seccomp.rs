//! The seccomp filters, each tried in a child process (this test binary run again, with
//! `SECCOMP_CHILD` naming the case): a refused call stops the process with a message naming the
//! thread and the call; `log` lets it through; the I/O filter allows everything the block layer
//! does to an open image.

use std::process::Command;

use imgblock::{CreateOptions, Format, Image, OpenOptions};
use vmm::seccomp::{enter, Filters, Kind, Mode};

const CHILD: &str = "SECCOMP_CHILD";

/// Runs `test` of this binary in a child with `SECCOMP_CHILD=case`: (exit status, stderr).
fn child_status(test: &str, case: &str) -> (std::process::ExitStatus, String) {
    let out = Command::new(std::env::current_exe().unwrap())
        .args([test, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD, case)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    eprintln!("--- child {case} ---\n{err}");
    (out.status, err)
}

/// As [`child_status`], with the exit code.
fn child(test: &str, case: &str) -> (Option<i32>, String) {
    let (status, err) = child_status(test, case);
    (status.code(), err)
}

fn case() -> Option<String> {
    std::env::var(CHILD).ok()
}

#[test]
fn a_refused_call_stops_the_process_naming_thread_and_call() {
    if let Some(case) = case() {
        let mut parts = case.split('-');
        let kind = match parts.next() {
            Some("vcpu") => Kind::Vcpu,
            Some("io") => Kind::Io,
            Some("main") => Kind::Main,
            Some("console") => Kind::Console,
            Some("signals") => Kind::Signals,
            Some("api") => Kind::Api,
            _ => panic!("unknown case {case}"),
        };
        let mode = if parts.next() == Some("log") {
            Mode::Log
        } else {
            Mode::Enforce
        };
        let filters = Filters::new(mode).unwrap().with_vcpu_writes(&[]).unwrap();
        enter(&filters, kind).unwrap();
        // Only reached when the call was let through (or failed).
        let ok = if parts.next() == Some("open") {
            std::fs::File::open("/proc/self/status").is_ok()
        } else {
            std::net::UdpSocket::bind("127.0.0.1:0").is_ok()
        };
        std::process::exit(if ok { 42 } else { 43 });
    }
    let me = "a_refused_call_stops_the_process_naming_thread_and_call";
    for (kind, thread) in [
        ("vcpu", "vcpu"),
        ("io", "virtio-blk I/O"),
        ("main", "main"),
        ("console", "console"),
        ("signals", "signal"),
        ("api", "API"),
    ] {
        let (code, err) = child(me, &format!("{kind}-enforce-socket"));
        assert_eq!(code, Some(1), "{kind}: {err}");
        assert!(
            err.contains(&format!(
                "vmm: seccomp: the {thread} thread made system call {} (socket)",
                libc::SYS_socket
            )),
            "{kind}: {err}"
        );
        // Opening a file fails (EACCES), without stopping the process.
        let (code, err) = child(me, &format!("{kind}-enforce-open"));
        assert_eq!(code, Some(43), "{kind}: {err}");
        assert!(!err.contains("vmm: seccomp"), "{kind}: {err}");
    }
    // log: both go through (the kernel logs them).
    for what in ["socket", "open"] {
        let (code, err) = child(me, &format!("vcpu-log-{what}"));
        assert_eq!(code, Some(42), "{what}: {err}");
    }
}

#[test]
fn no_thread_may_start_a_program() {
    if let Some(case) = case() {
        let kind = match case.as_str() {
            "main" => Kind::Main,
            "io" => Kind::Io,
            "console" => Kind::Console,
            "signals" => Kind::Signals,
            "api" => Kind::Api,
            _ => Kind::Vcpu,
        };
        let filters = Filters::new(Mode::Enforce)
            .unwrap()
            .with_vcpu_writes(&[])
            .unwrap();
        enter(&filters, kind).unwrap();
        let r = Command::new("/bin/true").status();
        std::process::exit(if r.is_ok() { 42 } else { 43 });
    }
    for case in ["main", "io", "console", "signals", "api", "vcpu"] {
        let (status, err) = child_status("no_thread_may_start_a_program", case);
        // glibc blocks every signal around its clone, so the kernel may deliver the SIGSYS
        // with the default action (killed) rather than to the handler (message, exit 1).
        use std::os::unix::process::ExitStatusExt;
        let refused = (status.code() == Some(1) && err.contains("which its filter does not allow"))
            || status.signal() == Some(libc::SIGSYS);
        assert!(refused, "{case}: {status:?}: {err}");
    }
}

#[test]
fn a_vcpu_writes_to_its_descriptors_and_to_no_image() {
    use std::io::Write as _;
    use std::os::fd::AsRawFd as _;
    if let Some(case) = case() {
        if case == "unbuilt" {
            // Filters without the vCPUs' own: a vCPU thread refuses to run unconfined.
            let filters = Filters::new(Mode::Enforce).unwrap();
            let r = vmm::seccomp::spawn("vcpu0", &filters, Kind::Vcpu, || ());
            eprintln!("spawn: {:?}", r.as_ref().err());
            std::process::exit(if r.is_err() { 42 } else { 43 });
        }
        // The image, opened for writing as the VMM opens its disks: file position 0.
        let image = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&case)
            .unwrap();
        let (_rx, tx) = std::io::pipe().unwrap();
        let filters = Filters::new(Mode::Enforce)
            .unwrap()
            .with_vcpu_writes(&[tx.as_raw_fd()])
            .unwrap();
        let t = vmm::seccomp::spawn("vcpu0", &filters, Kind::Vcpu, move || {
            let r = (&tx).write_all(b"kick");
            eprintln!("write to its own descriptor: {r:?}");
            let r = (&image).write_all(b"not a header");
            eprintln!("write to the image: {r:?}");
        })
        .unwrap();
        let _ = t.join();
        std::process::exit(42);
    }
    let me = "a_vcpu_writes_to_its_descriptors_and_to_no_image";
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.raw");
    std::fs::write(&image, [0x5a; 4096]).unwrap();
    let (code, err) = child(me, image.to_str().unwrap());
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("write to its own descriptor: Ok(())"), "{err}");
    assert!(
        err.contains(&format!(
            "vmm: seccomp: the vcpu thread made system call {} (write)",
            libc::SYS_write
        )),
        "{err}"
    );
    assert!(!err.contains("write to the image"), "{err}");
    assert_eq!(std::fs::read(&image).unwrap(), [0x5a; 4096]);
    let (code, err) = child(me, "unbuilt");
    assert_eq!(code, Some(42), "{err}");
    assert!(
        err.contains("no seccomp filter for the vcpu thread"),
        "{err}"
    );
}

/// Writes, reads back, zeroes, discards and flushes through `img`, checking the data.
fn exercise(img: &Image, size: u64) {
    let pat: Vec<u8> = (0..256 * 1024u32).map(|i| (i * 7 % 251) as u8).collect();
    let mut off = 0;
    while off + pat.len() as u64 <= size {
        img.write_at(&pat, off).unwrap();
        off += 3 * pat.len() as u64;
    }
    let mut back = vec![0u8; pat.len()];
    img.read_at(&mut back, 0).unwrap();
    assert_eq!(back, pat);
    img.write_zeroes(0, 64 * 1024, true).unwrap();
    img.write_zeroes(64 * 1024, 64 * 1024, false).unwrap();
    img.discard(3 * pat.len() as u64, pat.len() as u64).unwrap();
    img.read_at(&mut back, 0).unwrap();
    assert!(back[..128 * 1024].iter().all(|&b| b == 0));
    assert_eq!(back[128 * 1024..], pat[128 * 1024..]);
    img.flush().unwrap();
}

/// A streamOptimized vmdk takes writes in order only: its grains are compressed as they pass.
fn exercise_stream(img: &Image, size: u64) {
    let pat: Vec<u8> = (0..256 * 1024u32).map(|i| (i * 7 % 251) as u8).collect();
    let mut off = 0;
    while off + pat.len() as u64 <= size {
        img.write_at(&pat, off).unwrap();
        off += pat.len() as u64;
    }
    img.flush().unwrap();
    let mut back = vec![0u8; pat.len()];
    img.read_at(&mut back, size / 2).unwrap();
    assert_eq!(back, pat);
}

#[test]
fn the_io_filter_allows_what_the_block_layer_does_to_an_open_image() {
    if let Some(case) = case() {
        let dir = std::env::var("SECCOMP_DIR").unwrap();
        let (fmt, direct) = match case.as_str() {
            "qcow2" => (Format::Qcow2, false),
            "qcow2-direct" => (Format::Qcow2, true),
            "raw" => (Format::Raw, false),
            "vmdk" | "vmdk-stream" => (Format::Vmdk, false),
            "vdi" => (Format::Vdi, false),
            _ => panic!("unknown case {case}"),
        };
        let path = std::path::Path::new(&dir).join(format!("disk.{case}"));
        let size = 16u64 << 20;
        let mut opts = CreateOptions::new(size);
        if case == "vmdk-stream" {
            opts.parse_opts("subformat=streamOptimized").unwrap();
        }
        imgblock::create(&path, fmt, &opts).unwrap();
        let o = OpenOptions::writable().format(Some(fmt));
        let img = if direct {
            Image::open_direct(&path, &o, &Default::default()).unwrap()
        } else {
            Image::open(&path, &o).unwrap()
        };
        let filters = Filters::new(Mode::Enforce).unwrap();
        // On a thread of its own, as the VMM's I/O threads; the main thread then closes.
        let img = std::sync::Arc::new(img);
        let i2 = std::sync::Arc::clone(&img);
        let stream = case == "vmdk-stream";
        let t = vmm::seccomp::spawn("io", &filters, Kind::Io, move || {
            if stream {
                exercise_stream(&i2, size)
            } else {
                exercise(&i2, size)
            }
        })
        .unwrap();
        assert_eq!(t.join().unwrap(), Some(()));
        enter(&filters, Kind::Main).unwrap();
        drop(img);
        std::process::exit(0);
    }
    let dir = tempfile::tempdir().unwrap();
    for case in ["qcow2", "qcow2-direct", "raw", "vmdk", "vmdk-stream", "vdi"] {
        let out = Command::new(std::env::current_exe().unwrap())
            .args([
                "the_io_filter_allows_what_the_block_layer_does_to_an_open_image",
                "--exact",
                "--nocapture",
            ])
            .env(CHILD, case)
            .env("SECCOMP_DIR", dir.path())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{case}: {err}");
        if case == "vmdk-stream" {
            // Its 16 MiB of a repeating pattern went through deflate in the filtered thread.
            let len = std::fs::metadata(dir.path().join("disk.vmdk-stream"))
                .unwrap()
                .len();
            assert!(len < 1 << 20, "stream of {len} bytes");
        }
        if Command::new("qemu-img").arg("--version").output().is_ok() {
            let fmt = case.split('-').next().unwrap_or(case);
            let c = Command::new("qemu-img")
                .args(["check", "-f", fmt])
                .arg(dir.path().join(format!("disk.{case}")))
                .output()
                .unwrap();
            // raw has no check (63); every other format must be clean.
            assert!(
                matches!(c.status.code(), Some(0 | 63)),
                "{case}: {}",
                String::from_utf8_lossy(&c.stdout)
            );
        } else {
            eprintln!("SKIPPED qemu-img check: qemu-img not installed");
        }
    }
}
