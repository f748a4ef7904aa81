//! The long-lived handles every request shares.

use crate::config::{AuthConfig, Config, IdentityHeaders, Limits};
use crate::credentials::reload::Credentials;
use crate::pipeline::audit::Audit;
use crate::pipeline::authn::replay::ReplayCache;
use crate::pipeline::clock::Clock;
use crate::pipeline::limit::RateLimits;
use crate::pipeline::metrics::Metrics;
use crate::pipeline::route::RouteTable;
use crate::pipeline::usage::Usage;
use crate::shared::Shared;
use ipnet::IpNet;
use std::net::IpAddr;
use std::sync::Arc;

/// Everything a request needs, built once at start.
#[derive(Debug)]
pub struct Gateway {
    pub routes: RouteTable,
    pub limits: Limits,
    trusted_proxies: Vec<IpNet>,
    pub credentials: Arc<Credentials>,
    pub auth: AuthConfig,
    pub replay: Arc<ReplayCache>,
    pub identity_headers: IdentityHeaders,
    pub usage: Arc<Usage>,
    pub audit: Arc<Audit>,
    pub rate_limits: RateLimits,
    pub metrics: Arc<Metrics>,
    /// Time for everything a request's outcome depends on (see `clock.rs`).
    pub clock: Clock,
    /// `shared_state:`: replay records, limits and usage shared with the fleet in Redis.
    pub shared: Option<Arc<Shared>>,
}

impl Gateway {
    /// Builds the gateway from a validated config, its route table (built by the server,
    /// which also starts their health checks and reloads their client certificates) and
    /// its loaded credentials.
    #[allow(clippy::too_many_arguments)] // each is a part started separately by the server
    pub fn new(
        config: &Config,
        routes: RouteTable,
        credentials: Arc<Credentials>,
        usage: Arc<Usage>,
        audit: Arc<Audit>,
        metrics: Arc<Metrics>,
        replay: Arc<ReplayCache>,
        clock: Clock,
    ) -> Gateway {
        Gateway {
            routes,
            limits: config.limits.clone(),
            trusted_proxies: config.trusted_proxies.clone(),
            credentials,
            auth: config.auth.clone(),
            replay,
            identity_headers: config.identity_headers.clone(),
            usage,
            audit,
            rate_limits: RateLimits::new(config.auth.failed_per_ip_per_minute, clock.clone()),
            metrics,
            clock,
            shared: None,
        }
    }

    /// Shares replay records, limits and usage with the fleet through `shared`.
    pub fn with_shared(mut self, shared: Option<Arc<Shared>>) -> Gateway {
        self.shared = shared;
        self
    }

    /// Wall-clock unix seconds, the clock HMAC timestamps are checked against.
    pub fn unix_now(&self) -> i64 {
        self.clock.unix_now()
    }

    /// The client's address: the peer, or — when the peer is a trusted proxy — the
    /// rightmost `X-Forwarded-For` entry that is not itself a trusted proxy.
    pub fn client_ip(&self, peer: IpAddr, headers: &http::HeaderMap) -> IpAddr {
        if !self.is_trusted_proxy(peer) {
            return peer;
        }
        let hops: Vec<IpAddr> = headers
            .get_all(crate::wire::headers::X_FORWARDED_FOR)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|s| s.trim().parse().ok())
            .collect();
        hops.into_iter().rev().find(|ip| !self.is_trusted_proxy(*ip)).unwrap_or(peer)
    }

    /// True when `ip` is a configured trusted proxy whose forwarding headers we extend.
    pub fn is_trusted_proxy(&self, ip: IpAddr) -> bool {
        !self.trusted_proxies.is_empty() && self.trusted_proxies.iter().any(|n| n.contains(&ip))
    }
}
