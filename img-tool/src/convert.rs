//! `img convert`: copies one or more images (concatenated) into a new or existing one, in
//! fixed-size chunks, reading only what block status says holds data.

use std::path::Path;

use clap::Args;
use imgblock::{BlockStatus, CreateOptions, Format, Image};

use crate::createopts::{help_text, wants_help};
use crate::failure::{CliResult, Failure};
use crate::open::{open_image, parse_format, OpenRequest};
use crate::progress::Progress;
use crate::sectors::{data_run, is_zero, SECTOR};

/// Bytes copied per step; memory use is one buffer of this size, whatever the image size.
const CHUNK: u64 = 2 << 20;
/// The default `-S`: zero runs shorter than this inside data are written as data.
const DEFAULT_SPARSE: u64 = 4096;
/// The largest `-S` qemu-img accepts.
const MAX_SPARSE: u64 = 16 << 20;

/// `img convert [-f FMT] [-O FMT] [-o OPTS] [-S SIZE] [-n] [-p] [-q] [-c] [-l snapshot.name=NAME]
/// [-B BACKING [-F FMT]] [-U] SRC... DST`
#[derive(Debug, Args)]
pub struct ConvertArgs {
    /// Format of the source images (probed when not given).
    #[arg(short = 'f', value_name = "FMT")]
    format: Option<String>,
    /// Output format (default raw).
    #[arg(short = 'O', value_name = "OUTPUT_FMT")]
    output_format: Option<String>,
    /// Options for the new image, key=value[,key=value...]. May be repeated.
    #[arg(short = 'o', value_name = "OPTIONS")]
    options: Vec<String>,
    /// Zero runs at least this long become holes (default 4k; 0 writes everything).
    #[arg(short = 'S', value_name = "SPARSE_SIZE")]
    sparse: Option<String>,
    /// Do not create the target; write into the existing image.
    #[arg(short = 'n')]
    no_create: bool,
    /// Show progress.
    #[arg(short = 'p')]
    progress: bool,
    /// Quiet: print nothing but errors.
    #[arg(short = 'q')]
    quiet: bool,
    /// Compress the target's clusters (formats with compression only).
    #[arg(short = 'c')]
    compress: bool,
    /// Convert this internal snapshot of the source: snapshot.name=NAME, snapshot.id=ID or NAME.
    #[arg(short = 'l', value_name = "SNAPSHOT")]
    snapshot: Option<String>,
    /// Backing file of the target: copy only what the source holds above its own backing.
    #[arg(short = 'B', value_name = "BACKING")]
    backing: Option<String>,
    /// Format of the target's backing file.
    #[arg(short = 'F', value_name = "BACKING_FMT")]
    backing_format: Option<String>,
    /// Open the sources even if another process uses them (accepted for compatibility).
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// Source images, then the target.
    #[arg(num_args = 0..)]
    files: Vec<String>,
}

/// What to do with one range of the source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    /// Leave it to the target's backing file.
    Skip,
    /// Make it read as zeroes.
    Zero,
    /// Read and copy (with zero detection).
    Copy,
}

/// Validated convert settings.
#[derive(Debug)]
struct Plan {
    /// -S in sectors; 0 writes everything.
    min_sparse: usize,
    /// Writes are aligned to this many sectors.
    alignment: u64,
    /// The target reads as zeroes where nothing is written (fresh, no backing, sparse allowed).
    zero_init: bool,
    /// The target has a backing file: copy only what lies above the source's own backing.
    target_has_backing: bool,
}

fn parse_sparse(s: Option<&str>) -> CliResult<u64> {
    let bad = || {
        Failure::new(format!(
            "Invalid buffer size for sparse output specified. Valid sizes are multiples of 512 up to {MAX_SPARSE}. \
             Select 0 to disable sparse detection (fully allocates output)."
        ))
    };
    let Some(s) = s else {
        return Ok(DEFAULT_SPARSE);
    };
    let n = imgblock::options::parse_size(s).map_err(|_| bad())?;
    if n % 512 != 0 || n > MAX_SPARSE {
        return Err(bad());
    }
    Ok(n)
}

/// `-l`'s argument: `snapshot.name=NAME`, `snapshot.id=ID` or a bare name or ID.
fn parse_snapshot(s: &str) -> CliResult<String> {
    let mut name = None;
    for part in s.split(',') {
        match part.split_once('=') {
            Some(("snapshot.name" | "snapshot.id", v)) => name = Some(v.to_owned()),
            Some((k, _)) => return Err(Failure::new(format!("Invalid parameter '{k}'"))),
            None if name.is_none() => name = Some(part.to_owned()),
            None => return Err(Failure::new(format!("Invalid parameter '{part}'"))),
        }
    }
    name.filter(|n| !n.is_empty())
        .ok_or_else(|| Failure::new("Failed to load snapshot: Can't find snapshot"))
}

/// Runs `img convert`.
///
/// # Errors
/// Bad options, unreadable sources, or a target that cannot be created or written.
pub fn run(args: &ConvertArgs) -> CliResult<i32> {
    let out_format =
        parse_format(Some(args.output_format.as_deref().unwrap_or("raw")))?.unwrap_or(Format::Raw);
    let mut opts = CreateOptions::default();
    for o in &args.options {
        opts.parse_opts(o)?;
    }
    if wants_help(&opts.opts) {
        print!("{}", help_text(out_format));
        return Ok(0);
    }
    let (dst, srcs) = match args.files.split_last() {
        Some((dst, srcs)) if !srcs.is_empty() => (dst, srcs),
        _ => return Err(Failure::new("Must specify image file name")),
    };
    let sparse = parse_sparse(args.sparse.as_deref())?;
    let sources = open_sources(args, srcs)?;
    let total = sources
        .iter()
        .try_fold(0u64, |acc, s| acc.checked_add(s.size()))
        .ok_or_else(|| Failure::new("Sum of source sizes overflows"))?;
    if args.backing.is_some() {
        opts.backing_file.clone_from(&args.backing);
    }
    if args.backing_format.is_some() {
        opts.backing_fmt.clone_from(&args.backing_format);
    }
    let target_has_backing = opts.backing_file.is_some();
    let target = if args.no_create {
        open_existing_target(Path::new(dst), out_format, total)?
    } else {
        opts.size = Some(total);
        create_target(Path::new(dst), out_format, &opts)?
    };
    let min_sparse = usize::try_from(sparse / 512).unwrap_or(8);
    let plan = Plan {
        min_sparse,
        alignment: u64::try_from(pow2floor(min_sparse)).unwrap_or(1).max(1),
        zero_init: !args.no_create && !target_has_backing && min_sparse != 0,
        target_has_backing,
    };
    let progress = Progress::new(args.progress, args.quiet, total);
    if args.compress {
        copy_compressed(&sources, &target, &plan, &progress)?;
    } else {
        let mut base = 0;
        for src in &sources {
            copy_image(src, &target, base, &plan, &progress)?;
            base += src.size();
        }
    }
    target
        .flush()
        .map_err(|e| Failure::new(format!("Error while flushing {dst}: {e}")))?;
    progress.finish();
    Ok(0)
}

/// Opens the sources read-only, at the `-l` snapshot if one is given.
fn open_sources(args: &ConvertArgs, srcs: &[String]) -> CliResult<Vec<Image>> {
    let snapshot = args.snapshot.as_deref().map(parse_snapshot).transpose()?;
    if snapshot.is_some() && srcs.len() > 1 {
        return Err(Failure::new(
            "No support for concatenating multiple snapshot",
        ));
    }
    let req = OpenRequest {
        format: parse_format(args.format.as_deref())?,
        snapshot: snapshot.as_deref(),
        ..OpenRequest::default()
    };
    srcs.iter()
        .map(|s| open_image(Path::new(s), &req))
        .collect()
}

/// Creates the target and opens it for writing (with its backing chain, for copy-on-write).
fn create_target(path: &Path, format: Format, opts: &CreateOptions) -> CliResult<Image> {
    imgblock::create(path, format, opts)
        .map_err(|e| Failure::new(format!("{}: {e}", path.display())))?;
    let req = OpenRequest {
        format: Some(format),
        writable: true,
        ..OpenRequest::default()
    };
    open_image(path, &req)
}

fn pow2floor(n: usize) -> usize {
    if n == 0 {
        0
    } else {
        1 << (usize::BITS - 1 - n.leading_zeros())
    }
}

/// `-n`: the target must exist and be large enough.
fn open_existing_target(path: &Path, format: Format, total: u64) -> CliResult<Image> {
    let req = OpenRequest {
        format: Some(format),
        writable: true,
        ..OpenRequest::default()
    };
    let img = open_image(path, &req)?;
    if img.size() < total {
        return Err(Failure::new("output file is smaller than input file"));
    }
    Ok(img)
}

/// What to do with the range block status describes, qemu-img's `convert_iteration_sectors`.
fn action_for(st: &BlockStatus, plan: &Plan) -> Action {
    if st.zero {
        // With -S 0 everything is written as data, zeroes included.
        if plan.min_sparse == 0 {
            Action::Copy
        } else {
            Action::Zero
        }
    } else if st.data || !plan.target_has_backing {
        Action::Copy
    } else {
        Action::Skip
    }
}

/// The status of the next range of `src` at `offset`: with a target backing file, only what the
/// source holds above its own backing counts.
fn next_range(src: &Image, offset: u64, len: u64, plan: &Plan) -> CliResult<(Action, u64)> {
    if plan.target_has_backing {
        let (here, n) = src.is_allocated_here(offset, len)?;
        if !here {
            return Ok((Action::Skip, n));
        }
        let st = src.block_status(offset, n)?;
        return Ok((action_for(&st, plan), st.len.clamp(1, n)));
    }
    let st = src.block_status(offset, len)?;
    Ok((action_for(&st, plan), st.len.clamp(1, len)))
}

/// Copies `src` into `target` at `base`, chunk by chunk.
fn copy_image(
    src: &Image,
    target: &Image,
    base: u64,
    plan: &Plan,
    progress: &Progress,
) -> CliResult<()> {
    let size = src.size();
    let mut buf = vec![0u8; usize::try_from(CHUNK.min(size)).unwrap_or(0)];
    let mut offset = 0;
    while offset < size {
        let (action, n) = next_range(src, offset, (size - offset).min(CHUNK), plan)?;
        let n = n.min(CHUNK);
        match action {
            Action::Skip => {}
            Action::Zero => write_zeroes(target, base + offset, n, plan)?,
            Action::Copy => {
                let data = &mut buf[..usize::try_from(n).unwrap_or(0)];
                src.read_at(data, offset)?;
                write_chunk(target, base + offset, data, plan)?;
            }
        }
        offset += n;
        progress.inc(n);
    }
    Ok(())
}

/// Makes a target range read as zeroes, unless it already does.
fn write_zeroes(target: &Image, offset: u64, len: u64, plan: &Plan) -> CliResult<()> {
    if !plan.zero_init {
        target.write_zeroes(offset, len, true)?;
    }
    Ok(())
}

/// Writes one chunk of data, turning zero runs of at least `-S` into holes (qemu-img's
/// `convert_co_write`).
fn write_chunk(target: &Image, offset: u64, data: &[u8], plan: &Plan) -> CliResult<()> {
    if plan.min_sparse == 0 {
        target.write_at(data, offset)?;
        return Ok(());
    }
    let mut done = 0;
    while done < data.len() {
        let pos = offset + done as u64;
        let (is_data, n) = data_run(
            &data[done..],
            pos / SECTOR as u64,
            plan.min_sparse,
            plan.alignment,
        );
        let n = n.max(1).min(data.len() - done);
        if is_data {
            target.write_at(&data[done..done + n], pos)?;
        } else {
            write_zeroes(target, pos, n as u64, plan)?;
        }
        done += n;
    }
    Ok(())
}

/// `-c`: copies whole target clusters, each stored compressed when that shrinks it (and plainly
/// otherwise, as qemu does). Clusters are compressed on two threads; writes stay in order.
fn copy_compressed(
    sources: &[Image],
    target: &Image,
    plan: &Plan,
    progress: &Progress,
) -> CliResult<()> {
    let cluster = target
        .driver()
        .cluster_size()
        .ok_or_else(|| Failure::new("Compression not supported for this file format"))?;
    let cs = usize::try_from(cluster).map_err(|_| Failure::new("Cluster size too large"))?;
    let batch = CHUNK.max(cluster) / cluster * cluster;
    let total = target.size().min(sources.iter().map(Image::size).sum());
    let mut buf = vec![0u8; usize::try_from(batch).unwrap_or(cs)];
    let mut offset = 0;
    while offset < total {
        let n = batch.min(total - offset);
        let data = &mut buf[..usize::try_from(n).unwrap_or(0)];
        if read_concat(sources, offset, data)? {
            let clusters: Vec<&[u8]> = data.chunks(cs).collect();
            let packed = compress_all(target, &clusters)?;
            let mut at = offset;
            for (c, p) in clusters.iter().zip(&packed) {
                if is_zero(c) {
                    write_zeroes(target, at, c.len() as u64, plan)?;
                } else {
                    target.write_cluster(at, c, p.as_deref())?;
                }
                at += c.len() as u64;
            }
        } else {
            write_zeroes(target, offset, n, plan)?;
        }
        offset += n;
        progress.inc(n);
    }
    Ok(())
}

/// Reads the concatenation of `sources` at `offset`; returns false (and reads nothing) when
/// block status says the whole range is zeroes.
fn read_concat(sources: &[Image], offset: u64, buf: &mut [u8]) -> CliResult<bool> {
    let mut base = 0u64;
    let mut zero = true;
    let end = offset + buf.len() as u64;
    for src in sources {
        let (s, e) = (offset.max(base), end.min(base + src.size()));
        let mut pos = s;
        while zero && pos < e {
            let st = src.block_status(pos - base, e - pos)?;
            zero = st.zero;
            pos += st.len.max(1);
        }
        base += src.size();
    }
    if zero {
        return Ok(false);
    }
    base = 0;
    for src in sources {
        let (s, e) = (offset.max(base), end.min(base + src.size()));
        if s < e {
            let lo = usize::try_from(s - offset).unwrap_or(0);
            let hi = usize::try_from(e - offset).unwrap_or(0);
            src.read_at(&mut buf[lo..hi], s - base)?;
        }
        base += src.size();
    }
    Ok(true)
}

/// Compresses clusters on two threads (compression is pure; the image is `Sync`).
fn compress_all(target: &Image, clusters: &[&[u8]]) -> CliResult<Vec<Option<Vec<u8>>>> {
    let compress = |part: &[&[u8]]| -> Vec<Option<Vec<u8>>> {
        part.iter()
            .map(|c| {
                if is_zero(c) {
                    None
                } else {
                    target.compress_cluster(c)
                }
            })
            .collect()
    };
    let half = clusters.len().div_ceil(2).max(1);
    std::thread::scope(|s| {
        let workers: Vec<_> = clusters
            .chunks(half)
            .map(|part| s.spawn(move || compress(part)))
            .collect();
        let mut out = Vec::with_capacity(clusters.len());
        for w in workers {
            out.extend(
                w.join()
                    .map_err(|_| Failure::new("compression worker failed"))?,
            );
        }
        Ok(out)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_sparse_default_and_limits() {
        assert_eq!(parse_sparse(None).unwrap(), 4096);
        assert_eq!(parse_sparse(Some("0")).unwrap(), 0);
        assert_eq!(parse_sparse(Some("1k")).unwrap(), 1024);
        assert!(parse_sparse(Some("1000")).is_err());
        assert!(parse_sparse(Some("32M")).is_err());
    }

    #[test]
    fn parse_snapshot_forms() {
        assert_eq!(parse_snapshot("snapshot.name=snap1").unwrap(), "snap1");
        assert_eq!(parse_snapshot("snap1").unwrap(), "snap1");
        assert_eq!(parse_snapshot("snapshot.id=1").unwrap(), "1");
        assert!(parse_snapshot("foo=bar").is_err());
    }

    #[test]
    fn pow2floor_rounds_down() {
        assert_eq!(pow2floor(0), 0);
        assert_eq!(pow2floor(8), 8);
        assert_eq!(pow2floor(12), 8);
    }

    fn plan(min_sparse: usize, backing: bool) -> Plan {
        Plan {
            min_sparse,
            alignment: 8,
            zero_init: !backing,
            target_has_backing: backing,
        }
    }

    fn status(zero: bool, data: bool) -> BlockStatus {
        BlockStatus {
            len: 1,
            depth: 0,
            present: true,
            zero,
            data,
            compressed: false,
            offset: None,
            file: 0,
        }
    }

    #[test]
    fn action_for_zero_is_copied_only_with_s0() {
        assert_eq!(
            action_for(&status(true, false), &plan(8, false)),
            Action::Zero
        );
        assert_eq!(
            action_for(&status(true, false), &plan(0, false)),
            Action::Copy
        );
    }

    #[test]
    fn action_for_unallocated_with_backing_is_skipped() {
        assert_eq!(
            action_for(&status(false, false), &plan(8, true)),
            Action::Skip
        );
        assert_eq!(
            action_for(&status(false, false), &plan(8, false)),
            Action::Copy
        );
    }
}
