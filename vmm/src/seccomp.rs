//! Seccomp sandboxing: every thread of the VMM runs under a filter that allows the system calls
//! its work needs and nothing else, as Firecracker and Cloud Hypervisor confine theirs.
//!
//! A guest that takes over a thread (through a bug in the virtio parser, say) can then neither
//! open files, nor start programs, nor reach the network: the thread can only do what it was
//! already doing. The filters are per thread kind ([`Kind`]), installed by the thread itself
//! before it runs any code that sees guest data ([`spawn`]), and by the main thread once set-up
//! is done ([`enter`]). Threads inherit the filters of the thread that starts them, so every
//! thread is started by the main thread before the main thread's own filter goes on.
//!
//! A vCPU, the thread the guest drives most directly, may `write` only to the descriptors its
//! devices write to ([`Filters::with_vcpu_writes`]). An image's descriptor is not among them:
//! its file position stays 0, so a stray `write` to it would land on the image's header.
//!
//! `--seccomp true` (the default) stops the VMM with a message naming the thread and the system
//! call when a filter refuses one (opening a file only fails, with EACCES: see
//! [`REFUSED_OPENS`]); `--seccomp log` lets the call through and has the kernel log
//! it (audit), to find what a new code path needs; `--seccomp false` installs nothing.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::os::fd::RawFd;
use std::str::FromStr;
use std::sync::Arc;
use std::thread::JoinHandle;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// What a filter does with a system call it does not allow (`--seccomp`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Stop the VMM, naming the thread and the call (SIGSYS, caught).
    Enforce,
    /// Allow the call and have the kernel log it.
    Log,
    /// No filters.
    Off,
}

impl FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "true" | "on" => Ok(Mode::Enforce),
            "log" => Ok(Mode::Log),
            "false" | "off" => Ok(Mode::Off),
            _ => Err(format!("'{s}': expected true, false or log")),
        }
    }
}

/// The kinds of thread, each with its own filter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// The main thread once the VM runs: waits for the exit, then stops the devices, flushes
    /// and closes the disks and restores the terminal.
    Main,
    /// A vCPU: KVM_RUN and the device emulation its exits call into.
    Vcpu,
    /// A virtio-blk queue's I/O thread: the image's file I/O.
    Io,
    /// The console's input thread: standard input into COM1.
    Console,
    /// The thread that takes the stop signals.
    Signals,
    /// The API socket's thread: accepts, reads, writes, and signals vCPUs to pause them.
    Api,
}

impl Kind {
    const ALL: [Kind; 6] = [
        Kind::Main,
        Kind::Vcpu,
        Kind::Io,
        Kind::Console,
        Kind::Signals,
        Kind::Api,
    ];

    fn name(self) -> &'static str {
        match self {
            Kind::Main => "main",
            Kind::Vcpu => "vcpu",
            Kind::Io => "virtio-blk I/O",
            Kind::Console => "console",
            Kind::Signals => "signal",
            Kind::Api => "API",
        }
    }

    fn index(self) -> usize {
        match self {
            Kind::Main => 0,
            Kind::Vcpu => 1,
            Kind::Io => 2,
            Kind::Console => 3,
            Kind::Signals => 4,
            Kind::Api => 5,
        }
    }
}

/// Setting up the filters failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// seccompiler refused a rule or could not compile the filter.
    #[error("building the {kind} thread's seccomp filter: {source}")]
    Build {
        /// The thread kind.
        kind: &'static str,
        /// seccompiler's error.
        source: seccompiler::BackendError,
    },
    /// The kernel refused the filter (no seccomp support?).
    #[error("installing the {kind} thread's seccomp filter: {source}")]
    Install {
        /// The thread kind.
        kind: &'static str,
        /// seccompiler's error.
        source: seccompiler::Error,
    },
    /// The SIGSYS handler could not be installed.
    #[error("installing the SIGSYS handler: {0}")]
    Handler(std::io::Error),
    /// No filter was built for this kind of thread.
    #[error("no seccomp filter for the {0} thread")]
    Missing(&'static str),
}

/// Calls every thread may make: memory allocation, locks, thread exit, signal return, the
/// messages on standard error, closing what it owns.
const COMMON: &[i64] = &[
    libc::SYS_brk,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    libc::SYS_futex,
    libc::SYS_sched_yield,
    libc::SYS_sched_getaffinity,
    libc::SYS_gettid,
    libc::SYS_getpid,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_sigaltstack,
    libc::SYS_restart_syscall,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_getrandom,
    libc::SYS_close,
    libc::SYS_fcntl,
];

/// File I/O on images already open (qcow2 metadata and data, discards, flushes, growth).
const FILE_IO: &[i64] = &[
    libc::SYS_read,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_preadv2,
    libc::SYS_pwritev2,
    libc::SYS_lseek,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_sync_file_range,
    libc::SYS_fallocate,
    libc::SYS_ftruncate,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
];

vmm_sys_util::ioctl_io_nr!(KVM_RUN, kvm_bindings::KVMIO, 0x80);
vmm_sys_util::ioctl_ior_nr!(
    KVM_GET_REGS,
    kvm_bindings::KVMIO,
    0x81,
    kvm_bindings::kvm_regs
);

/// The system calls a thread kind may make beyond [`COMMON`], each with the ioctl requests it
/// may issue. `write` is every kind's but a vCPU's, which [`build`] restricts to descriptors.
fn allowed(kind: Kind) -> (Vec<i64>, Vec<u64>) {
    let mut calls = COMMON.to_vec();
    let mut ioctls = Vec::new();
    if kind != Kind::Vcpu {
        calls.push(libc::SYS_write);
    }
    match kind {
        Kind::Main => {
            calls.extend_from_slice(FILE_IO);
            calls.extend_from_slice(&[libc::SYS_mincore, libc::SYS_ioctl]);
            // Restoring the terminal's settings.
            ioctls.extend([libc::TCGETS, libc::TCSETS, libc::TCSETSW, libc::TCSETSF]);
        }
        Kind::Vcpu => {
            calls.push(libc::SYS_ioctl);
            // Running the guest, and reading its registers for a failure's message.
            ioctls.extend([KVM_RUN(), KVM_GET_REGS()]);
        }
        Kind::Io => {
            calls.extend_from_slice(FILE_IO);
            calls.extend_from_slice(&[
                libc::SYS_epoll_wait,
                libc::SYS_epoll_pwait,
                // Arming the throttling timer.
                libc::SYS_timerfd_settime,
            ]);
        }
        Kind::Console => {
            calls.extend_from_slice(&[libc::SYS_read, libc::SYS_poll, libc::SYS_ppoll]);
        }
        Kind::Signals => calls.push(libc::SYS_rt_sigtimedwait),
        Kind::Api => calls.extend_from_slice(&[
            libc::SYS_accept,
            libc::SYS_accept4,
            libc::SYS_read,
            libc::SYS_recvfrom,
            libc::SYS_sendto,
            libc::SYS_poll,
            libc::SYS_ppoll,
            // pthread_kill, to interrupt KVM_RUN for a pause.
            libc::SYS_tgkill,
        ]),
    }
    (calls, ioctls)
}

/// Opening a file fails with EACCES instead of stopping the VMM: glibc's allocator opens
/// `/proc/sys/vm/overcommit_memory` the first time it shrinks a thread's heap, in whichever
/// thread that happens, and copes when it cannot. No file is opened either way.
const REFUSED_OPENS: &[i64] = &[libc::SYS_open, libc::SYS_openat];

/// `kind`'s filters: the allow-list (anything else traps, or is logged), and a second filter
/// that makes the opens the first lets through fail with EACCES (the kernel takes the most
/// restrictive answer of all a thread's filters, and ERRNO ranks above ALLOW, below TRAP).
/// A vCPU's `write` is allowed on standard error and on `writes` alone.
fn build(kind: Kind, mode: Mode, writes: &[RawFd]) -> Result<Vec<BpfProgram>, Error> {
    let err = |source| Error::Build {
        kind: kind.name(),
        source,
    };
    let (mut calls, ioctls) = allowed(kind);
    calls.extend_from_slice(REFUSED_OPENS);
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
        calls.into_iter().map(|c| (c, vec![])).collect();
    if kind == Kind::Vcpu {
        // Never an empty chain, which seccompiler reads as "any arguments": standard error (the
        // SIGSYS handler's message) is always in it.
        let mut fds = vec![libc::STDERR_FILENO];
        fds.extend(writes.iter().copied().filter(|&fd| fd >= 0));
        fds.sort_unstable();
        fds.dedup();
        let mut chain = Vec::new();
        for fd in fds {
            let fd = u64::from(fd.unsigned_abs());
            let cond = SeccompCondition::new(0, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, fd)
                .map_err(err)?;
            chain.push(SeccompRule::new(vec![cond]).map_err(err)?);
        }
        rules.insert(libc::SYS_write, chain);
    }
    if !ioctls.is_empty() {
        let mut chain = Vec::new();
        for req in ioctls {
            let cond = SeccompCondition::new(1, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, req)
                .map_err(err)?;
            chain.push(SeccompRule::new(vec![cond]).map_err(err)?);
        }
        rules.insert(libc::SYS_ioctl, chain);
    }
    let (refuse, fail_opens) = match mode {
        Mode::Log => (SeccompAction::Log, SeccompAction::Log),
        _ => (
            SeccompAction::Trap,
            SeccompAction::Errno(libc::EACCES.unsigned_abs()),
        ),
    };
    let allow =
        SeccompFilter::new(rules, refuse, SeccompAction::Allow, TargetArch::x86_64).map_err(err)?;
    let opens = REFUSED_OPENS.iter().map(|&c| (c, vec![])).collect();
    let opens = SeccompFilter::new(opens, SeccompAction::Allow, fail_opens, TargetArch::x86_64)
        .map_err(err)?;
    // In the order they are installed: installing one takes prctl and seccomp, which the
    // allow-list does not allow.
    Ok(vec![
        opens.try_into().map_err(err)?,
        allow.try_into().map_err(err)?,
    ])
}

/// The compiled filters of every thread kind, or none (`--seccomp false`).
#[derive(Debug)]
pub struct Filters {
    mode: Mode,
    /// By [`Kind::index`]; `None` until built (the vCPUs' waits for their descriptors).
    programs: Vec<Option<Vec<BpfProgram>>>,
}

impl Filters {
    /// Compiles the filters for `mode`, but the vCPUs' ([`Filters::with_vcpu_writes`]); with
    /// [`Mode::Enforce`] also installs the handler that reports a refused call.
    ///
    /// # Errors
    /// A filter cannot be compiled or the handler installed.
    pub fn new(mode: Mode) -> Result<Arc<Filters>, Error> {
        if mode == Mode::Off {
            return Ok(Filters::none());
        }
        let programs = Kind::ALL
            .iter()
            .map(|&k| (k != Kind::Vcpu).then(|| build(k, mode, &[])).transpose())
            .collect::<Result<Vec<_>, _>>()?;
        if mode == Mode::Enforce {
            install_sigsys_handler().map_err(Error::Handler)?;
        }
        Ok(Arc::new(Filters { mode, programs }))
    }

    /// These filters with the vCPUs' added: a vCPU may `write` to standard error and to
    /// `fds` (the serial console's output, the eventfds its devices signal), nothing else.
    ///
    /// # Errors
    /// The vCPU filter cannot be compiled.
    pub fn with_vcpu_writes(&self, fds: &[RawFd]) -> Result<Arc<Filters>, Error> {
        if self.mode == Mode::Off {
            return Ok(Filters::none());
        }
        let mut programs = self.programs.clone();
        if let Some(slot) = programs.get_mut(Kind::Vcpu.index()) {
            *slot = Some(build(Kind::Vcpu, self.mode, fds)?);
        }
        Ok(Arc::new(Filters {
            mode: self.mode,
            programs,
        }))
    }

    /// No filters, for tests that drive devices directly.
    pub fn none() -> Arc<Filters> {
        Arc::new(Filters {
            mode: Mode::Off,
            programs: Vec::new(),
        })
    }
}

thread_local! {
    /// The calling thread's kind, for the SIGSYS message (index into [`Kind::ALL`] + 1; 0 when
    /// no filter is on).
    static KIND: Cell<usize> = const { Cell::new(0) };
}

/// Puts the calling thread under `kind`'s filter (nothing when the filters are off).
///
/// # Errors
/// The kernel refused the filter, or `filters` has none for `kind` (a vCPU's before
/// [`Filters::with_vcpu_writes`]): the thread must not run unconfined.
pub fn enter(filters: &Filters, kind: Kind) -> Result<(), Error> {
    if filters.mode == Mode::Off {
        return Ok(());
    }
    let Some(Some(progs)) = filters.programs.get(kind.index()) else {
        return Err(Error::Missing(kind.name()));
    };
    KIND.with(|k| k.set(kind.index() + 1));
    for prog in progs {
        seccompiler::apply_filter(prog).map_err(|source| Error::Install {
            kind: kind.name(),
            source,
        })?;
    }
    Ok(())
}

/// Starts a thread named `name` that enters `kind`'s filter before it runs `f`; returns once
/// the filter is on, or with the reason it could not be.
///
/// # Errors
/// The thread could not start or its filter could not be installed.
pub fn spawn<F, T>(
    name: &str,
    filters: &Arc<Filters>,
    kind: Kind,
    f: F,
) -> std::io::Result<JoinHandle<Option<T>>>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    let (tx, rx) = std::sync::mpsc::sync_channel::<Result<(), String>>(1);
    let filters = Arc::clone(filters);
    let handle = std::thread::Builder::new()
        .name(name.to_owned())
        .spawn(move || {
            let r = enter(&filters, kind).map_err(|e| e.to_string());
            let ok = r.is_ok();
            let _ = tx.send(r);
            drop(filters);
            // Nothing guest-facing runs unconfined; the spawner reports the failure.
            ok.then(f)
        })?;
    match rx.recv() {
        Ok(Ok(())) => Ok(handle),
        Ok(Err(e)) => Err(std::io::Error::other(e)),
        Err(_) => Err(std::io::Error::other(format!(
            "thread {name} ended at start"
        ))),
    }
}

/// A small buffer for text built in the signal handler, which must not allocate.
struct StackText {
    buf: [u8; 320],
    len: usize,
}

impl std::fmt::Write for StackText {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        let room = self.buf.len() - self.len;
        let n = s.len().min(room);
        self.buf[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        Ok(())
    }
}

/// Names of the calls a confined thread is most likely to be refused, for the message.
fn syscall_name(nr: i64) -> Option<&'static str> {
    const NAMES: &[(i64, &str)] = &[
        (libc::SYS_open, "open"),
        (libc::SYS_openat, "openat"),
        (libc::SYS_openat2, "openat2"),
        (libc::SYS_creat, "creat"),
        (libc::SYS_execve, "execve"),
        (libc::SYS_execveat, "execveat"),
        (libc::SYS_fork, "fork"),
        (libc::SYS_vfork, "vfork"),
        (libc::SYS_clone, "clone"),
        (libc::SYS_clone3, "clone3"),
        (libc::SYS_socket, "socket"),
        (libc::SYS_connect, "connect"),
        (libc::SYS_bind, "bind"),
        (libc::SYS_ptrace, "ptrace"),
        (libc::SYS_kill, "kill"),
        (libc::SYS_tgkill, "tgkill"),
        (libc::SYS_ioctl, "ioctl"),
        (libc::SYS_unlink, "unlink"),
        (libc::SYS_unlinkat, "unlinkat"),
        (libc::SYS_rename, "rename"),
        (libc::SYS_renameat2, "renameat2"),
        (libc::SYS_mkdir, "mkdir"),
        (libc::SYS_mkdirat, "mkdirat"),
        (libc::SYS_rmdir, "rmdir"),
        (libc::SYS_mount, "mount"),
        (libc::SYS_prctl, "prctl"),
        (libc::SYS_getdents64, "getdents64"),
        (libc::SYS_readlink, "readlink"),
        (libc::SYS_poll, "poll"),
        (libc::SYS_epoll_wait, "epoll_wait"),
        (libc::SYS_epoll_ctl, "epoll_ctl"),
        (libc::SYS_epoll_create1, "epoll_create1"),
        (libc::SYS_eventfd2, "eventfd2"),
        (libc::SYS_read, "read"),
        (libc::SYS_write, "write"),
        (libc::SYS_pread64, "pread64"),
        (libc::SYS_pwrite64, "pwrite64"),
        (libc::SYS_fdatasync, "fdatasync"),
        (libc::SYS_fallocate, "fallocate"),
        (libc::SYS_ftruncate, "ftruncate"),
        (libc::SYS_rt_sigaction, "rt_sigaction"),
        (libc::SYS_rt_sigtimedwait, "rt_sigtimedwait"),
        (libc::SYS_flock, "flock"),
        (libc::SYS_statx, "statx"),
        (libc::SYS_newfstatat, "newfstatat"),
        (libc::SYS_mincore, "mincore"),
        (libc::SYS_copy_file_range, "copy_file_range"),
        (libc::SYS_io_uring_setup, "io_uring_setup"),
    ];
    NAMES.iter().find(|(n, _)| *n == nr).map(|(_, s)| *s)
}

/// Offset of `si_syscall` in a SIGSYS siginfo on x86_64: signo, errno, code, padding, then
/// `_sigsys { void *_call_addr; int _syscall; unsigned _arch; }`.
const SI_SYSCALL_OFFSET: usize = 24;

extern "C" fn on_sigsys(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    use std::fmt::Write as _;
    // SAFETY: the kernel hands the handler a valid siginfo_t (128 bytes); for a seccomp SIGSYS
    // the `_sigsys` member of its union is the one filled in.
    let nr = unsafe {
        info.cast::<u8>()
            .add(SI_SYSCALL_OFFSET)
            .cast::<i32>()
            .read_unaligned()
    };
    let nr = i64::from(nr);
    let kind = KIND.with(Cell::get);
    let thread = kind
        .checked_sub(1)
        .and_then(|i| Kind::ALL.get(i))
        .map_or("unconfined", |k| k.name());
    let mut t = StackText {
        buf: [0; 320],
        len: 0,
    };
    let _ = writeln!(
        t,
        "vmm: seccomp: the {thread} thread made system call {nr} ({}), which its filter does \
         not allow; stopping. Run with --seccomp log to let such calls through (the kernel's \
         audit log names them).",
        syscall_name(nr).unwrap_or("?")
    );
    // SAFETY: write and _exit are async-signal-safe and allowed by every filter; the buffer
    // is valid for `len` bytes.
    unsafe {
        libc::write(2, t.buf.as_ptr().cast(), t.len);
        libc::_exit(1);
    }
}

fn install_sigsys_handler() -> std::io::Result<()> {
    // SAFETY: sigaction is plain data, zeroed then filled; the handler is an extern "C" fn of
    // the SA_SIGINFO shape that only makes async-signal-safe calls.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_sigsys as *const () as usize;
        sa.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut sa.sa_mask);
        if libc::sigaction(libc::SIGSYS, &sa, std::ptr::null_mut()) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_compiles_in_every_mode() {
        for mode in [Mode::Enforce, Mode::Log] {
            for k in Kind::ALL {
                let p = build(k, mode, &[3, 7]).unwrap();
                assert_eq!(p.len(), 2);
                assert!(p[1].len() > COMMON.len(), "{k:?}");
            }
        }
        assert_eq!("true".parse::<Mode>(), Ok(Mode::Enforce));
        assert_eq!("log".parse::<Mode>(), Ok(Mode::Log));
        assert_eq!("false".parse::<Mode>(), Ok(Mode::Off));
        assert!("maybe".parse::<Mode>().is_err());
    }

    #[test]
    fn no_kind_may_open_files_or_start_programs() {
        for k in Kind::ALL {
            let (calls, _) = allowed(k);
            for forbidden in [
                libc::SYS_open,
                libc::SYS_openat,
                libc::SYS_openat2,
                libc::SYS_execve,
                libc::SYS_socket,
                libc::SYS_clone,
                libc::SYS_clone3,
                libc::SYS_ptrace,
                libc::SYS_unlinkat,
            ] {
                assert!(!calls.contains(&forbidden), "{k:?} allows {forbidden}");
            }
        }
    }
}
