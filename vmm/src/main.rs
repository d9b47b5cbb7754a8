//! `vmm`: a KVM virtual machine monitor that boots a Linux kernel (or the project's test guest)
//! and serves virtio-blk disks from any image the `imgblock` library opens.
//!
//! Exit codes: 0 when the guest powers off or reboots; 1 when set-up fails or the guest dies
//! (triple fault, KVM error); 2 for bad arguments (clap's convention).

use clap::Parser;

use vmm::legacy::VmExit;
use vmm::{cli, vm};

fn main() {
    let args = cli::Args::parse();
    let code = match vm::run(&args) {
        Ok(o) => match o.exit {
            VmExit::PowerOff | VmExit::Reset => 0,
            VmExit::Error(msg) => {
                eprintln!("vmm: guest stopped: {msg}");
                1
            }
        },
        Err(e) => {
            eprintln!("vmm: {:#}", anyhow::Error::from(e));
            1
        }
    };
    // vCPU threads may still sit in KVM_RUN; the disks were flushed and closed by `run`.
    std::process::exit(code);
}
