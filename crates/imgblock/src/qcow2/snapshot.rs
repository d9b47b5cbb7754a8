//! The internal snapshot table (qcow2.rst, "Snapshots").

use super::header::Header;
use super::Error;
use crate::driver::SnapshotInfo;
use crate::storage::Storage;

/// Most snapshots qemu allows.
pub const MAX_SNAPSHOTS: u32 = 65536;
/// Largest snapshot table qemu reads (64 MiB).
pub const MAX_TABLE_BYTES: u64 = 64 << 20;
/// Largest extra-data area per entry qemu accepts.
pub const MAX_EXTRA_DATA: u32 = 1024;

/// One snapshot table entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// Offset of the snapshot's L1 table.
    pub l1_offset: u64,
    /// Entries in it.
    pub l1_size: u32,
    /// Unique ID string.
    pub id: String,
    /// Name.
    pub name: String,
    /// Creation time, seconds.
    pub date_sec: u32,
    /// Creation time, nanoseconds.
    pub date_nsec: u32,
    /// Guest clock.
    pub vm_clock_nsec: u64,
    /// VM state size (the 64-bit field from extra data when present).
    pub vm_state_size: u64,
    /// Virtual disk size at snapshot time (extra data, v3).
    pub disk_size: Option<u64>,
    /// Instruction count (extra data).
    pub icount: Option<u64>,
    /// Bytes the entry takes in the table it was read from (0 for a new entry).
    pub disk_len: u64,
    /// A version 3 entry without the 16 bytes of extra data the specification requires (the
    /// VM state and disk sizes). It is read as qemu reads it, the image's size standing in for
    /// the disk size, so that `check` can report it and `check -r all` write it whole.
    pub incomplete: bool,
}

impl Snapshot {
    /// The listing form.
    pub fn info(&self) -> SnapshotInfo {
        SnapshotInfo {
            id: self.id.clone(),
            name: self.name.clone(),
            vm_state_size: self.vm_state_size,
            date_sec: self.date_sec,
            date_nsec: self.date_nsec,
            vm_clock_nsec: self.vm_clock_nsec,
            icount: self.icount,
            disk_size: self.disk_size,
        }
    }
}

fn take<'a>(buf: &'a [u8], pos: &mut usize, n: usize) -> Result<&'a [u8], Error> {
    let end = pos
        .checked_add(n)
        .filter(|&e| e <= buf.len())
        .ok_or(Error::BadSnapshotTable(PAST_THE_END))?;
    let s = &buf[*pos..end];
    *pos = end;
    Ok(s)
}

fn u16_at(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}
fn u32_at(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

/// Reads all entries of the snapshot table.
///
/// # Errors
/// When the table is truncated, too large, or its strings are not UTF-8.
pub fn read_table(file: &dyn Storage, h: &Header) -> Result<Vec<Snapshot>, Error> {
    if h.nb_snapshots == 0 {
        return Ok(Vec::new());
    }
    if h.nb_snapshots > MAX_SNAPSHOTS {
        return Err(Error::TooManySnapshots(h.nb_snapshots));
    }
    let cant_read = || Error::BadSnapshotTable("cannot read the table");
    let file_len = file.size().map_err(|_| cant_read())?;
    // The table may run to the end of the file or to qemu's limit, but is usually a few hundred
    // bytes: read what the entries need, doubling the buffer while they run past it, so that a
    // small table in a large file does not cost 64 MiB at every open.
    let limit = usize::try_from(
        file_len
            .saturating_sub(h.snapshots_offset)
            .min(MAX_TABLE_BYTES),
    )
    .unwrap_or(0);
    let mut buf: Vec<u8> = Vec::new();
    let mut want = limit.min(FIRST_READ_BYTES);
    loop {
        let have = buf.len();
        buf.resize(want, 0);
        file.read_at(&mut buf[have..], h.snapshots_offset + have as u64)
            .map_err(|_| cant_read())?;
        match parse_table(&buf, h) {
            Err(Error::BadSnapshotTable(PAST_THE_END)) if want < limit => {
                want = want.saturating_mul(2).min(limit);
            }
            other => return other,
        }
    }
}

/// The first read of a snapshot table: room for about 100 entries with short names.
const FIRST_READ_BYTES: usize = 8 << 10;
/// What [`take`] reports when an entry runs past the bytes read.
const PAST_THE_END: &str = "entry past the end";

/// Parses the `h.nb_snapshots` entries at the start of `buf`.
fn parse_table(buf: &[u8], h: &Header) -> Result<Vec<Snapshot>, Error> {
    let mut pos = 0usize;
    let mut out = Vec::new();
    for _ in 0..h.nb_snapshots {
        let pos_before = pos;
        let fixed = take(buf, &mut pos, 40)?;
        let l1_offset = super::be64_at(fixed, 0);
        let l1_size = u32_at(&fixed[8..]);
        let id_len = usize::from(u16_at(&fixed[12..]));
        let name_len = usize::from(u16_at(&fixed[14..]));
        let date_sec = u32_at(&fixed[16..]);
        let date_nsec = u32_at(&fixed[20..]);
        let vm_clock_nsec = super::be64_at(fixed, 24);
        let vm_state_size32 = u32_at(&fixed[32..]);
        let extra_size = u32_at(&fixed[36..]);
        if extra_size > MAX_EXTRA_DATA {
            return Err(Error::BadSnapshotTable(
                "too much extra metadata in a snapshot table entry",
            ));
        }
        let incomplete = h.version >= 3 && extra_size < 16;
        let extra = take(buf, &mut pos, extra_size as usize)?;
        let field = |o: usize| (extra.len() >= o + 8).then(|| super::be64_at(extra, o));
        let vm_state_size = field(0).unwrap_or(u64::from(vm_state_size32));
        let disk_size = field(8).or((h.version >= 3).then_some(h.size));
        let icount = field(16).filter(|&v| v != u64::MAX);
        let id = String::from_utf8(take(buf, &mut pos, id_len)?.to_vec())
            .map_err(|_| Error::BadSnapshotTable("ID is not UTF-8"))?;
        let name = String::from_utf8(take(buf, &mut pos, name_len)?.to_vec())
            .map_err(|_| Error::BadSnapshotTable("name is not UTF-8"))?;
        let entry_start = pos_before;
        pos = pos.div_ceil(8) * 8;
        out.push(Snapshot {
            l1_offset,
            l1_size,
            id,
            name,
            date_sec,
            date_nsec,
            vm_clock_nsec,
            vm_state_size,
            disk_size,
            icount,
            disk_len: (pos - entry_start) as u64,
            incomplete,
        });
    }
    Ok(out)
}

/// Bytes a table of these entries takes: as read for entries read from disk, as serialised for
/// new ones.
pub fn table_len(snaps: &[Snapshot]) -> u64 {
    snaps
        .iter()
        .map(|s| {
            if s.disk_len > 0 {
                s.disk_len
            } else {
                s.to_bytes().len() as u64
            }
        })
        .sum()
}

impl Snapshot {
    /// Serialises the entry (with the 24 bytes of extra data qemu writes), padded to 8 bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(64 + self.id.len() + self.name.len());
        b.extend_from_slice(&self.l1_offset.to_be_bytes());
        b.extend_from_slice(&self.l1_size.to_be_bytes());
        b.extend_from_slice(
            &u16::try_from(self.id.len())
                .unwrap_or(u16::MAX)
                .to_be_bytes(),
        );
        b.extend_from_slice(
            &u16::try_from(self.name.len())
                .unwrap_or(u16::MAX)
                .to_be_bytes(),
        );
        b.extend_from_slice(&self.date_sec.to_be_bytes());
        b.extend_from_slice(&self.date_nsec.to_be_bytes());
        b.extend_from_slice(&self.vm_clock_nsec.to_be_bytes());
        b.extend_from_slice(
            &u32::try_from(self.vm_state_size)
                .unwrap_or(u32::MAX)
                .to_be_bytes(),
        );
        b.extend_from_slice(&24u32.to_be_bytes());
        b.extend_from_slice(&self.vm_state_size.to_be_bytes());
        b.extend_from_slice(&self.disk_size.unwrap_or(0).to_be_bytes());
        b.extend_from_slice(&self.icount.unwrap_or(u64::MAX).to_be_bytes());
        b.extend_from_slice(self.id.as_bytes());
        b.extend_from_slice(self.name.as_bytes());
        b.resize(b.len().div_ceil(8) * 8, 0);
        b
    }
}
