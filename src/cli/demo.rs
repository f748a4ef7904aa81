//! `gatehouse demo`: a gateway on 127.0.0.1 in front of a built-in echo upstream, with a
//! throw-away config, credentials file and master key written to a temporary directory
//! and loaded like any other. One api_key user and one hmac user; `/public/` is open.

use super::{runtime, shutdown_signal};
use crate::config::Config;
use crate::credentials::file::{AuthMethod, FileCredentials, FileRole, FileUser, Status};
use crate::credentials::{load_or_create_master_key, mint_api_key, mint_hmac_key};
use crate::echo;
use crate::listen::Server;
use serde_saphyr::{Location, Spanned};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::ExitCode;

pub fn run(port: u16) -> ExitCode {
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    rt.block_on(async {
        match demo(port).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("gatehouse demo: {e}");
                ExitCode::FAILURE
            }
        }
    })
}

fn spanned<T>(v: T) -> Spanned<T> {
    Spanned::new(v, Location::UNKNOWN, Location::UNKNOWN)
}

fn demo_user(id: &str, method: AuthMethod, org: &str) -> FileUser {
    let now = time::OffsetDateTime::now_utc().replace_nanosecond(0).unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    FileUser {
        id: spanned(id.to_string()),
        display_name: format!("Demo {id}"),
        description: "created by gatehouse demo".into(),
        organization: org.into(),
        teams: vec!["demo".into()],
        default_team: Some("demo".into()),
        roles: vec![spanned("demo".to_string())],
        status: Status::Active,
        auth_method: method,
        allowed_endpoints: vec![],
        allow_proxied_users: false,
        allowed_proxied_users: vec![],
        rate_limit: None,
        keys: vec![],
        created_at: now,
        updated_at: now,
    }
}

/// Writes the demo's credentials; returns (token, hmac key id, hmac secret) to show once.
fn write_credentials(dir: &Path) -> Result<(String, String, String), String> {
    let master = load_or_create_master_key(&dir.join("master.key")).map_err(|e| e.to_string())?;
    let rng = |e: getrandom::Error| format!("no OS randomness: {e}");
    let (api_key, token) = mint_api_key("demo").map_err(rng)?;
    let (hmac_key, secret) = mint_hmac_key(&master, "demo").map_err(rng)?;
    let hmac_id = hmac_key.id.value.clone();
    let mut api_user = demo_user("demo-api", AuthMethod::ApiKey, "acme");
    api_user.keys.push(api_key);
    let mut hmac_user = demo_user("demo-hmac", AuthMethod::Hmac, "acme");
    hmac_user.keys.push(hmac_key);
    let mut creds = FileCredentials::default();
    creds
        .roles
        .insert("demo".into(), FileRole { description: "everything".into(), rules: vec![spanned("* /**".into())] });
    creds.users = vec![api_user, hmac_user];
    let yaml = serde_saphyr::to_string(&creds).map_err(|e| format!("cannot write credentials: {e}"))?;
    std::fs::write(dir.join("credentials.yaml"), yaml).map_err(|e| format!("cannot write credentials: {e}"))?;
    Ok((token.expose().to_string(), hmac_id, secret.expose().to_string()))
}

async fn demo(port: u16) -> Result<(), String> {
    let echo = echo::spawn(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
        .await
        .map_err(|e| format!("cannot start the echo upstream: {e}"))?;
    let dir = tempfile::tempdir().map_err(|e| format!("cannot create a temporary directory: {e}"))?;
    let (token, key_id, secret) = write_credentials(dir.path())?;
    let path = dir.path().join("gatehouse.yaml");
    let d = dir.path().display();
    let yaml = format!(
        "listeners:\n  - address: 127.0.0.1:{port}\n    name: demo\n\
         credentials: {d}/credentials.yaml\nmaster_key: {d}/master.key\n\
         routes:\n  - name: public\n    path_prefix: /public/\n    upstream: http://{echo}\n    allow_anonymous: true\n\
         \x20 - name: api\n    path_prefix: /\n    upstream: http://{echo}\n    timeout: 10s\n"
    );
    std::fs::write(&path, yaml).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    let config = Config::load(&path).map_err(|e| e.to_string())?;
    let server =
        Server::bind(&config).await.map_err(|e| format!("{e} (is another program using port {port}? try --port)"))?;
    let base = format!("http://127.0.0.1:{port}");
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
         \n  curl -s -H 'X-API-Key: {token}' -H 'X-Gatehouse-User: admin' {base}/whoami   # spoofed identity: replaced\
         \n\nManage its API users from another terminal (README \"Managing API users\"):\
         \n  export GATEHOUSE_CREDENTIALS={creds}\
         \n  {exe} users list\
         \n\nPress Ctrl-C to stop.\n",
        creds = dir.path().join("credentials.yaml").display()
    );
    server.run(shutdown_signal()).await;
    Ok(())
}
