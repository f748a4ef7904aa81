//! `gatehouse demo`: the credentials and commands it prints work against it.

use crate::support::client::{H1, full};
use crate::support::process::GatewayProcess;
use crate::support::{STEP, free_port};
use http::Request;

/// The value printed after `label` (up to the next space or end of line).
fn printed_after<'a>(out: &'a str, label: &str) -> &'a str {
    let start = out.find(label).unwrap_or_else(|| panic!("{label:?} not in {out}")) + label.len();
    out[start..].split_whitespace().next().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_credentials_and_printed_commands_work() {
    let port = free_port();
    let mut demo = GatewayProcess::demo(port).await;
    let base = format!("http://127.0.0.1:{port}");
    assert_eq!(demo.addr().port(), port);
    let out = demo.stdout();
    let token = printed_after(&out, "token: ").to_string();
    let key_id = printed_after(&out, "key id: ").to_string();
    let secret = printed_after(&out, "secret: ").to_string();
    assert!(token.starts_with("ghk_") && key_id.starts_with("hk_") && secret.starts_with("ghs_"), "{out}");
    assert!(out.contains(&format!("curl -s -H 'X-API-Key: {token}' {base}/api/v1/hello?x=1")), "{out}");
    let client = H1::new();

    // api_key user, X-API-Key
    let get = client
        .send(
            Request::get(format!("{base}/api/v1/hello?x=1")).header("x-api-key", &token).body(full(&b""[..])).unwrap(),
        )
        .await;
    assert_eq!(get.status, 200, "{}", get.text());
    let g = get.json();
    assert_eq!(
        (g["method"].as_str(), g["path"].as_str(), g["query"].as_str()),
        (Some("GET"), Some("/api/v1/hello"), Some("x=1"))
    );
    assert_eq!(g["headers"]["x-gatehouse-user"], "demo-api");
    assert!(g["headers"].get("x-api-key").is_none(), "credential forwarded: {g}");

    // api_key user, Bearer, with a body
    let post = client
        .send(
            Request::post(format!("{base}/api/v1/orders"))
                .header("authorization", format!("Bearer {token}"))
                .header("content-type", "application/json")
                .body(full(&br#"{"order":42}"#[..]))
                .unwrap(),
        )
        .await;
    assert_eq!(post.status, 200, "{}", post.text());
    assert_eq!(post.json()["body"], r#"{"order":42}"#);

    // hmac user, with the printed `gatehouse sign` command's headers
    let sign = std::process::Command::new(env!("CARGO_BIN_EXE_gatehouse"))
        .args([
            "sign",
            "--key-id",
            &key_id,
            "--secret",
            &secret,
            "--method",
            "GET",
            "--path",
            "/api/v1/hello",
            "--curl",
        ])
        .output()
        .unwrap();
    assert!(sign.status.success());
    let mut req = Request::get(format!("{base}/api/v1/hello"));
    for arg in String::from_utf8(sign.stdout).unwrap().split_whitespace() {
        let (name, value) = arg.trim_start_matches("-H").split_once(':').unwrap();
        req = req.header(name, value);
    }
    let signed = client.send(req.body(full(&b""[..])).unwrap()).await;
    assert_eq!(signed.status, 200, "{}", signed.text());
    assert_eq!(signed.json()["headers"]["x-gatehouse-user"], "demo-hmac");

    // the committed Python client, exactly as the demo prints it
    let py = std::process::Command::new("python3")
        .args(["examples/hmac_client.py", "--url", &format!("{base}/api/v1/orders?x=1"), "--key-id", &key_id])
        .args(["--secret", &secret, "--method", "POST", "--body", r#"{"order":42}"#])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("python3 runs");
    let py_out = String::from_utf8_lossy(&py.stdout);
    assert!(py.status.success(), "{py_out} {}", String::from_utf8_lossy(&py.stderr));
    assert!(py_out.starts_with("200 ") && py_out.contains(r#""x-gatehouse-user":"demo-hmac""#), "{py_out}");

    // the anonymous route, and no credential on the protected one
    assert_eq!(client.get(&format!("{base}/public/status")).await.status, 200);
    let missing = client.get(&format!("{base}/api/v1/hello")).await;
    assert_eq!(missing.status, 401);
    assert_eq!(missing.json()["message"], "API key is missing");

    // the printed 403: a path no rule of the demo role grants
    assert!(out.contains(&format!("curl -s -H 'X-API-Key: {token}' {base}/internal/report")), "{out}");
    let denied = client.get_with(&format!("{base}/internal/report"), &[("x-api-key", token.as_str())]).await;
    assert_eq!(denied.status, 403, "{}", denied.text());
    assert_eq!(denied.json()["code"], "permission_error");

    // the printed metrics command's admin listener, and one audit line per request on stdout
    let metrics_url = out.split_whitespace().find(|w| w.ends_with("/metrics")).unwrap_or_else(|| panic!("{out}"));
    let metrics = client.get(metrics_url).await;
    assert_eq!(metrics.status, 200);
    let metrics = metrics.text();
    assert!(
        metrics.lines().any(|l| l.starts_with("gatehouse_requests_total{") && l.contains("status_class=\"4xx\"")),
        "{metrics}"
    );
    let audit = crate::support::eventually(STEP, "the 403's audit line on stdout", || {
        demo.stdout().lines().any(|l| l.contains(r#""path":"/internal/report""#) && l.contains(r#""status":403"#))
    });
    audit.await;

    demo.sigterm();
    assert_eq!(demo.wait(STEP).await.code(), Some(0), "{}", demo.stderr());
}
