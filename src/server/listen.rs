//! \[accept\] Listeners, connection limits, TLS handshakes, per-connection protocol limits
//! and graceful drain.
//!
//! Threads: the accept loops, the admin listener and background tasks run on the main
//! runtime; every accepted connection is handed to one of N connection workers (one OS
//! thread with a single-threaded runtime per core, round-robin), which drives it and its
//! upstream requests to the end. A request then never moves between threads, and each
//! worker's upstream pool is its own: no cross-core wake-ups or pool lock on the hot path
//! (measured against tokio's work-stealing scheduler: see benches/README.md).
//!
//! Shutdown: listeners close first (new connections are refused), every connection is
//! told to finish its in-flight requests and close, and the process waits at most
//! `limits.shutdown_grace` for them.

use crate::config::{Config, Limits};
use crate::credentials::reload::Credentials;
use crate::pipeline::authn::replay::ReplayCache;
use crate::pipeline::clock::Clock;
use crate::pipeline::metrics::Metrics;
use crate::pipeline::record::Reporter;
use crate::pipeline::request::ConnInfo;
use crate::pipeline::route::RouteTable;
use crate::pipeline::state::Gateway;
use crate::pipeline::usage::Usage;
use crate::pipeline::{self, Carrier, TunnelSlot};
use crate::server::admin::Admin;
use crate::server::parse_errors::JsonParseErrors;

use crate::tls::{self, CertResolver, TlsError};
use crate::wire::balance::TlsClient;
use crate::wire::upstream::Upstream;
use hyper::rt::{Read, Write};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error("TLS certificate {0}")]
    Tls(#[from] TlsError),
    #[error("route {route}: upstream TLS: {error}")]
    UpstreamTls { route: String, error: TlsError },
    #[error("{0}")]
    Credentials(#[from] crate::config::ConfigErrors),
    #[error("{0}")]
    Admin(String),
    #[error("{0}")]
    SharedState(#[from] crate::shared::ConnectError),
}

/// A bound listener, not yet accepting.
struct Bound {
    tcp: TcpListener,
    name: Arc<str>,
    addr: SocketAddr,
    tls: Option<(TlsAcceptor, Arc<CertResolver>)>,
}

/// The proxy listeners (and the admin listener) of one gateway, bound and ready to run.
pub struct Server {
    gw: Arc<Gateway>,
    /// The active health checks, stopped when the server ends.
    health: crate::pipeline::health::HealthChecks,
    listeners: Vec<Bound>,
    admin: Option<(TcpListener, Arc<Admin>)>,
    limits: Limits,
}

/// One listener's name, bound address and whether it speaks TLS.
#[derive(Debug, Clone)]
pub struct ListenerInfo {
    pub name: Arc<str>,
    pub addr: SocketAddr,
    pub tls: bool,
}

/// Each route's TLS client for its `https://` targets, in route order; a client
/// certificate (mTLS) is reloaded from then on whenever its files change.
fn upstream_tls(config: &Config) -> Result<Vec<Option<TlsClient>>, StartError> {
    let mut out = Vec::with_capacity(config.routes.len());
    for r in &config.routes {
        let Some(cfg) = &r.upstream_tls else {
            out.push(None);
            continue;
        };
        let built = tls::upstream::client(cfg, r.protocol)
            .map_err(|error| StartError::UpstreamTls { route: r.name.clone(), error })?;
        if let Some(resolver) = built.client_cert {
            resolver.spawn_reloader();
        }
        out.push(Some(built.client));
    }
    Ok(out)
}

impl Server {
    /// Loads certificates and binds every listener. Nothing accepts until [`Server::run`].
    pub async fn bind(config: &Config) -> Result<Server, StartError> {
        Server::bind_with_clock(config, Clock::system()).await
    }

    /// [`Server::bind`] on `clock`: tests move it forward instead of sleeping.
    pub async fn bind_with_clock(config: &Config, clock: Clock) -> Result<Server, StartError> {
        // Credentials first: a database that cannot be used ends the start-up before
        // anything listens.
        let credentials = Arc::new(Credentials::open(config).await?);
        let mut listeners = Vec::with_capacity(config.listeners.len());
        for l in &config.listeners {
            let tls = l.tls.as_ref().map(tls::acceptor).transpose()?;
            let tcp =
                TcpListener::bind(l.address).await.map_err(|source| StartError::Bind { addr: l.address, source })?;
            let addr = tcp.local_addr().map_err(|source| StartError::Bind { addr: l.address, source })?;
            listeners.push(Bound { tcp, name: Arc::from(l.name.as_str()), addr, tls });
        }
        let upstream_tls = upstream_tls(config)?;
        let shared = match &config.shared_state {
            None => {
                tracing::info!(
                    "no shared_state configured: replay protection, rate limits and usage are per process (right for one gateway; several need shared_state, docs/shared-state.md)"
                );
                None
            }
            Some(s) => {
                let shared = crate::shared::Shared::connect(s, config.auth.max_skew).await?;
                tracing::info!(redis = %shared.describe(), gateways = shared.live_gateways(), "shared state in Redis: replay protection, rate limits and usage are fleet-wide");
                Some(shared)
            }
        };
        // With shared state the fleet's usage lives in Redis, not in a file of this pod's.
        let usage_file = if shared.is_some() { None } else { config.usage_state.clone() };
        let usage = Arc::new(Usage::load(usage_file));
        let audit = Arc::new(crate::pipeline::audit::Audit::start(&config.audit_log));
        let replay = Arc::new(ReplayCache::new(config.auth.replay_cache_entries));
        let route_names: Vec<Arc<str>> = config.routes.iter().map(|r| Arc::from(r.name.as_str())).collect();
        let routes = RouteTable::new(&config.routes, &upstream_tls);
        let targets = routes
            .routes()
            .flat_map(|r| r.upstreams.targets().map(|t| (r.name.clone(), t.authority.to_string(), t.health.clone())))
            .collect();
        let metrics = Arc::new(
            Metrics::new(
                route_names.iter(),
                config.metrics_per_user_series,
                listeners.iter().filter_map(|b| Some((b.name.clone(), b.tls.as_ref()?.1.clone()))).collect(),
                replay.clone(),
                shared.as_ref().map(|s| &s.metrics),
                credentials.follower().is_some(),
                targets,
            )
            .map_err(|e| StartError::Admin(format!("metrics: {e}")))?,
        );
        let admin = match &config.admin {
            None => None,
            Some(a) => {
                let service = Admin::new(
                    config,
                    a,
                    credentials.clone(),
                    usage.clone(),
                    audit.clone(),
                    metrics.clone(),
                    shared.clone(),
                )
                .map_err(StartError::Admin)?
                .with_proxy(listeners.first().map(|b| (b.addr, b.tls.is_some())));
                let tcp = TcpListener::bind(a.address)
                    .await
                    .map_err(|source| StartError::Bind { addr: a.address, source })?;
                Some((tcp, Arc::new(service)))
            }
        };
        Ok(Server {
            health: crate::pipeline::health::spawn(&routes, config.limits.max_header_bytes),
            gw: Arc::new(
                Gateway::new(config, routes, credentials, usage, audit, metrics, replay, clock).with_shared(shared),
            ),
            listeners,
            admin,
            limits: config.limits.clone(),
        })
    }

    /// The bound listeners (with the real port where the config said `:0`).
    pub fn listeners(&self) -> Vec<ListenerInfo> {
        self.listeners
            .iter()
            .map(|b| ListenerInfo { name: b.name.clone(), addr: b.addr, tls: b.tls.is_some() })
            .collect()
    }

    /// The admin listener's bound address, when there is one.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().and_then(|(l, _)| l.local_addr().ok())
    }

    /// Serves until `shutdown` completes, then drains.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        // The health checks run until this returns (dropping them stops them).
        let Server { gw, listeners, admin, limits, health: _health } = self;
        let max = u32::try_from(limits.max_connections).unwrap_or(u32::MAX).min(Semaphore::MAX_PERMITS as u32);
        let conns = Arc::new(Semaphore::new(max as usize));
        let (stop_tx, stop_rx) = watch::channel(false);
        gw.credentials.clone().spawn_reloader();
        gw.usage.clone().spawn_flusher(Duration::from_secs(5));
        match &gw.shared {
            None => gw.usage.clone().spawn_history_sampler(Duration::from_secs(10)),
            // The fleet's history is counted in Redis by each flush.
            Some(s) => {
                s.clone().spawn();
                gw.usage.clone().spawn_shared_flusher(s.clone(), Duration::from_secs(1));
            }
        }
        // Drop limiter state of keys gone from the snapshot and of idle client IPs.
        let pruned = gw.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(60)).await;
                let snap = pruned.credentials.snapshot();
                pruned.rate_limits.prune(&snap);
                if let Some(shared) = &pruned.shared {
                    shared.prune_leases(|id| snap.by_id(id).is_some());
                }
            }
        });
        let shared = Arc::new(Shared { gw, http: http_builder(&limits), limits });
        let (hard_stop_tx, hard_stop_rx) = watch::channel(false);
        let (workers, mut workers_done) = Workers::start(&shared, stop_rx.clone(), hard_stop_rx);
        let mut accepting = JoinSet::new();
        for b in listeners {
            if let Some((_, resolver)) = &b.tls {
                resolver.clone().spawn_reloader();
            }
            tracing::info!(listener = %b.name, address = %b.addr, tls = b.tls.is_some(), "listening");
            accepting.spawn(accept_loop(b, shared.clone(), workers.clone(), conns.clone(), stop_rx.clone()));
        }
        if let Some((tcp, service)) = admin {
            if let Ok(addr) = tcp.local_addr() {
                tracing::info!(address = %addr, "admin listening");
            }
            tokio::spawn(crate::server::admin::serve(tcp, service, shared.limits.header_read_timeout, stop_rx.clone()));
        }
        shutdown.await;
        tracing::info!("shutting down: refusing new connections, draining in-flight requests");
        let _ = stop_tx.send(true);
        while accepting.join_next().await.is_some() {}
        let open = max as usize - conns.available_permits();
        match tokio::time::timeout(shared.limits.shutdown_grace, conns.acquire_many(max)).await {
            Ok(_) => tracing::info!(connections = open, "drained"),
            Err(_) => tracing::warn!(
                still_open = max as usize - conns.available_permits(),
                "shutdown grace period over; closing remaining connections"
            ),
        }
        let _ = hard_stop_tx.send(true);
        // The workers close what is left and report it (tunnels' audit records) first.
        drop(workers);
        if tokio::time::timeout(CLOSE_WAIT * 2, workers_done.recv()).await.is_err() {
            tracing::warn!("connection workers did not stop in time");
        }
        // Counts of the requests just drained must survive the restart.
        if let Err(e) = shared.gw.usage.flush() {
            tracing::error!(error = %e, "cannot write the usage state file at shutdown");
        }
        if let Some(s) = &shared.gw.shared
            && shared.gw.usage.flush_shared(s).await.is_err()
        {
            tracing::error!(redis = %s.describe(), "cannot add this gateway's last usage counts to Redis at shutdown");
        }
        // The last records (requests that ended during the drain, tunnels closed at its
        // end) may still be queued: the writer task ends with the runtime, after this.
        if tokio::time::timeout(CLOSE_WAIT, shared.gw.audit.drain()).await.is_err() {
            tracing::warn!("the audit writer did not write the last records in time");
        }
    }
}

/// What every connection of a server shares.
struct Shared {
    gw: Arc<Gateway>,
    http: auto::Builder<TokioExecutor>,
    limits: Limits,
}

/// hyper's HTTP/1 header count limit when none is set (`proto::h1::role::DEFAULT_MAX_HEADERS`).
const HYPER_DEFAULT_MAX_HEADERS: usize = 100;

/// hyper's protocol limits. Both builders get a timer: hyper ignores
/// `header_read_timeout` (slowloris) and h2 keep-alive without one.
fn http_builder(l: &Limits) -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1()
        .timer(TokioTimer::new())
        // Also closes idle keep-alive connections: hyper starts this timer whenever it
        // waits for a request head, including between requests.
        .header_read_timeout(l.header_read_timeout)
        .max_buf_size(l.max_header_bytes)
        .keep_alive(true);
    // hyper's own limit is 100 headers. Setting any limit, even 100, makes it fill two
    // 100-entry arrays per request head (`smallvec![uninit; n]`) instead of using stack
    // arrays: about 1 % of the gateway's instructions.
    if l.max_headers != HYPER_DEFAULT_MAX_HEADERS {
        b.http1().max_headers(l.max_headers);
    }
    b.http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(l.h2_max_concurrent_streams)
        .max_header_list_size(u32::try_from(l.max_header_bytes).unwrap_or(u32::MAX))
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(Duration::from_secs(20));
    // hyper's rapid-reset protection (max_pending_accept_reset_streams) keeps its default.
    b
}

/// A connection handed from an accept loop to a worker.
struct Accepted {
    stream: std::net::TcpStream,
    info: ConnInfo,
    acceptor: Option<TlsAcceptor>,
    slot: (OwnedSemaphorePermit, OpenGauge),
}

/// The connection workers: one thread each, with a single-threaded runtime and its own
/// upstream client.
#[derive(Clone)]
struct Workers {
    queues: Arc<[tokio::sync::mpsc::UnboundedSender<Accepted>]>,
    next: Arc<AtomicUsize>,
}

impl Workers {
    /// One worker per available core. Its connections close gracefully once `stop` is
    /// set. A worker ends when every sender is gone and its connections have finished,
    /// or at once when `hard_stop` is set (grace period over).
    ///
    /// The receiver returned with them yields `None` once every worker has ended.
    fn start(
        shared: &Arc<Shared>,
        stop: watch::Receiver<bool>,
        hard_stop: watch::Receiver<bool>,
    ) -> (Workers, tokio::sync::mpsc::Receiver<()>) {
        let n = std::thread::available_parallelism().map_or(1, |n| n.get());
        let mut queues = Vec::with_capacity(n);
        let (done_tx, done_rx) = tokio::sync::mpsc::channel::<()>(1);
        for i in 0..n {
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Accepted>();
            let shared = shared.clone();
            let hard_stop = hard_stop.clone();
            let stop = stop.clone();
            let done = done_tx.clone();
            let spawned = std::thread::Builder::new().name(format!("gatehouse-conn-{i}")).spawn(move || {
                match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                    Ok(rt) => rt.block_on(worker(rx, shared, stop, hard_stop)),
                    Err(e) => tracing::error!(error = %e, "cannot start a connection worker runtime"),
                }
                drop(done);
            });
            match spawned {
                Ok(_) => queues.push(tx),
                Err(e) => tracing::error!(error = %e, "cannot start a connection worker thread"),
            }
        }
        (Workers { queues: queues.into(), next: Arc::new(AtomicUsize::new(0)) }, done_rx)
    }

    /// Hands a connection to the next worker; `None` when no worker is left (then the
    /// connection is closed by being dropped).
    fn dispatch(&self, mut conn: Accepted) -> Option<()> {
        let n = self.queues.len();
        let first = self.next.fetch_add(1, Ordering::Relaxed);
        for k in 0..n {
            match self.queues[(first + k) % n].send(conn) {
                Ok(()) => return Some(()),
                Err(tokio::sync::mpsc::error::SendError(back)) => conn = back,
            }
        }
        None
    }
}

async fn worker(
    mut rx: tokio::sync::mpsc::UnboundedReceiver<Accepted>,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
    mut hard_stop: watch::Receiver<bool>,
) {
    let upstream = Upstream::new(shared.limits.upstream_connect_timeout, shared.limits.max_header_bytes);
    upstream.spawn_evictor();
    // The worker's own copy of the stop signal: a connection checks it every time it
    // wakes, and a channel shared by every connection of every worker would make each
    // check take a lock whose cache line moves between cores.
    let (local_stop_tx, local_stop) = watch::channel(false);
    tokio::spawn(async move {
        stopped(&mut stop).await;
        let _ = local_stop_tx.send(true);
    });
    let (local_closing_tx, local_closing) = watch::channel(false);
    let mut running = JoinSet::new();
    let serve_all = async {
        loop {
            tokio::select! {
                next = rx.recv() => match next {
                    Some(a) => match TcpStream::from_std(a.stream) {
                        Ok(stream) => {
                            let signals = (local_stop.clone(), local_closing.clone());
                            running.spawn(serve_conn(stream, a.info, a.acceptor, shared.clone(), upstream.clone(), signals, a.slot));
                        }
                        Err(e) => tracing::warn!(error = %e, "cannot register an accepted connection"),
                    },
                    None => break,
                },
                Some(_) = running.join_next(), if !running.is_empty() => {}
            }
        }
        while running.join_next().await.is_some() {}
    };
    tokio::select! {
        () = serve_all => {}
        () = stopped(&mut hard_stop) => {
            // Grace period over: every connection and tunnel is told to close now, and
            // given a moment to report what it carried (a tunnel's audit record).
            let _ = local_closing_tx.send(true);
            let closed = async { while running.join_next().await.is_some() {} };
            if tokio::time::timeout(CLOSE_WAIT, closed).await.is_err() {
                tracing::warn!(still_open = running.len(), "connections did not close in time; dropping them");
            }
        }
    }
}

/// How long connections get, once a shutdown's grace period is over, to close and report.
const CLOSE_WAIT: Duration = Duration::from_secs(2);

async fn accept_loop(
    b: Bound,
    shared: Arc<Shared>,
    workers: Workers,
    conns: Arc<Semaphore>,
    mut stop: watch::Receiver<bool>,
) {
    let open = shared.gw.metrics.connections(&b.name);
    loop {
        // Take a connection slot before accepting: at the cap, new connections wait in
        // the kernel backlog instead of being accepted and starved.
        let permit = tokio::select! {
            p = conns.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
            _ = stopped(&mut stop) => return,
        };
        let (stream, peer) = tokio::select! {
            r = b.tcp.accept() => match r {
                Ok(pair) => pair,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning on a full fd table.
                    tracing::warn!(listener = %b.name, error = %e, "accept failed; backing off");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = stopped(&mut stop) => return,
        };
        let _ = stream.set_nodelay(true);
        let stream = match stream.into_std() {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(listener = %b.name, error = %e, "cannot hand over an accepted connection");
                continue;
            }
        };
        let info = ConnInfo::new(peer, b.name.clone(), b.tls.is_some());
        let acceptor = b.tls.as_ref().map(|(a, _)| a.clone());
        let slot = (permit, OpenGauge::new(&open));
        if workers.dispatch(Accepted { stream, info, acceptor, slot }).is_none() {
            tracing::error!(listener = %b.name, "no connection worker is running; stopping this listener");
            return;
        }
    }
}

/// Serves one client connection, and the tunnel it may become, to its end. `signals`:
/// the worker's stop (drain) and closing (grace period over) signals. The connection's
/// slot and gauge are held until then.
async fn serve_conn(
    stream: TcpStream,
    info: ConnInfo,
    acceptor: Option<TlsAcceptor>,
    shared: Arc<Shared>,
    upstream: Arc<Upstream>,
    (stop, closing): (watch::Receiver<bool>, watch::Receiver<bool>),
    _slot: (OwnedSemaphorePermit, OpenGauge),
) {
    let conn = Arc::new(Conn {
        gw: shared.gw.clone(),
        upstream,
        info,
        inflight: AtomicUsize::new(0),
        last_done_ms: AtomicU64::new(0),
        opened: Instant::now(),
        started: AtomicBool::new(false),
        closing,
        tunnel: TunnelSlot::default(),
    });
    match acceptor {
        None => drive(TokioIo::new(JsonParseErrors::new(stream)), conn, shared, stop).await,
        Some(acceptor) => {
            match tokio::time::timeout(shared.limits.tls_handshake_timeout, acceptor.accept(stream)).await {
                Ok(Ok(tls)) => drive(TokioIo::new(JsonParseErrors::new(tls)), conn, shared, stop).await,
                Ok(Err(e)) => tracing::debug!(peer = %conn.info.peer, error = %e, "TLS handshake failed"),
                Err(_) => tracing::debug!(peer = %conn.info.peer, "TLS handshake timed out"),
            }
        }
    }
}

/// Counts an open connection in `gatehouse_open_connections` until dropped.
struct OpenGauge(prometheus::IntGauge);

impl OpenGauge {
    fn new(g: &prometheus::IntGauge) -> OpenGauge {
        g.inc();
        OpenGauge(g.clone())
    }
}

impl Drop for OpenGauge {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Per-connection state: who it is, whether it is idle, and what its requests use. A
/// request holds this one `Arc` (its worker's own, so its count is written on one core
/// only) rather than a clone of the `Arc<Gateway>` that every core's requests would write.
struct Conn {
    gw: Arc<Gateway>,
    upstream: Arc<Upstream>,
    info: ConnInfo,
    inflight: AtomicUsize,
    last_done_ms: AtomicU64,
    opened: Instant,
    /// Set when the first request reaches the service.
    started: AtomicBool,
    /// The worker's copy of the hard-stop signal (grace period over).
    closing: watch::Receiver<bool>,
    /// A tunnel to run once hyper hands over the upgraded connection.
    tunnel: TunnelSlot,
}

impl Conn {
    /// How long the connection has had no request in flight, or `None` while one is.
    fn idle_for(&self) -> Option<Duration> {
        if self.inflight.load(Ordering::Acquire) > 0 {
            return None;
        }
        let since_open = self.opened.elapsed();
        Some(since_open.saturating_sub(Duration::from_millis(self.last_done_ms.load(Ordering::Relaxed))))
    }
}

/// Counts a request in flight until dropped (also when the client goes away mid-request).
/// It is the request's [`Carrier`]: held by its report until the request is reported,
/// so a response body still streaming keeps the connection busy (not idle).
struct InFlight(Arc<Conn>);

impl Reporter for InFlight {
    fn gateway(&self) -> &Gateway {
        &self.0.gw
    }
}

impl Carrier for InFlight {
    fn upstream(&self) -> &Arc<Upstream> {
        &self.0.upstream
    }

    fn info(&self) -> &ConnInfo {
        &self.0.info
    }

    fn closing(&self) -> watch::Receiver<bool> {
        self.0.closing.clone()
    }

    fn tunnel_slot(&self) -> &TunnelSlot {
        &self.0.tunnel
    }
}

impl InFlight {
    fn new(conn: Arc<Conn>) -> InFlight {
        conn.started.store(true, Ordering::Relaxed);
        conn.inflight.fetch_add(1, Ordering::AcqRel);
        InFlight(conn)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.last_done_ms.store(self.0.opened.elapsed().as_millis() as u64, Ordering::Relaxed);
        self.0.inflight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Serves HTTP on the connection, then runs the tunnel a request left (a WebSocket that
/// the upstream accepted), whose future holds the connection: taken out in every case, so
/// that no reference cycle outlives the connection.
async fn drive<I>(io: I, conn: Arc<Conn>, shared: Arc<Shared>, stop: watch::Receiver<bool>)
where
    I: Read + Write + Unpin + Send + 'static,
{
    serve_http(io, &conn, &shared, stop).await;
    let tunnel = conn.tunnel.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take();
    if let Some(tunnel) = tunnel {
        tunnel.await;
    }
}

async fn serve_http<I>(io: I, conn: &Arc<Conn>, shared: &Shared, mut stop: watch::Receiver<bool>)
where
    I: Read + Write + Unpin + Send + 'static,
{
    let mut hard_closing = conn.closing.clone();
    let svc_conn = conn.clone();
    let svc = hyper::service::service_fn(move |req| {
        let guard = InFlight::new(svc_conn.clone());
        async move { Ok::<_, Infallible>(pipeline::handle(guard, req).await) }
    });
    let served = shared.http.serve_connection_with_upgrades(io, svc);
    tokio::pin!(served);
    let idle = shared.limits.idle_timeout;
    let idle_check = tokio::time::sleep(idle);
    tokio::pin!(idle_check);
    // hyper's HTTP/1 header timer only starts once the auto builder has seen a byte that
    // is not the HTTP/2 preface: a silent client, or one trickling "PRI * HTTP/2.0…",
    // would otherwise hold the connection until the idle timeout.
    let first_request = tokio::time::sleep(shared.limits.header_read_timeout);
    tokio::pin!(first_request);
    let mut awaiting_first = true;
    let mut closing = false;
    loop {
        tokio::select! {
            res = served.as_mut() => {
                if let Err(e) = res {
                    tracing::debug!(peer = %conn.info.peer, error = %e, "connection ended with an error");
                }
                return;
            }
            _ = stopped(&mut stop), if !closing => {
                closing = true;
                served.as_mut().graceful_shutdown();
            }
            // Grace period over: the connection is dropped, with whatever it still had.
            // Watched only once draining (the grace period follows the stop): a connection
            // polls every armed branch each time it wakes, and this one would cost every
            // request a second channel check for nothing.
            _ = stopped(&mut hard_closing), if closing => return,
            _ = &mut first_request, if awaiting_first && !closing => {
                awaiting_first = false;
                if !conn.started.load(Ordering::Relaxed) {
                    closing = true;
                    served.as_mut().graceful_shutdown();
                }
            }
            _ = &mut idle_check, if !closing => match conn.idle_for() {
                Some(d) if d >= idle => {
                    closing = true;
                    served.as_mut().graceful_shutdown();
                }
                Some(d) => idle_check.as_mut().reset(tokio::time::Instant::now() + (idle - d)),
                None => idle_check.as_mut().reset(tokio::time::Instant::now() + idle),
            },
        }
    }
}

/// Completes once shutdown has been requested.
async fn stopped(stop: &mut watch::Receiver<bool>) {
    // The guard `wait_for` returns is not `Send`: drop it here, not in the caller.
    let _ = stop.wait_for(|&s| s).await.map(|_| ());
}
