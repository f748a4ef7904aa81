//! The console (docs/console.md) in a real headless Chromium (Debian's `chromium` and
//! `chromium-driver`, driven by Selenium from `tests/it/console/flows.py`; `.ci/run`
//! installs them): what a person does in the browser, and afterwards what the store, the
//! upstream, the audit log and the metrics say. Plus the console's HTTP contract without a
//! browser: headers, cookie, CSRF and `Origin` checks.

use crate::support::client::H1;
use crate::support::creds::{ApiKey, Creds};
use crate::support::gateway::{AdminClient, RouteSpec, TestGateway};
use crate::support::upstream::TestUpstream;
use crate::support::{STEP, eventually};
use serde_json::{Value, json};
use std::path::Path;

const TOKEN: &str = "console-test-bootstrap-token-0123456789";

struct Fx {
    up: TestUpstream,
    gw: TestGateway,
    admin: AdminClient,
    svc: ApiKey,
}

/// A gateway with an admin listener, an api_key user `svc` (role `all`), `/api/` to a
/// recording upstream.
async fn fixture() -> Fx {
    fixture_with(&[]).await
}

/// [`fixture`] with more `admin:` settings.
async fn fixture_with(admin_settings: &[(&str, &str)]) -> Fx {
    let up = TestUpstream::start().await;
    let mut creds = Creds::new();
    let svc = creds.api_user("svc");
    let mut config = TestGateway::builder()
        .credentials(&creds)
        .admin(TOKEN)
        .route(RouteSpec::new("api", "/api/").to(&up).authenticated());
    for (k, v) in admin_settings {
        config = config.admin_setting(k, v);
    }
    let gw = config.start().await;
    let admin = gw.admin();
    Fx { up, gw, admin, svc }
}

impl Fx {
    /// A named admin token with `role`, made with the bootstrap token.
    async fn token(&self, name: &str, role: &str) -> String {
        let v =
            self.admin.expect(201, "POST", "/admin/v1/admin-tokens", Some(&json!({"name": name, "role": role}))).await;
        v["token"].as_str().unwrap().to_string()
    }

    fn admin_url(&self) -> String {
        format!("http://{}", self.gw.admin_addr())
    }

    fn credentials_text(&self) -> String {
        std::fs::read_to_string(self.gw.written().credentials_path()).unwrap()
    }

    fn audit(&self) -> Vec<Value> {
        std::fs::read_to_string(self.gw.written().audit_path())
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Runs one browser flow; its JSON report.
    async fn browse(&self, case: &str, token: &str) -> Value {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/it/console/flows.py");
        let mut cmd = tokio::process::Command::new("python3");
        cmd.arg(script)
            .arg(case)
            .args(["--admin", &self.admin_url()])
            .args(["--proxy", &self.gw.url("")])
            .args(["--token", token]);
        // `GATEHOUSE_SCREENSHOTS=docs` regenerates the README's screenshots.
        if let Ok(dir) = std::env::var("GATEHOUSE_SCREENSHOTS") {
            cmd.args(["--screenshots", &Path::new(env!("CARGO_MANIFEST_DIR")).join(dir).display().to_string()]);
        }
        let out = tokio::time::timeout(std::time::Duration::from_secs(120), cmd.output())
            .await
            .expect("the browser flow finished within 2 minutes")
            .expect("python3 runs (selenium, chromium and chromium-driver are installed by .ci/run)");
        assert!(out.status.success(), "flows.py {case} failed:\n{}", String::from_utf8_lossy(&out.stderr));
        let v: Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("flows.py {case}: not JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)));
        assert_eq!(v["console_errors"], json!([]), "{case}: errors in the browser's console: {v}");
        v
    }
}

fn user_in<'a>(creds_yaml: &'a str, id: &str) -> Option<&'a str> {
    let start = creds_yaml.find(&format!("- id: {id}\n"))?;
    let rest = &creds_yaml[start + 2..];
    Some(&rest[..rest.find("\n- id: ").unwrap_or(rest.len())])
}

/// Acceptance 1: an operator signs in, creates a user, adds a key, reads the token from
/// the page, sends a real request with it (200 at the upstream), revokes the key in the
/// console after a confirmation that names the consequence, and the next request is 401.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_creates_a_user_adds_a_key_uses_it_and_revokes_it() {
    let fx = fixture().await;
    let token = fx.token("olivia", "operator").await;
    let v = fx.browse("operator", &token).await;
    assert_eq!(v["signed_in_as"], "Overview", "{v}");
    assert_eq!(v["whoami"], "olivia (operator)", "{v}");
    assert_eq!(v["after_create"], "User console-made", "{v}");
    assert_eq!(v["token_prefix"], "ghk_", "{v}");
    assert_eq!(v["example_has_token"], true, "{v}");
    assert_eq!(v["copy_button_visible"], true, "{v}");
    let reload = v["after_reload"].as_str().unwrap();
    assert!(reload.contains("was shown already; it cannot be shown again") && !reload.contains("ghk_"), "{reload}");
    assert_eq!(v["status_with_key"], 200, "{v}");
    let consequence = v["consequence"].as_str().unwrap();
    assert!(consequence.contains("refused with 401") && consequence.contains("cannot be undone"), "{consequence}");
    assert_eq!(v["after_revoke"], "User console-made", "{v}");
    assert_eq!(v["key_status"], "revoked", "{v}");
    // The one request is in the key's last 24 hours and in today's bar.
    assert_eq!(v["key_24h"], "1", "{v}");
    let today = time::OffsetDateTime::now_utc().date().to_string();
    assert_eq!(v["per_day"], json!([[today, "1"]]), "{v}");
    assert_eq!(v["status_after_revoke"], 401, "{v}");
    assert_eq!(v["phone_table_scrolls"], true, "the page is wider than a phone: {v}");
    // The upstream saw the one request made with the key, as the new user.
    let seen = fx.up.requests();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].target, "/api/console-check");
    assert!(seen[0].headers.get("x-api-key").is_none(), "the key reached the upstream");
    // The store: the user, its key revoked; the audit: each change names the operator.
    let creds = fx.credentials_text();
    let user = user_in(&creds, "console-made").expect("no user console-made in the store");
    assert!(user.contains("ERP sync, created by the browser test") && user.contains("revoked_at:"), "{user}");
    let audit = fx.audit();
    for action in ["user.create", "key.add", "key.revoke"] {
        let r = audit.iter().find(|r| r["action"] == action && r["target"] == "console-made");
        let r = r.unwrap_or_else(|| panic!("no {action} record"));
        assert_eq!(r["token_name"], "olivia", "{r}");
    }
    assert!(audit.iter().any(|r| r["action"] == "console.sign_in" && r["token_name"] == "olivia"));
}

/// Acceptance 2: a viewer sees no write control on any page; the create-user page is
/// refused; a write posted with the viewer's own session and CSRF token is 403, changes
/// nothing, and is audited.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_viewer_sees_no_write_control_and_its_writes_are_refused() {
    let fx = fixture().await;
    let token = fx.token("victor", "viewer").await;
    let before = fx.credentials_text();
    let v = fx.browse("viewer", &token).await;
    assert_eq!(v["write_controls"], json!([]), "{v}");
    let new_user = v["new_user_page"].as_str().unwrap();
    assert!(new_user.contains("has role viewer; changes need operator"), "{new_user}");
    let forged = v["forged_write"].as_str().unwrap();
    assert!(
        forged.contains("has role viewer; this call needs operator") && forged.contains("Nothing was changed"),
        "{forged}"
    );
    assert_eq!(fx.credentials_text(), before, "a viewer's write changed the store");
    let denied = || {
        fx.audit().iter().any(|r| {
            r["action"] == "admin.denied" && r["target"] == "/admin/v1/users/svc/keys" && r["token_name"] == "victor"
        })
    };
    eventually(STEP, "the viewer's write audited", denied).await;
}

/// Acceptance 3 (CSRF): a form without the CSRF token, and a form posted from another
/// origin's page, are refused and change nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forms_without_the_csrf_token_or_from_another_origin_change_nothing() {
    let fx = fixture().await;
    let token = fx.token("olga", "operator").await;
    let before = fx.credentials_text();
    let v = fx.browse("csrf", &token).await;
    let without = v["without_csrf"].as_str().unwrap();
    assert!(without.contains("missing CSRF token or another origin") && without.contains("nothing was changed"), "{v}");
    let other = v["other_origin"].as_str().unwrap();
    assert!(other.contains("nothing was changed"), "{v}");
    assert_eq!(v["alert"], Value::Null, "{v}");
    assert_eq!(fx.credentials_text(), before, "a refused form changed the store");
    assert_eq!(fx.svc_status().await, 200, "svc was disabled");
}

impl Fx {
    /// Signs in over plain HTTP; the session cookie (`name=value`).
    async fn sign_in_http(&self, token: &str) -> String {
        let admin = self.admin_url();
        let headers = [("origin", admin.as_str()), ("content-type", "application/x-www-form-urlencoded")];
        let signed =
            H1::new().request("POST", &format!("{admin}/ui/sign-in"), &headers, format!("token={token}")).await;
        assert_eq!(signed.status, 303, "{}", signed.text());
        signed.header("set-cookie").split(';').next().unwrap().to_string()
    }

    /// GET a console page with a session cookie.
    async fn page(&self, cookie: &str, path: &str) -> crate::support::Reply {
        H1::new().get_with(&format!("{}{path}", self.admin_url()), &[("cookie", cookie)]).await
    }

    async fn svc_status(&self) -> u16 {
        H1::new().get_with(&self.gw.url("/api/x"), &[("x-api-key", self.svc.token.as_str())]).await.status.as_u16()
    }
}

/// Acceptance 3 (XSS): a description and a display name made of markup are shown as text
/// on the users list, the user's page, the audit page and the overview; no script runs
/// and no element is injected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn markup_in_user_fields_is_shown_as_text_everywhere() {
    let fx = fixture().await;
    let script = "<script>window.xssRan=1;alert(1)</script>";
    let img = "\"><img src=x onerror=\"window.xssRan=1;alert(2)\">";
    fx.admin
        .expect(
            201,
            "POST",
            "/admin/v1/users",
            Some(&json!({"id": "xss-user", "auth_method": "api_key", "description": script, "display_name": img, "organization": img})),
        )
        .await;
    let token = fx.token("vera", "viewer").await;
    let v = fx.browse("xss", &token).await;
    for (page, seen) in v["pages"].as_object().unwrap() {
        assert_eq!(seen["alert"], Value::Null, "{page}: {seen}");
        assert_eq!(seen["ran"], false, "{page}: {seen}");
        assert_eq!(seen["injected_img"], 0, "{page}: {seen}");
        let scripts: Vec<&str> = seen["scripts"].as_array().unwrap().iter().map(|s| s.as_str().unwrap()).collect();
        assert!(scripts.iter().all(|s| s.ends_with("/ui/static/console.js")), "{page}: {scripts:?}");
    }
    let pages = &v["pages"];
    assert!(pages["/ui/users"]["text"].as_str().unwrap().contains(img), "list: {}", pages["/ui/users"]);
    let detail = pages["/ui/users/xss-user"]["text"].as_str().unwrap();
    assert!(detail.contains(script) && detail.contains(img), "detail: {detail}");
    assert!(pages["/ui/audit"]["text"].as_str().unwrap().contains("window.xssRan=1;alert(1)"), "audit");
}

/// Acceptance 4: after a known sequence of requests, the overview shows the numbers the
/// metrics and the admin API give. (A rotation age of 1 ms makes every live key due.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_overview_matches_the_metrics_and_the_admin_api() {
    let fx = fixture_with(&[("key_rotation_age", "1ms")]).await;
    // A user without a key, for the overview's list.
    fx.admin.expect(201, "POST", "/admin/v1/users", Some(&json!({"id": "keyless", "auth_method": "api_key"}))).await;
    let proxy = H1::new();
    for _ in 0..5 {
        assert_eq!(fx.svc_status().await, 200);
    }
    for _ in 0..2 {
        assert_eq!(proxy.get(&fx.gw.url("/api/x")).await.status, 401);
    }
    for _ in 0..3 {
        let bad = proxy.get_with(&fx.gw.url("/api/x"), &[("x-api-key", "ghk_not-a-key")]).await;
        assert_eq!(bad.status, 401);
    }
    let token = fx.token("vic", "viewer").await;
    let v = fx.browse("overview", &token).await;
    // The metrics since start (the overview's window began with the gateway).
    let metrics = fx.admin.get("/metrics").await.text();
    let sum = |name: &str, filter: &str| -> u64 {
        metrics
            .lines()
            .filter(|l| l.starts_with(name) && l.contains(filter))
            .filter_map(|l| l.rsplit(' ').next().and_then(|n| n.parse::<f64>().ok()))
            .sum::<f64>() as u64
    };
    let requests = sum("gatehouse_requests_total{", "");
    assert_eq!(requests, 10, "{metrics}");
    assert_eq!(v["requests"], requests.to_string(), "{v}");
    let failures = sum("gatehouse_auth_failures_total{", "");
    assert_eq!(v["failures"], failures.to_string(), "{v}");
    let mut from_metrics = serde_json::Map::new();
    for l in metrics.lines().filter(|l| l.starts_with("gatehouse_auth_failures_total{")) {
        let reason = l.split("reason=\"").nth(1).and_then(|r| r.split('"').next()).unwrap();
        from_metrics.insert(reason.to_string(), l.rsplit(' ').next().unwrap().into());
    }
    assert_eq!(Value::from(from_metrics), v["by_reason"], "{v}");
    assert_eq!(v["by_reason"].as_object().unwrap().len(), 2, "{v}");
    // The admin API: svc's five requests.
    let usage = fx.admin.expect(200, "GET", "/admin/v1/users/svc/usage", None).await;
    assert_eq!(usage["requests"], 5, "{usage}");
    assert_eq!(usage["requests_24h"], 5, "{usage}");
    let today = time::OffsetDateTime::now_utc().date().to_string();
    assert_eq!(usage["per_day"], json!([{"date": today, "requests": 5}]), "{usage}");
    assert_eq!(usage["keys"][fx.svc.key_id.as_str()]["requests_24h"], 5, "{usage}");
    assert_eq!(v["keyless"], json!(["keyless"]), "{v}");
    assert_eq!(v["old"], json!([["svc", fx.svc.key_id.as_str()]]), "{v}");
}

/// With a credentials file that cannot be written here (mode 0444), the write controls
/// are shown disabled with the reason, to an operator; a viewer still sees none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_store_shows_write_controls_disabled_with_the_reason() {
    use std::os::unix::fs::PermissionsExt;
    let fx = fixture().await;
    let operator = fx.token("opal", "operator").await;
    let viewer = fx.token("vito", "viewer").await;
    let path = fx.gw.written().credentials_path().to_path_buf();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o444)).unwrap();
    let cookie = fx.sign_in_http(&operator).await;
    for page in ["/ui/users", "/ui/users/svc"] {
        let html = fx.page(&cookie, page).await.text();
        assert!(html.contains("The credential store is read-only here"), "{page}: {html}");
        assert!(html.contains("disabled"), "{page}: no disabled control");
        assert!(!html.contains("id=\"new-user\"") && !html.contains("id=\"add-key\""), "{page}: an enabled control");
    }
    let cookie = fx.sign_in_http(&viewer).await;
    let html = fx.page(&cookie, "/ui/users/svc").await.text();
    assert!(!html.contains("read-only") && !html.contains("disabled"), "a viewer is shown write controls: {html}");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
}

/// Wrong admin tokens at sign-in: the sign-in page with a message and no session; the
/// fifth failure from one address in a minute slows it down (429 page).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_tokens_at_sign_in_give_a_message_no_session_and_then_a_pause() {
    let fx = fixture().await;
    let v = fx.browse("sign-in", "").await;
    let messages: Vec<&str> = v["messages"].as_array().unwrap().iter().map(|m| m.as_str().unwrap()).collect();
    for m in &messages[..5] {
        assert_eq!(*m, "That admin token is not valid: wrong, expired or revoked.", "{messages:?}");
    }
    assert!(messages[5].starts_with("Too many failed sign-ins from this address: try again in"), "{messages:?}");
    assert_eq!(v["cookies"], json!([]), "{v}");
    assert!(v["users_page_without_session"].as_str().unwrap().ends_with("/ui/sign-in"), "{v}");
}

/// By keyboard alone: the token field has the focus, Enter signs in, Tab reaches the
/// navigation and Enter follows it. The session cookie is HttpOnly, SameSite=Strict, for
/// /ui only; signing out ends it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_works_by_keyboard_and_sign_out_ends_the_session() {
    let fx = fixture().await;
    let token = fx.token("sam", "viewer").await;
    let v = fx.browse("sign-out", &token).await;
    assert_eq!(v["focused"], "token", "{v}");
    assert_eq!(v["signed_in_as"], "Overview", "{v}");
    assert_eq!(v["tabbed_to"], "Users", "{v}");
    assert_eq!(v["after_enter"], "Users", "{v}");
    assert_eq!(v["cookie"], json!({"httpOnly": true, "sameSite": "Strict", "path": "/ui", "secure": false}), "{v}");
    assert!(v["after_sign_out"].as_str().unwrap().ends_with("/ui/sign-in"), "{v}");
}

/// Without a browser: every console response carries the CSP and framing headers; a
/// POST with the right session and CSRF token but another `Origin`, or none, is 403; a
/// revoked token's session ends on its next request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn posts_need_this_origin_and_a_revoked_token_ends_its_sessions() {
    let fx = fixture().await;
    let made = fx
        .admin
        .expect(201, "POST", "/admin/v1/admin-tokens", Some(&json!({"name": "otto", "role": "operator"})))
        .await;
    let token = made["token"].as_str().unwrap();
    let admin = fx.admin_url();
    let origin = [("origin", admin.as_str()), ("content-type", "application/x-www-form-urlencoded")];
    let h1 = H1::new();
    let signed = h1.request("POST", &format!("{admin}/ui/sign-in"), &origin, format!("token={token}")).await;
    assert_eq!(signed.status, 303, "{}", signed.text());
    let set = signed.header("set-cookie").to_string();
    assert!(set.contains("HttpOnly") && set.contains("SameSite=Strict") && set.contains("Path=/ui"), "{set}");
    let cookie = set.split(';').next().unwrap().to_string();
    let page = h1.get_with(&format!("{admin}/ui/users/svc"), &[("cookie", cookie.as_str())]).await;
    assert_eq!(page.status, 200);
    assert_eq!(
        page.header("content-security-policy"),
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    );
    assert_eq!(page.header("x-frame-options"), "DENY");
    assert_eq!(page.header("cache-control"), "no-store");
    let html = page.text();
    let csrf = html.split("name=\"csrf\" value=\"").nth(1).and_then(|r| r.split('"').next()).unwrap().to_string();
    let before = fx.credentials_text();
    let url = format!("{admin}/ui/users/svc/status/disable");
    let form = format!("csrf={csrf}");
    for (what, headers) in [
        ("another origin", vec![("cookie", cookie.as_str()), ("origin", "http://evil.example")]),
        ("no origin", vec![("cookie", cookie.as_str())]),
    ] {
        let res = h1.request("POST", &url, &headers, form.clone()).await;
        assert_eq!(res.status, 403, "{what}: {}", res.text());
        assert!(res.text().contains("nothing was changed"), "{what}");
    }
    assert_eq!(fx.credentials_text(), before);
    // The right origin, session and token: done.
    let ok = h1.request("POST", &url, &[("cookie", cookie.as_str()), ("origin", admin.as_str())], form.clone()).await;
    assert_eq!(ok.status, 303, "{}", ok.text());
    assert_eq!(fx.svc_status().await, 401, "svc was not disabled");
    // Revoking the token ends the session at its next request.
    let id = made["admin_token"]["id"].as_str().unwrap();
    fx.admin.expect(200, "DELETE", &format!("/admin/v1/admin-tokens/{id}"), None).await;
    let after = h1.get_with(&format!("{admin}/ui/users"), &[("cookie", cookie.as_str())]).await;
    assert_eq!(after.status, 303);
    assert_eq!(after.header("location"), "/ui/sign-in");
    // The static files need no session and are what the pages load.
    let js = h1.get(&format!("{admin}/ui/static/console.js")).await;
    assert_eq!((js.status.as_u16(), js.header("content-type")), (200, "text/javascript; charset=utf-8"));
}

/// Rotation with a grace period (the old key keeps working, the new one works), an edit
/// refused with the API's reason and the typed value kept, then saved; disable and
/// enable, each behind a confirmation that says what happens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_rotates_edits_disables_and_enables() {
    let fx = fixture().await;
    let token = fx.token("oscar", "operator").await;
    let v = fx.browse("lifecycle", &token).await;
    let rotate = v["rotate_consequence"].as_str().unwrap();
    assert!(rotate.contains("keeps working for the grace period") && rotate.contains("401"), "{v}");
    assert_eq!(v["replaces"], fx.svc.key_id.as_str(), "{v}");
    assert_eq!(v["new_token_status"], 200, "{v}");
    let states: Vec<&str> = v["key_states"].as_array().unwrap().iter().map(|s| s.as_str().unwrap()).collect();
    assert_eq!(states.len(), 2, "{v}");
    assert!(states[0].starts_with("active until "), "the old key in its grace period: {states:?}");
    assert_eq!(states[1], "active", "{states:?}");
    let edit_error = v["edit_error"].as_str().unwrap();
    assert!(edit_error.contains("rule \"GET nowhere\": the path pattern must start with '/'"), "{v}");
    assert_eq!(v["kept_typed"], "GET nowhere", "{v}");
    assert_eq!(v["after_edit"], "edited in the console", "{v}");
    assert!(v["disable_consequence"].as_str().unwrap().contains("refused with 401"), "{v}");
    assert_eq!(v["disabled_status"], 401, "{v}");
    assert_eq!(v["enabled_status"], 200, "{v}");
    // The old key still works in its grace period.
    assert_eq!(fx.svc_status().await, 200);
    let audit = fx.audit();
    let rotated = audit.iter().find(|r| r["action"] == "key.rotate").expect("no key.rotate record");
    assert_eq!(rotated["changes"]["grace_seconds"], 3600, "{rotated}");
    assert_eq!(rotated["token_name"], "oscar", "{rotated}");
}

/// An admin edits roles: a bad rule is refused with the reason, a good one is created and
/// then deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_creates_and_deletes_a_role() {
    let fx = fixture().await;
    let token = fx.token("ada", "admin").await;
    let v = fx.browse("roles", &token).await;
    assert!(v["role_error"].as_str().unwrap().contains("rule \"GET x\": the path pattern must start with '/'"), "{v}");
    assert_eq!(v["roles_after_create"], json!(["all", "reader", "New role"]), "{v}");
    assert_eq!(v["roles_after_delete"], json!(["all", "New role"]), "{v}");
    assert!(!fx.credentials_text().contains("reader"));
}

/// Without a browser: an edit form older than the user's last change is refused (412)
/// and overwrites nothing; a user named `new` has its page; an audit filter of any
/// value is answered; a key in its grace period cannot be rotated again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_forms_odd_ids_and_odd_filters_are_handled() {
    let fx = fixture().await;
    let token = fx.token("omar", "operator").await;
    let cookie = fx.sign_in_http(&token).await;
    let admin = fx.admin_url();
    let form = fx.page(&cookie, "/ui/users/svc/edit").await.text();
    let field = |name: &str| {
        form.split(&format!("name=\"{name}\" value=\"")).nth(1).and_then(|r| r.split('"').next()).unwrap().to_string()
    };
    let (csrf, etag) = (field("csrf"), field("etag").replace("&quot;", "\""));
    assert!(etag.starts_with('"'), "{etag}");
    // Somebody else changes svc meanwhile.
    fx.admin.expect(200, "PATCH", "/admin/v1/users/svc", Some(&json!({"description": "theirs"}))).await;
    let body = format!("csrf={csrf}&etag={}&description=mine&roles=all&teams=team-a", etag.replace('"', "%22"));
    let headers = [
        ("cookie", cookie.as_str()),
        ("origin", admin.as_str()),
        ("content-type", "application/x-www-form-urlencoded"),
    ];
    let res = H1::new().request("POST", &format!("{admin}/ui/users/svc"), &headers, body).await;
    assert_eq!(res.status, 412, "{}", res.text());
    assert!(res.text().contains("form-error"), "{}", res.text());
    let svc = fx.admin.expect(200, "GET", "/admin/v1/users/svc", None).await;
    assert_eq!(svc["description"], "theirs", "a stale form overwrote a change");

    fx.admin.expect(201, "POST", "/admin/v1/users", Some(&json!({"id": "new", "auth_method": "api_key"}))).await;
    let page = fx.page(&cookie, "/ui/users/new").await;
    assert_eq!(page.status, 200);
    assert!(page.text().contains("<h1>User new</h1>"), "{}", page.text());

    for since in ["-100000000", "9223372036854775807", "x", "24"] {
        let page = fx.page(&cookie, &format!("/ui/audit?since={since}")).await;
        assert_eq!(page.status, 200, "since={since}");
    }

    let path = format!("/admin/v1/users/svc/keys/{}/rotate", fx.svc.key_id);
    fx.admin.expect(201, "POST", &path, Some(&json!({"grace_seconds": 600}))).await;
    let again = fx.admin.post(&path, &json!({"grace_seconds": 2_592_000})).await;
    assert_eq!(again.status, 409, "{}", again.text());
    assert!(again.text().contains("is already being replaced"), "{}", again.text());
    assert_eq!(fx.svc_status().await, 200, "the old key in its grace period");
}
