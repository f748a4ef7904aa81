//! Real PostgreSQL servers (Debian's, started with `initdb` and `postgres` on ephemeral
//! 127.0.0.1 ports): one shared by the tests that only need a database (each gets its
//! own database in it), private ones for tests that stop and start the server.
//!
//! PostgreSQL refuses to run as root: as root (CI), the server runs as the `postgres`
//! user that Debian's package creates, in a directory handed over to it. `.ci/run`
//! installs the package; a missing one fails the test.

use super::{STEP, within};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicU32, Ordering};
use tempfile::TempDir;
use tokio::process::{Child, Command};

/// The superuser the harness creates, and its password (password authentication, as a
/// real deployment's, so that a wrong password is refused).
pub const USER: &str = "gatehouse";
pub const PASSWORD: &str = "gatehouse-test-db-password";

fn bin(name: &str) -> PathBuf {
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|d| d.filter_map(Result::ok).map(|e| e.path().join("bin").join(name)).filter(|p| p.exists()).collect())
        .unwrap_or_default();
    found.sort();
    found.pop().unwrap_or_else(|| {
        panic!("PostgreSQL's {name} is not installed: `.ci/run` installs it (apt-get install postgresql)")
    })
}

/// The uid and gid to run PostgreSQL as: this process's unless it is root.
fn run_as() -> Option<(u32, u32)> {
    if super::process::euid() != 0 {
        return None;
    }
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap();
    let line = passwd
        .lines()
        .find(|l| l.starts_with("postgres:"))
        .expect("no postgres user: Debian's postgresql package creates it (`.ci/run` installs it)");
    let f: Vec<&str> = line.split(':').collect();
    Some((f[2].parse().unwrap(), f[3].parse().unwrap()))
}

fn command(path: PathBuf) -> Command {
    let mut c = Command::new(path);
    if let Some((uid, gid)) = run_as() {
        c.uid(uid).gid(gid);
    }
    c.env_remove("PGPASSWORD").env("LC_ALL", "C");
    c
}

/// One PostgreSQL server. Stopped (immediately) when dropped.
pub struct PgServer {
    pub port: u16,
    child: Option<Child>,
    dir: TempDir,
    extra: Vec<String>,
}

impl PgServer {
    /// `initdb`, then the server.
    pub async fn start() -> PgServer {
        Self::start_with_tls(None).await
    }

    /// A server that also speaks TLS with `cert` and `key` (PEM): `ssl=on`; plain
    /// connections are still accepted (the client chooses).
    pub async fn start_tls(cert: &str, key: &str) -> PgServer {
        Self::start_with_tls(Some((cert, key))).await
    }

    async fn start_with_tls(tls: Option<(&str, &str)>) -> PgServer {
        let dir = tempfile::tempdir().unwrap();
        if let Some((uid, gid)) = run_as() {
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).unwrap();
        }
        let pwfile = dir.path().join("pw");
        std::fs::write(&pwfile, PASSWORD).unwrap();
        if let Some((uid, gid)) = run_as() {
            std::os::unix::fs::chown(&pwfile, Some(uid), Some(gid)).unwrap();
        }
        let out = within(
            STEP * 3,
            "initdb",
            command(bin("initdb"))
                .arg("-D")
                .arg(dir.path().join("data"))
                .args(["-U", USER, "--auth=scram-sha-256", "-E", "UTF8", "--no-sync", "--no-instructions"])
                .arg(format!("--pwfile={}", pwfile.display()))
                .output(),
        )
        .await
        .unwrap();
        assert!(out.status.success(), "initdb: {}", String::from_utf8_lossy(&out.stderr));
        let mut extra = Vec::new();
        if let Some((cert, key)) = tls {
            use std::os::unix::fs::PermissionsExt;
            let (c, k) = (dir.path().join("server.crt"), dir.path().join("server.key"));
            std::fs::write(&c, cert).unwrap();
            std::fs::write(&k, key).unwrap();
            // PostgreSQL refuses a key that others can read.
            std::fs::set_permissions(&k, std::fs::Permissions::from_mode(0o600)).unwrap();
            if let Some((uid, gid)) = run_as() {
                for f in [&c, &k] {
                    std::os::unix::fs::chown(f, Some(uid), Some(gid)).unwrap();
                }
            }
            for setting in [
                "ssl=on".to_string(),
                format!("ssl_cert_file={}", c.display()),
                format!("ssl_key_file={}", k.display()),
            ] {
                extra.extend(["-c".to_string(), setting]);
            }
        }
        let mut s = PgServer { port: super::free_port(), child: None, dir, extra };
        s.spawn().await;
        s
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Starts the server and waits for "ready to accept connections".
    async fn spawn(&mut self) {
        let mut c = command(bin("postgres"));
        c.arg("-D")
            .arg(self.data())
            .arg("-p")
            .arg(self.port.to_string())
            .arg("-k")
            .arg(self.dir.path())
            .args(["-c", "listen_addresses=127.0.0.1", "-c", "fsync=off", "-c", "synchronous_commit=off"])
            .args(["-c", "full_page_writes=off", "-c", "max_connections=300", "-c", "shared_buffers=32MB"])
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = c.spawn().unwrap();
        let what = format!("postgres on port {} to accept connections", self.port);
        super::await_ready_line(child.stderr.take().unwrap(), "database system is ready to accept connections", &what)
            .await;
        self.child = Some(child);
    }

    /// A fast shutdown (SIGINT: connections are closed, the server exits), waited for.
    pub async fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let pid = c.id().unwrap().to_string();
            assert!(std::process::Command::new("kill").args(["-INT", &pid]).status().unwrap().success());
            within(STEP, "postgres to stop", c.wait()).await.unwrap();
        }
    }

    /// Starts it again on the same port and data.
    pub async fn start_again(&mut self) {
        self.spawn().await;
    }

    /// The URL of database `db` (password in it).
    pub fn url(&self, db: &str) -> String {
        format!("postgres://{USER}:{PASSWORD}@127.0.0.1:{}/{db}?sslmode=disable", self.port)
    }

    /// A client connected to database `db` (plain TCP).
    pub async fn client(&self, db: &str) -> tokio_postgres::Client {
        client(self.port, db).await
    }

    /// Creates database `name`.
    pub async fn create_database(&self, name: &str) {
        create_database(self.port, name).await;
    }
}

/// A client of database `db` on the server at `port`.
pub async fn client(port: u16, db: &str) -> tokio_postgres::Client {
    let url = format!("postgres://{USER}:{PASSWORD}@127.0.0.1:{port}/{db}?sslmode=disable");
    let (client, conn) =
        within(STEP, "connecting to postgres", tokio_postgres::connect(&url, tokio_postgres::NoTls)).await.unwrap();
    tokio::spawn(conn);
    client
}

async fn create_database(port: u16, name: &str) {
    let c = client(port, "postgres").await;
    c.batch_execute(&format!("CREATE DATABASE \"{name}\"")).await.unwrap();
}

/// The server every test of this binary may share.
pub async fn shared() -> u16 {
    static PORT: tokio::sync::OnceCell<u16> = tokio::sync::OnceCell::const_new();
    *PORT
        .get_or_init(|| async {
            super::outliving_the_tests(|| async {
                let server = PgServer::start().await;
                // SIGQUIT: an immediate shutdown (its data is about to be removed).
                let pid = server.child.as_ref().and_then(Child::id).unwrap();
                super::reap_at_exit(pid, "QUIT", server.dir.path());
                (server.port, server)
            })
        })
        .await
}

/// A new, empty database on the shared server: its URL.
pub async fn fresh_database(test: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let name = format!("t{}_{test}", N.fetch_add(1, Ordering::Relaxed));
    let port = shared().await;
    create_database(port, &name).await;
    format!("postgres://{USER}:{PASSWORD}@127.0.0.1:{port}/{name}?sslmode=disable")
}
