//! OVA appliances: a tar archive holding an OVF descriptor and its disks. A disk is read in
//! place, through a [`Window`] storage onto its bytes inside the tar, so nothing is unpacked.
//!
//! ```text
//!  appliance.ova (FileStorage) --tar headers--> entries --.ovf--> Disk/File sections
//!        '--Window(offset, len)--> vmdk driver --> Image
//! ```

use std::collections::HashMap;
use std::io;
use std::path::Path;
use std::sync::Arc;

use crate::error::IoContext;
use crate::storage::{FileStorage, Storage};
use crate::{probe, Image, OpenOptions, Result};

/// Most tar entries examined (an appliance has a handful).
pub const MAX_TAR_ENTRIES: usize = 4096;
/// Largest OVF descriptor read into memory.
pub const MAX_OVF_BYTES: u64 = 16 << 20;
/// Largest pax extended header read into memory.
pub const MAX_PAX_BYTES: u64 = 1 << 20;

/// What can be wrong with an OVA.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A tar header whose checksum does not match.
    #[error("not a tar archive (bad header checksum at offset {0})")]
    BadTarHeader(u64),
    /// An entry that runs past the end of the archive.
    #[error("tar entry '{name}' runs past the end of the archive")]
    TruncatedEntry {
        /// The entry's name.
        name: String,
    },
    /// More entries than [`MAX_TAR_ENTRIES`].
    #[error("more than {MAX_TAR_ENTRIES} entries in the archive")]
    TooManyEntries,
    /// No `.ovf` entry.
    #[error("no OVF descriptor in the archive")]
    NoOvf,
    /// The OVF is too large or not text.
    #[error("OVF descriptor is malformed: {0}")]
    BadOvf(String),
    /// Fewer disks than asked for.
    #[error("the appliance has {count} disk(s); disk {index} does not exist")]
    NoSuchDisk {
        /// The index asked for.
        index: usize,
        /// Disks in the OVF.
        count: usize,
    },
    /// A disk's file reference names no file in the archive.
    #[error("disk file '{0}' is not in the archive")]
    MissingFile(String),
    /// The OVF's capacity differs from the disk image's virtual size.
    #[error("OVF capacity of disk {index} is {ovf} bytes, the image's is {image}")]
    CapacityMismatch {
        /// Disk index.
        index: usize,
        /// Capacity in the OVF, in bytes.
        ovf: u64,
        /// Virtual size of the image.
        image: u64,
    },
}

fn oerr(path: &Path, e: Error) -> crate::Error {
    crate::Error::Ova {
        path: path.to_owned(),
        source: e,
    }
}

/// One file in the tar.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Path inside the archive.
    pub name: String,
    /// Offset of its data in the archive.
    pub offset: u64,
    /// Length of its data.
    pub size: u64,
}

/// One disk the OVF describes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OvfDisk {
    /// `ovf:diskId`.
    pub id: String,
    /// The file's `ovf:href`.
    pub href: String,
    /// Capacity in bytes.
    pub capacity: u64,
}

fn octal(field: &[u8]) -> Option<u64> {
    if field.first().is_some_and(|b| b & 0x80 != 0) {
        // GNU base-256 for sizes of 8 GiB and more.
        let mut v: u64 = u64::from(field[0] & 0x7f);
        for &b in &field[1..] {
            v = v.checked_mul(256)?.checked_add(u64::from(b))?;
        }
        return Some(v);
    }
    let s: String = field
        .iter()
        .take_while(|&&b| b != 0)
        .map(|&b| b as char)
        .collect();
    let t = s.trim();
    if t.is_empty() {
        return Some(0);
    }
    u64::from_str_radix(t, 8).ok()
}

fn cstr(field: &[u8]) -> String {
    let end = field.iter().position(|&b| b == 0).unwrap_or(field.len());
    String::from_utf8_lossy(&field[..end]).into_owned()
}

/// Lists the regular files of a tar archive (ustar, pax `path`/`size`, GNU long names).
///
/// # Errors
/// [`Error::BadTarHeader`], [`Error::TruncatedEntry`], [`Error::TooManyEntries`]; I/O errors.
pub fn entries(s: &dyn Storage) -> Result<Vec<Entry>> {
    let path = s.path();
    let len = s.size().ctx(path)?;
    let mut out = Vec::new();
    let mut pos = 0u64;
    let mut long_name: Option<String> = None;
    let mut pax_size: Option<u64> = None;
    let mut hdr = [0u8; 512];
    while pos + 512 <= len {
        s.read_at(&mut hdr, pos).ctx(path)?;
        if hdr.iter().all(|&b| b == 0) {
            break;
        }
        let want = octal(&hdr[148..156]).ok_or_else(|| oerr(path, Error::BadTarHeader(pos)))?;
        let sum: u64 = hdr
            .iter()
            .enumerate()
            .map(|(i, &b)| {
                if (148..156).contains(&i) {
                    32
                } else {
                    u64::from(b)
                }
            })
            .sum();
        if sum != want {
            return Err(oerr(path, Error::BadTarHeader(pos)));
        }
        let mut name = cstr(&hdr[..100]);
        if &hdr[257..262] == b"ustar" {
            let prefix = cstr(&hdr[345..500]);
            if !prefix.is_empty() {
                name = format!("{prefix}/{name}");
            }
        }
        let size = pax_size
            .take()
            .or_else(|| octal(&hdr[124..136]))
            .ok_or_else(|| oerr(path, Error::BadTarHeader(pos)))?;
        let data = pos + 512;
        let end = data
            .checked_add(size)
            .filter(|&e| e <= len)
            .ok_or_else(|| oerr(path, Error::TruncatedEntry { name: name.clone() }))?;
        match hdr[156] {
            b'L' | b'x' => {
                if size > MAX_PAX_BYTES {
                    return Err(oerr(path, Error::BadTarHeader(pos)));
                }
                let mut buf = vec![0u8; usize::try_from(size).unwrap_or(0)];
                s.read_at(&mut buf, data).ctx(path)?;
                if hdr[156] == b'L' {
                    long_name = Some(cstr(&buf));
                } else {
                    for rec in String::from_utf8_lossy(&buf).lines() {
                        // "LEN key=value"
                        if let Some((_, kv)) = rec.split_once(' ') {
                            if let Some(p) = kv.strip_prefix("path=") {
                                long_name = Some(p.to_owned());
                            } else if let Some(v) = kv.strip_prefix("size=") {
                                pax_size = v.parse().ok();
                            }
                        }
                    }
                }
            }
            b'0' | 0 | b'7' => {
                if out.len() >= MAX_TAR_ENTRIES {
                    return Err(oerr(path, Error::TooManyEntries));
                }
                out.push(Entry {
                    name: long_name.take().unwrap_or(name),
                    offset: data,
                    size,
                });
            }
            _ => {
                long_name = None;
            }
        }
        pos = end.div_ceil(512) * 512;
    }
    Ok(out)
}

/// The value of attribute `name` (any namespace prefix) in an element's text.
fn attr(elem: &str, name: &str) -> Option<String> {
    let mut rest = elem;
    while let Some(i) = rest.find(name) {
        let before = rest[..i].chars().last();
        let after = &rest[i + name.len()..];
        let after_t = after.trim_start();
        if matches!(before, Some(' ' | ':' | '\t' | '\n' | '\r')) && after_t.starts_with('=') {
            let v = after_t[1..].trim_start();
            let q = v.chars().next()?;
            if q == '"' || q == '\'' {
                let body = &v[1..];
                let end = body.find(q)?;
                return Some(body[..end].to_owned());
            }
        }
        rest = after;
    }
    None
}

/// The opening tags of elements named `tag` (any prefix).
fn elements<'a>(xml: &'a str, tag: &str) -> Vec<&'a str> {
    let mut out = Vec::new();
    let mut rest = xml;
    while let Some(i) = rest.find('<') {
        rest = &rest[i + 1..];
        let end = rest.find('>').unwrap_or(rest.len());
        let el = &rest[..end];
        let name = el.split_whitespace().next().unwrap_or("");
        let local = name.rsplit(':').next().unwrap_or(name);
        if local == tag {
            out.push(el);
        }
        rest = &rest[end..];
    }
    out
}

/// Bytes per unit of `ovf:capacityAllocationUnits` ("byte", "byte * 2^30", ...).
fn units(u: Option<&str>) -> Option<u64> {
    let Some(u) = u else { return Some(1) };
    let t: String = u.chars().filter(|c| !c.is_whitespace()).collect();
    if t == "byte" || t.is_empty() {
        return Some(1);
    }
    let exp = t.strip_prefix("byte*2^")?;
    let e: u32 = exp.parse().ok()?;
    1u64.checked_shl(e).filter(|_| e < 64)
}

/// Parses the disks of an OVF descriptor, in DiskSection order.
///
/// # Errors
/// [`Error::BadOvf`].
pub fn parse_ovf(xml: &str) -> Result<Vec<OvfDisk>, Error> {
    // Looked up by id for each disk: a 16 MiB descriptor can list 100000 of each, too many to
    // search one list for every disk. The first file with an id is the one a disk names.
    let mut files: HashMap<String, String> = HashMap::new();
    for e in elements(xml, "File") {
        if let (Some(id), Some(href)) = (attr(e, "id"), attr(e, "href")) {
            files.entry(id).or_insert(href);
        }
    }
    let mut disks = Vec::new();
    for d in elements(xml, "Disk") {
        let id = attr(d, "diskId").unwrap_or_default();
        let fref = attr(d, "fileRef")
            .ok_or_else(|| Error::BadOvf(format!("disk '{id}' has no fileRef")))?;
        let href = files
            .get(&fref)
            .cloned()
            .ok_or_else(|| Error::BadOvf(format!("disk '{id}' refers to unknown file '{fref}'")))?;
        let cap: u64 = attr(d, "capacity")
            .and_then(|c| c.trim().parse().ok())
            .ok_or_else(|| Error::BadOvf(format!("disk '{id}' has no valid capacity")))?;
        let unit = units(attr(d, "capacityAllocationUnits").as_deref())
            .ok_or_else(|| Error::BadOvf(format!("disk '{id}' has unknown capacity units")))?;
        let capacity = cap
            .checked_mul(unit)
            .ok_or_else(|| Error::BadOvf(format!("disk '{id}' capacity overflows")))?;
        disks.push(OvfDisk { id, href, capacity });
    }
    Ok(disks)
}

/// A read-only window onto a range of another storage (a disk inside a tar).
#[derive(Debug)]
pub struct Window {
    inner: Arc<dyn Storage>,
    offset: u64,
    len: u64,
}

impl Window {
    /// A window of `len` bytes at `offset` in `inner`.
    pub fn new(inner: Arc<dyn Storage>, offset: u64, len: u64) -> Window {
        Window { inner, offset, len }
    }
}

fn ro() -> io::Error {
    io::Error::new(
        io::ErrorKind::PermissionDenied,
        "disks inside an OVA are read-only",
    )
}

impl Storage for Window {
    fn path(&self) -> &Path {
        self.inner.path()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let avail = self.len.saturating_sub(offset);
        let n = usize::try_from(avail.min(buf.len() as u64)).unwrap_or(0);
        if n > 0 {
            let at = self
                .offset
                .checked_add(offset)
                .ok_or(io::ErrorKind::InvalidInput)?;
            self.inner.read_at(&mut buf[..n], at)?;
        }
        buf[n..].fill(0);
        Ok(())
    }
    fn write_at(&self, _buf: &[u8], _offset: u64) -> io::Result<()> {
        Err(ro())
    }
    fn write_zeroes(&self, _offset: u64, _len: u64, _unmap: bool) -> io::Result<()> {
        Err(ro())
    }
    fn discard(&self, _offset: u64, _len: u64) -> io::Result<()> {
        Err(ro())
    }
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
    fn size(&self) -> io::Result<u64> {
        Ok(self.len)
    }
    fn set_len(&self, _len: u64) -> io::Result<()> {
        Err(ro())
    }
    fn allocate(&self, _offset: u64, _len: u64) -> io::Result<()> {
        Err(ro())
    }
    fn read_only(&self) -> bool {
        true
    }
}

/// Whether a file looks like an OVA (a tar archive whose first file is an `.ovf`). The first
/// header may be a PAX or GNU long-name record (a non-ASCII or long `.ovf` name), so the
/// first file is found by walking the headers, not read from the first one.
pub fn is_ova(path: &Path) -> bool {
    let Ok(s) = FileStorage::open(path, false) else {
        return false;
    };
    let mut hdr = [0u8; 512];
    if s.read_at(&mut hdr, 0).is_err() || &hdr[257..262] != b"ustar" {
        return false;
    }
    entries(&s).is_ok_and(|e| {
        e.first()
            .is_some_and(|f| f.name.to_ascii_lowercase().ends_with(".ovf"))
    })
}

/// The disks an OVA's descriptor lists.
///
/// # Errors
/// When the archive or its OVF is malformed; I/O errors.
pub fn disks(path: &Path) -> Result<Vec<OvfDisk>> {
    let s = FileStorage::open(path, false).ctx(path)?;
    Ok(read_ovf(path, &s)?.1)
}

fn read_ovf(path: &Path, s: &dyn Storage) -> Result<(Vec<Entry>, Vec<OvfDisk>)> {
    let ents = entries(s)?;
    let ovf = ents
        .iter()
        .find(|e| e.name.to_ascii_lowercase().ends_with(".ovf"))
        .ok_or_else(|| oerr(path, Error::NoOvf))?;
    if ovf.size > MAX_OVF_BYTES {
        return Err(oerr(path, Error::BadOvf("descriptor too large".into())));
    }
    let mut buf = vec![0u8; usize::try_from(ovf.size).unwrap_or(0)];
    s.read_at(&mut buf, ovf.offset).ctx(path)?;
    let text = String::from_utf8(buf).map_err(|_| oerr(path, Error::BadOvf("not UTF-8".into())))?;
    let d = parse_ovf(&text).map_err(|e| oerr(path, e))?;
    Ok((ents, d))
}

/// Opens disk `index` (0-based) of an OVA read-only, in place inside the archive, and checks
/// the OVF's capacity against the image's virtual size.
///
/// # Errors
/// When the archive, the OVF or the disk is malformed, the disk does not exist, or the
/// capacities differ.
pub fn open(path: &Path, index: usize) -> Result<Image> {
    let file: Arc<dyn Storage> = Arc::new(FileStorage::open(path, false).ctx(path)?);
    let (ents, disks) = read_ovf(path, file.as_ref())?;
    let disk = disks.get(index).ok_or_else(|| {
        oerr(
            path,
            Error::NoSuchDisk {
                index,
                count: disks.len(),
            },
        )
    })?;
    let ent = ents
        .iter()
        .find(|e| e.name == disk.href || e.name.rsplit('/').next() == Some(disk.href.as_str()))
        .ok_or_else(|| oerr(path, Error::MissingFile(disk.href.clone())))?;
    let win: Arc<dyn Storage> = Arc::new(Window::new(file, ent.offset, ent.size));
    let format = probe::probe(win.as_ref())?;
    let img = Image::open_storage(win, &OpenOptions::read_only().format(Some(format)))?;
    if img.size() != disk.capacity {
        return Err(oerr(
            path,
            Error::CapacityMismatch {
                index,
                ovf: disk.capacity,
                image: img.size(),
            },
        ));
    }
    Ok(img)
}

#[cfg(test)]
mod tests {
    use super::*;

    const OVF: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1" xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1">
  <References>
    <File ovf:href="disk1.vmdk" ovf:id="file1" ovf:size="1234"/>
    <File ovf:id="file2" ovf:href='disk2.vmdk'/>
  </References>
  <DiskSection>
    <Info>Virtual disk information</Info>
    <Disk ovf:capacity="16" ovf:capacityAllocationUnits="byte * 2^30" ovf:diskId="vmdisk1" ovf:fileRef="file1" ovf:format="http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized"/>
    <Disk ovf:capacity="1048576" ovf:diskId="vmdisk2" ovf:fileRef="file2"/>
  </DiskSection>
</Envelope>"#;

    #[test]
    fn ovf_disks_parse_with_units() {
        let d = parse_ovf(OVF).unwrap();
        assert_eq!(d.len(), 2);
        assert_eq!(d[0].href, "disk1.vmdk");
        assert_eq!(d[0].capacity, 16 << 30);
        assert_eq!(d[1].href, "disk2.vmdk");
        assert_eq!(d[1].capacity, 1 << 20);
    }

    #[test]
    fn ovf_unknown_file_ref_is_bad() {
        let x = OVF.replace("ovf:fileRef=\"file2\"", "ovf:fileRef=\"nope\"");
        assert!(matches!(parse_ovf(&x), Err(Error::BadOvf(_))));
    }

    #[test]
    fn octal_and_base256_sizes_parse() {
        assert_eq!(octal(b"00000001750\0"), Some(1000));
        let mut b = [0u8; 12];
        b[0] = 0x80;
        b[7] = 2; // 2 << 32
        assert_eq!(octal(&b), Some(2 << 32));
    }
}
