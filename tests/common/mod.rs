//! Shared helpers for the integration tests that run the real `img` binary next to qemu-img.
//!
//! Every test works in its own temporary directory and runs the tools with that directory as
//! the working directory, so file names in arguments, error messages and JSON output are the
//! short relative names the test chose (as a user typing in a shell would see them).
//!
//! Each test binary includes this module with `mod common;` and uses only part of it.
#![allow(dead_code)]

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::thread;
use std::time::{Duration, Instant};

/// The `img` binary cargo built for this test run.
pub const IMG: &str = env!("CARGO_BIN_EXE_img");

/// How long an ordinary tool run may take before the test calls it a hang. Generous, because
/// two test binaries may share a 2-core machine with a build.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(120);

pub const KIB: u64 = 1024;
pub const MIB: u64 = 1024 * KIB;
pub const GIB: u64 = 1024 * MIB;

/// What a finished command left behind.
#[derive(Debug)]
pub struct Output {
    /// The command line, for messages.
    pub cmdline: String,
    /// Exit code; `None` when a signal ended the process.
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    /// Panics, showing the command and both streams, unless the exit code was 0.
    #[track_caller]
    pub fn ok(self) -> Self {
        assert_eq!(self.code, Some(0), "command failed: {self}");
        self
    }

    /// Panics unless the exit code was `code`.
    #[track_caller]
    pub fn code_is(self, code: i32) -> Self {
        assert_eq!(self.code, Some(code), "unexpected exit code: {self}");
        self
    }

    /// Panics if the program panicked (Rust's panic message on stderr, or killed by a signal).
    #[track_caller]
    pub fn no_panic(self) -> Self {
        assert!(
            !self.stderr.contains("panicked"),
            "the program panicked: {self}"
        );
        assert!(
            self.code.is_some(),
            "the program was killed by a signal: {self}"
        );
        self
    }

    /// Parses stdout as JSON.
    #[track_caller]
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {self}"))
    }
}

impl std::fmt::Display for Output {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "\n  $ {}\n  exit: {:?}\n  stdout: {}\n  stderr: {}",
            self.cmdline,
            self.code,
            self.stdout.trim_end(),
            self.stderr.trim_end()
        )
    }
}

/// Runs `program args...` in `dir`, killing it and panicking if it outlives `timeout`.
/// stdin is closed so that nothing ever waits for a terminal.
#[track_caller]
pub fn run_timeout(dir: &Path, program: &str, args: &[&str], timeout: Duration) -> Output {
    let cmdline = format!("(cd {}; {} {})", dir.display(), program, args.join(" "));
    let mut child = Command::new(program)
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {program}: {e} ({cmdline})"));
    // Read both pipes on their own threads so a chatty child never blocks on a full pipe.
    let mut out = child.stdout.take().expect("piped stdout");
    let mut err = child.stderr.take().expect("piped stderr");
    let out_t = thread::spawn(move || {
        let mut s = Vec::new();
        let _ = out.read_to_end(&mut s);
        s
    });
    let err_t = thread::spawn(move || {
        let mut s = Vec::new();
        let _ = err.read_to_end(&mut s);
        s
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("timed out (hang?) after {timeout:?}: {cmdline}");
            }
            Ok(None) => thread::sleep(Duration::from_millis(5)),
            Err(e) => panic!("waiting for {cmdline}: {e}"),
        }
    };
    let stdout = String::from_utf8_lossy(&out_t.join().unwrap_or_default()).into_owned();
    let stderr = String::from_utf8_lossy(&err_t.join().unwrap_or_default()).into_owned();
    Output {
        cmdline,
        code: status.code(),
        stdout,
        stderr,
    }
}

/// Runs `img args...` in `dir` (as [`run_timeout`] does) and returns what it left with its peak
/// resident memory in KiB: GNU time's "Maximum resident set size", or, if /usr/bin/time is
/// absent, the highest VmHWM sampled from /proc/PID/status (which can miss a short peak).
#[track_caller]
pub fn img_peak_rss(dir: &Path, args: &[&str], timeout: Duration) -> (Output, u64) {
    if Path::new("/usr/bin/time").exists() {
        let mut a = vec!["-v", IMG];
        a.extend_from_slice(args);
        let mut out = run_timeout(dir, "/usr/bin/time", &a, timeout);
        // GNU time's report follows the command's own stderr (after a line on a failing
        // command's status).
        let at = out
            .stderr
            .find("\tCommand being timed:")
            .unwrap_or_else(|| panic!("no report from /usr/bin/time -v: {out}"));
        let at = out.stderr[..at]
            .rfind("Command exited with non-zero status")
            .or_else(|| out.stderr[..at].rfind("Command terminated by signal"))
            .unwrap_or(at);
        let report = out.stderr.split_off(at);
        let kib = report
            .lines()
            .find(|l| l.contains("Maximum resident set size"))
            .and_then(|l| l.rsplit(':').next())
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no RSS figure from /usr/bin/time -v: {report}"));
        out.cmdline = format!("(cd {}; {IMG} {})", dir.display(), args.join(" "));
        return (out, kib);
    }
    eprintln!(
        "!!!!! /usr/bin/time is MISSING (apt-get install time); sampling VmHWM from /proc \
         instead, which can miss a short peak !!!!!"
    );
    let cmdline = format!("(cd {}; {IMG} {})", dir.display(), args.join(" "));
    let out_path = dir.join(".peak-rss.stdout");
    let err_path = dir.join(".peak-rss.stderr");
    let mut child = Command::new(IMG)
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(File::create(&out_path).expect("stdout file"))
        .stderr(File::create(&err_path).expect("stderr file"))
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {IMG}: {e} ({cmdline})"));
    let status_path = format!("/proc/{}/status", child.id());
    let deadline = Instant::now() + timeout;
    let mut peak = 0;
    let status = loop {
        if let Ok(s) = fs::read_to_string(&status_path) {
            if let Some(v) = s
                .lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
            {
                peak = peak.max(v);
            }
        }
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("timed out (hang?) after {timeout:?}: {cmdline}");
            }
            Ok(None) => thread::sleep(Duration::from_millis(2)),
            Err(e) => panic!("waiting for {cmdline}: {e}"),
        }
    };
    let read = |p: &Path| String::from_utf8_lossy(&fs::read(p).unwrap_or_default()).into_owned();
    let out = Output {
        cmdline,
        code: status.code(),
        stdout: read(&out_path),
        stderr: read(&err_path),
    };
    (out, peak)
}

/// Checks once per test binary that qemu-img and qemu-io are installed, and panics with a clear
/// message if not: these tests compare against them and must not pass vacuously.
pub fn require_qemu() {
    static VERSION: OnceLock<String> = OnceLock::new();
    VERSION.get_or_init(|| {
        for tool in ["qemu-img", "qemu-io"] {
            let out = Command::new(tool)
                .arg("--version")
                .stdin(Stdio::null())
                .output();
            match out {
                Ok(o) if o.status.success() => {
                    let v = String::from_utf8_lossy(&o.stdout).into_owned();
                    if !v.contains("version 10.") {
                        eprintln!(
                            "WARNING: these tests were written against qemu 10; found: {}",
                            v.lines().next().unwrap_or("")
                        );
                    }
                }
                _ => panic!(
                    "{tool} is missing: these tests compare `img` with qemu-img 10. Install \
                     qemu-utils from bookworm-backports (.ci/run does it)."
                ),
            }
        }
        String::new()
    });
}

/// A temporary working directory for one test, deleted when dropped.
pub struct Env {
    pub dir: tempfile::TempDir,
}

impl Env {
    pub fn new() -> Self {
        Env {
            dir: tempfile::Builder::new()
                .prefix("img-test-")
                .tempdir()
                .expect("create temp dir"),
        }
    }

    /// Like [`Env::new`], and also checks that qemu-img and qemu-io are present.
    pub fn with_qemu() -> Self {
        require_qemu();
        Self::new()
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Runs the `img` binary under test.
    #[track_caller]
    pub fn img(&self, args: &[&str]) -> Output {
        run_timeout(self.dir.path(), IMG, args, DEFAULT_TIMEOUT)
    }

    /// Runs the `img` binary with a custom time limit.
    #[track_caller]
    pub fn img_timeout(&self, args: &[&str], timeout: Duration) -> Output {
        run_timeout(self.dir.path(), IMG, args, timeout)
    }

    #[track_caller]
    pub fn qemu_img(&self, args: &[&str]) -> Output {
        require_qemu();
        run_timeout(self.dir.path(), "qemu-img", args, DEFAULT_TIMEOUT)
    }

    #[track_caller]
    pub fn qemu_img_timeout(&self, args: &[&str], timeout: Duration) -> Output {
        require_qemu();
        run_timeout(self.dir.path(), "qemu-img", args, timeout)
    }

    /// Runs qemu-io with each of `cmds` as a `-c` command on `file` of format `fmt`, and asserts
    /// that it succeeded. qemu-io prints errors on stdout/stderr but may still exit 0, so its
    /// output is also checked for the words it uses when a request fails.
    #[track_caller]
    pub fn qemu_io(&self, fmt: &str, file: &str, cmds: &[&str]) {
        require_qemu();
        let mut args = vec!["-f", fmt];
        for c in cmds {
            args.push("-c");
            args.push(c);
        }
        args.push(file);
        let out = run_timeout(self.dir.path(), "qemu-io", &args, DEFAULT_TIMEOUT).ok();
        let all = format!("{}{}", out.stdout, out.stderr);
        assert!(
            !all.contains("failed") && !all.contains("error") && !all.contains("Error"),
            "qemu-io reported a failure: {out}"
        );
    }

    /// Makes qcow2 overlay `top` over `base` (a qcow2 image) with qemu-img.
    pub fn qcow2_overlay(&self, base: &str, top: &str) {
        self.qemu_img(&[
            "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", top,
        ])
        .ok();
    }

    /// Makes qcow2 image `name` of `size` with qemu-img and qemu-io, step by step: each step
    /// writes pattern byte `.0` over its first `.1` bytes (a qemu-io length), then takes a
    /// snapshot named `.2` if there is one.
    pub fn snapshot_history(&self, name: &str, size: &str, steps: &[(u8, &str, Option<&str>)]) {
        self.qemu_img(&["create", "-q", "-f", "qcow2", name, size])
            .ok();
        for (pattern, len, snap) in steps {
            self.qemu_io("qcow2", name, &[&format!("write -P {pattern} 0 {len}")]);
            if let Some(s) = snap {
                self.qemu_img(&["snapshot", "-c", s, name]).ok();
            }
        }
    }

    /// Runs `args` on two copies of the qcow2 image `src` (bytes), `q.qcow2` with qemu-img and
    /// `i.qcow2` with `img` (`{}` in an argument names the copy), and asserts that img's result
    /// is clean, reads as qemu-img's, and holds at most `slack` bytes more of the host.
    #[track_caller]
    pub fn space_like_qemu(&self, src: &[u8], args: &[&str], slack: u64) {
        self.write("q.qcow2", src);
        self.write("i.qcow2", src);
        let with = |t: &str| -> Vec<String> {
            args.iter()
                .map(|a| a.replace("{}", &format!("{t}.qcow2")))
                .collect()
        };
        let (q, i) = (with("q"), with("i"));
        self.qemu_img(&q.iter().map(String::as_str).collect::<Vec<_>>())
            .ok();
        self.img(&i.iter().map(String::as_str).collect::<Vec<_>>())
            .ok();
        self.qemu_img(&["check", "i.qcow2"]).ok();
        self.qemu_img(&["compare", "q.qcow2", "i.qcow2"]).ok();
        let (q, i) = (self.allocated("q.qcow2"), self.allocated("i.qcow2"));
        assert!(
            i <= q + slack,
            "{args:?}: img holds {i} bytes of the host, qemu-img {q}"
        );
    }

    /// Creates (or truncates) a sparse file of `size` bytes.
    pub fn sparse_file(&self, name: &str, size: u64) {
        let f = File::create(self.path(name)).expect("create sparse file");
        f.set_len(size).expect("set_len");
    }

    /// Grows or shrinks an existing file to `size` bytes, keeping its contents.
    pub fn set_len(&self, name: &str, size: u64) {
        let f = OpenOptions::new()
            .write(true)
            .open(self.path(name))
            .expect("open for set_len");
        f.set_len(size).expect("set_len");
    }

    /// Writes `data` at `offset` into an existing file without changing anything else.
    pub fn write_at(&self, name: &str, offset: u64, data: &[u8]) {
        let mut f = OpenOptions::new()
            .write(true)
            .open(self.path(name))
            .expect("open for write");
        f.seek(SeekFrom::Start(offset)).expect("seek");
        f.write_all(data).expect("write");
    }

    pub fn read(&self, name: &str) -> Vec<u8> {
        fs::read(self.path(name)).expect("read file")
    }

    pub fn write(&self, name: &str, data: &[u8]) {
        fs::write(self.path(name), data).expect("write file");
    }

    pub fn len(&self, name: &str) -> u64 {
        fs::metadata(self.path(name)).expect("stat").len()
    }

    /// Bytes the file really occupies on disk (st_blocks * 512).
    pub fn allocated(&self, name: &str) -> u64 {
        use std::os::unix::fs::MetadataExt;
        fs::metadata(self.path(name)).expect("stat").blocks() * 512
    }

    /// Asserts two files hold the same bytes, naming the first differing offset.
    #[track_caller]
    pub fn assert_same_bytes(&self, a: &str, b: &str) {
        assert_files_equal(&self.path(a), &self.path(b));
    }

    /// Converts `src` to raw with both `img` and qemu-img and asserts the results are equal.
    /// Extra arguments (`-f FMT`, `-l snapshot.name=X`, ...) go before the file names of both.
    #[track_caller]
    pub fn assert_converts_like_qemu(&self, src: &str, extra: &[&str]) {
        let ours = format!("{src}.img.raw");
        let theirs = format!("{src}.qemu.raw");
        let mut a = vec!["convert"];
        a.extend_from_slice(extra);
        a.extend_from_slice(&["-O", "raw", src, &theirs]);
        self.qemu_img(&a).ok();
        a.truncate(a.len() - 4);
        a.extend_from_slice(&["-O", "raw", src, &ours]);
        self.img(&a).ok();
        self.assert_same_bytes(&ours, &theirs);
    }
}

impl Default for Env {
    fn default() -> Self {
        Self::new()
    }
}

/// Asserts two files hold the same bytes, naming the first differing offset.
#[track_caller]
pub fn assert_files_equal(a: &Path, b: &Path) {
    let la = fs::metadata(a).expect("stat a").len();
    let lb = fs::metadata(b).expect("stat b").len();
    assert_eq!(
        la,
        lb,
        "sizes differ: {} is {la} bytes, {} is {lb}",
        a.display(),
        b.display()
    );
    let mut fa = File::open(a).expect("open a");
    let mut fb = File::open(b).expect("open b");
    let mut ba = vec![0u8; 1 << 20];
    let mut bb = vec![0u8; 1 << 20];
    let mut off = 0u64;
    while off < la {
        let n = usize::try_from((la - off).min(1 << 20)).expect("chunk fits usize");
        fa.read_exact(&mut ba[..n]).expect("read a");
        fb.read_exact(&mut bb[..n]).expect("read b");
        if ba[..n] != bb[..n] {
            let i = ba[..n]
                .iter()
                .zip(&bb[..n])
                .position(|(x, y)| x != y)
                .unwrap_or(0);
            panic!(
                "{} and {} differ at offset {} (0x{:x}): {:#04x} vs {:#04x}",
                a.display(),
                b.display(),
                off + i as u64,
                off + i as u64,
                ba[i],
                bb[i]
            );
        }
        off += n as u64;
    }
}

/// Deterministic pseudo-random bytes (xorshift64*), incompressible enough that qemu-img
/// convert -c stores such clusters uncompressed.
pub fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        v.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    v.truncate(len);
    v
}

/// Size of the small images in the option matrices.
pub const SMALL: u64 = 4 * MIB;

/// qemu-io commands that edit a [`SMALL`] image: pattern writes at unaligned offsets and across
/// cluster boundaries (512 B up to 2 MiB clusters), zero writes (aligned and not, over data and
/// over unallocated space), discards, and a write to the last sector.
pub const EDITS: &[&str] = &[
    "write -P 0x11 1000 3000",
    "write -P 0x22 65000 140000",
    "write -z 70000 5000",
    "write -P 0x33 1M 1M",
    "write -z 1280k 64k",
    "discard 1536k 256k",
    "write -P 0x44 2097000 2000",
    "write -z 3M 512k",
    "write -P 0x55 3200k 4k",
    "discard 3328k 64k",
    "write -P 0x66 4193792 512",
    "write -z 4000 8192",
];

/// Makes `name`, a [`SMALL`] raw file with patterned data, pseudo-random data and holes:
/// the source for conversions to qcow2.
pub fn patterned_raw(env: &Env, name: &str) {
    env.sparse_file(name, SMALL);
    env.write_at(name, 0, &[0xa5; 4096]);
    env.write_at(name, 5000, &noise(1, 70_000));
    env.write_at(name, MIB - 100, &[0x5a; 200]);
    env.write_at(name, 2 * MIB, &noise(2, 512 * 1024));
    env.write_at(name, 2 * MIB + 768 * 1024, &[0x77; 300 * 1024]);
    // A block of explicit zeros in the middle of data: must read as zeros, may become a hole.
    env.write_at(name, 2 * MIB + 600 * 1024, &[0; 64 * 1024]);
    env.write_at(name, SMALL - 512, &[0xee; 512]);
}
