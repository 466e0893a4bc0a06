//! Server stage: the HTTPS listener, the routes, and the robot endpoint's handler, which walks
//! a request through auth → validate → admission policies → preprocess → batcher → safety
//! policies and shapes the answer. The OIP endpoints ([`crate::oip`]) and the admin APIs
//! ([`crate::admin`], [`crate::policy::api`]) share the listener.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, get, post};
use axum::{Extension, Router};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt;
use vla_api::{Health, InferenceResponse, ModelList, Priority, Timing};

use crate::auth::{Authenticator, Caller};
use crate::batcher::{Done, JobError};
use crate::config::Config;
use crate::error::ApiError;
use crate::model::TensorData;
use crate::policy::Policies;
use crate::repository::{Model, Models};
use crate::{admin, auth, oip, preprocess, tls, validate};

/// What every handler shares.
#[derive(Debug, Clone)]
pub struct AppState {
    pub config: Arc<Config>,
    pub models: Arc<Models>,
    /// Set when shutdown begins, so `/health` stops advertising the appliance.
    pub shutting_down: Arc<AtomicBool>,
    /// Bounds image decoding running at once on the blocking pool, so a burst of large images
    /// queues here instead of starving the machine of threads.
    pub preprocess_slots: Arc<Semaphore>,
    /// Decides who each request comes from; owns the robot registry.
    pub auth: Arc<Authenticator>,
    /// Admission and safety policies, and the audit log.
    pub policies: Arc<Policies>,
    /// Rate limits and quotas the admission policies charge (also `policies.quotas()`).
    pub quotas: Arc<crate::quota::Quotas>,
    /// The metric catalogue `/metrics` renders.
    pub metrics: Arc<crate::metrics::Metrics>,
    /// The latest GPU reading.
    pub gpu: Arc<crate::gpu::GpuMonitor>,
    pub started: Instant,
}

impl AppState {
    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Relaxed)
    }

    /// 503 at once when shutting down or when no model serves.
    pub fn check_accepting(&self) -> Result<(), ApiError> {
        if self.is_shutting_down() {
            return Err(ApiError::ShuttingDown);
        }
        if !self.models.is_serving() {
            return Err(ApiError::Unavailable);
        }
        Ok(())
    }
}

/// A route's path parameters. A segment that does not decode (`%FF`) gets the usual JSON
/// error instead of axum's plain-text rejection.
#[derive(Debug)]
pub struct Params(pub std::collections::HashMap<String, String>);

impl Params {
    /// The parameter `name`; empty when the route has none of that name.
    pub fn get(&self, name: &str) -> &str {
        self.0.get(name).map_or("", String::as_str)
    }
}

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for Params {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut axum::http::request::Parts, state: &S) -> Result<Self, ApiError> {
        axum::extract::Path::<std::collections::HashMap<String, String>>::from_request_parts(parts, state)
            .await
            .map(|p| Params(p.0))
            .map_err(|e| ApiError::InvalidField { field: "path".into(), problem: e.body_text() })
    }
}

/// Every route of the appliance. Who may call each is decided by [`auth::access_for`] from the
/// path alone, closed unless public; the tests walk this list to check it.
pub fn routes() -> Vec<(&'static str, MethodRouter<AppState>)> {
    let mut routes =
        vec![("/health", get(health)), ("/v1/models", get(list_models)), ("/v1/inference", post(inference))];
    routes.extend(oip::routes());
    routes.extend(admin::routes());
    routes.extend(crate::policy::api::routes());
    routes.extend(crate::quota::api::routes());
    routes.extend(crate::monitoring::routes());
    routes
}

pub fn router(state: AppState) -> Router {
    let auth = state.auth.clone();
    let metrics = state.metrics.clone();
    let mut router = Router::new();
    for (path, method_router) in routes() {
        router = router.route(path, method_router);
    }
    router
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
        // Outermost, so it runs before routing's 404/405 as well: nothing answers unauthenticated.
        .layer(axum::middleware::from_fn_with_state(auth, auth::guard))
        // Around the guard, so refused requests are counted too.
        .layer(axum::middleware::from_fn_with_state(metrics, record_http))
}

/// Runs a closure when dropped.
struct OnDrop<F: FnMut()>(F);

impl<F: FnMut()> Drop for OnDrop<F> {
    fn drop(&mut self) {
        (self.0)();
    }
}

/// Counts every request by method, route template (never the raw path) and status, and error
/// answers by code.
async fn record_http(
    State(metrics): State<Arc<crate::metrics::Metrics>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let started = Instant::now();
    let method = request.method().clone();
    let endpoint = request
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |p| p.as_str().to_string());
    let response = next.run(request).await;
    let code = response.extensions().get::<crate::error::ErrorCode>().map(|c| c.0);
    metrics.http(method.as_str(), &endpoint, response.status().as_u16(), started.elapsed(), code);
    response
}

async fn not_found(State(app): State<AppState>, uri: Uri, body: Body) -> ApiError {
    drain(body, app.config.server.body_limit_bytes, Duration::from_millis(app.config.server.read_timeout_ms)).await;
    ApiError::RouteNotFound(uri.path().chars().take(200).collect())
}

async fn method_not_allowed(State(app): State<AppState>, method: Method, body: Body) -> ApiError {
    drain(body, app.config.server.body_limit_bytes, Duration::from_millis(app.config.server.read_timeout_ms)).await;
    ApiError::MethodNotAllowed(method.to_string())
}

/// `GET /health`: 200 while at least one model serves, else 503; the body lists every model.
async fn health(State(app): State<AppState>) -> Response {
    let shutting_down = app.is_shutting_down();
    let (status, code) = if shutting_down {
        ("shutting_down", StatusCode::SERVICE_UNAVAILABLE)
    } else if !app.models.is_serving() {
        ("unavailable", StatusCode::SERVICE_UNAVAILABLE)
    } else if app.models.has_failures() {
        ("degraded", StatusCode::OK)
    } else {
        ("ok", StatusCode::OK)
    };
    (code, axum::Json(Health { status: status.into(), models: app.models.health() })).into_response()
}

/// `GET /v1/models`: the serving models, their action semantics and queue counters.
async fn list_models(State(app): State<AppState>) -> axum::Json<ModelList> {
    axum::Json(ModelList {
        default_model: app.models.default_model().map(str::to_string),
        models: app.models.serving().iter().map(|m| m.info()).collect(),
    })
}

/// `POST /v1/inference`: the robot endpoint. Counts the answer by model, robot type and status.
async fn inference(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let received = Instant::now();
    let mut model = None;
    let result = robot_inference(&app, &caller, headers, body, received, &mut model).await;
    count_request(&app, &caller, model.as_deref(), &result, received);
    result.unwrap_or_else(IntoResponse::into_response)
}

/// The `status` label of `vla_inference_requests_total`, as the cell's alert rules read it:
/// `success`; `rate_limited` (429); `rejected` (a policy denied: 422 `policy_rejected`);
/// `invalid` (any other client mistake, 4xx); `error` (the appliance failed: 5xx, or a policy
/// failed). The error's own code is in `vla_errors_total{code}`.
pub fn request_status(e: &ApiError) -> &'static str {
    match e.code() {
        "rate_limited" => "rate_limited",
        "policy_rejected" => "rejected",
        "policy_error" => "error",
        _ if e.status().is_client_error() => "invalid",
        _ => "error",
    }
}

/// `vla_inference_requests_total` and `vla_inference_duration_seconds` for one answered
/// inference request; `model` is `none` when the request named no serving model.
pub fn count_request(
    app: &AppState,
    caller: &Caller,
    model: Option<&Model>,
    result: &Result<Response, ApiError>,
    received: Instant,
) {
    let status = match result {
        Ok(_) => "success",
        Err(e) => request_status(e),
    };
    let robot_type = caller.robot().map_or("none", |r| r.robot_type.as_str());
    if let Ok(robot) = caller.robot() {
        app.metrics.robot_request(&robot.robot_id, status);
    }
    match model {
        Some(m) => {
            app.metrics.request(&m.spec.name, robot_type, status);
            m.metrics.duration.observe(received.elapsed().as_secs_f64());
        }
        None => app.metrics.request("none", robot_type, status),
    }
}

async fn robot_inference(
    app: &AppState,
    caller: &Caller,
    headers: HeaderMap,
    body: Body,
    received: Instant,
    resolved: &mut Option<Arc<Model>>,
) -> Result<Response, ApiError> {
    let app = app.clone();
    // The body is read before anything can refuse the request: an HTTP/1.1 client still
    // sending a body it was refused would see a reset connection instead of the answer.
    let body = read_request_body(&app, &headers, body).await?;
    app.check_accepting()?;
    let robot = caller.robot()?.clone();
    check_json_content_type(&headers)?;
    let request = validate::parse_request(&body)?;
    drop(body);
    // A key acts only as its own robot; the answer is the same whether the other id exists.
    if request.robot_id != robot.robot_id {
        return Err(ApiError::Forbidden(format!(
            "these credentials belong to robot `{}` and cannot act as another robot",
            robot.robot_id
        )));
    }
    if let Some(t) = &request.robot_type
        && *t != robot.robot_type
    {
        return Err(ApiError::Forbidden(format!(
            "robot `{}` is registered as type `{}`, not `{}`",
            robot.robot_id,
            robot.robot_type,
            t.chars().take(80).collect::<String>()
        )));
    }
    let model = app.models.resolve(request.model.as_deref())?;
    *resolved = Some(model.clone());
    let checked = validate::check_request(&request, &model.spec, &app.config.limits, robot.priority)?;
    // `check_request` bounds the deadline by `limits.max_deadline_ms`, itself at most a day.
    let deadline = received + Duration::from_millis(checked.deadline_ms);

    // Admission, before anything is queued. The request keeps this set of policies for its
    // safety chain too, whatever an operator changes meanwhile.
    let request_id = uuid::Uuid::new_v4().to_string();
    let policies = app.policies.snapshot();
    let ctx = crate::policy::context(
        &request_id,
        &robot,
        &model.spec.name,
        request.instruction.clone(),
        request.state.clone(),
        crate::admin::now_ms(),
    );
    let admitted = app.policies.admit(&policies, &ctx, &robot.group).await?;

    let preprocess_start = Instant::now();
    let inputs = {
        // The permit moves into the blocking task: it bounds decodes running, even when the
        // client goes away and this handler is dropped mid-way.
        let slot = tokio::time::timeout_at(deadline.into(), app.preprocess_slots.clone().acquire_owned())
            .await
            .map_err(|_| ApiError::DeadlineExceeded { deadline_ms: checked.deadline_ms })?
            .map_err(|_| ApiError::ShuttingDown)?;
        let spec = model.spec.clone();
        let config = app.config.clone();
        let vla_api::InferenceRequest { image, instruction, state, .. } = request;
        tokio::task::spawn_blocking(move || {
            let _slot = slot;
            preprocess::robot_sample(&spec, &image, &instruction, &state, &config.limits)
        })
        .await
        .map_err(|e| ApiError::Internal(format!("preprocessing task failed: {e}")))??
    };
    let preprocess = preprocess_start.elapsed();
    model.metrics.image_decode.observe(preprocess.as_secs_f64());

    let (model, mut done) = compute(&app, model, vec![inputs], checked.priority, deadline, checked.deadline_ms).await?;
    let done = done.pop().ok_or_else(|| ApiError::Internal("no result".into()))?;
    // Computed: the robot is charged (given back above on any failure), on disk before it hears.
    admitted.keep_charges().await?;
    let action_output = model.spec.robot_inputs().action_output;
    let proposed = crate::model::f32s(&done.outputs[action_output]);
    let (action, policy) = app.policies.check_action(&policies, ctx, &admitted, &model.spec, proposed).await?;
    let response = InferenceResponse {
        request_id,
        model: model.spec.name.clone(),
        model_version: model.spec.version.clone(),
        action,
        policy,
        timing: Timing {
            total_ms: ms(received.elapsed()),
            queue_ms: ms(done.queued),
            preprocess_ms: ms(preprocess),
            inference_ms: ms(done.inference),
            batch_size: done.batch_size,
        },
    };
    let mut response = axum::Json(response).into_response();
    if let Some(status) = admitted.quota_status() {
        rate_limit_headers(response.headers_mut(), &status);
    }
    Ok(response)
}

/// `RateLimit-Limit`, `RateLimit-Remaining` and `RateLimit-Reset` (seconds until the bucket
/// is full again or its period starts over) for `status`.
pub fn rate_limit_headers(headers: &mut HeaderMap, status: &crate::quota::Status) {
    let reset_s = status.reset_ms.saturating_sub(crate::admin::now_ms()).div_ceil(1000);
    headers.insert("ratelimit-limit", status.limit.into());
    headers.insert("ratelimit-remaining", status.remaining.into());
    headers.insert("ratelimit-reset", reset_s.into());
}

/// Queues every sample (one per batch row) and waits for all their results. A sample refused
/// by the queue drops the others' tickets, which abandons them if their batch has not started.
///
/// If `model` was reloaded while the request was being preprocessed, its samples go to the new
/// version when that takes the same inputs; otherwise the client is told to retry. Returns the
/// model that computed them.
pub async fn compute(
    app: &AppState,
    model: Arc<Model>,
    samples: Vec<Vec<TensorData>>,
    priority: Priority,
    deadline: Instant,
    deadline_ms: u64,
) -> Result<(Arc<Model>, Vec<Done>), ApiError> {
    let mut model = model;
    if model.batcher.is_closed() && !app.is_shutting_down() {
        let current = app.models.resolve(Some(&model.spec.name))?;
        if current.spec.inputs != model.spec.inputs || current.spec.preprocess != model.spec.preprocess {
            return Err(ApiError::ModelChanged(model.spec.name.clone()));
        }
        model = current;
    }
    let done = submit_and_wait(app, &model, samples, priority, deadline, deadline_ms).await?;
    Ok((model, done))
}

async fn submit_and_wait(
    app: &AppState,
    model: &Model,
    samples: Vec<Vec<TensorData>>,
    priority: Priority,
    deadline: Instant,
    deadline_ms: u64,
) -> Result<Vec<Done>, ApiError> {
    let job_error = |e| match e {
        // Closed between the check above and the submit: a reload or unload, not a shutdown.
        JobError::ShuttingDown if !app.is_shutting_down() => ApiError::ModelChanged(model.spec.name.clone()),
        e => job_error(e, &model.spec.name, deadline_ms),
    };
    let tickets = samples
        .into_iter()
        .map(|s| model.batcher.submit(s, priority, deadline))
        .collect::<Result<Vec<_>, _>>()
        .map_err(job_error)?;
    let mut done = Vec::with_capacity(tickets.len());
    for ticket in tickets {
        done.push(ticket.wait().await.map_err(job_error)?);
    }
    Ok(done)
}

/// Reads and discards what is left of a refused request's body (up to `limit` bytes, for at
/// most `timeout`), so an HTTP/1.1 client still sending it reads the answer instead of a reset.
pub async fn drain(body: Body, limit: usize, timeout: Duration) {
    let _ = tokio::time::timeout(timeout, Limited::new(body, limit).collect()).await;
}

/// The request body within `server.body_limit_bytes` and `server.read_timeout_ms`.
pub async fn read_request_body(app: &AppState, headers: &HeaderMap, body: Body) -> Result<Bytes, ApiError> {
    read_request_body_within(app, headers, body, app.config.server.body_limit_bytes).await
}

/// The request body within `limit` bytes and `server.read_timeout_ms` (policy uploads have
/// their own limit).
pub async fn read_request_body_within(
    app: &AppState,
    headers: &HeaderMap,
    body: Body,
    limit: usize,
) -> Result<Bytes, ApiError> {
    let read_timeout = Duration::from_millis(app.config.server.read_timeout_ms);
    tokio::time::timeout(read_timeout, read_body(body, headers, limit))
        .await
        .map_err(|_| ApiError::BodyTimeout { timeout_ms: app.config.server.read_timeout_ms })?
}

fn job_error(e: JobError, model: &str, deadline_ms: u64) -> ApiError {
    match e {
        JobError::QueueFull { capacity } => ApiError::QueueFull { model: model.into(), capacity, retry_after_s: 1 },
        JobError::ShuttingDown => ApiError::ShuttingDown,
        JobError::ExecutorGone => ApiError::Internal(format!("model `{model}`: executor stopped")),
        JobError::DeadlineExceeded => ApiError::DeadlineExceeded { deadline_ms },
        JobError::Inference(reason) => ApiError::Inference { model: model.into(), reason },
    }
}

pub(crate) fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

/// JSON bodies only; a missing content type is taken as JSON (robots sending with `curl -d`
/// forget it more often than they send something else).
fn check_json_content_type(headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(value) = headers.get(header::CONTENT_TYPE) else { return Ok(()) };
    let value = value.to_str().unwrap_or("");
    let mime = value.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    if mime == "application/json" || mime.ends_with("+json") {
        Ok(())
    } else {
        Err(ApiError::UnsupportedMediaType(value.chars().take(100).collect()))
    }
}

/// Reads the whole body, refusing more than `limit` bytes: at once by `Content-Length`, or as
/// soon as a streamed body passes the limit.
async fn read_body(body: Body, headers: &HeaderMap, limit: usize) -> Result<Bytes, ApiError> {
    let declared =
        headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > limit as u64) {
        return Err(ApiError::BodyTooLarge { limit });
    }
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => Err(ApiError::BodyTooLarge { limit }),
        Err(e) => Err(ApiError::BodyRead(e.to_string())),
    }
}

async fn serve_connection<I>(
    builder: &auto::Builder<TokioExecutor>,
    io: I,
    router: Router,
    identity: Option<auth::PeerIdentity>,
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
    metrics: Arc<crate::metrics::Metrics>,
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
                        let identity = tls::peer_identity(stream.get_ref().1.peer_certificates());
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
