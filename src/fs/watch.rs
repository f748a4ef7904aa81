//! Change detection for files the gateway reloads (TLS certificates, credentials).
//!
//! Watches the *directories* holding the files, not the files: Kubernetes updates a
//! mounted Secret by swapping a `..data` symlink, which a watch on the file never sees
//! again after the first swap. A file renamed or created onto a watched path (an atomic
//! write: the CLI's, the admin API's, most deploy tools') is complete, so it is re-read at
//! once; any other event (an editor writing in place, a symlink swap) after a short
//! debounce. A content hash decides whether anything really changed (so unrelated files
//! are no-ops). A slow poll is the backstop for missed events.

use notify::event::{AccessKind, AccessMode, ModifyKind, RenameMode};
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

/// False for events about other files of the directory (the usage state written beside
/// the credentials every few seconds, editors' swap files, the lock file): reacting would
/// re-read and hash the whole watched file each time. Kubernetes' `..data` swap and
/// events without a path still count.
fn concerns(ev: &notify::Event, paths: &[PathBuf]) -> bool {
    ev.paths.is_empty()
        || ev
            .paths
            .iter()
            .any(|p| paths.contains(p) || p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("..")))
}

/// True for an event that puts a complete file at one of `paths` (rename onto it, or
/// create it): nothing more is coming for it, so the debounce would only add latency.
fn lands_complete(ev: &notify::Event, paths: &[PathBuf]) -> bool {
    let lands = matches!(
        ev.kind,
        EventKind::Create(_) | EventKind::Modify(ModifyKind::Name(RenameMode::To | RenameMode::Both | RenameMode::Any))
    );
    lands && ev.paths.iter().any(|p| paths.contains(p))
}

/// Sends `()` on the returned channel each time the contents of `paths` change. The
/// caller read the files when their [`fingerprint`] was `baseline`: a change made since
/// then, even before the watcher started, is reported at once. The watcher lives as
/// long as the receiver.
pub fn watch_since(paths: Vec<PathBuf>, poll: Duration, baseline: u64) -> mpsc::Receiver<()> {
    let (tx, rx) = mpsc::channel(1);
    // `true`: re-read now; `false`: re-read after the debounce.
    let (ev_tx, mut ev_rx) = mpsc::channel::<bool>(8);
    let watched = paths.clone();
    let watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        if let Ok(ev) = res
            && may_change(&ev.kind)
            && concerns(&ev, &watched)
        {
            // Full channel: a re-read is already due, which covers this event too.
            let _ = ev_tx.try_send(lands_complete(&ev, &watched));
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
                    let Some(complete) = ev else { return };
                    if !complete {
                        // Debounce, cut short by a complete file landing (an atomic write
                        // starts with events for its temp file).
                        let deadline = tokio::time::sleep(DEBOUNCE);
                        tokio::pin!(deadline);
                        loop {
                            tokio::select! {
                                _ = &mut deadline => break,
                                e = ev_rx.recv() => match e {
                                    Some(true) => break,
                                    Some(false) => {}
                                    None => return,
                                },
                            }
                        }
                    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use notify::event::CreateKind;

    fn event(kind: EventKind, paths: &[&str]) -> notify::Event {
        let mut ev = notify::Event::new(kind);
        ev.paths = paths.iter().map(PathBuf::from).collect();
        ev
    }

    #[test]
    fn only_a_complete_file_landing_on_a_watched_path_skips_the_debounce() {
        let watched = vec![PathBuf::from("/etc/gh/credentials.yaml")];
        let renamed = EventKind::Modify(ModifyKind::Name(RenameMode::To));
        assert!(lands_complete(&event(renamed, &["/etc/gh/credentials.yaml"]), &watched));
        let both = EventKind::Modify(ModifyKind::Name(RenameMode::Both));
        assert!(lands_complete(&event(both, &["/etc/gh/.tmp1", "/etc/gh/credentials.yaml"]), &watched));
        assert!(lands_complete(&event(EventKind::Create(CreateKind::File), &["/etc/gh/credentials.yaml"]), &watched));
        // The temp file of an atomic write, a rename away, an in-place write: debounced.
        assert!(!lands_complete(&event(renamed, &["/etc/gh/.tmp1"]), &watched));
        let away = EventKind::Modify(ModifyKind::Name(RenameMode::From));
        assert!(!lands_complete(&event(away, &["/etc/gh/credentials.yaml"]), &watched));
        let data = EventKind::Modify(ModifyKind::Data(notify::event::DataChange::Any));
        assert!(!lands_complete(&event(data, &["/etc/gh/credentials.yaml"]), &watched));
    }

    #[test]
    fn events_about_other_files_of_the_directory_are_ignored() {
        let watched = vec![PathBuf::from("/etc/gh/credentials.yaml")];
        let data = EventKind::Modify(ModifyKind::Data(notify::event::DataChange::Any));
        assert!(concerns(&event(data, &["/etc/gh/credentials.yaml"]), &watched));
        assert!(concerns(&event(EventKind::Create(CreateKind::Any), &["/etc/gh/..data_tmp"]), &watched));
        assert!(concerns(&event(data, &[]), &watched));
        assert!(!concerns(&event(data, &["/etc/gh/credentials.yaml.usage.json"]), &watched));
        assert!(!concerns(&event(data, &["/etc/gh/.credentials.yaml.swp"]), &watched));
    }
}
