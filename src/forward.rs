//! [forward] Sends the rewritten request to one of the route's upstreams with the pooled
//! client, under the route's timeout, and maps what went wrong to 502/504/413.

use crate::body::{Body, BodyError, UpstreamBody};
use crate::error::{GateError, UpstreamFailure};
use crate::rewrite::Outbound;
use crate::route::Target;
use crate::state::HttpClient;
use http::{Request, Response, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use std::time::{Duration, Instant};

/// An upstream response and how long the upstream took to start answering.
#[derive(Debug)]
pub struct Forwarded {
    pub response: Response<Body>,
    pub upstream_latency: Duration,
}

/// Forwards `out`. A connection refused by one target is retried once on another when
/// the request has no body (nothing was sent, so the retry is safe whatever the method).
pub async fn send(client: &HttpClient, out: Outbound) -> Result<Forwarded, GateError> {
    let Outbound { mut request, route, client_upgrade } = out;
    let started = Instant::now();
    let deadline = tokio::time::Instant::now() + route.timeout;
    let mut spare = (route.upstreams.len() > 1 && matches!(request.body(), Body::Empty)).then(|| copy_head(&request));
    let response = loop {
        let target = route.upstreams.pick().ok_or(GateError::Upstream(UpstreamFailure::Connect))?;
        set_target(&mut request, target)?;
        match tokio::time::timeout_at(deadline, client.request(request)).await {
            Err(_) => return Err(GateError::UpstreamTimeout),
            Ok(Ok(res)) => break res,
            Ok(Err(e)) => {
                let failure = classify(&e);
                if failure == GateError::Upstream(UpstreamFailure::Connect) {
                    route.upstreams.mark_down(target);
                    if let Some(head) = spare.take() {
                        tracing::debug!(route = %route.name, upstream = %target.authority, "connection refused; retrying on the next target");
                        request = head;
                        continue;
                    }
                }
                tracing::debug!(route = %route.name, upstream = %target.authority, error = %e, "upstream request failed");
                return Err(failure);
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
    let body = Body::Upstream(UpstreamBody::new(incoming, route.timeout));
    Ok(Forwarded { response: Response::from_parts(parts, body), upstream_latency })
}

/// Points the request at `target`, keeping the normalised path and query.
fn set_target(req: &mut Request<Body>, target: &Target) -> Result<(), GateError> {
    let pq = req.uri().path_and_query().cloned();
    let mut b = Uri::builder().scheme(target.scheme.clone()).authority(target.authority.clone());
    if let Some(pq) = pq {
        b = b.path_and_query(pq);
    }
    *req.uri_mut() = b.build().map_err(|_| GateError::Upstream(UpstreamFailure::Connect))?;
    Ok(())
}

/// A body-less copy of a request, for the one retry.
fn copy_head(req: &Request<Body>) -> Request<Body> {
    let mut copy = Request::new(Body::Empty);
    *copy.method_mut() = req.method().clone();
    *copy.uri_mut() = req.uri().clone();
    *copy.version_mut() = req.version();
    *copy.headers_mut() = req.headers().clone();
    copy
}

/// What a client error means for the caller.
fn classify(e: &hyper_util::client::legacy::Error) -> GateError {
    if e.is_connect() {
        return GateError::Upstream(UpstreamFailure::Connect);
    }
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
