//! Growing and shrinking qcow2 images.

use super::{Error, Qcow2, State, OFFSET_MASK};
use crate::driver::Driver;
use crate::error::IoContext;
use crate::raw::Preallocation;
use crate::Result;

impl Qcow2 {
    /// Changes the virtual size. Growing enlarges the L1 table when needed (a new table is
    /// written and switched in with one header write), preallocates and zeroes the new space,
    /// and only then writes the new size, as qemu does: an interruption or a full disk leaves
    /// the old size and at most leaked clusters. Shrinking frees every cluster past the new
    /// end. v2 images with snapshots cannot be resized, as in qemu. With `zero_new` (a backing
    /// file reaches past the old end) the new space is made to read as zeroes.
    ///
    /// # Errors
    /// When the image is read-only, a v2 image has snapshots, `zero_new` is asked of a v2 image
    /// (which has no zero clusters), or I/O fails.
    pub fn resize(&mut self, new_size: u64, prealloc: Preallocation, zero_new: bool) -> Result<()> {
        if !self.writable {
            return Err(crate::Error::ReadOnly {
                path: self.file().path().to_owned(),
            });
        }
        let g = self.geo;
        let old_size = self.size;
        {
            let st = self.lock();
            if st.h.nb_snapshots > 0 && st.h.version < 3 {
                return Err(crate::Error::Unsupported {
                    path: self.file().path().to_owned(),
                    what: "Can't resize a v2 image which has snapshots".into(),
                });
            }
        }
        // A raw data file stays valid on its own only if every cluster maps to the same offset
        // in it: like qemu, a grown disk gets its new clusters mapped (metadata preallocation).
        let raw_data = self.lock().h.autoclear & super::header::AUTOCLEAR_DATA_FILE_RAW != 0;
        let prealloc = if prealloc == Preallocation::Off && self.data != 0 && raw_data {
            Preallocation::Metadata
        } else {
            prealloc
        };
        if zero_new && g.version < 3 {
            return Err(crate::Error::Unsupported {
                path: self.file().path().to_owned(),
                what: "Failed to zero out new clusters: Operation not supported".into(),
            });
        }
        if new_size > i64::MAX as u64 {
            return Err(self.err(Error::SizeTooLarge(new_size)));
        }
        self.bitmaps_before_resize(new_size)?;
        if new_size < old_size {
            // Drop whole clusters past the new end, then L2 tables wholly past it.
            let from = g.align_up(new_size);
            if from < old_size {
                self.unmap_range(from, g.align_up(old_size) - from)?;
            }
            let mut st = self.lock();
            let keep = usize::try_from(new_size.div_ceil(g.l2_entries * g.cluster_size))
                .unwrap_or(usize::MAX);
            self.drop_l2_tables(&mut st, keep)?;
            self.file()
                .write_at(&new_size.to_be_bytes(), 24)
                .ctx(self.file().path())?;
            st.h.size = new_size;
        } else {
            let needed = new_size.div_ceil(g.l2_entries * g.cluster_size);
            if needed * 8 > super::MAX_L1_BYTES {
                return Err(self.err(Error::L1GrowTooLarge));
            }
            let mut st = self.lock();
            if needed > st.l1.len() as u64 {
                let mut l1 = st.l1.clone();
                l1.resize(usize::try_from(needed).unwrap_or(0), 0);
                let bytes: Vec<u8> = l1.iter().flat_map(|e| e.to_be_bytes()).collect();
                let clusters = (bytes.len() as u64).div_ceil(g.cluster_size);
                let off = self.alloc_clusters(&mut st, clusters)?;
                // Only the entries are written, as qemu writes them: the rest of the last
                // cluster is never read.
                self.file().write_at(&bytes, off).ctx(self.file().path())?;
                self.file().flush().ctx(self.file().path())?;
                let l1_size = u32::try_from(needed).map_err(|_| self.err(Error::L1GrowTooLarge))?;
                // The table alone (l1_size, l1_table_offset): the size follows once the new
                // space is ready.
                let mut hdr = [0u8; 12];
                hdr[..4].copy_from_slice(&l1_size.to_be_bytes());
                hdr[4..].copy_from_slice(&off.to_be_bytes());
                self.file().write_at(&hdr, 36).ctx(self.file().path())?;
                self.file().flush().ctx(self.file().path())?;
                let old_off = st.h.l1_table_offset;
                let old_clusters = (st.l1.len() as u64 * 8).div_ceil(g.cluster_size);
                st.l1 = l1;
                st.h.l1_size = l1_size;
                st.h.l1_table_offset = off;
                st.meta_invalidate();
                if old_off != 0 {
                    for i in 0..old_clusters {
                        self.update_refcount(&mut st, old_off + i * g.cluster_size, -1, false)?;
                    }
                }
            }
            drop(st);
            if self.data != 0 {
                // The external data file follows the disk's size, as qemu truncates it.
                let d = &self.files[self.data];
                d.set_len(new_size).ctx(d.path())?;
            }
            // falloc and full leave the new clusters reading as zeroes: with a backing file to
            // hide they count as allocated, as qemu marks them.
            let zeroed = matches!(prealloc, Preallocation::Falloc | Preallocation::Full);
            if new_size > old_size && prealloc != Preallocation::Off {
                let from = old_size / g.cluster_size * g.cluster_size;
                self.preallocate_range(
                    from,
                    g.align_up(new_size) - from,
                    prealloc,
                    zero_new && zeroed,
                )?;
            }
            if zero_new && !zeroed {
                // The head up to the first subcluster boundary is written by the caller.
                let from = old_size.div_ceil(g.subcluster_size) * g.subcluster_size;
                let to = g.align_up(new_size);
                if to > from {
                    self.zero_or_discard(from, to - from, false, false)?;
                }
            }
            // Everything the new space needs is on disk before the size that reaches it.
            self.flush()?;
            let mut st = self.lock();
            self.file()
                .write_at(&new_size.to_be_bytes(), 24)
                .ctx(self.file().path())?;
            st.h.size = new_size;
        }
        self.size = new_size;
        self.resize_bitmaps()?;
        if new_size < old_size && self.data != 0 {
            let d = &self.files[self.data];
            d.set_len(new_size).ctx(d.path())?;
        }
        self.flush()?;
        if new_size < old_size {
            self.truncate_to_last_cluster()?;
        }
        Ok(())
    }

    /// Cuts the file after its last cluster in use, as qemu does after shrinking or emptying an
    /// image; the caller has flushed the metadata, so nothing past that cluster is referenced.
    pub(super) fn truncate_to_last_cluster(&self) -> Result<()> {
        let f = self.file();
        if f.is_device() {
            // A device keeps its length.
            return Ok(());
        }
        let len = f.size().ctx(f.path())?;
        let cs = self.geo.cluster_size;
        let mut st = self.lock();
        let mut c = len.div_ceil(cs);
        while c > 0 && self.refcount(&mut st, c - 1)? == 0 {
            c -= 1;
        }
        if c * cs < len {
            f.set_len(c * cs).ctx(f.path())?;
            f.flush().ctx(f.path())?;
        }
        Ok(())
    }

    /// Makes whole clusters unallocated (their old mapping freed), whatever the version.
    /// Frees the L2 tables of the L1 entries from index `from` on, whatever they hold: each
    /// L1 entry is cleared on disk before its table's refcount drops, so an interruption can
    /// leak the table but never leave the L1 pointing at a free cluster.
    pub(super) fn drop_l2_tables(&self, st: &mut State, from: usize) -> Result<()> {
        let g = self.geo;
        self.batch_discards(st, |st| {
            for i in from..st.l1.len() {
                let l2 = st.l1[i] & OFFSET_MASK;
                if l2 != 0 {
                    st.l1[i] = 0;
                    st.meta_remove(l2 >> g.cluster_bits, super::overlap::Metadata::ActiveL2);
                    let off = st.h.l1_table_offset + i as u64 * 8;
                    self.file()
                        .write_at(&0u64.to_be_bytes(), off)
                        .ctx(self.file().path())?;
                    self.update_refcount(st, l2, -1, true)?;
                }
            }
            Ok(())
        })
    }

    pub(super) fn unmap_range(&self, offset: u64, len: u64) -> Result<()> {
        let mut st = self.lock();
        self.batch_discards(&mut st, |st| self.unmap_range_locked(st, offset, len))
    }

    fn unmap_range_locked(&self, st: &mut State, offset: u64, len: u64) -> Result<()> {
        let g = self.geo;
        let mut gc = offset >> g.cluster_bits;
        let end = (offset + len) >> g.cluster_bits;
        while gc < end {
            if let Some((old, _)) = self.lookup(st, gc)? {
                if old != super::l2::Entry::default() {
                    let l2off = self.l2_for_write(st, gc / g.l2_entries)?;
                    self.set_l2_entry(st, l2off, gc % g.l2_entries, super::l2::Entry::default())?;
                    self.release(st, &old, true)?;
                }
            } else {
                // No L2 table: skip to the next one.
                gc = (gc / g.l2_entries + 1) * g.l2_entries;
                continue;
            }
            gc += 1;
        }
        Ok(())
    }

    /// Allocates data clusters for a guest range; falloc and full also reserve or zero them.
    /// With extended L2 the subclusters stay unallocated (a backing file shows through, as in
    /// qemu) unless `mark` asks for them to count as allocated.
    pub(super) fn preallocate_range(
        &self,
        offset: u64,
        len: u64,
        mode: Preallocation,
        mark: bool,
    ) -> Result<()> {
        const STEP_CLUSTERS: u64 = 4096;
        let g = self.geo;
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let n = (STEP_CLUSTERS * g.cluster_size).min(end - pos);
            // Allocated (counted), then made to exist in the file, then linked: an
            // interruption or a full disk leaks clusters but never leaves an entry pointing at
            // data that is not there.
            let extents = self.allocate(pos, n)?;
            for e in &extents {
                let s = self.storage(e.file);
                match mode {
                    Preallocation::Falloc => s.allocate(e.host.0, e.len).ctx(s.path())?,
                    Preallocation::Full => {
                        crate::storage::write_zero_buffers(s.as_ref(), e.host.0, e.len)
                            .ctx(s.path())?
                    }
                    _ => {}
                }
            }
            // Metadata preallocation leaves data unwritten: size the file to hold every
            // cluster.
            let last = self.lock().end_hint * g.cluster_size;
            let file = self.file();
            if file.size().ctx(file.path())? < last {
                file.set_len(last).ctx(file.path())?;
            }
            self.link_extents(&extents, mark)?;
            pos += n;
        }
        Ok(())
    }
}
