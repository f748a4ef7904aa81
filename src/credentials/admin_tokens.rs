//! Named admin tokens (docs/admin.md#admin-tokens): `gha_…` bearer tokens for the admin
//! API and the console, each with a role, stored like API keys (SHA-256 and a hint, never
//! the token), with an optional expiry, revocable.
//!
//! They are kept beside the credentials — `admin-tokens.yaml` next to the credentials
//! file (same directory, mode 0600, its own lock), or the `gatehouse_admin_tokens` table of
//! the credential database — and read on every admin call, so a revocation is in force on
//! the next call of every gateway that reads the same store. They are not part of the
//! proxy's snapshot: nothing on the request path depends on them.

use super::secrets::{self, Secret};
use super::store::{Store, StoreError, io, refuse_read_only, write_atomically};
use serde::{Deserialize, Serialize};
use std::fs::OpenOptions;
use std::path::PathBuf;
use subtle::ConstantTimeEq;
use time::OffsetDateTime;

/// What an admin token may do; each role can do everything the one before it can.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AdminRole {
    /// Reads users, keys, roles, usage and the audit log.
    Viewer,
    /// Viewer, and creates, updates, disables users; adds, revokes, rotates keys.
    Operator,
    /// Operator, and edits roles, reloads, manages admin tokens.
    Admin,
}

impl AdminRole {
    pub fn as_str(self) -> &'static str {
        match self {
            AdminRole::Viewer => "viewer",
            AdminRole::Operator => "operator",
            AdminRole::Admin => "admin",
        }
    }
}

impl std::str::FromStr for AdminRole {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "viewer" => Ok(AdminRole::Viewer),
            "operator" => Ok(AdminRole::Operator),
            "admin" => Ok(AdminRole::Admin),
            other => Err(format!("unknown admin role {other:?}: viewer, operator or admin")),
        }
    }
}

/// One admin token as stored: never the token itself.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminToken {
    /// `adt_` + 25 base36 characters: what audit records and revocation name it by.
    pub id: String,
    /// Who or what holds it (`alice`, `ci-readonly`): unique among live tokens.
    pub name: String,
    pub role: AdminRole,
    /// Lower-case hex SHA-256 of the token.
    pub token_sha256: String,
    /// `gha_…` and the token's last four characters.
    pub hint: String,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// The actor that created it (`cli:ops`, `admin-api:<token name>`).
    #[serde(default)]
    pub created_by: String,
    #[serde(default, with = "time::serde::rfc3339::option", skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<OffsetDateTime>,
    #[serde(default, with = "time::serde::rfc3339::option", skip_serializing_if = "Option::is_none")]
    pub revoked_at: Option<OffsetDateTime>,
}

impl AdminToken {
    /// Neither revoked nor expired at `now`.
    pub fn is_live(&self, now: OffsetDateTime) -> bool {
        self.revoked_at.is_none() && self.expires_at.is_none_or(|e| e > now)
    }

    /// Its JSON view (what the admin API and `--json` show).
    pub fn view(&self) -> serde_json::Value {
        let now = super::ops::now();
        let status = if self.revoked_at.is_some() {
            "revoked"
        } else if self.is_live(now) {
            "active"
        } else {
            "expired"
        };
        let mut v = serde_json::to_value(self).unwrap_or_default();
        if let Some(o) = v.as_object_mut() {
            o.remove("token_sha256");
            o.insert("status".into(), status.into());
        }
        v
    }
}

/// The file form: `admin_tokens: [ … ]`.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokensFile {
    #[serde(default)]
    admin_tokens: Vec<AdminToken>,
}

/// Longest token name, in characters.
const MAX_NAME: usize = 64;

/// A name is 1–64 characters of letters, digits and `._@-` (it appears in audit records,
/// logs and the console).
fn check_name(name: &str) -> Result<(), StoreError> {
    let ok = !name.is_empty()
        && name.chars().count() <= MAX_NAME
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '@' | '-'));
    if ok {
        Ok(())
    } else {
        Err(StoreError::BadInput(format!(
            "admin token name {name:?}: 1 to {MAX_NAME} letters, digits, '.', '_', '@' or '-'"
        )))
    }
}

impl Store {
    /// Where a file store keeps its admin tokens: `admin-tokens.yaml` beside the
    /// credentials file.
    pub fn admin_tokens_path(&self) -> PathBuf {
        self.path().with_file_name("admin-tokens.yaml")
    }

    /// Every admin token, live or not, oldest first.
    pub fn admin_tokens(&self) -> Result<Vec<AdminToken>, StoreError> {
        if let Some(b) = self.backend() {
            return b.run(async {
                let c = b.db.client().await.map_err(|e| StoreError::Unavailable(e.to_string()))?;
                let rows = c
                    .query(
                        "SELECT id, name, role, token_sha256, hint, created_at, created_by, expires_at, revoked_at
                         FROM gatehouse_admin_tokens ORDER BY seq",
                        &[],
                    )
                    .await
                    .map_err(|e| super::store::db_error(&b.db, e))?;
                rows.iter().map(token_from_row).collect()
            });
        }
        self.read_tokens_file().map(|f| f.admin_tokens)
    }

    /// The live token whose SHA-256 is `digest`, if any (compared in constant time).
    pub fn find_admin_token(&self, digest: &[u8; 32]) -> Result<Option<AdminToken>, StoreError> {
        let now = super::ops::now();
        let want = hex::encode(digest);
        if let Some(b) = self.backend() {
            // By the unique index: one row, not every token (a digest's lookup time tells
            // nothing about a token: finding a preimage of SHA-256 is the hard part).
            let row = b.run(async {
                let c = b.db.client().await.map_err(|e| StoreError::Unavailable(e.to_string()))?;
                c.query_opt(
                    "SELECT id, name, role, token_sha256, hint, created_at, created_by, expires_at, revoked_at
                     FROM gatehouse_admin_tokens WHERE token_sha256 = $1",
                    &[&want],
                )
                .await
                .map_err(|e| super::store::db_error(&b.db, e))
            })?;
            return Ok(row.as_ref().map(token_from_row).transpose()?.filter(|t| t.is_live(now)));
        }
        let found = self
            .read_tokens_file()?
            .admin_tokens
            .into_iter()
            .find(|t| bool::from(t.token_sha256.as_bytes().ct_eq(want.as_bytes())));
        Ok(found.filter(|t| t.is_live(now)))
    }

    /// Creates a token; the token itself is returned once and kept nowhere.
    pub fn create_admin_token(
        &self,
        name: &str,
        role: AdminRole,
        expires_at: Option<OffsetDateTime>,
        created_by: &str,
        record: Option<&serde_json::Value>,
    ) -> Result<(AdminToken, Secret), StoreError> {
        check_name(name)?;
        let now = super::ops::now();
        if expires_at.is_some_and(|e| e <= now) {
            return Err(StoreError::BadInput("expires_at is in the past".into()));
        }
        let rng = |e: getrandom::Error| StoreError::Serialise(format!("no randomness: {e}"));
        let secret = secrets::new_admin_token().map_err(rng)?;
        let token = AdminToken {
            id: secrets::new_key_id("adt_").map_err(rng)?,
            name: name.to_string(),
            role,
            token_sha256: hex::encode(secrets::token_digest(secret.expose())),
            hint: hint(secret.expose()),
            created_at: now,
            created_by: created_by.to_string(),
            expires_at,
            revoked_at: None,
        };
        if let Some(b) = self.backend() {
            b.run(async {
                let mut c = b.db.client().await.map_err(|e| StoreError::Unavailable(e.to_string()))?;
                let tx = c.transaction().await.map_err(|e| super::store::db_error(&b.db, e))?;
                // The partial unique index on live names turns a duplicate into a 23xxx
                // error, which `db_error` reports as a conflict.
                tx.execute(
                    "INSERT INTO gatehouse_admin_tokens
                     (id, name, role, token_sha256, hint, created_at, created_by, expires_at)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                    &[
                        &token.id,
                        &token.name,
                        &token.role.as_str(),
                        &token.token_sha256,
                        &token.hint,
                        &token.created_at,
                        &token.created_by,
                        &token.expires_at,
                    ],
                )
                .await
                .map_err(|e| match super::store::db_error(&b.db, e) {
                    StoreError::Conflict(_) => duplicate(name),
                    other => other,
                })?;
                if let Some(r) = record {
                    tx.execute("INSERT INTO gatehouse_admin_audit (record) VALUES ($1)", &[r])
                        .await
                        .map_err(|e| super::store::db_error(&b.db, e))?;
                }
                tx.commit().await.map_err(|e| super::store::db_error(&b.db, e))
            })?;
            return Ok((token, secret));
        }
        self.update_tokens_file(|f| {
            if f.admin_tokens.iter().any(|t| t.name == name && t.revoked_at.is_none()) {
                return Err(duplicate(name));
            }
            f.admin_tokens.push(token.clone());
            Ok(())
        })?;
        Ok((token, secret))
    }

    /// Revokes the token `id` (from now on every call with it is 401); revoking a
    /// revoked token is a no-op that returns it.
    pub fn revoke_admin_token(&self, id: &str, record: Option<&serde_json::Value>) -> Result<AdminToken, StoreError> {
        let now = super::ops::now();
        let missing = || StoreError::NotFound(format!("no admin token with id {id:?}"));
        if let Some(b) = self.backend() {
            return b.run(async {
                let mut c = b.db.client().await.map_err(|e| StoreError::Unavailable(e.to_string()))?;
                let tx = c.transaction().await.map_err(|e| super::store::db_error(&b.db, e))?;
                let row = tx
                    .query_opt(
                        "UPDATE gatehouse_admin_tokens SET revoked_at = coalesce(revoked_at, $2) WHERE id = $1
                         RETURNING id, name, role, token_sha256, hint, created_at, created_by, expires_at, revoked_at",
                        &[&id, &now],
                    )
                    .await
                    .map_err(|e| super::store::db_error(&b.db, e))?
                    .ok_or_else(missing)?;
                if let Some(r) = record {
                    tx.execute("INSERT INTO gatehouse_admin_audit (record) VALUES ($1)", &[r])
                        .await
                        .map_err(|e| super::store::db_error(&b.db, e))?;
                }
                tx.commit().await.map_err(|e| super::store::db_error(&b.db, e))?;
                token_from_row(&row)
            });
        }
        self.update_tokens_file(|f| {
            let t = f.admin_tokens.iter_mut().find(|t| t.id == id).ok_or_else(missing)?;
            t.revoked_at.get_or_insert(now);
            Ok(t.clone())
        })
    }

    fn read_tokens_file(&self) -> Result<TokensFile, StoreError> {
        let path = self.admin_tokens_path();
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(TokensFile::default()),
            Err(e) => return Err(io(&path)(e)),
        };
        if text.trim().is_empty() {
            return Ok(TokensFile::default());
        }
        serde_saphyr::from_str(&text).map_err(|e| StoreError::Serialise(format!("{}: {e}", path.display())))
    }

    /// A read-modify-write of the tokens file under its own lock (`admin-tokens.yaml.lock`),
    /// written atomically with mode 0600.
    fn update_tokens_file<T>(&self, f: impl FnOnce(&mut TokensFile) -> Result<T, StoreError>) -> Result<T, StoreError> {
        let path = self.admin_tokens_path();
        let lock_path = path.with_file_name("admin-tokens.yaml.lock");
        let lock =
            OpenOptions::new().create(true).truncate(false).write(true).open(&lock_path).map_err(io(&lock_path))?;
        lock.lock().map_err(io(&lock_path))?;
        refuse_read_only(&path)?;
        let mut file = self.read_tokens_file()?;
        let out = f(&mut file)?;
        let text = serde_saphyr::to_string(&file).map_err(|e| StoreError::Serialise(e.to_string()))?;
        write_atomically(&path, text.as_bytes(), None)?;
        Ok(out)
    }
}

fn duplicate(name: &str) -> StoreError {
    StoreError::Conflict(format!("a live admin token named {name:?} exists; revoke it first or choose another name"))
}

/// `gha_…` and the last four characters.
fn hint(token: &str) -> String {
    let tail = token.get(token.len().saturating_sub(4)..).unwrap_or_default();
    format!("{}…{tail}", secrets::ADMIN_TOKEN_PREFIX)
}

fn token_from_row(r: &tokio_postgres::Row) -> Result<AdminToken, StoreError> {
    let role: String = r.get("role");
    Ok(AdminToken {
        id: r.get("id"),
        name: r.get("name"),
        role: role.parse().map_err(StoreError::Conflict)?,
        token_sha256: r.get("token_sha256"),
        hint: r.get("hint"),
        created_at: r.get("created_at"),
        created_by: r.get("created_by"),
        expires_at: r.get("expires_at"),
        revoked_at: r.get("revoked_at"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RateLimitConfig;

    fn store(dir: &std::path::Path) -> Store {
        Store::new(dir.join("credentials.yaml"), dir.join("master.key"), RateLimitConfig { per_second: 1, burst: 1 })
    }

    /// a created token is found by its digest until it is revoked; the file holds no token
    #[test]
    fn create_find_revoke() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        let (t, secret) = s.create_admin_token("alice", AdminRole::Operator, None, "cli:test", None).unwrap();
        assert!(secrets::is_well_formed_admin_token(secret.expose()));
        let digest = secrets::token_digest(secret.expose());
        assert_eq!(s.find_admin_token(&digest).unwrap().unwrap().id, t.id);
        let text = std::fs::read_to_string(s.admin_tokens_path()).unwrap();
        assert!(!text.contains(secret.expose()));
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(s.admin_tokens_path()).unwrap().permissions().mode() & 0o777, 0o600);
        assert!(matches!(
            s.create_admin_token("alice", AdminRole::Viewer, None, "", None),
            Err(StoreError::Conflict(_))
        ));
        s.revoke_admin_token(&t.id, None).unwrap();
        assert!(s.find_admin_token(&digest).unwrap().is_none());
        // the name is free again once the token is revoked
        s.create_admin_token("alice", AdminRole::Viewer, None, "", None).unwrap();
        assert!(matches!(s.revoke_admin_token("adt_nope", None), Err(StoreError::NotFound(_))));
    }

    /// names with markup or spaces are refused; an expiry in the past is refused
    #[test]
    fn bad_names_and_expiry() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        for bad in ["", "a b", "<script>", &"x".repeat(65)] {
            assert!(matches!(
                s.create_admin_token(bad, AdminRole::Viewer, None, "", None),
                Err(StoreError::BadInput(_))
            ));
        }
        let past = super::super::ops::now() - time::Duration::seconds(1);
        assert!(matches!(
            s.create_admin_token("bob", AdminRole::Viewer, Some(past), "", None),
            Err(StoreError::BadInput(_))
        ));
    }
}
