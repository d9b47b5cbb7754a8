//! Compressed clusters: zlib (raw deflate, as qemu writes it) and zstd.

use std::io::Read;

use super::header::CompressionType;

/// Decompresses `input` (which may carry trailing bytes up to the next sector) into exactly
/// `out.len()` bytes.
///
/// # Errors
/// When the stream is corrupt or ends before `out` is full.
pub fn decompress(kind: CompressionType, input: &[u8], out: &mut [u8]) -> std::io::Result<()> {
    let bad = || {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "corrupt compressed cluster",
        )
    };
    match kind {
        CompressionType::Zlib => {
            let n = crate::inflate::inflate(crate::inflate::Framing::Raw, input, out);
            if n == Some(out.len()) {
                Ok(())
            } else {
                Err(bad())
            }
        }
        CompressionType::Zstd => {
            let mut d = zstd::stream::read::Decoder::with_buffer(input)?.single_frame();
            let mut done = 0;
            while done < out.len() {
                match d.read(&mut out[done..]) {
                    Ok(0) => return Err(bad()),
                    Ok(n) => done += n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(_) => return Err(bad()),
                }
            }
            Ok(())
        }
    }
}

/// The deflate level for zlib clusters. qemu uses zlib's default (6), but zlib-rs's level 6 is
/// zlib-ng's faster "medium" strategy, whose output is about 4% larger; its level 9 matches
/// zlib's level-6 size (within 0.5% on binaries and text) and still runs faster than zlib's 6.
const ZLIB_LEVEL: u32 = 9;

/// Compresses one cluster the way qemu does: raw deflate with a 4 KiB window (qemu inflates with
/// windowBits -12, so a larger window would make images qemu cannot read), or one zstd frame.
/// Returns `None` when the result would not be smaller than `limit` bytes; the caller then
/// stores the cluster uncompressed, as qemu does.
pub fn compress(kind: CompressionType, input: &[u8], limit: usize) -> Option<Vec<u8>> {
    match kind {
        CompressionType::Zlib => {
            // Deflate spends as long failing on noise as succeeding on text: skip data that
            // the (much faster) probe already finds incompressible.
            if crate::scan::incompressible(input) {
                return None;
            }
            let mut c = flate2::Compress::new_with_window_bits(
                flate2::Compression::new(ZLIB_LEVEL),
                false,
                12,
            );
            let mut out = Vec::with_capacity(limit);
            match c.compress_vec(input, &mut out, flate2::FlushCompress::Finish) {
                Ok(flate2::Status::StreamEnd) if out.len() < limit => Some(out),
                _ => None,
            }
        }
        CompressionType::Zstd => {
            let out = crate::scan::zstd_compress(input, zstd::DEFAULT_COMPRESSION_LEVEL).ok()?;
            (out.len() < limit).then_some(out)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn raw_deflate_with_trailing_garbage_decompresses() {
        let data: Vec<u8> = (0..65536u32).map(|i| (i % 251) as u8).collect();
        let mut e = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(&data).unwrap();
        let mut c = e.finish().unwrap();
        c.extend_from_slice(&[0xaa; 300]);
        let mut out = vec![0u8; 65536];
        decompress(CompressionType::Zlib, &c, &mut out).unwrap();
        assert_eq!(out, data);
    }

    #[test]
    fn zstd_frame_decompresses() {
        let data = vec![7u8; 4096];
        let mut c = zstd::bulk::compress(&data, 3).unwrap();
        c.extend_from_slice(&[0; 100]);
        let mut out = vec![0u8; 4096];
        decompress(CompressionType::Zstd, &c, &mut out).unwrap();
        assert_eq!(out, data);
    }

    #[test]
    fn compress_round_trips_and_refuses_incompressible() {
        let data: Vec<u8> = (0..65536u32).map(|i| (i / 7 % 13) as u8).collect();
        for kind in [CompressionType::Zlib, CompressionType::Zstd] {
            let c = compress(kind, &data, 65535).unwrap();
            let mut out = vec![0u8; 65536];
            decompress(kind, &c, &mut out).unwrap();
            assert_eq!(out, data);
        }
        let noise = crate::scan::test_noise(0x1234_5678, 4096);
        assert!(compress(CompressionType::Zlib, &noise, 4095).is_none());
    }

    #[test]
    fn garbage_is_an_error() {
        let mut out = vec![0u8; 4096];
        assert!(decompress(CompressionType::Zlib, &[0xff; 64], &mut out).is_err());
        assert!(decompress(CompressionType::Zstd, &[0xff; 64], &mut out).is_err());
    }
}
