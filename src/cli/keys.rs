//! `gatehouse keys …`: add (prints the token or secret once), list, revoke, rotate.

use super::store_args::{StoreArgs, fail, parse_in, print, run_update};
use crate::credentials::ops;
use serde_json::json;
use std::process::ExitCode;

#[derive(Debug, clap::Args)]
pub struct KeysArgs {
    #[command(subcommand)]
    command: KeysCommand,
    #[command(flatten)]
    store: StoreArgs,
}

#[derive(Debug, clap::Subcommand)]
enum KeysCommand {
    /// Add a key; its token (api_key users) or signing secret (hmac users) is printed once.
    Add {
        user: String,
        #[arg(long, default_value = "")]
        label: String,
        /// Expire the key this long from now (e.g. 90d, 12h).
        #[arg(long)]
        expires_in: Option<String>,
    },
    /// List a user's keys (never the secrets).
    List { user: String },
    /// Revoke a key now.
    Revoke { user: String, key_id: String },
    /// Add a new key and revoke the old one after a grace period (default: now).
    Rotate {
        user: String,
        key_id: String,
        #[arg(long, default_value = "")]
        label: String,
        /// Keep the old key valid this long (e.g. 1h, 7d).
        #[arg(long, default_value = "0s")]
        grace: String,
    },
}

pub fn run(a: KeysArgs) -> ExitCode {
    let ctx = match a.store.open() {
        Ok(s) => s,
        Err(e) => return fail("keys", e),
    };
    let json = a.store.json;
    let master = || ctx.store.master_key();
    let result = match a.command {
        KeysCommand::Add { user, label, expires_in } => {
            let expires = match expires_in.as_deref().map(parse_in).transpose() {
                Ok(e) => e,
                Err(e) => return fail("keys add", e),
            };
            run_update("keys add", &user, &ctx, |c| {
                let hmac = ops::user(c, &user)?.auth_method == crate::credentials::file::AuthMethod::Hmac;
                let (view, secret) = ops::add_key(c, &user, &label, expires, master)?;
                Ok((ops::key_with_secret(view, &secret, hmac), hmac))
            })
            .map(|(v, hmac)| {
                print(json, &v, || {
                    let what = if hmac { "signing secret" } else { "token" };
                    let secret = v["secret"].as_str().or(v["token"].as_str()).unwrap_or("");
                    format!(
                        "key {} added to {user}\n{what} (shown once, store it now): {secret}",
                        v["key"]["id"].as_str().unwrap_or("")
                    )
                })
            })
        }
        KeysCommand::List { user } => match ctx.store.read().and_then(|c| ops::user(&c, &user).map(ops::user_view)) {
            Ok(mut v) => {
                let usage = match ctx.usage() {
                    Ok(u) => u,
                    Err(e) => return fail("keys list", e),
                };
                crate::pipeline::usage::add_usage(&mut v, &usage);
                let keys = v["keys"].take();
                Ok(print(json, &keys, || {
                    let mut out = format!(
                        "{:<30} {:<12} {:<14} {:<21} {:<21} {:<21} LAST USED",
                        "ID", "LABEL", "HINT", "CREATED", "EXPIRES", "REVOKED"
                    );
                    for k in keys.as_array().into_iter().flatten() {
                        let s = |f: &str| k[f].as_str().unwrap_or("-").to_string();
                        out.push_str(&format!(
                            "\n{:<30} {:<12} {:<14} {:<21} {:<21} {:<21} {}",
                            s("id"),
                            s("label"),
                            s("hint"),
                            s("created_at"),
                            s("expires_at"),
                            s("revoked_at"),
                            s("last_used_at")
                        ));
                    }
                    out
                }))
            }
            Err(e) => Err(fail("keys list", e)),
        },
        KeysCommand::Revoke { user, key_id } => {
            run_update("keys revoke", &user, &ctx, |c| ops::revoke_key(c, &user, &key_id, ops::now()))
                .map(|()| print(json, &json!({"revoked": key_id}), || format!("key {key_id} of {user} revoked")))
        }
        KeysCommand::Rotate { user, key_id, label, grace } => {
            let at = match parse_in(&grace) {
                Ok(t) => t,
                Err(e) => return fail("keys rotate", e),
            };
            run_update("keys rotate", &user, &ctx, |c| {
                let hmac = ops::user(c, &user)?.auth_method == crate::credentials::file::AuthMethod::Hmac;
                ops::revoke_key(c, &user, &key_id, at)?;
                let (view, secret) = ops::add_key(c, &user, &label, None, master)?;
                Ok(ops::key_with_secret(view, &secret, hmac))
            })
            .map(|v| {
                print(json, &v, || {
                    let secret = v["secret"].as_str().or(v["token"].as_str()).unwrap_or("");
                    format!(
                        "key {} added to {user}; key {key_id} stops working at {}\nnew credential (shown once, store it now): {secret}",
                        v["key"]["id"].as_str().unwrap_or(""),
                        at.format(&time::format_description::well_known::Rfc3339).unwrap_or_default()
                    )
                })
            })
        }
    };
    result.unwrap_or_else(|code| code)
}
