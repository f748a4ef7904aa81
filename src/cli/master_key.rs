//! `gatehouse master-key rotate`: a new master key, every HMAC secret re-sealed under it,
//! the old key gone — without a failed request in a running gateway (see
//! `Store::rotate_master_key` for the three steps).

use super::store_args::{StoreArgs, fail, print};
use serde_json::json;
use std::process::ExitCode;

#[derive(Debug, clap::Args)]
pub struct MasterKeyArgs {
    #[command(subcommand)]
    command: MasterKeyCommand,
    #[command(flatten)]
    store: StoreArgs,
}

#[derive(Debug, clap::Subcommand)]
enum MasterKeyCommand {
    /// Replace the master key and re-encrypt every HMAC signing secret under the new one.
    /// The secrets themselves do not change: clients keep signing as before.
    Rotate,
}

pub fn run(a: MasterKeyArgs) -> ExitCode {
    const COMMAND: &str = "master-key rotate";
    let ctx = match a.store.open() {
        Ok(s) => s,
        Err(e) => return fail(COMMAND, e),
    };
    match a.command {
        MasterKeyCommand::Rotate => {
            let rotation = match ctx.store.rotate_master_key() {
                Ok(r) => r,
                Err(e) => return fail(COMMAND, e),
            };
            let master = ctx.store.master_key_path().display().to_string();
            let changes = json!({"resealed_secrets": rotation.resealed, "retired_keys": rotation.retired_keys});
            ctx.record(COMMAND, &master, changes);
            let value = json!({
                "master_key": master,
                "credentials": ctx.store.path().display().to_string(),
                "resealed_secrets": rotation.resealed,
                "retired_keys": rotation.retired_keys,
            });
            print(a.store.json, &value, || {
                format!(
                    "re-encrypted {} HMAC secret(s) in {} under a new master key; {} now holds only the new key",
                    rotation.resealed,
                    ctx.store.path().display(),
                    master
                )
            })
        }
    }
}
