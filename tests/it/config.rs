//! Invalid configuration: `check-config` and `serve` of the real binary exit non-zero
//! with `file:line:col: reason`, and nothing listens. A good config checks clean.

use crate::support::gateway::TestCert;
use crate::support::process::run_cli;
use crate::support::{connection_refused, free_port};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use tempfile::TempDir;

/// sysexits `EX_CONFIG`, what both commands exit with on a bad config.
const EXIT_CONFIG: i32 = 78;

/// A valid config; each test breaks one line of it. Line numbers matter below.
fn good(port: u16) -> String {
    format!(
        "listeners:\n\
         \x20 - address: 127.0.0.1:{port}\n\
         routes:\n\
         \x20 - name: api\n\
         \x20   path_prefix: /api/\n\
         \x20   upstream: http://127.0.0.1:9\n\
         \x20   allow_anonymous: true\n\
         \x20   timeout: 5s\n"
    )
}

/// Writes `yaml` and runs `check-config` and `serve` on it; both must fail with
/// `<file>:<location>: ` and `reason` on stderr, and `serve` must never listen.
async fn assert_rejected(dir: &TempDir, yaml: &str, port: u16, location: &str, reason: &str) {
    let path = dir.path().join("gatehouse.yaml");
    std::fs::write(&path, yaml).unwrap();
    let file = path.display().to_string();

    for command in ["check-config", "serve"] {
        let out = run_cli(&["--log-format", "json", command, "--config", &file]).await;
        let stderr = String::from_utf8_lossy(&out.stderr);

        assert_eq!(out.status.code(), Some(EXIT_CONFIG), "{command}: stderr:\n{stderr}");
        assert!(stderr.contains(&format!("{file}:{location}: ")), "{command}: no {file}:{location} in:\n{stderr}");
        assert!(stderr.contains(reason), "{command}: no {reason:?} in:\n{stderr}");
        assert!(!stderr.contains("\"listening\""), "{command} listened:\n{stderr}");
    }
    assert!(connection_refused(SocketAddr::from((Ipv4Addr::LOCALHOST, port))).await, "something listens on {port}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_field_is_rejected_with_its_location_and_nothing_listens() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let yaml = format!("{}    timout: 5s\n", good(port));

    assert_rejected(&dir, &yaml, port, "9:5", "unknown field `timout`").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_duration_is_rejected_with_its_location_and_nothing_listens() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let yaml = good(port).replace("timeout: 5s", "timeout: 5 parsecs");

    assert_rejected(&dir, &yaml, port, "8:14", "invalid duration \"5 parsecs\"").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicate_route_name_is_rejected_with_its_location_and_nothing_listens() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let yaml = format!("{}  - name: api\n    path_prefix: /other/\n    upstream: http://127.0.0.1:9\n", good(port));

    assert_rejected(&dir, &yaml, port, "9:11", "duplicate route name \"api\"").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_certificate_is_rejected_with_its_location_and_nothing_listens() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let cert = dir.path().join("missing-cert.pem");
    let key = dir.path().join("missing-key.pem");
    let yaml = good(port).replace(
        &format!("127.0.0.1:{port}\n"),
        &format!("127.0.0.1:{port}\n    tls: {{ cert: {}, key: {} }}\n", cert.display(), key.display()),
    );

    let reason = format!("cannot read TLS file {}", cert.display());
    assert_rejected(&dir, &yaml, port, "3:10", &reason).await;
}

/// A certificate file that exists but holds no certificate passes the config check and
/// fails when it is loaded: both commands still refuse it, name the file and the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_file_without_a_certificate_is_rejected_and_nothing_listens() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let cert = dir.path().join("cert.pem");
    let key = dir.path().join("key.pem");
    std::fs::write(&cert, "this is not a certificate\n").unwrap();
    std::fs::write(&key, TestCert::generate().key_pem).unwrap();
    let yaml = good(port).replace(
        &format!("127.0.0.1:{port}\n"),
        &format!("127.0.0.1:{port}\n    tls: {{ cert: {}, key: {} }}\n", cert.display(), key.display()),
    );
    let path = dir.path().join("gatehouse.yaml");
    std::fs::write(&path, yaml).unwrap();

    for command in ["check-config", "serve"] {
        let out = run_cli(&["--log-format", "json", command, "--config", &path.display().to_string()]).await;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{command} accepted it: {stderr}");
        assert!(stderr.contains(&format!("{}: no certificate in file", cert.display())), "{command}:\n{stderr}");
        assert!(!stderr.contains("\"listening\""), "{command} listened:\n{stderr}");
    }
    assert!(connection_refused(SocketAddr::from((Ipv4Addr::LOCALHOST, port))).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_config_accepts_a_good_config_with_tls() {
    let dir = tempfile::tempdir().unwrap();
    let cert = TestCert::generate();
    let cert_path = write(dir.path(), "cert.pem", &cert.cert_pem);
    let key_path = write(dir.path(), "key.pem", &cert.key_pem);
    let tls_listener = format!("  - address: 127.0.0.1:0\n    tls: {{ cert: {cert_path}, key: {key_path} }}\n");
    let yaml = good(0).replace("routes:\n", &format!("{tls_listener}routes:\n"));
    let path = write(dir.path(), "gatehouse.yaml", &yaml);

    let out = run_cli(&["check-config", "--config", &path]).await;

    assert!(out.status.success(), "stderr:\n{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(stdout.trim(), format!("{path}: ok (2 listener(s), 1 route(s))"));
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p.display().to_string()
}

/// The example manifests' placeholder admin token, or one shorter than 32 bytes, stops
/// `serve` with exit 78 and the reason (never the token), before anything listens; a
/// long random one starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_placeholder_or_short_admin_token_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let admin_port = free_port();
    let token_file = dir.path().join("admin.token");
    let yaml =
        format!("{}admin:\n  address: 127.0.0.1:{admin_port}\n  token_file: {}\n", good(port), token_file.display());
    let path = dir.path().join("gatehouse.yaml");
    std::fs::write(&path, yaml).unwrap();
    let file = path.display().to_string();
    let short = "0123456789abcdef0123456789abcde"; // 31 bytes
    for (token, reason) in [
        ("replace-me-with-a-long-random-token\n", "is the placeholder of the example manifests"),
        (short, "is 31 bytes long; at least 32 are required"),
    ] {
        std::fs::write(&token_file, token).unwrap();
        let out = run_cli(&["--log-format", "json", "serve", "--config", &file]).await;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(EXIT_CONFIG), "stderr:\n{stderr}");
        let named = format!("the admin token in {}", token_file.display());
        assert!(stderr.contains(&named) && stderr.contains(reason), "no {reason:?} in:\n{stderr}");
        assert!(!stderr.contains(token.trim()), "the token is in the message:\n{stderr}");
        for p in [port, admin_port] {
            assert!(connection_refused(SocketAddr::from((Ipv4Addr::LOCALHOST, p))).await, "something listens on {p}");
        }
    }
}
