//! Forwarding: protocols in and out, streaming bodies, the headers the upstream sees
//! (docs/identity-headers.md), routing and load balancing.

use crate::support::client::{H1, alpn_of, empty, full, generated, h1_over, h2_over, tls_connect};
use crate::support::gateway::{RouteSpec, TestGateway};
use crate::support::process::GatewayProcess;
use crate::support::raw::RawConn;
use crate::support::upstream::{BodyEnd, Mode, RESPOND_WITH, TestUpstream};
use crate::support::{Generated, MIB, within};
use http::{Request, Version};
use http_body_util::BodyExt;
use std::time::Duration;

async fn gateway_for(up: &TestUpstream) -> TestGateway {
    TestGateway::builder().route(RouteSpec::new("all", "/").to(up)).start().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_h1_request_reaches_the_upstream_and_the_response_streams_back() {
    let up = TestUpstream::start().await;
    let gw = gateway_for(&up).await;

    let res = H1::new()
        .send(Request::post(gw.url("/api/v1/orders?limit=5")).body(full(&b"{\"order\":42}"[..])).unwrap())
        .await;

    assert_eq!(res.status, 200, "{}", res.text());
    assert_eq!(res.header("x-upstream-id"), up.id());
    let echoed = res.json();
    assert_eq!(echoed["method"], "POST");
    assert_eq!(echoed["target"], "/api/v1/orders?limit=5");
    assert_eq!(echoed["body_bytes"], 12);
    let seen = up.only_request();
    assert_eq!(seen.method, http::Method::POST);
    assert_eq!(seen.version, Version::HTTP_11);
    assert_eq!(seen.body_prefix, b"{\"order\":42}");
    assert_eq!(seen.body_end, BodyEnd::Complete);
    assert_eq!(seen.header("x-forwarded-proto"), "http");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h1_over_tls_reaches_the_upstream_and_streams_back() {
    let up = TestUpstream::start().await;
    let gw = TestGateway::builder().tls().route(RouteSpec::new("all", "/").to(&up)).start().await;

    let tls = tls_connect(gw.tls_addr(), gw.cert_pem(), b"http/1.1").await;
    assert_eq!(alpn_of(&tls).as_deref(), Some(&b"http/1.1"[..]));
    let req = Request::get("/secure/path").header("host", "localhost").body(empty()).unwrap();
    let res = h1_over(tls, req).await;

    assert_eq!(res.status, 200, "{}", res.text());
    assert_eq!(res.version, Version::HTTP_11);
    assert_eq!(res.json()["target"], "/secure/path");
    let seen = up.only_request();
    assert_eq!(seen.header("x-forwarded-proto"), "https");
    assert_eq!(seen.header("x-forwarded-host"), "localhost");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_over_tls_arrives_upstream_as_http_1_1() {
    let up = TestUpstream::start().await;
    let gw = TestGateway::builder().tls().route(RouteSpec::new("all", "/").to(&up)).start().await;

    let tls = tls_connect(gw.tls_addr(), gw.cert_pem(), b"h2").await;
    assert_eq!(alpn_of(&tls).as_deref(), Some(&b"h2"[..]));
    let authority = format!("localhost:{}", gw.tls_addr().port());
    let req = Request::post(format!("https://{authority}/h2/upload?x=1"))
        .version(Version::HTTP_2)
        .body(generated(Generated::streamed(300 * 1024)))
        .unwrap();
    let res = h2_over(tls, req).await;

    assert_eq!(res.status, 200, "{}", res.text());
    assert_eq!(res.version, Version::HTTP_2);
    assert_eq!(res.json()["version"], "HTTP/1.1");
    let seen = up.only_request();
    assert_eq!(seen.version, Version::HTTP_11);
    assert_eq!(seen.target, "/h2/upload?x=1");
    assert_eq!(seen.body_bytes, 300 * 1024);
    assert_eq!(seen.body_end, BodyEnd::Complete);
    assert_eq!(seen.header("host"), up.url().trim_start_matches("http://"));
    assert_eq!(seen.header("x-forwarded-host"), authority);
    assert_eq!(seen.header("x-forwarded-proto"), "https");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_streamed_response_comes_back_over_tls_with_h1_and_h2() {
    let up = TestUpstream::with(Mode::LargeBody(8 * MIB)).await;
    let gw = TestGateway::builder().tls().route(RouteSpec::new("all", "/").to(&up)).start().await;

    let h1 = h1_over(
        tls_connect(gw.tls_addr(), gw.cert_pem(), b"http/1.1").await,
        Request::get("/big").header("host", "localhost").body(empty()).unwrap(),
    )
    .await;
    let h2 = h2_over(
        tls_connect(gw.tls_addr(), gw.cert_pem(), b"h2").await,
        Request::get(format!("https://localhost:{}/big", gw.tls_addr().port())).body(empty()).unwrap(),
    )
    .await;

    assert_eq!((h1.status.as_u16(), h1.version, h1.body.len() as u64), (200, Version::HTTP_11, 8 * MIB));
    assert_eq!((h2.status.as_u16(), h2.version, h2.body.len() as u64), (200, Version::HTTP_2, 8 * MIB));
    assert_eq!(up.count(), 2);
    assert!(up.requests().iter().all(|r| r.version == Version::HTTP_11));
}

/// The gateway's resident memory may grow by less than this while 50 MiB pass through.
const RSS_BUDGET_KIB: u64 = 16 * 1024;

/// Starts the real binary and warms it up with one small request, so that the baseline
/// includes the runtime, the client pool and first-use allocations.
async fn warmed_binary(up: &TestUpstream) -> (GatewayProcess, H1, u64) {
    let gw = GatewayProcess::serve(&TestGateway::builder().route(RouteSpec::new("all", "/").to(up))).await;
    let client = H1::new();
    let warm = client.get(&format!("http://{}/warmup", gw.addr())).await;
    assert_eq!(warm.status, 200, "{}", warm.text());
    let baseline = gw.memory().rss_kib;
    (gw, client, baseline)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_50_mib_request_body_streams_through_the_real_binary_in_bounded_memory() {
    let up = TestUpstream::start().await;
    let (gw, client, baseline) = warmed_binary(&up).await;

    let req =
        Request::post(format!("http://{}/upload", gw.addr())).body(generated(Generated::sized(50 * MIB))).unwrap();
    let res = within(Duration::from_secs(120), "50 MiB upload", client.send(req)).await;

    assert_eq!(res.status, 200, "{}", res.text());
    assert_eq!(res.json()["body_bytes"], 50 * MIB);
    let uploads: Vec<_> = up.requests().into_iter().filter(|r| r.target == "/upload").collect();
    assert_eq!(uploads.len(), 1);
    assert_eq!(uploads[0].body_bytes, 50 * MIB);
    assert_eq!(uploads[0].body_end, BodyEnd::Complete);
    let mem = gw.memory();
    let growth = mem.hwm_kib.saturating_sub(baseline);
    eprintln!("gateway RSS: baseline {baseline} KiB, peak {} KiB, growth {growth} KiB", mem.hwm_kib);
    assert!(growth < RSS_BUDGET_KIB, "RSS grew by {growth} KiB (baseline {baseline} KiB, peak {mem:?})");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_50_mib_response_body_streams_through_the_real_binary_in_bounded_memory() {
    let up = TestUpstream::with(Mode::LargeBody(50 * MIB)).await;
    let (gw, client, baseline) = warmed_binary(&up).await;

    let res =
        client.send_streaming(Request::get(format!("http://{}/download", gw.addr())).body(empty()).unwrap()).await;
    assert_eq!(res.status(), 200);
    let mut body = res.into_body();
    let mut received = 0u64;
    within(Duration::from_secs(120), "50 MiB download", async {
        while let Some(frame) = body.frame().await {
            if let Some(d) = frame.unwrap().data_ref() {
                received += d.len() as u64;
            }
        }
    })
    .await;

    assert_eq!(received, 50 * MIB);
    let mem = gw.memory();
    let growth = mem.hwm_kib.saturating_sub(baseline);
    eprintln!("gateway RSS: baseline {baseline} KiB, peak {} KiB, growth {growth} KiB", mem.hwm_kib);
    assert!(growth < RSS_BUDGET_KIB, "RSS grew by {growth} KiB (baseline {baseline} KiB, peak {mem:?})");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hop_by_hop_headers_and_headers_named_in_connection_are_not_forwarded() {
    let up = TestUpstream::start().await;
    let gw = gateway_for(&up).await;

    let mut conn = RawConn::connect(gw.addr()).await;
    conn.send(
        b"GET /hop HTTP/1.1\r\nHost: gw.test\r\n\
          Connection: keep-alive, X-Private-Hop, X-Forwarded-For, X-Request-Id\r\n\
          X-Private-Hop: secret\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\nTrailer: X-Sum\r\n\
          Proxy-Authorization: Basic Zm9vOmJhcg==\r\nProxy-Connection: keep-alive\r\nUpgrade: foo/1\r\n\
          X-End-To-End: kept\r\nX-Request-Id: hop-test-1\r\n\r\n",
    )
    .await;
    let res = conn.read_response().await;

    assert_eq!(res.status, 200, "{}", res.text());
    let seen = up.only_request();
    for hop in [
        "connection",
        "x-private-hop",
        "keep-alive",
        "te",
        "trailer",
        "proxy-authorization",
        "proxy-connection",
        "upgrade",
    ] {
        assert!(seen.lacks(hop), "{hop} reached the upstream: {:?}", seen.headers);
    }
    assert_eq!(seen.header("x-end-to-end"), "kept");
    // Naming a header the gateway sets in `Connection` cannot remove it.
    assert_eq!(seen.header("x-forwarded-for"), "127.0.0.1");
    assert_eq!(seen.header("x-request-id"), "hop-test-1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hop_by_hop_headers_from_the_upstream_are_not_returned_to_the_client() {
    let up = TestUpstream::start().await;
    let gw = gateway_for(&up).await;

    let req = Request::get(gw.url("/hop-back"))
        .header(RESPOND_WITH, "connection: x-upstream-private")
        .header(RESPOND_WITH, "x-upstream-private: 1")
        .header(RESPOND_WITH, "keep-alive: timeout=99")
        .header(RESPOND_WITH, "proxy-authenticate: Basic")
        .header(RESPOND_WITH, "x-upstream-public: 2")
        .body(empty())
        .unwrap();
    let res = H1::new().send(req).await;

    assert_eq!(res.status, 200, "{}", res.text());
    for hop in ["x-upstream-private", "keep-alive", "proxy-authenticate"] {
        assert!(!res.headers.contains_key(hop), "{hop} reached the client: {:?}", res.headers);
    }
    assert!(res.headers.get_all("connection").iter().all(|v| v != "x-upstream-private"), "{:?}", res.headers);
    assert_eq!(res.header("x-upstream-public"), "2");
}

/// Forwarding context a client might forge.
fn forged_forwarding(req: http::request::Builder) -> http::request::Builder {
    req.header("host", "public.example")
        .header("x-forwarded-for", "203.0.113.7")
        .header("x-forwarded-proto", "https")
        .header("x-forwarded-host", "forged.example")
        .header("forwarded", "for=203.0.113.7;proto=https")
        .header("x-real-ip", "203.0.113.7")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarding_headers_are_replaced_when_the_peer_is_not_a_trusted_proxy() {
    let up = TestUpstream::start().await;
    let gw = gateway_for(&up).await;

    let res = H1::new().send(forged_forwarding(Request::get(gw.url("/fwd"))).body(empty()).unwrap()).await;

    assert_eq!(res.status, 200, "{}", res.text());
    let seen = up.only_request();
    assert_eq!(seen.header("x-forwarded-for"), "127.0.0.1");
    assert_eq!(seen.header("x-forwarded-proto"), "http");
    assert_eq!(seen.header("x-forwarded-host"), "public.example");
    assert!(seen.lacks("forwarded"), "{:?}", seen.headers);
    assert!(seen.lacks("x-real-ip"), "{:?}", seen.headers);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarding_headers_are_extended_when_the_peer_is_a_trusted_proxy() {
    let up = TestUpstream::start().await;
    let gw = TestGateway::builder().trusted_proxy("127.0.0.1").route(RouteSpec::new("all", "/").to(&up)).start().await;

    let res = H1::new().send(forged_forwarding(Request::get(gw.url("/fwd"))).body(empty()).unwrap()).await;

    assert_eq!(res.status, 200, "{}", res.text());
    let seen = up.only_request();
    assert_eq!(seen.header("x-forwarded-for"), "203.0.113.7, 127.0.0.1");
    assert_eq!(seen.header("x-forwarded-proto"), "https");
    assert_eq!(seen.header("x-forwarded-host"), "forged.example");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sane_client_request_id_is_forwarded_and_returned() {
    let up = TestUpstream::start().await;
    let gw = gateway_for(&up).await;

    let res = H1::new()
        .send(Request::get(gw.url("/id")).header("x-request-id", "client-id_1.2:3").body(empty()).unwrap())
        .await;

    assert_eq!(res.status, 200);
    assert_eq!(res.header("x-request-id"), "client-id_1.2:3");
    assert_eq!(up.only_request().header("x-request-id"), "client-id_1.2:3");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_or_insane_request_id_is_replaced_by_a_generated_one() {
    let up = TestUpstream::start().await;
    let gw = gateway_for(&up).await;
    let client = H1::new();
    let too_long = "a".repeat(129);

    let mut ids = Vec::new();
    for sent in [None, Some("has spaces in it"), Some("quote\"d"), Some(too_long.as_str())] {
        let mut req = Request::get(gw.url("/id"));
        if let Some(v) = sent {
            req = req.header("x-request-id", v);
        }
        let res = client.send(req.body(empty()).unwrap()).await;
        assert_eq!(res.status, 200);
        let id = res.header("x-request-id").to_string();
        assert_eq!(id.len(), 36, "not a generated UUID: {id:?}");
        assert!(uuid::Uuid::parse_str(&id).is_ok(), "not a UUID: {id:?}");
        ids.push(id);
    }

    let upstream_ids: Vec<String> = up.requests().iter().map(|r| r.header("x-request-id")).collect();
    assert_eq!(upstream_ids, ids, "the upstream and the client must see the same id");
    let mut unique = ids.clone();
    unique.dedup();
    assert_eq!(unique.len(), ids.len(), "ids repeat: {ids:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_headers_with_environment_values_reach_the_upstream_and_override_the_client() {
    let up = TestUpstream::start().await;
    let gw = TestGateway::builder()
        .env("UPSTREAM_TOKEN", "s3cret-from-env")
        .route(
            RouteSpec::new("all", "/")
                .to(&up)
                .set_header("Authorization", "Bearer ${UPSTREAM_TOKEN}")
                .set_header("X-Backend-Tenant", "tenant-${UPSTREAM_TOKEN}-$$"),
        )
        .start()
        .await;

    // (A client `Authorization` would be a credential, verified.)
    let req = Request::get(gw.url("/set")).header("x-backend-tenant", "client-chosen").body(empty()).unwrap();
    let res = H1::new().send(req).await;

    assert_eq!(res.status, 200, "{}", res.text());
    let seen = up.only_request();
    assert_eq!(seen.header("authorization"), "Bearer s3cret-from-env");
    assert_eq!(seen.header("x-backend-tenant"), "tenant-s3cret-from-env-$");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_sent_identity_headers_never_reach_the_upstream_in_any_spelling() {
    let up = TestUpstream::start().await;
    let gw = gateway_for(&up).await;

    // (X-Proxied-User on an anonymous request is refused outright: see authz tests.)
    let mut conn = RawConn::connect(gw.addr()).await;
    conn.send(
        b"GET /whoami HTTP/1.1\r\nHost: gw.test\r\nX-Gatehouse-User: admin\r\nx_gatehouse_user: root\r\n\
          X-GATEHOUSE-ROLES: superuser\r\nx-gatehouse_org: acme\r\nX-Gatehouse-Key-Id: k1\r\n\
          X-Gatehouse-Proxied-User: ceo\r\nX-HTTP-Method-Override: DELETE\r\n\
          Connection: X-Gatehouse-User\r\nX-Harmless: yes\r\n\r\n",
    )
    .await;
    let res = conn.read_response().await;

    assert_eq!(res.status, 200, "{}", res.text());
    let seen = up.only_request();
    let leaked: Vec<&str> = seen
        .headers
        .keys()
        .map(|k| k.as_str())
        .filter(|k| {
            let k = k.replace('_', "-");
            k.starts_with("x-gatehouse-") || k == "x-proxied-user" || k == "x-http-method-override"
        })
        .collect();
    assert!(leaked.is_empty(), "client-chosen identity reached the upstream: {leaked:?}");
    assert_eq!(seen.header("x-harmless"), "yes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_longest_path_prefix_wins() {
    let (root, api, v1) = (TestUpstream::start().await, TestUpstream::start().await, TestUpstream::start().await);
    let gw = TestGateway::builder()
        .route(RouteSpec::new("root", "/").to(&root))
        .route(RouteSpec::new("api-v1", "/api/v1/").to(&v1))
        .route(RouteSpec::new("api", "/api/").to(&api))
        .start()
        .await;
    let client = H1::new();

    for (path, want) in [("/api/v1/orders", &v1), ("/api/v2/orders", &api), ("/api/v1", &api), ("/other", &root)] {
        let res = client.get(&gw.url(path)).await;
        assert_eq!(res.status, 200, "{path}: {}", res.text());
        assert_eq!(res.header("x-upstream-id"), want.id(), "{path} went to the wrong upstream");
    }

    assert_eq!((root.count(), api.count(), v1.count()), (1, 2, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_for_the_requested_host_wins_over_a_route_for_any_host() {
    let (special, general) = (TestUpstream::start().await, TestUpstream::start().await);
    let gw = TestGateway::builder()
        .route(RouteSpec::new("general", "/api/").to(&general))
        .route(RouteSpec::new("special", "/api/").host("api.example.com").to(&special))
        .start()
        .await;
    let client = H1::new();

    for (host, want) in [
        ("api.example.com", &special),
        ("API.Example.COM:8443", &special),
        ("other.example.com", &general),
        ("api.example.com.evil", &general),
    ] {
        let res = client.send(Request::get(gw.url("/api/x")).header("host", host).body(empty()).unwrap()).await;
        assert_eq!(res.status, 200, "{host}: {}", res.text());
        assert_eq!(res.header("x-upstream-id"), want.id(), "Host {host} went to the wrong upstream");
    }

    assert_eq!((special.count(), general.count()), (2, 2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_style_upgrade_passes_through_both_ways() {
    let up = TestUpstream::with(Mode::Upgrade).await;
    let gw = gateway_for(&up).await;

    let mut conn = RawConn::connect(gw.addr()).await;
    conn.send(
        b"GET /ws HTTP/1.1\r\nHost: gw.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
          Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    )
    .await;
    let res = conn.read_response().await;

    assert_eq!(res.status, 101, "{}", res.text());
    assert_eq!(res.header("upgrade"), "websocket");
    // upstream → client
    assert_eq!(conn.read_exact(8).await, b"welcome\n");
    // client → upstream → client, twice: the tunnel stays open
    for msg in [&b"ping 1"[..], b"a longer second message"] {
        conn.send(msg).await;
        assert_eq!(conn.read_exact(msg.len()).await, msg);
    }
    let seen = up.only_request();
    assert_eq!(seen.header("upgrade"), "websocket");
    assert_eq!(seen.header("connection").to_ascii_lowercase(), "upgrade");
    assert_eq!(seen.header("sec-websocket-key"), "dGhlIHNhbXBsZSBub25jZQ==");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_alternate_round_robin_between_two_upstreams() {
    let (a, b) = (TestUpstream::start().await, TestUpstream::start().await);
    let gw = TestGateway::builder().route(RouteSpec::new("pair", "/").to(&a).to(&b)).start().await;
    let client = H1::new();

    let mut order = Vec::new();
    for _ in 0..6 {
        let res = client.get(&gw.url("/rr")).await;
        assert_eq!(res.status, 200, "{}", res.text());
        order.push(res.header("x-upstream-id").to_string());
    }

    assert_eq!((a.count(), b.count()), (3, 3));
    assert!(order.windows(2).all(|w| w[0] != w[1]), "not alternating: {order:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_that_refuses_connections_is_skipped_and_every_get_succeeds() {
    let refused = TestUpstream::with(Mode::Refused).await;
    let up = TestUpstream::start().await;
    let gw = TestGateway::builder().route(RouteSpec::new("pair", "/").to(&refused).to(&up)).start().await;
    let client = H1::new();

    for i in 0..4 {
        let res = client.get(&gw.url(&format!("/skip/{i}"))).await;
        assert_eq!(res.status, 200, "request {i}: {}", res.text());
        assert_eq!(res.header("x-upstream-id"), up.id());
    }

    assert_eq!(up.count(), 4);
}

/// A body-less GET must not turn into a chunked request upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_without_a_body_arrives_without_one() {
    let up = TestUpstream::start().await;
    let gw = gateway_for(&up).await;

    let res = H1::new().get(&gw.url("/empty")).await;

    assert_eq!(res.status, 200);
    let seen = up.only_request();
    assert_eq!(seen.body_bytes, 0);
    assert!(seen.lacks("transfer-encoding"), "{:?}", seen.headers);
}

/// A route's header wins over one the gateway sets itself (`X-Forwarded-Proto: https`
/// behind a balancer that terminates TLS) and over the client's in any spelling (`_` for
/// `-` too), and reaches the upstream once; of two spellings of one name in the route, the
/// last one counts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_header_replaces_the_gateways_own_and_the_clients_and_arrives_once() {
    let up = TestUpstream::start().await;
    let gw = TestGateway::builder()
        .route(
            RouteSpec::new("all", "/")
                .to(&up)
                .set_header("X-Forwarded-Proto", "https")
                .set_header("X-Tenant", "first")
                .set_header("x-tenant", "second"),
        )
        .start()
        .await;

    let req = Request::get(gw.url("/set"))
        .header("x-tenant", "client-chosen")
        .header("x_tenant", "client-chosen-too")
        .header("x-forwarded-proto", "gopher")
        .body(empty())
        .unwrap();
    let res = H1::new().send(req).await;

    assert_eq!(res.status, 200, "{}", res.text());
    let seen = up.only_request();
    assert_eq!(seen.values("x-forwarded-proto"), ["https"]);
    assert_eq!(seen.values("x-tenant"), ["second"]);
    assert!(seen.values("x_tenant").is_empty(), "a backend could read x_tenant as x-tenant");
    assert_eq!(seen.values("host").len(), 1);
}
