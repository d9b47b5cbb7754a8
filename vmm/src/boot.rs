//! Guest memory and the two x86-64 boot protocols: kernel, initramfs and command line into
//! memory; then either Linux's 64-bit boot protocol (the zero page with its e820 map, and the
//! long-mode CPU state: GDT, identity page tables, registers) or, for an ELF with a PVH note, the
//! PVH boot ABI (`hvm_start_info` with the module list and memory map, and 32-bit protected
//! mode with paging off). PVH is described at <https://xenbits.xen.org/docs/unstable/misc/pvh.html>.

use std::fs::File;
use std::path::{Path, PathBuf};

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs};
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info, XEN_HVM_START_MAGIC_VALUE,
};
use linux_loader::loader::elf::PvhBootCapability;
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
    /// The PVH `hvm_start_info`, module list or memory map could not be written.
    #[error("writing the PVH start_info: {0}")]
    StartInfo(linux_loader::configurator::Error),
    /// The memory map has more entries than its page at [`PVH_MEMMAP_START`] holds.
    #[error("PVH memory map of {0} entries does not fit below the zero page")]
    PvhMemmapTooLong(usize),
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

/// What the kernel file was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelFormat {
    /// An ELF vmlinux, loaded segment by segment at its physical addresses.
    Elf,
    /// A bzImage, whose protected-mode part is loaded at 1 MiB.
    BzImage,
}

/// How the boot CPU enters the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootProtocol {
    /// Linux's 64-bit boot protocol: long mode with identity-mapped page tables, the zero page
    /// (`boot_params`) in `rsi`.
    Linux64,
    /// The PVH boot protocol (Xen's x86/HVM direct boot ABI): 32-bit protected mode with paging
    /// off, `hvm_start_info` in `ebx`. Used when an ELF carries a `XEN_ELFNOTE_PHYS32_ENTRY` note.
    Pvh,
}

/// Where and how the boot CPU starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EntryPoint {
    /// Entry address: the 64-bit entry, or the PVH note's 32-bit entry.
    pub entry: u64,
    /// What the kernel file was.
    pub format: KernelFormat,
    /// The protocol the entry expects.
    pub protocol: BootProtocol,
}

impl std::fmt::Display for EntryPoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let format = match self.format {
            KernelFormat::Elf => "ELF",
            KernelFormat::BzImage => "bzImage",
        };
        let protocol = match self.protocol {
            BootProtocol::Linux64 => "64-bit entry, zero page",
            BootProtocol::Pvh => "PVH entry, hvm_start_info",
        };
        write!(f, "{format}, {protocol}")
    }
}

/// Highest initramfs address for kernels that do not say (the boot protocol's default for
/// `initrd_addr_max`), also used for PVH, whose ABI puts no limit below 4 GiB.
const DEFAULT_INITRD_ADDR_MAX: u64 = 0x37ff_ffff;

/// Loads the kernel, initramfs and command line, and writes what the kernel's entry reads: the
/// zero page for the 64-bit entry, or `hvm_start_info` with its module list and memory map when
/// an ELF offers a PVH entry (which is then the one used).
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
    let (entry, setup_header, format, pvh_entry) = if &magic == b"\x7fELF" {
        // No load offset: a PVH kernel must sit at its link-time physical addresses, and
        // linux-loader only reports the PVH note when no offset is asked for.
        let r = Elf::load(mem, None, &mut f, Some(GuestAddress(HIMEM_START))).map_err(kerr)?;
        let pvh = match r.pvh_boot_cap {
            PvhBootCapability::PvhEntryPresent(a) => Some(a.raw_value()),
            PvhBootCapability::PvhEntryNotPresent | PvhBootCapability::PvhEntryIgnored => None,
        };
        (r.kernel_load.raw_value(), None, KernelFormat::Elf, pvh)
    } else {
        let r = BzImage::load(mem, None, &mut f, Some(GuestAddress(HIMEM_START))).map_err(kerr)?;
        (
            r.kernel_load.raw_value() + 0x200,
            r.setup_header,
            KernelFormat::BzImage,
            None,
        )
    };

    let cmdline_size = write_cmdline(mem, cmdline)?;
    let initrd_max = setup_header
        .map(|h| h.initrd_addr_max)
        .filter(|&m| m != 0)
        .map_or(DEFAULT_INITRD_ADDR_MAX, u64::from);
    let initrd = match initrd {
        Some(path) => Some(load_initrd(mem, mem_size, path, initrd_max)?),
        None => None,
    };

    if let Some(entry) = pvh_entry {
        write_pvh_start_info(mem, mem_size, initrd.map(|i| (i.addr, i.size)), rsdp)?;
        return Ok(EntryPoint {
            entry,
            format,
            protocol: BootProtocol::Pvh,
        });
    }

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
    params.hdr.cmd_line_ptr = u32::try_from(CMDLINE_START).unwrap_or(0);
    params.hdr.cmdline_size = cmdline_size;
    if let Some(i) = initrd {
        params.hdr.ramdisk_image = i.addr32;
        params.hdr.ramdisk_size = i.size32;
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
    Ok(EntryPoint {
        entry,
        format,
        protocol: BootProtocol::Linux64,
    })
}

/// Writes the NUL-terminated command line at [`CMDLINE_START`]; returns its size with the NUL.
fn write_cmdline(mem: &GuestMemoryMmap, cmdline: &str) -> Result<u32> {
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
    // At most CMDLINE_MAX_SIZE, checked above.
    Ok(u32::try_from(bytes.len()).unwrap_or(0))
}

/// Where the initramfs went.
#[derive(Debug, Clone, Copy)]
struct Initrd {
    addr: u64,
    size: u64,
    /// The same, as the zero page's 32-bit fields hold them.
    addr32: u32,
    size32: u32,
}

/// Loads the initramfs as high as `max` (the kernel's `initrd_addr_max`) and low RAM allow,
/// page-aligned.
fn load_initrd(mem: &GuestMemoryMmap, mem_size: u64, path: &Path, max: u64) -> Result<Initrd> {
    let data = std::fs::read(path).map_err(|source| Error::InitrdFile {
        path: path.to_owned(),
        source,
    })?;
    let top = mem_size.min(MMIO_HOLE_START).min(max.saturating_add(1));
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
    Ok(Initrd {
        addr,
        size,
        addr32: u32::try_from(addr).map_err(|_| too_big())?,
        size32: u32::try_from(size).map_err(|_| too_big())?,
    })
}

// The start_info, module list and memory map do not overlap each other or the zero page.
const _: () = assert!(
    PVH_START_INFO + std::mem::size_of::<hvm_start_info>() as u64 <= PVH_MODLIST_START
        && PVH_MODLIST_START + std::mem::size_of::<hvm_modlist_entry>() as u64 <= PVH_MEMMAP_START
        && PVH_MEMMAP_START
            + std::mem::size_of::<hvm_memmap_table_entry>() as u64 * PVH_MEMMAP_MAX_ENTRIES
            <= ZERO_PAGE_START
);

/// The PVH memory map: the same layout as the zero page's e820 map.
pub fn pvh_memmap(mem_size: u64) -> Vec<hvm_memmap_table_entry> {
    e820_map(mem_size)
        .iter()
        .map(|e| hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            // The PVH types are the e820 types (start_info.h: "E820 type").
            type_: e.r#type,
            reserved: 0,
        })
        .collect()
}

/// The `hvm_start_info` for a guest with the command line at [`CMDLINE_START`], `nr_modules`
/// modules at [`PVH_MODLIST_START`] and `memmap_entries` at [`PVH_MEMMAP_START`].
pub fn pvh_start_info(rsdp: u64, nr_modules: u32, memmap_entries: u32) -> hvm_start_info {
    hvm_start_info {
        magic: XEN_HVM_START_MAGIC_VALUE,
        // Version 1 adds the memory map, which a guest without Xen hypercalls needs.
        version: 1,
        flags: 0,
        nr_modules,
        modlist_paddr: if nr_modules == 0 {
            0
        } else {
            PVH_MODLIST_START
        },
        cmdline_paddr: CMDLINE_START,
        rsdp_paddr: rsdp,
        memmap_paddr: PVH_MEMMAP_START,
        memmap_entries,
        reserved: 0,
    }
}

/// Writes `hvm_start_info` at [`PVH_START_INFO`], the initramfs (`(address, size)`) as module 0
/// and the memory map.
///
/// # Errors
/// When the memory map does not fit its page or guest memory cannot be written.
pub fn write_pvh_start_info(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    initrd: Option<(u64, u64)>,
    rsdp: u64,
) -> Result<()> {
    let memmap = pvh_memmap(mem_size);
    let entries = u32::try_from(memmap.len())
        .ok()
        .filter(|&n| u64::from(n) <= PVH_MEMMAP_MAX_ENTRIES)
        .ok_or(Error::PvhMemmapTooLong(memmap.len()))?;
    let modules: Vec<hvm_modlist_entry> = initrd
        .map(|(paddr, size)| hvm_modlist_entry {
            paddr,
            size,
            cmdline_paddr: 0,
            reserved: 0,
        })
        .into_iter()
        .collect();
    let nr_modules = u32::try_from(modules.len()).unwrap_or(0);
    let info = pvh_start_info(rsdp, nr_modules, entries);
    let mut params = BootParams::new::<hvm_start_info>(&info, GuestAddress(PVH_START_INFO));
    params.set_sections::<hvm_memmap_table_entry>(&memmap, GuestAddress(PVH_MEMMAP_START));
    if !modules.is_empty() {
        params.set_modules::<hvm_modlist_entry>(&modules, GuestAddress(PVH_MODLIST_START));
    }
    PvhBootConfigurator::write_bootparams::<GuestMemoryMmap>(&params, mem).map_err(Error::StartInfo)
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

/// Selector of the PVH boot GDT's 32-bit code segment (Linux's `__BOOT_CS`).
pub const PVH_CODE_SELECTOR: u16 = 0x10;
/// Selector of the PVH boot GDT's data segment (Linux's `__BOOT_DS`).
pub const PVH_DATA_SELECTOR: u16 = 0x18;
/// Selector of the PVH boot GDT's TSS (Linux's `__BOOT_TSS`).
pub const PVH_TSS_SELECTOR: u16 = 0x20;

/// The PVH boot GDT, in the layout of Linux's boot GDT: null, unused, flat 4 GiB 32-bit code
/// ([`PVH_CODE_SELECTOR`]), flat 4 GiB data ([`PVH_DATA_SELECTOR`]) and a busy 32-bit TSS with
/// base 0 and limit 0x67 ([`PVH_TSS_SELECTOR`]), as the PVH ABI asks for `tr`.
pub fn pvh_gdt() -> [u64; 5] {
    [
        gdt_entry(0, 0, 0),
        gdt_entry(0, 0, 0),
        gdt_entry(0xc09b, 0, 0xfffff),
        gdt_entry(0xc093, 0, 0xfffff),
        gdt_entry(0x008b, 0, 0x67),
    ]
}

/// Writes the GDT the entry's segments come from and, for the 64-bit entry, identity page
/// tables for the first 4 GiB (2 MiB pages, so that the IOAPIC, local APIC and virtio-mmio
/// windows are reachable before the guest builds its own). A PVH entry runs with paging off
/// and builds its own tables.
///
/// # Errors
/// When guest memory cannot be written.
pub fn write_boot_tables(mem: &GuestMemoryMmap, protocol: BootProtocol) -> Result<()> {
    let gw = |source| Error::GuestWrite {
        what: "the boot page tables",
        source,
    };
    let gdt: &[u64] = match protocol {
        BootProtocol::Linux64 => &boot_gdt(),
        BootProtocol::Pvh => &pvh_gdt(),
    };
    for (i, e) in gdt.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(GDT_START + 8 * i as u64))
            .map_err(gw)?;
    }
    if protocol == BootProtocol::Pvh {
        return Ok(());
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

/// The boot CPU's special and general registers for `entry`, starting from its current
/// special registers.
pub fn boot_cpu_state(entry: &EntryPoint, sregs: kvm_sregs) -> (kvm_sregs, kvm_regs) {
    match entry.protocol {
        BootProtocol::Linux64 => (long_mode_sregs(sregs), entry_regs(entry.entry)),
        BootProtocol::Pvh => (pvh_sregs(sregs), pvh_regs(entry.entry)),
    }
}

/// The GDT at `GDT_START` loaded, no IDT, CS from entry `code` of `gdt`, every data segment
/// from the entry after it and TR from the one after that.
fn flat_segments(mut sregs: kvm_sregs, gdt: &[u64], code: u8) -> kvm_sregs {
    let entry = |i: u8| gdt.get(usize::from(i)).copied().unwrap_or(0);
    let data = segment_from_gdt(entry(code + 1), code + 1);
    sregs.gdt.base = GDT_START;
    sregs.gdt.limit = u16::try_from(gdt.len() * 8 - 1).unwrap_or(0);
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    sregs.cs = segment_from_gdt(entry(code), code);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment_from_gdt(entry(code + 2), code + 2);
    sregs
}

/// Special registers for the PVH entry (the ABI's machine state): 32-bit protected mode with
/// paging off (CR0.PE only, CR4 clear, EFER clear), flat 32-bit code and data segments, the
/// 32-bit TSS in `tr`.
pub fn pvh_sregs(sregs: kvm_sregs) -> kvm_sregs {
    let mut sregs = flat_segments(sregs, &pvh_gdt(), 2);
    sregs.cr0 = X86_CR0_PE;
    sregs.cr3 = 0;
    sregs.cr4 = 0;
    sregs.efer = 0;
    sregs
}

/// General registers for the PVH entry: `ebx` points at `hvm_start_info`; EFLAGS has only its
/// always-one bit (IF, TF and VM clear as the ABI asks); the stack is the kernel's business.
pub fn pvh_regs(entry: u64) -> kvm_regs {
    kvm_regs {
        rflags: 0x2,
        rip: entry,
        rbx: PVH_START_INFO,
        ..Default::default()
    }
}

/// Special registers for 64-bit entry, starting from the vCPU's current ones.
pub fn long_mode_sregs(sregs: kvm_sregs) -> kvm_sregs {
    let mut sregs = flat_segments(sregs, &boot_gdt(), 1);
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
        write_boot_tables(&mem, BootProtocol::Linux64).unwrap();
        let pde: u64 = mem
            .read_obj(GuestAddress(PML4_START + 0x2000 + 8 * 2047))
            .unwrap();
        assert_eq!(pde, (2047 << 21) | 0x83);
    }

    /// The ELF header's entry point (`e_entry`, offset 24).
    fn elf_entry(path: &str) -> u64 {
        let b = std::fs::read(path).unwrap();
        u64::from_le_bytes(b[24..32].try_into().unwrap())
    }

    fn initrd_file(len: usize) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().unwrap();
        let data: Vec<u8> = (0..len).map(|i| u8::try_from(i % 251).unwrap()).collect();
        std::fs::write(f.path(), data).unwrap();
        f
    }

    #[test]
    fn pvh_memmap_matches_e820_entry_for_entry() {
        for size in [64 << 20, 3 << 30, 6 << 30] {
            let e820 = e820_map(size);
            let pvh = pvh_memmap(size);
            assert_eq!(pvh.len(), e820.len());
            for (p, e) in pvh.iter().zip(&e820) {
                assert_eq!(
                    (p.addr, p.size, p.type_, p.reserved),
                    (e.addr, e.size, e.r#type, 0)
                );
            }
        }
        let m = pvh_memmap(6 << 30);
        assert_eq!(m.last().unwrap().addr, MMIO_HOLE_END);
        assert_eq!(m.last().unwrap().size, 3 << 30);
        assert!(m.len() as u64 <= PVH_MEMMAP_MAX_ENTRIES);
    }

    #[test]
    fn pvh_start_info_fields_follow_the_abi() {
        let si = pvh_start_info(0xe_0000, 1, 3);
        assert_eq!(si.magic, 0x336e_c578);
        assert_eq!(si.version, 1);
        assert_eq!(si.flags, 0);
        assert_eq!((si.nr_modules, si.modlist_paddr), (1, PVH_MODLIST_START));
        assert_eq!(si.cmdline_paddr, CMDLINE_START);
        assert_eq!(si.rsdp_paddr, 0xe_0000);
        assert_eq!((si.memmap_paddr, si.memmap_entries), (PVH_MEMMAP_START, 3));
        let none = pvh_start_info(0xe_0000, 0, 3);
        assert_eq!((none.nr_modules, none.modlist_paddr), (0, 0));
    }

    #[test]
    fn load_kernel_pvh_note_writes_start_info_module_and_memmap() {
        let mem_size = 64 << 20;
        let mem = create_memory(mem_size).unwrap();
        let initrd = initrd_file(10_001);
        let kernel = env!("VMM_TEST_GUEST_PVH");
        let e = load_kernel(
            &mem,
            mem_size,
            Path::new(kernel),
            Some(initrd.path()),
            "console=ttyS0 tg.x=1",
            0xe_0000,
        )
        .unwrap();
        assert_eq!(e.format, KernelFormat::Elf);
        assert_eq!(e.protocol, BootProtocol::Pvh);
        // The note's 32-bit entry, not the ELF's 64-bit one.
        assert_ne!(e.entry, elf_entry(kernel));
        assert!((HIMEM_START..1 << 32).contains(&e.entry));
        assert_eq!(e.to_string(), "ELF, PVH entry, hvm_start_info");

        let si: hvm_start_info = mem.read_obj(GuestAddress(PVH_START_INFO)).unwrap();
        assert_eq!(si, pvh_start_info(0xe_0000, 1, 3));
        let mut cmd = [0u8; 21];
        mem.read_slice(&mut cmd, GuestAddress(si.cmdline_paddr))
            .unwrap();
        assert_eq!(&cmd, b"console=ttyS0 tg.x=1\0");
        let m: hvm_modlist_entry = mem.read_obj(GuestAddress(si.modlist_paddr)).unwrap();
        assert_eq!(m.size, 10_001);
        assert_eq!(m.paddr % 4096, 0);
        assert!(m.paddr + m.size <= mem_size);
        assert_eq!(m.cmdline_paddr, 0);
        let mut data = vec![0u8; 10_001];
        mem.read_slice(&mut data, GuestAddress(m.paddr)).unwrap();
        assert_eq!(data, std::fs::read(initrd.path()).unwrap());
        for (i, want) in pvh_memmap(mem_size).iter().enumerate() {
            let got: hvm_memmap_table_entry = mem
                .read_obj(GuestAddress(si.memmap_paddr + 24 * i as u64))
                .unwrap();
            assert_eq!(got, *want);
        }
        // No zero page for a PVH entry.
        let zp: boot_params = mem.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap();
        assert_eq!({ zp.hdr.cmd_line_ptr }, 0);
    }

    #[test]
    fn load_kernel_pvh_without_initrd_lists_no_module() {
        let mem = create_memory(32 << 20).unwrap();
        let kernel = Path::new(env!("VMM_TEST_GUEST_PVH"));
        load_kernel(&mem, 32 << 20, kernel, None, "", 0xe_0000).unwrap();
        let si: hvm_start_info = mem.read_obj(GuestAddress(PVH_START_INFO)).unwrap();
        assert_eq!((si.nr_modules, si.modlist_paddr), (0, 0));
        assert_eq!(si.memmap_entries, 3);
    }

    #[test]
    fn load_kernel_elf_without_note_uses_64bit_entry_and_zero_page() {
        let mem_size = 64 << 20;
        let mem = create_memory(mem_size).unwrap();
        let initrd = initrd_file(5000);
        let kernel = env!("VMM_TEST_GUEST");
        let e = load_kernel(
            &mem,
            mem_size,
            Path::new(kernel),
            Some(initrd.path()),
            "console=ttyS0",
            0xe_0000,
        )
        .unwrap();
        assert_eq!(e.protocol, BootProtocol::Linux64);
        assert_eq!(e.entry, elf_entry(kernel));
        assert_eq!(e.to_string(), "ELF, 64-bit entry, zero page");
        let zp: boot_params = mem.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap();
        assert_eq!(u64::from(zp.hdr.cmd_line_ptr), CMDLINE_START);
        assert_eq!({ zp.hdr.ramdisk_size }, 5000);
        assert_eq!({ zp.acpi_rsdp_addr }, 0xe_0000);
        assert_eq!({ zp.e820_entries }, 3);
        let si: hvm_start_info = mem.read_obj(GuestAddress(PVH_START_INFO)).unwrap();
        assert_eq!(si.magic, 0, "no start_info for the 64-bit entry");
    }

    #[test]
    fn pvh_sregs_are_flat_protected_mode_with_paging_off() {
        let s = pvh_sregs(kvm_sregs::default());
        assert_eq!(s.cr0, X86_CR0_PE);
        assert_eq!((s.cr3, s.cr4, s.efer), (0, 0, 0));
        let cs = s.cs;
        assert_eq!(cs.selector, PVH_CODE_SELECTOR);
        assert_eq!((cs.base, cs.limit), (0, 0xffff_ffff));
        assert_eq!((cs.db, cs.l, cs.s, cs.present, cs.g), (1, 0, 1, 1, 1));
        assert_eq!(cs.type_, 0xb, "execute/read, accessed");
        for d in [s.ds, s.es, s.ss, s.fs, s.gs] {
            assert_eq!(d.selector, PVH_DATA_SELECTOR);
            assert_eq!((d.base, d.limit, d.db, d.type_), (0, 0xffff_ffff, 1, 0x3));
            assert_eq!(d.unusable, 0);
        }
        let tr = s.tr;
        assert_eq!(tr.selector, PVH_TSS_SELECTOR);
        assert_eq!(
            (tr.base, tr.limit, tr.type_, tr.s, tr.present),
            (0, 0x67, 0xb, 0, 1)
        );
        assert_eq!((s.gdt.base, s.gdt.limit), (GDT_START, 5 * 8 - 1));
    }

    #[test]
    fn pvh_regs_point_ebx_at_start_info() {
        let r = pvh_regs(0x20_5c9e);
        assert_eq!((r.rip, r.rbx, r.rflags), (0x20_5c9e, PVH_START_INFO, 0x2));
        assert_eq!((r.rsi, r.rsp), (0, 0));
    }

    #[test]
    fn boot_cpu_state_follows_the_protocol() {
        let mut e = EntryPoint {
            entry: 0x20_0000,
            format: KernelFormat::Elf,
            protocol: BootProtocol::Linux64,
        };
        let (s, r) = boot_cpu_state(&e, kvm_sregs::default());
        assert_eq!(s.efer, EFER_LME | EFER_LMA);
        assert_eq!((s.cs.l, s.cs.selector), (1, 8));
        assert_eq!((r.rip, r.rsi), (0x20_0000, ZERO_PAGE_START));
        e.protocol = BootProtocol::Pvh;
        let (s, r) = boot_cpu_state(&e, kvm_sregs::default());
        assert_eq!((s.efer, s.cr0), (0, X86_CR0_PE));
        assert_eq!((r.rip, r.rbx), (0x20_0000, PVH_START_INFO));
    }

    #[test]
    fn write_boot_tables_pvh_writes_linux_boot_gdt_and_no_page_tables() {
        let mem = create_memory(16 << 20).unwrap();
        write_boot_tables(&mem, BootProtocol::Pvh).unwrap();
        let at = |sel: u64| -> u64 { mem.read_obj(GuestAddress(GDT_START + sel)).unwrap() };
        assert_eq!(at(0x10), 0x00cf_9b00_0000_ffff);
        assert_eq!(at(0x18), 0x00cf_9300_0000_ffff);
        assert_eq!(at(0x20), 0x0000_8b00_0000_0067);
        let pml4: u64 = mem.read_obj(GuestAddress(PML4_START)).unwrap();
        assert_eq!(pml4, 0);
        write_boot_tables(&mem, BootProtocol::Linux64).unwrap();
        assert_eq!(at(0x08), 0x00af_9b00_0000_ffff);
    }
}
