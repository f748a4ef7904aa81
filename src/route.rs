//! The route table: host + longest path prefix → a route and its upstream targets.
//!
//! Built once from the config at start. Targets carry a small amount of shared state
//! (round-robin position, "refused connections until") updated with atomics only.

use crate::config::RouteConfig;
use http::uri::Authority;
use http::{HeaderName, HeaderValue};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// How long a target that refused a connection is skipped.
const DOWN_FOR: Duration = Duration::from_secs(5);

/// A configured route, ready to serve.
#[derive(Debug)]
pub struct Route {
    /// The configured name (a metric label, never request data).
    pub name: Arc<str>,
    host: Option<String>,
    prefix: String,
    pub allow_anonymous: bool,
    pub forward_credentials: bool,
    pub timeout: Duration,
    pub set_headers: Vec<(HeaderName, HeaderValue)>,
    pub upstreams: Upstreams,
}

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
    fn new(uris: &[http::Uri], slots: &mut usize) -> Self {
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

impl Route {
    /// Builds a route from its validated config; its targets take the next `slots`.
    pub fn new(c: &RouteConfig, slots: &mut usize) -> Route {
        Route {
            name: Arc::from(c.name.as_str()),
            host: c.host.clone(),
            prefix: c.path_prefix.clone(),
            allow_anonymous: c.allow_anonymous,
            forward_credentials: c.forward_credentials,
            timeout: c.timeout,
            set_headers: c.set_headers.clone(),
            upstreams: Upstreams::new(&c.upstreams, slots),
        }
    }

    /// Segment-aware prefix match: `/api` matches `/api` and `/api/x`, not `/apix`.
    fn matches_path(&self, path: &str) -> bool {
        path.starts_with(&self.prefix)
            && (self.prefix.ends_with('/')
                || path.len() == self.prefix.len()
                || path.as_bytes()[self.prefix.len()] == b'/')
    }

    fn matches_host(&self, host: Option<&str>) -> bool {
        match (&self.host, host) {
            (None, _) => true,
            (Some(want), Some(got)) => want.eq_ignore_ascii_case(got),
            (Some(_), None) => false,
        }
    }
}

/// All routes, most specific first.
#[derive(Debug)]
pub struct RouteTable {
    routes: Vec<Arc<Route>>,
}

impl RouteTable {
    /// Orders routes so that the first match is the right one: longest prefix first,
    /// and at equal length a route with a host before one without.
    pub fn new(configs: &[RouteConfig]) -> RouteTable {
        let mut slots = 0;
        let mut routes: Vec<Arc<Route>> = configs.iter().map(|c| Arc::new(Route::new(c, &mut slots))).collect();
        routes.sort_by(|a, b| b.prefix.len().cmp(&a.prefix.len()).then(b.host.is_some().cmp(&a.host.is_some())));
        RouteTable { routes }
    }

    /// The route for `host` (without port) and a normalised `path`.
    pub fn find(&self, host: Option<&str>, path: &str) -> Option<&Arc<Route>> {
        self.routes.iter().find(|r| r.matches_host(host) && r.matches_path(path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(name: &str, host: Option<&str>, prefix: &str, ups: &[&str]) -> RouteConfig {
        RouteConfig {
            name: name.into(),
            host: host.map(str::to_string),
            path_prefix: prefix.into(),
            upstreams: ups.iter().map(|u| u.parse().unwrap()).collect(),
            allow_anonymous: false,
            forward_credentials: false,
            timeout: Duration::from_secs(1),
            set_headers: vec![],
        }
    }

    /// longest prefix wins; a host-specific route beats a host-less one of equal length
    #[test]
    fn longest_prefix_then_host_wins() {
        let t = RouteTable::new(&[
            route("root", None, "/", &["http://a"]),
            route("api", None, "/api/", &["http://a"]),
            route("api-v1", None, "/api/v1/", &["http://a"]),
            route("api-ex", Some("api.example.com"), "/api/", &["http://a"]),
        ]);
        let name = |h, p| t.find(h, p).map(|r| r.name.to_string());
        assert_eq!(name(None, "/api/v1/x").as_deref(), Some("api-v1"));
        assert_eq!(name(None, "/api/v2").as_deref(), Some("api"));
        assert_eq!(name(Some("API.example.com"), "/api/v2").as_deref(), Some("api-ex"));
        assert_eq!(name(None, "/other").as_deref(), Some("root"));
    }

    /// prefixes match whole segments only
    #[test]
    fn prefix_matches_whole_segments() {
        let t = RouteTable::new(&[route("api", None, "/api", &["http://a"])]);
        assert!(t.find(None, "/api").is_some());
        assert!(t.find(None, "/api/x").is_some());
        assert!(t.find(None, "/apix").is_none());
    }

    /// round robin skips a target marked down, and falls back when all are down
    #[test]
    fn round_robin_skips_down_targets() {
        let r = Route::new(&route("r", None, "/", &["http://a:1", "http://b:2"]), &mut 0);
        let u = &r.upstreams;
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
