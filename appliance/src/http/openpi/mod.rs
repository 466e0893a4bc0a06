//! openpi's WebSocket protocol on `GET /openpi/{model}`, so robot programs written against
//! `openpi_client.websocket_client_policy.WebsocketClientPolicy` call the appliance unchanged:
//! the client connects (credentials as everywhere: `Authorization: Api-Key <key>` too),
//! receives one MessagePack metadata message, then sends observations as binary MessagePack
//! messages and receives one answer per observation:
//! `{"actions": float32 [horizon, dof], "server_timing": {…}, "policy": <decision chain>, …}`.
//! An error is a text message (openpi's client raises it) holding the HTTP API's JSON error
//! with its `status`; the session stays usable.
//!
//! Each observation runs the pipeline `/v1/inference` runs ([`crate::infer`]); `model.toml`'s
//! `[openpi]` says which observation key feeds which camera, the state, the prompt and the
//! extra inputs. Bounds: sessions in all and per robot, the message size
//! (`server.body_limit_bytes`), observations a second per session, the idle time
//! (`server.idle_timeout_ms`). A session closed while its observation waits abandons it: a
//! queued row is never computed.

pub mod codec;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Extension;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;

use self::codec::{Item, Value, Writer};
use super::auth::Caller;
use super::sessions::Rate;
use super::state::AppState;
use crate::error::ApiError;
use crate::infer::{Frame, Input, Request, RobotRow, Row};
use crate::repository::Model;
use crate::spec::{DataType, ModelSpec};
use crate::store::RobotRecord;

/// Messages up to this size are read where they arrive; larger ones on the blocking pool.
const SMALL_MESSAGE_BYTES: usize = 64 * 1024;
/// The route's label in the HTTP metrics; each observation counts as one request under it.
const ENDPOINT: &str = "/openpi/{model}";

/// `GET /openpi/{model}`: checks the caller, the model and the session bounds, then upgrades.
pub async fn connect(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(model): Path<String>,
    upgrade: WebSocketUpgrade,
) -> Result<Response, ApiError> {
    app.check_accepting()?;
    let robot = caller.robot()?.clone();
    let served = app.models.resolve(Some(&model))?;
    let permit = app.openpi.acquire(&robot.robot_id)?;
    let limit = app.config.server.body_limit_bytes;
    let name = served.spec.name.clone();
    Ok(upgrade
        .max_message_size(limit)
        .max_frame_size(limit)
        .on_upgrade(move |socket| async move {
            let _permit = permit;
            session(app, robot, name, socket).await;
        })
        .into_response())
}

/// One session, until the client closes it, it idles out or the appliance shuts down.
async fn session(app: AppState, robot: RobotRecord, model: String, mut socket: WebSocket) {
    let idle = Duration::from_millis(app.config.server.idle_timeout_ms);
    let opened = Instant::now();
    let mut rate = Rate::new(app.config.server.websocket_messages_per_s);
    let hello = match app.models.resolve(Some(&model)) {
        Ok(m) => metadata(&m.spec),
        Err(e) => {
            let _ = socket.send(Message::Text(error_text(ApiError::from(e)).await.into())).await;
            return;
        }
    };
    if socket.send(Message::Binary(hello.into())).await.is_err() {
        return;
    }
    let mut pending: Option<Bytes> = None;
    loop {
        let message = match pending.take() {
            Some(m) => m,
            None => {
                let next = tokio::select! {
                    next = socket.recv() => next,
                    () = tokio::time::sleep(idle) => {
                        close(&mut socket, 1000, "idle").await;
                        return;
                    }
                    () = wait_shutdown(&app) => {
                        close(&mut socket, 1001, "the appliance is shutting down").await;
                        return;
                    }
                };
                match next {
                    Some(Ok(Message::Binary(data))) => data,
                    Some(Ok(Message::Text(_))) => {
                        let e = ApiError::MalformedMessage(
                            "send observations as binary MessagePack messages (openpi_client's msgpack_numpy)".into(),
                        );
                        if socket.send(Message::Text(error_text(e).await.into())).await.is_err() {
                            return;
                        }
                        continue;
                    }
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                    Some(Ok(Message::Close(_)) | Err(_)) | None => return,
                }
            }
        };
        let received = Instant::now();
        if !rate.admit(opened) {
            let e = ApiError::TooManyMessages { per_s: rate.per_s() };
            count(&app, &robot, None, &e, received);
            if socket.send(Message::Text(error_text(e).await.into())).await.is_err() {
                return;
            }
            continue;
        }
        // The observation runs while the socket is watched: a close abandons it (a queued row
        // is then never computed); one more observation waits its turn; beyond that each is
        // answered with an error at once.
        let work = observe(&app, &robot, &model, message, received);
        tokio::pin!(work);
        let outcome = loop {
            tokio::select! {
                outcome = &mut work => break Some(outcome),
                next = socket.recv() => match next {
                    Some(Ok(Message::Binary(data))) if pending.is_none() => pending = Some(data),
                    Some(Ok(Message::Binary(_) | Message::Text(_))) => {
                        let e = ApiError::SessionBusy;
                        if socket.send(Message::Text(error_text(e).await.into())).await.is_err() {
                            break None;
                        }
                    }
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                    Some(Ok(Message::Close(_)) | Err(_)) | None => break None,
                },
            }
        };
        let Some(outcome) = outcome else {
            tracing::debug!(robot = %robot.robot_id, "openpi session closed with an observation in flight: abandoned");
            return;
        };
        let sent = match outcome {
            Ok(answer) => socket.send(Message::Binary(answer.into())).await,
            Err(e) => socket.send(Message::Text(error_text(e).await.into())).await,
        };
        if sent.is_err() {
            return;
        }
    }
}

async fn wait_shutdown(app: &AppState) {
    while !app.is_shutting_down() {
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn close(socket: &mut WebSocket, code: u16, reason: &'static str) {
    let _ = socket.send(Message::Close(Some(CloseFrame { code, reason: reason.into() }))).await;
}

/// Counts an observation's answer as `/v1/inference` counts its requests, and under the
/// route's label in the HTTP metrics.
fn count(app: &AppState, robot: &RobotRecord, model: Option<&Model>, e: &ApiError, received: Instant) {
    app.pipeline.count(Some(robot), model, e.request_status(), received);
    app.metrics.http("WS", ENDPOINT, e.status().as_u16(), received.elapsed(), Some(e.counts()));
}

/// One observation through the pipeline; the answer's MessagePack bytes.
async fn observe(
    app: &AppState,
    robot: &RobotRecord,
    model: &str,
    message: Bytes,
    received: Instant,
) -> Result<Vec<u8>, ApiError> {
    let mut served = None;
    let result = run(app, robot, model, message, received, &mut served).await;
    match &result {
        Ok(_) => {
            app.pipeline.count(Some(robot), served.as_deref(), "success", received);
            app.metrics.http("WS", ENDPOINT, 200, received.elapsed(), None);
        }
        Err(e) => count(app, robot, served.as_deref(), e, received),
    }
    result
}

async fn run(
    app: &AppState,
    robot: &RobotRecord,
    model: &str,
    message: Bytes,
    received: Instant,
    served: &mut Option<Arc<Model>>,
) -> Result<Vec<u8>, ApiError> {
    app.check_accepting()?;
    let model = app.models.resolve(Some(model))?;
    *served = Some(model.clone());
    let parse_started = Instant::now();
    let parsed = if message.len() <= SMALL_MESSAGE_BYTES {
        parse(&message, &model.spec)?
    } else {
        let wait = Duration::from_millis(model.spec.batching.default_deadline_ms);
        let spec = model.clone();
        app.pipeline
            .on_cpu(&robot.robot_id, received + wait, wait.as_millis() as u64, move || parse(&message, &spec.spec))
            .await?
    };
    let request = vla_api::InferenceRequest {
        robot_id: robot.robot_id.clone(),
        instruction: parsed.instruction.clone(),
        state: parsed.state.clone(),
        deadline_ms: parsed.deadline_ms,
        ..Default::default()
    };
    let checked = crate::validate::check_request(&request, &model.spec, &app.config.limits, robot.priority)?;
    let Parsed { images, instruction, state, extra, seed, .. } = parsed;
    let mut row = Row::robot(&model, RobotRow { image: None, images, instruction, state, extra, seed })?;
    // Frame errors name the observation key the frame came in.
    for input in &mut row.inputs {
        if let Input::Frame { camera, field, .. } = input {
            field.clone_from(&model.spec.openpi.cameras[*camera]);
        }
    }
    let answer = app
        .pipeline
        .run(Request {
            robot: robot.clone(),
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
    let mut timing = answer.timing;
    timing.total_ms = crate::clock::ms(received.elapsed());
    let mut w = Writer::default();
    let extra_outputs: Vec<usize> = (0..spec.outputs.len()).filter(|&i| i != spec.action_output).collect();
    w.map(9);
    w.str("actions").f32_array(&[spec.action.horizon, spec.action.dof], &row.action);
    w.str("server_timing").map(5);
    w.str("infer_ms").float(timing.inference_ms);
    w.str("queue_ms").float(timing.queue_ms);
    w.str("preprocess_ms").float(timing.preprocess_ms);
    w.str("total_ms").float(timing.total_ms);
    w.str("batch_size").int(timing.batch_size as i64);
    w.str("policy").json(&serde_json::to_value(&row.policy).unwrap_or_default());
    w.str("request_id").str(&answer.request_id);
    w.str("model").str(&spec.name);
    w.str("model_version").str(&spec.version);
    w.str("dt_ms");
    match spec.action.dt_ms {
        Some(dt) => w.float(dt),
        None => w.nil(),
    };
    w.str("seed");
    match row.seed {
        Some(s) => w.int(s as i64),
        None => w.nil(),
    };
    w.str("outputs").map(extra_outputs.len());
    for i in extra_outputs {
        let t = &spec.outputs[i];
        let shape: Vec<usize> = t.dims[1..].iter().map(|&d| d.max(0) as usize).collect();
        w.str(&t.name).ndarray(numpy_dtype(t.dtype), &shape, &row.outputs[i]);
    }
    Ok(w.buf)
}

/// NumPy's type string for an output's datatype (little-endian, as the outputs' bytes are).
fn numpy_dtype(dtype: DataType) -> &'static str {
    match dtype {
        DataType::Bool => "|b1",
        DataType::Uint8 => "|u1",
        DataType::Int8 => "|i1",
        DataType::Int16 => "<i2",
        DataType::Int32 => "<i4",
        DataType::Int64 => "<i8",
        DataType::Fp16 => "<f2",
        DataType::Fp32 => "<f4",
        DataType::Fp64 => "<f8",
    }
}

/// An observation, read against the model's `[openpi]` keys.
#[derive(Debug)]
struct Parsed {
    images: BTreeMap<String, Frame>,
    instruction: String,
    state: Vec<f32>,
    extra: BTreeMap<String, serde_json::Value>,
    seed: Option<u64>,
    deadline_ms: Option<u64>,
}

fn malformed(e: impl std::fmt::Display) -> ApiError {
    ApiError::MalformedMessage(e.to_string())
}

/// Decodes and checks one observation message against `spec` as a session does, computing
/// nothing: what the fuzz target `openpi_message` runs.
pub fn check_observation(message: &Bytes, spec: &ModelSpec) -> Result<(), ApiError> {
    parse(message, spec).map(|_| ())
}

/// Reads an observation: every key the model's sources name; other keys are ignored, as
/// openpi's own server ignores what its transforms do not read.
fn parse(message: &Bytes, spec: &ModelSpec) -> Result<Parsed, ApiError> {
    let value = codec::decode(message).map_err(malformed)?;
    let mut entries: HashMap<String, Item> = HashMap::new();
    for (key, item) in codec::flatten(value).map_err(malformed)? {
        if entries.contains_key(&key) {
            return Err(malformed(format!("key `{}` appears twice", crate::names::clip(&key, 80))));
        }
        entries.insert(key, item);
    }
    let keys = &spec.openpi;
    let mut images = BTreeMap::new();
    for (c, camera) in spec.cameras.iter().enumerate() {
        let key = &keys.cameras[c];
        match entries.remove(key) {
            Some(item) => {
                images.insert(camera.name.clone(), frame(key, item)?);
            }
            None if camera.required => {
                return Err(ApiError::CameraMissing {
                    field: key.clone(),
                    model: spec.name.clone(),
                    camera: camera.name.clone(),
                });
            }
            None => {}
        }
    }
    let mut state = Vec::new();
    for key in &keys.state {
        let item = entries.remove(key).ok_or_else(|| ApiError::InvalidValue {
            field: key.clone(),
            problem: format!("missing: the robot's state ({} values) for model `{}`", spec.state_dim(), spec.name),
        })?;
        let values = codec::numbers(&item).ok_or_else(|| ApiError::InvalidValue {
            field: key.clone(),
            problem: "must be a numeric array or a list of numbers".into(),
        })?;
        state.extend(values.into_iter().map(|v| v as f32));
    }
    let instruction = match entries.remove(&keys.prompt) {
        Some(Item::Value(Value::Str(s))) => s,
        Some(Item::Value(Value::Bin(b))) => String::from_utf8(b.to_vec())
            .map_err(|_| ApiError::InvalidValue { field: keys.prompt.clone(), problem: "must be UTF-8 text".into() })?,
        Some(_) => {
            return Err(ApiError::InvalidValue { field: keys.prompt.clone(), problem: "must be a string".into() });
        }
        None => keys.default_prompt.clone().ok_or_else(|| ApiError::InvalidValue {
            field: keys.prompt.clone(),
            problem: format!("missing: the instruction (model `{}` has no `[openpi] default_prompt`)", spec.name),
        })?,
    };
    let mut extra = BTreeMap::new();
    for (e, x) in spec.extra_inputs.iter().enumerate() {
        let key = &keys.extra[e];
        if let Some(item) = entries.remove(key) {
            let values = codec::numbers(&item).ok_or_else(|| ApiError::InvalidValue {
                field: key.clone(),
                problem: "must be a numeric array, a list of numbers or a number".into(),
            })?;
            let json = values.into_iter().map(serde_json::Value::from).collect();
            extra.insert(x.name.clone(), serde_json::Value::Array(json));
        }
    }
    let integer = |key: &str, entries: &mut HashMap<String, Item>| -> Result<Option<u64>, ApiError> {
        match entries.remove(key) {
            None | Some(Item::Value(Value::Nil)) => Ok(None),
            Some(Item::Value(Value::Int(n))) if n >= 0 => Ok(Some(n as u64)),
            Some(_) => {
                Err(ApiError::InvalidValue { field: key.into(), problem: "must be a non-negative integer".into() })
            }
        }
    };
    let seed = integer("seed", &mut entries)?;
    let deadline_ms = integer("deadline_ms", &mut entries)?;
    Ok(Parsed { images, instruction, state, extra, seed, deadline_ms })
}

/// A camera frame: a `uint8` array `[H, W, 3]` or `[3, H, W]`, or a JPEG/PNG file's bytes.
fn frame(key: &str, item: Item) -> Result<Frame, ApiError> {
    let wrong = |problem: String| ApiError::InvalidValue { field: key.into(), problem };
    match item {
        Item::Value(Value::Bin(bytes)) => Ok(Frame::File(bytes)),
        Item::Array(a) if a.dtype == "|u1" => {
            let (height, width, chw) = match a.shape[..] {
                [h, w, 3] => (h, w, false),
                [3, h, w] => (h, w, true),
                _ => {
                    return Err(wrong(format!(
                        "a uint8 frame must be [height, width, 3] or [3, height, width], got {:?}",
                        a.shape
                    )));
                }
            };
            let (Ok(width32), Ok(height32)) = (u32::try_from(width), u32::try_from(height)) else {
                return Err(wrong(format!("a frame of {width}x{height} pixels")));
            };
            let data = if chw {
                let plane = width * height;
                let mut hwc = vec![0u8; plane * 3];
                for (c, channel) in a.data.chunks_exact(plane.max(1)).enumerate().take(3) {
                    for (i, &v) in channel.iter().enumerate() {
                        hwc[i * 3 + c] = v;
                    }
                }
                Bytes::from(hwc)
            } else {
                a.data
            };
            Ok(Frame::Pixels { width: width32, height: height32, data })
        }
        Item::Array(a) => Err(wrong(format!(
            "frames are uint8 arrays (openpi_client.image_tools.convert_to_uint8) or JPEG/PNG bytes, got dtype `{}`",
            crate::names::clip(&a.dtype, 16)
        ))),
        Item::Value(_) => Err(wrong("a camera frame: a uint8 array [H, W, 3] or [3, H, W], or JPEG/PNG bytes".into())),
    }
}

/// The metadata message a session opens with.
fn metadata(spec: &ModelSpec) -> Vec<u8> {
    let keys = &spec.openpi;
    let mut w = Writer::default();
    w.map(11);
    w.str("server").str("vla-appliance");
    w.str("server_version").str(env!("CARGO_PKG_VERSION"));
    w.str("model").str(&spec.name);
    w.str("model_version").str(&spec.version);
    w.str("cameras").array(spec.cameras.len());
    for c in &spec.cameras {
        w.str(&c.name);
    }
    w.str("state_dim").int(spec.state_dim() as i64);
    w.str("action_horizon").int(spec.action.horizon as i64);
    w.str("action_dof").int(spec.action.dof as i64);
    w.str("action_kind").str(spec.action.kind.as_str());
    w.str("dt_ms");
    match spec.action.dt_ms {
        Some(dt) => w.float(dt),
        None => w.nil(),
    };
    w.str("observation_keys").map(4);
    w.str("cameras").map(spec.cameras.len());
    for (c, camera) in spec.cameras.iter().enumerate() {
        w.str(&camera.name).str(&keys.cameras[c]);
    }
    w.str("state").array(keys.state.len());
    for k in &keys.state {
        w.str(k);
    }
    w.str("prompt").str(&keys.prompt);
    w.str("extra").map(spec.extra_inputs.len());
    for (e, x) in spec.extra_inputs.iter().enumerate() {
        w.str(&x.name).str(&keys.extra[e]);
    }
    w.buf
}

/// The error as the HTTP API would answer it — its JSON body with the `status` and, where the
/// HTTP answer has one, `retry_after_s` — for a text message.
async fn error_text(e: ApiError) -> String {
    let response = e.into_response();
    let status = response.status().as_u16();
    let retry =
        response.headers().get(axum::http::header::RETRY_AFTER).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    let body = axum::body::to_bytes(response.into_body(), 1 << 20).await.unwrap_or_default();
    let mut v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_else(|_| serde_json::json!({}));
    if let Some(map) = v.as_object_mut() {
        map.insert("status".into(), status.into());
        if let Some(r) = retry {
            map.insert("retry_after_s".into(), r.into());
        }
    }
    v.to_string()
}
