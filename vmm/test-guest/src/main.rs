//! The vmm test guest: a freestanding x86-64 program that boots through the same 64-bit entry
//! as a Linux kernel (long mode, identity-mapped, zero page in `rsi`), finds its virtio-mmio
//! block devices on the command line, checks the ACPI tables the VMM built, drives each disk the
//! way a driver does (feature negotiation, split virtqueue, every request type, completions
//! taken from IOAPIC interrupts) and prints `N passed, M failed` on COM1 before powering off
//! through the ACPI sleep register.
//!
//! Built by `vmm/build.rs` with plain `rustc` for the host target and `guest.ld`; it uses no
//! crates and no `std`.

#![no_std]
#![no_main]
// The guest is low-level by nature: raw pointers to device registers and DMA buffers.
#![allow(clippy::missing_safety_doc, static_mut_refs)]

mod acpi;
mod blk;
mod hw;
mod irq;

use core::fmt::Write;
use core::panic::PanicInfo;

core::arch::global_asm!(
    r#"
    .section .text._start, "ax"
    .global _start
_start:
    cli
    mov r12, rsi
    /* Zero .bss (linux-loader copies only the file part of each segment). */
    lea rdi, [rip + __bss_start]
    lea rcx, [rip + __bss_end]
    sub rcx, rdi
    xor eax, eax
    rep stosb
    lea rsp, [rip + {stack} + {stack_size}]
    /* Enable SSE (the host target's code uses it): CR0.MP, clear CR0.EM; CR4.OSFXSR|OSXMMEXCPT. */
    mov rax, cr0
    and rax, ~4
    or rax, 2
    mov cr0, rax
    mov rax, cr4
    or rax, 0x600
    mov cr4, rax
    clts
    fninit
    mov rdi, r12
    call {main}
1:  hlt
    jmp 1b
    "#,
    stack = sym STACK,
    stack_size = const STACK_SIZE,
    main = sym guest_main,
);

const STACK_SIZE: usize = 256 * 1024;

#[repr(C, align(16))]
struct Stack([u8; STACK_SIZE]);

#[no_mangle]
static mut STACK: Stack = Stack([0; STACK_SIZE]);

/// COM1 console.
pub struct Serial;

impl Write for Serial {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        for b in s.bytes() {
            if b == b'\n' {
                hw::serial_putc(b'\r');
            }
            hw::serial_putc(b);
        }
        Ok(())
    }
}

#[macro_export]
macro_rules! println {
    ($($arg:tt)*) => {{
        let _ = core::fmt::Write::write_fmt(&mut $crate::Serial, format_args!($($arg)*));
        let _ = core::fmt::Write::write_str(&mut $crate::Serial, "\n");
    }};
}

/// Pass/fail bookkeeping.
pub struct Tally {
    pub passed: u32,
    pub failed: u32,
}

impl Tally {
    pub fn check(&mut self, name: &str, ok: bool) {
        if ok {
            self.passed += 1;
            println!("ok - {}", name);
        } else {
            self.failed += 1;
            println!("FAIL - {}", name);
        }
    }
}

/// The kernel command line, read from the zero page (`hdr.cmd_line_ptr` at 0x228).
fn cmdline(zero_page: u64) -> &'static str {
    // SAFETY: the VMM put the zero page at `zero_page` and the command line at the address it
    // holds; both are identity-mapped RAM. The string is NUL-terminated and at most 4 KiB.
    unsafe {
        let ptr = core::ptr::read_volatile((zero_page + 0x228) as *const u32) as u64;
        if ptr == 0 {
            return "";
        }
        let base = ptr as *const u8;
        let mut len = 0;
        while len < 4096 && *base.add(len) != 0 {
            len += 1;
        }
        core::str::from_utf8(core::slice::from_raw_parts(base, len)).unwrap_or("")
    }
}

/// The value of `key=` on the command line.
pub fn param<'a>(cmdline: &'a str, key: &str) -> Option<&'a str> {
    cmdline
        .split(' ')
        .find_map(|w| w.strip_prefix(key).and_then(|rest| rest.strip_prefix('=')))
}

extern "C" fn guest_main(zero_page: u64) -> ! {
    let t_entry = hw::rdtsc();
    println!("test-guest: started");
    let cmd = cmdline(zero_page);
    println!("test-guest: cmdline: {}", cmd);
    let mut tally = Tally {
        passed: 0,
        failed: 0,
    };

    irq::init();
    println!("test-guest: IDT and LAPIC set up");
    // KVM's paravirtual clock gives the TSC rate directly; the PIT is the fallback (its
    // speaker port does not work under every KVM).
    let tsc_hz = match hw::kvmclock_tsc_hz() {
        Some(hz) => {
            println!("test-guest: TSC {} MHz (from kvmclock)", hz / 1_000_000);
            Some(hz)
        }
        None => {
            let hz = hw::calibrate_tsc();
            match hz {
                Some(hz) => println!("test-guest: TSC {} MHz (PIT-calibrated)", hz / 1_000_000),
                None => println!("test-guest: no TSC rate; throughput figures unavailable"),
            }
            hz
        }
    };

    let ndev = cmd
        .split(' ')
        .filter(|w| w.starts_with("virtio_mmio.device="))
        .count();
    acpi::check(zero_page, ndev, &mut tally);

    let mut index = 0;
    for w in cmd.split(' ') {
        if let Some(spec) = w.strip_prefix("virtio_mmio.device=") {
            match blk::parse_device(spec) {
                Some((base, gsi)) => blk::test_disk(index, base, gsi, cmd, tsc_hz, &mut tally),
                None => tally.check("parse virtio_mmio.device", false),
            }
            index += 1;
        }
    }
    if index == 0 {
        println!("test-guest: no virtio-mmio devices on the command line");
    }
    let _ = t_entry;
    println!("{} passed, {} failed", tally.passed, tally.failed);
    hw::power_off()
}

#[panic_handler]
fn panic(info: &PanicInfo) -> ! {
    println!("test-guest PANIC: {}", info);
    hw::power_off()
}

// The host target's `core` calls these; there is no libc here. `rep movsb`/`rep stosb` keep the
// compiler from turning the loops back into calls to themselves.
#[no_mangle]
pub unsafe extern "C" fn memcpy(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees both ranges are valid and do not overlap.
    unsafe {
        core::arch::asm!("rep movsb", inout("rcx") n => _, inout("rdi") dst => _,
            inout("rsi") src => _, options(nostack, preserves_flags));
    }
    dst
}

#[no_mangle]
pub unsafe extern "C" fn memmove(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if (dst as usize) <= (src as usize) || (dst as usize) >= (src as usize).wrapping_add(n) {
        // SAFETY: a forward copy is correct when dst is below src or the ranges are disjoint.
        unsafe { memcpy(dst, src, n) }
    } else {
        // SAFETY: backwards copy with the direction flag set, restored afterwards.
        unsafe {
            core::arch::asm!("std", "rep movsb", "cld",
                inout("rcx") n => _, inout("rdi") dst.add(n - 1) => _,
                inout("rsi") src.add(n - 1) => _, options(nostack));
        }
        dst
    }
}

#[no_mangle]
pub unsafe extern "C" fn memset(dst: *mut u8, c: i32, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees the range is valid.
    unsafe {
        core::arch::asm!("rep stosb", inout("rcx") n => _, inout("rdi") dst => _,
            in("al") c as u8, options(nostack, preserves_flags));
    }
    dst
}

#[no_mangle]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    let mut i = 0;
    while i < n {
        // SAFETY: the caller guarantees both ranges are valid for n bytes.
        let (x, y) = unsafe {
            (
                core::ptr::read_volatile(a.add(i)),
                core::ptr::read_volatile(b.add(i)),
            )
        };
        if x != y {
            return i32::from(x) - i32::from(y);
        }
        i += 1;
    }
    0
}

#[no_mangle]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: same contract as memcmp.
    unsafe { memcmp(a, b, n) }
}

/// The host target's precompiled `core` is built for unwinding and references the personality
/// routine; with `panic=abort` it is never called.
#[no_mangle]
pub extern "C" fn rust_eh_personality() {}
