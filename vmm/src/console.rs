//! The host side of the serial console and of stopping the VMM from outside.
//!
//! - **Keyboard input.** With `--serial stdio`, what arrives on standard input goes into COM1's
//!   receive FIFO. A full FIFO holds input back until the guest reads (the UART tells us through
//!   [`RxRoom`]), so piped input is never lost.
//! - **The terminal.** When standard input is a terminal it is put in raw mode for the run
//!   (every key, Ctrl-C included, goes to the guest, as qemu's `-nographic` does) and restored on
//!   every way out. An escape character, Ctrl-A as in qemu, gives the user the VMM's own keys:
//!   `Ctrl-A x` stops the VMM (disks flushed and closed), `Ctrl-A Ctrl-A` sends one Ctrl-A,
//!   `Ctrl-A h` lists them.
//! - **Signals.** SIGTERM, SIGINT and SIGHUP stop the VMM the same orderly way instead of
//!   killing it with its disks' caches unwritten, their bitmaps marked in use and a `snapshot=on`
//!   overlay left behind. They are blocked in every thread and taken by one that waits for them.

use std::io::Write;
use std::os::fd::RawFd;
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};

use vm_superio::serial::{Error as SerialError, SerialEvents};
use vmm_sys_util::eventfd::EventFd;

use crate::legacy::{SerialDevice, VmExit};
use crate::seccomp::{self, Filters, Kind};

/// The escape character: Ctrl-A.
pub const ESCAPE: u8 = 0x01;

/// Guest-bound bytes held while the FIFO is full, at most. Past it, piped input waits and a
/// terminal's keys are dropped (a UART overrun) so that `Ctrl-A x` is still read.
const PENDING_MAX: usize = 4096;

/// The help `Ctrl-A h` prints (raw mode: lines end in CR LF).
const HELP: &str = "\r\nC-a h    print this help\r\nC-a x    exit the VMM (disks are flushed and closed)\r\nC-a C-a  send C-a to the guest\r\n";

/// Tells the console's input thread that the guest read from COM1's receive FIFO: an eventfd
/// written on every byte read.
pub struct RxRoom(pub EventFd);

impl SerialEvents for RxRoom {
    fn buffer_read(&self) {
        let _ = self.0.write(1);
    }
    fn out_byte(&self) {}
    fn tx_lost_byte(&self) {}
    fn in_buffer_empty(&self) {}
}

/// What a key sequence asked of the VMM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// `Ctrl-A x`: stop the VMM.
    Quit,
    /// `Ctrl-A h`: print the keys.
    Help,
}

/// Splits terminal input into bytes for the guest and the VMM's own commands.
#[derive(Debug, Default)]
pub struct Escapes {
    /// The previous byte was the escape character.
    pending: bool,
}

impl Escapes {
    /// Appends the guest's share of `input` to `out`; the first command met ends the scan (what
    /// follows a quit does not matter).
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> Option<Command> {
        let mut cmd = None;
        for &b in input {
            if !self.pending {
                if b == ESCAPE {
                    self.pending = true;
                } else {
                    out.push(b);
                }
                continue;
            }
            self.pending = false;
            match b {
                ESCAPE => out.push(ESCAPE),
                b'x' | b'X' => return Some(Command::Quit),
                b'h' | b'H' | b'?' => cmd = Some(Command::Help),
                // Unknown commands are dropped, escape and all, as qemu's are.
                _ => {}
            }
        }
        cmd
    }
}

/// Where the console's input comes from.
pub enum Input {
    /// A terminal, in raw mode until this is dropped.
    Terminal(RawTerminal),
    /// A pipe or file: passed through as it is.
    Stream,
    /// A terminal this process does not own (started in the background): reading it or
    /// changing its settings would stop the process (SIGTTIN, SIGTTOU), so it is left alone.
    None,
}

impl Input {
    /// What standard input is, with a terminal switched to raw mode.
    pub fn stdin() -> Input {
        const STDIN: RawFd = 0;
        // SAFETY: isatty, tcgetpgrp and getpgrp only inspect the descriptor and the process.
        let (tty, owner, group) = unsafe {
            (
                libc::isatty(STDIN) == 1,
                libc::tcgetpgrp(STDIN),
                libc::getpgrp(),
            )
        };
        // Job control applies to the controlling terminal alone; tcgetpgrp fails on any other,
        // which this process may use freely.
        let foreground = owner < 0 || owner == group;
        if !tty {
            return Input::Stream;
        }
        if !foreground {
            return Input::None;
        }
        RawTerminal::enter(STDIN).map_or(Input::None, Input::Terminal)
    }
}

/// A pseudo-terminal for `--serial pty`: the guest's console on the slave side, which a user
/// attaches to (`screen /dev/pts/N`), the VMM on the master side.
pub struct Pty {
    master: std::os::fd::OwnedFd,
    /// Held open, so that reading the master waits for a user rather than failing with EIO
    /// while none is attached.
    _slave: std::os::fd::OwnedFd,
    /// The slave's path.
    pub path: String,
}

impl Pty {
    /// A new pseudo-terminal in raw mode (no echo, no line editing), its master non-blocking so
    /// that guest output is dropped, not waited on, while nobody reads it.
    ///
    /// # Errors
    /// openpty's, ttyname's or the settings' error.
    pub fn open() -> std::io::Result<Pty> {
        use std::os::fd::{FromRawFd, OwnedFd};
        let (mut m, mut s) = (-1, -1);
        // SAFETY: openpty writes two descriptors; name, termios and window size are optional.
        let r = unsafe {
            libc::openpty(
                &mut m,
                &mut s,
                std::ptr::null_mut(),
                std::ptr::null(),
                std::ptr::null(),
            )
        };
        if r != 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: openpty succeeded: both are open descriptors that nothing else owns.
        let (master, slave) = unsafe { (OwnedFd::from_raw_fd(m), OwnedFd::from_raw_fd(s)) };
        let mut name = [0 as libc::c_char; 128];
        // SAFETY: `name` is valid for its length.
        let r = unsafe { libc::ttyname_r(s, name.as_mut_ptr(), name.len()) };
        if r != 0 {
            return Err(std::io::Error::from_raw_os_error(r));
        }
        // SAFETY: ttyname_r wrote a NUL-terminated string into `name`.
        let path = unsafe { std::ffi::CStr::from_ptr(name.as_ptr()) }
            .to_string_lossy()
            .into_owned();
        // SAFETY: termios is plain data, filled by tcgetattr before use.
        let mut t: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: `t` is a valid termios; `s` is the open slave.
        let ok = unsafe {
            libc::tcgetattr(s, &mut t) == 0 && {
                libc::cfmakeraw(&mut t);
                libc::tcsetattr(s, libc::TCSANOW, &t) == 0
            }
        };
        // SAFETY: fcntl on the open master.
        let ok = ok
            && unsafe {
                let fl = libc::fcntl(m, libc::F_GETFL);
                fl >= 0 && libc::fcntl(m, libc::F_SETFL, fl | libc::O_NONBLOCK) == 0
            };
        if !ok {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Pty {
            master,
            _slave: slave,
            path,
        })
    }

    /// The master, where the guest's output goes.
    ///
    /// # Errors
    /// dup's error.
    pub fn writer(&self) -> std::io::Result<std::fs::File> {
        Ok(std::fs::File::from(self.master.try_clone()?))
    }

    /// The master's descriptor, for the input thread.
    pub fn fd(&self) -> RawFd {
        std::os::fd::AsRawFd::as_raw_fd(&self.master)
    }
}

/// A terminal in raw mode, restored when dropped.
pub struct RawTerminal {
    fd: RawFd,
    saved: libc::termios,
}

impl RawTerminal {
    /// Puts the terminal on `fd` in raw mode: no line editing, echo or signal keys, no CR to LF
    /// on input, 8-bit characters, one byte per read; output processing stays on, so the guest's
    /// lines come out as they would on a serial terminal. `None` when `fd` is not a terminal.
    pub fn enter(fd: RawFd) -> Option<RawTerminal> {
        // SAFETY: isatty only inspects the descriptor.
        if unsafe { libc::isatty(fd) } != 1 {
            return None;
        }
        // SAFETY: termios is plain data; tcgetattr fills it or fails without touching memory
        // beyond it.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: `saved` is a valid termios to write into.
        if unsafe { libc::tcgetattr(fd, &mut saved) } != 0 {
            return None;
        }
        let mut raw = saved;
        raw.c_iflag &= !(libc::IGNBRK
            | libc::BRKINT
            | libc::PARMRK
            | libc::ISTRIP
            | libc::INLCR
            | libc::IGNCR
            | libc::ICRNL
            | libc::IXON);
        raw.c_lflag &= !(libc::ECHO | libc::ECHONL | libc::ICANON | libc::ISIG | libc::IEXTEN);
        raw.c_cflag &= !(libc::CSIZE | libc::PARENB);
        raw.c_cflag |= libc::CS8;
        raw.c_cc[libc::VMIN] = 1;
        raw.c_cc[libc::VTIME] = 0;
        // SAFETY: `raw` is a valid termios derived from the terminal's own.
        if unsafe { libc::tcsetattr(fd, libc::TCSANOW, &raw) } != 0 {
            return None;
        }
        Some(RawTerminal { fd, saved })
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        // SAFETY: `saved` is the termios tcgetattr returned for this descriptor.
        unsafe { libc::tcsetattr(self.fd, libc::TCSANOW, &self.saved) };
    }
}

/// The signals that stop the VMM in order.
const STOP_SIGNALS: [libc::c_int; 3] = [libc::SIGTERM, libc::SIGINT, libc::SIGHUP];

fn stop_signal_set() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data, initialised by sigemptyset before use.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t; the signal numbers are valid.
    unsafe {
        libc::sigemptyset(&mut set);
        for s in STOP_SIGNALS {
            libc::sigaddset(&mut set, s);
        }
    }
    set
}

/// Blocks the stop signals in the calling thread, and so in every thread it starts afterwards.
/// Call it before any other thread exists.
///
/// # Errors
/// pthread_sigmask's error.
pub fn block_stop_signals() -> std::io::Result<()> {
    let set = stop_signal_set();
    // SAFETY: `set` is a valid signal set; the old mask is not wanted.
    let r = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::from_raw_os_error(r))
    }
}

/// Starts the thread that takes the stop signals (blocked by [`block_stop_signals`]) and reports
/// the first as [`VmExit::Signal`].
///
/// # Errors
/// The thread could not be started.
pub fn spawn_signal_waiter(exit: Sender<VmExit>, filters: &Arc<Filters>) -> std::io::Result<()> {
    seccomp::spawn("signals", filters, Kind::Signals, move || {
        let set = stop_signal_set();
        loop {
            let mut sig: libc::c_int = 0;
            // SAFETY: `set` and `sig` are valid for the call; the signals in `set` are
            // blocked in every thread, so sigwait is the only taker.
            if unsafe { libc::sigwait(&set, &mut sig) } == 0 {
                let _ = exit.send(VmExit::Signal(sig));
                return;
            }
        }
    })
    .map(|_| ())
}

/// Starts the thread that feeds `input_fd` (standard input, or a pseudo-terminal's master) to
/// COM1. With `terminal`, the escape keys are read; otherwise every byte goes to the guest. End
/// of input ends the thread, not the VM.
///
/// # Errors
/// The thread could not be started.
pub fn spawn_input(
    input_fd: RawFd,
    serial: Arc<Mutex<SerialDevice>>,
    room: EventFd,
    terminal: bool,
    exit: Sender<VmExit>,
    filters: &Arc<Filters>,
) -> std::io::Result<()> {
    seccomp::spawn("console", filters, Kind::Console, move || {
        feed_input(input_fd, &serial, &room, terminal, &exit);
    })
    .map(|_| ())
}

/// Moves as much of `pending` into the FIFO as it takes.
fn enqueue(serial: &Mutex<SerialDevice>, pending: &mut Vec<u8>) {
    if pending.is_empty() {
        return;
    }
    let mut s = serial
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    match s.0.enqueue_raw_bytes(pending) {
        Ok(n) => {
            pending.drain(..n.min(pending.len()));
        }
        Err(SerialError::FullFifo) => {}
        Err(e) => crate::report!("vmm: serial input: {e:?}\r"),
    }
}

fn feed_input(
    input_fd: RawFd,
    serial: &Mutex<SerialDevice>,
    room: &EventFd,
    terminal: bool,
    exit: &Sender<VmExit>,
) {
    let mut escapes = Escapes::default();
    let mut pending: Vec<u8> = Vec::new();
    let mut buf = [0u8; 1024];
    let mut input_open = true;
    loop {
        enqueue(serial, &mut pending);
        let read_input = input_open && (terminal || pending.len() < PENDING_MAX);
        if !read_input && pending.is_empty() {
            return;
        }
        let mut fds = [
            libc::pollfd {
                fd: if read_input { input_fd } else { -1 },
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: if pending.is_empty() {
                    -1
                } else {
                    std::os::fd::AsRawFd::as_raw_fd(room)
                },
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: `fds` is a valid array of two pollfd; negative descriptors are ignored.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if r < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return;
        }
        if fds[1].revents != 0 {
            let _ = room.read();
        }
        if fds[0].revents == 0 {
            continue;
        }
        // SAFETY: `buf` is valid for `buf.len()` bytes of writing.
        let n = unsafe { libc::read(input_fd, buf.as_mut_ptr().cast(), buf.len()) };
        let Ok(n) = usize::try_from(n) else {
            // A pseudo-terminal's master is non-blocking.
            if !matches!(
                std::io::Error::last_os_error().kind(),
                std::io::ErrorKind::Interrupted | std::io::ErrorKind::WouldBlock
            ) {
                input_open = false;
            }
            continue;
        };
        if n == 0 {
            input_open = false;
            continue;
        }
        let input = buf.get(..n).unwrap_or_default();
        if !terminal {
            pending.extend_from_slice(input);
            continue;
        }
        let mut keys = Vec::with_capacity(n);
        let cmd = escapes.feed(input, &mut keys);
        let room_left = PENDING_MAX.saturating_sub(pending.len());
        pending.extend(keys.into_iter().take(room_left));
        match cmd {
            Some(Command::Quit) => {
                let _ = exit.send(VmExit::ConsoleQuit);
                return;
            }
            Some(Command::Help) => {
                let mut e = std::io::stderr();
                let _ = e.write_all(HELP.as_bytes());
                let _ = e.flush();
            }
            None => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pty_nobody_reads_refuses_output_instead_of_blocking() {
        let p = Pty::open().unwrap();
        assert!(p.path.starts_with("/dev/pts/"), "{}", p.path);
        let mut w = p.writer().unwrap();
        let chunk = [b'x'; 1024];
        let mut written = 0usize;
        let err = loop {
            match w.write(&chunk) {
                Ok(n) => written += n,
                Err(e) => break e,
            }
            assert!(written < 64 << 20, "the pty never filled");
        };
        assert_eq!(err.kind(), std::io::ErrorKind::WouldBlock);
        assert!(written > 0);
        // Raw: what is written comes out unchanged on the slave side.
        let mut slave = std::fs::OpenOptions::new()
            .read(true)
            .open(&p.path)
            .unwrap();
        let mut b = [0u8; 16];
        use std::io::Read;
        assert_eq!(slave.read(&mut b).unwrap(), 16);
        assert_eq!(b, [b'x'; 16]);
    }

    fn run(chunks: &[&[u8]]) -> (Vec<u8>, Vec<Command>) {
        let mut e = Escapes::default();
        let mut out = Vec::new();
        let mut cmds = Vec::new();
        for c in chunks {
            if let Some(cmd) = e.feed(c, &mut out) {
                cmds.push(cmd);
            }
        }
        (out, cmds)
    }

    #[test]
    fn escapes_plain_keys_pass_through() {
        assert_eq!(
            run(&[b"ls -l\r", b"\x03"]),
            (b"ls -l\r\x03".to_vec(), vec![])
        );
    }

    #[test]
    fn escapes_double_escape_sends_one() {
        assert_eq!(run(&[b"a\x01\x01b"]), (b"a\x01b".to_vec(), vec![]));
        // Split across reads.
        assert_eq!(run(&[b"a\x01", b"\x01b"]), (b"a\x01b".to_vec(), vec![]));
    }

    #[test]
    fn escapes_x_quits_and_unknown_is_dropped() {
        assert_eq!(
            run(&[b"ab\x01", b"xcd"]),
            (b"ab".to_vec(), vec![Command::Quit])
        );
        assert_eq!(run(&[b"a\x01zb"]), (b"ab".to_vec(), vec![]));
        assert_eq!(run(&[b"\x01hq"]), (b"q".to_vec(), vec![Command::Help]));
    }
}
