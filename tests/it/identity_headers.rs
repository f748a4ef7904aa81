//! Identity headers (docs/identity-headers.md): a client can never choose
//! its own identity. Whatever spelling, count or `Connection` trick it sends, the upstream
//! sees exactly one value per identity header, the gateway's own, or none at all on an
//! anonymous request. Also with the header names changed under `identity_headers:`.

use crate::support::client::{H1, empty, h2_over, tls_connect};
use crate::support::creds::{ApiKey, Creds};
use crate::support::gateway::{GatewayConfig, RouteSpec, TestGateway, WrittenConfig};
use crate::support::raw::RawConn;
use crate::support::upstream::{Seen, TestUpstream};
use crate::support::{Reply, assert_error};
use crate::support::{STEP, within};
use gatehouse::config::Config;
use gatehouse::server::listen::Server;
use http::Request;
use std::collections::HashMap;
use std::net::SocketAddr;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

/// Every identity header a client might forge, in the spellings and counts a backend
/// could read as the real one, plus `Connection` naming two of them.
const FORGED: &[&str] = &[
    "X-Gatehouse-User: admin",
    "x-gatehouse-user: root",
    "X_Gatehouse_User: admin",
    "X-GATEHOUSE-USER: admin",
    "x-gatehouse_user: admin",
    "X-Gatehouse-Key-Id: ak_forged",
    "X-Gatehouse-Org: evil-corp",
    "X-Gatehouse-Teams: admins",
    "X-Gatehouse-Teams: root",
    "X-Gatehouse-Roles: superuser",
    "X_GATEHOUSE_ROLES: superuser",
    "X-Gatehouse-Proxied-User: alice",
    "x_gatehouse_proxied_user: alice",
    "X-Gatehouse-Anything-Else: x",
    "Connection: X-Gatehouse-User, X-Gatehouse-Roles",
    "Connection: x-gatehouse-key-id",
];

/// The gateway's identity headers, in the default names.
const IDENTITY: [&str; 6] = [
    "x-gatehouse-user",
    "x-gatehouse-key-id",
    "x-gatehouse-org",
    "x-gatehouse-teams",
    "x-gatehouse-roles",
    "x-gatehouse-proxied-user",
];

/// Names of every header the upstream got that a backend could read as an identity
/// header (the `X-Gatehouse-` prefix in any spelling, and `extra`), sorted.
fn identity_like(seen: &Seen, extra: &[&str]) -> Vec<String> {
    let mut names: Vec<String> = seen
        .headers
        .keys()
        .map(|k| k.as_str().to_string())
        .filter(|k| {
            let dashed = k.replace('_', "-");
            dashed.starts_with("x-gatehouse-") || extra.iter().any(|e| dashed == *e)
        })
        .collect();
    names.sort();
    names
}

/// Sends `GET target` byte for byte with `headers` on a fresh connection.
async fn raw_get(addr: SocketAddr, target: &str, headers: &[&str]) -> Reply {
    let mut req = format!("GET {target} HTTP/1.1\r\nHost: gw.test\r\n");
    for h in headers {
        req.push_str(h);
        req.push_str("\r\n");
    }
    req.push_str("Connection: close\r\n\r\n");
    let mut conn = RawConn::connect(addr).await;
    conn.send(req.as_bytes()).await;
    conn.read_response().await
}

/// `svc`: org `acme`, teams `finance,ops`, roles `all,readers`. `proxy`: may act for
/// anyone. Routes: `/api/` authenticated, `/public/` anonymous.
fn creds() -> (Creds, ApiKey, ApiKey) {
    let mut creds = Creds::new();
    creds.role("readers", &["GET /**"]);
    let svc = creds.api_user("svc");
    creds.set_roles("svc", &["all", "readers"]).set_organization("svc", "acme").set_teams("svc", &["finance", "ops"]);
    let proxy = creds.api_user("proxy");
    creds.allow_proxied_users("proxy", &[]);
    (creds, svc, proxy)
}

fn routes(config: GatewayConfig, up: &TestUpstream) -> GatewayConfig {
    config
        .route(RouteSpec::new("api", "/api/").to(up).authenticated())
        .route(RouteSpec::new("public", "/public/").to(up))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_identity_headers_never_reach_the_upstream_on_an_authenticated_route() {
    let up = TestUpstream::start().await;
    let (creds, svc, _) = creds();
    let gw = routes(TestGateway::builder().credentials(&creds), &up).start().await;

    let auth = format!("X-API-Key: {}", svc.token);
    let mut headers = vec![auth.as_str()];
    headers.extend_from_slice(FORGED);
    let res = raw_get(gw.addr(), "/api/v1/me", &headers).await;
    assert_eq!(res.status, 200, "{}", res.text());

    let seen = up.only_request();
    assert_eq!(
        identity_like(&seen, &[]),
        ["x-gatehouse-key-id", "x-gatehouse-org", "x-gatehouse-roles", "x-gatehouse-teams", "x-gatehouse-user"],
        "{:?}",
        seen.headers
    );
    assert_eq!(seen.values("x-gatehouse-user"), ["svc"]);
    assert_eq!(seen.values("x-gatehouse-key-id"), [svc.key_id.as_str()]);
    assert_eq!(seen.values("x-gatehouse-org"), ["acme"]);
    assert_eq!(seen.values("x-gatehouse-teams"), ["finance,ops"]);
    assert_eq!(seen.values("x-gatehouse-roles"), ["all,readers"]);
    assert!(seen.lacks("connection"), "{:?}", seen.headers);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_identity_headers_never_reach_the_upstream_on_an_anonymous_route() {
    let up = TestUpstream::start().await;
    let (creds, svc, _) = creds();
    let gw = routes(TestGateway::builder().credentials(&creds), &up).start().await;

    let mut with_proxied = FORGED.to_vec();
    with_proxied.push("X_Proxied_User: alice");
    let res = raw_get(gw.addr(), "/public/status", &with_proxied).await;
    assert_eq!(res.status, 200, "{}", res.text());
    let seen = up.only_request();
    assert_eq!(identity_like(&seen, &["x-proxied-user"]), Vec::<String>::new(), "{:?}", seen.headers);

    // With a credential, the anonymous route identifies the caller: the gateway's values only.
    let auth = format!("X-API-Key: {}", svc.token);
    let mut headers = vec![auth.as_str()];
    headers.extend_from_slice(FORGED);
    let res = raw_get(gw.addr(), "/public/status", &headers).await;
    assert_eq!(res.status, 200, "{}", res.text());
    let seen = up.requests().pop().unwrap();
    assert_eq!(seen.values("x-gatehouse-user"), ["svc"]);
    assert_eq!(seen.values("x-gatehouse-roles"), ["all,readers"]);
    assert!(seen.lacks("x-gatehouse-proxied-user"), "{:?}", seen.headers);
    assert_eq!(up.count(), 2);
}

/// The one accepted proxied user replaces any forged `X-Gatehouse-Proxied-User`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxied_user_header_upstream_is_the_accepted_one_only() {
    let up = TestUpstream::start().await;
    let (creds, _, proxy) = creds();
    let gw = routes(TestGateway::builder().credentials(&creds), &up).start().await;

    let auth = format!("X-API-Key: {}", proxy.token);
    let mut headers = vec![auth.as_str(), "X-Proxied-User: bob"];
    headers.extend_from_slice(FORGED);
    let res = raw_get(gw.addr(), "/api/v1/me", &headers).await;
    assert_eq!(res.status, 200, "{}", res.text());
    let seen = up.only_request();
    let mut expected: Vec<&str> = IDENTITY.to_vec();
    expected.sort();
    assert_eq!(identity_like(&seen, &["x-proxied-user"]), expected, "{:?}", seen.headers);
    assert_eq!(seen.values("x-gatehouse-user"), ["proxy"]);
    assert_eq!(seen.values("x-gatehouse-proxied-user"), ["bob"]);
}

/// HTTP/2 carries header names in lower case only, but `_` spellings and repeats still
/// arrive: they are stripped the same way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_identity_headers_over_http2_are_stripped_too() {
    let up = TestUpstream::start().await;
    let (creds, svc, _) = creds();
    let gw = routes(TestGateway::builder().tls().credentials(&creds), &up).start().await;

    let tls = tls_connect(gw.tls_addr(), gw.cert_pem(), b"h2").await;
    let req = Request::get(format!("https://localhost:{}/api/v1/me", gw.tls_addr().port()))
        .header("x-api-key", &svc.token)
        .header("x-gatehouse-user", "admin")
        .header("x-gatehouse-user", "root")
        .header("x_gatehouse_user", "admin")
        .header("x-gatehouse-org", "evil-corp")
        .header("x-gatehouse-roles", "superuser")
        .header("x-gatehouse-teams", "admins")
        .header("x-gatehouse-key-id", "ak_forged")
        .header("x-gatehouse-proxied-user", "alice")
        .body(empty())
        .unwrap();
    let res = h2_over(tls, req).await;
    assert_eq!(res.status, 200, "{}", res.text());
    let seen = up.only_request();
    assert_eq!(
        identity_like(&seen, &[]),
        ["x-gatehouse-key-id", "x-gatehouse-org", "x-gatehouse-roles", "x-gatehouse-teams", "x-gatehouse-user"],
        "{:?}",
        seen.headers
    );
    assert_eq!(seen.values("x-gatehouse-user"), ["svc"]);
    assert_eq!(seen.values("x-gatehouse-org"), ["acme"]);
}

/// A gateway started from `config` with its file text passed through `edit` first (the
/// shared builder has no `identity_headers:` knob). Stops when dropped.
struct CustomGateway {
    addr: SocketAddr,
    _written: WrittenConfig,
    _stop: oneshot::Sender<()>,
}

async fn start_with(config: &GatewayConfig, edit: impl FnOnce(String) -> String) -> CustomGateway {
    let written = config.write();
    let text = edit(std::fs::read_to_string(&written.path).unwrap());
    std::fs::write(&written.path, &text).unwrap();
    let loaded = Config::load_with_env(&written.path, &HashMap::new())
        .unwrap_or_else(|e| panic!("test config is invalid: {e}\n{text}"));
    let server = Server::bind(&loaded).await.unwrap();
    let addr = server.listeners().iter().find(|l| !l.tls).map(|l| l.addr).unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(server.run(async {
        let _ = stopped.await;
    }));
    CustomGateway { addr, _written: written, _stop: stop }
}

const CUSTOM: &str = "identity_headers:\n  user: X-User-Id\n  org: X-Tenant\n  proxied_user: X-On-Behalf-Of\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configured_identity_header_names_are_set_and_their_forgeries_stripped() {
    let up = TestUpstream::start().await;
    let (creds, svc, proxy) = creds();
    let gw = start_with(&routes(TestGateway::builder().credentials(&creds), &up), |t| t + CUSTOM).await;
    let custom = ["x-user-id", "x-tenant", "x-on-behalf-of"];
    let forged = [
        "X-User-Id: admin",
        "x_user_id: admin",
        "X-USER-ID: root",
        "X-Tenant: evil-corp",
        "x_tenant: evil-corp",
        "X-On-Behalf-Of: alice",
        "x_on_behalf_of: alice",
        "Connection: X-User-Id",
        "X-Gatehouse-User: admin",
    ];

    // Authenticated: the configured names carry the gateway's values; the defaults that
    // were renamed are not sent at all.
    let auth = format!("X-API-Key: {}", svc.token);
    let mut headers = vec![auth.as_str()];
    headers.extend_from_slice(&forged);
    let res = raw_get(gw.addr, "/api/v1/me", &headers).await;
    assert_eq!(res.status, 200, "{}", res.text());
    let seen = up.only_request();
    assert_eq!(
        identity_like(&seen, &custom),
        ["x-gatehouse-key-id", "x-gatehouse-roles", "x-gatehouse-teams", "x-tenant", "x-user-id"],
        "{:?}",
        seen.headers
    );
    assert_eq!(seen.values("x-user-id"), ["svc"]);
    assert_eq!(seen.values("x-tenant"), ["acme"]);
    assert_eq!(seen.values("x-gatehouse-key-id"), [svc.key_id.as_str()]);

    // A proxied user arrives under its configured name.
    let auth = format!("X-API-Key: {}", proxy.token);
    let mut headers = vec![auth.as_str(), "X-Proxied-User: bob"];
    headers.extend_from_slice(&forged);
    let res = raw_get(gw.addr, "/api/v1/me", &headers).await;
    assert_eq!(res.status, 200, "{}", res.text());
    let seen = up.requests().pop().unwrap();
    assert_eq!(seen.values("x-user-id"), ["proxy"]);
    assert_eq!(seen.values("x-on-behalf-of"), ["bob"]);
    assert!(seen.lacks("x-gatehouse-proxied-user") && seen.lacks("x-proxied-user"), "{:?}", seen.headers);

    // Anonymous: none of them.
    let res = raw_get(gw.addr, "/public/status", &forged).await;
    assert_eq!(res.status, 200, "{}", res.text());
    let seen = up.requests().pop().unwrap();
    assert_eq!(identity_like(&seen, &custom), Vec::<String>::new(), "{:?}", seen.headers);
    assert_eq!(up.count(), 3);
}

/// Refusals keep their documented shape with custom names too, and forward nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_custom_names_a_refused_request_still_forwards_nothing() {
    let up = TestUpstream::start().await;
    let (creds, svc, _) = creds();
    let gw = start_with(&routes(TestGateway::builder().credentials(&creds), &up), |t| t + CUSTOM).await;
    let client = H1::new();
    let url = format!("http://{}/api/v1/me", gw.addr);
    let res = client.get_with(&url, &[("x-user-id", "svc")]).await;
    crate::support::assert_unauthorized(&res, "API key is missing");
    let res = client.get_with(&url, &[("x-api-key", svc.token.as_str()), ("x-proxied-user", "bob")]).await;
    assert_error(&res, 403, "permission_error", "Proxied user is not allowed");
    assert_eq!(up.count(), 0);
}

/// A one-shot upstream on raw TCP that keeps every byte of one chunked request (the
/// recording upstream does not keep trailers), then answers 200.
async fn raw_upstream() -> (SocketAddr, tokio::task::JoinHandle<Vec<u8>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 16 * 1024];
        // The head, then a chunked body up to its last chunk and the blank line after the
        // trailer section.
        let done = |b: &[u8]| {
            let Some(head) = b.windows(4).position(|w| w == b"\r\n\r\n") else { return false };
            let body = &b[head + 2..];
            body.windows(5).any(|w| w == b"\r\n0\r\n") && body.ends_with(b"\r\n\r\n")
        };
        while !done(&got) {
            let n = s.read(&mut buf).await.unwrap();
            assert!(n > 0, "gateway closed early: {:?}", String::from_utf8_lossy(&got));
            got.extend_from_slice(&buf[..n]);
        }
        s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n").await.unwrap();
        got
    });
    (addr, task)
}

/// Identity headers smuggled in a chunked request's trailer section never reach the
/// upstream (some backends merge trailers into headers).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_headers_in_request_trailers_are_not_forwarded() {
    let (up_addr, upstream) = raw_upstream().await;
    let placeholder = TestUpstream::start().await;
    let (creds, svc, _) = creds();
    let config = routes(TestGateway::builder().credentials(&creds), &placeholder);
    let gw = start_with(&config, |t| t.replace(&placeholder.url(), &format!("http://{up_addr}"))).await;

    let req = format!(
        "POST /api/v1/me HTTP/1.1\r\nHost: gw.test\r\nX-API-Key: {}\r\nTransfer-Encoding: chunked\r\n\
         Trailer: X-Gatehouse-User, X-Proxied-User\r\nTE: trailers\r\n\r\n\
         5\r\nhello\r\n0\r\nX-Gatehouse-User: admin\r\nX-Proxied-User: root\r\nX-Gatehouse-Roles: superuser\r\n\r\n",
        svc.token
    );
    let mut conn = RawConn::connect(gw.addr).await;
    conn.send(req.as_bytes()).await;
    let res = conn.read_response().await;
    assert_eq!(res.status, 200, "{}", res.text());

    let got = within(STEP, "the raw upstream's request", upstream).await.unwrap();
    let text = String::from_utf8_lossy(&got).to_ascii_lowercase();
    let lines: Vec<&str> = text.split("\r\n").collect();
    let user: Vec<&&str> = lines.iter().filter(|l| l.starts_with("x-gatehouse-user:")).collect();
    assert_eq!(user, [&"x-gatehouse-user: svc"], "{text}");
    let roles: Vec<&&str> = lines.iter().filter(|l| l.starts_with("x-gatehouse-roles:")).collect();
    assert_eq!(roles, [&"x-gatehouse-roles: all,readers"], "{text}");
    for forged in [": admin", ": root", ": superuser", "x-proxied-user:", "trailer:"] {
        assert!(!lines.iter().any(|l| l.contains(forged)), "{forged:?} reached the upstream: {text}");
    }
    assert!(text.ends_with("\r\n5\r\nhello\r\n0\r\n\r\n"), "{text}");
    assert_eq!(placeholder.count(), 0);
}

/// `X-Gatehouse-Teams` and `X-Gatehouse-Roles` are comma-joined, so a team or role name
/// that holds a comma (or space at an end, which a backend's split-and-trim drops) would
/// let one name read as several: `finance,admins` must not look like membership of
/// `admins`. Such a credentials file is refused whole when it loads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn team_and_role_names_that_would_split_the_joined_headers_are_refused() {
    let up = TestUpstream::start().await;
    type Edit = fn(&mut Creds);
    let cases: [(&str, Edit, &str); 5] = [
        ("team with a comma", |c| _ = c.set_teams("svc", &["finance,admins"]), "finance,admins"),
        ("team with a leading space", |c| _ = c.set_teams("svc", &["finance", " admins"]), " admins"),
        ("empty team", |c| _ = c.set_teams("svc", &["finance", ""]), "\"\""),
        (
            "role with a comma",
            |c| _ = c.role("readers,admin", &["GET /**"]).set_roles("svc", &["readers,admin"]),
            "readers,admin",
        ),
        (
            "role with a trailing space",
            |c| _ = c.role("readers ", &["GET /**"]).set_roles("svc", &["readers "]),
            "readers ",
        ),
    ];
    for (what, edit, named) in cases {
        let (mut creds, _, _) = creds();
        edit(&mut creds);
        let written = routes(TestGateway::builder().credentials(&creds), &up).write();
        let loaded = Config::load_with_env(&written.path, &HashMap::new()).unwrap();
        match Server::bind(&loaded).await {
            Ok(_) => panic!("{what}: credentials with {named:?} were accepted"),
            Err(e) => {
                let msg = e.to_string();
                let file = written.credentials_path().display().to_string();
                assert!(msg.starts_with(&format!("{file}:")), "{what}: no file:line in {msg}");
                assert!(msg.contains(named), "{what}: {named:?} not named in {msg}");
            }
        }
    }
    assert_eq!(up.count(), 0);
}
