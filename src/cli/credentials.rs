//! `gatehouse credentials export|import`: moving API users between a credentials file
//! and the credential database (either way; both work on either store).

use super::store_args::{StoreArgs, fail, print, run_update};
use crate::credentials::file::FileCredentials;
use crate::credentials::ops;
use crate::credentials::store::{Store, to_yaml};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Debug, clap::Args)]
pub struct CredentialsArgs {
    #[command(subcommand)]
    command: CredentialsCommand,
    #[command(flatten)]
    store: StoreArgs,
}

#[derive(Debug, clap::Subcommand)]
enum CredentialsCommand {
    /// Write the whole store as credentials YAML (the same store gives the same bytes).
    Export {
        /// Write to this file (mode 0600, atomically) instead of stdout.
        #[arg(long)]
        to: Option<PathBuf>,
    },
    /// Replace the whole store with a credentials YAML file (validated first).
    Import {
        file: PathBuf,
        /// Print what would change (users and roles added, removed, changed) and change nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

pub fn run(a: CredentialsArgs) -> ExitCode {
    let ctx = match a.store.open() {
        Ok(s) => s,
        Err(e) => return fail("credentials", e),
    };
    let json = a.store.json;
    let result = match a.command {
        CredentialsCommand::Export { to } => export(&ctx.store, to),
        CredentialsCommand::Import { file, dry_run } => {
            let source = Store::new(
                file.clone(),
                ctx.store.master_key_path().to_path_buf(),
                crate::config::RateLimitConfig::DEFAULT,
            );
            let imported = match source.read() {
                Ok(c) => c,
                Err(e) => return fail("credentials import", e),
            };
            if let Err(e) = ctx.store.validate(&imported) {
                return fail("credentials import", e);
            }
            if dry_run {
                match ctx.store.read() {
                    Ok(current) => {
                        let diff = ops::difference(&current, &imported);
                        Ok(print(json, &diff, || describe(&diff)))
                    }
                    Err(e) => Err(fail("credentials import", e)),
                }
            } else {
                let target = file.display().to_string();
                run_update("credentials import", &target, &ctx, |c: &mut FileCredentials| {
                    let diff = ops::difference(c, &imported);
                    *c = imported;
                    Ok(diff)
                })
                .map(|diff| print(json, &diff, || describe(&diff)))
            }
        }
    };
    result.unwrap_or_else(|code| code)
}

fn export(store: &Store, to: Option<PathBuf>) -> Result<ExitCode, ExitCode> {
    let creds = store.read().map_err(|e| fail("credentials export", e))?;
    let yaml = to_yaml(&creds).map_err(|e| fail("credentials export", e))?;
    match to {
        None => {
            use std::io::Write;
            let _ = std::io::stdout().write_all(yaml.as_bytes());
        }
        Some(path) => {
            let mode = Some(std::os::unix::fs::PermissionsExt::from_mode(0o600));
            crate::fs::atomic_file::write_durably(&path, yaml.as_bytes(), mode)
                .map_err(|e| fail("credentials export", format!("{}: {}", e.path.display(), e.source)))?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `users: +2 -1 ~3 (…)`: one line per kind.
fn describe(diff: &serde_json::Value) -> String {
    ["users", "roles"]
        .iter()
        .map(|kind| {
            let list = |k: &str| -> Vec<String> {
                diff[kind][k]
                    .as_array()
                    .map(|a| a.iter().filter_map(|v| v.as_str().map(String::from)).collect())
                    .unwrap_or_default()
            };
            let (added, removed, changed) = (list("added"), list("removed"), list("changed"));
            format!(
                "{kind}: {} added {:?}, {} removed {:?}, {} changed {:?}",
                added.len(),
                added,
                removed.len(),
                removed,
                changed.len(),
                changed
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}
