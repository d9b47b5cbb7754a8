//! The generic I/O layer: reads, copy-on-write, zero writes and the walk down the backing chain,
//! for any [`Driver`].

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::crypto::{DataCipher, Secrets, SECTOR_SIZE};
use crate::driver::{Driver, HostExtent, Mapping, SectorNumbering};
use crate::error::IoContext;
use crate::storage::{FileStorage, Storage};
use crate::{lock, luks, probe, qcow2, raw, vdi, vmdk, Error, Format, Result};

/// The most images a backing chain may hold, counting the top one. qemu has no fixed limit (it
/// fails somewhere between 700 and 1000 images); chains of a few hundred come from a snapshot
/// per backup. Opening and reading recurse once per image: at this depth a debug build still
/// fits a thread's 2 MiB stack with room to spare (it overflows near 500). Each image holds two
/// file descriptors ([`crate::storage::raise_open_file_limit`]).
pub const MAX_CHAIN_DEPTH: usize = 256;

/// How a backing image opens: read-only, with its own chain, sharing as the image above does.
fn backing_options(format: Option<Format>, force_share: bool) -> OpenOptions {
    OpenOptions {
        format,
        force_share,
        ..OpenOptions::default()
    }
}

/// A backing image's open error, as the error of the image above it (`path`). Loops and depth
/// are about the chain as a whole, and a deeper image's error names its own: kept as they are.
fn backing_error(path: &Path, e: Error) -> Error {
    match e {
        Error::BackingLoop { .. } | Error::ChainTooDeep { .. } | Error::BackingOpen { .. } => e,
        other => Error::BackingOpen {
            path: path.to_owned(),
            source: Box::new(other),
        },
    }
}

/// qemu's check of an `encrypt.format` open option against the image: a qcow2 image's header
/// must name that format; other formats have no such option.
fn check_encrypt_format(img: Image, wanted: Option<&str>) -> std::result::Result<Image, String> {
    let Some(wanted) = wanted else {
        return Ok(img);
    };
    if img.format() != Format::Qcow2 {
        return Err(format!(
            "Block format '{}' does not support the option 'encrypt.format'",
            img.format()
        ));
    }
    let has = match img.driver().encryption_info() {
        None => {
            return Err(format!(
                "No encryption in image header, but options specified format '{wanted}'"
            ))
        }
        Some(crate::crypto::EncryptionInfo::Aes) => "aes",
        Some(crate::crypto::EncryptionInfo::Luks(_)) => "luks",
    };
    if has == wanted {
        Ok(img)
    } else {
        Err(format!(
            "Header reported '{has}' encryption format but options specify '{wanted}'"
        ))
    }
}

/// How to open an image.
#[derive(Debug, Clone, Default)]
pub struct OpenOptions {
    /// The format; probed from the file when `None`.
    pub format: Option<Format>,
    /// Open for writing (backing images are always read-only).
    pub writable: bool,
    /// Leave the backing chain closed: unallocated ranges then read as zeroes.
    pub no_backing: bool,
    /// Open this internal snapshot read-only instead of the active state.
    pub snapshot: Option<crate::SnapshotRef>,
    /// Take no locks, letting other processes write (qemu-img's -U / --force-share). Only for
    /// read-only opens: a writable one is refused ([`Error::ForceShareWritable`]).
    pub force_share: bool,
    /// Open for `check -r` (qemu's BDRV_O_CHECK): a qcow2 image marked corrupt opens writable
    /// so that the check can repair it, and a dirty one is left for the check to settle.
    pub repair: bool,
    /// For a raw image: the part of the file that is the disk (qemu's raw `offset` and `size`
    /// options, given in a `json:` name or with `--image-opts`). Other formats refuse it.
    pub raw_window: Option<crate::raw::Window>,
    /// For a qcow2 image with an external data file: the file to use instead of the one its
    /// header names (qemu's `data-file` option, given in a `json:` name). Other images refuse it.
    pub data_file: Option<PathBuf>,
}

impl OpenOptions {
    /// Read-only, format probed, with its backing chain.
    pub fn read_only() -> Self {
        OpenOptions::default()
    }
    /// Writable, format probed, with its backing chain.
    pub fn writable() -> Self {
        OpenOptions {
            writable: true,
            ..OpenOptions::default()
        }
    }
    /// Sets the format.
    pub fn format(mut self, f: Option<Format>) -> Self {
        self.format = f;
        self
    }
}

/// What block status found at an offset, walking down the chain (qemu-img map's fields).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockStatus {
    /// Bytes from the asked offset for which this holds.
    pub len: u64,
    /// Index in the chain of the image that holds the data (0 = top); when nothing does, the
    /// index of the last image.
    pub depth: usize,
    /// Some image in the chain defines this range.
    pub present: bool,
    /// Reads as zeroes.
    pub zero: bool,
    /// Backed by data (not a hole or zero cluster).
    pub data: bool,
    /// Stored compressed.
    pub compressed: bool,
    /// Host offset within the image at `depth`, when the data lies plainly in a file.
    pub offset: Option<u64>,
    /// Which of that image's files `offset` refers to.
    pub file: usize,
}

/// An open image with its backing chain.
#[derive(Debug)]
pub struct Image {
    driver: Box<dyn Driver>,
    backing: Option<Box<Image>>,
    path: PathBuf,
    /// The part of the file that a raw image shows (`offset`, `size`), when not all of it.
    raw_window: Option<raw::Window>,
    /// The `json:` name of an image that sits on a raw window of its file.
    json_name: Option<String>,
    /// Serialises allocating writes, so that two writers never allocate the same cluster twice.
    alloc_lock: Mutex<()>,
    writable: bool,
    guessed_raw: bool,
    /// qemu-compatible locks on the image file, held as long as the image is open.
    _lock: Option<lock::ImageLock>,
}

/// Opens `path` as a host storage.
fn open_storage(path: &Path, writable: bool, direct: bool) -> Result<Arc<dyn Storage>> {
    let s = if direct {
        FileStorage::open_direct(path, writable)
    } else {
        FileStorage::open(path, writable)
    };
    Ok(Arc::new(s.ctx(path)?))
}

/// Resolves a backing name against the overlay's directory, as qemu does. A `json:` name
/// stays as it is: [`Image::open`] reads it (its file relative to the working directory, as
/// qemu opens it, its driver and options), or fails with the reason it cannot.
pub fn resolve_backing(overlay: &Path, name: &str) -> PathBuf {
    if name.starts_with("json:") {
        return PathBuf::from(name);
    }
    let p = Path::new(name);
    if p.is_absolute() {
        return p.to_owned();
    }
    match overlay.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.join(p),
        _ => p.to_owned(),
    }
}

impl Image {
    /// Opens an image and, unless told not to, its whole backing chain.
    ///
    /// # Errors
    /// When a file cannot be opened, a header is bad, the chain loops or is deeper than
    /// [`MAX_CHAIN_DEPTH`].
    pub fn open(path: &Path, opts: &OpenOptions) -> Result<Image> {
        Self::open_with_secrets(path, opts, &Secrets::none())
    }

    /// Opens an image and its backing chain, unlocking encrypted layers with `secrets` (each
    /// layer's own, else the default one).
    ///
    /// # Errors
    /// As [`Image::open`]; also [`Error::KeyRequired`] for an encrypted layer without a secret
    /// (unless `secrets.metadata_only`) and [`Error::Crypto`] for a wrong passphrase.
    pub fn open_with_secrets(path: &Path, opts: &OpenOptions, secrets: &Secrets) -> Result<Image> {
        let mut seen = HashSet::new();
        Self::open_inner(path, opts, &mut seen, 0, secrets, false)
    }

    /// As [`Image::open_with_secrets`], with the files of the whole chain opened to bypass the
    /// host page cache where the I/O is aligned (`O_DIRECT`, qemu's `cache=none`).
    ///
    /// # Errors
    /// As [`Image::open_with_secrets`].
    pub fn open_direct(path: &Path, opts: &OpenOptions, secrets: &Secrets) -> Result<Image> {
        let mut seen = HashSet::new();
        Self::open_inner(path, opts, &mut seen, 0, secrets, true)
    }

    /// Opens the top image over a storage the caller made (a test storage that fails at chosen
    /// writes, say); its backing chain is opened from files as usual.
    ///
    /// # Errors
    /// As [`Image::open`].
    pub fn open_storage(storage: Arc<dyn Storage>, opts: &OpenOptions) -> Result<Image> {
        Self::open_storage_with_secrets(storage, opts, &Secrets::none())
    }

    /// As [`Image::open_storage`], unlocking encrypted layers with `secrets`.
    ///
    /// # Errors
    /// As [`Image::open_with_secrets`].
    pub fn open_storage_with_secrets(
        storage: Arc<dyn Storage>,
        opts: &OpenOptions,
        secrets: &Secrets,
    ) -> Result<Image> {
        let mut seen = HashSet::new();
        let path = storage.path().to_owned();
        Self::open_inner_with(&path, opts, &mut seen, 0, Some(storage), secrets, false)
    }

    fn open_inner(
        path: &Path,
        opts: &OpenOptions,
        seen: &mut HashSet<PathBuf>,
        depth: usize,
        secrets: &Secrets,
        direct: bool,
    ) -> Result<Image> {
        Self::open_inner_with(path, opts, seen, depth, None, secrets, direct)
    }

    fn open_inner_with(
        path: &Path,
        opts: &OpenOptions,
        seen: &mut HashSet<PathBuf>,
        depth: usize,
        storage: Option<Arc<dyn Storage>>,
        secrets: &Secrets,
        direct: bool,
    ) -> Result<Image> {
        if path.to_str().is_some_and(|p| p.starts_with("json:")) {
            return Self::open_json(path, opts, seen, depth, storage, secrets, direct);
        }
        let (driver, file_lock, guessed_raw) =
            Self::open_layer(path, opts, seen, depth, storage, secrets, direct)?;
        let backing = match driver.backing() {
            Some(spec) if !opts.no_backing => {
                // A json: name keeps its own driver: open_inner_with reads it.
                let json = spec.filename.starts_with("json:");
                let bpath = resolve_backing(path, &spec.filename);
                let format = spec
                    .format
                    .as_deref()
                    .filter(|_| !json)
                    .map(str::parse)
                    .transpose()?;
                let bopts = backing_options(format, opts.force_share);
                let b = Self::open_inner(&bpath, &bopts, seen, depth + 1, secrets, direct)
                    .map_err(|e| backing_error(path, e))?;
                Some(Box::new(b))
            }
            _ => None,
        };
        Ok(Image {
            driver,
            backing,
            path: path.to_owned(),
            raw_window: opts
                .raw_window
                .clone()
                .filter(|w| *w != raw::Window::default()),
            json_name: None,
            alloc_lock: Mutex::new(()),
            writable: opts.writable && opts.snapshot.is_none(),
            guessed_raw,
            _lock: file_lock,
        })
    }

    /// Opens what a `json:{...}` name stands for: its file, in the format it names (if any).
    /// Kept out of [`Image::open_inner_with`] so that the frame each image of a chain adds to
    /// the stack stays small.
    #[inline(never)]
    fn open_json(
        path: &Path,
        opts: &OpenOptions,
        seen: &mut HashSet<PathBuf>,
        depth: usize,
        storage: Option<Arc<dyn Storage>>,
        secrets: &Secrets,
        direct: bool,
    ) -> Result<Image> {
        let named = |why| Error::JsonName {
            name: path.display().to_string(),
            why,
        };
        let j = path
            .to_str()
            .and_then(crate::json_name::parse)
            .unwrap_or_else(|| Err("not a json: name".into()))
            .map_err(named)?;
        let no_backing = opts.no_backing;
        // `encrypt.key-secret`: the secret defined with that ID unlocks this layer. Without
        // it, a look at the metadata alone (create's look at a backing file) goes on.
        let keyed;
        let secrets = match j.key_secret.as_deref().map(|id| (id, secrets.object(id))) {
            Some((_, Some(s))) => {
                let mut k = secrets.clone();
                k.set_layer(depth, s.clone());
                keyed = k;
                &keyed
            }
            Some((id, None)) if !secrets.metadata_only => {
                return Err(named(format!("No secret with id '{id}'")));
            }
            _ => secrets,
        };
        let format = match (&j.driver, opts.format) {
            (_, Some(f)) => Some(f),
            (Some(d), None) => Some(d.parse()?),
            (None, None) => None,
        };
        let opts = OpenOptions {
            format,
            raw_window: j.window.clone().or(opts.raw_window.clone()),
            data_file: j.data_file.clone().or(opts.data_file.clone()),
            // `backing`: none, or a node of its own, opened below.
            no_backing: opts.no_backing || j.backing.is_some(),
            ..opts.clone()
        };
        if let (Some(Some(node)), false) = (&j.backing, no_backing) {
            let mut img = Self::open_json_parts(&j, &opts, seen, depth, storage, secrets, direct)?;
            let bopts = backing_options(None, opts.force_share);
            let b = Self::open_inner(Path::new(node), &bopts, seen, depth + 1, secrets, direct)
                .map_err(|e| backing_error(&j.filename, e))?;
            img.backing = Some(Box::new(b));
            return check_encrypt_format(img, j.encrypt_format.as_deref()).map_err(named);
        }
        let img = Self::open_json_parts(&j, &opts, seen, depth, storage, secrets, direct)?;
        check_encrypt_format(img, j.encrypt_format.as_deref()).map_err(named)
    }

    /// Opens one image of a chain, its backing file aside: checks, lock, format, driver.
    /// Kept out of [`Image::open_inner_with`] so that the frame each image of a chain adds to
    /// the stack stays small.
    #[inline(never)]
    fn open_layer(
        path: &Path,
        opts: &OpenOptions,
        seen: &mut HashSet<PathBuf>,
        depth: usize,
        storage: Option<Arc<dyn Storage>>,
        secrets: &Secrets,
        direct: bool,
    ) -> Result<(Box<dyn Driver>, Option<lock::ImageLock>, bool)> {
        if opts.writable && opts.force_share {
            return Err(Error::ForceShareWritable {
                path: path.to_owned(),
            });
        }
        if depth >= MAX_CHAIN_DEPTH {
            return Err(Error::ChainTooDeep {
                path: path.to_owned(),
                limit: MAX_CHAIN_DEPTH,
            });
        }
        // A caller-made storage may have no file behind it (fuzzing): its path names it as is.
        let canon = match (&storage, std::fs::canonicalize(path)) {
            (_, Ok(c)) => c,
            (Some(_), Err(_)) => path.to_owned(),
            (None, Err(e)) => {
                return Err(Error::Io {
                    path: path.to_owned(),
                    source: e,
                })
            }
        };
        if !seen.insert(canon) {
            return Err(Error::BackingLoop {
                path: path.to_owned(),
            });
        }
        let from_file = storage.is_none();
        let storage = match storage {
            Some(s) => s,
            None => open_storage(path, opts.writable, direct)?,
        };
        // qemu's locks: a writer holds write and resize and shares neither; a reader (backing
        // images included) refuses to share write and resize unless told to share everything.
        let file_lock = if from_file && !opts.force_share {
            let held: &[u32] = if opts.writable {
                &[
                    lock::PERM_CONSISTENT_READ,
                    lock::PERM_WRITE,
                    lock::PERM_RESIZE,
                ]
            } else {
                &[lock::PERM_CONSISTENT_READ]
            };
            Some(lock::lock(
                path,
                held,
                &[lock::PERM_WRITE, lock::PERM_RESIZE],
            )?)
        } else {
            None
        };
        let (format, guessed_raw) = match opts.format {
            Some(f) => (f, false),
            None => {
                let f = probe::probe(storage.as_ref())?;
                (f, f == Format::Raw)
            }
        };
        if opts.data_file.is_some() && format != Format::Qcow2 {
            return Err(Error::InvalidOption(format!(
                "Block format '{format}' does not support the option 'data-file'"
            )));
        }
        if let (Some(w), false) = (&opts.raw_window, format == Format::Raw) {
            return Err(Error::InvalidOption(format!(
                "Block format '{format}' does not support the option '{}'",
                w.option_name()
            )));
        }
        let mut driver: Box<dyn Driver> = match format {
            Format::Raw => Box::new(raw::Raw::open_window(
                storage,
                opts.raw_window.clone().unwrap_or_default(),
            )?),
            Format::Qcow2 => Box::new(qcow2::Qcow2::open_with_key(
                storage,
                qcow2::Access {
                    writable: opts.writable,
                    repair: opts.repair,
                    data_file: opts.data_file.clone(),
                },
                secrets.for_layer(depth),
                secrets.metadata_only,
            )?),
            Format::Luks => Box::new(luks::Luks::open(
                storage,
                opts.writable,
                secrets.for_layer(depth),
                secrets.metadata_only,
            )?),
            Format::Vmdk => Box::new(vmdk::Vmdk::open(storage, opts.writable)?),
            Format::Vdi => Box::new(vdi::Vdi::open(storage, opts.writable)?),
            other => {
                return Err(Error::UnsupportedFormat {
                    path: path.to_owned(),
                    format: other.to_string(),
                })
            }
        };
        if let Some(name) = &opts.snapshot {
            driver = driver.snapshot_view(name)?;
        }
        Ok((driver, file_lock, guessed_raw))
    }

    /// Opens what a `json:` name stands for (its `backing` option aside): its file in its
    /// format, or a format inside a raw window of the file.
    fn open_json_parts(
        j: &crate::json_name::JsonName,
        opts: &OpenOptions,
        seen: &mut HashSet<PathBuf>,
        depth: usize,
        storage: Option<Arc<dyn Storage>>,
        secrets: &Secrets,
        direct: bool,
    ) -> Result<Image> {
        if let Some(w) = &j.file_window {
            // A format inside a window of the file (a disk inside an OVA, as virt-v2v
            // names it): read in place, read-only.
            if opts.writable {
                return Err(Error::Unsupported {
                    path: j.filename.clone(),
                    what: "an image inside a raw window opens read-only".into(),
                });
            }
            let file: Arc<dyn Storage> =
                Arc::new(FileStorage::open(&j.filename, false).ctx(&j.filename)?);
            let (offset, len) = w.fit(file.size().ctx(&j.filename)?)?;
            let inner: Arc<dyn Storage> = Arc::new(crate::ova::Window::new(file, offset, len));
            let mut img = Self::open_inner_with(
                &j.filename,
                opts,
                seen,
                depth,
                Some(inner),
                secrets,
                direct,
            )?;
            // Named as qemu names it: the format's node over the window's.
            let window = w.json_name(Some("raw"), &j.filename);
            img.json_name = Some(format!(
                "json:{{\"driver\": {}, \"file\": {}}}",
                serde_json::Value::from(img.format().to_string()),
                window.strip_prefix("json:").unwrap_or(&window)
            ));
            return Ok(img);
        }
        Self::open_inner_with(&j.filename, opts, seen, depth, storage, secrets, direct)
    }

    /// Wraps an already-open driver (used right after create).
    pub fn from_driver(
        path: &Path,
        driver: Box<dyn Driver>,
        backing: Option<Image>,
        writable: bool,
    ) -> Image {
        Image {
            driver,
            backing: backing.map(Box::new),
            path: path.to_owned(),
            raw_window: None,
            json_name: None,
            alloc_lock: Mutex::new(()),
            writable,
            guessed_raw: false,
            _lock: None,
        }
    }

    /// The image's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
    /// The image's name as qemu gives it: its path, or a `json:` name where the path alone
    /// does not say what the image is (a window into a raw file).
    pub fn name(&self) -> String {
        match (&self.json_name, &self.raw_window) {
            (Some(name), _) => name.clone(),
            (None, Some(w)) => w.json_name(Some("raw"), &self.path),
            (None, None) => self.path.display().to_string(),
        }
    }
    /// The window of its file that a raw image shows, when not the whole file: to open the
    /// same disk again, give it in [`OpenOptions::raw_window`].
    pub fn raw_window(&self) -> Option<raw::Window> {
        self.raw_window.clone()
    }
    /// The driver.
    pub fn driver(&self) -> &dyn Driver {
        self.driver.as_ref()
    }
    /// The format.
    pub fn format(&self) -> Format {
        self.driver.format()
    }
    /// The backing image, when one is open.
    pub fn backing(&self) -> Option<&Image> {
        self.backing.as_deref()
    }
    /// The virtual size.
    pub fn size(&self) -> u64 {
        self.driver.virtual_size()
    }
    /// Whether writes are allowed.
    pub fn is_writable(&self) -> bool {
        self.writable
    }
    /// Whether the format was probed and came out raw (qemu then restricts writes to sector 0).
    pub fn format_was_guessed_raw(&self) -> bool {
        self.guessed_raw
    }
    /// The chain from this image down, top first.
    pub fn chain(&self) -> Vec<&Image> {
        let mut v = vec![self];
        let mut cur = self;
        while let Some(b) = cur.backing() {
            v.push(b);
            cur = b;
        }
        v
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        let size = self.size();
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok(()),
            _ => Err(Error::OutOfBounds {
                path: self.path.clone(),
                offset,
                len,
                size,
            }),
        }
    }

    fn io<T>(&self, r: std::io::Result<T>, file: usize) -> Result<T> {
        r.ctx(self.driver.storage(file).path())
    }

    /// Reads `buf.len()` bytes at `offset`.
    ///
    /// # Errors
    /// When the range is past the end, or metadata or data cannot be read.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.check_range(offset, buf.len() as u64)?;
        self.read_inner(buf, offset)
    }

    /// Reads without a bounds check; bytes past the virtual size read as zeroes.
    fn read_inner(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let size = self.size();
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let rest = (buf.len() - done) as u64;
            if pos >= size {
                buf[done..].fill(0);
                break;
            }
            let (m, n) = self.driver.map(pos, rest.min(size - pos))?;
            let n = n.clamp(1, rest);
            let nu = usize::try_from(n)
                .unwrap_or(usize::MAX)
                .min(buf.len() - done);
            let out = &mut buf[done..done + nu];
            match m {
                Mapping::Data { file, offset, .. } => match self.driver.data_cipher()? {
                    Some((c, num)) => self.read_decrypt(c, num, file, offset.0, pos, out)?,
                    None => {
                        let r = self.driver.storage(file).read_at(out, offset.0);
                        self.io(r, file)?;
                    }
                },
                Mapping::Zero { .. } | Mapping::Eof => out.fill(0),
                Mapping::Unallocated | Mapping::UnallocatedAt { .. } => match &self.backing {
                    Some(b) => {
                        self.driver.backing_usable()?;
                        b.read_inner(out, pos)?;
                    }
                    None => out.fill(0),
                },
                Mapping::Compressed(c) => {
                    let cs = self.driver.cluster_size().unwrap_or(0);
                    let mut tmp = vec![0u8; usize::try_from(cs).unwrap_or(0)];
                    self.driver.read_compressed(&c, &mut tmp)?;
                    let start = usize::try_from(pos - c.guest_cluster).unwrap_or(usize::MAX);
                    let src = tmp
                        .get(start..start + nu)
                        .ok_or_else(|| Error::Unsupported {
                            path: self.path.clone(),
                            what: "compressed mapping outside its cluster".into(),
                        })?;
                    out.copy_from_slice(src);
                }
            }
            done += nu;
        }
        Ok(())
    }

    /// Copies `len` bytes at `offset` into `target` at `target_offset` inside the kernel,
    /// without passing them through user space (qemu-img's copy offloading), where both ranges
    /// are plain data in files: a raw image, say, or preallocated clusters. `Ok(false)` when
    /// some of it is not (encrypted, compressed, unallocated, in a backing file) or the
    /// filesystem cannot; the caller then copies through a buffer.
    ///
    /// # Errors
    /// When a range is past an end, the target is read-only, or I/O fails.
    pub fn copy_range_to(
        &self,
        offset: u64,
        target: &Image,
        target_offset: u64,
        len: u64,
    ) -> Result<bool> {
        self.check_range(offset, len)?;
        target.check_range(target_offset, len)?;
        target.check_writable()?;
        // A guessed-raw target's sector 0 is checked by write_at.
        let sector0 = target.guessed_raw && target_offset < 512 && len > 0;
        if sector0 || self.driver.data_cipher()?.is_some() || target.driver.data_cipher()?.is_some()
        {
            return Ok(false);
        }
        let mut done = 0;
        while done < len {
            let (m, n) = self.driver.map(offset + done, len - done)?;
            let Mapping::Data {
                file, offset: from, ..
            } = m
            else {
                return Ok(false);
            };
            let n = n.clamp(1, len - done);
            let (tm, tn) = target.driver.map(target_offset + done, n)?;
            let Mapping::Data {
                file: tfile,
                offset: to,
                writable: true,
            } = tm
            else {
                return Ok(false);
            };
            let k = tn.clamp(1, n);
            let src = self.driver.storage(file);
            let dst = target.driver.storage(tfile);
            match crate::storage::copy_range(src.as_ref(), from.0, dst.as_ref(), to.0, k) {
                Ok(true) => {}
                Ok(false) => return Ok(false),
                Err(e) => target.io(Err(e), tfile)?,
            }
            done += k;
        }
        Ok(true)
    }

    fn check_writable(&self) -> Result<()> {
        if self.writable {
            Ok(())
        } else {
            Err(Error::ReadOnly {
                path: self.path.clone(),
            })
        }
    }

    /// Writes `buf` at `offset`, allocating and copying on write as the format needs.
    ///
    /// # Errors
    /// When the range is past the end, the image is read-only, or I/O fails.
    pub fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.check_writable()?;
        self.check_range(offset, buf.len() as u64)?;
        self.driver.note_write(offset, buf.len() as u64)?;
        if self.guessed_raw && offset < 512 && !buf.is_empty() {
            let mut sector = [0u8; 512];
            self.read_inner(&mut sector, 0)?;
            let n = buf.len().min(512 - usize::try_from(offset).unwrap_or(0));
            let o = usize::try_from(offset).unwrap_or(0);
            sector[o..o + n].copy_from_slice(&buf[..n]);
            if probe::probe_bytes(&sector) != Format::Raw {
                return Err(Error::GuessedRawSector0 {
                    path: self.path.clone(),
                });
            }
        }
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let rest = (buf.len() - done) as u64;
            let (m, n) = self.driver.map(pos, rest)?;
            let nu = usize::try_from(n.clamp(1, rest))
                .unwrap_or(usize::MAX)
                .min(buf.len() - done);
            match m {
                Mapping::Data {
                    file,
                    offset: host,
                    writable: true,
                } => self.write_in_place(file, host.0, pos, &buf[done..done + nu])?,
                _ => self.write_allocating(&buf[done..done + nu], pos)?,
            }
            done += nu;
        }
        Ok(())
    }

    /// Writes a range that is not writable in place: takes the allocation lock, fills the
    /// granularity-aligned area around it from the current contents, allocates, writes, commits.
    fn write_allocating(&self, data: &[u8], pos: u64) -> Result<()> {
        let _guard = self.alloc_lock.lock().unwrap_or_else(|e| e.into_inner());
        // Another writer may have allocated the range meanwhile.
        if let (
            Mapping::Data {
                file,
                offset: host,
                writable: true,
            },
            n,
        ) = self.driver.map(pos, data.len() as u64)?
        {
            if n >= data.len() as u64 {
                return self.write_in_place(file, host.0, pos, data);
            }
        }
        let end = pos + data.len() as u64;
        let (a, b) = self.driver.cow_area(pos, data.len() as u64)?;
        if a > pos || b < end {
            return Err(Error::Unsupported {
                path: self.path.clone(),
                what: "driver returned a bad copy-on-write area".into(),
            });
        }
        if a == pos && b == end {
            // Whole allocation units: nothing to merge, write straight from the caller's buffer
            // (convert's 2 MiB writes take this path; a copy per write showed in its profile).
            let extents = self.driver.allocate(a, b - a)?;
            self.write_extents(&extents, a, data)?;
            return self.driver.commit(&extents);
        }
        let total =
            usize::try_from(b - a).map_err(|_| Error::InvalidOption("write too large".into()))?;
        let head = usize::try_from(pos - a).unwrap_or(0);
        let mut area = vec![0u8; total];
        if head > 0 {
            self.read_inner(&mut area[..head], a)?;
        }
        let tail = head + data.len();
        if tail < total {
            self.read_inner(&mut area[tail..], end)?;
        }
        area[head..tail].copy_from_slice(data);
        let extents = self.driver.allocate(a, b - a)?;
        self.write_extents(&extents, a, &area)?;
        self.driver.commit(&extents)
    }

    fn write_extents(&self, extents: &[HostExtent], base: u64, area: &[u8]) -> Result<()> {
        for e in extents {
            let s = usize::try_from(e.guest - base).unwrap_or(usize::MAX);
            let l = usize::try_from(e.len).unwrap_or(usize::MAX);
            let chunk = area
                .get(s..s.saturating_add(l))
                .ok_or_else(|| Error::Unsupported {
                    path: self.path.clone(),
                    what: "driver returned an extent outside the request".into(),
                })?;
            let r = match self.driver.data_cipher()? {
                // The area was assembled in plaintext; each extent is encrypted whole, in a
                // scratch copy, with the sector numbers of where it lands.
                Some((c, num)) => {
                    let mut tmp = chunk.to_vec();
                    let first = self.crypt_sector(num, e.host.0, e.guest, tmp.len() as u64)?;
                    self.encrypt(c, first, &mut tmp)?;
                    self.driver.storage(e.file).write_at(&tmp, e.host.0)
                }
                None => self.driver.storage(e.file).write_at(chunk, e.host.0),
            };
            self.io(r, e.file)?;
        }
        Ok(())
    }

    /// Writes `data` (guest offset `pos`) over host bytes at `host` that belong to this range
    /// alone, encrypting when the format does. A write that covers part of a sector of an
    /// encrypted image reads, decrypts and merges that sector first (not atomic against a
    /// concurrent write to the same sector, as with any read-modify-write).
    fn write_in_place(&self, file: usize, host: u64, pos: u64, data: &[u8]) -> Result<()> {
        let Some((c, num)) = self.driver.data_cipher()? else {
            let r = self.driver.storage(file).write_at(data, host);
            return self.io(r, file);
        };
        let ss = SECTOR_SIZE;
        let head = pos % ss;
        let start = host
            .checked_sub(head)
            .ok_or_else(|| self.misaligned(host, pos))?;
        let total = (head + data.len() as u64).div_ceil(ss) * ss;
        let first = self.crypt_sector(num, start, pos - head, total)?;
        let mut tmp = vec![0u8; usize::try_from(total).map_err(|_| self.misaligned(host, pos))?];
        let ssu = crate::crypto::SECTOR_BYTES;
        let (h, len) = (usize::try_from(head).unwrap_or(0), tmp.len());
        if h != 0 {
            self.read_decrypt(c, num, file, start, pos - head, &mut tmp[..ssu])?;
        }
        if (h + data.len()) % ssu != 0 && (h == 0 || len > ssu) {
            let last = (len - ssu) as u64;
            self.read_decrypt(
                c,
                num,
                file,
                start + last,
                pos - head + last,
                &mut tmp[len - ssu..],
            )?;
        }
        tmp[h..h + data.len()].copy_from_slice(data);
        self.encrypt(c, first, &mut tmp)?;
        let r = self.driver.storage(file).write_at(&tmp, start);
        self.io(r, file)
    }

    /// Reads `out` (guest offset `pos`) from host offset `host`, decrypting the whole sectors
    /// around it.
    fn read_decrypt(
        &self,
        c: &DataCipher,
        num: SectorNumbering,
        file: usize,
        host: u64,
        pos: u64,
        out: &mut [u8],
    ) -> Result<()> {
        let ss = SECTOR_SIZE;
        let head = pos % ss;
        let start = host
            .checked_sub(head)
            .ok_or_else(|| self.misaligned(host, pos))?;
        let total = (head + out.len() as u64).div_ceil(ss) * ss;
        let first = self.crypt_sector(num, start, pos - head, total)?;
        let storage = self.driver.storage(file);
        if head == 0 && total == out.len() as u64 {
            self.io(storage.read_at(out, start), file)?;
            return self.decrypt(c, first, out);
        }
        let mut tmp = vec![0u8; usize::try_from(total).map_err(|_| self.misaligned(host, pos))?];
        self.io(storage.read_at(&mut tmp, start), file)?;
        self.decrypt(c, first, &mut tmp)?;
        let h = usize::try_from(head).unwrap_or(0);
        out.copy_from_slice(&tmp[h..h + out.len()]);
        Ok(())
    }

    /// The number of the first sector of an encrypted run at sector-aligned `host`/`guest`.
    fn crypt_sector(&self, num: SectorNumbering, host: u64, guest: u64, len: u64) -> Result<u64> {
        let ss = SECTOR_SIZE;
        if host % ss != 0 || guest % ss != 0 || len % ss != 0 {
            return Err(self.misaligned(host, guest));
        }
        Ok(match num {
            SectorNumbering::Host => host / ss,
            SectorNumbering::Guest => guest / ss,
        })
    }

    fn misaligned(&self, host: u64, guest: u64) -> Error {
        Error::Unsupported {
            path: self.path.clone(),
            what: format!(
                "encrypted data at host offset {host:#x} (guest {guest:#x}) is not sector aligned"
            ),
        }
    }

    fn encrypt(&self, c: &DataCipher, first: u64, buf: &mut [u8]) -> Result<()> {
        c.encrypt(first, buf).map_err(|source| Error::Crypto {
            path: self.path.clone(),
            source,
        })
    }

    fn decrypt(&self, c: &DataCipher, first: u64, buf: &mut [u8]) -> Result<()> {
        c.decrypt(first, buf).map_err(|source| Error::Crypto {
            path: self.path.clone(),
            source,
        })
    }

    /// Whether the image accepts compressed clusters ([`Driver::can_write_compressed`]).
    pub fn can_write_compressed(&self) -> bool {
        self.driver.can_write_compressed()
    }

    /// Compresses one cluster for [`Image::write_compressed`] (pads a short last cluster with
    /// zeroes). Pure, so convert can run it on worker threads. `None` when it does not shrink.
    pub fn compress_cluster(&self, data: &[u8]) -> Option<Vec<u8>> {
        let cs = usize::try_from(self.driver.cluster_size()?).ok()?;
        if data.len() < cs {
            let mut padded = data.to_vec();
            padded.resize(cs, 0);
            return self.driver.compress_cluster(&padded);
        }
        self.driver.compress_cluster(data)
    }

    /// Writes one cluster at a cluster-aligned `offset`, compressed when `compressed` (from
    /// [`Image::compress_cluster`]) is given, otherwise as plain data — as qemu stores clusters
    /// that do not shrink.
    ///
    /// # Errors
    /// When the range is past the end, the image is read-only, or I/O fails.
    pub fn write_cluster(&self, offset: u64, data: &[u8], compressed: Option<&[u8]>) -> Result<()> {
        self.check_writable()?;
        self.check_range(offset, data.len() as u64)?;
        match compressed {
            Some(c) => self.store_compressed(&[(offset, c)]),
            None => self.write_at(data, offset),
        }
    }

    /// Stores clusters that [`Image::compress_cluster`] compressed, each at its cluster-aligned
    /// guest offset, in the order given, as [`Image::write_cluster`] would one by one (a format
    /// may need fewer writes for them together).
    ///
    /// # Errors
    /// As for [`Image::write_cluster`]; clusters before the failing one may be stored.
    pub fn write_compressed_clusters(&self, clusters: &[(u64, &[u8])]) -> Result<()> {
        if clusters.is_empty() {
            return Ok(());
        }
        self.check_writable()?;
        let cs = self.driver.cluster_size().unwrap_or(0);
        for &(offset, _) in clusters {
            self.check_range(offset, cs.min(self.size().saturating_sub(offset)).max(1))?;
        }
        for &(offset, _) in clusters {
            self.driver
                .note_write(offset, cs.min(self.size().saturating_sub(offset)).max(1))?;
        }
        self.store_compressed(clusters)
    }

    /// Hands checked compressed clusters to the format, which allocates for them.
    fn store_compressed(&self, clusters: &[(u64, &[u8])]) -> Result<()> {
        let _guard = self.alloc_lock.lock().unwrap_or_else(|e| e.into_inner());
        self.driver.write_compressed_batch(clusters)
    }

    /// Makes a range read as zeroes, through metadata where the format can.
    ///
    /// # Errors
    /// When the range is past the end, the image is read-only, or I/O fails.
    pub fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<()> {
        self.check_writable()?;
        self.check_range(offset, len)?;
        self.driver.note_write(offset, len)?;
        let g = self.driver.cow_granularity().max(1);
        let end = offset + len;
        let a = offset.div_ceil(g) * g;
        let b = (end / g * g).max(a);
        // Past the last full granule, the virtual size ends inside one: that granule counts whole.
        let b = if end == self.size() && end % g != 0 {
            end.div_ceil(g) * g
        } else {
            b
        };
        if a >= b {
            // Inside one granule, or across the boundary of two, with neither covered whole.
            let mid = a.min(end);
            self.zero_partial(offset, mid, unmap)?;
            if end > mid {
                self.zero_partial(mid, end, unmap)?;
            }
            return Ok(());
        }
        if a > offset {
            self.zero_partial(offset, a, unmap)?;
        }
        let _guard = self.alloc_lock.lock().unwrap_or_else(|e| e.into_inner());
        let handled = self.driver.zero(a, b - a, unmap)?;
        drop(_guard);
        if !handled {
            self.write_zero_buffer(a, b.min(end) - a)?;
        }
        if end > b {
            self.zero_partial(b, end, unmap)?;
        }
        Ok(())
    }

    /// Zeroes `[start, end)`, a part of one granule. As in qemu, the granule becomes a zero
    /// granule when this image does not hold it yet (or holds it as zeroes) and the rest of it
    /// already reads as zeroes; otherwise zeroes are written as data.
    fn zero_partial(&self, start: u64, end: u64, unmap: bool) -> Result<()> {
        let g = self.driver.cow_granularity().max(1);
        if g > 1 && end > start {
            let gs = start / g * g;
            let _guard = self.alloc_lock.lock().unwrap_or_else(|e| e.into_inner());
            if self.granule_can_become_zero(gs, g, start, end)? && self.driver.zero(gs, g, unmap)? {
                return Ok(());
            }
        }
        self.write_zero_buffer(start, end - start)
    }

    /// Whether the granule at `gs` is unallocated or zero here, and reads as zeroes outside
    /// `[start, end)`. Callers hold the allocation lock, so no writer allocates it meanwhile.
    fn granule_can_become_zero(&self, gs: u64, g: u64, start: u64, end: u64) -> Result<bool> {
        let size = self.size();
        let ge = (gs + g).min(size);
        let (m, n) = self.driver.map(gs, ge - gs)?;
        let unheld = matches!(
            m,
            Mapping::Unallocated | Mapping::UnallocatedAt { .. } | Mapping::Zero { .. }
        );
        if !unheld || n < ge - gs {
            return Ok(false);
        }
        Ok(self.reads_as_zeroes(gs, start)? && self.reads_as_zeroes(end, ge)?)
    }

    /// Whether `[from, to)` reads as zeroes, by block status alone (no data is read).
    fn reads_as_zeroes(&self, mut from: u64, to: u64) -> Result<bool> {
        while from < to {
            let st = self.block_status(from, to - from)?;
            if !st.zero {
                return Ok(false);
            }
            from += st.len.clamp(1, to - from);
        }
        Ok(true)
    }

    fn write_zero_buffer(&self, mut offset: u64, mut len: u64) -> Result<()> {
        const CHUNK: u64 = 1 << 20;
        let zeroes = vec![0u8; usize::try_from(len.min(CHUNK)).unwrap_or(0)];
        while len > 0 {
            let n = len.min(CHUNK);
            self.write_at(&zeroes[..usize::try_from(n).unwrap_or(0)], offset)?;
            offset += n;
            len -= n;
        }
        Ok(())
    }

    /// Discards the whole granules inside a range; what they read as afterwards follows the
    /// format (qcow2 v3: zeroes; v2: the backing image).
    ///
    /// # Errors
    /// When the range is past the end, the image is read-only, or I/O fails.
    pub fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.check_writable()?;
        self.check_range(offset, len)?;
        self.driver.note_write(offset, len)?;
        let g = self.driver.cow_granularity().max(1);
        let end = offset + len;
        let a = offset.div_ceil(g) * g;
        let b = if end == self.size() {
            end.div_ceil(g) * g
        } else {
            end / g * g
        };
        if a < b {
            let _guard = self.alloc_lock.lock().unwrap_or_else(|e| e.into_inner());
            self.driver.discard(a, b - a)?;
        }
        Ok(())
    }

    /// Has this image's own files start writing dirty data back to the disk as they go
    /// ([`Storage::set_write_behind`]), for a long stream of writes such as a convert's. The
    /// backing chain is left alone.
    pub fn set_write_behind(&self, on: bool) {
        for f in 0..self.driver.files() {
            self.driver.storage(f).set_write_behind(on);
        }
    }

    /// For an image opened for direct I/O ([`Image::open_direct`]): whether its own files keep
    /// going around the page cache for aligned I/O ([`Storage::set_direct`]). A writer that
    /// stores small unaligned pieces (compressed clusters) turns it off; the backing chain is
    /// left alone.
    pub fn set_direct(&self, on: bool) {
        for f in 0..self.driver.files() {
            self.driver.storage(f).set_direct(on);
        }
    }

    /// Writes back metadata and flushes the host files.
    ///
    /// # Errors
    /// When writing fails.
    pub fn flush(&self) -> Result<()> {
        if self.writable {
            self.driver.flush()?;
        }
        Ok(())
    }

    /// Where qemu's block status of this chain at `offset` ends at the latest, whatever the
    /// mapping: the nearest [`Driver::status_boundary`] of the images that reach `offset`.
    /// `None` when no driver bounds it.
    pub fn status_boundary(&self, offset: u64) -> Option<u64> {
        let own = self.driver.status_boundary(offset);
        let below = self
            .backing
            .as_deref()
            .filter(|b| offset < b.size())
            .and_then(|b| b.status_boundary(offset));
        match (own, below) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// What lives at `offset`, walking down the chain (qemu-img map's view).
    ///
    /// # Errors
    /// When metadata cannot be read.
    pub fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus> {
        self.block_status_at(offset, len, 0)
    }

    fn block_status_at(&self, offset: u64, len: u64, depth: usize) -> Result<BlockStatus> {
        let size = self.size();
        if offset >= size {
            return Ok(BlockStatus {
                len,
                depth,
                present: false,
                zero: true,
                data: false,
                compressed: false,
                offset: None,
                file: 0,
            });
        }
        let (m, n) = self.driver.map(offset, len.min(size - offset))?;
        let n = n.clamp(1, len);
        // qemu reports no host offset for encrypted images: the bytes there are ciphertext.
        let hide = self.driver.encrypted();
        let st = |zero, data, compressed, off: Option<(usize, u64)>, n| BlockStatus {
            len: n,
            depth,
            present: true,
            zero,
            data,
            compressed,
            offset: off.filter(|_| !hide).map(|o| o.1),
            file: off.map_or(0, |o| o.0),
        };
        Ok(match m {
            Mapping::Data {
                file, offset: host, ..
            } => {
                if self.driver.data_holes_read_as_zero(file) {
                    let s = self.driver.storage(file);
                    let (data, hn) = self.io(s.block_status(host.0, n), file)?;
                    st(!data, true, false, Some((file, host.0)), hn.clamp(1, n))
                } else if self.driver.host_holes_are_zero() {
                    let s = self.driver.storage(file);
                    let (data, hn) = self.io(s.block_status(host.0, n), file)?;
                    let hn = hn.clamp(1, n);
                    st(!data, data, false, Some((file, host.0)), hn)
                } else {
                    st(false, true, false, Some((file, host.0)), n)
                }
            }
            Mapping::Zero { offset: o } => st(true, false, false, o.map(|(f, h)| (f, h.0)), n),
            Mapping::Compressed(_) => st(false, true, true, None, n),
            Mapping::Eof => BlockStatus {
                len: n,
                depth,
                present: false,
                zero: true,
                data: false,
                compressed: false,
                offset: None,
                file: 0,
            },
            Mapping::Unallocated | Mapping::UnallocatedAt { .. } => match &self.backing {
                // Past the backing image's end the range reads as zeroes, and qemu reports them
                // at this image's depth (it looks no further down).
                Some(b) if offset < b.size() => {
                    let mut s = b.block_status_at(offset, n, depth + 1)?;
                    s.len = s.len.min(n);
                    s
                }
                _ => {
                    let reserved = match m {
                        Mapping::UnallocatedAt { file, offset } => Some((file, offset.0)),
                        _ => None,
                    };
                    BlockStatus {
                        len: n,
                        depth,
                        present: false,
                        zero: true,
                        data: false,
                        compressed: false,
                        offset: reserved.filter(|_| !hide).map(|r| r.1),
                        file: reserved.map_or(0, |r| r.0),
                    }
                }
            },
        })
    }

    /// Checks the image's metadata (the top image only), repairing as asked.
    ///
    /// # Errors
    /// When the format has no checks, or I/O fails.
    pub fn check(&self, repair: crate::Repair) -> Result<crate::CheckReport> {
        if repair != crate::Repair::None {
            self.check_writable()?;
        }
        self.driver.check(repair)
    }

    /// Changes the virtual size (shrinking drops data past the new end; the caller asks the user
    /// first, as qemu-img's --shrink does). New space reads as zeroes, except in a `luks` image,
    /// where it reads as noise, as a new one does (as in qemu).
    ///
    /// # Errors
    /// When the format cannot resize this image, or I/O fails.
    pub fn resize(&mut self, new_size: u64, prealloc: crate::raw::Preallocation) -> Result<()> {
        self.check_writable()?;
        let old = self.size();
        // A backing image that reaches past the old end would show through the new space.
        let zero_new = new_size > old && self.backing.as_ref().is_some_and(|b| b.size() > old);
        self.driver.resize(new_size, prealloc, zero_new)?;
        self.zero_old_tail(old)?;
        self.flush()
    }

    /// After growing from `old`: what lay past the old end inside its last allocation unit
    /// (left there by an earlier shrink) must read as zeroes now that it is inside the disk.
    fn zero_old_tail(&mut self, old: u64) -> Result<()> {
        let new_size = self.size();
        let g = self.driver.cow_granularity().max(1);
        let tail_end = old.div_ceil(g).saturating_mul(g).min(new_size);
        if new_size > old && tail_end > old && self.driver.format() != Format::Raw {
            self.write_zeroes(old, tail_end - old, false)?;
        }
        Ok(())
    }

    /// Changes options of the image (`img amend -o`). A new size is applied as `resize` applies
    /// it: the new space reads as zeroes, whatever a larger backing image holds there.
    ///
    /// # Errors
    /// When the format cannot amend, an option is refused, or I/O fails.
    pub fn amend(&mut self, opts: &crate::CreateOptions) -> Result<()> {
        self.check_writable()?;
        let old = self.size();
        let backing_size = self.backing.as_ref().map(|b| b.size());
        let res = self.driver.amend(opts, backing_size);
        // A grown size stays even when a later step fails (as in qemu): its tail is zeroed.
        if self.size() > old {
            self.zero_old_tail(old)?;
        }
        res?;
        self.flush()
    }

    /// Creates an internal snapshot of the image's current state, dated now (to the
    /// microsecond, as qemu-img dates them from `gettimeofday`).
    ///
    /// # Errors
    /// When the format has no internal snapshots, the name is taken, or I/O fails.
    pub fn snapshot_create(&self, name: &str) -> Result<()> {
        self.check_writable()?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let secs = u32::try_from(now.as_secs()).unwrap_or(u32::MAX);
        self.driver
            .snapshot_create(name, (secs, now.subsec_micros() * 1000))
    }

    /// Reverts the image to an internal snapshot (by ID or name), its disk size included.
    ///
    /// # Errors
    /// When there is no such snapshot, or I/O fails.
    pub fn snapshot_apply(&mut self, name: &str) -> Result<()> {
        self.check_writable()?;
        self.driver.snapshot_apply(name)
    }

    /// Deletes an internal snapshot (by ID or name).
    ///
    /// # Errors
    /// When there is no such snapshot, or I/O fails.
    pub fn snapshot_delete(&self, name: &str) -> Result<()> {
        self.check_writable()?;
        self.driver.snapshot_delete(name)
    }

    /// Whether the range is allocated in any of the top `depth` images of the chain (this image
    /// is depth 1), and for how many bytes that holds. Past an image's end counts as allocated
    /// (it reads as zeroes whatever lies below).
    ///
    /// # Errors
    /// When metadata cannot be read.
    pub fn allocated_above(&self, depth: usize, offset: u64, len: u64) -> Result<(bool, u64)> {
        if depth == 0 {
            return Ok((false, len));
        }
        if offset >= self.size() {
            return Ok((true, len));
        }
        let (m, n) = self.driver.map(offset, len.min(self.size() - offset))?;
        let n = n.clamp(1, len);
        match (m, &self.backing) {
            (Mapping::Unallocated | Mapping::UnallocatedAt { .. }, Some(b)) => {
                let (a, bn) = b.allocated_above(depth - 1, offset, n)?;
                Ok((a, bn.min(n)))
            }
            (Mapping::Unallocated | Mapping::UnallocatedAt { .. }, None) => Ok((false, n)),
            _ => Ok((true, n)),
        }
    }

    /// Whether the range is allocated in this image alone (not the backing chain), for convert
    /// with `-B` and for commit: returns (allocated, bytes for which that holds).
    ///
    /// # Errors
    /// When metadata cannot be read.
    pub fn is_allocated_here(&self, offset: u64, len: u64) -> Result<(bool, u64)> {
        let (m, n) = self.driver.map(offset, len)?;
        let here = !matches!(m, Mapping::Unallocated | Mapping::UnallocatedAt { .. });
        Ok((here, n.clamp(1, len)))
    }
}
