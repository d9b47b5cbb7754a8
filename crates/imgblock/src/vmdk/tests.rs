//! Unit tests of the vmdk driver: corruption of one field at a time, exact errors.
#![allow(clippy::cast_possible_truncation)] // offsets in small test images

use super::*;
use crate::{CreateOptions, Image, OpenOptions};

fn make(dir: &Path, name: &str, size: u64, opts: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    let mut o = CreateOptions::new(size);
    o.parse_opts(opts).unwrap();
    create(&p, &o).unwrap();
    p
}

fn vmdk_err(r: crate::Result<Image>) -> Error {
    match r {
        Err(crate::Error::Vmdk { source, .. }) => source,
        other => panic!("expected a vmdk error, got {other:?}"),
    }
}

fn patched(opts: &str, f: impl FnOnce(&mut Vec<u8>)) -> crate::Result<Image> {
    let dir = tempfile::tempdir().unwrap();
    let p = make(dir.path(), "t.vmdk", 4 << 20, opts);
    {
        let img = Image::open(&p, &OpenOptions::writable()).unwrap();
        img.write_at(&[5u8; 70000], 0).unwrap();
        img.flush().unwrap();
    }
    let mut b = std::fs::read(&p).unwrap();
    f(&mut b);
    std::fs::write(&p, &b).unwrap();
    Image::open(&p, &OpenOptions::read_only())
}

fn le64(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
}

#[test]
fn open_unpatched_reads_back() {
    let img = patched("", |_| {}).unwrap();
    let mut buf = vec![0u8; 70001];
    img.read_at(&mut buf, 0).unwrap();
    assert!(buf[..70000].iter().all(|&b| b == 5));
    assert_eq!(buf[70000], 0);
}

#[test]
fn open_version_4_is_refused() {
    let e = vmdk_err(patched("", |b| b[4] = 4));
    assert!(matches!(e, Error::UnsupportedVersion(4)));
}

#[test]
fn open_zero_grain_size_is_refused() {
    let e = vmdk_err(patched("", |b| b[20..28].fill(0)));
    assert!(matches!(e, Error::BadGrainSize(0)));
}

#[test]
fn open_huge_gtes_per_gt_is_refused() {
    let e = vmdk_err(patched("", |b| {
        b[44..48].copy_from_slice(&4096u32.to_le_bytes())
    }));
    assert!(matches!(e, Error::BadGtesPerGt(4096)));
}

#[test]
fn open_huge_capacity_is_refused_before_allocating() {
    let e = vmdk_err(patched("", |b| {
        b[12..20].copy_from_slice(&(1u64 << 50).to_le_bytes())
    }));
    assert!(matches!(e, Error::BadCapacity(_)));
}

#[test]
fn open_gd_past_end_is_out_of_file() {
    let e = vmdk_err(patched("", |b| {
        b[56..64].copy_from_slice(&1_000_000u64.to_le_bytes())
    }));
    assert!(matches!(
        e,
        Error::OutOfFile {
            what: "grain directory",
            ..
        }
    ));
}

#[test]
fn open_rgd_past_end_is_out_of_file() {
    let e = vmdk_err(patched("", |b| {
        b[48..56].copy_from_slice(&1_000_000u64.to_le_bytes())
    }));
    assert!(matches!(
        e,
        Error::OutOfFile {
            what: "redundant grain directory",
            ..
        }
    ));
}

#[test]
fn open_overhead_past_end_is_truncated() {
    let e = vmdk_err(patched("", |b| {
        b[64..72].copy_from_slice(&1_000_000u64.to_le_bytes())
    }));
    assert!(matches!(e, Error::FileTruncated(_)));
}

#[test]
fn open_bad_compression_is_refused() {
    let e = vmdk_err(patched("", |b| b[77] = 9));
    assert!(matches!(e, Error::BadCompression(9)));
}

#[test]
fn open_huge_embedded_descriptor_is_refused() {
    let e = vmdk_err(patched("", |b| {
        b[36..44].copy_from_slice(&100_000u64.to_le_bytes())
    }));
    assert!(matches!(e, Error::DescriptorTooLarge(_)));
}

#[test]
fn read_grain_table_entry_past_end_is_an_error_not_a_panic() {
    let img = patched("", |b| {
        let gd = le64(b, 56) as usize * 512;
        let gt = u32::from_le_bytes(b[gd..gd + 4].try_into().unwrap()) as usize * 512;
        b[gt..gt + 4].copy_from_slice(&0x00ff_ffffu32.to_le_bytes());
    })
    .unwrap();
    let mut buf = [0u8; 16];
    let e = img.read_at(&mut buf, 0).unwrap_err();
    assert!(matches!(
        e,
        crate::Error::Vmdk {
            source: Error::GrainOutOfFile { guest: 0, .. },
            ..
        }
    ));
    let r = img.check(crate::Repair::None).unwrap();
    assert_eq!(r.corruptions, 1);
}

#[test]
fn read_grain_directory_entry_past_end_is_an_error() {
    let img = patched("", |b| {
        let gd = le64(b, 56) as usize * 512;
        b[gd..gd + 4].copy_from_slice(&0x0fff_ffffu32.to_le_bytes());
    })
    .unwrap();
    let mut buf = [0u8; 16];
    assert!(matches!(
        img.read_at(&mut buf, 0).unwrap_err(),
        crate::Error::Vmdk {
            source: Error::GtOutOfFile { index: 0, .. },
            ..
        }
    ));
}

#[test]
fn stream_bad_footer_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let p = make(dir.path(), "s.vmdk", 1 << 20, "subformat=streamOptimized");
    {
        let img = Image::open(&p, &OpenOptions::writable()).unwrap();
        img.write_at(&[1u8; 4096], 0).unwrap();
        img.flush().unwrap();
    }
    let mut b = std::fs::read(&p).unwrap();
    let n = b.len();
    b[n - 1536 + 12] = 7; // footer marker type
                          // The header leaves the directory to the footer, as VMware's streams do.
    b[56..64].copy_from_slice(&u64::MAX.to_le_bytes());
    std::fs::write(&p, &b).unwrap();
    assert!(matches!(
        vmdk_err(Image::open(&p, &OpenOptions::read_only())),
        Error::BadFooter
    ));
}

#[test]
fn stream_compressed_grain_with_wrong_lba_is_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    let p = make(dir.path(), "s.vmdk", 1 << 20, "subformat=streamOptimized");
    {
        let img = Image::open(&p, &OpenOptions::writable()).unwrap();
        img.write_at(&[1u8; 4096], 0).unwrap();
        img.flush().unwrap();
    }
    let mut b = std::fs::read(&p).unwrap();
    // The first grain marker follows the 64 KiB overhead.
    b[65536] = 99;
    std::fs::write(&p, &b).unwrap();
    let img = Image::open(&p, &OpenOptions::read_only()).unwrap();
    let mut buf = [0u8; 16];
    assert!(matches!(
        img.read_at(&mut buf, 0).unwrap_err(),
        crate::Error::Vmdk {
            source: Error::BadCompressedGrain(128),
            ..
        }
    ));
}

#[test]
fn stream_writes_out_of_order_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let p = make(dir.path(), "s.vmdk", 64 << 20, "subformat=streamOptimized");
    let img = Image::open(&p, &OpenOptions::writable()).unwrap();
    img.write_at(&[1u8; 4096], 40 << 20).unwrap();
    img.write_at(&[2u8; 4096], 50 << 20).unwrap();
    // The grain table covering 0..32 MiB is closed now.
    assert!(matches!(
        img.write_at(&[3u8; 4096], 0).unwrap_err(),
        crate::Error::Vmdk {
            source: Error::StreamOutOfOrder(0),
            ..
        }
    ));
}

#[test]
fn descriptor_file_too_large_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("big.vmdk");
    let mut t = b"# Disk DescriptorFile\nversion=1\n".to_vec();
    t.resize(MAX_DESCRIPTOR_BYTES as usize + 10, b' ');
    std::fs::write(&p, &t).unwrap();
    let e = vmdk_err(Image::open(
        &p,
        &OpenOptions::read_only().format(Some(crate::Format::Vmdk)),
    ));
    assert!(matches!(e, Error::DescriptorTooLarge(_)));
}

/// A delta whose parent changed since it was made opens, as in qemu (info, map and check
/// work), but data read through to the parent is refused; data in the delta still reads.
#[test]
fn delta_with_wrong_parent_cid_refuses_reads_through_to_the_parent() {
    let dir = tempfile::tempdir().unwrap();
    make(dir.path(), "base.vmdk", 1 << 20, "");
    let mut o = CreateOptions::new(1 << 20);
    o.backing_file = Some("base.vmdk".into());
    let d = dir.path().join("d.vmdk");
    create(&d, &o).unwrap();
    assert!(Image::open(&d, &OpenOptions::read_only()).is_ok());
    let mut b = std::fs::read(&d).unwrap();
    // The CID is written as qemu writes it, in hex without padding: replace the whole value.
    let t = String::from_utf8_lossy(&b[512..1024]).into_owned();
    let i = t.find("parentCID=").unwrap() + 10;
    let end = i + t[i..].find('\n').unwrap();
    let mut text = t[..i].to_owned() + "12345678" + &t[end..];
    text.truncate(512);
    let text = format!("{text:\0<512}");
    b[512..1024].copy_from_slice(text.as_bytes());
    std::fs::write(&d, &b).unwrap();
    let img = Image::open(&d, &OpenOptions::writable()).unwrap();
    img.write_at(&[7; 65536], 0).unwrap();
    let mut own = [0u8; 65536];
    img.read_at(&mut own, 0).unwrap();
    assert_eq!(own, [7; 65536]);
    let mut parents = [0u8; 512];
    let e = img.read_at(&mut parents, 1 << 19).unwrap_err();
    assert!(matches!(
        vmdk_err(Err(e)),
        Error::ParentCidMismatch {
            expected: 0x1234_5678,
            ..
        }
    ));
    // A partial grain would need the parent's data around it: refused too.
    assert!(img.write_at(&[8; 512], 1 << 19).is_err());
}

#[test]
fn always_compressed_only_for_a_stream_being_written() {
    let dir = tempfile::tempdir().unwrap();
    let stream = make(dir.path(), "s.vmdk", 4 << 20, "subformat=streamOptimized");
    let sparse = make(dir.path(), "m.vmdk", 4 << 20, "");
    let w = Image::open(&stream, &OpenOptions::writable()).unwrap();
    assert!(w.driver().always_compressed());
    drop(w);
    let r = Image::open(&stream, &OpenOptions::read_only()).unwrap();
    assert!(!r.driver().always_compressed());
    let m = Image::open(&sparse, &OpenOptions::writable()).unwrap();
    assert!(!m.driver().always_compressed());
}
