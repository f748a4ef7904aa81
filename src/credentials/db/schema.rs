//! The schema's migrations, embedded in the binary and applied in order, each once.
//!
//! `gatehouse db migrate` (or `credentials_auto_migrate: true` at start-up) runs them in
//! one transaction under an advisory lock: gateways that start together wait for the
//! first, then find nothing left to do. A database migrated by a newer binary is refused
//! (a downgrade would misread it).

use super::{Database, DbError};

/// (version, what it does, SQL).
const MIGRATIONS: &[(i32, &str, &str)] = &[
    (1, "credential store", include_str!("migrations/0001_init.sql")),
    (2, "admin tokens", include_str!("migrations/0002_admin_tokens.sql")),
];

/// The schema version this binary reads and writes.
pub const CURRENT: i32 = 2;

/// An arbitrary constant that names Gatehouse's migration lock among the database's
/// advisory locks ("gatehous" in ASCII).
const LOCK_ID: i64 = 0x6761_7465_686f_7573;

/// The schema version of the database (0: none yet).
pub async fn version(client: &impl tokio_postgres::GenericClient) -> Result<i32, tokio_postgres::Error> {
    let exists: bool = client.query_one("SELECT to_regclass('gatehouse_schema') IS NOT NULL", &[]).await?.get(0);
    if !exists {
        return Ok(0);
    }
    let v: Option<i32> = client.query_one("SELECT max(version) FROM gatehouse_schema", &[]).await?.get(0);
    Ok(v.unwrap_or(0))
}

/// Refuses a schema this binary cannot use.
pub async fn check(db: &Database) -> Result<(), DbError> {
    let client = db.client().await?;
    let found = version(&**client).await.map_err(|e| db.query_error(e))?;
    compare(db, found)
}

fn compare(db: &Database, found: i32) -> Result<(), DbError> {
    match found.cmp(&CURRENT) {
        std::cmp::Ordering::Equal => Ok(()),
        std::cmp::Ordering::Less => {
            Err(DbError::SchemaBehind { db: db.describe().to_string(), found, wanted: CURRENT })
        }
        std::cmp::Ordering::Greater => {
            Err(DbError::SchemaAhead { db: db.describe().to_string(), found, wanted: CURRENT })
        }
    }
}

/// Applies the migrations the database lacks; the versions applied (none: up to date).
pub async fn migrate(db: &Database) -> Result<Vec<i32>, DbError> {
    let mut client = db.client().await?;
    let tx = client.transaction().await.map_err(|e| db.query_error(e))?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&LOCK_ID]).await.map_err(|e| db.query_error(e))?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS gatehouse_schema (
            version integer PRIMARY KEY,
            description text NOT NULL,
            applied_at timestamptz NOT NULL DEFAULT now()
        )",
    )
    .await
    .map_err(|e| db.query_error(e))?;
    let found = version(&*tx).await.map_err(|e| db.query_error(e))?;
    if found > CURRENT {
        return Err(DbError::SchemaAhead { db: db.describe().to_string(), found, wanted: CURRENT });
    }
    let mut applied = Vec::new();
    for (v, description, sql) in MIGRATIONS.iter().filter(|(v, _, _)| *v > found) {
        tx.batch_execute(sql)
            .await
            .map_err(|e| db.unavailable(format!("migration {v}: {}", super::describe_pg_error(&e))))?;
        tx.execute("INSERT INTO gatehouse_schema (version, description) VALUES ($1, $2)", &[v, description])
            .await
            .map_err(|e| db.query_error(e))?;
        applied.push(*v);
    }
    tx.commit().await.map_err(|e| db.query_error(e))?;
    Ok(applied)
}
