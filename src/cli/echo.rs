//! The demo's built-in upstream: answers every request with what it received, as JSON
//! (method, path, query, headers, body), so a person can see exactly what Gatehouse
//! forwarded.

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use std::convert::Infallible;
use std::net::SocketAddr;
use tokio::net::TcpListener;

/// Bodies longer than this are counted, not echoed.
const ECHO_LIMIT: usize = 64 * 1024;

/// Starts the echo server on `addr` and returns the bound address.
pub async fn spawn(addr: SocketAddr) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            };
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|req| async { Ok::<_, Infallible>(echo(req).await) });
                let _ = auto::Builder::new(TokioExecutor::new()).serve_connection(TokioIo::new(stream), svc).await;
            });
        }
    });
    Ok(local)
}

async fn echo(req: Request<Incoming>) -> Response<Full<Bytes>> {
    let (parts, mut body) = req.into_parts();
    let mut kept = Vec::new();
    let mut total = 0usize;
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else { break };
        if let Some(d) = frame.data_ref() {
            total += d.len();
            let room = ECHO_LIMIT.saturating_sub(kept.len());
            kept.extend_from_slice(&d[..d.len().min(room)]);
        }
    }
    let headers: serde_json::Map<String, serde_json::Value> = parts
        .headers
        .keys()
        .map(|k| {
            let vals: Vec<String> =
                parts.headers.get_all(k).iter().map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned()).collect();
            (k.as_str().to_string(), serde_json::Value::from(vals.join(", ")))
        })
        .collect();
    let reply = serde_json::json!({
        "method": parts.method.as_str(),
        "path": parts.uri.path(),
        "query": parts.uri.query(),
        "headers": headers,
        "body": String::from_utf8_lossy(&kept),
        "body_bytes": total,
    });
    let mut res = Response::new(Full::new(Bytes::from(reply.to_string())));
    res.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
    res
}
