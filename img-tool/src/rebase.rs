//! `img rebase`: change an image's backing file, copying what differs (safe mode) or only
//! rewriting the header (`-u`); `-b ""` makes the image stand alone.

use std::path::Path;

use clap::Args;
use imgblock::{BackingSpec, Format};

use crate::cache::parse_cache;
use crate::failure::{open_failure, open_reason, CliResult, Failure};
use crate::open::{open_image, parse_format, OpenRequest};
use crate::progress::{Progress, ProgressArgs};
use crate::secrets::{ImageSpec, SecretArgs};

/// `img rebase [-f FMT | --image-opts] [--object OBJDEF] [-t CACHE] [-T SRC_CACHE] [-u]
/// -b BACKING [-F FMT] [-c] [-p] [-q] [-U] FILE`
#[derive(Debug, Args)]
pub struct RebaseArgs {
    /// `--object secret,...` and `--image-opts` for the image and its current backing chain.
    /// As in qemu-img, the new backing file is opened without a secret: a safe rebase onto an
    /// encrypted image is refused.
    #[command(flatten)]
    pub(crate) secret_args: SecretArgs,
    /// Image format (probed when not given).
    #[arg(short = 'f', long = "format", value_name = "FMT")]
    format: Option<String>,
    /// Cache mode for the image (accepted for compatibility).
    #[arg(short = 't', long = "cache", value_name = "CACHE")]
    cache: Option<String>,
    /// Cache mode for the backing files (accepted for compatibility).
    #[arg(short = 'T', long = "backing-cache", value_name = "SRC_CACHE")]
    src_cache: Option<String>,
    /// Unsafe: rewrite the backing reference only, copying no data.
    #[arg(short = 'u', long = "backing-unsafe")]
    unsafe_: bool,
    /// The new backing file; "" removes the backing file (the image becomes standalone).
    #[arg(short = 'b', long = "backing", value_name = "BACKING")]
    backing: Option<String>,
    /// Format of the new backing file.
    #[arg(short = 'F', long = "backing-format", value_name = "BACKING_FMT")]
    backing_format: Option<String>,
    /// `-p` and `--progress=json`.
    #[command(flatten)]
    progress: ProgressArgs,
    /// Quiet: print nothing but errors.
    #[arg(short = 'q', long = "quiet")]
    quiet: bool,
    /// Store the clusters a safe rebase copies compressed (formats with compressed clusters).
    #[arg(short = 'c', long = "compress")]
    compress: bool,
    /// Open the backing files even if another process uses them (accepted for compatibility).
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// The image whose backing file changes.
    filename: String,
}

/// Runs `img rebase`.
///
/// # Errors
/// No `-b` in safe mode, a new backing file that cannot be opened or has no format, or a
/// format whose header cannot name a backing file.
pub fn run(args: &RebaseArgs) -> CliResult<i32> {
    parse_cache(args.cache.as_deref(), "cache")?;
    parse_cache(args.src_cache.as_deref(), "source cache")?;
    if args.backing.is_none() && !args.unsafe_ {
        return Err(Failure::new(
            "Must specify backing file (-b) or use unsafe mode (-u)\nTry 'img rebase --help' for more info",
        ));
    }
    let spec = args
        .secret_args
        .resolve(&args.filename, parse_format(args.format.as_deref())?)?;
    let path = spec.path.as_path();
    if args.compress {
        // qemu-img refuses a format without compressed clusters first, even with -u.
        check_compression(path, &spec)?;
    }
    let new_backing = match args.backing.as_deref() {
        None | Some("") => None,
        Some(b) => Some(BackingSpec {
            filename: b.to_owned(),
            format: args.backing_format.clone(),
        }),
    };
    if let Some(b) = &new_backing {
        check_new_backing(path, b, args.unsafe_)?;
    }
    let progress = Progress::new(&args.progress, args.quiet, 0);
    let report = |done, total| progress.set(done, total);
    if args.compress && !args.unsafe_ {
        imgblock::ops::rebase_compressed(
            path,
            spec.format,
            &spec.secrets,
            new_backing.as_ref(),
            &report,
        )
    } else {
        imgblock::ops::rebase(
            path,
            spec.format,
            &spec.secrets,
            new_backing.as_ref(),
            args.unsafe_,
            &report,
        )
    }
    .map_err(|e| match e {
        // Found before anything is written; qemu fails on its first compressed write.
        imgblock::Error::Unsupported { ref what, .. }
            if what == imgblock::ops::NO_COMPRESSED_CLUSTERS =>
        {
            Failure::new("Error while writing to COW image: Operation not supported")
        }
        imgblock::Error::Unsupported { .. } => Failure::new(format!(
            "Could not change the backing file to '{}': Operation not supported",
            args.backing.as_deref().unwrap_or("")
        )),
        imgblock::Error::Qcow2 {
            source: imgblock::qcow2::Error::BackingWithRawDataFile,
            ..
        } => Failure::new(format!(
            "Could not change the backing file to '{}': Invalid argument",
            args.backing.as_deref().unwrap_or("")
        )),
        // The new backing file held by a writer (the image itself, say): named as qemu names it.
        imgblock::Error::Locked {
            path: ref locked, ..
        } if new_backing.as_ref().is_some_and(|b| {
            same_file(locked, &imgblock::image::resolve_backing(path, &b.filename))
        }) =>
        {
            Failure::new(format!(
                "Could not open new backing file '{}': {e}",
                args.backing.as_deref().unwrap_or("")
            ))
        }
        imgblock::Error::BackingOpen { .. }
        | imgblock::Error::Io { .. }
        | imgblock::Error::KeyRequired { .. }
        | imgblock::Error::Crypto { .. } => open_failure(path, &e),
        other => Failure::from(other),
    })?;
    progress.finish();
    Ok(0)
}

/// Whether two paths name one file.
fn same_file(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(x), Ok(y)) => x == y,
        _ => a == b,
    }
}

/// Refuses, as qemu-img does before anything else, `-c` for an image whose format has no
/// compressed clusters. It asks the format, not this image: as in qemu, `-u -c` on a qcow2
/// with an external data file (which cannot hold compressed clusters) writes no data and
/// passes. (The image is opened for writing, as qemu opens it, which also warns about a
/// probed raw image.)
fn check_compression(path: &Path, spec: &ImageSpec) -> CliResult<()> {
    let req = OpenRequest {
        format: spec.format,
        writable: true,
        no_backing: true,
        secrets: Some(&spec.secrets),
        ..OpenRequest::default()
    };
    let img = open_image(path, &req)?;
    if !matches!(img.format(), Format::Qcow2 | Format::Vmdk) {
        return Err(Failure::new(
            "Compression not supported for this file format",
        ));
    }
    Ok(())
}

/// qemu-img 10 requires the new backing file's format, and in safe mode opens it first.
/// (qemu-img copies the data before it notices a missing `-F`; `img` refuses before writing.)
fn check_new_backing(path: &Path, b: &BackingSpec, unsafe_: bool) -> CliResult<()> {
    let Some(fmt) = &b.format else {
        return Err(Failure::new(format!(
            "Could not change the backing file to '{}': backing format must be specified",
            b.filename
        )));
    };
    let format = parse_format(Some(fmt))?;
    if unsafe_ {
        return Ok(());
    }
    let full = imgblock::image::resolve_backing(path, &b.filename);
    imgblock::Image::open(&full, &imgblock::OpenOptions::read_only().format(format)).map_err(
        |e| {
            Failure::new(format!(
                "Could not open new backing file '{}': {}",
                b.filename,
                open_reason(&e)
            ))
        },
    )?;
    Ok(())
}
