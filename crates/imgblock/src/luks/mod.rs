//! The `luks` format: a LUKS1 volume used as a disk image (qemu's `-f luks`). The header and
//! key material come first; the payload follows at the header's payload offset, encrypted with
//! sector numbers counted from the payload's start (the guest offset).
//!
//! ```text
//!  Luks (Driver) --map--> Data at payload_offset + guest offset (always writable in place)
//!        |
//!        +--data_cipher--> DataCipher keyed with the master key unlocked from a key slot
//! ```

use std::path::Path;
use std::sync::Arc;

use crate::crypto::luks::{self, CreateParams, MasterKey, SlotChange};
use crate::crypto::{self, DataCipher, EncryptionInfo, Secret};
use crate::driver::{CompressedRef, Driver, HostExtent, HostOffset, Mapping, SectorNumbering};
use crate::error::IoContext;
use crate::raw::Preallocation;
use crate::storage::{FileStorage, Storage};
use crate::{CreateOptions, Error, Format, Result};

/// The option that names the passphrase's secret.
pub const KEY_OPTION: &str = "key-secret";
/// A LUKS payload has no compressed form: `convert -c` refuses it.
pub const WRITES_COMPRESSED: bool = false;

/// Options luks accepts on create, with qemu-img's help text.
pub const CREATE_OPTIONS: &[(&str, &str)] = &[
    ("cipher-alg", "Name of encryption cipher algorithm"),
    ("cipher-mode", "Name of encryption cipher mode"),
    ("detached-header", "Create a detached LUKS header"),
    ("hash-alg", "Name of encryption hash algorithm"),
    ("iter-time", "Time to spend in PBKDF in milliseconds"),
    ("ivgen-alg", "Name of IV generator algorithm"),
    ("ivgen-hash-alg", "Name of IV generator hash algorithm"),
    (
        "key-secret",
        "ID of the secret that provides the keyslot passphrase",
    ),
    (
        "preallocation",
        "Preallocation mode (allowed values: off, falloc, full)",
    ),
    ("size", "Virtual disk size"),
];

/// A LUKS image.
#[derive(Debug)]
pub struct Luks {
    storage: Arc<dyn Storage>,
    header: luks::Header,
    size: u64,
    writable: bool,
    cipher: Option<DataCipher>,
    keys: Option<Keys>,
}

/// The master key, kept for amend. Never printed.
struct Keys(MasterKey);

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Keys(<redacted>)")
    }
}

fn crypto_err(path: &Path, e: crypto::Error) -> Error {
    match e {
        crypto::Error::InvalidOption(m) => Error::InvalidOption(m),
        source => Error::Crypto {
            path: path.to_owned(),
            source,
        },
    }
}

/// Reads and checks the header and its key material.
fn read_header(s: &dyn Storage) -> Result<(luks::Header, zeroize::Zeroizing<Vec<u8>>)> {
    let path = s.path();
    let mut first = vec![0u8; luks::HEADER_LEN];
    s.read_at(&mut first, 0).ctx(path)?;
    let h = luks::Header::parse(&first).map_err(|e| crypto_err(path, e))?;
    let len = usize::try_from(h.key_area_len()).unwrap_or(usize::MAX);
    let mut area = zeroize::Zeroizing::new(vec![0u8; len]);
    s.read_at(&mut area, 0).ctx(path)?;
    Ok((h, area))
}

impl Luks {
    /// Opens a LUKS image, unlocking it with `key`; without a key it opens only when
    /// `metadata_only` (for `info`), and its data cannot then be read or written.
    ///
    /// # Errors
    /// A bad header, [`Error::KeyRequired`], a wrong passphrase, I/O errors.
    pub fn open(
        storage: Arc<dyn Storage>,
        writable: bool,
        key: Option<&Secret>,
        metadata_only: bool,
    ) -> Result<Luks> {
        let path = storage.path().to_owned();
        let (header, area) = read_header(storage.as_ref())?;
        let file_len = storage.size().ctx(&path)?;
        // A payload that ends inside a sector (qemu-img resize to an odd size leaves one) counts
        // that sector whole, as qemu counts it.
        let size = file_len
            .saturating_sub(header.payload_offset)
            .div_ceil(crypto::SECTOR_SIZE)
            * crypto::SECTOR_SIZE;
        let (cipher, keys) = match key {
            Some(k) => {
                let (mk, _) = header
                    .unlock(&area, k.bytes())
                    .map_err(|e| crypto_err(&path, e))?;
                let c = header.data_cipher(&mk).map_err(|e| crypto_err(&path, e))?;
                (Some(c), Some(Keys(mk)))
            }
            None if metadata_only => (None, None),
            None => {
                return Err(Error::KeyRequired {
                    path,
                    option: KEY_OPTION,
                })
            }
        };
        Ok(Luks {
            storage,
            header,
            size,
            writable,
            cipher,
            keys,
        })
    }

    fn path(&self) -> &Path {
        self.storage.path()
    }
}

fn invalid(msg: impl Into<String>) -> Error {
    Error::InvalidOption(msg.into())
}

/// The header parameters and preallocation `o` asks of a new image, refused as qemu refuses
/// them (`path` names the image in crypto errors).
fn create_params(path: &Path, o: &CreateOptions) -> Result<(CreateParams, Preallocation)> {
    let mut params = CreateParams::default();
    let mut prealloc = Preallocation::Off;
    for (k, v) in &o.opts {
        match k.as_str() {
            KEY_OPTION => {}
            // qemu lists it, then refuses it in create (a header without its payload is made
            // with `--object` and blockdev-create there), in these words.
            "detached-header" => {
                return Err(invalid("Parameter 'detached-header' is unexpected"));
            }
            "preallocation" => prealloc = Preallocation::parse(v)?,
            _ => {
                let known = params.set(k, v).map_err(|e| crypto_err(path, e))?;
                if !known {
                    return Err(invalid(format!("Invalid parameter '{k}' for format luks")));
                }
            }
        }
    }
    if o.backing_file.is_some() {
        return Err(invalid("luks images cannot have a backing file"));
    }
    if o.backing_fmt.is_some() {
        // Not an option of luks's: qemu refuses it by name.
        return Err(invalid("Invalid parameter 'backing_fmt'"));
    }
    Ok((params, prealloc))
}

/// What `measure` reports for a luks image holding `size` bytes: its header area and the
/// payload, unrounded, as qemu-img measure counts them. qemu asks for the key secret here
/// too, though nothing is encrypted.
///
/// # Errors
/// When an option is invalid or the secret is missing.
pub fn measure(o: &CreateOptions, size: u64) -> Result<u64> {
    let (params, _) = create_params(Path::new(""), o)?;
    o.secret(KEY_OPTION)?
        .ok_or_else(|| invalid("Parameter 'key-secret' is required for cipher"))?;
    Ok(params.header_area_len().saturating_add(size))
}

/// Creates a LUKS image: a new header with a random master key in slot 0 under the
/// `key-secret` passphrase, then `size` bytes of payload (sparse: it reads as noise until
/// written, as with qemu).
///
/// `preallocation` applies to the whole file, header and payload, as in qemu: `falloc`
/// allocates it, `full` writes it with zeroes first (plaintext zeroes: the payload still
/// reads as noise), `metadata` is `off` (a LUKS image has no metadata to map).
///
/// # Errors
/// When an option is invalid or missing, or I/O fails.
pub fn create(path: &Path, o: &CreateOptions) -> Result<()> {
    let (params, prealloc) = create_params(path, o)?;
    let size = o
        .size
        .ok_or_else(|| invalid("Image creation needs a size parameter"))?;
    let size = size.div_ceil(crypto::SECTOR_SIZE) * crypto::SECTOR_SIZE;
    let secret = o
        .secret(KEY_OPTION)?
        .ok_or_else(|| invalid("Parameter 'key-secret' is required for cipher"))?;
    let (h, area, _mk) =
        luks::Header::create(&params, secret.bytes()).map_err(|e| crypto_err(path, e))?;
    // qemu's words for a payload the file cannot hold.
    let too_large = || invalid("The requested file size is too large");
    let total = h
        .payload_offset
        .checked_add(size)
        .filter(|&t| t <= i64::MAX as u64)
        .ok_or_else(too_large)?;
    let s = FileStorage::create_with(path, o.file)?;
    // Deleted again if the create fails, as qemu deletes it.
    let guard = crate::storage::Unfinished::new(path);
    crate::storage::set_len_preallocated(&s, 0, total, prealloc).map_err(|e| {
        if e.raw_os_error() == Some(libc::EFBIG) {
            too_large()
        } else {
            Error::Io {
                path: path.to_owned(),
                source: e,
            }
        }
    })?;
    // Only the header and slot 0 hold anything; the other slots stay holes, as qemu leaves them.
    let used = usize::try_from(h.slots[1].key_offset)
        .unwrap_or(area.len())
        .min(area.len());
    s.write_at(&area[..used], 0).ctx(path)?;
    s.flush().ctx(path)?;
    guard.finish();
    Ok(())
}

impl Driver for Luks {
    fn format(&self) -> Format {
        Format::Luks
    }

    fn virtual_size(&self) -> u64 {
        self.size
    }

    fn storage(&self, _file: usize) -> &Arc<dyn Storage> {
        &self.storage
    }

    fn encrypted(&self) -> bool {
        true
    }

    fn encryption_info(&self) -> Option<EncryptionInfo> {
        Some(EncryptionInfo::Luks(self.header.info()))
    }

    fn data_cipher(&self) -> Result<Option<(&DataCipher, SectorNumbering)>> {
        match &self.cipher {
            Some(c) => Ok(Some((c, SectorNumbering::Guest))),
            None => Err(Error::KeyRequired {
                path: self.path().to_owned(),
                option: KEY_OPTION,
            }),
        }
    }

    fn has_zero_init(&self) -> bool {
        false
    }

    fn snapshot_view(&self, snap: &crate::SnapshotRef) -> Result<Box<dyn Driver>> {
        Err(Error::NoSuchSnapshot {
            path: self.path().to_owned(),
            name: snap.label().to_owned(),
        })
    }

    fn map(&self, offset: u64, len: u64) -> Result<(Mapping, u64)> {
        if offset >= self.size {
            return Ok((Mapping::Eof, len.max(1)));
        }
        Ok((
            Mapping::Data {
                file: 0,
                offset: HostOffset(self.header.payload_offset + offset),
                writable: self.writable,
            },
            len.min(self.size - offset).max(1),
        ))
    }

    fn read_compressed(&self, _c: &CompressedRef, _out: &mut [u8]) -> Result<()> {
        Err(self.unsupported("compressed clusters"))
    }

    fn allocate(&self, _offset: u64, _len: u64) -> Result<Vec<HostExtent>> {
        // Every guest byte already has its place in the payload.
        Err(if self.writable {
            self.unsupported("allocation")
        } else {
            Error::ReadOnly {
                path: self.path().to_owned(),
            }
        })
    }

    fn commit(&self, _extents: &[HostExtent]) -> Result<()> {
        Ok(())
    }

    fn zero(&self, _offset: u64, _len: u64, _unmap: bool) -> Result<bool> {
        // Zeroes must be written encrypted.
        Ok(false)
    }

    fn discard(&self, _offset: u64, _len: u64) -> Result<()> {
        // Discarding would leave host zeroes that decrypt to noise; the data stays.
        Ok(())
    }

    fn resize(
        &mut self,
        new_size: u64,
        prealloc: crate::raw::Preallocation,
        _zero_new: bool,
    ) -> Result<()> {
        use crate::raw::Preallocation;
        if !self.writable {
            return Err(Error::ReadOnly {
                path: self.path().to_owned(),
            });
        }
        if prealloc == Preallocation::Metadata {
            return Err(invalid("Unsupported preallocation mode: metadata"));
        }
        let s = &self.storage;
        let total = self
            .header
            .payload_offset
            .checked_add(new_size)
            .ok_or_else(|| invalid("Image size is too large"))?;
        let old = s.size().ctx(s.path())?;
        // As qemu: the payload file takes the new size exactly, and new space reads as whatever
        // its host bytes decrypt to, as a new image's does; preallocation is of host space.
        crate::storage::set_len_preallocated(s.as_ref(), old, total, prealloc).ctx(s.path())?;
        self.size = new_size.div_ceil(crypto::SECTOR_SIZE) * crypto::SECTOR_SIZE;
        s.flush().ctx(s.path())
    }

    fn amend(&mut self, o: &CreateOptions, _backing_size: Option<u64>) -> Result<()> {
        let mut change = SlotChange {
            force: o.force,
            ..SlotChange::default()
        };
        for (k, v) in &o.opts {
            match k.as_str() {
                "new-secret" => change.new_secret = o.secret(k)?.cloned(),
                "old-secret" => change.old_secret = o.secret(k)?.cloned(),
                _ => {
                    if !change.set(k, v).map_err(|e| crypto_err(self.path(), e))? {
                        return Err(invalid(format!(
                            "Invalid parameter '{k}'\nThis option is only supported for image creation"
                        )));
                    }
                }
            }
        }
        let Some(Keys(mk)) = &self.keys else {
            return Err(Error::KeyRequired {
                path: self.path().to_owned(),
                option: KEY_OPTION,
            });
        };
        let (_, mut area) = read_header(self.storage.as_ref())?;
        let mut h = self.header.clone();
        change
            .apply(&mut h, &mut area, mk)
            .map_err(|e| crypto_err(self.storage.path(), e))?;
        self.storage.write_at(&area, 0).ctx(self.storage.path())?;
        self.storage.flush().ctx(self.storage.path())?;
        self.header = h;
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        self.storage.flush().ctx(self.storage.path())
    }
}
