//! The virtual machine: KVM set-up, devices on the buses, vCPU threads, and the exit path.

use std::io::Write;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::Ordering;
use std::sync::mpsc::channel;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{IoEventAddress, Kvm, VcpuExit, VcpuFd};
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::acpi::{self, MmioDevice};
use crate::api::{self, Pause};
use crate::boot;
use crate::bus::{self, Bus, BusDevice};
use crate::cli::{Args, SerialSpec};
use crate::console::{self, RxRoom};
use crate::disk::{self, Disk};
use crate::layout::*;
use crate::legacy::{AcpiPm, IrqTrigger, SerialDevice, VmExit, I8042};
use crate::seccomp::{self, Filters, Kind};
use crate::virtio::block::Backend;
use crate::virtio::mmio::{self, MmioBlock, MmioQueue};
use crate::virtio::throttle::Throttle;
use crate::virtio::worker::{Accounting, BlockWorker};

/// Errors setting up or running the VM.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// /dev/kvm or a KVM ioctl failed.
    #[error("KVM: {what}: {source}")]
    Kvm {
        /// The operation.
        what: &'static str,
        /// errno.
        source: kvm_ioctls::Error,
    },
    /// Boot set-up failed.
    #[error(transparent)]
    Boot(#[from] boot::Error),
    /// ACPI tables failed.
    #[error(transparent)]
    Acpi(#[from] acpi::Error),
    /// A disk failed to open.
    #[error(transparent)]
    Disk(#[from] disk::Error),
    /// Device address clash.
    #[error(transparent)]
    Bus(#[from] bus::Error),
    /// Host resources (eventfd, thread, file).
    #[error("{what}: {source}")]
    Io {
        /// The operation.
        what: String,
        /// Cause.
        source: std::io::Error,
    },
    /// Two disks with one name (`id=`, or an `id=` equal to another's default `_diskN`).
    #[error("disk identifier '{0}' is not unique: the API would not tell the disks apart")]
    DuplicateDiskId(String),
    /// Too many disks.
    #[error("at most {MAX_VIRTIO_DEVICES} disks are supported, {0} given")]
    TooManyDisks(usize),
    /// virtio-queue refused the queue size.
    #[error("virtio queue: {0}")]
    Queue(virtio_queue::Error),
    /// The seccomp filters could not be built or installed.
    #[error(transparent)]
    Seccomp(#[from] seccomp::Error),
}

fn kvm<T>(what: &'static str, r: Result<T, kvm_ioctls::Error>) -> Result<T, Error> {
    r.map_err(|source| Error::Kvm { what, source })
}

fn io<T>(what: impl Into<String>, r: std::io::Result<T>) -> Result<T, Error> {
    r.map_err(|source| Error::Io {
        what: what.into(),
        source,
    })
}

/// How the run ended, for the exit code.
#[derive(Debug)]
pub struct Outcome {
    /// Why the guest stopped.
    pub exit: VmExit,
}

/// Everything that must stay alive while the guest runs.
struct Devices {
    blocks: Vec<Arc<Mutex<MmioBlock>>>,
    disks: Vec<Arc<Disk>>,
}

/// Builds and runs the VM until the guest powers off or fails.
///
/// # Errors
/// Set-up failures; failures at run time arrive as [`VmExit::Error`].
pub fn run(args: &Args) -> Result<Outcome, Error> {
    let t0 = Instant::now();
    if args.disk.len() > MAX_VIRTIO_DEVICES {
        return Err(Error::TooManyDisks(args.disk.len()));
    }
    check_disk_ids(&args.disk)?;
    // Before any thread starts, so that all of them inherit the mask: a stop signal then
    // reaches the waiter below, never a thread that would die of it.
    io("blocking the stop signals", console::block_stop_signals())?;
    // Every thread enters its seccomp filter as it starts; the main thread once they all run.
    let filters = Filters::new(args.seccomp)?;
    let (exit_tx, exit_rx) = channel::<VmExit>();
    io(
        "starting the signal thread",
        console::spawn_signal_waiter(exit_tx.clone(), &filters),
    )?;
    // Open the disks first: a locked or missing image should fail before anything else.
    let objects = disk::parse_objects(&args.objects)?;
    let mut disks = Vec::new();
    for spec in &args.disk {
        disks.push(Arc::new(Disk::open(spec, &objects)?));
    }

    let kvm_sys = kvm("opening /dev/kvm", Kvm::new())?;
    let vm = kvm("creating the VM", kvm_sys.create_vm())?;
    kvm(
        "setting the TSS address",
        vm.set_tss_address(usize::try_from(KVM_TSS_ADDRESS).unwrap_or(0)),
    )?;
    kvm("creating the in-kernel irqchip", vm.create_irq_chip())?;
    kvm(
        "creating the in-kernel PIT",
        vm.create_pit2(kvm_pit_config::default()),
    )?;

    let mem = boot::create_memory(args.memory)?;
    for (slot, region) in mem.iter().enumerate() {
        let r = kvm_userspace_memory_region {
            slot: u32::try_from(slot).unwrap_or(0),
            flags: 0,
            guest_phys_addr: region.start_addr().raw_value(),
            memory_size: region.len(),
            userspace_addr: region.as_ptr() as u64,
        };
        // SAFETY: the region is a live mmap owned by `mem`, which outlives the VM (both live
        // until the process exits); slots do not overlap.
        kvm("registering guest memory", unsafe {
            vm.set_user_memory_region(r)
        })?;
    }

    let mut pio = Bus::default();
    let mut mmio_bus = Bus::default();

    // What the vCPUs may write to (their seccomp filter allows no other descriptor).
    let mut vcpu_writes: Vec<RawFd> = Vec::new();
    // COM1.
    let mut pty = None;
    let out: Box<dyn Write + Send> = match &args.serial {
        SerialSpec::Stdio => {
            vcpu_writes.push(libc::STDOUT_FILENO);
            Box::new(std::io::stdout())
        }
        SerialSpec::Pty => {
            let p = io("creating the serial pseudo-terminal", console::Pty::open())?;
            let w = io("creating the serial pseudo-terminal", p.writer())?;
            crate::report!("vmm: serial console on {}", p.path);
            pty = Some(p);
            vcpu_writes.push(w.as_raw_fd());
            Box::new(w)
        }
        SerialSpec::None => Box::new(std::io::sink()),
        SerialSpec::File(p) => {
            let f = io(
                format!("{}: creating the serial log", p.display()),
                std::fs::File::create(p),
            )?;
            vcpu_writes.push(f.as_raw_fd());
            Box::new(f)
        }
    };
    // The power button's interrupt (the ACPI Generic Event Device), pressed through the API.
    let power_button = io("eventfd", EventFd::new(EFD_NONBLOCK))?;
    kvm(
        "irqfd for the power button",
        vm.register_irqfd(&power_button, GED_GSI),
    )?;
    let serial_irq = io("eventfd", EventFd::new(EFD_NONBLOCK))?;
    kvm("irqfd for COM1", vm.register_irqfd(&serial_irq, SERIAL_GSI))?;
    let rx_room = io("eventfd", EventFd::new(0))?;
    let room = io("eventfd", rx_room.try_clone())?;
    // The serial signals its interrupt and, as the guest reads, room for more input.
    vcpu_writes.extend([serial_irq.as_raw_fd(), room.as_raw_fd()]);
    let serial = SerialDevice(
        vm_superio::Serial::with_events(IrqTrigger(serial_irq), RxRoom(room), out),
        false,
    );
    let serial = Arc::new(Mutex::new(serial));
    pio.insert(0x3f8, 8, serial.clone())?;
    pio.insert(
        u64::from(ACPI_SLEEP_CONTROL_PORT),
        4,
        Arc::new(Mutex::new(AcpiPm(exit_tx.clone()))),
    )?;
    pio.insert(0x60, 5, Arc::new(Mutex::new(I8042(exit_tx.clone()))))?;

    // virtio-blk devices.
    let mut devs = Devices {
        blocks: Vec::new(),
        disks: Vec::new(),
    };
    let mut mmio_descs = Vec::new();
    let mut cmdline = args.cmdline.clone();
    let mut accounts = Vec::new();
    let mut io_pauses = Vec::new();
    for (i, (d, spec)) in disks.iter().zip(&args.disk).enumerate() {
        let idx = u32::try_from(i).unwrap_or(0);
        // One set of counters and buckets for all the disk's queues.
        let accounting = Accounting {
            stats: Arc::default(),
            throttle: Throttle::new(spec.throttle).map(Arc::new),
        };
        accounts.push(accounting.clone());
        let base = VIRTIO_MMIO_START + u64::from(idx) * VIRTIO_MMIO_SIZE;
        let gsi = VIRTIO_GSI_START + idx;
        let irqfd = io("eventfd", EventFd::new(EFD_NONBLOCK))?;
        kvm("irqfd for virtio-blk", vm.register_irqfd(&irqfd, gsi))?;
        let interrupt = mmio::new_interrupt(irqfd);
        let mut queues = Vec::new();
        for q in 0..u32::from(d.config.num_queues.max(1)) {
            // A QueueNotify write of the queue's index wakes that queue's I/O thread alone.
            let notify = io("eventfd", EventFd::new(EFD_NONBLOCK))?;
            kvm(
                "ioeventfd for virtio-blk",
                vm.register_ioevent(
                    &notify,
                    &IoEventAddress::Mmio(base + mmio::regs::QUEUE_NOTIFY),
                    q,
                ),
            )?;
            let backend: Arc<dyn Backend> = d.clone();
            let worker = io(
                "virtio-blk worker",
                BlockWorker::new(
                    backend,
                    d.config.clone(),
                    Arc::clone(&interrupt),
                    io("eventfd", notify.try_clone())?,
                    accounting.clone(),
                    &filters,
                ),
            )?;
            io_pauses.push(worker.io_pause());
            queues.push(MmioQueue::new(worker, notify, d.config.queue_size).map_err(Error::Queue)?);
        }
        let dev = MmioBlock::new(
            mem.clone(),
            queues,
            d.config.features(),
            d.config.config_space(d.size()),
            interrupt,
        );
        vcpu_writes.extend(dev.vcpu_writes());
        let dev = Arc::new(Mutex::new(dev));
        let bus_dev: Arc<Mutex<dyn BusDevice>> = dev.clone();
        mmio_bus.insert(base, VIRTIO_MMIO_SIZE, bus_dev)?;
        devs.blocks.push(dev);
        mmio_descs.push(MmioDevice {
            base,
            size: VIRTIO_MMIO_SIZE,
            gsi,
        });
        cmdline.push_str(&format!(" virtio_mmio.device=4K@{base:#x}:{gsi}"));
    }
    devs.disks = disks;

    let rsdp = acpi::write_tables(&mem, args.cpus, &mmio_descs)?;
    let entry = boot::load_kernel(
        &mem,
        args.memory,
        &args.kernel,
        args.initrd.as_deref(),
        &cmdline,
        rsdp,
    )?;
    boot::write_boot_tables(&mem, entry.protocol)?;

    let pio = Arc::new(pio);
    let mmio_bus = Arc::new(mmio_bus);
    let cpuid = kvm(
        "reading supported CPUID",
        kvm_sys.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES),
    )?;
    let mut vcpus = Vec::new();
    for id in 0..args.cpus {
        let vcpu = kvm("creating a vCPU", vm.create_vcpu(u64::from(id)))?;
        let mut c = cpuid.clone();
        for e in c.as_mut_slice() {
            if e.function == 1 {
                // Initial APIC ID in EBX[31:24].
                e.ebx = (e.ebx & 0x00ff_ffff) | (u32::from(id) << 24);
            }
            if e.function == 0xb || e.function == 0x1f {
                e.edx = u32::from(id);
            }
        }
        kvm("setting CPUID", vcpu.set_cpuid2(&c))?;
        if id == 0 {
            setup_boot_cpu(&vcpu, &entry)?;
        }
        vcpus.push(vcpu);
    }
    if std::env::var_os("VMM_REPORT").is_some() {
        crate::report!(
            "vmm: set-up took {:.1} ms; starting {} vCPU(s) at {:#x} ({entry})",
            t0.elapsed().as_secs_f64() * 1e3,
            args.cpus,
            entry.entry,
        );
    }

    // Keyboard input for COM1, in raw mode when it comes from a terminal (restored when `run`
    // returns, whichever way).
    let mut input = console::Input::None;
    if args.serial == SerialSpec::Stdio {
        input = console::Input::stdin();
        let terminal = match input {
            console::Input::Terminal(_) => Some(true),
            console::Input::Stream => Some(false),
            console::Input::None => None,
        };
        if let Some(terminal) = terminal {
            io(
                "starting the console thread",
                console::spawn_input(0, serial, rx_room, terminal, exit_tx.clone(), &filters),
            )?;
        }
    } else if let Some(p) = &pty {
        // What the user types on the pseudo-terminal, passed through as it is.
        io(
            "starting the console thread",
            console::spawn_input(p.fd(), serial, rx_room, false, exit_tx.clone(), &filters),
        )?;
    }

    // The control socket, bound before any filter goes on.
    let api = match &args.api_socket {
        Some(p) => {
            io(
                "installing the vCPU kick handler",
                api::install_kick_handler(),
            )?;
            Some(io(
                format!("{}: binding the API socket", p.display()),
                api::bind(p),
            )?)
        }
        None => None,
    };
    let pause = Arc::new(Pause::default());
    let vcpu_filters = filters.with_vcpu_writes(&vcpu_writes)?;
    for (id, vcpu) in vcpus.into_iter().enumerate() {
        let pio = Arc::clone(&pio);
        let mmio_bus = Arc::clone(&mmio_bus);
        let tx = exit_tx.clone();
        let p = Arc::clone(&pause);
        let t = io(
            "starting a vCPU thread",
            seccomp::spawn(&format!("vcpu{id}"), &vcpu_filters, Kind::Vcpu, move || {
                let e = vcpu_loop(id, vcpu, &pio, &mmio_bus, &p);
                let _ = tx.send(e);
            }),
        )?;
        pause.add_thread(t.as_pthread_t());
        // Never joined nor detached, so that its pthread_t stays valid for a pause's signal
        // even after the thread ends (pthread_kill then answers ESRCH).
        std::mem::forget(t);
    }
    if let Some(listener) = api {
        let control = api::Control {
            exit: exit_tx.clone(),
            pause: Arc::clone(&pause),
            io: io_pauses,
            disks: args
                .disk
                .iter()
                .zip(&accounts)
                .enumerate()
                .map(|(i, (d, a))| (disk_id(d, i), Arc::clone(&a.stats)))
                .collect(),
            config: info_config(args, pty.as_ref().map(|p| p.path.as_str())),
            power_button,
            memory: args.memory,
        };
        io(
            "starting the API thread",
            seccomp::spawn("api", &filters, Kind::Api, move || {
                api::serve(&listener, &control);
            }),
        )?;
    }
    drop(exit_tx);
    // Read again at the end for the report; the main thread's filter opens nothing.
    let status_file =
        std::env::var_os("VMM_REPORT").and_then(|_| std::fs::File::open("/proc/self/status").ok());
    seccomp::enter(&filters, Kind::Main)?;

    let exit = exit_rx
        .recv()
        .unwrap_or_else(|_| VmExit::Error("every vCPU thread ended".into()));
    drop(input);
    if std::env::var_os("VMM_REPORT").is_some() {
        report_usage(&mem, t0, status_file);
        for (i, a) in accounts.iter().enumerate() {
            let s = &a.stats;
            let held = a.throttle.as_ref().map_or(String::new(), |t| {
                format!(
                    "; held back by throttling for {:.1} ms",
                    t.held_total().as_secs_f64() * 1e3
                )
            });
            crate::report!(
                "vmm: disk {i}: {} reads of {} bytes, {} writes of {} bytes{held}",
                s.read_ops.load(Ordering::Relaxed),
                s.read_bytes.load(Ordering::Relaxed),
                s.write_ops.load(Ordering::Relaxed),
                s.write_bytes.load(Ordering::Relaxed),
            );
        }
    }
    // Stop the I/O threads (each flushes its disk), then the disks (locks, overlays) drop.
    for b in &devs.blocks {
        b.lock().unwrap_or_else(|e| e.into_inner()).shutdown();
    }
    for d in &devs.disks {
        if let Err(e) = d.close() {
            crate::report!("vmm: closing {}: {e}", d.image().path().display());
        }
    }
    drop(devs);
    let _ = vm;
    Ok(Outcome { exit })
}

/// Every disk's name must be its own, as Cloud Hypervisor requires: `vm.counters` is keyed by
/// them.
fn check_disk_ids(disks: &[crate::cli::DiskSpec]) -> Result<(), Error> {
    let mut seen = std::collections::HashSet::new();
    for (i, d) in disks.iter().enumerate() {
        let id = disk_id(d, i);
        if !seen.insert(id.clone()) {
            return Err(Error::DuplicateDiskId(id));
        }
    }
    Ok(())
}

/// A disk's name in the API: its `id=`, else `_diskN` as Cloud Hypervisor names it.
fn disk_id(d: &crate::cli::DiskSpec, i: usize) -> String {
    d.id.clone().unwrap_or_else(|| format!("_disk{i}"))
}

/// `vm.info`'s `config`, in Cloud Hypervisor's field names.
fn info_config(args: &Args, pty: Option<&str>) -> String {
    let path = |p: &std::path::Path| api::json_string(&p.to_string_lossy());
    let disks: Vec<String> = args
        .disk
        .iter()
        .enumerate()
        .map(|(i, d)| {
            format!(
                "{{\"id\":{},\"path\":{},\"readonly\":{},\"direct\":{},\"num_queues\":{},\"queue_size\":{}}}",
                api::json_string(&disk_id(d, i)),
                path(&d.path),
                d.readonly,
                d.cache == crate::cli::CacheMode::None,
                d.num_queues,
                d.queue_size
            )
        })
        .collect();
    format!(
        "{{\"cpus\":{{\"boot_vcpus\":{c},\"max_vcpus\":{c}}},\"memory\":{{\"size\":{}}},\
         \"payload\":{{\"kernel\":{},\"cmdline\":{},\"initramfs\":{}}},\"disks\":[{}],\
         \"serial\":{{\"mode\":\"{}\",\"file\":{}}}}}",
        args.memory,
        path(&args.kernel),
        api::json_string(&args.cmdline),
        args.initrd.as_deref().map_or("null".into(), path),
        disks.join(","),
        match &args.serial {
            SerialSpec::Stdio => "Tty",
            SerialSpec::Pty => "Pty",
            SerialSpec::File(_) => "File",
            SerialSpec::None => "Off",
        },
        match (&args.serial, pty) {
            (SerialSpec::File(p), _) => path(p),
            (_, Some(p)) => api::json_string(p),
            _ => "null".into(),
        },
        c = args.cpus,
    )
}

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_EXTINT: u32 = 0x7 << 8;
const APIC_MODE_NMI: u32 = 0x4 << 8;

/// Sets a local APIC register's delivery mode, unmasked.
fn set_lapic_reg(lapic: &mut kvm_bindings::kvm_lapic_state, reg: usize, mode: u32) {
    let Some(bytes) = lapic.regs.get_mut(reg..reg + 4) else {
        return;
    };
    let mut b = [0u8; 4];
    for (d, s) in b.iter_mut().zip(bytes.iter()) {
        *d = s.to_ne_bytes()[0];
    }
    let v = (u32::from_le_bytes(b) & !0x1_07ff) | mode;
    for (d, s) in bytes.iter_mut().zip(v.to_le_bytes()) {
        *d = libc::c_char::from_ne_bytes([s]);
    }
}

/// MSRs as firmware leaves them: above all MTRRs enabled with write-back as the default type
/// (KVM resets MTRRdefType to 0, which makes all memory uncached where KVM honours guest MTRRs,
/// as it does with shadow paging; the guest then runs orders of magnitude slower).
fn setup_msrs(vcpu: &VcpuFd) -> Result<(), Error> {
    const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
    const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
    const MTRR_ENABLE: u64 = 1 << 11;
    const MTRR_TYPE_WB: u64 = 6;
    const MISC_ENABLE_FAST_STRING: u64 = 1;
    let entries = [
        kvm_bindings::kvm_msr_entry {
            index: MSR_MTRR_DEF_TYPE,
            data: MTRR_ENABLE | MTRR_TYPE_WB,
            ..Default::default()
        },
        kvm_bindings::kvm_msr_entry {
            index: MSR_IA32_MISC_ENABLE,
            data: MISC_ENABLE_FAST_STRING,
            ..Default::default()
        },
    ];
    let msrs = kvm_bindings::Msrs::from_entries(&entries).map_err(|_| Error::Kvm {
        what: "building the MSR list",
        source: kvm_ioctls::Error::new(libc::EINVAL),
    })?;
    let n = kvm("setting MSRs", vcpu.set_msrs(&msrs))?;
    if n != entries.len() {
        crate::report!(
            "vmm: warning: KVM accepted {n} of {} boot MSRs",
            entries.len()
        );
    }
    Ok(())
}

/// The boot CPU's state for the kernel's entry (64-bit or PVH); the other vCPUs stay in
/// wait-for-SIPI until the guest starts them.
fn setup_boot_cpu(vcpu: &VcpuFd, entry: &boot::EntryPoint) -> Result<(), Error> {
    let sregs = kvm("reading sregs", vcpu.get_sregs())?;
    let (sregs, regs) = boot::boot_cpu_state(entry, sregs);
    kvm("setting sregs", vcpu.set_sregs(&sregs))?;
    kvm("setting regs", vcpu.set_regs(&regs))?;
    kvm("setting FPU", vcpu.set_fpu(&boot::initial_fpu()))?;
    setup_msrs(vcpu)?;
    // Virtual-wire mode as firmware leaves it: LINT0 takes the 8259's ExtINT, LINT1 is NMI.
    let mut lapic = kvm("reading the local APIC", vcpu.get_lapic())?;
    set_lapic_reg(&mut lapic, APIC_LVT0, APIC_MODE_EXTINT);
    set_lapic_reg(&mut lapic, APIC_LVT1, APIC_MODE_NMI);
    kvm("setting the local APIC", vcpu.set_lapic(&lapic))?;
    Ok(())
}

/// Prints VMM memory overhead: RSS minus the guest memory the guest actually touched.
fn report_usage(mem: &GuestMemoryMmap, t0: Instant, status: Option<std::fs::File>) {
    let rss_kib = status
        .and_then(|mut f| {
            use std::io::{Read, Seek};
            let mut s = String::new();
            f.rewind().and_then(|_| f.read_to_string(&mut s)).ok()?;
            Some(s)
        })
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|v| v.parse::<u64>().ok())
            })
        })
        .unwrap_or(0);
    let mut touched_pages = 0u64;
    for r in mem.iter() {
        touched_pages += resident_pages(r.as_ptr(), r.len());
    }
    let touched_kib = touched_pages * 4;
    crate::report!(
        "vmm: ran {:.1} ms; RSS {} KiB, guest memory touched {} KiB, VMM overhead {} KiB",
        t0.elapsed().as_secs_f64() * 1e3,
        rss_kib,
        touched_kib,
        rss_kib.saturating_sub(touched_kib)
    );
}

/// Pages of `[ptr, ptr + len)` resident in RAM (mincore).
fn resident_pages(ptr: *mut u8, len: u64) -> u64 {
    let Ok(len) = usize::try_from(len) else {
        return 0;
    };
    let pages = len.div_ceil(4096);
    let mut vec = vec![0u8; pages];
    // SAFETY: `ptr..ptr+len` is one live page-aligned mapping owned by guest memory; `vec` has
    // one byte per page as mincore requires.
    let r = unsafe { libc::mincore(ptr.cast(), len, vec.as_mut_ptr()) };
    if r != 0 {
        return 0;
    }
    vec.iter().filter(|b| **b & 1 != 0).count() as u64
}

fn vcpu_loop(id: usize, mut vcpu: VcpuFd, pio: &Bus, mmio_bus: &Bus, pause: &Pause) -> VmExit {
    loop {
        if pause.requested() {
            pause.park();
        }
        match vcpu.run() {
            Ok(VcpuExit::IoIn(port, data)) => {
                pio.read(u64::from(port), data);
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                pio.write(u64::from(port), data);
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                mmio_bus.read(addr, data);
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                mmio_bus.write(addr, data);
            }
            Ok(VcpuExit::Hlt) => {
                return VmExit::Error(format!("vCPU {id} halted outside the in-kernel irqchip"))
            }
            Ok(VcpuExit::Shutdown) => {
                let rip = vcpu.get_regs().map(|r| r.rip).unwrap_or(0);
                return VmExit::Error(format!(
                    "vCPU {id}: guest triple fault (KVM_EXIT_SHUTDOWN) near rip {rip:#x}"
                ));
            }
            Ok(VcpuExit::SystemEvent(ty, _)) => {
                return match ty {
                    kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => VmExit::PowerOff,
                    kvm_bindings::KVM_SYSTEM_EVENT_RESET => VmExit::Reset,
                    other => VmExit::Error(format!("vCPU {id}: KVM system event {other}")),
                }
            }
            Ok(VcpuExit::FailEntry(reason, cpu)) => {
                return VmExit::Error(format!(
                    "vCPU {id}: KVM entry failed (hardware reason {reason:#x}, cpu {cpu})"
                ))
            }
            Ok(VcpuExit::InternalError) => {
                let rip = vcpu.get_regs().map(|r| r.rip).unwrap_or(0);
                return VmExit::Error(format!(
                    "vCPU {id}: KVM internal error (an instruction KVM cannot emulate?) at rip {rip:#x}"
                ));
            }
            Ok(other) => {
                return VmExit::Error(format!("vCPU {id}: unexpected KVM exit {other:?}"));
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
            Err(e) => return VmExit::Error(format!("vCPU {id}: KVM_RUN failed: {e}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disks(specs: &[&str]) -> Vec<crate::cli::DiskSpec> {
        specs.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn disk_ids_must_be_unique_defaults_included() {
        assert!(check_disk_ids(&disks(&["path=a", "path=b", "path=c,id=root"])).is_ok());
        let same = check_disk_ids(&disks(&["path=a,id=x", "path=b,id=x"])).unwrap_err();
        assert!(matches!(same, Error::DuplicateDiskId(ref id) if id == "x"));
        // The first disk named like the second's default name.
        let clash = check_disk_ids(&disks(&["path=a,id=_disk1", "path=b"])).unwrap_err();
        assert!(matches!(clash, Error::DuplicateDiskId(ref id) if id == "_disk1"));
    }
}
