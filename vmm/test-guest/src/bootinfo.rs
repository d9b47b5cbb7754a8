//! What the VMM hands the guest at entry, read the way a kernel reads it: from the zero page
//! (`boot_params`) after the Linux 64-bit entry, or from `hvm_start_info` after the PVH entry.
//! Either way the guest learns its command line, the ACPI RSDP, the memory map and the
//! initramfs (the zero page's `ramdisk_image`, or PVH module 0).

/// Which entry the VMM used.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// Linux's 64-bit boot protocol: `rsi` held the zero page.
    Linux64,
    /// PVH: `ebx` held `hvm_start_info`, the 32-bit stub switched to long mode.
    Pvh,
}

/// `hvm_start_info.magic` (xen/include/public/arch-x86/hvm/start_info.h).
pub const PVH_MAGIC: u32 = 0x336e_c578;
/// Memory-map type of usable RAM (e820 and PVH alike).
pub const MEM_RAM: u32 = 1;

/// The boot information, located but not yet trusted: `check` judges it.
pub struct BootInfo {
    pub protocol: Protocol,
    /// Address of the zero page or `hvm_start_info`.
    pub addr: u64,
    pub cmdline: &'static str,
    pub rsdp: u64,
    /// First memory-map entry, its stride and how many there are.
    memmap: u64,
    stride: u64,
    pub memmap_entries: u32,
    /// (address, size) of the initramfs.
    pub initrd: Option<(u64, u64)>,
    /// PVH only: `magic` and `version` as found.
    pub pvh_magic: u32,
    pub pvh_version: u32,
}

fn read<T: Copy>(addr: u64) -> T {
    // SAFETY: the VMM put the boot structures in identity-mapped RAM; reads are unaligned-safe
    // (the zero page's e820 entries are 20 bytes apart).
    unsafe { core::ptr::read_unaligned(addr as *const T) }
}

fn c_str(addr: u64) -> &'static str {
    if addr == 0 || addr >= 0x1_0000_0000 {
        return "";
    }
    let base = addr as *const u8;
    let mut len = 0;
    // SAFETY: identity-mapped RAM below 4 GiB; at most 4 KiB is scanned for the NUL.
    unsafe {
        while len < 4096 && *base.add(len) != 0 {
            len += 1;
        }
        core::str::from_utf8(core::slice::from_raw_parts(base, len)).unwrap_or("")
    }
}

impl BootInfo {
    /// Reads the boot information at `addr` for `protocol`.
    pub fn read(protocol: Protocol, addr: u64) -> BootInfo {
        match protocol {
            Protocol::Linux64 => {
                // boot_params: acpi_rsdp_addr 0x070, e820_entries 0x1e8, hdr.ramdisk_image
                // 0x218, hdr.ramdisk_size 0x21c, hdr.cmd_line_ptr 0x228, e820_table 0x2d0.
                let image: u32 = read(addr + 0x218);
                let size: u32 = read(addr + 0x21c);
                BootInfo {
                    protocol,
                    addr,
                    cmdline: c_str(u64::from(read::<u32>(addr + 0x228))),
                    rsdp: read(addr + 0x70),
                    memmap: addr + 0x2d0,
                    stride: 20,
                    memmap_entries: u32::from(read::<u8>(addr + 0x1e8)).min(128),
                    initrd: (size != 0).then_some((u64::from(image), u64::from(size))),
                    pvh_magic: 0,
                    pvh_version: 0,
                }
            }
            Protocol::Pvh => {
                // hvm_start_info: magic 0, version 4, nr_modules 12, modlist_paddr 16,
                // cmdline_paddr 24, rsdp_paddr 32, memmap_paddr 40, memmap_entries 48 (v1).
                let version: u32 = read(addr + 4);
                let nr_modules: u32 = read(addr + 12);
                let modlist: u64 = read(addr + 16);
                let initrd = (nr_modules > 0 && modlist != 0)
                    .then(|| (read::<u64>(modlist), read::<u64>(modlist + 8)));
                let (memmap, entries) = if version >= 1 {
                    (read(addr + 40), read::<u32>(addr + 48).min(1024))
                } else {
                    (0, 0)
                };
                BootInfo {
                    protocol,
                    addr,
                    cmdline: c_str(read(addr + 24)),
                    rsdp: read(addr + 32),
                    memmap,
                    stride: 24,
                    memmap_entries: entries,
                    initrd,
                    pvh_magic: read(addr),
                    pvh_version: version,
                }
            }
        }
    }

    /// Memory-map entry `i`: (address, size, type).
    pub fn mem_entry(&self, i: u32) -> (u64, u64, u32) {
        let e = self.memmap + u64::from(i) * self.stride;
        (read(e), read(e + 8), read(e + 16))
    }

    /// Whether `[start, end)` lies inside one RAM entry.
    pub fn in_ram(&self, start: u64, end: u64) -> bool {
        (0..self.memmap_entries).any(|i| {
            let (a, s, t) = self.mem_entry(i);
            t == MEM_RAM && a <= start && end <= a.saturating_add(s)
        })
    }

    /// Prints what the guest was given and checks it is sound.
    pub fn check(&self, tally: &mut crate::Tally) {
        match self.protocol {
            Protocol::Pvh => {
                crate::println!(
                    "test-guest: booted via PVH (hvm_start_info at {:#x}, version {})",
                    self.addr,
                    self.pvh_version
                );
                tally.check(
                    "boot: hvm_start_info magic and version 1",
                    self.pvh_magic == PVH_MAGIC && self.pvh_version >= 1,
                );
            }
            Protocol::Linux64 => crate::println!(
                "test-guest: booted via the Linux 64-bit entry (zero page at {:#x})",
                self.addr
            ),
        }
        let mut ram = 0u64;
        for i in 0..self.memmap_entries {
            let (_, size, kind) = self.mem_entry(i);
            if kind == MEM_RAM {
                ram = ram.saturating_add(size);
            }
        }
        crate::println!(
            "test-guest: memory map: {} entries, {} KiB RAM",
            self.memmap_entries,
            ram / 1024
        );
        extern "C" {
            static __image_start: u8;
            static __bss_end: u8;
        }
        // Linker-script symbols: only their addresses are taken.
        let (start, end) = (
            core::ptr::addr_of!(__image_start) as u64,
            core::ptr::addr_of!(__bss_end) as u64,
        );
        tally.check(
            "boot: the memory map's RAM holds the guest image",
            self.in_ram(start, end),
        );
        if let Some((addr, size)) = self.initrd {
            let ok = self.in_ram(addr, addr.saturating_add(size));
            tally.check("boot: the initramfs lies in RAM", ok);
            if ok {
                crate::println!(
                    "test-guest: initramfs: {} bytes at {:#x}, fnv1a {:#018x}",
                    size,
                    addr,
                    fnv1a(addr, size)
                );
            }
        }
    }
}

/// FNV-1a over guest memory, which the test recomputes over the file it passed.
fn fnv1a(addr: u64, size: u64) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for i in 0..size {
        h ^= u64::from(read::<u8>(addr + i));
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}
