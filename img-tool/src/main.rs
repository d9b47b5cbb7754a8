//! `img`: a qemu-img compatible disk-image tool over the `imgblock` library.
//!
//! Each subcommand lives in its own module: parse (clap) → validated options → library calls →
//! human or JSON output in qemu-img's exact format.
#![forbid(unsafe_code)]

mod amend;
mod bench;
mod cache;
mod check;
mod commit;
mod compare;
mod convert;
mod create;
mod createopts;
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

Errors are printed to stderr as `img: <message>`.";

/// A qemu-img compatible disk-image tool.
///
/// An option given twice takes its last value, as getopt-based qemu-img does
/// (`-f qcow2 -f raw` is raw); options that qemu-img accumulates (`-o`) or counts (snapshot's
/// actions) still do.
#[derive(Debug, Parser)]
#[command(
    name = "img",
    version,
    about,
    after_help = EXIT_CODES,
    args_override_self = true
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
    /// Compute the size a new image would need.
    Measure(measure::MeasureArgs),
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
        Command::Measure(a) => measure::run(a),
        Command::Bench(a) => bench::run(a),
    }
}

fn exit_code(status: i32) -> ExitCode {
    ExitCode::from(u8::try_from(status).unwrap_or(1))
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let code = if e.use_stderr() { EXIT_FAILURE } else { 0 };
            // clap's own text; like qemu-img, usage errors exit with status 1.
            let _ = e.print();
            return exit_code(code);
        }
    };
    match dispatch(&cli.command) {
        Ok(status) => exit_code(status),
        Err(f) => {
            eprintln!("img: {f}");
            exit_code(f.code)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_valid() {
        Cli::command().debug_assert();
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
