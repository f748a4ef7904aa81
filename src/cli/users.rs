//! `gatehouse users …`: API users in the credentials file (no running gateway needed;
//! a running one picks the change up by itself).

use super::store_args::{StoreArgs, fail, parse_rate, print, run_update};
use crate::credentials::file::{AuthMethod, Status};
use crate::credentials::ops::{self, UserFields};
use clap::{Subcommand, ValueEnum};
use serde_json::Value;
use std::process::ExitCode;

#[derive(Debug, clap::Args)]
pub struct UsersArgs {
    #[command(subcommand)]
    command: UsersCommand,
    #[command(flatten)]
    store: StoreArgs,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Method {
    ApiKey,
    Hmac,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum StatusArg {
    Active,
    Inactive,
    Retired,
}

#[derive(Debug, Subcommand)]
enum UsersCommand {
    /// Create an active user with no keys (add one with `keys add`).
    Create {
        id: String,
        #[arg(long, value_enum)]
        auth_method: Method,
        #[command(flatten)]
        fields: Fields,
    },
    /// List users.
    List {
        #[arg(long, value_enum)]
        status: Option<StatusArg>,
        #[arg(long)]
        role: Option<String>,
        #[arg(long)]
        organization: Option<String>,
    },
    /// Show one user and its keys.
    Show { id: String },
    /// Change the given fields (others stay as they are; a repeated flag replaces the whole list).
    Update {
        id: String,
        #[command(flatten)]
        fields: Fields,
    },
    /// Set status inactive: its keys stop working until `enable`.
    Disable { id: String },
    /// Set status active again (not for retired users).
    Enable { id: String },
    /// Set status retired: terminal, its keys are never accepted again.
    Retire { id: String },
    /// Remove the user and its keys from the file.
    Delete { id: String },
}

#[derive(Debug, clap::Args)]
struct Fields {
    #[arg(long)]
    display_name: Option<String>,
    #[arg(long)]
    description: Option<String>,
    #[arg(long)]
    organization: Option<String>,
    /// A team (repeat for several).
    #[arg(long = "team")]
    teams: Vec<String>,
    #[arg(long)]
    default_team: Option<String>,
    /// A role (repeat for several).
    #[arg(long = "role")]
    roles: Vec<String>,
    /// A `METHODS PATH-PATTERN` rule narrowing the roles (repeat for several).
    #[arg(long = "allowed-endpoint")]
    allowed_endpoints: Vec<String>,
    /// May act for other users via X-Proxied-User.
    #[arg(long)]
    allow_proxied_users: Option<bool>,
    /// A user id it may act for (repeat; none: any).
    #[arg(long = "allowed-proxied-user")]
    allowed_proxied_users: Vec<String>,
    /// Rate limit override, PER_SECOND/BURST.
    #[arg(long, value_parser = parse_rate)]
    rate_limit: Option<crate::credentials::file::FileRateLimit>,
}

impl Fields {
    fn into_change(self) -> UserFields {
        let list = |v: Vec<String>| (!v.is_empty()).then_some(v);
        UserFields {
            display_name: self.display_name,
            description: self.description,
            organization: self.organization,
            teams: list(self.teams),
            default_team: self.default_team.map(Some),
            roles: list(self.roles),
            allowed_endpoints: list(self.allowed_endpoints),
            allow_proxied_users: self.allow_proxied_users,
            allowed_proxied_users: list(self.allowed_proxied_users),
            rate_limit: self.rate_limit.map(Some),
        }
    }
}

fn status_of(v: &Value) -> &str {
    v["status"].as_str().unwrap_or("")
}

pub fn run(a: UsersArgs) -> ExitCode {
    let ctx = match a.store.open() {
        Ok(s) => s,
        Err(e) => return fail("users", e),
    };
    let json = a.store.json;
    let changed = |what: &str, id: &str| {
        let id = id.to_string();
        let what = what.to_string();
        move || format!("user {id} {what}")
    };
    let result = match a.command {
        UsersCommand::Create { id, auth_method, fields } => {
            let method = match auth_method {
                Method::ApiKey => AuthMethod::ApiKey,
                Method::Hmac => AuthMethod::Hmac,
            };
            run_update("users create", &id, &ctx, |c| {
                ops::create_user(c, &id, method, fields.into_change())?;
                Ok(ops::user_view(ops::user(c, &id)?))
            })
            .map(|v| print(json, &v, changed("created", &id)))
        }
        UsersCommand::Update { id, fields } => run_update("users update", &id, &ctx, |c| {
            ops::update_user(c, &id, fields.into_change())?;
            Ok(ops::user_view(ops::user(c, &id)?))
        })
        .map(|v| print(json, &v, changed("updated", &id))),
        UsersCommand::Disable { id } => set(&ctx, json, &id, Status::Inactive, ("disable", "disabled")),
        UsersCommand::Enable { id } => set(&ctx, json, &id, Status::Active, ("enable", "enabled")),
        UsersCommand::Retire { id } => set(&ctx, json, &id, Status::Retired, ("retire", "retired")),
        UsersCommand::Delete { id } => run_update("users delete", &id, &ctx, |c| ops::delete_user(c, &id))
            .map(|()| print(json, &serde_json::json!({"deleted": id}), changed("deleted", &id))),
        UsersCommand::Show { id } => match ctx.store.read().and_then(|c| ops::user(&c, &id).map(ops::user_view)) {
            Ok(mut v) => {
                let usage = match ctx.usage() {
                    Ok(u) => u,
                    Err(e) => return fail("users show", e),
                };
                crate::pipeline::usage::add_usage(&mut v, &usage);
                Ok(print(json, &v, || serde_json::to_string_pretty(&v).unwrap_or_default()))
            }
            Err(e) => Err(fail("users show", e)),
        },
        UsersCommand::List { status, role, organization } => match ctx.store.read() {
            Ok(c) => {
                let want = status.map(|s| match s {
                    StatusArg::Active => "active",
                    StatusArg::Inactive => "inactive",
                    StatusArg::Retired => "retired",
                });
                let users = ops::list_users(&c, want, role.as_deref(), organization.as_deref());
                let text = || {
                    let mut out = format!(
                        "{:<24} {:<9} {:<8} {:<16} {:>4}  ROLES",
                        "ID", "STATUS", "METHOD", "ORGANIZATION", "KEYS"
                    );
                    for v in &users {
                        out.push_str(&format!(
                            "\n{:<24} {:<9} {:<8} {:<16} {:>4}  {}",
                            v["id"].as_str().unwrap_or(""),
                            status_of(v),
                            v["auth_method"].as_str().unwrap_or(""),
                            v["organization"].as_str().unwrap_or(""),
                            v["keys"].as_array().map_or(0, Vec::len),
                            v["roles"]
                                .as_array()
                                .map(|r| r.iter().filter_map(Value::as_str).collect::<Vec<_>>().join(","))
                                .unwrap_or_default(),
                        ));
                    }
                    out
                };
                Ok(print(json, &Value::from(users.clone()), text))
            }
            Err(e) => Err(fail("users list", e)),
        },
    };
    result.unwrap_or_else(|code| code)
}

fn set(
    ctx: &super::store_args::Ctx,
    json: bool,
    id: &str,
    status: Status,
    (verb, what): (&str, &str),
) -> Result<ExitCode, ExitCode> {
    run_update(&format!("users {verb}"), id, ctx, |c| {
        ops::set_status(c, id, status)?;
        Ok(ops::user_view(ops::user(c, id)?))
    })
    .map(|v| print(json, &v, || format!("user {id} {what}")))
}
