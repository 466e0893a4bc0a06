//! Leaf: the wall clock as the appliance reports it (Unix milliseconds), durations as the
//! answers show them (milliseconds, to the microsecond), and a throttle for log lines that come
//! in floods. Imports nothing from the crate.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Seconds since the Unix epoch, fractional (for timestamp gauges).
pub fn now_secs_f64() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

/// `d` in milliseconds, rounded to the microsecond: how answers report time.
pub fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

/// At most one log line a second for a kind of event that comes in floods, with how many were
/// left out since the last line. Lock-free: one compare-and-swap decides who logs.
#[derive(Debug)]
pub struct Throttle {
    last_ms: AtomicU64,
    skipped: AtomicU64,
}

impl Throttle {
    pub const fn new() -> Throttle {
        Throttle { last_ms: AtomicU64::new(0), skipped: AtomicU64::new(0) }
    }

    /// `Some(left out since the last line)` when this one is to be logged.
    pub fn admit(&self, now_ms: u64) -> Option<u64> {
        let last = self.last_ms.load(Ordering::Relaxed);
        if now_ms.saturating_sub(last) >= 1_000
            && self.last_ms.compare_exchange(last, now_ms, Ordering::Relaxed, Ordering::Relaxed).is_ok()
        {
            return Some(self.skipped.swap(0, Ordering::Relaxed));
        }
        self.skipped.fetch_add(1, Ordering::Relaxed);
        None
    }
}

impl Default for Throttle {
    fn default() -> Self {
        Throttle::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_is_logged_once_a_second_with_what_was_left_out() {
        let t = Throttle::new();
        assert_eq!(t.admit(10_000), Some(0));
        for ms in 10_001..10_999 {
            assert_eq!(t.admit(ms), None);
        }
        assert_eq!(t.admit(11_000), Some(998));
        assert_eq!(t.admit(11_001), None);
        assert_eq!(t.admit(20_000), Some(1));
    }

    #[test]
    fn durations_are_milliseconds_to_the_microsecond() {
        assert_eq!(ms(Duration::from_nanos(1_234_567)), 1.235);
        assert_eq!(ms(Duration::ZERO), 0.0);
    }
}
