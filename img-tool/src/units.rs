//! Human-readable sizes exactly as qemu prints them (`size_to_str`: three significant digits,
//! binary units), and qemu's size arguments.

use imgblock::options::SizeError;

use crate::failure::{CliResult, Failure};

const SUFFIXES: [&str; 7] = ["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"];

/// `frexp`'s exponent: `x = m * 2^e` with `m` in `[0.5, 1)`; 0 for 0.
fn frexp_exponent(x: f64) -> i32 {
    if x == 0.0 || !x.is_finite() {
        return 0;
    }
    let bits = x.to_bits();
    let biased = i32::try_from((bits >> 52) & 0x7ff).unwrap_or(0);
    if biased == 0 {
        // Subnormal: not reachable from a u64 size.
        return -1021;
    }
    biased - 1022
}

/// A size as qemu's `size_to_str` prints it: "1 MiB", "324 KiB", "1.5 GiB", "0 B".
pub fn size_to_str(val: u64) -> String {
    // The unit switches up once the number would reach 1000 (qemu commit e41b509d68a).
    #[allow(clippy::cast_precision_loss)]
    let v = val as f64;
    let e = frexp_exponent(v / (1000.0 / 1024.0));
    let i = usize::try_from((e - 1) / 10)
        .unwrap_or(0)
        .min(SUFFIXES.len() - 1);
    #[allow(clippy::cast_precision_loss)]
    let div = (1u64 << (i * 10)) as f64;
    format!("{} {}B", format_g3(v / div), SUFFIXES[i])
}

/// C's `%0.3g`: three significant digits, trailing zeros removed, exponent form when the
/// exponent is below -4 or at least 3.
pub fn format_g3(x: f64) -> String {
    const PRECISION: i32 = 3;
    if x == 0.0 {
        return "0".to_owned();
    }
    // `{:e}` rounds the exact binary value to the requested digits, like printf.
    let sci = format!("{:.*e}", 2, x);
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    if !(-4..PRECISION).contains(&exp) {
        let m = strip_zeros(mantissa);
        let sign = if exp < 0 { '-' } else { '+' };
        return format!("{m}e{sign}{:02}", exp.abs());
    }
    let decimals = usize::try_from(PRECISION - 1 - exp).unwrap_or(0);
    strip_zeros(&format!("{x:.decimals$}")).to_owned()
}

fn strip_zeros(s: &str) -> &str {
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.')
    } else {
        s
    }
}

/// "1 MiB (1048576 bytes)", as `info` prints virtual sizes.
pub fn size_with_bytes(val: u64) -> String {
    format!("{} ({val} bytes)", size_to_str(val))
}

/// qemu's `INT64_MAX`, the bound of most sizes and offsets it takes.
pub const INT64_MAX: u64 = i64::MAX.unsigned_abs();

/// qemu-img's `cvtnum` for sizes: a size argument ([`imgblock::options::strtosz`]) of at
/// most `max` bytes; `name` says what it is in the two messages.
///
/// # Errors
/// `Invalid NAME specified: 'TEXT'.` for text that is not a size, `Invalid NAME specified.
/// Must be between 0 and MAX.` for one out of range.
pub fn cvtnum(name: &str, s: &str, max: u64) -> CliResult<u64> {
    cvtnum_full(name, s, true, 0, max)
}

/// How a number argument failed: qemu words the two cases differently.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NumError {
    /// Not a number at all.
    Invalid,
    /// A number, but out of range.
    Range,
}

/// C's `isspace`.
fn is_c_space(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\n' | '\x0b' | '\x0c' | '\r')
}

/// qemu's `qemu_strtou64(s, NULL, 0)`: `strtoull` with base 0 (`0x` hex, leading-0 octal) over
/// the whole text; leading blanks and a sign are allowed, and a negative number wraps as in C.
pub fn strtou64(s: &str) -> Result<u64, NumError> {
    let t = s.trim_start_matches(is_c_space);
    let (neg, t) = match t.as_bytes().first() {
        Some(b'-') => (true, &t[1..]),
        Some(b'+') => (false, &t[1..]),
        _ => (false, t),
    };
    let (radix, digits) = if let Some(h) = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        (16, h)
    } else if t.len() > 1 && t.starts_with('0') {
        (8, &t[1..])
    } else {
        (10, t)
    };
    if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
        return Err(NumError::Invalid);
    }
    let v = u64::from_str_radix(digits, radix).map_err(|_| NumError::Range)?;
    Ok(if neg { v.wrapping_neg() } else { v })
}

/// qemu's `qemu_strtosz(s, NULL)` ([`imgblock::options::strtosz`]).
pub fn strtosz(s: &str) -> Result<u64, NumError> {
    imgblock::options::strtosz(s).map_err(|e| match e {
        SizeError::Invalid => NumError::Invalid,
        SizeError::OutOfRange => NumError::Range,
    })
}

/// qemu-img's `cvtnum_full`: a size (`size`) or plain number between `min` and `max`, with
/// its two messages.
///
/// # Errors
/// `Invalid NAME specified: 'TEXT'.` or `Invalid NAME specified. Must be between MIN and MAX.`
pub fn cvtnum_full(name: &str, value: &str, size: bool, min: u64, max: u64) -> CliResult<u64> {
    let range = || {
        Failure::new(format!(
            "Invalid {name} specified. Must be between {min} and {max}."
        ))
    };
    match if size {
        strtosz(value)
    } else {
        strtou64(value)
    } {
        Err(NumError::Invalid) => Err(Failure::new(format!(
            "Invalid {name} specified: '{value}'."
        ))),
        Err(NumError::Range) => Err(range()),
        Ok(n) if n < min || n > max => Err(range()),
        Ok(n) => Ok(n),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strtou64_follows_c() {
        assert_eq!(strtou64("0x1f"), Ok(31));
        assert_eq!(strtou64("010"), Ok(8));
        assert_eq!(strtou64(" +5"), Ok(5));
        assert_eq!(strtou64("-0"), Ok(0));
        assert_eq!(strtou64("-18446744073709551615"), Ok(1));
        assert_eq!(strtou64("08"), Err(NumError::Invalid));
        assert_eq!(strtou64("0x"), Err(NumError::Invalid));
        assert_eq!(strtou64("0x+1"), Err(NumError::Invalid));
        assert_eq!(strtou64("5 "), Err(NumError::Invalid));
        assert_eq!(strtou64(""), Err(NumError::Invalid));
        assert_eq!(strtou64("99999999999999999999"), Err(NumError::Range));
    }

    #[test]
    fn strtosz_follows_qemu() {
        assert_eq!(strtosz("4096"), Ok(4096));
        assert_eq!(strtosz("010"), Ok(10));
        assert_eq!(strtosz("0X10"), Ok(16));
        assert_eq!(strtosz("1k"), Ok(1024));
        assert_eq!(strtosz("1B"), Ok(1));
        assert_eq!(strtosz("1.0B"), Ok(1));
        assert_eq!(strtosz("5."), Ok(5));
        assert_eq!(strtosz(".5k"), Ok(512));
        assert_eq!(strtosz("0.9999k"), Ok(1024));
        assert_eq!(strtosz("0.0005k"), Ok(1));
        assert_eq!(strtosz("1e"), Ok(1 << 60));
        assert_eq!(strtosz(" 1k"), Ok(1024));
        for bad in [
            "1.5", "1.1B", "1e3", "1kB", "0x10k", "0x1.8k", ".", ".k", "", "1k ", "-x",
        ] {
            assert_eq!(strtosz(bad), Err(NumError::Invalid), "{bad:?}");
        }
        for big in [
            "-1",
            "-0",
            "16E",
            "18446744073709551616",
            "0xffffffffffffffffff",
        ] {
            assert_eq!(strtosz(big), Err(NumError::Range), "{big:?}");
        }
    }

    #[test]
    fn size_to_str_matches_qemu() {
        assert_eq!(size_to_str(0), "0 B");
        assert_eq!(size_to_str(512), "512 B");
        assert_eq!(size_to_str(1000), "0.977 KiB");
        assert_eq!(size_to_str(69632), "68 KiB");
        assert_eq!(size_to_str(331_776), "324 KiB");
        assert_eq!(size_to_str(197_120), "192 KiB");
        assert_eq!(size_to_str(1 << 20), "1 MiB");
        assert_eq!(size_to_str(3 << 29), "1.5 GiB");
        assert_eq!(size_to_str(10 << 30), "10 GiB");
        assert_eq!(size_to_str(u64::MAX), "16 EiB");
    }

    #[test]
    fn format_g3_switches_to_exponent_at_1000() {
        assert_eq!(format_g3(999.6), "1e+03");
        assert_eq!(format_g3(12.345), "12.3");
        assert_eq!(format_g3(0.0001234), "0.000123");
    }

    #[test]
    fn size_with_bytes_formats_both() {
        assert_eq!(size_with_bytes(1_048_576), "1 MiB (1048576 bytes)");
    }

    #[test]
    fn cvtnum_has_qemus_two_messages() {
        let max = i64::MAX as u64;
        assert_eq!(
            cvtnum("image size", "1X", max).unwrap_err().message,
            "Invalid image size specified: '1X'."
        );
        for big in ["99E", "-1", "8E"] {
            assert_eq!(
                cvtnum("image size", big, max).unwrap_err().message,
                "Invalid image size specified. Must be between 0 and 9223372036854775807."
            );
        }
        assert_eq!(cvtnum("image size", "1.5M", max).unwrap(), 1_572_864);
        assert_eq!(cvtnum("image size", "0x100000", max).unwrap(), 1 << 20);
    }
}
