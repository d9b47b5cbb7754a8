//! VMware virtual disks, per VMware's "Virtual Disk Format 5.0" (and qemu's block/vmdk.c for
//! the flavours qemu reads).
//!
//! ```text
//!  Vmdk (Driver) --map--> extents in guest order
//!                           |- FLAT/VMFS: host offset in the extent file
//!                           |- ZERO: zeroes
//!                           |- SPARSE (KDMV) / VMFSSPARSE (COWD): grain directory (memory)
//!                           |     --> grain tables (cache) --> grains (plain or zlib + marker)
//!                           '- SESPARSE (read only): 64-bit grain directory (memory)
//!                                 --> grain tables (cache) --> 4 KiB grains (sesparse.rs)
//!        +--allocate/commit--> new grains appended to the extent, GT and redundant GT updated
//!        '--streamOptimized--> stream writer: grains, GT/GD markers, footer, EOS (stream.rs)
//! ```
//! A monolithic file (sparse header first) is one extent whose embedded descriptor only gives
//! the CIDs, createType and parent; a descriptor file names its extent files. A delta disk's
//! parent (parentFileNameHint) is the backing image; its CID must equal our parentCID.

mod create;
pub mod descriptor;
mod error;
pub mod sesparse;
pub mod sparse;
mod stream;

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

pub use create::{create, CREATE_OPTIONS};
pub use error::Error;
pub use stream::{deflate, inflate};

use crate::driver::{
    BackingSpec, CompressedRef, Driver, FormatSpecific, HostExtent, HostOffset, Mapping,
    VmdkExtentInfo, VmdkSpecific,
};
use crate::error::IoContext;
use crate::storage::{FileStorage, Storage};
use crate::{CheckReport, Format, Repair, Result};
use descriptor::{Access, Descriptor, ExtentType};
use sparse::{CowdHeader, Geometry, SparseHeader, GD_AT_END, SECTOR};
use stream::{Staging, StreamWriter};

/// Largest text descriptor read (qemu's limit: 1 MiB less one byte).
pub const MAX_DESCRIPTOR_BYTES: u64 = (1 << 20) - 1;
/// Most extents a descriptor may list (each is an open file): VMware's largest disk, 62 TiB, in
/// 2 GB extents is 31744. (qemu has no limit; its 1 MiB descriptor holds about 20000.)
pub const MAX_EXTENTS: usize = 32768;
/// Largest grain: 2 MiB (qcow2's largest cluster). qemu allows 1 GiB, but VMware's products
/// write 64 KiB grains, and every read that touches a compressed grain inflates all of it into a
/// buffer of this size: with grains of tens of MiB, reading a few MiB in small pieces moves
/// gigabytes.
pub const MAX_GRAIN_SECTORS: u64 = 1 << 12;
/// Largest extent: 2^42 sectors (2 PiB), far beyond the 2 TiB a 32-bit GTE can address.
pub const MAX_CAPACITY_SECTORS: u64 = 1 << 42;
/// Largest grain directory held in memory (qemu caps its L1 the same way).
pub const MAX_GD_BYTES: u64 = 32 << 20;
/// Memory for the grain directories of all the extents of one image together. One directory
/// is at most [`MAX_GD_BYTES`], but a descriptor may list [`MAX_EXTENTS`] extents that all name
/// one file with such a directory (qemu allows 128 MiB per extent, with no total).
pub const MAX_TOTAL_GD_BYTES: u64 = 2 * MAX_GD_BYTES;
/// Memory for cached grain tables, shared out among the extents of one image (each keeps at
/// least one table): 4096 tables of 512 entries for a monolithic image.
pub const GT_CACHE_BYTES: u64 = 8 << 20;
/// The format takes compressed writes (`convert -c`): streamOptimized compresses its grains,
/// the other sparse subformats store them plain, as qemu's driver does.
pub const WRITES_COMPRESSED: bool = true;

/// How an extent stores data.
#[derive(Debug, Clone, Copy)]
enum Kind {
    /// Data at `base` in the extent file.
    Flat { base: u64 },
    /// Zeroes.
    Zero,
    /// Sparse: index into `Vmdk::sparse` and `State::sparse`.
    Sparse(usize),
    /// seSparse: index into `Vmdk::se` and `State::se`.
    SeSparse(usize),
}

#[derive(Debug)]
struct Extent {
    /// Guest byte range.
    start: u64,
    len: u64,
    /// Index into `Vmdk::files`.
    file: usize,
    access: Access,
    kind: Kind,
    /// The descriptor's type name ("" for a monolithic file), for info.
    type_name: String,
    /// File name for info.
    filename: String,
}

/// Fixed facts about a sparse extent.
#[derive(Debug, Clone)]
struct SparseInfo {
    geo: Geometry,
    header: SparseHeader,
    compressed: bool,
    markers: bool,
    zero_grain: bool,
    /// COWD extents are read-only here.
    cowd: bool,
}

/// Mutable state of a sparse extent.
#[derive(Debug)]
struct SparseState {
    gd: Vec<u32>,
    rgd: Option<Vec<u32>>,
    cache: HashMap<u64, Vec<u32>, foldhash::fast::RandomState>,
    /// Most tables `cache` holds (its share of [`GT_CACHE_BYTES`]).
    cache_limit: usize,
    /// Next free sector for appended grains and tables.
    next_sector: u64,
    /// Length of the extent file as far as this driver knows.
    file_len: u64,
    stream: Option<StreamWriter>,
}

/// Grain tables of a seSparse extent, read as they are needed.
#[derive(Debug)]
struct SeState {
    /// Raw grain directory entries covering the extent.
    gd: Vec<u64>,
    cache: HashMap<u64, Vec<u64>, foldhash::fast::RandomState>,
    /// Most tables `cache` holds (its share of [`GT_CACHE_BYTES`]).
    cache_limit: usize,
    file_len: u64,
}

/// What is left of an image's memory for grain directories ([`MAX_TOTAL_GD_BYTES`]).
struct GdBudget(u64);

impl GdBudget {
    fn new() -> GdBudget {
        GdBudget(MAX_TOTAL_GD_BYTES)
    }

    /// Claims `bytes` for a directory of the extent file `path`, before it is read.
    fn take(&mut self, path: &Path, bytes: u64) -> Result<()> {
        self.0 = self
            .0
            .checked_sub(bytes)
            .ok_or_else(|| verr(path, Error::DirectoriesTooLarge(MAX_TOTAL_GD_BYTES)))?;
        Ok(())
    }
}

#[derive(Debug)]
struct State {
    sparse: Vec<SparseState>,
    se: Vec<SeState>,
}

/// An open vmdk image.
#[derive(Debug)]
pub struct Vmdk {
    files: Vec<Arc<dyn Storage>>,
    extents: Vec<Extent>,
    sparse: Vec<SparseInfo>,
    /// Checked layouts of the seSparse extents.
    se: Vec<sesparse::Layout>,
    desc: Descriptor,
    size: u64,
    writable: bool,
    /// The in-memory staging storage of a stream being written, and its index in `files`.
    staging: Option<(usize, Arc<Staging>)>,
    state: Mutex<State>,
    /// The parent's CID is not the one this delta was made against: (parent, expected, found).
    parent_mismatch: Option<(String, u32, u32)>,
    /// The descriptor has its new CID: the first write gives the image one, as qemu and
    /// VMware do, so that a delta made against the old contents no longer reads through it.
    cid_renewed: std::sync::atomic::AtomicBool,
}

/// What a grain table entry says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Gte {
    Unallocated,
    Zeroed,
    Data(u64),
    Compressed(u64),
}

fn verr(path: &Path, e: Error) -> crate::Error {
    crate::Error::Vmdk {
        path: path.to_owned(),
        source: e,
    }
}

/// Reads `n` little-endian u32s at `offset`.
fn read_u32s(s: &dyn Storage, offset: u64, n: u64) -> Result<Vec<u32>> {
    let bytes = usize::try_from(n * 4).map_err(|_| verr(s.path(), Error::GdTooLarge(n)))?;
    let mut raw = vec![0u8; bytes];
    s.read_at(&mut raw, offset).ctx(s.path())?;
    Ok(raw
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

/// Where an extent file named in the descriptor at `desc` is: relative names are relative to
/// the descriptor's directory.
fn extent_path(desc: &Path, name: &Path) -> std::path::PathBuf {
    match desc.parent() {
        Some(dir) if name.is_relative() && !dir.as_os_str().is_empty() => dir.join(name),
        _ => name.to_owned(),
    }
}

/// Reads the descriptor of a vmdk file (embedded or not) without opening its extents.
fn read_descriptor(s: &dyn Storage) -> Result<(Descriptor, Option<SparseHeader>)> {
    let path = s.path();
    let len = s.size().ctx(path)?;
    let mut first = [0u8; 512];
    s.read_at(&mut first, 0).ctx(path)?;
    if first[..4] == sparse::MAGIC {
        let h = SparseHeader::parse(&first).map_err(|e| verr(path, e))?;
        if h.desc_offset == 0 {
            // No descriptor and no CID (qemu refuses it too): most likely one piece of a disk
            // whose descriptor names the rest (a `-s001` extent); read alone it would look like
            // a whole disk.
            return Err(verr(path, Error::BareExtent));
        }
        let bytes = h
            .desc_size
            .checked_mul(SECTOR)
            .filter(|&b| b <= MAX_DESCRIPTOR_BYTES + 1)
            .ok_or_else(|| {
                verr(
                    path,
                    Error::DescriptorTooLarge(h.desc_size.saturating_mul(SECTOR)),
                )
            })?;
        let off = h
            .desc_offset
            .checked_mul(SECTOR)
            .filter(|o| o.checked_add(bytes).is_some_and(|e| e <= len))
            .ok_or_else(|| {
                verr(
                    path,
                    Error::OutOfFile {
                        what: "descriptor",
                        sector: h.desc_offset,
                    },
                )
            })?;
        let mut buf = vec![0u8; usize::try_from(bytes).unwrap_or(0)];
        s.read_at(&mut buf, off).ctx(path)?;
        if buf.iter().all(|&b| b == 0) {
            // Room for a descriptor and none in it: a piece of a split disk, as qemu makes them.
            return Err(verr(path, Error::BareExtent));
        }
        let d = Descriptor::parse_embedded(&buf).map_err(|e| verr(path, e))?;
        return Ok((d, Some(h)));
    }
    if first[..4] == sparse::COWD_MAGIC {
        // An ESX delta extent: its descriptor is a file of its own.
        return Err(verr(path, Error::BareExtent));
    }
    if len > MAX_DESCRIPTOR_BYTES {
        return Err(verr(path, Error::DescriptorTooLarge(len)));
    }
    let mut buf = vec![0u8; usize::try_from(len).unwrap_or(0)];
    s.read_at(&mut buf, 0).ctx(path)?;
    let d = Descriptor::parse(&buf).map_err(|e| verr(path, e))?;
    Ok((d, None))
}

/// createTypes whose data lives on devices, which an image tool cannot open.
const DEVICE_TYPES: &[&str] = &[
    "fullDevice",
    "partitionedDevice",
    "vmfsRDM",
    "vmfsRDMP",
    "vmfsRaw",
    "vmfsRawDeviceMap",
    "vmfsPassthroughRawDeviceMap",
];

impl Vmdk {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn err(&self, file: usize, e: Error) -> crate::Error {
        verr(self.files[file.min(self.files.len() - 1)].path(), e)
    }

    /// Opens a vmdk image (a monolithic file or a descriptor file and its extents).
    ///
    /// # Errors
    /// The specific [`Error`] for a bad descriptor, header or table; I/O errors.
    pub fn open(storage: Arc<dyn Storage>, writable: bool) -> Result<Vmdk> {
        let path = storage.path().to_owned();
        let file_len = storage.size().ctx(&path)?;
        if file_len < 4 {
            return Err(verr(&path, Error::Truncated(file_len)));
        }
        let mut first = [0u8; 512];
        storage.read_at(&mut first, 0).ctx(&path)?;
        let mut files: Vec<Arc<dyn Storage>> = vec![storage.clone()];
        let mut extents = Vec::new();
        let mut infos = Vec::new();
        let mut states = Vec::new();
        let mut se_layouts = Vec::new();
        let mut se_states = Vec::new();
        let desc;
        let mut budget = GdBudget::new();
        // A file without a descriptor of its own is refused before its tables are read.
        let (d, header) = read_descriptor(storage.as_ref())?;
        // A sparse header of capacity 0 whose descriptor describes a disk only carries that
        // descriptor: as qemu does, its extents are opened as a descriptor file's would be. (A
        // disk of size 0 names itself as an extent of 0 sectors and stays as it is.)
        let container =
            header.is_some_and(|h| h.capacity == 0) && d.extents.iter().any(|e| e.sectors > 0);
        if (first[..4] == sparse::MAGIC || first[..4] == sparse::COWD_MAGIC) && !container {
            desc = d;
            let (info, st) = open_sparse(storage.as_ref(), writable, &mut budget)?;
            let len = info.geo.bytes();
            extents.push(Extent {
                start: 0,
                len,
                file: 0,
                access: Access::Rw,
                kind: Kind::Sparse(0),
                type_name: String::new(),
                filename: path.display().to_string(),
            });
            infos.push(info);
            states.push(st);
        } else {
            desc = d;
            if DEVICE_TYPES.contains(&desc.create_type.as_str()) {
                return Err(verr(
                    &path,
                    Error::UnsupportedCreateType(desc.create_type.clone()),
                ));
            }
            if desc.extents.is_empty() {
                return Err(verr(&path, Error::NoExtents));
            }
            if writable && desc.extents.iter().any(|e| e.kind == ExtentType::SeSparse) {
                return Err(verr(&path, Error::SeSparseReadOnly));
            }
            let mut start = 0u64;
            for line in &desc.extents {
                let len = line
                    .sectors
                    .checked_mul(SECTOR)
                    .filter(|_| line.sectors <= MAX_CAPACITY_SECTORS)
                    .ok_or_else(|| verr(&path, Error::BadCapacity(line.sectors)))?;
                let name = desc.file_name(line.filename.as_deref().unwrap_or_default());
                let epath = extent_path(&path, &name);
                let ext_writable = writable && line.access == Access::Rw;
                let (kind, file) = match line.kind {
                    ExtentType::Zero => (Kind::Zero, 0),
                    _ => {
                        let s: Arc<dyn Storage> =
                            Arc::new(FileStorage::open(&epath, ext_writable).ctx(&epath)?);
                        files.push(s.clone());
                        let idx = files.len() - 1;
                        match line.kind {
                            ExtentType::Sparse | ExtentType::VmfsSparse => {
                                let (info, st) =
                                    open_sparse(s.as_ref(), ext_writable, &mut budget)?;
                                if info.geo.bytes() < len {
                                    return Err(verr(
                                        &epath,
                                        Error::BadCapacity(info.geo.capacity),
                                    ));
                                }
                                infos.push(info);
                                states.push(st);
                                (Kind::Sparse(infos.len() - 1), idx)
                            }
                            ExtentType::SeSparse => {
                                let (layout, st) = open_sesparse(s.as_ref(), &mut budget)?;
                                if layout.capacity < line.sectors {
                                    return Err(verr(&epath, Error::BadCapacity(layout.capacity)));
                                }
                                se_layouts.push(layout);
                                se_states.push(st);
                                (Kind::SeSparse(se_layouts.len() - 1), idx)
                            }
                            _ => {
                                let base = line.offset.checked_mul(SECTOR).ok_or_else(|| {
                                    verr(&path, Error::BadExtentLine(name.display().to_string()))
                                })?;
                                (Kind::Flat { base }, idx)
                            }
                        }
                    }
                };
                extents.push(Extent {
                    start,
                    len,
                    file,
                    access: line.access,
                    kind,
                    type_name: line.kind.name().to_owned(),
                    filename: epath.display().to_string(),
                });
                start = start
                    .checked_add(len)
                    .filter(|&s| s <= MAX_CAPACITY_SECTORS * SECTOR)
                    .ok_or_else(|| {
                        verr(&path, Error::DiskTooLarge(MAX_CAPACITY_SECTORS * SECTOR))
                    })?;
            }
        }
        let size = extents.last().map_or(0, |e| e.start + e.len);
        // The grain table caches share one budget: up to 128 extents each keeps 32 tables or
        // more (qemu keeps 16); thousands of extents (a split disk of many TiB) keep at least one
        // each, so that memory stays within a few MiB.
        let share = GT_CACHE_BYTES / (states.len() + se_states.len()).max(1) as u64;
        let tables =
            |gt_bytes: u64| usize::try_from(share / gt_bytes.max(1)).map_or(1, |n| n.max(1));
        for (st, info) in states.iter_mut().zip(&infos) {
            st.cache_limit = tables(info.geo.gt_bytes());
        }
        for st in &mut se_states {
            st.cache_limit = tables(sesparse::GT_BYTES);
        }
        // A stream being written stages its grains in memory.
        let staging = if states.iter().any(|s| s.stream.is_some()) {
            let stg = Arc::new(Staging::new(&path));
            files.push(stg.clone());
            Some((files.len() - 1, stg))
        } else {
            None
        };
        let mut v = Vmdk {
            files,
            extents,
            sparse: infos,
            se: se_layouts,
            desc,
            size,
            writable,
            staging,
            state: Mutex::new(State {
                sparse: states,
                se: se_states,
            }),
            parent_mismatch: None,
            cid_renewed: false.into(),
        };
        v.parent_mismatch = v.parent_cid_mismatch(&path);
        Ok(v)
    }

    /// A delta's parent must still have the CID the delta was made against, or its data is not
    /// what the delta was written over: found here, refused when data is read through to it
    /// ([`Driver::backing_usable`]).
    fn parent_cid_mismatch(&self, path: &Path) -> Option<(String, u32, u32)> {
        let hint = self.desc.parent_hint.as_ref()?;
        let ppath = crate::image::resolve_backing(path, hint);
        // A parent that cannot be opened or read is reported by the backing chain's open.
        let ps = FileStorage::open(&ppath, false).ok()?;
        let (pd, _) = read_descriptor(&ps).ok()?;
        (pd.cid != self.desc.parent_cid).then(|| (hint.clone(), self.desc.parent_cid, pd.cid))
    }

    /// The parsed descriptor.
    pub fn descriptor(&self) -> &Descriptor {
        &self.desc
    }

    fn extent_at(&self, offset: u64) -> Option<&Extent> {
        let i = self.extents.partition_point(|e| e.start + e.len <= offset);
        self.extents.get(i).filter(|e| e.start <= offset)
    }

    /// Reads grain table `gti` of sparse extent `si` (from the open stream tables, the cache or
    /// the file).
    fn table<'a>(
        &self,
        st: &'a mut SparseState,
        si: usize,
        file: usize,
        gti: u64,
    ) -> Result<Option<&'a Vec<u32>>> {
        let info = &self.sparse[si];
        if st
            .stream
            .as_ref()
            .is_some_and(|s| s.open.contains_key(&gti))
        {
            return Ok(st.stream.as_ref().and_then(|s| s.open.get(&gti)));
        }
        let gd = st
            .gd
            .get(usize::try_from(gti).unwrap_or(usize::MAX))
            .copied()
            .unwrap_or(0);
        if gd == 0 {
            return Ok(None);
        }
        if !st.cache.contains_key(&gti) {
            let off = u64::from(gd) * SECTOR;
            if off + info.geo.gtes * 4 > st.file_len {
                return Err(self.err(
                    file,
                    Error::GtOutOfFile {
                        index: gti,
                        sector: u64::from(gd),
                    },
                ));
            }
            let t = read_u32s(self.files[file].as_ref(), off, info.geo.gtes)?;
            if st.cache.len() >= st.cache_limit {
                st.cache.clear();
            }
            st.cache.insert(gti, t);
        }
        Ok(st.cache.get(&gti))
    }

    fn classify(info: &SparseInfo, e: u32) -> Gte {
        match e {
            0 => Gte::Unallocated,
            sparse::GTE_ZEROED if info.zero_grain => Gte::Zeroed,
            _ if info.compressed => Gte::Compressed(u64::from(e) * SECTOR),
            _ => Gte::Data(u64::from(e) * SECTOR),
        }
    }

    /// Maps inside a sparse extent; `off` is relative to the extent.
    fn map_sparse(&self, ext: &Extent, si: usize, off: u64, len: u64) -> Result<(Mapping, u64)> {
        let info = &self.sparse[si];
        let g = info.geo.grain;
        let mut guard = self.lock();
        let st = &mut guard.sparse[si];
        if let (Some(sw), Some((staging, _))) = (&st.stream, &self.staging) {
            if let Some((ps, pl)) = sw.pending {
                if off >= ps && off < ps + pl {
                    return Ok((
                        Mapping::Data {
                            file: *staging,
                            offset: HostOffset(off),
                            writable: true,
                        },
                        (ps + pl - off).min(len),
                    ));
                }
            }
        }
        let grain = off / g;
        let gti = grain / info.geo.gtes;
        let gt_end = (gti + 1) * info.geo.gtes * g;
        let limit = (off + len).min(gt_end).min(ext.len);
        let file_len = st.file_len;
        let Some(t) = self.table(st, si, ext.file, gti)? else {
            return Ok((Mapping::Unallocated, limit - off));
        };
        let entry = |gr: u64| {
            t.get(usize::try_from(gr % info.geo.gtes).unwrap_or(usize::MAX))
                .copied()
                .unwrap_or(0)
        };
        let first = Self::classify(info, entry(grain));
        if let Gte::Data(h) | Gte::Compressed(h) = first {
            if h >= file_len {
                return Err(self.err(
                    ext.file,
                    Error::GrainOutOfFile {
                        guest: ext.start + grain * g,
                        sector: h / SECTOR,
                    },
                ));
            }
        }
        let mut reach = (grain + 1) * g;
        if !matches!(first, Gte::Compressed(_)) {
            let mut k = 1;
            while reach < limit {
                let next = Self::classify(info, entry(grain + k));
                let same = match (first, next) {
                    (Gte::Data(a), Gte::Data(b)) => b == a + k * g && b < file_len,
                    (a, b) => a == b,
                };
                if !same {
                    break;
                }
                reach += g;
                k += 1;
            }
        }
        let n = reach.min(limit) - off;
        let writable = self.writable && ext.access == Access::Rw && !info.cowd;
        Ok(match first {
            Gte::Unallocated => (Mapping::Unallocated, n),
            Gte::Zeroed => (Mapping::Zero { offset: None }, n),
            Gte::Data(h) => (
                Mapping::Data {
                    file: ext.file,
                    offset: HostOffset(h + off % g),
                    writable,
                },
                n,
            ),
            Gte::Compressed(h) => (
                Mapping::Compressed(CompressedRef {
                    host: HostOffset(h),
                    len: g.saturating_mul(2).saturating_add(4096),
                    guest_cluster: ext.start + grain * g,
                }),
                n,
            ),
        })
    }

    /// Reads grain table `gti` of seSparse extent `si` (from the cache or the file); `None`
    /// when the directory names none.
    fn se_table<'a>(
        &self,
        st: &'a mut SeState,
        si: usize,
        file: usize,
        gti: u64,
    ) -> Result<Option<&'a Vec<u64>>> {
        let layout = &self.se[si];
        let entry = st
            .gd
            .get(usize::try_from(gti).unwrap_or(usize::MAX))
            .copied()
            .unwrap_or(0);
        let bad = || self.err(file, Error::SeSparseBadGdEntry { index: gti, entry });
        let n = match sesparse::GdEntry::decode(entry) {
            sesparse::GdEntry::Unallocated => return Ok(None),
            sesparse::GdEntry::Invalid => return Err(bad()),
            sesparse::GdEntry::Table(n) => n,
        };
        if !st.cache.contains_key(&gti) {
            let off = layout.table_offset(n).ok_or_else(bad)?;
            if off.saturating_add(sesparse::GT_BYTES) > st.file_len {
                return Err(self.err(
                    file,
                    Error::GtOutOfFile {
                        index: gti,
                        sector: off / SECTOR,
                    },
                ));
            }
            let s = self.files[file].as_ref();
            let mut raw = vec![0u8; usize::try_from(sesparse::GT_BYTES).unwrap_or(0)];
            s.read_at(&mut raw, off).ctx(s.path())?;
            let t = raw
                .chunks_exact(8)
                .map(|c| u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
                .collect();
            if st.cache.len() >= st.cache_limit {
                st.cache.clear();
            }
            st.cache.insert(gti, t);
        }
        Ok(st.cache.get(&gti))
    }

    /// Maps inside a seSparse extent; `off` is relative to the extent.
    fn map_sesparse(&self, ext: &Extent, si: usize, off: u64, len: u64) -> Result<(Mapping, u64)> {
        /// A grain table entry, resolved.
        #[derive(Clone, Copy, PartialEq, Eq)]
        enum Se {
            Unallocated,
            Zero,
            Data(u64),
        }
        let layout = &self.se[si];
        let g = sesparse::GRAIN_BYTES;
        let mut guard = self.lock();
        let st = &mut guard.se[si];
        let grain = off / g;
        let gti = grain / sesparse::GTES;
        let gt_end = (gti + 1) * sesparse::GTES * g;
        let limit = (off + len).min(gt_end).min(ext.len);
        let file_len = st.file_len;
        let Some(t) = self.se_table(st, si, ext.file, gti)? else {
            return Ok((Mapping::Unallocated, limit - off));
        };
        // The entry of grain `gr`, or the error it makes.
        let resolve = |gr: u64| -> std::result::Result<Se, Error> {
            let guest = ext.start + gr * g;
            let entry = t
                .get(usize::try_from(gr % sesparse::GTES).unwrap_or(usize::MAX))
                .copied()
                .unwrap_or(0);
            match sesparse::Gte::decode(entry) {
                sesparse::Gte::Unallocated => Ok(Se::Unallocated),
                sesparse::Gte::Unmapped | sesparse::Gte::Zero => Ok(Se::Zero),
                sesparse::Gte::Invalid => Err(Error::SeSparseBadGte { guest, entry }),
                sesparse::Gte::Allocated(n) => match layout.grain_offset(n) {
                    Some(h) if h < file_len => Ok(Se::Data(h)),
                    h => Err(Error::GrainOutOfFile {
                        guest,
                        sector: h.map_or(u64::MAX, |h| h / SECTOR),
                    }),
                },
            }
        };
        let first = resolve(grain).map_err(|e| self.err(ext.file, e))?;
        let mut reach = (grain + 1) * g;
        let mut k = 1;
        while reach < limit {
            // A bad entry ends the run; mapping it reports the error.
            let Ok(next) = resolve(grain + k) else { break };
            let same = match (first, next) {
                (Se::Data(a), Se::Data(b)) => Some(b) == a.checked_add(k * g),
                (a, b) => a == b,
            };
            if !same {
                break;
            }
            reach += g;
            k += 1;
        }
        let n = reach.min(limit) - off;
        Ok(match first {
            Se::Unallocated => (Mapping::Unallocated, n),
            Se::Zero => (Mapping::Zero { offset: None }, n),
            Se::Data(h) => (
                Mapping::Data {
                    file: ext.file,
                    offset: HostOffset(h + off % g),
                    writable: false,
                },
                n,
            ),
        })
    }

    /// The first problem in a seSparse extent and why the check stops there, in qemu's words
    /// (its errno for the failure).
    fn check_sesparse(&self, ext: &Extent, si: usize) -> Option<(String, &'static str)> {
        let mut pos = 0;
        while pos < ext.len {
            let sector = (ext.start + pos) / SECTOR;
            match self.map_sesparse(ext, si, pos, ext.len - pos) {
                Ok((_, n)) => pos += n.max(1),
                Err(crate::Error::Vmdk {
                    source: Error::GrainOutOfFile { .. },
                    ..
                }) => {
                    return Some((
                        format!("ERROR: cluster offset for sector {sector} points after EOF"),
                        "Invalid argument",
                    ))
                }
                Err(_) => {
                    return Some((
                        format!("ERROR: could not get cluster_offset for sector {sector}"),
                        "Operation not permitted",
                    ))
                }
            }
        }
        None
    }

    fn not_writable(&self, ext: &Extent, what: &'static str) -> crate::Error {
        self.err(ext.file, Error::NotWritable(what))
    }

    fn check_ext_writable(&self, ext: &Extent) -> Result<Option<usize>> {
        if !self.writable {
            return Err(crate::Error::ReadOnly {
                path: self.files[0].path().to_owned(),
            });
        }
        if ext.access != Access::Rw {
            return Err(self.not_writable(ext, "a read-only extent"));
        }
        match ext.kind {
            Kind::Zero => Err(self.not_writable(ext, "a ZERO extent")),
            Kind::Flat { .. } => Ok(None),
            Kind::Sparse(si) => {
                if self.sparse[si].cowd {
                    return Err(self.not_writable(ext, "a VMFSSPARSE (COWD) extent"));
                }
                Ok(Some(si))
            }
            Kind::SeSparse(_) => Err(self.not_writable(ext, "a SESPARSE extent")),
        }
    }

    /// Writes one grain table entry (and its redundant copy), allocating the table if needed.
    fn set_gte(
        &self,
        st: &mut SparseState,
        si: usize,
        file: usize,
        grain: u64,
        value: u32,
    ) -> Result<()> {
        let info = &self.sparse[si];
        let gti = grain / info.geo.gtes;
        let gi = grain % info.geo.gtes;
        let s = self.files[file].as_ref();
        let gtu = usize::try_from(gti).unwrap_or(usize::MAX);
        if st.gd.get(gtu).copied().unwrap_or(0) == 0 {
            if gtu >= st.gd.len() {
                return Err(self.err(
                    file,
                    Error::GtOutOfFile {
                        index: gti,
                        sector: 0,
                    },
                ));
            }
            // A new grain table (and a redundant one) at the end of the file.
            let tb = info.geo.gt_bytes();
            let zero = vec![0u8; usize::try_from(tb).unwrap_or(0)];
            let new_sector = |st: &mut SparseState| -> Result<u32> {
                let sec = st.next_sector;
                let v = u32::try_from(sec).map_err(|_| self.err(file, Error::ExtentFull))?;
                s.write_at(&zero, sec * SECTOR).ctx(s.path())?;
                st.next_sector += tb / SECTOR;
                st.file_len = st.file_len.max(st.next_sector * SECTOR);
                Ok(v)
            };
            let gsec = new_sector(st)?;
            st.gd[gtu] = gsec;
            s.write_at(
                &gsec.to_le_bytes(),
                info.header.gd_offset * SECTOR + gti * 4,
            )
            .ctx(s.path())?;
            if st.rgd.is_some() {
                let rsec = new_sector(st)?;
                if let Some(r) = st.rgd.as_mut() {
                    r[gtu] = rsec;
                }
                s.write_at(
                    &rsec.to_le_bytes(),
                    info.header.rgd_offset * SECTOR + gti * 4,
                )
                .ctx(s.path())?;
            }
            st.cache
                .insert(gti, vec![0; usize::try_from(info.geo.gtes).unwrap_or(0)]);
        }
        let gd = u64::from(st.gd[gtu]);
        s.write_at(&value.to_le_bytes(), gd * SECTOR + gi * 4)
            .ctx(s.path())?;
        if let Some(r) = &st.rgd {
            let rg = u64::from(r.get(gtu).copied().unwrap_or(0));
            if rg != 0 {
                s.write_at(&value.to_le_bytes(), rg * SECTOR + gi * 4)
                    .ctx(s.path())?;
            }
        }
        if let Some(t) = st.cache.get_mut(&gti) {
            if let Some(slot) = t.get_mut(usize::try_from(gi).unwrap_or(usize::MAX)) {
                *slot = value;
            }
        }
        Ok(())
    }

    fn entry_of(&self, st: &mut SparseState, si: usize, file: usize, grain: u64) -> Result<u32> {
        let gtes = self.sparse[si].geo.gtes;
        Ok(self
            .table(st, si, file, grain / gtes)?
            .and_then(|t| {
                t.get(usize::try_from(grain % gtes).unwrap_or(usize::MAX))
                    .copied()
            })
            .unwrap_or(0))
    }

    // ---- streamOptimized writing ----

    fn stream_append(&self, st: &mut SparseState, file: usize, data: &[u8]) -> Result<u64> {
        let s = self.files[file].as_ref();
        let Some(sw) = st.stream.as_mut() else {
            return Err(self.err(file, Error::NotWritable("this streamOptimized image")));
        };
        let at = sw.end;
        s.write_at(data, at).ctx(s.path())?;
        let padded = (data.len() as u64).div_ceil(SECTOR) * SECTOR;
        sw.end += padded;
        if padded > data.len() as u64 {
            // Pad the last sector so that the file stays sector aligned.
            let pad = vec![0u8; usize::try_from(padded - data.len() as u64).unwrap_or(0)];
            s.write_at(&pad, at + data.len() as u64).ctx(s.path())?;
        }
        st.file_len = st.file_len.max(sw.end);
        Ok(at)
    }

    /// Writes the grain tables below `gti` that are still open, and an empty one for each
    /// range below it without a grain: as in qemu's layout, every directory entry has its
    /// table, so that qemu can later write a grain anywhere (it allocates grains, never
    /// tables, and would otherwise write over the header).
    fn stream_close_tables_below(
        &self,
        st: &mut SparseState,
        si: usize,
        file: usize,
        gti: u64,
    ) -> Result<()> {
        let info = &self.sparse[si];
        let gti = gti.min(info.geo.gd_entries);
        loop {
            let Some(sw) = st.stream.as_mut() else {
                return Ok(());
            };
            let k = sw.closed_below;
            if k >= gti {
                break;
            }
            let table = sw.open.remove(&k);
            sw.closed_below = k + 1;
            let empty = st
                .gd
                .get(usize::try_from(k).unwrap_or(usize::MAX))
                .is_some_and(|&e| e == 0);
            match table {
                Some(t) => self.stream_write_table(st, info, file, k, &t)?,
                None if empty => self.stream_write_table(st, info, file, k, &[])?,
                None => {}
            }
        }
        Ok(())
    }

    fn stream_write_table(
        &self,
        st: &mut SparseState,
        info: &SparseInfo,
        file: usize,
        k: u64,
        table: &[u32],
    ) -> Result<()> {
        let tb = info.geo.gt_bytes();
        self.stream_append(st, file, &sparse::marker(tb / SECTOR, sparse::MARKER_GT))?;
        let mut raw = vec![0u8; usize::try_from(tb).unwrap_or(0)];
        for (i, v) in table.iter().enumerate() {
            raw[i * 4..i * 4 + 4].copy_from_slice(&v.to_le_bytes());
        }
        let at = self.stream_append(st, file, &raw)?;
        let sec = u32::try_from(at / SECTOR).map_err(|_| self.err(file, Error::ExtentFull))?;
        if let Some(slot) = st.gd.get_mut(usize::try_from(k).unwrap_or(usize::MAX)) {
            *slot = sec;
        }
        st.cache.remove(&k);
        Ok(())
    }

    /// Appends one compressed grain (extent-relative grain index).
    fn stream_grain(
        &self,
        st: &mut SparseState,
        si: usize,
        ext: &Extent,
        grain: u64,
        data: &[u8],
    ) -> Result<()> {
        let info = &self.sparse[si];
        let gti = grain / info.geo.gtes;
        let guest = ext.start + grain * info.geo.grain;
        self.stream_resume(st, si, ext.file)?;
        let closed = st.stream.as_ref().map_or(u64::MAX, |s| s.closed_below);
        if gti < closed || self.entry_of(st, si, ext.file, grain)? != 0 {
            return Err(self.err(ext.file, Error::StreamOutOfOrder(guest)));
        }
        self.stream_close_tables_below(st, si, ext.file, gti)?;
        let size = u32::try_from(data.len())
            .map_err(|_| self.err(ext.file, Error::BadCompressedGrain(0)))?;
        let mut buf = Vec::with_capacity(sparse::GRAIN_MARKER_LEN + data.len());
        buf.extend_from_slice(&sparse::grain_marker(grain * info.geo.grain / SECTOR, size));
        buf.extend_from_slice(data);
        let at = self.stream_append(st, ext.file, &buf)?;
        let sec = u32::try_from(at / SECTOR).map_err(|_| self.err(ext.file, Error::ExtentFull))?;
        let gtes = usize::try_from(info.geo.gtes).unwrap_or(0);
        if let Some(sw) = st.stream.as_mut() {
            let t = sw.open.entry(gti).or_insert_with(|| vec![0; gtes]);
            if let Some(slot) =
                t.get_mut(usize::try_from(grain % info.geo.gtes).unwrap_or(usize::MAX))
            {
                *slot = sec;
            }
        }
        Ok(())
    }

    /// Compresses and appends the staged grains.
    fn stream_emit_pending(&self, st: &mut SparseState, si: usize, ext: &Extent) -> Result<()> {
        let Some((_, stg)) = &self.staging else {
            return Ok(());
        };
        let Some(sw) = st.stream.as_mut() else {
            return Ok(());
        };
        if sw.pending.take().is_none() {
            return Ok(());
        }
        let (base, bytes) = stg.take();
        let g = self.sparse[si].geo.grain;
        let gl = usize::try_from(g).unwrap_or(usize::MAX);
        for (i, grain) in bytes.chunks(gl).enumerate() {
            if grain.iter().all(|&b| b == 0) && self.desc.parent_hint.is_none() {
                // Left unallocated: it reads as zeroes.
                continue;
            }
            let mut full;
            let data = if grain.len() < gl {
                full = grain.to_vec();
                full.resize(gl, 0);
                &full[..]
            } else {
                grain
            };
            let c = deflate(data);
            self.stream_grain(st, si, ext, base / g + i as u64, &c)?;
        }
        Ok(())
    }

    /// Takes back the GD, footer and EOS of a finished stream so that it can go on.
    fn stream_resume(&self, st: &mut SparseState, si: usize, file: usize) -> Result<()> {
        let Some(sw) = st.stream.as_mut() else {
            return Err(self.err(file, Error::NotWritable("this streamOptimized image")));
        };
        let Some(at) = sw.finished_at.take() else {
            return Ok(());
        };
        sw.end = at;
        // The directory the header names is about to be written over: back to GD_AT_END
        // until the stream is finished again.
        let s = self.files[file].as_ref();
        s.write_at(&self.sparse[si].header.to_bytes(), 0)
            .ctx(s.path())?;
        let Some(sw) = st.stream.as_mut() else {
            return Ok(());
        };
        let reopened = std::mem::take(&mut sw.finish_tables);
        for k in reopened {
            if let Some(slot) = st.gd.get_mut(usize::try_from(k).unwrap_or(usize::MAX)) {
                *slot = 0;
            }
            st.cache.remove(&k);
        }
        let s = self.files[file].as_ref();
        s.set_len(at).ctx(s.path())?;
        st.file_len = at;
        Ok(())
    }

    /// Writes the open grain tables, the GD, the footer and the EOS marker.
    fn stream_finish(&self, st: &mut SparseState, si: usize, ext: &Extent) -> Result<()> {
        if st.stream.as_ref().is_none_or(|s| s.finished_at.is_some()) {
            return Ok(());
        }
        self.stream_emit_pending(st, si, ext)?;
        let info = &self.sparse[si];
        let file = ext.file;
        let Some(sw) = st.stream.as_mut() else {
            return Ok(());
        };
        let start = sw.end;
        // Open tables are written but kept, so that a later write can reopen them; so are the
        // empty tables of the ranges after the last grain (every directory entry gets one).
        let mut tables = Vec::new();
        for k in sw.closed_below..info.geo.gd_entries {
            match sw.open.get(&k) {
                Some(t) => tables.push((k, Some(t.clone()))),
                None if st.gd.get(usize::try_from(k).unwrap_or(usize::MAX)) == Some(&0) => {
                    tables.push((k, None));
                }
                None => {}
            }
        }
        let mut written = Vec::new();
        for (k, t) in &tables {
            self.stream_write_table(st, info, file, *k, t.as_deref().unwrap_or(&[]))?;
            written.push(*k);
        }
        let gdb = info.geo.gd_bytes();
        self.stream_append(st, file, &sparse::marker(gdb / SECTOR, sparse::MARKER_GD))?;
        let mut raw = vec![0u8; usize::try_from(gdb).unwrap_or(0)];
        for (i, v) in st.gd.iter().enumerate() {
            raw[i * 4..i * 4 + 4].copy_from_slice(&v.to_le_bytes());
        }
        let gd_at = self.stream_append(st, file, &raw)?;
        self.stream_append(st, file, &sparse::marker(1, sparse::MARKER_FOOTER))?;
        let mut footer = info.header.clone();
        footer.gd_offset = gd_at / SECTOR;
        self.stream_append(st, file, &footer.to_bytes())?;
        self.stream_append(st, file, &sparse::marker(0, sparse::MARKER_EOS))?;
        let s = self.files[file].as_ref();
        if let Some(sw) = st.stream.as_mut() {
            sw.finished_at = Some(start);
            sw.finish_tables = written;
            s.set_len(sw.end).ctx(s.path())?;
        }
        // The header names the directory too, as qemu's does: qemu opens such a stream for
        // writing through its header (with GD_AT_END it would append past the footer it
        // found the directory by, and lose it). Readers that go by the footer still find it.
        s.write_at(&footer.to_bytes(), 0).ctx(s.path())?;
        Ok(())
    }

    fn finish_streams(&self) -> Result<()> {
        if self.staging.is_none() {
            return Ok(());
        }
        let mut guard = self.lock();
        for ext in &self.extents {
            if let Kind::Sparse(si) = ext.kind {
                self.stream_finish(&mut guard.sparse[si], si, ext)?;
            }
        }
        Ok(())
    }
}

/// Opens a sparse extent file (KDMV or COWD).
fn open_sparse(
    s: &dyn Storage,
    writable: bool,
    budget: &mut GdBudget,
) -> Result<(SparseInfo, SparseState)> {
    let path = s.path();
    let mut file_len = s.size().ctx(path)?;
    if file_len < SECTOR {
        return Err(verr(path, Error::Truncated(file_len)));
    }
    let mut first = [0u8; 512];
    s.read_at(&mut first, 0).ctx(path)?;
    if first[..4] == sparse::COWD_MAGIC {
        let h = CowdHeader::parse(&first).map_err(|e| verr(path, e))?;
        let geo = Geometry::new(
            u64::from(h.disk_sectors),
            u64::from(h.granularity),
            sparse::COWD_GTES,
        )
        .map_err(|e| verr(path, e))?;
        let n = u64::from(h.l1dir_size).min(geo.gd_entries.max(1));
        let gd_off = u64::from(h.l1dir_offset) * SECTOR;
        if gd_off + n * 4 > file_len {
            return Err(verr(
                path,
                Error::OutOfFile {
                    what: "grain directory",
                    sector: u64::from(h.l1dir_offset),
                },
            ));
        }
        budget.take(path, geo.gd_entries.max(n) * 4)?;
        let mut gd = read_u32s(s, gd_off, n)?;
        gd.resize(usize::try_from(geo.gd_entries).unwrap_or(0), 0);
        let header = SparseHeader {
            version: 1,
            flags: 0,
            capacity: geo.capacity,
            grain_size: u64::from(h.granularity),
            desc_offset: 0,
            desc_size: 0,
            gtes_per_gt: sparse::COWD_GTES,
            rgd_offset: 0,
            gd_offset: u64::from(h.l1dir_offset),
            overhead: 0,
            unclean: 0,
            check_bytes: [0; 4],
            compress: 0,
        };
        return Ok((
            SparseInfo {
                geo,
                header,
                compressed: false,
                markers: false,
                zero_grain: false,
                cowd: true,
            },
            SparseState {
                gd,
                rgd: None,
                cache: HashMap::default(),
                cache_limit: 1,
                next_sector: file_len.div_ceil(SECTOR),
                file_len,
                stream: None,
            },
        ));
    }
    let mut h = SparseHeader::parse(&first).map_err(|e| verr(path, e))?;
    let mut stream = None;
    if h.gd_offset == GD_AT_END {
        if h.compressed() && file_len == h.overhead.saturating_mul(SECTOR) {
            // A stream just created and not written yet: this open writes it.
            if !writable {
                return Err(verr(path, Error::BadFooter));
            }
            stream = Some(StreamWriter::new(file_len));
        } else {
            let at = file_len
                .checked_sub(3 * SECTOR)
                .ok_or_else(|| verr(path, Error::BadFooter))?;
            let mut tail = [0u8; 1536];
            s.read_at(&mut tail, at).ctx(path)?;
            let mut m = [0u8; 512];
            m.copy_from_slice(&tail[..512]);
            let (_, fsize, ftype) = sparse::parse_marker(&m);
            m.copy_from_slice(&tail[1024..]);
            let eos = sparse::parse_marker(&m);
            if fsize != 0 || ftype != sparse::MARKER_FOOTER || eos != (0, 0, sparse::MARKER_EOS) {
                return Err(verr(path, Error::BadFooter));
            }
            let created = h.clone();
            h = SparseHeader::parse(&tail[512..1024]).map_err(|_| verr(path, Error::BadFooter))?;
            if h.gd_offset == GD_AT_END {
                return Err(verr(path, Error::BadFooter));
            }
            if writable && stream_is_empty(s, &h).map_err(|e| verr(path, e))? {
                // An empty finished stream (as ovftool, or earlier versions of this driver,
                // make them): writing it starts the stream afresh after the descriptor.
                let start = created.overhead.saturating_mul(SECTOR);
                s.set_len(start).ctx(path)?;
                file_len = start;
                h = created;
                stream = Some(StreamWriter::new(start));
            }
        }
    }
    if writable
        && stream.is_none()
        && h.compressed()
        && h.flags & sparse::FLAG_MARKER != 0
        && stream_is_empty(s, &h).map_err(|e| verr(path, e))?
    {
        // A stream created empty in qemu's layout (directories after the descriptor, no
        // footer): writing it starts the stream afresh, in VMware's layout, after the tables.
        let start = h.overhead.saturating_mul(SECTOR);
        if start > file_len {
            return Err(verr(path, Error::FileTruncated(start)));
        }
        h.gd_offset = GD_AT_END;
        h.rgd_offset = 0;
        h.flags &= !sparse::FLAG_RGD;
        s.set_len(start).ctx(path)?;
        s.write_at(&h.to_bytes(), 0).ctx(path)?;
        file_len = start;
        stream = Some(StreamWriter::new(start));
    }
    let geo = h.validate().map_err(|e| verr(path, e))?;
    let compressed = h.compressed();
    if h.version == 3 && !compressed && writable {
        return Err(verr(path, Error::Version3ReadOnly));
    }
    if stream.is_none() && h.overhead.saturating_mul(SECTOR) > file_len {
        return Err(verr(
            path,
            Error::FileTruncated(h.overhead.saturating_mul(SECTOR)),
        ));
    }
    let gd_entries = geo.gd_entries;
    let locate = |sector: u64, what: &'static str| -> Result<u64> {
        sector
            .checked_mul(SECTOR)
            .filter(|o| o.checked_add(gd_entries * 4).is_some_and(|e| e <= file_len))
            .ok_or_else(|| verr(path, Error::OutOfFile { what, sector }))
    };
    let mut read_dir = |off: u64| -> Result<Vec<u32>> {
        budget.take(path, gd_entries * 4)?;
        read_u32s(s, off, gd_entries)
    };
    let (gd, rgd) = if stream.is_some() {
        budget.take(path, gd_entries * 4)?;
        (vec![0u32; usize::try_from(gd_entries).unwrap_or(0)], None)
    } else {
        let gd = read_dir(locate(h.gd_offset, "grain directory")?)?;
        let rgd = if h.flags & sparse::FLAG_RGD != 0 && h.rgd_offset != 0 {
            let off = locate(h.rgd_offset, "redundant grain directory")?;
            // The redundant copy is only ever written to: a reader leaves it on disk.
            writable.then(|| read_dir(off)).transpose()?
        } else {
            None
        };
        (gd, rgd)
    };
    let grain_sectors = h.grain_size;
    let next_sector = file_len.div_ceil(SECTOR).div_ceil(grain_sectors) * grain_sectors;
    let info = SparseInfo {
        geo,
        compressed,
        markers: h.flags & sparse::FLAG_MARKER != 0,
        zero_grain: h.flags & sparse::FLAG_ZERO_GRAIN != 0,
        cowd: false,
        header: h,
    };
    Ok((
        info,
        SparseState {
            gd,
            rgd,
            cache: HashMap::default(),
            cache_limit: 1,
            next_sector,
            file_len,
            stream,
        },
    ))
}

/// Opens a seSparse extent file (read only): checks both headers and reads the grain
/// directory entries that cover the capacity.
fn open_sesparse(s: &dyn Storage, budget: &mut GdBudget) -> Result<(sesparse::Layout, SeState)> {
    let path = s.path();
    let file_len = s.size().ctx(path)?;
    if file_len < SECTOR {
        return Err(verr(path, Error::Truncated(file_len)));
    }
    let mut b = [0u8; sesparse::HEADER_BYTES];
    s.read_at(&mut b, 0).ctx(path)?;
    let layout = sesparse::ConstHeader::parse(&b)
        .validate(file_len)
        .map_err(|e| verr(path, e))?;
    s.read_at(&mut b, layout.volatile_offset).ctx(path)?;
    sesparse::VolatileHeader::parse(&b)
        .validate(layout.volatile_offset)
        .map_err(|e| verr(path, e))?;
    // validate() capped the directory at MAX_GD_BYTES and checked it lies in the file.
    budget.take(path, layout.gd_entries * 8)?;
    let bytes = usize::try_from(layout.gd_entries * 8)
        .map_err(|_| verr(path, Error::GdTooLarge(layout.gd_entries)))?;
    let mut raw = vec![0u8; bytes];
    s.read_at(&mut raw, layout.gd_offset).ctx(path)?;
    let gd = raw
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
        .collect();
    Ok((
        layout,
        SeState {
            gd,
            cache: HashMap::default(),
            cache_limit: 1,
            file_len,
        },
    ))
}

impl Vmdk {
    /// Writes a new random CID into the descriptor (embedded or a file of its own).
    fn renew_cid(&self) -> Result<()> {
        let s = self.files[0].as_ref();
        let path = s.path();
        let len = s.size().ctx(path)?;
        let mut first = [0u8; 512];
        s.read_at(&mut first, 0).ctx(path)?;
        let (off, room) = if first[..4] == sparse::MAGIC {
            let h = SparseHeader::parse(&first).map_err(|e| verr(path, e))?;
            if h.desc_offset == 0 {
                return Ok(());
            }
            (
                h.desc_offset.saturating_mul(SECTOR),
                h.desc_size
                    .saturating_mul(SECTOR)
                    .min(MAX_DESCRIPTOR_BYTES + 1),
            )
        } else if first[..4] == sparse::COWD_MAGIC || len > MAX_DESCRIPTOR_BYTES {
            return Ok(());
        } else {
            (0, len)
        };
        let mut buf = vec![0u8; usize::try_from(room.min(len.saturating_sub(off))).unwrap_or(0)];
        s.read_at(&mut buf, off).ctx(path)?;
        let Some(text) = Descriptor::with_cid(&buf, create::random_u32()) else {
            return Ok(());
        };
        if off == 0 {
            s.write_at(&text, 0).ctx(path)?;
            s.set_len(text.len() as u64).ctx(path)?;
        } else if text.len() <= buf.len() {
            let mut region = text;
            region.resize(buf.len(), 0);
            s.write_at(&region, off).ctx(path)?;
        }
        Ok(())
    }
}

impl Drop for Vmdk {
    fn drop(&mut self) {
        // A stream must end with its footer; errors have nowhere to go here (flush reports them).
        let _ = self.finish_streams();
    }
}

impl Driver for Vmdk {
    fn backing_usable(&self) -> Result<()> {
        match &self.parent_mismatch {
            None => Ok(()),
            Some((parent, expected, found)) => Err(self.err(
                0,
                Error::ParentCidMismatch {
                    parent: parent.clone(),
                    expected: *expected,
                    found: *found,
                },
            )),
        }
    }
    fn format(&self) -> Format {
        Format::Vmdk
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

    fn usage_files(&self) -> usize {
        // qemu sums the descriptor and every extent file.
        self.files.len()
    }

    fn cluster_size(&self) -> Option<u64> {
        self.sparse
            .first()
            .map(|s| s.geo.grain)
            .or_else(|| self.se.first().map(|_| sesparse::GRAIN_BYTES))
    }

    fn backing(&self) -> Option<BackingSpec> {
        self.desc.parent_hint.as_ref().map(|h| BackingSpec {
            filename: h.clone(),
            format: Some("vmdk".into()),
        })
    }

    fn specific(&self) -> FormatSpecific {
        FormatSpecific::Vmdk(VmdkSpecific {
            create_type: self.desc.create_type.clone(),
            cid: self.desc.cid,
            parent_cid: self.desc.parent_cid,
            extents: self
                .extents
                .iter()
                .map(|e| {
                    let (cs, comp) = match e.kind {
                        Kind::Sparse(si) => {
                            (Some(self.sparse[si].geo.grain), self.sparse[si].compressed)
                        }
                        Kind::SeSparse(_) => (Some(sesparse::GRAIN_BYTES), false),
                        _ => (None, false),
                    };
                    VmdkExtentInfo {
                        filename: e.filename.clone(),
                        format: e.type_name.clone(),
                        virtual_size: e.len,
                        cluster_size: cs,
                        compressed: comp,
                    }
                })
                .collect(),
        })
    }

    fn snapshot_view(&self, snap: &crate::SnapshotRef) -> Result<Box<dyn Driver>> {
        Err(crate::Error::NoSuchSnapshot {
            path: self.files[0].path().to_owned(),
            name: snap.label().to_owned(),
        })
    }

    fn status_boundary(&self, offset: u64) -> Option<u64> {
        let ext = self.extent_at(offset)?;
        let end = ext.start.checked_add(ext.len)?;
        let grain = match ext.kind {
            Kind::Sparse(si) => self.sparse.get(si)?.geo.grain,
            Kind::SeSparse(_) => sesparse::GRAIN_BYTES,
            Kind::Flat { .. } | Kind::Zero => return Some(end),
        };
        let off = offset - ext.start;
        let next = (off / grain).checked_add(1)?.checked_mul(grain)?;
        Some(ext.start.checked_add(next)?.min(end))
    }

    fn map(&self, offset: u64, len: u64) -> Result<(Mapping, u64)> {
        if offset >= self.size {
            return Ok((Mapping::Eof, len.max(1)));
        }
        let len = len.min(self.size - offset).max(1);
        let Some(ext) = self.extent_at(offset) else {
            return Ok((Mapping::Eof, len));
        };
        let off = offset - ext.start;
        let len = len.min(ext.len - off);
        if ext.access == Access::NoAccess {
            return Ok((Mapping::Zero { offset: None }, len));
        }
        match ext.kind {
            Kind::Zero => Ok((Mapping::Zero { offset: None }, len)),
            Kind::Flat { base } => Ok((
                Mapping::Data {
                    file: ext.file,
                    offset: HostOffset(base + off),
                    writable: self.writable && ext.access == Access::Rw,
                },
                len,
            )),
            Kind::Sparse(si) => self.map_sparse(ext, si, off, len),
            Kind::SeSparse(si) => self.map_sesparse(ext, si, off, len),
        }
    }

    fn data_holes_read_as_zero(&self, file: usize) -> bool {
        // qemu asks the file under a flat extent about holes; sparse grains are data as they are.
        self.extents
            .iter()
            .any(|e| e.file == file && matches!(e.kind, Kind::Flat { .. }))
    }

    fn read_compressed(&self, c: &CompressedRef, out: &mut [u8]) -> Result<()> {
        let ext = self
            .extent_at(c.guest_cluster)
            .ok_or_else(|| self.err(0, Error::BadCompressedGrain(c.host.0 / SECTOR)))?;
        let Kind::Sparse(si) = ext.kind else {
            return Err(self.err(ext.file, Error::BadCompressedGrain(c.host.0 / SECTOR)));
        };
        let info = &self.sparse[si];
        let bad = || self.err(ext.file, Error::BadCompressedGrain(c.host.0 / SECTOR));
        let s = self.files[ext.file].as_ref();
        let g = usize::try_from(info.geo.grain).map_err(|_| bad())?;
        if out.len() < g {
            return Err(bad());
        }
        let max = usize::try_from(c.len).map_err(|_| bad())?;
        let data = if info.markers {
            let mut m = [0u8; sparse::GRAIN_MARKER_LEN];
            s.read_at(&mut m, c.host.0).ctx(s.path())?;
            let lba = u64::from_le_bytes([m[0], m[1], m[2], m[3], m[4], m[5], m[6], m[7]]);
            let size = usize::try_from(u32::from_le_bytes([m[8], m[9], m[10], m[11]]))
                .map_err(|_| bad())?;
            if lba.checked_mul(SECTOR) != c.guest_cluster.checked_sub(ext.start) || size > max {
                return Err(bad());
            }
            let mut d = vec![0u8; size];
            s.read_at(&mut d, c.host.0 + sparse::GRAIN_MARKER_LEN as u64)
                .ctx(s.path())?;
            d
        } else {
            let mut d = vec![0u8; max];
            s.read_at(&mut d, c.host.0).ctx(s.path())?;
            d
        };
        out.fill(0);
        inflate(&data, &mut out[..g]).ok_or_else(bad)?;
        Ok(())
    }

    fn cow_granularity(&self) -> u64 {
        self.sparse.iter().map(|s| s.geo.grain).max().unwrap_or(1)
    }

    fn allocate(&self, offset: u64, len: u64) -> Result<Vec<HostExtent>> {
        let mut out = Vec::new();
        let end = offset.saturating_add(len);
        let mut pos = offset;
        while pos < end {
            // The last grain of the disk may reach past its end: it belongs to the last extent.
            let ext = self
                .extent_at(pos)
                .or_else(|| self.extents.last().filter(|e| pos >= e.start))
                .ok_or_else(|| self.err(0, Error::NotWritable("past the last extent")))?;
            // Split at extent boundaries, but not at the end of the last extent: a last grain
            // reaching past the disk's end is one grain, allocated once.
            let last = self.extents.last().is_some_and(|l| std::ptr::eq(l, ext));
            let piece_end = if last || end <= ext.start + ext.len {
                end
            } else {
                ext.start + ext.len
            };
            match self.check_ext_writable(ext)? {
                None => {
                    if let Kind::Flat { base } = ext.kind {
                        out.push(HostExtent {
                            guest: pos,
                            len: piece_end - pos,
                            file: ext.file,
                            host: HostOffset(base + pos - ext.start),
                        });
                    }
                }
                Some(si) => {
                    let info = &self.sparse[si];
                    let g = info.geo.grain;
                    let mut guard = self.lock();
                    let st = &mut guard.sparse[si];
                    if st.stream.is_some() {
                        let Some((staging, stg)) = &self.staging else {
                            return Err(self.not_writable(ext, "this streamOptimized image"));
                        };
                        self.stream_emit_pending(st, si, ext)?;
                        self.stream_resume(st, si, ext.file)?;
                        let a = (pos - ext.start) / g * g;
                        let b = (piece_end - ext.start).div_ceil(g) * g;
                        let closed = st.stream.as_ref().map_or(0, |s| s.closed_below);
                        let mut gr = a / g;
                        while gr * g < b {
                            if gr / info.geo.gtes < closed
                                || self.entry_of(st, si, ext.file, gr)? != 0
                            {
                                return Err(
                                    self.err(ext.file, Error::StreamOutOfOrder(ext.start + gr * g))
                                );
                            }
                            gr += 1;
                        }
                        let n = usize::try_from(b - a)
                            .map_err(|_| self.err(ext.file, Error::ExtentFull))?;
                        stg.reset(a, n);
                        out.push(HostExtent {
                            guest: pos,
                            len: piece_end - pos,
                            file: *staging,
                            host: HostOffset(pos - ext.start),
                        });
                        if let Some(sw) = st.stream.as_mut() {
                            sw.pending = Some((a, b - a));
                        }
                    } else {
                        if info.compressed {
                            return Err(self.not_writable(ext, "an existing streamOptimized image"));
                        }
                        let mut p = pos;
                        while p < piece_end {
                            let rel = p - ext.start;
                            let grain = rel / g;
                            let gend = piece_end.min(ext.start + (grain + 1) * g);
                            let e = self.entry_of(st, si, ext.file, grain)?;
                            let host = match Self::classify(info, e) {
                                Gte::Data(h) => h,
                                _ => {
                                    let sec = st.next_sector;
                                    if sec + info.header.grain_size > u64::from(u32::MAX) {
                                        return Err(self.err(ext.file, Error::ExtentFull));
                                    }
                                    st.next_sector += info.header.grain_size;
                                    sec * SECTOR
                                }
                            };
                            let h = host + rel % g;
                            match out.last_mut() {
                                Some(l @ HostExtent { .. })
                                    if l.file == ext.file
                                        && l.guest + l.len == p
                                        && l.host.0 + l.len == h =>
                                {
                                    l.len += gend - p
                                }
                                _ => out.push(HostExtent {
                                    guest: p,
                                    len: gend - p,
                                    file: ext.file,
                                    host: HostOffset(h),
                                }),
                            }
                            p = gend;
                        }
                    }
                }
            }
            pos = piece_end;
        }
        Ok(out)
    }

    fn commit(&self, extents: &[HostExtent]) -> Result<()> {
        for he in extents {
            if Some(he.file) == self.staging.as_ref().map(|s| s.0) {
                // Staged stream data: compressed when the stream moves on or finishes.
                continue;
            }
            let Some(ext) = self.extent_at(he.guest) else {
                continue;
            };
            let Kind::Sparse(si) = ext.kind else { continue };
            let g = self.sparse[si].geo.grain;
            let mut guard = self.lock();
            let st = &mut guard.sparse[si];
            let mut p = he.guest;
            let end = he.guest + he.len;
            while p < end {
                let rel = p - ext.start;
                let grain = rel / g;
                let host_grain = he.host.0 + (p - he.guest) - rel % g;
                let sec = u32::try_from(host_grain / SECTOR)
                    .map_err(|_| self.err(ext.file, Error::ExtentFull))?;
                if self.entry_of(st, si, ext.file, grain)? != sec {
                    self.set_gte(st, si, ext.file, grain, sec)?;
                }
                st.file_len = st.file_len.max(host_grain + g);
                p = end.min(ext.start + (grain + 1) * g);
            }
        }
        Ok(())
    }

    fn zero(&self, offset: u64, len: u64, unmap: bool) -> Result<bool> {
        if !self.writable {
            return Err(crate::Error::ReadOnly {
                path: self.files[0].path().to_owned(),
            });
        }
        let end = offset.saturating_add(len);
        // First pass: can every part be zeroed through metadata?
        let mut pos = offset;
        while pos < end {
            let Some(ext) = self.extent_at(pos) else {
                break;
            };
            let pend = end.min(ext.start + ext.len);
            let ok = match ext.kind {
                Kind::Zero => true,
                Kind::Flat { .. } => ext.access == Access::Rw,
                Kind::SeSparse(_) => false,
                Kind::Sparse(si) => {
                    let info = &self.sparse[si];
                    if info.zero_grain && ext.access == Access::Rw && !info.compressed {
                        true
                    } else if self.desc.parent_hint.is_some() {
                        false
                    } else {
                        // Without zeroed grains, only ranges that are already unallocated.
                        let mut p = pos;
                        let mut all = true;
                        while p < pend {
                            let (m, n) = self.map(p, pend - p)?;
                            if !matches!(m, Mapping::Unallocated | Mapping::Zero { .. }) {
                                all = false;
                                break;
                            }
                            p += n.max(1);
                        }
                        all
                    }
                }
            };
            if !ok {
                return Ok(false);
            }
            pos = pend;
        }
        let mut pos = offset;
        while pos < end {
            let Some(ext) = self.extent_at(pos) else {
                break;
            };
            let pend = end.min(ext.start + ext.len);
            match ext.kind {
                Kind::Zero | Kind::SeSparse(_) => {}
                Kind::Flat { base } => {
                    let s = self.files[ext.file].as_ref();
                    s.write_zeroes(base + pos - ext.start, pend - pos, unmap)
                        .ctx(s.path())?;
                }
                Kind::Sparse(si) => {
                    let info = &self.sparse[si];
                    if info.zero_grain && !info.compressed {
                        let g = info.geo.grain;
                        let mut guard = self.lock();
                        let st = &mut guard.sparse[si];
                        let mut gr = (pos - ext.start) / g;
                        while ext.start + gr * g < pend {
                            if self.entry_of(st, si, ext.file, gr)? != sparse::GTE_ZEROED {
                                self.set_gte(st, si, ext.file, gr, sparse::GTE_ZEROED)?;
                            }
                            gr += 1;
                        }
                    }
                }
            }
            pos = pend;
        }
        Ok(true)
    }

    fn discard(&self, _offset: u64, _len: u64) -> Result<()> {
        // qemu's vmdk has no discard: the data stays.
        if !self.writable {
            return Err(crate::Error::ReadOnly {
                path: self.files[0].path().to_owned(),
            });
        }
        Ok(())
    }

    fn can_write_compressed(&self) -> bool {
        // A stream compresses; sparse extents store plain grains, as qemu's driver does. Flat
        // extents have no grain size, and convert refuses them for that.
        true
    }

    fn always_compressed(&self) -> bool {
        self.staging.is_some()
    }

    fn compress_cluster(&self, data: &[u8]) -> Option<Vec<u8>> {
        // Every grain of a stream is compressed, whether or not it shrinks.
        self.staging.as_ref()?;
        Some(deflate(data))
    }

    fn write_compressed(&self, offset: u64, compressed: &[u8]) -> Result<()> {
        let ext = self
            .extent_at(offset)
            .ok_or_else(|| self.err(0, Error::StreamOutOfOrder(offset)))?;
        let Some(si) = self.check_ext_writable(ext)? else {
            return Err(self.unsupported("compressed clusters"));
        };
        let g = self.sparse[si].geo.grain;
        let rel = offset - ext.start;
        if rel % g != 0 {
            return Err(self.err(ext.file, Error::StreamOutOfOrder(offset)));
        }
        let mut guard = self.lock();
        let st = &mut guard.sparse[si];
        if st.stream.is_none() {
            return Err(self.unsupported("compressed clusters outside streamOptimized images"));
        }
        self.stream_emit_pending(st, si, ext)?;
        self.stream_grain(st, si, ext, rel / g, compressed)
    }

    fn check(&self, repair: Repair) -> Result<CheckReport> {
        // qemu's vmdk check only counts problems: asked to repair, it answers ENOTSUP.
        if repair != Repair::None {
            return Err(self.unsupported("checks"));
        }
        let mut r = CheckReport::default();
        let mut guard = self.lock();
        for ext in &self.extents {
            let Kind::Sparse(si) = ext.kind else { continue };
            let info = &self.sparse[si];
            let st = &mut guard.sparse[si];
            let g = info.geo.grain;
            let grains = ext.len.div_ceil(g);
            r.total_clusters += grains;
            let mut last: Option<u64> = None;
            let mut gr = 0;
            while gr < grains {
                let gti = gr / info.geo.gtes;
                let t = match self.table(st, si, ext.file, gti) {
                    Ok(Some(t)) => t.clone(),
                    Ok(None) => {
                        gr = (gti + 1) * info.geo.gtes;
                        continue;
                    }
                    Err(e) => {
                        r.messages.push(format!("ERROR: {e}"));
                        r.corruptions += 1;
                        gr = (gti + 1) * info.geo.gtes;
                        continue;
                    }
                };
                let stop = grains.min((gti + 1) * info.geo.gtes);
                while gr < stop {
                    let e = t
                        .get(usize::try_from(gr % info.geo.gtes).unwrap_or(usize::MAX))
                        .copied()
                        .unwrap_or(0);
                    match Self::classify(info, e) {
                        Gte::Data(h) | Gte::Compressed(h) => {
                            if h >= st.file_len {
                                // qemu stops the check here and fails it.
                                r.messages.push(format!(
                                    "ERROR: cluster offset for sector {} points after EOF",
                                    (ext.start + gr * g) / SECTOR
                                ));
                                r.corruptions += 1;
                                r.failed = Some("Invalid argument".to_owned());
                                return Ok(r);
                            } else {
                                r.allocated_clusters += 1;
                                if matches!(Self::classify(info, e), Gte::Compressed(_)) {
                                    r.compressed_clusters += 1;
                                }
                                if last.is_some_and(|l| l + g != h) {
                                    r.fragmented_clusters += 1;
                                }
                                last = Some(h);
                            }
                        }
                        _ => {}
                    }
                    gr += 1;
                }
            }
        }
        drop(guard);
        // seSparse extents, as qemu checks them: grain by grain, stopping short at the first
        // grain that cannot be mapped or that points past the end of its file.
        for ext in &self.extents {
            let Kind::SeSparse(si) = ext.kind else {
                continue;
            };
            if let Some((m, why)) = self.check_sesparse(ext, si) {
                r.messages.push(m);
                r.corruptions += 1;
                r.failed = Some(why.to_owned());
                break;
            }
        }
        Ok(r)
    }

    fn note_write(&self, _offset: u64, _len: u64) -> Result<()> {
        use std::sync::atomic::Ordering;
        // A finished stream refuses writes: it keeps its CID too.
        let finished_stream = || {
            let g = self.lock();
            self.sparse
                .iter()
                .zip(&g.sparse)
                .any(|(i, st)| i.compressed && st.stream.is_none())
        };
        if self.writable
            && !self.cid_renewed.load(Ordering::SeqCst)
            && !finished_stream()
            && !self.cid_renewed.swap(true, Ordering::SeqCst)
        {
            if let Err(e) = self.renew_cid() {
                self.cid_renewed.store(false, Ordering::SeqCst);
                return Err(e);
            }
        }
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        self.finish_streams()?;
        for f in &self.files {
            f.flush().ctx(f.path())?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;

/// Whether a stream holds no grain: every grain table the directory named by `h` (a finished
/// stream's footer, or the header of one in qemu's layout) names is all zero.
fn stream_is_empty(s: &dyn Storage, h: &SparseHeader) -> std::result::Result<bool, Error> {
    let geo = h.validate()?;
    let gd_bytes = usize::try_from(geo.gd_entries.saturating_mul(4)).unwrap_or(usize::MAX);
    if gd_bytes as u64 > MAX_GD_BYTES {
        return Ok(false);
    }
    let mut gd = vec![0u8; gd_bytes];
    s.read_at(&mut gd, h.gd_offset.saturating_mul(SECTOR))
        .map_err(|_| Error::BadFooter)?;
    let gt_bytes = usize::try_from(geo.gtes.saturating_mul(4)).unwrap_or(usize::MAX);
    let mut gt = vec![0u8; gt_bytes.min(1 << 20)];
    for e in gd.chunks_exact(4) {
        let sector = u64::from(u32::from_le_bytes([e[0], e[1], e[2], e[3]]));
        if sector == 0 {
            continue;
        }
        s.read_at(&mut gt, sector.saturating_mul(SECTOR))
            .map_err(|_| Error::BadFooter)?;
        if gt.iter().any(|&b| b != 0) {
            return Ok(false);
        }
    }
    Ok(true)
}
