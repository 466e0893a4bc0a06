//! The route table: every route and its handler (this is the only file that names them all),
//! the 404 and 405 answers, and the layers every request passes: the auth guard (outermost, so
//! nothing answers unauthenticated) and the HTTP metrics around it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, get, post};
use tokio::sync::Semaphore;

use super::state::AppState;
use super::{admin, auth, body, grpc, monitoring, oip, openpi, policies, quotas, v1};
use crate::error::ApiError;
use crate::metrics::{ErrorCount, Metrics};

/// Every route of the appliance. Who may call each is decided by [`auth::access_for`] from the
/// path alone, closed unless public; the tests walk this list to check it.
pub fn routes() -> Vec<(&'static str, MethodRouter<AppState>)> {
    vec![
        // The robot endpoint and health.
        ("/health", get(v1::health)),
        ("/v1/models", get(v1::list_models)),
        ("/v1/inference", post(v1::inference)),
        // Open Inference Protocol v2.
        ("/v2", get(oip::server_metadata)),
        ("/v2/health/live", get(oip::live)),
        ("/v2/health/ready", get(oip::ready)),
        ("/v2/models/stats", get(oip::all_stats)),
        ("/v2/models/{model}", get(oip::model_metadata)),
        ("/v2/models/{model}/versions/{version}", get(oip::model_metadata)),
        ("/v2/models/{model}/ready", get(oip::model_ready)),
        ("/v2/models/{model}/versions/{version}/ready", get(oip::model_ready)),
        ("/v2/models/{model}/stats", get(oip::model_stats)),
        ("/v2/models/{model}/versions/{version}/stats", get(oip::model_stats)),
        ("/v2/models/{model}/infer", post(oip::infer)),
        ("/v2/models/{model}/versions/{version}/infer", post(oip::infer)),
        // openpi's WebSocket protocol (openpi-client's WebsocketClientPolicy).
        ("/openpi/{model}", get(openpi::connect)),
        // Admin: robots and the OIP model repository.
        ("/admin/robots", get(admin::list_robots).post(admin::register_robot)),
        ("/admin/robots/{robot_id}", get(admin::get_robot).delete(admin::revoke_robot)),
        ("/admin/robots/{robot_id}/rotate-key", post(admin::rotate_key)),
        ("/v2/repository/index", post(admin::repository_index)),
        ("/v2/repository/models/{model}/load", post(admin::load_model)),
        ("/v2/repository/models/{model}/unload", post(admin::unload_model)),
        // Admin: policies and the audit log. The upload reads its body within its own limit
        // (`policy.max_component_bytes` plus room for the form), so axum's 2 MB default for
        // multipart must not apply.
        (
            "/admin/policies",
            get(policies::list).post(policies::upload).layer(axum::extract::DefaultBodyLimit::disable()),
        ),
        ("/admin/policies/{name}", get(policies::show).patch(policies::patch).delete(policies::delete)),
        ("/admin/policies/{name}/replay", post(policies::replay).layer(axum::extract::DefaultBodyLimit::disable())),
        ("/admin/audit", get(policies::audit_log)),
        ("/admin/changes", get(policies::changes)),
        // Admin: quotas.
        ("/admin/quotas", get(quotas::list)),
        ("/admin/quotas/{robot_id}", get(quotas::show).put(quotas::put)),
        ("/admin/quotas/{robot_id}/reset", post(quotas::reset)),
        // Monitoring.
        ("/metrics", get(monitoring::metrics)),
        ("/monitoring/metrics", get(monitoring::metrics)),
        ("/health/detailed", get(monitoring::health_detailed)),
        ("/gpu/stats", get(monitoring::gpu_stats)),
        ("/queue/stats", get(monitoring::queue_stats)),
        ("/models/stats", get(monitoring::models_stats)),
    ]
}

/// The gRPC calls' paths (`/inference.GRPCInferenceService/<call>`), one route each so the
/// metrics name the call; [`grpc`] answers them.
pub fn grpc_routes() -> Vec<String> {
    grpc::CALLS.iter().map(|call| format!("{}/{call}", grpc::PATH)).collect()
}

/// The appliance's router, with its layers.
pub fn router(state: AppState) -> Router {
    let auth = state.auth.clone();
    let metrics = state.metrics.clone();
    let mut router = Router::new();
    for (path, method_router) in routes() {
        router = router.route(path, method_router);
    }
    // OIP over gRPC: the same listener, layers and credentials. A unary call (body, then the
    // answer within the longest deadline) is bounded in time like a REST request.
    let grpc = grpc::service(state.clone());
    let config = &state.config;
    let unary_limit =
        Duration::from_millis(config.server.read_timeout_ms.saturating_add(config.limits.max_deadline_ms));
    for path in grpc_routes() {
        let call = axum::routing::any_service(grpc.clone())
            .layer(axum::middleware::from_fn_with_state(unary_limit, bound_grpc_call));
        router = router.route(&path, call);
    }
    let in_flight = Arc::new(Semaphore::new(state.config.server.max_in_flight));
    router
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
        // Before routing's 404/405 as well: nothing answers unauthenticated.
        .layer(axum::middleware::from_fn_with_state(auth, auth::guard))
        // Before authentication: an overloaded appliance refuses without looking further.
        .layer(axum::middleware::from_fn_with_state(in_flight, bound_in_flight))
        // Outermost, so refused requests are counted too.
        .layer(axum::middleware::from_fn_with_state(metrics, record_http))
}

/// `/metrics` alone, for the plain-HTTP loopback listener (`metrics.listen_http`, no token).
pub fn plain_metrics_router(state: AppState) -> Router {
    Router::new().route("/metrics", get(monitoring::metrics)).with_state(state)
}

/// Counts every request by method, route template (never the raw path) and status, and error
/// answers by code.
async fn record_http(
    State(metrics): State<Arc<Metrics>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let started = Instant::now();
    // A fixed set: a request with a made-up method must not create a series.
    let method = crate::metrics::method_label(request.method().as_str());
    let endpoint = request
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |p| p.as_str().to_string());
    let response = next.run(request).await;
    let error = response.extensions().get::<ErrorCount>().copied();
    metrics.http(method, &endpoint, response.status().as_u16(), started.elapsed(), error);
    response
}

async fn not_found(State(app): State<AppState>, request: Request) -> Response {
    let refusal = ApiError::RouteNotFound(crate::names::clip(request.uri().path(), 200));
    auth::refuse(request, refusal, app.config.server.refused_body_bytes).await
}

async fn method_not_allowed(State(app): State<AppState>, request: Request) -> Response {
    let refusal = ApiError::MethodNotAllowed(crate::names::clip(request.method().as_str(), 20));
    auth::refuse(request, refusal, app.config.server.refused_body_bytes).await
}

/// At most `server.max_in_flight` requests are handled at once; one more is answered 503
/// `overloaded` at once, before any other work (authentication included).
async fn bound_in_flight(
    State(slots): State<Arc<Semaphore>>,
    request: Request,
    next: axum::middleware::Next,
) -> Response {
    match slots.clone().try_acquire_owned() {
        Ok(_permit) => next.run(request).await,
        Err(_) if auth::is_grpc(request.headers()) => ApiError::Overloaded.into_grpc_response(),
        Err(_) => {
            let version = request.version();
            let mut response = ApiError::Overloaded.into_response();
            // The body (if any) is not read: the client is told to come back later.
            body::close_after(version, &mut response);
            response
        }
    }
}

/// A unary gRPC call gets `limit` (the body's read time and the longest deadline) to answer;
/// slower, it is answered DEADLINE_EXCEEDED and its work dropped. A streaming call answers at
/// once and bounds each of its requests itself.
async fn bound_grpc_call(State(limit): State<Duration>, request: Request, next: axum::middleware::Next) -> Response {
    match tokio::time::timeout(limit, next.run(request)).await {
        Ok(response) => response,
        Err(_) => ApiError::BodyTimeout { timeout_ms: limit.as_millis() as u64 }.into_grpc_response(),
    }
}
