//! `vmm`: a KVM virtual machine monitor that boots a Linux kernel (or the project's test guest)
//! and serves virtio-blk disks from any image the `imgblock` library opens.
//!
//! Exit codes: 0 when the guest powers off or reboots, or the VMM is stopped in order (SIGTERM,
//! SIGINT, SIGHUP, or `Ctrl-A x` on the console; its disks are flushed and closed first); 1 when
//! set-up fails or the guest dies (triple fault, KVM error); 2 for bad arguments (clap's
//! convention).

use clap::Parser;

use vmm::legacy::VmExit;
use vmm::{cli, vm};

fn main() {
    let args = cli::Args::parse();
    let code = match vm::run(&args) {
        Ok(o) => match o.exit {
            VmExit::PowerOff | VmExit::Reset => 0,
            // As qemu: an orderly stop asked for from outside is not a failure.
            VmExit::Signal(sig) => {
                vmm::report!("vmm: terminating on signal {sig}");
                0
            }
            VmExit::ConsoleQuit => {
                vmm::report!("vmm: terminated from the console");
                0
            }
            VmExit::ApiShutdown => {
                vmm::report!("vmm: shut down through the API socket");
                0
            }
            VmExit::Error(msg) => {
                vmm::report!("vmm: guest stopped: {msg}");
                1
            }
        },
        Err(e) => {
            vmm::report!("vmm: {:#}", anyhow::Error::from(e));
            1
        }
    };
    // vCPU threads may still sit in KVM_RUN; the disks were flushed and closed by `run`.
    std::process::exit(code);
}
