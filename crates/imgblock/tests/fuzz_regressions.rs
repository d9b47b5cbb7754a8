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
        } else if name.ends_with(".qcow2") || name.ends_with(".vmdk") || name.ends_with(".vdi") {
            // Every fixture as every format: each driver must refuse foreign data cleanly.
            &[Format::Qcow2, Format::Vmdk, Format::Vdi, Format::Raw]
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
