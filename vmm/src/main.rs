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
    imgblock::storage::raise_open_file_limit();
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
            vmm::report!("vmm: {}", chain_message(&anyhow::Error::from(e)));
            1
        }
    };
    // vCPU threads may still sit in KVM_RUN; the disks were flushed and closed by `run`.
    std::process::exit(code);
}

/// An error and its causes on one line, each cause added only when the message so far does not
/// already say it (most of our errors name their cause in their own text).
fn chain_message(e: &anyhow::Error) -> String {
    let mut msg = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if msg.contains(&text) {
            continue;
        }
        if !msg.is_empty() {
            msg.push_str(": ");
        }
        msg.push_str(&text);
    }
    msg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer {0}")]
    struct Says(#[source] std::io::Error);

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Hides(#[source] std::io::Error);

    fn io() -> std::io::Error {
        std::io::Error::from_raw_os_error(21)
    }

    #[test]
    fn causes_already_in_the_message_are_not_repeated() {
        let said = chain_message(&anyhow::Error::from(Says(io())));
        assert_eq!(said, format!("outer {}", io()));
        let hidden = chain_message(&anyhow::Error::from(Hides(io())));
        assert_eq!(hidden, format!("outer: {}", io()));
    }
}
