//! The edge inference appliance: serves vision-language-action models to the robots of one
//! cell over HTTPS (camera frames, an instruction, the joint state → an action chunk), batching
//! their requests, with operator policies on what may be asked and what may leave the box.
//!
//! A request passes these stages, each in its own file (dependencies point down the table:
//! the edge uses the pipeline, the pipeline the stages, the stages the domain, and everything
//! the leaves; nothing imports back up):
//!
//! | layer | module | what happens |
//! |---|---|---|
//! | edge | [`http`] | listener (TLS, client certificates, HTTP/1.1 and HTTP/2, shutdown), routes, auth, bodies, one file per resource: `/v1`, OIP over REST and gRPC, openpi's WebSocket (streaming sessions), admin, policies, quotas, monitoring |
//! | pipeline | [`infer`] | the stages every inference request passes, in order: admission → bounded decode → batcher → keep charges → output check, safety and the action envelope |
//! | stage | [`validate`] | the robot endpoint's JSON → a checked request; errors name the field |
//! | stage | [`preprocess`] | each camera's frame (base64 JPEG/PNG or raw RGB) → the camera's tensor, the state normalised (blocking pool) |
//! | stage | [`text`] | instruction → token ids and mask: a Hugging Face `tokenizer.json`, or UTF-8 bytes |
//! | stage | [`repository`] | the model repository: loading, reloading, resolving a request's model |
//! | stage | [`queue`] | per-model bounded priority queue and the batching rule (pure state) |
//! | stage | [`batcher`] | executor threads take batches, run them, answer each request ([`threads`]: their libtorch threads, measured at warm-up) |
//! | stage | [`model`] | TorchScript module or AOTInductor package ([`aoti`]) on CPU or CUDA: stack, forward, split ([`cuda_memory`]: the memory a batch needed) |
//! | domain | [`policy`] | operator-uploaded WebAssembly policies: admission (with [`quota`]) and safety; the audit log |
//! | domain | [`quota`] | durable rate limits and quotas in sled, charged by admission policies |
//! | domain | [`robots`] | the robot registry: keys issued, checked, rotated, revoked; token files |
//! | domain | [`store`] | sled: the robot registry, policies, audit log and quota state at rest |
//! | domain | [`changes`] | the admin change trail: who changed which policy, robot, quota or model, before and after |
//! | domain | [`tls`], [`gpu`], [`metrics`], [`spec`], [`demo`] | certificates, NVML telemetry, the `vla_*` catalogue, `model.toml`, the generated demo model |
//! | domain | [`probe`] | `appliance health`: `GET /health` of the local appliance, trusting exactly its certificate |
//! | domain | [`fair`] | fair shares among robots: CPU slots, requests in flight |
//! | domain | [`envelope`] | the action envelope the host holds every final action to, and each robot's previous action |
//! | root | [`config`] | the one configuration tree (its policy and quota sections live with them) |
//! | root | [`error`] | the HTTP boundary's error type: status, stable code and metric categories per variant, and every conversion from a domain error |
//! | leaf | [`clock`], [`names`], [`noise`] | time in ms and a log throttle; the name rules; seeded normal noise |
//!
//! The library reads no environment: the binary loads [`Config`], binds the listener and
//! calls [`run`].

pub mod aoti;
pub mod batcher;
pub mod changes;
pub mod clock;
pub mod config;
pub mod cuda_memory;
pub mod demo;
pub mod envelope;
pub mod error;
pub mod fair;
pub mod gpu;
pub mod http;
pub mod infer;
pub mod metrics;
pub mod model;
pub mod names;
pub mod noise;
pub mod policy;
pub mod preprocess;
pub mod probe;
pub mod queue;
pub mod quota;
pub mod repository;
pub mod robots;
pub mod spec;
pub mod store;
pub mod text;
pub mod threads;
pub mod tls;
pub mod validate;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::net::TcpListener;

pub use config::Config;

/// Why the appliance could not run.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error(transparent)]
    Repository(#[from] repository::RepositoryError),
    #[error(transparent)]
    Registry(#[from] robots::RegistryError),
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error(transparent)]
    Quota(#[from] quota::QuotaError),
    #[error("policies: {0}")]
    Policy(String),
    #[error("{0}")]
    Task(String),
}

/// What the appliance tells its service manager as it goes (the binary forwards it to
/// systemd's notify socket: `READY=1`, `WATCHDOG=1`, `STOPPING=1`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lifecycle {
    /// Models loaded and warmed up, the listener accepting: `status` says what serves.
    Serving { status: String },
    /// The serving loop is alive: sent every `watchdog` period while serving.
    Alive,
    /// Shutdown began: in-flight requests and batches are being finished.
    Stopping,
}

/// How [`run_with`] reports its [`Lifecycle`].
pub struct Notify {
    pub notify: Box<dyn Fn(Lifecycle) + Send + Sync>,
    /// How often [`Lifecycle::Alive`] is sent while serving; none when `None`.
    pub watchdog: Option<Duration>,
}

impl std::fmt::Debug for Notify {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Notify").field("watchdog", &self.watchdog).finish_non_exhaustive()
    }
}

/// Runs the appliance on `listener` until `shutdown` resolves: sets up TLS, loads and warms up
/// the models, serves, and at shutdown lets in-flight requests and batches finish.
pub async fn run(config: Config, listener: TcpListener, shutdown: impl Future<Output = ()>) -> Result<(), RunError> {
    run_with(config, listener, shutdown, Notify { notify: Box::new(|_| {}), watchdog: None }).await
}

/// [`run`], telling `notify` when it serves, that it is alive, and when it stops.
pub async fn run_with(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
    notify: Notify,
) -> Result<(), RunError> {
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
    store::watch(&store, Duration::from_secs(1)).map_err(|e| RunError::Task(format!("store watch thread: {e}")))?;
    let quotas = Arc::new(quota::Quotas::open(store.clone(), &config.quota)?);
    quotas.observe_flushes(metrics.store_flush_duration.clone());
    tracing::info!(durability = %quotas.durability(), "quota store");
    let token_file = config.admin_token_file();
    let (admin_hash, generated) = robots::token_file(&token_file, 0o600)?;
    if generated {
        tracing::info!(file = %token_file.display(), "generated the admin token (mode 0600); send it as `Authorization: Bearer <token>` to /admin/");
    } else {
        tracing::info!(file = %token_file.display(), "admin token");
    }
    if let Some(path) = config.robots_file() {
        let declared = robots::read_robots_file(&path)?;
        let done = robots::declare(&store, &declared)?;
        tracing::info!(
            file = %path.display(),
            added = done.added,
            updated = done.updated,
            unchanged = done.unchanged,
            revoked = done.revoked,
            refused = done.refused,
            "robots file applied"
        );
    } else {
        let released = robots::undeclare_all(&store)?;
        if released > 0 {
            tracing::info!(robots = released, "no robots file configured: its robots are managed by the admin API now");
        }
    }
    if config.auth.demo_robot
        && let Some(key_file) = robots::register_demo_robot(&store, &config.data.dir)?
    {
        tracing::info!(
            robot_id = robots::DEMO_ROBOT,
            key_file = %key_file.display(),
            "registered the demo robot; send its key as `X-API-Key: $(cat {})`",
            key_file.display()
        );
    }
    let metrics_hash = if config.metrics.public {
        None
    } else {
        let file = config.metrics_token_file();
        let (hash, generated) = robots::token_file(&file, 0o640)?;
        if generated {
            tracing::info!(
                file = %file.display(),
                "generated the metrics token (mode 0640: the cell's Prometheus reads it as a member of this user's group) for /metrics"
            );
        }
        Some(hash)
    };
    let auth = Arc::new(http::auth::Authenticator::new(&config, store.clone(), admin_hash, metrics_hash));
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
        let store = store.clone();
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

    let changes = Arc::new(
        changes::Changes::open(store.clone(), config.auth.changes_retention)
            .map_err(|e| RunError::Policy(e.to_string()))?,
    );

    let shutting_down = Arc::new(AtomicBool::new(false));
    let pipeline = Arc::new(infer::Pipeline::new(
        models.clone(),
        policies.clone(),
        metrics.clone(),
        config.limits.clone(),
        shutting_down.clone(),
    ));
    let state = http::AppState {
        config: config.clone(),
        models: models.clone(),
        pipeline,
        shutting_down: shutting_down.clone(),
        auth,
        store,
        policies,
        changes,
        quotas,
        metrics,
        gpu,
        openpi: http::sessions::Sessions::new(
            config.server.websocket_max_sessions,
            config.server.websocket_sessions_per_robot,
        ),
        streams: http::sessions::Sessions::new(
            config.server.websocket_max_sessions,
            config.server.websocket_sessions_per_robot,
        ),
        started: std::time::Instant::now(),
    };
    let scheme = if tls.is_some() { "https" } else { "http" };
    let serving = match listener.local_addr() {
        Ok(addr) => format!("serving on {scheme}://{addr}"),
        Err(e) => format!("serving (local address unknown: {e})"),
    };
    tracing::info!("{serving}");
    let Notify { notify, watchdog } = notify;
    let notify: Arc<dyn Fn(Lifecycle) + Send + Sync> = Arc::from(notify);
    let (stopping, stopped) = (notify.clone(), shutting_down.clone());
    let shutdown = async move {
        shutdown.await;
        shutting_down.store(true, Ordering::Relaxed);
        stopping(Lifecycle::Stopping);
    };
    let metrics = state.metrics.clone();
    let plain_metrics = match config.metrics.listen_http {
        Some(addr) => {
            let plain = TcpListener::bind(addr)
                .await
                .map_err(|e| RunError::Task(format!("binding metrics.listen_http = {addr}: {e}")))?;
            tracing::info!("serving /metrics on http://{addr} (loopback, no token)");
            Some(tokio::spawn(http::serve_plain(plain, http::plain_metrics_router(state.clone()))))
        }
        None => None,
    };
    // Ready once everything that can fail the start has: the service manager is told then.
    let models_serving = models.serving().len();
    notify(Lifecycle::Serving { status: format!("{serving}, {models_serving} model(s)") });
    // The watchdog's ping runs on the runtime that serves: a runtime whose workers are all
    // stuck sends none, and the service manager restarts the appliance.
    let alive = watchdog.map(|every| {
        let (notify, stopping) = (notify.clone(), stopped.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                if stopping.load(Ordering::Relaxed) {
                    break;
                }
                notify(Lifecycle::Alive);
            }
        })
    });
    http::serve(
        listener,
        tls,
        http::router(state),
        shutdown,
        http::ListenerLimits::from_config(&config.server),
        metrics,
    )
    .await;
    if let Some(task) = plain_metrics {
        task.abort();
    }
    if let Some(task) = alive {
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
