//! Per-key rate limits and the per-IP failed-authentication budget (docs/authorization.md#rate-limits).

use crate::observability_support::{series, start_on_manual_clock};
use crate::support::client::H1;
use crate::support::creds::Creds;
use crate::support::upstream::TestUpstream;
use gatehouse::credentials::file::{FileRateLimit, spanned};
use serde_saphyr::Spanned;
use std::time::Duration;

fn rate(per_second: u32, burst: u32) -> Option<Spanned<FileRateLimit>> {
    Some(spanned(FileRateLimit { per_second, burst }))
}

fn assert_429(res: &crate::support::Reply) {
    assert_eq!(res.status, 429, "{}", res.text());
    assert_eq!(res.headers["content-type"], "application/json");
    let id = res.headers["x-request-id"].to_str().unwrap();
    assert_eq!(
        res.text(),
        format!(r#"{{"success":false,"message":"Rate limit exceeded","code":"rate_limit_error","request_id":"{id}"}}"#)
    );
    let retry: u64 = res.headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!(retry >= 1, "Retry-After is whole seconds, at least 1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_over_its_limit_gets_429_with_retry_after_and_passes_again_after_waiting() {
    let up = TestUpstream::start().await;
    let mut creds = Creds::new();
    let key = creds.api_user("slow");
    creds.user("slow").rate_limit = rate(1, 1);
    let gw = start_on_manual_clock(&creds, &up, "").await;
    let h = [("x-api-key", key.token.as_str())];
    let client = H1::new();

    let first = client.get_with(&gw.url("/a"), &h).await;
    assert_eq!(first.status, 200, "{}", first.text());
    assert_eq!(first.headers["x-ratelimit-limit"], "1");
    assert_eq!(first.headers["x-ratelimit-remaining"], "0");

    let second = client.get_with(&gw.url("/a"), &h).await;
    assert_429(&second);
    assert_eq!(up.count(), 1, "the limited request never reached the upstream");

    let wait: u64 = second.headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert_eq!(wait, 1, "1 a second: the next request is allowed within a second");
    gw.clock.advance(Duration::from_secs(wait));
    let third = client.get_with(&gw.url("/a"), &h).await;
    assert_eq!(third.status, 200, "after Retry-After the key passes again: {}", third.text());
    assert_eq!(up.count(), 2);
}

/// per_second 10, burst 10: from a cold start, 3 s of requests let exactly 10 + 10 × 3 =
/// 40 through (the gateway's clock stands still but for 10 ms steps between requests,
/// so the count does not depend on how fast this machine sends them)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limit_accuracy_at_10_per_second_with_burst_10_over_3_seconds() {
    let up = TestUpstream::start().await;
    let mut creds = Creds::new();
    let key = creds.api_user("busy");
    creds.user("busy").rate_limit = rate(10, 10);
    let gw = start_on_manual_clock(&creds, &up, "").await;
    let h = [("x-api-key", key.token.as_str())];
    let client = H1::new();
    let (mut passed, mut limited) = (0, 0);
    // Two requests per 10 ms step over 300 steps (602 requests in 3 s of gateway time):
    // always more than the limit lets through.
    for step in 0..=300 {
        if step > 0 {
            gw.clock.advance(Duration::from_millis(10));
        }
        for _ in 0..2 {
            match client.get_with(&gw.url("/a"), &h).await.status.as_u16() {
                200 => passed += 1,
                429 => limited += 1,
                other => panic!("unexpected status {other}"),
            }
        }
    }
    assert_eq!((passed, limited), (40, 562));
    assert_eq!(up.count(), passed);
}

/// after the per-IP budget of failed authentications, the IP is refused before any key
/// lookup — even with a valid key — and 10 000 random keys add no metric series (the
/// gateway's clock stands still, so no refill lands during the run: the counts are exact)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_authentications_are_limited_per_client_ip_before_any_key_lookup() {
    let up = TestUpstream::start().await;
    let mut creds = Creds::new();
    let good = creds.api_user("good");
    let gw = start_on_manual_clock(&creds, &up, "auth:\n  failed_per_ip_per_minute: 5\n").await;
    let client = H1::new();
    let unknown = |i: usize| format!("ghk_unknown{i:040}");

    for i in 0..5 {
        let r = client.get_with(&gw.url("/a"), &[("x-api-key", unknown(i))]).await;
        assert_eq!(r.status, 401, "within the budget: {}", r.text());
    }
    // The sixth failure empties the budget; from then on the IP is refused up front.
    assert_eq!(client.get_with(&gw.url("/a"), &[("x-api-key", unknown(5))]).await.status, 401);
    let refused = client.get_with(&gw.url("/a"), &[("x-api-key", good.token.as_str())]).await;
    assert_429(&refused);
    assert_eq!(up.count(), 0, "nothing reached the upstream");

    let before = series(&client.get(&gw.admin_url("/metrics")).await.text());
    for i in 0..10_000 {
        let r = client.get_with(&gw.url(&format!("/random/{i}")), &[("x-api-key", unknown(i + 100))]).await;
        assert_eq!(r.status, 429, "request {i}: {}", r.text());
    }
    let text = client.get(&gw.admin_url("/metrics")).await.text();
    let after = series(&text);
    let refusals =
        text.lines().find_map(|l| l.strip_prefix("gatehouse_auth_failures_total{reason=\"client_ip_rate_limited\"} "));
    assert_eq!(refusals.map(str::trim), Some("10001"), "the good key's refusal and the 10,000: {text}");
    let gatehouse = |s: &std::collections::BTreeSet<String>| -> Vec<String> {
        s.iter().filter(|x| x.starts_with("gatehouse_")).cloned().collect()
    };
    assert_eq!(gatehouse(&before), gatehouse(&after), "random keys and paths must not create metric series");
    assert_eq!(up.count(), 0);
    // 12 s later (5 a minute) the block is over and one more failure fits the budget; the
    // next failure blocks the IP again, the good key with it.
    gw.clock.advance(Duration::from_secs(12));
    assert_eq!(client.get_with(&gw.url("/a"), &[("x-api-key", unknown(1))]).await.status, 401);
    assert_eq!(client.get_with(&gw.url("/a"), &[("x-api-key", good.token.as_str())]).await.status, 200);
    assert_eq!(client.get_with(&gw.url("/a"), &[("x-api-key", unknown(2))]).await.status, 401);
    assert_429(&client.get_with(&gw.url("/a"), &[("x-api-key", good.token.as_str())]).await);
    assert_eq!(up.count(), 1, "only the good key's request between the two blocks");
}

/// 10 000 distinct unknown keys from one IP against the real binary: after the default
/// budget (60 a minute) every one is 429 before any lookup, the upstream sees nothing, and
/// the process grows by less than 10 MiB
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_unknown_keys_from_one_ip_cost_less_than_10_mib() {
    use crate::support::gateway::{RouteSpec, TestGateway};
    use crate::support::process::GatewayProcess;
    let up = TestUpstream::start().await;
    let mut creds = Creds::new();
    creds.api_user("good");
    let config = TestGateway::builder().credentials(&creds).route(RouteSpec::new("api", "/").to(&up).authenticated());
    let gw = GatewayProcess::serve(&config).await;
    let client = H1::new();
    let unknown = |i: usize| format!("ghk_unknown{i:040}");
    let mut statuses = std::collections::BTreeMap::<u16, usize>::new();
    // Warm up (connection pool, allocator arenas) before the baseline.
    for i in 0..100 {
        let r = client.get_with(&gw.url(&format!("/warm/{i}")), &[("x-api-key", unknown(i))]).await;
        *statuses.entry(r.status.as_u16()).or_default() += 1;
    }
    let before = gw.memory().rss_kib;
    for i in 100..10_100 {
        let r = client.get_with(&gw.url(&format!("/random/{i}")), &[("x-api-key", unknown(i))]).await;
        *statuses.entry(r.status.as_u16()).or_default() += 1;
    }
    let after = gw.memory().rss_kib;
    // The budget is 60 at once, then about one more a second of real time (this gateway
    // is a process on the system clock, so how many is not exact; the exact counts are in
    // failed_authentications_are_limited_per_client_ip_before_any_key_lookup).
    let failed = statuses.get(&401).copied().unwrap_or(0);
    assert!(failed >= 60, "the per-IP budget: {statuses:?}");
    assert_eq!(statuses.get(&429).copied().unwrap_or(0), 10_100 - failed, "{statuses:?}");
    assert_eq!(up.count(), 0, "nothing reached the upstream");
    let growth = after.saturating_sub(before);
    assert!(growth < 10 * 1024, "RSS grew by {growth} KiB (from {before} KiB)");
    eprintln!("RSS {before} KiB -> {after} KiB (+{growth} KiB) over 10 000 unknown keys");
}
