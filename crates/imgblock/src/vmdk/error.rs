//! What can be wrong with a vmdk image.

/// A malformed vmdk image, or one that uses something this driver refuses.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The file is too short for a sparse header.
    #[error("file too short for a vmdk header ({0} bytes)")]
    Truncated(u64),
    /// Neither `KDMV`, `COWD` nor a text descriptor.
    #[error("not a vmdk image (no sparse header magic and no descriptor)")]
    BadMagic,
    /// A text descriptor longer than [`super::MAX_DESCRIPTOR_BYTES`].
    #[error("descriptor of {0} bytes is too large")]
    DescriptorTooLarge(u64),
    /// A required descriptor key is missing.
    #[error("invalid VMDK image descriptor: no {0}")]
    MissingKey(&'static str),
    /// A sparse extent file without a descriptor of its own (a piece of a split disk, or a
    /// snapshot's delta), opened as a whole image.
    #[error("this is an extent of a split or snapshot disk, without a descriptor of its own; open the descriptor file (.vmdk) that names it, as it holds the disk's other extents and parent")]
    BareExtent,
    /// A descriptor value that does not parse.
    #[error("invalid descriptor value {key}={value}")]
    BadValue {
        /// The key.
        key: &'static str,
        /// The value found.
        value: String,
    },
    /// A createType this driver cannot open.
    #[error("Unsupported image type '{0}'")]
    UnsupportedCreateType(String),
    /// An extent line that does not parse.
    #[error("Invalid extent line: {0}")]
    BadExtentLine(String),
    /// An extent type this driver cannot read.
    #[error("Unsupported extent type '{0}'")]
    UnsupportedExtentType(String),
    /// More extents than [`super::MAX_EXTENTS`].
    #[error("too many extents ({0})")]
    TooManyExtents(usize),
    /// A descriptor with no extents.
    #[error("descriptor lists no extents")]
    NoExtents,
    /// The extents add up to more than a disk can have.
    #[error("extents add up to more than {0} bytes")]
    DiskTooLarge(u64),
    /// A sparse header version above 3.
    #[error("Unsupported VMDK version {0}")]
    UnsupportedVersion(u32),
    /// A version 3 image that is not compressed can only be read (qemu's rule: v3 adds
    /// changed-block tracking that a writer would have to maintain).
    #[error("VMDK version 3 must be read only")]
    Version3ReadOnly,
    /// numGTEsPerGT of 0 or above 512 (4096 for COWD).
    #[error("invalid number of grain table entries per table: {0}")]
    BadGtesPerGt(u32),
    /// A grain size of 0, not a power of two, or above [`super::MAX_GRAIN_SECTORS`].
    #[error("Invalid granularity {0} sectors, image may be corrupt")]
    BadGrainSize(u64),
    /// A capacity that overflows or exceeds [`super::MAX_CAPACITY_SECTORS`].
    #[error("invalid capacity of {0} sectors")]
    BadCapacity(u64),
    /// A grain directory larger than [`super::MAX_GD_BYTES`].
    #[error("grain directory of {0} entries is too large")]
    GdTooLarge(u64),
    /// The grain directories of all the extents would take more than
    /// [`super::MAX_TOTAL_GD_BYTES`] of memory (many extents, or one file named many times).
    #[error("grain directories of the extents take more than {0} bytes in all")]
    DirectoriesTooLarge(u64),
    /// An unknown compression algorithm.
    #[error("unsupported compression algorithm {0}")]
    BadCompression(u16),
    /// A structure lies outside the file.
    #[error("{what} at sector {sector} is outside the file")]
    OutOfFile {
        /// Which structure.
        what: &'static str,
        /// Its sector.
        sector: u64,
    },
    /// The file is shorter than the header's overhead says.
    #[error("File truncated, expecting at least {0} bytes")]
    FileTruncated(u64),
    /// A stream footer that does not check out.
    #[error("Invalid footer")]
    BadFooter,
    /// A grain table entry points past the end of the extent file.
    #[error("grain table entry for guest offset {guest:#x} points to sector {sector}, past the end of the file")]
    GrainOutOfFile {
        /// Guest offset of the grain.
        guest: u64,
        /// The entry.
        sector: u64,
    },
    /// A grain directory entry points past the end of the extent file.
    #[error("grain directory entry {index} points to sector {sector}, past the end of the file")]
    GtOutOfFile {
        /// GD index.
        index: u64,
        /// The entry.
        sector: u64,
    },
    /// A compressed grain's marker names another grain, or its data does not inflate.
    #[error("compressed grain at sector {0} is corrupt")]
    BadCompressedGrain(u64),
    /// The parent's CID is not the parentCID this delta was made against.
    #[error("parent {parent} has CID {found:08x}, this image expects {expected:08x}")]
    ParentCidMismatch {
        /// The parent's file name.
        parent: String,
        /// parentCID in this image.
        expected: u32,
        /// CID in the parent.
        found: u32,
    },
    /// A write to an extent that cannot be written (ZERO, read-only, COWD, finished stream).
    #[error("{0} cannot be written")]
    NotWritable(&'static str),
    /// streamOptimized output must be written in guest order, each grain once.
    #[error("streamOptimized: grain at {0:#x} written out of order or twice")]
    StreamOutOfOrder(u64),
    /// The extent file has grown past what 32-bit sector numbers can address.
    #[error("extent file is full (grain tables address 2 TiB)")]
    ExtentFull,
    /// A seSparse extent's const header magic is not 0xcafebabe.
    #[error("seSparse const header: bad magic {found:#018x} at byte {offset}")]
    SeSparseConstMagic {
        /// Byte offset of the field in the extent file.
        offset: u64,
        /// The value found.
        found: u64,
    },
    /// A seSparse const header version other than 0x200000001 (the only one ESXi writes).
    #[error("seSparse const header: unsupported version {found:#018x} at byte {offset}")]
    SeSparseVersion {
        /// Byte offset of the field in the extent file.
        offset: u64,
        /// The value found.
        found: u64,
    },
    /// A seSparse grain size other than 8 sectors.
    #[error("seSparse const header: unsupported grain size {found} at byte {offset}")]
    SeSparseGrainSize {
        /// Byte offset of the field in the extent file.
        offset: u64,
        /// The value found, in sectors.
        found: u64,
    },
    /// A seSparse grain table size other than 64 sectors.
    #[error("seSparse const header: unsupported grain table size {found} at byte {offset}")]
    SeSparseGtSize {
        /// Byte offset of the field in the extent file.
        offset: u64,
        /// The value found, in sectors.
        found: u64,
    },
    /// Non-zero seSparse const header flags (none are defined).
    #[error("seSparse const header: unsupported flags {found:#018x} at byte {offset}")]
    SeSparseFlags {
        /// Byte offset of the field in the extent file.
        offset: u64,
        /// The value found.
        found: u64,
    },
    /// A reserved field or padding of a seSparse header that is not zero.
    #[error("seSparse header: non-zero reserved field or padding at byte {offset}")]
    SeSparseReserved {
        /// Byte offset of the first non-zero byte in the extent file.
        offset: u64,
    },
    /// A seSparse volatile header magic that is not 0xcafecafe.
    #[error("seSparse volatile header: bad magic {found:#018x} at byte {offset}")]
    SeSparseVolatileMagic {
        /// Byte offset of the field in the extent file.
        offset: u64,
        /// The value found.
        found: u64,
    },
    /// The seSparse journal must be replayed first (the extent was not closed cleanly).
    #[error("Image is dirty, Replaying journal not supported (replay_journal at byte {offset})")]
    SeSparseDirty {
        /// Byte offset of the field in the extent file.
        offset: u64,
    },
    /// A seSparse grain directory too short for the extent's capacity.
    #[error("seSparse grain directory has {entries} entries, the capacity needs {needed}")]
    SeSparseGdTooSmall {
        /// Entries in the directory.
        entries: u64,
        /// Entries the capacity needs.
        needed: u64,
    },
    /// A seSparse grain directory entry with an unknown type, or naming a grain table outside
    /// the grain tables area.
    #[error("seSparse grain directory entry {index} is invalid: {entry:#018x}")]
    SeSparseBadGdEntry {
        /// GD index.
        index: u64,
        /// The entry.
        entry: u64,
    },
    /// A seSparse grain table entry with an unknown type, or an unallocated one with bits set.
    #[error("seSparse grain table entry for guest offset {guest:#x} is invalid: {entry:#018x}")]
    SeSparseBadGte {
        /// Guest offset of the grain.
        guest: u64,
        /// The entry.
        entry: u64,
    },
    /// seSparse extents are read here, never written (qemu's rule too).
    #[error("No write support for seSparse images available")]
    SeSparseReadOnly,
    /// An invalid creation option.
    #[error("{0}")]
    InvalidOption(String),
}
