//! A full disk: writes that would grow the file past a limit fail with ENOSPC while writes
//! inside it still succeed, as on a full filesystem. Whatever the writer goes on doing after
//! the error, the image stays one `qemu-img check` calls consistent (leaks at most), and the
//! error reaches the caller.

mod fmt_common;

use std::io;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use imgblock::storage::{FileStorage, Storage};
use imgblock::{create, CreateOptions, Format, Image, OpenOptions};

#[derive(Debug)]
struct FullDisk {
    inner: FileStorage,
    limit: u64,
}

impl FullDisk {
    fn room(&self, offset: u64, len: u64) -> io::Result<()> {
        if offset.saturating_add(len) > self.limit
            && offset.saturating_add(len) > self.inner.size()?
        {
            return Err(io::Error::from_raw_os_error(28)); // ENOSPC
        }
        Ok(())
    }
}

impl Storage for FullDisk {
    fn path(&self) -> &Path {
        self.inner.path()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.room(offset, buf.len() as u64)?;
        self.inner.write_at(buf, offset)
    }
    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        self.room(offset, len)?;
        self.inner.write_zeroes(offset, len, unmap)
    }
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.inner.discard(offset, len)
    }
    fn flush(&self) -> io::Result<()> {
        self.inner.flush()
    }
    fn size(&self) -> io::Result<u64> {
        self.inner.size()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.room(len, 0)?;
        self.inner.set_len(len)
    }
    fn allocate(&self, offset: u64, len: u64) -> io::Result<()> {
        self.room(offset, len)?;
        self.inner.allocate(offset, len)
    }
    fn read_only(&self) -> bool {
        false
    }
}

fn check_code(p: &Path) -> (i32, String) {
    let o = fmt_common::output(Command::new("qemu-img").arg("check").arg(p));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    (o.status.code().unwrap_or(-1), text)
}

fn is_enospc(e: &imgblock::Error) -> bool {
    matches!(e, imgblock::Error::Io { source, .. } if source.raw_os_error() == Some(28))
}

/// Fills the image until the disk is full, then keeps writing elsewhere as a guest would.
fn fill_until_full(opts: &str, limit: u64, sequential: bool) {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("f.qcow2");
    let mut o = CreateOptions::new(64 << 20);
    o.parse_opts(opts).unwrap();
    create(&p, Format::Qcow2, &o).unwrap();
    let s = Arc::new(FullDisk {
        inner: FileStorage::open(&p, true).unwrap(),
        limit,
    });
    let img = Image::open_storage(s, &OpenOptions::writable()).unwrap();
    let chunk = vec![0x6b; 256 << 10];
    let mut saw_enospc = false;
    let mut x = 12345u64;
    for i in 0..256u64 {
        let off = if sequential {
            i * chunk.len() as u64
        } else {
            x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            (x >> 20) % (63 << 20)
        };
        match img.write_at(&chunk, off) {
            Ok(()) => {}
            Err(e) => {
                assert!(is_enospc(&e), "expected ENOSPC, got {e}");
                saw_enospc = true;
            }
        }
        let _ = img.write_zeroes(off / 2, 65536, true);
    }
    assert!(saw_enospc, "the disk never filled up");
    let _ = img.flush();
    drop(img);
    let (code, text) = check_code(&p);
    assert!(
        code == 0 || code == 3,
        "{opts}: full disk left a corrupt image:\n{text}"
    );
}

#[test]
fn enospc_mid_convert_leaves_a_consistent_image() {
    fill_until_full("", 6 << 20, true);
    fill_until_full("cluster_size=4k,refcount_bits=8", 6 << 20, true);
}

#[test]
fn enospc_mid_guest_writes_leaves_a_consistent_image() {
    fill_until_full("", 10 << 20, false);
    fill_until_full("cluster_size=512", 5 << 20, false);
}

/// A disk that fills up while an image grows with preallocation: the resize fails with
/// ENOSPC and the image keeps its old size with at most leaked clusters, as qemu leaves it.
#[test]
fn enospc_while_growing_with_preallocation_keeps_the_old_size() {
    use imgblock::raw::Preallocation;
    for (opts, mode) in [
        ("", Preallocation::Full),
        ("", Preallocation::Falloc),
        ("cluster_size=512", Preallocation::Metadata),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("g.qcow2");
        let mut o = CreateOptions::new(16 << 20);
        o.parse_opts(opts).unwrap();
        create(&p, Format::Qcow2, &o).unwrap();
        {
            let img = Image::open(&p, &OpenOptions::writable()).unwrap();
            img.write_at(&[0x11; 65536], 0).unwrap();
        }
        let limit = std::fs::metadata(&p).unwrap().len() + (1 << 20);
        let s = Arc::new(FullDisk {
            inner: FileStorage::open(&p, true).unwrap(),
            limit,
        });
        let mut img = Image::open_storage(s, &OpenOptions::writable()).unwrap();
        let e = img.resize(1 << 30, mode).unwrap_err();
        assert!(is_enospc(&e), "{mode:?}: expected ENOSPC, got {e}");
        drop(img);
        let (code, text) = check_code(&p);
        assert!(
            code == 0 || code == 3,
            "{opts} {mode:?}: a full disk mid-resize left a corrupt image:\n{text}"
        );
        let img = Image::open(&p, &OpenOptions::read_only()).unwrap();
        assert_eq!(img.size(), 16 << 20, "{opts} {mode:?}");
        let mut head = [0u8; 65536];
        img.read_at(&mut head, 0).unwrap();
        assert!(head.iter().all(|&b| b == 0x11));
    }
}
