//! \[forward\] A protocol switch (WebSocket) joined end to end: the client's upgraded
//! connection and the upstream's, byte for byte, until both sides have closed, neither
//! has sent anything for the idle time, or a shutdown's grace period is over.
//!
//! A tunnel stays inside every bound a connection has: it runs in its client
//! connection's task (`server/listen.rs`), so it holds that connection's `max_connections` slot
//! and its place in `gatehouse_open_connections` until it closes.

use crate::wire::upstream::Conn;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;

/// Bytes read from one side before they are written to the other.
const BUF: usize = 16 * 1024;

/// The two sides of a protocol switch the upstream agreed to.
#[derive(Debug)]
pub struct Switched {
    /// The client's side, handed over by hyper once the `101` is written.
    pub client: OnUpgrade,
    /// The upstream's connection and what it sent after its `101`.
    pub upstream: Conn,
}

/// Why a tunnel closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TunnelEnd {
    /// Both sides closed (or one closed and the other followed).
    Closed,
    /// Nothing either way for the idle time.
    Idle,
    /// A shutdown's grace period ended.
    Shutdown,
    /// A read or write failed, or the client's side never arrived.
    Failed,
}

impl TunnelEnd {
    /// The audit record's `reason`.
    pub fn reason(self) -> &'static str {
        match self {
            TunnelEnd::Closed => "tunnel_closed",
            TunnelEnd::Idle => "tunnel_idle",
            TunnelEnd::Shutdown => "tunnel_shutdown",
            TunnelEnd::Failed => "tunnel_error",
        }
    }
}

/// What a closed tunnel carried.
#[derive(Debug, Clone, Copy)]
pub struct Tunnelled {
    pub end: TunnelEnd,
    pub to_upstream: u64,
    pub to_client: u64,
}

/// Runs the tunnel to its end. `closing` is set when a shutdown's grace period is over.
pub async fn run(switched: Switched, idle: Duration, mut closing: watch::Receiver<bool>) -> Tunnelled {
    let mut t = Tunnelled { end: TunnelEnd::Failed, to_upstream: 0, to_client: 0 };
    let client = match switched.client.await {
        Ok(c) => c,
        Err(e) => {
            tracing::debug!(error = %e, "upgrade failed");
            return t;
        }
    };
    let (mut client_rd, mut client_wr) = tokio::io::split(TokioIo::new(client));
    let (mut upstream, early) = switched.upstream.into_parts();
    let (mut up_rd, mut up_wr) = tokio::io::split(&mut upstream);
    let start = Instant::now();
    // Milliseconds since `start` of the last byte either way, and the bytes each way:
    // read after the copies are cancelled (idle, shutdown), so kept outside them.
    let last = AtomicU64::new(0);
    let (up, down) = (AtomicU64::new(0), AtomicU64::new(0));
    let to_upstream = copy(&mut client_rd, &mut up_wr, &up, &last, start, &[]);
    let to_client = copy(&mut up_rd, &mut client_wr, &down, &last, start, &early);
    let idle_out = async {
        loop {
            let quiet = start.elapsed().saturating_sub(Duration::from_millis(last.load(Ordering::Relaxed)));
            if quiet >= idle {
                return;
            }
            tokio::time::sleep(idle - quiet).await;
        }
    };
    t.end = tokio::select! {
        // The first failure either way ends both; a clean end waits for both sides.
        r = async { tokio::try_join!(to_upstream, to_client) } => {
            if r.is_ok() { TunnelEnd::Closed } else { TunnelEnd::Failed }
        }
        () = idle_out => TunnelEnd::Idle,
        _ = closing.wait_for(|&c| c) => TunnelEnd::Shutdown,
    };
    t.to_upstream = up.load(Ordering::Relaxed);
    t.to_client = down.load(Ordering::Relaxed);
    t
}

/// Copies `first`, then everything `rd` gives, to `wr`, counting bytes and the time of
/// the last one; at the end of `rd`, shuts `wr` down (a WebSocket close on one side
/// reaches the other as the end of its stream).
async fn copy<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    rd: &mut R,
    wr: &mut W,
    count: &AtomicU64,
    last: &AtomicU64,
    start: Instant,
    first: &[u8],
) -> std::io::Result<()> {
    let mark = |n: usize| {
        count.fetch_add(n as u64, Ordering::Relaxed);
        last.store(start.elapsed().as_millis() as u64, Ordering::Relaxed);
    };
    if !first.is_empty() {
        wr.write_all(first).await?;
        wr.flush().await?;
        mark(first.len());
    }
    let mut buf = vec![0u8; BUF];
    loop {
        let n = rd.read(&mut buf).await?;
        if n == 0 {
            return wr.shutdown().await;
        }
        wr.write_all(&buf[..n]).await?;
        // A TLS upstream holds written bytes until flushed; plain TCP sends them at once.
        wr.flush().await?;
        mark(n);
    }
}
