//! qcow2 encryption (qcow2.rst, "crypt_method" and "Full disk encryption header pointer"):
//! legacy AES-128-CBC (method 1, IV from the guest sector) and LUKS (method 2: a LUKS1 header
//! in clusters of the image that the crypto extension points at, IV from the host sector).
//! Data clusters are always encrypted; zero clusters stay zero flags and read as zeroes.

use std::fmt;
use std::sync::Arc;

use super::header::{self, Header};
use super::{Error, Qcow2};
use crate::crypto::luks::{self, CreateParams, MasterKey, SlotChange};
use crate::crypto::{self, DataCipher, EncryptionInfo, Secret};
use crate::driver::SectorNumbering;
use crate::error::IoContext;
use crate::storage::Storage;
use crate::{CreateOptions, Result};

/// The option that names an encrypted qcow2's secret.
pub const KEY_OPTION: &str = "encrypt.key-secret";

/// A LUKS-encrypted qcow2's header and keys.
#[derive(Clone)]
pub(crate) struct LuksState {
    header: luks::Header,
    /// Where the header area lies in the image file, from the crypto extension.
    offset: u64,
    length: u64,
    cipher: Option<Arc<DataCipher>>,
    /// Kept for amend, which re-encrypts the master key under new passphrases.
    master_key: Option<Arc<MasterKey>>,
}

/// How an open qcow2 encrypts its data.
#[derive(Clone, Default)]
pub(crate) enum Crypt {
    /// Plaintext.
    #[default]
    None,
    /// Legacy AES; `None` when opened without the secret (metadata only).
    Aes(Option<Arc<DataCipher>>),
    /// LUKS.
    Luks(Box<LuksState>),
}

impl fmt::Debug for Crypt {
    /// Never shows keys.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Crypt::None => f.write_str("None"),
            Crypt::Aes(c) => write!(f, "Aes(unlocked: {})", c.is_some()),
            Crypt::Luks(l) => write!(
                f,
                "Luks({:?}, unlocked: {})",
                l.header.spec,
                l.cipher.is_some()
            ),
        }
    }
}

impl Crypt {
    pub(crate) fn is_encrypted(&self) -> bool {
        !matches!(self, Crypt::None)
    }

    pub(crate) fn info(&self) -> Option<EncryptionInfo> {
        match self {
            Crypt::None => None,
            Crypt::Aes(_) => Some(EncryptionInfo::Aes),
            Crypt::Luks(l) => Some(EncryptionInfo::Luks(l.header.info())),
        }
    }

    /// The data cipher and sector numbering, or `Err(())` when locked.
    pub(crate) fn cipher(&self) -> Result<Option<(&DataCipher, SectorNumbering)>, ()> {
        match self {
            Crypt::None => Ok(None),
            Crypt::Aes(Some(c)) => Ok(Some((c.as_ref(), SectorNumbering::Guest))),
            Crypt::Luks(l) => match &l.cipher {
                Some(c) => Ok(Some((c.as_ref(), SectorNumbering::Host))),
                None => Err(()),
            },
            Crypt::Aes(None) => Err(()),
        }
    }

    /// The LUKS header area's clusters, which `check` counts as referenced.
    pub(crate) fn header_area(&self) -> Option<(u64, u64)> {
        match self {
            Crypt::Luks(l) => Some((l.offset, l.length)),
            _ => None,
        }
    }
}

fn crypto_err(s: &dyn Storage, e: crypto::Error) -> crate::Error {
    crate::Error::Crypto {
        path: s.path().to_owned(),
        source: e,
    }
}

/// Reads the LUKS header area an image's crypto extension points at.
fn read_area(s: &dyn Storage, offset: u64, length: u64) -> Result<Vec<u8>> {
    let len = usize::try_from(length).unwrap_or(usize::MAX);
    let mut area = vec![0u8; len];
    s.read_at(&mut area, offset).ctx(s.path())?;
    Ok(area)
}

/// Sets up the encryption state of an image being opened. Without a secret the image opens
/// for metadata only when `metadata_only`, and fails otherwise.
///
/// # Errors
/// [`crate::Error::KeyRequired`], a bad crypto extension or LUKS header, a wrong passphrase.
pub(crate) fn open(
    s: &dyn Storage,
    h: &Header,
    key: Option<&Secret>,
    metadata_only: bool,
) -> Result<Crypt> {
    let path = s.path();
    let locked = || {
        if metadata_only {
            Ok(())
        } else {
            Err(crate::Error::KeyRequired {
                path: path.to_owned(),
                option: KEY_OPTION,
            })
        }
    };
    match h.crypt_method {
        header::CRYPT_NONE => Ok(Crypt::None),
        header::CRYPT_AES => match key {
            Some(k) => Ok(Crypt::Aes(Some(Arc::new(
                crypto::legacy_aes_cipher(k.bytes()).map_err(|e| crypto_err(s, e))?,
            )))),
            None => locked().map(|()| Crypt::Aes(None)),
        },
        header::CRYPT_LUKS => {
            let qerr = |e: Error| crate::Error::Qcow2 {
                path: path.to_owned(),
                source: e,
            };
            let (offset, length) = h
                .crypto_header()
                .ok_or_else(|| qerr(Error::MissingCryptoHeader))?;
            let file_len = s.size().ctx(path)?;
            let bad = Error::BadCryptoHeader { offset, length };
            if offset % h.cluster_size() != 0
                || offset == 0
                || length < luks::HEADER_LEN as u64
                || length > luks::MAX_HEADER_AREA
                || offset.checked_add(length).is_none_or(|e| e > file_len)
            {
                return Err(qerr(bad));
            }
            let area = zeroize::Zeroizing::new(read_area(s, offset, length)?);
            let lh = luks::Header::parse(&area).map_err(|e| crypto_err(s, e))?;
            if lh.key_area_len() > length {
                return Err(qerr(bad));
            }
            let (cipher, master_key) = match key {
                Some(k) => {
                    let (mk, _) = lh.unlock(&area, k.bytes()).map_err(|e| crypto_err(s, e))?;
                    let c = lh.data_cipher(&mk).map_err(|e| crypto_err(s, e))?;
                    (Some(Arc::new(c)), Some(Arc::new(mk)))
                }
                None => {
                    locked()?;
                    (None, None)
                }
            };
            Ok(Crypt::Luks(Box::new(LuksState {
                header: lh,
                offset,
                length,
                cipher,
                master_key,
            })))
        }
        other => Err(crate::Error::Qcow2 {
            path: path.to_owned(),
            source: Error::Encrypted(other),
        }),
    }
}

/// What `encrypt.*` asks of a new image.
#[derive(Debug, Clone)]
pub(crate) enum CreateCrypt {
    /// Legacy AES.
    Aes(Secret),
    /// LUKS with these parameters.
    Luks(CreateParams, Secret),
}

fn invalid(msg: impl Into<String>) -> crate::Error {
    crate::Error::InvalidOption(msg.into())
}

/// Parses the encryption options of `create`, as qemu reads them: `encryption` is an old alias
/// of `encrypt.format` (`on` for `aes`, `off` for nothing, given together with it refused),
/// `aes` is also called `qcow`, and the last value given for an option counts.
///
/// # Errors
/// With qemu's messages for bad or missing options.
pub(crate) fn parse_create(o: &CreateOptions) -> Result<Option<CreateCrypt>> {
    let mut format: Option<String> = None;
    let mut alias: Option<String> = None;
    let mut params = CreateParams::default();
    let mut luks_only: Option<&str> = None;
    for (k, v) in &o.opts {
        if k == "encryption" {
            // A boolean (qemu's words otherwise), but only `on` and `off` mean anything: any
            // other spelling goes through as a format name, which it is not.
            crate::options::parse_bool(k, v)?;
            alias = Some(v.clone());
            continue;
        }
        let Some(name) = k.strip_prefix("encrypt.") else {
            continue;
        };
        match name {
            "format" => format = Some(v.clone()),
            "key-secret" => {}
            _ => {
                let known = params.set(name, v).map_err(|e| invalid(e.to_string()))?;
                if !known {
                    return Err(invalid(format!("Invalid parameter '{k}' for format qcow2")));
                }
                luks_only.get_or_insert(k.as_str());
            }
        }
    }
    let alias = alias
        .filter(|v| v != "off")
        .map(|v| if v == "on" { "aes".to_owned() } else { v });
    if alias.is_some() && format.is_some() {
        return Err(invalid(
            "'encrypt.format' and its alias 'encryption' can't be used at the same time",
        ));
    }
    let Some(format) = alias.or(format) else {
        if o.get(KEY_OPTION).is_some() || luks_only.is_some() {
            return Err(invalid("Parameter 'encrypt.format' is missing"));
        }
        return Ok(None);
    };
    let secret = o
        .secret(KEY_OPTION)?
        .cloned()
        .ok_or_else(|| invalid("Parameter 'encrypt.key-secret' is required for cipher"))?;
    match format.as_str() {
        "aes" | "qcow" => {
            if let Some(k) = luks_only {
                return Err(invalid(format!("Parameter '{k}' is unexpected")));
            }
            Ok(Some(CreateCrypt::Aes(secret)))
        }
        "luks" => {
            // Refuse a combination qemu refuses before any file is made, as qemu-img does.
            params.validate().map_err(|e| invalid(e.to_string()))?;
            Ok(Some(CreateCrypt::Luks(params, secret)))
        }
        other => Err(invalid(format!(
            "Parameter 'format' does not accept value '{other}'"
        ))),
    }
}

impl Qcow2 {
    /// Makes a freshly created (empty) image encrypted: sets crypt_method and, for LUKS, writes
    /// a LUKS header into newly allocated clusters and points the crypto extension at it.
    ///
    /// # Errors
    /// When the options are refused or I/O fails.
    pub(crate) fn set_up_encryption(&mut self, c: &CreateCrypt) -> Result<()> {
        match c {
            CreateCrypt::Aes(secret) => {
                self.rewrite_header(|h| h.crypt_method = header::CRYPT_AES)?;
                let cipher = crypto::legacy_aes_cipher(secret.bytes())
                    .map_err(|e| crypto_err(self.file(), e))?;
                self.crypt = Crypt::Aes(Some(Arc::new(cipher)));
            }
            CreateCrypt::Luks(params, secret) => {
                let (lh, area, mk) = luks::Header::create(params, secret.bytes())
                    .map_err(|e| crypto_err(self.file(), e))?;
                let length = area.len() as u64;
                let offset = {
                    let mut st = self.lock();
                    let n = length.div_ceil(self.geo.cluster_size);
                    self.alloc_clusters(&mut st, n)?
                };
                self.file()
                    .write_at(&area, offset)
                    .ctx(self.file().path())?;
                self.rewrite_header(|h| {
                    h.crypt_method = header::CRYPT_LUKS;
                    h.set_crypto_header(offset, length);
                })?;
                let cipher = lh
                    .data_cipher(&mk)
                    .map_err(|e| crypto_err(self.file(), e))?;
                self.crypt = Crypt::Luks(Box::new(LuksState {
                    header: lh,
                    offset,
                    length,
                    cipher: Some(Arc::new(cipher)),
                    master_key: Some(Arc::new(mk)),
                }));
            }
        }
        Ok(())
    }

    /// `amend -o encrypt.*`: LUKS key-slot management (qemu's `encrypt.state`, `keyslot`,
    /// `new-secret`, `old-secret`, `iter-time`). Needs the image opened with its secret.
    ///
    /// # Errors
    /// With qemu's messages for what it refuses; I/O errors.
    pub(crate) fn amend_encryption(&mut self, o: &CreateOptions, force: bool) -> Result<()> {
        let mut change = SlotChange {
            force,
            ..SlotChange::default()
        };
        for (k, v) in &o.opts {
            let Some(name) = k.strip_prefix("encrypt.") else {
                continue;
            };
            match name {
                "new-secret" => change.new_secret = o.secret(k)?.cloned(),
                "old-secret" => change.old_secret = o.secret(k)?.cloned(),
                // Not an amend option in qemu, whatever the image's format is now.
                "format" => {
                    return Err(invalid(format!(
                        "Invalid parameter '{k}'\nThis option is only supported for image creation"
                    )));
                }
                _ => {
                    if !change.set(name, v).map_err(|e| invalid(e.to_string()))? {
                        return Err(invalid(format!(
                            "Invalid parameter '{k}'\nThis option is only supported for image creation"
                        )));
                    }
                }
            }
        }
        let Crypt::Luks(state) = &mut self.crypt else {
            return Err(invalid(match self.crypt {
                Crypt::None => "Can't amend encryption options - encryption not present",
                _ => "Only LUKS encryption options can be amended",
            }));
        };
        let mk = state
            .master_key
            .clone()
            .ok_or_else(|| crate::Error::KeyRequired {
                path: self.files[0].path().to_owned(),
                option: KEY_OPTION,
            })?;
        let file = self.files[0].clone();
        let mut area =
            zeroize::Zeroizing::new(read_area(file.as_ref(), state.offset, state.length)?);
        let mut h = state.header.clone();
        change.apply(&mut h, &mut area, &mk).map_err(|e| match e {
            crypto::Error::InvalidOption(m) => invalid(m),
            other => crypto_err(file.as_ref(), other),
        })?;
        file.write_at(&area, state.offset).ctx(file.path())?;
        file.flush().ctx(file.path())?;
        state.header = h;
        Ok(())
    }
}
