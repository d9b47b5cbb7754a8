//! Inputs the fuzzers (fuzz/) found, kept as `fixtures/fuzz_<format>_*` files, and the bundled
//! fixtures themselves: each goes through the fuzzers' whole exercise without a panic.

use std::path::Path;

use imgblock::Format;

fn fixtures() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

#[test]
fn fuzz_findings_and_fixtures_never_panic() {
    let mut ran = 0;
    for entry in std::fs::read_dir(fixtures()).unwrap() {
        let p = entry.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        let Ok(data) = std::fs::read(&p) else {
            continue;
        };
        let formats: &[Format] = if name.starts_with("fuzz_qcow2") {
            &[Format::Qcow2]
        } else if name.starts_with("fuzz_vmdk") {
            &[Format::Vmdk]
        } else if name.starts_with("fuzz_vdi") {
            &[Format::Vdi]
        } else if [".qcow2", ".vmdk", ".vdi", ".luks"]
            .iter()
            .any(|e| name.ends_with(e))
        {
            // Every fixture as every format: each driver must refuse foreign data cleanly.
            &[
                Format::Qcow2,
                Format::Vmdk,
                Format::Vdi,
                Format::Luks,
                Format::Raw,
            ]
        } else {
            continue;
        };
        for &f in formats {
            imgblock::fuzzing::exercise(f, &data);
            ran += 1;
        }
    }
    assert!(ran >= 10, "only {ran} inputs exercised");
}

/// The encrypted fixtures open with the fuzzers' passphrase, read-only and writable, so that a
/// fuzzer seeded with them reaches their encrypted data; a wrong passphrase stops at the key
/// slots.
#[test]
fn encrypted_fixtures_unlock_with_the_fuzzing_passphrase() {
    for (name, format) in [
        ("disk.luks", Format::Luks),
        ("luks.qcow2", Format::Qcow2),
        ("aes.qcow2", Format::Qcow2),
    ] {
        let data = std::fs::read(fixtures().join(name)).unwrap();
        let opened = imgblock::fuzzing::exercise_counted(format, &data);
        assert!(opened.read_only && opened.writable, "{name}: {opened:?}");
    }
    let data = std::fs::read(fixtures().join("disk.luks")).unwrap();
    let mut other = data.clone();
    // The master-key digest (header bytes 112..132): no passphrase matches it any more.
    other[120] ^= 1;
    let opened = imgblock::fuzzing::exercise_counted(Format::Luks, &other);
    assert!(!opened.read_only && !opened.writable, "{opened:?}");
}
