//! What can be wrong with a VDI image.

/// A malformed VDI image, or one that uses something this driver refuses.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The file is shorter than the 512-byte header.
    #[error("file too short for a VDI header ({0} bytes)")]
    Truncated(u64),
    /// The signature at offset 0x40 is not 0xbeda107f.
    #[error("not a VDI image (bad signature {0:#010x})")]
    BadSignature(u32),
    /// Only version 1.1 headers exist in the wild (and are what qemu and VirtualBox write).
    #[error("unsupported VDI image (version {major}.{minor})")]
    UnsupportedVersion {
        /// Major version.
        major: u16,
        /// Minor version.
        minor: u16,
    },
    /// The header size field is smaller than a version 1.1 header.
    #[error("unsupported VDI image (header size {0:#x})")]
    BadHeaderSize(u32),
    /// A normal or fixed image that names another image (its link or parent UUID is set),
    /// which only a differencing image may.
    #[error("unsupported VDI image (non-NULL {0} UUID)")]
    UnexpectedUuid(&'static str),
    /// An image type other than normal (1), undo (3), fixed (2) or differencing (4).
    #[error("unsupported VDI image (image type {0})")]
    BadImageType(u32),
    /// Sectors other than 512 bytes.
    #[error("unsupported VDI image (sector size {0} is not 512)")]
    BadSectorSize(u32),
    /// Blocks other than 1 MiB (all VirtualBox and qemu images use 1 MiB).
    #[error("unsupported VDI image (block size {0} is not 1048576)")]
    BadBlockSize(u32),
    /// Per-block extra data, which neither qemu nor VirtualBox writes.
    #[error("unsupported VDI image (block_extra {0} is not 0)")]
    BlockExtra(u32),
    /// The block map or data offset is not sector aligned.
    #[error("unsupported VDI image ({what} offset {offset:#x} is not sector aligned)")]
    Misaligned {
        /// Which offset.
        what: &'static str,
        /// The offset found.
        offset: u32,
    },
    /// More blocks than [`super::MAX_BLOCKS`].
    #[error(
        "unsupported VDI image (too many blocks {0}, max is {max})",
        max = super::MAX_BLOCKS
    )]
    TooManyBlocks(u32),
    /// The disk is larger than its blocks can hold.
    #[error("unsupported VDI image (disk size {size}, max {max})")]
    DiskTooLarge {
        /// The disk size from the header.
        size: u64,
        /// What the blocks cover.
        max: u64,
    },
    /// More blocks allocated than exist.
    #[error("invalid VDI image ({allocated} blocks allocated of {total})")]
    BadAllocatedCount {
        /// blocks_allocated.
        allocated: u32,
        /// blocks_in_image.
        total: u32,
    },
    /// The block map runs into the data area or past the end of the file.
    #[error("block map at {offset:#x} ({len} bytes) runs past {limit:#x}")]
    BlockMapOutOfRange {
        /// Start of the block map.
        offset: u64,
        /// Its length in bytes.
        len: u64,
        /// Where it had to end (data offset or file size).
        limit: u64,
    },
    /// The block map or data area starts inside the header.
    #[error("{what} at {offset:#x} overlaps the header")]
    OverlapsHeader {
        /// Which area.
        what: &'static str,
        /// Its offset.
        offset: u32,
    },
    /// A block map entry names a data block that cannot exist.
    #[error("block map entry {index} is invalid ({entry:#x})")]
    BadBlockMapEntry {
        /// Block index.
        index: u64,
        /// The entry.
        entry: u32,
    },
    /// A differencing image whose parent UUID matched no file nearby.
    #[error("differencing image: parent {0} not found next to it")]
    ParentNotFound(String),
    /// Several files next to a differencing image carry its parent's image UUID (copies of
    /// one disk), and their modification UUIDs do not tell which one the child was made on.
    #[error(
        "differencing image: several files carry parent UUID {0} and none is singled out by the \
         parent modification UUID; move the copies that are not its parent elsewhere"
    )]
    AmbiguousParent(String),
    /// A data block to be written would start more than [`super::MAX_DATA_GAP`] past the end of
    /// the file (the header's data offset, its count of allocated blocks or a block map entry
    /// is inconsistent with the file).
    #[error("data block {block} at {offset:#x} would start far past the end of the file ({file_len:#x})")]
    DataPastEnd {
        /// The data block index.
        block: u32,
        /// Where it would start in the file.
        offset: u64,
        /// The file's length.
        file_len: u64,
    },
    /// The image is full: no data block index is left.
    #[error("no free data block left")]
    Full,
    /// An invalid creation option.
    #[error("{0}")]
    InvalidOption(String),
}
