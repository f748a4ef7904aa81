//! Per-request pure steps of the pipeline, without sockets: what every proxied request
//! pays before it is forwarded. One function per group; run with
//! `cargo bench --bench hot_path` (add `-- --quick` for a fast look).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use bytes::Bytes;
use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use gatehouse::config::RouteConfig;
use gatehouse::config::{AuthConfig, IdentityHeaders, RateLimitConfig};
use gatehouse::credentials::secrets::MasterKey;
use gatehouse::credentials::snapshot::Snapshot;
use gatehouse::credentials::{mint_api_key, mint_hmac_key};
use gatehouse::pipeline::authn::replay::ReplayCache;
use gatehouse::pipeline::authn::{Caller, authenticate, sign_hex};
use gatehouse::pipeline::limit::RateLimits;
use gatehouse::pipeline::request;
use gatehouse::pipeline::request::{ConnInfo, Parsed};
use gatehouse::pipeline::rewrite;
use gatehouse::pipeline::route::Route;
use gatehouse::pipeline::route::RouteTable;
use gatehouse::wire::body::Body;
use gatehouse::wire::headers;
use gatehouse::wire::path;
use http::HeaderMap;
use http::{HeaderValue, Request};
use std::hint::black_box;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// `path::normalise`: the canonical fast path (borrowed, no allocation) and the slow
/// path (empty and dot segments, an encoded `..`, an encoded unreserved character).
fn bench_path(c: &mut Criterion) {
    let mut g = c.benchmark_group("path");
    g.bench_function("normalise_canonical", |b| b.iter(|| path::normalise(black_box("/api/v1/orders/12345"))));
    g.bench_function("normalise_dirty", |b| {
        b.iter(|| path::normalise(black_box("/api//v1/./orders/%2e%2e/accounts/%41")))
    });
    g.finish();
}

/// `RouteTable::find` over 20 routes: a match in the middle of the table, and a path
/// that only the catch-all `/` matches (every route is tried).
fn bench_route(c: &mut Criterion) {
    let table = RouteTable::new(&twenty_routes(), &[]);
    assert_eq!(table.find(None, "/api/v1/orders/12345").unwrap().name.as_ref(), "orders");
    assert_eq!(table.find(None, "/unrouted/x").unwrap().name.as_ref(), "root");
    let mut g = c.benchmark_group("route");
    g.bench_function("find_20_routes", |b| b.iter(|| table.find(black_box(None), black_box("/api/v1/orders/12345"))));
    g.bench_function("find_20_routes_fallback", |b| b.iter(|| table.find(black_box(None), black_box("/unrouted/x"))));
    g.finish();
}

fn twenty_routes() -> Vec<RouteConfig> {
    let route = |name: &str, host: Option<&str>, prefix: &str| {
        RouteConfig::plain(name, host, prefix, vec!["http://127.0.0.1:3000".parse().unwrap()], Duration::from_secs(30))
    };
    let mut routes = vec![route("root", None, "/"), route("api", None, "/api/"), route("api-v1", None, "/api/v1/")];
    for name in ["orders", "accounts", "invoices", "payments", "customers", "products", "shipments", "refunds"] {
        routes.push(route(name, None, &format!("/api/v1/{name}/")));
    }
    for name in ["orders", "accounts", "invoices", "payments"] {
        routes.push(route(&format!("{name}-v2"), None, &format!("/api/v2/{name}/")));
    }
    for name in ["billing", "reports", "search"] {
        routes.push(route(&format!("{name}-host"), Some(&format!("{name}.example.com")), "/api/v1/"));
    }
    routes.extend([route("health", None, "/healthz"), route("static", None, "/static/")]);
    assert_eq!(routes.len(), 20);
    routes
}

/// `headers::classify` over the header names of a typical API client request.
fn bench_headers(c: &mut Criterion) {
    const NAMES: [&str; 12] = [
        "host",
        "user-agent",
        "accept",
        "accept-encoding",
        "accept-language",
        "content-type",
        "content-length",
        "authorization",
        "x-api-key",
        "x-request-id",
        "x-forwarded-for",
        "cookie",
    ];
    let mut g = c.benchmark_group("headers");
    g.bench_function("classify_12_names", |b| {
        b.iter(|| {
            for name in black_box(NAMES) {
                black_box(headers::classify(name));
            }
        })
    });
    g.finish();
}

/// `request::request_id` when the client sent none: a fresh UUIDv7 as a header value.
fn bench_request(c: &mut Criterion) {
    let no_id = HeaderMap::new();
    let mut g = c.benchmark_group("request");
    g.bench_function("request_id_generate", |b| b.iter(|| request::request_id(black_box(&no_id))));
    g.finish();
}

/// A credentials file of `n` users, alternating api_key and hmac, one key each.
/// Returns the YAML, the master key, one token and one (key id, secret) from the middle.
fn users_yaml(n: usize) -> (String, MasterKey, String, (String, String)) {
    let master = MasterKey::generate().unwrap();
    let mut y = String::from("roles:\n  r:\n    rules: [\"* /**\"]\nusers:\n");
    let (mut token, mut hmac) = (String::new(), (String::new(), String::new()));
    for i in 0..n {
        let method = if i % 2 == 0 { "api_key" } else { "hmac" };
        let (key, secret) = if i % 2 == 0 { mint_api_key("k").unwrap() } else { mint_hmac_key(&master, "k").unwrap() };
        if i == n / 2 {
            token = secret.expose().to_string();
        } else if i == n / 2 + 1 {
            hmac = (key.id.value.clone(), secret.expose().to_string());
        }
        let cred = match (&key.token_sha256, &key.secret_sealed) {
            (Some(d), _) => format!("token_sha256: {d}"),
            (_, Some(s)) => format!("secret_sealed: \"{s}\""),
            _ => unreachable!(),
        };
        y.push_str(&format!(
            "  - id: user-{i}\n    roles: [r]\n    status: active\n    auth_method: {method}\n    created_at: 2026-01-01T00:00:00Z\n    updated_at: 2026-01-01T00:00:00Z\n    keys:\n      - id: {}\n        created_at: 2026-01-01T00:00:00Z\n        {cred}\n",
            key.id.value
        ));
    }
    (y, master, token, hmac)
}

fn parsed(route: &Arc<Route>, method: &str, target: &str, headers: &[(&'static str, String)], body: Bytes) -> Parsed {
    let mut b = Request::builder().method(method).uri(target);
    for (k, v) in headers {
        b = b.header(*k, v);
    }
    let (parts, ()) = b.body(()).unwrap().into_parts();
    Parsed {
        request_id: HeaderValue::from_static("bench"),
        route: route.clone(),
        path_and_query: target.parse().unwrap(),
        host: None,
        parts,
        body: Body::Full(Some(body)),
    }
}

/// The authentication settings of the benches: replay protection off, so every iteration
/// is fresh (the replay cache has its own bench).
fn bench_auth() -> AuthConfig {
    AuthConfig {
        max_skew: Duration::from_secs(300),
        replay_protection: false,
        hmac_max_body: 10 << 20,
        replay_cache_entries: 1 << 20,
        failed_per_ip_per_minute: 60,
    }
}

/// Runs a future that completes without waiting (everything here is in memory).
fn now_or_never<F: Future>(f: F) -> F::Output {
    let mut f = std::pin::pin!(f);
    match f.as_mut().poll(&mut std::task::Context::from_waker(std::task::Waker::noop())) {
        std::task::Poll::Ready(v) => v,
        std::task::Poll::Pending => panic!("authentication waited on something"),
    }
}

/// `authn::authenticate` against a 100 000-user snapshot: one API-key request, and one
/// HMAC request with a 1 KiB body (replay protection off here so every iteration is
/// fresh; the replay cache has its own bench). Also the snapshot build itself.
fn bench_authn(c: &mut Criterion) {
    const USERS: usize = 100_000;
    let (yaml, master, token, (key_id, secret)) = users_yaml(USERS);
    let rate = RateLimitConfig { per_second: 50, burst: 100 };
    let snap = Snapshot::parse(Path::new("bench.yaml"), &yaml, Some(&master), rate).unwrap();
    assert_eq!(snap.user_count(), USERS);
    let route = Arc::new(Route::new(&twenty_routes()[0], None, &mut 0));
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let _guard = rt.enter();
    let auth = bench_auth();
    let replay = ReplayCache::new(auth.replay_cache_entries);
    let now = 1_800_000_000;

    let mut g = c.benchmark_group("authn");
    let key_headers = [("x-api-key", token.clone())];
    g.bench_function("api_key_100k_users", |b| {
        b.iter_batched(
            || parsed(&route, "GET", "/api/v1/orders/1", &key_headers, Bytes::new()),
            |mut p| {
                assert!(
                    now_or_never(authenticate(
                        &snap,
                        &mut p,
                        &auth,
                        gatehouse::pipeline::authn::ReplayCheck::Here(&replay),
                        now
                    ))
                    .is_ok()
                )
            },
            BatchSize::SmallInput,
        )
    });
    let body = Bytes::from(vec![b'x'; 1024]);
    let ts = now.to_string();
    let sig = sign_hex(&secret, &ts, "POST", "/api/v1/orders?x=1", &body);
    let hmac_headers = [("x-api-key", key_id.clone()), ("x-timestamp", ts.clone()), ("x-signature", sig)];
    g.bench_function("hmac_1kib_100k_users", |b| {
        b.iter_batched(
            || parsed(&route, "POST", "/api/v1/orders?x=1", &hmac_headers, body.clone()),
            |mut p| {
                assert!(
                    now_or_never(authenticate(
                        &snap,
                        &mut p,
                        &auth,
                        gatehouse::pipeline::authn::ReplayCheck::Here(&replay),
                        now
                    ))
                    .is_ok()
                )
            },
            BatchSize::SmallInput,
        )
    });
    let mut n = 0u64;
    g.bench_function("replay_record", |b| {
        b.iter(|| {
            n += 1;
            let mut sig = [0u8; 32];
            sig[..8].copy_from_slice(&n.wrapping_mul(0x9E37_79B9_7F4A_7C15).to_le_bytes());
            // Steady state: 10,000 signatures a second, each kept for 10 seconds, so about
            // 100,000 are live and a second's group expires every 10,000 records; the cache
            // never reaches its bound (the refusing path purges every shard: another cost).
            let at = now + (n / 10_000) as i64;
            replay.record(black_box("hk_bench"), &sig, at + 10, u64::MAX, at)
        })
    });
    g.sample_size(10);
    g.bench_function("snapshot_build_100k_users", |b| {
        b.iter(|| Snapshot::parse(Path::new("bench.yaml"), black_box(&yaml), Some(&master), rate).unwrap())
    });
    g.finish();
}

/// `authz::permits` for a user with 50 rules (5 roles × 10): a request granted by the
/// very last rule (every rule is tried) and one that no rule grants.
fn bench_authz(c: &mut Criterion) {
    let roles: Vec<String> = (0..5)
        .map(|r| {
            let rules: Vec<String> = (0..10).map(|i| format!("\"GET,POST /api/v{r}/res{i}/*/items/**\"")).collect();
            format!("  role{r}:\n    rules: [{}]\n", rules.join(", "))
        })
        .collect();
    let yaml = format!(
        "roles:\n{}users:\n  - id: u\n    roles: [role0, role1, role2, role3, role4]\n    status: active\n    auth_method: api_key\n    created_at: 2026-01-01T00:00:00Z\n    updated_at: 2026-01-01T00:00:00Z\n    keys:\n      - id: k\n        created_at: 2026-01-01T00:00:00Z\n        token_sha256: {}\n",
        roles.concat(),
        "0".repeat(64)
    );
    let rate = RateLimitConfig { per_second: 50, burst: 100 };
    let snap = Snapshot::parse(Path::new("bench.yaml"), &yaml, None, rate).unwrap();
    let user = snap.by_id("k").unwrap().user.clone();
    assert_eq!(user.roles.iter().map(|r| r.rules.len()).sum::<usize>(), 50);
    let (method, hit, miss) = (http::Method::POST, "/api/v4/res9/42/items/7", "/api/v9/res1/42/items/7");
    assert!(gatehouse::pipeline::authz::permits(&user, &method, hit).is_some());
    let mut g = c.benchmark_group("authz");
    g.bench_function("permits_50_rules_last", |b| {
        b.iter(|| gatehouse::pipeline::authz::permits(&user, black_box(&method), black_box(hit)))
    });
    g.bench_function("permits_50_rules_none", |b| {
        b.iter(|| gatehouse::pipeline::authz::permits(&user, black_box(&method), black_box(miss)))
    });
    g.finish();
}

/// The key's rate-limit check (governor, behind a map by key id), and the rewrite of an
/// authorised API-key request (credentials and hop-by-hop headers out; identity, forwarding
/// and request id in) and of its response (hop-by-hop out; request id and quota in).
fn bench_limit_rewrite(c: &mut Criterion) {
    let (yaml, master, token, _) = users_yaml(1_000);
    let rate = RateLimitConfig { per_second: 1_000_000_000, burst: 1_000_000_000 };
    let snap = Snapshot::parse(Path::new("bench.yaml"), &yaml, Some(&master), rate).unwrap();
    let route = Arc::new(Route::new(&twenty_routes()[0], None, &mut 0));
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let _guard = rt.enter();
    let auth = bench_auth();
    let replay = ReplayCache::new(auth.replay_cache_entries);
    let headers = [
        ("x-api-key", token),
        ("user-agent", "bench/1.0".to_string()),
        ("accept", "application/json".to_string()),
        ("connection", "keep-alive".to_string()),
    ];
    let authorised = || {
        let mut p = parsed(&route, "GET", "/api/v1/orders/1", &headers, Bytes::new());
        let caller = now_or_never(authenticate(
            &snap,
            &mut p,
            &auth,
            gatehouse::pipeline::authn::ReplayCheck::Here(&replay),
            1_800_000_000,
        ))
        .unwrap();
        let permit = gatehouse::pipeline::authz::authorize(caller, &p).unwrap();
        (p, permit)
    };
    let (_, permit) = authorised();
    let Caller::User(identity) = permit.caller() else { panic!("the bench key is a user's") };
    let key = identity.key.clone();

    let limits = RateLimits::new(60, gatehouse::pipeline::clock::Clock::system());
    let mut g = c.benchmark_group("limit");
    g.bench_function("check_key", |b| b.iter(|| limits.check_key(black_box(&key)).unwrap()));
    g.finish();

    let conn = ConnInfo::new("192.0.2.7:50000".parse().unwrap(), Arc::from("bench"), false);
    let names = IdentityHeaders::default();
    let request_id = HeaderValue::from_static("0190a5d2-3c4b-7def-8a12-3456789abcde");
    let quota = limits.check_key(&key).unwrap();
    let upstream_response = || {
        let mut res = http::Response::new(Body::full(Bytes::from_static(b"{\"ok\":true}")));
        let h = res.headers_mut();
        for (k, v) in [
            ("server", "nginx"),
            ("date", "Mon, 23 Nov 2026 17:00:00 GMT"),
            ("content-type", "application/json"),
            ("content-length", "11"),
            ("connection", "keep-alive"),
        ] {
            h.insert(k, HeaderValue::from_static(v));
        }
        res
    };
    let mut g = c.benchmark_group("rewrite");
    g.bench_function("request", |b| {
        b.iter_batched(
            authorised,
            |(p, permit)| rewrite::request(p, &permit, &conn, false, &names),
            BatchSize::SmallInput,
        )
    });
    g.bench_function("response", |b| {
        b.iter_batched(
            upstream_response,
            |res| rewrite::response(res, &request_id, Some(quota.clone())),
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

criterion_group!(
    benches,
    bench_path,
    bench_route,
    bench_headers,
    bench_request,
    bench_authn,
    bench_authz,
    bench_limit_rewrite
);
criterion_main!(benches);
