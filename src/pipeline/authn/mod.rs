//! \[authenticate\] Who is calling (docs/authentication.md).
//!
//! 1. Find the one credential: `X-API-Key`, `Authorization: Bearer <t>` or a bare
//!    `Authorization: <t>`. Two different ones, or a repeated header, is a 401 — never
//!    first-wins or last-wins.
//! 2. Look it up: a `ghk_` token by the SHA-256 of it (after its checksum), anything
//!    else as a public key id. Both are hash-map lookups in the snapshot.
//! 3. Check the key and its user: revoked, expired, inactive and retired all give the
//!    same client message; the true reason travels in [`AuthFailure`].
//! 4. The method is the user's, never the request's: a token with `X-Signature` is
//!    refused, and so is an hmac key id without one. HMAC requests are verified in
//!    `hmac.rs`.

mod hmac;
pub mod replay;

use crate::config::AuthConfig;
use crate::credentials::file::Status;
use crate::credentials::secrets::{TOKEN_PREFIX, is_well_formed_token, token_digest};
use crate::credentials::snapshot::{Key, KeyCredential, Snapshot};
use crate::pipeline::error::{AuthFailure, GateError};
use crate::pipeline::request::Parsed;
use crate::wire::headers::{AUTHORIZATION, X_API_KEY, X_SIGNATURE, X_TIMESTAMP};
use http::HeaderMap;
use replay::ReplayCache;
use std::sync::Arc;

pub use hmac::{canonical_string, record_here, sign_hex};

/// The caller, as far as authentication could tell.
#[derive(Debug, Clone)]
pub enum Caller {
    /// No credentials, on a route that allows anonymous callers.
    Anonymous,
    /// An authenticated API user, through one of its keys.
    User(Identity),
}

/// An authenticated key (and through it, its user).
#[derive(Debug, Clone)]
pub struct Identity {
    pub key: Arc<Key>,
    /// A verified signature whose replay check was deferred ([`ReplayCheck::Deferred`]):
    /// the limit step records it in shared state with the key's admission.
    pub signature: Option<Signature>,
}

/// Where a verified signature is recorded against replays.
#[derive(Debug, Clone, Copy)]
pub enum ReplayCheck<'a> {
    /// Here and now, in this process's cache.
    Here(&'a ReplayCache),
    /// By the limit step, in the same shared-state round trip as the key's rate limit.
    Deferred,
}

/// A verified signature not yet recorded against replays.
#[derive(Debug, Clone, Copy)]
pub struct Signature {
    pub bytes: [u8; 32],
    /// The signed timestamp, unix seconds.
    pub timestamp: i64,
    /// When it leaves the freshness window, unix seconds.
    pub expires_at: i64,
    /// How many signatures the key can legitimately have in one window.
    pub per_key_cap: u64,
}

/// A refused request, and the key it named when the gateway could tell which one
/// (revoked, expired, inactive, a bad signature, a replay, …): the audit record names
/// that key and its user, so an operator can find who is knocking with what.
#[derive(Debug)]
pub struct Refused {
    pub error: GateError,
    pub key: Option<Arc<Key>>,
}

impl From<GateError> for Refused {
    fn from(error: GateError) -> Refused {
        Refused { error, key: None }
    }
}

fn fail(f: AuthFailure) -> GateError {
    GateError::Unauthorized(f)
}

/// Decides who sent `parsed`. For HMAC requests the body is read (up to the limit) and
/// kept in `parsed` for forwarding. `now` is unix seconds.
pub async fn authenticate(
    snap: &Snapshot,
    parsed: &mut Parsed,
    auth: &AuthConfig,
    replay: ReplayCheck<'_>,
    now: i64,
) -> Result<Caller, Refused> {
    let headers = &parsed.parts.headers;
    let signed = headers.contains_key(X_SIGNATURE) || headers.contains_key(X_TIMESTAMP);
    let Some(credential) = credential(headers).map_err(fail)? else {
        // A signature without a key id is not anonymous: somebody tried to authenticate.
        if parsed.route.allow_anonymous && !signed {
            return Ok(Caller::Anonymous);
        }
        return Err(fail(AuthFailure::Missing).into());
    };
    let by_token = credential.starts_with(TOKEN_PREFIX);
    let key = if by_token {
        if !is_well_formed_token(credential) {
            return Err(fail(AuthFailure::MalformedToken).into());
        }
        snap.by_token(&token_digest(credential))
    } else {
        snap.by_id(credential)
    }
    .ok_or(fail(AuthFailure::UnknownKey))?
    .clone();
    match check_key(&key, by_token, signed, parsed, auth, replay, now).await {
        Ok(signature) => Ok(Caller::User(Identity { key, signature })),
        Err(error) => Err(Refused { error, key: Some(key) }),
    }
}

/// Everything checked once the key is known: its state, that the request uses the
/// key's own method, and for an hmac key the signature.
async fn check_key(
    key: &Key,
    by_token: bool,
    signed: bool,
    parsed: &mut Parsed,
    auth: &AuthConfig,
    replay: ReplayCheck<'_>,
    now: i64,
) -> Result<Option<Signature>, GateError> {
    check_state(key, now).map_err(fail)?;
    match (&key.credential, by_token, signed) {
        (KeyCredential::Token, true, false) => Ok(None),
        (KeyCredential::Token, true, true) => Err(fail(AuthFailure::WrongMethod)),
        // An api_key key's public id is not a credential.
        (KeyCredential::Token, false, _) => Err(fail(AuthFailure::WrongMethod)),
        (KeyCredential::Hmac(_), _, false) => Err(fail(AuthFailure::SignatureMissing)),
        (KeyCredential::Hmac(mac), _, true) => hmac::verify(key, mac, parsed, auth, replay, now).await,
    }
}

/// Revoked, expired or belonging to a user who may not authenticate.
fn check_state(key: &Key, now: i64) -> Result<(), AuthFailure> {
    if key.revoked_at.is_some_and(|t| t <= now) {
        return Err(AuthFailure::Revoked);
    }
    if key.expires_at.is_some_and(|t| t <= now) {
        return Err(AuthFailure::Expired);
    }
    match key.user.status {
        Status::Active => Ok(()),
        Status::Inactive => Err(AuthFailure::Inactive),
        Status::Retired => Err(AuthFailure::Retired),
    }
}

/// The request's one credential, if any.
fn credential(h: &HeaderMap) -> Result<Option<&str>, AuthFailure> {
    let x_api_key = single(h, &X_API_KEY)?
        .map(|v| v.to_str().map(str::trim).map_err(|_| AuthFailure::MalformedToken))
        .transpose()?;
    if x_api_key == Some("") {
        return Err(AuthFailure::MalformedToken);
    }
    let bearer = single(h, &AUTHORIZATION)?.map(|v| bearer_token(v.as_bytes())).transpose()?.flatten();
    match (x_api_key, bearer) {
        (Some(a), Some(b)) if a != b => Err(AuthFailure::TwoCredentials),
        (Some(a), _) => Ok(Some(a)),
        (None, b) => Ok(b),
    }
}

fn single<'a>(h: &'a HeaderMap, name: &http::HeaderName) -> Result<Option<&'a http::HeaderValue>, AuthFailure> {
    let mut all = h.get_all(name).iter();
    let first = all.next();
    if all.next().is_some() {
        return Err(AuthFailure::TwoCredentials);
    }
    Ok(first)
}

/// The token in an `Authorization` value: `Bearer <t>` (scheme in any case, any run of
/// spaces) or a bare `<t>`. Another scheme (`Basic …`) is not ours: `None`. An empty
/// bearer token, or one with spaces inside, is malformed.
fn bearer_token(v: &[u8]) -> Result<Option<&str>, AuthFailure> {
    let v = std::str::from_utf8(v).map_err(|_| AuthFailure::MalformedToken)?.trim();
    match v.split_once([' ', '\t']) {
        None if v.eq_ignore_ascii_case("bearer") => Err(AuthFailure::MalformedToken),
        None if v.is_empty() => Err(AuthFailure::MalformedToken),
        None => Ok(Some(v)),
        Some((scheme, rest)) if scheme.eq_ignore_ascii_case("bearer") => {
            let token = rest.trim();
            if token.is_empty() || token.contains([' ', '\t']) {
                Err(AuthFailure::MalformedToken)
            } else {
                Ok(Some(token))
            }
        }
        Some(_) => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(http::HeaderName::from_bytes(k.as_bytes()).unwrap(), HeaderValue::from_str(v).unwrap());
        }
        h
    }

    /// the three header forms give the same credential
    #[test]
    fn three_header_forms() {
        assert_eq!(credential(&headers(&[("x-api-key", "t1")])), Ok(Some("t1")));
        assert_eq!(credential(&headers(&[("authorization", "Bearer t1")])), Ok(Some("t1")));
        assert_eq!(credential(&headers(&[("authorization", "t1")])), Ok(Some("t1")));
        assert_eq!(credential(&headers(&[("x-api-key", "t1"), ("authorization", "Bearer t1")])), Ok(Some("t1")));
    }

    /// scheme in any case and extra spaces are accepted; an empty token is not
    #[test]
    fn bearer_parsing_rules() {
        assert_eq!(bearer_token(b"bearer t1"), Ok(Some("t1")));
        assert_eq!(bearer_token(b"BEARER   t1  "), Ok(Some("t1")));
        assert_eq!(bearer_token(b"Bearer"), Err(AuthFailure::MalformedToken));
        assert_eq!(bearer_token(b"Bearer "), Err(AuthFailure::MalformedToken));
        assert_eq!(bearer_token(b"Bearer a b"), Err(AuthFailure::MalformedToken));
        assert_eq!(bearer_token(b"Basic dXNlcjpwYXNz"), Ok(None));
    }

    /// two credentials are refused, never first- or last-wins
    #[test]
    fn two_credentials_are_refused() {
        let two = [
            headers(&[("x-api-key", "a"), ("x-api-key", "b")]),
            headers(&[("x-api-key", "a"), ("x-api-key", "a")]),
            headers(&[("x-api-key", "a"), ("authorization", "Bearer b")]),
            headers(&[("authorization", "Bearer a"), ("authorization", "Bearer a")]),
        ];
        for h in &two {
            assert_eq!(credential(h), Err(AuthFailure::TwoCredentials), "{h:?}");
        }
    }

    /// no credential is `None`; an empty X-API-Key is malformed
    #[test]
    fn missing_and_empty() {
        assert_eq!(credential(&headers(&[])), Ok(None));
        assert_eq!(credential(&headers(&[("authorization", "Basic x")])), Ok(None));
        assert_eq!(credential(&headers(&[("x-api-key", " ")])), Err(AuthFailure::MalformedToken));
    }
}
