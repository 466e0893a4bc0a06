//! The Open Inference Protocol v2 (KServe v2) REST endpoints, so tools that speak it (Triton's
//! `tritonclient`, KServe and Seldon clients) work unchanged: server and model metadata,
//! readiness, statistics and infer. The tensor codec is [`codec`].
//!
//! An infer request is parsed on the blocking pool into one row per batch row (no image
//! decoded), then runs the shared pipeline ([`crate::infer`]) on behalf of the robot whose
//! credentials it carries, exactly as `/v1/inference` does: admission before any decoding.
//! Tensors in the model's own datatypes pass as they are; `BYTES` is accepted for the image
//! input (an encoded JPEG/PNG, base64 in JSON) and for the instruction input (UTF-8 text).

pub mod codec;

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde_json::{Value, json};

use super::auth::Caller;
use super::body;
use super::state::{AppState, Params};
use crate::config::LimitsConfig;
use crate::error::{ApiError, rate_limit_headers};
use crate::infer::Request;
use crate::repository::Model;
use crate::spec::ModelSpec;
use crate::store::RobotRecord;
use crate::text::TextEncoder;

/// Answers with up to this many output bytes are built where they are answered.
const SMALL_ANSWER_BYTES: usize = 16 * 1024;

fn model_of(app: &AppState, params: &Params) -> Result<Arc<Model>, ApiError> {
    let version = Some(params.get("version")).filter(|v| !v.is_empty());
    Ok(app.models.resolve_version(params.get("model"), version)?)
}

/// `GET /v2`.
pub async fn server_metadata() -> Json<Value> {
    Json(json!({
        "name": "vla-appliance",
        "version": env!("CARGO_PKG_VERSION"),
        "extensions": ["binary_tensor_data", "model_repository", "statistics", "parameters"],
    }))
}

/// `GET /v2/health/live`: the process answers.
pub async fn live() -> Json<Value> {
    Json(json!({"live": true}))
}

/// `GET /v2/health/ready`: 200 while a model serves and the appliance is not shutting down.
pub async fn ready(State(app): State<AppState>) -> Response {
    let ready = app.models.is_serving() && !app.is_shutting_down();
    let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, Json(json!({"ready": ready}))).into_response()
}

/// `GET /v2/models/{model}[/versions/{version}]`.
pub async fn model_metadata(State(app): State<AppState>, params: Params) -> Result<Json<Value>, ApiError> {
    let model = model_of(&app, &params)?;
    let spec = &model.spec;
    let tensors = |ts: &[crate::spec::TensorSpec]| -> Vec<Value> {
        ts.iter().map(|t| json!({"name": t.name, "datatype": t.dtype.as_str(), "shape": t.dims})).collect()
    };
    Ok(Json(json!({
        "name": spec.name,
        "versions": [spec.version],
        "platform": spec.platform.as_str(),
        "inputs": tensors(&spec.inputs),
        "outputs": tensors(&spec.outputs),
    })))
}

/// `GET /v2/models/{model}[/versions/{version}]/ready`: 200 when serving, 404 otherwise.
pub async fn model_ready(State(app): State<AppState>, params: Params) -> Result<Json<Value>, ApiError> {
    let model = model_of(&app, &params)?;
    Ok(Json(json!({"name": model.spec.name, "version": model.spec.version, "ready": true})))
}

fn stats_of(model: &Model) -> Value {
    let t = model.batcher.totals();
    let d = |count: u64, ns: u64| json!({"count": count, "ns": ns});
    json!({
        "name": model.spec.name,
        "version": model.spec.version,
        "last_inference": t.last_inference_unix_ms,
        "inference_count": t.success,
        "execution_count": t.executions,
        "inference_stats": {
            "success": d(t.success, t.queue_ns + t.compute_ns),
            "fail": d(t.fail, 0),
            "queue": d(t.success, t.queue_ns),
            "compute_input": d(0, 0),
            "compute_infer": d(t.success, t.compute_ns),
            "compute_output": d(0, 0),
        },
        "batch_stats": [],
    })
}

/// `GET /v2/models/{model}[/versions/{version}]/stats`: the statistics extension.
pub async fn model_stats(State(app): State<AppState>, params: Params) -> Result<Json<Value>, ApiError> {
    let model = model_of(&app, &params)?;
    Ok(Json(json!({"model_stats": [stats_of(&model)]})))
}

/// `GET /v2/models/stats`: every serving model's statistics.
pub async fn all_stats(State(app): State<AppState>) -> Json<Value> {
    Json(json!({"model_stats": app.models.serving().iter().map(|m| stats_of(m)).collect::<Vec<_>>()}))
}

/// `POST /v2/models/{model}[/versions/{version}]/infer`. Counts the answer as the robot
/// endpoint does.
pub async fn infer(
    State(app): State<AppState>,
    params: Params,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let received = Instant::now();
    let mut model = None;
    let result = infer_rows(&app, &params, &caller, headers, body, received, &mut model).await;
    let status = result.as_ref().map_or_else(ApiError::request_status, |_| "success");
    app.pipeline.count(caller.robot().ok(), model.as_deref(), status, received);
    result.unwrap_or_else(IntoResponse::into_response)
}

async fn infer_rows(
    app: &AppState,
    params: &Params,
    caller: &Caller,
    headers: HeaderMap,
    body: Body,
    received: Instant,
    resolved: &mut Option<Arc<Model>>,
) -> Result<Response, ApiError> {
    // Read first: see the robot endpoint.
    let body = body::read(&headers, body, app.body_limits()).await?;
    app.check_accepting()?;
    let robot = caller.robot()?.clone();
    let model = model_of(app, params)?;
    *resolved = Some(model.clone());
    let header_len = codec::header_length(headers.get(codec::HEADER_LENGTH), body.len())?;
    let robot_id = robot.robot_id.clone();
    let done = run_checked(app, robot, model, received, move |spec, text, limits| {
        codec::parse(&body, header_len, spec, text, limits)
    })
    .await?;
    // A large answer (many rows, large outputs, as JSON numbers) is built on the blocking pool.
    let Done { id, outputs, answer } = done;
    let quota = answer.quota;
    let row_bytes: usize = outputs.iter().map(|&(i, _)| answer.rows.first().map_or(0, |r| r.outputs[i].len())).sum();
    let mut response = if row_bytes * answer.rows.len() <= SMALL_ANSWER_BYTES {
        codec::respond(&answer.model.spec, id, &outputs, &answer.rows, &answer.timing)
    } else {
        let wait = Instant::now() + Duration::from_secs(1);
        let respond = move || Ok(codec::respond(&answer.model.spec, id, &outputs, &answer.rows, &answer.timing));
        app.pipeline.on_cpu(&robot_id, wait, 1_000, respond).await?
    };
    if let Some(status) = quota {
        rate_limit_headers(response.headers_mut(), &status);
    }
    Ok(response)
}

/// A computed infer request: its id, the outputs asked for, the pipeline's answer.
pub(super) struct Done {
    pub id: Option<String>,
    pub outputs: Vec<(usize, bool)>,
    pub answer: crate::infer::Answer,
}

/// Checks an infer request (`check`, on the blocking pool within the model's default deadline:
/// tensors of any size are CPU work) and runs it through the shared pipeline for `robot`. Both
/// OIP transports, REST and gRPC ([`super::grpc`]), come through here.
pub(super) async fn run_checked(
    app: &AppState,
    robot: RobotRecord,
    model: Arc<Model>,
    received: Instant,
    check: impl FnOnce(&ModelSpec, &TextEncoder, &LimitsConfig) -> Result<codec::Parsed, ApiError> + Send + 'static,
) -> Result<Done, ApiError> {
    let default_ms = model.spec.batching.default_deadline_ms;
    let parse_started = Instant::now();
    let parsed = {
        let (spec, text, limits) = (model.spec.clone(), model.text.clone(), app.config.limits.clone());
        app.pipeline
            .on_cpu(&robot.robot_id, received + Duration::from_millis(default_ms), default_ms, move || {
                check(&spec, &text, &limits)
            })
            .await?
    };
    let parsed_in = parse_started.elapsed();
    let priority = crate::validate::effective_priority(parsed.priority, robot.priority)?;
    let deadline_ms = match parsed.timeout_us {
        None | Some(0) => default_ms,
        Some(us) => us.div_ceil(1000).min(app.config.limits.max_deadline_ms),
    };
    let codec::Parsed { id, rows, outputs, .. } = parsed;
    let answer = app.pipeline.run(Request { robot, model, rows, priority, deadline_ms, received, parsed_in }).await?;
    Ok(Done { id, outputs, answer })
}
