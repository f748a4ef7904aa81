//! [record] The one place that reports on a finished request. Metrics and the audit log
//! are written from here, from the [`Outcome`] the pipeline filled in.

use crate::audit::RequestRecord;
use crate::authz::Grant;
use crate::error::GateError;
use crate::state::Gateway;
use http::{HeaderValue, Method, StatusCode};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What happened to one request, filled in as it goes through the pipeline.
#[derive(Debug)]
pub struct Outcome {
    started: Instant,
    /// The peer address as text (formatted once per connection, see `ConnInfo`).
    pub client: HeaderValue,
    /// The normalised path (never the query: clients may put anything there).
    pub path: Option<String>,
    pub request_id: HeaderValue,
    pub method: Method,
    pub route: Option<Arc<str>>,
    pub user: Option<Arc<str>>,
    pub key: Option<Arc<str>>,
    pub proxied_user: Option<HeaderValue>,
    /// The role rule that granted the request.
    pub grant: Option<Grant>,
    pub error: Option<GateError>,
    pub upstream_latency: Option<Duration>,
}

impl Outcome {
    /// Starts the clock for a request.
    pub fn start(request_id: HeaderValue, method: Method, client: HeaderValue) -> Outcome {
        Outcome {
            started: Instant::now(),
            client,
            path: None,
            request_id,
            method,
            route: None,
            user: None,
            key: None,
            proxied_user: None,
            grant: None,
            error: None,
            upstream_latency: None,
        }
    }
}

/// Reports a finished request: usage, the audit record, then the log line.
pub fn finish(gw: &Gateway, out: &Outcome, status: StatusCode) {
    if let (Some(user), Some(key)) = (&out.user, &out.key) {
        let rate_limited = status == StatusCode::TOO_MANY_REQUESTS;
        gw.usage.record(user, key, status.as_u16() >= 400, rate_limited, gw.unix_now());
    }
    // One clock reading for the metric, the audit record and the log line.
    let elapsed = out.started.elapsed().as_secs_f64();
    let outcome = match out.error {
        None => "forwarded",
        Some(e) if e.status().is_server_error() => "failed",
        Some(_) => "rejected",
    };
    gw.metrics.observe(out, status.as_u16(), outcome, elapsed);
    let record = RequestRecord {
        kind: "request",
        time: crate::audit::now_rfc3339(),
        request_id: out.request_id.to_str().unwrap_or_default(),
        client: out.client.to_str().unwrap_or_default(),
        user: out.user.as_deref(),
        key_id: out.key.as_deref(),
        proxied_user: out.proxied_user.as_ref().and_then(|v| v.to_str().ok()),
        route: out.route.as_deref(),
        method: out.method.as_str(),
        path: out.path.as_deref(),
        status: status.as_u16(),
        duration_ms: (elapsed * 1e6).round() / 1e3,
        outcome,
        reason: out.error.map(|e| e.reason()),
    };
    gw.audit.send_line(record.to_json());
    let elapsed_ms = elapsed * 1e3;
    let route = out.route.as_deref().unwrap_or("");
    let id = out.request_id.to_str().unwrap_or_default();
    match out.error {
        Some(e) if outcome == "failed" => {
            tracing::warn!(request_id = id, route, method = %out.method, status = status.as_u16(), reason = e.reason(), elapsed_ms, "request failed upstream");
        }
        _ => {
            tracing::debug!(
                request_id = id,
                route,
                user = out.user.as_deref(),
                key_id = out.key.as_deref(),
                proxied_user = out.proxied_user.as_ref().and_then(|v| v.to_str().ok()),
                granted_by = out.grant.as_ref().map(Grant::describe),
                method = %out.method,
                status = status.as_u16(),
                reason = out.error.map(|e| e.reason()),
                elapsed_ms,
                "request"
            );
        }
    }
}
