//! What every image fuzz target (fuzz/) and its regression tests do with an input: open it as a given format from memory, read
//! it, walk its block status, check it, then write to it — none of which may panic, hang or
//! allocate without bound.

use std::path::Path;
use std::sync::Arc;

use crate::crypto::{Secret, Secrets};
use crate::storage::MemStorage;
use crate::{Format, Image, OpenOptions, Repair};

/// The passphrase every input is opened with. The encrypted fixtures (`fixtures/disk.luks`,
/// `luks.qcow2`, `aes.qcow2`) take it, so that a fuzzer seeded with them gets past the key
/// slots to the encrypted data.
pub const PASSPHRASE: &str = "fuzz";

/// Most bytes read back per input, so that a header claiming a huge disk stays cheap.
const READ_BUDGET: u64 = 4 << 20;
/// Most block-status steps per input.
const STATUS_STEPS: usize = 4096;

/// Runs the whole exercise on `data` as an image of `format`.
pub fn exercise(format: Format, data: &[u8]) {
    let _ = exercise_counted(format, data);
}

/// What [`exercise`] managed: whether the read-only and the writable open succeeded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Opened {
    /// The read-only open (with [`PASSPHRASE`]) succeeded.
    pub read_only: bool,
    /// The writable open succeeded.
    pub writable: bool,
}

/// As [`exercise`], telling which opens succeeded (for tests that must know the exercise got
/// past a header).
pub fn exercise_counted(format: Format, data: &[u8]) -> Opened {
    let name = format!("fuzz.{}", format.name());
    let secrets = Secrets::all(Secret::from(PASSPHRASE));
    let opts = OpenOptions {
        format: Some(format),
        no_backing: true,
        ..OpenOptions::read_only()
    };
    // What `info` sees of an encrypted image opened without its secret.
    let meta = Arc::new(MemStorage::new(data.to_vec(), Path::new(&name), true));
    if let Ok(img) = Image::open_storage_with_secrets(meta, &opts, &Secrets::for_metadata()) {
        let d = img.driver();
        let _ = (d.specific(), d.encryption_info(), d.snapshots());
        let mut buf = [0u8; 512];
        let _ = img.read_at(&mut buf, 0);
    }
    let ro = Arc::new(MemStorage::new(data.to_vec(), Path::new(&name), true));
    let mut opened = Opened {
        read_only: false,
        writable: false,
    };
    if let Ok(img) = Image::open_storage_with_secrets(ro, &opts, &secrets) {
        opened.read_only = true;
        read_around(&img);
        let _ = img.driver().snapshots();
        let _ = img.check(Repair::None);
    }
    let rw = Arc::new(MemStorage::new(data.to_vec(), Path::new(&name), false));
    let opts = OpenOptions {
        format: Some(format),
        writable: true,
        no_backing: true,
        snapshot: None,
        force_share: false,
        repair: false,
        raw_window: None,
        data_file: None,
    };
    if let Ok(img) = Image::open_storage_with_secrets(rw, &opts, &secrets) {
        opened.writable = true;
        let size = img.size();
        for off in [0, size / 3, size.saturating_sub(5000)] {
            let _ = img.write_at(
                &[0x5a; 5000][..usize::try_from(size.min(5000)).unwrap_or(0)],
                off,
            );
        }
        let _ = img.write_zeroes(0, size.min(1 << 20), true);
        let _ = img.discard(size / 2, size.min(1 << 20) / 2);
        let _ = img.flush();
        edit_bitmaps(&img);
        read_around(&img);
        let _ = img.check(Repair::None);
    }
    opened
}

/// Every persistent-bitmap action on the image's own (fuzzed) bitmaps, and on a new one.
fn edit_bitmaps(img: &Image) {
    let d = img.driver();
    if !d.supports_bitmaps() {
        return;
    }
    let names: Vec<String> = d
        .bitmap_list()
        .into_iter()
        .take(4)
        .map(|b| b.name)
        .collect();
    let _ = d.bitmap_add("fuzz", None, true);
    for n in &names {
        if let Ok(bits) = d.bitmap_read(n) {
            let _ = d.bitmap_merge("fuzz", &bits);
        }
        let _ = d.bitmap_set_enabled(n, false);
        let _ = d.bitmap_clear(n);
        let _ = d.bitmap_remove(n);
    }
    let _ = d.bitmap_clear("fuzz");
    let _ = d.bitmap_remove("fuzz");
}

/// Runs the read-only part of the exercise on `data` as a seSparse extent file (ESXi
/// snapshots), which opens only through a descriptor that names it: both files are written to a
/// directory of this process's own under the system's temporary directory.
pub fn exercise_vmdk_sesparse(data: &[u8]) {
    let dir = std::env::temp_dir().join(format!("imgblock-fuzz-{}", std::process::id()));
    if std::fs::create_dir_all(&dir).is_ok() {
        sesparse_in(&dir, data);
    }
    // Nothing is left behind, whichever input is the last.
    let _ = std::fs::remove_dir_all(&dir);
}

fn sesparse_in(dir: &Path, data: &[u8]) {
    // The descriptor claims the size the header does (its capacity, in sectors), so that the
    // fuzzer reaches the grain tables rather than a size mismatch; bounded to 8 GiB.
    let capacity = data
        .get(16..24)
        .and_then(|b| b.try_into().ok())
        .map_or(1, u64::from_le_bytes)
        .clamp(1, 1 << 24);
    let descriptor = format!(
        "# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\n\
         createType=\"seSparse\"\n\n# Extent description\n\
         RW {capacity} SESPARSE \"fuzz-sesparse.vmdk\"\n\n# The Disk Data Base\n#DDB\n\n\
         ddb.virtualHWVersion = \"4\"\n"
    );
    let desc = dir.join("fuzz.vmdk");
    if std::fs::write(&desc, descriptor).is_err()
        || std::fs::write(dir.join("fuzz-sesparse.vmdk"), data).is_err()
    {
        return;
    }
    let opts = OpenOptions {
        format: Some(Format::Vmdk),
        no_backing: true,
        force_share: true,
        ..OpenOptions::read_only()
    };
    if let Ok(img) = Image::open(&desc, &opts) {
        read_around(&img);
        let _ = img.check(Repair::None);
    }
}

fn read_around(img: &Image) {
    let size = img.size();
    let mut buf = vec![0u8; 64 << 10];
    let mut done = 0;
    for start in [0, size / 2, size.saturating_sub(READ_BUDGET / 4)] {
        let mut off = start;
        while off < size && done < READ_BUDGET {
            let n = (size - off).min(buf.len() as u64);
            let _ = img.read_at(&mut buf[..usize::try_from(n).unwrap_or(0)], off);
            off += n;
            done += n;
        }
    }
    let mut off = 0;
    for _ in 0..STATUS_STEPS {
        if off >= size {
            break;
        }
        match img.block_status(off, size - off) {
            Ok(s) => off += s.len.max(1),
            Err(_) => break,
        }
    }
}
