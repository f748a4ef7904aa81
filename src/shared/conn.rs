//! One Redis or a Redis Cluster, behind one handle that every request shares.
//!
//! Single server: a `ConnectionManager` — one multiplexed connection (concurrent
//! commands are pipelined on it, never a connection per request) that reconnects by
//! itself. Cluster: `cluster_async::ClusterConnection`, one multiplexed connection per
//! node, routed by the hash slot of each script's first key.

use crate::config::shared_state::{RedisEndpoint, SharedStateConfig};
use redis::aio::ConnectionManager;
use redis::cluster_async::ClusterConnection;
use redis::{FromRedisValue, IntoConnectionInfo, RedisResult, ScriptInvocation};
use std::time::Duration;

/// A cloneable handle; clones share the connections.
#[derive(Clone)]
pub enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Conn::Single(_) => "Conn::Single",
            Conn::Cluster(_) => "Conn::Cluster",
        })
    }
}

/// How long opening a connection may take (start-up, and each reconnection).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// TCP_NODELAY on (the client's default is off): a command is written when it is ready,
/// not held back while an earlier one is unacknowledged.
///
/// Keepalive probes (after 30 s idle, every 10 s, 3 tries) keep an idle connection's state
/// alive in NATs and load balancers (some forget a flow after 350 s idle) and find a dead
/// one; on Linux, a write unacknowledged for 10 s ends the connection (TCP_USER_TIMEOUT),
/// so a silently dropped one fails and is replaced instead of timing out every operation
/// for the many minutes of TCP's own retransmissions.
fn tcp() -> redis::io::tcp::TcpSettings {
    use redis::io::tcp::socket2::TcpKeepalive;
    let keepalive = TcpKeepalive::new().with_time(Duration::from_secs(30)).with_interval(Duration::from_secs(10));
    #[cfg(target_os = "linux")]
    let keepalive = keepalive.with_retries(3);
    let settings = redis::io::tcp::TcpSettings::default().set_nodelay(true).set_keepalive(keepalive);
    #[cfg(target_os = "linux")]
    let settings = settings.set_user_timeout(Duration::from_secs(10));
    settings
}

impl Conn {
    /// Connects (TCP, TLS, AUTH) and fails when any of it does: a wrong URL, a refused
    /// password or a TLS mismatch is found at start-up, not at the first request.
    pub async fn open(cfg: &SharedStateConfig) -> RedisResult<Conn> {
        let certs = match &cfg.tls_ca {
            None => None,
            Some(path) => Some(redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(std::fs::read(path).map_err(|e| {
                    redis::RedisError::from((
                        redis::ErrorKind::InvalidClientConfig,
                        "cannot read shared_state.tls_ca",
                        e.to_string(),
                    ))
                })?),
            }),
        };
        // Never wait on Redis longer than a request would: the caller bounds each
        // operation with `op_timeout` too, this keeps the client's own queue from
        // holding commands for its default half second.
        let response_timeout = cfg.op_timeout.max(Duration::from_millis(10)) * 4;
        match &cfg.endpoint {
            RedisEndpoint::Single(url) => {
                // Small commands from concurrent requests: no Nagle delay between them.
                let mut info = url.as_str().into_connection_info()?.set_tcp_settings(tcp());
                if let Some(p) = &cfg.password {
                    let settings = info.redis_settings().clone().set_password(&p.0);
                    info = info.set_redis_settings(settings);
                }
                let client = match certs {
                    Some(c) => redis::Client::build_with_tls(info, c)?,
                    None => redis::Client::open(info)?,
                };
                let config = redis::aio::ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(CONNECT_TIMEOUT))
                    .set_response_timeout(Some(response_timeout))
                    .set_min_delay(Duration::from_millis(50))
                    .set_max_delay(Duration::from_secs(1));
                Ok(Conn::Single(client.get_connection_manager_with_config(config).await?))
            }
            RedisEndpoint::Cluster(nodes) => {
                let mut b = redis::cluster::ClusterClient::builder(nodes.iter().map(String::as_str))
                    .connection_timeout(CONNECT_TIMEOUT)
                    .response_timeout(response_timeout)
                    .tcp_settings(tcp())
                    // Three retries (redirects, TRYAGAIN while a slot moves, a reconnect;
                    // one budget for all), each after 1-19 ms: the client's default waits
                    // 1.28 s or more before a retry, far past any operation's timeout, so a
                    // slot being moved would time out and open the breaker instead of
                    // failing that one request. Three: TRYAGAIN and then a redirect (the
                    // bucket moved meanwhile) is one ordinary sequence of a reshard.
                    .retries(3)
                    .min_retry_wait(1)
                    .max_retry_wait(20);
                if let Some(p) = &cfg.password {
                    b = b.password(p.0.clone());
                }
                if nodes.iter().any(|n| n.starts_with("rediss://")) {
                    b = b.tls(redis::TlsMode::Secure);
                }
                if let Some(c) = certs {
                    b = b.certs(c);
                }
                Ok(Conn::Cluster(b.build()?.get_async_connection().await?))
            }
        }
    }

    /// Runs a script (`EVALSHA`; `SCRIPT LOAD` once when the server does not have it).
    pub async fn run<T: FromRedisValue>(&mut self, inv: &ScriptInvocation<'_>) -> RedisResult<T> {
        match self {
            Conn::Single(c) => inv.invoke_async(c).await,
            Conn::Cluster(c) => inv.invoke_async(c).await,
        }
    }

    /// Runs a pipeline (several commands, one write, their answers in order).
    pub async fn pipeline<T: FromRedisValue>(&mut self, pipe: &redis::Pipeline) -> RedisResult<T> {
        match self {
            Conn::Single(c) => pipe.query_async(c).await,
            Conn::Cluster(c) => pipe.query_async(c).await,
        }
    }

    /// Runs one command.
    pub async fn query<T: FromRedisValue>(&mut self, cmd: &redis::Cmd) -> RedisResult<T> {
        match self {
            Conn::Single(c) => cmd.query_async(c).await,
            Conn::Cluster(c) => cmd.query_async(c).await,
        }
    }
}
