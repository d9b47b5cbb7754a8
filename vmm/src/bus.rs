//! Port-I/O and MMIO dispatch: a sorted list of address ranges, each owned by a device.

use std::sync::{Arc, Mutex};

/// A device on a bus. `offset` is relative to the start of its range.
pub trait BusDevice: Send {
    /// Guest read of `data.len()` bytes.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Guest write.
    fn write(&mut self, offset: u64, data: &[u8]);
}

type Shared = Arc<Mutex<dyn BusDevice>>;

/// Errors when building a bus.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Two devices claim overlapping ranges.
    #[error("bus range {base:#x}+{len:#x} overlaps an existing device")]
    Overlap {
        /// Start.
        base: u64,
        /// Length.
        len: u64,
    },
}

/// A set of non-overlapping ranges.
#[derive(Default)]
pub struct Bus {
    ranges: Vec<(u64, u64, Shared)>,
}

impl Bus {
    /// Adds `dev` at `[base, base + len)`.
    ///
    /// # Errors
    /// When the range overlaps another or is empty.
    pub fn insert(&mut self, base: u64, len: u64, dev: Shared) -> Result<(), Error> {
        let end = base.checked_add(len).filter(|_| len > 0);
        let Some(end) = end else {
            return Err(Error::Overlap { base, len });
        };
        if self.ranges.iter().any(|(b, l, _)| base < b + l && *b < end) {
            return Err(Error::Overlap { base, len });
        }
        self.ranges.push((base, len, dev));
        self.ranges.sort_by_key(|r| r.0);
        Ok(())
    }

    fn find(&self, addr: u64) -> Option<(u64, &Shared)> {
        let i = self.ranges.partition_point(|r| r.0 <= addr);
        let (b, l, d) = self.ranges.get(i.checked_sub(1)?)?;
        (addr - b < *l).then_some((addr - b, d))
    }

    /// Dispatches a read; unclaimed addresses read as all ones (an empty ISA bus). Returns
    /// whether a device answered.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr) {
            Some((off, d)) => {
                d.lock().unwrap_or_else(|e| e.into_inner()).read(off, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    /// Dispatches a write; unclaimed addresses ignore it. Returns whether a device took it.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr) {
            Some((off, d)) => {
                d.lock().unwrap_or_else(|e| e.into_inner()).write(off, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo(u8);
    impl BusDevice for Echo {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(self.0 + u8::try_from(offset).unwrap());
        }
        fn write(&mut self, _offset: u64, data: &[u8]) {
            self.0 = data[0];
        }
    }

    #[test]
    fn bus_dispatches_by_range_and_rejects_overlap() {
        let mut bus = Bus::default();
        bus.insert(0x10, 8, Arc::new(Mutex::new(Echo(1)))).unwrap();
        bus.insert(0x20, 8, Arc::new(Mutex::new(Echo(5)))).unwrap();
        assert!(bus
            .insert(0x14, 0x10, Arc::new(Mutex::new(Echo(0))))
            .is_err());
        assert!(bus.insert(0x30, 0, Arc::new(Mutex::new(Echo(0)))).is_err());
        let mut b = [0u8; 1];
        assert!(bus.read(0x12, &mut b));
        assert_eq!(b[0], 3);
        assert!(!bus.read(0x18, &mut b));
        assert_eq!(b[0], 0xff);
        assert!(bus.write(0x27, &[9]));
        bus.read(0x20, &mut b);
        assert_eq!(b[0], 9);
    }
}
