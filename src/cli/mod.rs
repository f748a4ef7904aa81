//! The `gatehouse` command line: one file per subcommand.

mod admin_tokens;
mod check_config;
mod credentials;
mod db;
mod demo;
pub mod echo;
mod healthcheck;
mod keys;
mod master_key;
mod roles;
mod serve;
mod sign;
mod store_args;
mod users;

use clap::{Parser, Subcommand, ValueEnum};
use std::path::PathBuf;
use std::process::ExitCode;

/// Exit code for an invalid configuration (sysexits `EX_CONFIG`); systemd units can
/// use it in `RestartPreventExitStatus=`.
pub const EXIT_CONFIG: u8 = 78;

#[derive(Debug, Parser)]
#[command(name = "gatehouse", version, about = "Authentication gateway for machine clients")]
struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, env = "GATEHOUSE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the gateway (the production entry point).
    Serve {
        /// Path of gatehouse.yaml.
        #[arg(long, env = "GATEHOUSE_CONFIG", default_value = "config/gatehouse.yaml")]
        config: PathBuf,
    },
    /// Validate the configuration; print every problem with its file, line and reason.
    CheckConfig {
        /// Path of gatehouse.yaml.
        #[arg(long, env = "GATEHOUSE_CONFIG", default_value = "config/gatehouse.yaml")]
        config: PathBuf,
    },
    /// Print the three HMAC headers for one request.
    Sign(sign::SignArgs),
    /// Manage API users in the credentials file.
    Users(users::UsersArgs),
    /// Add, list, revoke and rotate a user's keys.
    Keys(keys::KeysArgs),
    /// Manage roles (named sets of rules).
    Roles(roles::RolesArgs),
    /// Named admin tokens (`gha_…`) for the admin API and the console: create, list, revoke.
    AdminTokens(admin_tokens::AdminTokensArgs),
    /// Exit 0 when the admin /healthz answers 200 (container health checks without curl).
    Healthcheck(healthcheck::HealthcheckArgs),
    /// Rotate the master key that encrypts HMAC signing secrets at rest.
    MasterKey(master_key::MasterKeyArgs),
    /// Export the credentials as YAML, or import a YAML file (file or database store).
    Credentials(credentials::CredentialsArgs),
    /// The credential database (PostgreSQL): schema migrations.
    Db(db::DbArgs),
    /// Start a throw-away gateway on 127.0.0.1 with a built-in echo upstream.
    Demo {
        /// Port of the demo's proxy listener.
        #[arg(long, default_value_t = 8080)]
        port: u16,
        /// Port of the demo's admin listener (health, metrics, admin API).
        #[arg(long, default_value_t = 9901)]
        admin_port: u16,
    },
}

/// Parses the command line, runs the command and returns the process exit code.
pub fn run() -> ExitCode {
    let cli = Cli::parse();
    // The file-editing commands print their own results; only warnings belong on stderr.
    let quiet = matches!(
        cli.command,
        Command::Users(_)
            | Command::Keys(_)
            | Command::Roles(_)
            | Command::AdminTokens(_)
            | Command::Sign(_)
            | Command::MasterKey(_)
            | Command::Healthcheck(_)
            | Command::Db(_)
            | Command::Credentials(_)
    );
    init_logging(cli.log_format, if quiet { "warn" } else { "info,notify=warn" });
    match cli.command {
        Command::Serve { config } => serve::run(&config),
        Command::CheckConfig { config } => check_config::run(&config),
        Command::Demo { port, admin_port } => demo::run(port, admin_port),
        Command::Sign(args) => sign::run(args),
        Command::Users(args) => users::run(args),
        Command::Keys(args) => keys::run(args),
        Command::Roles(args) => roles::run(args),
        Command::AdminTokens(args) => admin_tokens::run(args),
        Command::MasterKey(args) => master_key::run(args),
        Command::Healthcheck(args) => healthcheck::run(args),
        Command::Db(args) => db::run(args),
        Command::Credentials(args) => credentials::run(args),
    }
}

fn init_logging(format: LogFormat, default_filter: &str) {
    use tracing_subscriber::EnvFilter;
    // notify logs harmless watch-descriptor noise at INFO when watched files go away.
    let filter = EnvFilter::try_from_env("GATEHOUSE_LOG").unwrap_or_else(|_| EnvFilter::new(default_filter));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_target(false);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

/// The multi-threaded runtime every long-running command uses.
fn runtime() -> Result<tokio::runtime::Runtime, ExitCode> {
    tokio::runtime::Builder::new_multi_thread().enable_all().build().map_err(|e| {
        eprintln!("gatehouse: cannot start the async runtime: {e}");
        ExitCode::FAILURE
    })
}

/// Completes on SIGTERM or SIGINT (Ctrl-C).
async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = term => tracing::info!("SIGTERM received"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
    }
}
