//! Auth at the edge: who is calling, decided before any handler runs.
//!
//! Every request passes [`guard`], which sorts its path into an [`Access`] class by prefix,
//! so a route added later is closed by default:
//! - `Public`: `/health`, `/v2/health/live`, `/v2/health/ready` and their gRPC twins
//!   (`ServerLive`, `ServerReady`), nothing else;
//! - `Admin`: everything under `/admin/` and the OIP repository extension (`/v2/repository/`,
//!   gRPC `Repository*`), which needs the admin token;
//! - `Caller`: everything else, which needs a robot's API key, a robot's client certificate,
//!   or the admin token (admin may read; only robots get actions, see the handlers).
//!
//! Keys are checked against the registry ([`crate::robots::verify_key`]): every failure
//! answers the same 401 after the same work.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::HeaderMap;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::body;
use crate::config::{ClientAuth, Config};
use crate::error::ApiError;
use crate::fair::PerRobot;
use crate::store::{RobotRecord, Store};
use crate::tls::PeerIdentity;

/// Who may call a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Public,
    Caller,
    Admin,
    /// `/metrics`: the metrics token or the admin token; anyone with `metrics.public = true`.
    Metrics,
}

/// The access class of `path`: the one place that decides it.
pub fn access_for(path: &str) -> Access {
    match path {
        "/health" | "/v2/health/live" | "/v2/health/ready" => Access::Public,
        "/inference.GRPCInferenceService/ServerLive" | "/inference.GRPCInferenceService/ServerReady" => Access::Public,
        _ if path.starts_with("/inference.GRPCInferenceService/Repository") => Access::Admin,
        "/metrics" | "/monitoring/metrics" => Access::Metrics,
        "/health/detailed" | "/gpu/stats" | "/queue/stats" | "/models/stats" => Access::Admin,
        _ if path == "/admin" || path.starts_with("/admin/") => Access::Admin,
        _ if path == "/v2/repository" || path.starts_with("/v2/repository/") => Access::Admin,
        _ => Access::Caller,
    }
}

/// An authenticated caller, put into the request's extensions by [`guard`].
#[derive(Debug, Clone)]
pub enum Caller {
    Admin,
    Robot(Arc<RobotRecord>),
}

impl Caller {
    /// The robot this caller is, for endpoints that hand out actions.
    pub fn robot(&self) -> Result<&RobotRecord, ApiError> {
        match self {
            Caller::Robot(r) => Ok(r),
            Caller::Admin => {
                Err(ApiError::Forbidden("the admin token cannot request actions; use a robot's API key".into()))
            }
        }
    }
}

/// Decides who a request comes from.
#[derive(Debug)]
pub struct Authenticator {
    store: Arc<Store>,
    admin_hash: [u8; 32],
    /// SHA-256 of the metrics token, when `/metrics` needs one.
    metrics_hash: Option<[u8; 32]>,
    client_names: BTreeMap<String, String>,
    client_auth: ClientAuth,
    /// How much of a refused request's body is read before answering (see [`guard`]).
    refused_body_bytes: usize,
    /// Each robot's requests in flight (`limits.max_in_flight_per_robot`).
    in_flight: Arc<PerRobot>,
}

impl Authenticator {
    pub fn new(
        config: &Config,
        store: Arc<Store>,
        admin_hash: [u8; 32],
        metrics_hash: Option<[u8; 32]>,
    ) -> Authenticator {
        Authenticator {
            store,
            admin_hash,
            metrics_hash,
            client_names: config.tls.client_names.clone(),
            client_auth: config.tls.client_auth,
            refused_body_bytes: config.server.refused_body_bytes,
            in_flight: PerRobot::new(config.limits.max_in_flight_per_robot),
        }
    }

    /// Whether the request may read `/metrics`: with no metrics token configured, anyone; else
    /// the metrics token or the admin token as `Authorization: Bearer`.
    fn may_scrape(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        let Some(metrics_hash) = &self.metrics_hash else { return Ok(()) };
        let token = presented_token(headers)?
            .ok_or_else(|| ApiError::Unauthorized("/metrics needs `Authorization: Bearer <metrics token>`".into()))?;
        let hash = Sha256::digest(token.as_bytes());
        if bool::from(hash.ct_eq(metrics_hash)) || bool::from(hash.ct_eq(&self.admin_hash)) {
            Ok(())
        } else {
            Err(ApiError::Unauthorized("the metrics token is not valid".into()))
        }
    }

    /// The caller of a request from its headers and its connection's client certificate.
    ///
    /// The admin token wins. A robot may send a key, present a certificate, or both; with both,
    /// they must name the same robot. A certificate that maps to no registered robot is refused
    /// unless a valid key comes with it. With `client_auth = required`, a robot needs a
    /// certificate.
    /// The admin token's id in the change trail: `admin-token:` and the first 8 hex digits of
    /// its SHA-256 (which tells tokens apart across a rotation and gives nothing away).
    pub fn admin_id(&self) -> String {
        format!("admin-token:{}", crate::store::hex(&self.admin_hash[..4]))
    }

    pub fn authenticate(&self, headers: &HeaderMap, peer: Option<&PeerIdentity>) -> Result<Caller, ApiError> {
        let token = presented_token(headers)?;
        if let Some(token) = token
            && bool::from(Sha256::digest(token.as_bytes()).ct_eq(&self.admin_hash))
        {
            return Ok(Caller::Admin);
        }
        let by_key = match token {
            Some(t) => Some(crate::robots::verify_key(&self.store, t)?.ok_or_else(invalid_key)?),
            None => None,
        };
        let by_cert = peer.map(|p| self.robot_of_certificate(p));
        let robot = match (by_cert, by_key) {
            (Some(Ok(c)), Some(k)) if c.robot_id != k.robot_id => {
                return Err(ApiError::Forbidden(
                    "the API key and the client certificate belong to different robots".into(),
                ));
            }
            (Some(Ok(c)), _) => c,
            (_, Some(_)) if self.client_auth == ClientAuth::Required => {
                return Err(ApiError::Unauthorized(
                    "this appliance requires robots to authenticate with a client certificate".into(),
                ));
            }
            (_, Some(k)) => k,
            (Some(Err(e)), None) => return Err(e),
            (None, None) if self.client_auth == ClientAuth::Required => {
                return Err(ApiError::Unauthorized("a client certificate is required".into()));
            }
            (None, None) => {
                return Err(ApiError::Unauthorized(
                    "credentials required: send `X-API-Key: <key>` or `Authorization: Bearer <key>`".into(),
                ));
            }
        };
        Ok(Caller::Robot(Arc::new(robot)))
    }

    fn robot_of_certificate(&self, peer: &PeerIdentity) -> Result<RobotRecord, ApiError> {
        let robot_id = peer.names.iter().find_map(|n| self.client_names.get(n));
        let robot = match robot_id {
            Some(id) => self.store.robot(id)?,
            None => None,
        };
        robot.filter(|r| r.revoked_unix_ms.is_none()).ok_or_else(|| {
            ApiError::Unauthorized(
                "the client certificate is not mapped to a registered robot (tls.client_names)".into(),
            )
        })
    }
}

fn invalid_key() -> ApiError {
    ApiError::Unauthorized("invalid API key".into())
}

/// The token of `X-API-Key` or `Authorization: Bearer`; both present must agree.
fn presented_token(headers: &HeaderMap) -> Result<Option<&str>, ApiError> {
    let malformed = |h: &str| ApiError::Unauthorized(format!("header `{h}` is malformed"));
    let api_key = match headers.get("x-api-key") {
        Some(v) => Some(v.to_str().map_err(|_| malformed("X-API-Key"))?.trim()),
        None => None,
    };
    let bearer = match headers.get(axum::http::header::AUTHORIZATION) {
        Some(v) => {
            let v = v.to_str().map_err(|_| malformed("Authorization"))?.trim();
            match v.split_once(' ') {
                // `Api-Key` is how openpi's client sends its key.
                Some((scheme, token))
                    if scheme.eq_ignore_ascii_case("bearer") || scheme.eq_ignore_ascii_case("api-key") =>
                {
                    Some(token.trim())
                }
                _ => {
                    return Err(ApiError::Unauthorized(
                        "`Authorization` must be `Bearer <key>` or `Api-Key <key>`".into(),
                    ));
                }
            }
        }
        None => None,
    };
    match (api_key, bearer) {
        (Some(a), Some(b)) if a != b => {
            Err(ApiError::Unauthorized("`X-API-Key` and `Authorization` carry different keys".into()))
        }
        (Some(t), _) | (None, Some(t)) if t.is_empty() => Err(ApiError::Unauthorized("empty API key".into())),
        (Some(t), _) | (None, Some(t)) => Ok(Some(t)),
        (None, None) => Ok(None),
    }
}

/// The middleware in front of every route: see the module header.
pub async fn guard(State(auth): State<Arc<Authenticator>>, mut request: Request, next: Next) -> Response {
    let access = access_for(request.uri().path());
    if access == Access::Public {
        return next.run(request).await;
    }
    let refusal = if access == Access::Metrics {
        match auth.may_scrape(request.headers()) {
            Ok(()) => return next.run(request).await,
            Err(e) => e,
        }
    } else {
        match (access, auth.authenticate(request.headers(), request.extensions().get::<PeerIdentity>())) {
            (_, Err(e)) => e,
            (Access::Admin, Ok(Caller::Robot(_))) => ApiError::Forbidden("this endpoint needs the admin token".into()),
            (_, Ok(Caller::Robot(robot))) => match auth.in_flight.enter(&robot.robot_id) {
                // Counted in until the answer is ready.
                Some(_entered) => {
                    request.extensions_mut().insert(Caller::Robot(robot));
                    return next.run(request).await;
                }
                None => ApiError::TooManyInFlight { robot: robot.robot_id.clone(), limit: auth.in_flight.max() },
            },
            (_, Ok(caller)) => {
                request.extensions_mut().insert(caller);
                return next.run(request).await;
            }
        }
    };
    refuse(request, refusal, auth.refused_body_bytes).await
}

/// Answers a request refused before its handler: a small body is read first (a client still
/// sending it would otherwise see a reset instead of the answer); a large one is left unread
/// and the connection closed, so a refused request costs its sender, not the appliance. A gRPC
/// request gets a gRPC status (its HTTP/2 stream ends with it; nothing is read).
pub async fn refuse(request: Request, refusal: ApiError, refused_body_bytes: usize) -> Response {
    if is_grpc(request.headers()) {
        return refusal.into_grpc_response();
    }
    let version = request.version();
    let (parts, body) = request.into_parts();
    let read = body::discard(&parts.headers, body, refused_body_bytes).await;
    let mut response = refusal.into_response();
    if !read {
        body::close_after(version, &mut response);
    }
    response
}

/// Whether a request is gRPC (`content-type: application/grpc[+proto]`).
pub fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_path_is_closed_unless_listed_public() {
        assert_eq!(access_for("/health"), Access::Public);
        assert_eq!(access_for("/v2/health/ready"), Access::Public);
        assert_eq!(access_for("/v2/health/ready/"), Access::Caller);
        assert_eq!(access_for("/v2"), Access::Caller);
        assert_eq!(access_for("/v1/inference"), Access::Caller);
        assert_eq!(access_for("/admin"), Access::Admin);
        assert_eq!(access_for("/admin/robots/x"), Access::Admin);
        assert_eq!(access_for("/v2/repository/index"), Access::Admin);
        assert_eq!(access_for("/something/new"), Access::Caller);
        assert_eq!(access_for("/inference.GRPCInferenceService/ServerLive"), Access::Public);
        assert_eq!(access_for("/inference.GRPCInferenceService/ModelInfer"), Access::Caller);
        assert_eq!(access_for("/inference.GRPCInferenceService/RepositoryModelLoad"), Access::Admin);
    }
}
