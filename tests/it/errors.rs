//! The docs/errors.md errors the pipeline answers itself: 400, 404, 413, 502, 504, each as the
//! exact JSON body, and what the upstream saw (usually nothing).

use crate::support::client::{H1, generated};
use crate::support::gateway::{RouteSpec, TestGateway};
use crate::support::raw::RawConn;
use crate::support::upstream::{BodyEnd, Mode, TestUpstream};
use crate::support::{Generated, Reply, STEP, assert_error, eventually};
use http::Request;
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_matching_route_gets_404_not_found_and_the_upstream_sees_nothing() {
    let up = TestUpstream::start().await;
    let gw = TestGateway::builder()
        .route(RouteSpec::new("api", "/api/").to(&up))
        .route(RouteSpec::new("admin-host", "/").host("admin.example.com").to(&up))
        .start()
        .await;
    let client = H1::new();

    for path in ["/other", "/apix", "/"] {
        let res = client.get(&gw.url(path)).await;
        assert_error(&res, 404, "not_found", "No route matches this request");
    }

    assert_eq!(up.count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsafe_paths_get_400_invalid_request_and_the_upstream_sees_nothing() {
    let up = TestUpstream::start().await;
    let gw = TestGateway::builder().route(RouteSpec::new("all", "/").to(&up)).start().await;

    for path in [
        "/a/%2e%2e/%2e%2e/x",
        "/api/..%2f..%2fetc/passwd",
        "/api/%00",
        "/api/..%5cadmin",
        "/api/%252e%252e/admin",
        "/api/..;/admin",
        "/..",
    ] {
        let mut conn = RawConn::connect(gw.addr()).await;
        conn.send(format!("GET {path} HTTP/1.1\r\nHost: gw.test\r\n\r\n").as_bytes()).await;
        let res = conn.read_response().await;
        assert_eq!(res.status, 400, "{path}: {}", res.text());
        assert_error(&res, 400, "invalid_request", "Request path cannot be normalised safely");
    }

    assert_eq!(up.count(), 0, "{:#?}", up.requests());
}

/// A gateway whose bodies may not exceed 1 MiB.
async fn limited_gateway(up: &TestUpstream) -> TestGateway {
    TestGateway::builder().limit("max_request_body", "1MiB").route(RouteSpec::new("all", "/").to(up)).start().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_content_length_over_the_body_limit_gets_413_before_anything_is_forwarded() {
    let up = TestUpstream::start().await;
    let gw = limited_gateway(&up).await;

    // Only the head is sent: the answer must not wait for a body it will refuse.
    let mut conn = RawConn::connect(gw.addr()).await;
    conn.send(b"POST /upload HTTP/1.1\r\nHost: gw.test\r\nContent-Length: 1048577\r\n\r\n").await;
    let res = conn.read_response().await;

    assert_error(&res, 413, "payload_too_large", "Request body is too large");
    assert_eq!(up.count(), 0);
    assert_eq!(up.connections(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_exactly_at_the_limit_is_forwarded() {
    let up = TestUpstream::start().await;
    let gw = limited_gateway(&up).await;

    let sized = Request::post(gw.url("/at-limit")).body(generated(Generated::sized(1 << 20))).unwrap();
    let res = H1::new().send(sized).await;
    let chunked = Request::post(gw.url("/at-limit")).body(generated(Generated::streamed(1 << 20))).unwrap();
    let res2 = H1::new().send(chunked).await;

    assert_eq!((res.status.as_u16(), res2.status.as_u16()), (200, 200), "{} / {}", res.text(), res2.text());
    assert!(up.requests().iter().all(|r| r.body_bytes == 1 << 20 && r.body_end == BodyEnd::Complete));
    assert_eq!(up.count(), 2);
}

/// A body of unknown length is counted as it streams: the upstream may see the start of
/// the request, but never a complete one, and the client gets the documented 413.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunked_body_over_the_limit_gets_413_and_no_complete_request_reaches_the_upstream() {
    let up = TestUpstream::start().await;
    let gw = limited_gateway(&up).await;

    let mut conn = RawConn::connect(gw.addr()).await;
    conn.send(b"POST /upload HTTP/1.1\r\nHost: gw.test\r\nTransfer-Encoding: chunked\r\n\r\n").await;
    // Exactly the limit in 64 KiB chunks (allowed), then one byte more together with the
    // end of the body in one write: the gateway has read everything when it refuses, so
    // its close is a clean FIN and cannot reset the 413 away.
    let chunk = format!("10000\r\n{}\r\n", "x".repeat(0x10000));
    for _ in 0..16 {
        conn.send(chunk.as_bytes()).await;
    }
    conn.send(b"1\r\nx\r\n0\r\n\r\n").await;
    let res = conn.read_response().await;

    assert_error(&res, 413, "payload_too_large", "Request body is too large");
    // Let the upstream see how its side of the aborted request ended.
    eventually(STEP, "the upstream's request body to end", || {
        up.requests().iter().all(|r| r.body_end != BodyEnd::Pending)
    })
    .await;
    for r in up.requests() {
        assert_eq!(r.body_end, BodyEnd::Broken, "an over-limit request reached the upstream complete: {r:#?}");
        assert!(r.body_bytes <= 1 << 20, "{r:#?}");
    }
}

/// Sends one GET through a gateway in front of `mode` and times it.
async fn through(mode: Mode, timeout: &str) -> (Reply, Duration, TestUpstream) {
    let up = TestUpstream::with(mode).await;
    let gw = TestGateway::builder().route(RouteSpec::new("all", "/").to(&up).timeout(timeout)).start().await;
    let client = H1::new();
    let started = Instant::now();
    let res = client.get(&gw.url("/fail")).await;
    (res, started.elapsed(), up)
}

/// docs/errors.md: a 502 comes back at once when the upstream refuses.
const FAST_502: Duration = Duration::from_secs(1);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_refuses_connections_gets_502_within_a_second() {
    let (res, elapsed, _) = through(Mode::Refused, "30s").await;

    assert_error(&res, 502, "upstream_error", "Upstream service is unavailable");
    assert!(elapsed < FAST_502, "took {elapsed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_resets_the_connection_gets_502_within_a_second() {
    let (res, elapsed, up) = through(Mode::Reset, "30s").await;

    assert_error(&res, 502, "upstream_error", "Upstream service is unavailable");
    assert!(elapsed < FAST_502, "took {elapsed:?}");
    assert_eq!(up.count(), 1, "the request reached the upstream once, and was not retried");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_closes_without_answering_gets_502_within_a_second() {
    let (res, elapsed, up) = through(Mode::CloseWithoutAnswer, "30s").await;

    assert_error(&res, 502, "upstream_error", "Upstream service is unavailable");
    assert!(elapsed < FAST_502, "took {elapsed:?}");
    assert_eq!(up.count(), 1, "the request reached the upstream once, and was not retried");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_answers_a_garbage_status_line_gets_502_within_a_second() {
    let (res, elapsed, up) = through(Mode::GarbageStatus, "30s").await;

    assert_error(&res, 502, "upstream_error", "Upstream service is unavailable");
    assert!(elapsed < FAST_502, "took {elapsed:?}");
    assert_eq!(up.count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_slower_than_the_route_timeout_gets_504_at_the_timeout() {
    let (res, elapsed, up) = through(Mode::Slow(Duration::from_secs(10)), "1s").await;

    assert_error(&res, 504, "upstream_timeout", "Upstream service timed out");
    assert!(elapsed >= Duration::from_secs(1), "answered before the timeout: {elapsed:?}");
    assert!(elapsed < Duration::from_secs(3), "took {elapsed:?} for a 1s timeout");
    assert_eq!(up.count(), 1);
}
