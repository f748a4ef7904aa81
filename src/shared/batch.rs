//! Signature records of one connection worker, sent to Redis together: the `SET NX PX`
//! of every signed request that became ready in the same turn of the worker's runtime go
//! out as one pipeline (one write, one read, one wake-up of Redis) instead of one each.
//!
//! Why: on a small box Redis shares the cores with everything else, and a write to it per
//! request costs a wake-up of Redis and of this worker per request. Each request still
//! makes exactly one round trip and gets its own answer; what is saved is system calls
//! and context switches. A record waits at most one turn of the runtime (the flusher
//! yields once, so that the other requests ready now can add theirs).

use crate::shared::conn::Conn;
use redis::RedisResult;
use std::sync::{Arc, Mutex, PoisonError};
use tokio::sync::oneshot;

/// At most this many records in one pipeline; more wait for the next.
const MAX_BATCH: usize = 512;

/// One record: its key, its time to live, and where its answer goes (true: recorded now,
/// false: it was there already).
struct Pending {
    key: String,
    ttl_ms: u64,
    answer: oneshot::Sender<RedisResult<bool>>,
}

/// The records of one worker waiting for their pipeline.
#[derive(Default)]
pub struct Batcher {
    queue: Mutex<Queue>,
}

#[derive(Default)]
struct Queue {
    pending: Vec<Pending>,
    /// A flusher task is on its way for what is queued.
    flushing: bool,
}

impl Batcher {
    /// Records `key` for `ttl_ms` on `conn` along with the records queued in this turn.
    pub async fn record(self: &Arc<Self>, conn: &Conn, key: String, ttl_ms: u64) -> RedisResult<bool> {
        let (answer, rx) = oneshot::channel();
        let start = {
            let mut q = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
            q.pending.push(Pending { key, ttl_ms, answer });
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
        // Let the other requests that are ready in this turn queue theirs first.
        tokio::task::yield_now().await;
        loop {
            let batch: Vec<Pending> = {
                let mut q = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
                if q.pending.is_empty() {
                    q.flushing = false;
                    return;
                }
                let n = q.pending.len().min(MAX_BATCH);
                q.pending.drain(..n).collect()
            };
            let mut pipe = redis::pipe();
            for p in &batch {
                pipe.cmd("SET").arg(&p.key).arg("1").arg("NX").arg("PX").arg(p.ttl_ms);
            }
            let replies: RedisResult<Vec<Option<String>>> = conn.pipeline(&pipe).await;
            match replies {
                Ok(replies) if replies.len() == batch.len() => {
                    for (p, set) in batch.into_iter().zip(replies) {
                        let _ = p.answer.send(Ok(set.is_some()));
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
