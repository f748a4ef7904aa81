//! The connection workers' upstream pools (src/wire/upstream.rs): a connection is reused once
//! its response has been read to the end, never after a response the client abandoned,
//! and a pooled connection the upstream closed while idle is replaced without the client
//! seeing an error.

use crate::support::creds::Creds;
use crate::support::gateway::{RouteSpec, TestGateway};
use crate::support::raw::RawConn;
use crate::support::upstream::{Mode, TestUpstream};
use crate::support::{MIB, STEP, within};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const GET: &[u8] = b"GET /pool HTTP/1.1\r\nHost: gw.test\r\n\r\n";

/// One client connection, sequential requests: every response is read to the end, so the
/// gateway's worker sends them all on one upstream connection, for a `Content-Length`
/// body and for a chunked one alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_connection_is_reused_after_each_complete_response() {
    for (mode, expect_len) in [(Mode::Echo, None), (Mode::LargeBody(100_000), Some(100_000))] {
        let up = TestUpstream::with(mode.clone()).await;
        let gw = TestGateway::builder().route(RouteSpec::new("all", "/").to(&up)).start().await;
        let mut conn = RawConn::connect(gw.addr()).await;

        for i in 0..10 {
            conn.send(GET).await;
            let res = conn.read_response().await;
            assert_eq!(res.status, 200, "{mode:?} request {i}: {}", res.text());
            if let Some(len) = expect_len {
                assert_eq!(res.header("transfer-encoding"), "chunked", "{mode:?}");
                assert_eq!(res.body.len(), len);
            }
        }

        assert_eq!(up.count(), 10, "{mode:?}");
        assert_eq!(up.connections(), 1, "{mode:?}: a connection was not reused");
    }
}

/// Clients that hang up in the middle of a large response: those upstream connections
/// still carry unread body bytes and must be closed, not pooled. Were one reused, the
/// next response would be read from the middle of the abandoned body. (Two guards stand
/// in the way: `UpstreamBody` only gives back a connection whose body was read to its end,
/// and it closes one dropped before that; this test pins the behaviour down end to end.)
/// The body is larger than the socket buffers between upstream and client can hold
/// (a few MiB on loopback): with a smaller one the gateway may have read all of it from
/// the upstream before the client hung up, and then reusing the connection is right.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_whose_response_was_abandoned_is_never_reused() {
    let size = 32 * MIB;
    let up = TestUpstream::with(Mode::LargeBody(size)).await;
    let gw = TestGateway::builder().route(RouteSpec::new("all", "/").to(&up)).start().await;

    for round in 0..4 {
        let mut quitter = RawConn::connect(gw.addr()).await;
        quitter.send(GET).await;
        assert!(quitter.read_exact(64).await.starts_with(b"HTTP/1.1 200"), "round {round}");
        drop(quitter);
        // Both workers (connections are dealt round-robin) answer complete responses.
        for _ in 0..2 {
            let mut conn = RawConn::connect(gw.addr()).await;
            conn.send(GET).await;
            let res = conn.read_response().await;
            assert_eq!(res.status, 200, "round {round}: {}", res.text());
            assert_eq!(res.body.len() as u64, size, "round {round}");
        }
    }

    assert_eq!(up.count(), 12);
    // At least the four abandoned connections could not be used again.
    assert!(up.connections() > 4, "only {} upstream connections", up.connections());
}

/// What a raw test upstream does after answering a connection's first request.
#[derive(Clone, Copy)]
enum Then {
    /// Closes the connection right after answering, without saying so (no `Connection: close`),
    /// like a backend with a short keep-alive timeout.
    CloseSoon,
    /// Reads the next request and closes without answering: the close crosses the
    /// request on the wire.
    DropNextRequest,
}

/// A raw HTTP/1.1 upstream answering `200 ok` once per connection, then doing `then`.
/// Counts connections, request heads and connections it closed after answering.
async fn raw_upstream(then: Then) -> (std::net::SocketAddr, Arc<AtomicUsize>, Arc<AtomicUsize>, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (accepted, heads, closed) = (Arc::default(), Arc::default(), Arc::<AtomicUsize>::default());
    let (a, h, cl): (Arc<AtomicUsize>, Arc<AtomicUsize>, _) =
        (Arc::clone(&accepted), Arc::clone(&heads), closed.clone());
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            a.fetch_add(1, Ordering::SeqCst);
            let (h, cl) = (h.clone(), cl.clone());
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                for answered in [true, false] {
                    head.clear();
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    h.fetch_add(1, Ordering::SeqCst);
                    if answered {
                        let _ = stream.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").await;
                        if let Then::CloseSoon = then {
                            drop(stream);
                            cl.fetch_add(1, Ordering::SeqCst);
                            return;
                        }
                    }
                }
            });
        }
    });
    (addr, accepted, heads, closed)
}

async fn gateway_to(addr: std::net::SocketAddr) -> TestGateway {
    TestGateway::builder().route(RouteSpec::new("all", "/").upstream_url(&format!("http://{addr}"))).start().await
}

/// The pooled connection is dead by the time the next request comes: the worker notices,
/// opens a new one, and the client sees only 200s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pooled_connection_the_upstream_closed_is_replaced_unnoticed() {
    let (addr, accepted, _, closed) = raw_upstream(Then::CloseSoon).await;
    let gw = gateway_to(addr).await;
    let mut conn = RawConn::connect(gw.addr()).await;

    for i in 0..5 {
        conn.send(GET).await;
        let res = within(STEP, "response", conn.read_response()).await;
        assert_eq!(res.status, 200, "request {i}: {}", res.text());
        assert_eq!(&res.body[..], b"ok");
        // The upstream has closed that connection before the next request comes.
        crate::support::eventually(STEP, "the upstream's close", || closed.load(Ordering::SeqCst) == i + 1).await;
    }

    assert_eq!(accepted.load(Ordering::SeqCst), 5);
}

/// The upstream closes a pooled connection just as a request arrives on it. A GET is
/// sent again on a new connection and the client gets its 200; a POST may already have
/// been acted on, so it is not sent twice: the client gets the documented 502.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_lost_on_a_closing_pooled_connection_is_resent_only_when_safe() {
    let (addr, accepted, heads, _) = raw_upstream(Then::DropNextRequest).await;
    let gw = gateway_to(addr).await;
    let mut conn = RawConn::connect(gw.addr()).await;

    for i in 0..3 {
        conn.send(GET).await;
        let res = within(STEP, "response", conn.read_response()).await;
        assert_eq!(res.status, 200, "GET {i}: {}", res.text());
    }
    // First GET: connection 1. Each later GET: lost on the pooled connection, then
    // answered on a new one.
    assert_eq!((accepted.load(Ordering::SeqCst), heads.load(Ordering::SeqCst)), (3, 5));

    conn.send(b"POST /pool HTTP/1.1\r\nHost: gw.test\r\ncontent-length: 2\r\n\r\n{}").await;
    let res = within(STEP, "response", conn.read_response()).await;
    crate::support::assert_error(&res, 502, "upstream_error", "Upstream service is unavailable");
    assert_eq!((accepted.load(Ordering::SeqCst), heads.load(Ordering::SeqCst)), (3, 6), "the POST was sent twice");
}

/// The same for a signed GET: the gateway read its (empty) body to check the signature,
/// and what it forwards is still a GET without a body, so it too is sent again and the
/// client gets its 200, not a 502.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signed_get_lost_on_a_closing_pooled_connection_is_resent() {
    let (addr, accepted, heads, _) = raw_upstream(Then::DropNextRequest).await;
    let mut creds = Creds::new();
    let key = creds.hmac_user("signer");
    let gw = TestGateway::builder()
        .credentials(&creds)
        .route(RouteSpec::new("all", "/").upstream_url(&format!("http://{addr}")).authenticated())
        .start()
        .await;
    let mut conn = RawConn::connect(gw.addr()).await;

    for i in 0..3 {
        // A target of its own each time: the same signed request twice is a replay.
        let target = format!("/pool?n={i}");
        let mut req = format!("GET {target} HTTP/1.1\r\nHost: gw.test\r\n");
        for (name, value) in key.headers("GET", &target, b"") {
            req.push_str(&format!("{name}: {value}\r\n"));
        }
        req.push_str("\r\n");
        conn.send(req.as_bytes()).await;
        let res = within(STEP, "response", conn.read_response()).await;
        assert_eq!(res.status, 200, "signed GET {i}: {}", res.text());
    }
    assert_eq!((accepted.load(Ordering::SeqCst), heads.load(Ordering::SeqCst)), (3, 5));
}
