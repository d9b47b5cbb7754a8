//! `img create`: a new image, announced with qemu-img's `Formatting ...` line.

use std::os::unix::fs::FileTypeExt;
use std::path::Path;

use clap::Args;
use imgblock::{CreateOptions, Format, OpenOptions};

use crate::console;
use crate::createopts::{formatting_line, help_text, library_options, wants_help};
use crate::failure::{open_failure, strerror, CliResult, Failure};
use crate::open::parse_output_format;
use crate::secrets::SecretArgs;
use crate::units::cvtnum;
use imgblock::crypto::Secrets;

/// The largest size qemu accepts (`INT64_MAX`).
const MAX_IMAGE_SIZE: u64 = i64::MAX as u64;

/// `img create -f FMT [-o OPTS] [-b BACKING [-F FMT]] [-u] [-q] FILE [SIZE]`
#[derive(Debug, Args)]
pub struct CreateArgs {
    /// Image format (default raw).
    #[arg(short = 'f', long = "format", value_name = "FMT")]
    format: Option<String>,
    /// Format options, key=value[,key=value...]; `-o help` lists them. May be repeated.
    #[arg(short = 'o', long = "options", value_name = "OPTIONS")]
    options: Vec<String>,
    /// Backing file.
    #[arg(short = 'b', long = "backing", value_name = "BACKING")]
    backing: Option<String>,
    /// Backing file format.
    #[arg(short = 'F', long = "backing-format", value_name = "BACKING_FMT")]
    backing_format: Option<String>,
    /// Do not open the backing file (the size must then be given).
    #[arg(short = 'u', long = "backing-unsafe")]
    unsafe_backing: bool,
    /// Quiet: print nothing but errors.
    #[arg(short = 'q', long = "quiet")]
    quiet: bool,
    /// The image file.
    filename: Option<String>,
    /// Virtual size, with optional k, M, G, T, P, E suffix.
    #[arg(allow_hyphen_values = true)]
    size: Option<String>,
    /// `--object secret,...` for `-o encrypt.key-secret=ID`.
    #[command(flatten)]
    pub(crate) secret_args: SecretArgs,
}

/// Runs `img create`.
///
/// # Errors
/// Bad options, an unreadable backing file, or a failed create.
pub fn run(args: &CreateArgs) -> CliResult<i32> {
    let format = parse_output_format(args.format.as_deref().unwrap_or("raw"))
        .map_err(|f| in_file_opt(&args.filename, f))?;
    let mut opts = CreateOptions::default();
    for o in &args.options {
        crate::createopts::check_option_list(o)?;
        opts.parse_opts(o)
            .map_err(|e| in_file_opt(&args.filename, e.into()))?;
    }
    if wants_help(&opts.opts) {
        console::print(&help_text(format, args.filename.is_some()));
        return Ok(0);
    }
    let file = args
        .filename
        .as_deref()
        .ok_or_else(|| Failure::new("Expecting image file name"))?;
    let in_file = |msg: String| Failure::new(format!("{file}: {msg}"));
    if let Some(s) = &args.size {
        if opts.size.is_some() {
            return Err(in_file("The image size must be specified only once".into()));
        }
        opts.size = Some(parse_image_size(s)?);
    }
    // Given with -o, the backing options are refused by the option parser of a format without
    // them; given with -b and -F, by qemu-img itself, in other words.
    let in_o = (opts.backing_file.is_some(), opts.backing_fmt.is_some());
    if args.backing.is_some() {
        opts.backing_file.clone_from(&args.backing);
    }
    if args.backing_format.is_some() {
        opts.backing_fmt.clone_from(&args.backing_format);
    }
    opts.unsafe_backing = args.unsafe_backing;
    // A backing format without a backing file is each format's to judge: qcow2 refuses it,
    // vmdk takes `vmdk`, the formats without backing files do not know the option.
    validate_keys(format, &opts, in_o).map_err(in_file)?;
    // qemu's option parser checks each value's type (booleans, sizes, numbers) before anything
    // is printed or made.
    for (k, v) in &opts.opts {
        crate::createopts::check_value(k, v).map_err(in_file)?;
    }
    if let Some(backing) = opts.backing_file.clone() {
        let size = check_backing(Path::new(file), &backing, &opts).map_err(in_file)?;
        opts.size = opts.size.or(size);
    }
    if opts.size.is_none() {
        return Err(in_file("Image creation needs a size parameter".into()));
    }
    args.secret_args.fill(&mut opts)?;
    if legacy_aes(&opts) {
        console::eprint(&format!("{LEGACY_AES_WARNING}\n"));
    }
    if !args.quiet {
        console::print(&format!("{}\n", formatting_line(file, format, &opts)));
    }
    imgblock::create(Path::new(file), format, &opts)
        .map_err(|e| create_failure(file, format, e))?;
    Ok(0)
}

/// A failed [`imgblock::create`] of `file` as `format`, naming the file once: before the
/// library's words where they do not name it themselves.
pub fn create_failure(file: &str, format: Format, e: imgblock::Error) -> Failure {
    match e {
        imgblock::Error::InvalidOption(m) => Failure::new(format!("{file}: {m}")),
        // A file the filesystem cannot make that long: qemu-img's words, whichever file it was.
        imgblock::Error::Io { source, .. } if source.kind() == std::io::ErrorKind::FileTooLarge => {
            // qemu-img suggests larger clusters for the formats that have a cluster_size.
            let hint = if library_options(format)
                .iter()
                .any(|(k, _)| *k == "cluster_size")
            {
                " (try using a larger cluster size)"
            } else {
                ""
            };
            Failure::new(format!(
                "{file}: The image size is too large for file format '{}'{hint}",
                format.name()
            ))
        }
        // A block device is not made, only written: the device driver's words alone.
        imgblock::Error::Io { path, source }
            if path == Path::new(file)
                && std::fs::metadata(&path).is_ok_and(|m| m.file_type().is_block_device()) =>
        {
            Failure::new(format!("{file}: {}", crate::failure::strerror(&source)))
        }
        // The image file itself could not be made: qemu's file driver's words.
        imgblock::Error::Io { path, source } if path == Path::new(file) => Failure::new(format!(
            "{file}: Could not create '{file}': {}",
            crate::failure::strerror(&source)
        )),
        // qemu names the file it could not lock: the target itself, or a vmdk overlay's
        // parent, whose CID it reads, held by a writer.
        e @ imgblock::Error::Locked { .. } => Failure::new(format!("{file}: {e}")),
        other => Failure::from(other),
    }
}

/// Printed when an image is created with legacy qcow AES encryption.
pub const LEGACY_AES_WARNING: &str =
    "img: warning: encrypt.format=aes (legacy qcow AES-128-CBC) is insecure and deprecated: \
     its key is the passphrase itself and its IVs are predictable; use encrypt.format=luks";

/// Whether the options ask for legacy AES encryption (`qcow` is its QAPI name).
pub fn legacy_aes(opts: &CreateOptions) -> bool {
    matches!(opts.get("encrypt.format"), Some("aes" | "qcow"))
        || opts.get("encryption") == Some("on")
}

/// Prefixes a failure with the image's name, when there is one, as qemu's create does.
fn in_file_opt(file: &Option<String>, f: Failure) -> Failure {
    match file {
        Some(name) => Failure::new(format!("{name}: {f}")),
        None => f,
    }
}

/// The SIZE argument, with qemu's two messages for text that is not a size and for one too big.
fn parse_image_size(s: &str) -> CliResult<u64> {
    cvtnum("image size", s, MAX_IMAGE_SIZE)
}

/// Refuses options the format does not list, as qemu does before it prints anything.
fn validate_keys(format: Format, opts: &CreateOptions, in_o: (bool, bool)) -> Result<(), String> {
    let known = library_options(format);
    // The file protocol's options go with every format.
    let knows =
        |k: &str| known.iter().any(|(n, _)| *n == k) || k == "nocow" || k == "extent_size_hint";
    if let Some((k, _)) = opts.opts.iter().find(|(k, _)| !knows(k)) {
        return Err(format!("Invalid parameter '{k}'"));
    }
    if in_o.0 && !knows("backing_file") {
        return Err("Invalid parameter 'backing_file'".into());
    }
    if in_o.1 && !knows("backing_fmt") {
        return Err("Invalid parameter 'backing_fmt'".into());
    }
    if opts.backing_file.is_some() && !knows("backing_file") {
        return Err(format!(
            "Backing file not supported for file format '{}'",
            format.name()
        ));
    }
    if opts.backing_fmt.is_some() && !knows("backing_fmt") {
        return Err(format!(
            "Backing file format not supported for file format '{}'",
            format.name()
        ));
    }
    Ok(())
}

/// qemu-img 10 requires a backing format and, unless `-u`, opens the backing file; returns its
/// size, the default for the new image.
fn check_backing(file: &Path, backing: &str, opts: &CreateOptions) -> Result<Option<u64>, String> {
    let missing_format = "Backing file specified without backing format".to_owned();
    if opts.unsafe_backing {
        return if opts.backing_fmt.is_some() {
            Ok(None)
        } else {
            Err(missing_format)
        };
    }
    let path = imgblock::image::resolve_backing(file, backing);
    let Some(fmt) = &opts.backing_fmt else {
        // qemu tells what it would have detected, to help write the -F option.
        if let Ok(img) = imgblock::Image::open_with_secrets(
            &path,
            &OpenOptions {
                no_backing: true,
                force_share: true,
                ..OpenOptions::default()
            },
            &Secrets::for_metadata(),
        ) {
            return Err(format!(
                "{missing_format}\nDetected format of {}.",
                img.format()
            ));
        }
        return Err(missing_format);
    };
    let format = Some(
        fmt.parse::<Format>()
            .map_err(|_| format!("Unknown backing file format '{fmt}'"))?,
    );
    // Like qemu (BDRV_O_NO_IO), an encrypted backing file needs no secret to give its size;
    // and it is opened sharing everything (force-share), so a process writing to it does not
    // stop an overlay from being made.
    let img = imgblock::Image::open_with_secrets(
        &path,
        &OpenOptions {
            format,
            no_backing: true,
            force_share: true,
            ..OpenOptions::default()
        },
        &Secrets::for_metadata(),
    )
    .map_err(|e| {
        let reason = match &e {
            imgblock::Error::Io { source, .. } => {
                format!("Could not open '{backing}': {}", strerror(source))
            }
            other => open_failure(&path, other).message,
        };
        format!("{reason}\nCould not open backing image.")
    })?;
    Ok(Some(img.size()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_image_size_negative_is_range_error() {
        let e = parse_image_size("-1").unwrap_err();
        assert_eq!(
            e.message,
            "Invalid image size specified. Must be between 0 and 9223372036854775807."
        );
    }

    #[test]
    fn parse_image_size_suffix_scales() {
        assert_eq!(parse_image_size("1M").unwrap(), 1 << 20);
        assert_eq!(parse_image_size("0").unwrap(), 0);
    }

    #[test]
    fn validate_keys_unknown_raw_option_is_refused() {
        let mut o = CreateOptions::new(1);
        o.set("foo", "bar");
        assert_eq!(
            validate_keys(Format::Raw, &o, (false, false)).unwrap_err(),
            "Invalid parameter 'foo'"
        );
    }

    #[test]
    fn validate_keys_raw_backing_is_refused() {
        let mut o = CreateOptions::new(1);
        o.backing_file = Some("b".into());
        assert_eq!(
            validate_keys(Format::Raw, &o, (false, false)).unwrap_err(),
            "Backing file not supported for file format 'raw'"
        );
    }
}
