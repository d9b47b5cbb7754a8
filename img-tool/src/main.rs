//! `img`: a qemu-img compatible disk-image tool over the `imgblock` library.
//!
//! Each subcommand lives in its own module: parse (clap) → validated options → library calls →
//! human or JSON output in qemu-img's exact format.
#![forbid(unsafe_code)]

mod amend;
mod bench;
mod bitmap;
mod cache;
mod check;
mod commit;
mod compare;
mod console;
mod convert;
mod create;
mod createopts;
mod dd;
mod failure;
mod info;
mod localtime;
mod map;
mod measure;
mod open;
mod output;
mod pipeline;
mod progress;
mod qjson;
mod ratelimit;
mod rebase;
mod resize;
mod secrets;
mod sectors;
mod snapshot;
mod units;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::failure::{CliResult, EXIT_FAILURE};

const EXIT_CODES: &str = "\
Exit status:
  0   success (check: no errors; compare: images identical)
  1   error (bad arguments, unreadable or unwritable image); check: the check could not
      complete; compare: images differ
  2   check: corruptions found; compare: an image could not be opened
  3   check: leaked clusters found (and no corruptions); compare: block status unreadable
  4   compare: data unreadable
  63  check: the image format does not support checks

Errors are printed to stderr as `img: <message>`.

Supported image formats:
    file host_device luks qcow2 raw vdi vmdk";

/// The qemu-img release whose command line img speaks.
const QEMU_IMG_VERSION: &str = "10.0.0";

/// `--version`: img's own, or, when run under the name `qemu-img` (a drop-in link), qemu-img's
/// first line, so that tools that check the version they drive (OpenStack Cinder's
/// `qemu-img version X.Y.Z`) accept it.
fn version_text(program: &std::ffi::OsStr) -> String {
    let own = env!("CARGO_PKG_VERSION");
    let name = std::path::Path::new(program)
        .file_name()
        .and_then(|n| n.to_str());
    if name == Some("qemu-img") {
        format!("qemu-img version {QEMU_IMG_VERSION} (img {own})\n")
    } else {
        format!("img version {own} (qemu-img {QEMU_IMG_VERSION} command line)\n")
    }
}

/// A qemu-img compatible disk-image tool.
///
/// An option given twice takes its last value, as getopt-based qemu-img does
/// (`-f qcow2 -f raw` is raw); options that qemu-img accumulates (`-o`) or counts (snapshot's
/// actions) still do. Like getopt_long, a long option may be shortened to any prefix that
/// names it alone (`--out=json`, `--back`).
#[derive(Debug, Parser)]
#[command(
    name = "img",
    version,
    about,
    after_help = EXIT_CODES,
    args_override_self = true,
    infer_long_args = true
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create a new image.
    Create(create::CreateArgs),
    /// Describe an image.
    Info(info::InfoArgs),
    /// Copy images into a new (or existing) image, possibly in another format.
    Convert(convert::ConvertArgs),
    /// Check an image's metadata for consistency.
    Check(check::CheckArgs),
    /// Compare the contents of two images.
    Compare(compare::CompareArgs),
    /// Show where an image's data lives.
    Map(map::MapArgs),
    /// List, create, apply or delete internal snapshots.
    Snapshot(snapshot::SnapshotArgs),
    /// Change the virtual size of an image.
    Resize(resize::ResizeArgs),
    /// Change the backing file of an image.
    Rebase(rebase::RebaseArgs),
    /// Write an overlay's data into its backing file.
    Commit(commit::CommitArgs),
    /// Change options of an existing image.
    Amend(amend::AmendArgs),
    /// Copy (part of) an image into a new image, dd-style: bs=, count=, skip=, if=, of=.
    Dd(dd::DdArgs),
    /// Compute the size a new image would need.
    Measure(measure::MeasureArgs),
    /// Add, remove, clear, enable, disable or merge persistent dirty bitmaps.
    Bitmap(bitmap::BitmapArgs),
    /// Run a simple I/O benchmark: COUNT reads or writes of BUFFER_SIZE bytes, DEPTH at a time.
    Bench(bench::BenchArgs),
}

fn dispatch(cmd: &Command) -> CliResult<i32> {
    match cmd {
        Command::Create(a) => create::run(a),
        Command::Info(a) => info::run(a),
        Command::Convert(a) => convert::run(a),
        Command::Check(a) => check::run(a),
        Command::Compare(a) => compare::run(a),
        Command::Map(a) => map::run(a),
        Command::Snapshot(a) => snapshot::run(a),
        Command::Resize(a) => resize::run(a),
        Command::Rebase(a) => rebase::run(a),
        Command::Commit(a) => commit::run(a),
        Command::Amend(a) => amend::run(a),
        Command::Dd(a) => dd::run(a),
        Command::Measure(a) => measure::run(a),
        Command::Bitmap(a) => bitmap::run(a),
        Command::Bench(a) => bench::run(a),
    }
}

/// The `--object` and `--image-opts` arguments of a subcommand.
fn secret_args(cmd: &Command) -> &secrets::SecretArgs {
    match cmd {
        Command::Create(a) => &a.secret_args,
        Command::Info(a) => &a.secret_args,
        Command::Convert(a) => &a.secret_args,
        Command::Check(a) => &a.secret_args,
        Command::Compare(a) => &a.secret_args,
        Command::Map(a) => &a.secret_args,
        Command::Snapshot(a) => &a.secret_args,
        Command::Resize(a) => &a.secret_args,
        Command::Rebase(a) => &a.secret_args,
        Command::Commit(a) => &a.secret_args,
        Command::Amend(a) => &a.secret_args,
        Command::Dd(a) => &a.secret_args,
        Command::Measure(a) => &a.secret_args,
        Command::Bitmap(a) => &a.opts.secret_args,
        Command::Bench(a) => &a.secret_args,
    }
}

fn exit_code(status: i32) -> ExitCode {
    ExitCode::from(u8::try_from(status).unwrap_or(1))
}

fn main() -> ExitCode {
    imgblock::storage::raise_open_file_limit();
    let raw: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if raw.len() == 2 && (raw[1] == "--version" || raw[1] == "-V") {
        console::print(&version_text(&raw[0]));
        return exit_code(console::finish(0));
    }
    let args = hyphen_values_attached(raw);
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(e) => {
            if e.kind() == clap::error::ErrorKind::MissingRequiredArgument {
                if let Some((cmd, msg)) = missing_operands(std::env::args().skip(1)) {
                    console::eprint(&format!(
                        "img: {msg}\nTry 'img {cmd} --help' for more info\n"
                    ));
                    return exit_code(EXIT_FAILURE);
                }
            }
            if let Some(msg) = getopt_complaint(&e) {
                console::eprint(&msg);
                return exit_code(EXIT_FAILURE);
            }
            let code = if e.use_stderr() { EXIT_FAILURE } else { 0 };
            // clap's own text; like qemu-img, usage errors exit with status 1.
            let _ = e.print();
            return exit_code(code);
        }
    };
    // qemu-img defines every --object as it reads the command line: a bad one fails the
    // command whether or not anything uses it (compare's failures exit 2).
    if let Err(f) = secret_args(&cli.command).secrets() {
        console::eprint(&format!("img: {f}\n"));
        let code = if matches!(cli.command, Command::Compare(_)) {
            2
        } else {
            EXIT_FAILURE
        };
        return exit_code(code);
    }
    let status = match dispatch(&cli.command) {
        Ok(status) => status,
        Err(f) => {
            console::eprint(&format!("img: {f}\n"));
            f.code
        }
    };
    exit_code(console::finish(status))
}

/// Attaches to an option the value that follows it when that value starts with `-`, as
/// getopt takes the next argument whatever it looks like (`snapshot -c -old F` makes a
/// snapshot named `-old`); clap would read it as an option. `-X VALUE` becomes `-XVALUE` and
/// `--name VALUE` `--name=VALUE`, for options that must have a value; nothing changes after a
/// bare `--`.
fn hyphen_values_attached(args: Vec<std::ffi::OsString>) -> Vec<std::ffi::OsString> {
    use clap::CommandFactory;
    use std::ffi::OsString;
    let cli = Cli::command();
    let mut it = args.into_iter().peekable();
    let mut out: Vec<OsString> = it.next().into_iter().collect();
    // Global options come before the subcommand; its options after it.
    let mut sub = None;
    for a in it.by_ref() {
        let name = a
            .to_str()
            .filter(|s| !s.starts_with('-'))
            .map(str::to_owned);
        out.push(a);
        if let Some(n) = name {
            sub = cli.find_subcommand(&n).cloned();
            break;
        }
    }
    let Some(sub) = sub else {
        out.extend(it);
        return out;
    };
    // Whether an option given as `a` (`-X` or `--name`, a long name possibly shortened) must
    // have a value.
    let needs_value = |a: &str| {
        let takes = |arg: &&clap::Arg| {
            arg.get_action().takes_values()
                && !arg.is_require_equals_set()
                && arg.get_num_args().is_none_or(|r| r.min_values() > 0)
        };
        if let Some(long) = a.strip_prefix("--") {
            let matches: Vec<_> = sub
                .get_arguments()
                .filter(|arg| arg.get_long().is_some_and(|l| l.starts_with(long)))
                .collect();
            let exact = matches.iter().find(|arg| arg.get_long() == Some(long));
            match (exact, matches.as_slice()) {
                (Some(arg), _) | (None, [arg]) => takes(arg),
                _ => false,
            }
        } else {
            let mut c = a.chars();
            match (c.next(), c.next(), c.next()) {
                (Some('-'), Some(short), None) => sub
                    .get_arguments()
                    .filter(|arg| arg.get_short() == Some(short))
                    .any(|arg| takes(&arg)),
                _ => false,
            }
        }
    };
    while let Some(a) = it.next() {
        let Some(s) = a.to_str().map(str::to_owned) else {
            out.push(a);
            continue;
        };
        if s == "--" {
            out.push(a);
            out.extend(it);
            break;
        }
        let attach = s.starts_with('-') && !s.contains('=') && needs_value(&s);
        let hyphen_next = it
            .peek()
            .and_then(|v| v.to_str())
            .is_some_and(|v| v.starts_with('-'));
        match it.next_if(|_| attach) {
            Some(v) if hyphen_next => {
                let mut joined = OsString::from(&s);
                if s.starts_with("--") {
                    joined.push("=");
                }
                joined.push(&v);
                out.push(joined);
            }
            // A value clap takes as it is (and not an option of its own).
            Some(v) => out.extend([a, v]),
            None => out.push(a),
        }
    }
    out
}

/// getopt's words for an option the subcommand does not have, as qemu-img prints them:
/// `img SUB: invalid option -- 'x'` or `img SUB: unrecognized option '--xyz'`, then where to
/// look. `None` for every other parse error (clap's text then).
fn getopt_complaint(e: &clap::Error) -> Option<String> {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    if e.kind() != ErrorKind::UnknownArgument {
        return None;
    }
    let Some(ContextValue::String(arg)) = e.get(ContextKind::InvalidArg) else {
        return None;
    };
    let sub = std::env::args().skip(1).find(|a| !a.starts_with('-'))?;
    let what = if arg.starts_with("--") {
        // As given, with any `=value` clap left out.
        let given = std::env::args()
            .find(|a| {
                a.strip_prefix(arg.as_str())
                    .is_some_and(|r| r.starts_with('='))
            })
            .unwrap_or_else(|| arg.clone());
        format!("unrecognized option '{given}'")
    } else if let Some(short) = arg.strip_prefix('-') {
        format!("invalid option -- '{}'", short.chars().next()?)
    } else {
        // A file name too many.
        let alone = match sub.as_str() {
            "measure" => Some("At most one filename argument is allowed."),
            "amend" => Some("Expecting one image file name"),
            _ => None,
        };
        if let Some(msg) = alone {
            return Some(format!("img: {msg}\n"));
        }
        let msg = match sub.as_str() {
            "create" => format!("Unexpected argument: {arg}"),
            "resize" => "Extra argument(s) in command line".to_owned(),
            _ => missing_operands(std::iter::once(sub.clone()))?.1.to_owned(),
        };
        return Some(format!(
            "img: {msg}\nTry 'img {sub} --help' for more info\n"
        ));
    };
    Some(format!(
        "img {sub}: {what}\nTry 'img {sub} --help' for more info\n"
    ))
}

/// qemu-img's words for a command line that lacks its file names (or size), by subcommand:
/// the first argument naming one.
fn missing_operands(args: impl Iterator<Item = String>) -> Option<(String, &'static str)> {
    args.filter(|a| !a.starts_with('-')).find_map(|a| {
        let msg = match a.as_str() {
            "info" | "check" | "map" | "commit" | "rebase" | "snapshot" => {
                "Expecting one image file name"
            }
            "compare" => "Expecting two image file names",
            "resize" => "Expecting image file name and size",
            _ => return None,
        };
        Some((a, msg))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn missing_operands_in_qemu_img_words() {
        let args = |v: &[&str]| {
            v.iter()
                .map(|s| (*s).to_owned())
                .collect::<Vec<_>>()
                .into_iter()
        };
        assert_eq!(
            missing_operands(args(&["snapshot", "-c", "s1"])),
            Some(("snapshot".into(), "Expecting one image file name"))
        );
        assert_eq!(
            missing_operands(args(&["compare", "a.qcow2"])),
            Some(("compare".into(), "Expecting two image file names"))
        );
        assert_eq!(
            missing_operands(args(&["resize", "x.qcow2"])),
            Some(("resize".into(), "Expecting image file name and size"))
        );
        assert_eq!(missing_operands(args(&["bench"])), None);
    }

    #[test]
    fn values_starting_with_a_hyphen_attach_to_their_option() {
        let run = |v: &[&str]| {
            let args = std::iter::once("img")
                .chain(v.iter().copied())
                .map(std::ffi::OsString::from)
                .collect();
            hyphen_values_attached(args)
                .into_iter()
                .skip(1)
                .map(|a| a.into_string().unwrap())
                .collect::<Vec<_>>()
        };
        assert_eq!(
            run(&["snapshot", "-c", "-l", "a.qcow2"]),
            ["snapshot", "-c-l", "a.qcow2"]
        );
        assert_eq!(
            run(&["snapshot", "--cre", "-x", "a.qcow2"]),
            ["snapshot", "--cre=-x", "a.qcow2"]
        );
        // Flags, values without a hyphen, `=` forms and everything after `--` stay as given.
        for v in [
            &["snapshot", "-l", "-U", "a.qcow2"][..],
            &["convert", "-p", "-O", "raw", "a", "b"],
            &["convert", "--progress", "-O", "raw", "a", "b"],
            &["resize", "-f", "raw", "a", "--", "-1M"],
            &["measure", "--size=-1"],
            &["info"],
        ] {
            assert_eq!(run(v), v, "{v:?}");
        }
        assert_eq!(run(&["measure", "--size", "-1"]), ["measure", "--size=-1"]);
    }

    #[test]
    fn cli_definition_is_valid() {
        Cli::command().debug_assert();
    }

    /// qemu-img 10's long option names by subcommand: the ones its parser takes and the ones its
    /// `--help` documents.
    const QEMU_LONG_NAMES: &[(&str, &[&str])] = &[
        (
            "create",
            &[
                "backing",
                "backing-format",
                "backing-unsafe",
                "format",
                "help",
                "object",
                "options",
                "quiet",
            ],
        ),
        (
            "info",
            &[
                "backing-chain",
                "force-share",
                "format",
                "help",
                "image-opts",
                "object",
                "output",
            ],
        ),
        (
            "convert",
            &[
                "bitmaps",
                "skip-broken-bitmaps",
                "salvage",
                "rate",
                "target-is-zero",
                "backing",
                "backing-format",
                "compress",
                "copy-range-offloading",
                "force-share",
                "help",
                "image-opts",
                "no-create",
                "object",
                "oob-writes",
                "options",
                "output-cache",
                "output-format",
                "parallel",
                "progress",
                "quiet",
                "snapshot",
                "source-cache",
                "source-format",
                "source-image-opts",
                "source-snapshot",
                "sparse-size",
                "target-cache",
                "target-format",
                "target-image-opts",
                "target-options",
            ],
        ),
        (
            "check",
            &[
                "cache",
                "force-share",
                "format",
                "help",
                "image-opts",
                "object",
                "output",
                "quiet",
                "repair",
            ],
        ),
        (
            "compare",
            &[
                "cache",
                "a-format",
                "b-format",
                "force-share",
                "help",
                "image-opts",
                "left-format",
                "object",
                "progress",
                "quiet",
                "right-format",
                "strict",
            ],
        ),
        (
            "map",
            &[
                "max-length",
                "start-offset",
                "force-share",
                "format",
                "help",
                "image-opts",
                "object",
                "output",
            ],
        ),
        (
            "snapshot",
            &[
                "apply",
                "create",
                "delete",
                "force-share",
                "format",
                "help",
                "image-opts",
                "list",
                "object",
                "quiet",
            ],
        ),
        (
            "resize",
            &[
                "format",
                "help",
                "image-opts",
                "object",
                "preallocation",
                "quiet",
                "shrink",
            ],
        ),
        (
            "rebase",
            &[
                "compress",
                "backing",
                "backing-cache",
                "backing-format",
                "backing-unsafe",
                "cache",
                "force-share",
                "format",
                "help",
                "image-opts",
                "object",
                "progress",
                "quiet",
            ],
        ),
        (
            "commit",
            &[
                "rate",
                "base",
                "cache",
                "drop",
                "format",
                "help",
                "image-opts",
                "object",
                "progress",
                "quiet",
            ],
        ),
        (
            "amend",
            &[
                "cache",
                "force",
                "format",
                "help",
                "image-opts",
                "object",
                "options",
                "progress",
                "quiet",
            ],
        ),
        (
            "measure",
            &[
                "force-share",
                "format",
                "help",
                "image-opts",
                "object",
                "options",
                "output",
                "size",
                "snapshot",
                "target-format",
            ],
        ),
        (
            "bitmap",
            &[
                "add",
                "clear",
                "disable",
                "enable",
                "granularity",
                "help",
                "image-opts",
                "merge",
                "object",
                "remove",
                "source-file",
                "source-format",
            ],
        ),
        (
            "bench",
            &[
                "aio",
                "buffer-size",
                "cache",
                "count",
                "depth",
                "flush-interval",
                "force-share",
                "format",
                "help",
                "image-opts",
                "native",
                "no-drain",
                "offset",
                "pattern",
                "quiet",
                "step-size",
                "write",
            ],
        ),
    ];

    /// The id of `sub`'s argument whose long name or alias is `name`.
    fn arg_named(sub: &clap::Command, name: &str) -> Option<String> {
        sub.get_arguments()
            .find(|a| {
                a.get_long() == Some(name)
                    || a.get_all_aliases().unwrap_or_default().contains(&name)
            })
            .map(|a| a.get_id().to_string())
    }

    /// Every qemu-img long name is an img option, and every prefix that getopt_long resolves
    /// (it names one option, or is itself a name) resolves to the same option here: img's own
    /// options (`--disk`, `--progress=json`...) make no abbreviation of qemu's ambiguous.
    #[test]
    fn cli_long_option_prefixes_resolve_as_in_qemu() {
        let cli = Cli::command();
        let mut wrong = Vec::new();
        for (name, qemu) in QEMU_LONG_NAMES {
            let sub = cli.find_subcommand(name).expect("subcommand");
            for long in qemu.iter().filter(|l| **l != "help") {
                let id =
                    arg_named(sub, long).unwrap_or_else(|| panic!("img {name} has no --{long}"));
                let arg = sub
                    .get_arguments()
                    .find(|a| a.get_id() == id.as_str())
                    .expect("arg");
                let takes_value = arg.get_action().takes_values()
                    && arg.get_num_args().is_some_and(|n| n.min_values() > 0);
                for end in 1..=long.len() {
                    let prefix = &long[..end];
                    let targets: std::collections::BTreeSet<Option<String>> = qemu
                        .iter()
                        .filter(|q| q.starts_with(prefix))
                        .map(|q| arg_named(sub, q))
                        .collect();
                    // An exact name wins; otherwise the prefix must name one option.
                    let expected = if qemu.contains(&prefix) {
                        arg_named(sub, prefix)
                    } else if targets.len() == 1 {
                        targets.into_iter().next().flatten()
                    } else {
                        continue; // ambiguous for qemu-img too
                    };
                    let expected = expected.expect("qemu's names are img's");
                    let word = if takes_value {
                        format!("--{prefix}=1")
                    } else {
                        format!("--{prefix}")
                    };
                    let m = Cli::command()
                        .ignore_errors(true)
                        .try_get_matches_from(["img", name, &word])
                        .unwrap_or_else(|e| panic!("img {name} {word}: {e}"));
                    let sm = m.subcommand_matches(name).expect("subcommand matches");
                    if sm.value_source(&expected) != Some(clap::parser::ValueSource::CommandLine) {
                        wrong.push(format!("img {name} {word} does not mean {expected}"));
                    }
                }
            }
        }
        assert!(wrong.is_empty(), "{wrong:#?}");
    }

    #[test]
    fn cli_options_may_follow_file_names() {
        let cli = Cli::try_parse_from(["img", "info", "x.raw", "--output=json", "-U"]).unwrap();
        assert!(matches!(cli.command, Command::Info(_)));
    }

    #[test]
    fn cli_resize_takes_negative_relative_size() {
        let cli = Cli::try_parse_from(["img", "resize", "--shrink", "x.qcow2", "-1M"]).unwrap();
        assert!(matches!(cli.command, Command::Resize(_)));
    }

    #[test]
    fn cli_bench_takes_hyphen_values_and_repeats() {
        let cli =
            Cli::try_parse_from(["img", "bench", "-c", "-1", "-c", "5", "-w", "x.raw"]).unwrap();
        assert!(matches!(cli.command, Command::Bench(_)));
    }

    #[test]
    fn cli_convert_takes_several_sources() {
        let cli = Cli::try_parse_from(["img", "convert", "-O", "qcow2", "a", "b", "c"]).unwrap();
        assert!(matches!(cli.command, Command::Convert(_)));
    }
}
