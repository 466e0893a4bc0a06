//! The edge inference appliance: serves TorchScript vision-language-action models to the
//! robots of one cell over HTTPS, batching their requests.
//!
//! A request to the robot endpoint passes these stages, each in its own module:
//!
//! | stage | module | what happens |
//! |---|---|---|
//! | listen | [`server`], [`tls`] | TLS (and client certificates), HTTP/1.1 and HTTP/2, routing, graceful shutdown |
//! | auth | [`auth`] | every path closed unless public: robot key, client certificate or admin token |
//! | validate | [`validate`], [`oip`] | JSON body (or OIP tensors) → checked request; errors name the field |
//! | admission | [`policy`], [`quota`] | operator-uploaded WebAssembly policies decide whether the request may be computed, charging the robot's durable rate limits and quotas |
//! | preprocess | [`preprocess`] | base64 JPEG/PNG → normalised tensor, instruction → tokens (blocking pool) |
//! | queue | [`queue`] | per-model bounded priority queue and the batching rule (pure state) |
//! | batch | [`batcher`] | executor threads take batches, run them, answer each request |
//! | model | [`model`] | TorchScript module on CPU or CUDA: stack, forward, split ([`cuda_memory`]: the memory a batch needed on CUDA) |
//! | safety | [`policy`] | the policies allow, clamp (modify) or deny the proposed action; decisions audited |
//!
//! Around them: [`metrics`] (the `vla_*` catalogue), [`gpu`] (NVML telemetry), [`monitoring`]
//! (`/metrics` and the stats endpoints), [`config`] (the one configuration tree), [`spec`] (`model.toml`),
//! [`repository`] (loading and reloading the models), [`admin`] (robot registry and model
//! repository endpoints), [`store`] (sled: the robot registry, policies, audit log and
//! quota state at rest), [`demo`] (the generated `tiny-vla` model) and [`error`] (the HTTP boundary's error
//! type: status and stable code per variant).
//!
//! The library reads no environment: the binary loads [`Config`], binds the listener and
//! calls [`run`].

pub mod admin;
pub mod auth;
pub mod batcher;
pub mod config;
pub mod cuda_memory;
pub mod demo;
pub mod error;
pub mod gpu;
pub mod metrics;
pub mod model;
pub mod monitoring;
pub mod oip;
pub mod policy;
pub mod preprocess;
pub mod queue;
pub mod quota;
pub mod repository;
pub mod server;
pub mod spec;
pub mod store;
pub mod tls;
pub mod validate;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;

pub use config::Config;

/// Why the appliance could not run.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error(transparent)]
    Repository(#[from] repository::RepositoryError),
    #[error(transparent)]
    Auth(#[from] auth::AuthError),
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error(transparent)]
    Quota(#[from] quota::QuotaError),
    #[error("policies: {0}")]
    Policy(String),
    #[error("{0}")]
    Task(String),
}

/// Runs the appliance on `listener` until `shutdown` resolves: sets up TLS, loads and warms up
/// the models, serves, and at shutdown lets in-flight requests and batches finish.
pub async fn run(config: Config, listener: TcpListener, shutdown: impl Future<Output = ()>) -> Result<(), RunError> {
    let config = Arc::new(config);
    let tls = if config.tls.enabled {
        let (tls, cert) = tls::server_config(&config)?;
        tracing::info!(
            certificate = %cert.cert_path.display(),
            sha256 = %cert.sha256_fingerprint,
            "{}",
            if cert.generated { "generated a self-signed TLS certificate" } else { "using TLS certificate" }
        );
        if let Some(ca) = &config.tls.client_ca {
            tracing::info!(client_ca = %ca.display(), client_auth = ?config.tls.client_auth, "verifying client certificates");
        }
        let (tx, rx) = tokio::sync::watch::channel(tls);
        tokio::spawn(tls::watch(config.clone(), tx));
        Some(rx)
    } else {
        tracing::warn!("TLS is disabled: requests and actions travel in clear text");
        None
    };

    let store = {
        let dir = config.data.dir.clone();
        tokio::task::spawn_blocking(move || store::Store::open(&dir))
            .await
            .map_err(|e| RunError::Task(format!("store task failed: {e}")))??
    };
    let store = Arc::new(store);
    let metrics = Arc::new(metrics::Metrics::new());
    // Before the models: a quota store that cannot be trusted stops the start at once.
    let quotas = Arc::new(quota::Quotas::open(store.db(), &config.quota)?);
    quotas.observe_flushes(metrics.store_flush_duration.clone());
    tracing::info!(durability = %quotas.durability(), "quota store");
    let token_file = config.admin_token_file();
    let (admin_hash, generated) = auth::admin_token(&token_file)?;
    if generated {
        tracing::info!(file = %token_file.display(), "generated the admin token (mode 0600); send it as `Authorization: Bearer <token>` to /admin/");
    } else {
        tracing::info!(file = %token_file.display(), "admin token");
    }
    if config.auth.demo_robot
        && let Some(key_file) = admin::register_demo_robot(&store, &config.data.dir)?
    {
        tracing::info!(
            robot_id = admin::DEMO_ROBOT,
            key_file = %key_file.display(),
            "registered the demo robot; send its key as `X-API-Key: $(cat {})`",
            key_file.display()
        );
    }
    let metrics_hash = if config.metrics.public {
        None
    } else {
        let file = config.metrics_token_file();
        let (hash, generated) = auth::admin_token(&file)?;
        if generated {
            tracing::info!(file = %file.display(), "generated the metrics token (mode 0600) for /metrics");
        }
        Some(hash)
    };
    let auth = Arc::new(auth::Authenticator::new(&config, store.clone(), admin_hash, metrics_hash));
    let gpu = gpu::GpuMonitor::start(metrics.clone(), Duration::from_millis(config.metrics.gpu_poll_interval_ms));

    let models = {
        let (config, metrics) = (config.clone(), metrics.clone());
        tokio::task::spawn_blocking(move || repository::Models::load(&config, metrics))
            .await
            .map_err(|e| RunError::Task(format!("model loading task failed: {e}")))??
    };
    let models = Arc::new(models);
    if !models.is_serving() {
        tracing::error!("no model is serving; /health answers 503");
    }

    // After the models: dry runs are shown a request shaped like the default model's.
    let policies = {
        let config = config.clone();
        let models = models.clone();
        let metrics = metrics.clone();
        tokio::task::spawn_blocking(move || {
            let default = models.default_model().and_then(|name| models.resolve(Some(name)).ok());
            let default = default.as_ref().map(|m| &*m.spec);
            policy::Policies::open(&config.policy, &config.data.dir, &store, quotas, metrics, default)
        })
        .await
        .map_err(|e| RunError::Task(format!("policy loading task failed: {e}")))?
        .map_err(RunError::Policy)?
    };
    let policies = Arc::new(policies);
    let quotas = policies.quotas().clone();

    let shutting_down = Arc::new(AtomicBool::new(false));
    let state = server::AppState {
        config: config.clone(),
        models: models.clone(),
        shutting_down: shutting_down.clone(),
        preprocess_slots: Arc::new(Semaphore::new(std::thread::available_parallelism().map_or(2, |n| n.get()) * 2)),
        auth,
        policies,
        quotas,
        metrics,
        gpu,
        started: std::time::Instant::now(),
    };
    let scheme = if tls.is_some() { "https" } else { "http" };
    match listener.local_addr() {
        Ok(addr) => tracing::info!("serving on {scheme}://{addr}"),
        Err(e) => tracing::warn!("serving (local address unknown: {e})"),
    }
    let shutdown = async move {
        shutdown.await;
        shutting_down.store(true, Ordering::Relaxed);
    };
    let metrics = state.metrics.clone();
    let plain_metrics = match config.metrics.listen_http {
        Some(addr) => {
            let plain = TcpListener::bind(addr)
                .await
                .map_err(|e| RunError::Task(format!("binding metrics.listen_http = {addr}: {e}")))?;
            tracing::info!("serving /metrics on http://{addr} (loopback, no token)");
            Some(tokio::spawn(monitoring::serve_plain(plain, state.clone())))
        }
        None => None,
    };
    server::serve(
        listener,
        tls,
        server::router(state),
        shutdown,
        Duration::from_millis(config.server.tls_handshake_timeout_ms),
        Duration::from_millis(config.server.shutdown_grace_ms),
        metrics,
    )
    .await;
    if let Some(task) = plain_metrics {
        task.abort();
    }

    // Connections are done; let executors finish whatever is still queued, then stop them.
    tokio::task::spawn_blocking(move || models.shutdown())
        .await
        .map_err(|e| RunError::Task(format!("model shutdown task failed: {e}")))?;
    // Nothing of the appliance outlives `run`: the store too is closed when it returns.
    let dir = config.data.dir.clone();
    let closed = tokio::task::spawn_blocking(move || store::Store::wait_closed(&dir, Duration::from_secs(10))).await;
    if !matches!(closed, Ok(true)) {
        tracing::warn!("the store was still open 10 s after the server stopped");
    }
    tracing::info!("stopped");
    Ok(())
}
