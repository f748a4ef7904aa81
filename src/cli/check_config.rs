//! `gatehouse check-config`: validate everything `serve` would load, print every problem.

use super::EXIT_CONFIG;
use crate::config::Config;
use crate::tls;
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
    let mut failed = false;
    for l in &config.listeners {
        if let Some(files) = &l.tls
            && let Err(e) = tls::acceptor(files)
        {
            eprintln!("{}: listener {}: TLS certificate {e}", config_path.display(), l.name);
            failed = true;
        }
    }
    if failed {
        return ExitCode::from(EXIT_CONFIG);
    }
    println!(
        "{}: ok ({} listener(s), {} route(s))",
        config_path.display(),
        config.listeners.len(),
        config.routes.len()
    );
    ExitCode::SUCCESS
}
