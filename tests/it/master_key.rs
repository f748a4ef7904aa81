//! `gatehouse master-key rotate`: every HMAC secret re-sealed
//! under a new master key while a real gateway serves signed requests, none of which
//! fails; afterwards the new key file alone opens the credentials and the old key opens
//! nothing. A read-only credentials file refuses the rotation and keeps both files.

use crate::support::client::H1;
use crate::support::creds::{Creds, HmacKey};
use crate::support::gateway::{RouteSpec, TestGateway, WrittenConfig};
use crate::support::process::{GatewayProcess, ReadOnlyDir, run_cli, run_cli_with};
use crate::support::upstream::TestUpstream;
use crate::support::{STEP, eventually, within};
use gatehouse::config::RateLimitConfig;
use gatehouse::credentials::file::{FileRateLimit, spanned};
use gatehouse::credentials::secrets::MasterKey;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

const RATE: RateLimitConfig = RateLimitConfig { per_second: 50, burst: 100 };

/// Signed GETs of `/api/x?n=<i>` (a new target each time, so no signature repeats) with
/// `key` until `stop` is set; counts each 200 in `ok` and returns every status seen.
fn signed_traffic(
    gw: String,
    key: HmacKey,
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicUsize>,
) -> tokio::task::JoinHandle<Vec<u16>> {
    tokio::spawn(async move {
        let client = H1::new();
        let mut seen = Vec::new();
        let mut n = 0u64;
        while !stop.load(Ordering::SeqCst) {
            n += 1;
            let target = format!("/api/x?n={n}");
            let status = client.get_with(&format!("{gw}{target}"), &key.headers("GET", &target, b"")).await.status;
            if status == 200 {
                ok.fetch_add(1, Ordering::SeqCst);
            }
            seen.push(status.as_u16());
        }
        seen
    })
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// The sealed secrets of a credentials file, in order.
fn sealed(yaml: &str) -> Vec<String> {
    let file: gatehouse::credentials::file::FileCredentials = serde_saphyr::from_str(yaml).unwrap();
    file.users.iter().flat_map(|u| u.keys.iter()).filter_map(|k| k.secret_sealed.clone()).collect()
}

/// Two hmac users (rate limits high enough for an unpaced loop) and an api_key user.
fn three_users() -> (Creds, HmacKey, HmacKey) {
    let mut creds = Creds::new();
    let a = creds.hmac_user("erp-sync");
    let b = creds.hmac_user("mobile");
    creds.api_user("batch");
    for id in ["erp-sync", "mobile"] {
        let fast = FileRateLimit { per_second: 100_000, burst: 100_000 };
        creds.user(id).rate_limit = Some(spanned(fast));
    }
    (creds, a, b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotating_the_master_key_under_signed_traffic_fails_no_request_and_leaves_only_the_new_key() {
    let up = TestUpstream::start().await;
    let (creds, a, b) = three_users();
    // The loops send as fast as the gateway answers: the default 50/s would refuse some
    // of them, and the master key, not rate limiting, is under test here.
    let config = TestGateway::builder()
        .credentials(&creds)
        .rate_limit(1_000_000, 1_000_000)
        .route(RouteSpec::new("api", "/api/").to(&up).authenticated());
    let gw = GatewayProcess::serve(&config).await;
    let w = gw.written();
    let master_path = w.dir.path().join("master.key");
    let config_path = w.path.display().to_string();
    let old_key = read(&master_path);
    let old_sealed = sealed(&read(w.credentials_path()));
    assert_eq!(old_sealed.len(), 2);

    // Both hmac users sign requests throughout.
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicUsize::new(0));
    let loops: Vec<_> =
        [&a, &b].into_iter().map(|k| signed_traffic(gw.url(""), k.clone(), stop.clone(), ok.clone())).collect();
    eventually(STEP, "40 signed requests before the rotation", || ok.load(Ordering::SeqCst) >= 40).await;

    let out = run_cli(&["master-key", "rotate", "--config", &config_path, "--json"]).await;
    assert!(out.status.success(), "rotate failed: {}", stderr(&out));
    assert_eq!(stderr(&out), "", "rotate wrote to stderr");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((report["resealed_secrets"].as_u64(), report["retired_keys"].as_u64()), (Some(2), Some(1)), "{report}");

    // A key added after the rotation is sealed under the new key; once the gateway
    // accepts it, it has loaded the rotated credentials with the final (new-only) key
    // file, which it re-reads on every reload.
    let added = run_cli(&["keys", "add", "erp-sync", "--config", &config_path, "--json"]).await;
    assert!(added.status.success(), "keys add failed: {}", stderr(&added));
    let added: serde_json::Value = serde_json::from_slice(&added.stdout).unwrap();
    let c = HmacKey {
        key_id: added["key"]["id"].as_str().unwrap().into(),
        secret: added["secret"].as_str().unwrap().into(),
    };
    let client = H1::new();
    within(STEP, "the gateway to accept a key added after the rotation", async {
        let mut n = 0;
        loop {
            n += 1;
            let target = format!("/api/new?n={n}");
            if client.get_with(&gw.url(&target), &c.headers("GET", &target, b"")).await.status == 200 {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await;
    let after = ok.load(Ordering::SeqCst);
    eventually(STEP, "40 more signed requests after the rotation", || ok.load(Ordering::SeqCst) >= after + 40).await;
    stop.store(true, Ordering::SeqCst);
    let mut seen = Vec::new();
    for l in loops {
        seen.extend(within(STEP, "the signed loops to stop", l).await.unwrap());
    }
    assert!(seen.len() >= 80, "loops too short: {}", seen.len());
    let failed: Vec<_> = seen.iter().filter(|s| **s != 200).collect();
    assert!(
        failed.is_empty(),
        "{} of {} signed requests failed during the rotation: {failed:?}",
        failed.len(),
        seen.len()
    );

    // The key file holds one new key, 0600; the old key opens nothing any more.
    let new_key = read(&master_path);
    assert_eq!(new_key.lines().count(), 1, "{new_key:?}");
    assert_ne!(new_key, old_key);
    assert_eq!(std::fs::metadata(&master_path).unwrap().permissions().mode() & 0o777, 0o600);
    let creds_path = w.credentials_path();
    let new_sealed = sealed(&read(creds_path));
    assert_eq!(new_sealed.len(), 3);
    assert!(old_sealed.iter().all(|s| !new_sealed.contains(s)), "a secret was not re-sealed");
    let old = MasterKey::from_text(&old_key).unwrap();
    let e = gatehouse::credentials::load(creds_path, Some(&old), RATE).unwrap_err().to_string();
    assert!(e.contains("cannot be opened"), "{e}");
    let new = MasterKey::from_text(&new_key).unwrap();
    assert_eq!(gatehouse::credentials::load(creds_path, Some(&new), RATE).unwrap().key_count(), 4);

    // The audit log records the rotation, and no key or secret.
    let audit = read(&w.audit_path());
    let record = audit
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|r| r["action"] == "master-key rotate")
        .unwrap_or_else(|| panic!("no rotation in the audit log:\n{audit}"));
    assert_eq!(record["changes"]["resealed_secrets"], 2, "{record}");
    assert!(record["actor"].as_str().unwrap().starts_with("cli:"), "{record}");
    for secret in [old_key.trim(), new_key.trim(), a.secret.as_str(), b.secret.as_str()] {
        assert!(!audit.contains(secret), "a secret is in the audit log");
    }

    // A gateway started afresh on the rotated files verifies the old secrets.
    let gw = GatewayProcess::serve_written(gw.into_written(), &[], &[]).await;
    for k in [&a, &b, &c] {
        let r = client.get_with(&gw.url("/api/restart"), &k.headers("GET", "/api/restart", b"")).await;
        assert_eq!(r.status, 200, "{}: {}", k.key_id, r.text());
    }
}

/// The files of a written config whose credentials file is made read-only.
struct Before {
    creds: PathBuf,
    master: PathBuf,
    creds_text: String,
    master_text: String,
    names: Vec<String>,
}

impl Before {
    fn take(w: &WrittenConfig) -> Before {
        let creds = w.credentials_path().to_path_buf();
        let master = w.dir.path().join("master.key");
        let mut names: Vec<String> =
            std::fs::read_dir(w.dir.path()).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        names.push("credentials.yaml.lock".into());
        names.sort();
        names.dedup();
        Before { creds_text: read(&creds), master_text: read(&master), creds, master, names }
    }

    /// Nothing changed: same texts, no new file but the lock.
    fn unchanged(&self, w: &WrittenConfig, how: &str) {
        assert_eq!(read(&self.creds), self.creds_text, "{how}: the credentials file changed");
        assert_eq!(read(&self.master), self.master_text, "{how}: the master key changed");
        let names: Vec<String> =
            std::fs::read_dir(w.dir.path()).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        for n in &names {
            assert!(self.names.contains(n), "{how}: {n} was left behind");
        }
    }
}

/// `master-key rotate` on `w` through `wrapper`: one line on stderr, exit 1.
async fn refused_rotation(wrapper: &[&str], w: &WrittenConfig) -> String {
    let config = w.path.display().to_string();
    let out = run_cli_with(wrapper, &[], &["master-key", "rotate", "--config", &config]).await;
    assert_eq!(out.status.code(), Some(1), "rotate on a read-only file: {}", stderr(&out));
    assert!(out.stdout.is_empty(), "{}", String::from_utf8_lossy(&out.stdout));
    let err = stderr(&out);
    assert!(err.ends_with('\n') && err.lines().count() == 1, "not one line: {err:?}");
    err.trim_end().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotating_against_a_read_only_credentials_file_fails_with_one_line_and_changes_nothing() {
    let (creds, a, _) = three_users();

    // A file made read-only with chmod 0444 in a writable directory (as root too: the
    // mode, not the kernel, is what says so).
    let w = TestGateway::builder().credentials(&creds).write();
    let before = Before::take(&w);
    std::fs::set_permissions(&before.creds, std::fs::Permissions::from_mode(0o444)).unwrap();
    let line = refused_rotation(&[], &w).await;
    assert!(line.starts_with("gatehouse master-key rotate: "), "{line}");
    assert!(line.contains(&before.creds.display().to_string()) && line.contains("is read-only here"), "{line}");
    assert!(line.contains("its mode grants no write permission"), "{line}");
    before.unchanged(&w, "chmod 0444");

    // A read-only directory (a Secret mount).
    let w = TestGateway::builder().credentials(&creds).write();
    let before = Before::take(&w);
    let ro = ReadOnlyDir::new(w.dir.path()).unwrap_or_else(|why| panic!("{why}"));
    let line = refused_rotation(&ro.wrapper(), &w).await;
    assert!(line.contains("is read-only here"), "{}: {line}", ro.how);
    drop(ro);
    before.unchanged(&w, "read-only directory");

    // The unchanged files still serve a's signed requests.
    let up = TestUpstream::start().await;
    let gw = TestGateway::builder()
        .credentials(&creds)
        .credentials_at(&before.creds)
        .route(RouteSpec::new("api", "/api/").to(&up).authenticated())
        .write();
    let gw = GatewayProcess::serve_written(gw, &[], &[]).await;
    let r = H1::new().get_with(&gw.url("/api/x"), &a.headers("GET", "/api/x", b"")).await;
    assert_eq!(r.status, 200, "{}", r.text());
}
