//! HTTP/2 upstreams (docs/configuration.md#upstreams): `h2c://` by prior knowledge and
//! `https://` with `upstream_protocol: h2` by ALPN, multiplexed over one connection per
//! worker; and hostile HTTP/2 upstreams written with the `h2` crate (a stream reset, a
//! GOAWAY, a stream limit of one).

use crate::support::assert_error;
use crate::support::client::H1;
use crate::support::gateway::{RouteSpec, TestGateway};
use crate::support::pki::Ca;
use crate::support::upstream::{Mode, TestUpstream};
use bytes::Bytes;
use http::Version;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::net::TcpListener;

/// `h2c://`: the upstream receives HTTP/2 with the path and the identity the gateway
/// sets; 40 concurrent requests share a connection per worker.
#[tokio::test]
async fn h2c_upstream_gets_http2_multiplexed() {
    let up = TestUpstream::start().await;
    let gw = TestGateway::builder().route(RouteSpec::new("r", "/").upstream_url(&up.h2c_url())).start().await;
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..40 {
        let url = gw.url(&format!("/items/{i}?q=1"));
        calls.spawn(async move { H1::new().get(&url).await.status });
    }
    while let Some(status) = calls.join_next().await {
        assert_eq!(status.unwrap(), 200);
    }
    let seen = up.requests();
    assert_eq!(seen.len(), 40);
    assert!(
        seen.iter().all(|s| s.version == Version::HTTP_2),
        "{:?}",
        seen.iter().map(|s| s.version).collect::<Vec<_>>()
    );
    assert!(seen.iter().any(|s| s.target == "/items/7?q=1"));
    assert!(seen.iter().all(|s| !s.header("x-request-id").is_empty()));
    assert!(up.connections() <= 4, "{} connections for 40 requests: not multiplexed", up.connections());
    // `TE: trailers` from the client (hop-by-hop in HTTP/1.1) is the one TE value HTTP/2
    // carries: gRPC servers want it.
    let reply = H1::new().get_with(&gw.url("/te"), &[("te", "trailers"), ("connection", "te")]).await;
    assert_eq!(reply.status, 200);
    let seen = up.requests().into_iter().find(|s| s.target == "/te").unwrap();
    assert_eq!(seen.header("te"), "trailers");
}

/// `https://` with `upstream_protocol: h2`: HTTP/2 by ALPN; an upstream that does not
/// offer h2 fails the handshake: 502, nothing sent.
#[tokio::test]
async fn h2_over_tls_is_negotiated_by_alpn() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("CA");
    let ca_path = ca.write(dir.path(), "ca.pem");
    let up = TestUpstream::tls(Mode::Echo, &ca.leaf(&["localhost"]), None).await;
    let old = TestUpstream::tls_http1_only(&ca.leaf(&["localhost"])).await;
    let setting = format!("upstream_tls: {{ ca: {} }}", ca_path.display());
    let gw = TestGateway::builder()
        .route(
            RouteSpec::new("h2", "/h2")
                .upstream_url(&format!("https://localhost:{}", up.port()))
                .setting(&setting)
                .setting("upstream_protocol: h2"),
        )
        .route(
            RouteSpec::new("old", "/old")
                .upstream_url(&format!("https://localhost:{}", old.port()))
                .setting(&setting)
                .setting("upstream_protocol: h2"),
        )
        .start()
        .await;
    let client = H1::new();
    let reply = client.get(&gw.url("/h2/x")).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(up.only_request().version, Version::HTTP_2);
    let reply = client.get(&gw.url("/old/x")).await;
    assert_error(&reply, 502, "upstream_error", "Upstream service is unavailable");
    assert_eq!(old.count(), 0);
}

/// What a hostile HTTP/2 upstream does with each request.
#[derive(Clone, Copy)]
enum Hostile {
    /// RST_STREAM (INTERNAL_ERROR) instead of an answer.
    Reset,
    /// On its first connection: GOAWAY and close instead of an answer; later ones answer.
    GoAwayFirst,
    /// Allows one stream at a time and answers each after 100 ms.
    OneStream,
}

#[derive(Default)]
struct Seen {
    connections: AtomicUsize,
    closed: AtomicUsize,
    requests: AtomicUsize,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
}

async fn hostile(kind: Hostile) -> (SocketAddr, Arc<Seen>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Seen::default());
    let s = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((sock, _)) = listener.accept().await else { return };
            let nth = s.connections.fetch_add(1, Ordering::SeqCst);
            let s = s.clone();
            tokio::spawn(async move {
                let mut b = h2::server::Builder::new();
                if let Hostile::OneStream = kind {
                    b.max_concurrent_streams(1);
                }
                let Ok(mut conn) = b.handshake::<_, Bytes>(sock).await else { return };
                while let Some(Ok((_req, mut respond))) = conn.accept().await {
                    s.requests.fetch_add(1, Ordering::SeqCst);
                    match kind {
                        Hostile::Reset => respond.send_reset(h2::Reason::INTERNAL_ERROR),
                        Hostile::GoAwayFirst if nth == 0 => {
                            conn.abrupt_shutdown(h2::Reason::NO_ERROR);
                        }
                        Hostile::GoAwayFirst => {
                            let _ = respond.send_response(http::Response::new(()), true);
                        }
                        Hostile::OneStream => {
                            let s = s.clone();
                            tokio::spawn(async move {
                                let now = s.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                                s.max_in_flight.fetch_max(now, Ordering::SeqCst);
                                tokio::time::sleep(Duration::from_millis(100)).await;
                                s.in_flight.fetch_sub(1, Ordering::SeqCst);
                                let _ = respond.send_response(http::Response::new(()), true);
                            });
                        }
                    }
                }
                s.closed.fetch_add(1, Ordering::SeqCst);
            });
        }
    });
    (addr, seen)
}

async fn gateway_to(addr: SocketAddr) -> TestGateway {
    TestGateway::builder()
        .route(RouteSpec::new("r", "/").upstream_url(&format!("h2c://{addr}")).timeout("5s"))
        .start()
        .await
}

/// RST_STREAM: 502 for each request, and the connection stays the one connection (a
/// reset stream does not cost a connection).
#[tokio::test]
async fn a_reset_stream_is_a_502_and_keeps_the_connection() {
    let (addr, seen) = hostile(Hostile::Reset).await;
    let gw = gateway_to(addr).await;
    let client = H1::new();
    for _ in 0..5 {
        let reply = client.get(&gw.url("/x")).await;
        assert_error(&reply, 502, "upstream_error", "Upstream service is unavailable");
    }
    assert_eq!(seen.requests.load(Ordering::SeqCst), 5);
    assert!(seen.connections.load(Ordering::SeqCst) <= 2, "a connection per reset stream");
}

/// GOAWAY with the request in flight: that request gets 502, the connection is dropped
/// (the upstream sees it close), and the next request goes on a new one and succeeds.
#[tokio::test]
async fn a_goaway_fails_the_request_in_flight_and_the_next_uses_a_new_connection() {
    let (addr, seen) = hostile(Hostile::GoAwayFirst).await;
    let gw = gateway_to(addr).await;
    let client = H1::new();
    let first = client.get(&gw.url("/x")).await;
    assert_error(&first, 502, "upstream_error", "Upstream service is unavailable");
    crate::support::eventually(Duration::from_secs(5), "the first connection closed", || {
        seen.closed.load(Ordering::SeqCst) >= 1
    })
    .await;
    let next = client.get(&gw.url("/x")).await;
    assert_eq!(next.status, 200, "{}", next.text());
    assert_eq!(seen.connections.load(Ordering::SeqCst), 2);
}

/// An upstream allowing one stream at a time: concurrent requests wait for a free stream
/// instead of failing or opening connections, and all succeed.
#[tokio::test]
async fn the_upstreams_stream_limit_is_respected() {
    let (addr, seen) = hostile(Hostile::OneStream).await;
    let gw = gateway_to(addr).await;
    let mut calls = tokio::task::JoinSet::new();
    for _ in 0..6 {
        let url = gw.url("/x");
        calls.spawn(async move { H1::new().get(&url).await.status });
    }
    while let Some(status) = calls.join_next().await {
        assert_eq!(status.unwrap(), 200);
    }
    assert_eq!(seen.requests.load(Ordering::SeqCst), 6);
    let conns = seen.connections.load(Ordering::SeqCst);
    assert!(conns <= 4, "{conns} connections");
    // One stream per connection at most, so never more in flight than connections.
    assert!(seen.max_in_flight.load(Ordering::SeqCst) <= conns);
}

/// A client's request trailers never reach the upstream: they could carry an identity
/// header past the checks made on the head (the HTTP/2 path is the one that could carry
/// them; HTTP/1.1 upstreams never got them).
#[tokio::test]
async fn a_clients_request_trailers_never_reach_the_upstream() {
    use http_body_util::{BodyExt, StreamBody};
    let up = TestUpstream::start().await;
    let gw = TestGateway::builder().route(RouteSpec::new("r", "/").upstream_url(&up.h2c_url())).start().await;
    let mut send = crate::support::client::h2c(gw.addr()).await;
    // A body of unknown length, and one with a Content-Length: two ways in.
    for length in [None, Some("4")] {
        let mut trailers = http::HeaderMap::new();
        trailers.insert("x-gatehouse-user", "mallory".parse().unwrap());
        trailers.insert("x-trailing", "1".parse().unwrap());
        let frames: Vec<Result<http_body::Frame<Bytes>, std::convert::Infallible>> =
            vec![Ok(http_body::Frame::data(Bytes::from_static(b"body"))), Ok(http_body::Frame::trailers(trailers))];
        let body = StreamBody::new(futures_util::stream::iter(frames));
        let mut req = http::Request::post(format!("http://{}/x", gw.addr()));
        if let Some(n) = length {
            req = req.header("content-length", n);
        }
        let res = send.send_request(req.body(body).unwrap()).await.unwrap();
        assert_eq!(res.status(), 200);
        res.into_body().collect().await.unwrap();
        let seen = up.requests().pop().unwrap();
        assert_eq!(seen.body_prefix, b"body");
        assert_eq!(seen.trailers, None, "{length:?}: the client's trailers reached the upstream");
        assert!(seen.lacks("x-gatehouse-user"));
    }
    assert_eq!(up.count(), 2);
}

/// A route of two HTTP/2 targets, one refusing connections: requests that first went to
/// the dead one are sent to the other, each with the gateway's headers once.
#[tokio::test]
async fn a_request_retried_on_another_h2_target_carries_the_gateways_headers_once() {
    let dead = TestUpstream::with(Mode::Refused).await;
    let up = TestUpstream::start().await;
    let gw = TestGateway::builder()
        .route(RouteSpec::new("r", "/").upstream_url(&dead.h2c_url()).upstream_url(&up.h2c_url()))
        .start()
        .await;
    let client = H1::new();
    for i in 0..6 {
        let reply = client.get(&gw.url(&format!("/n/{i}"))).await;
        assert_eq!(reply.status, 200, "{}", reply.text());
    }
    let seen = up.requests();
    assert_eq!(seen.len(), 6);
    for s in &seen {
        // `header` insists on exactly one value.
        assert!(!s.header("x-request-id").is_empty());
        assert!(!s.header("x-forwarded-for").is_empty());
    }
}
