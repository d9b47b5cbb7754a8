//! `-p`: a progress bar on the terminal, and nothing at all when output is not a terminal.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// A progress bar over a number of bytes; a no-op unless asked for and stdout is a terminal.
#[derive(Debug)]
pub struct Progress {
    bar: Option<ProgressBar>,
}

impl Progress {
    /// A bar for `total` bytes when `enabled` (and not `quiet`); drawn on stdout like qemu-img's,
    /// and only when stdout is a terminal (indicatif hides it otherwise).
    pub fn new(enabled: bool, quiet: bool, total: u64) -> Self {
        if !enabled || quiet {
            return Progress { bar: None };
        }
        let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stdout());
        let style =
            ProgressStyle::with_template("    {percent:>3}% [{wide_bar}] {bytes}/{total_bytes}")
                .unwrap_or_else(|_| ProgressStyle::default_bar());
        bar.set_style(style);
        Progress { bar: Some(bar) }
    }

    /// Advances by `n` bytes.
    pub fn inc(&self, n: u64) {
        if let Some(b) = &self.bar {
            b.inc(n);
        }
    }

    /// Moves to `done` of `total` bytes (the library's progress callback).
    pub fn set(&self, done: u64, total: u64) {
        if let Some(b) = &self.bar {
            b.set_length(total);
            b.set_position(done);
        }
    }

    /// Removes the bar.
    pub fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}
