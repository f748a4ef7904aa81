//! gRPC clients get gRPC errors (docs/errors.md#grpc): the real grpcio client library
//! (`tests/it/grpc/call.py`, over HTTP/2 without TLS) reads Gatehouse's refusals as the
//! status codes it documents, with the same messages as the JSON bodies, and the upstream
//! never sees the call.

use crate::support::creds::Creds;
use crate::support::gateway::{RouteSpec, TestGateway};
use crate::support::upstream::{Mode, TestUpstream};
use gatehouse::credentials::file::{FileRateLimit, spanned};
use std::path::Path;

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
