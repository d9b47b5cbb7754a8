//! The block map of an open VDI image, read in chunks and cached in bounded memory.
//!
//! A VDI may have up to [`super::MAX_BLOCKS`] blocks (512 TiB), a 2 GiB block map; qemu reads
//! it whole. Here the map stays on disk and chunks of [`CHUNK_ENTRIES`] entries (16 GiB of
//! disk each) are read as they are first needed and kept up to a budget, the least recently
//! used given back first. Writes go through to the file at once, so a cached chunk is never
//! newer than the file and dropping one loses nothing.

use std::sync::Arc;

use crate::error::IoContext;
use crate::storage::Storage;
use crate::Result;

/// Entries in one cached chunk: 64 KiB of map, 16 GiB of disk.
pub const CHUNK_ENTRIES: u32 = 16 << 10;
/// Chunks kept in memory: 4 MiB of map, enough for the whole map of a 1 TiB disk.
pub const MAX_CHUNKS: usize = 64;

/// The block map: `len` little-endian u32 entries at `offset` of the image file.
#[derive(Debug)]
pub struct BlockMap {
    len: u32,
    offset: u64,
    /// Chunk `i` holds entries `i * CHUNK_ENTRIES..`, when it is in memory.
    chunks: Vec<Option<Box<[u32]>>>,
    /// When chunk `i` was last used (a counter, not a time).
    last_use: Vec<u64>,
    /// Chunks in memory, and the most there may be.
    resident: usize,
    budget: usize,
    clock: u64,
}

impl BlockMap {
    /// A map of `len` entries at `offset`, none read yet. The caller has checked that they lie
    /// within the file.
    pub fn new(len: u32, offset: u64) -> BlockMap {
        Self::with_budget(len, offset, MAX_CHUNKS)
    }

    /// As [`BlockMap::new`], keeping at most `budget` chunks (at least one) in memory.
    pub fn with_budget(len: u32, offset: u64, budget: usize) -> BlockMap {
        let n = len.div_ceil(CHUNK_ENTRIES) as usize;
        BlockMap {
            len,
            offset,
            chunks: (0..n).map(|_| None).collect(),
            last_use: vec![0; n],
            resident: 0,
            budget: budget.max(1),
            clock: 0,
        }
    }

    /// Chunks in memory now.
    #[cfg(test)]
    fn resident(&self) -> usize {
        self.resident
    }

    /// Entry `block`, or `None` past the end of the map.
    ///
    /// # Errors
    /// When the chunk holding it cannot be read.
    pub fn get(&mut self, file: &Arc<dyn Storage>, block: u64) -> Result<Option<u32>> {
        let Some((c, i)) = self.place(block) else {
            return Ok(None);
        };
        self.load(file, c)?;
        Ok(self.chunks[c].as_deref().and_then(|ch| ch.get(i)).copied())
    }

    /// Sets entry `block` to `value`, in the file and in memory. Past the end of the map it
    /// does nothing.
    ///
    /// # Errors
    /// When the file cannot be written; the map in memory is then unchanged.
    pub fn set(&mut self, file: &Arc<dyn Storage>, block: u64, value: u32) -> Result<()> {
        let Some((c, i)) = self.place(block) else {
            return Ok(());
        };
        file.write_at(&value.to_le_bytes(), self.offset + block * 4)
            .ctx(file.path())?;
        if let Some(slot) = self
            .chunks
            .get_mut(c)
            .and_then(Option::as_mut)
            .and_then(|chunk| chunk.get_mut(i))
        {
            *slot = value;
        }
        Ok(())
    }

    /// The chunk holding entry `block` and its index there; `None` past the end of the map.
    fn place(&self, block: u64) -> Option<(usize, usize)> {
        let b = u32::try_from(block).ok().filter(|&b| b < self.len)?;
        Some(((b / CHUNK_ENTRIES) as usize, (b % CHUNK_ENTRIES) as usize))
    }

    /// Calls `f(block, entry)` for every entry in order, reading the chunks not in memory
    /// without keeping them (a scan does not push the working set out).
    ///
    /// # Errors
    /// When a chunk cannot be read.
    pub fn for_each(&mut self, file: &Arc<dyn Storage>, mut f: impl FnMut(u32, u32)) -> Result<()> {
        let mut scratch = Vec::new();
        let mut block = 0u32;
        for c in 0..self.chunks.len() {
            let entries: &[u32] = match &self.chunks[c] {
                Some(chunk) => chunk,
                None => {
                    scratch = self.read_chunk(file, c, std::mem::take(&mut scratch))?;
                    &scratch
                }
            };
            for &e in entries {
                f(block, e);
                block = block.wrapping_add(1);
            }
        }
        Ok(())
    }

    /// Reads chunk `c` into `buf` (reused), decoded.
    fn read_chunk(&self, file: &Arc<dyn Storage>, c: usize, buf: Vec<u32>) -> Result<Vec<u32>> {
        // c < chunks.len(), so the chunk starts within the map.
        let first = u32::try_from(c)
            .unwrap_or(u32::MAX)
            .saturating_mul(CHUNK_ENTRIES);
        let n = self.len.saturating_sub(first).min(CHUNK_ENTRIES) as usize;
        let mut raw = vec![0u8; n * 4];
        file.read_at(&mut raw, self.offset + u64::from(first) * 4)
            .ctx(file.path())?;
        let mut out = buf;
        out.clear();
        out.extend(
            raw.chunks_exact(4)
                .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        );
        Ok(out)
    }

    /// Chunk `c`, read if it is not in memory (giving back the least recently used one when
    /// the budget is spent).
    fn load(&mut self, file: &Arc<dyn Storage>, c: usize) -> Result<()> {
        self.clock += 1;
        self.last_use[c] = self.clock;
        if self.chunks[c].is_none() {
            let entries = self.read_chunk(file, c, Vec::new())?;
            if self.resident >= self.budget {
                self.evict();
            }
            self.chunks[c] = Some(entries.into_boxed_slice());
            self.resident += 1;
        }
        Ok(())
    }

    /// Drops the least recently used chunk in memory.
    fn evict(&mut self) {
        let oldest = (0..self.chunks.len())
            .filter(|&c| self.chunks[c].is_some())
            .min_by_key(|&c| self.last_use[c]);
        if let Some(c) = oldest {
            self.chunks[c] = None;
            self.resident -= 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MemStorage;

    fn file_with(entries: &[u32], offset: u64) -> Arc<dyn Storage> {
        let mut bytes = vec![0xaau8; usize::try_from(offset).unwrap()];
        for e in entries {
            bytes.extend_from_slice(&e.to_le_bytes());
        }
        bytes.extend_from_slice(&[0x55; 100]);
        Arc::new(MemStorage::new(bytes, std::path::Path::new("m.vdi"), false))
    }

    #[test]
    fn reads_and_writes_match_a_plain_vector_with_eviction() {
        let n = 5 * CHUNK_ENTRIES + 123;
        let mut model: Vec<u32> = (0..n).map(|i| i.wrapping_mul(2_654_435_761)).collect();
        let file = file_with(&model, 512);
        let mut map = BlockMap::with_budget(n, 512, 2);
        let mut x = 12345u64;
        for step in 0..4_000u32 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let block = x % (u64::from(n) + 10);
            if step % 3 == 0 {
                map.set(&file, block, step).unwrap();
                if let Some(m) = model.get_mut(usize::try_from(block).unwrap()) {
                    *m = step;
                }
            } else {
                assert_eq!(
                    map.get(&file, block).unwrap(),
                    model.get(usize::try_from(block).unwrap()).copied()
                );
            }
            assert!(map.resident() <= 2);
        }
        let mut seen = Vec::new();
        map.for_each(&file, |b, e| {
            assert_eq!(b as usize, seen.len());
            seen.push(e);
        })
        .unwrap();
        assert_eq!(seen, model);
        // A fresh map over the same file sees every write.
        let mut again = BlockMap::new(n, 512);
        for b in [0, 1, CHUNK_ENTRIES, n - 1] {
            let want = model[b as usize];
            assert_eq!(again.get(&file, u64::from(b)).unwrap(), Some(want));
        }
        assert_eq!(again.get(&file, u64::from(n)).unwrap(), None);
    }

    #[test]
    fn a_scan_keeps_the_working_set() {
        let n = 4 * CHUNK_ENTRIES;
        let file = file_with(&vec![7; n as usize], 0);
        let mut map = BlockMap::with_budget(n, 0, 1);
        assert_eq!(map.get(&file, 5).unwrap(), Some(7));
        let mut count = 0u32;
        map.for_each(&file, |_, _| count += 1).unwrap();
        assert_eq!(count, n);
        assert_eq!(map.resident(), 1);
        assert!(map.chunks[0].is_some());
    }
}
