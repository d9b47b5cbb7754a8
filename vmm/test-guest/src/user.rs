//! Ring 3 for the polled benchmark: a GDT with user segments and a TSS, identity page tables
//! for the first 4 GiB with the user bit set, and [`run`], which calls a closure at CPL 3 with
//! interrupts off and comes back through an invalid-opcode fault at a known address (this KVM
//! refuses `int n` from ring 3).
//!
//! A page-table-based KVM (no VT-x/AMD-V underneath) runs guest user code natively but has to
//! emulate guest supervisor code instruction by instruction; a driver loop that polls its
//! queue from ring 3 then costs what it costs on hardware, which is what a polled queue (Linux's
//! virtio-blk `poll_queues` under io_uring's IOPOLL) measures. Code run here must not touch
//! ports, `hlt` or print: any of those faults, and the fault ends the test.

use core::ptr::addr_of;

const KERNEL_CS: u16 = 0x08;
const KERNEL_DS: u16 = 0x10;
const USER_DS: u16 = 0x18 | 3;
const USER_CS: u16 = 0x20 | 3;
const TSS_SEL: u16 = 0x28;

#[repr(C, packed)]
struct Tss {
    _r0: u32,
    rsp0: u64,
    _rsp12: [u64; 2],
    _r1: u64,
    _ist: [u64; 7],
    _r2: u64,
    _r3: u16,
    iomap: u16,
}

static mut TSS: Tss = Tss {
    _r0: 0,
    rsp0: 0,
    _rsp12: [0; 2],
    _r1: 0,
    _ist: [0; 7],
    _r2: 0,
    _r3: 0,
    iomap: 104,
};

static mut GDT: [u64; 7] = [0; 7];

#[repr(C, align(4096))]
struct Table([u64; 512]);

static mut PML4: Table = Table([0; 512]);
static mut PDPT: Table = Table([0; 512]);
static mut PD: [Table; 4] = [const { Table([0; 512]) }; 4];

#[repr(C, align(16))]
struct Stack([u8; 64 << 10]);

static mut USER_STACK: Stack = Stack([0; 64 << 10]);
static mut ENTRY_STACK: Stack = Stack([0; 64 << 10]);

/// The kernel stack pointer `run` left from; the exit gate returns there.
#[no_mangle]
static mut USER_KERNEL_RSP: u64 = 0;

core::arch::global_asm!(
    r#"
    .text
    /* user_enter(arg = rdi, f = rsi, user stack top = rdx) */
    .global user_enter
user_enter:
    push rbx
    push rbp
    push r12
    push r13
    push r14
    push r15
    mov [rip + USER_KERNEL_RSP], rsp
    push {user_ds}
    push rdx
    push 0x2
    push {user_cs}
    lea rax, [rip + user_tramp]
    push rax
    iretq
user_tramp:
    call rsi
    .global user_exit_point
user_exit_point:
    ud2
    /* #UD: the way back from user_exit_point, any other one is a real exception. */
    .global user_ud
user_ud:
    push rax
    lea rax, [rip + user_exit_point]
    cmp [rsp + 8], rax
    pop rax
    je user_exit
    push 6
    jmp exc_common
user_exit:
    mov ax, {kernel_ds}
    mov ss, ax
    mov ds, ax
    mov es, ax
    mov rsp, [rip + USER_KERNEL_RSP]
    pop r15
    pop r14
    pop r13
    pop r12
    pop rbp
    pop rbx
    ret
    "#,
    user_ds = const USER_DS,
    user_cs = const USER_CS,
    kernel_ds = const KERNEL_DS,
);

extern "C" {
    fn user_enter(arg: *mut u8, f: extern "C" fn(*mut u8), stack_top: u64);
    fn user_ud();
}

/// Loads the GDT, TSS and page tables and points the IDT's gates at the new code segment.
/// Idempotent.
pub fn init() {
    static mut DONE: bool = false;
    // SAFETY: single-threaded guest; the tables are statics that live forever, and each is
    // fully written before the instruction that loads it.
    unsafe {
        if DONE {
            return;
        }
        DONE = true;
        let tss = addr_of!(TSS) as u64;
        TSS.rsp0 = addr_of!(ENTRY_STACK) as u64 + (64 << 10);
        GDT = [
            0,
            0x00af_9b00_0000_ffff, // kernel code, 64-bit
            0x00cf_9300_0000_ffff, // kernel data
            0x00cf_f300_0000_ffff, // user data, DPL 3
            0x00af_fb00_0000_ffff, // user code, 64-bit, DPL 3
            103 | (tss & 0xff_ffff) << 16 | 0x89 << 40 | (tss >> 24 & 0xff) << 56,
            tss >> 32,
        ];
        #[repr(C, packed)]
        struct Ptr {
            limit: u16,
            base: u64,
        }
        let gdtr = Ptr {
            limit: (7 * 8 - 1) as u16,
            base: addr_of!(GDT) as u64,
        };
        core::arch::asm!(
            "lgdt [{gdtr}]",
            "push {cs}",
            "lea {tmp}, [rip + 2f]",
            "push {tmp}",
            "retfq",
            "2:",
            "mov {tmp:e}, {ds}",
            "mov ss, {tmp:e}",
            "mov ds, {tmp:e}",
            "mov es, {tmp:e}",
            "mov {tmp:e}, {tss}",
            "ltr {tmp:x}",
            gdtr = in(reg) &gdtr,
            cs = const KERNEL_CS,
            ds = const KERNEL_DS,
            tss = const TSS_SEL,
            tmp = out(reg) _,
        );
        crate::irq::set_code_selector(KERNEL_CS);
        crate::irq::set_gate(6, user_ud as *const () as u64, KERNEL_CS);

        // Identity-map 4 GiB in 2 MiB pages, user-accessible (present, writable, user).
        for (i, pd) in PD.iter_mut().enumerate() {
            for (j, e) in pd.0.iter_mut().enumerate() {
                *e = (((i * 512 + j) as u64) << 21) | 0x87;
            }
            PDPT.0[i] = addr_of!(*pd) as u64 | 7;
        }
        PML4.0[0] = addr_of!(PDPT) as u64 | 7;
        core::arch::asm!("mov cr3, {0}", in(reg) addr_of!(PML4) as u64);
    }
}

/// Calls `f` at CPL 3 with interrupts off, on a stack of its own, and returns its result.
pub fn run<R>(mut f: impl FnMut() -> R) -> R {
    init();
    let mut result = None;
    let mut call = || result = Some(f());
    let mut dynf: &mut dyn FnMut() = &mut call;
    extern "C" fn tramp(arg: *mut u8) {
        // SAFETY: `arg` is the `&mut dyn FnMut()` below, alive for the whole call.
        let f = unsafe { &mut *arg.cast::<&mut dyn FnMut()>() };
        f();
    }
    // SAFETY: user_enter saves the callee-saved registers, and the exit gate restores them and
    // returns here; `dynf` outlives the call.
    unsafe {
        user_enter(
            core::ptr::addr_of_mut!(dynf).cast(),
            tramp,
            addr_of!(USER_STACK) as u64 + (64 << 10),
        );
    }
    match result {
        Some(r) => r,
        None => unreachable!("user::run: the closure did not return"),
    }
}
