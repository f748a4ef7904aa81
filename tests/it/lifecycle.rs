//! The API-user lifecycle end to end: a key rotated under live traffic
//! without one failed request, and `last_used_at` kept across a restart of the gateway.

use crate::support::STEP;
use crate::support::client::H1;
use crate::support::creds::Creds;
use crate::support::gateway::{RouteSpec, TestGateway};
use crate::support::process::GatewayProcess;
use crate::support::upstream::TestUpstream;
use crate::support::{assert_unauthorized, eventually, within};
use serde_json::json;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

const TOKEN: &str = "admin-test-token-0123456789abcdef";

/// Requests `/api/x` with `token` until `stop` is set; returns every status seen, in order.
fn traffic(url: String, token: String, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<Vec<u16>> {
    tokio::spawn(async move {
        let client = H1::new();
        let mut seen = Vec::new();
        while !stop.load(Ordering::SeqCst) {
            seen.push(client.get_with(&url, &[("x-api-key", token.as_str())]).await.status.as_u16());
        }
        seen
    })
}

/// Waits until the upstream has seen at least `n` requests, so that each phase really
/// ran under traffic.
async fn after_requests(up: &TestUpstream, n: usize) {
    eventually(STEP, &format!("{n} requests at the upstream"), || up.count() >= n).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_rotated_under_live_traffic_fails_no_request_and_the_old_key_is_401_at_once() {
    let up = TestUpstream::start().await;
    let mut creds = Creds::new();
    let a = creds.api_user("erp-sync");
    // The loops send as fast as the gateway answers: the default 50/s would refuse some
    // of them, and rotation, not rate limiting, is under test here.
    let gw = TestGateway::builder()
        .credentials(&creds)
        .admin(TOKEN)
        .rate_limit(1_000_000, 1_000_000)
        .route(RouteSpec::new("api", "/api/").to(&up).authenticated())
        .start()
        .await;
    let admin = gw.admin();

    // Key A in use by a loop of requests.
    let stop_a = Arc::new(AtomicBool::new(false));
    let loop_a = traffic(gw.url("/api/x"), a.token.clone(), stop_a.clone());
    after_requests(&up, 20).await;

    // Add B: both work; the integration moves to B while A's loop still runs.
    let b = admin.expect(201, "POST", "/admin/v1/users/erp-sync/keys", Some(&json!({"label": "next"}))).await;
    let b_token = b["token"].as_str().unwrap().to_string();
    let stop_b = Arc::new(AtomicBool::new(false));
    let loop_b = traffic(gw.url("/api/x"), b_token.clone(), stop_b.clone());
    let before = up.count();
    after_requests(&up, before + 40).await;

    // A's last user is gone: stop its loop, then revoke it while B's loop runs on.
    stop_a.store(true, Ordering::SeqCst);
    let a_seen = within(STEP, "key A's loop to stop", loop_a).await.unwrap();
    let path = format!("/admin/v1/users/erp-sync/keys/{}", a.key_id);
    admin.expect(200, "DELETE", &path, None).await;

    // The very next request with A is refused, and never reaches the upstream.
    let refused = H1::new().get_with(&gw.url("/api/x"), &[("x-api-key", a.token.as_str())]).await;
    assert_unauthorized(&refused, "Invalid API key");
    let before = up.count();
    after_requests(&up, before + 40).await;
    stop_b.store(true, Ordering::SeqCst);
    let b_seen = within(STEP, "key B's loop to stop", loop_b).await.unwrap();

    assert!(a_seen.len() >= 20 && b_seen.len() >= 40, "loops too short: A {} B {}", a_seen.len(), b_seen.len());
    assert!(a_seen.iter().all(|s| *s == 200), "key A failed before its revocation: {a_seen:?}");
    assert!(b_seen.iter().all(|s| *s == 200), "key B failed during the rotation: {b_seen:?}");
    // The upstream saw every loop request and not the refused one.
    assert_eq!(up.count(), a_seen.len() + b_seen.len(), "upstream saw the refused request");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn last_used_at_and_request_counts_survive_a_restart() {
    let up = TestUpstream::start().await;
    let mut creds = Creds::new();
    let key = creds.api_user("erp-sync");
    let config = TestGateway::builder()
        .credentials(&creds)
        .admin(TOKEN)
        .route(RouteSpec::new("api", "/api/").to(&up).authenticated());
    let mut gw = GatewayProcess::serve(&config).await;
    for _ in 0..3 {
        assert_eq!(H1::new().get_with(&gw.url("/api/x"), &[("x-api-key", key.token.as_str())]).await.status, 200);
    }
    let usage_path = "/admin/v1/users/erp-sync/usage";
    let before = gw.admin().expect(200, "GET", usage_path, None).await;
    let used = before["keys"][key.key_id.as_str()].clone();
    assert_eq!(used["requests"], 3, "{before}");
    assert!(used["last_used_at"].is_string(), "{before}");

    // SIGTERM flushes the usage state; a new process on the same files reads it back.
    gw.sigterm();
    assert!(gw.wait(Duration::from_secs(15)).await.success(), "{}", gw.stderr());
    let state = gw.written().credentials_path().with_extension("yaml.usage.json");
    assert!(state.exists(), "no usage state file at {}", state.display());
    let gw = GatewayProcess::serve_written(gw.into_written(), &[], &[]).await;
    let after = gw.admin().expect(200, "GET", usage_path, None).await;
    assert_eq!(after["keys"][key.key_id.as_str()], used, "usage changed across the restart: {after}");
    assert_eq!((after["requests"].clone(), after["last_used_at"].clone()), (json!(3), used["last_used_at"].clone()));
    // The credentials file itself never carries usage.
    let text = std::fs::read_to_string(gw.credentials_path()).unwrap();
    assert!(!text.contains("last_used"), "usage leaked into credentials.yaml:\n{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_state_puts_the_usage_file_where_the_config_says_and_the_cli_reads_it_there() {
    let up = TestUpstream::start().await;
    let mut creds = Creds::new();
    let key = creds.api_user("erp-sync");
    let written = TestGateway::builder()
        .credentials(&creds)
        .route(RouteSpec::new("api", "/api/").to(&up).authenticated())
        .write();
    // A state directory apart from the credentials (which may be a read-only mount).
    let state = written.dir.path().join("state");
    std::fs::create_dir(&state).unwrap();
    let usage_file = state.join("usage.json");
    let mut yaml = std::fs::read_to_string(&written.path).unwrap();
    yaml.push_str(&format!("usage_state: '{}'\n", usage_file.display()));
    std::fs::write(&written.path, yaml).unwrap();

    let mut gw = GatewayProcess::serve_written(written, &[], &[]).await;
    for _ in 0..3 {
        assert_eq!(H1::new().get_with(&gw.url("/api/x"), &[("x-api-key", key.token.as_str())]).await.status, 200);
    }
    gw.sigterm();
    assert!(gw.wait(Duration::from_secs(15)).await.success(), "{}", gw.stderr());
    let state_json: serde_json::Value = serde_json::from_slice(&std::fs::read(&usage_file).unwrap()).unwrap();
    assert_eq!(state_json["keys"][key.key_id.as_str()]["requests"], 3, "{state_json}");
    let beside = gw.written().credentials_path().with_extension("yaml.usage.json");
    assert!(!beside.exists(), "usage written beside the credentials too: {}", beside.display());

    let config = gw.written().path.display().to_string();
    let out = crate::support::process::run_cli(&["users", "show", "erp-sync", "--config", &config, "--json"]).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let shown: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(shown.to_string().contains("\"requests\":3"), "users show did not read {}: {shown}", usage_file.display());
}
