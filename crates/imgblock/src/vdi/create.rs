//! Creating VDI images with qemu-img's options (qemu's layout: block map right after the
//! header, data right after the block map, both sector aligned).

use std::path::Path;

use super::header::{Header, ImageType, BLOCK_SIZE, HEADER_LEN};
use super::{Error as VdiError, MAX_BLOCKS};
use crate::error::IoContext;
use crate::options::parse_bool;
use crate::raw::Preallocation;
use crate::storage::{FileStorage, Storage};
use crate::{CreateOptions, Error, Result};

/// Options vdi accepts on create, with qemu-img's help text.
pub const CREATE_OPTIONS: &[(&str, &str)] = &[
    (
        "extent_size_hint",
        "Extent size hint for the image file, 0 to disable",
    ),
    ("nocow", "Turn off copy-on-write (valid only on btrfs)"),
    (
        "preallocation",
        "Preallocation mode (allowed values: off, falloc, full)",
    ),
    ("size", "Virtual disk size"),
    ("static", "VDI static (pre-allocated) image"),
];

fn invalid(path: &Path, e: VdiError) -> Error {
    Error::Vdi {
        path: path.to_owned(),
        source: e,
    }
}

/// Creates a VDI image: dynamic, or static (`static=on`: every block allocated, in order).
///
/// # Errors
/// When an option is invalid, the size is too large, or I/O fails.
pub fn create(path: &Path, opts: &CreateOptions) -> Result<()> {
    let mut is_static = false;
    for (k, v) in &opts.opts {
        match k.as_str() {
            "static" => is_static = parse_bool(k, v)?,
            "preallocation" => {
                // qemu passes these to the file layer, which preallocates only the header.
                // The caller names the file (qemu's words follow it).
                if Preallocation::parse(v)? == Preallocation::Metadata {
                    return Err(Error::InvalidOption(
                        "Unsupported preallocation mode: metadata".into(),
                    ));
                }
            }
            "extent_size_hint" | "nocow" => {}
            _ => {
                return Err(Error::InvalidOption(format!(
                    "Invalid parameter '{k}' for format vdi"
                )))
            }
        }
    }
    if opts.backing_file.is_some() {
        return Err(Error::InvalidOption(
            "vdi images cannot have a backing file".into(),
        ));
    }
    if opts.backing_fmt.is_some() {
        // Not an option of vdi's: qemu refuses it by name.
        return Err(Error::InvalidOption(
            "Invalid parameter 'backing_fmt'".into(),
        ));
    }
    let size = opts
        .size
        .ok_or_else(|| Error::InvalidOption("Image creation needs a size parameter".into()))?;
    // qemu stores the size rounded up to a whole sector (VirtualBox expects one).
    let size = size.div_ceil(512).saturating_mul(512);
    let bs = u64::from(BLOCK_SIZE);
    let blocks = size.div_ceil(bs);
    let blocks = u32::try_from(blocks)
        .ok()
        .filter(|&b| b <= MAX_BLOCKS)
        .ok_or_else(|| {
            invalid(
                path,
                VdiError::InvalidOption(format!(
                    "Unsupported VDI image size (size is 0x{size:x}, max supported is 0x{:x})",
                    u64::from(MAX_BLOCKS) * bs
                )),
            )
        })?;
    let kind = if is_static {
        ImageType::Static
    } else {
        ImageType::Dynamic
    };
    let mut h = Header::new(size, blocks, kind);
    let bmap_len = u64::from(blocks) * 4;
    h.offset_bmap = u32::try_from(HEADER_LEN).unwrap_or(512);
    let data = (HEADER_LEN as u64 + bmap_len).div_ceil(512) * 512;
    h.offset_data = u32::try_from(data)
        .map_err(|_| invalid(path, VdiError::InvalidOption("block map too large".into())))?;
    if is_static {
        h.blocks_allocated = blocks;
    }
    crate::storage::refuse_device(path, "vdi")?;
    let s = FileStorage::create_with(path, opts.file)?;
    s.write_at(&h.to_bytes(), 0).ctx(path)?;
    // The map of a large disk runs to 2 GiB: written a megabyte at a time.
    const CHUNK: u32 = 1 << 18;
    let mut buf = Vec::with_capacity(CHUNK as usize * 4);
    for first in (0..blocks).step_by(CHUNK as usize) {
        buf.clear();
        for i in first..blocks.min(first.saturating_add(CHUNK)) {
            let e = if is_static { i } else { super::BMAP_FREE };
            buf.extend_from_slice(&e.to_le_bytes());
        }
        let at = u64::from(h.offset_bmap) + u64::from(first) * 4;
        s.write_at(&buf, at).ctx(path)?;
    }
    let end = if is_static {
        data + u64::from(blocks) * bs
    } else {
        data
    };
    s.set_len(end).ctx(path)?;
    s.flush().ctx(path)
}
