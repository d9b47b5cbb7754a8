//! OVA import: a tar with an OVF and streamOptimized disks, read in place.

#![allow(clippy::cast_possible_truncation)] // test sizes are small constants
mod fmt_common;

use std::path::Path;

use fmt_common::*;
use imgblock::{create, ova, CreateOptions, Format, Image, OpenOptions};

fn tar_header(name: &str, size: u64) -> [u8; 512] {
    let mut h = [0u8; 512];
    h[..name.len()].copy_from_slice(name.as_bytes());
    h[100..108].copy_from_slice(b"0000644\0");
    h[108..116].copy_from_slice(b"0000000\0");
    h[116..124].copy_from_slice(b"0000000\0");
    h[124..136].copy_from_slice(format!("{size:011o}\0").as_bytes());
    h[136..148].copy_from_slice(b"00000000000\0");
    h[148..156].fill(b' ');
    h[156] = b'0';
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
    h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    h
}

fn build_ova(path: &Path, files: &[(&str, Vec<u8>)]) {
    let mut t = Vec::new();
    for (name, data) in files {
        t.extend_from_slice(&tar_header(name, data.len() as u64));
        t.extend_from_slice(data);
        t.resize(t.len().div_ceil(512) * 512, 0);
    }
    t.extend_from_slice(&[0u8; 1024]);
    std::fs::write(path, &t).unwrap();
}

fn ovf(disks: &[(&str, u64)]) -> Vec<u8> {
    let mut refs = String::new();
    let mut ds = String::new();
    for (i, (href, cap)) in disks.iter().enumerate() {
        refs.push_str(&format!(
            "    <File ovf:href=\"{href}\" ovf:id=\"file{i}\"/>\n"
        ));
        ds.push_str(&format!(
            "    <Disk ovf:capacity=\"{}\" ovf:capacityAllocationUnits=\"byte * 2^20\" ovf:diskId=\"vmdisk{i}\" ovf:fileRef=\"file{i}\" ovf:format=\"http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized\"/>\n",
            cap >> 20
        ));
    }
    format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Envelope xmlns:ovf=\"http://schemas.dmtf.org/ovf/envelope/1\">\n  <References>\n{refs}  </References>\n  <DiskSection>\n    <Info>Virtual disk information</Info>\n{ds}  </DiskSection>\n</Envelope>\n"
    )
    .into_bytes()
}

fn stream_vmdk(dir: &Path, name: &str, content: &[u8]) -> Vec<u8> {
    let src = dir.join(format!("{name}.raw"));
    std::fs::write(&src, content).unwrap();
    let srcimg = Image::open(&src, &OpenOptions::read_only().format(Some(Format::Raw))).unwrap();
    let p = dir.join(name);
    lib_convert(&srcimg, &p, Format::Vmdk, "subformat=streamOptimized");
    let b = std::fs::read(&p).unwrap();
    std::fs::remove_file(&p).unwrap();
    std::fs::remove_file(&src).unwrap();
    b
}

#[test]
fn ova_disks_read_in_place_and_convert_to_qcow2() {
    let dir = tempfile::tempdir().unwrap();
    let mut c1 = vec![0u8; 4 << 20];
    c1[..100_000].copy_from_slice(&pattern(100_000, 7));
    c1[(3 << 20)..(3 << 20) + 4096].fill(0x99);
    let c2 = vec![0x42u8; 2 << 20];
    let v1 = stream_vmdk(dir.path(), "disk1.vmdk", &c1);
    let v2 = stream_vmdk(dir.path(), "disk2.vmdk", &c2);
    let ova_path = dir.path().join("app.ova");
    build_ova(
        &ova_path,
        &[
            (
                "app.ovf",
                ovf(&[("disk1.vmdk", 4 << 20), ("disk2.vmdk", 2 << 20)]),
            ),
            ("app.mf", b"SHA256(disk1.vmdk)= 00\n".to_vec()),
            ("disk1.vmdk", v1.clone()),
            ("disk2.vmdk", v2),
        ],
    );
    assert!(ova::is_ova(&ova_path));
    let listed = ova::disks(&ova_path).unwrap();
    assert_eq!(listed.len(), 2);
    let before: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    let img = ova::open(&ova_path, 0).unwrap();
    assert_eq!(img.format(), Format::Vmdk);
    // Read straight from the archive: the storage is the .ova itself, no file was unpacked.
    assert_eq!(img.driver().storage(0).path(), ova_path.as_path());
    assert!(read_image(&img) == c1);
    let after: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(before, after, "no temporary file may appear");
    assert!(read_image(&ova::open(&ova_path, 1).unwrap()) == c2);
    // OVA -> qcow2, checked by qemu against the vmdk it holds.
    let q = dir.path().join("out.qcow2");
    let mut o = CreateOptions::new(img.size());
    o.parse_opts("").unwrap();
    create(&q, Format::Qcow2, &o).unwrap();
    let out = Image::open(&q, &OpenOptions::writable()).unwrap();
    copy_data(&img, &out);
    out.flush().unwrap();
    drop(out);
    qemu_check(&q);
    let v = dir.path().join("extracted.vmdk");
    std::fs::write(&v, &v1).unwrap();
    qemu_compare(&v, &q);
    // Errors: a disk that does not exist, a capacity that disagrees.
    assert!(matches!(
        ova::open(&ova_path, 2).unwrap_err(),
        imgblock::Error::Ova {
            source: ova::Error::NoSuchDisk { index: 2, count: 2 },
            ..
        }
    ));
    let bad = dir.path().join("bad.ova");
    build_ova(
        &bad,
        &[
            ("bad.ovf", ovf(&[("disk1.vmdk", 8 << 20)])),
            ("disk1.vmdk", v1),
        ],
    );
    assert!(matches!(
        ova::open(&bad, 0).unwrap_err(),
        imgblock::Error::Ova {
            source: ova::Error::CapacityMismatch {
                ovf: 8388608,
                image: 4194304,
                ..
            },
            ..
        }
    ));
}

#[test]
fn ova_garbled_archives_give_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("x.ova");
    build_ova(&p, &[("readme.txt", b"hello".to_vec())]);
    assert!(matches!(
        ova::open(&p, 0).unwrap_err(),
        imgblock::Error::Ova {
            source: ova::Error::NoOvf,
            ..
        }
    ));
    let mut b = std::fs::read(&p).unwrap();
    b[0] ^= 0x20;
    std::fs::write(&p, &b).unwrap();
    assert!(matches!(
        ova::open(&p, 0).unwrap_err(),
        imgblock::Error::Ova {
            source: ova::Error::BadTarHeader(0),
            ..
        }
    ));
    // An entry claiming more bytes than the archive has.
    let mut t = tar_header("a.ovf", 1 << 20).to_vec();
    t.extend_from_slice(&[0u8; 512]);
    std::fs::write(&p, &t).unwrap();
    assert!(matches!(
        ova::open(&p, 0).unwrap_err(),
        imgblock::Error::Ova {
            source: ova::Error::TruncatedEntry { .. },
            ..
        }
    ));
}
