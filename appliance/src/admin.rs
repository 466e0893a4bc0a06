//! Admin stage: the operator's endpoints, all behind the admin token (see [`crate::auth`]).
//!
//! - `/admin/robots…`: register a robot (its key is answered once and stored only hashed),
//!   list, show, rotate a key, revoke;
//! - `/v2/repository/…`: the OIP model repository extension (index, load, unload).
//!
//! Store writes flush to disk and model loads warm up: both run on the blocking pool.

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use std::path::Path;
use vla_api::{Priority, RegisterRobot, Robot, RobotKey, RobotList};

use crate::auth::{self, AuthError, IssuedKey};
use crate::error::ApiError;
use crate::server::{AppState, Params};
use crate::store::{RobotRecord, Store, StoreError, WriteOutcome};
use crate::validate;

/// The robot registered on a first start with the embedded defaults.
pub const DEMO_ROBOT: &str = "demo-arm";
/// Where the demo robot's key is written, under `data.dir`.
pub const DEMO_KEY_FILE: &str = "demo-robot.key";

pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

fn view(r: &RobotRecord) -> Robot {
    Robot {
        robot_id: r.robot_id.clone(),
        robot_type: r.robot_type.clone(),
        group: r.group.clone(),
        priority: r.priority,
        created_unix_ms: r.created_unix_ms,
        key_created_unix_ms: r.key_created_unix_ms,
        revoked_unix_ms: r.revoked_unix_ms,
    }
}

fn internal(e: impl std::fmt::Display) -> ApiError {
    ApiError::Internal(e.to_string())
}

pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| internal(format!("admin task failed: {e}")))?
}

fn check_name(field: &str, value: &str) -> Result<(), ApiError> {
    if crate::spec::is_valid_name(value) {
        Ok(())
    } else {
        Err(ApiError::InvalidValue {
            field: field.into(),
            problem: format!(
                "`{}` must be 1-64 of [A-Za-z0-9._-], not starting with '.'",
                value.chars().take(80).collect::<String>()
            ),
        })
    }
}

fn issue(robot_id: &str) -> Result<IssuedKey, ApiError> {
    auth::issue_key(robot_id).map_err(internal)
}

/// Registers `request`; the new key is returned once.
pub fn register(store: &Store, request: &RegisterRobot) -> Result<RobotKey, ApiError> {
    check_name("robot_id", &request.robot_id)?;
    check_name("robot_type", &request.robot_type)?;
    check_name("group", &request.group)?;
    let key = issue(&request.robot_id)?;
    let now = now_ms();
    let record = RobotRecord {
        robot_id: request.robot_id.clone(),
        robot_type: request.robot_type.clone(),
        group: request.group.clone(),
        priority: request.priority,
        created_unix_ms: now,
        key_id: Some(key.key_id.clone()),
        key_created_unix_ms: Some(now),
        revoked_unix_ms: None,
    };
    written(store.register(record.clone(), &key.key_id, key.record), &record.robot_id)?;
    tracing::info!(robot_id = %record.robot_id, robot_type = %record.robot_type, "robot registered");
    Ok(RobotKey { robot: view(&record), api_key: key.api_key })
}

/// A store write's outcome as the admin API answers it.
fn written<T>(outcome: Result<WriteOutcome<T>, StoreError>, robot_id: &str) -> Result<T, ApiError> {
    match outcome.map_err(internal)? {
        WriteOutcome::Done(value) => Ok(value),
        WriteOutcome::NotFound => Err(ApiError::RobotNotFound(robot_id.chars().take(80).collect())),
        WriteOutcome::Conflict(why) => Err(ApiError::Conflict(why)),
    }
}

/// `POST /admin/robots`.
async fn register_robot(State(app): State<AppState>, body: Bytes) -> Result<Response, ApiError> {
    let request: RegisterRobot = validate::parse_json(&body)?;
    let store = app.auth.store().clone();
    let key = blocking(move || register(&store, &request)).await?;
    Ok((StatusCode::CREATED, Json(key)).into_response())
}

/// `GET /admin/robots`.
async fn list_robots(State(app): State<AppState>) -> Result<Json<RobotList>, ApiError> {
    let robots = app.auth.store().robots().map_err(internal)?;
    Ok(Json(RobotList { robots: robots.iter().map(view).collect() }))
}

/// `GET /admin/robots/{robot_id}`.
async fn get_robot(State(app): State<AppState>, params: Params) -> Result<Json<Robot>, ApiError> {
    let robot_id = params.get("robot_id").to_string();
    match app.auth.store().robot(&robot_id).map_err(internal)? {
        Some(r) => Ok(Json(view(&r))),
        None => Err(ApiError::RobotNotFound(robot_id.chars().take(80).collect())),
    }
}

/// `POST /admin/robots/{robot_id}/rotate-key`: a new key; the old one stops working at once.
async fn rotate_key(State(app): State<AppState>, params: Params) -> Result<Json<RobotKey>, ApiError> {
    let robot_id = params.get("robot_id").to_string();
    let store = app.auth.store().clone();
    let data_dir = app.config.data.dir.clone();
    blocking(move || {
        let key = issue(&robot_id)?;
        let robot = written(store.rotate(&robot_id, &key.key_id, key.record, now_ms()), &robot_id)?;
        tracing::info!(robot_id = %robot_id, "robot key rotated");
        forget_demo_key(&data_dir, &robot_id);
        Ok(Json(RobotKey { robot: view(&robot), api_key: key.api_key }))
    })
    .await
}

/// `DELETE /admin/robots/{robot_id}`: revokes; the robot's next request is refused.
async fn revoke_robot(State(app): State<AppState>, params: Params) -> Result<Json<Robot>, ApiError> {
    let robot_id = params.get("robot_id").to_string();
    let store = app.auth.store().clone();
    let data_dir = app.config.data.dir.clone();
    blocking(move || {
        let robot = written(store.revoke(&robot_id, now_ms()), &robot_id)?;
        tracing::info!(robot_id = %robot_id, "robot revoked");
        forget_demo_key(&data_dir, &robot_id);
        Ok(Json(view(&robot)))
    })
    .await
}

/// The demo key file must not outlive the key in it.
fn forget_demo_key(data_dir: &Path, robot_id: &str) {
    if robot_id == DEMO_ROBOT {
        let _ = std::fs::remove_file(data_dir.join(DEMO_KEY_FILE));
    }
}

/// On a first start (no robot ever registered), registers [`DEMO_ROBOT`] and writes its key
/// to `<data_dir>/demo-robot.key` (mode 0600). Returns the key file when it did.
pub fn register_demo_robot(store: &Store, data_dir: &Path) -> Result<Option<std::path::PathBuf>, AuthError> {
    if !store.robots()?.is_empty() {
        return Ok(None);
    }
    let request = RegisterRobot {
        robot_id: DEMO_ROBOT.into(),
        robot_type: "demo".into(),
        group: "demo".into(),
        priority: Priority::Normal,
    };
    let key = register(store, &request).map_err(|e| AuthError::Demo(e.to_string()))?;
    let path = data_dir.join(DEMO_KEY_FILE);
    let write = || -> std::io::Result<()> {
        use std::os::unix::fs::OpenOptionsExt;
        // A file left from before keeps its mode when rewritten: replace it instead.
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&path)?;
        std::io::Write::write_all(&mut f, format!("{}\n", key.api_key).as_bytes())
    };
    write().map_err(|e| AuthError::Demo(format!("{}: {e}", path.display())))?;
    Ok(Some(path))
}

/// One entry of `POST /v2/repository/index`.
#[derive(Debug, Serialize)]
struct IndexEntry {
    name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    version: Option<String>,
    state: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct IndexRequest {
    #[serde(default)]
    ready: bool,
}

/// `POST /v2/repository/index`: every model in the repository, `READY` or `UNAVAILABLE`.
async fn repository_index(State(app): State<AppState>, body: Bytes) -> Result<Json<Vec<IndexEntry>>, ApiError> {
    let request: IndexRequest =
        if body.iter().all(u8::is_ascii_whitespace) { IndexRequest::default() } else { validate::parse_json(&body)? };
    let models = app.models.clone();
    let index = blocking(move || models.index().map_err(internal)).await?;
    Ok(Json(
        index
            .into_iter()
            .filter(|e| e.ready || !request.ready)
            .map(|e| IndexEntry {
                name: e.name,
                version: e.version,
                state: if e.ready { "READY" } else { "UNAVAILABLE" },
                reason: e.reason,
            })
            .collect(),
    ))
}

/// `POST /v2/repository/models/{model}/load`: loads or reloads; warm before it takes traffic,
/// and a failed load keeps the serving version.
async fn load_model(State(app): State<AppState>, params: Params) -> Result<Response, ApiError> {
    let model = params.get("model").to_string();
    let models = app.models.clone();
    let name = model.clone();
    let loaded = blocking(move || Ok(models.load_model(&name))).await?;
    match loaded {
        Ok(m) => {
            Ok(Json(serde_json::json!({"name": m.spec.name, "version": m.spec.version, "state": "READY"}))
                .into_response())
        }
        Err(reason) => Err(ApiError::ModelLoad { model: model.chars().take(80).collect(), reason }),
    }
}

/// `POST /v2/repository/models/{model}/unload`.
async fn unload_model(State(app): State<AppState>, params: Params) -> Result<Response, ApiError> {
    let model = params.get("model").to_string();
    let models = app.models.clone();
    let name = model.clone();
    blocking(move || models.unload_model(&name)).await?;
    Ok(Json(serde_json::json!({"name": model, "state": "UNAVAILABLE"})).into_response())
}

/// The admin routes; the server mounts them, [`crate::auth::access_for`] closes them.
pub fn routes() -> Vec<(&'static str, axum::routing::MethodRouter<AppState>)> {
    use axum::routing::{get, post};
    vec![
        ("/admin/robots", get(list_robots).post(register_robot)),
        ("/admin/robots/{robot_id}", get(get_robot).delete(revoke_robot)),
        ("/admin/robots/{robot_id}/rotate-key", post(rotate_key)),
        ("/v2/repository/index", post(repository_index)),
        ("/v2/repository/models/{model}/load", post(load_model)),
        ("/v2/repository/models/{model}/unload", post(unload_model)),
    ]
}
