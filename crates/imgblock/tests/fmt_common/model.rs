//! Model-based tests of the write paths: random sequences of writes, zero writes, discards,
//! flushes, reopens, internal snapshots and growth, applied both to an image and to an
//! in-memory model of its guest view. Afterwards the image must read back as the model through
//! the library, pass `qemu-img check`, and `qemu-img compare` must find it identical to the
//! model written out as a raw file: qemu reads every byte the library wrote, so a mistake that
//! the library's writer and reader share cannot hide.

use std::collections::BTreeMap;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use imgblock::crypto::{Secret, Secrets};
use imgblock::raw::Preallocation;
use imgblock::{create, CreateOptions, Format, Image, OpenOptions};
use proptest::prelude::*;
use proptest::strategy::Union;

/// The passphrase of the encrypted images under test; qemu gets it as secret `s0`.
pub const PW: &str = "model-test-passphrase";

/// The longest write an op makes.
const MAX_WRITE: u64 = 256 << 10;
/// The longest zero write or discard an op makes: enough to cover whole 2 MiB clusters.
const MAX_ZERO: u64 = 5 << 19;
/// The most a grow op adds.
const MAX_GROW: u64 = 512 << 10;

/// What a discarded range reads as afterwards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Discard {
    /// Nothing changes: the format has no discard (vmdk, vdi and luks, as in qemu).
    Keeps,
    /// The whole allocation units inside the range read as zeroes (qcow2 v3).
    Zeroes,
    /// The whole allocation units inside the range read as the backing image, or as zeroes
    /// without one (qcow2 v2).
    Backing,
    /// Each byte of the range reads either as before or as zero: punching a hole in the host
    /// file is advisory (raw).
    OldOrZero,
}

/// What an image offers beyond writes, zero writes and flushes.
#[derive(Debug, Clone, Copy)]
pub struct Caps {
    /// What discard does.
    pub discard: Discard,
    /// The image can be closed and opened again mid-sequence.
    pub reopen: bool,
    /// Internal snapshots.
    pub snapshots: bool,
    /// Growing, in multiples of this many bytes; `None` when the format cannot resize.
    pub grow: Option<u64>,
    /// Growing works while the image has internal snapshots (qemu refuses it for qcow2 v2).
    pub grow_with_snapshots: bool,
    /// The largest refcount the image can hold: a snapshot that would share a cluster more
    /// often is refused (as qemu does), and leaves the image as it was.
    pub refcount_max: u64,
    /// `qemu-img check` knows the format.
    pub check: bool,
}

/// One step of a sequence. Offsets are relative to the start of the model's range and wrap
/// around its current length; lengths are cut at its end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Writes `len` bytes of [`data`] with this seed (seed 0: zeroes, as data).
    Write(u64, u64, u8),
    /// `write_zeroes(offset, len, unmap)`.
    Zero(u64, u64, bool),
    /// `discard(offset, len)`.
    Discard(u64, u64),
    /// `flush()`.
    Flush,
    /// Closes the image and opens it again.
    Reopen,
    /// Creates an internal snapshot.
    SnapCreate,
    /// Reverts to the snapshot with this index (modulo how many there are).
    SnapApply(usize),
    /// Deletes the snapshot with this index (modulo how many there are).
    SnapDelete(usize),
    /// Grows the disk by this many bytes.
    Grow(u64),
}

/// The byte a write with `seed` puts at guest offset `pos`: a hash of the position, so data
/// that lands at the wrong place (or reads from it) shows.
pub fn data(pos: u64, seed: u8) -> u8 {
    if seed == 0 {
        return 0;
    }
    (pos.wrapping_add(u64::from(seed))
        .wrapping_mul(0x9e37_79b9_7f4a_7c15)
        >> 56) as u8
        ^ seed
}

fn offset(max: u64) -> impl Strategy<Value = u64> {
    prop_oneof![
        2 => 0..max,
        1 => (0..max / 512).prop_map(|s| s * 512),
        1 => (0..max / 65536).prop_map(|s| s * 65536),
    ]
}

fn length(max: u64) -> impl Strategy<Value = u64> {
    prop_oneof![
        1 => 1..4096u64,
        2 => 1..max,
        1 => (1..=max / 4096).prop_map(|s| s * 4096),
        1 => (1..=max / 65536).prop_map(|s| s * 65536),
    ]
}

/// One op of the kinds `caps` allows, over a model range of `span` bytes.
pub fn op(caps: Caps, span: u64) -> BoxedStrategy<Op> {
    // Offsets reach into the space growing may add.
    let reach = if caps.grow.is_some() { 2 * span } else { span };
    let mut kinds: Vec<(u32, BoxedStrategy<Op>)> = vec![
        (
            8,
            (offset(reach), length(MAX_WRITE), any::<u8>())
                .prop_map(|(o, l, s)| Op::Write(o, l, s))
                .boxed(),
        ),
        (
            3,
            (offset(reach), length(MAX_ZERO), any::<bool>())
                .prop_map(|(o, l, u)| Op::Zero(o, l, u))
                .boxed(),
        ),
        (
            3,
            (offset(reach), length(MAX_ZERO))
                .prop_map(|(o, l)| Op::Discard(o, l))
                .boxed(),
        ),
        (1, Just(Op::Flush).boxed()),
    ];
    if caps.reopen {
        kinds.push((1, Just(Op::Reopen).boxed()));
    }
    if caps.snapshots {
        kinds.push((1, Just(Op::SnapCreate).boxed()));
        kinds.push((1, any::<u8>().prop_map(|i| Op::SnapApply(i.into())).boxed()));
        kinds.push((
            1,
            any::<u8>().prop_map(|i| Op::SnapDelete(i.into())).boxed(),
        ));
    }
    if let Some(a) = caps.grow {
        kinds.push((
            1,
            (1..=MAX_GROW / a)
                .prop_map(move |k| Op::Grow(k * a))
                .boxed(),
        ));
    }
    Union::new_weighted(kinds).boxed()
}

/// Sequences of up to 24 ops.
pub fn ops(caps: Caps, span: u64) -> impl Strategy<Value = Vec<Op>> {
    proptest::collection::vec(op(caps, span), 1..25)
}

/// An image under test, in a directory of its own.
pub struct Subject {
    /// Holds the image and whatever files it uses.
    pub dir: tempfile::TempDir,
    /// The image (for vmdk, the descriptor).
    pub path: PathBuf,
    /// Its format.
    pub format: Format,
    /// Encrypted with [`PW`].
    pub encrypted: bool,
    /// The model covers the guest range from here to the end of the disk; everything before
    /// it must read as zeroes. Lets a 2 GiB disk be tested around its extent boundary without
    /// a 2 GiB model.
    pub window: u64,
    /// The backing image's content, from `window` on.
    pub backing: Vec<u8>,
    /// A file that must hold the guest view as a raw image (qcow2's `data_file_raw`).
    pub raw_data_file: Option<PathBuf>,
    /// What the image offers.
    pub caps: Caps,
}

impl Subject {
    /// Creates `t.FORMAT` of `size` bytes with `-o` options `opts` (the secret `s0` is
    /// [`PW`]), over a raw backing image `base.raw` holding `backing` when given. An encrypted
    /// image is a copy of one made once per test process.
    pub fn create(
        format: Format,
        opts: &str,
        size: u64,
        caps: Caps,
        backing: Option<&[u8]>,
    ) -> Subject {
        let encrypted = opts.contains("key-secret");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(format!("t.{}", format.name()));
        let mut o = CreateOptions::new(size);
        o.parse_opts(opts).unwrap();
        if encrypted && backing.is_none() {
            copy_template(format, opts, size, dir.path());
        } else {
            make(dir.path(), &path, format, opts, size, backing);
        }
        let raw_data_file = match (o.get("data_file"), o.get("data_file_raw")) {
            (Some(d), Some("on")) => Some(dir.path().join(d)),
            _ => None,
        };
        Subject {
            path,
            format,
            encrypted,
            window: 0,
            backing: backing.map(<[u8]>::to_vec).unwrap_or_default(),
            raw_data_file,
            caps,
            dir,
        }
    }

    /// Opens the image writable.
    pub fn open(&self) -> imgblock::Result<Image> {
        self.open_with(&OpenOptions::writable())
    }

    /// Opens the image as told, with the secret.
    pub fn open_with(&self, o: &OpenOptions) -> imgblock::Result<Image> {
        let o = o.clone().format(Some(self.format));
        Image::open_with_secrets(&self.path, &o, &Secrets::all(Secret::from(PW)))
    }

    /// qemu's arguments naming the image: `-f FMT PATH`, or for an encrypted one the secret
    /// object and `--image-opts`.
    fn qemu_image_args(&self) -> Vec<String> {
        let p = self.path.display();
        let fmt = self.format.name();
        if self.encrypted {
            let key = if self.format == Format::Luks {
                "key-secret"
            } else {
                "encrypt.key-secret"
            };
            vec![
                "--object".into(),
                format!("secret,id=s0,data={PW}"),
                "--image-opts".into(),
                format!("driver={fmt},file.filename={p},{key}=s0"),
            ]
        } else {
            vec!["-f".into(), fmt.into(), p.to_string()]
        }
    }

    /// `qemu-img check` passes.
    pub fn qemu_check(&self) {
        let mut args = vec!["check".to_owned()];
        args.extend(self.qemu_image_args());
        self.qemu_ok(&args);
    }

    /// `qemu-img compare` finds the image identical to the raw file `raw`.
    pub fn qemu_compare(&self, raw: &Path) {
        let mut args = vec!["compare".to_owned()];
        if self.encrypted {
            // --image-opts names both images.
            let mut img = self.qemu_image_args();
            let opts = img.pop().unwrap_or_default();
            args.extend(img);
            args.push(format!("driver=raw,file.filename={}", raw.display()));
            args.push(opts);
        } else {
            args.extend(["-f", "raw", "-F", self.format.name()].map(str::to_owned));
            args.push(raw.display().to_string());
            args.push(self.path.display().to_string());
        }
        let out = self.qemu_ok(&args);
        assert!(out.contains("Images are identical"), "{out}");
    }

    /// The guest view of internal snapshot `name` through `qemu-img convert -l`.
    pub fn qemu_read_snapshot(&self, name: &str) -> Vec<u8> {
        let out = self.dir.path().join("snapshot.raw");
        let mut args: Vec<String> = ["convert", "-l", &format!("snapshot.name={name}")]
            .map(str::to_owned)
            .to_vec();
        args.extend(["-O", "raw"].map(str::to_owned));
        args.extend(self.qemu_image_args());
        args.push(out.display().to_string());
        self.qemu_ok(&args);
        let v = std::fs::read(&out).unwrap();
        std::fs::remove_file(&out).unwrap();
        v
    }

    /// Runs `qemu-img ARGS` in the image's directory, panicking with its output when it fails.
    fn qemu_ok(&self, args: &[String]) -> String {
        let o = super::output(Command::new("qemu-img").args(args).current_dir(&self.dir));
        let out = String::from_utf8_lossy(&o.stdout).into_owned();
        assert!(
            o.status.success(),
            "qemu-img {args:?} failed:\n{out}{}",
            String::from_utf8_lossy(&o.stderr)
        );
        out
    }
}

/// Creates image `path` in `dir` with `-o` options `opts`, over `base.raw` holding `backing`.
fn make(dir: &Path, path: &Path, format: Format, opts: &str, size: u64, backing: Option<&[u8]>) {
    let mut o = CreateOptions::new(size);
    o.parse_opts(opts).unwrap();
    // A relative data file name is created from the working directory, as qemu creates it.
    if let Some(d) = o.get("data_file").map(|d| dir.join(d)) {
        o.set("data_file", &d.display().to_string());
    }
    o.secrets.insert("s0".into(), Secret::from(PW));
    if let Some(b) = backing {
        std::fs::write(dir.join("base.raw"), b).unwrap();
        o.backing_file = Some("base.raw".into());
        o.backing_fmt = Some("raw".into());
    }
    create(path, format, &o).unwrap_or_else(|e| panic!("create {format} {opts}: {e}"));
}

/// Writes into `dir` the files of a new image made once per test process (and kept in
/// memory): a LUKS key slot takes a PBKDF benchmark, about 0.4 s, each time one is made.
fn copy_template(format: Format, opts: &str, size: u64, dir: &Path) {
    type Files = Vec<(std::ffi::OsString, Vec<u8>)>;
    static TEMPLATES: Mutex<BTreeMap<String, Files>> = Mutex::new(BTreeMap::new());
    let mut t = TEMPLATES.lock().unwrap_or_else(|e| e.into_inner());
    let files = t
        .entry(format!("{format} {size} {opts}"))
        .or_insert_with(|| {
            let d = tempfile::tempdir().unwrap();
            let p = d.path().join(format!("t.{}", format.name()));
            make(d.path(), &p, format, opts, size, None);
            std::fs::read_dir(d.path())
                .unwrap()
                .map(|e| {
                    let e = e.unwrap();
                    (e.file_name(), std::fs::read(e.path()).unwrap())
                })
                .collect()
        });
    for (name, bytes) in files.iter() {
        std::fs::write(dir.join(name), bytes).unwrap();
    }
}

/// Writes `model` as a raw image of `window + model.len()` bytes, holes before the window.
pub fn write_raw(path: &Path, window: u64, model: &[u8]) {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(window + model.len() as u64).unwrap();
    f.write_all_at(model, window).unwrap();
}

/// The first offset where `got` and `want` differ.
pub fn first_difference(got: &[u8], want: &[u8]) -> Option<usize> {
    got.iter().zip(want).position(|(a, b)| a != b)
}

/// Asserts that the image reads as `model` from `window` on, and as zeroes before it.
pub fn assert_reads_as(img: &Image, window: u64, model: &[u8], ctx: &dyn std::fmt::Display) {
    assert_eq!(img.size(), window + model.len() as u64, "size, {ctx}");
    let mut got = vec![0u8; model.len()];
    img.read_at(&mut got, window).unwrap();
    if let Some(i) = first_difference(&got, model) {
        panic!(
            "guest offset {:#x} reads {:#04x}, the model says {:#04x}; {ctx}",
            window + i as u64,
            got[i],
            model[i]
        );
    }
    let mut off = 0;
    let mut buf = vec![0u8; 1 << 20];
    while off < window {
        let st = img.block_status(off, window - off).unwrap();
        let n = st.len.clamp(1, window - off);
        if !st.zero {
            let mut p = off;
            while p < off + n {
                let k = (off + n - p).min(buf.len() as u64);
                img.read_at(&mut buf[..k as usize], p).unwrap();
                assert!(
                    buf[..k as usize].iter().all(|&b| b == 0),
                    "data before the model's range near {p:#x}; {ctx}"
                );
                p += k;
            }
        }
        off += n;
    }
}

/// A sequence being applied: the image, the model and what was done so far.
struct Run<'a> {
    s: &'a Subject,
    img: Option<Image>,
    model: Vec<u8>,
    /// The span the sequence started with.
    first: u64,
    snaps: Vec<(String, Vec<u8>)>,
    next_snap: usize,
    /// The ops applied so far, with offsets and lengths resolved (a failure prints them: run
    /// as they are, they do the same).
    done: Vec<Op>,
}

impl std::fmt::Display for Run<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {} after {:?}",
            self.s.format,
            self.s.path.display(),
            self.done
        )
    }
}

impl Run<'_> {
    fn img(&self) -> &Image {
        self.img.as_ref().expect("the image is open")
    }

    fn span(&self) -> u64 {
        self.model.len() as u64
    }

    /// What a range dropped from the image reads as at model offset `i`.
    fn below(&self, i: usize) -> u8 {
        self.s.backing.get(i).copied().unwrap_or(0)
    }

    #[track_caller]
    fn ok<T>(&self, what: &Op, r: imgblock::Result<T>) -> T {
        r.unwrap_or_else(|e| panic!("{what:?} failed: {e}; {self}"))
    }

    /// Resolves an op's offset and length against the current span.
    fn range(&self, o: u64, l: u64) -> (u64, u64) {
        let o = o % self.span();
        (o, l.min(self.span() - o))
    }

    fn apply(&mut self, op: &Op) {
        let w = self.s.window;
        let done = match *op {
            Op::Write(o, l, seed) => {
                let (o, l) = self.range(o, l);
                let buf: Vec<u8> = (w + o..w + o + l).map(|p| data(p, seed)).collect();
                let op = Op::Write(o, l, seed);
                self.ok(&op, self.img().write_at(&buf, w + o));
                self.model[o as usize..(o + l) as usize].copy_from_slice(&buf);
                op
            }
            Op::Zero(o, l, unmap) => {
                let (o, l) = self.range(o, l);
                let op = Op::Zero(o, l, unmap);
                self.ok(&op, self.img().write_zeroes(w + o, l, unmap));
                self.model[o as usize..(o + l) as usize].fill(0);
                op
            }
            Op::Discard(o, l) => {
                let (o, l) = self.range(o, l);
                let op = Op::Discard(o, l);
                self.ok(&op, self.img().discard(w + o, l));
                self.discarded(&op, o, l);
                op
            }
            Op::Flush => {
                self.ok(op, self.img().flush());
                Op::Flush
            }
            Op::Reopen => {
                drop(self.img.take());
                self.img = Some(self.ok(op, self.s.open()));
                Op::Reopen
            }
            Op::SnapCreate => {
                let name = format!("snap{}", self.next_snap);
                self.next_snap += 1;
                match self.img().snapshot_create(&name) {
                    Ok(()) => self.snaps.push((name, self.model.clone())),
                    // The new snapshot shares every cluster of the active state, which the
                    // others may share already: past the refcount width only when there are
                    // enough of them.
                    Err(imgblock::Error::Qcow2 {
                        source: imgblock::qcow2::Error::RefcountOverflow(_),
                        ..
                    }) if self.snaps.len() as u64 + 2 > self.s.caps.refcount_max => {}
                    Err(e) => panic!("{op:?} failed: {e}; {self}"),
                }
                Op::SnapCreate
            }
            Op::SnapApply(i) => {
                if self.snaps.is_empty() {
                    return;
                }
                let i = i % self.snaps.len();
                let name = self.snaps[i].0.clone();
                let op = Op::SnapApply(i);
                let r = self.img.as_mut().map(|img| img.snapshot_apply(&name));
                self.ok(&op, r.expect("the image is open"));
                self.model.clone_from(&self.snaps[i].1);
                op
            }
            Op::SnapDelete(i) => {
                if self.snaps.is_empty() {
                    return;
                }
                let i = i % self.snaps.len();
                let op = Op::SnapDelete(i);
                self.ok(&op, self.img().snapshot_delete(&self.snaps[i].0));
                self.snaps.remove(i);
                op
            }
            Op::Grow(d) => {
                // At most twice the first span, so that offsets still reach everywhere.
                if self.span() + d > 2 * self.first {
                    return;
                }
                let new = w + self.span() + d;
                let r = self
                    .img
                    .as_mut()
                    .map(|img| img.resize(new, Preallocation::Off))
                    .expect("the image is open");
                if self.snaps.is_empty() || self.s.caps.grow_with_snapshots {
                    self.ok(op, r);
                    self.model.resize((new - w) as usize, 0);
                } else {
                    assert!(r.is_err(), "{op:?} with snapshots succeeded; {self}");
                }
                Op::Grow(d)
            }
        };
        self.done.push(done);
        let size = self.img().size();
        assert_eq!(size, w + self.span(), "disk size; {self}");
    }

    /// Updates the model for a discard of `[o, o + l)` as the format defines it.
    fn discarded(&mut self, op: &Op, o: u64, l: u64) {
        let w = self.s.window;
        match self.s.caps.discard {
            Discard::Keeps => {}
            Discard::Zeroes | Discard::Backing => {
                // Image::discard drops the whole granules inside the range; the last one
                // counts whole when the range reaches the end of the disk.
                let g = self.img().driver().cow_granularity().max(1);
                let (start, end) = (w + o, w + o + l);
                let a = start.div_ceil(g) * g;
                let b = if end == w + self.span() {
                    end
                } else {
                    end / g * g
                };
                for p in a..b.max(a) {
                    let i = (p - w) as usize;
                    self.model[i] = if self.s.caps.discard == Discard::Zeroes {
                        0
                    } else {
                        self.below(i)
                    };
                }
            }
            Discard::OldOrZero => {
                let mut got = vec![0u8; l as usize];
                self.ok(op, self.img().read_at(&mut got, w + o));
                let old = &self.model[o as usize..(o + l) as usize];
                if let Some(i) = got.iter().zip(old).position(|(&g, &m)| g != m && g != 0) {
                    panic!(
                        "discarded guest offset {:#x} reads {:#04x}, neither zero nor the old {:#04x}; {self}",
                        w + o + i as u64,
                        got[i],
                        old[i]
                    );
                }
                self.model[o as usize..(o + l) as usize].copy_from_slice(&got);
            }
        }
    }
}

/// Applies `ops` to the subject's image and to the model, then checks the image: it reads back
/// as the model through the library (and so do its snapshots), `qemu-img check` passes and
/// `qemu-img compare` finds it identical to the model as a raw file.
pub fn run(s: &Subject, ops: &[Op]) {
    let img = s
        .open()
        .unwrap_or_else(|e| panic!("open {}: {e}", s.path.display()));
    let span = img.size() - s.window;
    let mut model = s.backing.clone();
    model.resize(span as usize, 0);
    if !img.driver().has_zero_init() {
        // A new luks payload decrypts to noise (as in qemu): the model starts from it, and
        // qemu-img compare checks it at the end.
        img.read_at(&mut model, s.window).unwrap();
    }
    let mut r = Run {
        s,
        img: Some(img),
        model,
        first: span,
        snaps: Vec::new(),
        next_snap: 0,
        done: Vec::new(),
    };
    for op in ops {
        r.apply(op);
    }
    let img = r.img.take().expect("the image is open");
    r.ok(&Op::Flush, img.flush());
    assert_reads_as(&img, s.window, &r.model, &r);
    drop(img);
    for (name, want) in &r.snaps {
        let o = OpenOptions {
            snapshot: Some(name.clone().into()),
            ..OpenOptions::read_only()
        };
        let img = s
            .open_with(&o)
            .unwrap_or_else(|e| panic!("open snapshot {name}: {e}; {r}"));
        let ctx = format!("snapshot {name}; {r}");
        // Like qemu's (qcow2_snapshot_load_tmp), the view loads the snapshot's tables but keeps
        // the image's current disk size: a snapshot taken at another size reads cut short or
        // padded with zeroes.
        let mut at_size = want.clone();
        at_size.resize(r.model.len(), 0);
        assert_reads_as(&img, s.window, &at_size, &ctx);
        drop(img);
        // qemu reads what the library wrote for the snapshot too.
        let got = s.qemu_read_snapshot(name);
        let mut full = vec![0u8; s.window as usize];
        full.extend_from_slice(want);
        assert_eq!(
            got.len(),
            s.window as usize + r.model.len(),
            "qemu's size of {ctx}"
        );
        if let Some(i) = first_difference(&got, &full) {
            panic!(
                "qemu reads {:#04x} at {i:#x} of {ctx}, the model {:#04x}",
                got[i], full[i]
            );
        }
        if let Some(i) = got
            .get(full.len()..)
            .and_then(|t| t.iter().position(|&b| b != 0))
        {
            panic!(
                "qemu reads data past the end of {ctx}, at {:#x}",
                full.len() + i
            );
        }
    }
    verify_with_qemu(s, &r.model, &r);
}

/// `qemu-img check` (where the format has one) and `qemu-img compare` against `model`; a raw
/// data file must hold the model too.
pub fn verify_with_qemu(s: &Subject, model: &[u8], ctx: &dyn std::fmt::Display) {
    if s.caps.check {
        s.qemu_check();
    }
    let raw = s.dir.path().join("model.raw");
    write_raw(&raw, s.window, model);
    s.qemu_compare(&raw);
    if let Some(d) = &s.raw_data_file {
        let got = std::fs::read(d).unwrap();
        let mut want = vec![0u8; s.window as usize];
        want.extend_from_slice(model);
        assert!(
            got.len() >= want.len(),
            "the raw data file is {} bytes; {ctx}",
            got.len()
        );
        if let Some(i) = first_difference(&got, &want) {
            panic!(
                "the raw data file holds {:#04x} at {i:#x}, the model {:#04x}; {ctx}",
                got[i], want[i]
            );
        }
    }
    std::fs::remove_file(&raw).unwrap();
}
