//! \[parse\] From a raw hyper request to a [`Parsed`] one: request id, host, normalised
//! path, route, and a body bounded by the configured limit.

use crate::config::Limits;
use crate::pipeline::error::{BadRequest, GateError};
use crate::pipeline::route::{Route, RouteTable};
use crate::wire::body::Body;
use crate::wire::headers::{CONTENT_LENGTH, HOST, X_REQUEST_ID, list_elements};
use crate::wire::path;
use http::header::TRANSFER_ENCODING;
use http::request::Parts;
use http::uri::{Authority, PathAndQuery};
use http::{HeaderMap, HeaderValue, Request, Version};
use hyper::body::Incoming;
use std::borrow::Cow;
use std::net::SocketAddr;
use std::sync::Arc;

/// What the gateway knows about the connection a request came on.
#[derive(Debug)]
pub struct ConnInfo {
    pub peer: SocketAddr,
    /// The peer's IP as a header value (`X-Forwarded-For`), formatted once per connection.
    pub peer_ip: HeaderValue,
    pub listener: Arc<str>,
    pub tls: bool,
}

impl ConnInfo {
    /// A connection from `peer` on listener `listener`.
    pub fn new(peer: SocketAddr, listener: Arc<str>, tls: bool) -> ConnInfo {
        let peer_ip = HeaderValue::from_str(&peer.ip().to_string()).unwrap_or_else(|_| HeaderValue::from_static(""));
        ConnInfo { peer, peer_ip, listener, tls }
    }
}

/// A request that has a route and a safe path.
#[derive(Debug)]
pub struct Parsed {
    pub request_id: HeaderValue,
    pub route: Arc<Route>,
    /// The normalised path plus the query exactly as sent: what is matched and forwarded.
    pub path_and_query: PathAndQuery,
    /// The authority the client addressed (for `X-Forwarded-Host`), if any.
    pub host: Option<HeaderValue>,
    pub parts: Parts,
    pub body: Body,
}

impl Parsed {
    /// The normalised path without the query.
    pub fn path(&self) -> &str {
        self.path_and_query.path()
    }
}

/// The client's `X-Request-Id` when it sent exactly one sane value, else a new UUIDv7.
pub fn request_id(headers: &HeaderMap) -> HeaderValue {
    let mut sent = headers.get_all(X_REQUEST_ID).iter();
    if let (Some(v), None) = (sent.next(), sent.next()) {
        let b = v.as_bytes();
        if (1..=128).contains(&b.len()) && b.iter().all(|c| c.is_ascii_alphanumeric() || b"-_.:".contains(c)) {
            return v.clone();
        }
    }
    let id = new_request_id();
    let mut buf = uuid::Uuid::encode_buffer();
    HeaderValue::from_str(id.hyphenated().encode_lower(&mut buf))
        .unwrap_or_else(|_| HeaderValue::from_static("invalid"))
}

/// A new UUIDv7. `Uuid::now_v7` orders ids through one process-wide mutex, which every
/// request on every core would take; a context per thread keeps each thread's ids in
/// order (ids need to be unique and roughly time-ordered, not globally sequenced).
fn new_request_id() -> uuid::Uuid {
    thread_local! {
        static CONTEXT: uuid::ContextV7 = const { uuid::ContextV7::new() };
    }
    CONTEXT.with(|c| uuid::Uuid::new_v7(uuid::Timestamp::now(c)))
}

/// Validates the request and finds its route. Reads no body.
pub fn parse(
    routes: &RouteTable,
    limits: &Limits,
    req: Request<Incoming>,
    request_id: HeaderValue,
) -> Result<Parsed, GateError> {
    let (parts, incoming) = req.into_parts();
    only_chunked(&parts.headers)?;
    let host = authority(&parts)?;
    let host_authority = host.as_ref().map(checked_authority).transpose()?;

    let raw = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
    let (raw_path, query) = match raw.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (raw, None),
    };
    let path_and_query = match path::normalise(raw_path).map_err(|_| GateError::BadRequest(BadRequest::Path))? {
        // Already canonical: reuse the parsed value, no allocation.
        Cow::Borrowed(_) => parts.uri.path_and_query().cloned().unwrap_or_else(|| PathAndQuery::from_static("/")),
        Cow::Owned(p) => {
            let s = match query {
                Some(q) => format!("{p}?{q}"),
                None => p,
            };
            PathAndQuery::try_from(s).map_err(|_| GateError::BadRequest(BadRequest::Path))?
        }
    };
    let route = routes
        .find(host_authority.as_ref().map(Authority::host), path_and_query.path())
        .ok_or(GateError::NoRoute)?
        .clone();
    let body = bounded_body(&parts.headers, incoming, limits.max_request_body)?;
    Ok(Parsed { request_id, route, path_and_query, host, parts, body })
}

/// A request's `Transfer-Encoding`, when it has one, is `chunked` once and nothing else.
/// hyper reads any list that ends in `chunked` as chunked (`gzip, chunked`, `chunked,
/// chunked`, `, chunked`) and hands on the decoded chunks; the gateway drops the header
/// (hop-by-hop) and would forward still-coded bytes as the body, or bytes framed twice as
/// once. No client needs more than `chunked`, so anything else is a 400 (as in nginx).
fn only_chunked(headers: &HeaderMap) -> Result<(), GateError> {
    if !headers.contains_key(TRANSFER_ENCODING) {
        return Ok(());
    }
    let mut codings = list_elements(headers.get_all(TRANSFER_ENCODING).iter());
    match (codings.next(), codings.next()) {
        (Some(c), None) if c.eq_ignore_ascii_case(b"chunked") => Ok(()),
        _ => Err(GateError::BadRequest(BadRequest::Header)),
    }
}

/// The authority the client addressed: the URI's (HTTP/2 `:authority`, HTTP/1 absolute
/// form) or the single `Host` header. HTTP/1.1 without one is malformed (RFC 9112 §3.2).
fn authority(parts: &Parts) -> Result<Option<HeaderValue>, GateError> {
    let mut hosts = parts.headers.get_all(HOST).iter();
    let header = hosts.next();
    if hosts.next().is_some() {
        return Err(GateError::BadRequest(BadRequest::Host));
    }
    if let Some(a) = parts.uri.authority() {
        return HeaderValue::from_str(a.as_str()).map(Some).map_err(|_| GateError::BadRequest(BadRequest::Host));
    }
    match header {
        Some(h) => Ok(Some(h.clone())),
        None if parts.version == Version::HTTP_11 => Err(GateError::BadRequest(BadRequest::Host)),
        None => Ok(None),
    }
}

/// The authority in `h`, refusing anything that is not one (or that has user info).
fn checked_authority(h: &HeaderValue) -> Result<Authority, GateError> {
    let bad = || GateError::BadRequest(BadRequest::Host);
    let a: Authority = h.to_str().map_err(|_| bad())?.parse().map_err(|_| bad())?;
    if a.as_str().contains('@') || a.host().is_empty() {
        return Err(bad());
    }
    Ok(a)
}

/// A declared length over the limit is refused before any byte is read (so no
/// `100 Continue` goes out); a body of unknown length is counted as it streams.
fn bounded_body(headers: &HeaderMap, incoming: Incoming, max: u64) -> Result<Body, GateError> {
    use http_body::Body as _;
    if incoming.is_end_stream() {
        return Ok(Body::Empty);
    }
    match headers.get(CONTENT_LENGTH) {
        Some(v) => {
            // hyper has already refused malformed and conflicting lengths on HTTP/1.
            let len: u64 =
                v.to_str().ok().and_then(|s| s.parse().ok()).ok_or(GateError::BadRequest(BadRequest::Header))?;
            if len > max {
                return Err(GateError::PayloadTooLarge);
            }
            Ok(Body::Stream(incoming))
        }
        None => Ok(Body::Limited { inner: incoming, remaining: max }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// a sane client request id is kept; a bad or repeated one is replaced
    #[test]
    fn request_id_is_kept_only_when_sane() {
        let mut h = HeaderMap::new();
        h.insert(X_REQUEST_ID, HeaderValue::from_static("abc-123"));
        assert_eq!(request_id(&h), "abc-123");
        h.insert(X_REQUEST_ID, HeaderValue::from_static("bad id with spaces"));
        assert_ne!(request_id(&h), "bad id with spaces");
        h.insert(X_REQUEST_ID, HeaderValue::from_static("a"));
        h.append(X_REQUEST_ID, HeaderValue::from_static("b"));
        let id = request_id(&h);
        assert_eq!(id.len(), 36, "{id:?}");
    }

    /// a request's Transfer-Encoding is `chunked` alone, or the request is a 400
    #[test]
    fn only_chunked_is_a_transfer_coding() {
        let te = |values: &[&'static str]| {
            let mut h = HeaderMap::new();
            for v in values {
                h.append(TRANSFER_ENCODING, HeaderValue::from_static(v));
            }
            only_chunked(&h)
        };
        assert!(te(&[]).is_ok());
        assert!(te(&["chunked"]).is_ok());
        assert!(te(&["Chunked"]).is_ok());
        for bad in [
            &["gzip, chunked"][..],
            &["chunked, chunked"],
            &["gzip", "chunked"],
            &["chunked", "chunked"],
            &[", chunked"],
            &["chunked,"],
            &["identity"],
        ] {
            assert_eq!(te(bad), Err(GateError::BadRequest(BadRequest::Header)), "{bad:?}");
        }
    }

    /// hosts with user-info or garbage are refused; the port is dropped
    #[test]
    fn host_parsing() {
        let host = |h: &'static str| checked_authority(&HeaderValue::from_static(h)).map(|a| a.host().to_string());
        assert_eq!(host("api.example.com:8443").unwrap(), "api.example.com");
        assert_eq!(host("[::1]:80").unwrap(), "[::1]");
        assert!(host("user@evil.com").is_err());
        assert!(host("a b").is_err());
    }
}
