//! Admin endpoints for quotas (admin token, see [`crate::auth`]):
//!
//! - `GET /admin/quotas`: every registered robot's limits, usage, remaining and reset;
//! - `GET /admin/quotas/{robot_id}`, `PUT` (the robot's override: [`vla_api::QuotaLimits`]);
//! - `POST /admin/quotas/{robot_id}/reset`: forgets the robot's usage (its buckets are full).
//!
//! The store calls are short sled operations (a flush for writes): they run on the blocking
//! pool.

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use vla_api::{QuotaBucket, QuotaLimits, QuotaList, RobotQuota};

use super::{Bucket, Limit, Limits, QuotaError, Quotas, Scope, State as BucketState, bucket};
use crate::admin::{blocking, now_ms};
use crate::error::ApiError;
use crate::server::{AppState, Params};
use crate::store::{RobotRecord, Store};

pub fn routes() -> Vec<(&'static str, axum::routing::MethodRouter<AppState>)> {
    use axum::routing::{get, post};
    vec![
        ("/admin/quotas", get(list)),
        ("/admin/quotas/{robot_id}", get(show).put(put)),
        ("/admin/quotas/{robot_id}/reset", post(reset)),
    ]
}

impl From<QuotaError> for ApiError {
    fn from(e: QuotaError) -> ApiError {
        match e {
            QuotaError::NotDurable(m) => ApiError::QuotaUnavailable(m),
            e => ApiError::Internal(e.to_string()),
        }
    }
}

async fn list(State(app): State<AppState>) -> Result<Json<QuotaList>, ApiError> {
    let (store, quotas) = (app.auth.store().clone(), app.quotas.clone());
    blocking(move || {
        let robots = store.robots().map_err(|e| ApiError::Internal(e.to_string()))?;
        let robots = robots
            .iter()
            .filter(|r| r.revoked_unix_ms.is_none())
            .map(|r| view(&quotas, r))
            .collect::<Result<_, _>>()?;
        Ok(Json(QuotaList { robots }))
    })
    .await
}

async fn show(State(app): State<AppState>, params: Params) -> Result<Json<RobotQuota>, ApiError> {
    let robot_id = params.get("robot_id").to_string();
    let (store, quotas) = (app.auth.store().clone(), app.quotas.clone());
    blocking(move || {
        let robot = registered(&store, &robot_id)?.ok_or_else(|| not_found(&robot_id))?;
        Ok(Json(view(&quotas, &robot)?))
    })
    .await
}

/// `PUT`: replaces the robot's override; `{}` clears it. A field left out falls through to the
/// configuration and then to the policy's defaults.
async fn put(State(app): State<AppState>, params: Params, body: Bytes) -> Result<Json<RobotQuota>, ApiError> {
    let robot_id = params.get("robot_id").to_string();
    let wire: QuotaLimits = crate::validate::parse_json(&body)?;
    let limits =
        Limits::parse(&wire).map_err(|(field, problem)| ApiError::InvalidField { field: field.into(), problem })?;
    let (store, quotas) = (app.auth.store().clone(), app.quotas.clone());
    blocking(move || {
        // Limits for a robot that does not exist are a mistake in the request, not a resource
        // to create: 400 naming the robot.
        let robot = registered(&store, &robot_id)?.ok_or_else(|| ApiError::InvalidField {
            field: "robot_id".into(),
            problem: format!("robot `{}` is not registered", robot_id.chars().take(80).collect::<String>()),
        })?;
        quotas.set_override(Scope::Robot, &robot.robot_id, Some(limits))?;
        tracing::info!(robot = %robot.robot_id, "quota override set: {wire:?}");
        Ok(Json(view(&quotas, &robot)?))
    })
    .await
}

async fn reset(State(app): State<AppState>, params: Params) -> Result<Json<RobotQuota>, ApiError> {
    let robot_id = params.get("robot_id").to_string();
    let (store, quotas) = (app.auth.store().clone(), app.quotas.clone());
    blocking(move || {
        let robot = registered(&store, &robot_id)?.ok_or_else(|| not_found(&robot_id))?;
        quotas.reset(Scope::Robot, &robot.robot_id)?;
        tracing::info!(robot = %robot.robot_id, "quota usage reset");
        Ok(Json(view(&quotas, &robot)?))
    })
    .await
}

fn registered(store: &Store, robot_id: &str) -> Result<Option<RobotRecord>, ApiError> {
    let robot = store.robot(robot_id).map_err(|e| ApiError::Internal(e.to_string()))?;
    Ok(robot.filter(|r| r.revoked_unix_ms.is_none()))
}

fn not_found(robot_id: &str) -> ApiError {
    ApiError::RobotNotFound(robot_id.chars().take(80).collect())
}

/// The robot's and its group's buckets: each bucket with a limit from the admin API or the
/// configuration, or charged before under the policy's limit.
pub fn view(quotas: &Arc<Quotas>, robot: &RobotRecord) -> Result<RobotQuota, ApiError> {
    let now = now_ms();
    let mut buckets = Vec::new();
    for (scope, key) in [(Scope::Robot, &robot.robot_id), (Scope::Group, &robot.group)] {
        let admin = quotas.override_of(scope, key).unwrap_or_default();
        let configured = quotas.configured(scope, key);
        let stored = quotas.stored(scope, key);
        for b in Bucket::ALL {
            let from_state = stored.get(&b).map(|s| match *s {
                BucketState::Rate { rate, .. } => Limit::Rate(rate),
                BucketState::Count { limit, .. } => Limit::Count(limit),
            });
            let (limit, source) = match (admin.get(b), configured.get(b), from_state) {
                (Some(l), _, _) => (l, "admin"),
                (None, Some(l), _) => (l, "config"),
                (None, None, Some(l)) => (l, "policy"),
                (None, None, None) => continue,
            };
            let status = bucket::peek(b, limit, stored.get(&b).copied(), now);
            buckets.push(QuotaBucket {
                scope: scope.as_str().into(),
                bucket: b.as_str().into(),
                limit: status.limit,
                used: status.limit.saturating_sub(status.remaining),
                remaining: status.remaining,
                reset_unix_ms: status.reset_ms,
                source: source.into(),
            });
        }
    }
    Ok(RobotQuota {
        robot_id: robot.robot_id.clone(),
        robot_type: robot.robot_type.clone(),
        group: robot.group.clone(),
        overrides: quotas.override_of(Scope::Robot, &robot.robot_id).unwrap_or_default().wire(),
        configured: quotas.configured(Scope::Robot, &robot.robot_id).wire(),
        buckets,
    })
}
