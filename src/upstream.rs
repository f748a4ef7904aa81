//! [forward] The upstream connections of one connection worker: HTTP/1.1 connections
//! kept alive and reused, last-in first-out, per target.
//!
//! Each worker has its own pool on its own single-threaded runtime (see `listen.rs`), so
//! this is deliberately simpler than hyper-util's shared pooled client: no dispatch task
//! per request, no cross-thread wake-up, no background task waiting for a connection to
//! become reusable. A connection goes back to the pool when its response body has been
//! read to the end (see [`Release`]); a response dropped half-read closes it. Idle
//! connections are kept per target slot (see `route.rs`): an index, not a hashed name.

use crate::body::Body;
use crate::config::Limits;
use crate::route::Target;
use http::uri::Authority;
use http::{Request, Response};
use http_body::Body as _;
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};
use tokio::net::{TcpSocket, TcpStream};

/// How long an unused connection is kept.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Unused connections kept per target and worker; more are closed when released.
const MAX_IDLE_PER_TARGET: usize = 1024;

/// Why a request could not be sent or answered.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// No connection could be opened: nothing was sent, and here is the request back
    /// (another target may take it).
    #[error("cannot connect to {authority}: {reason}")]
    Connect { authority: Authority, reason: String, request: Box<Request<Body>> },
    /// The connection failed while sending or awaiting the answer.
    #[error("upstream connection failed: {0}")]
    Http(#[from] hyper::Error),
}

/// A worker's pool of upstream connections.
#[derive(Debug)]
pub struct Upstream {
    /// Idle connections by target slot, most recently used last.
    idle: Mutex<Vec<Vec<Idle>>>,
    connect_timeout: Duration,
}

#[derive(Debug)]
struct Idle {
    sender: http1::SendRequest<Body>,
    since: Instant,
}

/// A connection lent to one request, given back by [`Release::finish`] once the
/// response has been read to the end.
#[derive(Debug)]
pub struct Release {
    pool: Arc<Upstream>,
    slot: usize,
    sender: http1::SendRequest<Body>,
}

impl Release {
    /// Puts the connection back for the next request (closed when the pool is full).
    pub fn finish(self) {
        let Release { pool, slot, sender } = self;
        if sender.is_closed() {
            return;
        }
        let mut idle = pool.idle.lock().unwrap_or_else(PoisonError::into_inner);
        if idle.len() <= slot {
            idle.resize_with(slot + 1, Vec::new);
        }
        let list = &mut idle[slot];
        if list.len() < MAX_IDLE_PER_TARGET {
            list.push(Idle { sender, since: Instant::now() });
        }
    }
}

impl Upstream {
    /// An empty pool.
    pub fn new(limits: &Limits) -> Arc<Upstream> {
        Arc::new(Upstream { idle: Mutex::new(Vec::new()), connect_timeout: limits.upstream_connect_timeout })
    }

    /// Sends `req` (origin-form URI, `Host` set) to `target` on a pooled connection, or a
    /// new one.
    ///
    /// A pooled connection can die under the request: the upstream closed it while it was
    /// idle (its keep-alive timeout, a restart) and the close crossed our request on the
    /// wire. The request is then sent again on a new connection when that is safe: when
    /// hyper hands it back unsent, whatever the method; when it went out, only for a
    /// bodiless GET, HEAD or OPTIONS (nginx's `proxy_next_upstream` rule).
    ///
    /// The response comes with the connection to give back when its body is done; `None`
    /// for a protocol switch, whose connection now belongs to the upgraded stream.
    pub async fn send(
        self: &Arc<Self>,
        target: &Target,
        mut req: Request<Body>,
    ) -> Result<(Response<Incoming>, Option<Release>), SendError> {
        if let Some(mut sender) = self.checkout(target.slot).await {
            let again = is_safe_to_resend(&req).then(|| head_of(&req));
            match sender.try_send_request(req).await {
                Ok(res) => return Ok(self.lend(target, sender, res)),
                Err(mut e) => match (e.take_message(), again) {
                    (Some(back), _) => req = back,
                    (None, Some(head)) => {
                        tracing::debug!(error = %e.error(), "pooled upstream connection failed; sending again on a new one");
                        req = head;
                    }
                    (None, None) => return Err(SendError::Http(e.into_error())),
                },
            }
        }
        let mut sender = match self.connect(&target.authority).await {
            Ok(sender) => sender,
            Err(reason) => {
                return Err(SendError::Connect { authority: target.authority.clone(), reason, request: Box::new(req) });
            }
        };
        let res = sender.send_request(req).await?;
        Ok(self.lend(target, sender, res))
    }

    fn lend(
        self: &Arc<Self>,
        target: &Target,
        sender: http1::SendRequest<Body>,
        res: Response<Incoming>,
    ) -> (Response<Incoming>, Option<Release>) {
        let release = (res.status() != http::StatusCode::SWITCHING_PROTOCOLS).then(|| Release {
            pool: self.clone(),
            slot: target.slot,
            sender,
        });
        (res, release)
    }

    /// The most recently used open connection to the target in `slot`, ready for a request.
    async fn checkout(&self, slot: usize) -> Option<http1::SendRequest<Body>> {
        loop {
            let mut idle = {
                let mut lists = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
                lists.get_mut(slot)?.pop()?
            };
            if idle.since.elapsed() < IDLE_TIMEOUT && idle.sender.ready().await.is_ok() {
                return Some(idle.sender);
            }
            // Closed or stale: dropping the sender lets its connection task end.
        }
    }

    /// Opens a new connection and starts its task on this worker's runtime; why not, when
    /// it cannot.
    async fn connect(&self, authority: &Authority) -> Result<http1::SendRequest<Body>, String> {
        let stream = tokio::time::timeout(self.connect_timeout, open(authority))
            .await
            .map_err(|_| format!("timed out after {:?}", self.connect_timeout))?
            .map_err(|e| e.to_string())?;
        let (sender, conn) = http1::Builder::new().handshake(TokioIo::new(stream)).await.map_err(|e| e.to_string())?;
        tokio::spawn(async move {
            // `with_upgrades`: a 101 hands the socket to the WebSocket tunnel.
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(error = %e, "upstream connection closed with an error");
            }
        });
        Ok(sender)
    }

    /// Closes connections unused for longer than the idle timeout, and forgets closed ones.
    pub fn evict_idle(&self) {
        let mut lists = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        for list in lists.iter_mut() {
            list.retain(|i| i.since.elapsed() < IDLE_TIMEOUT && !i.sender.is_closed());
        }
    }

    /// Evicts idle connections every few seconds, for as long as this runtime runs.
    pub fn spawn_evictor(self: &Arc<Self>) {
        let pool = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(5));
            loop {
                tick.tick().await;
                match pool.upgrade() {
                    Some(p) => p.evict_idle(),
                    None => return,
                }
            }
        });
    }
}

/// A request that may be sent twice: safe method (RFC 9110 §9.2.1), no body. "No body"
/// is whatever has nothing to send, not only `Body::Empty`: a signed GET's body was read
/// for the signature check and is forwarded as an empty `Body::Full`.
fn is_safe_to_resend(req: &Request<Body>) -> bool {
    matches!(*req.method(), http::Method::GET | http::Method::HEAD | http::Method::OPTIONS)
        && req.body().is_end_stream()
}

/// A body-less copy of a request.
fn head_of(req: &Request<Body>) -> Request<Body> {
    let mut copy = Request::new(Body::Empty);
    *copy.method_mut() = req.method().clone();
    *copy.uri_mut() = req.uri().clone();
    *copy.version_mut() = req.version();
    *copy.headers_mut() = req.headers().clone();
    copy
}

/// Resolves `authority` and connects to the first address that accepts.
async fn open(authority: &Authority) -> std::io::Result<TcpStream> {
    let port = authority.port_u16().unwrap_or(80);
    // `[::1]` is an IPv6 literal; the resolver wants it without brackets.
    let host = authority.host().trim_start_matches('[').trim_end_matches(']');
    let mut last = None;
    for addr in tokio::net::lookup_host((host, port)).await? {
        let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
        socket.set_keepalive(true)?;
        match socket.connect(addr).await {
            Ok(stream) => {
                stream.set_nodelay(true)?;
                return Ok(stream);
            }
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, "no address")))
}
