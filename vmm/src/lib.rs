//! The `vmm` crate: a KVM virtual machine monitor built on the rust-vmm crates. The binary
//! (`src/main.rs`) is a thin front end; the modules are a library so that the fuzzers in `fuzz/`
//! can drive the virtio-blk request parser directly.

/// `eprintln!` that ignores a failed write: standard error may be a terminal that hung up (the
/// VMM is then stopping on SIGHUP), and a message must not turn an orderly stop into a panic.
#[macro_export]
macro_rules! report {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

pub mod acpi;
pub mod api;
pub mod boot;
pub mod bus;
pub mod cli;
pub mod console;
pub mod disk;
pub mod layout;
pub mod legacy;
pub mod seccomp;
pub mod virtio;
pub mod vm;
