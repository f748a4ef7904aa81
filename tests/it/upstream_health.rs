//! Health of upstream targets (docs/configuration.md#health): active checks take a
//! hanging target out and bring it back, a route with no healthy target answers 503
//! `upstream_unavailable` at once, consecutive 5xx eject a target (passive), and
//! `least_requests` steers away from a slow target. What the metrics say is read from the
//! admin listener.

use crate::support::assert_error;
use crate::support::client::H1;
use crate::support::gateway::{RouteSpec, TestGateway};
use crate::support::upstream::{Mode, TestUpstream};
use std::time::{Duration, Instant};

const ADMIN: &str = "health-admin-token-0123456789abcdef";
/// Checks every 200 ms, 100 ms to answer, two in a row either way: a target that hangs
/// is out within interval × threshold (400 ms) after its first failed check began.
const CHECK: &str = "health_check: { path: /health, interval: 200ms, timeout: 100ms, healthy: 2, unhealthy: 2 }";
/// How long the active check may take to decide, with room for a slow CI box: the
/// first check may start an interval after the change, then interval × threshold,
/// plus a second.
const DECIDES_WITHIN: Duration = Duration::from_millis(200 + 2 * 200 + 1000);

/// `gatehouse_upstream_healthy` (or another per-target series) for `target`.
async fn target_metric(gw: &TestGateway, family: &str, target: &TestUpstream) -> Option<f64> {
    let text = gw.admin().get("/metrics").await.text();
    let label = format!("target=\"{}\"", target.url().trim_start_matches("http://"));
    text.lines()
        .find(|l| l.starts_with(family) && l.contains(&label))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Waits until the metrics say `target` is (un)healthy; how long that took.
async fn wait_healthy(gw: &TestGateway, target: &TestUpstream, healthy: bool) -> Duration {
    let want = if healthy { 1.0 } else { 0.0 };
    let started = Instant::now();
    loop {
        if target_metric(gw, "gatehouse_upstream_healthy{", target).await == Some(want) {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < DECIDES_WITHIN,
            "target {} not {} within {DECIDES_WITHIN:?}",
            target.url(),
            if healthy { "healthy" } else { "unhealthy" }
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Two echoing targets behind one route with active checks ([`CHECK`]), a 5 s timeout,
/// and the admin listener on (for the metrics).
async fn two_checked_targets() -> (TestUpstream, TestUpstream, TestGateway) {
    let (a, b) = (TestUpstream::start().await, TestUpstream::start().await);
    let gw = TestGateway::builder()
        .admin(ADMIN)
        .route(RouteSpec::new("r", "/api").to(&a).to(&b).timeout("5s").setting(CHECK))
        .start()
        .await;
    (a, b, gw)
}

/// A target that accepts and then hangs is taken out by the active check within its
/// thresholds and gets no request after; when it answers again it comes back.
#[tokio::test]
async fn a_hanging_target_is_taken_out_by_the_active_check_and_comes_back() {
    let (a, b, gw) = two_checked_targets().await;
    let client = H1::new();
    wait_healthy(&gw, &b, true).await;

    b.set_hanging(true);
    let out = wait_healthy(&gw, &b, false).await;
    let before = b.count_of("/api/x");
    for _ in 0..20 {
        let reply = client.get(&gw.url("/api/x")).await;
        assert_eq!(reply.status, 200, "{}", reply.text());
    }
    assert_eq!(b.count_of("/api/x"), before, "an unhealthy target got traffic");
    assert_eq!(a.count_of("/api/x"), 20);

    b.set_hanging(false);
    let back = wait_healthy(&gw, &b, true).await;
    println!(
        "hanging target out after {out:?}, back after {back:?} (interval x threshold = 400 ms, checks every 200 ms)"
    );
    for _ in 0..20 {
        assert_eq!(client.get(&gw.url("/api/x")).await.status, 200);
    }
    assert!(b.count_of("/api/x") >= before + 5, "the healthy target got no traffic back");
}

/// Every target unhealthy: 503 `upstream_unavailable` with `Retry-After: 1`, answered at
/// once (not after the route's timeout), and no target sees the request.
#[tokio::test]
async fn a_route_with_no_healthy_target_answers_503_at_once() {
    let (a, b, gw) = two_checked_targets().await;
    a.set_hanging(true);
    b.set_hanging(true);
    wait_healthy(&gw, &a, false).await;
    wait_healthy(&gw, &b, false).await;
    let client = H1::new();
    let mut took = Vec::new();
    for _ in 0..20 {
        let started = Instant::now();
        let reply = client.get(&gw.url("/api/x")).await;
        took.push(started.elapsed());
        assert_error(&reply, 503, "upstream_unavailable", "No healthy upstream is available");
        assert_eq!(reply.header("retry-after"), "1");
    }
    took.sort();
    println!("503 upstream_unavailable: median {:?}, max {:?} (route timeout 5s)", took[10], took[19]);
    assert!(took[19] < Duration::from_secs(1), "the gateway waited for an unhealthy target: {took:?}");
    assert_eq!((a.count_of("/api/x"), b.count_of("/api/x")), (0, 0));
    let text = gw.admin().get("/metrics").await.text();
    assert!(text.contains("gatehouse_upstream_errors_total{kind=\"unavailable\",route=\"r\"} 20"), "{text}");
}

/// Consecutive 5xx from one target eject it (passive, no health check configured): the
/// next requests go to the other, and the metrics count the ejection.
#[tokio::test]
async fn consecutive_5xx_eject_a_target() {
    let good = TestUpstream::start().await;
    let bad = TestUpstream::with(Mode::Status(503)).await;
    let gw = TestGateway::builder().admin(ADMIN).route(RouteSpec::new("r", "/api").to(&good).to(&bad)).start().await;
    let client = H1::new();
    // Round-robin: every other request reaches the bad target until it is ejected.
    let mut statuses = Vec::new();
    for _ in 0..10 {
        statuses.push(client.get(&gw.url("/api/x")).await.status.as_u16());
    }
    assert_eq!(statuses.iter().filter(|s| **s == 503).count(), 5, "{statuses:?}");
    assert_eq!(bad.count(), 5);
    for _ in 0..20 {
        assert_eq!(client.get(&gw.url("/api/x")).await.status, 200);
    }
    assert_eq!(bad.count(), 5, "an ejected target got traffic");
    assert_eq!(target_metric(&gw, "gatehouse_upstream_ejections_total{", &bad).await, Some(1.0));
    assert_eq!(target_metric(&gw, "gatehouse_upstream_healthy{", &bad).await, Some(0.0));
    assert_eq!(target_metric(&gw, "gatehouse_upstream_healthy{", &good).await, Some(1.0));
}

/// `least_requests` sends little to a target that is slow to answer, where round-robin
/// would send it half.
#[tokio::test]
async fn least_requests_steers_away_from_a_slow_target() {
    let slow = TestUpstream::with(Mode::Slow(Duration::from_millis(200))).await;
    let fast = TestUpstream::start().await;
    let gw = TestGateway::builder()
        .route(RouteSpec::new("r", "/api").to(&slow).to(&fast).setting("balance: least_requests"))
        .start()
        .await;
    let url = gw.url("/api/x");
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let url = url.clone();
        workers.spawn(async move {
            let client = H1::new();
            for _ in 0..10 {
                assert_eq!(client.get(&url).await.status, 200);
            }
        });
    }
    while let Some(r) = workers.join_next().await {
        r.unwrap();
    }
    let (s, f) = (slow.count(), fast.count());
    println!("least_requests: slow target {s}, fast target {f}");
    assert_eq!(s + f, 80);
    assert!(s * 3 < f, "slow {s}, fast {f}: the slow target got a quarter or more (round-robin: half)");
}

/// Settings that cannot work are configuration errors.
#[tokio::test]
async fn bad_health_and_balance_settings_are_refused() {
    for (setting, expected) in [
        ("balance: random", "balance \"random\": use round_robin or least_requests"),
        ("health_check: { path: health }", "must be a path starting with '/'"),
        ("health_check: { path: /h, interval: 1ms }", "interval must be at least 10ms"),
        ("health_check: { path: /h, unhealthy: 0 }", "healthy and unhealthy are counts from 1 to 100"),
        ("health_check: { path: /h, timout: 1s }", "timout"),
    ] {
        let written = TestGateway::builder()
            .route(RouteSpec::new("r", "/").upstream_url("http://127.0.0.1:9").setting(setting))
            .write();
        let out =
            crate::support::process::run_cli(&["check-config", "--config", &written.path.display().to_string()]).await;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(78), "{setting}: {stderr}");
        assert!(stderr.contains(expected), "{setting}: {stderr}");
    }
}
