//! `img measure`: how large a new image would be, for a size or for an existing image's data.

use clap::Args;
use imgblock::measure::Measure;
use imgblock::{CreateOptions, Format};
use serde_json::{json, Map, Value};

use crate::console;
use crate::convert::parse_snapshot;
use crate::createopts::library_options;
use crate::failure::{CliResult, Failure};
use crate::open::{open_source, parse_format, parse_output_format, OpenRequest};
use crate::output::OutputFormat;
use crate::qjson;
use crate::secrets::SecretArgs;

/// The largest size qemu accepts (`INT64_MAX`).
const MAX_IMAGE_SIZE: u64 = i64::MAX as u64;
/// File-protocol options qemu accepts for every format.
const PROTOCOL_OPTIONS: [&str; 3] = ["nocow", "preallocation", "extent_size_hint"];

/// `img measure [--output=human|json] [-f FMT | --image-opts] [--object OBJDEF] [-O FMT] [-o OPTS]
/// [-l SNAPSHOT] (--size SIZE | FILE)`
#[derive(Debug, Args)]
pub struct MeasureArgs {
    /// `--object secret,...` (for an encrypted FILE, and for `-o encrypt.key-secret=ID`) and
    /// `--image-opts`.
    #[command(flatten)]
    pub(crate) secret_args: SecretArgs,
    /// Output format: human or json.
    #[arg(long = "output", value_name = "FMT", default_value = "human")]
    output: String,
    /// Format of FILE (probed when not given).
    #[arg(short = 'f', long = "format", value_name = "FMT")]
    format: Option<String>,
    /// Format of the image to measure (default raw).
    #[arg(short = 'O', long = "target-format", value_name = "OUTPUT_FMT")]
    output_format: Option<String>,
    /// Options of the image to measure, key=value[,key=value...]. May be repeated.
    #[arg(short = 'o', long = "options", value_name = "OPTIONS")]
    options: Vec<String>,
    /// Measure this internal snapshot of FILE: snapshot.name=NAME, snapshot.id=ID or NAME.
    #[arg(short = 'l', long = "snapshot", value_name = "SNAPSHOT")]
    snapshot: Option<String>,
    /// Measure an empty image of this size instead of FILE's data.
    #[arg(
        short = 's',
        long = "size",
        value_name = "SIZE",
        allow_hyphen_values = true
    )]
    size: Option<String>,
    /// Open FILE even if another process uses it (accepted for compatibility).
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// The image whose data the new image would hold (or an OVA appliance).
    filename: Option<String>,
}

/// `--size` with qemu's two messages.
fn parse_size(s: &str) -> CliResult<u64> {
    crate::units::cvtnum("image size", s, MAX_IMAGE_SIZE)
}

/// Refuses options the target format does not have, and values that do not fit their option's
/// type, in the order given, with qemu's two lines.
fn validate_options(format: Format, opts: &CreateOptions) -> CliResult<()> {
    let known = library_options(format);
    let given = opts
        .opts
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .chain(opts.backing_file.as_deref().map(|v| ("backing_file", v)))
        .chain(opts.backing_fmt.as_deref().map(|v| ("backing_fmt", v)));
    for (k, v) in given {
        let why = if !known.iter().any(|(n, _)| *n == k) && !PROTOCOL_OPTIONS.contains(&k) {
            Some(format!("Invalid parameter '{k}'"))
        } else {
            crate::createopts::check_value(k, v).err()
        };
        if let Some(why) = why {
            return Err(Failure::new(format!(
                "{why}\nimg: Invalid options for file format '{}'",
                format.name()
            )));
        }
    }
    Ok(())
}

/// Runs `img measure`.
///
/// # Errors
/// Neither or both of `--size` and FILE, bad options, a target format without measurement, or
/// a source that cannot be read.
pub fn run(args: &MeasureArgs) -> CliResult<i32> {
    let output = OutputFormat::parse(&args.output, "measure")?;
    let size = match (&args.size, &args.filename) {
        (Some(_), Some(_)) => {
            return Err(Failure::new(
                "--size N cannot be used together with a filename.",
            ))
        }
        (None, None) => {
            return Err(Failure::new(
                "Either --size N or one filename must be specified.",
            ))
        }
        (Some(s), None) => Some(parse_size(s)?),
        (None, Some(_)) => None,
    };
    let snapshot = args.snapshot.as_deref().map(parse_snapshot).transpose()?;
    let source = match &args.filename {
        Some(f) => {
            let spec = args
                .secret_args
                .resolve(f, parse_format(args.format.as_deref())?)?;
            let req = OpenRequest {
                format: spec.format,
                snapshot: snapshot.as_ref(),
                force_share: args.force_share,
                secrets: Some(&spec.secrets),
                ..OpenRequest::default()
            };
            Some(open_source(&spec.path, &req, None)?)
        }
        None => None,
    };
    let out_format = parse_output_format(args.output_format.as_deref().unwrap_or("raw"))?;
    let mut opts = CreateOptions::default();
    for o in &args.options {
        crate::createopts::check_option_list(o)?;
        opts.parse_opts(o).map_err(|e| {
            Failure::new(format!(
                "{}\nimg: Invalid options for file format '{}'",
                Failure::from(e).message,
                out_format.name()
            ))
        })?;
    }
    validate_options(out_format, &opts)?;
    args.secret_args.fill(&mut opts)?;
    if !matches!(out_format, Format::Raw | Format::Qcow2 | Format::Luks) {
        return Err(Failure::new(format!(
            "Block driver '{out_format}' does not support size measurement"
        )));
    }
    opts.size = size;
    let m =
        imgblock::measure::measure(out_format, &opts, source.as_ref()).map_err(|e| match e {
            imgblock::Error::InvalidOption(m) => Failure::new(m),
            other => Failure::from(other),
        })?;
    match output {
        OutputFormat::Human => console::print(&human(&m)),
        OutputFormat::Json => console::print(&format!("{}\n", qjson::to_string(&json_value(&m)))),
    }
    Ok(0)
}

fn human(m: &Measure) -> String {
    let mut s = format!(
        "required size: {}\nfully allocated size: {}\n",
        m.required, m.fully_allocated
    );
    if let Some(b) = m.bitmaps {
        s.push_str(&format!("bitmaps size: {b}\n"));
    }
    s
}

/// qemu's `BlockMeasureInfo`, keys in QAPI order (qjson prints them in qemu's order).
fn json_value(m: &Measure) -> Value {
    let mut o = Map::new();
    o.insert("required".into(), json!(m.required));
    o.insert("fully-allocated".into(), json!(m.fully_allocated));
    if let Some(b) = m.bitmaps {
        o.insert("bitmaps".into(), json!(b));
    }
    Value::Object(o)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_value_matches_qemu_text() {
        let m = Measure {
            required: 327_680,
            fully_allocated: 1_376_256,
            bitmaps: Some(0),
        };
        assert_eq!(
            qjson::to_string(&json_value(&m)),
            "{\n    \"bitmaps\": 0,\n    \"required\": 327680,\n    \"fully-allocated\": 1376256\n}"
        );
        assert_eq!(
            human(&m),
            "required size: 327680\nfully allocated size: 1376256\nbitmaps size: 0\n"
        );
    }

    #[test]
    fn parse_size_messages_match_qemu() {
        assert_eq!(
            parse_size("abc").unwrap_err().message,
            "Invalid image size specified: 'abc'."
        );
        assert!(parse_size("-1")
            .unwrap_err()
            .message
            .starts_with("Invalid image size specified. Must be between 0"));
        assert_eq!(parse_size("1G").unwrap(), 1 << 30);
    }

    #[test]
    fn validate_options_unknown_key_has_two_lines() {
        let mut o = CreateOptions::default();
        o.parse_opts("foo=bar").unwrap();
        assert_eq!(
            validate_options(Format::Qcow2, &o).unwrap_err().message,
            "Invalid parameter 'foo'\nimg: Invalid options for file format 'qcow2'"
        );
        let mut o = CreateOptions::default();
        o.parse_opts("cluster_size=4k,refcount_bits=1").unwrap();
        assert!(validate_options(Format::Qcow2, &o).is_ok());
    }
}
