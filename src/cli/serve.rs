//! `gatehouse serve`: load, bind, serve until SIGTERM/SIGINT, drain, exit 0.

use super::{EXIT_CONFIG, runtime, shutdown_signal};
use crate::config::Config;
use crate::server::listen::{Server, StartError};
use std::path::Path;
use std::process::ExitCode;

pub fn run(config_path: &Path) -> ExitCode {
    let config = match Config::load(config_path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    rt.block_on(async {
        let server = match Server::bind(&config).await {
            Ok(s) => s,
            Err(e) => {
                eprintln!("gatehouse: {e}");
                // A port in use is an operational failure; a bad certificate or
                // credentials file is a configuration error, like the config file itself.
                return match e {
                    StartError::Bind { .. } => ExitCode::FAILURE,
                    StartError::Tls(_)
                    | StartError::UpstreamTls { .. }
                    | StartError::Credentials(_)
                    | StartError::Admin(_)
                    | StartError::SharedState(_) => ExitCode::from(EXIT_CONFIG),
                };
            }
        };
        server.run(shutdown_signal()).await;
        ExitCode::SUCCESS
    })
}
