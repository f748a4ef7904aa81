//! Rows ↔ the file model: the whole store (a gateway's start, an export, a write's
//! read), the users and roles one change touched, and a write as the difference between
//! two models.

use crate::credentials::file::{
    AuthMethod, FileCredentials, FileKey, FileRateLimit, FileRole, FileUser, Status, spanned,
};
use std::collections::{BTreeMap, HashMap, HashSet};
use tokio_postgres::{GenericClient, Row};

type PgResult<T> = Result<T, tokio_postgres::Error>;

const USER_COLUMNS: &str = "id, display_name, description, organization, teams, default_team, roles, status, \
     auth_method, allowed_endpoints, allow_proxied_users, allowed_proxied_users, rate_per_second, rate_burst, \
     created_at, updated_at";
const KEY_COLUMNS: &str = "user_id, id, label, created_at, expires_at, revoked_at, token_sha256, hint, \
     secret_sealed, rate_per_second, rate_burst";

/// What the file model cannot hold, found in a row (a hand edit): named by its row.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BadRow(pub String);

/// A write failed: the database, or a key id that is another user's.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error(transparent)]
    Pg(#[from] tokio_postgres::Error),
    #[error("key {key:?} exists under another user than {user:?}")]
    KeyOfAnother { key: String, user: String },
}

/// A read failed: the database, or a row the model cannot hold.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error(transparent)]
    Pg(#[from] tokio_postgres::Error),
    #[error(transparent)]
    Row(#[from] BadRow),
}

fn rate(per_second: Option<i64>, burst: Option<i64>, row: &str) -> Result<Option<FileRateLimit>, BadRow> {
    match (per_second, burst) {
        (Some(p), Some(b)) => match (u32::try_from(p), u32::try_from(b)) {
            (Ok(per_second), Ok(burst)) => Ok(Some(FileRateLimit { per_second, burst })),
            _ => Err(BadRow(format!("{row}: rate limit {p}/{b} is out of range"))),
        },
        _ => Ok(None),
    }
}

fn status(s: &str, row: &str) -> Result<Status, BadRow> {
    match s {
        "active" => Ok(Status::Active),
        "inactive" => Ok(Status::Inactive),
        "retired" => Ok(Status::Retired),
        other => Err(BadRow(format!("{row}: unknown status {other:?}"))),
    }
}

fn status_text(s: Status) -> &'static str {
    match s {
        Status::Active => "active",
        Status::Inactive => "inactive",
        Status::Retired => "retired",
    }
}

fn method_text(m: AuthMethod) -> &'static str {
    match m {
        AuthMethod::ApiKey => "api_key",
        AuthMethod::Hmac => "hmac",
    }
}

fn user_from(row: &Row) -> Result<FileUser, BadRow> {
    let id: String = row.get("id");
    let name = format!("gatehouse_users row {id:?}");
    let auth_method = match row.get::<_, &str>("auth_method") {
        "api_key" => AuthMethod::ApiKey,
        "hmac" => AuthMethod::Hmac,
        other => return Err(BadRow(format!("{name}: unknown auth_method {other:?}"))),
    };
    Ok(FileUser {
        display_name: row.get("display_name"),
        description: row.get("description"),
        organization: row.get("organization"),
        teams: row.get("teams"),
        default_team: row.get("default_team"),
        roles: row.get::<_, Vec<String>>("roles").into_iter().map(spanned).collect(),
        status: status(row.get("status"), &name)?,
        auth_method,
        allowed_endpoints: row.get::<_, Vec<String>>("allowed_endpoints").into_iter().map(spanned).collect(),
        allow_proxied_users: row.get("allow_proxied_users"),
        allowed_proxied_users: row.get("allowed_proxied_users"),
        rate_limit: rate(row.get("rate_per_second"), row.get("rate_burst"), &name)?.map(spanned),
        keys: Vec::new(),
        created_at: row.get("created_at"),
        updated_at: row.get("updated_at"),
        id: spanned(id),
    })
}

fn key_from(row: &Row) -> Result<(String, FileKey), BadRow> {
    let id: String = row.get("id");
    let name = format!("gatehouse_keys row {id:?}");
    Ok((
        row.get("user_id"),
        FileKey {
            label: row.get("label"),
            created_at: row.get("created_at"),
            expires_at: row.get("expires_at"),
            revoked_at: row.get("revoked_at"),
            token_sha256: row.get("token_sha256"),
            hint: row.get("hint"),
            secret_sealed: row.get("secret_sealed"),
            rate_limit: rate(row.get("rate_per_second"), row.get("rate_burst"), &name)?,
            id: spanned(id),
        },
    ))
}

fn role_from(row: &Row) -> (String, FileRole) {
    let rules: Vec<String> = row.get("rules");
    (row.get("name"), FileRole { description: row.get("description"), rules: rules.into_iter().map(spanned).collect() })
}

/// Users with their keys, in the order they were added.
fn assemble(users: Vec<Row>, keys: Vec<Row>) -> Result<Vec<FileUser>, BadRow> {
    let mut out = Vec::with_capacity(users.len());
    let mut at = HashMap::with_capacity(users.len());
    for row in &users {
        let u = user_from(row)?;
        at.insert(u.id.value.clone(), out.len());
        out.push(u);
    }
    for row in &keys {
        let (user, key) = key_from(row)?;
        // The foreign key makes a key without its user impossible, but a read of keys
        // for some users only may see one whose user moved: it is not this read's.
        if let Some(&i) = at.get(&user) {
            out[i].keys.push(key);
        }
    }
    Ok(out)
}

/// The store's revision: the last change it holds.
pub async fn revision(c: &impl GenericClient) -> PgResult<i64> {
    Ok(c.query_one("SELECT revision FROM gatehouse_revision", &[]).await?.get(0))
}

/// The whole store. Run it in a repeatable-read transaction with [`revision`] to have
/// both describe the same moment.
pub async fn load_all(c: &impl GenericClient) -> Result<FileCredentials, ReadError> {
    let roles = c.query("SELECT name, description, rules FROM gatehouse_roles ORDER BY name", &[]).await?;
    let users = c.query(&format!("SELECT {USER_COLUMNS} FROM gatehouse_users ORDER BY seq"), &[]).await?;
    let keys = c.query(&format!("SELECT {KEY_COLUMNS} FROM gatehouse_keys ORDER BY seq"), &[]).await?;
    Ok(FileCredentials { roles: roles.iter().map(role_from).collect(), users: assemble(users, keys)? })
}

/// Every role and the user `id` (if it exists): what a change to that user needs.
pub async fn load_user_scope(c: &impl GenericClient, id: &str) -> Result<FileCredentials, ReadError> {
    let roles = c.query("SELECT name, description, rules FROM gatehouse_roles ORDER BY name", &[]).await?;
    let (users, _) = load_some(c, &[id.to_string()], &[]).await?;
    Ok(FileCredentials { roles: roles.iter().map(role_from).collect(), users })
}

/// What changed after revision `since`: the users and roles to read again.
#[derive(Debug, Default)]
pub struct Changed {
    pub users: Vec<String>,
    pub roles: Vec<String>,
    /// The changes since `since` were pruned: only a whole reload is exact.
    pub gap: bool,
    pub count: usize,
}

/// The users and roles changed after `since`, up to `until` (both revisions).
pub async fn changed_since(c: &impl GenericClient, since: i64, until: i64) -> PgResult<Changed> {
    let rows = c
        .query(
            "SELECT kind, name, revision FROM gatehouse_changes WHERE revision > $1 AND revision <= $2 ORDER BY revision",
            &[&since, &until],
        )
        .await?;
    let mut out = Changed { count: rows.len(), ..Changed::default() };
    // Every revision in (since, until] has its rows unless pruning took them.
    let first: Option<i64> = rows.first().map(|r| r.get(2));
    out.gap = until > since && first != Some(since + 1);
    let (mut users, mut roles) = (HashSet::new(), HashSet::new());
    for r in rows {
        let (kind, name): (&str, String) = (r.get(0), r.get(1));
        let set = if kind == "role" { &mut roles } else { &mut users };
        set.insert(name);
    }
    out.users = users.into_iter().collect();
    out.roles = roles.into_iter().collect();
    Ok(out)
}

/// The current rows of these users (absent: deleted) and roles.
pub async fn load_some(
    c: &impl GenericClient,
    users: &[String],
    roles: &[String],
) -> Result<(Vec<FileUser>, BTreeMap<String, FileRole>), ReadError> {
    let r = c.query("SELECT name, description, rules FROM gatehouse_roles WHERE name = ANY($1)", &[&roles]).await?;
    let u = c
        .query(&format!("SELECT {USER_COLUMNS} FROM gatehouse_users WHERE id = ANY($1) ORDER BY seq"), &[&users])
        .await?;
    let k = c
        .query(&format!("SELECT {KEY_COLUMNS} FROM gatehouse_keys WHERE user_id = ANY($1) ORDER BY seq"), &[&users])
        .await?;
    Ok((assemble(u, k)?, r.iter().map(role_from).collect()))
}

/// Writes what differs between `old` (what the transaction read) and `new`: inserts,
/// updates and deletes of roles, users and keys, nothing for what is unchanged.
///
/// The statements are prepared once and sent pipelined (many in flight on the
/// connection, answered in order): an import of 100,000 users is not 200,000 round trips.
pub async fn write_difference(
    c: &impl GenericClient,
    old: &FileCredentials,
    new: &FileCredentials,
) -> Result<(), WriteError> {
    for (name, role) in &new.roles {
        let same = old.roles.get(name).is_some_and(|o| same_json(o, role));
        if !same {
            let rules: Vec<&str> = role.rules.iter().map(|r| r.value.as_str()).collect();
            c.execute(
                "INSERT INTO gatehouse_roles (name, description, rules) VALUES ($1, $2, $3)
                 ON CONFLICT (name) DO UPDATE SET description = EXCLUDED.description, rules = EXCLUDED.rules",
                &[name, &role.description, &rules],
            )
            .await?;
        }
    }
    let new_users: HashMap<&str, &FileUser> = new.users.iter().map(|u| (u.id.value.as_str(), u)).collect();
    let gone_users: Vec<&str> =
        old.users.iter().map(|u| u.id.value.as_str()).filter(|id| !new_users.contains_key(id)).collect();
    if !gone_users.is_empty() {
        c.execute("DELETE FROM gatehouse_users WHERE id = ANY($1)", &[&gone_users]).await?;
    }
    let old_users: HashMap<&str, &FileUser> = old.users.iter().map(|u| (u.id.value.as_str(), u)).collect();
    let (mut users, mut keys, mut gone_keys) = (Vec::new(), Vec::new(), Vec::new());
    for u in &new.users {
        match old_users.get(u.id.value.as_str()) {
            None => {
                users.push(u);
                keys.extend(u.keys.iter().map(|k| (u.id.value.as_str(), k)));
            }
            Some(o) => {
                if !same_json(&without_keys(o), &without_keys(u)) {
                    users.push(u);
                }
                let old_keys: HashMap<&str, &FileKey> = o.keys.iter().map(|k| (k.id.value.as_str(), k)).collect();
                let new_keys: HashSet<&str> = u.keys.iter().map(|k| k.id.value.as_str()).collect();
                gone_keys.extend(o.keys.iter().map(|k| k.id.value.as_str()).filter(|id| !new_keys.contains(id)));
                for k in &u.keys {
                    if !old_keys.get(k.id.value.as_str()).is_some_and(|ok| same_json(*ok, k)) {
                        keys.push((u.id.value.as_str(), k));
                    }
                }
            }
        }
    }
    if !gone_keys.is_empty() {
        c.execute("DELETE FROM gatehouse_keys WHERE id = ANY($1)", &[&gone_keys]).await?;
    }
    if !users.is_empty() {
        let stmt = c.prepare(&upsert_user_sql()).await?;
        for chunk in users.chunks(PIPELINE) {
            futures_util::future::try_join_all(chunk.iter().map(|u| upsert_user(c, &stmt, u))).await?;
        }
    }
    if !keys.is_empty() {
        let stmt = c.prepare(&upsert_key_sql()).await?;
        for chunk in keys.chunks(PIPELINE) {
            let written =
                futures_util::future::try_join_all(chunk.iter().map(|(user, k)| upsert_key(c, &stmt, user, k))).await?;
            // Zero rows: the id is another user's key (the upsert never moves a key).
            if let Some(((user, k), _)) = chunk.iter().zip(&written).find(|(_, n)| **n == 0) {
                return Err(WriteError::KeyOfAnother { key: k.id.value.clone(), user: (*user).to_string() });
            }
        }
    }
    // Roles last: a role still named by a user row is deleted only after that user's
    // update (the ops refuse deleting a role in use; this keeps the order harmless).
    let gone_roles: Vec<&str> = old.roles.keys().map(String::as_str).filter(|n| !new.roles.contains_key(*n)).collect();
    if !gone_roles.is_empty() {
        c.execute("DELETE FROM gatehouse_roles WHERE name = ANY($1)", &[&gone_roles]).await?;
    }
    Ok(())
}

/// Statements in flight at once on the write's connection.
const PIPELINE: usize = 512;

fn without_keys(u: &FileUser) -> FileUser {
    FileUser { keys: Vec::new(), ..u.clone() }
}

/// Equality of two file-model values as they would be written.
fn same_json<T: serde::Serialize>(a: &T, b: &T) -> bool {
    match (serde_json::to_value(a), serde_json::to_value(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

fn rate_columns(r: Option<FileRateLimit>) -> (Option<i64>, Option<i64>) {
    r.map_or((None, None), |r| (Some(i64::from(r.per_second)), Some(i64::from(r.burst))))
}

fn upsert_user_sql() -> String {
    format!(
            "INSERT INTO gatehouse_users ({USER_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16)
             ON CONFLICT (id) DO UPDATE SET display_name = EXCLUDED.display_name, description = EXCLUDED.description,
               organization = EXCLUDED.organization, teams = EXCLUDED.teams, default_team = EXCLUDED.default_team,
               roles = EXCLUDED.roles, status = EXCLUDED.status, auth_method = EXCLUDED.auth_method,
               allowed_endpoints = EXCLUDED.allowed_endpoints, allow_proxied_users = EXCLUDED.allow_proxied_users,
               allowed_proxied_users = EXCLUDED.allowed_proxied_users, rate_per_second = EXCLUDED.rate_per_second,
               rate_burst = EXCLUDED.rate_burst, created_at = EXCLUDED.created_at, updated_at = EXCLUDED.updated_at"
        )
}

async fn upsert_user(c: &impl GenericClient, stmt: &tokio_postgres::Statement, u: &FileUser) -> PgResult<u64> {
    let roles: Vec<&str> = u.roles.iter().map(|r| r.value.as_str()).collect();
    let endpoints: Vec<&str> = u.allowed_endpoints.iter().map(|r| r.value.as_str()).collect();
    let (per_second, burst) = rate_columns(u.rate_limit.as_ref().map(|r| r.value));
    c.execute(
        stmt,
        &[
            &u.id.value,
            &u.display_name,
            &u.description,
            &u.organization,
            &u.teams,
            &u.default_team,
            &roles,
            &status_text(u.status),
            &method_text(u.auth_method),
            &endpoints,
            &u.allow_proxied_users,
            &u.allowed_proxied_users,
            &per_second,
            &burst,
            &u.created_at,
            &u.updated_at,
        ],
    )
    .await
}

fn upsert_key_sql() -> String {
    format!(
        "INSERT INTO gatehouse_keys ({KEY_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
             ON CONFLICT (id) DO UPDATE SET label = EXCLUDED.label,
               created_at = EXCLUDED.created_at, expires_at = EXCLUDED.expires_at, revoked_at = EXCLUDED.revoked_at,
               token_sha256 = EXCLUDED.token_sha256, hint = EXCLUDED.hint, secret_sealed = EXCLUDED.secret_sealed,
               rate_per_second = EXCLUDED.rate_per_second, rate_burst = EXCLUDED.rate_burst"
    )
}

async fn upsert_key(
    c: &impl GenericClient,
    stmt: &tokio_postgres::Statement,
    user: &str,
    k: &FileKey,
) -> PgResult<u64> {
    let (per_second, burst) = rate_columns(k.rate_limit);
    c.execute(
        stmt,
        &[
            &user,
            &k.id.value,
            &k.label,
            &k.created_at,
            &k.expires_at,
            &k.revoked_at,
            &k.token_sha256,
            &k.hint,
            &k.secret_sealed,
            &per_second,
            &burst,
        ],
    )
    .await
}
