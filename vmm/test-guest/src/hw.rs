//! Port and memory-mapped I/O, the TSC, the PIT, COM1 and power-off.

pub fn outb(port: u16, v: u8) {
    // SAFETY: port I/O has no memory effects visible to Rust.
    unsafe {
        core::arch::asm!("out dx, al", in("dx") port, in("al") v, options(nomem, nostack, preserves_flags))
    }
}

pub fn inb(port: u16) -> u8 {
    let v: u8;
    // SAFETY: as above.
    unsafe {
        core::arch::asm!("in al, dx", in("dx") port, out("al") v, options(nomem, nostack, preserves_flags))
    }
    v
}

pub fn mmio_read32(addr: u64) -> u32 {
    // SAFETY: `addr` is a device register in the identity-mapped MMIO window.
    unsafe { core::ptr::read_volatile(addr as *const u32) }
}

pub fn mmio_write32(addr: u64, v: u32) {
    // SAFETY: as above.
    unsafe { core::ptr::write_volatile(addr as *mut u32, v) }
}

pub fn rdtsc() -> u64 {
    let lo: u32;
    let hi: u32;
    // SAFETY: rdtsc only reads the time-stamp counter.
    unsafe {
        core::arch::asm!("lfence", "rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack))
    }
    (u64::from(hi) << 32) | u64::from(lo)
}

pub fn serial_putc(b: u8) {
    let mut spins = 0;
    // Wait for the transmitter holding register to be empty (LSR bit 5).
    while inb(0x3fd) & 0x20 == 0 && spins < 100_000 {
        spins += 1;
    }
    outb(0x3f8, b);
}

/// The ACPI sleep control register the FADT names (SLP_TYP = 5 for S5, SLP_EN); i8042 reset as
/// a fallback.
pub fn power_off() -> ! {
    outb(0x600, (5 << 2) | (1 << 5));
    outb(0x64, 0xfe);
    loop {
        // SAFETY: halting with interrupts off parks the CPU for good.
        unsafe { core::arch::asm!("cli", "hlt") }
    }
}

/// Measures the TSC rate against PIT channel 2 (50 ms one-shot, gated through port 0x61), as
/// Linux's `pit_calibrate_tsc` does. `None` when the PIT never counts down.
pub fn calibrate_tsc() -> Option<u64> {
    const PIT_HZ: u64 = 1_193_182;
    const LATCH: u64 = PIT_HZ / 20;
    outb(0x61, (inb(0x61) & !0x02) | 0x01);
    outb(0x43, 0xb0);
    outb(0x42, (LATCH & 0xff) as u8);
    outb(0x42, (LATCH >> 8) as u8);
    let t0 = rdtsc();
    let mut loops: u64 = 0;
    while inb(0x61) & 0x20 == 0 {
        loops += 1;
        // Give up after ~10^10 cycles (several seconds on any TSC).
        if rdtsc() - t0 > 10_000_000_000 {
            crate::println!(
                "test-guest: PIT channel 2 never expired ({} polls, port 0x61 = {:#x})",
                loops,
                inb(0x61)
            );
            return None;
        }
    }
    let t1 = rdtsc();
    let hz = (t1 - t0) * 20;
    if hz < 10_000_000 {
        None
    } else {
        Some(hz)
    }
}

#[repr(C, align(64))]
struct PvClock {
    version: u32,
    pad0: u32,
    tsc_timestamp: u64,
    system_time: u64,
    tsc_to_system_mul: u32,
    tsc_shift: i8,
    flags: u8,
    pad: [u8; 2],
}

static mut PVCLOCK: PvClock = PvClock {
    version: 0,
    pad0: 0,
    tsc_timestamp: 0,
    system_time: 0,
    tsc_to_system_mul: 0,
    tsc_shift: 0,
    flags: 0,
    pad: [0; 2],
};

/// The TSC rate from KVM's paravirtual clock (MSR_KVM_SYSTEM_TIME_NEW): KVM publishes the
/// TSC-to-nanoseconds multiplier and shift, from which the rate follows.
pub fn kvmclock_tsc_hz() -> Option<u64> {
    let addr = core::ptr::addr_of!(PVCLOCK) as u64;
    // SAFETY: writing the kvmclock MSR asks KVM to fill PVCLOCK, a static we own.
    unsafe {
        core::arch::asm!("wrmsr", in("ecx") 0x4b56_4d01u32, in("eax") (addr as u32) | 1,
            in("edx") (addr >> 32) as u32, options(nostack));
    }
    // SAFETY: KVM wrote the struct; read it volatile.
    let (mul, shift) = unsafe {
        (
            core::ptr::read_volatile(core::ptr::addr_of!(PVCLOCK.tsc_to_system_mul)),
            core::ptr::read_volatile(core::ptr::addr_of!(PVCLOCK.tsc_shift)),
        )
    };
    // SAFETY: disable the clock again so KVM stops writing into our memory.
    unsafe {
        core::arch::asm!("wrmsr", in("ecx") 0x4b56_4d01u32, in("eax") 0u32, in("edx") 0u32, options(nostack));
    }
    if mul == 0 {
        return None;
    }
    let hz = (1_000_000_000u128 << 32) / u128::from(mul);
    let hz = if shift >= 0 {
        hz >> shift
    } else {
        hz << (-shift)
    };
    Some(hz as u64)
}
