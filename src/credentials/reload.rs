//! Keeps the credential snapshot current: build to the side, swap atomically, keep the
//! last good one.
//!
//! Triggers: a change of the file's content (directory watch, so Kubernetes' `..data`
//! symlink swap is seen, plus a 30 s poll), `SIGHUP`, and direct calls (admin API). A
//! file that fails to read, parse or validate changes nothing: the error is logged with
//! its line and counted, and the last good snapshot keeps serving.
//!
//! So does a file that would take away nearly every user at once (see
//! [`is_mass_removal`]): an emptied Secret or a truncated copy is far more often an
//! accident than intent, and applied it would refuse every client within a second. It is
//! held (logged, counted in `gatehouse_credentials_reloads_held_total`) until a reload
//! that allows it (`POST /admin/v1/reload?allow_mass_removal=true`).

use super::db::follow::{FollowError, Follower};
use super::db::{Database, schema};
use super::secrets::MasterKey;
use super::snapshot::Snapshot;
use crate::config::{Config, ConfigErrors, RateLimitConfig};
use arc_swap::ArcSwap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, mpsc};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const POLL: Duration = Duration::from_secs(30);
/// How long a replaced snapshot waits for the requests still holding it (they hold it
/// for their upstream round trip).
const RETIRE_WAIT: Duration = Duration::from_secs(2);

/// The live credentials and where they come from.
#[derive(Debug)]
pub struct Credentials {
    current: ArcSwap<Snapshot>,
    source: Option<Source>,
    /// With `credentials: postgres://…`: the database this gateway follows.
    follower: Option<Arc<Follower>>,
    /// Reloads that succeeded / failed, and the unix time of the last good one.
    pub reloads_ok: AtomicU64,
    pub reloads_failed: AtomicU64,
    /// Of the failed reloads, those held back as a mass removal of users.
    pub reloads_held: AtomicU64,
    /// The last reload failed (or was held): true until one succeeds. An alert on it stays
    /// firing for as long as the file is broken, not for a window after the edit.
    pub failing: AtomicBool,
    pub last_good_unix: AtomicU64,
}

/// Whether a reload may take away nearly every user at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Removal {
    /// Held back when it looks like an accident (the default of every trigger).
    Guarded,
    /// Applied: an operator asked for it.
    Allowed,
}

/// A reload from `old` users to `new` that looks like an accident: every user gone (of
/// two or more), or nine in ten gone at once (of ten or more). One-at-a-time deletions
/// from the CLI or the admin API never look like this.
pub fn is_mass_removal(old: usize, new: usize) -> bool {
    (new == 0 && old >= 2) || (old >= 10 && new.saturating_mul(10) < old)
}

#[derive(Debug)]
struct Source {
    path: PathBuf,
    master_key: PathBuf,
    default_rate: RateLimitConfig,
    /// The files' fingerprint taken just before the first snapshot was read, so that the
    /// watcher (started later) also sees a change made in between.
    baseline: u64,
    builder: BuildThread,
}

/// Reads the master key when its file exists. It is created only by the commands that
/// seal a secret (a gateway with api_key users only never needs one).
pub fn read_master_key(path: &Path) -> Result<Option<MasterKey>, ConfigErrors> {
    if !path.exists() {
        return Ok(None);
    }
    super::load_or_create_master_key(path).map(Some)
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl Source {
    fn build(&self) -> Result<Snapshot, ConfigErrors> {
        let (path, master_key, rate) = (self.path.clone(), self.master_key.clone(), self.default_rate);
        self.builder.run(&self.path, move || {
            let master = read_master_key(&master_key)?;
            super::load(&path, master.as_ref(), rate)
        })
    }
}

type Job = Box<dyn FnOnce() + Send>;

/// The thread a gateway's snapshots are built on (started by the first build, ended when
/// the credentials are dropped). One per `Credentials`, not one per process: gateways in
/// one process (the tests) must not queue behind each other's builds.
#[derive(Debug, Default)]
struct BuildThread {
    jobs: Mutex<Option<mpsc::Sender<Job>>>,
}

impl BuildThread {
    /// Runs `build` on the build thread. glibc's malloc gives each thread an arena and
    /// keeps what is freed there: built at start on the main thread and then on whichever
    /// pool thread ran a reload, the freed snapshots of a 100 000-user file stayed
    /// resident in several arenas. On one thread a build reuses what the one before last
    /// freed.
    fn run(
        &self,
        path: &Path,
        build: impl FnOnce() -> Result<Snapshot, ConfigErrors> + Send + 'static,
    ) -> Result<Snapshot, ConfigErrors> {
        let (tx, rx) = mpsc::sync_channel(1);
        let job: Job = Box::new(move || drop(tx.send(build())));
        let mut thread = self.jobs.lock().unwrap_or_else(PoisonError::into_inner);
        let unsent = match thread.as_ref() {
            Some(t) => t.send(job).err().map(|mpsc::SendError(job)| job),
            None => Some(job),
        };
        if let Some(job) = unsent {
            let (jobs, queue) = mpsc::channel::<Job>();
            match std::thread::Builder::new().name("gatehouse-build".into()).spawn(move || {
                // A build that panics (a bug) must not take the thread with it: a job
                // queued meanwhile would be dropped unrun, failing the next reload too.
                for job in queue {
                    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
                }
            }) {
                Ok(_) => match jobs.send(job) {
                    Ok(()) => *thread = Some(jobs),
                    Err(mpsc::SendError(job)) => job(),
                },
                Err(e) => {
                    tracing::warn!(error = %e, "cannot start the credentials build thread; building on this one");
                    job();
                }
            }
        }
        drop(thread);
        rx.recv().map_err(|_| {
            super::problem(path, "the credentials build stopped unexpectedly (a bug; see the log)".into())
        })?
    }
}

/// Frees a replaced snapshot on a thread of its own. Freeing 100 000 users takes about
/// 0.2 s: left to whichever request drops the last reference, it would stall that
/// request and the others queued on its worker. (`reload` is also called inline by the
/// admin API, on a worker: so not there either.)
fn retire(old: Arc<Snapshot>) {
    let spawned = std::thread::Builder::new().name("gatehouse-retire".into()).spawn(move || release(old, RETIRE_WAIT));
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "no thread to free the replaced credentials on; the last request using them will");
    }
}

/// Waits, at most `wait`, until `old` is the last reference to its snapshot, then drops
/// it here. Returns whether it did; if not, the last request still using it frees it.
fn release(mut old: Arc<Snapshot>, wait: Duration) -> bool {
    let deadline = Instant::now() + wait;
    loop {
        match Arc::try_unwrap(old) {
            Ok(snap) => {
                drop(snap);
                return true;
            }
            Err(shared) if Instant::now() < deadline => {
                old = shared;
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(_) => return false,
        }
    }
}

impl Credentials {
    /// Loads the configured credentials file. At start there is no last good snapshot,
    /// so a bad file is an error (the gateway refuses to start).
    pub fn load(config: &Config) -> Result<Credentials, ConfigErrors> {
        let Some(path) = &config.credentials else {
            tracing::warn!("no credentials file configured: only routes with allow_anonymous serve requests");
            return Ok(Credentials::fixed(Snapshot::empty()));
        };
        let baseline = crate::fs::watch::fingerprint(&[path.clone(), config.master_key.clone()]);
        let source = Source {
            path: path.clone(),
            master_key: config.master_key.clone(),
            default_rate: config.rate_limit,
            baseline,
            builder: BuildThread::default(),
        };
        let snap = source.build()?;
        tracing::info!(path = %path.display(), users = snap.user_count(), keys = snap.key_count(), "credentials loaded");
        let c = Credentials::fixed(snap);
        Ok(Credentials { source: Some(source), ..c })
    }

    /// Credentials that never reload (tests, benches, no file configured).
    /// [`Credentials::load`], or with a credential database: connects (migrating first when
    /// `credentials_auto_migrate` is on), checks the schema and loads the whole store.
    pub async fn open(config: &Config) -> Result<Credentials, ConfigErrors> {
        let Some(cfg) = &config.credential_db else { return Credentials::load(config) };
        let fail = |e: &dyn std::fmt::Display| super::problem(Path::new("credentials"), e.to_string());
        let started = Instant::now();
        let db = Database::connect(cfg).await.map_err(|e| fail(&e))?;
        if cfg.auto_migrate {
            let applied = schema::migrate(&db).await.map_err(|e| fail(&e))?;
            if !applied.is_empty() {
                tracing::info!(db = %db.describe(), versions = ?applied, "credential database migrated");
            }
        }
        let (follower, snap) =
            Follower::load(db, config.master_key.clone(), config.rate_limit).await.map_err(|e| match e {
                FollowError::Invalid(errors) => errors,
                FollowError::Db(e) => fail(&e),
            })?;
        tracing::info!(
            db = %follower.database().describe(),
            revision = follower.revision.load(Ordering::Relaxed),
            users = snap.user_count(),
            keys = snap.key_count(),
            load_ms = started.elapsed().as_millis() as u64,
            "credentials loaded from the credential database"
        );
        Ok(Credentials {
            current: ArcSwap::new(snap),
            follower: Some(Arc::new(follower)),
            ..Credentials::fixed(Snapshot::empty())
        })
    }

    /// The credential database this gateway follows, if any.
    pub fn follower(&self) -> Option<&Arc<Follower>> {
        self.follower.as_ref()
    }

    /// Puts a snapshot from the credential database in force (called by the follower
    /// under its lock, so snapshots arrive in revision order).
    fn put(&self, snap: Arc<Snapshot>) {
        let old = self.current.swap(snap);
        self.reloads_ok.fetch_add(1, Ordering::Relaxed);
        self.failing.store(false, Ordering::Relaxed);
        self.last_good_unix.store(unix_now(), Ordering::Relaxed);
        retire(old);
    }

    /// Counts a catch-up that failed (a change that does not validate; the database
    /// being away is not a failed reload: the snapshot in force stays, and
    /// gatehouse_credential_store_snapshot_age_seconds says how old it is).
    fn after(&self, result: Result<bool, FollowError>) -> Result<(), ConfigErrors> {
        match result {
            Ok(_) => Ok(()),
            Err(FollowError::Invalid(e)) => {
                self.reloads_failed.fetch_add(1, Ordering::Relaxed);
                self.failing.store(true, Ordering::Relaxed);
                Err(e)
            }
            Err(FollowError::Db(e)) => Err(super::problem(Path::new("credentials"), e.to_string())),
        }
    }

    pub fn fixed(snap: Snapshot) -> Credentials {
        Credentials {
            current: ArcSwap::from_pointee(snap),
            source: None,
            follower: None,
            reloads_ok: AtomicU64::new(0),
            reloads_failed: AtomicU64::new(0),
            reloads_held: AtomicU64::new(0),
            failing: AtomicBool::new(false),
            last_good_unix: AtomicU64::new(unix_now()),
        }
    }

    /// The current snapshot, owned: for holders that keep it (the admin API, pruning).
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// The current snapshot, borrowed for a short while (a request's authentication).
    /// Unlike [`Credentials::snapshot`] it does not touch the snapshot's reference count,
    /// a cache line every request on every core would otherwise write.
    pub fn snapshot_view(&self) -> arc_swap::Guard<Arc<Snapshot>> {
        self.current.load()
    }

    /// Re-reads the file now. On failure, or a mass removal, the current snapshot stays.
    pub fn reload(&self) -> Result<(), ConfigErrors> {
        self.reload_with(Removal::Guarded)
    }

    /// Re-reads the file now; `removal` says whether it may take away nearly every user.
    pub fn reload_with(&self, removal: Removal) -> Result<(), ConfigErrors> {
        if let Some(f) = &self.follower {
            // Called off the runtime's worker (admin API, SIGHUP task): wait for the
            // catch-up on the gateway's runtime.
            let handle = tokio::runtime::Handle::current();
            let put = |snap| self.put(snap);
            return self.after(tokio::task::block_in_place(|| handle.block_on(f.catch_up(&put))));
        }
        let Some(source) = &self.source else { return Ok(()) };
        match source.build() {
            Ok(snap) => {
                let (old, new) = (self.current.load().user_count(), snap.user_count());
                if removal == Removal::Guarded && is_mass_removal(old, new) {
                    self.reloads_failed.fetch_add(1, Ordering::Relaxed);
                    self.reloads_held.fetch_add(1, Ordering::Relaxed);
                    self.failing.store(true, Ordering::Relaxed);
                    let e = super::problem(
                        &source.path,
                        format!(
                            "the file keeps {new} of the {old} users in force: not applied, the previous \
                             credentials stay (an emptied file is more often an accident than intent); \
                             POST /admin/v1/reload?allow_mass_removal=true applies it"
                        ),
                    );
                    tracing::error!(error = %e, "credentials reload held back");
                    return Err(e);
                }
                tracing::info!(users = snap.user_count(), keys = snap.key_count(), "credentials reloaded");
                let old = self.current.swap(Arc::new(snap));
                self.reloads_ok.fetch_add(1, Ordering::Relaxed);
                self.failing.store(false, Ordering::Relaxed);
                self.last_good_unix.store(unix_now(), Ordering::Relaxed);
                retire(old);
                Ok(())
            }
            Err(e) => {
                self.reloads_failed.fetch_add(1, Ordering::Relaxed);
                self.failing.store(true, Ordering::Relaxed);
                tracing::error!(error = %e, "credentials reload failed; the previous credentials stay in force");
                Err(e)
            }
        }
    }

    /// Reloads on file changes and SIGHUP for as long as the process runs.
    pub fn spawn_reloader(self: Arc<Self>) {
        if let Some(f) = self.follower.clone() {
            let (this, that) = (self.clone(), self.clone());
            tokio::spawn(f.run(
                move |snap| this.put(snap),
                move |result| {
                    if let Err(e) = that.after(result) {
                        tracing::debug!(error = %e, "credential database catch-up failed");
                    }
                },
            ));
            return;
        }
        let Some(source) = &self.source else { return };
        let mut changes =
            crate::fs::watch::watch_since(vec![source.path.clone(), source.master_key.clone()], POLL, source.baseline);
        let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            .map_err(|e| tracing::warn!(error = %e, "cannot listen for SIGHUP"))
            .ok();
        tokio::spawn(async move {
            loop {
                let trigger = tokio::select! {
                    c = changes.recv() => match c { Some(()) => "file change", None => return },
                    Some(()) = async { match hup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => "SIGHUP",
                };
                tracing::debug!(trigger, "reloading credentials");
                let this = self.clone();
                // Parsing a large file takes a while: keep it off the request workers.
                let _ = tokio::task::spawn_blocking(move || this.reload()).await;
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// the old snapshot is freed by the releasing thread once the last request lets go
    /// of it, and left to that request when it holds on past the wait
    #[test]
    fn a_mass_removal_is_everybody_gone_or_nine_in_ten() {
        for (old, new) in [(2, 0), (100_000, 0), (10, 0), (10, 0), (100, 9), (100_000, 9_999)] {
            assert!(is_mass_removal(old, new), "{old} -> {new}");
        }
        for (old, new) in [(0, 0), (1, 0), (2, 1), (9, 1), (10, 1), (100, 10), (100_000, 10_000), (5, 50)] {
            assert!(!is_mass_removal(old, new), "{old} -> {new}");
        }
    }

    #[test]
    fn the_releasing_thread_frees_the_old_snapshot() {
        let old = Arc::new(Snapshot::empty());
        assert!(release(old, Duration::ZERO), "sole holder: freed at once");

        let old = Arc::new(Snapshot::empty());
        let request = old.clone();
        let holder = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            drop(request);
        });
        let started = Instant::now();
        assert!(release(old, Duration::from_secs(10)), "freed after the request let go");
        assert!(started.elapsed() >= Duration::from_millis(100), "{:?}", started.elapsed());
        holder.join().unwrap();

        let old = Arc::new(Snapshot::empty());
        let request = old.clone();
        let started = Instant::now();
        assert!(!release(old, Duration::from_millis(50)), "the request still holds it");
        assert!(started.elapsed() < Duration::from_secs(5));
        assert_eq!(Arc::strong_count(&request), 1, "the release let go of its reference");
    }

    /// every build of one `Credentials` runs on its one build thread, whoever asks; its
    /// result (or error) comes back; a build that panics is an error, and the thread goes
    /// on with the next
    #[test]
    fn builds_run_on_one_thread() {
        let path = Path::new("c.yaml");
        let ran_on = Arc::new(Mutex::new(Vec::new()));
        let build = |ran_on: &Arc<Mutex<Vec<std::thread::ThreadId>>>| {
            let ran_on = ran_on.clone();
            move || {
                ran_on.lock().unwrap().push(std::thread::current().id());
                Ok(Snapshot::empty())
            }
        };
        let builder = BuildThread::default();
        builder.run(path, build(&ran_on)).unwrap();
        builder.run(path, build(&ran_on)).unwrap();
        let elsewhere = build(&ran_on);
        std::thread::scope(|s| s.spawn(|| builder.run(path, elsewhere).unwrap()).join().unwrap());
        let threads = ran_on.lock().unwrap().clone();
        assert_eq!(threads.len(), 3);
        assert!(threads.iter().all(|t| *t == threads[0] && *t != std::thread::current().id()), "{threads:?}");

        let e = builder.run(path, || Err(super::super::problem(Path::new("c.yaml"), "bad".into()))).unwrap_err();
        assert_eq!(e.to_string(), "c.yaml: bad");
        let e = builder.run(path, || panic!("a bug")).unwrap_err();
        assert!(e.to_string().contains("build stopped unexpectedly"), "{e}");
        builder.run(path, build(&ran_on)).unwrap();
        let after = *ran_on.lock().unwrap().last().unwrap();
        assert_eq!(after, threads[0], "the same build thread");
    }
}
