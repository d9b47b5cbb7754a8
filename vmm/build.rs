//! Builds the test guest (test-guest/, a `#![no_std]` x86-64 program) with the same `rustc` for
//! the `x86_64-unknown-none` target, so that `cargo test -p vmm` has it on a fresh clone. The
//! path reaches the tests as `env!("VMM_TEST_GUEST")`.
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
    let elf = out.join("test-guest");
    let status = Command::new(&rustc)
        .current_dir(&guest)
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
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .status();
    match status {
        Ok(s) if s.success() => {}
        Ok(_) => panic!(
            "building the vmm test guest failed; is the target installed? \
             Run: rustup target add x86_64-unknown-none"
        ),
        Err(e) => panic!("cannot run {}: {e}", rustc.to_string_lossy()),
    }
    println!("cargo:rustc-env=VMM_TEST_GUEST={}", elf.display());
}
