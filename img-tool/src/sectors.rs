//! Zero detection and comparison on 512-byte sectors, with qemu-img's rules (its
//! `compare_buffers`, `find_nonzero`, `is_allocated_sectors` and `is_allocated_sectors_min`).
//! A buffer whose length is not a multiple of 512 ends in a short sector.

/// The unit qemu-img detects zeroes and differences in.
pub const SECTOR: usize = 512;

fn sector(buf: &[u8], i: usize) -> &[u8] {
    let start = i * SECTOR;
    &buf[start..buf.len().min(start + SECTOR)]
}

fn sectors(buf: &[u8]) -> usize {
    buf.len().div_ceil(SECTOR)
}

/// Whether every byte is zero (vectorised, in the block library).
pub fn is_zero(s: &[u8]) -> bool {
    imgblock::scan::is_zero(s)
}

/// Offset of the first 512-byte sector in which `a` and `b` differ.
pub fn first_difference(a: &[u8], b: &[u8]) -> Option<u64> {
    // One memcmp of the whole buffer settles the common case.
    if a == b {
        return None;
    }
    (0..sectors(a))
        .find(|&i| sector(a, i) != sector(b, i))
        .map(|i| (i * SECTOR) as u64)
}

/// Offset of the first 512-byte sector that is not all zeroes.
pub fn first_nonzero(buf: &[u8]) -> Option<u64> {
    (0..sectors(buf))
        .find(|&i| !is_zero(sector(buf, i)))
        .map(|i| (i * SECTOR) as u64)
}

/// `is_allocated_sectors`: whether the first sector holds data, and for how many sectors that
/// state lasts; ends are pulled to `alignment` (in sectors, counted from `sector_num`) so that
/// writes stay aligned.
fn allocated_run(buf: &[u8], sector_num: u64, alignment: u64) -> (bool, usize) {
    let n = sectors(buf);
    if n == 0 {
        return (false, 0);
    }
    let zero = is_zero(sector(buf, 0));
    let mut i = (1..n)
        .find(|&i| is_zero(sector(buf, i)) != zero)
        .unwrap_or(n);
    if i == n {
        return (!zero, n);
    }
    let alignment = alignment.max(1);
    let tail = usize::try_from((sector_num + i as u64) % alignment).unwrap_or(0);
    let mut zero = zero;
    if tail > 0 {
        if zero && i <= tail {
            // The next sector is data and rewrites this tail anyway: write it as data now.
            zero = false;
        }
        if zero {
            i -= tail;
        } else {
            i = (i + usize::try_from(alignment).unwrap_or(1) - tail).min(n);
        }
    }
    (!zero, i)
}

/// `is_allocated_sectors_min`: like [`allocated_run`], but when the buffer starts with data,
/// zero runs shorter than `min` sectors count as data, so that small holes do not split writes.
/// Returns whether the leading run is data and its length in bytes.
pub fn data_run(buf: &[u8], sector_num: u64, min: usize, alignment: u64) -> (bool, usize) {
    let n = sectors(buf);
    let min = min.min(n);
    let (data, first) = allocated_run(buf, sector_num, alignment);
    if !data {
        return (false, (first * SECTOR).min(buf.len()));
    }
    let mut used = first;
    let mut checked = first;
    while checked < n {
        let (d, run) = allocated_run(
            &buf[checked * SECTOR..],
            sector_num + checked as u64,
            alignment,
        );
        checked += run;
        if d {
            used = checked;
        } else if run >= min {
            break;
        }
    }
    (true, (used * SECTOR).min(buf.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_difference_reports_sector_start() {
        let a = vec![0u8; 4096];
        let mut b = a.clone();
        b[1500] = 1;
        assert_eq!(first_difference(&a, &b), Some(1024));
        assert_eq!(first_difference(&a, &a), None);
    }

    #[test]
    fn first_nonzero_short_last_sector() {
        let mut b = vec![0u8; 1000];
        b[999] = 1;
        assert_eq!(first_nonzero(&b), Some(512));
    }

    #[test]
    fn data_run_all_zero_is_one_hole() {
        assert_eq!(data_run(&[0u8; 8192], 0, 8, 8), (false, 8192));
    }

    #[test]
    fn data_run_small_hole_inside_data_is_data() {
        let mut b = vec![1u8; 16 * SECTOR];
        b[4 * SECTOR..6 * SECTOR].fill(0);
        assert_eq!(data_run(&b, 0, 8, 8), (true, 16 * SECTOR));
    }

    #[test]
    fn data_run_large_hole_ends_data_at_alignment() {
        let mut b = vec![0u8; 32 * SECTOR];
        b[..SECTOR].fill(1);
        // One data sector, aligned up to 8 sectors; the 24-sector hole after it splits.
        assert_eq!(data_run(&b, 0, 8, 8), (true, 8 * SECTOR));
        assert_eq!(data_run(&b[8 * SECTOR..], 8, 8, 8), (false, 24 * SECTOR));
    }

    #[test]
    fn data_run_hole_before_data_is_trimmed_to_alignment() {
        let mut b = vec![0u8; 16 * SECTOR];
        b[10 * SECTOR..].fill(1);
        // The hole ends at sector 10; aligned down to 8.
        assert_eq!(data_run(&b, 0, 8, 8), (false, 8 * SECTOR));
    }
}
