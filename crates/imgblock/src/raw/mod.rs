//! The raw format: guest offset equals host offset.

use std::path::Path;
use std::sync::Arc;

use crate::driver::{CompressedRef, Driver, HostExtent, HostOffset, Mapping};
use crate::error::IoContext;
use crate::storage::{FileStorage, Storage};
use crate::{CreateOptions, Error, Format, Result};

/// Preallocation modes qemu-img offers for raw (and, beyond metadata, for qcow2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Preallocation {
    /// Sparse.
    #[default]
    Off,
    /// qcow2 only: allocate metadata and leave data sparse.
    Metadata,
    /// Reserve space with fallocate.
    Falloc,
    /// Write zeroes.
    Full,
}

impl Preallocation {
    /// Parses qemu's names.
    ///
    /// # Errors
    /// For any other name.
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "off" => Preallocation::Off,
            "metadata" => Preallocation::Metadata,
            "falloc" => Preallocation::Falloc,
            "full" => Preallocation::Full,
            _ => {
                return Err(Error::InvalidOption(format!(
                    "invalid parameter value: {s}"
                )))
            }
        })
    }
}

/// A window into the file that a raw image shows as its disk (qemu's raw `offset` and `size`
/// options: a partition of a whole-disk image, say).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Window {
    /// Where the disk starts in the file.
    pub offset: u64,
    /// The disk's size; `None`: up to the end of the file, following it when it changes.
    pub size: Option<u64>,
    /// `offset` and `size` as the name spelled them, as JSON values (`"8M"`, `8388608`), for
    /// naming the image as qemu does; `None`: not given, or not spelled.
    pub spelled: (Option<String>, Option<String>),
}

impl Window {
    /// Where the window lies in a file of `len` bytes: its offset and length, checked as qemu's
    /// raw driver checks them.
    ///
    /// # Errors
    /// An offset past the end, a size that is not whole sectors or that runs past the end.
    pub fn fit(&self, len: u64) -> Result<(u64, u64)> {
        let offset = self.offset;
        if offset > len {
            return Err(Error::InvalidOption(format!(
                "Offset ({offset}) cannot be greater than size of the containing file ({len})"
            )));
        }
        match self.size {
            // A size that is not whole sectors would be rounded up past the window.
            Some(s) if s % 512 != 0 => Err(Error::InvalidOption(
                "Specified size is not multiple of 512".into(),
            )),
            Some(s) if s > len - offset => Err(Error::InvalidOption(format!(
                "The sum of offset ({offset}) and size ({s}) has to be smaller or equal to the  actual size of the containing file ({len})"
            ))),
            Some(s) => Ok((offset, s)),
            None => Ok((offset, len - offset)),
        }
    }

    /// The option qemu names when a format other than raw is given a window.
    pub fn option_name(&self) -> &'static str {
        if self.offset != 0 || self.spelled.0.is_some() {
            "offset"
        } else {
            "size"
        }
    }

    /// The `json:` name of this window of `file` in the format `driver` (probed when `None`),
    /// with its keys in qemu's order: a windowed raw image is named so in `info`, as by qemu-img.
    pub fn json_name(&self, driver: Option<&str>, file: &Path) -> String {
        let q = |s: &str| serde_json::Value::from(s).to_string();
        let mut s = String::from("json:{");
        match (&self.spelled.0, self.offset) {
            (Some(text), _) => s.push_str(&format!("\"offset\": {text}, ")),
            (None, 0) => {}
            (None, n) => s.push_str(&format!("\"offset\": \"{n}\", ")),
        }
        if let Some(d) = driver {
            s.push_str(&format!("\"driver\": {}, ", q(d)));
        }
        match (&self.spelled.1, self.size) {
            (Some(text), _) => s.push_str(&format!("\"size\": {text}, ")),
            (None, Some(n)) => s.push_str(&format!("\"size\": \"{n}\", ")),
            (None, None) => {}
        }
        s.push_str(&format!(
            "\"file\": {{\"driver\": \"file\", \"filename\": {}}}}}",
            q(&file.display().to_string())
        ));
        s
    }
}

/// A raw image.
#[derive(Debug)]
pub struct Raw {
    storage: Arc<dyn Storage>,
    size: u64,
    /// Where guest offset 0 lies in the file.
    offset: u64,
    /// The size was given (`size=`): the disk cannot be resized.
    fixed: bool,
}

impl Raw {
    /// Opens a raw image over a storage.
    ///
    /// # Errors
    /// When the size cannot be read.
    pub fn open(storage: Arc<dyn Storage>) -> Result<Raw> {
        Self::open_window(storage, Window::default())
    }

    /// Opens a raw image that shows `window` of the storage as its disk.
    ///
    /// # Errors
    /// When the size cannot be read, or the window does not fit the file (in qemu's words).
    pub fn open_window(storage: Arc<dyn Storage>, window: Window) -> Result<Raw> {
        let len = storage.size().ctx(storage.path())?;
        let (offset, size) = window.fit(len)?;
        // qemu sizes disks in whole sectors: a file whose length is not a multiple of 512
        // reads as zeroes up to the next sector boundary.
        let size = size.div_ceil(512).saturating_mul(512);
        Ok(Raw {
            storage,
            size,
            offset,
            fixed: window.size.is_some(),
        })
    }

    /// Where guest `offset` lies in the file.
    fn host(&self, offset: u64) -> HostOffset {
        HostOffset(self.offset.saturating_add(offset))
    }
}

/// A raw image has no compressed form: `convert -c` refuses it.
pub const WRITES_COMPRESSED: bool = false;

/// Options raw accepts on create, with qemu-img's help text.
pub const CREATE_OPTIONS: &[(&str, &str)] = &[
    (
        "preallocation",
        "Preallocation mode (allowed values: off, falloc, full)",
    ),
    ("size", "Virtual disk size"),
];

/// Creates a raw image.
///
/// # Errors
/// When an option is unknown, or I/O fails.
pub fn create(path: &Path, opts: &CreateOptions) -> Result<()> {
    let mut prealloc = Preallocation::Off;
    for (k, v) in &opts.opts {
        match k.as_str() {
            "preallocation" => prealloc = Preallocation::parse(v)?,
            _ => {
                return Err(Error::InvalidOption(format!(
                    "Invalid parameter '{k}' for format raw"
                )))
            }
        }
    }
    if prealloc == Preallocation::Metadata {
        return Err(Error::InvalidOption(
            "Unsupported preallocation mode: metadata".into(),
        ));
    }
    if opts.backing_file.is_some() {
        return Err(Error::InvalidOption(
            "raw images cannot have a backing file".into(),
        ));
    }
    if opts.backing_fmt.is_some() {
        // Not an option of raw's: qemu refuses it by name.
        return Err(Error::InvalidOption(
            "Invalid parameter 'backing_fmt'".into(),
        ));
    }
    let size = opts
        .size
        .ok_or_else(|| Error::InvalidOption("Image creation needs a size parameter".into()))?;
    // qemu sizes images in whole sectors.
    let size = size.div_ceil(512).saturating_mul(512);
    let s = FileStorage::create_with(path, opts.file)?;
    crate::storage::set_len_preallocated(&s, 0, size, prealloc).ctx(path)?;
    if prealloc == Preallocation::Off {
        // Like qemu, allocate the first 4 KiB so that later alignment probing finds real data.
        s.write_at(&vec![0u8; usize::try_from(size.min(4096)).unwrap_or(0)], 0)
            .ctx(path)?;
    }
    s.flush().ctx(path)
}

impl Driver for Raw {
    fn format(&self) -> Format {
        Format::Raw
    }
    fn virtual_size(&self) -> u64 {
        self.size
    }
    fn storage(&self, _file: usize) -> &Arc<dyn Storage> {
        &self.storage
    }
    fn snapshot_view(&self, snap: &crate::SnapshotRef) -> Result<Box<dyn Driver>> {
        Err(Error::NoSuchSnapshot {
            path: self.storage.path().to_owned(),
            name: snap.label().to_owned(),
        })
    }
    fn map(&self, offset: u64, len: u64) -> Result<(Mapping, u64)> {
        if offset >= self.size {
            return Ok((Mapping::Eof, len));
        }
        Ok((
            Mapping::Data {
                file: 0,
                offset: self.host(offset),
                writable: true,
            },
            len.min(self.size - offset),
        ))
    }
    fn host_holes_are_zero(&self) -> bool {
        true
    }
    fn has_zero_init(&self) -> bool {
        // A block device holds whatever was written to it before: zeroes must be written.
        !self.storage.is_device()
    }
    fn read_compressed(&self, _c: &CompressedRef, _out: &mut [u8]) -> Result<()> {
        Err(Error::Unsupported {
            path: self.storage.path().to_owned(),
            what: "raw has no compressed data".into(),
        })
    }
    fn allocate(&self, offset: u64, len: u64) -> Result<Vec<HostExtent>> {
        Ok(vec![HostExtent {
            guest: offset,
            len,
            file: 0,
            host: self.host(offset),
        }])
    }
    fn commit(&self, _extents: &[HostExtent]) -> Result<()> {
        Ok(())
    }
    fn zero(&self, offset: u64, len: u64, unmap: bool) -> Result<bool> {
        self.storage
            .write_zeroes(self.host(offset).0, len, unmap)
            .ctx(self.storage.path())?;
        Ok(true)
    }
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.storage
            .discard(self.host(offset).0, len)
            .ctx(self.storage.path())
    }
    fn flush(&self) -> Result<()> {
        self.storage.flush().ctx(self.storage.path())
    }
    fn resize(&mut self, new_size: u64, prealloc: Preallocation, _zero_new: bool) -> Result<()> {
        let s = &self.storage;
        let old = self.size;
        if s.is_device() && new_size != old {
            return Err(Error::Unsupported {
                path: s.path().to_owned(),
                what: "Cannot resize device files".into(),
            });
        }
        if self.fixed {
            return Err(Error::Unsupported {
                path: s.path().to_owned(),
                what: "Cannot resize fixed-size raw disks".into(),
            });
        }
        if prealloc == Preallocation::Metadata {
            return Err(Error::InvalidOption(
                "Unsupported preallocation mode: metadata".into(),
            ));
        }
        let (from, to) = (self.host(old).0, self.host(new_size).0);
        crate::storage::set_len_preallocated(s.as_ref(), from, to, prealloc).ctx(s.path())?;
        self.size = new_size;
        s.flush().ctx(s.path())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file_of(len: u64) -> (tempfile::TempDir, Arc<dyn Storage>) {
        let dir = tempfile::tempdir().unwrap();
        let s = FileStorage::create(&dir.path().join("d")).unwrap();
        s.set_len(len).unwrap();
        (dir, Arc::new(s))
    }

    fn window(offset: u64, size: Option<u64>) -> Window {
        Window {
            offset,
            size,
            ..Window::default()
        }
    }

    #[test]
    fn a_window_maps_guest_offsets_past_its_start() {
        let (_d, s) = file_of(10 << 20);
        let r = Raw::open_window(s, window(1 << 20, Some(2 << 20))).unwrap();
        assert_eq!(r.virtual_size(), 2 << 20);
        let (m, n) = r.map(4096, 8 << 20).unwrap();
        assert_eq!(n, (2 << 20) - 4096);
        assert!(matches!(m, Mapping::Data { offset: HostOffset(o), .. } if o == (1 << 20) + 4096));
        assert!(matches!(r.map(2 << 20, 1).unwrap().0, Mapping::Eof));
        assert_eq!(
            r.allocate(512, 512).unwrap()[0].host,
            HostOffset((1 << 20) + 512)
        );
    }

    #[test]
    fn an_open_ended_window_runs_to_the_end_of_the_file_in_whole_sectors() {
        let (_d, s) = file_of(10 << 20);
        let r = Raw::open_window(s, window(1000, None)).unwrap();
        assert_eq!(r.virtual_size(), ((10 << 20) - 1000u64).div_ceil(512) * 512);
    }

    #[test]
    fn windows_that_do_not_fit_are_refused_in_qemus_words() {
        let (_d, s) = file_of(4096);
        let err = |w| Raw::open_window(s.clone(), w).unwrap_err().to_string();
        assert_eq!(
            err(window(4097, None)),
            "Offset (4097) cannot be greater than size of the containing file (4096)"
        );
        assert_eq!(
            err(window(0, Some(1000))),
            "Specified size is not multiple of 512"
        );
        assert!(err(window(512, Some(4096))).starts_with("The sum of offset (512) and size (4096)"));
        assert!(Raw::open_window(s.clone(), window(4096, None)).is_ok());
    }

    #[test]
    fn a_fixed_window_cannot_be_resized_and_an_open_one_moves_the_file_end() {
        let (_d, s) = file_of(8192);
        let mut fixed = Raw::open_window(s.clone(), window(1024, Some(4096))).unwrap();
        let e = fixed.resize(8192, Preallocation::Off, false).unwrap_err();
        assert!(
            e.to_string()
                .ends_with("Cannot resize fixed-size raw disks"),
            "{e}"
        );
        let mut open = Raw::open_window(s.clone(), window(1024, None)).unwrap();
        open.resize(2048, Preallocation::Off, false).unwrap();
        assert_eq!(s.size().unwrap(), 1024 + 2048);
        assert_eq!(open.virtual_size(), 2048);
    }
}
