//! The straight line every proxied request follows:
//!
//! ```text
//! parse → limit (client IP) → authenticate → authorize → limit (key) → rewrite → forward
//!       → (rewrite response) → record
//! ```
//!
//! `handle` only maps errors and records; `handle_inner` calls the steps in order and
//! uses `?` on each. A step never calls another step.

use crate::body::Body;
use crate::error::GateError;
use crate::record::{self, Outcome};
use crate::request::{self, ConnInfo};
use crate::state::Gateway;
use crate::upstream::Upstream;
use crate::{authn, authz, forward, rewrite};
use http::{Request, Response};
use hyper::body::Incoming;
use std::sync::Arc;

/// Serves one request on a proxy listener. Never fails: every error becomes a §5 response.
pub async fn handle(gw: &Gateway, upstream: &Arc<Upstream>, conn: &ConnInfo, req: Request<Incoming>) -> Response<Body> {
    let request_id = request::request_id(req.headers());
    let mut out = Outcome::start(request_id.clone(), req.method().clone(), conn.peer_ip.clone());
    let res = match handle_inner(gw, upstream, conn, req, &mut out).await {
        Ok(res) => res,
        Err(e) => {
            out.error = Some(e);
            e.into_response(&request_id)
        }
    };
    record::finish(gw, &out, res.status());
    res
}

async fn handle_inner(
    gw: &Gateway,
    upstream: &Arc<Upstream>,
    conn: &ConnInfo,
    req: Request<Incoming>,
    out: &mut Outcome,
) -> Result<Response<Body>, GateError> {
    // One consistent view of the credentials: authentication reads the snapshot, and
    // what it finds (the key, its user and roles) is held by `caller` from then on.
    let snap = gw.credentials.snapshot_view();
    let mut parsed = request::parse(&gw.routes, &gw.limits, req, out.request_id.clone())?;
    out.route = Some(parsed.route.name.clone());
    out.path = Some(parsed.path().to_string());
    // The per-IP failed-auth budget: checked before any key lookup, charged on failure.
    let client = gw.client_ip(conn.peer.ip(), &parsed.parts.headers);
    gw.rate_limits.check_ip(client)?;
    let caller =
        authn::authenticate(&snap, &mut parsed, &gw.auth, &gw.replay, gw.unix_now()).await.inspect_err(|e| {
            if matches!(e, GateError::Unauthorized(_)) {
                gw.rate_limits.charge_failure(client);
            }
        })?;
    drop(snap);
    if let authn::Caller::User(id) = &caller {
        out.user = Some(id.key.user.id.clone());
        out.key = Some(id.key.id.clone());
    }
    let permit = authz::authorize(caller, &parsed)?;
    out.proxied_user = permit.proxied_user().cloned();
    out.grant = permit.granted_by().cloned();
    let quota = match permit.caller() {
        authn::Caller::User(id) => Some(gw.rate_limits.check_key(&id.key)?),
        authn::Caller::Anonymous => None,
    };
    let outbound = rewrite::request(parsed, &permit, conn, gw.is_trusted_proxy(conn.peer.ip()), &gw.identity_headers);
    let fwd = forward::send(upstream, outbound).await?;
    out.upstream_latency = Some(fwd.upstream_latency);
    Ok(rewrite::response(fwd.response, &out.request_id, quota))
}
