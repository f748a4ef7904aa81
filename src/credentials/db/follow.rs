//! A gateway following the credential database: the whole store loaded at start, then
//! each change applied as it is announced (LISTEN), with a poll for what a lost LISTEN
//! connection missed.
//!
//! Changes are read by revision: every change to a role, user or key bumps the store's
//! revision and records which user or role it touched (the schema's triggers, so hand
//! edits count too). A catch-up reads the users and roles changed after the revision
//! this gateway applied, in one repeatable-read transaction, applies them to its copy
//! of the store and builds the next snapshot from it. A change that does not validate
//! is refused with the rows it names, and the last good snapshot keeps serving; the
//! next catch-up tries again from the same revision.

use super::model::{self, ReadError};
use super::{Database, DbError};
use crate::config::{ConfigErrors, RateLimitConfig};
use crate::credentials::file::{FileCredentials, FileRole, FileUser};
use crate::credentials::snapshot::Snapshot;
use std::collections::BTreeMap;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The channel the schema's triggers notify on.
const CHANNEL: &str = "gatehouse_credentials";
/// How often a catch-up runs without a notification: the bound on how late a change
/// arrives while the LISTEN connection is down.
pub const POLL: Duration = Duration::from_secs(5);
/// More changed users than this since the last catch-up: the whole store is read again
/// (one query per table beats a long `= ANY(...)` list).
const WHOLE_RELOAD_OVER: usize = 1000;

/// Why a catch-up did not apply.
#[derive(Debug, thiserror::Error)]
pub enum FollowError {
    #[error(transparent)]
    Db(#[from] DbError),
    /// The store as changed does not validate: the problems name the rows.
    #[error("{0}")]
    Invalid(ConfigErrors),
}

/// This gateway's copy of the store, at the revision it applied.
#[derive(Debug, Clone)]
struct Replica {
    creds: FileCredentials,
    /// Position of each user in `creds.users`.
    index: HashMap<String, usize>,
    revision: i64,
    /// The snapshot built from `creds`: the next one shares its unchanged users.
    snapshot: Arc<Snapshot>,
}

impl Replica {
    fn new(creds: FileCredentials, revision: i64, snapshot: Arc<Snapshot>) -> Replica {
        let mut c = Replica { creds, index: HashMap::new(), revision, snapshot };
        c.reindex();
        c
    }

    fn reindex(&mut self) {
        self.index = self.creds.users.iter().enumerate().map(|(i, u)| (u.id.value.clone(), i)).collect();
    }

    /// Replaces, in place, the users `names` by `users` (their current rows; a name absent
    /// from them was deleted).
    fn apply_users(&mut self, names: &[String], users: Vec<FileUser>) {
        let mut found: HashMap<String, FileUser> = users.into_iter().map(|u| (u.id.value.clone(), u)).collect();
        let mut removed = false;
        for name in names {
            match (self.index.get(name).copied(), found.remove(name)) {
                (Some(i), Some(u)) => self.creds.users[i] = u,
                (None, Some(u)) => {
                    self.index.insert(name.clone(), self.creds.users.len());
                    self.creds.users.push(u);
                }
                (Some(i), None) => {
                    self.creds.users[i].id.value.clear();
                    removed = true;
                }
                (None, None) => {}
            }
        }
        if removed {
            self.creds.users.retain(|u| !u.id.value.is_empty());
            self.reindex();
        }
    }

    /// How many users the copy holds once `names` are replaced by `users`.
    fn count_after(&self, names: &[String], users: &[FileUser]) -> usize {
        let before = names.iter().filter(|n| self.index.contains_key(*n)).count();
        self.creds.users.len() - before + users.len()
    }

    /// Replaces, in place, the roles `names` by `roles` (a name absent from them was
    /// deleted).
    fn apply_roles(&mut self, names: &[String], mut roles: BTreeMap<String, FileRole>) {
        for name in names {
            match roles.remove(name) {
                Some(r) => self.creds.roles.insert(name.clone(), r),
                None => self.creds.roles.remove(name),
            };
        }
    }
}

/// A gateway's link to the credential database.
#[derive(Debug)]
pub struct Follower {
    db: Database,
    master_key: PathBuf,
    default_rate: RateLimitConfig,
    copy: tokio::sync::Mutex<Replica>,
    /// 1 while the last attempt to reach the database succeeded.
    pub up: AtomicBool,
    /// The revision of the snapshot in force.
    pub revision: AtomicI64,
    /// When this gateway last confirmed its snapshot is the database's latest (unix s):
    /// the snapshot's age is the time since.
    pub confirmed_unix: AtomicU64,
}

pub fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn read_error(db: &Database, e: ReadError) -> FollowError {
    match e {
        ReadError::Pg(e) => FollowError::Db(db.query_error(e)),
        ReadError::Row(bad) => {
            FollowError::Invalid(crate::credentials::problem(std::path::Path::new(db.describe()), bad.0))
        }
    }
}

impl Follower {
    /// Loads the whole store: the follower and the first snapshot.
    pub async fn load(
        db: Database,
        master_key: PathBuf,
        default_rate: RateLimitConfig,
    ) -> Result<(Follower, Arc<Snapshot>), FollowError> {
        super::schema::check(&db).await?;
        let (creds, revision) = read_all(&db).await?;
        let master = crate::credentials::reload::read_master_key(&master_key).map_err(FollowError::Invalid)?;
        let snap = Arc::new(build(&db, master.as_ref(), default_rate, creds.clone())?);
        let f = Follower {
            copy: tokio::sync::Mutex::new(Replica::new(creds, revision, snap.clone())),
            up: AtomicBool::new(true),
            revision: AtomicI64::new(revision),
            confirmed_unix: AtomicU64::new(unix_now()),
            db,
            master_key,
            default_rate,
        };
        Ok((f, snap))
    }

    pub fn database(&self) -> &Database {
        &self.db
    }

    /// Applies the changes made since the revision applied, handing the next snapshot to
    /// `put` (to put in force) before any other catch-up can start: so when one returns,
    /// every change up to the revision it read is in force, whoever applied it. True: a
    /// snapshot was put.
    pub async fn catch_up(&self, put: &(dyn Fn(Arc<Snapshot>) + Sync)) -> Result<bool, FollowError> {
        let result = self.catch_up_inner(put).await;
        match &result {
            Err(FollowError::Db(_)) => self.up.store(false, Ordering::Relaxed),
            _ => self.up.store(true, Ordering::Relaxed),
        }
        result
    }

    async fn catch_up_inner(&self, put: &(dyn Fn(Arc<Snapshot>) + Sync)) -> Result<bool, FollowError> {
        let db = &self.db;
        let mut copy = self.copy.lock().await;
        let mut client = db.client().await?;
        let tx = db.moment(&mut client).await?;
        let revision = model::revision(&*tx).await.map_err(|e| db.query_error(e))?;
        if revision == copy.revision {
            tx.commit().await.map_err(|e| db.query_error(e))?;
            self.confirmed_unix.store(unix_now(), Ordering::Relaxed);
            return Ok(false);
        }
        let changed = model::changed_since(&*tx, copy.revision, revision).await.map_err(|e| db.query_error(e))?;
        // Behind by more than the change log keeps, or by a bulk change (an import), or
        // the database went back in time (a restore): read it whole.
        let whole = changed.gap || revision < copy.revision || changed.users.len() > WHOLE_RELOAD_OVER;
        let master = crate::credentials::reload::read_master_key(&self.master_key).map_err(FollowError::Invalid)?;
        let refused = |e: FollowError| {
            if let FollowError::Invalid(errors) = &e {
                tracing::error!(
                    revision, error = %errors,
                    "credential database change refused: it does not validate; the previous credentials stay in force until the rows named are fixed"
                );
            }
            e
        };
        let snap = if whole || !changed.roles.is_empty() {
            // A role change can touch every user: the next snapshot is built whole.
            let mut next = if whole {
                let creds = model::load_all(&*tx).await.map_err(|e| read_error(db, e))?;
                Replica::new(creds, revision, copy.snapshot.clone())
            } else {
                let (users, roles) =
                    model::load_some(&*tx, &changed.users, &changed.roles).await.map_err(|e| read_error(db, e))?;
                let mut next = Replica { revision, ..copy.clone() };
                next.apply_users(&changed.users, users);
                next.apply_roles(&changed.roles, roles);
                next
            };
            tx.commit().await.map_err(|e| db.query_error(e))?;
            let snap = Arc::new(build(db, master.as_ref(), self.default_rate, next.creds.clone()).map_err(refused)?);
            next.snapshot = snap.clone();
            *copy = next;
            snap
        } else {
            // Users only: the users kept are shared with the snapshot in force.
            let (users, _) = model::load_some(&*tx, &changed.users, &[]).await.map_err(|e| read_error(db, e))?;
            tx.commit().await.map_err(|e| db.query_error(e))?;
            let total = copy.count_after(&changed.users, &users);
            let snap = copy
                .snapshot
                .with_users(&changed.users, users.clone(), &copy.creds.roles, master.as_ref(), self.default_rate, total)
                .map_err(|problems| FollowError::Invalid(ConfigErrors { file: PathBuf::from(db.describe()), problems }))
                .map_err(refused)?;
            let snap = Arc::new(snap);
            copy.apply_users(&changed.users, users);
            copy.revision = revision;
            copy.snapshot = snap.clone();
            snap
        };
        self.revision.store(revision, Ordering::Relaxed);
        self.confirmed_unix.store(unix_now(), Ordering::Relaxed);
        tracing::info!(revision, changes = changed.count, whole, "credential database changes applied");
        put(snap);
        drop(copy);
        Ok(true)
    }

    /// Runs until the process ends: LISTENs on a connection of its own (reconnecting
    /// with backoff) and catches up on a notification and every [`POLL`]: `put` puts
    /// each new snapshot in force, `after` hears how each catch-up went.
    pub async fn run(
        self: Arc<Self>,
        put: impl Fn(Arc<Snapshot>) + Send + Sync + 'static,
        after: impl Fn(Result<bool, FollowError>) + Send + 'static,
    ) {
        let wake = Arc::new(tokio::sync::Notify::new());
        tokio::spawn(listen(self.db.clone(), wake.clone(), self.clone()));
        loop {
            tokio::select! {
                () = wake.notified() => {}
                () = tokio::time::sleep(POLL) => {}
            }
            after(self.catch_up(&put).await);
        }
    }
}

/// Holds a LISTEN connection open, waking the follower on each notification (and after
/// each reconnection, for what was missed while it was down).
async fn listen(db: Database, wake: Arc<tokio::sync::Notify>, follower: Arc<Follower>) {
    let mut backoff = Duration::from_millis(100);
    let mut logged_down = false;
    loop {
        match db.listen_connection().await {
            Ok((client, mut rx, driver)) => {
                if client.batch_execute(&format!("LISTEN {CHANNEL}")).await.is_ok() {
                    backoff = Duration::from_millis(100);
                    if logged_down {
                        tracing::info!(db = %db.describe(), "credential database LISTEN connection back");
                        logged_down = false;
                    }
                    wake.notify_one();
                    while rx.recv().await.is_some() {
                        wake.notify_one();
                    }
                }
                driver.abort();
            }
            Err(e) => {
                follower.up.store(false, Ordering::Relaxed);
                if !logged_down {
                    tracing::error!(error = %e, "credential database unreachable: serving the last snapshot; retrying");
                    logged_down = true;
                }
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// The whole store and its revision, as of one moment.
async fn read_all(db: &Database) -> Result<(FileCredentials, i64), FollowError> {
    let mut client = db.client().await?;
    let tx = db.moment(&mut client).await?;
    let revision = model::revision(&*tx).await.map_err(|e| db.query_error(e))?;
    let creds = model::load_all(&*tx).await.map_err(|e| read_error(db, e))?;
    tx.commit().await.map_err(|e| db.query_error(e))?;
    Ok((creds, revision))
}

fn build(
    db: &Database,
    master: Option<&crate::credentials::secrets::MasterKey>,
    default_rate: RateLimitConfig,
    creds: FileCredentials,
) -> Result<Snapshot, FollowError> {
    Snapshot::from_model(creds, master, default_rate)
        .map_err(|problems| FollowError::Invalid(ConfigErrors { file: PathBuf::from(db.describe()), problems }))
}
