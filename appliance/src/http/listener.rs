//! The listener: the accept loop, each connection's TLS handshake (and client certificate),
//! HTTP/1.1 and HTTP/2 on it, and the graceful shutdown.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt;

use crate::metrics::Metrics;
use crate::tls::PeerIdentity;

/// Runs a closure when dropped.
struct OnDrop<F: FnMut()>(F);

impl<F: FnMut()> Drop for OnDrop<F> {
    fn drop(&mut self) {
        (self.0)();
    }
}

async fn serve_connection<I>(
    builder: &auto::Builder<TokioExecutor>,
    io: I,
    router: Router,
    identity: Option<PeerIdentity>,
    watcher: hyper_util::server::graceful::Watcher,
    peer: std::net::SocketAddr,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    // The connection's verified client certificate goes with each of its requests.
    let service = TowerToHyperService::new(router.map_request(move |mut request: axum::http::Request<_>| {
        if let Some(identity) = &identity {
            request.extensions_mut().insert(identity.clone());
        }
        request
    }));
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
    if let Err(e) = watcher.watch(conn.into_owned()).await {
        tracing::debug!(%peer, "connection ended: {e}");
    }
}

/// Accepts connections until `shutdown` resolves, then stops accepting and gives in-flight
/// requests up to `grace` to finish before the remaining connections are closed.
///
/// Each connection runs in its own task; the TLS handshake is bounded by `handshake_timeout`
/// so a silent client cannot hold a task forever. Each new connection uses the latest TLS
/// configuration published on `tls` (certificates reload without a restart).
pub async fn serve(
    listener: TcpListener,
    tls: Option<watch::Receiver<Arc<rustls::ServerConfig>>>,
    router: Router,
    shutdown: impl Future<Output = ()>,
    handshake_timeout: Duration,
    grace: Duration,
    metrics: Arc<Metrics>,
) {
    let graceful = GracefulShutdown::new();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // A client that opens a connection and sends its request headers too slowly is dropped.
    builder.http1().timer(hyper_util::rt::TokioTimer::new()).header_read_timeout(handshake_timeout);
    builder
        .http2()
        .timer(hyper_util::rt::TokioTimer::new())
        .keep_alive_interval(Duration::from_secs(20))
        .keep_alive_timeout(Duration::from_secs(20));
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
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let router = router.clone();
        let builder = builder.clone();
        let watcher = graceful.watcher();
        let acceptor = tls.as_ref().map(|rx| TlsAcceptor::from(rx.borrow().clone()));
        let metrics = metrics.clone();
        // Reap finished connection tasks so the set stays the size of the open connections.
        while connections.try_join_next().is_some() {}
        connections.spawn(async move {
            // Open connections, counted down however the task ends.
            metrics.connections_active.inc();
            let _open = OnDrop(|| metrics.connections_active.dec());
            match acceptor {
                Some(acceptor) => match tokio::time::timeout(handshake_timeout, acceptor.accept(stream)).await {
                    Ok(Ok(stream)) => {
                        let identity = crate::tls::peer_identity(stream.get_ref().1.peer_certificates());
                        serve_connection(&builder, stream, router, identity, watcher, peer).await
                    }
                    Ok(Err(e)) => {
                        metrics.tls_handshake_failures.inc();
                        tracing::debug!(%peer, "TLS handshake failed: {e}")
                    }
                    Err(_) => {
                        metrics.tls_handshake_failures.inc();
                        tracing::debug!(%peer, "TLS handshake timed out")
                    }
                },
                None => serve_connection(&builder, stream, router, None, watcher, peer).await,
            }
        });
    }
    drop(listener);
    tracing::info!("shutting down: no new connections; waiting for in-flight requests");
    if tokio::time::timeout(grace, graceful.shutdown()).await.is_err() {
        tracing::warn!("shutdown grace period of {grace:?} passed; closing remaining connections");
    }
    connections.shutdown().await;
}

/// Serves `router` over plain HTTP on `listener` (`metrics.listen_http`, loopback only) until
/// the task is aborted.
pub async fn serve_plain(listener: TcpListener, router: Router) {
    if let Err(e) = axum::serve(listener, router).await {
        tracing::error!("plain-HTTP metrics listener stopped: {e}");
    }
}
