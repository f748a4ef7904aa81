//! No token or signing secret is ever written anywhere but to the client it was made for:
//! not to the credentials file, not to the logs (debug
//! included), not into an error body. The file holds a digest and a sealed secret.

use crate::support::client::H1;
use crate::support::creds::{ApiKey, Creds, Headers, HmacKey, unix_now};
use crate::support::gateway::{RouteSpec, TestGateway};
use crate::support::process::GatewayProcess;
use crate::support::upstream::TestUpstream;
use crate::support::{Reply, STEP, free_port, within};
use base64::Engine;
use gatehouse::credentials::file::{FileCredentials, Status};
use gatehouse::credentials::mint_api_key;
use sha2::{Digest, Sha256};
use std::time::Duration;

/// Every string that must not leak for `secret`: the whole of it, and each 16-character
/// run of it after its prefix (so a token logged with one character changed, cut short,
/// or without its prefix is still found).
fn needles(secret: &str) -> Vec<String> {
    let body = &secret[4..];
    let mut out = vec![secret.to_string()];
    let mut i = 0;
    while i + 16 <= body.len() {
        out.push(body[i..i + 16].to_string());
        i += 8;
    }
    out
}

/// Asserts that no needle of any secret appears in `haystack` (named `what`).
fn assert_no_secret(what: &str, haystack: &str, secrets: &[String]) {
    for s in secrets {
        for n in needles(s) {
            if let Some(line) = haystack.lines().find(|l| l.contains(&n)) {
                panic!("{what} contains (part of) a secret, {n:?}, in:\n{line}");
            }
        }
    }
}

/// A token with one character changed: what a client with a typo sends.
fn typo(token: &str) -> String {
    let mut b = token.as_bytes().to_vec();
    b[30] = if b[30] == b'a' { b'b' } else { b'a' };
    String::from_utf8(b).unwrap()
}

/// Checks the file on disk: digests and hints for tokens, sealed secrets for hmac keys,
/// and neither a token nor a secret in the clear.
fn assert_file_holds_no_secret(yaml: &str, creds: &Creds, tokens: &[ApiKey], hmacs: &[HmacKey], all: &[String]) {
    assert_no_secret("the credentials file", yaml, all);
    let file: FileCredentials = serde_saphyr::from_str(yaml).unwrap();
    let keys: Vec<_> = file.users.iter().flat_map(|u| u.keys.iter()).collect();
    for t in tokens {
        let k = keys.iter().find(|k| k.id.value == t.key_id).unwrap();
        assert_eq!(k.token_sha256.as_deref(), Some(hex::encode(Sha256::digest(t.token.as_bytes())).as_str()));
        assert_eq!(k.hint.as_deref(), Some(format!("ghk_…{}", &t.token[t.token.len() - 4..]).as_str()));
        assert!(k.secret_sealed.is_none());
    }
    for h in hmacs {
        let k = keys.iter().find(|k| k.id.value == h.key_id).unwrap();
        let sealed = k.secret_sealed.as_deref().unwrap();
        assert_ne!(sealed, h.secret);
        let raw = base64::engine::general_purpose::STANDARD.decode(sealed).unwrap();
        assert!(
            !raw.windows(16).any(|w| h.secret.as_bytes().windows(16).any(|s| s == w)),
            "sealed bytes hold the secret"
        );
        // It really is the secret, sealed: the master key opens it, for this key id only.
        assert_eq!(creds.master_key().open(&h.key_id, sealed).unwrap().expose(), h.secret);
        assert!(creds.master_key().open("hk_another", sealed).is_err());
        assert!(k.token_sha256.is_none() && k.hint.is_none());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_token_or_secret_reaches_the_file_the_logs_or_an_error_body() {
    let up = TestUpstream::start().await;
    let mut creds = Creds::new();
    let key = creds.api_user("svc");
    let revoked = creds.add_api_key("svc");
    creds.revoke(&revoked.key_id);
    let sleepy = creds.api_user("sleepy");
    creds.set_status("sleepy", Status::Inactive);
    let hmac = creds.hmac_user("signer");
    let config = TestGateway::builder()
        .credentials(&creds)
        .auth_hmac("max_body", "1KiB")
        .route(RouteSpec::new("api", "/api/").to(&up).authenticated());
    let mut gw = GatewayProcess::serve_with_env(&config, &[("GATEHOUSE_LOG", "debug")]).await;
    let client = H1::new();
    let url = |p: &str| format!("http://{}{p}", gw.addr());
    let mut errors: Vec<Reply> = Vec::new();
    let (_, stranger) = mint_api_key("never stored").unwrap();
    let stranger = stranger.expose().to_string();

    // Requests of both kinds, good and bad.
    let api_requests = |k: &ApiKey| -> Vec<Headers> {
        vec![
            vec![("x-api-key", k.token.clone())],
            vec![("authorization", format!("Bearer {}", k.token))],
            vec![("authorization", k.token.clone())],
            vec![("x-api-key", typo(&k.token))],
            vec![("x-api-key", k.token[..40].to_string())],
            vec![("x-api-key", k.token.clone()), ("x-signature", "00".repeat(32))],
            vec![("x-api-key", k.token.clone()), ("authorization", format!("Bearer {stranger}"))],
        ]
    };
    let hmac_requests = |h: &HmacKey| -> Vec<(Headers, Vec<u8>)> {
        let body = br#"{"order":42}"#.to_vec();
        let good = h.headers("POST", "/api/orders?x=1", &body);
        let mut wrong = h.headers("POST", "/api/orders?x=1", &body);
        wrong[2].1 = gatehouse::pipeline::authn::sign_hex("ghs_wrong", &wrong[1].1, "POST", "/api/orders?x=1", &body);
        let stale = h.headers_at(unix_now() - 3600, "POST", "/api/orders?x=1", &body);
        let big = vec![b'x'; 2048];
        vec![
            (good.clone(), body.clone()),
            (good, body.clone()), // a replay
            (wrong, body.clone()),
            (h.headers("POST", "/api/orders?x=1", b"other"), body.clone()), // tampered
            (stale, body.clone()),
            (h.headers("POST", "/api/orders?x=1", &big), big),
            (vec![("x-api-key", h.key_id.clone())], body),
        ]
    };
    let run = async |api: &[ApiKey], hmacs: &[HmacKey], errors: &mut Vec<Reply>| {
        let mut ok = 0;
        for k in api {
            for headers in api_requests(k) {
                let res = client.request("GET", &url("/api/x"), &headers, Vec::new()).await;
                if res.status == 200 { ok += 1 } else { errors.push(res) }
            }
        }
        for h in hmacs {
            for (headers, body) in hmac_requests(h) {
                let res = client.request("POST", &url("/api/orders?x=1"), &headers, body).await;
                if res.status == 200 { ok += 1 } else { errors.push(res) }
            }
        }
        ok
    };
    let ok = run(&[key.clone(), revoked.clone(), sleepy.clone()], std::slice::from_ref(&hmac), &mut errors).await;
    assert_eq!(ok, 3 + 1, "three header forms of the good key and one signed request");

    // Keys created the way `gatehouse demo` creates them, picked up by a reload.
    let late_key = creds.add_api_key("svc");
    let late_hmac = creds.hmac_user("late-signer");
    gw.write_credentials(&creds);
    within(STEP, "the new keys to be in force", async {
        while client.get_with(&url("/api/x"), &[("x-api-key", &late_key.token)]).await.status != 200 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let reloads = gw.count_logged("credentials reloaded");
    gw.sighup();
    gw.logged("credentials reloaded", reloads + 1).await;
    let ok = run(std::slice::from_ref(&late_key), std::slice::from_ref(&late_hmac), &mut errors).await;
    assert_eq!(ok, 3 + 1);

    gw.sigterm();
    assert_eq!(gw.wait(STEP).await.code(), Some(0));

    let tokens = [key, revoked, sleepy, late_key];
    let hmacs = [hmac, late_hmac];
    let mut all: Vec<String> = tokens.iter().map(|k| k.token.clone()).collect();
    all.extend(hmacs.iter().map(|h| h.secret.clone()));
    all.push(stranger);

    let yaml = std::fs::read_to_string(gw.credentials_path()).unwrap();
    assert_file_holds_no_secret(&yaml, &creds, &tokens, &hmacs, &all);
    let (stdout, stderr) = (gw.stdout(), gw.stderr());
    assert!(stderr.contains("\"level\":\"DEBUG\""), "debug logs are not on: {stderr}");
    assert!(stderr.contains("credentials reload") && stderr.contains("\"message\":\"request\""), "{stderr}");
    assert_no_secret("stderr", &stderr, &all);
    assert_no_secret("stdout", &stdout, &all);
    assert!(errors.len() >= 20, "{} error responses", errors.len());
    for e in &errors {
        assert!(e.status.is_client_error(), "{e:?}");
        let mut text = e.text();
        for (name, value) in &e.headers {
            text.push_str(&format!("\n{name}: {}", String::from_utf8_lossy(value.as_bytes())));
        }
        assert_no_secret("an error response", &text, &all);
    }
}

/// The demo prints its token and secret once, on stdout, by design: they must not also
/// end up in its logs or in the credentials file it writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_keeps_its_secrets_out_of_its_logs_and_its_file() {
    let port = free_port();
    let mut demo = GatewayProcess::demo_with_env(port, &[("GATEHOUSE_LOG", "debug")]).await;
    let out = demo.stdout();
    let after = |label: &str| -> String {
        let i = out.find(label).unwrap_or_else(|| panic!("{label:?} not in {out}")) + label.len();
        out[i..].split_whitespace().next().unwrap().to_string()
    };
    let (token, key_id, secret) = (after("token: "), after("key id: "), after("secret: "));
    let dir = after("they live in ");
    let client = H1::new();
    let base = format!("http://127.0.0.1:{port}");

    let ok = client.get_with(&format!("{base}/api/v1/hello"), &[("x-api-key", &token)]).await;
    assert_eq!(ok.status, 200, "{}", ok.text());
    let h = HmacKey { key_id, secret: secret.clone() };
    let signed = client
        .request("GET", &format!("{base}/api/v1/hello"), &h.headers("GET", "/api/v1/hello", b""), Vec::new())
        .await;
    assert_eq!(signed.status, 200, "{}", signed.text());
    let bad = client.get_with(&format!("{base}/api/v1/hello"), &[("x-api-key", &typo(&token))]).await;
    assert_eq!(bad.status, 401);
    let yaml = std::fs::read_to_string(std::path::Path::new(&dir).join("credentials.yaml")).unwrap();

    demo.sigterm();
    assert_eq!(demo.wait(STEP).await.code(), Some(0));

    let all = [token, secret];
    assert_no_secret("the demo's credentials file", &yaml, &all);
    assert_no_secret("the demo's stderr", &demo.stderr(), &all);
    assert_no_secret("a 401 body", &bad.text(), &all);
}
