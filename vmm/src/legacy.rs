//! Legacy platform devices: the COM1 8250 UART (vm-superio), the ACPI sleep and reset
//! registers, and the i8042's reset line.

use std::io::Write;
use std::sync::mpsc::Sender;

use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;
use crate::console::RxRoom;
use crate::layout::{ACPI_RESET_VALUE, S5_SLEEP_TYPE};

/// Why the guest stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmExit {
    /// ACPI S5 or KVM_SYSTEM_EVENT_SHUTDOWN.
    PowerOff,
    /// ACPI reset register, i8042 reset, or KVM_SYSTEM_EVENT_RESET.
    Reset,
    /// Something went wrong: a triple fault, a KVM error.
    Error(String),
    /// SIGTERM, SIGINT or SIGHUP (the number) asked the VMM to stop.
    Signal(i32),
    /// The user typed the console's quit keys (`Ctrl-A x`).
    ConsoleQuit,
    /// `vm.shutdown` or `vmm.shutdown` on the API socket.
    ApiShutdown,
}

/// An irqfd as vm-superio's interrupt trigger.
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// COM1, and whether a failure to write its output has been reported (once: a closed pipe
/// fails every byte the guest writes).
pub struct SerialDevice(
    pub Serial<IrqTrigger, RxRoom, Box<dyn Write + Send>>,
    pub bool,
);

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let v = u8::try_from(offset).map(|o| self.0.read(o)).unwrap_or(0xff);
        data.fill(0);
        if let Some(b) = data.first_mut() {
            *b = v;
        }
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Ok(o), Some(&v)) = (u8::try_from(offset), data.first()) {
            if let Err(e) = self.0.write(o, v) {
                if !self.1 {
                    self.1 = true;
                    crate::report!("vmm: serial: {e:?} (further output failures not reported)");
                }
            }
            // The guest's console output should appear as it is written.
            if o == 0 {
                let _ = self.0.writer_mut().flush();
            }
        }
    }
}

/// ACPI sleep control (offset 0), sleep status (1) and reset (2) registers.
pub struct AcpiPm(pub Sender<VmExit>);

impl BusDevice for AcpiPm {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&v) = data.first() else { return };
        match offset {
            // SLP_EN (bit 5) with SLP_TYP (bits 2..4) = S5.
            0 if v & (1 << 5) != 0 && (v >> 2) & 7 == S5_SLEEP_TYPE => {
                let _ = self.0.send(VmExit::PowerOff);
            }
            2 if v == ACPI_RESET_VALUE => {
                let _ = self.0.send(VmExit::Reset);
            }
            _ => {}
        }
    }
}

/// Just enough of the i8042 for Linux's `reboot=k`: command 0xfe on port 0x64 pulses reset.
pub struct I8042(pub Sender<VmExit>);

impl BusDevice for I8042 {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == 4 && data.first() == Some(&0xfe) {
            let _ = self.0.send(VmExit::Reset);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acpi_s5_and_reset_end_the_vm() {
        let (tx, rx) = std::sync::mpsc::channel();
        let mut pm = AcpiPm(tx.clone());
        pm.write(0, &[(S5_SLEEP_TYPE << 2) | (1 << 5)]);
        assert_eq!(rx.try_recv().unwrap(), VmExit::PowerOff);
        pm.write(0, &[S5_SLEEP_TYPE << 2]); // no SLP_EN
        assert!(rx.try_recv().is_err());
        pm.write(2, &[ACPI_RESET_VALUE]);
        assert_eq!(rx.try_recv().unwrap(), VmExit::Reset);
        let mut kbd = I8042(tx);
        kbd.write(4, &[0xfe]);
        assert_eq!(rx.try_recv().unwrap(), VmExit::Reset);
    }
}
