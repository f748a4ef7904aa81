//! What the gateway makes of an upstream's HTTP/1.1 (src/wire/h1.rs, src/wire/upstream.rs): every
//! way of delimiting a response body, informational responses, and the answers it must
//! not trust (conflicting lengths, an oversized head), against a scripted upstream that
//! writes exactly the bytes each test gives it.

use crate::support::assert_error;
use crate::support::client::H1;
use crate::support::creds::Creds;
use crate::support::gateway::{RouteSpec, TestGateway};
use crate::support::raw::{RawConn, read_head_end};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

const GET: &[u8] = b"GET /wire HTTP/1.1\r\nHost: gw.test\r\n\r\n";

/// An upstream that answers the n-th request head it reads (on any connection) with the
/// n-th of `script`, then closes that connection when the answer's `close` is set.
/// Request bodies are not read.
struct Scripted {
    addr: SocketAddr,
    connections: Arc<AtomicUsize>,
    heads: Arc<Mutex<Vec<String>>>,
    /// `later` bytes written so far (on the wire, so readable by the gateway at once).
    strays: Arc<AtomicUsize>,
}

struct Answer {
    bytes: Vec<u8>,
    close: bool,
    /// Written 50 ms after the answer, unasked: bytes that arrive on their own on a
    /// connection the gateway holds idle.
    later: Option<Vec<u8>>,
}

fn answer(bytes: &[u8]) -> Answer {
    Answer { bytes: bytes.to_vec(), close: false, later: None }
}

fn answer_then_close(bytes: &[u8]) -> Answer {
    Answer { bytes: bytes.to_vec(), close: true, later: None }
}

impl Scripted {
    async fn start(script: Vec<Answer>) -> Scripted {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let heads = Arc::new(Mutex::new(Vec::new()));
        let script = Arc::new(Mutex::new(script.into_iter()));
        let strays = Arc::new(AtomicUsize::new(0));
        let (c, h, st) = (connections.clone(), heads.clone(), strays.clone());
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                c.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(serve(stream, script.clone(), h.clone(), st.clone()));
            }
        });
        Scripted { addr, connections, heads, strays }
    }

    fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    fn heads(&self) -> Vec<String> {
        self.heads.lock().unwrap().clone()
    }

    async fn gateway(&self) -> TestGateway {
        TestGateway::builder()
            .route(RouteSpec::new("all", "/").upstream_url(&format!("http://{}", self.addr)))
            .start()
            .await
    }
}

async fn serve(
    mut stream: TcpStream,
    script: Arc<Mutex<std::vec::IntoIter<Answer>>>,
    heads: Arc<Mutex<Vec<String>>>,
    strays: Arc<AtomicUsize>,
) {
    let mut buf = Vec::new();
    loop {
        let Some(end) = read_head_end(&mut stream, &mut buf).await else { return };
        let head: Vec<u8> = buf.drain(..end).collect();
        heads.lock().unwrap().push(String::from_utf8_lossy(&head).into_owned());
        let Some(a) = script.lock().unwrap().next() else { return };
        if stream.write_all(&a.bytes).await.is_err() || a.close {
            return;
        }
        if let Some(later) = a.later {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            if stream.write_all(&later).await.is_err() {
                return;
            }
            strays.fetch_add(1, Ordering::SeqCst);
        }
    }
}

/// Two requests on one client connection; the replies.
async fn two_requests(gw: &TestGateway) -> (crate::support::Reply, crate::support::Reply) {
    let mut conn = RawConn::connect(gw.addr()).await;
    conn.send(GET).await;
    let first = conn.read_response().await;
    conn.send(GET).await;
    let second = conn.read_response().await;
    (first, second)
}

/// A chunked answer with a chunk extension and a trailer reaches the client whole, and
/// its connection carries the next request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunked_answer_with_extensions_and_trailers_arrives_whole_and_its_connection_is_reused() {
    let chunked: &[u8] =
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3;ext=1\r\nabc\r\n2\r\nde\r\n0\r\nx-sum: 5\r\n\r\n";
    let up = Scripted::start(vec![answer(chunked), answer(chunked)]).await;
    let gw = up.gateway().await;
    let (first, second) = two_requests(&gw).await;
    for r in [&first, &second] {
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(&r.body[..], b"abcde");
    }
    assert_eq!(up.connections(), 1);
}

/// `Transfer-Encoding: chunked` with a `Content-Length` beside it: read as chunked (RFC
/// 9112 §6.3), and the connection is not used again, since the message is suspect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_with_both_framings_is_read_as_chunked_and_its_connection_is_not_reused() {
    let both: &[u8] =
        b"HTTP/1.1 200 OK\r\ncontent-length: 40\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n";
    let up = Scripted::start(vec![answer(both), answer(both)]).await;
    let gw = up.gateway().await;
    let (first, second) = two_requests(&gw).await;
    for r in [&first, &second] {
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(&r.body[..], b"ok");
        assert!(r.headers.get("content-length").is_none(), "the upstream's Content-Length is passed on");
    }
    assert_eq!(up.connections(), 2);
}

/// No length and no chunking: the body runs to the close, and the next request gets a
/// new connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_close_delimited_answer_arrives_whole() {
    let up = Scripted::start(vec![
        answer_then_close(b"HTTP/1.1 200 OK\r\n\r\nuntil the end"),
        answer_then_close(b"HTTP/1.0 200 OK\r\n\r\nagain"),
    ])
    .await;
    let gw = up.gateway().await;
    let (first, second) = two_requests(&gw).await;
    assert_eq!((first.status.as_u16(), &first.body[..]), (200, &b"until the end"[..]));
    assert_eq!((second.status.as_u16(), &second.body[..]), (200, &b"again"[..]));
    assert_eq!(up.connections(), 2);
}

/// `100 Continue` (and `103 Early Hints`) before the answer: skipped, the answer is
/// what the client gets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn informational_answers_before_the_final_one_are_skipped() {
    let up = Scripted::start(vec![answer(
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </a.css>\r\n\r\nHTTP/1.1 201 Created\r\ncontent-length: 4\r\n\r\ndone",
    )])
    .await;
    let gw = up.gateway().await;
    let mut conn = RawConn::connect(gw.addr()).await;
    conn.send(GET).await;
    let res = conn.read_response().await;
    assert_eq!(res.status, 201, "{}", res.text());
    assert_eq!(&res.body[..], b"done");
}

/// Answers the gateway cannot trust are the documented 502, never passed on: two different
/// lengths, a malformed length, a head over `limits.max_header_bytes`, not HTTP at all,
/// a `101` to a request that asked for no upgrade, more than 16 `1xx` in a row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_with_conflicting_lengths_or_oversized_heads_are_502() {
    let huge = format!("HTTP/1.1 200 OK\r\nx-big: {}\r\ncontent-length: 2\r\n\r\nok", "a".repeat(70 * 1024));
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("two lengths", b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\nok!".to_vec()),
        ("malformed length", b"HTTP/1.1 200 OK\r\ncontent-length: 2x\r\n\r\nok".to_vec()),
        ("oversized head", huge.into_bytes()),
        ("not HTTP", b"SSH-2.0-OpenSSH_9.6\r\n\r\n".to_vec()),
        (
            "a switch nobody asked for",
            b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n".to_vec(),
        ),
        ("1xx without end", b"HTTP/1.1 100 Continue\r\n\r\n".repeat(17)),
    ];
    for (what, bytes) in cases {
        let up = Scripted::start(vec![answer_then_close(&bytes)]).await;
        let gw = up.gateway().await;
        let mut conn = RawConn::connect(gw.addr()).await;
        conn.send(GET).await;
        let res = conn.read_response().await;
        assert_error(&res, 502, "upstream_error", "Upstream service is unavailable");
        assert_eq!(up.heads().len(), 1, "{what}");
    }
}

/// An upstream that refuses a large upload as soon as it sees the head (413) while the
/// client is still sending: the client gets that 413, not a 502 or a timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_that_comes_before_the_whole_request_body_is_passed_on() {
    let up = Scripted::start(vec![answer(b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 7\r\n\r\ntoo big")]).await;
    let gw = up.gateway().await;
    let mut conn = RawConn::connect(gw.addr()).await;
    conn.send(b"POST /upload HTTP/1.1\r\nHost: gw.test\r\ncontent-length: 10000000\r\n\r\n").await;
    conn.send(&[b'x'; 64 * 1024]).await;
    // The rest of the body is never sent: the answer must come anyway.
    let res = conn.read_response().await;
    assert_eq!(res.status, 413, "{}", res.text());
    assert_eq!(&res.body[..], b"too big");
    let heads = up.heads();
    assert_eq!(heads.len(), 1);
    assert!(heads[0].to_ascii_lowercase().contains("content-length: 10000000\r\n"), "{}", heads[0]);
}

/// An upstream that sends bytes nobody asked for on an idle connection (a second answer,
/// a late 408): the connection is not used again, so those bytes never become the next
/// client's response.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_an_upstream_sends_on_an_idle_connection_never_answer_the_next_request() {
    let first = Answer {
        bytes: b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nfirst".to_vec(),
        close: false,
        later: Some(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nevil".to_vec()),
    };
    let up = Scripted::start(vec![first, answer(b"HTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\nsecond")]).await;
    let gw = up.gateway().await;
    let mut conn = RawConn::connect(gw.addr()).await;
    conn.send(GET).await;
    assert_eq!(&conn.read_response().await.body[..], b"first");
    // The stray bytes are on the idle pooled connection before the next request goes.
    crate::support::eventually(crate::support::STEP, "the stray bytes written", || {
        up.strays.load(Ordering::SeqCst) == 1
    })
    .await;
    conn.send(GET).await;
    let res = conn.read_response().await;
    assert_eq!((res.status.as_u16(), &res.body[..]), (200, &b"second"[..]), "{}", res.text());
    assert_eq!(up.connections(), 2);
}

/// A signed upload too large to go out in one write, refused by the upstream as soon as it
/// sees the head: the client gets that 413, not a 502 or a timeout, as for a streamed body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_early_answer_to_a_large_signed_body_is_passed_on() {
    let up = Scripted::start(vec![answer(b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 7\r\n\r\ntoo big")]).await;
    let mut creds = Creds::new();
    let key = creds.hmac_user("signer");
    let gw = TestGateway::builder()
        .credentials(&creds)
        .auth_hmac("max_body", "32MiB")
        .route(RouteSpec::new("all", "/").upstream_url(&format!("http://{}", up.addr)).authenticated())
        .start()
        .await;
    let body = vec![b'x'; 16 * 1024 * 1024];
    let res = H1::new().request("POST", &gw.url("/upload"), &key.headers("POST", "/upload", &body), body).await;
    assert_eq!(res.status, 413, "{}", res.text());
    assert_eq!(&res.body[..], b"too big");
    assert_eq!(up.heads().len(), 1);
}
