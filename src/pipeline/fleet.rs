//! \[limit\] with `shared_state:` (docs/shared-state.md): the key's admission and the
//! client IP's failed-authentication budget decided in Redis for the whole fleet, and
//! what each becomes while Redis cannot answer.
//!
//! At most one round trip per authenticated request: the key's fleet-wide GCRA bucket is
//! spent through this gateway's lease of it (`shared/lease.rs`), and a signed request's
//! replay record is written with it. Failed authentications cost one round
//! trip each until the IP is over budget; from then on this gateway refuses it locally
//! (`check_ip`) without asking Redis, so a flood of bad keys cannot write to Redis
//! beyond the budget.
//!
//! Fallbacks (each counted in `gatehouse_shared_state_fallbacks_total{reason}`):
//! - a signature: `on_unavailable.replay: reject` → 503 `shared_state_unavailable`;
//!   `local` → this process's replay cache;
//! - the key's limit: this process's limiter at the limit divided by the gateways last
//!   seen alive (never unlimited);
//! - the failed-auth budget: this process's budget.

use crate::config::shared_state::ReplayFallback;
use crate::credentials::snapshot::RateLimit;
use crate::pipeline::authn::{self, Identity, Signature};
use crate::pipeline::error::{AuthFailure, GateError, LimitScope};
use crate::pipeline::limit::{Quota, ip_key, retry_after};
use crate::pipeline::state::Gateway;
use crate::shared::{Admission, Fallback, Shared, SignatureRecord};
use std::net::IpAddr;
use std::time::Duration;

/// Takes one request from the key's fleet-wide quota, recording its signature (if any)
/// against replays in the same round trip.
pub async fn admit(gw: &Gateway, shared: &Shared, id: &Identity, client: IpAddr) -> Result<Quota, GateError> {
    let key = &id.key;
    let now = gw.unix_now();
    // A signature from before Redis lost its data cannot be checked there.
    let (in_redis, fenced) = match &id.signature {
        Some(s) if shared.fenced(s.timestamp) => (None, Some(s)),
        other => (other.as_ref(), None),
    };
    if let Some(s) = fenced {
        replay_fallback(gw, shared, &key.id, s, now)?;
    }
    let record = in_redis.map(|s| SignatureRecord {
        signature: &s.bytes,
        timestamp: s.timestamp,
        ttl: Duration::from_secs(u64::try_from(s.expires_at - now).unwrap_or(0).max(1)),
    });
    let rate = key.rate_limit;
    match shared.admit(&key.id, rate.per_second, rate.burst, record).await {
        Ok(Admission::Admitted { remaining }) => Ok(Quota { limit: key.limit_header.clone(), remaining }),
        Ok(Admission::Limited { wait }) => {
            Err(GateError::TooManyRequests { retry_after_secs: retry_after(wait), scope: LimitScope::Key })
        }
        Ok(Admission::Fenced { remaining }) => {
            // Redis lost its data while this request's record was on its way.
            if let Some(s) = in_redis {
                replay_fallback(gw, shared, &key.id, s, now)?;
            }
            Ok(Quota { limit: key.limit_header.clone(), remaining })
        }
        Ok(Admission::Replayed) => {
            // A replay is a failed authentication, charged like one.
            charge_failure(gw, shared, client).await;
            Err(GateError::Unauthorized(AuthFailure::Replay))
        }
        Err(_) => {
            if let Some(s) = in_redis {
                replay_fallback(gw, shared, &key.id, s, now)?;
            }
            shared.fell_back(Fallback::RateLimitLocal);
            let live = shared.live_gateways();
            let share = RateLimit { per_second: (rate.per_second / live).max(1), burst: (rate.burst / live).max(1) };
            gw.rate_limits.check_key_at(key, share)
        }
    }
}

fn replay_fallback(gw: &Gateway, shared: &Shared, key_id: &str, s: &Signature, now: i64) -> Result<(), GateError> {
    match shared.replay_fallback {
        ReplayFallback::Reject => {
            shared.fell_back(Fallback::ReplayRejected);
            Err(GateError::SharedStateUnavailable)
        }
        ReplayFallback::Local => {
            shared.fell_back(Fallback::ReplayLocal);
            authn::record_here(&gw.replay, key_id, s, now)
        }
    }
}

/// Charges one failed authentication to `client` in the fleet's budget; over it, the
/// client is blocked here (and each other gateway learns it at its next charge).
pub async fn charge_failure(gw: &Gateway, shared: &Shared, client: IpAddr) {
    match shared.charge_failure(ip_key(client), gw.auth.failed_per_ip_per_minute).await {
        Ok(None) => {}
        Ok(Some(wait)) => gw.rate_limits.block(client, wait),
        Err(_) => {
            shared.fell_back(Fallback::FailedAuthLocal);
            gw.rate_limits.charge_failure(client);
        }
    }
}
