//! Hot reload of the credentials file (docs/configuration.md#credentials-file): an edited
//! file is in force well under a second after the write; a broken file changes nothing
//! and the next good one applies; SIGHUP reloads; a kubelet `..data` symlink swap is
//! seen, and seen again on the next swap.

use crate::support::client::H1;
use crate::support::creds::{ApiKey, Creds, KubeletDir};
use crate::support::gateway::{GatewayConfig, RouteSpec, TestGateway};
use crate::support::process::GatewayProcess;
use crate::support::upstream::TestUpstream;
use crate::support::{assert_unauthorized, within};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// docs/configuration.md: a good file is in force "well under a second after the write" (the watcher's
/// debounce is 200 ms).
const IN_FORCE: Duration = Duration::from_secs(1);
/// How long a poll waits before failing: long enough that a slow machine fails on the
/// timing assertion above, with a measurement, rather than here.
const POLL_LIMIT: Duration = Duration::from_secs(5);

/// GETs `/api/x` at `addr` with `key` until the status is `want`; returns how long that
/// took (`since` is the moment of the write).
async fn until_status(addr: SocketAddr, key: &ApiKey, want: u16, since: Instant, what: &str) -> Duration {
    let client = H1::new();
    let url = format!("http://{addr}/api/x");
    within(POLL_LIMIT, what, async {
        loop {
            let res = client.get_with(&url, &[("x-api-key", &key.token)]).await;
            if res.status == want {
                return since.elapsed();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
}

/// Asserts `key` is answered `want` right now.
async fn status_now(addr: SocketAddr, key: &ApiKey) -> u16 {
    let res = H1::new().get_with(&format!("http://{addr}/api/x"), &[("x-api-key", &key.token)]).await;
    res.status.as_u16()
}

fn config(creds: &Creds, up: &TestUpstream) -> GatewayConfig {
    TestGateway::builder().credentials(creds).route(RouteSpec::new("api", "/api/").to(up).authenticated())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edited_file_is_in_force_within_a_second_for_new_and_revoked_keys() {
    let up = TestUpstream::start().await;
    let mut creds = Creds::new();
    let old = creds.api_user("svc");
    let gw = config(&creds, &up).start().await;
    assert_eq!(status_now(gw.addr(), &old).await, 200);

    // A new user with a key.
    let new = creds.api_user("newcomer");
    let written = Instant::now();
    gw.write_credentials(&creds);
    let took = until_status(gw.addr(), &new, 200, written, "the new key to be accepted").await;
    assert!(took < IN_FORCE, "the new key was accepted only {took:?} after the write");
    assert_eq!(status_now(gw.addr(), &old).await, 200, "the old key stopped working");

    // A new key for an existing user.
    let second = creds.add_api_key("svc");
    let written = Instant::now();
    gw.write_credentials(&creds);
    let took = until_status(gw.addr(), &second, 200, written, "the added key to be accepted").await;
    assert!(took < IN_FORCE, "the added key was accepted only {took:?} after the write");

    // Revoking a key.
    creds.revoke(&new.key_id);
    let written = Instant::now();
    gw.write_credentials(&creds);
    let took = until_status(gw.addr(), &new, 401, written, "the revoked key to be refused").await;
    assert!(took < IN_FORCE, "the revoked key was refused only {took:?} after the write");
    let res = H1::new().get_with(&gw.url("/api/x"), &[("x-api-key", &new.token)]).await;
    assert_unauthorized(&res, "Invalid API key");
    assert_eq!(status_now(gw.addr(), &old).await, 200);
    assert_eq!(status_now(gw.addr(), &second).await, 200);
}

/// The file may change between the moment the gateway loads it at start and the moment
/// its watcher starts; that change must not be lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_written_right_after_start_is_not_lost() {
    let up = TestUpstream::start().await;
    let mut creds = Creds::new();
    creds.api_user("svc");
    let gw = config(&creds, &up).start().await;

    let new = creds.api_user("early");
    let written = Instant::now();
    gw.write_credentials(&creds);

    until_status(gw.addr(), &new, 200, written, "a key written right after start to be accepted").await;
}

/// Each broken file (invalid YAML, a user with a missing role, empty, missing) is
/// refused whole with its error logged (with the line where there is one); the old
/// snapshot keeps serving; the next good file applies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_file_keeps_the_last_good_credentials_and_the_next_good_file_applies() {
    let up = TestUpstream::start().await;
    let mut creds = Creds::new();
    let old = creds.api_user("svc");
    let gw = GatewayProcess::serve(&config(&creds, &up)).await;
    let path = gw.credentials_path().to_path_buf();
    assert_eq!(status_now(gw.addr(), &old).await, 200);
    let mut failures = 0;

    // 1. Invalid YAML.
    crate::support::creds::write_atomic(&path, "roles:\n  all:\n    rules: [\"* /**\"\nusers: {{{\n");
    failures += 1;
    gw.logged("credentials reload failed", failures).await;
    let err = gw.logged_lines("credentials reload failed").pop().unwrap()["error"].as_str().unwrap().to_string();
    assert!(err.starts_with(&format!("{}:", path.display())), "error does not name the file: {err}");
    assert!(err.split(':').nth(1).is_some_and(|l| l.parse::<u32>().is_ok_and(|l| l > 0)), "no line: {err}");
    assert_eq!(status_now(gw.addr(), &old).await, 200, "the old key stopped working after invalid YAML");

    // The next good file applies.
    let first = creds.api_user("first");
    let written = Instant::now();
    gw.write_credentials(&creds);
    until_status(gw.addr(), &first, 200, written, "a good file after invalid YAML to apply").await;
    assert_eq!(status_now(gw.addr(), &old).await, 200);

    // 2. A user referring to a role that does not exist: the whole file is refused,
    // including the key it adds and the revocation it makes.
    let doomed = creds.api_user("orphan");
    creds.user("orphan").roles[0].value = "no-such-role".into();
    creds.revoke(&old.key_id);
    let bad_yaml = creds.yaml();
    creds.remove_user("orphan");
    creds.unrevoke(&old.key_id);
    crate::support::creds::write_atomic(&path, &bad_yaml);
    failures += 1;
    gw.logged("credentials reload failed", failures).await;
    let err = gw.logged_lines("credentials reload failed").pop().unwrap()["error"].as_str().unwrap().to_string();
    assert!(err.contains("unknown role") && err.contains("no-such-role"), "{err}");
    assert!(err.split(':').nth(1).is_some_and(|l| l.parse::<u32>().is_ok_and(|l| l > 0)), "no line: {err}");
    assert_eq!(status_now(gw.addr(), &old).await, 200, "a refused file revoked a key");
    assert_eq!(status_now(gw.addr(), &doomed).await, 401, "a refused file added a key");
    assert_eq!(status_now(gw.addr(), &first).await, 200);

    // 3. Empty, then missing.
    crate::support::creds::write_atomic(&path, "");
    failures += 1;
    gw.logged("credentials reload failed", failures).await;
    assert_eq!(status_now(gw.addr(), &old).await, 200, "the old key stopped working after an empty file");
    std::fs::remove_file(&path).unwrap();
    failures += 1;
    gw.logged("credentials reload failed", failures).await;
    assert_eq!(status_now(gw.addr(), &old).await, 200, "the old key stopped working after the file was removed");

    // The next good file applies.
    let last = creds.api_user("last");
    let written = Instant::now();
    gw.write_credentials(&creds);
    until_status(gw.addr(), &last, 200, written, "a good file after broken ones to apply").await;
    assert_eq!(status_now(gw.addr(), &old).await, 200);
    assert_eq!(status_now(gw.addr(), &first).await, 200);
    assert_eq!(gw.count_logged("credentials reload failed"), failures);
}

/// SIGHUP reloads by itself. The change is written so that the directory watch cannot
/// see it: in place, through a hard link in another, unwatched directory (inotify
/// reports a write to the directory the writer opened the file through). So only the
/// signal can put it in force (the 30 s poll aside); the debug log names the trigger.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_credentials() {
    let up = TestUpstream::start().await;
    let mut creds = Creds::new();
    let old = creds.api_user("svc");
    // Laid out before the gateway starts, so that no event of this is pending.
    let mount = tempfile::tempdir().unwrap();
    let (watched, elsewhere) = (mount.path().join("watched"), mount.path().join("elsewhere"));
    std::fs::create_dir(&watched).unwrap();
    std::fs::create_dir(&elsewhere).unwrap();
    let path = watched.join("credentials.yaml");
    std::fs::write(&path, creds.yaml()).unwrap();
    let link = elsewhere.join("credentials.yaml");
    std::fs::hard_link(&path, &link).unwrap();
    let config = config(&creds, &up).credentials_at(&path);
    let gw = GatewayProcess::serve_with_env(&config, &[("GATEHOUSE_LOG", "debug")]).await;
    assert_eq!(status_now(gw.addr(), &old).await, 200);

    let new = creds.api_user("hupped");
    std::fs::write(&link, creds.yaml()).unwrap();
    assert_eq!(std::fs::read_to_string(&path).unwrap(), creds.yaml());
    let reloads = gw.count_logged("credentials reloaded");
    let signalled = Instant::now();
    gw.sighup();

    let took = until_status(gw.addr(), &new, 200, signalled, "the key to be accepted after SIGHUP").await;
    assert!(took < IN_FORCE, "in force only {took:?} after SIGHUP");
    gw.logged("credentials reloaded", reloads + 1).await;
    let triggers: Vec<String> = gw
        .logged_lines("reloading credentials")
        .iter()
        .map(|v| v["trigger"].as_str().unwrap_or("?").to_string())
        .collect();
    assert_eq!(triggers, ["SIGHUP"], "{}", gw.stderr());
    assert_eq!(status_now(gw.addr(), &old).await, 200);
}

/// Kubernetes updates a mounted Secret by swapping the `..data` symlink; a watch on the
/// file itself sees the first swap at best. Two swaps in a row must both be seen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kubelet_symlink_swap_is_seen_and_so_is_the_next_one() {
    let up = TestUpstream::start().await;
    let mut creds = Creds::new();
    let a = creds.api_user("svc");
    let mount = tempfile::tempdir().unwrap();
    let mut kube = KubeletDir::create(mount.path(), "..2026_11_23_a", &creds.yaml());
    let gw = config(&creds, &up).credentials_at(&kube.path()).start().await;
    assert_eq!(status_now(gw.addr(), &a).await, 200);

    // First swap: a new key.
    let b = creds.add_api_key("svc");
    let swapped = Instant::now();
    kube.swap("..2026_11_23_b", &creds.yaml());
    let took = until_status(gw.addr(), &b, 200, swapped, "the first swap's new key to be accepted").await;
    assert!(took < IN_FORCE, "the first swap was in force only {took:?} after it");
    assert_eq!(status_now(gw.addr(), &a).await, 200);

    // Second swap: another key, and the first one revoked.
    let c = creds.add_api_key("svc");
    creds.revoke(&a.key_id);
    let swapped = Instant::now();
    kube.swap("..2026_11_23_c", &creds.yaml());
    let took = until_status(gw.addr(), &c, 200, swapped, "the second swap's new key to be accepted").await;
    assert!(took < IN_FORCE, "the second swap was in force only {took:?} after it");
    assert_eq!(status_now(gw.addr(), &a).await, 401, "the second swap's revocation is not in force");
    assert_eq!(status_now(gw.addr(), &b).await, 200);

    // The layout really is kubelet's: the configured path is a symlink through `..data`.
    assert!(std::fs::symlink_metadata(kube.path()).unwrap().file_type().is_symlink());
    assert_eq!(std::fs::read_link(mount.path().join("creds/..data")).unwrap(), std::path::Path::new("..2026_11_23_c"));
    assert!(!mount.path().join("creds/..2026_11_23_a").exists());
}

/// Bytes the process has read so far (all `read` calls: files, sockets, pipes).
fn bytes_read(pid: u32) -> u64 {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).unwrap();
    io.lines().find_map(|l| l.strip_prefix("rchar: ")).unwrap().trim().parse().unwrap()
}

/// Watching must not turn into polling: the gateway's own reads of the files it watches
/// (each open is an inotify event in the watched directory) must not trigger another
/// read. A big file makes any re-read show; an idle gateway should read nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_gateway_does_not_keep_rereading_its_credentials() {
    let up = TestUpstream::start().await;
    let mut creds = Creds::new();
    let key = creds.api_user("svc");
    let gw = GatewayProcess::serve(&config(&creds, &up)).await;
    // A large file (a YAML comment pads it), picked up through the watcher once.
    let new = creds.api_user("padded");
    let padded = creds.yaml() + &"# padding padding padding padding padding padding\n".repeat(10_000);
    let size = padded.len() as u64;
    crate::support::creds::write_atomic(gw.credentials_path(), &padded);
    until_status(gw.addr(), &new, 200, Instant::now(), "the padded file to apply").await;
    assert_eq!(status_now(gw.addr(), &key).await, 200);

    // Settle past the debounce of the events of that write, then watch an idle gateway.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = bytes_read(gw.pid());
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let read = bytes_read(gw.pid()) - before;

    // One re-read is allowed (the 30 s poll may tick); the bug re-reads every 200 ms.
    assert!(read < 2 * size, "an idle gateway read {read} bytes in 1.5 s; the credentials file is {size} bytes");
}

/// A file that would take away every user (an emptied Secret, a truncated copy) is held
/// back: counted, refused with the reason by `POST /admin/v1/reload`, the previous
/// credentials keep serving; `?allow_mass_removal=true` applies it.
/// The value of one series in the gateway's metrics (panics when it is not there).
async fn scrape(admin: &crate::support::gateway::AdminClient, series: &str) -> i64 {
    let text = admin.get("/metrics").await.text();
    let v = crate::observability_support::value(&text, series).unwrap_or_else(|| panic!("no {series} in:\n{text}"));
    v as i64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_that_takes_away_every_user_is_held_until_a_reload_allows_it() {
    let up = TestUpstream::start().await;
    let mut creds = Creds::new();
    let keys: Vec<ApiKey> = ["a", "b", "c"].iter().map(|u| creds.api_user(u)).collect();
    let gw = config(&creds, &up).admin("admin-test-token-0123456789abcdef").start().await;
    let admin = gw.admin();
    let metric = |series: &'static str| scrape(&admin, series);
    let held = || metric("gatehouse_credentials_reloads_held_total");
    let failing = || metric("gatehouse_credentials_reload_failing");
    assert_eq!((held().await, failing().await), (0, 0));

    for u in ["a", "b", "c"] {
        creds.remove_user(u);
    }
    gw.write_credentials(&creds);
    // The watcher sees the write and holds it back.
    within(POLL_LIMIT, "the watcher to hold the emptied file back", async {
        while held().await == 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    for k in &keys {
        assert_eq!(status_now(gw.addr(), k).await, 200, "a held file took effect");
    }
    let refused = admin.call("POST", "/admin/v1/reload", None).await;
    assert_eq!(refused.status, 400, "{}", refused.text());
    let message = refused.json()["message"].as_str().unwrap_or_default().to_string();
    assert!(message.contains("keeps 0 of the 3 users") && message.contains("allow_mass_removal=true"), "{message}");
    assert_eq!((held().await, failing().await), (2, 1));
    assert_eq!(status_now(gw.addr(), &keys[0]).await, 200);

    let allowed = admin.call("POST", "/admin/v1/reload?allow_mass_removal=true", None).await;
    assert_eq!(allowed.status, 200, "{}", allowed.text());
    assert_eq!(allowed.json(), serde_json::json!({"reloaded": true, "users": 0, "keys": 0}));
    assert_eq!((held().await, failing().await), (2, 0), "a good reload clears the failing gauge");
    assert_unauthorized(
        &H1::new().get_with(&gw.url("/api/x"), &[("x-api-key", &keys[1].token)]).await,
        "Invalid API key",
    );
    assert_eq!(up.count(), 3 + 1, "only the requests made while the old file was in force went upstream");
}

/// A certificate for `localhost` valid until `not_after`, as (cert PEM, key PEM).
fn cert_until(not_after: time::OffsetDateTime) -> (String, String) {
    let mut params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    params.not_after = not_after;
    let key = rcgen::KeyPair::generate().unwrap();
    (params.self_signed(&key).unwrap().pem(), key.serialize_pem())
}

/// the served certificate's expiry and its reloads are metrics: a broken file keeps the
/// old certificate serving with `gatehouse_tls_reload_failing` 1 until a good file lands
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_certificate_expiry_and_reload_failures_are_metrics() {
    use crate::support::client::{h1_over, tls_connect};
    let up = TestUpstream::start().await;
    let creds = Creds::new();
    let gw = config(&creds, &up).tls().admin("admin-test-token-0123456789abcdef").start().await;
    let admin = gw.admin();
    let metric = |series: &'static str| scrape(&admin, series);
    let expiry = || metric(r#"gatehouse_tls_certificate_expiry_timestamp_seconds{listener="tls"}"#);
    let failing = || metric(r#"gatehouse_tls_reload_failing{listener="tls"}"#);
    let failures = || metric(r#"gatehouse_tls_reloads_total{listener="tls",result="failure"}"#);
    // rcgen's default notAfter: 4096-01-01.
    let default_end = time::macros::datetime!(4096-01-01 0:00 UTC).unix_timestamp();
    assert_eq!((expiry().await, failing().await, failures().await), (default_end, 0, 0));
    let old_cert = gw.cert_pem().to_string();
    let get = async |cert: &str| {
        let io = tls_connect(gw.tls_addr(), cert, b"http/1.1").await;
        let req = http::Request::get("/api/x").header("host", "localhost").body(crate::support::client::empty());
        h1_over(io, req.unwrap()).await.status
    };
    assert_eq!(get(&old_cert).await, 401);

    let dir = gw.written().dir.path();
    std::fs::write(dir.join("cert.pem"), "-----BEGIN CERTIFICATE-----\nnot base64 !\n-----END CERTIFICATE-----\n")
        .unwrap();
    within(POLL_LIMIT, "the failed reload in the metrics", async {
        while failing().await != 1 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(failures().await >= 1);
    assert_eq!(expiry().await, default_end, "the old certificate still serves");
    assert_eq!(get(&old_cert).await, 401, "handshakes still succeed with the old certificate");

    let end = time::macros::datetime!(2031-05-17 12:00 UTC);
    let (cert, key) = cert_until(end);
    // The key first: a new certificate beside the old key would be a (brief) mismatch.
    std::fs::write(dir.join("key.pem"), &key).unwrap();
    std::fs::write(dir.join("cert.pem"), &cert).unwrap();
    within(POLL_LIMIT, "the renewed certificate in the metrics", async {
        while (failing().await, expiry().await) != (0, end.unix_timestamp()) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert_eq!(get(&cert).await, 401, "the renewed certificate serves");
}
