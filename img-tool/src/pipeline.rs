//! The parallel copy engine behind `img convert`.
//!
//! ```text
//!  planner (caller's thread)      workers (N threads)                writer (1 thread)
//!  block status → segments  ──►  take a pool buffer, then a job:  ──► in guest order:
//!  (holes never reach a read)    read, detect zeroes, compress        write, return buffer
//!                                 └── out of order: write here, return the buffer
//! ```
//!
//! Memory is a fixed pool of aligned buffers, whatever the image size: a worker takes a buffer
//! before it takes a job, so the job the writer waits for always has one and the pipeline cannot
//! deadlock. Writes go in guest order where the target's layout depends on it (compressed
//! qcow2, streamOptimized vmdk, and every allocating format unless `-W` is given, so that the
//! output is the same whatever the number of workers), and straight from the workers otherwise.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::Mutex;

use imgblock::Image;

use crate::console;
use crate::failure::{CliResult, Failure};
use crate::progress::Progress;
use crate::ratelimit::RateLimit;
use crate::sectors::{data_run, SECTOR};

/// Bytes per plain copy step: large enough for the disk and the page cache to stream.
pub const CHUNK: u64 = 2 << 20;
/// Bytes per compression job (whole clusters, at least one).
pub const COMPRESS_BATCH: u64 = 1 << 20;
/// Alignment of pool buffers: what `O_DIRECT` needs on any Linux filesystem.
const BUF_ALIGN: usize = 4096;
/// The most buffers in the pool, whatever `-m` says: 16 × 2 MiB bounds the data in flight.
const MAX_BUFFERS: usize = 16;

/// What to do with one range of the source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Leave it to the target's backing file.
    Skip,
    /// Make it read as zeroes.
    Zero,
    /// Read and copy (with zero detection).
    Copy,
}

/// Block status as convert reads it: what to do at `offset` of a source, and for how many bytes
/// (at most `len`). The last argument is where `offset` lands in the target.
pub type Planner<'a> = dyn Fn(&Image, u64, u64, u64) -> CliResult<(Action, u64)> + 'a;

/// How zero runs in copied data are written.
#[derive(Debug, Clone, Copy)]
pub struct Sparse {
    /// -S in sectors; 0 writes everything.
    pub min_sparse: usize,
    /// Writes are aligned to this many sectors.
    pub alignment: u64,
    /// The target reads as zeroes where nothing is written: zero runs need no write at all.
    pub zero_init: bool,
}

/// How the target is written.
#[derive(Debug, Clone, Copy)]
pub enum Mode {
    /// Plain data; `in_order` when the target's layout depends on the order of writes;
    /// `offload` to let the kernel copy data between files where it can (`-C`).
    Plain { in_order: bool, offload: bool },
    /// Each cluster compressed (`-c`, streamOptimized), always written in guest order. When
    /// `planned`, each cluster is planned (copied, zeroed or left to the target's backing file)
    /// as plain copies are; otherwise every cluster is read and holes written as zeroes.
    Compressed { cluster: usize, planned: bool },
}

/// How the copy runs: its worker threads (`-m`), its cap on bytes written (`-r`), and what it
/// does with unreadable source data (`--salvage`).
#[derive(Debug, Clone, Copy)]
pub struct Settings<'a> {
    /// Threads that read, detect zeroes and compress.
    pub workers: usize,
    /// At most so many bytes written per second.
    pub rate: Option<&'a RateLimit>,
    /// Sectors that cannot be read are copied as zeroes, with a warning each.
    pub salvage: bool,
    /// No warnings (`-q`).
    pub quiet: bool,
}

/// A 4 KiB-aligned buffer of up to `cap` bytes, so that `O_DIRECT` can use it as it is.
struct Buf {
    raw: Vec<u8>,
    start: usize,
    cap: usize,
}

impl Buf {
    fn new(cap: usize) -> Self {
        let raw = vec![0u8; cap + BUF_ALIGN];
        let start = raw.as_ptr().align_offset(BUF_ALIGN).min(BUF_ALIGN);
        Buf { raw, start, cap }
    }
    fn get(&mut self, len: usize) -> &mut [u8] {
        &mut self.raw[self.start..self.start + len.min(self.cap)]
    }
}

/// One range of the target, in guest order.
struct Job {
    index: u64,
    /// Offset in the target (and in the concatenated sources).
    offset: u64,
    len: u64,
    action: Action,
}

/// A job a worker has finished, on its way to the in-order writer.
struct Done {
    job: Job,
    buf: Option<Buf>,
    /// Plain: the leading runs of data/zeroes. Compressed: nothing.
    runs: Vec<(bool, usize)>,
    /// Compressed: each cluster, `None` when it is all zeroes, `Some(None)` when it did not
    /// shrink.
    clusters: Vec<Option<Option<Vec<u8>>>>,
    result: CliResult<()>,
}

/// Shared state of one copy.
struct Shared<'a> {
    sources: &'a [Image],
    target: &'a Image,
    sparse: Sparse,
    progress: &'a Progress,
    settings: Settings<'a>,
    mode: Mode,
    stop: AtomicBool,
    error: Mutex<Option<Failure>>,
    pool_tx: SyncSender<Buf>,
    pool_rx: Mutex<Receiver<Buf>>,
}

impl Shared<'_> {
    /// Whether `job` is data to try copying inside the kernel.
    fn offloads(&self, job: &Job) -> bool {
        job.action == Action::Copy && matches!(self.mode, Mode::Plain { offload: true, .. })
    }

    fn fail(&self, f: Failure) {
        self.stop.store(true, Ordering::SeqCst);
        let mut e = self.error.lock().unwrap_or_else(|e| e.into_inner());
        e.get_or_insert(f);
    }
    fn stopped(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }
    /// Paces the copy after `n` bytes were written (`-r`).
    fn wrote(&self, n: u64) {
        if let Some(r) = self.settings.rate {
            r.wrote(n);
        }
    }

    /// Reads `buf.len()` bytes of the sources at `offset` (whether any was data); with
    /// `--salvage` a failed read is retried sector by sector, and what still fails reads as
    /// zeroes, with qemu-img's warning.
    fn read(&self, offset: u64, buf: &mut [u8]) -> CliResult<bool> {
        match read_concat(self.sources, offset, buf) {
            Err(_) if self.settings.salvage => {}
            other => return other,
        }
        for (i, sector) in buf.chunks_mut(SECTOR).enumerate() {
            let at = offset + (i * SECTOR) as u64;
            if let Err(f) = read_concat(self.sources, at, sector) {
                sector.fill(0);
                if !self.settings.quiet {
                    console::eprint(&format!(
                        "img: warning: error while reading offset {at}: {f}\n"
                    ));
                }
            }
        }
        Ok(true)
    }
    fn give_back(&self, buf: Option<Buf>) {
        if let Some(b) = buf {
            // The pool has room for every buffer it started with.
            let _ = self.pool_tx.try_send(b);
        }
    }
}

/// Copies the concatenation of `sources` into `target`: `plan` answers, for each offset, what to
/// do and for how long (block status).
///
/// # Errors
/// The first read or write error any thread met.
pub fn copy(
    sources: &[Image],
    target: &Image,
    sparse: Sparse,
    mode: Mode,
    settings: Settings<'_>,
    progress: &Progress,
    plan: &Planner<'_>,
) -> CliResult<()> {
    let workers = settings.workers.max(1);
    let (buf_len, step) = match mode {
        Mode::Plain { .. } => (CHUNK, CHUNK),
        Mode::Compressed { cluster, .. } => {
            let cs = cluster as u64;
            let batch = COMPRESS_BATCH.max(cs) / cs * cs;
            (batch, batch)
        }
    };
    let nbuf = (workers * 2 + 2).min(MAX_BUFFERS).max(workers + 1);
    let (pool_tx, pool_rx) = sync_channel::<Buf>(nbuf);
    let cap = usize::try_from(buf_len).map_err(|_| Failure::new("cluster size too large"))?;
    for _ in 0..nbuf {
        let _ = pool_tx.try_send(Buf::new(cap));
    }
    let shared = Shared {
        sources,
        target,
        sparse,
        progress,
        settings,
        mode,
        stop: AtomicBool::new(false),
        error: Mutex::new(None),
        pool_tx,
        pool_rx: Mutex::new(pool_rx),
    };
    let in_order = !matches!(
        mode,
        Mode::Plain {
            in_order: false,
            ..
        }
    );
    let (job_tx, job_rx) = sync_channel::<Job>(workers * 2);
    let job_rx = Mutex::new(job_rx);
    std::thread::scope(|s| {
        let (done_tx, done_rx) = sync_channel::<Done>(nbuf);
        for _ in 0..workers {
            let done_tx = in_order.then(|| done_tx.clone());
            let (sh, rx) = (&shared, &job_rx);
            s.spawn(move || worker(sh, rx, done_tx.as_ref()));
        }
        drop(done_tx);
        let sh = &shared;
        let writer = in_order.then(|| s.spawn(move || write_in_order(sh, done_rx)));
        let planned = plan_jobs(&shared, step, &job_tx, plan);
        drop(job_tx);
        if let Err(f) = planned {
            shared.fail(f);
        }
        if let Some(w) = writer {
            if w.join().is_err() {
                shared.fail(Failure::new("convert: writer thread failed"));
            }
        }
    });
    match shared.error.into_inner() {
        Ok(Some(f)) => Err(f),
        Ok(None) => Ok(()),
        Err(poisoned) => poisoned.into_inner().map_or(Ok(()), Err),
    }
}

/// Walks the sources with block status and queues jobs: zero and skipped ranges whole, data in
/// `step`-aligned pieces (compressed: whole batches of clusters, which may mix data and holes).
fn plan_jobs(
    sh: &Shared<'_>,
    step: u64,
    jobs: &SyncSender<Job>,
    plan: &Planner<'_>,
) -> CliResult<()> {
    let mut index = 0;
    let mut send = |offset: u64, len: u64, action: Action| -> bool {
        let job = Job {
            index,
            offset,
            len,
            action,
        };
        index += 1;
        !sh.stopped() && jobs.send(job).is_ok()
    };
    if let Mode::Compressed { cluster, planned } = sh.mode {
        let total = sh
            .target
            .size()
            .min(sh.sources.iter().map(Image::size).sum());
        if planned {
            return plan_clusters(sh, cluster as u64, step, total, &mut send, plan);
        }
        let mut offset = 0;
        while offset < total {
            let len = step.min(total - offset);
            if !send(offset, len, Action::Copy) {
                break;
            }
            offset += len;
        }
        return Ok(());
    }
    let mut base = 0u64;
    for src in sh.sources {
        let size = src.size();
        let mut offset = 0;
        let mut ahead = None;
        while offset < size {
            let mut status = |at: u64| plan(src, at, size - at, base + at);
            let (action, n) = next_job(&mut status, offset, size, base, step, &mut ahead)?;
            if !send(base + offset, n, action) {
                return Ok(());
            }
            offset += n;
        }
        base += size;
    }
    Ok(())
}

/// Compressed jobs, cluster by cluster as `plan` says: a cluster left wholly to the target's
/// backing file is skipped, one that wholly reads as zeroes is zeroed, any other is copied (a
/// compressed cluster is written whole). Runs of clusters alike make one job of at most `step`.
fn plan_clusters(
    sh: &Shared<'_>,
    cs: u64,
    step: u64,
    total: u64,
    send: &mut dyn FnMut(u64, u64, Action) -> bool,
    plan: &Planner<'_>,
) -> CliResult<()> {
    // The planner's last answer: its action and the target range it covers.
    let mut known: Option<(Action, u64, u64)> = None;
    let mut query = |at: u64| -> CliResult<(Action, u64)> {
        if let Some((a, start, end)) = known {
            if (start..end).contains(&at) {
                return Ok((a, end));
            }
        }
        let mut base = 0;
        for src in sh.sources {
            let size = src.size();
            if at < base + size {
                let (a, n) = plan(src, at - base, base + size - at, at)?;
                let end = at + n.clamp(1, base + size - at);
                known = Some((a, at, end));
                return Ok((a, end));
            }
            base += size;
        }
        Ok((Action::Zero, total))
    };
    let mut run: Option<(Action, u64, u64)> = None;
    let mut offset = 0;
    while offset < total {
        let end = (offset + cs).min(total);
        let (mut skip, mut zero, mut copy) = (false, false, false);
        let mut at = offset;
        while at < end {
            let (a, until) = query(at)?;
            match a {
                Action::Skip => skip = true,
                Action::Zero => zero = true,
                Action::Copy => copy = true,
            }
            at = until.min(end);
        }
        let class = if copy || (skip && zero) {
            Action::Copy
        } else if skip {
            Action::Skip
        } else {
            Action::Zero
        };
        run = match run {
            Some((a, start, len)) if a == class && len + (end - offset) <= step => {
                Some((a, start, len + end - offset))
            }
            Some((a, start, len)) => {
                if !send(start, len, a) {
                    return Ok(());
                }
                Some((class, offset, end - offset))
            }
            None => Some((class, offset, end - offset)),
        };
        offset = end;
    }
    if let Some((a, start, len)) = run {
        send(start, len, a);
    }
    Ok(())
}

/// The next job of a source of `size` bytes, from `offset` (`base + offset` in the target):
/// its action and length. `status(at)` plans the range at `at` (its action and length, up to
/// the end); `ahead` keeps a range it planned for the job after this one.
///
/// Data goes in `step`-aligned pieces, so that every read and write but the edges is whole;
/// ranges of data back to back (a vmdk's grains, each mapped on its own) make one piece.
fn next_job(
    status: &mut dyn FnMut(u64) -> CliResult<(Action, u64)>,
    offset: u64,
    size: u64,
    base: u64,
    step: u64,
    ahead: &mut Option<(Action, u64)>,
) -> CliResult<(Action, u64)> {
    let (action, n) = match ahead.take() {
        Some(a) => a,
        None => status(offset)?,
    };
    let mut n = n.clamp(1, size - offset);
    if action == Action::Copy {
        let limit = step - (base + offset) % step;
        while n < limit && offset + n < size {
            let at = offset + n;
            let (next, m) = status(at)?;
            let m = m.clamp(1, size - at);
            if next != Action::Copy {
                *ahead = Some((next, m));
                break;
            }
            n += m;
        }
        n = n.min(limit);
    }
    Ok((action, n))
}

/// A worker: takes a buffer, then a job; reads, scans and compresses; writes (out of order) or
/// hands the result to the writer.
fn worker(sh: &Shared<'_>, jobs: &Mutex<Receiver<Job>>, done: Option<&SyncSender<Done>>) {
    loop {
        let buf = {
            let rx = sh.pool_rx.lock().unwrap_or_else(|e| e.into_inner());
            rx.recv()
        };
        let Ok(mut buf) = buf else { return };
        let job = {
            let rx = jobs.lock().unwrap_or_else(|e| e.into_inner());
            rx.recv()
        };
        let Ok(job) = job else {
            sh.give_back(Some(buf));
            return;
        };
        if sh.stopped() {
            sh.give_back(Some(buf));
            continue;
        }
        let mut d = Done {
            job,
            buf: None,
            runs: Vec::new(),
            clusters: Vec::new(),
            result: Ok(()),
        };
        // Out of order, a worker may hand a data range to the kernel and be done with it.
        if done.is_none() && sh.offloads(&d.job) {
            match copy_range_concat(sh.sources, d.job.offset, sh.target, d.job.len) {
                Ok(true) => {
                    sh.give_back(Some(buf));
                    sh.wrote(d.job.len);
                    sh.progress.inc(d.job.len);
                    continue;
                }
                Ok(false) => {}
                Err(f) => {
                    sh.give_back(Some(buf));
                    sh.fail(f);
                    continue;
                }
            }
        }
        d.result = match sh.mode {
            Mode::Plain { .. } => prepare_plain(sh, &mut d, &mut buf),
            Mode::Compressed { cluster, .. } => prepare_compressed(sh, &mut d, &mut buf, cluster),
        };
        d.buf = Some(buf);
        match done {
            Some(tx) => {
                if let Err(e) = tx.send(d) {
                    sh.give_back(e.0.buf);
                }
            }
            None => {
                let r = d
                    .result
                    .and_then(|()| write_done(sh, &d.job, d.buf.as_mut(), &d.runs, &[]));
                sh.give_back(d.buf);
                match r {
                    Ok(()) => sh.progress.inc(d.job.len),
                    Err(f) => sh.fail(f),
                }
            }
        }
    }
}

/// Reads a plain job's data and splits it into data and zero runs (qemu-img's -S rules).
fn prepare_plain(sh: &Shared<'_>, d: &mut Done, buf: &mut Buf) -> CliResult<()> {
    if d.job.action != Action::Copy {
        return Ok(());
    }
    let data = buf.get(usize::try_from(d.job.len).unwrap_or(0));
    sh.read(d.job.offset, data)?;
    let sp = &sh.sparse;
    if sp.min_sparse == 0 {
        d.runs.push((true, data.len()));
        return Ok(());
    }
    let mut done = 0;
    while done < data.len() {
        let pos = d.job.offset + done as u64;
        let (is_data, n) = data_run(
            &data[done..],
            pos / SECTOR as u64,
            sp.min_sparse,
            sp.alignment,
        );
        let n = n.max(1).min(data.len() - done);
        match d.runs.last_mut() {
            Some((last, len)) if *last == is_data => *len += n,
            _ => d.runs.push((is_data, n)),
        }
        done += n;
    }
    Ok(())
}

/// Reads a batch of whole clusters (holes are not read) and compresses each non-zero one.
fn prepare_compressed(sh: &Shared<'_>, d: &mut Done, buf: &mut Buf, cs: usize) -> CliResult<()> {
    if d.job.action != Action::Copy {
        return Ok(());
    }
    let data = buf.get(usize::try_from(d.job.len).unwrap_or(0));
    if !sh.read(d.job.offset, data)? {
        d.job.action = Action::Zero;
        return Ok(());
    }
    d.clusters = data
        .chunks(cs)
        .map(|c| {
            if imgblock::scan::is_zero(c) {
                None
            } else {
                Some(sh.target.compress_cluster(c))
            }
        })
        .collect();
    Ok(())
}

/// Writes finished jobs in guest order, holding back those that arrive early. After a failure it
/// only hands buffers back, so that no worker waits for one forever.
fn write_in_order(sh: &Shared<'_>, done: Receiver<Done>) {
    let mut early: BTreeMap<u64, Done> = BTreeMap::new();
    let mut next = 0u64;
    for d in done {
        if sh.stopped() {
            sh.give_back(d.buf);
            for (_, e) in std::mem::take(&mut early) {
                sh.give_back(e.buf);
            }
            continue;
        }
        early.insert(d.job.index, d);
        while let Some(mut d) = early.remove(&next) {
            let r = std::mem::replace(&mut d.result, Ok(()))
                .and_then(|()| write_done(sh, &d.job, d.buf.as_mut(), &d.runs, &d.clusters));
            sh.give_back(d.buf.take());
            match r {
                Ok(()) => sh.progress.inc(d.job.len),
                Err(f) => {
                    sh.fail(f);
                    for (_, e) in std::mem::take(&mut early) {
                        sh.give_back(e.buf);
                    }
                    break;
                }
            }
            next += 1;
        }
    }
}

/// Writes one finished job into the target.
fn write_done(
    sh: &Shared<'_>,
    job: &Job,
    buf: Option<&mut Buf>,
    runs: &[(bool, usize)],
    clusters: &[Option<Option<Vec<u8>>>],
) -> CliResult<()> {
    let t = sh.target;
    match (job.action, buf) {
        (Action::Skip, _) => Ok(()),
        (Action::Zero, _) | (Action::Copy, None) => {
            write_zeroes(t, job.offset, job.len, &sh.sparse)
        }
        (Action::Copy, Some(buf)) => {
            let data = buf.get(usize::try_from(job.len).unwrap_or(0));
            if let Mode::Compressed { cluster, .. } = sh.mode {
                // Runs of compressed clusters go to the format together, in order; so do runs
                // of clusters that did not shrink (stored as plain data, in one write).
                let mut packed_run: Vec<(u64, &[u8])> = Vec::new();
                let mut plain_from = None;
                let mut done = 0;
                for (c, packed) in data.chunks(cluster).zip(clusters) {
                    let at = job.offset + done as u64;
                    if packed.is_some() && !t.can_write_compressed() {
                        // qemu fails the first compressed write (ENOTSUP) in these words.
                        return Err(Failure::new(format!(
                            "error while writing at byte {at}: Operation not supported"
                        )));
                    }
                    match packed {
                        Some(Some(p)) => {
                            write_plain(sh, job.offset, data, plain_from.take(), done)?;
                            packed_run.push((at, p));
                        }
                        Some(None) => {
                            write_packed(sh, &mut packed_run)?;
                            plain_from.get_or_insert(done);
                        }
                        None => {
                            write_packed(sh, &mut packed_run)?;
                            write_plain(sh, job.offset, data, plain_from.take(), done)?;
                            write_zeroes(t, at, c.len() as u64, &sh.sparse)?;
                        }
                    }
                    done += c.len();
                }
                write_packed(sh, &mut packed_run)?;
                write_plain(sh, job.offset, data, plain_from, done)?;
                return Ok(());
            }
            let mut done = 0;
            for &(is_data, n) in runs {
                let pos = job.offset + done as u64;
                if is_data {
                    t.write_at(&data[done..done + n], pos)?;
                    sh.wrote(n as u64);
                } else {
                    write_zeroes(t, pos, n as u64, &sh.sparse)?;
                }
                done += n;
            }
            Ok(())
        }
    }
}

/// Writes `data[from..to]`, a run of clusters stored as they are, at `offset + from`.
fn write_plain(
    sh: &Shared<'_>,
    offset: u64,
    data: &[u8],
    from: Option<usize>,
    to: usize,
) -> CliResult<()> {
    if let Some(from) = from {
        sh.target.write_at(&data[from..to], offset + from as u64)?;
        sh.wrote((to - from) as u64);
    }
    Ok(())
}

/// Writes a run of compressed clusters (their compressed bytes count for `-r`) and empties it.
fn write_packed(sh: &Shared<'_>, run: &mut Vec<(u64, &[u8])>) -> CliResult<()> {
    sh.target.write_compressed_clusters(run)?;
    sh.wrote(run.iter().map(|(_, p)| p.len() as u64).sum());
    run.clear();
    Ok(())
}

/// Makes a target range read as zeroes, unless it already does.
pub fn write_zeroes(target: &Image, offset: u64, len: u64, sparse: &Sparse) -> CliResult<()> {
    if !sparse.zero_init {
        target.write_zeroes(offset, len, true)?;
    }
    Ok(())
}

/// Walks `len` bytes of the concatenation of `sources` from `offset` by block status: calls
/// `f(source, offset in it, offset in the concatenation, length, reads as zeroes)` for each
/// run, stopping early (false) when `f` says so.
fn walk_concat(
    sources: &[Image],
    offset: u64,
    len: u64,
    mut f: impl FnMut(&Image, u64, u64, u64, bool) -> CliResult<bool>,
) -> CliResult<bool> {
    let mut base = 0u64;
    let end = offset + len;
    for src in sources {
        let (s, e) = (offset.max(base), end.min(base + src.size()));
        let mut pos = s;
        while pos < e {
            let st = src.block_status(pos - base, e - pos)?;
            let n = st.len.clamp(1, e - pos);
            if !f(src, pos - base, pos, n, st.zero)? {
                return Ok(false);
            }
            pos += n;
        }
        base += src.size();
    }
    Ok(true)
}

/// Copies `len` bytes of the concatenation of `sources` at `offset` to the same offset of
/// `target` inside the kernel, holes as holes; false when some part cannot be (the caller then
/// copies the whole range through a buffer).
fn copy_range_concat(sources: &[Image], offset: u64, target: &Image, len: u64) -> CliResult<bool> {
    walk_concat(sources, offset, len, |src, at, pos, n, zero| {
        Ok(zero || src.copy_range_to(at, target, pos, n)?)
    })
}

/// Reads the concatenation of `sources` at `offset` into `buf`, reading only what block status
/// says holds data (the rest is filled with zeroes). Returns false when all of it reads as
/// zeroes.
fn read_concat(sources: &[Image], offset: u64, buf: &mut [u8]) -> CliResult<bool> {
    let mut any = false;
    walk_concat(
        sources,
        offset,
        buf.len() as u64,
        |src, at, pos, n, zero| {
            let lo = usize::try_from(pos - offset).unwrap_or(0);
            let hi = usize::try_from(pos + n - offset).unwrap_or(0);
            if zero {
                buf[lo..hi].fill(0);
            } else {
                src.read_at(&mut buf[lo..hi], at)?;
                any = true;
            }
            Ok(true)
        },
    )?;
    Ok(any)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Plans every job of a source laid out as `ranges` (action, length), with `step`, and
    /// counts the planner's calls.
    fn jobs(ranges: &[(Action, u64)], base: u64, step: u64) -> (Vec<(u64, Action, u64)>, usize) {
        let size: u64 = ranges.iter().map(|r| r.1).sum();
        let calls = std::cell::Cell::new(0);
        let mut status = |at: u64| {
            calls.set(calls.get() + 1);
            let mut start = 0;
            for &(a, n) in ranges {
                if at < start + n {
                    return Ok((a, start + n - at));
                }
                start += n;
            }
            panic!("planned past the end: {at}");
        };
        let (mut out, mut offset, mut ahead) = (Vec::new(), 0, None);
        while offset < size {
            let (a, n) = next_job(&mut status, offset, size, base, step, &mut ahead).unwrap();
            out.push((base + offset, a, n));
            offset += n;
        }
        (out, calls.get())
    }

    #[test]
    fn grains_back_to_back_make_whole_steps_and_nothing_is_planned_twice() {
        const K: u64 = 1024;
        let mut src = vec![(Action::Copy, 64 * K); 40];
        src.push((Action::Zero, 512 * K));
        src.extend([(Action::Copy, 64 * K); 3]);
        src.push((Action::Skip, 64 * K));
        let (got, calls) = jobs(&src, 0, 1024 * K);
        assert_eq!(
            got,
            [
                (0, Action::Copy, 1024 * K),
                (1024 * K, Action::Copy, 1024 * K),
                (2048 * K, Action::Copy, 512 * K),
                (2560 * K, Action::Zero, 512 * K),
                (3072 * K, Action::Copy, 192 * K),
                (3264 * K, Action::Skip, 64 * K),
            ]
        );
        assert_eq!(calls, src.len(), "each range planned once");
        // A second source starts off a step boundary in the target: its first piece ends on one.
        let (got, _) = jobs(&[(Action::Copy, 64 * K); 8], 3 * 128 * K, 256 * K);
        assert_eq!(
            got,
            [
                (384 * K, Action::Copy, 128 * K),
                (512 * K, Action::Copy, 256 * K),
                (768 * K, Action::Copy, 128 * K),
            ]
        );
    }
}
