//! \[forward\] HTTP/2 to an upstream (`h2c://` by prior knowledge, `https://` with
//! `upstream_protocol: h2` by ALPN), with hyper's HTTP/2 client: Gatehouse writes no
//! HTTP/2 of its own.
//!
//! Each connection worker keeps one connection per target and multiplexes every request
//! to that target over it; hyper respects the upstream's stream limit and flow control
//! (a request waits for a free stream). A connection that closed (GOAWAY, an error, the
//! upstream gone) is replaced on the next request. Bodies stream frame by frame; the
//! upstream's trailers reach the client (gRPC's `grpc-status` is one), a client's
//! request trailers never reach the upstream (`body.rs`).

use crate::wire::balance::Target;
use crate::wire::body::Body;
use crate::wire::upstream::{Answer, ConnectFailure, SendError, Upstream};
use http::header::{CONNECTION, TE, UPGRADE};
use http::uri::{PathAndQuery, Scheme};
use http::{HeaderName, HeaderValue, Request, Response, Uri, Version};
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

/// A PING every this long on an idle connection, and the connection is dropped when the
/// answer takes longer than [`PING_TIMEOUT`]: a dead upstream is found without a request
/// having to wait for it.
const PING_EVERY: Duration = Duration::from_secs(20);
const PING_TIMEOUT: Duration = Duration::from_secs(10);

/// Marks a request whose client accepts trailers (`TE: trailers`): the one `TE` value
/// HTTP/2 allows, sent on to an HTTP/2 upstream (gRPC servers want it).
#[derive(Debug, Clone, Copy)]
pub struct TeTrailers;

/// A worker's HTTP/2 connections, by target slot. Each slot's lock is held while its
/// connection is opened, so that concurrent requests wait for one connection instead of
/// each opening its own.
#[derive(Debug, Default)]
pub struct H2Pool {
    slots: Mutex<Vec<Slot>>,
}

/// One target's connection, if open, behind the lock held while it is opened.
type Slot = Arc<tokio::sync::Mutex<Option<SendRequest<Body>>>>;

impl H2Pool {
    fn slot(&self, slot: usize) -> Slot {
        let mut slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
        if slots.len() <= slot {
            slots.resize_with(slot + 1, Default::default);
        }
        slots[slot].clone()
    }
}

impl Upstream {
    /// Sends `req` to an HTTP/2 `target`, the gateway's `added` headers merged into its
    /// own (their client-sent copies are gone already). A request the connection could
    /// not take (it closed before the request was sent) is sent once more on a new one.
    pub(crate) async fn send_h2(
        &self,
        target: &Target,
        req: Request<Body>,
        added: &[(HeaderName, HeaderValue)],
    ) -> Result<(Response<()>, Answer), SendError> {
        let mut req = into_h2(target, req, added);
        let slot = self.h2.slot(target.slot);
        // A stream the upstream refuses (REFUSED_STREAM: it did not process it, RFC 9113
        // §8.7) is sent again when the request can be rebuilt: no body, or one held whole.
        let mut copy = resendable(&req);
        for attempt in 0..3 {
            let mut conn = {
                let mut open = slot.lock().await;
                match open.as_ref().filter(|c| !c.is_closed()) {
                    Some(c) => c.clone(),
                    None => match self.connect_h2(target).await {
                        Ok(c) => {
                            *open = Some(c.clone());
                            c
                        }
                        Err(failure) => {
                            *open = None;
                            return Err(SendError::Connect {
                                authority: target.authority.clone(),
                                failure,
                                request: Box::new(req),
                            });
                        }
                    },
                }
            };
            // Waits for a free stream when the upstream's limit is reached.
            if conn.ready().await.is_err() {
                continue;
            }
            match conn.try_send_request(req).await {
                Ok(res) => {
                    let (parts, body) = res.into_parts();
                    return Ok((Response::from_parts(parts, ()), Answer::H2(body)));
                }
                Err(mut e) => match e.take_message() {
                    // Never sent: safe to send again, whatever the method.
                    Some(back) if attempt < 2 => {
                        tracing::debug!(upstream = %target.authority, error = %e.error(), "HTTP/2 connection could not take the request; sending it on a new one");
                        req = back;
                    }
                    _ => {
                        let error = e.into_error();
                        match copy.take() {
                            Some(again) if attempt < 2 && refused(&error) => {
                                tracing::debug!(upstream = %target.authority, "HTTP/2 stream refused by the upstream; sending again");
                                copy = resendable(&again);
                                req = again;
                            }
                            _ => return Err(SendError::H2(error)),
                        }
                    }
                },
            }
        }
        Err(SendError::H2Closed)
    }

    /// Opens a connection (TCP, TLS with ALPN `h2` for `https://`, the HTTP/2 handshake)
    /// within the connect timeout.
    async fn connect_h2(&self, target: &Target) -> Result<SendRequest<Body>, ConnectFailure> {
        let io = self.connect_io(target).await?;
        if let crate::wire::upstream::Io::Tls(tls) = &io
            && tls.get_ref().1.alpn_protocol() != Some(b"h2")
        {
            return Err(ConnectFailure::Tls("the upstream did not agree to HTTP/2 by ALPN".into()));
        }
        let mut builder = hyper::client::conn::http2::Builder::new(TokioExecutor::new());
        builder
            .timer(TokioTimer::new())
            .keep_alive_interval(PING_EVERY)
            .keep_alive_timeout(PING_TIMEOUT)
            .max_header_list_size(u32::try_from(self.max_head).unwrap_or(u32::MAX));
        let shake = builder.handshake::<_, Body>(TokioIo::new(io));
        let (conn, driver) = tokio::time::timeout(self.connect_timeout, shake)
            .await
            .map_err(|_| ConnectFailure::Tcp(format!("HTTP/2 handshake timed out after {:?}", self.connect_timeout)))?
            .map_err(|e| ConnectFailure::Tcp(format!("HTTP/2 handshake: {e}")))?;
        let authority = target.authority.clone();
        tokio::spawn(async move {
            if let Err(e) = driver.await {
                tracing::debug!(upstream = %authority, error = %e, "HTTP/2 upstream connection ended");
            }
        });
        Ok(conn)
    }
}

/// A copy of `req` to send again, when its body is known whole (none, or held in memory).
fn resendable(req: &Request<Body>) -> Option<Request<Body>> {
    let body = match req.body() {
        Body::Empty => Body::Empty,
        Body::Full(b) => Body::Full(b.clone()),
        _ => return None,
    };
    let mut copy = Request::new(body);
    *copy.method_mut() = req.method().clone();
    *copy.uri_mut() = req.uri().clone();
    *copy.version_mut() = req.version();
    *copy.headers_mut() = req.headers().clone();
    Some(copy)
}

/// True when the upstream refused the stream without processing it.
fn refused(e: &hyper::Error) -> bool {
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(h2) = s.downcast_ref::<h2::Error>() {
            return h2.reason() == Some(h2::Reason::REFUSED_STREAM);
        }
        source = s.source();
    }
    false
}

/// The request as HTTP/2 wants it: an absolute URI (its `:scheme` and `:authority`), the
/// gateway's headers in the map, `TE: trailers` when the client sent it.
fn into_h2(target: &Target, req: Request<Body>, added: &[(HeaderName, HeaderValue)]) -> Request<Body> {
    let (mut parts, body) = req.into_parts();
    let scheme = if target.tls.is_some() { Scheme::HTTPS } else { Scheme::HTTP };
    let pq = parts.uri.path_and_query().cloned().unwrap_or_else(|| PathAndQuery::from_static("/"));
    parts.uri = Uri::builder()
        .scheme(scheme)
        .authority(target.authority.clone())
        .path_and_query(pq)
        .build()
        .unwrap_or_else(|_| parts.uri.clone());
    parts.version = Version::HTTP_2;
    parts.headers.reserve(added.len() + 1);
    // `Connection`/`Upgrade` (a WebSocket upgrade) do not exist in HTTP/2: such a route
    // serves the request without the switch. Inserted, not appended (the names in
    // `added` are distinct): a request handed back by a refused connection goes through
    // here again for the next target, and must not carry the gateway's headers twice.
    for (name, value) in added.iter().filter(|(n, _)| n != CONNECTION && n != UPGRADE) {
        parts.headers.insert(name.clone(), value.clone());
    }
    if parts.extensions.remove::<TeTrailers>().is_some() {
        parts.headers.insert(TE, HeaderValue::from_static("trailers"));
    }
    Request::from_parts(parts, body)
}
