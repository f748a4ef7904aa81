//! `/admin/v1/…` handlers: JSON in, JSON out, docs/errors.md error shape. Every change goes
//! through `Store::update` (lock, validate, atomic write) and is then loaded into the
//! live snapshot before the response, so it is in force on the next request.

use super::caller::{Caller, required_role};
use super::{Admin, Peer, json};
use crate::credentials::admin_tokens::AdminRole;
use crate::credentials::file::{AuthMethod, FileRateLimit, Status};
use crate::credentials::ops::{self, UserFields};
use crate::credentials::reload::Removal;
use crate::credentials::store::{Scope, Store, StoreError};
use crate::pipeline::audit::AdminRecord;
use crate::pipeline::error::error_response;
use crate::wire::body::Body;
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use serde::Deserialize;
use serde_json::{Value, json as j};
use time::OffsetDateTime;

const MAX_BODY: usize = 1 << 20;

/// The message of a write refused while the credential database is away.
const UNAVAILABLE: &str = "the credential database is unavailable: nothing was changed; gateways keep serving their last snapshot, retry later";

/// An admin call that failed: its status, error code and message.
pub(super) struct ApiError(pub StatusCode, pub &'static str, pub String);

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        // The validator speaks of lines of a file the caller never saw: give the reasons.
        if let StoreError::Invalid(errors) = &e {
            let reasons: Vec<&str> = errors.problems.iter().map(|p| p.message.as_str()).collect();
            return ApiError(StatusCode::UNPROCESSABLE_ENTITY, "validation_error", reasons.join("; "));
        }
        if let StoreError::Unavailable(detail) = &e {
            // The detail (which server, what failed) is for the operator's log.
            tracing::warn!(error = %detail, "admin write refused: the credential database is unavailable");
            return ApiError(StatusCode::SERVICE_UNAVAILABLE, "credential_store_unavailable", UNAVAILABLE.into());
        }
        let (status, code) = match &e {
            StoreError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            StoreError::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
            StoreError::Precondition(_) => (StatusCode::PRECONDITION_FAILED, "precondition_failed"),
            StoreError::BadInput(_) | StoreError::Invalid(_) => (StatusCode::UNPROCESSABLE_ENTITY, "validation_error"),
            // A read-only mount (Kubernetes Secret): nothing here can change it.
            StoreError::ReadOnly { .. } => (StatusCode::CONFLICT, "read_only"),
            // The database is down: the gateways keep serving their snapshot, writes wait.
            StoreError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "credential_store_unavailable"),
            StoreError::Io { .. } | StoreError::Serialise(_) | StoreError::RotationIncomplete { .. } => {
                (StatusCode::SERVICE_UNAVAILABLE, "unavailable")
            }
        };
        ApiError(status, code, e.to_string())
    }
}

/// Every key's usage: this gateway's, or with shared state the fleet's.
pub(super) async fn usage_now(
    admin: &Admin,
) -> Result<std::collections::BTreeMap<String, crate::pipeline::usage::KeyUsageRecord>, ApiError> {
    match &admin.shared {
        None => Ok(admin.usage.snapshot()),
        Some(s) => admin.usage.fleet_view(s).await.map_err(|_| usage_unavailable()),
    }
}

/// `ids`' requests per hour and day: this gateway's, or with shared state the fleet's.
pub(super) async fn history_now(
    admin: &Admin,
    ids: &[String],
    now: i64,
    window: crate::shared::HistoryWindow,
) -> Result<crate::pipeline::history::History, ApiError> {
    admin.usage.history(admin.shared.as_deref(), ids, now, window).await.map_err(|_| usage_unavailable())
}

fn usage_unavailable() -> ApiError {
    ApiError(
        StatusCode::SERVICE_UNAVAILABLE,
        "shared_state_unavailable",
        "Usage is kept in the shared state, which is unavailable".into(),
    )
}

fn bad(msg: impl Into<String>) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, "invalid_request", msg.into())
}

/// The body of `POST /users` and `PATCH /users/{id}`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct UserBody {
    id: Option<String>,
    auth_method: Option<AuthMethod>,
    status: Option<Status>,
    display_name: Option<String>,
    description: Option<String>,
    organization: Option<String>,
    teams: Option<Vec<String>>,
    #[serde(default, with = "serde_with_null")]
    default_team: Option<Option<String>>,
    roles: Option<Vec<String>>,
    allowed_endpoints: Option<Vec<String>>,
    allow_proxied_users: Option<bool>,
    allowed_proxied_users: Option<Vec<String>>,
    #[serde(default, with = "serde_with_null")]
    rate_limit: Option<Option<FileRateLimit>>,
}

/// `absent` → None, `null` → Some(None), value → Some(Some(v)): PATCH semantics.
mod serde_with_null {
    use serde::{Deserialize, Deserializer};
    pub fn deserialize<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<Option<T>>, D::Error> {
        Option::<T>::deserialize(d).map(Some)
    }
}

impl UserBody {
    /// The fields this body sets (all non-secret), for the audit record.
    fn echo(&self) -> Value {
        let mut v = j!({
            "display_name": self.display_name, "description": self.description, "organization": self.organization,
            "teams": self.teams, "default_team": self.default_team, "roles": self.roles,
            "allowed_endpoints": self.allowed_endpoints, "allow_proxied_users": self.allow_proxied_users,
            "allowed_proxied_users": self.allowed_proxied_users,
            "rate_limit": self.rate_limit.map(|r| r.map(|r| j!({"per_second": r.per_second, "burst": r.burst}))),
            "auth_method": self.auth_method,
        });
        if let Value::Object(m) = &mut v {
            m.retain(|_, x| !x.is_null());
        }
        v
    }

    fn fields(&mut self) -> UserFields {
        UserFields {
            display_name: self.display_name.take(),
            description: self.description.take(),
            organization: self.organization.take(),
            teams: self.teams.take(),
            default_team: self.default_team.take(),
            roles: self.roles.take(),
            allowed_endpoints: self.allowed_endpoints.take(),
            allow_proxied_users: self.allow_proxied_users.take(),
            allowed_proxied_users: self.allowed_proxied_users.take(),
            rate_limit: self.rate_limit.take(),
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyBody {
    #[serde(default)]
    label: String,
    #[serde(default, with = "time::serde::rfc3339::option")]
    expires_at: Option<OffsetDateTime>,
}

/// The body of `POST /users/{id}/keys/{key_id}/rotate`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RotateBody {
    #[serde(default)]
    label: String,
    /// How long the old key stays valid (default 0: revoked now).
    grace_seconds: Option<i64>,
}

/// Longest grace period of a rotation: 30 days.
const MAX_GRACE_SECONDS: i64 = 30 * 86_400;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RoleBody {
    #[serde(default)]
    description: String,
    rules: Vec<String>,
}

/// One admin call, however it arrived: a JSON request to `/admin/v1`, or a console form
/// (which makes the same calls, so that roles, validation and audit are decided once).
#[derive(Debug)]
pub(super) struct Call {
    pub method: Method,
    /// `/admin/v1/…`.
    pub path: String,
    pub query: String,
    pub if_match: Option<String>,
    /// The JSON body (empty: none).
    pub body: bytes::Bytes,
    pub peer: Option<std::net::IpAddr>,
}

impl Call {
    /// The call a request makes: its body read up to 1 MiB (413 beyond).
    async fn of(req: Request<Incoming>) -> Result<Call, ApiError> {
        let (parts, body) = req.into_parts();
        let body = Limited::new(body, MAX_BODY)
            .collect()
            .await
            .map_err(|_| {
                ApiError(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large", "Request body is too large".into())
            })?
            .to_bytes();
        Ok(Call {
            if_match: parts.headers.get(http::header::IF_MATCH).map(|v| v.to_str().unwrap_or("\u{0}").to_string()),
            path: parts.uri.path().to_string(),
            query: parts.uri.query().unwrap_or("").to_string(),
            peer: parts.extensions.get::<Peer>().map(|p| p.0),
            method: parts.method,
            body,
        })
    }

    /// A call without a body.
    pub fn get(path: &str, query: &str, peer: Option<std::net::IpAddr>) -> Call {
        Call::with(Method::GET, path, Value::Null, peer).query(query)
    }

    /// A call with `body` as JSON (`Value::Null`: none).
    pub fn with(method: Method, path: &str, body: Value, peer: Option<std::net::IpAddr>) -> Call {
        let body = if body.is_null() { bytes::Bytes::new() } else { bytes::Bytes::from(body.to_string()) };
        Call { method, path: path.to_string(), query: String::new(), if_match: None, body, peer }
    }

    fn query(self, query: &str) -> Call {
        Call { query: query.to_string(), ..self }
    }
}

fn body<T: for<'de> Deserialize<'de> + Default>(bytes: &[u8]) -> Result<T, ApiError> {
    if bytes.is_empty() {
        return Ok(T::default());
    }
    // Not JSON at all: 400. JSON of the wrong shape (unknown or mistyped field): 422,
    // with serde's message, which names the field.
    let value: Value = serde_json::from_slice(bytes).map_err(|e| bad(format!("body is not JSON: {e}")))?;
    serde_path_to_error::deserialize(value).map_err(|e| {
        let field = e.path().to_string();
        ApiError(StatusCode::UNPROCESSABLE_ENTITY, "validation_error", format!("field `{field}`: {}", e.into_inner()))
    })
}

/// The OpenAPI 3.1 document of this API, as written in `docs/` (a test checks that every
/// route below is in it).
const OPENAPI: &str = include_str!("../../../docs/admin-api.yaml");

/// Routes and runs one authorised `/admin/v1` call.
pub(super) async fn handle(admin: &Admin, req: Request<Incoming>, id: &HeaderValue, caller: &Caller) -> Response<Body> {
    if (req.method(), req.uri().path().trim_end_matches('/')) == (&Method::GET, "/admin/v1/openapi.yaml") {
        let mut res = Response::new(Body::full(OPENAPI));
        res.headers_mut().insert(http::header::CONTENT_TYPE, HeaderValue::from_static("application/yaml"));
        return res;
    }
    let mut etag = None;
    let out = match Call::of(req).await {
        Ok(call) => run(admin, &call, caller, &mut etag).await,
        Err(e) => Err(e),
    };
    match out {
        Ok((status, v)) => {
            let mut res = json(status, &v);
            if let Some(tag) = etag.and_then(|t| HeaderValue::from_str(&t).ok()) {
                res.headers_mut().insert(http::header::ETAG, tag);
            }
            res
        }
        Err(ApiError(status, code, msg)) => error_response(status, code, &msg, id),
    }
}

/// Routes one call; `etag` receives the `ETag` of the user or role set it read or wrote.
/// Writes to a user or to the roles honour `If-Match`, checked under the store's lock
/// (or in its transaction), so two clients cannot overwrite each other unseen.
pub(super) async fn run(
    admin: &Admin,
    call: &Call,
    caller: &Caller,
    etag: &mut Option<String>,
) -> Result<(StatusCode, Value), ApiError> {
    let if_match = call.if_match.as_deref();
    let path = call.path.trim_end_matches('/').to_string();
    let segs: Vec<&str> = path.trim_start_matches("/admin/v1").split('/').filter(|s| !s.is_empty()).collect();
    let method = call.method.clone();
    let by = By { client: call.peer.map(|p| p.to_string()), caller };
    let needed = required_role(&method, &segs);
    if caller.role < needed {
        // Refused, and recorded: a viewer's token trying a write is worth knowing about.
        let record = by.record("admin.denied", &path, j!({"method": method.as_str()}));
        admin.audit.send(&record);
        return Err(ApiError(
            StatusCode::FORBIDDEN,
            "permission_error",
            format!(
                "Admin token {:?} has role {}; this call needs {}",
                caller.name,
                caller.role.as_str(),
                needed.as_str()
            ),
        ));
    }
    if segs.first() == Some(&"admin-tokens") {
        return admin_tokens(admin, call, &segs, &by);
    }
    if let (Method::GET, ["whoami"]) = (method.clone(), segs.as_slice()) {
        return Ok((StatusCode::OK, j!({"id": caller.id, "name": caller.name, "role": caller.role})));
    }
    if (method.clone(), segs.as_slice()) == (Method::POST, &["reload"][..]) {
        // The one deliberate way to apply a file that takes away nearly every user.
        let removal = match call.query.as_str() {
            "allow_mass_removal=true" => Removal::Allowed,
            _ => Removal::Guarded,
        };
        return match blocking(|| admin.credentials.reload_with(removal)) {
            Ok(()) => {
                let s = admin.credentials.snapshot();
                Ok((StatusCode::OK, j!({"reloaded": true, "users": s.user_count(), "keys": s.key_count()})))
            }
            Err(e) => Err(bad(e.to_string())),
        };
    }
    let store = admin
        .store
        .as_ref()
        .ok_or_else(|| ApiError(StatusCode::NOT_FOUND, "not_found", "no credentials file is configured".into()))?;
    let query = call.query.clone();
    let out = match (method, segs.as_slice()) {
        (Method::GET, ["users"]) => {
            let c = read(store)?;
            let param = |k| query_param(&query, k);
            (StatusCode::OK, Value::from(ops::list_users(&c, param("status"), param("role"), param("organization"))))
        }
        (Method::POST, ["users"]) => {
            let mut b: UserBody = body(&call.body)?;
            let id = b.id.take().ok_or_else(|| bad("field `id` is required"))?;
            let method =
                b.auth_method.take().ok_or_else(|| bad("field `auth_method` is required (api_key or hmac)"))?;
            if b.status.is_some() {
                return Err(bad("a new user is always active; set `status` with PATCH"));
            }
            let mut body_json = b.echo();
            body_json["auth_method"] = serde_json::to_value(method).unwrap_or_default();
            let what = Change { action: "user.create", target: &id, changes: body_json };
            let v = change(admin, store, &by, what, |c| {
                ops::create_user(c, &id, method, b.fields())?;
                let u = ops::user(c, &id)?;
                *etag = Some(ops::user_etag(u));
                Ok(ops::user_view(u))
            })?;
            (StatusCode::CREATED, v)
        }
        (Method::GET, ["users", id]) => {
            let c = read(store)?;
            let u = ops::user(&c, id)?;
            *etag = Some(ops::user_etag(u));
            let mut v = ops::user_view(u);
            crate::pipeline::usage::add_usage(&mut v, &usage_now(admin).await?);
            (StatusCode::OK, v)
        }
        (Method::GET, ["users", id, "usage"]) => {
            let c = read(store)?;
            let u = ops::user(&c, id)?;
            let usage = usage_now(admin).await?;
            let mut v = crate::pipeline::usage::usage_view(u, &usage);
            let ids: Vec<String> = u.keys.iter().map(|k| k.id.value.clone()).collect();
            let now = ops::now().unix_timestamp();
            crate::pipeline::usage::add_history(
                &mut v,
                &history_now(admin, &ids, now, crate::pipeline::history::WINDOW).await?,
                now,
            );
            (StatusCode::OK, v)
        }
        (Method::PATCH, ["users", id]) => {
            let mut b: UserBody = body(&call.body)?;
            if b.id.is_some() || b.auth_method.is_some() {
                return Err(bad("`id` and `auth_method` cannot be changed"));
            }
            let status = b.status.take();
            let mut changes = b.echo();
            if let Some(s) = status {
                changes["status"] = serde_json::to_value(s).unwrap_or_default();
            }
            let v = change(admin, store, &by, Change { action: "user.update", target: id, changes }, |c| {
                ops::check_if_match(if_match, &ops::user_etag(ops::user(c, id)?), &format!("user {id:?}"))?;
                ops::update_user(c, id, b.fields())?;
                if let Some(s) = status {
                    ops::set_status(c, id, s)?;
                }
                let u = ops::user(c, id)?;
                *etag = Some(ops::user_etag(u));
                Ok(ops::user_view(u))
            })?;
            (StatusCode::OK, v)
        }
        (Method::DELETE, ["users", id]) => {
            change(admin, store, &by, Change { action: "user.delete", target: id, changes: Value::Null }, |c| {
                ops::check_if_match(if_match, &ops::user_etag(ops::user(c, id)?), &format!("user {id:?}"))?;
                ops::delete_user(c, id)
            })?;
            (StatusCode::OK, j!({"deleted": id}))
        }
        (Method::POST, ["users", id, "keys"]) => {
            let b: KeyBody = body(&call.body)?;
            let changes = j!({"label": b.label, "expires_at": b.expires_at.map(|t| t.unix_timestamp())});
            let v = change(admin, store, &by, Change { action: "key.add", target: id, changes }, |c| {
                let hmac = ops::user(c, id)?.auth_method == AuthMethod::Hmac;
                ops::check_if_match(if_match, &ops::user_etag(ops::user(c, id)?), &format!("user {id:?}"))?;
                let (view, secret) = ops::add_key(c, id, &b.label, b.expires_at, || store.master_key())?;
                *etag = Some(ops::user_etag(ops::user(c, id)?));
                // The only response that ever contains a token or secret (docs/admin.md).
                Ok(ops::key_with_secret(view, &secret, hmac))
            })?;
            (StatusCode::CREATED, v)
        }
        (Method::DELETE, ["users", id, "keys", key_id]) => {
            let what = Change { action: "key.revoke", target: id, changes: j!({"key_id": key_id}) };
            change(admin, store, &by, what, |c| {
                ops::check_if_match(if_match, &ops::user_etag(ops::user(c, id)?), &format!("user {id:?}"))?;
                ops::revoke_key(c, id, key_id, ops::now())?;
                *etag = Some(ops::user_etag(ops::user(c, id)?));
                Ok(())
            })?;
            (StatusCode::OK, j!({"revoked": key_id}))
        }
        (Method::POST, ["users", id, "keys", key_id, "rotate"]) => {
            let b: RotateBody = body(&call.body)?;
            let grace = b.grace_seconds.unwrap_or(0);
            if !(0..=MAX_GRACE_SECONDS).contains(&grace) {
                return Err(bad(format!("`grace_seconds` must be from 0 to {MAX_GRACE_SECONDS} (30 days)")));
            }
            let changes = j!({"key_id": key_id, "label": b.label, "grace_seconds": grace});
            let v = change(admin, store, &by, Change { action: "key.rotate", target: id, changes }, |c| {
                let hmac = ops::user(c, id)?.auth_method == AuthMethod::Hmac;
                ops::check_if_match(if_match, &ops::user_etag(ops::user(c, id)?), &format!("user {id:?}"))?;
                let until = ops::now() + time::Duration::seconds(grace);
                // A key already on its way out is not rotated again: its successor is.
                let pending = ops::user(c, id)?.keys.iter().find(|k| k.id.value == *key_id).and_then(|k| k.revoked_at);
                if let Some(t) = pending.filter(|t| *t > ops::now()) {
                    return Err(StoreError::Conflict(format!(
                        "key {key_id:?} is already being replaced (it stops working at {}); rotate its successor",
                        t.format(&time::format_description::well_known::Rfc3339).unwrap_or_default()
                    )));
                }
                ops::revoke_key(c, id, key_id, until)?;
                let (view, secret) = ops::add_key(c, id, &b.label, None, || store.master_key())?;
                *etag = Some(ops::user_etag(ops::user(c, id)?));
                let old = j!({"id": key_id, "revoked_at": ops::ts(&until)});
                // With `POST …/keys`, the only responses that contain a token or secret.
                let mut v = ops::key_with_secret(view, &secret, hmac);
                v["replaces"] = old;
                Ok(v)
            })?;
            (StatusCode::CREATED, v)
        }
        (Method::GET, ["roles"]) => {
            let c = read(store)?;
            *etag = Some(ops::roles_etag(&c));
            (StatusCode::OK, ops::roles_view(&c))
        }
        (Method::GET, ["audit"]) => (StatusCode::OK, blocking(|| audit_tail(admin, &query))?),
        (Method::PUT, ["roles"]) => {
            let b: std::collections::BTreeMap<String, RoleBody> = body(&call.body)?;
            let changes = j!(b.iter().map(|(n, r)| (n.clone(), j!(r.rules))).collect::<serde_json::Map<_, _>>());
            let v = change(admin, store, &by, Change { action: "roles.set", target: "roles", changes }, |c| {
                ops::check_if_match(if_match, &ops::roles_etag(c), "the roles")?;
                let gone: Vec<String> = c.roles.keys().filter(|k| !b.contains_key(*k)).cloned().collect();
                for name in gone {
                    ops::delete_role(c, &name)?;
                }
                for (name, r) in b {
                    ops::set_role(c, &name, r.description, r.rules)?;
                }
                *etag = Some(ops::roles_etag(c));
                Ok(ops::roles_view(c))
            })?;
            (StatusCode::OK, v)
        }
        _ => return Err(ApiError(StatusCode::NOT_FOUND, "not_found", "No such admin endpoint".into())),
    };
    Ok(out)
}

/// The body of `POST /admin-tokens`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct AdminTokenBody {
    name: Option<String>,
    role: Option<AdminRole>,
    #[serde(default, with = "time::serde::rfc3339::option")]
    expires_at: Option<OffsetDateTime>,
}

/// `/admin-tokens`: list, create (the token shown once), revoke. Admin only.
fn admin_tokens(admin: &Admin, call: &Call, segs: &[&str], by: &By<'_>) -> Result<(StatusCode, Value), ApiError> {
    let store = admin
        .store
        .as_ref()
        .ok_or_else(|| ApiError(StatusCode::NOT_FOUND, "not_found", "no credential store is configured".into()))?;
    match (call.method.clone(), segs) {
        (Method::GET, ["admin-tokens"]) => {
            let tokens = blocking(|| store.admin_tokens())?;
            Ok((StatusCode::OK, Value::from(tokens.iter().map(|t| t.view()).collect::<Vec<_>>())))
        }
        (Method::POST, ["admin-tokens"]) => {
            let b: AdminTokenBody = body(&call.body)?;
            let name = b.name.ok_or_else(|| bad("field `name` is required"))?;
            let role = b.role.ok_or_else(|| bad("field `role` is required (viewer, operator or admin)"))?;
            let changes = j!({"name": name, "role": role, "expires_at": b.expires_at.map(|t| t.unix_timestamp())});
            let r = by.record("admin_token.create", &name, changes);
            let kept = store.is_database().then(|| serde_json::to_value(&r).unwrap_or_default());
            let (t, secret) =
                blocking(|| store.create_admin_token(&name, role, b.expires_at, &by.caller.actor(), kept.as_ref()))?;
            admin.audit.send(&r);
            // The only response that ever contains an admin token.
            Ok((StatusCode::CREATED, j!({"admin_token": t.view(), "token": secret.expose()})))
        }
        (Method::DELETE, ["admin-tokens", id]) => {
            let r = by.record("admin_token.revoke", id, Value::Null);
            let kept = store.is_database().then(|| serde_json::to_value(&r).unwrap_or_default());
            let t = blocking(|| store.revoke_admin_token(id, kept.as_ref()))?;
            admin.audit.send(&r);
            Ok((StatusCode::OK, j!({"revoked": t.id})))
        }
        _ => Err(ApiError(StatusCode::NOT_FOUND, "not_found", "No such admin endpoint".into())),
    }
}

/// The value of `key` in a query string (`a=1&b=2`), as sent.
fn query_param<'q>(query: &'q str, key: &str) -> Option<&'q str> {
    query.split('&').find_map(|kv| kv.strip_prefix(key).and_then(|v| v.strip_prefix('=')))
}

/// Who makes an admin API change: the caller's address and admin token.
struct By<'c> {
    client: Option<String>,
    caller: &'c Caller,
}

impl By<'_> {
    /// The audit record of `action` on `target` by this caller.
    fn record<'r>(&'r self, action: &'r str, target: &'r str, changes: Value) -> AdminRecord<'r> {
        AdminRecord::new("admin-api", action, target, changes).by(self.client.as_deref(), self.caller.token_ref())
    }
}

/// What an admin change was, for its audit record.
struct Change<'a> {
    action: &'a str,
    target: &'a str,
    /// Changed fields and their new values; never a secret.
    changes: Value,
}

/// Writes a change, records it in the audit log, and puts it in force before answering.
fn change<T>(
    admin: &Admin,
    store: &Store,
    by: &By<'_>,
    what: Change<'_>,
    f: impl FnOnce(&mut crate::credentials::file::FileCredentials) -> Result<T, StoreError>,
) -> Result<T, ApiError> {
    // A locked read-modify-write of the file, then a rebuild of the snapshot: with 100,000
    // users that is most of a second of disk and CPU.
    blocking(|| {
        let record = by.record(what.action, what.target, what.changes);
        // The database keeps the record in the change's own transaction; the audit log
        // gets it too, once the change is made.
        let kept = store.is_database().then(|| serde_json::to_value(&record).unwrap_or_default());
        // A user's or key's change touches that user only (the database then reads and
        // writes that user, not the whole store).
        let scope = match what.action.split_once('.') {
            Some(("user" | "key", _)) => Scope::User(what.target),
            _ => Scope::Whole,
        };
        let out = store.update_in(scope, kept.as_ref(), f)?;
        admin.audit.send(&record);
        if let Err(e) = admin.credentials.reload() {
            tracing::error!(error = %e, "admin change written but not loaded");
        }
        Ok(out)
    })
}

/// Reads the credentials file for a query, off the runtime thread (see [`blocking`]).
fn read(store: &Store) -> Result<crate::credentials::file::FileCredentials, StoreError> {
    blocking(|| store.read())
}

/// Runs file and snapshot work that can take most of a second (a 100,000-user file) without
/// stalling the other tasks of the runtime thread it is on (the accept loops share the
/// runtime with the admin listener). On a single-threaded runtime, as in some tests, it just
/// runs.
pub(super) fn blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}

/// The last records of the audit file (newest last), optionally only one user's:
/// `?user=ID&limit=N` (default 100, at most 1000). Reads at most the last 8 MiB.
fn audit_tail(admin: &Admin, query: &str) -> Result<Value, ApiError> {
    use std::io::{Read, Seek, SeekFrom};
    let crate::config::AuditSink::File(path) = admin.audit.sink() else {
        return Err(ApiError(StatusCode::NOT_FOUND, "not_found", "the audit log goes to stdout; read it there".into()));
    };
    let user = query_param(query, "user");
    let limit = query_param(query, "limit").and_then(|l| l.parse::<usize>().ok()).unwrap_or(100).min(1000);
    let unavailable =
        |e: std::io::Error| ApiError(StatusCode::SERVICE_UNAVAILABLE, "unavailable", format!("audit log: {e}"));
    let mut f = std::fs::File::open(path).map_err(unavailable)?;
    let len = f.metadata().map_err(unavailable)?.len();
    f.seek(SeekFrom::Start(len.saturating_sub(8 << 20))).map_err(unavailable)?;
    let mut text = String::new();
    f.read_to_string(&mut text).map_err(unavailable)?;
    let mut out: Vec<Value> = text
        .lines()
        .rev()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| user.is_none_or(|u| v["user"] == u || v["proxied_user"] == u || v["target"] == u))
        .take(limit)
        .collect();
    out.reverse();
    Ok(Value::from(out))
}
