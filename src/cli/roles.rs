//! `gatehouse roles …`: named sets of rules.

use super::store_args::{StoreArgs, fail, print, run_update};
use crate::credentials::ops;
use serde_json::json;
use std::process::ExitCode;

#[derive(Debug, clap::Args)]
pub struct RolesArgs {
    #[command(subcommand)]
    command: RolesCommand,
    #[command(flatten)]
    store: StoreArgs,
}

#[derive(Debug, clap::Subcommand)]
enum RolesCommand {
    /// List roles and their rules.
    List,
    /// Create or replace a role.
    Set {
        name: String,
        /// A `METHODS PATH-PATTERN` rule (repeat for several).
        #[arg(long = "rule", required = true)]
        rules: Vec<String>,
        #[arg(long, default_value = "")]
        description: String,
    },
    /// Delete a role (refused while a user holds it).
    Delete { name: String },
}

pub fn run(a: RolesArgs) -> ExitCode {
    let ctx = match a.store.open() {
        Ok(s) => s,
        Err(e) => return fail("roles", e),
    };
    let json = a.store.json;
    let result = match a.command {
        RolesCommand::List => match ctx.store.read() {
            Ok(c) => {
                let roles = ops::roles_view(&c);
                let text = || {
                    c.roles
                        .iter()
                        .map(|(n, r)| {
                            format!(
                                "{n}\n{}",
                                r.rules.iter().map(|x| format!("  {}", x.value)).collect::<Vec<_>>().join("\n")
                            )
                        })
                        .collect::<Vec<_>>()
                        .join("\n")
                };
                Ok(print(json, &roles, text))
            }
            Err(e) => Err(fail("roles list", e)),
        },
        RolesCommand::Set { name, rules, description } => {
            run_update("roles set", &name, &ctx, |c| ops::set_role(c, &name, description, rules))
                .map(|()| print(json, &json!({"role": name}), || format!("role {name} set")))
        }
        RolesCommand::Delete { name } => run_update("roles delete", &name, &ctx, |c| ops::delete_role(c, &name))
            .map(|()| print(json, &json!({"deleted": name}), || format!("role {name} deleted"))),
    };
    result.unwrap_or_else(|code| code)
}
