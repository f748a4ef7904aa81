//! Limits against abusive clients: slowloris (header read timeout), idle keep-alive
//! connections and the header count.

use crate::support::assert_error;
use crate::support::gateway::{RouteSpec, TestGateway};
use crate::support::raw::RawConn;
use crate::support::upstream::TestUpstream;
use std::time::{Duration, Instant};

/// Sends `head` one byte per second to a gateway with a 1 s header timeout; returns how
/// long until the gateway closed the connection (FIN, or RST when it closed with our
/// latest byte unread) and what it sent before closing.
async fn trickle(head: &[u8]) -> (Duration, Vec<u8>) {
    let up = TestUpstream::start().await;
    let gw = TestGateway::builder()
        .limit("header_read_timeout", "1s")
        .route(RouteSpec::new("all", "/").to(&up))
        .start()
        .await;

    let mut conn = RawConn::connect(gw.addr()).await;
    let started = Instant::now();
    let mut outcome = None;
    for byte in head {
        if conn.try_send(&[*byte]).await.is_err() {
            break;
        }
        // Waiting up to a second for the close is also the pace: one byte per second.
        if let Some(closed) = conn.read_until_closed(Duration::from_secs(1)).await {
            outcome = Some(closed);
            break;
        }
    }
    let elapsed = started.elapsed();
    assert_eq!(up.count(), 0);
    let (received, _) = outcome.unwrap_or_else(|| panic!("still open after {elapsed:?}"));
    (elapsed, received)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_sending_headers_one_byte_per_second_is_disconnected_at_the_header_timeout() {
    let (elapsed, received) =
        trickle(b"GET /slow HTTP/1.1\r\nHost: gw.test\r\nX-Padding: aaaaaaaaaaaaaaaa\r\n\r\n").await;

    assert!(elapsed < Duration::from_secs(3), "closed only after {elapsed:?} with a 1s header timeout");
    assert!(received.is_empty(), "expected a silent close, got {:?}", String::from_utf8_lossy(&received));
}

/// The HTTP/2 preface is read before hyper's HTTP/1 header timer exists: trickling it
/// must not buy a slowloris more time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_trickling_the_http2_preface_is_disconnected_at_the_header_timeout() {
    let (elapsed, received) = trickle(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await;

    assert!(elapsed < Duration::from_secs(3), "closed only after {elapsed:?} with a 1s header timeout");
    assert!(received.is_empty(), "expected a silent close, got {:?}", String::from_utf8_lossy(&received));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_sends_nothing_is_disconnected_at_the_header_timeout() {
    let up = TestUpstream::start().await;
    let gw = TestGateway::builder()
        .limit("header_read_timeout", "1s")
        .route(RouteSpec::new("all", "/").to(&up))
        .start()
        .await;

    let mut conn = RawConn::connect(gw.addr()).await;
    let started = Instant::now();
    let outcome = conn.read_until_closed(Duration::from_secs(10)).await;
    let elapsed = started.elapsed();

    let (received, _) = outcome.unwrap_or_else(|| panic!("a silent connection was still open after {elapsed:?}"));
    assert!(elapsed < Duration::from_secs(3), "closed only after {elapsed:?} with a 1s header timeout");
    assert!(received.is_empty(), "expected a silent close, got {:?}", String::from_utf8_lossy(&received));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_keep_alive_connection_is_closed_after_the_idle_timeout() {
    let up = TestUpstream::start().await;
    let gw = TestGateway::builder()
        .limit("idle_timeout", "1s")
        .limit("header_read_timeout", "30s")
        .route(RouteSpec::new("all", "/").to(&up))
        .start()
        .await;

    let mut conn = RawConn::connect(gw.addr()).await;
    for i in 0..2 {
        conn.send(format!("GET /keep/{i} HTTP/1.1\r\nHost: gw.test\r\n\r\n").as_bytes()).await;
        let res = conn.read_response().await;
        assert_eq!(res.status, 200, "{}", res.text());
        assert!(res.headers.get("connection").is_none_or(|v| v != "close"), "not kept alive: {:?}", res.headers);
    }
    let idle_since = Instant::now();
    conn.expect_closed(Duration::from_secs(10)).await;
    let idle = idle_since.elapsed();

    assert!(idle >= Duration::from_millis(500), "closed after {idle:?}, before the 1s idle timeout");
    assert!(idle < Duration::from_secs(5), "closed only after {idle:?} with a 1s idle timeout");
    assert_eq!(up.count(), 2);
}

/// A request with `n` extra headers, on a fresh connection.
async fn with_headers(gw: &TestGateway, n: usize) -> crate::support::Reply {
    let mut head = String::from("GET /many HTTP/1.1\r\nHost: gw.test\r\n");
    for i in 0..n {
        head.push_str(&format!("x-h{i}: {i}\r\n"));
    }
    head.push_str("\r\n");
    let mut conn = RawConn::connect(gw.addr()).await;
    conn.send(head.as_bytes()).await;
    conn.read_response().await
}

/// `limits.max_headers`: at the default (100) and a configured 20, one header over the
/// limit is the documented 431 and never reaches the upstream; at the limit the request passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_with_more_headers_than_max_headers_is_refused_with_431() {
    for (configured, max) in [(None, 100), (Some("20"), 20)] {
        let up = TestUpstream::start().await;
        let mut b = TestGateway::builder().route(RouteSpec::new("all", "/").to(&up));
        if let Some(v) = configured {
            b = b.limit("max_headers", v);
        }
        let gw = b.start().await;

        // `Host` counts: max - 1 extra headers is exactly the limit.
        assert_eq!(with_headers(&gw, max - 1).await.status, 200, "max_headers {max}");
        let res = with_headers(&gw, max).await;
        assert_error(&res, 431, "invalid_request", "Request headers are too large");
        assert_eq!(up.count(), 1, "max_headers {max}");
    }
}
