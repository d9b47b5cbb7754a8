//! Guest memory and the Linux x86-64 boot protocol: kernel, initramfs and command line into
//! memory, the zero page with its e820 map, and the long-mode CPU state (GDT, identity page
//! tables, registers) the 64-bit entry point expects.

use std::fs::File;
use std::path::{Path, PathBuf};

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs};
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::{self, BzImage, Elf, KernelLoader};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

use crate::layout::*;

/// Errors while building the guest's initial state.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The guest memory could not be mapped.
    #[error("cannot allocate {size} bytes of guest memory: {source}")]
    Memory {
        /// Requested size.
        size: u64,
        /// Cause.
        source: vm_memory::mmap::FromRangesError,
    },
    /// The kernel file could not be opened or read.
    #[error("{path}: {source}")]
    KernelFile {
        /// The file.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The kernel is neither a valid ELF vmlinux nor a bzImage.
    #[error("{path}: not a loadable kernel: {source}")]
    KernelLoad {
        /// The file.
        path: PathBuf,
        /// What linux-loader said.
        source: loader::Error,
    },
    /// The initramfs does not fit below the kernel's limit.
    #[error("{path}: initramfs of {size} bytes does not fit in guest memory below {limit:#x}")]
    InitrdTooBig {
        /// The file.
        path: PathBuf,
        /// Its size.
        size: u64,
        /// The highest address it may end at.
        limit: u64,
    },
    /// The initramfs could not be read.
    #[error("{path}: {source}")]
    InitrdFile {
        /// The file.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The command line is too long or contains a NUL.
    #[error("kernel command line: {0}")]
    Cmdline(String),
    /// Writing boot structures into guest memory failed.
    #[error("writing {what} into guest memory: {source}")]
    GuestWrite {
        /// Which structure.
        what: &'static str,
        /// Cause.
        source: vm_memory::GuestMemoryError,
    },
    /// The zero page could not be written.
    #[error("writing the zero page: {0}")]
    ZeroPage(linux_loader::configurator::Error),
}

type Result<T> = std::result::Result<T, Error>;

/// e820 entry types.
const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;

/// The guest's RAM regions: below the 32-bit hole, and the rest from 4 GiB.
pub fn ram_regions(size: u64) -> Vec<(GuestAddress, usize)> {
    let low = size.min(MMIO_HOLE_START);
    let mut v = vec![(GuestAddress(0), usize::try_from(low).unwrap_or(usize::MAX))];
    if size > low {
        v.push((
            GuestAddress(MMIO_HOLE_END),
            usize::try_from(size - low).unwrap_or(usize::MAX),
        ));
    }
    v
}

/// Maps anonymous guest memory of `size` bytes.
///
/// # Errors
/// When mmap fails.
pub fn create_memory(size: u64) -> Result<GuestMemoryMmap> {
    GuestMemoryMmap::from_ranges(&ram_regions(size))
        .map_err(|source| Error::Memory { size, source })
}

/// The e820 map the zero page carries.
pub fn e820_map(size: u64) -> Vec<boot_e820_entry> {
    let mut v = vec![
        boot_e820_entry {
            addr: 0,
            size: EBDA_START,
            r#type: E820_RAM,
        },
        boot_e820_entry {
            addr: EBDA_START,
            size: HIMEM_START - EBDA_START,
            r#type: E820_RESERVED,
        },
    ];
    let low = size.min(MMIO_HOLE_START);
    v.push(boot_e820_entry {
        addr: HIMEM_START,
        size: low - HIMEM_START,
        r#type: E820_RAM,
    });
    if size > low {
        v.push(boot_e820_entry {
            addr: MMIO_HOLE_END,
            size: size - low,
            r#type: E820_RAM,
        });
    }
    v
}

/// Where and how the boot CPU starts.
#[derive(Debug, Clone, Copy)]
pub struct EntryPoint {
    /// 64-bit entry address.
    pub entry: u64,
    /// Whether the kernel was a bzImage (entry = load address + 0x200).
    pub bzimage: bool,
}

/// Loads the kernel, initramfs and command line and writes the zero page.
///
/// # Errors
/// When a file cannot be read, the kernel is not loadable, or something does not fit.
pub fn load_kernel(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    kernel: &Path,
    initrd: Option<&Path>,
    cmdline: &str,
    rsdp: u64,
) -> Result<EntryPoint> {
    let mut f = File::open(kernel).map_err(|source| Error::KernelFile {
        path: kernel.to_owned(),
        source,
    })?;
    let mut magic = [0u8; 4];
    std::io::Read::read_exact(&mut f, &mut magic).map_err(|source| Error::KernelFile {
        path: kernel.to_owned(),
        source,
    })?;
    let kerr = |source| Error::KernelLoad {
        path: kernel.to_owned(),
        source,
    };
    let (entry, setup_header, bzimage) = if &magic == b"\x7fELF" {
        let r = Elf::load(mem, None, &mut f, Some(GuestAddress(HIMEM_START))).map_err(kerr)?;
        (r.kernel_load.raw_value(), None, false)
    } else {
        let r = BzImage::load(mem, None, &mut f, Some(GuestAddress(HIMEM_START))).map_err(kerr)?;
        (r.kernel_load.raw_value() + 0x200, r.setup_header, true)
    };

    let mut params = boot_params::default();
    match setup_header {
        Some(h) => params.hdr = h,
        None => {
            // What a bzImage's header would say, for an ELF vmlinux.
            params.hdr.boot_flag = 0xaa55;
            params.hdr.header = 0x5372_6448; // "HdrS"
            params.hdr.kernel_alignment = 0x0100_0000;
        }
    }
    params.hdr.type_of_loader = 0xff;
    params.hdr.loadflags |= 0x01; // LOADED_HIGH

    // Command line.
    if cmdline.len() >= CMDLINE_MAX_SIZE {
        return Err(Error::Cmdline(format!(
            "{} bytes; at most {} fit",
            cmdline.len(),
            CMDLINE_MAX_SIZE - 1
        )));
    }
    if cmdline.contains('\0') {
        return Err(Error::Cmdline("contains a NUL byte".into()));
    }
    let mut bytes = cmdline.as_bytes().to_vec();
    bytes.push(0);
    mem.write_slice(&bytes, GuestAddress(CMDLINE_START))
        .map_err(|source| Error::GuestWrite {
            what: "the command line",
            source,
        })?;
    params.hdr.cmd_line_ptr = u32::try_from(CMDLINE_START).unwrap_or(0);
    params.hdr.cmdline_size = u32::try_from(bytes.len()).unwrap_or(0);

    // Initramfs: as high as the kernel allows, page-aligned.
    if let Some(path) = initrd {
        let data = std::fs::read(path).map_err(|source| Error::InitrdFile {
            path: path.to_owned(),
            source,
        })?;
        let max = if params.hdr.initrd_addr_max == 0 {
            0x37ff_ffff
        } else {
            u64::from(params.hdr.initrd_addr_max)
        };
        let top = mem_size.min(MMIO_HOLE_START).min(max + 1);
        let size = data.len() as u64;
        let too_big = || Error::InitrdTooBig {
            path: path.to_owned(),
            size,
            limit: top,
        };
        let addr = top.checked_sub(size).ok_or_else(too_big)? & !0xfff;
        if addr < HIMEM_START {
            return Err(too_big());
        }
        mem.write_slice(&data, GuestAddress(addr))
            .map_err(|source| Error::GuestWrite {
                what: "the initramfs",
                source,
            })?;
        params.hdr.ramdisk_image = u32::try_from(addr).map_err(|_| too_big())?;
        params.hdr.ramdisk_size = u32::try_from(size).map_err(|_| too_big())?;
    }

    let e820 = e820_map(mem_size);
    for (i, e) in e820.iter().enumerate() {
        params.e820_table[i] = *e;
    }
    params.e820_entries = u8::try_from(e820.len()).unwrap_or(0);
    params.acpi_rsdp_addr = rsdp;

    LinuxBootConfigurator::write_bootparams::<GuestMemoryMmap>(
        &BootParams::new::<boot_params>(&params, GuestAddress(ZERO_PAGE_START)),
        mem,
    )
    .map_err(Error::ZeroPage)?;
    Ok(EntryPoint { entry, bzimage })
}

/// A GDT entry from flags, base and limit (the layout in the Intel SDM, vol. 3, 3.4.5).
pub fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((u64::from(base) & 0xff00_0000) << (56 - 24))
        | ((u64::from(flags) & 0x0000_f0ff) << 40)
        | ((u64::from(limit) & 0x000f_0000) << (48 - 16))
        | ((u64::from(base) & 0x00ff_ffff) << 16)
        | (u64::from(limit) & 0x0000_ffff)
}

/// The KVM segment a GDT entry describes, for selector `index * 8`.
pub fn segment_from_gdt(entry: u64, index: u8) -> kvm_segment {
    let bit = |n: u32| u8::from((entry >> n) & 1 == 1);
    let g = bit(55);
    let raw_limit =
        u32::try_from(((entry & 0x000f_0000_0000_0000) >> 32) | (entry & 0xffff)).unwrap_or(0);
    let limit = if g == 1 {
        (raw_limit << 12) | 0xfff
    } else {
        raw_limit
    };
    let present = bit(47);
    kvm_segment {
        base: ((entry & 0xff00_0000_0000_0000) >> 32) | ((entry & 0x0000_00ff_ffff_0000) >> 16),
        limit,
        selector: u16::from(index) * 8,
        type_: u8::try_from((entry >> 40) & 0xf).unwrap_or(0),
        present,
        dpl: u8::try_from((entry >> 45) & 0x3).unwrap_or(0),
        db: bit(54),
        s: bit(44),
        l: bit(53),
        g,
        avl: bit(52),
        unusable: u8::from(present == 0),
        padding: 0,
    }
}

/// The boot GDT: null, 64-bit code (0x08), data (0x10), TSS (0x18).
pub fn boot_gdt() -> [u64; 4] {
    [
        gdt_entry(0, 0, 0),
        gdt_entry(0xa09b, 0, 0xfffff),
        gdt_entry(0xc093, 0, 0xfffff),
        gdt_entry(0x808b, 0, 0xfffff),
    ]
}

const X86_CR0_PE: u64 = 1;
const X86_CR0_MP: u64 = 1 << 1;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_NE: u64 = 1 << 5;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const X86_CR4_OSFXSR: u64 = 1 << 9;
const X86_CR4_OSXMMEXCPT: u64 = 1 << 10;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// Writes the GDT and identity page tables for the first 4 GiB (2 MiB pages, so that the
/// IOAPIC, local APIC and virtio-mmio windows are reachable before the guest builds its own).
///
/// # Errors
/// When guest memory cannot be written.
pub fn write_boot_tables(mem: &GuestMemoryMmap) -> Result<()> {
    let gw = |source| Error::GuestWrite {
        what: "the boot page tables",
        source,
    };
    for (i, e) in boot_gdt().iter().enumerate() {
        mem.write_obj(*e, GuestAddress(GDT_START + 8 * i as u64))
            .map_err(gw)?;
    }
    let pdpt = PML4_START + 0x1000;
    let pd = PML4_START + 0x2000;
    mem.write_obj(pdpt | 0x3, GuestAddress(PML4_START))
        .map_err(gw)?;
    for i in 0..4u64 {
        mem.write_obj((pd + i * 0x1000) | 0x3, GuestAddress(pdpt + i * 8))
            .map_err(gw)?;
    }
    for i in 0..2048u64 {
        // Present, writable, 2 MiB page.
        mem.write_obj((i << 21) | 0x83, GuestAddress(pd + i * 8))
            .map_err(gw)?;
    }
    Ok(())
}

/// Special registers for 64-bit entry, starting from the vCPU's current ones.
pub fn long_mode_sregs(mut sregs: kvm_sregs) -> kvm_sregs {
    let gdt = boot_gdt();
    let code = segment_from_gdt(gdt[1], 1);
    let data = segment_from_gdt(gdt[2], 2);
    let tss = segment_from_gdt(gdt[3], 3);
    sregs.gdt.base = GDT_START;
    sregs.gdt.limit = u16::try_from(gdt.len() * 8 - 1).unwrap_or(0);
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    sregs.cr0 = X86_CR0_PE | X86_CR0_MP | X86_CR0_ET | X86_CR0_NE | X86_CR0_PG;
    sregs.cr3 = PML4_START;
    sregs.cr4 = X86_CR4_PAE | X86_CR4_OSFXSR | X86_CR4_OSXMMEXCPT;
    sregs.efer = EFER_LME | EFER_LMA;
    sregs
}

/// General registers for the 64-bit entry: rsi points at the zero page.
pub fn entry_regs(entry: u64) -> kvm_regs {
    kvm_regs {
        rflags: 0x2,
        rip: entry,
        rsp: BOOT_STACK_POINTER,
        rbp: BOOT_STACK_POINTER,
        rsi: ZERO_PAGE_START,
        ..Default::default()
    }
}

/// x87 and SSE state after reset.
pub fn initial_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_entry_code64_round_trips_to_segment() {
        let s = segment_from_gdt(gdt_entry(0xa09b, 0, 0xfffff), 1);
        assert_eq!(s.selector, 8);
        assert_eq!((s.l, s.db, s.present, s.s, s.type_), (1, 0, 1, 1, 0xb));
        assert_eq!(s.limit, 0xffff_ffff);
        assert_eq!(s.base, 0);
    }

    #[test]
    fn e820_splits_around_the_hole() {
        let m = e820_map(4 << 30);
        let ram: u64 = m
            .iter()
            .filter(|e| e.r#type == E820_RAM)
            .map(|e| e.size)
            .sum();
        assert_eq!(ram, (4 << 30) - (HIMEM_START - EBDA_START));
        assert!(m
            .iter()
            .any(|e| e.addr == MMIO_HOLE_END && e.size == 1 << 30));
        assert_eq!(ram_regions(1 << 30).len(), 1);
        assert_eq!(ram_regions(4 << 30).len(), 2);
    }

    #[test]
    fn page_tables_identity_map_4gib() {
        let mem = create_memory(64 << 20).unwrap();
        write_boot_tables(&mem).unwrap();
        let pde: u64 = mem
            .read_obj(GuestAddress(PML4_START + 0x2000 + 8 * 2047))
            .unwrap();
        assert_eq!(pde, (2047 << 21) | 0x83);
    }
}
