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
    pub client: &'a str,
    pub user: Option<&'a str>,
    pub key_id: Option<&'a str>,
    pub proxied_user: Option<&'a str>,
    pub route: Option<&'a str>,
    pub method: &'a str,
    pub path: Option<&'a str>,
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
        if let Ok(line) = serde_json::to_string(record) {
            self.send_line(line);
        }
    }

    /// Queues one JSON line (no newline); drops (and counts) it if the writer is behind.
    pub fn send_line(&self, line: String) {
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
}
