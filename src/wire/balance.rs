//! The targets of one route, balanced round-robin. Each carries a little shared state
//! (round-robin position, "refused connections until") updated with atomics only.

use http::HeaderValue;
use http::uri::Authority;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// How long a target that refused a connection is skipped.
const DOWN_FOR: Duration = Duration::from_secs(5);

/// The upstream targets of one route, balanced round-robin.
#[derive(Debug)]
pub struct Upstreams {
    targets: Vec<Target>,
    next: AtomicUsize,
    epoch: Instant,
}

/// One upstream `http://host:port` (the config refuses other schemes).
#[derive(Debug)]
pub struct Target {
    pub authority: Authority,
    /// The `Host` header the upstream is sent: its own authority.
    pub host: HeaderValue,
    /// This target's index among all targets of its route table: where a connection
    /// worker keeps its idle connections to it.
    pub slot: usize,
    /// Milliseconds since `epoch` until which this target is skipped (0: healthy).
    down_until_ms: AtomicU64,
}

impl Upstreams {
    /// The targets of `uris`; they take the next `slots` (indexes of the route table's
    /// targets, where a connection worker keeps its idle connections to each).
    pub fn new(uris: &[http::Uri], slots: &mut usize) -> Self {
        let targets = uris
            .iter()
            .filter_map(|u| {
                let authority = u.authority()?.clone();
                *slots += 1;
                Some(Target {
                    host: HeaderValue::from_str(authority.as_str()).ok()?,
                    slot: *slots - 1,
                    authority,
                    down_until_ms: AtomicU64::new(0),
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
        let u = &Upstreams::new(&["http://a:1".parse().unwrap(), "http://b:2".parse().unwrap()], &mut 0);
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
