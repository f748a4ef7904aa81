//! Writing `credentials.yaml`: every change is one read-modify-write under an advisory
//! lock, validated as the gateway would load it, then written atomically.
//!
//! The lock is on a sidecar file (`<name>.lock`), not on the credentials file itself:
//! the file is replaced by rename, so a lock on it would not serialise writers that
//! opened different generations. Holding the lock from the read to the rename is what
//! keeps the CLI and a running gateway's admin API (or two CLIs) from losing each
//! other's updates.
//!
//! Comments in a hand-edited file are not preserved by a write (the file is re-emitted
//! from its parsed form).

use super::db::{Database, model};
use super::file::FileCredentials;
use super::secrets::{MasterKey, OpenError};
use super::snapshot::Snapshot;
use crate::config::{ConfigErrors, RateLimitConfig};
use crate::fs::atomic_file::write_durably;
use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Why a change could not be made.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path} is read-only here ({source}); change the source file and redeploy it (see docs/admin.md)")]
    ReadOnly { path: PathBuf, source: std::io::Error },
    #[error("{0}")]
    Invalid(ConfigErrors),
    /// The credential database cannot be reached (or did not answer in time): nothing
    /// was changed.
    #[error("{0}")]
    Unavailable(String),
    /// The user, key or role named does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The change contradicts the current state (duplicate id, retired user, role in use).
    #[error("{0}")]
    Conflict(String),
    /// An `If-Match` that no longer matches: someone changed it since the caller read it.
    #[error("{0}")]
    Precondition(String),
    /// The change itself is malformed (bad id, bad name).
    #[error("{0}")]
    BadInput(String),
    #[error("cannot serialise credentials: {0}")]
    Serialise(String),
    /// A master-key rotation that stopped after its first write: the key file holds the
    /// new and the old keys, a working state that a new rotation completes.
    #[error(
        "{source}; {master} now holds the new and the old master key (a working state): run `gatehouse master-key rotate` again to finish"
    )]
    RotationIncomplete { master: PathBuf, source: Box<StoreError> },
}

/// What a master-key rotation did.
#[derive(Debug, Clone, Copy)]
pub struct Rotation {
    /// HMAC secrets re-sealed under the new key.
    pub resealed: usize,
    /// Keys the ring held before (more than one: an earlier rotation had not finished).
    pub retired_keys: usize,
}

/// What a change reads and may touch. With the database, a change to one user reads and
/// validates that user (and the roles) only: cross-user uniqueness is the tables'
/// constraints, and nothing else spans users. A file is always read and written whole.
#[derive(Debug, Clone, Copy)]
pub enum Scope<'a> {
    Whole,
    User(&'a str),
}

/// The credentials file, or the credential database, and what validating a change needs.
#[derive(Debug, Clone)]
pub struct Store {
    /// The file; with a database, the database's name (for messages only).
    path: PathBuf,
    database: Option<Arc<DbBackend>>,
    master_key: PathBuf,
    default_rate: RateLimitConfig,
}

/// The credential database and how a synchronous caller waits for it.
#[derive(Debug)]
pub(super) struct DbBackend {
    pub(super) db: Database,
    /// The CLI's runtime; `None` in a gateway, whose own runtime is used.
    runtime: Option<tokio::runtime::Runtime>,
}

impl DbBackend {
    /// Runs `f` to completion from synchronous code: on the CLI's runtime, or on the
    /// gateway's, taking this thread out of its worker pool meanwhile.
    pub(super) fn run<T>(&self, f: impl std::future::Future<Output = T>) -> T {
        match &self.runtime {
            Some(rt) => rt.block_on(f),
            None => {
                let handle = tokio::runtime::Handle::current();
                tokio::task::block_in_place(|| handle.block_on(f))
            }
        }
    }
}

pub(super) fn io(path: &Path) -> impl Fn(std::io::Error) -> StoreError + '_ {
    move |source| match source.kind() {
        std::io::ErrorKind::PermissionDenied | std::io::ErrorKind::ReadOnlyFilesystem => {
            StoreError::ReadOnly { path: path.to_path_buf(), source }
        }
        _ => StoreError::Io { path: path.to_path_buf(), source },
    }
}

impl Store {
    pub fn new(path: PathBuf, master_key: PathBuf, default_rate: RateLimitConfig) -> Store {
        Store { path, database: None, master_key, default_rate }
    }

    /// The credential database. `runtime`: the one to wait on from a program without its
    /// own (the CLI); `None` inside a gateway's runtime.
    pub fn database(
        db: Database,
        runtime: Option<tokio::runtime::Runtime>,
        master_key: PathBuf,
        default_rate: RateLimitConfig,
    ) -> Store {
        let path = PathBuf::from(db.describe());
        Store { path, database: Some(Arc::new(DbBackend { db, runtime })), master_key, default_rate }
    }

    /// The credentials file (with a database: its URL without the password).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The credential database, when this store is one.
    pub(super) fn backend(&self) -> Option<&DbBackend> {
        self.database.as_deref()
    }

    /// Why changes cannot be made here, if they cannot: the file (or its directory) is
    /// read-only, e.g. a Kubernetes Secret mount. Creates and removes a temporary file
    /// beside the credentials file to find out. A database is always writable (when it is
    /// down, a write says so).
    pub fn read_only_reason(&self) -> Option<String> {
        if self.database.is_some() {
            return None;
        }
        refuse_read_only(&self.path).and_then(|()| probe_dir(&self.path)).err().map(|e| e.to_string())
    }

    /// Whether this store is the credential database.
    pub fn is_database(&self) -> bool {
        self.database.is_some()
    }

    /// The master key file.
    pub fn master_key_path(&self) -> &Path {
        &self.master_key
    }

    /// The master key, created on first use (sealing a new HMAC secret).
    pub fn master_key(&self) -> Result<MasterKey, StoreError> {
        super::load_or_create_master_key(&self.master_key).map_err(StoreError::Invalid)
    }

    /// Reads the file as it is now (no lock: a rename is atomic, so this sees one
    /// generation or the next). A missing file reads as empty.
    pub fn read(&self) -> Result<FileCredentials, StoreError> {
        if let Some(b) = &self.database {
            return b.run(async {
                let mut client = b.db.client().await.map_err(|e| StoreError::Unavailable(e.to_string()))?;
                let tx = b.db.moment(&mut client).await.map_err(|e| StoreError::Unavailable(e.to_string()))?;
                let creds = model::load_all(&*tx).await.map_err(|e| read_error(&b.db, e))?;
                tx.commit().await.map_err(|e| db_error(&b.db, e))?;
                Ok(creds)
            });
        }
        let text = match std::fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(FileCredentials::default()),
            Err(e) => return Err(io(&self.path)(e)),
        };
        if text.trim().is_empty() {
            return Ok(FileCredentials::default());
        }
        super::snapshot::parse_file(&self.path, &text).map_err(StoreError::Invalid)
    }

    /// Checks `creds` as a gateway would load it (with this store's master key).
    pub fn validate(&self, creds: &FileCredentials) -> Result<(), StoreError> {
        let master = super::reload::read_master_key(&self.master_key).map_err(StoreError::Invalid)?;
        Snapshot::from_model(creds.clone(), master.as_ref(), self.default_rate)
            .map(drop)
            .map_err(|problems| StoreError::Invalid(ConfigErrors { file: self.path.clone(), problems }))
    }

    /// Applies `change` under the lock; writes the result only if `change` succeeds and
    /// the new file validates exactly as the gateway would load it.
    pub fn update<T>(
        &self,
        change: impl FnOnce(&mut FileCredentials) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        self.update_recorded(None, change)
    }

    /// [`Store::update`], with the admin audit record of the change: in the database it
    /// is written in the change's transaction (never one without the other); a file
    /// store leaves recording to the caller (the audit log).
    pub fn update_recorded<T>(
        &self,
        record: Option<&serde_json::Value>,
        change: impl FnOnce(&mut FileCredentials) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        self.update_in(Scope::Whole, record, change)
    }

    /// [`Store::update_recorded`] of a change that touches only `scope`.
    pub fn update_in<T>(
        &self,
        scope: Scope<'_>,
        record: Option<&serde_json::Value>,
        change: impl FnOnce(&mut FileCredentials) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        if let Some(b) = &self.database {
            return b.run(self.update_database(b, scope, record, change));
        }
        let _lock = self.lock()?;
        refuse_read_only(&self.path)?;
        let mut creds = self.read()?;
        let out = change(&mut creds)?;
        let text = serde_saphyr::to_string(&creds).map_err(|e| StoreError::Serialise(e.to_string()))?;
        let master = super::reload::read_master_key(&self.master_key).map_err(StoreError::Invalid)?;
        Snapshot::parse(&self.path, &text, master.as_ref(), self.default_rate).map_err(StoreError::Invalid)?;
        self.write_atomically(text.as_bytes())?;
        Ok(out)
    }

    /// One transaction: the store's revision row locked first (so writers, and hand edits
    /// through the triggers, take turns), the store read, changed, validated as a gateway
    /// would load it, and only the difference written, with its audit record.
    async fn update_database<T>(
        &self,
        b: &DbBackend,
        scope: Scope<'_>,
        record: Option<&serde_json::Value>,
        change: impl FnOnce(&mut FileCredentials) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let db = &b.db;
        let mut client = db.client().await.map_err(|e| StoreError::Unavailable(e.to_string()))?;
        let tx = client.transaction().await.map_err(|e| db_error(db, e))?;
        tx.execute("SELECT revision FROM gatehouse_revision FOR UPDATE", &[]).await.map_err(|e| db_error(db, e))?;
        let old = match scope {
            Scope::Whole => model::load_all(&*tx).await,
            Scope::User(id) => model::load_user_scope(&*tx, id).await,
        }
        .map_err(|e| read_error(db, e))?;
        let mut new = old.clone();
        let out = change(&mut new)?;
        let master = super::reload::read_master_key(&self.master_key).map_err(StoreError::Invalid)?;
        Snapshot::from_model(new.clone(), master.as_ref(), self.default_rate)
            .map_err(|problems| StoreError::Invalid(ConfigErrors { file: self.path.clone(), problems }))?;
        model::write_difference(&*tx, &old, &new).await.map_err(|e| match e {
            model::WriteError::Pg(e) => db_error(db, e),
            other => StoreError::Conflict(other.to_string()),
        })?;
        // The change log only needs to outlast a gateway's outage: one that is further
        // behind finds a gap and reads the store whole.
        tx.execute("DELETE FROM gatehouse_changes WHERE at < now() - interval '1 day'", &[])
            .await
            .map_err(|e| db_error(db, e))?;
        if let Some(r) = record {
            tx.execute("INSERT INTO gatehouse_admin_audit (record) VALUES ($1)", &[r])
                .await
                .map_err(|e| db_error(db, e))?;
        }
        tx.commit().await.map_err(|e| db_error(db, e))?;
        Ok(out)
    }

    fn lock(&self) -> Result<File, StoreError> {
        let mut name = self.path.file_name().map(|n| n.to_os_string()).unwrap_or_default();
        name.push(".lock");
        let lock_path = self.path.with_file_name(name);
        let f = OpenOptions::new().create(true).truncate(false).write(true).open(&lock_path).map_err(io(&lock_path))?;
        f.lock().map_err(io(&lock_path))?;
        Ok(f)
    }

    /// Temp file in the same directory, fsync, rename over the file, fsync the directory.
    fn write_atomically(&self, bytes: &[u8]) -> Result<(), StoreError> {
        // Keep the file readable by the gateway's group as before (tempfile creates 0600).
        let keep = std::fs::metadata(&self.path).ok().map(|m| m.permissions());
        write_atomically(&self.path, bytes, keep)
    }

    /// Replaces the master key with a new one and re-seals every HMAC secret under it, in
    /// three atomic steps under the lock, each a state a running gateway loads:
    ///
    /// 1. key file = `[new, old…]` (new seals, old still opens the current file);
    /// 2. credentials file with every secret sealed under `new`;
    /// 3. key file = `[new]`, checked first to open the file just written.
    ///
    /// The secrets themselves do not change, so a gateway that keeps its previous snapshot
    /// at any point (a reload that raced two steps) still verifies every request. Nothing
    /// is written unless both files can be, and every current secret opens.
    pub fn rotate_master_key(&self) -> Result<Rotation, StoreError> {
        if self.database.is_some() {
            return self.rotate_in_database();
        }
        let _lock = self.lock()?;
        refuse_read_only(&self.path)?;
        refuse_read_only(&self.master_key)?;
        probe_dir(&self.path)?;
        probe_dir(&self.master_key)?;
        let current = super::reload::read_master_key(&self.master_key)
            .map_err(StoreError::Invalid)?
            .ok_or_else(|| StoreError::NotFound(format!("{}: no master key to rotate", self.master_key.display())))?;
        let mut creds = self.read()?;
        let new = MasterKey::generate().map_err(|e| StoreError::Serialise(format!("no OS randomness: {e}")))?;
        let resealed = reseal(&mut creds, &current, &new, &self.path, &self.master_key)?;
        let text = serde_saphyr::to_string(&creds).map_err(|e| StoreError::Serialise(e.to_string()))?;
        // The result must load with the new key alone before anything is written.
        Snapshot::parse(&self.path, &text, Some(&new), self.default_rate).map_err(StoreError::Invalid)?;
        let key_mode = Some(std::os::unix::fs::PermissionsExt::from_mode(0o600));
        write_atomically(&self.master_key, current.rotated_to(&new).to_text().as_bytes(), key_mode.clone())?;
        let incomplete = |e| StoreError::RotationIncomplete { master: self.master_key.clone(), source: Box::new(e) };
        self.write_atomically(text.as_bytes()).map_err(incomplete)?;
        write_atomically(&self.master_key, new.to_text().as_bytes(), key_mode).map_err(incomplete)?;
        Ok(Rotation { resealed, retired_keys: current.len() })
    }
}

/// The credentials YAML of `creds`, as the file store writes it: the same model gives
/// the same bytes.
pub fn to_yaml(creds: &FileCredentials) -> Result<String, StoreError> {
    serde_saphyr::to_string(creds).map_err(|e| StoreError::Serialise(e.to_string()))
}

/// A database error: a constraint the change broke is the caller's conflict; anything
/// else means the database is not there for us.
pub(super) fn db_error(db: &Database, e: tokio_postgres::Error) -> StoreError {
    match e.code() {
        Some(c) if c.code().starts_with("23") => StoreError::Conflict(super::db::describe_pg_error(&e)),
        _ => StoreError::Unavailable(db.query_error(e).to_string()),
    }
}

fn read_error(db: &Database, e: model::ReadError) -> StoreError {
    match e {
        model::ReadError::Pg(e) => db_error(db, e),
        model::ReadError::Row(bad) => StoreError::Conflict(format!("{}: {bad}; fix the row", db.describe())),
    }
}

impl Store {
    /// The rotation with the credential database: the same three steps, the second one
    /// transaction that re-seals every secret (`master_key` is this machine's key file;
    /// the other gateways need the new one before they can apply the re-sealed rows,
    /// and keep serving the secrets they hold meanwhile: docs/credential-database.md).
    fn rotate_in_database(&self) -> Result<Rotation, StoreError> {
        refuse_read_only(&self.master_key)?;
        probe_dir(&self.master_key)?;
        let current = super::reload::read_master_key(&self.master_key)
            .map_err(StoreError::Invalid)?
            .ok_or_else(|| StoreError::NotFound(format!("{}: no master key to rotate", self.master_key.display())))?;
        let new = MasterKey::generate().map_err(|e| StoreError::Serialise(format!("no OS randomness: {e}")))?;
        // Every secret must open before the key file changes.
        reseal(&mut self.read()?, &current, &new, &self.path, &self.master_key)?;
        let key_mode = Some(std::os::unix::fs::PermissionsExt::from_mode(0o600));
        write_atomically(&self.master_key, current.rotated_to(&new).to_text().as_bytes(), key_mode.clone())?;
        let incomplete = |e| StoreError::RotationIncomplete { master: self.master_key.clone(), source: Box::new(e) };
        let resealed =
            self.update(|creds| reseal(creds, &current, &new, &self.path, &self.master_key)).map_err(incomplete)?;
        write_atomically(&self.master_key, new.to_text().as_bytes(), key_mode).map_err(incomplete)?;
        Ok(Rotation { resealed, retired_keys: current.len() })
    }
}

/// Re-seals every HMAC secret of `creds` from `current` to `new`; how many. Nothing is
/// changed unless every secret opens.
fn reseal(
    creds: &mut FileCredentials,
    current: &MasterKey,
    new: &MasterKey,
    store: &Path,
    master_key: &Path,
) -> Result<usize, StoreError> {
    let mut resealed = 0;
    let mut sealed_again = Vec::new();
    for key in creds.users.iter().flat_map(|u| u.keys.iter()) {
        let Some(sealed) = &key.secret_sealed else { continue };
        let secret = current.open(&key.id.value, sealed).map_err(|OpenError| {
            StoreError::Conflict(format!(
                "{}: the secret of key {} does not open with {}; nothing changed",
                store.display(),
                key.id.value,
                master_key.display()
            ))
        })?;
        let again =
            new.seal(&key.id.value, &secret).map_err(|e| StoreError::Serialise(format!("no OS randomness: {e}")))?;
        sealed_again.push(again);
    }
    let mut again = sealed_again.into_iter();
    for key in creds.users.iter_mut().flat_map(|u| u.keys.iter_mut()) {
        if key.secret_sealed.is_some() {
            key.secret_sealed = again.next();
            resealed += 1;
        }
    }
    Ok(resealed)
}

/// A file whose mode grants no write permission to anyone was made read-only on purpose
/// (e.g. `chmod 0444`): refuse, rather than replace it by rename (which only needs a
/// writable directory, and which root would be allowed anyway).
pub(super) fn refuse_read_only(path: &Path) -> Result<(), StoreError> {
    match std::fs::metadata(path) {
        Ok(m) if m.permissions().readonly() => Err(StoreError::ReadOnly {
            path: path.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::PermissionDenied, "its mode grants no write permission"),
        }),
        _ => Ok(()),
    }
}

/// Creates and removes a temporary file beside `path`: proves the directory can take the
/// atomic write before a change that spans two files starts.
fn probe_dir(path: &Path) -> Result<(), StoreError> {
    let dir = crate::fs::atomic_file::parent_dir(path);
    tempfile::Builder::new().prefix(".gatehouse-probe-").tempfile_in(dir).map(drop).map_err(io(dir))
}

/// Replaces `path` durably (temp file, fsync, rename, directory fsync: see
/// `atomic_file`) with mode `mode`, else 0600.
pub(super) fn write_atomically(
    path: &Path,
    bytes: &[u8],
    mode: Option<std::fs::Permissions>,
) -> Result<(), StoreError> {
    write_durably(path, bytes, mode).map_err(|e| io(&e.path)(e.source))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::credentials::file::FileRole;

    fn store(dir: &Path) -> Store {
        Store::new(dir.join("credentials.yaml"), dir.join("master.key"), RateLimitConfig { per_second: 1, burst: 1 })
    }

    /// the CLI and admin API read a file as large as the gateway loads (the YAML budget is
    /// the snapshot's, not the parser's default of about 10 000 users)
    #[test]
    fn a_file_of_15_000_users_can_be_edited() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        let mut y = String::from("roles: {}\nusers:\n");
        for i in 0..15_000 {
            y.push_str(&format!(
                "- id: u{i}\n  status: active\n  auth_method: api_key\n  created_at: 2026-01-01T00:00:00Z\n  updated_at: 2026-01-01T00:00:00Z\n  keys:\n  - id: k{i}\n    created_at: 2026-01-01T00:00:00Z\n    token_sha256: {i:064}\n"
            ));
        }
        std::fs::write(s.path(), y).unwrap();
        s.update(|c| {
            c.roles.insert("r".into(), FileRole { description: String::new(), rules: vec![] });
            Ok(())
        })
        .unwrap();
        let back = s.read().unwrap();
        assert_eq!((back.users.len(), back.roles.contains_key("r")), (15_000, true));
    }

    /// a change is written and read back; an invalid result is refused and nothing changes
    #[test]
    fn update_validates_before_writing() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        s.update(|c| {
            c.roles.insert("r".into(), FileRole { description: String::new(), rules: vec![] });
            Ok(())
        })
        .unwrap();
        assert!(s.read().unwrap().roles.contains_key("r"));
        let before = std::fs::read_to_string(s.path()).unwrap();
        let bad = s.update(|c| {
            c.roles.insert(
                "bad".into(),
                FileRole {
                    description: String::new(),
                    rules: vec![serde_saphyr::Spanned::new(
                        "NOT A RULE".into(),
                        serde_saphyr::Location::UNKNOWN,
                        serde_saphyr::Location::UNKNOWN,
                    )],
                },
            );
            Ok(())
        });
        assert!(matches!(bad, Err(StoreError::Invalid(_))), "{bad:?}");
        assert_eq!(std::fs::read_to_string(s.path()).unwrap(), before);
    }

    /// concurrent writers never lose each other's updates (the lock spans read to rename)
    #[test]
    fn concurrent_updates_are_not_lost() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        std::thread::scope(|scope| {
            for t in 0..4 {
                let s = s.clone();
                scope.spawn(move || {
                    for i in 0..10 {
                        s.update(|c| {
                            c.roles.insert(format!("r{t}-{i}"), FileRole::default());
                            Ok(())
                        })
                        .unwrap();
                    }
                });
            }
        });
        assert_eq!(s.read().unwrap().roles.len(), 40);
    }
}
