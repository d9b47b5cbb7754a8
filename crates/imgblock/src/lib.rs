//! A disk-image block layer: one driver per format behind the [`Driver`] trait, and one generic
//! [`Image`] that does the I/O, copy-on-write and the walk down backing chains.
//!
//! ```
//! use imgblock::{create, CreateOptions, Format, Image, OpenOptions};
//! let dir = tempfile::tempdir()?;
//! let path = dir.path().join("disk.qcow2");
//! create(&path, Format::Qcow2, &CreateOptions::new(1 << 20))?;
//! let img = Image::open(&path, &OpenOptions::writable())?;
//! img.write_at(b"hello", 4096)?;
//! let mut buf = [0u8; 5];
//! img.read_at(&mut buf, 4096)?;
//! assert_eq!(&buf, b"hello");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod bitmaps;
pub mod check;
pub mod crypto;
pub mod driver;
mod error;
#[doc(hidden)]
pub mod fuzzing;
pub mod image;
mod inflate;
pub mod json_name;
pub mod lock;
pub mod luks;
pub mod measure;
pub mod ops;
pub mod options;
pub mod ova;
pub mod probe;
pub mod qcow2;
pub mod raw;
pub mod scan;
pub mod storage;
pub mod vdi;
pub mod vmdk;

use std::fmt;
use std::path::Path;
use std::str::FromStr;

pub use check::{CheckReport, Messages, Repair};
pub use driver::{
    BackingSpec, Driver, FormatSpecific, Mapping, SnapshotInfo, SnapshotRef, VdiSpecific,
    VmdkExtentInfo, VmdkSpecific,
};
pub use error::{Error, Result};
pub use image::{BlockStatus, Image, OpenOptions, MAX_CHAIN_DEPTH};
pub use options::CreateOptions;

/// The image formats the block layer knows by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Format {
    /// A plain disk image.
    Raw,
    /// QEMU copy-on-write v2/v3.
    Qcow2,
    /// VMware disk (recognised by probing).
    Vmdk,
    /// VirtualBox disk (recognised by probing).
    Vdi,
    /// A LUKS volume (recognised by probing).
    Luks,
    /// A format qemu knows and this block layer does not read: legacy qcow v1, vpc, vhdx, qed,
    /// parallels, bochs, cloop, dmg. Probing recognises them so that such an image is refused
    /// by name rather than read as raw.
    Foreign(&'static str),
}

/// qemu's names of the formats that are [`Format::Foreign`] here.
pub const FOREIGN_FORMATS: &[&str] = &[
    "qcow",
    "vpc",
    "vhdx",
    "qed",
    "parallels",
    "bochs",
    "cloop",
    "dmg",
];

impl Format {
    /// qemu's name for the format.
    pub fn name(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
            Format::Vmdk => "vmdk",
            Format::Vdi => "vdi",
            Format::Luks => "luks",
            Format::Foreign(name) => name,
        }
    }

    /// Whether the format's driver takes compressed writes (qemu's
    /// `block_driver_can_compress`); `img convert -c` refuses the others before it creates
    /// anything. An open image may still refuse them ([`Image::can_write_compressed`]).
    pub fn can_write_compressed(self) -> bool {
        match self {
            Format::Raw => raw::WRITES_COMPRESSED,
            Format::Qcow2 => qcow2::WRITES_COMPRESSED,
            Format::Vmdk => vmdk::WRITES_COMPRESSED,
            Format::Vdi => vdi::WRITES_COMPRESSED,
            Format::Luks => luks::WRITES_COMPRESSED,
            Format::Foreign(_) => false,
        }
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Format {
    type Err = Error;
    fn from_str(s: &str) -> Result<Format> {
        Ok(match s {
            "raw" | "file" => Format::Raw,
            "qcow2" => Format::Qcow2,
            "vmdk" => Format::Vmdk,
            "vdi" => Format::Vdi,
            "luks" => Format::Luks,
            other => match FOREIGN_FORMATS.iter().find(|&&f| f == other) {
                Some(f) => Format::Foreign(f),
                None => return Err(Error::UnknownFormat(s.to_owned())),
            },
        })
    }
}

/// Creates a new image file of the given format.
///
/// # Errors
/// When an option is invalid for the format, the backing image cannot be opened, or I/O fails.
pub fn create(path: &Path, format: Format, opts: &CreateOptions) -> Result<()> {
    let opts = &opts.split_file_options()?;
    match format {
        Format::Raw => raw::create(path, opts),
        Format::Qcow2 => qcow2::create(path, opts),
        Format::Vmdk => vmdk::create(path, opts),
        Format::Vdi => vdi::create(path, opts),
        Format::Luks => luks::create(path, opts),
        other => Err(Error::Unsupported {
            path: path.to_owned(),
            what: format!("creating {other} images"),
        }),
    }
}
