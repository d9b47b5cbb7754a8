//! Whole new refcount structures, counted from a state's metadata: written past the end of the
//! file for operations that must switch to a new state in one header write (refcount width
//! changes, snapshot creation, application and deletion), or placed first fit in free clusters
//! when `check -r all` finds the structures themselves broken.

use super::overlap::Metadata;
use super::refcount::set_entry;
use super::{Error, Qcow2, State};
use crate::error::IoContext;
use crate::Result;

/// Refcount structures written but not yet pointed at by the header.
pub(super) struct FreshRefcounts {
    pub table_offset: u64,
    pub table_clusters: u32,
    reftable: Vec<u64>,
    end: u64,
}

impl FreshRefcounts {
    /// Makes the in-memory state follow the new structures, once the header points at them.
    pub fn install(self, st: &mut State) {
        st.reftable = self.reftable;
        st.rb_cache = super::cache::TableCache::new(super::REFBLOCK_CACHE_BYTES);
        st.free_hint = 0;
        st.end_hint = st.end_hint.max(self.end);
        st.compressed_cursor = 0;
        st.meta_invalidate();
    }
}

impl Qcow2 {
    /// Writes a refcount table and blocks of width `1 << order` holding `computed` (one count per
    /// cluster of the file) plus the structures themselves, placed past everything in use.
    ///
    /// # Errors
    /// When a count does not fit the width, or I/O fails.
    pub(super) fn write_refcounts(
        &self,
        st: &mut State,
        computed: &[u32],
        order: u32,
    ) -> Result<FreshRefcounts> {
        let cs = self.geo.cluster_size;
        let max = if order == 6 {
            u64::MAX
        } else {
            (1u64 << (1u64 << order)) - 1
        };
        if let Some(c) = computed.iter().position(|&v| u64::from(v) > max) {
            return Err(crate::Error::InvalidOption(format!(
                "Cannot decrease refcount entry width to {} bits: Cluster at offset {:#x} has a refcount of {}",
                1u64 << order,
                c as u64 * cs,
                computed[c]
            )));
        }
        let per_block = (cs * 8) >> order;
        let start = (computed.len() as u64).max(st.end_hint);
        let (mut blocks, mut table) = (0u64, 0u64);
        loop {
            let total = start + blocks + table;
            let b = total.div_ceil(per_block);
            let t = (b * 8).div_ceil(cs);
            if b == blocks && t == table {
                break;
            }
            blocks = b;
            table = t;
        }
        if table * cs > super::MAX_REFTABLE_BYTES {
            return Err(self.err(Error::FileTooLarge));
        }
        self.check_overlap(st, start, table + blocks, &[])?;
        let table_offset = start * cs;
        let blocks_off = table_offset + table * cs;
        let end = start + table + blocks;
        let path = self.file().path().to_owned();
        let mut reftable = Vec::with_capacity(usize::try_from(table * cs / 8).unwrap_or(0));
        let csu = usize::try_from(cs).unwrap_or(0);
        for b in 0..blocks {
            let mut block = vec![0u8; csu];
            for i in 0..per_block {
                let c = b * per_block + i;
                let v = match computed.get(usize::try_from(c).unwrap_or(usize::MAX)) {
                    Some(&v) => u64::from(v),
                    None => u64::from(c >= start && c < end),
                };
                if v != 0 {
                    set_entry(&mut block, order, i, v);
                }
            }
            let off = blocks_off + b * cs;
            self.file().write_at(&block, off).ctx(&path)?;
            reftable.push(off);
        }
        reftable.resize(usize::try_from(table * cs / 8).unwrap_or(0), 0);
        let bytes: Vec<u8> = reftable.iter().flat_map(|e| e.to_be_bytes()).collect();
        self.file().write_at(&bytes, table_offset).ctx(&path)?;
        self.file().flush().ctx(&path)?;
        Ok(FreshRefcounts {
            table_offset,
            table_clusters: u32::try_from(table).map_err(|_| self.err(Error::FileTooLarge))?,
            reftable,
            end,
        })
    }
}

/// Finds `n` clusters that `computed` counts as free, first fit from `*from` (which moves to the
/// first gap found), growing `computed` past its end when it has no such run, and counts them.
fn alloc_first_fit(q: &Qcow2, computed: &mut Vec<u32>, from: &mut u64, n: u64) -> Result<u64> {
    let len = computed.len() as u64;
    let mut c = *from;
    let mut run = 0;
    let mut first_gap = true;
    while c < len && run < n {
        if computed[usize::try_from(c).unwrap_or(usize::MAX)] == 0 {
            run += 1;
            if first_gap {
                *from = c;
                first_gap = false;
            }
        } else {
            run = 0;
        }
        c += 1;
    }
    // A run cut short by the end goes on past it.
    let start = c - run;
    let end = start + n;
    if end > super::check::MAX_TRACKED_CLUSTERS {
        return Err(q.err(Error::FileTooLarge));
    }
    if end > len {
        computed.resize(usize::try_from(end).unwrap_or(0), 0);
    }
    for v in &mut computed[usize::try_from(start).unwrap_or(0)..usize::try_from(end).unwrap_or(0)] {
        *v = 1;
    }
    Ok(start)
}

impl Qcow2 {
    /// Replaces the refcount structures with new ones holding `computed` (one count per cluster
    /// of the file), placed first fit in clusters `computed` counts as free, as qemu's check
    /// places them; `computed` counts the clusters they take. The old structures stay as they
    /// are: the new counts still have them in use, for a leak repair to free.
    ///
    /// # Errors
    /// When a count does not fit the refcount width, a new structure would land on metadata,
    /// or I/O fails.
    pub(super) fn rebuild_refcount_structure(
        &self,
        st: &mut State,
        computed: &mut Vec<u32>,
    ) -> Result<()> {
        let g = self.geo;
        let cs = g.cluster_size;
        if let Some(c) = computed
            .iter()
            .position(|&v| u64::from(v) > self.max_refcount())
        {
            return Err(self.err(Error::RefcountOverflow(c as u64 * cs)));
        }
        // Blocks first, then a place for the table, whose blocks must then be written again;
        // a table that had to grow needs a new place.
        let mut table = Vec::new();
        let mut end = computed.len() as u64;
        self.write_rebuilt_blocks(st, computed, &mut table, 0, end)?;
        let (start, clusters) = loop {
            let clusters = (table.len() as u64 * 8).div_ceil(cs);
            let start = alloc_first_fit(self, computed, &mut 0, clusters)?;
            end = start + clusters;
            if !self.write_rebuilt_blocks(st, computed, &mut table, start, end)? {
                break (start, clusters);
            }
        };
        let path = self.file().path().to_owned();
        // The old blocks are being replaced: a new structure may take a cluster that one of
        // them named although the check could not count it (a table entry with reserved bits).
        self.check_overlap(st, start, clusters, &[Metadata::RefcountBlock])?;
        let bytes: Vec<u8> = table.iter().flat_map(|e| e.to_be_bytes()).collect();
        let table_offset = start << g.cluster_bits;
        self.file().write_at(&bytes, table_offset).ctx(&path)?;
        self.file().flush().ctx(&path)?;
        let table_clusters = u32::try_from(clusters).map_err(|_| self.err(Error::FileTooLarge))?;
        let mut hdr = [0u8; 12];
        hdr[..8].copy_from_slice(&table_offset.to_be_bytes());
        hdr[8..].copy_from_slice(&table_clusters.to_be_bytes());
        self.file().write_at(&hdr, 48).ctx(&path)?;
        self.file().flush().ctx(&path)?;
        st.h.refcount_table_offset = table_offset;
        st.h.refcount_table_clusters = table_clusters;
        FreshRefcounts {
            table_offset,
            table_clusters,
            reftable: table,
            end: computed.len() as u64,
        }
        .install(st);
        Ok(())
    }

    /// Writes the refcount block of every block range that has a counted cluster in
    /// `[first, end)`, placing the blocks `table` lacks (the table grows in whole clusters).
    /// Returns whether the table grew.
    fn write_rebuilt_blocks(
        &self,
        st: &mut State,
        computed: &mut Vec<u32>,
        table: &mut Vec<u64>,
        first: u64,
        end: u64,
    ) -> Result<bool> {
        let g = self.geo;
        let per = g.rb_entries;
        let idx = |x: u64| usize::try_from(x).unwrap_or(usize::MAX);
        let mut grown = false;
        let mut from = 0;
        let mut end = end;
        let mut c = first;
        while c < end {
            if computed.get(idx(c)).is_none_or(|&v| v == 0) {
                c += 1;
                continue;
            }
            let bi = c / per;
            let bstart = bi * per;
            let off = match table.get(idx(bi)) {
                Some(&o) if o != 0 => o,
                _ => {
                    // Never in a block range already written.
                    from = from.max(bstart);
                    let cl = alloc_first_fit(self, computed, &mut from, 1)?;
                    end = end.max(cl + 1);
                    if table.len() as u64 <= bi {
                        let per_cluster = g.cluster_size / 8;
                        table.resize(idx((bi + 1).div_ceil(per_cluster) * per_cluster), 0);
                        grown = true;
                    }
                    let o = cl << g.cluster_bits;
                    table[idx(bi)] = o;
                    o
                }
            };
            self.check_overlap(st, off >> g.cluster_bits, 1, &[Metadata::RefcountBlock])?;
            let mut block = vec![0u8; idx(g.cluster_size)];
            for k in 0..per {
                let v = computed.get(idx(bstart + k)).copied().unwrap_or(0);
                if v != 0 {
                    set_entry(&mut block, g.refcount_order, k, u64::from(v));
                }
            }
            self.file().write_at(&block, off).ctx(self.file().path())?;
            c = bstart + per;
        }
        Ok(grown)
    }
}
