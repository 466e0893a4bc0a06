//! The robot endpoint (`POST /v1/inference`), the serving models (`GET /v1/models`) and the
//! public `GET /health`.
//!
//! An inference request is read, parsed and checked here (the robot's identity, the model,
//! every field), then handed to the shared pipeline ([`crate::infer`]), whose answer becomes
//! the robot's JSON.

use std::time::Instant;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use vla_api::{Health, InferenceResponse, ModelList};

use super::auth::Caller;
use super::body;
use super::state::AppState;
use crate::error::{ApiError, rate_limit_headers};
use crate::infer::{Frame, Request, RobotRow, Row};
use crate::repository::Model;

/// Bodies up to this size are parsed where they arrive (well under a millisecond).
const SMALL_BODY_BYTES: usize = 64 * 1024;
/// A large body waits for a CPU slot to be parsed at most this long (then 504).
const PARSE_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// `GET /health`: 200 while at least one model serves, else 503; the body lists every model.
pub async fn health(State(app): State<AppState>) -> Response {
    let (status, code) = if app.is_shutting_down() {
        ("shutting_down", StatusCode::SERVICE_UNAVAILABLE)
    } else if !app.models.is_serving() {
        ("unavailable", StatusCode::SERVICE_UNAVAILABLE)
    } else if app.models.has_failures() {
        ("degraded", StatusCode::OK)
    } else {
        ("ok", StatusCode::OK)
    };
    (code, Json(Health { status: status.into(), models: app.models.health() })).into_response()
}

/// `GET /v1/models`: the serving models, their action semantics and queue counters.
pub async fn list_models(State(app): State<AppState>) -> Json<ModelList> {
    Json(ModelList {
        default_model: app.models.default_model().map(str::to_string),
        models: app.models.serving().iter().map(|m| m.info()).collect(),
    })
}

/// `POST /v1/inference`. Counts the answer by model, robot type and status.
pub async fn inference(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let received = Instant::now();
    let mut model = None;
    let result = robot_inference(&app, &caller, headers, body, received, &mut model).await;
    let status = result.as_ref().map_or_else(ApiError::request_status, |_| "success");
    app.pipeline.count(caller.robot().ok(), model.as_deref(), status, received);
    result.unwrap_or_else(IntoResponse::into_response)
}

async fn robot_inference(
    app: &AppState,
    caller: &Caller,
    headers: HeaderMap,
    body: Body,
    received: Instant,
    resolved: &mut Option<std::sync::Arc<Model>>,
) -> Result<Response, ApiError> {
    // The body is read before anything can refuse the request: an HTTP/1.1 client still
    // sending a body it was refused would see a reset connection instead of the answer.
    let body = body::read(&headers, body, app.body_limits()).await?;
    app.check_accepting()?;
    let robot = caller.robot()?.clone();
    body::check_json_content_type(&headers)?;
    let parse_started = Instant::now();
    // A large body (a camera frame in base64) is parsed on the blocking pool: milliseconds of
    // CPU that must not stall the async workers, `/health` and other robots with them.
    let request = if body.len() <= SMALL_BODY_BYTES {
        crate::validate::parse_request(&body)?
    } else {
        let deadline = Instant::now() + PARSE_WAIT;
        app.pipeline
            .on_cpu(&robot.robot_id, deadline, PARSE_WAIT.as_millis() as u64, move || {
                crate::validate::parse_request(&body)
            })
            .await?
    };
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
            crate::names::clip(t, 80)
        )));
    }
    let model = app.models.resolve(request.model.as_deref())?;
    *resolved = Some(model.clone());
    let checked = crate::validate::check_request(&request, &model.spec, &app.config.limits, robot.priority)?;
    let vla_api::InferenceRequest { image, images, instruction, state, extra, seed, .. } = request;
    let images = images
        .into_iter()
        .map(|(name, wire)| Ok((name.clone(), Frame::from_wire(wire, &format!("images.{name}"))?)))
        .collect::<Result<_, ApiError>>()?;
    let row =
        Row::robot(&model, RobotRow { image: image.map(Frame::Base64), images, instruction, state, extra, seed })?;
    let answer = app
        .pipeline
        .run(Request {
            robot,
            model,
            rows: vec![row],
            priority: checked.priority,
            deadline_ms: checked.deadline_ms,
            received,
            parsed_in: parse_started.elapsed(),
        })
        .await?;
    let row = answer.rows.into_iter().next().ok_or_else(|| ApiError::Internal("no result".into()))?;
    let spec = &answer.model.spec;
    let actions: Vec<Vec<f32>> = row.action.chunks(spec.action.dof).map(<[f32]>::to_vec).collect();
    let outputs = spec
        .outputs
        .iter()
        .enumerate()
        .filter(|&(i, _)| i != spec.action_output)
        .map(|(i, t)| (t.name.clone(), crate::model::values(t.dtype, &row.outputs[i])))
        .collect();
    let response = InferenceResponse {
        request_id: answer.request_id,
        model: spec.name.clone(),
        model_version: spec.version.clone(),
        action: actions.first().cloned().unwrap_or_default(),
        actions,
        dt_ms: spec.action.dt_ms,
        outputs,
        seed: row.seed,
        policy: row.policy,
        timing: answer.timing,
    };
    let mut response = Json(response).into_response();
    if let Some(status) = answer.quota {
        rate_limit_headers(response.headers_mut(), &status);
    }
    Ok(response)
}
