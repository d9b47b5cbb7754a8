//! Builds the test guest (test-guest/, a `#![no_std]` x86-64 program) with the same `rustc` for
//! the `x86_64-unknown-none` target, so that `cargo test -p vmm` has it on a fresh clone. It is
//! built twice from the same source: `VMM_TEST_GUEST` without a PVH note, so the VMM enters it
//! through the 64-bit entry, and `VMM_TEST_GUEST_PVH` with `--cfg pvh_note`, which adds the
//! `XEN_ELFNOTE_PHYS32_ENTRY` note, so the VMM enters it through its 32-bit PVH entry. The paths
//! reach the tests as `env!("VMM_TEST_GUEST")` and `env!("VMM_TEST_GUEST_PVH")`.
//!
//! The target is soft-float (no SSE): under the nested KVM of our CI machines the guest's SSE
//! instructions cannot be emulated. Install it with `rustup target add x86_64-unknown-none`.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let dir = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR"));
    let guest = dir.join("test-guest");
    println!("cargo:rerun-if-changed=test-guest/src");
    println!("cargo:rerun-if-changed=test-guest/guest.ld");
    let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    // Both at once (each is one single-threaded rustc), in separate directories since rustc
    // names its intermediate files after the crate; the plain one stays where
    // benches/guest-read.sh looks for it.
    let builds = [(out.clone(), false), (out.join("pvh"), true)].map(|(dir, pvh)| {
        let elf = dir.join("test-guest");
        let mut c = Command::new(&rustc);
        c.current_dir(&guest)
            .args([
                "--edition=2021",
                "--target=x86_64-unknown-none",
                "--crate-type=bin",
                "--crate-name=test_guest",
                "-Cpanic=abort",
                "-Copt-level=2",
                "-Crelocation-model=static",
                "-Cdebuginfo=0",
                "-Clink-arg=-Tguest.ld",
                "-Clink-arg=--build-id=none",
                "src/main.rs",
                "-o",
            ])
            .arg(&elf)
            // Cargo's flags for the host build must not leak into the guest's.
            .env_remove("RUSTFLAGS")
            .env_remove("CARGO_ENCODED_RUSTFLAGS");
        if pvh {
            c.args(["--cfg", "pvh_note"]);
        }
        let child = std::fs::create_dir_all(&dir).and_then(|()| c.spawn());
        (elf, child)
    });
    let mut paths = Vec::new();
    for (elf, child) in builds {
        match child.and_then(|mut c| c.wait()) {
            Ok(s) if s.success() => {}
            Ok(_) => panic!(
                "building the vmm test guest failed; is the target installed? \
                 Run: rustup target add x86_64-unknown-none"
            ),
            Err(e) => panic!("cannot run {}: {e}", rustc.to_string_lossy()),
        }
        paths.push(elf);
    }
    println!("cargo:rustc-env=VMM_TEST_GUEST={}", paths[0].display());
    println!("cargo:rustc-env=VMM_TEST_GUEST_PVH={}", paths[1].display());
}
