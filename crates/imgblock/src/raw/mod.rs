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

/// A raw image.
#[derive(Debug)]
pub struct Raw {
    storage: Arc<dyn Storage>,
    size: u64,
}

impl Raw {
    /// Opens a raw image over a storage.
    ///
    /// # Errors
    /// When the size cannot be read.
    pub fn open(storage: Arc<dyn Storage>) -> Result<Raw> {
        // qemu sizes disks in whole sectors: a file whose length is not a multiple of 512 reads
        // as zeroes up to the next sector boundary.
        let size = storage
            .size()
            .ctx(storage.path())?
            .div_ceil(512)
            .saturating_mul(512);
        Ok(Raw { storage, size })
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
                offset: HostOffset(offset),
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
            host: HostOffset(offset),
        }])
    }
    fn commit(&self, _extents: &[HostExtent]) -> Result<()> {
        Ok(())
    }
    fn zero(&self, offset: u64, len: u64, unmap: bool) -> Result<bool> {
        self.storage
            .write_zeroes(offset, len, unmap)
            .ctx(self.storage.path())?;
        Ok(true)
    }
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.storage.discard(offset, len).ctx(self.storage.path())
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
        if prealloc == Preallocation::Metadata {
            return Err(Error::InvalidOption(
                "Unsupported preallocation mode: metadata".into(),
            ));
        }
        crate::storage::set_len_preallocated(s.as_ref(), old, new_size, prealloc).ctx(s.path())?;
        self.size = new_size;
        s.flush().ctx(s.path())
    }
}
