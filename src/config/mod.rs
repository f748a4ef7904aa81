//! `gatehouse.yaml`: `file.rs` (serde shape) → `validate.rs` → [`Config`] (runtime types
//! that cannot hold a bad value).
//!
//! Every problem carries the file, line, column and reason, and `check-config` prints
//! all of them at once. Relative paths in the file are resolved against the working
//! directory of the process (as the examples in `config/` assume).

pub mod env;
mod file;
pub mod credential_db;
pub mod shared_state;
pub mod units;

use crate::wire::balance::{Balance, Protocol};
use file::{FileConfig, FileRoute};
use http::{HeaderName, HeaderValue, Uri};
use ipnet::IpNet;
use serde_saphyr::Location;
use std::collections::HashSet;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use env::{Env, ProcessEnv};

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub path: PathBuf,
    pub listeners: Vec<ListenerConfig>,
    pub admin: Option<AdminConfig>,
    /// The credentials file (`None` with a database or no credentials at all).
    pub credentials: Option<PathBuf>,
    /// `credentials: postgres://…`: API users in PostgreSQL.
    pub credential_db: Option<credential_db::CredentialDbConfig>,
    pub master_key: PathBuf,
    /// Where per-key usage is persisted: `usage_state`, else `<credentials>.usage.json`;
    /// none without a credentials file.
    pub usage_state: Option<PathBuf>,
    pub audit_log: AuditSink,
    pub auth: AuthConfig,
    pub rate_limit: RateLimitConfig,
    pub limits: Limits,
    pub trusted_proxies: Vec<IpNet>,
    pub identity_headers: IdentityHeaders,
    /// API users with series of their own in the metrics (`user` label); 0: none, no label.
    pub metrics_per_user_series: usize,
    /// `shared_state:`; `None`: replay records, limits and usage are per process.
    pub shared_state: Option<shared_state::SharedStateConfig>,
    pub routes: Vec<RouteConfig>,
}

/// The names of the identity headers Gatehouse sets upstream (docs/identity-headers.md by default).
/// Client-sent copies of each, in any spelling, are removed on every route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityHeaders {
    pub user: HeaderName,
    pub key_id: HeaderName,
    pub org: HeaderName,
    pub teams: HeaderName,
    pub roles: HeaderName,
    pub proxied_user: HeaderName,
}

impl Default for IdentityHeaders {
    fn default() -> Self {
        use crate::wire::headers::*;
        IdentityHeaders {
            user: X_GATEHOUSE_USER,
            key_id: X_GATEHOUSE_KEY_ID,
            org: X_GATEHOUSE_ORG,
            teams: X_GATEHOUSE_TEAMS,
            roles: X_GATEHOUSE_ROLES,
            proxied_user: X_GATEHOUSE_PROXIED_USER,
        }
    }
}

impl IdentityHeaders {
    /// All six names.
    pub fn all(&self) -> [&HeaderName; 6] {
        [&self.user, &self.key_id, &self.org, &self.teams, &self.roles, &self.proxied_user]
    }
}

#[derive(Debug, Clone)]
pub struct ListenerConfig {
    pub address: SocketAddr,
    pub name: String,
    pub tls: Option<TlsFiles>,
}

/// `health_check:` of a route: `GET path` on each target every `interval`; a 2xx or 3xx
/// within `timeout` is good.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheckConfig {
    /// Origin-form path (and query) requested.
    pub path: http::uri::PathAndQuery,
    pub interval: Duration,
    pub timeout: Duration,
    /// Consecutive good checks that bring an unhealthy target back.
    pub healthy: u32,
    /// Consecutive failed checks that take a target out.
    pub unhealthy: u32,
}

/// How a route's `https://` targets are verified (`upstream_tls:`; all defaults when absent).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UpstreamTlsConfig {
    /// The CAs trusted instead of the system's roots.
    pub ca: Option<PathBuf>,
    /// The name every target's certificate must carry, and the SNI sent.
    pub server_name: Option<String>,
    /// The client certificate shown to an upstream that asks (mTLS).
    pub client: Option<TlsFiles>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone)]
pub struct AdminConfig {
    pub address: SocketAddr,
    pub token_env: Option<String>,
    pub token_file: Option<PathBuf>,
    /// Failed admin authentications (API and console sign-in) per client IP per minute.
    pub failed_per_ip_per_minute: u32,
    /// A console session ends after this long without a request…
    pub session_idle: Duration,
    /// …and this long after sign-in, whatever its use.
    pub session_lifetime: Duration,
    /// Keys older than this are listed on the console's overview as due for rotation.
    pub key_rotation_age: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuditSink {
    Stdout,
    File(PathBuf),
}

#[derive(Debug, Clone)]
pub struct AuthConfig {
    pub max_skew: Duration,
    pub replay_protection: bool,
    pub hmac_max_body: u64,
    /// Signatures the replay cache holds at most (all keys together).
    pub replay_cache_entries: usize,
    /// Failed authentications allowed per client IP per minute.
    pub failed_per_ip_per_minute: u32,
}

#[derive(Debug, Clone, Copy)]
pub struct RateLimitConfig {
    pub per_second: u32,
    pub burst: u32,
}

impl RateLimitConfig {
    /// The per-key rate when the config names none (docs/configuration.md).
    pub const DEFAULT: RateLimitConfig = RateLimitConfig { per_second: 50, burst: 100 };
}

/// Client-side abuse limits (docs/configuration.md).
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_connections: usize,
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
    /// An upgraded connection (WebSocket) with no byte either way for this long is
    /// closed; `idle_timeout` unless set.
    pub tunnel_idle_timeout: Duration,
    pub tls_handshake_timeout: Duration,
    pub max_header_bytes: usize,
    pub max_headers: usize,
    pub max_request_body: u64,
    pub h2_max_concurrent_streams: u32,
    pub upstream_connect_timeout: Duration,
    pub shutdown_grace: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 10_000,
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            tunnel_idle_timeout: Duration::from_secs(60),
            tls_handshake_timeout: Duration::from_secs(10),
            max_header_bytes: 64 * 1024,
            max_headers: 100,
            max_request_body: 1 << 30,
            h2_max_concurrent_streams: 128,
            upstream_connect_timeout: Duration::from_secs(5),
            shutdown_grace: Duration::from_secs(30),
        }
    }
}

#[derive(Debug, Clone)]
pub struct RouteConfig {
    pub name: String,
    /// Lower-case host without port.
    pub host: Option<String>,
    pub path_prefix: String,
    /// `http://`, `https://` or `h2c://` targets, all of one scheme and one base path.
    pub upstreams: Vec<Uri>,
    /// The targets' base path without its trailing `/` (`""`: none): put in front of
    /// every path the upstream receives.
    pub base_path: String,
    /// `path_prefix` is removed from the path before the base path is put in front.
    pub strip_prefix: bool,
    /// `Some` when the targets are `https://`: how they are verified.
    pub upstream_tls: Option<UpstreamTlsConfig>,
    /// Active health checks of the targets (none: only passive ejection).
    pub health_check: Option<HealthCheckConfig>,
    pub balance: Balance,
    /// HTTP/1.1, or HTTP/2 (`h2c://`, or `https://` with `upstream_protocol: h2`).
    pub protocol: Protocol,
    pub allow_anonymous: bool,
    pub forward_credentials: bool,
    pub timeout: Duration,
    pub set_headers: Vec<(HeaderName, HeaderValue)>,
}

impl RouteConfig {
    /// A route with only the essentials set and every other field at its config default
    /// (no base path, no stripping, plain HTTP/1.1, round robin, no health checks, no
    /// anonymous access, no headers): what a unit test or a bench needs.
    pub fn plain(name: &str, host: Option<&str>, path_prefix: &str, upstreams: Vec<Uri>, timeout: Duration) -> Self {
        RouteConfig {
            name: name.into(),
            host: host.map(str::to_string),
            path_prefix: path_prefix.into(),
            upstreams,
            base_path: String::new(),
            strip_prefix: false,
            upstream_tls: None,
            health_check: None,
            balance: Balance::default(),
            protocol: Protocol::default(),
            allow_anonymous: false,
            forward_credentials: false,
            timeout,
            set_headers: vec![],
        }
    }
}

/// One problem in a config file, with where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub line: u64,
    pub column: u64,
    pub message: String,
}

/// Every problem found in one file.
#[derive(Debug)]
pub struct ConfigErrors {
    pub file: PathBuf,
    pub problems: Vec<Problem>,
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            if p.line > 0 {
                write!(f, "{}:{}:{}: {}", self.file.display(), p.line, p.column, p.message)?;
            } else {
                write!(f, "{}: {}", self.file.display(), p.message)?;
            }
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// Converts a serde-saphyr error into a located problem.
pub(crate) fn yaml_problem(e: &serde_saphyr::Error) -> Problem {
    let (line, column) = e.location().map_or((0, 0), |l| (l.line(), l.column()));
    let mut message = e.without_snippet().to_string();
    // The location is printed in front already; drop the parser's own copy of it.
    if let Some(i) = message.rfind(" at line ")
        && message[i..].contains(", column ")
    {
        message.truncate(i);
    }
    Problem { line, column, message }
}

/// Reads a small text file, refusing an empty one.
pub(crate) fn read_text(path: &Path) -> Result<String, ConfigErrors> {
    let fail = |message: String| ConfigErrors {
        file: path.to_path_buf(),
        problems: vec![Problem { line: 0, column: 0, message }],
    };
    let text = std::fs::read_to_string(path).map_err(|e| fail(format!("cannot read: {e}")))?;
    if text.trim().is_empty() {
        return Err(fail("file is empty".into()));
    }
    Ok(text)
}

impl Config {
    /// Reads and validates `path`, expanding `${VAR}` from the process environment.
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        Self::load_with_env(path, &ProcessEnv)
    }

    /// Reads and validates `path` with `${VAR}` values from `env`.
    pub fn load_with_env(path: &Path, env: &dyn Env) -> Result<Config, ConfigErrors> {
        let text = read_text(path)?;
        Self::parse(path, &text, env)
    }

    /// Validates config text; `path` is only used for messages and the result.
    pub fn parse(path: &Path, text: &str, env: &dyn Env) -> Result<Config, ConfigErrors> {
        let file: FileConfig = serde_saphyr::from_str(text)
            .map_err(|e| ConfigErrors { file: path.to_path_buf(), problems: vec![yaml_problem(&e)] })?;
        let mut v = Validator { problems: Vec::new() };
        let config = v.config(path, file, env);
        if v.problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigErrors { file: path.to_path_buf(), problems: v.problems })
        }
    }
}

/// Collects problems instead of stopping at the first, so `check-config` shows them all.
struct Validator {
    problems: Vec<Problem>,
}

impl Validator {
    fn at(&mut self, loc: &Location, message: impl Into<String>) {
        self.problems.push(Problem { line: loc.line(), column: loc.column(), message: message.into() });
    }

    fn config(&mut self, path: &Path, f: FileConfig, env: &dyn Env) -> Config {
        if f.listeners.is_empty() {
            self.problems.push(Problem { line: 0, column: 0, message: "at least one listener is required".into() });
        }
        let mut seen_addrs = HashSet::new();
        let listeners = f
            .listeners
            .into_iter()
            .map(|l| {
                if !seen_addrs.insert(l.address) && l.address.port() != 0 {
                    self.problems.push(Problem {
                        line: 0,
                        column: 0,
                        message: format!("listener address {} is listed twice", l.address),
                    });
                }
                let tls = l.tls.map(|t| {
                    for p in [&t.value.cert, &t.value.key] {
                        if let Err(e) = std::fs::metadata(p) {
                            self.at(&t.referenced, format!("cannot read TLS file {}: {e}", p.display()));
                        }
                    }
                    TlsFiles { cert: t.value.cert, key: t.value.key }
                });
                ListenerConfig { name: l.name.unwrap_or_else(|| l.address.to_string()), address: l.address, tls }
            })
            .collect();

        let admin = f.admin.map(|a| AdminConfig {
            address: a.address,
            token_env: a.token_env,
            token_file: a.token_file,
            failed_per_ip_per_minute: a.failed_per_ip_per_minute.unwrap_or(5).max(1),
            session_idle: a.session_idle.map_or(Duration::from_secs(30 * 60), |d| d.0),
            session_lifetime: a.session_lifetime.map_or(Duration::from_secs(12 * 3600), |d| d.0),
            key_rotation_age: a.key_rotation_age.map_or(Duration::from_secs(90 * 86_400), |d| d.0),
        });

        let (credentials, credential_db) = match f.credentials {
            Some(c) if credential_db::is_database_url(&c.value) => {
                let mut at = |loc: &Location, m: String| self.at(loc, m);
                let migrate = f.credentials_auto_migrate.is_some_and(|m| m.value);
                let db = credential_db::validate(
                    c.value,
                    f.credentials_password_env,
                    f.credentials_password_file,
                    migrate,
                    env,
                    &mut at,
                    &c.referenced,
                );
                (None, Some(db))
            }
            other => {
                for (set, name) in [
                    (f.credentials_password_env.as_ref().map(|s| s.referenced), "credentials_password_env"),
                    (f.credentials_password_file.as_ref().map(|s| s.referenced), "credentials_password_file"),
                    (f.credentials_auto_migrate.as_ref().map(|s| s.referenced), "credentials_auto_migrate"),
                ] {
                    if let Some(loc) = set {
                        self.at(&loc, format!("{name} applies only when credentials is a postgres:// URL"));
                    }
                }
                (other.map(|c| PathBuf::from(c.value)), None)
            }
        };
        // A read-only credentials mount (Kubernetes Secret) needs the state elsewhere; with a
        // database, usage is kept only where `usage_state` says (or in Redis).
        let usage_state = match &credentials {
            Some(c) => Some(f.usage_state.clone().unwrap_or_else(|| usage_state_path(c))),
            None => f.usage_state.clone(),
        };
        let audit_log = match f.audit_log.as_deref() {
            None | Some("stdout") | Some("-") => AuditSink::Stdout,
            Some(p) => AuditSink::File(PathBuf::from(p)),
        };
        let auth = AuthConfig {
            max_skew: f.auth.hmac.max_skew.map_or(Duration::from_secs(300), |d| d.0),
            replay_protection: f.auth.hmac.replay_protection.unwrap_or(true),
            hmac_max_body: f.auth.hmac.max_body.map_or(10 << 20, |s| s.0),
            replay_cache_entries: f.auth.hmac.replay_cache_entries.unwrap_or(1_000_000),
            failed_per_ip_per_minute: f.auth.failed_per_ip_per_minute.unwrap_or(60).max(1),
        };
        let rate_limit = match f.rate_limit {
            None => RateLimitConfig::DEFAULT,
            Some(r) => {
                if r.per_second.value == 0 {
                    self.at(&r.per_second.referenced, "rate_limit.per_second must be at least 1");
                }
                if r.burst.value == 0 {
                    self.at(&r.burst.referenced, "rate_limit.burst must be at least 1");
                }
                RateLimitConfig { per_second: r.per_second.value, burst: r.burst.value }
            }
        };
        let limits = self.limits(f.limits);
        let trusted_proxies = f
            .trusted_proxies
            .into_iter()
            .filter_map(|s| {
                let parsed = s.value.parse::<IpNet>().or_else(|_| s.value.parse::<std::net::IpAddr>().map(IpNet::from));
                parsed
                    .map_err(|_| {
                        self.at(&s.referenced, format!("invalid trusted proxy {:?}: expected an IP or CIDR", s.value))
                    })
                    .ok()
            })
            .collect();

        let shared_state = f.shared_state.and_then(|s| {
            let mut at = |loc: &Location, m: String| self.at(loc, m);
            shared_state::validate(s.value, env, &mut at, &s.referenced)
        });
        let identity_headers = f.identity_headers.map_or_else(IdentityHeaders::default, |h| self.identity(h));
        let mut names = HashSet::new();
        let mut keys = HashSet::new();
        let routes = f.routes.into_iter().filter_map(|r| self.route(r, env, &mut names, &mut keys)).collect();
        Config {
            path: path.to_path_buf(),
            listeners,
            admin,
            credentials,
            credential_db,
            master_key: f.master_key.unwrap_or_else(|| PathBuf::from("config/master.key")),
            usage_state,
            audit_log,
            auth,
            rate_limit,
            limits,
            trusted_proxies,
            identity_headers,
            metrics_per_user_series: f.metrics.per_user_series,
            shared_state,
            routes,
        }
    }

    fn identity(&mut self, h: serde_saphyr::Spanned<file::FileIdentityHeaders>) -> IdentityHeaders {
        let d = IdentityHeaders::default();
        let loc = h.referenced;
        let f = h.value;
        let mut name = |v: Option<String>, default: HeaderName| match v {
            None => default,
            Some(s) => match HeaderName::from_bytes(s.as_bytes()) {
                Ok(n)
                    if !crate::wire::headers::HOP_BY_HOP.contains(&n)
                        && crate::wire::headers::classify(n.as_str())
                            != crate::wire::headers::Protected::Credential =>
                {
                    n
                }
                _ => {
                    self.at(&loc, format!("identity_headers: {s:?} is not a usable header name"));
                    default
                }
            },
        };
        let out = IdentityHeaders {
            user: name(f.user, d.user),
            key_id: name(f.key_id, d.key_id),
            org: name(f.org, d.org),
            teams: name(f.teams, d.teams),
            roles: name(f.roles, d.roles),
            proxied_user: name(f.proxied_user, d.proxied_user),
        };
        let distinct: HashSet<&HeaderName> = out.all().into_iter().collect();
        if distinct.len() != 6 {
            self.at(&loc, "identity_headers: the six names must be different");
        }
        out
    }

    fn limits(&mut self, l: file::FileLimits) -> Limits {
        let d = Limits::default();
        let max_header_bytes = match l.max_header_bytes {
            None => d.max_header_bytes,
            Some(s) => {
                // hyper refuses buffers below 8 KiB and we never want one above 1 MiB.
                if !(8192..=1 << 20).contains(&s.value.0) {
                    self.at(&s.referenced, "limits.max_header_bytes must be between 8KiB and 1MiB");
                }
                s.value.0.clamp(8192, 1 << 20) as usize
            }
        };
        let max_connections = match l.max_connections {
            None => d.max_connections,
            Some(m) if m.value == 0 => {
                self.at(&m.referenced, "limits.max_connections must be at least 1");
                1
            }
            Some(m) => m.value,
        };
        Limits {
            max_connections,
            header_read_timeout: l.header_read_timeout.map_or(d.header_read_timeout, |x| x.0),
            idle_timeout: l.idle_timeout.map_or(d.idle_timeout, |x| x.0),
            tunnel_idle_timeout: l.tunnel_idle_timeout.or(l.idle_timeout).map_or(d.tunnel_idle_timeout, |x| x.0),
            tls_handshake_timeout: l.tls_handshake_timeout.map_or(d.tls_handshake_timeout, |x| x.0),
            max_header_bytes,
            max_headers: l.max_headers.unwrap_or(d.max_headers),
            max_request_body: l.max_request_body.map_or(d.max_request_body, |x| x.0),
            h2_max_concurrent_streams: l.h2_max_concurrent_streams.unwrap_or(d.h2_max_concurrent_streams),
            upstream_connect_timeout: l.upstream_connect_timeout.map_or(d.upstream_connect_timeout, |x| x.0),
            shutdown_grace: l.shutdown_grace.map_or(d.shutdown_grace, |x| x.0),
        }
    }

    /// `health_check:` with its defaults: every 5 s, 2 s to answer, 2 good checks to come
    /// back, 3 failed ones to go out.
    fn health_check(&mut self, h: serde_saphyr::Spanned<file::FileHealthCheck>) -> Option<HealthCheckConfig> {
        let at = h.referenced;
        let v = h.value;
        let path = match v.path.parse::<http::uri::PathAndQuery>() {
            Ok(p) if v.path.starts_with('/') => Some(p),
            _ => {
                self.at(&at, format!("health_check.path {:?} must be a path starting with '/'", v.path));
                None
            }
        };
        let interval = v.interval.map_or(Duration::from_secs(5), |d| d.0);
        let timeout = v.timeout.map_or(Duration::from_secs(2), |d| d.0);
        if interval < Duration::from_millis(10) || timeout.is_zero() {
            self.at(&at, "health_check: interval must be at least 10ms and timeout more than 0s");
        }
        let (healthy, unhealthy) = (v.healthy.unwrap_or(2), v.unhealthy.unwrap_or(3));
        if !(1..=100).contains(&healthy) || !(1..=100).contains(&unhealthy) {
            self.at(&at, "health_check: healthy and unhealthy are counts from 1 to 100");
        }
        let path = path?;
        Some(HealthCheckConfig { path, interval, timeout, healthy, unhealthy })
    }

    /// `upstream_tls:` with its files readable (their contents are checked where they
    /// are loaded, by `check-config` and at start) and the client pair complete.
    fn upstream_tls(&mut self, t: serde_saphyr::Spanned<file::FileUpstreamTls>) -> Option<UpstreamTlsConfig> {
        let before = self.problems.len();
        let v = t.value;
        for p in [&v.ca, &v.client_cert, &v.client_key].into_iter().flatten() {
            if let Err(e) = std::fs::metadata(p) {
                self.at(&t.referenced, format!("upstream_tls: cannot read {}: {e}", p.display()));
            }
        }
        let client = match (v.client_cert, v.client_key) {
            (Some(cert), Some(key)) => Some(TlsFiles { cert, key }),
            (None, None) => None,
            _ => {
                self.at(&t.referenced, "upstream_tls: client_cert and client_key go together");
                None
            }
        };
        if let Some(n) = &v.server_name
            && rustls::pki_types::ServerName::try_from(n.as_str()).is_err()
        {
            self.at(&t.referenced, format!("upstream_tls: server_name {n:?} is not a DNS name or IP address"));
        }
        (self.problems.len() == before).then_some(UpstreamTlsConfig { ca: v.ca, server_name: v.server_name, client })
    }

    fn route(
        &mut self,
        r: FileRoute,
        env: &dyn Env,
        names: &mut HashSet<String>,
        keys: &mut HashSet<(Option<String>, String)>,
    ) -> Option<RouteConfig> {
        let before = self.problems.len();
        let name = r.name.value.clone();
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c)) {
            self.at(&r.name.referenced, format!("route name {name:?} must be letters, digits, '_', '.' or '-'"));
        } else if !names.insert(name.clone()) {
            self.at(&r.name.referenced, format!("duplicate route name {name:?}"));
        }
        let prefix = r.path_prefix.value.clone();
        if !prefix.starts_with('/')
            || prefix.contains(['?', '#', '%', '\\'])
            || prefix.contains("/./")
            || prefix.contains("/../")
            || prefix.contains("//")
        {
            self.at(
                &r.path_prefix.referenced,
                format!("path_prefix {prefix:?} must be a normalised absolute path starting with '/'"),
            );
        }
        let host = r.host.map(|h| {
            let v = h.value.trim().to_ascii_lowercase();
            if v.is_empty() || v.contains(['/', ' ', '@']) || v.parse::<http::uri::Authority>().is_err() {
                self.at(&h.referenced, format!("invalid host {:?}", h.value));
            }
            v
        });
        if !keys.insert((host.clone(), prefix.clone())) {
            self.at(
                &r.path_prefix.referenced,
                format!("another route already has host {host:?} and path_prefix {prefix:?}"),
            );
        }
        let loc = r.upstream.referenced;
        let upstream_list = r.upstream.value.into_vec();
        if upstream_list.is_empty() {
            self.at(&loc, "upstream needs at least one URL");
        }
        let upstreams: Vec<Uri> = upstream_list
            .iter()
            .filter_map(|u| match parse_upstream(u) {
                Ok(uri) => Some(uri),
                Err(e) => {
                    self.at(&loc, e);
                    None
                }
            })
            .collect();
        // One route, one way of reaching it: the base path is applied before a target is
        // chosen, and TLS settings are the route's.
        let base_path = upstreams.first().map_or_else(String::new, base_path_of);
        let scheme = upstreams.first().and_then(Uri::scheme_str).unwrap_or("http").to_string();
        let https = scheme == "https";
        if upstreams.iter().any(|u| base_path_of(u) != base_path || u.scheme_str() != Some(scheme.as_str())) {
            self.at(&loc, "every upstream of a route must have the same scheme and the same base path");
        }
        let protocol = match (r.upstream_protocol.as_ref().map(|p| p.value.as_str()), scheme.as_str()) {
            (None, "h2c") | (Some("h2"), "h2c" | "https") => Protocol::H2,
            (None | Some("http1"), "http" | "https") => Protocol::Http1,
            (Some(p), _) => {
                let message = match p {
                    "h2" => {
                        "upstream_protocol: h2 needs https:// (h2 by ALPN) or h2c:// (HTTP/2 without TLS) upstreams"
                    }
                    "http1" => "upstream_protocol: http1 does not go with h2c:// upstreams",
                    _ => "upstream_protocol: use http1 or h2",
                };
                if let Some(at) = &r.upstream_protocol {
                    self.at(&at.referenced, message);
                }
                Protocol::Http1
            }
            (None, _) => Protocol::Http1,
        };
        let upstream_tls = match r.upstream_tls {
            Some(t) if !https => {
                self.at(&t.referenced, "upstream_tls needs https:// upstreams");
                None
            }
            Some(t) => self.upstream_tls(t),
            None => https.then(UpstreamTlsConfig::default),
        };
        let health_check = r.health_check.and_then(|h| self.health_check(h));
        let balance = match r.balance.as_ref().map(|b| b.value.as_str()) {
            None | Some("round_robin") => Balance::RoundRobin,
            Some("least_requests") => Balance::LeastRequests,
            Some(other) => {
                if let Some(b) = &r.balance {
                    self.at(&b.referenced, format!("balance {other:?}: use round_robin or least_requests"));
                }
                Balance::RoundRobin
            }
        };
        let timeout = r.timeout.map_or(Duration::from_secs(30), |d| d.0);
        if timeout.is_zero() {
            self.at(&loc, "route timeout must be more than 0s");
        }
        let mut set_headers = Vec::new();
        for (k, v) in r.set_headers {
            let name = match HeaderName::from_bytes(k.as_bytes()) {
                Ok(n) => n,
                Err(_) => {
                    self.at(&v.referenced, format!("invalid header name {k:?}"));
                    continue;
                }
            };
            // The gateway writes these itself (the target's Host, the one framing header,
            // the connection's own); a second copy from the route could split the request.
            if name == http::header::HOST
                || name == http::header::CONTENT_LENGTH
                || crate::wire::headers::HOP_BY_HOP.contains(&name)
            {
                self.at(&v.referenced, format!("set_headers.{k}: the gateway sets {name} itself; a route cannot"));
                continue;
            }
            match env::expand(&v.value, env) {
                // The value may hold a credential: never echo it in an error.
                Ok(val) => match HeaderValue::from_str(&val) {
                    Ok(mut hv) => {
                        hv.set_sensitive(true);
                        set_headers.push((name, hv));
                    }
                    Err(_) => self.at(&v.referenced, format!("set_headers.{k}: value is not a valid header value")),
                },
                Err(e) => self.at(&v.referenced, format!("set_headers.{k}: {e}")),
            }
        }
        (self.problems.len() == before).then_some(RouteConfig {
            name,
            host,
            path_prefix: prefix,
            upstreams,
            base_path,
            strip_prefix: r.strip_prefix,
            upstream_tls,
            health_check,
            balance,
            protocol,
            allow_anonymous: r.allow_anonymous,
            forward_credentials: r.forward_credentials,
            timeout,
            set_headers,
        })
    }
}

/// `http://host:port`, `https://host:port` or `h2c://host:port`, with an optional base path
/// (`http://legacy:8080/erp`): a normalised absolute path, no query, no user info.
fn parse_upstream(s: &str) -> Result<Uri, String> {
    let uri: Uri = s.parse().map_err(|e| format!("invalid upstream URL {s:?}: {e}"))?;
    match uri.scheme_str() {
        Some("http" | "https" | "h2c") => {}
        _ => return Err(format!("upstream {s:?} must start with http://, https:// or h2c://")),
    }
    match uri.authority() {
        None => return Err(format!("upstream {s:?} has no host")),
        Some(a) if a.host().is_empty() => return Err(format!("upstream {s:?} has no host")),
        Some(a) if a.as_str().contains('@') => {
            return Err(format!("upstream {s:?}: credentials in the URL are not supported; use set_headers"));
        }
        Some(_) => {}
    }
    if uri.query().is_some() {
        return Err(format!("upstream {s:?} must not have a query"));
    }
    let path = uri.path();
    let normalised = crate::wire::path::normalise(path).map_err(|_| format!("upstream {s:?}: invalid base path"))?;
    if normalised != path || path.contains(['%', ';']) || path.contains("//") {
        return Err(format!("upstream {s:?}: the base path must be a normalised path without escapes"));
    }
    Ok(uri)
}

/// The base path of a parsed upstream without its trailing `/` (`""` for none or `/`).
fn base_path_of(u: &Uri) -> String {
    u.path().trim_end_matches('/').to_string()
}

/// Parses a whole config from YAML text for tests.
#[cfg(test)]
fn parse_str(text: &str) -> Result<Config, ConfigErrors> {
    Config::parse(
        Path::new("test.yaml"),
        text,
        &std::collections::HashMap::from([("UP".to_string(), "tok".to_string())]),
    )
}

/// Where the usage state of a credentials file lives: `<name>.usage.json` beside it.
pub fn usage_state_path(credentials: &Path) -> PathBuf {
    let mut name = credentials.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(".usage.json");
    credentials.with_file_name(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "listeners:\n  - address: 127.0.0.1:0\nroutes:\n  - name: a\n    path_prefix: /api/\n    upstream: http://127.0.0.1:3000\n    timeout: 5s\n    set_headers: { Authorization: \"Bearer ${UP}\" }\n";

    /// the minimal shape validates, with defaults filled in
    #[test]
    fn minimal_config_validates() {
        let c = parse_str(GOOD).unwrap();
        assert_eq!(c.routes[0].timeout, Duration::from_secs(5));
        assert_eq!(c.routes[0].set_headers[0].1, "Bearer tok");
        assert_eq!(c.auth.max_skew, Duration::from_secs(300));
        assert_eq!(c.limits.max_connections, 10_000);
    }

    /// an unknown field is rejected with its line
    #[test]
    fn unknown_field_is_located() {
        let e = parse_str(&GOOD.replace("    timeout: 5s\n", "    timeout: 5s\n    timout: 5s\n")).unwrap_err();
        assert_eq!(e.problems.len(), 1);
        assert_eq!(e.problems[0].line, 8, "{e}");
        assert!(e.problems[0].message.contains("timout"), "{e}");
    }

    /// a bad duration names the value and its line
    #[test]
    fn bad_duration_is_located() {
        let e = parse_str(&GOOD.replace("timeout: 5s", "timeout: 5 parsecs")).unwrap_err();
        assert_eq!(e.problems[0].line, 7, "{e}");
        assert!(e.to_string().contains("invalid duration"), "{e}");
    }

    /// duplicate route names and an unset variable are both reported, each with its line
    #[test]
    fn all_validation_problems_are_reported() {
        let text = format!(
            "{GOOD}  - name: a\n    path_prefix: /b/\n    upstream: http://127.0.0.1:1\n    set_headers: {{ X: \"${{NOPE}}\" }}\n"
        );
        let e = parse_str(&text).unwrap_err();
        let msgs: Vec<_> = e.problems.iter().map(|p| (p.line, p.message.as_str())).collect();
        assert!(msgs.iter().any(|(l, m)| *l == 9 && m.contains("duplicate route name")), "{e}");
        assert!(msgs.iter().any(|(l, m)| *l == 12 && m.contains("NOPE is not set")), "{e}");
    }

    /// a route cannot set Host, the framing headers or hop-by-hop ones
    #[test]
    fn set_headers_the_gateway_owns_are_refused() {
        for name in ["Host", "content-length", "Transfer-Encoding", "Connection", "Upgrade", "TE"] {
            let e = parse_str(&GOOD.replace("Authorization:", &format!("{name}:"))).unwrap_err();
            assert!(e.to_string().contains("the gateway sets"), "{name}: {e}");
            assert_eq!(e.problems[0].line, 8, "{e}");
        }
    }

    /// https, a path, or no scheme on an upstream are refused
    #[test]
    fn upstream_urls_are_checked() {
        assert!(parse_upstream("http://10.0.0.1:80").is_ok());
        assert!(parse_upstream("http://10.0.0.1:80/").is_ok());
        assert!(parse_upstream("https://x").is_ok());
        assert_eq!(base_path_of(&parse_upstream("http://x/erp/v2/").unwrap()), "/erp/v2");
        assert_eq!(base_path_of(&parse_upstream("http://x").unwrap()), "");
        for bad in
            ["http://x/a/../b", "http://x/a/./b", "http://x/a%2fb", "http://x//a", "http://x/a?q=1", "http://u:p@x/"]
        {
            assert!(parse_upstream(bad).is_err(), "{bad}");
        }
        assert!(parse_upstream("h2c://x:50051").is_ok());
        assert!(parse_upstream("ftp://x").unwrap_err().contains("http://, https:// or h2c://"));
        assert!(parse_upstream("x:80").is_err());
    }

    /// a missing TLS file is reported at the listener
    #[test]
    fn unreadable_cert_is_reported() {
        let text = GOOD
            .replace("127.0.0.1:0\n", "127.0.0.1:0\n    tls: { cert: /nonexistent/c.pem, key: /nonexistent/k.pem }\n");
        let e = parse_str(&text).unwrap_err();
        assert!(e.problems[0].message.contains("cannot read TLS file /nonexistent/c.pem"), "{e}");
        assert_eq!(e.problems[0].line, 3, "{e}");
    }
}
