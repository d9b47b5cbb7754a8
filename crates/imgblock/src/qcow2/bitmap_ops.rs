//! Managing persistent dirty bitmaps (`img bitmap`, `img convert --bitmaps`): adding, removing,
//! clearing, enabling and disabling them, reading their bits and merging bits into them.
//!
//! Every change writes what is new into fresh clusters (a bitmap table, its data clusters, a
//! new directory), flushes, switches the header's bitmaps extension to the new directory in one
//! header write, and only then frees what the old directory used. An interruption leaves the
//! old bitmaps or the new ones, and at most leaked clusters. The overlap map is rebuilt after
//! the switch, so it covers the new directory.

use std::sync::atomic::Ordering;

use super::bitmap::{
    table_entries, table_entry, Bitmap, Extension, Loaded, RawExtension, FLAG_AUTO, FLAG_IN_USE,
    MAX_BITMAPS, MAX_DIRECTORY_BYTES, MAX_NAME_LEN, MAX_TABLE_ENTRIES, TABLE_ALL_ONES,
};
use super::{header, Qcow2};
use crate::bitmaps::{self, BitmapError, DirtyBits};
use crate::driver::{BitmapInfo, Driver};
use crate::error::IoContext;
use crate::Result;

impl Qcow2 {
    fn check_bitmaps_writable(&self) -> Result<()> {
        if self.writable {
            Ok(())
        } else {
            Err(crate::Error::ReadOnly {
                path: self.file().path().to_owned(),
            })
        }
    }

    /// The bitmaps as stored, after storing the bits of what was written in this session.
    fn stored_bitmaps(&self) -> Result<Vec<Bitmap>> {
        self.store_bitmaps()?;
        Ok(self
            .lock()
            .bitmaps
            .as_ref()
            .map(|b| b.list.clone())
            .unwrap_or_default())
    }

    /// The index of the bitmap `name`.
    fn find_bitmap(&self, list: &[Bitmap], name: &str) -> Result<usize> {
        list.iter()
            .position(|b| b.name == name)
            .ok_or_else(|| self.bitmap_error(BitmapError::NotFound(name.to_owned())))
    }

    /// Refuses a bitmap left in use: its bits cannot be trusted (only removing it is allowed).
    fn check_consistent(&self, bm: &Bitmap) -> Result<()> {
        if bm.flags & FLAG_IN_USE != 0 {
            return Err(self.bitmap_error(BitmapError::Inconsistent(bm.name.clone())));
        }
        Ok(())
    }

    /// The bitmaps as `info` lists them, in directory order.
    pub(super) fn bitmap_infos(&self) -> Vec<BitmapInfo> {
        self.lock()
            .bitmaps
            .iter()
            .flat_map(|b| &b.list)
            .map(|b| BitmapInfo {
                name: b.name.clone(),
                granularity: b.granularity(),
                enabled: b.flags & FLAG_AUTO != 0,
                in_use: b.flags & FLAG_IN_USE != 0,
            })
            .collect()
    }

    /// Creates an empty bitmap at the end of the directory, with qemu's checks in qemu's order.
    pub(super) fn add_bitmap(
        &self,
        name: &str,
        granularity: Option<u64>,
        enabled: bool,
    ) -> Result<()> {
        let cs = self.geo.cluster_size;
        let refuse = |e| Err(self.bitmap_error(e));
        if name.is_empty() {
            return refuse(BitmapError::EmptyName);
        }
        let g = granularity.unwrap_or_else(|| bitmaps::default_granularity(Some(cs)));
        let gbits = bitmaps::check_granularity(g).map_err(|e| self.bitmap_error(e))?;
        if self.lock().h.version < 3 {
            return refuse(BitmapError::VersionTwo);
        }
        if self.size == 0 {
            // Its table would be empty, which no reader accepts.
            return refuse(BitmapError::ZeroSize);
        }
        if bitmaps::bitmap_bytes(self.size, gbits) > bitmaps::MAX_BITMAP_BYTES
            || table_entries(self.size, gbits, cs) > u64::from(MAX_TABLE_ENTRIES)
        {
            return refuse(BitmapError::TooLarge);
        }
        if name.len() > usize::from(MAX_NAME_LEN) {
            return refuse(BitmapError::NameTooLong);
        }
        self.check_bitmaps_writable()?;
        let mut list = self.stored_bitmaps()?;
        if list.len() >= MAX_BITMAPS as usize {
            return refuse(BitmapError::TooMany);
        }
        let mut entry = Bitmap {
            table_offset: 0,
            table_size: 0,
            flags: if enabled { FLAG_AUTO } else { 0 },
            granularity_bits: gbits,
            name: name.to_owned(),
            extra_data: Vec::new(),
            entry_offset: 0,
        };
        let dir: usize = list.iter().map(Bitmap::entry_len).sum();
        if (dir + entry.entry_len()) as u64 > MAX_DIRECTORY_BYTES {
            return refuse(BitmapError::DirectoryFull);
        }
        if list.iter().any(|b| b.name == name) {
            return refuse(BitmapError::Exists(name.to_owned()));
        }
        let mut st = self.lock();
        (entry.table_offset, entry.table_size) = self.write_bits(&mut st, gbits, None)?;
        drop(st);
        list.push(entry);
        self.switch_directory(list, Vec::new())
    }

    /// Deletes a bitmap (an inconsistent one too) and frees its table and data clusters.
    pub(super) fn remove_bitmap(&self, name: &str) -> Result<()> {
        self.check_bitmaps_writable()?;
        let mut list = self.stored_bitmaps()?;
        let i = self.find_bitmap(&list, name)?;
        let frees = self.bitmap_clusters(&list[i])?;
        list.remove(i);
        self.switch_directory(list, frees)
    }

    /// Replaces a bitmap's bits: `None` makes them all clean, `Some` ORs bits into them.
    fn rewrite_bitmap(&self, name: &str, merge: Option<&DirtyBits>) -> Result<()> {
        self.check_bitmaps_writable()?;
        let mut list = self.stored_bitmaps()?;
        let i = self.find_bitmap(&list, name)?;
        self.check_consistent(&list[i])?;
        let bits = match merge {
            Some(src) => {
                if src.disk_size() != self.size {
                    return Err(self.bitmap_error(BitmapError::SizeMismatch {
                        dest: self.size,
                        src: src.disk_size(),
                    }));
                }
                let mut bits = self.read_bits(&list[i])?;
                bits.merge(src).map_err(|e| self.bitmap_error(e))?;
                Some(bits)
            }
            None => None,
        };
        let frees = self.bitmap_clusters(&list[i])?;
        let mut st = self.lock();
        let (table, entries) = self.write_bits(&mut st, list[i].granularity_bits, bits.as_ref())?;
        drop(st);
        list[i].table_offset = table;
        list[i].table_size = entries;
        self.switch_directory(list, frees)
    }

    /// Makes every bit of a bitmap clean: a new all-clean table, the old one and its data
    /// clusters freed.
    pub(super) fn clear_bitmap(&self, name: &str) -> Result<()> {
        self.rewrite_bitmap(name, None)
    }

    /// ORs `bits` into a bitmap, written as a new table and data clusters.
    pub(super) fn merge_into_bitmap(&self, name: &str, bits: &DirtyBits) -> Result<()> {
        self.rewrite_bitmap(name, Some(bits))
    }

    /// Sets or clears a bitmap's `auto` flag (whether it records writes).
    pub(super) fn enable_bitmap(&self, name: &str, enabled: bool) -> Result<()> {
        self.check_bitmaps_writable()?;
        let mut list = self.stored_bitmaps()?;
        let i = self.find_bitmap(&list, name)?;
        self.check_consistent(&list[i])?;
        if enabled {
            list[i].flags |= FLAG_AUTO;
        } else {
            list[i].flags &= !FLAG_AUTO;
        }
        self.switch_directory(list, Vec::new())
    }

    /// Reads a bitmap's bits (what this session wrote included).
    pub(super) fn read_bitmap(&self, name: &str) -> Result<DirtyBits> {
        let list = self.stored_bitmaps()?;
        let i = self.find_bitmap(&list, name)?;
        self.check_consistent(&list[i])?;
        self.read_bits(&list[i])
    }

    /// The bits of a consistent bitmap, from its table and data clusters.
    fn read_bits(&self, bm: &Bitmap) -> Result<DirtyBits> {
        let cs = self.geo.cluster_size;
        let f = self.file();
        // A granularity of 2^9..=2^31 (checked on load); the size is capped.
        let mut bits =
            DirtyBits::new(self.size, bm.granularity()).map_err(|e| self.bitmap_error(e))?;
        let len = bits.as_bytes().len() as u64;
        // Loading checked that the table of a consistent bitmap covers exactly the disk.
        let table =
            super::read_table(f, bm.table_offset, u64::from(bm.table_size)).ctx(f.path())?;
        let mut buf = Vec::new();
        for (i, &e) in table.iter().enumerate() {
            let start = i as u64 * cs;
            if start >= len {
                break;
            }
            let at = bm.table_offset + i as u64 * 8;
            match table_entry(e, at, cs).map_err(|err| self.err(err))? {
                Some(off) => {
                    let n = (len - start).min(cs);
                    // At most one cluster (2 MiB).
                    buf.resize(usize::try_from(n).unwrap_or(0), 0);
                    f.read_at(&mut buf, off).ctx(f.path())?;
                    bits.or_bytes(start, &buf);
                }
                None if e & TABLE_ALL_ONES != 0 => bits.fill_bytes(start, cs),
                None => {}
            }
        }
        Ok(bits)
    }

    /// Writes a bitmap table for a bitmap of `granularity_bits` (and a data cluster for each
    /// cluster of `bits` with a bit set; `None`: all clean) into new clusters. Returns the
    /// table's offset and entries.
    fn write_bits(
        &self,
        st: &mut super::State,
        granularity_bits: u8,
        bits: Option<&DirtyBits>,
    ) -> Result<(u64, u32)> {
        let cs = self.geo.cluster_size;
        let f = self.file();
        let entries = table_entries(self.size, granularity_bits, cs);
        let entries32 = u32::try_from(entries)
            .ok()
            .filter(|&n| n <= MAX_TABLE_ENTRIES)
            .ok_or_else(|| self.bitmap_error(BitmapError::TooLarge))?;
        // At most MAX_TABLE_ENTRIES (128 Mi) entries.
        let mut table = vec![0u64; usize::try_from(entries).unwrap_or(0)];
        if let Some(b) = bits {
            let chunk = usize::try_from(cs).unwrap_or(usize::MAX);
            for (slot, data) in table.iter_mut().zip(b.as_bytes().chunks(chunk)) {
                if data.iter().all(|&x| x == 0) {
                    continue;
                }
                let mut cluster = data.to_vec();
                cluster.resize(chunk, 0);
                let at = self.alloc_clusters(st, 1)?;
                f.write_at(&cluster, at).ctx(f.path())?;
                *slot = at;
            }
        }
        let mut bytes: Vec<u8> = table.iter().flat_map(|e| e.to_be_bytes()).collect();
        let clusters = (bytes.len() as u64).div_ceil(cs).max(1);
        bytes.resize(usize::try_from(clusters * cs).unwrap_or(0), 0);
        let at = self.alloc_clusters(st, clusters)?;
        f.write_at(&bytes, at).ctx(f.path())?;
        Ok((at, entries32))
    }

    /// The clusters a bitmap owns, as (offset, clusters) runs: its data clusters and its table.
    fn bitmap_clusters(&self, bm: &Bitmap) -> Result<Vec<(u64, u64)>> {
        let cs = self.geo.cluster_size;
        let f = self.file();
        // Loading bounded the table (MAX_TABLE_ENTRIES entries, inside the file).
        let table =
            super::read_table(f, bm.table_offset, u64::from(bm.table_size)).ctx(f.path())?;
        let mut out = Vec::new();
        for (i, &e) in table.iter().enumerate() {
            let at = bm.table_offset + i as u64 * 8;
            if let Some(off) = table_entry(e, at, cs).map_err(|err| self.err(err))? {
                out.push((off, 1));
            }
        }
        out.push((bm.table_offset, (u64::from(bm.table_size) * 8).div_ceil(cs)));
        Ok(out)
    }

    /// Writes `list` as a new directory, points the header at it (or drops the extension and
    /// its autoclear bit when the list is empty, as qemu does), then frees the old directory
    /// and the clusters in `frees`.
    fn switch_directory(&self, mut list: Vec<Bitmap>, mut frees: Vec<(u64, u64)>) -> Result<()> {
        let cs = self.geo.cluster_size;
        let f = self.file();
        let mut pos = 0u64;
        for bm in &mut list {
            bm.entry_offset = pos;
            pos += bm.entry_len() as u64;
        }
        let mut st = self.lock();
        if let Some(old) = &st.bitmaps {
            frees.push((
                old.ext.directory_offset,
                old.ext.directory_size.div_ceil(cs),
            ));
        }
        let ext = if list.is_empty() {
            None
        } else {
            let mut dir: Vec<u8> = list.iter().flat_map(Bitmap::to_bytes).collect();
            let size = dir.len() as u64;
            let clusters = size.div_ceil(cs);
            dir.resize(usize::try_from(clusters * cs).unwrap_or(0), 0);
            let at = self.alloc_clusters(&mut st, clusters)?;
            f.write_at(&dir, at).ctx(f.path())?;
            Some(Extension {
                // At most MAX_BITMAPS (checked when adding).
                nb_bitmaps: u32::try_from(list.len()).unwrap_or(MAX_BITMAPS),
                directory_size: size,
                directory_offset: at,
            })
        };
        drop(st);
        // Tables, data and directory reach the disk before the header names them.
        f.flush().ctx(f.path())?;
        self.rewrite_header(|h| match &ext {
            Some(e) => {
                let raw = RawExtension {
                    nb_bitmaps: e.nb_bitmaps,
                    reserved: 0,
                    directory_size: e.directory_size,
                    directory_offset: e.directory_offset,
                };
                h.set_extension(header::EXT_BITMAPS, Some(raw.to_bytes()));
                h.autoclear |= header::AUTOCLEAR_BITMAPS;
            }
            None => {
                h.set_extension(header::EXT_BITMAPS, None);
                h.autoclear &= !header::AUTOCLEAR_BITMAPS;
            }
        })?;
        let tracks = list.iter().any(Bitmap::tracks_writes);
        let mut st = self.lock();
        st.bitmaps = ext.map(|ext| Loaded {
            ext,
            list,
            in_use_on_disk: false,
            written: None,
        });
        st.meta_invalidate();
        self.tracks_bitmaps.store(tracks, Ordering::Relaxed);
        // Freed clusters are discarded, as qemu discards freed bitmap clusters.
        for (off, n) in frees {
            for i in 0..n {
                self.update_refcount(&mut st, off + i * cs, -1, true)?;
            }
        }
        drop(st);
        f.flush().ctx(f.path())?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::bitmaps::{BitmapError, DirtyBits};
    use crate::{create, CreateOptions, Format, Image, OpenOptions};

    fn image(dir: &tempfile::TempDir, size: u64, opts: &[(&str, &str)]) -> Image {
        let p = dir.path().join("x.qcow2");
        let mut o = CreateOptions::new(size);
        for (k, v) in opts {
            o.opts.push(((*k).into(), (*v).into()));
        }
        create(&p, Format::Qcow2, &o).unwrap();
        let oo = OpenOptions {
            writable: true,
            ..OpenOptions::default()
        };
        Image::open(&p, &oo).unwrap()
    }

    fn bitmap_err(r: crate::Result<()>) -> BitmapError {
        match r {
            Err(crate::Error::Bitmap { source, .. }) => source,
            other => panic!("{other:?}"),
        }
    }

    /// The byte offset of the bitmap directory in an image file's bytes (from the bitmaps
    /// header extension).
    fn directory_at(b: &[u8]) -> usize {
        let ext = b
            .windows(4)
            .position(|w| w == [0x23, 0x85, 0x28, 0x75])
            .unwrap();
        usize::try_from(u64::from_be_bytes(
            b[ext + 24..ext + 32].try_into().unwrap(),
        ))
        .unwrap()
    }

    fn check_clean(img: &Image) {
        let r = img.driver().check(crate::Repair::None).unwrap();
        assert_eq!((r.corruptions, r.leaks), (0, 0), "{r:?}");
    }

    #[test]
    fn add_merge_read_clear_remove_keeps_image_consistent() {
        let dir = tempfile::tempdir().unwrap();
        let img = image(&dir, 8 << 20, &[]);
        let d = img.driver();
        d.bitmap_add("a", None, true).unwrap();
        d.bitmap_add("b", Some(512), false).unwrap();
        let list = d.bitmap_list();
        assert_eq!(list.len(), 2);
        assert_eq!((list[0].granularity, list[0].enabled), (65536, true));
        assert_eq!((list[1].granularity, list[1].enabled), (512, false));
        assert!(d.bitmap_read("a").unwrap().is_clean());
        let mut bits = DirtyBits::new(8 << 20, 512).unwrap();
        bits.set_range(1000, 1001);
        bits.set_range(5 << 20, (5 << 20) + 70_000);
        d.bitmap_merge("b", &bits).unwrap();
        d.bitmap_merge("a", &bits).unwrap();
        check_clean(&img);
        assert_eq!(d.bitmap_read("b").unwrap(), bits);
        assert_eq!(
            d.bitmap_read("a").unwrap().dirty_ranges(),
            vec![(0, 65536), (5 << 20, (5 << 20) + 131_072)]
        );
        d.bitmap_set_enabled("b", true).unwrap();
        d.bitmap_set_enabled("a", false).unwrap();
        let list = d.bitmap_list();
        assert!(!list[0].enabled && list[1].enabled);
        d.bitmap_clear("b").unwrap();
        assert!(d.bitmap_read("b").unwrap().is_clean());
        check_clean(&img);
        d.bitmap_remove("a").unwrap();
        d.bitmap_remove("b").unwrap();
        assert!(d.bitmap_list().is_empty());
        check_clean(&img);
        let path = dir.path().join("x.qcow2");
        drop(img);
        // No bitmaps: no extension and no autoclear bit, as qemu leaves it.
        let b = std::fs::read(&path).unwrap();
        assert_eq!(u64::from_be_bytes(b[88..96].try_into().unwrap()), 0);
    }

    #[test]
    fn bitmaps_survive_reopen_and_record_writes_once_added() {
        let dir = tempfile::tempdir().unwrap();
        let img = image(&dir, 4 << 20, &[]);
        img.driver().bitmap_add("w", Some(4096), true).unwrap();
        img.write_at(&[1u8; 4096], 8192).unwrap();
        img.flush().unwrap();
        drop(img);
        let p = dir.path().join("x.qcow2");
        let img = Image::open(&p, &OpenOptions::default()).unwrap();
        assert_eq!(
            img.driver().bitmap_read("w").unwrap().dirty_ranges(),
            vec![(8192, 12288)]
        );
        check_clean(&img);
    }

    #[test]
    fn add_is_refused_in_qemus_order() {
        let dir = tempfile::tempdir().unwrap();
        let img = image(&dir, 1 << 20, &[]);
        let d = img.driver();
        assert_eq!(
            bitmap_err(d.bitmap_add("", Some(3), true)),
            BitmapError::EmptyName
        );
        assert_eq!(
            bitmap_err(d.bitmap_add("x", Some(3000), true)),
            BitmapError::BadGranularity
        );
        let long = "n".repeat(1024);
        assert_eq!(
            bitmap_err(d.bitmap_add(&long, None, true)),
            BitmapError::NameTooLong
        );
        d.bitmap_add(&long[..1023], None, true).unwrap();
        d.bitmap_add("x", None, true).unwrap();
        assert_eq!(
            bitmap_err(d.bitmap_add("x", None, false)),
            BitmapError::Exists("x".into())
        );
        assert_eq!(
            bitmap_err(d.bitmap_remove("nope")),
            BitmapError::NotFound("nope".into())
        );
    }

    #[test]
    fn add_to_version_2_or_oversized_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let img = image(&dir, 1 << 20, &[("compat", "0.10")]);
        assert!(!img.driver().supports_bitmaps());
        assert_eq!(
            bitmap_err(img.driver().bitmap_add("x", None, true)),
            BitmapError::VersionTwo
        );
        let dir = tempfile::tempdir().unwrap();
        let img = image(&dir, (2 << 40) + 512, &[]);
        assert_eq!(
            bitmap_err(img.driver().bitmap_add("x", Some(512), true)),
            BitmapError::TooLarge
        );
        img.driver().bitmap_add("x", Some(1024), true).unwrap();
    }

    #[test]
    fn inconsistent_bitmap_can_only_be_removed() {
        let dir = tempfile::tempdir().unwrap();
        let img = image(&dir, 1 << 20, &[]);
        img.driver().bitmap_add("iu", None, true).unwrap();
        drop(img);
        // Set the in-use flag by hand, as a crash while the image was open would leave it.
        let p = dir.path().join("x.qcow2");
        let mut b = std::fs::read(&p).unwrap();
        let dir_at = directory_at(&b);
        b[dir_at + 15] |= 1;
        std::fs::write(&p, &b).unwrap();
        let oo = OpenOptions {
            writable: true,
            ..OpenOptions::default()
        };
        let img = Image::open(&p, &oo).unwrap();
        let d = img.driver();
        let iu = || BitmapError::Inconsistent("iu".into());
        assert_eq!(bitmap_err(d.bitmap_clear("iu")), iu());
        assert_eq!(bitmap_err(d.bitmap_set_enabled("iu", false)), iu());
        let bits = DirtyBits::new(1 << 20, 65536).unwrap();
        assert_eq!(bitmap_err(d.bitmap_merge("iu", &bits)), iu());
        assert!(matches!(
            d.bitmap_read("iu"),
            Err(crate::Error::Bitmap { .. })
        ));
        d.bitmap_remove("iu").unwrap();
        check_clean(&img);
    }

    #[test]
    fn merge_of_other_disk_size_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let img = image(&dir, 1 << 20, &[]);
        img.driver().bitmap_add("m", None, true).unwrap();
        let bits = DirtyBits::new(2 << 20, 65536).unwrap();
        assert_eq!(
            bitmap_err(img.driver().bitmap_merge("m", &bits)),
            BitmapError::SizeMismatch {
                dest: 1 << 20,
                src: 2 << 20
            }
        );
    }

    #[test]
    fn corrupt_table_entry_is_reported_not_panicking() {
        let dir = tempfile::tempdir().unwrap();
        let img = image(&dir, 1 << 20, &[]);
        img.driver().bitmap_add("c", None, true).unwrap();
        let mut bits = DirtyBits::new(1 << 20, 65536).unwrap();
        bits.set_range(0, 1);
        img.driver().bitmap_merge("c", &bits).unwrap();
        drop(img);
        let p = dir.path().join("x.qcow2");
        let mut b = std::fs::read(&p).unwrap();
        let dir_at = directory_at(&b);
        let table = usize::try_from(u64::from_be_bytes(
            b[dir_at..dir_at + 8].try_into().unwrap(),
        ))
        .unwrap();
        b[table + 7] |= 2;
        std::fs::write(&p, &b).unwrap();
        let img = Image::open(&p, &OpenOptions::default()).unwrap();
        assert!(matches!(
            img.driver().bitmap_read("c"),
            Err(crate::Error::Qcow2 {
                source: crate::qcow2::Error::BadBitmapTable { .. },
                ..
            })
        ));
    }
}
