//! Progress reports: `-p` (or `--progress`, qemu-img 10's spelling) draws a bar with bytes done,
//! rate and ETA on a terminal, and nothing when stdout is not one (qemu-img prints its
//! `(x.xx/100%)` lines into pipes and logs too; a script that wants progress asks for it as
//! data); `--progress=json` prints one JSON object per line on stderr,
//! `{"done":BYTES,"total":BYTES,"rate":BYTES_PER_SECOND}`, for tools that drive `img`: at most
//! four a second, and a last one when the work is done.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// The shortest time between two JSON lines.
const JSON_INTERVAL: Duration = Duration::from_millis(250);

/// Machine-readable progress formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ProgressFormat {
    /// The bar of `-p`: what `--progress` without a value asks for.
    #[value(hide = true)]
    Bar,
    /// One JSON object per line on stderr.
    Json,
}

/// The progress options every long-running subcommand takes.
#[derive(Debug, Clone, Default, Args)]
pub struct ProgressArgs {
    /// Show progress: bytes done, rate and ETA (on a terminal only).
    #[arg(short = 'p')]
    pub progress_bar: bool,
    /// `--progress` alone is -p; `--progress=json` prints machine-readable progress lines on
    /// stderr. The value needs the `=`, so that `--progress FILE` leaves FILE alone.
    #[arg(
        long = "progress",
        value_name = "FORMAT",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "bar"
    )]
    pub progress_format: Option<ProgressFormat>,
}

/// Progress over a number of bytes; a no-op unless asked for. Shared between threads.
#[derive(Debug)]
pub struct Progress {
    bar: Option<ProgressBar>,
    json: Option<Json>,
}

/// State of `--progress=json`.
#[derive(Debug)]
struct Json {
    start: Instant,
    done: AtomicU64,
    total: AtomicU64,
    /// When the last line was printed.
    last: Mutex<Option<Instant>>,
}

impl Json {
    fn emit(&self, force: bool) {
        let now = Instant::now();
        {
            let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
            if !force && last.is_some_and(|t| now.duration_since(t) < JSON_INTERVAL) {
                return;
            }
            *last = Some(now);
        }
        let done = self.done.load(Ordering::Relaxed);
        let total = self.total.load(Ordering::Relaxed);
        let ms = now.duration_since(self.start).as_millis().max(1);
        let rate = u64::try_from(u128::from(done) * 1000 / ms).unwrap_or(u64::MAX);
        crate::console::eprint(&format!(
            "{}\n",
            serde_json::json!({ "done": done, "total": total, "rate": rate })
        ));
    }
}

impl Progress {
    /// Progress over `total` bytes as `args` ask; `quiet` (-q) hides the bar but not the JSON
    /// lines, which were asked for by name.
    pub fn new(args: &ProgressArgs, quiet: bool, total: u64) -> Self {
        let wants_bar = args.progress_bar || args.progress_format == Some(ProgressFormat::Bar);
        let bar = (wants_bar && !quiet).then(|| {
            let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stdout());
            let style = ProgressStyle::with_template(
                "    {percent:>3}% [{wide_bar}] {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar());
            bar.set_style(style);
            bar
        });
        let json = (args.progress_format == Some(ProgressFormat::Json)).then(|| Json {
            start: Instant::now(),
            done: AtomicU64::new(0),
            total: AtomicU64::new(total),
            last: Mutex::new(None),
        });
        Progress { bar, json }
    }

    /// Advances by `n` bytes.
    pub fn inc(&self, n: u64) {
        if let Some(b) = &self.bar {
            b.inc(n);
        }
        if let Some(j) = &self.json {
            j.done.fetch_add(n, Ordering::Relaxed);
            j.emit(false);
        }
    }

    /// Moves to `done` of `total` bytes (the library's progress callback).
    pub fn set(&self, done: u64, total: u64) {
        if let Some(b) = &self.bar {
            b.set_length(total);
            b.set_position(done);
        }
        if let Some(j) = &self.json {
            j.total.store(total, Ordering::Relaxed);
            j.done.store(done, Ordering::Relaxed);
            j.emit(false);
        }
    }

    /// Removes the bar; prints the last JSON line (everything done).
    pub fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
        if let Some(j) = &self.json {
            let total = j.total.load(Ordering::Relaxed);
            j.done.fetch_max(total, Ordering::Relaxed);
            j.emit(true);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_none_is_silent_and_cheap() {
        let p = Progress::new(&ProgressArgs::default(), false, 100);
        p.inc(50);
        p.set(60, 100);
        p.finish();
        assert!(p.bar.is_none() && p.json.is_none());
    }

    #[test]
    fn progress_json_counts_bytes() {
        let args = ProgressArgs {
            progress_bar: false,
            progress_format: Some(ProgressFormat::Json),
        };
        let p = Progress::new(&args, true, 100);
        p.inc(30);
        p.inc(20);
        let j = p.json.as_ref().unwrap();
        assert_eq!(j.done.load(Ordering::Relaxed), 50);
        p.finish();
        assert_eq!(j.done.load(Ordering::Relaxed), 100);
    }
}
