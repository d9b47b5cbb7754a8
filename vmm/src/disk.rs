//! Opening a `--disk`: the image through imgblock (any format, with its backing chain), the
//! temporary overlay of `snapshot=on`, and qemu-compatible OFD locks on every file of the chain.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use imgblock::{CreateOptions, Format, Image, OpenOptions};

use crate::cli::DiskSpec;
use crate::virtio::block::{Backend, BlockConfig};

/// Errors opening a disk.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The block layer could not open or create an image.
    #[error("{path}: {source}")]
    Image {
        /// The image.
        path: PathBuf,
        /// What the block layer said.
        source: imgblock::Error,
    },
    /// The temporary directory for snapshot=on could not be made.
    #[error("cannot create a temporary directory for snapshot=on: {0}")]
    TempDir(std::io::Error),
    /// Another process holds a conflicting lock, as qemu reports it.
    #[error("{path}: Failed to get \"{perm}\" lock: is another process using the image?")]
    Locked {
        /// The image.
        path: PathBuf,
        /// The permission that conflicts ("write", "consistent read", ...).
        perm: &'static str,
    },
    /// fcntl failed.
    #[error("{path}: locking: {source}")]
    Lock {
        /// The image.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The image is not a whole number of sectors.
    #[error("{path}: size {size} is not a multiple of 512 bytes")]
    OddSize {
        /// The image.
        path: PathBuf,
        /// Its size.
        size: u64,
    },
}

/// qemu's permission bits (include/block/block-common.h) and their lock-byte offsets
/// (block/file-posix.c: RAW_LOCK_PERM_BASE 100, RAW_LOCK_SHARED_BASE 200).
pub mod perm {
    /// BLK_PERM_CONSISTENT_READ.
    pub const CONSISTENT_READ: u32 = 0;
    /// BLK_PERM_WRITE.
    pub const WRITE: u32 = 1;
    /// BLK_PERM_RESIZE.
    pub const RESIZE: u32 = 3;
    /// Byte 100 + bit: "I hold this permission".
    pub const PERM_BASE: i64 = 100;
    /// Byte 200 + bit: "I do not share this permission".
    pub const SHARED_BASE: i64 = 200;
    /// Names qemu prints.
    pub const NAMES: [&str; 4] = ["consistent read", "write", "write unchanged", "resize"];
}

fn ofd_lock(f: &File, start: i64, ty: libc::c_int, get: bool) -> std::io::Result<libc::c_short> {
    // SAFETY: flock is plain data; zeroed is a valid value for every field.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = libc::c_short::try_from(ty).unwrap_or(0);
    fl.l_whence = libc::c_short::try_from(libc::SEEK_SET).unwrap_or(0);
    fl.l_start = start;
    fl.l_len = 1;
    let cmd = if get {
        libc::F_OFD_GETLK
    } else {
        libc::F_OFD_SETLK
    };
    // SAFETY: `f` is an open descriptor and `fl` a valid flock that outlives the call.
    let r = unsafe { libc::fcntl(f.as_raw_fd(), cmd, &mut fl) };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(fl.l_type)
    }
}

/// Takes qemu's locks on `path`: shared locks on 100+p for each permission held and on 200+p for
/// each permission not shared; fails, naming the permission, if another open file description
/// holds a lock that conflicts (as qemu's raw_check_lock_bytes does).
///
/// # Errors
/// [`Error::Locked`] on conflict, [`Error::Lock`] when fcntl fails.
pub fn lock_image(path: &Path, perms: &[u32], unshared: &[u32]) -> Result<File, Error> {
    let f = File::open(path).map_err(|source| Error::Lock {
        path: path.to_owned(),
        source,
    })?;
    let le = |source| Error::Lock {
        path: path.to_owned(),
        source,
    };
    for &p in perms {
        ofd_lock(&f, perm::PERM_BASE + i64::from(p), libc::F_RDLCK, false).map_err(le)?;
    }
    for &p in unshared {
        ofd_lock(&f, perm::SHARED_BASE + i64::from(p), libc::F_RDLCK, false).map_err(le)?;
    }
    let name = |p: u32| perm::NAMES[usize::try_from(p).unwrap_or(0).min(3)];
    // Someone else must not forbid what we take...
    for &p in perms {
        let t = ofd_lock(&f, perm::SHARED_BASE + i64::from(p), libc::F_WRLCK, true).map_err(le)?;
        if i32::from(t) != libc::F_UNLCK {
            return Err(Error::Locked {
                path: path.to_owned(),
                perm: name(p),
            });
        }
    }
    // ...nor hold what we refuse to share.
    for &p in unshared {
        let t = ofd_lock(&f, perm::PERM_BASE + i64::from(p), libc::F_WRLCK, true).map_err(le)?;
        if i32::from(t) != libc::F_UNLCK {
            return Err(Error::Locked {
                path: path.to_owned(),
                perm: name(p),
            });
        }
    }
    Ok(f)
}

/// An open disk with everything that must live as long as it.
pub struct Disk {
    image: Image,
    /// The device's request policy.
    pub config: BlockConfig,
    /// Held OFD locks (released when the files close).
    _locks: Vec<File>,
    /// The snapshot=on overlay's directory, deleted by [`Disk::close`] or on drop.
    overlay: std::sync::Mutex<Option<tempfile::TempDir>>,
}

impl std::fmt::Debug for Disk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Disk")
            .field("image", &self.image.path())
            .finish()
    }
}

impl Disk {
    /// Opens the disk `spec` describes.
    ///
    /// # Errors
    /// When the image (or its chain) cannot be opened, an overlay cannot be created, or another
    /// process holds a conflicting lock.
    pub fn open(spec: &DiskSpec) -> Result<Disk, Error> {
        let ierr = |path: &Path| {
            let path = path.to_owned();
            move |source| Error::Image { path, source }
        };
        let writable = !spec.readonly;
        let use_overlay = spec.snapshot && writable;
        let mut overlay = None;
        let image = if use_overlay {
            let base = Image::open(&spec.path, &OpenOptions::read_only().format(spec.format))
                .map_err(ierr(&spec.path))?;
            let fmt = base.format();
            drop(base);
            let abs = std::fs::canonicalize(&spec.path).map_err(|source| Error::Lock {
                path: spec.path.clone(),
                source,
            })?;
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
            let img = Image::open(&ov, &OpenOptions::writable().format(Some(Format::Qcow2)))
                .map_err(ierr(&ov))?;
            overlay = Some(dir);
            img
        } else {
            let opts = OpenOptions {
                format: spec.format,
                writable,
                no_backing: false,
                snapshot: None,
            };
            Image::open(&spec.path, &opts).map_err(ierr(&spec.path))?
        };
        if spec.format.is_none() && image.format_was_guessed_raw() {
            eprintln!(
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
        // Locks: the top image as a guest disk (qemu: consistent read [+ write], sharing
        // neither write nor resize); backing files as qemu locks backing children.
        let mut locks = Vec::new();
        for (i, img) in image.chain().into_iter().enumerate() {
            let top_writes = i == 0 && image.is_writable();
            let perms: &[u32] = if top_writes {
                &[perm::CONSISTENT_READ, perm::WRITE]
            } else {
                &[perm::CONSISTENT_READ]
            };
            locks.push(lock_image(img.path(), perms, &[perm::WRITE, perm::RESIZE])?);
        }
        let serial = spec.serial.clone().unwrap_or_default().into_bytes();
        Ok(Disk {
            image,
            config: BlockConfig {
                readonly: spec.readonly,
                cache: spec.cache,
                discard: spec.discard,
                serial,
            },
            _locks: locks,
            overlay: std::sync::Mutex::new(overlay),
        })
    }

    /// Flushes and deletes a snapshot=on overlay. Devices may still hold the disk (the process
    /// is about to exit), so this cannot wait for the drop; the open overlay file is unlinked.
    ///
    /// # Errors
    /// When the flush or the removal fails.
    pub fn close(&self) -> Result<(), String> {
        let r = self.image.flush().map_err(|e| e.to_string());
        let dir = self
            .overlay
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(d) = dir {
            d.close()
                .map_err(|e| format!("removing the snapshot overlay: {e}"))?;
        }
        r
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
    fn lock_conflicts_with_second_writer_and_reader_allowed() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.img");
        std::fs::write(&p, vec![0u8; 4096]).unwrap();
        let _w = lock_image(
            &p,
            &[perm::CONSISTENT_READ, perm::WRITE],
            &[perm::WRITE, perm::RESIZE],
        )
        .unwrap();
        // A second writer: its WRITE is unshared by us.
        let e = lock_image(
            &p,
            &[perm::CONSISTENT_READ, perm::WRITE],
            &[perm::WRITE, perm::RESIZE],
        )
        .unwrap_err();
        assert!(matches!(e, Error::Locked { perm: "write", .. }), "{e}");
        // A reader that shares write (qemu-img -U style) is fine.
        lock_image(&p, &[perm::CONSISTENT_READ], &[]).unwrap();
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
        let l = lock_image(
            &p,
            &[perm::CONSISTENT_READ, perm::WRITE],
            &[perm::WRITE, perm::RESIZE],
        )
        .unwrap();
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
