//! The `vmm` crate: a KVM virtual machine monitor built on the rust-vmm crates. The binary
//! (`src/main.rs`) is a thin front end; the modules are a library so that the fuzzers in `fuzz/`
//! can drive the virtio-blk request parser directly.

pub mod acpi;
pub mod boot;
pub mod bus;
pub mod cli;
pub mod console;
pub mod disk;
pub mod layout;
pub mod legacy;
pub mod virtio;
pub mod vm;
