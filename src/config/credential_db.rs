//! `credentials: postgres://…` — API users kept in a PostgreSQL database shared by every
//! gateway (docs/credential-database.md) instead of a file.

use super::env::Env;
use super::shared_state::redact_url;
use std::fmt;

/// A password that never prints.
#[derive(Clone, PartialEq, Eq)]
pub struct DbPassword(pub String);

impl fmt::Debug for DbPassword {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DbPassword(<redacted>)")
    }
}

/// The validated database settings.
#[derive(Debug, Clone)]
pub struct CredentialDbConfig {
    /// The URL as configured (it may hold a password: print [`CredentialDbConfig::describe`]).
    pub url: String,
    /// From `credentials_password_env`; overrides a password in the URL.
    pub password: Option<DbPassword>,
    /// `credentials_auto_migrate: true`: `serve` applies pending schema migrations at
    /// start-up (under an advisory lock, so gateways starting together migrate once).
    pub auto_migrate: bool,
}

impl CredentialDbConfig {
    /// The URL for logs and errors: without its password.
    pub fn describe(&self) -> String {
        redact_url(&self.url)
    }
}

/// Whether a `credentials:` value names a database rather than a file.
pub fn is_database_url(v: &str) -> bool {
    v.starts_with("postgres://") || v.starts_with("postgresql://")
}

/// Validates the database settings; problems go to `at`.
pub(super) fn validate(
    url: String,
    password_env: Option<serde_saphyr::Spanned<String>>,
    auto_migrate: bool,
    env: &dyn Env,
    at: &mut dyn FnMut(&serde_saphyr::Location, String),
    url_at: &serde_saphyr::Location,
) -> CredentialDbConfig {
    if let Err(e) = url.parse::<tokio_postgres::Config>() {
        // The driver's message never repeats the URL (and so never its password).
        at(url_at, format!("credentials: {:?} is not a usable PostgreSQL URL: {e}", redact_url(&url)));
    } else if let Some(mode) = query_param(&url, "sslmode")
        && mode != "disable"
        && mode != "prefer"
    {
        at(
            url_at,
            format!(
                "credentials: sslmode={mode} is not supported yet (TLS to the database is planned, docs/planned.md); \
                 use sslmode=disable on a trusted network"
            ),
        );
    }
    let password = password_env.and_then(|name| match env.var(&name.value) {
        Some(p) if !p.is_empty() => Some(DbPassword(p)),
        _ => {
            at(&name.referenced, format!("credentials_password_env: environment variable {} is not set", name.value));
            None
        }
    });
    CredentialDbConfig { url, password, auto_migrate }
}

fn query_param<'a>(url: &'a str, key: &str) -> Option<&'a str> {
    let (_, query) = url.split_once('?')?;
    query.split('&').find_map(|kv| kv.strip_prefix(key).and_then(|v| v.strip_prefix('=')))
}
