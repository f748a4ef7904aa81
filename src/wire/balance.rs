//! The targets of one route, balanced round-robin. Each carries a little shared state
//! (round-robin position, "refused connections until") updated with atomics only.

use http::HeaderValue;
use http::uri::Authority;
use rustls::pki_types::ServerName;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// How long a target that refused a connection is skipped.
const DOWN_FOR: Duration = Duration::from_secs(5);
/// How often a failing target is logged about at most.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// The upstream targets of one route, balanced round-robin.
#[derive(Debug)]
pub struct Upstreams {
    targets: Vec<Target>,
    next: AtomicUsize,
    epoch: Instant,
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
    /// The `Host` header the upstream is sent: its own authority.
    pub host: HeaderValue,
    /// This target's index among all targets of its route table: where a connection
    /// worker keeps its idle connections to it.
    pub slot: usize,
    /// Milliseconds since `epoch` until which this target is skipped (0: healthy).
    down_until_ms: AtomicU64,
    /// Milliseconds since `epoch` of the last warning logged about this target (0: none).
    warned_ms: AtomicU64,
}

impl Upstreams {
    /// The targets of `uris`, reached over TLS with `tls` when given; they take the next
    /// `slots` (indexes of the route table's targets, where a connection worker keeps its
    /// idle connections to each).
    pub fn new(uris: &[http::Uri], tls: Option<&TlsClient>, slots: &mut usize) -> Self {
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
                    host: HeaderValue::from_str(authority.as_str()).ok()?,
                    slot: *slots - 1,
                    authority,
                    down_until_ms: AtomicU64::new(0),
                    warned_ms: AtomicU64::new(0),
                })
            })
            .collect();
        Upstreams { targets, next: AtomicUsize::new(0), epoch: Instant::now() }
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

    /// The next target round-robin, skipping ones that recently refused connections.
    /// When every target is marked down, the round-robin choice is tried anyway: a
    /// request has a better chance than a certain 502.
    pub fn pick(&self) -> Option<&Target> {
        let n = self.targets.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        if n <= 1 {
            return self.targets.first();
        }
        let now = self.now_ms();
        (0..n)
            .map(|i| &self.targets[(start + i) % n])
            .find(|t| t.down_until_ms.load(Ordering::Relaxed) <= now)
            .or_else(|| self.targets.get(start % n))
    }

    /// True at most once per [`WARN_EVERY`] per target: a broken upstream logs one line
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

#[cfg(test)]
mod tests {
    use super::*;

    /// round robin skips a target marked down, and falls back when all are down
    #[test]
    fn round_robin_skips_down_targets() {
        let u = &Upstreams::new(&["http://a:1".parse().unwrap(), "http://b:2".parse().unwrap()], None, &mut 0);
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
}
