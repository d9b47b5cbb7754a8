//! Metadata overlap protection, after qemu's default ("cached") overlap checks.
//!
//! The allocator trusts the refcounts. When they are wrong (a refcount block that reads as
//! zeroes, a refcount of 0 on a table in use), it would hand out clusters that hold metadata,
//! and the data or table written there would destroy the header or a table. So every cluster
//! the allocator hands out, and every host range a guest write lands on, is first checked
//! against the clusters that hold the header, the active L1 table, the active L2 tables, the
//! refcount table, the refcount blocks, the snapshot table, the snapshots' L1 tables and the
//! persistent bitmaps' directory. On an overlap the image is marked corrupt, as qemu marks it,
//! and nothing is written.
//!
//! The map is built from the in-memory tables the first time a write needs it, kept up to date
//! as L2 tables and refcount blocks come and go, and rebuilt after the operations that move
//! whole tables. A check is one range lookup, whatever the image size.

use std::collections::BTreeMap;

use super::{header, snapshot, Error, Qcow2, State, OFFSET_MASK};
use crate::error::IoContext;
use crate::Result;

/// What a metadata cluster holds, named as qemu names it in its overlap messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Metadata {
    /// The header cluster (cluster 0).
    Header,
    /// The active L1 table.
    ActiveL1,
    /// An L2 table the active L1 table points at.
    ActiveL2,
    /// The refcount table.
    RefcountTable,
    /// A refcount block the refcount table points at.
    RefcountBlock,
    /// The snapshot table.
    SnapshotTable,
    /// A snapshot's L1 table.
    InactiveL1,
    /// The persistent bitmaps' directory.
    BitmapDirectory,
}

impl Metadata {
    /// qemu's name for the structure.
    pub fn name(self) -> &'static str {
        match self {
            Metadata::Header => "qcow2_header",
            Metadata::ActiveL1 => "active L1 table",
            Metadata::ActiveL2 => "active L2 table",
            Metadata::RefcountTable => "refcount table",
            Metadata::RefcountBlock => "refcount block",
            Metadata::SnapshotTable => "snapshot table",
            Metadata::InactiveL1 => "inactive L1 table",
            Metadata::BitmapDirectory => "bitmap directory",
        }
    }
}

/// Metadata extents in clusters: (first cluster, clusters, kind) with how many structures name
/// that extent (corrupt metadata may name one twice; it stays marked until both are gone).
#[derive(Debug, Default)]
pub struct MetadataMap {
    extents: BTreeMap<(u64, u64, Metadata), u32>,
    /// The longest extent ever added, which bounds how far before a range a lookup must start.
    longest: u64,
}

impl MetadataMap {
    /// Marks clusters `[first, first + n)` as holding `kind`.
    pub fn add(&mut self, first: u64, n: u64, kind: Metadata) {
        if n == 0 {
            return;
        }
        *self.extents.entry((first, n, kind)).or_insert(0) += 1;
        self.longest = self.longest.max(n);
    }

    /// Forgets one structure of `kind` at clusters `[first, first + n)`.
    pub fn remove(&mut self, first: u64, n: u64, kind: Metadata) {
        if let Some(count) = self.extents.get_mut(&(first, n, kind)) {
            *count -= 1;
            if *count == 0 {
                self.extents.remove(&(first, n, kind));
            }
        }
    }

    /// The first metadata cluster in `[first, first + n)` that is not of a kind in `ignore`,
    /// with what it holds.
    pub fn overlap(&self, first: u64, n: u64, ignore: &[Metadata]) -> Option<(u64, Metadata)> {
        if n == 0 {
            return None;
        }
        let end = first.saturating_add(n);
        let from = first.saturating_sub(self.longest.saturating_sub(1));
        self.extents
            .range((from, 0, Metadata::Header)..(end, 0, Metadata::Header))
            .map(|(&(start, len, kind), _)| (start, len, kind))
            .filter(|&(start, len, kind)| {
                start.saturating_add(len) > first && !ignore.contains(&kind)
            })
            .map(|(start, _, kind)| (start.max(first), kind))
            .min()
    }
}

/// Clusters `(first, count)` that a byte range `[offset, offset + len)` touches.
fn clusters(offset: u64, len: u64, cluster_bits: u32) -> (u64, u64) {
    if len == 0 {
        return (offset >> cluster_bits, 0);
    }
    let first = offset >> cluster_bits;
    let last = offset.saturating_add(len - 1) >> cluster_bits;
    (first, last - first + 1)
}

impl State {
    /// Records a new metadata cluster in the overlap map (when the map is built).
    pub(super) fn meta_add(&mut self, cluster: u64, kind: Metadata) {
        if let Some(m) = self.meta.as_mut() {
            m.add(cluster, 1, kind);
        }
    }

    /// Records that a metadata cluster no longer holds `kind`.
    pub(super) fn meta_remove(&mut self, cluster: u64, kind: Metadata) {
        if let Some(m) = self.meta.as_mut() {
            m.remove(cluster, 1, kind);
        }
    }

    /// Drops the overlap map after tables moved; the next check builds it again.
    pub(super) fn meta_invalidate(&mut self) {
        self.meta = None;
    }
}

impl Qcow2 {
    /// Builds the overlap map from the header, the in-memory L1 and refcount tables and the
    /// snapshot table.
    fn build_metadata_map(&self, st: &State) -> Result<MetadataMap> {
        let bits = self.geo.cluster_bits;
        let cs = self.geo.cluster_size;
        let mut m = MetadataMap::default();
        m.add(0, 1, Metadata::Header);
        let (f, n) = clusters(st.h.l1_table_offset, u64::from(st.h.l1_size) * 8, bits);
        m.add(f, n, Metadata::ActiveL1);
        for &e in &st.l1 {
            let l2 = e & OFFSET_MASK;
            if l2 != 0 {
                m.add(l2 >> bits, 1, Metadata::ActiveL2);
            }
        }
        let (f, n) = clusters(
            st.h.refcount_table_offset,
            u64::from(st.h.refcount_table_clusters) * cs,
            bits,
        );
        m.add(f, n, Metadata::RefcountTable);
        for &e in &st.reftable {
            let rb = e & OFFSET_MASK;
            if rb != 0 {
                m.add(rb >> bits, 1, Metadata::RefcountBlock);
            }
        }
        let snaps = snapshot::read_table(self.file(), &st.h).map_err(|e| self.err(e))?;
        if !snaps.is_empty() {
            let (f, n) = clusters(st.h.snapshots_offset, snapshot::table_len(&snaps), bits);
            m.add(f, n, Metadata::SnapshotTable);
        }
        for s in &snaps {
            let (f, n) = clusters(s.l1_offset, u64::from(s.l1_size) * 8, bits);
            m.add(f, n, Metadata::InactiveL1);
        }
        if let Some(b) = &st.bitmaps {
            let (f, n) = clusters(b.ext.directory_offset, b.ext.directory_size, bits);
            m.add(f, n, Metadata::BitmapDirectory);
        }
        Ok(m)
    }

    /// Refuses a write to host clusters `[first, first + n)` of the image file when they hold
    /// metadata of a kind not in `ignore`: the image is then marked corrupt and the error names
    /// the offset and the structure. Nothing else is written.
    ///
    /// # Errors
    /// [`Error::MetadataOverlap`] on an overlap; [`Error::MarkedCorrupt`] once an overlap was
    /// found in this session; I/O errors while building the map.
    pub(super) fn check_overlap(
        &self,
        st: &mut State,
        first: u64,
        n: u64,
        ignore: &[Metadata],
    ) -> Result<()> {
        if st.corrupt {
            return Err(self.err(Error::MarkedCorrupt));
        }
        let Some((cluster, kind)) = self.metadata_in(st, first, n, ignore)? else {
            return Ok(());
        };
        let offset = cluster << self.geo.cluster_bits;
        self.mark_corrupt(st);
        Err(self.err(Error::MetadataOverlap {
            offset,
            what: kind.name(),
        }))
    }

    /// The first metadata cluster in clusters `[first, first + n)` not of a kind in `ignore`.
    fn metadata_in(
        &self,
        st: &mut State,
        first: u64,
        n: u64,
        ignore: &[Metadata],
    ) -> Result<Option<(u64, Metadata)>> {
        if st.meta.is_none() {
            st.meta = Some(self.build_metadata_map(st)?);
        }
        Ok(st.meta.as_ref().and_then(|m| m.overlap(first, n, ignore)))
    }

    /// Whether a host byte range of the image file holds metadata (a guest write there must go
    /// through [`Qcow2::check_overlap`] rather than straight to the file).
    pub(super) fn holds_metadata(&self, st: &mut State, offset: u64, len: u64) -> Result<bool> {
        let (f, n) = clusters(offset, len, self.geo.cluster_bits);
        Ok(self.metadata_in(st, f, n, &[])?.is_some())
    }

    /// Checks a host byte range of the image file, as [`Qcow2::check_overlap`] does.
    pub(super) fn check_overlap_bytes(&self, st: &mut State, offset: u64, len: u64) -> Result<()> {
        let (f, n) = clusters(offset, len, self.geo.cluster_bits);
        self.check_overlap(st, f, n, &[])
    }

    /// Sets the corrupt bit in the header (version 3 has one; qemu sets it only in memory for
    /// version 2) and refuses further writes in this session, as qemu does after a corruption it
    /// prevented. A failure to write the bit is not reported over the corruption itself.
    fn mark_corrupt(&self, st: &mut State) {
        st.corrupt = true;
        if st.h.version >= 3 && st.h.incompatible & header::INCOMPAT_CORRUPT == 0 {
            st.h.incompatible |= header::INCOMPAT_CORRUPT;
            let path = self.file().path();
            let written = self
                .file()
                .write_at(
                    &st.h.incompatible.to_be_bytes(),
                    header::INCOMPATIBLE_OFFSET,
                )
                .ctx(path)
                .and_then(|()| self.file().flush().ctx(path));
            drop(written);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlap_empty_map_finds_nothing() {
        let m = MetadataMap::default();
        assert_eq!(m.overlap(0, 100, &[]), None);
    }

    #[test]
    fn overlap_range_inside_long_extent_is_found() {
        let mut m = MetadataMap::default();
        m.add(10, 8, Metadata::ActiveL1);
        m.add(40, 1, Metadata::ActiveL2);
        assert_eq!(m.overlap(14, 1, &[]), Some((14, Metadata::ActiveL1)));
        assert_eq!(m.overlap(0, 11, &[]), Some((10, Metadata::ActiveL1)));
        assert_eq!(m.overlap(18, 22, &[]), None);
        assert_eq!(m.overlap(18, 23, &[]), Some((40, Metadata::ActiveL2)));
    }

    #[test]
    fn overlap_ignored_kind_is_skipped() {
        let mut m = MetadataMap::default();
        m.add(3, 1, Metadata::RefcountBlock);
        assert_eq!(m.overlap(3, 1, &[Metadata::RefcountBlock]), None);
        assert_eq!(m.overlap(3, 1, &[]), Some((3, Metadata::RefcountBlock)));
    }

    #[test]
    fn overlap_cluster_named_twice_stays_until_both_removed() {
        let mut m = MetadataMap::default();
        m.add(5, 1, Metadata::ActiveL2);
        m.add(5, 1, Metadata::ActiveL2);
        m.remove(5, 1, Metadata::ActiveL2);
        assert_eq!(m.overlap(5, 1, &[]), Some((5, Metadata::ActiveL2)));
        m.remove(5, 1, Metadata::ActiveL2);
        assert_eq!(m.overlap(5, 1, &[]), None);
    }

    #[test]
    fn clusters_of_byte_range_cover_partial_clusters() {
        assert_eq!(clusters(0x10000, 8, 16), (1, 1));
        assert_eq!(clusters(0xfff8, 16, 16), (0, 2));
        assert_eq!(clusters(0x20000, 0, 16), (2, 0));
    }
}
