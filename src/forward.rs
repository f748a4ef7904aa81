//! [forward] Sends the rewritten request to one of the route's upstreams on the worker's
//! connection pool, under the route's timeout, and maps what went wrong to 502/504/413.

use crate::body::{Body, BodyError, UpstreamBody};
use crate::error::{GateError, UpstreamFailure};
use crate::headers::HOST;
use crate::rewrite::Outbound;
use crate::upstream::{SendError, Upstream};
use http::{Response, StatusCode};
use http_body::Body as _;
use hyper_util::rt::TokioIo;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// An upstream response and how long the upstream took to start answering.
#[derive(Debug)]
pub struct Forwarded {
    pub response: Response<Body>,
    pub upstream_latency: Duration,
}

/// Forwards `out`. A connection refused by one target is retried once on another when
/// the request has no body (nothing was sent, so the retry is safe whatever the method).
pub async fn send(upstream: &Arc<Upstream>, out: Outbound) -> Result<Forwarded, GateError> {
    let Outbound { mut request, route, client_upgrade } = out;
    let started = Instant::now();
    let deadline = tokio::time::Instant::now() + route.timeout;
    // A refused connection hands the request back unsent: no copy is kept for the retry.
    let mut may_retry = route.upstreams.len() > 1 && request.body().is_end_stream();
    let (response, release) = loop {
        let target = route.upstreams.pick().ok_or(GateError::Upstream(UpstreamFailure::Connect))?;
        request.headers_mut().insert(HOST, target.host.clone());
        match tokio::time::timeout_at(deadline, upstream.send(target, request)).await {
            Err(_) => return Err(GateError::UpstreamTimeout),
            Ok(Ok(sent)) => break sent,
            Ok(Err(SendError::Connect { authority, reason, request: back })) => {
                route.upstreams.mark_down(target);
                tracing::debug!(route = %route.name, upstream = %authority, reason, retry = may_retry, "cannot connect");
                if !std::mem::take(&mut may_retry) {
                    return Err(GateError::Upstream(UpstreamFailure::Connect));
                }
                request = *back;
            }
            Ok(Err(SendError::Http(e))) => {
                tracing::debug!(route = %route.name, error = %e, "upstream request failed");
                return Err(classify(&e));
            }
        }
    };
    let upstream_latency = started.elapsed();
    let (mut parts, incoming) = response.into_parts();
    if parts.status == StatusCode::SWITCHING_PROTOCOLS
        && let (Some(client_side), Some(upstream_side)) =
            (client_upgrade, parts.extensions.remove::<hyper::upgrade::OnUpgrade>())
    {
        tokio::spawn(tunnel(client_side, upstream_side));
    }
    let body = Body::Upstream(UpstreamBody::new(incoming, route.timeout, release));
    Ok(Forwarded { response: Response::from_parts(parts, body), upstream_latency })
}

/// What a failed upstream exchange means for the caller.
fn classify(e: &hyper::Error) -> GateError {
    // The client's own body failing over its limit surfaces as a client error.
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(BodyError::TooLarge) = s.downcast_ref::<BodyError>() {
            return GateError::PayloadTooLarge;
        }
        source = s.source();
    }
    GateError::Upstream(UpstreamFailure::Protocol)
}

/// Joins the two halves of an upgraded connection (WebSocket) until either side closes.
async fn tunnel(client: hyper::upgrade::OnUpgrade, upstream: hyper::upgrade::OnUpgrade) {
    let (client, upstream) = match tokio::try_join!(client, upstream) {
        Ok(pair) => pair,
        Err(e) => {
            tracing::debug!(error = %e, "upgrade failed");
            return;
        }
    };
    let mut client = TokioIo::new(client);
    let mut upstream = TokioIo::new(upstream);
    if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
        tracing::debug!(error = %e, "upgraded connection closed with an error");
    }
}
