//! qemu-img's `-t`/`-T` cache modes. `img` writes through the page cache and flushes before it
//! reports success, which is what every mode but `unsafe` promises and more than `unsafe` asks;
//! where a command reads or writes in bulk (convert, check and compare's `-T`), `none` and
//! `directsync` go around the page cache, as their `cache.direct=on` asks. Convert's target
//! goes around it when `-t` is not given, unless its output is compressed.

use crate::failure::{CliResult, Failure};

/// The cache modes qemu knows.
pub const CACHE_MODES: [&str; 5] = ["none", "writeback", "writethrough", "directsync", "unsafe"];

/// Checks a cache mode; `what` is "cache" (`-t`) or "source cache" (`-T`), as in qemu's message.
///
/// # Errors
/// `Invalid cache option: X` for names qemu does not know.
pub fn parse_cache(mode: Option<&str>, what: &str) -> CliResult<()> {
    match mode {
        Some(m) if !CACHE_MODES.contains(&m) => {
            Err(Failure::new(format!("Invalid {what} option: {m}")))
        }
        _ => Ok(()),
    }
}

/// Whether a cache mode bypasses the page cache (qemu's `cache.direct=on`).
pub fn is_direct(mode: Option<&str>) -> bool {
    matches!(mode, Some("none" | "directsync"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_cache_messages_match_qemu() {
        assert_eq!(
            parse_cache(Some("foo"), "cache").unwrap_err().message,
            "Invalid cache option: foo"
        );
        assert_eq!(
            parse_cache(Some("foo"), "source cache")
                .unwrap_err()
                .message,
            "Invalid source cache option: foo"
        );
        assert!(parse_cache(Some("none"), "cache").is_ok());
        assert!(parse_cache(None, "cache").is_ok());
    }
}
