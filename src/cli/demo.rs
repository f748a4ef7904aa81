//! `gatehouse demo`: a gateway on 127.0.0.1 in front of a built-in echo upstream, with a
//! throw-away config written to a temporary directory and loaded like any other.

use super::{runtime, shutdown_signal};
use crate::config::Config;
use crate::echo;
use crate::listen::Server;
use std::net::{Ipv4Addr, SocketAddr};
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

async fn demo(port: u16) -> Result<(), String> {
    let echo = echo::spawn(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
        .await
        .map_err(|e| format!("cannot start the echo upstream: {e}"))?;
    let dir = tempfile::tempdir().map_err(|e| format!("cannot create a temporary directory: {e}"))?;
    let path = dir.path().join("gatehouse.yaml");
    let yaml = format!(
        "listeners:\n  - address: 127.0.0.1:{port}\n    name: demo\nroutes:\n  - name: echo\n    path_prefix: /\n    upstream: http://{echo}\n    allow_anonymous: true\n    timeout: 10s\n"
    );
    std::fs::write(&path, yaml).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    let config = Config::load(&path).map_err(|e| e.to_string())?;
    let server =
        Server::bind(&config).await.map_err(|e| format!("{e} (is another program using port {port}? try --port)"))?;
    let base = format!("http://127.0.0.1:{port}");
    println!(
        "\nGatehouse demo is running. The echo upstream at http://{echo} answers with what it received.\n\n\
         Try:\n  curl -s {base}/api/v1/hello?x=1\n  curl -s -X POST --data '{{\"order\":42}}' -H 'Content-Type: application/json' {base}/api/v1/orders\n  \
         curl -s -H 'X-Gatehouse-User: admin' {base}/whoami      # spoofed identity: stripped\n  curl -s -i '{base}/a/%2e%2e/%2e%2e/etc'                  # 400: escapes the root\n\n\
         Press Ctrl-C to stop.\n"
    );
    server.run(shutdown_signal()).await;
    Ok(())
}
