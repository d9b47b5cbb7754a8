//! I/O throttling for a disk, as qemu's `throttling.*` options and Cloud Hypervisor's rate
//! limiter: leaky buckets of bytes and of requests, shared by all the disk's queues.
//!
//! Each bucket drains at its rate; a request may start while every bucket's level is at most
//! its burst size, and then adds its cost (its bytes, or one request). So a guest gets the rate
//! on average and a burst of up to the burst size at once, as with qemu, whose burst defaults
//! to a tenth of a second's worth.

use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// One limit: `rate` units a second, bursts of up to `burst` units.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Limit {
    /// Units a second (bytes or requests), above 0.
    pub rate: f64,
    /// Units a request may find already in the bucket and still start.
    pub burst: f64,
}

impl Limit {
    /// qemu's `throttling.bps-total=RATE` (with `-max=BURST`): a burst of a tenth of the rate
    /// when none is given.
    pub fn per_second(rate: u64, burst: Option<u64>) -> Option<Limit> {
        (rate > 0).then(|| Limit {
            rate: rate as f64,
            burst: burst.map_or(rate as f64 / 10.0, |b| b as f64),
        })
    }

    /// Cloud Hypervisor's `bw_size=SIZE,bw_refill_time=MS`: SIZE units every MS milliseconds,
    /// SIZE at once.
    pub fn refilled(size: u64, refill_ms: u64) -> Option<Limit> {
        (size > 0 && refill_ms > 0).then(|| Limit {
            rate: size as f64 * 1000.0 / refill_ms as f64,
            burst: size as f64,
        })
    }
}

/// A disk's limits: bytes and requests a second.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Limits {
    /// Bytes read or written.
    pub bytes: Option<Limit>,
    /// Requests of any kind.
    pub ops: Option<Limit>,
}

impl Limits {
    /// Whether any limit is set.
    pub fn any(&self) -> bool {
        self.bytes.is_some() || self.ops.is_some()
    }
}

#[derive(Debug)]
struct Bucket {
    limit: Limit,
    level: f64,
}

impl Bucket {
    fn drain(&mut self, secs: f64) {
        self.level = (self.level - self.limit.rate * secs).max(0.0);
    }

    /// How long until a request may start.
    fn wait(&self) -> f64 {
        let extra = self.level - self.limit.burst;
        if extra <= 0.0 {
            0.0
        } else {
            extra / self.limit.rate
        }
    }
}

#[derive(Debug)]
struct State {
    bytes: Option<Bucket>,
    ops: Option<Bucket>,
    last: Instant,
    /// Time requests were held back, for the report.
    held: Duration,
}

/// A disk's buckets, shared by its I/O threads.
#[derive(Debug)]
pub struct Throttle {
    state: Mutex<State>,
}

impl Throttle {
    /// Buckets for `limits`; `None` when no limit is set.
    pub fn new(limits: Limits) -> Option<Throttle> {
        limits.any().then(|| Throttle {
            state: Mutex::new(State {
                bytes: limits.bytes.map(|limit| Bucket { limit, level: 0.0 }),
                ops: limits.ops.map(|limit| Bucket { limit, level: 0.0 }),
                last: Instant::now(),
                held: Duration::ZERO,
            }),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// How long the next request must wait, or `None` when it may start now.
    pub fn wait(&self) -> Option<Duration> {
        self.wait_at(Instant::now())
    }

    fn wait_at(&self, now: Instant) -> Option<Duration> {
        let mut guard = self.state();
        let s = &mut *guard;
        let secs = now.saturating_duration_since(s.last).as_secs_f64();
        s.last = s.last.max(now);
        let mut wait: f64 = 0.0;
        for b in [&mut s.bytes, &mut s.ops].into_iter().flatten() {
            b.drain(secs);
            wait = wait.max(b.wait());
        }
        if wait <= 0.0 {
            return None;
        }
        // At least a millisecond, so that a tiny remainder does not spin.
        let d = Duration::from_secs_f64(wait.min(3600.0)).max(Duration::from_millis(1));
        Some(d)
    }

    /// Accounts a request of `bytes` that has been served.
    pub fn charge(&self, bytes: u64) {
        let mut s = self.state();
        if let Some(b) = &mut s.bytes {
            b.level += bytes as f64;
        }
        if let Some(b) = &mut s.ops {
            b.level += 1.0;
        }
    }

    /// Adds `d` to the time requests were held back.
    pub fn held(&self, d: Duration) {
        let mut s = self.state();
        s.held = s.held.saturating_add(d);
    }

    /// Total time requests were held back.
    pub fn held_total(&self) -> Duration {
        self.state().held
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_passes_then_the_rate_holds() {
        let t = Throttle::new(Limits {
            bytes: Limit::per_second(1000, Some(500)),
            ops: None,
        })
        .unwrap();
        let t0 = Instant::now();
        assert_eq!(t.wait_at(t0), None);
        t.charge(400);
        assert_eq!(t.wait_at(t0), None);
        t.charge(400);
        // 800 in the bucket, burst 500: 300 bytes to drain at 1000/s.
        let w = t.wait_at(t0).unwrap();
        assert!((w.as_secs_f64() - 0.3).abs() < 1e-6, "{w:?}");
        assert_eq!(t.wait_at(t0 + Duration::from_millis(300)), None);
    }

    #[test]
    fn requests_and_bytes_both_limit() {
        let t = Throttle::new(Limits {
            bytes: Limit::per_second(1 << 30, None),
            ops: Limit::refilled(10, 1000),
        })
        .unwrap();
        let t0 = Instant::now();
        for _ in 0..11 {
            assert_eq!(t.wait_at(t0), None);
            t.charge(512);
        }
        // 11 requests in a bucket of 10 at 10/s: a tenth of a second to wait.
        let w = t.wait_at(t0).unwrap();
        assert!((w.as_secs_f64() - 0.1).abs() < 1e-6, "{w:?}");
    }

    #[test]
    fn limits_need_a_rate() {
        assert_eq!(Limit::per_second(0, None), None);
        assert_eq!(Limit::refilled(0, 100), None);
        assert_eq!(Limit::refilled(100, 0), None);
        assert!(Throttle::new(Limits::default()).is_none());
        let l = Limit::per_second(1000, None).unwrap();
        assert!((l.burst - 100.0).abs() < 1e-9);
    }
}
