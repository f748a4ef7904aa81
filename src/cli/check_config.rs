//! `gatehouse check-config`: validate everything `serve` would load, print every problem.

use super::EXIT_CONFIG;
use crate::config::Config;
use crate::credentials::reload::Credentials;
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
    for r in &config.routes {
        if let Some(cfg) = &r.upstream_tls
            && let Err(e) = tls::upstream::client(cfg, r.protocol)
        {
            eprintln!("{}: route {}: upstream TLS: {e}", config_path.display(), r.name);
            failed = true;
        }
    }
    let rt = match super::runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    let credentials = match rt.block_on(Credentials::open(&config)) {
        Ok(c) => Some(c.snapshot()),
        Err(e) => {
            eprintln!("{e}");
            failed = true;
            None
        }
    };
    if let Some(shared) = &config.shared_state {
        // Reached the way `serve` reaches it (URL, TLS, AUTH, a script run), without
        // counting as a gateway alive.
        let reached = rt.block_on(crate::shared::Shared::connect_tool(shared)).map(|_| ());
        match reached {
            Ok(()) => println!("{}: ok (shared state in Redis at {})", config_path.display(), shared.describe()),
            Err(e) => {
                eprintln!("{}: {e}", config_path.display());
                failed = true;
            }
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
    if let (Some(path), Some(snap)) = (&config.credentials, &credentials) {
        println!("{}: ok ({} user(s), {} key(s))", path.display(), snap.user_count(), snap.key_count());
    }
    if let (Some(db), Some(snap)) = (&config.credential_db, &credentials) {
        println!("{}: ok ({} user(s), {} key(s))", db.describe(), snap.user_count(), snap.key_count());
    }
    ExitCode::SUCCESS
}
