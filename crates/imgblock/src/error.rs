//! The block layer's error type.

use std::io;
use std::path::PathBuf;

use crate::{crypto, ova, qcow2, vdi, vmdk};

/// Everything the block layer can report. Each variant names the file it concerns.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The host file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The host file.
        path: PathBuf,
        /// What the operating system said.
        source: io::Error,
    },
    /// A qcow2 image is malformed or uses something this driver refuses.
    #[error("{}: {source}", path.display())]
    Qcow2 {
        /// The image file.
        path: PathBuf,
        /// What is wrong with it.
        source: qcow2::Error,
    },
    /// A vmdk image is malformed or uses something this driver refuses.
    #[error("{}: {source}", path.display())]
    Vmdk {
        /// The image (or extent) file.
        path: PathBuf,
        /// What is wrong with it.
        source: vmdk::Error,
    },
    /// A vdi image is malformed or uses something this driver refuses.
    #[error("{}: {source}", path.display())]
    Vdi {
        /// The image file.
        path: PathBuf,
        /// What is wrong with it.
        source: vdi::Error,
    },
    /// An OVA archive or its OVF descriptor is malformed.
    #[error("{}: {source}", path.display())]
    Ova {
        /// The archive.
        path: PathBuf,
        /// What is wrong with it.
        source: ova::Error,
    },
    /// An encryption header is malformed, a key slot cannot be opened, or a cipher is refused.
    #[error("{}: {source}", path.display())]
    Crypto {
        /// The image file.
        path: PathBuf,
        /// What is wrong.
        source: crypto::Error,
    },
    /// The image is encrypted and no secret was given for it (qemu's wording names the
    /// option that would give it).
    #[error("{}: Parameter '{option}' is required for cipher", path.display())]
    KeyRequired {
        /// The image file.
        path: PathBuf,
        /// `encrypt.key-secret` (qcow2) or `key-secret` (luks).
        option: &'static str,
    },
    /// A `json:{...}` image name that cannot be read, or that names more than a local file.
    #[error("{why}")]
    JsonName {
        /// The name as given.
        name: String,
        /// What is wrong with it.
        why: String,
    },
    /// A format name that no driver knows.
    #[error("unknown image format '{0}'")]
    UnknownFormat(String),
    /// The file is in a format this build recognises but cannot open.
    #[error("{}: image format '{format}' is not supported", path.display())]
    UnsupportedFormat {
        /// The image file.
        path: PathBuf,
        /// The format's name.
        format: String,
    },
    /// The backing image named in an image's header could not be opened.
    #[error("Could not open backing file: {source}")]
    BackingOpen {
        /// The image whose backing file failed.
        path: PathBuf,
        /// Why the backing file failed to open.
        source: Box<Error>,
    },
    /// Another process holds a lock that conflicts with this open (qemu's wording).
    #[error("Failed to get {}\"{perm}\" lock\nIs another process using the image [{}]?", if *shared { "shared " } else { "" }, path.display())]
    Locked {
        /// The image file.
        path: PathBuf,
        /// The permission that conflicts.
        perm: &'static str,
        /// Whether it was refusing to share the permission that failed.
        shared: bool,
    },
    /// A writable open was asked to share every permission (qemu's `force-share=on`): another
    /// writer could then change the image under this one.
    #[error("force-share=on can only be used with read-only images")]
    ForceShareWritable {
        /// The image.
        path: PathBuf,
    },
    /// Backing files refer back to an image already in the chain.
    #[error("{}: backing chain loops back to this image", path.display())]
    BackingLoop {
        /// The image that appears twice.
        path: PathBuf,
    },
    /// The chain has more images than [`crate::MAX_CHAIN_DEPTH`].
    #[error("{}: backing chain is deeper than {limit} images", path.display())]
    ChainTooDeep {
        /// The image at which the limit was hit.
        path: PathBuf,
        /// The limit.
        limit: usize,
    },
    /// A request reaches past the end of the virtual disk.
    #[error("{}: request at offset {offset} length {len} is past the end of the {size}-byte disk", path.display())]
    OutOfBounds {
        /// The image file.
        path: PathBuf,
        /// Start of the request.
        offset: u64,
        /// Length of the request.
        len: u64,
        /// Virtual size of the disk.
        size: u64,
    },
    /// A write to an image opened read-only.
    #[error("{}: image is opened read-only", path.display())]
    ReadOnly {
        /// The image file.
        path: PathBuf,
    },
    /// A write to sector 0 of a raw image whose format was guessed, that would make it probe as
    /// another format (qemu refuses these too).
    #[error("{}: format was guessed as raw; refusing to write a format header to sector 0 (specify -f raw)", path.display())]
    GuessedRawSector0 {
        /// The image file.
        path: PathBuf,
    },
    /// An option given to create, convert or open is wrong.
    #[error("{0}")]
    InvalidOption(String),
    /// The image has no internal snapshot by that name or ID.
    #[error("{}: no snapshot named '{name}'", path.display())]
    NoSuchSnapshot {
        /// The image file.
        path: PathBuf,
        /// The name or ID asked for.
        name: String,
    },
    /// A persistent dirty bitmap operation was refused.
    #[error("{}: {source}", path.display())]
    Bitmap {
        /// The image file.
        path: PathBuf,
        /// Why, in qemu's words.
        source: crate::bitmaps::BitmapError,
    },
    /// The operation is not available for this format or image.
    #[error("{}: {what}", path.display())]
    Unsupported {
        /// The image file.
        path: PathBuf,
        /// What was asked for.
        what: String,
    },
}

/// The block layer's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Attaches a path to `io::Error`s.
pub(crate) trait IoContext<T> {
    fn ctx(self, path: &std::path::Path) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn ctx(self, path: &std::path::Path) -> Result<T> {
        self.map_err(|source| Error::Io {
            path: path.to_owned(),
            source,
        })
    }
}
