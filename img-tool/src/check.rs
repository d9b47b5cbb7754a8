//! `img check`: metadata consistency, with qemu-img's report and exit statuses.

use clap::Args;
use imgblock::{CheckReport, Image, Repair};
use serde_json::{json, Map, Value};

use crate::cache::{is_direct, parse_cache};
use crate::console;
use crate::failure::{CliResult, Failure};
use crate::open::{open_source, parse_format, OpenRequest};
use crate::output::OutputFormat;
use crate::progress::{Progress, ProgressArgs};
use crate::qjson;

/// Exit status: the check found corruptions.
pub const EXIT_CORRUPT: i32 = 2;
/// Exit status: the check found only leaked clusters.
pub const EXIT_LEAKS: i32 = 3;
/// Exit status: the format has no consistency checks.
pub const EXIT_NO_CHECKS: i32 = 63;

/// `img check [-f FMT] [-T CACHE] [--output=human|json] [-r leaks|all] [-q] FILE`
#[derive(Debug, Args)]
pub struct CheckArgs {
    /// `--object secret,...` and `--image-opts`.
    #[command(flatten)]
    pub(crate) secret_args: crate::secrets::SecretArgs,
    /// Image format (probed when not given).
    #[arg(short = 'f', long = "format", value_name = "FMT")]
    format: Option<String>,
    /// Output format: human or json.
    #[arg(long = "output", value_name = "FMT", default_value = "human")]
    output: String,
    /// Cache mode for reading the image: `none` and `directsync` read around the page cache.
    #[arg(short = 'T', long = "cache", value_name = "CACHE")]
    cache: Option<String>,
    /// Repair: leaks, or all.
    #[arg(short = 'r', long = "repair", value_name = "leaks|all")]
    repair: Option<String>,
    /// Quiet: print nothing but errors.
    #[arg(short = 'q', long = "quiet")]
    quiet: bool,
    /// `-p` and `--progress=json`.
    #[command(flatten)]
    progress: ProgressArgs,
    /// Open the image even if another process uses it (accepted for compatibility).
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// The image file.
    filename: String,
}

fn parse_repair(s: Option<&str>) -> CliResult<Repair> {
    match s {
        None => Ok(Repair::None),
        Some("leaks") => Ok(Repair::Leaks),
        Some("all") => Ok(Repair::All),
        Some(other) => Err(Failure::new(format!(
            "--repair (-r) expects 'leaks' or 'all' not '{other}'\nTry 'img check --help' for more info"
        ))),
    }
}

/// Runs `img check`.
///
/// # Errors
/// When the image cannot be opened or checked; the failure carries qemu-img's status.
pub fn run(args: &CheckArgs) -> CliResult<i32> {
    parse_cache(args.cache.as_deref(), "source cache")?;
    let output = OutputFormat::parse(&args.output, "check")?;
    let repair = parse_repair(args.repair.as_deref())?;
    let spec = args
        .secret_args
        .resolve(&args.filename, parse_format(args.format.as_deref())?)?;
    let req = OpenRequest {
        format: spec.format,
        writable: repair != Repair::None,
        repair: repair != Repair::None,
        direct: is_direct(args.cache.as_deref()),
        secrets: Some(&spec.secrets),
        force_share: args.force_share,
        ..OpenRequest::default()
    };
    let img = open_source(&spec.path, &req, None)?;
    // The check is one library call: progress goes from nothing to the whole image.
    let progress = Progress::new(
        &args.progress,
        args.quiet || output == OutputFormat::Json,
        img.size(),
    );
    let mut report = run_check(&img, repair)?;
    if let Some(why) = &report.failed {
        // qemu-img prints no report for a check that stopped short.
        return Err(Failure::new(format!("Check failed: {why}")));
    }
    let fixed = (report.corruptions_fixed, report.leaks_fixed);
    if fixed != (0, 0) {
        if output == OutputFormat::Human && !args.quiet {
            console::print(&format!(
                "The following inconsistencies were found and repaired:\n\n    {} leaked clusters\n    {} corruptions\n\n\
                 Double checking the fixed image now...\n",
                fixed.1, fixed.0
            ));
        }
        img.flush()?;
        report = run_check(&img, Repair::None)?;
        (report.corruptions_fixed, report.leaks_fixed) = fixed;
    }
    progress.finish();
    let name = args.filename.as_str();
    if !args.quiet {
        match output {
            OutputFormat::Human => console::print(&human_report(&report)),
            OutputFormat::Json => console::print(&format!(
                "{}\n",
                qjson::to_string(&json_report(&report, name, img.format().name()))
            )),
        }
    }
    if report.check_errors > 0 {
        return Err(Failure::new("Check failed"));
    }
    Ok(exit_status(&report))
}

/// Runs the library check, printing its per-problem lines on stderr as qemu's drivers do.
fn run_check(img: &Image, repair: Repair) -> CliResult<CheckReport> {
    let report = img.check(repair).map_err(|e| match e {
        imgblock::Error::Unsupported { what, .. } if what.contains("does not support checks") => {
            Failure::new("This image format does not support checks").with_code(EXIT_NO_CHECKS)
        }
        other => Failure::new(format!("Check failed: {other}")),
    })?;
    for m in &report.messages {
        console::eprint(&format!("{m}\n"));
    }
    let omitted = report.messages.omitted();
    if omitted > 0 {
        // The library keeps a bounded number of lines; qemu-img would print every one.
        console::eprint(&format!("... and {omitted} more messages like these\n"));
    }
    let mut report = report;
    if img.format() != imgblock::Format::Qcow2 {
        // qemu's vdi and vmdk checks count problems only; the cluster figures are qcow2's.
        report.allocated_clusters = 0;
        report.total_clusters = 0;
        report.fragmented_clusters = 0;
        report.compressed_clusters = 0;
        report.image_end_offset = None;
    }
    Ok(report)
}

/// qemu-img's status: 2 for corruptions, 3 for leaks only, 0 when clean.
fn exit_status(r: &CheckReport) -> i32 {
    if r.corruptions > 0 {
        EXIT_CORRUPT
    } else if r.leaks > 0 {
        EXIT_LEAKS
    } else {
        0
    }
}

/// The text qemu-img's `dump_human_image_check` prints.
fn human_report(r: &CheckReport) -> String {
    let mut out = String::new();
    if r.corruptions == 0 && r.leaks == 0 && r.check_errors == 0 {
        out.push_str("No errors were found on the image.\n");
    } else {
        if r.corruptions > 0 {
            out.push_str(&format!(
                "\n{} errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.\n",
                r.corruptions
            ));
        }
        if r.leaks > 0 {
            out.push_str(&format!(
                "\n{} leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.\n",
                r.leaks
            ));
        }
        if r.check_errors > 0 {
            out.push_str(&format!(
                "\n{} internal errors have occurred during the check.\n",
                r.check_errors
            ));
        }
    }
    if r.total_clusters != 0 && r.allocated_clusters != 0 {
        #[allow(clippy::cast_precision_loss)]
        let pct = |a: u64, b: u64| a as f64 * 100.0 / b as f64;
        out.push_str(&format!(
            "{}/{} = {:.2}% allocated, {:.2}% fragmented, {:.2}% compressed clusters\n",
            r.allocated_clusters,
            r.total_clusters,
            pct(r.allocated_clusters, r.total_clusters),
            pct(r.fragmented_clusters, r.allocated_clusters),
            pct(r.compressed_clusters, r.allocated_clusters)
        ));
    }
    if let Some(end) = r.image_end_offset.filter(|&e| e != 0) {
        out.push_str(&format!("Image end offset: {end}\n"));
    }
    out
}

/// qemu-img's `ImageCheck`: the counters appear only when non-zero, except `check-errors`.
fn json_report(r: &CheckReport, filename: &str, format: &str) -> Value {
    let mut m = Map::new();
    m.insert("filename".into(), json!(filename));
    m.insert("format".into(), json!(format));
    m.insert("check-errors".into(), json!(r.check_errors));
    let optional = [
        ("image-end-offset", r.image_end_offset.unwrap_or(0)),
        ("corruptions", r.corruptions),
        ("leaks", r.leaks),
        ("corruptions-fixed", r.corruptions_fixed),
        ("leaks-fixed", r.leaks_fixed),
        ("total-clusters", r.total_clusters),
        ("allocated-clusters", r.allocated_clusters),
        ("fragmented-clusters", r.fragmented_clusters),
        ("compressed-clusters", r.compressed_clusters),
    ];
    for (k, v) in optional.into_iter().filter(|(_, v)| *v != 0) {
        m.insert(k.into(), json!(v));
    }
    Value::Object(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn clean() -> CheckReport {
        CheckReport {
            allocated_clusters: 2,
            total_clusters: 16,
            image_end_offset: Some(720_896),
            ..CheckReport::default()
        }
    }

    #[test]
    fn human_report_clean_matches_qemu() {
        assert_eq!(
            human_report(&clean()),
            "No errors were found on the image.\n2/16 = 12.50% allocated, 0.00% fragmented, 0.00% compressed clusters\n\
             Image end offset: 720896\n"
        );
    }

    #[test]
    fn json_report_clean_matches_qemu_keys_and_order() {
        let v = json_report(&clean(), "q.qcow2", "qcow2");
        assert_eq!(
            qjson::to_string(&v),
            "{\n    \"image-end-offset\": 720896,\n    \"total-clusters\": 16,\n    \"check-errors\": 0,\n    \
             \"allocated-clusters\": 2,\n    \"filename\": \"q.qcow2\",\n    \"format\": \"qcow2\"\n}"
        );
    }

    #[test]
    fn exit_status_corruption_beats_leaks() {
        let r = CheckReport {
            corruptions: 1,
            leaks: 4,
            ..CheckReport::default()
        };
        assert_eq!(exit_status(&r), EXIT_CORRUPT);
        let r = CheckReport {
            leaks: 4,
            ..CheckReport::default()
        };
        assert_eq!(exit_status(&r), EXIT_LEAKS);
        assert_eq!(exit_status(&clean()), 0);
    }

    #[test]
    fn human_report_leaks_has_leading_blank_line() {
        let r = CheckReport {
            leaks: 3,
            ..CheckReport::default()
        };
        assert!(human_report(&r).starts_with("\n3 leaked clusters were found on the image.\n"));
    }
}
