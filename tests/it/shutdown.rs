//! Graceful shutdown of the real binary on SIGTERM.

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

/// The record of a request that ends during the drain is written before the process
/// exits: the writer batches every 10 ms, and the exit right after the drain used to end
/// it with the record still queued.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_writes_the_audit_record_of_a_request_that_ended_during_the_drain() {
    let up = TestUpstream::with(Mode::Slow(Duration::from_millis(500))).await;
    let config = TestGateway::builder().limit("shutdown_grace", "20s").route(RouteSpec::new("all", "/").to(&up));
    let mut gw = GatewayProcess::serve(&config).await;
    let addr = gw.addr();
    let in_flight = tokio::spawn(async move { H1::new().get(&format!("http://{addr}/last-one")).await });
    eventually(STEP, "the slow request to reach the upstream", || up.count() == 1).await;
    gw.sigterm();
    assert_eq!(in_flight.await.unwrap().status, 200);
    let status = gw.wait(STEP).await;
    assert_eq!(status.code(), Some(0), "stderr:\n{}", gw.stderr());

    let audit = std::fs::read_to_string(gw.written().audit_path()).unwrap_or_default();
    let records: Vec<serde_json::Value> = audit.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    assert!(
        records.iter().any(|r| r["path"] == "/last-one" && r["status"] == 200),
        "no record of the request that ended during the drain:\n{audit}\nstderr:\n{}",
        gw.stderr()
    );
}
