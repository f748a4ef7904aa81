//! `shared_state:` — where several gateways keep what must hold across all of them
//! (replay records, rate limits, the failed-auth budget, usage). Absent: every gateway
//! keeps its own, in process.

use super::env::Env;
use super::units::Dur;
use serde::Deserialize;
use serde_saphyr::Spanned;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

/// The serde shape of `shared_state:`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSharedState {
    #[serde(default)]
    pub redis: Option<Spanned<String>>,
    #[serde(default)]
    pub redis_cluster: Option<Spanned<Vec<String>>>,
    #[serde(default)]
    pub password_env: Option<Spanned<String>>,
    /// A PEM CA bundle for `rediss://` servers signed by a private CA (default: the system's roots).
    #[serde(default)]
    pub tls_ca: Option<Spanned<PathBuf>>,
    #[serde(default)]
    pub key_prefix: Option<Spanned<String>>,
    #[serde(default)]
    pub op_timeout: Option<Spanned<Dur>>,
    #[serde(default)]
    pub on_unavailable: FileOnUnavailable,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileOnUnavailable {
    #[serde(default)]
    pub replay: Option<ReplayFallback>,
    #[serde(default)]
    pub rate_limit: Option<RateLimitFallback>,
}

/// What a signed request gets while Redis cannot be reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReplayFallback {
    /// 503 `shared_state_unavailable`: the fleet-wide guarantee or nothing.
    Reject,
    /// This gateway's own replay cache: a replay sent to another gateway is not caught.
    Local,
}

/// What rate limits become while Redis cannot be reached (one choice today: never unlimited).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RateLimitFallback {
    /// Per-process limiters at the key's limit divided by the gateways last seen alive.
    Local,
}

/// Which Redis.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RedisEndpoint {
    /// One server (`redis://` or `rediss://`).
    Single(String),
    /// Seed nodes of a Redis Cluster.
    Cluster(Vec<String>),
}

/// A password that never prints.
#[derive(Clone, PartialEq, Eq)]
pub struct RedisPassword(pub String);

impl fmt::Debug for RedisPassword {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RedisPassword(<redacted>)")
    }
}

/// The validated `shared_state:` section.
#[derive(Debug, Clone)]
pub struct SharedStateConfig {
    pub endpoint: RedisEndpoint,
    pub password: Option<RedisPassword>,
    pub tls_ca: Option<PathBuf>,
    pub key_prefix: String,
    pub op_timeout: Duration,
    pub replay_fallback: ReplayFallback,
    pub rate_limit_fallback: RateLimitFallback,
}

impl SharedStateConfig {
    /// The endpoint for logs: URLs without a password.
    pub fn describe(&self) -> String {
        match &self.endpoint {
            RedisEndpoint::Single(u) => redact_url(u),
            RedisEndpoint::Cluster(v) => {
                format!("cluster {}", v.iter().map(|u| redact_url(u)).collect::<Vec<_>>().join(", "))
            }
        }
    }
}

/// `scheme://user:secret@host` → `scheme://user:***@host`.
pub fn redact_url(u: &str) -> String {
    let Some((scheme, rest)) = u.split_once("://") else { return u.to_string() };
    let (auth, host) = match rest.rsplit_once('@') {
        Some((a, h)) => (Some(a), h),
        None => (None, rest),
    };
    match auth {
        Some(a) => match a.split_once(':') {
            Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
            None => format!("{scheme}://{a}@{host}"),
        },
        None => u.to_string(),
    }
}

const DEFAULT_PREFIX: &str = "gatehouse:";
const DEFAULT_OP_TIMEOUT: Duration = Duration::from_millis(50);

/// Checks one Redis URL; the problem as text.
fn check_url(u: &str) -> Result<(), String> {
    let Some((scheme, rest)) = u.split_once("://") else {
        return Err(format!("{:?} is not a redis:// or rediss:// URL", redact_url(u)));
    };
    if scheme != "redis" && scheme != "rediss" {
        return Err(format!("{:?}: the scheme must be redis:// or rediss://", redact_url(u)));
    }
    // RESP3 connections reconnect by themselves after a Redis restart, before any command
    // fails; the detection of a Redis that came back empty relies on that failure.
    if rest.contains("protocol=") {
        return Err(format!("{:?}: the protocol parameter is not supported (Gatehouse speaks RESP2)", redact_url(u)));
    }
    let host = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
    if host.split(['/', ':']).next().is_none_or(str::is_empty) {
        return Err(format!("{:?} names no host", redact_url(u)));
    }
    Ok(())
}

/// Validates `shared_state:`; problems go to `at` with the field's location.
pub(super) fn validate(
    f: FileSharedState,
    env: &dyn Env,
    at: &mut dyn FnMut(&serde_saphyr::Location, String),
    whole: &serde_saphyr::Location,
) -> Option<SharedStateConfig> {
    let endpoint = match (f.redis, f.redis_cluster) {
        (Some(u), None) => {
            if let Err(e) = check_url(&u.value) {
                at(&u.referenced, format!("shared_state.redis: {e}"));
            }
            RedisEndpoint::Single(u.value)
        }
        (None, Some(nodes)) => {
            if nodes.value.is_empty() {
                at(&nodes.referenced, "shared_state.redis_cluster lists no node".into());
            }
            for u in &nodes.value {
                if let Err(e) = check_url(u) {
                    at(&nodes.referenced, format!("shared_state.redis_cluster: {e}"));
                }
            }
            RedisEndpoint::Cluster(nodes.value)
        }
        (Some(u), Some(_)) => {
            at(&u.referenced, "shared_state: set redis or redis_cluster, not both".into());
            return None;
        }
        (None, None) => {
            at(whole, "shared_state needs redis (one server) or redis_cluster (seed nodes)".into());
            return None;
        }
    };
    let password = f.password_env.and_then(|name| match env.var(&name.value) {
        Some(p) if !p.is_empty() => Some(RedisPassword(p)),
        _ => {
            at(&name.referenced, format!("shared_state.password_env: environment variable {} is not set", name.value));
            None
        }
    });
    let tls_ca = f.tls_ca.map(|p| {
        if let Err(e) = std::fs::metadata(&p.value) {
            at(&p.referenced, format!("shared_state.tls_ca: cannot read {}: {e}", p.value.display()));
        }
        p.value
    });
    let key_prefix = match f.key_prefix {
        None => DEFAULT_PREFIX.to_string(),
        Some(p) => {
            // Braces would become part of our hash tags and move keys between slots.
            let ok = !p.value.is_empty()
                && p.value.len() <= 64
                && p.value.bytes().all(|b| b.is_ascii_graphic() && b != b'{' && b != b'}');
            if !ok {
                at(&p.referenced, "shared_state.key_prefix must be 1 to 64 printable characters without braces".into());
            }
            p.value
        }
    };
    let op_timeout = match f.op_timeout {
        None => DEFAULT_OP_TIMEOUT,
        Some(d) => {
            if !(Duration::from_millis(1)..=Duration::from_secs(5)).contains(&d.value.0) {
                at(&d.referenced, "shared_state.op_timeout must be between 1ms and 5s".into());
            }
            d.value.0
        }
    };
    Some(SharedStateConfig {
        endpoint,
        password,
        tls_ca,
        key_prefix,
        op_timeout,
        replay_fallback: f.on_unavailable.replay.unwrap_or(ReplayFallback::Reject),
        rate_limit_fallback: f.on_unavailable.rate_limit.unwrap_or(RateLimitFallback::Local),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// a password in a URL never reaches a log line
    #[test]
    fn urls_are_redacted() {
        assert_eq!(redact_url("redis://gw:s3cret@r:6379/0"), "redis://gw:***@r:6379/0");
        assert_eq!(redact_url("rediss://:s3cret@r"), "rediss://:***@r");
        assert_eq!(redact_url("redis://r:6379"), "redis://r:6379");
        assert!(check_url("http://r").is_err());
        assert!(check_url("redis://").is_err());
        assert!(check_url("redis://u:p@").is_err());
        assert!(check_url("rediss://r.internal:6380/1").is_ok());
        assert!(check_url("redis://r:6379/0?protocol=resp3").is_err());
    }
}
