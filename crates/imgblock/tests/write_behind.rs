//! `Image::set_write_behind` reaches the image's own files (not its backing chain), and data
//! written with it on reads back as written.

use std::sync::Arc;

use imgblock::storage::{FileStorage, WRITE_BEHIND_BYTES};
use imgblock::{create, CreateOptions, Format, Image, OpenOptions};

fn made(
    dir: &std::path::Path,
    name: &str,
    fmt: Format,
    backing: Option<&str>,
) -> std::path::PathBuf {
    let p = dir.join(name);
    let mut o = CreateOptions::new(64 << 20);
    if let Some(b) = backing {
        o.parse_opts(&format!("backing_file={b},backing_fmt=raw"))
            .unwrap();
    }
    create(&p, fmt, &o).unwrap();
    p
}

#[test]
fn write_behind_reaches_the_top_file_and_data_reads_back() {
    let dir = tempfile::tempdir().unwrap();
    for fmt in [Format::Raw, Format::Qcow2, Format::Vdi, Format::Vmdk] {
        let p = made(dir.path(), &format!("t.{fmt:?}"), fmt, None);
        let file = Arc::new(FileStorage::open(&p, true).unwrap());
        let img =
            Image::open_storage(file.clone(), &OpenOptions::writable().format(Some(fmt))).unwrap();
        let data: Vec<u8> = (0..3 * u32::try_from(WRITE_BEHIND_BYTES).unwrap())
            .map(|i| (i % 251) as u8)
            .collect();
        img.write_at(&data, 0).unwrap();
        assert_eq!(file.writebacks_started(), 0, "{fmt:?}: off unless asked");
        img.set_write_behind(true);
        // In the 1 MiB pieces a convert writes.
        for (i, piece) in data.chunks(1 << 20).enumerate() {
            img.write_at(piece, (16 << 20) + ((i as u64) << 20))
                .unwrap();
        }
        assert!(
            file.writebacks_started() >= 2,
            "{fmt:?}: {}",
            file.writebacks_started()
        );
        img.flush().unwrap();
        let mut got = vec![0u8; data.len()];
        img.read_at(&mut got, 16 << 20).unwrap();
        assert!(got == data, "{fmt:?}: data reads back");
    }
}

#[test]
fn write_behind_leaves_the_backing_file_alone() {
    let dir = tempfile::tempdir().unwrap();
    let base = made(dir.path(), "base.raw", Format::Raw, None);
    let top = made(dir.path(), "top.qcow2", Format::Qcow2, Some("base.raw"));
    let img = Image::open(&top, &OpenOptions::writable()).unwrap();
    img.set_write_behind(true);
    img.write_at(
        &vec![5u8; 2 * usize::try_from(WRITE_BEHIND_BYTES).unwrap()],
        0,
    )
    .unwrap();
    img.flush().unwrap();
    drop(img);
    // The base is untouched, and opening it writable afterwards works as usual.
    let b = Image::open(&base, &OpenOptions::writable()).unwrap();
    let mut got = vec![1u8; 4096];
    b.read_at(&mut got, 0).unwrap();
    assert!(got.iter().all(|&x| x == 0));
}
