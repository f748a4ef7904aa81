//! \[rewrite\] The request as the upstream will see it, and the response as the client
//! will see it.
//!
//! Order matters: headers named in `Connection` are removed *before* Gatehouse adds its
//! own, and `Connection` itself is dropped, so a client can never make the upstream
//! discard a header the gateway set (docs/identity-headers.md).

use crate::config::IdentityHeaders;
use crate::pipeline::authn::Caller;
use crate::pipeline::authz::Permit;
use crate::pipeline::limit::Quota;
use crate::pipeline::request::{ConnInfo, Parsed};
use crate::pipeline::route::Route;
use crate::wire::body::Body;
use crate::wire::h2::TeTrailers;
use crate::wire::headers::{
    self, HOP_BY_HOP, HOST, Protected, X_FORWARDED_FOR, X_FORWARDED_HOST, X_FORWARDED_PROTO, X_RATELIMIT_LIMIT,
    X_RATELIMIT_REMAINING, X_REQUEST_ID,
};
use http::header::{CONNECTION, COOKIE, UPGRADE};
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode, Uri, Version};
use hyper::upgrade::OnUpgrade;
use smallvec::SmallVec;
use std::sync::Arc;

/// A request ready to forward. Only [`request`] builds one, and it needs a [`Permit`].
#[derive(Debug)]
pub struct Outbound {
    /// The client's request, its headers cleaned of everything the upstream must not see.
    pub(crate) request: Request<Body>,
    /// What the gateway adds, in order: forwarding, request id, identity, the route's own
    /// headers, `Connection: upgrade`. Written on the wire after the client's headers (and
    /// after the target's `Host`), never inserted into the client's map: the client's
    /// copies of these names are gone already, and inserts would rehash that map.
    pub(crate) added: Added,
    pub route: Arc<Route>,
    /// The client side of a protocol upgrade (WebSocket), to join on `101`.
    pub client_upgrade: Option<OnUpgrade>,
}

/// The headers the gateway adds to a request (see `Outbound::added`).
pub type Added = SmallVec<[(HeaderName, HeaderValue); 16]>;

/// Builds the upstream request from an authorised one.
pub fn request(p: Parsed, permit: &Permit, conn: &ConnInfo, trusted_peer: bool, names: &IdentityHeaders) -> Outbound {
    let Parsed { request_id, route, path_and_query, host, mut parts, body } = p;
    let h = &mut parts.headers;

    let upgrade = parts.version == Version::HTTP_11 && is_upgrade(h);
    // Kept for an HTTP/2 upstream (gRPC servers want it); `TE` itself is hop-by-hop.
    let te_trailers = headers::list_elements(h.get_all(http::header::TE).iter())
        .any(|t| t.split(|&b| b == b';').next().unwrap_or_default().trim_ascii().eq_ignore_ascii_case(b"trailers"));
    if parts.version == Version::HTTP_2 {
        join_cookies(h);
    }
    let forwarding = Forwarding::capture(h, trusted_peer);
    // One pass over the names: hop-by-hop (`Upgrade` too: the gateway writes its own),
    // whatever `Connection` lists, `Host` (forward sets the target's), the protected
    // headers (forwarding, request id and identity among them) and what the route sets.
    let listed = connection_listed(h);
    remove_where(h, |n| {
        is_hop_by_hop(n)
            || listed.contains(n)
            || n == HOST
            || is_protected(n, route.forward_credentials, names)
            || route.set_headers.iter().any(|(set, _)| headers::same_header(n.as_str(), set))
    });

    let mut added = Added::new();
    forwarding.apply(&mut added, conn, host);
    added.push((X_REQUEST_ID, request_id));
    // docs/identity-headers.md: who the caller is, from the snapshot; the client's copies are gone.
    if let Caller::User(id) = permit.caller() {
        let u = &id.key.user.headers;
        added.push((names.user.clone(), u.user.clone()));
        added.push((names.key_id.clone(), id.key.id_header.clone()));
        added.push((names.org.clone(), u.org.clone()));
        added.push((names.teams.clone(), u.teams.clone()));
        added.push((names.roles.clone(), u.roles.clone()));
        if let Some(p) = permit.proxied_user() {
            added.push((names.proxied_user.clone(), p.clone()));
        }
    }
    // The route's own headers win over anything above of the same name.
    for (name, value) in &route.set_headers {
        match added.iter_mut().find(|(n, _)| n == name) {
            Some(slot) => slot.1 = value.clone(),
            None => added.push((name.clone(), value.clone())),
        }
    }
    if upgrade {
        // Only the protocol the gateway tunnels, whatever else the client listed.
        added.push((UPGRADE, HeaderValue::from_static(WEBSOCKET)));
        added.push((CONNECTION, HeaderValue::from_static("upgrade")));
    }

    let client_upgrade = if upgrade { parts.extensions.remove::<OnUpgrade>() } else { None };
    // HTTP/2 in, HTTP/1.1 out.
    parts.version = Version::HTTP_11;
    parts.uri = Uri::from(route.upstream_path(path_and_query));
    parts.extensions.clear();
    if te_trailers {
        parts.extensions.insert(TeTrailers);
    }
    Outbound { request: Request::from_parts(parts, body), added, route, client_upgrade }
}

/// Cleans an upstream response for the client and adds the key's quota.
pub fn response(mut res: Response<Body>, request_id: &HeaderValue, quota: Option<Quota>) -> Response<Body> {
    // A 101 keeps `Connection`/`Upgrade`: they are what switches the protocol.
    let switching = res.status() == StatusCode::SWITCHING_PROTOCOLS;
    let h = res.headers_mut();
    if !switching {
        let listed = connection_listed(h);
        remove_where(h, |n| is_hop_by_hop(n) || (n != UPGRADE && listed.contains(n)));
    }
    h.reserve(crate::wire::h1::RESPONSE_HEADERS_ADDED);
    h.insert(X_REQUEST_ID, request_id.clone());
    if let Some(q) = quota {
        h.insert(X_RATELIMIT_LIMIT, q.limit);
        h.insert(X_RATELIMIT_REMAINING, headers::number(q.remaining));
    }
    res
}

/// The one protocol a client may switch to through the gateway. Anything else a client
/// lists in `Upgrade` is dropped: `h2c` above all, whose upgraded stream would carry
/// requests that no rule ever checks (docs/identity-headers.md).
pub const WEBSOCKET: &str = "websocket";

/// `Connection: upgrade` and `websocket` among the protocols of every `Upgrade` line (a
/// protocol is `name[/version]`, RFC 9110 §7.8). Every other value, on any line, in any
/// position or spelling, is dropped with the header: only `Upgrade: websocket` goes on.
fn is_upgrade(h: &HeaderMap) -> bool {
    let wants = connection_tokens(h).any(|t| t.eq_ignore_ascii_case(b"upgrade"));
    wants && upgrade_protocols(h).any(|p| p.eq_ignore_ascii_case(WEBSOCKET.as_bytes()))
}

/// The protocol names (without `/version`) of every `Upgrade` value.
fn upgrade_protocols(h: &HeaderMap) -> impl Iterator<Item = &[u8]> {
    headers::list_elements(h.get_all(UPGRADE).iter())
        .map(|p| p.split(|&b| b == b'/').next().unwrap_or_default().trim_ascii())
}

/// True when an upstream's `101` switched to exactly the protocol the gateway forwarded:
/// one `Upgrade` value, `websocket`. Any other switch is not tunnelled (the caller
/// answers 502 and closes the upstream connection).
pub fn is_expected_switch(res: &HeaderMap) -> bool {
    let mut all = headers::list_elements(res.get_all(UPGRADE).iter()).filter(|p| !p.is_empty());
    all.next().is_some_and(|p| p.eq_ignore_ascii_case(WEBSOCKET.as_bytes())) && all.next().is_none()
}

/// HTTP/2 sends a cookie as several `cookie` fields; HTTP/1.1 wants one line, joined
/// with `; ` (RFC 9113 §8.2.3).
fn join_cookies(h: &mut HeaderMap) {
    let mut crumbs = h.get_all(COOKIE).iter();
    if crumbs.next().is_none() || crumbs.next().is_none() {
        return;
    }
    let mut joined = Vec::new();
    for (i, c) in h.get_all(COOKIE).iter().enumerate() {
        if i > 0 {
            joined.extend_from_slice(b"; ");
        }
        joined.extend_from_slice(c.as_bytes());
    }
    if let Ok(v) = HeaderValue::from_bytes(&joined) {
        h.insert(COOKIE, v);
    }
}

/// The headers named in `Connection` (RFC 9110 §7.6.1); empty, without allocating,
/// when it only says `keep-alive` (what most peers send; hop-by-hop anyway).
fn connection_listed(h: &HeaderMap) -> Vec<HeaderName> {
    connection_tokens(h)
        .filter(|t| !t.eq_ignore_ascii_case(b"keep-alive"))
        .filter_map(|t| HeaderName::from_bytes(t).ok())
        .collect()
}

/// The comma-separated tokens of every `Connection` value, without surrounding
/// whitespace. A value that is not visible ASCII is skipped whole.
fn connection_tokens(h: &HeaderMap) -> impl Iterator<Item = &[u8]> {
    headers::list_elements(h.get_all(CONNECTION).iter().filter(|v| v.to_str().is_ok()))
}

/// Removes every header whose name `doomed` picks, judging each name once (cheaper than
/// one hashed `remove` per name that might be there). The names are copied out as bytes
/// on the stack: cloning a name the client sent would turn its buffer into a shared one
/// (an allocation and atomic counts per name).
fn remove_where(h: &mut HeaderMap, doomed: impl Fn(&HeaderName) -> bool) {
    let mut names: SmallVec<[u8; 192]> = SmallVec::new();
    let mut ends: SmallVec<[usize; 8]> = SmallVec::new();
    for n in h.keys().filter(|n| doomed(n)) {
        names.extend_from_slice(n.as_str().as_bytes());
        ends.push(names.len());
    }
    let mut start = 0;
    for end in ends {
        // Always UTF-8: the bytes are a header name's.
        if let Ok(name) = std::str::from_utf8(&names[start..end]) {
            h.remove(name);
        }
        start = end;
    }
}

fn is_hop_by_hop(n: &HeaderName) -> bool {
    HOP_BY_HOP.contains(n)
}

/// Identity and forwarding headers in every spelling (the documented and the configured
/// names), and credentials unless the route forwards them.
fn is_protected(n: &HeaderName, forward_credentials: bool, names: &IdentityHeaders) -> bool {
    match headers::classify(n.as_str()) {
        Protected::No => names.all().iter().any(|p| headers::same_header(n.as_str(), p)),
        Protected::Identity => true,
        Protected::Credential => !forward_credentials,
    }
}

/// The forwarding context a trusted proxy in front of us sent, kept to extend it.
struct Forwarding {
    prior_for: Option<String>,
    prior_proto: Option<HeaderValue>,
    prior_host: Option<HeaderValue>,
}

impl Forwarding {
    fn capture(h: &HeaderMap, trusted_peer: bool) -> Forwarding {
        if !trusted_peer {
            return Forwarding { prior_for: None, prior_proto: None, prior_host: None };
        }
        let joined: Vec<&str> = h.get_all(X_FORWARDED_FOR).iter().filter_map(|v| v.to_str().ok()).collect();
        Forwarding {
            prior_for: (!joined.is_empty()).then(|| joined.join(", ")),
            prior_proto: h.get(X_FORWARDED_PROTO).cloned(),
            prior_host: h.get(X_FORWARDED_HOST).cloned(),
        }
    }

    /// Replaces (untrusted peer) or extends (trusted proxy) the forwarding headers.
    fn apply(self, added: &mut Added, conn: &ConnInfo, host: Option<HeaderValue>) {
        let xff = match self.prior_for {
            Some(prior) => HeaderValue::from_str(&format!("{prior}, {}", conn.peer.ip())).ok(),
            None => Some(conn.peer_ip.clone()),
        };
        if let Some(v) = xff {
            added.push((X_FORWARDED_FOR, v));
        }
        let proto =
            self.prior_proto.unwrap_or_else(|| HeaderValue::from_static(if conn.tls { "https" } else { "http" }));
        added.push((X_FORWARDED_PROTO, proto));
        if let Some(v) = self.prior_host.or(host) {
            added.push((X_FORWARDED_HOST, v));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// a client's `Connection` list removes its own headers but never one we add later
    #[test]
    fn connection_listed_headers_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(CONNECTION, HeaderValue::from_static("X-Foo, keep-alive, x-gatehouse-user"));
        h.insert("x-foo", HeaderValue::from_static("1"));
        h.insert("x-bar", HeaderValue::from_static("2"));
        let listed = connection_listed(&h);
        remove_where(&mut h, |n| listed.contains(n));
        assert!(h.get("x-foo").is_none());
        assert_eq!(h["x-bar"], "2");
    }

    /// `_` spellings of identity headers are stripped; credentials stay only when forwarded
    #[test]
    fn protected_headers_are_stripped() {
        let mut h = HeaderMap::new();
        h.insert("x_gatehouse_user", HeaderValue::from_static("admin"));
        h.append("x-gatehouse-user", HeaderValue::from_static("root"));
        h.insert("x-api-key", HeaderValue::from_static("k"));
        h.insert("accept", HeaderValue::from_static("*/*"));
        h.insert("x_user_id", HeaderValue::from_static("spoof"));
        let mut keep = h.clone();
        let names = IdentityHeaders { user: HeaderName::from_static("x-user-id"), ..IdentityHeaders::default() };
        remove_where(&mut h, |n| is_protected(n, false, &names));
        assert_eq!(h.len(), 1);
        remove_where(&mut keep, |n| is_protected(n, true, &names));
        assert_eq!(keep.len(), 2);
        assert_eq!(keep["x-api-key"], "k");
    }

    /// h2c is never an upgrade we forward; websocket is
    #[test]
    fn upgrade_detection() {
        let mut h = HeaderMap::new();
        h.insert(CONNECTION, HeaderValue::from_static("keep-alive, Upgrade"));
        h.insert(UPGRADE, HeaderValue::from_static("websocket"));
        assert!(is_upgrade(&h));
        h.insert(UPGRADE, HeaderValue::from_static("h2c"));
        assert!(!is_upgrade(&h));
        for both in ["websocket, h2c", "h2c, WebSocket/13", " H2C ,websocket"] {
            h.insert(UPGRADE, HeaderValue::from_static(both));
            assert!(is_upgrade(&h), "{both}: websocket is what goes on, alone");
        }
        h.insert(UPGRADE, HeaderValue::from_static("h2c"));
        h.append(UPGRADE, HeaderValue::from_static("websocket"));
        assert!(is_upgrade(&h), "every line counts");
        let mut res = HeaderMap::new();
        assert!(!is_expected_switch(&res));
        for (value, ok) in
            [("websocket", true), ("WebSocket", true), ("h2c", false), ("websocket, h2c", false), ("websocketx", false)]
        {
            res.insert(UPGRADE, HeaderValue::from_static(value));
            assert_eq!(is_expected_switch(&res), ok, "{value}");
        }
    }

    /// HTTP/2 cookie crumbs become one line
    #[test]
    fn cookies_are_joined() {
        let mut h = HeaderMap::new();
        h.append(COOKIE, HeaderValue::from_static("a=1"));
        join_cookies(&mut h);
        assert_eq!(h.get_all(COOKIE).iter().collect::<Vec<_>>(), ["a=1"]);
        h.append(COOKIE, HeaderValue::from_static("b=2"));
        h.append(COOKIE, HeaderValue::from_static("c=3"));
        join_cookies(&mut h);
        assert_eq!(h.get_all(COOKIE).iter().collect::<Vec<_>>(), ["a=1; b=2; c=3"]);
    }
}
