//! Persistent dirty bitmaps (qcow2.rst, "Bitmaps extension", "Bitmap directory", "Bitmap
//! table"): the header extension, the directory, and the tables of the bitmaps that track which
//! guest ranges changed since a backup.
//!
//! ```text
//!  header extension --> bitmap directory --> one bitmap table per bitmap --> data clusters
//!  (count, where)       (name, flags,        (one entry per cluster of     (one bit per
//!                        granularity, table)  bits; 0 = clean, 1 = dirty)   granule, LSB first)
//! ```

use super::{header, Error, Header};
use crate::error::IoContext;
use crate::storage::Storage;

/// Length of the bitmaps extension payload.
pub const EXT_LEN: usize = 24;
/// Most bitmaps an image may hold (qemu's limit, QCOW2_MAX_BITMAPS).
pub const MAX_BITMAPS: u32 = 65535;
/// Largest bitmap directory the spec allows (64 MiB), so that it can be read in one piece.
pub const MAX_DIRECTORY_BYTES: u64 = 64 << 20;
/// Longest bitmap name (qemu's BME_MAX_NAME_SIZE).
pub const MAX_NAME_LEN: u16 = 1023;
/// Smallest granularity qemu supports (512 bytes).
pub const MIN_GRANULARITY_BITS: u8 = 9;
/// Largest granularity qemu supports (2 GiB).
pub const MAX_GRANULARITY_BITS: u8 = 31;
/// Most entries of one bitmap table (qemu's BME_MAX_TABLE_SIZE: a 1 GiB table).
pub const MAX_TABLE_ENTRIES: u32 = 0x0800_0000;
/// Directory entry bytes before the extra data and the name.
pub const ENTRY_FIXED_LEN: usize = 24;

/// Flag: the bitmap was in use (open read-write) and not stored back: its bits cannot be trusted.
pub const FLAG_IN_USE: u32 = 1 << 0;
/// Flag: the bitmap tracks every write (it is enabled).
pub const FLAG_AUTO: u32 = 1 << 1;
/// Flag: unknown extra data may be ignored.
pub const FLAG_EXTRA_DATA_COMPATIBLE: u32 = 1 << 2;
/// Every flag the spec defines.
pub const FLAGS_KNOWN: u32 = FLAG_IN_USE | FLAG_AUTO | FLAG_EXTRA_DATA_COMPATIBLE;
/// The only bitmap type: dirty tracking.
pub const TYPE_DIRTY_TRACKING: u8 = 1;

/// Table entry bits 9..=55: the offset of a data cluster.
pub const TABLE_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Table entry with no offset and bit 0 set: every bit of the cluster is one.
pub const TABLE_ALL_ONES: u64 = 1;
/// Table entry bits that must be zero.
pub const TABLE_RESERVED_MASK: u64 = 0xff00_0000_0000_01fe;

fn be16(b: &[u8], off: usize) -> u16 {
    u16::from_be_bytes([b[off], b[off + 1]])
}

fn be32(b: &[u8], off: usize) -> u32 {
    u32::from_be_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

fn be64(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_be_bytes(a)
}

/// The raw bitmaps header extension, as on disk (all big-endian).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawExtension {
    /// Number of bitmaps in the directory.
    pub nb_bitmaps: u32,
    /// Reserved, must be zero.
    pub reserved: u32,
    /// Bytes of the directory.
    pub directory_size: u64,
    /// Where the directory lies in the image file.
    pub directory_offset: u64,
}

impl RawExtension {
    /// Reads the extension payload; `None` when it is not 24 bytes.
    pub fn from_bytes(b: &[u8]) -> Option<RawExtension> {
        if b.len() != EXT_LEN {
            return None;
        }
        Some(RawExtension {
            nb_bitmaps: be32(b, 0),
            reserved: be32(b, 4),
            directory_size: be64(b, 8),
            directory_offset: be64(b, 16),
        })
    }

    /// The payload bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(EXT_LEN);
        v.extend_from_slice(&self.nb_bitmaps.to_be_bytes());
        v.extend_from_slice(&self.reserved.to_be_bytes());
        v.extend_from_slice(&self.directory_size.to_be_bytes());
        v.extend_from_slice(&self.directory_offset.to_be_bytes());
        v
    }

    /// Validates the extension against the cluster size and the file length.
    ///
    /// # Errors
    /// [`Error::BadBitmapExtension`] naming the field found wrong.
    pub fn validate(&self, cluster_size: u64, file_len: u64) -> Result<Extension, Error> {
        let bad = |what| Err(Error::BadBitmapExtension(what));
        if self.nb_bitmaps == 0 {
            return bad("no bitmaps");
        }
        if self.nb_bitmaps > MAX_BITMAPS {
            return bad("too many bitmaps");
        }
        if self.reserved != 0 {
            return bad("reserved field is not zero");
        }
        if self.directory_size > MAX_DIRECTORY_BYTES {
            return bad("directory too large");
        }
        let min = u64::from(self.nb_bitmaps) * ENTRY_FIXED_LEN as u64;
        if self.directory_size < min {
            return bad("directory too small for its bitmaps");
        }
        if self.directory_offset == 0 || self.directory_offset % cluster_size != 0 {
            return bad("directory offset not cluster aligned");
        }
        if self
            .directory_offset
            .checked_add(self.directory_size)
            .is_none_or(|e| e > file_len)
        {
            return bad("directory outside the image file");
        }
        Ok(Extension {
            nb_bitmaps: self.nb_bitmaps,
            directory_size: self.directory_size,
            directory_offset: self.directory_offset,
        })
    }
}

/// A validated bitmaps extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extension {
    /// Number of bitmaps, 1..=[`MAX_BITMAPS`].
    pub nb_bitmaps: u32,
    /// Directory bytes, at most [`MAX_DIRECTORY_BYTES`].
    pub directory_size: u64,
    /// Cluster-aligned directory offset, inside the file.
    pub directory_offset: u64,
}

/// A validated bitmap directory entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bitmap {
    /// Cluster-aligned offset of the bitmap table.
    pub table_offset: u64,
    /// Entries of the bitmap table.
    pub table_size: u32,
    /// [`FLAG_IN_USE`], [`FLAG_AUTO`], [`FLAG_EXTRA_DATA_COMPATIBLE`].
    pub flags: u32,
    /// log2 of the bytes of guest data one bit covers.
    pub granularity_bits: u8,
    /// The bitmap's name (unique in the image).
    pub name: String,
    /// Extra data, kept as is.
    pub extra_data: Vec<u8>,
    /// Where this entry lies, from the start of the directory.
    pub entry_offset: u64,
}

impl Bitmap {
    /// Bytes of guest data one bit covers.
    pub fn granularity(&self) -> u64 {
        1 << self.granularity_bits
    }

    /// Whether the bitmap tracks writes (enabled, and not already inconsistent).
    pub fn tracks_writes(&self) -> bool {
        self.flags & FLAG_AUTO != 0 && self.flags & FLAG_IN_USE == 0
    }

    /// Bytes of this entry in the directory, padding included.
    pub fn entry_len(&self) -> usize {
        (ENTRY_FIXED_LEN + self.extra_data.len() + self.name.len()).div_ceil(8) * 8
    }

    /// Serialises the entry (padded to 8 bytes).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(self.entry_len());
        v.extend_from_slice(&self.table_offset.to_be_bytes());
        v.extend_from_slice(&self.table_size.to_be_bytes());
        v.extend_from_slice(&self.flags.to_be_bytes());
        v.push(TYPE_DIRTY_TRACKING);
        v.push(self.granularity_bits);
        // Lengths were checked on parse (name <= 1023 bytes, extra data inside the directory).
        v.extend_from_slice(&u16::try_from(self.name.len()).unwrap_or(0).to_be_bytes());
        v.extend_from_slice(
            &u32::try_from(self.extra_data.len())
                .unwrap_or(0)
                .to_be_bytes(),
        );
        v.extend_from_slice(&self.extra_data);
        v.extend_from_slice(self.name.as_bytes());
        v.resize(self.entry_len(), 0);
        v
    }
}

/// Bits of a bitmap of `granularity_bits` over a `size`-byte disk.
pub fn bit_count(size: u64, granularity_bits: u8) -> u64 {
    size.div_ceil(1u64 << granularity_bits)
}

/// Entries of the bitmap table of a bitmap of `granularity_bits` over a `size`-byte disk, as
/// qemu sizes it: one entry per cluster of bits.
pub fn table_entries(size: u64, granularity_bits: u8, cluster_size: u64) -> u64 {
    bit_count(size, granularity_bits)
        .div_ceil(8)
        .div_ceil(cluster_size)
}

/// Parses and validates the directory `buf` (read at `ext.directory_offset`) of an image of
/// `size` bytes with `cluster_size` clusters in a file of `file_len` bytes.
///
/// # Errors
/// [`Error::BadBitmapDirectory`] with the file offset of the first entry found wrong.
pub fn parse_directory(
    buf: &[u8],
    ext: &Extension,
    size: u64,
    cluster_size: u64,
    file_len: u64,
) -> Result<Vec<Bitmap>, Error> {
    let mut out = Vec::new();
    let mut pos = 0usize;
    for _ in 0..ext.nb_bitmaps {
        let at = ext.directory_offset + pos as u64;
        let bad = |reason| Error::BadBitmapDirectory { offset: at, reason };
        let fixed = buf
            .get(pos..pos + ENTRY_FIXED_LEN)
            .ok_or(bad("entry runs past the directory end"))?;
        let table_offset = be64(fixed, 0);
        let table_size = be32(fixed, 8);
        let flags = be32(fixed, 12);
        let kind = fixed[16];
        let granularity_bits = fixed[17];
        let name_len = be16(fixed, 18);
        let extra_len = be32(fixed, 20);
        if kind != TYPE_DIRTY_TRACKING {
            return Err(bad("unknown bitmap type"));
        }
        if flags & !FLAGS_KNOWN != 0 {
            return Err(bad("reserved flags set"));
        }
        if !(MIN_GRANULARITY_BITS..=MAX_GRANULARITY_BITS).contains(&granularity_bits) {
            return Err(bad("unsupported granularity"));
        }
        if name_len == 0 || name_len > MAX_NAME_LEN {
            return Err(bad("bad name length"));
        }
        if extra_len != 0 && flags & FLAG_EXTRA_DATA_COMPATIBLE == 0 {
            return Err(bad("incompatible extra data"));
        }
        if table_size > MAX_TABLE_ENTRIES {
            return Err(bad("bitmap table too large"));
        }
        if u64::from(table_size) < table_entries(size, granularity_bits, cluster_size) {
            return Err(bad("bitmap table too small for the disk size"));
        }
        if table_offset == 0 || table_offset % cluster_size != 0 {
            return Err(bad("bitmap table not cluster aligned"));
        }
        if table_offset
            .checked_add(u64::from(table_size) * 8)
            .is_none_or(|e| e > file_len)
        {
            return Err(bad("bitmap table outside the image file"));
        }
        let extra_start = pos + ENTRY_FIXED_LEN;
        let extra_end = extra_start
            .checked_add(usize::try_from(extra_len).unwrap_or(usize::MAX))
            .filter(|&e| e <= buf.len())
            .ok_or(bad("extra data runs past the directory end"))?;
        let name_end = extra_end + usize::from(name_len);
        let name_bytes = buf
            .get(extra_end..name_end)
            .ok_or(bad("name runs past the directory end"))?;
        let name = std::str::from_utf8(name_bytes)
            .map_err(|_| bad("name is not UTF-8"))?
            .to_owned();
        if out.iter().any(|b: &Bitmap| b.name == name) {
            return Err(bad("duplicate bitmap name"));
        }
        out.push(Bitmap {
            table_offset,
            table_size,
            flags,
            granularity_bits,
            name,
            extra_data: buf[extra_start..extra_end].to_vec(),
            entry_offset: pos as u64,
        });
        pos = name_end.div_ceil(8) * 8;
        if pos > buf.len() {
            return Err(bad("entry padding runs past the directory end"));
        }
    }
    if pos as u64 != ext.directory_size {
        return Err(Error::BadBitmapDirectory {
            offset: ext.directory_offset + pos as u64,
            reason: "directory size does not match its entries",
        });
    }
    Ok(out)
}

/// Checks one bitmap table entry read at `at`; returns the data cluster offset it names, if any.
///
/// # Errors
/// [`Error::BadBitmapTable`] for reserved bits or a misaligned offset.
pub fn table_entry(e: u64, at: u64, cluster_size: u64) -> Result<Option<u64>, Error> {
    let bad = |reason| Error::BadBitmapTable { offset: at, reason };
    if e & TABLE_RESERVED_MASK != 0 {
        return Err(bad("reserved bits set"));
    }
    let off = e & TABLE_OFFSET_MASK;
    if off == 0 {
        return Ok(None);
    }
    if e & TABLE_ALL_ONES != 0 {
        return Err(bad("all-ones flag with an offset"));
    }
    if off % cluster_size != 0 {
        return Err(bad("data cluster not aligned"));
    }
    Ok(Some(off))
}

/// The bitmaps of an open image, and what was written since they were last stored.
#[derive(Debug, Clone)]
pub(crate) struct Loaded {
    /// The extension they were read from.
    pub ext: Extension,
    /// The directory entries, in directory order.
    pub list: Vec<Bitmap>,
}

/// Reads the bitmaps of an image whose header sets the bitmaps autoclear bit and has the
/// extension; `None` otherwise (qemu then ignores any extension: a program without bitmap
/// support wrote the image, and the bitmaps are stale).
///
/// # Errors
/// The specific [`Error`] for a bad extension or directory (wrapped with the path); I/O errors.
pub(crate) fn load(file: &dyn Storage, h: &Header, file_len: u64) -> crate::Result<Option<Loaded>> {
    let qerr = |e| crate::Error::Qcow2 {
        path: file.path().to_owned(),
        source: e,
    };
    if h.version < 3 || h.autoclear & header::AUTOCLEAR_BITMAPS == 0 {
        return Ok(None);
    }
    let Some(data) = h.extension(header::EXT_BITMAPS) else {
        return Ok(None);
    };
    let raw = RawExtension::from_bytes(data)
        .ok_or_else(|| qerr(Error::BadBitmapExtension("wrong length")))?;
    let ext = raw.validate(h.cluster_size(), file_len).map_err(&qerr)?;
    // Bounded by MAX_DIRECTORY_BYTES (64 MiB) in validate.
    let mut buf = vec![0u8; usize::try_from(ext.directory_size).unwrap_or(0)];
    file.read_at(&mut buf, ext.directory_offset)
        .ctx(file.path())?;
    let list = parse_directory(&buf, &ext, h.size, h.cluster_size(), file_len).map_err(&qerr)?;
    Ok(Some(Loaded { ext, list }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The directory `qemu-img bitmap --add a.qcow2 b0` then `--add --disable -g 128k ... b1`
    /// writes for an 8 MiB image with 64 KiB clusters (qemu-img 10.0.2), tables moved to 0x50000
    /// and 0x70000.
    fn qemu_directory() -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&0x50000u64.to_be_bytes());
        v.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 2, 1, 16, 0, 2, 0, 0, 0, 0]);
        v.extend_from_slice(b"b0\0\0\0\0\0\0");
        v.extend_from_slice(&0x70000u64.to_be_bytes());
        v.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 1, 17, 0, 2, 0, 0, 0, 0]);
        v.extend_from_slice(b"b1\0\0\0\0\0\0");
        v
    }

    fn ext() -> Extension {
        RawExtension {
            nb_bitmaps: 2,
            reserved: 0,
            directory_size: 64,
            directory_offset: 0x80000,
        }
        .validate(65536, 1 << 20)
        .unwrap()
    }

    fn parse(buf: &[u8]) -> Result<Vec<Bitmap>, Error> {
        parse_directory(buf, &ext(), 8 << 20, 65536, 1 << 20)
    }

    #[test]
    fn directory_from_qemu_parses_and_round_trips() {
        let d = qemu_directory();
        let bms = parse(&d).unwrap();
        assert_eq!(bms.len(), 2);
        assert_eq!(bms[0].name, "b0");
        assert_eq!(bms[0].granularity(), 65536);
        assert!(bms[0].tracks_writes());
        assert_eq!(bms[1].name, "b1");
        assert_eq!(bms[1].granularity(), 131072);
        assert!(!bms[1].tracks_writes());
        assert_eq!(bms[1].entry_offset, 32);
        let back: Vec<u8> = bms.iter().flat_map(Bitmap::to_bytes).collect();
        assert_eq!(back, d);
    }

    #[test]
    fn extension_round_trips() {
        let r = RawExtension {
            nb_bitmaps: 2,
            reserved: 0,
            directory_size: 64,
            directory_offset: 0x1c0000,
        };
        assert_eq!(RawExtension::from_bytes(&r.to_bytes()), Some(r));
    }

    #[test]
    fn extension_too_many_bitmaps_is_refused() {
        let r = RawExtension {
            nb_bitmaps: 65536,
            reserved: 0,
            directory_size: 64,
            directory_offset: 0x10000,
        };
        assert!(matches!(
            r.validate(65536, 1 << 30),
            Err(Error::BadBitmapExtension("too many bitmaps"))
        ));
    }

    #[test]
    fn extension_directory_over_64m_is_refused() {
        let r = RawExtension {
            nb_bitmaps: 1,
            reserved: 0,
            directory_size: (64 << 20) + 8,
            directory_offset: 0x10000,
        };
        assert!(matches!(
            r.validate(65536, 1 << 40),
            Err(Error::BadBitmapExtension("directory too large"))
        ));
    }

    #[test]
    fn extension_directory_past_file_end_is_refused() {
        let r = RawExtension {
            nb_bitmaps: 1,
            reserved: 0,
            directory_size: 32,
            directory_offset: 0x10000,
        };
        assert!(matches!(
            r.validate(65536, 0x10010),
            Err(Error::BadBitmapExtension(
                "directory outside the image file"
            ))
        ));
    }

    fn reason(r: Result<Vec<Bitmap>, Error>) -> (u64, &'static str) {
        match r {
            Err(Error::BadBitmapDirectory { offset, reason }) => (offset, reason),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn directory_bad_type_names_entry_offset() {
        let mut d = qemu_directory();
        d[32 + 16] = 2;
        assert_eq!(reason(parse(&d)), (0x80020, "unknown bitmap type"));
    }

    #[test]
    fn directory_granularity_8_bits_is_refused() {
        let mut d = qemu_directory();
        d[17] = 8;
        assert_eq!(reason(parse(&d)), (0x80000, "unsupported granularity"));
    }

    #[test]
    fn directory_reserved_flag_is_refused() {
        let mut d = qemu_directory();
        d[15] |= 8;
        assert_eq!(reason(parse(&d)).1, "reserved flags set");
    }

    #[test]
    fn directory_table_too_small_is_refused() {
        let mut d = qemu_directory();
        d[8..12].copy_from_slice(&0u32.to_be_bytes());
        assert_eq!(
            reason(parse(&d)).1,
            "bitmap table too small for the disk size"
        );
    }

    #[test]
    fn directory_huge_table_is_refused_before_reading() {
        let mut d = qemu_directory();
        d[8..12].copy_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(reason(parse(&d)).1, "bitmap table too large");
        d[8..12].copy_from_slice(&0x0010_0000u32.to_be_bytes());
        assert_eq!(reason(parse(&d)).1, "bitmap table outside the image file");
    }

    #[test]
    fn directory_name_past_end_is_refused() {
        let mut d = qemu_directory();
        d[32 + 18..32 + 20].copy_from_slice(&100u16.to_be_bytes());
        assert_eq!(reason(parse(&d)).1, "name runs past the directory end");
    }

    #[test]
    fn directory_duplicate_name_is_refused() {
        let mut d = qemu_directory();
        d[32 + 25] = b'0';
        assert_eq!(reason(parse(&d)).1, "duplicate bitmap name");
    }

    #[test]
    fn table_entry_reserved_bits_are_refused() {
        assert!(table_entry(0x50000, 0, 65536).unwrap() == Some(0x50000));
        assert!(table_entry(1, 0, 65536).unwrap().is_none());
        assert!(matches!(
            table_entry(0x50002, 8, 65536),
            Err(Error::BadBitmapTable {
                offset: 8,
                reason: "reserved bits set"
            })
        ));
        assert!(table_entry(0x50200, 8, 65536).is_err());
    }

    #[test]
    fn table_entries_match_qemu_sizes() {
        assert_eq!(table_entries(8 << 20, 16, 65536), 1);
        // 64 KiB clusters of bits at 512-byte granularity cover 256 MiB each.
        assert_eq!(table_entries((256 << 20) + 1, 9, 65536), 2);
    }
}
