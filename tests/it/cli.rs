//! `gatehouse users|keys|roles` (docs/admin.md): the real
//! binary on a credentials file in a temporary directory, found through `--credentials`
//! or `--config`; text and `--json` output; every failure one line on stderr and exit 1;
//! a running gateway picking each change up by itself; two processes writing at once;
//! a read-only directory and a full disk refusing the change with the old file intact.

use crate::support::client::H1;
use crate::support::creds::{Creds, HmacKey, KubeletDir};
use crate::support::gateway::{RouteSpec, TestGateway, WrittenConfig};
use crate::support::process::{DISK_FULL, ReadOnlyDir, run_cli, run_cli_with};
use crate::support::upstream::TestUpstream;
use crate::support::within;
use serde_json::{Value, json};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

/// How long a running gateway may take to pick up a CLI change before the test fails
/// (README: "well under a second"; generous for a loaded 2-core machine).
const PICKUP: Duration = Duration::from_secs(10);

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Runs `gatehouse <args>`, which must succeed silently on stderr; returns stdout.
async fn ok(args: &[&str]) -> String {
    let out = run_cli(args).await;
    assert!(out.status.success(), "gatehouse {args:?} exited {}: {}", out.status, stderr(&out));
    assert_eq!(stderr(&out), "", "gatehouse {args:?} wrote to stderr");
    stdout(&out)
}

/// Runs `gatehouse <args> --json`; returns stdout parsed.
async fn ok_json(args: &[&str]) -> Value {
    let mut a = args.to_vec();
    a.push("--json");
    let text = ok(&a).await;
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("gatehouse {a:?}: not JSON ({e}): {text}"))
}

/// Asserts a failure: exit 1, nothing on stdout, exactly one line on stderr. Returns it.
fn one_line_failure(args: &[&str], out: &Output) -> String {
    assert_eq!(out.status.code(), Some(1), "gatehouse {args:?}: {} / {}", stdout(out), stderr(out));
    assert_eq!(stdout(out), "", "gatehouse {args:?} failed but wrote to stdout");
    let err = stderr(out);
    assert!(err.ends_with('\n') && err.lines().count() == 1, "gatehouse {args:?}: not one line: {err:?}");
    err.trim_end().to_string()
}

/// Runs `gatehouse <args>`, which must fail with one line; returns it.
async fn fails(args: &[&str]) -> String {
    one_line_failure(args, &run_cli(args).await)
}

/// The files of a written config (its credentials file holding what `creds` held), and
/// the arguments that name them.
struct Files {
    dir: PathBuf,
    creds: String,
    config: String,
    audit: PathBuf,
}

/// A config with `creds` (and a route to `up`) written to a temporary directory.
fn write(creds: &Creds, up: Option<&TestUpstream>) -> WrittenConfig {
    let mut config = TestGateway::builder().credentials(creds);
    if let Some(up) = up {
        config = config.route(RouteSpec::new("api", "/api/").to(up).authenticated());
    }
    config.write()
}

impl Files {
    fn of(w: &WrittenConfig) -> Files {
        Files {
            dir: w.dir.path().to_path_buf(),
            creds: w.credentials_path().display().to_string(),
            config: w.path.display().to_string(),
            audit: w.audit_path(),
        }
    }

    fn text(&self) -> String {
        std::fs::read_to_string(&self.creds).unwrap()
    }

    /// `args` with `--credentials <file>` appended.
    fn c<'a>(&'a self, args: &[&'a str]) -> Vec<&'a str> {
        let mut a = args.to_vec();
        a.extend(["--credentials", self.creds.as_str()]);
        a
    }

    /// `args` with `--config <gatehouse.yaml>` appended.
    fn k<'a>(&'a self, args: &[&'a str]) -> Vec<&'a str> {
        let mut a = args.to_vec();
        a.extend(["--config", self.config.as_str()]);
        a
    }

    /// The names in the credentials file's directory that are not one of `expected`
    /// (a leftover temp file, say).
    fn strays(&self, expected: &[&str]) -> Vec<String> {
        std::fs::read_dir(&self.dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| !expected.contains(&n.as_str()))
            .collect()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_command_has_help() {
    for args in [
        &["users", "--help"][..],
        &["keys", "--help"],
        &["roles", "--help"],
        &["users", "create", "--help"],
        &["users", "list", "--help"],
        &["users", "show", "--help"],
        &["users", "update", "--help"],
        &["users", "disable", "--help"],
        &["users", "enable", "--help"],
        &["users", "retire", "--help"],
        &["users", "delete", "--help"],
        &["keys", "add", "--help"],
        &["keys", "list", "--help"],
        &["keys", "revoke", "--help"],
        &["keys", "rotate", "--help"],
        &["roles", "list", "--help"],
        &["roles", "set", "--help"],
        &["roles", "delete", "--help"],
    ] {
        let out = ok(args).await;
        assert!(out.contains("Usage: gatehouse"), "{args:?}: {out}");
        assert!(out.contains("--json") && out.contains("--credentials"), "{args:?}: {out}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_users_and_keys_commands_work_in_text_and_json_through_credentials_or_config() {
    let w = write(&Creds::new(), None);
    let f = Files::of(&w);

    // roles set / list, text and JSON, once through --credentials, once through --config.
    assert_eq!(
        ok(&f.c(&["roles", "set", "reader", "--rule", "GET /api/**", "--description", "read"])).await,
        "role reader set\n"
    );
    let v = ok_json(&f.k(&["roles", "set", "writer", "--rule", "POST /api/**", "--rule", "PUT,PATCH /api/*"])).await;
    assert_eq!(v, json!({"role": "writer"}));
    let text = ok(&f.c(&["roles", "list"])).await;
    assert_eq!(text, "all\n  * /**\nreader\n  GET /api/**\nwriter\n  POST /api/**\n  PUT,PATCH /api/*\n");
    let v = ok_json(&f.k(&["roles", "list"])).await;
    assert_eq!(
        v,
        json!({
            "all": {"description": "everything", "rules": ["* /**"]},
            "reader": {"description": "read", "rules": ["GET /api/**"]},
            "writer": {"description": "", "rules": ["POST /api/**", "PUT,PATCH /api/*"]},
        })
    );

    // users create with every flag (JSON), and a plain one (text).
    let v = ok_json(&f.c(&[
        "users",
        "create",
        "erp-sync",
        "--auth-method",
        "api-key",
        "--display-name",
        "ERP sync",
        "--description",
        "nightly",
        "--organization",
        "acme",
        "--team",
        "finance",
        "--team",
        "ops",
        "--default-team",
        "finance",
        "--role",
        "reader",
        "--role",
        "writer",
        "--allowed-endpoint",
        "GET /api/orders/**",
        "--allow-proxied-users",
        "true",
        "--allowed-proxied-user",
        "mobile",
        "--rate-limit",
        "20/40",
    ]))
    .await;
    let expect = json!({
        "id": "erp-sync", "display_name": "ERP sync", "description": "nightly", "organization": "acme",
        "teams": ["finance", "ops"], "default_team": "finance", "roles": ["reader", "writer"], "status": "active",
        "auth_method": "api_key", "allowed_endpoints": ["GET /api/orders/**"], "allow_proxied_users": true,
        "allowed_proxied_users": ["mobile"], "rate_limit": {"per_second": 20, "burst": 40}, "keys": [],
    });
    for (k, want) in expect.as_object().unwrap() {
        assert_eq!(&v[k], want, "{k}");
    }
    assert!(v["created_at"].is_string() && v["updated_at"].is_string());
    assert_eq!(
        ok(&f.k(&["users", "create", "signer", "--auth-method", "hmac", "--role", "all"])).await,
        "user signer created\n"
    );

    // users list: text table and JSON, with every filter.
    let text = ok(&f.c(&["users", "list"])).await;
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text}");
    assert_eq!(
        lines[0].split_whitespace().collect::<Vec<_>>(),
        ["ID", "STATUS", "METHOD", "ORGANIZATION", "KEYS", "ROLES"]
    );
    assert_eq!(
        lines[1].split_whitespace().collect::<Vec<_>>(),
        ["erp-sync", "active", "api_key", "acme", "0", "reader,writer"]
    );
    assert_eq!(lines[2].split_whitespace().collect::<Vec<_>>(), ["signer", "active", "hmac", "0", "all"]);
    let ids =
        |v: Value| -> Vec<String> { v.as_array().unwrap().iter().map(|u| u["id"].as_str().unwrap().into()).collect() };
    assert_eq!(ids(ok_json(&f.k(&["users", "list"])).await), ["erp-sync", "signer"]);
    assert_eq!(ids(ok_json(&f.c(&["users", "list", "--organization", "acme"])).await), ["erp-sync"]);
    assert_eq!(ids(ok_json(&f.c(&["users", "list", "--role", "all"])).await), ["signer"]);
    assert_eq!(ids(ok_json(&f.c(&["users", "list", "--status", "active"])).await), ["erp-sync", "signer"]);
    assert_eq!(ids(ok_json(&f.c(&["users", "list", "--status", "retired"])).await), Vec::<String>::new());

    // users show: pretty JSON either way.
    let shown = ok_json(&f.c(&["users", "show", "erp-sync"])).await;
    assert_eq!(shown, v);
    let text = ok(&f.k(&["users", "show", "erp-sync"])).await;
    assert_eq!(serde_json::from_str::<Value>(&text).unwrap(), v);

    // users update: only the flags given change; a repeated flag replaces the list.
    assert_eq!(ok(&f.c(&["users", "update", "erp-sync", "--organization", "globex"])).await, "user erp-sync updated\n");
    let u = ok_json(&f.k(&["users", "update", "erp-sync", "--team", "finance", "--rate-limit", "5/10"])).await;
    assert_eq!((u["organization"].clone(), u["teams"].clone()), (json!("globex"), json!(["finance"])));
    assert_eq!(u["rate_limit"], json!({"per_second": 5, "burst": 10}));
    assert_eq!(u["display_name"], "ERP sync");

    // keys add: api_key prints the token once; hmac prints the secret and creates the
    // master key 0600 when there is none.
    let text = ok(&f.c(&["keys", "add", "erp-sync", "--label", "primary", "--expires-in", "90d"])).await;
    let (first, second) = text.trim_end().split_once('\n').unwrap();
    let key1 = first.strip_prefix("key ").and_then(|r| r.strip_suffix(" added to erp-sync")).unwrap().to_string();
    let token1 = second.strip_prefix("token (shown once, store it now): ").unwrap().to_string();
    assert!(token1.starts_with("ghk_"), "{text}");
    let added = ok_json(&f.k(&["keys", "add", "erp-sync", "--label", "backup"])).await;
    assert_eq!(added.as_object().unwrap().keys().collect::<Vec<_>>(), ["key", "token"]);
    let key2 = added["key"]["id"].as_str().unwrap().to_string();
    assert_eq!(added["key"]["label"], "backup");
    assert_eq!(added["key"]["expires_at"], Value::Null);
    let master = f.dir.join("master.key");
    std::fs::remove_file(&master).unwrap();
    let h = ok_json(&f.c(&["keys", "add", "signer", "--label", "sig"])).await;
    assert_eq!(h.as_object().unwrap().keys().collect::<Vec<_>>(), ["key", "secret"]);
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&master).unwrap().permissions().mode() & 0o777, 0o600, "master key mode");
    let text = ok(&f.c(&["keys", "add", "signer"])).await;
    assert!(text.contains("\nsigning secret (shown once, store it now): "), "{text}");
    for secret in [&token1, added["token"].as_str().unwrap(), h["secret"].as_str().unwrap()] {
        assert!(!f.text().contains(secret), "a token or secret is in the file in clear");
    }

    // keys list: text table and JSON; never a secret.
    let text = ok(&f.c(&["keys", "list", "erp-sync"])).await;
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text}");
    assert!(lines[0].starts_with("ID") && lines[0].ends_with("LAST USED"), "{text}");
    assert!(lines[1].starts_with(&key1) && lines[1].contains("primary"), "{text}");
    assert!(!text.contains(&token1));
    let keys = ok_json(&f.k(&["keys", "list", "erp-sync"])).await;
    let keys = keys.as_array().unwrap();
    assert_eq!(keys.iter().map(|k| k["id"].as_str().unwrap()).collect::<Vec<_>>(), [key1.as_str(), key2.as_str()]);
    assert!(keys[0]["expires_at"].is_string() && keys[0]["last_used_at"].is_null(), "{keys:?}");
    assert!(!Value::from(keys.clone()).to_string().contains(&token1));

    // keys revoke, text and JSON.
    assert_eq!(ok(&f.c(&["keys", "revoke", "erp-sync", &key1])).await, format!("key {key1} of erp-sync revoked\n"));
    let v = ok_json(&f.k(&["keys", "revoke", "erp-sync", &key2])).await;
    assert_eq!(v, json!({"revoked": key2}));
    let keys = ok_json(&f.c(&["keys", "list", "erp-sync"])).await;
    assert!(keys.as_array().unwrap().iter().all(|k| k["revoked_at"].is_string()), "{keys}");

    // keys rotate, text and JSON: a new key now, the old one revoked at now + grace.
    let hmac_key = h["key"]["id"].as_str().unwrap().to_string();
    let text = ok(&f.c(&["keys", "rotate", "signer", &hmac_key, "--grace", "1h", "--label", "next"])).await;
    assert!(text.contains(&format!("; key {hmac_key} stops working at ")), "{text}");
    assert!(text.contains("\nnew credential (shown once, store it now): "), "{text}");
    let listed = ok_json(&f.c(&["keys", "list", "signer"])).await;
    let old = listed.as_array().unwrap().iter().find(|k| k["id"] == hmac_key.as_str()).unwrap().clone();
    let at = time::OffsetDateTime::parse(
        old["revoked_at"].as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap();
    let grace = at - time::OffsetDateTime::now_utc();
    assert!(grace > time::Duration::minutes(59) && grace <= time::Duration::hours(1), "revoked_at {at}");
    let newest = listed.as_array().unwrap().last().unwrap()["id"].as_str().unwrap().to_string();
    let v = ok_json(&f.k(&["keys", "rotate", "signer", &newest])).await;
    assert_eq!(v.as_object().unwrap().keys().collect::<Vec<_>>(), ["key", "secret"]);

    // users disable / enable / retire, text and JSON.
    assert_eq!(ok(&f.c(&["users", "disable", "erp-sync"])).await, "user erp-sync disabled\n");
    assert_eq!(ok_json(&f.k(&["users", "list", "--status", "inactive"])).await[0]["id"], "erp-sync");
    assert_eq!(ok_json(&f.c(&["users", "enable", "erp-sync"])).await["status"], "active");
    assert_eq!(ok(&f.k(&["users", "enable", "erp-sync"])).await, "user erp-sync enabled\n");
    assert_eq!(ok_json(&f.c(&["users", "disable", "erp-sync"])).await["status"], "inactive");
    assert_eq!(ok(&f.c(&["users", "retire", "erp-sync"])).await, "user erp-sync retired\n");
    assert_eq!(ok_json(&f.k(&["users", "retire", "erp-sync"])).await["status"], "retired");

    // users delete, roles delete: text and JSON.
    assert_eq!(ok(&f.c(&["users", "delete", "erp-sync"])).await, "user erp-sync deleted\n");
    assert_eq!(ok_json(&f.k(&["users", "delete", "signer"])).await, json!({"deleted": "signer"}));
    assert_eq!(ok(&f.c(&["roles", "delete", "reader"])).await, "role reader deleted\n");
    assert_eq!(ok_json(&f.k(&["roles", "delete", "writer"])).await, json!({"deleted": "writer"}));
    assert_eq!(ok_json(&f.c(&["users", "list"])).await, json!([]));

    // The file is valid all along: check-config passes on it.
    let out = run_cli(&["check-config", "--config", &f.config]).await;
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    assert_eq!(
        f.strays(&["gatehouse.yaml", "credentials.yaml", "credentials.yaml.lock", "master.key", "audit.log"]),
        Vec::<String>::new()
    );

    // Changes made through --config are recorded in its audit log, as `cli:<user>`.
    let audit = std::fs::read_to_string(&f.audit).unwrap();
    let records: Vec<Value> = audit.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let actions: Vec<&str> = records.iter().map(|r| r["action"].as_str().unwrap()).collect();
    assert_eq!(
        actions,
        [
            "roles set",
            "users create",
            "users update",
            "keys add",
            "keys revoke",
            "keys rotate",
            "users enable",
            "users retire",
            "users delete",
            "roles delete"
        ],
        "{audit}"
    );
    // `cli:<the user the process runs as>`, from its uid: not $USER, which anyone sets.
    let me = std::process::Command::new("id").arg("-un").output().unwrap();
    let me = format!("cli:{}", String::from_utf8(me.stdout).unwrap().trim());
    for r in &records {
        assert_eq!(r["kind"], "admin");
        assert_eq!(r["actor"], me.as_str(), "{r}");
    }
    assert!(!audit.contains(&token1) && !audit.contains("ghk_") && !audit.contains(h["secret"].as_str().unwrap()));
    let spoofed = run_cli_with(&[], &[("USER", "mallory")], &f.k(&["roles", "set", "spoof", "--rule", "GET /x"])).await;
    assert!(spoofed.status.success(), "{}", stderr(&spoofed));
    let audit = std::fs::read_to_string(&f.audit).unwrap();
    let last: Value = serde_json::from_str(audit.lines().last().unwrap()).unwrap();
    assert_eq!((last["action"].as_str(), last["actor"].as_str()), (Some("roles set"), Some(me.as_str())));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_failure_is_one_line_on_stderr_exit_1_and_changes_nothing() {
    let mut creds = Creds::new();
    let key = creds.api_user("svc");
    creds.api_user("gone");
    creds.set_status("gone", gatehouse::credentials::file::Status::Retired);
    let revoked = creds.add_api_key("svc");
    creds.revoke(&revoked.key_id);
    let w = write(&creds, None);
    let f = Files::of(&w);
    let before = f.text();

    let bad_id = format!("user id {:?} must match [a-z0-9][a-z0-9_.-]{{0,63}}", "Bad Id");
    let cases: Vec<(Vec<&str>, String)> = vec![
        (f.c(&["users", "show", "ghost"]), "gatehouse users show: no user \"ghost\"".into()),
        (
            f.c(&["users", "create", "svc", "--auth-method", "hmac"]),
            "gatehouse users create: user \"svc\" already exists".into(),
        ),
        (f.c(&["users", "create", "Bad Id", "--auth-method", "hmac"]), format!("gatehouse users create: {bad_id}")),
        (f.k(&["users", "update", "ghost", "--display-name", "x"]), "gatehouse users update: no user \"ghost\"".into()),
        (f.c(&["users", "disable", "ghost"]), "gatehouse users disable: no user \"ghost\"".into()),
        (
            f.c(&["users", "enable", "gone"]),
            "gatehouse users enable: user \"gone\" is retired; a retired user cannot be re-activated".into(),
        ),
        (
            f.c(&["users", "disable", "gone"]),
            "gatehouse users disable: user \"gone\" is retired; a retired user cannot be re-activated".into(),
        ),
        (f.k(&["users", "delete", "ghost"]), "gatehouse users delete: no user \"ghost\"".into()),
        (f.c(&["keys", "add", "ghost"]), "gatehouse keys add: no user \"ghost\"".into()),
        (
            f.c(&["keys", "add", "gone"]),
            "gatehouse keys add: user \"gone\" is retired; its keys are never accepted again".into(),
        ),
        (f.c(&["keys", "list", "ghost"]), "gatehouse keys list: no user \"ghost\"".into()),
        (
            f.k(&["keys", "revoke", "svc", "ak_nope"]),
            "gatehouse keys revoke: user \"svc\" has no key \"ak_nope\"".into(),
        ),
        (
            f.c(&["keys", "revoke", "svc", &revoked.key_id]),
            format!("gatehouse keys revoke: key \"{}\" is already revoked", revoked.key_id),
        ),
        (
            f.c(&["keys", "rotate", "svc", "ak_nope"]),
            "gatehouse keys rotate: user \"svc\" has no key \"ak_nope\"".into(),
        ),
        (f.c(&["roles", "delete", "all"]), "gatehouse roles delete: role \"all\" is still held by: svc, gone".into()),
        (f.k(&["roles", "delete", "nope"]), "gatehouse roles delete: no role \"nope\"".into()),
        (
            f.c(&["roles", "set", "bad name", "--rule", "GET /"]),
            "gatehouse roles set: role name \"bad name\" must be non-empty, without spaces or commas".into(),
        ),
    ];
    for (args, want) in &cases {
        for json in [false, true] {
            let mut a = args.clone();
            if json {
                a.push("--json");
            }
            assert_eq!(&fails(&a).await, want, "{a:?}");
        }
    }

    // Failures whose text comes from elsewhere (the validator, the duration parser, the
    // config loader): still one line, naming what is wrong.
    let contains: Vec<(Vec<&str>, &str)> = vec![
        (f.c(&["roles", "set", "bad", "--rule", "FETCH"]), "FETCH"),
        (f.c(&["users", "create", "n1", "--auth-method", "api-key", "--role", "no-such-role"]), "no-such-role"),
        (f.k(&["users", "update", "svc", "--team", "x", "--default-team", "y"]), "default_team"),
        (f.c(&["keys", "add", "svc", "--expires-in", "soon"]), "soon"),
        (f.c(&["keys", "rotate", "svc", &key.key_id, "--grace", "forever"]), "forever"),
        (vec!["users", "list", "--config", "/nonexistent/gatehouse.yaml"], "/nonexistent/gatehouse.yaml"),
    ];
    for (args, needle) in &contains {
        let line = fails(args).await;
        assert!(line.starts_with("gatehouse ") && line.contains(needle), "{args:?}: {line}");
    }

    // A config that names no credentials file.
    let bare = TestGateway::builder().write();
    let path = bare.path.display().to_string();
    let line = fails(&["users", "list", "--config", &path]).await;
    assert_eq!(line, format!("gatehouse users: {path} names no credentials file; pass --credentials PATH"));

    assert_eq!(f.text(), before, "a failed command changed the file");
}

/// GETs `/api/x` with `headers` until the status is `want` (the gateway reloads the file
/// on its own), failing after [`PICKUP`].
async fn until_status(gw: &TestGateway, headers: impl Fn() -> Vec<(&'static str, String)>, want: u16, what: &str) {
    let client = H1::new();
    within(PICKUP, what, async {
        loop {
            if client.get_with(&gw.url("/api/x"), &headers()).await.status == want {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_gateway_picks_up_each_cli_change_by_itself() {
    let up = TestUpstream::start().await;
    let mut creds = Creds::new();
    let svc = creds.api_user("svc");
    // The CLI edits the running gateway's own files.
    let gw = TestGateway::builder()
        .credentials(&creds)
        .route(RouteSpec::new("api", "/api/").to(&up).authenticated())
        .start()
        .await;
    let f = Files::of(gw.written());
    let key = |t: &str| {
        let t = t.to_string();
        move || vec![("x-api-key", t.clone())]
    };
    until_status(&gw, key(&svc.token), 200, "the existing key").await;

    // A new user with a key.
    ok(&f.k(&["users", "create", "cli-made", "--auth-method", "api-key", "--role", "all"])).await;
    let added = ok_json(&f.k(&["keys", "add", "cli-made"])).await;
    let token = added["token"].as_str().unwrap().to_string();
    until_status(&gw, key(&token), 200, "the CLI-added key to be accepted").await;
    assert_eq!(up.requests().pop().unwrap().header("x-gatehouse-user"), "cli-made");

    // Disable, enable, narrow by role, retire: each in force without a restart.
    ok(&f.c(&["users", "disable", "cli-made"])).await;
    until_status(&gw, key(&token), 401, "the disabled user to be refused").await;
    ok(&f.c(&["users", "enable", "cli-made"])).await;
    until_status(&gw, key(&token), 200, "the enabled user to be accepted").await;
    ok(&f.c(&["roles", "set", "narrow", "--rule", "GET /api/other"])).await;
    ok(&f.c(&["users", "update", "cli-made", "--role", "narrow"])).await;
    until_status(&gw, key(&token), 403, "the narrowed role to be in force").await;
    ok(&f.c(&["roles", "set", "narrow", "--rule", "GET /api/x"])).await;
    until_status(&gw, key(&token), 200, "the widened role to be in force").await;

    // Revoke: the key stops; the other user's key goes on working.
    let key_id = added["key"]["id"].as_str().unwrap().to_string();
    ok(&f.k(&["keys", "revoke", "cli-made", &key_id])).await;
    until_status(&gw, key(&token), 401, "the revoked key to be refused").await;
    until_status(&gw, key(&svc.token), 200, "the untouched key").await;

    // Rotation of an hmac user's secret, grace 0: the new secret works, the old one stops.
    ok(&f.c(&["users", "create", "signer", "--auth-method", "hmac", "--role", "all"])).await;
    let h = ok_json(&f.c(&["keys", "add", "signer"])).await;
    let old = HmacKey { key_id: h["key"]["id"].as_str().unwrap().into(), secret: h["secret"].as_str().unwrap().into() };
    let signed = |k: &HmacKey| {
        let k = k.clone();
        move || k.headers("GET", "/api/x", b"").into_iter().collect::<Vec<_>>()
    };
    until_status(&gw, signed(&old), 200, "the hmac key to be accepted").await;
    let r = ok_json(&f.c(&["keys", "rotate", "signer", &old.key_id])).await;
    let new = HmacKey { key_id: r["key"]["id"].as_str().unwrap().into(), secret: r["secret"].as_str().unwrap().into() };
    until_status(&gw, signed(&new), 200, "the rotated secret to be accepted").await;
    until_status(&gw, signed(&old), 401, "the old secret to be refused").await;

    // Delete the user: its keys are gone.
    ok(&f.k(&["users", "delete", "cli-made"])).await;
    until_status(&gw, key(&token), 401, "the deleted user's key").await;
    until_status(&gw, key(&svc.token), 200, "the untouched key").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_adding_50_keys_each_at_the_same_moment_lose_none() {
    let up = TestUpstream::start().await;
    let mut creds = Creds::new();
    creds.api_user("svc");
    let w = write(&creds, Some(&up));
    let f = std::sync::Arc::new(Files::of(&w));
    let start = std::sync::Arc::new(tokio::sync::Barrier::new(2));
    let mut writers = Vec::new();
    for w in 0..2 {
        let (f, start) = (f.clone(), start.clone());
        writers.push(tokio::spawn(async move {
            start.wait().await;
            let mut added = Vec::new();
            for i in 0..50 {
                let label = format!("w{w}-{i}");
                let v = ok_json(&f.c(&["keys", "add", "svc", "--label", &label])).await;
                added.push((v["key"]["id"].as_str().unwrap().to_string(), v["token"].as_str().unwrap().to_string()));
            }
            added
        }));
    }
    let mut added = Vec::new();
    for w in writers {
        added.extend(within(Duration::from_secs(300), "200 CLI runs", w).await.unwrap());
    }
    assert_eq!(added.len(), 100);

    // Every key is in the file (ids unique), the file is valid, and every token works.
    let listed = ok_json(&f.c(&["keys", "list", "svc"])).await;
    let ids: BTreeSet<String> = listed.as_array().unwrap().iter().map(|k| k["id"].as_str().unwrap().into()).collect();
    assert_eq!(ids.len(), 101, "keys in the file");
    for (id, _) in &added {
        assert!(ids.contains(id), "key {id} was lost");
    }
    let labels: BTreeSet<String> =
        listed.as_array().unwrap().iter().map(|k| k["label"].as_str().unwrap().into()).collect();
    for w in 0..2 {
        for i in 0..50 {
            assert!(labels.contains(&format!("w{w}-{i}")), "label w{w}-{i} missing");
        }
    }
    let out = run_cli(&["check-config", "--config", &f.config]).await;
    assert!(out.status.success(), "check-config: {}{}", stdout(&out), stderr(&out));
    let gw = TestGateway::builder()
        .credentials(&creds)
        .credentials_at(Path::new(&f.creds))
        .route(RouteSpec::new("api", "/api/").to(&up).authenticated())
        .start()
        .await;
    let client = H1::new();
    for (id, token) in &added {
        let res = client.get_with(&gw.url("/api/x"), &[("x-api-key", token)]).await;
        assert_eq!(res.status, 200, "key {id}: {}", res.text());
    }
    assert_eq!(up.count(), 100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_and_the_admin_api_writing_at_the_same_moment_lose_nothing() {
    let up = TestUpstream::start().await;
    let mut creds = Creds::new();
    creds.api_user("svc");
    let gw = TestGateway::builder()
        .credentials(&creds)
        .admin("admin-token-for-cli-race-0123456789")
        .route(RouteSpec::new("api", "/api/").to(&up).authenticated())
        .start()
        .await;
    let path = gw.written().credentials_path().display().to_string();
    let admin = gw.admin();
    let start = std::sync::Arc::new(tokio::sync::Barrier::new(2));
    let cli = {
        let (path, start) = (path.clone(), start.clone());
        tokio::spawn(async move {
            start.wait().await;
            for i in 0..25 {
                ok(&["keys", "add", "svc", "--label", &format!("cli-{i}"), "--credentials", &path]).await;
            }
        })
    };
    start.wait().await;
    for i in 0..25 {
        admin.expect(201, "POST", "/admin/v1/users/svc/keys", Some(&json!({"label": format!("api-{i}")}))).await;
    }
    within(Duration::from_secs(300), "the CLI writer", cli).await.unwrap();
    let labels: BTreeSet<String> = ok_json(&["keys", "list", "svc", "--credentials", &path])
        .await
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["label"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(labels.len(), 51, "{labels:?}");
    for i in 0..25 {
        assert!(labels.contains(&format!("cli-{i}")) && labels.contains(&format!("api-{i}")), "{labels:?}");
    }
    // The live snapshot has them all too once the last CLI write is picked up.
    within(PICKUP, "readyz to count 51 keys", async {
        loop {
            if admin.expect(200, "GET", "/readyz", None).await["keys"] == 51 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}

/// Runs one change per kind under `wrapper` and asserts each is refused with one line
/// containing `needle`; returns the lines.
async fn refused_under(wrapper: &[&str], f: &Files, key_id: &str, needle: &str) -> Vec<String> {
    let changes: Vec<Vec<&str>> = vec![
        f.c(&["keys", "add", "svc", "--label", "new"]),
        f.c(&["keys", "revoke", "svc", key_id]),
        f.c(&["users", "create", "newcomer", "--auth-method", "api-key"]),
        f.c(&["users", "disable", "svc"]),
        f.c(&["users", "update", "svc", "--organization", "elsewhere"]),
        f.c(&["roles", "set", "extra", "--rule", "GET /"]),
        f.k(&["users", "delete", "svc"]),
    ];
    let mut lines = Vec::new();
    for args in &changes {
        let out = run_cli_with(wrapper, &[], args).await;
        let line = one_line_failure(args, &out);
        assert!(line.contains(needle), "{args:?}: {line}");
        lines.push(line);
    }
    lines
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_directory_refuses_every_change_with_a_clear_error_and_keeps_the_file() {
    let up = TestUpstream::start().await;
    let mut creds = Creds::new();
    let svc = creds.api_user("svc");
    let w = write(&creds, Some(&up));
    let f = Files::of(&w);
    let before = f.text();
    let names_before = f.strays(&[]);
    let ro = ReadOnlyDir::new(&f.dir).unwrap_or_else(|why| panic!("{why}"));
    let lines = refused_under(&ro.wrapper(), &f, &svc.key_id, "is read-only here").await;
    for line in &lines {
        assert!(line.contains(&f.creds), "{}: the error names the file: {line}", ro.how);
        assert!(line.ends_with("change the source file and redeploy it (see docs/admin.md)"), "{line}");
    }
    // Reading still works under the same restriction.
    let args = f.c(&["users", "show", "svc", "--json"]);
    let out = run_cli_with(&ro.wrapper(), &[], &args).await;
    assert!(out.status.success(), "{}: {}", ro.how, stderr(&out));
    drop(ro);

    assert_eq!(f.text(), before, "the file changed");
    assert_eq!(f.strays(&[]), names_before, "a temp or lock file was left behind");
    // The file still loads, with svc's key working.
    let gw = TestGateway::builder()
        .credentials(&creds)
        .credentials_at(Path::new(&f.creds))
        .route(RouteSpec::new("api", "/api/").to(&up).authenticated())
        .start()
        .await;
    assert_eq!(H1::new().get_with(&gw.url("/api/x"), &[("x-api-key", &svc.token)]).await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_file_in_a_writable_directory_refuses_every_change_and_the_admin_api_says_read_only() {
    use std::os::unix::fs::PermissionsExt;
    let up = TestUpstream::start().await;
    let mut creds = Creds::new();
    let svc = creds.api_user("svc");
    let w = write(&creds, Some(&up));
    let f = Files::of(&w);
    std::fs::set_permissions(&f.creds, std::fs::Permissions::from_mode(0o444)).unwrap();
    let before = f.text();
    // chmod 0444 says "do not change this file" even to root, whom the kernel would let
    // replace it by rename: the mode is checked, not just the write.
    let lines = refused_under(&[], &f, &svc.key_id, "is read-only here").await;
    for line in &lines {
        assert!(line.contains(&f.creds) && line.contains("its mode grants no write permission"), "{line}");
    }
    assert_eq!(f.text(), before, "the file changed");
    assert_eq!(std::fs::metadata(&f.creds).unwrap().permissions().mode() & 0o777, 0o444);
    let out = run_cli(&f.c(&["users", "show", "svc", "--json"])).await;
    assert!(out.status.success(), "{}", stderr(&out));

    // The admin API of a gateway on the same file: 409 read_only, and the key still works.
    let gw = TestGateway::builder()
        .credentials(&creds)
        .credentials_at(Path::new(&f.creds))
        .admin("admin-test-token-0123456789abcdef")
        .route(RouteSpec::new("api", "/api/").to(&up).authenticated())
        .start()
        .await;
    let r = gw.admin().call("POST", "/admin/v1/users/svc/keys", Some(&json!({"label": "x"}))).await;
    assert_eq!(r.status, 409, "{}", r.text());
    assert_eq!(r.json()["code"], "read_only", "{}", r.text());
    assert_eq!(f.text(), before, "the admin API changed the file");
    assert_eq!(H1::new().get_with(&gw.url("/api/x"), &[("x-api-key", &svc.token)]).await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kubernetes_secret_layout_in_a_read_only_directory_refuses_every_change_and_keeps_the_symlinks() {
    let mut creds = Creds::new();
    let svc = creds.api_user("svc");
    let parent = tempfile::tempdir().unwrap();
    let kube = KubeletDir::create(parent.path(), "..2026_11_23_a", &creds.yaml());
    let w = TestGateway::builder().credentials(&creds).credentials_at(&kube.path()).write();
    let mut f = Files::of(&w);
    f.dir = kube.path().parent().unwrap().to_path_buf();
    let names_before = f.strays(&[]);
    let before = f.text();
    let ro = ReadOnlyDir::new(&f.dir).unwrap_or_else(|why| panic!("{why}"));
    let lines = refused_under(&ro.wrapper(), &f, &svc.key_id, "is read-only here").await;
    for line in &lines {
        assert!(line.contains(&f.dir.display().to_string()), "{}: {line}", ro.how);
    }
    drop(ro);
    assert_eq!(f.text(), before, "the file changed");
    assert_eq!(f.strays(&[]), names_before, "a file was left behind");
    // credentials.yaml is still kubelet's symlink into ..data.
    assert!(std::fs::symlink_metadata(&f.creds).unwrap().file_type().is_symlink(), "the symlink was replaced");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_every_change_with_an_error_and_keeps_the_file() {
    let mut creds = Creds::new();
    let svc = creds.api_user("svc");
    let w = write(&creds, None);
    let f = Files::of(&w);
    // The lock file exists already in real use; creating it (0 bytes) is allowed anyway.
    let before = f.text();
    let lines = refused_under(DISK_FULL, &f, &svc.key_id, "File too large").await;
    for line in &lines {
        assert!(line.contains(".credentials.yaml.tmp-"), "the error names the file it could not write: {line}");
    }
    assert_eq!(f.text(), before, "the file changed");
    assert_eq!(
        f.strays(&["gatehouse.yaml", "credentials.yaml", "credentials.yaml.lock", "master.key", "audit.log"]),
        Vec::<String>::new(),
        "a temp file was left behind"
    );
    // Without the limit the same change goes through.
    ok(&f.c(&["keys", "add", "svc"])).await;
    assert_ne!(f.text(), before);
}
