//! The VDI header (VirtualBox's `VDIHEADER1PLUS` after the 0x40-byte text and the pre-header).
//!
//! All fields are little-endian. Layout of the 512-byte header sector:
//!
//! ```text
//! 0x000 text[64]       0x040 signature    0x044 version      0x048 header_size
//! 0x04c image_type     0x050 image_flags  0x054 description[256]
//! 0x154 offset_bmap    0x158 offset_data  0x15c cylinders    0x160 heads
//! 0x164 sectors        0x168 sector_size  0x16c unused       0x170 disk_size (u64)
//! 0x178 block_size     0x17c block_extra  0x180 blocks_in_image
//! 0x184 blocks_allocated 0x188 uuid_image 0x198 uuid_last_snap
//! 0x1a8 uuid_link      0x1b8 uuid_parent  0x1c8..0x200 unused
//! ```

use std::fmt;

use super::{Error, MAX_BLOCKS};

/// Size of the header sector.
pub const HEADER_LEN: usize = 512;
/// `signature`.
pub const SIGNATURE: u32 = 0xbeda_107f;
/// Version 1.1, the only one written since VirtualBox 1.x.
pub const VERSION_1_1: u32 = 0x0001_0001;
/// `header_size` of a version 1.1 header (from offset 0x48 to 0x1c8).
pub const HEADER_SIZE_1_1: u32 = 0x180;
/// The text qemu writes.
pub const QEMU_TEXT: &str = "<<< QEMU VM Virtual Disk Image >>>\n";
/// The text VirtualBox writes.
pub const VBOX_TEXT: &str = "<<< Oracle VM VirtualBox Disk Image >>>\n";
/// Sector size: always 512.
pub const SECTOR_SIZE: u32 = 512;
/// Block size: always 1 MiB.
pub const BLOCK_SIZE: u32 = 1 << 20;

/// Image types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageType {
    /// Dynamically allocated ("normal").
    Dynamic,
    /// Preallocated ("fixed", qemu's static).
    Static,
    /// Differencing: unallocated blocks read from the parent.
    Diff,
}

impl ImageType {
    /// The on-disk value.
    pub fn code(self) -> u32 {
        match self {
            ImageType::Dynamic => 1,
            ImageType::Static => 2,
            ImageType::Diff => 4,
        }
    }
    fn from_code(c: u32) -> Result<Self, Error> {
        Ok(match c {
            // 3: old VirtualBox "undo" disks, laid out as normal ones (qemu reads them so).
            1 | 3 => ImageType::Dynamic,
            2 => ImageType::Static,
            4 => ImageType::Diff,
            _ => return Err(Error::BadImageType(c)),
        })
    }
}

/// A UUID as stored: the first three fields little-endian (Microsoft GUID order).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub struct Uuid(pub [u8; 16]);

impl Uuid {
    /// The all-zero UUID ("none").
    pub fn is_nil(&self) -> bool {
        self.0 == [0; 16]
    }
    /// A random version 4 UUID (from the kernel's random source, or the clock when that fails).
    pub fn random() -> Uuid {
        let mut b = [0u8; 16];
        let ok = std::fs::File::open("/dev/urandom")
            .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b))
            .is_ok();
        if !ok {
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos();
            b.copy_from_slice(&t.to_le_bytes());
        }
        // Version 4 in time_hi (little-endian byte 7), RFC 4122 variant in byte 8.
        b[7] = (b[7] & 0x0f) | 0x40;
        b[8] = (b[8] & 0x3f) | 0x80;
        Uuid(b)
    }
}

impl fmt::Display for Uuid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = &self.0;
        write!(
            f,
            "{:08x}-{:04x}-{:04x}-",
            u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            u16::from_le_bytes([b[4], b[5]]),
            u16::from_le_bytes([b[6], b[7]])
        )?;
        for x in &b[8..10] {
            write!(f, "{x:02x}")?;
        }
        f.write_str("-")?;
        for x in &b[10..16] {
            write!(f, "{x:02x}")?;
        }
        Ok(())
    }
}

/// The header fields, decoded (raw form: nothing checked but the length).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Free text at the start, NUL padded.
    pub text: [u8; 64],
    /// Must be [`SIGNATURE`].
    pub signature: u32,
    /// Major in the high half, minor in the low half.
    pub version: u32,
    /// Length of the header from offset 0x48.
    pub header_size: u32,
    /// Raw image type.
    pub image_type: u32,
    /// Flags (unused by qemu and VirtualBox).
    pub image_flags: u32,
    /// Comment, NUL padded.
    pub description: [u8; 256],
    /// Offset of the block map.
    pub offset_bmap: u32,
    /// Offset of data block 0.
    pub offset_data: u32,
    /// Legacy geometry.
    pub cylinders: u32,
    /// Legacy geometry.
    pub heads: u32,
    /// Legacy geometry.
    pub sectors: u32,
    /// Bytes per sector (512).
    pub sector_size: u32,
    /// Virtual disk size in bytes.
    pub disk_size: u64,
    /// Bytes per block (1 MiB).
    pub block_size: u32,
    /// Extra bytes before each block's data (0).
    pub block_extra: u32,
    /// Entries in the block map.
    pub blocks_in_image: u32,
    /// Data blocks in use.
    pub blocks_allocated: u32,
    /// This image's UUID.
    pub uuid_image: Uuid,
    /// Changes on every modification (VirtualBox's "modification UUID").
    pub uuid_last_snap: Uuid,
    /// Differencing images: the parent's `uuid_image`.
    pub uuid_link: Uuid,
    /// Differencing images: the parent's `uuid_last_snap` when this image was made.
    pub uuid_parent: Uuid,
    /// Bytes 0x1c8..0x200, kept on rewrite (VirtualBox stores LCHS geometry there).
    pub tail: [u8; 56],
}

fn le32(b: &[u8], off: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[off..off + 4]);
    u32::from_le_bytes(a)
}

fn le64(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(a)
}

fn uuid(b: &[u8], off: usize) -> Uuid {
    let mut a = [0u8; 16];
    a.copy_from_slice(&b[off..off + 16]);
    Uuid(a)
}

impl Header {
    /// A header qemu-img would write for a new image.
    pub fn new(disk_size: u64, blocks: u32, image_type: ImageType) -> Header {
        let mut text = [0u8; 64];
        text[..QEMU_TEXT.len()].copy_from_slice(QEMU_TEXT.as_bytes());
        Header {
            text,
            signature: SIGNATURE,
            version: VERSION_1_1,
            header_size: HEADER_SIZE_1_1,
            image_type: image_type.code(),
            image_flags: 0,
            description: [0; 256],
            offset_bmap: 0,
            offset_data: 0,
            cylinders: 0,
            heads: 0,
            sectors: 0,
            sector_size: SECTOR_SIZE,
            disk_size,
            block_size: BLOCK_SIZE,
            block_extra: 0,
            blocks_in_image: blocks,
            blocks_allocated: 0,
            uuid_image: Uuid::random(),
            uuid_last_snap: Uuid::random(),
            uuid_link: Uuid::default(),
            uuid_parent: Uuid::default(),
            tail: [0; 56],
        }
    }

    /// Decodes the header sector.
    ///
    /// # Errors
    /// [`Error::Truncated`] when `buf` is shorter than [`HEADER_LEN`]; [`Error::BadSignature`].
    pub fn parse(buf: &[u8]) -> Result<Header, Error> {
        let b = buf
            .get(..HEADER_LEN)
            .ok_or(Error::Truncated(buf.len() as u64))?;
        let mut text = [0u8; 64];
        text.copy_from_slice(&b[..64]);
        let mut description = [0u8; 256];
        description.copy_from_slice(&b[0x54..0x154]);
        let mut tail = [0u8; 56];
        tail.copy_from_slice(&b[0x1c8..0x200]);
        let h = Header {
            text,
            signature: le32(b, 0x40),
            version: le32(b, 0x44),
            header_size: le32(b, 0x48),
            image_type: le32(b, 0x4c),
            image_flags: le32(b, 0x50),
            description,
            offset_bmap: le32(b, 0x154),
            offset_data: le32(b, 0x158),
            cylinders: le32(b, 0x15c),
            heads: le32(b, 0x160),
            sectors: le32(b, 0x164),
            sector_size: le32(b, 0x168),
            disk_size: le64(b, 0x170),
            block_size: le32(b, 0x178),
            block_extra: le32(b, 0x17c),
            blocks_in_image: le32(b, 0x180),
            blocks_allocated: le32(b, 0x184),
            uuid_image: uuid(b, 0x188),
            uuid_last_snap: uuid(b, 0x198),
            uuid_link: uuid(b, 0x1a8),
            uuid_parent: uuid(b, 0x1b8),
            tail,
        };
        if h.signature != SIGNATURE {
            return Err(Error::BadSignature(h.signature));
        }
        Ok(h)
    }

    /// Encodes the header sector.
    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        let put32 = |b: &mut [u8; HEADER_LEN], off: usize, v: u32| {
            b[off..off + 4].copy_from_slice(&v.to_le_bytes())
        };
        b[..64].copy_from_slice(&self.text);
        put32(&mut b, 0x40, self.signature);
        put32(&mut b, 0x44, self.version);
        put32(&mut b, 0x48, self.header_size);
        put32(&mut b, 0x4c, self.image_type);
        put32(&mut b, 0x50, self.image_flags);
        b[0x54..0x154].copy_from_slice(&self.description);
        put32(&mut b, 0x154, self.offset_bmap);
        put32(&mut b, 0x158, self.offset_data);
        put32(&mut b, 0x15c, self.cylinders);
        put32(&mut b, 0x160, self.heads);
        put32(&mut b, 0x164, self.sectors);
        put32(&mut b, 0x168, self.sector_size);
        b[0x170..0x178].copy_from_slice(&self.disk_size.to_le_bytes());
        put32(&mut b, 0x178, self.block_size);
        put32(&mut b, 0x17c, self.block_extra);
        put32(&mut b, 0x180, self.blocks_in_image);
        put32(&mut b, 0x184, self.blocks_allocated);
        b[0x188..0x198].copy_from_slice(&self.uuid_image.0);
        b[0x198..0x1a8].copy_from_slice(&self.uuid_last_snap.0);
        b[0x1a8..0x1b8].copy_from_slice(&self.uuid_link.0);
        b[0x1b8..0x1c8].copy_from_slice(&self.uuid_parent.0);
        b[0x1c8..0x200].copy_from_slice(&self.tail);
        b
    }

    /// The image type, checked.
    ///
    /// # Errors
    /// [`Error::BadImageType`].
    pub fn kind(&self) -> Result<ImageType, Error> {
        ImageType::from_code(self.image_type)
    }

    /// Bytes of the block map on disk.
    pub fn bmap_len(&self) -> u64 {
        u64::from(self.blocks_in_image) * 4
    }

    /// Checks every field against the file it came from (validated form: after this, offsets
    /// and counts can be used without overflow).
    ///
    /// # Errors
    /// The specific [`Error`] for the first field found wrong.
    pub fn validate(&self, file_len: u64) -> Result<ImageType, Error> {
        if self.version != VERSION_1_1 {
            return Err(Error::UnsupportedVersion {
                major: u16::try_from(self.version >> 16).unwrap_or(u16::MAX),
                minor: u16::try_from(self.version & 0xffff).unwrap_or(u16::MAX),
            });
        }
        if self.header_size < HEADER_SIZE_1_1 {
            return Err(Error::BadHeaderSize(self.header_size));
        }
        let kind = self.kind()?;
        // Only a differencing image names another (qemu refuses these fields on any image).
        if kind != ImageType::Diff {
            if !self.uuid_link.is_nil() {
                return Err(Error::UnexpectedUuid("link"));
            }
            if !self.uuid_parent.is_nil() {
                return Err(Error::UnexpectedUuid("parent"));
            }
        }
        if self.sector_size != SECTOR_SIZE {
            return Err(Error::BadSectorSize(self.sector_size));
        }
        if self.block_size != BLOCK_SIZE {
            return Err(Error::BadBlockSize(self.block_size));
        }
        if self.block_extra != 0 {
            return Err(Error::BlockExtra(self.block_extra));
        }
        for (what, offset) in [("block map", self.offset_bmap), ("data", self.offset_data)] {
            if offset % SECTOR_SIZE != 0 {
                return Err(Error::Misaligned { what, offset });
            }
            if (offset as usize) < HEADER_LEN {
                return Err(Error::OverlapsHeader { what, offset });
            }
        }
        if self.blocks_in_image > MAX_BLOCKS {
            return Err(Error::TooManyBlocks(self.blocks_in_image));
        }
        let max = u64::from(self.blocks_in_image) * u64::from(BLOCK_SIZE);
        if self.disk_size > max {
            return Err(Error::DiskTooLarge {
                size: self.disk_size,
                max,
            });
        }
        if self.blocks_allocated > self.blocks_in_image {
            return Err(Error::BadAllocatedCount {
                allocated: self.blocks_allocated,
                total: self.blocks_in_image,
            });
        }
        let bmap = u64::from(self.offset_bmap);
        let end = bmap + self.bmap_len();
        let limit = if self.offset_data >= self.offset_bmap {
            u64::from(self.offset_data).min(file_len)
        } else {
            file_len
        };
        if end > limit {
            return Err(Error::BlockMapOutOfRange {
                offset: bmap,
                len: self.bmap_len(),
                limit,
            });
        }
        Ok(kind)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn good() -> Header {
        let mut h = Header::new(3 << 20, 3, ImageType::Dynamic);
        h.offset_bmap = 0x200;
        h.offset_data = 0x400;
        h
    }

    #[test]
    fn header_round_trips_through_bytes() {
        let h = good();
        assert_eq!(Header::parse(&h.to_bytes()).unwrap(), h);
    }

    #[test]
    fn header_good_validates() {
        assert_eq!(good().validate(0x400).unwrap(), ImageType::Dynamic);
    }

    #[test]
    fn header_short_buffer_is_truncated() {
        assert!(matches!(
            Header::parse(&[0u8; 100]),
            Err(Error::Truncated(100))
        ));
    }

    #[test]
    fn header_bad_signature_is_refused() {
        let mut b = good().to_bytes();
        b[0x40] ^= 1;
        assert!(matches!(Header::parse(&b), Err(Error::BadSignature(_))));
    }

    fn field_err(f: impl FnOnce(&mut Header)) -> Error {
        let mut h = good();
        f(&mut h);
        h.validate(1 << 30).unwrap_err()
    }

    #[test]
    fn header_each_bad_field_gives_its_error() {
        assert!(matches!(
            field_err(|h| h.version = 0x0001_0000),
            Error::UnsupportedVersion { major: 1, minor: 0 }
        ));
        assert!(matches!(
            field_err(|h| h.header_size = 0x100),
            Error::BadHeaderSize(0x100)
        ));
        assert!(matches!(
            field_err(|h| h.image_type = 5),
            Error::BadImageType(5)
        ));
        assert!(matches!(
            field_err(|h| h.uuid_link = Uuid([1; 16])),
            Error::UnexpectedUuid("link")
        ));
        assert!(matches!(
            field_err(|h| h.uuid_parent = Uuid([1; 16])),
            Error::UnexpectedUuid("parent")
        ));
        assert!(matches!(
            field_err(|h| h.sector_size = 4096),
            Error::BadSectorSize(4096)
        ));
        assert!(matches!(
            field_err(|h| h.block_size = 4096),
            Error::BadBlockSize(4096)
        ));
        assert!(matches!(
            field_err(|h| h.block_extra = 512),
            Error::BlockExtra(512)
        ));
        assert!(matches!(
            field_err(|h| h.offset_bmap = 0x201),
            Error::Misaligned {
                what: "block map",
                ..
            }
        ));
        assert!(matches!(
            field_err(|h| h.offset_data = 0x401),
            Error::Misaligned { what: "data", .. }
        ));
        assert!(matches!(
            field_err(|h| h.offset_bmap = 0),
            Error::OverlapsHeader {
                what: "block map",
                ..
            }
        ));
        assert!(matches!(
            field_err(|h| h.blocks_in_image = u32::MAX),
            Error::TooManyBlocks(_)
        ));
        assert!(matches!(
            field_err(|h| h.disk_size = 4 << 20),
            Error::DiskTooLarge { .. }
        ));
        assert!(matches!(
            field_err(|h| h.blocks_allocated = 4),
            Error::BadAllocatedCount { .. }
        ));
        assert!(matches!(
            field_err(|h| {
                h.blocks_in_image = 1000;
                h.disk_size = 1 << 20;
            }),
            Error::BlockMapOutOfRange { .. }
        ));
    }

    #[test]
    fn block_map_past_end_of_file_is_refused() {
        let mut h = good();
        h.offset_data = 1 << 20;
        h.blocks_in_image = 1000;
        assert!(matches!(
            h.validate(0x300),
            Err(Error::BlockMapOutOfRange { limit: 0x300, .. })
        ));
    }

    #[test]
    fn uuid_displays_in_guid_order() {
        let u = Uuid([
            0x33, 0x22, 0x11, 0x00, 0x55, 0x44, 0x77, 0x66, 0x88, 0x99, 0xaa, 0xbb, 0xcc, 0xdd,
            0xee, 0xff,
        ]);
        assert_eq!(u.to_string(), "00112233-4455-6677-8899-aabbccddeeff");
    }
}
