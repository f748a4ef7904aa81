//! \[forward\] Sends the rewritten request to one of the route's upstreams on the worker's
//! connection pool, under the route's timeout, and maps what went wrong to
//! 502/504/413/400.

use crate::pipeline::error::{BadRequest, GateError, UpstreamFailure};
use crate::pipeline::rewrite::{self, Outbound};
use crate::pipeline::route::Route;
use crate::wire::balance::Target;
use crate::wire::body::{Body, BodyError};
use crate::wire::tunnel::Switched;
use crate::wire::upstream::{Answer, ConnectFailure, SendError, Upstream};
use http::Response;
use http_body::Body as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// An upstream response and how long the upstream took to start answering.
#[derive(Debug)]
pub struct Forwarded {
    pub response: Response<Body>,
    pub upstream_latency: Duration,
    /// A protocol switch to join once the `101` is sent (see `wire/tunnel.rs`).
    pub switched: Option<Switched>,
}

/// Forwards `out`. A connection refused by one target is retried once on another when
/// the request has no body (nothing was sent, so the retry is safe whatever the method).
/// `tried` is set to the slot of each target as it is tried: the one that answered, or on
/// failure the last one, for the request's record (a slot, not the name: copying the
/// name would touch a reference count every core shares, on every request).
pub async fn send(upstream: &Arc<Upstream>, out: Outbound, tried: &mut Option<usize>) -> Result<Forwarded, GateError> {
    let Outbound { mut request, added, route, client_upgrade } = out;
    let started = Instant::now();
    // A gRPC client's own deadline, when shorter than the route's timeout, is the one.
    let limit = grpc_timeout(request.headers()).map_or(route.timeout, |t| t.min(route.timeout));
    let deadline = tokio::time::Instant::now() + limit;
    // A refused connection hands the request back unsent: no copy is kept for the retry.
    let mut may_retry = route.upstreams.len() > 1 && request.body().is_end_stream();
    let (response, answer) = loop {
        // None: the active health check finds every target unhealthy; answered at once.
        let target = route.upstreams.pick().ok_or(GateError::UpstreamUnavailable)?;
        *tried = Some(target.slot);
        let _in_flight = route.upstreams.begin(target);
        match tokio::time::timeout_at(deadline, upstream.send(target, request, &added, route.timeout)).await {
            Err(_) => {
                // A client's own shorter deadline (grpc-timeout) is not the target's failure:
                // a client must not be able to eject targets by asking for 1 ns.
                if limit == route.timeout {
                    failed(&route, target, "timeout");
                }
                return Err(GateError::UpstreamTimeout);
            }
            Ok(Ok(sent)) => {
                if sent.0.status().is_server_error() {
                    failed(&route, target, "5xx");
                } else {
                    target.health.succeeded();
                }
                break sent;
            }
            Ok(Err(SendError::Connect { authority, failure, request: back })) => {
                route.upstreams.mark_down(target);
                failed(&route, target, "connect");
                match &failure {
                    // A certificate that does not verify is a misconfiguration or an
                    // attack, not a blip: said at warn level, once per interval.
                    ConnectFailure::Tls(reason) if route.upstreams.should_warn(target) => {
                        tracing::warn!(route = %route.name, upstream = %authority, reason = %reason, "upstream TLS handshake failed; nothing was sent")
                    }
                    _ => {
                        tracing::debug!(route = %route.name, upstream = %authority, reason = %failure, retry = may_retry, "cannot connect")
                    }
                }
                if !std::mem::take(&mut may_retry) {
                    return Err(GateError::Upstream(UpstreamFailure::Connect));
                }
                request = *back;
            }
            Ok(Err(e)) => {
                match e.tls_failure() {
                    // E.g. the alert of an mTLS upstream that wanted our certificate.
                    Some(reason) if route.upstreams.should_warn(target) => {
                        tracing::warn!(route = %route.name, upstream = %target.authority, reason = %reason, "upstream TLS failed")
                    }
                    _ => tracing::debug!(route = %route.name, error = %e, "upstream request failed"),
                }
                let err = classify(&e);
                if matches!(err, GateError::Upstream(_)) {
                    failed(&route, target, "protocol");
                }
                return Err(err);
            }
        }
    };
    let upstream_latency = started.elapsed();
    let (body, switched) = match answer {
        Answer::Body(body) => (Body::Upstream(body), None),
        Answer::H2(body) => (Body::UpstreamH2(body), None),
        // A switch to exactly the protocol the gateway forwarded, for a client that asked
        // for it. Any other `101` (a switch nobody asked for, or to `h2c`, whose requests
        // no rule would check) is a 502; its upstream connection is dropped, so closed.
        Answer::Switched(upstream) => match client_upgrade {
            Some(client) if rewrite::is_expected_switch(response.headers()) => {
                (Body::Empty, Some(Switched { client, upstream }))
            }
            _ => {
                tracing::debug!(route = %route.name, "upstream switched protocols unasked or to another protocol");
                return Err(GateError::Upstream(UpstreamFailure::Protocol));
            }
        },
    };
    let (parts, ()) = response.into_parts();
    Ok(Forwarded { response: Response::from_parts(parts, body), upstream_latency, switched })
}

/// `grpc-timeout` (gRPC over HTTP/2): 1 to 8 digits and a unit, `H`, `M`, `S`, `m`, `u`
/// or `n`. Anything else is ignored (the route's timeout applies).
fn grpc_timeout(headers: &http::HeaderMap) -> Option<Duration> {
    let v = headers.get("grpc-timeout")?.as_bytes();
    let (digits, unit) = v.split_at(v.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n: u64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some(match unit {
        b"H" => Duration::from_secs(n.saturating_mul(3600)),
        b"M" => Duration::from_secs(n.saturating_mul(60)),
        b"S" => Duration::from_secs(n),
        b"m" => Duration::from_millis(n),
        b"u" => Duration::from_micros(n),
        b"n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Counts a failure of `target` for passive ejection, and says so when it ejects it.
fn failed(route: &Route, target: &Target, why: &'static str) {
    if let Some(span) = target.health.failed() {
        tracing::warn!(route = %route.name, upstream = %target.authority, reason = why, ejected_for_s = span.as_secs(), "upstream target ejected after consecutive failures");
    }
}

/// What a failed upstream exchange means for the caller: the client's own body is the
/// client's error (over its limit: 413; malformed or cut short: 400), never counted
/// against the upstream; anything else is the upstream's.
fn classify(e: &SendError) -> GateError {
    match e {
        SendError::Body(BodyError::TooLarge) => GateError::PayloadTooLarge,
        SendError::Body(_) => GateError::BadRequest(BadRequest::Body),
        // hyper's HTTP/2 client hands the client's own body error back inside its own.
        SendError::H2(h) => match std::error::Error::source(h).and_then(|s| s.downcast_ref::<BodyError>()) {
            Some(BodyError::TooLarge) => GateError::PayloadTooLarge,
            Some(_) => GateError::BadRequest(BadRequest::Body),
            None => GateError::Upstream(UpstreamFailure::Protocol),
        },
        _ => GateError::Upstream(UpstreamFailure::Protocol),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// grpc-timeout values as gRPC writes them; anything else is no deadline
    #[test]
    fn grpc_timeouts_are_read() {
        let t = |v: &str| {
            grpc_timeout(&http::HeaderMap::from_iter([(
                http::HeaderName::from_static("grpc-timeout"),
                v.parse().unwrap(),
            )]))
        };
        assert_eq!(t("2S"), Some(Duration::from_secs(2)));
        assert_eq!(t("150m"), Some(Duration::from_millis(150)));
        assert_eq!(t("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(t("99999999n"), Some(Duration::from_nanos(99_999_999)));
        for bad in ["", "S", "123456789S", "1s", "-1S", "1.5S", "10x"] {
            assert_eq!(t(bad), None, "{bad}");
        }
    }
}
