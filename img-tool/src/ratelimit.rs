//! `-r RATE` of convert and commit: a cap on the bytes written per second.
//!
//! qemu-img throttles the target's requests; here the writers report what they wrote and
//! sleep while the total runs ahead of RATE bytes per second since the start. Zeroes the
//! target needs not be told about (holes, ranges left to a backing file) cost nothing.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::failure::CliResult;
use crate::units::cvtnum;
use crate::units::INT64_MAX;

/// A shared byte budget of `rate` bytes per second.
#[derive(Debug)]
pub struct RateLimit {
    rate: u64,
    start: Instant,
    written: AtomicU64,
}

impl RateLimit {
    /// Parses `-r` (a size, as in qemu-img: `-r 10M`); no option or 0 means no limit.
    ///
    /// # Errors
    /// qemu-img's two messages for a bad rate.
    pub fn parse(arg: Option<&str>) -> CliResult<Option<Self>> {
        let Some(s) = arg else { return Ok(None) };
        let rate = cvtnum("rate limit", s, INT64_MAX)?;
        Ok((rate > 0).then(|| RateLimit {
            rate,
            start: Instant::now(),
            written: AtomicU64::new(0),
        }))
    }

    /// Counts `n` bytes written, then sleeps until the total is within the budget.
    pub fn wrote(&self, n: u64) {
        let total = self
            .written
            .fetch_add(n, Ordering::Relaxed)
            .saturating_add(n);
        let due = Duration::from_secs(total / self.rate)
            + Duration::from_nanos((total % self.rate) * 1_000_000_000 / self.rate);
        if let Some(wait) = due.checked_sub(self.start.elapsed()) {
            std::thread::sleep(wait);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_rate_zero_or_none_is_no_limit() {
        assert!(RateLimit::parse(None).unwrap().is_none());
        assert!(RateLimit::parse(Some("0")).unwrap().is_none());
        assert_eq!(RateLimit::parse(Some("1M")).unwrap().unwrap().rate, 1 << 20);
        assert_eq!(
            RateLimit::parse(Some("abc")).unwrap_err().message,
            "Invalid rate limit specified: 'abc'."
        );
    }

    #[test]
    fn wrote_sleeps_to_keep_the_rate() {
        let r = RateLimit::parse(Some("1M")).unwrap().unwrap();
        r.wrote(256 * 1024);
        assert!(r.start.elapsed() >= Duration::from_millis(240));
    }
}
