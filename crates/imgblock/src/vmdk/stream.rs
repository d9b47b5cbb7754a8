//! Writing streamOptimized extents in VMware's layout, once and in guest order:
//!
//! ```text
//! header | descriptor | grain marker + zlib data ... | GT marker + GT |
//! grain markers ... | GT marker + GT | ... | GD marker + GD | footer marker + footer | EOS
//! ```
//! Each grain table is written as soon as the stream has moved past the guest range it covers;
//! a range without a grain gets an empty table, so that every directory entry has one. The
//! header says GD_AT_END while the stream is written; once it is finished, the footer and then
//! the header name the directory, as qemu's header does: qemu opens a stream for writing
//! through its header and allocates grains, never tables. Writes that arrive through the
//! ordinary allocate/commit path are staged in memory ([`Staging`]) a grain at a time and
//! compressed when the stream moves on, so that a convert writing partial grains still
//! produces whole compressed grains.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::storage::Storage;

use libdeflater::{CompressionLvl, Compressor};

/// The deflate level for grains. qemu uses zlib's default (6). libdeflate's level 6 makes
/// grains slightly smaller than zlib's level 6 (on binaries and text, 178.7 against 180.1 MiB
/// for 512 MiB of /usr) in a third of the time, and a grain is always compressed whole, which
/// is what libdeflate does best (it has no streaming interface).
const GRAIN_LEVEL: CompressionLvl = match CompressionLvl::new(6) {
    Ok(l) => l,
    Err(_) => panic!("libdeflate has level 6"),
};

thread_local! {
    /// A compressor holds about half a megabyte of match-finder tables: one per thread, made on
    /// first use, rather than one per grain.
    static GRAIN_COMPRESSOR: RefCell<Compressor> = RefCell::new(Compressor::new(GRAIN_LEVEL));
}

/// Compresses a grain as a zlib stream (what VMware and qemu write). Data the probe finds
/// incompressible goes straight into stored blocks, which is what deflate would end up
/// choosing for it after a full search.
pub fn deflate(data: &[u8]) -> Vec<u8> {
    if crate::scan::incompressible(data) {
        return stored(data);
    }
    GRAIN_COMPRESSOR.with_borrow_mut(|c| {
        // The bound is libdeflate's worst case for this length, so compressing into it cannot
        // run out of room; were it ever to, the grain is stored instead.
        let mut out = vec![0u8; c.zlib_compress_bound(data.len())];
        match c.zlib_compress(data, &mut out) {
            Ok(n) => {
                out.truncate(n);
                out
            }
            Err(_) => stored(data),
        }
    })
}

/// A zlib stream of stored blocks: `data` as it is, framed.
fn stored(data: &[u8]) -> Vec<u8> {
    let mut c = flate2::Compress::new(flate2::Compression::none(), true);
    let mut out = Vec::with_capacity(data.len() + data.len() / 8192 * 5 + 64);
    loop {
        let consumed = usize::try_from(c.total_in()).unwrap_or(usize::MAX);
        if out.capacity() - out.len() < 64 {
            out.reserve(out.capacity().max(4096));
        }
        match c.compress_vec(
            data.get(consumed..).unwrap_or(&[]),
            &mut out,
            flate2::FlushCompress::Finish,
        ) {
            Ok(flate2::Status::StreamEnd) | Err(_) => return out,
            Ok(_) => {}
        }
    }
}

/// Inflates a zlib stream into `out`; returns the bytes produced, or `None` when the data is bad
/// or would not fit.
pub fn inflate(input: &[u8], out: &mut [u8]) -> Option<usize> {
    crate::inflate::inflate(crate::inflate::Framing::Zlib, input, out)
}

/// State of a stream being written.
#[derive(Debug)]
pub(crate) struct StreamWriter {
    /// Grain tables not written yet, by directory index.
    pub open: BTreeMap<u64, Vec<u32>>,
    /// Directory indices below this have been written (or never will be).
    pub closed_below: u64,
    /// Where the next sector goes.
    pub end: u64,
    /// Guest range (extent-relative start, length) staged in memory.
    pub pending: Option<(u64, u64)>,
    /// The stream has its GD, footer and EOS; `finished_at` is where they (and the tables
    /// written with them) begin, so that a later write can take them back.
    pub finished_at: Option<u64>,
    /// Tables written by the finish, reopened if the stream continues.
    pub finish_tables: Vec<u64>,
}

impl StreamWriter {
    pub fn new(end: u64) -> Self {
        StreamWriter {
            open: BTreeMap::new(),
            closed_below: 0,
            end,
            pending: None,
            finished_at: None,
            finish_tables: Vec::new(),
        }
    }
}

type StagedGuard<'a> = std::sync::MutexGuard<'a, (u64, Vec<u8>)>;

/// An in-memory storage holding the grains of the stream not yet compressed.
#[derive(Debug)]
pub(crate) struct Staging {
    path: PathBuf,
    /// Guest (extent) offset of the first byte, and the bytes.
    buf: Mutex<(u64, Vec<u8>)>,
}

impl Staging {
    pub fn new(path: &Path) -> Self {
        Staging {
            path: path.to_owned(),
            buf: Mutex::new((0, Vec::new())),
        }
    }
    fn lock(&self) -> std::sync::MutexGuard<'_, (u64, Vec<u8>)> {
        self.buf.lock().unwrap_or_else(|e| e.into_inner())
    }
    /// Starts staging `len` zero bytes at `base`.
    pub fn reset(&self, base: u64, len: usize) {
        let mut b = self.lock();
        b.0 = base;
        b.1.clear();
        b.1.resize(len, 0);
    }
    /// Takes the staged bytes.
    pub fn take(&self) -> (u64, Vec<u8>) {
        let mut b = self.lock();
        let base = b.0;
        (base, std::mem::take(&mut b.1))
    }
    fn range(&self, off: u64, len: usize) -> io::Result<(usize, StagedGuard<'_>)> {
        let b = self.lock();
        let start = off
            .checked_sub(b.0)
            .and_then(|s| usize::try_from(s).ok())
            .filter(|s| s.checked_add(len).is_some_and(|e| e <= b.1.len()))
            .ok_or_else(|| {
                io::Error::new(io::ErrorKind::InvalidInput, "outside the staged grains")
            })?;
        Ok((start, b))
    }
}

impl Storage for Staging {
    fn path(&self) -> &Path {
        &self.path
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let (s, b) = self.range(offset, buf.len())?;
        buf.copy_from_slice(&b.1[s..s + buf.len()]);
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let (s, mut b) = self.range(offset, buf.len())?;
        b.1[s..s + buf.len()].copy_from_slice(buf);
        Ok(())
    }
    fn write_zeroes(&self, offset: u64, len: u64, _unmap: bool) -> io::Result<()> {
        let l = usize::try_from(len).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let (s, mut b) = self.range(offset, l)?;
        b.1[s..s + l].fill(0);
        Ok(())
    }
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.write_zeroes(offset, len, true)
    }
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
    fn size(&self) -> io::Result<u64> {
        let b = self.lock();
        Ok(b.0 + b.1.len() as u64)
    }
    fn set_len(&self, _len: u64) -> io::Result<()> {
        Err(io::Error::from(io::ErrorKind::Unsupported))
    }
    fn allocate(&self, _offset: u64, _len: u64) -> io::Result<()> {
        Ok(())
    }
    fn read_only(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deflate_inflate_round_trip() {
        let data: Vec<u8> = (0..65536u32).map(|i| (i % 7) as u8).collect();
        let c = deflate(&data);
        assert!(c.len() < data.len());
        assert_eq!(&c[..1], &[0x78]); // zlib header
        let mut out = vec![0u8; 65536];
        assert_eq!(inflate(&c, &mut out), Some(65536));
        assert_eq!(out, data);
    }

    #[test]
    fn noise_is_stored_and_round_trips() {
        let data = crate::scan::test_noise(0x2545_f491, 65536);
        for d in [&data[..], &data[..1000]] {
            let c = deflate(d);
            // Stored blocks: five bytes of framing per 64 KiB block, the zlib header and sum.
            assert!(c.len() <= d.len() + 16, "{} for {}", c.len(), d.len());
            let mut out = vec![0u8; d.len()];
            assert_eq!(inflate(&c, &mut out), Some(d.len()));
            assert_eq!(out, d);
        }
        // Text shrinks, and a grain of it compresses the same on every call (one compressor is
        // reused by each thread).
        let text: Vec<u8> = b"grain tables and directories, "
            .iter()
            .copied()
            .cycle()
            .take(65536)
            .collect();
        let (a, b) = (deflate(&text), deflate(&text));
        assert!(a.len() < 1024, "{}", a.len());
        assert_eq!(a, b);
        let mut out = vec![0u8; 65536];
        assert_eq!(inflate(&a, &mut out), Some(65536));
        assert_eq!(out, text);
    }

    #[test]
    fn inflate_garbage_is_none() {
        let mut out = vec![0u8; 512];
        assert_eq!(inflate(&[1, 2, 3, 4], &mut out), None);
    }

    #[test]
    fn staging_refuses_outside_writes() {
        let s = Staging::new(Path::new("x"));
        s.reset(4096, 4096);
        assert!(s.write_at(&[1; 10], 4096).is_ok());
        assert!(s.write_at(&[1; 10], 0).is_err());
        assert!(s.write_at(&[1; 10], 8190).is_err());
        let mut b = [0u8; 10];
        s.read_at(&mut b, 4096).unwrap();
        assert_eq!(b, [1; 10]);
    }
}
