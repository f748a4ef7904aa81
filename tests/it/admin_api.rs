//! The admin listener (docs/admin.md): every endpoint of the README's
//! table against a running gateway with a real upstream, every bad input as the exact
//! documented error body, and the proxy request right after each change reflecting it. Also the
//! OpenAPI document: served, parseable, and naming every route the router handles.

use crate::support::client::H1;
use crate::support::creds::{ApiKey, Creds, HmacKey};
use crate::support::gateway::{AdminClient, RouteSpec, TestGateway};
use crate::support::process::GatewayProcess;
use crate::support::raw::RawConn;
use crate::support::upstream::TestUpstream;
use crate::support::{Reply, assert_error, assert_unauthorized};
use serde_json::{Value, json};
use std::collections::BTreeSet;
use std::path::Path;

const TOKEN: &str = "admin-test-token-0123456789abcdef";

/// A gateway with an admin listener, one api_key user `svc` (role `all`) and one hmac
/// user `signer`; `/api/` needs credentials, all to one recording upstream.
struct Fx {
    up: TestUpstream,
    gw: TestGateway,
    admin: AdminClient,
    proxy: H1,
    svc: ApiKey,
    signer: HmacKey,
    kept: Kept,
}

/// Where the fixture's API users are kept: the admin API must behave the same in both.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kept {
    File,
    Database,
}

async fn fixture() -> Fx {
    fixture_in(Kept::File).await
}

/// The fixture with its users in a credentials file, or imported into a fresh credential
/// database (`gatehouse db migrate` + `gatehouse credentials import`) before it starts.
async fn fixture_in(kept: Kept) -> Fx {
    let up = TestUpstream::start().await;
    let mut creds = Creds::new();
    let svc = creds.api_user("svc");
    let signer = creds.hmac_user("signer");
    let mut config = TestGateway::builder()
        .credentials(&creds)
        .admin(TOKEN)
        // The 401 tests send dozens of wrong tokens; the budget has a test of its own.
        .admin_setting("failed_per_ip_per_minute", "100000")
        .route(RouteSpec::new("api", "/api/").to(&up).authenticated());
    if kept == Kept::Database {
        let url = crate::support::postgres::fresh_database("admin").await;
        config = config.database(&url);
        let w = config.write();
        let path = w.path.display().to_string();
        for args in [
            vec!["db", "migrate", "--config", &path],
            vec!["credentials", "import", w.credentials_path().to_str().unwrap(), "--config", &path],
        ] {
            let out = crate::support::process::run_cli(&args).await;
            assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
    }
    let gw = config.start().await;
    let admin = gw.admin();
    // The database mode is the one in force (its families are in the metrics only then).
    let metrics = admin.get("/metrics").await.text();
    assert_eq!(metrics.contains("gatehouse_credential_store_up 1"), kept == Kept::Database, "{kept:?}");
    Fx { up, gw, admin, proxy: H1::new(), svc, signer, kept }
}

impl Fx {
    /// GET `/api/x` on the proxy with an api_key token.
    async fn with_token(&self, token: &str) -> Reply {
        self.proxy.get_with(&self.gw.url("/api/x"), &[("x-api-key", token)]).await
    }

    /// GET `path` on the proxy, signed with an hmac key.
    async fn signed(&self, key: &HmacKey, path: &str) -> Reply {
        self.proxy.get_with(&self.gw.url(path), &key.headers("GET", path, b"")).await
    }

    /// The stored credentials as YAML: the file, or the database's export.
    async fn credentials_text(&self) -> String {
        match self.kept {
            Kept::File => std::fs::read_to_string(self.gw.written().credentials_path()).unwrap(),
            Kept::Database => {
                let path = self.gw.written().path.display().to_string();
                let out = crate::support::process::run_cli(&["credentials", "export", "--config", &path]).await;
                assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
                String::from_utf8(out.stdout).unwrap()
            }
        }
    }

    fn audit_text(&self) -> String {
        std::fs::read_to_string(self.gw.written().audit_path()).unwrap_or_default()
    }
}

/// The admin routes, as `(method, path)`, read from the router's source (the match arms
/// of `src/admin/mod.rs` and `src/admin/api.rs`), so that a route added there without
/// being documented fails `the_openapi_document_names_every_route_the_router_handles`.
/// Path segments bound to a variable become `{variable}`.
///
/// The router matches three spellings, and this scanner knows exactly those:
/// `("GET", "/healthz")` (mod.rs), `(Method::GET, ["users", id])` (api.rs's match,
/// also `&["reload"][..]`), and `(&Method::GET, "/admin/v1/openapi.yaml")` (api.rs).
fn routes_from_router() -> BTreeSet<(String, String)> {
    let mut out = BTreeSet::new();
    let mod_rs = include_str!("../../src/server/admin/mod.rs");
    for (method, rest) in after_each(mod_rs, "(\"") {
        if let Some((path, _)) = rest.strip_prefix(", \"").and_then(|r| r.split_once("\")")) {
            out.insert((method.to_string(), path.to_string()));
        }
    }
    let api_rs = include_str!("../../src/server/admin/api.rs");
    for (method, rest) in after_each(api_rs, "Method::") {
        let rest = rest.trim_start_matches(", ").trim_start_matches('&');
        if let Some(list) = rest.strip_prefix('[').and_then(|r| r.split_once(']')).map(|(l, _)| l) {
            let segs: Vec<String> = list
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| match s.strip_prefix('"').and_then(|s| s.strip_suffix('"')) {
                    Some(lit) => lit.to_string(),
                    None => format!("{{{s}}}"),
                })
                .collect();
            out.insert((method.to_string(), format!("/admin/v1/{}", segs.join("/"))));
        } else if let Some((path, _)) = rest.strip_prefix('"').and_then(|r| r.split_once('"')) {
            out.insert((method.to_string(), path.to_string()));
        }
    }
    out
}

/// For each occurrence of `marker` followed by an upper-case HTTP method name, that
/// method and the text after it.
fn after_each<'a>(text: &'a str, marker: &str) -> Vec<(&'a str, &'a str)> {
    text.match_indices(marker)
        .filter_map(|(i, _)| {
            let rest = &text[i + marker.len()..];
            let end = rest.find(|c: char| !c.is_ascii_uppercase()).unwrap_or(rest.len());
            let method = &rest[..end];
            ["GET", "POST", "PUT", "PATCH", "DELETE"]
                .contains(&method)
                .then(|| (method, rest[end..].trim_start_matches('"')))
        })
        .collect()
}

/// A concrete path for a route template (`{id}` → `svc`, `{key_id}` → `ak_missing`).
fn concrete(path: &str) -> String {
    path.replace("{id}", "svc").replace("{key_id}", "ak_missing")
}

#[test]
fn the_router_scanner_finds_every_route_it_should() {
    // If this fails, the router's spelling changed: teach `routes_from_router` the new
    // one rather than loosening this list.
    let found = routes_from_router();
    let at_least: &[(&str, &str)] = &[
        ("GET", "/healthz"),
        ("GET", "/readyz"),
        ("GET", "/admin/v1/openapi.yaml"),
        ("POST", "/admin/v1/reload"),
        ("GET", "/admin/v1/users"),
        ("POST", "/admin/v1/users"),
        ("GET", "/admin/v1/users/{id}"),
        ("PATCH", "/admin/v1/users/{id}"),
        ("DELETE", "/admin/v1/users/{id}"),
        ("GET", "/admin/v1/users/{id}/usage"),
        ("POST", "/admin/v1/users/{id}/keys"),
        ("DELETE", "/admin/v1/users/{id}/keys/{key_id}"),
        ("GET", "/admin/v1/roles"),
        ("PUT", "/admin/v1/roles"),
        ("GET", "/admin/v1/audit"),
        ("GET", "/admin/v1/admin-tokens"),
        ("POST", "/admin/v1/admin-tokens"),
        ("DELETE", "/admin/v1/admin-tokens/{id}"),
    ];
    for (m, p) in at_least {
        assert!(found.contains(&(m.to_string(), p.to_string())), "{m} {p} not found in the router; found {found:#?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openapi_document_names_every_route_the_router_handles() {
    let fx = fixture().await;
    let res = fx.admin.get("/admin/v1/openapi.yaml").await;
    assert_eq!(res.status, 200, "{}", res.text());
    assert_eq!(res.header("content-type"), "application/yaml");
    let on_disk = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/admin-api.yaml")).unwrap();
    assert_eq!(res.text(), on_disk, "the served document is docs/admin-api.yaml");

    let doc: Value = serde_saphyr::from_str(&res.text()).unwrap();
    assert_eq!(doc["openapi"], "3.1.0");
    assert_eq!(doc["components"]["securitySchemes"]["adminToken"]["scheme"], "bearer");
    let error = &doc["components"]["schemas"]["Error"];
    assert_eq!(error["required"], json!(["success", "message", "code", "request_id"]));

    let routes = routes_from_router();
    for (method, path) in &routes {
        let op = &doc["paths"][path.as_str()][method.to_lowercase()];
        assert!(op.is_object(), "{method} {path} is handled by the router but not in docs/admin-api.yaml");
        assert!(op["responses"].is_object(), "{method} {path} has no responses");
        if path.starts_with("/admin/v1") {
            assert!(
                op["responses"]["401"].is_object(),
                "{method} {path}: the 401 of a missing or wrong admin token is not documented"
            );
        }
        // Every documented route is really served: not the router's own 404.
        let url = concrete(path);
        let body = if *method == "POST" || *method == "PUT" || *method == "PATCH" { Some(json!({})) } else { None };
        let r = fx.admin.call(method, &url, body.as_ref()).await;
        assert!(
            !r.text().contains("No such admin endpoint"),
            "{method} {url}: the router does not serve a route the scanner found: {}",
            r.text()
        );
    }
    // The other way round: every documented /admin/v1 operation is one the router has.
    let methods = ["get", "post", "put", "patch", "delete"];
    for (path, item) in doc["paths"].as_object().unwrap() {
        for m in methods.iter().filter(|m| item.get(**m).is_some()) {
            let want = (m.to_uppercase(), path.clone());
            // /metrics belongs to the metrics issue's part of the admin listener.
            if path != "/metrics" {
                assert!(routes.contains(&want), "docs/admin-api.yaml documents {want:?}, which the router lacks");
            }
        }
    }

    // The document is under /admin/v1 like the rest: the token is needed.
    let anon = fx.admin.with_token(None).get("/admin/v1/openapi.yaml").await;
    assert_error(&anon, 401, "authentication_error", "Invalid admin token");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_and_readyz_answer_without_a_token() {
    let fx = fixture().await;
    let anon = fx.admin.with_token(None);
    let h = anon.get("/healthz").await;
    assert_eq!(h.status, 200);
    assert_eq!(h.header("content-type"), "application/json");
    assert_eq!(h.json(), json!({"status": "ok"}));
    let r = anon.get("/readyz").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json(), json!({"status": "ready", "users": 2, "keys": 2}));
    assert_error(&anon.get("/nope").await, 404, "not_found", "No such admin endpoint");
    assert_eq!(fx.up.count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_v1_without_the_right_token_is_401_and_changes_nothing() {
    for kept in [Kept::File, Kept::Database] {
        admin_v1_without_the_right_token_is_401_and_changes_nothing_in(kept).await;
    }
}

async fn admin_v1_without_the_right_token_is_401_and_changes_nothing_in(kept: Kept) {
    let fx = fixture_in(kept).await;
    let before = fx.credentials_text().await;
    let wrong_tokens: Vec<(&str, Vec<(&str, String)>)> = vec![
        ("no Authorization", vec![]),
        ("wrong token", vec![("authorization", "Bearer not-the-token".into())]),
        ("token with one character more", vec![("authorization", format!("Bearer {TOKEN}x"))]),
        ("token without the Bearer scheme", vec![("authorization", TOKEN.into())]),
        ("Basic scheme", vec![("authorization", format!("Basic {TOKEN}"))]),
        ("token in X-API-Key", vec![("x-api-key", TOKEN.into())]),
        ("empty bearer", vec![("authorization", "Bearer ".into())]),
    ];
    let anon = fx.admin.with_token(None);
    let mut routes: Vec<(String, String)> = routes_from_router().into_iter().collect();
    routes.push(("GET".into(), "/admin/v1".into()));
    routes.push(("GET".into(), "/admin/v1/no-such-endpoint".into()));
    for (method, path) in routes.iter().filter(|(_, p)| p.starts_with("/admin/v1")) {
        let url = concrete(path);
        for (what, headers) in &wrong_tokens {
            let h: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
            let body = json!({"id": "intruder", "auth_method": "api_key"}).to_string();
            let res = anon.raw(method, &url, &h, body).await;
            assert_eq!(res.status, 401, "{what}: {method} {url}: {}", res.text());
            assert_error(&res, 401, "authentication_error", "Invalid admin token");
            assert_eq!(res.header("www-authenticate"), "Bearer realm=\"gatehouse-admin\"");
        }
    }
    assert_eq!(fx.credentials_text().await, before, "a refused call changed the credentials file");
    assert_eq!(fx.with_token(&fx.svc.token).await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_admin_token_admin_v1_is_404_and_a_warning_is_logged() {
    let up = TestUpstream::start().await;
    let mut creds = Creds::new();
    creds.api_user("svc");
    let config = TestGateway::builder()
        .credentials(&creds)
        .admin_without_token()
        .route(RouteSpec::new("api", "/api/").to(&up).authenticated());
    let gw = GatewayProcess::serve(&config).await;
    gw.logged("admin API disabled: no admin token configured", 1).await;
    for token in [None, Some(TOKEN), Some("")] {
        let admin = AdminClient::new(gw.admin_addr(), token);
        for path in ["/admin/v1/users", "/admin/v1", "/admin/v1/openapi.yaml"] {
            let res = admin.get(path).await;
            assert_error(&res, 404, "not_found", "Admin API is disabled: no admin token configured");
        }
        let res = admin.post("/admin/v1/users", &json!({"id": "x", "auth_method": "api_key"})).await;
        assert_error(&res, 404, "not_found", "Admin API is disabled: no admin token configured");
        assert_eq!(admin.get("/healthz").await.status, 200);
    }
    assert!(!std::fs::read_to_string(gw.credentials_path()).unwrap().contains("id: x\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_paths_on_a_proxy_listener_are_never_served_by_the_admin_api() {
    let up = TestUpstream::start().await;
    let mut creds = Creds::new();
    creds.api_user("svc");
    // No route for /admin or /healthz: the proxy's own 404, never the admin API.
    let gw = TestGateway::builder()
        .credentials(&creds)
        .admin(TOKEN)
        .route(RouteSpec::new("api", "/api/").to(&up).authenticated())
        .start()
        .await;
    let proxy = H1::new();
    let bearer = format!("Bearer {TOKEN}");
    for path in ["/admin/v1/users", "/admin/v1/openapi.yaml", "/healthz", "/readyz", "/admin/v1/reload"] {
        let res = proxy.get_with(&gw.url(path), &[("authorization", bearer.as_str())]).await;
        assert_error(&res, 404, "not_found", "No route matches this request");
        let res = proxy.request("POST", &gw.url(path), &[("authorization", bearer.as_str())], "{}").await;
        assert_error(&res, 404, "not_found", "No route matches this request");
    }
    assert_eq!(up.count(), 0);

    // A catch-all anonymous route: /admin/v1/… is the backend's path like any other.
    let up2 = TestUpstream::start().await;
    let gw2 = TestGateway::builder()
        .credentials(&creds)
        .admin(TOKEN)
        .route(RouteSpec::new("all", "/").to(&up2))
        .start()
        .await;
    let res = proxy.get(&gw2.url("/admin/v1/users")).await;
    assert_eq!(res.status, 200, "{}", res.text());
    assert_eq!(up2.only_request().target, "/admin/v1/users", "forwarded to the upstream, not answered by the gateway");
    assert!(!res.text().contains("\"auth_method\""), "the proxy answered with the user list: {}", res.text());
    // The admin token is no API key: a credential on an anonymous route is still verified.
    let res = proxy.get_with(&gw2.url("/admin/v1/users"), &[("authorization", bearer.as_str())]).await;
    assert_unauthorized(&res, "Invalid API key");
    assert_eq!(up2.count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_create_get_list_patch_and_delete_each_in_force_on_the_next_request() {
    for kept in [Kept::File, Kept::Database] {
        users_create_get_list_patch_and_delete_each_in_force_on_the_next_request_in(kept).await;
    }
}

async fn users_create_get_list_patch_and_delete_each_in_force_on_the_next_request_in(kept: Kept) {
    let fx = fixture_in(kept).await;
    let a = &fx.admin;

    // Create with every field.
    let body = json!({
        "id": "erp-sync", "auth_method": "api_key", "display_name": "ERP sync",
        "description": "nightly order sync", "organization": "globex", "teams": ["finance", "ops"],
        "default_team": "finance", "roles": ["all"], "allowed_endpoints": ["GET /api/**"],
        "allow_proxied_users": true, "allowed_proxied_users": ["svc"],
        "rate_limit": {"per_second": 20, "burst": 40}
    });
    let created = a.expect(201, "POST", "/admin/v1/users", Some(&body)).await;
    for field in [
        "id",
        "auth_method",
        "display_name",
        "description",
        "organization",
        "teams",
        "default_team",
        "roles",
        "allowed_endpoints",
        "allow_proxied_users",
        "allowed_proxied_users",
        "rate_limit",
    ] {
        assert_eq!(created[field], body[field], "{field}");
    }
    assert_eq!(created["status"], "active");
    assert_eq!(created["keys"], json!([]));
    assert_eq!(created["created_at"], created["updated_at"]);
    assert!(fx.credentials_text().await.contains("erp-sync"), "not persisted");

    // Get: the same view, with (empty) usage.
    let got = a.expect(200, "GET", "/admin/v1/users/erp-sync", None).await;
    assert_eq!(got, created);

    // It authenticates once it has a key; the upstream sees the fields just set.
    let key = a.expect(201, "POST", "/admin/v1/users/erp-sync/keys", Some(&json!({"label": "main"}))).await;
    let token = key["token"].as_str().unwrap().to_string();
    assert_eq!(fx.with_token(&token).await.status, 200);
    let seen = fx.up.requests().pop().unwrap();
    assert_eq!(seen.header("x-gatehouse-user"), "erp-sync");
    assert_eq!(seen.header("x-gatehouse-org"), "globex");
    assert_eq!(seen.header("x-gatehouse-teams"), "finance,ops");

    // List and its filters.
    let ids = |v: &Value| -> Vec<String> {
        v.as_array().unwrap().iter().map(|u| u["id"].as_str().unwrap().to_string()).collect()
    };
    let all = a.expect(200, "GET", "/admin/v1/users", None).await;
    assert_eq!(ids(&all), ["svc", "signer", "erp-sync"]);
    assert!(all.to_string().find(&token).is_none(), "a listing holds a token");
    let filtered = [
        ("?organization=globex", vec!["erp-sync"]),
        ("?organization=acme", vec!["svc", "signer"]),
        ("?role=all", vec!["svc", "signer", "erp-sync"]),
        ("?role=nobody-has-this", vec![]),
        ("?status=active", vec!["svc", "signer", "erp-sync"]),
        ("?status=inactive", vec![]),
        ("?status=active&organization=globex&role=all", vec!["erp-sync"]),
    ];
    for (q, want) in filtered {
        let v = a.expect(200, "GET", &format!("/admin/v1/users{q}"), None).await;
        assert_eq!(ids(&v), want, "{q}");
    }

    // PATCH changes only the fields given; the next request carries them.
    let patched = a
        .expect(
            200,
            "PATCH",
            "/admin/v1/users/erp-sync",
            Some(&json!({"organization": "initech", "teams": ["finance", "a"]})),
        )
        .await;
    assert_eq!(patched["organization"], "initech");
    assert_eq!(patched["teams"], json!(["finance", "a"]));
    assert_eq!(patched["display_name"], "ERP sync", "an absent field changed");
    assert_eq!(patched["default_team"], "finance");
    assert_eq!(fx.with_token(&token).await.status, 200);
    let seen = fx.up.requests().pop().unwrap();
    assert_eq!(
        (seen.header("x-gatehouse-org"), seen.header("x-gatehouse-teams")),
        ("initech".into(), "finance,a".into())
    );
    // A change that would not load (default_team outside teams) is 422 and changes nothing.
    let res = a.patch("/admin/v1/users/erp-sync", &json!({"teams": ["ops"]})).await;
    assert_error(&res, 422, "validation_error", "user \"erp-sync\": default_team \"finance\" is not one of its teams");

    // `null` clears default_team and rate_limit; absent leaves them.
    let cleared = a
        .expect(200, "PATCH", "/admin/v1/users/erp-sync", Some(&json!({"default_team": null, "rate_limit": null})))
        .await;
    assert_eq!(cleared["default_team"], Value::Null);
    assert_eq!(cleared["rate_limit"], Value::Null);
    assert_eq!(cleared["organization"], "initech");
    let again = a.expect(200, "GET", "/admin/v1/users/erp-sync", None).await;
    assert_eq!(again["default_team"], Value::Null);
    assert_eq!(again["rate_limit"], Value::Null);

    // allowed_endpoints narrows the role at once: POST is now outside it.
    let res = fx.proxy.request("POST", &fx.gw.url("/api/x"), &[("x-api-key", token.as_str())], "").await;
    assert_error(&res, 403, "permission_error", "API key does not have permission to access this resource");
    a.expect(200, "PATCH", "/admin/v1/users/erp-sync", Some(&json!({"allowed_endpoints": []}))).await;
    let res = fx.proxy.request("POST", &fx.gw.url("/api/x"), &[("x-api-key", token.as_str())], "").await;
    assert_eq!(res.status, 200, "{}", res.text());

    // Status: inactive refuses the key on the next request, active restores it.
    let v = a.expect(200, "PATCH", "/admin/v1/users/erp-sync", Some(&json!({"status": "inactive"}))).await;
    assert_eq!(v["status"], "inactive");
    assert_unauthorized(&fx.with_token(&token).await, "Invalid API key");
    let v = a.expect(200, "GET", "/admin/v1/users?status=inactive", None).await;
    assert_eq!(ids(&v), ["erp-sync"]);
    a.expect(200, "PATCH", "/admin/v1/users/erp-sync", Some(&json!({"status": "active"}))).await;
    assert_eq!(fx.with_token(&token).await.status, 200);

    // Retired is terminal: refused at once, and enabling it again is 409.
    a.expect(200, "PATCH", "/admin/v1/users/erp-sync", Some(&json!({"status": "retired"}))).await;
    assert_unauthorized(&fx.with_token(&token).await, "Invalid API key");
    let before = fx.credentials_text().await;
    for status in ["active", "inactive"] {
        let res = a.patch("/admin/v1/users/erp-sync", &json!({"status": status})).await;
        assert_error(&res, 409, "conflict", "user \"erp-sync\" is retired; a retired user cannot be re-activated");
    }
    // A refused PATCH changes none of its other fields either.
    let res = a.patch("/admin/v1/users/erp-sync", &json!({"status": "active", "display_name": "sneaky"})).await;
    assert_eq!(res.status, 409);
    assert_eq!(fx.credentials_text().await, before, "a refused change was written");
    assert_unauthorized(&fx.with_token(&token).await, "Invalid API key");
    // …and it gets no new keys.
    let res = a.post("/admin/v1/users/erp-sync/keys", &json!({})).await;
    assert_error(&res, 409, "conflict", "user \"erp-sync\" is retired; its keys are never accepted again");

    // Delete: gone from the file, the listing and the proxy.
    let v = a.expect(200, "DELETE", "/admin/v1/users/erp-sync", None).await;
    assert_eq!(v, json!({"deleted": "erp-sync"}));
    assert!(!fx.credentials_text().await.contains("erp-sync"));
    assert_error(&a.get("/admin/v1/users/erp-sync").await, 404, "not_found", "no user \"erp-sync\"");
    assert_eq!(ids(&a.expect(200, "GET", "/admin/v1/users", None).await), ["svc", "signer"]);
    assert_error(&a.delete("/admin/v1/users/erp-sync").await, 404, "not_found", "no user \"erp-sync\"");

    // Deleting a user whose key is in use: the next request is 401.
    assert_eq!(fx.with_token(&fx.svc.token).await.status, 200);
    a.expect(200, "DELETE", "/admin/v1/users/svc", None).await;
    assert_unauthorized(&fx.with_token(&fx.svc.token).await, "Invalid API key");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_add_returns_the_secret_once_and_revoke_is_in_force_on_the_next_request() {
    for kept in [Kept::File, Kept::Database] {
        keys_add_returns_the_secret_once_and_revoke_is_in_force_on_the_next_request_in(kept).await;
    }
}

async fn keys_add_returns_the_secret_once_and_revoke_is_in_force_on_the_next_request_in(kept: Kept) {
    let fx = fixture_in(kept).await;
    let a = &fx.admin;

    // api_key user: {"key": {…}, "token": "ghk_…"} and nothing else.
    let expires = "2099-01-02T03:04:05Z";
    let added = a
        .expect(201, "POST", "/admin/v1/users/svc/keys", Some(&json!({"label": "second", "expires_at": expires})))
        .await;
    let obj = added.as_object().unwrap();
    assert_eq!(obj.keys().collect::<Vec<_>>(), ["key", "token"]);
    let token = added["token"].as_str().unwrap().to_string();
    let key_id = added["key"]["id"].as_str().unwrap().to_string();
    assert!(token.starts_with("ghk_"), "{token}");
    assert_eq!(added["key"]["label"], "second");
    assert_eq!(added["key"]["expires_at"], expires);
    assert_eq!(added["key"]["revoked_at"], Value::Null);
    let hint = added["key"]["hint"].as_str().unwrap();
    assert!(hint.starts_with("ghk_") && hint.ends_with(&token[token.len() - 4..]), "{hint}");

    // The very next request with it works, as that key.
    let res = fx.with_token(&token).await;
    assert_eq!(res.status, 200, "{}", res.text());
    assert_eq!(fx.up.requests().pop().unwrap().header("x-gatehouse-key-id"), key_id);
    // The old key still works too (overlap).
    assert_eq!(fx.with_token(&fx.svc.token).await.status, 200);

    // The token is nowhere else: not in the user view, the listing, the file, the audit log.
    let view = a.expect(200, "GET", "/admin/v1/users/svc", None).await;
    let keys = view["keys"].as_array().unwrap();
    assert_eq!(keys.len(), 2);
    assert!(keys.iter().any(|k| k["id"] == key_id.as_str() && k["label"] == "second"));
    for text in [view.to_string(), a.get("/admin/v1/users").await.text(), fx.credentials_text().await] {
        assert!(!text.contains(&token), "the token leaked: {text}");
    }
    crate::support::eventually(crate::support::STEP, "the key.add audit record", || {
        fx.audit_text().contains("\"key.add\"")
    })
    .await;
    assert!(!fx.audit_text().contains(&token), "the token is in the audit log");

    // hmac user: {"key": {…}, "secret": "…"}; a request signed with it works at once.
    let added = a.expect(201, "POST", "/admin/v1/users/signer/keys", Some(&json!({"label": "rotated"}))).await;
    let obj = added.as_object().unwrap();
    assert_eq!(obj.keys().collect::<Vec<_>>(), ["key", "secret"]);
    let hkey = HmacKey {
        key_id: added["key"]["id"].as_str().unwrap().to_string(),
        secret: added["secret"].as_str().unwrap().to_string(),
    };
    let res = fx.signed(&hkey, "/api/signed").await;
    assert_eq!(res.status, 200, "{}", res.text());
    assert_eq!(fx.up.requests().pop().unwrap().header("x-gatehouse-key-id"), hkey.key_id);
    assert_eq!(fx.signed(&fx.signer, "/api/old").await.status, 200);
    let view = a.expect(200, "GET", "/admin/v1/users/signer", None).await;
    for text in [view.to_string(), fx.credentials_text().await] {
        assert!(!text.contains(&hkey.secret), "the secret leaked: {text}");
    }

    // An empty body is fine (label "").
    let v = a.expect(201, "POST", "/admin/v1/users/svc/keys", None).await;
    assert_eq!(v["key"]["label"], "");

    // Revoke: 200, and the next request with that key is 401; the others still work.
    let v = a.expect(200, "DELETE", &format!("/admin/v1/users/svc/keys/{key_id}"), None).await;
    assert_eq!(v, json!({"revoked": key_id}));
    assert_unauthorized(&fx.with_token(&token).await, "Invalid API key");
    assert_eq!(fx.with_token(&fx.svc.token).await.status, 200);
    let view = a.expect(200, "GET", "/admin/v1/users/svc", None).await;
    let k = view["keys"].as_array().unwrap().iter().find(|k| k["id"] == key_id.as_str()).unwrap().clone();
    assert!(k["revoked_at"].is_string(), "{k}");

    // hmac revoke: the next signed request is 401.
    a.expect(200, "DELETE", &format!("/admin/v1/users/signer/keys/{}", hkey.key_id), None).await;
    assert_unauthorized(&fx.signed(&hkey, "/api/after").await, "Invalid API key");

    // Revoking again is a conflict; missing key or user is 404; nothing changes.
    let before = fx.credentials_text().await;
    let res = a.delete(&format!("/admin/v1/users/svc/keys/{key_id}")).await;
    assert_error(&res, 409, "conflict", &format!("key \"{key_id}\" is already revoked"));
    let res = a.delete("/admin/v1/users/svc/keys/ak_nope").await;
    assert_error(&res, 404, "not_found", "user \"svc\" has no key \"ak_nope\"");
    let res = a.delete(&format!("/admin/v1/users/ghost/keys/{key_id}")).await;
    assert_error(&res, 404, "not_found", "no user \"ghost\"");
    // A key id of another user is not this user's key.
    let res = a.delete(&format!("/admin/v1/users/signer/keys/{}", fx.svc.key_id)).await;
    assert_error(&res, 404, "not_found", &format!("user \"signer\" has no key \"{}\"", fx.svc.key_id));
    let res = a.post("/admin/v1/users/ghost/keys", &json!({"label": "x"})).await;
    assert_error(&res, 404, "not_found", "no user \"ghost\"");
    assert_eq!(fx.credentials_text().await, before);
    assert_eq!(fx.with_token(&fx.svc.token).await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_get_and_put_replace_the_set_and_a_role_in_use_is_kept() {
    for kept in [Kept::File, Kept::Database] {
        roles_get_and_put_replace_the_set_and_a_role_in_use_is_kept_in(kept).await;
    }
}

async fn roles_get_and_put_replace_the_set_and_a_role_in_use_is_kept_in(kept: Kept) {
    let fx = fixture_in(kept).await;
    let a = &fx.admin;
    let roles = a.expect(200, "GET", "/admin/v1/roles", None).await;
    assert_eq!(roles, json!({"all": {"description": "everything", "rules": ["* /**"]}}));

    // Add a narrow role and give it to a new user: only its rules are permitted.
    let set = json!({
        "all": {"description": "everything", "rules": ["* /**"]},
        "reader": {"description": "read orders", "rules": ["GET /api/orders/**", "GET,HEAD /api/status"]},
    });
    let v = a.expect(200, "PUT", "/admin/v1/roles", Some(&set)).await;
    assert_eq!(v, set);
    assert_eq!(a.expect(200, "GET", "/admin/v1/roles", None).await, set);
    a.expect(201, "POST", "/admin/v1/users", Some(&json!({"id": "ro", "auth_method": "api_key", "roles": ["reader"]})))
        .await;
    let token = a.expect(201, "POST", "/admin/v1/users/ro/keys", None).await["token"].as_str().unwrap().to_string();
    let get = |path: &'static str| {
        let (proxy, url, token) = (&fx.proxy, fx.gw.url(path), token.clone());
        async move { proxy.get_with(&url, &[("x-api-key", token.as_str())]).await }
    };
    assert_eq!(get("/api/orders/1").await.status, 200);
    assert_error(
        &get("/api/x").await,
        403,
        "permission_error",
        "API key does not have permission to access this resource",
    );

    // Replacing the role's rules is in force on the next request.
    let set2 = json!({
        "all": {"description": "everything", "rules": ["* /**"]},
        "reader": {"rules": ["GET /api/x"]},
    });
    let v = a.expect(200, "PUT", "/admin/v1/roles", Some(&set2)).await;
    assert_eq!(v["reader"], json!({"description": "", "rules": ["GET /api/x"]}));
    assert_eq!(get("/api/x").await.status, 200);
    assert_eq!(get("/api/orders/1").await.status, 403);

    // Dropping a role in use: 409 naming the holder, nothing changed.
    let before = fx.credentials_text().await;
    let res = a.put("/admin/v1/roles", &json!({"reader": {"rules": ["GET /api/x"]}})).await;
    assert_error(&res, 409, "conflict", "role \"all\" is still held by: svc, signer");
    assert_eq!(fx.credentials_text().await, before);
    assert_eq!(a.expect(200, "GET", "/admin/v1/roles", None).await, v);
    assert_eq!(fx.with_token(&fx.svc.token).await.status, 200);

    // A malformed rule: 422 naming it, nothing changed.
    let res = a.put("/admin/v1/roles", &json!({"all": {"rules": ["* /**"]}, "reader": {"rules": ["FETCH"]}})).await;
    assert_eq!(res.status, 422, "{}", res.text());
    assert_eq!(res.json()["code"], "validation_error");
    assert!(res.json()["message"].as_str().unwrap().contains("FETCH"), "{}", res.text());
    assert_eq!(fx.credentials_text().await, before);

    // A role without `rules`: 422 naming the field.
    let res = a.put("/admin/v1/roles", &json!({"all": {"description": "x"}, "reader": {"rules": []}})).await;
    assert_eq!(res.status, 422, "{}", res.text());
    assert!(res.json()["message"].as_str().unwrap().contains("rules"), "{}", res.text());

    // Once nobody holds it, a role can be dropped.
    a.expect(200, "DELETE", "/admin/v1/users/ro", None).await;
    let v = a.expect(200, "PUT", "/admin/v1/roles", Some(&json!({"all": {"rules": ["* /**"]}}))).await;
    assert_eq!(v, json!({"all": {"description": "", "rules": ["* /**"]}}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_loads_a_hand_edited_file_now_and_a_broken_one_changes_nothing() {
    let up = TestUpstream::start().await;
    let mut creds = Creds::new();
    let old = creds.api_user("svc");
    let gw = TestGateway::builder()
        .credentials(&creds)
        .admin(TOKEN)
        .route(RouteSpec::new("api", "/api/").to(&up).authenticated())
        .start()
        .await;
    let a = gw.admin();
    let proxy = H1::new();
    let get = |key: &ApiKey| {
        let (url, token) = (gw.url("/api/x"), key.token.clone());
        let proxy = &proxy;
        async move { proxy.get_with(&url, &[("x-api-key", token.as_str())]).await.status.as_u16() }
    };

    let new = creds.api_user("newcomer");
    gw.write_credentials(&creds);
    let v = a.expect(200, "POST", "/admin/v1/reload", None).await;
    assert_eq!(v, json!({"reloaded": true, "users": 2, "keys": 2}));
    assert_eq!(get(&new).await, 200, "not in force right after the reload answered");

    // A broken file: 400 with the reason, and the last good snapshot keeps serving.
    std::fs::write(gw.written().credentials_path(), "users: [ {id: \n").unwrap();
    let res = a.call("POST", "/admin/v1/reload", None).await;
    assert_eq!(res.status, 400, "{}", res.text());
    assert_eq!(res.json()["code"], "invalid_request");
    assert!(res.json()["message"].as_str().unwrap().contains("credentials.yaml"), "{}", res.text());
    assert_eq!(get(&new).await, 200);
    assert_eq!(get(&old).await, 200);
    let r = a.expect(200, "GET", "/readyz", None).await;
    assert_eq!(r, json!({"status": "ready", "users": 2, "keys": 2}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_counts_requests_errors_and_last_used_at_per_key() {
    for kept in [Kept::File, Kept::Database] {
        usage_counts_requests_errors_and_last_used_at_per_key_in(kept).await;
    }
}

async fn usage_counts_requests_errors_and_last_used_at_per_key_in(kept: Kept) {
    let fx = fixture_in(kept).await;
    let a = &fx.admin;
    let idle = a.expect(200, "GET", "/admin/v1/users/svc/usage", None).await;
    assert_eq!(
        idle,
        json!({"user": "svc", "requests": 0, "errors": 0, "rate_limited": 0, "last_used_at": null,
               "requests_24h": 0, "per_day": [],
               "keys": {fx.svc.key_id.clone(): {"requests": 0, "errors": 0, "rate_limited": 0, "last_used_at": null, "requests_24h": 0}}})
    );

    // Narrow svc so that a request can be authenticated yet refused (an error).
    a.expect(200, "PATCH", "/admin/v1/users/svc", Some(&json!({"allowed_endpoints": ["GET /api/x"]}))).await;
    let second = a.expect(201, "POST", "/admin/v1/users/svc/keys", None).await;
    let t2 = second["token"].as_str().unwrap().to_string();
    let k2 = second["key"]["id"].as_str().unwrap().to_string();
    let start = time::OffsetDateTime::now_utc().unix_timestamp();
    for _ in 0..3 {
        assert_eq!(fx.with_token(&fx.svc.token).await.status, 200);
    }
    let res = fx.proxy.request("DELETE", &fx.gw.url("/api/x"), &[("x-api-key", fx.svc.token.as_str())], "").await;
    assert_eq!(res.status, 403);
    assert_eq!(fx.with_token(&t2).await.status, 200);
    // A failed authentication is nobody's usage.
    assert_eq!(fx.with_token("ghk_not-a-key").await.status, 401);
    let end = time::OffsetDateTime::now_utc().unix_timestamp();

    let u = a.expect(200, "GET", "/admin/v1/users/svc/usage", None).await;
    assert_eq!((u["user"].clone(), u["requests"].clone(), u["errors"].clone()), (json!("svc"), json!(5), json!(1)));
    let k1 = &u["keys"][fx.svc.key_id.as_str()];
    assert_eq!(
        (k1["requests"].clone(), k1["errors"].clone(), k1["rate_limited"].clone()),
        (json!(4), json!(1), json!(0))
    );
    assert_eq!(u["keys"][k2.as_str()]["requests"], 1);
    // The same requests, in the last 24 hours and in today's count.
    assert_eq!((k1["requests_24h"].clone(), u["requests_24h"].clone()), (json!(4), json!(5)), "{u}");
    let today = time::OffsetDateTime::now_utc().date().to_string();
    assert_eq!(u["per_day"], json!([{"date": today, "requests": 5}]), "{u}");
    let parse = |v: &Value| {
        time::OffsetDateTime::parse(v.as_str().unwrap(), &time::format_description::well_known::Rfc3339)
            .unwrap()
            .unix_timestamp()
    };
    for t in [&u["last_used_at"], &k1["last_used_at"], &u["keys"][k2.as_str()]["last_used_at"]] {
        let t = parse(t);
        assert!(start <= t && t <= end, "last_used_at {t} not within [{start}, {end}]");
    }
    // The user view carries the same per-key usage.
    let view = a.expect(200, "GET", "/admin/v1/users/svc", None).await;
    let k = view["keys"].as_array().unwrap().iter().find(|k| k["id"] == fx.svc.key_id.as_str()).unwrap().clone();
    assert_eq!((k["requests"].clone(), k["errors"].clone()), (json!(4), json!(1)));
    assert_eq!(k["last_used_at"], k1["last_used_at"]);

    assert_error(&a.get("/admin/v1/users/ghost/usage").await, 404, "not_found", "no user \"ghost\"");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_returns_admin_changes_without_secrets_and_filters_by_user() {
    for kept in [Kept::File, Kept::Database] {
        audit_returns_admin_changes_without_secrets_and_filters_by_user_in(kept).await;
    }
}

async fn audit_returns_admin_changes_without_secrets_and_filters_by_user_in(kept: Kept) {
    let fx = fixture_in(kept).await;
    let a = &fx.admin;
    a.expect(201, "POST", "/admin/v1/users", Some(&json!({"id": "aud", "auth_method": "api_key", "roles": ["all"]})))
        .await;
    let added = a.expect(201, "POST", "/admin/v1/users/aud/keys", Some(&json!({"label": "L"}))).await;
    let token = added["token"].as_str().unwrap().to_string();
    assert_eq!(fx.with_token(&token).await.status, 200);
    a.expect(200, "PATCH", "/admin/v1/users/aud", Some(&json!({"display_name": "Audited", "status": "inactive"})))
        .await;

    // The writer is asynchronous: poll until the last change is there.
    let records = {
        let deadline = std::time::Instant::now() + crate::support::STEP;
        loop {
            let v = a.expect(200, "GET", "/admin/v1/audit?user=aud", None).await;
            if v.as_array().unwrap().iter().any(|r| r["action"] == "user.update") {
                break v;
            }
            assert!(std::time::Instant::now() < deadline, "no user.update record: {v}");
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    };
    let recs = records.as_array().unwrap();
    let admin: Vec<&Value> = recs.iter().filter(|r| r["kind"] == "admin").collect();
    let actions: Vec<&str> = admin.iter().map(|r| r["action"].as_str().unwrap()).collect();
    assert_eq!(actions, ["user.create", "key.add", "user.update"], "{records:#}");
    // The caller: its address and which token (a fingerprint, never the token).
    let fingerprint = format!("sha256:{}", hex::encode(&<sha2::Sha256 as sha2::Digest>::digest(TOKEN.as_bytes())[..4]));
    for r in &admin {
        assert_eq!(r["actor"], "admin-api");
        assert_eq!((r["client"].as_str(), r["token"].as_str()), (Some("127.0.0.1"), Some(fingerprint.as_str())), "{r}");
        assert_eq!(r["target"], "aud");
        assert!(r["time"].is_string());
    }
    assert_eq!(admin[0]["changes"]["auth_method"], "api_key");
    assert_eq!(admin[0]["changes"]["roles"], json!(["all"]));
    assert_eq!(admin[1]["changes"]["label"], "L");
    assert_eq!(admin[2]["changes"]["display_name"], "Audited");
    assert_eq!(admin[2]["changes"]["status"], "inactive");
    // The request made with the key is the user's too.
    assert!(recs.iter().any(|r| r["kind"] == "request" && r["user"] == "aud" && r["status"] == 200), "{records:#}");
    assert!(!records.to_string().contains(&token));
    // Other users' records are not in the filtered view.
    assert!(recs.iter().all(|r| r["user"] == "aud" || r["target"] == "aud"), "{records:#}");

    // limit keeps the newest.
    let last = a.expect(200, "GET", "/admin/v1/audit?user=aud&limit=1", None).await;
    assert_eq!(last.as_array().unwrap().len(), 1);
    assert_eq!(last[0], *recs.last().unwrap());
    let unfiltered = a.expect(200, "GET", "/admin/v1/audit", None).await;
    assert!(unfiltered.as_array().unwrap().len() >= recs.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_the_exact_error_and_changes_nothing() {
    for kept in [Kept::File, Kept::Database] {
        bad_input_gets_the_exact_error_and_changes_nothing_in(kept).await;
    }
}

async fn bad_input_gets_the_exact_error_and_changes_nothing_in(kept: Kept) {
    let fx = fixture_in(kept).await;
    let a = &fx.admin;
    let before = fx.credentials_text().await;

    // Missing user / key: 404.
    for (method, path) in [
        ("GET", "/admin/v1/users/ghost"),
        ("PATCH", "/admin/v1/users/ghost"),
        ("DELETE", "/admin/v1/users/ghost"),
        ("GET", "/admin/v1/users/ghost/usage"),
        ("POST", "/admin/v1/users/ghost/keys"),
    ] {
        let body = (method != "GET" && method != "DELETE").then(|| json!({}));
        let res = a.call(method, path, body.as_ref()).await;
        assert_error(&res, 404, "not_found", "no user \"ghost\"");
    }
    let res = a.delete("/admin/v1/users/svc/keys/ak_ghost").await;
    assert_error(&res, 404, "not_found", "user \"svc\" has no key \"ak_ghost\"");
    for path in ["/admin/v1/nope", "/admin/v1/users/svc/keys/a/b", "/admin/v1/users/svc/secrets"] {
        assert_error(&a.get(path).await, 404, "not_found", "No such admin endpoint");
    }
    // A method the path does not have.
    let res = a.call("PUT", "/admin/v1/users/svc", Some(&json!({}))).await;
    assert_error(&res, 404, "not_found", "No such admin endpoint");

    // Duplicate id: 409.
    let res = a.post("/admin/v1/users", &json!({"id": "svc", "auth_method": "hmac"})).await;
    assert_error(&res, 409, "conflict", "user \"svc\" already exists");

    // Invalid fields: 422, the message naming the field.
    let cases: Vec<(&str, Value, &str)> = vec![
        ("teams not a list", json!({"id": "n1", "auth_method": "api_key", "teams": "finance"}), "teams"),
        ("unknown field", json!({"id": "n1", "auth_method": "api_key", "colour": "red"}), "colour"),
        ("bad auth_method", json!({"id": "n1", "auth_method": "password"}), "auth_method"),
        ("bad status", json!({"status": "asleep"}), "status"),
        (
            "rate_limit of the wrong shape",
            json!({"id": "n1", "auth_method": "api_key", "rate_limit": {"per_second": "fast"}}),
            "rate_limit",
        ),
        (
            "allow_proxied_users not a bool",
            json!({"id": "n1", "auth_method": "api_key", "allow_proxied_users": "yes"}),
            "allow_proxied_users",
        ),
        ("id with upper case", json!({"id": "Bad Id", "auth_method": "api_key"}), "user id"),
        ("id too long", json!({"id": "a".repeat(65), "auth_method": "api_key"}), "user id"),
        ("unknown role", json!({"id": "n1", "auth_method": "api_key", "roles": ["no-such-role"]}), "no-such-role"),
        ("malformed rule", json!({"id": "n1", "auth_method": "api_key", "allowed_endpoints": ["GET"]}), "GET"),
    ];
    for (what, body, field) in &cases {
        let (method, path) =
            if body.get("id").is_some() { ("POST", "/admin/v1/users") } else { ("PATCH", "/admin/v1/users/svc") };
        let res = a.call(method, path, Some(body)).await;
        assert_eq!(res.status, 422, "{what}: {}", res.text());
        let v = res.json();
        assert_eq!(v["code"], "validation_error", "{what}");
        assert!(v["message"].as_str().unwrap().contains(field), "{what}: the message does not name {field}: {v}");
        assert_error(&res, 422, "validation_error", v["message"].as_str().unwrap());
    }
    // Keys: a label of the wrong type, an expiry that is no timestamp.
    for (body, field) in [(json!({"label": 5}), "label"), (json!({"expires_at": "tomorrow"}), "expires_at")] {
        let res = a.post("/admin/v1/users/svc/keys", &body).await;
        assert_eq!(res.status, 422, "{body}: {}", res.text());
        assert!(res.json()["message"].as_str().unwrap().contains(field), "{}", res.text());
    }

    // Not JSON: 400 (whatever the Content-Type says).
    for body in ["{\"id\": ", "id=x&auth_method=api_key", "\u{0}"] {
        let res = a.raw("POST", "/admin/v1/users", &[("content-type", "application/json")], body).await;
        assert_eq!(res.status, 400, "{body:?}: {}", res.text());
        let v = res.json();
        assert_eq!(v["code"], "invalid_request");
        assert!(v["message"].as_str().unwrap().starts_with("body is not JSON"), "{v}");
        assert_error(&res, 400, "invalid_request", v["message"].as_str().unwrap());
    }

    // Over 1 MiB: 413, sized or streamed; exactly 1 MiB is read.
    const MAX: usize = 1 << 20;
    let mut at_limit = json!({"label": "big"}).to_string().into_bytes();
    at_limit.resize(MAX, b' ');
    let res = a.raw("POST", "/admin/v1/users/ghost/keys", &[("content-type", "application/json")], at_limit).await;
    assert_error(&res, 404, "not_found", "no user \"ghost\"");
    // One byte more, with Content-Length or chunked. Raw, and the whole body in before
    // the answer is read, so that the gateway's close cannot reset the 413 away.
    let json_body = json!({"id": "huge", "auth_method": "api_key"}).to_string();
    let mut over = json_body.into_bytes();
    over.resize(MAX + 1, b' ');
    let head = |framing: &str| {
        format!("POST /admin/v1/users HTTP/1.1\r\nHost: admin\r\nAuthorization: Bearer {TOKEN}\r\n{framing}\r\n\r\n")
    };
    let mut conn = RawConn::connect(fx.gw.admin_addr()).await;
    conn.send(head(&format!("Content-Length: {}", MAX + 1)).as_bytes()).await;
    conn.send(&over).await;
    assert_error(&conn.read_response().await, 413, "payload_too_large", "Request body is too large");
    let mut conn = RawConn::connect(fx.gw.admin_addr()).await;
    conn.send(head("Transfer-Encoding: chunked").as_bytes()).await;
    // Exactly the limit in 64 KiB chunks, then the byte over it with the end of the body
    // in one write (see errors.rs: the refusal then comes after everything was read).
    let (upto, last) = over.split_at(MAX);
    for chunk in upto.chunks(0x10000) {
        let mut c = format!("{:x}\r\n", chunk.len()).into_bytes();
        c.extend_from_slice(chunk);
        c.extend_from_slice(b"\r\n");
        conn.send(&c).await;
    }
    let mut end = format!("{:x}\r\n", last.len()).into_bytes();
    end.extend_from_slice(last);
    end.extend_from_slice(b"\r\n0\r\n\r\n");
    conn.send(&end).await;
    assert_error(&conn.read_response().await, 413, "payload_too_large", "Request body is too large");

    // Not changeable by PATCH; not settable at create.
    let res = a.patch("/admin/v1/users/svc", &json!({"auth_method": "hmac"})).await;
    assert_eq!(res.status.as_u16() / 100, 4, "{}", res.text());
    assert!(res.json()["message"].as_str().unwrap().contains("auth_method"), "{}", res.text());
    let res = a.patch("/admin/v1/users/svc", &json!({"id": "renamed"})).await;
    assert!(res.json()["message"].as_str().unwrap().contains("`id`"), "{}", res.text());
    for (body, field) in [
        (json!({"auth_method": "api_key"}), "id"),
        (json!({"id": "n2"}), "auth_method"),
        (json!({"id": "n2", "auth_method": "api_key", "status": "retired"}), "status"),
    ] {
        let res = a.post("/admin/v1/users", &body).await;
        assert_eq!(res.status.as_u16() / 100, 4, "{body}: {}", res.text());
        assert!(res.json()["message"].as_str().unwrap().contains(field), "{body}: {}", res.text());
    }

    assert_eq!(fx.credentials_text().await, before, "a refused call changed the file");
    assert_eq!(a.expect(200, "GET", "/readyz", None).await["users"], 2);
    assert_eq!(fx.with_token(&fx.svc.token).await.status, 200);
    assert_eq!(fx.signed(&fx.signer, "/api/x").await.status, 200);
}

/// A refused request names the key it identified (a bad signature, a replay, a revoked
/// or an inactive key) and that key's user in its audit record; it is still nobody's
/// usage (no request, no `last_used_at`), and an unknown key names nobody.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_request_names_the_key_it_identified_in_its_audit_record_only() {
    let fx = fixture().await;
    let a = &fx.admin;
    let forged = HmacKey { key_id: fx.signer.key_id.clone(), secret: "not-the-signer-secret".into() };
    assert_error(&fx.signed(&forged, "/api/forged").await, 401, "authentication_error", "Invalid signature");
    let stale = fx.signer.headers_at(1_000_000_000, "GET", "/api/stale", b"");
    let res = fx.proxy.get_with(&fx.gw.url("/api/stale"), &stale).await;
    assert_error(&res, 401, "authentication_error", "Request timestamp is outside the allowed window");
    let signed = fx.signer.headers("GET", "/api/replayed", b"");
    assert_eq!(fx.proxy.get_with(&fx.gw.url("/api/replayed"), &signed).await.status, 200);
    let again = fx.proxy.get_with(&fx.gw.url("/api/replayed"), &signed).await;
    assert_error(&again, 401, "authentication_error", "Replayed request");
    a.expect(200, "DELETE", &format!("/admin/v1/users/svc/keys/{}", fx.svc.key_id), None).await;
    assert_unauthorized(
        &fx.proxy.get_with(&fx.gw.url("/api/revoked"), &[("x-api-key", &fx.svc.token)]).await,
        "Invalid API key",
    );
    let unknown = Creds::new().api_user("nobody");
    assert_unauthorized(
        &fx.proxy.get_with(&fx.gw.url("/api/unknown"), &[("x-api-key", &unknown.token)]).await,
        "Invalid API key",
    );
    assert_eq!(fx.up.count(), 1, "only the one good request went upstream");

    let who = |path: &str, n: usize| {
        let gw = &fx.gw;
        let path = path.to_string();
        async move {
            let records = gw.audit_of(&path, n).await;
            let r = &records[n - 1];
            (r["reason"].clone(), r["user"].clone(), r["key_id"].clone(), r["status"].clone())
        }
    };
    let signer = (json!("signer"), json!(fx.signer.key_id));
    for (path, n, reason) in
        [("/api/forged", 1, "bad_signature"), ("/api/stale", 1, "stale_timestamp"), ("/api/replayed", 2, "replay")]
    {
        assert_eq!(who(path, n).await, (json!(reason), signer.0.clone(), signer.1.clone(), json!(401)), "{path}");
    }
    assert_eq!(who("/api/revoked", 1).await, (json!("revoked"), json!("svc"), json!(fx.svc.key_id), json!(401)));
    assert_eq!(who("/api/unknown", 1).await, (json!("unknown_key"), Value::Null, Value::Null, json!(401)));

    // Usage counts what authenticated: the signer's one good request; nothing for svc.
    let u = a.expect(200, "GET", "/admin/v1/users/signer/usage", None).await;
    assert_eq!((u["requests"].clone(), u["errors"].clone()), (json!(1), json!(0)), "{u}");
    let u = a.expect(200, "GET", "/admin/v1/users/svc/usage", None).await;
    assert_eq!((u["requests"].clone(), u["last_used_at"].clone()), (json!(0), Value::Null), "{u}");
}

/// Creates a named admin token with the bootstrap token; returns (id, token).
async fn new_admin_token(fx: &Fx, name: &str, role: &str) -> (String, String) {
    let v = fx.admin.expect(201, "POST", "/admin/v1/admin-tokens", Some(&json!({"name": name, "role": role}))).await;
    let token = v["token"].as_str().unwrap().to_string();
    assert!(token.starts_with("gha_") && token.len() == 53, "{token}");
    assert_eq!(v["admin_token"]["role"], role);
    assert_eq!(v["admin_token"]["status"], "active");
    assert_eq!(v["admin_token"]["hint"], format!("gha_…{}", &token[49..]));
    assert!(v["admin_token"].get("token_sha256").is_none(), "{v}");
    (v["admin_token"]["id"].as_str().unwrap().to_string(), token)
}

/// The role a route needs (docs/admin.md#admin-roles), for the matrix below.
fn role_needed(method: &str, path: &str) -> &'static str {
    if path.starts_with("/admin/v1/admin-tokens") || path == "/admin/v1/reload" {
        "admin"
    } else if method == "GET" {
        "viewer"
    } else if path == "/admin/v1/roles" {
        "admin"
    } else {
        "operator"
    }
}

/// Every admin route the router handles, called with a viewer's, an operator's and an
/// admin's token, in the file and the database store: below the route's role, 403 with
/// the exact body, nothing changed, the refusal audited with the token's id and name; at
/// or above it, never 401 or 403.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_admin_route_is_refused_below_its_role_and_served_at_it() {
    for kept in [Kept::File, Kept::Database] {
        let fx = fixture_in(kept).await;
        let mut tokens = vec![];
        for role in ["viewer", "operator", "admin"] {
            let (id, token) = new_admin_token(&fx, &format!("{role}-1"), role).await;
            tokens.push((role, id, token));
        }
        let rank = |r: &str| ["viewer", "operator", "admin"].iter().position(|x| *x == r).unwrap();
        let routes: Vec<(String, String)> =
            routes_from_router().into_iter().filter(|(_, p)| p.starts_with("/admin/v1/")).collect();
        for (role, id, token) in &tokens {
            let as_role = fx.admin.with_token(Some(token));
            let me = as_role.expect(200, "GET", "/admin/v1/whoami", None).await;
            assert_eq!(me, json!({"id": id, "name": format!("{role}-1"), "role": role}));
            for (method, path) in &routes {
                let needed = role_needed(method, path);
                let url = concrete(path).replace("{id}", "svc");
                let body = (method != "GET" && method != "DELETE").then(|| json!({}));
                let before = fx.credentials_text().await;
                let res = as_role.call(method, &url, body.as_ref()).await;
                if rank(role) < rank(needed) {
                    let msg = format!("Admin token \"{role}-1\" has role {role}; this call needs {needed}");
                    assert_error(&res, 403, "permission_error", &msg);
                    assert_eq!(fx.credentials_text().await, before, "{role}: {method} {url} changed the store");
                    // The audit log is written by its own task: wait for the record.
                    let denied = || {
                        fx.audit_text()
                            .lines()
                            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                            .any(|r| r["action"] == "admin.denied" && r["target"] == url && r["token_id"] == *id)
                    };
                    crate::support::eventually(crate::support::STEP, &format!("{role}: {method} {url} denied"), denied)
                        .await;
                } else {
                    let s = res.status.as_u16();
                    assert!(s != 401 && s != 403, "{kept:?} {role}: {method} {url} → {s}: {}", res.text());
                }
            }
        }
        // A change names the token that made it.
        let (_, operator, op_token) = &tokens[1];
        let as_op = fx.admin.with_token(Some(op_token));
        as_op
            .expect(201, "POST", "/admin/v1/users", Some(&json!({"id": "made-by-op", "auth_method": "api_key"})))
            .await;
        let find = || {
            fx.audit_text()
                .lines()
                .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                .find(|r| r["action"] == "user.create" && r["target"] == "made-by-op")
        };
        crate::support::eventually(crate::support::STEP, "user.create record", || find().is_some()).await;
        let rec = find().unwrap();
        assert_eq!(rec["token_id"], *operator, "{rec}");
        assert_eq!(rec["token_name"], "operator-1", "{rec}");
        assert!(rec["token"].as_str().unwrap().starts_with("sha256:"), "{rec}");
        // The list never shows a token; a revoked token is 401 from the next call on.
        let list = fx.admin.expect(200, "GET", "/admin/v1/admin-tokens", None).await;
        assert_eq!(list.as_array().unwrap().len(), 3);
        assert!(!list.to_string().contains(op_token.as_str()) && !list.to_string().contains("token_sha256"));
        fx.admin.expect(200, "DELETE", &format!("/admin/v1/admin-tokens/{operator}"), None).await;
        assert_error(&as_op.get("/admin/v1/users").await, 401, "authentication_error", "Invalid admin token");
        let list = fx.admin.expect(200, "GET", "/admin/v1/admin-tokens", None).await;
        assert_eq!(list[1]["status"], "revoked", "{list}");
        // A live name is unique; bad input is refused with the reason.
        let dup = fx.admin.post("/admin/v1/admin-tokens", &json!({"name": "viewer-1", "role": "viewer"})).await;
        assert_error(
            &dup,
            409,
            "conflict",
            "a live admin token named \"viewer-1\" exists; revoke it first or choose another name",
        );
        let bad_role = fx.admin.post("/admin/v1/admin-tokens", &json!({"name": "x", "role": "root"})).await;
        assert_eq!(bad_role.status, 422, "{}", bad_role.text());
        let bad_name = fx.admin.post("/admin/v1/admin-tokens", &json!({"name": "<b>x</b>", "role": "viewer"})).await;
        assert_error(
            &bad_name,
            422,
            "validation_error",
            "admin token name \"<b>x</b>\": 1 to 64 letters, digits, '.', '_', '@' or '-'",
        );
    }
}

/// `gatehouse admin-tokens create|list|revoke` write the store the running gateway reads
/// (a file beside the credentials): the printed token works at once, the list shows no
/// token, a revoked or expired token is 401.
#[tokio::test]
async fn admin_tokens_from_the_cli_work_at_once_and_revoke_at_once() {
    let fx = fixture().await;
    let creds = fx.gw.written().credentials_path().display().to_string();
    let out = crate::support::process::run_cli(&[
        "admin-tokens",
        "create",
        "--name",
        "ci-reader",
        "--role",
        "viewer",
        "--json",
        "--credentials",
        &creds,
    ])
    .await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let token = v["token"].as_str().unwrap();
    let id = v["admin_token"]["id"].as_str().unwrap();
    assert!(id.starts_with("adt_"), "{v}");
    let stored =
        std::fs::read_to_string(fx.gw.written().credentials_path().with_file_name("admin-tokens.yaml")).unwrap();
    assert!(!stored.contains(token), "the token is stored in clear");
    let viewer = fx.admin.with_token(Some(token));
    assert_eq!(viewer.get("/admin/v1/users").await.status, 200);
    assert_eq!(viewer.post("/admin/v1/reload", &json!({})).await.status, 403);

    let list = crate::support::process::run_cli(&["admin-tokens", "list", "--credentials", &creds]).await;
    let text = String::from_utf8_lossy(&list.stdout);
    assert!(text.contains(id) && text.contains("ci-reader") && text.contains("viewer") && text.contains("active"));
    assert!(!text.contains(token), "{text}");

    let revoke = crate::support::process::run_cli(&["admin-tokens", "revoke", id, "--credentials", &creds]).await;
    assert!(revoke.status.success(), "{}", String::from_utf8_lossy(&revoke.stderr));
    assert_error(&viewer.get("/admin/v1/users").await, 401, "authentication_error", "Invalid admin token");

    // An expiry in the past (edited into the file by hand) is 401 as well.
    let (_, other) = new_admin_token(&fx, "soon-gone", "viewer").await;
    let path = fx.gw.written().credentials_path().with_file_name("admin-tokens.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    let edited = text.replace(
        "  created_by: admin-api:bootstrap\n",
        "  created_by: admin-api:bootstrap\n  expires_at: 2020-01-01T00:00:00Z\n",
    );
    assert_ne!(edited, text, "{text}");
    std::fs::write(&path, edited).unwrap();
    assert_error(
        &fx.admin.with_token(Some(&other)).get("/admin/v1/users").await,
        401,
        "authentication_error",
        "Invalid admin token",
    );
}

/// Wrong admin tokens are charged to the address like failed API authentication: over
/// the budget, every call from it is 429 with `Retry-After` — the right token too, since
/// the address is refused before any lookup — and nothing is changed.
#[tokio::test]
async fn wrong_admin_tokens_use_up_the_address_budget() {
    let up = TestUpstream::start().await;
    let creds = Creds::new();
    let gw = TestGateway::builder()
        .credentials(&creds)
        .admin(TOKEN)
        .admin_setting("failed_per_ip_per_minute", "3")
        .route(RouteSpec::new("api", "/api/").to(&up).authenticated())
        .start()
        .await;
    let admin = gw.admin();
    let wrong = admin.with_token(Some("gha_not-a-real-token"));
    // No token at all is not a guess: not charged.
    for _ in 0..5 {
        assert_eq!(admin.with_token(None).get("/admin/v1/users").await.status, 401);
    }
    // The third failure in a minute uses up a budget of 3: from then on, 429.
    for _ in 0..3 {
        assert_error(&wrong.get("/admin/v1/users").await, 401, "authentication_error", "Invalid admin token");
    }
    let blocked = wrong.post("/admin/v1/users", &json!({"id": "x", "auth_method": "api_key"})).await;
    assert_error(&blocked, 429, "rate_limit_error", "Too many failed admin authentications from this address");
    let wait: u64 = blocked.header("retry-after").parse().unwrap();
    assert!((1..=20).contains(&wait), "Retry-After {wait}");
    let right = admin.get("/admin/v1/users").await;
    assert_error(&right, 429, "rate_limit_error", "Too many failed admin authentications from this address");
    assert!(!std::fs::read_to_string(gw.written().credentials_path()).unwrap().contains("id: x\n"));
    // Probes need no token and are never blocked.
    assert_eq!(admin.with_token(None).get("/healthz").await.status, 200);
}

/// `POST …/keys/{key_id}/rotate`: a new key at once; the old one revoked now (grace 0) or
/// after the grace period; the token is in the response only; bad grace periods and a
/// revoked key are refused with the reason — in the file and the database store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotate_adds_a_key_and_revokes_the_old_one_after_the_grace_period() {
    for kept in [Kept::File, Kept::Database] {
        let fx = fixture_in(kept).await;
        let path = format!("/admin/v1/users/svc/keys/{}/rotate", fx.svc.key_id);
        let v = fx.admin.expect(201, "POST", &path, Some(&json!({"label": "next", "grace_seconds": 3600}))).await;
        let next = v["token"].as_str().unwrap().to_string();
        assert_eq!(v["replaces"]["id"], fx.svc.key_id.as_str(), "{v}");
        assert_eq!(v["key"]["label"], "next");
        assert_eq!(fx.with_token(&next).await.status, 200, "{kept:?}");
        assert_eq!(fx.with_token(&fx.svc.token).await.status, 200, "{kept:?}: the old key in its grace period");
        // Rotating the new key with no grace: it is refused from the next request on.
        let next_id = v["key"]["id"].as_str().unwrap();
        let now_path = format!("/admin/v1/users/svc/keys/{next_id}/rotate");
        let third = fx.admin.expect(201, "POST", &now_path, Some(&json!({}))).await;
        crate::support::assert_unauthorized(&fx.with_token(&next).await, "Invalid API key");
        assert_eq!(fx.with_token(third["token"].as_str().unwrap()).await.status, 200);
        let again = fx.admin.post(&now_path, &json!({})).await;
        crate::support::assert_error(&again, 409, "conflict", &format!("key \"{next_id}\" is already revoked"));
        for grace in [-1, 2_592_001] {
            let bad = fx.admin.post(&path, &json!({"grace_seconds": grace})).await;
            crate::support::assert_error(
                &bad,
                400,
                "invalid_request",
                "`grace_seconds` must be from 0 to 2592000 (30 days)",
            );
        }
    }
}
