//! Who an admin call comes from, and what it may do: the bearer token is the bootstrap
//! token (the environment's, role `admin`) or a named `gha_` token of the store; wrong
//! tokens are charged to the caller's address like failed API authentication; each route
//! needs a role (docs/admin.md#admin-roles).

use super::Admin;
use crate::credentials::admin_tokens::AdminRole;
use crate::credentials::secrets;
use crate::credentials::store::StoreError;
use crate::pipeline::audit::TokenRef;
use crate::pipeline::clock::Clock;
use crate::pipeline::error::{GateError, error_response};
use crate::pipeline::limit::RateLimits;
use crate::wire::body::Body;
use http::{HeaderValue, Method, Request, Response, StatusCode};
use sha2::{Digest, Sha256};
use std::net::IpAddr;
use subtle::ConstantTimeEq;

/// The admin token a call was made with.
#[derive(Debug, Clone)]
pub struct Caller {
    /// `adt_…`, or `bootstrap` for the environment's token.
    pub id: String,
    pub name: String,
    pub role: AdminRole,
    /// `sha256:` and the first 8 hex digits of the token's SHA-256.
    pub fingerprint: String,
}

impl Caller {
    pub fn token_ref(&self) -> TokenRef<'_> {
        TokenRef { fingerprint: &self.fingerprint, id: &self.id, name: &self.name }
    }

    /// The actor of records this caller makes (`admin-api:<token name>`).
    pub fn actor(&self) -> String {
        format!("admin-api:{}", self.name)
    }
}

/// Why a token was not accepted.
#[derive(Debug)]
pub enum Refusal {
    /// Unknown, revoked, expired, or not a token at all.
    Invalid,
    /// The address used up its failed-authentication budget: retry after this many seconds.
    Blocked(u32),
    /// The credential database, which holds the named tokens, did not answer.
    Unavailable,
}

/// The budget of failed admin authentications, per client address: the `per_minute`-th
/// failure within a minute blocks the address until the budget refills (one failure's
/// worth every `60 / per_minute` seconds).
pub fn failure_budget(per_minute: u32) -> RateLimits {
    RateLimits::with_failure_burst(per_minute, per_minute.saturating_sub(1), Clock::system())
}

impl Admin {
    /// Checks `token` from `ip`. A blocked address is refused before any lookup; a wrong
    /// token is charged to it.
    pub fn authenticate(&self, token: &str, ip: IpAddr) -> Result<Caller, Refusal> {
        if let Err(GateError::TooManyRequests { retry_after_secs, .. }) = self.failed.check_ip(ip) {
            return Err(Refusal::Blocked(retry_after_secs));
        }
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        // Only the bootstrap token and well-formed `gha_` tokens are looked up: a guess
        // costs no store read.
        let named = secrets::is_well_formed_admin_token(token);
        match self.caller_of(&digest, named)? {
            Some(c) => Ok(c),
            None => {
                self.failed.charge_failure(ip);
                Err(Refusal::Invalid)
            }
        }
    }

    /// The caller whose token has SHA-256 `digest`, if that token is (still) live: the
    /// bootstrap token, or with `named` a named token of the store. A console session
    /// asks this on every request, so a revoked or expired token ends its sessions.
    pub fn caller_of(&self, digest: &[u8; 32], named: bool) -> Result<Option<Caller>, Refusal> {
        let fingerprint = super::fingerprint(digest);
        if let Some(want) = &self.token_digest
            && bool::from(digest.ct_eq(want))
        {
            let id = "bootstrap".to_string();
            return Ok(Some(Caller { name: id.clone(), id, role: AdminRole::Admin, fingerprint }));
        }
        let Some(store) = self.store.as_ref().filter(|_| named) else { return Ok(None) };
        match super::api::blocking(|| store.find_admin_token(digest)) {
            Ok(found) => Ok(found.map(|t| Caller { id: t.id, name: t.name, role: t.role, fingerprint })),
            Err(e @ (StoreError::Unavailable(_) | StoreError::Io { .. } | StoreError::ReadOnly { .. })) => {
                tracing::warn!(error = %e, "admin token lookup failed: the admin token store is unavailable");
                Err(Refusal::Unavailable)
            }
            Err(e) => {
                tracing::error!(error = %e, "admin token lookup failed: the admin token store is unreadable");
                Err(Refusal::Unavailable)
            }
        }
    }

    /// The caller of an `/admin/v1` request, from its `Authorization: Bearer` header, or
    /// why it is refused.
    pub(super) fn bearer_caller<B>(&self, req: &Request<B>) -> Result<Caller, Refusal> {
        let ip = req.extensions().get::<super::Peer>().map_or(IpAddr::from([0, 0, 0, 0]), |p| p.0);
        let token = req
            .headers()
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, t)| t.trim());
        match token {
            Some(t) => self.authenticate(t, ip),
            // No token at all is no guess: not charged.
            None => Err(Refusal::Invalid),
        }
    }
}

/// The response for a refused admin token.
pub fn refusal_response(r: &Refusal, id: &HeaderValue) -> Response<Body> {
    match r {
        Refusal::Invalid => {
            let mut res = error_response(StatusCode::UNAUTHORIZED, "authentication_error", "Invalid admin token", id);
            res.headers_mut()
                .insert(http::header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer realm=\"gatehouse-admin\""));
            res
        }
        Refusal::Blocked(secs) => {
            let mut res = error_response(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                "Too many failed admin authentications from this address",
                id,
            );
            res.headers_mut().insert(http::header::RETRY_AFTER, HeaderValue::from(*secs));
            res
        }
        Refusal::Unavailable => {
            let mut res = error_response(
                StatusCode::SERVICE_UNAVAILABLE,
                "credential_store_unavailable",
                "The admin token store is unavailable; the bootstrap admin token still works",
                id,
            );
            res.headers_mut().insert(http::header::RETRY_AFTER, HeaderValue::from_static("1"));
            res
        }
    }
}

/// The role an `/admin/v1` call needs (`segs`: the path after `/admin/v1`).
pub fn required_role(method: &Method, segs: &[&str]) -> AdminRole {
    match (method, segs) {
        // Admin tokens, the roles' rules and reloading: admin only.
        (_, ["admin-tokens", ..]) | (_, ["reload"]) => AdminRole::Admin,
        (&Method::GET | &Method::HEAD, _) => AdminRole::Viewer,
        (_, ["roles", ..]) => AdminRole::Admin,
        // Users and their keys.
        _ => AdminRole::Operator,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// every write needs at least operator; roles, reload and admin tokens need admin
    #[test]
    fn roles_needed() {
        use AdminRole::*;
        let cases: &[(Method, &[&str], AdminRole)] = &[
            (Method::GET, &["users"], Viewer),
            (Method::GET, &["users", "u", "usage"], Viewer),
            (Method::GET, &["audit"], Viewer),
            (Method::GET, &["roles"], Viewer),
            (Method::POST, &["users"], Operator),
            (Method::PATCH, &["users", "u"], Operator),
            (Method::DELETE, &["users", "u"], Operator),
            (Method::POST, &["users", "u", "keys"], Operator),
            (Method::DELETE, &["users", "u", "keys", "k"], Operator),
            (Method::PUT, &["roles"], Admin),
            (Method::POST, &["reload"], Admin),
            (Method::GET, &["admin-tokens"], Admin),
            (Method::POST, &["admin-tokens"], Admin),
            (Method::DELETE, &["admin-tokens", "adt_x"], Admin),
        ];
        for (m, segs, want) in cases {
            assert_eq!(required_role(m, segs), *want, "{m} {segs:?}");
        }
    }
}
