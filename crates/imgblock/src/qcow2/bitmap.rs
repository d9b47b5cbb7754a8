//! Persistent dirty bitmaps (qcow2.rst, "Bitmaps extension", "Bitmap directory", "Bitmap
//! table"): the header extension, the directory, and the tables of the bitmaps that track which
//! guest ranges changed since a backup.
//!
//! ```text
//!  header extension --> bitmap directory --> one bitmap table per bitmap --> data clusters
//!  (count, where)       (name, flags,        (one entry per cluster of     (one bit per
//!                        granularity, table)  bits; 0 = clean, 1 = dirty)   granule, LSB first)
//! ```

use super::{header, Error, Header, Qcow2};
use crate::error::IoContext;
use crate::storage::Storage;
use crate::Result;

/// Length of the bitmaps extension payload.
pub const EXT_LEN: usize = 24;
/// Most bitmaps an image may hold (qemu's limit, QCOW2_MAX_BITMAPS).
pub const MAX_BITMAPS: u32 = 65535;
/// Largest bitmap directory the spec allows (64 MiB), so that it can be read in one piece.
pub const MAX_DIRECTORY_BYTES: u64 = 64 << 20;
/// Longest bitmap name (qemu's BME_MAX_NAME_SIZE).
pub const MAX_NAME_LEN: u16 = 1023;
/// Smallest granularity qemu supports (512 bytes).
pub const MIN_GRANULARITY_BITS: u8 = 9;
/// Largest granularity qemu supports (2 GiB).
pub const MAX_GRANULARITY_BITS: u8 = 31;
/// Most entries of one bitmap table (qemu's BME_MAX_TABLE_SIZE: a 1 GiB table).
pub const MAX_TABLE_ENTRIES: u32 = 0x0800_0000;
/// Largest bitmap qemu loads, as its table's entries times the cluster size (qemu's
/// BME_MAX_PHYS_SIZE, which bounds the bitmap in memory): 512 MiB, so 8192 entries with
/// 64 KiB clusters. A larger table is refused when the directory is read.
pub const MAX_PHYS_BYTES: u64 = 0x2000_0000;
/// Directory entry bytes before the extra data and the name.
pub const ENTRY_FIXED_LEN: usize = 24;

/// Flag: the bitmap was in use (open read-write) and not stored back: its bits cannot be trusted.
pub const FLAG_IN_USE: u32 = 1 << 0;
/// Flag: the bitmap tracks every write (it is enabled).
pub const FLAG_AUTO: u32 = 1 << 1;
/// Flag: unknown extra data may be ignored.
pub const FLAG_EXTRA_DATA_COMPATIBLE: u32 = 1 << 2;
/// Every flag the spec defines.
pub const FLAGS_KNOWN: u32 = FLAG_IN_USE | FLAG_AUTO | FLAG_EXTRA_DATA_COMPATIBLE;
/// The only bitmap type: dirty tracking.
pub const TYPE_DIRTY_TRACKING: u8 = 1;

/// Table entry bits 9..=55: the offset of a data cluster.
pub const TABLE_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Table entry with no offset and bit 0 set: every bit of the cluster is one.
pub const TABLE_ALL_ONES: u64 = 1;
/// Table entry bits that must be zero.
pub const TABLE_RESERVED_MASK: u64 = 0xff00_0000_0000_01fe;
/// Most bits of the in-memory record of what was written while the image is open (32 MiB).
/// Past it one bit stands for more than a bitmap granule, which only marks more as dirty than
/// was written (allowed: a dirty bit means "may have changed").
pub const MAX_TRACKED_BITS: u64 = 1 << 28;

fn be16(b: &[u8], off: usize) -> u16 {
    u16::from_be_bytes([b[off], b[off + 1]])
}

fn be32(b: &[u8], off: usize) -> u32 {
    u32::from_be_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

fn be64(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_be_bytes(a)
}

/// The raw bitmaps header extension, as on disk (all big-endian).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawExtension {
    /// Number of bitmaps in the directory.
    pub nb_bitmaps: u32,
    /// Reserved, must be zero.
    pub reserved: u32,
    /// Bytes of the directory.
    pub directory_size: u64,
    /// Where the directory lies in the image file.
    pub directory_offset: u64,
}

impl RawExtension {
    /// Reads the extension payload; `None` when it is not 24 bytes.
    pub fn from_bytes(b: &[u8]) -> Option<RawExtension> {
        if b.len() != EXT_LEN {
            return None;
        }
        Some(RawExtension {
            nb_bitmaps: be32(b, 0),
            reserved: be32(b, 4),
            directory_size: be64(b, 8),
            directory_offset: be64(b, 16),
        })
    }

    /// The payload bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(EXT_LEN);
        v.extend_from_slice(&self.nb_bitmaps.to_be_bytes());
        v.extend_from_slice(&self.reserved.to_be_bytes());
        v.extend_from_slice(&self.directory_size.to_be_bytes());
        v.extend_from_slice(&self.directory_offset.to_be_bytes());
        v
    }

    /// Validates the extension against the cluster size and the file length.
    ///
    /// # Errors
    /// [`Error::BadBitmapExtension`] naming the field found wrong.
    pub fn validate(&self, cluster_size: u64, file_len: u64) -> Result<Extension, Error> {
        let bad = |what| Err(Error::BadBitmapExtension(what));
        if self.nb_bitmaps == 0 {
            return bad("no bitmaps");
        }
        if self.nb_bitmaps > MAX_BITMAPS {
            return bad("too many bitmaps");
        }
        if self.reserved != 0 {
            return bad("reserved field is not zero");
        }
        if self.directory_size > MAX_DIRECTORY_BYTES {
            return bad("directory too large");
        }
        let min = u64::from(self.nb_bitmaps) * ENTRY_FIXED_LEN as u64;
        if self.directory_size < min {
            return bad("directory too small for its bitmaps");
        }
        if self.directory_offset == 0 || self.directory_offset % cluster_size != 0 {
            return bad("directory offset not cluster aligned");
        }
        if self
            .directory_offset
            .checked_add(self.directory_size)
            .is_none_or(|e| e > file_len)
        {
            return bad("directory outside the image file");
        }
        Ok(Extension {
            nb_bitmaps: self.nb_bitmaps,
            directory_size: self.directory_size,
            directory_offset: self.directory_offset,
        })
    }
}

/// A validated bitmaps extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extension {
    /// Number of bitmaps, 1..=[`MAX_BITMAPS`].
    pub nb_bitmaps: u32,
    /// Directory bytes, at most [`MAX_DIRECTORY_BYTES`].
    pub directory_size: u64,
    /// Cluster-aligned directory offset, inside the file.
    pub directory_offset: u64,
}

/// A validated bitmap directory entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bitmap {
    /// Cluster-aligned offset of the bitmap table.
    pub table_offset: u64,
    /// Entries of the bitmap table.
    pub table_size: u32,
    /// [`FLAG_IN_USE`], [`FLAG_AUTO`], [`FLAG_EXTRA_DATA_COMPATIBLE`].
    pub flags: u32,
    /// log2 of the bytes of guest data one bit covers.
    pub granularity_bits: u8,
    /// The bitmap's name (unique in the image).
    pub name: String,
    /// Extra data, kept as is.
    pub extra_data: Vec<u8>,
    /// Where this entry lies, from the start of the directory.
    pub entry_offset: u64,
}

impl Bitmap {
    /// Bytes of guest data one bit covers.
    pub fn granularity(&self) -> u64 {
        1 << self.granularity_bits
    }

    /// Whether the bitmap tracks writes (enabled, and not already inconsistent).
    pub fn tracks_writes(&self) -> bool {
        self.flags & FLAG_AUTO != 0 && self.flags & FLAG_IN_USE == 0
    }

    /// Bytes of this entry in the directory, padding included.
    pub fn entry_len(&self) -> usize {
        (ENTRY_FIXED_LEN + self.extra_data.len() + self.name.len()).div_ceil(8) * 8
    }

    /// Serialises the entry (padded to 8 bytes).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(self.entry_len());
        v.extend_from_slice(&self.table_offset.to_be_bytes());
        v.extend_from_slice(&self.table_size.to_be_bytes());
        v.extend_from_slice(&self.flags.to_be_bytes());
        v.push(TYPE_DIRTY_TRACKING);
        v.push(self.granularity_bits);
        // Lengths were checked on parse (name <= 1023 bytes, extra data inside the directory).
        v.extend_from_slice(&u16::try_from(self.name.len()).unwrap_or(0).to_be_bytes());
        v.extend_from_slice(
            &u32::try_from(self.extra_data.len())
                .unwrap_or(0)
                .to_be_bytes(),
        );
        v.extend_from_slice(&self.extra_data);
        v.extend_from_slice(self.name.as_bytes());
        v.resize(self.entry_len(), 0);
        v
    }
}

/// Bits of a bitmap of `granularity_bits` over a `size`-byte disk.
pub fn bit_count(size: u64, granularity_bits: u8) -> u64 {
    size.div_ceil(1u64 << granularity_bits)
}

/// Entries of the bitmap table of a bitmap of `granularity_bits` over a `size`-byte disk, as
/// qemu sizes it: one entry per cluster of bits.
pub fn table_entries(size: u64, granularity_bits: u8, cluster_size: u64) -> u64 {
    bit_count(size, granularity_bits)
        .div_ceil(8)
        .div_ceil(cluster_size)
}

/// Parses and validates the directory `buf` (read at `ext.directory_offset`) of an image of
/// `size` bytes with `cluster_size` clusters in a file of `file_len` bytes.
///
/// # Errors
/// [`Error::BadBitmapDirectory`] with the file offset of the first entry found wrong.
pub fn parse_directory(
    buf: &[u8],
    ext: &Extension,
    size: u64,
    cluster_size: u64,
    file_len: u64,
) -> Result<Vec<Bitmap>, Error> {
    let mut out = Vec::new();
    let mut names = std::collections::HashSet::new();
    let mut pos = 0usize;
    for _ in 0..ext.nb_bitmaps {
        let at = ext.directory_offset + pos as u64;
        let bad = |reason| Error::BadBitmapDirectory { offset: at, reason };
        let fixed = buf
            .get(pos..pos + ENTRY_FIXED_LEN)
            .ok_or(bad("entry runs past the directory end"))?;
        let table_offset = be64(fixed, 0);
        let table_size = be32(fixed, 8);
        let flags = be32(fixed, 12);
        let kind = fixed[16];
        let granularity_bits = fixed[17];
        let name_len = be16(fixed, 18);
        let extra_len = be32(fixed, 20);
        if kind != TYPE_DIRTY_TRACKING {
            return Err(bad("unknown bitmap type"));
        }
        if flags & !FLAGS_KNOWN != 0 {
            return Err(bad("reserved flags set"));
        }
        if !(MIN_GRANULARITY_BITS..=MAX_GRANULARITY_BITS).contains(&granularity_bits) {
            return Err(bad("unsupported granularity"));
        }
        if name_len == 0 || name_len > MAX_NAME_LEN {
            return Err(bad("bad name length"));
        }
        if extra_len != 0 && flags & FLAG_EXTRA_DATA_COMPATIBLE == 0 {
            return Err(bad("incompatible extra data"));
        }
        if table_size > MAX_TABLE_ENTRIES || u64::from(table_size) * cluster_size > MAX_PHYS_BYTES {
            return Err(bad("bitmap table too large"));
        }
        // qemu reads a bitmap only when its table covers exactly the disk; one in use is not
        // read (its bits are void), so its table may still have another size.
        if flags & FLAG_IN_USE == 0
            && u64::from(table_size) != table_entries(size, granularity_bits, cluster_size)
        {
            return Err(bad("bitmap table size does not match the disk size"));
        }
        if table_size == 0 {
            return Err(bad("empty bitmap table"));
        }
        if table_offset == 0 || table_offset % cluster_size != 0 {
            return Err(bad("bitmap table not cluster aligned"));
        }
        if table_offset
            .checked_add(u64::from(table_size) * 8)
            .is_none_or(|e| e > file_len)
        {
            return Err(bad("bitmap table outside the image file"));
        }
        let extra_start = pos + ENTRY_FIXED_LEN;
        let extra_end = extra_start
            .checked_add(usize::try_from(extra_len).unwrap_or(usize::MAX))
            .filter(|&e| e <= buf.len())
            .ok_or(bad("extra data runs past the directory end"))?;
        let name_end = extra_end + usize::from(name_len);
        let name_bytes = buf
            .get(extra_end..name_end)
            .ok_or(bad("name runs past the directory end"))?;
        let name = std::str::from_utf8(name_bytes).map_err(|_| bad("name is not UTF-8"))?;
        // A set, not a scan of the entries so far: 65535 names of 1023 bytes that differ only
        // at their ends would take minutes to compare pairwise.
        if !names.insert(name) {
            return Err(bad("duplicate bitmap name"));
        }
        let name = name.to_owned();
        out.push(Bitmap {
            table_offset,
            table_size,
            flags,
            granularity_bits,
            name,
            extra_data: buf[extra_start..extra_end].to_vec(),
            entry_offset: pos as u64,
        });
        pos = name_end.div_ceil(8) * 8;
        if pos > buf.len() {
            return Err(bad("entry padding runs past the directory end"));
        }
    }
    if pos as u64 != ext.directory_size {
        return Err(Error::BadBitmapDirectory {
            offset: ext.directory_offset + pos as u64,
            reason: "directory size does not match its entries",
        });
    }
    Ok(out)
}

/// Checks one bitmap table entry read at `at`; returns the data cluster offset it names, if any.
///
/// # Errors
/// [`Error::BadBitmapTable`] for reserved bits or a misaligned offset.
pub fn table_entry(e: u64, at: u64, cluster_size: u64) -> Result<Option<u64>, Error> {
    let bad = |reason| Error::BadBitmapTable { offset: at, reason };
    if e & TABLE_RESERVED_MASK != 0 {
        return Err(bad("reserved bits set"));
    }
    let off = e & TABLE_OFFSET_MASK;
    if off == 0 {
        return Ok(None);
    }
    if e & TABLE_ALL_ONES != 0 {
        return Err(bad("all-ones flag with an offset"));
    }
    if off % cluster_size != 0 {
        return Err(bad("data cluster not aligned"));
    }
    Ok(Some(off))
}

/// The bitmaps of an open image, and what was written since they were last stored.
#[derive(Debug, Clone)]
pub(crate) struct Loaded {
    /// The extension they were read from.
    pub ext: Extension,
    /// The directory entries, in directory order, with their flags as they are when stored
    /// (without the in-use flag that marks them while writes are pending).
    pub list: Vec<Bitmap>,
    /// Whether the enabled bitmaps are marked in use on disk, with writes not yet stored.
    pub in_use_on_disk: bool,
    /// Guest ranges written since the bitmaps were last stored.
    pub written: Option<Written>,
}

/// Which guest ranges were written: one bit per `1 << shift` bytes.
#[derive(Debug, Clone)]
pub(crate) struct Written {
    shift: u32,
    count: u64,
    words: Vec<u64>,
}

impl Written {
    /// A record for a `size`-byte disk, at `granularity_bits` or coarser (see
    /// [`MAX_TRACKED_BITS`]).
    fn new(size: u64, granularity_bits: u8) -> Written {
        let mut shift = u32::from(granularity_bits);
        while size.div_ceil(1u64 << shift) > MAX_TRACKED_BITS {
            shift += 1;
        }
        let count = size.div_ceil(1u64 << shift);
        Written {
            shift,
            count,
            // At most MAX_TRACKED_BITS / 64 words.
            words: vec![0; usize::try_from(count.div_ceil(64)).unwrap_or(0)],
        }
    }

    fn mark(&mut self, offset: u64, len: u64) {
        if len == 0 || self.count == 0 {
            return;
        }
        let first = offset >> self.shift;
        let last = ((offset.saturating_add(len - 1)) >> self.shift).min(self.count - 1);
        let mut i = first;
        while i <= last {
            let w = usize::try_from(i / 64).unwrap_or(usize::MAX);
            let Some(word) = self.words.get_mut(w) else {
                return;
            };
            if i % 64 == 0 && last - i >= 63 {
                *word = u64::MAX;
                i += 64;
            } else {
                *word |= 1 << (i % 64);
                i += 1;
            }
        }
    }

    /// The written ranges in guest bytes, in order, each `[start, end)`.
    fn runs(&self) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        for (wi, &word) in self.words.iter().enumerate() {
            if word == 0 {
                continue;
            }
            for b in 0..64u64 {
                if word & (1 << b) == 0 {
                    continue;
                }
                let i = wi as u64 * 64 + b;
                let (s, e) = (i << self.shift, (i + 1) << self.shift);
                match out.last_mut() {
                    Some(last) if last.1 == s => last.1 = e,
                    _ => out.push((s, e)),
                }
            }
        }
        out
    }
}

impl Qcow2 {
    fn flags_at(b: &Loaded, bm: &Bitmap) -> u64 {
        b.ext.directory_offset + bm.entry_offset + 12
    }

    /// Records that a guest range is about to be written. The first write marks every enabled
    /// bitmap in use on disk (as qemu does while it has an image open), so that if the bits
    /// never get stored the bitmaps read as inconsistent rather than silently stale.
    ///
    /// # Errors
    /// When the directory cannot be written.
    pub(super) fn note_bitmap_write(&self, offset: u64, len: u64) -> Result<()> {
        if !self
            .tracks_bitmaps
            .load(std::sync::atomic::Ordering::Relaxed)
            || !self.writable
        {
            return Ok(());
        }
        let mut st = self.lock();
        let Some(b) = st.bitmaps.as_mut() else {
            return Ok(());
        };
        let Some(finest) = b
            .list
            .iter()
            .filter(|bm| bm.tracks_writes())
            .map(|bm| bm.granularity_bits)
            .min()
        else {
            return Ok(());
        };
        if !b.in_use_on_disk {
            let f = self.file();
            for bm in b.list.iter().filter(|bm| bm.tracks_writes()) {
                f.write_at(
                    &(bm.flags | FLAG_IN_USE).to_be_bytes(),
                    Self::flags_at(b, bm),
                )
                .ctx(f.path())?;
            }
            f.flush().ctx(f.path())?;
            b.in_use_on_disk = true;
        }
        let size = self.size;
        b.written
            .get_or_insert_with(|| Written::new(size, finest))
            .mark(offset, len);
        Ok(())
    }

    /// Stores the bits of what was written into every enabled bitmap and clears their in-use
    /// flags. On failure the flags stay set: qemu then treats the bitmaps as inconsistent.
    ///
    /// # Errors
    /// When a bitmap table is corrupt or I/O fails.
    pub(super) fn store_bitmaps(&self) -> Result<()> {
        let mut st = self.lock();
        let Some(b) = st.bitmaps.as_mut() else {
            return Ok(());
        };
        if !b.in_use_on_disk {
            return Ok(());
        }
        let written = b.written.take();
        let b = b.clone();
        if let Some(w) = &written {
            let runs = w.runs();
            for bm in b.list.iter().filter(|bm| bm.tracks_writes()) {
                self.store_bits(&mut st, bm, &runs)?;
            }
        }
        let f = self.file();
        f.flush().ctx(f.path())?;
        for bm in b.list.iter().filter(|bm| bm.tracks_writes()) {
            f.write_at(&bm.flags.to_be_bytes(), Self::flags_at(&b, bm))
                .ctx(f.path())?;
        }
        f.flush().ctx(f.path())?;
        if let Some(l) = st.bitmaps.as_mut() {
            l.in_use_on_disk = false;
        }
        Ok(())
    }

    /// Sets the bits of `runs` (guest byte ranges) in one bitmap: new data clusters are counted,
    /// then written, then entered in the table.
    fn store_bits(&self, st: &mut super::State, bm: &Bitmap, runs: &[(u64, u64)]) -> Result<()> {
        let cs = self.geo.cluster_size;
        let bits_per_cluster = cs * 8;
        let nbits = bit_count(self.size, bm.granularity_bits);
        let gran = bm.granularity();
        let mut current: Option<(u64, Vec<u8>)> = None;
        for &(s, e) in runs {
            let first = s / gran;
            let end = e.div_ceil(gran).min(nbits);
            let mut i = first;
            while i < end {
                let entry = i / bits_per_cluster;
                if current.as_ref().is_none_or(|c| c.0 != entry) {
                    if let Some((ei, buf)) = current.take() {
                        self.store_bitmap_cluster(st, bm, ei, &buf)?;
                    }
                    current = Some((entry, vec![0u8; usize::try_from(cs).unwrap_or(0)]));
                }
                let stop = end.min((entry + 1) * bits_per_cluster);
                if let Some((_, buf)) = current.as_mut() {
                    for bit in i..stop {
                        let k = bit - entry * bits_per_cluster;
                        if let Some(byte) =
                            buf.get_mut(usize::try_from(k / 8).unwrap_or(usize::MAX))
                        {
                            *byte |= 1 << (k % 8);
                        }
                    }
                }
                i = stop;
            }
        }
        if let Some((ei, buf)) = current.take() {
            self.store_bitmap_cluster(st, bm, ei, &buf)?;
        }
        Ok(())
    }

    /// ORs `bits` into the data cluster of table entry `index`, allocating it if the entry says
    /// "all clean".
    fn store_bitmap_cluster(
        &self,
        st: &mut super::State,
        bm: &Bitmap,
        index: u64,
        bits: &[u8],
    ) -> Result<()> {
        let f = self.file();
        let cs = self.geo.cluster_size;
        let at = bm.table_offset + index * 8;
        if index >= u64::from(bm.table_size) {
            return Err(self.err(Error::BadBitmapTable {
                offset: at,
                reason: "entry past the table end",
            }));
        }
        let mut e = [0u8; 8];
        f.read_at(&mut e, at).ctx(f.path())?;
        let e = u64::from_be_bytes(e);
        match table_entry(e, at, cs).map_err(|err| self.err(err))? {
            Some(off) => {
                let mut cur = vec![0u8; bits.len()];
                f.read_at(&mut cur, off).ctx(f.path())?;
                for (c, b) in cur.iter_mut().zip(bits) {
                    *c |= b;
                }
                f.write_at(&cur, off).ctx(f.path())?;
            }
            None if e & TABLE_ALL_ONES != 0 => {}
            None => {
                let host = self.alloc_clusters(st, 1)?;
                f.write_at(bits, host).ctx(f.path())?;
                f.flush().ctx(f.path())?;
                f.write_at(&host.to_be_bytes(), at).ctx(f.path())?;
            }
        }
        Ok(())
    }

    /// Before a resize: stores pending bits, then marks in use every bitmap whose table must
    /// change size, so that until [`Qcow2::resize_bitmaps`] has written their new tables they
    /// read as inconsistent rather than as unreadable.
    ///
    /// # Errors
    /// I/O errors.
    pub(super) fn bitmaps_before_resize(&self, new_size: u64) -> Result<()> {
        self.store_bitmaps()?;
        let st = self.lock();
        let Some(b) = st.bitmaps.as_ref() else {
            return Ok(());
        };
        let cs = self.geo.cluster_size;
        let f = self.file();
        for bm in &b.list {
            if table_entries(new_size, bm.granularity_bits, cs) != u64::from(bm.table_size) {
                f.write_at(
                    &(bm.flags | FLAG_IN_USE).to_be_bytes(),
                    Self::flags_at(b, bm),
                )
                .ctx(f.path())?;
            }
        }
        f.flush().ctx(f.path())?;
        Ok(())
    }

    /// Bits past the disk's end in the cluster that table entry `i` (`entry`, stored at `at`)
    /// maps must read as clean: a shrink cut them off, a later grow must not find them set.
    /// The cluster is rewritten only when one was set.
    fn clear_bits_past_end(&self, bm: &Bitmap, entry: u64, i: u64, at: u64) -> Result<()> {
        let cs = self.geo.cluster_size;
        let f = self.file();
        let Some(off) = table_entry(entry, at, cs).map_err(|err| self.err(err))? else {
            return Ok(());
        };
        let bits_per_cluster = cs * 8;
        let from = bit_count(self.size, bm.granularity_bits).saturating_sub(i * bits_per_cluster);
        let mut buf = vec![0u8; usize::try_from(cs).unwrap_or(0)];
        f.read_at(&mut buf, off).ctx(f.path())?;
        let mut dirty = false;
        for k in from..bits_per_cluster {
            if let Some(byte) = buf.get_mut(usize::try_from(k / 8).unwrap_or(usize::MAX)) {
                dirty |= *byte & (1 << (k % 8)) != 0;
                *byte &= !(1 << (k % 8));
            }
        }
        if dirty {
            f.write_at(&buf, off).ctx(f.path())?;
        }
        Ok(())
    }

    /// After a resize to `self.size`: gives every bitmap whose table no longer matches the disk
    /// a table of the right size (entries kept, new ones clean, dropped ones freed, bits past a
    /// new end cleared), writes a new directory, switches the header to it, and frees the old
    /// tables and directory. As qemu does, the bitmaps survive the resize.
    ///
    /// # Errors
    /// I/O errors; corrupt bitmap tables.
    pub(super) fn resize_bitmaps(&self) -> Result<()> {
        let cs = self.geo.cluster_size;
        let size = self.size;
        let f = self.file();
        let mut st = self.lock();
        let Some(mut b) = st.bitmaps.clone() else {
            return Ok(());
        };
        let mut frees: Vec<(u64, u64)> = Vec::new();
        let mut changed = false;
        for bm in &mut b.list {
            let want = table_entries(size, bm.granularity_bits, cs);
            if want == u64::from(bm.table_size) {
                // Same table, but a shrink may have cut the disk inside its last cluster.
                if let Some(i) = want.checked_sub(1) {
                    let at = bm.table_offset + i * 8;
                    let mut e = [0u8; 8];
                    f.read_at(&mut e, at).ctx(f.path())?;
                    self.clear_bits_past_end(bm, u64::from_be_bytes(e), i, at)?;
                }
                continue;
            }
            changed = true;
            let want32 = u32::try_from(want)
                .ok()
                .filter(|&w| w <= MAX_TABLE_ENTRIES && u64::from(w) * cs <= MAX_PHYS_BYTES)
                .ok_or_else(|| {
                    self.err(Error::BadBitmapDirectory {
                        offset: b.ext.directory_offset + bm.entry_offset,
                        reason: "bitmap table too large",
                    })
                })?;
            let old =
                super::read_table(f, bm.table_offset, u64::from(bm.table_size)).ctx(f.path())?;
            let keep = old.len().min(usize::try_from(want).unwrap_or(usize::MAX));
            let mut table = old[..keep].to_vec();
            table.resize(usize::try_from(want).unwrap_or(0), 0);
            for (i, &e) in old.iter().enumerate().skip(keep) {
                let at = bm.table_offset + i as u64 * 8;
                if let Some(off) = table_entry(e, at, cs).map_err(|err| self.err(err))? {
                    frees.push((off, 1));
                }
            }
            if let Some(&last) = table.last() {
                let i = want - 1;
                self.clear_bits_past_end(bm, last, i, bm.table_offset + i * 8)?;
            }
            let mut bytes: Vec<u8> = table.iter().flat_map(|e| e.to_be_bytes()).collect();
            let clusters = (bytes.len() as u64).div_ceil(cs).max(1);
            bytes.resize(usize::try_from(clusters * cs).unwrap_or(0), 0);
            let at = self.alloc_clusters(&mut st, clusters)?;
            f.write_at(&bytes, at).ctx(f.path())?;
            frees.push((bm.table_offset, (u64::from(bm.table_size) * 8).div_ceil(cs)));
            bm.table_offset = at;
            bm.table_size = want32;
        }
        if !changed {
            return Ok(());
        }
        let mut dir: Vec<u8> = b.list.iter().flat_map(Bitmap::to_bytes).collect();
        let dir_clusters = (dir.len() as u64).div_ceil(cs);
        dir.resize(usize::try_from(dir_clusters * cs).unwrap_or(0), 0);
        let dir_at = self.alloc_clusters(&mut st, dir_clusters)?;
        f.write_at(&dir, dir_at).ctx(f.path())?;
        f.flush().ctx(f.path())?;
        frees.push((b.ext.directory_offset, b.ext.directory_size.div_ceil(cs)));
        b.ext.directory_offset = dir_at;
        let raw = RawExtension {
            nb_bitmaps: b.ext.nb_bitmaps,
            reserved: 0,
            directory_size: b.ext.directory_size,
            directory_offset: dir_at,
        };
        drop(st);
        self.rewrite_header(|h| h.set_extension(header::EXT_BITMAPS, Some(raw.to_bytes())))?;
        let mut st = self.lock();
        b.in_use_on_disk = false;
        b.written = None;
        st.bitmaps = Some(b);
        st.meta_invalidate();
        for (off, n) in frees {
            for i in 0..n {
                self.update_refcount(&mut st, off + i * cs, -1, false)?;
            }
        }
        drop(st);
        f.flush().ctx(f.path())?;
        Ok(())
    }
}

/// Bytes a new image with `cluster_size` clusters needs to hold `bitmaps` of a `size`-byte disk
/// (qemu-img measure's "bitmaps size"): each bitmap's data and table clusters, and the
/// directory rounded up to whole clusters.
pub fn measure(size: u64, cluster_size: u64, bitmaps: &[crate::driver::BitmapInfo]) -> u64 {
    let mut directory = 0u64;
    let mut clusters = 0u64;
    for b in bitmaps {
        let bits = size.div_ceil(b.granularity.max(1));
        let data = bits.div_ceil(8).div_ceil(cluster_size);
        let table = (data * 8).div_ceil(cluster_size);
        clusters += data + table;
        directory += (ENTRY_FIXED_LEN as u64 + b.name.len() as u64).div_ceil(8) * 8;
    }
    clusters * cluster_size + directory.div_ceil(cluster_size) * cluster_size
}

/// Reads the bitmaps of an image whose header sets the bitmaps autoclear bit and has the
/// extension; `None` otherwise (qemu then ignores any extension: a program without bitmap
/// support wrote the image, and the bitmaps are stale).
///
/// # Errors
/// The specific [`Error`] for a bad extension or directory (wrapped with the path); I/O errors.
pub(crate) fn load(file: &dyn Storage, h: &Header, file_len: u64) -> Result<Option<Loaded>> {
    let qerr = |e| crate::Error::Qcow2 {
        path: file.path().to_owned(),
        source: e,
    };
    if h.version < 3 || h.autoclear & header::AUTOCLEAR_BITMAPS == 0 {
        return Ok(None);
    }
    let Some(data) = h.extension(header::EXT_BITMAPS) else {
        return Ok(None);
    };
    let raw = RawExtension::from_bytes(data)
        .ok_or_else(|| qerr(Error::BadBitmapExtension("wrong length")))?;
    let ext = raw.validate(h.cluster_size(), file_len).map_err(&qerr)?;
    // Bounded by MAX_DIRECTORY_BYTES (64 MiB) in validate.
    let mut buf = vec![0u8; usize::try_from(ext.directory_size).unwrap_or(0)];
    file.read_at(&mut buf, ext.directory_offset)
        .ctx(file.path())?;
    let list = parse_directory(&buf, &ext, h.size, h.cluster_size(), file_len).map_err(&qerr)?;
    Ok(Some(Loaded {
        ext,
        list,
        in_use_on_disk: false,
        written: None,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The directory `qemu-img bitmap --add a.qcow2 b0` then `--add --disable -g 128k ... b1`
    /// writes for an 8 MiB image with 64 KiB clusters (qemu-img 10.0.2), tables moved to 0x50000
    /// and 0x70000.
    fn qemu_directory() -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&0x50000u64.to_be_bytes());
        v.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 2, 1, 16, 0, 2, 0, 0, 0, 0]);
        v.extend_from_slice(b"b0\0\0\0\0\0\0");
        v.extend_from_slice(&0x70000u64.to_be_bytes());
        v.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 1, 17, 0, 2, 0, 0, 0, 0]);
        v.extend_from_slice(b"b1\0\0\0\0\0\0");
        v
    }

    fn ext() -> Extension {
        RawExtension {
            nb_bitmaps: 2,
            reserved: 0,
            directory_size: 64,
            directory_offset: 0x80000,
        }
        .validate(65536, 1 << 20)
        .unwrap()
    }

    fn parse(buf: &[u8]) -> Result<Vec<Bitmap>, Error> {
        parse_directory(buf, &ext(), 8 << 20, 65536, 1 << 20)
    }

    #[test]
    fn directory_from_qemu_parses_and_round_trips() {
        let d = qemu_directory();
        let bms = parse(&d).unwrap();
        assert_eq!(bms.len(), 2);
        assert_eq!(bms[0].name, "b0");
        assert_eq!(bms[0].granularity(), 65536);
        assert!(bms[0].tracks_writes());
        assert_eq!(bms[1].name, "b1");
        assert_eq!(bms[1].granularity(), 131072);
        assert!(!bms[1].tracks_writes());
        assert_eq!(bms[1].entry_offset, 32);
        let back: Vec<u8> = bms.iter().flat_map(Bitmap::to_bytes).collect();
        assert_eq!(back, d);
    }

    #[test]
    fn extension_round_trips() {
        let r = RawExtension {
            nb_bitmaps: 2,
            reserved: 0,
            directory_size: 64,
            directory_offset: 0x1c0000,
        };
        assert_eq!(RawExtension::from_bytes(&r.to_bytes()), Some(r));
    }

    #[test]
    fn extension_too_many_bitmaps_is_refused() {
        let r = RawExtension {
            nb_bitmaps: 65536,
            reserved: 0,
            directory_size: 64,
            directory_offset: 0x10000,
        };
        assert!(matches!(
            r.validate(65536, 1 << 30),
            Err(Error::BadBitmapExtension("too many bitmaps"))
        ));
    }

    #[test]
    fn extension_directory_over_64m_is_refused() {
        let r = RawExtension {
            nb_bitmaps: 1,
            reserved: 0,
            directory_size: (64 << 20) + 8,
            directory_offset: 0x10000,
        };
        assert!(matches!(
            r.validate(65536, 1 << 40),
            Err(Error::BadBitmapExtension("directory too large"))
        ));
    }

    #[test]
    fn extension_directory_past_file_end_is_refused() {
        let r = RawExtension {
            nb_bitmaps: 1,
            reserved: 0,
            directory_size: 32,
            directory_offset: 0x10000,
        };
        assert!(matches!(
            r.validate(65536, 0x10010),
            Err(Error::BadBitmapExtension(
                "directory outside the image file"
            ))
        ));
    }

    fn reason(r: Result<Vec<Bitmap>, Error>) -> (u64, &'static str) {
        match r {
            Err(Error::BadBitmapDirectory { offset, reason }) => (offset, reason),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn directory_bad_type_names_entry_offset() {
        let mut d = qemu_directory();
        d[32 + 16] = 2;
        assert_eq!(reason(parse(&d)), (0x80020, "unknown bitmap type"));
    }

    #[test]
    fn directory_granularity_8_bits_is_refused() {
        let mut d = qemu_directory();
        d[17] = 8;
        assert_eq!(reason(parse(&d)), (0x80000, "unsupported granularity"));
    }

    #[test]
    fn directory_reserved_flag_is_refused() {
        let mut d = qemu_directory();
        d[15] |= 8;
        assert_eq!(reason(parse(&d)).1, "reserved flags set");
    }

    #[test]
    fn directory_table_size_not_matching_disk_is_refused() {
        let mut d = qemu_directory();
        d[8..12].copy_from_slice(&0u32.to_be_bytes());
        assert_eq!(
            reason(parse(&d)).1,
            "bitmap table size does not match the disk size"
        );
        d[8..12].copy_from_slice(&2u32.to_be_bytes());
        assert_eq!(
            reason(parse(&d)).1,
            "bitmap table size does not match the disk size"
        );
        // A bitmap in use is not read, whatever its table size.
        d[15] |= 1;
        assert!(parse(&d).is_ok());
    }

    #[test]
    fn directory_huge_table_is_refused_before_reading() {
        let mut d = qemu_directory();
        d[15] |= 1;
        d[8..12].copy_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(reason(parse(&d)).1, "bitmap table too large");
        // qemu's limit on the bitmap in memory: 8192 entries of 64 KiB clusters, 512 MiB.
        d[8..12].copy_from_slice(&8193u32.to_be_bytes());
        assert_eq!(reason(parse(&d)).1, "bitmap table too large");
        d[8..12].copy_from_slice(&8192u32.to_be_bytes());
        assert!(parse(&d).is_ok());
        d[0..8].copy_from_slice(&0x10_0000u64.to_be_bytes());
        assert_eq!(reason(parse(&d)).1, "bitmap table outside the image file");
    }

    #[test]
    fn directory_empty_table_is_refused() {
        let mut d = qemu_directory();
        d[15] |= 1;
        d[8..12].copy_from_slice(&0u32.to_be_bytes());
        assert_eq!(reason(parse(&d)).1, "empty bitmap table");
    }

    #[test]
    fn directory_name_past_end_is_refused() {
        let mut d = qemu_directory();
        d[32 + 18..32 + 20].copy_from_slice(&100u16.to_be_bytes());
        assert_eq!(reason(parse(&d)).1, "name runs past the directory end");
    }

    #[test]
    fn directory_duplicate_name_is_refused() {
        let mut d = qemu_directory();
        d[32 + 25] = b'0';
        assert_eq!(reason(parse(&d)).1, "duplicate bitmap name");
    }

    #[test]
    fn table_entry_reserved_bits_are_refused() {
        assert!(table_entry(0x50000, 0, 65536).unwrap() == Some(0x50000));
        assert!(table_entry(1, 0, 65536).unwrap().is_none());
        assert!(matches!(
            table_entry(0x50002, 8, 65536),
            Err(Error::BadBitmapTable {
                offset: 8,
                reason: "reserved bits set"
            })
        ));
        assert!(table_entry(0x50200, 8, 65536).is_err());
    }

    #[test]
    fn written_marks_whole_words_and_partial_ends() {
        let mut w = Written::new(1 << 20, 9);
        w.mark(100, 1);
        w.mark(512 * 60, 512 * 200);
        w.mark((1 << 20) - 1, 1000);
        assert_eq!(
            w.runs(),
            vec![(0, 512), (512 * 60, 512 * 260), ((1 << 20) - 512, 1 << 20)]
        );
    }

    #[test]
    fn written_huge_disk_coarsens_within_cap() {
        let w = Written::new(1 << 50, 9);
        assert!(w.count <= MAX_TRACKED_BITS);
        assert!(w.shift > 9);
    }

    fn info(name: &str, granularity: u64) -> crate::driver::BitmapInfo {
        crate::driver::BitmapInfo {
            name: name.into(),
            granularity,
            enabled: true,
            in_use: false,
        }
    }

    #[test]
    fn measure_matches_qemu_img_measure() {
        // qemu-img measure -O qcow2 [-o cluster_size=4k] of images with these bitmaps.
        let two = [info("b0", 65536), info("b1", 131072)];
        assert_eq!(measure(8 << 20, 65536, &two), 327_680);
        let big = [info("x", 512), info("y z", 65536)];
        assert_eq!(measure(1 << 30, 4096, &big), 278_528);
        assert_eq!(measure(8 << 20, 65536, &[]), 0);
    }

    #[test]
    fn table_entries_match_qemu_sizes() {
        assert_eq!(table_entries(8 << 20, 16, 65536), 1);
        // 64 KiB clusters of bits at 512-byte granularity cover 256 MiB each.
        assert_eq!(table_entries((256 << 20) + 1, 9, 65536), 2);
    }
}
