//! L2 entries (standard and extended) and the L2 table walk.

use super::overlap::Metadata;
use super::{be64_at, Error, Geometry, Qcow2, State, COMPRESSED, COPIED, OFFSET_MASK, ZERO_FLAG};
use crate::driver::{CompressedRef, HostOffset, Mapping};
use crate::error::IoContext;
use crate::Result;

/// What one (sub)cluster is, after qcow2.rst's "Subcluster Allocation Bitmap" table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Data at the host offset.
    Normal,
    /// Reads as zeroes, no host cluster.
    ZeroPlain,
    /// Reads as zeroes, host cluster kept.
    ZeroAlloc,
    /// Not allocated, no host cluster.
    UnallocPlain,
    /// Not allocated here, but the cluster has a host cluster (extended L2).
    UnallocAlloc,
    /// A compressed cluster.
    Compressed,
    /// Flags that contradict each other.
    Invalid,
}

/// A decoded L2 entry: the 64-bit descriptor and, with extended L2, the subcluster bitmap.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Entry {
    /// The cluster descriptor with its flags.
    pub word: u64,
    /// Bits 0-31: subcluster allocated; 32-63: subcluster reads as zeroes.
    pub bitmap: u64,
}

/// Not on disk: marks a standard (not compressed) entry whose host offset is valid although zero. With an external data
/// file, offset 0 is a real data-file offset and qemu tells it from "unallocated" by the COPIED
/// flag (data-file clusters always have refcount 1). Bit 56 is reserved in L2 entries, so the
/// marker never collides with a real flag; [`Entry::to_bytes`] drops it.
const HOST_ZERO_VALID: u64 = 1 << 56;

impl Entry {
    /// Decodes an entry as stored; `data_file` applies qemu's reading of offset 0.
    pub fn decode(word: u64, bitmap: u64, data_file: bool) -> Entry {
        if word & COMPRESSED != 0 {
            // Compressed descriptors use bit 56 for the sector count with large clusters.
            return Entry { word, bitmap };
        }
        let word = word & !HOST_ZERO_VALID;
        let zero_flag_plain = word & ZERO_FLAG != 0 && bitmap == 0;
        if data_file
            && word & OFFSET_MASK == 0
            && word & COPIED != 0
            && word & COMPRESSED == 0
            && !zero_flag_plain
        {
            return Entry {
                word: word | HOST_ZERO_VALID,
                bitmap,
            };
        }
        Entry { word, bitmap }
    }

    fn has_host(&self) -> bool {
        self.word & COMPRESSED == 0
            && (self.word & OFFSET_MASK != 0 || self.word & HOST_ZERO_VALID != 0)
    }

    /// The descriptor as stored on disk.
    pub fn stored_word(&self) -> u64 {
        if self.word & COMPRESSED == 0 {
            self.word & !HOST_ZERO_VALID
        } else {
            self.word
        }
    }

    /// Whether the refcount of the cluster is exactly one.
    pub fn copied(&self) -> bool {
        self.word & COPIED != 0
    }

    /// The host cluster of a standard (non-compressed) entry.
    pub fn host(&self) -> Option<u64> {
        if self.word & COMPRESSED != 0 {
            return None;
        }
        self.has_host().then_some(self.word & OFFSET_MASK)
    }

    /// Host offset and length bound of a compressed entry.
    pub fn compressed(&self, g: &Geometry) -> (u64, u64) {
        let host = self.word & ((1u64 << g.csize_shift) - 1);
        let sectors = ((self.word >> g.csize_shift) & g.csize_mask) + 1;
        (host, (sectors * 512).saturating_sub(host & 511))
    }

    /// The kind of subcluster `sub` (0 without extended L2).
    pub fn kind_ext(&self, sub: u64, ext: bool) -> Kind {
        if self.word & COMPRESSED != 0 {
            return Kind::Compressed;
        }
        let host = self.has_host();
        if ext {
            let alloc = self.bitmap >> sub & 1 != 0;
            let zero = self.bitmap >> (32 + sub) & 1 != 0;
            match (host, alloc, zero) {
                (false, true, _) | (true, true, true) => Kind::Invalid,
                (false, false, true) => Kind::ZeroPlain,
                (false, false, false) => Kind::UnallocPlain,
                (true, false, true) => Kind::ZeroAlloc,
                (true, true, false) => Kind::Normal,
                (true, false, false) => Kind::UnallocAlloc,
            }
        } else {
            match (host, self.word & ZERO_FLAG != 0) {
                (false, true) => Kind::ZeroPlain,
                (false, false) => Kind::UnallocPlain,
                (true, true) => Kind::ZeroAlloc,
                (true, false) => Kind::Normal,
            }
        }
    }

    /// The kind of a standard entry, or of subcluster `sub` ignoring the bitmap layout.
    pub fn kind(&self, sub: u64) -> Kind {
        self.kind_ext(sub, self.bitmap != 0)
    }

    /// Encodes the entry.
    pub fn to_bytes(self, ext: bool) -> Vec<u8> {
        let mut v = self.stored_word().to_be_bytes().to_vec();
        if ext {
            v.extend_from_slice(&self.bitmap.to_be_bytes());
        }
        v
    }
}

/// Allocation-bitmap bits for the subclusters covering `[s, e)` within a cluster.
pub fn range_bits(g: &Geometry, s: u64, e: u64) -> u64 {
    let first = s / g.subcluster_size;
    let last = e.div_ceil(g.subcluster_size);
    let n = last - first;
    if n >= 32 {
        0xffff_ffff
    } else {
        ((1u64 << n) - 1) << first
    }
}

/// One subcluster's mapping, for map's merging of neighbours.
pub struct Granule {
    pub mapping: Mapping,
    pub end: u64,
}

impl Granule {
    /// Whether `next`, which starts `dist` bytes after this granule's start, extends it.
    pub fn continues_with(&self, next: &Granule, dist: u64) -> bool {
        match (self.mapping, next.mapping) {
            (
                Mapping::Data {
                    file: f1,
                    offset: o1,
                    writable: w1,
                },
                Mapping::Data {
                    file: f2,
                    offset: o2,
                    writable: w2,
                },
            ) => f1 == f2 && w1 == w2 && o1.0 + dist == o2.0,
            (Mapping::Zero { offset: None }, Mapping::Zero { offset: None }) => true,
            (
                Mapping::Zero {
                    offset: Some((f1, o1)),
                },
                Mapping::Zero {
                    offset: Some((f2, o2)),
                },
            ) => f1 == f2 && o1.0 + dist == o2.0,
            (Mapping::Unallocated, Mapping::Unallocated) => true,
            (
                Mapping::UnallocatedAt {
                    file: f1,
                    offset: o1,
                },
                Mapping::UnallocatedAt {
                    file: f2,
                    offset: o2,
                },
            ) => f1 == f2 && o1.0 + dist == o2.0,
            _ => false,
        }
    }
}

/// Consecutive entries of one L2 table, changed in the cache and not yet written.
#[derive(Debug, Default)]
pub(super) struct L2Run {
    l2off: u64,
    first: u64,
    bytes: Vec<u8>,
}

impl Qcow2 {
    pub(super) fn load_l2<'a>(&self, st: &'a mut State, l2off: u64) -> Result<&'a mut Vec<u8>> {
        if st.l2_cache.get(l2off).is_none() {
            if l2off % self.geo.cluster_size != 0 || l2off >= super::MAX_HOST_OFFSET {
                return Err(self.err(Error::Misaligned {
                    what: "L2 table",
                    offset: l2off,
                }));
            }
            let mut t = vec![0u8; usize::try_from(self.geo.cluster_size).unwrap_or(0)];
            self.file().read_at(&mut t, l2off).ctx(self.file().path())?;
            st.l2_cache.insert(l2off, t);
        }
        st.l2_cache.get(l2off).ok_or_else(|| {
            self.err(Error::Misaligned {
                what: "L2 table",
                offset: l2off,
            })
        })
    }

    /// Reads entry `l2i` of the L2 table at `l2off`.
    pub(super) fn l2_entry(&self, st: &mut State, l2off: u64, l2i: u64) -> Result<Entry> {
        let t = self.load_l2(st, l2off)?;
        self.entry_in(t, l2off, l2i)
    }

    /// Decodes entry `l2i` of `t`, the loaded L2 table at `l2off`.
    pub(super) fn entry_in(&self, t: &[u8], l2off: u64, l2i: u64) -> Result<Entry> {
        let esize = self.geo.l2_entry_size;
        let o = usize::try_from(l2i * esize).unwrap_or(usize::MAX);
        if o + 8 > t.len() {
            return Err(self.err(Error::Misaligned {
                what: "L2 entry",
                offset: l2off,
            }));
        }
        let word = be64_at(t, o);
        let bitmap = if esize == 16 { be64_at(t, o + 8) } else { 0 };
        Ok(Entry::decode(word, bitmap, self.data != 0))
    }

    /// Writes entry `l2i` of the L2 table at `l2off` (cache and file).
    pub(super) fn set_l2_entry(
        &self,
        st: &mut State,
        l2off: u64,
        l2i: u64,
        e: Entry,
    ) -> Result<()> {
        let bytes = e.to_bytes(self.geo.extended_l2);
        self.cache_l2_entry(st, l2off, l2i, &bytes)?;
        self.file()
            .write_at(&bytes, l2off + l2i * self.geo.l2_entry_size)
            .ctx(self.file().path())
    }

    /// Puts the encoded entry `l2i` into the cached L2 table at `l2off`.
    fn cache_l2_entry(&self, st: &mut State, l2off: u64, l2i: u64, bytes: &[u8]) -> Result<()> {
        let t = self.load_l2(st, l2off)?;
        let o = usize::try_from(l2i * self.geo.l2_entry_size).unwrap_or(usize::MAX);
        t.get_mut(o..o.saturating_add(bytes.len()))
            .ok_or_else(|| {
                self.err(Error::Misaligned {
                    what: "L2 entry",
                    offset: l2off,
                })
            })?
            .copy_from_slice(bytes);
        Ok(())
    }

    /// Sets entry `l2i` of the L2 table at `l2off` in the cache and adds it to `run`; the run
    /// is written out first when the entry does not extend it. The caller writes the last run
    /// with [`Qcow2::write_l2_run`] before it touches another L2 table (so the cached table
    /// cannot be evicted with unwritten entries) and before it frees anything the old
    /// entries referenced.
    pub(super) fn stage_l2_entry(
        &self,
        st: &mut State,
        run: &mut L2Run,
        l2off: u64,
        l2i: u64,
        e: Entry,
    ) -> Result<()> {
        let bytes = e.to_bytes(self.geo.extended_l2);
        self.cache_l2_entry(st, l2off, l2i, &bytes)?;
        let esize = self.geo.l2_entry_size;
        if !run.bytes.is_empty() && run.l2off == l2off && l2i >= run.first {
            let at = usize::try_from((l2i - run.first) * esize).unwrap_or(usize::MAX);
            if at < run.bytes.len() {
                run.bytes[at..at + bytes.len()].copy_from_slice(&bytes);
                return Ok(());
            }
            if at == run.bytes.len() {
                run.bytes.extend_from_slice(&bytes);
                return Ok(());
            }
        }
        self.write_l2_run(run)?;
        run.l2off = l2off;
        run.first = l2i;
        run.bytes.extend_from_slice(&bytes);
        Ok(())
    }

    /// Writes the staged entries of `run` with one write and empties it.
    pub(super) fn write_l2_run(&self, run: &mut L2Run) -> Result<()> {
        if run.bytes.is_empty() {
            return Ok(());
        }
        let at = run.l2off + run.first * self.geo.l2_entry_size;
        let r = self.file().write_at(&run.bytes, at);
        run.bytes.clear();
        r.ctx(self.file().path())
    }

    /// The L2 table for L1 index `l1i`, allocated or copied so that it may be written.
    pub(super) fn l2_for_write(&self, st: &mut State, l1i: u64) -> Result<u64> {
        let idx = usize::try_from(l1i).unwrap_or(usize::MAX);
        let l1e = *st.l1.get(idx).ok_or_else(|| {
            self.err(Error::L1TooSmall {
                l1_size: st.h.l1_size,
                size: self.size,
            })
        })?;
        let old = l1e & OFFSET_MASK;
        if old != 0 && l1e & COPIED != 0 {
            return Ok(old);
        }
        let new = self.alloc_clusters(st, 1)?;
        let table = if old == 0 {
            vec![0u8; usize::try_from(self.geo.cluster_size).unwrap_or(0)]
        } else {
            self.load_l2(st, old)?.clone()
        };
        self.file().write_at(&table, new).ctx(self.file().path())?;
        st.l2_cache.insert(new, table);
        let e = new | COPIED;
        self.file()
            .write_at(&e.to_be_bytes(), st.h.l1_table_offset + l1i * 8)
            .ctx(self.file().path())?;
        st.l1[idx] = e;
        st.meta_add(new >> self.geo.cluster_bits, Metadata::ActiveL2);
        if old != 0 {
            st.meta_remove(old >> self.geo.cluster_bits, Metadata::ActiveL2);
            // The old table stays with the snapshots that share it.
            self.update_refcount(st, old, -1, false)?;
        }
        Ok(new)
    }

    /// The mapping of the subcluster containing `offset`.
    pub(super) fn granule(&self, st: &mut State, offset: u64, l1_copied: bool) -> Result<Granule> {
        let g = &self.geo;
        let gc = offset >> g.cluster_bits;
        let Some((e, _)) = self.lookup(st, gc)? else {
            let table_end = ((gc / g.l2_entries + 1) * g.l2_entries) << g.cluster_bits;
            return Ok(Granule {
                mapping: Mapping::Unallocated,
                end: table_end,
            });
        };
        self.granule_of(e, offset, l1_copied)
    }

    /// The mapping of the subcluster containing `offset`, whose cluster's L2 entry is `e`.
    pub(super) fn granule_of(&self, e: Entry, offset: u64, l1_copied: bool) -> Result<Granule> {
        let g = &self.geo;
        let gc = offset >> g.cluster_bits;
        let cstart = gc << g.cluster_bits;
        let in_cluster = offset - cstart;
        let sub = in_cluster / g.subcluster_size;
        let send = cstart + (sub + 1) * g.subcluster_size;
        let kind = e.kind_ext(sub, g.extended_l2);
        let bad = || {
            self.err(Error::BadL2Entry {
                entry: e.word,
                guest: cstart,
            })
        };
        let data_host = |h: u64| -> Result<u64> {
            if h % g.cluster_size != 0 {
                return Err(self.err(Error::Misaligned {
                    what: "data cluster",
                    offset: h,
                }));
            }
            Ok(h + in_cluster)
        };
        let mapping = match kind {
            Kind::Normal => Mapping::Data {
                file: self.data,
                offset: HostOffset(data_host(e.host().ok_or_else(bad)?)?),
                writable: self.writable && e.copied() && l1_copied,
            },
            Kind::ZeroAlloc => Mapping::Zero {
                offset: Some((self.data, HostOffset(data_host(e.host().ok_or_else(bad)?)?))),
            },
            Kind::ZeroPlain => Mapping::Zero { offset: None },
            Kind::UnallocPlain => Mapping::Unallocated,
            Kind::UnallocAlloc => Mapping::UnallocatedAt {
                file: self.data,
                offset: HostOffset(data_host(e.host().ok_or_else(bad)?)?),
            },
            Kind::Compressed => {
                if self.data != 0 {
                    return Err(self.err(Error::CompressedWithDataFile));
                }
                let (host, len) = e.compressed(g);
                return Ok(Granule {
                    mapping: Mapping::Compressed(CompressedRef {
                        host: HostOffset(host),
                        len,
                        guest_cluster: cstart,
                    }),
                    end: cstart + g.cluster_size,
                });
            }
            Kind::Invalid => return Err(bad()),
        };
        Ok(Granule { mapping, end: send })
    }

    /// Whether a write to guest cluster `gc` moves it to a new host cluster.
    pub(super) fn replaces_host(&self, st: &mut State, gc: u64) -> Result<bool> {
        Ok(match self.lookup(st, gc)? {
            Some((e, _)) => e.word & COMPRESSED != 0 || (e.host().is_some() && !e.copied()),
            None => false,
        })
    }

    /// The host cluster a write to guest cluster `gc` may reuse.
    pub(super) fn reusable_host(&self, st: &mut State, gc: u64) -> Result<Option<u64>> {
        Ok(match self.lookup(st, gc)? {
            Some((e, l1e)) if e.copied() && l1e & COPIED != 0 => e.host(),
            _ => None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn standard_entry_kinds_follow_flags() {
        let k = |w: u64| Entry { word: w, bitmap: 0 }.kind_ext(0, false);
        assert_eq!(k(0), Kind::UnallocPlain);
        assert_eq!(k(1), Kind::ZeroPlain);
        assert_eq!(k(0x10000 | COPIED), Kind::Normal);
        assert_eq!(k(0x10000 | 1), Kind::ZeroAlloc);
        assert_eq!(k(COMPRESSED | 0x1234), Kind::Compressed);
    }

    #[test]
    fn compressed_descriptor_with_bit_56_survives_decode() {
        // 2 MiB clusters: the sector count occupies bits 49..61, including bit 56.
        let w = 0x4330_0000_00a0_0000;
        let e = Entry::decode(w, 0, true);
        assert_eq!(e.word, w);
        assert_eq!(e.to_bytes(false), w.to_be_bytes().to_vec());
    }

    #[test]
    fn data_file_offset_zero_with_copied_is_data() {
        let e = Entry::decode(COPIED, 0, true);
        assert_eq!(e.host(), Some(0));
        assert_eq!(e.kind_ext(0, false), Kind::Normal);
        assert_eq!(e.to_bytes(false), COPIED.to_be_bytes().to_vec());
        assert_eq!(Entry::decode(COPIED, 0, false).host(), None);
    }

    #[test]
    fn extended_entry_kinds_follow_bitmap() {
        let e = Entry {
            word: 0x10000,
            bitmap: 0b01 | (0b10 << 32),
        };
        assert_eq!(e.kind_ext(0, true), Kind::Normal);
        assert_eq!(e.kind_ext(1, true), Kind::ZeroAlloc);
        assert_eq!(e.kind_ext(2, true), Kind::UnallocAlloc);
        let bad = Entry { word: 0, bitmap: 1 };
        assert_eq!(bad.kind_ext(0, true), Kind::Invalid);
    }
}
