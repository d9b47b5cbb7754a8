//! Whole new refcount structures, counted from a state's metadata and written past the end of
//! the file, for operations that must switch to a new state in one header write (refcount width
//! changes, snapshot creation, application and deletion).

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
