//! A gateway with an admin listener, a credentials file and an audit file, for the rate
//! limit, metrics and audit tests. Config written inline so these tests depend only on
//! `Creds` and `TestUpstream` from the shared harness.

use crate::support::creds::{Creds, write_master_key};
use crate::support::upstream::TestUpstream;
use gatehouse::config::Config;
use gatehouse::pipeline::clock::Clock;
use gatehouse::server::listen::Server;
use std::net::SocketAddr;
use std::path::PathBuf;
use tokio::sync::oneshot;

pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789abcdef";

pub struct Running {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub dir: tempfile::TempDir,
    /// The gateway's clock: move it forward instead of sleeping.
    pub clock: Clock,
    _stop: oneshot::Sender<()>,
}

impl Running {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin)
    }

    pub fn audit_path(&self) -> PathBuf {
        self.dir.path().join("audit").join("audit.log")
    }

    /// Audit records written so far.
    pub fn audit_records(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.audit_path())
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("audit line is not JSON ({e}): {l}")))
            .collect()
    }
}

/// Starts a gateway in front of `up` with `creds`; `extra` is YAML added at top level.
pub async fn start(creds: &Creds, up: &TestUpstream, extra: &str) -> Running {
    start_with_audit_log(creds, up, extra, None).await
}

/// `start`, with the audit log at `audit_log` instead of `audit_path()`.
pub async fn start_with_audit_log(creds: &Creds, up: &TestUpstream, extra: &str, audit_log: Option<&str>) -> Running {
    start_to(creds, &up.url(), extra, audit_log).await
}

/// `start`, on a [`Clock::manual`]: time moves only by `Running::clock.advance`.
pub async fn start_on_manual_clock(creds: &Creds, up: &TestUpstream, extra: &str) -> Running {
    start_on(creds, &up.url(), extra, None, Clock::manual()).await
}

/// `start`, on `clock` (e.g. the system's, set ahead with `Clock::advance`).
pub async fn start_on_clock(creds: &Creds, up: &TestUpstream, extra: &str, clock: Clock) -> Running {
    start_on(creds, &up.url(), extra, None, clock).await
}

/// `start_with_audit_log`, in front of the upstream at `upstream_url`.
pub async fn start_to(creds: &Creds, upstream_url: &str, extra: &str, audit_log: Option<&str>) -> Running {
    start_on(creds, upstream_url, extra, audit_log, Clock::system()).await
}

async fn start_on(creds: &Creds, upstream_url: &str, extra: &str, audit_log: Option<&str>, clock: Clock) -> Running {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::create_dir(d.join("audit")).unwrap();
    std::fs::write(d.join("credentials.yaml"), creds.yaml()).unwrap();
    write_master_key(&d.join("master.key"), &creds.master_key_text());
    std::fs::write(d.join("admin.token"), ADMIN_TOKEN).unwrap();
    let audit_log = audit_log.map_or_else(|| format!("{}/audit/audit.log", d.display()), str::to_string);
    let yaml = format!(
        "listeners:\n  - address: 127.0.0.1:0\n    name: main\nadmin:\n  address: 127.0.0.1:0\n  token_file: {d}/admin.token\n\
         credentials: {d}/credentials.yaml\nmaster_key: {d}/master.key\naudit_log: {audit_log}\n{extra}\
         routes:\n  - name: api\n    path_prefix: /\n    upstream: {upstream_url}\n",
        d = d.display()
    );
    let path = d.join("gatehouse.yaml");
    std::fs::write(&path, &yaml).unwrap();
    let config = Config::load(&path).unwrap_or_else(|e| panic!("{e}\n{yaml}"));
    let server = Server::bind_with_clock(&config, clock.clone()).await.unwrap();
    let addr = server.listeners()[0].addr;
    let admin = server.admin_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(server.run(async {
        let _ = stopped.await;
    }));
    Running { addr, admin, dir, clock, _stop: stop }
}

/// The series of a Prometheus text exposition (name and labels, without values).
pub fn series(text: &str) -> std::collections::BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.rsplit_once(' ').map(|(s, _)| s.to_string()))
        .collect()
}

/// The value of one series (`name{labels}` exactly as exposed), if present.
pub fn value(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(series).and_then(|v| v.strip_prefix(' ')).and_then(|v| v.parse().ok()))
}
