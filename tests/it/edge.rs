//! The edge against hostile clients and hostile upstreams: protocol switches (h2c hidden
//! in `Upgrade`, a `101` to something else), tunnels inside every bound, response bodies
//! that fail after their head, a client's broken body, HTTP/2 to HTTP/1.1 conversion,
//! transfer codings nobody removes, path-override headers and the smaller ones. The
//! upstream is scripted byte by byte; clients are raw sockets or h2 over TLS.

use crate::observability_support::value;
use crate::support::client::{H1, ReqBody, full, tls_connect};
use crate::support::creds::Creds;
use crate::support::gateway::{RouteSpec, TestGateway};
use crate::support::raw::{Closed, RawConn, read_head_end};
use crate::support::upstream::TestUpstream;
use crate::support::{STEP, assert_error, eventually, within};
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const ADMIN: &str = "edge-admin-token-0123456789abcdef";

/// What the scripted upstream does after writing its answer.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Then {
    /// Closes the connection.
    Close,
    /// Echoes whatever arrives until the gateway closes (a WebSocket after `101`).
    Echo,
    /// Keeps the connection open, reads whatever arrives, writes nothing.
    Hold,
}

/// An upstream that answers every request head with `answer`, then does `then`. It
/// records the heads it read, the bytes that came after them, and how many of its
/// connections the gateway closed.
struct Scripted {
    addr: SocketAddr,
    heads: Arc<Mutex<Vec<String>>>,
    after: Arc<Mutex<Vec<u8>>>,
    closed: Arc<AtomicUsize>,
}

impl Scripted {
    async fn start(answer: &[u8], then: Then) -> Scripted {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let s = Scripted { addr, heads: Arc::default(), after: Arc::default(), closed: Arc::new(AtomicUsize::new(0)) };
        let (heads, after, closed) = (s.heads.clone(), s.after.clone(), s.closed.clone());
        let answer = answer.to_vec();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (heads, after, closed, answer) = (heads.clone(), after.clone(), closed.clone(), answer.clone());
                tokio::spawn(serve(stream, answer, then, heads, after, closed));
            }
        });
        s
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn heads(&self) -> Vec<String> {
        self.heads.lock().unwrap().clone()
    }

    fn after(&self) -> Vec<u8> {
        self.after.lock().unwrap().clone()
    }

    fn closed(&self) -> usize {
        self.closed.load(Ordering::SeqCst)
    }
}

async fn serve(
    mut stream: TcpStream,
    answer: Vec<u8>,
    then: Then,
    heads: Arc<Mutex<Vec<String>>>,
    after: Arc<Mutex<Vec<u8>>>,
    closed: Arc<AtomicUsize>,
) {
    let mut buf = Vec::new();
    let Some(end) = read_head_end(&mut stream, &mut buf).await else { return };
    let mut chunk = [0u8; 16 * 1024];
    heads.lock().unwrap().push(String::from_utf8_lossy(&buf[..end]).into_owned());
    after.lock().unwrap().extend_from_slice(&buf[end..]);
    if stream.write_all(&answer).await.is_err() || then == Then::Close {
        return;
    }
    loop {
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => {
                closed.fetch_add(1, Ordering::SeqCst);
                return;
            }
            Ok(n) => {
                if then == Then::Echo {
                    if stream.write_all(&chunk[..n]).await.is_err() {
                        return;
                    }
                } else {
                    after.lock().unwrap().extend_from_slice(&chunk[..n]);
                }
            }
        }
    }
}

/// A gateway with one route to `up` and an admin listener; `limits` as `(name, value)`.
async fn gateway(up: &Scripted, limits: &[(&str, &str)], timeout: Option<&str>) -> TestGateway {
    let mut route = RouteSpec::new("all", "/").upstream_url(&up.url());
    if let Some(t) = timeout {
        route = route.timeout(t);
    }
    let mut b = TestGateway::builder().route(route).admin(ADMIN);
    for (k, v) in limits {
        b = b.limit(k, v);
    }
    b.start().await
}

async fn metrics(gw: &TestGateway) -> String {
    gw.admin().get("/metrics").await.text()
}

const SWITCHED: &[u8] = b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n";

fn upgrade_request(path: &str, upgrade_lines: &str) -> Vec<u8> {
    format!(
        "GET {path} HTTP/1.1\r\nHost: gw.test\r\nConnection: Upgrade\r\n{upgrade_lines}\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    .into_bytes()
}

/// Reads one response head off a raw connection (a `101` has no body to read).
async fn read_head(conn: &mut RawConn) -> String {
    let mut head = Vec::new();
    within(STEP, "response head", async {
        while !head.ends_with(b"\r\n\r\n") {
            head.extend(conn.read_exact(1).await);
        }
    })
    .await;
    String::from_utf8(head).unwrap()
}

/// `Upgrade: websocket` plus a second `Upgrade: h2c` line: only `websocket` goes
/// upstream, and an upstream that switches to h2c anyway gets no tunnel: the client gets
/// the documented 502 and the upstream's connection is closed with nothing sent after the head.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_hidden_in_a_second_upgrade_line_never_reaches_the_upstream_and_its_101_is_a_502() {
    let up =
        Scripted::start(b"HTTP/1.1 101 Switching Protocols\r\nupgrade: h2c\r\nconnection: upgrade\r\n\r\n", Then::Hold)
            .await;
    let gw = gateway(&up, &[], None).await;
    let mut conn = RawConn::connect(gw.addr()).await;
    conn.send(&upgrade_request("/ws", "Upgrade: websocket\r\nUpgrade: h2c\r\n")).await;
    let res = conn.read_response().await;
    assert_error(&res, 502, "upstream_error", "Upstream service is unavailable");
    // What a client would send next, as h2c, must reach no upstream.
    let _ = conn.try_send(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await;
    eventually(STEP, "the upstream's connection to be closed", || up.closed() == 1).await;
    let head = up.heads().pop().unwrap().to_ascii_lowercase();
    assert!(!head.contains("h2c"), "h2c reached the upstream: {head}");
    assert_eq!(head.matches("upgrade: websocket").count(), 1, "{head}");
    assert!(up.after().is_empty(), "the upstream got bytes after the head: {:?}", up.after());
}

/// `h2c` in any position or spelling, alone or beside `websocket`, is dropped: alone, the
/// request goes on as a plain one (no `Upgrade`, no `Connection: upgrade`); beside
/// `websocket`, only `Upgrade: websocket` goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_in_any_spelling_is_dropped_from_upgrade() {
    let up = Scripted::start(b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok", Then::Close).await;
    let gw = gateway(&up, &[], None).await;
    for lines in
        ["Upgrade: H2C\r\n", "Upgrade: h2c, foo/1\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n", "Upgrade: h2c/1\r\n"]
    {
        let mut conn = RawConn::connect(gw.addr()).await;
        conn.send(&upgrade_request("/plain", lines)).await;
        let res = conn.read_response().await;
        assert_eq!(res.status, 200, "{lines:?}: {}", res.text());
        let head = up.heads().pop().unwrap().to_ascii_lowercase();
        assert!(!head.contains("upgrade"), "{lines:?} went upstream as an upgrade: {head}");
        assert!(!head.contains("h2c") && !head.contains("http2-settings"), "{head}");
    }
    for lines in ["Upgrade: h2c, WebSocket\r\n", "Upgrade: h2c\r\nUpgrade: websocket\r\n"] {
        let mut conn = RawConn::connect(gw.addr()).await;
        conn.send(&upgrade_request("/plain", lines)).await;
        let _ = conn.read_response().await;
        let head = up.heads().pop().unwrap().to_ascii_lowercase();
        assert!(!head.contains("h2c"), "{lines:?}: {head}");
        assert_eq!(head.matches("upgrade: websocket").count(), 1, "{lines:?}: {head}");
    }
}

/// A `101` is tunnelled only when its `Upgrade` is exactly `websocket`: `websocket, h2c`
/// or another protocol is a 502, and the upstream's connection is closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_101_to_anything_but_websocket_is_a_502() {
    for answer in [
        &b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket, h2c\r\nconnection: upgrade\r\n\r\n"[..],
        b"HTTP/1.1 101 Switching Protocols\r\nupgrade: IRC/6.9\r\nconnection: upgrade\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\n\r\n",
    ] {
        let up = Scripted::start(answer, Then::Hold).await;
        let gw = gateway(&up, &[], None).await;
        let mut conn = RawConn::connect(gw.addr()).await;
        conn.send(&upgrade_request("/ws", "Upgrade: websocket\r\n")).await;
        assert_error(&conn.read_response().await, 502, "upstream_error", "Upstream service is unavailable");
        eventually(STEP, "the upstream's connection to be closed", || up.closed() == 1).await;
    }
}

/// An open WebSocket tunnel is counted in `gatehouse_open_connections` (it holds its
/// connection's slot) while it carries bytes both ways, closes after
/// `limits.tunnel_idle_timeout` with nothing either way, and leaves one audit record
/// with its duration and the bytes each way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tunnel_holds_its_connection_slot_and_closes_when_idle_with_one_audit_record() {
    let up = Scripted::start(SWITCHED, Then::Echo).await;
    let gw = gateway(&up, &[("tunnel_idle_timeout", "700ms")], None).await;
    let open = r#"gatehouse_open_connections{listener="plain"}"#;
    let mut conn = RawConn::connect(gw.addr()).await;
    conn.send(&upgrade_request("/ws", "Upgrade: websocket\r\n")).await;
    let head = read_head(&mut conn).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    conn.send(b"ping").await;
    assert_eq!(conn.read_exact(4).await, b"ping");
    conn.send(b"hello!").await;
    assert_eq!(conn.read_exact(6).await, b"hello!");
    assert_eq!(value(&metrics(&gw).await, open), Some(1.0), "the tunnel is an open connection");
    // Then silence, both ways: the gateway closes the tunnel.
    assert_eq!(conn.expect_closed(STEP).await, Closed::Eof);
    eventually(STEP, "the upstream side to be closed", || up.closed() == 1).await;
    let records = gw.audit_of("/ws", 1).await;
    assert_eq!(records.len(), 1, "{records:?}");
    let r = &records[0];
    assert_eq!(
        (r["status"].as_u64(), r["outcome"].as_str(), r["reason"].as_str()),
        (Some(101), Some("forwarded"), Some("tunnel_idle"))
    );
    assert_eq!((r["bytes_received"].as_u64(), r["bytes_sent"].as_u64()), (Some(10), Some(10)), "{r}");
    assert!(r["duration_ms"].as_f64().unwrap() >= 700.0, "{r}");
    let m = metrics(&gw).await;
    assert_eq!(value(&m, open), Some(0.0), "{m}");
}

/// On shutdown a tunnel outlives the drain's start but not its grace period: closed at
/// the end of `shutdown_grace`, with its audit record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tunnel_is_closed_at_the_end_of_the_grace_period_with_its_audit_record() {
    let up = Scripted::start(SWITCHED, Then::Echo).await;
    let mut gw = gateway(&up, &[("shutdown_grace", "500ms")], None).await;
    let mut conn = RawConn::connect(gw.addr()).await;
    conn.send(&upgrade_request("/ws", "Upgrade: websocket\r\n")).await;
    assert!(read_head(&mut conn).await.starts_with("HTTP/1.1 101"));
    conn.send(b"before").await;
    assert_eq!(conn.read_exact(6).await, b"before");
    gw.begin_shutdown();
    assert_eq!(conn.expect_closed(STEP).await, Closed::Eof);
    let records = gw.audit_of("/ws", 1).await;
    let r = &records[0];
    assert_eq!((r["status"].as_u64(), r["reason"].as_str()), (Some(101), Some("tunnel_shutdown")), "{r}");
    assert_eq!((r["bytes_received"].as_u64(), r["bytes_sent"].as_u64()), (Some(6), Some(6)), "{r}");
}

/// A response whose body breaks after a good head (cut short, a malformed chunk, a
/// stall) is recorded as it ended: `failed` with the reason and the bytes that went out,
/// counted in `gatehouse_upstream_errors_total{kind}`; the client's connection is closed,
/// so the cut-off body is never taken for a whole one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_that_fails_after_its_head_is_recorded_and_its_connection_closed() {
    let cases: [(&str, &[u8], Then, &str, &str); 3] = [
        ("/cut", b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc", Then::Close, "upstream_body_error", "body"),
        (
            "/chunk",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabcXX",
            Then::Hold,
            "upstream_body_error",
            "body",
        ),
        (
            "/stall",
            b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc",
            Then::Hold,
            "upstream_body_timeout",
            "body_timeout",
        ),
    ];
    for (path, answer, then, reason, kind) in cases {
        let up = Scripted::start(answer, then).await;
        let gw = gateway(&up, &[], Some("500ms")).await;
        let mut conn = RawConn::connect(gw.addr()).await;
        conn.send(format!("GET {path} HTTP/1.1\r\nHost: gw.test\r\n\r\n").as_bytes()).await;
        let (got, closed) =
            conn.read_until_closed(STEP).await.unwrap_or_else(|| panic!("{path}: connection left open"));
        // The client sees the head and part of the body, or nothing (when the failure
        // comes before hyper flushed the head): never a body that ends as if whole.
        let text = String::from_utf8_lossy(&got);
        assert!(text.is_empty() || text.starts_with("HTTP/1.1 200 OK\r\n"), "{path}: {text:?} ({closed:?})");
        let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
        assert!(body.len() < 10 && !body.contains("0\r\n\r\n"), "{path}: the body was ended as if whole: {text:?}");
        let records = gw.audit_of(path, 1).await;
        let r = &records[0];
        assert_eq!(
            (r["status"].as_u64(), r["outcome"].as_str(), r["reason"].as_str(), r["bytes_sent"].as_u64()),
            (Some(200), Some("failed"), Some(reason), Some(3)),
            "{path}: {r}"
        );
        let series = format!(r#"gatehouse_upstream_errors_total{{kind="{kind}",route="all"}}"#);
        assert_eq!(value(&metrics(&gw).await, &series), Some(1.0), "{path}: {series}");
    }
}

/// Over HTTP/2 a body that fails after its head resets the stream: the client's body
/// read fails instead of ending cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_http2_a_body_that_fails_after_its_head_resets_the_stream() {
    let up = Scripted::start(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc", Then::Close).await;
    let gw = TestGateway::builder().tls().route(RouteSpec::new("all", "/").upstream_url(&up.url())).start().await;
    let io = tls_connect(gw.tls_addr(), gw.cert_pem(), b"h2").await;
    let (mut sender, c) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(io)).await.unwrap();
    tokio::spawn(c);
    let req = Request::get("https://localhost/h2cut").body(crate::support::client::empty()).unwrap();
    // The reset may overtake the head (then the request itself fails), or follow it.
    match within(STEP, "h2 head", sender.send_request(req)).await {
        Ok(res) => {
            assert_eq!(res.status(), StatusCode::OK);
            let body = within(STEP, "h2 body", res.into_body().collect()).await;
            assert!(body.is_err(), "a cut-off body ended like a whole one: {body:?}");
        }
        Err(e) => assert!(format!("{e:?}").contains("Reset"), "{e:?}"),
    }
    let r = &gw.audit_of("/h2cut", 1).await[0];
    assert_eq!((r["outcome"].as_str(), r["reason"].as_str()), (Some("failed"), Some("upstream_body_error")), "{r}");
}

/// A client that goes away while its response streams is recorded as `client_aborted`,
/// with the head's status.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_mid_body_is_recorded_as_client_aborted() {
    let up = Scripted::start(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc", Then::Hold).await;
    let gw = gateway(&up, &[], Some("30s")).await;
    let mut conn = RawConn::connect(gw.addr()).await;
    conn.send(b"GET /leave HTTP/1.1\r\nHost: gw.test\r\n\r\n").await;
    assert!(read_head(&mut conn).await.starts_with("HTTP/1.1 200"));
    drop(conn);
    let r = &gw.audit_of("/leave", 1).await[0];
    assert_eq!(
        (r["status"].as_u64(), r["outcome"].as_str(), r["reason"].as_str()),
        (Some(200), Some("client_aborted"), Some("client_aborted")),
        "{r}"
    );
    eventually(STEP, "the upstream's connection to be closed", || up.closed() == 1).await;
}

/// A malformed chunked body from the client is the client's error: 400
/// `invalid_request`, never a 502, never an upstream error in the metrics; the upstream
/// never sees the body end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_chunked_body_from_the_client_is_a_400_never_an_upstream_error() {
    let up = Scripted::start(b"", Then::Hold).await;
    let gw = gateway(&up, &[], None).await;
    let mut conn = RawConn::connect(gw.addr()).await;
    conn.send(
        b"POST /bad-body HTTP/1.1\r\nHost: gw.test\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhelloXX\r\n0\r\n\r\n",
    )
    .await;
    let res = conn.read_response().await;
    assert_error(&res, 400, "invalid_request", "Request body could not be read");
    let r = &gw.audit_of("/bad-body", 1).await[0];
    assert_eq!((r["outcome"].as_str(), r["reason"].as_str()), (Some("rejected"), Some("bad_body")), "{r}");
    let m = metrics(&gw).await;
    assert!(!m.lines().any(|l| l.starts_with("gatehouse_upstream_errors_total{")), "{m}");
    eventually(STEP, "the upstream's connection to be closed", || up.closed() == 1).await;
    let after = String::from_utf8_lossy(&up.after()).into_owned();
    assert!(!after.contains("0\r\n\r\n"), "the upstream saw the body end: {after:?}");
}

/// HTTP/2 in, HTTP/1.1 out: cookie crumbs become one `cookie` line joined with `; `
/// (RFC 9113 §8.2.3), and the body has exactly one framing header.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_cookie_crumbs_become_one_line_with_one_framing_header() {
    let up = TestUpstream::start().await;
    let gw = TestGateway::builder().tls().route(RouteSpec::new("all", "/").to(&up)).start().await;
    let io = tls_connect(gw.tls_addr(), gw.cert_pem(), b"h2").await;
    let (mut sender, c) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(io)).await.unwrap();
    tokio::spawn(c);
    let req: Request<ReqBody> = Request::post("https://localhost/cookies")
        .header("cookie", "a=1")
        .header("cookie", "b=2")
        .header("cookie", "c=3")
        .header("content-length", "5")
        .body(full("hello"))
        .unwrap();
    let res = within(STEP, "h2 response", sender.send_request(req)).await.unwrap();
    assert_eq!(res.status(), 200);
    let seen = up.only_request();
    assert_eq!(seen.values("cookie"), ["a=1; b=2; c=3"]);
    assert_eq!(seen.values("content-length"), ["5"]);
    assert!(seen.lacks("transfer-encoding"));
    assert_eq!(seen.body_prefix, b"hello");
}

/// An upstream body in a transfer coding other than chunked (`gzip, chunked`) is a 502,
/// never passed on with the coding's label gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_transfer_coding_from_the_upstream_is_a_502() {
    for answer in [
        &b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n3\r\n\x1f\x8b\x08\r\n0\r\n\r\n"[..],
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n\r\n\x1f\x8b\x08",
    ] {
        let up = Scripted::start(answer, Then::Close).await;
        let gw = gateway(&up, &[], None).await;
        let res = H1::new().get(&gw.url("/coded")).await;
        assert_error(&res, 502, "upstream_error", "Upstream service is unavailable");
    }
}

/// Path-override headers (`X-Original-URL`, `X-Rewrite-URL`, `X-Original-Method`) never
/// reach the upstream, in any spelling: a backend that honours them would route to a
/// path no rule authorised.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_override_headers_are_stripped_in_every_spelling() {
    let up = TestUpstream::start().await;
    let gw = TestGateway::builder().route(RouteSpec::new("all", "/").to(&up)).start().await;
    let sent = [
        ("x-original-url", "/admin/delete"),
        ("x_original_url", "/admin"),
        ("X-Rewrite-URL", "/admin"),
        ("x_rewrite_url", "/admin"),
        ("X-Original-Method", "DELETE"),
        ("x-original_method", "DELETE"),
    ];
    let res = H1::new().get_with(&gw.url("/public"), &sent).await;
    assert_eq!(res.status, 200);
    let seen = up.only_request();
    for (name, _) in sent {
        assert!(seen.lacks(&name.to_ascii_lowercase()), "{name} reached the upstream: {:?}", seen.headers);
    }
}

/// The smaller ones: a status outside 100-599 is a 502; `Content-Length: 2, 2` goes on as
/// one value; a configured identity header spelled with `_` is protected against a
/// client's `-` spelling.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn odd_statuses_length_lists_and_underscore_identity_names() {
    for answer in
        [&b"HTTP/1.1 600 Odd\r\ncontent-length: 0\r\n\r\n"[..], b"HTTP/1.1 999 Odd\r\ncontent-length: 0\r\n\r\n"]
    {
        let up = Scripted::start(answer, Then::Close).await;
        let gw = gateway(&up, &[], None).await;
        assert_error(&H1::new().get(&gw.url("/odd")).await, 502, "upstream_error", "Upstream service is unavailable");
    }

    let up = Scripted::start(b"HTTP/1.1 200 OK\r\ncontent-length: 2, 2\r\n\r\nok", Then::Close).await;
    let gw = gateway(&up, &[], None).await;
    let mut conn = RawConn::connect(gw.addr()).await;
    conn.send(b"GET /list HTTP/1.1\r\nHost: gw.test\r\n\r\n").await;
    let res = conn.read_response().await;
    let lengths: Vec<_> = res.headers.get_all("content-length").iter().collect();
    assert_eq!(lengths, ["2"]);
    assert_eq!(&res.body[..], b"ok");

    let up = TestUpstream::start().await;
    let mut creds = Creds::new();
    let key = creds.api_user("erp");
    let gw = TestGateway::builder()
        .credentials(&creds)
        .identity_header("user", "x_user_id")
        .route(RouteSpec::new("all", "/").authenticated().to(&up))
        .start()
        .await;
    let h = [("x-api-key", key.token.as_str()), ("x-user-id", "admin"), ("X-User_Id", "root")];
    assert_eq!(H1::new().get_with(&gw.url("/me"), &h).await.status, 200);
    let seen = up.only_request();
    assert_eq!(seen.values("x_user_id"), ["erp"]);
    assert!(seen.lacks("x-user-id"), "the client's spelling reached the upstream: {:?}", seen.headers);
}
