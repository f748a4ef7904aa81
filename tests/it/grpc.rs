//! gRPC through Gatehouse, with the real grpcio library on both sides (scripts in
//! `tests/it/grpc/`): every kind of call passes with its trailers to an HTTP/2 upstream;
//! refusals reach the client as the gRPC status codes docs/errors.md#grpc documents, with
//! the same messages as the JSON bodies, and the upstream never sees the call.

use crate::support::creds::Creds;
use crate::support::gateway::{RouteSpec, TestGateway};
use crate::support::upstream::{Mode, TestUpstream};
use gatehouse::credentials::file::{FileRateLimit, spanned};
use std::path::Path;
use std::time::Duration;

/// Runs `call.py` against `addr`: one JSON line per call.
async fn grpc_calls(
    addr: std::net::SocketAddr,
    method: &str,
    meta: &[(&str, &str)],
    times: u32,
) -> Vec<serde_json::Value> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/it/grpc/call.py");
    let mut cmd = tokio::process::Command::new("python3");
    cmd.arg(script).arg(addr.to_string()).arg(method).arg("--times").arg(times.to_string());
    for (k, v) in meta {
        cmd.arg("--meta").arg(format!("{k}={v}"));
    }
    let out = cmd.output().await.expect("python3 runs (grpcio is installed by .ci/run)");
    assert!(out.status.success(), "call.py failed:\n{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

fn status(v: &serde_json::Value) -> (&str, &str) {
    (v["code"].as_str().unwrap(), v["details"].as_str().unwrap_or_default())
}

/// A bad key is UNAUTHENTICATED, a method the key may not call PERMISSION_DENIED, an
/// exhausted rate limit RESOURCE_EXHAUSTED, an upstream that refuses connections
/// UNAVAILABLE, each with the gateway's message; the request id comes back in the
/// metadata and the audit log records the status it stands for.
#[tokio::test]
async fn grpc_clients_get_grpc_status_codes_with_the_message() {
    let up = TestUpstream::start().await;
    let down = TestUpstream::with(Mode::Refused).await;
    let mut creds = Creds::new();
    creds.role("orders", &["POST /orders.Orders/**"]);
    let key = creds.api_user("svc");
    creds.set_roles("svc", &["orders"]);
    let revoked = creds.add_api_key("svc");
    creds.revoke(&revoked.key_id);
    let limited = creds.api_user("limited");
    creds.set_roles("limited", &["orders"]);
    creds.user("limited").rate_limit = Some(spanned(FileRateLimit { per_second: 1, burst: 1 }));
    let gw = TestGateway::builder()
        .credentials(&creds)
        .route(RouteSpec::new("down", "/orders.Orders/Down").to(&down).authenticated())
        .route(RouteSpec::new("grpc", "/").to(&up).authenticated())
        .start()
        .await;
    let bearer = format!("Bearer {}", key.token);

    let missing = grpc_calls(gw.addr(), "/orders.Orders/Get", &[], 1).await;
    assert_eq!(status(&missing[0]), ("UNAUTHENTICATED", "API key is missing"));
    let bad = grpc_calls(gw.addr(), "/orders.Orders/Get", &[("x-api-key", &revoked.token)], 1).await;
    assert_eq!(status(&bad[0]), ("UNAUTHENTICATED", "Invalid API key"));
    let forbidden = grpc_calls(gw.addr(), "/billing.Billing/Charge", &[("authorization", &bearer)], 1).await;
    assert_eq!(
        status(&forbidden[0]),
        ("PERMISSION_DENIED", "API key does not have permission to access this resource")
    );
    let limited = grpc_calls(gw.addr(), "/orders.Orders/Get", &[("x-api-key", &limited.token)], 3).await;
    for refused in &limited[1..] {
        assert_eq!(status(refused), ("RESOURCE_EXHAUSTED", "Rate limit exceeded"));
    }
    let unavailable = grpc_calls(gw.addr(), "/orders.Orders/Down", &[("x-api-key", &key.token)], 1).await;
    assert_eq!(status(&unavailable[0]), ("UNAVAILABLE", "Upstream service is unavailable"));

    // Only the one call the limit admitted was forwarded; no refused one was.
    assert_eq!(up.count(), 1, "{:?}", up.requests());
    assert_eq!(up.only_request().target, "/orders.Orders/Get");

    let id = bad[0]["request_id"].as_str().expect("x-request-id in the trailing metadata");
    let record = gw.audit_of("/orders.Orders/Get", 1).await.into_iter().find(|r| r["request_id"] == id).unwrap();
    assert_eq!(record["status"], 401);
    assert_eq!(record["reason"], "revoked");
}

/// A real gRPC server (grpcio, `tests/it/grpc/server.py`), stopped when dropped.
struct GrpcServer {
    _child: tokio::process::Child,
    port: u16,
    calls: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl GrpcServer {
    /// Plain HTTP/2 (h2c), or TLS with `cert` and `key` (h2 by ALPN).
    async fn start(tls: Option<(&Path, &Path)>) -> GrpcServer {
        use tokio::io::AsyncBufReadExt;
        let dir = tempfile::tempdir().unwrap();
        let calls = dir.path().join("calls.jsonl");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/it/grpc/server.py");
        let mut cmd = tokio::process::Command::new("python3");
        cmd.arg(script).arg(&calls).stdout(std::process::Stdio::piped()).kill_on_drop(true);
        if let Some((cert, key)) = tls {
            cmd.arg(cert).arg(key);
        }
        let mut child = cmd.spawn().expect("python3 runs");
        let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
        let port = crate::support::within(Duration::from_secs(20), "the gRPC server's port", lines.next_line())
            .await
            .unwrap()
            .expect("server.py printed its port")
            .parse()
            .unwrap();
        GrpcServer { _child: child, port, calls, _dir: dir }
    }

    /// The calls it received: method and the metadata it was sent.
    fn calls(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.calls)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

/// Runs `flows.py` through the gateway at `addr` with `key`.
async fn grpc_flows(addr: std::net::SocketAddr, key: &str) -> serde_json::Value {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/it/grpc/flows.py");
    let out =
        tokio::process::Command::new("python3").arg(script).arg(addr.to_string()).arg(key).output().await.unwrap();
    assert!(out.status.success(), "flows.py failed:\n{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Unary, server-, client- and bidirectional streaming calls from grpcio's client pass
/// through Gatehouse to grpcio's server, over h2c and over TLS (h2 by ALPN), with
/// trailers both ways (a status the upstream chose, its trailing metadata); the server
/// sees the caller's identity and no credential; a bad key never reaches it.
#[tokio::test]
async fn grpc_calls_of_every_kind_pass_through_with_trailers() {
    let dir = tempfile::tempdir().unwrap();
    let ca = crate::support::pki::Ca::new("gRPC CA");
    let (cert, key_file) = ca.leaf(&["localhost"]).write(dir.path(), "server");
    let ca_path = ca.write(dir.path(), "ca.pem");
    let plain = GrpcServer::start(None).await;
    let tls = GrpcServer::start(Some((&cert, &key_file))).await;
    let mut creds = Creds::new();
    creds.role("echo", &["POST /test.Echo/*"]);
    let key = creds.api_user("svc");
    creds.set_roles("svc", &["echo"]);
    for (name, server, route) in [
        ("h2c", &plain, RouteSpec::new("grpc", "/test.Echo/").upstream_url(&format!("h2c://127.0.0.1:{}", plain.port))),
        (
            "h2 over TLS",
            &tls,
            RouteSpec::new("grpc", "/test.Echo/")
                .upstream_url(&format!("https://localhost:{}", tls.port))
                .setting("upstream_protocol: h2")
                .setting(&format!("upstream_tls: {{ ca: {} }}", ca_path.display())),
        ),
    ] {
        let gw = TestGateway::builder().credentials(&creds).route(route.authenticated().timeout("5s")).start().await;
        let out = grpc_flows(gw.addr(), &key.token).await;
        assert_eq!(out["unary"]["reply"], "olleh", "{name}: {out}");
        assert_eq!(out["unary"]["code"], "OK", "{name}");
        assert_eq!(out["unary"]["trailers"]["x-echo-trailer"], "done", "{name}: {out}");
        assert_eq!(out["server_stream"], serde_json::json!(["s0", "s1", "s2"]), "{name}");
        assert_eq!(out["client_stream"], "abc", "{name}");
        assert_eq!(out["bidi"], serde_json::json!(["ONE", "TWO", "THREE"]), "{name}");
        assert_eq!(out["fail"]["code"], "ABORTED", "{name}: {out}");
        assert_eq!(out["fail"]["details"], "upstream says no", "{name}");
        assert_eq!(out["fail"]["trailers"]["x-why"], "on-purpose", "{name}");
        let calls = server.calls();
        let methods: Vec<&str> = calls.iter().map(|c| c["method"].as_str().unwrap()).collect();
        assert_eq!(methods, ["Unary", "ServerStream", "ClientStream", "Bidi", "Fail"], "{name}");
        for c in &calls {
            assert_eq!(c["metadata"]["x-gatehouse-user"], "svc", "{name}: {c}");
            assert_eq!(c["metadata"]["x-api-key"], serde_json::Value::Null, "{name}: the key reached the upstream");
        }
        let refused = grpc_calls(gw.addr(), "/test.Echo/Unary", &[("x-api-key", "ghk_0000")], 1).await;
        assert_eq!(status(&refused[0]).0, "UNAUTHENTICATED", "{name}");
        assert_eq!(server.calls().len(), 5, "{name}: a refused call reached the upstream");
        std::fs::remove_file(&server.calls).unwrap();
    }
}

/// The client's deadline (`grpc-timeout`) is the gateway's when it is shorter than the
/// route's timeout: the gateway answers DEADLINE_EXCEEDED itself, within about the
/// deadline (not the route's 5 s nor the server's 3 s). Sent by a raw HTTP/2 client that
/// keeps no deadline of its own, so that only the gateway's can end the call.
#[tokio::test]
async fn grpc_timeout_is_honoured_as_the_deadline() {
    let server = GrpcServer::start(None).await;
    let mut creds = Creds::new();
    let key = creds.api_user("svc");
    let gw = TestGateway::builder()
        .credentials(&creds)
        .route(
            RouteSpec::new("grpc", "/")
                .upstream_url(&format!("h2c://127.0.0.1:{}", server.port))
                .authenticated()
                .timeout("5s"),
        )
        .admin("grpc-admin-token-0123456789abcdef")
        .start()
        .await;
    let started = std::time::Instant::now();
    let headers = [("grpc-timeout", "500m".to_string()), ("x-api-key", key.token.clone())];
    let (head, _, _) = raw_grpc_call(gw.addr(), "/test.Echo/Slow", &headers, b"ping").await;
    let took = started.elapsed();
    assert_eq!(head.status, 200);
    assert_eq!(head.headers["grpc-status"], "4", "{:?}", head.headers);
    assert_eq!(head.headers["grpc-message"], "Upstream service timed out");
    assert!(took < Duration::from_millis(2900), "answered after {took:?}: grpc-timeout 500m was not the deadline");
    let record = gw.audit_of("/test.Echo/Slow", 1).await.remove(0);
    assert_eq!(record["status"], 504, "{record}");
    assert_eq!(server.calls().len(), 1);

    // A client's short deadline is not the target's failure: six in a row eject nothing.
    let headers = [("grpc-timeout", "50m".to_string()), ("x-api-key", key.token.clone())];
    for _ in 0..6 {
        let (head, _, _) = raw_grpc_call(gw.addr(), "/test.Echo/Slow", &headers, b"ping").await;
        assert_eq!(head.headers["grpc-status"], "4");
    }
    let metrics = gw.admin().get("/metrics").await.text();
    let ejections = metrics.lines().find(|l| l.starts_with("gatehouse_upstream_ejections_total{")).unwrap();
    assert!(ejections.ends_with(" 0"), "{ejections}");
}

/// One unary gRPC call by a raw HTTP/2 client (hyper's) that keeps no deadline of its
/// own: the response head, its trailers, and the body (gRPC messages, framed).
async fn raw_grpc_call(
    addr: std::net::SocketAddr,
    path: &str,
    headers: &[(&str, String)],
    message: &[u8],
) -> (http::response::Parts, Option<http::HeaderMap>, bytes::Bytes) {
    use http_body_util::BodyExt;
    let mut send = crate::support::client::h2c::<http_body_util::Full<bytes::Bytes>>(addr).await;
    let mut req = http::Request::post(format!("http://{addr}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(http_body_util::Full::new(grpc_frame(message)))
        .unwrap();
    for (k, v) in headers {
        req.headers_mut().append(http::HeaderName::from_bytes(k.as_bytes()).unwrap(), v.parse().unwrap());
    }
    let answer = send.send_request(req);
    let res = crate::support::within(Duration::from_secs(10), "the gateway's answer", answer).await.unwrap();
    let (head, body) = res.into_parts();
    let collected = crate::support::within(Duration::from_secs(10), "the body", body.collect()).await.unwrap();
    let trailers = collected.trailers().cloned();
    (head, trailers, collected.to_bytes())
}

/// One gRPC message on the wire: not compressed, its length, the bytes.
fn grpc_frame(message: &[u8]) -> bytes::Bytes {
    let mut frame = vec![0u8];
    frame.extend_from_slice(&u32::try_from(message.len()).unwrap().to_be_bytes());
    frame.extend_from_slice(message);
    frame.into()
}

/// An HMAC-signed gRPC call: the signature covers `POST`, the gRPC path and the body as
/// sent (the framed message); it passes with the upstream's trailers, and the same
/// signature sent again is refused as a replay (UNAUTHENTICATED) without reaching the
/// server.
#[tokio::test]
async fn a_signed_grpc_call_passes_and_its_replay_does_not() {
    let server = GrpcServer::start(None).await;
    let mut creds = Creds::new();
    let signer = creds.hmac_user("signer");
    let gw = TestGateway::builder()
        .credentials(&creds)
        .route(RouteSpec::new("grpc", "/").upstream_url(&format!("h2c://127.0.0.1:{}", server.port)).authenticated())
        .start()
        .await;
    let signed = signer.headers("POST", "/test.Echo/Unary", &grpc_frame(b"hello"));
    let (head, trailers, reply) = raw_grpc_call(gw.addr(), "/test.Echo/Unary", &signed, b"hello").await;
    assert_eq!(head.status, 200);
    let trailers = trailers.expect("the upstream's trailers");
    assert_eq!(trailers["grpc-status"], "0", "{trailers:?}");
    assert_eq!(trailers["x-echo-trailer"], "done");
    assert_eq!(&reply[..], &grpc_frame(b"olleh")[..]);

    let (head, _, _) = raw_grpc_call(gw.addr(), "/test.Echo/Unary", &signed, b"hello").await;
    assert_eq!(head.headers["grpc-status"], "16", "{:?}", head.headers);
    assert_eq!(head.headers["grpc-message"], "Replayed request");
    assert_eq!(server.calls().len(), 1);
}
