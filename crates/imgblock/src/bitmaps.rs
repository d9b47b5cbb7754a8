//! Persistent dirty bitmaps, whatever the format that stores them: the bits of one bitmap as
//! they travel between images (`img bitmap --merge`, `img convert --bitmaps`), and the errors
//! of bitmap management, in qemu's words.
//!
//! Bit `i` of a bitmap of granularity `g` says that guest bytes `[i * g, (i + 1) * g)` may have
//! changed. The bits are kept as qcow2 stores them: byte `i / 8`, bit `i % 8` (LSB first).

/// Smallest granularity qemu accepts (512 bytes).
pub const MIN_GRANULARITY: u64 = 512;
/// Largest granularity qemu accepts (2 GiB: the granularity is a 32-bit power of two).
pub const MAX_GRANULARITY: u64 = 1 << 31;
/// Most bytes of bits one bitmap may have (qemu's BME_MAX_PHYS_SIZE, 512 MiB): a bitmap is
/// held in memory whole, so larger ones are refused ("use a larger granularity").
pub const MAX_BITMAP_BYTES: u64 = 0x2000_0000;

/// Why a bitmap operation was refused. The texts are qemu's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BitmapError {
    /// No bitmap has this name.
    #[error("Dirty bitmap '{0}' not found")]
    NotFound(String),
    /// A bitmap of this name exists already.
    #[error("Bitmap already exists: {0}")]
    Exists(String),
    /// Bitmap names may not be empty.
    #[error("Bitmap name cannot be empty")]
    EmptyName,
    /// An image of size 0 has no bitmap table to store (qemu fails to store one too).
    #[error("Cannot store a persistent bitmap in an image of size 0")]
    ZeroSize,
    /// The granularity is not a power of two in 512 bytes..=2 GiB.
    #[error("Granularity must be power of 2 and at least 512")]
    BadGranularity,
    /// The format cannot store bitmaps.
    #[error("Operation not supported")]
    Unsupported,
    /// qcow2 version 2 has no autoclear bits, so bitmaps could not be kept consistent.
    #[error("Cannot store dirty bitmaps in qcow2 v2 files")]
    VersionTwo,
    /// The name is longer than 1023 bytes.
    #[error("Name length exceeds maximum (1023 characters)")]
    NameTooLong,
    /// The bits would take more than [`MAX_BITMAP_BYTES`] (or more table entries than the
    /// format allows).
    #[error("Too much space will be occupied by the bitmap. Use larger granularity")]
    TooLarge,
    /// The image holds the most bitmaps it may (65535 for qcow2).
    #[error("Maximum number of persistent bitmaps is already reached")]
    TooMany,
    /// The bitmap directory would outgrow its limit (64 MiB for qcow2).
    #[error("Not enough space in the bitmap directory")]
    DirectoryFull,
    /// The bitmap was left in use and not stored back: its bits cannot be trusted.
    #[error(
        "Bitmap '{0}' is inconsistent and cannot be used\n\
         Try block-dirty-bitmap-remove to delete this bitmap from disk"
    )]
    Inconsistent(String),
    /// A merge between bitmaps of disks of different sizes.
    #[error(
        "Bitmaps are of different sizes (destination size is {dest}, source size is {src}) \
         and can't be merged"
    )]
    SizeMismatch {
        /// The target's disk size in bytes.
        dest: u64,
        /// The source's disk size in bytes.
        src: u64,
    },
}

impl BitmapError {
    /// Whether the format refused to store a new bitmap of this kind: qemu then says
    /// "Can't make bitmap 'NAME' persistent in 'NODE': " before the reason.
    pub fn refuses_persistence(&self) -> bool {
        matches!(
            self,
            BitmapError::VersionTwo
                | BitmapError::NameTooLong
                | BitmapError::TooLarge
                | BitmapError::TooMany
                | BitmapError::DirectoryFull
        )
    }
}

/// The granularity qemu gives a new bitmap when none is asked for: the cluster size, kept in
/// 4 KiB..=64 KiB (64 KiB for formats without clusters).
pub fn default_granularity(cluster_size: Option<u64>) -> u64 {
    cluster_size.map_or(65536, |cs| cs.clamp(4096, 65536))
}

/// Checks a granularity as qemu does before it asks the format.
///
/// # Errors
/// [`BitmapError::BadGranularity`] unless a power of two in 512 bytes..=2 GiB.
pub fn check_granularity(granularity: u64) -> Result<u8, BitmapError> {
    if !(MIN_GRANULARITY..=MAX_GRANULARITY).contains(&granularity) || !granularity.is_power_of_two()
    {
        return Err(BitmapError::BadGranularity);
    }
    // A power of two of at most 2^31: its bit number fits.
    u8::try_from(granularity.trailing_zeros()).map_err(|_| BitmapError::BadGranularity)
}

/// Bytes of bits a bitmap of `granularity_bits` over a `disk_size`-byte disk needs.
pub fn bitmap_bytes(disk_size: u64, granularity_bits: u8) -> u64 {
    disk_size.div_ceil(1u64 << granularity_bits).div_ceil(8)
}

/// The bits of one dirty bitmap over a disk of a given size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirtyBits {
    granularity_bits: u8,
    disk_size: u64,
    bits: u64,
    bytes: Vec<u8>,
}

impl DirtyBits {
    /// An all-clean bitmap of `granularity` (a power of two, 512 bytes..=2 GiB) over a
    /// `disk_size`-byte disk.
    ///
    /// # Errors
    /// [`BitmapError::BadGranularity`]; [`BitmapError::TooLarge`] past [`MAX_BITMAP_BYTES`].
    pub fn new(disk_size: u64, granularity: u64) -> Result<DirtyBits, BitmapError> {
        let granularity_bits = check_granularity(granularity)?;
        let len = bitmap_bytes(disk_size, granularity_bits);
        if len > MAX_BITMAP_BYTES {
            return Err(BitmapError::TooLarge);
        }
        Ok(DirtyBits {
            granularity_bits,
            disk_size,
            bits: disk_size.div_ceil(granularity),
            // At most MAX_BITMAP_BYTES (checked above).
            bytes: vec![0; usize::try_from(len).map_err(|_| BitmapError::TooLarge)?],
        })
    }

    /// Bytes of guest data one bit covers.
    pub fn granularity(&self) -> u64 {
        1 << self.granularity_bits
    }

    /// log2 of [`DirtyBits::granularity`].
    pub fn granularity_bits(&self) -> u8 {
        self.granularity_bits
    }

    /// The disk size the bitmap covers, in bytes.
    pub fn disk_size(&self) -> u64 {
        self.disk_size
    }

    /// How many bits there are.
    pub fn len(&self) -> u64 {
        self.bits
    }

    /// Whether the bitmap has no bits (a zero-sized disk).
    pub fn is_empty(&self) -> bool {
        self.bits == 0
    }

    /// The bits, LSB first, as qcow2 stores them; bits past [`DirtyBits::len`] are clear.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Whether bit `i` is set.
    pub fn get(&self, i: u64) -> bool {
        usize::try_from(i / 8)
            .ok()
            .and_then(|b| self.bytes.get(b))
            .is_some_and(|&b| b & (1 << (i % 8)) != 0)
    }

    /// Whether no bit is set.
    pub fn is_clean(&self) -> bool {
        self.bytes.iter().all(|&b| b == 0)
    }

    /// ORs `data` into the bytes from byte `at` on (what does not fit is ignored), then clears
    /// the bits past the end that it may have set.
    pub fn or_bytes(&mut self, at: u64, data: &[u8]) {
        let Ok(start) = usize::try_from(at) else {
            return;
        };
        if let Some(dst) = self.bytes.get_mut(start..) {
            for (d, s) in dst.iter_mut().zip(data) {
                *d |= s;
            }
        }
        self.clear_tail();
    }

    /// Sets the bits of bytes `[at, at + n)` of the bit array (an "all ones" table entry),
    /// bits past the end excepted.
    pub fn fill_bytes(&mut self, at: u64, n: u64) {
        let Ok(start) = usize::try_from(at) else {
            return;
        };
        let end = usize::try_from(at.saturating_add(n))
            .unwrap_or(usize::MAX)
            .min(self.bytes.len());
        if let Some(dst) = self.bytes.get_mut(start..end) {
            dst.fill(0xff);
        }
        self.clear_tail();
    }

    fn clear_tail(&mut self) {
        let rem = self.bits % 8;
        if rem != 0 {
            if let Some(last) = self.bytes.last_mut() {
                *last &= (1u8 << rem) - 1;
            }
        }
    }

    /// Marks every granule that guest bytes `[start, end)` touch.
    pub fn set_range(&mut self, start: u64, end: u64) {
        if end <= start {
            return;
        }
        let first = start >> self.granularity_bits;
        let stop = (end.div_ceil(self.granularity())).min(self.bits);
        let mut i = first;
        while i < stop {
            let Some(byte) = usize::try_from(i / 8)
                .ok()
                .and_then(|b| self.bytes.get_mut(b))
            else {
                return;
            };
            if i % 8 == 0 && stop - i >= 8 {
                *byte = 0xff;
                i += 8;
            } else {
                *byte |= 1 << (i % 8);
                i += 1;
            }
        }
    }

    /// The dirty guest ranges `[start, end)` in order, merged where they touch, the last one
    /// ending at the disk size.
    pub fn dirty_ranges(&self) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        let g = self.granularity();
        for (bi, &byte) in self.bytes.iter().enumerate() {
            if byte == 0 {
                continue;
            }
            for k in 0..8u64 {
                if byte & (1 << k) == 0 {
                    continue;
                }
                let i = bi as u64 * 8 + k;
                let s = i * g;
                let e = s.saturating_add(g).min(self.disk_size);
                match out.last_mut() {
                    Some(last) if last.1 == s => last.1 = e,
                    _ => out.push((s, e)),
                }
            }
        }
        out
    }

    /// ORs `src` into this bitmap, as qemu's merge does: the same granularity bit for bit, another
    /// one through the guest ranges that `src` marks.
    ///
    /// # Errors
    /// [`BitmapError::SizeMismatch`] when the disks differ in size.
    pub fn merge(&mut self, src: &DirtyBits) -> Result<(), BitmapError> {
        if src.disk_size != self.disk_size {
            return Err(BitmapError::SizeMismatch {
                dest: self.disk_size,
                src: src.disk_size,
            });
        }
        if src.granularity_bits == self.granularity_bits {
            for (d, s) in self.bytes.iter_mut().zip(&src.bytes) {
                *d |= s;
            }
        } else {
            for (s, e) in src.dirty_ranges() {
                self.set_range(s, e);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_checks_granularity_and_size() {
        assert_eq!(
            DirtyBits::new(1 << 20, 256),
            Err(BitmapError::BadGranularity)
        );
        assert_eq!(
            DirtyBits::new(1 << 20, 3000),
            Err(BitmapError::BadGranularity)
        );
        assert_eq!(
            DirtyBits::new(1 << 20, 1 << 32),
            Err(BitmapError::BadGranularity)
        );
        // qemu: a 2 TiB disk takes 512-byte granularity (512 MiB of bits), 2 TiB + 512 not.
        assert!(check_granularity(512).is_ok());
        assert_eq!(bitmap_bytes(2 << 40, 9), MAX_BITMAP_BYTES);
        assert_eq!(
            DirtyBits::new((2 << 40) + 512, 512),
            Err(BitmapError::TooLarge)
        );
        let b = DirtyBits::new(1000, 512).unwrap();
        assert_eq!(
            (b.len(), b.as_bytes().len(), b.granularity_bits()),
            (2, 1, 9)
        );
    }

    #[test]
    fn set_range_marks_touched_granules_and_ranges_round_trip() {
        let mut b = DirtyBits::new(10 * 65536 + 100, 65536).unwrap();
        b.set_range(100, 101);
        b.set_range(3 * 65536, 5 * 65536 + 1);
        b.set_range(10 * 65536 + 50, u64::MAX);
        assert_eq!(
            b.dirty_ranges(),
            vec![
                (0, 65536),
                (3 * 65536, 6 * 65536),
                (10 * 65536, 10 * 65536 + 100)
            ]
        );
        assert!(b.get(10) && !b.get(11) && !b.get(1));
    }

    #[test]
    fn set_range_whole_bytes_stop_at_the_end() {
        let mut b = DirtyBits::new(20 * 512, 512).unwrap();
        b.set_range(0, u64::MAX);
        assert_eq!(b.as_bytes(), &[0xff, 0xff, 0x0f]);
    }

    #[test]
    fn merge_other_granularity_goes_through_ranges() {
        let mut fine = DirtyBits::new(1 << 20, 512).unwrap();
        fine.set_range(70_000, 70_001);
        let mut coarse = DirtyBits::new(1 << 20, 65536).unwrap();
        coarse.merge(&fine).unwrap();
        assert_eq!(coarse.dirty_ranges(), vec![(65536, 131072)]);
        let mut back = DirtyBits::new(1 << 20, 512).unwrap();
        back.merge(&coarse).unwrap();
        assert_eq!(back.dirty_ranges(), vec![(65536, 131072)]);
    }

    #[test]
    fn merge_different_disk_sizes_is_refused() {
        let mut a = DirtyBits::new(16 << 20, 65536).unwrap();
        let b = DirtyBits::new(8 << 20, 65536).unwrap();
        assert_eq!(
            a.merge(&b).unwrap_err().to_string(),
            "Bitmaps are of different sizes (destination size is 16777216, source size is \
             8388608) and can't be merged"
        );
    }

    #[test]
    fn or_and_fill_bytes_never_set_bits_past_the_end() {
        let mut b = DirtyBits::new(3 * 512, 512).unwrap();
        b.or_bytes(0, &[0xff, 0xff]);
        assert_eq!(b.as_bytes(), &[0x07]);
        let mut c = DirtyBits::new(3 * 512, 512).unwrap();
        c.fill_bytes(0, 4096);
        assert_eq!(c.as_bytes(), &[0x07]);
        c.or_bytes(u64::MAX, &[1]);
        assert_eq!(c.as_bytes(), &[0x07]);
    }

    #[test]
    fn default_granularity_follows_cluster_size_like_qemu() {
        assert_eq!(default_granularity(Some(512)), 4096);
        assert_eq!(default_granularity(Some(65536)), 65536);
        assert_eq!(default_granularity(Some(2 << 20)), 65536);
        assert_eq!(default_granularity(None), 65536);
    }
}
