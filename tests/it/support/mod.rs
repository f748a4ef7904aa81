//! The harness: a recording upstream, an in-process gateway, the real binary, and clients
//! (pooled h1, TLS h1/h2, raw TCP for bytes no well-behaved client would send).

pub mod client;
pub mod creds;
pub mod gateway;
pub mod postgres;
pub mod pki;
pub mod process;
pub mod raw;
pub mod redis;
pub mod upstream;

use bytes::Bytes;
use http::{HeaderMap, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use std::convert::Infallible;
use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

/// How long any single network step may take before the test fails instead of hanging.
/// Generous: CI machines have 2 cores and run tests in parallel.
pub const STEP: Duration = Duration::from_secs(20);

/// Runs `fut`, failing the test with `what` if it takes longer than `limit`.
pub async fn within<T>(limit: Duration, what: &str, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(limit, fut).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {limit:?}: {what}"),
    }
}

/// Reads a server's output until a line contains `ready`, failing the test (with what
/// it printed) if the output ends first or takes longer than [`STEP`]; then keeps
/// draining it, so that the server never blocks on a full pipe.
pub async fn await_ready_line(out: impl tokio::io::AsyncRead + Unpin + Send + 'static, ready: &str, what: &str) {
    use tokio::io::AsyncBufReadExt;
    let mut lines = tokio::io::BufReader::new(out).lines();
    let mut seen = String::new();
    let found = within(STEP, what, async {
        while let Ok(Some(line)) = lines.next_line().await {
            seen.push_str(&line);
            seen.push('\n');
            if line.contains(ready) {
                return true;
            }
        }
        false
    })
    .await;
    assert!(found, "{what}: it stopped first:\n{seen}");
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
}

/// Starts a server for the whole test binary: on a runtime of its own that lives as long
/// as the binary (each test's runtime ends with its test; a shared server must outlive
/// them all). `start` gives the server and its port; the port is returned. Callers keep
/// it in a `tokio::sync::OnceCell`, so that one server is started.
pub fn outliving_the_tests<S, Fut>(start: impl FnOnce() -> Fut + Send + 'static) -> u16
where
    Fut: Future<Output = (u16, S)>,
{
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let (port, server) = start().await;
            tx.send(port).unwrap();
            std::future::pending::<()>().await;
            drop(server);
        });
    });
    rx.recv().unwrap()
}

/// Stops process `pid` with `signal` and removes `dir` when this test binary exits, however
/// it exits (a panic, `std::process::exit`, a kill): a shell blocks reading a pipe whose
/// only writer is this process, and the kernel closes it then. For the servers a whole
/// binary shares, which nothing drops: without it each `cargo test` left a PostgreSQL
/// running and its data directory (about 300 MB) in the temp dir.
pub fn reap_at_exit(pid: u32, signal: &str, dir: &std::path::Path) {
    // After the signal, wait (at most 10 s) until the process is gone or a zombie (its
    // parent, this process, is gone too) before removing what it may still write to.
    let script = r#"read _; kill -"$1" "$2" 2>/dev/null
i=0
while s=$(sed 's/.*) //' /proc/"$2"/stat 2>/dev/null | cut -c1) && [ -n "$s" ] && [ "$s" != Z ] && [ "$i" -lt 100 ]; do
  sleep 0.1; i=$((i + 1))
done
rm -rf "$3""#;
    let mut reaper = std::process::Command::new("sh")
        .args(["-c", script, "reaper", signal, &pid.to_string()])
        .arg(dir)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Never written, never closed: its end is this process's exit (std opens it CLOEXEC, so
    // no other child holds a copy). The shell outlives this process, so nothing here waits
    // for it; whoever inherits it does.
    std::mem::forget(reaper.stdin.take());
    std::mem::forget(reaper);
}

/// Polls `cond` every 20 ms until it holds, failing the test after `limit`.
pub async fn eventually(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    within(limit, what, async {
        while !cond() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
}

/// A port nothing listens on right now: bound on 127.0.0.1:0, then released.
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    l.local_addr().unwrap().port()
}

/// True when a TCP connection to `addr` is refused.
pub async fn connection_refused(addr: SocketAddr) -> bool {
    match tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(addr)).await {
        Ok(Err(e)) => e.kind() == std::io::ErrorKind::ConnectionRefused,
        _ => false,
    }
}

/// A complete response, whichever client received it.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub version: Version,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    /// The body as UTF-8 text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body parsed as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("body is not JSON ({e}): {}", self.text()))
    }

    /// One header as text (panics when absent or repeated).
    pub fn header(&self, name: &str) -> &str {
        let mut all = self.headers.get_all(name).iter();
        let v = all.next().unwrap_or_else(|| panic!("response has no {name} header: {:?}", self.headers));
        assert!(all.next().is_none(), "response has several {name} headers: {:?}", self.headers);
        v.to_str().unwrap()
    }
}

/// Asserts a docs/errors.md error response exactly: the status, `Content-Type: application/json`,
/// an `X-Request-Id` header, and the body byte for byte with the fields in the documented order and
/// the same request id. Returns the request id.
pub fn assert_error(reply: &Reply, status: u16, code: &str, message: &str) -> String {
    assert_eq!(reply.status.as_u16(), status, "status; body: {}", reply.text());
    assert_eq!(reply.header("content-type"), "application/json");
    let id = reply.header("x-request-id").to_string();
    assert!(!id.is_empty(), "empty X-Request-Id");
    let expected = format!(
        "{{\"success\":false,\"message\":{},\"code\":{},\"request_id\":{}}}",
        serde_json::Value::from(message),
        serde_json::Value::from(code),
        serde_json::Value::from(id.as_str()),
    );
    assert_eq!(reply.text(), expected);
    id
}

/// Asserts a docs/errors.md 401 exactly (see [`assert_error`]) with the `WWW-Authenticate`
/// challenge README documents. Returns the request id.
pub fn assert_unauthorized(reply: &Reply, message: &str) -> String {
    let id = assert_error(reply, 401, "authentication_error", message);
    assert_eq!(reply.header("www-authenticate"), "Bearer realm=\"gatehouse\"");
    id
}

/// A request or response body of `len` bytes made up on the fly, 64 KiB at a time, so
/// that a test never holds a large body in memory.
pub struct Generated {
    remaining: u64,
    chunk: Bytes,
    announce_length: bool,
}

impl Generated {
    /// `len` bytes with an exact size hint (sent with `Content-Length`).
    pub fn sized(len: u64) -> Self {
        Generated { remaining: len, chunk: Bytes::from(vec![b'x'; 64 * 1024]), announce_length: true }
    }

    /// `len` bytes of unknown length to the sender (HTTP/1.1 sends it chunked).
    pub fn streamed(len: u64) -> Self {
        Generated { announce_length: false, ..Generated::sized(len) }
    }
}

impl Body for Generated {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.remaining == 0 {
            return Poll::Ready(None);
        }
        let n = self.remaining.min(self.chunk.len() as u64) as usize;
        self.remaining -= n as u64;
        Poll::Ready(Some(Ok(Frame::data(self.chunk.slice(..n)))))
    }

    fn is_end_stream(&self) -> bool {
        self.remaining == 0
    }

    fn size_hint(&self) -> SizeHint {
        if self.announce_length { SizeHint::with_exact(self.remaining) } else { SizeHint::default() }
    }
}

pub const MIB: u64 = 1024 * 1024;
