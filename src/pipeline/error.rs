//! The one place where a failure becomes a status code and a docs/errors.md JSON body.
//!
//! Every step returns `GateError`; `into_response` is exhaustive, so a new variant does
//! not compile until it has a status, a code and a message.

use crate::wire::body::Body;
use crate::wire::headers::{CACHE_CONTROL, CONTENT_TYPE, RETRY_AFTER, WWW_AUTHENTICATE, X_REQUEST_ID};
use http::{HeaderValue, Response, StatusCode};

/// Why a request failed, as the pipeline knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GateError {
    /// 400: the request cannot be routed or checked safely.
    BadRequest(BadRequest),
    /// 401: the caller could not be authenticated; carries the true reason.
    Unauthorized(AuthFailure),
    /// 403: the caller may not do this; carries why.
    Forbidden(Denial),
    /// 404: no route matches host and path.
    NoRoute,
    /// 413: the body is over a configured limit.
    PayloadTooLarge,
    /// 429: too many requests; retry after this many seconds.
    TooManyRequests { retry_after_secs: u32, scope: LimitScope },
    /// 502: the upstream could not be reached or answered garbage.
    Upstream(UpstreamFailure),
    /// 504: the upstream did not answer within the route's timeout.
    UpstreamTimeout,
    /// 503: the active health check finds every target of the route unhealthy.
    UpstreamUnavailable,
    /// 503: a guarantee needs the shared state (Redis) and it cannot answer
    /// (`shared_state.on_unavailable.replay: reject`).
    SharedStateUnavailable,
}

/// What made a request unacceptable (400).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadRequest {
    /// The path cannot be normalised safely (encoded `/`, `..` above the root, NUL, …).
    Path,
    /// Missing, repeated or malformed `Host` / authority.
    Host,
    /// A malformed or contradictory header (e.g. a bad `Content-Length`).
    Header,
    /// The body could not be read (client gone, or too slow).
    Body,
    /// `X-Proxied-User` repeated, empty, too long or outside the id alphabet.
    ProxiedUser,
}

/// Which limit a 429 comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitScope {
    /// The key's own rate limit.
    Key,
    /// The client IP's failed-authentication budget.
    ClientIp,
    /// The key's bound in the HMAC replay cache.
    ReplayCache,
}

/// Why an authenticated caller was refused (403).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denial {
    /// No role rule grants the method and path, or allowed_endpoints exclude it.
    NotGranted,
    /// `X-Proxied-User` from a user without `allow_proxied_users`.
    ProxiedNotAllowed,
    /// `X-Proxied-User` naming a user outside `allowed_proxied_users`.
    ProxiedNotListed,
    /// `X-Proxied-User` on an anonymous request.
    ProxiedAnonymous,
}

impl Denial {
    /// The precise reason, for the log, the audit record and the metric label.
    pub fn detail(&self) -> &'static str {
        match self {
            Denial::NotGranted => "not_granted",
            Denial::ProxiedNotAllowed => "proxied_users_not_allowed",
            Denial::ProxiedNotListed => "proxied_user_not_listed",
            Denial::ProxiedAnonymous => "proxied_user_on_anonymous_request",
        }
    }
}

/// Why authentication failed. Clients see only [`AuthFailure::client_message`], which
/// folds every key-state problem into one message (docs/authentication.md); logs, audit and metrics get the
/// true reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthFailure {
    /// No credential on a route that needs one.
    Missing,
    /// Two credentials (two `X-API-Key`s, or `X-API-Key` and `Authorization` disagreeing).
    TwoCredentials,
    /// Not a well-formed token (bad prefix, length, characters or checksum).
    MalformedToken,
    /// No such token or key id.
    UnknownKey,
    Revoked,
    Expired,
    /// The key's user is `inactive`.
    Inactive,
    /// The key's user is `retired`.
    Retired,
    /// A credential used the other method (a token with a signature, or an api_key
    /// key's public id).
    WrongMethod,
    /// An hmac key id without `X-Signature` and `X-Timestamp`.
    SignatureMissing,
    BadSignature,
    /// Timestamp missing, malformed, or outside the window.
    StaleTimestamp,
    Replay,
}

impl AuthFailure {
    /// The precise reason, for the log, the audit record and the metric label
    /// (`gatehouse_auth_failures_total{reason}`): a fixed, small set.
    pub fn detail(&self) -> &'static str {
        match self {
            AuthFailure::Missing => "missing",
            AuthFailure::TwoCredentials => "two_credentials",
            AuthFailure::MalformedToken => "malformed_token",
            AuthFailure::UnknownKey => "unknown_key",
            AuthFailure::Revoked => "revoked",
            AuthFailure::Expired => "expired",
            AuthFailure::Inactive => "inactive",
            AuthFailure::Retired => "retired",
            AuthFailure::WrongMethod => "wrong_auth_method",
            AuthFailure::SignatureMissing => "signature_missing",
            AuthFailure::BadSignature => "bad_signature",
            AuthFailure::StaleTimestamp => "stale_timestamp",
            AuthFailure::Replay => "replay",
        }
    }

    /// What the client is told (docs/errors.md).
    pub fn client_message(&self) -> &'static str {
        match self {
            AuthFailure::Missing => "API key is missing",
            AuthFailure::TwoCredentials
            | AuthFailure::MalformedToken
            | AuthFailure::UnknownKey
            | AuthFailure::Revoked
            | AuthFailure::Expired
            | AuthFailure::Inactive
            | AuthFailure::Retired
            | AuthFailure::WrongMethod => "Invalid API key",
            AuthFailure::SignatureMissing | AuthFailure::BadSignature => "Invalid signature",
            AuthFailure::StaleTimestamp => "Request timestamp is outside the allowed window",
            AuthFailure::Replay => "Replayed request",
        }
    }
}

/// How the upstream failed (502).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamFailure {
    /// The TCP connection was refused or could not be made.
    Connect,
    /// The connection broke or the upstream sent something that is not HTTP.
    Protocol,
}

impl GateError {
    /// A fixed, low-cardinality name for logs and metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            GateError::BadRequest(BadRequest::Path) => "bad_path",
            GateError::BadRequest(BadRequest::Host) => "bad_host",
            GateError::BadRequest(BadRequest::Header) => "bad_header",
            GateError::BadRequest(BadRequest::Body) => "bad_body",
            GateError::Unauthorized(f) => f.detail(),
            GateError::Forbidden(d) => d.detail(),
            GateError::BadRequest(BadRequest::ProxiedUser) => "bad_proxied_user",
            GateError::TooManyRequests { scope: LimitScope::Key, .. } => "rate_limited",
            GateError::TooManyRequests { scope: LimitScope::ClientIp, .. } => "client_ip_rate_limited",
            GateError::TooManyRequests { scope: LimitScope::ReplayCache, .. } => "replay_cache_full",
            GateError::NoRoute => "no_route",
            GateError::PayloadTooLarge => "payload_too_large",
            GateError::Upstream(UpstreamFailure::Connect) => "upstream_connect",
            GateError::Upstream(UpstreamFailure::Protocol) => "upstream_protocol",
            GateError::UpstreamTimeout => "upstream_timeout",
            GateError::UpstreamUnavailable => "upstream_unavailable",
            GateError::SharedStateUnavailable => "shared_state_unavailable",
        }
    }

    fn parts(&self) -> (StatusCode, &'static str, &'static str) {
        match self {
            GateError::BadRequest(BadRequest::Path) => {
                (StatusCode::BAD_REQUEST, "invalid_request", "Request path cannot be normalised safely")
            }
            GateError::BadRequest(BadRequest::Host) => {
                (StatusCode::BAD_REQUEST, "invalid_request", "Invalid Host header")
            }
            GateError::BadRequest(BadRequest::Header) => {
                (StatusCode::BAD_REQUEST, "invalid_request", "Malformed request header")
            }
            GateError::BadRequest(BadRequest::Body) => {
                (StatusCode::BAD_REQUEST, "invalid_request", "Request body could not be read")
            }
            GateError::Unauthorized(f) => (StatusCode::UNAUTHORIZED, "authentication_error", f.client_message()),
            GateError::BadRequest(BadRequest::ProxiedUser) => {
                (StatusCode::BAD_REQUEST, "invalid_request", "Invalid X-Proxied-User header")
            }
            GateError::Forbidden(Denial::NotGranted) => {
                (StatusCode::FORBIDDEN, "permission_error", "API key does not have permission to access this resource")
            }
            GateError::Forbidden(Denial::ProxiedNotAllowed | Denial::ProxiedNotListed | Denial::ProxiedAnonymous) => {
                (StatusCode::FORBIDDEN, "permission_error", "Proxied user is not allowed")
            }
            GateError::TooManyRequests { .. } => {
                (StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", "Rate limit exceeded")
            }
            GateError::NoRoute => (StatusCode::NOT_FOUND, "not_found", "No route matches this request"),
            GateError::PayloadTooLarge => {
                (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large", "Request body is too large")
            }
            GateError::Upstream(_) => (StatusCode::BAD_GATEWAY, "upstream_error", "Upstream service is unavailable"),
            GateError::UpstreamTimeout => {
                (StatusCode::GATEWAY_TIMEOUT, "upstream_timeout", "Upstream service timed out")
            }
            GateError::UpstreamUnavailable => {
                (StatusCode::SERVICE_UNAVAILABLE, "upstream_unavailable", "No healthy upstream is available")
            }
            GateError::SharedStateUnavailable => (
                StatusCode::SERVICE_UNAVAILABLE,
                "shared_state_unavailable",
                "Replay protection is unavailable; retry with a new signature",
            ),
        }
    }

    /// The status this error is answered with.
    pub fn status(&self) -> StatusCode {
        self.parts().0
    }

    /// The docs/errors.md response: JSON body, `X-Request-Id`, never cached.
    pub fn into_response(self, request_id: &HeaderValue) -> Response<Body> {
        let (status, code, message) = self.parts();
        let mut res = error_response(status, code, message, request_id);
        match self {
            GateError::Unauthorized(_) => {
                res.headers_mut().insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer realm=\"gatehouse\""));
            }
            GateError::TooManyRequests { retry_after_secs, .. } => {
                res.headers_mut().insert(RETRY_AFTER, HeaderValue::from(retry_after_secs));
            }
            GateError::SharedStateUnavailable | GateError::UpstreamUnavailable => {
                res.headers_mut().insert(RETRY_AFTER, HeaderValue::from_static("1"));
            }
            _ => {}
        }
        res
    }
}

impl GateError {
    /// The gRPC status code this error is told to a gRPC client with (docs/errors.md#grpc).
    pub fn grpc_status(&self) -> u8 {
        match self.status().as_u16() {
            400 => 3,        // INVALID_ARGUMENT
            401 => 16,       // UNAUTHENTICATED
            403 => 7,        // PERMISSION_DENIED
            404 => 12,       // UNIMPLEMENTED: no such service or method here
            413 | 429 => 8,  // RESOURCE_EXHAUSTED
            502 | 503 => 14, // UNAVAILABLE
            504 => 4,        // DEADLINE_EXCEEDED
            _ => 13,         // INTERNAL
        }
    }

    /// The error as a gRPC client reads it: HTTP 200 with no body and the status in the
    /// headers (a "Trailers-Only" response), `grpc-message` the same message the JSON
    /// body would carry, percent-encoded as gRPC wants; `X-Request-Id`,
    /// `WWW-Authenticate` and `Retry-After` as for JSON.
    pub fn into_grpc_response(self, request_id: &HeaderValue) -> Response<Body> {
        let (_, _, message) = self.parts();
        let mut res = self.into_response(request_id);
        *res.status_mut() = StatusCode::OK;
        *res.body_mut() = Body::Empty;
        let h = res.headers_mut();
        h.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        h.insert(GRPC_STATUS, HeaderValue::from(u16::from(self.grpc_status())));
        let encoded = percent_encoding::utf8_percent_encode(message, GRPC_MESSAGE_ESCAPES).to_string();
        if let Ok(v) = HeaderValue::from_str(&encoded) {
            h.insert(GRPC_MESSAGE, v);
        }
        res
    }
}

/// `grpc-status` and `grpc-message` (gRPC over HTTP/2).
const GRPC_STATUS: http::HeaderName = http::HeaderName::from_static("grpc-status");
const GRPC_MESSAGE: http::HeaderName = http::HeaderName::from_static("grpc-message");
/// gRPC's `grpc-message` escapes everything outside printable ASCII, and `%`.
const GRPC_MESSAGE_ESCAPES: &percent_encoding::AsciiSet = &percent_encoding::CONTROLS.add(b'%');

/// True for a gRPC request (`content-type: application/grpc`, `application/grpc+proto`,
/// …): its errors are gRPC errors. gRPC-Web is not (its status travels in the body).
pub fn is_grpc(headers: &http::HeaderMap) -> bool {
    headers.get(CONTENT_TYPE).is_some_and(|v| {
        let v = v.as_bytes();
        v.len() >= 16
            && v[..16].eq_ignore_ascii_case(b"application/grpc")
            && matches!(v.get(16), None | Some(b'+' | b';'))
    })
}

/// Builds a JSON error response (docs/errors.md). Also used for the errors hyper itself answers.
pub fn error_response(status: StatusCode, code: &str, message: &str, request_id: &HeaderValue) -> Response<Body> {
    let mut res = Response::new(Body::full(error_json(code, message, request_id.to_str().unwrap_or_default())));
    *res.status_mut() = status;
    let h = res.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(X_REQUEST_ID, request_id.clone());
    res
}

/// The error body, fields in the order docs/errors.md shows them.
pub fn error_json(code: &str, message: &str, request_id: &str) -> String {
    #[derive(serde::Serialize)]
    struct ErrorBody<'a> {
        success: bool,
        message: &'a str,
        code: &'a str,
        request_id: &'a str,
    }
    serde_json::to_string(&ErrorBody { success: false, message, code, request_id }).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    /// gRPC content types are told apart from look-alikes
    #[test]
    fn grpc_requests_are_recognised_by_content_type() {
        let h = |v: &str| http::HeaderMap::from_iter([(CONTENT_TYPE, HeaderValue::from_str(v).unwrap())]);
        for yes in ["application/grpc", "application/grpc+proto", "Application/GRPC;charset=x"] {
            assert!(is_grpc(&h(yes)), "{yes}");
        }
        for no in ["application/grpc-web", "application/grpcx", "application/json", "application/grp"] {
            assert!(!is_grpc(&h(no)), "{no}");
        }
        assert!(!is_grpc(&http::HeaderMap::new()));
    }

    /// a gRPC error: HTTP 200, no body, the status and the escaped message in headers
    #[tokio::test]
    async fn grpc_errors_are_trailers_only_responses() {
        let id = HeaderValue::from_static("req-1");
        let cases = [
            (GateError::Unauthorized(AuthFailure::Missing), "16", "API key is missing"),
            (GateError::Forbidden(Denial::NotGranted), "7", "API key does not have permission to access this resource"),
            (GateError::TooManyRequests { retry_after_secs: 2, scope: LimitScope::Key }, "8", "Rate limit exceeded"),
            (GateError::UpstreamUnavailable, "14", "No healthy upstream is available"),
            (GateError::UpstreamTimeout, "4", "Upstream service timed out"),
            (GateError::NoRoute, "12", "No route matches this request"),
        ];
        for (e, status, message) in cases {
            let res = e.into_grpc_response(&id);
            assert_eq!(res.status(), StatusCode::OK);
            assert_eq!(res.headers()["content-type"], "application/grpc");
            assert_eq!(res.headers()["grpc-status"], status, "{e:?}");
            let sent = res.headers()["grpc-message"].to_str().unwrap();
            assert_eq!(percent_encoding::percent_decode_str(sent).decode_utf8().unwrap(), message);
            assert_eq!(res.headers()["x-request-id"], "req-1");
            assert!(res.into_body().collect().await.unwrap().to_bytes().is_empty());
        }
    }

    /// each error maps to the docs/errors.md status and code, with the request id in header and body
    #[tokio::test]
    async fn errors_map_to_spec_table() {
        let id = HeaderValue::from_static("req-1");
        let cases = [
            (GateError::BadRequest(BadRequest::Path), 400, "invalid_request"),
            (GateError::NoRoute, 404, "not_found"),
            (GateError::UpstreamUnavailable, 503, "upstream_unavailable"),
            (GateError::PayloadTooLarge, 413, "payload_too_large"),
            (GateError::Upstream(UpstreamFailure::Connect), 502, "upstream_error"),
            (GateError::UpstreamTimeout, 504, "upstream_timeout"),
        ];
        for (err, status, code) in cases {
            let res = err.into_response(&id);
            assert_eq!(res.status().as_u16(), status);
            assert_eq!(res.headers()[CONTENT_TYPE], "application/json");
            assert_eq!(res.headers()[X_REQUEST_ID], "req-1");
            let body = res.into_body().collect().await.unwrap().to_bytes();
            assert!(body.starts_with(b"{\"success\":false,\"message\":"), "{body:?}");
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(v["success"], false);
            assert_eq!(v["code"], code);
            assert_eq!(v["request_id"], "req-1");
        }
    }
}
