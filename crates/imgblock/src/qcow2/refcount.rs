//! Refcounts: reading and updating entries of any width (1 to 64 bits), cluster allocation,
//! refcount blocks that cover themselves, and refcount-table growth.
//!
//! Ordering for crash safety: a cluster's refcount is written before anything points at it, and a
//! refcount is dropped only after the last pointer is gone. A crash in between leaks clusters; it
//! never leaves a pointer to a cluster whose refcount is zero.

use super::overlap::Metadata;
use super::{Error, Qcow2, State, MAX_HOST_OFFSET, MAX_REFTABLE_BYTES, OFFSET_MASK};
use crate::error::IoContext;
use crate::Result;

/// Reads entry `i` of a refcount block of width `1 << order` bits.
pub fn get_entry(block: &[u8], order: u32, i: u64) -> u64 {
    let bits = 1u64 << order;
    let idx = |x: u64| usize::try_from(x).unwrap_or(usize::MAX);
    if bits < 8 {
        let per = 8 / bits;
        let byte = block.get(idx(i / per)).copied().unwrap_or(0);
        let shift = (i % per) * bits;
        (u64::from(byte) >> shift) & ((1 << bits) - 1)
    } else {
        let n = idx(bits / 8);
        let o = idx(i) * n;
        block.get(o..o + n).map_or(0, |b| {
            b.iter().fold(0u64, |acc, &x| acc << 8 | u64::from(x))
        })
    }
}

/// Writes entry `i`; returns the byte range that changed.
pub fn set_entry(block: &mut [u8], order: u32, i: u64, v: u64) -> std::ops::Range<usize> {
    let bits = 1u64 << order;
    let idx = |x: u64| usize::try_from(x).unwrap_or(usize::MAX);
    if bits < 8 {
        let per = 8 / bits;
        let b = idx(i / per);
        let shift = (i % per) * bits;
        let mask = ((1u64 << bits) - 1) << shift;
        let old = u64::from(block[b]);
        // The result keeps only the low 8 bits by construction of the mask.
        block[b] = u8::try_from((old & !mask) | ((v << shift) & mask)).unwrap_or(0);
        b..b + 1
    } else {
        let n = idx(bits / 8);
        let o = idx(i) * n;
        let bytes = v.to_be_bytes();
        block[o..o + n].copy_from_slice(&bytes[8 - n..]);
        o..o + n
    }
}

/// Refcount blocks (or table growths) one allocation may need, beyond those the run itself
/// spans, before the refcount structures are taken to be inconsistent: each new block needs at
/// most one more for itself, and the table grows a few times at most.
const MAX_ALLOC_RETRIES: u32 = 64;

/// Host offset of refcount block `bi` (0 where the table has no such block).
fn block_offset(st: &State, bi: u64) -> u64 {
    st.reftable
        .get(usize::try_from(bi).unwrap_or(usize::MAX))
        .copied()
        .unwrap_or(0)
        & OFFSET_MASK
}

impl Qcow2 {
    /// Largest refcount the width can hold.
    pub(super) fn max_refcount(&self) -> u64 {
        let bits = 1u64 << self.geo.refcount_order;
        if bits == 64 {
            u64::MAX
        } else {
            (1 << bits) - 1
        }
    }

    pub(super) fn load_refblock<'a>(&self, st: &'a mut State, off: u64) -> Result<&'a mut Vec<u8>> {
        if st.rb_cache.get(off).is_none() {
            if off % self.geo.cluster_size != 0 || off >= MAX_HOST_OFFSET {
                return Err(self.err(Error::Misaligned {
                    what: "refcount block",
                    offset: off,
                }));
            }
            let mut b = vec![0u8; usize::try_from(self.geo.cluster_size).unwrap_or(0)];
            self.file().read_at(&mut b, off).ctx(self.file().path())?;
            st.rb_cache.insert(off, b);
        }
        st.rb_cache.get(off).ok_or_else(|| {
            self.err(Error::Misaligned {
                what: "refcount block",
                offset: off,
            })
        })
    }

    /// The refcount of cluster index `c` (0 where no refcount block covers it).
    pub(super) fn refcount(&self, st: &mut State, c: u64) -> Result<u64> {
        let bi = c / self.geo.rb_entries;
        let rb = block_offset(st, bi);
        if rb == 0 {
            return Ok(0);
        }
        let order = self.geo.refcount_order;
        let i = c % self.geo.rb_entries;
        Ok(get_entry(self.load_refblock(st, rb)?, order, i))
    }

    /// Sets the refcounts of clusters `[c, c + n)`, whose blocks must exist, to one: one write
    /// per refcount block rather than one per cluster.
    fn set_refcounts_to_one(&self, st: &mut State, c: u64, n: u64) -> Result<()> {
        self.set_refcounts(st, c, n, |_| 1)
    }

    /// Sets the refcount of each cluster `c + k` for `k` in `[0, n)` to `value(k)` (non-zero),
    /// their blocks having to exist: one write per refcount block.
    fn set_refcounts(
        &self,
        st: &mut State,
        c: u64,
        n: u64,
        value: impl Fn(u64) -> u64,
    ) -> Result<()> {
        // Clusters freed earlier in a batch may be among these: deallocate them first.
        self.issue_discards(st);
        let per = self.geo.rb_entries;
        let end = c + n;
        let mut cur = c;
        while cur < end {
            let bi = cur / per;
            let run_end = ((bi + 1) * per).min(end);
            let rb = block_offset(st, bi);
            if rb == 0 {
                return Err(self.err(Error::RefcountUnderflow(cur << self.geo.cluster_bits)));
            }
            // Whatever happens to the write below, these clusters may now count as in use.
            st.end_hint = st.end_hint.max(run_end);
            let order = self.geo.refcount_order;
            let block = self.load_refblock(st, rb)?;
            let (mut lo, mut hi) = (usize::MAX, 0);
            for x in cur..run_end {
                let r = set_entry(block, order, x % per, value(x - c));
                lo = lo.min(r.start);
                hi = hi.max(r.end);
            }
            let bytes = block[lo..hi].to_vec();
            self.file()
                .write_at(&bytes, rb + lo as u64)
                .ctx(self.file().path())?;
            cur = run_end;
        }
        Ok(())
    }

    /// Sets the refcount of cluster index `c`, whose refcount block must exist.
    pub(super) fn set_refcount(&self, st: &mut State, c: u64, v: u64) -> Result<()> {
        let bi = c / self.geo.rb_entries;
        let rb = block_offset(st, bi);
        if rb == 0 {
            return Err(self.err(Error::RefcountUnderflow(c << self.geo.cluster_bits)));
        }
        if v != 0 {
            // Whatever happens to the write below, this cluster may now count as in use; if a
            // batch freed it, its deallocation must come first.
            self.issue_discards(st);
            st.end_hint = st.end_hint.max(c + 1);
        }
        let order = self.geo.refcount_order;
        let i = c % self.geo.rb_entries;
        let block = self.load_refblock(st, rb)?;
        let range = set_entry(block, order, i, v);
        let bytes = block[range.clone()].to_vec();
        self.file()
            .write_at(&bytes, rb + range.start as u64)
            .ctx(self.file().path())?;
        if v == 0 {
            st.free_hint = st.free_hint.min(c);
            // A freed cluster can be reused for anything: stop packing compressed data into it.
            if st.compressed_cursor >> self.geo.cluster_bits == c {
                st.compressed_cursor = 0;
            }
        }
        Ok(())
    }

    /// Adds `delta` to the refcount of the cluster at host offset `host`. When it drops to zero
    /// and `discard` is set, the host range is deallocated.
    pub(super) fn update_refcount(
        &self,
        st: &mut State,
        host: u64,
        delta: i64,
        discard: bool,
    ) -> Result<()> {
        let c = host >> self.geo.cluster_bits;
        if delta > 0 && self.ensure_refblocks(st, c, 1)? {
            // A new refcount block was placed; the cluster's own block now exists.
        }
        let old = self.refcount(st, c)?;
        let new = if delta >= 0 {
            old.checked_add(delta.unsigned_abs())
                .filter(|&v| v <= self.max_refcount())
                .ok_or_else(|| self.err(Error::RefcountOverflow(host)))?
        } else {
            old.checked_sub(delta.unsigned_abs())
                .ok_or_else(|| self.err(Error::RefcountUnderflow(host)))?
        };
        self.set_refcount(st, c, new)?;
        if new == 0 {
            st.l2_cache.remove(c << self.geo.cluster_bits);
            st.rb_cache.remove(c << self.geo.cluster_bits);
            if discard {
                let (off, len) = (c << self.geo.cluster_bits, self.geo.cluster_size);
                match st.discards.as_mut() {
                    Some(v) => match v.last_mut() {
                        Some(last) if last.0 + last.1 == off => last.1 += len,
                        _ => v.push((off, len)),
                    },
                    None => {
                        let _ = self.file().discard(off, len);
                    }
                }
            }
        }
        Ok(())
    }

    /// Runs `f` with the host ranges it frees deallocated together at its end (see
    /// [`State::discards`]), whether it succeeds or not.
    pub(super) fn batch_discards<T>(
        &self,
        st: &mut State,
        f: impl FnOnce(&mut State) -> Result<T>,
    ) -> Result<T> {
        let outer = st.discards.is_some();
        st.discards.get_or_insert_with(Vec::new);
        let r = f(st);
        if !outer {
            self.issue_discards(st);
            st.discards = None;
        }
        r
    }

    /// Deallocates the host ranges freed so far in a batch. Called before any refcount becomes
    /// non-zero, so a cluster freed in the batch is never deallocated after its reuse.
    fn issue_discards(&self, st: &mut State) {
        if let Some(v) = st.discards.as_mut() {
            for (off, len) in v.drain(..) {
                let _ = self.file().discard(off, len);
            }
        }
    }

    /// First cluster index of a run of `n` clusters whose refcounts are all zero.
    fn find_free_run(&self, st: &mut State, n: u64) -> Result<u64> {
        let mut c = st.free_hint;
        let mut run = 0;
        let mut first_free = None;
        loop {
            if (c + 1) << self.geo.cluster_bits > MAX_HOST_OFFSET {
                return Err(self.err(Error::FileTooLarge));
            }
            let rc = self.refcount(st, c)?;
            if rc != 0 && c >= st.end_hint {
                // Past everything the file holds nothing can be in use: refcounts that say
                // otherwise are corrupt, and following them could scan without end.
                return Err(self.err(Error::RefcountPastEnd(c << self.geo.cluster_bits)));
            }
            if rc == 0 {
                first_free.get_or_insert(c);
                run += 1;
                if run == n {
                    st.free_hint = first_free.unwrap_or(c);
                    return Ok(c + 1 - n);
                }
            } else {
                run = 0;
            }
            c += 1;
        }
    }

    /// Makes sure refcount blocks cover clusters `[c, c + n)`. Returns true when it had to
    /// allocate something (the caller must then look for free clusters again).
    pub(super) fn ensure_refblocks(&self, st: &mut State, c: u64, n: u64) -> Result<bool> {
        let first = c / self.geo.rb_entries;
        let last = (c + n - 1) / self.geo.rb_entries;
        for bi in first..=last {
            let idx = usize::try_from(bi).unwrap_or(usize::MAX);
            if idx >= st.reftable.len() {
                self.grow_reftable(st, bi)?;
                return Ok(true);
            }
            if st.reftable[idx] & OFFSET_MASK != 0 {
                continue;
            }
            let y = self.find_free_run(st, 1)?;
            self.check_overlap(st, y, 1, &[])?;
            let cs = usize::try_from(self.geo.cluster_size).unwrap_or(0);
            let mut block = vec![0u8; cs];
            if y / self.geo.rb_entries == bi {
                // The new block describes itself.
                set_entry(
                    &mut block,
                    self.geo.refcount_order,
                    y % self.geo.rb_entries,
                    1,
                );
            } else {
                if self.ensure_refblocks(st, y, 1)? {
                    return Ok(true);
                }
                self.set_refcount(st, y, 1)?;
            }
            let host = y << self.geo.cluster_bits;
            self.file().write_at(&block, host).ctx(self.file().path())?;
            st.rb_cache.insert(host, block);
            let off = st.h.refcount_table_offset + bi * 8;
            self.file()
                .write_at(&host.to_be_bytes(), off)
                .ctx(self.file().path())?;
            st.reftable[idx] = host;
            st.meta_add(y, Metadata::RefcountBlock);
            st.end_hint = st.end_hint.max(y + 1);
            return Ok(true);
        }
        Ok(false)
    }

    /// Allocates `n` contiguous clusters with refcount 1 and returns the host offset of the first.
    pub(super) fn alloc_clusters(&self, st: &mut State, n: u64) -> Result<u64> {
        // Each retry places one refcount block or grows the table: a consistent image needs a
        // handful, and one more for each refcount block the run spans (a large L1 table in
        // 512-byte clusters spans dozens). Corrupt refcounts (a block claiming to be free,
        // blocks overlapping) could otherwise keep us placing blocks for ever.
        let limit = MAX_ALLOC_RETRIES
            .saturating_add(u32::try_from(2 * (n / self.geo.rb_entries + 1)).unwrap_or(u32::MAX));
        let mut retries = 0;
        loop {
            let c = self.find_free_run(st, n)?;
            if self.ensure_refblocks(st, c, n)? {
                retries += 1;
                if retries > limit {
                    return Err(self.err(Error::RefcountStructureInconsistent));
                }
                continue;
            }
            // The run may have been taken by a refcount block placed meanwhile.
            let mut free = true;
            for i in 0..n {
                if self.refcount(st, c + i)? != 0 {
                    free = false;
                    break;
                }
            }
            if !free {
                continue;
            }
            self.check_overlap(st, c, n, &[])?;
            self.set_refcounts_to_one(st, c, n)?;
            if st.free_hint == c {
                st.free_hint = c + n;
            }
            st.end_hint = st.end_hint.max(c + n);
            return Ok(c << self.geo.cluster_bits);
        }
    }

    /// Finds room for `len` bytes of compressed data, packed after the previous compressed cluster
    /// when it fits (spilling into the following clusters when they are free, as qemu does).
    /// Every host cluster the bytes touch gains one reference.
    pub(super) fn alloc_compressed_bytes(&self, st: &mut State, len: u64) -> Result<u64> {
        let g = self.geo;
        let cur = st.compressed_cursor;
        if cur % g.cluster_size != 0 {
            let first = cur >> g.cluster_bits;
            let last = (cur + len - 1) >> g.cluster_bits;
            let mut extra_free = true;
            for c in first + 1..=last {
                if self.refcount(st, c)? != 0 {
                    extra_free = false;
                }
            }
            if extra_free && !self.ensure_refblocks(st, first, last - first + 1)? {
                let rc = self.refcount(st, first)?;
                if rc > 0 && rc < self.max_refcount() {
                    self.check_overlap(st, first + 1, last - first, &[])?;
                    self.set_refcount(st, first, rc + 1)?;
                    for c in first + 1..=last {
                        self.set_refcount(st, c, 1)?;
                    }
                    st.end_hint = st.end_hint.max(last + 1);
                    st.compressed_cursor = cur + len;
                    return Ok(cur);
                }
            }
        }
        let n = len.div_ceil(g.cluster_size);
        let host = self.alloc_clusters(st, n)?;
        st.compressed_cursor = host + len;
        Ok(host)
    }

    /// Places compressed byte runs of `lens` back to back after the previous compressed data,
    /// where [`Qcow2::alloc_compressed_bytes`] would place them one by one, and counts their
    /// references with one refcount write per refcount block. `None`, with no refcount changed,
    /// when that is not possible (no partly used cluster to continue, a cluster in the way, a new
    /// refcount block placed meanwhile, a refcount at its maximum): the caller then places them
    /// one by one.
    pub(super) fn alloc_compressed_run(
        &self,
        st: &mut State,
        lens: &[u64],
    ) -> Result<Option<Vec<u64>>> {
        let g = self.geo;
        let cur = st.compressed_cursor;
        let total: u64 = lens.iter().sum();
        if cur % g.cluster_size == 0 || total == 0 || lens.contains(&0) {
            return Ok(None);
        }
        let first = cur >> g.cluster_bits;
        let last = (cur + total - 1) >> g.cluster_bits;
        for c in first + 1..=last {
            if self.refcount(st, c)? != 0 {
                return Ok(None);
            }
        }
        if self.ensure_refblocks(st, first, last - first + 1)? {
            return Ok(None);
        }
        let rc = self.refcount(st, first)?;
        if rc == 0 {
            return Ok(None);
        }
        self.check_overlap(st, first + 1, last - first, &[])?;
        // The new refcounts: the first cluster's current one, plus one for every run that
        // touches a cluster. Each run is shorter than a cluster (the caller checked), so
        // `lens.len() + 1` clusters at most.
        let span = last - first + 1;
        let mut counts = vec![0u64; usize::try_from(span).unwrap_or(0)];
        let mut hosts = Vec::with_capacity(lens.len());
        let mut at = cur;
        for &len in lens {
            hosts.push(at);
            let a = (at >> g.cluster_bits) - first;
            let b = ((at + len - 1) >> g.cluster_bits) - first;
            for k in a..=b {
                if let Some(x) = counts.get_mut(usize::try_from(k).unwrap_or(usize::MAX)) {
                    *x += 1;
                }
            }
            at += len;
        }
        if let Some(x) = counts.first_mut() {
            *x += rc;
        }
        if counts.len() as u64 != span || counts.iter().any(|&v| v > self.max_refcount()) {
            return Ok(None);
        }
        // Every k below `span` has its count (checked above).
        let count = |k: u64| usize::try_from(k).ok().and_then(|i| counts.get(i).copied());
        self.set_refcounts(st, first, span, |k| count(k).unwrap_or(1))?;
        st.compressed_cursor = cur + total;
        Ok(Some(hosts))
    }

    /// Replaces the refcount table with a larger one that has an entry for block `min_index`,
    /// placed past the end of everything in use together with the refcount blocks it needs.
    pub(super) fn grow_reftable(&self, st: &mut State, min_index: u64) -> Result<()> {
        let g = self.geo;
        let per_cluster = g.cluster_size / 8;
        let old_len = st.reftable.len() as u64;
        let want = (min_index + 1).max(old_len + old_len / 2 + 1);
        let mut table_clusters = want.div_ceil(per_cluster);
        let start = st.end_hint.max(
            self.file()
                .size()
                .ctx(self.file().path())?
                .div_ceil(g.cluster_size),
        );
        // Blocks needed to cover the new table and the new blocks themselves.
        let mut new_blocks: Vec<(u64, u64)> = Vec::new(); // (block index, cluster)
        loop {
            let area_end = start + table_clusters + new_blocks.len() as u64;
            let mut missing = Vec::new();
            for bi in (start / g.rb_entries)..=((area_end - 1) / g.rb_entries) {
                let covered = block_offset(st, bi) != 0;
                if !covered && !new_blocks.iter().any(|&(b, _)| b == bi) {
                    missing.push(bi);
                }
            }
            let needed_len = new_blocks
                .iter()
                .map(|b| b.0)
                .chain(missing.iter().copied())
                .max()
                .unwrap_or(0)
                + 1;
            let tc = needed_len.max(want).div_ceil(per_cluster);
            if missing.is_empty() && tc == table_clusters {
                break;
            }
            if tc != table_clusters {
                // The table grew, which shifts the blocks placed after it.
                table_clusters = tc;
                let bis: Vec<u64> = new_blocks.iter().map(|b| b.0).collect();
                new_blocks = bis
                    .into_iter()
                    .enumerate()
                    .map(|(i, b)| (b, start + tc + i as u64))
                    .collect();
            }
            for bi in missing {
                let cl = start + table_clusters + new_blocks.len() as u64;
                new_blocks.push((bi, cl));
            }
        }
        if table_clusters * g.cluster_size > MAX_REFTABLE_BYTES {
            return Err(self.err(Error::FileTooLarge));
        }
        let area_end = start + table_clusters + new_blocks.len() as u64;
        if area_end << g.cluster_bits > MAX_HOST_OFFSET {
            return Err(self.err(Error::FileTooLarge));
        }
        self.check_overlap(st, start, area_end - start, &[])?;
        let cs = usize::try_from(g.cluster_size).unwrap_or(0);
        let mut blocks: Vec<(u64, u64, Vec<u8>)> = new_blocks
            .iter()
            .map(|&(bi, cl)| (bi, cl, vec![0u8; cs]))
            .collect();
        // Refcounts of the new area: in new blocks where they fall there, else in existing ones.
        for c in start..area_end {
            let bi = c / g.rb_entries;
            if let Some(b) = blocks.iter_mut().find(|b| b.0 == bi) {
                set_entry(&mut b.2, g.refcount_order, c % g.rb_entries, 1);
            } else {
                self.set_refcount(st, c, 1)?;
            }
        }
        let path = self.file().path();
        for (_, cl, data) in &blocks {
            self.file().write_at(data, cl << g.cluster_bits).ctx(path)?;
        }
        let mut table = st.reftable.clone();
        table.resize(
            usize::try_from(table_clusters * per_cluster).unwrap_or(0),
            0,
        );
        for (bi, cl, _) in &blocks {
            table[usize::try_from(*bi).unwrap_or(0)] = cl << g.cluster_bits;
        }
        let bytes: Vec<u8> = table.iter().flat_map(|e| e.to_be_bytes()).collect();
        let new_off = start << g.cluster_bits;
        self.file().write_at(&bytes, new_off).ctx(path)?;
        self.file().flush().ctx(path)?;
        let mut hdr = [0u8; 12];
        hdr[..8].copy_from_slice(&new_off.to_be_bytes());
        hdr[8..].copy_from_slice(
            &u32::try_from(table_clusters)
                .map_err(|_| self.err(Error::FileTooLarge))?
                .to_be_bytes(),
        );
        self.file().write_at(&hdr, 48).ctx(path)?;
        self.file().flush().ctx(path)?;
        let old_off = st.h.refcount_table_offset;
        let old_clusters = u64::from(st.h.refcount_table_clusters);
        st.h.refcount_table_offset = new_off;
        st.h.refcount_table_clusters = u32::try_from(table_clusters).unwrap_or(u32::MAX);
        st.reftable = table;
        st.meta_invalidate();
        for (_, cl, data) in blocks {
            st.rb_cache.insert(cl << g.cluster_bits, data);
        }
        st.end_hint = st.end_hint.max(area_end);
        for i in 0..old_clusters {
            self.update_refcount(st, old_off + (i << g.cluster_bits), -1, false)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_of_every_width_round_trip() {
        for order in 0..=6u32 {
            let mut block = vec![0u8; 512];
            let bits = 1u64 << order;
            let max = if bits == 64 {
                u64::MAX
            } else {
                (1 << bits) - 1
            };
            let n = 512 * 8 / bits;
            for i in 0..n {
                set_entry(&mut block, order, i, (i * 7 + 3) & max);
            }
            for i in 0..n {
                assert_eq!(
                    get_entry(&block, order, i),
                    (i * 7 + 3) & max,
                    "order {order} entry {i}"
                );
            }
        }
    }

    #[test]
    fn sub_byte_entries_fill_from_the_low_bits() {
        let mut block = vec![0u8; 4];
        set_entry(&mut block, 0, 0, 1);
        set_entry(&mut block, 0, 3, 1);
        assert_eq!(block[0], 0b1001);
        set_entry(&mut block, 2, 3, 0xa);
        assert_eq!(block[1], 0xa0);
    }
}
