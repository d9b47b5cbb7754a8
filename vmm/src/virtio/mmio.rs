//! The virtio-mmio transport, version 2 (virtio 1.2 §4.2.2), for one block device with one or
//! more request queues.
//!
//! Register accesses come from vCPU threads; each queue is handed to its own I/O thread when
//! the driver sets DRIVER_OK, so a vCPU never waits for the disk and queues are served side by
//! side. Notifications reach a queue's thread through an ioeventfd on QueueNotify that matches
//! the queue's index; interrupts leave through the device's one irqfd; InterruptStatus is an
//! atomic all sides share.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::block::features;
use super::worker::{BlockWorker, Interrupt};
use crate::bus::BusDevice;

/// Register offsets.
pub mod regs {
    /// "virt".
    pub const MAGIC: u64 = 0x000;
    /// 2 for virtio 1.x.
    pub const VERSION: u64 = 0x004;
    /// Device type.
    pub const DEVICE_ID: u64 = 0x008;
    /// Vendor.
    pub const VENDOR_ID: u64 = 0x00c;
    /// Offered features, 32 bits selected by DEVICE_FEATURES_SEL.
    pub const DEVICE_FEATURES: u64 = 0x010;
    /// Selects the feature word.
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    /// Accepted features.
    pub const DRIVER_FEATURES: u64 = 0x020;
    /// Selects the accepted-feature word.
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    /// Queue index for the registers below.
    pub const QUEUE_SEL: u64 = 0x030;
    /// Largest queue size.
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    /// Queue size chosen.
    pub const QUEUE_NUM: u64 = 0x038;
    /// Queue ready.
    pub const QUEUE_READY: u64 = 0x044;
    /// Notification (served by an ioeventfd when KVM allows).
    pub const QUEUE_NOTIFY: u64 = 0x050;
    /// Interrupt status.
    pub const INTERRUPT_STATUS: u64 = 0x060;
    /// Interrupt acknowledge.
    pub const INTERRUPT_ACK: u64 = 0x064;
    /// Device status.
    pub const STATUS: u64 = 0x070;
    /// Descriptor table address, low and high.
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    /// High half.
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    /// Available ring.
    pub const QUEUE_AVAIL_LOW: u64 = 0x090;
    /// High half.
    pub const QUEUE_AVAIL_HIGH: u64 = 0x094;
    /// Used ring.
    pub const QUEUE_USED_LOW: u64 = 0x0a0;
    /// High half.
    pub const QUEUE_USED_HIGH: u64 = 0x0a4;
    /// Configuration generation.
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    /// Device configuration space.
    pub const CONFIG: u64 = 0x100;
}

/// Device status bits.
pub mod status {
    /// Guest has a driver.
    pub const DRIVER: u32 = 2;
    /// Driver ready.
    pub const DRIVER_OK: u32 = 4;
    /// Feature negotiation done.
    pub const FEATURES_OK: u32 = 8;
    /// Device hit an error.
    pub const DEVICE_NEEDS_RESET: u32 = 0x40;
}

const MMIO_MAGIC: u32 = 0x7472_6976;
const VIRTIO_ID_BLOCK: u32 = 2;
const VENDOR: u32 = 0x1af4;

/// One request queue of a device: its registers until DRIVER_OK, then its I/O thread.
pub struct MmioQueue {
    queue: Queue,
    /// Descriptors offered (QueueNumMax); the driver may use fewer.
    size: u16,
    worker: BlockWorker,
    /// QueueNotify writes for this queue that reach us as MMIO exits are forwarded here.
    notify: EventFd,
    /// The queue went to its I/O thread at DRIVER_OK.
    live: bool,
}

impl MmioQueue {
    /// A queue of up to `size` descriptors served by `worker`, whose ioeventfd is `notify`.
    ///
    /// # Errors
    /// When the queue cannot be created (`size` not a power of two, or above 32768).
    pub fn new(
        worker: BlockWorker,
        notify: EventFd,
        size: u16,
    ) -> Result<Self, virtio_queue::Error> {
        Ok(MmioQueue {
            queue: Queue::new(size)?,
            size,
            worker,
            notify,
            live: false,
        })
    }
}

/// A virtio-mmio block device.
pub struct MmioBlock {
    mem: GuestMemoryMmap,
    features: u64,
    config: Vec<u8>,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    queues: Vec<MmioQueue>,
    status: u32,
    /// The queues went to their I/O threads at DRIVER_OK.
    activated: bool,
    interrupt: Arc<Interrupt>,
}

impl MmioBlock {
    /// A device with `queues` (at least one; the configuration space says how many).
    pub fn new(
        mem: GuestMemoryMmap,
        queues: Vec<MmioQueue>,
        features: u64,
        config: Vec<u8>,
        interrupt: Arc<Interrupt>,
    ) -> Self {
        MmioBlock {
            mem,
            features,
            config,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            queues,
            status: 0,
            activated: false,
            interrupt,
        }
    }

    /// The descriptors a vCPU writes to when it drives the device: each queue's notify eventfd
    /// (for QueueNotify writes that reach us as exits) and its I/O thread's order eventfd
    /// (DRIVER_OK and reset).
    pub fn vcpu_writes(&self) -> Vec<RawFd> {
        self.queues
            .iter()
            .flat_map(|q| [q.notify.as_raw_fd(), q.worker.order_fd()])
            .collect()
    }

    /// Stops the I/O threads after the requests in flight, flushing the disk.
    pub fn shutdown(&mut self) {
        for q in &mut self.queues {
            q.worker.shutdown();
        }
    }

    fn reset(&mut self) {
        for q in &mut self.queues {
            q.worker.stop();
            q.queue.reset();
            q.live = false;
        }
        self.activated = false;
        self.status = 0;
        self.driver_features = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.queue_sel = 0;
        self.interrupt.status.store(0, Ordering::SeqCst);
    }

    fn set_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        let mut v = v;
        // FEATURES_OK only sticks when the accepted features are a subset of the offer and
        // include VERSION_1 (legacy drivers are not supported by a version-2 transport).
        if v & status::FEATURES_OK != 0 && self.status & status::FEATURES_OK == 0 {
            let ok = self.driver_features & !self.features == 0
                && self.driver_features & features::VERSION_1 != 0;
            if !ok {
                v &= !status::FEATURES_OK;
            }
        }
        if v & status::DRIVER_OK != 0 && self.status & status::DRIVER_OK == 0 {
            // A driver may use fewer queues than offered (Linux uses one per vCPU at most),
            // but at least one, and every queue it made ready must be sound.
            let mem = &self.mem;
            let any = self.queues.iter().any(|q| q.queue.ready());
            let sound = self
                .queues
                .iter()
                .all(|q| !q.queue.ready() || q.queue.is_valid(mem));
            if v & status::FEATURES_OK == 0 || !any || !sound || !self.activate() {
                v |= status::DEVICE_NEEDS_RESET;
            }
        }
        self.status = v;
    }

    /// Hands every ready queue to its I/O thread; false when one cannot start.
    fn activate(&mut self) -> bool {
        let event_idx = self.driver_features & features::RING_EVENT_IDX != 0;
        self.activated = true;
        let mut ok = true;
        for q in self.queues.iter_mut().filter(|q| q.queue.ready()) {
            q.queue.set_event_idx(event_idx);
            // The I/O thread owns the queue from now on; the transport keeps a blank one
            // until the next reset.
            let Ok(blank) = Queue::new(q.size) else {
                ok = false;
                continue;
            };
            let queue = std::mem::replace(&mut q.queue, blank);
            q.live = true;
            q.worker.start(self.mem.clone(), queue);
        }
        ok
    }

    /// The selected queue while its registers may still change.
    fn configurable_queue(&mut self) -> Option<&mut Queue> {
        if self.activated || self.status & status::DRIVER_OK != 0 {
            return None;
        }
        let q = &mut self.selected_mut()?.queue;
        (!q.ready()).then_some(q)
    }
}

impl MmioBlock {
    fn selected(&self) -> Option<&MmioQueue> {
        self.queues.get(usize::try_from(self.queue_sel).ok()?)
    }
    fn selected_mut(&mut self) -> Option<&mut MmioQueue> {
        self.queues.get_mut(usize::try_from(self.queue_sel).ok()?)
    }
}

fn read_u32(data: &mut [u8], v: u32) {
    let b = v.to_le_bytes();
    let n = data.len().min(4);
    data[..n].copy_from_slice(&b[..n]);
}

impl BusDevice for MmioBlock {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= regs::CONFIG {
            data.fill(0);
            let start = usize::try_from(offset - regs::CONFIG).unwrap_or(usize::MAX);
            if let Some(src) = self.config.get(start..) {
                let n = src.len().min(data.len());
                data[..n].copy_from_slice(&src[..n]);
            }
            return;
        }
        if data.len() != 4 {
            data.fill(0);
            return;
        }
        let v = match offset {
            regs::MAGIC => MMIO_MAGIC,
            regs::VERSION => 2,
            regs::DEVICE_ID => VIRTIO_ID_BLOCK,
            regs::VENDOR_ID => VENDOR,
            regs::DEVICE_FEATURES => match self.device_features_sel {
                0 => u32::try_from(self.features & 0xffff_ffff).unwrap_or(0),
                1 => u32::try_from(self.features >> 32).unwrap_or(0),
                _ => 0,
            },
            regs::QUEUE_NUM_MAX => self.selected().map_or(0, |q| u32::from(q.size)),
            regs::QUEUE_READY => self
                .selected()
                .map_or(0, |q| u32::from(q.live || q.queue.ready())),
            regs::INTERRUPT_STATUS => self.interrupt.status.load(Ordering::SeqCst),
            regs::STATUS => self.status,
            regs::CONFIG_GENERATION => 0,
            _ => 0,
        };
        read_u32(data, v);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= regs::CONFIG {
            // No writable configuration fields are offered (no CONFIG_WCE).
            return;
        }
        let Ok(b) = <[u8; 4]>::try_from(data) else {
            return;
        };
        let v = u32::from_le_bytes(b);
        let st = self.status;
        let negotiating = st & status::DRIVER != 0 && st & status::FEATURES_OK == 0;
        match offset {
            regs::DEVICE_FEATURES_SEL => self.device_features_sel = v,
            regs::DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            regs::DRIVER_FEATURES if negotiating => match self.driver_features_sel {
                0 => self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(v),
                1 => {
                    self.driver_features =
                        (self.driver_features & 0xffff_ffff) | (u64::from(v) << 32)
                }
                _ => {}
            },
            regs::QUEUE_SEL => self.queue_sel = v,
            regs::QUEUE_READY if st & status::DRIVER_OK == 0 && !self.activated => {
                if let Some(q) = self.selected_mut() {
                    q.queue.set_ready(v == 1);
                }
            }
            regs::QUEUE_NUM
            | regs::QUEUE_DESC_LOW
            | regs::QUEUE_DESC_HIGH
            | regs::QUEUE_AVAIL_LOW
            | regs::QUEUE_AVAIL_HIGH
            | regs::QUEUE_USED_LOW
            | regs::QUEUE_USED_HIGH => {
                if let Some(q) = self.configurable_queue() {
                    match offset {
                        regs::QUEUE_NUM => q.set_size(u16::try_from(v).unwrap_or(0)),
                        regs::QUEUE_DESC_LOW => q.set_desc_table_address(Some(v), None),
                        regs::QUEUE_DESC_HIGH => q.set_desc_table_address(None, Some(v)),
                        regs::QUEUE_AVAIL_LOW => q.set_avail_ring_address(Some(v), None),
                        regs::QUEUE_AVAIL_HIGH => q.set_avail_ring_address(None, Some(v)),
                        regs::QUEUE_USED_LOW => q.set_used_ring_address(Some(v), None),
                        _ => q.set_used_ring_address(None, Some(v)),
                    }
                }
            }
            regs::QUEUE_NOTIFY => {
                let q = usize::try_from(v).ok().and_then(|i| self.queues.get(i));
                if let Some(q) = q {
                    let _ = q.notify.write(1);
                }
            }
            regs::INTERRUPT_ACK => {
                self.interrupt.status.fetch_and(!v, Ordering::SeqCst);
            }
            regs::STATUS => self.set_status(v),
            _ => {}
        }
    }
}

/// Interrupt status shared between transport and I/O thread.
pub fn new_interrupt(irqfd: EventFd) -> Arc<Interrupt> {
    Arc::new(Interrupt {
        status: AtomicU32::new(0),
        irqfd,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::BusDevice;
    use crate::seccomp::Filters;
    use crate::virtio::block::tests::{cfg, MemDisk};
    use crate::virtio::block::{Backend, BlockConfig, DEFAULT_QUEUE_SIZE};
    use crate::virtio::worker::{Accounting, BlockWorker};
    use proptest::prelude::*;
    use vm_memory::{Bytes, GuestAddress};

    const MEM: usize = 0x10000;

    /// A two-queue device over a disk in memory, with real I/O threads.
    fn device(mem: &GuestMemoryMmap) -> (MmioBlock, Vec<EventFd>) {
        device_sized(mem, DEFAULT_QUEUE_SIZE)
    }

    /// As [`device`], its queues offering `size` descriptors.
    fn device_sized(mem: &GuestMemoryMmap, size: u16) -> (MmioBlock, Vec<EventFd>) {
        let cfg = |ro| BlockConfig {
            queue_size: size,
            ..cfg(ro)
        };
        let disk: Arc<dyn Backend> = Arc::new(MemDisk(std::sync::Mutex::new(vec![7; 64 * 1024])));
        let interrupt = new_interrupt(EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap());
        let mut queues = Vec::new();
        let mut notifies = Vec::new();
        for _ in 0..2 {
            let notify = EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap();
            let worker = BlockWorker::new(
                Arc::clone(&disk),
                cfg(false),
                Arc::clone(&interrupt),
                notify.try_clone().unwrap(),
                Accounting::default(),
                &Filters::none(),
            )
            .unwrap();
            notifies.push(notify.try_clone().unwrap());
            queues.push(MmioQueue::new(worker, notify, size).unwrap());
        }
        let c = cfg(false);
        let dev = MmioBlock::new(
            mem.clone(),
            queues,
            c.features(),
            c.config_space(64 * 1024),
            interrupt,
        );
        (dev, notifies)
    }

    /// A driver's whole set-up of queue `q` at `base`, up to DRIVER_OK.
    fn init(q: u32, base: u32) -> Vec<(u64, u32)> {
        vec![
            (regs::STATUS, 0),
            (regs::STATUS, 1),
            (regs::STATUS, 3),
            (regs::DRIVER_FEATURES_SEL, 1),
            (regs::DRIVER_FEATURES, 1),
            (regs::DRIVER_FEATURES_SEL, 0),
            (regs::DRIVER_FEATURES, 1 << 29),
            (regs::STATUS, 11),
            (regs::QUEUE_SEL, q),
            (regs::QUEUE_NUM, 16),
            (regs::QUEUE_DESC_LOW, base),
            (regs::QUEUE_AVAIL_LOW, base + 0x100),
            (regs::QUEUE_USED_LOW, base + 0x200),
            (regs::QUEUE_READY, 1),
            (regs::STATUS, 15),
        ]
    }

    /// Register writes a driver (or a hostile guest) might make: one, or a whole set-up.
    fn op() -> impl Strategy<Value = Vec<(u64, u32)>> {
        prop_oneof![
            1 => (0u32..3, prop_oneof![Just(0u32), Just(0x4000), 0u32..0x10000])
                .prop_map(|(q, b)| init(q, b)),
            8 => one().prop_map(|o| vec![o]),
        ]
    }

    /// One register write.
    fn one() -> impl Strategy<Value = (u64, u32)> {
        let addr = prop_oneof![
            Just(0u32),
            Just(0x1000),
            Just(0x2000),
            Just(0x3000),
            0u32..0x11000
        ];
        prop_oneof![
            3 => prop_oneof![Just(0u32), Just(1), Just(3), Just(11), Just(15), Just(0x4f), any::<u32>()]
                .prop_map(|v| (regs::STATUS, v)),
            2 => (0u32..3).prop_map(|v| (regs::QUEUE_SEL, v)),
            2 => prop_oneof![Just(16u32), Just(256), Just(0), Just(3), any::<u32>()]
                .prop_map(|v| (regs::QUEUE_NUM, v)),
            2 => (0u32..2).prop_map(|v| (regs::QUEUE_READY, v)),
            1 => addr.clone().prop_map(|v| (regs::QUEUE_DESC_LOW, v)),
            1 => addr.clone().prop_map(|v| (regs::QUEUE_AVAIL_LOW, v)),
            1 => addr.prop_map(|v| (regs::QUEUE_USED_LOW, v)),
            1 => any::<u32>().prop_map(|v| (regs::QUEUE_DESC_HIGH, v)),
            1 => (0u32..2).prop_map(|v| (regs::DRIVER_FEATURES_SEL, v)),
            2 => any::<u32>().prop_map(|v| (regs::DRIVER_FEATURES, v)),
            1 => (0u32..3).prop_map(|v| (regs::QUEUE_NOTIFY, v)),
            1 => any::<u32>().prop_map(|v| (regs::INTERRUPT_ACK, v)),
            1 => (0u64..0x200, any::<u32>()).prop_map(|(o, v)| (o & !3, v)),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(96))]

        /// Random register writes, resets and DRIVER_OKs included, over random guest memory
        /// and with notifications on the queues' ioeventfds: the transport and its I/O threads
        /// never panic nor deadlock, and the device always shuts down.
        #[test]
        fn random_register_sequences_never_panic_nor_hang(
            ops in proptest::collection::vec((op(), any::<bool>()), 0..60),
            fill in any::<u8>(),
        ) {
            let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).unwrap();
            mem.write_slice(&vec![fill; MEM], GuestAddress(0)).unwrap();
            let (mut dev, notifies) = device(&mem);
            for (writes, kick) in ops {
                for (reg, v) in writes {
                    dev.write(reg, &v.to_le_bytes());
                }
                let mut r = [0u8; 4];
                dev.read(regs::STATUS, &mut r);
                dev.read(regs::QUEUE_NUM_MAX, &mut r);
                if kick {
                    // As KVM's ioeventfd would on a QueueNotify write.
                    let _ = notifies[usize::from(fill & 1)].write(1);
                }
            }
            dev.shutdown();
        }
    }

    #[test]
    fn a_driver_set_up_activates_the_device_and_serves_it() {
        // The set-up the property test draws from does reach DRIVER_OK, so its sequences do
        // hand queues to the I/O threads and take them back.
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).unwrap();
        let (mut dev, _) = device(&mem);
        for (reg, v) in init(0, 0x4000) {
            dev.write(reg, &v.to_le_bytes());
        }
        let mut r = [0u8; 4];
        dev.read(regs::STATUS, &mut r);
        assert_eq!(u32::from_le_bytes(r), 15);
        // Reset and again on the other queue.
        for (reg, v) in init(1, 0x8000) {
            dev.write(reg, &v.to_le_bytes());
        }
        dev.read(regs::STATUS, &mut r);
        assert_eq!(u32::from_le_bytes(r), 15);
        dev.shutdown();
    }

    #[test]
    fn queue_size_is_offered_and_a_driver_within_it_runs() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).unwrap();
        let (mut dev, _) = device_sized(&mem, 8);
        let mut r = [0u8; 4];
        dev.write(regs::QUEUE_SEL, &1u32.to_le_bytes());
        dev.read(regs::QUEUE_NUM_MAX, &mut r);
        assert_eq!(u32::from_le_bytes(r), 8);
        // seg_max leaves room for the header and status descriptors.
        let mut seg_max = [0u8; 4];
        dev.read(regs::CONFIG + 12, &mut seg_max);
        assert_eq!(u32::from_le_bytes(seg_max), 6);
        for (reg, v) in init(0, 0x4000) {
            let v = if reg == regs::QUEUE_NUM { 8 } else { v };
            dev.write(reg, &v.to_le_bytes());
        }
        dev.read(regs::STATUS, &mut r);
        assert_eq!(u32::from_le_bytes(r), 15);
        dev.shutdown();
    }
}
