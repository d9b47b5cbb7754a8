//! Sparse extent headers (Virtual Disk Format 5.0, "Hosted Sparse Extent Header"; and ESX's
//! older `COWD` header that qemu reads for vmfsSparse), and stream-optimized markers.
//!
//! KDMV header, little-endian, one sector:
//! ```text
//! 0 magic "KDMV"  4 version  8 flags  12 capacity(u64)  20 grainSize(u64)
//! 28 descriptorOffset(u64)  36 descriptorSize(u64)  44 numGTEsPerGT  48 rgdOffset(u64)
//! 56 gdOffset(u64)  64 overHead(u64)  72 uncleanShutdown  73 '\n' ' ' '\r' '\n'
//! 77 compressAlgorithm(u16)  79..512 pad
//! ```
//! All offsets and sizes are in 512-byte sectors.

use super::{Error, MAX_CAPACITY_SECTORS, MAX_GD_BYTES, MAX_GRAIN_SECTORS};

/// Sector size.
pub const SECTOR: u64 = 512;
/// `KDMV`.
pub const MAGIC: [u8; 4] = *b"KDMV";
/// `COWD` (ESX 2 sparse, vmfsSparse).
pub const COWD_MAGIC: [u8; 4] = *b"COWD";
/// Flag: the newline-detection characters are valid.
pub const FLAG_NL_DETECT: u32 = 1 << 0;
/// Flag: a redundant grain directory exists.
pub const FLAG_RGD: u32 = 1 << 1;
/// Flag: grain table entry 1 means "zeroed grain".
pub const FLAG_ZERO_GRAIN: u32 = 1 << 2;
/// Flag: grains are compressed.
pub const FLAG_COMPRESS: u32 = 1 << 16;
/// Flag: the stream has markers.
pub const FLAG_MARKER: u32 = 1 << 17;
/// gdOffset value meaning "the grain directory is found through the footer".
pub const GD_AT_END: u64 = u64::MAX;
/// compressAlgorithm: deflate in a zlib wrapper.
pub const COMPRESSION_DEFLATE: u16 = 1;
/// Grain table entry meaning "zeroed grain" (with [`FLAG_ZERO_GRAIN`]).
pub const GTE_ZEROED: u32 = 1;
/// Marker types.
pub const MARKER_EOS: u32 = 0;
/// Grain table marker.
pub const MARKER_GT: u32 = 1;
/// Grain directory marker.
pub const MARKER_GD: u32 = 2;
/// Footer marker.
pub const MARKER_FOOTER: u32 = 3;
/// Bytes of a grain marker before its compressed data (lba u64, size u32).
pub const GRAIN_MARKER_LEN: usize = 12;
/// Grain table entries in a COWD extent (fixed by the format).
pub const COWD_GTES: u32 = 4096;

/// A KDMV sparse header (raw form: fields as stored).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SparseHeader {
    /// 1, 2 (zeroed grains) or 3 (streams, changed block tracking).
    pub version: u32,
    /// `FLAG_*` bits.
    pub flags: u32,
    /// Extent size in sectors.
    pub capacity: u64,
    /// Grain size in sectors.
    pub grain_size: u64,
    /// Embedded descriptor start sector (0: none).
    pub desc_offset: u64,
    /// Embedded descriptor length in sectors.
    pub desc_size: u64,
    /// Entries per grain table (512).
    pub gtes_per_gt: u32,
    /// Redundant grain directory sector.
    pub rgd_offset: u64,
    /// Grain directory sector, or [`GD_AT_END`].
    pub gd_offset: u64,
    /// Sectors of metadata before the first grain.
    pub overhead: u64,
    /// Set while a writer has the extent open.
    pub unclean: u8,
    /// `\n`, ` `, `\r`, `\n` when transferred intact.
    pub check_bytes: [u8; 4],
    /// 0 none, 1 deflate.
    pub compress: u16,
}

fn le32(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}
fn le64(b: &[u8], o: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[o..o + 8]);
    u64::from_le_bytes(a)
}

impl SparseHeader {
    /// Decodes a header sector.
    ///
    /// # Errors
    /// [`Error::Truncated`], [`Error::BadMagic`].
    pub fn parse(b: &[u8]) -> Result<SparseHeader, Error> {
        if (b.len() as u64) < SECTOR {
            return Err(Error::Truncated(b.len() as u64));
        }
        if b[..4] != MAGIC {
            return Err(Error::BadMagic);
        }
        Ok(SparseHeader {
            version: le32(b, 4),
            flags: le32(b, 8),
            capacity: le64(b, 12),
            grain_size: le64(b, 20),
            desc_offset: le64(b, 28),
            desc_size: le64(b, 36),
            gtes_per_gt: le32(b, 44),
            rgd_offset: le64(b, 48),
            gd_offset: le64(b, 56),
            overhead: le64(b, 64),
            unclean: b[72],
            check_bytes: [b[73], b[74], b[75], b[76]],
            compress: u16::from_le_bytes([b[77], b[78]]),
        })
    }

    /// Encodes the header sector.
    pub fn to_bytes(&self) -> [u8; 512] {
        let mut b = [0u8; 512];
        b[..4].copy_from_slice(&MAGIC);
        b[4..8].copy_from_slice(&self.version.to_le_bytes());
        b[8..12].copy_from_slice(&self.flags.to_le_bytes());
        b[12..20].copy_from_slice(&self.capacity.to_le_bytes());
        b[20..28].copy_from_slice(&self.grain_size.to_le_bytes());
        b[28..36].copy_from_slice(&self.desc_offset.to_le_bytes());
        b[36..44].copy_from_slice(&self.desc_size.to_le_bytes());
        b[44..48].copy_from_slice(&self.gtes_per_gt.to_le_bytes());
        b[48..56].copy_from_slice(&self.rgd_offset.to_le_bytes());
        b[56..64].copy_from_slice(&self.gd_offset.to_le_bytes());
        b[64..72].copy_from_slice(&self.overhead.to_le_bytes());
        b[72] = self.unclean;
        b[73..77].copy_from_slice(&self.check_bytes);
        b[77..79].copy_from_slice(&self.compress.to_le_bytes());
        b
    }

    /// Whether grains are deflate-compressed.
    pub fn compressed(&self) -> bool {
        self.compress == COMPRESSION_DEFLATE
    }

    /// Checks the geometry (validated form): afterwards the table arithmetic cannot overflow.
    ///
    /// # Errors
    /// The specific [`Error`] for the first field found wrong.
    pub fn validate(&self) -> Result<Geometry, Error> {
        if self.version > 3 {
            return Err(Error::UnsupportedVersion(self.version));
        }
        if self.compress > COMPRESSION_DEFLATE {
            return Err(Error::BadCompression(self.compress));
        }
        if self.gtes_per_gt == 0 || self.gtes_per_gt > 512 {
            return Err(Error::BadGtesPerGt(self.gtes_per_gt));
        }
        Geometry::new(self.capacity, self.grain_size, self.gtes_per_gt)
    }
}

/// Table geometry of a sparse extent, checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// Extent size in sectors.
    pub capacity: u64,
    /// Grain size in bytes.
    pub grain: u64,
    /// Entries per grain table.
    pub gtes: u64,
    /// Grain tables (= grain directory entries).
    pub gd_entries: u64,
}

impl Geometry {
    /// Checks and derives the geometry.
    ///
    /// # Errors
    /// [`Error::BadGrainSize`], [`Error::BadCapacity`], [`Error::GdTooLarge`].
    pub fn new(capacity: u64, grain_sectors: u64, gtes: u32) -> Result<Geometry, Error> {
        if grain_sectors == 0 || grain_sectors > MAX_GRAIN_SECTORS {
            return Err(Error::BadGrainSize(grain_sectors));
        }
        if capacity > MAX_CAPACITY_SECTORS {
            return Err(Error::BadCapacity(capacity));
        }
        let gtes = u64::from(gtes);
        let per_gt = grain_sectors * gtes;
        let gd_entries = capacity.div_ceil(per_gt);
        if gd_entries * 4 > MAX_GD_BYTES {
            return Err(Error::GdTooLarge(gd_entries));
        }
        Ok(Geometry {
            capacity,
            grain: grain_sectors * SECTOR,
            gtes,
            gd_entries,
        })
    }
    /// Bytes of one grain table, rounded to sectors.
    pub fn gt_bytes(&self) -> u64 {
        (self.gtes * 4).div_ceil(SECTOR) * SECTOR
    }
    /// Bytes of the grain directory, rounded to sectors.
    pub fn gd_bytes(&self) -> u64 {
        (self.gd_entries * 4).div_ceil(SECTOR) * SECTOR
    }
    /// Extent size in bytes.
    pub fn bytes(&self) -> u64 {
        self.capacity * SECTOR
    }
}

/// The `COWD` header fields qemu reads (after the magic), little-endian u32s.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CowdHeader {
    /// Format version.
    pub version: u32,
    /// Flags.
    pub flags: u32,
    /// Extent size in sectors.
    pub disk_sectors: u32,
    /// Grain size in sectors.
    pub granularity: u32,
    /// Grain directory sector.
    pub l1dir_offset: u32,
    /// Grain directory entries.
    pub l1dir_size: u32,
}

impl CowdHeader {
    /// Decodes a COWD header sector.
    ///
    /// # Errors
    /// [`Error::Truncated`], [`Error::BadMagic`].
    pub fn parse(b: &[u8]) -> Result<CowdHeader, Error> {
        if b.len() < 32 {
            return Err(Error::Truncated(b.len() as u64));
        }
        if b[..4] != COWD_MAGIC {
            return Err(Error::BadMagic);
        }
        Ok(CowdHeader {
            version: le32(b, 4),
            flags: le32(b, 8),
            disk_sectors: le32(b, 12),
            granularity: le32(b, 16),
            l1dir_offset: le32(b, 20),
            l1dir_size: le32(b, 24),
        })
    }

    /// Encodes the header sector (the fields above; the rest zero).
    pub fn to_bytes(&self) -> [u8; 512] {
        let mut b = [0u8; 512];
        b[..4].copy_from_slice(&COWD_MAGIC);
        for (i, v) in [
            self.version,
            self.flags,
            self.disk_sectors,
            self.granularity,
            self.l1dir_offset,
            self.l1dir_size,
        ]
        .iter()
        .enumerate()
        {
            b[4 + i * 4..8 + i * 4].copy_from_slice(&v.to_le_bytes());
        }
        b
    }
}

/// A metadata marker sector: `numSectors`, `size` 0, `type`.
pub fn marker(num_sectors: u64, kind: u32) -> [u8; 512] {
    let mut b = [0u8; 512];
    b[..8].copy_from_slice(&num_sectors.to_le_bytes());
    b[12..16].copy_from_slice(&kind.to_le_bytes());
    b
}

/// Decodes a marker: (value, size, type).
pub fn parse_marker(b: &[u8; 512]) -> (u64, u32, u32) {
    (le64(b, 0), le32(b, 8), le32(b, 12))
}

/// A grain marker header: the grain's first sector in the extent and the compressed length.
pub fn grain_marker(lba: u64, size: u32) -> [u8; GRAIN_MARKER_LEN] {
    let mut b = [0u8; GRAIN_MARKER_LEN];
    b[..8].copy_from_slice(&lba.to_le_bytes());
    b[8..12].copy_from_slice(&size.to_le_bytes());
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The header qemu-img 10 writes for a 5 GiB monolithicSparse image.
    fn qemu_header() -> SparseHeader {
        SparseHeader {
            version: 1,
            flags: FLAG_NL_DETECT | FLAG_RGD,
            capacity: 10_485_760,
            grain_size: 128,
            desc_offset: 1,
            desc_size: 20,
            gtes_per_gt: 512,
            rgd_offset: 21,
            gd_offset: 663,
            overhead: 1408,
            unclean: 0,
            check_bytes: *b"\n \r\n",
            compress: 0,
        }
    }

    #[test]
    fn header_matches_qemu_bytes() {
        let b = qemu_header().to_bytes();
        // First 80 bytes of `qemu-img create -f vmdk x 5G`.
        let want: [u8; 80] = [
            0x4b, 0x44, 0x4d, 0x56, 1, 0, 0, 0, 3, 0, 0, 0, 0, 0, 0xa0, 0, 0, 0, 0, 0, 0x80, 0, 0,
            0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0x14, 0, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0x15, 0,
            0, 0, 0, 0, 0, 0, 0x97, 2, 0, 0, 0, 0, 0, 0, 0x80, 5, 0, 0, 0, 0, 0, 0, 0, 0x0a, 0x20,
            0x0d, 0x0a, 0, 0, 0,
        ];
        assert_eq!(&b[..80], &want[..]);
        assert_eq!(SparseHeader::parse(&b).unwrap(), qemu_header());
    }

    fn verr(f: impl FnOnce(&mut SparseHeader)) -> Error {
        let mut h = qemu_header();
        f(&mut h);
        h.validate().unwrap_err()
    }

    #[test]
    fn header_each_bad_field_gives_its_error() {
        assert!(matches!(
            verr(|h| h.version = 4),
            Error::UnsupportedVersion(4)
        ));
        assert!(matches!(verr(|h| h.compress = 2), Error::BadCompression(2)));
        assert!(matches!(
            verr(|h| h.gtes_per_gt = 0),
            Error::BadGtesPerGt(0)
        ));
        assert!(matches!(
            verr(|h| h.gtes_per_gt = 513),
            Error::BadGtesPerGt(513)
        ));
        assert!(matches!(verr(|h| h.grain_size = 0), Error::BadGrainSize(0)));
        assert!(matches!(
            verr(|h| h.grain_size = MAX_GRAIN_SECTORS + 1),
            Error::BadGrainSize(_)
        ));
        // A fuzzer's 32 MiB grain (not even a power of two) made each small read inflate 32 MiB.
        assert!(matches!(
            verr(|h| h.grain_size = 65664),
            Error::BadGrainSize(65664)
        ));
        assert!(matches!(
            verr(|h| h.capacity = u64::MAX),
            Error::BadCapacity(_)
        ));
        assert!(matches!(
            verr(|h| {
                h.grain_size = 1;
                h.gtes_per_gt = 1;
                h.capacity = MAX_CAPACITY_SECTORS;
            }),
            Error::GdTooLarge(_)
        ));
    }

    #[test]
    fn header_bad_magic_and_short_buffer() {
        let mut b = qemu_header().to_bytes();
        b[0] = b'X';
        assert!(matches!(SparseHeader::parse(&b), Err(Error::BadMagic)));
        assert!(matches!(
            SparseHeader::parse(&b[..100]),
            Err(Error::Truncated(100))
        ));
    }

    #[test]
    fn markers_round_trip() {
        let m = marker(4, MARKER_GT);
        assert_eq!(parse_marker(&m), (4, 0, MARKER_GT));
        let g = grain_marker(256, 1000);
        assert_eq!(&g[..8], &256u64.to_le_bytes());
        assert_eq!(&g[8..], &1000u32.to_le_bytes());
    }

    #[test]
    fn cowd_header_round_trips() {
        let h = CowdHeader {
            version: 1,
            flags: 3,
            disk_sectors: 4096,
            granularity: 1,
            l1dir_offset: 4,
            l1dir_size: 1,
        };
        assert_eq!(CowdHeader::parse(&h.to_bytes()).unwrap(), h);
    }
}
