#![no_main]
//! Reads fuzzed OVA archives: the tar walk, the OVF descriptor and the disk inside.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(dir) = tempfile::tempdir() else { return };
    let p = dir.path().join("fuzz.ova");
    if std::fs::write(&p, data).is_err() {
        return;
    }
    let _ = imgblock::ova::disks(&p);
    if let Ok(img) = imgblock::ova::open(&p, 0) {
        let mut buf = vec![0u8; 64 << 10];
        let n = img.size().min(buf.len() as u64);
        let _ = img.read_at(&mut buf[..usize::try_from(n).unwrap_or(0)], 0);
    }
});
