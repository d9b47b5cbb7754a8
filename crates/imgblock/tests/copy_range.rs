//! `Image::copy_range_to`: the kernel copies between images where both sides are plain data in
//! files, and declines (so that the caller copies through a buffer) where either is not.

use imgblock::{create, CreateOptions, Format, Image, OpenOptions};

fn image(dir: &std::path::Path, name: &str, fmt: Format, opts: &str) -> Image {
    let p = dir.join(name);
    let mut o = CreateOptions::new(4 << 20);
    o.parse_opts(opts).unwrap();
    create(&p, fmt, &o).unwrap();
    Image::open(&p, &OpenOptions::writable().format(Some(fmt))).unwrap()
}

#[test]
fn raw_and_preallocated_targets_take_the_kernel_copy_others_decline() {
    let dir = tempfile::tempdir().unwrap();
    let src = image(dir.path(), "s.raw", Format::Raw, "");
    let data: Vec<u8> = (0..(1u32 << 20)).map(|i| (i * 31 % 251) as u8).collect();
    src.write_at(&data, 1 << 20).unwrap();

    let raw = image(dir.path(), "t.raw", Format::Raw, "");
    assert!(src.copy_range_to(1 << 20, &raw, 0, 1 << 20).unwrap());
    let mut got = vec![0u8; 1 << 20];
    raw.read_at(&mut got, 0).unwrap();
    assert_eq!(got, data);

    // Clusters qcow2 has not allocated need metadata: declined, nothing written.
    let q = image(dir.path(), "t.qcow2", Format::Qcow2, "");
    assert!(!src.copy_range_to(1 << 20, &q, 0, 1 << 20).unwrap());
    assert!(!q.block_status(0, 1 << 20).unwrap().present);
    // Preallocated clusters are plain data in the file.
    let qp = image(dir.path(), "p.qcow2", Format::Qcow2, "preallocation=falloc");
    assert!(src.copy_range_to(1 << 20, &qp, 2 << 20, 1 << 20).unwrap());
    qp.read_at(&mut got, 2 << 20).unwrap();
    assert_eq!(got, data);

    // Out of range and read-only targets are errors, not silent declines.
    assert!(src.copy_range_to(0, &raw, 4 << 20, 1).is_err());
    drop(raw);
    let ro = Image::open(&dir.path().join("t.raw"), &OpenOptions::read_only()).unwrap();
    assert!(src.copy_range_to(0, &ro, 0, 4096).is_err());
}
