//! Every `gatehouse_*` metric family, declared once, in a registry this gateway owns
//! (no global statics). Label values come only from configured names (routes, user ids,
//! listener names) and closed sets (reasons, status classes, outcomes): never from raw
//! request data, so an attacker cannot grow the label space.
//!
//! Per-route histograms and per-listener gauges are resolved once at start; a request
//! updates them without looking up a label set.

use crate::pipeline::authn::replay::ReplayCache;
use crate::pipeline::error::{GateError, LimitScope, UpstreamFailure};
use crate::tls::CertResolver;
use crate::wire::balance::Health;
use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

const LATENCY_BUCKETS: &[f64] =
    &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

/// The histograms of one route, resolved at start.
#[derive(Debug, Clone)]
struct RouteMetrics {
    duration: prometheus::Histogram,
    upstream: prometheus::Histogram,
}

/// The gateway's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    store: Option<StoreGauges>,
    requests: IntCounterVec,
    auth_failures: IntCounterVec,
    rate_limited: IntCounterVec,
    upstream_errors: IntCounterVec,
    routes: HashMap<Arc<str>, RouteMetrics>,
    open_connections: IntGaugeVec,
    reloads: IntCounterVec,
    reloads_held: IntCounter,
    reload_failing: IntGauge,
    last_reload: IntGauge,
    users: IntGauge,
    keys: IntGauge,
    audit_dropped: IntCounterVec,
    /// Proxied requests between their head and their report.
    pub in_flight: InFlight,
    in_flight_gauge: IntGauge,
    /// With `metrics.per_user_series`, the users that have series of their own.
    per_user: Option<PerUser>,
    /// The TLS listeners' certificates, read at each scrape.
    tls: Vec<TlsSeries>,
    replay: Arc<ReplayCache>,
    replay_entries: IntGauge,
    /// Each route target's health, read at each scrape.
    targets: Vec<TargetSeries>,
}

/// One upstream target's series, resolved at start.
#[derive(Debug)]
struct TargetSeries {
    health: Arc<Health>,
    healthy: IntGauge,
    ejections: IntCounter,
}

/// One TLS listener's series, resolved at start.
#[derive(Debug)]
struct TlsSeries {
    resolver: Arc<CertResolver>,
    expiry: IntGauge,
    failing: IntGauge,
    reloads_ok: IntCounter,
    reloads_failed: IntCounter,
}

/// The first `max` API users seen get a `user` label value of their own; every other one
/// is counted as `_other`, so 100,000 users cannot make 100,000 series per family.
#[derive(Debug)]
struct PerUser {
    max: usize,
    named: dashmap::DashSet<Arc<str>>,
    /// `named.len()` without visiting every shard on each request.
    count: AtomicUsize,
}

/// Requests in flight, counted without a cache line that every core writes per request:
/// each thread adds to a shard of its own and a scrape sums the shards. A request may end
/// on another thread than it began (its task moved): one shard then goes below zero and
/// the sum is still right.
#[derive(Debug, Default)]
pub struct InFlight {
    shards: [Shard; SHARDS],
}

/// One counter per cache line (128 bytes: adjacent-line prefetch pairs 64-byte lines).
#[derive(Debug, Default)]
#[repr(align(128))]
struct Shard(std::sync::atomic::AtomicI64);

const SHARDS: usize = 16;

thread_local! {
    /// This thread's shard, handed out round-robin on first use.
    static SHARD: usize = {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        NEXT.fetch_add(1, Ordering::Relaxed) % SHARDS
    };
}

impl InFlight {
    fn shard(&self) -> &std::sync::atomic::AtomicI64 {
        &self.shards[SHARD.with(|s| *s)].0
    }

    pub fn started(&self) {
        self.shard().fetch_add(1, Ordering::Relaxed);
    }

    pub fn finished(&self) {
        self.shard().fetch_sub(1, Ordering::Relaxed);
    }

    /// The sum over shards; never negative, though a scrape racing a request's start and
    /// end on two threads could read an end without its start.
    pub fn get(&self) -> i64 {
        self.shards.iter().map(|s| s.0.load(Ordering::Relaxed)).sum::<i64>().max(0)
    }
}

/// The `user` label value of everyone past the bound (and of anonymous requests: "").
const OTHER_USERS: &str = "_other";

/// What the metrics need of a finished request (the record step's `Outcome` holds more).
#[derive(Debug, Clone, Copy)]
pub struct Observed<'a> {
    pub route: Option<&'a Arc<str>>,
    /// The authenticated user, for the opt-in `user` label.
    pub user: Option<&'a Arc<str>>,
    pub error: Option<GateError>,
    pub upstream_latency: Option<std::time::Duration>,
}

/// What a scrape reads from the rest of the gateway.
#[derive(Debug, Clone, Copy)]
pub struct ScrapeState {
    pub reloads_ok: u64,
    pub reloads_failed: u64,
    pub reloads_held: u64,
    pub reload_failing: bool,
    pub last_good_unix: u64,
    pub users: usize,
    pub keys: usize,
    pub audit_dropped: crate::pipeline::audit::DroppedCounts,
    /// With the credential database: whether it answers, and the snapshot's age.
    pub store: Option<StoreScrape>,
}

/// The credential database, as a scrape sees it.
#[derive(Debug, Clone, Copy)]
pub struct StoreScrape {
    pub up: bool,
    /// Seconds since this gateway last confirmed its snapshot is the database's latest.
    pub snapshot_age_seconds: u64,
    pub revision: i64,
}

/// The credential database's gauges (registered only with one).
#[derive(Debug)]
struct StoreGauges {
    up: IntGauge,
    age: IntGauge,
    revision: IntGauge,
}

/// What the console's overview counts: requests and refused authentications since start.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Totals {
    /// Every request (`gatehouse_requests_total`, all labels).
    pub requests: u64,
    /// `gatehouse_auth_failures_total` by reason.
    pub auth_failures: std::collections::BTreeMap<String, u64>,
}

impl Totals {
    /// What happened between `earlier` and `self`.
    pub fn since(&self, earlier: &Totals) -> Totals {
        Totals {
            requests: self.requests.saturating_sub(earlier.requests),
            auth_failures: self
                .auth_failures
                .iter()
                .map(|(k, v)| (k.clone(), v.saturating_sub(earlier.auth_failures.get(k).copied().unwrap_or(0))))
                .filter(|(_, v)| *v > 0)
                .collect(),
        }
    }
}

impl Metrics {
    /// The counters the console's overview shows, summed over their labels.
    pub fn totals(&self) -> Totals {
        use prometheus::core::Collector;
        let requests = self
            .requests
            .collect()
            .iter()
            .flat_map(|mf| mf.get_metric().iter().map(|m| m.get_counter().get_value() as u64))
            .sum();
        let mut auth_failures = std::collections::BTreeMap::new();
        for mf in self.auth_failures.collect() {
            for m in mf.get_metric() {
                let reason = m.get_label().iter().find(|l| l.name() == "reason").map(|l| l.value().to_string());
                *auth_failures.entry(reason.unwrap_or_default()).or_insert(0) += m.get_counter().get_value() as u64;
            }
        }
        Totals { requests, auth_failures }
    }
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
    /// `per_user_series`: how many API users get a `user` label value of their own (0: no
    /// `user` label at all).
    /// `tls`: each TLS listener's name and certificate resolver. `shared`: the
    /// shared-state families, with `shared_state:`. `targets`: every route target (route
    /// name, target, its health).
    pub fn new<'a>(
        routes: impl Iterator<Item = &'a Arc<str>>,
        per_user_series: usize,
        tls: Vec<(Arc<str>, Arc<CertResolver>)>,
        replay: Arc<ReplayCache>,
        shared: Option<&crate::shared::SharedMetrics>,
        credential_store: bool,
        targets: Vec<(Arc<str>, String, Arc<Health>)>,
    ) -> Result<Metrics, prometheus::Error> {
        let r = Registry::new();
        let healthy = IntGaugeVec::new(
            Opts::new(
                "gatehouse_upstream_healthy",
                "1 while a route's target takes traffic: its active health check passes (or it has none) and it is not ejected after consecutive failures.",
            ),
            &["route", "target"],
        )?;
        r.register(Box::new(healthy.clone()))?;
        let ejections = counter(
            &r,
            "gatehouse_upstream_ejections_total",
            "Times a route's target was ejected after consecutive failures (connect, 5xx, timeout).",
            &["route", "target"],
        )?;
        let targets = targets
            .into_iter()
            .map(|(route, target, health)| TargetSeries {
                health,
                healthy: healthy.with_label_values(&[&*route, &target]),
                ejections: ejections.with_label_values(&[&*route, &target]),
            })
            .collect();
        let store = match credential_store {
            false => None,
            true => Some(StoreGauges {
                up: gauge(
                    &r,
                    "gatehouse_credential_store_up",
                    "1 while the credential database answers, 0 while this gateway serves its last snapshot without it.",
                )?,
                age: gauge(
                    &r,
                    "gatehouse_credential_store_snapshot_age_seconds",
                    "Seconds since this gateway last confirmed its credentials snapshot is the database's latest (changes made meanwhile may not be in force here).",
                )?,
                revision: gauge(
                    &r,
                    "gatehouse_credential_store_revision",
                    "The credential database revision whose changes this gateway has in force.",
                )?,
            }),
        };
        // Shared state's families are its own (it updates them); registered here so one
        // scrape shows them.
        for c in shared.map(|s| s.collectors()).unwrap_or_default() {
            r.register(c)?;
        }
        // The bound is configuration: set once, so an alert can divide by it.
        gauge(
            &r,
            "gatehouse_replay_cache_capacity",
            "Signatures the HMAC replay cache holds at most (auth.hmac.replay_cache_entries).",
        )?
        .set(i64::try_from(replay.capacity()).unwrap_or(i64::MAX));
        let replay_entries = gauge(
            &r,
            "gatehouse_replay_cache_entries",
            "Signatures the HMAC replay cache holds now; at capacity, new signed requests are refused (429 replay_cache_full).",
        )?;
        let expiry = IntGaugeVec::new(
            Opts::new(
                "gatehouse_tls_certificate_expiry_timestamp_seconds",
                "notAfter (Unix time) of the certificate a TLS listener serves.",
            ),
            &["listener"],
        )?;
        r.register(Box::new(expiry.clone()))?;
        let failing = IntGaugeVec::new(
            Opts::new(
                "gatehouse_tls_reload_failing",
                "1 while a TLS listener's last certificate reload failed (the previous certificate serves), 0 once one succeeds.",
            ),
            &["listener"],
        )?;
        r.register(Box::new(failing.clone()))?;
        let tls_reloads = counter(
            &r,
            "gatehouse_tls_reloads_total",
            "Certificate reloads of a TLS listener, by result.",
            &["listener", "result"],
        )?;
        let tls = tls
            .into_iter()
            .map(|(name, resolver)| TlsSeries {
                resolver,
                expiry: expiry.with_label_values(&[&name]),
                failing: failing.with_label_values(&[&name]),
                reloads_ok: tls_reloads.with_label_values(&[&*name, "success"]),
                reloads_failed: tls_reloads.with_label_values(&[&*name, "failure"]),
            })
            .collect();
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
        let audit_dropped = counter(
            &r,
            "gatehouse_audit_dropped_total",
            "Audit records that never reached the audit log, by reason: queue_full (the writer fell behind a burst), write_failed (the file could not be opened or written).",
            &["reason"],
        )?;
        // Both series from the start: an alert's increase() needs the zero before a loss.
        for reason in ["queue_full", "write_failed"] {
            audit_dropped.with_label_values(&[reason]);
        }
        let open_connections = IntGaugeVec::new(
            Opts::new("gatehouse_open_connections", "Open client connections, by listener."),
            &["listener"],
        )?;
        r.register(Box::new(open_connections.clone()))?;
        #[cfg(target_os = "linux")]
        r.register(Box::new(prometheus::process_collector::ProcessCollector::for_self()))?;
        // Always 1; the labels say which build is running (a rollout's progress, a fleet's
        // versions at a glance).
        let build_info = IntGaugeVec::new(
            Opts::new("gatehouse_build_info", "The running build: version, git commit and compiler (value 1)."),
            &["version", "commit", "rustc"],
        )?;
        r.register(Box::new(build_info.clone()))?;
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION"), env!("GATEHOUSE_COMMIT"), env!("GATEHOUSE_RUSTC")])
            .set(1);
        Ok(Metrics {
            store,
            requests: counter(
                &r,
                "gatehouse_requests_total",
                "Requests, by route, status class and outcome (and API user, with metrics.per_user_series).",
                if per_user_series > 0 {
                    &["route", "user", "status_class", "outcome"]
                } else {
                    &["route", "status_class", "outcome"]
                },
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
                "Requests refused by a key's rate limit (by API user, with metrics.per_user_series).",
                if per_user_series > 0 { &["user"] } else { &[] },
            )?,
            upstream_errors: counter(
                &r,
                "gatehouse_upstream_errors_total",
                "Upstream failures, by route and kind.",
                &["route", "kind"],
            )?,
            reloads: counter(&r, "gatehouse_credentials_reloads_total", "Credential reloads, by result.", &["result"])?,
            reloads_held: {
                let c = IntCounter::new(
                    "gatehouse_credentials_reloads_held_total",
                    "Credential reloads held back because the file would take away nearly every user (also counted as failures).",
                )?;
                r.register(Box::new(c.clone()))?;
                c
            },
            reload_failing: gauge(
                &r,
                "gatehouse_credentials_reload_failing",
                "1 while the last credentials reload failed or was held back (the last good snapshot serves), 0 once one succeeds.",
            )?,
            last_reload: gauge(
                &r,
                "gatehouse_credentials_last_reload_timestamp_seconds",
                "Unix time of the last good credentials load.",
            )?,
            in_flight: InFlight::default(),
            in_flight_gauge: gauge(
                &r,
                "gatehouse_requests_in_flight",
                "Proxied requests received and not yet finished (response sent, failed, or client gone; a WebSocket tunnel until it closes).",
            )?,
            users: gauge(&r, "gatehouse_credentials_users", "API users in the credential snapshot.")?,
            keys: gauge(&r, "gatehouse_credentials_keys", "Keys in the credential snapshot.")?,
            routes,
            open_connections,
            audit_dropped,
            registry: r,
            per_user: (per_user_series > 0).then(|| PerUser {
                max: per_user_series,
                named: dashmap::DashSet::new(),
                count: Default::default(),
            }),
            tls,
            replay,
            replay_entries,
            targets,
        })
    }

    /// The `user` label value for `user`: `None` without per-user series; the user's id
    /// while within the bound, else `_other`; `""` for anonymous requests.
    fn user_label<'a>(&self, user: Option<&'a Arc<str>>) -> Option<&'a str> {
        let p = self.per_user.as_ref()?;
        let Some(user) = user else { return Some("") };
        if p.named.contains(user) {
            return Some(user);
        }
        // Two requests racing here may both add a user: the bound is exceeded by at most
        // one per worker thread, never without limit.
        if p.count.load(Ordering::Relaxed) < p.max && p.named.insert(user.clone()) {
            p.count.fetch_add(1, Ordering::Relaxed);
            return Some(user);
        }
        Some(if p.named.contains(user) { user } else { OTHER_USERS })
    }

    /// The open-connections gauge of one listener (resolved once per listener).
    pub fn connections(&self, listener: &str) -> IntGauge {
        self.open_connections.with_label_values(&[listener])
    }

    /// Counts one finished request; `outcome` is the one its audit record carries,
    /// `to_head` the time to its response head, `body_failure` the upstream error kind
    /// when its body failed after the head.
    pub fn observe(
        &self,
        out: Observed<'_>,
        status: u16,
        outcome: &'static str,
        to_head: f64,
        body_failure: Option<&'static str>,
    ) {
        let (route, error) = (out.route, out.error);
        let class = match status {
            100..=199 => "1xx",
            200..=299 => "2xx",
            300..=399 => "3xx",
            400..=499 => "4xx",
            _ => "5xx",
        };
        let route_name = route.map_or("", |r| r);
        match self.user_label(out.user) {
            Some(u) => self.requests.with_label_values(&[route_name, u, class, outcome]).inc(),
            None => self.requests.with_label_values(&[route_name, class, outcome]).inc(),
        }
        if let Some(m) = route.and_then(|r| self.routes.get(r)) {
            m.duration.observe(to_head);
            if let Some(u) = out.upstream_latency {
                m.upstream.observe(u.as_secs_f64());
            }
        }
        if let Some(kind) = body_failure {
            self.upstream_errors.with_label_values(&[route_name, kind]).inc();
        }
        let Some(e) = error else { return };
        let reason = match e {
            // The audit record's reason (`GateError::reason`), one vocabulary for both.
            GateError::Unauthorized(_)
            | GateError::Forbidden(_)
            | GateError::TooManyRequests { scope: LimitScope::ClientIp | LimitScope::ReplayCache, .. } => {
                Some(e.reason())
            }
            GateError::TooManyRequests { scope: LimitScope::Key, .. } => {
                match self.user_label(out.user) {
                    Some(u) => self.rate_limited.with_label_values(&[u]).inc(),
                    None => self.rate_limited.with_label_values::<&str>(&[]).inc(),
                }
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
            GateError::UpstreamUnavailable => {
                self.upstream_errors.with_label_values(&[route_name, "unavailable"]).inc();
                None
            }
            GateError::BadRequest(_)
            | GateError::NoRoute
            | GateError::PayloadTooLarge
            | GateError::SharedStateUnavailable => None,
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
        catch_up(&self.reloads_held, s.reloads_held);
        self.reload_failing.set(i64::from(s.reload_failing));
        catch_up(&self.audit_dropped.with_label_values(&["queue_full"]), s.audit_dropped.queue_full);
        catch_up(&self.audit_dropped.with_label_values(&["write_failed"]), s.audit_dropped.write_failed);
        self.last_reload.set(i64::try_from(s.last_good_unix).unwrap_or(i64::MAX));
        self.users.set(i64::try_from(s.users).unwrap_or(i64::MAX));
        if let (Some(g), Some(st)) = (&self.store, s.store) {
            g.up.set(i64::from(st.up));
            g.age.set(i64::try_from(st.snapshot_age_seconds).unwrap_or(i64::MAX));
            g.revision.set(st.revision);
        }
        self.keys.set(i64::try_from(s.keys).unwrap_or(i64::MAX));
        self.in_flight_gauge.set(self.in_flight.get());
        self.replay_entries.set(i64::try_from(self.replay.held()).unwrap_or(i64::MAX));
        for t in &self.targets {
            t.healthy.set(i64::from(t.health.is_available()));
            catch_up(&t.ejections, t.health.ejections_total.load(Ordering::Relaxed));
        }
        for t in &self.tls {
            let s = t.resolver.status();
            t.expiry.set(s.not_after.load(Ordering::Relaxed));
            t.failing.set(i64::from(s.reload_failing.load(Ordering::Relaxed)));
            catch_up(&t.reloads_ok, s.reloads_ok.load(Ordering::Relaxed));
            catch_up(&t.reloads_failed, s.reloads_failed.load(Ordering::Relaxed));
        }
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}
