//! [forward] Sends the rewritten request to one of the route's upstreams on the worker's
//! connection pool, under the route's timeout, and maps what went wrong to 502/504/413.

use crate::body::{Body, BodyError};
use crate::error::{GateError, UpstreamFailure};
use crate::rewrite::Outbound;
use crate::upstream::{Answer, Conn, SendError, Upstream};
use http::Response;
use http_body::Body as _;
use hyper_util::rt::TokioIo;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;

/// An upstream response and how long the upstream took to start answering.
#[derive(Debug)]
pub struct Forwarded {
    pub response: Response<Body>,
    pub upstream_latency: Duration,
}

/// Forwards `out`. A connection refused by one target is retried once on another when
/// the request has no body (nothing was sent, so the retry is safe whatever the method).
pub async fn send(upstream: &Arc<Upstream>, out: Outbound) -> Result<Forwarded, GateError> {
    let Outbound { mut request, added, route, client_upgrade } = out;
    let started = Instant::now();
    let deadline = tokio::time::Instant::now() + route.timeout;
    // A refused connection hands the request back unsent: no copy is kept for the retry.
    let mut may_retry = route.upstreams.len() > 1 && request.body().is_end_stream();
    let (response, answer) = loop {
        let target = route.upstreams.pick().ok_or(GateError::Upstream(UpstreamFailure::Connect))?;
        match tokio::time::timeout_at(deadline, upstream.send(target, request, &added, route.timeout)).await {
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
            Ok(Err(e)) => {
                tracing::debug!(route = %route.name, error = %e, "upstream request failed");
                return Err(classify(&e));
            }
        }
    };
    let upstream_latency = started.elapsed();
    let body = match answer {
        Answer::Body(body) => Body::Upstream(body),
        Answer::Switched(conn) => match client_upgrade {
            Some(client_side) => {
                tokio::spawn(tunnel(client_side, conn));
                Body::Empty
            }
            // A switch nobody asked for: the client's connection must not go dead on it.
            None => return Err(GateError::Upstream(UpstreamFailure::Protocol)),
        },
    };
    let (parts, ()) = response.into_parts();
    Ok(Forwarded { response: Response::from_parts(parts, body), upstream_latency })
}

/// What a failed upstream exchange means for the caller: the client's own body over its
/// limit is the client's error; anything else is the upstream's.
fn classify(e: &SendError) -> GateError {
    match e {
        SendError::Body(BodyError::TooLarge) => GateError::PayloadTooLarge,
        _ => GateError::Upstream(UpstreamFailure::Protocol),
    }
}

/// Joins the client's upgraded connection (WebSocket) and the upstream's until either
/// side closes. Bytes the upstream sent right after its `101` go to the client first.
async fn tunnel(client: hyper::upgrade::OnUpgrade, upstream: Conn) {
    let client = match client.await {
        Ok(c) => c,
        Err(e) => {
            tracing::debug!(error = %e, "upgrade failed");
            return;
        }
    };
    let mut client = TokioIo::new(client);
    let (mut upstream, early) = upstream.into_parts();
    if !early.is_empty()
        && let Err(e) = client.write_all(&early).await
    {
        tracing::debug!(error = %e, "upgraded connection closed with an error");
        return;
    }
    if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
        tracing::debug!(error = %e, "upgraded connection closed with an error");
    }
}
