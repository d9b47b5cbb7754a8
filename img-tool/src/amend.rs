//! `img amend`: change options of an existing image (qcow2: compat, lazy_refcounts,
//! refcount_bits, size; backing_file and backing_fmt only when they repeat the current ones).

use clap::Args;
use imgblock::{CreateOptions, Format, FormatSpecific};

use crate::cache::parse_cache;
use crate::console;
use crate::createopts::wants_help;
use crate::failure::{CliResult, Failure};
use crate::open::{open_image, parse_format, OpenRequest};
use crate::progress::{Progress, ProgressArgs};

/// qcow2's amendable options as qemu 10's `-o help` lists them (qemu's `qcow2_amend_opts`; the
/// encryption ones are listed there too, though `img` cannot amend them).
const QCOW2_AMEND_HELP: &str = "\
Amend options for 'qcow2':
  backing_file=<str>     - File name of a base image
  backing_fmt=<str>      - Image format of the base image
  compat=<str>           - Compatibility level (v2 [0.10] or v3 [1.1])
  data_file=<str>        - File name of an external data file
  data_file_raw=<bool (on/off)> - The external data file must stay valid as a raw image
  encrypt.iter-time=<num> - Time to spend in PBKDF in milliseconds
  encrypt.keyslot=<num>  - Select a single keyslot to modify explicitly
  encrypt.new-secret=<str> - New secret to set in the matching keyslots. Empty string to erase
  encrypt.old-secret=<str> - Select all keyslots that match this password
  encrypt.state=<str>    - Select new state of affected keyslots (active/inactive)
  lazy_refcounts=<bool (on/off)> - Postpone refcount updates
  refcount_bits=<num>    - Width of a reference count entry in bits
  size=<size>            - Virtual disk size
";

/// luks's amendable options as qemu 10's `-o help` lists them.
const LUKS_AMEND_HELP: &str = "\
Amend options for 'luks':
  iter-time=<num>        - Time to spend in PBKDF in milliseconds
  keyslot=<num>          - Select a single keyslot to modify explicitly
  new-secret=<str>       - New secret to set in the matching keyslots. Empty string to erase
  old-secret=<str>       - Select all keyslots that match this password
  state=<str>            - Select new state of affected keyslots (active/inactive)
";

/// Prints a format's amend options (`-o help`), or refuses a format without amend.
fn amend_help(format: Format) -> CliResult<i32> {
    match format {
        Format::Qcow2 => console::print(QCOW2_AMEND_HELP),
        Format::Luks => console::print(LUKS_AMEND_HELP),
        other => {
            return Err(Failure::new(format!(
                "Format driver '{other}' does not support option amendment"
            )))
        }
    }
    Ok(0)
}

/// `img amend [-f FMT] [-t CACHE] -o OPTS [-p] [-q] [--force] FILE`
#[derive(Debug, Args)]
pub struct AmendArgs {
    /// `--object secret,...` (for `encrypt.new-secret=ID` and the like) and `--image-opts`.
    #[command(flatten)]
    pub(crate) secret_args: crate::secrets::SecretArgs,
    /// Image format (probed when not given).
    #[arg(short = 'f', long = "format", value_name = "FMT")]
    format: Option<String>,
    /// Cache mode (accepted for compatibility).
    #[arg(short = 't', long = "cache", value_name = "CACHE")]
    cache: Option<String>,
    /// Options to change, key=value[,key=value...]; `-o help` lists them. May be repeated.
    #[arg(short = 'o', long = "options", value_name = "OPTIONS")]
    options: Vec<String>,
    /// `-p` and `--progress=json`.
    #[command(flatten)]
    progress: ProgressArgs,
    /// Quiet: print nothing but errors.
    #[arg(short = 'q', long = "quiet")]
    quiet: bool,
    /// Allow changes qemu-img guards with --force (accepted for compatibility).
    #[arg(long = "force")]
    force: bool,
    /// The image file.
    filename: Option<String>,
}

/// The compat level asked for: `Some(true)` for v3, `Some(false)` for v2.
fn wants_v3(opts: &CreateOptions) -> CliResult<Option<bool>> {
    match opts.get("compat") {
        Some("1.1" | "v3") => Ok(Some(true)),
        Some("0.10" | "v2") => Ok(Some(false)),
        None => Ok(None),
        Some(other) => Err(Failure::new(format!("Unknown compatibility level {other}"))),
    }
}

/// Refuses, in qemu's words and before the image is touched, compat levels and refcount widths
/// qemu refuses.
fn check_options(opts: &CreateOptions) -> CliResult<()> {
    let v3 = wants_v3(opts)?;
    if let Some(b) = opts.get("refcount_bits") {
        let bits: u64 = b
            .parse()
            .map_err(|_| Failure::new("Parameter 'refcount_bits' expects a number"))?;
        if !bits.is_power_of_two() || bits > 64 {
            return Err(Failure::new(
                "Refcount width must be a power of two and may not exceed 64 bits",
            ));
        }
        if v3 == Some(false) && bits != 16 {
            return Err(Failure::new(
                "Refcount widths other than 16 bits require compatibility level 1.1 or above \
                 (use compat=1.1 or greater)",
            ));
        }
    }
    Ok(())
}

/// The amendments in the order qemu makes them: a v2 image is upgraded before its refcount
/// width changes (v2 headers cannot record a width), so that pair is split in two steps.
fn steps(opts: &CreateOptions, is_v2: bool) -> CliResult<Vec<CreateOptions>> {
    let upgrade = is_v2 && wants_v3(opts)? == Some(true);
    if !upgrade || opts.get("refcount_bits").is_none() {
        return Ok(vec![opts.clone()]);
    }
    let mut first = opts.clone();
    first.opts.retain(|(k, _)| k != "refcount_bits");
    let second = CreateOptions {
        opts: opts
            .opts
            .iter()
            .filter(|(k, _)| k == "refcount_bits")
            .cloned()
            .collect(),
        ..CreateOptions::default()
    };
    Ok(vec![first, second])
}

/// Runs `img amend`.
///
/// # Errors
/// No options, an image that cannot be opened, a format without amend, or an option the
/// format refuses.
pub fn run(args: &AmendArgs) -> CliResult<i32> {
    parse_cache(args.cache.as_deref(), "cache")?;
    if args.options.is_empty() {
        return Err(Failure::new(
            "Must specify options (-o)\nTry 'img amend --help' for more info",
        ));
    }
    let mut opts = CreateOptions::default();
    for o in &args.options {
        crate::createopts::add_option_list(&mut opts, o)?;
    }
    let format = parse_format(args.format.as_deref())?;
    let help = wants_help(&opts.opts);
    // As qemu-img: with -f, the help needs no image (the file is not even opened).
    if let (true, Some(f)) = (help, format) {
        return amend_help(f);
    }
    let Some(file) = args.filename.as_deref() else {
        return Err(Failure::new("Expecting one image file name"));
    };
    let spec = args.secret_args.resolve(file, format)?;
    let req = OpenRequest {
        format: spec.format,
        // qemu opens the image for writing even for `-o help`.
        writable: true,
        secrets: Some(&spec.secrets),
        ..OpenRequest::default()
    };
    let mut img = open_image(&spec.path, &req)?;
    args.secret_args.fill(&mut opts)?;
    opts.force = args.force;
    if !matches!(img.format(), Format::Qcow2 | Format::Luks) {
        return Err(Failure::new(format!(
            "Format driver '{}' does not support option amendment",
            img.format()
        )));
    }
    if help {
        return amend_help(img.format());
    }
    check_options(&opts)?;
    let is_v2 = matches!(img.driver().specific(), FormatSpecific::Qcow2(q) if q.compat == "0.10");
    let steps = steps(&opts, is_v2)?;
    let progress = Progress::new(&args.progress, args.quiet, steps.len() as u64);
    for step in &steps {
        img.amend(step).map_err(|e| match e {
            imgblock::Error::InvalidOption(m) => Failure::new(m),
            imgblock::Error::Unsupported { what, .. } => Failure::new(what),
            other => Failure::from(other),
        })?;
        progress.inc(1);
    }
    progress.finish();
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(s: &str) -> CreateOptions {
        let mut o = CreateOptions::default();
        o.parse_opts(s).unwrap();
        o
    }

    #[test]
    fn check_options_refusals_are_qemu_messages() {
        let msg = |s: &str| check_options(&opts(s)).unwrap_err().message;
        assert_eq!(msg("compat=2"), "Unknown compatibility level 2");
        assert_eq!(
            msg("refcount_bits=x"),
            "Parameter 'refcount_bits' expects a number"
        );
        assert!(msg("refcount_bits=3").starts_with("Refcount width must be a power of two"));
        assert!(msg("compat=0.10,refcount_bits=8").starts_with("Refcount widths other than 16"));
        assert!(check_options(&opts("compat=1.1,refcount_bits=8")).is_ok());
    }

    #[test]
    fn steps_split_upgrade_from_refcount_change() {
        let o = opts("compat=1.1,refcount_bits=8,lazy_refcounts=on");
        let s = steps(&o, true).unwrap();
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].get("refcount_bits"), None);
        assert_eq!(s[0].get("lazy_refcounts"), Some("on"));
        assert_eq!(s[1].get("refcount_bits"), Some("8"));
        assert_eq!(steps(&o, false).unwrap().len(), 1);
    }
}
