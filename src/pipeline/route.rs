//! The route table: host + longest path prefix → a route and its upstream targets.
//!
//! Built once from the config at start; each route's targets are an
//! [`Upstreams`] set.

use crate::config::{HealthCheckConfig, RouteConfig};
use crate::wire::balance::{TlsClient, Upstreams};
use http::uri::PathAndQuery;
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
    /// The targets' base path, without a trailing `/` (`""`: none).
    base_path: String,
    strip_prefix: bool,
    /// Active health checks of the targets (run by `health.rs`).
    pub health_check: Option<HealthCheckConfig>,
}

impl Route {
    /// Builds a route from its validated config, reaching `https://` targets with `tls`;
    /// its targets take the next `slots`.
    pub fn new(c: &RouteConfig, tls: Option<&TlsClient>, slots: &mut usize) -> Route {
        Route {
            base_path: c.base_path.clone(),
            strip_prefix: c.strip_prefix,
            health_check: c.health_check.clone(),
            name: Arc::from(c.name.as_str()),
            host: c.host.clone(),
            prefix: c.path_prefix.clone(),
            allow_anonymous: c.allow_anonymous,
            forward_credentials: c.forward_credentials,
            timeout: c.timeout,
            set_headers: c.set_headers.clone(),
            upstreams: Upstreams::new(&c.upstreams, tls, c.balance, c.protocol, slots),
        }
    }

    /// The path the upstream receives for `pq`, the normalised path this route matched
    /// (never the raw one): the route's prefix removed when `strip_prefix` is set, then
    /// the base path put in front; the query as the client sent it. `pq` has no dot
    /// segments, so the result never leaves the base path.
    pub fn upstream_path(&self, pq: PathAndQuery) -> PathAndQuery {
        if self.base_path.is_empty() && !self.strip_prefix {
            return pq;
        }
        let path = pq.path();
        let rest = if self.strip_prefix {
            // `matches_path` held: the path starts with the prefix, and what follows it
            // is empty or starts a new segment.
            path.get(self.prefix.trim_end_matches('/').len()..).unwrap_or_default()
        } else {
            path
        };
        let mut out =
            String::with_capacity(self.base_path.len() + rest.len() + pq.query().map_or(0, |q| q.len() + 1) + 1);
        out.push_str(&self.base_path);
        out.push_str(rest);
        if out.is_empty() {
            out.push('/');
        }
        if let Some(q) = pq.query() {
            out.push('?');
            out.push_str(q);
        }
        // Built from parts that were valid in a path and query: parses.
        PathAndQuery::try_from(out).unwrap_or(pq)
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
    /// `tls`: each route's TLS client, in the order of `configs` (`None` for plain HTTP).
    pub fn new(configs: &[RouteConfig], tls: &[Option<TlsClient>]) -> RouteTable {
        let mut slots = 0;
        let mut routes: Vec<Arc<Route>> = configs
            .iter()
            .enumerate()
            .map(|(i, c)| Arc::new(Route::new(c, tls.get(i).and_then(Option::as_ref), &mut slots)))
            .collect();
        routes.sort_by(|a, b| b.prefix.len().cmp(&a.prefix.len()).then(b.host.is_some().cmp(&a.host.is_some())));
        let mut targets: Vec<_> = routes.iter().flat_map(|r| r.upstreams.targets()).collect();
        targets.sort_by_key(|t| t.slot);
        let by_slot = targets.into_iter().map(|t| t.authority.clone()).collect();
        RouteTable { routes, by_slot }
    }

    /// Every route, most specific first.
    pub fn routes(&self) -> impl Iterator<Item = &Arc<Route>> {
        self.routes.iter()
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
        let ups = ups.iter().map(|u| u.parse().unwrap()).collect();
        RouteConfig::plain(name, host, prefix, ups, Duration::from_secs(1))
    }

    /// longest prefix wins; a host-specific route beats a host-less one of equal length
    #[test]
    fn longest_prefix_then_host_wins() {
        let t = RouteTable::new(
            &[
                route("root", None, "/", &["http://a"]),
                route("api", None, "/api/", &["http://a"]),
                route("api-v1", None, "/api/v1/", &["http://a"]),
                route("api-ex", Some("api.example.com"), "/api/", &["http://a"]),
            ],
            &[],
        );
        let name = |h, p| t.find(h, p).map(|r| r.name.to_string());
        assert_eq!(name(None, "/api/v1/x").as_deref(), Some("api-v1"));
        assert_eq!(name(None, "/api/v2").as_deref(), Some("api"));
        assert_eq!(name(Some("API.example.com"), "/api/v2").as_deref(), Some("api-ex"));
        assert_eq!(name(None, "/other").as_deref(), Some("root"));
    }

    /// the upstream path: prefix stripped or not, base path in front, query kept
    #[test]
    fn upstream_path_strips_and_prefixes() {
        let cases = [
            // prefix, strip, base, client path → upstream path
            ("/api/erp", true, "/erp/v2", "/api/erp/orders?x=1", "/erp/v2/orders?x=1"),
            ("/api/erp/", true, "/erp/v2", "/api/erp/orders", "/erp/v2/orders"),
            ("/api/erp", true, "/erp/v2", "/api/erp", "/erp/v2"),
            ("/api/erp/", true, "/erp/v2", "/api/erp/", "/erp/v2/"),
            ("/api/erp", true, "", "/api/erp", "/"),
            ("/api/erp", true, "", "/api/erp?q", "/?q"),
            ("/api/erp", false, "/erp", "/api/erp/orders", "/erp/api/erp/orders"),
            ("/", true, "/base", "/x", "/base/x"),
            ("/", false, "", "/x/%2F?y", "/x/%2F?y"),
        ];
        for (prefix, strip, base, path, want) in cases {
            let mut c = route("r", None, prefix, &["http://a"]);
            c.strip_prefix = strip;
            c.base_path = base.into();
            let r = Route::new(&c, None, &mut 0);
            assert!(r.matches_path(path.split('?').next().unwrap()), "{prefix} {path}");
            assert_eq!(r.upstream_path(path.parse().unwrap()).as_str(), want, "{prefix} {strip} {base} {path}");
        }
    }

    /// prefixes match whole segments only
    #[test]
    fn prefix_matches_whole_segments() {
        let t = RouteTable::new(&[route("api", None, "/api", &["http://a"])], &[]);
        assert!(t.find(None, "/api").is_some());
        assert!(t.find(None, "/api/x").is_some());
        assert!(t.find(None, "/apix").is_none());
    }
}
