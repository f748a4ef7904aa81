//! Keeps the credential snapshot current: build to the side, swap atomically, keep the
//! last good one.
//!
//! Triggers: a change of the file's content (directory watch, so Kubernetes' `..data`
//! symlink swap is seen, plus a 30 s poll), `SIGHUP`, and direct calls (admin API). A
//! file that fails to read, parse or validate changes nothing: the error is logged with
//! its line and counted, and the last good snapshot keeps serving.

use super::secrets::MasterKey;
use super::snapshot::Snapshot;
use crate::config::{Config, ConfigErrors, RateLimitConfig};
use arc_swap::ArcSwap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const POLL: Duration = Duration::from_secs(30);

/// The live credentials and where they come from.
#[derive(Debug)]
pub struct Credentials {
    current: ArcSwap<Snapshot>,
    source: Option<Source>,
    /// Reloads that succeeded / failed, and the unix time of the last good one.
    pub reloads_ok: AtomicU64,
    pub reloads_failed: AtomicU64,
    pub last_good_unix: AtomicU64,
}

#[derive(Debug)]
struct Source {
    path: PathBuf,
    master_key: PathBuf,
    default_rate: RateLimitConfig,
    /// The files' fingerprint taken just before the first snapshot was read, so that the
    /// watcher (started later) also sees a change made in between.
    baseline: u64,
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
        let master = read_master_key(&self.master_key)?;
        super::load(&self.path, master.as_ref(), self.default_rate)
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
        let baseline = crate::watch::fingerprint(&[path.clone(), config.master_key.clone()]);
        let source = Source {
            path: path.clone(),
            master_key: config.master_key.clone(),
            default_rate: config.rate_limit,
            baseline,
        };
        let snap = source.build()?;
        tracing::info!(path = %path.display(), users = snap.user_count(), keys = snap.key_count(), "credentials loaded");
        let c = Credentials::fixed(snap);
        Ok(Credentials { source: Some(source), ..c })
    }

    /// Credentials that never reload (tests, benches, no file configured).
    pub fn fixed(snap: Snapshot) -> Credentials {
        Credentials {
            current: ArcSwap::from_pointee(snap),
            source: None,
            reloads_ok: AtomicU64::new(0),
            reloads_failed: AtomicU64::new(0),
            last_good_unix: AtomicU64::new(unix_now()),
        }
    }

    /// The current snapshot. A request takes it once and uses it throughout.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// Re-reads the file now. On failure the current snapshot stays.
    pub fn reload(&self) -> Result<(), ConfigErrors> {
        let Some(source) = &self.source else { return Ok(()) };
        match source.build() {
            Ok(snap) => {
                tracing::info!(users = snap.user_count(), keys = snap.key_count(), "credentials reloaded");
                self.current.store(Arc::new(snap));
                self.reloads_ok.fetch_add(1, Ordering::Relaxed);
                self.last_good_unix.store(unix_now(), Ordering::Relaxed);
                Ok(())
            }
            Err(e) => {
                self.reloads_failed.fetch_add(1, Ordering::Relaxed);
                tracing::error!(error = %e, "credentials reload failed; the previous credentials stay in force");
                Err(e)
            }
        }
    }

    /// Reloads on file changes and SIGHUP for as long as the process runs.
    pub fn spawn_reloader(self: Arc<Self>) {
        let Some(source) = &self.source else { return };
        let mut changes =
            crate::watch::watch_since(vec![source.path.clone(), source.master_key.clone()], POLL, source.baseline);
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
