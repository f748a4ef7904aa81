//! Signature records of one connection worker, sent to Redis together: the `SADD` of
//! every signed request that became ready in the same turns of the worker's runtime go
//! out as one pipeline (one write, one read, one wake-up of Redis) instead of one each,
//! with one `PEXPIRE` per set they touched.
//!
//! Why: on a small box Redis shares the cores with everything else, and a write to it per
//! request costs a wake-up of Redis and of this worker per request. Each request still
//! gets its own answer from one round trip; what is saved is system calls and context
//! switches, on both sides (each wake-up of Redis costs it about as much CPU as a dozen
//! `SADD`s).
//!
//! How long a record waits before it is sent: the flusher yields once, so that the other
//! requests ready in this turn add theirs; while each yield brings more (a loaded
//! worker), it yields again, up to `GATHER_TURNS` times. A yield never sleeps: at light
//! load the first one finds nothing new and the record goes out at once. Records queued
//! while a pipeline is in flight go in the next one, sent when its answer is back (one
//! pipeline in flight per worker).
//!
//! Each pipeline ends with a `GET` of the fleet's epoch, after its records: Redis runs one
//! connection's commands in order, so an epoch that still reads as the one known means
//! every record of the pipeline was checked against the data Redis had before any loss;
//! a missing or different one means a record may have met an emptied Redis (see
//! `Shared::vouch`).

use crate::shared::conn::Conn;
use redis::RedisResult;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use tokio::sync::oneshot;

/// At most this many records in one pipeline; more wait for the next.
const MAX_BATCH: usize = 512;

/// At most this many turns of the runtime gather one pipeline. 4 and 8 gave the same
/// pipeline depth under load (about 17 records at 64 connections on 2 cores, against 13
/// with a single yield).
const GATHER_TURNS: usize = 4;

/// One record: its set (the key's signatures with one timestamp), its member (the
/// signature's hash), how long the set must live, and where its answer goes (true:
/// recorded now, false: it was there already).
struct Pending {
    set: String,
    member: [u8; 16],
    ttl_ms: u64,
    answer: oneshot::Sender<RedisResult<Recorded>>,
}

/// One record's answer.
#[derive(Debug, Clone)]
pub struct Recorded {
    /// Recorded now (false: it was there already, a replay).
    pub added: bool,
    /// The fleet's epoch as read after the record (`None`: no epoch, Redis lost it).
    pub epoch: Option<Arc<str>>,
}

/// The records of one worker waiting for their pipeline.
pub struct Batcher {
    queue: Mutex<Queue>,
    /// The fleet's epoch key, read at the end of each pipeline.
    epoch_key: String,
}

#[derive(Default)]
struct Queue {
    pending: Vec<Pending>,
    /// A flusher task is on its way for what is queued.
    flushing: bool,
}

impl Batcher {
    pub fn new(epoch_key: String) -> Batcher {
        Batcher { queue: Mutex::default(), epoch_key }
    }

    /// Adds `member` to `set`, which lives `ttl_ms` more, on `conn` along with the records
    /// queued in this turn.
    pub async fn record(
        self: &Arc<Self>,
        conn: &Conn,
        set: String,
        member: [u8; 16],
        ttl_ms: u64,
    ) -> RedisResult<Recorded> {
        let (answer, rx) = oneshot::channel();
        let start = {
            let mut q = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
            q.pending.push(Pending { set, member, ttl_ms, answer });
            !std::mem::replace(&mut q.flushing, true)
        };
        if start {
            tokio::spawn(self.clone().flush(conn.clone()));
        }
        rx.await.unwrap_or_else(|_| {
            Err(redis::RedisError::from((redis::ErrorKind::Io, "signature record dropped before its answer")))
        })
    }

    /// Sends what is queued, in pipelines of [`MAX_BATCH`], until the queue is empty.
    async fn flush(self: Arc<Self>, mut conn: Conn) {
        loop {
            let mut seen = {
                let mut q = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
                if q.pending.is_empty() {
                    q.flushing = false;
                    return;
                }
                q.pending.len()
            };
            // Let the other requests that are ready in this turn queue theirs first, and
            // under load the next turns' too: yield again while a turn adds records.
            for _ in 0..GATHER_TURNS {
                tokio::task::yield_now().await;
                let n = self.queue.lock().unwrap_or_else(PoisonError::into_inner).pending.len();
                if n == seen || n >= MAX_BATCH {
                    break;
                }
                seen = n;
            }
            let batch: Vec<Pending> = {
                let mut q = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
                let n = q.pending.len().min(MAX_BATCH);
                q.pending.drain(..n).collect()
            };
            let mut pipe = redis::pipe();
            for p in &batch {
                pipe.cmd("SADD").arg(&p.set).arg(&p.member[..]);
            }
            // One `PEXPIRE` per set, after its members: the set may be new. Every batch
            // that adds to a set sets its expiry again, to the end of the window plus the
            // clock slack by the clock of the gateway that adds last, so no set lives
            // without an expiry.
            let mut sets: HashMap<&str, u64> = HashMap::with_capacity(batch.len());
            for p in &batch {
                let ttl = sets.entry(&p.set).or_default();
                *ttl = (*ttl).max(p.ttl_ms);
            }
            for (set, ttl_ms) in sets {
                pipe.cmd("PEXPIRE").arg(set).arg(ttl_ms).ignore();
            }
            pipe.cmd("GET").arg(&self.epoch_key);
            let replies: RedisResult<(Vec<i64>, Option<String>)> =
                conn.pipeline::<Vec<redis::Value>>(&pipe).await.and_then(|mut v| {
                    let epoch: Option<String> = match v.pop() {
                        Some(e) => redis::from_redis_value(e)?,
                        None => None,
                    };
                    Ok((redis::from_redis_value(redis::Value::Array(v))?, epoch))
                });
            match replies {
                Ok((replies, epoch)) if replies.len() == batch.len() => {
                    let epoch: Option<Arc<str>> = epoch.map(Arc::from);
                    for (p, added) in batch.into_iter().zip(replies) {
                        let _ = p.answer.send(Ok(Recorded { added: added == 1, epoch: epoch.clone() }));
                    }
                }
                Ok(_) => {
                    for p in batch {
                        let e =
                            redis::RedisError::from((redis::ErrorKind::Parse, "pipeline answered a different count"));
                        let _ = p.answer.send(Err(e));
                    }
                }
                Err(e) => {
                    for p in batch {
                        let _ = p.answer.send(Err(e.clone()));
                    }
                }
            }
        }
    }
}
