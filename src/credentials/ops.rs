//! The changes an administrator makes to the credentials, as functions on the file
//! model. The CLI and the admin API both run these inside `Store::update`, so both
//! enforce the same rules (retired is terminal, a role in use cannot be deleted, …).

use super::file::{AuthMethod, FileCredentials, FileKey, FileRateLimit, FileRole, FileUser, Status, spanned};
use super::secrets::{MasterKey, Secret};
use super::snapshot::is_valid_id;
use super::store::StoreError;
use serde_json::{Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

fn not_found(msg: impl Into<String>) -> StoreError {
    StoreError::NotFound(msg.into())
}

fn conflict(msg: impl Into<String>) -> StoreError {
    StoreError::Conflict(msg.into())
}

fn bad_input(msg: impl Into<String>) -> StoreError {
    StoreError::BadInput(msg.into())
}

/// The entity tag of a stored value: a digest of it as stored, so any change to it (and
/// only a change) gives another tag.
fn etag_of<T: serde::Serialize>(v: &T) -> String {
    use sha2::Digest;
    let bytes = serde_json::to_vec(v).unwrap_or_default();
    format!("\"{}\"", hex::encode(&sha2::Sha256::digest(&bytes)[..12]))
}

/// The `ETag` of a user (its fields and keys as stored).
pub fn user_etag(u: &FileUser) -> String {
    etag_of(u)
}

/// The `ETag` of the set of roles.
pub fn roles_etag(c: &FileCredentials) -> String {
    etag_of(&c.roles)
}

/// Checks an `If-Match` header value against the current tag (`*` matches anything that
/// exists). Weak tags never match: `If-Match` compares strongly.
pub fn check_if_match(if_match: Option<&str>, current: &str, what: &str) -> Result<(), StoreError> {
    let Some(header) = if_match else { return Ok(()) };
    if header.split(',').map(str::trim).any(|t| t == "*" || t == current) {
        return Ok(());
    }
    Err(StoreError::Precondition(format!(
        "{what} changed since it was read (If-Match {header}, now {current}): read it again and retry"
    )))
}

/// What replacing `old` by `new` changes: ids of users and names of roles added, removed
/// and changed (a user's keys are part of it).
pub fn difference(old: &FileCredentials, new: &FileCredentials) -> Value {
    fn split<'a, T: serde::Serialize + 'a>(
        old: impl Iterator<Item = (&'a str, &'a T)>,
        new: impl Iterator<Item = (&'a str, &'a T)>,
    ) -> Value {
        let old: std::collections::BTreeMap<&str, &T> = old.collect();
        let new: std::collections::BTreeMap<&str, &T> = new.collect();
        let same = |a: &T, b: &T| serde_json::to_value(a).ok() == serde_json::to_value(b).ok();
        let added: Vec<&str> = new.keys().filter(|k| !old.contains_key(*k)).copied().collect();
        let removed: Vec<&str> = old.keys().filter(|k| !new.contains_key(*k)).copied().collect();
        let changed: Vec<&str> =
            new.iter().filter(|(k, v)| old.get(*k).is_some_and(|o| !same(o, v))).map(|(k, _)| *k).collect();
        json!({"added": added, "removed": removed, "changed": changed})
    }
    json!({
        "users": split(
            old.users.iter().map(|u| (u.id.value.as_str(), u)),
            new.users.iter().map(|u| (u.id.value.as_str(), u)),
        ),
        "roles": split(old.roles.iter().map(|(k, v)| (k.as_str(), v)), new.roles.iter().map(|(k, v)| (k.as_str(), v))),
    })
}

/// Now, to the second (the file keeps whole seconds).
pub fn now() -> OffsetDateTime {
    OffsetDateTime::now_utc().replace_nanosecond(0).unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

/// The editable fields of a user; `None` leaves a field as it is.
#[derive(Debug, Default, Clone)]
pub struct UserFields {
    pub display_name: Option<String>,
    pub description: Option<String>,
    pub organization: Option<String>,
    pub teams: Option<Vec<String>>,
    pub default_team: Option<Option<String>>,
    pub roles: Option<Vec<String>>,
    pub allowed_endpoints: Option<Vec<String>>,
    pub allow_proxied_users: Option<bool>,
    pub allowed_proxied_users: Option<Vec<String>>,
    pub rate_limit: Option<Option<FileRateLimit>>,
}

impl UserFields {
    fn apply(self, u: &mut FileUser) {
        if let Some(v) = self.display_name {
            u.display_name = v;
        }
        if let Some(v) = self.description {
            u.description = v;
        }
        if let Some(v) = self.organization {
            u.organization = v;
        }
        if let Some(v) = self.teams {
            u.teams = v;
        }
        if let Some(v) = self.default_team {
            u.default_team = v;
        }
        if let Some(v) = self.roles {
            u.roles = v.into_iter().map(spanned).collect();
        }
        if let Some(v) = self.allowed_endpoints {
            u.allowed_endpoints = v.into_iter().map(spanned).collect();
        }
        if let Some(v) = self.allow_proxied_users {
            u.allow_proxied_users = v;
        }
        if let Some(v) = self.allowed_proxied_users {
            u.allowed_proxied_users = v;
        }
        if let Some(v) = self.rate_limit {
            u.rate_limit = v.map(spanned);
        }
    }
}

fn user_mut<'a>(c: &'a mut FileCredentials, id: &str) -> Result<&'a mut FileUser, StoreError> {
    c.users.iter_mut().find(|u| u.id.value == id).ok_or_else(|| not_found(format!("no user {id:?}")))
}

/// The user `id`.
pub fn user<'a>(c: &'a FileCredentials, id: &str) -> Result<&'a FileUser, StoreError> {
    c.users.iter().find(|u| u.id.value == id).ok_or_else(|| not_found(format!("no user {id:?}")))
}

/// Creates a user (status `active`, no keys).
pub fn create_user(
    c: &mut FileCredentials,
    id: &str,
    method: AuthMethod,
    fields: UserFields,
) -> Result<(), StoreError> {
    if !is_valid_id(id) {
        return Err(bad_input(format!("user id {id:?} must match [a-z0-9][a-z0-9_.-]{{0,63}}")));
    }
    if c.users.iter().any(|u| u.id.value == id) {
        return Err(conflict(format!("user {id:?} already exists")));
    }
    let mut u = FileUser::new(id, method, now());
    fields.apply(&mut u);
    c.users.push(u);
    Ok(())
}

/// Changes the given fields of a user.
pub fn update_user(c: &mut FileCredentials, id: &str, fields: UserFields) -> Result<(), StoreError> {
    let u = user_mut(c, id)?;
    fields.apply(u);
    u.updated_at = now();
    Ok(())
}

/// Sets a user's status. `retired` is terminal: nothing leaves it.
pub fn set_status(c: &mut FileCredentials, id: &str, status: Status) -> Result<(), StoreError> {
    let u = user_mut(c, id)?;
    if u.status == Status::Retired && status != Status::Retired {
        return Err(conflict(format!("user {id:?} is retired; a retired user cannot be re-activated")));
    }
    u.status = status;
    u.updated_at = now();
    Ok(())
}

/// Removes a user and its keys.
pub fn delete_user(c: &mut FileCredentials, id: &str) -> Result<(), StoreError> {
    let before = c.users.len();
    c.users.retain(|u| u.id.value != id);
    if c.users.len() == before {
        return Err(not_found(format!("no user {id:?}")));
    }
    Ok(())
}

/// Adds a key to a user; returns its view and the token or secret (shown once).
pub fn add_key(
    c: &mut FileCredentials,
    user_id: &str,
    label: &str,
    expires_at: Option<OffsetDateTime>,
    master: impl FnOnce() -> Result<MasterKey, StoreError>,
) -> Result<(Value, Secret), StoreError> {
    let u = user_mut(c, user_id)?;
    if u.status == Status::Retired {
        return Err(conflict(format!("user {user_id:?} is retired; its keys are never accepted again")));
    }
    let rng = |e: getrandom::Error| conflict(format!("no OS randomness: {e}"));
    let (mut key, secret) = match u.auth_method {
        AuthMethod::ApiKey => super::mint_api_key(label).map_err(rng)?,
        AuthMethod::Hmac => super::mint_hmac_key(&master()?, label).map_err(rng)?,
    };
    key.expires_at = expires_at;
    let view = key_view(&key);
    u.keys.push(key);
    u.updated_at = now();
    Ok((view, secret))
}

/// What the CLI and the admin API answer a new key with: its view and, this once, its
/// API token (`token`) or HMAC signing secret (`secret`).
pub fn key_with_secret(view: Value, secret: &super::secrets::Secret, hmac: bool) -> Value {
    if hmac { json!({"key": view, "secret": secret.expose()}) } else { json!({"key": view, "token": secret.expose()}) }
}

/// Revokes a key at `at` (now, or later for a rotation's grace period).
pub fn revoke_key(c: &mut FileCredentials, user_id: &str, key_id: &str, at: OffsetDateTime) -> Result<(), StoreError> {
    let u = user_mut(c, user_id)?;
    let k = u
        .keys
        .iter_mut()
        .find(|k| k.id.value == key_id)
        .ok_or_else(|| not_found(format!("user {user_id:?} has no key {key_id:?}")))?;
    if k.revoked_at.is_some_and(|t| t <= now()) {
        return Err(conflict(format!("key {key_id:?} is already revoked")));
    }
    // A revocation already scheduled (a rotation's grace period) can come sooner, never
    // later: repeating a rotation must not keep a key alive.
    k.revoked_at = Some(k.revoked_at.map_or(at, |t| t.min(at)));
    u.updated_at = now();
    Ok(())
}

/// Creates or replaces a role.
pub fn set_role(
    c: &mut FileCredentials,
    name: &str,
    description: String,
    rules: Vec<String>,
) -> Result<(), StoreError> {
    if name.is_empty() || name.chars().any(|ch| ch.is_whitespace() || ch == ',') {
        return Err(bad_input(format!("role name {name:?} must be non-empty, without spaces or commas")));
    }
    c.roles.insert(name.to_string(), FileRole { description, rules: rules.into_iter().map(spanned).collect() });
    Ok(())
}

/// Deletes a role no user has.
pub fn delete_role(c: &mut FileCredentials, name: &str) -> Result<(), StoreError> {
    let users: Vec<&str> =
        c.users.iter().filter(|u| u.roles.iter().any(|r| r.value == name)).map(|u| u.id.value.as_str()).collect();
    if !users.is_empty() {
        return Err(conflict(format!("role {name:?} is still held by: {}", users.join(", "))));
    }
    c.roles.remove(name).map(|_| ()).ok_or_else(|| not_found(format!("no role {name:?}")))
}

/// A timestamp as the views show it (RFC 3339).
pub fn ts(t: &OffsetDateTime) -> Value {
    t.format(&Rfc3339).map_or(Value::Null, Value::String)
}

/// A key as listings show it: never a digest or a sealed secret.
pub fn key_view(k: &FileKey) -> Value {
    json!({
        "id": k.id.value,
        "label": k.label,
        "hint": k.hint,
        "created_at": ts(&k.created_at),
        "expires_at": k.expires_at.as_ref().map(ts),
        "revoked_at": k.revoked_at.as_ref().map(ts),
        "rate_limit": k.rate_limit.map(|r| json!({"per_second": r.per_second, "burst": r.burst})),
    })
}

/// Views of the users matching every filter given (`status` as written in the file).
pub fn list_users(
    c: &FileCredentials,
    status: Option<&str>,
    role: Option<&str>,
    organization: Option<&str>,
) -> Vec<Value> {
    c.users
        .iter()
        .filter(|u| role.is_none_or(|r| u.roles.iter().any(|x| x.value == r)))
        .filter(|u| organization.is_none_or(|o| u.organization == o))
        .map(user_view)
        .filter(|v| status.is_none_or(|s| v["status"] == s))
        .collect()
}

/// A user as listings show it.
pub fn user_view(u: &FileUser) -> Value {
    json!({
        "id": u.id.value,
        "display_name": u.display_name,
        "description": u.description,
        "organization": u.organization,
        "teams": u.teams,
        "default_team": u.default_team,
        "roles": u.roles.iter().map(|r| r.value.clone()).collect::<Vec<_>>(),
        "status": u.status,
        "auth_method": u.auth_method,
        "allowed_endpoints": u.allowed_endpoints.iter().map(|r| r.value.clone()).collect::<Vec<_>>(),
        "allow_proxied_users": u.allow_proxied_users,
        "allowed_proxied_users": u.allowed_proxied_users,
        "rate_limit": u.rate_limit.as_ref().map(|r| json!({"per_second": r.value.per_second, "burst": r.value.burst})),
        "keys": u.keys.iter().map(key_view).collect::<Vec<_>>(),
        "created_at": ts(&u.created_at),
        "updated_at": ts(&u.updated_at),
    })
}

/// Every role as `{name: {description, rules}}`: the admin API's and the CLI's view.
pub fn roles_view(c: &FileCredentials) -> Value {
    c.roles
        .iter()
        .map(|(n, r)| (n.clone(), json!({"description": r.description, "rules": r.rules.iter().map(|x| x.value.clone()).collect::<Vec<_>>()})))
        .collect::<serde_json::Map<_, _>>()
        .into()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// retired is terminal; enabling it again is refused
    #[test]
    fn retired_is_terminal() {
        let mut c = FileCredentials::default();
        create_user(&mut c, "u", AuthMethod::ApiKey, UserFields::default()).unwrap();
        set_status(&mut c, "u", Status::Inactive).unwrap();
        set_status(&mut c, "u", Status::Active).unwrap();
        set_status(&mut c, "u", Status::Retired).unwrap();
        let e = set_status(&mut c, "u", Status::Active).unwrap_err().to_string();
        assert!(e.contains("cannot be re-activated"), "{e}");
        assert!(add_key(&mut c, "u", "x", None, || unreachable!()).is_err());
    }

    /// a role held by a user cannot be deleted
    #[test]
    fn role_in_use_is_kept() {
        let mut c = FileCredentials::default();
        set_role(&mut c, "r", String::new(), vec!["GET /**".into()]).unwrap();
        create_user(
            &mut c,
            "u",
            AuthMethod::ApiKey,
            UserFields { roles: Some(vec!["r".into()]), ..Default::default() },
        )
        .unwrap();
        assert!(delete_role(&mut c, "r").unwrap_err().to_string().contains("still held by: u"));
        delete_user(&mut c, "u").unwrap();
        delete_role(&mut c, "r").unwrap();
    }

    /// a key view never contains the digest or the sealed secret
    #[test]
    fn key_view_has_no_secret_material() {
        let mut c = FileCredentials::default();
        create_user(&mut c, "u", AuthMethod::ApiKey, UserFields::default()).unwrap();
        let (view, token) = add_key(&mut c, "u", "main", None, || unreachable!()).unwrap();
        let text = view.to_string();
        let digest = c.users[0].keys[0].token_sha256.clone().unwrap();
        assert!(!text.contains(token.expose()) && !text.contains(&digest), "{text}");
        assert!(text.contains("ghk_…"), "{text}");
    }
}
