//! The targets of one route and how one is chosen: round-robin, or the less busy of two
//! picked at random (`least_requests`). Each target carries a little shared state —
//! "refused connections until", the active health check's verdict, passive ejection —
//! updated with atomics only.
//!
//! Which targets may be chosen (docs/configuration.md#health):
//! - a target the active health check found unhealthy is never chosen; when every target
//!   of a route is, the route has none ([`Upstreams::pick`] is `None`: 503 at once);
//! - a target that recently refused a connection, or that is ejected after consecutive
//!   failures (passive), is skipped while another is available, and chosen anyway when
//!   none is: a request then has a better chance than a certain error.

use http::HeaderValue;
use http::uri::Authority;
use rustls::pki_types::ServerName;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// How long a target that refused a connection is skipped.
const DOWN_FOR: Duration = Duration::from_secs(5);
/// How often a failing target is logged about at most.
const WARN_EVERY: Duration = Duration::from_secs(10);
/// Consecutive failures (connect, 5xx, timeout) that eject a target.
pub const EJECT_AFTER: u32 = 5;
/// The first ejection; each one that follows without a success in between doubles it,
/// up to [`EJECT_MAX`].
pub const EJECT_BASE: Duration = Duration::from_secs(10);
pub const EJECT_MAX: Duration = Duration::from_secs(300);

/// How a route spreads requests over its targets.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Balance {
    #[default]
    RoundRobin,
    /// Power of two choices: of two targets picked at random, the one with fewer
    /// requests awaiting their response head.
    LeastRequests,
}

/// The protocol a route speaks to its targets.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Protocol {
    #[default]
    Http1,
    /// HTTP/2: by prior knowledge without TLS (`h2c://`), by ALPN with it.
    H2,
}

/// The upstream targets of one route.
#[derive(Debug)]
pub struct Upstreams {
    targets: Vec<Target>,
    next: AtomicUsize,
    epoch: Instant,
    balance: Balance,
}

/// How a route's targets are reached over TLS (`https://`): the client configuration the
/// `tls` layer built from the route's `upstream_tls`, and the name every target's
/// certificate must carry when one is configured (else each target's own host).
#[derive(Debug, Clone)]
pub struct TlsClient {
    pub config: Arc<rustls::ClientConfig>,
    pub server_name: Option<ServerName<'static>>,
}

/// A target's TLS: the connector and the name sent (SNI) and verified.
#[derive(Clone)]
pub struct TargetTls {
    pub connector: tokio_rustls::TlsConnector,
    pub server_name: ServerName<'static>,
}

impl std::fmt::Debug for TargetTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TargetTls").field("server_name", &self.server_name).finish_non_exhaustive()
    }
}

/// One upstream `http://host:port` or `https://host:port`.
#[derive(Debug)]
pub struct Target {
    pub authority: Authority,
    /// `Some` for an `https://` target.
    pub tls: Option<TargetTls>,
    /// HTTP/2 to this target (see `h2.rs`), else HTTP/1.1.
    pub h2: bool,
    /// The `Host` header the upstream is sent: its own authority.
    pub host: HeaderValue,
    /// This target's index among all targets of its route table: where a connection
    /// worker keeps its idle connections to it.
    pub slot: usize,
    /// Milliseconds since `epoch` until which this target is skipped (0: healthy).
    down_until_ms: AtomicU64,
    /// Milliseconds since `epoch` of the last warning logged about this target (0: none).
    warned_ms: AtomicU64,
    /// Health as the active check and passive ejection see it (shared with the metrics).
    pub health: Arc<Health>,
    /// Requests sent to this target that await their response head.
    outstanding: AtomicUsize,
}

/// What is known about a target's health.
#[derive(Debug)]
pub struct Health {
    /// The active health check's verdict (true until a check says otherwise; always
    /// true without `health_check`).
    healthy: AtomicBool,
    /// Passive: consecutive failures since the last success.
    failures: AtomicU32,
    /// Ejections since the last success: the next one lasts twice as long.
    ejections: AtomicU32,
    /// Milliseconds since the route's epoch until which the target is ejected.
    ejected_until_ms: AtomicU64,
    /// Ejections ever (a counter for the metrics).
    pub ejections_total: AtomicU64,
    epoch: Instant,
}

impl Health {
    fn new(epoch: Instant) -> Health {
        Health {
            healthy: AtomicBool::new(true),
            failures: AtomicU32::new(0),
            ejections: AtomicU32::new(0),
            ejected_until_ms: AtomicU64::new(0),
            ejections_total: AtomicU64::new(0),
            epoch,
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// The active check's verdict.
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// Sets the active check's verdict; true when it changed.
    pub fn set_healthy(&self, healthy: bool) -> bool {
        self.healthy.swap(healthy, Ordering::Relaxed) != healthy
    }

    /// True while passively ejected.
    pub fn is_ejected(&self) -> bool {
        self.ejected_at(self.now_ms())
    }

    /// [`Health::is_ejected`] at `now_ms` since the route's epoch (which a target's
    /// health shares with its route's [`Upstreams`]): a pick reads the clock once for
    /// every target it looks at.
    fn ejected_at(&self, now_ms: u64) -> bool {
        self.ejected_until_ms.load(Ordering::Relaxed) > now_ms
    }

    /// Healthy and not ejected: what `gatehouse_upstream_healthy` reports.
    pub fn is_available(&self) -> bool {
        self.is_healthy() && !self.is_ejected()
    }

    /// A request the target answered (not with a 5xx): failures and ejections forgotten.
    pub fn succeeded(&self) {
        if self.failures.load(Ordering::Relaxed) != 0 {
            self.failures.store(0, Ordering::Relaxed);
        }
        if self.ejections.load(Ordering::Relaxed) != 0 {
            self.ejections.store(0, Ordering::Relaxed);
        }
    }

    /// A connect failure, a 5xx or a timeout. Returns how long the target is now ejected
    /// for, when this failure ejects it: after [`EJECT_AFTER`] in a row, or after one
    /// alone when it was ejected before and has not answered well since (its interval
    /// then doubles).
    pub fn failed(&self) -> Option<Duration> {
        let failures = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        let ejections = self.ejections.load(Ordering::Relaxed);
        let now = self.now_ms();
        if self.ejected_at(now) || (failures < EJECT_AFTER && ejections == 0) {
            return None;
        }
        self.failures.store(0, Ordering::Relaxed);
        self.ejections.store(ejections.saturating_add(1), Ordering::Relaxed);
        let span = EJECT_BASE.saturating_mul(1u32 << ejections.min(8)).min(EJECT_MAX);
        self.ejected_until_ms.store(now + span.as_millis() as u64, Ordering::Relaxed);
        self.ejections_total.fetch_add(1, Ordering::Relaxed);
        Some(span)
    }
}

/// Counts a request as outstanding at its target until dropped.
#[derive(Debug)]
pub struct InFlight<'a>(&'a AtomicUsize);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Upstreams {
    /// The targets of `uris`, reached over TLS with `tls` when given; they take the next
    /// `slots` (indexes of the route table's targets, where a connection worker keeps its
    /// idle connections to each).
    pub fn new(
        uris: &[http::Uri],
        tls: Option<&TlsClient>,
        balance: Balance,
        protocol: Protocol,
        slots: &mut usize,
    ) -> Self {
        let epoch = Instant::now();
        let targets = uris
            .iter()
            .filter_map(|u| {
                let authority = u.authority()?.clone();
                let tls = match tls {
                    None => None,
                    Some(c) => {
                        // `[::1]` is an IPv6 literal: verified against the certificate's
                        // IP addresses, and no SNI is sent for it.
                        let host = authority.host().trim_start_matches('[').trim_end_matches(']');
                        let server_name = match &c.server_name {
                            Some(n) => n.clone(),
                            None => ServerName::try_from(host.to_string()).ok()?,
                        };
                        Some(TargetTls { connector: tokio_rustls::TlsConnector::from(c.config.clone()), server_name })
                    }
                };
                *slots += 1;
                Some(Target {
                    tls,
                    h2: protocol == Protocol::H2,
                    host: HeaderValue::from_str(authority.as_str()).ok()?,
                    slot: *slots - 1,
                    authority,
                    down_until_ms: AtomicU64::new(0),
                    warned_ms: AtomicU64::new(0),
                    health: Arc::new(Health::new(epoch)),
                    outstanding: AtomicUsize::new(0),
                })
            })
            .collect();
        Upstreams { targets, next: AtomicUsize::new(0), epoch, balance }
    }

    /// The targets, in configuration order.
    pub fn targets(&self) -> impl Iterator<Item = &Target> {
        self.targets.iter()
    }

    /// How many targets the route has.
    pub fn len(&self) -> usize {
        self.targets.len()
    }

    /// True when the route has no target (never, once validated).
    pub fn is_empty(&self) -> bool {
        self.targets.is_empty()
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// The target for the next request (see the module's doc): `None` when the active
    /// health check finds every target unhealthy.
    pub fn pick(&self) -> Option<&Target> {
        let n = self.targets.len();
        let turn = self.next.fetch_add(1, Ordering::Relaxed);
        if n <= 1 {
            return self.targets.first().filter(|t| t.health.is_healthy());
        }
        let now = self.now_ms();
        let preferred = |t: &Target| {
            t.health.is_healthy() && t.down_until_ms.load(Ordering::Relaxed) <= now && !t.health.ejected_at(now)
        };
        if self.balance == Balance::LeastRequests {
            // Two distinct positions from one counter, scrambled (no RNG state to share).
            let r = mix(turn as u64);
            let (a, b) = ((r % n as u64) as usize, ((r >> 32) % (n as u64 - 1)) as usize);
            let b = if b >= a { b + 1 } else { b };
            let (ta, tb) = (&self.targets[a], &self.targets[b]);
            match (preferred(ta), preferred(tb)) {
                (true, true) => {
                    let busy = |t: &Target| t.outstanding.load(Ordering::Relaxed);
                    return Some(if busy(tb) < busy(ta) { tb } else { ta });
                }
                (true, false) => return Some(ta),
                (false, true) => return Some(tb),
                // Neither: round-robin over the rest, below.
                (false, false) => {}
            }
        }
        (0..n)
            .map(|i| &self.targets[(turn + i) % n])
            .find(|t| preferred(t))
            .or_else(|| (0..n).map(|i| &self.targets[(turn + i) % n]).find(|t| t.health.is_healthy()))
    }

    /// Counts a request to `target` until the guard is dropped, when the route balances
    /// by `least_requests` (round-robin does not pay for a counter every core writes).
    pub fn begin<'a>(&self, target: &'a Target) -> Option<InFlight<'a>> {
        (self.balance == Balance::LeastRequests).then(|| {
            target.outstanding.fetch_add(1, Ordering::Relaxed);
            InFlight(&target.outstanding)
        })
    }

    /// True at most once per 10 s per target: a broken upstream logs one line
    /// per interval, not one per request.
    pub fn should_warn(&self, target: &Target) -> bool {
        let now = self.now_ms() + 1;
        let last = target.warned_ms.load(Ordering::Relaxed);
        (last == 0 || now.saturating_sub(last) >= WARN_EVERY.as_millis() as u64)
            && target.warned_ms.compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed).is_ok()
    }

    /// Marks `target` as refusing connections for a short while.
    pub fn mark_down(&self, target: &Target) {
        let until = self.now_ms() + DOWN_FOR.as_millis() as u64;
        target.down_until_ms.store(until, Ordering::Relaxed);
    }
}

/// SplitMix64's finaliser: consecutive counters become unrelated 64-bit values.
fn mix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// round robin skips a target marked down, and falls back when all are down
    #[test]
    fn round_robin_skips_down_targets() {
        let u = &Upstreams::new(
            &["http://a:1".parse().unwrap(), "http://b:2".parse().unwrap()],
            None,
            Balance::RoundRobin,
            Protocol::Http1,
            &mut 0,
        );
        let first = u.pick().unwrap().authority.clone();
        let second = u.pick().unwrap().authority.clone();
        assert_ne!(first, second);
        let a = u.targets.iter().find(|t| t.authority == "a:1").unwrap();
        u.mark_down(a);
        for _ in 0..4 {
            assert_eq!(u.pick().unwrap().authority, "b:2");
        }
        u.mark_down(u.targets.iter().find(|t| t.authority == "b:2").unwrap());
        assert!(u.pick().is_some());
    }

    fn three(balance: Balance) -> Upstreams {
        let uris: Vec<http::Uri> =
            ["http://a:1", "http://b:2", "http://c:3"].iter().map(|u| u.parse().unwrap()).collect();
        Upstreams::new(&uris, None, balance, Protocol::Http1, &mut 0)
    }

    /// an actively unhealthy target is never chosen; all unhealthy: none at all
    #[test]
    fn unhealthy_targets_are_never_chosen() {
        for balance in [Balance::RoundRobin, Balance::LeastRequests] {
            let u = three(balance);
            u.targets[0].health.set_healthy(false);
            for _ in 0..100 {
                assert_ne!(u.pick().unwrap().authority, "a:1");
            }
            u.targets[1].health.set_healthy(false);
            u.targets[2].health.set_healthy(false);
            assert!(u.pick().is_none(), "{balance:?}");
            u.targets[2].health.set_healthy(true);
            assert_eq!(u.pick().unwrap().authority, "c:3");
        }
    }

    /// five failures in a row eject; a failure right after an ejection ends ejects again
    /// for twice as long; a success forgets it all
    #[test]
    fn passive_ejection_grows_and_a_success_resets_it() {
        let h = Health::new(Instant::now());
        for _ in 0..EJECT_AFTER - 1 {
            assert_eq!(h.failed(), None);
        }
        assert_eq!(h.failed(), Some(EJECT_BASE));
        assert!(h.is_ejected() && !h.is_available());
        h.ejected_until_ms.store(0, Ordering::Relaxed); // the interval is over
        assert_eq!(h.failed(), Some(EJECT_BASE * 2));
        h.ejected_until_ms.store(0, Ordering::Relaxed);
        h.succeeded();
        for _ in 0..EJECT_AFTER - 1 {
            assert_eq!(h.failed(), None);
        }
        assert_eq!(h.failed(), Some(EJECT_BASE));
        assert_eq!(h.ejections_total.load(Ordering::Relaxed), 3);
    }

    /// an ejected target is skipped while others are available, and used when none is
    #[test]
    fn ejected_targets_are_a_last_resort() {
        let u = three(Balance::RoundRobin);
        for t in &u.targets[..2] {
            for _ in 0..EJECT_AFTER {
                t.health.failed();
            }
        }
        for _ in 0..10 {
            assert_eq!(u.pick().unwrap().authority, "c:3");
        }
        for _ in 0..EJECT_AFTER {
            u.targets[2].health.failed();
        }
        assert!(u.pick().is_some());
    }

    /// least_requests prefers the target with fewer requests awaiting an answer
    #[test]
    fn least_requests_prefers_the_less_busy_target() {
        let u = three(Balance::LeastRequests);
        let _busy: Vec<_> = (0..10).map(|_| u.begin(&u.targets[0])).collect();
        let picks: Vec<_> = (0..300).map(|_| u.pick().unwrap().authority.to_string()).collect();
        assert_eq!(picks.iter().filter(|a| *a == "a:1").count(), 0, "the busy target was chosen");
        assert!(picks.iter().filter(|a| *a == "b:2").count() > 100);
        assert!(picks.iter().filter(|a| *a == "c:3").count() > 100);
        drop(_busy);
        assert_eq!(u.targets[0].outstanding.load(Ordering::Relaxed), 0);
    }
}
