//! qcow2 (versions 2 and 3), per qemu's docs/interop/qcow2.rst.
//!
//! ```text
//!  Qcow2 (Driver)  --map-->  L1 table (in memory) --> L2 tables (cache) --> host clusters
//!        |                                                   ^
//!        +--allocate/commit--> refcount table --> refcount blocks (cache)
//! ```
//! All metadata lives behind one mutex; data I/O happens outside it in [`crate::Image`].

mod amend;
pub mod bitmap;
mod bitmap_ops;
mod cache;
mod check;
mod compress;
mod create;
mod crypt;
mod error;
pub mod header;
mod l2;
mod overlap;
mod rebuild;
mod refcount;
mod resize;
mod snapshot;
mod snapshot_ops;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

pub use create::{can_hold_bitmaps, create, measure_full, preallocates_data, CREATE_OPTIONS};
pub use error::Error;

use crate::driver::{
    BackingSpec, CompressedRef, Driver, FormatSpecific, HostExtent, HostOffset, Mapping,
    Qcow2Specific, SnapshotInfo,
};
use crate::error::IoContext;
use crate::storage::{FileStorage, Storage};
use crate::{Format, Result};
use cache::TableCache;
use header::{CompressionType, Header};
use l2::{Entry, Kind};

/// Largest L1 table qemu accepts (32 MiB of entries).
pub const MAX_L1_BYTES: u64 = 32 << 20;
/// Largest refcount table qemu accepts (8 MiB).
pub const MAX_REFTABLE_BYTES: u64 = 8 << 20;
/// Memory for cached L2 tables.
pub const L2_CACHE_BYTES: usize = 8 << 20;
/// Memory for cached refcount blocks.
pub const REFBLOCK_CACHE_BYTES: usize = 4 << 20;
/// Host offsets are 56 bits wide in L1/L2 entries (bits 9..=55).
pub const MAX_HOST_OFFSET: u64 = 1 << 56;
/// The format stores compressed clusters (`convert -c`), unless an image keeps its data in an
/// external file ([`Driver::can_write_compressed`]).
pub const WRITES_COMPRESSED: bool = true;

/// Offset bits of L1 and standard L2 entries.
const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Refcount is exactly one: the table or cluster may be written in place.
const COPIED: u64 = 1 << 63;
/// L2 entry describes a compressed cluster.
const COMPRESSED: u64 = 1 << 62;
/// L2 entry reads as zeroes (v3, standard L2 only).
const ZERO_FLAG: u64 = 1;

/// Fixed facts derived from the header.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Geometry {
    pub cluster_bits: u32,
    pub cluster_size: u64,
    /// Entries per L2 table.
    pub l2_entries: u64,
    /// Bytes per L2 entry (8, or 16 with extended L2).
    pub l2_entry_size: u64,
    pub extended_l2: bool,
    pub subcluster_size: u64,
    pub refcount_order: u32,
    /// Refcount entries per refcount block.
    pub rb_entries: u64,
    pub version: u32,
    /// Bit where the compressed sector count starts.
    pub csize_shift: u32,
    pub csize_mask: u64,
}

impl Geometry {
    fn new(h: &Header) -> Geometry {
        let cs = h.cluster_size();
        let ext = h.extended_l2();
        let esize = if ext { 16 } else { 8 };
        let sub = if ext { 32 } else { 1 };
        let csize_shift = 62 - (h.cluster_bits - 8);
        Geometry {
            cluster_bits: h.cluster_bits,
            cluster_size: cs,
            l2_entries: cs / esize,
            l2_entry_size: esize,
            extended_l2: ext,
            subcluster_size: cs / sub,
            refcount_order: h.refcount_order,
            rb_entries: (cs * 8) >> h.refcount_order,
            version: h.version,
            csize_shift,
            csize_mask: (1 << (h.cluster_bits - 8)) - 1,
        }
    }

    fn align_up(&self, v: u64) -> u64 {
        v.div_ceil(self.cluster_size) * self.cluster_size
    }
}

/// How an image is opened.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Access {
    /// For writing.
    pub writable: bool,
    /// For `check -r` (qemu's BDRV_O_CHECK): an image marked corrupt opens for writing so that
    /// the check can repair it, and a dirty one is not repaired on opening: the check settles it.
    pub repair: bool,
    /// The external data file to use instead of the one the header names (qemu's `data-file`
    /// option, as Incus gives it when the data lives on a block device).
    pub data_file: Option<PathBuf>,
}

/// Mutable metadata, behind the driver's mutex.
#[derive(Debug)]
pub(crate) struct State {
    pub h: Header,
    pub l1: Vec<u64>,
    pub reftable: Vec<u64>,
    pub l2_cache: TableCache,
    pub rb_cache: TableCache,
    /// Lowest cluster index that may be free.
    pub free_hint: u64,
    /// One past the highest cluster index that may be in use.
    pub end_hint: u64,
    /// Where the next compressed cluster may go, sharing a host cluster with the previous one
    /// (0: start a new cluster).
    pub compressed_cursor: u64,
    /// Persistent dirty bitmaps, when the image has consistent ones.
    pub bitmaps: Option<bitmap::Loaded>,
    /// Which host clusters hold metadata, for the overlap checks (built on first use).
    pub meta: Option<overlap::MetadataMap>,
    /// A write on metadata was prevented in this session: no further writes.
    pub corrupt: bool,
    /// While an operation frees many clusters under one hold of the lock (emptying, discarding
    /// or zeroing a range): the host ranges to deallocate, adjacent ones merged, issued at its
    /// end or before anything is allocated. One request per cluster costs the filesystem a
    /// journal transaction each (16 s to empty 512 MiB on ext4, against 0.1 s merged).
    pub discards: Option<Vec<(u64, u64)>>,
    /// A backing file is about to be set (a safe rebase onto one is under way): zeroes are
    /// recorded as zero clusters even where nothing lies below yet.
    pub backing_coming: bool,
}

/// A qcow2 image.
#[derive(Debug)]
pub struct Qcow2 {
    files: Vec<Arc<dyn Storage>>,
    geo: Geometry,
    size: u64,
    writable: bool,
    /// Index in `files` of the storage that holds guest data.
    data: usize,
    state: Mutex<State>,
    /// Whether the image looks metadata-preallocated (decided on first use, as qemu does).
    metadata_prealloc: std::sync::OnceLock<bool>,
    /// Encryption (crypt_method) and its keys.
    crypt: crypt::Crypt,
    /// The header's compression type, here so that workers compressing or decompressing
    /// clusters need not take the state lock for it; changed only by `amend` (`&mut self`).
    compression: CompressionType,
    /// Whether an enabled bitmap records writes: lets writes skip the state lock otherwise.
    /// Changes when bitmaps are added, removed, enabled or disabled.
    tracks_bitmaps: std::sync::atomic::AtomicBool,
}

pub(crate) fn be64_at(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_be_bytes(a)
}

impl Qcow2 {
    fn err(&self, e: Error) -> crate::Error {
        crate::Error::Qcow2 {
            path: self.files[0].path().to_owned(),
            source: e,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn file(&self) -> &dyn Storage {
        self.files[0].as_ref()
    }

    /// Opens a qcow2 image over a storage; opens its external data file if it has one.
    ///
    /// # Errors
    /// The specific [`Error`] for a bad header or table; I/O errors.
    pub fn open(storage: Arc<dyn Storage>, writable: bool) -> Result<Qcow2> {
        let access = Access {
            writable,
            ..Access::default()
        };
        Self::open_with_key(storage, access, None, false)
    }

    /// Opens a qcow2 image, unlocking its encryption with `key`. An encrypted image without a
    /// key opens only when `metadata_only` (its data then cannot be read or written).
    ///
    /// # Errors
    /// As [`Qcow2::open`]; [`crate::Error::KeyRequired`] without a key, and
    /// [`crate::Error::Crypto`] for a bad LUKS header or a wrong passphrase.
    pub fn open_with_key(
        storage: Arc<dyn Storage>,
        access: Access,
        key: Option<&crate::crypto::Secret>,
        metadata_only: bool,
    ) -> Result<Qcow2> {
        let writable = access.writable;
        let path = storage.path().to_owned();
        let qerr = |e: Error| crate::Error::Qcow2 {
            path: path.clone(),
            source: e,
        };
        let file_len = storage.size().ctx(&path)?;
        if file_len < u64::from(header::V2_HEADER_LEN) {
            return Err(qerr(Error::Truncated(file_len)));
        }
        let mut first = vec![0u8; 4096];
        storage.read_at(&mut first, 0).ctx(&path)?;
        let prelim = Header::parse(
            &first[..first
                .len()
                .min(usize::try_from(file_len).unwrap_or(usize::MAX))],
            file_len,
        );
        let cs = match &prelim {
            Ok(h) => h.cluster_size(),
            Err(Error::BadExtension(_))
            | Err(Error::BadBackingName { .. })
            | Err(Error::Truncated(_)) => {
                // The header cluster is larger than the sample: read it whole and try again.
                let bits = u32::from_be_bytes([first[20], first[21], first[22], first[23]]);
                if (9..=21).contains(&bits) {
                    1u64 << bits
                } else {
                    return Err(qerr(Error::BadClusterBits(bits)));
                }
            }
            Err(_) => return Err(qerr(prelim.err().unwrap_or(Error::Truncated(file_len)))),
        };
        let avail = cs.min(file_len);
        let mut buf = vec![0u8; usize::try_from(avail).unwrap_or(0)];
        storage.read_at(&mut buf, 0).ctx(&path)?;
        let h = Header::parse(&buf, file_len).map_err(&qerr)?;
        let geo = Geometry::new(&h);
        Self::validate(&h, &geo, file_len).map_err(&qerr)?;

        if writable && !access.repair && h.incompatible & header::INCOMPAT_CORRUPT != 0 {
            return Err(qerr(Error::MarkedCorrupt));
        }
        let mut files = vec![storage.clone()];
        let mut data = 0;
        if h.incompatible & header::INCOMPAT_DATA_FILE == 0 && access.data_file.is_some() {
            return Err(qerr(Error::DataFileOptionWithoutDataFile));
        }
        if h.incompatible & header::INCOMPAT_DATA_FILE != 0 {
            let dpath = match &access.data_file {
                Some(p) => p.clone(),
                None => {
                    let name = h.data_file().ok_or_else(|| qerr(Error::MissingDataFile))?;
                    data_file_path(&path, &name)
                }
            };
            // Like qemu-img info, a look at the metadata does without the data file.
            let ds: Arc<dyn Storage> = match FileStorage::open(&dpath, writable) {
                Ok(ds) => Arc::new(ds),
                Err(e) if metadata_only && !writable => {
                    Arc::new(crate::storage::Unopened::new(&dpath, &e))
                }
                Err(e) => return Err(e).ctx(&dpath),
            };
            files.push(ds);
            data = 1;
        }

        let (l1_entries, rt_entries) = held_entries(&h, &geo, file_len, writable);
        let l1 = read_table(storage.as_ref(), h.l1_table_offset, l1_entries).ctx(&path)?;
        let reftable =
            read_table(storage.as_ref(), h.refcount_table_offset, rt_entries).ctx(&path)?;
        let end_hint = file_len.div_ceil(cs);
        let crypt = crypt::open(storage.as_ref(), &h, key, metadata_only)?;
        let bitmaps = bitmap::load(storage.as_ref(), &h, file_len)?;
        let state = State {
            backing_coming: false,
            h,
            l1,
            reftable,
            l2_cache: TableCache::new(L2_CACHE_BYTES),
            rb_cache: TableCache::new(REFBLOCK_CACHE_BYTES),
            free_hint: 0,
            end_hint,
            compressed_cursor: 0,
            bitmaps,
            meta: None,
            corrupt: false,
            discards: None,
        };
        // qemu reads the snapshot table when it opens an image and refuses a malformed one.
        snapshot::read_table(storage.as_ref(), &state.h).map_err(&qerr)?;
        let size = state.h.size;
        let compression = state.h.compression;
        let tracks_bitmaps = state
            .bitmaps
            .as_ref()
            .is_some_and(|b| b.list.iter().any(bitmap::Bitmap::tracks_writes));
        let q = Qcow2 {
            files,
            geo,
            size,
            writable,
            data,
            state: Mutex::new(state),
            metadata_prealloc: std::sync::OnceLock::new(),
            crypt,
            compression,
            tracks_bitmaps: tracks_bitmaps.into(),
        };
        if writable {
            q.open_for_writing(access.repair)?;
        }
        Ok(q)
    }

    fn validate(h: &Header, geo: &Geometry, file_len: u64) -> Result<(), Error> {
        let cs = geo.cluster_size;
        let table = |what: &'static str, off: u64, bytes: u64| -> Result<(), Error> {
            if off % cs != 0 {
                return Err(Error::Misaligned { what, offset: off });
            }
            if off == 0 && bytes > 0 {
                return Err(Error::OverlapsHeader { what, offset: off });
            }
            match off.checked_add(bytes) {
                Some(end) if end <= file_len.max(off) && off < MAX_HOST_OFFSET => Ok(()),
                _ => Err(Error::OutOfFile { what, offset: off }),
            }
        };
        let l1_bytes = u64::from(h.l1_size) * 8;
        if l1_bytes > MAX_L1_BYTES {
            return Err(Error::L1TooLarge(h.l1_size));
        }
        let per_l2 = geo.l2_entries * cs;
        let needed = h.size.div_ceil(per_l2);
        if u64::from(h.l1_size) < needed {
            return Err(Error::L1TooSmall {
                l1_size: h.l1_size,
                size: h.size,
            });
        }
        if h.l1_size > 0 {
            table("L1 table", h.l1_table_offset, l1_bytes)?;
        }
        let rt_bytes = u64::from(h.refcount_table_clusters) * cs;
        if rt_bytes > MAX_REFTABLE_BYTES {
            return Err(Error::RefcountTableTooLarge(h.refcount_table_clusters));
        }
        if h.refcount_table_clusters == 0 {
            return Err(Error::NoRefcountTable);
        }
        table("refcount table", h.refcount_table_offset, rt_bytes)?;
        if h.nb_snapshots > snapshot::MAX_SNAPSHOTS {
            return Err(Error::TooManySnapshots(h.nb_snapshots));
        }
        if h.nb_snapshots > 0 {
            table("snapshot table", h.snapshots_offset, 0)?;
        }
        if h.incompatible & header::INCOMPAT_DATA_FILE == 0
            && h.autoclear & header::AUTOCLEAR_DATA_FILE_RAW != 0
        {
            return Err(Error::DataFileRawWithoutDataFile);
        }
        Ok(())
    }

    /// Header updates qemu makes when an image is opened read-write: clear autoclear bits for
    /// extensions we do not maintain, and rebuild refcounts of a dirty image (unless it is
    /// opened for a repairing check, which does that itself).
    fn open_for_writing(&self, for_repair: bool) -> Result<()> {
        let mut st = self.lock();
        // Bitmaps this driver loaded it keeps up to date (see `bitmap`).
        let keep = if st.bitmaps.is_some() {
            header::AUTOCLEAR_DATA_FILE_RAW | header::AUTOCLEAR_BITMAPS
        } else {
            header::AUTOCLEAR_DATA_FILE_RAW
        };
        if st.h.version == 3 && st.h.autoclear & !keep != 0 {
            st.h.autoclear &= keep;
            let v = st.h.autoclear.to_be_bytes();
            self.file().write_at(&v, 88).ctx(self.file().path())?;
            self.file().flush().ctx(self.file().path())?;
        }
        let dirty = st.h.incompatible & header::INCOMPAT_DIRTY != 0 && !for_repair;
        drop(st);
        if dirty {
            let report = self.check(crate::Repair::All)?;
            if report.corruptions > 0 {
                return Err(self.err(Error::DirtyInconsistent));
            }
            let mut st = self.lock();
            st.h.incompatible &= !header::INCOMPAT_DIRTY;
            let v = st.h.incompatible.to_be_bytes();
            self.file()
                .write_at(&v, header::INCOMPATIBLE_OFFSET)
                .ctx(self.file().path())?;
            self.file().flush().ctx(self.file().path())?;
        }
        Ok(())
    }

    /// Rewrites the whole header cluster (one write) after `f` changes the header.
    pub(crate) fn rewrite_header(&self, f: impl FnOnce(&mut Header)) -> Result<()> {
        if !self.writable {
            return Err(crate::Error::ReadOnly {
                path: self.file().path().to_owned(),
            });
        }
        let mut st = self.lock();
        let mut h = st.h.clone();
        f(&mut h);
        let bytes = h.serialize().map_err(|e| self.err(e))?;
        self.file().write_at(&bytes, 0).ctx(self.file().path())?;
        self.file().flush().ctx(self.file().path())?;
        st.h = h;
        st.meta_invalidate();
        Ok(())
    }

    /// qemu's test for a metadata-preallocated image: the refcounts claim clearly more clusters
    /// than the host file really has allocated.
    fn detect_metadata_preallocation(&self) -> Result<bool> {
        let f = self.file();
        let real_clusters = f.allocated_size().ctx(f.path())? / self.geo.cluster_size;
        let threshold = (real_clusters * 10 / 9).max(real_clusters + 2);
        let end = f.size().ctx(f.path())?.div_ceil(self.geo.cluster_size);
        let mut st = self.lock();
        let mut count = 0;
        let mut c = 0;
        while c < end && count < threshold {
            if self.refcount(&mut st, c)? != 0 {
                count += 1;
            }
            c += 1;
        }
        Ok(count >= threshold)
    }

    /// The L2 entry for guest cluster index `gc` (None when no L2 table), with the L1 entry.
    fn lookup(&self, st: &mut State, gc: u64) -> Result<Option<(Entry, u64)>> {
        let l1i = gc / self.geo.l2_entries;
        let l1e = match st.l1.get(usize::try_from(l1i).unwrap_or(usize::MAX)) {
            Some(&e) => e,
            None => return Ok(None),
        };
        let l2off = l1e & OFFSET_MASK;
        if l2off == 0 {
            return Ok(None);
        }
        let l2i = gc % self.geo.l2_entries;
        let e = self.l2_entry(st, l2off, l2i)?;
        Ok(Some((e, l1e)))
    }

    /// Reads the L1 and refcount table entries a reader left on disk ([`held_entries`]), for
    /// the walks that need every entry.
    ///
    /// # Errors
    /// I/O errors.
    pub(crate) fn hold_whole_tables(&self, st: &mut State) -> Result<()> {
        let f = self.file();
        if (st.l1.len() as u64) < u64::from(st.h.l1_size) {
            st.l1 = read_table(f, st.h.l1_table_offset, u64::from(st.h.l1_size)).ctx(f.path())?;
        }
        let rt = u64::from(st.h.refcount_table_clusters) * self.geo.cluster_size / 8;
        if (st.reftable.len() as u64) < rt {
            st.reftable = read_table(f, st.h.refcount_table_offset, rt).ctx(f.path())?;
        }
        Ok(())
    }

    fn snapshot_list(&self) -> Result<Vec<snapshot::Snapshot>> {
        let st = self.lock();
        snapshot::read_table(self.file(), &st.h).map_err(|e| self.err(e))
    }

    /// Frees what an L2 entry references (the old mapping of a cluster being replaced).
    fn release(&self, st: &mut State, e: &Entry, discard_host: bool) -> Result<()> {
        if self.data != 0 {
            return Ok(());
        }
        match e.kind(0) {
            Kind::Compressed => {
                let (host, len) = e.compressed(&self.geo);
                let first = host & !(self.geo.cluster_size - 1);
                let last = (host + len.max(1) - 1) & !(self.geo.cluster_size - 1);
                let mut c = first;
                while c <= last {
                    self.update_refcount(st, c, -1, discard_host)?;
                    c += self.geo.cluster_size;
                }
            }
            _ => {
                if let Some(h) = e.host() {
                    self.update_refcount(st, h, -1, discard_host)?;
                }
            }
        }
        Ok(())
    }

    /// Whether the external data file must stay valid as a raw image of the disk.
    fn data_file_raw(&self) -> bool {
        self.data != 0 && self.lock().h.autoclear & header::AUTOCLEAR_DATA_FILE_RAW != 0
    }

    /// Zeroes (v3) or unallocates (v2, or discard) whole clusters or subclusters.
    fn zero_or_discard(&self, offset: u64, len: u64, unmap: bool, discard: bool) -> Result<bool> {
        if self.data_file_raw() {
            // The data file is the disk as raw: it gets the zeroes first, as in qemu.
            let end = (offset + len).min(self.size);
            if end > offset {
                let d = &self.files[self.data];
                d.write_zeroes(offset, end - offset, unmap || discard)
                    .ctx(d.path())?;
            }
        }
        let mut st = self.lock();
        if st.corrupt {
            return Err(self.err(Error::MarkedCorrupt));
        }
        self.batch_discards(&mut st, |st| {
            self.zero_or_discard_locked(st, offset, len, unmap, discard)
        })
    }

    fn zero_or_discard_locked(
        &self,
        st: &mut State,
        offset: u64,
        len: u64,
        unmap: bool,
        discard: bool,
    ) -> Result<bool> {
        let g = &self.geo;
        let has_backing = st.h.backing_file.is_some() || st.backing_coming;
        let v3 = g.version >= 3;
        if !v3 && has_backing && !discard {
            return Ok(false);
        }
        let end = offset + len;
        let mut pos = offset;
        // The entries of one L2 table go out in one write per run; what they replaced is freed
        // once they are on disk, before the next table is touched.
        let mut run = l2::L2Run::default();
        let mut run_table = None;
        let mut replaced = Vec::new();
        let frees = unmap || discard;
        while pos < end {
            let gc = pos >> g.cluster_bits;
            let cstart = gc << g.cluster_bits;
            let cend = cstart + g.cluster_size;
            let s = pos - cstart;
            let e = end.min(cend) - cstart;
            let full = s == 0 && e == g.cluster_size;
            let table = gc / g.l2_entries;
            if run_table.is_some_and(|t| t != table) {
                self.write_l2_run(&mut run)?;
                for old in replaced.drain(..) {
                    self.release(st, &old, frees)?;
                }
            }
            run_table = Some(table);
            let old = self.lookup(st, gc)?;
            let old_entry = old.map(|o| o.0).unwrap_or_default();
            if old.is_none() && !has_backing && (discard || v3) && !g.extended_l2 {
                // Unallocated with nothing below already reads as zeroes.
                pos = cend.min(end);
                continue;
            }
            let mut new = old_entry;
            let mut release = false;
            if g.extended_l2 {
                let bits = l2::range_bits(g, s, e);
                if full
                    && (unmap
                        || discard
                        || !old_entry.copied()
                        || old_entry.kind(0) == Kind::Compressed)
                {
                    release = old_entry.host().is_some() || old_entry.kind(0) == Kind::Compressed;
                    new = Entry {
                        word: 0,
                        bitmap: if !v3 { 0 } else { 0xffff_ffff_u64 << 32 },
                    };
                } else if old_entry.kind(0) == Kind::Compressed {
                    // Partial zeroing of a compressed cluster cannot be expressed: write zeroes
                    // (after the entries staged so far, which stand).
                    self.write_l2_run(&mut run)?;
                    for old in replaced.drain(..) {
                        self.release(st, &old, frees)?;
                    }
                    return Ok(false);
                } else {
                    new.bitmap = (old_entry.bitmap | (bits << 32)) & !bits;
                }
            } else if !v3 {
                release = old_entry.host().is_some() || old_entry.kind(0) == Kind::Compressed;
                new = Entry::default();
            } else {
                let keep =
                    !unmap && !discard && old_entry.copied() && old_entry.kind(0) == Kind::Normal;
                if keep {
                    new = Entry {
                        word: old_entry.word | ZERO_FLAG,
                        bitmap: 0,
                    };
                } else {
                    release = old_entry.host().is_some() || old_entry.kind(0) == Kind::Compressed;
                    new = Entry {
                        word: ZERO_FLAG,
                        bitmap: 0,
                    };
                }
            }
            if new != old_entry {
                let l2off = self.l2_for_write(st, table)?;
                self.stage_l2_entry(st, &mut run, l2off, gc % g.l2_entries, new)?;
                if release {
                    replaced.push(old_entry);
                }
            }
            pos = cend.min(end);
        }
        self.write_l2_run(&mut run)?;
        for old in replaced {
            self.release(st, &old, frees)?;
        }
        Ok(true)
    }

    /// Points the L2 entries of `extents` at their host clusters. With extended L2, `mark`
    /// says whether the subclusters become allocated (a write) or keep their bitmap (qemu's
    /// preallocation, which leaves new clusters "unallocated with a host offset" so that a
    /// backing file still shows through).
    fn link_extents(&self, extents: &[HostExtent], mark: bool) -> Result<()> {
        let g = self.geo;
        let mut st = self.lock();
        // The entries of a run of clusters go out in one write per L2 table; what the old
        // entries referenced is freed only once the new ones are on disk.
        let mut run = l2::L2Run::default();
        let mut run_table = None;
        let mut replaced = Vec::new();
        for ext in extents {
            let end = ext.guest + ext.len;
            let mut pos = ext.guest;
            while pos < end {
                let gc = pos >> g.cluster_bits;
                let cstart = gc << g.cluster_bits;
                let pend = end.min(cstart + g.cluster_size);
                if run_table.is_some_and(|t| t != gc / g.l2_entries) {
                    self.write_l2_run(&mut run)?;
                }
                run_table = Some(gc / g.l2_entries);
                // Within a cluster the host offset moves with the guest offset.
                let host_cluster = ext.host.0 + (pos - ext.guest) - (pos - cstart);
                let old = self.lookup(&mut st, gc)?.map(|o| o.0).unwrap_or_default();
                let mut new = Entry {
                    word: host_cluster | COPIED,
                    bitmap: 0,
                };
                if g.extended_l2 {
                    let bits = l2::range_bits(&g, pos - cstart, pend - cstart);
                    let same_host =
                        old.host() == Some(host_cluster) && old.kind(0) != Kind::Compressed;
                    let prev = if same_host || old.host().is_none() {
                        old.bitmap
                    } else {
                        0
                    };
                    new.bitmap = if mark {
                        let alloc = (prev & 0xffff_ffff) | bits;
                        let zero = (prev >> 32) & !bits;
                        alloc | (zero << 32)
                    } else {
                        prev
                    };
                }
                let l2off = self.l2_for_write(&mut st, gc / g.l2_entries)?;
                self.stage_l2_entry(&mut st, &mut run, l2off, gc % g.l2_entries, new)?;
                let frees = match old.kind(0) {
                    Kind::Compressed => true,
                    _ => old.host().is_some_and(|h| h != host_cluster),
                };
                if frees {
                    replaced.push(old);
                }
                pos = pend;
            }
        }
        self.write_l2_run(&mut run)?;
        for old in &replaced {
            self.release(&mut st, old, false)?;
        }
        Ok(())
    }
}

/// Where the external data file named `name` in the header of image `image` lives. qemu opens
/// it as named, relative to the working directory rather than to the image's directory (unlike
/// a backing file), and `create -o data_file=dir/x` records `dir/x`; so that name comes first.
/// When nothing is there, a relative name is looked up beside the image, where qemu would fail
/// to open it.
fn data_file_path(image: &Path, name: &str) -> PathBuf {
    let as_named = PathBuf::from(name);
    if as_named.exists() {
        return as_named;
    }
    let beside = crate::image::resolve_backing(image, name);
    if beside.exists() {
        beside
    } else {
        as_named
    }
}

/// How many entries of the L1 table and of the refcount table an open image holds in memory. A
/// writer holds them all. A reader needs only the L1 entries that cover the disk and the
/// refcount table entries that cover the file, while a header may ask for 32 MiB and 8 MiB of
/// them, and a backing chain holds one image per layer; `check` reads the rest when it needs
/// them ([`Qcow2::hold_whole_tables`]).
fn held_entries(h: &Header, geo: &Geometry, file_len: u64, writable: bool) -> (u64, u64) {
    let l1 = u64::from(h.l1_size);
    let rt = u64::from(h.refcount_table_clusters) * geo.cluster_size / 8;
    if writable {
        return (l1, rt);
    }
    let disk = h.size.div_ceil(geo.l2_entries * geo.cluster_size);
    let file = file_len.div_ceil(geo.cluster_size).div_ceil(geo.rb_entries);
    (l1.min(disk), rt.min(file))
}

/// Reads a table of big-endian u64 entries.
fn read_table(s: &dyn Storage, offset: u64, entries: u64) -> std::io::Result<Vec<u64>> {
    let bytes = usize::try_from(entries * 8)
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidData))?;
    let mut buf = vec![0u8; bytes];
    s.read_at(&mut buf, offset)?;
    Ok(buf.chunks_exact(8).map(|c| be64_at(c, 0)).collect())
}

impl Driver for Qcow2 {
    fn format(&self) -> Format {
        Format::Qcow2
    }

    fn virtual_size(&self) -> u64 {
        self.size
    }

    fn storage(&self, file: usize) -> &Arc<dyn Storage> {
        &self.files[file.min(self.files.len() - 1)]
    }

    fn files(&self) -> usize {
        self.files.len()
    }

    fn cluster_size(&self) -> Option<u64> {
        Some(self.geo.cluster_size)
    }

    fn backing(&self) -> Option<BackingSpec> {
        let st = self.lock();
        st.h.backing_file.as_ref().map(|f| BackingSpec {
            filename: f.clone(),
            format: st.h.backing_format(),
        })
    }

    fn dirty(&self) -> bool {
        self.lock().h.incompatible & header::INCOMPAT_DIRTY != 0
    }

    fn specific(&self) -> FormatSpecific {
        let bitmaps = self.bitmap_infos();
        let st = self.lock();
        let h = &st.h;
        FormatSpecific::Qcow2(Qcow2Specific {
            compat: if h.version >= 3 { "1.1" } else { "0.10" },
            compression_type: h.compression.name(),
            lazy_refcounts: h.compatible & header::COMPAT_LAZY_REFCOUNTS != 0,
            refcount_bits: 1 << h.refcount_order,
            corrupt: h.incompatible & header::INCOMPAT_CORRUPT != 0,
            extended_l2: h.extended_l2(),
            data_file: if h.incompatible & header::INCOMPAT_DATA_FILE != 0 {
                h.data_file()
            } else {
                None
            },
            data_file_raw: h.autoclear & header::AUTOCLEAR_DATA_FILE_RAW != 0,
            bitmaps,
        })
    }

    fn encrypted(&self) -> bool {
        self.crypt.is_encrypted()
    }

    fn has_zero_init(&self) -> bool {
        // qemu's test: an image is preallocated when its first L1 entry is set. Preallocated
        // encrypted clusters hold plaintext zeroes, which decrypt to noise.
        !(self.crypt.is_encrypted() && self.lock().l1.first().is_some_and(|&e| e != 0))
    }

    fn encryption_info(&self) -> Option<crate::crypto::EncryptionInfo> {
        self.crypt.info()
    }

    fn data_cipher(
        &self,
    ) -> Result<Option<(&crate::crypto::DataCipher, crate::driver::SectorNumbering)>> {
        self.crypt.cipher().map_err(|()| crate::Error::KeyRequired {
            path: self.file().path().to_owned(),
            option: crypt::KEY_OPTION,
        })
    }

    fn snapshots(&self) -> Result<Vec<SnapshotInfo>> {
        Ok(self
            .snapshot_list()?
            .iter()
            .map(snapshot::Snapshot::info)
            .collect())
    }

    fn snapshot_view(&self, snap: &crate::SnapshotRef) -> Result<Box<dyn Driver>> {
        let snaps = self.snapshot_list()?;
        let sn = snap
            .position(&snaps, |s| (&s.id, &s.name))
            .map(|i| &snaps[i])
            .ok_or_else(|| crate::Error::NoSuchSnapshot {
                path: self.file().path().to_owned(),
                name: snap.label().to_owned(),
            })?;
        let st = self.lock();
        let mut h = st.h.clone();
        let bitmaps = st.bitmaps.clone();
        drop(st);
        if u64::from(sn.l1_size) * 8 > MAX_L1_BYTES {
            return Err(self.err(Error::L1TooLarge(sn.l1_size)));
        }
        if sn.l1_offset % self.geo.cluster_size != 0 {
            return Err(self.err(Error::Misaligned {
                what: "snapshot L1 table",
                offset: sn.l1_offset,
            }));
        }
        // qemu swaps in the snapshot's L1 table and keeps the disk's current size
        // (qcow2_snapshot_load_tmp): a disk grown since the snapshot reads as unallocated past
        // the snapshot's L1 table, and `convert -l` writes the current size.
        let size = self.size;
        let needed = size.div_ceil(self.geo.l2_entries * self.geo.cluster_size);
        // The view only reads: the entries that cover its disk are enough (as `held_entries`).
        let l1 = read_table(self.file(), sn.l1_offset, u64::from(sn.l1_size).min(needed))
            .ctx(self.file().path())?;
        h.size = size;
        h.l1_size = sn.l1_size;
        h.l1_table_offset = sn.l1_offset;
        let st = State {
            backing_coming: false,
            h,
            l1,
            reftable: Vec::new(),
            l2_cache: TableCache::new(L2_CACHE_BYTES),
            rb_cache: TableCache::new(0),
            free_hint: 0,
            end_hint: 0,
            compressed_cursor: 0,
            // The image's bitmaps belong to the image, not to a snapshot: qemu's view of a
            // snapshot (`convert -l`) still has them, over the same disk size.
            bitmaps,
            meta: None,
            corrupt: false,
            discards: None,
        };
        Ok(Box::new(Qcow2 {
            files: self.files.clone(),
            geo: self.geo,
            size,
            writable: false,
            data: self.data,
            state: Mutex::new(st),
            metadata_prealloc: std::sync::OnceLock::new(),
            crypt: self.crypt.clone(),
            compression: self.compression,
            tracks_bitmaps: false.into(),
        }))
    }

    fn map(&self, offset: u64, len: u64) -> Result<(Mapping, u64)> {
        if offset >= self.size {
            return Ok((Mapping::Eof, len.max(1)));
        }
        let g = &self.geo;
        let len = len.min(self.size - offset).max(1);
        let mut st = self.lock();
        let gc = offset >> g.cluster_bits;
        let l1i = gc / g.l2_entries;
        let table_end = ((l1i + 1) * g.l2_entries) << g.cluster_bits;
        let limit = (offset + len).min(table_end);
        let l1e = st
            .l1
            .get(usize::try_from(l1i).unwrap_or(usize::MAX))
            .copied()
            .unwrap_or(0);
        let l2off = l1e & OFFSET_MASK;
        if l2off == 0 {
            return Ok((Mapping::Unallocated, limit - offset));
        }
        if l2off % g.cluster_size != 0 {
            return Err(self.err(Error::Misaligned {
                what: "L2 table",
                offset: l2off,
            }));
        }
        let l1_copied = l1e & COPIED != 0;
        // First granule decides the kind; following granules extend it while they match.
        let first = self.granule(&mut st, offset, l1_copied)?;
        let mut end = first.end;
        if end < limit {
            // The rest lies in the same L2 table: look it up once rather than per granule (a
            // walk down a long backing chain scans the same unallocated tables many times).
            let t = self.load_l2(&mut st, l2off)?;
            let mut entry = None;
            let esize = usize::try_from(g.l2_entry_size).unwrap_or(8);
            while end < limit {
                let gc = end >> g.cluster_bits;
                if first.mapping == Mapping::Unallocated {
                    // Skip the run of empty entries at once: they are all unallocated.
                    // `limit` stops at the table's end: its last cluster is in this table.
                    let last = ((limit - 1) >> g.cluster_bits) % g.l2_entries;
                    let span = |i: u64| usize::try_from(i).map_or(usize::MAX, |i| i * esize);
                    let empty = t
                        .get(span(gc % g.l2_entries)..span(last + 1).min(t.len()))
                        .unwrap_or(&[])
                        .chunks_exact(esize)
                        .take_while(|e| e.iter().all(|&b| b == 0))
                        .count() as u64;
                    if empty > 0 {
                        end = end.max((gc + empty) << g.cluster_bits);
                        continue;
                    }
                }
                let e = match entry {
                    Some((c, e)) if c == gc => e,
                    _ => self.entry_in(t, l2off, gc % g.l2_entries)?,
                };
                entry = Some((gc, e));
                let next = self.granule_of(e, end, l1_copied)?;
                if !first.continues_with(&next, end - offset) {
                    break;
                }
                end = next.end;
            }
        }
        let n = end.min(limit) - offset;
        let mut mapping = first.mapping;
        if let Mapping::Data {
            file: 0,
            offset: host,
            writable: writable @ true,
        } = &mut mapping
        {
            // Written in place, this range would bypass the allocator's overlap check: a write
            // then goes through `allocate`, which refuses it.
            if self.data == 0 && self.holds_metadata(&mut st, host.0, n)? {
                *writable = false;
            }
        }
        Ok((mapping, n))
    }

    fn data_holes_read_as_zero(&self, _file: usize) -> bool {
        // Holes in an encrypted cluster decrypt to noise, not zeroes.
        !self.crypt.is_encrypted()
            && *self
                .metadata_prealloc
                .get_or_init(|| self.detect_metadata_preallocation().unwrap_or(false))
    }

    fn read_compressed(&self, c: &CompressedRef, out: &mut [u8]) -> Result<()> {
        let ctype = self.compression;
        let len =
            usize::try_from(c.len).map_err(|_| self.err(Error::BadCompressedData(c.host.0)))?;
        let mut input = vec![0u8; len];
        self.file()
            .read_at(&mut input, c.host.0)
            .ctx(self.file().path())?;
        compress::decompress(ctype, &input, out)
            .map_err(|_| self.err(Error::BadCompressedData(c.host.0)))
    }

    fn cow_granularity(&self) -> u64 {
        self.geo.subcluster_size
    }

    fn cow_area(&self, offset: u64, len: u64) -> Result<(u64, u64)> {
        let g = &self.geo;
        let end = offset + len;
        let mut a = offset / g.subcluster_size * g.subcluster_size;
        let mut b = end.div_ceil(g.subcluster_size) * g.subcluster_size;
        if g.extended_l2 {
            // A cluster whose host cluster is replaced must be copied whole.
            let mut st = self.lock();
            if self.replaces_host(&mut st, a >> g.cluster_bits)? {
                a = a >> g.cluster_bits << g.cluster_bits;
            }
            let lc = (b - 1) >> g.cluster_bits;
            if self.replaces_host(&mut st, lc)? {
                b = (lc + 1) << g.cluster_bits;
            }
        }
        Ok((a, b))
    }

    fn allocate(&self, offset: u64, len: u64) -> Result<Vec<HostExtent>> {
        if !self.writable {
            return Err(crate::Error::ReadOnly {
                path: self.file().path().to_owned(),
            });
        }
        let g = self.geo;
        let mut st = self.lock();
        let end = offset + len;
        let mut out: Vec<HostExtent> = Vec::new();
        let mut pos = offset;
        while pos < end {
            let gc = pos >> g.cluster_bits;
            // The L2 table first, then data clusters after it, as qemu lays images out.
            self.l2_for_write(&mut st, gc / g.l2_entries)?;
            let cstart = gc << g.cluster_bits;
            let piece_end = end.min(cstart + g.cluster_size);
            let host_cluster = if self.data != 0 {
                cstart
            } else {
                match self.reusable_host(&mut st, gc)? {
                    Some(h) => h,
                    None => {
                        // Allocate a run for this and the following clusters that need one.
                        let mut n = 1;
                        let last = (end - 1) >> g.cluster_bits;
                        while gc + n <= last
                            && self.reusable_host(&mut st, gc + n)?.is_none()
                            && n < 4096
                        {
                            n += 1;
                        }
                        let host = self.alloc_clusters(&mut st, n)?;
                        for i in 0..n {
                            let c = gc + i;
                            let cs = c << g.cluster_bits;
                            let s = pos.max(cs);
                            let e = end.min(cs + g.cluster_size);
                            push_extent(
                                &mut out,
                                s,
                                e - s,
                                self.data,
                                host + (i << g.cluster_bits) + (s - cs),
                            );
                        }
                        pos = end.min((gc + n) << g.cluster_bits);
                        continue;
                    }
                }
            };
            push_extent(
                &mut out,
                pos,
                piece_end - pos,
                self.data,
                host_cluster + (pos - cstart),
            );
            pos = piece_end;
        }
        // Clusters written in place were handed out long ago: an L2 entry may point into a
        // table. New ones were checked as they were allocated; the lookup is cheap either way.
        for e in out.iter().filter(|e| e.file == 0) {
            self.check_overlap_bytes(&mut st, e.host.0, e.len)?;
        }
        Ok(out)
    }

    fn commit(&self, extents: &[HostExtent]) -> Result<()> {
        self.link_extents(extents, true)
    }

    fn zero(&self, offset: u64, len: u64, unmap: bool) -> Result<bool> {
        if !self.writable {
            return Err(crate::Error::ReadOnly {
                path: self.file().path().to_owned(),
            });
        }
        self.zero_or_discard(offset, len, unmap, false)
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        if !self.writable {
            return Err(crate::Error::ReadOnly {
                path: self.file().path().to_owned(),
            });
        }
        self.zero_or_discard(offset, len, true, true).map(|_| ())
    }

    fn can_write_compressed(&self) -> bool {
        // Compressed clusters live in the image file, so an external data file cannot hold them.
        self.data == 0
    }

    fn compress_cluster(&self, data: &[u8]) -> Option<Vec<u8>> {
        // Compressed clusters are not encrypted: an encrypted image stores every cluster plain
        // (encrypted) instead, so no plaintext reaches the disk.
        if self.data != 0 || data.len() as u64 != self.geo.cluster_size || self.crypt.is_encrypted()
        {
            return None;
        }
        let kind = self.compression;
        // qemu stores a cluster compressed only when it fits in cluster_size - 1 bytes.
        compress::compress(kind, data, data.len() - 1)
    }

    fn write_compressed(&self, offset: u64, compressed: &[u8]) -> Result<()> {
        self.write_compressed_batch(&[(offset, compressed)])
    }

    fn write_compressed_batch(&self, clusters: &[(u64, &[u8])]) -> Result<()> {
        if !self.writable {
            return Err(crate::Error::ReadOnly {
                path: self.file().path().to_owned(),
            });
        }
        let g = self.geo;
        for &(offset, compressed) in clusters {
            let len = compressed.len() as u64;
            if offset % g.cluster_size != 0
                || len == 0
                || len >= g.cluster_size
                || self.data != 0
                || self.crypt.is_encrypted()
            {
                return Err(crate::Error::Unsupported {
                    path: self.file().path().to_owned(),
                    what: "compressed write of a misaligned or oversized cluster".into(),
                });
            }
        }
        let mut st = self.lock();
        if st.corrupt {
            return Err(self.err(Error::MarkedCorrupt));
        }
        // The data first: each cluster's bytes are counted as they are placed, and bytes placed
        // back to back go out in one write.
        let lens: Vec<u64> = clusters.iter().map(|c| c.1.len() as u64).collect();
        let mut hosts = Vec::with_capacity(clusters.len());
        while hosts.len() < lens.len() {
            // Packed after the previous compressed data with one refcount write where they fit,
            // otherwise the next one placed on its own.
            if let Some(h) = self.alloc_compressed_run(&mut st, &lens[hosts.len()..])? {
                hosts.extend(h);
            } else {
                hosts.push(self.alloc_compressed_bytes(&mut st, lens[hosts.len()])?);
            }
        }
        let mut pending: Vec<u8> = Vec::new();
        let mut pending_at = 0;
        for (&(_, compressed), &host) in clusters.iter().zip(&hosts) {
            if !pending.is_empty() && pending_at + pending.len() as u64 != host {
                self.file()
                    .write_at(&pending, pending_at)
                    .ctx(self.file().path())?;
                pending.clear();
            }
            if pending.is_empty() {
                pending_at = host;
            }
            pending.extend_from_slice(compressed);
        }
        if !pending.is_empty() {
            self.file()
                .write_at(&pending, pending_at)
                .ctx(self.file().path())?;
        }
        // Then the L2 entries, one write per run of them in a table; what they replace is freed
        // only once they are on disk.
        let mut run = l2::L2Run::default();
        let mut run_table = None;
        let mut replaced = Vec::new();
        for (&(offset, compressed), &host) in clusters.iter().zip(&hosts) {
            let len = compressed.len() as u64;
            let sectors = ((host + len - 1) >> 9) - (host >> 9);
            let word = COMPRESSED | (sectors << g.csize_shift) | host;
            let gc = offset >> g.cluster_bits;
            if run_table.is_some_and(|t| t != gc / g.l2_entries) {
                self.write_l2_run(&mut run)?;
            }
            run_table = Some(gc / g.l2_entries);
            let old = self.lookup(&mut st, gc)?.map(|o| o.0).unwrap_or_default();
            let l2off = self.l2_for_write(&mut st, gc / g.l2_entries)?;
            self.stage_l2_entry(
                &mut st,
                &mut run,
                l2off,
                gc % g.l2_entries,
                l2::Entry { word, bitmap: 0 },
            )?;
            if old.host().is_some() || old.kind(0) == Kind::Compressed {
                replaced.push(old);
            }
        }
        self.write_l2_run(&mut run)?;
        for old in &replaced {
            self.release(&mut st, old, false)?;
        }
        Ok(())
    }

    fn resize(
        &mut self,
        new_size: u64,
        prealloc: crate::raw::Preallocation,
        zero_new: bool,
    ) -> Result<()> {
        // Preallocated encrypted clusters hold plaintext zeroes and read as noise, as in qemu.
        Qcow2::resize(self, new_size, prealloc, zero_new)
    }

    fn amend(&mut self, opts: &crate::CreateOptions, backing_size: Option<u64>) -> Result<()> {
        Qcow2::amend(self, opts, backing_size)
    }

    fn expect_backing(&self) {
        self.lock().backing_coming = true;
    }

    fn set_backing(&self, backing: Option<&BackingSpec>) -> Result<()> {
        if backing.is_some() && self.data_file_raw() {
            return Err(self.err(Error::BackingWithRawDataFile));
        }
        self.rewrite_header(|h| {
            h.backing_file = backing.map(|b| b.filename.clone());
            h.set_extension(
                header::EXT_BACKING_FORMAT,
                backing
                    .and_then(|b| b.format.as_ref())
                    .map(|f| f.as_bytes().to_vec()),
            );
        })
    }

    fn make_empty(&self) -> Result<bool> {
        // The guest's view does not change (the data now lies in the backing image): the
        // dirty bitmaps keep their bits, as in qemu.
        self.unmap_range(0, self.geo.align_up(self.size))?;
        // The emptied L2 tables go too, as qemu's emptying rebuilds the image without them:
        // one left far into the file would hold the file's end there.
        self.drop_l2_tables(&mut self.lock(), 0)?;
        self.flush()?;
        // The freed data leaves the file, as qemu's emptying truncates it.
        self.truncate_to_last_cluster()?;
        Ok(true)
    }

    fn snapshot_create(&self, name: &str, date: (u32, u32)) -> Result<()> {
        self.create_snapshot(name, date)
    }

    fn snapshot_apply(&mut self, name: &str) -> Result<()> {
        self.apply_snapshot(name)
    }

    fn snapshot_delete(&self, name: &str) -> Result<()> {
        self.delete_snapshot(name)
    }

    fn check(&self, repair: crate::Repair) -> Result<crate::CheckReport> {
        check::check(self, repair)
    }

    fn note_write(&self, offset: u64, len: u64) -> Result<()> {
        self.note_bitmap_write(offset, len)
    }

    fn supports_bitmaps(&self) -> bool {
        self.lock().h.version >= 3
    }

    fn bitmap_list(&self) -> Vec<crate::driver::BitmapInfo> {
        self.bitmap_infos()
    }

    fn bitmap_add(&self, name: &str, granularity: Option<u64>, enabled: bool) -> Result<()> {
        self.add_bitmap(name, granularity, enabled)
    }

    fn bitmap_remove(&self, name: &str) -> Result<()> {
        self.remove_bitmap(name)
    }

    fn bitmap_clear(&self, name: &str) -> Result<()> {
        self.clear_bitmap(name)
    }

    fn bitmap_set_enabled(&self, name: &str, enabled: bool) -> Result<()> {
        self.enable_bitmap(name, enabled)
    }

    fn bitmap_read(&self, name: &str) -> Result<crate::bitmaps::DirtyBits> {
        self.read_bitmap(name)
    }

    fn bitmap_merge(&self, name: &str, bits: &crate::bitmaps::DirtyBits) -> Result<()> {
        self.merge_into_bitmap(name, bits)
    }

    fn flush(&self) -> Result<()> {
        if self.writable {
            self.store_bitmaps()?;
        }
        for f in &self.files {
            f.flush().ctx(f.path())?;
        }
        Ok(())
    }
}

impl Drop for Qcow2 {
    fn drop(&mut self) {
        // As qemu does on close. A failure leaves the bitmaps marked in use: inconsistent.
        if self.writable {
            let _ = self.store_bitmaps();
        }
    }
}

/// Appends an extent, merging it with the previous one when both sides are contiguous.
fn push_extent(out: &mut Vec<HostExtent>, guest: u64, len: u64, file: usize, host: u64) {
    if let Some(last) = out.last_mut() {
        if last.file == file && last.guest + last.len == guest && last.host.0 + last.len == host {
            last.len += len;
            return;
        }
    }
    out.push(HostExtent {
        guest,
        len,
        file,
        host: HostOffset(host),
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{create, CreateOptions, Image, OpenOptions};

    /// A fresh 1 MiB image's bytes with one field changed, opened read-only.
    fn open_patched(patch: impl FnOnce(&mut Vec<u8>)) -> crate::Result<Image> {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.qcow2");
        create(&p, Format::Qcow2, &CreateOptions::new(1 << 20)).unwrap();
        let mut b = std::fs::read(&p).unwrap();
        patch(&mut b);
        std::fs::write(&p, &b).unwrap();
        Image::open(&p, &OpenOptions::read_only())
    }

    /// In-memory storage that records every discard request.
    #[derive(Debug)]
    struct DiscardLog {
        inner: crate::storage::MemStorage,
        log: Mutex<Vec<(u64, u64)>>,
    }

    impl Storage for DiscardLog {
        fn path(&self) -> &std::path::Path {
            self.inner.path()
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
            self.inner.read_at(buf, offset)
        }
        fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
            self.inner.write_at(buf, offset)
        }
        fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> std::io::Result<()> {
            self.inner.write_zeroes(offset, len, unmap)
        }
        fn discard(&self, offset: u64, len: u64) -> std::io::Result<()> {
            self.log.lock().unwrap().push((offset, len));
            self.inner.discard(offset, len)
        }
        fn flush(&self) -> std::io::Result<()> {
            self.inner.flush()
        }
        fn size(&self) -> std::io::Result<u64> {
            self.inner.size()
        }
        fn set_len(&self, len: u64) -> std::io::Result<()> {
            self.inner.set_len(len)
        }
        fn allocate(&self, offset: u64, len: u64) -> std::io::Result<()> {
            self.inner.allocate(offset, len)
        }
        fn read_only(&self) -> bool {
            false
        }
    }

    /// A fresh 64 MiB image (64 KiB clusters) in memory whose discards are logged.
    fn logged_image() -> (Arc<DiscardLog>, Image) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.qcow2");
        create(&p, Format::Qcow2, &CreateOptions::new(64 << 20)).unwrap();
        let bytes = std::fs::read(&p).unwrap();
        let s = Arc::new(DiscardLog {
            inner: crate::storage::MemStorage::new(bytes, &p, false),
            log: Mutex::new(Vec::new()),
        });
        let img = Image::open_storage(s.clone(), &OpenOptions::writable()).unwrap();
        (s, img)
    }

    #[test]
    fn map_of_an_unallocated_table_looks_it_up_once() {
        // One cluster written at 32 MiB: the L2 table exists and the 512 clusters before it are
        // unallocated. Scanning them must not cost a cache lookup each (a walk down a long
        // backing chain repeats such scans for every layer and every extent).
        let (s, img) = logged_image();
        img.write_at(&[5u8; 65536], 32 << 20).unwrap();
        img.flush().unwrap();
        let bytes = s.inner.contents();
        let mem = crate::storage::MemStorage::new(bytes, s.inner.path(), true);
        let q = Qcow2::open(Arc::new(mem), false).unwrap();
        q.map(0, 64 << 20).unwrap();
        let before = q.lock().l2_cache.accesses();
        let (m, n) = q.map(0, 64 << 20).unwrap();
        assert_eq!((m, n), (Mapping::Unallocated, 32 << 20));
        let accesses = q.lock().l2_cache.accesses() - before;
        assert!(accesses <= 8, "{accesses} cache accesses");
        // Extents that end inside a table stop where the data starts.
        let (m, n) = q.map(4096, 40 << 20).unwrap();
        assert_eq!((m, n), (Mapping::Unallocated, (32 << 20) - 4096));
        let (m, n) = q.map(0, 16 << 20).unwrap();
        assert_eq!((m, n), (Mapping::Unallocated, 16 << 20));
        let (m, n) = q.map(32 << 20, 32 << 20).unwrap();
        assert!(matches!(m, Mapping::Data { .. }), "{m:?}");
        assert_eq!(n, 65536);
    }

    #[test]
    fn freed_neighbours_are_deallocated_in_one_request() {
        // 8 MiB of data in 128 neighbouring clusters, then discarded: one request for the run,
        // not one per cluster (each costs a filesystem transaction).
        let (s, q) = logged_image();
        q.write_at(&vec![7u8; 8 << 20], 0).unwrap();
        let before = s.log.lock().unwrap().len();
        q.discard(0, 8 << 20).unwrap();
        let log = s.log.lock().unwrap()[before..].to_vec();
        assert_eq!(log.len(), 1, "{log:?}");
        assert_eq!(log[0].1, 8 << 20);
        let mut buf = vec![1u8; 8 << 20];
        q.read_at(&mut buf, 0).unwrap();
        assert!(buf.iter().all(|&b| b == 0));
    }

    #[test]
    fn a_cluster_freed_in_a_batch_is_deallocated_before_its_reuse() {
        // Emptying frees the data and then the L2 table; data written afterwards reuses those
        // clusters and must survive: every deallocation came before.
        let (s, q) = logged_image();
        q.write_at(&vec![7u8; 1 << 20], 0).unwrap();
        assert!(q.driver().make_empty().unwrap());
        let n = s.log.lock().unwrap().len();
        assert!((1..=2).contains(&n), "{:?}", s.log.lock().unwrap());
        q.write_at(&vec![9u8; 1 << 20], 4 << 20).unwrap();
        assert_eq!(
            s.log.lock().unwrap().len(),
            n,
            "a write deallocated something"
        );
        let mut buf = vec![0u8; 1 << 20];
        q.read_at(&mut buf, 4 << 20).unwrap();
        assert!(buf.iter().all(|&b| b == 9));
        q.read_at(&mut buf, 0).unwrap();
        assert!(buf.iter().all(|&b| b == 0));
    }

    fn qcow2_err(r: crate::Result<Image>) -> Error {
        match r {
            Err(crate::Error::Qcow2 { source, .. }) => source,
            other => panic!("expected a qcow2 error, got {other:?}"),
        }
    }

    #[test]
    fn open_unpatched_image_succeeds() {
        assert!(open_patched(|_| {}).is_ok());
    }

    #[test]
    fn open_l1_past_end_of_file_is_out_of_file() {
        let e = qcow2_err(open_patched(|b| {
            b[40..48].copy_from_slice(&(1u64 << 40).to_be_bytes())
        }));
        assert!(
            matches!(
                e,
                Error::OutOfFile {
                    what: "L1 table",
                    ..
                }
            ),
            "{e}"
        );
    }

    #[test]
    fn open_misaligned_refcount_table_is_misaligned() {
        let e = qcow2_err(open_patched(|b| {
            b[48..56].copy_from_slice(&0x10200u64.to_be_bytes())
        }));
        assert!(
            matches!(
                e,
                Error::Misaligned {
                    what: "refcount table",
                    offset: 0x10200
                }
            ),
            "{e}"
        );
    }

    #[test]
    fn open_l1_too_small_for_size_is_refused() {
        let e = qcow2_err(open_patched(|b| {
            b[24..32].copy_from_slice(&(1u64 << 40).to_be_bytes())
        }));
        assert!(matches!(e, Error::L1TooSmall { .. }), "{e}");
    }

    #[test]
    fn open_huge_l1_size_is_refused_before_allocating() {
        let e = qcow2_err(open_patched(|b| {
            b[36..40].copy_from_slice(&u32::MAX.to_be_bytes())
        }));
        assert!(matches!(e, Error::L1TooLarge(u32::MAX)), "{e}");
    }

    #[test]
    fn open_huge_refcount_table_is_refused() {
        let e = qcow2_err(open_patched(|b| {
            b[56..60].copy_from_slice(&100_000u32.to_be_bytes())
        }));
        assert!(matches!(e, Error::RefcountTableTooLarge(100_000)), "{e}");
    }

    #[test]
    fn open_without_refcount_table_is_refused_in_qemu_words() {
        let e = qcow2_err(open_patched(|b| {
            b[56..60].copy_from_slice(&0u32.to_be_bytes())
        }));
        assert!(matches!(e, Error::NoRefcountTable), "{e}");
        assert_eq!(
            e.to_string(),
            "Image does not contain a reference count table"
        );
    }

    #[test]
    fn open_l1_in_header_cluster_is_refused() {
        let e = qcow2_err(open_patched(|b| {
            b[40..48].copy_from_slice(&0u64.to_be_bytes())
        }));
        assert!(matches!(e, Error::OverlapsHeader { .. }), "{e}");
    }

    #[test]
    fn open_too_many_snapshots_is_refused() {
        let e = qcow2_err(open_patched(|b| {
            b[60..64].copy_from_slice(&u32::MAX.to_be_bytes())
        }));
        assert!(matches!(e, Error::TooManySnapshots(_)), "{e}");
    }

    #[test]
    fn open_truncated_file_is_truncated() {
        let e = qcow2_err(open_patched(|b| b.truncate(40)));
        assert!(matches!(e, Error::Truncated(40)), "{e}");
    }

    #[test]
    fn open_corrupt_bit_refuses_writing_only() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.qcow2");
        create(&p, Format::Qcow2, &CreateOptions::new(1 << 20)).unwrap();
        let mut b = std::fs::read(&p).unwrap();
        b[79] |= 2;
        std::fs::write(&p, &b).unwrap();
        assert!(Image::open(&p, &OpenOptions::read_only()).is_ok());
        match Image::open(&p, &OpenOptions::writable()) {
            Err(crate::Error::Qcow2 {
                source: Error::MarkedCorrupt,
                ..
            }) => {}
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn misaligned_l2_entry_read_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.qcow2");
        create(&p, Format::Qcow2, &CreateOptions::new(1 << 20)).unwrap();
        {
            let img = Image::open(&p, &OpenOptions::writable()).unwrap();
            img.write_at(&[1u8; 512], 0).unwrap();
        }
        // Point the first L2 entry at an unaligned host offset.
        let mut b = std::fs::read(&p).unwrap();
        let l1 = usize::try_from(be64_at(&b, 40)).unwrap();
        let l2 = usize::try_from(be64_at(&b, l1) & OFFSET_MASK).unwrap();
        b[l2..l2 + 8].copy_from_slice(&(COPIED | 0x10200).to_be_bytes());
        std::fs::write(&p, &b).unwrap();
        let img = Image::open(&p, &OpenOptions::read_only()).unwrap();
        let mut buf = [0u8; 512];
        assert!(matches!(
            img.read_at(&mut buf, 0),
            Err(crate::Error::Qcow2 {
                source: Error::Misaligned {
                    what: "data cluster",
                    ..
                },
                ..
            })
        ));
    }
}
