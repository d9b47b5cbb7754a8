//! A virtio-blk driver over virtio-mmio (virtio 1.x, split virtqueue) and the disk tests.
//!
//! Disk contents follow a pattern both sides can compute: the little-endian u64 at byte offset
//! `off` (8-aligned) is `pattern(seed, off)`. The host fills images with seed 1; the guest writes
//! seed 2 in fixed places (see [`WRITES`]) that the host test replays to predict the image.

use crate::hw::{mmio_read32, mmio_write32, rdtsc};
use crate::{irq, param, println, Tally};
use core::sync::atomic::{fence, Ordering};

const QSIZE: usize = 256;
const MAX_DISKS: usize = 4;
const SECTOR: u64 = 512;

// virtio-mmio registers.
const MAGIC: u64 = 0x000;
const VERSION: u64 = 0x004;
const DEVICE_ID: u64 = 0x008;
const DEV_FEATURES: u64 = 0x010;
const DEV_FEATURES_SEL: u64 = 0x014;
const DRV_FEATURES: u64 = 0x020;
const DRV_FEATURES_SEL: u64 = 0x024;
const QUEUE_SEL: u64 = 0x030;
const QUEUE_NUM_MAX: u64 = 0x034;
const QUEUE_NUM: u64 = 0x038;
const QUEUE_READY: u64 = 0x044;
const QUEUE_NOTIFY: u64 = 0x050;
const INT_STATUS: u64 = 0x060;
const INT_ACK: u64 = 0x064;
const STATUS: u64 = 0x070;
const QUEUE_DESC: u64 = 0x080;
const QUEUE_DRIVER: u64 = 0x090;
const QUEUE_DEVICE: u64 = 0x0a0;
const CONFIG: u64 = 0x100;

// Feature bits.
const F_SEG_MAX: u64 = 1 << 2;
const F_RO: u64 = 1 << 5;
const F_BLK_SIZE: u64 = 1 << 6;
const F_MQ: u64 = 1 << 12;
const F_FLUSH: u64 = 1 << 9;
const F_DISCARD: u64 = 1 << 13;
const F_WRITE_ZEROES: u64 = 1 << 14;
const F_EVENT_IDX: u64 = 1 << 29;
const F_VERSION_1: u64 = 1 << 32;

// Request types and status.
const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const T_DISCARD: u32 = 11;
const T_WRITE_ZEROES: u32 = 13;
const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;
const S_UNSET: u8 = 0xee;

#[repr(C)]
#[derive(Clone, Copy)]
struct Desc {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

#[repr(C)]
struct Avail {
    flags: u16,
    idx: u16,
    ring: [u16; QSIZE],
    used_event: u16,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct UsedElem {
    id: u32,
    len: u32,
}

#[repr(C, align(4))]
struct Used {
    flags: u16,
    idx: u16,
    ring: [UsedElem; QSIZE],
    avail_event: u16,
}

#[repr(C, align(4096))]
struct Ring {
    desc: [Desc; QSIZE],
    avail: Avail,
    used: Used,
}

const DESC0: Desc = Desc {
    addr: 0,
    len: 0,
    flags: 0,
    next: 0,
};
const RING0: Ring = Ring {
    desc: [DESC0; QSIZE],
    avail: Avail {
        flags: 0,
        idx: 0,
        ring: [0; QSIZE],
        used_event: 0,
    },
    used: Used {
        flags: 0,
        idx: 0,
        ring: [UsedElem { id: 0, len: 0 }; QSIZE],
        avail_event: 0,
    },
};
static mut RINGS: [Ring; MAX_DISKS] = [RING0, RING0, RING0, RING0];
/// Each disk's second queue, set up when the device offers MQ.
static mut RINGS1: [Ring; MAX_DISKS] = [RING0, RING0, RING0, RING0];

/// Request headers, one per in-flight slot, and their status bytes.
#[repr(C, align(64))]
struct Slots {
    hdr: [[u64; 2]; 64],
    status: [u8; 64],
    seg: [[u64; 2]; 64],
    id: [u8; 64],
}
static mut SLOTS: Slots = Slots {
    hdr: [[0; 2]; 64],
    status: [0; 64],
    seg: [[0; 2]; 64],
    id: [0; 64],
};

const DMA_SIZE: usize = 2 << 20;
#[repr(C, align(4096))]
struct Dma([u8; DMA_SIZE]);
static mut DMA: Dma = Dma([0; DMA_SIZE]);

fn dma_addr() -> u64 {
    // SAFETY: taking the address of a static creates no reference.
    core::ptr::addr_of!(DMA) as u64
}

fn dma() -> &'static mut [u8; DMA_SIZE] {
    // SAFETY: the guest is single-threaded and the device only writes DMA while we wait.
    unsafe { &mut *core::ptr::addr_of_mut!(DMA.0) }
}

fn slots() -> &'static mut Slots {
    // SAFETY: as for dma().
    unsafe { &mut *core::ptr::addr_of_mut!(SLOTS) }
}

/// The value of every u64 in the 4 KiB block holding byte `off` (0 for seed 0). Constant per
/// block so that the guest fills and checks a block with one `rep stosq` / `repe scasq`: under
/// a KVM that emulates the guest instruction by instruction, string instructions are cheap.
pub fn pattern(seed: u64, off: u64) -> u64 {
    if seed == 0 {
        return 0;
    }
    (off / 4096 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ seed.wrapping_mul(0xd1b5_4a32_d192_ed03)
}

fn fill(buf: &mut [u8], seed: u64, disk_off: u64) {
    let mut at = 0usize;
    while at < buf.len() {
        let n = (4096 - ((disk_off + at as u64) % 4096) as usize).min(buf.len() - at);
        let v = pattern(seed, disk_off + at as u64);
        // SAFETY: buf[at..at + n] is in bounds; n is a multiple of 8 (all offsets are).
        unsafe {
            core::arch::asm!("rep stosq", inout("rcx") n / 8 => _, inout("rdi") buf.as_mut_ptr().add(at) => _,
                in("rax") v, options(nostack));
        }
        at += n;
    }
}

fn verify(buf: &[u8], seed: u64, disk_off: u64) -> bool {
    let mut at = 0usize;
    while at < buf.len() {
        let n = (4096 - ((disk_off + at as u64) % 4096) as usize).min(buf.len() - at);
        let v = pattern(seed, disk_off + at as u64);
        let left: usize;
        // SAFETY: scans buf[at..at + n] for the first qword differing from v.
        unsafe {
            core::arch::asm!("repe scasq", inout("rcx") n / 8 => left, inout("rdi") buf.as_ptr().add(at) => _,
                in("rax") v, options(nostack, readonly));
        }
        // repe stops after the mismatching element; rcx = 0 can still mean the last differed.
        let last = u64::from_le_bytes(buf[at + n - 8..at + n].try_into().unwrap_or([0; 8]));
        if left != 0 || last != v {
            return false;
        }
        at += n;
    }
    true
}

/// Whether the `n` bytes at `p` are all zero (S_OK), in one `repe scasb`: under a KVM that
/// emulates the guest instruction by instruction, one string instruction costs what one
/// compare does.
///
/// # Safety
/// `p..p + n` must be readable.
unsafe fn all_zero(p: *const u8, n: usize) -> bool {
    if n == 0 {
        return true;
    }
    let equal: u8;
    // SAFETY: the caller vouches for the range; the direction flag is clear (the ABI's rule).
    unsafe {
        core::arch::asm!(
            "repe scasb",
            "sete {eq}",
            eq = out(reg_byte) equal,
            inout("rdi") p => _,
            inout("rcx") n => _,
            in("al") S_OK,
            options(nostack, readonly),
        );
    }
    equal != 0
}

/// `4K@0xd0000000:5` → (base, gsi).
pub fn parse_device(spec: &str) -> Option<(u64, u32)> {
    let (_, rest) = spec.split_once('@')?;
    let (base, irq) = rest.split_once(':')?;
    let base = u64::from_str_radix(base.strip_prefix("0x")?, 16).ok()?;
    Some((base, irq.parse().ok()?))
}

struct Dev {
    base: u64,
    ring: &'static mut Ring,
    qsize: u16,
    avail_idx: u16,
    last_used: u16,
    next_desc: u16,
    features: u64,
    poll: bool,
    /// Queue 1 (MQ): its ring, next available index and last used index seen.
    q1: Option<(&'static mut Ring, u16, u16)>,
}

/// One segment of a request's data.
#[derive(Clone, Copy)]
struct Seg {
    addr: u64,
    len: u32,
}

impl Dev {
    fn reg(&self, off: u64) -> u32 {
        mmio_read32(self.base + off)
    }
    fn set(&self, off: u64, v: u32) {
        mmio_write32(self.base + off, v)
    }
    fn cfg32(&self, off: u64) -> u32 {
        self.reg(CONFIG + off)
    }

    /// Gives the selected queue a ring at `ring` (a [`Ring`]) and marks it ready.
    fn setup_queue(&self, index: u32, ring: u64) {
        self.set(QUEUE_SEL, index);
        self.set(QUEUE_NUM, QSIZE as u32);
        let avail = ring + core::mem::offset_of!(Ring, avail) as u64;
        let used = ring + core::mem::offset_of!(Ring, used) as u64;
        for (reg, a) in [(QUEUE_DESC, ring), (QUEUE_DRIVER, avail), (QUEUE_DEVICE, used)] {
            self.set(reg, a as u32);
            self.set(reg + 4, (a >> 32) as u32);
        }
        self.set(QUEUE_READY, 1);
    }

    fn push_desc(&mut self, addr: u64, len: u32, write: bool, last: bool) -> u16 {
        let i = self.next_desc;
        self.next_desc = (self.next_desc + 1) % self.qsize;
        let mut flags = if write { 2 } else { 0 };
        if !last {
            flags |= 1;
        }
        self.ring.desc[usize::from(i)] = Desc {
            addr,
            len,
            flags,
            next: (i + 1) % self.qsize,
        };
        i
    }

    /// Places a chain in the available ring (no notification yet).
    fn submit(&mut self, parts: &[(u64, u32, bool)]) {
        let mut head = None;
        for (n, &(a, l, w)) in parts.iter().enumerate() {
            let i = self.push_desc(a, l, w, n + 1 == parts.len());
            head.get_or_insert(i);
        }
        let slot = usize::from(self.avail_idx) % usize::from(self.qsize);
        // SAFETY: `ring` is this device's ring; volatile because the device reads it.
        unsafe {
            core::ptr::write_volatile(&mut self.ring.avail.ring[slot], head.unwrap_or(0));
        }
        fence(Ordering::SeqCst);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        // SAFETY: as above.
        unsafe { core::ptr::write_volatile(&mut self.ring.avail.idx, self.avail_idx) };
    }

    fn used_idx(&self) -> u16 {
        // SAFETY: the device writes the used ring; read it volatile.
        unsafe { core::ptr::read_volatile(&self.ring.used.idx) }
    }

    /// Notifies the device and waits for `n` completions, asking (EVENT_IDX) for a single
    /// interrupt when the last one is used.
    fn kick_and_wait(&mut self, n: u16) {
        let target = self.last_used.wrapping_add(n);
        interrupt_at(self.ring, target, self.poll);
        self.set(QUEUE_NOTIFY, 0);
        let start = rdtsc();
        if self.poll {
            while self.used_idx().wrapping_sub(self.last_used) < n {
                core::hint::spin_loop();
                if rdtsc() - start > 200_000_000_000 {
                    panic!("request timed out");
                }
            }
        } else {
            irq::wait_until(|| self.used_idx().wrapping_sub(self.last_used) >= n);
            let isr = self.reg(INT_STATUS);
            self.set(INT_ACK, isr);
        }
        fence(Ordering::SeqCst);
        self.last_used = target;
    }

    /// Reads `size` bytes sequentially in 64 KiB requests with up to `DEPTH` in flight, the way
    /// a tuned driver keeps a queue busy. The requests form two groups of DEPTH / 2 (one group
    /// when DEPTH is 1): while the device serves one, the driver checks and refills the other,
    /// so the driver's work overlaps the device's. Each in-flight slot owns a fixed
    /// three-descriptor chain and ring slot k always names the chain of request k % DEPTH
    /// (DEPTH divides the ring size), so a request costs one instruction (an add to its
    /// header's sector); a group adds
    /// a status reset, one avail-index store, a notification only when the device asks for one
    /// (EVENT_IDX), and one interrupt. Returns the bytes read and whether every request
    /// completed with OK.
    ///
    /// Under a KVM that emulates the guest instruction by instruction the driver's instruction
    /// count per request is the throughput, which is why this path is kept this lean. The data
    /// lands in the DMA buffer, slots sharing it beyond its size.
    ///
    /// `polled` waits by spinning on the used index instead of `hlt`, with `used_event` half
    /// the index space ahead so that the device never interrupts; it touches no port and no
    /// privileged instruction, so it can run in ring 3 ([`crate::user::run`]).
    fn seq_reads<const DEPTH: usize>(&mut self, size: u64, polled: bool) -> (u64, bool) {
        const CHUNK: u64 = 64 << 10;
        const PER: u64 = CHUNK / SECTOR;
        let qsize = usize::from(self.qsize);
        if DEPTH == 0 || DEPTH > 64 || 3 * DEPTH > qsize || qsize % DEPTH != 0 {
            return (0, false);
        }
        let groups = if DEPTH == 1 { 1 } else { 2 };
        let per_group = DEPTH / groups;
        let s = slots();
        // Slot i reads sectors i * PER, (i + DEPTH) * PER, ...: each refill adds DEPTH * PER
        // to its header in place, one instruction per request.
        let stride = DEPTH as u64 * PER;
        for i in 0..DEPTH {
            bench_chain(self.ring, 3 * i as u16, i, stride);
        }
        // Submissions start at a multiple of DEPTH in the ring from here on.
        let skew = usize::from(self.avail_idx) % DEPTH;
        for k in 0..qsize {
            self.ring.avail.ring[k] = 3 * ((k + DEPTH - skew) % DEPTH) as u16;
        }
        let batches = size / (CHUNK * per_group as u64);
        let hdr = core::ptr::addr_of_mut!(s.hdr) as *mut [u64; 2];
        let status = core::ptr::addr_of_mut!(s.status) as *mut u8;
        let mut sector = 0;
        let mut ok = true;
        let (mut submitted, mut completed) = (0u64, 0u64);
        loop {
            while submitted < batches && submitted - completed < groups as u64 {
                let first = (submitted as usize % groups) * per_group;
                refill(hdr, status, first, per_group, stride);
                sector += per_group as u64 * PER;
                if publish(self.ring, &mut self.avail_idx, per_group as u16) {
                    self.set(QUEUE_NOTIFY, 0);
                }
                submitted += 1;
            }
            if completed == submitted {
                break;
            }
            // The oldest group, in submission order.
            let target = self.last_used.wrapping_add(per_group as u16);
            let done = |d: &Self| d.used_idx().wrapping_sub(d.last_used) >= per_group as u16;
            interrupt_at(self.ring, target, polled);
            if polled {
                while !done(self) {
                    core::hint::spin_loop();
                }
            } else {
                let irqs = irq::count();
                irq::wait_until(|| done(self));
                if irq::count() != irqs {
                    let isr = self.reg(INT_STATUS);
                    self.set(INT_ACK, isr);
                }
            }
            fence(Ordering::SeqCst);
            self.last_used = target;
            let first = (completed as usize % groups) * per_group;
            // SAFETY: as above.
            ok &= unsafe { all_zero(status.add(first), per_group) };
            completed += 1;
        }
        (sector * SECTOR, ok)
    }

    /// As [`Dev::seq_reads`], with the two groups on two queues (MQ): group g always goes to
    /// queue g, so the device's two I/O threads serve them side by side while the driver checks
    /// and refills whichever finished. Each queue's ring holds DEPTH / 2 fixed chains; slot
    /// numbering, sectors and DMA placement are those of the single-queue path.
    fn seq_reads_mq<const DEPTH: usize>(&mut self, size: u64) -> (u64, bool) {
        const CHUNK: u64 = 64 << 10;
        const PER: u64 = CHUNK / SECTOR;
        let qsize = usize::from(self.qsize);
        let per_group = DEPTH / 2;
        if DEPTH < 2 || DEPTH > 64 || 3 * per_group > qsize || qsize % per_group != 0 {
            return (0, false);
        }
        let Some((r1, a1, u1)) = &mut self.q1 else {
            return (0, false);
        };
        let s = slots();
        let stride = DEPTH as u64 * PER;
        // Queue g: ring, next available index, last used index seen. Raw pointers to the
        // rings, so that the device's registers stay reachable through `self`.
        let mut q: [(*mut Ring, u16, u16); 2] = [
            (core::ptr::addr_of_mut!(*self.ring), self.avail_idx, self.last_used),
            (core::ptr::addr_of_mut!(**r1), *a1, *u1),
        ];
        for (g, &mut (ring, avail, _)) in q.iter_mut().enumerate() {
            // SAFETY: the rings are this device's statics; nothing else uses them meanwhile.
            let ring = unsafe { &mut *ring };
            for j in 0..per_group {
                bench_chain(ring, 3 * j as u16, g * per_group + j, stride);
            }
            let skew = usize::from(avail) % per_group;
            for k in 0..qsize {
                ring.avail.ring[k] = 3 * ((k + per_group - skew) % per_group) as u16;
            }
        }
        let batches = size / (CHUNK * per_group as u64);
        let hdr = core::ptr::addr_of_mut!(s.hdr) as *mut [u64; 2];
        let status = core::ptr::addr_of_mut!(s.status) as *mut u8;
        let mut sector = 0;
        let mut ok = true;
        let (mut submitted, mut completed) = (0u64, 0u64);
        loop {
            while submitted < batches && submitted - completed < 2 {
                let g = submitted as usize % 2;
                let first = g * per_group;
                refill(hdr, status, first, per_group, stride);
                sector += per_group as u64 * PER;
                let (ring, avail, _) = &mut q[g];
                // SAFETY: as above.
                let ring = unsafe { &mut **ring };
                if publish(ring, avail, per_group as u16) {
                    self.set(QUEUE_NOTIFY, g as u32);
                }
                submitted += 1;
            }
            if completed == submitted {
                break;
            }
            let g = completed as usize % 2;
            let (ring, _, last) = &mut q[g];
            // SAFETY: as above.
            let ring = unsafe { &mut **ring };
            let target = last.wrapping_add(per_group as u16);
            interrupt_at(ring, target, false);
            let used = core::ptr::addr_of!(ring.used.idx);
            let last_seen = *last;
            let irqs = irq::count();
            // SAFETY: the device writes the used ring; read it volatile.
            irq::wait_until(|| unsafe { core::ptr::read_volatile(used) }.wrapping_sub(last_seen) >= per_group as u16);
            if irq::count() != irqs {
                let isr = self.reg(INT_STATUS);
                self.set(INT_ACK, isr);
            }
            fence(Ordering::SeqCst);
            *last = target;
            // SAFETY: as above.
            ok &= unsafe { all_zero(status.add(g * per_group), per_group) };
            completed += 1;
        }
        let [(_, a0, u0), (_, a1, u1)] = q;
        self.avail_idx = a0;
        self.last_used = u0;
        if let Some((_, a, u)) = &mut self.q1 {
            (*a, *u) = (a1, u1);
        }
        (sector * SECTOR, ok)
    }

    /// One request: header, data segments (device-writable when `din`), status.
    fn request(&mut self, ty: u32, sector: u64, data: &[Seg], din: bool) -> u8 {
        self.queue_request(0, ty, sector, data, din);
        self.kick_and_wait(1);
        slots().status[0]
    }

    fn queue_request(&mut self, slot: usize, ty: u32, sector: u64, data: &[Seg], din: bool) {
        let s = slots();
        s.hdr[slot] = [u64::from(ty), sector];
        s.status[slot] = S_UNSET;
        let mut parts = [(0u64, 0u32, false); 132];
        parts[0] = (core::ptr::addr_of!(s.hdr[slot]) as u64, 16, false);
        let mut n = 1;
        for d in data.iter().take(128) {
            parts[n] = (d.addr, d.len, din);
            n += 1;
        }
        parts[n] = (core::ptr::addr_of!(s.status[slot]) as u64, 1, true);
        self.submit(&parts[..=n]);
    }

    fn read(&mut self, off: u64, len: u32) -> u8 {
        self.request(
            T_IN,
            off / SECTOR,
            &[Seg {
                addr: dma_addr(),
                len,
            }],
            true,
        )
    }

    fn write(&mut self, off: u64, len: u32) -> u8 {
        self.request(
            T_OUT,
            off / SECTOR,
            &[Seg {
                addr: dma_addr(),
                len,
            }],
            false,
        )
    }

    /// DISCARD or WRITE_ZEROES of one range.
    fn range_op(&mut self, ty: u32, off: u64, len: u64, flags: u32) -> u8 {
        let s = slots();
        s.seg[0] = [off / SECTOR, (len / SECTOR) | (u64::from(flags) << 32)];
        let seg = Seg {
            addr: core::ptr::addr_of!(s.seg[0]) as u64,
            len: 16,
        };
        self.request(ty, 0, &[seg], false)
    }
}

/// Writes the guest makes in read-write mode, in order: (offset, length, seed); seed 0 is
/// WRITE_ZEROES and `u64::MAX` is DISCARD. Offsets are given for a disk of `size` bytes; the host
/// test replays the same list (vmm/tests/common).
pub fn writes(size: u64) -> [(u64, u64, u64); 20] {
    let mut w = [(0, 0, 0); 20];
    w[0] = (1 << 20, 192 << 10, 2); // the multi-segment write
    w[1] = (0, 4096, 2);
    w[2] = (size - 4096, 4096, 2);
    for k in 1..16u64 {
        w[2 + k as usize] = ((size / 16 * k) & !0xffff, 64 << 10, 2);
    }
    w[18] = (3 << 19, 128 << 10, 0);
    w[19] = (7 << 18, 256 << 10, u64::MAX);
    w
}

fn mib_per_s(bytes: u64, cycles: u64, hz: Option<u64>) -> u64 {
    match hz {
        Some(hz) if cycles > 0 => {
            (u128::from(bytes) * u128::from(hz) / u128::from(cycles) / (1 << 20)) as u64
        }
        _ => 0,
    }
}

pub fn test_disk(index: usize, base: u64, gsi: u32, cmd: &str, hz: Option<u64>, t: &mut Tally) {
    if index >= MAX_DISKS {
        println!("test-guest: disk{} ignored (at most {})", index, MAX_DISKS);
        return;
    }
    let mut kbuf = [0u8; 16];
    let key = |name: &str, k: &mut [u8; 16]| -> usize {
        let b = name.as_bytes();
        k[..b.len()].copy_from_slice(b);
        k[b.len()] = b'0' + index as u8;
        b.len() + 1
    };
    let mode = {
        let n = key("tg.mode", &mut kbuf);
        param(cmd, core::str::from_utf8(&kbuf[..n]).unwrap_or("")).unwrap_or("rw")
    };
    let want_id = {
        let n = key("tg.id", &mut kbuf);
        param(cmd, core::str::from_utf8(&kbuf[..n]).unwrap_or(""))
    };
    let poll = param(cmd, "tg.poll") == Some("1");
    println!(
        "test-guest: disk{} at {:#x} gsi {} mode {}",
        index, base, gsi, mode
    );

    // SAFETY: each disk index gets its own ring; taken once.
    let ring = unsafe { &mut *core::ptr::addr_of_mut!(RINGS[index]) };
    let mut d = Dev {
        base,
        ring,
        qsize: QSIZE as u16,
        avail_idx: 0,
        last_used: 0,
        next_desc: 0,
        features: 0,
        poll,
        q1: None,
    };

    let ident = d.reg(MAGIC) == 0x7472_6976 && d.reg(VERSION) == 2 && d.reg(DEVICE_ID) == 2;
    t.check("virtio-mmio: magic, version 2, block device", ident);
    if !ident {
        return;
    }
    // Reset, ACKNOWLEDGE, DRIVER.
    d.set(STATUS, 0);
    d.set(STATUS, 1);
    d.set(STATUS, 3);
    d.set(DEV_FEATURES_SEL, 0);
    let lo = u64::from(d.reg(DEV_FEATURES));
    d.set(DEV_FEATURES_SEL, 1);
    let offered = lo | (u64::from(d.reg(DEV_FEATURES)) << 32);
    println!("test-guest: disk{} features {:#x}", index, offered);
    let wanted = F_VERSION_1
        | F_RO
        | F_BLK_SIZE
        | F_SEG_MAX
        | F_FLUSH
        | F_DISCARD
        | F_WRITE_ZEROES
        | F_EVENT_IDX
        | F_MQ;
    let all =
        F_VERSION_1 | F_BLK_SIZE | F_SEG_MAX | F_FLUSH | F_DISCARD | F_WRITE_ZEROES | F_EVENT_IDX;
    t.check(
        "features: VERSION_1 BLK_SIZE SEG_MAX FLUSH DISCARD WRITE_ZEROES EVENT_IDX offered",
        offered & all == all,
    );
    d.features = offered & wanted;
    d.set(DRV_FEATURES_SEL, 0);
    d.set(DRV_FEATURES, d.features as u32);
    d.set(DRV_FEATURES_SEL, 1);
    d.set(DRV_FEATURES, (d.features >> 32) as u32);
    d.set(STATUS, 3 | 8);
    t.check("features: FEATURES_OK accepted", d.reg(STATUS) & 8 != 0);

    d.set(QUEUE_SEL, 0);
    let max = d.reg(QUEUE_NUM_MAX);
    t.check("queue: QueueNumMax >= 256", max as usize >= QSIZE);
    d.setup_queue(0, core::ptr::addr_of!(*d.ring) as u64);
    let queues = if d.features & F_MQ != 0 { d.cfg32(32) >> 16 } else { 1 };
    if queues >= 2 {
        // The second queue is made ready in every mode; only the benchmark drives it.
        // SAFETY: each disk index gets its own ring; taken once.
        let r1 = unsafe { &mut *core::ptr::addr_of_mut!(RINGS1[index]) };
        d.set(QUEUE_SEL, 1);
        d.setup_queue(1, core::ptr::addr_of!(*r1) as u64);
        d.q1 = Some((r1, 0, 0));
        d.set(QUEUE_SEL, queues);
        t.check(
            "queue: MQ offers num_queues queues and no more",
            d.reg(QUEUE_NUM_MAX) == 0,
        );
    }
    irq::route(gsi);
    d.set(STATUS, 3 | 8 | 4);
    t.check(
        "status: DRIVER_OK without DEVICE_NEEDS_RESET",
        d.reg(STATUS) & 0x40 == 0,
    );

    let cap = u64::from(d.cfg32(0)) | (u64::from(d.cfg32(4)) << 32);
    let size = cap * SECTOR;
    let seg_max = d.cfg32(12);
    let blk_size = d.cfg32(20);
    println!(
        "test-guest: disk{} capacity {} sectors ({} MiB), seg_max {}, blk_size {}",
        index,
        cap,
        size >> 20,
        seg_max,
        blk_size
    );
    t.check(
        "config: blk_size 512 and seg_max >= 3",
        blk_size == 512 && seg_max >= 3,
    );
    let ro = d.features & F_RO != 0;
    t.check(
        "config: RO feature matches the disk's mode",
        mode == "bench" || ro == (mode == "ro"),
    );
    // tg.mode=bench: the read benchmark alone, for benches/guest-read.sh.
    if mode == "bench" {
        let ok = bench(&mut d, index, size, hz);
        t.check("bench: every request completed OK", ok);
        return;
    }

    // GET_ID.
    {
        let idbuf = &mut slots().id;
        idbuf.fill(0xff);
        let st = d.request(
            T_GET_ID,
            0,
            &[Seg {
                addr: idbuf.as_ptr() as u64,
                len: 20,
            }],
            true,
        );
        let id = &slots().id[..20];
        let end = id.iter().position(|&b| b == 0).unwrap_or(20);
        let got = core::str::from_utf8(&id[..end]).unwrap_or("?");
        println!("test-guest: disk{} id {:?}", index, got);
        t.check(
            "GET_ID returns the serial",
            st == S_OK && want_id.is_none_or(|w| w == got),
        );
    }
    let irqs_before = irq::count();

    // Whole-disk sequential read, verified, 8 x 64 KiB in flight.
    let chunk: u64 = 64 << 10;
    let batch: u64 = 16;
    let mut ok = true;
    let mut off = 0;
    let start = rdtsc();
    while off < size {
        let n = ((size - off) / chunk).clamp(1, batch);
        for i in 0..n {
            let len = chunk.min(size - off - i * chunk) as u32;
            let seg = Seg {
                addr: dma_addr() + i * chunk,
                len,
            };
            d.queue_request(i as usize, T_IN, (off + i * chunk) / SECTOR, &[seg], true);
        }
        d.kick_and_wait(n as u16);
        for i in 0..n {
            let len = chunk.min(size - off - i * chunk) as usize;
            let b = &dma()[(i * chunk) as usize..(i * chunk) as usize + len];
            ok &= slots().status[i as usize] == S_OK && verify(b, 1, off + i * chunk);
        }
        off += n * chunk;
    }
    let cycles = rdtsc() - start;
    t.check(
        "read: whole disk, 64 KiB x 16 in flight, every 4 KiB block verified",
        ok,
    );
    println!(
        "test-guest: disk{} verified sequential read {} MiB/s",
        index,
        mib_per_s(size, cycles, hz)
    );
    // MQ: the first MiB again, split over both queues; each slot's DMA area then holds the
    // last block it read, which must be the disk's.
    if d.q1.is_some() && size >= 1 << 20 && !poll {
        const CHUNK: usize = 64 << 10;
        let (bytes, mut good) = d.seq_reads_mq::<8>(1 << 20);
        good &= bytes == 1 << 20;
        for i in 0..8 {
            let off = slots().hdr[i][1] * SECTOR;
            good &= verify(&dma()[i * CHUNK..(i + 1) * CHUNK], 1, off);
        }
        t.check("MQ: reads split over two queues return the disk's data", good);
    }
    // Interrupts raised while the guest was busy stay pending in the local APIC; `sti; hlt`
    // takes them (the host test kills the VM if none ever comes).
    if !poll {
        irq::wait_until(|| irq::count() > irqs_before);
    }
    t.check(
        "interrupts: completions arrived through the IOAPIC",
        poll || irq::count() > irqs_before,
    );

    if param(cmd, "tg.bench") == Some("1") {
        let ok = bench(&mut d, index, size, hz);
        t.check("bench: every request completed OK", ok);
    }

    // Malformed and out-of-range requests.
    t.check(
        "read past the end -> IOERR",
        d.read(size - 512, 1024) == S_IOERR,
    );
    t.check(
        "read at sector beyond capacity -> IOERR",
        d.request(
            T_IN,
            u64::MAX / 2,
            &[Seg {
                addr: dma_addr(),
                len: 512,
            }],
            true,
        ) == S_IOERR,
    );
    t.check(
        "read of 100 bytes (not a sector multiple) -> IOERR",
        d.read(0, 100) == S_IOERR,
    );
    t.check(
        "unknown request type -> UNSUPP",
        d.request(0xff, 0, &[], true) == S_UNSUPP,
    );
    t.check(
        "data outside guest memory -> IOERR",
        d.request(
            T_IN,
            0,
            &[Seg {
                addr: 1 << 46,
                len: 512,
            }],
            true,
        ) == S_IOERR,
    );
    {
        // A chain with no device-writable descriptor has nowhere for a status: the device
        // must still return it (used) and not hang or fault.
        let s = slots();
        s.hdr[0] = [u64::from(T_IN), 0];
        d.submit(&[(core::ptr::addr_of!(s.hdr[0]) as u64, 16, false)]);
        d.kick_and_wait(1);
        t.check("chain without a status descriptor is returned", true);
    }
    t.check("FLUSH -> OK", d.request(T_FLUSH, 0, &[], true) == S_OK);

    if ro {
        fill(&mut dma()[..4096], 2, 0);
        t.check("read-only: OUT -> IOERR", d.write(0, 4096) == S_IOERR);
        t.check(
            "read-only: WRITE_ZEROES -> IOERR",
            d.range_op(T_WRITE_ZEROES, 0, 4096, 0) == S_IOERR,
        );
        t.check(
            "read-only: DISCARD -> IOERR",
            d.range_op(T_DISCARD, 0, 4096, 0) == S_IOERR,
        );
        let st = d.read(0, 4096);
        t.check(
            "read-only: data unchanged",
            st == S_OK && verify(&dma()[..4096], 1, 0),
        );
        return;
    }
    if size < 16 << 20 {
        println!(
            "test-guest: disk{} smaller than 16 MiB: write tests skipped",
            index
        );
        t.check("disk large enough for write tests", false);
        return;
    }

    let w = writes(size);
    // The multi-segment write: 4 KiB + 60 KiB + 128 KiB from three separate buffers.
    let (o, l, _) = w[0];
    fill(&mut dma()[..l as usize], 2, o);
    let segs = [
        Seg {
            addr: dma_addr(),
            len: 4096,
        },
        Seg {
            addr: dma_addr() + 4096,
            len: 60 << 10,
        },
        Seg {
            addr: dma_addr() + (64 << 10),
            len: 128 << 10,
        },
    ];
    t.check(
        "write: 3-segment OUT chain",
        d.request(T_OUT, o / SECTOR, &segs, false) == S_OK,
    );
    let mut wok = true;
    for &(o, l, seed) in &w[1..18] {
        fill(&mut dma()[..l as usize], seed, o);
        wok &= d.write(o, l as u32) == S_OK;
    }
    t.check(
        "write: first sector, last sector and 15 places across the disk",
        wok,
    );
    let (o, l, _) = w[18];
    t.check(
        "WRITE_ZEROES -> OK",
        d.range_op(T_WRITE_ZEROES, o, l, 0) == S_OK,
    );
    let (o, l, _) = w[19];
    t.check("DISCARD -> OK", d.range_op(T_DISCARD, o, l, 0) == S_OK);
    t.check(
        "DISCARD with the unmap flag -> UNSUPP",
        d.range_op(T_DISCARD, o, 4096, 1) == S_UNSUPP,
    );
    t.check(
        "WRITE_ZEROES past the end -> IOERR",
        d.range_op(T_WRITE_ZEROES, size - 4096, 8192, 0) == S_IOERR,
    );
    t.check(
        "FLUSH after writes -> OK",
        d.request(T_FLUSH, 0, &[], true) == S_OK,
    );

    // Read everything back; the multi-segment read uses three differently sized IN segments.
    dma().fill(0xaa);
    let (o, l, _) = w[0];
    let rsegs = [
        Seg {
            addr: dma_addr(),
            len: 64 << 10,
        },
        Seg {
            addr: dma_addr() + (64 << 10),
            len: 512,
        },
        Seg {
            addr: dma_addr() + (64 << 10) + 512,
            len: (128 << 10) - 512,
        },
    ];
    let st = d.request(T_IN, o / SECTOR, &rsegs, true);
    t.check(
        "read: 3-segment IN chain returns what was written",
        st == S_OK && verify(&dma()[..l as usize], 2, o),
    );
    let mut rok = true;
    for &(o, l, seed) in &w[1..19] {
        dma()[..l as usize].fill(0xaa);
        rok &= d.read(o, l as u32) == S_OK && verify(&dma()[..l as usize], seed, o);
    }
    t.check("read back: writes and write-zeroes across the disk", rok);
    // A neighbour of a written range still holds the original data.
    let (o, l, _) = w[0];
    rok = d.read(o + l, 4096) == S_OK && verify(&dma()[..4096], 1, o + l);
    t.check("read back: data next to writes untouched", rok);
}

/// Asks the device (EVENT_IDX's used_event) to interrupt once the used index reaches `target`;
/// `polled`, never: the event then sits half the index space ahead, which the device does not
/// cross.
fn interrupt_at(ring: &mut Ring, target: u16, polled: bool) {
    let event = target.wrapping_add(if polled { 0x8000 } else { 0xffff });
    // SAFETY: the driver owns avail.used_event.
    unsafe { core::ptr::write_volatile(&mut ring.avail.used_event, event) };
    fence(Ordering::SeqCst);
}

/// Readies benchmark slots `first..first + n` for their next block: each header's sector moves
/// on by `stride`, each status byte is reset.
fn refill(hdr: *mut [u64; 2], status: *mut u8, first: usize, n: usize, stride: u64) {
    for i in first..first + n {
        // SAFETY: callers keep first + n <= 64, the length of `hdr` and of the status array.
        unsafe {
            let h = &mut (*hdr.add(i))[1];
            *h = h.wrapping_add(stride);
        }
    }
    // SAFETY: as above.
    unsafe { core::ptr::write_bytes(status.add(first), S_UNSET, n) };
    fence(Ordering::SeqCst);
}

/// Makes `n` more chains available in `ring` (whose ring slots already name them) and says
/// whether the device asked to be notified of them (EVENT_IDX's vring_need_event).
fn publish(ring: &mut Ring, avail: &mut u16, n: u16) -> bool {
    let old = *avail;
    *avail = old.wrapping_add(n);
    // SAFETY: the driver owns avail.idx; the device owns used.avail_event.
    let event = unsafe {
        core::ptr::write_volatile(&mut ring.avail.idx, *avail);
        fence(Ordering::SeqCst);
        core::ptr::read_volatile(&ring.used.avail_event)
    };
    avail.wrapping_sub(event).wrapping_sub(1) < avail.wrapping_sub(old)
}

/// `n` reads of 4 KiB at pseudo-random 4 KiB-aligned offsets of a `size`-byte disk, one at a
/// time; returns whether each completed OK.
fn random_reads(d: &mut Dev, size: u64, n: u64) -> bool {
    let mut x: u64 = 0x1234_5678_9abc_def1;
    let mut ok = true;
    for _ in 0..n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let off = (x % (size / 4096)) * 4096;
        ok &= d.read(off, 4096) == S_OK;
    }
    ok
}

/// Bytes of the DMA buffer the benchmark's slots read into, slot i at `(i * 64 KiB) % this`:
/// eight 64 KiB buffers, what `img bench` copies into on the host (one per worker, eight
/// workers), so that both sides' copies land in the same amount of cache.
const BENCH_DMA: u64 = 512 << 10;

/// The fixed three-descriptor chain of benchmark slot `slot` at descriptor `d` of `ring`: its
/// header (set to read one sector stride before its first block, so that the first refill's
/// add lands on it), its 64 KiB of the DMA buffer, its status byte.
fn bench_chain(ring: &mut Ring, d: u16, slot: usize, stride: u64) {
    const CHUNK: u64 = 64 << 10;
    let s = slots();
    s.hdr[slot] = [u64::from(T_IN), (slot as u64 * (CHUNK / SECTOR)).wrapping_sub(stride)];
    let data = dma_addr() + (slot as u64 * CHUNK) % BENCH_DMA;
    let parts = [
        (core::ptr::addr_of!(s.hdr[slot]) as u64, 16, 1),
        (data, CHUNK as u32, 3),
        (core::ptr::addr_of!(s.status[slot]) as u64, 1, 2),
    ];
    for (k, (addr, len, flags)) in parts.into_iter().enumerate() {
        let i = usize::from(d) + k;
        ring.desc[i] = Desc {
            addr,
            len,
            flags,
            next: if k < 2 { d + k as u16 + 1 } else { 0 },
        };
    }
}

/// Sequential 64 KiB reads at several queue depths and random 4 KiB reads, printed in MiB/s;
/// returns whether every request completed OK.
fn bench(d: &mut Dev, index: usize, size: u64, hz: Option<u64>) -> bool {
    let mut all_ok = true;
    // Arguments are evaluated in order: the start time is read before the run, the end time
    // inside.
    let mut report = |queues: &str, depth: usize, start: u64, (bytes, ok): (u64, bool)| {
        all_ok &= ok;
        println!(
            "test-guest: disk{} bench: sequential 64 KiB reads, {}queue depth {}: {} MiB/s{}",
            index,
            queues,
            depth,
            mib_per_s(bytes, rdtsc() - start, hz),
            if ok { "" } else { " (a request failed)" }
        );
    };
    report("", 1, rdtsc(), d.seq_reads::<1>(size, false));
    report("", 8, rdtsc(), d.seq_reads::<8>(size, false));
    report("", 32, rdtsc(), d.seq_reads::<32>(size, false));
    report("", 64, rdtsc(), d.seq_reads::<64>(size, false));
    // The same, polled from ring 3: see `user.rs` for why.
    for depth in [1, 8, 32, 64] {
        let start = rdtsc();
        let r = crate::user::run(|| match depth {
            1 => d.seq_reads::<1>(size, true),
            8 => d.seq_reads::<8>(size, true),
            32 => d.seq_reads::<32>(size, true),
            _ => d.seq_reads::<64>(size, true),
        });
        report("polled from ring 3, ", depth, start, r);
    }
    if d.q1.is_some() {
        report("2 queues, ", 8, rdtsc(), d.seq_reads_mq::<8>(size));
        report("2 queues, ", 32, rdtsc(), d.seq_reads_mq::<32>(size));
        report("2 queues, ", 64, rdtsc(), d.seq_reads_mq::<64>(size));
    }
    // Random 4 KiB reads, then the same polled from ring 3.
    for polled in [false, true] {
        let n = 1024u64;
        let start = rdtsc();
        let ok = if polled {
            let was = core::mem::replace(&mut d.poll, true);
            let ok = crate::user::run(|| random_reads(d, size, n));
            d.poll = was;
            ok
        } else {
            random_reads(d, size, n)
        };
        all_ok &= ok;
        let cycles = rdtsc() - start;
        let iops = match hz {
            Some(hz) if cycles > 0 => n * hz / cycles,
            _ => 0,
        };
        println!(
            "test-guest: disk{} bench: random 4 KiB reads, {}queue depth 1: {} MiB/s, {} IOPS",
            index,
            if polled { "polled from ring 3, " } else { "" },
            mib_per_s(n * 4096, cycles, hz),
            iops
        );
    }
    all_ok
}
