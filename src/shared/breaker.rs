//! The circuit breaker in front of Redis.
//!
//! Closed: operations go to Redis. The first failure (an error or an operation past
//! `op_timeout`) opens it: from then on operations fail at once, without waiting, so a
//! Redis outage costs no request a timeout; the background task probes Redis every
//! [`PROBE_EVERY`] and closes the breaker after a probe succeeds. One failure is enough
//! because a failure is also the only sign that Redis may have restarted empty; the
//! probe checks the fleet's epoch before anything trusts Redis again (see `mod.rs`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// How often an open breaker probes Redis.
pub const PROBE_EVERY: Duration = Duration::from_millis(200);

#[derive(Debug)]
pub struct Breaker {
    open: AtomicBool,
}

impl Breaker {
    /// Starts closed: start-up has just reached Redis.
    pub fn new() -> Breaker {
        Breaker { open: AtomicBool::new(false) }
    }

    /// True when operations may go to Redis.
    pub fn closed(&self) -> bool {
        !self.open.load(Ordering::Acquire)
    }

    /// Records a failed operation; true when this call opened the breaker.
    pub fn failed(&self) -> bool {
        !self.open.swap(true, Ordering::AcqRel)
    }

    /// A probe succeeded: operations go to Redis again.
    pub fn close(&self) {
        self.open.store(false, Ordering::Release);
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

    /// one failure opens it, concurrent failures count one outage, a probe closes it
    #[test]
    fn opens_once_per_outage() {
        let b = Breaker::new();
        assert!(b.closed());
        assert!(b.failed());
        assert!(!b.failed(), "already open");
        assert!(!b.closed());
        b.close();
        assert!(b.closed());
        assert!(b.failed(), "a new outage opens it again");
    }
}
