//! The serde shape of `gatehouse.yaml`, exactly as written by operators.
//!
//! Unknown fields are rejected everywhere (a typo must not silently fall back to a
//! default). Values that need checking across fields are wrapped in `Spanned` so that
//! `validate` can still point at their line.

use super::units::{Dur, Size};
use serde::Deserialize;
use serde_saphyr::Spanned;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub listeners: Vec<FileListener>,
    #[serde(default)]
    pub admin: Option<FileAdmin>,
    /// A file path, or a `postgres://` URL (the credential database).
    #[serde(default)]
    pub credentials: Option<Spanned<String>>,
    /// The database password's environment variable (with a `postgres://` URL).
    #[serde(default)]
    pub credentials_password_env: Option<Spanned<String>>,
    /// A file holding the database password (with a `postgres://` URL).
    #[serde(default)]
    pub credentials_password_file: Option<Spanned<PathBuf>>,
    /// Apply pending schema migrations at start-up (with a `postgres://` URL).
    #[serde(default)]
    pub credentials_auto_migrate: Option<Spanned<bool>>,
    #[serde(default)]
    pub master_key: Option<PathBuf>,
    /// Where per-key usage is persisted (default: beside the credentials file).
    #[serde(default)]
    pub usage_state: Option<PathBuf>,
    #[serde(default)]
    pub audit_log: Option<String>,
    #[serde(default)]
    pub auth: FileAuth,
    #[serde(default)]
    pub rate_limit: Option<FileRateLimit>,
    #[serde(default)]
    pub limits: FileLimits,
    #[serde(default)]
    pub trusted_proxies: Vec<Spanned<String>>,
    #[serde(default)]
    pub identity_headers: Option<Spanned<FileIdentityHeaders>>,
    #[serde(default)]
    pub metrics: FileMetrics,
    /// Redis shared by several gateways; absent: per-process state.
    #[serde(default)]
    pub shared_state: Option<Spanned<super::shared_state::FileSharedState>>,
    pub routes: Vec<FileRoute>,
}

/// `metrics:`: what the Prometheus metrics break down by.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileMetrics {
    /// How many API users get series of their own (a `user` label); 0: no `user` label.
    #[serde(default)]
    pub per_user_series: usize,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileListener {
    pub address: SocketAddr,
    /// Label for logs and metrics; defaults to the address.
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub tls: Option<Spanned<FileTls>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileTls {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileAdmin {
    pub address: SocketAddr,
    #[serde(default)]
    pub token_env: Option<String>,
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    #[serde(default)]
    pub failed_per_ip_per_minute: Option<u32>,
    #[serde(default)]
    pub session_idle: Option<Dur>,
    #[serde(default)]
    pub session_lifetime: Option<Dur>,
    #[serde(default)]
    pub key_rotation_age: Option<Dur>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileAuth {
    #[serde(default)]
    pub hmac: FileHmac,
    /// Failed authentications allowed per client IP per minute.
    #[serde(default)]
    pub failed_per_ip_per_minute: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileHmac {
    #[serde(default)]
    pub max_skew: Option<Dur>,
    #[serde(default)]
    pub replay_protection: Option<bool>,
    #[serde(default)]
    pub max_body: Option<Size>,
    #[serde(default)]
    pub replay_cache_entries: Option<usize>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileRateLimit {
    pub per_second: Spanned<u32>,
    pub burst: Spanned<u32>,
}

/// Abuse limits on the client side. Every field has a production default.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileLimits {
    #[serde(default)]
    pub max_connections: Option<Spanned<usize>>,
    #[serde(default)]
    pub header_read_timeout: Option<Dur>,
    #[serde(default)]
    pub idle_timeout: Option<Dur>,
    #[serde(default)]
    pub tunnel_idle_timeout: Option<Dur>,
    #[serde(default)]
    pub tls_handshake_timeout: Option<Dur>,
    #[serde(default)]
    pub max_header_bytes: Option<Spanned<Size>>,
    #[serde(default)]
    pub max_headers: Option<usize>,
    #[serde(default)]
    pub max_request_body: Option<Size>,
    #[serde(default)]
    pub h2_max_concurrent_streams: Option<u32>,
    #[serde(default)]
    pub upstream_connect_timeout: Option<Dur>,
    #[serde(default)]
    pub shutdown_grace: Option<Dur>,
}

/// Names of the identity headers sent upstream; each defaults to the documented one (docs/identity-headers.md).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileIdentityHeaders {
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub key_id: Option<String>,
    #[serde(default)]
    pub org: Option<String>,
    #[serde(default)]
    pub teams: Option<String>,
    #[serde(default)]
    pub roles: Option<String>,
    #[serde(default)]
    pub proxied_user: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileRoute {
    pub name: Spanned<String>,
    pub path_prefix: Spanned<String>,
    #[serde(default)]
    pub host: Option<Spanned<String>>,
    pub upstream: Spanned<OneOrMany>,
    #[serde(default)]
    pub allow_anonymous: bool,
    #[serde(default)]
    pub forward_credentials: bool,
    #[serde(default)]
    pub timeout: Option<Dur>,
    #[serde(default)]
    pub set_headers: BTreeMap<String, Spanned<String>>,
    /// Remove `path_prefix` from the path before the upstream's base path is put in front.
    #[serde(default)]
    pub strip_prefix: bool,
    #[serde(default)]
    pub upstream_tls: Option<Spanned<FileUpstreamTls>>,
    #[serde(default)]
    pub health_check: Option<Spanned<FileHealthCheck>>,
    /// `round_robin` (default) or `least_requests`.
    #[serde(default)]
    pub balance: Option<Spanned<String>>,
    /// `http1` (default) or `h2` (with `https://`: HTTP/2 by ALPN).
    #[serde(default)]
    pub upstream_protocol: Option<Spanned<String>>,
}

/// Active health checks of a route's targets.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileHealthCheck {
    pub path: String,
    #[serde(default)]
    pub interval: Option<Dur>,
    #[serde(default)]
    pub timeout: Option<Dur>,
    /// Consecutive good checks that make an unhealthy target healthy again.
    #[serde(default)]
    pub healthy: Option<u32>,
    /// Consecutive failed checks that make a target unhealthy.
    #[serde(default)]
    pub unhealthy: Option<u32>,
}

/// How an `https://` upstream is verified, and the client certificate it is shown.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileUpstreamTls {
    /// PEM bundle of the CAs trusted for this route instead of the system's roots.
    #[serde(default)]
    pub ca: Option<PathBuf>,
    /// The name the certificate must carry (and SNI), instead of the upstream's host.
    #[serde(default)]
    pub server_name: Option<String>,
    #[serde(default)]
    pub client_cert: Option<PathBuf>,
    #[serde(default)]
    pub client_key: Option<PathBuf>,
}

/// `upstream: http://a` or `upstream: [http://a, http://b]`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    pub fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        }
    }
}
