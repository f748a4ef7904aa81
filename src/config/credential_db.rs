//! `credentials: postgres://…` — API users kept in a PostgreSQL database shared by every
//! gateway (docs/credential-database.md) instead of a file.

use super::env::Env;
use super::shared_state::redact_url;
use std::fmt;
use std::path::PathBuf;

/// A password that never prints.
#[derive(Clone, PartialEq, Eq)]
pub struct DbPassword(pub String);

impl fmt::Debug for DbPassword {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DbPassword(<redacted>)")
    }
}

/// How the connection to the database is protected (`sslmode=` in the URL).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DbTls {
    /// `sslmode=disable`: plain TCP (a trusted network only).
    Disable,
    /// `sslmode=require`, `verify-ca` or `verify-full`: TLS 1.2+, the server's certificate
    /// verified (chain and name) against `sslrootcert=` or the system's roots. Stricter
    /// than libpq's `require`, which verifies nothing: Gatehouse never sends its
    /// password to a server it has not verified.
    Verify { ca: Option<PathBuf> },
}

/// The validated database settings.
#[derive(Debug, Clone)]
pub struct CredentialDbConfig {
    /// The URL without `sslmode` and `sslrootcert` (it may hold a password: print
    /// [`CredentialDbConfig::describe`]).
    pub url: String,
    pub tls: DbTls,
    /// From `credentials_password_env` or `credentials_password_file`; overrides a
    /// password in the URL.
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
    password_file: Option<serde_saphyr::Spanned<PathBuf>>,
    auto_migrate: bool,
    env: &dyn Env,
    at: &mut dyn FnMut(&serde_saphyr::Location, String),
    url_at: &serde_saphyr::Location,
) -> CredentialDbConfig {
    // sslmode and sslrootcert are read here: the driver knows neither verify-* nor
    // sslrootcert, and its own `require` would not verify the server.
    let (url, mode, root) = take_tls_params(&url);
    let tls = match mode.as_deref() {
        None => {
            at(url_at, "credentials: the URL needs sslmode=disable (a trusted network) or sslmode=verify-full (TLS, server verified)".into());
            DbTls::Disable
        }
        Some("disable") => DbTls::Disable,
        Some("require" | "verify-ca" | "verify-full") => DbTls::Verify { ca: root.map(PathBuf::from) },
        Some(other) => {
            at(
                url_at,
                format!(
                    "credentials: sslmode={other} is not supported: use disable (a trusted network) or verify-full (TLS, server verified; `prefer` could fall back to plain text)"
                ),
            );
            DbTls::Disable
        }
    };
    if let DbTls::Verify { ca: Some(ca) } = &tls
        && let Err(e) = std::fs::metadata(ca)
    {
        at(url_at, format!("credentials: sslrootcert {}: {e}", ca.display()));
    }
    if let Err(e) = url.parse::<tokio_postgres::Config>() {
        // The driver's message never repeats the URL (and so never its password).
        at(url_at, format!("credentials: {:?} is not a usable PostgreSQL URL: {e}", redact_url(&url)));
    }
    if let (Some(_), Some(file)) = (&password_env, &password_file) {
        at(&file.referenced, "set credentials_password_env or credentials_password_file, not both".into());
    }
    let from_env = password_env.and_then(|name| match env.var(&name.value) {
        Some(p) if !p.is_empty() => Some(DbPassword(p)),
        _ => {
            at(&name.referenced, format!("credentials_password_env: environment variable {} is not set", name.value));
            None
        }
    });
    // A mounted Secret file: its content, without the line break editors and
    // `kubectl create secret --from-file` leave at the end.
    let from_file = password_file.and_then(|f| match std::fs::read_to_string(&f.value) {
        Ok(text) if !text.trim_end_matches(['\r', '\n']).is_empty() => {
            Some(DbPassword(text.trim_end_matches(['\r', '\n']).to_string()))
        }
        Ok(_) => {
            at(&f.referenced, format!("credentials_password_file: {} is empty", f.value.display()));
            None
        }
        Err(e) => {
            at(&f.referenced, format!("credentials_password_file: cannot read {}: {e}", f.value.display()));
            None
        }
    });
    let password = from_env.or(from_file);
    CredentialDbConfig { url, tls, password, auto_migrate }
}

/// The URL without its `sslmode` and `sslrootcert` parameters, and their values.
fn take_tls_params(url: &str) -> (String, Option<String>, Option<String>) {
    let Some((base, query)) = url.split_once('?') else { return (url.to_string(), None, None) };
    let (mut mode, mut root, mut rest) = (None, None, Vec::new());
    for kv in query.split('&').filter(|kv| !kv.is_empty()) {
        match kv.split_once('=') {
            Some(("sslmode", v)) => mode = Some(v.to_string()),
            Some(("sslrootcert", v)) => {
                root = Some(percent_encoding::percent_decode_str(v).decode_utf8_lossy().into_owned());
            }
            _ => rest.push(kv),
        }
    }
    let url = if rest.is_empty() { base.to_string() } else { format!("{base}?{}", rest.join("&")) };
    (url, mode, root)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// sslmode and sslrootcert leave the URL; other parameters stay
    #[test]
    fn tls_parameters_are_taken_out_of_the_url() {
        let (u, m, r) =
            take_tls_params("postgres://u:p@h:5/db?connect_timeout=3&sslmode=verify-full&sslrootcert=%2Fetc%2Fca.pem");
        assert_eq!(
            (u.as_str(), m.as_deref(), r.as_deref()),
            ("postgres://u:p@h:5/db?connect_timeout=3", Some("verify-full"), Some("/etc/ca.pem"))
        );
        let (u, m, r) = take_tls_params("postgres://h/db?sslmode=disable");
        assert_eq!((u.as_str(), m.as_deref(), r), ("postgres://h/db", Some("disable"), None));
        assert_eq!(take_tls_params("postgres://h/db").1, None);
    }
}
