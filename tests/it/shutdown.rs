//! Graceful shutdown of the real binary on SIGTERM (and SIGINT).

use crate::support::client::H1;
use crate::support::gateway::{RouteSpec, TestGateway};
use crate::support::process::GatewayProcess;
use crate::support::upstream::{Mode, TestUpstream};
use crate::support::{STEP, connection_refused, eventually};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_the_in_flight_request_finish_refuses_new_connections_and_exits_0() {
    let up = TestUpstream::with(Mode::Slow(Duration::from_secs(2))).await;
    let config = TestGateway::builder().limit("shutdown_grace", "20s").route(RouteSpec::new("all", "/").to(&up));
    let mut gw = GatewayProcess::serve(&config).await;
    let addr = gw.addr();

    let in_flight = tokio::spawn(async move { H1::new().get(&format!("http://{addr}/slow")).await });
    eventually(STEP, "the slow request to reach the upstream", || up.count() == 1).await;
    gw.sigterm();

    // New connections are refused while the slow request is still being answered.
    let mut refused = false;
    for _ in 0..50 {
        if connection_refused(addr).await {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(refused, "new connections were still accepted after SIGTERM");
    assert!(!in_flight.is_finished(), "the in-flight request finished before new connections were refused");

    let res = in_flight.await.unwrap();
    assert_eq!(res.status, 200, "{}", res.text());
    assert_eq!(res.json()["target"], "/slow");
    let status = gw.wait(STEP).await;
    assert_eq!(status.code(), Some(0), "stderr:\n{}", gw.stderr());
    assert_eq!(up.count(), 1);
    assert!(gw.stderr().contains("drained"), "stderr:\n{}", gw.stderr());
}

/// Every request that got a response during the drain has its audit record on disk
/// before the process exits 0: the writer batches every 10 ms, and the exit right after
/// the drain used to end it with records still queued. 100 requests in flight, each on
/// its own connection, for SIGTERM and for SIGINT.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_stop_writes_the_audit_record_of_every_request_that_ended_during_the_drain() {
    const IN_FLIGHT: usize = 100;
    for signal in ["TERM", "INT"] {
        let up = TestUpstream::with(Mode::Slow(Duration::from_millis(500))).await;
        let config = TestGateway::builder().limit("shutdown_grace", "20s").route(RouteSpec::new("all", "/").to(&up));
        let mut gw = GatewayProcess::serve(&config).await;
        let addr = gw.addr();
        let in_flight: Vec<_> = (0..IN_FLIGHT)
            .map(|i| tokio::spawn(async move { H1::new().get(&format!("http://{addr}/drain/{i}")).await }))
            .collect();
        eventually(STEP, "every request to reach the upstream", || up.count() == IN_FLIGHT).await;
        match signal {
            "TERM" => gw.sigterm(),
            _ => gw.sigint(),
        }
        for r in in_flight {
            assert_eq!(r.await.unwrap().status, 200, "SIG{signal}");
        }
        let status = gw.wait(STEP).await;
        assert_eq!(status.code(), Some(0), "SIG{signal}: stderr:\n{}", gw.stderr());

        let audit = std::fs::read_to_string(gw.written().audit_path()).unwrap_or_default();
        let written = audit
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|r| r["path"].as_str().is_some_and(|p| p.starts_with("/drain/")) && r["status"] == 200)
            .count();
        assert_eq!(written, IN_FLIGHT, "SIG{signal}: records of the requests answered during the drain");
    }
}
