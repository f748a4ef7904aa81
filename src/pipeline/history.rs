//! Requests per key per hour (the last 24) and per day (the last 30), for the console and
//! `GET /admin/v1/users/{id}/usage`.
//!
//! Nothing is added to the request path: the history is the difference between two
//! snapshots of the usage counters, taken every few seconds by a sampler and before every
//! read, and attributed to the hour and day of the snapshot (so a request counts in the
//! hour it was sampled in, seconds after it was made). It is kept in the usage state file
//! and, like the counters, is this gateway's own. With `shared_state` the fleet's history
//! is in Redis instead (each usage flush adds to its hour and day: `Shared::add_usage`),
//! and a read builds one of these from it ([`History::from_counts`]).

use crate::shared::{HistoryWindow, RequestCounts};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};

/// Days kept.
pub const DAYS: i64 = 30;
/// Hours kept.
pub const HOURS: i64 = 24;
/// Both, as the shared state keeps them.
pub const WINDOW: HistoryWindow = HistoryWindow { hours: HOURS, days: DAYS };

/// Each key's requests by unix hour and unix day.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct History {
    #[serde(default)]
    hours: BTreeMap<String, BTreeMap<i64, u64>>,
    #[serde(default)]
    days: BTreeMap<String, BTreeMap<i64, u64>>,
    /// Each key's request count at the last sample (rebuilt from the counters at start).
    #[serde(skip)]
    seen: HashMap<String, u64>,
}

impl History {
    pub fn is_empty(&self) -> bool {
        self.hours.is_empty() && self.days.is_empty()
    }

    /// The fleet's history as the shared state holds it.
    pub fn from_counts(c: RequestCounts) -> History {
        History { hours: c.hours, days: c.days, seen: HashMap::new() }
    }

    /// Counts `n` more requests of `key` in the hour and day of `now`.
    pub fn add(&mut self, key: &str, n: u64, now: i64) {
        if n == 0 {
            return;
        }
        let (hour, day) = (now.div_euclid(3600), now.div_euclid(86_400));
        *self.hours.entry(key.to_string()).or_default().entry(hour).or_default() += n;
        *self.days.entry(key.to_string()).or_default().entry(day).or_default() += n;
    }

    /// A copy of `keys`' history alone.
    pub fn only<'a>(&self, keys: impl IntoIterator<Item = &'a str>) -> History {
        let mut out = History::default();
        for k in keys {
            if let Some(by) = self.hours.get(k) {
                out.hours.insert(k.to_string(), by.clone());
            }
            if let Some(by) = self.days.get(k) {
                out.days.insert(k.to_string(), by.clone());
            }
        }
        out
    }

    /// Starts from the counters as they are (`totals`: key → requests), so that what was
    /// counted before is not counted again.
    pub fn baseline(&mut self, totals: impl IntoIterator<Item = (String, u64)>) {
        self.seen = totals.into_iter().collect();
    }

    /// Adds what each key counted since the last sample to the hour and day of `now`
    /// (unix seconds), and drops what is older than the window.
    pub fn sample(&mut self, totals: impl IntoIterator<Item = (String, u64)>, now: i64) {
        let (hour, day) = (now.div_euclid(3600), now.div_euclid(86_400));
        for (key, total) in totals {
            // Never backwards: a reading older than the last one adds nothing.
            let before = self.seen.get(&key).copied().unwrap_or(0);
            if total <= before {
                continue;
            }
            self.seen.insert(key.clone(), total);
            self.add(&key, total - before, now);
        }
        for (window, keep_from) in [(&mut self.hours, hour - HOURS + 1), (&mut self.days, day - DAYS + 1)] {
            window.retain(|_, by| {
                by.retain(|t, _| *t >= keep_from);
                !by.is_empty()
            });
        }
    }

    /// `key`'s requests in the last 24 hours (to the hour), as of `now`.
    pub fn last_24h(&self, key: &str, now: i64) -> u64 {
        let from = now.div_euclid(3600) - HOURS + 1;
        self.hours.get(key).map_or(0, |by| by.range(from..).map(|(_, n)| n).sum())
    }

    /// `key`'s requests per unix day, the last 30 days, as of `now`.
    pub fn per_day(&self, key: &str, now: i64) -> BTreeMap<i64, u64> {
        let from = now.div_euclid(86_400) - DAYS + 1;
        self.days.get(key).map(|by| by.range(from..).map(|(d, n)| (*d, *n)).collect()).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: i64 = 86_400;

    /// deltas land in the sample's hour and day; what was counted before the baseline is
    /// not counted; old hours and days fall out of the window
    #[test]
    fn samples_become_hours_and_days() {
        let mut h = History::default();
        h.baseline([("k".to_string(), 100)]);
        let t0 = 20_000 * DAY + 3600 * 10;
        h.sample([("k".to_string(), 105)], t0);
        h.sample([("k".to_string(), 105), ("new".to_string(), 2)], t0 + 60);
        assert_eq!(h.last_24h("k", t0), 5);
        assert_eq!(h.last_24h("new", t0), 2);
        h.sample([("k".to_string(), 108)], t0 + 3600 * 20);
        assert_eq!(h.last_24h("k", t0 + 3600 * 20), 8);
        assert_eq!(h.per_day("k", t0 + 3600 * 20), BTreeMap::from([(20_000, 5), (20_001, 3)]));
        // An older reading (lower totals) adds nothing and does not lower the baseline.
        h.sample([("k".to_string(), 101)], t0 + 3600 * 20);
        assert_eq!(h.last_24h("k", t0 + 3600 * 20), 8);
        // 24 hours later the first hour is out of the window, the day is not.
        assert_eq!(h.last_24h("k", t0 + 3600 * 24), 3);
        h.sample([("k".to_string(), 108)], t0 + 31 * DAY);
        assert!(h.per_day("k", t0 + 31 * DAY).is_empty());
        assert!(h.is_empty());
    }
}
