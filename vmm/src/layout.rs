//! The guest-physical address map, shared by the boot code, ACPI tables and devices.
//!
//! ```text
//! 0x0000_0500  GDT                      0x0000_6000  PVH start_info, module list, memory map
//! 0x0000_7000  zero page (boot_params)
//! 0x0000_8ff0  initial stack top        0x0000_9000  PML4, PDPT, 4 x PD (identity map of 4 GiB)
//! 0x0002_0000  kernel command line      0x0009_fc00  EBDA (reserved to 1 MiB)
//! 0x000e_0000  ACPI tables (RSDP first) 0x0010_0000  kernel (bzImage) / ELF load addresses
//! RAM up to 3 GiB, then the 32-bit device hole: virtio-mmio at 0xd000_0000, IOAPIC 0xfec0_0000,
//! LAPIC 0xfee0_0000; RAM beyond 3 GiB continues at 4 GiB.
//! ```

/// The boot GDT: null, 64-bit code, data and TSS descriptors for the 64-bit entry; Linux's boot
/// GDT layout (32-bit code at 0x10, data at 0x18, TSS at 0x20) for the PVH entry.
pub const GDT_START: u64 = 0x500;
/// PVH `hvm_start_info` (56 bytes); the module list and memory map follow in the same page.
pub const PVH_START_INFO: u64 = 0x6000;
/// PVH module list (`hvm_modlist_entry`, 32 bytes each): the initramfs is module 0.
pub const PVH_MODLIST_START: u64 = 0x6040;
/// PVH memory map (`hvm_memmap_table_entry`, 24 bytes each), up to the zero page.
pub const PVH_MEMMAP_START: u64 = 0x6080;
/// Most PVH memory-map entries that fit between [`PVH_MEMMAP_START`] and the zero page.
pub const PVH_MEMMAP_MAX_ENTRIES: u64 = (ZERO_PAGE_START - PVH_MEMMAP_START) / 24;
/// The zero page.
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer for the boot CPU.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Page-map level 4 table; the PDPT and four page directories follow it page by page.
pub const PML4_START: u64 = 0x9000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x2_0000;
/// Most bytes of command line we pass (Linux's COMMAND_LINE_SIZE on x86).
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Extended BIOS data area: RAM below it is usable, from it to 1 MiB is reserved.
pub const EBDA_START: u64 = 0x9_fc00;
/// ACPI tables live in the reserved BIOS area where kernels also scan for the RSDP.
pub const ACPI_START: u64 = 0xe_0000;
/// Room for the ACPI tables.
pub const ACPI_MAX_SIZE: u64 = 0x2_0000;
/// Start of high memory: where kernels are loaded.
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the 32-bit device hole.
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
/// End of the 32-bit device hole.
pub const MMIO_HOLE_END: u64 = 0x1_0000_0000;
/// First virtio-mmio device; each takes [`VIRTIO_MMIO_SIZE`].
pub const VIRTIO_MMIO_START: u64 = 0xd000_0000;
/// Register window of one virtio-mmio device.
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// IOAPIC registers.
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// Local APIC registers.
pub const LAPIC_START: u64 = 0xfee0_0000;
/// GSI of COM1 (ISA IRQ 4).
pub const SERIAL_GSI: u32 = 4;
/// GSI of the first virtio-mmio device; the IOAPIC has 24 pins.
pub const VIRTIO_GSI_START: u32 = 5;
/// Most virtio-mmio devices (GSIs 5..=22).
pub const MAX_VIRTIO_DEVICES: usize = 18;
/// GSI of the ACPI Generic Event Device, whose event is the power button.
pub const GED_GSI: u32 = 23;
/// ACPI sleep control register (I/O port): SLP_TYP in bits 2..4, SLP_EN bit 5.
pub const ACPI_SLEEP_CONTROL_PORT: u16 = 0x600;
/// ACPI sleep status register.
pub const ACPI_SLEEP_STATUS_PORT: u16 = 0x601;
/// ACPI reset register: writing [`ACPI_RESET_VALUE`] reboots (here: ends the VMM).
pub const ACPI_RESET_PORT: u16 = 0x602;
/// Value the FADT tells the guest to write to the reset register.
pub const ACPI_RESET_VALUE: u8 = 1;
/// The S5 (soft-off) sleep type the DSDT's `_S5_` names.
pub const S5_SLEEP_TYPE: u8 = 5;
/// Where KVM's TSS lives on Intel (three pages, inside the hole, below the IOAPIC).
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;
