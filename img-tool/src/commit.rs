//! `img commit`: write an overlay's data into an image below it in its backing chain.

use std::path::Path;

use clap::Args;

use crate::cache::parse_cache;
use crate::console;
use crate::failure::{CliResult, Failure};
use crate::open::{open_image, parse_format, OpenRequest};
use crate::progress::{Progress, ProgressArgs};
use crate::ratelimit::RateLimit;
use crate::secrets::{ImageSpec, SecretArgs};

/// `img commit [-f FMT | --image-opts] [--object OBJDEF] [-t CACHE] [-b BASE] [-d] [-r RATE] [-p]
/// [-q] FILE`
#[derive(Debug, Args)]
pub struct CommitArgs {
    /// `--object secret,...` and `--image-opts` (`backing.encrypt.key-secret=ID` for the base).
    #[command(flatten)]
    pub(crate) secret_args: SecretArgs,
    /// Image format (probed when not given).
    #[arg(short = 'f', long = "format", value_name = "FMT")]
    format: Option<String>,
    /// Cache mode for the images (accepted for compatibility; writes are flushed at the end).
    #[arg(short = 't', long = "cache", value_name = "CACHE")]
    cache: Option<String>,
    /// The image to commit into (default: the immediate backing file). Implies -d.
    #[arg(short = 'b', long = "base", value_name = "BASE")]
    base: Option<String>,
    /// Rate limit: at most RATE bytes written per second (size suffixes allowed; 0 is none).
    #[arg(
        short = 'r',
        long = "rate",
        value_name = "RATE",
        allow_hyphen_values = true
    )]
    rate: Option<String>,
    /// Keep the overlay's data (do not empty it after the commit).
    #[arg(short = 'd', long = "drop")]
    keep: bool,
    /// `-p` and `--progress=json`.
    #[command(flatten)]
    progress: ProgressArgs,
    /// Quiet: print nothing but errors.
    #[arg(short = 'q', long = "quiet")]
    quiet: bool,
    /// The overlay image.
    filename: String,
}

/// Runs `img commit`.
///
/// # Errors
/// An image without a backing file, a base that is not in its chain, or a failed write.
pub fn run(args: &CommitArgs) -> CliResult<i32> {
    let rate = RateLimit::parse(args.rate.as_deref())?;
    parse_cache(args.cache.as_deref(), "cache")?;
    let spec = args
        .secret_args
        .resolve(&args.filename, parse_format(args.format.as_deref())?)?;
    check_chain(&spec, args.base.as_deref())?;
    let progress = Progress::new(&args.progress, args.quiet, 0);
    // qemu-img: the images between the base and the top become invalid, so -b keeps the top.
    let keep = args.keep || args.base.is_some();
    imgblock::ops::commit_throttled(
        &spec.path,
        spec.format,
        &spec.secrets,
        args.base.as_deref().map(Path::new),
        keep,
        &|done, total| progress.set(done, total),
        &|n| {
            if let Some(r) = &rate {
                r.wrote(n);
            }
        },
    )
    .map_err(|e| match e {
        imgblock::Error::Unsupported { what, .. } => Failure::new(what),
        imgblock::Error::InvalidOption(m) => Failure::new(m),
        other => Failure::from(other),
    })?;
    progress.finish();
    if !args.quiet {
        console::print("Image committed.\n");
    }
    Ok(0)
}

/// Refuses, in qemu-img's words and before anything is written, an image without a backing
/// file, a base that is not below it, and a chain whose encrypted layers cannot be unlocked.
fn check_chain(spec: &ImageSpec, base: Option<&str>) -> CliResult<()> {
    let path = spec.path.as_path();
    let req = OpenRequest {
        format: spec.format,
        secrets: Some(&spec.secrets),
        ..OpenRequest::default()
    };
    let top = open_image(path, &req)?;
    let chain = top.chain();
    if chain.len() < 2 {
        return Err(Failure::new("Image does not have a backing file"));
    }
    if let Some(b) = base {
        let want = std::fs::canonicalize(b).ok();
        let found = chain[1..]
            .iter()
            .any(|i| want.is_some() && std::fs::canonicalize(i.path()).ok() == want);
        if !found {
            return Err(Failure::new(format!(
                "Did not find '{b}' in the backing chain of '{}'",
                path.display()
            )));
        }
    }
    Ok(())
}
