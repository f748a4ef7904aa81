//! Every `gatehouse_*` metric family, declared once, in a registry this gateway owns
//! (no global statics). Label values come only from configured names (routes, user ids,
//! listener names) and closed sets (reasons, status classes, outcomes): never from raw
//! request data, so an attacker cannot grow the label space.
//!
//! Per-route histograms and per-listener gauges are resolved once at start; a request
//! updates them without looking up a label set.

use crate::error::{GateError, LimitScope, UpstreamFailure};
use crate::record::Outcome;
use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};
use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

const LATENCY_BUCKETS: &[f64] =
    &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

/// The histograms of one route, resolved at start.
#[derive(Debug, Clone)]
struct RouteMetrics {
    duration: prometheus::Histogram,
    upstream: prometheus::Histogram,
}

static NEXT_ID: AtomicU64 = AtomicU64::new(0);

/// log2 of the entries in a thread's cache of recent label sets.
const RECENT_BITS: u32 = 6;

/// A label set of `gatehouse_requests_total` a thread used recently, with its counter
/// and its route's histograms.
struct Recent {
    metrics: u64,
    route: Option<Arc<str>>,
    user: Option<Arc<str>>,
    class: &'static str,
    outcome: &'static str,
    requests: IntCounter,
    route_metrics: Option<RouteMetrics>,
}

thread_local! {
    static RECENT: RefCell<Vec<Option<Recent>>> = const { RefCell::new(Vec::new()) };
}

/// The gateway's metrics.
#[derive(Debug)]
pub struct Metrics {
    /// Tells this gateway's entries in the per-thread cache from another's (tests run
    /// several gateways in one process).
    id: u64,
    registry: Registry,
    requests: IntCounterVec,
    auth_failures: IntCounterVec,
    rate_limited: IntCounterVec,
    upstream_errors: IntCounterVec,
    routes: HashMap<Arc<str>, RouteMetrics>,
    open_connections: IntGaugeVec,
    reloads: IntCounterVec,
    last_reload: IntGauge,
    users: IntGauge,
    keys: IntGauge,
    audit_lost: IntCounter,
}

/// What a scrape reads from the rest of the gateway.
#[derive(Debug, Clone, Copy)]
pub struct ScrapeState {
    pub reloads_ok: u64,
    pub reloads_failed: u64,
    pub last_good_unix: u64,
    pub users: usize,
    pub keys: usize,
    pub audit_lost: u64,
}

fn counter(r: &Registry, name: &str, help: &str, labels: &[&str]) -> Result<IntCounterVec, prometheus::Error> {
    let c = IntCounterVec::new(Opts::new(name, help), labels)?;
    r.register(Box::new(c.clone()))?;
    Ok(c)
}

fn gauge(r: &Registry, name: &str, help: &str) -> Result<IntGauge, prometheus::Error> {
    let g = IntGauge::new(name, help)?;
    r.register(Box::new(g.clone()))?;
    Ok(g)
}

fn histogram(r: &Registry, name: &str, help: &str) -> Result<HistogramVec, prometheus::Error> {
    let h = HistogramVec::new(HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec()), &["route"])?;
    r.register(Box::new(h.clone()))?;
    Ok(h)
}

impl Metrics {
    /// Registers every family; `routes` and `listeners` are the configured names.
    pub fn new<'a>(routes: impl Iterator<Item = &'a Arc<str>>) -> Result<Metrics, prometheus::Error> {
        let r = Registry::new();
        let request_duration =
            histogram(&r, "gatehouse_request_duration_seconds", "Time from request head to response head, by route.")?;
        let upstream_duration =
            histogram(&r, "gatehouse_upstream_duration_seconds", "Time the upstream took to answer, by route.")?;
        let routes = routes
            .map(|name| {
                let m = RouteMetrics {
                    duration: request_duration.with_label_values(&[name]),
                    upstream: upstream_duration.with_label_values(&[name]),
                };
                (name.clone(), m)
            })
            .collect();
        let audit_lost = IntCounter::new(
            "gatehouse_audit_records_lost_total",
            "Audit records dropped because the writer fell behind or could not write.",
        )?;
        r.register(Box::new(audit_lost.clone()))?;
        let open_connections = IntGaugeVec::new(
            Opts::new("gatehouse_open_connections", "Open client connections, by listener."),
            &["listener"],
        )?;
        r.register(Box::new(open_connections.clone()))?;
        #[cfg(target_os = "linux")]
        r.register(Box::new(prometheus::process_collector::ProcessCollector::for_self()))?;
        Ok(Metrics {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            requests: counter(
                &r,
                "gatehouse_requests_total",
                "Requests, by route, API user, status class and outcome.",
                &["route", "user", "status_class", "outcome"],
            )?,
            auth_failures: counter(
                &r,
                "gatehouse_auth_failures_total",
                "Refused authentications and authorisations, by reason.",
                &["reason"],
            )?,
            rate_limited: counter(
                &r,
                "gatehouse_rate_limited_total",
                "Requests refused by a key's rate limit, by API user.",
                &["user"],
            )?,
            upstream_errors: counter(
                &r,
                "gatehouse_upstream_errors_total",
                "Upstream failures, by route and kind.",
                &["route", "kind"],
            )?,
            reloads: counter(&r, "gatehouse_credentials_reloads_total", "Credential reloads, by result.", &["result"])?,
            last_reload: gauge(
                &r,
                "gatehouse_credentials_last_reload_timestamp_seconds",
                "Unix time of the last good credentials load.",
            )?,
            users: gauge(&r, "gatehouse_credentials_users", "API users in the credential snapshot.")?,
            keys: gauge(&r, "gatehouse_credentials_keys", "Keys in the credential snapshot.")?,
            routes,
            open_connections,
            audit_lost,
            registry: r,
        })
    }

    /// The open-connections gauge of one listener (resolved once per listener).
    pub fn connections(&self, listener: &str) -> IntGauge {
        self.open_connections.with_label_values(&[listener])
    }

    /// Runs `f` on the request counter and route histograms of a label set, from this
    /// thread's cache of recent ones. Looking them up in the families instead hashes
    /// four label values and takes a read lock and a reference count: cache lines every
    /// request on every core would write.
    fn with_recent(
        &self,
        route: Option<&Arc<str>>,
        user: Option<&Arc<str>>,
        class: &'static str,
        outcome: &'static str,
        f: impl FnOnce(&Recent),
    ) {
        let same = |a: Option<&Arc<str>>, b: Option<&Arc<str>>| match (a, b) {
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            (None, None) => true,
            _ => false,
        };
        // The slot: the label set's addresses mixed (the cache holds the `Arc`s, so an
        // address cannot be reused by another name while its entry is there).
        let address = |a: Option<&Arc<str>>| a.map_or(0, |a| Arc::as_ptr(a).cast::<u8>() as usize as u64);
        let mix = address(route).rotate_left(17)
            ^ address(user)
            ^ (class.as_ptr() as usize as u64).rotate_left(33)
            ^ (outcome.as_ptr() as usize as u64).rotate_left(47)
            ^ self.id;
        let slot = (mix.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (64 - RECENT_BITS)) as usize;
        RECENT.with_borrow_mut(|recent| {
            if recent.is_empty() {
                recent.resize_with(1 << RECENT_BITS, || None);
            }
            let hit = recent[slot].as_ref().is_some_and(|r| {
                r.metrics == self.id
                    && same(r.route.as_ref(), route)
                    && same(r.user.as_ref(), user)
                    && r.class == class
                    && r.outcome == outcome
            });
            if !hit {
                let route_name = route.map_or("", |r| r);
                recent[slot] = Some(Recent {
                    metrics: self.id,
                    route: route.cloned(),
                    user: user.cloned(),
                    class,
                    outcome,
                    requests: self.requests.with_label_values(&[route_name, user.map_or("", |u| u), class, outcome]),
                    route_metrics: route.and_then(|r| self.routes.get(r)).cloned(),
                });
            }
            if let Some(r) = &recent[slot] {
                f(r);
            }
        });
    }

    /// Counts one finished request; `outcome` is the one its audit record carries.
    pub fn observe(&self, out: &Outcome, status: u16, outcome: &'static str, elapsed: f64) {
        let (route, user, error) = (out.route.as_ref(), out.user.as_deref(), out.error);
        let class = match status {
            100..=199 => "1xx",
            200..=299 => "2xx",
            300..=399 => "3xx",
            400..=499 => "4xx",
            _ => "5xx",
        };
        let route_name = route.map_or("", |r| r);
        self.with_recent(route, out.user.as_ref(), class, outcome, |r| {
            r.requests.inc();
            if let Some(m) = &r.route_metrics {
                m.duration.observe(elapsed);
                if let Some(u) = out.upstream_latency {
                    m.upstream.observe(u.as_secs_f64());
                }
            }
        });
        let Some(e) = error else { return };
        let reason = match e {
            GateError::Unauthorized(f) => Some(f.reason()),
            GateError::Forbidden(d) => Some(d.reason()),
            GateError::TooManyRequests { scope: LimitScope::ClientIp | LimitScope::ReplayCache, .. } => {
                Some("rate_limited")
            }
            GateError::TooManyRequests { scope: LimitScope::Key, .. } => {
                self.rate_limited.with_label_values(&[user.unwrap_or("")]).inc();
                None
            }
            GateError::Upstream(UpstreamFailure::Connect) => {
                self.upstream_errors.with_label_values(&[route_name, "connect"]).inc();
                None
            }
            GateError::Upstream(UpstreamFailure::Protocol) => {
                self.upstream_errors.with_label_values(&[route_name, "protocol"]).inc();
                None
            }
            GateError::UpstreamTimeout => {
                self.upstream_errors.with_label_values(&[route_name, "timeout"]).inc();
                None
            }
            GateError::BadRequest(_) | GateError::NoRoute | GateError::PayloadTooLarge => None,
        };
        if let Some(reason) = reason {
            self.auth_failures.with_label_values(&[reason]).inc();
        }
    }

    /// The Prometheus text exposition, with the scrape-time gauges refreshed.
    pub fn render(&self, s: ScrapeState) -> String {
        let catch_up = |c: &IntCounter, total: u64| c.inc_by(total.saturating_sub(c.get()));
        catch_up(&self.reloads.with_label_values(&["success"]), s.reloads_ok);
        catch_up(&self.reloads.with_label_values(&["failure"]), s.reloads_failed);
        catch_up(&self.audit_lost, s.audit_lost);
        self.last_reload.set(i64::try_from(s.last_good_unix).unwrap_or(i64::MAX));
        self.users.set(i64::try_from(s.users).unwrap_or(i64::MAX));
        self.keys.set(i64::try_from(s.keys).unwrap_or(i64::MAX));
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{HeaderValue, Method};

    fn request(route: &Arc<str>, user: &str) -> Outcome {
        let mut out =
            Outcome::start(HeaderValue::from_static("id"), Method::GET, HeaderValue::from_static("127.0.0.1"));
        out.route = Some(route.clone());
        out.user = Some(Arc::from(user));
        out
    }

    fn count(m: &Metrics, route: &str, user: &str) -> u64 {
        m.requests.with_label_values(&[route, user, "2xx", "forwarded"]).get()
    }

    /// The per-thread cache of label sets counts every request into its own gateway's
    /// family and label set: across gateways in one process, across a user's name being
    /// a new allocation (a reload), and with more label sets than the cache holds.
    #[test]
    fn the_recent_label_cache_never_mixes_label_sets_or_gateways() {
        let route: Arc<str> = Arc::from("r");
        let (a, b) = (Metrics::new([route.clone()].iter()).unwrap(), Metrics::new([route.clone()].iter()).unwrap());
        let first = request(&route, "u");
        for _ in 0..3 {
            a.observe(&first, 200, "forwarded", 0.001);
        }
        b.observe(&first, 200, "forwarded", 0.001);
        // Same name, new allocation: as after a reload.
        a.observe(&request(&route, "u"), 200, "forwarded", 0.001);
        assert_eq!((count(&a, "r", "u"), count(&b, "r", "u")), (4, 1));

        let users: Vec<Outcome> = (0..500).map(|i| request(&route, &format!("user-{i}"))).collect();
        for _ in 0..2 {
            for out in &users {
                a.observe(out, 200, "forwarded", 0.001);
            }
        }
        assert!((0..500).all(|i| count(&a, "r", &format!("user-{i}")) == 2));
        a.observe(&first, 503, "failed", 0.001);
        assert_eq!(count(&a, "r", "u"), 4);
        assert_eq!(a.requests.with_label_values(&["r", "u", "5xx", "failed"]).get(), 1);
        assert_eq!(a.routes[&route].duration.get_sample_count(), 1 + 4 + 1000);
    }
}
