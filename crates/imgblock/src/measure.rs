//! `measure`: how large a new image would be, computed the way qemu-img measure computes it.

use crate::{qcow2, CreateOptions, Error, Format, Image, Result};

/// The two figures qemu-img measure prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Measure {
    /// Bytes the new image needs for the given data.
    pub required: u64,
    /// Bytes a fully allocated image of the same size takes.
    pub fully_allocated: u64,
    /// Bytes for the source's persistent bitmaps in the new image (qcow2 → qcow2 only).
    pub bitmaps: Option<u64>,
}

/// Measures a new image of `format` with `opts`, for the data of `source` (whose whole chain
/// is read) or for an empty disk of `opts.size`.
///
/// # Errors
/// When options are invalid, no size is known, or the source cannot be read.
pub fn measure(format: Format, opts: &CreateOptions, source: Option<&Image>) -> Result<Measure> {
    let size = match (source, opts.size) {
        (Some(s), _) => s.size(),
        (None, Some(s)) => s,
        (None, None) => {
            return Err(Error::InvalidOption(
                "Either --size N or one filename must be specified.".into(),
            ))
        }
    };
    match format {
        Format::Raw => {
            let s = size.div_ceil(512) * 512;
            Ok(Measure {
                required: s,
                fully_allocated: s,
                bitmaps: None,
            })
        }
        Format::Qcow2 => {
            let (cs, full) = qcow2::measure_full(size, opts)?;
            let aligned = size.div_ceil(cs) * cs;
            let data = if qcow2::preallocates_data(opts)? {
                aligned
            } else {
                match source {
                    // A new image over a backing file may share nothing with the source's
                    // chain: like qemu, count every cluster as written.
                    Some(_) if opts.backing_file.is_some() => aligned,
                    Some(src) => allocated_data(src, cs)?,
                    None => 0,
                }
            };
            // qemu counts the persistent bitmaps of the source image itself (not its backing);
            // only a v3 target can hold them, and only a source that can (qcow2 v3) has any:
            // qemu leaves the field out otherwise.
            let bitmaps = source
                .filter(|s| s.driver().supports_bitmaps())
                .filter(|_| qcow2::can_hold_bitmaps(opts).unwrap_or(false))
                .map(|s| match s.driver().specific() {
                    crate::FormatSpecific::Qcow2(q) => {
                        qcow2::bitmap::measure(s.size(), cs, &q.bitmaps)
                    }
                    _ => 0,
                });
            Ok(Measure {
                required: full - aligned + data,
                fully_allocated: full,
                bitmaps,
            })
        }
        Format::Luks => {
            let n = crate::luks::measure(opts, size)?;
            Ok(Measure {
                required: n,
                fully_allocated: n,
                bitmaps: None,
            })
        }
        other => Err(Error::InvalidOption(format!(
            "measure does not support format '{other}'"
        ))),
    }
}

/// Bytes of non-zero data in `src`, each run counted from its cluster start to its cluster end.
fn allocated_data(src: &Image, cs: u64) -> Result<u64> {
    let size = src.size();
    let mut pos = 0;
    let mut required = 0;
    while pos < size {
        let st = src.block_status(pos, size - pos)?;
        let mut n = st.len.max(1);
        if !st.zero && st.data && st.present {
            n = (pos + n).div_ceil(cs) * cs - pos;
            required += pos % cs + n;
        }
        pos += n;
    }
    Ok(required)
}
