//! `img convert`: copies one or more images (concatenated) into a new or existing one, in
//! fixed-size chunks, reading only what block status says holds data.

use std::path::Path;

use clap::Args;
use imgblock::{BlockStatus, CreateOptions, Format, Image, SnapshotRef};

use crate::cache::{is_direct, parse_cache};
use crate::console;
use crate::createopts::{help_text, wants_help};
use crate::failure::{CliResult, Failure};
use crate::open::{open_image, open_source, parse_format, parse_output_format, OpenRequest};
use crate::pipeline::{Action, Mode, Sparse};
use crate::progress::{Progress, ProgressArgs};
use crate::ratelimit::RateLimit;
use crate::secrets::SecretArgs;
use crate::units::INT64_MAX;

/// The default `-S`: zero runs shorter than this inside data are written as data.
const DEFAULT_SPARSE: u64 = 4096;
/// The largest `-S` qemu-img accepts.
const MAX_SPARSE: u64 = 16 << 20;
/// The most parallel requests (`-m`) qemu-img accepts.
const MAX_PARALLEL: usize = 16;
/// `img convert [-f FMT] [-O FMT] [-o OPTS] [-S SIZE] [-n] [-p] [-q] [-c] [-l snapshot.name=NAME]
/// [-B BACKING [-F FMT]] [-W] [-C] [-m N] [-t CACHE] [-T SRC_CACHE] [-U] [--disk N]
/// [--target-is-zero] [-r RATE] [--salvage] SRC... DST`
#[derive(Debug, Args)]
pub struct ConvertArgs {
    /// Format of the source images (probed when not given).
    #[arg(short = 'f', long = "source-format", value_name = "FMT")]
    format: Option<String>,
    /// Output format (default raw).
    #[arg(
        short = 'O',
        long = "target-format",
        alias = "output-format",
        value_name = "OUTPUT_FMT"
    )]
    output_format: Option<String>,
    /// Options for the new image, key=value[,key=value...]. May be repeated.
    #[arg(
        short = 'o',
        long = "target-options",
        alias = "options",
        value_name = "OPTIONS"
    )]
    options: Vec<String>,
    /// Zero runs at least this long become holes (default 4k; 0 writes everything).
    #[arg(short = 'S', long = "sparse-size", value_name = "SPARSE_SIZE")]
    sparse: Option<String>,
    /// With -n: the existing target reads as zeroes already, so zeroes need not be written
    /// (not with a backing file, -B).
    #[arg(long = "target-is-zero")]
    target_is_zero: bool,
    /// Do not create the target; write into the existing image.
    #[arg(short = 'n', long = "no-create")]
    no_create: bool,
    /// `-p` and `--progress=json`.
    #[command(flatten)]
    progress: ProgressArgs,
    /// Quiet: print nothing but errors.
    #[arg(short = 'q', long = "quiet")]
    quiet: bool,
    /// Compress the target's clusters (formats with compression only).
    #[arg(short = 'c', long = "compress")]
    compress: bool,
    /// Convert this internal snapshot of the source: snapshot.name=NAME, snapshot.id=ID or NAME.
    #[arg(
        short = 'l',
        long = "source-snapshot",
        alias = "snapshot",
        value_name = "SNAPSHOT"
    )]
    snapshot: Option<String>,
    /// Backing file of the target: copy only what the source holds above its own backing.
    #[arg(short = 'B', long = "backing", value_name = "BACKING")]
    backing: Option<String>,
    /// Format of the target's backing file.
    #[arg(short = 'F', long = "backing-format", value_name = "BACKING_FMT")]
    backing_format: Option<String>,
    /// Allow out-of-order writes to formats that allocate as they go (raw targets always take
    /// them; compressed targets are always written in guest order, whatever -W says).
    #[arg(short = 'W', long = "oob-writes")]
    out_of_order: bool,
    /// Copy offloading: data goes from file to file inside the kernel (copy_file_range: a
    /// reflink where the filesystem has them) wherever both sides are plain data in files,
    /// raw to raw say; zeroes in the data are copied, not detected. Not with -c or -S.
    #[arg(short = 'C', long = "copy-range-offloading")]
    copy_range: bool,
    /// Copy what can be read: sectors that cannot be read become zeroes in the target, with a
    /// warning each (none with -q), instead of failing the conversion.
    #[arg(long = "salvage")]
    salvage: bool,
    /// Rate limit: at most RATE bytes written per second (size suffixes allowed; 0 is none).
    #[arg(
        short = 'r',
        long = "rate",
        value_name = "RATE",
        allow_hyphen_values = true
    )]
    rate: Option<String>,
    /// Parallelism: worker threads that read, detect zeroes and compress (1 to 16; default: the
    /// number of cores).
    #[arg(short = 'm', long = "parallel", value_name = "NUM")]
    parallel: Option<String>,
    /// Cache mode for the target: `none` and `directsync` bypass the page cache (O_DIRECT),
    /// the others write through it; the target is flushed at the end whatever the mode.
    /// Default: around the page cache, but for compressed output.
    #[arg(
        short = 't',
        long = "target-cache",
        alias = "output-cache",
        value_name = "CACHE"
    )]
    cache: Option<String>,
    /// Cache mode for the sources: `none` and `directsync` read around the page cache.
    #[arg(short = 'T', long = "source-cache", value_name = "SRC_CACHE")]
    src_cache: Option<String>,
    /// OVA sources: which disk of the appliance to convert (0-based; default the first).
    #[arg(long = "disk", value_name = "N")]
    disk: Option<usize>,
    /// Open the sources even if another process uses them (accepted for compatibility).
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// `--object secret,...`, and `--image-opts` for the sources.
    #[command(flatten)]
    pub(crate) secret_args: SecretArgs,
    /// The source names are option lists, as with --image-opts (qemu-img 10's name for it).
    #[arg(long = "source-image-opts")]
    source_image_opts: bool,
    /// The target name is an option list too (driver=FMT,file.filename=PATH,
    /// encrypt.key-secret=ID): with -n, an existing encrypted image can be written. Not with -O.
    #[arg(long = "target-image-opts")]
    target_image_opts: bool,
    /// Copy the source's persistent dirty bitmaps into the target (qcow2 to qcow2; one source).
    #[arg(long = "bitmaps")]
    bitmaps: bool,
    /// With --bitmaps: skip inconsistent bitmaps, with a warning, rather than fail.
    #[arg(long = "skip-broken-bitmaps")]
    skip_broken_bitmaps: bool,
    /// Source images, then the target.
    #[arg(num_args = 0..)]
    files: Vec<String>,
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
    /// The size of a new target's backing file: past it, the target reads as zeroes anyway.
    target_backing_end: Option<u64>,
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
    let n = crate::units::cvtnum("buffer size for sparse output", s, INT64_MAX)?;
    if n % 512 != 0 || n > MAX_SPARSE {
        return Err(bad());
    }
    Ok(n)
}

/// `-l`'s argument, as qemu reads it: an option list when it starts with `snapshot.`
/// (`snapshot.id=ID`, `snapshot.name=NAME`, or both: the snapshot must have both), anything
/// else a bare ID or name.
///
/// # Errors
/// An option list with other keys, or with neither.
pub fn parse_snapshot(s: &str) -> CliResult<SnapshotRef> {
    if !s.starts_with("snapshot.") {
        return Ok(SnapshotRef::IdOrName(s.to_owned()));
    }
    let (mut id, mut name) = (None, None);
    for (k, v) in imgblock::options::split_opts(s)? {
        match k.as_str() {
            "snapshot.id" => id = Some(v),
            "snapshot.name" => name = Some(v),
            _ => return Err(Failure::new(format!("Invalid parameter '{k}'"))),
        }
    }
    match (id, name) {
        (Some(id), Some(name)) => Ok(SnapshotRef::Both { id, name }),
        (Some(id), None) => Ok(SnapshotRef::Id(id)),
        (None, Some(name)) => Ok(SnapshotRef::Name(name)),
        (None, None) => Err(Failure::new("Failed to load snapshot: Can't find snapshot")),
    }
}

/// `-m`, with qemu's messages; without it, one compression worker per core.
fn parse_parallel(s: Option<&str>) -> CliResult<usize> {
    let Some(s) = s else {
        return Ok(std::thread::available_parallelism().map_or(1, usize::from));
    };
    let n: usize = s
        .parse()
        .map_err(|_| Failure::new(format!("Invalid number of coroutines specified: '{s}'.")))?;
    if !(1..=MAX_PARALLEL).contains(&n) {
        return Err(Failure::new(format!(
            "Invalid number of coroutines specified. Must be between 1 and {MAX_PARALLEL}."
        )));
    }
    Ok(n)
}

/// Runs `img convert`.
///
/// # Errors
/// Bad options, unreadable sources, or a target that cannot be created or written.
pub fn run(args: &ConvertArgs) -> CliResult<i32> {
    let rate = RateLimit::parse(args.rate.as_deref())?;
    let out_format = parse_output_format(args.output_format.as_deref().unwrap_or("raw"))?;
    let mut opts = CreateOptions::default();
    for o in &args.options {
        crate::createopts::add_option_list(&mut opts, o)?;
    }
    // The checks come in qemu-img's order, so that a command line with several faults gets
    // its message.
    if args.skip_broken_bitmaps && !args.bitmaps {
        return Err(Failure::new(
            "Use of --skip-broken-bitmaps requires --bitmaps",
        ));
    }
    if args.copy_range && args.compress {
        return Err(Failure::new(
            "Cannot enable copy offloading when -c is used",
        ));
    }
    if args.copy_range && args.sparse.is_some() {
        return Err(Failure::new(
            "Cannot enable copy offloading when -S is used",
        ));
    }
    if args.copy_range && args.salvage {
        return Err(Failure::new("Cannot use copy offloading in salvaging mode"));
    }
    if args.no_create && !args.options.is_empty() {
        return Err(Failure::new(
            "-o has no effect when skipping image creation",
        ));
    }
    if args.target_image_opts && !args.no_create {
        return Err(Failure::new("--target-image-opts requires use of -n flag"));
    }
    if args.target_is_zero && !args.no_create {
        return Err(Failure::new("--target-is-zero requires use of -n flag"));
    }
    if wants_help(&opts.opts) {
        console::print(&help_text(out_format, !args.files.is_empty()));
        return Ok(0);
    }
    let (dst, srcs) = match args.files.split_last() {
        Some((dst, srcs)) if !srcs.is_empty() => (dst, srcs),
        _ => return Err(Failure::new("Must specify image file name")),
    };
    // Copy offloading hands data ranges to the kernel as they are (no zero detection, as in
    // qemu-img); ranges the source maps as zeroes or holes are still skipped, not copied.
    let sparse = parse_sparse(args.sparse.as_deref())?;
    let workers = parse_parallel(args.parallel.as_deref())?;
    parse_cache(args.cache.as_deref(), "cache")?;
    parse_cache(args.src_cache.as_deref(), "source cache")?;
    let sources = open_sources(args, srcs)?;
    if args.bitmaps {
        check_bitmaps(&sources, args.skip_broken_bitmaps)?;
    }
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
    if args.target_is_zero && target_has_backing {
        // qemu-img says so and then exits 0 having written nothing; img fails.
        return Err(Failure::new(
            "Cannot use --target-is-zero when the destination image has a backing file",
        ));
    }
    // qemu asks for the backing format only of an image it creates (-n leaves the target's
    // header as it is).
    if target_has_backing && opts.backing_fmt.is_none() && !args.no_create {
        return Err(Failure::new(
            "Use of backing file requires explicit backing format",
        ));
    }
    if target_has_backing && srcs.len() > 1 {
        return Err(Failure::new(
            "Having a backing file for the target makes no sense when concatenating multiple \
             input images",
        ));
    }
    args.secret_args.fill(&mut opts)?;
    if args.compress {
        check_compression(out_format, &opts)?;
    }
    if !args.no_create && crate::create::legacy_aes(&opts) {
        console::eprint(&format!("{}\n", crate::create::LEGACY_AES_WARNING));
    }
    // qemu-img writes through the page cache unless -t says otherwise. img goes around it by
    // default: a copy writes its output once, in large aligned pieces, and never reads it back,
    // so caching it only takes memory from everyone else, and filling fresh cache pages costs
    // more than the write on some hosts. Compressed output is the exception (below).
    let direct = args.cache.is_none() || is_direct(args.cache.as_deref());
    let target = if args.no_create {
        open_existing_target(args, dst, out_format, total, direct)?
    } else {
        opts.size = Some(total);
        create_target(Path::new(dst), out_format, &opts, direct)?
    };
    if args.bitmaps && !target.driver().supports_bitmaps() {
        return Err(Failure::new(format!(
            "Format driver '{}' does not support bitmaps",
            target.format().name()
        )));
    }
    // The disk writes while the copy goes on, rather than all at the final flush.
    target.set_write_behind(true);
    let min_sparse = usize::try_from(sparse / 512).unwrap_or(8);
    let plan = Plan {
        min_sparse,
        alignment: u64::try_from(pow2floor(min_sparse)).unwrap_or(1).max(1),
        // A fresh luks payload decrypts to noise: its zeroes must be written. With -n the
        // target reads as zeroes only when --target-is-zero says so; -S 0 writes them anyway.
        zero_init: min_sparse != 0
            && (args.target_is_zero
                || (!args.no_create && !target_has_backing && target.driver().has_zero_init())),
        target_has_backing,
        target_backing_end: target
            .backing()
            .filter(|_| target_has_backing && !args.no_create)
            .map(Image::size),
    };
    let progress = Progress::new(&args.progress, args.quiet, total);
    let sparse = Sparse {
        min_sparse: plan.min_sparse,
        alignment: plan.alignment,
        zero_init: plan.zero_init,
    };
    let compressing = args.compress || target.driver().always_compressed();
    if compressing && args.cache.is_none() {
        // Compressed clusters are small and unaligned: the page cache gathers them.
        target.set_direct(false);
    }
    let mode = if compressing {
        // Like qemu, after the target is made: a format without a cluster size (flat vmdk)
        // cannot take whole compressed clusters.
        let cluster = target
            .driver()
            .cluster_size()
            .ok_or_else(|| Failure::new("invalid cluster size"))?;
        Mode::Compressed {
            cluster: usize::try_from(cluster)
                .map_err(|_| Failure::new("Cluster size too large"))?,
            // Over a backing file, what the source's top layer leaves to it is not copied.
            planned: target_has_backing,
        }
    } else {
        // A raw target's layout does not depend on the order of writes; other formats allocate
        // in write order, so they are written in guest order unless -W allows otherwise.
        Mode::Plain {
            in_order: !args.out_of_order && target.format() != Format::Raw,
            offload: args.copy_range,
        }
    };
    // A compressing worker also waits for its reads and for the writer: by default one more
    // worker than there are cores keeps every core compressing meanwhile.
    let workers = match mode {
        Mode::Compressed { .. } if args.parallel.is_none() => workers + 1,
        _ => workers,
    };
    crate::pipeline::copy(
        &sources,
        &target,
        sparse,
        mode,
        crate::pipeline::Settings {
            workers,
            rate: rate.as_ref(),
            salvage: args.salvage,
            quiet: args.quiet,
        },
        &progress,
        &|src, offset, len, at| {
            next_range(src, offset, len, at, &plan).or_else(|f| {
                // qemu-img --salvage copies a range whose status is unreadable as data, a
                // sector at a time.
                if args.salvage {
                    Ok((Action::Copy, len.min(512)))
                } else {
                    Err(f)
                }
            })
        },
    )?;
    if let (true, Some(src)) = (args.bitmaps, sources.first()) {
        copy_bitmaps(src, &target, args.skip_broken_bitmaps)?;
    }
    target
        .flush()
        .map_err(|e| Failure::new(format!("Error while flushing {dst}: {e}")))?;
    progress.finish();
    Ok(0)
}

/// `--bitmaps`, before anything is created: one source, able to hold bitmaps, and (unless
/// they are to be skipped) none of them inconsistent. qemu walks the bitmaps newest first, so
/// the last inconsistent one is named.
fn check_bitmaps(sources: &[Image], skip_broken: bool) -> CliResult<()> {
    let [src] = sources else {
        return Err(Failure::new(
            "Copying bitmaps only possible with single source",
        ));
    };
    if !src.driver().supports_bitmaps() {
        return Err(Failure::new("Source lacks bitmap support"));
    }
    if skip_broken {
        return Ok(());
    }
    match src.driver().bitmap_list().iter().rev().find(|b| b.in_use) {
        Some(b) => Err(Failure::new(format!(
            "Cannot copy inconsistent bitmap '{}'\n\
             Try --skip-broken-bitmaps, or use 'img bitmap --remove' to delete it",
            b.name
        ))),
        None => Ok(()),
    }
}

/// `--bitmaps`, after the data: each source bitmap made in the target with its name,
/// granularity and enabled state, and its bits merged in.
///
/// qemu walks the source's bitmaps newest first and stops at the first it cannot create (a
/// name the target has already, with -n); those it made end up after the target's own, in
/// the source's order. So here: the warnings for skipped ones and the failure come in that
/// order, and the bitmaps are made in the source's.
fn copy_bitmaps(src: &Image, target: &Image, skip_broken: bool) -> CliResult<()> {
    let mut todo = Vec::new();
    for b in src.driver().bitmap_list().into_iter().rev() {
        if skip_broken && b.in_use {
            console::eprint(&format!(
                "img: warning: Skipping inconsistent bitmap '{}'\n",
                b.name
            ));
            continue;
        }
        todo.push(b);
    }
    let existing = target.driver().bitmap_list();
    let clash = todo
        .iter()
        .position(|b| existing.iter().any(|e| e.name == b.name));
    let reason = |e: &imgblock::Error| match e {
        imgblock::Error::Bitmap { source, .. } => source.to_string(),
        imgblock::Error::Qcow2 { source, .. } => source.to_string(),
        other => other.to_string(),
    };
    for b in todo[..clash.unwrap_or(todo.len())].iter().rev() {
        let name = &b.name;
        target
            .driver()
            .bitmap_add(name, Some(b.granularity), b.enabled)
            .map_err(|e| Failure::new(format!("Failed to create bitmap {name}: {}", reason(&e))))?;
        let merged = src
            .driver()
            .bitmap_read(name)
            .and_then(|bits| target.driver().bitmap_merge(name, &bits));
        if let Err(e) = merged {
            let _ = target.driver().bitmap_remove(name);
            return Err(Failure::new(format!(
                "Failed to populate bitmap {name}: {}",
                reason(&e)
            )));
        }
    }
    match clash.and_then(|i| todo.get(i)) {
        Some(b) => Err(Failure::new(format!(
            "Failed to create bitmap {0}: Bitmap already exists: {0}",
            b.name
        ))),
        None => Ok(()),
    }
}

/// Opens the sources read-only, at the `-l` snapshot if one is given.
fn open_sources(args: &ConvertArgs, srcs: &[String]) -> CliResult<Vec<Image>> {
    let snapshot = args.snapshot.as_deref().map(parse_snapshot).transpose()?;
    if snapshot.is_some() && srcs.len() > 1 {
        return Err(Failure::new(
            "No support for concatenating multiple snapshot",
        ));
    }
    let format = parse_format(args.format.as_deref())?;
    if args.disk.is_some() && srcs.len() > 1 {
        return Err(Failure::new("--disk needs a single OVA source"));
    }
    let mut secret_args = args.secret_args.clone();
    secret_args.image_opts |= args.source_image_opts;
    srcs.iter()
        .map(|s| {
            let spec = secret_args.resolve(s, format)?;
            let req = OpenRequest {
                format: spec.format,
                snapshot: snapshot.as_ref(),
                force_share: args.force_share,
                direct: is_direct(args.src_cache.as_deref()),
                secrets: Some(&spec.secrets),
                ..OpenRequest::default()
            };
            open_source(&spec.path, &req, args.disk)
        })
        .collect()
}

/// Creates the target and opens it for writing (with its backing chain, for copy-on-write).
fn create_target(
    path: &Path,
    format: Format,
    opts: &CreateOptions,
    direct: bool,
) -> CliResult<Image> {
    imgblock::create(path, format, opts).map_err(|e| {
        let file = path.display().to_string();
        let f = crate::create::create_failure(&file, format, e);
        // convert says which conversion failed, after the file's name, as qemu-img does.
        match f.message.strip_prefix(&format!("{file}: ")) {
            Some(why) => Failure::new(format!(
                "{file}: error while converting {}: {why}",
                format.name()
            ))
            .with_code(f.code),
            None => f,
        }
    })?;
    let secrets = crate::secrets::for_new_image(opts)?;
    let req = OpenRequest {
        format: Some(format),
        writable: true,
        direct,
        secrets: Some(&secrets),
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

/// `-n`: the target must exist and be large enough. With `--target-image-opts` its name is an
/// option list giving the format (probed when it does not) and the secrets of its chain.
fn open_existing_target(
    args: &ConvertArgs,
    dst: &str,
    format: Format,
    total: u64,
    direct: bool,
) -> CliResult<Image> {
    let spec = if args.target_image_opts {
        if args.output_format.is_some() {
            return Err(Failure::new(
                "--image-opts and --format are mutually exclusive",
            ));
        }
        args.secret_args.resolve_opts(dst, None)?
    } else {
        args.secret_args.resolve_file(dst, Some(format))
    };
    let req = OpenRequest {
        format: spec.format,
        writable: true,
        direct,
        secrets: Some(&spec.secrets),
        ..OpenRequest::default()
    };
    let img = open_image(&spec.path, &req)?;
    if img.size() < total {
        return Err(Failure::new("output file is smaller than input file"));
    }
    Ok(img)
}

/// What to do with the range block status describes, qemu-img's `convert_iteration_sectors`.
fn action_for(st: &BlockStatus, plan: &Plan) -> Action {
    if st.zero {
        zero_action(plan)
    } else if st.data || !plan.target_has_backing {
        Action::Copy
    } else {
        Action::Skip
    }
}

/// What to do with a range that reads as zeroes: with -S 0 everything is written as data.
fn zero_action(plan: &Plan) -> Action {
    if plan.min_sparse == 0 {
        Action::Copy
    } else {
        Action::Zero
    }
}

/// The status of the next range of `src` at `offset` (`at` in the target).
///
/// With a target backing file only what the source holds above its own backing counts: what
/// the source leaves to its backing file (even past that file's end, as in qemu), the target's
/// backing file is taken to hold. Where the source has no backing file, what it leaves
/// unallocated reads as zeroes, and those must be written over the target's backing file, except
/// past the end of a new target's backing file, where the target reads as zeroes already.
fn next_range(
    src: &Image,
    offset: u64,
    len: u64,
    at: u64,
    plan: &Plan,
) -> CliResult<(Action, u64)> {
    if !plan.target_has_backing {
        let st = src.block_status(offset, len)?;
        return Ok((action_for(&st, plan), st.len.clamp(1, len)));
    }
    let (past_backing, len) = match plan.target_backing_end {
        Some(end) if at >= end => (true, len),
        Some(end) => (false, len.min(end - at)),
        None => (false, len),
    };
    let (here, n) = src.is_allocated_here(offset, len)?;
    let n = if here {
        let st = src.block_status(offset, n)?;
        if !st.zero {
            return Ok((action_for(&st, plan), st.len.clamp(1, n)));
        }
        st.len.clamp(1, n)
    } else {
        if src.backing().is_some() {
            return Ok((Action::Skip, n));
        }
        n
    };
    // The range reads as zeroes.
    let action = if past_backing {
        Action::Skip
    } else {
        zero_action(plan)
    };
    Ok((action, n))
}

/// Refuses `-c` before anything is created, as qemu-img does: for a format without compressed
/// writes, and with encryption or preallocation asked for.
fn check_compression(format: Format, opts: &CreateOptions) -> CliResult<()> {
    if !format.can_write_compressed() {
        return Err(Failure::new(
            "Compression not supported for this file format",
        ));
    }
    let encryption = opts
        .get("encryption")
        .is_some_and(|v| imgblock::options::parse_bool("encryption", v).unwrap_or(false));
    if encryption || opts.get("encrypt.format").is_some() {
        return Err(Failure::new(
            "Compression and encryption not supported at the same time",
        ));
    }
    if opts.get("preallocation").is_some_and(|p| p != "off") {
        return Err(Failure::new(
            "Compression and preallocation not supported at the same time",
        ));
    }
    Ok(())
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
        let p = |s: &str| parse_snapshot(s).unwrap();
        assert_eq!(p("snapshot.name=snap1"), SnapshotRef::Name("snap1".into()));
        assert_eq!(p("snap1"), SnapshotRef::IdOrName("snap1".into()));
        assert_eq!(p("snapshot.id=1"), SnapshotRef::Id("1".into()));
        assert_eq!(
            p("snapshot.id=1,snapshot.name=a"),
            SnapshotRef::Both {
                id: "1".into(),
                name: "a".into()
            }
        );
        // Not an option list: a bare name, commas and all.
        assert_eq!(p("foo=bar,x"), SnapshotRef::IdOrName("foo=bar,x".into()));
        assert!(parse_snapshot("snapshot.foo=bar").is_err());
    }

    #[test]
    fn parse_parallel_limits_match_qemu() {
        assert_eq!(parse_parallel(Some("4")).unwrap(), 4);
        assert!(parse_parallel(None).unwrap() >= 1);
        assert_eq!(
            parse_parallel(Some("0")).unwrap_err().message,
            "Invalid number of coroutines specified. Must be between 1 and 16."
        );
        assert_eq!(
            parse_parallel(Some("x")).unwrap_err().message,
            "Invalid number of coroutines specified: 'x'."
        );
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
            target_backing_end: None,
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
