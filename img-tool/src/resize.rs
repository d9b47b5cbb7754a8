//! `img resize`: grow or (with `--shrink`) shrink the virtual disk, by qemu-img's rules.

use clap::Args;
use imgblock::raw::Preallocation;
use imgblock::Format;

use crate::console;
use crate::failure::{CliResult, Failure};
use crate::open::{open_image, parse_format, OpenRequest};
use crate::secrets::SecretArgs;

/// `img resize [-f FMT | --image-opts] [--object OBJDEF] [--shrink] [--preallocation=MODE] [-q]
/// FILE [+|-]SIZE`
#[derive(Debug, Args)]
pub struct ResizeArgs {
    /// `--object secret,...` and `--image-opts`: an encrypted image needs its secret.
    #[command(flatten)]
    pub(crate) secret_args: SecretArgs,
    /// Image format (probed when not given).
    #[arg(short = 'f', long = "format", value_name = "FMT")]
    format: Option<String>,
    /// Allow the image to become smaller (data past the new end is lost).
    #[arg(long = "shrink")]
    shrink: bool,
    /// How to allocate the new space: off, metadata (qcow2), falloc or full.
    #[arg(long = "preallocation", value_name = "MODE")]
    preallocation: Option<String>,
    /// Quiet: print nothing but errors.
    #[arg(short = 'q', long = "quiet")]
    quiet: bool,
    /// The image file.
    filename: String,
    /// The new size, or +SIZE / -SIZE relative to the current one (k, M, G, T, P, E suffixes).
    #[arg(allow_hyphen_values = true, value_name = "[+|-]SIZE")]
    size: String,
}

/// What the SIZE argument asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NewSize {
    Absolute(u64),
    Grow(u64),
    Shrink(u64),
}

impl NewSize {
    /// The target size given the current one; `None` when it is not positive or overflows.
    fn resolve(self, current: u64) -> Option<u64> {
        match self {
            NewSize::Absolute(n) => Some(n),
            NewSize::Grow(n) => current.checked_add(n),
            NewSize::Shrink(n) => current.checked_sub(n),
        }
        .filter(|&n| n > 0 && n <= i64::MAX as u64)
    }
}

/// Parses `[+|-]SIZE` with qemu's message for anything that is not a size.
fn parse_new_size(s: &str) -> CliResult<NewSize> {
    let (kind, num): (fn(u64) -> NewSize, &str) = match s.as_bytes().first() {
        Some(b'+') => (NewSize::Grow, &s[1..]),
        Some(b'-') => (NewSize::Shrink, &s[1..]),
        _ => (NewSize::Absolute, s),
    };
    let n = imgblock::options::parse_size_opt("size", num)?;
    Ok(kind(n))
}

fn parse_prealloc(s: Option<&str>) -> CliResult<Preallocation> {
    match s {
        None => Ok(Preallocation::Off),
        Some(m) => Preallocation::parse(m)
            .map_err(|_| Failure::new(format!("Invalid preallocation mode '{m}'"))),
    }
}

/// Runs `img resize`.
///
/// # Errors
/// A bad size or mode, a shrink without `--shrink`, or a format or image that cannot be resized.
pub fn run(args: &ResizeArgs) -> CliResult<i32> {
    let prealloc = parse_prealloc(args.preallocation.as_deref())?;
    let new = parse_new_size(&args.size)?;
    let spec = args
        .secret_args
        .resolve(&args.filename, parse_format(args.format.as_deref())?)?;
    let req = OpenRequest {
        format: spec.format,
        writable: true,
        secrets: Some(&spec.secrets),
        ..OpenRequest::default()
    };
    let mut img = open_image(&spec.path, &req)?;
    let current = img.size();
    let total = new
        .resolve(current)
        .ok_or_else(|| Failure::new("New image size must be positive"))?;
    if total <= current && prealloc != Preallocation::Off {
        return Err(Failure::new(
            "Preallocation can only be used for growing images",
        ));
    }
    if total < current && !args.shrink {
        return Err(Failure::new(
            "Use the --shrink option to perform a shrink operation.\n\
             img: warning: Shrinking an image will delete all data beyond the shrunken image's end. \
             Before performing such an operation, make sure there is no important data there.",
        ));
    }
    match img.format() {
        // qcow2 keeps its size in whole sectors.
        Format::Qcow2 if total % 512 != 0 => {
            return Err(Failure::new("The new size must be a multiple of 512"));
        }
        Format::Raw if prealloc == Preallocation::Metadata => {
            return Err(Failure::new("Unsupported preallocation mode: metadata"));
        }
        _ => {}
    }
    img.resize(total, prealloc).map_err(|e| match e {
        imgblock::Error::Unsupported { what, .. } if what.starts_with("this image format") => {
            Failure::new("Image format driver does not support resize")
        }
        imgblock::Error::Unsupported { what, .. } => Failure::new(what),
        imgblock::Error::InvalidOption(m) => Failure::new(m),
        // qemu-img's resize says what failed without naming the image.
        imgblock::Error::Io { source, .. } => Failure::new(format!(
            "Could not resize file: {}",
            crate::failure::strerror(&source)
        )),
        imgblock::Error::Qcow2 { source, .. } => Failure::new(source.to_string()),
        other => Failure::from(other),
    })?;
    if !args.quiet {
        console::print("Image resized.\n");
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_new_size_relative_and_absolute() {
        assert_eq!(parse_new_size("2M").unwrap(), NewSize::Absolute(2 << 20));
        assert_eq!(parse_new_size("+1k").unwrap(), NewSize::Grow(1024));
        assert_eq!(parse_new_size("-512").unwrap(), NewSize::Shrink(512));
        assert!(parse_new_size("abc")
            .unwrap_err()
            .message
            .starts_with("Parameter 'size' expects"));
    }

    #[test]
    fn resolve_refuses_zero_and_negative() {
        assert_eq!(NewSize::Shrink(10 << 20).resolve(1 << 20), None);
        assert_eq!(NewSize::Absolute(0).resolve(1 << 20), None);
        assert_eq!(NewSize::Grow(512).resolve(1024), Some(1536));
    }

    #[test]
    fn parse_prealloc_names_bad_mode() {
        assert_eq!(
            parse_prealloc(Some("foo")).unwrap_err().message,
            "Invalid preallocation mode 'foo'"
        );
        assert_eq!(parse_prealloc(None).unwrap(), Preallocation::Off);
    }
}
