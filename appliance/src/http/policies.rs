//! Admin endpoints for policies and the audit log (admin token, see [`super::auth`]):
//!
//! - `POST /admin/policies` (multipart): upload a component with its metadata;
//! - `GET /admin/policies`, `GET|PATCH|DELETE /admin/policies/{name}`;
//! - `GET /admin/audit?robot_id=&policy=&decision=&since_unix_ms=&limit=`;
//! - `POST /admin/policies/{name}/replay`: a candidate against the replay ring;
//! - `GET /admin/changes?target=&action=&since_unix_ms=&limit=`: the admin change trail.
//!
//! Changes compile and dry-run the policy: they run on the blocking pool. With
//! `policy.trusted_keys` set, a patch or delete carries its signature in the
//! `x-vla-signature` header (base64), an upload in its `signature` field
//! ([`crate::policy::change_description`] says what is signed).

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::{FromRequest, Multipart, Query, Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use sha2::Digest;
use vla_api::{AuditList, PolicyList, PolicyPatch};

use super::body;
use super::state::{Actor, AdminBody, AppState, Params, blocking};
use crate::error::ApiError;
use crate::names::clip;
use crate::policy::audit::{self, DEFAULT_LIMIT, MAX_LIMIT};
use crate::policy::{Mode, Proof, Upload, World};
use crate::store::hex;

/// The header that carries a patch's or a delete's signature.
pub const SIGNATURE_HEADER: &str = "x-vla-signature";

/// Room for the multipart framing and metadata fields around the component.
const UPLOAD_OVERHEAD_BYTES: usize = 1024 * 1024;

pub async fn list(State(app): State<AppState>) -> Json<PolicyList> {
    Json(PolicyList { policies: app.policies.list() })
}

pub async fn show(State(app): State<AppState>, params: Params) -> Result<Response, ApiError> {
    let name = params.get("name");
    app.policies.get(name).map(|p| Json(p).into_response()).ok_or_else(|| ApiError::PolicyNotFound(clip(name, 80)))
}

/// `POST /admin/policies`: multipart fields `name`, `world`, `component` (the `.wasm`),
/// optional `config` (JSON object or TOML table), `order`, `mode`, `enabled`, `signature`
/// (base64, or the raw 64 bytes, of an ed25519 signature over the change's description, or
/// over the component alone when no other field is set). 201 for a new policy, 200 for a new
/// version.
pub async fn upload(State(app): State<AppState>, actor: Actor, request: Request) -> Result<Response, ApiError> {
    let (parts, body) = request.into_parts();
    let limit = app.config.policy.max_component_bytes + UPLOAD_OVERHEAD_BYTES;
    let body = body::read(&parts.headers, body, app.body_limits().with_max_bytes(limit)).await?;
    let upload = parse_upload(parts, body).await?;
    let (policies, changes) = (app.policies.clone(), app.changes.clone());
    let changed = blocking(move || {
        let name = upload.name.clone();
        let changed = policies.upload(upload)?;
        actor.record(
            &changes,
            changed.revision,
            "policy.upload",
            &name,
            changed.signed_by.clone(),
            &changed.before,
            &changed.info,
        );
        Ok(changed)
    })
    .await?;
    let status = if changed.before.is_none() { StatusCode::CREATED } else { StatusCode::OK };
    Ok((status, Json(changed.info)).into_response())
}

/// The upload in a multipart body already read whole (`parts` carries its content type).
pub async fn parse_upload(parts: axum::http::request::Parts, body: Bytes) -> Result<Upload, ApiError> {
    let multipart = Multipart::from_request(Request::from_parts(parts, Body::from(body)), &())
        .await
        .map_err(|e| ApiError::InvalidField { field: "body".into(), problem: e.body_text() })?;
    read_upload(multipart).await
}

async fn read_upload(multipart: Multipart) -> Result<Upload, ApiError> {
    read_fields(multipart, true).await
}

/// The fields of an upload form; `name` may be left out when the path names the policy.
async fn read_fields(mut multipart: Multipart, require_name: bool) -> Result<Upload, ApiError> {
    let mut upload = Upload::default();
    let mut seen = std::collections::HashSet::new();
    let mut component = false;
    let invalid = |field: &str, problem: String| ApiError::InvalidField { field: field.into(), problem };
    while let Some(field) = multipart
        .next_field()
        .await
        .map_err(|e| ApiError::InvalidField { field: "body".into(), problem: e.body_text() })?
    {
        let name = field.name().unwrap_or("").to_string();
        let file_name = field.file_name().map(str::to_string);
        let bytes: Bytes = field.bytes().await.map_err(|e| invalid(&name, e.body_text()))?;
        if !seen.insert(name.clone()) {
            return Err(invalid(&name, "given more than once".into()));
        }
        let text =
            || std::str::from_utf8(&bytes).map(str::trim).map_err(|_| invalid(&name, "must be UTF-8 text".into()));
        match name.as_str() {
            "name" => upload.name = text()?.to_string(),
            "world" => upload.world = Some(text()?.parse::<World>().map_err(|p| invalid(&name, p))?),
            "mode" => upload.mode = Some(text()?.parse::<Mode>().map_err(|p| invalid(&name, p))?),
            "order" => {
                upload.order = Some(text()?.parse::<i64>().map_err(|e| invalid(&name, format!("not an integer: {e}")))?)
            }
            "enabled" => {
                upload.enabled = Some(match text()? {
                    "true" => true,
                    "false" => false,
                    other => return Err(invalid(&name, format!("must be `true` or `false`, got `{}`", short(other)))),
                })
            }
            "config" => {
                upload.config_sha256 = Some(hex(&sha2::Sha256::digest(&bytes)));
                upload.config = Some(parse_config(text()?, file_name.as_deref()).map_err(|p| invalid(&name, p))?)
            }
            "signature" => upload.signature = Some(parse_signature(&bytes).map_err(|p| invalid(&name, p))?),
            "component" => {
                component = true;
                upload.bytes = bytes.to_vec();
            }
            other => {
                return Err(invalid(
                    other,
                    "unknown field; expected name, world, component, config, order, mode, enabled, signature".into(),
                ));
            }
        }
    }
    if upload.name.is_empty() && require_name {
        return Err(invalid("name", "required".into()));
    }
    if !component {
        return Err(invalid("component", "required: the policy's .wasm component".into()));
    }
    Ok(upload)
}

/// A policy's configuration: a JSON object, or a TOML table (converted to JSON).
fn parse_config(text: &str, file_name: Option<&str>) -> Result<serde_json::Value, String> {
    let toml_file = file_name.is_some_and(|f| f.ends_with(".toml"));
    if !toml_file && let Ok(value) = serde_json::from_str::<serde_json::Value>(text) {
        return if value.is_object() { Ok(value) } else { Err("must be a JSON object or a TOML table".into()) };
    }
    match toml::from_str::<toml::Table>(text) {
        Ok(table) => serde_json::to_value(table).map_err(|e| format!("TOML cannot be converted to JSON: {e}")),
        Err(toml_err) => match serde_json::from_str::<serde_json::Value>(text) {
            Err(json_err) if !toml_file => Err(format!("neither JSON ({json_err}) nor TOML ({})", toml_err.message())),
            _ => Err(format!("not TOML: {}", toml_err.message())),
        },
    }
}

fn parse_signature(bytes: &[u8]) -> Result<Vec<u8>, String> {
    use base64::Engine;
    if bytes.len() == 64 {
        return Ok(bytes.to_vec());
    }
    let text = std::str::from_utf8(bytes).map_err(|_| "must be base64 or the raw 64-byte signature".to_string())?;
    let raw = base64::engine::general_purpose::STANDARD.decode(text.trim()).map_err(|e| format!("not base64: {e}"))?;
    if raw.len() != 64 {
        return Err(format!("an ed25519 signature is 64 bytes, got {}", raw.len()));
    }
    Ok(raw)
}

fn short(s: &str) -> String {
    clip(s, 40)
}

/// The `x-vla-signature` header, when sent.
fn header_signature(headers: &axum::http::HeaderMap) -> Result<Option<Vec<u8>>, ApiError> {
    let invalid = |problem: String| ApiError::InvalidField { field: SIGNATURE_HEADER.into(), problem };
    headers.get(SIGNATURE_HEADER).map(|v| parse_signature(v.as_bytes()).map_err(invalid)).transpose()
}

pub async fn patch(
    State(app): State<AppState>,
    params: Params,
    actor: Actor,
    headers: axum::http::HeaderMap,
    AdminBody(body): AdminBody,
) -> Result<Response, ApiError> {
    let patch: PolicyPatch = crate::validate::parse_json(&body)?;
    let proof = Proof { signature: header_signature(&headers)?, body_sha256: hex(&sha2::Sha256::digest(&body)) };
    let name = params.get("name").to_string();
    let (policies, changes) = (app.policies.clone(), app.changes.clone());
    let changed = blocking(move || {
        let changed = policies.patch(&name, patch, &proof)?;
        actor.record(
            &changes,
            changed.revision,
            "policy.patch",
            &name,
            changed.signed_by.clone(),
            &changed.before,
            &changed.info,
        );
        Ok(changed)
    })
    .await?;
    Ok(Json(changed.info).into_response())
}

pub async fn delete(
    State(app): State<AppState>,
    params: Params,
    actor: Actor,
    headers: axum::http::HeaderMap,
) -> Result<Response, ApiError> {
    let proof = Proof { signature: header_signature(&headers)?, body_sha256: String::new() };
    let name = params.get("name").to_string();
    let (policies, changes) = (app.policies.clone(), app.changes.clone());
    blocking(move || {
        let changed = policies.delete(&name, &proof)?;
        actor.record(
            &changes,
            changed.revision,
            "policy.delete",
            &name,
            changed.signed_by,
            &changed.before,
            None::<()>,
        );
        Ok(())
    })
    .await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// `POST /admin/policies/{name}/replay`'s query string (a multipart body's replay settings).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplayQuery {
    since_unix_ms: Option<u64>,
    limit: Option<usize>,
    replaces: Option<String>,
}

/// `POST /admin/policies/{name}/replay`: what a candidate would decide on the replay ring's
/// recorded requests. A JSON body ([`vla_api::ReplayRequest`], `{}` for all defaults) replays
/// the installed policy `name`, with another `config` if given; a multipart body (the upload's
/// fields, `name` optional, replay settings in the query string) replays an uploaded component
/// standing in for `name`. Nothing is installed or changed.
pub async fn replay(
    State(app): State<AppState>,
    params: Params,
    query: Result<Query<ReplayQuery>, axum::extract::rejection::QueryRejection>,
    request: Request,
) -> Result<Response, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::InvalidField { field: "query".into(), problem: e.body_text() })?;
    let name = params.get("name").to_string();
    let (parts, body) = request.into_parts();
    let multipart = parts
        .headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("multipart/form-data"));
    let (upload, request) = if multipart {
        let limit = app.config.policy.max_component_bytes + UPLOAD_OVERHEAD_BYTES;
        let body = body::read(&parts.headers, body, app.body_limits().with_max_bytes(limit)).await?;
        let form = Multipart::from_request(Request::from_parts(parts, Body::from(body)), &())
            .await
            .map_err(|e| ApiError::InvalidField { field: "body".into(), problem: e.body_text() })?;
        let upload = read_fields(form, false).await?;
        let request = vla_api::ReplayRequest {
            config: None,
            since_unix_ms: q.since_unix_ms,
            limit: q.limit,
            replaces: q.replaces,
        };
        (Some(upload), request)
    } else {
        let limits = app.body_limits().with_max_bytes(app.config.server.admin_body_limit_bytes);
        let body = body::read(&parts.headers, body, limits).await?;
        let mut request: vla_api::ReplayRequest = if body.iter().all(u8::is_ascii_whitespace) {
            Default::default()
        } else {
            crate::validate::parse_json(&body)?
        };
        request.since_unix_ms = request.since_unix_ms.or(q.since_unix_ms);
        request.limit = request.limit.or(q.limit);
        request.replaces = request.replaces.or(q.replaces);
        (None, request)
    };
    let report = app.policies.replay(&name, upload, request).await?;
    Ok(Json(report).into_response())
}

/// `GET /admin/changes`'s query string.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChangesQuery {
    target: Option<String>,
    action: Option<String>,
    since_unix_ms: Option<u64>,
    limit: Option<usize>,
}

/// `GET /admin/changes`: the admin change trail, newest first, filtered.
pub async fn changes(
    State(app): State<AppState>,
    query: Result<Query<ChangesQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<vla_api::AdminChangeList>, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::InvalidField { field: "query".into(), problem: e.body_text() })?;
    let limit = q.limit.unwrap_or(DEFAULT_LIMIT);
    if limit == 0 || limit > crate::changes::MAX_LIMIT {
        return Err(ApiError::InvalidValue {
            field: "limit".into(),
            problem: format!("must be 1-{}", crate::changes::MAX_LIMIT),
        });
    }
    let query = crate::changes::Query { target: q.target, action: q.action, since_unix_ms: q.since_unix_ms, limit };
    let changes = app.changes.clone();
    let list = blocking(move || changes.query(&query).map_err(|e| ApiError::Internal(e.to_string()))).await?;
    Ok(Json(vla_api::AdminChangeList { changes: list }))
}

/// `GET /admin/audit`'s query string.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditQuery {
    robot_id: Option<String>,
    policy: Option<String>,
    decision: Option<String>,
    since_unix_ms: Option<u64>,
    limit: Option<usize>,
}

/// `GET /admin/audit`: the decision log, newest first, filtered.
pub async fn audit_log(
    State(app): State<AppState>,
    query: Result<Query<AuditQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<AuditList>, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::InvalidField { field: "query".into(), problem: e.body_text() })?;
    if let Some(d) = &q.decision
        && !matches!(d.as_str(), "deny" | "modify" | "error")
    {
        return Err(ApiError::InvalidValue {
            field: "decision".into(),
            problem: format!("must be `deny`, `modify` or `error`, got `{}`", short(d)),
        });
    }
    let limit = q.limit.unwrap_or(DEFAULT_LIMIT);
    if limit == 0 || limit > MAX_LIMIT {
        return Err(ApiError::InvalidValue { field: "limit".into(), problem: format!("must be 1-{MAX_LIMIT}") });
    }
    let query = audit::Query {
        robot_id: q.robot_id,
        policy: q.policy,
        decision: q.decision,
        since_unix_ms: q.since_unix_ms,
        limit,
    };
    let policies = app.policies.clone();
    let records =
        blocking(move || policies.audit().query(&query).map_err(|e| ApiError::Internal(e.to_string()))).await?;
    Ok(Json(AuditList { records }))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn configs_are_json_objects_or_toml_tables() {
        assert_eq!(parse_config(r#"{"a": 1}"#, None), Ok(serde_json::json!({"a": 1})));
        assert_eq!(parse_config("a = 1\n[b]\nc = [1.5]", None), Ok(serde_json::json!({"a": 1, "b": {"c": [1.5]}})));
        assert!(parse_config("[1, 2]", None).unwrap_err().contains("JSON object"));
        assert!(parse_config("{nope", None).unwrap_err().contains("neither JSON"));
        assert_eq!(parse_config("", Some("limits.toml")), Ok(serde_json::json!({})));
        assert!(parse_config("{}", Some("limits.toml")).unwrap_err().contains("not TOML"));
    }

    #[test]
    fn signatures_are_raw_or_base64_and_64_bytes() {
        assert_eq!(parse_signature(&[7; 64]).map(|s| s.len()), Ok(64));
        use base64::Engine;
        let b64 = base64::engine::general_purpose::STANDARD.encode([7u8; 64]);
        assert_eq!(parse_signature(b64.as_bytes()), Ok(vec![7; 64]));
        assert!(parse_signature(b"AAAA").unwrap_err().contains("64 bytes"));
    }
}
