//! `gatehouse demo`: the commands it prints work and return the echoed request.

use crate::support::client::{H1, full};
use crate::support::process::GatewayProcess;
use crate::support::{STEP, free_port};
use http::Request;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_echoes_the_get_and_post_requests_it_suggests() {
    let port = free_port();
    let mut demo = GatewayProcess::demo(port).await;
    let base = format!("http://127.0.0.1:{port}");
    assert_eq!(demo.addr().port(), port);
    let client = H1::new();

    let get = client.get(&format!("{base}/api/v1/hello?x=1")).await;
    let post = client
        .send(
            Request::post(format!("{base}/api/v1/orders"))
                .header("content-type", "application/json")
                .body(full(&br#"{"order":42}"#[..]))
                .unwrap(),
        )
        .await;

    assert_eq!(get.status, 200, "{}", get.text());
    let g = get.json();
    assert_eq!(
        (g["method"].as_str(), g["path"].as_str(), g["query"].as_str()),
        (Some("GET"), Some("/api/v1/hello"), Some("x=1"))
    );
    assert_eq!(post.status, 200, "{}", post.text());
    let p = post.json();
    assert_eq!(p["method"], "POST");
    assert_eq!(p["path"], "/api/v1/orders");
    assert_eq!(p["body"], r#"{"order":42}"#);
    assert_eq!(p["headers"]["content-type"], "application/json");
    assert!(get.headers.contains_key("x-request-id"));

    // What it prints to try is what was just tried.
    let printed = demo.stdout();
    assert!(printed.contains(&format!("curl -s {base}/api/v1/hello?x=1")), "{printed}");
    assert!(printed.contains(&format!("{base}/api/v1/orders")), "{printed}");

    demo.sigterm();
    assert_eq!(demo.wait(STEP).await.code(), Some(0), "{}", demo.stderr());
}
