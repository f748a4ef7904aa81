//! `gatehouse db migrate`: brings the credential database's schema to this binary's
//! version (docs/credential-database.md).

use super::EXIT_CONFIG;
use crate::config::Config;
use crate::credentials::db::{Database, schema};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Debug, clap::Args)]
pub struct DbArgs {
    #[command(subcommand)]
    command: DbCommand,
    /// gatehouse.yaml, for its `credentials: postgres://…` and `credentials_password_env`.
    #[arg(long, global = true, env = "GATEHOUSE_CONFIG", default_value = "config/gatehouse.yaml")]
    config: PathBuf,
}

#[derive(Debug, clap::Subcommand)]
enum DbCommand {
    /// Apply the schema migrations the database lacks (safe to run from several places at
    /// once: they wait for each other and migrate once).
    Migrate,
}

pub fn run(args: DbArgs) -> ExitCode {
    let config = match Config::load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let Some(cfg) = config.credential_db else {
        eprintln!("gatehouse db migrate: {} has no `credentials: postgres://…`", args.config.display());
        return ExitCode::from(EXIT_CONFIG);
    };
    let rt = match super::runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    let DbCommand::Migrate = args.command;
    let result = rt.block_on(async {
        let db = Database::connect(&cfg).await?;
        schema::migrate(&db).await
    });
    match result {
        Ok(applied) if applied.is_empty() => {
            println!("{}: schema already at version {}", cfg.describe(), schema::CURRENT);
            ExitCode::SUCCESS
        }
        Ok(applied) => {
            let list: Vec<String> = applied.iter().map(i32::to_string).collect();
            println!(
                "{}: applied migration(s) {}; schema at version {}",
                cfg.describe(),
                list.join(", "),
                schema::CURRENT
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("gatehouse db migrate: {e}");
            ExitCode::from(EXIT_CONFIG)
        }
    }
}
