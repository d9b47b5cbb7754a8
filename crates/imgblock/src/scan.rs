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

/// Whether `data` is incompressible: zstd at its fastest level (about 30 times faster than
/// deflate) finds nothing to gain, neither a repeated string nor a skewed byte distribution.
/// Deflate cannot shrink such data either, so compressors use this to skip straight to storing
/// it (qcow2 stores the cluster plainly, a vmdk grain becomes deflate's stored blocks) — the
/// result qemu reaches after a full deflate pass over e.g. already-compressed files.
pub fn incompressible(data: &[u8]) -> bool {
    match zstd::bulk::compress(data, PROBE_LEVEL) {
        Ok(z) => z.len() >= data.len(),
        Err(_) => false,
    }
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
        let mut x = 0x9e37_79b9_u32;
        let noise: Vec<u8> = (0..65536)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x.to_le_bytes()[0]
            })
            .collect();
        assert!(incompressible(&noise));
        let text: Vec<u8> = b"the quick brown fox "
            .iter()
            .copied()
            .cycle()
            .take(65536)
            .collect();
        assert!(!incompressible(&text));
        assert!(!incompressible(&[0u8; 4096]));
    }
}
