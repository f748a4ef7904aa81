//! The route table: host + longest path prefix → a route and its upstream targets.
//!
//! Built once from the config at start; each route's targets are an
//! [`Upstreams`] set.

use crate::config::RouteConfig;
use crate::wire::balance::Upstreams;
use http::{HeaderName, HeaderValue};
use std::sync::Arc;
use std::time::Duration;

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
    /// Every route's targets by slot, for the audit record to name one from its slot.
    by_slot: Vec<http::uri::Authority>,
}

impl RouteTable {
    /// Orders routes so that the first match is the right one: longest prefix first,
    /// and at equal length a route with a host before one without.
    pub fn new(configs: &[RouteConfig]) -> RouteTable {
        let mut slots = 0;
        let mut routes: Vec<Arc<Route>> = configs.iter().map(|c| Arc::new(Route::new(c, &mut slots))).collect();
        routes.sort_by(|a, b| b.prefix.len().cmp(&a.prefix.len()).then(b.host.is_some().cmp(&a.host.is_some())));
        let mut targets: Vec<_> = routes.iter().flat_map(|r| r.upstreams.targets()).collect();
        targets.sort_by_key(|t| t.slot);
        let by_slot = targets.into_iter().map(|t| t.authority.clone()).collect();
        RouteTable { routes, by_slot }
    }

    /// The target in `slot` (see `Target::slot`).
    pub fn target(&self, slot: usize) -> Option<&http::uri::Authority> {
        self.by_slot.get(slot)
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
}
