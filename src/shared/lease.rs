//! Leases: a gateway takes a key's requests from Redis a few at a time and spends them
//! locally, so a busy key costs a round trip per lease rather than per request.
//!
//! - A lease is taken from the key's fleet-wide GCRA bucket in Redis (`scripts::TAKE`), so
//!   the fleet never admits more than the bucket grants: over any period, never more than
//!   the configured rate allows.
//! - It lives [`LEASE_TTL`]; what is not spent by then is dropped (never saved for later),
//!   so in any window the fleet admits at most the burst plus what its open leases hold.
//! - Its size follows this gateway's demand for the key: it doubles while leases run out
//!   before they expire, and falls back to what was used when one expires with requests
//!   left. It never exceeds `per_second × LEASE_TTL ÷ gateways alive` (nor the burst ÷
//!   gateways): a key limited to under 40 requests a second per gateway takes one request
//!   per lease, which is exactly the per-request admission of one gateway (and its
//!   `X-RateLimit-Remaining` is Redis's own count).
//! - A refusal from Redis is remembered until the time GCRA gave: requests of a limited
//!   key are refused locally, without a round trip, until then.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long a lease may be spent.
pub const LEASE_TTL: Duration = Duration::from_millis(50);

/// What this gateway holds of one key's bucket.
#[derive(Debug, Default)]
pub struct Lease {
    state: Mutex<State>,
    /// One refill in flight per key: requests that find the lease empty wait for it.
    pub refill: tokio::sync::Mutex<()>,
}

#[derive(Debug)]
struct State {
    tokens: u32,
    /// None: no lease yet.
    expires: Option<Instant>,
    /// What the bucket held after this lease was granted (for `X-RateLimit-Remaining`).
    remaining: u32,
    /// Requests spent from the current lease.
    used: u32,
    /// The size of the next lease.
    size: u32,
    /// Redis refused until then.
    limited_until: Option<Instant>,
}

impl Default for State {
    fn default() -> State {
        State { tokens: 0, expires: None, remaining: 0, used: 0, size: 1, limited_until: None }
    }
}

/// What the lease says about one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Local {
    /// Spent one request; the remaining count to report.
    Spent(u32),
    /// Redis refused this key until then; wait this long.
    Limited(Duration),
    /// Nothing left: ask Redis.
    Empty,
}

impl Lease {
    /// Spends one request of the lease, if it holds one.
    pub fn spend(&self, now: Instant) -> Local {
        let mut s = self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(until) = s.limited_until {
            if now < until {
                return Local::Limited(until - now);
            }
            s.limited_until = None;
        }
        if s.tokens == 0 || s.expires.is_none_or(|e| now >= e) {
            return Local::Empty;
        }
        s.tokens -= 1;
        s.used += 1;
        Local::Spent(s.remaining + s.tokens)
    }

    /// Gives back a request spent by [`Lease::spend`] that was not admitted after all (a
    /// replayed signature, or Redis unavailable for its record).
    pub fn give_back(&self) {
        let mut s = self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        s.tokens += 1;
        s.used = s.used.saturating_sub(1);
    }

    /// The size of the next lease, at most `cap`: adapted to how the last one went.
    pub fn next_size(&self, now: Instant, cap: u32) -> u32 {
        let mut s = self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let ran_out = s.tokens == 0 && s.expires.is_some_and(|e| now < e);
        s.size = if ran_out { s.size.saturating_mul(2) } else { s.used.max(1) };
        s.size = s.size.clamp(1, cap.max(1));
        s.size
    }

    /// Redis granted `granted` requests (one of them for the caller), the bucket holding
    /// `remaining` after; returns the remaining count to report to the caller.
    pub fn granted(&self, now: Instant, granted: u32, remaining: u32) -> u32 {
        let mut s = self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        s.tokens = granted.saturating_sub(1);
        s.used = 1;
        s.remaining = remaining;
        s.expires = Some(now + LEASE_TTL);
        s.limited_until = None;
        remaining + s.tokens
    }

    /// Redis refused the key for `wait`.
    pub fn limited(&self, now: Instant, wait: Duration) {
        let mut s = self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        s.tokens = 0;
        s.limited_until = Some(now + wait);
    }
}

/// The largest lease for a key at `per_second` with `burst`, when `gateways` share it.
pub fn cap(per_second: u32, burst: u32, gateways: u32) -> u32 {
    let g = u64::from(gateways.max(1));
    let by_rate = u64::from(per_second) * LEASE_TTL.as_millis() as u64 / 1000 / g;
    let by_burst = u64::from(burst) / g;
    u32::try_from(by_rate.min(by_burst).max(1)).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// a slow key takes one request per lease: exact, as per-request admission
    #[test]
    fn slow_keys_lease_one_request_at_a_time() {
        assert_eq!(cap(20, 20, 1), 1);
        assert_eq!(cap(39, 100, 1), 1);
        assert_eq!(cap(50, 100, 1), 2);
        assert_eq!(cap(1_000_000, 1_000_000, 1), 50_000);
        assert_eq!(cap(1_000_000, 10, 2), 5);
    }

    /// spends what was granted, reports the bucket's remainder plus what is left here,
    /// doubles while leases run out, shrinks to what was used when one expires
    #[test]
    fn a_lease_is_spent_then_grows_or_shrinks_with_demand() {
        let t0 = Instant::now();
        let l = Lease::default();
        assert_eq!(l.spend(t0), Local::Empty);
        assert_eq!(l.next_size(t0, 64), 1, "the first lease is one request");
        assert_eq!(l.granted(t0, 1, 50), 50);
        assert_eq!(l.spend(t0), Local::Empty, "ran out before expiring");
        assert_eq!(l.next_size(t0, 64), 2);
        assert_eq!(l.granted(t0, 2, 40), 41);
        assert_eq!(l.spend(t0), Local::Spent(40));
        assert_eq!(l.next_size(t0, 64), 4);
        l.granted(t0, 4, 30);
        assert_eq!(l.spend(t0), Local::Spent(32));
        // Expired with two left: the next lease is what was used (two).
        let later = t0 + LEASE_TTL;
        assert_eq!(l.spend(later), Local::Empty, "an expired lease is not spent");
        assert_eq!(l.next_size(later, 64), 2);
        l.granted(later, 2, 0);
        assert_eq!(l.spend(later), Local::Spent(0));
        l.give_back();
        assert_eq!(l.spend(later), Local::Spent(0), "a request given back is spent again");
        l.limited(later, Duration::from_millis(300));
        assert_eq!(l.spend(later + Duration::from_millis(100)), Local::Limited(Duration::from_millis(200)));
        assert_eq!(l.spend(later + Duration::from_millis(300)), Local::Empty);
    }
}
