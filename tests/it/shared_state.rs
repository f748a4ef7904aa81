//! Several gateways sharing replay protection, rate limits and usage through a real Redis
//! (docs/shared-state.md): what one gateway accepted every other refuses, limits hold for
//! the fleet, usage is summed, and each fault of Redis gives the documented answer.

use crate::support::client::H1;
use crate::support::creds::{ApiKey, Creds, HmacKey};
use crate::support::gateway::{GatewayConfig, RouteSpec};
use crate::support::process::GatewayProcess;
use crate::support::redis::{self, RedisCluster, RedisServer};
use crate::support::upstream::TestUpstream;
use crate::support::{Reply, STEP, assert_error, assert_unauthorized, within};
use std::time::{Duration, Instant};

/// A config for one gateway of a fleet on `redis` (a `redis:` URL or a cluster's seeds).
fn fleet_config(creds: &Creds, up: &TestUpstream, redis: Redis<'_>, prefix: &str) -> GatewayConfig {
    let c = GatewayConfig::new()
        .credentials(creds)
        .admin("admin-test-token-0123456789abcdef")
        .route(RouteSpec::new("api", "/api/").to(up).authenticated())
        .shared_state("key_prefix", &format!("\"{prefix}\""))
        .shared_state("op_timeout", "200ms");
    match redis {
        Redis::One(url) => c.shared_state("redis", url),
        Redis::Cluster(urls) => c.shared_state("redis_cluster", &format!("[{}]", urls.join(", "))),
    }
}

#[derive(Clone, Copy)]
enum Redis<'a> {
    One(&'a str),
    Cluster(&'a [String]),
}

async fn signed(client: &H1, gw: &GatewayProcess, key: &HmacKey, ts: i64, target: &str) -> Reply {
    client
        .request("GET", &format!("http://{}{target}", gw.addr()), &key.headers_at(ts, "GET", target, b""), Vec::new())
        .await
}

async fn start_fleet(config: &GatewayConfig, n: usize) -> Vec<GatewayProcess> {
    let mut fleet = Vec::new();
    for _ in 0..n {
        fleet.push(GatewayProcess::serve(config).await);
    }
    fleet
}

/// A signature accepted by one gateway is refused by the two others; 1,000 distinct
/// signatures round-robin over the three are each accepted exactly once.
/// Returns the key prefix it used and the signed timestamp.
async fn replay_is_refused_fleet_wide(redis: Redis<'_>) -> (String, i64) {
    let up = TestUpstream::start().await;
    let mut creds = Creds::new();
    let key = creds.hmac_user("signer");
    let prefix = redis::unique_prefix("replay");
    let config = fleet_config(&creds, &up, redis, &prefix);
    // 2,000 replays are 2,000 failed authentications from one client address.
    let fleet = start_fleet(&config.rate_limit(10_000, 10_000).failed_per_ip_per_minute(100_000), 3).await;
    let client = H1::new();
    let now = crate::support::creds::unix_now();

    let first = signed(&client, &fleet[0], &key, now, "/api/once").await;
    assert_eq!(first.status, 200, "{}", first.text());
    for gw in &fleet[1..] {
        assert_unauthorized(&signed(&client, gw, &key, now, "/api/once").await, "Replayed request");
    }
    assert_unauthorized(&signed(&client, &fleet[0], &key, now, "/api/once").await, "Replayed request");
    assert_eq!(up.count(), 1, "the upstream saw a replay");

    // 1,000 distinct signatures, each sent to all three gateways (its own first).
    let mut accepted = 0;
    for i in 0..1000 {
        let target = format!("/api/n/{i}");
        for j in 0..3 {
            let gw = &fleet[(i + j) % 3];
            let r = signed(&client, gw, &key, now, &target).await;
            match (j, r.status.as_u16()) {
                (0, 200) => accepted += 1,
                (0, s) => panic!("signature {i} refused by its first gateway: {s} {}", r.text()),
                (_, 401) => drop(assert_unauthorized(&r, "Replayed request")),
                (_, s) => panic!("replay of signature {i} answered {s}: {}", r.text()),
            };
        }
    }
    assert_eq!(accepted, 1000);
    assert_eq!(up.count(), 1001, "every signature forwarded exactly once");
    // The key's request history (in Redis, beside its totals) catches up with its totals
    // on every gateway once each has flushed.
    for gw in &fleet {
        within(STEP, "the fleet's history to reach its totals", async {
            loop {
                let v = gw.admin().get("/admin/v1/users/signer/usage").await.json();
                if v["requests"].as_u64() >= Some(1001) && v["requests_24h"] == v["requests"] {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
    }
    (prefix, now)
}

/// ... and what Redis holds for them: one set for the key's signatures with that
/// timestamp, of 1,001 16-byte hashes (not the signatures), expiring with the window
/// (plus the clock slack).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signature_accepted_by_one_gateway_is_refused_by_every_other() {
    let port = redis::shared().await;
    let url = format!("redis://127.0.0.1:{port}");
    let (prefix, now) = replay_is_refused_fleet_wide(Redis::One(&url)).await;
    let sets = redis::cli(port, &["--scan", "--pattern", &format!("{prefix}*:sig:*")]).await;
    let sets: Vec<&str> = sets.lines().collect();
    assert_eq!(sets.len(), 1, "{sets:?}");
    assert!(sets[0].ends_with(&format!(":sig:{now}")), "{}", sets[0]);
    assert_eq!(redis::cli(port, &["type", sets[0]]).await.trim(), "set");
    assert_eq!(redis::cli(port, &["scard", sets[0]]).await.trim(), "1001");
    let not_16_bytes = "local n = 0 for _, m in ipairs(redis.call('SMEMBERS', KEYS[1])) do if #m ~= 16 then n = n + 1 end end return n";
    assert_eq!(redis::cli(port, &["eval", not_16_bytes, "1", sets[0]]).await.trim(), "0");
    // The default window is 300 s either side: the set lives until `now + 300`, plus 30 s
    // of clock slack (each batch sets it again from the gateway's whole-second clock: up to
    // 2 s more than what is left when this reads it).
    let pttl: i64 = redis::cli(port, &["pttl", sets[0]]).await.trim().parse().unwrap();
    let left = (now + 300 + 30 - crate::support::creds::unix_now()) * 1000;
    assert!(pttl > 0 && pttl <= left + 2000 && pttl >= left - 60_000, "PTTL {pttl} ms, window left {left} ms");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signature_accepted_by_one_gateway_is_refused_by_every_other_on_a_redis_cluster() {
    let cluster = RedisCluster::start().await;
    let _ = replay_is_refused_fleet_wide(Redis::Cluster(&cluster.urls())).await;
}

/// One signature sent at once on 90 connections spread over three gateways (so that each
/// worker's records go to Redis together, in one pipeline): exactly one is accepted, the
/// rest are replays, and the upstream sees one request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_signature_sent_many_times_at_once_is_accepted_once() {
    let port = redis::shared().await;
    let url = format!("redis://127.0.0.1:{port}");
    let up = TestUpstream::start().await;
    let mut creds = Creds::new();
    let key = creds.hmac_user("signer");
    let config = fleet_config(&creds, &up, Redis::One(&url), &redis::unique_prefix("burst"));
    let fleet = start_fleet(&config.rate_limit(10_000, 10_000).failed_per_ip_per_minute(100_000), 3).await;
    let now = crate::support::creds::unix_now();
    for round in 0..5 {
        let target = format!("/api/burst/{round}");
        let clients: Vec<H1> = (0..90).map(|_| H1::new()).collect();
        let replies = futures_util::future::join_all(
            clients.iter().enumerate().map(|(i, c)| signed(c, &fleet[i % 3], &key, now, &target)),
        )
        .await;
        let ok = replies.iter().filter(|r| r.status == 200).count();
        assert_eq!(ok, 1, "round {round}: {ok} of 90 copies of one signature accepted");
        for r in replies.iter().filter(|r| r.status != 200) {
            assert_unauthorized(r, "Replayed request");
        }
    }
    assert_eq!(up.count(), 5);
}

/// Drives `key` at 40 requests a second for 10 s, round-robin over `gateways`; returns
/// how many were admitted and checks that `X-RateLimit-Remaining` only falls until the
/// first refusal (the burst being spent).
async fn drive(gateways: &[String], key: &ApiKey) -> usize {
    let client = H1::new();
    let mut tick = tokio::time::interval(Duration::from_millis(25));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let (mut admitted, mut refused_yet, mut last_remaining) = (0, false, u32::MAX);
    for i in 0..400 {
        tick.tick().await;
        let url = format!("{}/api/drive", gateways[i % gateways.len()]);
        let r = client.get_with(&url, &[("x-api-key", key.token.as_str())]).await;
        match r.status.as_u16() {
            200 => {
                admitted += 1;
                let remaining: u32 = r.header("x-ratelimit-remaining").parse().unwrap();
                if !refused_yet {
                    assert!(
                        remaining <= last_remaining,
                        "X-RateLimit-Remaining rose within the burst: {last_remaining} → {remaining}"
                    );
                }
                last_remaining = remaining;
            }
            429 => {
                assert_error(&r, 429, "rate_limit_error", "Rate limit exceeded");
                refused_yet = true;
            }
            s => panic!("{s}: {}", r.text()),
        }
    }
    admitted
}

/// One key at 20 req/s (burst 20) driven at twice that for 10 s: three gateways sharing
/// Redis admit what one gateway alone admits, within 10 %.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_limit_holds_for_the_fleet_as_for_one_gateway() {
    let up = TestUpstream::start().await;
    let mut creds = Creds::new();
    let key = creds.api_user("limited");
    let alone = GatewayConfig::new()
        .credentials(&creds)
        .route(RouteSpec::new("api", "/api/").to(&up).authenticated())
        .rate_limit(20, 20);
    let one = GatewayProcess::serve(&alone).await;
    let single = drive(&[one.url("")], &key).await;
    drop(one);

    let port = redis::shared().await;
    let url = format!("redis://127.0.0.1:{port}");
    let config = fleet_config(&creds, &up, Redis::One(&url), &redis::unique_prefix("limit")).rate_limit(20, 20);
    let fleet = start_fleet(&config, 3).await;
    let urls: Vec<String> = fleet.iter().map(|g| g.url("")).collect();
    let shared = drive(&urls, &key).await;
    println!("admitted in 10 s at 40 req/s: one gateway {single}, three sharing Redis {shared} (limit 20/s, burst 20)");
    let ratio = shared as f64 / single as f64;
    assert!((0.9..=1.1).contains(&ratio), "three gateways admitted {shared}, one alone {single} ({ratio:.3}×)");
}

/// Usage of one key spread over three gateways is summed in Redis, read the same from
/// any gateway's admin API, and outlives the replacement of every gateway.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_is_summed_over_the_fleet_and_survives_replacing_every_gateway() {
    let up = TestUpstream::start().await;
    let mut creds = Creds::new();
    let key = creds.api_user("counted");
    let port = redis::shared().await;
    let url = format!("redis://127.0.0.1:{port}");
    let prefix = redis::unique_prefix("usage");
    let config = fleet_config(&creds, &up, Redis::One(&url), &prefix);
    let fleet = start_fleet(&config, 3).await;
    let client = H1::new();
    const N: u64 = 61;
    let mut before_last = 0;
    for i in 0..N as usize {
        if i == N as usize - 1 {
            before_last = crate::support::creds::unix_now();
        }
        let r = client.get_with(&fleet[i % 3].url("/api/u"), &[("x-api-key", key.token.as_str())]).await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let after_last = crate::support::creds::unix_now();
    let usage_path = "/admin/v1/users/counted/usage";
    // Each gateway flushes every second: wait until every count has reached Redis.
    for gw in &fleet {
        within(STEP, "every gateway's counts in Redis", async {
            while gw.admin().get(usage_path).await.json()["requests"] != N {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
    }
    let last_used = |v: &serde_json::Value| {
        let t = v["last_used_at"].as_str().unwrap().to_string();
        time::OffsetDateTime::parse(&t, &time::format_description::well_known::Rfc3339).unwrap().unix_timestamp()
    };
    let seen = last_used(&fleet[0].admin().get(usage_path).await.json());
    assert!(
        (before_last..=after_last).contains(&seen),
        "last_used_at {seen} is not the last request's ({before_last}..={after_last})"
    );
    // The history (the console's chart) is the fleet's too, not each gateway's third.
    let history = |v: &serde_json::Value| {
        let per_day: u64 = v["per_day"].as_array().unwrap().iter().map(|d| d["requests"].as_u64().unwrap()).sum();
        (v["requests_24h"].as_u64(), v["keys"][&key.key_id]["requests_24h"].as_u64(), per_day)
    };
    for gw in &fleet {
        let v = gw.admin().get(usage_path).await.json();
        assert_eq!(history(&v), (Some(N), Some(N), N), "{v}");
    }
    // Each hour's and day's counts leave Redis once out of the window (24 h, 30 days).
    let buckets = redis::cli(port, &["--scan", "--pattern", &format!("{prefix}{{fleet}}:usage:*")]).await;
    let mut buckets: Vec<&str> = buckets.lines().collect();
    buckets.sort();
    assert!((2..=4).contains(&buckets.len()), "one hour and one day (or two of each across a boundary): {buckets:?}");
    for b in buckets {
        let ttl: i64 = redis::cli(port, &["ttl", b]).await.trim().parse().unwrap();
        let (_, t) = b.rsplit_once(':').unwrap();
        let t: i64 = t.parse().unwrap();
        // Kept an hour past the last read that wants it: hour H until (H + 25) h, day D
        // until (D + 30) days and an hour, as set at the last flush (seconds ago).
        let until = if b.contains(":usage:hour:") { (t + 25) * 3600 } else { (t + 30) * 86_400 + 3600 };
        let expected = until - crate::support::creds::unix_now();
        assert!((expected - 60..=expected + 1).contains(&ttl), "{b} expires in {ttl} s, not {expected} s");
    }

    // Replace every gateway (a rolling restart that ends with none of the old pods).
    let written: Vec<_> = fleet.into_iter().map(GatewayProcess::into_written).collect();
    let mut again = Vec::new();
    for w in written {
        again.push(GatewayProcess::serve_written(w, &[], &[]).await);
    }
    for gw in &again {
        let v = gw.admin().get(usage_path).await.json();
        assert_eq!(v["requests"], N, "{v}");
        assert_eq!(last_used(&v), seen);
        assert_eq!(history(&v), (Some(N), Some(N), N), "{v}");
    }
    // So does the console's users list (its last two columns: 24 hours, all time).
    let admin = format!("http://{}", again[1].admin_addr());
    let form = [("origin", admin.as_str()), ("content-type", "application/x-www-form-urlencoded")];
    let token = format!("token={}", again[1].written().admin_token());
    let signed = client.request("POST", &format!("{admin}/ui/sign-in"), &form, token).await;
    assert_eq!(signed.status, 303, "{}", signed.text());
    let cookie = signed.header("set-cookie").split(';').next().unwrap().to_string();
    let page = client.get_with(&format!("{admin}/ui/users"), &[("cookie", cookie.as_str())]).await.text();
    assert!(page.contains(&format!("<td>{N}</td><td>{N}</td></tr>")), "{page}");
    // The CLI reads the same totals from Redis, through the gateway's config.
    let config = again[0].written().path.display().to_string();
    let out = crate::support::process::run_cli(&["users", "show", "counted", "--json", "--config", &config]).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let shown: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(shown["keys"][0]["requests"], N, "{shown}");
}

/// Scrapes one series from a gateway's metrics (0 when absent).
/// A series of a gateway's metrics; every shared-state series exists from the start, so a
/// missing one is a mistake in the test (a label order Prometheus does not print), never 0.
async fn metric(gw: &GatewayProcess, series: &str) -> f64 {
    let text = gw.admin().get("/metrics").await.text();
    crate::observability_support::value(&text, series).unwrap_or_else(|| panic!("no series {series} in:\n{text}"))
}

/// The 503 a signed request gets while Redis cannot vouch for its signature.
fn assert_replay_unavailable(r: &Reply) {
    assert_error(r, 503, "shared_state_unavailable", "Replay protection is unavailable; retry with a new signature");
}

/// Waits until every gateway of `fleet` has counted Redis losing its data. Traffic is what
/// finds the broken connections (the heartbeat would too, within a second).
async fn until_data_lost(fleet: &[GatewayProcess], client: &H1) {
    for gw in fleet {
        within(STEP, "the gateway to find Redis without its data", async {
            while metric(gw, "gatehouse_shared_state_data_lost_total").await < 1.0 {
                let _ = client.get_with(&gw.url("/api/ping"), &[("x-api-key", "nope")]).await;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
    }
}

/// Waits (at most `limit`) until a gateway's `series` reads `want` or more.
async fn until_metric_at_least(gw: &GatewayProcess, series: &str, want: f64, limit: Duration) {
    within(limit, &format!("{series} to reach {want}"), async {
        while metric(gw, series).await < want {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
}

/// Waits (at most `limit`) until a gateway's `series` reads `want`.
async fn until_metric(gw: &GatewayProcess, series: &str, want: f64, limit: Duration) {
    within(limit, &format!("{series} to read {want}"), async {
        while metric(gw, series).await != want {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
}

/// Redis hangs mid-traffic: signed requests get the 503 body without waiting more than
/// the operation timeout, API-key requests keep flowing under per-process limits (the
/// key's limit divided by the gateways alive), the metrics say so; when Redis answers
/// again the gateways go back to shared mode by themselves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_redis_fails_signed_requests_closed_and_keeps_api_keys_flowing_under_local_limits() {
    let server = RedisServer::start().await;
    let up = TestUpstream::start().await;
    let mut creds = Creds::new();
    let signer = creds.hmac_user("signer");
    let key = creds.api_user("reader");
    // 3 req/s, burst 30: divided by three gateways, 1 req/s and a burst of 10 each.
    let config = fleet_config(&creds, &up, Redis::One(&server.url()), "fault:").rate_limit(3, 30);
    let fleet = start_fleet(&config, 3).await;
    let client = H1::new();
    let now = crate::support::creds::unix_now();
    assert_eq!(signed(&client, &fleet[0], &signer, now, "/api/before").await.status, 200);
    // Each gateway counts the fleet at its heartbeat (every second).
    until_metric(&fleet[0], "gatehouse_shared_state_gateways", 3.0, STEP).await;

    server.pause();
    let started = Instant::now();
    let r = within(STEP, "a signed request while Redis hangs", signed(&client, &fleet[0], &signer, now, "/api/during"))
        .await;
    let waited = started.elapsed();
    assert_replay_unavailable(&r);
    assert_eq!(r.header("retry-after"), "1");
    println!("first signed request during the hang answered in {waited:?} (op_timeout 200ms)");
    // The breaker is open now: the next ones do not wait at all, and still fail closed.
    for gw in &fleet[..1] {
        let r = signed(&client, gw, &signer, now, "/api/during2").await;
        assert_replay_unavailable(&r);
    }
    let forwarded = up.count();
    let mut admitted = 0;
    for _ in 0..15 {
        let r = client.get_with(&fleet[0].url("/api/k"), &[("x-api-key", key.token.as_str())]).await;
        match r.status.as_u16() {
            200 => admitted += 1,
            429 => drop(assert_error(&r, 429, "rate_limit_error", "Rate limit exceeded")),
            s => panic!("{s}: {}", r.text()),
        }
    }
    assert!((10..=12).contains(&admitted), "local fallback admitted {admitted} of 15 (burst 30 / 3 gateways = 10)");
    assert_eq!(up.count(), forwarded + admitted, "no signed request reached the upstream during the hang");
    assert_eq!(metric(&fleet[0], "gatehouse_shared_state_up").await, 0.0);
    assert!(metric(&fleet[0], "gatehouse_shared_state_fallbacks_total{reason=\"replay_rejected\"}").await >= 2.0);
    assert!(metric(&fleet[0], "gatehouse_shared_state_fallbacks_total{reason=\"rate_limit_local\"}").await >= 15.0);
    assert_eq!(fleet[0].count_logged("shared state unavailable"), 1, "one log line per outage, not per request");

    server.resume();
    for gw in &fleet {
        until_metric(gw, "gatehouse_shared_state_up", 1.0, Duration::from_secs(5)).await;
    }
    let fresh = crate::support::creds::unix_now();
    assert_eq!(signed(&client, &fleet[1], &signer, fresh, "/api/after").await.status, 200);
    assert_unauthorized(&signed(&client, &fleet[2], &signer, fresh, "/api/after").await, "Replayed request");
    // A signature accepted before the hang is still refused everywhere after it.
    assert_unauthorized(&signed(&client, &fleet[2], &signer, now, "/api/before").await, "Replayed request");
    fleet[0].logged("shared state available again", 1).await;
}

/// Redis killed and started again empty: a signature accepted before is not accepted
/// after, by any gateway, while it is inside its window (Redis cannot vouch for it, so
/// the replay fallback decides: here `reject`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_that_comes_back_empty_cannot_be_used_to_replay_an_earlier_signature() {
    let mut server = RedisServer::start().await;
    let up = TestUpstream::start().await;
    let mut creds = Creds::new();
    let signer = creds.hmac_user("signer");
    let config = fleet_config(&creds, &up, Redis::One(&server.url()), "lost:").auth_hmac("max_skew", "3s");
    let fleet = start_fleet(&config, 2).await;
    let client = H1::new();
    let then = crate::support::creds::unix_now();
    assert_eq!(signed(&client, &fleet[0], &signer, then, "/api/x").await.status, 200);

    server.restart().await;
    until_data_lost(&fleet, &client).await;
    let seen = up.count();
    for gw in &fleet {
        let r = signed(&client, gw, &signer, then, "/api/x").await;
        assert_ne!(r.status, 200, "a replay was accepted after Redis lost its records");
        if crate::support::creds::unix_now() - then <= 3 {
            assert_replay_unavailable(&r);
        }
    }
    assert_eq!(up.count(), seen);
    // Once the window of everything signed before the loss has passed (3 s, plus the 30 s
    // of clock slack a fence adds), signing works again.
    within(STEP + Duration::from_secs(34), "fresh signatures to be accepted after the window", async {
        loop {
            let r = signed(&client, &fleet[1], &signer, crate::support::creds::unix_now(), "/api/y").await;
            if r.status == 200 {
                return;
            }
            assert_replay_unavailable(&r);
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
}

/// The heartbeat that finds Redis without its data fails afterwards (here: the eviction
/// check's script cannot be loaded, as its user lost `+script|load` while the heartbeat's
/// own script was loaded by hand). The next heartbeat finds the new epoch as known; the
/// fence set when the loss was seen must hold anyway: the replay gets 503, not 200.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_heartbeat_that_fails_after_seeing_the_loss_still_fences() {
    let server = RedisServer::start().await;
    let acl = gatehouse_acl("cut:*");
    let acl: Vec<&str> = acl.iter().map(String::as_str).collect();
    assert_eq!(server.cli(&acl).await.trim(), "OK");
    let up = TestUpstream::start().await;
    let mut creds = Creds::new();
    let signer = creds.hmac_user("signer");
    let url = format!("redis://gatehouse@127.0.0.1:{}", server.port);
    let config =
        fleet_config(&creds, &up, Redis::One(&url), "cut:").shared_state("password_env", "GH_TEST_REDIS_PASSWORD");
    let gw =
        GatewayProcess::serve_with_env(&config, &[("GH_TEST_REDIS_PASSWORD", "the-acl-password-for-gatehouse")]).await;
    let client = H1::new();
    let then = crate::support::creds::unix_now();
    assert_eq!(signed(&client, &gw, &signer, then, "/api/x").await.status, 200);

    assert_eq!(server.cli(&["acl", "setuser", "gatehouse", "-script|load"]).await.trim(), "OK");
    // In one transaction, so that no heartbeat runs between them: scripts flushed, the
    // heartbeat's loaded again (by this admin connection), the data gone.
    let body = gatehouse::shared::scripts::HEARTBEAT.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n");
    let tx = format!("MULTI\nSCRIPT FLUSH\nSCRIPT LOAD \"{body}\"\nFLUSHALL\nEXEC\n");
    let mut cli = tokio::process::Command::new("redis-cli")
        .args(["-p", &server.port.to_string()])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use tokio::io::AsyncWriteExt;
        let mut stdin = cli.stdin.take().unwrap();
        stdin.write_all(tx.as_bytes()).await.unwrap();
    }
    let out = within(STEP, "redis-cli", cli.wait_with_output()).await.unwrap();
    let out = String::from_utf8_lossy(&out.stdout);
    assert!(out.contains("QUEUED") && !out.contains("ERR"), "{out}");
    // The heartbeat runs, sees the new epoch, then fails on the eviction check.
    until_metric(&gw, "gatehouse_shared_state_up", 0.0, STEP).await;
    assert_eq!(server.cli(&["acl", "setuser", "gatehouse", "+script|load"]).await.trim(), "OK");
    until_metric(&gw, "gatehouse_shared_state_up", 1.0, STEP).await;
    let seen = up.count();
    assert_replay_unavailable(&signed(&client, &gw, &signer, then, "/api/x").await);
    assert_eq!(up.count(), seen, "a replay reached the upstream");
    assert_eq!(metric(&gw, "gatehouse_shared_state_data_lost_total").await, 1.0);
}

/// Each gateway sets a replay record's expiry, and decides freshness, by its own clock: a
/// record set by a gateway whose clock is 20 s ahead must still be there while a gateway
/// with the right clock accepts the timestamp (the rest of its window), and that gateway
/// refuses the replay. Records outlive their window by 30 s of clock slack; without it this
/// record would expire 20 s early.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_record_outlives_the_window_of_a_gateway_whose_clock_is_behind() {
    let server = RedisServer::start().await;
    let up = TestUpstream::start().await;
    let mut creds = Creds::new();
    let signer = creds.hmac_user("signer");
    let extra = format!(
        "auth:\n  hmac:\n    max_skew: 60s\nshared_state:\n  redis: {}\n  key_prefix: \"skew:\"\n",
        server.url()
    );
    let clock = gatehouse::pipeline::clock::Clock::system();
    clock.advance(Duration::from_secs(20));
    let ahead = crate::observability_support::start_on_clock(&creds, &up, &extra, clock).await;
    let right = GatewayProcess::serve(
        &fleet_config(&creds, &up, Redis::One(&server.url()), "skew:").auth_hmac("max_skew", "60s"),
    )
    .await;
    let client = H1::new();
    let now = crate::support::creds::unix_now();
    let headers = signer.headers_at(now, "GET", "/api/x", b"");
    let r = client.request("GET", &format!("http://{}/api/x", ahead.addr), &headers, Vec::new()).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let sets = server.cli(&["keys", "skew:*:sig:*"]).await;
    let set = sets.trim();
    assert!(!set.is_empty() && !set.contains('\n'), "one replay set: {sets:?}");
    let pttl: i64 = server.cli(&["pttl", set]).await.trim().parse().unwrap();
    let accepted_until_ms = (now + 60 + 1 - crate::support::creds::unix_now()) * 1000;
    println!(
        "record lives {pttl} ms; the gateway with the right clock accepts the timestamp {accepted_until_ms} ms more"
    );
    assert!(pttl >= accepted_until_ms, "the record expires {} ms too early", accepted_until_ms - pttl);
    assert_unauthorized(&signed(&client, &right, &signer, now, "/api/x").await, "Replayed request");
}

/// A's count of records sent alone (a lease's request spent, its signature recorded in a
/// round trip of its own).
const RECORDS_ALONE: &str = "gatehouse_shared_state_op_duration_seconds_count{op=\"replay\"}";

/// Accepts three signatures — one by gateway B, two by gateway A, whose second lease of the
/// key is then two requests, one left for 50 ms — flushes the Redis (or cluster node)
/// behind `direct`, which holds the key's records, and replays each signature at once,
/// before any heartbeat can notice (they run once a second), to the gateway that did not
/// accept it (the one that did remembers it by itself). A spends the request left in its
/// lease (its record goes alone), B asks Redis for a lease (the record goes with the
/// lease's script). Both must answer 503 and the upstream see nothing.
///
/// Returns whether A's record went alone: on a box too slow to replay within the lease's
/// 50 ms, A asked for a lease instead, and the caller tries again on a fresh fleet.
async fn flush_and_replay(
    fleet: &[GatewayProcess],
    up: &TestUpstream,
    signer: &HmacKey,
    direct: &mut ::redis::aio::MultiplexedConnection,
) -> bool {
    let client = H1::new();
    let then = crate::support::creds::unix_now();
    assert_eq!(signed(&client, &fleet[1], signer, then, "/api/b").await.status, 200);
    assert_eq!(signed(&client, &fleet[0], signer, then, "/api/a").await.status, 200);
    let alone_before = metric(&fleet[0], RECORDS_ALONE).await;
    assert_eq!(signed(&client, &fleet[0], signer, then, "/api/c").await.status, 200);
    let seen = up.count();
    let flushed: String = ::redis::cmd("FLUSHALL").query_async(direct).await.expect("FLUSHALL");
    assert_eq!(flushed, "OK");
    for (gw, target) in [(&fleet[0], "/api/b"), (&fleet[1], "/api/a")] {
        let r = signed(&client, gw, signer, then, target).await;
        assert_ne!(r.status, 200, "a replay was accepted right after Redis lost its records");
        assert_replay_unavailable(&r);
    }
    assert_eq!(up.count(), seen, "a replay reached the upstream");
    metric(&fleet[0], RECORDS_ALONE).await - alone_before == 1.0
}

async fn connect_directly(url: String) -> ::redis::aio::MultiplexedConnection {
    ::redis::Client::open(url)
        .expect("redis url")
        .get_multiplexed_async_connection()
        .await
        .expect("a connection to the test's Redis")
}

/// The index of the master of `key`'s slot: it answers a read of the key, the others
/// redirect (MOVED).
async fn slot_owner(cluster: &RedisCluster, key: &str) -> usize {
    let mut owner = None;
    for (i, n) in cluster.nodes.iter().enumerate() {
        if !n.cli(&["get", key]).await.contains("MOVED") {
            owner = Some(i);
        }
    }
    owner.expect("a master owns the slot")
}

/// Redis flushed, and signatures accepted before replayed the moment after: each record
/// reads the fleet's epoch in its own round trip, after the record, so both gateways refuse
/// the replays (`flush_and_replay`). Each counts the loss once, though its heartbeat then
/// finds the epoch set again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_sent_the_moment_redis_is_flushed_is_refused() {
    let server = RedisServer::start().await;
    let mut direct = connect_directly(server.url()).await;
    for attempt in 1..=3 {
        let up = TestUpstream::start().await;
        let mut creds = Creds::new();
        let signer = creds.hmac_user("signer");
        let prefix = format!("flush{attempt}:");
        let config = fleet_config(&creds, &up, Redis::One(&server.url()), &prefix).rate_limit(10_000, 10_000);
        let fleet = start_fleet(&config, 2).await;
        if !flush_and_replay(&fleet, &up, &signer, &mut direct).await {
            println!("attempt {attempt}: A's lease ran out before its replay; again on a fresh fleet");
            continue;
        }
        // The heartbeats set the epoch again and find it changed: still one loss each.
        for gw in &fleet {
            until_metric(gw, "gatehouse_shared_state_data_lost_total", 1.0, STEP).await;
        }
        // Two heartbeats of each from now: the second surely read the epoch set again.
        let beats = "gatehouse_shared_state_op_duration_seconds_count{op=\"heartbeat\"}";
        for gw in &fleet {
            let from = metric(gw, beats).await;
            until_metric_at_least(gw, beats, from + 2.0, STEP).await;
            assert_eq!(metric(gw, "gatehouse_shared_state_data_lost_total").await, 1.0, "one loss counted twice");
        }
        let epoch = format!("{prefix}{{fleet}}:epoch");
        assert!(!server.cli(&["get", &epoch]).await.trim().is_empty(), "no epoch set again");
        return;
    }
    panic!("in three attempts, A's lease ran out before its replay every time");
}

/// The same under Redis Cluster, with the node that holds the key's records flushed: each
/// record reads the epoch of its own node (a key in another slot of that node).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_sent_the_moment_a_cluster_node_is_flushed_is_refused() {
    let cluster = RedisCluster::start().await;
    let urls = cluster.urls();
    for attempt in 1..=3 {
        let up = TestUpstream::start().await;
        let mut creds = Creds::new();
        let signer = creds.hmac_user("signer");
        let prefix = format!("nodeflush{attempt}:");
        let config = fleet_config(&creds, &up, Redis::Cluster(&urls), &prefix).rate_limit(10_000, 10_000);
        let fleet = start_fleet(&config, 2).await;
        let holder = slot_owner(&cluster, &format!("{prefix}{{k:{}}}", signer.key_id)).await;
        let mut direct = connect_directly(cluster.nodes[holder].url()).await;
        if !flush_and_replay(&fleet, &up, &signer, &mut direct).await {
            println!("attempt {attempt}: A's lease ran out before its replay; again on a fresh fleet");
            continue;
        }
        // Counted once per epoch key found changed: twice when the flushed node also held
        // the fleet's own epoch.
        for gw in &fleet {
            until_metric_at_least(gw, "gatehouse_shared_state_data_lost_total", 1.0, STEP).await;
        }
        return;
    }
    panic!("in three attempts, A's lease ran out before its replay every time");
}

/// Under Redis Cluster, the slot of a key's records moving to another master (resharding,
/// here held half-way with `CLUSTER SETSLOT … MIGRATING/IMPORTING`). Gateway A spends its
/// lease: its new record is redirected (ASK) to the importing master, where the epoch of
/// the master it comes from cannot be read. Gateway B has no lease: its lease script names
/// the key's bucket, which is still on the old master, and a set that is not (TRYAGAIN; or
/// a redirect, if the bucket expired meanwhile). Each of those requests alone takes the
/// fallback (503 with `reject`), counted as `migrating`: no breaker opens, and another
/// key's signed requests go on. Nothing is recorded: once the slot has moved (and the
/// gateways' heartbeats have read the new slot map; until then the records go on taking
/// the fallback), each request is accepted, not refused as a replay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_caught_in_a_slot_migration_takes_the_fallback_alone() {
    let cluster = RedisCluster::start().await;
    let up = TestUpstream::start().await;
    let mut creds = Creds::new();
    let moving = creds.hmac_user("moving");
    // Another key, in another slot: of three, one surely is (each shares the moving key's
    // slot with a chance of 1 in 16,384).
    let others: Vec<HmacKey> = (0..3).map(|i| creds.hmac_user(&format!("staying{i}"))).collect();
    let urls = cluster.urls();
    // Operations may take up to 1 s here (not 200 ms): a slow moment of a busy box must not
    // open a breaker, and 1 s is still below the cluster client's default retry wait (1.28 s).
    let config = fleet_config(&creds, &up, Redis::Cluster(&urls), "moving:")
        .shared_state("op_timeout", "1s")
        .rate_limit(10_000, 10_000);
    let fleet = start_fleet(&config, 2).await;
    let (a, b) = (&fleet[0], &fleet[1]);
    let client = H1::new();
    let keyslot = |key: String| {
        let node = &cluster.nodes[0];
        async move { node.cli(&["cluster", "keyslot", &key]).await.trim().to_string() }
    };
    let slot = keyslot(format!("moving:{{k:{}}}", moving.key_id)).await;
    let mut staying = None;
    for k in &others {
        if keyslot(format!("moving:{{k:{}}}", k.key_id)).await != slot {
            staying = Some(k);
            break;
        }
    }
    let staying = staying.expect("a key in another slot");
    let owner = slot_owner(&cluster, &format!("moving:{{k:{}}}", moving.key_id)).await;
    let target = (owner + 1) % cluster.nodes.len();
    let owner_id = cluster.nodes[owner].cli(&["cluster", "myid"]).await.trim().to_string();
    let target_id = cluster.nodes[target].cli(&["cluster", "myid"]).await.trim().to_string();
    let mut to_owner = connect_directly(cluster.nodes[owner].url()).await;
    let mut to_target = connect_directly(cluster.nodes[target].url()).await;
    let setslot = async |conn: &mut ::redis::aio::MultiplexedConnection, state: &str, node: Option<&str>| {
        let mut cmd = ::redis::cmd("CLUSTER");
        cmd.arg("SETSLOT").arg(&slot).arg(state);
        if let Some(node) = node {
            cmd.arg(node);
        }
        let ok: String = cmd.query_async(conn).await.expect("CLUSTER SETSLOT");
        assert_eq!(ok, "OK");
    };
    let opened = "shared state unavailable: falling back";
    let migrating = |op: &str| format!("gatehouse_shared_state_errors_total{{kind=\"migrating\",op=\"{op}\"}}");

    // A's record must go alone, from its lease: on a box too slow to send it within the
    // lease's 50 ms, A asks for a lease instead; then the slot is put back and A tries again.
    let then = crate::support::creds::unix_now();
    let mut alone = false;
    let mut last_a3 = String::new();
    for attempt in 1..=3 {
        let (opened_a, opened_b) = (a.count_logged(opened), b.count_logged(opened));
        let (a1, a2, a3) = (format!("/api/a{attempt}"), format!("/api/b{attempt}"), format!("/api/c{attempt}"));
        assert_eq!(signed(&client, a, &moving, then, &a1).await.status, 200);
        let alone_before = metric(a, RECORDS_ALONE).await;
        assert_eq!(signed(&client, a, &moving, then, &a2).await.status, 200);
        setslot(&mut to_target, "IMPORTING", Some(&owner_id)).await;
        setslot(&mut to_owner, "MIGRATING", Some(&target_id)).await;
        // A new timestamp: a set the old master does not have.
        let seen = up.count();
        assert_replay_unavailable(&signed(&client, a, &moving, then + 1, &a3).await);
        last_a3 = a3;
        alone = metric(a, RECORDS_ALONE).await - alone_before == 1.0;
        assert_replay_unavailable(&signed(&client, b, &moving, then + 1, "/api/d").await);
        assert_eq!(up.count(), seen, "a request reached the upstream");
        for gw in [a, b] {
            let r = signed(&client, gw, staying, then, &format!("/api/{}-{attempt}", gw.addr().port())).await;
            assert_eq!(r.status, 200, "{}", gw.stderr());
        }
        assert_eq!((a.count_logged(opened), b.count_logged(opened)), (opened_a, opened_b), "a breaker opened");
        assert!(metric(a, &migrating("replay")).await + metric(a, &migrating("admit")).await >= 1.0);
        assert!(metric(b, &migrating("admit")).await >= 1.0);
        if alone {
            break;
        }
        println!("attempt {attempt}: A's lease ran out before its record; again");
        setslot(&mut to_target, "STABLE", None).await;
        setslot(&mut to_owner, "STABLE", None).await;
    }
    assert!(alone, "in three attempts, A's lease ran out before its record every time");
    assert_eq!(metric(a, "gatehouse_shared_state_errors_total{kind=\"error\",op=\"replay\"}").await, 0.0);
    for gw in [a, b] {
        assert_eq!(metric(gw, "gatehouse_shared_state_data_lost_total").await, 0.0);
    }

    // The slot moves: its keys, then its owner, on every master.
    let keys: Vec<String> = ::redis::cmd("CLUSTER")
        .arg("GETKEYSINSLOT")
        .arg(&slot)
        .arg(1000)
        .query_async(&mut to_owner)
        .await
        .expect("CLUSTER GETKEYSINSLOT");
    if !keys.is_empty() {
        let target_port = cluster.nodes[target].url().rsplit(':').next().unwrap_or_default().to_string();
        let moved: String = ::redis::cmd("MIGRATE")
            .arg("127.0.0.1")
            .arg(&target_port)
            .arg("")
            .arg(0)
            .arg(5000)
            .arg("KEYS")
            .arg(&keys)
            .query_async(&mut to_owner)
            .await
            .expect("MIGRATE");
        assert_eq!(moved, "OK");
    }
    setslot(&mut to_target, "NODE", Some(&target_id)).await;
    setslot(&mut to_owner, "NODE", Some(&target_id)).await;
    let third = 3 - owner - target;
    setslot(&mut connect_directly(cluster.nodes[third].url()).await, "NODE", Some(&target_id)).await;
    for (gw, target) in [(a, last_a3.as_str()), (b, "/api/d")] {
        within(STEP, "the request to be accepted once its slot has moved", async {
            loop {
                let r = signed(&client, gw, &moving, then + 1, target).await;
                if r.status == 200 {
                    return;
                }
                assert_replay_unavailable(&r);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
    }
    assert_unauthorized(&signed(&client, a, &moving, then + 1, "/api/d").await, "Replayed request");
}

/// Redis flushed under gateway A after it accepted a signature; gateway B starts after
/// that, with no earlier epoch to compare: it takes the fence A shares in Redis, so the
/// replay is refused by B as by A (503: Redis cannot vouch for it), and B counts no loss of
/// its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_started_after_redis_lost_its_data_takes_the_fleet_fence() {
    let server = RedisServer::start().await;
    let up = TestUpstream::start().await;
    let mut creds = Creds::new();
    let signer = creds.hmac_user("signer");
    let config = fleet_config(&creds, &up, Redis::One(&server.url()), "late:");
    let a = GatewayProcess::serve(&config).await;
    let client = H1::new();
    let then = crate::support::creds::unix_now();
    assert_eq!(signed(&client, &a, &signer, then, "/api/x").await.status, 200);
    assert_eq!(server.cli(&["flushall"]).await.trim(), "OK");
    // No connection breaks: A's next heartbeat finds the epoch changed and shares its fence.
    until_metric(&a, "gatehouse_shared_state_data_lost_total", 1.0, STEP).await;
    within(STEP, "A's fence in Redis", async {
        while server.cli(&["get", "late:{fleet}:fence"]).await.trim().is_empty() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let b = GatewayProcess::serve(&config).await;
    let seen = up.count();
    for gw in [&b, &a] {
        assert_replay_unavailable(&signed(&client, gw, &signer, then, "/api/x").await);
    }
    assert_eq!(up.count(), seen, "a replay reached the upstream");
    assert_eq!(metric(&b, "gatehouse_shared_state_data_lost_total").await, 0.0);
}

/// Redis refusing the password, nothing at the URL, or TLS against a plain Redis: both
/// `check-config` and `serve` stop with exit 78 and the reason — never the password —
/// and `serve` listens on nothing. The right password passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_that_cannot_be_used_stops_start_up_with_the_reason() {
    use crate::support::process::run_cli_with;
    let server = RedisServer::start_with(&["--requirepass", "the-right-redis-password"]).await;
    let dir = tempfile::tempdir().unwrap();
    let port = crate::support::free_port();
    let closed = crate::support::free_port();
    let config = |redis: &str| {
        let yaml = format!(
            "listeners:\n  - address: 127.0.0.1:{port}\nshared_state:\n  redis: {redis}\n  password_env: GH_TEST_REDIS_PASSWORD\nroutes: []\n"
        );
        let path = dir.path().join("gatehouse.yaml");
        std::fs::write(&path, yaml).unwrap();
        path.display().to_string()
    };
    let wrong = [("GH_TEST_REDIS_PASSWORD", "a-wrong-password-for-redis")];
    let cases = [
        (server.url(), &wrong, "Password authentication failed"),
        (format!("redis://127.0.0.1:{closed}"), &wrong, "Connection refused"),
        (format!("rediss://127.0.0.1:{}", server.port), &wrong, "cannot use Redis at rediss://127.0.0.1"),
    ];
    for (url, env, reason) in cases {
        let path = config(&url);
        for command in ["check-config", "serve"] {
            let out = run_cli_with(&[], env.as_slice(), &["--log-format", "json", command, "--config", &path]).await;
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(78), "{command} with {url}:\n{stderr}");
            assert!(
                stderr.contains("shared_state: cannot use Redis at") && stderr.contains(reason),
                "{command} with {url}: no {reason:?} in:\n{stderr}"
            );
            assert!(!stderr.contains("a-wrong-password"), "the password is in the message:\n{stderr}");
            assert!(!stderr.contains("\"listening\""), "{command} listened:\n{stderr}");
        }
        assert!(crate::support::connection_refused(std::net::SocketAddr::from(([127, 0, 0, 1], port))).await);
    }
    // An unset password variable is a configuration error with its line.
    let path = config(&server.url());
    let out = run_cli_with(&[], &[], &["check-config", "--config", &path]).await;
    assert_eq!(out.status.code(), Some(78));
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains(":5:17: shared_state.password_env: environment variable GH_TEST_REDIS_PASSWORD is not set"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The right one passes.
    let out = run_cli_with(
        &[],
        &[("GH_TEST_REDIS_PASSWORD", "the-right-redis-password")],
        &["check-config", "--config", &path],
    )
    .await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains(&format!("ok (shared state in Redis at {})", server.url())), "{stdout}");
}

/// The fleet's usage hash holds 3,000 other keys' rows (15,000 fields, as a large fleet's
/// does): a gateway reads it a page at a time (`HSCAN`; one `HGETALL` would stop Redis for
/// every gateway) and still finds its key's count among them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_fleet_usage_is_read_a_page_at_a_time() {
    let server = RedisServer::start().await;
    let up = TestUpstream::start().await;
    let mut creds = Creds::new();
    let key = creds.api_user("counted");
    let fill = "for i = 1, 3000 do local k = 'ak_other' .. i \
        redis.call('HSET', KEYS[1], k .. '|user', 'u' .. i, k .. '|requests', i, k .. '|errors', 0, \
        k .. '|rate_limited', 0, k .. '|last_used', 0) end return 1";
    assert_eq!(server.cli(&["eval", fill, "1", "big:{fleet}:usage"]).await.trim(), "1");
    let gw = GatewayProcess::serve(&fleet_config(&creds, &up, Redis::One(&server.url()), "big:")).await;
    let client = H1::new();
    for _ in 0..7 {
        assert_eq!(client.get_with(&gw.url("/api/u"), &[("x-api-key", key.token.as_str())]).await.status, 200);
    }
    server.cli(&["config", "resetstat"]).await;
    within(STEP, "the key's usage among 3,000 others", async {
        while gw.admin().get("/admin/v1/users/counted/usage").await.json()["requests"] != 7 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    let stats = server.cli(&["info", "commandstats"]).await;
    let calls = |cmd: &str| {
        stats
            .lines()
            .find_map(|l| l.strip_prefix(&format!("cmdstat_{cmd}:calls=")))
            .and_then(|rest| rest.split(',').next())
            .map_or(0, |n| n.parse::<u64>().unwrap())
    };
    assert!(calls("hscan") >= 15, "pages read: {}\n{stats}", calls("hscan"));
    assert_eq!(calls("hgetall"), 0, "{stats}");
}

/// A Redis that may evict keys before they expire (a memory limit with any policy but
/// `noeviction`) could drop a replay record inside its window: `check-config` and `serve`
/// stop with exit 78 and the reason, announce no gateway and listen on nothing; with
/// `noeviction` they pass.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_that_may_evict_keys_stops_start_up_with_the_reason() {
    use crate::support::process::run_cli_with;
    let server = RedisServer::start_with(&["--maxmemory", "64mb", "--maxmemory-policy", "volatile-ttl"]).await;
    let dir = tempfile::tempdir().unwrap();
    let port = crate::support::free_port();
    let path = dir.path().join("gatehouse.yaml");
    let yaml = format!(
        "listeners:\n  - address: 127.0.0.1:{port}\nshared_state:\n  redis: {}\n  key_prefix: \"evicting:\"\nroutes: []\n",
        server.url()
    );
    std::fs::write(&path, yaml).unwrap();
    let path = path.display().to_string();
    for policy in ["volatile-ttl", "allkeys-lru"] {
        assert_eq!(server.cli(&["config", "set", "maxmemory-policy", policy]).await.trim(), "OK");
        for command in ["check-config", "serve"] {
            let out = run_cli_with(&[], &[], &["--log-format", "json", command, "--config", &path]).await;
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(78), "{command} with {policy}:\n{stderr}");
            let reason = format!(
                "Redis may evict keys before they expire (maxmemory-policy {policy} with maxmemory 67108864 bytes): a replay record could be dropped inside its window; set maxmemory-policy noeviction"
            );
            assert!(stderr.contains(&reason), "{command}: no {reason:?} in:\n{stderr}");
            assert!(!stderr.contains("\"listening\""), "{command} listened:\n{stderr}");
        }
    }
    assert!(crate::support::connection_refused(std::net::SocketAddr::from(([127, 0, 0, 1], port))).await);
    assert_eq!(server.cli(&["keys", "evicting:*"]).await.trim(), "", "a refused gateway announced itself");
    assert_eq!(server.cli(&["config", "set", "maxmemory-policy", "noeviction"]).await.trim(), "OK");
    let out = run_cli_with(&[], &[], &["check-config", "--config", &path]).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// Redis turned into an evicting one under running gateways: they say so (metric, one log
/// line), and once it evicted keys — the replay records among them, while the fleet's
/// epoch (no expiry) stays — a signature accepted before is not accepted again by any
/// gateway: Redis cannot vouch for it any more, so the replay fallback decides (`reject`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_that_evicts_keys_cannot_be_used_to_replay_an_earlier_signature() {
    let server = RedisServer::start().await;
    let up = TestUpstream::start().await;
    let mut creds = Creds::new();
    let signer = creds.hmac_user("signer");
    let config = fleet_config(&creds, &up, Redis::One(&server.url()), "evict:");
    let fleet = start_fleet(&config, 2).await;
    let client = H1::new();
    let then = crate::support::creds::unix_now();
    assert_eq!(signed(&client, &fleet[0], &signer, then, "/api/x").await.status, 200);
    assert_unauthorized(&signed(&client, &fleet[1], &signer, then, "/api/x").await, "Replayed request");
    for gw in &fleet {
        assert_eq!(metric(gw, "gatehouse_shared_state_evicting").await, 0.0);
    }

    assert_eq!(server.cli(&["config", "set", "maxmemory-policy", "volatile-random"]).await.trim(), "OK");
    assert_eq!(server.cli(&["config", "set", "maxmemory", "100mb"]).await.trim(), "OK");
    for gw in &fleet {
        until_metric(gw, "gatehouse_shared_state_evicting", 1.0, STEP).await;
    }
    fleet[0].logged("Redis may evict keys before they expire", 1).await;
    // A limit below what Redis holds: the next command makes it evict every key with an
    // expiry (and still refuse to write).
    assert_eq!(server.cli(&["config", "set", "maxmemory", "1"]).await.trim(), "OK");
    let refused = server.cli(&["set", "filler", "x"]).await;
    assert!(refused.contains("OOM"), "{refused}");
    assert_eq!(server.cli(&["keys", "evict:*:sig:*"]).await.trim(), "", "the replay record is still there");
    assert_ne!(server.cli(&["get", "evict:{fleet}:epoch"]).await.trim(), "", "the epoch was evicted too");
    assert_eq!(server.cli(&["config", "set", "maxmemory", "0"]).await.trim(), "OK");

    for gw in &fleet {
        within(STEP, "the gateway to count the evictions", async {
            while metric(gw, "gatehouse_shared_state_data_lost_total").await < 1.0 {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
        until_metric(gw, "gatehouse_shared_state_evicting", 0.0, STEP).await;
        until_metric(gw, "gatehouse_shared_state_up", 1.0, STEP).await;
    }
    let seen = up.count();
    for gw in &fleet {
        assert_replay_unavailable(&signed(&client, gw, &signer, then, "/api/x").await);
    }
    assert_eq!(up.count(), seen, "a replay reached the upstream");
    fleet[1].logged("Redis evicted keys", 1).await;
    assert_eq!(fleet[1].count_logged("Redis may evict keys before they expire"), 1, "one line a minute");
}

/// A flood of unknown keys writes to Redis only up to the client's failed-auth budget:
/// after that the gateway refuses the client itself. Every key Gatehouse wrote is under
/// its prefix, and none holds a secret.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_bad_credentials_cannot_fill_redis_and_every_key_is_under_the_prefix() {
    let server = RedisServer::start().await;
    let up = TestUpstream::start().await;
    let mut creds = Creds::new();
    let signer = creds.hmac_user("signer");
    let key = creds.api_user("reader");
    let config = fleet_config(&creds, &up, Redis::One(&server.url()), "flood:").failed_per_ip_per_minute(10);
    let gw = GatewayProcess::serve(&config).await;
    let client = H1::new();
    // Real traffic first (the flood blocks this client).
    assert_eq!(client.get_with(&gw.url("/api/ok"), &[("x-api-key", key.token.as_str())]).await.status, 200);
    // A forged signature never reaches the replay records either.
    let now = crate::support::creds::unix_now();
    let mut forged = signer.headers_at(now, "GET", "/api/x", b"");
    forged[2].1 = "0".repeat(64);
    let _ = client.request("GET", &gw.url("/api/x"), &forged, Vec::new()).await;

    for i in 0..200 {
        let r = client.get_with(&gw.url("/api/x"), &[("x-api-key", format!("ghk_unknown{i}").as_str())]).await;
        assert!(r.status == 401 || r.status == 429, "{}", r.status);
    }
    // 10 failures fit the budget, the 11th finds it spent; then the gateway refuses the
    // client itself.
    let charged = metric(&gw, "gatehouse_shared_state_op_duration_seconds_count{op=\"failed_auth\"}").await;
    assert_eq!(charged, 11.0, "200 bad requests from one client made {charged} Redis writes");
    assert_eq!(server.cli(&["--scan", "--pattern", "flood:{ip:*"]).await.lines().count(), 1);
    // Every key in Redis: under the prefix, and no secret among them.
    let keys = server.cli(&["--scan"]).await;
    let keys: Vec<&str> = keys.lines().collect();
    assert!(!keys.is_empty());
    for k in &keys {
        assert!(k.starts_with("flood:{"), "a key outside the prefix: {k}");
        assert!(!k.contains(&key.token) && !k.contains(&signer.secret), "a secret in a key name: {k}");
    }
    assert!(!keys.iter().any(|k| k.contains(":sig:")), "a forged signature was recorded: {keys:?}");
    let dump = server.cli(&["--no-raw", "hgetall", "flood:{fleet}:usage"]).await;
    assert!(!dump.contains(&key.token) && !dump.contains("ghk_"), "{dump}");
}

/// `rediss://` with the private CA that signed Redis's certificate (`tls_ca`): the fleet
/// shares replay records over TLS. Without the CA, start-up stops with the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_state_over_tls_with_a_private_ca() {
    let dir = tempfile::tempdir().unwrap();
    let cert = rcgen::generate_simple_self_signed(vec!["127.0.0.1".into()]).unwrap();
    let (cert_path, key_path) = (dir.path().join("redis.crt"), dir.path().join("redis.key"));
    std::fs::write(&cert_path, cert.cert.pem()).unwrap();
    std::fs::write(&key_path, cert.signing_key.serialize_pem()).unwrap();
    let server = RedisServer::start_tls(&cert_path, &key_path).await;
    let url = format!("rediss://127.0.0.1:{}", server.port);

    let up = TestUpstream::start().await;
    let mut creds = Creds::new();
    let key = creds.hmac_user("signer");
    let config = fleet_config(&creds, &up, Redis::One(&url), "secure:")
        .shared_state("tls_ca", &format!("\"{}\"", cert_path.display()));
    let fleet = start_fleet(&config, 2).await;
    let client = H1::new();
    let now = crate::support::creds::unix_now();
    assert_eq!(signed(&client, &fleet[0], &key, now, "/api/tls").await.status, 200);
    assert_unauthorized(&signed(&client, &fleet[1], &key, now, "/api/tls").await, "Replayed request");
    assert_eq!(up.count(), 1);

    // The same server without its CA: not trusted, and said so at start-up.
    let written = fleet_config(&creds, &up, Redis::One(&url), "secure:").write();
    let out =
        crate::support::process::run_cli(&["check-config", "--config", &written.path.display().to_string()]).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{stderr}");
    assert!(stderr.contains(&format!("shared_state: cannot use Redis at {url}")), "{stderr}");
}

/// The `ACL SETUSER gatehouse …` line of docs/shared-state.md, as it is written there
/// (so the docs cannot drift from what is tested), with the password
/// `the-acl-password-for-gatehouse` and keys matching `pattern`; `+info` is its last rule.
fn gatehouse_acl(pattern: &str) -> Vec<String> {
    let docs = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/shared-state.md")).unwrap();
    let line = docs.lines().find(|l| l.starts_with("ACL SETUSER gatehouse ")).expect("the ACL line in the docs");
    let acl: Vec<String> = line
        .split(' ')
        .map(|w| match w {
            ">PASSWORD" => ">the-acl-password-for-gatehouse".to_string(),
            "~gatehouse:*" => format!("~{pattern}"),
            w => w.to_string(),
        })
        .collect();
    assert_eq!(acl.last().map(String::as_str), Some("+info"), "{line}");
    acl
}

/// The ACL user of docs/shared-state.md — only Gatehouse's commands, only its prefix — is
/// enough for everything a gateway does: replay records, leases, the failed-auth budget,
/// usage, the heartbeat, the check of Redis's eviction (`+info`; without it a gateway
/// still works, and warns that it cannot check).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acl_user_limited_to_gatehouse_commands_and_prefix_is_enough() {
    let server = RedisServer::start().await;
    let acl = gatehouse_acl("gh:*");
    let acl: Vec<&str> = acl.iter().map(String::as_str).collect();
    // First without `+info`: the gateway works, and warns that it cannot check eviction.
    assert_eq!(server.cli(&acl[..acl.len() - 1]).await.trim(), "OK");
    let up = TestUpstream::start().await;
    let mut creds = Creds::new();
    let signer = creds.hmac_user("signer");
    let reader = creds.api_user("reader");
    let url = format!("redis://gatehouse@127.0.0.1:{}", server.port);
    let config =
        fleet_config(&creds, &up, Redis::One(&url), "gh:").shared_state("password_env", "GH_TEST_REDIS_PASSWORD");
    let env = [("GH_TEST_REDIS_PASSWORD", "the-acl-password-for-gatehouse")];
    let a = GatewayProcess::serve_with_env(&config, &env).await;
    a.logged("cannot check whether Redis may evict keys", 1).await;
    assert_eq!(server.cli(&acl).await.trim(), "OK");
    let b = GatewayProcess::serve_with_env(&config, &env).await;
    assert_eq!(b.count_logged("cannot check whether Redis may evict keys"), 0);
    let client = H1::new();
    let now = crate::support::creds::unix_now();
    assert_eq!(signed(&client, &a, &signer, now, "/api/acl").await.status, 200);
    assert_unauthorized(&signed(&client, &b, &signer, now, "/api/acl").await, "Replayed request");
    assert_eq!(client.get_with(&b.url("/api/k"), &[("x-api-key", reader.token.as_str())]).await.status, 200);
    assert_unauthorized(&client.get_with(&b.url("/api/k"), &[("x-api-key", "ghk_unknown")]).await, "Invalid API key");
    within(STEP, "usage in Redis", async {
        while b.admin().get("/admin/v1/users/reader/usage").await.json()["requests"] != 1 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    for gw in [&a, &b] {
        assert_eq!(metric(gw, "gatehouse_shared_state_up").await, 1.0);
        let offset = metric(gw, "gatehouse_shared_state_clock_offset_seconds").await;
        assert!(offset.abs() < 1.0, "same machine, clock offset {offset} s");
        let errors = gw.admin().get("/metrics").await.text();
        assert!(
            !errors.lines().any(|l| l.starts_with("gatehouse_shared_state_errors_total") && !l.ends_with(" 0")),
            "{errors}"
        );
    }
}

/// The network drops every connection to Redis silently (a firewall or NAT forgot them:
/// nothing answers, nothing errors) while Redis is fine and new connections work: the
/// next signed request fails closed within `op_timeout`, and the gateway replaces its
/// connections by itself — signed requests are accepted again within seconds, with no
/// restart, and none reached the upstream unchecked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_the_network_dropped_silently_are_replaced() {
    let server = RedisServer::start().await;
    let relay = redis::Relay::start(server.port).await;
    let up = TestUpstream::start().await;
    let mut creds = Creds::new();
    let signer = creds.hmac_user("signer");
    let config = fleet_config(&creds, &up, Redis::One(&relay.url()), "silent:");
    let gw = GatewayProcess::serve(&config).await;
    let now = crate::support::creds::unix_now();
    // One connection per request (a new client each): they spread over the gateway's
    // worker threads (one per core, round-robin), so that each has its connection to Redis
    // before the cut.
    let warm = 2 * std::thread::available_parallelism().map_or(8, usize::from);
    for n in 0..warm {
        assert_eq!(signed(&H1::new(), &gw, &signer, now, &format!("/api/before/{n}")).await.status, 200);
    }
    let client = H1::new();

    relay.drop_existing();
    assert_replay_unavailable(&signed(&client, &gw, &signer, now, "/api/during").await);
    within(STEP, "signed requests accepted again on new connections", async {
        for n in 0.. {
            let r = signed(&client, &gw, &signer, now, &format!("/api/after/{n}")).await;
            if r.status == 200 {
                return;
            }
            assert_replay_unavailable(&r);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    assert_eq!(up.count(), warm + 1, "only the accepted signed requests reached the upstream");
    assert_eq!(metric(&gw, "gatehouse_shared_state_up").await, 1.0);
}

/// Redis answers, but more slowly than an operation may wait (each answer held 400 ms by a
/// relay, against an `op_timeout` of 200 ms; the heartbeat itself waits up to 500 ms, so
/// its probes succeed): the first signed request times out and opens the breaker, and the
/// probes' slow answers keep it open, so no later request waits for Redis (the timeout
/// count stays 1) and every signed one fails closed at once. Once Redis is fast again the
/// gateway is back in shared mode by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_slower_than_the_operation_timeout_keeps_the_breaker_open_until_it_is_fast() {
    let server = RedisServer::start().await;
    let relay = redis::Relay::start(server.port).await;
    let up = TestUpstream::start().await;
    let mut creds = Creds::new();
    let signer = creds.hmac_user("signer");
    let config = fleet_config(&creds, &up, Redis::One(&relay.url()), "slowanswer:");
    let gw = GatewayProcess::serve(&config).await;
    let client = H1::new();
    let now = crate::support::creds::unix_now();
    assert_eq!(signed(&client, &gw, &signer, now, "/api/fast").await.status, 200);

    relay.slow_answers(400);
    assert_replay_unavailable(&signed(&client, &gw, &signer, now, "/api/slow").await);
    let timeouts = "gatehouse_shared_state_errors_total{kind=\"timeout\",op=\"admit\"}";
    let replay_timeouts = "gatehouse_shared_state_errors_total{kind=\"timeout\",op=\"replay\"}";
    let opened = metric(&gw, timeouts).await + metric(&gw, replay_timeouts).await;
    assert_eq!(opened, 1.0, "the first slow operation times out");
    // Three probes answered, slowly (a signal: the heartbeat count, not a sleep).
    let beats = "gatehouse_shared_state_op_duration_seconds_count{op=\"heartbeat\"}";
    let before = metric(&gw, beats).await;
    within(Duration::from_secs(10), "three probes of the slow Redis", async {
        let mut n = 0;
        while metric(&gw, beats).await < before + 3.0 {
            n += 1;
            let r = signed(&client, &gw, &signer, now, &format!("/api/slow/{n}")).await;
            assert_replay_unavailable(&r);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert_eq!(metric(&gw, "gatehouse_shared_state_up").await, 0.0, "a slow probe closed the breaker");
    let waited = metric(&gw, timeouts).await + metric(&gw, replay_timeouts).await;
    assert_eq!(waited, 1.0, "requests waited for the slow Redis again");
    assert!(
        metric(&gw, "gatehouse_shared_state_errors_total{kind=\"breaker_open\",op=\"admit\"}").await >= 1.0
            || metric(&gw, "gatehouse_shared_state_errors_total{kind=\"breaker_open\",op=\"replay\"}").await >= 1.0
    );
    assert_eq!(up.count(), 1, "a signed request reached the upstream without its replay check");

    relay.slow_answers(0);
    until_metric(&gw, "gatehouse_shared_state_up", 1.0, Duration::from_secs(5)).await;
    assert_eq!(signed(&client, &gw, &signer, crate::support::creds::unix_now(), "/api/fast/again").await.status, 200);
}

/// Opening a connection to Redis takes longer than an operation may (300 ms against an
/// `op_timeout` of 50 ms, as TLS and AUTH to a distant Redis can): the first requests of a
/// worker thread fall back, its connection keeps opening in the background, and then the
/// gateway is in shared mode.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_slower_to_connect_than_an_operation_is_still_reached() {
    let server = RedisServer::start().await;
    let relay = redis::Relay::start(server.port).await;
    relay.slow_connects(300);
    let up = TestUpstream::start().await;
    let mut creds = Creds::new();
    let signer = creds.hmac_user("signer");
    let url = relay.url();
    let config = GatewayConfig::new()
        .credentials(&creds)
        .admin("admin-test-token-0123456789abcdef")
        .route(RouteSpec::new("api", "/api/").to(&up).authenticated())
        .shared_state("redis", &url)
        .shared_state("key_prefix", "\"slowconnect:\"")
        .shared_state("op_timeout", "50ms");
    let gw = GatewayProcess::serve(&config).await;
    let client = H1::new();
    let mut refused = 0;
    within(STEP, "a signed request to be accepted in shared mode", async {
        loop {
            let r = signed(&client, &gw, &signer, crate::support::creds::unix_now(), &format!("/api/{refused}")).await;
            if r.status == 200 {
                return;
            }
            assert_replay_unavailable(&r);
            refused += 1;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    println!("signed requests refused while the worker's connection opened: {refused}");
    assert_eq!(metric(&gw, "gatehouse_shared_state_up").await, 1.0);
}

/// Under Redis Cluster, the node holding a key's replay records restarts empty — not the
/// node with the fleet's own epoch: the gateways notice (each master has an epoch of its
/// own) and the signature accepted before is not accepted after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_node_that_comes_back_empty_cannot_be_used_to_replay_an_earlier_signature() {
    let mut cluster = RedisCluster::start().await;
    let up = TestUpstream::start().await;
    let mut creds = Creds::new();
    let signers: Vec<HmacKey> = (0..8).map(|i| creds.hmac_user(&format!("signer{i}"))).collect();
    let urls = cluster.urls();
    let config = fleet_config(&creds, &up, Redis::Cluster(&urls), "node:").auth_hmac("max_skew", "3s");
    let fleet = start_fleet(&config, 2).await;
    let client = H1::new();
    let then = crate::support::creds::unix_now();
    for s in &signers {
        assert_eq!(signed(&client, &fleet[0], s, then, "/api/x").await.status, 200);
    }
    // The node of each key's records, and the node of the fleet's epoch.
    let node_of = |pattern: String| {
        let nodes = &cluster.nodes;
        async move {
            for (i, n) in nodes.iter().enumerate() {
                if !n.cli(&["--scan", "--pattern", &pattern]).await.trim().is_empty() {
                    return i;
                }
            }
            panic!("no node holds {pattern}");
        }
    };
    let fleet_node = node_of("node:{fleet}:epoch".into()).await;
    let mut victim = None;
    for s in &signers {
        let n = node_of(format!("node:{{k:{}}}:*", s.key_id)).await;
        if n != fleet_node {
            victim = Some((s.clone(), n));
            break;
        }
    }
    let (signer, node) = victim.expect("eight keys, and all on the fleet's node");

    cluster.nodes[node].restart().await;
    cluster.wait_ok().await;
    until_data_lost(&fleet, &client).await;
    let seen = up.count();
    for gw in &fleet {
        let r = signed(&client, gw, &signer, then, "/api/x").await;
        assert_ne!(r.status, 200, "a replay was accepted after its node lost its records");
    }
    assert_eq!(up.count(), seen);
}

/// Under Redis Cluster, a real reshard while three gateways take signed traffic:
/// `redis-cli --cluster reshard` moves a master's first slots (the records and buckets of
/// three keys among them) to another master, one slot at a time, as an operator would.
/// Meanwhile every signature is sent to one gateway and then replayed at the next: none is
/// ever accepted twice, and the upstream sees each accepted one once. A request caught in
/// a moving slot may get the fallback (503); a move is not a loss of data (nothing is
/// fenced) and opens no breaker; once it is over, each gateway accepts new signatures of
/// the moved keys and refuses their replays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_reshard_never_lets_a_replay_through() {
    let cluster = RedisCluster::start().await;
    let up = TestUpstream::start().await;
    let mut creds = Creds::new();
    let prefix = "reshard:";
    // The first master (`--cluster create` gives it slots 0–5460) gives up its first slots,
    // in order, up to the slot of the third of three keys past slot 1,000: the move is
    // under way (a second or so) before the first of them moves, and ends as the last one
    // has. (That fewer than three of sixty random keys hash into slots 1,000–5,460 has a
    // chance of 1 in a million.)
    let keys: Vec<HmacKey> = (0..60).map(|i| creds.hmac_user(&format!("resharded{i}"))).collect();
    let mut by_slot = Vec::new();
    for k in &keys {
        let slot = cluster.nodes[0].cli(&["cluster", "keyslot", &format!("{prefix}{{k:{}}}", k.key_id)]).await;
        let slot = slot.trim().parse::<u32>().unwrap();
        if slot >= 1000 {
            by_slot.push((slot, k));
        }
    }
    by_slot.sort_by_key(|(slot, _)| *slot);
    let moving: Vec<&HmacKey> = by_slot[..3].iter().map(|(_, k)| *k).collect();
    let slots = by_slot[2].0 + 1;
    assert!(
        slots <= 5461,
        "three keys in the first master's slots: {:?}",
        &by_slot[..3].iter().map(|s| s.0).collect::<Vec<_>>()
    );
    let config = fleet_config(&creds, &up, Redis::Cluster(&cluster.urls()), prefix)
        .shared_state("op_timeout", "1s")
        .rate_limit(10_000, 10_000)
        .failed_per_ip_per_minute(100_000);
    let fleet = start_fleet(&config, 3).await;
    let from = cluster.nodes[0].cli(&["cluster", "myid"]).await.trim().to_string();
    let to = cluster.nodes[1].cli(&["cluster", "myid"]).await.trim().to_string();
    let entry = format!("127.0.0.1:{}", cluster.nodes[0].port);
    let reshard = tokio::process::Command::new("redis-cli")
        .args(["--cluster", "reshard", &entry, "--cluster-from", &from, "--cluster-to", &to])
        .args(["--cluster-slots", &slots.to_string(), "--cluster-yes"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .output();
    let mut reshard = std::pin::pin!(reshard);
    let started = Instant::now();
    let client = H1::new();
    let (mut sent, mut accepted, mut fell_back) = (0, 0, 0);
    // One signature after another, each to one gateway and then to the next, until the
    // reshard is over (bounded: a reshard of a few thousand empty slots takes seconds).
    let deadline = Instant::now() + Duration::from_secs(90);
    let done = loop {
        let i = sent;
        let key = moving[i % moving.len()];
        let target = format!("/api/reshard/{i}");
        let now = crate::support::creds::unix_now();
        let mut ok = 0;
        for gw in [&fleet[i % 3], &fleet[(i + 1) % 3]] {
            let r = signed(&client, gw, key, now, &target).await;
            match r.status.as_u16() {
                200 => ok += 1,
                401 => drop(assert_unauthorized(&r, "Replayed request")),
                503 => {
                    assert_replay_unavailable(&r);
                    fell_back += 1;
                }
                s => panic!("signature {i} answered {s}: {}", r.text()),
            }
        }
        assert!(ok <= 1, "signature {i} was accepted twice during the reshard");
        accepted += ok;
        sent += 1;
        assert_eq!(up.count(), accepted, "the upstream saw a request that was not accepted once");
        if let Some(out) = futures_util::FutureExt::now_or_never(reshard.as_mut()) {
            break out.expect("redis-cli --cluster reshard");
        }
        assert!(Instant::now() < deadline, "the reshard did not end in 90 s");
    };
    assert!(
        done.status.success(),
        "reshard: {}{}",
        String::from_utf8_lossy(&done.stdout),
        String::from_utf8_lossy(&done.stderr)
    );
    println!(
        "during the reshard of {slots} slots ({:.1} s): {sent} signatures, {accepted} accepted, {fell_back} fallbacks",
        started.elapsed().as_secs_f64()
    );
    assert!(sent >= 10, "the reshard ended before the traffic got going ({sent} signatures)");
    cluster.wait_ok().await;
    // The moved keys' records and buckets are on the other master now.
    for (slot, _) in &by_slot[..3] {
        let slot = slot.to_string();
        assert_eq!(cluster.nodes[0].cli(&["cluster", "countkeysinslot", &slot]).await.trim(), "0");
        assert_ne!(cluster.nodes[1].cli(&["cluster", "countkeysinslot", &slot]).await.trim(), "0");
    }
    // Requests met the move (the migration path, not only a slot map read afresh), and no
    // gateway took it for an outage or a loss.
    let mut migrating = 0.0;
    for gw in &fleet {
        for op in ["admit", "replay"] {
            migrating +=
                metric(gw, &format!("gatehouse_shared_state_errors_total{{kind=\"migrating\",op=\"{op}\"}}")).await;
        }
        assert_eq!(gw.count_logged("shared state unavailable: falling back"), 0, "a breaker opened:\n{}", gw.stderr());
        assert_eq!(metric(gw, "gatehouse_shared_state_data_lost_total").await, 0.0, "a move was taken for a loss");
    }
    assert!(migrating >= 1.0, "no request met the move");
    // Once every gateway has read the new slot map (its heartbeat, within a second), each
    // moved key's new signatures are accepted again and their replays refused.
    let mut n = 0;
    for key in &moving {
        for gw in &fleet {
            within(STEP, "a moved key's signature accepted after the reshard", async {
                loop {
                    n += 1;
                    let r =
                        signed(&client, gw, key, crate::support::creds::unix_now(), &format!("/api/after/{n}")).await;
                    if r.status == 200 {
                        return;
                    }
                    assert_replay_unavailable(&r);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            })
            .await;
        }
    }
    for (i, key) in moving.iter().enumerate() {
        for g in 0..3 {
            let target = format!("/api/settled/{i}/{g}");
            let now = crate::support::creds::unix_now();
            let r = signed(&client, &fleet[g], key, now, &target).await;
            assert_eq!(r.status, 200, "{}", r.text());
            assert_unauthorized(&signed(&client, &fleet[(g + 1) % 3], key, now, &target).await, "Replayed request");
        }
    }
}
