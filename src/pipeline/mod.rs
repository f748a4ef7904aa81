//! The straight line every proxied request follows:
//!
//! ```text
//! parse → limit (client IP) → authenticate → authorize → limit (key) → rewrite → forward
//!       → (rewrite response) → record
//! ```
//!
//! `handle` only maps errors and hands the response to its [`Report`]; `handle_inner`
//! calls the steps in order and uses `?` on each. A step never calls another step.
//!
//! This folder is the per-request policy: each step's module, the error mapping, the
//! gateway's shared state, and what `record` writes to (usage, metrics, audit log). It
//! builds on `wire`, `config`, `credentials` and `tls`, and nothing below imports it.

pub mod audit;
pub mod authn;
pub mod authz;
pub mod clock;
pub mod error;
pub mod fleet;
pub mod forward;
pub mod health;
pub mod history;
pub mod limit;
pub mod metrics;
pub mod record;
pub mod request;
pub mod rewrite;
pub mod route;
pub mod state;
pub mod usage;

use crate::pipeline::error::GateError;
use crate::pipeline::record::{Outcome, Report, Reporter};
use crate::wire::body::Body;
use crate::wire::tunnel::{self, Switched};
use crate::wire::upstream::Upstream;
use http::{Request, Response};
use hyper::body::Incoming;
use request::ConnInfo;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use tokio::sync::watch;

/// A tunnel to run on the client's connection once hyper hands it over.
pub type Tunnel = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Where a connection keeps the tunnel it is to run after its `101` (at most one).
pub type TunnelSlot = Arc<Mutex<Option<Tunnel>>>;

/// The client connection a request came on, as the pipeline needs it (`server/listen.rs`
/// implements it). The request's [`Report`] holds it until the request is reported.
pub trait Carrier: Reporter {
    /// The connection worker's upstream pool.
    fn upstream(&self) -> &Arc<Upstream>;
    fn info(&self) -> &ConnInfo;
    /// Set when a shutdown's grace period is over: tunnels close then.
    fn closing(&self) -> watch::Receiver<bool>;
    /// Where to put a tunnel that this connection runs after the `101` is written: in
    /// the connection's own task, so the tunnel keeps the connection's slot (and its
    /// place in the open-connections gauge) until it closes.
    fn tunnel_slot(&self) -> &TunnelSlot;
}

/// Serves one request on a proxy listener. Never fails: every error becomes a JSON error response (docs/errors.md).
pub async fn handle<C: Carrier>(carrier: C, req: Request<Incoming>) -> Response<Body> {
    let request_id = request::request_id(req.headers());
    let grpc = error::is_grpc(req.headers());
    let mut out = Outcome::start(request_id.clone(), req.method().clone(), carrier.info().peer_ip.clone());
    out.user_agent = req.headers().get(http::header::USER_AGENT).cloned();
    let mut report = Report::new(carrier, out);
    let res = match handle_inner(&report.carrier, req, &mut report.out).await {
        Ok((res, None)) => res,
        Ok((res, Some(switched))) => {
            report.switched(res.status());
            let idle = report.carrier.gateway().limits.tunnel_idle_timeout;
            let closing = report.carrier.closing();
            let slot = report.carrier.tunnel_slot().clone();
            let run = async move {
                let t = tunnel::run(switched, idle, closing).await;
                report.tunnel_closed(t);
            };
            *slot.lock().unwrap_or_else(PoisonError::into_inner) = Some(Box::pin(run));
            return res;
        }
        Err(e) => {
            report.out.error = Some(e);
            // A gRPC client cannot read a JSON body: its errors are gRPC errors.
            if grpc { e.into_grpc_response(&request_id) } else { e.into_response(&request_id) }
        }
    };
    report.respond(res)
}

async fn handle_inner<C: Carrier>(
    carrier: &C,
    req: Request<Incoming>,
    out: &mut Outcome,
) -> Result<(Response<Body>, Option<Switched>), GateError> {
    let (gw, conn) = (carrier.gateway(), carrier.info());
    // One consistent view of the credentials: authentication reads the snapshot, and
    // what it finds (the key, its user and roles) is held by `caller` from then on.
    let snap = gw.credentials.snapshot_view();
    let mut parsed = request::parse(&gw.routes, &gw.limits, req, out.request_id.clone())?;
    out.route = Some(parsed.route.name.clone());
    out.path = Some(parsed.path().to_string());
    // The per-IP failed-auth budget: checked before any key lookup, charged on failure.
    let client = gw.client_ip(conn.peer.ip(), &parsed.parts.headers);
    gw.rate_limits.check_ip(client)?;
    // With shared state a signature is recorded against replays with the key's limit,
    // in one round trip to Redis (`fleet.rs`).
    let replay = match &gw.shared {
        None => authn::ReplayCheck::Here(&gw.replay),
        Some(_) => authn::ReplayCheck::Deferred,
    };
    let caller = match authn::authenticate(&snap, &mut parsed, &gw.auth, replay, gw.unix_now()).await {
        Ok(caller) => caller,
        Err(refused) => {
            if matches!(refused.error, GateError::Unauthorized(_)) {
                match &gw.shared {
                    None => gw.rate_limits.charge_failure(client),
                    Some(shared) => fleet::charge_failure(gw, shared, client).await,
                }
            }
            out.refused_key = refused.key;
            return Err(refused.error);
        }
    };
    drop(snap);
    if let authn::Caller::User(id) = &caller {
        out.user = Some(id.key.user.id.clone());
        out.key = Some(id.key.id.clone());
    }
    let permit = authz::authorize(caller, &parsed)?;
    out.proxied_user = permit.proxied_user().cloned();
    out.grant = permit.granted_by().cloned();
    let quota = match permit.caller() {
        authn::Caller::User(id) => Some(match &gw.shared {
            None => gw.rate_limits.check_key(&id.key)?,
            Some(shared) => fleet::admit(gw, shared, id, client).await?,
        }),
        authn::Caller::Anonymous => None,
    };
    let outbound = rewrite::request(parsed, &permit, conn, gw.is_trusted_proxy(conn.peer.ip()), &gw.identity_headers);
    let fwd = forward::send(carrier.upstream(), outbound, &mut out.upstream).await?;
    out.upstream_latency = Some(fwd.upstream_latency);
    Ok((rewrite::response(fwd.response, &out.request_id, quota), fwd.switched))
}
