//! ACPI tables: RSDP → XSDT → {FADT (hardware-reduced) → DSDT, MADT}. The DSDT describes COM1
//! (PNP0501) and each virtio-mmio device (LNRO0005), which is how a stock distribution kernel,
//! built without command-line virtio-mmio devices, finds its disks.

use acpi_tables::aml;
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::Aml;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::layout::*;

const OEM_ID: [u8; 6] = *b"IMGVMM";
const OEM_TABLE: [u8; 8] = *b"IMGVMM  ";

/// One virtio-mmio device as the tables describe it.
#[derive(Debug, Clone, Copy)]
pub struct MmioDevice {
    /// Register window base.
    pub base: u64,
    /// Window size.
    pub size: u64,
    /// Interrupt (GSI, routed through the IOAPIC).
    pub gsi: u32,
}

/// Errors writing the tables.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The tables outgrew their area below 1 MiB.
    #[error("ACPI tables of {0} bytes do not fit in the {ACPI_MAX_SIZE} bytes reserved")]
    TooBig(u64),
    /// Guest memory write failed.
    #[error("writing ACPI tables: {0}")]
    Write(#[from] vm_memory::GuestMemoryError),
}

/// The bytes an ACPI object serialises to.
fn as_bytes(a: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    a.to_aml_bytes(&mut v);
    v
}

/// The DSDT body (AML) for COM1, `_S5_` and the virtio-mmio devices.
pub fn dsdt(devices: &[MmioDevice]) -> Sdt {
    let mut body: Vec<u8> = Vec::new();
    // \_S5_: the sleep type for soft-off; the kernel writes it to the sleep control register.
    aml::Name::new("_S5_".into(), &aml::Package::new(vec![&S5_SLEEP_TYPE])).to_aml_bytes(&mut body);

    let com1_io = aml::IO::new(0x3f8, 0x3f8, 0, 8);
    let com1_irq = aml::Interrupt::new(true, true, false, false, SERIAL_GSI);
    let com1_crs = aml::ResourceTemplate::new(vec![&com1_io, &com1_irq]);
    let hid = aml::EISAName::new("PNP0501");
    let com1_hid = aml::Name::new("_HID".into(), &hid);
    let com1_uid = aml::Name::new("_UID".into(), &aml::ZERO);
    let com1_crs_name = aml::Name::new("_CRS".into(), &com1_crs);
    let com1 = aml::Device::new("COM1".into(), vec![&com1_hid, &com1_uid, &com1_crs_name]);

    let names: Vec<String> = (0..devices.len()).map(|i| format!("VR{i:02X}")).collect();
    let mems: Vec<aml::Memory32Fixed> = devices
        .iter()
        .map(|d| {
            aml::Memory32Fixed::new(
                true,
                u32::try_from(d.base).unwrap_or(0),
                u32::try_from(d.size).unwrap_or(0),
            )
        })
        .collect();
    let irqs: Vec<aml::Interrupt> = devices
        .iter()
        .map(|d| aml::Interrupt::new(true, true, false, false, d.gsi))
        .collect();
    let crss: Vec<aml::ResourceTemplate> = mems
        .iter()
        .zip(&irqs)
        .map(|(m, i)| aml::ResourceTemplate::new(vec![m, i]))
        .collect();
    let uids: Vec<u32> = (0..devices.len())
        .map(|i| u32::try_from(i).unwrap_or(0))
        .collect();
    let hid_names: Vec<aml::Name> = (0..devices.len())
        .map(|_| aml::Name::new("_HID".into(), &"LNRO0005"))
        .collect();
    let uid_names: Vec<aml::Name> = uids
        .iter()
        .map(|u| aml::Name::new("_UID".into(), u))
        .collect();
    let crs_names: Vec<aml::Name> = crss
        .iter()
        .map(|c| aml::Name::new("_CRS".into(), c))
        .collect();
    let devs: Vec<aml::Device> = (0..devices.len())
        .map(|i| {
            aml::Device::new(
                names[i].as_str().into(),
                vec![&hid_names[i], &uid_names[i], &crs_names[i]],
            )
        })
        .collect();
    // The power button (PNP0C0C), pressed through the Generic Event Device (ACPI0013): its
    // interrupt makes the OS call _EVT with the GSI, which notifies the button (0x80: pressed),
    // and the OS shuts down as on a real machine's button.
    let pwrb_hid = aml::EISAName::new("PNP0C0C");
    let pwrb_hid_name = aml::Name::new("_HID".into(), &pwrb_hid);
    let pwrb_uid = aml::Name::new("_UID".into(), &aml::ZERO);
    let pwrb = aml::Device::new("PWRB".into(), vec![&pwrb_hid_name, &pwrb_uid]);
    let ged_hid = aml::Name::new("_HID".into(), &"ACPI0013");
    let ged_uid = aml::Name::new("_UID".into(), &aml::ZERO);
    let ged_irq = aml::Interrupt::new(true, true, false, false, GED_GSI);
    let ged_crs = aml::ResourceTemplate::new(vec![&ged_irq]);
    let ged_crs_name = aml::Name::new("_CRS".into(), &ged_crs);
    let pwrb_path: aml::Path = "\\_SB_.PWRB".into();
    let pressed: u8 = 0x80;
    let notify = aml::Notify::new(&pwrb_path, &pressed);
    let arg0 = aml::Arg(0);
    let is_ged = aml::Equal::new(&arg0, &GED_GSI);
    let when = aml::If::new(&is_ged, vec![&notify]);
    let evt = aml::Method::new("_EVT".into(), 1, true, vec![&when]);
    let ged = aml::Device::new("GED_".into(), vec![&ged_hid, &ged_uid, &ged_crs_name, &evt]);
    let mut children: Vec<&dyn Aml> = vec![&com1, &pwrb, &ged];
    for d in &devs {
        children.push(d);
    }
    aml::Scope::new("\\_SB_".into(), children).to_aml_bytes(&mut body);

    let mut sdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE, 1);
    sdt.append_slice(&body);
    sdt
}

/// The MADT: one enabled local APIC per vCPU, the IOAPIC, and ISA IRQ 0 → GSI 2.
pub fn madt(cpus: u8) -> Sdt {
    let mut sdt = Sdt::new(*b"APIC", 44, 4, OEM_ID, OEM_TABLE, 1);
    sdt.write_u32(36, u32::try_from(LAPIC_START).unwrap_or(0));
    sdt.write_u32(40, 1); // PCAT_COMPAT: the in-kernel irqchip has 8259s.
    for id in 0..cpus {
        // Type 0, length 8: ACPI processor UID, APIC ID, flags (enabled).
        sdt.append_slice(&[0, 8, id, id, 1, 0, 0, 0]);
    }
    let mut ioapic = vec![1u8, 12, 0, 0];
    ioapic.extend_from_slice(&u32::try_from(IOAPIC_START).unwrap_or(0).to_le_bytes());
    ioapic.extend_from_slice(&0u32.to_le_bytes());
    sdt.append_slice(&ioapic);
    // Interrupt source override: bus 0 (ISA), IRQ 0 → GSI 2, flags conforming.
    let mut iso = vec![2u8, 10, 0, 0];
    iso.extend_from_slice(&2u32.to_le_bytes());
    iso.extend_from_slice(&0u16.to_le_bytes());
    sdt.append_slice(&iso);
    sdt
}

/// A hardware-reduced FADT pointing at the DSDT, with the sleep and reset registers.
pub fn fadt(dsdt_addr: u64) -> Vec<u8> {
    let port = |p: u16| {
        GAS::new(
            AddressSpace::SystemIo,
            8,
            0,
            AccessSize::ByteAccess,
            u64::from(p),
        )
    };
    let mut f = FADTBuilder::new(OEM_ID, OEM_TABLE, 1)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup)
        .dsdt_64(dsdt_addr);
    f.sleep_control_reg = port(ACPI_SLEEP_CONTROL_PORT);
    f.sleep_status_reg = port(ACPI_SLEEP_STATUS_PORT);
    f.reset_reg = port(ACPI_RESET_PORT);
    f.reset_value = ACPI_RESET_VALUE;
    as_bytes(&f.finalize())
}

/// Builds every table and writes them at [`ACPI_START`]; returns the RSDP's address.
///
/// # Errors
/// When the tables do not fit or memory cannot be written.
pub fn write_tables(mem: &GuestMemoryMmap, cpus: u8, devices: &[MmioDevice]) -> Result<u64, Error> {
    let rsdp_addr = ACPI_START;
    let mut next = ACPI_START + 64;
    let mut place = |bytes: &[u8]| -> Result<u64, Error> {
        let at = next;
        let end = at + bytes.len() as u64;
        if end > ACPI_START + ACPI_MAX_SIZE {
            return Err(Error::TooBig(end - ACPI_START));
        }
        mem.write_slice(bytes, GuestAddress(at))?;
        next = (end + 15) & !15;
        Ok(at)
    };
    let dsdt_addr = place(dsdt(devices).as_slice())?;
    let fadt_addr = place(&fadt(dsdt_addr))?;
    let madt_addr = place(madt(cpus).as_slice())?;
    let mut xsdt = Sdt::new(*b"XSDT", 36, 1, OEM_ID, OEM_TABLE, 1);
    for a in [fadt_addr, madt_addr] {
        xsdt.append_slice(&a.to_le_bytes());
    }
    let xsdt_addr = place(xsdt.as_slice())?;
    let rsdp = as_bytes(&Rsdp::new(OEM_ID, xsdt_addr));
    mem.write_slice(&rsdp, GuestAddress(rsdp_addr))?;
    Ok(rsdp_addr)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    fn devs() -> Vec<MmioDevice> {
        (0..3)
            .map(|i| MmioDevice {
                base: VIRTIO_MMIO_START + i * VIRTIO_MMIO_SIZE,
                size: VIRTIO_MMIO_SIZE,
                gsi: VIRTIO_GSI_START + u32::try_from(i).unwrap(),
            })
            .collect()
    }

    #[test]
    fn every_table_checksums_to_zero_with_correct_length() {
        let d = dsdt(&devs());
        let m = madt(4);
        let f = fadt(0x1234);
        for t in [d.as_slice(), m.as_slice(), &f[..]] {
            assert_eq!(sum(t), 0, "{:?}", &t[..4]);
            let len = u32::from_le_bytes(t[4..8].try_into().unwrap()) as usize;
            assert_eq!(len, t.len());
        }
        let r = as_bytes(&Rsdp::new(OEM_ID, 0x1000));
        assert_eq!(sum(&r[..20]), 0);
        assert_eq!(sum(&r), 0);
    }

    #[test]
    fn dsdt_names_each_virtio_device_and_com1() {
        let d = dsdt(&devs());
        let s = d.as_slice();
        let count = |n: &[u8]| s.windows(n.len()).filter(|w| *w == n).count();
        assert_eq!(count(b"LNRO0005"), 3);
        assert_eq!(count(b"_S5_"), 1);
        assert_eq!(count(&[0x41, 0xd0, 0x05, 0x01]), 1); // EISAID PNP0501
                                                         // The first device's window base appears as a Memory32Fixed descriptor.
        assert_eq!(
            count(&u32::try_from(VIRTIO_MMIO_START).unwrap().to_le_bytes()),
            1
        );
    }

    #[test]
    fn iasl_disassembles_the_dsdt_with_its_devices_and_power_button() {
        // ACPICA's own disassembler is the check that the AML is well formed: it must parse the
        // whole table and find every device and the _EVT method that presses the button.
        if std::process::Command::new("iasl")
            .arg("-v")
            .output()
            .is_err()
        {
            eprintln!("SKIPPED: iasl (acpica-tools) not installed; the DSDT is not disassembled");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let aml = dir.path().join("dsdt.aml");
        std::fs::write(&aml, dsdt(&devs()).as_slice()).unwrap();
        let out = std::process::Command::new("iasl")
            .arg("-d")
            .arg(&aml)
            .current_dir(dir.path())
            .output()
            .unwrap();
        let log = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{log}");
        let dsl = std::fs::read_to_string(dir.path().join("dsdt.dsl")).unwrap();
        for want in [
            "Device (COM1)",
            "EisaId (\"PNP0501\")",
            "Device (VR02)",
            "\"LNRO0005\"",
            "Device (PWRB)",
            "EisaId (\"PNP0C0C\")",
            "Device (GED)",
            "\"ACPI0013\"",
            "Method (_EVT, 1, Serialized)",
            "Notify (\\_SB.PWRB, 0x80)",
            &format!("If ((Arg0 == 0x{GED_GSI:02X}))"),
            &format!("0x{GED_GSI:08X},"),
        ] {
            assert!(dsl.contains(want), "no {want:?} in:\n{dsl}");
        }
        assert!(!log.contains("Error"), "{log}");
    }

    #[test]
    fn fadt_is_hardware_reduced_with_dsdt() {
        let f = fadt(0xe0040);
        let flags = u32::from_le_bytes(f[112..116].try_into().unwrap());
        assert_ne!(flags & (1 << 20), 0);
        assert_eq!(u64::from_le_bytes(f[140..148].try_into().unwrap()), 0xe0040);
    }

    #[test]
    fn madt_lists_cpus_and_ioapic() {
        let m = madt(3);
        let s = m.as_slice();
        let mut off = 44;
        let (mut cpus, mut ioapics) = (0, 0);
        while off < s.len() {
            match s[off] {
                0 => cpus += 1,
                1 => ioapics += 1,
                _ => {}
            }
            off += usize::from(s[off + 1]);
        }
        assert_eq!((cpus, ioapics), (3, 1));
    }

    #[test]
    fn tables_written_to_guest_memory_link_up() {
        let mem = crate::boot::create_memory(32 << 20).unwrap();
        let rsdp = write_tables(&mem, 2, &devs()).unwrap();
        let mut r = [0u8; 36];
        mem.read_slice(&mut r, GuestAddress(rsdp)).unwrap();
        assert_eq!(&r[..8], b"RSD PTR ");
        let xsdt = u64::from_le_bytes(r[24..32].try_into().unwrap());
        let mut h = [0u8; 4];
        mem.read_slice(&mut h, GuestAddress(xsdt)).unwrap();
        assert_eq!(&h, b"XSDT");
    }
}
