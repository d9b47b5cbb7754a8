//! Every creation option qemu-img 10 offers, both ways, one table per format (raw, qcow2, vmdk,
//! vdi, luks). For each option set of a table:
//!
//! - qemu-img → img: qemu-img creates an image with it and qemu-io edits it ([`EDITS`]: pattern
//!   writes at unaligned offsets, across clusters and in the last sector, zero writes and
//!   discards); `img` reads it byte for byte as qemu-img does, and `img info` prints what
//!   qemu-img's does. `qemu-img convert -O F -o OPTS` makes one from a patterned raw file, which
//!   `img` reads as qemu-img does and `img compare` finds equal to the source.
//! - img → qemu-img: `img create -o OPTS` makes an image that `qemu-img check` passes, that reads
//!   as zeroes (or as its backing file), that qemu-img describes (info, map) as its own image
//!   made with the same options and whose `qemu-img info` reports the option as set, and that
//!   takes qemu-io's edits and stays clean; `img convert -O F -o OPTS` makes one that qemu-img
//!   checks clean, finds equal to the source and describes as its own conversion.
//! - `convert -c` with the options of the formats that compress, both ways.
//! - Option sets qemu-img refuses, `img` refuses too, with the same exit code.
//!
//! Each case is printed before it runs, so a failure names it. The sweeps of every value
//! (cluster sizes, refcount widths, ciphers) stay in qemu_to_img.rs, img_to_qemu.rs and the
//! library's vmdk, vdi and luks tests; these tables make sure no option is left out.

mod common;

use common::{noise, patterned_raw, run_timeout, Env, Output, DEFAULT_TIMEOUT, EDITS, SMALL};
use serde_json::Value;

/// The secret every encrypted image here is made with.
const OBJ: &str = "secret,id=s0,data=pw";

/// What each tool names its images (`{}` in options stands for it): the strings are replaced
/// by `X` before two descriptions are compared.
const OURS: &str = "ours";
const THEIRS: &str = "theirs";

/// Which of qemu-img's images a case makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Qemu {
    /// `create` (then qemu-io's edits) and `convert`.
    Both,
    /// `create` only: qemu-img spends about two seconds timing its key derivation for every
    /// LUKS image it writes, whatever the iter-time.
    Create,
    /// Neither: qemu-img's LUKS image with these settings reads no differently from another
    /// row's (its ciphers are all read back in crates/imgblock/tests/luks.rs); `img`'s own
    /// still go through qemu-img here.
    Neither,
}

/// One option set of a table.
struct Case {
    /// The `-o` list both tools are given; `{}` stands for the image's own name without its
    /// extension, so that each image has its own data file.
    opts: &'static str,
    /// `key=value` pairs qemu-img info must report for `img`'s images (see [`reported`]).
    reports: &'static [&'static str],
    qemu: Qemu,
}

const fn case(opts: &'static str, reports: &'static [&'static str]) -> Case {
    Case {
        opts,
        reports,
        qemu: Qemu::Both,
    }
}

const fn luks_case(opts: &'static str, reports: &'static [&'static str], qemu: Qemu) -> Case {
    Case {
        opts,
        reports,
        qemu,
    }
}

/// An image as the tools name it on their command lines.
#[derive(Debug, Clone)]
struct Image {
    fmt: &'static str,
    file: String,
    /// The option naming the secret, for an encrypted image.
    key: Option<&'static str>,
}

impl Image {
    fn new(fmt: &'static str, file: impl Into<String>, opts: &str) -> Image {
        let key = if fmt == "luks" {
            Some("key-secret")
        } else if opts.contains("key-secret") {
            Some("encrypt.key-secret")
        } else {
            None
        };
        Image {
            fmt,
            file: file.into(),
            key,
        }
    }

    /// The image options qemu's `--image-opts` takes.
    fn image_opts(&self) -> String {
        match self.key {
            Some(k) => format!("driver={},file.filename={},{k}=s0", self.fmt, self.file),
            None => format!("driver={},file.filename={}", self.fmt, self.file),
        }
    }

    /// Arguments naming the image for convert, check, map and qemu-io.
    fn args(&self) -> Vec<String> {
        match self.key {
            Some(_) => vec![
                "--object".into(),
                OBJ.into(),
                "--image-opts".into(),
                self.image_opts(),
            ],
            None => vec!["-f".into(), self.fmt.into(), self.file.clone()],
        }
    }
}

/// Runs `tool` ("img" or "qemu-img") with `args`.
#[track_caller]
fn tool(env: &Env, tool: &str, args: &[String]) -> Output {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    if tool == "img" {
        env.img(&args).no_panic()
    } else {
        env.qemu_img(&args)
    }
}

/// `args` as owned strings.
fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|&s| s.to_owned()).collect()
}

/// `qemu-io` with each of `cmds` on `img`, asserting that none failed.
#[track_caller]
fn qemu_io(env: &Env, img: &Image, cmds: &[&str]) {
    let mut args = img.args();
    for c in cmds {
        args.push("-c".into());
        args.push((*c).to_owned());
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = run_timeout(env.dir.path(), "qemu-io", &args, DEFAULT_TIMEOUT).ok();
    let all = format!("{}{}", out.stdout, out.stderr);
    assert!(
        !all.contains("failed") && !all.contains("error") && !all.contains("Error"),
        "qemu-io reported a failure: {out}"
    );
}

/// `img` and qemu-img convert `img` to the same raw bytes.
#[track_caller]
fn reads_like_qemu(env: &Env, img: &Image) {
    let ours = format!("{}.img.raw", img.file);
    let theirs = format!("{}.qemu.raw", img.file);
    for (t, out) in [("qemu-img", &theirs), ("img", &ours)] {
        let mut args = strings(&["convert"]);
        args.extend(img.args());
        args.extend(strings(&["-O", "raw", out]));
        tool(env, t, &args).ok();
    }
    env.assert_same_bytes(&ours, &theirs);
}

/// `tool compare` finds `a` and `b` identical.
#[track_caller]
fn same_contents(env: &Env, t: &str, a: &Image, b: &Image) {
    let mut args = strings(&["compare"]);
    if a.key.is_some() || b.key.is_some() {
        args.extend(strings(&["--object", OBJ, "--image-opts"]));
        args.extend([a.image_opts(), b.image_opts()]);
    } else {
        args.extend(strings(&["-f", a.fmt, "-F", b.fmt]));
        args.extend([a.file.clone(), b.file.clone()]);
    }
    tool(env, t, &args).ok();
}

/// qemu-img check finds nothing wrong (raw and luks: qemu-img has no check for them).
#[track_caller]
fn qemu_check(env: &Env, img: &Image) {
    let mut args = strings(&["check"]);
    args.extend(img.args());
    let out = tool(env, "qemu-img", &args);
    let clean = if matches!(img.fmt, "raw" | "luks") {
        63
    } else {
        0
    };
    assert_eq!(out.code, Some(clean), "qemu-img check: {out}");
}

/// `tool info --output=json`.
fn info(env: &Env, t: &str, file: &str) -> Value {
    tool(env, t, &strings(&["info", "--output=json", file]))
        .ok()
        .json()
}

/// A description with what differs between two images made alike taken out: names (the
/// tools' names become `X`), host files (their sizes and allocation follow the layout, not
/// the options), random identifiers and timed iteration counts.
fn normalized(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .filter(|(k, _)| {
                    !matches!(
                        k.as_str(),
                        "children"
                            | "actual-size"
                            | "cid"
                            | "parent-cid"
                            | "uuid"
                            | "iters"
                            | "master-key-iters"
                    )
                })
                .map(|(k, v)| (k.clone(), normalized(v)))
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(normalized).collect()),
        Value::String(s) => Value::String(s.replace(OURS, "X").replace(THEIRS, "X")),
        other => other.clone(),
    }
}

/// qemu-img map of an image with the host offsets left out and neighbours alike merged: what
/// is allocated and what reads as zeroes, whatever the layout.
fn guest_map(env: &Env, img: &Image) -> Vec<Value> {
    let mut args = strings(&["map", "--output=json"]);
    args.extend(img.args());
    let map = tool(env, "qemu-img", &args).ok().json();
    let mut out: Vec<Value> = Vec::new();
    for e in map.as_array().expect("map is a list") {
        let mut e = e.clone();
        let m = e.as_object_mut().expect("map entry");
        m.remove("offset");
        m.remove("filename");
        let same = |a: &Value, b: &Value| {
            ["depth", "present", "zero", "data", "compressed"]
                .iter()
                .all(|k| a[k] == b[k])
        };
        match out.last_mut() {
            Some(last) if same(last, &e) => {
                let len = last["length"].as_u64().unwrap() + e["length"].as_u64().unwrap();
                last["length"] = len.into();
            }
            _ => out.push(e),
        }
    }
    out
}

/// Whether qemu-img map of a fresh image made with `opts` follows from the format's metadata
/// alone. Over raw files, LUKS payloads, flat vmdk extents and fallocated clusters it also
/// asks the host file which ranges read as zeroes, and ext4 answers for unwritten extents by
/// what the page cache holds at that moment (qemu also writes the first block of a file it
/// creates).
fn map_is_metadata(fmt: &str, opts: &str) -> bool {
    !matches!(fmt, "raw" | "luks")
        && !opts.contains("Flat")
        && !opts.contains("preallocation=falloc")
        && !opts.contains("preallocation=full")
}

/// Whether the options change what a fresh image maps (preallocated metadata, a raw data
/// file, static vdi blocks); other fresh images map as wholly unallocated, which their
/// description already says.
fn map_tells(opts: &str) -> bool {
    ["preallocation=metadata", "data_file_raw=on", "static=on"]
        .iter()
        .any(|o| opts.contains(o))
}

/// The text of a vmdk descriptor, embedded or a file of its own (qemu pads a descriptor it
/// rewrites with NULs).
fn vmdk_descriptor_text(env: &Env, file: &str) -> String {
    let bytes = env.read(file);
    let d = if bytes.starts_with(b"KDMV") {
        &bytes[512..]
    } else {
        &bytes[..]
    };
    let end = d.iter().position(|&b| b == 0).unwrap_or(d.len());
    String::from_utf8_lossy(&d[..end]).trim_end().to_owned()
}

/// A vmdk descriptor without its random CID, with the tools' names read as `X`.
fn vmdk_descriptor(env: &Env, file: &str) -> String {
    vmdk_descriptor_text(env, file)
        .lines()
        .filter(|l| !l.starts_with("CID="))
        .collect::<Vec<_>>()
        .join("\n")
        .replace(OURS, "X")
        .replace(THEIRS, "X")
}

/// The first sparse extent of a vmdk, if it has one: the image itself, or the first file its
/// descriptor names.
fn vmdk_first_sparse_extent(env: &Env, file: &str) -> Option<String> {
    if env.read(file).starts_with(b"KDMV") {
        return Some(file.to_owned());
    }
    let desc = vmdk_descriptor_text(env, file);
    let line = desc.lines().find(|l| l.contains(" SPARSE "))?;
    Some(line.split('"').nth(1)?.to_owned())
}

/// The value of `key` as `img`'s image `file` shows it, from qemu-img's `info` (a dotted path
/// such as `encrypt.format`, found at any depth) or from the format's own metadata:
/// `ddb.NAME` (a vmdk descriptor entry), `zeroed-grain` (the vmdk header flag), `image-type`
/// (vdi's header: dynamic or static), `allocated` (of the file: none or all).
fn reported(env: &Env, info: &Value, file: &str, key: &str) -> Option<String> {
    let text = |v: &Value| match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    if key.starts_with("ddb.") {
        let desc = vmdk_descriptor(env, file);
        let line = desc.lines().find(|l| l.starts_with(&format!("{key} =")))?;
        return Some(line.split('"').nth(1)?.to_owned());
    }
    match key {
        "zeroed-grain" => {
            let extent = vmdk_first_sparse_extent(env, file)?;
            let flags = u32::from_le_bytes(env.read(&extent)[8..12].try_into().ok()?);
            return Some((flags & 4 != 0).to_string());
        }
        "image-type" => {
            let h = env.read(file);
            let kind = u32::from_le_bytes(h[0x4c..0x50].try_into().ok()?);
            return Some(match kind {
                1 => "dynamic".into(),
                2 => "static".into(),
                n => n.to_string(),
            });
        }
        "allocated" => {
            let a = env.allocated(file);
            return Some(if a == 0 {
                "none".into()
            } else if a >= env.len(file) {
                "all".into()
            } else {
                format!("{a} of {}", env.len(file))
            });
        }
        _ => {}
    }
    fn find<'a>(v: &'a Value, path: &[&str]) -> Option<&'a Value> {
        let direct = path
            .iter()
            .try_fold(v, |cur, k| cur.as_object().and_then(|m| m.get(*k)));
        if direct.is_some() {
            return direct;
        }
        match v {
            Value::Object(m) => m.values().find_map(|c| find(c, path)),
            Value::Array(a) => a.iter().find_map(|c| find(c, path)),
            _ => None,
        }
    }
    let path: Vec<&str> = key.split('.').collect();
    find(info, &path).map(text)
}

/// Asserts that `info` (qemu-img's of `file`) or the format's metadata reports each of
/// `reports`.
#[track_caller]
fn assert_reports(env: &Env, file: &str, info: &Value, reports: &[&str]) {
    let stem = file.rsplit_once('.').map_or(file, |(s, _)| s);
    for r in reports {
        let r = r.replace("{}", stem);
        let (key, want) = r.split_once('=').expect("key=value");
        let got = reported(env, info, file, key);
        assert_eq!(
            got.as_deref(),
            Some(want),
            "{file}: {key} should be {want}; info: {info:#}"
        );
    }
}

/// Options with `{}` standing for `stem`.
fn opts_for(opts: &str, stem: &str) -> String {
    opts.replace("{}", stem)
}

/// The raw file conversions start from, and the backing image `opts` names, if any.
fn sources(env: &Env, opts: &str) {
    patterned_raw(env, "src.raw");
    let Some(base) = backing_of(opts) else {
        return;
    };
    env.sparse_file("base.raw", SMALL);
    env.write_at("base.raw", 0, &noise(11, 200_000));
    env.write_at("base.raw", 3 * 1024 * 1024 + 77, &[0x3c; 5000]);
    let fmt = fmt_of(&base);
    if fmt != "raw" {
        env.qemu_img(&["convert", "-q", "-O", fmt, "base.raw", &base])
            .ok();
    }
}

/// The qemu-io edits for `fmt` images made with `opts`: [`EDITS`], except for streamOptimized
/// vmdk, which takes only whole grains written in order.
fn edits_for(opts: &str) -> &'static [&'static str] {
    if opts.contains("streamOptimized") {
        &[
            "write -P 0xab 0 128k",
            "write -P 0x11 3m 64k",
            "write -P 0x66 4032k 64k",
        ]
    } else {
        EDITS
    }
}

/// Whether a fresh image made with `opts` reads as zeroes: not a LUKS payload nor preallocated
/// encrypted qcow2 clusters (their plaintext zeroes decrypt to noise).
fn fresh_reads_zeroes(fmt: &str, opts: &str) -> bool {
    let prealloc = ["metadata", "falloc", "full"]
        .iter()
        .any(|p| opts.contains(&format!("preallocation={p}")));
    !(fmt == "luks" || (opts.contains("key-secret") && prealloc))
}

/// The backing image `opts` names, if any.
fn backing_of(opts: &str) -> Option<String> {
    opts.split(',')
        .find_map(|kv| kv.strip_prefix("backing_file="))
        .map(str::to_owned)
}

/// `TOOL create` of a SMALL image `NAME.fmt` with `opts` (`{}` read as NAME).
fn create_args(fmt: &str, opts: &str, name: &str) -> Vec<String> {
    let mut a = strings(&["create", "-q", "-f", fmt, "--object", OBJ]);
    if !opts.is_empty() {
        a.extend(["-o".into(), opts_for(opts, name)]);
    }
    a.extend([format!("{name}.{fmt}"), SMALL.to_string()]);
    a
}

/// `TOOL convert [-c]` of src.raw into `NAME.fmt` with `opts`.
fn convert_args(fmt: &str, opts: &str, name: &str, compress: bool) -> Vec<String> {
    let mut a = strings(&["convert", "-q", "-f", "raw", "-O", fmt, "--object", OBJ]);
    if compress {
        a.push("-c".into());
    }
    if !opts.is_empty() {
        a.extend(["-o".into(), opts_for(opts, name)]);
    }
    a.extend(["src.raw".into(), format!("{name}.{fmt}")]);
    a
}

/// Both directions of `create` and `convert` for one option set (see the module's docs).
fn run_case(fmt: &'static str, c: &Case) {
    eprintln!("case: {fmt} -o {}", c.opts);
    let env = Env::with_qemu();
    sources(&env, c.opts);
    let ours = Image::new(fmt, format!("{OURS}.{fmt}"), c.opts);
    let theirs = Image::new(fmt, format!("{THEIRS}.{fmt}"), c.opts);
    let edits = edits_for(c.opts);

    // img → qemu-img: a fresh image is clean, reports the options and reads as it should.
    tool(&env, "img", &create_args(fmt, c.opts, OURS)).ok();
    qemu_check(&env, &ours);
    let ours_info = info(&env, "qemu-img", &ours.file);
    assert_reports(&env, &ours.file, &ours_info, c.reports);
    if fresh_reads_zeroes(fmt, c.opts) {
        let expect = match backing_of(c.opts) {
            Some(b) => Image::new(fmt_of(&b), b, ""),
            None => {
                env.sparse_file("zero.raw", SMALL);
                Image::new("raw", "zero.raw", "")
            }
        };
        same_contents(&env, "qemu-img", &ours, &expect);
    } else {
        reads_like_qemu(&env, &ours);
    }

    // qemu-img's fresh image is described as img's is; img reads it after qemu-io's edits.
    if c.qemu != Qemu::Neither {
        tool(&env, "qemu-img", &create_args(fmt, c.opts, THEIRS)).ok();
        let theirs_info = info(&env, "qemu-img", &theirs.file);
        assert_eq!(
            normalized(&ours_info),
            normalized(&theirs_info),
            "qemu-img describes img's image unlike its own"
        );
        assert_eq!(
            info(&env, "img", &theirs.file),
            theirs_info,
            "img info differs from qemu-img info"
        );
        if map_tells(c.opts) && map_is_metadata(fmt, c.opts) {
            assert_eq!(guest_map(&env, &ours), guest_map(&env, &theirs));
        }
        same_as_qemu(&env, fmt, &ours.file, &theirs.file, true);
        qemu_io(&env, &theirs, edits);
        reads_like_qemu(&env, &theirs);
    }

    // img's image takes qemu-io's edits and stays clean.
    qemu_io(&env, &ours, edits);
    qemu_check(&env, &ours);
    reads_like_qemu(&env, &ours);

    // convert both ways.
    let src = Image::new("raw", "src.raw", "");
    let ours_c = Image::new(fmt, format!("{OURS}-c.{fmt}"), c.opts);
    tool(
        &env,
        "img",
        &convert_args(fmt, c.opts, &format!("{OURS}-c"), false),
    )
    .ok();
    qemu_check(&env, &ours_c);
    same_contents(&env, "qemu-img", &src, &ours_c);
    let ours_c_info = info(&env, "qemu-img", &ours_c.file);
    assert_reports(&env, &ours_c.file, &ours_c_info, c.reports);
    if c.qemu == Qemu::Both {
        let theirs_c = Image::new(fmt, format!("{THEIRS}-c.{fmt}"), c.opts);
        tool(
            &env,
            "qemu-img",
            &convert_args(fmt, c.opts, &format!("{THEIRS}-c"), false),
        )
        .ok();
        assert_eq!(
            normalized(&ours_c_info),
            normalized(&info(&env, "qemu-img", &theirs_c.file)),
            "qemu-img describes img's conversion unlike its own"
        );
        same_as_qemu(&env, fmt, &ours_c.file, &theirs_c.file, false);
        same_contents(&env, "img", &src, &theirs_c);
    }
}

/// The format of a backing image, by its extension.
fn fmt_of(file: &str) -> &'static str {
    match file.rsplit('.').next() {
        Some("qcow2") => "qcow2",
        Some("vmdk") => "vmdk",
        Some("vdi") => "vdi",
        _ => "raw",
    }
}

/// Format metadata qemu-img info does not show, compared between `img`'s image and qemu-img's
/// made alike: the vmdk descriptor (adapter, hardware and tools versions, geometry) and sparse
/// header (version, flags: zeroed grains), the vdi header, raw and luks allocation. `created`: fresh
/// from `create` (conversions of streamOptimized vmdk differ in layout, VMware's against
/// qemu's).
#[track_caller]
fn same_as_qemu(env: &Env, fmt: &str, ours: &str, theirs: &str, created: bool) {
    match fmt {
        "vmdk" => {
            assert_eq!(
                vmdk_descriptor(env, ours),
                vmdk_descriptor(env, theirs),
                "descriptors differ"
            );
            // Header version 3: streamOptimized.
            let stream = env.read(ours).get(4..8) == Some(&[3, 0, 0, 0][..]);
            if created || !stream {
                let (a, b) = (
                    vmdk_first_sparse_extent(env, ours),
                    vmdk_first_sparse_extent(env, theirs),
                );
                if let (Some(a), Some(b)) = (a, b) {
                    assert!(
                        env.read(&a)[..512] == env.read(&b)[..512],
                        "sparse headers differ: {a} {b}"
                    );
                }
            }
        }
        "vdi" => {
            // Everything but the image and last-snapshot UUIDs.
            let (a, b) = (env.read(ours), env.read(theirs));
            assert!(a[..0x188] == b[..0x188], "vdi headers differ");
            assert!(a[0x1a8..0x200] == b[0x1a8..0x200], "vdi headers differ");
            if created {
                assert!(a[0x200..] == b[0x200..], "vdi block maps differ");
            }
        }
        "raw" | "luks" if created => {
            // How much of a conversion is allocated depends on zero detection, not options.
            assert_eq!(env.len(ours), env.len(theirs));
            assert_eq!(
                reported(env, &Value::Null, ours, "allocated"),
                reported(env, &Value::Null, theirs, "allocated"),
                "allocation differs"
            );
        }
        _ => {}
    }
}

/// `convert -c` with `opts`, both ways: `img`'s output is clean, equal to the source, holds
/// compressed, plain and zero clusters where qemu-img's does, reports the options and takes qemu-io's edits;
/// `img` reads qemu-img's as qemu-img does.
fn run_compressed_case(fmt: &'static str, c: &Case) {
    eprintln!("case: {fmt} -c -o {}", c.opts);
    let env = Env::with_qemu();
    sources(&env, c.opts);
    let src = Image::new("raw", "src.raw", "");
    let ours = Image::new(fmt, format!("{OURS}.{fmt}"), c.opts);
    let theirs = Image::new(fmt, format!("{THEIRS}.{fmt}"), c.opts);
    tool(&env, "img", &convert_args(fmt, c.opts, OURS, true)).ok();
    tool(&env, "qemu-img", &convert_args(fmt, c.opts, THEIRS, true)).ok();
    qemu_check(&env, &ours);
    same_contents(&env, "qemu-img", &src, &ours);
    let ours_info = info(&env, "qemu-img", &ours.file);
    assert_reports(&env, &ours.file, &ours_info, c.reports);
    assert_eq!(
        normalized(&ours_info),
        normalized(&info(&env, "qemu-img", &theirs.file)),
        "qemu-img describes img's conversion unlike its own"
    );
    // Cluster by cluster: compressed where qemu-img's is, plain where the data did not shrink
    // (the source's runs of noise), zero or unallocated where its is.
    assert_eq!(
        guest_map(&env, &ours),
        guest_map(&env, &theirs),
        "img's map against qemu-img's"
    );
    reads_like_qemu(&env, &theirs);
    same_contents(&env, "img", &src, &theirs);
    let edits = edits_for(c.opts);
    if !c.opts.contains("streamOptimized") {
        qemu_io(&env, &ours, edits);
        qemu_check(&env, &ours);
        reads_like_qemu(&env, &ours);
    }
}

/// Both tools refuse `create` with `opts` (and `convert`, and `convert -c` when `compress`)
/// with the same exit code, and `img` says why without panicking, naming the image once.
fn run_refused_case(fmt: &'static str, opts: &str, compress: bool) {
    eprintln!(
        "refused: {fmt} {}-o {opts}",
        if compress { "-c " } else { "" }
    );
    let env = Env::with_qemu();
    sources(&env, opts);
    let mut runs = vec![
        (create_args(fmt, opts, OURS), create_args(fmt, opts, THEIRS)),
        (
            convert_args(fmt, opts, &format!("{OURS}-c"), false),
            convert_args(fmt, opts, &format!("{THEIRS}-c"), false),
        ),
    ];
    if compress {
        runs = vec![(
            convert_args(fmt, opts, OURS, true),
            convert_args(fmt, opts, THEIRS, true),
        )];
    }
    for (i, (a, b)) in runs.into_iter().enumerate() {
        let o = tool(&env, "img", &a);
        let q = tool(&env, "qemu-img", &b);
        assert_ne!(q.code, Some(0), "qemu-img accepts it: {q}");
        assert_eq!(o.code, q.code, "exit codes differ:{o}{q}");
        if i == 0 && !compress {
            // create's refusal is in qemu-img's words (img may say more after them; a warning
            // before it is its own).
            let words = |s: &str, prog: &str, name: &str| {
                let last = s.lines().last().unwrap_or("");
                last.strip_prefix(prog)
                    .unwrap_or(last)
                    .replace(name, "IMAGE")
            };
            let (ours, theirs) = (
                words(&o.stderr, "img: ", OURS),
                words(&q.stderr, "qemu-img: ", THEIRS),
            );
            assert!(
                ours.starts_with(&theirs),
                "messages differ:\n  img:      {ours}\n  qemu-img: {theirs}"
            );
        }
        assert!(o.stderr.starts_with("img: "), "no message: {o}");
        let ext = format!(".{fmt}");
        let name = a
            .iter()
            .rev()
            .find(|x| x.ends_with(&ext))
            .expect("image name");
        assert!(
            !o.stderr.contains(&format!("{name}: {name}")),
            "the image is named twice: {o}"
        );
    }
}

/// A format's tables: every case runs (a failing one is caught), then the test fails naming
/// the cases that failed and why.
struct Matrix {
    fmt: &'static str,
    cases: &'static [Case],
    compressed: &'static [Case],
    refused: &'static [&'static str],
    compressed_refused: &'static [&'static str],
}

/// Cases run side by side: most of their time is spent waiting for the tools, which flush
/// what they write.
const WORKERS: usize = 2;

impl Matrix {
    fn run(&self) {
        let fmt = self.fmt;
        type Job<'a> = (String, Box<dyn Fn() + Sync + 'a>);
        let mut jobs: Vec<Job<'_>> = Vec::new();
        for c in self.cases {
            jobs.push((format!("-o {}", c.opts), Box::new(|| run_case(fmt, c))));
        }
        for c in self.compressed {
            let job = || run_compressed_case(fmt, c);
            jobs.push((format!("-c -o {}", c.opts), Box::new(job)));
        }
        for o in self.refused {
            let job = || run_refused_case(fmt, o, false);
            jobs.push((format!("refused -o {o}"), Box::new(job)));
        }
        for o in self.compressed_refused {
            let job = || run_refused_case(fmt, o, true);
            jobs.push((format!("refused -c -o {o}"), Box::new(job)));
        }
        let next = std::sync::atomic::AtomicUsize::new(0);
        let failed = std::sync::Mutex::new(Vec::new());
        std::thread::scope(|s| {
            for _ in 0..WORKERS {
                s.spawn(|| loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some((name, job)) = jobs.get(i) else {
                        break;
                    };
                    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
                    if let Err(e) = r {
                        let why = e
                            .downcast_ref::<String>()
                            .cloned()
                            .or_else(|| e.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                            .unwrap_or_default();
                        let mut f = failed.lock().unwrap_or_else(|e| e.into_inner());
                        f.push(format!("{fmt} {name}: {why}"));
                    }
                });
            }
        });
        let failed = failed.into_inner().unwrap_or_else(|e| e.into_inner());
        assert!(
            failed.is_empty(),
            "{fmt}: {} failed cases:\n\n{}",
            failed.len(),
            failed.join("\n\n")
        );
    }
}

const RAW: &[Case] = &[
    case("", &["format=raw"]),
    case("preallocation=off", &["virtual-size=4194304"]),
    case("preallocation=falloc", &["allocated=all"]),
    case("preallocation=full", &["allocated=all"]),
    case("nocow=on", &["virtual-size=4194304"]),
    case("nocow=off,extent_size_hint=0", &["virtual-size=4194304"]),
    case("extent_size_hint=1M", &["virtual-size=4194304"]),
];

const RAW_REFUSED: &[&str] = &[
    "preallocation",
    "preallocation=metadata",
    "preallocation=bogus",
    "extent_size_hint=8G",
    "nocow=maybe",
    "cluster_size=64k",
    "backing_file=base.raw",
    "backing_fmt=raw",
];

#[test]
fn raw_every_option_both_ways() {
    Matrix {
        fmt: "raw",
        cases: RAW,
        compressed: &[],
        refused: RAW_REFUSED,
        compressed_refused: &[""],
    }
    .run();
}

const QCOW2: &[Case] = &[
    case(
        "",
        &[
            "compat=1.1",
            "cluster-size=65536",
            "refcount-bits=16",
            "lazy-refcounts=false",
            "extended-l2=false",
            "compression-type=zlib",
            "corrupt=false",
        ],
    ),
    case(
        "compat=1.1,lazy_refcounts=off,extended_l2=off,preallocation=off,compression_type=zlib",
        &["lazy-refcounts=false", "extended-l2=false"],
    ),
    case("compat=0.10", &["compat=0.10", "refcount-bits=16"]),
    case(
        "compat=v2,compression_type=zlib,preallocation=metadata",
        &["compat=0.10"],
    ),
    case(
        "compat=v3,lazy_refcounts=on,extent_size_hint=256k",
        &["compat=1.1", "lazy-refcounts=true"],
    ),
    // QemuOpts' short-form booleans, as libvirt writes them.
    case(
        "compat=1.1,lazy_refcounts,noextended_l2",
        &["lazy-refcounts=true", "extended-l2=false"],
    ),
    case(
        "cluster_size=512,refcount_bits=1",
        &["cluster-size=512", "refcount-bits=1"],
    ),
    case(
        "cluster_size=1k,refcount_bits=2",
        &["cluster-size=1024", "refcount-bits=2"],
    ),
    case(
        "cluster_size=4k,refcount_bits=4",
        &["cluster-size=4096", "refcount-bits=4"],
    ),
    case(
        "cluster_size=16k,refcount_bits=8,extended_l2=on",
        &["cluster-size=16384", "refcount-bits=8", "extended-l2=true"],
    ),
    case(
        "cluster_size=128k,refcount_bits=32",
        &["cluster-size=131072", "refcount-bits=32"],
    ),
    case(
        "cluster_size=2M,refcount_bits=64",
        &["cluster-size=2097152", "refcount-bits=64"],
    ),
    case(
        "extended_l2=on,cluster_size=2M,preallocation=metadata",
        &["extended-l2=true", "cluster-size=2097152"],
    ),
    case("compression_type=zstd", &["compression-type=zstd"]),
    case(
        "data_file={}.data",
        &["data-file={}.data", "data-file-raw=false"],
    ),
    case(
        "data_file={}.data,data_file_raw=on,preallocation=full",
        &["data-file={}.data", "data-file-raw=true"],
    ),
    case(
        "data_file={}.data,data_file_raw=off,extended_l2=on,preallocation=falloc",
        &["data-file={}.data", "extended-l2=true"],
    ),
    case("preallocation=metadata", &["compat=1.1"]),
    case(
        "preallocation=falloc,cluster_size=8k",
        &["cluster-size=8192"],
    ),
    case("preallocation=full,cluster_size=512", &["cluster-size=512"]),
    case("nocow=on,extent_size_hint=0", &["compat=1.1"]),
    case(
        "backing_file=base.qcow2,backing_fmt=qcow2",
        &[
            "backing-filename=base.qcow2",
            "backing-filename-format=qcow2",
        ],
    ),
    case(
        "backing_file=base.raw,backing_fmt=raw,cluster_size=4k,data_file={}.data",
        &[
            "backing-filename=base.raw",
            "backing-filename-format=raw",
            "data-file={}.data",
        ],
    ),
    case(
        "backing_file=base.vmdk,backing_fmt=vmdk",
        &["backing-filename=base.vmdk", "backing-filename-format=vmdk"],
    ),
    case(
        "backing_file=base.vdi,backing_fmt=vdi,extended_l2=on,preallocation=metadata",
        &["backing-filename=base.vdi", "extended-l2=true"],
    ),
    case(
        "encrypt.format=aes,encrypt.key-secret=s0",
        &["encrypt.format=aes"],
    ),
    case(
        "encryption=on,encrypt.key-secret=s0,compat=0.10",
        &["encrypt.format=aes", "compat=0.10"],
    ),
    // `qcow` is aes's QAPI name; `encryption` is an alias of encrypt.format: its last value
    // counts.
    case(
        "encrypt.format=qcow,encrypt.key-secret=s0",
        &["encrypt.format=aes"],
    ),
    case(
        "encryption=off,encryption=on,encrypt.key-secret=s0",
        &["encrypt.format=aes"],
    ),
    case("encryption=on,encryption=off", &["compat=1.1"]),
    // Preallocated encrypted clusters hold plaintext zeroes: they read as noise, and convert
    // writes the source's zeroes over them.
    case(
        "encrypt.format=aes,encrypt.key-secret=s0,compat=0.10,preallocation=full",
        &["encrypt.format=aes", "compat=0.10"],
    ),
    case(
        "encrypt.format=aes,encrypt.key-secret=s0,preallocation=falloc",
        &["encrypt.format=aes"],
    ),
    luks_case(
        "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10,preallocation=metadata",
        &["encrypt.format=luks"],
        Qemu::Create,
    ),
    luks_case(
        "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10",
        &[
            "encrypt.format=luks",
            "cipher-alg=aes-256",
            "cipher-mode=xts",
            "ivgen-alg=plain64",
            "hash-alg=sha256",
        ],
        Qemu::Neither,
    ),
    luks_case(
        "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=0",
        &["encrypt.format=luks", "master-key-iters=1000", "iters=1000"],
        Qemu::Neither,
    ),
    luks_case(
        "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10,\
         encrypt.cipher-alg=aes-128,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv,\
         encrypt.ivgen-hash-alg=md5,encrypt.hash-alg=sha512,data_file={}.data",
        &[
            "cipher-alg=aes-128",
            "cipher-mode=cbc",
            "ivgen-alg=essiv",
            "ivgen-hash-alg=md5",
            "hash-alg=sha512",
            "data-file={}.data",
        ],
        Qemu::Create,
    ),
];

const QCOW2_COMPRESSED: &[Case] = &[
    case("", &["compression-type=zlib"]),
    case("compression_type=zstd", &["compression-type=zstd"]),
    case("compat=0.10", &["compat=0.10"]),
    case("cluster_size=512", &["cluster-size=512"]),
    case(
        "cluster_size=2M,compression_type=zstd",
        &["cluster-size=2097152", "compression-type=zstd"],
    ),
    case(
        "extended_l2=on,compression_type=zstd,cluster_size=16k",
        &["extended-l2=true", "compression-type=zstd"],
    ),
    case(
        "lazy_refcounts=on,refcount_bits=1",
        &["lazy-refcounts=true", "refcount-bits=1"],
    ),
];

const QCOW2_REFUSED: &[&str] = &[
    // Short forms: `cluster_size=on` is no size, and `nocow` is `cow=off`.
    "cluster_size",
    "nocow",
    "compat=2",
    "compat=0.10,lazy_refcounts=on",
    "compat=0.10,refcount_bits=8",
    "compat=0.10,extended_l2=on",
    "compat=0.10,compression_type=zstd",
    "compat=0.10,data_file={}.data",
    "cluster_size=256",
    "cluster_size=3k",
    "cluster_size=4M",
    "extended_l2=on,cluster_size=8k",
    "refcount_bits=0",
    "refcount_bits=3",
    "refcount_bits=128",
    "compression_type=lz4",
    "preallocation=bogus",
    "lazy_refcounts=maybe",
    "data_file_raw=on",
    "backing_file=base.qcow2",
    "backing_fmt=qcow2",
    "backing_file=base.qcow2,backing_fmt=qcow2,preallocation=metadata",
    "backing_file=base.qcow2,backing_fmt=qcow2,data_file={}.data,data_file_raw=on",
    "encrypt.format=luks",
    "encrypt.format=bogus,encrypt.key-secret=s0",
    "encrypt.key-secret=s0",
    "encrypt.format=luks,encrypt.key-secret=nope",
    "encrypt.format=aes,encrypt.key-secret=s0,encrypt.cipher-alg=aes-256",
    "encrypt.format=luks,encrypt.key-secret=s0,encrypt.cipher-alg=cast5-128",
    // ESSIV keys the cipher with the hash: SHA-1's 20 bytes fit no AES key.
    "encrypt.format=luks,encrypt.key-secret=s0,encrypt.cipher-alg=aes-128,\
     encrypt.ivgen-alg=essiv,encrypt.ivgen-hash-alg=sha1",
    "encryption=maybe,encrypt.key-secret=s0",
    // Only on and off mean anything, and not next to the option it is an alias of.
    "encryption=yes,encrypt.key-secret=s0",
    "encrypt.format=on,encrypt.key-secret=s0",
    "encryption=on,encrypt.format=luks,encrypt.key-secret=s0",
    "encryption=on,encrypt.format=aes,encrypt.key-secret=s0",
    "extent_size_hint=5G",
];

/// What qemu-img refuses to compress into: preallocated, encrypted, or with a data file.
const QCOW2_COMPRESSED_REFUSED: &[&str] = &[
    "preallocation=metadata",
    "preallocation=full",
    "encrypt.format=aes,encrypt.key-secret=s0",
    "data_file={}.data",
];

#[test]
fn qcow2_every_option_both_ways() {
    Matrix {
        fmt: "qcow2",
        cases: QCOW2,
        compressed: QCOW2_COMPRESSED,
        refused: QCOW2_REFUSED,
        compressed_refused: QCOW2_COMPRESSED_REFUSED,
    }
    .run();
}

const VMDK: &[Case] = &[
    case(
        "",
        &[
            "create-type=monolithicSparse",
            "ddb.adapterType=ide",
            "ddb.virtualHWVersion=4",
            "ddb.toolsVersion=2147483647",
            "ddb.geometry.heads=16",
            "zeroed-grain=false",
        ],
    ),
    case(
        "subformat=monolithicSparse,adapter_type=ide,hwversion=undefined,compat6=off,\
         zeroed_grain=off,preallocation=off",
        &[
            "create-type=monolithicSparse",
            "ddb.virtualHWVersion=4",
            "zeroed-grain=false",
        ],
    ),
    case(
        "subformat=monolithicFlat,adapter_type=lsilogic",
        &[
            "create-type=monolithicFlat",
            "ddb.adapterType=lsilogic",
            "ddb.geometry.heads=255",
        ],
    ),
    case(
        "subformat=twoGbMaxExtentSparse,adapter_type=buslogic,zeroed_grain=on",
        &[
            "create-type=twoGbMaxExtentSparse",
            "ddb.adapterType=buslogic",
            "zeroed-grain=true",
        ],
    ),
    case(
        "subformat=twoGbMaxExtentFlat,adapter_type=legacyESX",
        &[
            "create-type=twoGbMaxExtentFlat",
            "ddb.adapterType=legacyESX",
        ],
    ),
    case(
        "subformat=streamOptimized",
        &["create-type=streamOptimized", "compressed=true"],
    ),
    case(
        "subformat=streamOptimized,compat6=on,zeroed_grain=on",
        &[
            "create-type=streamOptimized",
            "ddb.virtualHWVersion=6",
            "zeroed-grain=true",
        ],
    ),
    case(
        "hwversion=7,toolsversion=12345",
        &["ddb.virtualHWVersion=7", "ddb.toolsVersion=12345"],
    ),
    case("compat6=on", &["ddb.virtualHWVersion=6"]),
    case(
        "zeroed_grain=on,hwversion=21",
        &["zeroed-grain=true", "ddb.virtualHWVersion=21"],
    ),
    case(
        "subformat=monolithicFlat,preallocation=full",
        &["create-type=monolithicFlat"],
    ),
    case(
        "subformat=twoGbMaxExtentFlat,preallocation=falloc",
        &["create-type=twoGbMaxExtentFlat"],
    ),
    case(
        "preallocation=falloc,nocow=on,extent_size_hint=0",
        &["create-type=monolithicSparse"],
    ),
    case(
        "backing_file=base.vmdk,backing_fmt=vmdk",
        &["backing-filename=base.vmdk", "backing-filename-format=vmdk"],
    ),
    case(
        "subformat=twoGbMaxExtentSparse,backing_file=base.vmdk,backing_fmt=vmdk",
        &["backing-filename=base.vmdk"],
    ),
    case(
        "subformat=streamOptimized,backing_file=base.vmdk,backing_fmt=vmdk",
        &["backing-filename=base.vmdk"],
    ),
    // A backing format alone is taken when it is vmdk, and changes nothing.
    case("backing_fmt=vmdk", &["create-type=monolithicSparse"]),
];

const VMDK_COMPRESSED: &[Case] = &[
    case("", &["create-type=monolithicSparse"]),
    case(
        "subformat=streamOptimized",
        &["create-type=streamOptimized"],
    ),
    case(
        "subformat=twoGbMaxExtentSparse,zeroed_grain=on",
        &["create-type=twoGbMaxExtentSparse", "zeroed-grain=true"],
    ),
];

const VMDK_REFUSED: &[&str] = &[
    "compat6=on,hwversion=6",
    "compat6=on,hwversion=7",
    "compat6=maybe",
    "adapter_type=scsi",
    "adapter_type=pvscsi",
    "subformat=vmfs",
    "subformat=bogus",
    "preallocation=metadata",
    "cluster_size=64k",
    "subformat=monolithicFlat,zeroed_grain=on",
    "subformat=twoGbMaxExtentFlat,zeroed_grain=on",
    "zeroed_grain=maybe",
    "backing_file=base.vmdk",
    "subformat=monolithicFlat,backing_file=base.vmdk,backing_fmt=vmdk",
    "subformat=twoGbMaxExtentFlat,backing_file=base.vmdk,backing_fmt=vmdk",
    "backing_file=base.qcow2,backing_fmt=qcow2",
    "backing_fmt=qcow2",
    "extent_size_hint=5G",
];

/// A flat extent holds whole clusters no more than raw does.
const VMDK_COMPRESSED_REFUSED: &[&str] = &[
    "subformat=monolithicFlat",
    "subformat=twoGbMaxExtentFlat",
    "preallocation=full",
];

#[test]
fn vmdk_every_option_both_ways() {
    Matrix {
        fmt: "vmdk",
        cases: VMDK,
        compressed: VMDK_COMPRESSED,
        refused: VMDK_REFUSED,
        compressed_refused: VMDK_COMPRESSED_REFUSED,
    }
    .run();
}

const VDI: &[Case] = &[
    case("", &["image-type=dynamic", "cluster-size=1048576"]),
    case("static=off", &["image-type=dynamic"]),
    case("static=on", &["image-type=static"]),
    case("preallocation=off", &["image-type=dynamic"]),
    case("preallocation=falloc", &["image-type=dynamic"]),
    case("preallocation=full", &["image-type=dynamic"]),
    case("static=on,preallocation=full", &["image-type=static"]),
    case(
        "static=on,preallocation=falloc,nocow=on",
        &["image-type=static"],
    ),
    case("nocow=on,extent_size_hint=0", &["image-type=dynamic"]),
];

const VDI_REFUSED: &[&str] = &[
    "preallocation=metadata",
    "preallocation=bogus",
    "static=maybe",
    "cluster_size=1M",
    "subformat=fixed",
    "backing_file=base.vdi,backing_fmt=vdi",
    "backing_fmt=vdi",
    "extent_size_hint=5G",
];

#[test]
fn vdi_every_option_both_ways() {
    Matrix {
        fmt: "vdi",
        cases: VDI,
        compressed: &[],
        refused: VDI_REFUSED,
        compressed_refused: &["", "static=on"],
    }
    .run();
}

const LUKS: &[Case] = &[
    luks_case(
        "key-secret=s0,iter-time=10,cipher-alg=aes-256,cipher-mode=xts,ivgen-alg=plain64,\
         hash-alg=sha256",
        &[
            "cipher-alg=aes-256",
            "cipher-mode=xts",
            "ivgen-alg=plain64",
            "hash-alg=sha256",
            "payload-offset=2068480",
        ],
        Qemu::Create,
    ),
    luks_case(
        "key-secret=s0,iter-time=10,cipher-alg=serpent-128,cipher-mode=cbc,ivgen-alg=essiv,\
         ivgen-hash-alg=sha256,hash-alg=sha1",
        &[
            "cipher-alg=serpent-128",
            "cipher-mode=cbc",
            "ivgen-alg=essiv",
            "ivgen-hash-alg=sha256",
            "hash-alg=sha1",
        ],
        Qemu::Neither,
    ),
    luks_case(
        "key-secret=s0,iter-time=10,cipher-alg=cast5-128,cipher-mode=ctr,ivgen-alg=plain,\
         hash-alg=md5",
        &[
            "cipher-alg=cast5-128",
            "cipher-mode=ctr",
            "ivgen-alg=plain",
            "hash-alg=md5",
        ],
        Qemu::Neither,
    ),
    luks_case(
        "key-secret=s0,iter-time=10,nocow=on,extent_size_hint=0,preallocation=off",
        &["cipher-alg=aes-256"],
        Qemu::Neither,
    ),
    // Preallocation covers header and payload; the payload's plaintext zeroes read as noise.
    luks_case(
        "key-secret=s0,iter-time=10,preallocation=full",
        &["allocated=all"],
        Qemu::Create,
    ),
    luks_case(
        "key-secret=s0,iter-time=10,preallocation=falloc",
        &["allocated=all"],
        Qemu::Neither,
    ),
    // No time for PBKDF2 at all: the minimum iterations.
    luks_case(
        "key-secret=s0,iter-time=0,preallocation=metadata",
        &["master-key-iters=1000", "iters=1000"],
        Qemu::Create,
    ),
];

const LUKS_REFUSED: &[&str] = &[
    "iter-time=10",
    "key-secret=nope,iter-time=10",
    "key-secret=s0,iter-time=10,detached-header=on",
    "key-secret=s0,iter-time=10,cipher-alg=sm4",
    "key-secret=s0,iter-time=10,cipher-mode=ofb",
    "key-secret=s0,iter-time=10,hash-alg=whirlpool",
    "key-secret=s0,iter-time=10,ivgen-alg=benbi",
    "key-secret=s0,iter-time=10,cipher-alg=cast5-128",
    "key-secret=s0,iter-time=10,preallocation=bogus",
    "key-secret=s0,iter-time=abc",
    "key-secret=s0,iter-time=10,backing_file=base.raw",
    "key-secret=s0,iter-time=10,backing_fmt=raw",
    "key-secret=s0,iter-time=10,cluster_size=64k",
];

#[test]
fn luks_every_option_both_ways() {
    Matrix {
        fmt: "luks",
        cases: LUKS,
        compressed: &[],
        refused: LUKS_REFUSED,
        compressed_refused: &["key-secret=s0,iter-time=10"],
    }
    .run();
}
