//! Monitoring endpoints: `/metrics` (also `/monitoring/metrics`) in Prometheus' text format,
//! and JSON for the console and scripts (admin token): `/health/detailed`, `/gpu/stats`,
//! `/queue/stats`, `/models/stats`.
//!
//! Gauges that describe state (queues, models, quotas, uptime, health) are set here from the
//! live state at each scrape, so the request path maintains none of them.

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use vla_api::{ModelsStats, QueueModel, QueueStats};

use super::state::{AppState, blocking};
use crate::error::ApiError;
use crate::metrics::catch_up;
use crate::model::LIBTORCH_VERSION;

/// `GET /metrics` (and `/monitoring/metrics`): the catalogue, its state gauges refreshed first.
pub async fn metrics(State(app): State<AppState>) -> Result<Response, ApiError> {
    let text = blocking(move || {
        refresh(&app)?;
        app.metrics.render().map_err(ApiError::Internal)
    })
    .await?;
    let mut response = text.into_response();
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"));
    Ok(response)
}

/// Sets the state gauges from the live state. Blocking (reads the robot registry).
fn refresh(app: &AppState) -> Result<(), ApiError> {
    let m = &app.metrics;
    m.uptime.set(app.started.elapsed().as_secs_f64());
    m.application_info.with_label_values(&[env!("CARGO_PKG_VERSION"), LIBTORCH_VERSION]).set(1);
    let serving = app.models.serving();
    m.models_loaded.set(serving.len() as i64);
    m.model_info.reset();
    let (mut workers, mut busy_workers) = (0, 0);
    for model in &serving {
        let name = model.spec.name.as_str();
        let stats = model.batcher.stats();
        m.model_info.with_label_values(&[name, &model.spec.version, &crate::model::device_name(model.device)]).set(1);
        m.queue_depth.with_label_values(&[name]).set(stats.queue_depth as i64);
        m.queue_capacity.with_label_values(&[name]).set(stats.queue_capacity as i64);
        m.queue_utilization.with_label_values(&[name]).set(utilization_percent(&stats));
        for (reason, total) in [
            ("deadline", stats.dropped_deadline),
            ("disconnect", stats.dropped_disconnect),
            ("queue_full", stats.rejected_queue_full),
            ("evicted", stats.evicted),
        ] {
            catch_up(&m.dropped.with_label_values(&[name, reason]), total);
        }
        let instances = model.spec.batching.instances.max(1);
        m.workers_active.with_label_values(&[name]).set(instances as i64);
        workers += instances as i64;
        busy_workers += model.metrics.in_flight.get();
        let wall = model.loaded_at.elapsed().as_nanos() as f64 * instances as f64;
        let busy = model.metrics.busy_ns.load(std::sync::atomic::Ordering::Relaxed) as f64;
        m.worker_utilization.with_label_values(&[name]).set(if wall > 0.0 { busy * 100.0 / wall } else { 0.0 });
    }
    m.worker_total.set(workers);
    m.worker_active.set(busy_workers);
    m.refresh_safety_score();
    catch_up(&m.store_flushes, app.quotas.flushes());
    if let Ok(bytes) = app.store.db().and_then(|db| Ok(db.size_on_disk()?)) {
        m.store_size.set(bytes as i64);
    }
    for (component, healthy) in components(app) {
        m.health.with_label_values(&[component]).set(i64::from(healthy));
    }
    // Quotas of registered robots: bounded by the registry.
    let robots = app.store.robots()?;
    let now = crate::clock::now_ms();
    m.rate_limit_remaining.reset();
    m.quota_usage.reset();
    m.quota_used.reset();
    m.quota_limit.reset();
    for robot in robots.iter().filter(|r| r.revoked_unix_ms.is_none()) {
        let view = crate::quota::robot_view(&app.quotas, robot, now);
        for b in view.buckets.iter().filter(|b| b.scope == "robot") {
            let id = robot.robot_id.as_str();
            m.rate_limit_remaining.with_label_values(&[id, &b.bucket]).set(b.remaining as i64);
            if b.bucket != "rate" {
                m.quota_used.with_label_values(&[id, &b.bucket]).set(b.used as i64);
                m.quota_limit.with_label_values(&[id, &b.bucket]).set(b.limit as i64);
                if b.limit > 0 {
                    m.quota_usage.with_label_values(&[id, &b.bucket]).set(b.used as f64 * 100.0 / b.limit as f64);
                }
            }
        }
    }
    Ok(())
}

/// A queue's depth as a percentage of its capacity.
fn utilization_percent(s: &vla_api::ModelStats) -> f64 {
    if s.queue_capacity == 0 { 0.0 } else { s.queue_depth as f64 * 100.0 / s.queue_capacity as f64 }
}

/// Each component and whether it is healthy.
fn components(app: &AppState) -> [(&'static str, bool); 4] {
    let policies_ok = app.policies.list().iter().all(|p| p.state == "ready" || !p.enabled);
    [
        ("store", app.store.health().ok),
        ("models", app.models.is_serving()),
        ("policy_engine", policies_ok),
        ("gpu", app.gpu.stats().available),
    ]
}

/// `GET /health/detailed`: each component with its status and details.
pub async fn health_detailed(State(app): State<AppState>) -> Response {
    let gpu = app.gpu.stats();
    let policies = app.policies.list();
    let components = components(&app);
    let store = app.store.health();
    let serving = app.models.is_serving();
    let body = json!({
        "status": if app.is_shutting_down() { "shutting_down" } else if !serving { "unavailable" }
                  else if app.models.has_failures() || !components[2].1 { "degraded" } else { "ok" },
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_seconds": app.started.elapsed().as_secs_f64(),
        "components": {
            "store": {
                "status": if store.ok { "ok" } else { "failing" },
                "problem": store.problem,
                "reopened_after_faults": store.reopened,
                "quota_durability": app.quotas.durability().to_string(),
            },
            "models": {"status": if serving { "ok" } else { "unavailable" }, "models": app.models.health()},
            "policy_engine": {
                "status": if components[2].1 { "ok" } else { "degraded" },
                "policies": policies.iter().map(|p| json!({"name": p.name, "state": p.state, "enabled": p.enabled, "mode": p.mode})).collect::<Vec<_>>(),
            },
            "gpu": {"status": if gpu.available { "ok" } else { "unavailable" }, "available": gpu.available, "reason": gpu.reason},
        },
    });
    let status = if serving && !app.is_shutting_down() { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, Json(body)).into_response()
}

pub async fn gpu_stats(State(app): State<AppState>) -> Json<crate::gpu::GpuStats> {
    Json(app.gpu.stats())
}

/// `GET /queue/stats`: per model, queue depth, capacity, utilization and counters.
pub async fn queue_stats(State(app): State<AppState>) -> Json<QueueStats> {
    let models = app
        .models
        .serving()
        .iter()
        .map(|m| {
            let s = m.batcher.stats();
            QueueModel {
                model: m.spec.name.clone(),
                queue_depth: s.queue_depth,
                queue_capacity: s.queue_capacity,
                queue_utilization_percent: utilization_percent(&s),
                max_batch_size: m.spec.max_batch_size,
                workers: m.spec.batching.instances,
                device: crate::model::device_name(m.device),
                batching: m.spec.batching.enabled,
                computed: s.computed,
                batches: s.batches,
                mean_batch_size: if s.batches == 0 { 0.0 } else { s.computed as f64 / s.batches as f64 },
                rejected_queue_full: s.rejected_queue_full + s.evicted,
                dropped_deadline: s.dropped_deadline,
                dropped_disconnect: s.dropped_disconnect,
                failed: s.failed,
            }
        })
        .collect();
    Json(QueueStats { models })
}

/// `GET /models/stats`: the loaded models with device and version.
pub async fn models_stats(State(app): State<AppState>) -> Json<ModelsStats> {
    let models = app.models.serving().iter().map(|m| m.info()).collect();
    Json(ModelsStats { models, health: app.models.health() })
}
