//! \[forward\] Active health checks: for each target of a route with `health_check:`, a
//! task sends `GET <path>` every `interval` and flips the target's verdict after
//! `unhealthy` failed checks in a row (no answer within `timeout`, or a status other than
//! 2xx/3xx) or `healthy` good ones. An unhealthy target gets no traffic
//! (`wire/balance.rs`); a route with none left answers 503 at once.
//!
//! A check opens a connection of its own (TLS included for an `https://` target, within
//! `timeout`) that no request shares: a check measures the target, not the pool.

use crate::config::HealthCheckConfig;
use crate::pipeline::route::{Route, RouteTable};
use crate::wire::balance::Target;
use crate::wire::body::Body;
use crate::wire::upstream::Upstream;
use http::{HeaderName, HeaderValue, Request, Uri};
use std::sync::Arc;
use tokio::task::JoinSet;

/// The running checks; dropping this stops them.
#[derive(Debug, Default)]
pub struct HealthChecks {
    _tasks: JoinSet<()>,
}

/// Starts a check task per target of every route that has `health_check:`.
/// `max_head`: the longest response head read (as for requests).
pub fn spawn(routes: &RouteTable, max_head: usize) -> HealthChecks {
    let mut set = JoinSet::new();
    for route in routes.routes() {
        let Some(hc) = &route.health_check else { continue };
        for (i, _) in route.upstreams.targets().enumerate() {
            let pool = Upstream::new(hc.timeout, max_head);
            set.spawn(run(route.clone(), i, hc.clone(), pool));
        }
    }
    HealthChecks { _tasks: set }
}

async fn run(route: Arc<Route>, index: usize, hc: HealthCheckConfig, pool: Arc<Upstream>) {
    let Some(target) = route.upstreams.targets().nth(index) else { return };
    let mut tick = tokio::time::interval(hc.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (mut good, mut bad) = (0u32, 0u32);
    loop {
        tick.tick().await;
        match check(&pool, target, &hc).await {
            Ok(()) => {
                (good, bad) = (good.saturating_add(1), 0);
                if good >= hc.healthy && target.health.set_healthy(true) {
                    tracing::info!(route = %route.name, upstream = %target.authority, checks = good, "upstream target healthy again");
                }
            }
            Err(reason) => {
                (good, bad) = (0, bad.saturating_add(1));
                if bad >= hc.unhealthy && target.health.set_healthy(false) {
                    tracing::warn!(route = %route.name, upstream = %target.authority, reason, checks = bad, "upstream target unhealthy: no traffic until it passes its health check");
                }
            }
        }
    }
}

/// One check: a 2xx or 3xx answer head within the timeout; why not, otherwise.
async fn check(pool: &Arc<Upstream>, target: &Target, hc: &HealthCheckConfig) -> Result<(), String> {
    let mut req = Request::new(Body::Empty);
    *req.uri_mut() = Uri::from(hc.path.clone());
    let added = [(HeaderName::from_static("user-agent"), HeaderValue::from_static("gatehouse-health-check"))];
    let sent = tokio::time::timeout(hc.timeout, pool.send(target, req, &added, hc.timeout)).await;
    let (res, answer) = match sent {
        Err(_) => return Err(format!("no answer within {:?}", hc.timeout)),
        Ok(Err(e)) => return Err(e.to_string()),
        Ok(Ok(r)) => r,
    };
    // The body is not read: dropped unread, the connection closes (nothing is pooled
    // from a check anyway).
    drop(answer);
    // 2xx and 3xx are good, as nginx and Envoy count them.
    match res.status().as_u16() {
        200..=399 => Ok(()),
        other => Err(format!("status {other}")),
    }
}
