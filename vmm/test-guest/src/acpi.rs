//! Checks the ACPI tables the VMM built, the way a kernel reads them: the RSDP the boot
//! information names (the zero page's `acpi_rsdp_addr` or `hvm_start_info.rsdp_paddr`), checksums of every table, the FADT's DSDT, a `LNRO0005` device per
//! virtio-mmio disk, `_S5_`, and the MADT's local APICs and IOAPIC.

use crate::Tally;

fn bytes(addr: u64, len: usize) -> &'static [u8] {
    // SAFETY: the VMM placed the tables in identity-mapped guest RAM below 1 MiB.
    unsafe { core::slice::from_raw_parts(addr as *const u8, len) }
}

fn sum(b: &[u8]) -> u8 {
    b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from(u32_at(b, off)) | (u64::from(u32_at(b, off + 4)) << 32)
}

/// A whole table whose header checksum is good, or None.
fn table(addr: u64) -> Option<&'static [u8]> {
    if addr == 0 || addr >= 0x10_0000 {
        return None;
    }
    let len = u32_at(bytes(addr, 36), 4) as usize;
    if !(36..=65536).contains(&len) {
        return None;
    }
    let t = bytes(addr, len);
    if sum(t) == 0 {
        Some(t)
    } else {
        None
    }
}

fn count(hay: &[u8], needle: &[u8]) -> usize {
    hay.windows(needle.len()).filter(|w| *w == needle).count()
}

pub fn check(rsdp_addr: u64, ndev: usize, tally: &mut Tally) {
    if rsdp_addr == 0 || rsdp_addr >= 0x10_0000 {
        tally.check("acpi: RSDP address below 1 MiB", false);
        return;
    }
    let rsdp = bytes(rsdp_addr, 36);
    let rsdp_ok =
        rsdp_addr != 0 && &rsdp[0..8] == b"RSD PTR " && sum(&rsdp[..20]) == 0 && sum(rsdp) == 0;
    tally.check("acpi: RSDP signature and checksums", rsdp_ok);
    if !rsdp_ok {
        return;
    }
    let Some(xsdt) = table(u64_at(rsdp, 24)) else {
        tally.check("acpi: XSDT checksum", false);
        return;
    };
    tally.check("acpi: XSDT checksum", &xsdt[0..4] == b"XSDT");
    let mut fadt = None;
    let mut madt = None;
    let mut all_ok = true;
    for i in 0..(xsdt.len() - 36) / 8 {
        let addr = u64_at(xsdt, 36 + 8 * i);
        match table(addr) {
            Some(t) if &t[0..4] == b"FACP" => fadt = Some(t),
            Some(t) if &t[0..4] == b"APIC" => madt = Some(t),
            Some(_) => {}
            None => all_ok = false,
        }
    }
    tally.check("acpi: every XSDT table checksums", all_ok);
    let Some(fadt) = fadt else {
        tally.check("acpi: FADT present", false);
        return;
    };
    // HW_REDUCED_ACPI is bit 20 of the flags at offset 112; X_DSDT at 140.
    tally.check(
        "acpi: FADT is hardware-reduced",
        u32_at(fadt, 112) & (1 << 20) != 0,
    );
    let dsdt = table(u64_at(fadt, 140));
    tally.check("acpi: DSDT checksum", dsdt.is_some());
    if let Some(d) = dsdt {
        let n = count(d, b"LNRO0005");
        crate::println!(
            "test-guest: DSDT lists {} virtio-mmio devices, cmdline {}",
            n,
            ndev
        );
        tally.check(
            "acpi: DSDT has one LNRO0005 per virtio-mmio device",
            n == ndev,
        );
        tally.check(
            "acpi: DSDT has _S5_ and COM1 (PNP0501)",
            count(d, b"_S5_") == 1 && count(d, &[0x41, 0xd0, 0x05, 0x01]) == 1,
        );
    }
    match madt {
        Some(m) => {
            let (mut cpus, mut ioapics, mut off) = (0, 0, 44);
            while off + 2 <= m.len() {
                let (ty, len) = (m[off], usize::from(m[off + 1]));
                if len < 2 {
                    break;
                }
                if ty == 0 && m[off + 4] & 1 != 0 {
                    cpus += 1;
                }
                if ty == 1 {
                    ioapics += 1;
                }
                off += len;
            }
            crate::println!("test-guest: MADT: {} CPUs, {} IOAPIC", cpus, ioapics);
            tally.check(
                "acpi: MADT lists enabled CPUs and one IOAPIC",
                cpus >= 1 && ioapics == 1,
            );
        }
        None => tally.check("acpi: MADT present", false),
    }
}
