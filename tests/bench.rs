//! `img bench` against `qemu-img bench`: the same lines for the same arguments (bar the time),
//! the same errors and exit codes, and write tests that leave exactly the bytes qemu-img's
//! leave, wrap-around included, on raw and qcow2 twins.

mod common;

use common::{Env, Output, MIB};

/// The output with the run time replaced, so that two runs can be compared.
fn untimed(s: &str) -> String {
    s.lines()
        .map(|l| match l.strip_prefix("Run completed in ") {
            Some(rest) if rest.ends_with(" seconds.") => "Run completed in T seconds.".to_owned(),
            _ => l.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Runs `bench ARGS` with qemu-img and `img`, each on its own twin (`{}` in an argument becomes
/// `q` or `i`), and asserts the same exit code, stdout (bar the time) and stderr (with
/// `qemu-img` read as `img`). Returns img's output.
#[track_caller]
fn bench_like_qemu(env: &Env, args: &[&str]) -> Output {
    let argv = |tag: &str| -> Vec<String> {
        std::iter::once("bench".to_owned())
            .chain(args.iter().map(|a| a.replace("{}", tag)))
            .collect()
    };
    let q = argv("q");
    let i = argv("i");
    let qo = env.qemu_img(&q.iter().map(String::as_str).collect::<Vec<_>>());
    let io = env
        .img(&i.iter().map(String::as_str).collect::<Vec<_>>())
        .no_panic();
    assert_eq!(qo.code, io.code, "exit codes differ:{qo}{io}");
    assert_eq!(
        untimed(&qo.stdout),
        untimed(&io.stdout),
        "stdout differs:{qo}{io}"
    );
    let norm = |s: &str, tag: &str| {
        s.replace("qemu-img", "img")
            .replace(&format!("{tag}."), "X.")
    };
    assert_eq!(
        norm(&qo.stderr, "q"),
        norm(&io.stderr, "i"),
        "stderr differs:{qo}{io}"
    );
    io
}

/// Makes `q.FMT` and `i.FMT`, equal images of `size` bytes holding noise in their first half
/// (so that a write test's zeroes show), made by qemu-img.
fn twins(env: &Env, fmt: &str, size: u64) {
    let src = format!("src-{fmt}.raw");
    env.sparse_file(&src, size);
    let half = usize::try_from(size / 2).expect("small image");
    env.write_at(&src, 0, &common::noise(7, half));
    for tag in ["q", "i"] {
        let name = format!("{tag}.{fmt}");
        env.qemu_img(&["convert", "-f", "raw", "-O", fmt, &src, &name])
            .ok();
    }
}

/// The twins hold the same guest data (qemu-img compare) and, for raw, the same bytes.
#[track_caller]
fn twins_equal(env: &Env, fmt: &str) {
    let (q, i) = (format!("q.{fmt}"), format!("i.{fmt}"));
    let out = env.qemu_img(&["compare", "-f", fmt, "-F", fmt, &q, &i]);
    assert_eq!(out.code, Some(0), "img bench wrote other data: {out}");
    if fmt == "raw" {
        env.assert_same_bytes(&q, &i);
    } else {
        let out = env.qemu_img(&["check", &i]);
        assert_eq!(out.code, Some(0), "img left a damaged image: {out}");
    }
}

/// Read tests print qemu-img's two lines, whatever the options (and -q changes nothing: qemu-img
/// bench prints them anyway).
#[test]
fn read_output_matches_qemu() {
    let env = Env::with_qemu();
    twins(&env, "raw", MIB);
    for args in [
        &["-c", "10", "{}.raw"][..],
        &["-c", "10", "-q", "{}.raw"],
        &["-c", "100", "-d", "4", "-f", "raw", "{}.raw"],
        &[
            "-c", "0x20", "-s", "1.5k", "-S", "700k", "-o", "3", "{}.raw",
        ],
        &["-c", "50", "-s", "3", "-S", "0", "{}.raw"],
        &["-c", "16", "-t", "none", "-s", "64k", "{}.raw"],
        &["-c", "16", "-t", "directsync", "-i", "native", "{}.raw"],
        &["-c", "16", "-n", "-t", "none", "{}.raw"],
        &["-c", "16", "-i", "io_uring", "-U", "{}.raw"],
        &[
            "--count=8",
            "--depth=2",
            "--buffer-size=8k",
            "--step-size=1k",
            "{}.raw",
        ],
        &["-c", "8", "--image-opts", "driver=raw,file.filename={}.raw"],
        &["-c", "1", "-c", "3", "{}.raw", "-d", "1"],
    ] {
        let out = bench_like_qemu(&env, args);
        assert_eq!(out.code, Some(0), "{out}");
        assert_eq!(out.stdout.lines().count(), 2, "{out}");
    }
}

/// A write test of pattern 0xab over raw and qcow2 twins leaves exactly what qemu-img bench
/// leaves: the same regions, with the offsets wrapping at the end of the image as qemu's do.
#[test]
fn write_pattern_leaves_qemu_bytes() {
    let env = Env::with_qemu();
    // Every request stays inside the image (a failed one ends qemu-img at once, with the
    // requests in flight half done); requests_past_the_end_fail_like_qemu covers the others.
    let cases: &[&[&str]] = &[
        // 600 requests of 4 KiB over a 2 MiB image: wraps past the end once.
        &["-c", "600", "--pattern=0xab"],
        // Steps that are not a divisor of the size, and an offset: lands all over, wrapping.
        &[
            "-c",
            "40",
            "-S",
            "700k",
            "-o",
            "12345",
            "--pattern=0xab",
            "-d",
            "3",
        ],
        &[
            "-c",
            "64",
            "-s",
            "3000",
            "-S",
            "100000",
            "-o",
            "1000000",
            "--pattern=0xab",
        ],
        // The default pattern, zero, over the noise.
        &["-c", "20", "-s", "64k", "-S", "96k"],
        // Flushes, drained and not, and the cache modes.
        &[
            "-c",
            "500",
            "--pattern=0xab",
            "--flush-interval=64",
            "-S",
            "12k",
        ],
        &[
            "-c",
            "600",
            "--pattern=0xab",
            "--flush-interval=100",
            "--no-drain",
            "-d",
            "8",
        ],
        &[
            "-c",
            "100",
            "--pattern=0xab",
            "-t",
            "none",
            "-s",
            "8k",
            "-S",
            "12k",
        ],
        &[
            "-c",
            "30",
            "--pattern=0xab",
            "-t",
            "writethrough",
            "-o",
            "1M",
        ],
        &[
            "-c",
            "30",
            "--pattern=0xab",
            "-t",
            "unsafe",
            "-s",
            "100k",
            "-S",
            "128k",
        ],
        &[
            "-c",
            "30",
            "--pattern=0xab",
            "-t",
            "directsync",
            "-s",
            "4k",
            "-S",
            "300k",
        ],
    ];
    for fmt in ["raw", "qcow2"] {
        for extra in cases {
            twins(&env, fmt, 2 * MIB);
            let file = format!("{{}}.{fmt}");
            let mut args = vec!["-w", "-f", fmt];
            args.extend_from_slice(extra);
            args.push(&file);
            let out = bench_like_qemu(&env, &args);
            assert_eq!(out.code, Some(0), "{out}");
            twins_equal(&env, fmt);
        }
    }
}

/// Offsets wrap modulo the image size (not at the last full request): on a 1 MiB image, three
/// requests 700 KiB apart land at 0, 700 KiB and 376 KiB, exactly where qemu-img puts them.
#[test]
fn wraparound_writes_where_qemu_writes() {
    let env = Env::with_qemu();
    for tag in ["q", "i"] {
        env.sparse_file(&format!("{tag}.raw"), MIB);
    }
    bench_like_qemu(
        &env,
        &[
            "-w",
            "-f",
            "raw",
            "-c",
            "3",
            "-S",
            "700k",
            "--pattern=0xab",
            "{}.raw",
        ],
    )
    .ok();
    env.assert_same_bytes("q.raw", "i.raw");
    let data = env.read("i.raw");
    let written: Vec<usize> = data
        .chunks(4096)
        .enumerate()
        .filter(|(_, c)| c.iter().all(|&b| b == 0xab))
        .map(|(k, _)| k * 4096)
        .collect();
    assert_eq!(written, vec![0, 385_024, 716_800]);
    assert_eq!(data.iter().filter(|&&b| b != 0).count(), 3 * 4096);
}

/// Requests that pass the end fail as in qemu-img (the first line, then the error, status 1);
/// the last byte and a request ending exactly at the end are fine.
#[test]
fn requests_past_the_end_fail_like_qemu() {
    let env = Env::with_qemu();
    twins(&env, "raw", MIB);
    for (args, code) in [
        (&["-c", "1", "-o", "1046528", "{}.raw"][..], 1),
        (&["-c", "1", "-o", "2M", "{}.raw"], 1),
        (&["-c", "1", "-s", "2M", "{}.raw"], 1),
        (
            &["-c", "1", "-o", "1046528", "-w", "-f", "raw", "{}.raw"],
            1,
        ),
        (&["-c", "1", "-o", "1048575", "-s", "1", "{}.raw"], 0),
        (&["-c", "2", "-o", "1044480", "{}.raw"], 0),
    ] {
        let out = bench_like_qemu(&env, args);
        assert_eq!(out.code, Some(code), "{out}");
        if code == 1 {
            assert_eq!(out.stderr, "img: Failed request: Input/output error\n");
        }
    }
    env.assert_same_bytes("q.raw", "i.raw");
}

/// Bad arguments: qemu-img's messages and exit status 1, and nothing done to the image.
#[test]
fn bad_arguments_fail_like_qemu() {
    let env = Env::with_qemu();
    twins(&env, "raw", MIB);
    for args in [
        &["-c", "0", "{}.raw"][..],
        &["-c", "-1", "{}.raw"],
        &["-c", "abc", "{}.raw"],
        &["-c", "1k", "{}.raw"],
        &["-c", "2147483648", "{}.raw"],
        &["-d", "0", "{}.raw"],
        &["-d", "x", "{}.raw"],
        &["-s", "0", "{}.raw"],
        &["-s", "2G", "{}.raw"],
        &["-s", "1.5", "{}.raw"],
        &["-S", "x", "{}.raw"],
        &["-S", "2147483648", "{}.raw"],
        &["-o", "x", "{}.raw"],
        &["-o", "-1", "{}.raw"],
        &["-o", "8E", "{}.raw"],
        &["-w", "--pattern=256", "{}.raw"],
        &["-w", "--pattern=x", "{}.raw"],
        &["-w", "--flush-interval=x", "{}.raw"],
        &["--flush-interval=64", "{}.raw"],
        &["-w", "--flush-interval=10", "{}.raw"],
        &["-t", "foo", "{}.raw"],
        &["-i", "foo", "{}.raw"],
        &["-i", "native", "{}.raw"],
        &["-n", "{}.raw"],
        &["-f", "foo", "{}.raw"],
        &["--image-opts", "-f", "raw", "{}.raw"],
        &["-U", "-w", "-f", "raw", "{}.raw"],
        &["-c", "1", "missing.raw"],
        &["{}.raw", "{}.raw"],
        &[],
    ] {
        let out = bench_like_qemu(&env, args);
        assert_eq!(out.code, Some(1), "{out}");
        assert!(out.stdout.is_empty(), "{out}");
    }
    env.assert_same_bytes("q.raw", "i.raw");
}

/// A write test without -f on a raw image warns as qemu-img does, and still writes.
#[test]
fn probed_raw_write_warns_like_qemu() {
    let env = Env::with_qemu();
    twins(&env, "raw", MIB);
    let out = bench_like_qemu(&env, &["-w", "-c", "4", "--pattern=0x5a", "{}.raw"]).ok();
    assert!(out
        .stderr
        .starts_with("WARNING: Image format was not specified"));
    env.assert_same_bytes("q.raw", "i.raw");
}

/// A request that fails in the middle of a run (here with draining flushes, where the workers
/// meet at each flush) ends the run at once with qemu-img's error and status, no hang; the image
/// stays consistent.
#[test]
fn failure_mid_run_stops_like_qemu() {
    let env = Env::with_qemu();
    for fmt in ["raw", "qcow2"] {
        twins(&env, fmt, 2 * MIB);
        let file = format!("{{}}.{fmt}");
        for extra in [
            &["--flush-interval=64"][..],
            &["--flush-interval=64", "--no-drain"],
            &[],
        ] {
            let mut args = vec!["-w", "-f", fmt, "-c", "500", "-S", "5000"];
            args.extend_from_slice(extra);
            args.push(&file);
            let out = bench_like_qemu(&env, &args);
            assert_eq!(out.code, Some(1), "{out}");
            assert!(
                out.stdout.starts_with("Sending 500 write requests"),
                "{out}"
            );
            assert!(!out.stdout.contains("Run completed"), "{out}");
        }
        if fmt == "qcow2" {
            let out = env.qemu_img(&["check", "i.qcow2"]);
            assert_eq!(out.code, Some(0), "img left a damaged image: {out}");
        }
    }
}
