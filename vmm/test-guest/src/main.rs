//! The vmm test guest: a freestanding x86-64 program that boots through the same entries as a
//! Linux kernel (the 64-bit entry: long mode, identity-mapped, zero page in `rsi`; or, in the
//! build with a PVH note, the PVH entry: 32-bit protected mode, `hvm_start_info` in `ebx`),
//! reads its boot information (`bootinfo.rs`), finds its virtio-mmio
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
mod bootinfo;
mod hw;
mod irq;
mod user;

use core::fmt::Write;
use core::panic::PanicInfo;

// Linux 64-bit entry (the ELF entry point): long mode on the VMM's page tables, zero page in rsi.
core::arch::global_asm!(
    r#"
    .section .text._start, "ax"
    .global _start
_start:
    cli
    mov r12, rsi
    xor r13d, r13d
    .global boot_common
boot_common:
    /* r12 = boot information, r13 = protocol (0 = Linux 64-bit, 1 = PVH). */
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
    mov rsi, r13
    call {main}
1:  hlt
    jmp 1b
    "#,
    stack = sym STACK,
    stack_size = const STACK_SIZE,
    main = sym guest_main,
);

// PVH entry, as Linux's arch/x86/platform/pvh/head.S does it: the VMM starts here in 32-bit
// protected mode with paging off and hvm_start_info in ebx. Load a GDT with a 64-bit code
// segment, point CR3 at identity page tables for the first 4 GiB (assembled statically below:
// the device windows sit near 4 GiB), set CR4.PAE, EFER.LME and CR0.PG, and far-jump into
// 64-bit code, which joins the 64-bit entry's path. Only the note below refers to `pvh_start`,
// so the linker drops all this from the build without it.
core::arch::global_asm!(
    r#"
    .section .text.pvh_start, "ax"
    .code32
    .global pvh_start
pvh_start:
    cli
    cld
    mov %ebx, %esi
    lgdt pvh_gdt_desc
    mov %cr4, %eax
    or $0x20, %eax
    mov %eax, %cr4
    mov $pvh_pml4, %eax
    mov %eax, %cr3
    mov $0xc0000080, %ecx
    rdmsr
    or $0x100, %eax
    wrmsr
    mov %cr0, %eax
    or $0x80000001, %eax
    mov %eax, %cr0
    ljmp $0x08, $pvh_long_mode
    .code64
pvh_long_mode:
    mov $0x10, %eax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    mov %ax, %fs
    mov %ax, %gs
    mov %esi, %r12d
    mov $1, %r13d
    jmp boot_common

    .section .data.pvh, "aw"
    .balign 8
pvh_gdt:
    .quad 0
    .quad 0x00af9b000000ffff
    .quad 0x00cf93000000ffff
pvh_gdt_end:
pvh_gdt_desc:
    .word pvh_gdt_end - pvh_gdt - 1
    .quad pvh_gdt
    .balign 4096
pvh_pml4:
    .quad pvh_pdpt + 0x3
    .fill 511, 8, 0
pvh_pdpt:
    .quad pvh_pd + 0x3
    .quad pvh_pd + 0x1003
    .quad pvh_pd + 0x2003
    .quad pvh_pd + 0x3003
    .fill 508, 8, 0
pvh_pd:
    .set pvh_i, 0
    .rept 2048
    .quad (pvh_i << 21) | 0x83
    .set pvh_i, pvh_i + 1
    .endr
    .text
    "#,
    options(att_syntax)
);

// The PVH ELF note (XEN_ELFNOTE_PHYS32_ENTRY = 18, name "Xen", a 4-byte entry address) that
// makes the VMM use the PVH entry; only in the VMM_TEST_GUEST_PVH build.
#[cfg(pvh_note)]
core::arch::global_asm!(
    r#"
    .pushsection .note.Xen, "a", @note
    .balign 4
    .long 4
    .long 4
    .long 18
    .asciz "Xen"
    .balign 4
    .long pvh_start
    .popsection
    "#,
    options(att_syntax)
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

/// The value of `key=` on the command line.
pub fn param<'a>(cmdline: &'a str, key: &str) -> Option<&'a str> {
    cmdline
        .split(' ')
        .find_map(|w| w.strip_prefix(key).and_then(|rest| rest.strip_prefix('=')))
}

extern "C" fn guest_main(info_addr: u64, protocol: u64) -> ! {
    let t_entry = hw::rdtsc();
    println!("test-guest: started");
    let protocol = if protocol == 1 {
        bootinfo::Protocol::Pvh
    } else {
        bootinfo::Protocol::Linux64
    };
    let info = bootinfo::BootInfo::read(protocol, info_addr);
    let cmd = info.cmdline;
    println!("test-guest: cmdline: {}", cmd);
    let mut tally = Tally {
        passed: 0,
        failed: 0,
    };
    info.check(&mut tally);

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
    acpi::check(info.rsdp, ndev, &mut tally);

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
    if let Some(n) = param(cmd, "test.serial_read").and_then(|v| v.parse::<usize>().ok()) {
        serial_input(n, &mut tally);
    }
    if let Some(gsi) = param(cmd, "test.power_button").and_then(|v| v.parse::<u32>().ok()) {
        // As an OS would: the ACPI Generic Event Device's interrupt, then power off.
        irq::route_only(gsi);
        let before = irq::count();
        println!("test-guest: waiting for the power button");
        irq::wait_until(|| irq::count() > before);
        println!("test-guest: power button pressed");
    }
    let _ = t_entry;
    println!("{} passed, {} failed", tally.passed, tally.failed);
    if param(cmd, "test.hold").is_some() {
        // For tests that stop the VMM from outside.
        println!("test-guest: holding until stopped");
        loop {
            // SAFETY: halting with interrupts off parks the CPU for good.
            unsafe { core::arch::asm!("cli", "hlt") }
        }
    }
    hw::power_off()
}

/// Reads `n` bytes from COM1 as a driver does (receive interrupt on GSI 4, then the FIFO drained
/// while LSR says data is ready), printing each back as it comes, bytes outside printable ASCII
/// as `\xNN`.
fn serial_input(n: usize, tally: &mut Tally) {
    irq::route(4);
    // IER: received-data-available interrupt.
    hw::outb(0x3f9, 0x01);
    let before = irq::count();
    println!("test-guest: waiting for {} bytes of serial input", n);
    // The first byte raises the interrupt, whether it comes before or after the wait starts.
    irq::wait_until(|| irq::count() > before);
    let _ = core::fmt::Write::write_str(&mut Serial, "test-guest: serial input: ");
    for _ in 0..n {
        irq::wait_until(|| hw::inb(0x3fd) & 1 != 0);
        let b = hw::inb(0x3f8);
        if (0x20..0x7f).contains(&b) && b != b'\\' {
            hw::serial_putc(b);
        } else {
            let _ = core::fmt::Write::write_fmt(&mut Serial, format_args!("\\x{:02x}", b));
        }
    }
    println!("");
    hw::outb(0x3f9, 0);
    tally.check("serial: input arrived with an interrupt", irq::count() > before);
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
