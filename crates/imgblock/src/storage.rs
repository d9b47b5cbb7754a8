//! The host-storage layer: the file an image lives in.
//!
//! Format drivers never touch `std::fs` directly; they see a [`Storage`], which a test can replace
//! with one that fails at chosen points.

use std::fmt::Debug;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Positional I/O on one host file. Implementations are safe to call from several threads.
pub trait Storage: Send + Sync + Debug {
    /// The path this storage was opened from, for error messages.
    fn path(&self) -> &Path;
    /// Fills `buf` from `offset`; bytes past the end of the file read as zeroes.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Writes all of `buf` at `offset`, growing the file if needed.
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Makes `len` bytes at `offset` read as zeroes; may deallocate them when `unmap` is set.
    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()>;
    /// Deallocates a range (punches a hole); the range reads as zeroes afterwards.
    fn discard(&self, offset: u64, len: u64) -> io::Result<()>;
    /// Makes all completed writes durable.
    fn flush(&self) -> io::Result<()>;
    /// The current length of the file.
    fn size(&self) -> io::Result<u64>;
    /// Truncates or extends the file.
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Allocates space for a range without changing what it reads as (`fallocate`).
    fn allocate(&self, offset: u64, len: u64) -> io::Result<()>;
    /// Whether `offset` starts data or a hole, and for how many bytes (at most `len`).
    /// Storage without hole information reports everything as data.
    fn block_status(&self, offset: u64, len: u64) -> io::Result<(bool, u64)> {
        let _ = offset;
        Ok((true, len))
    }
    /// Bytes actually allocated on the host, for `info`'s actual-size.
    fn allocated_size(&self) -> io::Result<u64> {
        self.size()
    }
    /// Whether writes are refused.
    fn read_only(&self) -> bool;
    /// The host file behind this storage, for copies the kernel makes between files
    /// ([`copy_range`]); `None` for storage that is not one file.
    fn host_file(&self) -> Option<&File> {
        None
    }
    /// Asks the storage to start writing dirty data back to the disk as soon as a few MiB of it
    /// have piled up, instead of leaving it all to the final flush: a long stream of writes (a
    /// convert) then keeps the disk busy while it copies. Advisory; nothing changes in what is
    /// read or in when a write is durable.
    fn set_write_behind(&self, on: bool) {
        let _ = on;
    }
    /// For storage opened to go around the page cache ([`FileStorage::open_direct`]): whether
    /// aligned I/O keeps doing so (the default) or goes through the cache like the rest, for a
    /// stream of small unaligned writes that the cache gathers better. Nothing changes in what
    /// is read or in when a write is durable.
    fn set_direct(&self, on: bool) {
        let _ = on;
    }
    /// Whether this is a block device: its length is fixed, and what it holds before anything
    /// is written is whatever was there (it does not read as zeroes the way a new file does).
    fn is_device(&self) -> bool {
        false
    }
}

/// Copies `len` bytes from `src` at `src_offset` to `dst` at `dst_offset` inside the kernel
/// (`copy_file_range`: a reflink, a server-side copy or an in-kernel copy, whatever the
/// filesystem offers). `Ok(false)` when it cannot: a storage that is not a file, a kernel or
/// filesystem without the call, or a source that ends early; the caller then copies through a
/// buffer, and whatever was copied so far is simply written again.
///
/// # Errors
/// A real I/O error on either file.
/// Raises this process's soft limit on open files to its hard limit, as a program that opens
/// long backing chains should: each image of a chain holds its file open twice (for I/O and for
/// its lock), so a few hundred images pass the usual soft limit of 1024. Returns the limit now
/// in force; on failure the old one stays.
pub fn raise_open_file_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit read and write the plain struct given.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 0;
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                return raised.rlim_cur;
            }
        }
    }
    lim.rlim_cur
}

pub fn copy_range(
    src: &dyn Storage,
    src_offset: u64,
    dst: &dyn Storage,
    dst_offset: u64,
    len: u64,
) -> io::Result<bool> {
    if dst.read_only() {
        return Err(io::Error::from_raw_os_error(libc::EBADF));
    }
    let (Some(from), Some(to)) = (src.host_file(), dst.host_file()) else {
        return Ok(false);
    };
    let (Ok(mut off_in), Ok(mut off_out)) = (
        libc::loff_t::try_from(src_offset),
        libc::loff_t::try_from(dst_offset),
    ) else {
        return Ok(false);
    };
    let mut left = len;
    while left > 0 {
        let chunk = usize::try_from(left.min(1 << 30)).unwrap_or(1 << 30);
        // SAFETY: both descriptors are open for the lifetime of the borrows; the offsets are
        // plain integers the kernel updates.
        let n = unsafe {
            libc::copy_file_range(
                from.as_raw_fd(),
                &mut off_in,
                to.as_raw_fd(),
                &mut off_out,
                chunk,
                0,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(
                    libc::EXDEV | libc::EOPNOTSUPP | libc::ENOSYS | libc::EINVAL | libc::EBADF,
                ) => Ok(false),
                _ => Err(e),
            };
        }
        if n == 0 {
            // The source ends before the range does: its tail reads as zeroes, which a
            // buffered copy writes.
            return Ok(false);
        }
        left -= u64::try_from(n).unwrap_or(left).min(left);
    }
    Ok(true)
}

/// The inode flag that turns copy-on-write off (linux/fs.h).
const FS_NOCOW_FL: libc::c_long = 0x0080_0000;
/// `_IOR('X', 31, struct fsxattr)` (linux/fs.h).
const FS_IOC_FSGETXATTR: libc::Ioctl = 0x801c_581f;
/// `_IOW('X', 32, struct fsxattr)` (linux/fs.h).
const FS_IOC_FSSETXATTR: libc::Ioctl = 0x401c_5820;
/// `fsx_extsize` is in force (linux/fs.h).
const FS_XFLAG_EXTSIZE: u32 = 0x0000_0800;

/// Linux's `struct fsxattr`.
#[repr(C)]
#[derive(Debug, Default)]
struct FsXattr {
    xflags: u32,
    extsize: u32,
    nextents: u32,
    projid: u32,
    cowextsize: u32,
    pad: [u8; 8],
}

/// What `O_DIRECT` needs of a buffer's address, offset and length on any Linux filesystem.
pub const DIRECT_ALIGN: usize = 4096;

/// The alignment of a direct access's offset and length: [`DIRECT_ALIGN`], or the page size
/// where that is larger. A direct write then covers whole pages of the file, so it never
/// shares a page with a write through the cache from another thread (a header, a table entry
/// next to data): the kernel could not drop such a page after the direct write, and writing
/// it back later would put its stale copy of the direct write's bytes on the disk.
fn direct_span() -> usize {
    // SAFETY: sysconf takes and returns plain integers.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(page).map_or(DIRECT_ALIGN, |p| p.max(DIRECT_ALIGN))
}

/// What the filesystem asks of a direct access to `file`, as (buffer address, file offset)
/// alignments: `statx`'s `STATX_DIOALIGN` (Linux 6.1), `None` where it does not say.
fn dio_align(file: &File) -> Option<(usize, usize)> {
    // SAFETY: statx is a plain struct of integers, for which all zeroes is a valid value.
    let mut st: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: the descriptor is open for the call, the empty path is a NUL-terminated string
    // that AT_EMPTY_PATH makes statx ignore, and `st` is a valid statx the call fills.
    let rc = unsafe {
        libc::statx(
            file.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut st,
        )
    };
    let pow2 = |v: u32| usize::try_from(v).ok().filter(|v| v.is_power_of_two());
    if rc != 0 || st.stx_mask & libc::STATX_DIOALIGN == 0 {
        return None;
    }
    Some((pow2(st.stx_dio_mem_align)?, pow2(st.stx_dio_offset_align)?))
}

/// With write-behind on, how many bytes written through the page cache start their writeback.
pub const WRITE_BEHIND_BYTES: u64 = 4 << 20;

/// A [`Storage`] over a regular file or block device.
#[derive(Debug)]
pub struct FileStorage {
    file: File,
    path: PathBuf,
    read_only: bool,
    /// A second descriptor opened with `O_DIRECT`, for I/O aligned to [`DIRECT_ALIGN`] (its
    /// offset and length to `span`);
    /// everything else (metadata, partial sectors) goes through `file`. The kernel keeps the
    /// two coherent: a direct write invalidates cached pages, a direct read flushes dirty ones.
    direct: Option<File>,
    /// The offset and length alignment of a direct access ([`direct_span`]).
    span: usize,
    /// The address alignment of a direct access's buffer: what the filesystem reports
    /// (`statx`'s `STATX_DIOALIGN`), else [`DIRECT_ALIGN`].
    mem_align: usize,
    /// Whether `direct` is used ([`Storage::set_direct`]).
    direct_on: AtomicBool,
    /// How many reads and writes went through `direct`, for tests.
    direct_ios: AtomicU64,
    /// A block device ([`Storage::is_device`]).
    device: bool,
    /// Start writeback every [`WRITE_BEHIND_BYTES`] written ([`Storage::set_write_behind`]).
    write_behind: AtomicBool,
    /// The locks [`FileStorage::create`] took, released when the storage is dropped.
    lock: Option<crate::lock::ImageLock>,
    /// Bytes written through the page cache since writeback was last started.
    unsubmitted: AtomicU64,
    /// How many times writeback was started, for tests.
    writebacks: AtomicU64,
}

impl FileStorage {
    /// Opens an existing file (or block device).
    ///
    /// An image names other files (a backing file, extents, a data file, a parent), and a FIFO
    /// among them would make `open(2)` wait for a writer forever: it is opened without blocking
    /// and refused, as is a socket.
    ///
    /// # Errors
    /// Whatever `open(2)` returns; `InvalidInput` for a FIFO or a socket.
    pub fn open(path: &Path, writable: bool) -> io::Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(writable)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)?;
        let kind = file.metadata()?.file_type();
        if kind.is_fifo() || kind.is_socket() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a regular file or block device",
            ));
        }
        let fd = file.as_raw_fd();
        // SAFETY: `fd` is the open descriptor `file` owns for the duration of both calls, and
        // F_GETFL/F_SETFL take and return plain integers.
        let cleared = unsafe {
            let flags = libc::fcntl(fd, libc::F_GETFL);
            flags >= 0 && libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK) == 0
        };
        if !cleared {
            return Err(io::Error::last_os_error());
        }
        Ok(Self::with_file(file, path, !writable))
    }

    fn with_file(file: File, path: &Path, read_only: bool) -> Self {
        let device = file
            .metadata()
            .is_ok_and(|m| m.file_type().is_block_device());
        FileStorage {
            file,
            path: path.to_owned(),
            read_only,
            direct: None,
            span: DIRECT_ALIGN,
            mem_align: DIRECT_ALIGN,
            direct_on: AtomicBool::new(true),
            direct_ios: AtomicU64::new(0),
            device,
            write_behind: AtomicBool::new(false),
            lock: None,
            unsubmitted: AtomicU64::new(0),
            writebacks: AtomicU64::new(0),
        }
    }

    /// Opens an existing file for I/O that bypasses the page cache (qemu's `cache=none`):
    /// aligned reads and writes use `O_DIRECT`, the rest the page cache. On a filesystem without
    /// `O_DIRECT` (tmpfs) every access goes through the page cache.
    ///
    /// # Errors
    /// Whatever `open(2)` returns.
    pub fn open_direct(path: &Path, writable: bool) -> io::Result<Self> {
        let mut s = Self::open(path, writable)?;
        s.direct = OpenOptions::new()
            .read(true)
            .write(writable)
            .custom_flags(libc::O_DIRECT)
            .open(path)
            .ok();
        s.span = direct_span();
        if let Some((mem, off)) = s.direct.as_ref().and_then(dio_align) {
            s.mem_align = mem;
            s.span = s.span.max(off);
        }
        Ok(s)
    }

    /// The descriptor for an access of `len` bytes at `offset` from or to `addr`.
    fn pick(&self, addr: *const u8, len: usize, offset: u64) -> &File {
        match &self.direct {
            Some(d)
                if (addr as usize) % self.mem_align == 0
                    && len % self.span == 0
                    && offset % self.span as u64 == 0
                    && self.direct_on.load(Ordering::Relaxed) =>
            {
                self.direct_ios.fetch_add(1, Ordering::Relaxed);
                d
            }
            _ => &self.file,
        }
    }

    /// For a write of `len` bytes from `addr` to `offset`: the whole pages in it that can go
    /// around the cache, as (the direct descriptor, bytes before them, their length); `None`
    /// when there are none. The partial pages at either end share pages with other writes:
    /// they go through the cache.
    fn direct_middle(
        &self,
        addr: *const u8,
        len: usize,
        offset: u64,
    ) -> Option<(&File, usize, usize)> {
        let d = self.direct.as_ref()?;
        if !self.direct_on.load(Ordering::Relaxed) {
            return None;
        }
        // The split's offsets (`offset + head`, `+ mid`) lie inside the write: none overflows
        // once its end does not.
        offset.checked_add(u64::try_from(len).ok()?)?;
        let span = self.span as u64;
        let head = usize::try_from((span - offset % span) % span).ok()?;
        let mid = len.checked_sub(head)? / self.span * self.span;
        (mid > 0 && (addr as usize).wrapping_add(head) % self.mem_align == 0)
            .then_some((d, head, mid))
    }

    /// How many reads and writes went around the page cache.
    pub fn direct_ios(&self) -> u64 {
        self.direct_ios.load(Ordering::Relaxed)
    }

    /// Creates a file for writing, or empties an existing one, as qemu's file driver does: the
    /// file is opened without truncation and emptied only once this process holds the write and
    /// resize permissions ([`crate::lock`]), so an image another process (a running VM, or this
    /// command's own source) has open is refused, not destroyed. The locks are held as long as
    /// the storage lives. A block device is written in place, its length unchanged (qemu's
    /// `host_device`): the caller must not count on it reading as zeroes.
    ///
    /// # Errors
    /// [`crate::Error::Locked`] when another process uses the file; [`crate::Error::Io`] when
    /// it cannot be opened, locked or emptied.
    pub fn create(path: &Path) -> crate::Result<Self> {
        let io = |source| crate::Error::Io {
            path: path.to_owned(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o644)
            .open(path)
            .map_err(io)?;
        let lock = crate::lock::lock(
            path,
            &[crate::lock::PERM_WRITE, crate::lock::PERM_RESIZE],
            &[crate::lock::PERM_RESIZE],
        )?;
        let mut s = Self::with_file(file, path, false);
        if !s.device {
            s.file.set_len(0).map_err(io)?;
        }
        s.lock = Some(lock);
        Ok(s)
    }

    /// [`FileStorage::create`], then the file protocol's options ([`crate::options::FileOptions`]).
    ///
    /// # Errors
    /// As [`FileStorage::create`].
    pub fn create_with(path: &Path, o: crate::options::FileOptions) -> crate::Result<Self> {
        let s = Self::create(path)?;
        s.apply_file_options(o);
        Ok(s)
    }

    /// Applies the file protocol's creation options to a file just emptied, as qemu's file
    /// driver does, best effort and silently like it: `nocow` turns copy-on-write off (btrfs;
    /// it only takes on an empty file), and a non-zero `extent_size_hint` asks the filesystem
    /// (XFS) to allocate that much at a time. Filesystems without either ignore them.
    fn apply_file_options(&self, o: crate::options::FileOptions) {
        let (nocow, extent_size_hint) = (o.nocow, o.extent_size_hint);
        let fd = self.file.as_raw_fd();
        if nocow {
            let mut flags: libc::c_long = 0;
            // SAFETY: FS_IOC_GETFLAGS writes one c_long through the pointer, which points at a
            // live c_long; FS_IOC_SETFLAGS reads one. The descriptor is open.
            unsafe {
                if libc::ioctl(fd, libc::FS_IOC_GETFLAGS, &mut flags) == 0 {
                    flags |= FS_NOCOW_FL;
                    libc::ioctl(fd, libc::FS_IOC_SETFLAGS, &flags);
                }
            }
        }
        if extent_size_hint != 0 {
            let mut attr = FsXattr::default();
            // SAFETY: FS_IOC_FSGETXATTR fills a struct fsxattr, which FsXattr lays out exactly
            // (#[repr(C)], 28 bytes); FS_IOC_FSSETXATTR reads one. The descriptor is open.
            unsafe {
                if libc::ioctl(fd, FS_IOC_FSGETXATTR, &mut attr) == 0 {
                    attr.xflags |= FS_XFLAG_EXTSIZE;
                    attr.extsize = extent_size_hint;
                    libc::ioctl(fd, FS_IOC_FSSETXATTR, &attr);
                }
            }
        }
    }

    /// The underlying file.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// How many times write-behind has started writeback.
    pub fn writebacks_started(&self) -> u64 {
        self.writebacks.load(Ordering::Relaxed)
    }

    /// Counts `len` bytes written through the page cache and, with write-behind on, starts
    /// writeback of the whole file once enough has piled up. Pages already on their way to the
    /// disk are left alone, so the call costs little and never waits for the disk to finish.
    fn wrote_cached(&self, len: usize) {
        if !self.write_behind.load(Ordering::Relaxed) {
            return;
        }
        let len = len as u64;
        let before = self.unsubmitted.fetch_add(len, Ordering::Relaxed);
        if before + len < WRITE_BEHIND_BYTES {
            return;
        }
        self.unsubmitted.store(0, Ordering::Relaxed);
        self.writebacks.fetch_add(1, Ordering::Relaxed);
        // SAFETY: sync_file_range takes a valid open descriptor and plain integers; it touches
        // no memory. Offset 0 and length 0 mean the whole file. Advisory: an error here shows up
        // again at the flush, which reports it.
        unsafe {
            libc::sync_file_range(self.file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE);
        }
    }

    fn check_writable(&self) -> io::Result<()> {
        if self.read_only {
            Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "image is opened read-only",
            ))
        } else {
            Ok(())
        }
    }

    fn fallocate(&self, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
        let off = libc::off_t::try_from(offset)
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let len =
            libc::off_t::try_from(len).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: fallocate takes a valid open descriptor and plain integers; it touches no memory.
        let r = unsafe { libc::fallocate(self.file.as_raw_fd(), mode, off, len) };
        if r == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    fn seek(&self, offset: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
        let off = libc::off_t::try_from(offset)
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: lseek takes a valid open descriptor and plain integers; it touches no memory.
        let r = unsafe { libc::lseek(self.file.as_raw_fd(), off, whence) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                return Ok(None);
            }
            return Err(e);
        }
        Ok(Some(r.unsigned_abs()))
    }
}

/// Writes zeroes from a shared zero buffer; the fallback when the host cannot punch or zero.
pub(crate) fn write_zero_buffers(s: &dyn Storage, mut offset: u64, mut len: u64) -> io::Result<()> {
    /// 64 KiB, as qemu writes: the kernel copies the buffer into the page cache over and over,
    /// and a small one stays in the CPU cache meanwhile. Measured on `resize
    /// --preallocation=full` of 2 GiB: 1 MiB and 256 KiB took about 1.5 times the system time.
    const CHUNK: usize = 64 << 10;
    let zeroes = vec![0u8; CHUNK];
    while len > 0 {
        let n = len.min(CHUNK as u64);
        // n <= CHUNK, which fits usize.
        s.write_at(&zeroes[..usize::try_from(n).unwrap_or(CHUNK)], offset)?;
        offset += n;
        len -= n;
    }
    Ok(())
}

/// Refuses to create a `format` image on a block device: its new tables would be whatever the
/// device held where a new file reads as zeroes (qemu writes them there all the same).
///
/// # Errors
/// [`crate::Error::Unsupported`] when `path` is a block device.
pub(crate) fn refuse_device(path: &Path, format: &str) -> crate::Result<()> {
    if std::fs::metadata(path).is_ok_and(|m| m.file_type().is_block_device()) {
        return Err(crate::Error::Unsupported {
            path: path.to_owned(),
            what: format!(
                "{format} images cannot be made on a block device (only raw, qcow2 and luks)"
            ),
        });
    }
    Ok(())
}

/// A file a create has just made (or emptied), deleted again unless the create finishes:
/// qemu's qcow2 and luks drivers leave nothing behind when they fail part way.
#[derive(Debug)]
pub(crate) struct Unfinished {
    path: Option<std::path::PathBuf>,
}

impl Unfinished {
    /// Guards `path`.
    pub(crate) fn new(path: &Path) -> Self {
        Unfinished {
            path: Some(path.to_owned()),
        }
    }

    /// The create succeeded: the file stays.
    pub(crate) fn finish(mut self) {
        self.path = None;
    }
}

impl Drop for Unfinished {
    fn drop(&mut self) {
        if let Some(p) = self.path.take() {
            // Best effort, as qemu's: the create's own error is what the user needs. Only a
            // regular file goes: a block device (or a link to one) stays, as qemu leaves it.
            if std::fs::symlink_metadata(&p).is_ok_and(|m| m.file_type().is_file()) {
                let _ = std::fs::remove_file(p);
            }
        }
    }
}

/// Sets the file's length to `new`. Where that grows it past `old`, the new space is reserved
/// (`falloc`) or written with zeroes (`full`), as qemu's file driver preallocates; `off` and
/// `metadata` leave it sparse.
pub(crate) fn set_len_preallocated(
    s: &dyn Storage,
    old: u64,
    new: u64,
    prealloc: crate::raw::Preallocation,
) -> io::Result<()> {
    use crate::raw::Preallocation;
    s.set_len(new)?;
    if new > old {
        match prealloc {
            Preallocation::Falloc => s.allocate(old, new - old)?,
            Preallocation::Full => write_zero_buffers(s, old, new - old)?,
            Preallocation::Off | Preallocation::Metadata => {}
        }
    }
    Ok(())
}

impl Storage for FileStorage {
    fn path(&self) -> &Path {
        &self.path
    }

    fn host_file(&self) -> Option<&File> {
        Some(&self.file)
    }

    fn set_write_behind(&self, on: bool) {
        self.write_behind.store(on, Ordering::Relaxed);
    }

    fn set_direct(&self, on: bool) {
        self.direct_on.store(on, Ordering::Relaxed);
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let mut file = self.pick(buf.as_ptr(), buf.len(), offset);
        let mut done = 0;
        while done < buf.len() {
            match file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => {
                    buf[done..].fill(0);
                    return Ok(());
                }
                // After a short read the rest is no longer aligned: finish through the cache.
                Ok(n) => {
                    done += n;
                    file = &self.file;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // A filesystem may refuse some direct I/O (EINVAL): the page cache still works.
                Err(e)
                    if e.raw_os_error() == Some(libc::EINVAL)
                        && !std::ptr::eq(file, &self.file) =>
                {
                    file = &self.file;
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.check_writable()?;
        if let Some((d, head, mid)) = self.direct_middle(buf.as_ptr(), buf.len(), offset) {
            self.direct_ios.fetch_add(1, Ordering::Relaxed);
            let (before, rest) = buf.split_at(head);
            let (middle, after) = rest.split_at(mid);
            match d.write_all_at(middle, offset + head as u64) {
                // A filesystem may refuse some direct I/O (EINVAL): the page cache still works.
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
                Err(e) => return Err(e),
                Ok(()) => {
                    self.file.write_all_at(before, offset)?;
                    self.file
                        .write_all_at(after, offset + (head + mid) as u64)?;
                    self.wrote_cached(head + after.len());
                    return Ok(());
                }
            }
        }
        self.file.write_all_at(buf, offset)?;
        self.wrote_cached(buf.len());
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        self.check_writable()?;
        if len == 0 {
            return Ok(());
        }
        let end = offset.checked_add(len).ok_or(io::ErrorKind::InvalidInput)?;
        let size = self.size()?;
        if unmap
            && self
                .fallocate(
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    offset,
                    len,
                )
                .is_ok()
        {
            if end > size {
                self.set_len(end)?;
            }
            return Ok(());
        }
        if self
            .fallocate(libc::FALLOC_FL_ZERO_RANGE, offset, len)
            .is_ok()
        {
            return Ok(());
        }
        if offset >= size && !self.device {
            // Past the end: extending the file is enough.
            return self.file.set_len(end);
        }
        write_zero_buffers(self, offset, len)
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.check_writable()?;
        if len == 0 {
            return Ok(());
        }
        // A filesystem without hole punching simply keeps the data: discard is advisory.
        let _ = self.fallocate(
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        );
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.file.sync_data()
    }

    fn size(&self) -> io::Result<u64> {
        if self.device {
            // A device node's metadata says 0; its end is where seeking to the end lands.
            return Ok(self.seek(0, libc::SEEK_END)?.unwrap_or(0));
        }
        Ok(self.file.metadata()?.len())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.check_writable()?;
        if len > i64::MAX as u64 {
            // What ftruncate(2) says of a length off_t cannot hold.
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        if self.device {
            // A device keeps its length: a smaller one is the part in use (qemu's words when
            // more is asked).
            if len > self.size()? {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "Cannot grow device files",
                ));
            }
            return Ok(());
        }
        self.file.set_len(len)
    }

    fn allocate(&self, offset: u64, len: u64) -> io::Result<()> {
        self.check_writable()?;
        if len == 0 {
            return Ok(());
        }
        self.fallocate(0, offset, len)
    }

    fn block_status(&self, offset: u64, len: u64) -> io::Result<(bool, u64)> {
        let size = self.size()?;
        if offset >= size {
            return Ok((false, len));
        }
        let limit = len.min(size - offset);
        let data = match self.seek(offset, libc::SEEK_DATA) {
            Ok(Some(d)) => d,
            Ok(None) => return Ok((false, len)),
            // No hole information: everything is data.
            Err(_) => return Ok((true, limit)),
        };
        if data > offset {
            return Ok((false, (data - offset).min(len)));
        }
        let hole = self.seek(offset, libc::SEEK_HOLE)?.unwrap_or(size);
        Ok((true, hole.saturating_sub(offset).min(limit).max(1)))
    }

    fn allocated_size(&self) -> io::Result<u64> {
        use std::os::unix::fs::MetadataExt;
        Ok(self.file.metadata()?.blocks() * 512)
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn is_device(&self) -> bool {
        self.device
    }
}

/// A file that could not be opened, standing in where an image names it but only its metadata
/// is wanted (`info` on a qcow2 image whose external data file is missing, as qemu-img shows
/// it): every access fails with the error the open met.
#[derive(Debug)]
pub struct Unopened {
    path: PathBuf,
    kind: io::ErrorKind,
    os_error: Option<i32>,
}

impl Unopened {
    /// Keeps `path` and what opening it failed with.
    pub fn new(path: &Path, err: &io::Error) -> Unopened {
        Unopened {
            path: path.to_owned(),
            kind: err.kind(),
            os_error: err.raw_os_error(),
        }
    }

    fn fail<T>(&self) -> io::Result<T> {
        Err(match self.os_error {
            Some(code) => io::Error::from_raw_os_error(code),
            None => io::Error::from(self.kind),
        })
    }
}

impl Storage for Unopened {
    fn path(&self) -> &Path {
        &self.path
    }
    fn read_at(&self, _buf: &mut [u8], _offset: u64) -> io::Result<()> {
        self.fail()
    }
    fn write_at(&self, _buf: &[u8], _offset: u64) -> io::Result<()> {
        self.fail()
    }
    fn write_zeroes(&self, _offset: u64, _len: u64, _unmap: bool) -> io::Result<()> {
        self.fail()
    }
    fn discard(&self, _offset: u64, _len: u64) -> io::Result<()> {
        self.fail()
    }
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
    fn size(&self) -> io::Result<u64> {
        self.fail()
    }
    fn set_len(&self, _len: u64) -> io::Result<()> {
        self.fail()
    }
    fn allocate(&self, _offset: u64, _len: u64) -> io::Result<()> {
        self.fail()
    }
    fn block_status(&self, _offset: u64, _len: u64) -> io::Result<(bool, u64)> {
        self.fail()
    }
    fn read_only(&self) -> bool {
        true
    }
}

/// Largest in-memory storage, so that a fuzzed header cannot make a write grow it without bound.
pub const MEM_STORAGE_MAX: u64 = 1 << 30;

/// A [`Storage`] held in memory: for fuzzing and tests, never for real images.
#[derive(Debug)]
pub struct MemStorage {
    data: std::sync::Mutex<Vec<u8>>,
    path: PathBuf,
    read_only: bool,
}

impl MemStorage {
    /// Wraps `data`; `path` only names it in messages.
    pub fn new(data: Vec<u8>, path: &Path, read_only: bool) -> Self {
        MemStorage {
            data: std::sync::Mutex::new(data),
            path: path.to_owned(),
            read_only,
        }
    }

    /// A copy of the contents.
    pub fn contents(&self) -> Vec<u8> {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<u8>> {
        self.data.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn range(offset: u64, len: usize) -> io::Result<(usize, usize)> {
        let end = offset
            .checked_add(len as u64)
            .filter(|&e| e <= MEM_STORAGE_MAX);
        match end {
            Some(e) => Ok((
                usize::try_from(offset).unwrap_or(0),
                usize::try_from(e).unwrap_or(0),
            )),
            None => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "past the in-memory storage limit",
            )),
        }
    }

    fn writable(&self) -> io::Result<()> {
        if self.read_only {
            Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "image is opened read-only",
            ))
        } else {
            Ok(())
        }
    }
}

impl Storage for MemStorage {
    fn path(&self) -> &Path {
        &self.path
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let d = self.lock();
        buf.fill(0);
        if let Ok(start) = usize::try_from(offset) {
            if start < d.len() {
                let n = buf.len().min(d.len() - start);
                buf[..n].copy_from_slice(&d[start..start + n]);
            }
        }
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.writable()?;
        let (s, e) = Self::range(offset, buf.len())?;
        let mut d = self.lock();
        if d.len() < e {
            d.resize(e, 0);
        }
        d[s..e].copy_from_slice(buf);
        Ok(())
    }
    fn write_zeroes(&self, offset: u64, len: u64, _unmap: bool) -> io::Result<()> {
        self.writable()?;
        let (s, e) = Self::range(offset, usize::try_from(len).unwrap_or(usize::MAX))?;
        let mut d = self.lock();
        if d.len() < e {
            d.resize(e, 0);
        }
        d[s..e].fill(0);
        Ok(())
    }
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.write_zeroes(offset, len, true)
    }
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
    fn size(&self) -> io::Result<u64> {
        Ok(self.lock().len() as u64)
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.writable()?;
        let (_, e) = Self::range(len, 0)?;
        self.lock().resize(e, 0);
        Ok(())
    }
    fn allocate(&self, offset: u64, len: u64) -> io::Result<()> {
        self.writable()?;
        let (_, e) = Self::range(offset, usize::try_from(len).unwrap_or(usize::MAX))?;
        let mut d = self.lock();
        if d.len() < e {
            d.resize(e, 0);
        }
        Ok(())
    }
    fn read_only(&self) -> bool {
        self.read_only
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_range_copies_between_files_and_declines_memory() {
        let dir = tempfile::tempdir().unwrap();
        let a = FileStorage::create(&dir.path().join("a")).unwrap();
        let b = FileStorage::create(&dir.path().join("b")).unwrap();
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 253) as u8).collect();
        a.write_at(&data, 0).unwrap();
        b.set_len(300_000).unwrap();
        assert!(copy_range(&a, 1000, &b, 5000, 150_000).unwrap());
        let mut got = vec![0u8; 150_000];
        b.read_at(&mut got, 5000).unwrap();
        assert_eq!(got, data[1000..151_000]);
        // Past the source's end the kernel copies nothing: the caller must fill zeroes.
        assert!(!copy_range(&a, 150_000, &b, 0, 100_000).unwrap());
        let m = MemStorage::new(vec![0; 4096], Path::new("m"), false);
        assert!(!copy_range(&m, 0, &b, 0, 4096).unwrap());
        assert!(!copy_range(&a, 0, &m, 0, 4096).unwrap());
        let ro = FileStorage::open(&dir.path().join("b"), false).unwrap();
        assert!(copy_range(&a, 0, &ro, 0, 4096).is_err());
    }

    #[test]
    fn write_behind_starts_writeback_every_few_mib_only_when_asked() {
        let dir = tempfile::tempdir().unwrap();
        let s = FileStorage::create(&dir.path().join("f")).unwrap();
        let chunk = vec![7u8; 1 << 20];
        let mib = WRITE_BEHIND_BYTES >> 20;
        for i in 0..2 * mib + 1 {
            s.write_at(&chunk, i << 20).unwrap();
        }
        assert_eq!(s.writebacks_started(), 0);
        s.set_write_behind(true);
        for i in 0..2 * mib + 1 {
            s.write_at(&chunk, i << 20).unwrap();
        }
        assert_eq!(s.writebacks_started(), 2);
        // Small writes add up too (compressed clusters, metadata).
        for i in 0..WRITE_BEHIND_BYTES / 4096 {
            s.write_at(&chunk[..4096], i * 4096).unwrap();
        }
        assert_eq!(s.writebacks_started(), 3);
        s.set_write_behind(false);
        s.write_at(&vec![1u8; 8 << 20], 0).unwrap();
        assert_eq!(s.writebacks_started(), 3);
        let mut got = vec![0u8; 1 << 20];
        s.read_at(&mut got, 2 * WRITE_BEHIND_BYTES).unwrap();
        assert_eq!(got, chunk, "what was written reads back");
        s.flush().unwrap();
    }

    /// The part of `v` that starts at a [`DIRECT_ALIGN`]-aligned address, `len` bytes long.
    fn aligned(v: &mut [u8], len: usize) -> &mut [u8] {
        let skip = v.as_ptr().align_offset(DIRECT_ALIGN);
        &mut v[skip..skip + len]
    }

    #[test]
    fn direct_storage_routes_whole_aligned_pages_around_the_cache_until_told_not_to() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        FileStorage::create(&path).unwrap();
        let s = FileStorage::open_direct(&path, true).unwrap();
        if s.direct.is_none() {
            eprintln!(
                "NOT TESTED: {} refuses O_DIRECT; everything goes through the cache there",
                dir.path().display()
            );
            return;
        }
        let span = direct_span();
        let mut va = vec![0xa5; 3 * span];
        let a = aligned(&mut va, 2 * span);
        assert_eq!(a.as_ptr() as usize % DIRECT_ALIGN, 0);
        s.write_at(a, span as u64).unwrap();
        assert_eq!(s.direct_ios(), 1);
        // Less than a whole page shares its page with other writes: through the cache.
        s.write_at(&a[..span / 2], 0).unwrap();
        s.write_at(&a[..span], 512).unwrap();
        assert_eq!(s.direct_ios(), 1);
        // Off a page boundary, the whole pages in the middle go direct where the buffer's
        // address there suits the filesystem (a vdi's data blocks lie 512 bytes off pages).
        s.write_at(&a[512..], 8 * span as u64 + 512).unwrap();
        let middle_direct = (span - 512) % s.mem_align == 0;
        assert_eq!(s.direct_ios(), if middle_direct { 2 } else { 1 });
        s.write_at(&a[1..=span], 16 * span as u64).unwrap();
        assert_eq!(s.direct_ios(), if middle_direct { 2 } else { 1 });
        let before = s.direct_ios();
        s.set_direct(false);
        s.write_at(a, 4 * span as u64).unwrap();
        assert_eq!(s.direct_ios(), before);
        s.set_direct(true);
        let mut vb = vec![0; 3 * span];
        let back = aligned(&mut vb, 2 * span);
        s.read_at(back, 4 * span as u64).unwrap();
        assert_eq!(s.direct_ios(), before + 1);
        assert_eq!(back, a, "a direct read sees what went through the cache");
        s.read_at(back, 0).unwrap();
        assert_eq!(&back[512..span + 512], &a[..span]);
        assert_eq!(&back[..512], &a[..512]);
        s.read_at(back, 8 * span as u64).unwrap();
        assert_eq!(&back[..512], &[0; 512]);
        assert_eq!(&back[512..], &a[512..], "the split write reads back whole");
        s.read_at(back, 16 * span as u64).unwrap();
        assert_eq!(&back[..span], &a[1..=span]);
        // A write whose end would pass u64::MAX is refused (by the kernel), never split.
        let before = s.direct_ios();
        let top = u64::MAX - (span as u64 - 1); // the last page
        for at in [top - 512, top - span as u64 / 2] {
            assert!(s.write_at(a, at).is_err());
        }
        assert_eq!(s.direct_ios(), before);
        s.flush().unwrap();
        // A plain open never goes direct.
        let p = FileStorage::open(&path, true).unwrap();
        p.write_at(a, 0).unwrap();
        assert_eq!(p.direct_ios(), 0);
    }

    #[test]
    fn read_past_end_returns_zeroes() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        let s = FileStorage::create(&p).unwrap();
        s.write_at(&[1, 2, 3], 0).unwrap();
        let mut buf = [9u8; 6];
        s.read_at(&mut buf, 1).unwrap();
        assert_eq!(buf, [2, 3, 0, 0, 0, 0]);
    }

    #[test]
    fn block_status_sees_holes() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        let s = FileStorage::create(&p).unwrap();
        s.set_len(8 << 20).unwrap();
        s.write_at(&[1u8; 4096], 4 << 20).unwrap();
        let (data, n) = s.block_status(0, 8 << 20).unwrap();
        assert!(!data);
        assert!(n > 0 && n <= 4 << 20);
        let (data, n) = s.block_status(4 << 20, 8 << 20).unwrap();
        assert!(data);
        assert!(n >= 4096);
    }

    #[test]
    fn mem_storage_reads_what_was_written_and_zeroes_past_the_end() {
        let s = MemStorage::new(vec![1, 2, 3], Path::new("mem"), false);
        s.write_at(&[9, 9], 5).unwrap();
        let mut b = [7u8; 9];
        s.read_at(&mut b, 0).unwrap();
        assert_eq!(b, [1, 2, 3, 0, 0, 9, 9, 0, 0]);
        assert!(s.write_at(&[1], MEM_STORAGE_MAX).is_err());
    }

    #[test]
    fn write_zeroes_reads_back_zero() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        let s = FileStorage::create(&p).unwrap();
        s.write_at(&[7u8; 8192], 0).unwrap();
        s.write_zeroes(100, 5000, true).unwrap();
        let mut buf = [1u8; 8192];
        s.read_at(&mut buf, 0).unwrap();
        assert!(buf[..100].iter().all(|&b| b == 7));
        assert!(buf[100..5100].iter().all(|&b| b == 0));
        assert!(buf[5100..].iter().all(|&b| b == 7));
    }
}
