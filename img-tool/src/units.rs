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

/// qemu-img's `cvtnum_full` for sizes: a size argument ([`imgblock::options::strtosz`]) of at
/// most `max` bytes; `name` says what it is in the two messages.
///
/// # Errors
/// `Invalid NAME specified: 'TEXT'.` for text that is not a size, `Invalid NAME specified.
/// Must be between 0 and MAX.` for one out of range.
pub fn cvtnum(name: &str, s: &str, max: u64) -> CliResult<u64> {
    let range = || {
        Failure::new(format!(
            "Invalid {name} specified. Must be between 0 and {max}."
        ))
    };
    match imgblock::options::strtosz(s) {
        Ok(n) if n <= max => Ok(n),
        Ok(_) | Err(SizeError::OutOfRange) => Err(range()),
        Err(SizeError::Invalid) => Err(Failure::new(format!("Invalid {name} specified: '{s}'."))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
