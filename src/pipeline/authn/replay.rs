//! The replay cache for HMAC signatures (docs/authentication.md#hmac-signatures).
//!
//! Keyed on the key id and the decoded signature (so a case-flipped hex string is the
//! same signature). An entry lives until its timestamp leaves the freshness window; after
//! that the timestamp check refuses the request anyway. Bounded twice:
//!
//! - per key, by what the key can legitimately send in one window:
//!   `burst + per_second × (2 × max_skew + 1)`; a key over it is over its rate limit;
//! - overall, by `auth.hmac.replay_cache_entries` (default 1,000,000, about 24 bytes an
//!   entry measured at a million from one key, hash-table slack included: ≈ 25 MB at the
//!   cap; each key that signs within a second adds about 20 bytes to that second's group).
//!
//! When a bound is reached new signatures are refused; live entries are never dropped
//! early, because forgetting one would let that request be replayed.
//!
//! Entries are sharded by key id (16 mutex-guarded shards), so all of one key's entries
//! live in one shard and its count is exact; the overall count is one atomic shared by
//! the shards, so a single busy key may use the whole overall bound.
//!
//! Within a shard, entries are grouped by the second they expire. The expiry is worked
//! out from the signed timestamp, and a replay must carry the same timestamp (the MAC
//! covers it), so a replay always lands in the group of the original: one lookup in one
//! group decides. Each signature is stored once, as 16 bytes, and a second's entries are
//! dropped together when it passes (one free, no per-entry removal) on the next insert
//! into that shard: no sweeper task, no scan.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::hash::BuildHasher;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

const SHARDS: usize = 16;

/// Seeded per process, so nobody can aim entries at one bucket, and several times cheaper
/// than SipHash: one group lookup and one insert per signed request.
type RandomState = foldhash::quality::RandomState;

/// The outcome of recording a signature.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    /// First time: recorded.
    Fresh,
    /// Already accepted within its window.
    Replay,
    /// A bound is reached: refused without recording.
    Full,
}

/// One recorded signature: the first 16 bytes of the signature (128 bits: a collision
/// between two genuine signatures is not a practical event), the first half mixed with
/// the key id's hash so the same bytes under two keys are two entries. 16 bytes, stored
/// once; the key itself is counted per group (see [`Group`]).
type Entry = [u64; 2];

/// The signatures of one shard that expire in the same second.
#[derive(Debug, Default)]
struct Group {
    seen: HashSet<Entry, RandomState>,
    /// How many of `seen` each key (by hash) holds, to give back to the per-key counts
    /// when the group expires.
    per_key: HashMap<u64, u32, RandomState>,
}

#[derive(Debug, Default)]
struct Shard {
    by_expiry: BTreeMap<i64, Group>,
    per_key: HashMap<u64, u32, RandomState>,
}

impl Shard {
    /// Drops the groups whose window has passed; returns how many entries they held.
    fn purge(&mut self, now: i64) -> usize {
        let mut dropped = 0;
        while let Some(group) = self.by_expiry.first_entry() {
            if *group.key() > now {
                break;
            }
            let group = group.remove();
            dropped += group.seen.len();
            for (key, n) in group.per_key {
                if let Some(held) = self.per_key.get_mut(&key) {
                    *held = held.saturating_sub(n);
                    if *held == 0 {
                        self.per_key.remove(&key);
                    }
                }
            }
        }
        dropped
    }

    fn len(&self) -> usize {
        self.by_expiry.values().map(|g| g.seen.len()).sum()
    }
}

fn lock(shard: &Mutex<Shard>) -> std::sync::MutexGuard<'_, Shard> {
    // A panic while holding a shard cannot leave it inconsistent in a way that matters
    // more than refusing every HMAC request would.
    shard.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The bounded replay cache.
#[derive(Debug)]
pub struct ReplayCache {
    shards: Box<[Mutex<Shard>]>,
    capacity: usize,
    /// Entries held over all shards.
    held: AtomicUsize,
    hasher: RandomState,
}

impl ReplayCache {
    /// A cache holding at most `capacity` signatures in all.
    pub fn new(capacity: usize) -> ReplayCache {
        ReplayCache {
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
            capacity,
            held: AtomicUsize::new(0),
            hasher: RandomState::default(),
        }
    }

    /// Records `sig` for `key_id` until `expires_at` (unix seconds) unless it was seen
    /// already or a bound is reached. `key_cap` is the key's own bound.
    pub fn record(&self, key_id: &str, sig: &[u8; 32], expires_at: i64, key_cap: u64, now: i64) -> Seen {
        let key = self.hasher.hash_one(key_id);
        let half = |i: usize| u64::from_le_bytes(std::array::from_fn(|j| sig[i * 8 + j]));
        let entry: Entry = [half(0) ^ key, half(1)];
        let shard = &self.shards[(key as usize) % SHARDS];
        // Two passes at most: when the overall bound is reached, expired entries may still
        // sit in shards nobody touched lately; purge them all (one lock at a time, never
        // two at once) and try again before refusing.
        for pass in 0..2 {
            let mut s = lock(shard);
            let dropped = s.purge(now);
            self.held.fetch_sub(dropped, Ordering::AcqRel);
            if s.by_expiry.get(&expires_at).is_some_and(|g| g.seen.contains(&entry)) {
                return Seen::Replay;
            }
            let count = s.per_key.get(&key).copied().unwrap_or(0);
            if u64::from(count) >= key_cap {
                return Seen::Full;
            }
            // Reserve the slot first: the check and the count are one step, exact under races.
            if self.held.fetch_add(1, Ordering::AcqRel) < self.capacity {
                let group = s.by_expiry.entry(expires_at).or_default();
                group.seen.insert(entry);
                *group.per_key.entry(key).or_insert(0) += 1;
                *s.per_key.entry(key).or_insert(0) += 1;
                return Seen::Fresh;
            }
            self.held.fetch_sub(1, Ordering::AcqRel);
            drop(s);
            if pass == 0 {
                for other in &self.shards {
                    let dropped = lock(other).purge(now);
                    self.held.fetch_sub(dropped, Ordering::AcqRel);
                }
            }
        }
        Seen::Full
    }

    /// Entries counted against the overall bound (some may have expired and wait for
    /// their shard's next purge), without taking a lock: for the metrics.
    pub fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }

    /// The overall bound.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Signatures currently held.
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| lock(s).len()).sum()
    }

    /// True when nothing is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// an entry is 16 bytes, held once per signature, up to a million signatures
    #[test]
    fn entries_are_small() {
        assert_eq!(std::mem::size_of::<Entry>(), 16);
    }

    /// signatures that differ only in their second 8 bytes are different entries
    #[test]
    fn both_halves_of_the_signature_count() {
        let c = ReplayCache::new(100);
        let mut a = [0u8; 32];
        let mut b = [0u8; 32];
        a[15] = 1;
        b[15] = 2;
        assert_eq!(c.record("k", &a, 1_000, 10, 0), Seen::Fresh);
        assert_eq!(c.record("k", &b, 1_000, 10, 0), Seen::Fresh);
        assert_eq!(c.record("k", &a, 1_000, 10, 0), Seen::Replay);
    }

    fn sig(n: u8) -> [u8; 32] {
        [n; 32]
    }

    /// the same signature for the same key is a replay; for another key it is not
    #[test]
    fn same_signature_twice_is_a_replay() {
        let c = ReplayCache::new(100);
        assert_eq!(c.record("k1", &sig(1), 1_000, 10, 0), Seen::Fresh);
        assert_eq!(c.record("k1", &sig(1), 1_000, 10, 0), Seen::Replay);
        assert_eq!(c.record("k2", &sig(1), 1_000, 10, 0), Seen::Fresh);
    }

    /// an entry is forgotten once its expiry passes, never before
    #[test]
    fn entries_expire_with_their_window() {
        let c = ReplayCache::new(100);
        c.record("k", &sig(1), 10, 10, 0);
        assert_eq!(c.record("k", &sig(1), 10, 10, 9), Seen::Replay);
        assert_eq!(c.record("k", &sig(2), 20, 10, 10), Seen::Fresh);
        assert_eq!(c.len(), 1, "the entry expiring at 10 was purged at 10");
        assert_eq!(c.record("k", &sig(1), 30, 10, 10), Seen::Fresh);
    }

    /// a key at its own bound is refused; other keys are not affected; live entries stay
    #[test]
    fn per_key_bound_refuses_rather_than_forgets() {
        let c = ReplayCache::new(1_000);
        for n in 0..3 {
            assert_eq!(c.record("busy", &sig(n), 100, 3, 0), Seen::Fresh);
        }
        assert_eq!(c.record("busy", &sig(9), 100, 3, 0), Seen::Full);
        assert_eq!(c.record("busy", &sig(0), 100, 3, 0), Seen::Replay, "live entry kept");
        assert_eq!(c.record("quiet", &sig(9), 100, 3, 0), Seen::Fresh);
    }

    /// a key's count goes down as its groups expire, so a key at its bound signs again
    #[test]
    fn a_keys_room_comes_back_as_its_entries_expire() {
        let c = ReplayCache::new(1_000);
        assert_eq!(c.record("k", &sig(1), 10, 2, 0), Seen::Fresh);
        assert_eq!(c.record("k", &sig(2), 20, 2, 0), Seen::Fresh);
        assert_eq!(c.record("k", &sig(3), 20, 2, 5), Seen::Full);
        assert_eq!(c.record("k", &sig(3), 20, 2, 10), Seen::Fresh, "the group of 10 expired");
        assert_eq!(c.record("k", &sig(2), 20, 2, 10), Seen::Replay, "the group of 20 is live");
        assert_eq!(c.len(), 2);
    }

    /// one busy key may fill the whole overall bound (its entries all live in one shard)
    #[test]
    fn one_key_can_use_the_whole_overall_bound() {
        let c = ReplayCache::new(64);
        let fresh = (0..100u8).filter(|n| c.record("busy", &sig(*n), 100, 1_000, 0) == Seen::Fresh).count();
        assert_eq!(fresh, 64);
        assert_eq!(c.len(), 64);
        // Once entries expire, their room is free again.
        assert_eq!(c.record("other", &sig(200), 300, 1_000, 100), Seen::Fresh);
        assert_eq!(c.len(), 1);
    }

    /// the overall bound holds whatever keys an attacker uses
    #[test]
    fn overall_bound_holds() {
        let c = ReplayCache::new(16);
        let fresh = (0..200u32)
            .filter(|i| c.record(&format!("k{i}"), &sig((i % 250) as u8), 100, 10, 0) == Seen::Fresh)
            .count();
        assert_eq!(fresh, 16);
        assert!(c.len() <= 16);
    }
}
