//! API-key authentication (docs/authentication.md): the header
//! forms that are accepted, what the upstream sees, and every bad credential as the
//! exact documented 401 with nothing forwarded.

use crate::support::client::H1;
use crate::support::creds::{ApiKey, Creds, HmacKey, unix_now};
use crate::support::gateway::{RouteSpec, TestGateway};
use crate::support::upstream::TestUpstream;
use crate::support::{Reply, assert_unauthorized};
use gatehouse::credentials::file::Status;
use gatehouse::credentials::mint_api_key;

/// One gateway with every kind of key the tests need.
struct Fixture {
    up: TestUpstream,
    gw: TestGateway,
    client: H1,
    /// `svc`'s good key.
    key: ApiKey,
    /// `other`'s good key (a second, different valid token).
    other: ApiKey,
    /// `svc`'s revoked and expired keys.
    revoked: ApiKey,
    expired: ApiKey,
    /// Keys of an inactive and a retired user.
    inactive: ApiKey,
    retired: ApiKey,
    /// An hmac user's key.
    hmac: HmacKey,
}

/// Routes: `/api/` needs credentials, `/fwd/` needs them and forwards them, `/public/`
/// is anonymous. All go to one recording upstream.
async fn fixture() -> Fixture {
    let up = TestUpstream::start().await;
    let mut creds = Creds::new();
    let key = creds.api_user("svc");
    let revoked = creds.add_api_key("svc");
    creds.revoke(&revoked.key_id);
    let expired = creds.add_api_key("svc");
    creds.expire_in(&expired.key_id, -60);
    let other = creds.api_user("other");
    let inactive = creds.api_user("sleepy");
    creds.set_status("sleepy", Status::Inactive);
    let retired = creds.api_user("gone");
    creds.set_status("gone", Status::Retired);
    let hmac = creds.hmac_user("signer");
    let gw = TestGateway::builder()
        .credentials(&creds)
        .route(RouteSpec::new("api", "/api/").to(&up).authenticated())
        .route(RouteSpec::new("fwd", "/fwd/").to(&up).authenticated().forward_credentials())
        .route(RouteSpec::new("public", "/public/").to(&up))
        .start()
        .await;
    Fixture { up, gw, client: H1::new(), key, other, revoked, expired, inactive, retired, hmac }
}

impl Fixture {
    async fn get(&self, path: &str, headers: &[(&str, &str)]) -> Reply {
        self.client.get_with(&self.gw.url(path), headers).await
    }

    /// Sends each header set to `/api/x` and asserts the exact 401 `message`, with the
    /// upstream still untouched after every one.
    async fn refused(&self, cases: &[(&str, Vec<(&str, &str)>)], message: &str) {
        for (what, headers) in cases {
            let res = self.get("/api/x", headers).await;
            assert_eq!(res.status, 401, "{what}: {}", res.text());
            assert_unauthorized(&res, message);
            assert_eq!(self.up.count(), 0, "{what}: reached the upstream: {:#?}", self.up.requests());
        }
    }
}

/// A token with one character changed (keeping it base62), so its checksum is wrong.
fn flip_one_char(token: &str) -> String {
    let mut b = token.as_bytes().to_vec();
    b[20] = if b[20] == b'a' { b'b' } else { b'a' };
    String::from_utf8(b).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_header_form_is_accepted_and_the_upstream_sees_the_identity_not_the_credential() {
    let fx = fixture().await;
    let t = fx.key.token.as_str();
    let forms: Vec<(&str, Vec<(&str, String)>)> = vec![
        ("X-API-Key", vec![("x-api-key", t.to_string())]),
        ("Authorization: Bearer", vec![("authorization", format!("Bearer {t}"))]),
        ("bare Authorization", vec![("authorization", t.to_string())]),
        ("lowercase bearer", vec![("authorization", format!("bearer {t}"))]),
        ("upper-case BEARER", vec![("authorization", format!("BEARER {t}"))]),
        ("extra spaces", vec![("authorization", format!("Bearer    {t}   "))]),
        ("a tab", vec![("authorization", format!("Bearer\t{t}"))]),
        ("spaces around X-API-Key", vec![("x-api-key", format!("  {t}  "))]),
        (
            "X-API-Key and Authorization naming the same token",
            vec![("x-api-key", t.to_string()), ("authorization", format!("Bearer {t}"))],
        ),
    ];
    for (i, (what, headers)) in forms.iter().enumerate() {
        let res = fx.client.get_with(&fx.gw.url("/api/hello?x=1"), headers).await;
        assert_eq!(res.status, 200, "{what}: {}", res.text());
        assert_eq!(fx.up.count(), i + 1, "{what}");
        let seen = fx.up.requests().pop().unwrap();
        assert_eq!(seen.target, "/api/hello?x=1", "{what}");
        assert_eq!(seen.header("x-gatehouse-user"), "svc", "{what}");
        assert_eq!(seen.header("x-gatehouse-key-id"), fx.key.key_id, "{what}");
        assert_eq!(seen.header("x-gatehouse-org"), "acme", "{what}");
        assert_eq!(seen.header("x-gatehouse-teams"), "team-a,team-b", "{what}");
        assert_eq!(seen.header("x-gatehouse-roles"), "all", "{what}");
        for cred in ["x-api-key", "authorization", "x-signature", "x-timestamp"] {
            assert!(seen.lacks(cred), "{what}: {cred} was forwarded: {:?}", seen.headers);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forward_credentials_route_keeps_the_credential_headers() {
    let fx = fixture().await;
    let t = fx.key.token.as_str();
    let bearer = format!("Bearer {t}");

    let res = fx.get("/fwd/x", &[("x-api-key", t)]).await;
    assert_eq!(res.status, 200, "{}", res.text());
    let res = fx.get("/fwd/x", &[("authorization", &bearer)]).await;
    assert_eq!(res.status, 200, "{}", res.text());

    let seen = fx.up.requests();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[0].header("x-api-key"), t);
    assert_eq!(seen[0].header("x-gatehouse-user"), "svc");
    assert_eq!(seen[1].header("authorization"), bearer);
    assert_eq!(seen[1].header("x-gatehouse-key-id"), fx.key.key_id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_credential_is_api_key_is_missing() {
    let fx = fixture().await;
    fx.refused(
        &[
            ("no headers at all", vec![]),
            // Another scheme is not a Gatehouse credential (README): as good as none.
            ("Authorization: Basic", vec![("authorization", "Basic dXNlcjpwYXNz")]),
        ],
        "API key is missing",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_malformed_and_wrong_checksum_tokens_are_invalid_api_key() {
    let fx = fixture().await;
    // Well formed, right checksum, never stored anywhere.
    let (_, unknown) = mint_api_key("nowhere").unwrap();
    let flipped = flip_one_char(&fx.key.token);
    assert_ne!(flipped, fx.key.token);
    let truncated = &fx.key.token[..fx.key.token.len() - 1];
    let longer = format!("{}0", fx.key.token);
    let bearer_flipped = format!("Bearer {flipped}");
    let bad_char = format!("{}-{}", &fx.key.token[..10], &fx.key.token[11..]);
    fx.refused(
        &[
            ("unknown token", vec![("x-api-key", unknown.expose())]),
            ("unknown token as Bearer", vec![("authorization", &format!("Bearer {}", unknown.expose()))]),
            ("malformed: made up", vec![("x-api-key", "not-a-token")]),
            ("malformed: short ghk_", vec![("x-api-key", "ghk_nope")]),
            ("malformed: one character short", vec![("x-api-key", truncated)]),
            ("malformed: one character long", vec![("x-api-key", &longer)]),
            ("malformed: non-base62 character", vec![("x-api-key", &bad_char)]),
            ("wrong checksum (one character flipped)", vec![("x-api-key", &flipped)]),
            ("wrong checksum as Bearer", vec![("authorization", &bearer_flipped)]),
            ("empty X-API-Key", vec![("x-api-key", "")]),
        ],
        "Invalid API key",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_and_expired_keys_are_invalid_api_key() {
    let fx = fixture().await;
    let bearer = format!("Bearer {}", fx.revoked.token);
    fx.refused(
        &[
            ("revoked", vec![("x-api-key", fx.revoked.token.as_str())]),
            ("revoked, as Bearer", vec![("authorization", &bearer)]),
            ("expired", vec![("x-api-key", fx.expired.token.as_str())]),
        ],
        "Invalid API key",
    )
    .await;
    // The user's other key is fine: the state is the key's.
    assert_eq!(fx.get("/api/x", &[("x-api-key", &fx.key.token)]).await.status, 200);
}

/// `revoked_at` / `expires_at` in the future schedule the change: until then the key works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_revoked_or_expiring_in_the_future_still_works() {
    let up = TestUpstream::start().await;
    let mut creds = Creds::new();
    let soon_revoked = creds.api_user("svc");
    creds.revoke_in(&soon_revoked.key_id, 3600);
    let soon_expired = creds.add_api_key("svc");
    creds.expire_in(&soon_expired.key_id, 3600);
    let gw = TestGateway::builder()
        .credentials(&creds)
        .route(RouteSpec::new("api", "/").to(&up).authenticated())
        .start()
        .await;
    let client = H1::new();
    for k in [&soon_revoked, &soon_expired] {
        let res = client.get_with(&gw.url("/x"), &[("x-api-key", &k.token)]).await;
        assert_eq!(res.status, 200, "{}", res.text());
    }
    assert_eq!(up.count(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_of_inactive_and_retired_users_are_invalid_api_key() {
    let fx = fixture().await;
    fx.refused(
        &[
            ("inactive user", vec![("x-api-key", fx.inactive.token.as_str())]),
            ("retired user", vec![("x-api-key", fx.retired.token.as_str())]),
        ],
        "Invalid API key",
    )
    .await;
}

/// Never first-wins or last-wins, even when every credential is valid on its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_credentials_in_one_request_are_refused() {
    let fx = fixture().await;
    let (a, b) = (fx.key.token.as_str(), fx.other.token.as_str());
    let (bearer_a, bearer_b) = (format!("Bearer {a}"), format!("Bearer {b}"));
    fx.refused(
        &[
            ("two different X-API-Key headers", vec![("x-api-key", a), ("x-api-key", b)]),
            ("the same X-API-Key twice", vec![("x-api-key", a), ("x-api-key", a)]),
            ("X-API-Key and Authorization disagreeing", vec![("x-api-key", a), ("authorization", &bearer_b)]),
            ("Authorization and X-API-Key disagreeing", vec![("authorization", &bearer_b), ("x-api-key", a)]),
            ("X-API-Key and a bare Authorization disagreeing", vec![("x-api-key", a), ("authorization", b)]),
            ("two Authorization headers", vec![("authorization", &bearer_a), ("authorization", &bearer_b)]),
            ("a good X-API-Key and a bad Authorization", vec![("x-api-key", a), ("authorization", "Bearer ghk_x")]),
        ],
        "Invalid API key",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_or_split_bearer_token_is_invalid_api_key() {
    let fx = fixture().await;
    let split = format!("Bearer {} {}", &fx.key.token[..20], &fx.key.token[20..]);
    fx.refused(
        &[
            ("Bearer and a space", vec![("authorization", "Bearer ")]),
            ("Bearer alone", vec![("authorization", "Bearer")]),
            ("bearer and spaces", vec![("authorization", "bearer    ")]),
            ("a space inside the token", vec![("authorization", &split)]),
        ],
        "Invalid API key",
    )
    .await;
}

/// docs/authentication.md: the method is the user's `auth_method`, never the request's choice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_credential_of_the_other_method_is_invalid_api_key() {
    let fx = fixture().await;
    let t = fx.key.token.as_str();
    let now = unix_now().to_string();
    // A signature that is even valid for the token used as a secret: still refused.
    let sig = gatehouse::pipeline::authn::sign_hex(t, &now, "GET", "/api/x", b"");
    fx.refused(
        &[
            (
                "token with X-Signature and X-Timestamp",
                vec![("x-api-key", t), ("x-timestamp", &now), ("x-signature", &sig)],
            ),
            ("token with X-Signature only", vec![("x-api-key", t), ("x-signature", &sig)]),
            (
                "token as Bearer with X-Signature",
                vec![("authorization", &format!("Bearer {t}")), ("x-signature", &sig)],
            ),
            ("an api_key key's public id as X-API-Key", vec![("x-api-key", fx.key.key_id.as_str())]),
            ("an api_key key's public id as Bearer", vec![("authorization", &format!("Bearer {}", fx.key.key_id))]),
        ],
        "Invalid API key",
    )
    .await;
    // And the other way round: an hmac key's id without a signature.
    fx.refused(&[("hmac key id alone", vec![("x-api-key", fx.hmac.key_id.as_str())])], "Invalid signature").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_anonymous_route_forwards_without_identity_but_verifies_credentials_that_are_sent() {
    let fx = fixture().await;

    let res = fx.get("/public/status", &[]).await;
    assert_eq!(res.status, 200, "{}", res.text());
    let seen = fx.up.only_request();
    for h in ["x-gatehouse-user", "x-gatehouse-key-id", "x-gatehouse-org", "x-gatehouse-teams", "x-gatehouse-roles"] {
        assert!(seen.lacks(h), "{h} on an anonymous request: {:?}", seen.headers);
    }

    // A good credential on an anonymous route identifies the caller.
    let res = fx.get("/public/status", &[("x-api-key", &fx.key.token)]).await;
    assert_eq!(res.status, 200, "{}", res.text());
    assert_eq!(fx.up.requests()[1].header("x-gatehouse-user"), "svc");

    // A bad one is refused as anywhere else, and nothing more is forwarded.
    let flipped = flip_one_char(&fx.key.token);
    for (what, headers, message) in [
        ("wrong checksum", vec![("x-api-key", flipped.as_str())], "Invalid API key"),
        ("revoked", vec![("x-api-key", fx.revoked.token.as_str())], "Invalid API key"),
        ("empty bearer", vec![("authorization", "Bearer ")], "Invalid API key"),
        ("hmac key id alone", vec![("x-api-key", fx.hmac.key_id.as_str())], "Invalid signature"),
        // A signature without a key id is an attempt to authenticate, not anonymity.
        ("X-Signature without a key id", vec![("x-signature", "00")], "API key is missing"),
    ] {
        let res = fx.get("/public/status", &headers).await;
        assert_eq!(res.status, 401, "{what}: {}", res.text());
        assert_unauthorized(&res, message);
        assert_eq!(fx.up.count(), 2, "{what}: reached the upstream");
    }
}
