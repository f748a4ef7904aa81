//! The circuit breaker in front of Redis.
//!
//! Closed: operations go to Redis. The first failure (an error or an operation past
//! `op_timeout`) opens it: from then on operations fail at once, without waiting, so a
//! Redis outage costs no request a timeout; the background task probes Redis every
//! [`PROBE_EVERY`] and closes the breaker after a probe succeeds during which no operation
//! failed. One failure is enough
//! because a failure is also the only sign that Redis may have restarted empty; the
//! probe checks the fleet's epoch before anything trusts Redis again (see `mod.rs`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// How often an open breaker probes Redis.
pub const PROBE_EVERY: Duration = Duration::from_millis(200);

/// The breaker's state in one word, so that "no failure since the probe began" and "close"
/// are one compare-and-swap: bit 0 set while open, the rest counts failures.
#[derive(Debug)]
pub struct Breaker {
    state: AtomicU64,
}

/// The breaker's state when a probe began (`Breaker::mark`).
#[derive(Debug, Clone, Copy)]
pub struct Mark(u64);

impl Breaker {
    /// Starts closed: start-up has just reached Redis.
    pub fn new() -> Breaker {
        Breaker { state: AtomicU64::new(0) }
    }

    /// True when operations may go to Redis.
    pub fn closed(&self) -> bool {
        self.state.load(Ordering::Acquire) & 1 == 0
    }

    /// Records a failed operation; true when this call opened the breaker.
    pub fn failed(&self) -> bool {
        let before = self
            .state
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |s| Some(((s >> 1).wrapping_add(1) << 1) | 1))
            .unwrap_or_else(|s| s);
        before & 1 == 0
    }

    /// The state as a probe begins.
    pub fn mark(&self) -> Mark {
        Mark(self.state.load(Ordering::Acquire))
    }

    /// A probe that began at `mark` succeeded: operations go to Redis again, unless an
    /// operation failed meanwhile — the probe may have read Redis before it restarted
    /// (empty), while that failure was the restart. True when this closed the breaker.
    pub fn close_if_unchanged(&self, mark: Mark) -> bool {
        mark.0 & 1 == 1 && self.state.compare_exchange(mark.0, mark.0 & !1, Ordering::AcqRel, Ordering::Acquire).is_ok()
    }
}

impl Default for Breaker {
    fn default() -> Self {
        Breaker::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// one failure opens it, concurrent failures count one outage, a probe closes it; a
    /// probe during which an operation failed does not
    #[test]
    fn opens_once_per_outage() {
        let b = Breaker::new();
        assert!(b.closed());
        assert!(!b.close_if_unchanged(b.mark()), "closed already");
        assert!(b.failed());
        assert!(!b.failed(), "already open");
        assert!(!b.closed());
        let probe = b.mark();
        assert!(b.close_if_unchanged(probe));
        assert!(b.closed());
        assert!(b.failed(), "a new outage opens it again");
        let probe = b.mark();
        assert!(!b.failed());
        assert!(!b.close_if_unchanged(probe), "a failure during the probe keeps it open");
        assert!(!b.closed());
        let stale = b.mark();
        assert!(b.close_if_unchanged(stale));
        // A probe that began while closed cannot close a breaker opened during it.
        let during = b.mark();
        assert!(b.failed());
        assert!(!b.close_if_unchanged(during));
        assert!(!b.closed());
    }
}
