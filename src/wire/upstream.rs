//! \[forward\] The upstream connections of one connection worker: HTTP/1.1 connections
//! kept alive and reused, last-in first-out, per target, and the exchange of one request
//! and its response on one of them.
//!
//! Each worker has its own pool on its own single-threaded runtime (see `server/listen.rs`), and
//! the request's own task writes the request and reads the response (`h1.rs` holds the
//! wire format): no connection task, no channel between tasks, no cross-thread wake-up
//! per request. A connection goes back to the pool when its response body has been read
//! to the end (see [`UpstreamBody`]); a response dropped half-read closes it. Idle
//! connections are kept per target slot (see `balance.rs`): an index, not a hashed name.

use crate::wire::balance::Target;
use crate::wire::body::{Body, BodyError};
use crate::wire::h1::{self, Decoded, Decoder, RequestFraming, WireError};
use bytes::{Bytes, BytesMut};
use http::uri::Authority;
use http::{HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use http_body::{Body as _, Frame, SizeHint};
use http_body_util::BodyExt;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, Interest};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::Sleep;

/// How long an unused connection is kept.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Unused connections kept per target and worker; more are closed when released.
const MAX_IDLE_PER_TARGET: usize = 1024;
/// Room made before each read of a response head, and of a response body.
const HEAD_READ: usize = 8 * 1024;
const BODY_READ: usize = 64 * 1024;
/// A request body frame at most this long is copied next to its chunk framing and sent
/// in one write; a longer one is written on its own.
const COALESCE: usize = 16 * 1024;
/// A body held whole (after an HMAC check) at most this long goes out with the head in
/// one write before the answer is read; a longer one is sent while the answer is awaited,
/// like a streamed body, so an early answer (413) still gets through.
const ONE_WRITE: usize = 64 * 1024;
/// `1xx` answers accepted before the final one.
const MAX_INFORMATIONAL: usize = 16;

/// Why a request could not be sent or answered.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// No connection could be opened: nothing was sent, and here is the request back
    /// (another target may take it).
    #[error("cannot connect to {authority}: {failure}")]
    Connect { authority: Authority, failure: ConnectFailure, request: Box<Request<Body>> },
    /// The client's request body failed while it was being sent.
    #[error("request body: {0}")]
    Body(BodyError),
    /// The connection failed while sending or awaiting the answer.
    #[error("upstream connection failed: {0}")]
    Io(#[from] std::io::Error),
    /// The upstream's answer is not valid HTTP/1.1.
    #[error("upstream response: {0}")]
    Wire(#[from] WireError),
    /// The HTTP/2 exchange failed (a reset stream, a GOAWAY after the request was sent, a
    /// protocol error).
    #[error("upstream HTTP/2: {0}")]
    H2(hyper::Error),
    /// Two HTTP/2 connections in a row closed before they could take the request.
    #[error("upstream HTTP/2 connection closed before the request could be sent")]
    H2Closed,
}

/// Why a connection could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ConnectFailure {
    /// No TCP connection (refused, unreachable, no address, timed out).
    #[error("{0}")]
    Tcp(String),
    /// The TLS handshake failed: the upstream's certificate did not verify (the reason
    /// names the check), or the upstream refused ours.
    #[error("TLS handshake: {0}")]
    Tls(String),
}

impl SendError {
    /// The TLS failure under this error, when there is one: a handshake that failed, or
    /// an alert the upstream sent after it (TLS 1.3 servers check a client certificate
    /// only once the client has finished its side of the handshake).
    pub fn tls_failure(&self) -> Option<String> {
        match self {
            SendError::Connect { failure: ConnectFailure::Tls(r), .. } => Some(r.clone()),
            SendError::Io(e) => e.get_ref()?.downcast_ref::<rustls::Error>().map(ToString::to_string),
            _ => None,
        }
    }
}

/// One HTTP/1.1 connection to an upstream, and what was read from it but not yet used.
#[derive(Debug)]
pub struct Conn {
    io: Io,
    buf: BytesMut,
}

/// The connection itself: plain TCP, or TLS over it (an `https://` upstream).
#[derive(Debug)]
pub enum Io {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl Conn {
    /// The connection and the bytes the upstream sent after the head (a protocol switch).
    pub fn into_parts(self) -> (Io, BytesMut) {
        (self.io, self.buf)
    }

    /// False when the upstream closed (or reset) the connection while it was idle, or sent
    /// anything unasked: bytes there would be read as the next request's response. Both
    /// reach the worker's epoll as read readiness; only then is the socket read
    /// (non-blocking) to tell stale readiness from real bytes, so an idle connection that
    /// saw nothing costs no system call.
    fn is_open(&mut self) -> bool {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let tcp = match &self.io {
            Io::Plain(s) => s,
            Io::Tls(s) => s.get_ref().0,
        };
        let readiness = std::pin::pin!(tcp.ready(Interest::READABLE)).poll(&mut cx);
        match readiness {
            Poll::Pending => true,
            Poll::Ready(Ok(r)) if !r.is_read_closed() && !r.is_error() => match &mut self.io {
                Io::Plain(s) => {
                    matches!(s.try_read(&mut [0u8; 1]), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
                }
                // TLS sends records of its own on an idle connection (a TLS 1.3 server's
                // session tickets): those are read and used up here, and only application
                // bytes, an alert or the end of the stream count as closed.
                Io::Tls(s) => {
                    let mut one = [0u8; 1];
                    let mut rb = tokio::io::ReadBuf::new(&mut one);
                    matches!(Pin::new(s).poll_read(&mut cx, &mut rb), Poll::Pending)
                }
            },
            Poll::Ready(_) => false,
        }
    }

    /// Reads more into the buffer; 0 at end of stream.
    fn poll_fill(&mut self, cx: &mut Context<'_>, room: usize) -> Poll<std::io::Result<usize>> {
        self.buf.reserve(room);
        match &mut self.io {
            Io::Plain(s) => loop {
                ready!(s.poll_read_ready(cx))?;
                match s.try_read_buf(&mut self.buf) {
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                    r => return Poll::Ready(r),
                }
            },
            Io::Tls(s) => std::pin::pin!(s.read_buf(&mut self.buf)).poll(cx),
        }
    }
}

impl AsyncRead for Io {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Io {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Io::Tls(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_flush(cx),
            Io::Tls(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tls(s) => Pin::new(s).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Io::Tls(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Io::Plain(s) => s.is_write_vectored(),
            Io::Tls(s) => s.is_write_vectored(),
        }
    }
}

/// What came back for a request.
#[derive(Debug)]
pub enum Answer {
    /// A response body, read from the connection as the client takes it.
    Body(UpstreamBody),
    /// `101 Switching Protocols`: the connection now belongs to the upgraded stream.
    Switched(Conn),
    /// An HTTP/2 response body (trailers included), as hyper's client reads it.
    H2(hyper::body::Incoming),
}

/// A worker's pool of upstream connections.
#[derive(Debug)]
pub struct Upstream {
    /// Idle connections by target slot, most recently used last.
    idle: Mutex<Vec<Vec<Idle>>>,
    /// The HTTP/2 connections, one per target (see `h2.rs`).
    pub(crate) h2: crate::wire::h2::H2Pool,
    pub(crate) connect_timeout: Duration,
    /// Longest response head accepted (`limits.max_header_bytes`, as for requests).
    pub(crate) max_head: usize,
}

#[derive(Debug)]
struct Idle {
    conn: Conn,
    since: Instant,
}

/// A failed exchange, and whether the upstream had sent anything back: if not, a safe
/// request may be sent again on another connection.
struct Failed {
    error: SendError,
    answered: bool,
}

impl From<SendError> for Failed {
    fn from(error: SendError) -> Failed {
        Failed { error, answered: false }
    }
}

impl From<std::io::Error> for Failed {
    fn from(e: std::io::Error) -> Failed {
        SendError::Io(e).into()
    }
}

impl Upstream {
    /// An empty pool.
    /// An empty pool. `connect_timeout`: for a new connection; `max_head`: the longest
    /// response head accepted (`limits.upstream_connect_timeout` and
    /// `limits.max_header_bytes` of the config).
    pub fn new(connect_timeout: Duration, max_head: usize) -> Arc<Upstream> {
        Arc::new(Upstream { idle: Mutex::new(Vec::new()), h2: Default::default(), connect_timeout, max_head })
    }

    /// Sends `req` (origin-form URI) with the gateway's `added` headers to `target`, whose
    /// `Host` it gets, on a pooled connection or a new one. `idle`: how long the response
    /// body may stall between reads.
    ///
    /// A pooled connection can die under the request: the upstream closed it while it was
    /// idle (its keep-alive timeout, a restart) and the close crossed our request on the
    /// wire. When nothing came back, a bodiless GET, HEAD or OPTIONS is then sent again on
    /// a new connection (nginx's `proxy_next_upstream` rule); anything else fails.
    pub async fn send(
        self: &Arc<Self>,
        target: &Target,
        req: Request<Body>,
        added: &[(HeaderName, HeaderValue)],
        idle: Duration,
    ) -> Result<(Response<()>, Answer), SendError> {
        if target.h2 {
            return self.send_h2(target, req, added).await;
        }
        let (pooled, conn) = match self.checkout(target.slot) {
            Some(conn) => (true, conn),
            None => match self.connect(target).await {
                Ok(conn) => (false, conn),
                Err(failure) => {
                    return Err(SendError::Connect {
                        authority: target.authority.clone(),
                        failure,
                        request: Box::new(req),
                    });
                }
            },
        };
        let (parts, body) = req.into_parts();
        let framing =
            h1::request_framing(&parts.method, &parts.headers, body.is_end_stream(), body.size_hint().exact());
        let mut head = Vec::with_capacity(1024);
        h1::write_request_head(
            &mut head,
            &h1::RequestHead {
                method: &parts.method,
                target: parts.uri.path_and_query().map_or("/", |pq| pq.as_str()),
                host: &target.host,
                headers: &parts.headers,
                added,
                framing,
            },
        );
        let resend = pooled && is_safe_to_resend(&parts.method, framing);
        let is_head = parts.method == Method::HEAD;
        match self.exchange(conn, &head, body, framing, is_head).await {
            Ok(head) => return Ok(self.answer(target, head, idle)),
            Err(f) if resend && !f.answered => {
                tracing::debug!(error = %f.error, "pooled upstream connection failed; sending again on a new one");
            }
            Err(f) => return Err(f.error),
        }
        let conn = match self.connect(target).await {
            Ok(conn) => conn,
            Err(failure) => {
                let request = Box::new(Request::from_parts(parts, Body::Empty));
                return Err(SendError::Connect { authority: target.authority.clone(), failure, request });
            }
        };
        let head = self.exchange(conn, &head, Body::Empty, framing, is_head).await.map_err(|f| f.error)?;
        Ok(self.answer(target, head, idle))
    }

    /// Writes the request and reads the response head; the connection comes back with it.
    async fn exchange(
        &self,
        mut conn: Conn,
        head: &[u8],
        body: Body,
        framing: RequestFraming,
        is_head: bool,
    ) -> Result<(Conn, h1::ResponseHead), Failed> {
        let max_head = self.max_head;
        let whole = matches!(&body, Body::Full(b)
            if framing != RequestFraming::Chunked && b.as_ref().map_or(0, Bytes::len) <= ONE_WRITE);
        let streamed = match body {
            // Nothing to stream (no body, or a small one held whole, as after an HMAC
            // check): the head and the body go out in one write, then the answer is read.
            Body::Empty => {
                conn.io.write_all(head).await?;
                conn.io.flush().await?;
                None
            }
            Body::Full(bytes) if whole => {
                let bytes = bytes.unwrap_or_default();
                let announced = if let RequestFraming::Length(n) = framing { n } else { 0 };
                if bytes.len() as u64 != announced {
                    let e = std::io::Error::other("request body is not the length its head announces");
                    return Err(SendError::Io(e).into());
                }
                if bytes.is_empty() {
                    conn.io.write_all(head).await?;
                } else {
                    let mut all = Vec::with_capacity(head.len() + bytes.len());
                    all.extend_from_slice(head);
                    all.extend_from_slice(&bytes);
                    conn.io.write_all(&all).await?;
                }
                // TLS holds what it could not write at once until flushed; TCP: a no-op.
                conn.io.flush().await?;
                None
            }
            body => Some(body),
        };
        let Some(body) = streamed else {
            let h = read_head(&mut conn.io, &mut conn.buf, max_head, is_head).await?;
            return Ok((conn, h));
        };
        // A streamed body is sent while the answer is awaited: an upstream may answer
        // (413, say) before it has read the whole body, and then stops reading it.
        let res = match &mut conn.io {
            Io::Plain(s) => {
                let (mut rd, mut wr) = s.split();
                send_and_read(&mut rd, &mut wr, &mut conn.buf, head, body, framing, max_head, is_head).await
            }
            Io::Tls(s) => {
                let (mut rd, mut wr) = tokio::io::split(s);
                send_and_read(&mut rd, &mut wr, &mut conn.buf, head, body, framing, max_head, is_head).await
            }
        };
        res.map(|h| (conn, h))
    }

    /// The response and its body (or the switched connection).
    fn answer(
        self: &Arc<Self>,
        target: &Target,
        (conn, head): (Conn, h1::ResponseHead),
        idle: Duration,
    ) -> (Response<()>, Answer) {
        let mut res = Response::new(());
        *res.status_mut() = head.status;
        *res.headers_mut() = head.headers;
        if head.status == StatusCode::SWITCHING_PROTOCOLS {
            return (res, Answer::Switched(conn));
        }
        let body = UpstreamBody {
            conn: Some(conn),
            decoder: Decoder::new(head.framing),
            reusable: head.keep_alive,
            pool: self.clone(),
            slot: target.slot,
            idle,
            timer: None,
        };
        (res, Answer::Body(body))
    }

    /// Puts a connection back for the next request (closed when the pool is full).
    fn release(&self, slot: usize, mut conn: Conn) {
        // The buffer's memory is shared with the response just read; an idle connection
        // keeps none.
        conn.buf = BytesMut::new();
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        if idle.len() <= slot {
            idle.resize_with(slot + 1, Vec::new);
        }
        let list = &mut idle[slot];
        if list.len() < MAX_IDLE_PER_TARGET {
            list.push(Idle { conn, since: Instant::now() });
        }
    }

    /// The most recently used open connection to the target in `slot`.
    fn checkout(&self, slot: usize) -> Option<Conn> {
        let mut lists = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        let list = lists.get_mut(slot)?;
        while let Some(mut idle) = list.pop() {
            if idle.since.elapsed() < IDLE_TIMEOUT && idle.conn.is_open() {
                return Some(idle.conn);
            }
            // Closed or stale: dropped, which closes it.
        }
        None
    }

    /// Opens a new connection (TCP, then TLS for an `https://` target, both within the
    /// connect timeout); why not, when it cannot.
    async fn connect(&self, target: &Target) -> Result<Conn, ConnectFailure> {
        Ok(Conn { io: self.connect_io(target).await?, buf: BytesMut::new() })
    }

    /// The connection itself (see [`Upstream::connect`]).
    pub(crate) async fn connect_io(&self, target: &Target) -> Result<Io, ConnectFailure> {
        let timed_out = || format!("timed out after {:?}", self.connect_timeout);
        let deadline = tokio::time::Instant::now() + self.connect_timeout;
        let tcp = tokio::time::timeout_at(deadline, open(&target.authority))
            .await
            .map_err(|_| ConnectFailure::Tcp(timed_out()))?
            .map_err(|e| ConnectFailure::Tcp(e.to_string()))?;
        let io = match &target.tls {
            None => Io::Plain(tcp),
            Some(tls) => {
                let shake = tls.connector.connect(tls.server_name.clone(), tcp);
                let stream = tokio::time::timeout_at(deadline, shake)
                    .await
                    .map_err(|_| ConnectFailure::Tls(timed_out()))?
                    .map_err(|e| ConnectFailure::Tls(e.to_string()))?;
                Io::Tls(Box::new(stream))
            }
        };
        Ok(io)
    }

    /// Closes connections unused for longer than the idle timeout, and forgets closed ones.
    pub fn evict_idle(&self) {
        let mut lists = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        for list in lists.iter_mut() {
            list.retain_mut(|i| i.since.elapsed() < IDLE_TIMEOUT && i.conn.is_open());
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

/// Streams the request while its answer is awaited: an upstream may answer (413, say)
/// before it has read the whole body, and then stops reading it.
#[allow(clippy::too_many_arguments)]
async fn send_and_read<R, W>(
    rd: &mut R,
    wr: &mut W,
    buf: &mut BytesMut,
    head: &[u8],
    body: Body,
    framing: RequestFraming,
    max_head: usize,
    is_head: bool,
) -> Result<h1::ResponseHead, Failed>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let send = send_body(wr, head, body, framing);
    let read = read_head(rd, buf, max_head, is_head);
    tokio::pin!(send, read);
    let mut sent = None;
    let res = loop {
        tokio::select! {
            biased;
            r = &mut read => break r,
            s = &mut send, if sent.is_none() => match s {
                // The client's own body failed: that is the error, whatever the
                // upstream does next.
                Err(SendError::Body(e)) => return Err(SendError::Body(e).into()),
                other => sent = Some(other),
            },
        }
    };
    match (res, sent) {
        (Ok(h), Some(Ok(()))) => Ok(h),
        // Answered before the request was all sent: the connection is mid-request.
        (Ok(mut h), _) => {
            h.keep_alive = false;
            Ok(h)
        }
        (Err(f), Some(Err(e))) if !f.answered => Err(e.into()),
        (Err(f), _) => Err(f),
    }
}

/// Writes the request head and streams the body after it, framed as `framing` says. The
/// head goes out with the first piece of body: one write instead of two.
async fn send_body<W: AsyncWrite + Unpin>(
    wr: &mut W,
    head: &[u8],
    mut body: Body,
    framing: RequestFraming,
) -> Result<(), SendError> {
    let (chunked, declared) = match framing {
        // GET, HEAD or CONNECT with a body of unknown length: sent without it, as hyper does.
        RequestFraming::None => {
            wr.write_all(head).await?;
            return Ok(wr.flush().await?);
        }
        RequestFraming::Chunked => (true, None),
        RequestFraming::Length(n) => (false, Some(n)),
    };
    let mut out = Vec::with_capacity(head.len() + 64);
    out.extend_from_slice(head);
    let mut sent = 0u64;
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame.map_err(SendError::Body)?.into_data() else { continue };
        if data.is_empty() {
            continue;
        }
        sent += data.len() as u64;
        if declared.is_some_and(|n| sent > n) {
            // Never more bytes than the length the upstream was told: what followed
            // would be read as another request.
            return Err(SendError::Io(std::io::Error::other("request body longer than its Content-Length")));
        }
        if chunked {
            h1::write_chunk_size(&mut out, data.len());
        }
        if data.len() <= COALESCE {
            out.extend_from_slice(&data);
            if chunked {
                out.extend_from_slice(b"\r\n");
            }
            wr.write_all(&out).await?;
        } else {
            wr.write_all(&out).await?;
            wr.write_all(&data).await?;
            if chunked {
                wr.write_all(b"\r\n").await?;
            }
        }
        out.clear();
        // Each piece leaves when it comes (TLS would hold it until flushed).
        wr.flush().await?;
    }
    if declared.is_some_and(|n| sent != n) {
        return Err(SendError::Io(std::io::Error::other("request body shorter than its Content-Length")));
    }
    if chunked {
        out.extend_from_slice(b"0\r\n\r\n");
    }
    if !out.is_empty() {
        wr.write_all(&out).await?;
    }
    Ok(wr.flush().await?)
}

/// Reads until a final response head is complete (1xx other than 101 are skipped: the
/// answer follows them).
async fn read_head<R: AsyncRead + Unpin>(
    rd: &mut R,
    buf: &mut BytesMut,
    max_head: usize,
    is_head: bool,
) -> Result<h1::ResponseHead, Failed> {
    let mut answered = false;
    let mut informational = 0;
    loop {
        match h1::parse_response_head(buf, max_head, is_head) {
            Ok(Some(h)) if h.status.is_informational() && h.status != StatusCode::SWITCHING_PROTOCOLS => {
                // 100 Continue, 103 Early Hints: a few, then the answer; not without end.
                informational += 1;
                if informational > MAX_INFORMATIONAL {
                    return Err(Failed { error: WireError::Head.into(), answered: true });
                }
                continue;
            }
            Ok(Some(h)) => return Ok(h),
            Ok(None) => {}
            Err(e) => return Err(Failed { error: e.into(), answered: true }),
        }
        buf.reserve(HEAD_READ);
        match rd.read_buf(buf).await {
            Ok(0) => return Err(Failed { error: WireError::Closed.into(), answered }),
            Ok(_) => answered = true,
            Err(e) => return Err(Failed { error: e.into(), answered }),
        }
    }
}

/// Reads one whole response off `rd` as an exchange does: the 1xx answers skipped (at
/// most [`MAX_INFORMATIONAL`]), the final head, then the body decoded to its end as
/// [`UpstreamBody`] decodes it (without the pool and the idle timer). Not used by the
/// gateway: the differential tests (`tests/it/differential.rs`) hold the upstream side
/// against hyper's client with it, through the same parser and decoder.
#[doc(hidden)]
pub async fn read_response<R: AsyncRead + Unpin>(
    rd: &mut R,
    max_head: usize,
    is_head: bool,
) -> Result<(h1::ResponseHead, BytesMut), SendError> {
    let mut buf = BytesMut::new();
    let head = read_head(rd, &mut buf, max_head, is_head).await.map_err(|f| f.error)?;
    let mut decoder = Decoder::new(head.framing);
    let mut body = BytesMut::new();
    let mut eof = false;
    loop {
        match decoder.decode(&mut buf, eof)? {
            Decoded::Data(data) => body.extend_from_slice(&data),
            Decoded::End => return Ok((head, body)),
            Decoded::More if eof => return Err(WireError::Closed.into()),
            Decoded::More => {
                buf.reserve(BODY_READ);
                eof = rd.read_buf(&mut buf).await? == 0;
            }
        }
    }
}

/// A request that may be sent twice: safe method (RFC 9110 §9.2.1), nothing to send after
/// the head. A signed GET's body was read for the signature check and is empty: it counts.
fn is_safe_to_resend(method: &Method, framing: RequestFraming) -> bool {
    matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS) && framing == RequestFraming::None
}

/// An upstream response body, read from its connection as the client takes it, with an
/// idle timeout between reads. It gives the connection back to the pool once read to the
/// end; dropped before that, it closes it (unread bytes would be read as the next
/// response).
#[derive(Debug)]
pub struct UpstreamBody {
    conn: Option<Conn>,
    decoder: Decoder,
    /// The upstream allows another request on this connection after this response.
    reusable: bool,
    pool: Arc<Upstream>,
    slot: usize,
    idle: Duration,
    // Created only when the body first has to wait: most responses arrive whole with
    // their head and never pay for a timer.
    timer: Option<Pin<Box<Sleep>>>,
}

impl UpstreamBody {
    /// Gives the connection back when the body is done and nothing follows it.
    fn finish(&mut self) {
        if let Some(conn) = self.conn.take()
            && self.reusable
            && self.decoder.is_done()
            && conn.buf.is_empty()
        {
            self.pool.release(self.slot, conn);
        }
    }

    /// Ends the body with `e`; the connection is closed.
    fn fail(&mut self, e: BodyError) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        self.conn = None;
        Poll::Ready(Some(Err(e)))
    }
}

impl http_body::Body for UpstreamBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        let mut eof = false;
        loop {
            let Some(conn) = this.conn.as_mut() else { return Poll::Ready(None) };
            match this.decoder.decode(&mut conn.buf, eof) {
                Ok(Decoded::Data(data)) => {
                    if let Some(t) = this.timer.as_mut() {
                        t.as_mut().reset(tokio::time::Instant::now() + this.idle);
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Ok(Decoded::End) => {
                    this.finish();
                    return Poll::Ready(None);
                }
                Ok(Decoded::More) if !eof => {}
                Ok(Decoded::More) => return this.fail(BodyError::UpstreamWire(WireError::Closed)),
                Err(e) => return this.fail(BodyError::UpstreamWire(e)),
            }
            match conn.poll_fill(cx, BODY_READ) {
                Poll::Ready(Ok(0)) => eof = true,
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(e)) => return this.fail(BodyError::UpstreamIo(e)),
                Poll::Pending => {
                    let idle = this.idle;
                    let timer = this.timer.get_or_insert_with(|| Box::pin(tokio::time::sleep(idle)));
                    ready!(timer.as_mut().poll(cx));
                    return this.fail(BodyError::UpstreamStalled);
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.decoder.is_done()
    }

    fn size_hint(&self) -> SizeHint {
        self.decoder.remaining().map_or_else(SizeHint::default, SizeHint::with_exact)
    }
}

impl Drop for UpstreamBody {
    fn drop(&mut self) {
        // Read to the end (or empty from the start, e.g. HEAD, 204) but not polled to
        // its end: still reusable.
        self.finish();
    }
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
