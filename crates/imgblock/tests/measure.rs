//! measure agrees with qemu-img measure, for empty disks and for real sources.

mod fmt_common;

use std::path::Path;
use std::process::Command;

use imgblock::measure::measure;
use imgblock::{CreateOptions, Format, Image, OpenOptions};

fn qemu_measure(args: &[&str]) -> (u64, u64) {
    let o = fmt_common::output(
        Command::new("qemu-img")
            .args(["measure", "--output=json"])
            .args(args),
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    let num = |key: &str| -> u64 {
        let i = out
            .find(key)
            .unwrap_or_else(|| panic!("{key} missing in {out}"))
            + key.len();
        out[i..]
            .trim_start_matches([':', ' ', '"'])
            .split(|c: char| !c.is_ascii_digit())
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    (num("\"required\""), num("\"fully-allocated\""))
}

#[test]
fn measure_empty_disks_matches_qemu() {
    for (size, opts) in [
        (1000u64, ""),
        (10 << 30, ""),
        (1 << 30, "cluster_size=4k,refcount_bits=64"),
        (5 << 30, "extended_l2=on"),
        (3 << 20, "cluster_size=512,refcount_bits=1"),
        (100 << 30, "cluster_size=2M"),
        (7 << 30, "preallocation=full"),
    ] {
        let mut o = CreateOptions::new(size);
        o.parse_opts(opts).unwrap();
        let m = measure(Format::Qcow2, &o, None).unwrap();
        let mut args = vec!["-O", "qcow2", "--size"];
        let s = size.to_string();
        args.push(&s);
        if !opts.is_empty() {
            args.extend(["-o", opts]);
        }
        assert_eq!(
            (m.required, m.fully_allocated),
            qemu_measure(&args),
            "{size} {opts}"
        );
    }
    let m = measure(Format::Raw, &CreateOptions::new(1000), None).unwrap();
    assert_eq!(
        (m.required, m.fully_allocated),
        qemu_measure(&["-O", "raw", "--size", "1000"])
    );
}

#[test]
fn measure_sources_matches_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let q = dir.path().join("s.qcow2");
    let r = dir.path().join("s.raw");
    let qs = q.to_str().unwrap();
    let rs = r.to_str().unwrap();
    for args in [
        vec!["qemu-img", "create", "-f", "qcow2", qs, "32M"],
        vec![
            "qemu-io",
            "-c",
            "write 1000 300k",
            "-c",
            "write -z 4M 1M",
            "-c",
            "write 20M 5M",
            qs,
        ],
        vec!["qemu-img", "create", "-f", "raw", rs, "32M"],
        vec![
            "qemu-io",
            "-f",
            "raw",
            "-c",
            "write 100k 3M",
            "-c",
            "write 30M 64k",
            rs,
        ],
    ] {
        assert!(Command::new(args[0])
            .args(&args[1..])
            .output()
            .unwrap()
            .status
            .success());
    }
    for (src, opts) in [
        (&q, ""),
        (&r, ""),
        (&q, "cluster_size=4k"),
        (&r, "cluster_size=2M,extended_l2=on"),
    ] {
        let img = Image::open(Path::new(src), &OpenOptions::read_only()).unwrap();
        let mut o = CreateOptions::default();
        o.parse_opts(opts).unwrap();
        let m = measure(Format::Qcow2, &o, Some(&img)).unwrap();
        let mut args = vec!["-O", "qcow2"];
        if !opts.is_empty() {
            args.extend(["-o", opts]);
        }
        args.push(src.to_str().unwrap());
        assert_eq!(
            (m.required, m.fully_allocated),
            qemu_measure(&args),
            "{} {opts}",
            src.display()
        );
    }
}
