//! Crash consistency: a storage layer that stops accepting writes after the n-th one stands for
//! a crash at that point. Whatever n, `qemu-img check` may find leaked clusters but never a
//! corruption — through writes, compressed writes, zero writes, discards, resize and the
//! snapshot operations.

mod fmt_common;

use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use imgblock::storage::{FileStorage, Storage};
use imgblock::{create, CreateOptions, Format, Image, OpenOptions};

/// Passes everything to a file until `budget` writes have gone through, then fails every write
/// with EIO, as if the machine had stopped there.
#[derive(Debug)]
struct CrashingStorage {
    inner: FileStorage,
    budget: AtomicU64,
}

impl CrashingStorage {
    fn spend(&self) -> io::Result<()> {
        let left = self.budget.load(Ordering::SeqCst);
        if left == 0 {
            return Err(io::Error::from_raw_os_error(libc_eio()));
        }
        self.budget.store(left - 1, Ordering::SeqCst);
        Ok(())
    }
}

fn libc_eio() -> i32 {
    5
}

impl Storage for CrashingStorage {
    fn path(&self) -> &Path {
        self.inner.path()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.spend()?;
        self.inner.write_at(buf, offset)
    }
    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        self.spend()?;
        self.inner.write_zeroes(offset, len, unmap)
    }
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.spend()?;
        self.inner.discard(offset, len)
    }
    fn flush(&self) -> io::Result<()> {
        self.inner.flush()
    }
    fn size(&self) -> io::Result<u64> {
        self.inner.size()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.spend()?;
        self.inner.set_len(len)
    }
    fn allocate(&self, offset: u64, len: u64) -> io::Result<()> {
        self.spend()?;
        self.inner.allocate(offset, len)
    }
    fn read_only(&self) -> bool {
        false
    }
}

/// Writes, partial and whole clusters, snapshots, a compressed cluster, zero writes, discards,
/// a resize.
fn workload(img: &mut Image) -> imgblock::Result<()> {
    let cs = img.driver().cluster_size().unwrap_or(512);
    for i in 0..40u8 {
        let n = u64::from(i);
        img.write_at(&[i + 1; 700], n * 3 * cs + 100)?;
    }
    img.flush()?;
    img.snapshot_create("s1")?;
    for i in 0..20u8 {
        img.write_at(&[0xc0 | i; 1500], u64::from(i) * 5 * cs)?;
    }
    let data = vec![b'x'; usize::try_from(cs).unwrap_or(512)];
    let c = img.compress_cluster(&data);
    img.write_cluster(150 * cs, &data, c.as_deref())?;
    img.write_zeroes(0, 10 * cs, true)?;
    img.discard(30 * cs, 20 * cs)?;
    img.snapshot_create("s2")?;
    img.write_at(&[0x42; 3000], 7 * cs)?;
    img.snapshot_apply("s1")?;
    img.snapshot_delete("s2")?;
    img.snapshot_delete("s1")?;
    img.resize(img.size() * 2, imgblock::raw::Preallocation::Off)?;
    img.write_at(&[0xee; 4096], img.size() - 4096)?;
    img.flush()
}

fn check_status(p: &Path) -> (i32, String) {
    let o = fmt_common::output(Command::new("qemu-img").arg("check").arg(p));
    (
        o.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
    )
}

/// A new image; with `snapshot`, it holds data shared with an internal snapshot, so that the
/// workload's writes copy clusters and L2 tables away from it.
fn fresh(dir: &Path, opts: &str, snapshot: bool) -> PathBuf {
    let p = dir.join("c.qcow2");
    let mut o = CreateOptions::new(1 << 20);
    o.parse_opts(opts).unwrap();
    create(&p, Format::Qcow2, &o).unwrap();
    if snapshot {
        let img = Image::open(&p, &OpenOptions::writable()).unwrap();
        img.write_at(&vec![0x77; 300_000], 0).unwrap();
        img.snapshot_create("before").unwrap();
    }
    p
}

fn crash_everywhere(opts: &str, snapshot: bool, samples: u64) {
    let dir = tempfile::tempdir().unwrap();
    // How many writes does the whole workload take?
    let total = {
        let p = fresh(dir.path(), opts, snapshot);
        let s = Arc::new(CrashingStorage {
            inner: FileStorage::open(&p, true).unwrap(),
            budget: AtomicU64::new(u64::MAX),
        });
        let mut img = Image::open_storage(s.clone(), &OpenOptions::writable()).unwrap();
        workload(&mut img).unwrap();
        u64::MAX - s.budget.load(Ordering::SeqCst)
    };
    assert!(total > 50, "workload made only {total} writes");
    let step = (total / samples).max(1);
    let mut n = 0;
    let mut points = 0;
    while n <= total {
        points += 1;
        let p = fresh(dir.path(), opts, snapshot);
        let s = Arc::new(CrashingStorage {
            inner: FileStorage::open(&p, true).unwrap(),
            budget: AtomicU64::new(n),
        });
        if let Ok(mut img) = Image::open_storage(s, &OpenOptions::writable()) {
            let _ = workload(&mut img);
        }
        let (code, out) = check_status(&p);
        assert!(
            code == 0 || code == 3,
            "{opts}: crash after write {n} of {total} left a corrupt image:\n{out}"
        );
        n += step;
    }
    eprintln!("{opts} (snapshot before: {snapshot}): {points} crash points over {total} writes, no corruption");
}

#[test]
fn crash_at_any_write_leaves_at_most_leaks() {
    // Every single write of the workload.
    crash_everywhere("cluster_size=4k", false, u64::MAX);
}

#[test]
fn crash_while_copying_away_from_a_snapshot_leaves_at_most_leaks() {
    crash_everywhere("cluster_size=4k", true, 150);
}

#[test]
fn crash_with_small_clusters_and_narrow_refcounts_leaves_at_most_leaks() {
    // 512-byte clusters and 2-bit refcounts: refcount blocks and table growth happen often.
    crash_everywhere("cluster_size=512,refcount_bits=2", false, 150);
}

#[test]
fn a_run_of_new_clusters_takes_a_handful_of_writes() {
    // 64 new 64 KiB clusters: one data write, and the L2 entries and refcounts of the run each
    // in one write, not one write per cluster.
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("w.qcow2");
    create(&p, Format::Qcow2, &CreateOptions::new(64 << 20)).unwrap();
    let s = Arc::new(CrashingStorage {
        inner: FileStorage::open(&p, true).unwrap(),
        budget: AtomicU64::new(u64::MAX),
    });
    let img = Image::open_storage(s.clone(), &OpenOptions::writable()).unwrap();
    let before = s.budget.load(Ordering::SeqCst);
    img.write_at(&vec![0x5a; 4 << 20], 1 << 20).unwrap();
    let writes = before - s.budget.load(Ordering::SeqCst);
    assert!(writes <= 8, "a 4 MiB allocating write took {writes} writes");
    drop(img);
    assert_eq!(check_status(&p).0, 0);
}

/// Growing with preallocation, stopped at any write: the image keeps its old size or has the
/// new one whole (reading as zeroes), with at most leaked clusters, as qemu leaves it. The new
/// size is written last, after the clusters exist in the file and are linked.
#[test]
fn crash_while_growing_with_preallocation_leaves_the_old_size_or_the_new_one() {
    use imgblock::raw::Preallocation;
    const OLD: u64 = 1 << 20;
    const NEW: u64 = 6 << 20;
    let dir = tempfile::tempdir().unwrap();
    let grow = |budget: u64, mode: Preallocation| -> u64 {
        let p = fresh(dir.path(), "cluster_size=4k", false);
        {
            let img = Image::open(&p, &OpenOptions::writable()).unwrap();
            img.write_at(&[0x11; 8192], OLD - 8192).unwrap();
        }
        let s = Arc::new(CrashingStorage {
            inner: FileStorage::open(&p, true).unwrap(),
            budget: AtomicU64::new(budget),
        });
        if let Ok(mut img) = Image::open_storage(s.clone(), &OpenOptions::writable()) {
            let _ = img.resize(NEW, mode);
        }
        u64::MAX.saturating_sub(s.budget.load(Ordering::SeqCst))
    };
    for mode in [
        Preallocation::Metadata,
        Preallocation::Falloc,
        Preallocation::Full,
    ] {
        let total = grow(u64::MAX, mode);
        assert!(total > 5, "{mode:?}: growing took only {total} writes");
        let step = (total / 40).max(1);
        let mut n = 0;
        while n <= total {
            grow(n, mode);
            let p = dir.path().join("c.qcow2");
            let (code, out) = check_status(&p);
            assert!(
                code == 0 || code == 3,
                "{mode:?}: crash after write {n} of {total} left a corrupt image:\n{out}"
            );
            let img = Image::open(&p, &OpenOptions::read_only()).unwrap();
            let size = img.size();
            assert!(size == OLD || size == NEW, "{mode:?} at {n}: size {size}");
            let mut buf = vec![0u8; usize::try_from(size).unwrap()];
            img.read_at(&mut buf, 0).unwrap();
            let at = usize::try_from(OLD).unwrap();
            assert!(
                buf[at - 8192..at].iter().all(|&b| b == 0x11),
                "{mode:?} at {n}"
            );
            assert!(buf[at..].iter().all(|&b| b == 0), "{mode:?} at {n}");
            n += step;
        }
        eprintln!("{mode:?}: {total} writes, old or new size at every crash point");
    }
}
