//! The audit log (SPEC §8): one JSON line per request and one per admin change, to a
//! file or stdout.
//!
//! Off the request path: records go through a bounded channel to one writer task. When
//! the writer falls behind (slow disk) records are dropped and counted, never waited
//! for. A file is opened in append mode (so logrotate's `copytruncate` works), reopened
//! on `SIGHUP`, and reopened when the path no longer names the open file (logrotate's
//! rename). If it cannot be written, requests go on, one error is logged, lost records
//! are counted, and writing resumes when the file can be opened again.
//!
//! Never a secret: records hold ids, names, the normalised path (no query string: a
//! client may put anything there) and reasons.

use crate::config::AuditSink;
use serde::Serialize;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tokio::sync::mpsc;

const QUEUE: usize = 16_384;
/// How often the writer takes what the queue holds (the queue holds QUEUE / BATCH =
/// 1.6 M records a second: well over any rate one gateway reaches).
const BATCH: Duration = Duration::from_millis(10);

/// One proxied request.
#[derive(Debug, Serialize)]
pub struct RequestRecord<'a> {
    pub kind: &'static str,
    pub time: String,
    pub request_id: &'a str,
    pub client: String,
    pub user: Option<&'a str>,
    pub key_id: Option<&'a str>,
    pub proxied_user: Option<&'a str>,
    pub route: Option<&'a str>,
    pub method: &'a str,
    pub path: Option<&'a str>,
    pub status: u16,
    pub duration_ms: f64,
    pub outcome: &'static str,
    pub reason: Option<&'static str>,
}

/// One change made through the admin API or the CLI.
#[derive(Debug, Serialize)]
pub struct AdminRecord<'a> {
    pub kind: &'static str,
    pub time: String,
    pub actor: &'a str,
    pub action: &'a str,
    pub target: &'a str,
    /// Changed fields with their new, non-secret values.
    pub changes: serde_json::Value,
}

impl<'a> AdminRecord<'a> {
    /// The record of one admin change, made now.
    pub fn new(actor: &'a str, action: &'a str, target: &'a str, changes: serde_json::Value) -> AdminRecord<'a> {
        AdminRecord { kind: "admin", time: now_rfc3339(), actor, action, target, changes }
    }
}

/// Now, RFC 3339 with milliseconds.
pub fn now_rfc3339() -> String {
    let t = OffsetDateTime::now_utc();
    let t = t.replace_millisecond(t.millisecond()).unwrap_or(t);
    t.format(&Rfc3339).unwrap_or_default()
}

/// The sending side of the audit log.
#[derive(Debug)]
pub struct Audit {
    tx: mpsc::Sender<String>,
    /// Records dropped because the writer fell behind or could not write.
    pub lost: std::sync::Arc<AtomicU64>,
    sink: AuditSink,
}

impl Audit {
    /// Starts the writer task (needs a tokio runtime).
    pub fn start(sink: &AuditSink) -> Audit {
        let (tx, rx) = mpsc::channel(QUEUE);
        let lost = std::sync::Arc::new(AtomicU64::new(0));
        tokio::spawn(writer(sink.clone(), rx, lost.clone()));
        Audit { tx, lost, sink: sink.clone() }
    }

    /// Where records go.
    pub fn sink(&self) -> &AuditSink {
        &self.sink
    }

    /// Queues a record; drops (and counts) it if the writer is behind.
    pub fn send<T: Serialize>(&self, record: &T) {
        let Ok(line) = serde_json::to_string(record) else { return };
        if self.tx.try_send(line).is_err() {
            self.lost.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Appends one record to `sink` directly (the CLI, which has no writer task).
pub fn append_now<T: Serialize>(sink: &AuditSink, record: &T) -> std::io::Result<()> {
    let AuditSink::File(path) = sink else { return Ok(()) };
    let mut line = serde_json::to_vec(record).map_err(std::io::Error::other)?;
    line.push(b'\n');
    open_append(path)?.write_all(&line)
}

fn open_append(path: &PathBuf) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new().create(true).append(true).mode(0o640).open(path)
}

/// The open file and the inode it had, to notice a rename.
struct Open {
    file: std::io::BufWriter<std::fs::File>,
    ino: u64,
}

async fn writer(sink: AuditSink, mut rx: mpsc::Receiver<String>, lost: std::sync::Arc<AtomicU64>) {
    let mut out = Output {
        path: match sink {
            AuditSink::Stdout => None,
            AuditSink::File(p) => Some(p),
        },
        open: None,
        failing: false,
    };
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    // The writer polls the queue on a timer instead of waiting on it: a sender then never
    // has to wake it, which would be a cross-thread wake-up per request.
    let mut tick = tokio::time::interval(BATCH);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut checked = std::time::Instant::now();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            Some(()) = async { match hup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => {
                out.open = None; // SIGHUP: reopen
            }
        }
        // Reopen when logrotate renamed or removed the file under us: checked once a
        // second, not per record; records written meanwhile land in the renamed file.
        if checked.elapsed() >= Duration::from_secs(1) {
            checked = std::time::Instant::now();
            out.reopen_if_moved();
        }
        loop {
            match rx.try_recv() {
                Ok(line) => {
                    if !out.write(&line) {
                        lost.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    out.flush();
                    return;
                }
            }
        }
        out.flush();
    }
}

/// Where records go: stdout, or a file (re)opened as needed.
struct Output {
    path: Option<PathBuf>,
    open: Option<Open>,
    /// In a failing streak: its error was logged already.
    failing: bool,
}

impl Output {
    fn reopen_if_moved(&mut self) {
        if let (Some(path), Some(o)) = (&self.path, &self.open)
            && std::fs::metadata(path).map(|m| m.ino()).ok() != Some(o.ino)
        {
            self.open = None;
        }
    }

    /// Writes one record; false when it was lost.
    fn write(&mut self, line: &str) -> bool {
        let Some(path) = &self.path else {
            let mut stdout = std::io::stdout().lock();
            return stdout.write_all(line.as_bytes()).and_then(|_| stdout.write_all(b"\n")).is_ok();
        };
        if self.open.is_none() {
            match open_append(path).and_then(|f| {
                Ok(Open { ino: f.metadata()?.ino(), file: std::io::BufWriter::with_capacity(64 << 10, f) })
            }) {
                Ok(o) => {
                    if self.failing {
                        tracing::info!(path = %path.display(), "audit log writable again");
                    }
                    self.failing = false;
                    self.open = Some(o);
                }
                Err(e) => {
                    if !self.failing {
                        tracing::error!(path = %path.display(), error = %e, "cannot open the audit log; records are counted as lost until it can be");
                    }
                    self.failing = true;
                    return false;
                }
            }
        }
        let written = self
            .open
            .as_mut()
            .is_some_and(|o| o.file.write_all(line.as_bytes()).and_then(|_| o.file.write_all(b"\n")).is_ok());
        if !written && self.open.take().is_some() && !self.failing {
            self.failing = true;
            tracing::error!(path = %path.display(), "cannot write the audit log; records are counted as lost until it can be");
        }
        written
    }

    fn flush(&mut self) {
        match &self.path {
            None => {
                let _ = std::io::stdout().flush();
            }
            Some(path) => {
                if let Some(o) = self.open.as_mut()
                    && o.file.flush().is_err()
                {
                    self.open = None;
                    if !self.failing {
                        self.failing = true;
                        tracing::error!(path = %path.display(), "cannot write the audit log; records are counted as lost until it can be");
                    }
                }
            }
        }
    }
}
