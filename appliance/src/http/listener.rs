//! The listener: the accept loop, each connection's TLS handshake (and client certificate),
//! HTTP/1.1 and HTTP/2 on it, the connection budget, and the graceful shutdown.
//!
//! Bounds, each before the work it protects:
//! - **connections**: at most `server.max_connections` open, and `server.max_connections_per_peer`
//!   from one address ([`Budget`]); one over is closed at once after `accept`, before any TLS;
//! - **first request**: from `accept` until the first request's headers are complete, TLS
//!   handshake (and the HTTP/2 preface) included, `server.tls_handshake_timeout_ms`; a
//!   connection that sends nothing, or half a preface, is closed when it passes;
//! - **idle**: a connection with no request in flight for `server.idle_timeout_ms` is closed
//!   (gracefully: HTTP/2 clients get a GOAWAY), however many PINGs it answers;
//! - **streams**: `server.http2_max_streams` concurrent requests per HTTP/2 connection, and
//!   bounded header sizes.
//!
//! Refusals are counted in `vla_http_connections_refused_total{reason}` and
//! `vla_http_connections_closed_total{reason}`, and logged at most once a second.

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt;

use crate::clock::Throttle;
use crate::config::ServerConfig;
use crate::metrics::Metrics;
use crate::tls::PeerIdentity;

/// The peer address of the connection a request came on (in its extensions).
#[derive(Debug, Clone, Copy)]
pub struct PeerAddr(pub SocketAddr);

/// The listener's bounds (see the module header), from `[server]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListenerLimits {
    pub first_request: Duration,
    pub idle: Duration,
    pub grace: Duration,
    pub max_connections: usize,
    pub max_per_peer: usize,
    pub http2_max_streams: u32,
    pub max_header_bytes: usize,
}

impl ListenerLimits {
    pub fn from_config(s: &ServerConfig) -> ListenerLimits {
        ListenerLimits {
            first_request: Duration::from_millis(s.tls_handshake_timeout_ms),
            idle: Duration::from_millis(s.idle_timeout_ms),
            grace: Duration::from_millis(s.shutdown_grace_ms),
            max_connections: s.max_connections,
            max_per_peer: s.max_connections_per_peer,
            http2_max_streams: s.http2_max_streams,
            max_header_bytes: s.max_header_bytes,
        }
    }
}

/// Open connections, in all and per peer address. Pure bookkeeping: [`Budget::open`] either
/// hands out a [`Slot`], which gives its place back when dropped, or says why not.
///
/// Invariants: `total` equals the number of live slots and equals the sum of `per_peer`; a
/// peer with no live slot has no entry (the map is bounded by the open connections).
#[derive(Debug)]
pub struct Budget {
    max: usize,
    max_per_peer: usize,
    inner: Mutex<BudgetState>,
}

#[derive(Debug, Default)]
struct BudgetState {
    total: usize,
    per_peer: HashMap<IpAddr, usize>,
}

/// Why a connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// `server.max_connections` are open.
    Full,
    /// `server.max_connections_per_peer` are open from this address.
    PeerFull,
}

impl Refused {
    pub fn as_str(self) -> &'static str {
        match self {
            Refused::Full => "max_connections",
            Refused::PeerFull => "max_connections_per_peer",
        }
    }
}

/// A place in the [`Budget`], given back on drop.
#[derive(Debug)]
pub struct Slot {
    budget: Arc<Budget>,
    peer: IpAddr,
}

impl Budget {
    pub fn new(max: usize, max_per_peer: usize) -> Arc<Budget> {
        Arc::new(Budget { max, max_per_peer, inner: Mutex::new(BudgetState::default()) })
    }

    pub fn open(self: &Arc<Self>, peer: IpAddr) -> Result<Slot, Refused> {
        let mut s = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        if s.total >= self.max {
            return Err(Refused::Full);
        }
        let mine = s.per_peer.entry(peer).or_insert(0);
        if *mine >= self.max_per_peer {
            return Err(Refused::PeerFull);
        }
        *mine += 1;
        s.total += 1;
        Ok(Slot { budget: self.clone(), peer })
    }

    /// Open connections now.
    pub fn open_now(&self) -> usize {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner).total
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut s = self.budget.inner.lock().unwrap_or_else(PoisonError::into_inner);
        s.total -= 1;
        if let Some(n) = s.per_peer.get_mut(&self.peer) {
            *n -= 1;
            if *n == 0 {
                s.per_peer.remove(&self.peer);
            }
        }
    }
}

/// What a connection's requests tell its driver: whether one has arrived, how many are in
/// flight, and when the last one ended (ms since the connection was accepted).
#[derive(Debug, Default)]
struct Activity {
    seen: AtomicBool,
    in_flight: AtomicUsize,
    last_ms: AtomicU64,
}

/// One request in flight on a connection; marks the connection active until dropped.
struct InFlight {
    activity: Arc<Activity>,
    accepted: Instant,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.activity.last_ms.store(self.accepted.elapsed().as_millis() as u64, Ordering::Relaxed);
        self.activity.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Activity {
    fn begin(self: &Arc<Self>, accepted: Instant) -> InFlight {
        self.seen.store(true, Ordering::Relaxed);
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight { activity: self.clone(), accepted }
    }

    /// When the connection is due to close if nothing changes, or `None` while a request is in
    /// flight.
    fn due(&self, accepted: Instant, limits: &ListenerLimits) -> Option<Instant> {
        if !self.seen.load(Ordering::Relaxed) {
            return Some(accepted + limits.first_request);
        }
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return None;
        }
        Some(accepted + Duration::from_millis(self.last_ms.load(Ordering::Relaxed)) + limits.idle)
    }
}

/// Refusals come in floods exactly when an operator needs the log readable.
static REFUSED_LOG: Throttle = Throttle::new();

/// Serves one connection until it ends, is idle or too slow, or the server shuts down.
#[allow(clippy::too_many_arguments)]
async fn serve_connection<I>(
    builder: &auto::Builder<TokioExecutor>,
    io: I,
    router: Router,
    identity: Option<PeerIdentity>,
    mut shutdown: watch::Receiver<bool>,
    peer: SocketAddr,
    accepted: Instant,
    limits: ListenerLimits,
    metrics: &Metrics,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let activity = Arc::new(Activity::default());
    let tracked = activity.clone();
    // Each request marks the connection active while it runs and carries the connection's
    // verified client certificate.
    let service = hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
        let in_flight = tracked.begin(accepted);
        if let Some(identity) = &identity {
            request.extensions_mut().insert(identity.clone());
        }
        request.extensions_mut().insert(PeerAddr(peer));
        let router = router.clone();
        async move {
            let response = router.oneshot(request.map(Body::new)).await;
            drop(in_flight);
            response
        }
    });
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
    tokio::pin!(conn);
    let mut closing: Option<Instant> = None;
    loop {
        let due = match closing {
            // A graceful close that the client does not finish is cut after a second.
            Some(at) => Some(at + Duration::from_secs(1)),
            None => activity.due(accepted, &limits),
        };
        // Nothing due while a request runs: look again in a second.
        let wake = due.unwrap_or_else(|| Instant::now() + Duration::from_secs(1));
        tokio::select! {
            ended = conn.as_mut() => {
                if let Err(e) = ended {
                    tracing::debug!(%peer, "connection ended: {e}");
                }
                return;
            }
            changed = shutdown.changed(), if closing.is_none() => {
                if changed.is_err() || *shutdown.borrow() {
                    conn.as_mut().graceful_shutdown();
                    // Shutdown has its own grace period (see `serve`).
                    closing = Some(Instant::now() + limits.grace);
                }
            }
            () = tokio::time::sleep_until(wake.into()) => {
                let now = Instant::now();
                match (closing, activity.due(accepted, &limits)) {
                    (Some(at), _) if now >= at + Duration::from_secs(1) => return,
                    (None, Some(due)) if now >= due => {
                        let reason = if activity.seen.load(Ordering::Relaxed) { "idle" } else { "first_request_timeout" };
                        metrics.connections_closed.with_label_values(&[reason]).inc();
                        tracing::debug!(%peer, reason, "closing the connection");
                        if reason == "first_request_timeout" {
                            return;
                        }
                        conn.as_mut().graceful_shutdown();
                        closing = Some(now);
                    }
                    _ => {}
                }
            }
        }
    }
}

/// Accepts connections until `shutdown` resolves, then stops accepting and gives in-flight
/// requests up to `limits.grace` to finish before the remaining connections are closed.
///
/// Each connection runs in its own task, within the bounds of the module header. Each new
/// connection uses the latest TLS configuration published on `tls` (certificates reload
/// without a restart).
pub async fn serve(
    listener: TcpListener,
    tls: Option<watch::Receiver<Arc<rustls::ServerConfig>>>,
    router: Router,
    shutdown: impl Future<Output = ()>,
    limits: ListenerLimits,
    metrics: Arc<Metrics>,
) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // HTTP/1.1: every request's headers within the first-request bound, and bounded in size.
    builder
        .http1()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(limits.first_request)
        .max_buf_size(limits.max_header_bytes.max(8192));
    builder
        .http2()
        .timer(hyper_util::rt::TokioTimer::new())
        .max_concurrent_streams(limits.http2_max_streams)
        .max_header_list_size(limits.max_header_bytes as u32)
        // A stream reset as soon as it is opened still costs the server its headers.
        .max_pending_accept_reset_streams(limits.http2_max_streams as usize)
        .keep_alive_interval(Duration::from_secs(20))
        .keep_alive_timeout(Duration::from_secs(20));
    let budget = Budget::new(limits.max_connections, limits.max_per_peer);
    let (stop, stopping) = watch::channel(false);
    tokio::pin!(shutdown);
    // Every connection's task: those still open when the grace period ends are aborted, so
    // nothing of the appliance (its store above all) outlives `serve`.
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    if let Some(skipped) = REFUSED_LOG.admit(crate::clock::now_ms()) {
                        tracing::warn!(skipped, "accept failed: {e}");
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let accepted = Instant::now();
        // Reap finished connection tasks so the set stays the size of the open connections.
        while connections.try_join_next().is_some() {}
        let slot = match budget.open(peer.ip()) {
            Ok(slot) => slot,
            Err(refused) => {
                metrics.connections_refused.with_label_values(&[refused.as_str()]).inc();
                if let Some(skipped) = REFUSED_LOG.admit(crate::clock::now_ms()) {
                    tracing::warn!(%peer, skipped, open = budget.open_now(), "connection refused: {} reached", refused.as_str());
                }
                drop(stream);
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let router = router.clone();
        let builder = builder.clone();
        let stopping = stopping.clone();
        let acceptor = tls.as_ref().map(|rx| TlsAcceptor::from(rx.borrow().clone()));
        let metrics = metrics.clone();
        connections.spawn(async move {
            let _slot = slot;
            // Open connections, counted down however the task ends.
            metrics.connections_active.inc();
            let _open = OnDrop(|| metrics.connections_active.dec());
            match acceptor {
                Some(acceptor) => {
                    // The handshake is part of the first request's bound.
                    let deadline = accepted + limits.first_request;
                    match tokio::time::timeout_at(deadline.into(), acceptor.accept(stream)).await {
                        Ok(Ok(stream)) => {
                            let identity = crate::tls::peer_identity(stream.get_ref().1.peer_certificates());
                            serve_connection(
                                &builder, stream, router, identity, stopping, peer, accepted, limits, &metrics,
                            )
                            .await
                        }
                        Ok(Err(e)) => {
                            metrics.tls_handshake_failures.inc();
                            tracing::debug!(%peer, "TLS handshake failed: {e}")
                        }
                        Err(_) => {
                            metrics.tls_handshake_failures.inc();
                            metrics.connections_closed.with_label_values(&["first_request_timeout"]).inc();
                            tracing::debug!(%peer, "TLS handshake timed out")
                        }
                    }
                }
                None => {
                    serve_connection(&builder, stream, router, None, stopping, peer, accepted, limits, &metrics).await
                }
            }
        });
    }
    drop(listener);
    tracing::info!("shutting down: no new connections; waiting for in-flight requests");
    let _ = stop.send(true);
    let drained = tokio::time::timeout(limits.grace, async { while connections.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        tracing::warn!("shutdown grace period of {:?} passed; closing remaining connections", limits.grace);
    }
    connections.shutdown().await;
}

/// Runs a closure when dropped.
struct OnDrop<F: FnMut()>(F);

impl<F: FnMut()> Drop for OnDrop<F> {
    fn drop(&mut self) {
        (self.0)();
    }
}

/// Serves `router` over plain HTTP on `listener` (`metrics.listen_http`, loopback only) until
/// the task is aborted.
pub async fn serve_plain(listener: TcpListener, router: Router) {
    if let Err(e) = axum::serve(listener, router).await {
        tracing::error!("plain-HTTP metrics listener stopped: {e}");
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_budget_bounds_connections_in_all_and_per_peer_and_gives_places_back() {
        let budget = Budget::new(3, 2);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let a1 = budget.open(a).unwrap();
        let _a2 = budget.open(a).unwrap();
        assert_eq!(budget.open(a).unwrap_err(), Refused::PeerFull);
        let b1 = budget.open(b).unwrap();
        assert_eq!(budget.open(b).unwrap_err(), Refused::Full);
        drop(a1);
        assert_eq!(budget.open_now(), 2);
        let _a3 = budget.open(a).unwrap();
        drop(b1);
        assert!(!budget.inner.lock().unwrap().per_peer.contains_key(&b), "a peer without connections has no entry");
    }

    #[test]
    fn a_connection_is_due_after_the_first_request_bound_then_after_idling() {
        let limits = ListenerLimits {
            first_request: Duration::from_secs(10),
            idle: Duration::from_secs(30),
            grace: Duration::from_secs(1),
            max_connections: 1,
            max_per_peer: 1,
            http2_max_streams: 1,
            max_header_bytes: 8192,
        };
        let accepted = Instant::now();
        let activity = Arc::new(Activity::default());
        assert_eq!(activity.due(accepted, &limits), Some(accepted + limits.first_request));
        let request = activity.begin(accepted);
        assert_eq!(activity.due(accepted, &limits), None, "nothing is due while a request runs");
        drop(request);
        let due = activity.due(accepted, &limits).unwrap();
        assert!(due >= accepted + limits.idle && due < accepted + limits.idle + Duration::from_secs(1));
    }
}
