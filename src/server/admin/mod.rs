//! The admin listener (docs/admin.md): `/healthz`, `/readyz`, and `/admin/v1/…` behind a
//! bearer token, on its own address (127.0.0.1 in the examples). Admin paths are never
//! served on a proxy listener: this is a different service on a different socket.
//!
//! Without a token configured, `/admin/v1` is disabled (every call is 404 and a log line
//! says why) — never open.

mod api;
mod caller;
mod console;

use crate::config::{AdminConfig, Config};
use crate::credentials::reload::Credentials;
use crate::credentials::store::Store;
use crate::pipeline::audit::Audit;
use crate::pipeline::error::error_response;
use crate::pipeline::metrics::{Metrics, ScrapeState};
use crate::pipeline::request;
use crate::pipeline::usage::Usage;
use crate::wire::body::Body;
use http::{HeaderValue, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use sha2::{Digest, Sha256};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// What the admin handlers work on.
pub struct Admin {
    credentials: Arc<Credentials>,
    usage: Arc<Usage>,
    audit: Arc<Audit>,
    metrics: Arc<Metrics>,
    /// With `shared_state:`, where the fleet's usage is read.
    shared: Option<Arc<crate::shared::Shared>>,
    store: Option<Store>,
    /// SHA-256 of the bootstrap admin token (the environment's): compared in constant
    /// time, never kept in clear. `None`: the admin API is disabled.
    token_digest: Option<[u8; 32]>,
    /// Failed admin authentications per client address (see [`caller`]).
    failed: crate::pipeline::limit::RateLimits,
    /// The console's signed-in browsers.
    sessions: console::Sessions,
    /// The console overview's samples of the counters.
    traffic: console::Traffic,
    /// Whether the console may offer changes (the credentials file can be written).
    read_only: console::ReadOnlyProbe,
    /// Keys older than this are due for rotation (the console's overview).
    key_rotation_age: Duration,
    /// Where the console's examples send requests: the first proxy listener.
    example_base: String,
}

/// The address an admin request came from (set by the admin listener, read by the
/// handlers that record a change).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Peer(pub std::net::IpAddr);

/// `sha256:` and the first 8 hex digits of a token's SHA-256: enough to tell tokens apart
/// in the audit log, far too little to help guess one (the token has 32 bytes or more).
fn fingerprint(digest: &[u8; 32]) -> String {
    format!("sha256:{}", hex::encode(&digest[..4]))
}

impl std::fmt::Debug for Admin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admin").field("enabled", &self.token_digest.is_some()).finish_non_exhaustive()
    }
}

/// Shortest admin token accepted, in bytes (`openssl rand -hex 16` gives 32): the admin
/// token can do everything, and a short one can be guessed from the network.
const MIN_TOKEN_BYTES: usize = 32;

/// Tokens that the repository's examples carry: a gateway started with one of them would
/// accept a token anybody can read.
const PLACEHOLDER_TOKENS: &[&str] = &["replace-me-with-a-long-random-token"];

/// Reads the admin token from the environment variable or file the config names.
fn read_token(a: &AdminConfig) -> Result<Option<String>, String> {
    if let Some(var) = &a.token_env
        && let Ok(v) = std::env::var(var)
        && !v.trim().is_empty()
    {
        return usable_token(v.trim(), &format!("the admin token in ${var}")).map(Some);
    }
    if let Some(path) = &a.token_file {
        let t = std::fs::read_to_string(path).map_err(|e| format!("admin token file {}: {e}", path.display()))?;
        if !t.trim().is_empty() {
            return usable_token(t.trim(), &format!("the admin token in {}", path.display())).map(Some);
        }
    }
    Ok(None)
}

/// The token, unless it is a placeholder or too short. The message names where the token
/// came from, never the token.
fn usable_token(token: &str, source: &str) -> Result<String, String> {
    if PLACEHOLDER_TOKENS.iter().any(|p| token.eq_ignore_ascii_case(p)) {
        return Err(format!(
            "{source} is the placeholder of the example manifests; generate one: openssl rand -hex 32"
        ));
    }
    if token.len() < MIN_TOKEN_BYTES {
        return Err(format!(
            "{source} is {} bytes long; at least {MIN_TOKEN_BYTES} are required: openssl rand -hex 32",
            token.len()
        ));
    }
    Ok(token.to_string())
}

impl Admin {
    /// Builds the admin service for `config`.
    pub fn new(
        config: &Config,
        admin: &AdminConfig,
        credentials: Arc<Credentials>,
        usage: Arc<Usage>,
        audit: Arc<Audit>,
        metrics: Arc<Metrics>,
        shared: Option<Arc<crate::shared::Shared>>,
    ) -> Result<Admin, String> {
        let token = read_token(admin)?;
        if token.is_none() {
            tracing::warn!("admin API disabled: no admin token configured (admin.token_env or admin.token_file)");
        }
        let store = match credentials.follower() {
            Some(f) => Some(Store::database(f.database().clone(), None, config.master_key.clone(), config.rate_limit)),
            None => config.credentials.clone().map(|p| Store::new(p, config.master_key.clone(), config.rate_limit)),
        };
        let digest: Option<[u8; 32]> = token.map(|t| Sha256::digest(t.as_bytes()).into());
        // The overview's first sample: its "last hour" starts with the gateway.
        let traffic = console::Traffic::default();
        traffic.sample(&metrics);
        Ok(Admin {
            credentials,
            usage,
            audit,
            metrics,
            shared,
            store,
            token_digest: digest,
            failed: caller::failure_budget(admin.failed_per_ip_per_minute),
            sessions: console::Sessions::new(admin.session_idle, admin.session_lifetime),
            traffic,
            read_only: console::ReadOnlyProbe::default(),
            key_rotation_age: admin.key_rotation_age,
            example_base: example_base(None),
        })
    }

    /// Names the first proxy listener (as bound, and whether it is TLS) for the console's
    /// examples.
    pub fn with_proxy(self, proxy: Option<(SocketAddr, bool)>) -> Admin {
        Admin { example_base: example_base(proxy), ..self }
    }

    /// Serves one admin request.
    pub async fn handle(&self, req: Request<Incoming>) -> Response<Body> {
        let id = request::request_id(req.headers());
        let path = req.uri().path().to_string();
        let res = match (req.method().as_str(), path.as_str()) {
            ("GET", "/healthz") => json(StatusCode::OK, &serde_json::json!({"status": "ok"})),
            ("GET", "/readyz") => {
                let snap = self.credentials.snapshot();
                json(
                    StatusCode::OK,
                    &serde_json::json!({"status": "ready", "users": snap.user_count(), "keys": snap.key_count()}),
                )
            }
            ("GET", "/metrics") => {
                use std::sync::atomic::Ordering::Relaxed;
                let snap = self.credentials.snapshot();
                let c = &self.credentials;
                let text = self.metrics.render(ScrapeState {
                    reloads_ok: c.reloads_ok.load(Relaxed),
                    reloads_failed: c.reloads_failed.load(Relaxed),
                    reloads_held: c.reloads_held.load(Relaxed),
                    reload_failing: c.failing.load(Relaxed),
                    last_good_unix: c.last_good_unix.load(Relaxed),
                    users: snap.user_count(),
                    keys: snap.key_count(),
                    audit_dropped: self.audit.dropped(),
                    store: c.follower().map(|f| crate::pipeline::metrics::StoreScrape {
                        up: f.up.load(Relaxed),
                        snapshot_age_seconds: crate::credentials::db::follow::unix_now()
                            .saturating_sub(f.confirmed_unix.load(Relaxed)),
                        revision: f.revision.load(Relaxed),
                    }),
                });
                let mut r = Response::new(Body::full(text));
                r.headers_mut()
                    .insert(http::header::CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4"));
                r
            }
            (_, p) if (p.starts_with("/ui/") || p == "/ui") && self.token_digest.is_some() => {
                console::handle(self, req).await
            }
            (_, p) if p.starts_with("/admin/v1/") || p == "/admin/v1" => {
                if self.token_digest.is_none() {
                    error_response(
                        StatusCode::NOT_FOUND,
                        "not_found",
                        "Admin API is disabled: no admin token configured",
                        &id,
                    )
                } else {
                    match self.bearer_caller(&req) {
                        Ok(caller) => api::handle(self, req, &id, &caller).await,
                        Err(refused) => caller::refusal_response(&refused, &id),
                    }
                }
            }
            _ => error_response(StatusCode::NOT_FOUND, "not_found", "No such admin endpoint", &id),
        };
        let mut res = res;
        res.headers_mut().insert(crate::wire::headers::X_REQUEST_ID, id);
        res
    }
}

/// `http(s)://host:port` of the first proxy listener (as bound, with whether it is TLS),
/// for the console's examples; an unspecified address is shown as 127.0.0.1.
fn example_base(proxy: Option<(SocketAddr, bool)>) -> String {
    let Some((mut addr, tls)) = proxy else { return "http://127.0.0.1:8080".into() };
    if addr.ip().is_unspecified() {
        addr.set_ip(std::net::IpAddr::from([127, 0, 0, 1]));
    }
    format!("{}://{addr}", if tls { "https" } else { "http" })
}

fn json(status: StatusCode, v: &serde_json::Value) -> Response<Body> {
    let mut res = Response::new(Body::full(v.to_string()));
    *res.status_mut() = status;
    res.headers_mut().insert(http::header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    res.headers_mut().insert(http::header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    res
}

/// Serves the admin listener until `stop` turns true. HTTP/1 only, with the same
/// header timeout as the proxy listeners.
pub async fn serve(
    listener: TcpListener,
    admin: Arc<Admin>,
    header_timeout: Duration,
    mut stop: watch::Receiver<bool>,
) {
    // The console overview's counters, sampled once a minute while the listener runs.
    let sampler = admin.clone();
    let mut sampler_stop = stop.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(60));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tokio::select! {
                _ = tick.tick() => sampler.traffic.sample(&sampler.metrics),
                _ = sampler_stop.wait_for(|&s| s) => return,
            }
        }
    });
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = stop.wait_for(|&s| s) => return,
        };
        let (stream, peer): (_, SocketAddr) = match accepted {
            Ok(pair) => pair,
            Err(e) => {
                tracing::warn!(error = %e, "admin accept failed; backing off");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let admin = admin.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |mut req: Request<Incoming>| {
                let admin = admin.clone();
                req.extensions_mut().insert(Peer(peer.ip()));
                async move { Ok::<_, std::convert::Infallible>(admin.handle(req).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(header_timeout)
                .serve_connection(TokioIo::new(stream), svc);
            if let Err(e) = conn.await {
                tracing::debug!(peer = %peer, error = %e, "admin connection ended with an error");
            }
        });
    }
}
