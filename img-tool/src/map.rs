//! `img map`: where the guest's data lives, merged and printed as qemu-img prints it.

use clap::Args;
use imgblock::{BlockStatus, Image};

use crate::console::{self, Buffered};
use crate::failure::{CliResult, Failure};
use crate::open::{open_source, parse_format, storage_path, OpenRequest};
use crate::output::OutputFormat;
use crate::units::cvtnum;
use crate::units::INT64_MAX;

/// qemu-img asks block status for at most this much at a time.
const MAX_STATUS_LEN: u64 = 1 << 30;

/// `img map [-f FMT] [--output=human|json] [-s|--start-offset OFFSET] [-l|--max-length LENGTH]
/// [-U] FILE`
#[derive(Debug, Args)]
pub struct MapArgs {
    /// `--object secret,...` and `--image-opts`.
    #[command(flatten)]
    pub(crate) secret_args: crate::secrets::SecretArgs,
    /// Image format (probed when not given).
    #[arg(short = 'f', long = "format", value_name = "FMT")]
    format: Option<String>,
    /// Output format: human or json.
    #[arg(long = "output", value_name = "FMT", default_value = "human")]
    output: String,
    /// Open the image even if another process uses it (accepted for compatibility).
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// Map from this guest offset on (default 0).
    #[arg(
        short = 's',
        long = "start-offset",
        value_name = "OFFSET",
        allow_hyphen_values = true
    )]
    start_offset: Option<String>,
    /// Map at most this many bytes (default: to the end of the image).
    #[arg(
        short = 'l',
        long = "max-length",
        value_name = "LENGTH",
        allow_hyphen_values = true
    )]
    max_length: Option<String>,
    /// The image file.
    filename: String,
}

/// One run of the map (qemu-img's `MapEntry`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MapEntry {
    /// Guest offset.
    pub start: u64,
    /// Bytes.
    pub length: u64,
    /// Chain index of the image holding the data.
    pub depth: usize,
    /// Defined somewhere in the chain.
    pub present: bool,
    /// Reads as zeroes.
    pub zero: bool,
    /// Backed by data.
    pub data: bool,
    /// Stored compressed.
    pub compressed: bool,
    /// Host offset, when known.
    pub offset: Option<u64>,
    /// The file `offset` refers to (only with an offset).
    pub filename: Option<String>,
}

impl MapEntry {
    /// The entry for a block-status answer at `start`.
    pub fn from_status(start: u64, st: &BlockStatus, filename: Option<String>) -> Self {
        MapEntry {
            start,
            length: st.len,
            depth: st.depth,
            present: st.present,
            zero: st.zero,
            data: st.data,
            compressed: st.compressed,
            offset: st.offset,
            filename: st.offset.and(filename),
        }
    }

    /// qemu-img's `entry_mergeable`: all fields equal and the host offsets contiguous.
    fn mergeable_with(&self, next: &MapEntry) -> bool {
        if self.length == 0 {
            return false;
        }
        let same = self.zero == next.zero
            && self.data == next.data
            && self.compressed == next.compressed
            && self.depth == next.depth
            && self.present == next.present
            && self.filename == next.filename;
        let contiguous = match (self.offset, next.offset) {
            (None, None) => true,
            (Some(a), Some(b)) => a.checked_add(self.length) == Some(b),
            _ => false,
        };
        same && contiguous
    }
}

/// Merges block-status answers into entries exactly as qemu-img's map loop does, including the
/// human format's rule that zero and unallocated entries may merge with each other.
#[derive(Debug)]
pub struct Merger {
    curr: MapEntry,
    human: bool,
}

impl Merger {
    /// A merger for the given output format, for a map that starts at `start`.
    pub fn new(human: bool, start: u64) -> Self {
        Merger {
            curr: MapEntry {
                start,
                ..MapEntry::default()
            },
            human,
        }
    }

    /// Adds the next answer; returns a finished entry when `next` does not continue the current one.
    pub fn push(&mut self, mut next: MapEntry) -> Option<MapEntry> {
        if self.curr.mergeable_with(&next) {
            self.curr.length += next.length;
            return None;
        }
        let done = (self.curr.length > 0).then(|| {
            if self.human && (!next.data || next.zero) && (!self.curr.data || self.curr.zero) {
                // Human output does not tell zero, unallocated and zero-with-data apart, so qemu
                // flattens them to let them coalesce.
                next.data = false;
                next.zero = true;
            }
            self.curr.clone()
        });
        self.curr = next;
        done
    }

    /// The last entry (qemu prints it even when it is empty, at the start offset when the map
    /// covers nothing).
    pub fn finish(self) -> MapEntry {
        self.curr
    }
}

/// One entry as qemu-img's JSON line (without the separator).
pub fn json_entry(e: &MapEntry) -> String {
    let mut s = format!(
        "{{ \"start\": {}, \"length\": {}, \"depth\": {}, \"present\": {}, \"zero\": {}, \"data\": {}, \"compressed\": {}",
        e.start, e.length, e.depth, e.present, e.zero, e.data, e.compressed
    );
    if let Some(o) = e.offset {
        s.push_str(&format!(", \"offset\": {o}"));
    }
    s.push('}');
    s
}

/// C's `%#-16x`: `0x`-prefixed hex (plain `0` for zero), left-aligned in 16 columns.
fn hex16(v: u64) -> String {
    let s = if v == 0 {
        "0".to_owned()
    } else {
        format!("{v:#x}")
    };
    format!("{s:<16}")
}

/// The human line for an entry: only data with a known offset is listed.
///
/// # Errors
/// When data has no plain host offset (compressed, encrypted or external), as qemu refuses too.
pub fn human_entry(e: &MapEntry) -> CliResult<Option<String>> {
    if e.data && e.offset.is_none() {
        return Err(Failure::new(
            "File contains external, encrypted or compressed clusters.",
        ));
    }
    if !e.data || e.zero {
        return Ok(None);
    }
    Ok(Some(format!(
        "{}{}{}{}",
        hex16(e.start),
        hex16(e.length),
        hex16(e.offset.unwrap_or(0)),
        e.filename.as_deref().unwrap_or("")
    )))
}

/// Prints entries in one of the two formats, keeping JSON's separators right.
struct Printer {
    out: Buffered,
    format: OutputFormat,
    first: bool,
}

impl Printer {
    fn start(format: OutputFormat) -> Self {
        let mut out = Buffered::default();
        match format {
            OutputFormat::Human => out.push(&format!(
                "{:<16}{:<16}{:<16}File\n",
                "Offset", "Length", "Mapped to"
            )),
            OutputFormat::Json => out.push("["),
        }
        Printer {
            out,
            format,
            first: true,
        }
    }

    fn entry(&mut self, e: &MapEntry) -> CliResult<()> {
        match self.format {
            OutputFormat::Human => {
                if let Some(line) = human_entry(e)? {
                    self.out.push(&line);
                    self.out.push("\n");
                }
            }
            OutputFormat::Json => {
                let sep = if self.first { "" } else { ",\n" };
                self.out.push(&format!("{sep}{}", json_entry(e)));
            }
        }
        self.first = false;
        Ok(())
    }

    fn end(mut self) {
        if self.format == OutputFormat::Json {
            self.out.push("]\n");
        }
        self.out.flush();
    }
}

/// Runs `img map`.
///
/// # Errors
/// When the image cannot be opened or its metadata read.
pub fn run(args: &MapArgs) -> CliResult<i32> {
    let start = args
        .start_offset
        .as_deref()
        .map_or(Ok(0), |s| cvtnum("start offset", s, INT64_MAX))?;
    let max_length = args
        .max_length
        .as_deref()
        .map(|s| cvtnum("max length", s, INT64_MAX))
        .transpose()?;
    let format = OutputFormat::parse(&args.output, "map")?;
    let spec = args
        .secret_args
        .resolve(&args.filename, parse_format(args.format.as_deref())?)?;
    let req = OpenRequest {
        format: spec.format,
        secrets: Some(&spec.secrets),
        force_share: args.force_share,
        ..OpenRequest::default()
    };
    let img = open_source(&spec.path, &req, None)?;
    let mut printer = Printer::start(format);
    let end = max_length.map_or(img.size(), |l| img.size().min(start.saturating_add(l)));
    let mut merger = Merger::new(format == OutputFormat::Human, start);
    for next in statuses(&img, start, end) {
        if console::stdout_closed() {
            // Nobody reads the rest (`img map | head`).
            return Ok(0);
        }
        if let Some(done) = merger.push(next?) {
            printer.entry(&done)?;
        }
    }
    printer.entry(&merger.finish())?;
    printer.end();
    Ok(0)
}

/// The block-status answers covering guest bytes `start..end`, in order.
fn statuses(img: &Image, start: u64, end: u64) -> impl Iterator<Item = CliResult<MapEntry>> + '_ {
    let size = end;
    let chain = img.chain();
    let mut pos = start;
    std::iter::from_fn(move || {
        if pos >= size {
            return None;
        }
        let r = img
            .block_status(pos, (size - pos).min(MAX_STATUS_LEN))
            .map_err(|e| Failure::new(format!("Could not read file metadata: {e}")))
            .map(|st| {
                let name = storage_path(&chain, st.depth, st.file).map(|p| p.display().to_string());
                let e = MapEntry::from_status(pos, &st, name);
                pos += st.len.max(1);
                e
            });
        if r.is_err() {
            pos = size;
        }
        Some(r)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(start: u64, length: u64, zero: bool, data: bool, offset: Option<u64>) -> MapEntry {
        MapEntry {
            start,
            length,
            depth: 0,
            present: true,
            zero,
            data,
            compressed: false,
            offset,
            filename: offset.map(|_| "r.raw".to_owned()),
        }
    }

    fn merge_all(human: bool, v: Vec<MapEntry>) -> Vec<MapEntry> {
        let mut m = Merger::new(human, 0);
        let mut out: Vec<MapEntry> = v.into_iter().filter_map(|e| m.push(e)).collect();
        out.push(m.finish());
        out
    }

    #[test]
    fn merger_contiguous_offsets_merge() {
        let out = merge_all(
            false,
            vec![
                entry(0, 4096, false, true, Some(0)),
                entry(4096, 4096, false, true, Some(4096)),
            ],
        );
        assert_eq!(out, vec![entry(0, 8192, false, true, Some(0))]);
    }

    #[test]
    fn merger_discontiguous_offsets_stay_apart() {
        let out = merge_all(
            false,
            vec![
                entry(0, 4096, false, true, Some(0)),
                entry(4096, 4096, false, true, Some(65536)),
            ],
        );
        assert_eq!(out.len(), 2);
    }

    #[test]
    fn merger_json_keeps_zero_and_data_apart() {
        let out = merge_all(
            false,
            vec![
                entry(0, 4096, true, false, Some(0)),
                entry(4096, 4096, false, true, Some(4096)),
            ],
        );
        assert_eq!(out.len(), 2);
    }

    #[test]
    fn merger_human_flattens_zero_after_zero_so_they_merge() {
        // zero-with-offset then unallocated: in human mode both become plain zero and merge.
        let mut a = entry(0, 4096, true, false, None);
        a.present = false;
        let mut b = entry(4096, 4096, true, true, None);
        b.present = false;
        let c = {
            let mut c = entry(8192, 4096, true, false, None);
            c.present = false;
            c
        };
        let out = merge_all(true, vec![a, b, c]);
        assert_eq!(out.len(), 2);
        assert_eq!(
            (out[1].start, out[1].length, out[1].data, out[1].zero),
            (4096, 8192, false, true)
        );
    }

    #[test]
    fn json_entry_offset_only_when_known() {
        assert_eq!(
            json_entry(&entry(0, 4096, false, true, Some(0))),
            "{ \"start\": 0, \"length\": 4096, \"depth\": 0, \"present\": true, \"zero\": false, \"data\": true, \"compressed\": false, \"offset\": 0}"
        );
        assert!(!json_entry(&entry(0, 1, true, false, None)).contains("offset"));
    }

    #[test]
    fn human_entry_prints_hex_columns() {
        let line = human_entry(&entry(0x10000, 0x10000, false, true, Some(0x10000)))
            .unwrap()
            .unwrap();
        assert_eq!(
            line,
            "0x10000         0x10000         0x10000         r.raw"
        );
        let line = human_entry(&entry(0, 0x1000, false, true, Some(0)))
            .unwrap()
            .unwrap();
        assert_eq!(
            line,
            "0               0x1000          0               r.raw"
        );
    }

    #[test]
    fn human_entry_compressed_data_is_an_error() {
        assert!(human_entry(&entry(0, 1, false, true, None)).is_err());
        assert_eq!(
            human_entry(&entry(0, 1, true, false, Some(0))).unwrap(),
            None
        );
    }
}
