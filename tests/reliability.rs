//! Killed and starved conversions: `img convert` killed at many points, or running out of disk
//! space, leaves images `qemu-img check` calls consistent (leaked clusters at most), in every
//! writable format, and reports the error.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

/// A 48 MiB source of mixed data: noise, text and holes.
fn source(env: &Env) {
    env.sparse_file("src.raw", 48 * MIB);
    for i in 0..12u64 {
        env.write_at(
            "src.raw",
            i * 4 * MIB,
            &noise(i, usize::try_from(MIB + i * 64 * KIB).unwrap()),
        );
    }
}

fn check_consistent(env: &Env, name: &str, what: &str) {
    let out = env.qemu_img(&["check", name]);
    assert!(
        out.code == Some(0) || out.code == Some(3),
        "{what}: qemu-img check found corruption: {out}"
    );
}

#[test]
fn convert_killed_at_any_point_leaves_consistent_images() {
    let env = Env::with_qemu();
    source(&env);
    for (fmt, opts) in [
        ("qcow2", "cluster_size=64k"),
        ("qcow2", "cluster_size=4k"),
        ("vdi", ""),
        ("vmdk", ""),
    ] {
        let mut killed = 0;
        for delay_ms in [5u64, 20, 40, 80, 120, 200, 300, 500] {
            let dst = format!("dst-{delay_ms}.{fmt}");
            let mut args = vec!["convert", "-O", fmt];
            if !opts.is_empty() {
                args.extend(["-o", opts]);
            }
            args.extend(["src.raw", dst.as_str()]);
            let mut child = Command::new(IMG)
                .args(&args)
                .current_dir(env.path(""))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            std::thread::sleep(Duration::from_millis(delay_ms));
            if child.try_wait().unwrap().is_none() {
                killed += 1;
            }
            let _ = child.kill();
            child.wait().unwrap();
            // A kill before the image was even created leaves nothing to check.
            if env.path(&dst).exists() && env.len(&dst) > 0 {
                check_consistent(
                    &env,
                    &dst,
                    &format!("{fmt} {opts} killed after {delay_ms} ms"),
                );
            }
        }
        eprintln!("{fmt} {opts}: {killed} of 8 conversions were killed mid-way");
    }
}

/// Runs `img` with `args` and kills it after `delay_ms`; true when it was still running.
fn run_and_kill(env: &Env, args: &[&str], delay_ms: u64) -> bool {
    let mut child = Command::new(IMG)
        .args(args)
        .current_dir(env.path(""))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(delay_ms));
    let running = child.try_wait().unwrap().is_none();
    let _ = child.kill();
    child.wait().unwrap();
    running
}

/// base.qcow2 <- top.qcow2, both with data, 4 KiB clusters so that the jobs take a while.
fn chain(env: &Env) {
    env.img(&[
        "convert",
        "-O",
        "qcow2",
        "-o",
        "cluster_size=4k",
        "src.raw",
        "base.qcow2",
    ])
    .ok();
    env.img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4k",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        "top.qcow2",
    ])
    .ok();
    for i in 0..6u64 {
        env.qemu_io(
            "qcow2",
            "top.qcow2",
            &[&format!("write -P {} {} 3M", i + 1, i * 7 * MIB)],
        );
    }
}

#[test]
fn commit_and_rebase_killed_at_any_point_leave_consistent_images() {
    let env = Env::with_qemu();
    source(&env);
    let mut killed = 0;
    for delay_ms in [5u64, 15, 30, 60, 100, 200] {
        chain(&env);
        killed += u32::from(run_and_kill(&env, &["commit", "top.qcow2"], delay_ms));
        check_consistent(
            &env,
            "base.qcow2",
            &format!("commit killed after {delay_ms} ms (base)"),
        );
        check_consistent(
            &env,
            "top.qcow2",
            &format!("commit killed after {delay_ms} ms (top)"),
        );
        chain(&env);
        killed += u32::from(run_and_kill(
            &env,
            &["rebase", "-b", "", "top.qcow2"],
            delay_ms,
        ));
        check_consistent(
            &env,
            "top.qcow2",
            &format!("rebase killed after {delay_ms} ms"),
        );
    }
    eprintln!("commit/rebase: {killed} of 12 runs were killed mid-way");
}

#[test]
fn convert_onto_a_full_filesystem_fails_cleanly() {
    let env = Env::with_qemu();
    source(&env);
    let mnt = env.path("small");
    std::fs::create_dir(&mnt).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=12m", "tmpfs"])
        .arg(&mnt)
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        eprintln!("SKIPPED convert_onto_a_full_filesystem_fails_cleanly: cannot mount a small tmpfs (needs root); the library-level ENOSPC tests still ran");
        return;
    }
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let _guard = Unmount(mnt.clone());
    for (fmt, name) in [("qcow2", "small/full.qcow2"), ("vdi", "small/full.vdi")] {
        let out = env.img(&["convert", "-O", fmt, "src.raw", name]).no_panic();
        assert_ne!(
            out.code,
            Some(0),
            "convert onto a full filesystem succeeded: {out}"
        );
        assert!(out.stderr.contains("No space left on device"), "{out}");
        check_consistent(&env, name, &format!("{fmt} on a full filesystem"));
        std::fs::remove_file(env.path(name)).unwrap();
    }
}
