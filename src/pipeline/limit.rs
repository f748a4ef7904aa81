//! [rate-limit] Per-key GCRA limits, and the per-client-IP budget for failed
//! authentication (docs/authorization.md#rate-limits).
//!
//! Per key: each key has its own governor limiter with its effective quota (key
//! override, else user override, else the config default). A reload that changes one
//! key's quota replaces that key's limiter only; other keys keep their state. Limiters
//! of keys gone from the snapshot are dropped by `prune`.
//!
//! Per client IP: failed authentications are charged to a keyed limiter (IPv6 grouped
//! by /64: one host can own a whole /64). An IP over its budget is refused with 429
//! *before* any key lookup until the budget refills. Both maps are keyed by attacker
//! input, so both are capped and pruned.

use crate::credentials::KeyIdHasher;
use crate::credentials::snapshot::{Key, RateLimit, Snapshot};
use crate::pipeline::clock::Clock;
use crate::pipeline::error::{GateError, LimitScope};
use dashmap::DashMap;
use governor::clock::Clock as _;
use governor::middleware::{NoOpMiddleware, StateInformationMiddleware};
use governor::nanos::Nanos;
use governor::state::keyed::DefaultKeyedStateStore;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota as GovQuota, RateLimiter};
use http::HeaderValue;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

type KeyLimiter = RateLimiter<NotKeyed, InMemoryState, Clock, StateInformationMiddleware>;
type IpLimiter = RateLimiter<u128, DefaultKeyedStateStore<u128>, Clock, NoOpMiddleware<Nanos>>;

/// Client IPs tracked at most (failed-auth budget and blocks each).
const MAX_TRACKED_IPS: usize = 100_000;

/// What the response tells the client about its quota.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quota {
    /// `X-RateLimit-Limit`: the key's requests per second (built with the snapshot).
    pub limit: HeaderValue,
    /// `X-RateLimit-Remaining`: requests left in the current burst.
    pub remaining: u32,
}

/// All rate-limiting state.
#[derive(Debug)]
pub struct RateLimits {
    keys: DashMap<Arc<str>, (RateLimit, KeyLimiter), KeyIdHasher>,
    failed: IpLimiter,
    /// Blocked client IPs, until this time on `clock` (its `elapsed`).
    blocked: DashMap<u128, Duration>,
    clock: Clock,
}

fn nonzero(n: u32) -> NonZeroU32 {
    NonZeroU32::new(n).unwrap_or(NonZeroU32::MIN)
}

pub(crate) fn retry_after(wait: Duration) -> u32 {
    // Whole seconds, rounded up: a client that waits exactly this long gets through.
    u32::try_from(wait.as_millis().div_ceil(1000)).unwrap_or(u32::MAX).max(1)
}

/// The limiter key of a client address: IPv4 as is, IPv6 by its /64.
pub(crate) fn ip_key(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v4) => u128::from(v4.to_bits()),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => u128::from(v4.to_bits()),
            // The /64 prefix, plus bit 32 as a tag: an IPv4 key (< 2^32) never has it.
            None => (v6.to_bits() & !u128::from(u64::MAX)) | (1u128 << 32),
        },
    }
}

impl RateLimits {
    /// Limits with a failed-authentication budget of `failed_per_minute` per client IP,
    /// on `clock`.
    pub fn new(failed_per_minute: u32, clock: Clock) -> RateLimits {
        RateLimits::with_failure_burst(failed_per_minute, failed_per_minute, clock)
    }

    /// Limits whose failed-authentication budget refills at `per_minute` and holds
    /// `burst` failures: the failure after them blocks the address.
    pub fn with_failure_burst(per_minute: u32, burst: u32, clock: Clock) -> RateLimits {
        let q = GovQuota::per_minute(nonzero(per_minute)).allow_burst(nonzero(burst));
        RateLimits {
            keys: DashMap::default(),
            failed: RateLimiter::new(q, DefaultKeyedStateStore::default(), clock.clone()),
            blocked: DashMap::new(),
            clock,
        }
    }

    /// Refuses a client IP that used up its failed-authentication budget.
    pub fn check_ip(&self, ip: IpAddr) -> Result<(), GateError> {
        let k = ip_key(ip);
        let Some(until) = self.blocked.get(&k).map(|u| *u) else { return Ok(()) };
        let now = self.clock.elapsed();
        if until <= now {
            self.blocked.remove(&k);
            return Ok(());
        }
        Err(GateError::TooManyRequests { retry_after_secs: retry_after(until - now), scope: LimitScope::ClientIp })
    }

    /// Charges one failed authentication to `ip`.
    pub fn charge_failure(&self, ip: IpAddr) {
        let k = ip_key(ip);
        if self.failed.len() >= MAX_TRACKED_IPS {
            self.failed.retain_recent();
        }
        if let Err(not_until) = self.failed.check_key(&k) {
            self.block(ip, not_until.wait_time_from(self.clock.now()));
        }
    }

    /// Blocks `ip` for `wait`: the fleet's shared budget said it is over.
    pub fn block(&self, ip: IpAddr, wait: Duration) {
        let k = ip_key(ip);
        if self.blocked.len() < MAX_TRACKED_IPS || self.blocked.contains_key(&k) {
            self.blocked.insert(k, self.clock.elapsed() + wait);
        }
    }

    /// Takes one request from `key`'s quota.
    pub fn check_key(&self, key: &Key) -> Result<Quota, GateError> {
        self.check_key_at(key, key.rate_limit)
    }

    /// Takes one request from `key`'s quota at `rate` (the fallback's share of it while
    /// the fleet's shared state is away).
    pub fn check_key_at(&self, key: &Key, rate: RateLimit) -> Result<Quota, GateError> {
        // Checked under the map's read guard; that guard is gone before `entry`, which
        // would deadlock on the same shard.
        if let Some(e) = self.keys.get(&key.id)
            && e.0 == rate
        {
            return self.take(&e.1, key);
        }
        let q = GovQuota::per_second(nonzero(rate.per_second)).allow_burst(nonzero(rate.burst));
        let limiter =
            RateLimiter::direct_with_clock(q, self.clock.clone()).with_middleware::<StateInformationMiddleware>();
        let entry = self.keys.entry(key.id.clone()).insert((rate, limiter));
        self.take(&entry.1, key)
    }

    fn take(&self, limiter: &KeyLimiter, key: &Key) -> Result<Quota, GateError> {
        match limiter.check() {
            Ok(state) => Ok(Quota { limit: key.limit_header.clone(), remaining: state.remaining_burst_capacity() }),
            Err(not_until) => Err(GateError::TooManyRequests {
                retry_after_secs: retry_after(not_until.wait_time_from(self.clock.now())),
                scope: LimitScope::Key,
            }),
        }
    }

    /// Drops limiters of keys no longer in `snap`, and idle per-IP state.
    pub fn prune(&self, snap: &Snapshot) {
        self.keys.retain(|id, _| snap.by_id(id).is_some());
        self.failed.retain_recent();
        self.failed.shrink_to_fit();
        let now = self.clock.elapsed();
        self.blocked.retain(|_, until| *until > now);
        self.blocked.shrink_to_fit();
    }

    /// Per-key limiters held (for tests and metrics).
    pub fn tracked_keys(&self) -> usize {
        self.keys.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// IPv6 addresses in one /64 share a budget; IPv4 and v4-mapped IPv6 are the same
    #[test]
    fn ip_keys_group_ipv6_by_64() {
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(ip_key(a), ip_key(b));
        assert_ne!(ip_key(a), ip_key(c));
        assert_eq!(ip_key("10.0.0.1".parse().unwrap()), ip_key("::ffff:10.0.0.1".parse().unwrap()));
        assert_ne!(ip_key("0.0.0.0".parse().unwrap()), ip_key("::1".parse().unwrap()));
    }

    /// after the budget, the IP is refused before authentication, with a Retry-After
    #[test]
    fn failed_auth_budget_blocks_the_ip() {
        let clock = Clock::system();
        let l = RateLimits::new(3, clock.clone());
        let ip: IpAddr = "192.0.2.7".parse().unwrap();
        for _ in 0..3 {
            assert!(l.check_ip(ip).is_ok());
            l.charge_failure(ip);
        }
        l.charge_failure(ip);
        let wait = match l.check_ip(ip) {
            Err(GateError::TooManyRequests { retry_after_secs, scope: LimitScope::ClientIp }) => retry_after_secs,
            other => panic!("{other:?}"),
        };
        // 3 a minute: the next failure is allowed 20 s after the burst.
        assert_eq!(wait, 20);
        assert!(l.check_ip("192.0.2.8".parse().unwrap()).is_ok());
        clock.advance(Duration::from_secs(19));
        assert!(l.check_ip(ip).is_err(), "still blocked a second before Retry-After");
        clock.advance(Duration::from_secs(1));
        assert!(l.check_ip(ip).is_ok(), "free again at Retry-After");
    }

    /// Retry-After rounds up to whole seconds, never 0
    #[test]
    fn retry_after_rounds_up() {
        assert_eq!(retry_after(Duration::from_millis(1)), 1);
        assert_eq!(retry_after(Duration::from_millis(1000)), 1);
        assert_eq!(retry_after(Duration::from_millis(1001)), 2);
    }

    /// limiters of keys that left the snapshot are dropped; a changed quota replaces
    /// only that key's limiter
    #[test]
    fn prune_drops_limiters_of_removed_keys() {
        let yaml = |keys: &[&str]| {
            let mut y = String::from(
                "roles: {}\nusers:\n  - id: u\n    status: active\n    auth_method: api_key\n    created_at: 2026-01-01T00:00:00Z\n    updated_at: 2026-01-01T00:00:00Z\n    keys:\n",
            );
            for (i, k) in keys.iter().enumerate() {
                y.push_str(&format!(
                    "      - id: {k}\n        created_at: 2026-01-01T00:00:00Z\n        token_sha256: {i:064}\n"
                ));
            }
            y
        };
        let rate = crate::config::RateLimitConfig { per_second: 1, burst: 1 };
        let both = Snapshot::parse(std::path::Path::new("t.yaml"), &yaml(&["a", "b"]), None, rate).unwrap();
        let l = RateLimits::new(60, Clock::system());
        assert!(l.check_key(both.by_id("a").unwrap()).is_ok());
        assert!(l.check_key(both.by_id("b").unwrap()).is_ok());
        assert!(l.check_key(both.by_id("a").unwrap()).is_err(), "burst 1 used up");
        assert_eq!(l.tracked_keys(), 2);
        let only_a = Snapshot::parse(std::path::Path::new("t.yaml"), &yaml(&["a"]), None, rate).unwrap();
        l.prune(&only_a);
        assert_eq!(l.tracked_keys(), 1);
        assert!(l.check_key(only_a.by_id("a").unwrap()).is_err(), "a kept its state across the reload");
        let faster = crate::config::RateLimitConfig { per_second: 100, burst: 100 };
        let changed = Snapshot::parse(std::path::Path::new("t.yaml"), &yaml(&["a"]), None, faster).unwrap();
        assert!(l.check_key(changed.by_id("a").unwrap()).is_ok(), "a new quota starts a new limiter");
    }
}
