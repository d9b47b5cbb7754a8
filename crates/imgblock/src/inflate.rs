//! Whole-buffer inflate, for qcow2's zlib clusters (raw deflate) and vmdk's grains (zlib
//! streams). libdeflate decodes a whole buffer about twice as fast as zlib does; zlib (flate2)
//! takes over wherever libdeflate gives up, so that exactly the streams zlib accepts decode,
//! into the same bytes. zlib is the more lenient of the two where it matters: qemu reads a
//! cluster whose stream fills the cluster without ending, which libdeflate refuses.

use std::cell::RefCell;

use libdeflater::Decompressor;

thread_local! {
    /// libdeflate's decompressor holds its tables (about 10 KiB): one per thread, made on first
    /// use, rather than one per cluster.
    static DECOMPRESSOR: RefCell<Decompressor> = RefCell::new(Decompressor::new());
}

/// How the deflate data is framed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Framing {
    /// Bare deflate blocks (qcow2).
    Raw,
    /// A zlib header, the blocks, and an Adler-32 that must match (vmdk).
    Zlib,
}

/// Inflates `input` into `out`. Returns the bytes produced when the stream ends within `out`,
/// or when it fills `out` exactly (ended or not); `None` when the data is bad or would not
/// fit. Bytes after the end of the stream are ignored.
pub(crate) fn inflate(framing: Framing, input: &[u8], out: &mut [u8]) -> Option<usize> {
    let fast = DECOMPRESSOR.with_borrow_mut(|d| match framing {
        Framing::Raw => d.deflate_decompress(input, out),
        Framing::Zlib => d.zlib_decompress(input, out),
    });
    if let Ok(n) = fast {
        return Some(n.min(out.len()));
    }
    let mut d = flate2::Decompress::new(framing == Framing::Zlib);
    match d.decompress(input, out, flate2::FlushDecompress::Finish) {
        Ok(flate2::Status::StreamEnd) => usize::try_from(d.total_out()).ok(),
        // The output is full: fine only if it was exactly the stream's length.
        Ok(_) => {
            let n = usize::try_from(d.total_out()).ok()?;
            (n == out.len()).then_some(n)
        }
        Err(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn text(len: usize) -> Vec<u8> {
        b"grain directories and refcount blocks, "
            .iter()
            .copied()
            .cycle()
            .take(len)
            .collect()
    }

    fn raw_deflate(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::new(6));
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    fn zlib(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::new(6));
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    #[test]
    fn whole_streams_decode_with_trailing_bytes_ignored() {
        let data = text(65536);
        for (framing, mut c) in [
            (Framing::Raw, raw_deflate(&data)),
            (Framing::Zlib, zlib(&data)),
        ] {
            // A qcow2 cluster's compressed bytes run on to the end of their last sector.
            c.extend_from_slice(&[0xa5; 300]);
            let mut out = vec![0u8; 65536];
            assert_eq!(inflate(framing, &c, &mut out), Some(65536), "{framing:?}");
            assert_eq!(out, data);
            // A stream shorter than the buffer (a disk's last grain) gives its length.
            let short = match framing {
                Framing::Raw => raw_deflate(&data[..1000]),
                Framing::Zlib => zlib(&data[..1000]),
            };
            let mut out = vec![0u8; 65536];
            assert_eq!(inflate(framing, &short, &mut out), Some(1000));
            assert_eq!(out[..1000], data[..1000]);
        }
    }

    #[test]
    fn a_stream_that_fills_the_buffer_unended_decodes_as_zlib_would() {
        // 64 KiB + 1 compressed, read into 64 KiB: libdeflate gives up (no room), zlib fills the
        // buffer and stops, which qemu takes for the cluster.
        let data = text(65537);
        let c = raw_deflate(&data);
        let mut out = vec![0u8; 65536];
        assert_eq!(inflate(Framing::Raw, &c, &mut out), Some(65536));
        assert_eq!(out[..], data[..65536]);
    }

    #[test]
    fn bad_data_and_bad_checksums_are_none() {
        let data = text(4096);
        let mut out = vec![0u8; 4096];
        assert_eq!(inflate(Framing::Zlib, &[1, 2, 3, 4], &mut out), None);
        assert_eq!(inflate(Framing::Raw, &[0xff; 64], &mut out), None);
        let mut c = zlib(&data);
        let last = c.len() - 1;
        c[last] ^= 1; // the Adler-32
        assert_eq!(inflate(Framing::Zlib, &c, &mut out), None);
        // Cut short: neither ended nor filling the buffer.
        let c = raw_deflate(&crate::scan::test_noise(7, 4096));
        assert_eq!(inflate(Framing::Raw, &c[..c.len() / 2], &mut out), None);
    }
}
