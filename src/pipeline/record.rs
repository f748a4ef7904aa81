//! \[record\] The one place that reports on a finished request. Metrics and the audit log
//! are written from here, from the [`Outcome`] the pipeline filled in.
//!
//! A request is finished when its response has gone out whole, failed part way, or the
//! client went away: not when the response head is sent. A [`Report`] follows the
//! request until then (into its response body, or its tunnel), and reports exactly once,
//! whichever way it ends; dropped unreported, it reports the client gone.

use crate::credentials::snapshot::Key;
use crate::pipeline::audit::RequestRecord;
use crate::pipeline::authz::Grant;
use crate::pipeline::error::GateError;
use crate::pipeline::metrics::Observed;
use crate::pipeline::state::Gateway;
use crate::wire::body::{Body, BodyError};
use crate::wire::tunnel::{TunnelEnd, Tunnelled};
use bytes::Bytes;
use http::uri::Authority;
use http::{HeaderValue, Method, Response, StatusCode};
use http_body::{Body as _, Frame, SizeHint};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

/// Status recorded for a request whose client went away before any response head
/// (nginx's 499: "client closed request").
const CLIENT_CLOSED: u16 = 499;

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
    /// The authenticated user and key (usage and metrics count only these).
    pub user: Option<Arc<str>>,
    pub key: Option<Arc<str>>,
    /// The key a refused request named, when authentication could tell which (revoked,
    /// inactive, a bad signature, …): written in the audit record only, since it did not
    /// authenticate and so must not move the key's usage or `last_used_at`.
    pub refused_key: Option<Arc<Key>>,
    pub proxied_user: Option<HeaderValue>,
    /// The client's `User-Agent` (a clone shares the request's buffer: no copy).
    pub user_agent: Option<HeaderValue>,
    /// The slot of the upstream target the request went to, or of the last one tried
    /// when none answered (`RouteTable::target` names it).
    pub upstream: Option<usize>,
    /// The role rule that granted the request.
    pub grant: Option<Grant>,
    pub error: Option<GateError>,
    pub upstream_latency: Option<Duration>,
    /// The response status, once a response head is on its way.
    status: Option<StatusCode>,
    /// Time to the response head (the latency histogram's figure).
    to_head: Option<Duration>,
    /// Body bytes sent to the client (for a tunnel: every byte the upstream sent).
    bytes_sent: u64,
    /// For a tunnel: every byte the client sent through it.
    bytes_received: Option<u64>,
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
            refused_key: None,
            proxied_user: None,
            user_agent: None,
            upstream: None,
            grant: None,
            error: None,
            upstream_latency: None,
            status: None,
            to_head: None,
            bytes_sent: 0,
            bytes_received: None,
        }
    }
}

/// How a request ended, after its response head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// The whole response reached the client (or was handed to the client's socket).
    Complete,
    /// The upstream's body broke after its head (malformed, cut short, or stalled): the
    /// client's connection is closed (HTTP/1) or its stream reset (HTTP/2), so that the
    /// cut-off body is never taken for a whole one.
    UpstreamBody { stalled: bool },
    /// The client went away before the response was all sent.
    ClientAborted,
    /// A tunnel (WebSocket) closed.
    Tunnel(TunnelEnd),
}

impl Ending {
    /// The `outcome` and `reason` of the audit record and the metrics, when the ending
    /// decides them (a complete response leaves them to the pipeline's error, if any).
    fn labels(self) -> Option<(&'static str, &'static str)> {
        match self {
            Ending::Complete => None,
            Ending::UpstreamBody { stalled: false } => Some(("failed", "upstream_body_error")),
            Ending::UpstreamBody { stalled: true } => Some(("failed", "upstream_body_timeout")),
            Ending::ClientAborted => Some(("client_aborted", "client_aborted")),
            Ending::Tunnel(end) => Some(("forwarded", end.reason())),
        }
    }

    /// The `kind` of `gatehouse_upstream_errors_total` this ending counts as.
    fn upstream_error_kind(self) -> Option<&'static str> {
        match self {
            Ending::UpstreamBody { stalled: false } => Some("body"),
            Ending::UpstreamBody { stalled: true } => Some("body_timeout"),
            _ => None,
        }
    }
}

/// Reaches the gateway a request is reported to. The client connection that carried the
/// request implements it (`server/listen.rs`): a body or tunnel that outlives the request's
/// task holds its connection, whose count only that connection's core writes, instead of
/// a clone of the gateway's `Arc`, which every core's requests would write.
pub trait Reporter: Send + Sync + Unpin + 'static {
    fn gateway(&self) -> &Gateway;
}

/// One request's report, made exactly once (see the module comment).
pub struct Report<R: Reporter> {
    pub carrier: R,
    pub out: Outcome,
    done: bool,
}

impl<R: Reporter> Report<R> {
    /// Counts the request in flight until it is reported.
    pub fn new(carrier: R, out: Outcome) -> Report<R> {
        carrier.gateway().metrics.in_flight.started();
        Report { carrier, out, done: false }
    }

    /// The response goes out. A body already whole (an error, an empty body) is reported
    /// now; an upstream's streamed body is reported when it ends.
    pub fn respond(mut self, res: Response<Body>) -> Response<Body> {
        // A gRPC error goes out as HTTP 200: recorded with the status it stands for.
        let status = self.out.error.as_ref().map_or(res.status(), GateError::status);
        self.head_sent(status);
        // An upstream's body (HTTP/1.1 read by the gateway, or HTTP/2 by hyper) is
        // reported when it ends; anything else is whole already.
        if res.body().is_end_stream() || !matches!(res.body(), Body::Upstream(_) | Body::UpstreamH2(_)) {
            self.out.bytes_sent = res.body().size_hint().exact().unwrap_or(0);
            self.finish(Ending::Complete);
            return res;
        }
        let (parts, body) = res.into_parts();
        Response::from_parts(parts, Body::Reported(Box::pin(Reported { inner: body, report: self })))
    }

    /// A `101` went out: the request is reported when its tunnel closes.
    pub fn switched(&mut self, status: StatusCode) {
        self.head_sent(status);
    }

    /// Reports the end of a tunnel.
    pub fn tunnel_closed(mut self, t: Tunnelled) {
        self.out.bytes_sent = t.to_client;
        self.out.bytes_received = Some(t.to_upstream);
        self.finish(Ending::Tunnel(t.end));
    }

    fn head_sent(&mut self, status: StatusCode) {
        self.out.status = Some(status);
        self.out.to_head = Some(self.out.started.elapsed());
    }

    fn finish(&mut self, ending: Ending) {
        if !std::mem::replace(&mut self.done, true) {
            self.carrier.gateway().metrics.in_flight.finished();
            finish(self.carrier.gateway(), &self.out, ending);
        }
    }
}

impl<R: Reporter> Drop for Report<R> {
    fn drop(&mut self) {
        // Unreported: the request's task (or its body) was dropped, which hyper does when
        // the client's connection or stream went away.
        self.finish(Ending::ClientAborted);
    }
}

/// An upstream's response body on its way to the client, reporting when it ends.
struct Reported<R: Reporter> {
    inner: Body,
    report: Report<R>,
}

impl<R: Reporter> http_body::Body for Reported<R> {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        let frame = ready!(Pin::new(&mut this.inner).poll_frame(cx));
        match &frame {
            Some(Ok(f)) => {
                this.report.out.bytes_sent += f.data_ref().map_or(0, |d| d.len() as u64);
                // hyper stops polling once the body says it has ended: report now.
                if this.inner.is_end_stream() {
                    this.report.finish(Ending::Complete);
                }
            }
            Some(Err(e)) => {
                tracing::debug!(request_id = ?this.report.out.request_id, error = %e, "upstream response body failed");
                this.report.finish(Ending::UpstreamBody { stalled: matches!(e, BodyError::UpstreamStalled) });
            }
            None => this.report.finish(Ending::Complete),
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Reports a finished request: usage, the audit record, then the log line.
fn finish(gw: &Gateway, out: &Outcome, ending: Ending) {
    let status = out.status.map_or(CLIENT_CLOSED, |s| s.as_u16());
    let (outcome, reason) = match ending.labels() {
        Some((outcome, reason)) => (outcome, Some(reason)),
        None => (
            match out.error {
                None => "forwarded",
                Some(e) if e.status().is_server_error() => "failed",
                Some(_) => "rejected",
            },
            out.error.map(|e| e.reason()),
        ),
    };
    if let (Some(user), Some(key)) = (&out.user, &out.key) {
        let rate_limited = status == StatusCode::TOO_MANY_REQUESTS.as_u16();
        let failed = status >= 400 || matches!(ending, Ending::UpstreamBody { .. });
        gw.usage.record(user, key, failed, rate_limited, gw.unix_now());
    }
    // One clock reading for the audit record and the log line.
    let elapsed = out.started.elapsed().as_secs_f64();
    let to_head = out.to_head.map_or(elapsed, |d| d.as_secs_f64());
    let observed = Observed {
        route: out.route.as_ref(),
        user: out.user.as_ref(),
        error: out.error,
        upstream_latency: out.upstream_latency,
    };
    gw.metrics.observe(observed, status, outcome, to_head, ending.upstream_error_kind());
    let user_agent = out.user_agent.as_ref().map(|v| {
        let b = v.as_bytes();
        String::from_utf8_lossy(&b[..b.len().min(crate::pipeline::audit::USER_AGENT_MAX)])
    });
    let record = RequestRecord {
        kind: "request",
        time: crate::pipeline::audit::now_rfc3339(),
        request_id: out.request_id.to_str().unwrap_or_default(),
        client: out.client.to_str().unwrap_or_default(),
        user: out.user.as_deref().or(out.refused_key.as_ref().map(|k| &*k.user.id)),
        key_id: out.key.as_deref().or(out.refused_key.as_ref().map(|k| &*k.id)),
        proxied_user: out.proxied_user.as_ref().and_then(|v| v.to_str().ok()),
        route: out.route.as_deref(),
        method: out.method.as_str(),
        path: out.path.as_deref(),
        user_agent: user_agent.as_deref(),
        upstream: out.upstream.and_then(|slot| gw.routes.target(slot)).map(Authority::as_str),
        status,
        duration_ms: (elapsed * 1e6).round() / 1e3,
        bytes_sent: out.bytes_sent,
        bytes_received: out.bytes_received,
        outcome,
        reason,
    };
    gw.audit.send_line(record.to_json());
    let elapsed_ms = elapsed * 1e3;
    let route = out.route.as_deref().unwrap_or("");
    let id = out.request_id.to_str().unwrap_or_default();
    if outcome == "failed" {
        tracing::warn!(request_id = id, route, method = %out.method, status, reason, elapsed_ms, "request failed upstream");
    } else {
        tracing::debug!(
            request_id = id,
            route,
            user = out.user.as_deref(),
            key_id = out.key.as_deref(),
            proxied_user = out.proxied_user.as_ref().and_then(|v| v.to_str().ok()),
            granted_by = out.grant.as_ref().map(Grant::describe),
            method = %out.method,
            status,
            outcome,
            reason,
            elapsed_ms,
            "request"
        );
    }
}
