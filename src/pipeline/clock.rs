//! The one clock the pipeline reads wherever time decides an outcome: the keys' rate
//! limits, the per-IP block, HMAC timestamps and the replay window, key expiry, and
//! `last_used_at`. It is the system's clock plus a skew that only ever grows, so tests
//! move time forward with [`Clock::advance`] instead of sleeping, and every reader (each
//! copy shares the skew) sees the same jump. A [`Clock::manual`] one stands still
//! between advances, for tests that count requests over a stretch of time.

use governor::nanos::Nanos;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// A handle on the gateway's clock (cheap to clone: one `Arc`).
#[derive(Debug, Clone)]
pub struct Clock(Arc<Inner>);

#[derive(Debug)]
struct Inner {
    origin: Instant,
    /// The Unix time at `origin`.
    unix_origin: Duration,
    /// Manual: time moves only by `advance`.
    frozen: bool,
    /// Nanoseconds added by [`Clock::advance`].
    skew: AtomicU64,
}

impl Default for Clock {
    fn default() -> Clock {
        Clock::system()
    }
}

impl Clock {
    /// The system's clock, with no skew.
    pub fn system() -> Clock {
        Clock::new(false)
    }

    /// A clock that starts at the system's time and then moves only by [`Clock::advance`].
    pub fn manual() -> Clock {
        Clock::new(true)
    }

    fn new(frozen: bool) -> Clock {
        Clock(Arc::new(Inner {
            origin: Instant::now(),
            unix_origin: SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default(),
            frozen,
            skew: AtomicU64::new(0),
        }))
    }

    /// Moves this clock, and every copy of it, forward by `d`.
    pub fn advance(&self, d: Duration) {
        self.0.skew.fetch_add(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    fn skew(&self) -> Duration {
        Duration::from_nanos(self.0.skew.load(Ordering::Relaxed))
    }

    /// Monotonic time since this clock was made.
    pub fn elapsed(&self) -> Duration {
        if self.0.frozen { self.skew() } else { self.0.origin.elapsed() + self.skew() }
    }

    /// Wall-clock Unix seconds: what HMAC timestamps, expiry and `last_used_at` use.
    pub fn unix_now(&self) -> i64 {
        let now = if self.0.frozen {
            self.0.unix_origin + self.skew()
        } else {
            SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default() + self.skew()
        };
        i64::try_from(now.as_secs()).unwrap_or(i64::MAX)
    }
}

/// The rate limiters read the same clock.
impl governor::clock::Clock for Clock {
    type Instant = Nanos;

    fn now(&self) -> Nanos {
        Nanos::from(self.elapsed())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// advancing one copy moves every copy, on both scales
    #[test]
    fn advance_moves_every_copy() {
        let a = Clock::system();
        let b = a.clone();
        let (unix, mono) = (a.unix_now(), b.elapsed());
        b.advance(Duration::from_secs(3600));
        assert!(a.unix_now() >= unix + 3600);
        assert!(a.elapsed() >= mono + Duration::from_secs(3600));
    }

    /// a manual clock moves only when advanced
    #[test]
    fn a_manual_clock_stands_still_between_advances() {
        let c = Clock::manual();
        let (unix, mono) = (c.unix_now(), c.elapsed());
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!((c.unix_now(), c.elapsed()), (unix, mono));
        c.advance(Duration::from_millis(1500));
        assert_eq!(c.elapsed(), mono + Duration::from_millis(1500));
        assert!((unix + 1..=unix + 2).contains(&c.unix_now()));
    }
}
