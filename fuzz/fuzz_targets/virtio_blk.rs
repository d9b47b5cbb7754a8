#![no_main]
//! virtio-blk request parsing over fuzzed descriptor chains in fuzzed guest memory: the device
//! must answer every chain (IOERR or UNSUPP for bad ones) without a panic or an access outside
//! guest memory or the disk.

use std::sync::Mutex;

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm::virtio::block::{handle_chain, Backend, BlockConfig};

const MEM: usize = 64 << 10;
const DISK: usize = 64 << 10;

/// A disk in memory that fails the fuzz run on any out-of-range access.
struct MemDisk(Mutex<Vec<u8>>);

impl MemDisk {
    fn range(&self, off: u64, len: u64) -> std::ops::Range<usize> {
        let end = off.checked_add(len).expect("request offset overflows");
        assert!(
            end <= DISK as u64,
            "device accessed the disk out of range: {off}+{len}"
        );
        usize::try_from(off).unwrap()..usize::try_from(end).unwrap()
    }
}

impl Backend for MemDisk {
    fn size(&self) -> u64 {
        DISK as u64
    }
    fn read_at(&self, buf: &mut [u8], off: u64) -> Result<(), String> {
        let r = self.range(off, buf.len() as u64);
        buf.copy_from_slice(&self.0.lock().unwrap()[r]);
        Ok(())
    }
    fn write_at(&self, buf: &[u8], off: u64) -> Result<(), String> {
        let r = self.range(off, buf.len() as u64);
        self.0.lock().unwrap()[r].copy_from_slice(buf);
        Ok(())
    }
    fn write_zeroes(&self, off: u64, len: u64, _unmap: bool) -> Result<(), String> {
        let r = self.range(off, len);
        self.0.lock().unwrap()[r].fill(0);
        Ok(())
    }
    fn discard(&self, off: u64, len: u64) -> Result<(), String> {
        self.range(off, len);
        Ok(())
    }
    fn flush(&self) -> Result<(), String> {
        Ok(())
    }
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    // Layout of the input: a flags byte (descriptor count - 1, read-only, detect-zeroes=unmap,
    // guest memory in two regions), up to 8 descriptors of 13 bytes (address, length,
    // device-writable), then guest memory contents.
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let n = usize::from(flags & 7) + 1;
    let (table, fill) = rest.split_at(rest.len().min(n * 13));
    let descs: Vec<(u64, u32, bool)> = table
        .chunks_exact(13)
        .map(|d| {
            let addr = u64::from_le_bytes(d[..8].try_into().unwrap());
            let len = u32::from_le_bytes(d[8..12].try_into().unwrap());
            // Mostly keep addresses inside guest memory so that requests get parsed deeply.
            let addr = if d[12] & 2 == 0 {
                addr % MEM as u64
            } else {
                addr
            };
            (addr, len, d[12] & 1 != 0)
        })
        .collect();
    // Two adjacent regions: a buffer across their boundary takes the bounce-buffer paths.
    let mem = if flags & 32 != 0 {
        let half = MEM / 2;
        GuestMemoryMmap::<()>::from_ranges(&[
            (GuestAddress(0), half),
            (GuestAddress(half as u64), half),
        ])
    } else {
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM)])
    }
    .unwrap();
    if !fill.is_empty() {
        let mut off = 0;
        while off < MEM {
            let n = fill.len().min(MEM - off);
            mem.write_slice(&fill[..n], GuestAddress(off as u64))
                .unwrap();
            off += n;
        }
    }
    let disk = MemDisk(Mutex::new(vec![0x5a; DISK]));
    let cfg = BlockConfig {
        readonly: flags & 8 != 0,
        cache: Default::default(),
        discard: Default::default(),
        detect_zeroes: if flags & 16 != 0 {
            vmm::cli::DetectZeroes::Unmap
        } else {
            Default::default()
        },
        serial: b"fuzz".to_vec(),
        // Requests on one chain are parsed the same whatever queue they came from.
        num_queues: 1,
    };
    let writable: u64 = descs.iter().filter(|d| d.2).map(|d| u64::from(d.1)).sum();
    let used = handle_chain(&mem, descs, &disk, &cfg, &mut Vec::new());
    assert!(
        u64::from(used) <= writable,
        "used length {used} exceeds the writable buffers"
    );
    if cfg.readonly {
        assert!(
            disk.0.lock().unwrap().iter().all(|&b| b == 0x5a),
            "a read-only disk was written"
        );
    }
});
