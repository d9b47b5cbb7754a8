//! Opening a `--disk`: the image through imgblock (any format, with its backing chain) and the
//! temporary overlay of `snapshot=on`. imgblock takes qemu-compatible locks on every file of the
//! chain while the disk is open, so qemu, `img` and a second `vmm` cannot write it meanwhile.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use imgblock::crypto::{parse_secret_object, Secret, Secrets};
use imgblock::{CreateOptions, Format, Image, OpenOptions};

use crate::cli::{CacheMode, DiskSpec};
use crate::virtio::block::{Backend, BlockConfig};

/// `source`'s message, after the image's name unless it names the image itself (the block
/// layer's messages mostly do).
fn named(path: &Path, source: &imgblock::Error) -> String {
    let text = source.to_string();
    if text.contains(&path.display().to_string()) {
        text
    } else {
        format!("{}: {text}", path.display())
    }
}

/// Errors opening a disk.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The block layer could not open or create an image.
    #[error("{}", named(path, source))]
    Image {
        /// The image.
        path: PathBuf,
        /// What the block layer said.
        source: imgblock::Error,
    },
    /// The temporary directory for snapshot=on could not be made.
    #[error("cannot create a temporary directory for snapshot=on: {0}")]
    TempDir(std::io::Error),
    /// The snapshot=on overlay, once open, could not be unlinked.
    #[error("cannot remove the snapshot=on overlay's directory: {0}")]
    TempDirRemove(std::io::Error),
    /// The image path could not be made absolute for the snapshot=on overlay.
    #[error("{path}: {source}")]
    Path {
        /// The image.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// An `--object` definition is malformed, or a disk names a secret no `--object` defines.
    #[error("{0}")]
    Secret(String),
    /// The image is not a whole number of sectors.
    #[error("{path}: size {size} is not a multiple of 512 bytes")]
    OddSize {
        /// The image.
        path: PathBuf,
        /// Its size.
        size: u64,
    },
}

/// The secrets `--object` defines, by ID.
///
/// # Errors
/// A malformed definition (qemu's message for it), or an ID defined twice.
pub fn parse_objects(defs: &[String]) -> Result<BTreeMap<String, Secret>, Error> {
    let mut out = BTreeMap::new();
    for def in defs {
        let (id, secret) = parse_secret_object(def).map_err(Error::Secret)?;
        if out.insert(id.clone(), secret).is_some() {
            return Err(Error::Secret(format!(
                "--object: secret id '{id}' defined twice"
            )));
        }
    }
    Ok(out)
}

/// The passphrases of a disk's chain from its `key-secret` keys, with the image itself at
/// `depth0` (1 below a snapshot=on overlay). As in `img`, a layer without its own secret tries
/// the top image's.
fn chain_secrets(
    spec: &DiskSpec,
    objects: &BTreeMap<String, Secret>,
    depth0: usize,
) -> Result<Secrets, Error> {
    let mut out = Secrets::none();
    for (depth, id) in &spec.key_secrets {
        let s = objects
            .get(id)
            .ok_or_else(|| Error::Secret(format!("No secret with id '{id}'")))?;
        if *depth == 0 {
            out.set_default(s.clone());
        }
        out.set_layer(depth0 + depth, s.clone());
    }
    Ok(out)
}

/// An open disk with everything that must live as long as it.
pub struct Disk {
    image: Image,
    /// The device's request policy.
    pub config: BlockConfig,
}

impl std::fmt::Debug for Disk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Disk")
            .field("image", &self.image.path())
            .finish()
    }
}

impl Disk {
    /// Opens the disk `spec` describes, unlocking encrypted layers with the secrets its
    /// `key-secret` keys name in `objects`. `cache=none` opens every file of the chain
    /// O_DIRECT.
    ///
    /// # Errors
    /// When the image (or its chain) cannot be opened (a missing or wrong passphrase
    /// included), an overlay cannot be created, or another process holds a conflicting lock.
    pub fn open(spec: &DiskSpec, objects: &BTreeMap<String, Secret>) -> Result<Disk, Error> {
        let ierr = |path: &Path| {
            let path = path.to_owned();
            move |source| Error::Image { path, source }
        };
        let writable = !spec.readonly;
        let use_overlay = spec.snapshot && writable;
        let open = |path: &Path, opts: &OpenOptions, secrets: &Secrets| {
            if spec.cache == CacheMode::None {
                Image::open_direct(path, opts, secrets)
            } else {
                Image::open_with_secrets(path, opts, secrets)
            }
        };
        let image = if use_overlay {
            let base = Image::open_with_secrets(
                &spec.path,
                &OpenOptions::read_only().format(spec.format),
                &chain_secrets(spec, objects, 0)?,
            )
            .map_err(ierr(&spec.path))?;
            let fmt = base.format();
            drop(base);
            // The overlay lives elsewhere: it names its base by absolute path, or by the same
            // `json:` name (whose files are found from the working directory, as qemu does).
            let is_json = spec.path.to_str().is_some_and(|p| p.starts_with("json:"));
            let abs = if is_json {
                spec.path.clone()
            } else {
                std::fs::canonicalize(&spec.path).map_err(|source| Error::Path {
                    path: spec.path.clone(),
                    source,
                })?
            };
            let dir = tempfile::Builder::new()
                .prefix("vmm-snapshot-")
                .tempdir()
                .map_err(Error::TempDir)?;
            let ov = dir.path().join("overlay.qcow2");
            let opts = CreateOptions {
                backing_file: Some(abs.to_string_lossy().into_owned()),
                backing_fmt: Some(fmt.name().to_owned()),
                ..CreateOptions::default()
            };
            imgblock::create(&ov, Format::Qcow2, &opts).map_err(ierr(&ov))?;
            let img = open(
                &ov,
                &OpenOptions::writable().format(Some(Format::Qcow2)),
                &chain_secrets(spec, objects, 1)?,
            )
            .map_err(ierr(&ov))?;
            // Unlinked as soon as it is open: it lives as long as the process holds it, and
            // nothing is left behind however the VMM ends (SIGKILL included), nor need the
            // main thread's seccomp filter allow removing files.
            dir.close().map_err(Error::TempDirRemove)?;
            img
        } else {
            let opts = OpenOptions {
                format: spec.format,
                writable,
                no_backing: false,
                snapshot: None,
                force_share: false,
                repair: false,
                raw_window: None,
                data_file: None,
            };
            open(&spec.path, &opts, &chain_secrets(spec, objects, 0)?).map_err(ierr(&spec.path))?
        };
        if spec.format.is_none() && image.format_was_guessed_raw() {
            crate::report!(
                "vmm: WARNING: {}: image format was not specified and probed as raw; writes to \
                 sector 0 are refused. Specify format=raw to remove the restrictions.",
                spec.path.display()
            );
        }
        let size = image.size();
        if size % 512 != 0 {
            return Err(Error::OddSize {
                path: spec.path.clone(),
                size,
            });
        }
        let serial = spec.serial.clone().unwrap_or_default().into_bytes();
        Ok(Disk {
            image,
            config: BlockConfig {
                readonly: spec.readonly,
                cache: spec.cache,
                discard: spec.discard,
                detect_zeroes: spec.detect_zeroes,
                serial,
                num_queues: spec.num_queues,
                queue_size: spec.queue_size,
            },
        })
    }

    /// Flushes the disk before the process exits. Devices may still hold it, so this cannot
    /// wait for the drop.
    ///
    /// # Errors
    /// When the flush fails.
    pub fn close(&self) -> Result<(), String> {
        self.image.flush().map_err(|e| e.to_string())
    }

    /// The top image (the overlay for snapshot=on).
    pub fn image(&self) -> &Image {
        &self.image
    }
}

impl Backend for Disk {
    fn size(&self) -> u64 {
        self.image.size()
    }
    fn read_at(&self, buf: &mut [u8], off: u64) -> Result<(), String> {
        self.image.read_at(buf, off).map_err(|e| e.to_string())
    }
    fn write_at(&self, buf: &[u8], off: u64) -> Result<(), String> {
        self.image.write_at(buf, off).map_err(|e| e.to_string())
    }
    fn write_zeroes(&self, off: u64, len: u64, unmap: bool) -> Result<(), String> {
        self.image
            .write_zeroes(off, len, unmap)
            .map_err(|e| e.to_string())
    }
    fn discard(&self, off: u64, len: u64) -> Result<(), String> {
        self.image.discard(off, len).map_err(|e| e.to_string())
    }
    fn flush(&self) -> Result<(), String> {
        self.image.flush().map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_image_error_names_the_image_once() {
        let io = |p: &str| imgblock::Error::Io {
            path: p.into(),
            source: std::io::Error::from_raw_os_error(21),
        };
        let named_by_source = Error::Image {
            path: "/d/x.img".into(),
            source: io("/d/x.img"),
        };
        assert_eq!(named_by_source.to_string().matches("/d/x.img").count(), 1);
        let other = Error::Image {
            path: "/d/top.qcow2".into(),
            source: io("/d/base.raw"),
        };
        let text = other.to_string();
        assert!(
            text.starts_with("/d/top.qcow2: ") && text.contains("/d/base.raw"),
            "{text}"
        );
    }

    #[test]
    fn lock_blocks_qemu_img_while_held() {
        if std::process::Command::new("qemu-io")
            .arg("--version")
            .output()
            .is_err()
        {
            eprintln!("SKIPPED: qemu-io not installed");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.img");
        std::fs::write(&p, vec![0u8; 1 << 20]).unwrap();
        let spec: DiskSpec = format!("path={},format=raw", p.display()).parse().unwrap();
        let l = Disk::open(&spec, &BTreeMap::new()).unwrap();
        // qemu-io opens read-write: it needs "write", which we do not share.
        let qemu_io = || {
            std::process::Command::new("qemu-io")
                .args(["-f", "raw", "-c", "read 0 512"])
                .arg(&p)
                .output()
                .unwrap()
        };
        let out = qemu_io();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains("lock"), "{err}");
        drop(l);
        let out = qemu_io();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
