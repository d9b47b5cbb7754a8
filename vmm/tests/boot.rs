//! Boots the test guest (vmm/test-guest, built by build.rs) under real KVM against images of
//! every format the block layer can create, then judges the images with qemu-img: what the
//! guest wrote is there, `qemu-img check` is clean, read-only and snapshot=on disks are
//! untouched. Without /dev/kvm the tests say loudly why they skip.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use imgblock::{CreateOptions, Format, Image, OpenOptions};

const GUEST: &str = env!("VMM_TEST_GUEST");
/// The same guest with a PVH note: the VMM enters it through its 32-bit PVH entry.
const GUEST_PVH: &str = env!("VMM_TEST_GUEST_PVH");
const VMM: &str = env!("CARGO_BIN_EXE_vmm");
const SIZE: u64 = 16 << 20;

/// The guest's data pattern (test-guest/src/blk.rs): every u64 in a 4 KiB block has one value.
fn pattern(seed: u64, off: u64) -> u64 {
    if seed == 0 {
        return 0;
    }
    (off / 4096 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ seed.wrapping_mul(0xd1b5_4a32_d192_ed03)
}

fn pattern_bytes(seed: u64, off: u64, len: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(usize::try_from(len).unwrap());
    for o in (off..off + len).step_by(8) {
        v.extend_from_slice(&pattern(seed, o).to_le_bytes());
    }
    v
}

/// The guest's writes in read-write mode (test-guest/src/blk.rs `writes`): seed 0 is
/// WRITE_ZEROES, `u64::MAX` DISCARD.
fn guest_writes(size: u64) -> Vec<(u64, u64, u64)> {
    let mut w = vec![
        (1 << 20, 192 << 10, 2),
        (0, 4096, 2),
        (size - 4096, 4096, 2),
    ];
    for k in 1..16u64 {
        w.push(((size / 16 * k) & !0xffff, 64 << 10, 2));
    }
    w.push((3 << 19, 128 << 10, 0));
    w.push((7 << 18, 256 << 10, u64::MAX));
    w
}

/// Checks `data` against pattern 1 with the guest's writes applied; discarded blocks may read
/// as the old data or as zeroes.
fn assert_guest_wrote(data: &[u8]) {
    let size = data.len() as u64;
    let mut want = pattern_bytes(1, 0, size);
    let mut discarded = Vec::new();
    for (o, l, seed) in guest_writes(size) {
        if seed == u64::MAX {
            discarded.push((o, o + l));
            continue;
        }
        let (a, b) = (usize::try_from(o).unwrap(), usize::try_from(o + l).unwrap());
        want[a..b].copy_from_slice(&pattern_bytes(seed, o, l));
    }
    for blk in (0..size).step_by(4096) {
        let r = usize::try_from(blk).unwrap()..usize::try_from(blk + 4096).unwrap();
        if data[r.clone()] == want[r.clone()] {
            continue;
        }
        let in_discard = discarded.iter().any(|&(a, b)| blk >= a && blk < b);
        assert!(
            in_discard && data[r.clone()].iter().all(|&x| x == 0),
            "block at {blk:#x} holds neither what the guest wrote nor the original"
        );
    }
}

fn kvm_usable() -> bool {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => true,
        Err(e) => {
            eprintln!(
                "\n*** SKIPPED: /dev/kvm is not usable ({e}); the vmm boot tests need KVM. ***\n"
            );
            false
        }
    }
}

fn qemu_img() -> bool {
    if Command::new("qemu-img").arg("--version").output().is_ok() {
        true
    } else {
        eprintln!("\n*** SKIPPED: qemu-img is not installed; it judges the images. ***\n");
        false
    }
}

/// Formats the block layer can create, saying loudly which it cannot.
fn creatable_formats(dir: &Path) -> Vec<Format> {
    let mut v = Vec::new();
    for f in [Format::Raw, Format::Qcow2, Format::Vmdk, Format::Vdi] {
        let p = dir.join(format!("probe.{f}"));
        let r = imgblock::create(&p, f, &CreateOptions::new(1 << 20))
            .and_then(|()| Image::open(&p, &OpenOptions::writable().format(Some(f))))
            .and_then(|img| img.write_at(&[1u8; 512], 0));
        match r {
            Ok(()) => v.push(f),
            Err(e) => eprintln!(
                "*** format {f} SKIPPED: the block layer cannot create, open and write it yet ({e}) ***"
            ),
        }
        let _ = std::fs::remove_file(&p);
    }
    v
}

/// Creates an image of `format` holding pattern 1 on `[from, to)` (zeroes elsewhere).
fn make_image(path: &Path, format: Format, from: u64, to: u64, backing: Option<&Path>) {
    let mut opts = CreateOptions::new(SIZE);
    if let Some(b) = backing {
        opts.backing_file = Some(b.to_string_lossy().into_owned());
        opts.backing_fmt = Some("raw".into());
    }
    imgblock::create(path, format, &opts).unwrap();
    let img = Image::open(path, &OpenOptions::writable().format(Some(format))).unwrap();
    for off in (from..to).step_by(1 << 20) {
        img.write_at(&pattern_bytes(1, off, 1 << 20), off).unwrap();
    }
    img.flush().unwrap();
}

fn run_vmm(disks: &[String], cmdline: &str, cpus: u8, tmp: &Path) -> Output {
    run_vmm_with(&[], disks, cmdline, cpus, tmp)
}

/// As [`run_vmm`], with `extra` arguments (`--object` definitions) first.
fn run_vmm_with(extra: &[&str], disks: &[String], cmdline: &str, cpus: u8, tmp: &Path) -> Output {
    run_kernel(GUEST, extra, disks, cmdline, cpus, tmp)
}

/// Runs `kernel` with `extra` arguments and the disks; `VMM_REPORT` makes the VMM say on
/// stderr which entry it used.
fn run_kernel(
    kernel: &str,
    extra: &[&str],
    disks: &[String],
    cmdline: &str,
    cpus: u8,
    tmp: &Path,
) -> Output {
    let mut c = Command::new(VMM);
    c.args(extra);
    c.args([
        "--kernel",
        kernel,
        "--memory",
        "128M",
        "--cpus",
        &cpus.to_string(),
    ]);
    c.args(["--cmdline", cmdline, "--serial", "stdio"]);
    for d in disks {
        c.args(["--disk", d]);
    }
    c.env("TMPDIR", tmp).env("VMM_REPORT", "1");
    c.stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = c.spawn().unwrap();
    // A guest that never gets an interrupt would halt forever: give it a deadline.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(180);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    eprintln!(
        "--- vmm stdout ---\n{}\n--- vmm stderr ---\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The guest's verdict: exit 0 and "N passed, 0 failed" with N > 0.
fn assert_guest_passed(out: &Output) -> u32 {
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "vmm exited with {:?}", out.status);
    let line = s
        .lines()
        .find(|l| l.trim_end().ends_with(" failed") && l.contains(" passed, "))
        .expect("no 'N passed, M failed' line");
    let mut it = line.split_whitespace();
    let passed: u32 = it.next().unwrap().parse().unwrap();
    let failed: u32 = it.nth(1).unwrap().parse().unwrap();
    assert_eq!(failed, 0, "guest reported failures");
    assert!(passed > 20, "suspiciously few guest checks: {passed}");
    assert!(!s.contains("FAIL") && !s.contains("PANIC") && !s.contains("CPU exception"));
    passed
}

fn to_raw(img: &Path, fmt: Format, dir: &Path) -> Vec<u8> {
    let out = dir.join("converted.raw");
    let st = Command::new("qemu-img")
        .args(["convert", "-f", fmt.name(), "-O", "raw"])
        .arg(img)
        .arg(&out)
        .status()
        .unwrap();
    assert!(st.success(), "qemu-img convert failed");
    std::fs::read(&out).unwrap()
}

fn qemu_check_clean(img: &Path, fmt: Format) {
    if fmt == Format::Raw {
        return;
    }
    let out = Command::new("qemu-img")
        .args(["check", "-f", fmt.name()])
        .arg(img)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "qemu-img check: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn setup() -> Option<tempfile::TempDir> {
    if !kvm_usable() || !qemu_img() {
        return None;
    }
    Some(tempfile::tempdir().unwrap())
}

#[test]
fn guest_writes_every_creatable_format_seen_by_qemu_img() {
    let Some(dir) = setup() else { return };
    let formats = creatable_formats(dir.path());
    assert!(formats.contains(&Format::Raw) && formats.contains(&Format::Qcow2));
    for fmt in formats {
        eprintln!("=== format {fmt} ===");
        let img = dir.path().join(format!("disk.{fmt}"));
        make_image(&img, fmt, 0, SIZE, None);
        let spec = format!("path={},format={fmt},serial=vmm-{fmt}", img.display());
        let out = run_vmm(
            &[spec],
            &format!("console=ttyS0 tg.id0=vmm-{fmt}"),
            2,
            dir.path(),
        );
        assert_guest_passed(&out);
        let s = String::from_utf8_lossy(&out.stdout);
        assert!(s.contains("MADT: 2 CPUs"), "two vCPUs in the MADT");
        assert!(s.contains("test-guest: booted via the Linux 64-bit entry"));
        assert!(String::from_utf8_lossy(&out.stderr).contains("(ELF, 64-bit entry, zero page)"));
        qemu_check_clean(&img, fmt);
        assert_guest_wrote(&to_raw(&img, fmt, dir.path()));
    }
}

#[test]
fn guest_writes_qcow2_overlay_over_raw_backing_chain() {
    let Some(dir) = setup() else { return };
    // The base holds the first half, the overlay the second: the guest must see both.
    let base = dir.path().join("base.raw");
    make_image(&base, Format::Raw, 0, SIZE / 2, None);
    let before = std::fs::read(&base).unwrap();
    let top = dir.path().join("top.qcow2");
    make_image(&top, Format::Qcow2, SIZE / 2, SIZE, Some(&base));
    // Two queues of Cloud Hypervisor's queue_size: the guest reads through both and writes
    // through the first, using as many descriptors as it likes within the offer.
    let spec = format!(
        "path={},format=qcow2,cache=writeback,discard=unmap,num_queues=2,queue_size=1024",
        top.display()
    );
    let out = run_vmm(&[spec], "console=ttyS0", 1, dir.path());
    assert_guest_passed(&out);
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(s.contains("ok - MQ: reads split over two queues return the disk's data"));
    assert!(s.contains("ok - queue: MQ offers num_queues queues and no more"));
    qemu_check_clean(&top, Format::Qcow2);
    assert_guest_wrote(&to_raw(&top, Format::Qcow2, dir.path()));
    assert_eq!(
        std::fs::read(&base).unwrap(),
        before,
        "backing file modified"
    );
}

#[test]
fn guest_writes_into_compressed_qcow2() {
    let Some(dir) = setup() else { return };
    let raw = dir.path().join("src.raw");
    make_image(&raw, Format::Raw, 0, SIZE, None);
    let comp = dir.path().join("comp.qcow2");
    let st = Command::new("qemu-img")
        .args(["convert", "-c", "-f", "raw", "-O", "qcow2"])
        .arg(&raw)
        .arg(&comp)
        .status()
        .unwrap();
    assert!(st.success());
    let spec = format!("path={},format=qcow2,cache=directsync", comp.display());
    let out = run_vmm(&[spec], "console=ttyS0", 1, dir.path());
    assert_guest_passed(&out);
    qemu_check_clean(&comp, Format::Qcow2);
    assert_guest_wrote(&to_raw(&comp, Format::Qcow2, dir.path()));
}

#[test]
fn readonly_disks_refuse_writes_and_stay_untouched() {
    let Some(dir) = setup() else { return };
    let raw = dir.path().join("ro.raw");
    make_image(&raw, Format::Raw, 0, SIZE, None);
    let q = dir.path().join("ro.qcow2");
    make_image(&q, Format::Qcow2, 0, SIZE, None);
    let (a, b) = (std::fs::read(&raw).unwrap(), std::fs::read(&q).unwrap());
    let specs = [
        format!("path={},format=raw,readonly=on", raw.display()),
        format!("path={},format=qcow2,readonly=on", q.display()),
    ];
    let out = run_vmm(
        &specs,
        "console=ttyS0 tg.mode0=ro tg.mode1=ro",
        1,
        dir.path(),
    );
    assert_guest_passed(&out);
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(s.contains("ok - read-only: OUT -> IOERR"));
    assert_eq!(std::fs::read(&raw).unwrap(), a);
    assert_eq!(std::fs::read(&q).unwrap(), b);
}

#[test]
fn serial_log_file_holds_the_console_of_two_vcpus() {
    // The log's descriptor is one of the few a vCPU's seccomp filter lets it write to.
    let Some(dir) = setup() else { return };
    let raw = dir.path().join("disk.raw");
    make_image(&raw, Format::Raw, 0, SIZE, None);
    let log = dir.path().join("console.log");
    let out = Command::new(VMM)
        .args(["--kernel", GUEST, "--memory", "128M", "--cpus", "2"])
        .args(["--cmdline", "console=ttyS0"])
        .arg("--serial")
        .arg(format!("file:{}", log.display()))
        .arg("--disk")
        .arg(format!("path={},format=raw", raw.display()))
        .output()
        .unwrap();
    let console = std::fs::read(&log).unwrap_or_default();
    eprintln!(
        "--- console.log ---\n{}\n--- vmm stderr ---\n{}",
        String::from_utf8_lossy(&console),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.stdout.is_empty(), "the console went to the log alone");
    assert_guest_passed(&Output {
        stdout: console,
        ..out
    });
    assert_guest_wrote(&std::fs::read(&raw).unwrap());
}

#[test]
fn snapshot_on_leaves_image_untouched_and_removes_overlay() {
    let Some(dir) = setup() else { return };
    let tmp = dir.path().join("tmp");
    std::fs::create_dir(&tmp).unwrap();
    let q = dir.path().join("snap.qcow2");
    make_image(&q, Format::Qcow2, 0, SIZE, None);
    let raw = dir.path().join("snap.raw");
    make_image(&raw, Format::Raw, 0, SIZE, None);
    let j = dir.path().join("snap-json.qcow2");
    make_image(&j, Format::Qcow2, 0, SIZE, None);
    let (a, b) = (std::fs::read(&q).unwrap(), std::fs::read(&raw).unwrap());
    let c = std::fs::read(&j).unwrap();
    // A json: name (its commas doubled in the option list) is the overlay's base as it is.
    let json = format!(
        r#"json:{{"driver":"qcow2",,"file":{{"driver":"file",,"filename":"{}"}}}}"#,
        j.display()
    );
    let specs = [
        format!("path={},format=qcow2,snapshot=on", q.display()),
        format!("path={},format=raw,snapshot=on,cache=unsafe", raw.display()),
        format!("path={json},snapshot=on"),
    ];
    let out = run_vmm(&specs, "console=ttyS0", 1, &tmp);
    // The guest wrote (its read-back checks passed) but only to the overlays.
    assert_guest_passed(&out);
    assert_eq!(
        std::fs::read(&q).unwrap(),
        a,
        "snapshot=on modified the qcow2 image"
    );
    assert_eq!(
        std::fs::read(&raw).unwrap(),
        b,
        "snapshot=on modified the raw image"
    );
    assert_eq!(
        std::fs::read(&j).unwrap(),
        c,
        "snapshot=on modified the image named by json:"
    );
    assert_eq!(
        std::fs::read_dir(&tmp).unwrap().count(),
        0,
        "overlay left behind"
    );
    qemu_check_clean(&q, Format::Qcow2);
}

/// qemu-img's `--image-opts` name of a LUKS-encrypted qcow2 with secret `s0`.
fn luks_opts(img: &Path) -> String {
    format!(
        "driver=qcow2,file.filename={},encrypt.key-secret=s0",
        img.display()
    )
}

#[test]
fn guest_writes_luks_qcow2_with_cache_none_seen_by_qemu_img() {
    let Some(dir) = setup() else { return };
    let img = dir.path().join("luks.qcow2");
    let secret = "secret,id=s0,data=vmm-passphrase";
    let st = Command::new("qemu-img")
        .args(["create", "-q", "--object", secret, "-f", "qcow2", "-o"])
        .arg("encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10")
        .arg(&img)
        .arg(SIZE.to_string())
        .status()
        .unwrap();
    assert!(st.success(), "qemu-img create");
    {
        let secrets = imgblock::crypto::Secrets::all("vmm-passphrase".into());
        let i = Image::open_with_secrets(&img, &OpenOptions::writable(), &secrets).unwrap();
        for off in (0..SIZE).step_by(1 << 20) {
            i.write_at(&pattern_bytes(1, off, 1 << 20), off).unwrap();
        }
        i.flush().unwrap();
    }
    let disk = format!(
        "path={},format=qcow2,encrypt.key-secret=s0,cache=none",
        img.display()
    );

    // Without the secret, and with a wrong one, the VMM refuses to start, naming the image.
    let out = run_vmm(std::slice::from_ref(&disk), "console=ttyS0", 1, dir.path());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(err.contains("No secret with id 's0'"), "{err}");
    let wrong = ["--object", "secret,id=s0,data=not-it"];
    let out = run_vmm_with(
        &wrong,
        std::slice::from_ref(&disk),
        "console=ttyS0",
        1,
        dir.path(),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(err.contains(&img.display().to_string()), "{err}");

    let out = run_vmm_with(
        &["--object", secret],
        &[disk],
        "console=ttyS0",
        1,
        dir.path(),
    );
    assert_guest_passed(&out);

    let raw = dir.path().join("luks.raw");
    let st = Command::new("qemu-img")
        .args([
            "convert",
            "--object",
            secret,
            "--image-opts",
            &luks_opts(&img),
        ])
        .args(["-O", "raw"])
        .arg(&raw)
        .status()
        .unwrap();
    assert!(st.success(), "qemu-img convert with the secret");
    assert_guest_wrote(&std::fs::read(&raw).unwrap());
    let out = Command::new("qemu-img")
        .args([
            "check",
            "--object",
            secret,
            "--image-opts",
            &luks_opts(&img),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "qemu-img check: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    // What the guest wrote is not on the disk in the clear.
    let file = std::fs::read(&img).unwrap();
    let probe = pattern_bytes(1, 3 << 20, 64);
    assert!(!file.windows(64).any(|w| w == probe), "plaintext on disk");
}

#[test]
fn bad_arguments_and_missing_files_fail_clearly() {
    let out = Command::new(VMM).arg("--help").output().unwrap();
    assert!(out.status.success());
    let out = Command::new(VMM)
        .args([
            "--kernel",
            GUEST,
            "--disk",
            "path=/nonexistent/x.img,format=raw",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/x.img"));
    let out = Command::new(VMM)
        .args(["--kernel", GUEST, "--disk", "path=x,cache=sometimes"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cache=sometimes"));
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk");
    std::fs::write(&junk, b"not a kernel at all").unwrap();
    let out = Command::new(VMM)
        .args(["--kernel"])
        .arg(&junk)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a loadable kernel"));
}

#[test]
fn image_locked_while_guest_runs() {
    let Some(dir) = setup() else { return };
    let img = dir.path().join("locked.qcow2");
    make_image(&img, Format::Qcow2, 0, SIZE, None);
    // Hold the image in one vmm (the guest runs several seconds) and try a second.
    let spec = format!("path={},format=qcow2", img.display());
    let mut first = Command::new(VMM)
        .args([
            "--kernel", GUEST, "--memory", "64M", "--serial", "none", "--disk", &spec,
        ])
        .spawn()
        .unwrap();
    let mut conflict = None;
    for _ in 0..100 {
        std::thread::sleep(std::time::Duration::from_millis(20));
        let out = Command::new("qemu-img")
            .args(["info", "-f", "qcow2"])
            .arg(&img)
            .output()
            .unwrap();
        if !out.status.success() {
            conflict = Some(String::from_utf8_lossy(&out.stderr).into_owned());
            break;
        }
    }
    let st = first.wait().unwrap();
    assert!(st.success());
    let msg = conflict.expect("qemu-img never saw the lock while vmm ran");
    assert!(msg.contains("lock"), "{msg}");
    let _: PathBuf = img;
}

#[test]
fn bench_mode_reads_the_whole_disk_at_every_queue_depth() {
    let Some(dir) = setup() else { return };
    let img = dir.path().join("bench.raw");
    make_image(&img, Format::Raw, 0, SIZE, None);
    let spec = format!("path={},format=raw,readonly=on,num_queues=2", img.display());
    let out = run_vmm(&[spec], "console=ttyS0 tg.mode0=bench", 1, dir.path());
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "vmm exited with {:?}", out.status);
    assert!(s.contains(" passed, 0 failed"), "guest reported failures");
    assert!(s.contains("ok - bench: every request completed OK"));
    let keys = [1, 8, 32, 64]
        .map(|d| format!("reads, queue depth {d}: "))
        .into_iter()
        .chain([1, 8, 32, 64].map(|d| format!("reads, polled from ring 3, queue depth {d}: ")))
        .chain([8, 32, 64].map(|d| format!("reads, 2 queues, queue depth {d}: ")));
    for key in keys {
        let line = s.lines().find(|l| l.contains(&key)).expect("bench line");
        let rate: u64 = line
            .split(&key)
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .expect("a rate");
        assert!(rate > 0, "{line}");
    }
    for polled in ["", "polled from ring 3, "] {
        let key = format!("random 4 KiB reads, {polled}queue depth 1: ");
        let line = s.lines().find(|l| l.contains(&key)).expect("bench line");
        let iops: u64 = line
            .rsplit(", ")
            .next()
            .and_then(|r| r.strip_suffix(" IOPS"))
            .and_then(|n| n.parse().ok())
            .expect("IOPS");
        assert!(iops > 0, "{line}");
    }
}

/// FNV-1a, as the guest hashes the initramfs it was given.
fn fnv1a(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// The guest's line starting with `prefix`.
fn line_with<'a>(out: &'a str, prefix: &str) -> &'a str {
    out.lines()
        .find(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("no line starting with {prefix:?}"))
}

#[test]
fn pvh_guest_boots_through_pvh_entry_and_writes_raw_and_qcow2() {
    let Some(dir) = setup() else { return };
    let raw = dir.path().join("pvh.raw");
    make_image(&raw, Format::Raw, 0, SIZE, None);
    let q = dir.path().join("pvh.qcow2");
    make_image(&q, Format::Qcow2, 0, SIZE, None);
    // An initramfs of an odd size: PVH hands it over as module 0.
    let initrd = dir.path().join("initrd.img");
    let data: Vec<u8> = (0..70_001u32)
        .map(|i| u8::try_from(i % 253).unwrap())
        .collect();
    std::fs::write(&initrd, &data).unwrap();
    let initrd_arg = initrd.to_string_lossy().into_owned();
    let specs = [
        format!("path={},format=raw", raw.display()),
        format!("path={},format=qcow2", q.display()),
    ];
    let out = run_kernel(
        GUEST_PVH,
        &["--initrd", &initrd_arg],
        &specs,
        "console=ttyS0",
        2,
        dir.path(),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("(ELF, PVH entry, hvm_start_info)"),
        "the VMM did not pick the PVH entry: {stderr}"
    );
    assert_guest_passed(&out);
    assert!(stdout.contains("test-guest: booted via PVH"), "{stdout}");
    assert!(stdout.contains("ok - boot: hvm_start_info magic and version 1"));
    // 128 MiB less the 385 KiB from the EBDA to 1 MiB, in three entries.
    assert!(stdout.contains("test-guest: memory map: 3 entries, 130687 KiB RAM"));
    let want = format!("70001 bytes at 0x7fee000, fnv1a {:#018x}", fnv1a(&data));
    let pvh_initrd = line_with(&stdout, "test-guest: initramfs: ");
    assert!(pvh_initrd.ends_with(&want), "{pvh_initrd}");
    for (img, fmt) in [(&raw, Format::Raw), (&q, Format::Qcow2)] {
        qemu_check_clean(img, fmt);
        assert_guest_wrote(&to_raw(img, fmt, dir.path()));
    }

    // The 64-bit entry hands the guest the same memory map and initramfs through the zero page.
    let out = run_kernel(
        GUEST,
        &["--initrd", &initrd_arg],
        &[],
        "console=ttyS0",
        1,
        dir.path(),
    );
    let stdout64 = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(stdout64.contains("test-guest: booted via the Linux 64-bit entry"));
    assert!(stdout64.contains(" passed, 0 failed"));
    assert_eq!(line_with(&stdout64, "test-guest: initramfs: "), pvh_initrd);
    assert_eq!(
        line_with(&stdout64, "test-guest: memory map: "),
        line_with(&stdout, "test-guest: memory map: ")
    );
}

/// The guest ranges `writes` touch, widened to `granularity` and merged: what a dirty bitmap
/// of that granularity must record.
fn dirty_granules(writes: &[(u64, u64, u64)], granularity: u64, size: u64) -> Vec<(u64, u64)> {
    let mut r: Vec<(u64, u64)> = writes
        .iter()
        .map(|&(o, l, _)| {
            (
                o / granularity * granularity,
                (o + l)
                    .div_ceil(granularity)
                    .saturating_mul(granularity)
                    .min(size),
            )
        })
        .collect();
    r.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (s, e) in r {
        match out.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out
}

#[test]
fn guest_writes_are_recorded_in_persistent_bitmaps_qemu_made() {
    // Incremental backup: qemu-img adds the bitmaps, the guest runs under vmm, and afterwards
    // the enabled bitmap holds exactly what the guest wrote, zeroed or discarded; the disabled
    // one nothing; neither is left marked in use.
    let Some(dir) = setup() else { return };
    let img = dir.path().join("disk.qcow2");
    make_image(&img, Format::Qcow2, 0, SIZE, None);
    for args in [
        &["bitmap", "--add", "-g", "64k"][..],
        &["bitmap", "--add", "--disable"],
    ] {
        let name = if args.len() == 4 {
            "since-backup"
        } else {
            "frozen"
        };
        let st = Command::new("qemu-img")
            .args(args)
            .arg(&img)
            .arg(name)
            .status()
            .unwrap();
        assert!(st.success(), "qemu-img {args:?} failed");
    }
    let spec = format!("path={},format=qcow2,discard=unmap", img.display());
    let out = run_vmm(&[spec], "console=ttyS0", 1, dir.path());
    assert_guest_passed(&out);
    qemu_check_clean(&img, Format::Qcow2);
    let info = Command::new("qemu-img")
        .args(["info", "--output=json"])
        .arg(&img)
        .output()
        .unwrap();
    let info = String::from_utf8_lossy(&info.stdout);
    assert!(!info.contains("in-use"), "a bitmap is left in use: {info}");
    assert!(info.contains("\"auto\""), "{info}");

    let image = Image::open(&img, &OpenOptions::read_only()).unwrap();
    let d = image.driver();
    let recorded = d.bitmap_read("since-backup").unwrap().dirty_ranges();
    assert_eq!(
        recorded,
        dirty_granules(&guest_writes(SIZE), 64 << 10, SIZE),
        "the bitmap does not hold the guest's writes"
    );
    assert!(d.bitmap_read("frozen").unwrap().is_clean());
}

/// A vmm running the test guest, its standard output read line by line as the guest prints.
struct Running {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
    stdout: String,
    stderr: PathBuf,
}

impl Running {
    /// Starts the test guest with `disks` and `cmdline`, standard input from `stdin`, stderr to
    /// a file in `tmp`, which is also the TMPDIR.
    fn start(disks: &[String], cmdline: &str, stdin: std::process::Stdio, tmp: &Path) -> Running {
        Running::start_with(&[], disks, cmdline, stdin, tmp)
    }

    /// As [`Running::start`], with `extra` arguments first.
    fn start_with(
        extra: &[&str],
        disks: &[String],
        cmdline: &str,
        stdin: std::process::Stdio,
        tmp: &Path,
    ) -> Running {
        let stderr = tmp.join("vmm.stderr");
        let mut c = Command::new(VMM);
        c.args(extra);
        c.args(["--kernel", GUEST, "--memory", "128M", "--cmdline", cmdline]);
        for d in disks {
            c.args(["--disk", d]);
        }
        c.env("TMPDIR", tmp)
            .stdin(stdin)
            .stdout(std::process::Stdio::piped())
            .stderr(std::fs::File::create(&stderr).unwrap());
        let mut child = c.spawn().unwrap();
        let out = child.stdout.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for l in std::io::BufReader::new(out)
                .split(b'\n')
                .map_while(Result::ok)
            {
                if tx.send(String::from_utf8_lossy(&l).into_owned()).is_err() {
                    return;
                }
            }
        });
        Running {
            child,
            lines,
            stdout: String::new(),
            stderr,
        }
    }

    /// Reads the guest's output until a line holds `needle`; panics after a minute.
    fn wait_for(&mut self, needle: &str) -> String {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    self.stdout.push_str(&l);
                    self.stdout.push('\n');
                    if l.contains(needle) {
                        return l;
                    }
                }
                Err(_) => {
                    let _ = self.child.kill();
                    panic!(
                        "no line with {needle:?} from the guest; it printed:\n{}",
                        self.stdout
                    );
                }
            }
        }
    }

    /// Waits (a minute at most) for the vmm to exit: its status, all the guest printed, stderr.
    fn finish(mut self) -> (std::process::ExitStatus, String, String) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            if std::time::Instant::now() > deadline {
                let _ = self.child.kill();
                break self.child.wait().unwrap();
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        };
        while let Ok(l) = self.lines.recv_timeout(std::time::Duration::from_secs(5)) {
            self.stdout.push_str(&l);
            self.stdout.push('\n');
        }
        let stderr = std::fs::read_to_string(&self.stderr).unwrap();
        eprintln!(
            "--- vmm stdout ---\n{}\n--- vmm stderr ---\n{stderr}",
            self.stdout
        );
        (status, self.stdout, stderr)
    }
}

#[test]
fn serial_input_from_a_pipe_reaches_the_guest_whole_and_in_order() {
    // Several times the 64-byte receive FIFO, written at once: the console holds back what the
    // FIFO cannot take until the guest reads, so nothing is lost or reordered.
    let Some(dir) = setup() else { return };
    let text: String = (0..300u16)
        .map(|i| char::from(b'!' + u8::try_from(i % 90).unwrap()))
        .collect();
    let text = text.replace('\\', "/");
    let mut vm = Running::start(
        &[],
        &format!("console=ttyS0 test.serial_read={}", text.len()),
        std::process::Stdio::piped(),
        dir.path(),
    );
    vm.wait_for("waiting for 300 bytes of serial input");
    {
        use std::io::Write;
        let mut stdin = vm.child.stdin.take().unwrap();
        stdin.write_all(text.as_bytes()).unwrap();
        // End of input must not stop the VM: the guest still powers off by itself.
    }
    let got = vm.wait_for("test-guest: serial input: ");
    let (status, stdout, _) = vm.finish();
    assert!(status.success(), "vmm exited with {status:?}");
    assert_eq!(got.trim_end(), format!("test-guest: serial input: {text}"));
    assert!(stdout.contains("ok - serial: input arrived with an interrupt"));
    assert!(stdout.contains(" passed, 0 failed"), "{stdout}");
}

#[test]
fn sigterm_stops_the_vm_in_order_disks_flushed_and_closed() {
    // Stopped by a signal while the guest runs, the VMM still flushes and closes its disks: the
    // guest's writes are in the image, qemu-img check is clean, no bitmap is left in use and the
    // snapshot=on overlay is gone.
    let Some(dir) = setup() else { return };
    let tmp = dir.path().join("tmp");
    std::fs::create_dir(&tmp).unwrap();
    let img = dir.path().join("disk.qcow2");
    let snap = dir.path().join("snap.qcow2");
    let specs = [
        format!("path={},format=qcow2", img.display()),
        format!("path={},format=qcow2,snapshot=on", snap.display()),
    ];
    for (signal, name) in [(libc::SIGTERM, "15"), (libc::SIGINT, "2")] {
        for f in [&img, &snap] {
            let _ = std::fs::remove_file(f);
            make_image(f, Format::Qcow2, 0, SIZE, None);
        }
        let st = Command::new("qemu-img")
            .args(["bitmap", "--add"])
            .arg(&img)
            .arg("since-backup")
            .status()
            .unwrap();
        assert!(st.success());
        let mut vm = Running::start(
            &specs,
            "console=ttyS0 test.hold=1",
            std::process::Stdio::null(),
            &tmp,
        );
        vm.wait_for("test-guest: holding until stopped");
        let pid = i32::try_from(vm.child.id()).unwrap();
        // SAFETY: kill sends a signal to our own child; no memory is involved.
        assert_eq!(unsafe { libc::kill(pid, signal) }, 0);
        let (status, stdout, stderr) = vm.finish();
        assert_eq!(status.code(), Some(0), "vmm exited with {status:?}");
        assert!(
            stderr.contains(&format!("vmm: terminating on signal {name}")),
            "{stderr}"
        );
        assert!(stdout.contains(" passed, 0 failed"), "{stdout}");
        qemu_check_clean(&img, Format::Qcow2);
        assert_guest_wrote(&to_raw(&img, Format::Qcow2, dir.path()));
        let info = Command::new("qemu-img")
            .args(["info", "--output=json"])
            .arg(&img)
            .output()
            .unwrap();
        let info = String::from_utf8_lossy(&info.stdout);
        assert!(
            !info.contains("in-use"),
            "the bitmap is left in use: {info}"
        );
        let left: Vec<_> = std::fs::read_dir(&tmp)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .filter(|n| n != "vmm.stderr")
            .collect();
        assert!(left.is_empty(), "snapshot overlay left behind: {left:?}");
    }
}

/// A new pseudo-terminal: (master, slave).
fn openpty() -> (std::fs::File, std::os::fd::OwnedFd) {
    let (mut master, mut slave) = (-1, -1);
    // SAFETY: openpty writes two descriptors; the name, termios and window size are optional.
    let r = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(r, 0, "openpty: {}", std::io::Error::last_os_error());
    // Children must not inherit the master: the terminal hangs up only when its last copy
    // closes.
    for fd in [master, slave] {
        // SAFETY: fcntl on a descriptor openpty just returned.
        let r = unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
        assert_eq!(r, 0);
    }
    // SAFETY: openpty returned two open descriptors that nothing else owns.
    unsafe {
        use std::os::fd::FromRawFd;
        (
            std::fs::File::from_raw_fd(master),
            std::os::fd::OwnedFd::from_raw_fd(slave),
        )
    }
}

#[test]
fn terminal_console_is_raw_ctrl_a_x_quits_and_the_terminal_is_restored() {
    // On a terminal every key reaches the guest as typed (CR stays CR, Ctrl-C is a byte, no
    // echo), Ctrl-A Ctrl-A sends one Ctrl-A, Ctrl-A x stops the VMM in order, and the terminal
    // gets its settings back.
    let Some(dir) = setup() else { return };
    let (mut master, slave) = openpty();
    let termios = |fd: &std::os::fd::OwnedFd| {
        use std::os::fd::AsRawFd;
        // SAFETY: termios is plain data that tcgetattr fills.
        let mut t: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: `fd` is an open terminal and `t` a valid termios.
        assert_eq!(unsafe { libc::tcgetattr(fd.as_raw_fd(), &mut t) }, 0);
        (t.c_iflag, t.c_oflag, t.c_cflag, t.c_lflag)
    };
    let before = termios(&slave);
    assert_ne!(
        before.3 & libc::ICANON,
        0,
        "a new pty starts in canonical mode"
    );
    let keys = b"ab\r\x03\x01\x01\x01zc";
    let typed = r"ab\x0d\x03\x01c";
    let mut vm = Running::start(
        &[],
        "console=ttyS0 test.serial_read=6 test.hold=1",
        std::process::Stdio::from(slave.try_clone().unwrap()),
        dir.path(),
    );
    vm.wait_for("waiting for 6 bytes of serial input");
    {
        use std::io::Write;
        master.write_all(keys).unwrap();
    }
    let got = vm.wait_for("test-guest: serial input: ");
    assert_eq!(got.trim_end(), format!("test-guest: serial input: {typed}"));
    vm.wait_for("test-guest: holding until stopped");
    {
        use std::io::Write;
        master.write_all(b"\x01h").unwrap();
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !std::fs::read_to_string(&vm.stderr)
        .unwrap()
        .contains("C-a x")
    {
        assert!(std::time::Instant::now() < deadline, "no help for Ctrl-A h");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    {
        use std::io::Write;
        master.write_all(b"\x01x").unwrap();
    }
    let (status, stdout, stderr) = vm.finish();
    assert_eq!(status.code(), Some(0), "vmm exited with {status:?}");
    assert!(
        stderr.contains("vmm: terminated from the console"),
        "{stderr}"
    );
    assert!(stdout.contains(" passed, 0 failed"), "{stdout}");
    assert_eq!(termios(&slave), before, "the terminal was not restored");
    // Nothing was echoed back to the terminal.
    {
        use std::os::fd::AsRawFd;
        // SAFETY: fcntl on an open descriptor.
        unsafe { libc::fcntl(master.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) };
        let mut buf = [0u8; 64];
        let n = std::io::Read::read(&mut &master, &mut buf);
        assert!(
            matches!(&n, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
            "the terminal echoed: {n:?} {:?}",
            &buf[..*n.as_ref().unwrap_or(&0)]
        );
    }
}

#[test]
fn sighup_after_the_terminal_hung_up_still_stops_in_order() {
    // The terminal the VMM prints to goes away (an SSH session dropped) and SIGHUP follows:
    // writes to it now fail, and the VMM must still stop in order rather than panic on them.
    let Some(dir) = setup() else { return };
    let img = dir.path().join("disk.qcow2");
    make_image(&img, Format::Qcow2, 0, SIZE, None);
    let (master, slave) = openpty();
    let mut c = Command::new(VMM);
    c.args(["--kernel", GUEST, "--memory", "128M"])
        .args(["--cmdline", "console=ttyS0 test.hold=1"])
        .arg("--disk")
        .arg(format!("path={},format=qcow2", img.display()))
        .env("TMPDIR", dir.path())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::from(slave.try_clone().unwrap()))
        .stderr(std::process::Stdio::from(slave));
    let mut child = c.spawn().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut master = master;
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(n) = std::io::Read::read(&mut master, &mut buf) {
            if n == 0 {
                break;
            }
            seen.extend_from_slice(&buf[..n]);
            if String::from_utf8_lossy(&seen).contains("holding until stopped") {
                // Dropping the master hangs the terminal up.
                let _ = tx.send(String::from_utf8_lossy(&seen).into_owned());
                return;
            }
        }
    });
    let seen = rx
        .recv_timeout(std::time::Duration::from_secs(60))
        .unwrap_or_else(|_| {
            let _ = child.kill();
            panic!("the guest never reached its hold")
        });
    assert!(seen.contains(" passed, 0 failed"), "{seen}");
    std::thread::sleep(std::time::Duration::from_millis(100));
    let pid = i32::try_from(child.id()).unwrap();
    // SAFETY: kill sends a signal to our own child; no memory is involved.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGHUP) }, 0);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("vmm did not stop on SIGHUP");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(0), "vmm exited with {status:?}");
    qemu_check_clean(&img, Format::Qcow2);
    assert_guest_wrote(&to_raw(&img, Format::Qcow2, dir.path()));
}

/// (thread name, seccomp mode) of every thread of process `pid`, from /proc.
fn thread_seccomp(pid: u32) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let status = std::fs::read_to_string(t.unwrap().path().join("status")).unwrap();
        let field = |k: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(k))
                .map(|v| v.trim().to_owned())
                .unwrap_or_default()
        };
        out.push((field("Name:"), field("Seccomp:")));
    }
    out.sort();
    out
}

#[test]
fn every_thread_runs_under_a_seccomp_filter_while_the_guest_runs() {
    // While the guest works, every thread of the VMM (main, vCPUs, each queue's I/O thread,
    // the signal and console threads) is in seccomp filter mode (2); with --seccomp false none
    // is (0). Either way the guest's requests all succeed and SIGTERM stops it in order.
    let Some(dir) = setup() else { return };
    let tmp = dir.path().join("tmp");
    std::fs::create_dir(&tmp).unwrap();
    let img = dir.path().join("disk.qcow2");
    let spec = [format!(
        "path={},format=qcow2,discard=unmap,num_queues=2",
        img.display()
    )];
    for (mode, want) in [("true", "2"), ("log", "2"), ("false", "0")] {
        let _ = std::fs::remove_file(&img);
        make_image(&img, Format::Qcow2, 0, SIZE, None);
        let mut vm = Running::start_with(
            &["--seccomp", mode, "--cpus", "2"],
            &spec,
            "console=ttyS0 test.hold=1",
            std::process::Stdio::piped(),
            &tmp,
        );
        vm.wait_for("test-guest: holding until stopped");
        let threads = thread_seccomp(vm.child.id());
        eprintln!("--seccomp {mode}: {threads:?}");
        for name in ["vmm", "vcpu0", "vcpu1", "signals", "console"] {
            assert!(
                threads.iter().any(|(n, _)| n == name),
                "no {name} thread: {threads:?}"
            );
        }
        let io = threads.iter().filter(|(n, _)| n == "virtio-blk").count();
        assert_eq!(io, 2, "one I/O thread per queue: {threads:?}");
        assert!(
            threads.iter().all(|(_, m)| m == want),
            "--seccomp {mode}: {threads:?}"
        );
        let pid = i32::try_from(vm.child.id()).unwrap();
        // SAFETY: kill sends a signal to our own child; no memory is involved.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
        let (status, stdout, stderr) = vm.finish();
        assert_eq!(status.code(), Some(0), "{mode}: {status:?}: {stderr}");
        assert!(stdout.contains(" passed, 0 failed"), "{stdout}");
        assert!(!stderr.contains("seccomp"), "{stderr}");
        qemu_check_clean(&img, Format::Qcow2);
        assert_guest_wrote(&to_raw(&img, Format::Qcow2, dir.path()));
    }
}

/// The rates the bench guest printed: (sequential MiB/s per phase, random IOPS per phase).
fn bench_rates(out: &str) -> (Vec<f64>, Vec<f64>) {
    let mut seq = Vec::new();
    let mut iops = Vec::new();
    for l in out.lines() {
        if l.contains("bench: sequential 64 KiB reads, ") {
            let r = l.rsplit(": ").next().and_then(|r| r.strip_suffix(" MiB/s"));
            seq.push(r.and_then(|n| n.parse().ok()).expect("a rate"));
        } else if l.contains("bench: random 4 KiB reads, ") {
            let r = l.rsplit(", ").next().and_then(|r| r.strip_suffix(" IOPS"));
            iops.push(r.and_then(|n| n.parse().ok()).expect("IOPS"));
        }
    }
    assert_eq!(seq.len(), 11, "{out}");
    assert_eq!(iops.len(), 2, "{out}");
    (seq, iops)
}

#[test]
fn throttled_disks_keep_to_their_rate_across_queues() {
    // The bench guest reads the 16 MiB disk at every queue depth, on one queue and on two;
    // unthrottled it reads hundreds of MiB/s. With a limit of bytes (qemu's spelling) or of
    // requests (Cloud Hypervisor's) every phase keeps to it, give or take the burst the
    // bucket holds at the phase's start, and the bytes limit is delivered, not undercut.
    let Some(dir) = setup() else { return };
    let img = dir.path().join("bench.raw");
    make_image(&img, Format::Raw, 0, SIZE, None);
    let base = format!("path={},format=raw,readonly=on,num_queues=2", img.display());
    let mib = 1024.0 * 1024.0;
    let phase = SIZE as f64;

    // 24 MiB/s, qemu's default burst of a tenth of that.
    let rate = 24.0 * mib;
    let spec = format!("{base},throttling.bps-total=24M");
    let out = run_vmm(&[spec], "console=ttyS0 tg.mode0=bench", 1, dir.path());
    let s = String::from_utf8_lossy(&out.stdout);
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && s.contains(" passed, 0 failed"),
        "{s}"
    );
    let (seq, _) = bench_rates(&s);
    let most = phase / ((phase - rate / 10.0) / rate) / mib * 1.1;
    for r in &seq {
        assert!(*r <= most, "{r} MiB/s over the limit ({most:.1}): {seq:?}");
    }
    for r in &seq[1..] {
        assert!(
            *r >= 24.0 * 0.75,
            "{r} MiB/s: the limit is not delivered: {seq:?}"
        );
    }
    let held = line_with(&e, "vmm: disk 0: ");
    assert!(!held.contains("for 0.0 ms"), "{held}");

    // 800 requests a second, refilled every 100 ms: 80 at once.
    let spec = format!("{base},ops_size=80,ops_refill_time=100");
    let out = run_vmm(&[spec], "console=ttyS0 tg.mode0=bench", 1, dir.path());
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && s.contains(" passed, 0 failed"),
        "{s}"
    );
    let (seq, iops) = bench_rates(&s);
    let requests = phase / 65536.0;
    let most = requests / ((requests - 80.0) / 800.0) * 65536.0 / mib * 1.1;
    for r in &seq {
        assert!(*r <= most, "{r} MiB/s over the limit ({most:.1}): {seq:?}");
    }
    let most = 1024.0 / ((1024.0 - 80.0) / 800.0) * 1.1;
    for r in &iops {
        assert!(*r <= most, "{r} IOPS over the limit ({most:.0}): {iops:?}");
    }
}

/// One HTTP request on the API socket at `sock`: (status code, body).
fn api(sock: &Path, method: &str, endpoint: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(sock).unwrap();
    write!(
        s,
        "{method} /api/v1/{endpoint} HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let code = out
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out.split_once("\r\n\r\n").map_or("", |(_, b)| b).to_owned();
    (code, body)
}

/// The number after `"key":` in a JSON text.
fn json_number(body: &str, key: &str) -> u64 {
    body.split(&format!("\"{key}\":"))
        .nth(1)
        .and_then(|r| r.split([',', '}']).next())
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {key} in {body}"))
}

#[test]
fn api_socket_pauses_resumes_counts_and_shuts_down() {
    // Cloud Hypervisor's API on --api-socket: ping names the process; a paused guest does not
    // run (it cannot read the console input sent meanwhile) until resumed; the counters hold
    // the guest's reads and writes; vmm.shutdown stops the VMM in order.
    let Some(dir) = setup() else { return };
    let tmp = dir.path().join("tmp");
    std::fs::create_dir(&tmp).unwrap();
    let img = dir.path().join("disk.qcow2");
    make_image(&img, Format::Qcow2, 0, SIZE, None);
    let sock = dir.path().join("api.sock");
    let spec = [format!(
        "path={},format=qcow2,id=root,queue_size=512",
        img.display()
    )];
    let sock_arg = format!("path={}", sock.display());
    let mut vm = Running::start_with(
        &["--api-socket", &sock_arg, "--cpus", "2"],
        &spec,
        "console=ttyS0 test.serial_read=6 test.hold=1",
        std::process::Stdio::piped(),
        &tmp,
    );
    vm.wait_for("waiting for 6 bytes of serial input");

    let (code, body) = api(&sock, "GET", "vmm.ping");
    assert_eq!(code, 200, "{body}");
    assert_eq!(json_number(&body, "pid"), u64::from(vm.child.id()));
    let (code, body) = api(&sock, "GET", "vm.info");
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("\"state\":\"Running\""), "{body}");
    assert!(body.contains("\"boot_vcpus\":2"), "{body}");
    assert!(body.contains("\"id\":\"root\""), "{body}");
    assert_eq!(json_number(&body, "queue_size"), 512, "{body}");

    let (code, body) = api(&sock, "PUT", "vm.pause");
    assert_eq!(code, 204, "{body}");
    assert!(api(&sock, "GET", "vm.info")
        .1
        .contains("\"state\":\"Paused\""));
    // As Cloud Hypervisor: a second pause is refused, and the VM stays paused.
    let (code, body) = api(&sock, "PUT", "vm.pause");
    assert_eq!(code, 500, "{body}");
    assert!(body.contains("already paused"), "{body}");
    {
        use std::io::Write;
        let stdin = vm.child.stdin.as_mut().unwrap();
        stdin.write_all(b"abcdef").unwrap();
        stdin.flush().unwrap();
    }
    std::thread::sleep(std::time::Duration::from_millis(1500));
    while let Ok(l) = vm.lines.try_recv() {
        assert!(!l.contains("serial input: "), "a paused guest ran: {l}");
        vm.stdout.push_str(&l);
    }
    let (code, body) = api(&sock, "PUT", "vm.resume");
    assert_eq!(code, 204, "{body}");
    let (code, body) = api(&sock, "PUT", "vm.resume");
    assert_eq!(code, 500, "{body}");
    assert!(body.contains("not paused"), "{body}");
    let got = vm.wait_for("test-guest: serial input: ");
    assert!(got.contains("abcdef"), "{got}");
    vm.wait_for("test-guest: holding until stopped");

    let (code, body) = api(&sock, "GET", "vm.counters");
    assert_eq!(code, 200, "{body}");
    assert!(body.starts_with("{\"root\":{"), "{body}");
    for key in ["read_ops", "read_bytes", "write_ops", "write_bytes"] {
        assert!(json_number(&body, key) > 0, "{key}: {body}");
    }
    assert_eq!(api(&sock, "GET", "vm.nothing").0, 404);
    assert_eq!(api(&sock, "PUT", "vm.info").0, 405);

    let (code, body) = api(&sock, "PUT", "vmm.shutdown");
    assert_eq!(code, 204, "{body}");
    let (status, stdout, stderr) = vm.finish();
    assert_eq!(status.code(), Some(0), "{status:?}: {stderr}");
    assert!(
        stderr.contains("shut down through the API socket"),
        "{stderr}"
    );
    assert!(stdout.contains(" passed, 0 failed"), "{stdout}");
    qemu_check_clean(&img, Format::Qcow2);
    assert_guest_wrote(&to_raw(&img, Format::Qcow2, dir.path()));
}

#[test]
fn a_paused_vm_does_no_disk_io_until_resumed() {
    // vm.pause stops the disks' I/O threads as well as the vCPUs: requests the guest queued
    // before the pause wait for the resume, so the images do not change while paused. The
    // bench guest keeps 32 reads in flight on a throttled disk, which takes the I/O thread
    // a while to serve.
    let Some(dir) = setup() else { return };
    let tmp = dir.path().join("tmp");
    std::fs::create_dir(&tmp).unwrap();
    let img = dir.path().join("bench.raw");
    make_image(&img, Format::Raw, 0, SIZE, None);
    let sock = dir.path().join("api.sock");
    let spec = [format!(
        "path={},format=raw,readonly=on,throttling.bps-total=8M",
        img.display()
    )];
    let sock_arg = format!("path={}", sock.display());
    let mut vm = Running::start_with(
        &["--api-socket", &sock_arg],
        &spec,
        "console=ttyS0 tg.mode0=bench",
        std::process::Stdio::null(),
        &tmp,
    );
    // The queue-depth-32 phase comes next.
    vm.wait_for("bench: sequential 64 KiB reads, queue depth 8: ");
    std::thread::sleep(std::time::Duration::from_millis(300));
    let read = || json_number(&api(&sock, "GET", "vm.counters").1, "read_bytes");
    let (code, body) = api(&sock, "PUT", "vm.pause");
    assert_eq!(code, 204, "{body}");
    let at_pause = read();
    std::thread::sleep(std::time::Duration::from_secs(1));
    assert_eq!(read(), at_pause, "the disk was read while paused");
    let (code, body) = api(&sock, "PUT", "vm.resume");
    assert_eq!(code, 204, "{body}");
    std::thread::sleep(std::time::Duration::from_secs(1));
    assert!(read() > at_pause, "no reads after the resume");
    let (code, body) = api(&sock, "PUT", "vmm.shutdown");
    assert_eq!(code, 204, "{body}");
    let (status, _, stderr) = vm.finish();
    assert_eq!(status.code(), Some(0), "{status:?}: {stderr}");
}

#[test]
fn serial_pty_carries_the_console_both_ways() {
    // --serial pty: the console is a new pseudo-terminal named on stderr; what the guest
    // prints comes out there (not on stdout) and what is typed there reaches the guest.
    let Some(dir) = setup() else { return };
    let tmp = dir.path().join("tmp");
    std::fs::create_dir(&tmp).unwrap();
    let sock = dir.path().join("api.sock");
    let vm = Running::start_with(
        &["--serial", "pty", "--api-socket", sock.to_str().unwrap()],
        &[],
        "console=ttyS0 test.serial_read=6 test.hold=1",
        std::process::Stdio::null(),
        &tmp,
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let path = loop {
        let e = std::fs::read_to_string(tmp.join("vmm.stderr")).unwrap_or_default();
        if let Some(p) = e
            .lines()
            .find_map(|l| l.strip_prefix("vmm: serial console on "))
        {
            break p.to_owned();
        }
        assert!(std::time::Instant::now() < deadline, "no pty named: {e}");
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    use std::os::unix::fs::OpenOptionsExt;
    let tty = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY)
        .open(&path)
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<Vec<u8>>();
    let mut reader = tty.try_clone().unwrap();
    std::thread::spawn(move || {
        use std::io::Read;
        let mut b = [0u8; 256];
        while let Ok(n) = reader.read(&mut b) {
            if n == 0 || tx.send(b[..n].to_vec()).is_err() {
                return;
            }
        }
    });
    let mut seen = String::new();
    let mut wait_for = |needle: &str| {
        while !seen.contains(needle) {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match rx.recv_timeout(left) {
                Ok(b) => seen.push_str(&String::from_utf8_lossy(&b)),
                Err(_) => panic!("no {needle:?} on the pty; it showed:\n{seen}"),
            }
        }
    };
    wait_for("test-guest: waiting for 6 bytes of serial input");
    {
        use std::io::Write;
        (&tty).write_all(b"abcdef").unwrap();
    }
    wait_for("test-guest: serial input: abcdef");
    wait_for("test-guest: holding until stopped");
    // vm.info names it too, as Cloud Hypervisor's does.
    let (code, info) = api(&sock, "GET", "vm.info");
    assert_eq!(code, 200);
    assert!(
        info.contains(&format!(
            "\"serial\":{{\"mode\":\"Pty\",\"file\":\"{path}\"}}"
        )),
        "{info}"
    );
    let pid = i32::try_from(vm.child.id()).unwrap();
    // SAFETY: kill sends a signal to our own child; no memory is involved.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let (status, stdout, stderr) = vm.finish();
    assert_eq!(status.code(), Some(0), "{status:?}: {stderr}");
    assert!(
        !stdout.contains("test-guest"),
        "guest output on stdout: {stdout}"
    );

    // With nobody on the pty, the guest still runs its disk tests and powers off. (Its output
    // waits in the pty; past what that holds, about 16 KiB, it would be dropped rather than
    // waited on, the master being non-blocking; this guest prints less.)
    let img = dir.path().join("disk.raw");
    make_image(&img, Format::Raw, 0, SIZE, None);
    let vm = Running::start_with(
        &["--serial", "pty"],
        &[format!("path={},format=raw", img.display())],
        "console=ttyS0",
        std::process::Stdio::null(),
        &tmp,
    );
    let (status, _, stderr) = vm.finish();
    assert_eq!(status.code(), Some(0), "{status:?}: {stderr}");
    assert_guest_wrote(&std::fs::read(&img).unwrap());
}

#[test]
fn the_power_button_reaches_the_guest_through_the_api() {
    // vm.power-button raises the ACPI Generic Event Device's interrupt (the DSDT's _EVT then
    // notifies the power button, which iasl checks in the unit tests); the test guest, as an
    // OS would, powers off on it, and the VMM exits 0 with the image clean.
    let Some(dir) = setup() else { return };
    let tmp = dir.path().join("tmp");
    std::fs::create_dir(&tmp).unwrap();
    let img = dir.path().join("disk.qcow2");
    make_image(&img, Format::Qcow2, 0, SIZE, None);
    let sock = dir.path().join("api.sock");
    let mut vm = Running::start_with(
        &["--api-socket", sock.to_str().unwrap()],
        &[format!("path={},format=qcow2", img.display())],
        &format!("console=ttyS0 test.power_button={}", vmm::layout::GED_GSI),
        std::process::Stdio::null(),
        &tmp,
    );
    vm.wait_for("test-guest: waiting for the power button");
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert!(
        vm.child.try_wait().unwrap().is_none(),
        "the guest did not wait"
    );
    let (code, body) = api(&sock, "PUT", "vm.power-button");
    assert_eq!(code, 204, "{body}");
    vm.wait_for("test-guest: power button pressed");
    let (status, stdout, stderr) = vm.finish();
    assert_eq!(status.code(), Some(0), "{status:?}: {stderr}");
    assert!(stdout.contains(" passed, 0 failed"), "{stdout}");
    qemu_check_clean(&img, Format::Qcow2);
    assert_guest_wrote(&to_raw(&img, Format::Qcow2, dir.path()));
}

/// Console output that cannot be written (a full device here; a closed pipe alike) is reported
/// once, not once for every byte the guest writes, and the guest runs on.
#[test]
fn a_console_that_fails_is_reported_once() {
    let Some(dir) = setup() else { return };
    let img = dir.path().join("disk.raw");
    make_image(&img, Format::Raw, 0, SIZE, None);
    let out = Command::new(VMM)
        .args([
            "--kernel",
            GUEST,
            "--memory",
            "128M",
            "--serial",
            "file:/dev/full",
        ])
        .args(["--cmdline", "console=ttyS0"])
        .arg("--disk")
        .arg(format!("path={},format=raw", img.display()))
        .env("TMPDIR", dir.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "vmm exited with {:?}: {err}",
        out.status
    );
    assert_eq!(err.matches("vmm: serial:").count(), 1, "{err}");
}
