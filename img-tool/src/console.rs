//! The one way img writes to stdout and stderr.
//!
//! Rust's `print!` panics when stdout cannot be written (`img info x > /dev/full`, a reader
//! that went away). qemu-img ignores SIGPIPE and every write error, so it carries on and exits
//! as if all had been printed. Here:
//!
//! - a reader that went away (`img map x | head -1`: broken pipe) is no error, as in qemu-img:
//!   the rest of the output is dropped, the command still does its work and exits with its own
//!   status (0 when it succeeded), which matters under `set -o pipefail`;
//! - any other write error (a full disk) is reported once, as `img: error writing to stdout:
//!   REASON`, and a command that otherwise succeeded exits 1 instead of 0. qemu-img exits 0
//!   there; img does not, because a script that redirects `info --output=json` to a file must
//!   not take a truncated file for a complete one.
//!
//! Nothing written to stderr can fail a command: its errors are ignored.

use std::io::{self, Write};
use std::sync::Mutex;

use crate::failure::strerror;

/// What happened to stdout so far.
#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    /// Everything printed so far was written.
    Open,
    /// The reader went away: further output is dropped.
    ReaderGone,
    /// A write failed for another reason (the message): further output is dropped.
    Failed(String),
}

static STDOUT: Mutex<State> = Mutex::new(State::Open);

fn state() -> std::sync::MutexGuard<'static, State> {
    STDOUT
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Writes `text` to stdout and flushes it, unless stdout already failed; a failure is
/// remembered for [`finish`].
pub fn print(text: &str) {
    let mut st = state();
    if *st != State::Open {
        return;
    }
    let mut out = io::stdout().lock();
    if let Err(e) = out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        *st = if e.kind() == io::ErrorKind::BrokenPipe {
            State::ReaderGone
        } else {
            State::Failed(strerror(&e))
        };
    }
}

/// Whether stdout can no longer be written: a command whose only product is its output (map)
/// may stop early.
pub fn stdout_closed() -> bool {
    *state() != State::Open
}

/// Writes `text` to stderr; errors are ignored (there is nowhere left to report them).
pub fn eprint(text: &str) {
    let mut err = io::stderr().lock();
    let _ = err.write_all(text.as_bytes()).and_then(|()| err.flush());
}

/// The exit status once the command returned `status`: a failed stdout is reported on stderr
/// and turns success into 1; a reader that went away changes nothing.
pub fn finish(status: i32) -> i32 {
    match &*state() {
        State::Failed(why) => {
            eprint(&format!("img: error writing to stdout: {why}\n"));
            if status == 0 {
                1
            } else {
                status
            }
        }
        State::Open | State::ReaderGone => status,
    }
}

/// Collects many small pieces of output (map's lines) and prints them in large writes.
#[derive(Debug, Default)]
pub struct Buffered {
    buf: String,
}

impl Buffered {
    /// Flush once this much is collected.
    const CHUNK: usize = 64 * 1024;

    /// Adds `text`, printing what was collected once there is enough of it.
    pub fn push(&mut self, text: &str) {
        self.buf.push_str(text);
        if self.buf.len() >= Self::CHUNK {
            self.flush();
        }
    }

    /// Prints what was collected.
    pub fn flush(&mut self) {
        if !self.buf.is_empty() {
            print(&self.buf);
            self.buf.clear();
        }
    }
}

impl Drop for Buffered {
    fn drop(&mut self) {
        self.flush();
    }
}
