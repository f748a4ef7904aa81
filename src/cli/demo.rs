//! `gatehouse demo`: a gateway on 127.0.0.1 in front of a built-in echo upstream, with a
//! throw-away config, credentials file and master key written to a temporary directory
//! and loaded like any other. One api_key user and one hmac user, whose role grants
//! `/api/**` and `/whoami` (anything else is a 403 to show); `/public/` is open; an admin
//! listener serves `/metrics` and the admin API.

use super::{runtime, shutdown_signal};
use crate::cli::echo;
use crate::config::Config;
use crate::credentials::file::{AuthMethod, FileCredentials};
use crate::credentials::ops::{self, UserFields};
use crate::credentials::{load_or_create_master_key, mint_api_key, mint_hmac_key};
use crate::server::listen::Server;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::ExitCode;

pub fn run(port: u16, admin_port: u16) -> ExitCode {
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    rt.block_on(async {
        match demo(port, admin_port).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("gatehouse demo: {e}");
                ExitCode::FAILURE
            }
        }
    })
}

/// Writes the demo's credentials; returns (token, hmac key id, hmac secret) to show once.
fn write_credentials(dir: &Path) -> Result<(String, String, String), String> {
    let master = load_or_create_master_key(&dir.join("master.key")).map_err(|e| e.to_string())?;
    let rng = |e: getrandom::Error| format!("no OS randomness: {e}");
    let (api_key, token) = mint_api_key("demo").map_err(rng)?;
    let (hmac_key, secret) = mint_hmac_key(&master, "demo").map_err(rng)?;
    let hmac_id = hmac_key.id.value.clone();
    let mut creds = FileCredentials::default();
    let fields = |id: &str| UserFields {
        display_name: Some(format!("Demo {id}")),
        description: Some("created by gatehouse demo".into()),
        organization: Some("acme".into()),
        teams: Some(vec!["demo".into()]),
        default_team: Some(Some("demo".into())),
        roles: Some(vec!["demo".into()]),
        ..UserFields::default()
    };
    let fail = |e: crate::credentials::store::StoreError| e.to_string();
    let rules = vec!["* /api/**".into(), "GET /whoami".into()];
    ops::set_role(&mut creds, "demo", "the demo's API".into(), rules).map_err(fail)?;
    ops::create_user(&mut creds, "demo-api", AuthMethod::ApiKey, fields("demo-api")).map_err(fail)?;
    ops::create_user(&mut creds, "demo-hmac", AuthMethod::Hmac, fields("demo-hmac")).map_err(fail)?;
    creds.users[0].keys.push(api_key);
    creds.users[1].keys.push(hmac_key);
    let yaml = serde_saphyr::to_string(&creds).map_err(|e| format!("cannot write credentials: {e}"))?;
    std::fs::write(dir.join("credentials.yaml"), yaml).map_err(|e| format!("cannot write credentials: {e}"))?;
    Ok((token.expose().to_string(), hmac_id, secret.expose().to_string()))
}

async fn demo(port: u16, admin_port: u16) -> Result<(), String> {
    let echo = echo::spawn(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
        .await
        .map_err(|e| format!("cannot start the echo upstream: {e}"))?;
    let dir = tempfile::tempdir().map_err(|e| format!("cannot create a temporary directory: {e}"))?;
    let (token, key_id, secret) = write_credentials(dir.path())?;
    let mut admin_token = [0u8; 32];
    getrandom::fill(&mut admin_token).map_err(|e| format!("no OS randomness: {e}"))?;
    let admin_token = hex::encode(admin_token);
    let token_file = dir.path().join("admin.token");
    std::fs::write(&token_file, &admin_token).map_err(|e| format!("cannot write {}: {e}", token_file.display()))?;
    let path = dir.path().join("gatehouse.yaml");
    let d = dir.path().display();
    let yaml = format!(
        "listeners:\n  - address: 127.0.0.1:{port}\n    name: demo\n\
         admin:\n  address: 127.0.0.1:{admin_port}\n  token_file: {d}/admin.token\n\
         credentials: {d}/credentials.yaml\nmaster_key: {d}/master.key\n\
         routes:\n  - name: public\n    path_prefix: /public/\n    upstream: http://{echo}\n    allow_anonymous: true\n\
         \x20 - name: api\n    path_prefix: /\n    upstream: http://{echo}\n    timeout: 10s\n"
    );
    std::fs::write(&path, yaml).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    let config = Config::load(&path).map_err(|e| e.to_string())?;
    let server = Server::bind(&config)
        .await
        .map_err(|e| format!("{e} (is another program using port {port} or {admin_port}? try --port, --admin-port)"))?;
    let base = format!("http://127.0.0.1:{port}");
    let admin = format!("http://127.0.0.1:{admin_port}");
    let exe = std::env::current_exe().map_or_else(|_| "gatehouse".to_string(), |p| p.display().to_string());
    println!(
        "\nGatehouse demo is running. The echo upstream answers with what it received.\n\
         \nAPI user demo-api (api_key)  token: {token}\
         \nAPI user demo-hmac (hmac)    key id: {key_id}  secret: {secret}\
         \n(shown once; they live in {d} until the demo stops)\n\
         \nTry:\
         \n  curl -s -H 'X-API-Key: {token}' {base}/api/v1/hello?x=1\
         \n  curl -s -H 'Authorization: Bearer {token}' -X POST --data '{{\"order\":42}}' {base}/api/v1/orders\
         \n  curl -s {base}/api/v1/hello $({exe} sign --key-id {key_id} --secret {secret} --method GET --path /api/v1/hello --curl)\
         \n  python3 examples/hmac_client.py --url {base}/api/v1/orders --key-id {key_id} --secret {secret} --method POST --body '{{\"order\":42}}'\
         \n  curl -s {base}/public/status                                # anonymous route\
         \n  curl -s -i {base}/api/v1/hello                              # 401: API key is missing\
         \n  curl -s -H 'X-API-Key: {token}' {base}/internal/report      # 403: no rule grants it\
         \n  curl -s -H 'X-API-Key: {token}' -H 'X-Gatehouse-User: admin' {base}/whoami   # spoofed identity: replaced\
         \n  curl -s {admin}/metrics | grep '^gatehouse_requests_total'  # metrics (admin listener)\
         \n\nEach request leaves one JSON audit line on this terminal.\
         \nAdmin API token: {admin_token}  (curl -s -H 'Authorization: Bearer …' {admin}/admin/v1/users)\
         \n\nManage its API users from another terminal (docs/admin.md):\
         \n  export GATEHOUSE_CREDENTIALS={creds}\
         \n  {exe} users list\
         \n\nPress Ctrl-C to stop.\n",
        creds = dir.path().join("credentials.yaml").display()
    );
    server.run(shutdown_signal()).await;
    Ok(())
}
