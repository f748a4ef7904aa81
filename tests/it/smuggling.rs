//! Request smuggling and malformed HTTP/1: every ambiguous head is refused with a documented
//! JSON 400 and a closed connection before anything reaches the upstream.

use crate::support::assert_error;
use crate::support::gateway::{RouteSpec, TestGateway};
use crate::support::raw::RawConn;
use crate::support::upstream::{BodyEnd, TestUpstream};
use std::time::Duration;

const MALFORMED: &str = "Malformed HTTP request";

/// Sends each raw request on its own connection and asserts the documented 400, the closed
/// connection, and an upstream that saw nothing.
async fn assert_refused(cases: &[&[u8]]) {
    let up = TestUpstream::start().await;
    let gw = TestGateway::builder().route(RouteSpec::new("all", "/").to(&up)).start().await;

    for raw in cases {
        let mut conn = RawConn::connect(gw.addr()).await;
        conn.send(raw).await;
        let res = conn.read_response().await;

        let shown = String::from_utf8_lossy(raw);
        assert_eq!(res.status, 400, "{shown:?}: {}", res.text());
        assert_error(&res, 400, "invalid_request", MALFORMED);
        assert_eq!(res.header("connection"), "close", "{shown:?}");
        conn.expect_closed(Duration::from_secs(10)).await;
    }

    assert_eq!(up.count(), 0, "the upstream saw {:#?}", up.requests());
    assert_eq!(up.connections(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_request_line_gets_400_json_and_a_closed_connection() {
    assert_refused(&[
        b"GET /a b HTTP/1.1\r\nHost: gw.test\r\n\r\n",
        b"GET / HTTP/1.1 extra\r\nHost: gw.test\r\n\r\n",
        b"G@T / HTTP/1.1\r\nHost: gw.test\r\n\r\n",
        b"GET / HTTP/7.1\r\nHost: gw.test\r\n\r\n",
    ])
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_header_gets_400_json_and_a_closed_connection() {
    assert_refused(&[
        b"GET / HTTP/1.1\r\nHost: gw.test\r\nBad Header: x\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: gw.test\r\nNoColon\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: gw.test\r\nX-Nul: a\0b\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: gw.test\r\nContent-Length : 0\r\n\r\n",
    ])
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_different_content_lengths_get_400_and_nothing_is_forwarded() {
    assert_refused(&[
        b"POST / HTTP/1.1\r\nHost: gw.test\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
        b"POST / HTTP/1.1\r\nHost: gw.test\r\nContent-Length: 5, 6\r\n\r\nhello!",
        b"POST / HTTP/1.1\r\nHost: gw.test\r\nContent-Length: -5\r\n\r\nhello",
        b"POST / HTTP/1.1\r\nHost: gw.test\r\nContent-Length: +5\r\n\r\nhello",
    ])
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_transfer_encoding_gets_400_and_nothing_is_forwarded() {
    assert_refused(&[
        b"POST / HTTP/1.1\r\nHost: gw.test\r\nTransfer-Encoding: xchunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: gw.test\r\nTransfer-Encoding: chunked, identity\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: gw.test\r\nTransfer-Encoding: gzip\r\n\r\nhello",
        b"POST / HTTP/1.0\r\nHost: gw.test\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    ])
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_obs_fold_header_gets_400_and_nothing_is_forwarded() {
    assert_refused(&[
        b"GET / HTTP/1.1\r\nHost: gw.test\r\nX-Folded: first\r\n second\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: gw.test\r\nTransfer-Encoding:\r\n chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    ])
    .await;
}

/// RFC 9112 §6.1: with both headers, Transfer-Encoding wins and the connection closes
/// after the response. hyper does exactly that, so the bytes after the chunked body —
/// a smuggled second request if a front-end had used Content-Length — are never read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_length_with_chunked_is_read_as_chunked_and_the_connection_closes_after() {
    let up = TestUpstream::start().await;
    let gw = TestGateway::builder().route(RouteSpec::new("all", "/").to(&up)).start().await;

    let mut conn = RawConn::connect(gw.addr()).await;
    conn.send(
        b"POST /front HTTP/1.1\r\nHost: gw.test\r\nContent-Length: 13\r\nTransfer-Encoding: chunked\r\n\r\n\
          5\r\nhello\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: gw.test\r\n\r\n",
    )
    .await;
    let res = conn.read_response().await;

    assert_eq!(res.status, 200, "{}", res.text());
    assert_eq!(res.header("connection"), "close");
    assert_eq!(res.json()["body_bytes"], 5);
    conn.expect_closed(Duration::from_secs(10)).await;
    let seen = up.only_request();
    assert_eq!(seen.target, "/front");
    assert_eq!(seen.body_prefix, b"hello");
    assert_eq!(seen.body_end, BodyEnd::Complete);
    // Exactly one framing header reaches the upstream.
    assert!(seen.lacks("content-length"), "{:?}", seen.headers);
    assert_eq!(seen.values("transfer-encoding"), ["chunked"]);
}
