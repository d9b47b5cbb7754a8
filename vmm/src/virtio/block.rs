//! virtio-blk: request parsing and execution (virtio 1.2 §5.2).
//!
//! The guest is hostile: a chain is read as two byte streams — the device-readable part
//! (16-byte header, then OUT data or discard/write-zeroes segments) and the device-writable part
//! (IN data or the ID, then one status byte) — so that any framing the spec allows works and no
//! framing it forbids can make us touch memory outside the guest or the disk. Every address goes
//! through vm-memory's checked accessors; every length and sector through checked arithmetic.

use std::sync::atomic::{AtomicU64, Ordering};

use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::cli::{CacheMode, DetectZeroes, DiscardMode};

/// Feature bits (virtio 1.2 §5.2.3 and §6).
pub mod features {
    /// Maximum number of segments in a request is in `seg_max`.
    pub const SEG_MAX: u64 = 1 << 2;
    /// The device is read-only.
    pub const RO: u64 = 1 << 5;
    /// Block size of disk is in `blk_size`.
    pub const BLK_SIZE: u64 = 1 << 6;
    /// More than one request queue; how many is in `num_queues`.
    pub const MQ: u64 = 1 << 12;
    /// Cache flush command support.
    pub const FLUSH: u64 = 1 << 9;
    /// The device supports DISCARD.
    pub const DISCARD: u64 = 1 << 13;
    /// The device supports WRITE_ZEROES.
    pub const WRITE_ZEROES: u64 = 1 << 14;
    /// used_event / avail_event notification suppression.
    pub const RING_EVENT_IDX: u64 = 1 << 29;
    /// Virtio 1.x.
    pub const VERSION_1: u64 = 1 << 32;
}

/// Request types.
pub const VIRTIO_BLK_T_IN: u32 = 0;
/// Write.
pub const VIRTIO_BLK_T_OUT: u32 = 1;
/// Flush.
pub const VIRTIO_BLK_T_FLUSH: u32 = 4;
/// Device ID string.
pub const VIRTIO_BLK_T_GET_ID: u32 = 8;
/// Discard.
pub const VIRTIO_BLK_T_DISCARD: u32 = 11;
/// Write zeroes.
pub const VIRTIO_BLK_T_WRITE_ZEROES: u32 = 13;

/// Status: success.
pub const VIRTIO_BLK_S_OK: u8 = 0;
/// Status: I/O or request error.
pub const VIRTIO_BLK_S_IOERR: u8 = 1;
/// Status: request type not supported.
pub const VIRTIO_BLK_S_UNSUPP: u8 = 2;

/// Bytes in a sector, the unit of `sector` fields whatever `blk_size` says.
pub const SECTOR_SIZE: u64 = 512;
/// Length of the GET_ID answer.
pub const ID_BYTES: usize = 20;
/// Largest piece of a request copied through the bounce buffer at once (advertised as
/// `size_max`, the largest segment): bounds what a guest can make us allocate. A larger request
/// is served piece by piece; the driver may send any total length (Linux's does).
pub const MAX_TRANSFER: u64 = 32 << 20;
/// Most discard / write-zeroes segments per request.
pub const MAX_RANGE_SEGS: u32 = 32;
/// Most sectors in one discard or write-zeroes segment.
pub const MAX_RANGE_SECTORS: u32 = u32::MAX / 2;
/// Queue size offered (QueueNumMax) unless `queue_size=` says otherwise: qemu's default.
pub const DEFAULT_QUEUE_SIZE: u16 = 256;
/// The largest `queue_size=`: qemu's limit (VIRTQUEUE_MAX_SIZE). A chain never holds more
/// descriptors than its queue.
pub const MAX_QUEUE_SIZE: u16 = 1024;

/// The storage a block device serves: an open image, or memory in tests.
pub trait Backend: Send + Sync {
    /// Virtual size in bytes.
    fn size(&self) -> u64;
    /// Reads `buf.len()` bytes at `off`.
    ///
    /// # Errors
    /// I/O failure; the request then completes with IOERR.
    fn read_at(&self, buf: &mut [u8], off: u64) -> Result<(), String>;
    /// Writes `buf` at `off`.
    ///
    /// # Errors
    /// As for `read_at`.
    fn write_at(&self, buf: &[u8], off: u64) -> Result<(), String>;
    /// Makes a range read as zeroes.
    ///
    /// # Errors
    /// As for `read_at`.
    fn write_zeroes(&self, off: u64, len: u64, unmap: bool) -> Result<(), String>;
    /// Deallocates a range.
    ///
    /// # Errors
    /// As for `read_at`.
    fn discard(&self, off: u64, len: u64) -> Result<(), String>;
    /// Makes completed writes durable.
    ///
    /// # Errors
    /// As for `read_at`.
    fn flush(&self) -> Result<(), String>;
}

/// How a device treats requests (from `--disk`).
#[derive(Debug, Clone)]
pub struct BlockConfig {
    /// Offer RO and fail writes.
    pub readonly: bool,
    /// FLUSH and write-through behaviour.
    pub cache: CacheMode,
    /// What DISCARD does.
    pub discard: DiscardMode,
    /// Whether writes of zeroes become write-zeroes requests.
    pub detect_zeroes: DetectZeroes,
    /// GET_ID answer, at most 20 bytes.
    pub serial: Vec<u8>,
    /// Request queues, each served by its own I/O thread (MQ when more than one).
    pub num_queues: u16,
    /// Descriptors per queue offered (QueueNumMax): a power of two from 4 to
    /// [`MAX_QUEUE_SIZE`].
    pub queue_size: u16,
}

impl BlockConfig {
    /// Feature bits offered.
    pub fn features(&self) -> u64 {
        let mut f = features::VERSION_1
            | features::SEG_MAX
            | features::BLK_SIZE
            | features::FLUSH
            | features::DISCARD
            | features::WRITE_ZEROES
            | features::RING_EVENT_IDX;
        if self.readonly {
            f |= features::RO;
        }
        if self.num_queues > 1 {
            f |= features::MQ;
        }
        f
    }

    /// Most data segments in one request, advertised as `seg_max`: a request needs two
    /// descriptors more, for its header and status, and the queue holds `queue_size`.
    pub fn seg_max(&self) -> u32 {
        u32::from(self.queue_size).saturating_sub(2).max(1)
    }

    /// The configuration space (struct virtio_blk_config, 60 bytes, little-endian).
    pub fn config_space(&self, size: u64) -> Vec<u8> {
        let mut c = vec![0u8; 60];
        c[0..8].copy_from_slice(&(size / SECTOR_SIZE).to_le_bytes());
        c[8..12].copy_from_slice(
            &u32::try_from(MAX_TRANSFER)
                .unwrap_or(u32::MAX)
                .to_le_bytes(),
        ); // size_max
        c[12..16].copy_from_slice(&self.seg_max().to_le_bytes());
        c[20..24].copy_from_slice(&u32::try_from(SECTOR_SIZE).unwrap_or(512).to_le_bytes()); // blk_size
        c[34..36].copy_from_slice(&self.num_queues.max(1).to_le_bytes()); // num_queues
        c[36..40].copy_from_slice(&MAX_RANGE_SECTORS.to_le_bytes()); // max_discard_sectors
        c[40..44].copy_from_slice(&MAX_RANGE_SEGS.to_le_bytes()); // max_discard_seg
        c[44..48].copy_from_slice(&1u32.to_le_bytes()); // discard_sector_alignment
        c[48..52].copy_from_slice(&MAX_RANGE_SECTORS.to_le_bytes()); // max_write_zeroes_sectors
        c[52..56].copy_from_slice(&MAX_RANGE_SEGS.to_le_bytes()); // max_write_zeroes_seg
        c[56] = u8::from(self.discard == DiscardMode::Unmap); // write_zeroes_may_unmap
        c
    }
}

/// One guest buffer: an address and length inside guest memory (checked when built).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Guest-physical address.
    pub addr: GuestAddress,
    /// Length in bytes (non-zero).
    pub len: u32,
}

/// Why a chain cannot be served at all.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    /// A descriptor's range is not entirely in guest memory.
    #[error("descriptor {addr:#x}+{len} lies outside guest memory")]
    OutOfMemory {
        /// Start.
        addr: u64,
        /// Length.
        len: u32,
    },
    /// A device-readable descriptor follows a device-writable one.
    #[error("readable descriptor after a writable one")]
    ReadableAfterWritable,
    /// The readable part is shorter than the 16-byte header.
    #[error("request header is {0} bytes, not 16")]
    ShortHeader(u64),
    /// More descriptors than the queue can hold (a loop).
    #[error("chain longer than the queue")]
    TooLong,
    /// Reading guest memory failed.
    #[error("guest memory access failed")]
    Memory,
}

/// A parsed chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// `type` from the header.
    pub ty: u32,
    /// `sector` from the header.
    pub sector: u64,
    /// Device-readable bytes after the header.
    pub out: Vec<Segment>,
    /// Device-writable bytes before the status byte.
    pub inp: Vec<Segment>,
    /// The status byte.
    pub status: GuestAddress,
}

/// What a chain parsed into: a request, or a reason plus where (if anywhere) to put a status.
pub type Parsed = Result<Request, (ChainError, Option<GuestAddress>)>;

fn total(segs: &[Segment]) -> u64 {
    segs.iter().map(|s| u64::from(s.len)).sum()
}

/// Runs `op` on each segment in place in guest memory, at consecutive disk offsets from `off`,
/// when every segment lies within one memory region (the usual case: no bounce copy); `None`
/// when one does not, and the caller goes through a bounce buffer instead.
fn direct(
    mem: &GuestMemoryMmap,
    segs: &[Segment],
    off: u64,
    mut op: impl FnMut(&mut [u8], u64) -> Result<(), String>,
) -> Option<Result<(), String>> {
    let mut slices = Vec::with_capacity(segs.len());
    for s in segs {
        let len = usize::try_from(s.len).ok()?;
        let vs = mem.get_slice(s.addr, len).ok()?;
        if vs.len() != len {
            return None;
        }
        slices.push(vs);
    }
    let mut at = off;
    for vs in slices {
        let guard = vs.ptr_guard_mut();
        // SAFETY: `vs` is `vs.len()` bytes of mapped guest memory, checked by get_slice, which
        // stays mapped while `mem` is borrowed. The guest may touch it concurrently, as with
        // any DMA; the slice lives only for this call and no Rust invariant depends on its
        // contents.
        let buf = unsafe { std::slice::from_raw_parts_mut(guard.as_ptr(), vs.len()) };
        if let Err(e) = op(buf, at) {
            return Some(Err(e));
        }
        at += vs.len() as u64;
    }
    Some(Ok(()))
}

/// `segs` in pieces of at most [`MAX_TRANSFER`] bytes, in order.
fn pieces(segs: &[Segment]) -> Vec<Vec<Segment>> {
    let mut out = Vec::new();
    let mut rest = segs.to_vec();
    while total(&rest) > 0 {
        let (head, tail) = split_at(&rest, MAX_TRANSFER);
        out.push(head);
        rest = tail;
    }
    out
}

/// Splits `segs` at byte `at`: (first `at` bytes, the rest).
fn split_at(segs: &[Segment], at: u64) -> (Vec<Segment>, Vec<Segment>) {
    let (mut a, mut b) = (Vec::new(), Vec::new());
    let mut left = at;
    for s in segs {
        let l = u64::from(s.len);
        if left >= l {
            a.push(*s);
            left -= l;
        } else if left == 0 {
            b.push(*s);
        } else {
            // left < l, so it fits in u32.
            let k = u32::try_from(left).unwrap_or(0);
            a.push(Segment {
                addr: s.addr,
                len: k,
            });
            b.push(Segment {
                addr: s.addr.unchecked_add(u64::from(k)),
                len: s.len - k,
            });
            left = 0;
        }
    }
    (a, b)
}

/// Parses descriptors `(addr, len, write_only)` of one chain.
pub fn parse(mem: &GuestMemoryMmap, descs: impl IntoIterator<Item = (u64, u32, bool)>) -> Parsed {
    let mut readable = Vec::new();
    let mut writable = Vec::new();
    let mut err = None;
    for (n, (addr, len, write)) in descs.into_iter().enumerate() {
        if n >= usize::from(MAX_QUEUE_SIZE) {
            err.get_or_insert(ChainError::TooLong);
            break;
        }
        if len == 0 {
            continue;
        }
        let ok = usize::try_from(len).is_ok_and(|l| mem.check_range(GuestAddress(addr), l));
        if !ok {
            err.get_or_insert(ChainError::OutOfMemory { addr, len });
            // Keep going: a valid status descriptor may still follow.
        }
        let seg = Segment {
            addr: GuestAddress(addr),
            len,
        };
        if write {
            if ok {
                writable.push(seg);
            } else {
                writable.push(Segment {
                    addr: GuestAddress(u64::MAX),
                    len,
                });
            }
        } else {
            if !writable.is_empty() {
                err.get_or_insert(ChainError::ReadableAfterWritable);
            }
            readable.push(seg);
        }
    }
    // The status byte: the last byte of the last writable descriptor, if that is in memory.
    let status = writable.last().and_then(|s| {
        let a = s.addr.checked_add(u64::from(s.len) - 1)?;
        (s.addr.0 != u64::MAX && mem.address_in_range(a)).then_some(a)
    });
    if let Some(e) = err {
        return Err((e, status));
    }
    let Some(status) = status else {
        return Err((ChainError::ShortHeader(0), None));
    };
    let rlen = total(&readable);
    if rlen < 16 {
        return Err((ChainError::ShortHeader(rlen), Some(status)));
    }
    let wlen = total(&writable) - 1;
    let (hdr_segs, out) = split_at(&readable, 16);
    let (inp, _) = split_at(&writable, wlen);
    let mut hdr = [0u8; 16];
    let mut at = 0;
    for s in &hdr_segs {
        let l = usize::try_from(s.len).unwrap_or(0);
        mem.read_slice(&mut hdr[at..at + l], s.addr)
            .map_err(|_| (ChainError::Memory, Some(status)))?;
        at += l;
    }
    let ty = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
    let sector = u64::from_le_bytes([
        hdr[8], hdr[9], hdr[10], hdr[11], hdr[12], hdr[13], hdr[14], hdr[15],
    ]);
    Ok(Request {
        ty,
        sector,
        out,
        inp,
        status,
    })
}

/// Copies the `n` bytes of `segs` into `bounce`; `None` when guest memory cannot be read.
fn gather<'a>(
    mem: &GuestMemoryMmap,
    segs: &[Segment],
    bounce: &'a mut Vec<u8>,
    n: usize,
) -> Option<&'a [u8]> {
    bounce.resize(n, 0);
    let mut at = 0usize;
    for s in segs {
        let l = usize::try_from(s.len).ok()?;
        let end = at.checked_add(l).filter(|&e| e <= n)?;
        mem.read_slice(&mut bounce[at..end], s.addr).ok()?;
        at = end;
    }
    Some(&bounce[..n])
}

/// Checks `[sector * 512, + len)` against the disk; returns the byte offset.
fn disk_range(sector: u64, len: u64, size: u64) -> Option<u64> {
    let off = sector.checked_mul(SECTOR_SIZE)?;
    let end = off.checked_add(len)?;
    (end <= size).then_some(off)
}

/// Executes one request; returns (status, bytes written into the writable part excluding the
/// status byte). Never panics on guest input.
pub fn execute(
    mem: &GuestMemoryMmap,
    req: &Request,
    disk: &dyn Backend,
    cfg: &BlockConfig,
    bounce: &mut Vec<u8>,
) -> (u8, u32) {
    let size = disk.size();
    let io = |r: Result<(), String>| match r {
        Ok(()) => VIRTIO_BLK_S_OK,
        Err(e) => {
            crate::report!("vmm: virtio-blk: {e}");
            VIRTIO_BLK_S_IOERR
        }
    };
    let flush_after_write = |st: u8| {
        if st == VIRTIO_BLK_S_OK && cfg.cache == CacheMode::DirectSync {
            io(disk.flush())
        } else {
            st
        }
    };
    match req.ty {
        VIRTIO_BLK_T_IN => {
            let len = total(&req.inp);
            if len % SECTOR_SIZE != 0 {
                return (VIRTIO_BLK_S_IOERR, 0);
            }
            let Some(off) = disk_range(req.sector, len, size) else {
                return (VIRTIO_BLK_S_IOERR, 0);
            };
            if let Some(st) = direct(mem, &req.inp, off, |buf, at| disk.read_at(buf, at)) {
                let st = io(st);
                let used = if st == VIRTIO_BLK_S_OK { len } else { 0 };
                return (st, u32::try_from(used).unwrap_or(u32::MAX));
            }
            // Else read through the bounce buffer, a piece of at most MAX_TRANSFER at a time.
            let mut done = 0u64;
            for piece in pieces(&req.inp) {
                let n = usize::try_from(total(&piece)).unwrap_or(0);
                bounce.resize(n, 0);
                let st = io(disk.read_at(&mut bounce[..n], off + done));
                if st != VIRTIO_BLK_S_OK {
                    return (st, 0);
                }
                let mut at = 0usize;
                for s in &piece {
                    let l = usize::try_from(s.len).unwrap_or(0);
                    if mem.write_slice(&bounce[at..at + l], s.addr).is_err() {
                        return (VIRTIO_BLK_S_IOERR, 0);
                    }
                    at += l;
                }
                done += n as u64;
            }
            (VIRTIO_BLK_S_OK, u32::try_from(len).unwrap_or(u32::MAX))
        }
        VIRTIO_BLK_T_OUT => {
            if cfg.readonly {
                return (VIRTIO_BLK_S_IOERR, 0);
            }
            let len = total(&req.out);
            if len % SECTOR_SIZE != 0 {
                return (VIRTIO_BLK_S_IOERR, 0);
            }
            let Some(off) = disk_range(req.sector, len, size) else {
                return (VIRTIO_BLK_S_IOERR, 0);
            };
            let unmap =
                cfg.detect_zeroes == DetectZeroes::Unmap && cfg.discard == DiscardMode::Unmap;
            let write_zeroes = || (flush_after_write(io(disk.write_zeroes(off, len, unmap))), 0);
            let detect = cfg.detect_zeroes != DetectZeroes::Off;
            // Plain guest memory is scanned and written in place.
            let zero_in_place = detect.then(|| {
                direct(mem, &req.out, off, |buf, _| {
                    if imgblock::scan::is_zero(buf) {
                        Ok(())
                    } else {
                        Err(String::new())
                    }
                })
                .map(|r| r.is_ok())
            });
            if zero_in_place == Some(Some(true)) {
                return write_zeroes();
            }
            if let Some(st) = direct(mem, &req.out, off, |buf, at| disk.write_at(buf, at)) {
                return (flush_after_write(io(st)), 0);
            }
            // Else copied, then scanned and written from the copy, a piece of at most
            // MAX_TRANSFER at a time.
            let mut done = 0u64;
            for piece in pieces(&req.out) {
                let n = usize::try_from(total(&piece)).unwrap_or(0);
                let Some(buf) = gather(mem, &piece, bounce, n) else {
                    return (VIRTIO_BLK_S_IOERR, 0);
                };
                let at = off + done;
                let st = if detect && imgblock::scan::is_zero(buf) {
                    io(disk.write_zeroes(at, n as u64, unmap))
                } else {
                    io(disk.write_at(buf, at))
                };
                if st != VIRTIO_BLK_S_OK {
                    return (st, 0);
                }
                done += n as u64;
            }
            (flush_after_write(VIRTIO_BLK_S_OK), 0)
        }
        VIRTIO_BLK_T_FLUSH => {
            if cfg.cache == CacheMode::Unsafe {
                (VIRTIO_BLK_S_OK, 0)
            } else {
                (io(disk.flush()), 0)
            }
        }
        VIRTIO_BLK_T_GET_ID => {
            let mut id = [0u8; ID_BYTES];
            let n = cfg.serial.len().min(ID_BYTES);
            id[..n].copy_from_slice(&cfg.serial[..n]);
            let mut at = 0usize;
            for s in &req.inp {
                if at >= ID_BYTES {
                    break;
                }
                let l = usize::try_from(s.len).unwrap_or(0).min(ID_BYTES - at);
                if mem.write_slice(&id[at..at + l], s.addr).is_err() {
                    return (VIRTIO_BLK_S_IOERR, 0);
                }
                at += l;
            }
            (VIRTIO_BLK_S_OK, u32::try_from(at).unwrap_or(0))
        }
        VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
            if cfg.readonly {
                return (VIRTIO_BLK_S_IOERR, 0);
            }
            let len = total(&req.out);
            if len == 0 || len % 16 != 0 || len / 16 > u64::from(MAX_RANGE_SEGS) {
                return (VIRTIO_BLK_S_IOERR, 0);
            }
            let mut bytes = [0u8; 16 * MAX_RANGE_SEGS as usize];
            let mut at = 0usize;
            for s in &req.out {
                let l = usize::try_from(s.len).unwrap_or(0);
                if mem.read_slice(&mut bytes[at..at + l], s.addr).is_err() {
                    return (VIRTIO_BLK_S_IOERR, 0);
                }
                at += l;
            }
            let zeroes = req.ty == VIRTIO_BLK_T_WRITE_ZEROES;
            // Validate every segment before acting on any.
            let mut ranges = Vec::new();
            for seg in bytes[..at].chunks_exact(16) {
                let sector = u64::from_le_bytes([
                    seg[0], seg[1], seg[2], seg[3], seg[4], seg[5], seg[6], seg[7],
                ]);
                let num = u32::from_le_bytes([seg[8], seg[9], seg[10], seg[11]]);
                let flags = u32::from_le_bytes([seg[12], seg[13], seg[14], seg[15]]);
                let unmap = flags & 1 != 0;
                if flags & !1 != 0 || (unmap && !zeroes) {
                    return (VIRTIO_BLK_S_UNSUPP, 0);
                }
                if num > MAX_RANGE_SECTORS {
                    return (VIRTIO_BLK_S_IOERR, 0);
                }
                let l = u64::from(num) * SECTOR_SIZE;
                let Some(off) = disk_range(sector, l, size) else {
                    return (VIRTIO_BLK_S_IOERR, 0);
                };
                ranges.push((off, l, unmap));
            }
            for (off, l, unmap) in ranges {
                let st = if zeroes {
                    io(disk.write_zeroes(off, l, unmap && cfg.discard == DiscardMode::Unmap))
                } else if cfg.discard == DiscardMode::Unmap {
                    io(disk.discard(off, l))
                } else {
                    VIRTIO_BLK_S_OK
                };
                if st != VIRTIO_BLK_S_OK {
                    return (st, 0);
                }
            }
            (flush_after_write(VIRTIO_BLK_S_OK), 0)
        }
        _ => (VIRTIO_BLK_S_UNSUPP, 0),
    }
}

/// Serves one chain end to end: parse, execute, write the status. Returns the used length.
pub fn handle_chain(
    mem: &GuestMemoryMmap,
    descs: impl IntoIterator<Item = (u64, u32, bool)>,
    disk: &dyn Backend,
    cfg: &BlockConfig,
    bounce: &mut Vec<u8>,
) -> u32 {
    handle_chain_counted(mem, descs, disk, cfg, bounce, None)
}

/// A disk's request counters, as Cloud Hypervisor's `vm.counters` names them: completed reads
/// and writes and their bytes.
#[derive(Debug, Default)]
pub struct DiskStats {
    /// Bytes read by completed read requests.
    pub read_bytes: AtomicU64,
    /// Completed read requests.
    pub read_ops: AtomicU64,
    /// Bytes written by completed write requests.
    pub write_bytes: AtomicU64,
    /// Completed write requests.
    pub write_ops: AtomicU64,
}

/// As [`handle_chain`], counting completed reads and writes in `stats`.
pub fn handle_chain_counted(
    mem: &GuestMemoryMmap,
    descs: impl IntoIterator<Item = (u64, u32, bool)>,
    disk: &dyn Backend,
    cfg: &BlockConfig,
    bounce: &mut Vec<u8>,
    stats: Option<&DiskStats>,
) -> u32 {
    match parse(mem, descs) {
        Ok(req) => {
            let (status, n) = execute(mem, &req, disk, cfg, bounce);
            let counters = match req.ty {
                VIRTIO_BLK_T_IN => stats.map(|s| (&s.read_bytes, &s.read_ops, &req.inp)),
                VIRTIO_BLK_T_OUT => stats.map(|s| (&s.write_bytes, &s.write_ops, &req.out)),
                _ => None,
            };
            if let Some((bytes, ops, segs)) = counters.filter(|_| status == VIRTIO_BLK_S_OK) {
                bytes.fetch_add(total(segs), Ordering::Relaxed);
                ops.fetch_add(1, Ordering::Relaxed);
            }
            if mem.write_obj(status, req.status).is_err() {
                return 0;
            }
            n.saturating_add(1)
        }
        Err((_, Some(status))) => {
            if mem.write_obj(VIRTIO_BLK_S_IOERR, status).is_err() {
                return 0;
            }
            1
        }
        Err((_, None)) => 0,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::Mutex;

    /// A disk in memory that asserts every access is in range.
    pub struct MemDisk(pub Mutex<Vec<u8>>);

    impl Backend for MemDisk {
        fn size(&self) -> u64 {
            self.0.lock().unwrap().len() as u64
        }
        fn read_at(&self, buf: &mut [u8], off: u64) -> Result<(), String> {
            let d = self.0.lock().unwrap();
            let o = usize::try_from(off).unwrap();
            buf.copy_from_slice(&d[o..o + buf.len()]);
            Ok(())
        }
        fn write_at(&self, buf: &[u8], off: u64) -> Result<(), String> {
            let mut d = self.0.lock().unwrap();
            let o = usize::try_from(off).unwrap();
            d[o..o + buf.len()].copy_from_slice(buf);
            Ok(())
        }
        fn write_zeroes(&self, off: u64, len: u64, _unmap: bool) -> Result<(), String> {
            let mut d = self.0.lock().unwrap();
            let o = usize::try_from(off).unwrap();
            d[o..o + usize::try_from(len).unwrap()].fill(0);
            Ok(())
        }
        fn discard(&self, off: u64, len: u64) -> Result<(), String> {
            self.write_zeroes(off, len, true)
        }
        fn flush(&self) -> Result<(), String> {
            Ok(())
        }
    }

    pub fn cfg(readonly: bool) -> BlockConfig {
        BlockConfig {
            readonly,
            cache: CacheMode::Writeback,
            discard: DiscardMode::Unmap,
            detect_zeroes: DetectZeroes::Off,
            serial: b"serial-1".to_vec(),
            num_queues: 1,
            queue_size: DEFAULT_QUEUE_SIZE,
        }
    }

    fn setup() -> (GuestMemoryMmap, MemDisk) {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let disk = MemDisk(Mutex::new(
            (0..64 * 1024u32)
                .map(|i| u8::try_from(i % 251).unwrap())
                .collect(),
        ));
        (mem, disk)
    }

    fn hdr(mem: &GuestMemoryMmap, at: u64, ty: u32, sector: u64) {
        mem.write_obj(ty, GuestAddress(at)).unwrap();
        mem.write_obj(0u32, GuestAddress(at + 4)).unwrap();
        mem.write_obj(sector, GuestAddress(at + 8)).unwrap();
    }

    fn status(mem: &GuestMemoryMmap, at: u64) -> u8 {
        mem.read_obj(GuestAddress(at)).unwrap()
    }

    #[test]
    fn read_request_split_header_and_data_returns_disk_bytes() {
        let (mem, disk) = setup();
        hdr(&mem, 0x1000, VIRTIO_BLK_T_IN, 2);
        // Header split 10 + 6 across two descriptors; data in two segments.
        let d = [
            (0x1000, 10, false),
            (0x100a, 6, false),
            (0x2000, 512, true),
            (0x3000, 512, true),
            (0x4000, 1, true),
        ];
        let n = handle_chain(&mem, d, &disk, &cfg(false), &mut Vec::new());
        assert_eq!(n, 1025);
        assert_eq!(status(&mem, 0x4000), VIRTIO_BLK_S_OK);
        let mut b = [0u8; 512];
        mem.read_slice(&mut b, GuestAddress(0x3000)).unwrap();
        assert_eq!(b[0], (1536 % 251) as u8);
    }

    #[test]
    fn segments_spanning_two_memory_regions_go_through_the_bounce_buffer() {
        // Two adjacent regions: a segment across 0x10000 has no single host mapping.
        let mem = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 0x10000),
            (GuestAddress(0x10000), 0x10000),
        ])
        .unwrap();
        let (_, disk) = setup();
        hdr(&mem, 0x1000, VIRTIO_BLK_T_IN, 1);
        let d = [(0x1000, 16, false), (0xff00, 1024, true), (0x2000, 1, true)];
        let mut bounce = Vec::new();
        assert_eq!(handle_chain(&mem, d, &disk, &cfg(false), &mut bounce), 1025);
        assert_eq!(status(&mem, 0x2000), VIRTIO_BLK_S_OK);
        assert!(bounce.len() >= 1024, "the read used the bounce buffer");
        let mut got = vec![0u8; 1024];
        mem.read_slice(&mut got, GuestAddress(0xff00)).unwrap();
        assert_eq!(got, disk.0.lock().unwrap()[512..1536]);

        // And back out: a write from across the boundary lands on the disk intact.
        let pattern: Vec<u8> = (0..=255u8).cycle().step_by(7).take(1024).collect();
        mem.write_slice(&pattern, GuestAddress(0xff00)).unwrap();
        hdr(&mem, 0x1000, VIRTIO_BLK_T_OUT, 40);
        let d = [
            (0x1000, 16, false),
            (0xff00, 1024, false),
            (0x2000, 1, true),
        ];
        let mut bounce = Vec::new();
        handle_chain(&mem, d, &disk, &cfg(false), &mut bounce);
        assert_eq!(status(&mem, 0x2000), VIRTIO_BLK_S_OK);
        assert!(bounce.len() >= 1024, "the write used the bounce buffer");
        assert_eq!(
            disk.0.lock().unwrap()[40 * 512..41 * 512 + 512],
            pattern[..]
        );
    }

    /// Requests larger than the bounce buffer's limit are served piece by piece, not refused:
    /// the driver may send any length (Linux's does when max_sectors_kb is raised).
    #[test]
    fn requests_larger_than_the_bounce_limit_are_served_in_pieces() {
        const M: u64 = 1 << 20;
        let mem = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 48 << 20),
            (GuestAddress(48 * M), 48 << 20),
        ])
        .unwrap();
        let len = 40 * M;
        let img: Vec<u8> = (0..64 * M).map(|i| (i / 4096 % 251) as u8).collect();
        let disk = MemDisk(Mutex::new(img.clone()));
        // One segment of 40 MiB across the regions' boundary: only the bounce path can serve
        // it, in a 32 MiB piece and an 8 MiB one.
        let data = 20 * M;
        hdr(&mem, 0x1000, VIRTIO_BLK_T_IN, 8);
        let d = [
            (0x1000, 16, false),
            (data, 40 << 20, true),
            (0x2000, 1, true),
        ];
        let mut bounce = Vec::new();
        assert_eq!(
            handle_chain(&mem, d, &disk, &cfg(false), &mut bounce),
            (40 << 20) + 1
        );
        assert_eq!(status(&mem, 0x2000), VIRTIO_BLK_S_OK);
        assert!(bounce.len() as u64 <= MAX_TRANSFER);
        let mut got = vec![0u8; usize::try_from(len).unwrap()];
        mem.read_slice(&mut got, GuestAddress(data)).unwrap();
        assert!(got == img[8 * 512..8 * 512 + got.len()]);
        // And written back 1 MiB further on, through the same pieces.
        hdr(&mem, 0x1000, VIRTIO_BLK_T_OUT, 2048);
        let d = [
            (0x1000, 16, false),
            (data, 40 << 20, false),
            (0x2000, 1, true),
        ];
        handle_chain(&mem, d, &disk, &cfg(false), &mut bounce);
        assert_eq!(status(&mem, 0x2000), VIRTIO_BLK_S_OK);
        assert!(disk.0.lock().unwrap()[(1 << 20)..(1 << 20) + got.len()] == got[..]);
    }

    /// A MemDisk that records its write-zeroes requests (with their unmap flag) and counts
    /// its flushes.
    pub struct Logged(
        pub MemDisk,
        pub Mutex<Vec<(u64, u64, bool)>>,
        pub std::sync::atomic::AtomicU32,
    );

    impl Logged {
        pub fn new(disk: MemDisk) -> Self {
            Logged(disk, Mutex::new(Vec::new()), Default::default())
        }
    }

    impl Backend for Logged {
        fn size(&self) -> u64 {
            self.0.size()
        }
        fn read_at(&self, buf: &mut [u8], off: u64) -> Result<(), String> {
            self.0.read_at(buf, off)
        }
        fn write_at(&self, buf: &[u8], off: u64) -> Result<(), String> {
            self.0.write_at(buf, off)
        }
        fn write_zeroes(&self, off: u64, len: u64, unmap: bool) -> Result<(), String> {
            self.1.lock().unwrap().push((off, len, unmap));
            self.0.write_zeroes(off, len, unmap)
        }
        fn discard(&self, off: u64, len: u64) -> Result<(), String> {
            self.0.discard(off, len)
        }
        fn flush(&self) -> Result<(), String> {
            self.2.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Ok(())
        }
    }

    #[test]
    fn detect_zeroes_turns_writes_of_zeroes_into_write_zeroes_as_qemu() {
        // Two regions, so that one case needs the bounce buffer as well.
        let mem = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 0x10000),
            (GuestAddress(0x10000), 0x10000),
        ])
        .unwrap();
        mem.write_slice(&[0u8; 2048], GuestAddress(0xff00)).unwrap();
        mem.write_slice(&[0u8; 2048], GuestAddress(0x8000)).unwrap();
        let cases = [
            (DetectZeroes::Off, DiscardMode::Unmap, None),
            (DetectZeroes::On, DiscardMode::Unmap, Some(false)),
            (DetectZeroes::Unmap, DiscardMode::Unmap, Some(true)),
            // qemu: unmap without discard=unmap acts as on.
            (DetectZeroes::Unmap, DiscardMode::Ignore, Some(false)),
        ];
        for (detect, discard, want) in cases {
            for data in [0x8000u64, 0xff00] {
                let (_, md) = setup();
                let disk = Logged::new(md);
                let cfg = BlockConfig {
                    detect_zeroes: detect,
                    discard,
                    ..cfg(false)
                };
                hdr(&mem, 0x1000, VIRTIO_BLK_T_OUT, 8);
                let d = [(0x1000, 16, false), (data, 1024, false), (0x2000, 1, true)];
                handle_chain(&mem, d, &disk, &cfg, &mut Vec::new());
                assert_eq!(status(&mem, 0x2000), VIRTIO_BLK_S_OK);
                let log = disk.1.lock().unwrap().clone();
                match want {
                    None => assert!(log.is_empty(), "{detect:?}: {log:?}"),
                    Some(unmap) => assert_eq!(log, [(4096, 1024, unmap)], "{detect:?}"),
                }
                assert!(disk.0 .0.lock().unwrap()[4096..5120]
                    .iter()
                    .all(|&b| b == 0));
                // A buffer with one byte set is written as it is.
                mem.write_obj(1u8, GuestAddress(data + 1000)).unwrap();
                handle_chain(&mem, d, &disk, &cfg, &mut Vec::new());
                mem.write_obj(0u8, GuestAddress(data + 1000)).unwrap();
                assert_eq!(disk.1.lock().unwrap().len(), log.len());
                assert_eq!(disk.0 .0.lock().unwrap()[4096 + 1000], 1);
            }
        }
    }

    #[test]
    fn in_region_segments_need_no_bounce_buffer() {
        let (mem, disk) = setup();
        hdr(&mem, 0x1000, VIRTIO_BLK_T_IN, 4);
        let d = [(0x1000, 16, false), (0x8000, 4096, true), (0x2000, 1, true)];
        let mut bounce = Vec::new();
        assert_eq!(handle_chain(&mem, d, &disk, &cfg(false), &mut bounce), 4097);
        assert!(bounce.is_empty());
        let mut got = vec![0u8; 4096];
        mem.read_slice(&mut got, GuestAddress(0x8000)).unwrap();
        assert_eq!(got, disk.0.lock().unwrap()[2048..2048 + 4096]);
    }

    #[test]
    fn status_inside_data_descriptor_is_last_byte() {
        let (mem, disk) = setup();
        hdr(&mem, 0x1000, VIRTIO_BLK_T_IN, 0);
        let n = handle_chain(
            &mem,
            [(0x1000, 16, false), (0x2000, 513, true)],
            &disk,
            &cfg(false),
            &mut Vec::new(),
        );
        assert_eq!(n, 513);
        assert_eq!(status(&mem, 0x2200), VIRTIO_BLK_S_OK);
    }

    #[test]
    fn write_to_readonly_disk_ioerr_and_unchanged() {
        let (mem, disk) = setup();
        hdr(&mem, 0x1000, VIRTIO_BLK_T_OUT, 0);
        let before = disk.0.lock().unwrap().clone();
        handle_chain(
            &mem,
            [(0x1000, 16, false), (0x2000, 512, false), (0x4000, 1, true)],
            &disk,
            &cfg(true),
            &mut Vec::new(),
        );
        assert_eq!(status(&mem, 0x4000), VIRTIO_BLK_S_IOERR);
        assert_eq!(*disk.0.lock().unwrap(), before);
    }

    #[test]
    fn read_past_end_ioerr() {
        let (mem, disk) = setup();
        hdr(&mem, 0x1000, VIRTIO_BLK_T_IN, 127);
        handle_chain(
            &mem,
            [(0x1000, 16, false), (0x2000, 1024, true), (0x4000, 1, true)],
            &disk,
            &cfg(false),
            &mut Vec::new(),
        );
        assert_eq!(status(&mem, 0x4000), VIRTIO_BLK_S_IOERR);
        hdr(&mem, 0x1000, VIRTIO_BLK_T_IN, u64::MAX);
        handle_chain(
            &mem,
            [(0x1000, 16, false), (0x2000, 512, true), (0x4000, 1, true)],
            &disk,
            &cfg(false),
            &mut Vec::new(),
        );
        assert_eq!(status(&mem, 0x4000), VIRTIO_BLK_S_IOERR);
    }

    #[test]
    fn descriptor_outside_memory_ioerr_without_access() {
        let (mem, disk) = setup();
        hdr(&mem, 0x1000, VIRTIO_BLK_T_IN, 0);
        let r = parse(
            &mem,
            [
                (0x1000, 16, false),
                (0xff000, 0x2000, true),
                (0x4000, 1, true),
            ],
        );
        assert!(matches!(r, Err((ChainError::OutOfMemory { .. }, Some(_)))));
        handle_chain(
            &mem,
            [
                (0x1000, 16, false),
                (u64::MAX - 4, 512, true),
                (0x4000, 1, true),
            ],
            &disk,
            &cfg(false),
            &mut Vec::new(),
        );
        assert_eq!(status(&mem, 0x4000), VIRTIO_BLK_S_IOERR);
    }

    #[test]
    fn readable_after_writable_rejected() {
        let (mem, _) = setup();
        let r = parse(
            &mem,
            [
                (0x1000, 16, false),
                (0x2000, 512, true),
                (0x3000, 16, false),
                (0x4000, 1, true),
            ],
        );
        assert!(matches!(
            r,
            Err((ChainError::ReadableAfterWritable, Some(_)))
        ));
    }

    #[test]
    fn chain_without_writable_descriptor_used_len_zero() {
        let (mem, disk) = setup();
        hdr(&mem, 0x1000, VIRTIO_BLK_T_IN, 0);
        assert_eq!(
            handle_chain(
                &mem,
                [(0x1000, 16, false)],
                &disk,
                &cfg(false),
                &mut Vec::new()
            ),
            0
        );
    }

    #[test]
    fn short_header_ioerr() {
        let (mem, disk) = setup();
        handle_chain(
            &mem,
            [(0x1000, 8, false), (0x4000, 1, true)],
            &disk,
            &cfg(false),
            &mut Vec::new(),
        );
        assert_eq!(status(&mem, 0x4000), VIRTIO_BLK_S_IOERR);
    }

    #[test]
    fn unknown_type_unsupp() {
        let (mem, disk) = setup();
        hdr(&mem, 0x1000, 0x77, 0);
        handle_chain(
            &mem,
            [(0x1000, 16, false), (0x4000, 1, true)],
            &disk,
            &cfg(false),
            &mut Vec::new(),
        );
        assert_eq!(status(&mem, 0x4000), VIRTIO_BLK_S_UNSUPP);
    }

    #[test]
    fn get_id_returns_serial_padded() {
        let (mem, disk) = setup();
        hdr(&mem, 0x1000, VIRTIO_BLK_T_GET_ID, 0);
        mem.write_slice(&[0xffu8; 20], GuestAddress(0x2000))
            .unwrap();
        let n = handle_chain(
            &mem,
            [(0x1000, 16, false), (0x2000, 20, true), (0x4000, 1, true)],
            &disk,
            &cfg(false),
            &mut Vec::new(),
        );
        assert_eq!(n, 21);
        let mut id = [0u8; 20];
        mem.read_slice(&mut id, GuestAddress(0x2000)).unwrap();
        assert_eq!(&id[..9], b"serial-1\0");
    }

    #[test]
    fn write_zeroes_and_discard_ranges_checked() {
        let (mem, disk) = setup();
        hdr(&mem, 0x1000, VIRTIO_BLK_T_WRITE_ZEROES, 0);
        let seg = |sector: u64, num: u32, flags: u32| {
            mem.write_obj(sector, GuestAddress(0x2000)).unwrap();
            mem.write_obj(num, GuestAddress(0x2008)).unwrap();
            mem.write_obj(flags, GuestAddress(0x200c)).unwrap();
        };
        let chain = [(0x1000, 16, false), (0x2000, 16, false), (0x4000, 1, true)];
        seg(1, 2, 0);
        handle_chain(&mem, chain, &disk, &cfg(false), &mut Vec::new());
        assert_eq!(status(&mem, 0x4000), VIRTIO_BLK_S_OK);
        assert!(disk.0.lock().unwrap()[512..1536].iter().all(|&b| b == 0));
        seg(127, 2, 0);
        handle_chain(&mem, chain, &disk, &cfg(false), &mut Vec::new());
        assert_eq!(status(&mem, 0x4000), VIRTIO_BLK_S_IOERR);
        seg(1, 1, 4);
        handle_chain(&mem, chain, &disk, &cfg(false), &mut Vec::new());
        assert_eq!(status(&mem, 0x4000), VIRTIO_BLK_S_UNSUPP);
        hdr(&mem, 0x1000, VIRTIO_BLK_T_DISCARD, 0);
        seg(1, 1, 1);
        handle_chain(&mem, chain, &disk, &cfg(false), &mut Vec::new());
        assert_eq!(status(&mem, 0x4000), VIRTIO_BLK_S_UNSUPP);
        seg(4, 1, 0);
        handle_chain(&mem, chain, &disk, &cfg(false), &mut Vec::new());
        assert_eq!(status(&mem, 0x4000), VIRTIO_BLK_S_OK);
    }

    #[test]
    fn config_space_layout() {
        let c = cfg(true).config_space(1 << 20);
        assert_eq!(u64::from_le_bytes(c[0..8].try_into().unwrap()), 2048);
        assert_eq!(u32::from_le_bytes(c[20..24].try_into().unwrap()), 512);
        assert_ne!(cfg(true).features() & features::RO, 0);
        assert_eq!(cfg(false).features() & features::RO, 0);
        // One queue: no MQ, num_queues 1; more: MQ and the count.
        assert_eq!(cfg(false).features() & features::MQ, 0);
        assert_eq!(u16::from_le_bytes(c[34..36].try_into().unwrap()), 1);
        let mut mq = cfg(false);
        mq.num_queues = 4;
        assert_ne!(mq.features() & features::MQ, 0);
        let c = mq.config_space(1 << 20);
        assert_eq!(u16::from_le_bytes(c[34..36].try_into().unwrap()), 4);
    }
}
