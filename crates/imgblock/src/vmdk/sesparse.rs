//! ESXi's space-efficient sparse extents (`SESPARSE`, createType `seSparse`), the default
//! snapshot format on VMFS 6. VMware has not published the format; what is checked here follows
//! what qemu's block/vmdk.c reads, and as strictly.
//!
//! An extent file, all offsets and sizes in 512-byte sectors, little-endian u64 fields:
//! ```text
//! const header (sector 0): 0 magic 0xcafebabe  8 version 0x200000001  16 capacity
//!   24 grainSize (8)  32 grainTableSize (64)  40 flags (0)  48..80 reserved (0)
//!   80 volatileHeader offset,size  96 journalHeader  112 journal  128 grainDirectory
//!   144 grainTables  160 freeBitmap  176 backmap  192 grains  (each: offset, size)
//!   208..512 padding (0)
//! volatile header: 0 magic 0xcafecafe  8 freeGTNumber  16 nextTxnSeqNumber
//!   24 replayJournal (0 when clean)  32..512 padding (0)
//! grain directory entry: 0 (no table), or 0x10000000_<table index, u32>
//! grain table (4096 entries, 32 KiB), entry by top nibble:
//!   0x0 unallocated (whole entry 0; read from the parent)  0x1 unmapped  0x2 zero
//!   0x3 allocated: grain index = bits 48..60 | bits 0..48 << 12, data at
//!       grains + index * grainSize
//! ```
//! The journal, free bitmap and backmap are only needed to write, which this driver does not.

use super::sparse::SECTOR;
use super::{Error, MAX_GD_BYTES};

/// Const header magic.
pub const CONST_MAGIC: u64 = 0xcafe_babe;
/// Volatile header magic.
pub const VOLATILE_MAGIC: u64 = 0xcafe_cafe;
/// The only const header version ESXi writes.
pub const VERSION: u64 = 0x0000_0002_0000_0001;
/// Grain size in sectors (4 KiB), fixed.
pub const GRAIN_SECTORS: u64 = 8;
/// Grain size in bytes.
pub const GRAIN_BYTES: u64 = GRAIN_SECTORS * SECTOR;
/// Grain table size in sectors (32 KiB), fixed.
pub const GT_SECTORS: u64 = 64;
/// Grain table size in bytes.
pub const GT_BYTES: u64 = GT_SECTORS * SECTOR;
/// Entries in a grain table: one table covers 16 MiB of the disk.
pub const GTES: u64 = GT_BYTES / 8;
/// Largest capacity: 64 TiB in sectors (ESXi's limit for seSparse disks is just under it).
/// Its grain directory is 4 Mi entries, 32 MiB, which [`MAX_GD_BYTES`] allows.
pub const MAX_CAPACITY_SECTORS: u64 = 1 << 37;
/// The top half of a grain directory entry that names a grain table.
pub const GD_TABLE_TAG: u64 = 0x1000_0000;
/// Grain table entry type: unmapped by the guest (SCSI UNMAP), reads as zeroes.
pub const GTE_UNMAPPED: u64 = 0x1;
/// Grain table entry type: zeroed, reads as zeroes.
pub const GTE_ZERO: u64 = 0x2;
/// Grain table entry type: allocated.
pub const GTE_ALLOCATED: u64 = 0x3;
/// Bytes of the const header and of the volatile header.
pub const HEADER_BYTES: usize = 512;

/// Byte offsets of the const header fields (for error messages and the serializer).
mod off {
    pub const MAGIC: u64 = 0;
    pub const VERSION: u64 = 8;
    pub const GRAIN_SIZE: u64 = 24;
    pub const GT_SIZE: u64 = 32;
    pub const FLAGS: u64 = 40;
    pub const RESERVED: u64 = 48;
    pub const PAD: u64 = 208;
    pub const VOL_REPLAY: u64 = 24;
    pub const VOL_PAD: u64 = 32;
}

/// One area of the extent file: start and length in sectors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Area {
    /// Start sector.
    pub offset: u64,
    /// Length in sectors.
    pub size: u64,
}

impl Area {
    /// Start and end in bytes, or `None` when they overflow.
    fn bytes(self) -> Option<(u64, u64)> {
        let end = self.offset.checked_add(self.size)?.checked_mul(SECTOR)?;
        Some((self.offset * SECTOR, end))
    }
}

/// The const header (raw form: fields as stored).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConstHeader {
    /// [`CONST_MAGIC`].
    pub magic: u64,
    /// [`VERSION`].
    pub version: u64,
    /// Extent size in sectors.
    pub capacity: u64,
    /// Grain size in sectors ([`GRAIN_SECTORS`]).
    pub grain_size: u64,
    /// Grain table size in sectors ([`GT_SECTORS`]).
    pub grain_table_size: u64,
    /// No flags are defined.
    pub flags: u64,
    /// Four reserved fields, zero.
    pub reserved: [u64; 4],
    /// The volatile header.
    pub volatile_header: Area,
    /// The journal header.
    pub journal_header: Area,
    /// The journal.
    pub journal: Area,
    /// The grain directory.
    pub grain_dir: Area,
    /// The grain tables.
    pub grain_tables: Area,
    /// The free bitmap (of grain tables and grains).
    pub free_bitmap: Area,
    /// The backmap (grain to guest grain).
    pub backmap: Area,
    /// The grains.
    pub grains: Area,
    /// Padding to the end of the sector, zero.
    pub pad: [u8; 304],
}

fn le64(b: &[u8; HEADER_BYTES], o: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[o..o + 8]);
    u64::from_le_bytes(a)
}

fn put64(b: &mut [u8; HEADER_BYTES], o: usize, v: u64) {
    b[o..o + 8].copy_from_slice(&v.to_le_bytes());
}

/// The first non-zero byte of `pad`, as a byte offset in the file (`base` is the pad's).
fn first_nonzero(pad: &[u8], base: u64) -> Option<u64> {
    pad.iter().position(|&b| b != 0).map(|i| base + i as u64)
}

impl ConstHeader {
    /// The areas in the order they are stored.
    fn areas(&self) -> [(&'static str, Area); 8] {
        [
            ("volatile header", self.volatile_header),
            ("journal header", self.journal_header),
            ("journal", self.journal),
            ("grain directory", self.grain_dir),
            ("grain tables", self.grain_tables),
            ("free bitmap", self.free_bitmap),
            ("backmap", self.backmap),
            ("grains", self.grains),
        ]
    }

    /// Decodes the const header sector.
    pub fn parse(b: &[u8; HEADER_BYTES]) -> ConstHeader {
        let area = |o: usize| Area {
            offset: le64(b, o),
            size: le64(b, o + 8),
        };
        let mut pad = [0u8; 304];
        pad.copy_from_slice(&b[208..]);
        ConstHeader {
            magic: le64(b, 0),
            version: le64(b, 8),
            capacity: le64(b, 16),
            grain_size: le64(b, 24),
            grain_table_size: le64(b, 32),
            flags: le64(b, 40),
            reserved: [le64(b, 48), le64(b, 56), le64(b, 64), le64(b, 72)],
            volatile_header: area(80),
            journal_header: area(96),
            journal: area(112),
            grain_dir: area(128),
            grain_tables: area(144),
            free_bitmap: area(160),
            backmap: area(176),
            grains: area(192),
            pad,
        }
    }

    /// Encodes the const header sector.
    pub fn to_bytes(&self) -> [u8; HEADER_BYTES] {
        let mut b = [0u8; HEADER_BYTES];
        put64(&mut b, 0, self.magic);
        put64(&mut b, 8, self.version);
        put64(&mut b, 16, self.capacity);
        put64(&mut b, 24, self.grain_size);
        put64(&mut b, 32, self.grain_table_size);
        put64(&mut b, 40, self.flags);
        for (i, r) in self.reserved.iter().enumerate() {
            put64(&mut b, 48 + i * 8, *r);
        }
        for (i, (_, a)) in self.areas().iter().enumerate() {
            put64(&mut b, 80 + i * 16, a.offset);
            put64(&mut b, 88 + i * 16, a.size);
        }
        b[208..].copy_from_slice(&self.pad);
        b
    }

    /// Checks the header against the one layout ESXi writes and against the file's length
    /// (validated form): afterwards the table arithmetic cannot overflow.
    ///
    /// # Errors
    /// The specific [`Error`] for the first field found wrong, in qemu's order.
    pub fn validate(&self, file_len: u64) -> Result<Layout, Error> {
        if self.magic != CONST_MAGIC {
            return Err(Error::SeSparseConstMagic {
                offset: off::MAGIC,
                found: self.magic,
            });
        }
        if self.version != VERSION {
            return Err(Error::SeSparseVersion {
                offset: off::VERSION,
                found: self.version,
            });
        }
        if self.grain_size != GRAIN_SECTORS {
            return Err(Error::SeSparseGrainSize {
                offset: off::GRAIN_SIZE,
                found: self.grain_size,
            });
        }
        if self.grain_table_size != GT_SECTORS {
            return Err(Error::SeSparseGtSize {
                offset: off::GT_SIZE,
                found: self.grain_table_size,
            });
        }
        if self.flags != 0 {
            return Err(Error::SeSparseFlags {
                offset: off::FLAGS,
                found: self.flags,
            });
        }
        if let Some(i) = self.reserved.iter().position(|&r| r != 0) {
            return Err(Error::SeSparseReserved {
                offset: off::RESERVED + i as u64 * 8,
            });
        }
        if let Some(o) = first_nonzero(&self.pad, off::PAD) {
            return Err(Error::SeSparseReserved { offset: o });
        }
        if self.capacity > MAX_CAPACITY_SECTORS {
            return Err(Error::BadCapacity(self.capacity));
        }
        // The directory is read whole: its size is capped before anything is allocated.
        if self.grain_dir.size > MAX_GD_BYTES / SECTOR {
            return Err(Error::GdTooLarge(
                self.grain_dir.size.saturating_mul(SECTOR / 8),
            ));
        }
        for (what, a) in self.areas() {
            if a.bytes().is_none() {
                return Err(Error::OutOfFile {
                    what,
                    sector: a.offset,
                });
            }
        }
        // What is read at open must be in the file; grain tables and grains are checked
        // when they are used (an ESXi extent grows as grains are allocated).
        let within = |a: Area, min_bytes: u64| {
            a.bytes()
                .is_some_and(|(s, e)| e.max(s.saturating_add(min_bytes)) <= file_len)
        };
        if !within(self.volatile_header, HEADER_BYTES as u64) {
            return Err(Error::OutOfFile {
                what: "volatile header",
                sector: self.volatile_header.offset,
            });
        }
        let gd_entries = self.grain_dir.size * (SECTOR / 8);
        let needed = self.capacity.div_ceil(GRAIN_SECTORS * GTES);
        if gd_entries < needed {
            return Err(Error::SeSparseGdTooSmall {
                entries: gd_entries,
                needed,
            });
        }
        let gd_read = Area {
            offset: self.grain_dir.offset,
            size: 0,
        };
        if !within(gd_read, needed * 8) {
            return Err(Error::OutOfFile {
                what: "grain directory",
                sector: self.grain_dir.offset,
            });
        }
        Ok(Layout {
            capacity: self.capacity,
            volatile_offset: self.volatile_header.offset * SECTOR,
            gd_offset: self.grain_dir.offset * SECTOR,
            gd_entries: needed,
            gt_offset: self.grain_tables.offset * SECTOR,
            gt_count: self.grain_tables.size / GT_SECTORS,
            grains_offset: self.grains.offset * SECTOR,
        })
    }
}

/// The checked layout of an extent, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// Extent size in sectors.
    pub capacity: u64,
    /// Volatile header.
    pub volatile_offset: u64,
    /// Grain directory.
    pub gd_offset: u64,
    /// Directory entries that cover the capacity (those read).
    pub gd_entries: u64,
    /// Grain tables area.
    pub gt_offset: u64,
    /// Grain tables the area holds.
    pub gt_count: u64,
    /// Grains area.
    pub grains_offset: u64,
}

impl Layout {
    /// Byte offset of grain table `index` (below [`Layout::gt_count`]).
    pub fn table_offset(&self, index: u64) -> Option<u64> {
        if index >= self.gt_count {
            return None;
        }
        index
            .checked_mul(GT_BYTES)
            .and_then(|o| o.checked_add(self.gt_offset))
    }

    /// Byte offset of grain `index` in the grains area.
    pub fn grain_offset(&self, index: u64) -> Option<u64> {
        index
            .checked_mul(GRAIN_BYTES)
            .and_then(|o| o.checked_add(self.grains_offset))
    }
}

/// The volatile header (raw form).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolatileHeader {
    /// [`VOLATILE_MAGIC`].
    pub magic: u64,
    /// The next free grain table.
    pub free_gt_number: u64,
    /// The next journal transaction.
    pub next_txn_seq_number: u64,
    /// Non-zero while the journal holds updates not yet applied.
    pub replay_journal: u64,
    /// Padding, zero.
    pub pad: [u8; 480],
}

impl VolatileHeader {
    /// Decodes the volatile header sector.
    pub fn parse(b: &[u8; HEADER_BYTES]) -> VolatileHeader {
        let mut pad = [0u8; 480];
        pad.copy_from_slice(&b[32..]);
        VolatileHeader {
            magic: le64(b, 0),
            free_gt_number: le64(b, 8),
            next_txn_seq_number: le64(b, 16),
            replay_journal: le64(b, 24),
            pad,
        }
    }

    /// Encodes the volatile header sector.
    pub fn to_bytes(&self) -> [u8; HEADER_BYTES] {
        let mut b = [0u8; HEADER_BYTES];
        put64(&mut b, 0, self.magic);
        put64(&mut b, 8, self.free_gt_number);
        put64(&mut b, 16, self.next_txn_seq_number);
        put64(&mut b, 24, self.replay_journal);
        b[32..].copy_from_slice(&self.pad);
        b
    }

    /// Checks the header; `at` is its byte offset in the file, for messages.
    ///
    /// # Errors
    /// [`Error::SeSparseVolatileMagic`], [`Error::SeSparseDirty`], [`Error::SeSparseReserved`].
    pub fn validate(&self, at: u64) -> Result<(), Error> {
        if self.magic != VOLATILE_MAGIC {
            return Err(Error::SeSparseVolatileMagic {
                offset: at,
                found: self.magic,
            });
        }
        if self.replay_journal != 0 {
            return Err(Error::SeSparseDirty {
                offset: at + off::VOL_REPLAY,
            });
        }
        if let Some(o) = first_nonzero(&self.pad, at + off::VOL_PAD) {
            return Err(Error::SeSparseReserved { offset: o });
        }
        Ok(())
    }
}

/// What a grain directory entry says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GdEntry {
    /// No grain table: the whole 16 MiB reads from the parent.
    Unallocated,
    /// Grain table number n in the grain tables area.
    Table(u64),
    /// An unknown type.
    Invalid,
}

impl GdEntry {
    /// Decodes an entry.
    pub fn decode(e: u64) -> GdEntry {
        if e == 0 {
            GdEntry::Unallocated
        } else if e >> 32 == GD_TABLE_TAG {
            GdEntry::Table(e & 0xffff_ffff)
        } else {
            GdEntry::Invalid
        }
    }

    /// Encodes an entry.
    pub fn encode(self) -> u64 {
        match self {
            GdEntry::Unallocated => 0,
            GdEntry::Table(n) => GD_TABLE_TAG << 32 | (n & 0xffff_ffff),
            GdEntry::Invalid => u64::MAX,
        }
    }
}

/// What a grain table entry says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gte {
    /// Not in this extent: read from the parent.
    Unallocated,
    /// Unmapped by the guest: zeroes.
    Unmapped,
    /// Zeroes.
    Zero,
    /// Grain number n of the grains area.
    Allocated(u64),
    /// An unknown type, or an unallocated entry with bits set.
    Invalid,
}

impl Gte {
    /// Decodes an entry.
    pub fn decode(e: u64) -> Gte {
        match e >> 60 {
            0 if e == 0 => Gte::Unallocated,
            GTE_UNMAPPED => Gte::Unmapped,
            GTE_ZERO => Gte::Zero,
            // The grain number is stored split: its low 12 bits in bits 48..60, the rest in
            // bits 0..48.
            GTE_ALLOCATED => Gte::Allocated((e >> 48) & 0xfff | (e & 0xffff_ffff_ffff) << 12),
            _ => Gte::Invalid,
        }
    }

    /// Encodes an entry (grain numbers above 2^60 do not fit and are cut).
    pub fn encode(self) -> u64 {
        match self {
            Gte::Unallocated => 0,
            Gte::Unmapped => GTE_UNMAPPED << 60,
            Gte::Zero => GTE_ZERO << 60,
            Gte::Allocated(n) => {
                GTE_ALLOCATED << 60 | (n & 0xfff) << 48 | (n >> 12) & 0xffff_ffff_ffff
            }
            Gte::Invalid => u64::MAX,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small extent's const header: 40 MiB, directory at sector 8, two grain tables at 16.
    fn header() -> ConstHeader {
        let a = |offset, size| Area { offset, size };
        ConstHeader {
            magic: CONST_MAGIC,
            version: VERSION,
            capacity: 81920,
            grain_size: 8,
            grain_table_size: 64,
            flags: 0,
            reserved: [0; 4],
            volatile_header: a(1, 1),
            journal_header: a(2, 2),
            journal: a(4, 4),
            grain_dir: a(8, 1),
            grain_tables: a(16, 128),
            free_bitmap: a(144, 1),
            backmap: a(145, 8),
            grains: a(160, 81920),
            pad: [0; 304],
        }
    }

    const FILE_LEN: u64 = 1 << 20;

    #[test]
    fn const_header_round_trips_and_has_spec_offsets() {
        let h = header();
        let b = h.to_bytes();
        assert_eq!(&b[..8], &0xcafe_babe_u64.to_le_bytes());
        assert_eq!(&b[8..16], &[1, 0, 0, 0, 2, 0, 0, 0]);
        assert_eq!(&b[128..136], &8u64.to_le_bytes(), "grain_dir_offset");
        assert_eq!(&b[192..200], &160u64.to_le_bytes(), "grains_offset");
        assert_eq!(ConstHeader::parse(&b), h);
        let l = h.validate(FILE_LEN).unwrap();
        assert_eq!(l.gd_entries, 3);
        assert_eq!(l.gt_count, 2);
        assert_eq!(l.grains_offset, 160 * 512);
        assert_eq!(l.table_offset(1), Some(80 * 512));
        assert_eq!(l.table_offset(2), None);
    }

    fn bad(f: impl FnOnce(&mut ConstHeader)) -> Error {
        let mut h = header();
        f(&mut h);
        h.validate(FILE_LEN).unwrap_err()
    }

    #[test]
    fn const_header_each_bad_field_gives_its_error() {
        assert!(matches!(
            bad(|h| h.magic = 0xcafe_bab0),
            Error::SeSparseConstMagic {
                offset: 0,
                found: 0xcafe_bab0
            }
        ));
        assert!(matches!(
            bad(|h| h.version = 0x1_0000_0001),
            Error::SeSparseVersion { offset: 8, .. }
        ));
        assert!(matches!(
            bad(|h| h.grain_size = 16),
            Error::SeSparseGrainSize {
                offset: 24,
                found: 16
            }
        ));
        assert!(matches!(
            bad(|h| h.grain_table_size = 32),
            Error::SeSparseGtSize {
                offset: 32,
                found: 32
            }
        ));
        assert!(matches!(
            bad(|h| h.flags = 1),
            Error::SeSparseFlags { offset: 40, .. }
        ));
        assert!(matches!(
            bad(|h| h.reserved[2] = 1),
            Error::SeSparseReserved { offset: 64 }
        ));
        assert!(matches!(
            bad(|h| h.pad[10] = 1),
            Error::SeSparseReserved { offset: 218 }
        ));
        assert!(matches!(
            bad(|h| h.capacity = MAX_CAPACITY_SECTORS + 1),
            Error::BadCapacity(_)
        ));
        assert!(matches!(
            bad(|h| h.grain_dir.size = u64::MAX / 2),
            Error::GdTooLarge(_)
        ));
        assert!(matches!(
            bad(|h| h.grains.offset = u64::MAX),
            Error::OutOfFile { what: "grains", .. }
        ));
        assert!(matches!(
            bad(|h| h.volatile_header.offset = FILE_LEN / 512),
            Error::OutOfFile {
                what: "volatile header",
                ..
            }
        ));
        assert!(matches!(
            bad(|h| h.grain_dir.offset = FILE_LEN / 512),
            Error::OutOfFile {
                what: "grain directory",
                ..
            }
        ));
        assert!(matches!(
            bad(|h| h.capacity = 64 * 32768 + 1),
            Error::SeSparseGdTooSmall {
                entries: 64,
                needed: 65
            }
        ));
    }

    #[test]
    fn volatile_header_round_trips_and_checks() {
        let v = VolatileHeader {
            magic: VOLATILE_MAGIC,
            free_gt_number: 2,
            next_txn_seq_number: 7,
            replay_journal: 0,
            pad: [0; 480],
        };
        assert_eq!(VolatileHeader::parse(&v.to_bytes()), v);
        v.validate(512).unwrap();
        let mut d = v.clone();
        d.replay_journal = 1;
        assert!(matches!(
            d.validate(512),
            Err(Error::SeSparseDirty { offset: 536 })
        ));
        let mut m = v.clone();
        m.magic = CONST_MAGIC;
        assert!(matches!(
            m.validate(512),
            Err(Error::SeSparseVolatileMagic { offset: 512, .. })
        ));
        let mut p = v;
        p.pad[479] = 1;
        assert!(matches!(
            p.validate(512),
            Err(Error::SeSparseReserved { offset: 1023 })
        ));
    }

    #[test]
    fn entries_decode_as_qemu_reads_them() {
        assert_eq!(GdEntry::decode(0), GdEntry::Unallocated);
        assert_eq!(GdEntry::decode(0x1000_0000_0000_0005), GdEntry::Table(5));
        assert_eq!(GdEntry::decode(0x2000_0000_0000_0005), GdEntry::Invalid);
        assert_eq!(GdEntry::decode(0x1000_0001_0000_0005), GdEntry::Invalid);
        assert_eq!(GdEntry::Table(5).encode(), 0x1000_0000_0000_0005);
        assert_eq!(Gte::decode(0), Gte::Unallocated);
        assert_eq!(Gte::decode(1), Gte::Invalid);
        assert_eq!(Gte::decode(0x1000_0000_0000_0000), Gte::Unmapped);
        assert_eq!(Gte::decode(0x2000_0000_0000_0000), Gte::Zero);
        assert_eq!(Gte::decode(0x4000_0000_0000_0000), Gte::Invalid);
        assert_eq!(Gte::decode(0xf000_0000_0000_0000), Gte::Invalid);
        // Grain 4097 = 0x1001: low 12 bits (1) at bit 48, the rest (1) at bit 0.
        assert_eq!(Gte::decode(0x3001_0000_0000_0001), Gte::Allocated(4097));
        for n in [0, 1, 4095, 4096, 4097, 0xabc_def0_1234] {
            assert_eq!(Gte::decode(Gte::Allocated(n).encode()), Gte::Allocated(n));
        }
    }
}
