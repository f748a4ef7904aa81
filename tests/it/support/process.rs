//! `GatewayProcess`: the real `gatehouse` binary as a child process, for what only a
//! process shows (memory, signals, exit codes, the command line).

use super::creds::Creds;
use super::gateway::{AdminClient, GatewayConfig, WrittenConfig};
use super::{STEP, within};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{ExitStatus, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};
use tokio::task::JoinHandle;

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_gatehouse");

/// The binary under test, with a hermetic environment.
fn gatehouse() -> Command {
    gatehouse_wrapped(&[])
}

/// The binary under test run through `wrapper` (a command that ends by exec'ing its
/// arguments, e.g. `unshare -m sh -c '…; exec "$@"' sh`), with a hermetic environment.
fn gatehouse_wrapped(wrapper: &[&str]) -> Command {
    let mut c = match wrapper.split_first() {
        None => Command::new(BIN),
        Some((program, args)) => {
            let mut c = Command::new(program);
            c.args(args).arg(BIN);
            c
        }
    };
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
    // The CLI's own default log level (warnings only) is part of what is tested.
    let mut c = gatehouse();
    c.env_remove("GATEHOUSE_LOG").args(args);
    within(STEP, &format!("gatehouse {args:?}"), c.output()).await.unwrap()
}

/// Runs `gatehouse <args>` through `wrapper` (see [`gatehouse_wrapped`]) with extra
/// environment variables, to completion.
pub async fn run_cli_with(wrapper: &[&str], env: &[(&str, &str)], args: &[&str]) -> Output {
    let mut c = gatehouse_wrapped(wrapper);
    c.env_remove("GATEHOUSE_LOG").args(args);
    for (k, v) in env {
        c.env(k, v);
    }
    within(STEP, &format!("gatehouse {args:?} via {wrapper:?}"), c.output()).await.unwrap()
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
    admin: Option<SocketAddr>,
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
        Self::serve_written(config.write(), &[], env).await
    }

    /// `serve` on an already written config (e.g. the one of a gateway that was stopped,
    /// see [`GatewayProcess::into_written`]), through `wrapper` (see [`run_cli_with`]).
    /// With an admin listener, also waits for its `admin listening` line.
    pub async fn serve_written(written: WrittenConfig, wrapper: &[&str], env: &[(&str, &str)]) -> GatewayProcess {
        let yaml = std::fs::read_to_string(&written.path).unwrap();
        let listeners = if yaml.contains("\n    tls: {") { 2 } else { 1 };
        let path = written.path.display().to_string();
        let args = ["--log-format", "json", "serve", "--config", &path];
        let mut p = Self::spawn_wrapped(wrapper, &args, listeners, env).await;
        if written.admin.is_some() {
            let admin = within(STEP, "gatehouse to log `admin listening`", async {
                loop {
                    if let Some(a) = admin_listening(&p.stderr()) {
                        return a;
                    }
                    if let Ok(Some(status)) = p.child.try_wait() {
                        panic!("gatehouse exited with {status} before the admin listener:\n{}", p.stderr());
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            })
            .await;
            p.admin = Some(admin);
        }
        p.config = Some(written);
        p
    }

    /// `gatehouse --log-format json demo --port <port>`, once it is listening.
    pub async fn demo(port: u16) -> GatewayProcess {
        Self::demo_with_env(port, &[]).await
    }

    /// Like [`GatewayProcess::demo`], with extra environment variables.
    pub async fn demo_with_env(port: u16, env: &[(&str, &str)]) -> GatewayProcess {
        let admin = super::free_port().to_string();
        Self::spawn(&["--log-format", "json", "demo", "--port", &port.to_string(), "--admin-port", &admin], 1, env)
            .await
    }

    async fn spawn(args: &[&str], listeners: usize, env: &[(&str, &str)]) -> GatewayProcess {
        Self::spawn_wrapped(&[], args, listeners, env).await
    }

    async fn spawn_wrapped(wrapper: &[&str], args: &[&str], listeners: usize, env: &[(&str, &str)]) -> GatewayProcess {
        let mut cmd = gatehouse_wrapped(wrapper);
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
        let mut p =
            GatewayProcess { child, pid, addrs: Vec::new(), admin: None, stderr, stdout, collectors, config: None };
        let waited = tokio::time::timeout(STEP, async {
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
        let addrs = waited.unwrap_or_else(|_| {
            panic!("timed out after {STEP:?}: gatehouse {args:?} to log `listening`:\n{}", p.stderr())
        });
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

    /// The admin listener's address, from its `admin listening` log line.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin.expect("gateway has no admin listener: call .admin() on the builder")
    }

    /// A client for the admin listener with the configured token.
    pub fn admin(&self) -> AdminClient {
        AdminClient::new(self.admin_addr(), Some(self.written().admin_token()))
    }

    /// `http://<first listener><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr())
    }

    /// The config this process was started with, kept after the process is gone (it is
    /// killed now if it still runs): to start the gateway again on the same files.
    pub fn into_written(mut self) -> WrittenConfig {
        self.config.take().expect("not started with serve()")
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

    /// Sends SIGINT (Ctrl-C): a graceful stop, like SIGTERM.
    pub fn sigint(&self) {
        self.signal("INT");
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

    /// The config file and everything it points to.
    pub fn written(&self) -> &WrittenConfig {
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

/// The address of the `admin listening` line in a JSON log.
fn admin_listening(log: &str) -> Option<SocketAddr> {
    log.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["message"] == "admin listening")
        .find_map(|v| v["address"].as_str().and_then(|a| a.parse().ok()))
}

/// The addresses of every `listening` line in a JSON log.
fn listening(log: &str) -> Vec<SocketAddr> {
    log.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["message"] == "listening")
        .filter_map(|v| v["address"].as_str().and_then(|a| a.parse().ok()))
        .collect()
}

/// A directory made really unwritable for the `gatehouse` processes a test starts through
/// [`ReadOnlyDir::wrapper`] — what a Kubernetes Secret mount is to the gateway.
///
/// Permission bits alone prove nothing when the tests run as root (root ignores them), so:
/// - as root: the processes run in their own mount namespace (`unshare -m`) in which the
///   directory is bind-mounted read-only over itself, so every write in it fails with
///   EROFS exactly as on a read-only mount; the test itself, outside that namespace, can
///   still read (and check) the files. Needs CAP_SYS_ADMIN, probed first.
/// - as root without mount namespaces (a container without CAP_SYS_ADMIN): the
///   directory and its files are given to the unprivileged `nobody` (65534), the
///   directory gets `chmod 0555`, and the processes run as `nobody` through `setpriv`,
///   so the kernel refuses their writes (EACCES) as it would on a real machine. Never a
///   skip: a test that could not make the directory read-only would prove nothing.
///   `GATEHOUSE_TEST_NO_UNSHARE=1` takes this path on a machine that has namespaces.
/// - as any other user: `chmod 0555` on the directory (EACCES), restored on drop.
pub struct ReadOnlyDir {
    dir: std::path::PathBuf,
    wrapper: Vec<String>,
    restore: Option<std::fs::Permissions>,
    /// Run as nobody: a copy of the binary that nobody can reach (the build directory may
    /// sit under a home only root can enter).
    _binary: Option<tempfile::TempDir>,
    /// How the directory was made read-only, for failure messages.
    pub how: &'static str,
}

/// This process's effective uid, from `/proc/self/status` (no libc: `unsafe` is forbidden).
pub fn euid() -> u32 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    line.split_whitespace().nth(2).unwrap().parse().unwrap()
}

impl ReadOnlyDir {
    /// Makes `dir` read-only for processes run through [`ReadOnlyDir::wrapper`]; `Err`
    /// says why this machine cannot (root without mount namespaces).
    pub fn new(dir: &Path) -> Result<ReadOnlyDir, String> {
        use std::os::unix::fs::PermissionsExt;
        let shown = dir.display().to_string();
        assert!(!shown.contains('\''), "{shown}: a quote in a temporary path");
        if euid() != 0 {
            let restore = std::fs::metadata(dir).unwrap().permissions();
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o555)).unwrap();
            return Ok(ReadOnlyDir {
                dir: dir.into(),
                wrapper: vec![],
                restore: Some(restore),
                _binary: None,
                how: "chmod 0555",
            });
        }
        let mount = format!("mount --bind -o ro '{shown}' '{shown}'");
        // The probe: the mount works, and a write under it then fails.
        let probe = format!("{mount} || exit 3; touch '{shown}/.probe' 2>/dev/null && exit 4; exit 0");
        let out = std::process::Command::new("unshare")
            .args(["-m", "sh", "-c", &probe])
            .output()
            .map_err(|e| format!("unshare: {e}"))?;
        let _ = std::fs::remove_file(dir.join(".probe"));
        if !out.status.success() || std::env::var_os("GATEHOUSE_TEST_NO_UNSHARE").is_some() {
            return Ok(ReadOnlyDir::as_nobody(dir));
        }
        let wrapper = ["unshare", "-m", "sh", "-c", &format!("{mount} && exec \"$0\" \"$@\"")];
        Ok(ReadOnlyDir {
            dir: dir.into(),
            wrapper: wrapper.iter().map(|s| s.to_string()).collect(),
            restore: None,
            _binary: None,
            how: "read-only bind mount (unshare -m)",
        })
    }

    /// Root without mount namespaces: the directory (and everything in it) belongs to
    /// `nobody`, mode 0555, and the processes run as `nobody`.
    fn as_nobody(dir: &Path) -> ReadOnlyDir {
        use std::os::unix::fs::PermissionsExt;
        const NOBODY: u32 = 65534;
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            std::os::unix::fs::lchown(&d, Some(NOBODY), Some(NOBODY)).unwrap();
            for e in std::fs::read_dir(&d).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() && !p.is_symlink() {
                    stack.push(p);
                } else {
                    std::os::unix::fs::lchown(&p, Some(NOBODY), Some(NOBODY)).unwrap();
                }
            }
        }
        let restore = std::fs::metadata(dir).unwrap().permissions();
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o555)).unwrap();
        let binary = tempfile::tempdir().unwrap();
        std::fs::set_permissions(binary.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let copy = binary.path().join("gatehouse");
        std::fs::copy(BIN, &copy).unwrap();
        std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755)).unwrap();
        // `sh -c SCRIPT BIN ARGS…`: the harness's binary path lands in $0, unused.
        let script = format!("exec '{}' \"$@\"", copy.display());
        let wrapper = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--", "sh", "-c", &script];
        ReadOnlyDir {
            dir: dir.into(),
            wrapper: wrapper.iter().map(|s| s.to_string()).collect(),
            restore: Some(restore),
            _binary: Some(binary),
            how: "chmod 0555, run as nobody (setpriv)",
        }
    }

    /// The command prefix to run `gatehouse` through (see [`run_cli_with`]).
    pub fn wrapper(&self) -> Vec<&str> {
        self.wrapper.iter().map(String::as_str).collect()
    }
}

impl Drop for ReadOnlyDir {
    fn drop(&mut self) {
        if let Some(p) = self.restore.take() {
            let _ = std::fs::set_permissions(&self.dir, p);
        }
    }
}

/// A command prefix under which every write that would make a file larger than 0 bytes
/// fails with EFBIG (`ulimit -f 0`; SIGXFSZ ignored so the write returns the error
/// instead of killing the process) — a full disk, for root as for anyone: the kernel
/// refuses the write itself.
pub const DISK_FULL: &[&str] = &["sh", "-c", "trap '' XFSZ; ulimit -f 0 && exec \"$0\" \"$@\""];
