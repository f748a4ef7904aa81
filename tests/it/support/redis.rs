//! Real `redis-server` processes on ephemeral 127.0.0.1 ports: one shared by the tests
//! that only need a Redis (each with its own key prefix), and private ones for tests that
//! stop, restart or cluster them. `.ci/run` installs Redis; a missing one fails the test.

use super::{STEP, within};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU32, Ordering};
use tempfile::TempDir;
use tokio::process::{Child, Command};

fn which(name: &str) -> PathBuf {
    for dir in ["/usr/bin", "/usr/local/bin", "/usr/sbin"] {
        let p = Path::new(dir).join(name);
        if p.exists() {
            return p;
        }
    }
    panic!("{name} is not installed: `.ci/run` installs it (apt-get install redis-server redis-tools)");
}

/// One `redis-server`. Killed when dropped.
pub struct RedisServer {
    pub port: u16,
    child: Option<Child>,
    dir: TempDir,
    extra: Vec<String>,
}

impl RedisServer {
    /// A standalone server without persistence.
    pub async fn start() -> RedisServer {
        Self::start_with(&[]).await
    }

    /// A server with extra `redis-server` arguments (e.g. `--appendonly yes`).
    pub async fn start_with(extra: &[&str]) -> RedisServer {
        let dir = tempfile::tempdir().unwrap();
        let mut r = RedisServer {
            port: super::free_port(),
            child: None,
            dir,
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        r.spawn().await;
        r
    }

    /// A server that speaks only TLS on its port, with `cert` and `key` (PEM files); clients
    /// are not asked for certificates.
    pub async fn start_tls(cert: &Path, key: &Path) -> RedisServer {
        let dir = tempfile::tempdir().unwrap();
        let port = super::free_port();
        let extra = vec![
            "--tls-port".to_string(),
            port.to_string(),
            "--tls-cert-file".to_string(),
            cert.display().to_string(),
            "--tls-key-file".to_string(),
            key.display().to_string(),
            "--tls-auth-clients".to_string(),
            "no".to_string(),
        ];
        // `--port 0` comes after `--port PORT` in `spawn`: no plain-text port at all.
        let mut r = RedisServer {
            port,
            child: None,
            dir,
            extra: [vec!["--port".to_string(), "0".to_string()], extra].concat(),
        };
        r.spawn().await;
        r
    }

    /// Starts the process and waits for its "Ready to accept connections" line.
    async fn spawn(&mut self) {
        let mut c = Command::new(which("redis-server"));
        c.arg("--port")
            .arg(self.port.to_string())
            .args(["--bind", "127.0.0.1", "--save", "", "--daemonize", "no", "--protected-mode", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .args(&self.extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = c.spawn().unwrap();
        let what = format!("redis-server on port {} to accept connections", self.port);
        super::await_ready_line(child.stdout.take().unwrap(), "Ready to accept connections", &what).await;
        self.child = Some(child);
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// SIGKILL, and waits for the process to be gone.
    pub async fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().await.unwrap();
        }
    }

    /// Starts it again on the same port and directory (with `--appendonly yes` the data
    /// written before comes back).
    pub async fn restart(&mut self) {
        self.kill().await;
        self.spawn().await;
    }

    /// SIGSTOP: the process keeps its port but answers nothing (a hung Redis).
    pub fn pause(&self) {
        signal(self.child.as_ref().unwrap(), "STOP");
    }

    /// SIGCONT after [`RedisServer::pause`].
    pub fn resume(&self) {
        signal(self.child.as_ref().unwrap(), "CONT");
    }

    /// `redis-cli -p PORT ARGS…`, its stdout.
    pub async fn cli(&self, args: &[&str]) -> String {
        cli(self.port, args).await
    }
}

fn signal(child: &Child, sig: &str) {
    let pid = child.id().unwrap().to_string();
    let ok = std::process::Command::new("kill").args([&format!("-{sig}"), &pid]).status().unwrap().success();
    assert!(ok, "kill -{sig} {pid}");
}

/// `redis-cli -p PORT ARGS…`, its stdout.
pub async fn cli(port: u16, args: &[&str]) -> String {
    let out =
        within(STEP, "redis-cli", Command::new(which("redis-cli")).arg("-p").arg(port.to_string()).args(args).output())
            .await
            .unwrap();
    assert!(out.status.success(), "redis-cli {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The Redis every test of this binary may share. Tests keep apart by key prefix.
pub async fn shared() -> u16 {
    static PORT: tokio::sync::OnceCell<u16> = tokio::sync::OnceCell::const_new();
    *PORT
        .get_or_init(|| async {
            super::outliving_the_tests(|| async {
                let server = RedisServer::start().await;
                let pid = server.child.as_ref().and_then(Child::id).unwrap();
                super::reap_at_exit(pid, "TERM", server.dir.path());
                (server.port, server)
            })
        })
        .await
}

/// A key prefix no other test uses.
pub fn unique_prefix(test: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!("t{}:{test}:", N.fetch_add(1, Ordering::Relaxed))
}

/// A three-node Redis Cluster (masters only), created with `redis-cli --cluster create`.
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    pub async fn start() -> RedisCluster {
        let mut nodes = Vec::new();
        for _ in 0..3 {
            nodes.push(
                RedisServer::start_with(&["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"]).await,
            );
        }
        let addrs: Vec<String> = nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)).collect();
        let mut args = vec!["--cluster", "create"];
        args.extend(addrs.iter().map(String::as_str));
        args.push("--cluster-yes");
        cli(nodes[0].port, &args).await;
        // `--cluster create` returns once slots are assigned; wait for every node to agree.
        let cluster = RedisCluster { nodes };
        cluster.wait_ok().await;
        cluster
    }

    /// Waits until every node reports `cluster_state:ok`.
    pub async fn wait_ok(&self) {
        within(STEP, "the cluster to be ok", async {
            loop {
                let mut ok = true;
                for n in &self.nodes {
                    ok &= n.cli(&["cluster", "info"]).await.contains("cluster_state:ok");
                }
                if ok {
                    return;
                }
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        })
        .await;
    }

    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(RedisServer::url).collect()
    }
}

/// A TCP relay in front of a Redis, with the faults a network between gateway and Redis
/// has: answers held up (`slow_answers`), new connections held up (`slow_connects`), and
/// every existing connection silently dropped (`drop_existing`: nothing passes on it any
/// more, either way, and it stays open — what a flow a NAT or firewall forgot looks like).
pub struct Relay {
    pub addr: std::net::SocketAddr,
    faults: std::sync::Arc<Faults>,
}

#[derive(Default)]
struct Faults {
    /// Each chunk of Redis's answers waits this long (ms; 0: none).
    answer_delay_ms: AtomicU32,
    /// Each new connection waits this long before it is relayed (ms).
    connect_delay_ms: AtomicU32,
    /// Connections accepted before it last changed pass nothing.
    generation: AtomicU32,
}

impl Relay {
    pub async fn start(redis_port: u16) -> Relay {
        use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let faults = std::sync::Arc::new(Faults::default());
        let shared = faults.clone();
        tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let faults = shared.clone();
                let born = faults.generation.load(Ordering::SeqCst);
                tokio::spawn(async move {
                    let wait = faults.connect_delay_ms.load(Ordering::SeqCst);
                    tokio::time::sleep(std::time::Duration::from_millis(wait.into())).await;
                    let Ok(outbound) = tokio::net::TcpStream::connect(("127.0.0.1", redis_port)).await else { return };
                    let (from_client, to_client) = inbound.into_split();
                    let (from_redis, to_redis) = outbound.into_split();
                    type Half = (Box<dyn AsyncRead + Send + Unpin>, Box<dyn AsyncWrite + Send + Unpin>, bool);
                    let halves: [Half; 2] = [
                        (Box::new(from_client), Box::new(to_redis), false),
                        (Box::new(from_redis), Box::new(to_client), true),
                    ];
                    for (mut from, mut to, answers) in halves {
                        let faults = faults.clone();
                        tokio::spawn(async move {
                            let mut buf = vec![0u8; 64 * 1024];
                            while let Ok(n) = from.read(&mut buf).await {
                                if n == 0 {
                                    break;
                                }
                                if faults.generation.load(Ordering::SeqCst) != born {
                                    std::future::pending::<()>().await;
                                }
                                let delay = faults.answer_delay_ms.load(Ordering::SeqCst);
                                if answers && delay > 0 {
                                    tokio::time::sleep(std::time::Duration::from_millis(delay.into())).await;
                                }
                                if to.write_all(&buf[..n]).await.is_err() {
                                    break;
                                }
                            }
                        });
                    }
                });
            }
        });
        Relay { addr, faults }
    }

    /// `redis://` to the relay.
    pub fn url(&self) -> String {
        format!("redis://{}", self.addr)
    }

    /// Holds each chunk of Redis's answers `ms` (0: none).
    pub fn slow_answers(&self, ms: u32) {
        self.faults.answer_delay_ms.store(ms, Ordering::SeqCst);
    }

    /// Holds each new connection `ms` before relaying it.
    pub fn slow_connects(&self, ms: u32) {
        self.faults.connect_delay_ms.store(ms, Ordering::SeqCst);
    }

    /// Every connection open now passes nothing more; new ones work.
    pub fn drop_existing(&self) {
        self.faults.generation.fetch_add(1, Ordering::SeqCst);
    }
}
