//! Scans of guest data: zero detection, the inner loop of every copy that keeps images sparse,
//! and the probe that spares deflate from data it cannot shrink.

/// Bytes folded together per step: wide enough that the compiler turns the OR into vector
/// instructions, short enough that a non-zero byte early in a buffer ends the scan early.
const BLOCK: usize = 64;

/// Whether every byte of `buf` is zero.
///
/// Scans in 64-byte blocks, ORing each block's words together, so that the loop vectorises
/// instead of testing one byte at a time (which made zero detection a visible share of a
/// convert's CPU time).
pub fn is_zero(buf: &[u8]) -> bool {
    let mut blocks = buf.chunks_exact(BLOCK);
    for block in &mut blocks {
        let mut acc = 0u64;
        for word in block.chunks_exact(8) {
            let mut w = [0u8; 8];
            w.copy_from_slice(word);
            acc |= u64::from_ne_bytes(w);
        }
        if acc != 0 {
            return false;
        }
    }
    blocks.remainder().iter().all(|&b| b == 0)
}

/// zstd's fastest level, used only as a probe.
const PROBE_LEVEL: i32 = 1;

thread_local! {
    /// This thread's zstd contexts, one per level used. A fresh context for every cluster
    /// showed in convert's profile: its allocation, page faults and set-up cost about 5% of
    /// the compressing threads' time.
    static ZSTD_CTX: std::cell::RefCell<Vec<(i32, zstd::bulk::Compressor<'static>)>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

/// Compresses `data` into one zstd frame at `level`, reusing this thread's context.
///
/// # Errors
/// When zstd cannot create a context or compress.
pub fn zstd_compress(data: &[u8], level: i32) -> std::io::Result<Vec<u8>> {
    ZSTD_CTX.with(|cell| {
        let Ok(mut ctxs) = cell.try_borrow_mut() else {
            return zstd::bulk::compress(data, level);
        };
        let i = match ctxs.iter().position(|(l, _)| *l == level) {
            Some(i) => i,
            None => {
                ctxs.push((level, zstd::bulk::Compressor::new(level)?));
                ctxs.len() - 1
            }
        };
        ctxs[i].1.compress(data)
    })
}

/// Whether `data` is incompressible: zstd at its fastest level (about 30 times faster than
/// deflate) finds nothing to gain, neither a repeated string nor a skewed byte distribution.
/// Deflate cannot shrink such data either, so compressors use this to skip straight to storing
/// it (qcow2 stores the cluster plainly, a vmdk grain becomes deflate's stored blocks) — the
/// result qemu reaches after a full deflate pass over e.g. already-compressed files.
///
/// Data that compresses at all mostly shows it at once, so the first [`PROBE_SAMPLE`] bytes
/// are tried first: when they shrink by an eighth or more, the whole cannot fail to shrink and
/// the full probe is skipped (on real file content it was 7% of a streamOptimized convert's
/// CPU time). Only data whose sample looks incompressible gets the full probe, which decides.
pub fn incompressible(data: &[u8]) -> bool {
    if let Some(sample) = data
        .get(..PROBE_SAMPLE)
        .filter(|_| data.len() >= 2 * PROBE_SAMPLE)
    {
        if zstd_compress(sample, PROBE_LEVEL).is_ok_and(|z| z.len() < sample.len() / 8 * 7) {
            return false;
        }
    }
    match zstd_compress(data, PROBE_LEVEL) {
        Ok(z) => z.len() >= data.len(),
        Err(_) => false,
    }
}

/// Bytes probed before the whole: an eighth of a 64 KiB cluster or grain.
const PROBE_SAMPLE: usize = 8192;

/// Bytes from a xorshift generator: deterministic noise that no compressor shrinks.
#[cfg(test)]
pub(crate) fn test_noise(seed: u32, len: usize) -> Vec<u8> {
    let mut x = seed;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x.to_le_bytes()[0]
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn is_zero_finds_a_byte_anywhere() {
        let mut b = vec![0u8; 4096 + 37];
        assert!(is_zero(&b));
        for i in [0, 63, 64, 4095, 4096, 4132] {
            b[i] = 1;
            assert!(!is_zero(&b), "byte {i}");
            b[i] = 0;
        }
        assert!(is_zero(&[]));
    }

    #[test]
    fn incompressible_noise_yes_text_no() {
        let noise = test_noise(0x9e37_79b9, 65536);
        assert!(incompressible(&noise));
        let text: Vec<u8> = b"the quick brown fox "
            .iter()
            .copied()
            .cycle()
            .take(65536)
            .collect();
        assert!(!incompressible(&text));
        assert!(!incompressible(&[0u8; 4096]));
        // Whatever the sample says, the whole decides: noise after a compressible start is
        // compressible as a whole; noise with a compressible tail is too (the sample looks
        // incompressible, the full probe finds the tail).
        let mut start = text.clone();
        start[16384..].copy_from_slice(&noise[16384..]);
        assert!(!incompressible(&start));
        let mut tail = noise.clone();
        tail[32768..].copy_from_slice(&text[32768..]);
        assert!(!incompressible(&tail));
        // A sample that barely shrinks is not enough to skip the full probe.
        let mut barely = noise.clone();
        barely[..512].fill(0);
        assert!(incompressible(&noise[..16384]));
        assert_eq!(
            incompressible(&barely),
            zstd_compress(&barely, PROBE_LEVEL).unwrap().len() >= barely.len()
        );
    }

    #[test]
    fn zstd_compress_reuses_a_context_per_level_and_round_trips() {
        let text: Vec<u8> = b"a reused context must not leak state between frames "
            .iter()
            .copied()
            .cycle()
            .take(65536)
            .collect();
        let mut other = text.clone();
        other.reverse();
        for level in [1, 3, 1, 3] {
            for data in [&text, &other] {
                let z = zstd_compress(data, level).unwrap();
                assert!(z.len() < data.len() / 10);
                assert_eq!(&zstd::bulk::decompress(&z, data.len()).unwrap(), data);
            }
        }
        ZSTD_CTX.with(|c| assert_eq!(c.borrow().len(), 2, "one context per level"));
    }
}
