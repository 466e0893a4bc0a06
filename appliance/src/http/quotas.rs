//! Admin endpoints for quotas (admin token, see [`super::auth`]):
//!
//! - `GET /admin/quotas`: every registered robot's limits, usage, remaining and reset;
//! - `GET /admin/quotas/{robot_id}`, `PUT` (the robot's override: [`vla_api::QuotaLimits`]);
//! - `POST /admin/quotas/{robot_id}/reset`: forgets the robot's usage (its buckets are full).
//!
//! The store calls are short sled operations (a flush for writes): they run on the blocking
//! pool.

use axum::Json;
use axum::extract::State;
use vla_api::{QuotaLimits, QuotaList, RobotQuota};

use super::state::{Actor, AdminBody, AppState, Params, blocking};
use crate::clock::now_ms;
use crate::error::ApiError;
use crate::quota::{Limits, Scope, robot_view};
use crate::store::{RobotRecord, Store};

pub async fn list(State(app): State<AppState>) -> Result<Json<QuotaList>, ApiError> {
    let (store, quotas) = (app.store.clone(), app.quotas.clone());
    blocking(move || {
        let now = now_ms();
        let robots = store
            .robots()?
            .iter()
            .filter(|r| r.revoked_unix_ms.is_none())
            .map(|r| robot_view(&quotas, r, now))
            .collect();
        Ok(Json(QuotaList { robots }))
    })
    .await
}

pub async fn show(State(app): State<AppState>, params: Params) -> Result<Json<RobotQuota>, ApiError> {
    let robot_id = params.get("robot_id").to_string();
    let (store, quotas) = (app.store.clone(), app.quotas.clone());
    blocking(move || {
        let robot = registered(&store, &robot_id)?.ok_or_else(|| not_found(&robot_id))?;
        Ok(Json(robot_view(&quotas, &robot, now_ms())))
    })
    .await
}

/// `PUT`: replaces the robot's override; `{}` clears it. A field left out falls through to the
/// configuration and then to the policy's defaults.
pub async fn put(
    State(app): State<AppState>,
    params: Params,
    actor: Actor,
    AdminBody(body): AdminBody,
) -> Result<Json<RobotQuota>, ApiError> {
    let robot_id = params.get("robot_id").to_string();
    let wire: QuotaLimits = crate::validate::parse_json(&body)?;
    let limits =
        Limits::parse(&wire).map_err(|(field, problem)| ApiError::InvalidField { field: field.into(), problem })?;
    let (store, quotas, changes) = (app.store.clone(), app.quotas.clone(), app.changes.clone());
    blocking(move || {
        // Limits for a robot that does not exist are a mistake in the request, not a resource
        // to create: 400 naming the robot.
        let robot = registered(&store, &robot_id)?.ok_or_else(|| ApiError::InvalidField {
            field: "robot_id".into(),
            problem: format!("robot `{}` is not registered", crate::names::clip(&robot_id, 80)),
        })?;
        let before = robot_view(&quotas, &robot, now_ms());
        quotas.set_override(Scope::Robot, &robot.robot_id, Some(limits))?;
        let after = robot_view(&quotas, &robot, now_ms());
        actor.record(&changes, 0, "quota.set", &robot.robot_id, None, &before, &after);
        Ok(Json(after))
    })
    .await
}

pub async fn reset(State(app): State<AppState>, params: Params, actor: Actor) -> Result<Json<RobotQuota>, ApiError> {
    let robot_id = params.get("robot_id").to_string();
    let (store, quotas, changes) = (app.store.clone(), app.quotas.clone(), app.changes.clone());
    blocking(move || {
        let robot = registered(&store, &robot_id)?.ok_or_else(|| not_found(&robot_id))?;
        let before = robot_view(&quotas, &robot, now_ms());
        quotas.reset(Scope::Robot, &robot.robot_id)?;
        let after = robot_view(&quotas, &robot, now_ms());
        actor.record(&changes, 0, "quota.reset", &robot.robot_id, None, &before, &after);
        Ok(Json(after))
    })
    .await
}

fn registered(store: &Store, robot_id: &str) -> Result<Option<RobotRecord>, ApiError> {
    let robot = store.robot(robot_id)?;
    Ok(robot.filter(|r| r.revoked_unix_ms.is_none()))
}

fn not_found(robot_id: &str) -> ApiError {
    ApiError::RobotNotFound(crate::names::clip(robot_id, 80))
}
