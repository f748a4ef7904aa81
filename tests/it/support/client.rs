//! Well-behaved clients: hyper-util's pooled client for plain HTTP/1.1, and tokio-rustls
//! plus hyper's connection handshakes for HTTP/1.1 and HTTP/2 over TLS (ALPN).

use super::{Generated, Reply, STEP, within};
use bytes::Bytes;
use http::{Request, Response};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

/// The request body type every test client sends.
pub type ReqBody = BoxBody<Bytes, Infallible>;

pub fn empty() -> ReqBody {
    Empty::new().boxed()
}

pub fn full(b: impl Into<Bytes>) -> ReqBody {
    Full::new(b.into()).boxed()
}

pub fn generated(g: Generated) -> ReqBody {
    g.boxed()
}

/// Reads a whole response.
pub async fn collect(res: Response<Incoming>) -> Reply {
    let (parts, body) = res.into_parts();
    let body = within(STEP, "response body", body.collect()).await.unwrap().to_bytes();
    Reply { status: parts.status, version: parts.version, headers: parts.headers, body }
}

/// A pooled plain HTTP/1.1 client.
pub struct H1 {
    client: Client<HttpConnector, ReqBody>,
}

impl H1 {
    pub fn new() -> H1 {
        H1 { client: Client::builder(TokioExecutor::new()).build_http() }
    }

    /// Sends `req` and returns the response head with its body still streaming.
    pub async fn send_streaming(&self, req: Request<ReqBody>) -> Response<Incoming> {
        within(STEP, "response head", self.client.request(req)).await.unwrap()
    }

    /// Sends `req` and reads the whole response.
    pub async fn send(&self, req: Request<ReqBody>) -> Reply {
        collect(self.send_streaming(req).await).await
    }

    /// GET `url`.
    pub async fn get(&self, url: &str) -> Reply {
        self.send(Request::get(url).body(empty()).unwrap()).await
    }

    /// `method url` with `headers` (appended in order, so a name may repeat) and `body`.
    pub async fn request<K: AsRef<str>, V: AsRef<str>>(
        &self,
        method: &str,
        url: &str,
        headers: &[(K, V)],
        body: impl Into<Bytes>,
    ) -> Reply {
        let mut req = Request::builder().method(method).uri(url);
        for (k, v) in headers {
            req = req.header(k.as_ref(), v.as_ref());
        }
        self.send(req.body(full(body)).unwrap()).await
    }

    /// GET `url` with `headers`.
    pub async fn get_with<K: AsRef<str>, V: AsRef<str>>(&self, url: &str, headers: &[(K, V)]) -> Reply {
        self.request("GET", url, headers, Bytes::new()).await
    }
}

/// A TLS connection to the gateway that trusts only `cert_pem` and offers `alpn`.
pub async fn tls_connect(addr: SocketAddr, cert_pem: &str, alpn: &[u8]) -> TlsStream<TcpStream> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from_pem_slice(cert_pem.as_bytes()).unwrap()).unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(gatehouse::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![alpn.to_vec()];
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = ServerName::try_from("localhost").unwrap();
    within(STEP, "TLS handshake", TlsConnector::from(Arc::new(config)).connect(name, tcp)).await.unwrap()
}

/// The protocol ALPN settled on.
pub fn alpn_of(tls: &TlsStream<TcpStream>) -> Option<Vec<u8>> {
    tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec)
}

/// One request/response exchange over an HTTP/1.1 connection on `io`.
pub async fn h1_over(io: TlsStream<TcpStream>, req: Request<ReqBody>) -> Reply {
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await.unwrap();
    tokio::spawn(conn);
    let res = within(STEP, "h1 response head", sender.send_request(req)).await.unwrap();
    collect(res).await
}

/// One request/response exchange over an HTTP/2 connection on `io`.
pub async fn h2_over(io: TlsStream<TcpStream>, req: Request<ReqBody>) -> Reply {
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(io)).await.unwrap();
    tokio::spawn(conn);
    let res = within(STEP, "h2 response head", sender.send_request(req)).await.unwrap();
    collect(res).await
}

/// A raw HTTP/2 client (hyper's, prior knowledge, no TLS) on one new connection to
/// `addr`: for requests the pooled [`H1`] cannot make (trailers, no deadline of its own).
pub async fn h2c<B>(addr: std::net::SocketAddr) -> hyper::client::conn::http2::SendRequest<B>
where
    B: http_body::Body + Unpin + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let tcp = within(STEP, "connect", tokio::net::TcpStream::connect(addr)).await.unwrap();
    let (send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp)).await.unwrap();
    tokio::spawn(conn);
    send
}
