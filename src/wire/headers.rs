//! Every header name Gatehouse reads or writes, as a constant, and the static lists built
//! from them. No other module spells a header name as a string.

use http::HeaderName;
use http::header::{CONNECTION, PROXY_AUTHENTICATE, PROXY_AUTHORIZATION, TE, TRAILER, TRANSFER_ENCODING, UPGRADE};

pub use http::header::{AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE, HOST, RETRY_AFTER, WWW_AUTHENTICATE};

pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
pub const X_API_KEY: HeaderName = HeaderName::from_static("x-api-key");
pub const X_SIGNATURE: HeaderName = HeaderName::from_static("x-signature");
pub const X_TIMESTAMP: HeaderName = HeaderName::from_static("x-timestamp");
pub const X_PROXIED_USER: HeaderName = HeaderName::from_static("x-proxied-user");
pub const X_GATEHOUSE_USER: HeaderName = HeaderName::from_static("x-gatehouse-user");
pub const X_GATEHOUSE_KEY_ID: HeaderName = HeaderName::from_static("x-gatehouse-key-id");
pub const X_GATEHOUSE_ORG: HeaderName = HeaderName::from_static("x-gatehouse-org");
pub const X_GATEHOUSE_TEAMS: HeaderName = HeaderName::from_static("x-gatehouse-teams");
pub const X_GATEHOUSE_ROLES: HeaderName = HeaderName::from_static("x-gatehouse-roles");
pub const X_GATEHOUSE_PROXIED_USER: HeaderName = HeaderName::from_static("x-gatehouse-proxied-user");
pub const X_RATELIMIT_LIMIT: HeaderName = HeaderName::from_static("x-ratelimit-limit");
pub const X_RATELIMIT_REMAINING: HeaderName = HeaderName::from_static("x-ratelimit-remaining");
pub const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
pub const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
pub const CACHE_CONTROL: HeaderName = http::header::CACHE_CONTROL;
/// The settings of an h2c upgrade (RFC 7540 §3.2.1): meaningful on one hop only.
pub const HTTP2_SETTINGS: HeaderName = HeaderName::from_static("http2-settings");

/// The prefix of every identity header Gatehouse sets (docs/identity-headers.md). A client-sent header
/// with this prefix, in any spelling, never reaches an upstream.
pub const IDENTITY_PREFIX: &str = "x-gatehouse-";

/// Hop-by-hop headers (RFC 9110 §7.6.1, plus the legacy ones proxies still see). Built
/// once so that removal does not parse and hash a string per request.
pub static HOP_BY_HOP: [HeaderName; 10] = [
    CONNECTION,
    KEEP_ALIVE,
    PROXY_CONNECTION,
    TE,
    TRAILER,
    TRANSFER_ENCODING,
    UPGRADE,
    PROXY_AUTHENTICATE,
    PROXY_AUTHORIZATION,
    HTTP2_SETTINGS,
];

/// The comma-separated elements of a list header's values (RFC 9110 §5.6.1), without
/// surrounding whitespace; empty elements are kept.
pub fn list_elements<'a>(values: impl Iterator<Item = &'a http::HeaderValue>) -> impl Iterator<Item = &'a [u8]> {
    values.flat_map(|v| v.as_bytes().split(|&b| b == b',')).map(<[u8]>::trim_ascii)
}

/// A number as a header value: one exact-size allocation (`HeaderValue::from(u32)` makes
/// two, and grows a buffer). `X-RateLimit-Remaining` is one per request.
pub fn number(n: u32) -> http::HeaderValue {
    let mut digits = itoa::Buffer::new();
    let text = digits.format(n);
    http::HeaderValue::from_maybe_shared(bytes::Bytes::copy_from_slice(text.as_bytes()))
        .unwrap_or_else(|_| http::HeaderValue::from(n))
}

/// How a client-sent header is treated on its way upstream, judged on its name with
/// `_` read as `-` (some backends, e.g. CGI-style ones, treat the two as the same).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protected {
    /// Not protected: forwarded as is.
    No,
    /// Identity or forwarding context: always removed, Gatehouse sets its own.
    Identity,
    /// A credential header: removed unless the route forwards credentials.
    Credential,
}

/// Classifies a (lower-case) header name. Allocation-free.
pub fn classify(name: &str) -> Protected {
    let b = name.as_bytes();
    // Only names starting with x, f or a can be protected: keep the common case cheap.
    match b.first() {
        Some(b'x' | b'f' | b'a') => {}
        _ => return Protected::No,
    }
    if eq_dashed(b, "authorization")
        || eq_dashed(b, "x-api-key")
        || eq_dashed(b, "x-signature")
        || eq_dashed(b, "x-timestamp")
    {
        return Protected::Credential;
    }
    let identity = starts_with_dashed(b, IDENTITY_PREFIX)
        || starts_with_dashed(b, "x-forwarded-")
        || eq_dashed(b, "forwarded")
        || eq_dashed(b, "x-real-ip")
        || eq_dashed(b, "x-proxied-user")
        || eq_dashed(b, "x-request-id")
        // Method overrides would let a client run a method that was never authorised.
        || eq_dashed(b, "x-http-method-override")
        || eq_dashed(b, "x-http-method")
        || eq_dashed(b, "x-method-override")
        || eq_dashed(b, "x-original-method")
        // Path overrides (IIS, Symfony, Laminas): a backend that honours them routes to
        // a path no rule authorised.
        || eq_dashed(b, "x-original-url")
        || eq_dashed(b, "x-rewrite-url");
    if identity { Protected::Identity } else { Protected::No }
}

/// True when a backend could read header `name` (lower case) as `protected`: the same
/// name with `_` and `-` read alike, on either side (a configured name may itself be
/// spelled with `_`).
pub fn same_header(name: &str, protected: &HeaderName) -> bool {
    eq_dashed(name.as_bytes(), protected.as_str())
}

/// `a == b` where `_` and `-` count as the same byte.
fn eq_dashed(a: &[u8], b: &str) -> bool {
    a.len() == b.len() && starts_with_dashed(a, b)
}

fn starts_with_dashed(a: &[u8], prefix: &str) -> bool {
    a.len() >= prefix.len() && a.iter().zip(prefix.as_bytes()).all(|(&x, &y)| dash(x) == dash(y))
}

/// `_` read as `-`.
fn dash(b: u8) -> u8 {
    if b == b'_' { b'-' } else { b }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// identity headers are protected in every spelling a backend might read
    #[test]
    fn identity_spellings_are_protected() {
        for n in [
            "x-gatehouse-user",
            "x_gatehouse_user",
            "x-gatehouse_org",
            "x-forwarded-for",
            "x_forwarded_host",
            "forwarded",
            "x-real-ip",
            "x-proxied-user",
            "x-http-method-override",
            "x-request-id",
            "x-original-url",
            "x_original_url",
            "x-rewrite-url",
            "x-original-method",
        ] {
            assert_eq!(classify(n), Protected::Identity, "{n}");
        }
    }

    /// credential headers are their own class; ordinary headers are not protected
    #[test]
    fn credentials_and_plain_headers() {
        for n in ["authorization", "x-api-key", "x_api_key", "x-signature", "x-timestamp"] {
            assert_eq!(classify(n), Protected::Credential, "{n}");
        }
        for n in ["accept", "content-type", "x-custom", "x-gatehouse", "authorizations", "forwarded-x"] {
            assert_eq!(classify(n), Protected::No, "{n}");
        }
    }

    /// a configured name spelled with `_` matches a client's `-` spelling, and the reverse
    #[test]
    fn same_header_reads_dash_and_underscore_alike_on_both_sides() {
        let configured = HeaderName::from_static("x_user_id");
        assert!(same_header("x-user-id", &configured));
        assert!(same_header("x_user_id", &configured));
        assert!(same_header("x-user_id", &HeaderName::from_static("x-user-id")));
        assert!(!same_header("x-user-idx", &configured));
    }
}
