//! `gatehouse sign`: the three HMAC headers for one request, for integrators testing
//! their client (docs/authentication.md#hmac-signatures).

use crate::pipeline::authn::sign_hex;
use std::path::PathBuf;
use std::process::ExitCode;

/// The arguments of `gatehouse sign`.
#[derive(Debug, clap::Args)]
pub struct SignArgs {
    /// The key's public id (sent as X-API-Key).
    #[arg(long)]
    key_id: String,
    /// The signing secret (or set GATEHOUSE_HMAC_SECRET, which keeps it out of shell history).
    #[arg(long, env = "GATEHOUSE_HMAC_SECRET", hide_env_values = true)]
    secret: String,
    /// Request method (signed upper-case).
    #[arg(long)]
    method: String,
    /// Request target exactly as it will be sent: path plus `?query` when there is one.
    #[arg(long)]
    path: String,
    /// File holding the exact request body (none: empty body).
    #[arg(long)]
    body: Option<PathBuf>,
    /// Unix seconds to sign with (default: now).
    #[arg(long)]
    timestamp: Option<i64>,
    /// Print the headers as curl `-H` arguments (no spaces: safe in `$(…)`).
    #[arg(long, conflicts_with = "json")]
    curl: bool,
    /// Print the headers as a JSON object.
    #[arg(long)]
    json: bool,
}

pub fn run(a: SignArgs) -> ExitCode {
    let body = match &a.body {
        Some(p) => match std::fs::read(p) {
            Ok(b) => b,
            Err(e) => {
                eprintln!("gatehouse sign: cannot read {}: {e}", p.display());
                return ExitCode::FAILURE;
            }
        },
        None => Vec::new(),
    };
    if !a.path.starts_with('/') {
        eprintln!("gatehouse sign: --path must start with '/' (the request target as sent, e.g. /api/v1/orders?x=1)");
        return ExitCode::FAILURE;
    }
    let ts = a.timestamp.unwrap_or_else(|| time::OffsetDateTime::now_utc().unix_timestamp()).to_string();
    let sig = sign_hex(&a.secret, &ts, &a.method, &a.path, &body);
    if a.json {
        println!("{}", serde_json::json!({"X-API-Key": a.key_id, "X-Timestamp": ts, "X-Signature": sig}));
    } else if a.curl {
        println!("-HX-API-Key:{} -HX-Timestamp:{ts} -HX-Signature:{sig}", a.key_id);
    } else {
        println!("X-API-Key: {}\nX-Timestamp: {ts}\nX-Signature: {sig}", a.key_id);
    }
    ExitCode::SUCCESS
}
