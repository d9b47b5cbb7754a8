//! `img compare`: whether two images show the guest the same content, the way qemu-img decides.

use clap::Args;
use imgblock::{BlockStatus, Image};

use crate::cache::{is_direct, parse_cache};
use crate::console;
use crate::failure::{CliResult, Failure};
use crate::open::{open_source, parse_format, OpenRequest};
use crate::progress::{Progress, ProgressArgs};
use crate::sectors::{first_difference, first_nonzero};

/// qemu-img compares at most this many bytes at a time (`IO_BUF_SIZE`).
const CHUNK: u64 = 2 << 20;

/// Exit status: the images differ.
pub const EXIT_DIFFERENT: i32 = 1;
/// Exit status: an image could not be opened.
pub const EXIT_OPEN_ERROR: i32 = 2;
/// Exit status: block status could not be read.
pub const EXIT_STATUS_ERROR: i32 = 3;
/// Exit status: data could not be read.
pub const EXIT_READ_ERROR: i32 = 4;

/// `img compare [-f FMT] [-F FMT] [-T CACHE] [-s] [-p] [-q] [-U] A B`
#[derive(Debug, Args)]
pub struct CompareArgs {
    /// `--object secret,...` and `--image-opts`.
    #[command(flatten)]
    pub(crate) secret_args: crate::secrets::SecretArgs,
    /// Format of the first image (probed when not given).
    #[arg(
        short = 'f',
        long = "a-format",
        alias = "left-format",
        value_name = "FMT"
    )]
    format: Option<String>,
    /// Format of the second image (probed when not given).
    #[arg(
        short = 'F',
        long = "b-format",
        alias = "right-format",
        value_name = "FMT"
    )]
    format2: Option<String>,
    /// Cache mode for reading the images: `none` and `directsync` read around the page cache.
    #[arg(short = 'T', long = "cache", value_name = "CACHE")]
    cache: Option<String>,
    /// Strict: fail on different sizes or allocation.
    #[arg(short = 's', long = "strict")]
    strict: bool,
    /// `-p` and `--progress=json`.
    #[command(flatten)]
    progress: ProgressArgs,
    /// Quiet: print nothing but errors.
    #[arg(short = 'q', long = "quiet")]
    quiet: bool,
    /// Open the images even if another process uses them (accepted for compatibility).
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// The first image.
    filename1: String,
    /// The second image.
    filename2: String,
}

/// What the comparison found.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Verdict {
    Identical,
    /// The message to print, qemu's words.
    Different(String),
}

/// Runs `img compare`.
///
/// # Errors
/// When an image cannot be opened (status 2), its metadata (3) or data (4) cannot be read.
pub fn run(args: &CompareArgs) -> CliResult<i32> {
    // qemu-img compare fails with status 2 here, as for an image it cannot open.
    parse_cache(args.cache.as_deref(), "source cache").map_err(|f| f.with_code(EXIT_OPEN_ERROR))?;
    let direct = is_direct(args.cache.as_deref());
    let open = |name: &str, fmt: Option<&str>| -> CliResult<Image> {
        let spec = args.secret_args.resolve(name, parse_format(fmt)?)?;
        let req = OpenRequest {
            format: spec.format,
            secrets: Some(&spec.secrets),
            force_share: args.force_share,
            direct,
            ..OpenRequest::default()
        };
        open_source(&spec.path, &req, None)
    };
    let a =
        open(&args.filename1, args.format.as_deref()).map_err(|f| f.with_code(EXIT_OPEN_ERROR))?;
    let b =
        open(&args.filename2, args.format2.as_deref()).map_err(|f| f.with_code(EXIT_OPEN_ERROR))?;
    let say = |s: &str| {
        if !args.quiet {
            console::print(&format!("{s}\n"));
        }
    };
    let (sa, sb) = (a.size(), b.size());
    if sa != sb && args.strict {
        say("Strict mode: Image size mismatch!");
        return Ok(EXIT_DIFFERENT);
    }
    let progress = Progress::new(&args.progress, args.quiet, sa.max(sb));
    let mut verdict = compare_common(&a, &b, args.strict, &progress)?;
    if verdict == Verdict::Identical && sa != sb {
        say("Warning: Image size mismatch!");
        let over = if sa > sb { &a } else { &b };
        verdict = compare_tail(over, sa.min(sb), &progress)?;
    }
    progress.finish();
    match verdict {
        Verdict::Identical => {
            say("Images are identical.");
            Ok(0)
        }
        Verdict::Different(msg) => {
            say(&msg);
            Ok(EXIT_DIFFERENT)
        }
    }
}

fn status(img: &Image, offset: u64, len: u64) -> CliResult<BlockStatus> {
    img.block_status(offset, len).map_err(|e| {
        Failure::new(format!(
            "Sector allocation test failed for {}: {e}",
            img.path().display()
        ))
        .with_code(EXIT_STATUS_ERROR)
    })
}

fn read(img: &Image, buf: &mut [u8], offset: u64) -> CliResult<()> {
    img.read_at(buf, offset).map_err(|e| {
        Failure::new(format!(
            "Error while reading offset {offset} of {}: {e}",
            img.path().display()
        ))
        .with_code(EXIT_READ_ERROR)
    })
}

fn mismatch(offset: u64) -> Verdict {
    Verdict::Different(format!("Content mismatch at offset {offset}!"))
}

/// The flags qemu's strict mode compares, including `BDRV_BLOCK_EOF` (the answer reaches the
/// end of that image).
fn strict_flags(
    img: &Image,
    offset: u64,
    st: &BlockStatus,
) -> (bool, bool, bool, bool, bool, bool) {
    let eof = offset.saturating_add(st.len) >= img.size();
    (
        st.present,
        st.zero,
        st.data,
        st.compressed,
        st.offset.is_some(),
        eof,
    )
}

fn chunk_buffer() -> Vec<u8> {
    vec![0u8; usize::try_from(CHUNK).unwrap_or(1 << 21)]
}

/// Compares the part both images have.
fn compare_common(a: &Image, b: &Image, strict: bool, progress: &Progress) -> CliResult<Verdict> {
    let common = a.size().min(b.size());
    let mut buf_a = chunk_buffer();
    let mut buf_b = chunk_buffer();
    let mut offset = 0;
    while offset < common {
        let mut sa = status(a, offset, a.size() - offset)?;
        let mut sb = status(b, offset, b.size() - offset)?;
        if strict {
            // Step as qemu's drivers answer, so that the end-of-image flag means the same.
            for (img, st) in [(a, &mut sa), (b, &mut sb)] {
                if let Some(end) = img.status_boundary(offset) {
                    st.len = st.len.min(end.saturating_sub(offset)).max(1);
                }
            }
        }
        let mut chunk = sa.len.min(sb.len).clamp(1, common - offset);
        if strict && strict_flags(a, offset, &sa) != strict_flags(b, offset, &sb) {
            return Ok(Verdict::Different(format!(
                "Strict mode: Offset {offset} block status mismatch!"
            )));
        }
        if !(sa.zero && sb.zero) {
            chunk = chunk.min(CHUNK);
            let n = usize::try_from(chunk).unwrap_or(buf_a.len());
            if sa.present == sb.present {
                if sa.present {
                    read(a, &mut buf_a[..n], offset)?;
                    read(b, &mut buf_b[..n], offset)?;
                    if let Some(d) = first_difference(&buf_a[..n], &buf_b[..n]) {
                        return Ok(mismatch(offset + d));
                    }
                }
            } else {
                let (img, buf) = if sa.present {
                    (a, &mut buf_a)
                } else {
                    (b, &mut buf_b)
                };
                read(img, &mut buf[..n], offset)?;
                if let Some(d) = first_nonzero(&buf[..n]) {
                    return Ok(mismatch(offset + d));
                }
            }
        }
        offset += chunk;
        progress.inc(chunk);
    }
    Ok(Verdict::Identical)
}

/// The part of the larger image past the smaller one's end must read as zeroes.
fn compare_tail(img: &Image, mut offset: u64, progress: &Progress) -> CliResult<Verdict> {
    let size = img.size();
    let mut buf = chunk_buffer();
    while offset < size {
        let st = status(img, offset, size - offset)?;
        let mut chunk = st.len.max(1);
        if st.present && !st.zero {
            chunk = chunk.min(CHUNK);
            let n = usize::try_from(chunk).unwrap_or(buf.len());
            read(img, &mut buf[..n], offset)?;
            if let Some(d) = first_nonzero(&buf[..n]) {
                return Ok(mismatch(offset + d));
            }
        }
        offset += chunk;
        progress.inc(chunk);
    }
    Ok(Verdict::Identical)
}
