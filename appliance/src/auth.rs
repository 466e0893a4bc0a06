//! Auth stage: who is calling, decided before any handler runs.
//!
//! Every request passes [`guard`], which sorts its path into an [`Access`] class by prefix,
//! so a route added later is closed by default:
//! - `Public`: `/health`, `/v2/health/live`, `/v2/health/ready`, nothing else;
//! - `Admin`: everything under `/admin/` and the OIP repository extension (`/v2/repository/`),
//!   which needs the admin token;
//! - `Caller`: everything else, which needs a robot's API key, a robot's client certificate,
//!   or the admin token (admin may read; only robots get actions, see the handlers).
//!
//! Robot keys look like `vlak_<key id>_<secret>`. Only `SHA-256(salt ‖ secret)` is stored
//! ([`crate::store`]); the secret carries 256 random bits, so a fast hash is enough (a slow
//! password hash would only add latency to every robot request). Every failure answers the
//! same 401 after the same work: an unknown key id is hashed against a dummy record, so neither
//! the answer nor its timing tells whether a key or a robot exists.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::HeaderMap;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use base64::Engine;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::config::{ClientAuth, Config};
use crate::error::ApiError;
use crate::store::{KeyRecord, RobotRecord, Store, StoreError};

const KEY_PREFIX: &str = "vlak_";
const ADMIN_PREFIX: &str = "vlaadm_";
const KEY_ID_HEX: usize = 16;

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

/// The verified client certificate of a TLS connection, put into each request's extensions by
/// the accept loop: the certificate's subject common names and DNS/URI subject alternative names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerIdentity {
    pub names: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("token file {}: {problem}", path.display())]
    AdminToken { path: PathBuf, problem: String },
    #[error("{0}")]
    Random(String),
    #[error("demo robot: {0}")]
    Demo(String),
    #[error(transparent)]
    Store(#[from] StoreError),
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
    drain_limit: usize,
    drain_timeout: std::time::Duration,
}

/// A freshly issued API key: the full key (shown once) and what is stored of it.
#[derive(Debug)]
pub struct IssuedKey {
    pub api_key: String,
    pub key_id: String,
    pub record: KeyRecord,
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
            drain_limit: config.server.body_limit_bytes,
            drain_timeout: std::time::Duration::from_millis(config.server.read_timeout_ms),
        }
    }

    pub fn store(&self) -> &Arc<Store> {
        &self.store
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
    pub fn authenticate(&self, headers: &HeaderMap, peer: Option<&PeerIdentity>) -> Result<Caller, ApiError> {
        let token = presented_token(headers)?;
        if let Some(token) = token
            && bool::from(Sha256::digest(token.as_bytes()).ct_eq(&self.admin_hash))
        {
            return Ok(Caller::Admin);
        }
        let by_key = match token {
            Some(t) => Some(self.verify_key(t)?.ok_or_else(invalid_key)?),
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

    /// The robot whose key this is, if it is one: always hashes once, found or not.
    fn verify_key(&self, token: &str) -> Result<Option<RobotRecord>, ApiError> {
        let (key_id, secret) = split_key(token).unwrap_or(("", token));
        let stored = if key_id.is_empty() { None } else { self.store.key(key_id).map_err(store_error)? };
        let (salt, expected) = match &stored {
            Some(k) => (k.salt, k.hash),
            None => ([0u8; 16], [0xffu8; 32]),
        };
        let matches = bool::from(hash_secret(&salt, secret).ct_eq(&expected));
        let Some(key) = stored.filter(|_| matches) else { return Ok(None) };
        let robot = self.store.robot(&key.robot_id).map_err(store_error)?;
        Ok(robot.filter(|r| r.revoked_unix_ms.is_none() && r.key_id.as_deref() == Some(key_id)))
    }

    fn robot_of_certificate(&self, peer: &PeerIdentity) -> Result<RobotRecord, ApiError> {
        let robot_id = peer.names.iter().find_map(|n| self.client_names.get(n));
        let robot = match robot_id {
            Some(id) => self.store.robot(id).map_err(store_error)?,
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

fn store_error(e: StoreError) -> ApiError {
    ApiError::Internal(e.to_string())
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
                Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") => Some(token.trim()),
                _ => return Err(ApiError::Unauthorized("`Authorization` must be `Bearer <key>`".into())),
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

/// `vlak_<16 hex>_<secret>` → (key id, secret).
fn split_key(key: &str) -> Option<(&str, &str)> {
    let rest = key.strip_prefix(KEY_PREFIX)?;
    let (id, secret) = (rest.get(..KEY_ID_HEX)?, rest.get(KEY_ID_HEX..)?.strip_prefix('_')?);
    (id.bytes().all(|b| b.is_ascii_hexdigit()) && !secret.is_empty()).then_some((id, secret))
}

fn hash_secret(salt: &[u8; 16], secret: &str) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(salt);
    h.update(secret.as_bytes());
    h.finalize().into()
}

fn random<const N: usize>() -> Result<[u8; N], AuthError> {
    let mut bytes = [0u8; N];
    getrandom::getrandom(&mut bytes).map_err(|e| AuthError::Random(format!("no system randomness: {e}")))?;
    Ok(bytes)
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// A new key for `robot_id`: 64 random bits of id, 256 of secret, 128 of salt.
pub fn issue_key(robot_id: &str) -> Result<IssuedKey, AuthError> {
    let key_id = crate::store::hex(&random::<8>()?);
    let secret = b64(&random::<32>()?);
    let salt = random::<16>()?;
    let hash = hash_secret(&salt, &secret);
    Ok(IssuedKey {
        api_key: format!("{KEY_PREFIX}{key_id}_{secret}"),
        key_id,
        record: KeyRecord { robot_id: robot_id.into(), salt, hash },
    })
}

/// Reads the admin token from `path`, generating it (mode 0600) on first start. Refuses a file
/// others can read, or a token too short to be a secret. Returns the token's SHA-256 (all that
/// is kept in memory) and whether it was generated now.
pub fn admin_token(path: &Path) -> Result<([u8; 32], bool), AuthError> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let err = |problem: String| AuthError::AdminToken { path: path.into(), problem };
    let generated = !path.exists();
    if generated {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| err(e.to_string()))?;
        }
        let token = format!("{ADMIN_PREFIX}{}", b64(&random::<32>()?));
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| err(e.to_string()))?;
        std::io::Write::write_all(&mut file, format!("{token}\n").as_bytes()).map_err(|e| err(e.to_string()))?;
    }
    let meta = std::fs::metadata(path).map_err(|e| err(e.to_string()))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(err(format!("is readable by others (mode {mode:o}); `chmod 600` it")));
    }
    let token = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    let token = token.trim();
    if token.len() < 32 {
        return Err(err("the token must be at least 32 characters".into()));
    }
    Ok((Sha256::digest(token.as_bytes()).into(), generated))
}

/// The middleware in front of every route: see the module header.
pub async fn guard(State(auth): State<Arc<Authenticator>>, mut request: Request, next: Next) -> Response {
    let access = access_for(request.uri().path());
    if access == Access::Public {
        return next.run(request).await;
    }
    if access == Access::Metrics {
        return match auth.may_scrape(request.headers()) {
            Ok(()) => next.run(request).await,
            Err(e) => e.into_response(),
        };
    }
    let caller = auth.authenticate(request.headers(), request.extensions().get::<PeerIdentity>());
    let refusal = match (access, caller) {
        (_, Err(e)) => e,
        (Access::Admin, Ok(Caller::Robot(_))) => ApiError::Forbidden("this endpoint needs the admin token".into()),
        (_, Ok(caller)) => {
            request.extensions_mut().insert(caller);
            return next.run(request).await;
        }
    };
    // A client still sending its body would otherwise see a reset instead of this answer.
    crate::server::drain(request.into_body(), auth.drain_limit, auth.drain_timeout).await;
    refusal.into_response()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
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
    }

    #[test]
    fn issued_keys_verify_only_with_their_own_secret() {
        let issued = issue_key("arm-1").unwrap();
        let (id, secret) = split_key(&issued.api_key).unwrap();
        assert_eq!(id, issued.key_id);
        assert_eq!(hash_secret(&issued.record.salt, secret), issued.record.hash);
        assert_ne!(hash_secret(&issued.record.salt, "other"), issued.record.hash);
        // What is stored holds no trace of the secret.
        let stored = serde_json::to_string(&issued.record).unwrap();
        assert!(!stored.contains(secret), "{stored}");
    }

    #[test]
    fn malformed_keys_do_not_split() {
        assert_eq!(split_key("vlak_0123456789abcdef_s3cret"), Some(("0123456789abcdef", "s3cret")));
        assert_eq!(split_key("vlak_0123456789abcdef_"), None);
        assert_eq!(split_key("vlak_0123456789abcdeg_x"), None);
        assert_eq!(split_key("vlak_short"), None);
        assert_eq!(split_key("bearer-token"), None);
        assert_eq!(split_key("vlak_é123456789abcdef_x"), None);
    }

    #[test]
    fn the_admin_token_is_generated_private_and_refused_when_world_readable() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("admin.token");
        let (hash, generated) = admin_token(&path).unwrap();
        assert!(generated);
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(admin_token(&path).unwrap(), (hash, false));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(admin_token(&path).unwrap_err().to_string().contains("chmod 600"));
    }
}
