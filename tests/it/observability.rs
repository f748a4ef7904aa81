//! Metrics exposition and the audit log (docs/operations.md).

use crate::observability_support::{ADMIN_TOKEN, start, start_to, start_with_audit_log, value};
use crate::support::client::H1;
use crate::support::creds::Creds;
use crate::support::upstream::TestUpstream;
use std::time::{Duration, Instant};

const FAMILIES: &[&str] = &[
    "gatehouse_requests_total",
    "gatehouse_auth_failures_total",
    "gatehouse_request_duration_seconds",
    "gatehouse_upstream_duration_seconds",
    "gatehouse_rate_limited_total",
    "gatehouse_credentials_reloads_total",
    "gatehouse_credentials_last_reload_timestamp_seconds",
    "gatehouse_credentials_users",
    "gatehouse_credentials_keys",
    "gatehouse_open_connections",
    "gatehouse_upstream_errors_total",
    "gatehouse_audit_dropped_total",
    "gatehouse_build_info",
    "gatehouse_requests_in_flight",
];

async fn poll<T>(what: &str, mut f: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_expose_every_family_with_configured_labels_and_pass_promtool() {
    let up = TestUpstream::start().await;
    let mut creds = Creds::new();
    let key = creds.api_user("erp");
    let other = creds.api_user("other");
    creds.user("erp").rate_limit = Some(serde_saphyr::Spanned::new(
        gatehouse::credentials::file::FileRateLimit { per_second: 1, burst: 1 },
        serde_saphyr::Location::UNKNOWN,
        serde_saphyr::Location::UNKNOWN,
    ));
    let gw = start(&creds, &up, "").await;
    let client = H1::new();
    let h = [("x-api-key", key.token.as_str())];
    assert_eq!(client.get_with(&gw.url("/a"), &h).await.status, 200);
    assert_eq!(client.get_with(&gw.url("/a"), &h).await.status, 429);
    assert_eq!(client.get(&gw.url("/a")).await.status, 401);
    // The upstream goes away: one 502 fills gatehouse_upstream_errors_total.
    drop(up);
    assert_eq!(client.get_with(&gw.url("/a"), &[("x-api-key", other.token.as_str())]).await.status, 502);

    let text = client.get(&gw.admin_url("/metrics")).await.text();
    for f in FAMILIES {
        assert!(text.contains(&format!("# TYPE {f} ")), "{f} missing from:\n{text}");
    }
    let v = |s: &str| value(&text, s).unwrap_or_else(|| panic!("{s} missing from:\n{text}"));
    // No `user` label by default: 100,000 API users must not make 100,000 series.
    assert!(!text.contains("user=\""), "a user label without metrics.per_user_series:\n{text}");
    assert_eq!(v(r#"gatehouse_requests_total{outcome="forwarded",route="api",status_class="2xx"}"#), 1.0);
    assert_eq!(v(r#"gatehouse_requests_total{outcome="rejected",route="api",status_class="4xx"}"#), 2.0);
    assert_eq!(v("gatehouse_rate_limited_total"), 1.0);
    assert_eq!(v(r#"gatehouse_auth_failures_total{reason="missing"}"#), 1.0);
    assert_eq!(v("gatehouse_credentials_users"), 2.0);
    // The build: this crate's version, a commit (this is a git checkout), the compiler.
    let build = text.lines().find(|l| l.starts_with("gatehouse_build_info{")).unwrap_or_else(|| panic!("{text}"));
    assert!(build.ends_with("} 1"), "{build}");
    assert!(build.contains(&format!("version=\"{}\"", env!("CARGO_PKG_VERSION"))), "{build}");
    assert!(build.contains("rustc=\"1.") && !build.contains("commit=\"\""), "{build}");
    assert_eq!(v(r#"gatehouse_request_duration_seconds_count{route="api"}"#), 4.0);
    assert_eq!(v(r#"gatehouse_upstream_errors_total{kind="connect",route="api"}"#), 1.0);
    assert_eq!(v(r#"gatehouse_upstream_duration_seconds_count{route="api"}"#), 1.0);

    // Debian's prometheus package (installed by .ci/run) has promtool.
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("promtool does not run ({e}): `bash .ci/run` installs it"));
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_and_admin_change_gets_one_audit_record_without_secrets() {
    let up = TestUpstream::start().await;
    let mut creds = Creds::new();
    let key = creds.api_user("erp");
    let gw = start(&creds, &up, "").await;
    let client = H1::new();
    assert_eq!(
        client
            .get_with(
                &gw.url("/api/v1/x?token=leak"),
                &[("x-api-key", key.token.as_str()), ("user-agent", "erp-sync/4.2 (+https://erp.example)")]
            )
            .await
            .status,
        200
    );
    // A hostile User-Agent is kept only to its first 256 bytes.
    let long_agent = "x".repeat(4000);
    assert_eq!(
        client.get_with(&gw.url("/api/v1/x"), &[("x-api-key", "ghk_nope"), ("user-agent", &long_agent)]).await.status,
        401
    );
    let created = client
        .request(
            "POST",
            &gw.admin_url("/admin/v1/users"),
            &[("authorization", format!("Bearer {ADMIN_TOKEN}"))],
            r#"{"id":"new-user","auth_method":"api_key","organization":"acme"}"#,
        )
        .await;
    assert_eq!(created.status, 201, "{}", created.text());

    let records = poll("three audit records", async || {
        let r = gw.audit_records();
        (r.len() >= 3).then_some(r)
    })
    .await;
    let ok = &records[0];
    assert_eq!(ok["kind"], "request");
    assert_eq!(ok["user"], "erp");
    assert_eq!(ok["key_id"], key.key_id.as_str());
    assert_eq!(ok["route"], "api");
    assert_eq!(ok["method"], "GET");
    assert_eq!(ok["path"], "/api/v1/x", "the query string is never recorded");
    assert_eq!(ok["status"], 200);
    assert_eq!(ok["outcome"], "forwarded");
    assert_eq!(ok["client"], "127.0.0.1");
    assert_eq!(ok["user_agent"], "erp-sync/4.2 (+https://erp.example)");
    assert_eq!(ok["upstream"].as_str(), up.url().strip_prefix("http://"), "the target the request went to");
    assert!(ok["request_id"].as_str().is_some_and(|s| !s.is_empty()) && ok["duration_ms"].is_number());
    let bad = &records[1];
    assert_eq!(
        (bad["status"].as_u64(), bad["outcome"].as_str(), bad["reason"].as_str()),
        (Some(401), Some("rejected"), Some("malformed_token"))
    );
    assert_eq!(bad["user_agent"].as_str(), Some(&long_agent[..256]));
    assert!(bad["upstream"].is_null(), "a refused request went to no upstream: {bad}");
    let admin = &records[2];
    assert_eq!(
        (admin["kind"].as_str(), admin["actor"].as_str(), admin["action"].as_str()),
        (Some("admin"), Some("admin-api"), Some("user.create"))
    );
    assert_eq!(admin["target"], "new-user");
    assert_eq!(admin["changes"]["organization"], "acme");
    let file = std::fs::read_to_string(gw.audit_path()).unwrap();
    assert!(!file.contains(&key.token) && !file.contains("leak") && !file.contains(ADMIN_TOKEN), "{file}");
}

/// a request no upstream answered names the target it last tried
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_request_names_the_upstream_target_it_tried() {
    let up = TestUpstream::with(crate::support::upstream::Mode::Refused).await;
    let mut creds = Creds::new();
    let key = creds.api_user("erp");
    let gw = start(&creds, &up, "").await;
    let res = H1::new().get_with(&gw.url("/api/v1/x"), &[("x-api-key", key.token.as_str())]).await;
    assert_eq!(res.status, 502, "{}", res.text());
    let r = poll("the record", async || gw.audit_records().into_iter().next()).await;
    assert_eq!(
        (r["status"].as_u64(), r["reason"].as_str(), r["upstream"].as_str()),
        (Some(502), Some("upstream_connect"), up.url().strip_prefix("http://")),
        "{r}"
    );
    assert!(r["user_agent"].is_null(), "no User-Agent sent, none recorded: {r}");
}

/// Reads from `conn` into `buf` until `buf` holds `pattern`.
async fn read_until(conn: &mut tokio::net::TcpStream, buf: &mut Vec<u8>, pattern: &[u8]) {
    use tokio::io::AsyncReadExt;
    while !buf.windows(pattern.len()).any(|w| w == pattern) {
        let mut chunk = [0u8; 1024];
        let n = tokio::time::timeout(Duration::from_secs(10), conn.read(&mut chunk)).await.unwrap().unwrap();
        assert!(n > 0, "closed before {:?}: {:?}", String::from_utf8_lossy(pattern), String::from_utf8_lossy(buf));
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// requests count as in flight from their head until they are finished: while the
/// upstream holds them, and while their body is still streaming
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_in_flight_counts_requests_until_their_response_is_sent() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // An upstream that answers nothing until released: each connection reports its
    // request head, then waits; released, it sends a head and half of a body, waits for
    // a second release, then the rest.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (heads_tx, mut heads) = tokio::sync::mpsc::unbounded_channel::<()>();
    let (release_tx, release) = tokio::sync::watch::channel(0u8);
    tokio::spawn(async move {
        loop {
            let (mut s, _) = listener.accept().await.unwrap();
            let (heads_tx, mut release) = (heads_tx.clone(), release.clone());
            tokio::spawn(async move {
                let mut buf = Vec::new();
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    let mut chunk = [0u8; 1024];
                    let n = s.read(&mut chunk).await.unwrap();
                    assert!(n > 0, "the gateway closed before sending a head");
                    buf.extend_from_slice(&chunk[..n]);
                }
                heads_tx.send(()).unwrap();
                release.wait_for(|r| *r >= 1).await.unwrap();
                s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nok").await.unwrap();
                release.wait_for(|r| *r >= 2).await.unwrap();
                s.write_all(b"ok").await.unwrap();
            });
        }
    });
    let mut creds = Creds::new();
    let key = creds.api_user("erp");
    let gw = start_to(&creds, &url, "", None).await;
    let in_flight = async || {
        let text = H1::new()
            .get_with(&gw.admin_url("/metrics"), &[("authorization", format!("Bearer {ADMIN_TOKEN}").as_str())])
            .await
            .text();
        value(&text, "gatehouse_requests_in_flight")
    };
    assert_eq!(in_flight().await, Some(0.0));
    let addr = gw.addr;
    let mut conns = Vec::new();
    for _ in 0..5 {
        let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
        let head = format!("GET /api/v1/x HTTP/1.1\r\nhost: gw\r\nx-api-key: {}\r\n\r\n", key.token);
        conn.write_all(head.as_bytes()).await.unwrap();
        conns.push((conn, Vec::new()));
    }
    for _ in 0..5 {
        heads.recv().await.unwrap();
    }
    assert_eq!(in_flight().await, Some(5.0), "five requests held by the upstream");
    release_tx.send(1).unwrap();
    for (conn, buf) in &mut conns {
        read_until(conn, buf, b"\r\n\r\nok").await;
    }
    assert_eq!(in_flight().await, Some(5.0), "heads sent, bodies still streaming");
    release_tx.send(2).unwrap();
    for (conn, buf) in &mut conns {
        read_until(conn, buf, b"okok").await;
    }
    poll("no request in flight", async || (in_flight().await == Some(0.0)).then_some(())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_audit_log_that_cannot_be_written_loses_records_but_never_requests() {
    let up = TestUpstream::start().await;
    let mut creds = Creds::new();
    let key = creds.api_user("erp");
    let gw = start(&creds, &up, "").await;
    let client = H1::new();
    let h = [("x-api-key", key.token.as_str())];
    assert_eq!(client.get_with(&gw.url("/first"), &h).await.status, 200);
    poll("the first record", async || (!gw.audit_records().is_empty()).then_some(())).await;

    // The whole directory goes away: the file cannot even be reopened.
    std::fs::remove_dir_all(gw.audit_path().parent().unwrap()).unwrap();
    let lost = poll("records counted as lost", async || {
        assert_eq!(client.get_with(&gw.url("/while-gone"), &h).await.status, 200, "requests are still served");
        let text = client.get(&gw.admin_url("/metrics")).await.text();
        value(&text, r#"gatehouse_audit_dropped_total{reason="write_failed"}"#).filter(|&v| v > 0.0)
    })
    .await;
    assert!(lost >= 1.0);

    std::fs::create_dir(gw.audit_path().parent().unwrap()).unwrap();
    poll("writing to resume", async || {
        assert_eq!(client.get_with(&gw.url("/after"), &h).await.status, 200);
        gw.audit_records().iter().any(|r| r["path"] == "/after").then_some(())
    })
    .await;
}

/// The audit counter of one reason, from a scrape.
fn dropped(text: &str, reason: &str) -> Option<f64> {
    value(text, &format!("gatehouse_audit_dropped_total{{reason=\"{reason}\"}}"))
}

/// every record a failing audit file refuses is counted once, as write_failed: /dev/full
/// opens like a file and fails every write with ENOSPC (a disk that is full), and the
/// writer buffers a batch of records into one write, so all of them must be counted
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_record_a_failing_audit_file_refuses_is_counted_once() {
    const N: usize = 25;
    let up = TestUpstream::start().await;
    let mut creds = Creds::new();
    let key = creds.api_user("erp");
    let gw = start_with_audit_log(&creds, &up, "", Some("/dev/full")).await;
    let client = H1::new();
    let h = [("x-api-key", key.token.as_str())];
    let scrape = async || client.get(&gw.admin_url("/metrics")).await.text();
    let text = scrape().await;
    assert_eq!((dropped(&text, "write_failed"), dropped(&text, "queue_full")), (Some(0.0), Some(0.0)));

    for i in 0..N {
        assert_eq!(client.get_with(&gw.url(&format!("/r{i}")), &h).await.status, 200, "requests are still served");
    }
    // A record is queued when its response has ended: all N are on their way now.
    let text = poll("N records counted", async || {
        let text = scrape().await;
        (dropped(&text, "write_failed")? >= N as f64).then_some(text)
    })
    .await;
    assert_eq!(dropped(&text, "write_failed"), Some(N as f64), "each lost record counted once");
    assert_eq!(dropped(&text, "queue_full"), Some(0.0));

    // One more: exactly one more is counted (nothing lost earlier is counted again).
    assert_eq!(client.get_with(&gw.url("/last"), &h).await.status, 200);
    let text = poll("the last record counted", async || {
        let text = scrape().await;
        (dropped(&text, "write_failed")? > N as f64).then_some(text)
    })
    .await;
    assert_eq!(dropped(&text, "write_failed"), Some((N + 1) as f64));
}

/// logrotate's two ways: rename (the writer reopens the path) and copytruncate (append
/// mode writes at the new end: no hole of NULs, no lost line)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_log_survives_logrotate_rename_and_copytruncate() {
    let up = TestUpstream::start().await;
    let mut creds = Creds::new();
    let key = creds.api_user("erp");
    let gw = start(&creds, &up, "").await;
    let client = H1::new();
    let h = [("x-api-key", key.token.as_str())];
    assert_eq!(client.get_with(&gw.url("/before"), &h).await.status, 200);
    poll("the first record", async || (!gw.audit_records().is_empty()).then_some(())).await;

    // The writer notices a rename on its 1 s check (or at once on SIGHUP, logrotate's
    // postrotate); records written meanwhile land in the renamed file, none is lost.
    let rotated = gw.audit_path().with_extension("log.1");
    std::fs::rename(gw.audit_path(), &rotated).unwrap();
    let sent = std::sync::atomic::AtomicUsize::new(0);
    poll("a new file after the rename", async || {
        assert_eq!(client.get_with(&gw.url("/after-rename"), &h).await.status, 200);
        sent.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        gw.audit_records().iter().any(|r| r["path"] == "/after-rename").then_some(())
    })
    .await;
    let old = std::fs::read_to_string(&rotated).unwrap();
    assert!(old.contains("/before"), "{old}");
    // Every request's record ends up in one of the two files (the last ones may still be
    // on their way: records are written in batches).
    let sent = sent.load(std::sync::atomic::Ordering::SeqCst);
    poll("every record of the rename in one of the files", async || {
        let in_new = gw.audit_records().iter().filter(|r| r["path"] == "/after-rename").count();
        let in_old = std::fs::read_to_string(&rotated).unwrap().matches("\"/after-rename\"").count();
        assert!(in_old + in_new <= sent, "a record was written twice");
        (in_old + in_new == sent).then_some(())
    })
    .await;

    // copytruncate: copy the file away, then truncate it in place.
    std::fs::copy(gw.audit_path(), gw.audit_path().with_extension("log.2")).unwrap();
    std::fs::OpenOptions::new().write(true).open(gw.audit_path()).unwrap().set_len(0).unwrap();
    poll("writing after the truncation", async || {
        assert_eq!(client.get_with(&gw.url("/after-truncate"), &h).await.status, 200);
        gw.audit_records().iter().any(|r| r["path"] == "/after-truncate").then_some(())
    })
    .await;
    let text = std::fs::read_to_string(gw.audit_path()).unwrap();
    assert!(!text.contains('\0'), "append mode leaves no hole after a truncation");
    assert!(!text.contains("/after-rename\""), "the truncated records are gone from the live file");
}

/// An audit file deleted under the gateway (an `rm`, a rotation without `postrotate`)
/// loses nothing: the next batch sees it is gone and writes to a new file at the path,
/// instead of into the deleted one until the once-a-second check.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_after_the_audit_file_is_deleted_go_to_a_new_file() {
    const N: usize = 20;
    let up = TestUpstream::start().await;
    let mut creds = Creds::new();
    let key = creds.api_user("erp");
    let gw = start(&creds, &up, "").await;
    let client = H1::new();
    let h = [("x-api-key", key.token.as_str())];
    assert_eq!(client.get_with(&gw.url("/before"), &h).await.status, 200);
    poll("the first record", async || gw.audit_records().iter().any(|r| r["path"] == "/before").then_some(())).await;

    std::fs::remove_file(gw.audit_path()).unwrap();
    for i in 0..N {
        assert_eq!(client.get_with(&gw.url(&format!("/after/{i}")), &h).await.status, 200);
    }
    let after = |r: &serde_json::Value| r["path"].as_str().is_some_and(|p| p.starts_with("/after/"));
    poll("every record in the new file", async || {
        (gw.audit_records().iter().filter(|r| after(r)).count() == N).then_some(())
    })
    .await;
    let text = client.get(&gw.admin_url("/metrics")).await.text();
    assert_eq!(dropped(&text, "write_failed"), Some(0.0), "{text}");
}

/// With `metrics.per_user_series: 1` the first API user seen gets series of its own, every
/// other one is `_other`, and anonymous requests are `""`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_user_series_are_opt_in_and_bounded() {
    let up = TestUpstream::start().await;
    let mut creds = Creds::new();
    let first = creds.api_user("first");
    let second = creds.api_user("second");
    let third = creds.api_user("third");
    let gw = start(&creds, &up, "metrics:\n  per_user_series: 1\n").await;
    let client = H1::new();
    for k in [&first, &second, &third, &first] {
        assert_eq!(client.get_with(&gw.url("/a"), &[("x-api-key", k.token.as_str())]).await.status, 200);
    }
    assert_eq!(client.get(&gw.url("/a")).await.status, 401);
    let unknown = Creds::new().api_user("nobody");
    assert_eq!(client.get_with(&gw.url("/b"), &[("x-api-key", unknown.token.as_str())]).await.status, 401);
    let text = client.get(&gw.admin_url("/metrics")).await.text();
    let v = |s: &str| value(&text, s).unwrap_or_else(|| panic!("{s} missing from:\n{text}"));
    // Refusal reasons are the audit record's.
    assert_eq!(v(r#"gatehouse_auth_failures_total{reason="unknown_key"}"#), 1.0);
    assert!(!text.contains("invalid_key"), "{text}");
    let forwarded = |user: &str| {
        format!(r#"gatehouse_requests_total{{outcome="forwarded",route="api",status_class="2xx",user="{user}"}}"#)
    };
    assert_eq!((v(&forwarded("first")), v(&forwarded("_other"))), (2.0, 2.0));
    assert_eq!(v(r#"gatehouse_requests_total{outcome="rejected",route="api",status_class="4xx",user=""}"#), 2.0);
    assert!(!text.contains("user=\"second\"") && !text.contains("user=\"third\""), "{text}");
}
