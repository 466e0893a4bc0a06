//! OIP stage: the Open Inference Protocol v2 (KServe v2) REST endpoints, so tools that speak
//! it (Triton's `tritonclient`, KServe and Seldon clients) work unchanged.
//!
//! An infer request goes the robot endpoint's way after its own parsing: the JSON header (and
//! the binary tensor data after it, with `Inference-Header-Content-Length`) becomes one sample
//! per batch row, checked against the model's `model.toml`; the samples then go through the
//! same batcher, deadlines and priorities as `/v1/inference`, on behalf of the robot whose
//! credentials the request carries. Tensors in the model's own datatypes pass as they are;
//! `BYTES` is accepted for the image input (an encoded JPEG/PNG, base64 in JSON) and for the
//! instruction input (UTF-8 text), which are then preprocessed as the robot endpoint does.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Extension;
use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, get, post};
use serde::Deserialize;
use serde_json::{Map, Value, json};
use vla_api::Priority;

use crate::auth::Caller;
use crate::batcher::Done;
use crate::config::LimitsConfig;
use crate::error::ApiError;
use crate::model::TensorData;
use crate::repository::Model;
use crate::server::{self, AppState, Params};
use crate::spec::{DataType, ModelSpec, PLATFORM};
use crate::{preprocess, validate};

/// The binary tensor extension's header: the length of the JSON part of a body.
pub const HEADER_LENGTH: &str = "inference-header-content-length";

/// The OIP routes; mounted by the server.
pub fn routes() -> Vec<(&'static str, MethodRouter<AppState>)> {
    vec![
        ("/v2", get(server_metadata)),
        ("/v2/health/live", get(live)),
        ("/v2/health/ready", get(ready)),
        ("/v2/models/stats", get(all_stats)),
        ("/v2/models/{model}", get(model_metadata)),
        ("/v2/models/{model}/versions/{version}", get(model_metadata)),
        ("/v2/models/{model}/ready", get(model_ready)),
        ("/v2/models/{model}/versions/{version}/ready", get(model_ready)),
        ("/v2/models/{model}/stats", get(model_stats)),
        ("/v2/models/{model}/versions/{version}/stats", get(model_stats)),
        ("/v2/models/{model}/infer", post(infer)),
        ("/v2/models/{model}/versions/{version}/infer", post(infer)),
    ]
}

fn model_of(app: &AppState, params: &Params) -> Result<std::sync::Arc<Model>, ApiError> {
    let version = Some(params.get("version")).filter(|v| !v.is_empty());
    app.models.resolve_version(params.get("model"), version)
}

/// `GET /v2`.
async fn server_metadata() -> Json<Value> {
    Json(json!({
        "name": "vla-appliance",
        "version": env!("CARGO_PKG_VERSION"),
        "extensions": ["binary_tensor_data", "model_repository", "statistics", "parameters"],
    }))
}

/// `GET /v2/health/live`: the process answers.
async fn live() -> Json<Value> {
    Json(json!({"live": true}))
}

/// `GET /v2/health/ready`: 200 while a model serves and the appliance is not shutting down.
async fn ready(State(app): State<AppState>) -> Response {
    let ready = app.models.is_serving() && !app.is_shutting_down();
    let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, Json(json!({"ready": ready}))).into_response()
}

/// `GET /v2/models/{model}[/versions/{version}]`.
async fn model_metadata(State(app): State<AppState>, params: Params) -> Result<Json<Value>, ApiError> {
    let model = model_of(&app, &params)?;
    let spec = &model.spec;
    let tensors = |ts: &[crate::spec::TensorSpec]| -> Vec<Value> {
        ts.iter().map(|t| json!({"name": t.name, "datatype": t.dtype.as_str(), "shape": t.dims})).collect()
    };
    Ok(Json(json!({
        "name": spec.name,
        "versions": [spec.version],
        "platform": PLATFORM,
        "inputs": tensors(&spec.inputs),
        "outputs": tensors(&spec.outputs),
    })))
}

/// `GET /v2/models/{model}[/versions/{version}]/ready`: 200 when serving, 404 otherwise.
async fn model_ready(State(app): State<AppState>, params: Params) -> Result<Json<Value>, ApiError> {
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
async fn model_stats(State(app): State<AppState>, params: Params) -> Result<Json<Value>, ApiError> {
    let model = model_of(&app, &params)?;
    Ok(Json(json!({"model_stats": [stats_of(&model)]})))
}

/// `GET /v2/models/stats`: every serving model's statistics.
async fn all_stats(State(app): State<AppState>) -> Json<Value> {
    Json(json!({"model_stats": app.models.serving().iter().map(|m| stats_of(m)).collect::<Vec<_>>()}))
}

#[derive(Debug, Deserialize)]
struct InferRequest {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    parameters: Map<String, Value>,
    inputs: Vec<InputTensor>,
    #[serde(default)]
    outputs: Option<Vec<RequestedOutput>>,
}

#[derive(Debug, Deserialize)]
struct InputTensor {
    name: String,
    shape: Vec<i64>,
    datatype: String,
    #[serde(default)]
    parameters: Map<String, Value>,
    #[serde(default)]
    data: Option<Value>,
}

#[derive(Debug, Deserialize)]
struct RequestedOutput {
    name: String,
    #[serde(default)]
    parameters: Map<String, Value>,
}

/// An infer request checked against the model: one sample per batch row, in input order.
#[derive(Debug)]
struct Parsed {
    id: Option<String>,
    priority: Option<Priority>,
    /// `parameters.timeout`, in microseconds.
    timeout_us: Option<u64>,
    samples: Vec<Vec<TensorData>>,
    /// Outputs to answer with, by index into the model's outputs, and whether each is binary.
    outputs: Vec<(usize, bool)>,
}

/// `POST /v2/models/{model}[/versions/{version}]/infer`. Counts the answer as
/// `server::inference` does.
async fn infer(
    State(app): State<AppState>,
    params: Params,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let received = Instant::now();
    let mut model = None;
    let result = infer_rows(app.clone(), &params, &caller, headers, body, received, &mut model).await;
    server::count_request(&app, &caller, model.as_deref(), &result, received);
    result.unwrap_or_else(IntoResponse::into_response)
}

async fn infer_rows(
    app: AppState,
    params: &Params,
    caller: &Caller,
    headers: HeaderMap,
    body: Body,
    received: Instant,
    resolved: &mut Option<Arc<Model>>,
) -> Result<Response, ApiError> {
    // Read first: see `server::inference`.
    let body = server::read_request_body(&app, &headers, body).await?;
    app.check_accepting()?;
    let robot = caller.robot()?.clone();
    let model = model_of(&app, params)?;
    *resolved = Some(model.clone());
    let header_len =
        match headers.get(HEADER_LENGTH) {
            None => None,
            Some(v) => Some(v.to_str().ok().and_then(|v| v.trim().parse::<usize>().ok()).ok_or_else(|| {
                ApiError::InferenceHeader("Inference-Header-Content-Length must be a byte count".into())
            })?),
        };
    if let Some(n) = header_len
        && n > body.len()
    {
        return Err(ApiError::InferenceHeader(format!(
            "Inference-Header-Content-Length is {n} but the body has only {} bytes",
            body.len()
        )));
    }

    // JSON tensors and images are CPU work: parse on the blocking pool, bounded like the
    // robot endpoint's decodes.
    let permit_deadline = received + Duration::from_millis(model.spec.batching.default_deadline_ms);
    let parsed = {
        let slot = tokio::time::timeout_at(permit_deadline.into(), app.preprocess_slots.clone().acquire_owned())
            .await
            .map_err(|_| ApiError::DeadlineExceeded { deadline_ms: model.spec.batching.default_deadline_ms })?
            .map_err(|_| ApiError::ShuttingDown)?;
        let spec = model.spec.clone();
        let limits = app.config.limits.clone();
        tokio::task::spawn_blocking(move || {
            let _slot = slot;
            let started = Instant::now();
            parse(&body, header_len, &spec, &limits).map(|parsed| (parsed, started.elapsed()))
        })
        .await
        .map_err(|e| ApiError::Internal(format!("request parsing task failed: {e}")))??
    };
    let (parsed, preprocess) = parsed;

    let priority = validate::effective_priority(parsed.priority, robot.priority)?;
    let deadline_ms = match parsed.timeout_us {
        None | Some(0) => model.spec.batching.default_deadline_ms,
        Some(us) => us.div_ceil(1000).min(app.config.limits.max_deadline_ms),
    };
    let deadline = received + Duration::from_millis(deadline_ms);

    // Policies, as on the robot endpoint, for every row: one refused row refuses the request.
    let set = app.policies.snapshot();
    let request_id = uuid::Uuid::new_v4().to_string();
    let now = crate::admin::now_ms();
    let pos = model.spec.robot_inputs();
    let rows = parsed.samples.len();
    let mut admitted = Vec::with_capacity(rows);
    for (row, sample) in parsed.samples.iter().enumerate() {
        let instruction = match &sample[pos.instruction] {
            // UTF-8 bytes as tokens, zero-padded (checked to be 0-255 by `parse`).
            // Only the trailing padding is cut: the policies see every byte the model sees,
            // NULs included.
            TensorData::I64(tokens) => {
                let len = tokens.iter().rposition(|&t| t != 0).map_or(0, |i| i + 1);
                let bytes: Vec<u8> = tokens[..len].iter().map(|&t| t as u8).collect();
                String::from_utf8_lossy(&bytes).into_owned()
            }
            TensorData::F32(_) => String::new(),
        };
        let state = match &sample[pos.state] {
            TensorData::F32(values) => values.clone(),
            TensorData::I64(_) => Vec::new(),
        };
        let id = if rows == 1 { request_id.clone() } else { format!("{request_id}/{row}") };
        let ctx = crate::policy::context(&id, &robot, &model.spec.name, instruction, state, now);
        let passed = app.policies.admit(&set, &ctx, &robot.group).await?;
        admitted.push((ctx, passed));
    }

    let (model, mut done) = server::compute(&app, model, parsed.samples, priority, deadline, deadline_ms).await?;
    // Computed: each row's charge is kept (and on disk before the answer, in sync mode).
    for (_, passed) in &admitted {
        passed.keep_charges().await?;
    }
    // The tightest bucket after the last row's charge goes in the `RateLimit-*` headers.
    let quota = admitted.iter().filter_map(|(_, p)| p.quota_status()).min_by_key(|s| (s.remaining, s.reset_ms));
    // The model that computed (a reload may have swapped it in): its outputs, its action.
    let action_output = model.spec.robot_inputs().action_output;
    let mut traces = Vec::with_capacity(rows);
    for ((ctx, passed), d) in admitted.into_iter().zip(done.iter_mut()) {
        let proposed = crate::model::f32s(&d.outputs[action_output]);
        let (action, trace) = app.policies.check_action(&set, ctx, &passed, &model.spec, proposed).await?;
        d.outputs[action_output] = action.iter().flat_map(|v| v.to_le_bytes()).collect();
        traces.push(trace);
    }
    let timing = vla_api::Timing {
        total_ms: server::ms(received.elapsed()),
        queue_ms: server::ms(done.iter().map(|d| d.queued).max().unwrap_or_default()),
        preprocess_ms: server::ms(preprocess),
        inference_ms: server::ms(done.first().map(|d| d.inference).unwrap_or_default()),
        batch_size: done.first().map_or(0, |d| d.batch_size),
    };
    let mut response = respond(&model.spec, parsed.id, &parsed.outputs, &done, &traces, &timing);
    if let Some(status) = quota {
        server::rate_limit_headers(response.headers_mut(), &status);
    }
    Ok(response)
}

fn invalid(name: &str, problem: impl Into<String>) -> ApiError {
    ApiError::InvalidTensor { name: name.chars().take(80).collect(), problem: problem.into() }
}

fn bad_parameter(name: &str, problem: &str) -> ApiError {
    ApiError::InvalidField { field: format!("parameters.{name}"), problem: problem.into() }
}

/// OIP's priority: 1 is the highest; 0 or absent means the robot's class. Names also work.
fn parse_priority(v: &Value) -> Result<Priority, ApiError> {
    match v {
        Value::Number(n) => match n.as_u64() {
            Some(1) => Ok(Priority::High),
            Some(2) => Ok(Priority::Normal),
            Some(3..) => Ok(Priority::Low),
            _ => Err(bad_parameter("priority", "must be 1 (high), 2 (normal) or 3 (low)")),
        },
        Value::String(s) => match s.as_str() {
            "high" => Ok(Priority::High),
            "normal" => Ok(Priority::Normal),
            "low" => Ok(Priority::Low),
            _ => Err(bad_parameter("priority", "must be high, normal or low")),
        },
        _ => Err(bad_parameter("priority", "must be a number or a string")),
    }
}

fn parse(body: &[u8], header_len: Option<usize>, spec: &ModelSpec, limits: &LimitsConfig) -> Result<Parsed, ApiError> {
    let (json_part, mut binary) = match header_len {
        Some(n) => body.split_at(n.min(body.len())),
        None => (body, &[][..]),
    };
    let request: InferRequest = validate::parse_json(json_part)?;

    let priority = match request.parameters.get("priority") {
        None => None,
        Some(Value::Number(n)) if n.as_u64() == Some(0) => None,
        Some(v) => Some(parse_priority(v)?),
    };
    let timeout_us = match request.parameters.get("timeout") {
        None => None,
        Some(v) => Some(v.as_u64().ok_or_else(|| bad_parameter("timeout", "must be a whole number of microseconds"))?),
    };
    let binary_default = match request.parameters.get("binary_data_output") {
        None => false,
        Some(v) => v.as_bool().ok_or_else(|| bad_parameter("binary_data_output", "must be true or false"))?,
    };

    if request.inputs.is_empty() {
        return Err(ApiError::InvalidField { field: "inputs".into(), problem: "must list the model's inputs".into() });
    }
    let mut columns: Vec<Option<Vec<TensorData>>> = vec![None; spec.inputs.len()];
    let mut batch: Option<usize> = None;
    for input in &request.inputs {
        let name = input.name.as_str();
        let Some(idx) = spec.inputs.iter().position(|t| t.name == name) else {
            let names: Vec<&str> = spec.inputs.iter().map(|t| t.name.as_str()).collect();
            return Err(invalid(
                name,
                format!("is not an input of model `{}` (inputs: {})", spec.name, names.join(", ")),
            ));
        };
        if columns[idx].is_some() {
            return Err(invalid(name, "appears twice"));
        }
        let raw = match input.parameters.get("binary_data_size") {
            None => None,
            Some(v) => {
                let size =
                    v.as_u64().ok_or_else(|| invalid(name, "parameters.binary_data_size must be a byte count"))?
                        as usize;
                if input.data.is_some() {
                    return Err(invalid(name, "has both `data` and parameters.binary_data_size"));
                }
                if size > binary.len() {
                    return Err(invalid(
                        name,
                        format!(
                            "binary_data_size is {size} bytes but only {} bytes of binary data are left",
                            binary.len()
                        ),
                    ));
                }
                let (mine, rest) = binary.split_at(size);
                binary = rest;
                Some(mine)
            }
        };
        if raw.is_none() && input.data.is_none() {
            return Err(invalid(name, "has neither `data` nor parameters.binary_data_size"));
        }
        let n = match input.shape.first() {
            Some(&n) if n >= 1 => n as usize,
            _ => {
                return Err(invalid(
                    name,
                    format!("shape {:?} must start with a batch size of at least 1", input.shape),
                ));
            }
        };
        let limit = spec.max_batch_size.min(spec.batching.queue_capacity);
        if n > limit {
            return Err(invalid(
                name,
                format!(
                    "batch of {n} is more than the model takes in one request ({limit}: max_batch_size, queue_capacity)"
                ),
            ));
        }
        match batch {
            Some(b) if b != n => {
                return Err(invalid(name, format!("batch size {n} differs from the other inputs' {b}")));
            }
            _ => batch = Some(n),
        }
        columns[idx] = Some(convert(input, raw, spec, idx, n, limits)?);
    }
    if !binary.is_empty() {
        return Err(ApiError::InferenceHeader(format!(
            "{} bytes of binary data follow the JSON header but no input claims them",
            binary.len()
        )));
    }
    let n = batch.unwrap_or(1);
    let mut samples: Vec<Vec<TensorData>> = (0..n).map(|_| Vec::with_capacity(columns.len())).collect();
    for (i, column) in columns.into_iter().enumerate() {
        let column = column.ok_or_else(|| invalid(&spec.inputs[i].name, "is missing"))?;
        for (sample, data) in samples.iter_mut().zip(column) {
            sample.push(data);
        }
    }

    let outputs = match &request.outputs {
        None => (0..spec.outputs.len()).map(|i| (i, binary_default)).collect(),
        Some(requested) => {
            let mut chosen = Vec::with_capacity(requested.len());
            for o in requested {
                let idx = spec.outputs.iter().position(|t| t.name == o.name).ok_or_else(|| ApiError::InvalidField {
                    field: "outputs".into(),
                    problem: format!(
                        "`{}` is not an output of model `{}`",
                        o.name.chars().take(80).collect::<String>(),
                        spec.name
                    ),
                })?;
                let binary = match o.parameters.get("binary_data") {
                    None => binary_default,
                    Some(v) => v.as_bool().ok_or_else(|| ApiError::InvalidField {
                        field: format!("outputs.{}.parameters.binary_data", o.name),
                        problem: "must be true or false".into(),
                    })?,
                };
                chosen.push((idx, binary));
            }
            chosen
        }
    };
    Ok(Parsed { id: request.id, priority, timeout_us, samples, outputs })
}

/// One input tensor of `n` rows → one [`TensorData`] per row.
fn convert(
    input: &InputTensor,
    raw: Option<&[u8]>,
    spec: &ModelSpec,
    idx: usize,
    n: usize,
    limits: &LimitsConfig,
) -> Result<Vec<TensorData>, ApiError> {
    let name = input.name.as_str();
    let declared = &spec.inputs[idx];
    let robot = spec.robot_inputs();
    if input.datatype == "BYTES" && (idx == robot.image || idx == robot.instruction) {
        if !(input.shape == [n as i64] || input.shape == [n as i64, 1]) {
            return Err(invalid(name, format!("BYTES shape {:?} must be [{n}] or [{n}, 1]", input.shape)));
        }
        let elements = match raw {
            Some(raw) => split_bytes(name, raw)?,
            None => json_strings(name, input.data.as_ref())?,
        };
        if elements.len() != n {
            return Err(invalid(name, format!("has {} elements; shape {:?} needs {n}", elements.len(), input.shape)));
        }
        return elements
            .into_iter()
            .map(|e| {
                if idx == robot.image {
                    let image = match raw {
                        Some(_) => preprocess::decode_image_bytes(&e, limits)?,
                        // In JSON, an encoded image travels as base64 text.
                        None => preprocess::decode_image(&String::from_utf8_lossy(&e), limits)?,
                    };
                    Ok(TensorData::F32(preprocess::image_tensor(&image, &spec.preprocess.image)))
                } else {
                    let text = std::str::from_utf8(&e).map_err(|_| invalid(name, "is not UTF-8 text"))?;
                    if text.len() > limits.max_instruction_bytes {
                        return Err(invalid(
                            name,
                            format!("{} bytes, more than the limit of {}", text.len(), limits.max_instruction_bytes),
                        ));
                    }
                    Ok(TensorData::I64(preprocess::instruction_tokens(text, spec.instruction_len())))
                }
            })
            .collect();
    }
    if input.datatype != declared.dtype.as_str() {
        let hint = if idx == robot.image || idx == robot.instruction { " (or BYTES)" } else { "" };
        return Err(invalid(
            name,
            format!(
                "datatype `{}` does not match the model's `{}`{hint}",
                input.datatype.chars().take(20).collect::<String>(),
                declared.dtype.as_str()
            ),
        ));
    }
    if input.shape.len() != declared.dims.len() || input.shape[1..] != declared.dims[1..] {
        return Err(invalid(name, format!("shape {:?} does not match the model's {:?}", input.shape, declared.dims)));
    }
    let per_row = declared.sample_len();
    let count = n * per_row;
    let elt = if declared.dtype == DataType::Int64 { 8 } else { 4 };
    let rows = match (declared.dtype, raw) {
        (DataType::Int64, Some(raw)) => {
            check_binary_size(name, raw, count, elt, &input.shape)?;
            let v: Vec<i64> = raw.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap_or([0; 8]))).collect();
            check_tokens(name, &v, idx == robot.instruction)?;
            v.chunks(per_row).map(|c| TensorData::I64(c.to_vec())).collect()
        }
        (DataType::Int64, None) => {
            let v = flatten(name, input.data.as_ref(), count, &input.shape, |v| v.as_i64(), "an integer")?;
            check_tokens(name, &v, idx == robot.instruction)?;
            v.chunks(per_row).map(|c| TensorData::I64(c.to_vec())).collect()
        }
        (_, Some(raw)) => {
            check_binary_size(name, raw, count, elt, &input.shape)?;
            let v: Vec<f32> = raw.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap_or([0; 4]))).collect();
            if let Some(i) = v.iter().position(|x| !x.is_finite()) {
                return Err(invalid(name, format!("element {i} is not a finite number")));
            }
            v.chunks(per_row).map(|c| TensorData::F32(c.to_vec())).collect()
        }
        (_, None) => {
            let finite_f32 = |v: &Value| v.as_f64().map(|x| x as f32).filter(|x| x.is_finite());
            let v = flatten(name, input.data.as_ref(), count, &input.shape, finite_f32, "a number in FP32 range")?;
            v.chunks(per_row).map(|c| TensorData::F32(c.to_vec())).collect()
        }
    };
    Ok(rows)
}

/// Instruction tokens outside the encoding's range would index past the model's embedding and
/// fail the whole batch (on CUDA, the device): refused here. `utf8-bytes` tokens are 0-255.
fn check_tokens(name: &str, tokens: &[i64], is_instruction: bool) -> Result<(), ApiError> {
    match tokens.iter().position(|t| !(0..=255).contains(t)).filter(|_| is_instruction) {
        Some(i) => Err(invalid(name, format!("element {i} is {}; utf8-bytes tokens are 0-255", tokens[i]))),
        None => Ok(()),
    }
}

fn check_binary_size(name: &str, raw: &[u8], count: usize, elt: usize, shape: &[i64]) -> Result<(), ApiError> {
    if raw.len() != count * elt {
        return Err(invalid(
            name,
            format!("binary_data_size is {} bytes but shape {shape:?} needs {}", raw.len(), count * elt),
        ));
    }
    Ok(())
}

/// `data` flat or nested, as `count` values.
fn flatten<T>(
    name: &str,
    data: Option<&Value>,
    count: usize,
    shape: &[i64],
    get: impl Fn(&Value) -> Option<T>,
    what: &str,
) -> Result<Vec<T>, ApiError> {
    // `count` comes from the client's shape: allocate as the data arrives, not up front.
    let mut out = Vec::with_capacity(count.min(1 << 16));
    let mut stack = vec![data.unwrap_or(&Value::Null)];
    let mut seen = 0usize;
    while let Some(v) = stack.pop() {
        match v {
            Value::Array(items) => stack.extend(items.iter().rev()),
            other => {
                if out.len() >= count {
                    seen += 1;
                    continue;
                }
                out.push(get(other).ok_or_else(|| invalid(name, format!("element {} is not {what}", out.len())))?);
            }
        }
    }
    if out.len() != count || seen > 0 {
        return Err(invalid(name, format!("has {} elements; shape {shape:?} needs {count}", out.len() + seen)));
    }
    Ok(out)
}

/// Binary `BYTES`: each element a 4-byte little-endian length and that many bytes.
fn split_bytes(name: &str, mut raw: &[u8]) -> Result<Vec<Vec<u8>>, ApiError> {
    let mut out = Vec::new();
    while !raw.is_empty() {
        let Some((len, rest)) = raw.split_first_chunk::<4>() else {
            return Err(invalid(name, "BYTES data ends inside an element's 4-byte length"));
        };
        let len = u32::from_le_bytes(*len) as usize;
        if len > rest.len() {
            return Err(invalid(name, format!("BYTES element of {len} bytes runs past the end of its data")));
        }
        out.push(rest[..len].to_vec());
        raw = &rest[len..];
    }
    Ok(out)
}

fn json_strings(name: &str, data: Option<&Value>) -> Result<Vec<Vec<u8>>, ApiError> {
    let mut out = Vec::new();
    let mut stack = vec![data.unwrap_or(&Value::Null)];
    while let Some(v) = stack.pop() {
        match v {
            Value::Array(items) => stack.extend(items.iter().rev()),
            Value::String(s) => out.push(s.as_bytes().to_vec()),
            _ => return Err(invalid(name, format!("element {} of a BYTES tensor is not a string", out.len()))),
        }
    }
    Ok(out)
}

/// Values of `dtype` from little-endian bytes, as JSON numbers (booleans for `BOOL`).
fn json_values(dtype: DataType, bytes: &[u8]) -> Vec<Value> {
    fn each<const N: usize>(bytes: &[u8], f: impl Fn([u8; N]) -> Value) -> Vec<Value> {
        bytes.chunks_exact(N).map(|c| f(c.try_into().unwrap_or([0; N]))).collect()
    }
    match dtype {
        DataType::Bool => bytes.iter().map(|&b| Value::Bool(b != 0)).collect(),
        DataType::Uint8 => bytes.iter().map(|&b| Value::from(b)).collect(),
        DataType::Int8 => bytes.iter().map(|&b| Value::from(b as i8)).collect(),
        DataType::Int16 => each(bytes, |b| Value::from(i16::from_le_bytes(b))),
        DataType::Int32 => each(bytes, |b| Value::from(i32::from_le_bytes(b))),
        DataType::Int64 => each(bytes, |b| Value::from(i64::from_le_bytes(b))),
        DataType::Fp16 => each(bytes, |b| Value::from(f64::from(half::f16::from_le_bytes(b).to_f32()))),
        DataType::Fp32 => each(bytes, |b| Value::from(f64::from(f32::from_le_bytes(b)))),
        DataType::Fp64 => each(bytes, |b| Value::from(f64::from_le_bytes(b))),
    }
}

/// The infer response: JSON, or a JSON header followed by binary outputs.
///
/// `policy` is the request's decision chain (every row's, in row order; the decision is
/// `modify` if any row's action was changed); with more than one row, `policy_rows` has each
/// row's own. `parameters` says where the time went, as `timing` does on `/v1/inference`
/// (`preprocess_ms` is the parsing of the body; rows in more than one batch: the longest
/// wait is `queue_ms`, the first batch gives `inference_ms` and `batch_size`).
fn respond(
    spec: &ModelSpec,
    id: Option<String>,
    outputs: &[(usize, bool)],
    done: &[Done],
    traces: &[vla_api::PolicyTrace],
    timing: &vla_api::Timing,
) -> Response {
    let n = done.len();
    let any_binary = outputs.iter().any(|&(_, binary)| binary);
    let mut tail: Vec<u8> = Vec::new();
    let outputs: Vec<Value> = outputs
        .iter()
        .map(|&(idx, binary)| {
            let declared = &spec.outputs[idx];
            let mut shape = vec![n as i64];
            shape.extend(&declared.dims[1..]);
            let bytes: Vec<u8> = done.iter().flat_map(|d| d.outputs[idx].iter().copied()).collect();
            let mut out = json!({"name": declared.name, "datatype": declared.dtype.as_str(), "shape": shape});
            if binary {
                out["parameters"] = json!({"binary_data_size": bytes.len()});
                tail.extend_from_slice(&bytes);
            } else {
                out["data"] = Value::Array(json_values(declared.dtype, &bytes));
            }
            out
        })
        .collect();
    let mut body = json!({"model_name": spec.name, "model_version": spec.version, "outputs": outputs});
    if let Some(id) = id {
        body["id"] = Value::String(id);
    }
    let modified = traces.iter().any(|t| t.decision == "modify");
    body["policy"] = json!({
        "decision": if modified { "modify" } else { "allow" },
        "policies": traces.iter().flat_map(|t| &t.policies).collect::<Vec<_>>(),
    });
    if traces.len() > 1 {
        body["policy_rows"] = json!(traces);
    }
    body["parameters"] = json!(timing);
    let header = serde_json::to_vec(&body).unwrap_or_default();
    if !any_binary {
        return ([(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))], header).into_response();
    }
    let header_len = header.len();
    let mut all = header;
    all.extend_from_slice(&tail);
    let mut response =
        ([(header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"))], all).into_response();
    response.headers_mut().insert(HEADER_LENGTH, HeaderValue::from(header_len));
    response
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn spec() -> ModelSpec {
        ModelSpec::parse(crate::demo::MODEL_TOML, "tiny-vla").unwrap()
    }

    fn state_only(data: Value) -> Vec<u8> {
        serde_json::to_vec(&json!({"inputs": [
            {"name": "image", "datatype": "FP32", "shape": [1, 3, 224, 224], "data": vec![0.0; 3 * 224 * 224]},
            {"name": "instruction", "datatype": "BYTES", "shape": [1], "data": ["pick"]},
            {"name": "state", "datatype": "FP32", "shape": [1, 7], "data": data},
        ]}))
        .unwrap()
    }

    #[test]
    fn nested_and_flat_data_give_the_same_sample() {
        let limits = LimitsConfig::default();
        let flat = parse(&state_only(json!([0, 1, 2, 3, 4, 5, 6])), None, &spec(), &limits).unwrap();
        let nested = parse(&state_only(json!([[0, 1, 2, 3, 4, 5, 6]])), None, &spec(), &limits).unwrap();
        assert_eq!(flat.samples, nested.samples);
        assert_eq!(flat.samples[0][2], TensorData::F32(vec![0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0]));
        let mut tokens = vec![0i64; 32];
        tokens[..4].copy_from_slice(&[112, 105, 99, 107]);
        assert_eq!(flat.samples[0][1], TensorData::I64(tokens));
    }

    #[test]
    fn an_element_count_mismatch_names_the_input() {
        let err = parse(&state_only(json!([0, 1, 2])), None, &spec(), &LimitsConfig::default()).unwrap_err();
        assert_eq!(err.to_string(), "input `state`: has 3 elements; shape [1, 7] needs 7");
        let err =
            parse(&state_only(json!([0, 1, 2, 3, 4, 5, "x"])), None, &spec(), &LimitsConfig::default()).unwrap_err();
        assert!(err.to_string().contains("element 6 is not a number"), "{err}");
    }

    #[test]
    fn bytes_elements_are_length_prefixed() {
        let mut raw = Vec::new();
        for s in ["ab", "", "xyz"] {
            raw.extend((s.len() as u32).to_le_bytes());
            raw.extend(s.as_bytes());
        }
        assert_eq!(split_bytes("t", &raw).unwrap(), vec![b"ab".to_vec(), vec![], b"xyz".to_vec()]);
        assert!(split_bytes("t", &raw[..raw.len() - 1]).is_err());
        assert!(split_bytes("t", &[1, 0]).is_err());
    }

    #[test]
    fn values_convert_from_little_endian_bytes() {
        assert_eq!(json_values(DataType::Fp32, &1.5f32.to_le_bytes()), vec![json!(1.5)]);
        assert_eq!(json_values(DataType::Int64, &(-3i64).to_le_bytes()), vec![json!(-3)]);
        assert_eq!(json_values(DataType::Fp16, &half::f16::from_f32(0.5).to_le_bytes()), vec![json!(0.5)]);
        assert_eq!(json_values(DataType::Bool, &[0, 1]), vec![json!(false), json!(true)]);
    }

    #[test]
    fn priorities_follow_oip_numbers_and_names() {
        assert_eq!(parse_priority(&json!(1)).unwrap(), Priority::High);
        assert_eq!(parse_priority(&json!(7)).unwrap(), Priority::Low);
        assert_eq!(parse_priority(&json!("normal")).unwrap(), Priority::Normal);
        assert!(parse_priority(&json!(-1)).is_err());
    }
}
