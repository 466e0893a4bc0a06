//! What every handler shares ([`AppState`]), the path parameters extractor ([`Params`]) and
//! the way handlers run blocking work ([`blocking`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::auth::Authenticator;
use super::body::BodyLimits;
use crate::config::Config;
use crate::error::ApiError;
use crate::gpu::GpuMonitor;
use crate::infer::Pipeline;
use crate::metrics::Metrics;
use crate::policy::Policies;
use crate::quota::Quotas;
use crate::repository::Models;
use crate::store::Store;

/// What every handler shares.
#[derive(Debug, Clone)]
pub struct AppState {
    pub config: Arc<Config>,
    pub models: Arc<Models>,
    /// The inference pipeline both inference endpoints run.
    pub pipeline: Arc<Pipeline>,
    /// Set when shutdown begins, so `/health` stops advertising the appliance.
    pub shutting_down: Arc<AtomicBool>,
    /// Decides who each request comes from.
    pub auth: Arc<Authenticator>,
    /// The sled store: the robot registry (and the trees of the policies, audit and quotas).
    pub store: Arc<Store>,
    /// Admission and safety policies, and the audit log.
    pub policies: Arc<Policies>,
    /// The admin change trail.
    pub changes: Arc<crate::changes::Changes>,
    /// Rate limits and quotas the admission policies charge (also `policies.quotas()`).
    pub quotas: Arc<Quotas>,
    /// The metric catalogue `/metrics` renders.
    pub metrics: Arc<Metrics>,
    /// The latest GPU reading.
    pub gpu: Arc<GpuMonitor>,
    /// The open openpi WebSocket sessions.
    pub openpi: Arc<super::sessions::Sessions>,
    /// The open gRPC `ModelStreamInfer` streams (bounded like openpi sessions, counted apart).
    pub streams: Arc<super::sessions::Sessions>,
    pub started: Instant,
}

impl AppState {
    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Relaxed)
    }

    /// 503 at once when shutting down or when no model serves.
    pub fn check_accepting(&self) -> Result<(), ApiError> {
        if self.is_shutting_down() {
            return Err(ApiError::ShuttingDown);
        }
        if !self.models.is_serving() {
            return Err(ApiError::Unavailable);
        }
        Ok(())
    }

    /// `server.body_limit_bytes` within `server.read_timeout_ms`.
    pub fn body_limits(&self) -> BodyLimits {
        BodyLimits {
            max_bytes: self.config.server.body_limit_bytes,
            timeout: Duration::from_millis(self.config.server.read_timeout_ms),
        }
    }
}

/// A route's path parameters. A segment that does not decode (`%FF`) gets the usual JSON
/// error instead of axum's plain-text rejection.
#[derive(Debug)]
pub struct Params(pub std::collections::HashMap<String, String>);

impl Params {
    /// The parameter `name`; empty when the route has none of that name.
    pub fn get(&self, name: &str) -> &str {
        self.0.get(name).map_or("", String::as_str)
    }
}

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for Params {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut axum::http::request::Parts, state: &S) -> Result<Self, ApiError> {
        axum::extract::Path::<std::collections::HashMap<String, String>>::from_request_parts(parts, state)
            .await
            .map(|p| Params(p.0))
            .map_err(|e| ApiError::InvalidField { field: "path".into(), problem: e.body_text() })
    }
}

/// An admin request's body, read within `server.admin_body_limit_bytes` and
/// `server.read_timeout_ms` (413 and 408 beyond them).
#[derive(Debug)]
pub struct AdminBody(pub axum::body::Bytes);

impl axum::extract::FromRequest<AppState> for AdminBody {
    type Rejection = ApiError;

    async fn from_request(request: axum::extract::Request, app: &AppState) -> Result<Self, ApiError> {
        let limits = app.body_limits().with_max_bytes(app.config.server.admin_body_limit_bytes);
        let (parts, body) = request.into_parts();
        super::body::read(&parts.headers, body, limits).await.map(AdminBody)
    }
}

/// Who made an admin change, for the change trail: the admin token's id, the client
/// certificate's names when the connection presented one, and the peer address.
#[derive(Debug, Clone)]
pub struct Actor {
    pub who: String,
    pub peer: Option<String>,
}

impl axum::extract::FromRequestParts<AppState> for Actor {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut axum::http::request::Parts, app: &AppState) -> Result<Self, ApiError> {
        let mut who = app.auth.admin_id();
        if let Some(identity) = parts.extensions.get::<crate::tls::PeerIdentity>() {
            who.push_str(&format!(" (certificate: {})", identity.names.join(", ")));
        }
        let peer = parts.extensions.get::<super::listener::PeerAddr>().map(|p| p.0.to_string());
        Ok(Actor { who, peer })
    }
}

impl Actor {
    /// Records the change in the trail (blocking: call from the blocking pool).
    #[allow(clippy::too_many_arguments)]
    pub fn record(
        &self,
        changes: &crate::changes::Changes,
        seq: u64,
        action: &str,
        target: &str,
        signed_by: Option<String>,
        before: impl serde::Serialize,
        after: impl serde::Serialize,
    ) {
        changes.record(vla_api::AdminChange {
            seq,
            time_unix_ms: crate::clock::now_ms(),
            who: self.who.clone(),
            peer: self.peer.clone(),
            action: action.into(),
            target: target.into(),
            signed_by,
            before: serde_json::to_value(before).unwrap_or_default(),
            after: serde_json::to_value(after).unwrap_or_default(),
        });
    }
}

/// Runs `f` on the blocking pool (store writes that flush, model loads, compiles).
pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| ApiError::Internal(format!("admin task failed: {e}")))?
}
