//! The control socket (`--api-socket`): HTTP/1.1 over a Unix socket, with the endpoints of Cloud
//! Hypervisor's API that apply to this VMM, so that `ch-remote` and scripts written for it work:
//!
//! | request                    | answer                                               |
//! |----------------------------|------------------------------------------------------|
//! | `GET /api/v1/vmm.ping`     | 200, `{"build_version", "version", "pid", "features"}` |
//! | `GET /api/v1/vm.info`      | 200, the configuration and `state` (Running, Paused) |
//! | `GET /api/v1/vm.counters`  | 200, each disk's reads and writes (`_disk0`, ...)    |
//! | `PUT /api/v1/vm.pause`     | 204 once every vCPU and disk has stopped (disks flushed); 500 if paused already |
//! | `PUT /api/v1/vm.resume`    | 204; 500 if not paused                               |
//! | `PUT /api/v1/vm.power-button` | 204; the guest sees its ACPI power button pressed |
//! | `PUT /api/v1/vm.shutdown`, `PUT /api/v1/vmm.shutdown` | 204, then the VMM stops in order, as on SIGTERM |
//!
//! One connection is served at a time, one request each (`Connection: close`). Requests are
//! read with a deadline and a size limit, so a client that stalls or floods the socket holds
//! nothing for long. The socket is bound during set-up; the thread that serves it runs under
//! its own seccomp filter (accept, read, write, and signals to the vCPU threads for pause).

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::legacy::VmExit;
use crate::virtio::block::DiskStats;
use crate::virtio::worker::IoPause;

/// Longest request (headers and body) taken.
const MAX_REQUEST: usize = 16 * 1024;
/// How long a client has to send its request.
const READ_DEADLINE: Duration = Duration::from_secs(5);
/// How long `vm.pause` waits for the vCPUs to stop.
const PAUSE_DEADLINE: Duration = Duration::from_secs(5);

/// Pausing and resuming the vCPU threads.
///
/// A pause sets `requested` and signals each vCPU thread (SIGRTMIN, whose handler does nothing)
/// until all have parked: the signal makes KVM_RUN return EINTR, and the vCPU loop parks while
/// `requested` is set. The signal is repeated because one that arrives just before KVM_RUN is
/// entered would not interrupt it.
#[derive(Debug, Default)]
pub struct Pause {
    requested: AtomicBool,
    parked: AtomicUsize,
    lock: Mutex<()>,
    resumed: Condvar,
    threads: Mutex<Vec<libc::pthread_t>>,
}

/// The signal that interrupts KVM_RUN for a pause.
pub fn kick_signal() -> libc::c_int {
    libc::SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int) {}

/// Installs the (empty) handler of [`kick_signal`], without SA_RESTART, so that the signal
/// interrupts KVM_RUN. Call before the vCPU threads start.
///
/// # Errors
/// sigaction's error.
pub fn install_kick_handler() -> std::io::Result<()> {
    // SAFETY: sigaction is plain data, zeroed then filled; the handler does nothing.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_kick as *const () as usize;
        libc::sigemptyset(&mut sa.sa_mask);
        if libc::sigaction(kick_signal(), &sa, std::ptr::null_mut()) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

impl Pause {
    /// Registers a vCPU thread to be signalled.
    pub fn add_thread(&self, t: libc::pthread_t) {
        self.threads
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(t);
    }

    /// Whether a pause is asked for: the vCPU loop checks it after every exit.
    pub fn requested(&self) -> bool {
        self.requested.load(Ordering::Acquire)
    }

    /// Called by a vCPU thread that saw [`Pause::requested`]: waits until resumed.
    pub fn park(&self) {
        let mut g = self.lock.lock().unwrap_or_else(PoisonError::into_inner);
        self.parked.fetch_add(1, Ordering::AcqRel);
        while self.requested() {
            g = self.resumed.wait(g).unwrap_or_else(PoisonError::into_inner);
        }
        self.parked.fetch_sub(1, Ordering::AcqRel);
    }

    /// Whether the vCPUs are paused.
    pub fn paused(&self) -> bool {
        self.requested()
    }

    /// Stops every vCPU; returns once all have parked, or `false` after the deadline (the
    /// pause is then undone).
    pub fn pause(&self) -> bool {
        if self.requested.swap(true, Ordering::AcqRel) {
            return true;
        }
        let threads = self
            .threads
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let deadline = Instant::now() + PAUSE_DEADLINE;
        while self.parked.load(Ordering::Acquire) < threads.len() {
            if Instant::now() > deadline {
                self.resume();
                return false;
            }
            for &t in &threads {
                // SAFETY: `t` is a vCPU thread's handle, kept valid for the process's life
                // (its JoinHandle is forgotten: never joined nor detached, so an ended thread
                // answers ESRCH); the signal's handler does nothing.
                unsafe { libc::pthread_kill(t, kick_signal()) };
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        true
    }

    /// Lets the vCPUs run again.
    pub fn resume(&self) {
        let _g = self.lock.lock().unwrap_or_else(PoisonError::into_inner);
        self.requested.store(false, Ordering::Release);
        self.resumed.notify_all();
    }
}

/// What the API reports and acts on.
pub struct Control {
    /// The exit channel: a shutdown request goes there, as a signal's does.
    pub exit: Sender<VmExit>,
    /// The vCPUs' pause state.
    pub pause: Arc<Pause>,
    /// Every disk queue's I/O thread, paused with the vCPUs.
    pub io: Vec<IoPause>,
    /// Each disk's name (`id=`, or `_diskN`) and counters.
    pub disks: Vec<(String, Arc<DiskStats>)>,
    /// `vm.info`'s `config`, as JSON.
    pub config: String,
    /// Guest memory in bytes.
    pub memory: u64,
    /// The irqfd of the ACPI Generic Event Device, whose event is the power button.
    pub power_button: vmm_sys_util::eventfd::EventFd,
}

/// Binds the socket at `path`, replacing a stale socket left there (never another kind of
/// file).
///
/// # Errors
/// When `path` exists and is not a socket, or the socket cannot be bound.
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    use std::os::unix::fs::FileTypeExt;
    if let Ok(m) = std::fs::symlink_metadata(path) {
        if !m.file_type().is_socket() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "exists and is not a socket",
            ));
        }
        if UnixStream::connect(path).is_ok() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                "another process is serving it",
            ));
        }
        std::fs::remove_file(path)?;
    }
    UnixListener::bind(path)
}

/// Serves the socket until the process ends.
pub fn serve(listener: &UnixListener, control: &Control) {
    loop {
        match listener.accept() {
            Ok((mut stream, _)) => {
                let reply = match read_request(&stream) {
                    Ok((method, path)) => route(&method, &path, control),
                    Err(e) => error(400, &e),
                };
                let _ = stream.write_all(reply.as_bytes());
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                crate::report!("vmm: api: accept failed: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// Reads one request's method and path (its body, if any, is read and ignored).
fn read_request(stream: &UnixStream) -> Result<(String, String), String> {
    let deadline = Instant::now() + READ_DEADLINE;
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    let head_end = loop {
        if let Some(i) = find(&buf, b"\r\n\r\n") {
            break i + 4;
        }
        if buf.len() >= MAX_REQUEST {
            return Err("request too large".into());
        }
        let n = read_by(stream, &mut chunk, deadline)?;
        if n == 0 {
            return Err("connection closed before the request ended".into());
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let mut first = lines.next().unwrap_or("").split(' ');
    let (Some(method), Some(path), Some(version)) = (first.next(), first.next(), first.next())
    else {
        return Err("malformed request line".into());
    };
    if !version.starts_with("HTTP/1.") {
        return Err(format!("unsupported protocol {version}"));
    }
    let mut length = 0usize;
    for l in lines {
        if let Some((k, v)) = l.split_once(':') {
            if k.trim().eq_ignore_ascii_case("content-length") {
                length = v
                    .trim()
                    .parse()
                    .map_err(|_| "bad Content-Length".to_string())?;
            }
        }
    }
    if head_end.saturating_add(length) > MAX_REQUEST {
        return Err("request too large".into());
    }
    let mut have = buf.len() - head_end;
    while have < length {
        let n = read_by(stream, &mut chunk, deadline)?;
        if n == 0 {
            return Err("connection closed before the body ended".into());
        }
        have += n;
    }
    Ok((method.to_owned(), path.to_owned()))
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// One read, waiting at most until `deadline`.
fn read_by(mut stream: &UnixStream, buf: &mut [u8], deadline: Instant) -> Result<usize, String> {
    let left = deadline.saturating_duration_since(Instant::now());
    let ms = libc::c_int::try_from(left.as_millis()).unwrap_or(libc::c_int::MAX);
    let mut pfd = libc::pollfd {
        fd: stream.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call.
    let r = unsafe { libc::poll(&mut pfd, 1, ms) };
    if r == 0 {
        return Err("timed out reading the request".into());
    }
    if r < 0 {
        return Err(std::io::Error::last_os_error().to_string());
    }
    stream.read(buf).map_err(|e| e.to_string())
}

fn response(code: u16, reason: &str, body: Option<&str>) -> String {
    match body {
        Some(b) => format!(
            "HTTP/1.1 {code} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
             Connection: close\r\n\r\n{b}",
            b.len()
        ),
        None => format!("HTTP/1.1 {code} {reason}\r\nConnection: close\r\n\r\n"),
    }
}

fn error(code: u16, msg: &str) -> String {
    let reason = match code {
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        _ => "Internal Server Error",
    };
    response(code, reason, Some(&format!("{}\n", json_string(msg))))
}

/// `s` as a JSON string literal.
pub fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if u32::from(c) < 0x20 => out.push_str(&format!("\\u{:04x}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Stops the vCPUs, then each disk's I/O threads, which finish the requests in hand and flush:
/// while paused, the guest's images do not change. Undone when either does not stop in time.
fn pause_vm(c: &Control) -> Result<(), &'static str> {
    if !c.pause.pause() {
        return Err("the vCPUs did not stop in time; the VM runs on");
    }
    let deadline = Instant::now() + PAUSE_DEADLINE;
    if c.io.iter().all(|q| q.set(true, deadline)) {
        Ok(())
    } else {
        resume_vm(c);
        Err("a disk did not finish its requests in time; the VM runs on")
    }
}

/// Lets the disks' I/O threads serve again, then the vCPUs run.
fn resume_vm(c: &Control) {
    let deadline = Instant::now() + PAUSE_DEADLINE;
    for q in &c.io {
        if !q.set(false, deadline) {
            crate::report!("vmm: a disk's I/O thread did not acknowledge the resume in time");
        }
    }
    c.pause.resume();
}

fn route(method: &str, path: &str, c: &Control) -> String {
    let Some(endpoint) = path.strip_prefix("/api/v1/") else {
        return error(404, &format!("no such endpoint: {path}"));
    };
    let get = method == "GET";
    let put = method == "PUT";
    match (endpoint, get, put) {
        ("vmm.ping", true, _) => response(
            200,
            "OK",
            Some(&format!(
                "{{\"build_version\":{v},\"version\":{v},\"pid\":{},\"features\":[]}}",
                std::process::id(),
                v = json_string(env!("CARGO_PKG_VERSION")),
            )),
        ),
        ("vm.info", true, _) => {
            let state = if c.pause.paused() {
                "Paused"
            } else {
                "Running"
            };
            response(
                200,
                "OK",
                Some(&format!(
                    "{{\"config\":{},\"state\":\"{state}\",\"memory_actual_size\":{}}}",
                    c.config, c.memory
                )),
            )
        }
        ("vm.counters", true, _) => {
            let mut body = String::from("{");
            for (i, (id, s)) in c.disks.iter().enumerate() {
                if i > 0 {
                    body.push(',');
                }
                body.push_str(&format!(
                    "{}:{{\"read_bytes\":{},\"read_ops\":{},\"write_bytes\":{},\"write_ops\":{}}}",
                    json_string(id),
                    s.read_bytes.load(Ordering::Relaxed),
                    s.read_ops.load(Ordering::Relaxed),
                    s.write_bytes.load(Ordering::Relaxed),
                    s.write_ops.load(Ordering::Relaxed),
                ));
            }
            body.push('}');
            response(200, "OK", Some(&body))
        }
        // As Cloud Hypervisor's state machine: pausing a paused VM, or resuming a running
        // one, is refused.
        ("vm.pause", _, true) => {
            if c.pause.paused() {
                error(500, "the VM is already paused")
            } else {
                match pause_vm(c) {
                    Ok(()) => response(204, "No Content", None),
                    Err(e) => error(500, e),
                }
            }
        }
        ("vm.resume", _, true) => {
            if c.pause.paused() {
                resume_vm(c);
                response(204, "No Content", None)
            } else {
                error(500, "the VM is not paused")
            }
        }
        ("vm.power-button", _, true) => match c.power_button.write(1) {
            Ok(()) => response(204, "No Content", None),
            Err(e) => error(
                500,
                &format!("cannot raise the power button's interrupt: {e}"),
            ),
        },
        ("vm.shutdown" | "vmm.shutdown", _, true) => {
            // A paused guest must run again for the stop to flush in order.
            resume_vm(c);
            let _ = c.exit.send(VmExit::ApiShutdown);
            response(204, "No Content", None)
        }
        ("vmm.ping" | "vm.info" | "vm.counters", false, _)
        | (
            "vm.pause" | "vm.resume" | "vm.power-button" | "vm.shutdown" | "vmm.shutdown",
            _,
            false,
        ) => error(405, &format!("{method} is not allowed on {endpoint}")),
        _ => error(404, &format!("no such endpoint: {endpoint}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn control() -> (Control, std::sync::mpsc::Receiver<VmExit>) {
        let (tx, rx) = std::sync::mpsc::channel();
        let stats = Arc::new(DiskStats::default());
        stats.read_ops.store(3, Ordering::Relaxed);
        stats.read_bytes.store(1536, Ordering::Relaxed);
        (
            Control {
                exit: tx,
                pause: Arc::default(),
                io: Vec::new(),
                disks: vec![("_disk0".into(), stats)],
                config: "{}".into(),
                memory: 1 << 20,
                power_button: vmm_sys_util::eventfd::EventFd::new(0).unwrap(),
            },
            rx,
        )
    }

    fn request(listener: &UnixListener, c: &Control, req: &[u8]) -> String {
        let path = listener.local_addr().unwrap();
        let mut s = UnixStream::connect(path.as_pathname().unwrap()).unwrap();
        s.write_all(req).unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let (mut conn, _) = listener.accept().unwrap();
        let reply = match read_request(&conn) {
            Ok((m, p)) => route(&m, &p, c),
            Err(e) => error(400, &e),
        };
        conn.write_all(reply.as_bytes()).unwrap();
        drop(conn);
        // The server may close with part of a refused request unread: the reply can then be
        // lost to a reset, as with any HTTP server.
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    }

    #[test]
    fn endpoints_answer_as_cloud_hypervisor_does() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("api.sock");
        let l = bind(&sock).unwrap();
        let (c, rx) = control();
        let r = request(
            &l,
            &c,
            b"GET /api/v1/vmm.ping HTTP/1.1\r\nHost: localhost\r\n\r\n",
        );
        assert!(r.starts_with("HTTP/1.1 200 OK\r\n"), "{r}");
        assert!(
            r.contains(&format!("\"pid\":{}", std::process::id())),
            "{r}"
        );
        let r = request(&l, &c, b"GET /api/v1/vm.counters HTTP/1.1\r\n\r\n");
        assert!(
            r.ends_with("{\"_disk0\":{\"read_bytes\":1536,\"read_ops\":3,\"write_bytes\":0,\"write_ops\":0}}"),
            "{r}"
        );
        let r = request(&l, &c, b"GET /api/v1/vm.info HTTP/1.1\r\n\r\n");
        assert!(r.contains("\"state\":\"Running\""), "{r}");
        // No vCPU threads here: a pause parks none and is done at once.
        let r = request(
            &l,
            &c,
            b"PUT /api/v1/vm.pause HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
        );
        assert!(r.starts_with("HTTP/1.1 204 "), "{r}");
        let r = request(&l, &c, b"GET /api/v1/vm.info HTTP/1.1\r\n\r\n");
        assert!(r.contains("\"state\":\"Paused\""), "{r}");
        // Cloud Hypervisor refuses a pause of a paused VM, and a resume of a running one.
        let r = request(&l, &c, b"PUT /api/v1/vm.pause HTTP/1.1\r\n\r\n");
        assert!(
            r.starts_with("HTTP/1.1 500 ") && r.contains("already paused"),
            "{r}"
        );
        assert!(c.pause.paused());
        let r = request(&l, &c, b"PUT /api/v1/vm.resume HTTP/1.1\r\n\r\n");
        assert!(r.starts_with("HTTP/1.1 204 "), "{r}");
        assert!(!c.pause.paused());
        let r = request(&l, &c, b"PUT /api/v1/vm.resume HTTP/1.1\r\n\r\n");
        assert!(
            r.starts_with("HTTP/1.1 500 ") && r.contains("not paused"),
            "{r}"
        );
        let r = request(&l, &c, b"PUT /api/v1/vm.power-button HTTP/1.1\r\n\r\n");
        assert!(r.starts_with("HTTP/1.1 204 "), "{r}");
        assert_eq!(c.power_button.read().unwrap(), 1);
        // A body is read and ignored.
        let r = request(
            &l,
            &c,
            b"PUT /api/v1/vm.shutdown HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}",
        );
        assert!(r.starts_with("HTTP/1.1 204 "), "{r}");
        assert!(matches!(rx.try_recv(), Ok(VmExit::ApiShutdown)));
    }

    #[test]
    fn bad_requests_get_errors_not_panics() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("api.sock");
        let l = bind(&sock).unwrap();
        let (c, rx) = control();
        for (req, code) in [
            (&b"GET /api/v1/vm.nothing HTTP/1.1\r\n\r\n"[..], "404"),
            (b"GET /elsewhere HTTP/1.1\r\n\r\n", "404"),
            (b"PUT /api/v1/vm.info HTTP/1.1\r\n\r\n", "405"),
            (b"GET /api/v1/vm.pause HTTP/1.1\r\n\r\n", "405"),
            (b"GET\r\n\r\n", "400"),
            (b"GET / SPDY/3\r\n\r\n", "400"),
            (
                b"PUT /api/v1/vm.pause HTTP/1.1\r\nContent-Length: x\r\n\r\n",
                "400",
            ),
            (
                b"PUT /api/v1/vm.pause HTTP/1.1\r\nContent-Length: 99999999999\r\n\r\n",
                "400",
            ),
        ] {
            let r = request(&l, &c, req);
            assert!(r.starts_with(&format!("HTTP/1.1 {code} ")), "{r}");
        }
        assert!(!c.pause.paused());
        assert!(rx.try_recv().is_err());
        // Too long a request, and a client that closes early.
        let mut big = b"GET /api/v1/vmm.ping HTTP/1.1\r\n".to_vec();
        big.extend(std::iter::repeat_n(b'x', MAX_REQUEST));
        let r = request(&l, &c, &big);
        assert!(r.is_empty() || r.starts_with("HTTP/1.1 400 "), "{r}");
        assert!(request(&l, &c, b"GET /api/v1/vm").starts_with("HTTP/1.1 400 "));
    }

    #[test]
    fn a_stale_socket_is_replaced_and_anything_else_refused() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("api.sock");
        let l = bind(&sock).unwrap();
        // In use: refused.
        assert!(bind(&sock).is_err());
        drop(l);
        // Stale: replaced.
        bind(&sock).unwrap();
        let file = dir.path().join("file");
        std::fs::write(&file, b"keep").unwrap();
        assert!(bind(&file).is_err());
        assert_eq!(std::fs::read(&file).unwrap(), b"keep");
    }

    #[test]
    fn json_strings_are_escaped() {
        assert_eq!(
            json_string("a \"b\"\\\n\u{1}"),
            "\"a \\\"b\\\"\\\\\\n\\u0001\""
        );
    }
}
