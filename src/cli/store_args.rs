//! What the `users`, `keys` and `roles` commands share: where the credentials file is,
//! and how results and failures are printed.

use crate::config::{AuditSink, Config, RateLimitConfig, units};
use crate::credentials::file::FileRateLimit;
use crate::credentials::store::{Scope, Store, StoreError};
use crate::pipeline::audit::AdminRecord;
use serde_json::Value;
use std::path::PathBuf;
use std::process::ExitCode;

/// Locating the credentials file: from the config, or given directly.
#[derive(Debug, clap::Args)]
pub struct StoreArgs {
    /// gatehouse.yaml, for its `credentials`, `master_key` and default `rate_limit`.
    #[arg(long, global = true, env = "GATEHOUSE_CONFIG", default_value = "config/gatehouse.yaml")]
    config: PathBuf,
    /// The credentials file itself (then the master key is `master.key` beside it unless --master-key).
    #[arg(long, global = true, env = "GATEHOUSE_CREDENTIALS")]
    credentials: Option<PathBuf>,
    /// The master key file, with --credentials.
    #[arg(long, global = true, requires = "credentials")]
    master_key: Option<PathBuf>,
    /// Print JSON instead of text.
    #[arg(long, global = true)]
    pub json: bool,
}

/// The store, and the audit file its changes are recorded in (when the config names one).
pub struct Ctx {
    pub store: Store,
    /// The usage state file (`usage_state` of the config, else beside the credentials).
    pub usage: PathBuf,
    /// With `shared_state:` in the config, usage is the fleet's, in Redis.
    shared: Option<crate::config::shared_state::SharedStateConfig>,
    audit: Option<AuditSink>,
}

impl Ctx {
    /// Every key's usage: the fleet's from Redis with `shared_state:`, else the state file.
    pub fn usage(&self) -> Result<std::collections::BTreeMap<String, crate::pipeline::usage::KeyUsageRecord>, String> {
        let Some(cfg) = &self.shared else { return Ok(crate::pipeline::usage::read_state(&self.usage)) };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("cannot start the async runtime: {e}"))?;
        rt.block_on(async {
            let shared = crate::shared::Shared::connect_tool(cfg).await.map_err(|e| e.to_string())?;
            crate::pipeline::usage::read_shared(&shared)
                .await
                .map_err(|_| format!("shared_state: Redis at {} did not answer in time", cfg.describe()))
        })
    }

    /// Appends an admin record (actor `cli:<os user>`) to the audit file, when the config
    /// names one; a failure is a warning: the change is made.
    pub fn record(&self, command: &str, target: &str, changes: Value) {
        let actor = format!("cli:{}", os_user());
        self.append(command, &AdminRecord::new(&actor, command, target, changes));
    }

    /// Appends `record` to the audit file, when the config names one.
    pub fn append(&self, command: &str, record: &AdminRecord<'_>) {
        let Some(sink) = &self.audit else { return };
        if let Err(e) = crate::pipeline::audit::append_now(sink, record) {
            eprintln!("gatehouse {command}: warning: change made, but not recorded in the audit log: {e}");
        }
    }
}

/// The user this process runs as, from its uid (the owner of `/proc/self`) and
/// `/etc/passwd`: not `$USER`, which anyone can set and containers leave unset. A uid
/// with no name there is `uid:<n>`.
pub fn os_user() -> String {
    use std::os::unix::fs::MetadataExt;
    let Ok(uid) = std::fs::metadata("/proc/self").map(|m| m.uid()) else { return "unknown".into() };
    std::fs::read_to_string("/etc/passwd")
        .ok()
        .and_then(|passwd| user_name(&passwd, uid))
        .unwrap_or_else(|| format!("uid:{uid}"))
}

/// The name `passwd` (the `/etc/passwd` format) gives `uid`.
fn user_name(passwd: &str, uid: u32) -> Option<String> {
    passwd.lines().find_map(|line| {
        let mut fields = line.split(':');
        let name = fields.next()?;
        let id = fields.nth(1)?.parse::<u32>().ok()?;
        (id == uid && !name.is_empty()).then(|| name.to_string())
    })
}

impl StoreArgs {
    /// The store these arguments name.
    pub fn open(&self) -> Result<Ctx, String> {
        if let Some(path) = &self.credentials {
            let master = self.master_key.clone().unwrap_or_else(|| path.with_file_name("master.key"));
            let store = Store::new(path.clone(), master, RateLimitConfig::DEFAULT);
            return Ok(Ctx { store, usage: crate::config::usage_state_path(path), shared: None, audit: None });
        }
        let config = Config::load(&self.config).map_err(|e| e.to_string())?;
        if let Some(cfg) = &config.credential_db {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .map_err(|e| format!("cannot start the async runtime: {e}"))?;
            let db = rt
                .block_on(async {
                    let db = crate::credentials::db::Database::connect(cfg).await?;
                    crate::credentials::db::schema::check(&db).await.map(|()| db)
                })
                .map_err(|e| e.to_string())?;
            return Ok(Ctx {
                store: Store::database(db, Some(rt), config.master_key, config.rate_limit),
                usage: config.usage_state.unwrap_or_default(),
                shared: config.shared_state,
                audit: Some(config.audit_log),
            });
        }
        let path = config
            .credentials
            .ok_or_else(|| format!("{} names no credentials file; pass --credentials PATH", self.config.display()))?;
        let usage = config.usage_state.unwrap_or_else(|| crate::config::usage_state_path(&path));
        Ok(Ctx {
            store: Store::new(path, config.master_key, config.rate_limit),
            usage,
            shared: config.shared_state,
            audit: Some(config.audit_log),
        })
    }
}

/// Prints `value` as JSON, or `text` otherwise; exit 0. A closed stdout (`| head`) is
/// not an error worth a panic.
pub fn print(json: bool, value: &Value, text: impl FnOnce() -> String) -> ExitCode {
    use std::io::Write;
    let out = if json { serde_json::to_string_pretty(value).unwrap_or_default() } else { text() };
    let _ = writeln!(std::io::stdout(), "{out}");
    ExitCode::SUCCESS
}

/// One clear line on stderr, exit 1.
pub fn fail(command: &str, e: impl std::fmt::Display) -> ExitCode {
    eprintln!("gatehouse {command}: {e}");
    ExitCode::FAILURE
}

/// Runs a change, records it in the audit file (actor `cli:<os user>`), and reports a
/// failure as one line.
pub fn run_update<T>(
    command: &str,
    target: &str,
    ctx: &Ctx,
    change: impl FnOnce(&mut crate::credentials::file::FileCredentials) -> Result<T, StoreError>,
) -> Result<T, ExitCode> {
    // The database keeps the record in the change's transaction; the audit file (when
    // the config names one) gets it as well.
    let record = ctx.store.is_database().then(|| {
        let actor = format!("cli:{}", os_user());
        serde_json::to_value(AdminRecord::new(&actor, command, target, Value::Null)).unwrap_or_default()
    });
    // `users …` and `keys …` change the user `target` only.
    let scope = match command.split_once(' ') {
        Some(("users" | "keys", _)) => Scope::User(target),
        _ => Scope::Whole,
    };
    let out = ctx.store.update_in(scope, record.as_ref(), change).map_err(|e| fail(command, e))?;
    ctx.record(command, target, Value::Null);
    Ok(out)
}

/// `20/40` → per_second 20, burst 40.
pub fn parse_rate(s: &str) -> Result<FileRateLimit, String> {
    let (p, b) = s.split_once('/').ok_or_else(|| format!("rate limit {s:?} must be PER_SECOND/BURST, e.g. 20/40"))?;
    let n = |v: &str| {
        v.trim()
            .parse::<u32>()
            .ok()
            .filter(|&n| n > 0)
            .ok_or_else(|| format!("rate limit {s:?}: {v:?} is not a positive integer"))
    };
    Ok(FileRateLimit { per_second: n(p)?, burst: n(b)? })
}

/// `90d` → a point that far from now.
pub fn parse_in(s: &str) -> Result<time::OffsetDateTime, String> {
    let d = units::parse_duration(s)?;
    Ok(crate::credentials::ops::now() + d)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// the name is looked up by uid; a uid without a line has none
    #[test]
    fn the_os_user_is_found_by_uid() {
        let passwd = "root:x:0:0:root:/root:/bin/bash\nbroken\nops:x:1000:1000::/home/ops:/bin/sh\n";
        assert_eq!(user_name(passwd, 0).as_deref(), Some("root"));
        assert_eq!(user_name(passwd, 1000).as_deref(), Some("ops"));
        assert_eq!(user_name(passwd, 42), None);
    }
}
