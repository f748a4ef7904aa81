//! `GatewayProcess`: the real `gatehouse` binary as a child process, for what only a
//! process shows (memory, signals, exit codes, the command line).

use super::creds::Creds;
use super::gateway::{GatewayConfig, WrittenConfig};
use super::{STEP, within};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{ExitStatus, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};
use tokio::task::JoinHandle;

/// The binary under test, with a hermetic environment.
fn gatehouse() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_gatehouse"));
    c.env_remove("GATEHOUSE_CONFIG")
        .env_remove("GATEHOUSE_LOG_FORMAT")
        .env("GATEHOUSE_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    c
}

/// Runs `gatehouse <args>` to completion.
pub async fn run_cli(args: &[&str]) -> Output {
    within(STEP, &format!("gatehouse {args:?}"), gatehouse().args(args).output()).await.unwrap()
}

/// Memory of a process, from `/proc/<pid>/status`, in KiB.
#[derive(Debug, Clone, Copy)]
pub struct Memory {
    /// Resident set size now.
    pub rss_kib: u64,
    /// Peak resident set size since the process started.
    pub hwm_kib: u64,
}

/// A running `gatehouse`. Killed when dropped.
pub struct GatewayProcess {
    child: Child,
    pid: u32,
    addrs: Vec<SocketAddr>,
    stderr: Arc<Mutex<String>>,
    stdout: Arc<Mutex<String>>,
    collectors: Vec<JoinHandle<()>>,
    config: Option<WrittenConfig>,
}

/// Copies a child's output into `sink` line by line (so the pipe never fills up), until
/// the child closes it.
fn collect(stream: impl AsyncRead + Unpin + Send + 'static, sink: Arc<Mutex<String>>) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut lines = BufReader::new(stream).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            let mut s = sink.lock().unwrap();
            s.push_str(&line);
            s.push('\n');
        }
    })
}

impl GatewayProcess {
    /// `gatehouse --log-format json serve --config <written config>`, once every listener
    /// has logged `listening`.
    pub async fn serve(config: &GatewayConfig) -> GatewayProcess {
        Self::serve_with_env(config, &[]).await
    }

    /// Like [`GatewayProcess::serve`], with extra environment variables (e.g.
    /// `GATEHOUSE_LOG=debug`).
    pub async fn serve_with_env(config: &GatewayConfig, env: &[(&str, &str)]) -> GatewayProcess {
        let written = config.write();
        let listeners = if config.yaml(written.dir.path()).contains("tls:") { 2 } else { 1 };
        let path = written.path.display().to_string();
        let mut p = Self::spawn(&["--log-format", "json", "serve", "--config", &path], listeners, env).await;
        p.config = Some(written);
        p
    }

    /// `gatehouse --log-format json demo --port <port>`, once it is listening.
    pub async fn demo(port: u16) -> GatewayProcess {
        Self::demo_with_env(port, &[]).await
    }

    /// Like [`GatewayProcess::demo`], with extra environment variables.
    pub async fn demo_with_env(port: u16, env: &[(&str, &str)]) -> GatewayProcess {
        Self::spawn(&["--log-format", "json", "demo", "--port", &port.to_string()], 1, env).await
    }

    async fn spawn(args: &[&str], listeners: usize, env: &[(&str, &str)]) -> GatewayProcess {
        let mut cmd = gatehouse();
        cmd.args(args);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().unwrap();
        let pid = child.id().unwrap();
        let stderr = Arc::new(Mutex::new(String::new()));
        let stdout = Arc::new(Mutex::new(String::new()));
        let collectors = vec![
            collect(child.stdout.take().unwrap(), stdout.clone()),
            collect(child.stderr.take().unwrap(), stderr.clone()),
        ];
        let mut p = GatewayProcess { child, pid, addrs: Vec::new(), stderr, stdout, collectors, config: None };
        let addrs = within(STEP, "gatehouse to log `listening`", async {
            loop {
                let addrs = listening(&p.stderr());
                if addrs.len() >= listeners {
                    return addrs;
                }
                if let Ok(Some(status)) = p.child.try_wait() {
                    panic!("gatehouse {args:?} exited with {status} before listening:\n{}", p.stderr());
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        p.addrs = addrs;
        p
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The first listener's address (the plain one in `GatewayConfig` order).
    pub fn addr(&self) -> SocketAddr {
        self.addrs[0]
    }

    /// Everything the process wrote to stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Everything the process wrote to stdout so far.
    pub fn stdout(&self) -> String {
        self.stdout.lock().unwrap().clone()
    }

    /// Current and peak resident memory.
    pub fn memory(&self) -> Memory {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid)).unwrap();
        let kib = |key: &str| -> u64 {
            let line = status.lines().find(|l| l.starts_with(key)).unwrap_or_else(|| panic!("no {key} in {status}"));
            line.split_whitespace().nth(1).unwrap().parse().unwrap()
        };
        Memory { rss_kib: kib("VmRSS:"), hwm_kib: kib("VmHWM:") }
    }

    /// Sends SIGTERM.
    pub fn sigterm(&self) {
        self.signal("TERM");
    }

    /// Sends SIGHUP (reload the credentials).
    pub fn sighup(&self) {
        self.signal("HUP");
    }

    fn signal(&self, name: &str) {
        let ok =
            std::process::Command::new("kill").args([&format!("-{name}"), &self.pid.to_string()]).status().unwrap();
        assert!(ok.success(), "kill -{name} {} failed", self.pid);
    }

    /// The stderr log lines, parsed as JSON (lines that are not JSON are skipped).
    pub fn log(&self) -> Vec<serde_json::Value> {
        self.stderr().lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
    }

    /// The log lines whose `message` starts with `msg`.
    pub fn logged_lines(&self, msg: &str) -> Vec<serde_json::Value> {
        self.log().into_iter().filter(|v| v["message"].as_str().is_some_and(|m| m.starts_with(msg))).collect()
    }

    /// How many log lines have a `message` starting with `msg`.
    pub fn count_logged(&self, msg: &str) -> usize {
        self.logged_lines(msg).len()
    }

    /// Waits until at least `n` log lines have a `message` starting with `msg`.
    pub async fn logged(&self, msg: &str, n: usize) {
        super::eventually(STEP, &format!("{n} log line(s) {msg:?}"), || self.count_logged(msg) >= n).await;
    }

    fn written(&self) -> &WrittenConfig {
        self.config.as_ref().expect("not started with serve()")
    }

    /// The configured credentials file.
    pub fn credentials_path(&self) -> &Path {
        self.written().credentials_path()
    }

    /// Replaces the credentials file atomically with `creds`.
    pub fn write_credentials(&self, creds: &Creds) {
        self.written().write_credentials(creds);
    }

    /// Waits for the process to exit and for its last output lines to be collected.
    pub async fn wait(&mut self, limit: Duration) -> ExitStatus {
        let status = within(limit, "gatehouse to exit", self.child.wait()).await.unwrap();
        for c in self.collectors.drain(..) {
            within(limit, "gatehouse's output to end", c).await.unwrap();
        }
        status
    }
}

/// The addresses of every `listening` line in a JSON log.
fn listening(log: &str) -> Vec<SocketAddr> {
    log.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["message"] == "listening")
        .filter_map(|v| v["address"].as_str().and_then(|a| a.parse().ok()))
        .collect()
}
