//! The credential database (docs/credential-database.md): what `credentials.yaml` holds,
//! in PostgreSQL tables that every gateway loads and follows.
//!
//! - `schema.rs`: the embedded migrations and the version check;
//! - `model.rs`: rows ↔ the file model (`file.rs`), whole or by changed user and role;
//! - `store.rs` (the admin API's and CLI's writes) and `follow.rs` (a gateway keeping its
//!   snapshot current) build on both.

pub mod follow;
pub mod model;
pub mod schema;

use crate::config::credential_db::{CredentialDbConfig, DbTls};
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_postgres::NoTls;
use tokio_postgres_rustls::MakeRustlsConnect;

/// How long connecting (TCP and authentication) may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a statement may run before the server cancels it: no admin write or load
/// waits on a lock or a stalled server for longer.
const STATEMENT_TIMEOUT: &str = "10s";

/// Why the database cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// Connecting, authenticating, or a query failed (the server or the network).
    #[error("credential database {db}: {message}")]
    Unavailable { db: String, message: String },
    /// The schema is older than this binary (or absent).
    #[error(
        "credential database {db}: schema version {found}, this gatehouse needs {wanted}: run `gatehouse db migrate` (or set credentials_auto_migrate: true)"
    )]
    SchemaBehind { db: String, found: i32, wanted: i32 },
    /// The schema was migrated by a newer gatehouse: this one would misread it.
    #[error(
        "credential database {db}: schema version {found} is newer than this gatehouse knows ({wanted}): a downgrade is not supported; run the newer gatehouse"
    )]
    SchemaAhead { db: String, found: i32, wanted: i32 },
}

/// A small pool of connections to the credential database.
#[derive(Clone)]
pub struct Database {
    pool: Pool,
    /// The URL without its password, for logs and errors.
    describe: String,
    pg: tokio_postgres::Config,
    /// `None`: `sslmode=disable`.
    tls: Option<MakeRustlsConnect>,
}

impl std::fmt::Debug for Database {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Database({})", self.describe)
    }
}

impl Database {
    /// A pool for `cfg`, checked by one connection: a wrong password or an unreachable
    /// host is reported here, at start-up, not at the first write.
    pub async fn connect(cfg: &CredentialDbConfig) -> Result<Database, DbError> {
        let describe = cfg.describe();
        let unavailable = |message: String| DbError::Unavailable { db: describe.clone(), message };
        let mut pg: tokio_postgres::Config = cfg.url.parse().map_err(|e| unavailable(format!("{e}")))?;
        if let Some(p) = &cfg.password {
            pg.password(p.0.as_bytes());
        }
        pg.connect_timeout(CONNECT_TIMEOUT);
        pg.options(format!("-c statement_timeout={STATEMENT_TIMEOUT}"));
        pg.application_name("gatehouse");
        let tls = match &cfg.tls {
            DbTls::Disable => None,
            DbTls::Verify { ca } => {
                // TLS only: the driver must not fall back to plain text.
                pg.ssl_mode(tokio_postgres::config::SslMode::Require);
                Some(MakeRustlsConnect::new(client_config(ca.as_deref()).map_err(&unavailable)?))
            }
        };
        let recycling = ManagerConfig { recycling_method: RecyclingMethod::Fast };
        let manager = match &tls {
            None => Manager::from_config(pg.clone(), NoTls, recycling),
            Some(t) => Manager::from_config(pg.clone(), t.clone(), recycling),
        };
        let pool = Pool::builder(manager)
            .max_size(4)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(CONNECT_TIMEOUT))
            .create_timeout(Some(CONNECT_TIMEOUT))
            .recycle_timeout(Some(CONNECT_TIMEOUT))
            .build()
            .map_err(|e| unavailable(e.to_string()))?;
        let db = Database { pool, describe, pg, tls };
        drop(db.client().await?);
        Ok(db)
    }

    /// The URL without its password.
    pub fn describe(&self) -> &str {
        &self.describe
    }

    /// A pooled connection.
    pub async fn client(&self) -> Result<deadpool_postgres::Object, DbError> {
        self.pool.get().await.map_err(|e| self.unavailable(pool_error(e)))
    }

    /// A read-only, repeatable-read transaction on `client`: every query in it sees the
    /// store at one moment (a revision and the rows it describes agree).
    pub async fn moment<'c>(
        &self,
        client: &'c mut deadpool_postgres::Object,
    ) -> Result<deadpool_postgres::Transaction<'c>, DbError> {
        client
            .build_transaction()
            .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await
            .map_err(|e| self.query_error(e))
    }

    /// A connection of its own (not pooled) for LISTEN, and what its notifications
    /// become: one message on the channel each; the channel closes when the connection
    /// ends (the server or the network dropped it). The connection's task is returned to
    /// be aborted when the caller is done with it.
    pub async fn listen_connection(
        &self,
    ) -> Result<(tokio_postgres::Client, tokio::sync::mpsc::UnboundedReceiver<()>, tokio::task::JoinHandle<()>), DbError>
    {
        let late = || self.unavailable(format!("no connection within {CONNECT_TIMEOUT:?}"));
        match &self.tls {
            None => {
                let (client, conn) = tokio::time::timeout(CONNECT_TIMEOUT, self.pg.connect(NoTls))
                    .await
                    .map_err(|_| late())?
                    .map_err(|e| self.query_error(e))?;
                let (rx, task) = drive(conn);
                Ok((client, rx, task))
            }
            Some(t) => {
                let (client, conn) = tokio::time::timeout(CONNECT_TIMEOUT, self.pg.connect(t.clone()))
                    .await
                    .map_err(|_| late())?
                    .map_err(|e| self.query_error(e))?;
                let (rx, task) = drive(conn);
                Ok((client, rx, task))
            }
        }
    }

    pub fn unavailable(&self, message: String) -> DbError {
        DbError::Unavailable { db: self.describe.clone(), message }
    }

    pub fn query_error(&self, e: tokio_postgres::Error) -> DbError {
        self.unavailable(describe_pg_error(&e))
    }
}

/// Polls a connection for as long as it lives, forwarding each notification.
fn drive<S, T>(
    mut conn: tokio_postgres::Connection<S, T>,
) -> (tokio::sync::mpsc::UnboundedReceiver<()>, tokio::task::JoinHandle<()>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        loop {
            match std::future::poll_fn(|cx| conn.poll_message(cx)).await {
                Some(Ok(tokio_postgres::AsyncMessage::Notification(_))) => {
                    if tx.send(()).is_err() {
                        return;
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(_)) | None => return,
            }
        }
    });
    (rx, task)
}

/// rustls for the database: TLS 1.2+, the server verified against `ca` (PEM) or the
/// system's roots.
fn client_config(ca: Option<&std::path::Path>) -> Result<rustls::ClientConfig, String> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    match ca {
        Some(path) => {
            let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
                .and_then(|i| i.collect::<Result<_, _>>())
                .map_err(|e| format!("sslrootcert {}: {e}", path.display()))?;
            if certs.is_empty() {
                return Err(format!("sslrootcert {}: no certificate in it", path.display()));
            }
            for c in certs {
                roots.add(c).map_err(|e| format!("sslrootcert {}: {e}", path.display()))?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(found.certs);
            if roots.is_empty() {
                return Err("no system root certificates found: set sslrootcert= in the URL".into());
            }
        }
    }
    rustls::ClientConfig::builder_with_provider(crate::tls::provider())
        .with_safe_default_protocol_versions()
        .map(|b| b.with_root_certificates(roots).with_no_client_auth())
        .map_err(|e| e.to_string())
}

/// A driver error as one line: the server's own message when there is one.
pub fn describe_pg_error(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{}: {}", db.severity(), db.message()),
        None => {
            let mut s = e.to_string();
            let mut source = std::error::Error::source(e);
            while let Some(cause) = source {
                s.push_str(": ");
                s.push_str(&cause.to_string());
                source = cause.source();
            }
            s
        }
    }
}

fn pool_error(e: deadpool_postgres::PoolError) -> String {
    match e {
        deadpool_postgres::PoolError::Backend(e) => describe_pg_error(&e),
        deadpool_postgres::PoolError::Timeout(_) => format!("no connection within {CONNECT_TIMEOUT:?}"),
        other => other.to_string(),
    }
}
