//! A minimal IDT, the local APIC and the IOAPIC: device interrupts arrive as vector
//! `IRQ_BASE + gsi`, bump [`IRQ_COUNT`] and are acknowledged with an EOI. Interrupts are only
//! ever enabled inside [`wait_until`] (`sti; hlt; cli`), so no Rust code runs interrupted.

use core::sync::atomic::{AtomicU64, Ordering};

pub const IRQ_BASE: u8 = 0x30;
const LAPIC: u64 = 0xfee0_0000;
const IOAPIC: u64 = 0xfec0_0000;

#[no_mangle]
pub static IRQ_COUNT: AtomicU64 = AtomicU64::new(0);

#[repr(C, packed)]
#[derive(Clone, Copy)]
struct Gate {
    off_lo: u16,
    sel: u16,
    ist: u8,
    attr: u8,
    off_mid: u16,
    off_hi: u32,
    zero: u32,
}

#[repr(C, align(4096))]
struct Idt([Gate; 256]);

static mut IDT: Idt = Idt([Gate {
    off_lo: 0,
    sel: 0,
    ist: 0,
    attr: 0,
    off_mid: 0,
    off_hi: 0,
    zero: 0,
}; 256]);

core::arch::global_asm!(
    r#"
    .text
    .altmacro
    .macro EXC n
    .global exc_\n
exc_\n:
    push \n
    jmp exc_common
    .endm
    .macro EXCADDR n
    .quad exc_\n
    .endm
    .set i, 0
    .rept 32
    EXC %i
    .set i, i+1
    .endr
exc_common:
    mov rdi, [rsp]
    mov rsi, [rsp + 8]
    mov rdx, [rsp + 16]
    and rsp, -16
    call {exc}
    .global irq_stub
irq_stub:
    push rax
    lock inc qword ptr [rip + IRQ_COUNT]
    mov rax, 0xfee000b0
    mov dword ptr [rax], 0
    pop rax
    iretq
    .global spurious_stub
spurious_stub:
    iretq
    .data
    .global exc_table
exc_table:
    .set i, 0
    .rept 32
    EXCADDR %i
    .set i, i+1
    .endr
    .text
    "#,
    exc = sym exception,
);

extern "C" {
    static exc_table: [u64; 32];
    fn irq_stub();
    fn spurious_stub();
}

extern "C" fn exception(vector: u64, a: u64, b: u64) -> ! {
    crate::println!(
        "test-guest: CPU exception {} (stack words {:#x} {:#x})",
        vector,
        a,
        b
    );
    crate::println!("0 passed, 1 failed");
    crate::hw::power_off()
}

pub fn set_gate(v: usize, handler: u64, cs: u16) {
    // SAFETY: single-threaded set-up before interrupts are enabled.
    unsafe {
        IDT.0[v] = Gate {
            off_lo: handler as u16,
            sel: cs,
            ist: 0,
            attr: 0x8e,
            off_mid: (handler >> 16) as u16,
            off_hi: (handler >> 32) as u32,
            zero: 0,
        };
    }
}

/// Points every gate at code segment `cs` (after a new GDT moved the kernel's code segment).
pub fn set_code_selector(cs: u16) {
    // SAFETY: single-threaded, interrupts off; each gate is a plain store.
    unsafe {
        for g in IDT.0.iter_mut() {
            g.sel = cs;
        }
    }
}

pub fn init() {
    let cs: u16;
    // SAFETY: reading CS has no side effects.
    unsafe { core::arch::asm!("mov {0:x}, cs", out(reg) cs) };
    for v in 0..32 {
        // SAFETY: exc_table is a 32-entry table of stub addresses in .data.
        let h = unsafe {
            core::ptr::read_volatile(core::ptr::addr_of!(exc_table).cast::<u64>().add(v))
        };
        set_gate(v, h, cs);
    }
    for v in 32..255 {
        set_gate(v, irq_stub as *const () as u64, cs);
    }
    set_gate(255, spurious_stub as *const () as u64, cs);
    #[repr(C, packed)]
    struct Idtr {
        limit: u16,
        base: u64,
    }
    // SAFETY: IDT is static; lidt only reads the descriptor.
    unsafe {
        let idtr = Idtr {
            limit: (256 * 16 - 1) as u16,
            base: core::ptr::addr_of!(IDT) as u64,
        };
        core::arch::asm!("lidt [{0}]", in(reg) &idtr);
    }
    // The 8259s: KVM routes GSIs 0-15 to them as well as to the IOAPIC, so remap them away
    // from the exception vectors (ICW1-4) and mask every line, as Linux does with an IOAPIC.
    for (port, base, cascade) in [(0x20u16, 0x20u8, 4u8), (0xa0, 0x28, 2)] {
        crate::hw::outb(port, 0x11);
        crate::hw::outb(port + 1, base);
        crate::hw::outb(port + 1, cascade);
        crate::hw::outb(port + 1, 0x01);
        crate::hw::outb(port + 1, 0xff);
    }
    // Local APIC: software-enable with spurious vector 0xff, accept every priority.
    crate::hw::mmio_write32(LAPIC + 0xf0, 0x1ff);
    crate::hw::mmio_write32(LAPIC + 0x80, 0);
}

/// Routes `gsi` to this CPU (APIC ID 0) as an edge-triggered, active-high vector.
pub fn route(gsi: u32) {
    let vector = u32::from(IRQ_BASE) + gsi;
    crate::hw::mmio_write32(IOAPIC, 0x10 + 2 * gsi);
    crate::hw::mmio_write32(IOAPIC + 0x10, vector);
    crate::hw::mmio_write32(IOAPIC, 0x11 + 2 * gsi);
    crate::hw::mmio_write32(IOAPIC + 0x10, 0);
}

/// Masks every IOAPIC pin but `gsi`, which is routed as by [`route`], and takes any interrupt
/// already pending at the local APIC (a late completion that arrived with interrupts off): the
/// next interrupt counted is then `gsi`'s.
pub fn route_only(gsi: u32) {
    for pin in 0..24u32 {
        if pin != gsi {
            crate::hw::mmio_write32(IOAPIC, 0x10 + 2 * pin);
            crate::hw::mmio_write32(IOAPIC + 0x10, 1 << 16);
        }
    }
    // Interrupts the local APIC holds (its IRR) are taken one by one; they only arrive at the
    // next exit, so `hlt` for each.
    let pending = || (0..8u64).any(|i| crate::hw::mmio_read32(LAPIC + 0x200 + 0x10 * i) != 0);
    while pending() {
        let c = count();
        wait_until(|| count() > c);
    }
    route(gsi);
}

pub fn count() -> u64 {
    IRQ_COUNT.load(Ordering::SeqCst)
}

/// Sleeps with interrupts enabled until `cond` holds; checks with interrupts off, so a completion
/// interrupt arriving between the check and `hlt` still wakes us (`sti` shadows `hlt`).
pub fn wait_until(mut cond: impl FnMut() -> bool) {
    while !cond() {
        // SAFETY: no `nostack`: the interrupt frame lands below rsp, so the compiler keeps no red
        // zone data live here; the handler saves what it touches.
        unsafe { core::arch::asm!("sti", "hlt", "cli") };
    }
}
