//! What can be wrong with a qcow2 image.

/// A malformed qcow2 image, or one that uses something this driver refuses.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The file is shorter than a qcow2 header.
    #[error("file too short for a qcow2 header ({0} bytes)")]
    Truncated(u64),
    /// The first four bytes are not `QFI\xfb`.
    #[error("not a qcow2 image (bad magic {0:#010x})")]
    BadMagic(u32),
    /// Only versions 2 and 3 exist.
    #[error("unsupported qcow2 version {0}")]
    UnsupportedVersion(u32),
    /// cluster_bits outside 9..=21 (512 B to 2 MiB).
    #[error("unsupported cluster size: 2^{0}")]
    BadClusterBits(u32),
    /// A v3 header_length below 104 or past the first cluster.
    #[error("invalid header length {0}")]
    BadHeaderLength(u32),
    /// refcount_order above 6, or not 4 in a version 2 image.
    #[error("invalid refcount order {0}")]
    BadRefcountOrder(u32),
    /// The image sets incompatible feature bits this driver does not know.
    #[error("unsupported qcow2 feature(s): {0}")]
    UnknownIncompatible(String),
    /// The virtual size is larger than qcow2 can address.
    #[error("image size {0} is too large")]
    SizeTooLarge(u64),
    /// Growing the disk would take an L1 table past qemu's limit (qemu's words).
    #[error("Failed to grow the L1 table: File too large")]
    L1GrowTooLarge,
    /// The L1 table cannot cover the virtual size.
    #[error("L1 table with {l1_size} entries is too small for a {size}-byte disk")]
    L1TooSmall {
        /// Entries in the header.
        l1_size: u32,
        /// The virtual size.
        size: u64,
    },
    /// The L1 table is larger than [`super::MAX_L1_BYTES`].
    #[error("L1 table of {0} entries is too large")]
    L1TooLarge(u32),
    /// The refcount table is larger than [`super::MAX_REFTABLE_BYTES`].
    #[error("refcount table of {0} clusters is too large")]
    RefcountTableTooLarge(u32),
    /// A table or structure offset is not cluster aligned.
    #[error("{what} offset {offset:#x} is not cluster aligned")]
    Misaligned {
        /// Which structure.
        what: &'static str,
        /// The offset found.
        offset: u64,
    },
    /// The header gives the refcount table no clusters (qemu's words).
    #[error("Image does not contain a reference count table")]
    NoRefcountTable,
    /// A structure lies partly or wholly past the end of the file, or overflows.
    #[error("{what} at offset {offset:#x} is outside the image file")]
    OutOfFile {
        /// Which structure.
        what: &'static str,
        /// The offset found.
        offset: u64,
    },
    /// A structure overlaps the header cluster.
    #[error("{what} at offset {offset:#x} overlaps the image header")]
    OverlapsHeader {
        /// Which structure.
        what: &'static str,
        /// The offset found.
        offset: u64,
    },
    /// Header extensions run past the first cluster or are malformed.
    #[error("invalid header extension at offset {0}")]
    BadExtension(u64),
    /// The backing file name is too long or not UTF-8.
    #[error("invalid backing file name (offset {offset}, length {len})")]
    BadBackingName {
        /// Where the name is.
        offset: u64,
        /// Its length.
        len: u32,
    },
    /// The external data file bit and the data file extension disagree.
    #[error("image needs an external data file but names none")]
    MissingDataFile,
    /// The `data-file` open option for an image that keeps its data inside.
    #[error("'data-file' can only be set for images with an external data file")]
    DataFileOptionWithoutDataFile,
    /// The raw-data-file autoclear bit without an external data file.
    #[error("data-file-raw requires a data file")]
    DataFileRawWithoutDataFile,
    /// A backing file was asked of an image whose raw data file must stay a plain copy of the
    /// disk (what lies below could not show through it).
    #[error("a backing file cannot be set on an image with data-file-raw")]
    BackingWithRawDataFile,
    /// A crypt_method other than none (0), AES (1) and LUKS (2).
    #[error("Unsupported encryption method: {0}")]
    Encrypted(u32),
    /// crypt_method LUKS without the crypto header extension.
    #[error("LUKS encryption without a crypto header extension")]
    MissingCryptoHeader,
    /// The crypto header extension with another crypt_method.
    #[error("Crypto header extension only expected with LUKS encryption method")]
    UnexpectedCryptoHeader,
    /// The crypto header extension points outside the file, is misaligned or too large.
    #[error("invalid crypto header at offset {offset:#x} length {length}")]
    BadCryptoHeader {
        /// Offset from the extension.
        offset: u64,
        /// Length from the extension.
        length: u64,
    },
    /// An unknown compression type.
    #[error("unknown compression type {0}")]
    BadCompressionType(u8),
    /// A compressed cluster does not decompress to a full cluster.
    #[error("compressed cluster at host offset {0:#x} is corrupt")]
    BadCompressedData(u64),
    /// A compressed L2 entry where compression cannot occur.
    #[error("compressed cluster in an image with an external data file")]
    CompressedWithDataFile,
    /// An L2 entry whose flags make no sense (e.g. subcluster both allocated and zero).
    #[error("invalid L2 entry {entry:#018x} for guest offset {guest:#x}")]
    BadL2Entry {
        /// The raw entry.
        entry: u64,
        /// The guest offset it maps.
        guest: u64,
    },
    /// The snapshot table is malformed.
    #[error("invalid snapshot table: {0}")]
    BadSnapshotTable(&'static str),
    /// Too many snapshots.
    #[error("too many snapshots ({0})")]
    TooManySnapshots(u32),
    /// A write would have landed on metadata (the refcounts call a metadata cluster free, or an
    /// L2 entry points into a table): refused, and the image marked corrupt, as qemu does.
    #[error("Preventing invalid write on metadata at offset {offset:#x} (overlaps with {what}); image marked corrupt")]
    MetadataOverlap {
        /// The first metadata cluster the write would have overwritten.
        offset: u64,
        /// What it holds, in qemu's words.
        what: &'static str,
    },
    /// The image is marked corrupt and cannot be opened for writing.
    #[error("image is marked corrupt; it can only be opened read-only (use 'img check -r all')")]
    MarkedCorrupt,
    /// The image is marked dirty and its refcounts would need a rebuild this driver refuses.
    #[error("image is dirty and its refcounts are inconsistent")]
    DirtyInconsistent,
    /// The file has grown past what the refcount structures can describe.
    #[error("image file would exceed the maximum qcow2 size")]
    FileTooLarge,
    /// A refcount block claims a cluster past the end of the file is in use.
    #[error("refcount of cluster at {0:#x}, past the end of the file, is not zero")]
    RefcountPastEnd(u64),
    /// Allocation kept finding its refcount blocks overwritten or missing.
    #[error("refcount structures are inconsistent; run 'img check -r all'")]
    RefcountStructureInconsistent,
    /// A refcount would overflow its width.
    #[error("refcount of cluster at {0:#x} would overflow")]
    RefcountOverflow(u64),
    /// A refcount would drop below zero.
    #[error("refcount of cluster at {0:#x} would drop below zero")]
    RefcountUnderflow(u64),
    /// The bitmaps header extension is malformed or exceeds a limit.
    #[error("invalid bitmaps extension: {0}")]
    BadBitmapExtension(&'static str),
    /// A bitmap directory entry is malformed.
    #[error("invalid bitmap directory entry at offset {offset:#x}: {reason}")]
    BadBitmapDirectory {
        /// File offset of the entry.
        offset: u64,
        /// What is wrong.
        reason: &'static str,
    },
    /// A bitmap table entry is malformed.
    #[error("invalid bitmap table entry at offset {offset:#x}: {reason}")]
    BadBitmapTable {
        /// File offset of the entry.
        offset: u64,
        /// What is wrong.
        reason: &'static str,
    },
    /// qemu refuses to revert to a snapshot while the image holds dirty bitmaps.
    #[error("Device has active dirty bitmaps")]
    ActiveBitmaps,
    /// An invalid creation option.
    #[error("{0}")]
    InvalidOption(String),
}
