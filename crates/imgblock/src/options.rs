//! Creation options in qemu-img's `-o key=value,...` language.

use std::collections::BTreeMap;

use crate::crypto::Secret;
use crate::{Error, Result};

/// What to create: the size, the backing reference, and format-specific `-o` options.
#[derive(Debug, Clone, Default)]
pub struct CreateOptions {
    /// Virtual size; defaults to the backing image's when there is one.
    pub size: Option<u64>,
    /// Backing file name, stored as given.
    pub backing_file: Option<String>,
    /// Backing file format.
    pub backing_fmt: Option<String>,
    /// Do not open the backing file (qemu-img create -u); the size must then be given.
    pub unsafe_backing: bool,
    /// Format-specific options in the order given.
    pub opts: Vec<(String, String)>,
    /// Secrets by ID (qemu's `--object secret,id=ID,...`, resolved by the caller to bytes);
    /// options such as `encrypt.key-secret=ID` name them.
    pub secrets: BTreeMap<String, Secret>,
    /// amend: allow what qemu-img amend allows only with `--force` (erasing the last key slot).
    pub force: bool,
    /// The file protocol's options, once [`CreateOptions::split_file_options`] took them out
    /// of `opts`.
    pub file: FileOptions,
}

impl CreateOptions {
    /// Options for a plain image of `size` bytes.
    pub fn new(size: u64) -> Self {
        CreateOptions {
            size: Some(size),
            ..Self::default()
        }
    }

    /// Adds `-o` options given as `key=value,key=value`; `size`, `backing_file` and `backing_fmt`
    /// go to their own fields.
    ///
    /// # Errors
    /// When the list is malformed or a size does not parse.
    pub fn parse_opts(&mut self, s: &str) -> Result<()> {
        for (k, v) in split_opts(s)? {
            match k.as_str() {
                "size" => self.size = Some(parse_size_opt("size", &v)?),
                "backing_file" => self.backing_file = Some(v),
                "backing_fmt" => self.backing_fmt = Some(v),
                _ => self.opts.push((k, v)),
            }
        }
        Ok(())
    }

    /// Moves the file protocol's options (`nocow`, `extent_size_hint`), which qemu accepts
    /// beside every format's own, from `opts` to `file`, checked.
    ///
    /// # Errors
    /// A value that is not a boolean or a size, or a hint over 4 GiB (qemu's words).
    pub fn split_file_options(&self) -> Result<CreateOptions> {
        let mut rest = self.clone();
        rest.opts
            .retain(|(k, _)| k != "nocow" && k != "extent_size_hint");
        if let Some(v) = self.get("nocow") {
            rest.file.nocow = parse_bool("nocow", v)?;
        }
        if let Some(v) = self.get("extent_size_hint") {
            rest.file.extent_size_hint = u32::try_from(parse_size(v)?)
                .map_err(|_| Error::InvalidOption("Extent size hint is too large".into()))?;
        }
        Ok(rest)
    }

    /// Sets a format-specific option, replacing an earlier value.
    pub fn set(&mut self, key: &str, value: &str) {
        self.opts.retain(|(k, _)| k != key);
        self.opts.push((key.to_owned(), value.to_owned()));
    }

    /// The secret that option `key` names by ID; `None` when the option is not given.
    ///
    /// # Errors
    /// When the option names an ID with no secret (qemu's message).
    pub fn secret(&self, key: &str) -> Result<Option<&Secret>> {
        match self.get(key) {
            None => Ok(None),
            Some(id) => self
                .secrets
                .get(id)
                .map(Some)
                .ok_or_else(|| Error::InvalidOption(format!("No secret with id '{id}'"))),
        }
    }

    /// The last value given for `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.opts
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// qemu's default extent size hint for new files: 1 MiB.
pub const DEFAULT_EXTENT_SIZE_HINT: u32 = 1 << 20;

/// The file protocol's creation options.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileOptions {
    /// Turn the filesystem's copy-on-write off for the new file.
    pub nocow: bool,
    /// Allocation unit to ask the filesystem for; 0: none.
    pub extent_size_hint: u32,
}

impl Default for FileOptions {
    fn default() -> Self {
        FileOptions {
            nocow: false,
            extent_size_hint: DEFAULT_EXTENT_SIZE_HINT,
        }
    }
}

/// Splits `a=b,c=d` into pairs; `,,` stands for a literal comma, as in qemu.
///
/// # Errors
/// When an element has no `=`.
pub fn split_opts(s: &str) -> Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut parts = Vec::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                cur.push(',');
            } else {
                parts.push(std::mem::take(&mut cur));
            }
        } else {
            cur.push(c);
        }
    }
    parts.push(cur);
    for p in parts {
        if p.is_empty() {
            continue;
        }
        match p.split_once('=') {
            Some((k, v)) => out.push((k.to_owned(), v.to_owned())),
            None if p == "help" || p == "?" => out.push(("help".to_owned(), String::new())),
            // QemuOpts' short-form booleans, as libvirt writes `-o lazy_refcounts`: a bare key
            // is `key=on`, a bare `nokey` is `key=off`.
            None => match p.strip_prefix("no") {
                Some(key) if !key.is_empty() => out.push((key.to_owned(), "off".to_owned())),
                _ => out.push((p, "on".to_owned())),
            },
        }
    }
    Ok(out)
}

/// Why a text is not a size, in the two kinds qemu's `qemu_strtosz` tells apart (its callers
/// print different messages for them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SizeError {
    /// Not a size at all: no digits, an unknown suffix or text after the number, a fraction
    /// without a unit larger than a byte, a hex number with a fraction or a suffix (`EINVAL`).
    #[error("not a size")]
    Invalid,
    /// A size, but negative or at least 2^64 bytes (`ERANGE`).
    #[error("size out of range")]
    OutOfRange,
}

/// The multiplier of a size suffix, in powers of 1024; `None` for any other character.
fn suffix_mul(c: Option<u8>) -> Option<u64> {
    let shift = match c?.to_ascii_uppercase() {
        b'B' => 0,
        b'K' => 10,
        b'M' => 20,
        b'G' => 30,
        b'T' => 40,
        b'P' => 50,
        b'E' => 60,
        _ => return None,
    };
    Some(1 << shift)
}

/// C's `isspace` in the C locale, which `strtoull` and `strtod` skip.
fn is_c_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | 0x0b | 0x0c | b'\r')
}

/// What `strtoull` read: the value (`None` on overflow), whether a minus sign came first, and
/// where it stopped; `None` when no digit was found.
fn strtoull(s: &[u8], radix: u32) -> Option<(Option<u64>, bool, usize)> {
    let mut i = s.iter().take_while(|&&b| is_c_space(b)).count();
    let negative = s.get(i) == Some(&b'-');
    if matches!(s.get(i), Some(b'+' | b'-')) {
        i += 1;
    }
    if radix == 16
        && s.get(i) == Some(&b'0')
        && matches!(s.get(i + 1), Some(b'x' | b'X'))
        && s.get(i + 2).is_some_and(u8::is_ascii_hexdigit)
    {
        i += 2;
    }
    let digits = s[i..]
        .iter()
        .take_while(|b| char::from(**b).is_digit(radix))
        .count();
    if digits == 0 {
        return None;
    }
    let value = s[i..i + digits].iter().try_fold(0u64, |acc, &b| {
        acc.checked_mul(u64::from(radix))?
            .checked_add(u64::from(char::from(b).to_digit(radix)?))
    });
    Some((value, negative, i + digits))
}

/// The fraction `strtod` reads at the start of `s`, which holds no exponent (`e` and `E` are
/// size suffixes here): optional blanks and sign, a point, digits. Returns the value (`None`
/// when it is negative, even -0), whether any digit was not zero, and where it stopped; `None`
/// when there is no such fraction.
fn strtod_fraction(s: &[u8]) -> Option<(Option<f64>, bool, usize)> {
    let mut i = s.iter().take_while(|&&b| is_c_space(b)).count();
    let negative = s.get(i) == Some(&b'-');
    if matches!(s.get(i), Some(b'+' | b'-')) {
        i += 1;
    }
    if s.get(i) != Some(&b'.') {
        return None;
    }
    let digits = &s[i + 1..];
    let n = digits.iter().take_while(|b| b.is_ascii_digit()).count();
    if n == 0 {
        return None;
    }
    let digits = &digits[..n];
    let text = format!("0.{}", std::str::from_utf8(digits).ok()?);
    let value = text.parse::<f64>().ok()?;
    let nonzero = digits.iter().any(|&b| b != b'0');
    Some(((!negative).then_some(value), nonzero, i + 1 + n))
}

/// Parses a size exactly as qemu's `qemu_strtosz` does for qemu-img's size arguments and size
/// options (the whole text must be used):
///
/// - a decimal number of bytes, optionally followed by one suffix `b`/`B` (bytes) or
///   `k K m M g G t T p P e E` (powers of 1024): `512`, `64k`, `2G`;
/// - a decimal fraction with a suffix larger than a byte, rounded to the nearest byte (half
///   up): `1.5G`, `.5M`, `1.k`; `1.` and `1.0` are a plain 1, `1.5` and `1.5b` are refused;
/// - a hexadecimal number of bytes, without fraction or suffix: `0x100000` (`0x1b` is 27);
/// - leading blanks and a `+` are allowed; a `-` makes any number out of range.
///
/// # Errors
/// [`SizeError::Invalid`] for text that is not a size, [`SizeError::OutOfRange`] for a negative
/// size or one of 2^64 bytes or more. As in qemu, text after the number makes it invalid even
/// when the number is out of range (`-1k`).
pub fn strtosz(s: &str) -> std::result::Result<u64, SizeError> {
    let b = s.as_bytes();
    let (value, end) = strtosz_prefix(b);
    if end < b.len() {
        return Err(SizeError::Invalid);
    }
    value
}

/// `qemu_strtosz` with an end pointer: the value (or error) of the number at the start of `b`,
/// and where it ends.
fn strtosz_prefix(b: &[u8]) -> (std::result::Result<u64, SizeError>, usize) {
    use SizeError::{Invalid, OutOfRange};
    // The whole part, as decimal.
    let whole = strtoull(b, 10);
    let (mut val, mut end) = match whole {
        Some((None, _, end) | (Some(_), true, end)) => return (Err(OutOfRange), end),
        Some((Some(v), false, end)) => (v, end),
        None => (0, 0),
    };
    let mut valf: u64 = 0;
    let next = b.get(end).copied();
    if whole.is_some() && val == 0 && matches!(next, Some(b'x' | b'X')) {
        // Hex: no fraction, no suffix (b and e are hex digits anyway).
        match strtoull(b, 16) {
            Some((Some(v), _, e)) => (val, end) = (v, e),
            Some((None, _, e)) => return (Err(OutOfRange), e),
            None => return (Err(Invalid), 0),
        }
        let next = b.get(end).copied();
        if next == Some(b'.') || suffix_mul(next).is_some_and(|m| m > 1) {
            return (Err(Invalid), 0);
        }
    } else if next == Some(b'.') || (whole.is_none() && b.contains(&b'.')) {
        // A fraction: "1.k" needs no digits after the point.
        let fraction = if whole.is_some() && !b.get(end + 1).is_some_and(u8::is_ascii_digit) {
            end += 1;
            0.0
        } else {
            let copy_end = b[end..]
                .iter()
                .position(|&c| c == b'e' || c == b'E')
                .map_or(b.len(), |p| end + p);
            let Some((f, nonzero, len)) = strtod_fraction(&b[end..copy_end]) else {
                return (Err(Invalid), 0);
            };
            end += len;
            let Some(f) = f else {
                return (Err(OutOfRange), end);
            };
            if f == 0.0 && nonzero {
                // Too small for a double: still a fraction, not nothing.
                valf = 1;
            }
            f
        };
        if fraction == 1.0 {
            // Digits that round up to a whole one.
            match val.checked_add(1) {
                Some(v) => val = v,
                None => return (Err(OutOfRange), end),
            }
        } else if valf == 0 {
            // A 64-bit fixed-point fraction; exact, as the scale is a power of two.
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
            let f = (fraction * 18_446_744_073_709_551_616.0) as u64;
            valf = if f == 0 && fraction > 0.0 { 1 } else { f };
        }
    } else if whole.is_none() {
        return (Err(Invalid), 0);
    }
    let mul = match suffix_mul(b.get(end).copied()) {
        Some(m) => {
            end += 1;
            m
        }
        None => 1,
    };
    if mul == 1 {
        // A fraction needs a unit larger than a byte.
        return if valf == 0 {
            (Ok(val), end)
        } else {
            (Err(Invalid), 0)
        };
    }
    // 64.64 fixed point times the unit, rounding half a byte up.
    let frac = u128::from(valf) * u128::from(mul);
    let total = u128::from(val) * u128::from(mul) + (frac >> 64) + ((frac >> 63) & 1);
    match u64::try_from(total) {
        Ok(v) => (Ok(v), end),
        Err(_) => (Err(OutOfRange), end),
    }
}

/// A size-typed `-o` option (`size`, `cluster_size`), with the messages of qemu's option
/// parser.
///
/// # Errors
/// When the value is not a size or is out of range.
pub fn parse_size_opt(key: &str, value: &str) -> Result<u64> {
    strtosz(value).map_err(|e| {
        Error::InvalidOption(match e {
            SizeError::Invalid => format!(
                "Parameter '{key}' expects a non-negative number below 2^64\n\
                 Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n\
                 and exabytes, respectively."
            ),
            SizeError::OutOfRange => {
                format!("Value '{value}' is out of range for parameter '{key}'")
            }
        })
    })
}

/// Parses a size with qemu's syntax ([`strtosz`]).
///
/// # Errors
/// When the text is not a size or is out of range.
pub fn parse_size(s: &str) -> Result<u64> {
    strtosz(s).map_err(|_| {
        Error::InvalidOption(format!(
            "Invalid size '{s}': expected a number with an optional k, M, G, T, P or E suffix"
        ))
    })
}

/// Parses qemu's boolean spellings.
///
/// # Errors
/// When the text is none of them.
pub fn parse_bool(key: &str, v: &str) -> Result<bool> {
    match v {
        "on" | "yes" | "true" | "y" => Ok(true),
        "off" | "no" | "false" | "n" => Ok(false),
        _ => Err(Error::InvalidOption(format!(
            "Parameter '{key}' expects 'on' or 'off'"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_size_suffixes_scale_by_1024() {
        assert_eq!(parse_size("512").unwrap(), 512);
        assert_eq!(parse_size("64k").unwrap(), 65536);
        assert_eq!(parse_size("1M").unwrap(), 1 << 20);
        assert_eq!(parse_size("6G").unwrap(), 6 << 30);
        assert_eq!(parse_size("1.5G").unwrap(), 3 << 29);
        assert_eq!(parse_size("2T").unwrap(), 2 << 40);
    }

    #[test]
    fn strtosz_matches_qemu_cases() {
        use SizeError::{Invalid, OutOfRange};
        const EIB: u64 = 1 << 60;
        let ok = [
            ("0", 0),
            ("12345", 12345),
            (" +12345", 12345),
            ("1b", 1),
            ("1B", 1),
            ("1k", 1024),
            ("1K", 1024),
            ("1e", EIB),
            ("1E", EIB),
            ("0x100000", 0x10_0000),
            ("0X10", 16),
            ("0x1b", 27),
            ("0x1E", 30),
            (" 0x10", 16),
            ("+0x10", 16),
            ("0xffffffffffffffff", u64::MAX),
            ("1.", 1),
            ("1.0", 1),
            ("1.b", 1),
            ("1.k", 1024),
            ("1.5k", 1536),
            ("1.5M", 3 << 19),
            ("1.5e", EIB / 2 * 3),
            (".5k", 512),
            ("+.5k", 512),
            ("0.5M", 1 << 19),
            ("08", 8),
            ("12.345M", 12_944_671),
            ("1.0009765625k", 1025),
            ("0.00048828125k", 1),
            ("0.0004k", 0),
            ("15E", 15 * EIB),
            ("18446744073709551615", u64::MAX),
            ("18446744073709551615b", u64::MAX),
        ];
        for (s, want) in ok {
            assert_eq!(strtosz(s), Ok(want), "{s:?}");
        }
        let bad = [
            ("", Invalid),
            (" ", Invalid),
            ("abc", Invalid),
            ("12x", Invalid),
            ("1 M", Invalid),
            ("1M ", Invalid),
            ("1e3", Invalid),
            ("1.5", Invalid),
            ("1.5b", Invalid),
            (".5", Invalid),
            (".k", Invalid),
            (".", Invalid),
            ("0x", Invalid),
            ("0xg", Invalid),
            ("0x20M", Invalid),
            ("0x1p3", Invalid),
            ("0x1.8", Invalid),
            ("0b1000", Invalid),
            ("inf", Invalid),
            ("nan", Invalid),
            ("1.5e1k", Invalid),
            ("-2M", Invalid),
            ("-.1k", Invalid),
            ("100000Pjunk", Invalid),
            ("-0", OutOfRange),
            ("-1", OutOfRange),
            (" -.0", OutOfRange),
            ("-0x10", Invalid),
            ("20E", OutOfRange),
            ("16E", OutOfRange),
            ("18446744073709551616", OutOfRange),
            ("0x10000000000000000", OutOfRange),
            (
                "15.9999999999999999999999999999999999999999999999999999E",
                OutOfRange,
            ),
        ];
        for (s, want) in bad {
            assert_eq!(strtosz(s), Err(want), "{s:?}");
        }
        let tiny = format!(".{}1M", "0".repeat(350));
        assert_eq!(strtosz(&tiny), Ok(0));
        // Negative, but the unit after the fraction is left over: invalid, as in qemu.
        assert_eq!(strtosz(&format!("-{tiny}")), Err(Invalid));
        assert_eq!(strtosz(&format!(" -.{}", "0".repeat(350))), Err(OutOfRange));
    }

    #[test]
    fn parse_size_garbage_is_an_error() {
        assert!(parse_size("").is_err());
        assert!(parse_size("12x").is_err());
        assert!(parse_size("99999999999E").is_err());
        assert!(parse_size("-1").is_err());
    }

    #[test]
    fn split_opts_double_comma_escapes() {
        let v = split_opts("a=1,backing_file=x,,y,c=on").unwrap();
        assert_eq!(
            v,
            vec![
                ("a".into(), "1".into()),
                ("backing_file".into(), "x,y".into()),
                ("c".into(), "on".into())
            ]
        );
    }

    #[test]
    fn split_opts_reads_short_form_booleans_as_qemuopts() {
        assert_eq!(
            split_opts("compat=1.1,lazy_refcounts,noextended_l2").unwrap(),
            vec![
                ("compat".into(), "1.1".into()),
                ("lazy_refcounts".into(), "on".into()),
                ("extended_l2".into(), "off".into()),
            ]
        );
        // The option then judges the value: a size is not "on".
        assert_eq!(
            split_opts("cluster_size").unwrap(),
            vec![("cluster_size".into(), "on".into())]
        );
    }
}
