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
            let mut d = flate2::Decompress::new(false);
            match d.decompress(input, out, flate2::FlushDecompress::Finish) {
                Ok(_) if d.total_out() == out.len() as u64 => Ok(()),
                _ => Err(bad()),
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
    fn garbage_is_an_error() {
        let mut out = vec![0u8; 4096];
        assert!(decompress(CompressionType::Zlib, &[0xff; 64], &mut out).is_err());
        assert!(decompress(CompressionType::Zstd, &[0xff; 64], &mut out).is_err());
    }
}
