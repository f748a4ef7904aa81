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

use crate::config::credential_db::CredentialDbConfig;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use std::time::Duration;
use tokio_postgres::NoTls;

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
        let manager =
            Manager::from_config(pg.clone(), NoTls, ManagerConfig { recycling_method: RecyclingMethod::Fast });
        let pool = Pool::builder(manager)
            .max_size(4)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(CONNECT_TIMEOUT))
            .create_timeout(Some(CONNECT_TIMEOUT))
            .recycle_timeout(Some(CONNECT_TIMEOUT))
            .build()
            .map_err(|e| unavailable(e.to_string()))?;
        let db = Database { pool, describe, pg };
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

    /// A connection of its own (not pooled), with the task that drives it: LISTEN needs
    /// its notifications, which a pooled connection's driver drops.
    pub async fn dedicated(
        &self,
    ) -> Result<
        (tokio_postgres::Client, tokio_postgres::Connection<tokio_postgres::Socket, tokio_postgres::tls::NoTlsStream>),
        DbError,
    > {
        tokio::time::timeout(CONNECT_TIMEOUT, self.pg.connect(NoTls))
            .await
            .map_err(|_| self.unavailable(format!("no connection within {CONNECT_TIMEOUT:?}")))?
            .map_err(|e| self.query_error(e))
    }

    pub fn unavailable(&self, message: String) -> DbError {
        DbError::Unavailable { db: self.describe.clone(), message }
    }

    pub fn query_error(&self, e: tokio_postgres::Error) -> DbError {
        self.unavailable(describe_pg_error(&e))
    }
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
