//! `GatewayConfig` writes a real `gatehouse.yaml` (plus a generated TLS certificate, a
//! credentials file with its master key, and an admin token file) into a temporary
//! directory; `TestGateway` runs it in process, `GatewayProcess` (process.rs) runs the
//! real binary on it. `AdminClient` talks to the admin listener with the bearer token.

use super::Reply;
use super::client::H1;
use super::creds::{Creds, write_atomic, write_master_key};
use super::upstream::TestUpstream;
use gatehouse::config::Config;
use gatehouse::server::listen::Server;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use tempfile::TempDir;
use tokio::sync::oneshot;

/// A YAML scalar: JSON strings are valid YAML double-quoted scalars.
fn q(s: &str) -> String {
    serde_json::Value::from(s).to_string()
}

/// One route of the test config. A route allows anonymous callers unless
/// [`RouteSpec::authenticated`] says otherwise.
#[derive(Debug, Clone)]
pub struct RouteSpec {
    name: String,
    path_prefix: String,
    host: Option<String>,
    upstreams: Vec<String>,
    timeout: Option<String>,
    set_headers: Vec<(String, String)>,
    allow_anonymous: bool,
    forward_credentials: bool,
    /// More of the route, as YAML lines indented under it.
    extra: String,
}

impl RouteSpec {
    /// A route `name` for `path_prefix` with no upstream yet.
    pub fn new(name: &str, path_prefix: &str) -> RouteSpec {
        RouteSpec {
            name: name.into(),
            path_prefix: path_prefix.into(),
            host: None,
            upstreams: Vec::new(),
            timeout: None,
            set_headers: Vec::new(),
            allow_anonymous: true,
            forward_credentials: false,
            extra: String::new(),
        }
    }

    /// A setting of the route as YAML (`"strip_prefix: true"`, `"upstream_tls: { ca: … }"`).
    pub fn setting(mut self, yaml: &str) -> Self {
        self.extra.push_str(&format!("    {yaml}\n"));
        self
    }

    /// Requests need credentials (`allow_anonymous: false`).
    pub fn authenticated(mut self) -> Self {
        self.allow_anonymous = false;
        self
    }

    /// Keep the client's credential headers upstream (`forward_credentials: true`).
    pub fn forward_credentials(mut self) -> Self {
        self.forward_credentials = true;
        self
    }

    /// Adds `up` as a target.
    pub fn to(mut self, up: &TestUpstream) -> Self {
        self.upstreams.push(up.url());
        self
    }

    /// Adds a target by URL (an upstream written in the test itself).
    pub fn upstream_url(mut self, url: &str) -> Self {
        self.upstreams.push(url.into());
        self
    }

    /// Only for requests to `host`.
    pub fn host(mut self, host: &str) -> Self {
        self.host = Some(host.into());
        self
    }

    /// The route timeout, e.g. `"1s"`.
    pub fn timeout(mut self, t: &str) -> Self {
        self.timeout = Some(t.into());
        self
    }

    /// A `set_headers` entry (the value may use `${VAR}`).
    pub fn set_header(mut self, name: &str, value: &str) -> Self {
        self.set_headers.push((name.into(), value.into()));
        self
    }

    fn yaml(&self, out: &mut String) {
        out.push_str(&format!("  - name: {}\n    path_prefix: {}\n", q(&self.name), q(&self.path_prefix)));
        if let Some(h) = &self.host {
            out.push_str(&format!("    host: {}\n", q(h)));
        }
        let ups: Vec<String> = self.upstreams.iter().map(|u| q(u)).collect();
        out.push_str(&format!("    upstream: [{}]\n    allow_anonymous: {}\n", ups.join(", "), self.allow_anonymous));
        if self.forward_credentials {
            out.push_str("    forward_credentials: true\n");
        }
        if let Some(t) = &self.timeout {
            out.push_str(&format!("    timeout: {t}\n"));
        }
        if !self.set_headers.is_empty() {
            let kv: Vec<String> = self.set_headers.iter().map(|(k, v)| format!("{}: {}", q(k), q(v))).collect();
            out.push_str(&format!("    set_headers: {{ {} }}\n", kv.join(", ")));
        }
        out.push_str(&self.extra);
    }
}

/// A throw-away certificate for `localhost`, as PEM.
#[derive(Debug, Clone)]
pub struct TestCert {
    pub cert_pem: String,
    pub key_pem: String,
}

impl TestCert {
    pub fn generate() -> TestCert {
        let c = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        TestCert { cert_pem: c.cert.pem(), key_pem: c.signing_key.serialize_pem() }
    }
}

/// A gateway configuration under construction.
#[derive(Debug, Clone, Default)]
pub struct GatewayConfig {
    routes: Vec<RouteSpec>,
    tls: bool,
    limits: Vec<(String, String)>,
    trusted_proxies: Vec<String>,
    env: HashMap<String, String>,
    auth_hmac: Vec<(String, String)>,
    credentials: Option<CredsText>,
    credentials_at: Option<PathBuf>,
    admin: Option<AdminSpec>,
    /// Extra `admin:` settings (`failed_per_ip_per_minute`, `session_idle`…).
    admin_settings: Vec<(String, String)>,
    rate_limit: Option<(u32, u32)>,
    identity_headers: Vec<(String, String)>,
    shared_state: Vec<(String, String)>,
    failed_per_ip_per_minute: Option<u32>,
    /// `credentials: postgres://…` and the settings that go with it.
    database: Option<(String, Vec<(String, String)>)>,
}

/// The admin listener of the test config: always `127.0.0.1:0`; the token, when there is
/// one, is written to `admin.token` beside the config and named by `admin.token_file`
/// (never `token_env`: tests do not touch the process environment).
#[derive(Clone)]
struct AdminSpec {
    token: Option<String>,
}

impl std::fmt::Debug for AdminSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminSpec").field("token", &self.token.as_ref().map(|_| "..")).finish()
    }
}

/// The texts of a credentials file and its master key.
#[derive(Clone)]
struct CredsText {
    yaml: String,
    master_key: String,
}

impl std::fmt::Debug for CredsText {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CredsText(..)")
    }
}

/// The config file and everything it points to, in a directory removed on drop.
pub struct WrittenConfig {
    pub dir: TempDir,
    pub path: PathBuf,
    pub cert: Option<TestCert>,
    /// The credentials file the config names, if any.
    pub credentials: Option<PathBuf>,
    /// Whether the config has an admin listener, and its token if it has one.
    pub admin: Option<Option<String>>,
}

impl WrittenConfig {
    /// The configured credentials file.
    pub fn credentials_path(&self) -> &Path {
        self.credentials.as_deref().expect("no credentials configured: call .credentials() on the builder")
    }

    /// Replaces the credentials file atomically (temp file + rename in the same directory).
    pub fn write_credentials(&self, creds: &Creds) {
        write_atomic(self.credentials_path(), &creds.yaml());
    }

    /// The admin token the config names (panics without one).
    pub fn admin_token(&self) -> &str {
        self.admin.as_ref().and_then(|t| t.as_deref()).expect("no admin token: call .admin() on the builder")
    }

    /// The audit log every test config writes (`audit.log` beside the config).
    pub fn audit_path(&self) -> PathBuf {
        self.dir.path().join("audit.log")
    }
}

impl GatewayConfig {
    /// A plain listener on 127.0.0.1:0 and no routes yet.
    pub fn new() -> GatewayConfig {
        GatewayConfig::default()
    }

    pub fn route(mut self, r: RouteSpec) -> Self {
        self.routes.push(r);
        self
    }

    /// Adds a TLS listener (on another ephemeral port) with a fresh certificate.
    pub fn tls(mut self) -> Self {
        self.tls = true;
        self
    }

    /// The default per-key `rate_limit` (the gateway's own default is 50/s, burst 100).
    pub fn rate_limit(mut self, per_second: u32, burst: u32) -> Self {
        self.rate_limit = Some((per_second, burst));
        self
    }

    /// A `limits:` entry, e.g. `("max_request_body", "1MiB")`.
    pub fn limit(mut self, name: &str, value: &str) -> Self {
        self.limits.push((name.into(), value.into()));
        self
    }

    /// `identity_headers: { field: name }`.
    pub fn identity_header(mut self, field: &str, name: &str) -> Self {
        self.identity_headers.push((field.into(), name.into()));
        self
    }

    pub fn trusted_proxy(mut self, net: &str) -> Self {
        self.trusted_proxies.push(net.into());
        self
    }

    /// A variable for `${VAR}` expansion (in-process gateways only).
    pub fn env(mut self, name: &str, value: &str) -> Self {
        self.env.insert(name.into(), value.into());
        self
    }

    /// A `shared_state:` entry, e.g. `("redis", "redis://127.0.0.1:6379")`.
    pub fn shared_state(mut self, name: &str, value: &str) -> Self {
        // A later setting replaces an earlier one of the same name.
        self.shared_state.retain(|(n, _)| n != name);
        self.shared_state.push((name.into(), value.into()));
        self
    }

    /// `auth.failed_per_ip_per_minute`.
    /// API users in the credential database at `url` instead of a file.
    pub fn database(mut self, url: &str) -> Self {
        self.database = Some((url.to_string(), Vec::new()));
        self
    }

    /// A top-level setting beside `credentials: postgres://…` (e.g. `credentials_auto_migrate`).
    pub fn database_setting(mut self, name: &str, value: &str) -> Self {
        if let Some((_, s)) = self.database.as_mut() {
            s.push((name.to_string(), value.to_string()));
        }
        self
    }

    pub fn failed_per_ip_per_minute(mut self, n: u32) -> Self {
        self.failed_per_ip_per_minute = Some(n);
        self
    }

    /// An `auth.hmac` entry, e.g. `("max_skew", "30s")`.
    pub fn auth_hmac(mut self, name: &str, value: &str) -> Self {
        self.auth_hmac.push((name.into(), value.into()));
        self
    }

    /// A credentials file (`credentials.yaml`) and master key (`master.key`, 0600) with
    /// the current content of `creds`, written next to the config.
    pub fn credentials(mut self, creds: &Creds) -> Self {
        self.credentials = Some(CredsText { yaml: creds.yaml(), master_key: creds.master_key_text() });
        self
    }

    /// Names `path` as the credentials file instead of writing one: the test lays it
    /// out itself (e.g. a kubelet symlink layout). The master key of `.credentials()` is
    /// still written next to the config.
    pub fn credentials_at(mut self, path: &Path) -> Self {
        self.credentials_at = Some(path.to_path_buf());
        self
    }

    /// An admin listener on 127.0.0.1:0 with `token` (read from `admin.token_file`).
    pub fn admin(mut self, token: &str) -> Self {
        self.admin = Some(AdminSpec { token: Some(token.into()) });
        self
    }

    /// One more `admin:` setting, as YAML (`failed_per_ip_per_minute`, `"1000"`).
    pub fn admin_setting(mut self, key: &str, value: &str) -> Self {
        self.admin_settings.push((key.into(), value.into()));
        self
    }

    /// An admin listener with no token configured: `/admin/v1` is disabled.
    pub fn admin_without_token(mut self) -> Self {
        self.admin = Some(AdminSpec { token: None });
        self
    }

    fn credentials_path(&self, dir: &Path) -> Option<PathBuf> {
        self.credentials.as_ref()?;
        Some(self.credentials_at.clone().unwrap_or_else(|| dir.join("credentials.yaml")))
    }

    /// The YAML text, with TLS files in `dir`.
    pub fn yaml(&self, dir: &Path) -> String {
        let mut y = String::from("listeners:\n  - address: 127.0.0.1:0\n    name: plain\n");
        if self.tls {
            y.push_str(&format!(
                "  - address: 127.0.0.1:0\n    name: tls\n    tls: {{ cert: {}, key: {} }}\n",
                q(&dir.join("cert.pem").display().to_string()),
                q(&dir.join("key.pem").display().to_string()),
            ));
        }
        // The audit log goes to a file in the test's directory (stdout would interleave
        // with the test runner's output); tests read it from `dir/audit.log`.
        y.push_str(&format!("audit_log: {}\n", q(&dir.join("audit.log").display().to_string())));
        if let Some(a) = &self.admin {
            y.push_str("admin:\n  address: 127.0.0.1:0\n");
            if a.token.is_some() {
                y.push_str(&format!("  token_file: {}\n", q(&dir.join("admin.token").display().to_string())));
            }
            for (k, v) in &self.admin_settings {
                y.push_str(&format!("  {k}: {v}\n"));
            }
        }
        if let Some((per_second, burst)) = self.rate_limit {
            y.push_str(&format!("rate_limit: {{ per_second: {per_second}, burst: {burst} }}\n"));
        }
        if !self.limits.is_empty() {
            y.push_str("limits:\n");
            for (k, v) in &self.limits {
                y.push_str(&format!("  {k}: {v}\n"));
            }
        }
        if !self.identity_headers.is_empty() {
            y.push_str("identity_headers:\n");
            for (k, v) in &self.identity_headers {
                y.push_str(&format!("  {k}: {}\n", q(v)));
            }
        }
        if !self.trusted_proxies.is_empty() {
            let t: Vec<String> = self.trusted_proxies.iter().map(|s| q(s)).collect();
            y.push_str(&format!("trusted_proxies: [{}]\n", t.join(", ")));
        }
        if let Some(path) = self.credentials_path(dir) {
            // With a database, the credentials file is written (a file to import) but not
            // named; its master key is the gateway's.
            if self.database.is_none() {
                y.push_str(&format!("credentials: {}\n", q(&path.display().to_string())));
            }
            y.push_str(&format!("master_key: {}\n", q(&dir.join("master.key").display().to_string())));
        }
        if let Some((url, settings)) = &self.database {
            y.push_str(&format!("credentials: {}\n", q(url)));
            if self.credentials.is_none() {
                y.push_str(&format!("master_key: {}\n", q(&dir.join("master.key").display().to_string())));
            }
            for (k, v) in settings {
                y.push_str(&format!("{k}: {v}\n"));
            }
        }
        if !self.shared_state.is_empty() {
            y.push_str("shared_state:\n");
            for (k, v) in &self.shared_state {
                y.push_str(&format!("  {k}: {v}\n"));
            }
        }
        if !self.auth_hmac.is_empty() || self.failed_per_ip_per_minute.is_some() {
            y.push_str("auth:\n");
            if let Some(n) = self.failed_per_ip_per_minute {
                y.push_str(&format!("  failed_per_ip_per_minute: {n}\n"));
            }
        }
        if !self.auth_hmac.is_empty() {
            y.push_str("  hmac:\n");
            for (k, v) in &self.auth_hmac {
                y.push_str(&format!("    {k}: {v}\n"));
            }
        }
        y.push_str(if self.routes.is_empty() { "routes: []\n" } else { "routes:\n" });
        for r in &self.routes {
            r.yaml(&mut y);
        }
        y
    }

    /// Writes the config (and certificate) to a fresh temporary directory.
    pub fn write(&self) -> WrittenConfig {
        let dir = tempfile::tempdir().unwrap();
        let cert = self.tls.then(TestCert::generate);
        if let Some(c) = &cert {
            std::fs::write(dir.path().join("cert.pem"), &c.cert_pem).unwrap();
            std::fs::write(dir.path().join("key.pem"), &c.key_pem).unwrap();
        }
        let credentials = self.credentials_path(dir.path());
        if let Some(c) = &self.credentials {
            write_master_key(&dir.path().join("master.key"), &c.master_key);
            if self.credentials_at.is_none() {
                std::fs::write(dir.path().join("credentials.yaml"), &c.yaml).unwrap();
            }
        }
        if let Some(token) = self.admin.as_ref().and_then(|a| a.token.as_ref()) {
            write_master_key(&dir.path().join("admin.token"), &format!("{token}\n"));
        }
        let path = dir.path().join("gatehouse.yaml");
        std::fs::write(&path, self.yaml(dir.path())).unwrap();
        let admin = self.admin.as_ref().map(|a| a.token.clone());
        WrittenConfig { dir, path, cert, credentials, admin }
    }

    /// Loads the written config and runs the gateway in this process.
    pub async fn start(&self) -> TestGateway {
        let written = self.write();
        let config = Config::load_with_env(&written.path, &self.env)
            .unwrap_or_else(|e| panic!("test config is invalid: {e}\n{}", self.yaml(written.dir.path())));
        let server = Server::bind(&config).await.unwrap();
        let admin = server.admin_addr();
        assert_eq!(admin.is_some(), self.admin.is_some(), "admin listener");
        let listeners = server.listeners();
        let plain = listeners.iter().find(|l| !l.tls).map(|l| l.addr).unwrap();
        let tls = listeners.iter().find(|l| l.tls).map(|l| l.addr);
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(server.run(async {
            let _ = stopped.await;
        }));
        TestGateway { plain, tls, admin, written, stop: Some(stop) }
    }
}

/// A gateway running in this process. Starts its drain when dropped; the test's runtime
/// ends whatever is left.
pub struct TestGateway {
    plain: SocketAddr,
    tls: Option<SocketAddr>,
    admin: Option<SocketAddr>,
    written: WrittenConfig,
    stop: Option<oneshot::Sender<()>>,
}

impl TestGateway {
    /// A config to build a gateway from.
    pub fn builder() -> GatewayConfig {
        GatewayConfig::new()
    }

    /// The plain listener's address.
    pub fn addr(&self) -> SocketAddr {
        self.plain
    }

    /// `http://<plain listener><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.plain)
    }

    /// The TLS listener's address.
    pub fn tls_addr(&self) -> SocketAddr {
        self.tls.expect("gateway has no TLS listener: call .tls() on the builder")
    }

    /// The TLS listener's certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.written.cert.as_ref().expect("gateway has no TLS listener").cert_pem
    }

    /// Replaces the running gateway's credentials file atomically with `creds`.
    pub fn write_credentials(&self, creds: &Creds) {
        self.written.write_credentials(creds);
    }

    /// The config file and everything it points to.
    pub fn written(&self) -> &WrittenConfig {
        &self.written
    }

    /// The admin listener's address (`Server::admin_addr()`).
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin.expect("gateway has no admin listener: call .admin() on the builder")
    }

    /// A client for the admin listener with the configured token.
    pub fn admin(&self) -> AdminClient {
        AdminClient::new(self.admin_addr(), Some(self.written.admin_token()))
    }

    /// Starts the drain (what SIGTERM does), keeping the files for the test to read.
    pub fn begin_shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    /// The audit records written so far.
    pub fn audit_records(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.written.audit_path())
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("audit line is not JSON ({e}): {l}")))
            .collect()
    }

    /// The audit records of path `path`, once there are `n` of them.
    pub async fn audit_of(&self, path: &str, n: usize) -> Vec<serde_json::Value> {
        let mine = || self.audit_records().into_iter().filter(|r| r["path"] == path).collect::<Vec<_>>();
        super::eventually(super::STEP, &format!("{n} audit records for {path}"), || mine().len() >= n).await;
        mine()
    }
}

/// A client for the admin listener: JSON in and out, `Authorization: Bearer <token>`
/// when it has one.
pub struct AdminClient {
    base: String,
    token: Option<String>,
    client: H1,
}

impl AdminClient {
    /// A client for the admin listener at `addr`, sending `token` (or no token).
    pub fn new(addr: SocketAddr, token: Option<&str>) -> AdminClient {
        AdminClient { base: format!("http://{addr}"), token: token.map(str::to_string), client: H1::new() }
    }

    /// The same listener with another token (or none).
    pub fn with_token(&self, token: Option<&str>) -> AdminClient {
        AdminClient { base: self.base.clone(), token: token.map(str::to_string), client: H1::new() }
    }

    /// `http://<admin listener><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// `method path` with extra headers and a raw body.
    pub async fn raw(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: impl Into<bytes::Bytes>,
    ) -> Reply {
        let mut h: Vec<(String, String)> = headers.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        if let Some(t) = &self.token {
            h.push(("authorization".into(), format!("Bearer {t}")));
        }
        self.client.request(method, &self.url(path), &h, body).await
    }

    /// `method path`, with `body` as JSON when given.
    pub async fn call(&self, method: &str, path: &str, body: Option<&serde_json::Value>) -> Reply {
        match body {
            Some(b) => self.raw(method, path, &[("content-type", "application/json")], b.to_string()).await,
            None => self.raw(method, path, &[], bytes::Bytes::new()).await,
        }
    }

    pub async fn get(&self, path: &str) -> Reply {
        self.call("GET", path, None).await
    }

    pub async fn post(&self, path: &str, body: &serde_json::Value) -> Reply {
        self.call("POST", path, Some(body)).await
    }

    pub async fn patch(&self, path: &str, body: &serde_json::Value) -> Reply {
        self.call("PATCH", path, Some(body)).await
    }

    pub async fn put(&self, path: &str, body: &serde_json::Value) -> Reply {
        self.call("PUT", path, Some(body)).await
    }

    pub async fn delete(&self, path: &str) -> Reply {
        self.call("DELETE", path, None).await
    }

    /// `method path` that must answer `status`; returns the JSON body.
    pub async fn expect(
        &self,
        status: u16,
        method: &str,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> serde_json::Value {
        let r = self.call(method, path, body).await;
        assert_eq!(r.status.as_u16(), status, "{method} {path}: {}", r.text());
        assert_eq!(r.header("content-type"), "application/json", "{method} {path}");
        r.json()
    }
}

impl Drop for TestGateway {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}
