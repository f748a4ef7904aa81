//! `TestUpstream`: a real HTTP server on 127.0.0.1:0 that records every request it
//! receives, so that a test can assert what was forwarded, and "nothing at all".

use super::{Generated, MIB};
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Version};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use std::convert::Infallible;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

/// How the upstream answers.
#[derive(Debug, Clone)]
pub enum Mode {
    /// 200 with a JSON description of the request it received.
    Echo,
    /// Like `Echo`, after sleeping this long.
    Slow(Duration),
    /// 200 with a streamed (chunked) body of this many bytes.
    LargeBody(u64),
    /// `101 Switching Protocols`, then writes `welcome\n` and echoes every byte back.
    Upgrade,
    /// Raw TCP: reads the request head, answers a status line that is not HTTP.
    GarbageStatus,
    /// Raw TCP: reads the request head, then resets the connection (RST).
    Reset,
    /// Raw TCP: reads the request head, then closes without answering (FIN).
    CloseWithoutAnswer,
    /// Nothing listens: the port was bound, then released, so connections are refused.
    Refused,
    /// Like `Echo`, with this status.
    Status(u16),
}

/// How a request body ended at the upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyEnd {
    /// Still arriving (or the head is all there was, for the raw modes).
    Pending,
    /// Ended cleanly: the upstream got a complete request.
    Complete,
    /// The connection broke mid-body: the request was never complete.
    Broken,
}

/// One request as the upstream received it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: Method,
    /// Path and query, exactly as received.
    pub target: String,
    pub version: Version,
    pub headers: HeaderMap,
    /// Body bytes received (counted while streaming; never buffered).
    pub body_bytes: u64,
    /// How the body ended, as far as the upstream can tell yet.
    pub body_end: BodyEnd,
    /// The first 64 KiB of the body.
    pub body_prefix: Vec<u8>,
    /// The request's trailers, if it had any.
    pub trailers: Option<HeaderMap>,
}

impl Seen {
    /// Every value of `name`, as text.
    pub fn values(&self, name: &str) -> Vec<String> {
        self.headers.get_all(name).iter().map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned()).collect()
    }

    /// The single value of `name` (panics when absent or repeated).
    pub fn header(&self, name: &str) -> String {
        let v = self.values(name);
        assert_eq!(v.len(), 1, "upstream expected exactly one {name} header, got {v:?} in {:?}", self.headers);
        v.into_iter().next().unwrap_or_default()
    }

    /// True when `name` is absent.
    pub fn lacks(&self, name: &str) -> bool {
        !self.headers.contains_key(name)
    }
}

#[derive(Default)]
struct Log {
    seen: Mutex<Vec<Seen>>,
    connections: AtomicUsize,
    /// TLS handshakes that failed (an `https` upstream only).
    tls_failures: AtomicUsize,
    /// While true, every request is recorded and then left unanswered.
    hang: tokio::sync::watch::Sender<bool>,
}

/// A recording upstream. Stops serving when dropped.
pub struct TestUpstream {
    addr: SocketAddr,
    id: Arc<str>,
    log: Arc<Log>,
    task: Option<tokio::task::JoinHandle<()>>,
    tls: bool,
}

impl Drop for TestUpstream {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

impl TestUpstream {
    /// An echoing upstream.
    pub async fn start() -> TestUpstream {
        Self::with(Mode::Echo).await
    }

    /// An upstream answering as `mode` says.
    pub async fn with(mode: Mode) -> TestUpstream {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let id: Arc<str> = Arc::from(addr.port().to_string());
        let log = Arc::new(Log::default());
        if let Mode::Refused = mode {
            drop(listener);
            return TestUpstream { addr, id, log, task: None, tls: false };
        }
        let task = tokio::spawn(accept_loop(listener, mode, id.clone(), log.clone(), None));
        TestUpstream { addr, id, log, task: Some(task), tls: false }
    }

    /// An upstream speaking HTTPS with `cert` (PEM certificate chain and key); with
    /// `client_ca`, it requires a client certificate that CA signed (mTLS).
    pub async fn tls(mode: Mode, cert: &super::pki::Leaf, client_ca: Option<&str>) -> TestUpstream {
        Self::tls_alpn(mode, cert, client_ca, &[b"h2", b"http/1.1"]).await
    }

    /// An echoing HTTPS upstream that offers only `http/1.1` by ALPN.
    pub async fn tls_http1_only(cert: &super::pki::Leaf) -> TestUpstream {
        Self::tls_alpn(Mode::Echo, cert, None, &[b"http/1.1"]).await
    }

    async fn tls_alpn(mode: Mode, cert: &super::pki::Leaf, client_ca: Option<&str>, alpn: &[&[u8]]) -> TestUpstream {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let chain: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(cert.cert_pem.as_bytes()).collect::<Result<_, _>>().unwrap();
        let key = PrivateKeyDer::from_pem_slice(cert.key_pem.as_bytes()).unwrap();
        let builder = rustls::ServerConfig::builder_with_provider(gatehouse::tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap();
        let builder = match client_ca {
            None => builder.with_no_client_auth(),
            Some(ca) => {
                let mut roots = rustls::RootCertStore::empty();
                for c in CertificateDer::pem_slice_iter(ca.as_bytes()) {
                    roots.add(c.unwrap()).unwrap();
                }
                builder.with_client_cert_verifier(
                    rustls::server::WebPkiClientVerifier::builder(Arc::new(roots)).build().unwrap(),
                )
            }
        };
        let mut config = builder.with_single_cert(chain, key).unwrap();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let id: Arc<str> = Arc::from(addr.port().to_string());
        let log = Arc::new(Log::default());
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let task = tokio::spawn(accept_loop(listener, mode, id.clone(), log.clone(), Some(acceptor)));
        TestUpstream { addr, id, log, task: Some(task), tls: true }
    }

    /// The port it listens on (127.0.0.1).
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// From now on, requests are recorded and then left unanswered (`true`), or answered
    /// again (`false`, which also answers the ones waiting).
    pub fn set_hanging(&self, hang: bool) {
        self.log.hang.send_replace(hang);
    }

    /// Requests received for `path` (path and query) so far.
    pub fn count_of(&self, path: &str) -> usize {
        self.log.seen.lock().unwrap().iter().filter(|s| s.target == path).count()
    }

    /// How many TLS handshakes failed.
    pub fn tls_failures(&self) -> usize {
        self.log.tls_failures.load(Ordering::SeqCst)
    }

    /// `http://127.0.0.1:<port>` (`https://` for a TLS upstream), for a route's `upstream`.
    pub fn url(&self) -> String {
        format!("{}://{}", if self.tls { "https" } else { "http" }, self.addr)
    }

    /// `h2c://127.0.0.1:<port>`: the same upstream reached with HTTP/2 by prior knowledge.
    pub fn h2c_url(&self) -> String {
        format!("h2c://{}", self.addr)
    }

    /// The value of the `x-upstream-id` header this upstream puts on its responses.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// How many requests reached this upstream (request heads received).
    pub fn count(&self) -> usize {
        self.log.seen.lock().unwrap().len()
    }

    /// How many TCP connections were accepted.
    pub fn connections(&self) -> usize {
        self.log.connections.load(Ordering::SeqCst)
    }

    /// Every request received so far.
    pub fn requests(&self) -> Vec<Seen> {
        self.log.seen.lock().unwrap().clone()
    }

    /// The only request received (panics unless exactly one arrived).
    pub fn only_request(&self) -> Seen {
        let all = self.requests();
        assert_eq!(all.len(), 1, "expected exactly one upstream request, got {all:#?}");
        all.into_iter().next().unwrap()
    }
}

async fn accept_loop(
    listener: TcpListener,
    mode: Mode,
    id: Arc<str>,
    log: Arc<Log>,
    tls: Option<tokio_rustls::TlsAcceptor>,
) {
    // Dropping the JoinSet (when this task is aborted) aborts every connection task.
    let mut conns = JoinSet::new();
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        log.connections.fetch_add(1, Ordering::SeqCst);
        let (mode, id, log, tls) = (mode.clone(), id.clone(), log.clone(), tls.clone());
        conns.spawn(async move {
            match (mode, tls) {
                (mode @ (Mode::GarbageStatus | Mode::Reset | Mode::CloseWithoutAnswer), None) => {
                    raw(stream, mode, &log).await
                }
                (mode, None) => serve(stream, mode, id, log).await,
                (mode, Some(acceptor)) => match acceptor.accept(stream).await {
                    Ok(s) => serve(s, mode, id, log).await,
                    Err(_) => {
                        log.tls_failures.fetch_add(1, Ordering::SeqCst);
                    }
                },
            }
        });
        while conns.try_join_next().is_some() {}
    }
}

/// Serves HTTP (1.1 or 2) on one connection.
async fn serve<I>(io: I, mode: Mode, id: Arc<str>, log: Arc<Log>)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let svc = hyper::service::service_fn(move |req| {
        let (mode, id, log) = (mode.clone(), id.clone(), log.clone());
        async move { Ok::<_, Infallible>(answer(req, mode, id, log).await) }
    });
    let mut b = auto::Builder::new(TokioExecutor::new());
    // Room for every header a test sends plus the ones the gateway adds:
    // the gateway's limits are under test, not hyper's default of 100.
    b.http1().max_headers(1000);
    let _ = b.serve_connection_with_upgrades(TokioIo::new(io), svc).await;
}

type UpBody = BoxBody<Bytes, Infallible>;

/// Request headers that ask the echo upstream to add `name: value` to its response.
pub const RESPOND_WITH: &str = "x-test-respond-with";

async fn answer(mut req: Request<Incoming>, mode: Mode, id: Arc<str>, log: Arc<Log>) -> Response<UpBody> {
    let on_upgrade = hyper::upgrade::on(&mut req);
    let (parts, mut body) = req.into_parts();
    let target = parts.uri.path_and_query().map_or_else(|| parts.uri.to_string(), |pq| pq.as_str().to_string());
    let index = {
        let mut seen = log.seen.lock().unwrap();
        seen.push(Seen {
            method: parts.method.clone(),
            target: target.clone(),
            version: parts.version,
            headers: parts.headers.clone(),
            body_bytes: 0,
            body_end: BodyEnd::Pending,
            body_prefix: Vec::new(),
            trailers: None,
        });
        seen.len() - 1
    };
    let mut hang = log.hang.subscribe();
    let _ = hang.wait_for(|h| !*h).await;
    let (mut count, mut prefix, mut end) = (0u64, Vec::new(), BodyEnd::Complete);
    let mut trailers = None;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(f) => {
                if let Some(t) = f.trailers_ref() {
                    trailers = Some(t.clone());
                }
                if let Some(d) = f.data_ref() {
                    count += d.len() as u64;
                    let room = (64 * 1024usize).saturating_sub(prefix.len());
                    prefix.extend_from_slice(&d[..d.len().min(room)]);
                }
            }
            Err(_) => {
                end = BodyEnd::Broken;
                break;
            }
        }
    }
    {
        let mut seen = log.seen.lock().unwrap();
        let s = &mut seen[index];
        s.body_bytes = count;
        s.body_end = end;
        s.body_prefix = prefix;
        s.trailers = trailers;
    }

    let mut res = match mode {
        Mode::Upgrade => {
            tokio::spawn(async move {
                if let Ok(upgraded) = on_upgrade.await {
                    let mut io = TokioIo::new(upgraded);
                    let _ = io.write_all(b"welcome\n").await;
                    let mut buf = vec![0u8; 4096];
                    while let Ok(n) = io.read(&mut buf).await {
                        if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                }
            });
            let mut res = Response::new(Empty::new().boxed());
            *res.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
            res.headers_mut().insert("connection", HeaderValue::from_static("upgrade"));
            res.headers_mut().insert("upgrade", HeaderValue::from_static("websocket"));
            res
        }
        Mode::LargeBody(len) => Response::new(Generated::streamed(len).boxed()),
        Mode::Slow(d) => {
            tokio::time::sleep(d).await;
            echo(&parts, &target, count, &id)
        }
        Mode::Status(code) => {
            let mut res = echo(&parts, &target, count, &id);
            *res.status_mut() = StatusCode::from_u16(code).unwrap();
            res
        }
        _ => echo(&parts, &target, count, &id),
    };
    res.headers_mut().insert("x-upstream-id", HeaderValue::from_str(&id).unwrap());
    for v in parts.headers.get_all(RESPOND_WITH) {
        if let Some((k, v)) = v.to_str().ok().and_then(|s| s.split_once(':'))
            && let (Ok(k), Ok(v)) = (HeaderName::from_bytes(k.trim().as_bytes()), HeaderValue::from_str(v.trim()))
        {
            res.headers_mut().append(k, v);
        }
    }
    res
}

fn echo(parts: &http::request::Parts, target: &str, body_bytes: u64, id: &str) -> Response<UpBody> {
    let headers: serde_json::Map<String, serde_json::Value> = parts
        .headers
        .keys()
        .map(|k| {
            let vals: Vec<String> =
                parts.headers.get_all(k).iter().map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned()).collect();
            (k.as_str().to_string(), serde_json::Value::from(vals))
        })
        .collect();
    let reply = serde_json::json!({
        "upstream": id,
        "method": parts.method.as_str(),
        "target": target,
        "version": format!("{:?}", parts.version),
        "headers": headers,
        "body_bytes": body_bytes,
    });
    let mut res = Response::new(Full::new(Bytes::from(reply.to_string())).boxed());
    res.headers_mut().insert("content-type", HeaderValue::from_static("application/json"));
    res
}

/// The raw-TCP misbehaviours. The request head is read (and recorded) first, so the
/// gateway has really sent its request when the upstream misbehaves.
async fn raw(mut stream: TcpStream, mode: Mode, log: &Log) {
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < MIB as usize {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    let line = String::from_utf8_lossy(&head).lines().next().unwrap_or_default().to_string();
    let mut words = line.split(' ');
    log.seen.lock().unwrap().push(Seen {
        method: Method::from_bytes(words.next().unwrap_or("GET").as_bytes()).unwrap_or(Method::GET),
        target: words.next().unwrap_or_default().to_string(),
        version: Version::HTTP_11,
        headers: HeaderMap::new(),
        body_bytes: 0,
        body_end: BodyEnd::Pending,
        body_prefix: Vec::new(),
        trailers: None,
    });
    match mode {
        Mode::GarbageStatus => {
            let _ = stream.write_all(b"HTTP/1.1 2x0 What Is This\r\ncontent-length: 0\r\n\r\n").await;
            let _ = stream.flush().await;
            // Keep the connection open a moment: the failure must come from the garbage,
            // not from the close.
            tokio::time::sleep(Duration::from_secs(5)).await;
        }
        Mode::Reset => {
            let _ = stream.set_zero_linger();
            drop(stream);
        }
        _ => drop(stream),
    }
}
