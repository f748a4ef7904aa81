//! Per-key usage: requests, errors, rate-limited requests and `last_used_at` (docs/operations.md).
//!
//! Counted in memory with atomics (one map lookup per authenticated request; entries
//! exist only for keys that authenticated, so attacker input cannot grow the map) and
//! written to a small JSON state file beside the credentials file at most every few
//! seconds and at shutdown — never into `credentials.yaml`, so counting needs no lock
//! and no write per request. Loaded back at start, so it survives restarts.

use crate::credentials::file::FileUser;
use crate::credentials::ops::ts;
use crate::pipeline::history::{self, History};
use crate::shared::{HistoryWindow, Shared, Unavailable, UsageRow};
use dashmap::DashMap;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

/// Counters of one key.
#[derive(Debug, Default)]
pub struct KeyUsage {
    user: std::sync::OnceLock<Arc<str>>,
    requests: AtomicU64,
    errors: AtomicU64,
    rate_limited: AtomicU64,
    /// Unix seconds; 0: never.
    last_used: AtomicI64,
}

/// What the state file holds for one key.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyUsageRecord {
    pub user: String,
    pub requests: u64,
    pub errors: u64,
    pub rate_limited: u64,
    /// Unix seconds of the last authenticated request, if any.
    pub last_used_at: Option<i64>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct StateFile {
    keys: BTreeMap<String, KeyUsageRecord>,
    /// Requests per hour and day (docs/console.md); absent in files of older versions.
    #[serde(default, skip_serializing_if = "History::is_empty")]
    history: History,
}

/// [`StateFile`] as written, borrowing what it holds.
#[derive(Serialize)]
struct StateFileRef<'a> {
    keys: &'a BTreeMap<String, KeyUsageRecord>,
    #[serde(skip_serializing_if = "History::is_empty")]
    history: &'a History,
}

/// All keys' usage.
#[derive(Debug, Default)]
pub struct Usage {
    keys: DashMap<Arc<str>, Arc<KeyUsage>, crate::credentials::KeyIdHasher>,
    path: Option<PathBuf>,
    /// The total request count the state file holds: every recorded request adds one, so
    /// an unchanged total means nothing to write. Derived at flush time rather than
    /// flagged per request (a flag every request writes is a cache line all cores share).
    written: AtomicU64,
    /// With shared state: what this gateway has added to the fleet's totals in Redis.
    /// Locked across the write, so two flushes never send the same requests twice.
    sent: tokio::sync::Mutex<BTreeMap<String, KeyUsageRecord>>,
    /// Requests per hour and day, sampled from the counters (never per request).
    history: std::sync::Mutex<History>,
}

/// Reads a state file; missing or unreadable reads as empty.
pub fn read_state(path: &Path) -> BTreeMap<String, KeyUsageRecord> {
    read_state_file(path).keys
}

fn read_state_file(path: &Path) -> StateFile {
    std::fs::read(path).ok().and_then(|b| serde_json::from_slice::<StateFile>(&b).ok()).unwrap_or_default()
}

impl Usage {
    /// Usage persisted at `path` (loaded now), or in memory only.
    pub fn load(path: Option<PathBuf>) -> Usage {
        let StateFile { keys: on_disk, mut history } = path.as_deref().map(read_state_file).unwrap_or_default();
        history.baseline(on_disk.iter().map(|(k, r)| (k.clone(), r.requests)));
        let keys = DashMap::default();
        for (key, r) in &on_disk {
            let k = KeyUsage::default();
            let _ = k.user.set(Arc::from(r.user.as_str()));
            k.requests.store(r.requests, Ordering::Relaxed);
            k.errors.store(r.errors, Ordering::Relaxed);
            k.rate_limited.store(r.rate_limited, Ordering::Relaxed);
            k.last_used.store(r.last_used_at.unwrap_or(0), Ordering::Relaxed);
            keys.insert(Arc::from(key.as_str()), Arc::new(k));
        }
        let written = AtomicU64::new(on_disk.values().map(|r| r.requests).sum());
        Usage { keys, path, written, sent: Default::default(), history: std::sync::Mutex::new(history) }
    }

    /// Counts one request made with `key` of `user`.
    pub fn record(&self, user: &Arc<str>, key: &Arc<str>, error: bool, rate_limited: bool, now: i64) {
        // Through the map's guard: no Arc clone (two shared atomic writes) per request.
        let entry = match self.keys.get(key) {
            Some(e) => e,
            None => self.keys.entry(key.clone()).or_default().downgrade(),
        };
        entry.user.get_or_init(|| user.clone());
        entry.requests.fetch_add(1, Ordering::Relaxed);
        if error {
            entry.errors.fetch_add(1, Ordering::Relaxed);
        }
        if rate_limited {
            entry.rate_limited.fetch_add(1, Ordering::Relaxed);
        }
        entry.last_used.fetch_max(now, Ordering::Relaxed);
    }

    /// A copy of every key's counters.
    pub fn snapshot(&self) -> BTreeMap<String, KeyUsageRecord> {
        self.keys
            .iter()
            .map(|e| {
                let k = e.value();
                let last = k.last_used.load(Ordering::Relaxed);
                (
                    e.key().to_string(),
                    KeyUsageRecord {
                        user: k.user.get().map(|u| u.to_string()).unwrap_or_default(),
                        requests: k.requests.load(Ordering::Relaxed),
                        errors: k.errors.load(Ordering::Relaxed),
                        rate_limited: k.rate_limited.load(Ordering::Relaxed),
                        last_used_at: (last > 0).then_some(last),
                    },
                )
            })
            .collect()
    }

    /// Writes the state file if anything changed, durably (temp file, fsync, rename,
    /// directory fsync): a crash or a failed write leaves the previous file whole.
    pub fn flush(&self) -> std::io::Result<()> {
        let Some(path) = &self.path else { return Ok(()) };
        // The counts and the history from one reading, under the history's lock: what the
        // file says was counted is what the history has seen, so a restart counts nothing
        // twice.
        let mut history = self.history.lock().map_err(|_| std::io::Error::other("usage history lock poisoned"))?;
        let keys = self.snapshot();
        let total = keys.values().map(|r| r.requests).sum();
        if self.written.load(Ordering::Relaxed) == total {
            return Ok(());
        }
        history
            .sample(keys.iter().map(|(k, r)| (k.clone(), r.requests)), crate::credentials::ops::now().unix_timestamp());
        // An error here must not become an empty file written over the counts.
        let body = serde_json::to_vec_pretty(&StateFileRef { keys: &keys, history: &history })
            .map_err(std::io::Error::other)?;
        drop(history);
        crate::fs::atomic_file::write_durably(path, &body, None)?;
        self.written.store(total, Ordering::Relaxed);
        Ok(())
    }

    /// The history, brought up to `now` (unix seconds) first; held locked while the
    /// guard lives.
    fn sampled_history(&self, now: i64) -> std::sync::MutexGuard<'_, History> {
        // The counters are read under the lock: two samplers cannot interleave a reading
        // and a sample (an older reading applied last would count its requests again). A
        // sampler that panicked left whole hours and days behind it, at worst one sample
        // short: still worth showing.
        let mut h = self.history.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let totals: Vec<(String, u64)> =
            self.keys.iter().map(|e| (e.key().to_string(), e.value().requests.load(Ordering::Relaxed))).collect();
        h.sample(totals, now);
        h
    }

    /// `ids`' requests per hour and day as of `now`: this gateway's; with shared state
    /// the fleet's (Redis's counts plus what this gateway has not flushed yet, which it
    /// counts in the current hour, as its next flush will), read for `window` only (a
    /// caller that needs no days reads no days).
    pub async fn history(
        &self,
        shared: Option<&Shared>,
        ids: &[String],
        now: i64,
        window: HistoryWindow,
    ) -> Result<History, Unavailable> {
        let Some(shared) = shared else {
            return Ok(self.sampled_history(now).only(ids.iter().map(String::as_str)));
        };
        // Held across the read, as in `fleet_view`: a flush in between would count its
        // requests twice (in Redis and as unsent).
        let sent = self.sent.lock().await;
        let mut h = History::from_counts(shared.read_requests(ids, now, window).await?);
        let unsent = self.unsent(&sent);
        for id in ids {
            if let Some(d) = unsent.get(id) {
                h.add(id, d.requests, now);
            }
        }
        Ok(h)
    }

    /// Samples the history every `every` until the process ends, so that requests land
    /// in the hour they were made in even when nobody reads it.
    pub fn spawn_history_sampler(self: Arc<Self>, every: std::time::Duration) {
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let now = crate::credentials::ops::now().unix_timestamp();
                drop(self.sampled_history(now));
            }
        });
    }

    /// Flushes every `every` until the process ends; logs a failing write once per streak.
    pub fn spawn_flusher(self: Arc<Self>, every: std::time::Duration) {
        if self.path.is_none() {
            return;
        }
        tokio::spawn(async move {
            let mut failing = false;
            loop {
                tokio::time::sleep(every).await;
                let this = self.clone();
                let result = tokio::task::spawn_blocking(move || this.flush())
                    .await
                    .unwrap_or_else(|e| Err(std::io::Error::other(format!("the flush task failed: {e}"))));
                match result {
                    Ok(()) if failing => {
                        failing = false;
                        tracing::info!("usage state file written again");
                    }
                    Ok(()) => {}
                    // Once per failing streak: the flush retries every few seconds.
                    Err(e) if !failing => {
                        failing = true;
                        tracing::error!(error = %e, "cannot write the usage state file; the previous file stays, counts stay in memory and are retried");
                    }
                    Err(_) => {}
                }
            }
        });
    }
}

impl KeyUsageRecord {
    /// Adds a delta of the same key.
    fn add(&mut self, d: UsageRow) {
        if self.user.is_empty() {
            self.user = d.user;
        }
        self.requests += d.requests;
        self.errors += d.errors;
        self.rate_limited += d.rate_limited;
        self.last_used_at = self.last_used_at.max((d.last_used > 0).then_some(d.last_used));
    }
}

impl From<UsageRow> for KeyUsageRecord {
    fn from(r: UsageRow) -> KeyUsageRecord {
        let last_used_at = (r.last_used > 0).then_some(r.last_used);
        KeyUsageRecord {
            user: r.user,
            requests: r.requests,
            errors: r.errors,
            rate_limited: r.rate_limited,
            last_used_at,
        }
    }
}

/// The fleet's usage as Redis holds it (for tools: gateways add their unflushed counts).
pub async fn read_shared(shared: &Shared) -> Result<BTreeMap<String, KeyUsageRecord>, Unavailable> {
    Ok(shared.read_usage().await?.into_iter().map(|(id, r)| (id, KeyUsageRecord::from(r))).collect())
}

impl Usage {
    /// What this gateway counted that is not yet in `sent`.
    fn unsent(&self, sent: &BTreeMap<String, KeyUsageRecord>) -> BTreeMap<String, UsageRow> {
        let mut out = BTreeMap::new();
        for (id, now) in self.snapshot() {
            let before = sent.get(&id).cloned().unwrap_or_default();
            let last = now.last_used_at.unwrap_or(0);
            if now.requests == before.requests && last <= before.last_used_at.unwrap_or(0) {
                continue;
            }
            out.insert(
                id,
                UsageRow {
                    user: now.user,
                    requests: now.requests - before.requests,
                    errors: now.errors.saturating_sub(before.errors),
                    rate_limited: now.rate_limited.saturating_sub(before.rate_limited),
                    last_used: last,
                },
            );
        }
        out
    }

    /// Adds what this gateway counted since its last flush to the fleet's totals.
    pub async fn flush_shared(&self, shared: &Shared) -> Result<(), Unavailable> {
        let mut sent = self.sent.lock().await;
        let delta: Vec<(String, UsageRow)> = self.unsent(&sent).into_iter().collect();
        // Each part is marked sent once Redis has it: a flush that fails part-way does not
        // add the parts already written again at the next one.
        let now = crate::credentials::ops::now().unix_timestamp();
        for part in delta.chunks(crate::shared::USAGE_ROWS_PER_CALL) {
            shared.add_usage(part, now, history::WINDOW).await?;
            for (id, d) in part {
                sent.entry(id.clone()).or_default().add(d.clone());
            }
        }
        Ok(())
    }

    /// The fleet's usage: Redis's totals plus what this gateway has not flushed yet.
    pub async fn fleet_view(&self, shared: &Shared) -> Result<BTreeMap<String, KeyUsageRecord>, Unavailable> {
        let sent = self.sent.lock().await;
        let mut all = read_shared(shared).await?;
        for (id, d) in self.unsent(&sent) {
            all.entry(id).or_default().add(d);
        }
        Ok(all)
    }

    /// Flushes to the fleet's totals every `every` until the process ends. A failed flush
    /// keeps its counts for the next one (the breaker's log line says Redis is away).
    pub fn spawn_shared_flusher(self: Arc<Self>, shared: Arc<Shared>, every: std::time::Duration) {
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let _ = self.flush_shared(&shared).await;
            }
        });
    }
}

/// Adds each key's usage (`requests`, `errors`, `rate_limited`, `last_used_at`) to a
/// user view.
pub fn add_usage(view: &mut Value, usage: &BTreeMap<String, KeyUsageRecord>) {
    if let Some(keys) = view["keys"].as_array_mut() {
        for k in keys {
            let r = k["id"].as_str().and_then(|id| usage.get(id)).cloned().unwrap_or_default();
            k["requests"] = r.requests.into();
            k["errors"] = r.errors.into();
            k["rate_limited"] = r.rate_limited.into();
            k["last_used_at"] = unix_ts(r.last_used_at);
        }
    }
}

fn unix_ts(t: Option<i64>) -> Value {
    t.and_then(|t| time::OffsetDateTime::from_unix_timestamp(t).ok()).as_ref().map_or(Value::Null, ts)
}

/// A user's usage: totals over its keys, and each key's.
pub fn usage_view(u: &FileUser, usage: &BTreeMap<String, KeyUsageRecord>) -> Value {
    let mut total = KeyUsageRecord::default();
    let mut keys = serde_json::Map::new();
    for k in &u.keys {
        let r = usage.get(&k.id.value).cloned().unwrap_or_default();
        total.requests += r.requests;
        total.errors += r.errors;
        total.rate_limited += r.rate_limited;
        total.last_used_at = total.last_used_at.max(r.last_used_at);
        keys.insert(
            k.id.value.clone(),
            json!({"requests": r.requests, "errors": r.errors, "rate_limited": r.rate_limited, "last_used_at": unix_ts(r.last_used_at)}),
        );
    }
    json!({
        "user": u.id.value,
        "requests": total.requests,
        "errors": total.errors,
        "rate_limited": total.rate_limited,
        "last_used_at": unix_ts(total.last_used_at),
        "keys": keys,
    })
}

/// Adds a history ([`Usage::history`]) to a [`usage_view`]: `requests_24h` per key and in
/// total, and `per_day` (`[{"date", "requests"}]`, the last 30 days, oldest first, days
/// without requests left out).
pub fn add_history(view: &mut Value, h: &History, now: i64) {
    let mut days: BTreeMap<i64, u64> = BTreeMap::new();
    let mut total = 0;
    if let Some(keys) = view["keys"].as_object_mut() {
        for (id, k) in keys.iter_mut() {
            let n = h.last_24h(id, now);
            total += n;
            k["requests_24h"] = n.into();
            for (d, n) in h.per_day(id, now) {
                *days.entry(d).or_default() += n;
            }
        }
    }
    view["requests_24h"] = total.into();
    view["per_day"] = days
        .into_iter()
        .filter_map(|(d, n)| {
            let date = time::OffsetDateTime::from_unix_timestamp(d * 86_400).ok()?.date();
            Some(json!({"date": date.to_string(), "requests": n}))
        })
        .collect::<Vec<_>>()
        .into();
}

#[cfg(test)]
mod tests {
    use super::*;

    /// the hourly and daily history survives a flush and a reload, and what was counted
    /// before the reload is not counted again
    #[test]
    fn history_round_trips_through_the_state_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("u.json");
        let u = Usage::load(Some(path.clone()));
        let (user, key) = (Arc::from("erp"), Arc::from("ak_1"));
        for _ in 0..3 {
            u.record(&user, &key, false, false, 100);
        }
        u.flush().unwrap();
        let back = Usage::load(Some(path));
        back.record(&user, &key, false, false, 200);
        let now = crate::credentials::ops::now().unix_timestamp();
        let mut view = json!({"keys": {"ak_1": {}}});
        add_history(&mut view, &back.sampled_history(now), now);
        assert_eq!(view["requests_24h"], 4, "{view}");
        assert_eq!(view["keys"]["ak_1"]["requests_24h"], 4);
        assert_eq!(view["per_day"].as_array().unwrap().len(), 1, "{view}");
        assert_eq!(view["per_day"][0]["requests"], 4);
    }

    /// counts survive a flush and a reload from the state file
    #[test]
    fn usage_round_trips_through_the_state_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("credentials.yaml.usage.json");
        let u = Usage::load(Some(path.clone()));
        let (user, key) = (Arc::from("erp"), Arc::from("ak_1"));
        u.record(&user, &key, false, false, 100);
        u.record(&user, &key, true, false, 90);
        u.record(&user, &key, true, true, 120);
        u.flush().unwrap();
        let back = Usage::load(Some(path)).snapshot();
        let r = &back["ak_1"];
        assert_eq!((r.requests, r.errors, r.rate_limited, r.last_used_at), (3, 2, 1, Some(120)));
        assert_eq!(r.user, "erp");
    }

    /// a flush that cannot write returns the error and leaves the counts to write: the
    /// next flush, once the directory is usable, writes them
    #[test]
    fn a_failed_flush_is_an_error_and_is_retried() {
        let dir = tempfile::tempdir().unwrap();
        let blocker = dir.path().join("state");
        // A regular file where the directory should be: a real error, even for root.
        std::fs::write(&blocker, b"not a directory").unwrap();
        let path = blocker.join("credentials.yaml.usage.json");
        let u = Usage::load(Some(path.clone()));
        u.record(&Arc::from("erp"), &Arc::from("ak_1"), false, false, 100);
        assert!(u.flush().is_err());
        assert_eq!(std::fs::read(&blocker).unwrap(), b"not a directory");

        std::fs::remove_file(&blocker).unwrap();
        std::fs::create_dir(&blocker).unwrap();
        u.flush().unwrap();
        assert_eq!(read_state(&path)["ak_1"].requests, 1);
        let names: Vec<_> = std::fs::read_dir(&blocker).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, ["credentials.yaml.usage.json"], "no temporary file left");
    }
}
