//! The serde shape of `credentials.yaml` (docs/concepts.md), read and written.
//!
//! `Spanned` fields keep their line for validation messages and serialise as plain
//! values, so the same structs are used by the CLI and admin API to write the file.

use serde::{Deserialize, Serialize};
use serde_saphyr::Spanned;
use std::collections::BTreeMap;
use time::OffsetDateTime;

#[derive(Debug, Default, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FileCredentials {
    #[serde(default)]
    pub roles: BTreeMap<String, FileRole>,
    #[serde(default)]
    pub users: Vec<FileUser>,
}

#[derive(Debug, Default, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FileRole {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
    #[serde(default)]
    pub rules: Vec<Spanned<String>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Active,
    Inactive,
    Retired,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AuthMethod {
    ApiKey,
    Hmac,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FileRateLimit {
    pub per_second: u32,
    pub burst: u32,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FileUser {
    pub id: Spanned<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub display_name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub organization: String,
    #[serde(default)]
    pub teams: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_team: Option<String>,
    #[serde(default)]
    pub roles: Vec<Spanned<String>>,
    pub status: Status,
    pub auth_method: AuthMethod,
    #[serde(default)]
    pub allowed_endpoints: Vec<Spanned<String>>,
    #[serde(default)]
    pub allow_proxied_users: bool,
    #[serde(default)]
    pub allowed_proxied_users: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<Spanned<FileRateLimit>>,
    #[serde(default)]
    pub keys: Vec<FileKey>,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
}

impl FileUser {
    /// A new active user with nothing but its id and auth method, created and updated `now`.
    pub fn new(id: &str, auth_method: AuthMethod, now: OffsetDateTime) -> FileUser {
        FileUser {
            id: spanned(id.to_string()),
            display_name: String::new(),
            description: String::new(),
            organization: String::new(),
            teams: vec![],
            default_team: None,
            roles: vec![],
            status: Status::Active,
            auth_method,
            allowed_endpoints: vec![],
            allow_proxied_users: false,
            allowed_proxied_users: vec![],
            rate_limit: None,
            keys: vec![],
            created_at: now,
            updated_at: now,
        }
    }
}

/// A value made in code rather than read from a file (it has no location).
pub fn spanned<T>(v: T) -> Spanned<T> {
    Spanned::new(v, serde_saphyr::Location::UNKNOWN, serde_saphyr::Location::UNKNOWN)
}

/// One key. Exactly one of `token_sha256` (api_key users) and `secret_sealed` (hmac
/// users) is set; validation checks it matches the user's `auth_method`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FileKey {
    pub id: Spanned<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub label: String,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(default, with = "time::serde::rfc3339::option", skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<OffsetDateTime>,
    #[serde(default, with = "time::serde::rfc3339::option", skip_serializing_if = "Option::is_none")]
    pub revoked_at: Option<OffsetDateTime>,
    /// Hex SHA-256 of the token (api_key keys).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_sha256: Option<String>,
    /// `ghk_…abcd`: what listings show (api_key keys).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
    /// The signing secret sealed with the master key (hmac keys).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_sealed: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<FileRateLimit>,
}

impl FileKey {
    /// A key with no credential yet, never expiring, not revoked.
    pub fn new(id: String, label: String, created_at: OffsetDateTime) -> FileKey {
        FileKey {
            id: spanned(id),
            label,
            created_at,
            expires_at: None,
            revoked_at: None,
            token_sha256: None,
            hint: None,
            secret_sealed: None,
            rate_limit: None,
        }
    }
}
