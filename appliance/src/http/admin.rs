//! The operator's endpoints for robots and models, all behind the admin token (see
//! [`super::auth`]):
//!
//! - `/admin/robots…`: register a robot (its key is answered once and stored only hashed),
//!   list, show, rotate a key, revoke ([`crate::robots`]);
//! - `/v2/repository/…`: the OIP model repository extension (index, load, unload).
//!
//! Store writes flush to disk and model loads warm up: both run on the blocking pool.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use vla_api::{RegisterRobot, Robot, RobotKey, RobotList};

use super::state::{Actor, AdminBody, AppState, Params, blocking};
use crate::error::ApiError;

/// `POST /admin/robots`.
pub async fn register_robot(
    State(app): State<AppState>,
    actor: Actor,
    AdminBody(body): AdminBody,
) -> Result<Response, ApiError> {
    let request: RegisterRobot = crate::validate::parse_json(&body)?;
    let (store, changes) = (app.store.clone(), app.changes.clone());
    let key = blocking(move || {
        let key = crate::robots::register(&store, &request)?;
        actor.record(&changes, 0, "robot.register", &key.robot.robot_id, None, None::<()>, &key.robot);
        Ok(key)
    })
    .await?;
    Ok((StatusCode::CREATED, Json(key)).into_response())
}

/// `GET /admin/robots`.
pub async fn list_robots(State(app): State<AppState>) -> Result<Json<RobotList>, ApiError> {
    let robots = app.store.robots()?;
    Ok(Json(RobotList { robots: robots.iter().map(crate::robots::view).collect() }))
}

/// `GET /admin/robots/{robot_id}`.
pub async fn get_robot(State(app): State<AppState>, params: Params) -> Result<Json<Robot>, ApiError> {
    let robot_id = params.get("robot_id");
    match app.store.robot(robot_id)? {
        Some(r) => Ok(Json(crate::robots::view(&r))),
        None => Err(ApiError::RobotNotFound(crate::names::clip(robot_id, 80))),
    }
}

/// `POST /admin/robots/{robot_id}/rotate-key`: a new key; the old one stops working at once.
pub async fn rotate_key(State(app): State<AppState>, params: Params, actor: Actor) -> Result<Json<RobotKey>, ApiError> {
    let robot_id = params.get("robot_id").to_string();
    let (store, data_dir, changes) = (app.store.clone(), app.config.data.dir.clone(), app.changes.clone());
    blocking(move || {
        let before = store.robot(&robot_id)?.map(|r| crate::robots::view(&r));
        let key = crate::robots::rotate(&store, &data_dir, &robot_id)?;
        let after = store.robot(&robot_id)?.map(|r| crate::robots::view(&r));
        actor.record(&changes, 0, "robot.rotate_key", &robot_id, None, before, after);
        Ok(Json(key))
    })
    .await
}

/// `DELETE /admin/robots/{robot_id}`: revokes; the robot's next request is refused.
pub async fn revoke_robot(State(app): State<AppState>, params: Params, actor: Actor) -> Result<Json<Robot>, ApiError> {
    let robot_id = params.get("robot_id").to_string();
    let (store, data_dir, changes) = (app.store.clone(), app.config.data.dir.clone(), app.changes.clone());
    blocking(move || {
        let before = store.robot(&robot_id)?.map(|r| crate::robots::view(&r));
        let after = crate::robots::revoke(&store, &data_dir, &robot_id)?;
        actor.record(&changes, 0, "robot.revoke", &robot_id, None, before, &after);
        Ok(Json(after))
    })
    .await
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
pub async fn repository_index(State(app): State<AppState>, AdminBody(body): AdminBody) -> Result<Response, ApiError> {
    let request: IndexRequest = if body.iter().all(u8::is_ascii_whitespace) {
        IndexRequest::default()
    } else {
        crate::validate::parse_json(&body)?
    };
    let models = app.models.clone();
    let index = blocking(move || models.index().map_err(|e| ApiError::Internal(e.to_string()))).await?;
    let entries: Vec<IndexEntry> = index
        .into_iter()
        .filter(|e| e.ready || !request.ready)
        .map(|e| IndexEntry {
            name: e.name,
            version: e.version,
            state: if e.ready { "READY" } else { "UNAVAILABLE" },
            reason: e.reason,
        })
        .collect();
    Ok(Json(entries).into_response())
}

/// `POST /v2/repository/models/{model}/load`: loads or reloads; warm before it takes traffic,
/// and a failed load keeps the serving version.
pub async fn load_model(State(app): State<AppState>, params: Params, actor: Actor) -> Result<Response, ApiError> {
    let model = params.get("model").to_string();
    let (models, changes) = (app.models.clone(), app.changes.clone());
    let name = model.clone();
    let loaded = blocking(move || {
        let before = model_view(&models, &name);
        let loaded = models.load_model(&name);
        if loaded.is_ok() {
            actor.record(&changes, 0, "model.load", &name, None, before, model_view(&models, &name));
        }
        Ok(loaded)
    })
    .await?;
    match loaded {
        Ok(m) => {
            Ok(Json(serde_json::json!({"name": m.spec.name, "version": m.spec.version, "state": "READY"}))
                .into_response())
        }
        Err(reason) => Err(ApiError::ModelLoad { model: crate::names::clip(&model, 80), reason }),
    }
}

/// A serving model as the change trail shows it (`None` when it does not serve).
fn model_view(models: &crate::repository::Models, name: &str) -> Option<serde_json::Value> {
    let m = models.resolve(Some(name)).ok()?;
    Some(
        serde_json::json!({"name": m.spec.name, "version": m.spec.version, "device": crate::model::device_name(m.device)}),
    )
}

/// `POST /v2/repository/models/{model}/unload`.
pub async fn unload_model(State(app): State<AppState>, params: Params, actor: Actor) -> Result<Response, ApiError> {
    let model = params.get("model").to_string();
    let (models, changes) = (app.models.clone(), app.changes.clone());
    let name = model.clone();
    blocking(move || {
        let before = model_view(&models, &name);
        models.unload_model(&name)?;
        actor.record(&changes, 0, "model.unload", &name, None, before, None::<()>);
        Ok(())
    })
    .await?;
    Ok(Json(serde_json::json!({"name": model, "state": "UNAVAILABLE"})).into_response())
}
