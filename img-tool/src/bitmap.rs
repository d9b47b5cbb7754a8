//! `img bitmap`: add, remove, clear, enable, disable and merge an image's persistent dirty
//! bitmaps, with qemu-img's options, order of checks and messages.
//!
//! Several actions may be given; they apply in the order given, each written to the image
//! before the next, so an action that fails leaves the earlier ones done (as in qemu-img).
//! Where qemu names a block node in a message (`#block123`), `img` names the file.

use clap::{Arg, ArgAction, ArgMatches, Args, FromArgMatches};
use imgblock::bitmaps::BitmapError;
use imgblock::{Format, Image};

use crate::failure::{CliResult, Failure};
use crate::open::{open_image, OpenRequest};
use crate::secrets::SecretArgs;
use crate::units::cvtnum;

/// One action, in command-line order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// `--add`: create the bitmap, enabled, all clean.
    Add,
    /// `--remove`: delete it.
    Remove,
    /// `--clear`: make every bit clean.
    Clear,
    /// `--enable`: record writes from now on.
    Enable,
    /// `--disable`: stop recording writes.
    Disable,
    /// `--merge SOURCE`: OR the bitmap SOURCE (of the `-b` image, or this one) into it.
    Merge(String),
}

impl Action {
    /// qemu's name for the action in its messages.
    fn name(&self) -> &'static str {
        match self {
            Action::Add => "add",
            Action::Remove => "remove",
            Action::Clear => "clear",
            Action::Enable => "enable",
            Action::Disable => "disable",
            Action::Merge(_) => "merge",
        }
    }
}

/// The flag actions: (argument id and long name, help).
const FLAGS: &[(&str, &str)] = &[
    ("add", "Create BITMAP, enabled: it records future writes"),
    ("remove", "Remove BITMAP"),
    ("clear", "Clear BITMAP: every bit clean"),
    ("enable", "Start recording writes in BITMAP"),
    ("disable", "Stop recording writes in BITMAP"),
];

/// The options besides the actions.
#[derive(Debug, Args)]
pub struct BitmapOpts {
    /// `--object secret,...` and `--image-opts`.
    #[command(flatten)]
    pub(crate) secret_args: SecretArgs,
    /// Image format (probed when not given). qemu-img 10 takes no `--format` here.
    #[arg(short = 'f', value_name = "FMT")]
    format: Option<String>,
    /// Granularity of a bitmap made by --add (size suffixes allowed; default: the cluster
    /// size, kept in 4k..64k).
    #[arg(
        short = 'g',
        long = "granularity",
        value_name = "SIZE",
        allow_hyphen_values = true
    )]
    granularity: Option<String>,
    /// The image the --merge sources are in (default: FILENAME itself).
    #[arg(short = 'b', long = "source-file", value_name = "SRC_FILENAME")]
    source_file: Option<String>,
    /// Format of the -b image (probed when not given).
    #[arg(short = 'F', long = "source-format", value_name = "SRC_FMT")]
    source_format: Option<String>,
    /// FILENAME, then BITMAP.
    #[arg(num_args = 0.., value_name = "FILENAME BITMAP")]
    operands: Vec<String>,
}

/// `img bitmap (--merge SOURCE | --add | --remove | --clear | --enable | --disable)...
/// [-b SOURCE_FILE [-F SOURCE_FMT]] [-g GRANULARITY] [--object OBJDEF] [--image-opts | -f FMT]
/// FILENAME BITMAP`
#[derive(Debug)]
pub struct BitmapArgs {
    /// The actions, in command-line order.
    actions: Vec<Action>,
    pub(crate) opts: BitmapOpts,
}

impl FromArgMatches for BitmapArgs {
    fn from_arg_matches(m: &ArgMatches) -> Result<Self, clap::Error> {
        let opts = BitmapOpts::from_arg_matches(m)?;
        let mut indexed: Vec<(usize, Action)> = Vec::new();
        for (id, _) in FLAGS {
            let action = match *id {
                "add" => Action::Add,
                "remove" => Action::Remove,
                "clear" => Action::Clear,
                "enable" => Action::Enable,
                _ => Action::Disable,
            };
            if let Some(ix) = m.indices_of(id) {
                indexed.extend(ix.map(|i| (i, action.clone())));
            }
        }
        if let (Some(ix), Some(vals)) = (m.indices_of("merge"), m.get_many::<String>("merge")) {
            indexed.extend(ix.zip(vals).map(|(i, v)| (i, Action::Merge(v.clone()))));
        }
        indexed.sort_by_key(|(i, _)| *i);
        Ok(BitmapArgs {
            actions: indexed.into_iter().map(|(_, a)| a).collect(),
            opts,
        })
    }

    fn update_from_arg_matches(&mut self, m: &ArgMatches) -> Result<(), clap::Error> {
        *self = Self::from_arg_matches(m)?;
        Ok(())
    }
}

impl Args for BitmapArgs {
    fn augment_args(cmd: clap::Command) -> clap::Command {
        let mut cmd = BitmapOpts::augment_args(cmd);
        for (id, help) in FLAGS {
            // Each occurrence is a value, so that its position orders it among the others.
            cmd = cmd.arg(
                Arg::new(*id)
                    .long(*id)
                    .help(*help)
                    .action(ArgAction::Append)
                    .num_args(0)
                    .default_missing_value(""),
            );
        }
        cmd.arg(
            Arg::new("merge")
                .long("merge")
                .value_name("SOURCE")
                .help("Merge the bitmap SOURCE (of the -b image, or FILENAME) into BITMAP")
                .action(ArgAction::Append),
        )
    }

    fn augment_args_for_update(cmd: clap::Command) -> clap::Command {
        Self::augment_args(cmd)
    }
}

/// `-g`, as qemu takes it: 0 means the default, and the value is cut to 32 bits on its way to
/// the bitmap code (so 4G is refused, as in qemu).
fn parse_granularity(s: Option<&str>) -> CliResult<Option<u64>> {
    let Some(s) = s else {
        return Ok(None);
    };
    let g = cvtnum("granularity", s, i64::MAX.unsigned_abs())?;
    Ok((g != 0).then_some(g & 0xffff_ffff))
}

/// The checks qemu-img makes before opening anything, in its order.
fn validate(args: &BitmapArgs, granularity: Option<u64>) -> CliResult<(String, String)> {
    let o = &args.opts;
    if args.actions.is_empty() {
        return Err(Failure::new(
            "Need at least one of --add, --remove, --clear, --enable, --disable, or --merge",
        ));
    }
    if granularity.is_some() && !args.actions.contains(&Action::Add) {
        return Err(Failure::new("granularity only supported with --add"));
    }
    if o.source_format.is_some() && o.source_file.is_none() {
        return Err(Failure::new("-F only supported with -b"));
    }
    if o.source_file.is_some() && !args.actions.iter().any(|a| matches!(a, Action::Merge(_))) {
        return Err(Failure::new(
            "Merge bitmap source file only supported with --merge",
        ));
    }
    match o.operands.as_slice() {
        [file, bitmap] => Ok((file.clone(), bitmap.clone())),
        _ => Err(Failure::new("Expecting filename and bitmap name")),
    }
}

/// A `-f`/`-F` name, refused as qemu refuses it when it opens the image.
fn driver_format(name: Option<&str>, file: &str) -> CliResult<Option<Format>> {
    name.map(|n| {
        n.parse::<Format>()
            .map_err(|_| Failure::new(format!("Could not open '{file}': Unknown driver '{n}'")))
    })
    .transpose()
}

/// Why an action failed, in qemu's words (`file` stands for qemu's node name).
fn reason(e: &imgblock::Error, bitmap: &str, file: &str) -> String {
    match e {
        imgblock::Error::Bitmap {
            source: BitmapError::Unsupported,
            ..
        } => format!("Can't store persistent bitmaps to {file}: Operation not supported"),
        imgblock::Error::Bitmap { source, .. } if source.refuses_persistence() => {
            format!("Can't make bitmap '{bitmap}' persistent in '{file}': {source}")
        }
        imgblock::Error::Bitmap { source, .. } => source.to_string(),
        imgblock::Error::Qcow2 { source, .. } => source.to_string(),
        other => other.to_string(),
    }
}

/// `--merge SOURCE` into `bitmap`: the target is looked up and checked first, then the source
/// (qemu's order of errors).
fn merge(img: &Image, src: &Image, source: &str, bitmap: &str) -> imgblock::Result<()> {
    let berr = |e| imgblock::Error::Bitmap {
        path: img.path().to_owned(),
        source: e,
    };
    let target = img
        .driver()
        .bitmap_list()
        .into_iter()
        .find(|b| b.name == bitmap)
        .ok_or_else(|| berr(BitmapError::NotFound(bitmap.to_owned())))?;
    if target.in_use {
        return Err(berr(BitmapError::Inconsistent(bitmap.to_owned())));
    }
    let bits = src.driver().bitmap_read(source)?;
    img.driver().bitmap_merge(bitmap, &bits)
}

/// Runs `img bitmap`.
///
/// # Errors
/// Bad arguments, an image that cannot be opened, or the first action that fails.
pub fn run(args: &BitmapArgs) -> CliResult<i32> {
    let o = &args.opts;
    let granularity = parse_granularity(o.granularity.as_deref())?;
    let (file, bitmap) = validate(args, granularity)?;
    if o.secret_args.image_opts && o.format.is_some() {
        return Err(Failure::new(
            "--image-opts and --format are mutually exclusive",
        ));
    }
    let spec = o
        .secret_args
        .resolve(&file, driver_format(o.format.as_deref(), &file)?)?;
    let req = OpenRequest {
        format: spec.format,
        writable: true,
        // Bitmaps concern this image alone, as in qemu-img.
        no_backing: true,
        secrets: Some(&spec.secrets),
        ..OpenRequest::default()
    };
    let img = open_image(&spec.path, &req)?;
    let src = match &o.source_file {
        Some(b) => {
            let req = OpenRequest {
                format: driver_format(o.source_format.as_deref(), b)?,
                ..OpenRequest::default()
            };
            Some(open_image(std::path::Path::new(b), &req)?)
        }
        None => None,
    };
    let name = spec.path.display().to_string();
    for action in &args.actions {
        let d = img.driver();
        let done = match action {
            Action::Add => d.bitmap_add(&bitmap, granularity, true),
            Action::Remove => d.bitmap_remove(&bitmap),
            Action::Clear => d.bitmap_clear(&bitmap),
            Action::Enable => d.bitmap_set_enabled(&bitmap, true),
            Action::Disable => d.bitmap_set_enabled(&bitmap, false),
            Action::Merge(source) => merge(&img, src.as_ref().unwrap_or(&img), source, &bitmap),
        };
        done.map_err(|e| {
            Failure::new(format!(
                "Operation {} on bitmap {bitmap} failed: {}",
                action.name(),
                reason(&e, &bitmap, &name)
            ))
        })?;
    }
    img.flush()?;
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct T {
        #[command(flatten)]
        a: BitmapArgs,
    }

    fn parse(v: &[&str]) -> BitmapArgs {
        T::try_parse_from(std::iter::once("t").chain(v.iter().copied()))
            .unwrap()
            .a
    }

    #[test]
    fn actions_keep_command_line_order() {
        let a = parse(&[
            "--disable",
            "x.qcow2",
            "--merge",
            "s",
            "--add",
            "b",
            "--enable",
            "--merge=t",
            "--disable",
        ]);
        assert_eq!(
            a.actions,
            vec![
                Action::Disable,
                Action::Merge("s".into()),
                Action::Add,
                Action::Enable,
                Action::Merge("t".into()),
                Action::Disable
            ]
        );
        assert_eq!(a.opts.operands, vec!["x.qcow2", "b"]);
    }

    #[test]
    fn validate_checks_in_qemus_order() {
        let msg = |v: &[&str]| {
            let a = parse(v);
            let g = parse_granularity(a.opts.granularity.as_deref()).unwrap();
            validate(&a, g).unwrap_err().message
        };
        assert!(msg(&["-g", "1k", "x", "b"]).starts_with("Need at least one of --add"));
        assert_eq!(
            msg(&["-g", "1k", "-F", "raw", "--remove", "x"]),
            "granularity only supported with --add"
        );
        assert_eq!(
            msg(&["-F", "raw", "--add", "x", "b"]),
            "-F only supported with -b"
        );
        assert_eq!(
            msg(&["-b", "s", "--add", "x", "b"]),
            "Merge bitmap source file only supported with --merge"
        );
        assert_eq!(
            msg(&["-g", "0", "--remove", "x"]),
            "Expecting filename and bitmap name"
        );
        assert_eq!(
            msg(&["--add", "x", "b", "c"]),
            "Expecting filename and bitmap name"
        );
    }

    #[test]
    fn granularity_is_cut_to_32_bits_like_qemu() {
        assert_eq!(parse_granularity(Some("64k")).unwrap(), Some(65536));
        assert_eq!(parse_granularity(Some("0")).unwrap(), None);
        assert_eq!(parse_granularity(Some("4G")).unwrap(), Some(0));
        assert_eq!(
            parse_granularity(Some("abc")).unwrap_err().message,
            "Invalid granularity specified: 'abc'."
        );
        assert_eq!(
            parse_granularity(Some("-1")).unwrap_err().message,
            "Invalid granularity specified. Must be between 0 and 9223372036854775807."
        );
    }
}
