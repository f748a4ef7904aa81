//! The audit log (docs/operations.md): one JSON line per request and one per admin change, to a
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
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tokio::sync::{mpsc, oneshot};

const QUEUE: usize = 16_384;
/// The longest `User-Agent` a record keeps: enough for any real client's, and a hostile
/// one cannot make every record 8 KiB.
pub const USER_AGENT_MAX: usize = 256;
/// How often the writer takes what the queue holds (the queue holds QUEUE / BATCH =
/// 1.6 M records a second: well over any rate one gateway reaches).
const BATCH: Duration = Duration::from_millis(10);

/// One proxied request.
#[derive(Debug, Serialize)]
pub struct RequestRecord<'a> {
    pub kind: &'static str,
    pub time: String,
    pub request_id: &'a str,
    pub client: &'a str,
    pub user: Option<&'a str>,
    pub key_id: Option<&'a str>,
    pub proxied_user: Option<&'a str>,
    pub route: Option<&'a str>,
    pub method: &'a str,
    pub path: Option<&'a str>,
    /// The client's `User-Agent`, cut to [`USER_AGENT_MAX`] bytes.
    pub user_agent: Option<&'a str>,
    /// The upstream target (`host:port`) the request was sent to, or last tried.
    pub upstream: Option<&'a str>,
    pub status: u16,
    pub duration_ms: f64,
    /// Body bytes sent to the client (for a tunnel, every byte the upstream sent).
    pub bytes_sent: u64,
    /// Bytes the client sent through a tunnel; `null` for other requests.
    pub bytes_received: Option<u64>,
    pub outcome: &'static str,
    pub reason: Option<&'static str>,
}

impl RequestRecord<'_> {
    /// The record as one JSON line, written by hand: the derived `Serialize` through
    /// serde_json cost about 6,000 instructions a record (every key escaped as a string),
    /// a tenth of the gateway's own work per request. The JSON is the same (a unit test
    /// compares the two).
    pub fn to_json(&self) -> String {
        // A typical record is 330-400 bytes: one allocation, no regrowth.
        let mut o = String::with_capacity(512);
        o.push_str("{\"kind\":");
        json_str(&mut o, self.kind);
        o.push_str(",\"time\":");
        json_str(&mut o, &self.time);
        o.push_str(",\"request_id\":");
        json_str(&mut o, self.request_id);
        o.push_str(",\"client\":");
        json_str(&mut o, self.client);
        for (key, value) in
            [("user", self.user), ("key_id", self.key_id), ("proxied_user", self.proxied_user), ("route", self.route)]
        {
            json_field(&mut o, key, value);
        }
        o.push_str(",\"method\":");
        json_str(&mut o, self.method);
        json_field(&mut o, "path", self.path);
        json_field(&mut o, "user_agent", self.user_agent);
        json_field(&mut o, "upstream", self.upstream);
        o.push_str(",\"status\":");
        push_u16(&mut o, self.status);
        if self.duration_ms.is_finite() {
            // serde_json's own float formatter: the same digits, without core::fmt.
            o.push_str(",\"duration_ms\":");
            o.push_str(zmij::Buffer::new().format_finite(self.duration_ms));
        } else {
            o.push_str(",\"duration_ms\":null");
        }
        o.push_str(",\"bytes_sent\":");
        o.push_str(itoa::Buffer::new().format(self.bytes_sent));
        o.push_str(",\"bytes_received\":");
        match self.bytes_received {
            Some(n) => o.push_str(itoa::Buffer::new().format(n)),
            None => o.push_str("null"),
        }
        o.push_str(",\"outcome\":");
        json_str(&mut o, self.outcome);
        json_field(&mut o, "reason", self.reason);
        o.push('}');
        o
    }
}

/// A number's digits without the formatting machinery.
fn push_u16(o: &mut String, n: u16) {
    let mut digits = [0u8; 5];
    let mut i = digits.len();
    let mut n = n;
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    for &d in &digits[i..] {
        o.push(char::from(d));
    }
}

/// `,"key":value` with a JSON string or `null`.
fn json_field(o: &mut String, key: &str, value: Option<&str>) {
    o.push_str(",\"");
    o.push_str(key);
    o.push_str("\":");
    match value {
        Some(v) => json_str(o, v),
        None => o.push_str("null"),
    }
}

/// A JSON string, escaped as serde_json escapes it.
fn json_str(o: &mut String, s: &str) {
    o.push('"');
    // Almost every value needs no escape: find out without branching per byte (this
    // loop vectorises), then copy the whole string at once.
    let plain = s.bytes().fold(true, |ok, b| ok & (b >= 0x20) & (b != b'"') & (b != b'\\'));
    if plain {
        o.push_str(s);
        o.push('"');
        return;
    }
    let mut clean = 0;
    for (i, b) in s.bytes().enumerate() {
        let escaped = match b {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            b'\n' => "\\n",
            b'\r' => "\\r",
            b'\t' => "\\t",
            0x08 => "\\b",
            0x0c => "\\f",
            0..=0x1f => "",
            _ => continue,
        };
        o.push_str(&s[clean..i]);
        if escaped.is_empty() {
            use std::fmt::Write as _;
            let _ = write!(o, "\\u{:04x}", b);
        } else {
            o.push_str(escaped);
        }
        clean = i + 1;
    }
    o.push_str(&s[clean..]);
    o.push('"');
}

/// One change made through the admin API or the CLI.
#[derive(Debug, Serialize)]
pub struct AdminRecord<'a> {
    pub kind: &'static str,
    pub time: String,
    pub actor: &'a str,
    /// For the admin API: the caller's address, and which admin token it used (a
    /// fingerprint: `sha256:` and the first 8 hex digits of the token's SHA-256).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token: Option<&'a str>,
    /// The admin token's id (`adt_…`, or `bootstrap` for the environment's token) and name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_name: Option<&'a str>,
    pub action: &'a str,
    pub target: &'a str,
    /// Changed fields with their new, non-secret values.
    pub changes: serde_json::Value,
}

/// The admin token an admin API call was made with, as its audit record names it.
#[derive(Debug, Clone, Copy)]
pub struct TokenRef<'a> {
    pub fingerprint: &'a str,
    pub id: &'a str,
    pub name: &'a str,
}

impl<'a> AdminRecord<'a> {
    /// The record of one admin change, made now.
    pub fn new(actor: &'a str, action: &'a str, target: &'a str, changes: serde_json::Value) -> AdminRecord<'a> {
        AdminRecord {
            kind: "admin",
            time: now_rfc3339(),
            actor,
            client: None,
            token: None,
            token_id: None,
            token_name: None,
            action,
            target,
            changes,
        }
    }

    /// The record names the admin API caller: its address and admin token.
    pub fn by(self, client: Option<&'a str>, token: TokenRef<'a>) -> AdminRecord<'a> {
        AdminRecord {
            client,
            token: Some(token.fingerprint),
            token_id: Some(token.id),
            token_name: Some(token.name),
            ..self
        }
    }
}

/// Now, RFC 3339 in UTC with milliseconds (`2026-11-23T13:40:05.120Z`). The part up to
/// the second is formatted once a second per thread: this runs for every request.
pub fn now_rfc3339() -> String {
    thread_local! {
        static SECOND: std::cell::RefCell<(i64, String)> = const { std::cell::RefCell::new((i64::MIN, String::new())) };
    }
    // The clock as seconds and milliseconds: cheap, where `OffsetDateTime::now_utc`
    // works out the calendar date on every call.
    let since_epoch = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let unix = i64::try_from(since_epoch.as_secs()).unwrap_or(i64::MAX);
    SECOND.with_borrow_mut(|(second, prefix)| {
        if *second != unix {
            *second = unix;
            // `…:05Z` without its `Z`: the milliseconds follow.
            let t = OffsetDateTime::from_unix_timestamp(unix).unwrap_or(OffsetDateTime::UNIX_EPOCH);
            let whole = t.format(&Rfc3339).unwrap_or_default();
            *prefix = whole.trim_end_matches('Z').to_string();
        }
        let ms = since_epoch.subsec_millis();
        let mut now = String::with_capacity(prefix.len() + 5);
        now.push_str(prefix);
        now.push('.');
        for d in [ms / 100, ms / 10 % 10, ms % 10] {
            now.push(char::from(b'0' + d as u8));
        }
        now.push('Z');
        now
    })
}

/// Records that never reached the audit log, by why (the `reason` label of
/// `gatehouse_audit_dropped_total`). Each lost record is counted once, where it is lost.
#[derive(Debug, Default)]
pub struct Dropped {
    /// Refused by the full queue: the writer fell behind a burst.
    queue_full: AtomicU64,
    /// Taken by the writer but not written: the file could not be opened, or a write
    /// failed (disk full, file system error); the writer is gone at shutdown.
    write_failed: AtomicU64,
}

/// A reading of `Dropped`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DroppedCounts {
    pub queue_full: u64,
    pub write_failed: u64,
}

impl Dropped {
    pub fn counts(&self) -> DroppedCounts {
        DroppedCounts {
            queue_full: self.queue_full.load(Ordering::Relaxed),
            write_failed: self.write_failed.load(Ordering::Relaxed),
        }
    }

    fn add_write_failed(&self, n: u64) {
        if n > 0 {
            self.write_failed.fetch_add(n, Ordering::Relaxed);
        }
    }
}

/// The sending side of the audit log.
#[derive(Debug)]
pub struct Audit {
    tx: mpsc::Sender<String>,
    /// Asks the writer to write what is queued now, and says when it has.
    drain: mpsc::Sender<oneshot::Sender<()>>,
    dropped: Arc<Dropped>,
    sink: AuditSink,
}

impl Audit {
    /// Starts the writer task (needs a tokio runtime).
    pub fn start(sink: &AuditSink) -> Audit {
        let (tx, rx) = mpsc::channel(QUEUE);
        let (drain, drains) = mpsc::channel(1);
        let dropped = Arc::new(Dropped::default());
        tokio::spawn(writer(sink.clone(), rx, drains, dropped.clone()));
        Audit { tx, drain, dropped, sink: sink.clone() }
    }

    /// Returns once every record queued before the call is written (or counted as lost):
    /// at shutdown, before the runtime, and the writer task with it, goes away.
    pub async fn drain(&self) {
        let (done, written) = oneshot::channel();
        if self.drain.send(done).await.is_ok() {
            let _ = written.await;
        }
    }

    /// Where records go.
    pub fn sink(&self) -> &AuditSink {
        &self.sink
    }

    /// Records lost so far, by reason.
    pub fn dropped(&self) -> DroppedCounts {
        self.dropped.counts()
    }

    /// Queues a record; drops (and counts) it if the writer is behind.
    pub fn send<T: Serialize>(&self, record: &T) {
        match serde_json::to_string(record) {
            Ok(line) => self.send_line(line),
            // Not expected for these records (string keys only), but a record that cannot
            // be written is still one the log lacks.
            Err(_) => self.dropped.add_write_failed(1),
        }
    }

    /// Queues one JSON line (no newline); drops (and counts) it if the writer is behind.
    pub fn send_line(&self, line: String) {
        match self.tx.try_send(line) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.dropped.queue_full.fetch_add(1, Ordering::Relaxed);
            }
            // The writer task has ended (the runtime is shutting down): it will never
            // write this record.
            Err(mpsc::error::TrySendError::Closed(_)) => self.dropped.add_write_failed(1),
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
    file: std::fs::File,
    ino: u64,
}

async fn writer(
    sink: AuditSink,
    mut rx: mpsc::Receiver<String>,
    mut drains: mpsc::Receiver<oneshot::Sender<()>>,
    dropped: Arc<Dropped>,
) {
    let mut out = Output::new(match sink {
        AuditSink::Stdout => None,
        AuditSink::File(p) => Some(p),
    });
    let mut warning = LossWarning::default();
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    // The writer polls the queue on a timer instead of waiting on it: a sender then never
    // has to wake it, which would be a cross-thread wake-up per request.
    let mut tick = tokio::time::interval(BATCH);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut checked = Instant::now();
    loop {
        let mut drained = None;
        tokio::select! {
            _ = tick.tick() => {}
            Some(()) = async { match hup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => {
                out.open = None; // SIGHUP: reopen
            }
            Some(done) = drains.recv() => drained = Some(done),
        }
        // Reopen when logrotate renamed or removed the file under us: checked once a
        // second, not per record; records written meanwhile land in the renamed file.
        if checked.elapsed() >= Duration::from_secs(1) {
            checked = Instant::now();
            out.reopen_if_moved();
        }
        let open = loop {
            match rx.try_recv() {
                Ok(line) => out.push(&line, &dropped),
                Err(mpsc::error::TryRecvError::Empty) => break true,
                Err(mpsc::error::TryRecvError::Disconnected) => break false,
            }
        };
        out.flush(&dropped);
        warning.tick(dropped.counts(), &out, Instant::now());
        if let Some(done) = drained {
            let _ = done.send(());
        }
        if !open {
            return;
        }
    }
}

/// Bytes a write takes at most before the records so far go to the file (a batch can
/// hold thousands of records).
const BUFFER: usize = 64 << 10;

/// Where records go: stdout, or a file (re)opened as needed.
///
/// Records of a batch are gathered in one buffer and written with as few `write` calls
/// as possible. The buffer holds whole records only, each ending in `\n`, so when a write
/// fails the records lost are exactly the newlines not yet written: a record the file
/// holds only part of is counted as lost.
struct Output {
    path: Option<PathBuf>,
    open: Option<Open>,
    buf: Vec<u8>,
    /// The file may end in part of a record (a write stopped midway): the next write
    /// starts a new line, so that a good record is not glued to the fragment.
    torn: bool,
    /// Why the last write failed, until one succeeds: for the loss warning.
    error: Option<String>,
}

impl Output {
    fn new(path: Option<PathBuf>) -> Output {
        Output { path, open: None, buf: Vec::with_capacity(BUFFER + 1024), torn: false, error: None }
    }

    fn reopen_if_moved(&mut self) {
        if let (Some(path), Some(o)) = (&self.path, &self.open)
            && std::fs::metadata(path).map(|m| m.ino()).ok() != Some(o.ino)
        {
            self.open = None;
        }
    }

    /// Adds one record to the batch; writes the batch once it is large.
    fn push(&mut self, line: &str, dropped: &Dropped) {
        self.buf.extend_from_slice(line.as_bytes());
        self.buf.push(b'\n');
        if self.buf.len() >= BUFFER {
            self.flush(dropped);
        }
    }

    /// Writes the batch; counts every record of it that did not reach the file.
    fn flush(&mut self, dropped: &Dropped) {
        if self.buf.is_empty() {
            return;
        }
        match self.write_batch() {
            Ok(()) => self.error = None,
            Err((written, e)) => {
                dropped.add_write_failed(records_in(&self.buf[written..]));
                if written > 0 && self.buf[written - 1] != b'\n' {
                    self.torn = true;
                }
                // Open again for the next batch: the path may name a new, writable file.
                self.open = None;
                self.error = Some(e);
            }
        }
        self.buf.clear();
    }

    /// Writes the whole buffer, or says how many bytes of it were written and why no more.
    fn write_batch(&mut self) -> Result<(), (usize, String)> {
        let Some(path) = &self.path else {
            return write_counting(&mut std::io::stdout().lock(), &mut self.torn, &self.buf)
                .map_err(|(n, e)| (n, format!("stdout: {e}")));
        };
        // A file deleted under the gateway (an `rm`, a rotation without `postrotate`) would
        // swallow every record written to it until the once-a-second check: one `fstat`
        // per batch sees it first, and the batch goes to a new file at the path instead.
        if self.open.as_ref().is_some_and(|o| o.file.metadata().is_ok_and(|m| m.nlink() == 0)) {
            self.open = None;
        }
        if self.open.is_none() {
            let opened = open_append(path).and_then(|f| Ok(Open { ino: f.metadata()?.ino(), file: f }));
            match opened {
                Ok(o) => self.open = Some(o),
                Err(e) => return Err((0, format!("cannot open {}: {e}", path.display()))),
            }
        }
        let Some(o) = self.open.as_mut() else { return Err((0, "not open".into())) };
        write_counting(&mut o.file, &mut self.torn, &self.buf)
            .map_err(|(n, e)| (n, format!("cannot write {}: {e}", path.display())))
    }
}

/// Writes `buf` (after a newline when the destination ends in a fragment) and flushes;
/// on error, how many bytes of `buf` were written.
fn write_counting(w: &mut impl Write, torn: &mut bool, buf: &[u8]) -> Result<(), (usize, std::io::Error)> {
    if *torn {
        w.write_all(b"\n").and_then(|_| w.flush()).map_err(|e| (0, e))?;
        *torn = false;
    }
    let mut done = 0;
    while done < buf.len() {
        match w.write(&buf[done..]) {
            Ok(0) => return Err((done, std::io::ErrorKind::WriteZero.into())),
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err((done, e)),
        }
    }
    // A no-op for a file; stdout's line buffer has already passed every whole line on.
    w.flush().map_err(|e| (done, e))
}

/// The records (newline-terminated lines) in `bytes`.
fn records_in(bytes: &[u8]) -> u64 {
    bytes.iter().filter(|&&b| b == b'\n').count() as u64
}

/// At most one warning per this interval about lost records.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// Logs lost records: at most once per `WARN_EVERY`, each warning with the records lost
/// since the one before (never their contents), the first as soon as one is lost. Then
/// one line when writing works again.
#[derive(Default)]
struct LossWarning {
    reported: DroppedCounts,
    last: Option<Instant>,
    /// A write failure was reported and no write has succeeded since.
    failing: bool,
}

impl LossWarning {
    fn tick(&mut self, now: DroppedCounts, out: &Output, at: Instant) {
        if let Some(lost) = self.due(now, at) {
            let error = out.error.as_deref().unwrap_or("none");
            tracing::warn!(
                queue_full = lost.queue_full,
                write_failed = lost.write_failed,
                last_error = error,
                "audit records dropped since the last warning (gatehouse_audit_dropped_total); requests are still served"
            );
            self.failing |= lost.write_failed > 0;
        }
        if self.failing && out.error.is_none() && self.reported == now {
            self.failing = false;
            tracing::info!("the audit log is written again");
        }
    }

    /// The records lost since the last warning, when a warning is due.
    fn due(&mut self, now: DroppedCounts, at: Instant) -> Option<DroppedCounts> {
        if now == self.reported || self.last.is_some_and(|t| at.duration_since(t) < WARN_EVERY) {
            return None;
        }
        let lost = DroppedCounts {
            queue_full: now.queue_full - self.reported.queue_full,
            write_failed: now.write_failed - self.reported.write_failed,
        };
        self.reported = now;
        self.last = Some(at);
        Some(lost)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record<'a>(text: &'a str, time: String, duration_ms: f64) -> RequestRecord<'a> {
        RequestRecord {
            kind: "request",
            time,
            request_id: text,
            client: "2001:db8::1",
            user: Some(text),
            key_id: None,
            proxied_user: Some("p"),
            route: None,
            method: "GET",
            path: Some(text),
            user_agent: Some(text),
            upstream: None,
            status: 503,
            duration_ms,
            bytes_sent: 12345,
            bytes_received: None,
            outcome: "failed",
            reason: None,
        }
    }

    /// the hand-written line is the JSON serde_json writes, whatever the strings hold
    #[test]
    fn hand_written_json_matches_serde() {
        let nasty = "q\"b\\s/n\nr\rt\tb\u{8}f\u{c}nul\u{0}esc\u{1b}del\u{7f}é😀";
        let cases = [(nasty, 0.123, 200), ("", 1.0, 0), ("plain", 1234.5, 7), ("/a/b", 0.0, 65535), ("\"", 7.25, 503)];
        for (text, ms, status) in cases {
            let r = RequestRecord { status, ..record(text, now_rfc3339(), ms) };
            let line = r.to_json();
            assert_eq!(line, serde_json::to_string(&r).unwrap(), "{text:?}");
            assert!(!line.contains('\n'));
        }
    }

    /// the cached timestamp is RFC 3339 with milliseconds, and moves with the clock
    #[test]
    fn timestamps_are_rfc3339_with_milliseconds() {
        let a = now_rfc3339();
        let parsed = OffsetDateTime::parse(&a, &Rfc3339).unwrap();
        assert!((OffsetDateTime::now_utc() - parsed).abs() < time::Duration::seconds(2), "{a}");
        assert_eq!(a.len(), "2026-11-23T13:40:05.120Z".len(), "{a}");
        assert!(a.ends_with('Z') && a.as_bytes()[19] == b'.', "{a}");
        std::thread::sleep(Duration::from_millis(1100));
        assert!(OffsetDateTime::parse(&now_rfc3339(), &Rfc3339).unwrap() > parsed);
    }

    /// a record the full queue refuses is counted once as queue_full; queued ones are not
    #[test]
    fn a_full_queue_counts_each_refused_record() {
        // No writer task: the receiver is held and never read, so the queue stays full.
        let (tx, _rx) = mpsc::channel(2);
        let (drain, _drains) = mpsc::channel(1);
        let audit = Audit { tx, drain, dropped: Arc::default(), sink: AuditSink::Stdout };
        for i in 0..5 {
            audit.send_line(format!("{{\"n\":{i}}}"));
        }
        assert_eq!(audit.dropped(), DroppedCounts { queue_full: 3, write_failed: 0 });
    }

    /// every record of a batch that fails to be written is counted (a real ENOSPC from
    /// /dev/full, with more records than one write takes), and a good file counts none
    #[test]
    fn a_failed_write_counts_every_record_of_the_batch() {
        let dropped = Dropped::default();
        let mut out = Output::new(Some(PathBuf::from("/dev/full")));
        let line = format!("{{\"pad\":\"{}\"}}", "x".repeat(300));
        let n = 2 * BUFFER / line.len() + 7;
        for _ in 0..n {
            out.push(&line, &dropped);
        }
        out.flush(&dropped);
        assert_eq!(dropped.counts().write_failed, n as u64);
        assert!(out.error.as_deref().is_some_and(|e| e.contains("/dev/full")), "{:?}", out.error);

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let mut out = Output::new(Some(path.clone()));
        let good = Dropped::default();
        for _ in 0..n {
            out.push(&line, &good);
        }
        out.flush(&good);
        assert_eq!(good.counts(), DroppedCounts::default());
        assert_eq!(std::fs::read_to_string(&path).unwrap().lines().count(), n);
    }

    /// A destination that takes `room` bytes, then fails like a full disk.
    struct Room {
        got: Vec<u8>,
        room: usize,
    }

    impl Write for Room {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let n = buf.len().min(self.room - self.got.len()).min(7);
            if n == 0 {
                return Err(std::io::Error::from_raw_os_error(28));
            }
            self.got.extend_from_slice(&buf[..n]);
            Ok(n)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// a write that stops midway loses the records whose newline was not written (the
    /// partly written one included), and the next write starts on a new line
    #[test]
    fn a_partial_write_counts_the_records_not_wholly_written() {
        let buf = b"{\"a\":1}\n{\"b\":2}\n{\"c\":3}\n";
        let mut dest = Room { got: Vec::new(), room: 12 };
        let mut torn = false;
        let (written, e) = write_counting(&mut dest, &mut torn, buf).unwrap_err();
        assert_eq!((written, e.raw_os_error()), (12, Some(28)));
        assert_eq!(records_in(&buf[written..]), 2);
        assert_eq!(&dest.got, b"{\"a\":1}\n{\"b\"");

        let mut torn = true;
        dest.room = 100;
        write_counting(&mut dest, &mut torn, b"{\"d\":4}\n").unwrap();
        assert!(!torn);
        assert_eq!(&dest.got, b"{\"a\":1}\n{\"b\"\n{\"d\":4}\n");
    }

    /// the first loss is reported at once, later ones at most every 10 s with the count
    /// since the previous warning
    #[test]
    fn losses_are_reported_at_most_once_per_interval() {
        let t0 = Instant::now();
        let counts = |queue_full, write_failed| DroppedCounts { queue_full, write_failed };
        let mut w = LossWarning::default();
        assert_eq!(w.due(counts(0, 0), t0), None);
        assert_eq!(w.due(counts(1, 4), t0), Some(counts(1, 4)));
        assert_eq!(w.due(counts(1, 9), t0 + Duration::from_secs(1)), None);
        assert_eq!(w.due(counts(2, 20), t0 + Duration::from_secs(9)), None);
        assert_eq!(w.due(counts(2, 20), t0 + WARN_EVERY), Some(counts(1, 16)));
        assert_eq!(w.due(counts(2, 20), t0 + 3 * WARN_EVERY), None, "nothing new, nothing logged");
    }
}
