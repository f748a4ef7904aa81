//! API users in a real PostgreSQL shared by several gateways
//! (docs/credential-database.md): a change made through one gateway reaches the others
//! in about a second, a database that cannot be used stops start-up, a bad hand edit
//! is refused while the last good snapshot serves, and an outage keeps requests flowing
//! while writes are refused.

use crate::support::client::H1;
use crate::support::gateway::{GatewayConfig, RouteSpec};
use crate::support::postgres::{self, PgServer};
use crate::support::process::{GatewayProcess, run_cli, run_cli_with};
use crate::support::upstream::TestUpstream;
use crate::support::{STEP, assert_error, within};
use serde_json::{Value, json};
use std::time::{Duration, Instant};

const ADMIN: &str = "admin-test-token-0123456789abcdef";
const UNAVAILABLE: &str = "the credential database is unavailable: nothing was changed; gateways keep serving their last snapshot, retry later";

fn db_config(url: &str, up: &TestUpstream) -> GatewayConfig {
    GatewayConfig::new()
        .database(url)
        .admin(ADMIN)
        .route(RouteSpec::new("api", "/api/").to(up).authenticated())
        // Tests poll with real requests, refused ones among them: no limit may answer 429.
        .rate_limit(100_000, 100_000)
        .failed_per_ip_per_minute(1_000_000)
}

/// A role that permits everything and an api_key user `id` with it, through `gw`'s
/// admin API: the user's first key token.
async fn user_with_key(gw: &GatewayProcess, id: &str) -> (String, String) {
    let admin = gw.admin();
    let r = admin.call("PUT", "/admin/v1/roles", Some(&json!({"all": {"rules": ["* /**"]}}))).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = admin
        .call("POST", "/admin/v1/users", Some(&json!({"id": id, "auth_method": "api_key", "roles": ["all"]})))
        .await;
    assert_eq!(r.status, 201, "{}", r.text());
    add_key(gw, id).await
}

/// A new key of user `id`: (key id, token).
async fn add_key(gw: &GatewayProcess, id: &str) -> (String, String) {
    let r = gw.admin().call("POST", &format!("/admin/v1/users/{id}/keys"), Some(&json!({"label": "t"}))).await;
    assert_eq!(r.status, 201, "{}", r.text());
    let v = r.json();
    (v["key"]["id"].as_str().unwrap().to_string(), v["token"].as_str().unwrap().to_string())
}

async fn status_with(client: &H1, gw: &GatewayProcess, token: &str) -> u16 {
    client.get_with(&gw.url("/api/x"), &[("x-api-key", token)]).await.status.as_u16()
}

/// Polls until `gw` answers `want` for `token` (each poll is a real request).
async fn until_status(client: &H1, gw: &GatewayProcess, token: &str, want: u16) {
    within(STEP, &format!("gateway {} to answer {want}", gw.addr()), async {
        while status_with(client, gw, token).await != want {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    })
    .await;
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1]
}

/// Acceptance 1: three gateways on one database (migrated by `gatehouse db migrate`); a
/// key revoked through A's admin API is refused by B and C. Over 100 revocations the
/// time until both refuse is printed (p50, p99): figures for the docs, not assertions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_revoked_through_one_gateway_is_refused_by_the_others() {
    let up = TestUpstream::start().await;
    let url = postgres::fresh_database("revoke").await;
    let config = db_config(&url, &up);
    let written = config.write();
    let path = written.path.display().to_string();
    let out = run_cli(&["db", "migrate", "--config", &path]).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("applied migration(s) 1, 2; schema at version 2"), "{out:?}");
    let again = run_cli(&["db", "migrate", "--config", &path]).await;
    assert!(String::from_utf8_lossy(&again.stdout).contains("schema already at version 2"), "{again:?}");

    let a = GatewayProcess::serve_written(written, &[], &[]).await;
    let b = GatewayProcess::serve(&config).await;
    let c = GatewayProcess::serve(&config).await;
    let client = H1::new();
    let (_, first) = user_with_key(&a, "erp").await;
    for gw in [&a, &b, &c] {
        until_status(&client, gw, &first, 200).await;
    }

    let mut keys = Vec::new();
    for _ in 0..100 {
        keys.push(add_key(&a, "erp").await);
    }
    for (_, token) in &keys {
        for gw in [&b, &c] {
            until_status(&client, gw, token, 200).await;
        }
    }
    let mut took = Vec::new();
    for (key_id, token) in &keys {
        let started = Instant::now();
        let r = a.admin().call("DELETE", &format!("/admin/v1/users/erp/keys/{key_id}"), None).await;
        assert_eq!(r.status, 200, "{}", r.text());
        // The writing gateway has it in force before it answers.
        assert_eq!(status_with(&client, &a, token).await, 401);
        let (mut b_done, mut c_done) = (false, false);
        within(STEP, "B and C to refuse a revoked key", async {
            while !(b_done && c_done) {
                b_done = b_done || status_with(&client, &b, token).await == 401;
                c_done = c_done || status_with(&client, &c, token).await == 401;
            }
        })
        .await;
        took.push(started.elapsed());
    }
    took.sort();
    println!(
        "revocation reached B and C: p50 {:?}, p99 {:?}, max {:?} over {} revocations",
        percentile(&took, 0.5),
        percentile(&took, 0.99),
        took[took.len() - 1],
        took.len()
    );
    // The first key was never revoked: still served everywhere.
    for gw in [&a, &b, &c] {
        assert_eq!(status_with(&client, gw, &first).await, 200);
    }
    // Each change's audit record is in the database, in the change's transaction.
    let db = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(db.1);
    let n: i64 =
        db.0.query_one("SELECT count(*) FROM gatehouse_admin_audit WHERE record->>'action' = 'key.revoke'", &[])
            .await
            .unwrap()
            .get(0);
    assert_eq!(n, 100);
}

/// A wrong password, nothing at the address, a schema not migrated and one newer than
/// the binary: `check-config` and `serve` exit 78 with the reason (never the password)
/// and nothing listens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_that_cannot_be_used_stops_start_up_with_the_reason() {
    let port = postgres::shared().await;
    let url = postgres::fresh_database("startup").await;
    let db_name = url.rsplit('/').next().unwrap().split('?').next().unwrap().to_string();
    let ahead = postgres::fresh_database("ahead").await;
    let dir = tempfile::tempdir().unwrap();
    let listen = crate::support::free_port();
    let closed = crate::support::free_port();
    let config = |credentials: &str| {
        let yaml = format!(
            "listeners:\n  - address: 127.0.0.1:{listen}\ncredentials: \"{credentials}\"\ncredentials_password_env: GH_TEST_DB_PASSWORD\nmaster_key: {}\nroutes: []\n",
            dir.path().join("master.key").display()
        );
        let path = dir.path().join("gatehouse.yaml");
        std::fs::write(&path, yaml).unwrap();
        path.display().to_string()
    };
    let right = [("GH_TEST_DB_PASSWORD", postgres::PASSWORD)];
    let wrong = [("GH_TEST_DB_PASSWORD", "a-wrong-password-for-the-db")];
    // A schema from a newer gatehouse.
    let newer = tokio_postgres::connect(&ahead, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(newer.1);
    newer
        .0
        .batch_execute("CREATE TABLE gatehouse_schema (version integer PRIMARY KEY, description text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now()); INSERT INTO gatehouse_schema VALUES (99, 'from the future')")
        .await
        .unwrap();
    let ahead_name = ahead.rsplit('/').next().unwrap().split('?').next().unwrap().to_string();
    let cases = [
        (
            format!("postgres://{}@127.0.0.1:{port}/{db_name}?sslmode=disable", postgres::USER),
            &wrong,
            "password authentication failed",
        ),
        (
            format!("postgres://{}@127.0.0.1:{closed}/{db_name}?sslmode=disable", postgres::USER),
            &right,
            "onnection refused",
        ),
        (
            format!("postgres://{}@127.0.0.1:{port}/{db_name}?sslmode=disable", postgres::USER),
            &right,
            "schema version 0, this gatehouse needs 2: run `gatehouse db migrate`",
        ),
        (
            format!("postgres://{}@127.0.0.1:{port}/{ahead_name}?sslmode=disable", postgres::USER),
            &right,
            "schema version 99 is newer than this gatehouse knows (2): a downgrade is not supported",
        ),
    ];
    for (db, env, reason) in cases {
        let path = config(&db);
        for command in ["check-config", "serve"] {
            let out = run_cli_with(&[], env.as_slice(), &["--log-format", "json", command, "--config", &path]).await;
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(78), "{command} with {db}:\n{stderr}");
            assert!(stderr.contains(reason), "{command} with {db}: no {reason:?} in:\n{stderr}");
            assert!(
                !stderr.contains("a-wrong-password") && !stderr.contains(postgres::PASSWORD),
                "a password is in:\n{stderr}"
            );
            assert!(!stderr.contains("\"listening\""), "{command} listened:\n{stderr}");
        }
        assert!(crate::support::connection_refused(std::net::SocketAddr::from(([127, 0, 0, 1], listen))).await);
    }
    // `db migrate` refuses the newer schema too, and leaves it as it was.
    let path = config(&format!("postgres://{}@127.0.0.1:{port}/{ahead_name}?sslmode=disable", postgres::USER));
    let out = run_cli_with(&[], &right, &["db", "migrate", "--config", &path]).await;
    assert_eq!(out.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&out.stderr).contains("a downgrade is not supported"), "{out:?}");
    let v: i32 = newer.0.query_one("SELECT max(version) FROM gatehouse_schema", &[]).await.unwrap().get(0);
    assert_eq!(v, 99);
    // Migrated, the same configuration starts.
    let path = config(&format!("postgres://{}@127.0.0.1:{port}/{db_name}?sslmode=disable", postgres::USER));
    let out = run_cli_with(&[], &right, &["db", "migrate", "--config", &path]).await;
    assert!(out.status.success(), "{out:?}");
    let out = run_cli_with(&[], &right, &["check-config", "--config", &path]).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("ok (0 user(s), 0 key(s))"), "{out:?}");
}

/// A hand edit that does not validate (a user given a role that does not exist) is
/// refused by every gateway with the row named; the last good snapshot keeps serving
/// and a later fix applies. Killing the LISTEN connection loses no change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_hand_edit_is_refused_and_a_killed_listen_connection_loses_nothing() {
    let up = TestUpstream::start().await;
    let url = postgres::fresh_database("handedit").await;
    let config = db_config(&url, &up).database_setting("credentials_auto_migrate", "true");
    let a = GatewayProcess::serve(&config).await;
    let b = GatewayProcess::serve(&config).await;
    let client = H1::new();
    let (_, token) = user_with_key(&a, "erp").await;
    until_status(&client, &b, &token, 200).await;

    let (db, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    db.batch_execute("UPDATE gatehouse_users SET roles = '{no-such-role}' WHERE id = 'erp'").await.unwrap();
    for gw in [&a, &b] {
        gw.logged("credential database change refused: it does not validate; the previous credentials stay in force until the rows named are fixed", 1).await;
        let refused = gw.logged_lines("credential database change refused: it does not validate; the previous credentials stay in force until the rows named are fixed");
        assert!(
            refused[0]["error"].as_str().unwrap().contains("user \"erp\": unknown role \"no-such-role\""),
            "{refused:?}"
        );
        assert_eq!(status_with(&client, gw, &token).await, 200, "the last good snapshot stopped serving");
    }
    // Fixed by hand: the change applies (the user's role is back, a disable follows).
    db.batch_execute("UPDATE gatehouse_users SET roles = '{all}', status = 'inactive' WHERE id = 'erp'").await.unwrap();
    for gw in [&a, &b] {
        until_status(&client, gw, &token, 401).await;
    }

    // The LISTEN connections killed: the next change still arrives.
    let killed: i64 = db
        .query_one("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE query LIKE 'LISTEN gatehouse_credentials%'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(killed, 2, "one LISTEN connection per gateway");
    let r = a.admin().call("PATCH", "/admin/v1/users/erp", Some(&json!({"status": "active"}))).await;
    assert_eq!(r.status, 200, "{}", r.text());
    for gw in [&a, &b] {
        until_status(&client, gw, &token, 200).await;
    }
}

/// Acceptance 3: the database stopped during traffic: requests are served from the
/// snapshot, admin writes get 503 `credential_store_unavailable`, the metrics say the
/// store is down; started again, a write made afterwards reaches every gateway.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_outage_keeps_requests_flowing_and_refuses_writes() {
    let mut server = PgServer::start().await;
    server.create_database("outage").await;
    let up = TestUpstream::start().await;
    let config = db_config(&server.url("outage"), &up).database_setting("credentials_auto_migrate", "true");
    let a = GatewayProcess::serve(&config).await;
    let b = GatewayProcess::serve(&config).await;
    let client = H1::new();
    let (key_id, token) = user_with_key(&a, "erp").await;
    until_status(&client, &b, &token, 200).await;

    server.stop().await;
    for _ in 0..20 {
        for gw in [&a, &b] {
            assert_eq!(status_with(&client, gw, &token).await, 200);
        }
    }
    let r = a.admin().call("DELETE", &format!("/admin/v1/users/erp/keys/{key_id}"), None).await;
    assert_error(&r, 503, "credential_store_unavailable", UNAVAILABLE);
    assert_eq!(status_with(&client, &a, &token).await, 200, "a refused write changed the snapshot");
    for gw in [&a, &b] {
        within(STEP, "the store to be reported down", async {
            while !gw.admin().get("/metrics").await.text().contains("gatehouse_credential_store_up 0") {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
        assert_eq!(gw.admin().get("/readyz").await.status, 200, "a loaded snapshot keeps the gateway ready");
    }

    server.start_again().await;
    let revoke = async {
        loop {
            let r = a.admin().call("DELETE", &format!("/admin/v1/users/erp/keys/{key_id}"), None).await;
            if r.status == 200 {
                return;
            }
            assert_error(&r, 503, "credential_store_unavailable", UNAVAILABLE);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    within(STEP, "a write once the database is back", revoke).await;
    for gw in [&a, &b] {
        until_status(&client, gw, &token, 401).await;
        within(STEP, "the store to be reported up", async {
            while !gw.admin().get("/metrics").await.text().contains("gatehouse_credential_store_up 1") {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
    }
}

/// The CLI manages users in the database as in a file, and each change it makes is
/// recorded in the database's admin audit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_manages_users_in_the_database() {
    let up = TestUpstream::start().await;
    let url = postgres::fresh_database("cli").await;
    let config = db_config(&url, &up).database_setting("credentials_auto_migrate", "true");
    let gw = GatewayProcess::serve(&config).await;
    let path = gw.written().path.display().to_string();
    let cli = |args: &[&str]| {
        let mut all: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        all.extend(["--config".to_string(), path.clone(), "--json".to_string()]);
        async move {
            let all: Vec<&str> = all.iter().map(String::as_str).collect();
            let out = run_cli(&all).await;
            assert!(out.status.success(), "{all:?}: {}", String::from_utf8_lossy(&out.stderr));
            serde_json::from_slice::<Value>(&out.stdout).unwrap_or(Value::Null)
        }
    };
    cli(&["roles", "set", "all", "--rule", "* /**"]).await;
    cli(&["users", "create", "batch", "--auth-method", "api-key", "--role", "all"]).await;
    let key = cli(&["keys", "add", "batch", "--label", "cli"]).await;
    let token = key["token"].as_str().unwrap().to_string();
    let client = H1::new();
    until_status(&client, &gw, &token, 200).await;
    let listed = cli(&["users", "list"]).await;
    assert_eq!(listed[0]["id"], "batch", "{listed}");
    let (db, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    let actions: Vec<String> = db
        .query("SELECT record->>'action' FROM gatehouse_admin_audit ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(actions.len(), 3, "{actions:?}");
}

/// Acceptance 2, in both stores: 100 admin clients update one user with the `If-Match`
/// of the same read: exactly one succeeds, the 99 others get 412
/// `precondition_failed` and change nothing; the user holds the winner's update. A
/// stale `If-Match` on a key revocation and on the roles is refused the same way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_updates_with_if_match_lose_nothing_in_either_store() {
    let up = TestUpstream::start().await;
    let url = postgres::fresh_database("ifmatch").await;
    let in_db = db_config(&url, &up).database_setting("credentials_auto_migrate", "true");
    let in_file = GatewayConfig::new()
        .credentials(&crate::support::creds::Creds::new())
        .admin(ADMIN)
        .route(RouteSpec::new("api", "/api/").to(&up).authenticated());
    for (store, config) in [("database", in_db), ("file", in_file)] {
        let gw = GatewayProcess::serve(&config).await;
        let (key_id, _) = user_with_key(&gw, "erp").await;
        let admin = gw.admin();
        let read = admin.get("/admin/v1/users/erp").await;
        assert_eq!(read.status, 200, "{store}: {}", read.text());
        let tag = read.header("etag").to_string();
        assert!(tag.starts_with('"') && tag.len() > 2, "{store}: ETag {tag:?}");

        let attempts = (0..100).map(|i| {
            let (gw, tag) = (&gw, tag.clone());
            async move {
                let admin = gw.admin();
                let body = json!({"description": format!("writer {i}")}).to_string();
                let r = admin
                    .raw(
                        "PATCH",
                        "/admin/v1/users/erp",
                        &[("content-type", "application/json"), ("if-match", &tag)],
                        body,
                    )
                    .await;
                (i, r)
            }
        });
        let results = futures_util::future::join_all(attempts).await;
        let winners: Vec<usize> = results.iter().filter(|(_, r)| r.status == 200).map(|(i, _)| *i).collect();
        assert_eq!(winners.len(), 1, "{store}: {} updates succeeded with one ETag", winners.len());
        for (_, r) in results.iter().filter(|(_, r)| r.status != 200) {
            assert_eq!(r.status, 412, "{store}: {}", r.text());
            assert_eq!(r.json()["code"], "precondition_failed", "{store}: {}", r.text());
        }
        let now = admin.get("/admin/v1/users/erp").await;
        assert_eq!(now.json()["description"], format!("writer {}", winners[0]), "{store}: a lost or extra update");
        let winner = results.iter().find(|(i, _)| *i == winners[0]).unwrap();
        assert_eq!(winner.1.header("etag"), now.header("etag"), "{store}: the write's ETag is the read's");

        // A stale tag on a revocation: refused, the key still works.
        let r = admin.raw("DELETE", &format!("/admin/v1/users/erp/keys/{key_id}"), &[("if-match", &tag)], "").await;
        assert_eq!(r.status, 412, "{store}: {}", r.text());
        let shown = admin.get("/admin/v1/users/erp").await.json();
        assert!(shown["keys"][0]["revoked_at"].is_null(), "{store}: {shown}");
        // Roles: a stale tag is refused, the current one (or none) passes.
        let roles = admin.get("/admin/v1/roles").await;
        let roles_tag = roles.header("etag").to_string();
        let set = json!({"all": {"rules": ["* /**"]}, "ro": {"rules": ["GET /**"]}}).to_string();
        let r = admin
            .raw(
                "PUT",
                "/admin/v1/roles",
                &[("content-type", "application/json"), ("if-match", "\"stale\"")],
                set.clone(),
            )
            .await;
        assert_eq!(r.status, 412, "{store}: {}", r.text());
        let r = admin
            .raw("PUT", "/admin/v1/roles", &[("content-type", "application/json"), ("if-match", &roles_tag)], set)
            .await;
        assert_eq!(r.status, 200, "{store}: {}", r.text());
        assert_ne!(r.header("etag"), roles_tag, "{store}");
    }
}

/// Acceptance 4: a store exported from a file, imported into an empty database and
/// exported again gives the same bytes; `--dry-run` prints the difference and changes
/// nothing; the imported users authenticate at once (api_key and hmac alike).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_import_export_is_byte_identical() {
    use crate::support::creds::Creds;
    let up = TestUpstream::start().await;
    let mut creds = Creds::new();
    let erp = creds.api_user("erp");
    let spare = creds.add_api_key("erp");
    creds.revoke(&spare.key_id);
    let signer = creds.hmac_user("signer");
    creds.api_user("mobile");
    creds.user("mobile").description = "the \"mobile\" app: <script>, ünïcode".into();
    creds.user("mobile").rate_limit =
        Some(gatehouse::credentials::file::spanned(gatehouse::credentials::file::FileRateLimit {
            per_second: 7,
            burst: 9,
        }));
    let url = postgres::fresh_database("export").await;
    let config = db_config(&url, &up).credentials(&creds).database_setting("credentials_auto_migrate", "true");
    let gw = GatewayProcess::serve(&config).await;
    let dir = gw.written().dir.path().to_path_buf();
    let config_path = gw.written().path.display().to_string();
    let file = dir.join("credentials.yaml").display().to_string();
    let master = dir.join("master.key").display().to_string();

    // The file store's export.
    let out = run_cli(&["credentials", "export", "--credentials", &file, "--master-key", &master]).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let from_file = out.stdout;
    let exported = dir.join("exported.yaml");
    std::fs::write(&exported, &from_file).unwrap();
    let exported = exported.display().to_string();

    // A dry run against the empty database: everything would be added, nothing is.
    let out = run_cli(&["credentials", "import", &exported, "--dry-run", "--json", "--config", &config_path]).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let diff: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(diff["users"]["added"], json!(["erp", "mobile", "signer"]), "{diff}");
    assert_eq!(diff["roles"]["added"].as_array().unwrap().len(), 1, "{diff}");
    let client = H1::new();
    assert_eq!(status_with(&client, &gw, &erp.token).await, 401, "a dry run imported");

    let out = run_cli(&["credentials", "import", &exported, "--config", &config_path]).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = run_cli(&["credentials", "export", "--config", &config_path]).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&from_file),
        "export differs after import"
    );
    // And --to writes the same bytes, mode 0600.
    let to = dir.join("again.yaml");
    let out = run_cli(&["credentials", "export", "--to", &to.display().to_string(), "--config", &config_path]).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(std::fs::read(&to).unwrap(), from_file);
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&to).unwrap().permissions().mode() & 0o777, 0o600);

    // In force on the gateway: the api key, the revoked key refused, a signature.
    until_status(&client, &gw, &erp.token, 200).await;
    assert_eq!(status_with(&client, &gw, &spare.token).await, 401);
    let r = client.request("GET", &gw.url("/api/s"), &signer.headers("GET", "/api/s", b""), Vec::new()).await;
    assert_eq!(r.status, 200, "{}", r.text());
    // Importing the same file again changes nothing.
    let out = run_cli(&["credentials", "import", &exported, "--dry-run", "--json", "--config", &config_path]).await;
    let diff: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(diff["users"], json!({"added": [], "removed": [], "changed": []}), "{diff}");
}

/// Two CLI processes adding 25 keys each to one user of the database at the same moment
/// lose none (each write is a transaction behind the store's revision lock), and every
/// key works at once on a running gateway.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_cli_processes_adding_keys_at_once_lose_none() {
    let up = TestUpstream::start().await;
    let url = postgres::fresh_database("clirace").await;
    let config = db_config(&url, &up).database_setting("credentials_auto_migrate", "true");
    let gw = GatewayProcess::serve(&config).await;
    user_with_key(&gw, "svc").await;
    let path = gw.written().path.display().to_string();
    let start = std::sync::Arc::new(tokio::sync::Barrier::new(2));
    let mut writers = Vec::new();
    for w in 0..2 {
        let (path, start) = (path.clone(), start.clone());
        writers.push(tokio::spawn(async move {
            start.wait().await;
            let mut added = Vec::new();
            for i in 0..25 {
                let label = format!("w{w}-{i}");
                let out = run_cli(&["keys", "add", "svc", "--label", &label, "--json", "--config", &path]).await;
                assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
                let v: Value = serde_json::from_slice(&out.stdout).unwrap();
                added.push(v["token"].as_str().unwrap().to_string());
            }
            added
        }));
    }
    let mut tokens = Vec::new();
    for w in writers {
        tokens.extend(within(Duration::from_secs(300), "50 CLI runs", w).await.unwrap());
    }
    let listed = gw.admin().get("/admin/v1/users/svc").await.json();
    assert_eq!(listed["keys"].as_array().unwrap().len(), 51, "{listed}");
    let client = H1::new();
    for token in &tokens {
        until_status(&client, &gw, token, 200).await;
    }
}

/// `sslmode=verify-full` with the private CA that signed the server's certificate
/// (`sslrootcert=`): the gateway works over TLS (PostgreSQL's own view says so). Another
/// CA, a server without TLS, and `sslmode=prefer` (which could fall back to plain text)
/// each stop start-up with exit 78 and the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_database_over_tls_is_verified() {
    let dir = tempfile::tempdir().unwrap();
    let cert = rcgen::generate_simple_self_signed(vec!["127.0.0.1".into()]).unwrap();
    let other = rcgen::generate_simple_self_signed(vec!["127.0.0.1".into()]).unwrap();
    let (ca, wrong_ca) = (dir.path().join("ca.pem"), dir.path().join("other.pem"));
    std::fs::write(&ca, cert.cert.pem()).unwrap();
    std::fs::write(&wrong_ca, other.cert.pem()).unwrap();
    let server = PgServer::start_tls(&cert.cert.pem(), &cert.signing_key.serialize_pem()).await;
    server.create_database("tls").await;
    let url = |mode: &str, root: &std::path::Path| {
        format!(
            "postgres://{}:{}@127.0.0.1:{}/tls?sslmode={mode}&sslrootcert={}",
            postgres::USER,
            postgres::PASSWORD,
            server.port,
            root.display()
        )
    };
    let up = TestUpstream::start().await;
    let config = db_config(&url("verify-full", &ca), &up).database_setting("credentials_auto_migrate", "true");
    let gw = GatewayProcess::serve(&config).await;
    let client = H1::new();
    let (_, token) = user_with_key(&gw, "erp").await;
    until_status(&client, &gw, &token, 200).await;
    // The pool's connection and the LISTEN one (which may still be opening): both TLS.
    let db = server.client("tls").await;
    let (mut connections, mut all_tls) = (0, false);
    within(STEP, "the gateway's two connections", async {
        while connections < 2 {
            let row = db
                .query_one(
                    "SELECT count(*), coalesce(bool_and(s.ssl), false) FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) WHERE a.application_name = 'gatehouse'",
                    &[],
                )
                .await
                .unwrap();
            (connections, all_tls) = (row.get::<_, i64>(0), row.get(1));
            assert!(all_tls, "{connections} gateway connections, not all over TLS");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;

    let plain = postgres::fresh_database("notls").await.replace("sslmode=disable", "sslmode=verify-full");
    let cases = [
        (url("verify-full", &wrong_ca), "invalid peer certificate"),
        (format!("{plain}&sslrootcert={}", ca.display()), "server does not support TLS"),
        (url("prefer", &ca), "sslmode=prefer is not supported"),
    ];
    for (db_url, reason) in cases {
        let written = db_config(&db_url, &up).write();
        let out = run_cli(&["check-config", "--config", &written.path.display().to_string()]).await;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(78), "{db_url}: {stderr}");
        assert!(stderr.contains(reason), "{db_url}: no {reason:?} in {stderr}");
        assert!(!stderr.contains(postgres::PASSWORD), "the password is in {stderr}");
    }
}

/// Acceptance 4, the CLI: one script of commands (successes and failures, text and
/// JSON) run against a credentials file and against a database gives the same exit
/// codes and the same output, once generated values (key ids, tokens, secrets, hints,
/// times) are masked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_behaves_the_same_on_a_file_and_on_a_database() {
    use crate::support::creds::Creds;
    let up = TestUpstream::start().await;
    let url = postgres::fresh_database("cliparity").await;
    let on_file = GatewayConfig::new().credentials(&Creds::new()).write();
    let on_db = db_config(&url, &up).database_setting("credentials_auto_migrate", "true").write();
    let out = run_cli(&["db", "migrate", "--config", &on_db.path.display().to_string()]).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let mut transcripts = Vec::new();
    for written in [&on_file, &on_db] {
        let config = written.path.display().to_string();
        let mut transcript = Vec::new();
        let mut last_key = String::new();
        let script: Vec<Vec<String>> = vec![
            vec!["roles", "set", "all", "--rule", "* /**", "--json"],
            vec!["roles", "set", "ro", "--rule", "GET /**", "--description", "read only"],
            vec![
                "users",
                "create",
                "erp",
                "--auth-method",
                "api-key",
                "--role",
                "all",
                "--organization",
                "acme",
                "--json",
            ],
            vec!["users", "create", "signer", "--auth-method", "hmac", "--role", "ro", "--team", "ops"],
            vec!["users", "create", "erp", "--auth-method", "hmac"],
            vec!["keys", "add", "erp", "--label", "first", "--json"],
            vec!["keys", "add", "signer", "--label", "sig", "--json"],
            vec!["users", "update", "erp", "--description", "nightly <sync>", "--rate-limit", "5/10", "--json"],
            vec!["users", "disable", "erp"],
            vec!["users", "enable", "erp", "--json"],
            vec!["keys", "list", "erp", "--json"],
            vec!["keys", "revoke", "erp", "LAST_KEY", "--json"],
            vec!["keys", "revoke", "erp", "LAST_KEY"],
            vec!["keys", "revoke", "erp", "ak_ghost"],
            vec!["roles", "delete", "all"],
            vec!["users", "retire", "signer", "--json"],
            vec!["users", "enable", "signer"],
            vec!["keys", "add", "signer"],
            vec!["users", "show", "ghost"],
            vec!["users", "list", "--json"],
            vec!["users", "show", "erp"],
            vec!["roles", "list", "--json"],
            vec!["users", "delete", "erp", "--json"],
            vec!["roles", "delete", "all"],
            vec!["users", "list"],
        ]
        .into_iter()
        .map(|c| c.into_iter().map(String::from).collect())
        .collect();
        for command in script {
            let mut args: Vec<String> =
                command.iter().map(|a| if a == "LAST_KEY" { last_key.clone() } else { a.clone() }).collect();
            args.extend(["--config".to_string(), config.clone()]);
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let out = run_cli(&args).await;
            let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
            if let Some(id) =
                serde_json::from_str::<Value>(&stdout).ok().and_then(|v| v["key"]["id"].as_str().map(String::from))
            {
                last_key = id;
            }
            transcript.push(format!(
                "$ {}\nexit {:?}\n{}{}",
                command.join(" "),
                out.status.code(),
                mask(&stdout),
                mask(&String::from_utf8_lossy(&out.stderr))
            ));
        }
        transcripts.push(transcript);
    }
    for (file, db) in transcripts[0].iter().zip(&transcripts[1]) {
        assert_eq!(file, db, "the file and the database differ");
    }
    // And the script did what it says (not, say, fail alike at every step).
    let db = transcripts[1].join("\n");
    let ok = transcripts[1].iter().filter(|t| t.contains("\nexit Some(0)\n")).count();
    assert_eq!(ok, 17, "{db}");
    for expected in ["already exists", "nightly <sync>", "\"per_second\": 5", "ak_ghost", "retired"] {
        assert!(db.contains(expected), "no {expected:?} in:\n{db}");
    }
}

/// Masks what each store generates anew: key ids, tokens, secrets, their hints, times.
fn mask(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for word in text.split_inclusive(|c: char| c.is_whitespace() || c == '"' || c == ',') {
        let (body, end) = match word.char_indices().last() {
            Some((i, c)) if c.is_whitespace() || c == '"' || c == ',' => (&word[..i], &word[i..]),
            _ => (word, ""),
        };
        let generated = ["ak_", "hk_", "ghk_", "ghs_"].iter().any(|p| body.starts_with(p))
            || (body.len() >= 20 && body.as_bytes().get(4) == Some(&b'-') && body.contains('T') && body.ends_with('Z'));
        out.push_str(if generated { "<generated>" } else { body });
        out.push_str(end);
    }
    out
}

/// `gatehouse master-key rotate` with the database: every sealed secret is re-sealed in
/// one transaction under a new key (the rows change, the key file holds only the new
/// key), clients keep signing with the same secret, and the gateway applies the
/// re-sealed rows with the new key file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_master_key_rotates_with_the_database() {
    let up = TestUpstream::start().await;
    let url = postgres::fresh_database("rotate").await;
    let config = db_config(&url, &up).database_setting("credentials_auto_migrate", "true");
    let gw = GatewayProcess::serve(&config).await;
    let admin = gw.admin();
    let r = admin.call("PUT", "/admin/v1/roles", Some(&json!({"all": {"rules": ["* /**"]}}))).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = admin
        .call("POST", "/admin/v1/users", Some(&json!({"id": "signer", "auth_method": "hmac", "roles": ["all"]})))
        .await;
    assert_eq!(r.status, 201, "{}", r.text());
    let r = admin.call("POST", "/admin/v1/users/signer/keys", Some(&json!({"label": "s"}))).await;
    assert_eq!(r.status, 201, "{}", r.text());
    let v = r.json();
    let key = crate::support::creds::HmacKey {
        key_id: v["key"]["id"].as_str().unwrap().to_string(),
        secret: v["secret"].as_str().unwrap().to_string(),
    };
    let client = H1::new();
    let signed = async |path: &str| {
        client.request("GET", &gw.url(path), &key.headers("GET", path, b""), Vec::new()).await.status.as_u16()
    };
    assert_eq!(signed("/api/before").await, 200);
    let revision = async || {
        let m = gw.admin().get("/metrics").await.text();
        let line = m.lines().find(|l| l.starts_with("gatehouse_credential_store_revision ")).unwrap().to_string();
        line.rsplit(' ').next().unwrap().parse::<i64>().unwrap()
    };
    let revision_before = revision().await;
    let (db, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    let sealed =
        || async { db.query_one("SELECT secret_sealed FROM gatehouse_keys", &[]).await.unwrap().get::<_, String>(0) };
    let before = sealed().await;
    let key_file = gw.written().dir.path().join("master.key");
    let old_key = std::fs::read_to_string(&key_file).unwrap();

    let config_path = gw.written().path.display().to_string();
    let out = run_cli(&["master-key", "rotate", "--json", "--config", &config_path]).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["resealed_secrets"], 1, "{v}");
    assert_ne!(sealed().await, before, "the row was not re-sealed");
    let new_key = std::fs::read_to_string(&key_file).unwrap();
    assert_ne!(new_key, old_key);
    assert_eq!(new_key.lines().filter(|l| !l.trim().is_empty() && !l.starts_with('#')).count(), 1, "{new_key}");
    // The gateway applies the re-sealed rows (its revision moves, no reload fails) and
    // the client's secret still signs.
    within(STEP, "the re-sealed rows in force", async {
        while revision().await <= revision_before {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(gw.admin().get("/metrics").await.text().contains("gatehouse_credentials_reload_failing 0"));
    assert_eq!(signed("/api/after").await, 200);
}

/// A database of schema version 1 (as the previous release left it, with a user in it)
/// is upgraded by `db migrate` to version 2 with migration 2 only, its rows kept; until
/// then `check-config` refuses it with the command to run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_1_database_is_upgraded_by_migration_2_only() {
    let url = postgres::fresh_database("v1").await;
    let (db, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    db.batch_execute(
        "CREATE TABLE gatehouse_schema (version integer PRIMARY KEY, description text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now());
         INSERT INTO gatehouse_schema (version, description) VALUES (1, 'credential store');",
    )
    .await
    .unwrap();
    db.batch_execute(include_str!("../../src/credentials/db/migrations/0001_init.sql")).await.unwrap();
    db.batch_execute(
        "INSERT INTO gatehouse_users (id, status, auth_method, created_at, updated_at) VALUES ('kept', 'active', 'api_key', now(), now())",
    )
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gatehouse.yaml");
    std::fs::write(
        &path,
        format!(
            "listeners:\n  - address: 127.0.0.1:0\ncredentials: \"{url}\"\nmaster_key: {}\nroutes: []\n",
            dir.path().join("master.key").display()
        ),
    )
    .unwrap();
    let path = path.display().to_string();
    let before = run_cli(&["check-config", "--config", &path]).await;
    assert_eq!(before.status.code(), Some(78));
    assert!(
        String::from_utf8_lossy(&before.stderr)
            .contains("schema version 1, this gatehouse needs 2: run `gatehouse db migrate`"),
        "{before:?}"
    );
    let out = run_cli(&["db", "migrate", "--config", &path]).await;
    assert!(String::from_utf8_lossy(&out.stdout).contains("applied migration(s) 2; schema at version 2"), "{out:?}");
    let users: i64 = db.query_one("SELECT count(*) FROM gatehouse_users WHERE id = 'kept'", &[]).await.unwrap().get(0);
    assert_eq!(users, 1);
    let made = run_cli(&["admin-tokens", "create", "--name", "ops", "--role", "admin", "--config", &path]).await;
    assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
    let tokens: i64 = db.query_one("SELECT count(*) FROM gatehouse_admin_tokens", &[]).await.unwrap().get(0);
    assert_eq!(tokens, 1);
}

/// The password from a file (a mounted Secret; its final line break ignored), and three
/// `gatehouse db migrate` started at once (gateways starting together): one applies the
/// migration, the others wait for it and find nothing to do. A wrong or empty password
/// file stops start-up with the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_password_comes_from_a_file_and_concurrent_migrations_apply_once() {
    let url = postgres::fresh_database("pwfile").await;
    let without = url.replace(&format!(":{}@", postgres::PASSWORD), "@");
    let dir = tempfile::tempdir().unwrap();
    let pw = dir.path().join("db-password");
    let config = |password: &str| {
        std::fs::write(&pw, password).unwrap();
        let yaml = format!(
            "listeners:\n  - address: 127.0.0.1:0\ncredentials: \"{without}\"\ncredentials_password_file: {}\nmaster_key: {}\nroutes: []\n",
            pw.display(),
            dir.path().join("master.key").display()
        );
        let path = dir.path().join("gatehouse.yaml");
        std::fs::write(&path, yaml).unwrap();
        path.display().to_string()
    };
    let path = config(&format!("{}\n", postgres::PASSWORD));
    let args = ["db", "migrate", "--config", path.as_str()];
    let runs = (0..3).map(|_| run_cli(&args));
    let outs = futures_util::future::join_all(runs).await;
    let mut said: Vec<String> = outs
        .iter()
        .map(|o| {
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
            String::from_utf8_lossy(&o.stdout).into_owned()
        })
        .collect();
    said.sort();
    assert!(said[0].contains("applied migration(s) 1, 2; schema at version 2"), "{said:?}");
    assert!(said[1..].iter().all(|s| s.contains("schema already at version 2")), "{said:?}");
    let (db, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    let rows: i64 = db.query_one("SELECT count(*) FROM gatehouse_schema", &[]).await.unwrap().get(0);
    assert_eq!(rows, 2);
    let out = run_cli(&["check-config", "--config", &path]).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    for (content, reason) in [("not-the-password\n", "password authentication failed"), ("\n", "is empty")] {
        let path = config(content);
        let out = run_cli(&["check-config", "--config", &path]).await;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(78), "{stderr}");
        assert!(stderr.contains(reason), "no {reason:?} in {stderr}");
        assert!(!stderr.contains("not-the-password"), "{stderr}");
    }
}
