//! `img dd`: copy (part of) an image into a new one, dd(1)-style, by qemu-img's rules.
//!
//! The operands are qemu-img's: `bs=` (a size, default 512), `count=` and `skip=` (numbers of
//! blocks), `if=` and `of=`. As qemu-img does, `count` bounds the *input* (the copy stops at
//! `count * bs` bytes into the input, not after `count` blocks past the skip), and a skip past
//! the end warns and creates an empty image. The output is created fresh, so ranges that read
//! as zeroes are not written: the new image stays sparse where the input is.

use std::path::Path;

use clap::Args;
use imgblock::{CreateOptions, Format, Image};

use crate::console;
use crate::failure::{CliResult, Failure};
use crate::open::{open_image, parse_format, OpenRequest};
use crate::secrets::SecretArgs;
use crate::units::{cvtnum_full, INT64_MAX};

/// qemu-img's block size bound (`INT_MAX`).
const MAX_BLOCK_SIZE: u64 = i32::MAX.unsigned_abs() as u64;

/// The most bytes read at a time, whatever `bs` is: memory stays bounded with `bs=2G`, and
/// the result is the same because blocks are copied in order.
const MAX_CHUNK: u64 = 4 << 20;

/// `img dd [-f FMT | --image-opts] [--object OBJDEF] [-O OUTPUT_FMT] [-U] [bs=BLOCK_SIZE]
/// [count=BLOCKS] [skip=BLOCKS] if=INPUT of=OUTPUT`
#[derive(Debug, Args)]
pub struct DdArgs {
    /// `--object secret,...` and `--image-opts` (for the input; the output is a file name).
    #[command(flatten)]
    pub(crate) secret_args: SecretArgs,
    /// Format of the input (probed when not given).
    #[arg(short = 'f', long = "format", value_name = "FMT")]
    format: Option<String>,
    /// Format of the output (default raw).
    #[arg(short = 'O', long = "output-format", value_name = "OUTPUT_FMT")]
    output_format: Option<String>,
    /// Open the input even if another process writes it.
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// bs=BLOCK_SIZE, count=BLOCKS, skip=BLOCKS, if=INPUT, of=OUTPUT.
    #[arg(value_name = "OPERAND")]
    operands: Vec<String>,
}

/// The operands, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Operands {
    bs: u64,
    count: Option<u64>,
    skip: Option<u64>,
    input: String,
    output: String,
}

/// Parses the operands in order, as qemu-img does: the first bad one is reported, a repeated
/// one takes its last value.
fn parse_operands(ops: &[String]) -> CliResult<Operands> {
    let mut bs = 512;
    let (mut count, mut skip, mut input, mut output) = (None, None, None, None);
    for op in ops {
        let Some((name, value)) = op.split_once('=') else {
            return Err(Failure::new(format!("unrecognized operand {op}")));
        };
        match name {
            "bs" => bs = cvtnum_full("bs", value, true, 1, MAX_BLOCK_SIZE)?,
            "count" => count = Some(cvtnum_full("count", value, false, 0, INT64_MAX)?),
            "skip" => skip = Some(cvtnum_full("skip", value, false, 0, INT64_MAX)?),
            "if" => input = Some(value.to_owned()),
            "of" => output = Some(value.to_owned()),
            _ => return Err(Failure::new(format!("unrecognized operand {name}"))),
        }
    }
    let (Some(input), Some(output)) = (input, output) else {
        return Err(Failure::new("Must specify both input and output files"));
    };
    Ok(Operands {
        bs,
        count,
        skip,
        input,
        output,
    })
}

/// The output's size and the input range to copy, by qemu-img's arithmetic: `count` caps the
/// input at `count * bs` bytes, and the skipped bytes come off that. `None` for the range when
/// the skip lies past it (an empty output).
fn plan(input_len: u64, ops: &Operands) -> (u64, Option<(u64, u64)>) {
    let mut end = input_len;
    if let Some(c) = ops.count {
        if let Some(n) = c.checked_mul(ops.bs) {
            end = end.min(n);
        }
    }
    let start = match ops.skip {
        None => 0,
        Some(s) => match s.checked_mul(ops.bs) {
            Some(b) if b <= end && b <= INT64_MAX => b,
            _ => return (0, None),
        },
    };
    (end - start, Some((start, end)))
}

/// Runs `img dd`.
///
/// # Errors
/// Bad operands or formats, an input that cannot be opened or read, an output that cannot be
/// created or written.
pub fn run(args: &DdArgs) -> CliResult<i32> {
    let ops = parse_operands(&args.operands)?;
    let spec = args
        .secret_args
        .resolve(&ops.input, parse_format(args.format.as_deref())?)?;
    let req = OpenRequest {
        format: spec.format,
        force_share: args.force_share,
        secrets: Some(&spec.secrets),
        ..OpenRequest::default()
    };
    let src = open_image(&spec.path, &req)?;
    let out_format: Format = args
        .output_format
        .as_deref()
        .unwrap_or("raw")
        .parse()
        .map_err(|_| Failure::new("Unknown file format"))?;
    let out_path = Path::new(&ops.output);
    let (size, range) = plan(src.size(), &ops);
    imgblock::create(out_path, out_format, &CreateOptions::new(size)).map_err(|e| {
        Failure::new(format!(
            "{}: error while creating output image: {e}",
            ops.output
        ))
    })?;
    let dst = open_image(
        out_path,
        &OpenRequest {
            format: Some(out_format),
            writable: true,
            ..OpenRequest::default()
        },
    )?;
    match range {
        Some((start, end)) => copy(&src, &dst, start, end)?,
        None => console::eprint(&format!(
            "img: {}: cannot skip to specified offset\n",
            ops.input
        )),
    }
    dst.flush()
        .map_err(|e| Failure::new(format!("error while writing to output image file: {e}")))?;
    Ok(0)
}

/// Copies input bytes `start..end` to the output from offset 0, writing only what does not
/// read as zeroes (the output is new, so it reads as zeroes already).
fn copy(src: &Image, dst: &Image, start: u64, end: u64) -> CliResult<()> {
    let read_err = |e: imgblock::Error| {
        Failure::new(format!("error while reading from input image file: {e}"))
    };
    let write_err =
        |e: imgblock::Error| Failure::new(format!("error while writing to output image file: {e}"));
    let mut buf = Vec::new();
    let mut pos = start;
    while pos < end {
        let st = src.block_status(pos, end - pos).map_err(read_err)?;
        let n = st.len.clamp(1, end - pos);
        if st.zero {
            pos += n;
            continue;
        }
        let mut at = pos;
        while at < pos + n {
            let len = (pos + n - at).min(MAX_CHUNK);
            buf.resize(usize::try_from(len).unwrap_or(0), 0);
            src.read_at(&mut buf, at).map_err(read_err)?;
            if !imgblock::scan::is_zero(&buf) {
                dst.write_at(&buf, at - start).map_err(write_err)?;
            }
            at += len;
        }
        pos += n;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ops(list: &[&str]) -> CliResult<Operands> {
        parse_operands(&list.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>())
    }

    #[test]
    fn operands_defaults_and_last_value_wins() {
        let o = ops(&["if=a", "of=b", "bs=1k", "bs=1.5k", "count=3", "count=0x10"]).unwrap();
        assert_eq!(
            o,
            Operands {
                bs: 1536,
                count: Some(16),
                skip: None,
                input: "a".into(),
                output: "b".into(),
            }
        );
        assert_eq!(ops(&["if=a", "of=b"]).unwrap().bs, 512);
    }

    #[test]
    fn operands_refused_in_qemus_words() {
        for (list, msg) in [
            (&["if=a"][..], "Must specify both input and output files"),
            (&["extra", "if=a", "of=b"], "unrecognized operand extra"),
            (&["foo=1", "if=a", "of=b"], "unrecognized operand foo"),
            (
                &["bs=0"],
                "Invalid bs specified. Must be between 1 and 2147483647.",
            ),
            (
                &["bs=2G"],
                "Invalid bs specified. Must be between 1 and 2147483647.",
            ),
            (&["bs=1x"], "Invalid bs specified: '1x'."),
            (&["bs="], "Invalid bs specified: ''."),
            (&["count=1k"], "Invalid count specified: '1k'."),
            (&["count=08"], "Invalid count specified: '08'."),
            (&["count=0x"], "Invalid count specified: '0x'."),
            (&["count=5 "], "Invalid count specified: '5 '."),
            (
                &["count=-1"],
                "Invalid count specified. Must be between 0 and 9223372036854775807.",
            ),
            (
                &["count=99999999999999999999"],
                "Invalid count specified. Must be between 0 and 9223372036854775807.",
            ),
            (&["skip=1.5"], "Invalid skip specified: '1.5'."),
        ] {
            assert_eq!(ops(list).unwrap_err().message, msg, "{list:?}");
        }
    }

    #[test]
    fn plan_counts_from_the_input_start_like_qemu() {
        let o = |count, skip| Operands {
            bs: 1 << 20,
            count,
            skip,
            input: String::new(),
            output: String::new(),
        };
        let len = 10 << 20;
        assert_eq!(plan(len, &o(None, None)), (len, Some((0, len))));
        assert_eq!(
            plan(len, &o(Some(4), Some(2))),
            (2 << 20, Some((2 << 20, 4 << 20)))
        );
        assert_eq!(
            plan(len, &o(None, Some(2))),
            (8 << 20, Some((2 << 20, len)))
        );
        assert_eq!(plan(len, &o(Some(1), Some(3))), (0, None));
        assert_eq!(plan(len, &o(None, Some(20))), (0, None));
        assert_eq!(plan(len, &o(None, Some(u64::MAX / 2))), (0, None));
        assert_eq!(
            plan(len, &o(Some(u64::MAX / 2), None)),
            (len, Some((0, len)))
        );
    }
}
