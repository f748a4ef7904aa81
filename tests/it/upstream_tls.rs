//! `https://` upstreams (docs/configuration.md#upstreams): a private CA, the certificate
//! checks that refuse a target (unknown CA, expired, another name) with 502 and nothing
//! sent, mTLS with a client certificate that is reloaded when its files change, and
//! connection reuse over TLS. Certificates are made in each test with rcgen; the
//! upstreams are real rustls servers.

use crate::support::assert_error;
use crate::support::client::H1;
use crate::support::gateway::{RouteSpec, TestGateway};
use crate::support::pki::Ca;
use crate::support::process::{GatewayProcess, run_cli};
use crate::support::upstream::{Mode, TestUpstream};

const TLS_FAILED: &str = "upstream TLS handshake failed; nothing was sent";

/// The `reason` of the TLS warning logged for `route`.
fn tls_reason(gw: &GatewayProcess, route: &str) -> String {
    gw.logged_lines(TLS_FAILED)
        .into_iter()
        .find(|l| l["route"] == route)
        .and_then(|l| l["reason"].as_str().map(str::to_string))
        .unwrap_or_else(|| panic!("no TLS warning for route {route}:\n{}", gw.stderr()))
}

/// A private CA: the good target passes (by its host's name, and by a configured
/// `server_name`); an unknown CA, an expired certificate and another name each give 502
/// with the §5 body, the upstream completes no handshake and sees no request, and the
/// log line says which check failed.
#[tokio::test]
async fn https_upstream_is_verified_against_the_private_ca() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, other_ca) = (Ca::new("Gatehouse test CA"), Ca::new("Someone else's CA"));
    let ca_path = ca.write(dir.path(), "ca.pem");
    let good = TestUpstream::tls(Mode::Echo, &ca.leaf(&["localhost"]), None).await;
    let unknown = TestUpstream::tls(Mode::Echo, &other_ca.leaf(&["localhost"]), None).await;
    let expired = TestUpstream::tls(Mode::Echo, &ca.expired_leaf(&["localhost"]), None).await;
    let elsewhere = TestUpstream::tls(Mode::Echo, &ca.leaf(&["orders.internal"]), None).await;
    let trust = format!("upstream_tls: {{ ca: {} }}", ca_path.display());
    let route = |name: &str, up: &TestUpstream| {
        RouteSpec::new(name, &format!("/{name}"))
            .upstream_url(&format!("https://localhost:{}", up.port()))
            .setting(&trust)
    };
    let named = RouteSpec::new("named", "/named")
        .upstream_url(&format!("https://127.0.0.1:{}", elsewhere.port()))
        .setting(&format!("upstream_tls: {{ ca: {}, server_name: orders.internal }}", ca_path.display()));
    let gw = GatewayProcess::serve(
        &TestGateway::builder()
            .route(route("good", &good))
            .route(route("unknown-ca", &unknown))
            .route(route("expired", &expired))
            .route(route("wrong-name", &elsewhere))
            .route(named),
    )
    .await;
    let client = H1::new();

    let ok = client.get(&gw.url("/good/orders?page=2")).await;
    assert_eq!(ok.status, 200, "{}", ok.text());
    assert_eq!(good.only_request().target, "/good/orders?page=2");
    let ok = client.get(&gw.url("/named/x")).await;
    assert_eq!(ok.status, 200, "{}", ok.text());
    assert_eq!(elsewhere.only_request().target, "/named/x");

    for (route, up, check) in [
        ("unknown-ca", &unknown, "UnknownIssuer"),
        ("expired", &expired, "certificate expired"),
        ("wrong-name", &elsewhere, "certificate not valid for name \"localhost\""),
    ] {
        let before = up.count();
        let reply = client.get(&gw.url(&format!("/{route}/orders"))).await;
        assert_error(&reply, 502, "upstream_error", "Upstream service is unavailable");
        assert_eq!(up.count(), before, "{route}: the upstream saw a request");
        assert!(up.tls_failures() >= 1, "{route}: the upstream saw no failed handshake");
        gw.logged(TLS_FAILED, 1).await;
        let reason = tls_reason(&gw, route);
        assert!(reason.contains(check), "{route}: {reason}");
    }
}

/// Without `upstream_tls.ca` the system's roots are used: a private CA's certificate is
/// then refused, verification is never skipped.
#[tokio::test]
async fn without_a_ca_bundle_the_system_roots_decide() {
    let ca = Ca::new("Private CA");
    let up = TestUpstream::tls(Mode::Echo, &ca.leaf(&["localhost"]), None).await;
    let gw = TestGateway::builder()
        .route(RouteSpec::new("r", "/").upstream_url(&format!("https://localhost:{}", up.port())))
        .start()
        .await;
    let reply = H1::new().get(&gw.url("/x")).await;
    assert_error(&reply, 502, "upstream_error", "Upstream service is unavailable");
    assert_eq!(up.count(), 0);
}

/// Requests to an https upstream reuse one kept-alive connection.
#[tokio::test]
async fn https_connections_are_kept_alive_and_reused() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("CA");
    let up = TestUpstream::tls(Mode::Echo, &ca.leaf(&["localhost"]), None).await;
    let gw = TestGateway::builder()
        .route(
            RouteSpec::new("r", "/")
                .upstream_url(&format!("https://localhost:{}", up.port()))
                .setting(&format!("upstream_tls: {{ ca: {} }}", ca.write(dir.path(), "ca.pem").display())),
        )
        .start()
        .await;
    let client = H1::new();
    for i in 0..20 {
        let reply = client.get(&gw.url(&format!("/n/{i}"))).await;
        assert_eq!(reply.status, 200, "{}", reply.text());
    }
    assert_eq!(up.count(), 20);
    assert_eq!(up.connections(), 1, "each request should reuse the one TLS connection");
}

/// mTLS: an upstream that requires a client certificate from its CA gets 502 without
/// one (the log names the TLS alert), passes with one, and a client certificate rotated
/// on disk is used from then on with no restart.
#[tokio::test]
async fn mtls_upstream_needs_the_client_certificate_and_rotation_is_picked_up() {
    let dir = tempfile::tempdir().unwrap();
    let (server_ca, client_ca, stranger_ca) = (Ca::new("server CA"), Ca::new("client CA"), Ca::new("stranger CA"));
    let ca_path = server_ca.write(dir.path(), "ca.pem");
    let up = TestUpstream::tls(Mode::Echo, &server_ca.leaf(&["localhost"]), Some(&client_ca.pem())).await;
    let url = format!("https://localhost:{}", up.port());
    // The gateway starts with a certificate the upstream does not trust.
    let (cert, key) = stranger_ca.leaf(&["gatehouse"]).write(dir.path(), "client");
    let gw = GatewayProcess::serve(
        &TestGateway::builder()
            .route(
                RouteSpec::new("none", "/none")
                    .upstream_url(&url)
                    .setting(&format!("upstream_tls: {{ ca: {} }}", ca_path.display())),
            )
            .route(RouteSpec::new("mtls", "/mtls").upstream_url(&url).setting(&format!(
                "upstream_tls: {{ ca: {}, client_cert: {}, client_key: {} }}",
                ca_path.display(),
                cert.display(),
                key.display()
            ))),
    )
    .await;
    let client = H1::new();

    let reply = client.get(&gw.url("/none/x")).await;
    assert_error(&reply, 502, "upstream_error", "Upstream service is unavailable");
    let reply = client.get(&gw.url("/mtls/x")).await;
    assert_error(&reply, 502, "upstream_error", "Upstream service is unavailable");
    assert_eq!(up.count(), 0);
    gw.logged("upstream TLS failed", 2).await;
    let alerts: Vec<String> = gw
        .logged_lines("upstream TLS failed")
        .iter()
        .filter_map(|l| l["reason"].as_str().map(str::to_string))
        .collect();
    assert!(alerts.iter().any(|r| r.contains("CertificateRequired")), "{alerts:?}");
    assert!(alerts.iter().any(|r| r.contains("alert")), "{alerts:?}");

    // Rotated on disk to a certificate from the CA the upstream trusts.
    client_ca.leaf(&["gatehouse"]).write(dir.path(), "client");
    gw.logged("TLS certificate reloaded", 1).await;
    let reply = client.get(&gw.url("/mtls/x")).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(up.only_request().target, "/mtls/x");
}

/// What `check-config` (and `serve`, exit 78) says about upstream TLS settings that
/// cannot work.
#[tokio::test]
async fn bad_upstream_tls_settings_are_configuration_errors() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty.pem");
    std::fs::write(&empty, "not a certificate\n").unwrap();
    let cases = [
        ("http://127.0.0.1:9", "upstream_tls: { ca: /nonexistent/ca.pem }", "upstream_tls needs https:// upstreams"),
        (
            "https://127.0.0.1:9",
            "upstream_tls: { ca: /nonexistent/ca.pem }",
            "upstream_tls: cannot read /nonexistent/ca.pem",
        ),
        (
            "https://127.0.0.1:9",
            &format!("upstream_tls: {{ ca: {} }}", empty.display()),
            "no usable CA certificate in file",
        ),
        (
            "https://127.0.0.1:9",
            &format!("upstream_tls: {{ client_cert: {} }}", empty.display()),
            "client_cert and client_key go together",
        ),
        ("https://127.0.0.1:9", "upstream_tls: { server_name: \"bad name!\" }", "is not a DNS name or IP address"),
        ("https://127.0.0.1:9/a/../b", "strip_prefix: false", "the base path must be a normalised path"),
    ];
    for (url, setting, expected) in cases {
        let written = TestGateway::builder().route(RouteSpec::new("r", "/").upstream_url(url).setting(setting)).write();
        let out = run_cli(&["check-config", "--config", &written.path.display().to_string()]).await;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(78), "{setting}: {stderr}");
        assert!(stderr.contains(expected), "{setting}: {stderr}");
    }
    // Two targets of one route with different base paths.
    let written = TestGateway::builder()
        .route(RouteSpec::new("r", "/").upstream_url("http://127.0.0.1:9/a").upstream_url("http://127.0.0.1:10/b"))
        .write();
    let out = run_cli(&["check-config", "--config", &written.path.display().to_string()]).await;
    assert_eq!(out.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&out.stderr).contains("the same scheme and the same base path"));
}
