//! Creating, applying and deleting internal snapshots.
//!
//! Each operation writes new structures first, switches the header with one write, and frees
//! what the old state used last, so that a crash leaves at most leaked clusters.

use super::snapshot::{self, Snapshot};
use super::{be64_at, Error, Qcow2, State, COMPRESSED, COPIED, OFFSET_MASK};
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
        snaps
            .iter()
            .position(|s| s.id == name)
            .or_else(|| snaps.iter().position(|s| s.name == name))
            .ok_or_else(|| crate::Error::NoSuchSnapshot {
                path: self.file().path().to_owned(),
                name: name.to_owned(),
            })
    }

    /// Adds `delta` to the refcount of every L2 table and data cluster an L1 table reaches.
    fn update_tree_refcount(&self, st: &mut State, l1: &[u64], delta: i64) -> Result<()> {
        let g = self.geo;
        for &e in l1 {
            let l2off = e & OFFSET_MASK;
            if l2off == 0 {
                continue;
            }
            let table = self.load_l2_copy(st, l2off)?;
            for j in 0..g.l2_entries {
                let o = usize::try_from(j * g.l2_entry_size).unwrap_or(0);
                let word = be64_at(&table, o);
                let bitmap = if g.extended_l2 {
                    be64_at(&table, o + 8)
                } else {
                    0
                };
                let entry = super::l2::Entry::decode(word, bitmap, self.data != 0);
                if word & COMPRESSED != 0 {
                    let (host, len) = entry.compressed(&g);
                    let mut c = host & !(g.cluster_size - 1);
                    while c < host + len.max(1) {
                        self.update_refcount(st, c, delta, true)?;
                        c += g.cluster_size;
                    }
                } else if let Some(h) = entry.host() {
                    if self.data == 0 {
                        self.update_refcount(st, h, delta, true)?;
                    }
                }
            }
            self.update_refcount(st, l2off, delta, true)?;
        }
        Ok(())
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
        let old_len: u64 = snapshot::read_table(self.file(), &st.h)
            .map_err(|e| self.err(e))?
            .iter()
            .map(|s| s.to_bytes().len() as u64)
            .sum();
        let n =
            u32::try_from(snaps.len()).map_err(|_| self.err(Error::TooManySnapshots(u32::MAX)))?;
        let mut hdr = [0u8; 12];
        hdr[..4].copy_from_slice(&n.to_be_bytes());
        hdr[4..].copy_from_slice(&new_off.to_be_bytes());
        self.file().write_at(&hdr, 60).ctx(self.file().path())?;
        self.file().flush().ctx(self.file().path())?;
        st.h.nb_snapshots = n;
        st.h.snapshots_offset = new_off;
        if old_off != 0 && old_len > 0 {
            for i in 0..old_len.div_ceil(g.cluster_size) {
                self.update_refcount(st, old_off + i * g.cluster_size, -1, true)?;
            }
        }
        Ok(())
    }

    /// Creates an internal snapshot of the current state.
    ///
    /// # Errors
    /// When the name is taken, the image is read-only, or I/O fails.
    pub fn create_snapshot(&self, name: &str, date: (u32, u32)) -> Result<()> {
        self.check_writable()?;
        let mut snaps = self.snapshot_list()?;
        if snaps.iter().any(|s| s.name == name) {
            return Err(crate::Error::InvalidOption(format!(
                "Snapshot '{name}' already exists"
            )));
        }
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
        // Copy the active L1 table.
        let l1_bytes: Vec<u8> = st.l1.iter().flat_map(|e| e.to_be_bytes()).collect();
        let l1_off = if l1_bytes.is_empty() {
            0
        } else {
            let off =
                self.alloc_clusters(&mut st, (l1_bytes.len() as u64).div_ceil(g.cluster_size))?;
            self.file()
                .write_at(&l1_bytes, off)
                .ctx(self.file().path())?;
            off
        };
        let l1 = st.l1.clone();
        self.update_tree_refcount(&mut st, &l1, 1)?;
        self.fix_copied_flags(&mut st)?;
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
        });
        self.replace_snapshot_table(&mut st, &snaps)?;
        drop(st);
        self.flush_files()
    }

    /// Reverts the active state to a snapshot.
    ///
    /// # Errors
    /// When there is no such snapshot, its size differs, or I/O fails.
    pub fn apply_snapshot(&self, name: &str) -> Result<()> {
        self.check_writable()?;
        let snaps = self.snapshot_list()?;
        let sn = snaps[self.find_snapshot(&snaps, name)?].clone();
        if sn.disk_size.is_some_and(|s| s != self.size) {
            return Err(crate::Error::Unsupported {
                path: self.file().path().to_owned(),
                what: "applying a snapshot taken at a different disk size".into(),
            });
        }
        let g = self.geo;
        if u64::from(sn.l1_size) * 8 > super::MAX_L1_BYTES || sn.l1_offset % g.cluster_size != 0 {
            return Err(self.err(Error::BadSnapshotTable("snapshot L1 table is invalid")));
        }
        let mut st = self.lock();
        let mut new_l1 = super::read_table(self.file(), sn.l1_offset, u64::from(sn.l1_size))
            .ctx(self.file().path())?;
        new_l1.resize(st.l1.len().max(new_l1.len()), 0);
        self.update_tree_refcount(&mut st, &new_l1, 1)?;
        // A fresh active L1 table, switched in with one header write.
        let bytes: Vec<u8> = new_l1.iter().flat_map(|e| e.to_be_bytes()).collect();
        let clusters = (bytes.len() as u64).div_ceil(g.cluster_size);
        let off = self.alloc_clusters(&mut st, clusters)?;
        self.file().write_at(&bytes, off).ctx(self.file().path())?;
        self.file().flush().ctx(self.file().path())?;
        let l1_size =
            u32::try_from(new_l1.len()).map_err(|_| self.err(Error::L1TooLarge(u32::MAX)))?;
        let mut hdr = [0u8; 12];
        hdr[..4].copy_from_slice(&l1_size.to_be_bytes());
        hdr[4..].copy_from_slice(&off.to_be_bytes());
        self.file().write_at(&hdr, 36).ctx(self.file().path())?;
        self.file().flush().ctx(self.file().path())?;
        let old_l1 = std::mem::replace(&mut st.l1, new_l1);
        let old_off = st.h.l1_table_offset;
        let old_clusters = (old_l1.len() as u64 * 8).div_ceil(g.cluster_size);
        st.h.l1_table_offset = off;
        st.h.l1_size = l1_size;
        self.update_tree_refcount(&mut st, &old_l1, -1)?;
        for i in 0..old_clusters {
            self.update_refcount(&mut st, old_off + i * g.cluster_size, -1, true)?;
        }
        self.fix_copied_flags(&mut st)?;
        drop(st);
        self.flush_files()
    }

    /// Deletes a snapshot and frees what only it used.
    ///
    /// # Errors
    /// When there is no such snapshot, or I/O fails.
    pub fn delete_snapshot(&self, name: &str) -> Result<()> {
        self.check_writable()?;
        let mut snaps = self.snapshot_list()?;
        let sn = snaps.remove(self.find_snapshot(&snaps, name)?);
        let g = self.geo;
        let mut st = self.lock();
        self.replace_snapshot_table(&mut st, &snaps)?;
        if u64::from(sn.l1_size) * 8 <= super::MAX_L1_BYTES
            && sn.l1_offset % g.cluster_size == 0
            && sn.l1_offset != 0
        {
            let l1 = super::read_table(self.file(), sn.l1_offset, u64::from(sn.l1_size))
                .ctx(self.file().path())?;
            self.update_tree_refcount(&mut st, &l1, -1)?;
            for i in 0..(u64::from(sn.l1_size) * 8).div_ceil(g.cluster_size) {
                self.update_refcount(&mut st, sn.l1_offset + i * g.cluster_size, -1, true)?;
            }
        }
        self.fix_copied_flags(&mut st)?;
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
