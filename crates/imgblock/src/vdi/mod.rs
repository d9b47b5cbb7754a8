//! VirtualBox Disk Images (VDI), per VirtualBox's `VDICore.h` layout as qemu's block/vdi.c
//! reads it: a 512-byte header, a block map of little-endian u32 entries, 1 MiB data blocks.
//!
//! ```text
//!  Vdi (Driver) --map--> block map (chunks cached) --> data block i at offset_data + i * 1 MiB
//!        |                                    \--> 0xffffffff: unallocated (parent or zeroes)
//!        |                                    \--> 0xfffffffe: reads as zeroes
//!        +--allocate/commit--> next data block = blocks_allocated; map entry + header rewritten
//! ```
//! Differencing images (type 4) name their parent by UUID only; the driver looks for a `.vdi`
//! with that UUID next to the image (VirtualBox keeps the link in its media registry instead).

mod bmap;
mod create;
mod error;
pub mod header;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

pub use create::{create, CREATE_OPTIONS};
pub use error::Error;
use header::{Header, ImageType, Uuid, BLOCK_SIZE};

use crate::driver::{
    BackingSpec, CompressedRef, Driver, FormatSpecific, HostExtent, HostOffset, Mapping,
    VdiSpecific,
};
use crate::error::IoContext;
use crate::storage::Storage;
use crate::{CheckReport, Format, Repair, Result};

/// Most blocks an image may have, qemu's limit: a block map of just under 2 GiB, 512 TiB of
/// 1 MiB blocks. The map is cached in chunks, never held whole.
pub const MAX_BLOCKS: u32 = 0x1fff_ff80;
/// Block map entry: block not allocated (read from the parent, or zeroes).
pub const BMAP_FREE: u32 = 0xffff_ffff;
/// Block map entry: block reads as zeroes.
pub const BMAP_ZERO: u32 = 0xffff_fffe;
/// Most bytes a new data block may start past the end of the file. qemu and VirtualBox append
/// blocks at the end of the file; only a fresh VirtualBox image leaves a gap there, its data area
/// starting at the 1 MiB boundary after the block map. A header whose data offset or count of
/// allocated blocks puts the next block further out is inconsistent, and writing there would grow
/// the file (or a storage held in memory) by that much.
pub const MAX_DATA_GAP: u64 = 16 << 20;
/// How many `.vdi` files next to a differencing image are examined to find its parent.
pub const MAX_PARENT_CANDIDATES: usize = 256;
/// VDI has no compressed blocks: `convert -c` refuses it.
pub const WRITES_COMPRESSED: bool = false;

const BS: u64 = BLOCK_SIZE as u64;

/// Mutable state.
#[derive(Debug)]
struct State {
    h: Header,
    bmap: bmap::BlockMap,
    /// The file's length at open, grown by the blocks allocated since.
    file_end: u64,
}

impl State {
    /// Whether a data block starting at `start` may be written ([`MAX_DATA_GAP`]).
    fn within_reach(&self, start: u64) -> bool {
        within_reach(self.file_end, start)
    }
}

/// Whether a data block starting at `start` lies within [`MAX_DATA_GAP`] of `file_end`.
fn within_reach(file_end: u64, start: u64) -> bool {
    start <= file_end.saturating_add(MAX_DATA_GAP)
}

/// An open VDI image.
#[derive(Debug)]
pub struct Vdi {
    storage: Arc<dyn Storage>,
    kind: ImageType,
    writable: bool,
    size: u64,
    /// Differencing images: the parent file found by UUID.
    parent: Option<String>,
    state: Mutex<State>,
}

fn is_allocated(e: u32) -> bool {
    e < BMAP_ZERO
}

impl Vdi {
    fn err(&self, e: Error) -> crate::Error {
        crate::Error::Vdi {
            path: self.storage.path().to_owned(),
            source: e,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Opens a VDI image over a storage.
    ///
    /// # Errors
    /// The specific [`Error`] for a bad header or block map; I/O errors.
    pub fn open(storage: Arc<dyn Storage>, writable: bool) -> Result<Vdi> {
        let path = storage.path().to_owned();
        let verr = |e: Error| crate::Error::Vdi {
            path: path.clone(),
            source: e,
        };
        let file_len = storage.size().ctx(&path)?;
        let mut buf = [0u8; header::HEADER_LEN];
        if file_len < header::HEADER_LEN as u64 {
            return Err(verr(Error::Truncated(file_len)));
        }
        storage.read_at(&mut buf, 0).ctx(&path)?;
        let h = Header::parse(&buf).map_err(&verr)?;
        let kind = h.validate(file_len).map_err(&verr)?;
        // validate() has checked that the map lies within the file; it is read as needed.
        let bmap = bmap::BlockMap::new(h.blocks_in_image, u64::from(h.offset_bmap));
        let parent = if kind == ImageType::Diff {
            Some(find_parent(&path, &h.uuid_link, &h.uuid_parent).map_err(&verr)?)
        } else {
            None
        };
        Ok(Vdi {
            storage,
            kind,
            writable,
            // `VBoxManage convertfromraw` writes sizes that are not whole sectors; qemu rounds
            // them up, and so do we.
            size: h.disk_size.div_ceil(512) * 512,
            parent,
            state: Mutex::new(State {
                h,
                bmap,
                file_end: file_len,
            }),
        })
    }

    /// The decoded header.
    pub fn header(&self) -> Header {
        self.lock().h.clone()
    }

    fn host_of(h: &Header, entry: u32) -> u64 {
        u64::from(h.offset_data) + u64::from(entry) * BS
    }

    fn set_entry(&self, st: &mut State, block: u64, entry: u32) -> Result<()> {
        st.bmap.set(&self.storage, block, entry)
    }

    fn entry(&self, st: &mut State, block: u64) -> Result<Option<u32>> {
        st.bmap.get(&self.storage, block)
    }

    /// Where data block `idx` starts, once it is known to be within [`MAX_DATA_GAP`] of the end
    /// of the file; the file's known end then covers it.
    fn claim_block(&self, st: &mut State, idx: u32) -> Result<u64> {
        let start = Self::host_of(&st.h, idx);
        if !st.within_reach(start) {
            return Err(self.err(Error::DataPastEnd {
                block: idx,
                offset: start,
                file_len: st.file_end,
            }));
        }
        st.file_end = st.file_end.max(start + BS);
        Ok(start)
    }

    fn write_header(&self, h: &Header) -> Result<()> {
        self.storage
            .write_at(&h.to_bytes(), 0)
            .ctx(self.storage.path())
    }

    fn check_rw(&self) -> Result<()> {
        if self.writable {
            Ok(())
        } else {
            Err(crate::Error::ReadOnly {
                path: self.storage.path().to_owned(),
            })
        }
    }
}

/// Where a differencing image's parent is looked for: the child's directory, then the one above
/// it (`..` of it, so that a child named without a directory finds its parent too), each with
/// the prefix that names a file there relative to the child.
fn search_dirs(child: &Path) -> [(PathBuf, PathBuf); 2] {
    let dir = match child.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
        _ => PathBuf::from("."),
    };
    [
        (dir.clone(), PathBuf::new()),
        (dir.join(".."), PathBuf::from("..")),
    ]
}

/// Looks for the `.vdi` whose image UUID is `want` in the directory of `child` and its parent
/// directory (VirtualBox keeps differencing images in `Snapshots/` below the base). Copies of a
/// disk share its image UUID (a backup next to the original is common): when several files
/// match, the one whose modification UUID is the child's parent-modification UUID (`parent_mod`,
/// what the parent was when the child was made) is taken, and if that does not single one out
/// the open is refused rather than read through a guess.
fn find_parent(child: &Path, want: &Uuid, parent_mod: &Uuid) -> Result<String, Error> {
    let mut seen = 0usize;
    // Every file with the image UUID, with its modification UUID.
    let mut found: Vec<(String, Uuid)> = Vec::new();
    for (d, rel) in search_dirs(child) {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for ent in rd.flatten() {
            let p = ent.path();
            // Only regular files: opening a FIFO named like an image would wait forever.
            if p.extension().and_then(|e| e.to_str()) != Some("vdi")
                || !std::fs::metadata(&p).is_ok_and(|m| m.is_file())
            {
                continue;
            }
            seen += 1;
            if seen > MAX_PARENT_CANDIDATES {
                return Err(Error::ParentNotFound(want.to_string()));
            }
            let Ok(f) = std::fs::File::open(&p) else {
                continue;
            };
            let mut buf = [0u8; header::HEADER_LEN];
            if std::os::unix::fs::FileExt::read_exact_at(&f, &mut buf, 0).is_err() {
                continue;
            }
            if let Ok(h) = Header::parse(&buf) {
                if h.uuid_image == *want {
                    let name = rel.join(ent.file_name());
                    found.push((name.to_string_lossy().into_owned(), h.uuid_last_snap));
                }
            }
        }
    }
    if found.len() > 1 {
        found.retain(|(_, m)| m == parent_mod);
        if found.len() != 1 {
            return Err(Error::AmbiguousParent(want.to_string()));
        }
    }
    found
        .pop()
        .map(|(name, _)| name)
        .ok_or_else(|| Error::ParentNotFound(want.to_string()))
}

impl Driver for Vdi {
    fn format(&self) -> Format {
        Format::Vdi
    }

    fn virtual_size(&self) -> u64 {
        self.size
    }

    fn storage(&self, _file: usize) -> &Arc<dyn Storage> {
        &self.storage
    }

    fn cluster_size(&self) -> Option<u64> {
        Some(BS)
    }

    fn backing(&self) -> Option<BackingSpec> {
        self.parent.as_ref().map(|p| BackingSpec {
            filename: p.clone(),
            format: Some("vdi".into()),
        })
    }

    fn specific(&self) -> FormatSpecific {
        let st = self.lock();
        let h = &st.h;
        let opt = |u: &Uuid| (!u.is_nil()).then(|| u.to_string());
        FormatSpecific::Vdi(VdiSpecific {
            image_type: match self.kind {
                ImageType::Dynamic => "dynamic",
                ImageType::Static => "static",
                ImageType::Diff => "differencing",
            },
            uuid: h.uuid_image.to_string(),
            last_modification_uuid: opt(&h.uuid_last_snap),
            parent_uuid: opt(&h.uuid_link),
            parent_modification_uuid: opt(&h.uuid_parent),
        })
    }

    fn snapshot_view(&self, snap: &crate::SnapshotRef) -> Result<Box<dyn Driver>> {
        Err(crate::Error::NoSuchSnapshot {
            path: self.storage.path().to_owned(),
            name: snap.label().to_owned(),
        })
    }

    fn status_boundary(&self, offset: u64) -> Option<u64> {
        (offset / BS).checked_add(1)?.checked_mul(BS)
    }

    fn map(&self, offset: u64, len: u64) -> Result<(Mapping, u64)> {
        if offset >= self.size {
            return Ok((Mapping::Eof, len.max(1)));
        }
        let len = len.min(self.size - offset).max(1);
        let mut st = self.lock();
        let block = offset / BS;
        let Some(e) = self.entry(&mut st, block)? else {
            return Err(self.err(Error::BadBlockMapEntry {
                index: block,
                entry: BMAP_FREE,
            }));
        };
        let blocks_in_image = st.h.blocks_in_image;
        if is_allocated(e) && e >= blocks_in_image {
            return Err(self.err(Error::BadBlockMapEntry {
                index: block,
                entry: e,
            }));
        }
        // Blocks too far past the end of the file are read but not written in place: allocate()
        // refuses them.
        let (data, file_end) = (u64::from(st.h.offset_data), st.file_end);
        let in_reach = |entry: u64| within_reach(file_end, data + entry * BS);
        // Extend over following blocks of the same kind (and, for data, contiguous on disk).
        let end = offset + len;
        let mut b = block;
        let mut reach = (block + 1) * BS;
        while reach < end {
            b += 1;
            let Some(n) = self.entry(&mut st, b)? else {
                break;
            };
            let same = if is_allocated(e) {
                u64::from(n) == u64::from(e) + (b - block)
                    && n < blocks_in_image
                    && in_reach(u64::from(n)) == in_reach(u64::from(e))
            } else {
                n == e
            };
            if !same {
                break;
            }
            reach += BS;
        }
        let n = reach.min(end) - offset;
        let m = match e {
            // Only a differencing image reads free blocks from its parent; qemu's vdi reports
            // them as zeroes (present), which is what they read as without a parent.
            BMAP_FREE if self.parent.is_some() => Mapping::Unallocated,
            BMAP_FREE => Mapping::Zero { offset: None },
            BMAP_ZERO => Mapping::Zero { offset: None },
            _ => Mapping::Data {
                file: 0,
                offset: HostOffset(Self::host_of(&st.h, e) + offset % BS),
                writable: in_reach(u64::from(e)),
            },
        };
        Ok((m, n))
    }

    fn data_holes_read_as_zero(&self, _file: usize) -> bool {
        // Like qemu: a static image's blocks are all allocated up front, so holes in the file
        // are blocks never written.
        self.kind == ImageType::Static
    }

    fn read_compressed(&self, _c: &CompressedRef, _out: &mut [u8]) -> Result<()> {
        Err(self.unsupported("compressed data"))
    }

    fn cow_granularity(&self) -> u64 {
        BS
    }

    fn allocate(&self, offset: u64, len: u64) -> Result<Vec<HostExtent>> {
        self.check_rw()?;
        let mut st = self.lock();
        let mut out: Vec<HostExtent> = Vec::new();
        let end = offset.saturating_add(len);
        let mut pos = offset;
        while pos < end {
            let block = pos / BS;
            let bend = end.min((block + 1) * BS);
            let cur = self.entry(&mut st, block)?.unwrap_or(BMAP_FREE);
            let fresh = !is_allocated(cur);
            let idx = if fresh {
                if st.h.blocks_allocated >= st.h.blocks_in_image {
                    return Err(self.err(Error::Full));
                }
                st.h.blocks_allocated
            } else {
                cur
            };
            self.claim_block(&mut st, idx)?;
            if fresh {
                st.h.blocks_allocated += 1;
            }
            let host = Self::host_of(&st.h, idx) + pos % BS;
            match out.last_mut() {
                Some(l) if l.guest + l.len == pos && l.host.0 + l.len == host => {
                    l.len += bend - pos
                }
                _ => out.push(HostExtent {
                    guest: pos,
                    len: bend - pos,
                    file: 0,
                    host: HostOffset(host),
                }),
            }
            pos = bend;
        }
        Ok(out)
    }

    fn commit(&self, extents: &[HostExtent]) -> Result<()> {
        let mut st = self.lock();
        let mut changed = false;
        for e in extents {
            let mut pos = e.guest;
            let end = e.guest + e.len;
            while pos < end {
                let block = pos / BS;
                let host = e.host.0 + (pos - e.guest);
                let rel = (host - pos % BS).saturating_sub(u64::from(st.h.offset_data)) / BS;
                let idx = u32::try_from(rel).map_err(|_| self.err(Error::Full))?;
                if self.entry(&mut st, block)?.is_some_and(|cur| cur != idx) {
                    self.set_entry(&mut st, block, idx)?;
                    changed = true;
                }
                pos = ((block + 1) * BS).min(end);
            }
        }
        if changed {
            let h = st.h.clone();
            self.write_header(&h)?;
        }
        Ok(())
    }

    fn zero(&self, offset: u64, len: u64, _unmap: bool) -> Result<bool> {
        self.check_rw()?;
        let mut st = self.lock();
        let end = offset.saturating_add(len);
        let mut block = offset / BS;
        while block * BS < end {
            let Some(cur) = self.entry(&mut st, block)? else {
                break;
            };
            if is_allocated(cur) {
                // Freeing the data block would leave a hole that blocks_allocated still counts
                // (VDI has no free list); zero it in place instead.
                let host = self.claim_block(&mut st, cur)?;
                self.storage
                    .write_zeroes(host, BS, false)
                    .ctx(self.storage.path())?;
            } else if cur == BMAP_FREE && self.parent.is_some() {
                self.set_entry(&mut st, block, BMAP_ZERO)?;
            }
            block += 1;
        }
        Ok(true)
    }

    fn discard(&self, _offset: u64, _len: u64) -> Result<()> {
        // qemu's vdi has no discard either: the data stays.
        self.check_rw()
    }

    fn check(&self, repair: Repair) -> Result<CheckReport> {
        // qemu's vdi check only counts problems: asked to repair, it answers ENOTSUP.
        if repair != Repair::None {
            return Err(self.unsupported("checks"));
        }
        let mut guard = self.lock();
        let st = &mut *guard;
        let total = st.h.blocks_in_image;
        let mut r = CheckReport {
            total_clusters: u64::from(total),
            ..CheckReport::default()
        };
        // One bit per data block: whether an entry named it already (qemu keeps a u32 each).
        let mut used = vec![0u64; (total as usize).div_ceil(64)];
        let mut allocated = 0u32;
        let mut prev: Option<u32> = None;
        st.bmap.for_each(&self.storage, |block, e| {
            if !is_allocated(e) {
                return;
            }
            let bit = used
                .get_mut(e as usize / 64)
                .filter(|_| e < total)
                .map(|w| (w, 1u64 << (e % 64)));
            let Some((word, bit)) = bit else {
                r.messages
                    .push(format!("ERROR: block index {block} too large, is {e}"));
                r.corruptions += 1;
                return;
            };
            allocated += 1;
            if *word & bit != 0 {
                // qemu's words, which name the data block twice.
                r.messages
                    .push(format!("ERROR: block index {e} also used by {e}"));
                r.corruptions += 1;
            } else {
                *word |= bit;
            }
            if prev.is_some_and(|p| p.checked_add(1) != Some(e)) {
                r.fragmented_clusters += 1;
            }
            prev = Some(e);
        })?;
        let h = &st.h;
        if allocated != h.blocks_allocated {
            r.messages.push(format!(
                "ERROR: allocated blocks mismatch, is {allocated}, should be {}",
                h.blocks_allocated
            ));
            r.corruptions += 1;
        }
        r.allocated_clusters = u64::from(allocated);
        Ok(r)
    }

    fn flush(&self) -> Result<()> {
        self.storage.flush().ctx(self.storage.path())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{CreateOptions, Image, OpenOptions};

    #[test]
    fn parents_are_looked_for_beside_the_child_and_one_directory_up() {
        let dirs = |c: &str| search_dirs(Path::new(c)).map(|(d, r)| (d, r.display().to_string()));
        // A child named without a directory (opened from Snapshots/) still looks in `..`.
        assert_eq!(
            dirs("s.vdi"),
            [(".".into(), String::new()), ("./..".into(), "..".into())]
        );
        assert_eq!(
            dirs("VM/Snapshots/s.vdi"),
            [
                ("VM/Snapshots".into(), String::new()),
                ("VM/Snapshots/..".into(), "..".into())
            ]
        );
    }

    fn make(dir: &Path, size: u64, opts: &[(&str, &str)]) -> PathBuf {
        let p = dir.join("t.vdi");
        let mut o = CreateOptions::new(size);
        for (k, v) in opts {
            o.set(k, v);
        }
        create(&p, &o).unwrap();
        p
    }

    fn vdi_err(r: crate::Result<Image>) -> Error {
        match r {
            Err(crate::Error::Vdi { source, .. }) => source,
            other => panic!("expected a vdi error, got {other:?}"),
        }
    }

    #[test]
    fn write_then_read_returns_data_and_zeroes_elsewhere() {
        let dir = tempfile::tempdir().unwrap();
        let p = make(dir.path(), 5 << 20, &[]);
        let img = Image::open(&p, &OpenOptions::writable()).unwrap();
        img.write_at(&[7u8; 1000], (2 << 20) + 5).unwrap();
        let mut buf = vec![1u8; 3 << 20];
        img.read_at(&mut buf, 1 << 20).unwrap();
        assert!(buf[..(1 << 20) + 5].iter().all(|&b| b == 0));
        assert!(buf[(1 << 20) + 5..(1 << 20) + 1005].iter().all(|&b| b == 7));
        assert!(buf[(1 << 20) + 1005..].iter().all(|&b| b == 0));
        let r = img.check(Repair::None).unwrap();
        assert_eq!(r.corruptions, 0);
        assert_eq!(r.allocated_clusters, 1);
    }

    #[test]
    fn static_image_maps_every_block() {
        let dir = tempfile::tempdir().unwrap();
        let p = make(dir.path(), 3 << 20, &[("static", "on")]);
        let img = Image::open(&p, &OpenOptions::read_only()).unwrap();
        let h = match img.driver().specific() {
            FormatSpecific::Vdi(v) => v,
            _ => panic!(),
        };
        assert_eq!(h.image_type, "static");
        let (m, n) = img.driver().map(0, 3 << 20).unwrap();
        assert!(matches!(m, Mapping::Data { .. }));
        assert_eq!(n, 3 << 20);
    }

    fn patched(f: impl FnOnce(&mut Vec<u8>)) -> crate::Result<Image> {
        let dir = tempfile::tempdir().unwrap();
        let p = make(dir.path(), 3 << 20, &[]);
        let mut b = std::fs::read(&p).unwrap();
        f(&mut b);
        std::fs::write(&p, &b).unwrap();
        Image::open(&p, &OpenOptions::read_only())
    }

    #[test]
    fn open_truncated_file_is_truncated() {
        assert!(matches!(
            vdi_err(patched(|b| b.truncate(100))),
            Error::Truncated(100)
        ));
    }

    #[test]
    fn open_block_map_past_end_is_refused() {
        let e = vdi_err(patched(|b| {
            b[0x180..0x184].copy_from_slice(&1000u32.to_le_bytes());
            b[0x158..0x15c].copy_from_slice(&0x10_0000u32.to_le_bytes());
        }));
        assert!(matches!(e, Error::BlockMapOutOfRange { .. }));
    }

    #[test]
    fn map_entry_past_blocks_is_an_error_not_a_panic() {
        let img = patched(|b| b[0x200..0x204].copy_from_slice(&77u32.to_le_bytes())).unwrap();
        let mut buf = [0u8; 16];
        assert!(matches!(
            img.read_at(&mut buf, 0),
            Err(crate::Error::Vdi {
                source: Error::BadBlockMapEntry {
                    index: 0,
                    entry: 77
                },
                ..
            })
        ));
    }

    /// A 3 MiB image whose data area starts 976 MiB past its 1 KiB file; `allocated` makes block
    /// 0 already allocated there.
    fn far_data(dir: &Path, allocated: bool) -> PathBuf {
        let p = make(dir, 3 << 20, &[]);
        let mut b = std::fs::read(&p).unwrap();
        b[0x158..0x15c].copy_from_slice(&0x3d00_0400u32.to_le_bytes());
        if allocated {
            b[0x184..0x188].copy_from_slice(&1u32.to_le_bytes());
            b[0x200..0x204].copy_from_slice(&0u32.to_le_bytes());
        }
        std::fs::write(&p, &b).unwrap();
        p
    }

    #[test]
    fn write_block_far_past_eof_is_refused_and_reads_stay() {
        for allocated in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let p = far_data(dir.path(), allocated);
            let img = Image::open(&p, &OpenOptions::writable()).unwrap();
            let r = img.write_at(&[1; 512], 4096);
            assert!(
                matches!(
                    r,
                    Err(crate::Error::Vdi {
                        source: Error::DataPastEnd {
                            block: 0,
                            offset: 0x3d00_0400,
                            file_len: 1024
                        },
                        ..
                    })
                ),
                "allocated={allocated}: {r:?}"
            );
            if allocated {
                let r = img.write_zeroes(0, 1 << 20, false);
                assert!(
                    matches!(
                        r,
                        Err(crate::Error::Vdi {
                            source: Error::DataPastEnd { block: 0, .. },
                            ..
                        })
                    ),
                    "{r:?}"
                );
            }
            assert_eq!(std::fs::metadata(&p).unwrap().len(), 1024);
            // Reads still work (past the end of the file they are zeroes), as in qemu.
            let mut buf = [1u8; 512];
            img.read_at(&mut buf, 4096).unwrap();
            assert_eq!(buf, [0; 512]);
        }
    }

    #[test]
    fn check_finds_duplicate_and_count_mismatch() {
        let img = patched(|b| {
            b[0x200..0x204].copy_from_slice(&0u32.to_le_bytes());
            b[0x204..0x208].copy_from_slice(&0u32.to_le_bytes());
        })
        .unwrap();
        let r = img.check(Repair::None).unwrap();
        assert_eq!(r.corruptions, 2, "{:?}", r.messages);
    }
}
