//! `gatehouse admin-tokens …`: named admin tokens (create prints the token once), list,
//! revoke. They live beside the credentials: `admin-tokens.yaml` next to the file, or the
//! credential database.

use super::store_args::{StoreArgs, fail, os_user, parse_in, print};
use crate::credentials::admin_tokens::AdminRole;
use crate::pipeline::audit::AdminRecord;
use serde_json::{Value, json};
use std::process::ExitCode;

#[derive(Debug, clap::Args)]
pub struct AdminTokensArgs {
    #[command(subcommand)]
    command: AdminTokensCommand,
    #[command(flatten)]
    store: StoreArgs,
}

#[derive(Debug, clap::Subcommand)]
enum AdminTokensCommand {
    /// Create a token; it is printed once and stored only as its SHA-256.
    Create {
        /// Who holds it (letters, digits, `._@-`; unique among live tokens).
        #[arg(long)]
        name: String,
        /// viewer, operator or admin.
        #[arg(long)]
        role: AdminRole,
        /// Expire the token this long from now (e.g. 90d, 12h).
        #[arg(long)]
        expires_in: Option<String>,
    },
    /// List the tokens (never the tokens themselves).
    List,
    /// Revoke a token now, by id (`adt_…`).
    Revoke { id: String },
}

impl clap::ValueEnum for AdminRole {
    fn value_variants<'a>() -> &'a [Self] {
        &[AdminRole::Viewer, AdminRole::Operator, AdminRole::Admin]
    }
    fn to_possible_value(&self) -> Option<clap::builder::PossibleValue> {
        Some(clap::builder::PossibleValue::new(self.as_str()))
    }
}

pub fn run(a: AdminTokensArgs) -> ExitCode {
    let ctx = match a.store.open() {
        Ok(s) => s,
        Err(e) => return fail("admin-tokens", e),
    };
    let json = a.store.json;
    let actor = format!("cli:{}", os_user());
    let kept = |r: &AdminRecord<'_>| ctx.store.is_database().then(|| serde_json::to_value(r).unwrap_or_default());
    match a.command {
        AdminTokensCommand::Create { name, role, expires_in } => {
            let expires = match expires_in.as_deref().map(parse_in).transpose() {
                Ok(e) => e,
                Err(e) => return fail("admin-tokens create", e),
            };
            let changes = json!({"name": name, "role": role, "expires_at": expires.map(|t| t.unix_timestamp())});
            let record = AdminRecord::new(&actor, "admin-tokens create", &name, changes);
            match ctx.store.create_admin_token(&name, role, expires, &actor, kept(&record).as_ref()) {
                Ok((t, secret)) => {
                    ctx.append("admin-tokens create", &record);
                    let v = json!({"admin_token": t.view(), "token": secret.expose()});
                    print(json, &v, || {
                        format!(
                            "admin token {} ({}, role {}) created; it is shown only now:\n{}",
                            t.name,
                            t.id,
                            t.role.as_str(),
                            secret.expose()
                        )
                    })
                }
                Err(e) => fail("admin-tokens create", e),
            }
        }
        AdminTokensCommand::List => match ctx.store.admin_tokens() {
            Ok(tokens) => {
                let views: Vec<Value> = tokens.iter().map(|t| t.view()).collect();
                let text = || {
                    if views.is_empty() {
                        return "no admin tokens".to_string();
                    }
                    views
                        .iter()
                        .map(|v| {
                            format!(
                                "{}  {}  {}  {}  {}  created {}{}",
                                v["id"].as_str().unwrap_or_default(),
                                v["name"].as_str().unwrap_or_default(),
                                v["role"].as_str().unwrap_or_default(),
                                v["status"].as_str().unwrap_or_default(),
                                v["hint"].as_str().unwrap_or_default(),
                                v["created_at"].as_str().unwrap_or_default(),
                                v["expires_at"].as_str().map(|e| format!(", expires {e}")).unwrap_or_default(),
                            )
                        })
                        .collect::<Vec<_>>()
                        .join("\n")
                };
                print(json, &Value::from(views.clone()), text)
            }
            Err(e) => fail("admin-tokens list", e),
        },
        AdminTokensCommand::Revoke { id } => {
            let record = AdminRecord::new(&actor, "admin-tokens revoke", &id, Value::Null);
            match ctx.store.revoke_admin_token(&id, kept(&record).as_ref()) {
                Ok(t) => {
                    ctx.append("admin-tokens revoke", &record);
                    print(json, &json!({"revoked": t.id}), || format!("admin token {} ({}) revoked", t.name, t.id))
                }
                Err(e) => fail("admin-tokens revoke", e),
            }
        }
    }
}
