//! Helpers shared by the library's interop tests: run qemu-img/qemu-io, read images
//! whole through the library and through qemu-img, copy one image into another.

#![allow(dead_code)]
#![allow(clippy::cast_possible_truncation)] // test sizes are small

pub mod model;
pub mod sesparse;

use std::path::Path;
use std::process::{Command, Output};

use imgblock::{create, CreateOptions, Format, Image, OpenOptions};

/// Runs `cmd` to completion and returns what it printed.
///
/// Tests run side by side, and a process another test is starting holds a copy of this test's
/// descriptors until its exec closes them: an image this test has just dropped can stay locked
/// (qemu's OFD locks) for that instant. A qemu tool refused a lock is therefore run again, up to
/// five times in all; a lock still held after that is a real failure.
pub fn output(cmd: &mut Command) -> Output {
    let prog = cmd.get_program().to_string_lossy().into_owned();
    let mut tries = 0;
    loop {
        let o = cmd
            .output()
            .unwrap_or_else(|e| panic!("{prog} is needed for this test and could not run: {e}"));
        tries += 1;
        let err = String::from_utf8_lossy(&o.stderr);
        let locked = err.contains("Failed to get") && err.contains("lock");
        if o.status.success() || !locked || tries >= 5 {
            return o;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

/// Runs a program and panics with its output when it fails.
pub fn run(prog: &str, args: &[&str]) -> String {
    let o = output(Command::new(prog).args(args));
    assert!(
        o.status.success(),
        "{prog} {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// `qemu-img ARGS`.
pub fn qemu_img(args: &[&str]) -> String {
    run("qemu-img", args)
}

/// `qemu-io -f FMT -c CMD... FILE`, panicking on failure or a pattern mismatch.
pub fn qemu_io(fmt: &str, path: &Path, cmds: &[&str]) {
    let out = qemu_io_out(fmt, path, cmds);
    assert!(
        !out.contains("Pattern verification failed") && !out.contains("error"),
        "qemu-io {cmds:?}: {out}"
    );
}

/// `qemu-io -f FMT -c CMD... FILE`, returning its output.
pub fn qemu_io_out(fmt: &str, path: &Path, cmds: &[&str]) -> String {
    let mut args = vec!["-f", fmt];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    let p = path.to_str().unwrap();
    args.push(p);
    run("qemu-io", &args)
}

/// The whole guest view through the library.
pub fn read_lib(path: &Path) -> Vec<u8> {
    let img = Image::open(path, &OpenOptions::read_only())
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    read_image(&img)
}

/// The whole guest view of an open image.
pub fn read_image(img: &Image) -> Vec<u8> {
    let mut buf = vec![0u8; img.size() as usize];
    img.read_at(&mut buf, 0).unwrap();
    buf
}

/// The whole guest view through `qemu-img convert -O raw`.
pub fn read_qemu(path: &Path) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.raw");
    qemu_img(&[
        "convert",
        "-O",
        "raw",
        path.to_str().unwrap(),
        out.to_str().unwrap(),
    ]);
    std::fs::read(&out).unwrap()
}

/// Asserts that the library and qemu-img read the same bytes, naming the first difference.
pub fn assert_reads_like_qemu(path: &Path) {
    let a = read_lib(path);
    let b = read_qemu(path);
    assert_eq!(a.len(), b.len(), "{}: sizes differ", path.display());
    if let Some(i) = a.iter().zip(&b).position(|(x, y)| x != y) {
        panic!(
            "{}: first difference at {i:#x}: library {:#04x}, qemu {:#04x}",
            path.display(),
            a[i],
            b[i]
        );
    }
}

/// A deterministic pattern for `len` bytes, differing per `seed`.
pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| ((i as u64).wrapping_mul(2_654_435_761) >> 13) as u8 ^ seed)
        .collect()
}

/// Creates `dst` with the library and copies `src` into it chunk by chunk, skipping all-zero
/// chunks, then flushes (a small convert).
pub fn lib_convert(src: &Image, dst: &Path, fmt: Format, opts: &str) {
    let mut o = CreateOptions::new(src.size());
    o.parse_opts(opts).unwrap();
    create(dst, fmt, &o).unwrap();
    let img = Image::open(dst, &OpenOptions::writable().format(Some(fmt))).unwrap();
    copy_data(src, &img);
    img.flush().unwrap();
}

/// Copies every non-zero 64 KiB chunk of `src` into `dst` in guest order.
pub fn copy_data(src: &Image, dst: &Image) {
    const CHUNK: u64 = 64 << 10;
    let size = src.size();
    let mut buf = vec![0u8; CHUNK as usize];
    let mut off = 0;
    while off < size {
        let st = src.block_status(off, (size - off).min(16 << 20)).unwrap();
        if !st.data && st.zero {
            off += st.len;
            continue;
        }
        let n = (size - off).min(CHUNK) as usize;
        src.read_at(&mut buf[..n], off).unwrap();
        if buf[..n].iter().any(|&b| b != 0) {
            dst.write_at(&buf[..n], off).unwrap();
        }
        off += n as u64;
    }
}

/// `qemu-img check` passes (exit 0, no errors or leaks).
pub fn qemu_check(path: &Path) {
    qemu_img(&["check", path.to_str().unwrap()]);
}

/// `qemu-img compare` finds the two equal.
pub fn qemu_compare(a: &Path, b: &Path) {
    qemu_img(&["compare", a.to_str().unwrap(), b.to_str().unwrap()]);
}
