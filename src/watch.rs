//! Change detection for files the gateway reloads (TLS certificates, credentials).
//!
//! Watches the *directories* holding the files, not the files: Kubernetes updates a
//! mounted Secret by swapping a `..data` symlink, which a watch on the file never sees
//! again after the first swap. Any event triggers a re-read after a short debounce; a
//! content hash decides whether anything really changed (so our own atomic writes and
//! unrelated files are no-ops). A slow poll is the backstop for missed events.

use notify::event::{AccessKind, AccessMode};
use notify::{EventKind, RecursiveMode, Watcher};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::sync::mpsc;

const DEBOUNCE: Duration = Duration::from_millis(200);

/// A hash of the files' current contents (a missing file hashes as absent).
pub fn fingerprint(paths: &[PathBuf]) -> u64 {
    let mut h = DefaultHasher::new();
    for p in paths {
        std::fs::read(p).ok().hash(&mut h);
    }
    h.finish()
}

/// False for events that only say a file was opened, read or closed unwritten: our own
/// re-read after an event is one of those, and reacting to it would re-read for ever.
fn may_change(kind: &EventKind) -> bool {
    match kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) => false,
        _ => true,
    }
}

/// Sends `()` on the returned channel each time the contents of `paths` change. The
/// caller read the files when their [`fingerprint`] was `baseline`: a change made since
/// then, even before the watcher started, is reported at once. The watcher lives as
/// long as the receiver.
pub fn watch_since(paths: Vec<PathBuf>, poll: Duration, baseline: u64) -> mpsc::Receiver<()> {
    let (tx, rx) = mpsc::channel(1);
    let (ev_tx, mut ev_rx) = mpsc::channel::<()>(1);
    let watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        if res.is_ok_and(|ev| may_change(&ev.kind)) {
            // Full channel: a re-read is already due, which covers this event too.
            let _ = ev_tx.try_send(());
        }
    });
    let mut watcher = match watcher {
        Ok(w) => Some(w),
        Err(e) => {
            tracing::warn!(error = %e, "file watching unavailable; relying on polling");
            None
        }
    };
    if let Some(w) = watcher.as_mut() {
        let mut dirs: Vec<&Path> =
            paths.iter().map(|p| p.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."))).collect();
        dirs.dedup();
        for d in dirs {
            if let Err(e) = w.watch(d, RecursiveMode::NonRecursive) {
                tracing::warn!(dir = %d.display(), error = %e, "cannot watch directory; relying on polling");
            }
        }
    }
    tokio::spawn(async move {
        let _watcher = watcher; // dropped (and unregistered) when this task ends
        let mut last = fingerprint(&paths);
        // Changed between the caller's read and the watch being set up: no event will
        // ever come for that change.
        if baseline != last && tx.send(()).await.is_err() {
            return;
        }
        let mut tick = tokio::time::interval(poll);
        tick.tick().await;
        loop {
            tokio::select! {
                ev = ev_rx.recv() => {
                    if ev.is_none() { return; }
                    tokio::time::sleep(DEBOUNCE).await;
                    while ev_rx.try_recv().is_ok() {}
                }
                _ = tick.tick() => {}
                _ = tx.closed() => return,
            }
            let paths2 = paths.clone();
            let now = tokio::task::spawn_blocking(move || fingerprint(&paths2)).await.unwrap_or(last);
            if now != last {
                last = now;
                if tx.send(()).await.is_err() {
                    return;
                }
            }
        }
    });
    rx
}
