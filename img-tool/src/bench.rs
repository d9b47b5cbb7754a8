//! `img bench`: qemu-img's I/O benchmark. It sends COUNT reads or writes of BUFFER_SIZE bytes,
//! DEPTH at a time, starting at OFFSET and moving on by STEP_SIZE (wrapping at the image's end
//! the way qemu does), and prints how long they took.
//!
//! qemu keeps DEPTH asynchronous requests in flight on one thread. Here a small pool of worker
//! threads (at most [`MAX_WORKERS`], never more than DEPTH) each take the next request number
//! from a shared counter and do it with its own buffer, so memory stays at workers × buffer
//! size whatever the depth. Flushes follow qemu's rules: with `--flush-interval` the requests
//! drain at the same points qemu drains them (unless `--no-drain`), `-t writethrough` and
//! `-t directsync` flush after every write, `-t unsafe` never flushes during the run.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Barrier, Mutex, OnceLock};
use std::time::{Duration, Instant};

use clap::Args;
use imgblock::{Format, Image};

use crate::console;
use crate::failure::{strerror, CliResult, Failure};
use crate::open::{open_image, OpenRequest};
use crate::secrets::SecretArgs;
use crate::units::{cvtnum_full, INT64_MAX};

/// qemu's `INT_MAX`, the bound of most of bench's numbers.
const INT_MAX: u64 = 0x7fff_ffff;
/// Worker threads at most: enough to keep a page-cache or NVMe device busy from one process
/// while memory stays at `MAX_WORKERS` buffers.
const MAX_WORKERS: u64 = 8;
/// Buffers are aligned for `O_DIRECT` (`-t none`), as qemu's `blk_blockalign` aligns them.
const BUF_ALIGN: usize = imgblock::storage::DIRECT_ALIGN;

const DEFAULT_COUNT: u64 = 75_000;
const DEFAULT_DEPTH: u64 = 64;
const DEFAULT_BUFFER_SIZE: u64 = 4096;

/// `img bench [-c COUNT] [-d DEPTH] [-f FMT] [--flush-interval=N] [-i AIO] [-n] [--no-drain]
/// [-o OFFSET] [--pattern=PATTERN] [-q] [-s BUFFER_SIZE] [-S STEP_SIZE] [-t CACHE] [-w] [-U]
/// FILENAME`
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Number of requests to send (default 75000).
    #[arg(
        short = 'c',
        long = "count",
        value_name = "COUNT",
        allow_hyphen_values = true
    )]
    count: Option<String>,
    /// Number of requests in flight at a time (default 64). img runs them on a pool of at most
    /// 8 worker threads.
    #[arg(
        short = 'd',
        long = "depth",
        value_name = "DEPTH",
        allow_hyphen_values = true
    )]
    depth: Option<String>,
    /// Format of the image (probed when not given).
    #[arg(short = 'f', long = "format", value_name = "FMT")]
    format: Option<String>,
    /// Cache mode (default writeback): none and directsync bypass the page cache (O_DIRECT);
    /// writethrough and directsync flush after every write; unsafe never flushes during the run.
    #[arg(short = 't', long = "cache", value_name = "CACHE")]
    cache: Option<String>,
    /// Start the first request at this offset (default 0).
    // `--o` abbreviates --offset in qemu-img, which has no bench --object; the alias keeps it
    // from being ambiguous with img's --object.
    #[arg(
        short = 'o',
        long = "offset",
        alias = "o",
        value_name = "OFFSET",
        allow_hyphen_values = true
    )]
    offset: Option<String>,
    /// Size of each request (default 4096; size suffixes as qemu's).
    #[arg(
        short = 's',
        long = "buffer-size",
        value_name = "BUFFER_SIZE",
        allow_hyphen_values = true
    )]
    buffer_size: Option<String>,
    /// Offset increment from one request to the next (default the buffer size); offsets wrap to
    /// the start of the image, as qemu's do.
    #[arg(
        short = 'S',
        long = "step-size",
        value_name = "STEP_SIZE",
        allow_hyphen_values = true
    )]
    step_size: Option<String>,
    /// Asynchronous I/O backend (threads, native or io_uring): checked as qemu-img checks it
    /// (native needs -t none or directsync), then ignored; img always uses worker threads.
    #[arg(short = 'i', long = "aio", value_name = "AIO")]
    aio: Option<String>,
    /// Use native AIO: the same as -i native (checked, then ignored).
    #[arg(short = 'n', long = "native")]
    native: bool,
    /// Write test (default is a read test); the image is opened for writing.
    #[arg(short = 'w', long = "write")]
    write: bool,
    /// The byte to write (default 0).
    #[arg(long = "pattern", value_name = "PATTERN", allow_hyphen_values = true)]
    pattern: Option<String>,
    /// Flush after this many requests (write tests only; at least DEPTH).
    #[arg(
        long = "flush-interval",
        value_name = "FLUSH_INTERVAL",
        allow_hyphen_values = true
    )]
    flush_interval: Option<String>,
    /// Do not wait for the requests in flight before a --flush-interval flush.
    #[arg(long = "no-drain")]
    no_drain: bool,
    /// Accepted for compatibility: like qemu-img bench, img still prints its two lines.
    #[arg(short = 'q', long = "quiet")]
    quiet: bool,
    /// Open the image even if another process uses it (read tests only).
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// `--object secret,...` and `--image-opts` (qemu-img bench has only the latter).
    #[command(flatten)]
    pub(crate) secret_args: SecretArgs,
    /// The image.
    #[arg(num_args = 0.., value_name = "FILENAME")]
    files: Vec<String>,
}

/// What `-t` asks of the image and its flushes (qemu's `bdrv_parse_cache_mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct CacheMode {
    /// Bypass the host page cache (`cache.direct=on`).
    direct: bool,
    /// Flush after every write (the guest sees no write cache).
    write_through: bool,
    /// Ignore flushes (`cache.no-flush=on`).
    no_flush: bool,
}

impl CacheMode {
    /// qemu's default for bench, `writeback`.
    const WRITEBACK: CacheMode = CacheMode {
        direct: false,
        write_through: false,
        no_flush: false,
    };

    /// Parses a `-t` mode.
    ///
    /// # Errors
    /// `Invalid cache mode`, qemu's words, for anything else.
    fn parse(mode: &str) -> CliResult<Self> {
        let (direct, write_through, no_flush) = match mode {
            "none" | "off" => (true, false, false),
            "directsync" => (true, true, false),
            "writeback" => (false, false, false),
            "writethrough" => (false, true, false),
            "unsafe" => (false, false, true),
            _ => return Err(Failure::new("Invalid cache mode")),
        };
        Ok(CacheMode {
            direct,
            write_through,
            no_flush,
        })
    }
}

/// The validated benchmark.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Plan {
    /// Requests to send (at least 1).
    count: u64,
    /// Requests in flight at a time (at least 1).
    depth: u64,
    /// Offset of the first request.
    offset: u64,
    /// Bytes per request (at least 1, at most `INT_MAX`).
    buf_size: u64,
    /// Offset increment; `-S 0` means the buffer size, as in qemu.
    step: u64,
    write: bool,
    pattern: u8,
    /// Flush after this many requests; 0 for never.
    flush_interval: u64,
    /// Wait for the requests in flight before each interval flush.
    drain: bool,
    cache: CacheMode,
}

impl Plan {
    /// The offset of request `i`: qemu adds the step and reduces modulo the image size after
    /// each request, so only the first one can start at or past the end.
    fn request_offset(&self, i: u64, size: u64) -> u64 {
        if i == 0 {
            return self.offset;
        }
        if size == 0 {
            return 0;
        }
        let o =
            (u128::from(self.offset) + u128::from(i) * u128::from(self.step)) % u128::from(size);
        // Below `size`, so it fits.
        u64::try_from(o).unwrap_or(0)
    }

    /// With draining interval flushes: the request number at which the segment starting at
    /// `start` ends, stops and flushes. qemu checks on each completion whether the requests not
    /// yet sent are a multiple of the interval, and the first completion comes after DEPTH
    /// requests were sent; so the stops are the numbers from DEPTH on that are congruent to
    /// COUNT modulo the interval, and COUNT itself. Without draining: COUNT.
    fn segment_end(&self, start: u64) -> u64 {
        let fi = self.flush_interval;
        if fi == 0 || !self.drain {
            return self.count;
        }
        let lo = (start + 1).max(self.depth.min(self.count));
        if lo >= self.count {
            return self.count;
        }
        self.count - (self.count - lo) / fi * fi
    }

    /// The first line qemu prints.
    fn header(&self) -> String {
        format!(
            "Sending {} {} requests, {} bytes each, {} in parallel (starting at offset {}, step size {})",
            self.count,
            if self.write { "write" } else { "read" },
            self.buf_size,
            self.depth,
            self.offset,
            self.step
        )
    }
}

/// The option's number, or its default when not given.
fn number_or(
    arg: Option<&str>,
    default: u64,
    name: &str,
    size: bool,
    min: u64,
    max: u64,
) -> CliResult<u64> {
    arg.map_or(Ok(default), |v| cvtnum_full(name, v, size, min, max))
}

/// Checks `-i` as qemu does; returns whether it asks for native AIO.
///
/// # Errors
/// `Invalid aio option: X`.
fn parse_aio(aio: &str) -> CliResult<bool> {
    match aio {
        "native" => Ok(true),
        "threads" | "io_uring" => Ok(false),
        _ => Err(Failure::new(format!("Invalid aio option: {aio}"))),
    }
}

/// Validates the options in qemu's words, and returns the plan, the image name and whether
/// native AIO was asked for.
fn plan(args: &BenchArgs) -> CliResult<(Plan, String, bool)> {
    let count = number_or(
        args.count.as_deref(),
        DEFAULT_COUNT,
        "request count",
        false,
        1,
        INT_MAX,
    )?;
    let depth = number_or(
        args.depth.as_deref(),
        DEFAULT_DEPTH,
        "queue depth",
        false,
        1,
        INT_MAX,
    )?;
    let offset = number_or(args.offset.as_deref(), 0, "offset", true, 0, INT64_MAX)?;
    let buf_size = number_or(
        args.buffer_size.as_deref(),
        DEFAULT_BUFFER_SIZE,
        "buffer size",
        true,
        1,
        INT_MAX,
    )?;
    let step = number_or(args.step_size.as_deref(), 0, "step size", true, 0, INT_MAX)?;
    let pattern = number_or(args.pattern.as_deref(), 0, "pattern byte", false, 0, 0xff)?;
    let flush_interval = number_or(
        args.flush_interval.as_deref(),
        0,
        "flush interval",
        false,
        0,
        INT_MAX,
    )?;
    let cache = args
        .cache
        .as_deref()
        .map_or(Ok(CacheMode::WRITEBACK), CacheMode::parse)?;
    let mut native = args.native;
    if let Some(aio) = &args.aio {
        native = parse_aio(aio)?;
    }
    let [file] = args.files.as_slice() else {
        return Err(Failure::new(
            "Expecting one image file name\nTry 'img bench --help' for more info",
        ));
    };
    if !args.write && flush_interval != 0 {
        return Err(Failure::new(
            "--flush-interval is only available in write tests",
        ));
    }
    if flush_interval != 0 && flush_interval < depth {
        return Err(Failure::new("Flush interval can't be smaller than depth"));
    }
    let plan = Plan {
        count,
        depth,
        offset,
        buf_size,
        step: if step == 0 { buf_size } else { step },
        write: args.write,
        pattern: u8::try_from(pattern).unwrap_or(0),
        flush_interval,
        drain: !args.no_drain,
        cache,
    };
    Ok((plan, file.clone(), native))
}

/// Opens the image as qemu-img bench would, with its messages for the combinations it refuses.
fn open(args: &BenchArgs, name: &str, plan: &Plan, native: bool) -> CliResult<Image> {
    let cannot = |why: &str| Failure::new(format!("Could not open '{name}': {why}"));
    if args.secret_args.image_opts && args.format.is_some() {
        return Err(Failure::new(
            "--image-opts and --format are mutually exclusive",
        ));
    }
    let format = args
        .format
        .as_deref()
        .map(|f| {
            f.parse::<Format>()
                .map_err(|_| cannot(&format!("Unknown driver '{f}'")))
        })
        .transpose()?;
    let spec = args.secret_args.resolve(name, format)?;
    if args.force_share && plan.write {
        return Err(cannot(
            "force-share=on can only be used with read-only images",
        ));
    }
    if native && !plan.cache.direct {
        return Err(cannot(
            "aio=native was specified, but it requires cache.direct=on, which was not specified.",
        ));
    }
    let req = OpenRequest {
        format: spec.format,
        writable: plan.write,
        secrets: Some(&spec.secrets),
        force_share: args.force_share,
        direct: plan.cache.direct,
        ..OpenRequest::default()
    };
    open_image(&spec.path, &req)
}

/// A failed request or flush in qemu's words: `Failed request: Input/output error`.
fn request_failure(what: &str, e: &imgblock::Error) -> Failure {
    let reason = match e {
        // qemu's block layer refuses a request past the end with EIO.
        imgblock::Error::OutOfBounds { .. } => "Input/output error".to_owned(),
        imgblock::Error::Io { source, .. } => strerror(source),
        other => other.to_string(),
    };
    Failure::new(format!("{what}: {reason}"))
}

/// One worker's buffer, aligned for `O_DIRECT` and filled with the pattern.
struct AlignedBuf {
    raw: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    fn new(len: usize, fill: u8) -> CliResult<Self> {
        let total = len.checked_add(BUF_ALIGN);
        let mut raw = Vec::new();
        total
            .and_then(|t| raw.try_reserve_exact(t).ok().map(|()| t))
            .map(|t| raw.resize(t, fill))
            .ok_or_else(|| {
                Failure::new(format!(
                    "Failed to allocate {len} bytes for a request buffer: Cannot allocate memory"
                ))
            })?;
        let start = raw.as_ptr().align_offset(BUF_ALIGN).min(BUF_ALIGN);
        Ok(AlignedBuf { raw, start, len })
    }

    fn slice(&mut self) -> &mut [u8] {
        &mut self.raw[self.start..self.start + self.len]
    }
}

/// What the workers share.
struct Shared<'a> {
    img: &'a Image,
    plan: &'a Plan,
    size: u64,
    /// The next request number to take; may run past the end of a segment.
    next: AtomicU64,
    /// Set by the first failure; every worker then stops.
    failed: AtomicBool,
    failure: Mutex<Option<Failure>>,
    /// Set by the leader of a draining flush after a failure: all workers leave.
    stop: AtomicBool,
    /// All workers meet here at the start and at each draining flush.
    barrier: Barrier,
    /// When the first request started.
    start: OnceLock<Instant>,
    /// Workers still running; the last one to finish notes the time.
    running: AtomicUsize,
    end: Mutex<Option<Instant>>,
}

impl Shared<'_> {
    fn fail(&self, f: Failure) {
        if let Ok(mut slot) = self.failure.lock() {
            slot.get_or_insert(f);
        }
        self.failed.store(true, Ordering::SeqCst);
    }

    fn failed(&self) -> bool {
        self.failed.load(Ordering::SeqCst)
    }

    /// A flush, unless `-t unsafe` ignores flushes.
    fn flush(&self, what: &str) {
        if self.plan.cache.no_flush {
            return;
        }
        if let Err(e) = self.img.flush() {
            self.fail(request_failure(what, &e));
        }
    }

    /// Request `i`; then the flushes `-t writethrough` and `--no-drain` call for.
    fn request(&self, i: u64, buf: &mut [u8]) {
        let plan = self.plan;
        let offset = plan.request_offset(i, self.size);
        let r = if plan.write {
            self.img.write_at(buf, offset)
        } else {
            self.img.read_at(buf, offset)
        };
        if let Err(e) = r {
            self.fail(request_failure("Failed request", &e));
            return;
        }
        if plan.write && plan.cache.write_through {
            self.flush("Failed request");
        }
        if plan.flush_interval != 0 && !plan.drain {
            // qemu flushes (without waiting) when a request completes and the requests not yet
            // sent are a multiple of the interval; those issued once all were sent finish after
            // the run, here as the final flush.
            let unsent = plan.count.saturating_sub(self.next.load(Ordering::SeqCst));
            if unsent != 0 && unsent % plan.flush_interval == 0 {
                self.flush("Failed flush request");
            }
        }
    }

    fn worker(&self, buf: &mut AlignedBuf) {
        let buf = buf.slice();
        let count = self.plan.count;
        self.barrier.wait();
        self.start.get_or_init(Instant::now);
        let mut seg_start = 0;
        loop {
            let seg_end = self.plan.segment_end(seg_start);
            while !self.failed() {
                let i = self.next.fetch_add(1, Ordering::SeqCst);
                if i >= seg_end {
                    break;
                }
                self.request(i, buf);
            }
            if seg_end >= count {
                break;
            }
            // A draining flush: everyone stops, one flushes, all go on. Every worker walks the
            // same segments, and only the leader sets `stop`, between the two waits, so all
            // leave together (`failed` itself may change as soon as a fast worker goes on).
            if self.barrier.wait().is_leader() {
                self.next.store(seg_end, Ordering::SeqCst);
                if !self.failed() {
                    self.flush("Failed request");
                }
                if self.failed() {
                    self.stop.store(true, Ordering::SeqCst);
                }
            }
            self.barrier.wait();
            if self.stop.load(Ordering::SeqCst) {
                break;
            }
            seg_start = seg_end;
        }
        if self.running.fetch_sub(1, Ordering::SeqCst) == 1 {
            if let Ok(mut end) = self.end.lock() {
                *end = Some(Instant::now());
            }
        }
    }
}

/// Sends the requests; returns how long they took (the final flush excluded, as in qemu).
///
/// # Errors
/// The first request or flush that failed.
fn execute(img: &Image, plan: &Plan) -> CliResult<Duration> {
    let size = img.size();
    if plan.buf_size > size {
        // Every request would pass the end: fail as the first one does, without the buffers.
        return Err(Failure::new("Failed request: Input/output error"));
    }
    let buf_len = usize::try_from(plan.buf_size)
        .map_err(|_| Failure::new("Failed request: Cannot allocate memory"))?;
    let workers = plan.depth.min(plan.count).min(MAX_WORKERS);
    let workers = usize::try_from(workers).unwrap_or(1);
    let mut bufs = (0..workers)
        .map(|_| AlignedBuf::new(buf_len, plan.pattern))
        .collect::<CliResult<Vec<_>>>()?;
    let shared = Shared {
        img,
        plan,
        size,
        next: AtomicU64::new(0),
        failed: AtomicBool::new(false),
        failure: Mutex::new(None),
        stop: AtomicBool::new(false),
        barrier: Barrier::new(workers),
        start: OnceLock::new(),
        running: AtomicUsize::new(workers),
        end: Mutex::new(None),
    };
    std::thread::scope(|s| {
        for buf in &mut bufs {
            let shared = &shared;
            s.spawn(move || shared.worker(buf));
        }
    });
    if let Some(f) = shared.failure.into_inner().ok().flatten() {
        return Err(f);
    }
    let end = shared.end.into_inner().ok().flatten();
    Ok(match (shared.start.get(), end) {
        (Some(&start), Some(end)) => end.saturating_duration_since(start),
        _ => Duration::ZERO,
    })
}

/// Runs `img bench`.
///
/// # Errors
/// Bad options (qemu's messages), an image that cannot be opened, a failed request or flush.
pub fn run(args: &BenchArgs) -> CliResult<i32> {
    let (plan, name, native) = plan(args)?;
    let img = open(args, &name, &plan, native)?;
    console::print(&format!("{}\n", plan.header()));
    if plan.flush_interval != 0 {
        console::print(&format!(
            "Sending flush every {} requests\n",
            plan.flush_interval
        ));
    }
    let result = execute(&img, &plan);
    if let Ok(elapsed) = &result {
        console::print(&format!(
            "Run completed in {:.3} seconds.\n",
            elapsed.as_secs_f64()
        ));
    }
    // Closing flushes, as qemu's does: the data of a write test and a format's metadata reach
    // the file even after a failed request. A failed request is the error to report.
    let closed = img.flush();
    result?;
    closed.map_err(|e| request_failure("Failed to flush the image", &e))?;
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        args: BenchArgs,
    }

    fn parse(argv: &[&str]) -> CliResult<(Plan, String, bool)> {
        let mut v = vec!["bench"];
        v.extend_from_slice(argv);
        plan(&Cli::try_parse_from(v).unwrap().args)
    }

    fn message(argv: &[&str]) -> String {
        parse(argv).unwrap_err().message
    }

    #[test]
    fn plan_defaults_match_qemu() {
        let (p, file, native) = parse(&["x.raw"]).unwrap();
        assert_eq!(file, "x.raw");
        assert!(!native);
        assert_eq!(
            p,
            Plan {
                count: 75_000,
                depth: 64,
                offset: 0,
                buf_size: 4096,
                step: 4096,
                write: false,
                pattern: 0,
                flush_interval: 0,
                drain: true,
                cache: CacheMode::WRITEBACK,
            }
        );
        assert_eq!(
            p.header(),
            "Sending 75000 read requests, 4096 bytes each, 64 in parallel (starting at offset 0, step size 4096)"
        );
    }

    #[test]
    fn plan_numbers_take_qemu_syntax() {
        let (p, _, _) = parse(&[
            "-c",
            "0x10",
            "-d",
            "010",
            "-s",
            "1.5k",
            "-S",
            "0x800",
            "-o",
            "1M",
            "-w",
            "--pattern=0377",
            "x",
        ])
        .unwrap();
        assert_eq!((p.count, p.depth, p.buf_size, p.step), (16, 8, 1536, 2048));
        assert_eq!((p.offset, p.pattern), (1 << 20, 0xff));
    }

    #[test]
    fn plan_bad_numbers_have_qemu_messages() {
        assert_eq!(
            message(&["-c", "0", "x"]),
            "Invalid request count specified. Must be between 1 and 2147483647."
        );
        assert_eq!(
            message(&["-c", "1k", "x"]),
            "Invalid request count specified: '1k'."
        );
        assert_eq!(
            message(&["-c", "-1", "x"]),
            "Invalid request count specified. Must be between 1 and 2147483647."
        );
        assert_eq!(
            message(&["-d", "0", "x"]),
            "Invalid queue depth specified. Must be between 1 and 2147483647."
        );
        assert_eq!(
            message(&["-s", "0", "x"]),
            "Invalid buffer size specified. Must be between 1 and 2147483647."
        );
        assert_eq!(
            message(&["-s", "2G", "x"]),
            "Invalid buffer size specified. Must be between 1 and 2147483647."
        );
        assert_eq!(
            message(&["-S", "x", "x"]),
            "Invalid step size specified: 'x'."
        );
        assert_eq!(
            message(&["-o", "-1", "x"]),
            "Invalid offset specified. Must be between 0 and 9223372036854775807."
        );
        assert_eq!(
            message(&["--pattern=256", "x"]),
            "Invalid pattern byte specified. Must be between 0 and 255."
        );
        assert_eq!(
            message(&["--flush-interval=x", "-w", "x"]),
            "Invalid flush interval specified: 'x'."
        );
        assert_eq!(message(&["-t", "foo", "x"]), "Invalid cache mode");
        assert_eq!(message(&["-i", "foo", "x"]), "Invalid aio option: foo");
    }

    #[test]
    fn plan_file_and_flush_rules_match_qemu() {
        assert!(message(&[]).starts_with("Expecting one image file name\n"));
        assert!(message(&["a", "b"]).starts_with("Expecting one image file name\n"));
        assert_eq!(
            message(&["--flush-interval=64", "x"]),
            "--flush-interval is only available in write tests"
        );
        assert_eq!(
            message(&["--flush-interval=10", "-w", "x"]),
            "Flush interval can't be smaller than depth"
        );
        assert!(parse(&["--flush-interval=0", "x"]).is_ok());
    }

    #[test]
    fn plan_aio_native_is_remembered() {
        assert!(parse(&["-n", "x"]).unwrap().2);
        assert!(parse(&["-i", "native", "x"]).unwrap().2);
        assert!(!parse(&["-i", "io_uring", "x"]).unwrap().2);
    }

    #[test]
    fn cache_mode_parse_matches_qemu() {
        let none = CacheMode::parse("none").unwrap();
        assert!(none.direct && !none.write_through);
        assert_eq!(CacheMode::parse("off").unwrap(), none);
        let ds = CacheMode::parse("directsync").unwrap();
        assert!(ds.direct && ds.write_through);
        assert!(CacheMode::parse("unsafe").unwrap().no_flush);
        assert!(CacheMode::parse("writethrough").unwrap().write_through);
        assert_eq!(CacheMode::parse("writeback").unwrap(), CacheMode::WRITEBACK);
    }

    fn plan_with(count: u64, depth: u64, fi: u64, drain: bool) -> Plan {
        Plan {
            count,
            depth,
            offset: 0,
            buf_size: 4096,
            step: 4096,
            write: true,
            pattern: 0,
            flush_interval: fi,
            drain,
            cache: CacheMode::WRITEBACK,
        }
    }

    #[test]
    fn request_offset_wraps_modulo_size() {
        let mut p = plan_with(3, 64, 0, true);
        p.step = 700 << 10;
        assert_eq!(p.request_offset(0, 1 << 20), 0);
        assert_eq!(p.request_offset(1, 1 << 20), 716_800);
        assert_eq!(p.request_offset(2, 1 << 20), 385_024);
        // Only the first request keeps an offset past the end.
        p.offset = 2 << 20;
        assert_eq!(p.request_offset(0, 1 << 20), 2 << 20);
        assert_eq!(p.request_offset(1, 1 << 20), 716_800);
        assert_eq!(p.request_offset(5, 0), 0);
    }

    #[test]
    fn segment_end_stops_where_qemu_drains() {
        // No interval or no draining: one segment.
        assert_eq!(plan_with(1000, 64, 0, true).segment_end(0), 1000);
        assert_eq!(plan_with(1000, 64, 100, false).segment_end(0), 1000);
        // count 1000, depth 64, every 100: qemu drains when 900, 800, ... requests are unsent.
        let p = plan_with(1000, 64, 100, true);
        let mut stops = vec![];
        let mut s = 0;
        while s < 1000 {
            s = p.segment_end(s);
            stops.push(s);
        }
        assert_eq!(stops, (1..=10).map(|k| k * 100).collect::<Vec<_>>());
        // Interval equal to depth: the first stop is at 104 (896 = 14 * 64 unsent).
        let p = plan_with(1000, 64, 64, true);
        assert_eq!(p.segment_end(0), 104);
        assert_eq!(p.segment_end(104), 168);
        assert_eq!(p.segment_end(936), 1000);
        // Fewer requests than the depth: only the end.
        assert_eq!(plan_with(10, 64, 64, true).segment_end(0), 10);
    }
}
