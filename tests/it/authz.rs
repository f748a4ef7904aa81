//! Authorization (docs/authorization.md,
//! "Paths"): role rules, `allowed_endpoints`, path tricks against an allow-list, and
//! `X-Proxied-User`. Every refusal is the exact documented body with nothing forwarded; every
//! success is checked against what the recording upstream really received.

use crate::support::client::{H1, empty, h2_over, tls_connect};
use crate::support::creds::{ApiKey, Creds};
use crate::support::gateway::{RouteSpec, TestGateway};
use crate::support::raw::RawConn;
use crate::support::upstream::{Seen, TestUpstream};
use crate::support::{Reply, assert_error};
use http::Request;

const NOT_PERMITTED: &str = "API key does not have permission to access this resource";
const PROXIED_DENIED: &str = "Proxied user is not allowed";
const BAD_PROXIED: &str = "Invalid X-Proxied-User header";
const BAD_PATH: &str = "Request path cannot be normalised safely";
const MALFORMED: &str = "Malformed HTTP request";

/// One gateway, one recording upstream, and a user per authorization shape.
struct Fixture {
    up: TestUpstream,
    gw: TestGateway,
    client: H1,
    /// Only `GET /api/v1/orders/**`.
    reader: ApiKey,
    /// `orders-reader`, `orders-writer` and `items`.
    multi: ApiKey,
    /// No roles at all.
    norole: ApiKey,
    /// Role `all`, narrowed by `allowed_endpoints: [GET /api/v1/orders/*]`.
    narrow: ApiKey,
    /// Only `orders-reader`, with `allowed_endpoints: [* /**]` (broader than the role).
    broad: ApiKey,
    /// `allow_proxied_users: true`, any id.
    proxy_any: ApiKey,
    /// `allow_proxied_users: true`, only `alice` and `bob.smith`.
    proxy_list: ApiKey,
    /// `allowed_proxied_users` lists ids but the flag is off.
    proxy_flag_off: ApiKey,
}

/// Routes: `/` needs credentials, `/public/` is anonymous; both go to one upstream.
async fn fixture() -> Fixture {
    let up = TestUpstream::start().await;
    let mut creds = Creds::new();
    creds
        .role("orders-reader", &["GET /api/v1/orders/**"])
        .role("orders-writer", &["POST /api/v1/orders", "DELETE /api/v1/orders/*", "DELETE /api/v1/orders/*/items/*"])
        .role("items", &["GET,PUT /api/v1/items/*"]);

    let reader = creds.api_user("reader");
    creds.set_roles("reader", &["orders-reader"]);
    let multi = creds.api_user("multi");
    creds.set_roles("multi", &["orders-reader", "orders-writer", "items"]);
    let norole = creds.api_user("norole");
    creds.set_roles("norole", &[]).allowed_endpoints("norole", &["* /**"]);
    let narrow = creds.api_user("narrow");
    creds.allowed_endpoints("narrow", &["GET /api/v1/orders/*"]);
    let broad = creds.api_user("broad");
    creds.set_roles("broad", &["orders-reader"]).allowed_endpoints("broad", &["* /**"]);
    let proxy_any = creds.api_user("proxy-any");
    creds.allow_proxied_users("proxy-any", &[]);
    let proxy_list = creds.api_user("proxy-list");
    creds.allow_proxied_users("proxy-list", &["alice", "bob.smith"]);
    let proxy_flag_off = creds.api_user("proxy-flag-off");
    creds.user("proxy-flag-off").allowed_proxied_users = vec!["alice".into()];

    let gw = TestGateway::builder()
        .tls()
        .credentials(&creds)
        .route(RouteSpec::new("api", "/").to(&up).authenticated())
        .route(RouteSpec::new("public", "/public/").to(&up))
        .start()
        .await;
    Fixture { up, gw, client: H1::new(), reader, multi, norole, narrow, broad, proxy_any, proxy_list, proxy_flag_off }
}

/// What a request must come to.
#[derive(Debug, Clone, Copy)]
enum Expect {
    /// 200, and the upstream received exactly this target (path and query).
    Forwarded(&'static str),
    /// 403 `permission_error`, not granted.
    Denied,
    /// 400 `invalid_request`: the path cannot be normalised safely.
    BadPath,
    /// 400 `invalid_request`: hyper refused the request head itself.
    Malformed,
}

impl Fixture {
    /// `method path` through the pooled client with `key`'s token and `headers`.
    async fn call(&self, key: &ApiKey, method: &str, path: &str, headers: &[(&str, &str)]) -> Reply {
        let mut all = vec![("x-api-key", key.token.as_str())];
        all.extend_from_slice(headers);
        self.client.request(method, &self.gw.url(path), &all, "").await
    }

    /// Sends `head_lines` (the request line and extra header lines, `\r\n`-joined by the
    /// caller) as raw bytes on a fresh connection, with a Host, and reads the reply.
    async fn raw(&self, request_line: &[u8], headers: &[&[u8]]) -> Reply {
        let mut bytes = request_line.to_vec();
        bytes.extend_from_slice(b"\r\nHost: gw.test\r\n");
        for h in headers {
            bytes.extend_from_slice(h);
            bytes.extend_from_slice(b"\r\n");
        }
        bytes.extend_from_slice(b"Connection: close\r\n\r\n");
        let mut conn = RawConn::connect(self.gw.addr()).await;
        conn.send(&bytes).await;
        conn.read_response().await
    }

    /// `method target` sent byte for byte, authenticated with `key`.
    async fn raw_as(&self, key: &ApiKey, method: &str, target: &str) -> Reply {
        let line = format!("{method} {target} HTTP/1.1");
        let auth = format!("X-API-Key: {}", key.token);
        self.raw(line.as_bytes(), &[auth.as_bytes()]).await
    }

    /// Asserts `res` is what `expect` says, and that the upstream received exactly one
    /// more request (the expected one) or nothing more. `before` is the upstream count
    /// before the request was sent.
    fn check(&self, what: &str, res: &Reply, before: usize, expect: Expect) -> Option<Seen> {
        match expect {
            Expect::Forwarded(target) => {
                assert_eq!(res.status, 200, "{what}: {}", res.text());
                assert_eq!(self.up.count(), before + 1, "{what}: upstream count");
                let seen = self.up.requests().pop().unwrap();
                assert_eq!(seen.target, target, "{what}: forwarded target");
                return Some(seen);
            }
            Expect::Denied => {
                assert_eq!(res.status, 403, "{what}: {}", res.text());
                assert_error(res, 403, "permission_error", NOT_PERMITTED);
            }
            Expect::BadPath => {
                assert_eq!(res.status, 400, "{what}: {}", res.text());
                assert_error(res, 400, "invalid_request", BAD_PATH);
            }
            Expect::Malformed => {
                assert_eq!(res.status, 400, "{what}: {}", res.text());
                assert_error(res, 400, "invalid_request", MALFORMED);
            }
        }
        assert_eq!(self.up.count(), before, "{what}: reached the upstream: {:#?}", self.up.requests().last());
        None
    }

    /// Runs `(method, path, expect)` rows for `key` through the pooled client.
    async fn table(&self, who: &str, key: &ApiKey, rows: &[(&str, &str, Expect)]) {
        for (method, path, expect) in rows {
            let before = self.up.count();
            let res = self.call(key, method, path, &[]).await;
            let what = format!("{who}: {method} {path}");
            if let Some(seen) = self.check(&what, &res, before, *expect) {
                assert_eq!(seen.method.as_str(), *method, "{what}: forwarded method");
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_role_rule_grants_and_anything_else_is_403() {
    let fx = fixture().await;
    use Expect::*;
    fx.table(
        "reader (GET /api/v1/orders/**)",
        &fx.reader,
        &[
            ("GET", "/api/v1/orders/7?expand=items", Forwarded("/api/v1/orders/7?expand=items")),
            // Method not granted, on a path that is granted for GET.
            ("POST", "/api/v1/orders/7", Denied),
            ("POST", "/api/v1/orders", Denied),
            ("PUT", "/api/v1/orders/7", Denied),
            ("DELETE", "/api/v1/orders/7", Denied),
            ("PATCH", "/api/v1/orders/7", Denied),
            ("OPTIONS", "/api/v1/orders/7", Denied),
            // Paths outside every rule.
            ("GET", "/api/v1/accounts/7", Denied),
            ("GET", "/api/v1/order", Denied),
            ("GET", "/api/v1/ordersx", Denied),
            ("GET", "/api/v1", Denied),
            ("GET", "/", Denied),
            // Literal segments are case-sensitive.
            ("GET", "/API/v1/orders/7", Denied),
            ("GET", "/api/v1/Orders/7", Denied),
        ],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_with_several_roles_gets_the_union_of_their_rules() {
    let fx = fixture().await;
    use Expect::*;
    fx.table(
        "multi (orders-reader, orders-writer, items)",
        &fx.multi,
        &[
            ("GET", "/api/v1/orders/7", Forwarded("/api/v1/orders/7")),
            ("POST", "/api/v1/orders", Forwarded("/api/v1/orders")),
            ("DELETE", "/api/v1/orders/7", Forwarded("/api/v1/orders/7")),
            ("PUT", "/api/v1/items/3", Forwarded("/api/v1/items/3")),
            // No role grants these.
            ("POST", "/api/v1/orders/7", Denied),
            ("DELETE", "/api/v1/orders", Denied),
            ("DELETE", "/api/v1/orders/7/lines", Denied),
            ("POST", "/api/v1/items/3", Denied),
        ],
    )
    .await;
    let seen = fx.up.requests().pop().unwrap();
    assert_eq!(seen.header("x-gatehouse-roles"), "orders-reader,orders-writer,items");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_with_no_roles_is_permitted_nothing() {
    let fx = fixture().await;
    use Expect::*;
    // Its allowed_endpoints (`* /**`) do not grant anything on their own.
    fx.table(
        "norole",
        &fx.norole,
        &[
            ("GET", "/", Denied),
            ("GET", "/api/v1/orders/7", Denied),
            ("POST", "/api/v1/orders", Denied),
            ("OPTIONS", "/anything", Denied),
        ],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allowed_endpoints_narrow_the_roles_and_never_widen_them() {
    let fx = fixture().await;
    use Expect::*;
    fx.table(
        "narrow (role * /**, allowed GET /api/v1/orders/*)",
        &fx.narrow,
        &[
            ("GET", "/api/v1/orders/7", Forwarded("/api/v1/orders/7")),
            ("GET", "/api/v1/accounts/7", Denied),
            ("POST", "/api/v1/orders/7", Denied),
            ("GET", "/api/v1/orders", Denied),
            ("GET", "/api/v1/orders/7/items", Denied),
        ],
    )
    .await;
    fx.table(
        "broad (role GET /api/v1/orders/**, allowed * /**)",
        &fx.broad,
        &[
            ("GET", "/api/v1/orders/7/items", Forwarded("/api/v1/orders/7/items")),
            ("POST", "/api/v1/orders", Denied),
            ("GET", "/api/v1/accounts", Denied),
        ],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_star_is_one_segment_and_double_star_any_depth() {
    let fx = fixture().await;
    use Expect::*;
    fx.table(
        "multi: GET,PUT /api/v1/items/*",
        &fx.multi,
        &[
            ("GET", "/api/v1/items/3", Forwarded("/api/v1/items/3")),
            ("GET", "/api/v1/items/a.b-c~d", Forwarded("/api/v1/items/a.b-c~d")),
            ("GET", "/api/v1/items", Denied),
            ("GET", "/api/v1/items/", Denied),
            ("GET", "/api/v1/items/3/sub", Denied),
            ("GET", "/api/v1/items/3/", Denied),
        ],
    )
    .await;
    fx.table(
        "multi: DELETE /api/v1/orders/*/items/* (`*` in any position)",
        &fx.multi,
        &[
            ("DELETE", "/api/v1/orders/7/items/3", Forwarded("/api/v1/orders/7/items/3")),
            ("DELETE", "/api/v1/orders/7/items", Denied),
            ("DELETE", "/api/v1/orders/7/items/3/notes", Denied),
            ("DELETE", "/api/v1/orders/7/lines/3", Denied),
            ("DELETE", "/api/v1/orders//items/3", Denied),
        ],
    )
    .await;
    fx.table(
        "reader: GET /api/v1/orders/**",
        &fx.reader,
        &[
            ("GET", "/api/v1/orders", Forwarded("/api/v1/orders")),
            ("GET", "/api/v1/orders/", Forwarded("/api/v1/orders/")),
            ("GET", "/api/v1/orders/1", Forwarded("/api/v1/orders/1")),
            ("GET", "/api/v1/orders/1/items/2/notes", Forwarded("/api/v1/orders/1/items/2/notes")),
            ("GET", "/api/v1/ordersx/1", Denied),
            ("GET", "/api/v2/orders/1", Denied),
        ],
    )
    .await;
}

/// A request that carries credentials is not anonymous, even on an `allow_anonymous`
/// route: it is checked against the caller's rules like anywhere else (so identity
/// headers only ever accompany a permitted request).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_credentialed_request_on_an_anonymous_route_is_checked_against_the_rules() {
    let fx = fixture().await;
    let res = fx.call(&fx.reader, "GET", "/public/status", &[]).await;
    fx.check("reader on /public/status", &res, 0, Expect::Denied);
    let res = fx.call(&fx.norole, "GET", "/public/status", &[]).await;
    fx.check("norole on /public/status", &res, 0, Expect::Denied);
    // Without the key, the same request passes anonymously.
    let res = fx.client.get(&fx.gw.url("/public/status")).await;
    assert_eq!(res.status, 200, "{}", res.text());
    assert!(fx.up.only_request().lacks("x-gatehouse-user"));
}

/// Methods are matched exactly: `get` is not `GET` (RFC 9110 methods are case-sensitive).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lower_case_method_is_not_the_granted_one() {
    let fx = fixture().await;
    let res = fx.raw_as(&fx.reader, "get", "/api/v1/orders/7").await;
    fx.check("get /api/v1/orders/7", &res, 0, Expect::Denied);
}

/// The path tricks against `GET /api/v1/orders/**`, sent byte for byte: each is
/// refused (400 or 403) or forwarded as the normalised path, which lies under
/// `/api/v1/orders/`. Nothing outside it ever reaches the upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_tricks_never_reach_outside_the_allowed_prefix() {
    let fx = fixture().await;
    use Expect::*;
    let rows: &[(&str, Expect)] = &[
        // `..`, plain and encoded: resolved first, so the rule sees /api/v1/accounts.
        ("/api/v1/orders/../accounts", Denied),
        ("/api/v1/orders/%2e%2e/accounts", Denied),
        ("/api/v1/orders/%2E%2E/accounts", Denied),
        ("/api/v1/orders/.%2e/accounts", Denied),
        ("/api/v1/orders/%2e./accounts", Denied),
        ("/api/v1/orders/..", Denied),
        ("/api/v1/orders/7/../../accounts", Denied),
        ("/api/v1/orders/./../accounts", Denied),
        ("/api/v1/orders//../accounts", Denied),
        // `..` that stays inside is resolved and the result forwarded.
        ("/api/v1/orders/a/../b", Forwarded("/api/v1/orders/b")),
        ("/api/v1/orders/a/%2e%2e/b", Forwarded("/api/v1/orders/b")),
        ("/api/v1/x/../orders/7", Forwarded("/api/v1/orders/7")),
        // Encoded separators: refused, backends disagree on them.
        ("/api/v1/orders/..%2faccounts", BadPath),
        ("/api/v1/orders/..%2Faccounts", BadPath),
        ("/api/v1/orders/..%5caccounts", BadPath),
        ("/api/v1/orders/..%5Caccounts", BadPath),
        ("/api/v1/orders%2f..%2faccounts", BadPath),
        // `//` and `/./` merge.
        ("/api/v1/orders//7", Forwarded("/api/v1/orders/7")),
        ("/api/v1//orders/7", Forwarded("/api/v1/orders/7")),
        ("//api/v1/orders/7", Forwarded("/api/v1/orders/7")),
        ("/api/v1/./orders/7", Forwarded("/api/v1/orders/7")),
        ("/api/v1/orders/./7", Forwarded("/api/v1/orders/7")),
        ("/api/v1/orders/%2e", Forwarded("/api/v1/orders/")),
        // Path parameters: refused anywhere (`..;/` means `../` to Tomcat).
        ("/api/v1/orders/..;/accounts", BadPath),
        ("/api/v1/orders;x=1/7", BadPath),
        // Double encoding: refused (a backend that decodes twice would see `..`).
        ("/api/v1/orders/%252e%252e/accounts", BadPath),
        ("/api/v1/orders/%252e%252e%252faccounts", BadPath),
        // `..` above the root, NUL, invalid UTF-8, a stray `%`.
        ("/api/v1/orders/../../../../etc/passwd", BadPath),
        ("/api/v1/orders/%00", BadPath),
        ("/api/v1/orders/%ff", BadPath),
        ("/api/v1/orders/%zz", BadPath),
        // Encoded unreserved characters decode to the literal the rule names.
        ("/api/v1/%6Frders/7", Forwarded("/api/v1/orders/7")),
        ("/api/v1/orders/%37", Forwarded("/api/v1/orders/7")),
        // The query is never part of the match, and is forwarded exactly as sent.
        ("/api/v1/orders/7?next=../../accounts", Forwarded("/api/v1/orders/7?next=../../accounts")),
        ("/api/v1/orders/../accounts?x=/api/v1/orders/", Denied),
        // A raw backslash (some backends read it as `/`): refused.
        ("/api/v1/orders/..\\accounts", BadPath),
        ("/api/v1/orders\\..\\accounts", BadPath),
        // `%u` escapes, overlong UTF-8 dots, `..` hidden behind an encoded `;` or NUL.
        ("/api/v1/orders/%u002e%u002e/accounts", BadPath),
        ("/api/v1/orders/%C0%AE%C0%AE/accounts", BadPath),
        ("/api/v1/orders/%2e%2e%3b/accounts", BadPath),
        ("/api/v1/orders/..%00/accounts", BadPath),
        // Fullwidth dots are not dots: forwarded re-encoded, literally under the prefix.
        ("/api/v1/orders/%ef%bc%8e%ef%bc%8e/x", Forwarded("/api/v1/orders/%EF%BC%8E%EF%BC%8E/x")),
        // Raw non-ASCII is re-encoded; other raw bytes hyper accepts are re-encoded too.
        ("/api/v1/orders/caf\u{e9}", Forwarded("/api/v1/orders/caf%C3%A9")),
        ("/api/v1/orders/{x}|\"y\"", Forwarded("/api/v1/orders/%7Bx%7D%7C%22y%22")),
        // Absolute form: the authority is dropped, the path treated like any other.
        ("http://gw.test/api/v1/orders/7", Forwarded("/api/v1/orders/7")),
        ("http://gw.test/api/v1/orders/../accounts", Denied),
        // A fragment (never valid in a request target) is dropped by the parser before
        // matching: what is matched is still what is forwarded.
        ("/api/v1/orders/7#/../../accounts", Forwarded("/api/v1/orders/7")),
        ("/api/v1/accounts#/api/v1/orders/", Denied),
        // Bytes hyper refuses in a request target.
        ("/api/v1/orders/<x>", Malformed),
        ("/api/v1/orders/a`b", Malformed),
        ("/api/v1/orders/\u{7f}", Malformed),
        ("api/v1/orders/7", Malformed),
        ("*", BadPath),
    ];
    for (target, expect) in rows {
        let before = fx.up.count();
        let res = fx.raw_as(&fx.reader, "GET", target).await;
        if let Some(seen) = fx.check(&format!("GET {target}"), &res, before, *expect) {
            let path = seen.target.split('?').next().unwrap();
            assert!(path == "/api/v1/orders" || path.starts_with("/api/v1/orders/"), "{target} forwarded as {path}");
            assert_eq!(seen.header("x-gatehouse-user"), "reader");
        }
    }
    // Every forwarded row, and nothing else, reached the upstream.
    let forwarded = rows.iter().filter(|(_, e)| matches!(e, Forwarded(_))).count();
    assert_eq!(fx.up.count(), forwarded);
}

/// A proxied user is accepted from a flagged user (any id when the list is empty) and the
/// upstream sees both ids, never the client's header.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_accepted_proxied_user_reaches_the_upstream_with_the_caller() {
    let fx = fixture().await;
    let max_len = format!("a{}", "b".repeat(63));
    let cases: Vec<(&str, &ApiKey, &str, &str)> = vec![
        ("any id, empty list", &fx.proxy_any, "proxy-any", "carol"),
        ("the longest valid id", &fx.proxy_any, "proxy-any", &max_len),
        ("every id character", &fx.proxy_any, "proxy-any", "0a_b.c-d"),
        ("listed id", &fx.proxy_list, "proxy-list", "alice"),
        ("another listed id", &fx.proxy_list, "proxy-list", "bob.smith"),
    ];
    for (i, (what, key, caller, proxied)) in cases.iter().enumerate() {
        let res = fx.call(key, "GET", "/api/v1/x", &[("x-proxied-user", proxied)]).await;
        assert_eq!(res.status, 200, "{what}: {}", res.text());
        assert_eq!(fx.up.count(), i + 1, "{what}");
        let seen = fx.up.requests().pop().unwrap();
        assert_eq!(seen.header("x-gatehouse-user"), *caller, "{what}");
        assert_eq!(seen.header("x-gatehouse-proxied-user"), *proxied, "{what}");
        assert_eq!(seen.header("x-gatehouse-key-id"), key.key_id, "{what}");
        assert!(seen.lacks("x-proxied-user"), "{what}: the client's header was forwarded: {:?}", seen.headers);
    }
    // Without the header, a flagged user is just itself.
    let res = fx.call(&fx.proxy_any, "GET", "/api/v1/x", &[]).await;
    assert_eq!(res.status, 200, "{}", res.text());
    let seen = fx.up.requests().pop().unwrap();
    assert_eq!(seen.header("x-gatehouse-user"), "proxy-any");
    assert!(seen.lacks("x-gatehouse-proxied-user"), "{:?}", seen.headers);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxied_user_that_is_not_allowed_is_403() {
    let fx = fixture().await;
    let cases: Vec<(&str, &ApiKey, &str)> = vec![
        ("id not in the list", &fx.proxy_list, "mallory"),
        ("a listed id's prefix", &fx.proxy_list, "bob"),
        ("user without the flag", &fx.reader, "alice"),
        ("flag off, id in the list", &fx.proxy_flag_off, "alice"),
        ("user without the flag, its own id", &fx.reader, "reader"),
    ];
    for (what, key, proxied) in cases {
        // `/api/v1/orders/7` is granted to every one of these callers.
        let res = fx.call(key, "GET", "/api/v1/orders/7", &[("x-proxied-user", proxied)]).await;
        assert_eq!(res.status, 403, "{what}: {}", res.text());
        assert_error(&res, 403, "permission_error", PROXIED_DENIED);
        assert_eq!(fx.up.count(), 0, "{what}: reached the upstream");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxied_user_on_an_anonymous_request_is_403() {
    let fx = fixture().await;
    let res = fx.client.get_with(&fx.gw.url("/public/status"), &[("x-proxied-user", "alice")]).await;
    assert_error(&res, 403, "permission_error", PROXIED_DENIED);
    assert_eq!(fx.up.count(), 0);
    // The same anonymous request without it passes.
    let res = fx.client.get(&fx.gw.url("/public/status")).await;
    assert_eq!(res.status, 200, "{}", res.text());
    assert!(fx.up.only_request().lacks("x-gatehouse-proxied-user"));
}

/// Malformed ids are 400 before any permission is looked at, for every caller.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_proxied_user_header_is_400() {
    let fx = fixture().await;
    let long = "a".repeat(1000);
    let just_too_long = "a".repeat(65);
    let cases: Vec<(&str, Vec<(&str, &str)>)> = vec![
        ("empty", vec![("x-proxied-user", "")]),
        ("1000 characters", vec![("x-proxied-user", &long)]),
        ("65 characters", vec![("x-proxied-user", &just_too_long)]),
        ("a comma list", vec![("x-proxied-user", "alice,bob.smith")]),
        ("upper case", vec![("x-proxied-user", "Alice")]),
        ("starts with '.'", vec![("x-proxied-user", ".alice")]),
        ("a space inside", vec![("x-proxied-user", "alice smith")]),
        ("a tab inside", vec![("x-proxied-user", "alice\tsmith")]),
        ("a slash", vec![("x-proxied-user", "alice/admin")]),
        ("two headers", vec![("x-proxied-user", "alice"), ("x-proxied-user", "bob.smith")]),
        ("the same id twice", vec![("x-proxied-user", "alice"), ("x-proxied-user", "alice")]),
    ];
    for key in [&fx.proxy_any, &fx.proxy_list, &fx.reader] {
        for (what, headers) in &cases {
            let res = fx.call(key, "GET", "/api/v1/orders/7", headers).await;
            assert_eq!(res.status, 400, "{what}: {}", res.text());
            assert_error(&res, 400, "invalid_request", BAD_PROXIED);
            assert_eq!(fx.up.count(), 0, "{what}: reached the upstream");
        }
    }
    // On an anonymous route too.
    let res = fx.client.get_with(&fx.gw.url("/public/x"), &[("x-proxied-user", "Alice")]).await;
    assert_error(&res, 400, "invalid_request", BAD_PROXIED);
    assert_eq!(fx.up.count(), 0);
}

/// Bytes no well-behaved client sends: obs-text is refused by the id check; control
/// characters and bare CR never get past hyper's header parser.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_bytes_in_the_proxied_user_header_are_400() {
    let fx = fixture().await;
    let auth = format!("X-API-Key: {}", fx.proxy_any.token);
    let line: &[u8] = b"GET /api/v1/orders/7 HTTP/1.1";
    let cases: &[(&str, &[u8], &str)] = &[
        ("obs-text byte 0xff", b"X-Proxied-User: alic\xff", BAD_PROXIED),
        ("UTF-8 'e acute'", "X-Proxied-User: alic\u{e9}".as_bytes(), BAD_PROXIED),
        ("two headers, different case", b"X-Proxied-User: alice\r\nx-PROXIED-user: bob.smith", BAD_PROXIED),
        ("control byte 0x01", b"X-Proxied-User: ali\x01ce", MALFORMED),
        ("DEL 0x7f", b"X-Proxied-User: alice\x7f", MALFORMED),
        ("NUL", b"X-Proxied-User: ali\0ce", MALFORMED),
        ("bare CR", b"X-Proxied-User: alice\rbob", MALFORMED),
        ("obs-fold continuation", b"X-Proxied-User: alice\r\n bob", MALFORMED),
    ];
    for (what, header, message) in cases {
        let res = fx.raw(line, &[auth.as_bytes(), header]).await;
        assert_eq!(res.status, 400, "{what}: {}", res.text());
        assert_error(&res, 400, "invalid_request", message);
        assert_eq!(fx.up.count(), 0, "{what}: reached the upstream");
    }
    // The same raw request with a good id goes through: the refusals were the header's.
    let res = fx.raw(line, &[auth.as_bytes(), b"X-Proxied-User: alice"]).await;
    assert_eq!(res.status, 200, "{}", res.text());
    assert_eq!(fx.up.only_request().header("x-gatehouse-proxied-user"), "alice");
}

/// `X_Proxied_User` is not `X-Proxied-User` to the gateway, but a backend might read it
/// as one: it is dropped, and the request is the caller's own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_underscore_proxied_user_header_is_dropped_not_honoured() {
    let fx = fixture().await;
    let auth = format!("X-API-Key: {}", fx.reader.token);
    let res = fx.raw(b"GET /api/v1/orders/7 HTTP/1.1", &[auth.as_bytes(), b"X_Proxied_User: alice"]).await;
    assert_eq!(res.status, 200, "{}", res.text());
    let seen = fx.up.only_request();
    assert_eq!(seen.header("x-gatehouse-user"), "reader");
    assert!(seen.lacks("x_proxied_user") && seen.lacks("x-gatehouse-proxied-user"), "{:?}", seen.headers);
}

/// HTTP/2 `:path` goes through the same normalisation as an HTTP/1 request line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_tricks_over_http2_are_judged_the_same_way() {
    let fx = fixture().await;
    use Expect::*;
    let rows: &[(&str, Expect)] = &[
        ("/api/v1/orders/../accounts", Denied),
        ("/api/v1/orders/%2e%2e/accounts", Denied),
        ("/api/v1/orders/..%2faccounts", BadPath),
        ("/api/v1/orders/..;/accounts", BadPath),
        ("/api/v1/orders/%252e%252e/accounts", BadPath),
        ("/api/v1/orders//./7", Forwarded("/api/v1/orders/7")),
    ];
    for (path, expect) in rows {
        let before = fx.up.count();
        let tls = tls_connect(fx.gw.tls_addr(), fx.gw.cert_pem(), b"h2").await;
        let uri = format!("https://localhost:{}{path}", fx.gw.tls_addr().port());
        let req = Request::get(uri).header("x-api-key", &fx.reader.token).body(empty()).unwrap();
        let res = h2_over(tls, req).await;
        fx.check(&format!("h2 GET {path}"), &res, before, *expect);
    }
}

/// Method-override headers would let a client run a method no rule granted: they never
/// reach the upstream, in any spelling.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn method_override_headers_are_not_forwarded() {
    let fx = fixture().await;
    let overrides = [
        ("x-http-method-override", "DELETE"),
        ("x-http-method", "DELETE"),
        ("x-method-override", "DELETE"),
        ("x_http_method_override", "DELETE"),
    ];
    let res = fx.call(&fx.reader, "GET", "/api/v1/orders/7", &overrides).await;
    assert_eq!(res.status, 200, "{}", res.text());
    let seen = fx.up.only_request();
    assert_eq!(seen.method, http::Method::GET);
    for (name, _) in overrides {
        assert!(seen.lacks(name), "{name} was forwarded: {:?}", seen.headers);
    }
    // A method the rules do not grant stays refused whatever the override says.
    let res = fx.call(&fx.reader, "POST", "/api/v1/orders/7", &[("x-http-method-override", "GET")]).await;
    assert_error(&res, 403, "permission_error", NOT_PERMITTED);
    assert_eq!(fx.up.count(), 1);
}
