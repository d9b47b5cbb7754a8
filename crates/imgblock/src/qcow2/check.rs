//! `check`: rebuilds the refcounts from the L1/L2 tables, snapshots and metadata, compares them
//! with the refcounts on disk, checks the COPIED flags, and repairs what it is asked to.

use std::collections::HashMap;

use super::l2::Entry;
use super::overlap::Metadata;
use super::{
    be64_at, bitmap, header, snapshot, Qcow2, State, COMPRESSED, COPIED, OFFSET_MASK, ZERO_FLAG,
};
use crate::check::{CheckReport, Repair};
use crate::error::IoContext;
use crate::Result;

/// Most clusters a check tracks (a 4 GiB image of 512-byte clusters); larger files are refused
/// rather than letting a header make us allocate without bound.
pub const MAX_TRACKED_CLUSTERS: u64 = 1 << 23;

/// Distinct snapshot L1 entries gathered before they are walked (memory stays a few MiB,
/// however many snapshots an image has).
const MAX_SHARED_L1_ENTRIES: usize = 1 << 16;

/// Bits of an L1 entry the specification reserves (must be zero): 0-8 and 56-62.
const L1_RESERVED: u64 = 0x7f00_0000_0000_01ff;
/// Bits of a standard (not compressed) L2 entry the specification reserves: 1-8 and 56-61.
const L2_STD_RESERVED: u64 = 0x3f00_0000_0000_01fe;
/// Bits of a refcount table entry the specification reserves: 0-8.
const REFTABLE_RESERVED: u64 = 0x1ff;
/// The "allocated" half of an extended L2 entry's subcluster bitmap.
const SUBCLUSTERS_ALLOCATED: u64 = 0xffff_ffff;

struct Walk<'a> {
    q: &'a Qcow2,
    computed: Vec<u32>,
    r: CheckReport,
    next_contiguous: u64,
    /// Report entries with reserved bits set and counts past `max_refcount` as corruption (what
    /// `img check` does; operations that only count references leave them to it).
    reserved: bool,
    /// The length of the file when the count started.
    file_len: u64,
    /// The largest refcount the image can store.
    max_refcount: u64,
    /// What a check may repair while it walks the tables.
    fix: Repair,
    /// How many references each `inc` adds: the number of snapshot L1 entries that share the
    /// L2 table being walked (1 outside that walk).
    weight: u32,
}

impl Walk<'_> {
    fn cs(&self) -> u64 {
        self.q.geo.cluster_size
    }

    /// Counts one more reference to each cluster of `[off, off + len)`, as qemu counts them: a
    /// range that runs a whole cluster or more past the end of the file is one corruption and
    /// counts nothing; one that ends in the cluster just past the end (the last cluster of an
    /// image may be partly written) is counted. In a check, a count that would pass the
    /// largest refcount the image can store is a corruption instead.
    fn inc(&mut self, off: u64, len: u64, what: &str) {
        if len == 0 {
            return;
        }
        let cs = self.cs();
        let end = off.saturating_add(len);
        if end.saturating_sub(self.file_len) >= cs {
            self.r.corruptions += 1;
            self.r.messages.push(format!(
                "ERROR {what} at offset {off:#x} size {len:#x} runs a cluster or more past the end of the image file"
            ));
            return;
        }
        let first = off / cs;
        let last = (end - 1) / cs;
        for c in first..=last {
            let Ok(i) = usize::try_from(c) else { continue };
            if i >= self.computed.len() {
                // At most one cluster past the end of the file, by the test above.
                self.computed.resize(i + 1, 0);
            }
            let Some(v) = self.computed.get_mut(i) else {
                continue;
            };
            if self.reserved && u64::from(*v) >= self.max_refcount {
                self.r.corruptions += 1;
                self.r
                    .messages
                    .push(format!("ERROR: overflow cluster offset={:#x}", c * cs));
                self.r.messages.push(
                    "Use img amend to increase the refcount entry width or img convert to create \
                     a clean copy if the image cannot be opened for writing"
                        .to_owned(),
                );
                continue;
            }
            *v = v.saturating_add(self.weight);
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
        for (i, &e) in l1.iter().enumerate() {
            self.walk_l1_entry(st, i, e, active);
        }
    }

    /// Walks the gathered snapshot L1 entries, each once with its multiplicity as the weight,
    /// and empties the map.
    fn walk_shared(&mut self, st: &mut State, shared: &mut HashMap<(usize, u64), u32>) {
        for ((i, e), n) in shared.drain() {
            self.weight = n;
            self.walk_l1_entry(st, i, e, false);
        }
        self.weight = 1;
    }

    /// Walks L1 entry `i` (`e`) and the L2 table it points at.
    fn walk_l1_entry(&mut self, st: &mut State, i: usize, e: u64, active: bool) {
        let g = self.q.geo;
        {
            if self.reserved && e & L1_RESERVED != 0 {
                self.r.corruptions += 1;
                self.r.messages.push(format!(
                    "ERROR found L1 entry with reserved bits set: {e:x}"
                ));
            }
            let l2off = e & OFFSET_MASK;
            if l2off == 0 {
                return;
            }
            self.inc(l2off, g.cluster_size, "L2 table");
            if l2off % g.cluster_size != 0 {
                // Reported, and then read where it points all the same, as qemu reads it.
                self.r.corruptions += 1;
                self.r.messages.push(format!(
                    "ERROR l2_offset={l2off:#x}: Table is not cluster aligned; L1 entry corrupted"
                ));
            }
            // Contiguity is counted within one L2 table, as qemu counts it.
            self.next_contiguous = 0;
            let Some(table) = self.read_cluster(st, l2off) else {
                return;
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
                self.l2_entry(st, entry, (l2off, j), guest, active);
            }
        }
    }

    /// Checks and counts one L2 entry (entry `at.1` of the table at `at.0`), as qemu does: a
    /// misaligned host offset is reported and still counted, except that `-r all` turns an
    /// entry that holds no data into a plain zero entry.
    fn l2_entry(&mut self, st: &mut State, e: Entry, at: (u64, u64), guest: u64, active: bool) {
        let g = self.q.geo;
        if e.word & COMPRESSED != 0 {
            if self.reserved && e.word & COPIED != 0 {
                self.r.corruptions += 1;
                self.r.messages.push(format!(
                    "ERROR compressed cluster at guest offset {guest:#x} has the copied flag set: {:x}",
                    e.word
                ));
            }
            if self.q.data != 0 {
                self.r.corruptions += 1;
                self.r.messages.push(format!(
                    "ERROR compressed cluster at guest offset {guest:#x} with a data file"
                ));
                return;
            }
            if g.extended_l2 && e.bitmap != 0 {
                self.r.corruptions += 1;
                self.r.messages.push(format!(
                    "ERROR compressed cluster at guest offset {guest:#x} with a subcluster bitmap: {:x}",
                    e.bitmap
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
        let Some(host) = e.host() else {
            if self.reserved && g.extended_l2 && e.bitmap & SUBCLUSTERS_ALLOCATED != 0 {
                self.r.corruptions += 1;
                self.r.messages.push(format!(
                    "ERROR unallocated cluster at guest offset {guest:#x} has subclusters allocated: {:x}",
                    e.bitmap
                ));
            }
            return;
        };
        if self.reserved
            && g.extended_l2
            && (e.bitmap >> 32) & e.bitmap & SUBCLUSTERS_ALLOCATED != 0
        {
            self.r.corruptions += 1;
            self.r.messages.push(format!(
                "ERROR offset={host:#x}: subclusters both allocated and zero: {:x}",
                e.bitmap
            ));
        }
        if host % g.cluster_size != 0 {
            let data = if g.extended_l2 {
                e.bitmap & SUBCLUSTERS_ALLOCATED != 0
            } else {
                e.word & ZERO_FLAG == 0
            };
            if data {
                self.r.corruptions += 1;
                self.r.messages.push(format!(
                    "ERROR offset={host:#x}: Data cluster is not properly aligned; L2 entry corrupted"
                ));
            } else if self.fix == Repair::All && self.zero_entry(st, e, at) {
                // Nothing of the cluster is read: the entry now reads as zeroes, without it.
                self.r.corruptions_fixed += 1;
                self.r.messages.push(format!(
                    "Repairing offset={host:#x}: Preallocated cluster is not properly aligned; L2 entry corrupted"
                ));
                return;
            } else {
                self.r.corruptions += 1;
                self.r.messages.push(format!(
                    "ERROR offset={host:#x}: Preallocated cluster is not properly aligned; L2 entry corrupted"
                ));
            }
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

    /// Rewrites an L2 entry that holds no data as a plain zero entry (its zero subclusters stay
    /// zero); whether that was done.
    fn zero_entry(&mut self, st: &mut State, e: Entry, (l2off, index): (u64, u64)) -> bool {
        let g = self.q.geo;
        let fixed = if g.extended_l2 {
            Entry {
                word: 0,
                bitmap: (e.bitmap | e.bitmap << 32) & !SUBCLUSTERS_ALLOCATED,
            }
        } else {
            Entry {
                word: ZERO_FLAG,
                bitmap: 0,
            }
        };
        let at = l2off + index * g.l2_entry_size;
        let written = self
            .q
            .check_overlap(st, at >> g.cluster_bits, 1, &[Metadata::ActiveL2])
            .and_then(|()| {
                if l2off % g.cluster_size == 0 {
                    return self.q.set_l2_entry(st, l2off, index, fixed);
                }
                // A table a misaligned L1 entry points at: written where it was read, as qemu
                // writes it; no cached table holds it, but the one it overlaps may.
                st.l2_cache.remove(at & !(g.cluster_size - 1));
                self.q
                    .file()
                    .write_at(&fixed.to_bytes(g.extended_l2), at)
                    .ctx(self.q.file().path())
            });
        if let Err(err) = written {
            self.r.check_errors += 1;
            self.r
                .messages
                .push(format!("ERROR could not write the L2 entry: {err}"));
            return false;
        }
        true
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
    /// Whether the two tables have their places yet: a state being built counts what they
    /// reference before they are placed, and then their offsets are not counted.
    pub placed: bool,
}

/// Counts the references to every cluster of the file from the metadata on disk: the header, L1
/// and L2 tables, snapshots and data; as `img check` counts them when `check` (see
/// [`count_view`]).
pub(super) fn count_references(
    q: &Qcow2,
    st: &mut State,
    check: bool,
) -> Result<(Vec<u32>, CheckReport)> {
    count_fixing(q, st, check, Repair::None)
}

/// [`count_references`], repairing as it goes what `fix` allows of the L2 entries it reads.
fn count_fixing(
    q: &Qcow2,
    st: &mut State,
    check: bool,
    fix: Repair,
) -> Result<(Vec<u32>, CheckReport)> {
    let snaps = snapshot::read_table(q.file(), &st.h).map_err(|e| q.err(e))?;
    let l1 = st.l1.clone();
    let view = View {
        l1_offset: st.h.l1_table_offset,
        l1: &l1,
        snapshots_offset: st.h.snapshots_offset,
        snapshots: &snaps,
        placed: true,
    };
    walk_view(q, st, &view, check, fix)
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
    walk_view(q, st, view, check, Repair::None)
}

fn walk_view(
    q: &Qcow2,
    st: &mut State,
    view: &View<'_>,
    check: bool,
    fix: Repair,
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
        file_len,
        max_refcount: q.max_refcount(),
        fix,
        weight: 1,
    };
    w.r.total_clusters = q.size.div_ceil(cs);
    w.inc(0, cs, "header");
    if view.placed {
        w.inc(view.l1_offset, view.l1.len() as u64 * 8, "L1 table");
    }
    w.walk_l1(st, view.l1, true);
    if q.data != 0 && !view.snapshots.is_empty() {
        // Snapshots cannot keep data that lives in an external file.
        w.r.corruptions += 1;
        w.r.messages.push(format!(
            "ERROR {} snapshots in image with data file",
            view.snapshots.len()
        ));
    }
    // Snapshots mostly share their L2 tables: counting, each distinct L1 entry is walked once
    // with the number of snapshot L1 tables that hold it as its weight, which gives the same
    // counts as walking every snapshot's tables in full.
    let mut shared: HashMap<(usize, u64), u32> = HashMap::new();
    if !view.snapshots.is_empty() {
        if view.placed {
            w.inc(
                view.snapshots_offset,
                snapshot::table_len(view.snapshots),
                "snapshot table",
            );
        }
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
                // A check reports what each reference gets wrong, as qemu does.
                Ok(sl1) if check || fix != Repair::None => w.walk_l1(st, &sl1, false),
                Ok(sl1) => {
                    for (i, e) in sl1.into_iter().enumerate() {
                        if e & OFFSET_MASK != 0 {
                            *shared.entry((i, e)).or_insert(0) += 1;
                        }
                    }
                    if shared.len() > MAX_SHARED_L1_ENTRIES {
                        w.walk_shared(st, &mut shared);
                    }
                }
                Err(_) => w.r.check_errors += 1,
            }
        }
        w.walk_shared(st, &mut shared);
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

/// Counts references as `img check` does: the metadata walk, then the refcount blocks, whose
/// problems may call for new refcount structures (`rebuild`). With [`Repair::All`] a refcount
/// block past the end of the file is repaired, as qemu repairs it, by growing the file over it.
fn calculate(
    q: &Qcow2,
    st: &mut State,
    repair: Repair,
    rebuild: &mut bool,
) -> Result<(Vec<u32>, CheckReport)> {
    let (mut computed, mut r) = count_fixing(q, st, true, repair)?;
    check_refblocks(q, st, repair, &mut computed, &mut r, rebuild)?;
    Ok((computed, r))
}

/// Counts each refcount block, after qemu's check_refblocks: a table entry with reserved bits
/// set, a misaligned block, or a block whose cluster something else uses too leaves only new
/// refcount structures as a repair.
fn check_refblocks(
    q: &Qcow2,
    st: &mut State,
    repair: Repair,
    computed: &mut Vec<u32>,
    r: &mut CheckReport,
    rebuild: &mut bool,
) -> Result<()> {
    let cs = q.geo.cluster_size;
    let bits = q.geo.cluster_bits;
    for (i, &e) in st.reftable.clone().iter().enumerate() {
        if e & REFTABLE_RESERVED != 0 {
            r.corruptions += 1;
            r.messages.push(format!(
                "ERROR refcount table entry {i} has reserved bits set"
            ));
            *rebuild = true;
            continue;
        }
        let off = e & OFFSET_MASK;
        if off % cs != 0 {
            r.corruptions += 1;
            r.messages.push(format!(
                "ERROR refcount block {i} is not cluster aligned; refcount table entry corrupted"
            ));
            *rebuild = true;
            continue;
        }
        let c = off >> bits;
        if c >= computed.len() as u64 {
            r.corruptions += 1;
            let fixing = repair == Repair::All;
            r.messages.push(format!(
                "{} refcount block {i} is outside image",
                if fixing { "Repairing" } else { "ERROR" }
            ));
            if !fixing {
                continue;
            }
            // The block then reads as zeroes, and the rebuild this calls for counts it.
            let len = match c.checked_add(1).filter(|&n| n <= MAX_TRACKED_CLUSTERS) {
                Some(n) => n << bits,
                None => {
                    r.messages
                        .push("ERROR could not resize image: File too large".to_owned());
                    *rebuild = true;
                    continue;
                }
            };
            q.file().set_len(len).ctx(q.file().path())?;
            computed.resize(usize::try_from(c + 1).unwrap_or(0), 0);
            st.end_hint = st.end_hint.max(c + 1);
            r.corruptions -= 1;
            r.corruptions_fixed += 1;
            if let Some(v) = computed.get_mut(usize::try_from(c).unwrap_or(usize::MAX)) {
                *v = v.saturating_add(1);
            }
            continue;
        }
        if off == 0 {
            continue;
        }
        let Some(v) = computed.get_mut(usize::try_from(c).unwrap_or(usize::MAX)) else {
            continue;
        };
        if u64::from(*v) >= q.max_refcount() {
            // Counted as every reference is: past the width, a corruption and not counted.
            r.corruptions += 1;
            r.messages
                .push(format!("ERROR: overflow cluster offset={off:#x}"));
        } else {
            // 64-bit refcounts pass the u32 count: it stays saturated there.
            *v = v.saturating_add(1);
        }
        if *v != 1 {
            r.corruptions += 1;
            r.messages
                .push(format!("ERROR refcount block {i} refcount={}", *v));
            *rebuild = true;
        }
    }
    Ok(())
}

/// Runs the check, repairing what `repair` allows, in qemu's order: count the references,
/// compare them with the refcounts; when the refcount structures themselves are broken, write
/// new ones (`-r all`) or give up (`-r leaks`); otherwise fix the refcounts that may be fixed;
/// then check the COPIED flags.
pub fn check(q: &Qcow2, repair: Repair) -> Result<CheckReport> {
    let path = q.file().path().to_owned();
    let mut st = q.lock();
    q.hold_whole_tables(&mut st)?;
    // Snapshot table entries are checked first and written whole last, as qemu does.
    let snaps = snapshot::read_table(q.file(), &st.h).map_err(|e| q.err(e))?;
    let incomplete = snapshot_entries(&snaps, repair);
    let mut rebuild = false;
    let (mut computed, mut r) = calculate(q, &mut st, repair, &mut rebuild)?;
    let mut messages = crate::check::Messages::default();
    for line in &incomplete {
        messages.push(line.clone());
    }
    messages.extend(std::mem::take(&mut r.messages));
    r.messages = messages;
    let pre_compare = r.clone();
    let mut highest = compare_refcounts(q, &mut st, &computed, Repair::None, &mut r, &mut rebuild)?;
    if rebuild && repair == Repair::All {
        let (corruptions, leaks) = (r.corruptions, r.leaks);
        r.messages.push("Rebuilding refcount structure".to_owned());
        q.rebuild_refcount_structure(&mut st, &mut computed)?;
        r.corruptions = 0;
        r.leaks = 0;
        // The old structures are still counted as in use by the new ones: count again and free
        // them as leaks.
        let mut again = false;
        let (computed, counted) = calculate(q, &mut st, Repair::None, &mut again)?;
        r.corruptions += counted.corruptions;
        r.check_errors += counted.check_errors;
        r.messages.extend(counted.messages);
        let mut fresh = CheckReport::default();
        let mut broken = false;
        highest = compare_refcounts(
            q,
            &mut st,
            &computed,
            Repair::Leaks,
            &mut fresh,
            &mut broken,
        )?;
        r.messages.append(&mut fresh.messages);
        if broken {
            r.messages
                .push("ERROR rebuilt refcount structure is still broken".to_owned());
        }
        r.corruptions_fixed += corruptions.saturating_sub(r.corruptions);
        r.leaks_fixed += leaks.saturating_sub(r.leaks);
        r.leaks += fresh.leaks;
    } else if repair != Repair::None {
        if rebuild {
            r.messages
                .push("ERROR need to rebuild refcount structures".to_owned());
            r.check_errors += 1;
            r.failed = Some("Input/output error".to_owned());
            return Ok(r);
        }
        if r.leaks > 0 || r.corruptions > 0 {
            // Compare again, fixing this time; the messages so far stay.
            let messages = std::mem::take(&mut r.messages);
            r = pre_compare;
            r.messages = messages;
            highest = compare_refcounts(q, &mut st, &computed, repair, &mut r, &mut rebuild)?;
        }
    }
    check_copied(q, &mut st, repair, &mut r)?;
    r.image_end_offset = Some((highest + 1) * q.geo.cluster_size);
    let n = incomplete.len() as u64;
    if n > 0 && repair == Repair::All {
        // Serialising an entry gives it all its extra data.
        q.replace_snapshot_table(&mut st, &snaps)?;
        r.corruptions_fixed += n;
    } else {
        r.corruptions += n;
    }
    if repair != Repair::None {
        let sound = r.check_errors == 0 && r.corruptions == 0;
        if sound {
            mark_clean_and_consistent(q, &mut st)?;
        }
        q.file().flush().ctx(&path)?;
        // Freed leaks (and old refcount structures) go back to the host, as qemu discards
        // what a repair frees; only once the refcounts are sound, so that nothing in use that a
        // wrong refcount calls free is ever discarded.
        if sound && (r.leaks_fixed > 0 || r.corruptions_fixed > 0) {
            q.discard_free_clusters(&mut st)?;
        }
    }
    Ok(r)
}

/// One message for each version 3 snapshot table entry that lacks the extra data the
/// specification requires, which `-r all` repairs by writing the table again.
fn snapshot_entries(snaps: &[snapshot::Snapshot], repair: Repair) -> Vec<String> {
    let word = if repair == Repair::All {
        "Repairing"
    } else {
        "ERROR"
    };
    snaps
        .iter()
        .enumerate()
        .filter(|(_, s)| s.incomplete)
        .map(|(i, _)| format!("{word} snapshot table entry {i} is incomplete"))
        .collect()
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

/// The refcount of cluster `c` on disk; a misaligned refcount block reads as zeroes (the
/// check has reported it and calls for new structures).
fn disk_refcount(q: &Qcow2, st: &mut State, c: u64) -> Result<u64> {
    let bi = usize::try_from(c / q.geo.rb_entries).unwrap_or(usize::MAX);
    let block = st.reftable.get(bi).copied().unwrap_or(0) & OFFSET_MASK;
    if block % q.geo.cluster_size != 0 {
        return Ok(0);
    }
    q.refcount(st, c)
}

/// Compares the counted references of every cluster of the file with its refcount on disk and
/// repairs what `fix` allows: excess refcounts with `-r leaks` and `-r all`, missing ones with
/// `-r all`. A referenced cluster whose refcount is 0 is never fixed alone: it sets `rebuild`.
/// Returns the highest cluster index in use by either count.
fn compare_refcounts(
    q: &Qcow2,
    st: &mut State,
    computed: &[u32],
    fix: Repair,
    r: &mut CheckReport,
    rebuild: &mut bool,
) -> Result<u64> {
    let mut highest = 0;
    for (c, &want) in (0u64..).zip(computed) {
        let want = u64::from(want);
        let on_disk = match disk_refcount(q, st, c) {
            Ok(v) => v,
            Err(e) => {
                r.check_errors += 1;
                r.messages
                    .push(format!("Can't get refcount for cluster {c}: {e}"));
                continue;
            }
        };
        if on_disk > 0 || want > 0 {
            highest = c;
        }
        if on_disk == want {
            continue;
        }
        let fixing = if on_disk == 0 {
            *rebuild = true;
            false
        } else if on_disk > want {
            fix != Repair::None
        } else {
            fix == Repair::All
        };
        let word = if fixing {
            "Repairing"
        } else if on_disk < want {
            "ERROR"
        } else {
            "Leaked"
        };
        r.messages.push(format!(
            "{word} cluster {c} refcount={on_disk} reference={want}"
        ));
        if fixing && q.set_refcount(st, c, want).is_ok() {
            if on_disk > want {
                r.leaks_fixed += 1;
            } else {
                r.corruptions_fixed += 1;
            }
            continue;
        }
        if on_disk < want {
            r.corruptions += 1;
        } else {
            r.leaks += 1;
        }
    }
    Ok(highest)
}

/// The COPIED flag of each active L1 and L2 entry must say whether the refcount is exactly one.
/// `-r all` always repairs it; `-r leaks` only when the refcounts are sound by now (the flags
/// are then derived from accurate counts), as qemu decides.
fn check_copied(q: &Qcow2, st: &mut State, fix: Repair, r: &mut CheckReport) -> Result<()> {
    let g = q.geo;
    let repair = match fix {
        Repair::All => true,
        Repair::Leaks => r.check_errors == 0 && r.corruptions == 0 && r.leaks == 0,
        Repair::None => false,
    };
    let word = if repair { "Repairing" } else { "ERROR" };
    let mut allocated = Vec::new();
    for i in 0..st.l1.len() {
        let e = st.l1[i];
        let l2off = e & OFFSET_MASK;
        if l2off == 0 {
            continue;
        }
        let Ok(rc) = disk_refcount(q, st, l2off >> g.cluster_bits) else {
            continue;
        };
        if (rc == 1) != (e & COPIED != 0) {
            r.corruptions += 1;
            r.messages.push(format!(
                "{word} OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={e:x} refcount={rc}"
            ));
            if repair {
                let fixed = if rc == 1 { e | COPIED } else { e & !COPIED };
                q.file()
                    .write_at(&fixed.to_be_bytes(), st.h.l1_table_offset + i as u64 * 8)
                    .ctx(q.file().path())?;
                st.l1[i] = fixed;
                r.corruptions -= 1;
                r.corruptions_fixed += 1;
            }
        }
        if l2off % g.cluster_size != 0 {
            continue;
        }
        // The table is looked up once and its allocated entries gathered: a lookup per entry
        // was most of check's time on large sparse images. Nothing below changes the table
        // before the repairs at the end.
        allocated.clear();
        let t = q.load_l2(st, l2off)?;
        for j in 0..g.l2_entries {
            let entry = q.entry_in(t, l2off, j)?;
            if let Some(host) = entry.host() {
                allocated.push((j, entry, host));
            }
        }
        let mut dirty = Vec::new();
        for &(j, entry, host) in &allocated {
            let rc = if q.data != 0 {
                1
            } else {
                match disk_refcount(q, st, host >> g.cluster_bits) {
                    Ok(v) => v,
                    Err(_) => continue,
                }
            };
            if (rc == 1) != entry.copied() {
                r.corruptions += 1;
                r.messages.push(format!(
                    "{word} OFLAG_COPIED data cluster: l2_entry={:x} refcount={rc}",
                    entry.stored_word()
                ));
                if repair {
                    let word = if rc == 1 {
                        entry.word | COPIED
                    } else {
                        entry.word & !COPIED
                    };
                    dirty.push((
                        j,
                        Entry {
                            word,
                            bitmap: entry.bitmap,
                        },
                    ));
                }
            }
        }
        if !dirty.is_empty() {
            // The table is written in place, whether or not snapshots share it, as qemu does.
            q.check_overlap(st, l2off >> g.cluster_bits, 1, &[Metadata::ActiveL2])?;
            for &(j, fixed) in &dirty {
                q.set_l2_entry(st, l2off, j, fixed)?;
            }
            r.corruptions -= dirty.len() as u64;
            r.corruptions_fixed += dirty.len() as u64;
        }
    }
    Ok(())
}
