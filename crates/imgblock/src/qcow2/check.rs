//! `check`: rebuilds the refcounts from the L1/L2 tables, snapshots and metadata, compares them
//! with the refcounts on disk, checks the COPIED flags, and repairs what it is asked to.

use super::l2::{Entry, Kind};
use super::{be64_at, bitmap, header, snapshot, Qcow2, State, COMPRESSED, COPIED, OFFSET_MASK};
use crate::check::{CheckReport, Repair};
use crate::error::IoContext;
use crate::Result;

/// Most clusters a check tracks (a 4 GiB image of 512-byte clusters); larger files are refused
/// rather than letting a header make us allocate without bound.
pub const MAX_TRACKED_CLUSTERS: u64 = 1 << 23;

/// Bits of an L1 entry the specification reserves (must be zero): 0-8 and 56-62.
const L1_RESERVED: u64 = 0x7f00_0000_0000_01ff;
/// Bits of a standard (not compressed) L2 entry the specification reserves: 1-8 and 56-61.
const L2_STD_RESERVED: u64 = 0x3f00_0000_0000_01fe;
/// Bits of a refcount table entry the specification reserves: 0-8.
const REFTABLE_RESERVED: u64 = 0x1ff;

struct Walk<'a> {
    q: &'a Qcow2,
    computed: Vec<u32>,
    r: CheckReport,
    next_contiguous: u64,
    /// Report entries with reserved bits set as corruption (what `img check` does; operations
    /// that only count references leave them to it).
    reserved: bool,
}

impl Walk<'_> {
    fn cs(&self) -> u64 {
        self.q.geo.cluster_size
    }

    /// Counts one more reference to each cluster of `[off, off + len)`.
    fn inc(&mut self, off: u64, len: u64, what: &str) {
        if len == 0 {
            return;
        }
        let cs = self.cs();
        let first = off / cs;
        let last = (off + len - 1) / cs;
        for c in first..=last {
            match self
                .computed
                .get_mut(usize::try_from(c).unwrap_or(usize::MAX))
            {
                Some(v) => *v = v.saturating_add(1),
                None => {
                    self.r.corruptions += 1;
                    self.r.messages.push(format!(
                        "ERROR {what} at offset {:#x} is beyond the end of the image file",
                        c * cs
                    ));
                }
            }
        }
    }

    fn read_cluster(&mut self, st: &mut State, off: u64) -> Option<Vec<u8>> {
        let _ = st;
        let mut buf = vec![0u8; usize::try_from(self.cs()).unwrap_or(0)];
        match self.q.file().read_at(&mut buf, off) {
            Ok(()) => Some(buf),
            Err(e) => {
                self.r.check_errors += 1;
                self.r
                    .messages
                    .push(format!("ERROR reading table at {off:#x}: {e}"));
                None
            }
        }
    }

    /// Counts the bitmap directory, the bitmap tables and their data clusters (qemu's
    /// `qcow2_check_bitmaps_refcounts`).
    fn bitmaps(&mut self, b: &bitmap::Loaded) {
        let cs = self.cs();
        self.inc(
            b.ext.directory_offset,
            b.ext.directory_size,
            "bitmap directory",
        );
        for bm in &b.list {
            let table_bytes = u64::from(bm.table_size) * 8;
            self.inc(bm.table_offset, table_bytes, "bitmap table");
            // The table lies inside the file (checked on open), which bounds its size.
            let table =
                match super::read_table(self.q.file(), bm.table_offset, u64::from(bm.table_size)) {
                    Ok(t) => t,
                    Err(e) => {
                        self.r.check_errors += 1;
                        self.r.messages.push(format!(
                            "ERROR reading bitmap table of '{}' at {:#x}: {e}",
                            bm.name, bm.table_offset
                        ));
                        continue;
                    }
                };
            for (i, &e) in table.iter().enumerate() {
                let at = bm.table_offset + i as u64 * 8;
                match bitmap::table_entry(e, at, cs) {
                    Ok(Some(off)) => self.inc(off, cs, "bitmap data cluster"),
                    Ok(None) => {}
                    Err(err) => {
                        self.r.corruptions += 1;
                        self.r
                            .messages
                            .push(format!("ERROR bitmap '{}': {err}", bm.name));
                    }
                }
            }
        }
    }

    /// Walks one L1 table; `active` gathers the allocation statistics.
    fn walk_l1(&mut self, st: &mut State, l1: &[u64], active: bool) {
        let g = self.q.geo;
        for (i, &e) in l1.iter().enumerate() {
            if self.reserved && e & L1_RESERVED != 0 {
                self.r.corruptions += 1;
                self.r.messages.push(format!(
                    "ERROR found L1 entry with reserved bits set: {e:x}"
                ));
            }
            let l2off = e & OFFSET_MASK;
            if l2off == 0 {
                continue;
            }
            if l2off % g.cluster_size != 0 {
                self.r.corruptions += 1;
                self.r.messages.push(format!(
                    "ERROR l2_offset={l2off:#x}: Table is not cluster aligned; L1 entry corrupted"
                ));
                continue;
            }
            self.inc(l2off, g.cluster_size, "L2 table");
            // Contiguity is counted within one L2 table, as qemu counts it.
            self.next_contiguous = 0;
            let Some(table) = self.read_cluster(st, l2off) else {
                continue;
            };
            for j in 0..g.l2_entries {
                let o = usize::try_from(j * g.l2_entry_size).unwrap_or(0);
                let word = be64_at(&table, o);
                let bitmap = if g.extended_l2 {
                    be64_at(&table, o + 8)
                } else {
                    0
                };
                if self.reserved && word & COMPRESSED == 0 && word & L2_STD_RESERVED != 0 {
                    self.r.corruptions += 1;
                    self.r.messages.push(format!(
                        "ERROR found l2 entry with reserved bits set: {word:x}"
                    ));
                }
                let entry = Entry::decode(word, bitmap, self.q.data != 0);
                let guest = ((i as u64) * g.l2_entries + j) << g.cluster_bits;
                self.l2_entry(entry, guest, active);
            }
        }
    }

    fn l2_entry(&mut self, e: Entry, guest: u64, active: bool) {
        let g = self.q.geo;
        if e.word & COMPRESSED != 0 {
            if self.q.data != 0 {
                self.r.corruptions += 1;
                self.r.messages.push(format!(
                    "ERROR compressed cluster at guest offset {guest:#x} with a data file"
                ));
                return;
            }
            let (host, len) = e.compressed(&g);
            self.inc(
                host & !(g.cluster_size - 1),
                (host & (g.cluster_size - 1)) + len.max(1),
                "compressed cluster",
            );
            if active {
                self.r.allocated_clusters += 1;
                self.r.compressed_clusters += 1;
                self.r.fragmented_clusters += 1;
            }
            return;
        }
        if g.extended_l2 {
            for sub in 0..32 {
                if e.kind_ext(sub, true) == Kind::Invalid {
                    self.r.corruptions += 1;
                    self.r.messages.push(format!(
                        "ERROR invalid cluster entry found (L2 offset: {guest:#x}, L2 index: {sub:#x})"
                    ));
                    return;
                }
            }
        }
        let Some(host) = e.host() else { return };
        if host % g.cluster_size != 0 {
            self.r.corruptions += 1;
            self.r.messages.push(format!(
                "ERROR offset={host:#x}: Cluster is not properly aligned; L2 entry corrupted"
            ));
            return;
        }
        if active {
            self.r.allocated_clusters += 1;
            if self.next_contiguous != 0 && host != self.next_contiguous {
                self.r.fragmented_clusters += 1;
            }
            self.next_contiguous = host + g.cluster_size;
        }
        if self.q.data == 0 {
            self.inc(host, g.cluster_size, "data cluster");
        }
    }
}

/// The metadata of an image state: the active L1 table and the snapshot table. It may describe
/// the state on disk, or one being built that the header does not point at yet.
pub(super) struct View<'a> {
    /// Where the active L1 table lies, and its entries.
    pub l1_offset: u64,
    pub l1: &'a [u64],
    /// Where the snapshot table lies, and its entries.
    pub snapshots_offset: u64,
    pub snapshots: &'a [snapshot::Snapshot],
}

/// Counts the references to every cluster of the file from the metadata on disk: the header, L1
/// and L2 tables, snapshots and data; as `img check` counts them when `check` (see
/// [`count_view`]).
pub(super) fn count_references(
    q: &Qcow2,
    st: &mut State,
    check: bool,
) -> Result<(Vec<u32>, CheckReport)> {
    let snaps = snapshot::read_table(q.file(), &st.h).map_err(|e| q.err(e))?;
    let l1 = st.l1.clone();
    let view = View {
        l1_offset: st.h.l1_table_offset,
        l1: &l1,
        snapshots_offset: st.h.snapshots_offset,
        snapshots: &snaps,
    };
    count_view(q, st, &view, check)
}

/// Counts the references to every cluster of the file from a state's metadata: the header,
/// L1 and L2 tables, snapshots, data, the crypto header. When `check`, also the refcount
/// structures on disk, and table entries with reserved bits set count as corruption.
pub(super) fn count_view(
    q: &Qcow2,
    st: &mut State,
    view: &View<'_>,
    check: bool,
) -> Result<(Vec<u32>, CheckReport)> {
    let g = q.geo;
    let cs = g.cluster_size;
    let file_len = q.file().size().ctx(q.file().path())?;
    let nclusters = file_len.div_ceil(cs);
    if nclusters > MAX_TRACKED_CLUSTERS {
        return Err(q.err(super::Error::FileTooLarge));
    }
    let mut w = Walk {
        q,
        computed: vec![0; usize::try_from(nclusters).unwrap_or(0)],
        r: CheckReport::default(),
        next_contiguous: 0,
        reserved: check,
    };
    w.r.total_clusters = q.size.div_ceil(cs);
    w.inc(0, cs, "header");
    w.inc(view.l1_offset, view.l1.len() as u64 * 8, "L1 table");
    w.walk_l1(st, view.l1, true);
    if q.data != 0 && !view.snapshots.is_empty() {
        // Snapshots cannot keep data that lives in an external file.
        w.r.corruptions += 1;
        w.r.messages.push(format!(
            "ERROR {} snapshots in image with data file",
            view.snapshots.len()
        ));
    }
    if !view.snapshots.is_empty() {
        w.inc(
            view.snapshots_offset,
            snapshot::table_len(view.snapshots),
            "snapshot table",
        );
        for s in view.snapshots {
            if s.l1_offset % cs != 0 || u64::from(s.l1_size) * 8 > super::MAX_L1_BYTES {
                w.r.corruptions += 1;
                w.r.messages.push(format!(
                    "ERROR snapshot {} ({}) has an invalid L1 table",
                    s.id, s.name
                ));
                continue;
            }
            w.inc(s.l1_offset, u64::from(s.l1_size) * 8, "snapshot L1 table");
            match super::read_table(q.file(), s.l1_offset, u64::from(s.l1_size)) {
                Ok(sl1) => w.walk_l1(st, &sl1, false),
                Err(_) => w.r.check_errors += 1,
            }
        }
    }
    if let Some((off, len)) = q.crypt.header_area() {
        w.inc(off, len, "crypto header");
    }
    if let Some(bitmaps) = &st.bitmaps {
        w.bitmaps(bitmaps);
    }
    if check {
        w.inc(
            st.h.refcount_table_offset,
            u64::from(st.h.refcount_table_clusters) * cs,
            "refcount table",
        );
        for (i, &e) in st.reftable.clone().iter().enumerate() {
            if e & REFTABLE_RESERVED != 0 {
                w.r.corruptions += 1;
                w.r.messages.push(format!(
                    "ERROR refcount table entry {i} has reserved bits set"
                ));
                continue;
            }
            let off = e & OFFSET_MASK;
            if off == 0 {
                continue;
            }
            if off % cs != 0 {
                w.r.corruptions += 1;
                w.r.messages.push(format!("ERROR refcount block {i} is not cluster aligned; refcount table entry corrupted"));
                continue;
            }
            w.inc(off, cs, "refcount block");
        }
    }
    let Walk {
        computed, mut r, ..
    } = w;
    r.image_end_offset = Some(
        computed
            .iter()
            .rposition(|&c| c > 0)
            .map_or(cs, |last| (last as u64 + 1) * cs),
    );
    Ok((computed, r))
}

/// Runs the check; see the module docs.
pub fn check(q: &Qcow2, repair: Repair) -> Result<CheckReport> {
    let path = q.file().path().to_owned();
    let mut st = q.lock();
    let (computed, mut r) = count_references(q, &mut st, true)?;
    let reftable = st.reftable.clone();
    compare_refcounts(q, &mut st, &computed, &reftable, repair, &mut r)?;
    check_copied(q, &mut st, repair, &mut r)?;
    if repair != Repair::None {
        if r.check_errors == 0 && r.corruptions == 0 {
            mark_clean_and_consistent(q, &mut st)?;
        }
        q.file().flush().ctx(&path)?;
    }
    Ok(r)
}

/// After a repair that left no corruption, clears the dirty and corrupt bits, as qemu does.
fn mark_clean_and_consistent(q: &Qcow2, st: &mut State) -> Result<()> {
    let bits = header::INCOMPAT_DIRTY | header::INCOMPAT_CORRUPT;
    if st.h.incompatible & bits == 0 {
        return Ok(());
    }
    // Everything the repair wrote is on disk before the header says the image is sound.
    q.file().flush().ctx(q.file().path())?;
    st.h.incompatible &= !bits;
    q.file()
        .write_at(
            &st.h.incompatible.to_be_bytes(),
            header::INCOMPATIBLE_OFFSET,
        )
        .ctx(q.file().path())
}

fn compare_refcounts(
    q: &Qcow2,
    st: &mut State,
    computed: &[u32],
    reftable: &[u64],
    repair: Repair,
    r: &mut CheckReport,
) -> Result<()> {
    let g = q.geo;
    // Like qemu, only clusters inside the file are compared: refcounts past its end are not leaks
    // that anything could reuse.
    let limit = computed.len() as u64;
    if repair == Repair::All {
        // Blocks allocated while repairing go past everything the walk saw in use.
        st.free_hint = st.free_hint.max(computed.len() as u64);
        st.end_hint = st.end_hint.max(computed.len() as u64);
    }
    let mut c = 0u64;
    while c < limit {
        let bi = c / g.rb_entries;
        let block = reftable
            .get(usize::try_from(bi).unwrap_or(usize::MAX))
            .copied()
            .unwrap_or(0)
            & OFFSET_MASK;
        if block == 0 && c >= computed.len() as u64 {
            c = (bi + 1) * g.rb_entries;
            continue;
        }
        let on_disk = if block == 0 || block % g.cluster_size != 0 {
            0
        } else {
            q.refcount(st, c)?
        };
        let want = u64::from(
            computed
                .get(usize::try_from(c).unwrap_or(usize::MAX))
                .copied()
                .unwrap_or(0),
        );
        if on_disk > 0 || want > 0 {
            // Like qemu, the end offset counts leaked clusters too.
            let end = (c + 1) * g.cluster_size;
            r.image_end_offset = Some(r.image_end_offset.map_or(end, |e| e.max(end)));
        }
        if on_disk != want {
            let fix = (on_disk > want && repair != Repair::None)
                || (on_disk < want && repair == Repair::All);
            if fix {
                if on_disk == 0 {
                    q.ensure_refblocks(st, c, 1)?;
                }
                q.set_refcount(st, c, want)?;
                r.messages.push(format!(
                    "Repairing cluster {c} refcount={on_disk} reference={want}"
                ));
                if on_disk > want {
                    r.leaks_fixed += 1;
                } else {
                    r.corruptions_fixed += 1;
                }
            } else if on_disk < want {
                r.corruptions += 1;
                r.messages.push(format!(
                    "ERROR cluster {c} refcount={on_disk} reference={want}"
                ));
            } else {
                r.leaks += 1;
                r.messages.push(format!(
                    "Leaked cluster {c} refcount={on_disk} reference={want}"
                ));
            }
        }
        c += 1;
    }
    Ok(())
}

/// The COPIED flag of each active L1 and L2 entry must say whether the refcount is exactly one.
fn check_copied(q: &Qcow2, st: &mut State, repair: Repair, r: &mut CheckReport) -> Result<()> {
    let g = q.geo;
    for i in 0..st.l1.len() {
        let e = st.l1[i];
        let l2off = e & OFFSET_MASK;
        if l2off == 0 || l2off % g.cluster_size != 0 {
            continue;
        }
        let rc = q.refcount(st, l2off >> g.cluster_bits)?;
        if (rc == 1) != (e & COPIED != 0) {
            if repair == Repair::All {
                let fixed = if rc == 1 { e | COPIED } else { e & !COPIED };
                q.file()
                    .write_at(&fixed.to_be_bytes(), st.h.l1_table_offset + i as u64 * 8)
                    .ctx(q.file().path())?;
                st.l1[i] = fixed;
                r.corruptions_fixed += 1;
            } else {
                r.corruptions += 1;
                r.messages.push(format!(
                    "ERROR OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={e:x} refcount={rc}"
                ));
            }
        }
        for j in 0..g.l2_entries {
            let entry = q.l2_entry(st, l2off, j)?;
            let Some(host) = entry.host() else { continue };
            if q.data != 0 || host % g.cluster_size != 0 {
                continue;
            }
            let rc = q.refcount(st, host >> g.cluster_bits)?;
            if (rc == 1) != entry.copied() {
                if repair == Repair::All {
                    let word = if rc == 1 {
                        entry.word | COPIED
                    } else {
                        entry.word & !COPIED
                    };
                    // Write through the table only when this L2 table is not shared.
                    if st.l1[i] & COPIED != 0 {
                        q.set_l2_entry(
                            st,
                            l2off,
                            j,
                            Entry {
                                word,
                                bitmap: entry.bitmap,
                            },
                        )?;
                        r.corruptions_fixed += 1;
                        continue;
                    }
                }
                r.corruptions += 1;
                r.messages.push(format!(
                    "ERROR OFLAG_COPIED data cluster: l2_entry={:x} refcount={rc}",
                    entry.word
                ));
            }
        }
    }
    Ok(())
}
