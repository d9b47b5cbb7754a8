//! The block device's I/O thread: waits on the queue's ioeventfd, serves every available chain,
//! and raises the irqfd when the driver asked for it (EVENT_IDX aware via virtio-queue).

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::timerfd::TimerFd;

use super::block::{handle_chain_counted, Backend, BlockConfig, DiskStats};
use super::throttle::Throttle;
use crate::seccomp::{self, Filters, Kind};

/// The device's interrupt: InterruptStatus bits and the irqfd behind them.
#[derive(Debug)]
pub struct Interrupt {
    /// Bit 0: used buffer notification; bit 1: configuration change.
    pub status: AtomicU32,
    /// Registered with KVM as an irqfd for the device's GSI.
    pub irqfd: EventFd,
}

impl Interrupt {
    /// Signals a used-buffer notification.
    pub fn signal_used(&self) {
        self.status.fetch_or(1, Ordering::SeqCst);
        if let Err(e) = self.irqfd.write(1) {
            crate::report!("vmm: virtio-blk: irqfd write failed: {e}");
        }
    }
}

/// What the device asks of its I/O thread.
enum Order {
    /// Serve this queue (the driver set DRIVER_OK).
    Serve(GuestMemoryMmap, Queue),
    /// Drop the queue after the chain in progress and flush the disk (device reset).
    Idle,
    /// As `Idle`, then end the thread (the VMM is stopping).
    Exit,
}

/// The one-order mailbox between the device and its I/O thread: the device posts an order,
/// writes `wake`, and waits until the thread has carried it out.
struct Mailbox {
    slot: Mutex<Slot>,
    done: Condvar,
    wake: EventFd,
}

#[derive(Default)]
struct Slot {
    order: Option<Order>,
    /// Whether the VM is paused: the thread then serves nothing until this is cleared.
    paused: bool,
    posted: u64,
    carried_out: u64,
}

impl Mailbox {
    /// Applies `change` to the slot, wakes the thread, and waits until it has carried the
    /// change out, as long as `alive` holds and `deadline` (if any) has not passed. Returns
    /// whether it was carried out.
    fn post(
        &self,
        change: impl FnOnce(&mut Slot),
        alive: impl Fn() -> bool,
        deadline: Option<Instant>,
    ) -> bool {
        let mut slot = self.slot.lock().unwrap_or_else(PoisonError::into_inner);
        change(&mut slot);
        slot.posted += 1;
        let ticket = slot.posted;
        if let Err(e) = self.wake.write(1) {
            crate::report!("vmm: virtio-blk: cannot wake the I/O thread: {e}");
            return false;
        }
        while slot.carried_out < ticket {
            if !alive() || deadline.is_some_and(|d| Instant::now() >= d) {
                return false;
            }
            slot = self
                .done
                .wait_timeout(slot, Duration::from_millis(100))
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        true
    }
}

/// Pauses and resumes one I/O thread on the API's behalf (`vm.pause`, `vm.resume`).
#[derive(Clone)]
pub struct IoPause(Arc<Mailbox>);

impl IoPause {
    /// Pausing: the thread finishes its pass, flushes the disk and then serves nothing until
    /// resumed, so the image on disk stays as it is while the VM is paused. Resuming: it
    /// serves what the driver queued meanwhile. Returns whether the thread did so before
    /// `deadline`.
    pub fn set(&self, paused: bool, deadline: Instant) -> bool {
        self.0.post(|s| s.paused = paused, || true, Some(deadline))
    }
}

/// Owns the I/O thread of one queue. The thread is started with the device, before any vCPU
/// runs, and lives until the VMM stops: a driver's DRIVER_OK or reset only hands it a queue or
/// takes it back, so a vCPU never starts threads (nor needs the system calls for it, which its
/// seccomp filter does not allow).
pub struct BlockWorker {
    mailbox: Arc<Mailbox>,
    thread: Option<JoinHandle<Option<()>>>,
}

const NOTIFY: u64 = 1;
const ORDER: u64 = 2;
const TIMER: u64 = 3;

impl BlockWorker {
    /// Starts the I/O thread serving `disk` under the I/O filter; `notify` is the queue's
    /// ioeventfd.
    ///
    /// # Errors
    /// When the eventfd or epoll cannot be created, or the thread cannot start.
    pub fn new(
        disk: Arc<dyn Backend>,
        cfg: BlockConfig,
        interrupt: Arc<Interrupt>,
        notify: EventFd,
        accounting: Accounting,
        filters: &Arc<Filters>,
    ) -> std::io::Result<Self> {
        let mailbox = Arc::new(Mailbox {
            slot: Mutex::new(Slot::default()),
            done: Condvar::new(),
            wake: EventFd::new(EFD_NONBLOCK)?,
        });
        let epoll = Epoll::new()?;
        epoll.ctl(
            ControlOperation::Add,
            notify.as_raw_fd(),
            EpollEvent::new(EventSet::IN, NOTIFY),
        )?;
        epoll.ctl(
            ControlOperation::Add,
            mailbox.wake.as_raw_fd(),
            EpollEvent::new(EventSet::IN, ORDER),
        )?;
        // Fires when a throttled queue may go on.
        let timer = TimerFd::new()?;
        epoll.ctl(
            ControlOperation::Add,
            timer.as_raw_fd(),
            EpollEvent::new(EventSet::IN, TIMER),
        )?;
        let mb = Arc::clone(&mailbox);
        let thread = seccomp::spawn("virtio-blk", filters, Kind::Io, move || {
            let mut t = IoThread {
                disk,
                cfg,
                interrupt,
                running: None,
                paused: false,
                bounce: Vec::new(),
                accounting,
                timer,
                held_since: None,
            };
            t.run(&epoll, &notify, &mb);
        })?;
        Ok(BlockWorker {
            mailbox,
            thread: Some(thread),
        })
    }

    /// Posts `order` and waits until the thread has carried it out (or has ended).
    fn order(&mut self, order: Order) {
        let Some(thread) = &self.thread else {
            return;
        };
        self.mailbox
            .post(|s| s.order = Some(order), || !thread.is_finished(), None);
    }

    /// The handle through which the API pauses and resumes this thread.
    pub fn io_pause(&self) -> IoPause {
        IoPause(Arc::clone(&self.mailbox))
    }

    /// The eventfd that wakes the thread for an order: the vCPU that starts or stops the
    /// device writes to it.
    pub fn order_fd(&self) -> RawFd {
        self.mailbox.wake.as_raw_fd()
    }

    /// Hands `queue` to the thread, which serves what the driver queued already.
    pub fn start(&mut self, mem: GuestMemoryMmap, queue: Queue) {
        self.order(Order::Serve(mem, queue));
    }

    /// Takes the queue back after the chain in progress; the disk is flushed.
    pub fn stop(&mut self) {
        self.order(Order::Idle);
    }

    /// Stops the thread (after the chain in progress, disk flushed) and waits for it.
    pub fn shutdown(&mut self) {
        self.order(Order::Exit);
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                crate::report!("vmm: virtio-blk: I/O thread panicked");
            }
        }
    }
}

impl Drop for BlockWorker {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// The I/O thread's state.
struct IoThread {
    disk: Arc<dyn Backend>,
    cfg: BlockConfig,
    interrupt: Arc<Interrupt>,
    running: Option<(GuestMemoryMmap, Queue)>,
    /// The VM is paused: nothing is served.
    paused: bool,
    bounce: Vec<u8>,
    /// The disk's counters and throttling buckets, shared with its other queues.
    accounting: Accounting,
    /// Armed while the throttle holds the queue back.
    timer: TimerFd,
    /// Since when the queue has been held back.
    held_since: Option<Instant>,
}

impl IoThread {
    fn run(&mut self, epoll: &Epoll, notify: &EventFd, mb: &Mailbox) {
        let mut events = [EpollEvent::default(); 4];
        loop {
            let n = match epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    crate::report!("vmm: virtio-blk: epoll failed: {e}");
                    self.idle();
                    return;
                }
            };
            for ev in &events[..n] {
                // While paused, the queue waits: resuming serves it.
                if ev.data() == NOTIFY {
                    let _ = notify.read();
                    if !self.paused {
                        self.process_then_come_back(notify);
                    }
                    continue;
                }
                if ev.data() == TIMER {
                    let _ = self.timer.wait();
                    if !self.paused {
                        self.process_then_come_back(notify);
                    }
                    continue;
                }
                let _ = mb.wake.read();
                // Only what is read here is carried out: a post after it wakes the thread again.
                let (order, paused, ticket) = {
                    let mut slot = mb.slot.lock().unwrap_or_else(PoisonError::into_inner);
                    (slot.order.take(), slot.paused, slot.posted)
                };
                let exit = matches!(order, Some(Order::Exit));
                let mut serve = match order {
                    Some(Order::Serve(mem, queue)) => {
                        self.idle();
                        self.running = Some((mem, queue));
                        true
                    }
                    Some(Order::Idle | Order::Exit) => {
                        self.idle();
                        false
                    }
                    None => false,
                };
                if paused && !self.paused && self.running.is_some() {
                    // What the guest wrote is on disk before the pause is reported done.
                    if let Err(e) = self.disk.flush() {
                        crate::report!("vmm: virtio-blk: flush on pause failed: {e}");
                    }
                }
                serve |= self.paused && !paused;
                self.paused = paused;
                let mut slot = mb.slot.lock().unwrap_or_else(PoisonError::into_inner);
                slot.carried_out = ticket;
                mb.done.notify_all();
                drop(slot);
                if exit {
                    return;
                }
                if serve && !self.paused {
                    // A driver may have queued requests before DRIVER_OK, or while paused.
                    self.process_then_come_back(notify);
                }
            }
        }
    }

    /// Serves a pass and, when it stopped at its limit, notifies itself: the next wait sees
    /// any order posted meanwhile before the pass after.
    fn process_then_come_back(&mut self, notify: &EventFd) {
        if self.process() {
            if let Err(e) = notify.write(1) {
                crate::report!("vmm: virtio-blk: cannot requeue the rest of a pass: {e}");
            }
        }
    }

    /// Drops the queue, if any, and flushes what it wrote.
    fn idle(&mut self) {
        if self.running.take().is_some() {
            if let Err(e) = self.disk.flush() {
                crate::report!("vmm: virtio-blk: flush on stop failed: {e}");
            }
        }
    }

    /// Serves one pass; true when requests may be left for another (after the orders).
    fn process(&mut self) -> bool {
        let Some((mem, queue)) = &mut self.running else {
            return false;
        };
        let interrupt = &self.interrupt;
        let served = serve_queue(
            queue,
            mem,
            self.disk.as_ref(),
            &self.cfg,
            &mut self.bounce,
            &mut || interrupt.signal_used(),
            &self.accounting,
            PassLimit::DEFAULT,
        );
        if let Some(d) = served.held {
            // Back when the buckets have drained enough; the driver's notifications stay
            // off meanwhile.
            if let Err(e) = self.timer.reset(d, None) {
                crate::report!("vmm: virtio-blk: cannot arm the throttling timer: {e}");
            }
            self.held_since.get_or_insert_with(Instant::now);
        } else if let (Some(t0), Some(t)) = (self.held_since.take(), &self.accounting.throttle) {
            t.held(t0.elapsed());
        }
        // Keep the bounce buffer from pinning a large allocation forever.
        if self.bounce.capacity() > 4 << 20 {
            self.bounce = Vec::new();
        }
        served.more
    }
}

/// What a disk's queues share: its request counters and its throttling buckets.
#[derive(Clone, Debug, Default)]
pub struct Accounting {
    /// Completed reads and writes.
    pub stats: Arc<DiskStats>,
    /// The disk's limits, if any.
    pub throttle: Option<Arc<Throttle>>,
}

/// What a pass over the queue did.
#[derive(Debug, Default)]
pub struct Served {
    /// Whether any descriptor was used.
    pub used: bool,
    /// Set when the throttle stopped the pass: how long until the next request may start.
    pub held: Option<Duration>,
    /// The pass stopped at its limit with requests perhaps left: serve again, after looking
    /// at the thread's orders.
    pub more: bool,
}

/// How much one pass over a queue may serve before the I/O thread looks at its orders (stop,
/// reset, exit) again: a guest that keeps its ring full cannot hold off a shutdown for longer
/// than this takes.
#[derive(Debug, Clone, Copy)]
pub struct PassLimit {
    /// Requests.
    pub requests: usize,
    /// Bytes of data.
    pub bytes: u64,
}

impl PassLimit {
    /// 256 requests or 16 MiB, whichever comes first (and always at least one request).
    pub const DEFAULT: PassLimit = PassLimit {
        requests: 256,
        bytes: 16 << 20,
    };
}

/// Header and status bytes of a request chain, not counted as data by the throttle.
const REQUEST_OVERHEAD: u64 = 17;

/// Serves every available chain (re-checking after re-enabling notifications, as EVENT_IDX
/// requires), and calls `signal` as soon as a completion crosses the index the driver asked to
/// be interrupted at, so that a driver waiting for its first requests need not wait for the
/// ones it queued behind them. With a `throttle`, a chain starts only when its buckets allow,
/// else the pass stops and says for how long (notifications left off). A broken ring stops the
/// pass, and so does `limit` ([`Served::more`]).
#[allow(clippy::too_many_arguments)]
pub fn serve_queue(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    disk: &dyn Backend,
    cfg: &BlockConfig,
    bounce: &mut Vec<u8>,
    signal: &mut dyn FnMut(),
    accounting: &Accounting,
    limit: PassLimit,
) -> Served {
    let throttle = accounting.throttle.as_deref();
    let mut served = Served::default();
    let (mut requests, mut data) = (0usize, 0u64);
    let mut notify = |queue: &mut Queue| match queue.needs_notification(mem) {
        Ok(true) => signal(),
        Ok(false) => {}
        Err(e) => crate::report!("vmm: virtio-blk: queue error: {e}"),
    };
    // Bounded: a guest that keeps adding requests cannot starve the stop event forever.
    for _ in 0..1024 {
        if let Err(e) = queue.disable_notification(mem) {
            crate::report!("vmm: virtio-blk: queue error: {e}");
            break;
        }
        loop {
            if let Some(wait) = throttle.and_then(Throttle::wait) {
                served.held = Some(wait);
                return served;
            }
            if requests >= limit.requests.max(1) || data >= limit.bytes {
                // Notifications stay off: the thread comes back without one.
                served.more = true;
                return served;
            }
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                break;
            };
            let head = chain.head_index();
            let mut bytes = 0u64;
            let descs = chain.map(|d| {
                bytes = bytes.saturating_add(u64::from(d.len()));
                (d.addr().0, d.len(), d.is_write_only())
            });
            let len = handle_chain_counted(mem, descs, disk, cfg, bounce, Some(&accounting.stats));
            requests += 1;
            data = data.saturating_add(bytes);
            if let Some(t) = throttle {
                t.charge(bytes.saturating_sub(REQUEST_OVERHEAD));
            }
            if let Err(e) = queue.add_used(mem, head, len) {
                crate::report!("vmm: virtio-blk: cannot return descriptor {head}: {e}");
                return served;
            }
            served.used = true;
            notify(queue);
        }
        match queue.enable_notification(mem) {
            Ok(true) => continue,
            Ok(false) => break,
            Err(e) => {
                crate::report!("vmm: virtio-blk: queue error: {e}");
                break;
            }
        }
    }
    served
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::block::handle_chain;
    use crate::virtio::block::tests::{cfg, Logged, MemDisk};
    use proptest::prelude::*;
    use std::sync::Mutex;
    use vm_memory::{Bytes, GuestAddress};

    const MEM: usize = 64 << 10;

    fn addr() -> impl Strategy<Value = u64> {
        prop_oneof![
            4 => 0u64..MEM as u64,
            1 => (MEM as u64 - 64)..(MEM as u64 + 64),
            1 => any::<u64>(),
        ]
    }

    fn len() -> impl Strategy<Value = u32> {
        prop_oneof![4 => 0u32..2048, 1 => any::<u32>(), 1 => Just(16u32), 1 => Just(1u32)]
    }

    /// A 16-entry ring at `base` (table, avail +0x100, used +0x200) whose first `n` chains
    /// read sector `i` into `base + 0x1000 + i * 0x400` (status after the data).
    fn ring_of_reads(mem: &GuestMemoryMmap, base32: u32, n: u16) -> Queue {
        let base = u64::from(base32);
        for i in 0..n {
            let hdr = base + 0x800 + u64::from(i) * 16;
            mem.write_obj(0u32, GuestAddress(hdr)).unwrap(); // VIRTIO_BLK_T_IN
            mem.write_obj(u64::from(i), GuestAddress(hdr + 8)).unwrap();
            let data = base + 0x1000 + u64::from(i) * 0x400;
            let d = base + u64::from(i) * 48;
            // header -> data (device writes) -> status (device writes).
            for (k, (addr, len, flags)) in
                (0u16..).zip([(hdr, 16u32, 1u16), (data, 512, 3), (data + 512, 1, 2)])
            {
                let e = d + u64::from(k) * 16;
                mem.write_obj(addr, GuestAddress(e)).unwrap();
                mem.write_obj(len, GuestAddress(e + 8)).unwrap();
                mem.write_obj(flags, GuestAddress(e + 12)).unwrap();
                mem.write_obj(i * 3 + k + 1, GuestAddress(e + 14)).unwrap();
            }
            mem.write_obj(i * 3, GuestAddress(base + 0x104 + u64::from(i) * 2))
                .unwrap();
        }
        mem.write_obj(n, GuestAddress(base + 0x102)).unwrap();
        let mut q = Queue::new(16).unwrap();
        q.set_size(16);
        q.set_desc_table_address(Some(base32), Some(0));
        q.set_avail_ring_address(Some(base32 + 0x100), Some(0));
        q.set_used_ring_address(Some(base32 + 0x200), Some(0));
        q.set_ready(true);
        assert!(q.is_valid(mem));
        q
    }

    fn used_idx(mem: &GuestMemoryMmap, base: u64) -> u16 {
        mem.read_obj(GuestAddress(base + 0x202)).unwrap()
    }

    /// Waits up to two seconds for the ring at `base` to have used `n` chains.
    fn wait_used(mem: &GuestMemoryMmap, base: u64, n: u16) -> bool {
        let end = std::time::Instant::now() + Duration::from_secs(2);
        while std::time::Instant::now() < end {
            if used_idx(mem, base) == n {
                return true;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        false
    }

    /// An I/O thread over a 64 KiB disk whose sector i holds i + 1, with its queue's
    /// notifier, its interrupt's eventfd and its counters.
    struct Rig {
        disk: Arc<Logged>,
        notify: EventFd,
        irq: EventFd,
        acc: Accounting,
        w: BlockWorker,
    }

    fn rig() -> Rig {
        let img: Vec<u8> = (1..=128u8).flat_map(|s| [s; 512]).collect();
        let disk = Arc::new(Logged::new(MemDisk(Mutex::new(img))));
        let notify = EventFd::new(EFD_NONBLOCK).unwrap();
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let interrupt = crate::virtio::mmio::new_interrupt(irq.try_clone().unwrap());
        let backend: Arc<dyn Backend> = disk.clone();
        let acc = Accounting::default();
        let w = BlockWorker::new(
            backend,
            cfg(false),
            interrupt,
            notify.try_clone().unwrap(),
            acc.clone(),
            &Filters::none(),
        )
        .unwrap();
        Rig {
            disk,
            notify,
            irq,
            acc,
            w,
        }
    }

    #[test]
    fn the_io_thread_serves_a_queue_gives_it_back_and_serves_the_next() {
        // The thread lives from the device's creation to shutdown; DRIVER_OK hands it a
        // queue, reset takes it back (flushing), a second DRIVER_OK hands it another.
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let Rig {
            disk,
            notify,
            irq,
            acc,
            mut w,
        } = rig();
        // Requests queued before DRIVER_OK are served when the queue is handed over.
        let qa = ring_of_reads(&mem, 0x0, 2);
        w.start(mem.clone(), qa);
        assert!(wait_used(&mem, 0x0, 2), "used {}", used_idx(&mem, 0x0));
        assert!(irq.read().unwrap() >= 1);
        for (i, want) in [(0u64, 1u8), (1, 2)] {
            let data: [u8; 4] = mem.read_obj(GuestAddress(0x1000 + i * 0x400)).unwrap();
            assert_eq!(data, [want; 4]);
            let status: u8 = mem
                .read_obj(GuestAddress(0x1000 + i * 0x400 + 512))
                .unwrap();
            assert_eq!(status, 0);
        }
        // Reset: the queue is taken back after a flush; a notification then does nothing.
        w.stop();
        assert_eq!(disk.2.load(Ordering::SeqCst), 1);
        mem.write_obj(3u16, GuestAddress(0x102)).unwrap();
        mem.write_obj(0u16, GuestAddress(0x108)).unwrap();
        notify.write(1).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(used_idx(&mem, 0x0), 2);
        // A new queue after the reset.
        let qb = ring_of_reads(&mem, 0x8000, 4);
        mem.write_obj(3u16, GuestAddress(0x8102)).unwrap();
        w.start(mem.clone(), qb);
        assert!(
            wait_used(&mem, 0x8000, 3),
            "used {}",
            used_idx(&mem, 0x8000)
        );
        let data: [u8; 4] = mem.read_obj(GuestAddress(0x9000 + 2 * 0x400)).unwrap();
        assert_eq!(data, [3; 4]);
        // One more on it, by notification; the old ring stays as it was.
        mem.write_obj(4u16, GuestAddress(0x8102)).unwrap();
        notify.write(1).unwrap();
        assert!(
            wait_used(&mem, 0x8000, 4),
            "used {}",
            used_idx(&mem, 0x8000)
        );
        let data: [u8; 4] = mem.read_obj(GuestAddress(0x9000 + 3 * 0x400)).unwrap();
        assert_eq!(data, [4; 4]);
        assert_eq!(used_idx(&mem, 0x0), 2);
        w.shutdown();
        assert!(w.thread.is_none());
        // Six reads of a sector each, over both queues.
        assert_eq!(acc.stats.read_ops.load(Ordering::Relaxed), 6);
        assert_eq!(acc.stats.read_bytes.load(Ordering::Relaxed), 6 * 512);
        assert_eq!(acc.stats.write_ops.load(Ordering::Relaxed), 0);
        assert_eq!(disk.2.load(Ordering::SeqCst), 2);
        // Orders after shutdown are no-ops, and so is the drop.
        w.stop();
        drop(w);
    }

    #[test]
    fn a_paused_thread_flushes_then_serves_nothing_until_resumed() {
        // vm.pause: the thread flushes what the guest wrote and leaves the ring alone, so the
        // image stays as it is while paused; vm.resume serves what was queued meanwhile.
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let Rig {
            disk,
            notify,
            acc,
            mut w,
            ..
        } = rig();
        let p = w.io_pause();
        let soon = || std::time::Instant::now() + Duration::from_secs(2);
        // Four chains in the ring, two of them available.
        let q = ring_of_reads(&mem, 0x0, 4);
        mem.write_obj(2u16, GuestAddress(0x102)).unwrap();
        w.start(mem.clone(), q);
        assert!(wait_used(&mem, 0x0, 2), "used {}", used_idx(&mem, 0x0));
        assert!(p.set(true, soon()));
        assert_eq!(disk.2.load(Ordering::SeqCst), 1, "flushed on pause");
        // Pausing again changes nothing (and flushes nothing more).
        assert!(p.set(true, soon()));
        assert_eq!(disk.2.load(Ordering::SeqCst), 1);
        mem.write_obj(4u16, GuestAddress(0x102)).unwrap();
        notify.write(1).unwrap();
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(used_idx(&mem, 0x0), 2, "served while paused");
        assert_eq!(acc.stats.read_ops.load(Ordering::Relaxed), 2);
        // Resuming serves the two queued meanwhile, without another notification.
        assert!(p.set(false, soon()));
        assert!(wait_used(&mem, 0x0, 4), "used {}", used_idx(&mem, 0x0));
        let data: [u8; 4] = mem.read_obj(GuestAddress(0x1000 + 3 * 0x400)).unwrap();
        assert_eq!(data, [4; 4]);
        assert_eq!(acc.stats.read_ops.load(Ordering::Relaxed), 4);
        // A thread that has ended answers no pause.
        w.shutdown();
        let t0 = std::time::Instant::now();
        assert!(!p.set(true, t0 + Duration::from_millis(300)));
        assert!(t0.elapsed() < Duration::from_secs(2));
    }

    #[test]
    fn a_pass_stops_at_its_limit_and_the_next_one_goes_on() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let img: Vec<u8> = (1..=128u8).flat_map(|s| [s; 512]).collect();
        let disk = MemDisk(Mutex::new(img));
        let mut q = ring_of_reads(&mem, 0x0, 5);
        let serve = |q: &mut Queue, limit| {
            serve_queue(
                q,
                &mem,
                &disk,
                &cfg(false),
                &mut Vec::new(),
                &mut || {},
                &Accounting::default(),
                limit,
            )
        };
        let two = PassLimit {
            requests: 2,
            bytes: u64::MAX,
        };
        let first = serve(&mut q, two);
        assert!(first.used && first.more);
        assert_eq!(used_idx(&mem, 0x0), 2);
        // A byte limit below one request still serves one.
        let tiny = PassLimit {
            requests: usize::MAX,
            bytes: 1,
        };
        let second = serve(&mut q, tiny);
        assert!(second.more);
        assert_eq!(used_idx(&mem, 0x0), 3);
        let rest = serve(&mut q, PassLimit::DEFAULT);
        assert!(rest.used && !rest.more);
        assert_eq!(used_idx(&mem, 0x0), 5);
        let data: [u8; 4] = mem.read_obj(GuestAddress(0x1000 + 4 * 0x400)).unwrap();
        assert_eq!(data, [5; 4]);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Random descriptor chains straight into the parser: never a panic, never a disk
        /// access out of range (MemDisk would panic), used length within what the guest gave.
        #[test]
        fn random_chains_never_panic(
            fill in proptest::collection::vec(any::<u8>(), 256),
            descs in proptest::collection::vec((addr(), len(), any::<bool>()), 0..8),
            ty in prop_oneof![Just(0u32), Just(1), Just(4), Just(8), Just(11), Just(13), any::<u32>()],
            sector in prop_oneof![0u64..200, any::<u64>()],
            readonly in any::<bool>(),
        ) {
            let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).unwrap();
            for i in 0..MEM / 256 {
                mem.write_slice(&fill, GuestAddress((i * 256) as u64)).unwrap();
            }
            mem.write_obj(ty, GuestAddress(0)).unwrap();
            mem.write_obj(sector, GuestAddress(8)).unwrap();
            let disk = MemDisk(Mutex::new(vec![0x5a; 64 * 1024]));
            let writable: u64 = descs.iter().filter(|d| d.2).map(|d| u64::from(d.1)).sum();
            let n = handle_chain(&mem, descs.clone(), &disk, &cfg(readonly), &mut Vec::new());
            prop_assert!(u64::from(n) <= writable);
            if readonly {
                prop_assert!(disk.0.lock().unwrap().iter().all(|&b| b == 0x5a));
            }
        }

        /// A random descriptor table, available ring and memory served through virtio-queue:
        /// loops, indirect tables, wild next indices and addresses must all end cleanly.
        #[test]
        fn random_rings_never_panic(
            table in proptest::collection::vec(any::<u8>(), 16 * 16),
            heads in proptest::collection::vec(0u16..20, 1..8),
            fill in any::<u8>(),
            event_idx in any::<bool>(),
        ) {
            let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).unwrap();
            mem.write_slice(&vec![fill; MEM], GuestAddress(0)).unwrap();
            // Descriptor table at 0x1000 with addresses mostly inside memory.
            let mut t = table.clone();
            for d in t.chunks_exact_mut(16) {
                d[2..8].fill(0);
            }
            mem.write_slice(&t, GuestAddress(0x1000)).unwrap();
            // Avail ring at 0x2000, used ring at 0x3000.
            mem.write_obj(0u16, GuestAddress(0x2000)).unwrap();
            mem.write_obj(u16::try_from(heads.len()).unwrap(), GuestAddress(0x2002)).unwrap();
            for (i, h) in heads.iter().enumerate() {
                mem.write_obj(*h, GuestAddress(0x2004 + 2 * i as u64)).unwrap();
            }
            let mut q = Queue::new(16).unwrap();
            q.set_size(16);
            q.set_desc_table_address(Some(0x1000), Some(0));
            q.set_avail_ring_address(Some(0x2000), Some(0));
            q.set_used_ring_address(Some(0x3000), Some(0));
            q.set_event_idx(event_idx);
            q.set_ready(true);
            prop_assume!(q.is_valid(&mem));
            let disk = MemDisk(Mutex::new(vec![0; 64 * 1024]));
            serve_queue(&mut q, &mem, &disk, &cfg(false), &mut Vec::new(), &mut || {}, &Accounting::default(), PassLimit::DEFAULT);
            let _ = q.needs_notification(&mem);
        }
    }
}
