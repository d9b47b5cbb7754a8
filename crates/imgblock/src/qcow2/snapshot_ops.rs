//! Creating, applying and deleting internal snapshots.
//!
//! Each operation builds the new state beside the old one and switches to it with one header
//! write (see [`Qcow2::switch_state`]), so that a crash at any point leaves either state, with at
//! most leaked clusters.

use super::check::{count_view, View};
use super::snapshot::{self, Snapshot};
use super::{be64_at, Error, Qcow2, State, COPIED, OFFSET_MASK};
use crate::error::IoContext;
use crate::Result;

impl Qcow2 {
    fn check_writable(&self) -> Result<()> {
        if self.writable {
            Ok(())
        } else {
            Err(crate::Error::ReadOnly {
                path: self.file().path().to_owned(),
            })
        }
    }

    fn find_snapshot(&self, snaps: &[Snapshot], name: &str) -> Result<usize> {
        crate::SnapshotRef::from(name)
            .position(snaps, |s| (&s.id, &s.name))
            .ok_or_else(|| crate::Error::NoSuchSnapshot {
                path: self.file().path().to_owned(),
                name: name.to_owned(),
            })
    }

    fn load_l2_copy(&self, st: &mut State, l2off: u64) -> Result<Vec<u8>> {
        if l2off % self.geo.cluster_size != 0 {
            return Err(self.err(Error::Misaligned {
                what: "L2 table",
                offset: l2off,
            }));
        }
        if let Some(t) = st.l2_cache.get(l2off) {
            return Ok(t.clone());
        }
        let mut t = vec![0u8; usize::try_from(self.geo.cluster_size).unwrap_or(0)];
        self.file().read_at(&mut t, l2off).ctx(self.file().path())?;
        Ok(t)
    }

    /// Sets the COPIED flags of the active L1 table and its L2 tables from the refcounts.
    pub(super) fn fix_copied_flags(&self, st: &mut State) -> Result<()> {
        let g = self.geo;
        let mut l1_changed = false;
        for i in 0..st.l1.len() {
            let e = st.l1[i];
            let l2off = e & OFFSET_MASK;
            if l2off == 0 {
                continue;
            }
            let rc = self.refcount(st, l2off >> g.cluster_bits)?;
            let want = if rc == 1 { e | COPIED } else { e & !COPIED };
            if want != e {
                st.l1[i] = want;
                l1_changed = true;
            }
            for j in 0..g.l2_entries {
                let entry = self.l2_entry(st, l2off, j)?;
                let Some(h) = entry.host() else { continue };
                let rc = if self.data == 0 {
                    self.refcount(st, h >> g.cluster_bits)?
                } else {
                    1
                };
                let word = if rc == 1 {
                    entry.word | COPIED
                } else {
                    entry.word & !COPIED
                };
                if word != entry.word {
                    self.set_l2_entry(
                        st,
                        l2off,
                        j,
                        super::l2::Entry {
                            word,
                            bitmap: entry.bitmap,
                        },
                    )?;
                }
            }
        }
        if l1_changed {
            self.write_l1(st)?;
        }
        Ok(())
    }

    fn write_l1(&self, st: &State) -> Result<()> {
        let bytes: Vec<u8> = st.l1.iter().flat_map(|e| e.to_be_bytes()).collect();
        self.file()
            .write_at(&bytes, st.h.l1_table_offset)
            .ctx(self.file().path())
    }

    /// Writes a new snapshot table, points the header at it, frees the old one.
    pub(super) fn replace_snapshot_table(&self, st: &mut State, snaps: &[Snapshot]) -> Result<()> {
        let g = self.geo;
        let bytes: Vec<u8> = snaps.iter().flat_map(Snapshot::to_bytes).collect();
        let new_off = if bytes.is_empty() {
            0
        } else {
            let off = self.alloc_clusters(st, (bytes.len() as u64).div_ceil(g.cluster_size))?;
            self.file().write_at(&bytes, off).ctx(self.file().path())?;
            off
        };
        self.file().flush().ctx(self.file().path())?;
        let old_off = st.h.snapshots_offset;
        // The old table's length as it lies on disk, which may differ from what its entries
        // take once serialised (extra data of another size).
        let old_len = snapshot::table_len(
            &snapshot::read_table(self.file(), &st.h).map_err(|e| self.err(e))?,
        );
        let n =
            u32::try_from(snaps.len()).map_err(|_| self.err(Error::TooManySnapshots(u32::MAX)))?;
        let mut hdr = [0u8; 12];
        hdr[..4].copy_from_slice(&n.to_be_bytes());
        hdr[4..].copy_from_slice(&new_off.to_be_bytes());
        self.file().write_at(&hdr, 60).ctx(self.file().path())?;
        self.file().flush().ctx(self.file().path())?;
        st.h.nb_snapshots = n;
        st.h.snapshots_offset = new_off;
        st.meta_invalidate();
        if old_off != 0 && old_len > 0 {
            for i in 0..old_len.div_ceil(g.cluster_size) {
                self.update_refcount(st, old_off + i * g.cluster_size, -1, true)?;
            }
        }
        Ok(())
    }

    /// Makes `active` (L1 entries whose L2 tables are on disk) and `snaps` the image's state
    /// with one header write. Everything the new state needs is written first, apart from the
    /// live structures: active L2 tables that are shared or whose COPIED flags must change are
    /// copied, and the L1 table, the snapshot table and whole refcount structures counted from
    /// the new state are written fresh. A crash before the header write leaves the old state
    /// with leaked clusters at most; after it, the new state is complete. What only the old
    /// state used is free space in the new refcounts.
    fn switch_state(&self, st: &mut State, active: Vec<u64>, snaps: &[Snapshot]) -> Result<()> {
        let g = self.geo;
        let cs = g.cluster_size;
        let path = self.file().path().to_owned();
        let count_at = |counts: &[u32], off: u64| -> u32 {
            counts
                .get(usize::try_from(off / cs).unwrap_or(usize::MAX))
                .copied()
                .unwrap_or(0)
        };
        // Data references of the new state decide the COPIED flags.
        let (pre, report) = count_view(
            self,
            st,
            &View {
                l1_offset: 0,
                l1: &active,
                snapshots_offset: 0,
                snapshots: snaps,
                placed: false,
            },
            false,
        )?;
        if report.corruptions > 0 {
            return Err(self.err(Error::DirtyInconsistent));
        }
        // A cluster the new state shares more often than a refcount can count (a snapshot of
        // clusters that other snapshots share already; with 1-bit refcounts, of any cluster) is
        // refused before anything is written, as qemu refuses it.
        if let Some(c) = pre.iter().position(|&v| u64::from(v) > self.max_refcount()) {
            return Err(self.err(Error::RefcountOverflow(c as u64 * cs)));
        }
        let esize = usize::try_from(g.l2_entry_size).unwrap_or(8);
        let mut new_l1 = Vec::with_capacity(active.len());
        for &e in &active {
            let t = e & OFFSET_MASK;
            if t == 0 {
                new_l1.push(0);
                continue;
            }
            let mut table = self.load_l2_copy(st, t)?;
            let mut changed = false;
            for o in (0..table.len()).step_by(esize) {
                let word = be64_at(&table, o);
                let bitmap = if g.extended_l2 {
                    be64_at(&table, o + 8)
                } else {
                    0
                };
                let entry = super::l2::Entry::decode(word, bitmap, self.data != 0);
                let Some(h) = entry.host() else { continue };
                let rc = if self.data != 0 { 1 } else { count_at(&pre, h) };
                let want = if rc == 1 {
                    word | COPIED
                } else {
                    word & !COPIED
                };
                if want != word {
                    table[o..o + 8].copy_from_slice(&want.to_be_bytes());
                    changed = true;
                }
            }
            if changed || count_at(&pre, t) > 1 {
                let copy = self.alloc_clusters(st, 1)?;
                self.file().write_at(&table, copy).ctx(&path)?;
                new_l1.push(copy);
            } else {
                new_l1.push(t);
            }
        }
        // The L1 and snapshot tables get their places now, so that the count sees them.
        let l1_bytes_len = new_l1.len() as u64 * 8;
        let l1_off = if new_l1.is_empty() {
            0
        } else {
            let n = l1_bytes_len.div_ceil(cs);
            let off = self.alloc_clusters(st, n)?;
            crate::storage::write_zero_buffers(self.file(), off, n * cs).ctx(&path)?;
            off
        };
        let fresh_snaps: Vec<Snapshot> = snaps
            .iter()
            .cloned()
            .map(|mut s| {
                s.disk_len = 0;
                s
            })
            .collect();
        let table: Vec<u8> = fresh_snaps.iter().flat_map(Snapshot::to_bytes).collect();
        let snap_off = if table.is_empty() {
            0
        } else {
            let off = self.alloc_clusters(st, (table.len() as u64).div_ceil(cs))?;
            self.file().write_at(&table, off).ctx(&path)?;
            off
        };
        let view = View {
            l1_offset: l1_off,
            l1: &new_l1,
            snapshots_offset: snap_off,
            snapshots: &fresh_snaps,
            placed: true,
        };
        let (counts, report) = count_view(self, st, &view, false)?;
        if report.corruptions > 0 {
            return Err(self.err(Error::DirtyInconsistent));
        }
        for e in &mut new_l1 {
            if *e != 0 && count_at(&counts, *e) == 1 {
                *e |= COPIED;
            }
        }
        let bytes: Vec<u8> = new_l1.iter().flat_map(|e| e.to_be_bytes()).collect();
        if l1_off != 0 {
            self.file().write_at(&bytes, l1_off).ctx(&path)?;
        }
        let fresh = self.write_refcounts(st, &counts, g.refcount_order)?;
        // The switch: L1 size and offset, refcount table, snapshot count and offset (36..72).
        let l1_size =
            u32::try_from(new_l1.len()).map_err(|_| self.err(Error::L1TooLarge(u32::MAX)))?;
        let nb =
            u32::try_from(snaps.len()).map_err(|_| self.err(Error::TooManySnapshots(u32::MAX)))?;
        let mut hdr = Vec::with_capacity(36);
        hdr.extend_from_slice(&l1_size.to_be_bytes());
        hdr.extend_from_slice(&l1_off.to_be_bytes());
        hdr.extend_from_slice(&fresh.table_offset.to_be_bytes());
        hdr.extend_from_slice(&fresh.table_clusters.to_be_bytes());
        hdr.extend_from_slice(&nb.to_be_bytes());
        hdr.extend_from_slice(&snap_off.to_be_bytes());
        self.file().write_at(&hdr, 36).ctx(&path)?;
        self.file().flush().ctx(&path)?;
        st.h.l1_size = l1_size;
        st.h.l1_table_offset = l1_off;
        st.h.refcount_table_offset = fresh.table_offset;
        st.h.refcount_table_clusters = fresh.table_clusters;
        st.h.nb_snapshots = nb;
        st.h.snapshots_offset = snap_off;
        st.l1 = new_l1;
        fresh.install(st);
        // Freed clusters may be reused for anything now: cached tables must not outlive them.
        st.l2_cache = super::cache::TableCache::new(super::L2_CACHE_BYTES);
        self.discard_free_clusters(st)
    }

    /// Gives the host back the space of every cluster the refcounts now call free (what only
    /// the old state used), as qemu discards the clusters a snapshot operation frees. Read from
    /// the installed refcounts, so nothing in use is ever discarded.
    pub(super) fn discard_free_clusters(&self, st: &mut State) -> Result<()> {
        let cs = self.geo.cluster_size;
        let end = self.file().size().ctx(self.file().path())?.div_ceil(cs);
        let mut run: Option<(u64, u64)> = None;
        for c in 0..end {
            if self.refcount(st, c)? == 0 {
                run = match run {
                    Some((start, n)) => Some((start, n + 1)),
                    None => Some((c, 1)),
                };
            } else if let Some((start, n)) = run.take() {
                let _ = self.file().discard(start * cs, n * cs);
            }
        }
        if let Some((start, n)) = run {
            let _ = self.file().discard(start * cs, n * cs);
        }
        Ok(())
    }

    /// Creates an internal snapshot of the current state.
    ///
    /// # Errors
    /// When the image is read-only, has an external data file (whose data no snapshot can keep),
    /// has too many snapshots, a cluster would be shared more often than its refcount can count
    /// ([`Error::RefcountOverflow`]; the image is left as it was), or I/O fails.
    pub fn create_snapshot(&self, name: &str, date: (u32, u32)) -> Result<()> {
        self.check_writable()?;
        if self.data != 0 {
            // A snapshot cannot keep the guest data: it lives in the data file, written in place.
            return Err(crate::Error::Unsupported {
                path: self.file().path().to_owned(),
                what: "Operation not supported".into(),
            });
        }
        let mut snaps = self.snapshot_list()?;
        // Like qemu, names need not be unique: IDs are.
        if snaps.len() as u64 >= u64::from(snapshot::MAX_SNAPSHOTS) {
            return Err(self.err(Error::TooManySnapshots(snapshot::MAX_SNAPSHOTS)));
        }
        let id = snaps
            .iter()
            .filter_map(|s| s.id.parse::<u64>().ok())
            .max()
            .unwrap_or(0)
            + 1;
        let g = self.geo;
        let mut st = self.lock();
        // The snapshot keeps the current L2 tables; the active state gets copies.
        let l1_bytes: Vec<u8> = st.l1.iter().flat_map(|e| e.to_be_bytes()).collect();
        let l1_clusters = (l1_bytes.len() as u64).div_ceil(g.cluster_size);
        let l1_off = if l1_bytes.is_empty() {
            0
        } else {
            let off = self.alloc_clusters(&mut st, l1_clusters)?;
            self.file()
                .write_at(&l1_bytes, off)
                .ctx(self.file().path())?;
            off
        };
        snaps.push(Snapshot {
            l1_offset: l1_off,
            l1_size: st.h.l1_size,
            id: id.to_string(),
            name: name.to_owned(),
            date_sec: date.0,
            date_nsec: date.1,
            vm_clock_nsec: 0,
            vm_state_size: 0,
            disk_size: Some(self.size),
            icount: Some(0),
            disk_len: 0,
            incomplete: false,
        });
        let active = st.l1.clone();
        let r = self.switch_state(&mut st, active, &snaps);
        if let Err(crate::Error::Qcow2 {
            source: Error::RefcountOverflow(_),
            ..
        }) = &r
        {
            // Refused before anything was written: nothing points at the L1 copy, whose
            // clusters go back rather than leak.
            for i in 0..l1_clusters {
                self.update_refcount(&mut st, l1_off + i * g.cluster_size, -1, false)?;
            }
        }
        r?;
        drop(st);
        self.flush_files()
    }

    /// Reverts the active state to a snapshot, the disk size included.
    ///
    /// # Errors
    /// When there is no such snapshot, the image has an external data file, the snapshot's L1
    /// table is invalid, or I/O fails.
    pub fn apply_snapshot(&mut self, name: &str) -> Result<()> {
        self.check_writable()?;
        if self.lock().bitmaps.is_some() {
            // qemu refuses: the bitmaps could not describe the jump back in time.
            return Err(self.err(Error::ActiveBitmaps));
        }
        if self.data != 0 {
            return Err(crate::Error::Unsupported {
                path: self.file().path().to_owned(),
                what: "Failed to load snapshot: Operation not supported".into(),
            });
        }
        let snaps = self.snapshot_list()?;
        let sn = snaps[self.find_snapshot(&snaps, name)?].clone();
        let g = self.geo;
        if u64::from(sn.l1_size) * 8 > super::MAX_L1_BYTES || sn.l1_offset % g.cluster_size != 0 {
            return Err(self.err(Error::BadSnapshotTable("snapshot L1 table is invalid")));
        }
        // A snapshot taken at another disk size brings its size back, as qemu's revert does.
        let new_size = sn.disk_size.unwrap_or(self.size);
        if new_size > i64::MAX as u64
            || new_size.div_ceil(g.l2_entries * g.cluster_size)
                > u64::from(sn.l1_size).max(self.lock().l1.len() as u64)
        {
            return Err(self.err(Error::BadSnapshotTable(
                "snapshot L1 table is too small for its disk size",
            )));
        }
        let mut st = self.lock();
        let mut active = super::read_table(self.file(), sn.l1_offset, u64::from(sn.l1_size))
            .ctx(self.file().path())?;
        active.resize(st.l1.len().max(active.len()), 0);
        self.switch_state(&mut st, active, &snaps)?;
        if new_size != st.h.size {
            // After the switch, so that the L1 table on disk always covers the size.
            self.file()
                .write_at(&new_size.to_be_bytes(), 24)
                .ctx(self.file().path())?;
            st.h.size = new_size;
        }
        drop(st);
        self.size = new_size;
        self.flush_files()
    }

    /// Deletes a snapshot; what only it used becomes free space.
    ///
    /// # Errors
    /// When there is no such snapshot, or I/O fails.
    pub fn delete_snapshot(&self, name: &str) -> Result<()> {
        self.check_writable()?;
        let mut snaps = self.snapshot_list()?;
        snaps.remove(self.find_snapshot(&snaps, name)?);
        let mut st = self.lock();
        let active = st.l1.clone();
        self.switch_state(&mut st, active, &snaps)?;
        drop(st);
        self.flush_files()
    }

    fn flush_files(&self) -> Result<()> {
        for f in &self.files {
            f.flush().ctx(f.path())?;
        }
        Ok(())
    }
}
