//! Whole-image operations built on [`Image`]: commit and rebase. They stream in fixed-size
//! chunks, so memory stays bounded whatever the image size.

use std::path::Path;

use crate::crypto::Secrets;
use crate::driver::BackingSpec;
use crate::{Error, Format, Image, OpenOptions, Result};

/// Bytes moved per step.
pub const CHUNK: u64 = 2 << 20;

/// Progress reports: (bytes done, bytes in all).
pub type Progress<'a> = &'a (dyn Fn(u64, u64) + Sync);

/// Does nothing with progress.
pub fn no_progress(_done: u64, _total: u64) {}

/// Told the bytes of guest data an operation just wrote, so that the caller can pace it (a
/// rate limit sleeps here).
pub type Throttle<'a> = &'a (dyn Fn(u64) + Sync);

/// Does not pace anything.
pub fn no_throttle(_written: u64) {}

/// Writes the data of `top` (and of the images between it and `base_depth`) into the image at
/// `base_depth` in its chain (default 1: the immediate backing image), then empties `top`
/// unless `keep` (qemu-img commit's -d) or its format cannot be emptied (vmdk, vdi: it keeps its
/// data, as in qemu). The base grows if it is smaller. `secrets` holds the passphrases of the
/// chain's encrypted layers, by depth below `top`.
///
/// # Errors
/// When `top` has no backing image, the base cannot be opened for writing, an encrypted layer
/// has no secret ([`Error::KeyRequired`]) or a wrong one ([`Error::Crypto`]), or I/O fails.
pub fn commit(
    top_path: &Path,
    format: Option<Format>,
    secrets: &Secrets,
    base: Option<&Path>,
    keep: bool,
    progress: Progress<'_>,
) -> Result<()> {
    commit_throttled(
        top_path,
        format,
        secrets,
        base,
        keep,
        progress,
        &no_throttle,
    )
}

/// [`commit`], telling `throttle` the bytes of each range it writes into the base (ranges the
/// overlay leaves unallocated cost nothing), as qemu-img commit's rate limit counts them.
///
/// # Errors
/// As [`commit`].
pub fn commit_throttled(
    top_path: &Path,
    format: Option<Format>,
    secrets: &Secrets,
    base: Option<&Path>,
    keep: bool,
    progress: Progress<'_>,
    throttle: Throttle<'_>,
) -> Result<()> {
    // The top image is emptied at the end. As qemu-img, it is opened for writing before
    // anything is written, so that an image that cannot be written (a read-only format or
    // file) fails the commit while the base is still untouched; that handle holds its write
    // lock throughout. The chain is read without locks of its own, so that the base below can
    // be opened for writing.
    let top_w = Image::open_with_secrets(top_path, &writable_alone(format), secrets)?;
    let top = Image::open_with_secrets(
        top_path,
        &OpenOptions {
            force_share: true,
            ..OpenOptions::read_only().format(format)
        },
        secrets,
    )?;
    let chain = top.chain();
    if chain.len() < 2 {
        return Err(Error::Unsupported {
            path: top_path.to_owned(),
            what: "Image does not have a backing file".into(),
        });
    }
    let depth = match base {
        None => 1,
        Some(b) => {
            let want = std::fs::canonicalize(b).map_err(|e| Error::Io {
                path: b.to_owned(),
                source: e,
            })?;
            chain
                .iter()
                .position(|i| {
                    std::fs::canonicalize(i.path()).ok().as_deref() == Some(want.as_path())
                })
                .filter(|&d| d > 0)
                .ok_or_else(|| {
                    Error::InvalidOption(format!(
                        "'{}' is not a backing file of '{}'",
                        b.display(),
                        top_path.display()
                    ))
                })?
        }
    };
    let base_img = chain[depth];
    let base_path = base_img.path().to_owned();
    let base_format = base_img.format();
    let base_window = base_img.raw_window();
    let size = top.size();
    drop(chain);
    // The base opened on its own is the top of its chain: its secrets are renumbered.
    let mut base_w = Image::open_with_secrets(
        &base_path,
        &OpenOptions {
            raw_window: base_window,
            ..OpenOptions::writable().format(Some(base_format))
        },
        &secrets.below(depth),
    )?;
    if base_w.size() < size {
        base_w.resize(size, crate::raw::Preallocation::Off)?;
    }
    let mut buf = vec![0u8; usize::try_from(CHUNK).unwrap_or(0)];
    let mut pos = 0;
    while pos < size {
        let (alloc, n) = top.allocated_above(depth, pos, (size - pos).min(CHUNK))?;
        if alloc {
            let b = &mut buf[..usize::try_from(n).unwrap_or(0)];
            top.read_at(b, pos)?;
            if crate::scan::is_zero(b) {
                // As qemu's commit job: zeroes may drop the base's allocation there.
                base_w.write_zeroes(pos, n, true)?;
            } else {
                base_w.write_at(b, pos)?;
            }
            throttle(n);
        }
        pos += n;
        progress(pos, size);
    }
    base_w.flush()?;
    drop(base_w);
    drop(top);
    if !keep {
        // A format without emptying keeps its data, which now equals the base's: no error.
        if top_w.driver().make_empty()? {
            top_w.flush()?;
        }
    }
    Ok(())
}

/// Changes the backing file of `path`. In safe mode (`unsafe_` false) every range that reads
/// differently through the new chain than through the old one is copied into the image first;
/// `new_backing` of `None` flattens it. Unsafe mode only rewrites the header.
///
/// `secrets` unlocks the image and its current chain, by depth. The new backing chain is
/// opened without secrets, as qemu-img 10 opens it (its rebase has no way to name one), so a
/// safe rebase onto an encrypted image fails with [`Error::KeyRequired`].
///
/// # Errors
/// When an image cannot be opened (an encrypted one without its secret included), or I/O fails.
pub fn rebase(
    path: &Path,
    format: Option<Format>,
    secrets: &Secrets,
    new_backing: Option<&BackingSpec>,
    unsafe_: bool,
    progress: Progress<'_>,
) -> Result<()> {
    if unsafe_ {
        let img = Image::open_with_secrets(path, &writable_alone(format), secrets)?;
        img.driver().set_backing(new_backing)?;
        return img.flush();
    }
    rebase_copying(path, format, secrets, new_backing, false, progress)
}

/// A safe [`rebase`] (unsafe mode copies nothing) that stores the clusters it copies
/// compressed, as qemu-img rebase -c does: a cluster where the two chains differ anywhere is
/// written whole, compressed (or plain where it does not shrink).
///
/// # Errors
/// As [`rebase`]; [`Error::Unsupported`] when the format has no compressed clusters.
pub fn rebase_compressed(
    path: &Path,
    format: Option<Format>,
    secrets: &Secrets,
    new_backing: Option<&BackingSpec>,
    progress: Progress<'_>,
) -> Result<()> {
    rebase_copying(path, format, secrets, new_backing, true, progress)
}

/// Options that open an image for writing without its backing chain.
fn writable_alone(format: Option<Format>) -> OpenOptions {
    OpenOptions {
        no_backing: true,
        ..OpenOptions::writable().format(format)
    }
}

/// Reads `buf.len()` bytes at `pos` as `chain` (no chain: zeroes) shows them.
fn read_chain(chain: Option<&Image>, buf: &mut [u8], pos: u64) -> Result<()> {
    match chain {
        Some(b) if pos < b.size() => {
            let inside = usize::try_from((b.size() - pos).min(buf.len() as u64)).unwrap_or(0);
            b.read_at(&mut buf[..inside], pos)?;
            buf[inside..].fill(0);
        }
        _ => buf.fill(0),
    }
    Ok(())
}

/// How many bytes from `pos` (at most `n`) read as zeroes both through `img`'s backing chain
/// (`img` itself holds nothing there) and through `new_chain`, as their block status tells.
fn both_read_zero(img: &Image, new_chain: Option<&Image>, pos: u64, n: u64) -> Result<u64> {
    let old = img.block_status(pos, n)?;
    if !old.zero {
        return Ok(0);
    }
    let new = match new_chain {
        Some(c) => {
            let st = c.block_status(pos, n)?;
            if st.zero {
                st.len
            } else {
                0
            }
        }
        None => n,
    };
    Ok(old.len.min(new).min(n))
}

/// What a safe `rebase -c` fails with when the image has data to copy but cannot hold
/// compressed clusters (a qcow2 with an external data file).
pub const NO_COMPRESSED_CLUSTERS: &str = "Compression not supported for this file format";

/// The safe rebase: copies what reads differently through the new chain, then rewrites the
/// header.
fn rebase_copying(
    path: &Path,
    format: Option<Format>,
    secrets: &Secrets,
    new_backing: Option<&BackingSpec>,
    compress: bool,
    progress: Progress<'_>,
) -> Result<()> {
    let img = Image::open_with_secrets(path, &OpenOptions::writable().format(format), secrets)?;
    let new_chain = match new_backing {
        Some(b) => {
            let p = crate::image::resolve_backing(path, &b.filename);
            let f = b.format.as_deref().map(str::parse).transpose()?;
            Some(Image::open(&p, &OpenOptions::read_only().format(f))?)
        }
        None => None,
    };
    // Compressed clusters, where the format has them (a cluster of zeroes always shrinks).
    let cluster = compress
        .then(|| img.driver().cluster_size())
        .flatten()
        .filter(|&cs| cs <= CHUNK && img.compress_cluster(&[0]).is_some());
    // An image that cannot hold compressed clusters (a qcow2 with a data file) fails with
    // `-c` only once there is data to copy, as in qemu, and then before anything is written.
    let refuse = || Error::Unsupported {
        path: path.to_owned(),
        what: NO_COMPRESSED_CLUSTERS.into(),
    };
    let cannot_compress = compress && cluster.is_none();
    if new_chain.is_some() {
        // Where the old chain reads zeroes and the new one does not, the zeroes written must
        // hold once the new backing file is set, though nothing lies below them yet.
        img.driver().expect_backing();
    }
    let size = img.size();
    let old_end = img.backing().map_or(0, Image::size);
    let mut old = vec![0u8; usize::try_from(CHUNK).unwrap_or(0)];
    let mut new = vec![0u8; old.len()];
    let mut pos = 0;
    // Compressing: the clusters before this one are done.
    let mut next_cluster = 0;
    // The new backing file may already be in the old chain (layers between are dropped): then
    // only what the image and those layers hold can read differently, and the rest is skipped
    // without reading, as qemu does. `shared` is the new base's depth in the old chain.
    let shared = new_chain.as_ref().and_then(|nc| {
        let same = |c: &&Image| {
            c.format() == nc.format()
                && match (c.path().canonicalize(), nc.path().canonicalize()) {
                    (Ok(a), Ok(b)) => a == b,
                    _ => false,
                }
        };
        img.chain().iter().skip(1).position(same).map(|i| i + 1)
    });
    while pos < size {
        let (here, mut n) = img.is_allocated_here(pos, (size - pos).min(CHUNK))?;
        if let (false, Some(depth)) = (here, shared) {
            let (above, an) = img.allocated_above(depth, pos, n)?;
            if !above {
                pos += an;
                progress(pos, size);
                continue;
            }
            n = n.min(an);
        }
        // Where both chains read as zeroes by their metadata (a large, mostly empty disk),
        // nothing differs: skipped without reading.
        let zeroes = if here {
            0
        } else {
            both_read_zero(&img, new_chain.as_ref(), pos, n)?
        };
        if zeroes > 0 {
            pos += zeroes;
            progress(pos, size);
            continue;
        }
        if let (false, Some(cs)) = (here, cluster) {
            let mut c = (pos / cs * cs).max(next_cluster);
            while c < pos + n {
                let len = usize::try_from(cs.min(size - c)).unwrap_or(0);
                let (o, nb) = (&mut old[..len], &mut new[..len]);
                img.read_at(o, c)?;
                read_chain(new_chain.as_ref(), nb, c)?;
                if o != nb {
                    let packed = img.compress_cluster(o);
                    img.write_cluster(c, o, packed.as_deref())?;
                }
                c += cs;
            }
            next_cluster = c;
        } else if !here {
            let nu = usize::try_from(n).unwrap_or(0);
            let o = &mut old[..nu];
            img.read_at(o, pos)?;
            let nb = &mut new[..nu];
            read_chain(new_chain.as_ref(), nb, pos)?;
            // Copy only the sectors that differ, so identical parts stay shared.
            let mut i = 0;
            while i < nu {
                let e = (i + 512).min(nu);
                if o[i..e] != nb[i..e] {
                    let mut j = e;
                    while j < nu && o[j..(j + 512).min(nu)] != nb[j..(j + 512).min(nu)] {
                        j = (j + 512).min(nu);
                    }
                    if pos + i as u64 >= old_end {
                        // Past the old backing file's end the image read zeroes: as qemu, a
                        // zero write records them without data.
                        img.write_zeroes(pos + i as u64, (j - i) as u64, false)?;
                    } else if cannot_compress {
                        return Err(refuse());
                    } else {
                        img.write_at(&o[i..j], pos + i as u64)?;
                    }
                    i = j;
                } else {
                    i = e;
                }
            }
        }
        pos += n;
        progress(pos, size);
    }
    img.driver().set_backing(new_backing)?;
    img.flush()
}
