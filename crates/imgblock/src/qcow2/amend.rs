//! `amend`: changing compat level, lazy refcounts, refcount width and size of an existing image
//! (the backing file only through rebase), refusing what qemu-img refuses.

use super::check::count_references;
use super::header::{self, CompressionType};
use super::l2::{Entry, Kind};
use super::{Error, Geometry, Qcow2, COPIED, OFFSET_MASK, ZERO_FLAG};
use crate::driver::Driver;
use crate::error::IoContext;
use crate::options::{parse_bool, parse_size_opt};
use crate::raw::Preallocation;
use crate::{CreateOptions, Result};

fn invalid(msg: impl Into<String>) -> crate::Error {
    crate::Error::InvalidOption(msg.into())
}

impl Qcow2 {
    /// Applies `-o` options to an existing image.
    ///
    /// # Errors
    /// With qemu-img's message for options that cannot be amended or combinations it refuses;
    /// I/O errors.
    pub fn amend(&mut self, o: &CreateOptions, backing_size: Option<u64>) -> Result<()> {
        let (mut version, mut lazy, mut order) = {
            let st = self.lock();
            (
                st.h.version,
                st.h.compatible & header::COMPAT_LAZY_REFCOUNTS != 0,
                st.h.refcount_order,
            )
        };
        let mut size = None;
        // The data file's name and raw flag, as qemu amends them (last, after the rest).
        let mut data_file: Option<String> = None;
        let mut data_raw: Option<bool> = None;
        for (k, v) in &o.opts {
            match k.as_str() {
                "compat" => {
                    version = match v.as_str() {
                        "0.10" | "v2" => 2,
                        "1.1" | "v3" => 3,
                        _ => return Err(invalid(format!("Invalid compatibility level: '{v}'"))),
                    }
                }
                "lazy_refcounts" => lazy = parse_bool(k, v)?,
                "refcount_bits" => order = super::create::refcount_order(v)?,
                "size" => size = Some(parse_size_opt("size", v)?),
                k if k.starts_with("encrypt.") => {}
                "cluster_size" | "compression_type" | "extended_l2" | "preallocation"
                | "encryption" => {
                    return Err(invalid(format!(
                        "Invalid parameter '{k}'\nThis option is only supported for image creation"
                    )))
                }
                "data_file" => {
                    if self.data == 0 {
                        return Err(invalid(
                            "data-file can only be set for images that use an external data file",
                        ));
                    }
                    data_file = Some(v.clone());
                }
                "data_file_raw" => {
                    let on = parse_bool(k, v)?;
                    let raw = self.lock().h.autoclear & header::AUTOCLEAR_DATA_FILE_RAW != 0;
                    if on && !raw {
                        return Err(invalid("data-file-raw cannot be set on existing images"));
                    }
                    data_raw = Some(on);
                }
                _ => return Err(invalid(format!("Invalid parameter '{k}'"))),
            }
        }
        if let Some(s) = o.size {
            size = Some(s);
        }
        if o.opts.iter().any(|(k, _)| k.starts_with("encrypt.")) {
            self.amend_encryption(o, o.force)?;
        }
        if version == 2 {
            if order != 4 {
                return Err(invalid("compat=0.10 requires refcount_bits=16"));
            }
            if lazy {
                let asked = o.opts.iter().any(|(k, _)| k == "lazy_refcounts");
                if asked {
                    return Err(invalid(
                        "Lazy refcounts only supported with compatibility level 1.1 and above (use compat=1.1 or greater)",
                    ));
                }
                lazy = false;
            }
        }
        // Order matters as in qemu: upgrade first (a v2 header cannot record another refcount
        // width), then change the width, downgrade last.
        let cur_version = self.lock().h.version;
        if version == 3 && cur_version == 2 {
            self.upgrade()?;
        }
        if order != self.geo.refcount_order {
            self.rebuild_refcounts(order)?;
        }
        // qemu 10 no longer changes the backing reference here (rebase does): options that
        // repeat the current file and format exactly are accepted, anything else refused. The
        // check sits where qemu makes it, after the upgrade and the refcount width change.
        if o.backing_file.is_some() || o.backing_fmt.is_some() {
            let cur = self.backing();
            let same = o.backing_file.as_deref() == cur.as_ref().map(|b| b.filename.as_str())
                && o.backing_fmt.as_deref() == cur.as_ref().and_then(|b| b.format.as_deref());
            if !same {
                return Err(invalid(
                    "Cannot amend the backing file\nYou can use 'img rebase' instead.",
                ));
            }
        }
        let cur_lazy = self.lock().h.compatible & header::COMPAT_LAZY_REFCOUNTS != 0;
        if lazy != cur_lazy && version == 3 {
            self.rewrite_header(|h| {
                if lazy {
                    h.compatible |= header::COMPAT_LAZY_REFCOUNTS;
                } else {
                    h.compatible &= !header::COMPAT_LAZY_REFCOUNTS;
                }
            })?;
        }
        if let Some(s) = size {
            if s != self.size {
                // A larger backing image must not show through the new space (as `resize`).
                let zero_new = s > self.size && backing_size.is_some_and(|b| b > self.size);
                self.resize(s, Preallocation::Off, zero_new)?;
            }
        }
        if version == 2 && cur_version == 3 {
            self.downgrade()?;
        }
        if data_file.is_some() || data_raw.is_some() {
            self.rewrite_header(|h| {
                if let Some(name) = &data_file {
                    // An empty name drops it: the image then opens only with one given.
                    let bytes = (!name.is_empty()).then(|| name.clone().into_bytes());
                    h.set_extension(header::EXT_DATA_FILE, bytes);
                }
                match data_raw {
                    Some(true) => h.autoclear |= header::AUTOCLEAR_DATA_FILE_RAW,
                    Some(false) => h.autoclear &= !header::AUTOCLEAR_DATA_FILE_RAW,
                    None => {}
                }
            })?;
        }
        self.flush()
    }

    /// v2 → v3: the header grows, snapshot entries get the extra data v3 requires.
    fn upgrade(&mut self) -> Result<()> {
        let snaps = self.snapshot_list()?;
        if !snaps.is_empty() {
            let size = self.size;
            let fixed: Vec<_> = snaps
                .into_iter()
                .map(|mut s| {
                    s.disk_size.get_or_insert(size);
                    s
                })
                .collect();
            let mut st = self.lock();
            self.replace_snapshot_table(&mut st, &fixed)?;
        }
        self.rewrite_header(|h| {
            h.version = 3;
            h.header_length = header::V3_HEADER_LEN;
            h.refcount_order = 4;
            if h.extension(header::EXT_FEATURE_TABLE).is_none()
                && h.cluster_bits >= header::FEATURE_TABLE_MIN_CLUSTER_BITS
            {
                h.set_extension(header::EXT_FEATURE_TABLE, Some(header::feature_table()));
            }
        })
    }

    /// v3 → v2: refused with incompatible features; zero clusters are expanded (made
    /// unallocated when nothing lies below, else written as zeroes), as qemu does.
    fn downgrade(&mut self) -> Result<()> {
        let g = self.geo;
        // qemu's checks, in qemu's order (so the same message comes first).
        if g.refcount_order != 4 {
            return Err(invalid("compat=0.10 requires refcount_bits=16"));
        }
        if self.data != 0 {
            return Err(invalid("Cannot downgrade an image with a data file"));
        }
        // A v2 snapshot entry records neither a disk size of its own nor more than 32 bits of
        // VM state: such a snapshot could no longer be restored as it was taken.
        let size = self.size;
        if self
            .snapshot_list()?
            .iter()
            .any(|s| s.disk_size.unwrap_or(size) != size || s.vm_state_size > u64::from(u32::MAX))
        {
            return Err(invalid("Internal snapshots prevent downgrade of image"));
        }
        {
            let st = self.lock();
            let bad = st.h.incompatible & !(header::INCOMPAT_DIRTY | header::INCOMPAT_COMPRESSION);
            if bad != 0 {
                return Err(invalid(format!(
                    "Cannot downgrade an image with incompatible features {bad:#x} set"
                )));
            }
        }
        if self.crypt.is_encrypted() {
            // Expanding zero clusters would write plaintext zeroes into encrypted clusters.
            return Err(invalid(
                "Cannot downgrade an encrypted image to compat=0.10",
            ));
        }
        // Compressed clusters made with zstd cannot be described by a v2 image.
        let zstd = self.lock().h.compression == CompressionType::Zstd;
        let has_backing = self.backing().is_some();
        let snaps = self.snapshot_list()?;
        let mut st = self.lock();
        // The active L1 table, then each snapshot's, read one at a time: memory stays that of
        // one table however many snapshots there are.
        for t in 0..=snaps.len() {
            let l1 = match t.checked_sub(1).and_then(|i| snaps.get(i)) {
                None => st.l1.clone(),
                Some(s) => super::read_table(self.file(), s.l1_offset, u64::from(s.l1_size))
                    .ctx(self.file().path())?,
            };
            for &e in &l1 {
                let l2off = e & OFFSET_MASK;
                if l2off == 0 {
                    continue;
                }
                for j in 0..g.l2_entries {
                    let entry = self.l2_entry(&mut st, l2off, j)?;
                    match entry.kind_ext(0, false) {
                        Kind::Compressed if zstd => {
                            return Err(invalid(
                                "Cannot downgrade an image with zstd-compressed clusters",
                            ));
                        }
                        Kind::ZeroPlain | Kind::ZeroAlloc => {}
                        _ => continue,
                    }
                    let new = if !has_backing && entry.kind_ext(0, false) == Kind::ZeroPlain {
                        Entry::default()
                    } else {
                        // Give it a zero-filled cluster of its own.
                        let host = match entry.host() {
                            Some(h) if entry.copied() => h,
                            _ => self.alloc_clusters(&mut st, 1)?,
                        };
                        // Zeroed by the file system where it can (no data written), as qemu.
                        self.file()
                            .write_zeroes(host, g.cluster_size, false)
                            .ctx(self.file().path())?;
                        Entry {
                            word: (host | COPIED) & !ZERO_FLAG,
                            bitmap: 0,
                        }
                    };
                    // Shared L2 tables are written in place: the expansion is valid for every
                    // snapshot that shares them (refcounts are settled below).
                    self.set_l2_entry(&mut st, l2off, j, new)?;
                }
            }
        }
        drop(st);
        if !snaps.is_empty() {
            // A cluster placed in an L2 table that snapshots share needs their references too.
            self.check(crate::Repair::All)?;
            let mut st = self.lock();
            self.fix_copied_flags(&mut st)?;
        }
        self.rewrite_header(|h| {
            h.version = 2;
            h.header_length = header::V2_HEADER_LEN;
            h.incompatible = 0;
            h.compatible = 0;
            h.autoclear = 0;
            h.compression = CompressionType::Zlib;
        })?;
        self.compression = CompressionType::Zlib;
        Ok(())
    }

    /// Writes fresh refcount structures of width `1 << order` past the end of the file, counted
    /// from the metadata, and switches the header to them; the old ones become free space.
    pub(super) fn rebuild_refcounts(&mut self, order: u32) -> Result<()> {
        let mut st = self.lock();
        let (computed, report) = count_references(self, &mut st, false)?;
        if report.corruptions > 0 {
            return Err(self.err(Error::DirtyInconsistent));
        }
        let fresh = self.write_refcounts(&mut st, &computed, order)?;
        let mut h = st.h.clone();
        h.refcount_order = order;
        h.refcount_table_offset = fresh.table_offset;
        h.refcount_table_clusters = fresh.table_clusters;
        let hdr = h.serialize().map_err(|e| self.err(e))?;
        let path = self.file().path().to_owned();
        self.file().write_at(&hdr, 0).ctx(&path)?;
        self.file().flush().ctx(&path)?;
        st.h = h;
        fresh.install(&mut st);
        let new_geo = Geometry::new(&st.h);
        drop(st);
        self.geo = new_geo;
        Ok(())
    }
}
