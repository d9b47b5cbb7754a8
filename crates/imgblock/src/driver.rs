//! The format-driver abstraction.
//!
//! A driver answers one question: where does guest data live? It maps guest ranges to host
//! offsets, zeroes, compressed clusters or "not here, ask the backing image". Everything that
//! moves data (reads, copy-on-write, the walk down the backing chain) lives in [`crate::Image`].

use std::fmt::Debug;
use std::sync::Arc;

use crate::bitmaps::{BitmapError, DirtyBits};
use crate::crypto::{DataCipher, EncryptionInfo};
use crate::storage::Storage;
use crate::{Format, Result};

/// Which offset numbers an encrypted sector (the IV generator's input), as qemu chooses per
/// format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SectorNumbering {
    /// The sector's host offset in the image file divided by 512 (LUKS inside qcow2).
    Host,
    /// The guest offset divided by 512 (legacy qcow AES, the `luks` format's payload).
    Guest,
}

/// An offset in a host file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HostOffset(pub u64);

/// A compressed cluster: where its bytes are and which guest cluster it holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CompressedRef {
    /// Start of the compressed bytes in the image file.
    pub host: HostOffset,
    /// Upper bound of the compressed length (the descriptor counts whole sectors).
    pub len: u64,
    /// Guest offset of the cluster's first byte.
    pub guest_cluster: u64,
}

/// Where a guest range lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mapping {
    /// Plain data in the driver's storage number `file`.
    Data {
        /// Index into [`Driver::storage`].
        file: usize,
        /// Host offset of the first byte of the range.
        offset: HostOffset,
        /// Whether the range may be overwritten in place (qcow2: the cluster's refcount is 1).
        writable: bool,
    },
    /// Reads as zeroes; `offset` is set when host space is still allocated for it.
    Zero {
        /// Preallocated host space, if any.
        offset: Option<(usize, HostOffset)>,
    },
    /// A compressed cluster.
    Compressed(CompressedRef),
    /// Not in this image: read from the backing image, or zeroes when there is none.
    Unallocated,
    /// Not in this image either, but host space is already reserved for it at `offset`
    /// (qcow2 subclusters of an allocated cluster); block status reports the offset like qemu.
    UnallocatedAt {
        /// Index into [`Driver::storage`].
        file: usize,
        /// Host offset of the first byte.
        offset: HostOffset,
    },
    /// Past the end of the virtual disk.
    Eof,
}

/// A run of newly allocated host space for a guest range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostExtent {
    /// Guest offset of the first byte.
    pub guest: u64,
    /// Length in bytes.
    pub len: u64,
    /// Index into [`Driver::storage`].
    pub file: usize,
    /// Host offset of the first byte.
    pub host: HostOffset,
}

/// The backing reference stored in an image's header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackingSpec {
    /// The file name exactly as stored.
    pub filename: String,
    /// The format, if the image records one.
    pub format: Option<String>,
}

/// Which internal snapshot to read (qemu-img's `-l`): by ID, by name, by both (the snapshot
/// must have that ID and that name), or a bare string tried as an ID, then as a name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SnapshotRef {
    /// A bare string: an ID if one matches, else a name.
    IdOrName(String),
    /// `snapshot.id=`.
    Id(String),
    /// `snapshot.name=`.
    Name(String),
    /// `snapshot.id=` and `snapshot.name=` together.
    Both {
        /// The ID.
        id: String,
        /// The name.
        name: String,
    },
}

impl SnapshotRef {
    /// The index of the snapshot this names among `snaps`, each seen through `key` as its
    /// (ID, name), if any.
    pub fn position<T>(&self, snaps: &[T], key: impl Fn(&T) -> (&str, &str)) -> Option<usize> {
        let by = |want: &dyn Fn(&str, &str) -> bool| {
            snaps.iter().position(|x| {
                let (id, name) = key(x);
                want(id, name)
            })
        };
        match self {
            SnapshotRef::IdOrName(s) => by(&|id, _| id == s).or_else(|| by(&|_, name| name == s)),
            SnapshotRef::Id(want) => by(&|id, _| id == want),
            SnapshotRef::Name(want) => by(&|_, name| name == want),
            SnapshotRef::Both { id: i, name: n } => by(&|id, name| id == i && name == n),
        }
    }

    /// How the user named it (for messages): the name, else the ID.
    pub fn label(&self) -> &str {
        match self {
            SnapshotRef::IdOrName(s) | SnapshotRef::Id(s) | SnapshotRef::Name(s) => s,
            SnapshotRef::Both { name, .. } => name,
        }
    }
}

impl From<&str> for SnapshotRef {
    fn from(s: &str) -> SnapshotRef {
        SnapshotRef::IdOrName(s.to_owned())
    }
}

impl From<String> for SnapshotRef {
    fn from(s: String) -> SnapshotRef {
        SnapshotRef::IdOrName(s)
    }
}

/// One internal snapshot, as `info` and `snapshot -l` list it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotInfo {
    /// The unique ID string.
    pub id: String,
    /// The name (tag).
    pub name: String,
    /// Size of the saved VM state.
    pub vm_state_size: u64,
    /// Creation time, seconds since the epoch.
    pub date_sec: u32,
    /// Creation time, nanosecond part.
    pub date_nsec: u32,
    /// Guest clock at creation, in nanoseconds.
    pub vm_clock_nsec: u64,
    /// Instruction count, when recorded.
    pub icount: Option<u64>,
    /// Disk size at the time of the snapshot, when recorded.
    pub disk_size: Option<u64>,
}

/// Format-specific facts for `info`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FormatSpecific {
    /// Nothing to say (raw).
    None,
    /// qcow2's header facts.
    Qcow2(Qcow2Specific),
    /// vmdk's descriptor facts.
    Vmdk(VmdkSpecific),
    /// vdi's header facts (qemu-img prints none for vdi; `img` may).
    Vdi(VdiSpecific),
}

/// vmdk's `format-specific` block, as qemu-img info shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmdkSpecific {
    /// The descriptor's createType.
    pub create_type: String,
    /// Content ID.
    pub cid: u32,
    /// The parent's content ID (0xffffffff: none).
    pub parent_cid: u32,
    /// One entry per extent.
    pub extents: Vec<VmdkExtentInfo>,
}

/// One vmdk extent in `info`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmdkExtentInfo {
    /// The extent file's path: the descriptor's name for it, resolved against the directory of
    /// the descriptor file as it was opened (what qemu shows).
    pub filename: String,
    /// The extent type as the descriptor names it ("" for an embedded descriptor).
    pub format: String,
    /// Guest bytes the extent covers.
    pub virtual_size: u64,
    /// Grain size for sparse extents.
    pub cluster_size: Option<u64>,
    /// Grains are compressed (streamOptimized).
    pub compressed: bool,
}

/// vdi's header facts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VdiSpecific {
    /// "dynamic", "static" or "differencing".
    pub image_type: &'static str,
    /// The image UUID.
    pub uuid: String,
    /// The modification UUID.
    pub last_modification_uuid: Option<String>,
    /// Differencing images: the parent's image UUID.
    pub parent_uuid: Option<String>,
    /// Differencing images: the parent's modification UUID when the child was made.
    pub parent_modification_uuid: Option<String>,
}

/// qcow2's `format-specific` block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Qcow2Specific {
    /// "0.10" or "1.1".
    pub compat: &'static str,
    /// "zlib" or "zstd".
    pub compression_type: &'static str,
    /// Lazy refcounts enabled (v3 only).
    pub lazy_refcounts: bool,
    /// Refcount width.
    pub refcount_bits: u32,
    /// The corrupt bit (v3 only).
    pub corrupt: bool,
    /// Extended L2 entries (v3 only).
    pub extended_l2: bool,
    /// External data file name.
    pub data_file: Option<String>,
    /// Whether the external data file is raw.
    pub data_file_raw: bool,
    /// Persistent dirty bitmaps, in directory order.
    pub bitmaps: Vec<BitmapInfo>,
}

/// A persistent dirty bitmap, as `qemu-img info` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitmapInfo {
    /// The bitmap's name.
    pub name: String,
    /// Bytes of guest data one bit covers.
    pub granularity: u64,
    /// The bitmap records writes (qemu's `auto` flag).
    pub enabled: bool,
    /// The bitmap was not stored back after use and cannot be trusted (qemu's `in-use`).
    pub in_use: bool,
}

/// A format driver. Implementations are safe to call from several threads at once.
pub trait Driver: Send + Sync + Debug {
    /// The format.
    fn format(&self) -> Format;
    /// The size of the virtual disk in bytes.
    fn virtual_size(&self) -> u64;
    /// Host files the driver keeps data in; index 0 is the image file itself.
    fn storage(&self, file: usize) -> &Arc<dyn Storage>;
    /// How many host files there are ([`Driver::storage`]'s indices).
    fn files(&self) -> usize {
        1
    }
    /// How many of the host files, from index 0, count in the image's disk usage (`info`'s
    /// "disk size"): by default the image file alone, as in qemu (an external data file is
    /// not counted).
    fn usage_files(&self) -> usize {
        1
    }
    /// Cluster size, for formats that have one.
    fn cluster_size(&self) -> Option<u64> {
        None
    }
    /// The backing reference from the header.
    fn backing(&self) -> Option<BackingSpec> {
        None
    }
    /// Whether the driver's header marks it dirty (refcounts may be stale).
    fn dirty(&self) -> bool {
        false
    }
    /// Format-specific facts.
    fn specific(&self) -> FormatSpecific {
        FormatSpecific::None
    }
    /// Whether a newly created image reads as zeroes everywhere (qemu's `has_zero_init`); when
    /// not (the `luks` format, whose unwritten payload decrypts to noise), convert must write
    /// zeroes explicitly.
    fn has_zero_init(&self) -> bool {
        true
    }
    /// Whether guest data is stored encrypted.
    fn encrypted(&self) -> bool {
        false
    }
    /// How the data is encrypted, for `info`'s `encrypt` block.
    fn encryption_info(&self) -> Option<EncryptionInfo> {
        None
    }
    /// The cipher [`Mapping::Data`] ranges are stored under, and which offset numbers their
    /// sectors; `None` for plaintext formats. [`crate::Image`] decrypts after reading and
    /// encrypts (in a scratch buffer) before writing; a driver never sees plaintext I/O.
    ///
    /// # Errors
    /// [`crate::Error::KeyRequired`] when the image is encrypted but was opened without its
    /// secret (metadata only).
    fn data_cipher(&self) -> Result<Option<(&DataCipher, SectorNumbering)>> {
        Ok(None)
    }
    /// Internal snapshots.
    ///
    /// # Errors
    /// When the snapshot table cannot be read.
    fn snapshots(&self) -> Result<Vec<SnapshotInfo>> {
        Ok(Vec::new())
    }
    /// A read-only view of a snapshot's contents.
    ///
    /// # Errors
    /// When there is no such snapshot or its tables are bad.
    fn snapshot_view(&self, snap: &SnapshotRef) -> Result<Box<dyn Driver>>;
    /// Where `offset` lives, and for how many bytes (at least 1, at most `len`) that holds.
    ///
    /// # Errors
    /// When metadata is unreadable or corrupt.
    fn map(&self, offset: u64, len: u64) -> Result<(Mapping, u64)>;
    /// Where qemu's block status for this format stops at the latest when asked at `offset`:
    /// its vmdk driver answers one grain at a time (a flat extent at once), its vdi driver one
    /// block at a time, whatever [`Driver::map`] joins. `None` where nothing short of the
    /// mapping ends it. Strict `compare` steps by these answers (its end-of-image flag depends
    /// on them).
    fn status_boundary(&self, offset: u64) -> Option<u64> {
        let _ = offset;
        None
    }
    /// Whether data may be read through to the backing file. A VMware delta whose parent has
    /// changed since the delta was made may not (qemu fails those reads, and only those: the
    /// image still opens, maps and checks).
    ///
    /// # Errors
    /// Why the backing file's data cannot be used.
    fn backing_usable(&self) -> Result<()> {
        Ok(())
    }
    /// Whether holes in the host file of a [`Mapping::Data`] range read as zeroes and should be
    /// reported so by block status (raw).
    fn host_holes_are_zero(&self) -> bool {
        false
    }
    /// Whether block status should ask host file number `file` about the [`Mapping::Data`]
    /// ranges in it and report holes there as zero while still data (qemu's "recurse":
    /// metadata-preallocated qcow2, flat vmdk extents, static vdi).
    fn data_holes_read_as_zero(&self, file: usize) -> bool {
        let _ = file;
        false
    }
    /// Decompresses one cluster into `out` (exactly one cluster long).
    ///
    /// # Errors
    /// When the compressed data is bad.
    fn read_compressed(&self, c: &CompressedRef, out: &mut [u8]) -> Result<()>;
    /// The unit of allocation and copy-on-write in bytes (1 when everything is writable in place).
    fn cow_granularity(&self) -> u64 {
        1
    }
    /// The area a write to `[offset, offset + len)` must fill when it cannot go in place: the
    /// write expanded to allocation units. Formats whose unit depends on the existing mapping
    /// (qcow2 subclusters) override it.
    ///
    /// # Errors
    /// When metadata cannot be read.
    fn cow_area(&self, offset: u64, len: u64) -> Result<(u64, u64)> {
        let g = self.cow_granularity().max(1);
        Ok((offset / g * g, (offset + len).div_ceil(g) * g))
    }
    /// Reserves host space for a guest range aligned to [`Driver::cow_granularity`]. The caller
    /// writes the data there and then calls [`Driver::commit`]; until then the mapping is unchanged.
    ///
    /// # Errors
    /// When the image is read-only or metadata cannot be written.
    fn allocate(&self, offset: u64, len: u64) -> Result<Vec<HostExtent>>;
    /// Points the guest range at the extents [`Driver::allocate`] returned, whose data is written.
    ///
    /// # Errors
    /// When metadata cannot be written.
    fn commit(&self, extents: &[HostExtent]) -> Result<()>;
    /// Makes a granularity-aligned range read as zeroes through metadata alone, if the format can.
    /// Returns false when it cannot and the caller must write zeroes.
    ///
    /// # Errors
    /// When metadata cannot be written.
    fn zero(&self, offset: u64, len: u64, unmap: bool) -> Result<bool>;
    /// Drops the data of a granularity-aligned range (what it reads as afterwards is the format's
    /// choice, as in qemu).
    ///
    /// # Errors
    /// When metadata cannot be written.
    fn discard(&self, offset: u64, len: u64) -> Result<()>;
    /// Whether compressed writes are accepted ([`Driver::write_compressed`]; a cluster that does
    /// not shrink is then stored plain). False for formats without compression and for images
    /// that cannot hold compressed clusters (qcow2 with an external data file), where qemu fails
    /// the write with ENOTSUP.
    fn can_write_compressed(&self) -> bool {
        false
    }
    /// Whether every cluster is stored compressed whatever the writer asks (a streamOptimized
    /// vmdk): a copy into such an image should compress its clusters up front, in parallel.
    fn always_compressed(&self) -> bool {
        false
    }
    /// Compresses one guest cluster for [`Driver::write_compressed`]; `None` when the format
    /// cannot store compressed clusters or the data does not shrink. Pure: callable from workers.
    fn compress_cluster(&self, data: &[u8]) -> Option<Vec<u8>> {
        let _ = data;
        None
    }
    /// Stores a cluster that [`Driver::compress_cluster`] compressed, at a cluster-aligned offset.
    ///
    /// # Errors
    /// When the format has no compression, or metadata cannot be written.
    fn write_compressed(&self, offset: u64, compressed: &[u8]) -> Result<()> {
        let _ = (offset, compressed);
        Err(crate::Error::Unsupported {
            path: self.storage(0).path().to_owned(),
            what: "this format cannot store compressed clusters".into(),
        })
    }
    /// Stores several compressed clusters, as [`Driver::write_compressed`] does one by one (the
    /// default), in the order given; a format may place and record them with fewer writes.
    ///
    /// # Errors
    /// As for [`Driver::write_compressed`]; clusters before the failing one may be stored.
    fn write_compressed_batch(&self, clusters: &[(u64, &[u8])]) -> Result<()> {
        for &(offset, compressed) in clusters {
            self.write_compressed(offset, compressed)?;
        }
        Ok(())
    }
    /// Changes the virtual size; new space is preallocated as asked. `zero_new` says that a
    /// backing image reaches past the old end, so the new space must be made to read as zeroes
    /// rather than fall through to it (qemu zero-writes it on truncate).
    ///
    /// # Errors
    /// When the format cannot resize this image, or I/O fails.
    fn resize(
        &mut self,
        new_size: u64,
        prealloc: crate::raw::Preallocation,
        zero_new: bool,
    ) -> Result<()> {
        let _ = (new_size, prealloc, zero_new);
        Err(self.unsupported("resizing"))
    }
    /// Changes options of an existing image (`img amend -o`). `backing_size` is the size of
    /// the backing image, if any: a new size past the old end that it reaches must read as
    /// zeroes, as in `resize`.
    ///
    /// # Errors
    /// When the format cannot amend, an option is refused, or I/O fails.
    fn amend(&mut self, opts: &crate::CreateOptions, backing_size: Option<u64>) -> Result<()> {
        let _ = (opts, backing_size);
        Err(self.unsupported("amend"))
    }
    /// Zeroes written from now on must still read as zeroes once a backing file is set (a safe
    /// rebase onto one is under way, the image may have none yet): they are recorded
    /// explicitly, never left unallocated. Formats without backing files ignore it.
    fn expect_backing(&self) {}
    /// Replaces the backing reference in the header (no data is touched).
    ///
    /// # Errors
    /// When the format has no backing files, or the header cannot be rewritten.
    fn set_backing(&self, backing: Option<&BackingSpec>) -> Result<()> {
        let _ = backing;
        Err(self.unsupported("backing files"))
    }
    /// Drops every allocation so that the whole disk reads from the backing image (qemu's
    /// make_empty, used after commit). Returns false, changing nothing, when the format has no
    /// way to (qemu's commit then leaves the overlay as it is).
    ///
    /// # Errors
    /// When I/O fails.
    fn make_empty(&self) -> Result<bool> {
        Ok(false)
    }
    /// Creates an internal snapshot named `name` dated `(seconds, nanoseconds)`.
    ///
    /// # Errors
    /// When the format has no internal snapshots, the name is taken, or I/O fails.
    fn snapshot_create(&self, name: &str, date: (u32, u32)) -> Result<()> {
        let _ = (name, date);
        Err(self.unsupported("internal snapshots"))
    }
    /// Reverts to the internal snapshot with this ID or name.
    ///
    /// # Errors
    /// When the format has no internal snapshots, there is no such snapshot, or I/O fails.
    fn snapshot_apply(&mut self, name: &str) -> Result<()> {
        let _ = name;
        Err(self.unsupported("internal snapshots"))
    }
    /// Deletes the internal snapshot with this ID or name.
    ///
    /// # Errors
    /// When the format has no internal snapshots, there is no such snapshot, or I/O fails.
    fn snapshot_delete(&self, name: &str) -> Result<()> {
        let _ = name;
        Err(self.unsupported("internal snapshots"))
    }
    /// The error for an operation this format does not offer.
    fn unsupported(&self, what: &str) -> crate::Error {
        crate::Error::Unsupported {
            path: self.storage(0).path().to_owned(),
            what: format!("this image format does not support {what}"),
        }
    }
    /// Whether the format can store persistent dirty bitmaps in this image (qemu's
    /// `supports_persistent_dirty_bitmap`: qcow2 version 3).
    fn supports_bitmaps(&self) -> bool {
        false
    }
    /// The persistent dirty bitmaps, in the order the image stores them.
    fn bitmap_list(&self) -> Vec<BitmapInfo> {
        Vec::new()
    }
    /// Creates an all-clean persistent dirty bitmap `name` of `granularity` bytes per bit
    /// (the format's default when `None`), recording writes when `enabled`. It is placed after
    /// the existing ones.
    ///
    /// # Errors
    /// [`crate::Error::Bitmap`] with [`BitmapError::Unsupported`] for formats without
    /// bitmaps, or another [`BitmapError`] when the name, the granularity or the image refuse
    /// it; I/O errors.
    fn bitmap_add(&self, name: &str, granularity: Option<u64>, enabled: bool) -> Result<()> {
        let _ = (name, granularity, enabled);
        Err(self.bitmap_error(BitmapError::Unsupported))
    }
    /// Deletes the bitmap `name` and frees its clusters.
    ///
    /// # Errors
    /// [`BitmapError::NotFound`] (every format without bitmaps says so); I/O errors.
    fn bitmap_remove(&self, name: &str) -> Result<()> {
        Err(self.bitmap_error(BitmapError::NotFound(name.to_owned())))
    }
    /// Makes every bit of the bitmap `name` clean.
    ///
    /// # Errors
    /// [`BitmapError::NotFound`], [`BitmapError::Inconsistent`]; I/O errors.
    fn bitmap_clear(&self, name: &str) -> Result<()> {
        Err(self.bitmap_error(BitmapError::NotFound(name.to_owned())))
    }
    /// Starts (`true`) or stops recording writes in the bitmap `name`.
    ///
    /// # Errors
    /// [`BitmapError::NotFound`], [`BitmapError::Inconsistent`]; I/O errors.
    fn bitmap_set_enabled(&self, name: &str, enabled: bool) -> Result<()> {
        let _ = enabled;
        Err(self.bitmap_error(BitmapError::NotFound(name.to_owned())))
    }
    /// The bits of the bitmap `name`, with what was written in this session included.
    ///
    /// # Errors
    /// [`BitmapError::NotFound`], [`BitmapError::Inconsistent`]; corrupt bitmap tables; I/O
    /// errors.
    fn bitmap_read(&self, name: &str) -> Result<DirtyBits> {
        Err(self.bitmap_error(BitmapError::NotFound(name.to_owned())))
    }
    /// ORs `bits` (of any granularity, over a disk of the same size) into the bitmap `name`.
    ///
    /// # Errors
    /// [`BitmapError::NotFound`], [`BitmapError::Inconsistent`],
    /// [`BitmapError::SizeMismatch`]; corrupt bitmap tables; I/O errors.
    fn bitmap_merge(&self, name: &str, bits: &DirtyBits) -> Result<()> {
        let _ = bits;
        Err(self.bitmap_error(BitmapError::NotFound(name.to_owned())))
    }
    /// A bitmap error about this image.
    fn bitmap_error(&self, e: BitmapError) -> crate::Error {
        crate::Error::Bitmap {
            path: self.storage(0).path().to_owned(),
            source: e,
        }
    }
    /// Checks metadata consistency and optionally repairs it.
    ///
    /// # Errors
    /// [`crate::Error::Unsupported`] for formats without checks; I/O errors.
    fn check(&self, repair: crate::Repair) -> Result<crate::CheckReport> {
        let _ = repair;
        Err(crate::Error::Unsupported {
            path: self.storage(0).path().to_owned(),
            what: "This image format does not support checks".into(),
        })
    }
    /// Records that a guest range is about to change, before its data or metadata is written
    /// (for formats that keep dirty bitmaps).
    ///
    /// # Errors
    /// When the format's bookkeeping cannot be written.
    fn note_write(&self, offset: u64, len: u64) -> Result<()> {
        let _ = (offset, len);
        Ok(())
    }
    /// Writes back cached metadata and flushes the host files.
    ///
    /// # Errors
    /// When writing fails.
    fn flush(&self) -> Result<()>;
}

#[cfg(test)]
mod tests {
    use super::SnapshotRef;

    #[test]
    fn snapshot_ref_picks_by_id_name_or_both() {
        // ID 1 is named "2"; ID 2 is named "x".
        let snaps = [("1", "2"), ("2", "x")];
        let pos = |r: SnapshotRef| r.position(&snaps, |s| (s.0, s.1));
        assert_eq!(pos(SnapshotRef::IdOrName("2".into())), Some(1));
        assert_eq!(pos(SnapshotRef::IdOrName("x".into())), Some(1));
        assert_eq!(pos(SnapshotRef::Name("2".into())), Some(0));
        assert_eq!(pos(SnapshotRef::Id("x".into())), None);
        let both = |id: &str, name: &str| SnapshotRef::Both {
            id: id.into(),
            name: name.into(),
        };
        assert_eq!(pos(both("2", "x")), Some(1));
        assert_eq!(pos(both("1", "x")), None);
    }
}
