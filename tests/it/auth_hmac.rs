//! HMAC-signed requests (docs/authentication.md):
//! what is accepted, what the upstream receives, and every bad signature, timestamp,
//! replay and oversized body as the exact documented error with nothing forwarded.

use crate::support::client::H1;
use crate::support::creds::{Creds, Headers, HmacKey, unix_now};
use crate::support::gateway::{RouteSpec, TestGateway};
use crate::support::raw::RawConn;
use crate::support::upstream::{BodyEnd, TestUpstream};
use crate::support::{Reply, assert_error, assert_unauthorized};
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

/// The window the fixture's gateway allows (`auth.hmac.max_skew`).
const SKEW: i64 = 30;
/// The fixture's `auth.hmac.max_body`.
const MAX_BODY: usize = 1024;

struct Fixture {
    up: TestUpstream,
    gw: TestGateway,
    client: H1,
    key: HmacKey,
    /// Another hmac user's key.
    other: HmacKey,
}

async fn fixture() -> Fixture {
    let up = TestUpstream::start().await;
    let mut creds = Creds::new();
    let key = creds.hmac_user("signer");
    let other = creds.hmac_user("other-signer");
    let gw = TestGateway::builder()
        .credentials(&creds)
        .auth_hmac("max_skew", "30s")
        .auth_hmac("max_body", "1KiB")
        .route(RouteSpec::new("api", "/api/").to(&up).authenticated())
        .start()
        .await;
    Fixture { up, gw, client: H1::new(), key, other }
}

impl Fixture {
    /// Sends `method target` with `headers` and `body`.
    async fn send(&self, method: &str, target: &str, headers: &[(&str, String)], body: &[u8]) -> Reply {
        self.client.request(method, &self.gw.url(target), headers, body.to_vec()).await
    }

    /// Sends a request signed now, correctly.
    async fn signed(&self, method: &str, target: &str, body: &[u8]) -> Reply {
        self.send(method, target, &self.key.headers(method, target, body), body).await
    }

    /// Sends `GET /api/x` signed with timestamp `now + offset`, read just before sending.
    /// When the clock's second changed while the request was in flight, the gateway may
    /// have read either second, so the answer proves nothing: that attempt is repeated.
    /// Returns the conclusive reply and how many inconclusive attempts were forwarded.
    async fn at_offset(&self, offset: i64) -> (Reply, usize) {
        let mut stray = 0;
        for _ in 0..10 {
            let before = self.up.count();
            let t0 = unix_now();
            let res = self.send("GET", "/api/x", &self.key.headers_at(t0 + offset, "GET", "/api/x", b""), b"").await;
            if unix_now() == t0 {
                return (res, stray);
            }
            stray += self.up.count() - before;
        }
        panic!("the clock's second changed during every attempt");
    }
}

/// Asserts the exact 401 with `message` and that the upstream has seen `forwarded`
/// requests in all.
fn refused(what: &str, res: &Reply, message: &str, up: &TestUpstream, forwarded: usize) {
    assert_eq!(res.status, 401, "{what}: {}", res.text());
    assert_unauthorized(res, message);
    assert_eq!(up.count(), forwarded, "{what}: reached the upstream: {:#?}", up.requests());
}

/// The signature, computed here with the `hmac` and `sha2` crates directly from the
/// canonical string as the integrators' Python client builds it:
/// `hmac.new(secret, f"{ts}{method.upper()}{path}{body}".encode("utf-8"), sha256).hexdigest()`.
fn python_style_signature(secret: &str, ts: &str, method: &str, path: &str, body: &str) -> String {
    let canonical = format!("{ts}{}{path}{body}", method.to_uppercase());
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(canonical.as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signed_get_is_forwarded_with_the_identity_and_without_the_credential_headers() {
    let fx = fixture().await;

    let res = fx.signed("GET", "/api/v1/hello", b"").await;

    assert_eq!(res.status, 200, "{}", res.text());
    let seen = fx.up.only_request();
    assert_eq!(seen.target, "/api/v1/hello");
    assert_eq!(seen.header("x-gatehouse-user"), "signer");
    assert_eq!(seen.header("x-gatehouse-key-id"), fx.key.key_id);
    for cred in ["x-api-key", "authorization", "x-signature", "x-timestamp"] {
        assert!(seen.lacks(cred), "{cred} was forwarded: {:?}", seen.headers);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signed_post_with_body_and_query_reaches_the_upstream_with_the_exact_body() {
    let fx = fixture().await;
    let body = br#"{"order":42,"note":"caf\u00e9 & cr\u00e8me"}"#;

    let res = fx.signed("POST", "/api/v1/orders?x=1&y=%20z", body).await;

    assert_eq!(res.status, 200, "{}", res.text());
    let seen = fx.up.only_request();
    assert_eq!(seen.method, "POST");
    assert_eq!(seen.target, "/api/v1/orders?x=1&y=%20z");
    assert_eq!(seen.body_end, BodyEnd::Complete);
    assert_eq!(seen.body_bytes, body.len() as u64);
    assert_eq!(seen.body_prefix, body.to_vec());
    assert_eq!(seen.header("x-gatehouse-user"), "signer");
}

/// The scheme byte for byte, computed independently of Gatehouse's own code, with a
/// lower-case method (it is signed upper-case) and a non-ASCII UTF-8 body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signature_computed_by_hand_like_the_python_client_is_accepted() {
    let fx = fixture().await;
    let body = r#"{"name":"Zoë","emoji":"🦀"}"#;
    let ts = unix_now().to_string();
    let sig = python_style_signature(&fx.key.secret, &ts, "post", "/api/v1/people?team=a", body);
    assert_eq!(
        sig,
        gatehouse::pipeline::authn::sign_hex(&fx.key.secret, &ts, "POST", "/api/v1/people?team=a", body.as_bytes())
    );

    let headers = [("x-api-key", fx.key.key_id.clone()), ("x-timestamp", ts), ("x-signature", sig)];
    let res = fx.send("POST", "/api/v1/people?team=a", &headers, body.as_bytes()).await;

    assert_eq!(res.status, 200, "{}", res.text());
    assert_eq!(fx.up.only_request().body_prefix, body.as_bytes());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upper_case_hex_signature_is_accepted() {
    let fx = fixture().await;
    let mut headers = fx.key.headers("PUT", "/api/v1/x?a=b", b"data");
    headers[2].1 = headers[2].1.to_uppercase();
    assert!(headers[2].1.bytes().any(|b| b.is_ascii_uppercase()), "{}", headers[2].1);

    let res = fx.send("PUT", "/api/v1/x?a=b", &headers, b"data").await;

    assert_eq!(res.status, 200, "{}", res.text());
    assert_eq!(fx.up.only_request().body_prefix, b"data");
}

/// The signed path is the request target exactly as sent (docs/authentication.md#hmac-signatures); what is forwarded
/// is its normalised form (docs/authorization.md#paths).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_target_is_signed_exactly_as_sent_even_when_it_is_not_normalised() {
    let fx = fixture().await;

    let res = fx.signed("GET", "/api/v1//a/./b?q=1", b"").await;

    assert_eq!(res.status, 200, "{}", res.text());
    assert_eq!(fx.up.only_request().target, "/api/v1/a/b?q=1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_signature_is_invalid_signature_and_nothing_is_forwarded() {
    let fx = fixture().await;
    let (ts, id) = (unix_now().to_string(), fx.key.key_id.clone());
    let with = |sig: String| vec![("x-api-key", id.clone()), ("x-timestamp", ts.clone()), ("x-signature", sig)];
    let sign = |method: &str, target: &str, body: &[u8]| fx.key.sign(&ts, method, target, body);
    let wrong_secret = gatehouse::pipeline::authn::sign_hex("ghs_not-the-secret", &ts, "POST", "/api/o?x=1", b"{}");
    let others_secret = fx.other.sign(&ts, "POST", "/api/o?x=1", b"{}");

    let cases: Vec<(&str, &str, Headers, &[u8])> = vec![
        ("wrong secret", "/api/o?x=1", with(wrong_secret), b"{}"),
        ("another key's secret", "/api/o?x=1", with(others_secret), b"{}"),
        ("tampered body", "/api/o?x=1", with(sign("POST", "/api/o?x=1", b"{}")), b"{ }"),
        ("body added", "/api/o?x=1", with(sign("POST", "/api/o?x=1", b"")), b"{}"),
        ("tampered query", "/api/o?x=2", with(sign("POST", "/api/o?x=1", b"{}")), b"{}"),
        ("query added", "/api/o?x=1&admin=1", with(sign("POST", "/api/o?x=1", b"{}")), b"{}"),
        ("signed without the query", "/api/o?x=1", with(sign("POST", "/api/o", b"{}")), b"{}"),
        ("tampered path", "/api/p?x=1", with(sign("POST", "/api/o?x=1", b"{}")), b"{}"),
        ("signed for another method", "/api/o?x=1", with(sign("PUT", "/api/o?x=1", b"{}")), b"{}"),
        ("signature is not hex", "/api/o?x=1", with("zz".repeat(32)), b"{}"),
        ("signature is too short", "/api/o?x=1", with(sign("POST", "/api/o?x=1", b"{}")[..62].to_string()), b"{}"),
        ("signature is empty", "/api/o?x=1", with(String::new()), b"{}"),
        ("hmac key id without signature headers", "/api/o?x=1", vec![("x-api-key", id.clone())], b"{}"),
        (
            "hmac key id as Bearer without signature headers",
            "/api/o?x=1",
            vec![("authorization", format!("Bearer {id}"))],
            b"{}",
        ),
        (
            "hmac key id and timestamp, no signature",
            "/api/o?x=1",
            vec![("x-api-key", id.clone()), ("x-timestamp", ts.clone())],
            b"{}",
        ),
    ];
    for (what, target, headers, body) in cases {
        let res = fx.send("POST", target, &headers, body).await;
        refused(what, &res, "Invalid signature", &fx.up, 0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timestamp_outside_the_window_is_refused() {
    let fx = fixture().await;

    // Older than the window: the gateway's clock can only have moved further away.
    let (res, stray) = fx.at_offset(-(SKEW + 1)).await;
    refused("31 s old", &res, "Request timestamp is outside the allowed window", &fx.up, stray);
    // Newer than the window.
    let (res, stray2) = fx.at_offset(SKEW + 1).await;
    refused("31 s ahead", &res, "Request timestamp is outside the allowed window", &fx.up, stray + stray2);
    let forwarded = stray + stray2;

    let id = fx.key.key_id.clone();
    for (what, ts) in [
        ("an hour old", (unix_now() - 3600).to_string()),
        ("a day ahead", (unix_now() + 86_400).to_string()),
        ("non-numeric", "yesterday".to_string()),
        ("fractional", format!("{}.5", unix_now())),
        ("hex", format!("{:#x}", unix_now())),
        ("with a plus sign", format!("+{}", unix_now())),
        ("negative", format!("-{}", unix_now())),
        ("zero", "0".to_string()),
        ("absurdly large", "99999999999999999999999999".to_string()),
        ("just past i64", "9223372036854775808".to_string()),
        ("in milliseconds", format!("{}000", unix_now())),
        ("empty", String::new()),
    ] {
        // Correctly signed over the timestamp as sent: only the timestamp is at fault.
        let sig = fx.key.sign(&ts, "GET", "/api/x", b"");
        let headers = [("x-api-key", id.clone()), ("x-timestamp", ts), ("x-signature", sig)];
        let res = fx.send("GET", "/api/x", &headers, b"").await;
        refused(what, &res, "Request timestamp is outside the allowed window", &fx.up, forwarded);
    }
}

/// README: "exactly `max_skew` is accepted", in both directions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timestamp_exactly_max_skew_away_is_accepted() {
    let fx = fixture().await;

    let (res, stray) = fx.at_offset(-SKEW).await;
    assert_eq!(res.status, 200, "exactly 30 s old: {}", res.text());
    let (res, stray2) = fx.at_offset(SKEW).await;
    assert_eq!(res.status, 200, "exactly 30 s ahead: {}", res.text());

    assert_eq!(fx.up.count(), 2 + stray + stray2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_signed_request_twice_is_a_replay() {
    let fx = fixture().await;
    let headers = fx.key.headers("POST", "/api/pay?amount=10", b"{\"to\":\"bob\"}");

    let first = fx.send("POST", "/api/pay?amount=10", &headers, b"{\"to\":\"bob\"}").await;
    assert_eq!(first.status, 200, "{}", first.text());
    let second = fx.send("POST", "/api/pay?amount=10", &headers, b"{\"to\":\"bob\"}").await;
    refused("the same request again", &second, "Replayed request", &fx.up, 1);

    // The same signature in another case is the same signature.
    let mut upper = headers.clone();
    upper[2].1 = headers[2].1.to_uppercase();
    let third = fx.send("POST", "/api/pay?amount=10", &upper, b"{\"to\":\"bob\"}").await;
    refused("case-flipped hex", &third, "Replayed request", &fx.up, 1);
    let mut mixed = headers.clone();
    mixed[2].1 =
        headers[2].1.char_indices().map(|(i, c)| if i % 2 == 0 { c.to_ascii_uppercase() } else { c }).collect();
    let fourth = fx.send("POST", "/api/pay?amount=10", &mixed, b"{\"to\":\"bob\"}").await;
    refused("mixed-case hex", &fourth, "Replayed request", &fx.up, 1);
}

/// A replay is refused even when the first copy was sent upper-case.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lower_case_copy_of_an_accepted_upper_case_signature_is_a_replay() {
    let fx = fixture().await;
    let mut headers = fx.key.headers("GET", "/api/x", b"");
    let lower = headers[2].1.clone();
    headers[2].1 = lower.to_uppercase();

    let first = fx.send("GET", "/api/x", &headers, b"").await;
    assert_eq!(first.status, 200, "{}", first.text());
    headers[2].1 = lower;
    let second = fx.send("GET", "/api/x", &headers, b"").await;
    refused("lower-case copy", &second, "Replayed request", &fx.up, 1);
}

/// The raw request head of a signed POST of `len` bytes to `/api/upload`.
fn signed_head(key: &HmacKey, body: &[u8], framing: &str) -> String {
    let h = key.headers("POST", "/api/upload", body);
    format!(
        "POST /api/upload HTTP/1.1\r\nHost: gw.test\r\n{framing}\r\n{}: {}\r\n{}: {}\r\n{}: {}\r\n\r\n",
        h[0].0, h[0].1, h[1].0, h[1].1, h[2].0, h[2].1
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signed_body_over_max_body_with_content_length_gets_413_before_it_is_sent() {
    let fx = fixture().await;
    let body = vec![b'x'; MAX_BODY + 1];

    // Only the head, asking for 100 Continue: the answer is the 413, not a 100.
    let mut conn = RawConn::connect(fx.gw.addr()).await;
    let head = signed_head(&fx.key, &body, &format!("Content-Length: {}\r\nExpect: 100-continue", body.len()));
    conn.send(head.as_bytes()).await;
    let res = conn.read_response().await;

    assert_error(&res, 413, "payload_too_large", "Request body is too large");
    assert_eq!(fx.up.count(), 0);
    assert_eq!(fx.up.connections(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signed_chunked_body_over_max_body_gets_413_and_nothing_is_forwarded() {
    let fx = fixture().await;
    let body = vec![b'x'; MAX_BODY + 1];

    let mut conn = RawConn::connect(fx.gw.addr()).await;
    let mut req = signed_head(&fx.key, &body, "Transfer-Encoding: chunked").into_bytes();
    // The whole body in one write, so the gateway has read everything when it refuses.
    req.extend_from_slice(format!("{:x}\r\n", body.len()).as_bytes());
    req.extend_from_slice(&body);
    req.extend_from_slice(b"\r\n0\r\n\r\n");
    conn.send(&req).await;
    let res = conn.read_response().await;

    assert_error(&res, 413, "payload_too_large", "Request body is too large");
    assert_eq!(fx.up.count(), 0);
    assert_eq!(fx.up.connections(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signed_body_exactly_max_body_is_forwarded_whole() {
    let fx = fixture().await;
    let body = vec![b'y'; MAX_BODY];

    let res = fx.signed("POST", "/api/upload", &body).await;

    assert_eq!(res.status, 200, "{}", res.text());
    let seen = fx.up.only_request();
    assert_eq!((seen.body_bytes, seen.body_end), (MAX_BODY as u64, BodyEnd::Complete));
    assert_eq!(seen.body_prefix, body);
}

/// a replay cache at its bound refuses new signatures with 429 `replay_cache_full` (its own
/// reason, in the audit record and the metrics, never the per-IP limit's), and the
/// metrics show how full it is
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_replay_cache_refuses_with_its_own_reason_and_shows_in_the_metrics() {
    let up = TestUpstream::start().await;
    let mut creds = Creds::new();
    let key = creds.hmac_user("signer");
    let gw = TestGateway::builder()
        .credentials(&creds)
        .auth_hmac("replay_cache_entries", "3")
        .admin("admin-test-token-0123456789abcdef")
        .route(RouteSpec::new("api", "/api/").to(&up).authenticated())
        .start()
        .await;
    let client = H1::new();
    let metrics = async || gw.admin().get("/metrics").await.text();
    let value = crate::observability_support::value;
    let text = metrics().await;
    assert_eq!(value(&text, "gatehouse_replay_cache_capacity"), Some(3.0));
    assert_eq!(value(&text, "gatehouse_replay_cache_entries"), Some(0.0));
    for i in 0..3 {
        let target = format!("/api/x?n={i}");
        let res = client.request("GET", &gw.url(&target), &key.headers("GET", &target, b""), Vec::new()).await;
        assert_eq!(res.status, 200, "{}", res.text());
    }
    let res = client.request("GET", &gw.url("/api/x?n=3"), &key.headers("GET", "/api/x?n=3", b""), Vec::new()).await;
    assert_error(&res, 429, "rate_limit_error", "Rate limit exceeded");
    assert_eq!(res.header("retry-after"), "1");
    assert_eq!(up.count(), 3, "the refused request never reached the upstream");
    let text = metrics().await;
    assert_eq!(value(&text, "gatehouse_replay_cache_entries"), Some(3.0), "{text}");
    assert_eq!(value(&text, r#"gatehouse_auth_failures_total{reason="replay_cache_full"}"#), Some(1.0), "{text}");
    assert_eq!(value(&text, r#"gatehouse_auth_failures_total{reason="client_ip_rate_limited"}"#), None, "{text}");
    let records = gw.audit_of("/api/x", 4).await;
    let refused = records.iter().find(|r| r["status"] == 429).expect("the 429's record");
    assert_eq!(
        (refused["reason"].as_str(), refused["key_id"].as_str()),
        (Some("replay_cache_full"), Some(key.key_id.as_str())),
        "{refused}"
    );
}

/// a signature is remembered for exactly its window: once the gateway's clock has moved
/// past the window the same request is stale (no longer a replay), and the cache holds
/// only live signatures (the gateway's clock is driven, not waited for)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signature_is_remembered_for_its_window_and_no_longer() {
    use crate::observability_support::{ADMIN_TOKEN, start_on_manual_clock, value};
    let up = TestUpstream::start().await;
    let mut creds = Creds::new();
    let key = creds.hmac_user("signer");
    let gw = start_on_manual_clock(&creds, &up, "auth:\n  hmac:\n    max_skew: 30s\n").await;
    let client = H1::new();
    let send = async |ts: i64| {
        let h = key.headers_at(ts, "GET", "/api/x", b"");
        client.request("GET", &gw.url("/api/x"), &h, Vec::new()).await
    };
    let held = async || {
        let auth = format!("Bearer {ADMIN_TOKEN}");
        let text = client.get_with(&gw.admin_url("/metrics"), &[("authorization", auth.as_str())]).await.text();
        value(&text, "gatehouse_replay_cache_entries")
    };
    let t0 = gw.clock.unix_now();
    assert_eq!(send(t0).await.status, 200);
    assert_unauthorized(&send(t0).await, "Replayed request");
    assert_eq!(held().await, Some(1.0));

    // 30 s later the signature is still in its window, and still a replay.
    gw.clock.advance(std::time::Duration::from_secs(30));
    assert_unauthorized(&send(t0).await, "Replayed request");
    // A second more and it is out of the window: stale, whatever the cache holds.
    gw.clock.advance(std::time::Duration::from_secs(1));
    assert_unauthorized(&send(t0).await, "Request timestamp is outside the allowed window");
    // A request signed now is accepted, and the expired signature is gone from the cache.
    assert_eq!(send(gw.clock.unix_now()).await.status, 200);
    assert_eq!(held().await, Some(1.0), "only the live signature is held");
    assert_eq!(up.count(), 2);
}
