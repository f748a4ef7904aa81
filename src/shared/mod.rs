//! State that every gateway of a fleet shares through Redis (docs/shared-state.md):
//! replay records, per-key rate limits, the per-IP failed-authentication budget, usage
//! counts and which gateways are alive.
//!
//! This layer knows Redis — the connection, the scripts, the key names, the circuit
//! breaker — and nothing of requests: the pipeline asks it questions (admit this key,
//! charge this IP) and chooses what to do when it cannot answer.
//!
//! Key names, all under `shared_state.key_prefix` (`P`), each operation within one hash
//! tag so that under Redis Cluster it runs on one node:
//!
//! | key | holds |
//! |---|---|
//! | `P{k:KEY_ID}:rate` | the key's GCRA bucket |
//! | `P{k:KEY_ID}:sig:TS` | the accepted signatures with timestamp `TS` (their SHA-256, first 16 bytes), until 30 s after that timestamp leaves the window (clock slack) |
//! | `P{ip:HEX}:fail` | a client network's failed-authentication bucket |
//! | `P{fleet}:usage` | usage counts and `last_used` of every key |
//! | `P{fleet}:usage:hour:H`, `P{fleet}:usage:day:D` | each key's requests in unix hour `H`, unix day `D` (the history), until they leave its window |
//! | `P{fleet}:gateways` | gateways alive (sorted by last heartbeat) |
//! | `P{fleet}:epoch` | set once; a different value means Redis lost its data |
//! | `P{fleet}:fence` | signatures signed before it may have been accepted before Redis lost its data |
//! | `P{eN}:epoch` | under Redis Cluster, the same on each master (`eN`: a tag in its slots) |

pub mod batch;
pub mod breaker;
pub mod conn;
pub mod lease;
pub mod scripts;

use crate::config::shared_state::{ReplayFallback, SharedStateConfig};
use breaker::Breaker;
use conn::Conn;
use lease::{Lease, Local};
use prometheus::{HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts};
use redis::Script;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// How often a gateway announces itself, and how long a silent one still counts.
const HEARTBEAT_EVERY: Duration = Duration::from_secs(1);
const GONE_AFTER: Duration = Duration::from_secs(5);

/// Usage rows per `add_usage` call: a fleet with 100,000 keys writes in a few bounded
/// scripts, not one huge one.
pub const USAGE_ROWS_PER_CALL: usize = 500;

/// Commands per round trip when reading the request history (`Shared::read_requests`).
pub const HISTORY_READS_PER_CALL: usize = 1000;

/// How much longer than its window a replay record lives in Redis. Each gateway sets the
/// record's expiry by its own clock and decides freshness by it too, so a record set by a
/// gateway whose clock is ahead would expire while a gateway whose clock is behind still
/// accepts its timestamp: records outlive the window by this much, which keeps replay
/// protection exact while the gateways' (and Redis's) clocks agree within it.
const CLOCK_SLACK: Duration = Duration::from_secs(30);

/// A gateway's clock this far from Redis's is logged (once a minute).
const CLOCK_WARN_SECS: f64 = 10.0;

/// What Redis decided for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    Admitted {
        remaining: u32,
    },
    Limited {
        wait: Duration,
    },
    /// The signature was accepted before, by this gateway or another.
    Replayed,
    /// Admitted by the limit, but Redis lost its data while the signature could still be
    /// replayed (found in the same round trip, or by the heartbeat meanwhile): Redis cannot
    /// vouch that it was not accepted before, so the replay fallback decides.
    Fenced {
        remaining: u32,
    },
}

/// What Redis said of one signature's record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Record {
    /// Recorded now: its first use since Redis has had the fleet's data.
    New,
    /// Recorded before: a replay.
    Seen,
    /// Recorded now, but Redis may have lost an earlier record of it (see `Shared::vouch`).
    Unvouched,
}

/// Redis could not answer in time (or the breaker is open): the caller falls back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unavailable;

/// A signature to record with the key's admission.
#[derive(Debug, Clone, Copy)]
pub struct SignatureRecord<'a> {
    pub signature: &'a [u8; 32],
    /// Its signed timestamp, unix seconds: the signatures of one key with one timestamp
    /// are one set in Redis.
    pub timestamp: i64,
    /// How long it stays acceptable from now.
    pub ttl: Duration,
}

impl SignatureRecord<'_> {
    /// How long its record lives, in milliseconds: the rest of its window plus
    /// [`CLOCK_SLACK`].
    fn ttl_ms(&self) -> u64 {
        u64::try_from(self.ttl.saturating_add(CLOCK_SLACK).as_millis()).unwrap_or(u64::MAX)
    }
}

/// How far back the fleet's request history goes (`Shared::add_usage` keeps each hour's
/// and day's counts until they leave it; `Shared::read_requests` reads it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HistoryWindow {
    pub hours: i64,
    pub days: i64,
}

/// Requests per key (by key id) per unix hour and per unix day, summed over the fleet.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RequestCounts {
    pub hours: BTreeMap<String, BTreeMap<i64, u64>>,
    pub days: BTreeMap<String, BTreeMap<i64, u64>>,
}

/// One key's usage as Redis keeps it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UsageRow {
    pub user: String,
    pub requests: u64,
    pub errors: u64,
    pub rate_limited: u64,
    /// Unix seconds; 0: never.
    pub last_used: i64,
}

/// How one Redis node may drop keys before they expire (`scripts::EVICTION`).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Eviction {
    /// `maxmemory-policy`; `None`: unknown (the user may not run `INFO`).
    policy: Option<String>,
    /// `maxmemory`, bytes; 0: no limit.
    maxmemory: u64,
    /// Keys evicted since the node started (or its stats were reset); `None`: unknown.
    evicted: Option<u64>,
}

impl Eviction {
    fn from_reply((policy, maxmemory, evicted): (String, String, String)) -> Eviction {
        Eviction {
            policy: (!policy.is_empty()).then_some(policy),
            maxmemory: maxmemory.parse().unwrap_or(0),
            evicted: evicted.parse().ok(),
        }
    }

    /// True when the node may drop a replay record inside its window: a memory limit with
    /// any policy but `noeviction` (the `volatile-*` ones evict exactly the keys that
    /// expire, which replay records are).
    fn may_evict(&self) -> bool {
        self.maxmemory > 0 && self.policy.as_deref().is_some_and(|p| p != "noeviction")
    }

    /// What an operator reads in the log or the start-up error.
    fn describe(&self) -> String {
        format!("maxmemory-policy {} with maxmemory {} bytes", self.policy.as_deref().unwrap_or("?"), self.maxmemory)
    }
}

/// Whether a node's evicted-keys count went from `before` (`None`: first look) to `now`
/// by evicting: it rose, or it restarted from 0 and is above 0 again.
fn evicted_between(before: Option<u64>, now: u64) -> bool {
    before.is_some_and(|before| now > before || (now < before && now > 0))
}

/// How Redis lost replay records (`Shared::forget`).
#[derive(Debug, Clone, Copy)]
enum Loss {
    /// An epoch key changed: restarted empty, or flushed.
    Data,
    /// A node evicted keys.
    Evicted,
}

/// The two spans the request history is counted in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Bucket {
    Hour,
    Day,
}

/// What a record's script answers for an epoch key it could not read (under Redis Cluster,
/// a key on another node: a record redirected to a master importing its slot). No epoch
/// is empty (they are random hex).
const UNREADABLE: &str = "";

/// What a look at every node found (`Shared::check_nodes`), besides losses (fenced at
/// once).
#[derive(Debug, Default)]
struct NodesSeen {
    /// A node that may evict keys, described.
    evicting: Option<String>,
    /// A node whose eviction settings could not be read (`INFO` not allowed).
    unknown: bool,
}

/// A Redis operation, as the metrics name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// A lease, with a signature when there is one.
    Admit,
    /// A signature alone (`SADD`).
    Replay,
    FailedAuth,
    Usage,
    Heartbeat,
}

impl Op {
    const ALL: [Op; 5] = [Op::Admit, Op::Replay, Op::FailedAuth, Op::Usage, Op::Heartbeat];

    fn label(self) -> &'static str {
        match self {
            Op::Admit => "admit",
            Op::Replay => "replay",
            Op::FailedAuth => "failed_auth",
            Op::Usage => "usage",
            Op::Heartbeat => "heartbeat",
        }
    }
}

/// Why a request was decided without Redis (`gatehouse_shared_state_fallbacks_total{reason}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fallback {
    ReplayRejected,
    ReplayLocal,
    RateLimitLocal,
    FailedAuthLocal,
}

impl Fallback {
    const ALL: [Fallback; 4] =
        [Fallback::ReplayRejected, Fallback::ReplayLocal, Fallback::RateLimitLocal, Fallback::FailedAuthLocal];

    fn label(self) -> &'static str {
        match self {
            Fallback::ReplayRejected => "replay_rejected",
            Fallback::ReplayLocal => "replay_local",
            Fallback::RateLimitLocal => "rate_limit_local",
            Fallback::FailedAuthLocal => "failed_auth_local",
        }
    }
}

/// One operation's series, resolved at start: an operation updates them without looking
/// up a label set.
#[derive(Debug, Clone)]
struct OpSeries {
    duration: prometheus::Histogram,
    timeout: IntCounter,
    error: IntCounter,
    breaker_open: IntCounter,
    /// Under Redis Cluster, an operation caught in a slot migration (see `Shared::migrating`).
    migrating: IntCounter,
}

/// The shared-state metrics; `pipeline::metrics` registers them.
#[derive(Debug, Clone)]
pub struct SharedMetrics {
    pub up: IntGauge,
    pub gateways: IntGauge,
    pub clock_offset: prometheus::Gauge,
    op_duration: HistogramVec,
    op_errors: IntCounterVec,
    fallbacks: IntCounterVec,
    pub data_lost: IntCounter,
    pub evicting: IntGauge,
    /// By [`Op`] and by [`Fallback`], in the order of their `ALL`.
    ops: Vec<OpSeries>,
    fallback_series: Vec<IntCounter>,
}

impl SharedMetrics {
    fn new() -> prometheus::Result<SharedMetrics> {
        let mut m = SharedMetrics {
            up: IntGauge::new(
                "gatehouse_shared_state_up",
                "1 while this gateway uses Redis for shared state; 0 while it falls back (shared_state.on_unavailable).",
            )?,
            gateways: IntGauge::new(
                "gatehouse_shared_state_gateways",
                "Gateways that announced themselves in Redis in the last 5 s (fallback limits divide by it).",
            )?,
            clock_offset: prometheus::Gauge::new(
                "gatehouse_shared_state_clock_offset_seconds",
                "This gateway's clock minus Redis's, at the last heartbeat. Replay protection is exact while the fleet's clocks agree within 30 s.",
            )?,
            op_duration: HistogramVec::new(
                HistogramOpts::new(
                    "gatehouse_shared_state_op_duration_seconds",
                    "Time of one Redis operation, by op (admit: a lease, with a signature when there is one; replay: a signature alone).",
                )
                    .buckets(vec![0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25]),
                &["op"],
            )?,
            op_errors: IntCounterVec::new(
                Opts::new(
                    "gatehouse_shared_state_errors_total",
                    "Redis operations that failed, by op and kind (timeout, error, breaker_open, migrating: caught in a Redis Cluster slot migration, that request fell back).",
                ),
                &["op", "kind"],
            )?,
            fallbacks: IntCounterVec::new(
                Opts::new(
                    "gatehouse_shared_state_fallbacks_total",
                    "Requests decided without Redis, by reason (replay_rejected, replay_local, rate_limit_local, failed_auth_local).",
                ),
                &["reason"],
            )?,
            data_lost: IntCounter::new(
                "gatehouse_shared_state_data_lost_total",
                "Times Redis was found without the fleet's data (restarted empty, flushed, keys evicted).",
            )?,
            evicting: IntGauge::new(
                "gatehouse_shared_state_evicting",
                "1 while a Redis node of the shared state may evict keys before they expire (maxmemory with a policy other than noeviction): replay records could be dropped.",
            )?,
            ops: Vec::new(),
            fallback_series: Vec::new(),
        };
        // Every series exists from the start at 0, so `rate()` and alerts see the first event.
        m.ops = Op::ALL
            .iter()
            .map(|op| {
                let errors = |kind: &str| m.op_errors.with_label_values(&[op.label(), kind]);
                OpSeries {
                    duration: m.op_duration.with_label_values(&[op.label()]),
                    timeout: errors("timeout"),
                    error: errors("error"),
                    breaker_open: errors("breaker_open"),
                    migrating: errors("migrating"),
                }
            })
            .collect();
        m.fallback_series = Fallback::ALL.iter().map(|f| m.fallbacks.with_label_values(&[f.label()])).collect();
        Ok(m)
    }

    fn op(&self, op: Op) -> &OpSeries {
        &self.ops[op as usize]
    }

    /// Every family, for registration.
    pub fn collectors(&self) -> Vec<Box<dyn prometheus::core::Collector>> {
        vec![
            Box::new(self.up.clone()),
            Box::new(self.gateways.clone()),
            Box::new(self.clock_offset.clone()),
            Box::new(self.op_duration.clone()),
            Box::new(self.op_errors.clone()),
            Box::new(self.fallbacks.clone()),
            Box::new(self.data_lost.clone()),
            Box::new(self.evicting.clone()),
        ]
    }
}

thread_local! {
    /// Each connection worker thread's connection to Redis, by `Shared::id`, opened on its
    /// first use there (see `Shared::local`).
    static CONNS: std::cell::RefCell<std::collections::HashMap<usize, Arc<tokio::sync::OnceCell<Conn>>>> =
        std::cell::RefCell::new(std::collections::HashMap::new());
    /// Each thread's batcher of signature records, by `Shared::id` (see `batch.rs`).
    static BATCHERS: std::cell::RefCell<std::collections::HashMap<usize, Arc<batch::Batcher>>> =
        std::cell::RefCell::new(std::collections::HashMap::new());
    /// Operations of this thread that timed out since one last succeeded (0 or 1).
    static TIMEOUTS_IN_A_ROW: std::cell::Cell<u8> = const { std::cell::Cell::new(0) };
}

/// A log line's last time: `due` says whether a minute has passed (and starts the next).
#[derive(Debug, Default)]
struct EveryMinute(Mutex<Option<Instant>>);

impl EveryMinute {
    fn due(&self) -> bool {
        let mut last = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if last.is_some_and(|t| t.elapsed() < Duration::from_secs(60)) {
            return false;
        }
        *last = Some(Instant::now());
        true
    }
}

/// An error that a Redis Cluster slot being moved gives one operation, not an outage:
/// TRYAGAIN (a script's keys half moved), or an ASK or MOVED redirect left when the client's
/// retries ran out.
fn caught_in_a_migration(e: &redis::RedisError) -> bool {
    use redis::{ErrorKind::Server, ServerErrorKind as K};
    matches!(e.kind(), Server(K::TryAgain) | Server(K::Ask) | Server(K::Moved))
}

/// A wait for Redis that ran out, as the client reports its own (`is_timeout()`).
fn timed_out(what: &str) -> redis::RedisError {
    redis::RedisError::from(std::io::Error::new(std::io::ErrorKind::TimedOut, what.to_string()))
}

/// The fleet's shared state.
pub struct Shared {
    /// The connection opened at start: heartbeats and probes (requests use [`Shared::local`]).
    /// Replaced when a probe fails (`reopen_main`).
    main: Mutex<Conn>,
    /// A replacement of `main` is being opened.
    reopening: std::sync::atomic::AtomicBool,
    /// What [`Shared::local`] opens its connections with.
    cfg: SharedStateConfig,
    /// Tells this instance's thread-local connections apart from another's (tests run
    /// several gateways in one process).
    id: usize,
    prefix: String,
    op_timeout: Duration,
    pub replay_fallback: ReplayFallback,
    breaker: Breaker,
    /// Gateways last seen alive (at least 1: this one).
    live: AtomicU32,
    /// This gateway's id in the fleet's heartbeat set.
    node: String,
    /// The epochs as last read, for the requests that read one with their record
    /// (`vouch`); replaced whole, under `epochs_write`, when one changes.
    epochs: arc_swap::ArcSwap<Epochs>,
    epochs_write: Mutex<()>,
    /// Counts the replacements of `epochs`: a record's answer read before one, handled
    /// after it, must not be taken for news (`vouch`).
    epochs_version: std::sync::atomic::AtomicU64,
    /// Wakes the heartbeat to read the epochs and the slot map now: a cluster record found
    /// its node's epoch missing (which a slot migration can show without a loss), or a
    /// request was caught in a slot migration (`migrating`).
    recheck: tokio::sync::Notify,
    /// The fleet's epoch key.
    fleet_epoch_key: Arc<str>,
    /// One Redis, not a cluster: the fleet's epoch key is in every operation's reach.
    single: bool,
    /// Each node's count of evicted keys as last read, by the node's epoch key.
    evictions: Mutex<std::collections::HashMap<String, u64>>,
    /// Signatures with a timestamp before this (unix seconds) may have been accepted
    /// before Redis lost its data: Redis cannot vouch for them (see `fence`).
    fence: AtomicI64,
    /// The HMAC freshness window, seconds: how far a fence reaches.
    max_skew: i64,
    take: Script,
    record: Script,
    add_usage: Script,
    /// This gateway's leases of keys' buckets (`lease.rs`); keys that authenticated only.
    leases: dashmap::DashMap<Arc<str>, Arc<Lease>, crate::credentials::KeyIdHasher>,
    heartbeat: Script,
    set_epoch: Script,
    eviction: Script,
    fence_script: Script,
    pub metrics: SharedMetrics,
    /// The description for logs (URLs without passwords).
    describe: String,
    /// One log line a minute at most, per kind: an outage (one per outage), an evicting
    /// Redis, a far clock, a loss of data. Never a line per request or per heartbeat.
    outage_log: EveryMinute,
    evicting_log: EveryMinute,
    clock_log: EveryMinute,
    lost_log: EveryMinute,
    migrating_log: EveryMinute,
    /// Wakes the background task when the breaker opens, so that it probes at once.
    opened: tokio::sync::Notify,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared").field("redis", &self.describe).field("prefix", &self.prefix).finish_non_exhaustive()
    }
}

/// Why start-up could not use Redis.
#[derive(Debug, thiserror::Error)]
#[error("shared_state: cannot use Redis at {endpoint}: {reason}")]
pub struct ConnectError {
    endpoint: String,
    reason: String,
}

fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// An id for this gateway or a new epoch. Not a secret; uniqueness is what matters.
fn random_id() -> String {
    let mut b = [0u8; 12];
    if getrandom::fill(&mut b).is_err() {
        let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        b[..8].copy_from_slice(&(t.as_nanos() as u64).to_le_bytes());
        b[8..].copy_from_slice(&std::process::id().to_le_bytes());
    }
    hex(&b)
}

/// CRC16/XMODEM, the hash of Redis Cluster's key slots.
fn crc16(data: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &b in data {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 { (crc << 1) ^ 0x1021 } else { crc << 1 };
        }
    }
    crc
}

/// The epochs as last read (see `Shared::vouch`).
#[derive(Debug, Default)]
struct Epochs {
    /// Each epoch key's value (`None`: found missing).
    values: std::collections::HashMap<String, Option<String>>,
    /// Under Redis Cluster: each master's slot range and the epoch key in it.
    ranges: Vec<(u16, u16, Arc<str>)>,
}

/// A key's slot under Redis Cluster: CRC16 of its hash tag (the first `{…}` with something
/// inside), or of the whole key without one.
fn slot_of(key: &str) -> u16 {
    let b = key.as_bytes();
    let hashed = match b.iter().position(|&c| c == b'{') {
        Some(open) => match b[open + 1..].iter().position(|&c| c == b'}') {
            Some(len) if len > 0 => &b[open + 1..open + 1 + len],
            _ => b,
        },
        None => b,
    };
    crc16(hashed) % 16384
}

/// A hash tag whose slot is in `start..=end` (a master's range).
fn tag_in_slots(start: u16, end: u16) -> Option<String> {
    (0..1_000_000u32).map(|n| format!("e{n}")).find(|t| (start..=end).contains(&(crc16(t.as_bytes()) % 16384)))
}

/// What a signature's record holds: the first 16 bytes of its SHA-256 (never the
/// signature itself, and never the secret).
fn signature_member(signature: &[u8; 32]) -> [u8; 16] {
    let digest = Sha256::digest(signature);
    let mut m = [0u8; 16];
    m.copy_from_slice(&digest[..16]);
    m
}

/// `PREFIX{TAG ID}REST`: everything of one operation shares the braces' hash tag. A `}`
/// inside `id` ends the tag early, but at the same place in every key of the operation.
fn key(prefix: &str, tag: &str, id: &str, rest: &str) -> String {
    let mut k = String::with_capacity(prefix.len() + tag.len() + id.len() + rest.len() + 2);
    k.push_str(prefix);
    k.push('{');
    k.push_str(tag);
    k.push_str(id);
    k.push('}');
    k.push_str(rest);
    k
}

impl Shared {
    /// Connects and runs a first heartbeat: a wrong URL, a refused password or a TLS
    /// mismatch is an error here, at start-up. `max_skew` is the HMAC window.
    pub async fn connect(cfg: &SharedStateConfig, max_skew: Duration) -> Result<Arc<Shared>, ConnectError> {
        Self::open(cfg, max_skew, true).await
    }

    /// Connects and checks Redis answers, without announcing a gateway (`check-config`, the
    /// CLI's usage views): a tool must not count as a gateway alive.
    pub async fn connect_tool(cfg: &SharedStateConfig) -> Result<Arc<Shared>, ConnectError> {
        Self::open(cfg, Duration::ZERO, false).await
    }

    async fn open(cfg: &SharedStateConfig, max_skew: Duration, announce: bool) -> Result<Arc<Shared>, ConnectError> {
        let fail = |reason: String| ConnectError { endpoint: cfg.describe(), reason };
        let opened = tokio::time::timeout(Duration::from_secs(5), Conn::open(cfg))
            .await
            .map_err(|_| fail("no answer within 5s".into()))?;
        let conn = opened.map_err(|e| fail(e.to_string()))?;
        static IDS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let shared = Shared {
            main: Mutex::new(conn),
            reopening: std::sync::atomic::AtomicBool::new(false),
            cfg: cfg.clone(),
            id: IDS.fetch_add(1, Ordering::Relaxed),
            prefix: cfg.key_prefix.clone(),
            op_timeout: cfg.op_timeout,
            replay_fallback: cfg.replay_fallback,
            breaker: Breaker::new(),
            live: AtomicU32::new(1),
            node: random_id(),
            epochs: arc_swap::ArcSwap::from_pointee(Epochs::default()),
            epochs_write: Mutex::new(()),
            epochs_version: std::sync::atomic::AtomicU64::new(0),
            recheck: tokio::sync::Notify::new(),
            fleet_epoch_key: key(&cfg.key_prefix, "fleet", "", ":epoch").into(),
            single: matches!(cfg.endpoint, crate::config::shared_state::RedisEndpoint::Single(_)),
            evictions: Mutex::new(std::collections::HashMap::new()),
            fence: AtomicI64::new(0),
            max_skew: i64::try_from(max_skew.as_secs()).unwrap_or(i64::MAX),
            take: Script::new(scripts::TAKE),
            record: Script::new(scripts::RECORD),
            leases: dashmap::DashMap::default(),
            add_usage: Script::new(scripts::ADD_USAGE),
            heartbeat: Script::new(scripts::HEARTBEAT),
            set_epoch: Script::new(scripts::SET_EPOCH),
            eviction: Script::new(scripts::EVICTION),
            fence_script: Script::new(scripts::FENCE),
            metrics: SharedMetrics::new().map_err(|e| fail(format!("metrics: {e}")))?,
            describe: cfg.describe(),
            outage_log: EveryMinute::default(),
            evicting_log: EveryMinute::default(),
            clock_log: EveryMinute::default(),
            lost_log: EveryMinute::default(),
            migrating_log: EveryMinute::default(),
            opened: tokio::sync::Notify::new(),
        };
        // Before announcing anything: a Redis that may evict keys can drop a replay record
        // inside its window, and then a replay is accepted. That is a configuration to fix
        // before traffic, like a wrong password.
        let seen = tokio::time::timeout(Duration::from_secs(5), shared.check_nodes(false))
            .await
            .map_err(|_| fail("no answer within 5s".into()))?
            .map_err(|e| fail(e.to_string()))?;
        if let Some(evicting) = seen.evicting {
            return Err(fail(format!(
                "Redis may evict keys before they expire ({evicting}): a replay record could be dropped inside its window; set maxmemory-policy noeviction (docs/shared-state.md)"
            )));
        }
        if seen.unknown {
            tracing::warn!(redis = %shared.describe, "cannot check whether Redis may evict keys (INFO is not allowed for this user): grant +info, and run Redis with maxmemory-policy noeviction");
        }
        let first = if announce {
            shared.beat().await.map(|_| ())
        } else {
            // A script run, as a gateway's first heartbeat is: ACLs that forbid EVALSHA fail here.
            let ping = Script::new("return redis.call('PING')");
            tokio::time::timeout(Duration::from_secs(5), shared.main().run::<String>(&ping.prepare_invoke()))
                .await
                .map_err(|_| redis::RedisError::from((redis::ErrorKind::Io, "no answer within 5s")))
                .and_then(|r| r.map(|_| ()))
        };
        first.map_err(|e| fail(e.to_string()))?;
        shared.metrics.up.set(1);
        Ok(Arc::new(shared))
    }

    /// Where Redis is, for logs.
    pub fn describe(&self) -> &str {
        &self.describe
    }

    /// Gateways last seen alive, at least 1.
    pub fn live_gateways(&self) -> u32 {
        self.live.load(Ordering::Relaxed).max(1)
    }

    /// True when a signature with this timestamp cannot be checked in Redis because
    /// Redis lost its data while it could still be replayed.
    /// The fence is this gateway's own (it saw Redis lose data) or the fleet's (another
    /// gateway saw it, `P{fleet}:fence`), whichever reaches further.
    pub fn fenced(&self, timestamp: i64) -> bool {
        timestamp < self.fence.load(Ordering::SeqCst)
    }

    /// After a signature was recorded as new: true when Redis can vouch that it was not
    /// accepted before.
    ///
    /// Redis (or a node of a cluster) restarted empty or flushed forgets the records; the
    /// heartbeat notices within a second, but a replay in that second would meet an empty
    /// set and be recorded as new. So every record reads, in its round trip, the epoch of
    /// the node that holds it (after the record in a pipeline, atomically with it in a
    /// script; `read`: that key and what it held):
    /// one that still reads as the value known means the record met the data the node
    /// had, and the signature is vouched for unless it is fenced now (the heartbeat may
    /// have found a loss meanwhile). Anything else is not vouched for, and the request
    /// takes the fallback:
    /// - a different value is the loss, fenced here; so is a missing one on one Redis;
    /// - under Redis Cluster a missing one may also be a slot migration (a record sent to
    ///   the importing master before the epoch key moved there): the heartbeat reads the
    ///   node's epoch at once, where the cluster routes it, and fences if it is a loss;
    /// - an epoch that could not be read ([`UNREADABLE`]), no epoch key known for the
    ///   record's node, or a known value that is itself missing.
    ///
    /// `version`: `epochs_version` before the record was sent. If the epochs changed while
    /// it was in flight, its read may be older than what is known: it is compared, never
    /// taken for news (so one loss is never counted twice).
    fn vouch(&self, op: Op, read: Option<(&str, Option<&str>)>, timestamp: i64, version: u64) -> bool {
        let Some((key, seen)) = read else { return false };
        if seen == Some(UNREADABLE) {
            self.migrating(op, "the record reached a master importing its slot");
            return false;
        }
        let epochs = self.epochs.load();
        let Some(Some(known)) = epochs.values.get(key) else { return false };
        if seen == Some(known.as_str()) {
            return !self.fenced(timestamp);
        }
        match seen {
            None if !self.single => self.recheck.notify_one(),
            _ => self.saw_epoch(key, seen.map(str::to_string), Some(version)),
        }
        false
    }

    /// The epoch key on the node that holds `tagged` (a key of an operation): the fleet's
    /// on one Redis; under Redis Cluster the one in the slot range, as last read, of the
    /// master of its slot. `None`: no master known for that slot.
    fn epoch_key_of(&self, tagged: &str) -> Option<Arc<str>> {
        if self.single {
            return Some(self.fleet_epoch_key.clone());
        }
        let slot = slot_of(tagged);
        self.epochs.load().ranges.iter().find(|(start, end, _)| (*start..=*end).contains(&slot)).map(|r| r.2.clone())
    }

    /// This thread's connection to Redis, opened on its first use here.
    ///
    /// Each connection worker thread has its own, whose driver task runs on that
    /// thread's runtime: a request's command and its answer never cross threads (one
    /// shared connection cost two cross-thread wake-ups per request, measured as about
    /// 40 µs of CPU per signed request on 2 cores). Requests of one thread still share the
    /// connection and their commands are pipelined.
    async fn local(&self) -> redis::RedisResult<Conn> {
        let cell = CONNS.with(|c| c.borrow_mut().entry(self.id).or_default().clone());
        if let Some(conn) = cell.get() {
            return Ok(conn.clone());
        }
        // First use on this thread: the connection is opened by a task of its own, so a
        // request that gives up at `op_timeout` does not cancel it (TLS and AUTH to a
        // remote Redis can take longer than one operation may); the next request finds it.
        let (opening, cfg) = (cell.clone(), self.cfg.clone());
        tokio::spawn(async move {
            let _ = opening.get_or_try_init(|| Conn::open(&cfg)).await;
        });
        cell.get_or_try_init(|| Conn::open(&self.cfg)).await.cloned()
    }

    /// Counts an operation of this thread that timed out, and forgets the thread's
    /// connection (and its batcher, whose sender holds it) at the second in a row: a
    /// connection that a firewall or NAT dropped silently answers nothing and reports no
    /// error, so it would time out every operation the breaker lets through until TCP gives
    /// up. One timeout alone is kept: on a saturated box an operation can pass
    /// `op_timeout` while Redis and the connection are fine, and reconnecting then would
    /// only lengthen the outage. One still being opened is kept too: opening may take
    /// longer than an operation (TLS and AUTH to a distant Redis) and has its own timeout.
    fn timed_out_here(&self) {
        if TIMEOUTS_IN_A_ROW.get() == 0 {
            TIMEOUTS_IN_A_ROW.set(1);
            return;
        }
        TIMEOUTS_IN_A_ROW.set(0);
        CONNS.with(|c| {
            let mut conns = c.borrow_mut();
            if conns.get(&self.id).is_some_and(|cell| cell.initialized()) {
                conns.remove(&self.id);
                BATCHERS.with(|b| b.borrow_mut().remove(&self.id));
            }
        });
    }

    /// The heartbeat's connection.
    fn main(&self) -> Conn {
        self.main.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// After a failed probe: opens a new heartbeat connection in the background (one at a
    /// time) and uses it once open, for the same reason as `forget_local`. The probes go on
    /// meanwhile on the old one, which recovers by itself from anything but silence.
    fn reopen_main(self: &Arc<Self>) {
        if self.reopening.swap(true, Ordering::AcqRel) {
            return;
        }
        let this = self.clone();
        tokio::spawn(async move {
            if let Ok(Ok(conn)) = tokio::time::timeout(Duration::from_secs(5), Conn::open(&this.cfg)).await {
                *this.main.lock().unwrap_or_else(PoisonError::into_inner) = conn;
            }
            this.reopening.store(false, Ordering::Release);
        });
    }

    /// This thread's batcher of signature records (see `batch.rs`).
    fn batcher(&self) -> Arc<batch::Batcher> {
        BATCHERS.with(|b| {
            b.borrow_mut()
                .entry(self.id)
                .or_insert_with(|| Arc::new(batch::Batcher::new(self.fleet_epoch_key.to_string())))
                .clone()
        })
    }

    async fn run<T: redis::FromRedisValue>(&self, inv: &redis::ScriptInvocation<'_>) -> redis::RedisResult<T> {
        let mut conn = self.local().await?;
        conn.run(inv).await
    }

    async fn pipeline<T: redis::FromRedisValue>(&self, pipe: &redis::Pipeline) -> redis::RedisResult<T> {
        let mut conn = self.local().await?;
        conn.pipeline(pipe).await
    }

    async fn query<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> redis::RedisResult<T> {
        let mut conn = self.local().await?;
        conn.query(cmd).await
    }

    fn key(&self, tag: &str, id: &str, rest: &str) -> String {
        key(&self.prefix, tag, id, rest)
    }

    /// Runs one operation under the breaker and the operation timeout, timing it.
    async fn op<T, F>(&self, op: Op, f: F) -> Result<T, Unavailable>
    where
        F: Future<Output = redis::RedisResult<T>>,
    {
        let series = self.metrics.op(op);
        if !self.breaker.closed() {
            series.breaker_open.inc();
            return Err(Unavailable);
        }
        let started = Instant::now();
        let result = tokio::time::timeout(self.op_timeout, f).await;
        series.duration.observe(started.elapsed().as_secs_f64());
        let failure = match result {
            Ok(Ok(v)) => {
                TIMEOUTS_IN_A_ROW.set(0);
                return Ok(v);
            }
            Ok(Err(e)) if caught_in_a_migration(&e) => {
                // Under Redis Cluster, a slot being moved: a script whose two keys are half
                // moved (TRYAGAIN), or redirects that outran the client's retries. The node
                // answers; this one request falls back. It is not an outage (the breaker, and
                // its epoch check, are for those).
                TIMEOUTS_IN_A_ROW.set(0);
                self.migrating(op, &e.to_string());
                return Err(Unavailable);
            }
            Ok(Err(e)) => {
                series.error.inc();
                Err(e)
            }
            Err(_) => {
                series.timeout.inc();
                self.timed_out_here();
                Ok(self.op_timeout)
            }
        };
        if self.breaker.failed() {
            self.metrics.up.set(0);
            let reason = match failure {
                Err(e) => e.to_string(),
                Ok(limit) => format!("no answer within {limit:?}"),
            };
            self.log_outage(&reason);
            self.opened.notify_one();
        }
        Err(Unavailable)
    }

    /// Counts an operation caught in a Redis Cluster slot migration (its request falls back)
    /// and logs it once a minute: a reshard left half-way (a slot still MIGRATING) would
    /// otherwise send every new signed request of that slot to the fallback unseen, with
    /// `gatehouse_shared_state_up` at 1.
    fn migrating(&self, op: Op, what: &str) {
        self.metrics.op(op).migrating.inc();
        // The slots have moved under this gateway: read the map that names each record's
        // epoch key now (at most one early heartbeat per probe interval) rather than at the
        // next heartbeat, so that a reshard sends each moved key to the fallback for a
        // fifth of a second rather than up to a second after its slot moved.
        self.recheck.notify_one();
        if self.migrating_log.due() {
            tracing::warn!(redis = %self.describe, error = %what, "shared state: requests of a Redis Cluster slot being moved fall back (shared_state.on_unavailable) until the slot has moved; a reshard left half-way keeps them there (redis-cli --cluster fix)");
        }
    }

    fn log_outage(&self, err: &str) {
        if !self.outage_log.due() {
            return;
        }
        tracing::error!(redis = %self.describe, error = %err, "shared state unavailable: falling back (shared_state.on_unavailable) until Redis answers again");
    }

    /// Takes one request from a key's fleet-wide bucket (`per_second`, `burst`), and
    /// records its signature, when there is one, if the bucket admits it.
    ///
    /// At most one round trip: none while this gateway's lease of the key holds requests
    /// (an API-key request), one `SADD` for a signed request then, or one script that
    /// takes a new lease and records the signature together.
    pub async fn admit(
        &self,
        key_id: &Arc<str>,
        per_second: u32,
        burst: u32,
        signature: Option<SignatureRecord<'_>>,
    ) -> Result<Admission, Unavailable> {
        // The common case spends from the lease under the map's read guard: no reference
        // count that every core writes per request. A refill takes the lease out.
        match self.leases.get(key_id).map_or(Local::Empty, |l| l.spend(Instant::now())) {
            Local::Spent(remaining) => self.spent(key_id, remaining, signature).await,
            Local::Limited(wait) => Ok(Admission::Limited { wait }),
            Local::Empty => self.refill(key_id, per_second, burst, signature).await,
        }
    }

    /// A request spent from the lease: records its signature, if any (a replay, or Redis
    /// unavailable, gives the request back).
    async fn spent(
        &self,
        key_id: &str,
        remaining: u32,
        signature: Option<SignatureRecord<'_>>,
    ) -> Result<Admission, Unavailable> {
        let Some(sig) = signature else { return Ok(Admission::Admitted { remaining }) };
        let recorded = self.record_signature(key_id, sig).await;
        // A request not vouched for was admitted by the limit (it keeps its request, as on
        // the refill path); a replay or no answer was not.
        if matches!(recorded, Ok(Record::Seen) | Err(_))
            && let Some(lease) = self.leases.get(key_id)
        {
            lease.give_back();
        }
        match recorded? {
            Record::New => Ok(Admission::Admitted { remaining }),
            Record::Seen => Ok(Admission::Replayed),
            Record::Unvouched => Ok(Admission::Fenced { remaining }),
        }
    }

    /// The lease is empty: one request per key and gateway asks Redis for the next one
    /// (with this request's signature); the others wait and spend from what it brought.
    async fn refill(
        &self,
        key_id: &Arc<str>,
        per_second: u32,
        burst: u32,
        signature: Option<SignatureRecord<'_>>,
    ) -> Result<Admission, Unavailable> {
        let lease = self.lease(key_id);
        // Requests of one key wait here for one refill at a time (each its own round trip
        // when the lease is one request): at most `op_timeout`, then the request falls
        // back like any unanswered operation (so an admission waits at most twice that).
        let Ok(guard) = tokio::time::timeout(self.op_timeout, lease.refill.lock()).await else {
            return Err(Unavailable);
        };
        match lease.spend(Instant::now()) {
            Local::Spent(remaining) => {
                drop(guard);
                return self.spent(key_id, remaining, signature).await;
            }
            Local::Limited(wait) => return Ok(Admission::Limited { wait }),
            Local::Empty => {}
        }
        let now = Instant::now();
        let want = lease.next_size(now, lease::cap(per_second, burst, self.live_gateways()));
        let mut inv = self.take.prepare_invoke();
        inv.key(self.key("k:", key_id, ":rate"));
        let ttl_ms = signature.map_or(0, |s| s.ttl_ms());
        let member = signature.map(|s| signature_member(s.signature));
        let set = signature.map(|s| self.signature_set(key_id, s.timestamp));
        let epoch_key = set.as_deref().and_then(|set| self.epoch_key_of(set));
        let version = self.epochs_version.load(Ordering::SeqCst);
        if let Some(set) = &set {
            inv.key(set);
        }
        // Redis's buckets count in microseconds: a limit above 1,000,000 req/s acts as that
        // (a step of 0 would admit everything).
        let step = (1_000_000 / u64::from(per_second.max(1))).max(1);
        inv.arg(step).arg(burst.max(1)).arg(ttl_ms).arg(want);
        if let Some(m) = &member {
            inv.arg(&m[..]).arg(epoch_key.as_deref().unwrap_or(""));
        }
        let (code, n, epoch): (i64, i64, Option<String>) = self.op(Op::Admit, self.run(&inv)).await?;
        // The lease is updated before the lock goes: a waiter must find it filled.
        let admission = match code {
            c if c > 0 => {
                let remaining = lease.granted(now, u32::try_from(c).unwrap_or(1), u32::try_from(n).unwrap_or(0));
                match signature {
                    Some(s)
                        if !self.vouch(
                            Op::Admit,
                            epoch_key.as_deref().map(|k| (k, epoch.as_deref())),
                            s.timestamp,
                            version,
                        ) =>
                    {
                        Admission::Fenced { remaining }
                    }
                    _ => Admission::Admitted { remaining },
                }
            }
            0 => {
                let wait = Duration::from_micros(u64::try_from(n).unwrap_or(0));
                lease.limited(now, wait);
                Admission::Limited { wait }
            }
            _ => Admission::Replayed,
        };
        drop(guard);
        Ok(admission)
    }

    /// This gateway's lease of a key.
    fn lease(&self, key_id: &Arc<str>) -> Arc<Lease> {
        if let Some(l) = self.leases.get(key_id) {
            return l.clone();
        }
        self.leases.entry(key_id.clone()).or_default().clone()
    }

    /// Drops the leases of keys for which `keep` is false (keys gone from the credentials).
    pub fn prune_leases(&self, keep: impl Fn(&str) -> bool) {
        self.leases.retain(|id, _| keep(id));
    }

    /// The set of a key's accepted signatures with one timestamp.
    ///
    /// Why a set per timestamp rather than a key per signature: every signature with
    /// that timestamp leaves the window at the same moment, so the set expires as a whole,
    /// and adding a member to a set costs Redis about a third of creating a key with its
    /// own expiry (measured: ~1 µs against ~3 µs of Redis CPU per signature), which is most
    /// of what shared mode adds to a signed request on a small box.
    fn signature_set(&self, key_id: &str, timestamp: i64) -> String {
        let mut ts = itoa::Buffer::new();
        let mut rest = String::with_capacity(26);
        rest.push_str(":sig:");
        rest.push_str(ts.format(timestamp));
        self.key("k:", key_id, &rest)
    }

    /// Records a signature for its window.
    ///
    /// On one Redis, the records of the signed requests a worker has ready at once go out
    /// as one pipeline (`batch.rs`); under Redis Cluster each is its own (the sets of
    /// different keys are in different slots).
    async fn record_signature(&self, key_id: &str, s: SignatureRecord<'_>) -> Result<Record, Unavailable> {
        let set = self.signature_set(key_id, s.timestamp);
        let member = signature_member(s.signature);
        let version = self.epochs_version.load(Ordering::SeqCst);
        let record = async {
            let mut conn = self.local().await?;
            if let Conn::Single(_) = conn {
                let r = self.batcher().record(&conn, set, member, s.ttl_ms()).await?;
                // The batcher read the fleet's epoch: named below, without a reference
                // count that every signed request would write.
                return Ok((r.added, None, r.epoch));
            }
            // Cluster: one slot (the set's), one round trip; the node's epoch is in another
            // slot of the same node.
            let epoch_key = self.epoch_key_of(&set);
            let mut inv = self.record.prepare_invoke();
            inv.key(&set).arg(&member[..]).arg(s.ttl_ms()).arg(epoch_key.as_deref().unwrap_or(""));
            let (added, epoch): (i64, Option<String>) = conn.run(&inv).await?;
            Ok((added == 1, epoch_key, epoch.map(Arc::from)))
        };
        let (added, cluster_epoch_key, epoch) = self.op(Op::Replay, record).await?;
        let epoch_key = match &cluster_epoch_key {
            Some(k) => Some(&**k),
            None => self.single.then_some(&*self.fleet_epoch_key),
        };
        Ok(match added {
            false => Record::Seen,
            true if self.vouch(Op::Replay, epoch_key.map(|k| (k, epoch.as_deref())), s.timestamp, version) => {
                Record::New
            }
            true => Record::Unvouched,
        })
    }

    /// Charges one failed authentication to a client network (`ip`: its limiter key) with
    /// a budget of `per_minute`. `Some(wait)`: over budget, blocked for `wait`.
    pub async fn charge_failure(&self, ip: u128, per_minute: u32) -> Result<Option<Duration>, Unavailable> {
        let mut inv = self.take.prepare_invoke();
        inv.key(self.key("ip:", &format!("{ip:x}"), ":fail"));
        let per_minute = per_minute.max(1);
        inv.arg((60_000_000 / u64::from(per_minute)).max(1)).arg(per_minute).arg(0).arg(1);
        let (code, n, _): (i64, i64, Option<String>) = self.op(Op::FailedAuth, self.run(&inv)).await?;
        Ok((code == 0).then(|| Duration::from_micros(u64::try_from(n).unwrap_or(0))))
    }

    /// Adds usage deltas (key id → row) to the fleet's totals, in one script: callers give
    /// at most [`USAGE_ROWS_PER_CALL`] rows.
    ///
    /// The requests also count in the hour and the day of `at` (unix seconds, this
    /// gateway's clock: the moment of the flush, as a gateway without shared state samples
    /// its own history), kept for `window`.
    pub async fn add_usage(
        &self,
        rows: &[(String, UsageRow)],
        at: i64,
        window: HistoryWindow,
    ) -> Result<(), Unavailable> {
        let (hour, day) = (at.div_euclid(3600), at.div_euclid(86_400));
        let mut inv = self.add_usage.prepare_invoke();
        inv.key(self.key("fleet", "", ":usage"))
            .key(self.history_key(Bucket::Hour, hour))
            .key(self.history_key(Bucket::Day, day));
        // Read until the bucket is `window` old, so kept until then (and an hour more, for
        // gateways whose clocks are a little behind).
        let ms_until = |t: i64| (t - at).max(1) * 1000;
        inv.arg(ms_until((hour + window.hours + 1) * 3600)).arg(ms_until((day + window.days) * 86_400 + 3600));
        for (id, r) in rows {
            inv.arg(id.as_str())
                .arg(r.user.as_str())
                .arg(r.requests)
                .arg(r.errors)
                .arg(r.rate_limited)
                .arg(r.last_used);
        }
        let _: i64 = self.op(Op::Usage, self.run(&inv)).await?;
        Ok(())
    }

    /// `ids`' requests per hour and per day, summed over the fleet, for the `window` up to
    /// `now` (unix seconds).
    ///
    /// One `HGET` per key and bucket (the documented ACL allows it; `HMGET` would need
    /// one more command there), pipelined: at most [`HISTORY_READS_PER_CALL`] a round
    /// trip (18 keys' 24 hours and 30 days; 41 keys' 24 hours), so a user's page costs one
    /// and no read holds Redis for long. Each costs Redis one field lookup: the console's
    /// users list reads only its shown keys' hours.
    pub async fn read_requests(
        &self,
        ids: &[String],
        now: i64,
        window: HistoryWindow,
    ) -> Result<RequestCounts, Unavailable> {
        let (hour, day) = (now.div_euclid(3600), now.div_euclid(86_400));
        let buckets: Vec<(Bucket, i64, String)> = (hour - window.hours + 1..=hour)
            .map(|h| (Bucket::Hour, h))
            .chain((day - window.days + 1..=day).map(|d| (Bucket::Day, d)))
            .map(|(b, t)| (b, t, self.history_key(b, t)))
            .collect();
        let mut out = RequestCounts::default();
        for part in ids.chunks((HISTORY_READS_PER_CALL / buckets.len().max(1)).max(1)) {
            let mut pipe = redis::pipe();
            for (_, _, key) in &buckets {
                for id in part {
                    pipe.cmd("HGET").arg(key).arg(id);
                }
            }
            let replies: Vec<Option<String>> = self.op(Op::Usage, self.pipeline(&pipe)).await?;
            let asked = buckets.iter().flat_map(|(b, t, _)| part.iter().map(move |id| (*b, *t, id)));
            for ((bucket, t, id), n) in asked.zip(replies) {
                // Another application's value under the prefix reads as nothing.
                let Some(n) = n.and_then(|n| n.parse::<u64>().ok()).filter(|n| *n > 0) else { continue };
                let into = match bucket {
                    Bucket::Hour => &mut out.hours,
                    Bucket::Day => &mut out.days,
                };
                into.entry(id.clone()).or_default().insert(t, n);
            }
        }
        Ok(out)
    }

    fn history_key(&self, bucket: Bucket, t: i64) -> String {
        let unit = match bucket {
            Bucket::Hour => "hour",
            Bucket::Day => "day",
        };
        self.key("fleet", "", &format!(":usage:{unit}:{t}"))
    }

    /// Every key's usage, summed over the fleet.
    ///
    /// Read with `HSCAN`, a thousand fields a call: one `HGETALL` of a large fleet's hash
    /// (100,000 keys are 500,000 fields) would stop Redis for every gateway for longer
    /// than their operations may wait, and time out itself, opening the breaker.
    pub async fn read_usage(&self) -> Result<BTreeMap<String, UsageRow>, Unavailable> {
        let key = self.key("fleet", "", ":usage");
        let mut fields: Vec<(String, String)> = Vec::new();
        let mut cursor = 0u64;
        loop {
            let mut cmd = redis::cmd("HSCAN");
            cmd.arg(&key).arg(cursor).arg("COUNT").arg(1000);
            let (next, mut page): (u64, Vec<(String, String)>) = self.op(Op::Usage, self.query(&cmd)).await?;
            fields.append(&mut page);
            if next == 0 {
                break;
            }
            cursor = next;
        }
        let mut out: BTreeMap<String, UsageRow> = BTreeMap::new();
        for (field, value) in fields {
            // A field seen twice (HSCAN may return one more than once) is set twice.
            let Some((id, what)) = field.rsplit_once('|') else { continue };
            let row = out.entry(id.to_string()).or_default();
            let n = || value.parse::<u64>().unwrap_or(0);
            match what {
                "user" => row.user = value.clone(),
                "requests" => row.requests = n(),
                "errors" => row.errors = n(),
                "rate_limited" => row.rate_limited = n(),
                "last_used" => row.last_used = value.parse().unwrap_or(0),
                _ => {}
            }
        }
        Ok(out)
    }

    /// Announces this gateway, counts the fleet, and checks the epoch.
    /// Returns how long the heartbeat script's round trip took.
    async fn beat(&self) -> redis::RedisResult<Duration> {
        let mut inv = self.heartbeat.prepare_invoke();
        inv.key(self.key("fleet", "", ":gateways")).key(&*self.fleet_epoch_key);
        inv.arg(self.node.as_str()).arg(GONE_AFTER.as_millis() as u64).arg(random_id());
        let started = Instant::now();
        let (alive, epoch, redis_ms): (u32, String, i64) =
            self.beat_step("heartbeat timed out", self.main().run(&inv)).await?;
        let round_trip = started.elapsed();
        // Redis read its clock about halfway through the round trip.
        let here = time::OffsetDateTime::now_utc() - round_trip / 2;
        let offset = (here.unix_timestamp_nanos() / 1_000_000 - i128::from(redis_ms)) as f64 / 1000.0;
        self.metrics.clock_offset.set(offset);
        if offset.abs() > CLOCK_WARN_SECS {
            self.log_clock(offset);
        }
        self.metrics.op(Op::Heartbeat).duration.observe(round_trip.as_secs_f64());
        self.live.store(alive.max(1), Ordering::Relaxed);
        self.metrics.gateways.set(i64::from(alive.max(1)));
        self.saw_epoch(&self.fleet_epoch_key, Some(epoch), None);
        let seen = self.beat_step("node checks timed out", self.check_nodes(true)).await?;
        self.metrics.evicting.set(i64::from(seen.evicting.is_some()));
        if let Some(evicting) = &seen.evicting {
            self.log_evicting(evicting);
        }
        self.beat_step("fence timed out", self.share_fence()).await?;
        Ok(round_trip)
    }

    /// One step of a heartbeat, bounded like an operation but never under 500 ms (a
    /// heartbeat is not a request's wait); past it, a timeout (`is_timeout()`).
    async fn beat_step<T>(
        &self,
        what: &str,
        step: impl Future<Output = redis::RedisResult<T>>,
    ) -> redis::RedisResult<T> {
        tokio::time::timeout(self.op_timeout.max(Duration::from_millis(500)), step)
            .await
            .map_err(|_| timed_out(what))?
    }

    /// How far past now a fence reaches, seconds: a signature accepted before the loss is
    /// at most `max_skew` ahead of the clock of the gateway that accepted it, which may be
    /// [`CLOCK_SLACK`] ahead of this one.
    fn fence_reach(&self) -> i64 {
        self.max_skew.saturating_add(CLOCK_SLACK.as_secs() as i64).saturating_add(1)
    }

    /// Redis (or a node of it) restarted without its data, was flushed, or evicted keys:
    /// signatures accepted before may be forgotten, and Redis cannot vouch for any signed
    /// before now + `fence_reach`: those go to the replay fallback until then.
    ///
    /// Fenced here, at once, when the loss is seen: not at the end of the heartbeat, which
    /// a later failure could cut short (the next one sees the new epoch as known). The
    /// heartbeat then shares the fence with the fleet (`share_fence`). Logged once a minute
    /// at most (a Redis that keeps evicting would otherwise log every second).
    fn forget(&self, loss: Loss) {
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        self.fence.fetch_max(now.saturating_add(self.fence_reach()), Ordering::SeqCst);
        self.metrics.data_lost.inc();
        if !self.lost_log.due() {
            return;
        }
        let fence_seconds = self.fence_reach();
        match loss {
            Loss::Data => {
                tracing::error!(redis = %self.describe, fence_seconds, "Redis lost the fleet's shared state (restarted empty or flushed): signed requests use the replay fallback until the HMAC window has passed")
            }
            Loss::Evicted => {
                tracing::error!(redis = %self.describe, fence_seconds, "Redis evicted keys (maxmemory): replay records may be gone, so signed requests use the replay fallback until the HMAC window has passed; set maxmemory-policy noeviction")
            }
        }
    }

    /// Publishes this gateway's fence to the fleet and takes the fleet's: a gateway that
    /// starts (or first reaches Redis) after the loss has no earlier epoch to compare, and
    /// would otherwise trust the forgetful Redis. Each gateway republishes its fence at
    /// every heartbeat while it lasts, so it outlives the loss of the node holding it.
    ///
    /// A fence never reaches further than one fence from now, by Redis's clock when it is
    /// published and by this gateway's when it is taken: a gateway whose clock is far ahead
    /// must not refuse the whole fleet's signed requests for as long as its clock is off.
    async fn share_fence(&self) -> redis::RedisResult<()> {
        let mut inv = self.fence_script.prepare_invoke();
        inv.key(self.key("fleet", "", ":fence")).arg(self.fence.load(Ordering::Relaxed)).arg(self.fence_reach());
        let fleet: i64 = self.main().run(&inv).await?;
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        self.fence.fetch_max(fleet.min(now.saturating_add(self.fence_reach())), Ordering::SeqCst);
        Ok(())
    }

    /// Records `seen` as the epoch under `key` (`None`: the key is missing), and fences when
    /// it shows a loss: a value read before is gone, or another took its place. A loss
    /// counts once: found missing by a request, then set again by a heartbeat, is one.
    ///
    /// The fence is raised before the new value is published to requests (`epochs`): a
    /// request that finds the value it read already known then finds the fence too.
    ///
    /// `version`: for a request's read, `epochs_version` when it was sent; a read from
    /// before the last change is not news, and is dropped.
    fn saw_epoch(&self, key: &str, seen: Option<String>, version: Option<u64>) {
        let _writing = self.epochs_write.lock().unwrap_or_else(PoisonError::into_inner);
        if version.is_some_and(|v| v != self.epochs_version.load(Ordering::SeqCst)) {
            return;
        }
        let known = self.epochs.load_full();
        let lost = match (known.values.get(key), &seen) {
            (Some(before), _) if *before == seen => return,
            (Some(Some(before)), Some(now)) => before != now,
            (Some(Some(_)), None) => true,
            // The first look, or a loss already counted.
            _ => false,
        };
        if lost {
            self.forget(Loss::Data);
        }
        let mut next = Epochs { values: known.values.clone(), ranges: known.ranges.clone() };
        next.values.insert(key.to_string(), seen);
        self.replace_epochs(next);
    }

    /// Publishes which master's epoch key covers which slots, once each is known.
    fn publish_ranges(&self, ranges: Vec<(u16, u16, Arc<str>)>) {
        let _writing = self.epochs_write.lock().unwrap_or_else(PoisonError::into_inner);
        let known = self.epochs.load_full();
        if known.ranges == ranges {
            return;
        }
        self.replace_epochs(Epochs { values: known.values.clone(), ranges });
    }

    /// Publishes `next` to requests and counts the change (`epochs_version`); callers hold
    /// `epochs_write`.
    fn replace_epochs(&self, next: Epochs) {
        self.epochs.store(Arc::new(next));
        self.epochs_version.fetch_add(1, Ordering::SeqCst);
    }

    /// Looks at every node: under Redis Cluster each master's epoch key (a hash tag in one
    /// of its slot ranges, set once and read at each heartbeat; with `epochs`), and on every
    /// node how it evicts and whether it evicted keys since the last look.
    async fn check_nodes(&self, epochs: bool) -> redis::RedisResult<NodesSeen> {
        let mut nodes = Vec::new();
        let mut ranges = Vec::new();
        if matches!(self.main(), Conn::Cluster(_)) {
            let slots: Vec<redis::Value> = self.main().query(redis::cmd("CLUSTER").arg("SLOTS")).await?;
            for range in slots {
                let redis::Value::Array(items) = range else { continue };
                let (Some(redis::Value::Int(start)), Some(redis::Value::Int(end))) = (items.first(), items.get(1))
                else {
                    continue;
                };
                let (Ok(start), Ok(end)) = (u16::try_from(*start), u16::try_from(*end)) else { continue };
                let Some(tag) = tag_in_slots(start, end) else { continue };
                let key = self.key(&tag, "", ":epoch");
                ranges.push((start, end, Arc::from(key.as_str())));
                nodes.push((key, format!(" on the master of slots {start}-{end}")));
            }
        } else {
            // The fleet's epoch is read by the heartbeat itself.
            nodes.push((self.fleet_epoch_key.to_string(), String::new()));
        }
        let mut seen = NodesSeen::default();
        for (key, node) in nodes {
            if epochs && !node.is_empty() {
                let mut inv = self.set_epoch.prepare_invoke();
                inv.key(key.as_str()).arg(random_id());
                let epoch: String = self.main().run(&inv).await?;
                self.saw_epoch(&key, Some(epoch), None);
            }
            let mut inv = self.eviction.prepare_invoke();
            inv.key(key.as_str());
            let e = Eviction::from_reply(self.main().run(&inv).await?);
            if e.may_evict() && seen.evicting.is_none() {
                seen.evicting = Some(format!("{}{node}", e.describe()));
            }
            seen.unknown |= e.policy.is_none() || e.evicted.is_none();
            if e.evicted.is_some_and(|count| self.evicted_since(&key, count)) {
                self.forget(Loss::Evicted);
            }
        }
        // Each range's epoch is known now (read above): records may read them.
        if epochs {
            self.publish_ranges(ranges);
        }
        Ok(seen)
    }

    /// Records `count` as the node's evicted keys; true when it shows evictions since the
    /// last look. A lower count means its stats restarted (a restart, which the epoch
    /// catches, or `CONFIG RESETSTAT`): any count above 0 then may be new evictions.
    fn evicted_since(&self, key: &str, count: u64) -> bool {
        let before = self.evictions.lock().unwrap_or_else(PoisonError::into_inner).insert(key.to_string(), count);
        evicted_between(before, count)
    }

    /// Logs that this gateway's clock is far from Redis's, once a minute at most.
    fn log_clock(&self, offset: f64) {
        if !self.clock_log.due() {
            return;
        }
        tracing::error!(redis = %self.describe, offset_seconds = offset, "this gateway's clock is far from Redis's: replay records outlive their window by 30 s to absorb clock differences, and beyond that a replay could be accepted by a gateway whose clock is behind; fix the clocks (NTP)");
    }

    /// Logs that a node may evict keys, once a minute at most.
    fn log_evicting(&self, evicting: &str) {
        if !self.evicting_log.due() {
            return;
        }
        tracing::error!(redis = %self.describe, eviction = %evicting, "Redis may evict keys before they expire: a replay record dropped inside its window would let a replay through until the next heartbeat notices; set maxmemory-policy noeviction");
    }

    /// Heartbeats every second. When the breaker opens, probes at once and then every
    /// 200 ms, and closes it once Redis answers a probe within `op_timeout` (after the
    /// epoch check). When a cluster record found its node's epoch missing (`vouch`) or a
    /// request was caught in a slot migration (`migrating`), beats early, at most once per
    /// 200 ms.
    ///
    /// Why at once: one slow operation opens the breaker, and on a saturated box that can
    /// be a request's wait rather than Redis (its worker thread not scheduled for a while);
    /// waiting for the next heartbeat then refused every signed request for up to a second
    /// (measured: ~30,000 503s in one 10 s load run at 37,000 req/s).
    pub fn spawn(self: Arc<Self>) {
        tokio::spawn(async move {
            let mut last_beat = Instant::now();
            loop {
                let pause = if self.breaker.closed() {
                    HEARTBEAT_EVERY.saturating_sub(last_beat.elapsed())
                } else {
                    breaker::PROBE_EVERY
                };
                let recheck = tokio::select! {
                    () = tokio::time::sleep(pause) => false,
                    () = self.opened.notified() => false,
                    () = self.recheck.notified() => true,
                };
                if recheck {
                    // At most one early heartbeat per probe interval, whatever the requests.
                    tokio::time::sleep(breaker::PROBE_EVERY.saturating_sub(last_beat.elapsed())).await;
                }
                let mark = self.breaker.mark();
                let open = !self.breaker.closed();
                if !open && !recheck && last_beat.elapsed() < HEARTBEAT_EVERY {
                    continue;
                }
                match self.beat().await {
                    // A probe slower than an operation may be does not close the breaker:
                    // requests would each wait for Redis's slowness again.
                    Ok(round_trip) if open && round_trip > self.op_timeout => {
                        last_beat = Instant::now();
                    }
                    Ok(_) => {
                        last_beat = Instant::now();
                        // Not when an operation failed during this probe: it may have
                        // read Redis just before a restart that the failure was.
                        if self.breaker.close_if_unchanged(mark) {
                            self.metrics.up.set(1);
                            tracing::info!(redis = %self.describe, "shared state available again");
                        }
                    }
                    Err(e) => {
                        // Silence, not an error answer: the connection may be dead.
                        if e.is_timeout() {
                            self.reopen_main();
                        }
                        if self.breaker.failed() {
                            self.metrics.up.set(0);
                            self.log_outage(&e.to_string());
                        }
                    }
                }
            }
        });
    }

    /// Counts a request decided without Redis.
    pub fn fell_back(&self, reason: Fallback) {
        self.metrics.fallback_series[reason as usize].inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// the two keys of one admission share a hash tag (one slot under Redis Cluster)
    #[test]
    fn keys_of_one_admission_share_a_hash_tag() {
        fn tag(k: &str) -> &str {
            let open = k.find('{').unwrap();
            let close = k[open..].find('}').unwrap() + open;
            &k[open + 1..close]
        }
        for id in ["ak_1", "ak_1}x", "{x}"] {
            assert_eq!(tag(&key("gh:", "k:", id, ":rate")), tag(&key("gh:", "k:", id, ":sig:1765120000")));
        }
        assert_eq!(key("gh:", "fleet", "", ":usage"), "gh:{fleet}:usage");
        // Redis Cluster's own figures: CRC16 of "123456789", CLUSTER KEYSLOT foo.
        assert_eq!(crc16(b"123456789"), 0x31C3);
        assert_eq!(crc16(b"foo") % 16384, 12182);
        let tag = tag_in_slots(5461, 10922).unwrap();
        assert!((5461..=10922).contains(&(crc16(tag.as_bytes()) % 16384)));
        assert_eq!(hex(&[0, 15, 255]), "000fff");
        // CLUSTER KEYSLOT's answers: the first `{…}` with something inside, else the key.
        assert_eq!(slot_of("{a}x"), 15495);
        assert_eq!(slot_of("{e0}y"), 652);
        assert_eq!(slot_of("foo"), 12182);
        assert_eq!(slot_of("{}foo"), crc16(b"{}foo") % 16384);
        assert_eq!(slot_of("x{foo}{bar}"), 12182);
        assert_eq!(slot_of("x{foo"), crc16(b"x{foo") % 16384);
    }

    /// a node may drop replay records only with a memory limit and an evicting policy;
    /// evictions are a rising count (or one that restarted and rose again)
    #[test]
    fn eviction_is_read_from_the_node_and_its_count() {
        let e = |p: &str, m: &str, n: &str| Eviction::from_reply((p.into(), m.into(), n.into()));
        assert!(e("allkeys-lru", "1048576", "0").may_evict());
        assert!(e("volatile-ttl", "1048576", "0").may_evict());
        assert!(!e("noeviction", "1048576", "0").may_evict());
        assert!(!e("allkeys-lru", "0", "0").may_evict(), "no limit: nothing is evicted");
        let unknown = e("", "0", "-1");
        assert!(!unknown.may_evict());
        assert_eq!((unknown.policy, unknown.evicted), (None, None));
        assert_eq!(e("volatile-lru", "64", "3").describe(), "maxmemory-policy volatile-lru with maxmemory 64 bytes");
        assert!(!evicted_between(None, 5), "the first look is the baseline");
        assert!(!evicted_between(Some(5), 5));
        assert!(evicted_between(Some(5), 6));
        assert!(!evicted_between(Some(5), 0), "a restart's 0: the epoch tells whether data was lost");
        assert!(evicted_between(Some(5), 2), "stats reset, then evictions");
    }
}
