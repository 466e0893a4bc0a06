//! The HTTP boundary's one error type: every variant maps to a status, a stable code and its
//! categories (what the metrics count it as) here, and nowhere else. The domain modules return
//! their own errors; every conversion into [`ApiError`] is below.
//!
//! Client mistakes are 4xx and name what was wrong; 5xx means the appliance itself failed.

use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use vla_api::ErrorBody;

use crate::batcher::JobError;
use crate::clock::Throttle;
use crate::metrics::ErrorCount;
use crate::policy::{ChangeError, Refusal};
use crate::preprocess::FrameError;
use crate::quota::{QuotaError, Status};
use crate::repository::ResolveError;
use crate::robots::RegistryError;
use crate::store::StoreError;
use crate::text::TextError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("request body is not valid JSON: {0}")]
    MalformedJson(String),
    #[error("{0}")]
    MalformedMessage(String),
    #[error("robot `{robot}` has {limit} openpi sessions open already (server.websocket_sessions_per_robot)")]
    TooManySessions { robot: String, limit: usize },
    #[error(
        "more than {per_s} observations a second on this session (server.websocket_messages_per_s); this one was not computed"
    )]
    TooManyMessages { per_s: u32 },
    #[error("this session has an observation running and one waiting; wait for an answer before sending more")]
    SessionBusy,
    #[error("field `{field}`: {problem}")]
    InvalidField { field: String, problem: String },
    #[error("content type `{0}` is not supported; send application/json")]
    UnsupportedMediaType(String),
    #[error("request body exceeds the limit of {limit} bytes")]
    BodyTooLarge { limit: usize },
    #[error("failed to read the request body: {0}")]
    BodyRead(String),
    #[error("the request body did not arrive within {timeout_ms} ms")]
    BodyTimeout { timeout_ms: u64 },
    #[error("field `{field}`: the image is {bytes} bytes, more than the limit of {limit} bytes")]
    ImageTooLarge { field: String, bytes: usize, limit: usize },
    #[error("field `{field}`: the image is {width}x{height} pixels, more than the limit of {limit} pixels")]
    ImageDimensionsTooLarge { field: String, width: u32, height: u32, limit: u64 },
    #[error("field `{field}`: not valid base64: {reason}")]
    InvalidBase64 { field: String, reason: String },
    #[error("field `{field}`: not a JPEG or PNG image")]
    UnsupportedImageFormat { field: String },
    #[error("field `{field}`: {reason}")]
    ImageDecode { field: String, reason: String },
    #[error("field `{field}`: model `{model}` needs a frame from camera `{camera}`")]
    CameraMissing { field: String, model: String, camera: String },
    #[error("field `{field}`: {reason}")]
    InstructionTooLong { field: String, reason: String },
    #[error("field `state`: model `{model}` expects {expected} values, got {got}")]
    StateLength { model: String, expected: usize, got: usize },
    #[error("field `{field}`: {problem}")]
    InvalidValue { field: String, problem: String },
    #[error("model `{0}` is not loaded")]
    ModelNotFound(String),
    #[error("model `{model}` version `{version}` is not loaded (serving version `{serving}`)")]
    ModelVersionNotFound { model: String, version: String, serving: String },
    #[error("input `{name}`: {problem}")]
    InvalidTensor { name: String, problem: String },
    #[error("{0}")]
    InferenceHeader(String),
    #[error("model `{model}` failed to load: {reason}")]
    ModelLoad { model: String, reason: String },
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("robot `{0}` is not registered")]
    RobotNotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("no route for {0}")]
    RouteNotFound(String),
    #[error("method {0} is not allowed here")]
    MethodNotAllowed(String),
    #[error("model `{model}` queue is full ({capacity} requests); retry after {retry_after_s} s")]
    QueueFull { model: String, capacity: usize, retry_after_s: u64 },
    #[error("the appliance is shutting down")]
    ShuttingDown,
    #[error("the appliance is handling as many requests as it takes (server.max_in_flight); retry")]
    Overloaded,
    #[error("robot `{robot}` has {limit} requests in flight already (limits.max_in_flight_per_robot); retry")]
    TooManyInFlight { robot: String, limit: usize },
    #[error("model `{0}` was reloaded or unloaded while the request waited; retry")]
    ModelChanged(String),
    #[error("no model is serving")]
    Unavailable,
    #[error("deadline of {deadline_ms} ms passed before the request's batch started")]
    DeadlineExceeded { deadline_ms: u64 },
    #[error("inference failed in model `{model}`: {reason}")]
    Inference { model: String, reason: String },
    #[error("{}", refusal_message(.0))]
    PolicyRefused(Box<Refusal>),
    #[error("model `{model}`'s action is outside its envelope, so nothing was sent: {violation}")]
    ActionOutOfEnvelope { model: String, violation: String },
    #[error("{0}")]
    PolicyInvalid(String),
    #[error("policy `{0}` is not installed")]
    PolicyNotFound(String),
    #[error("quota state could not be written to disk, so the request is not acknowledged: {0}")]
    QuotaUnavailable(String),
    #[error("the store cannot be written now: {0}")]
    StoreUnavailable(String),
    #[error("internal error: {0}")]
    Internal(String),
}

fn refusal_message(r: &Refusal) -> String {
    if r.failed {
        format!("policy `{}` (version {}) failed, so the request is denied: {}", r.policy, r.version, r.reason)
    } else {
        format!("policy `{}` (version {}) denied the request: {} ({})", r.policy, r.version, r.reason, r.code)
    }
}

impl ApiError {
    /// Stable machine code, also the label used for this error in metrics.
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::MalformedJson(_) => "malformed_json",
            ApiError::MalformedMessage(_) => "malformed_message",
            ApiError::TooManySessions { .. } => "too_many_sessions",
            ApiError::TooManyMessages { .. } => "too_many_messages",
            ApiError::SessionBusy => "too_many_in_flight",
            ApiError::InvalidField { .. } => "invalid_field",
            ApiError::UnsupportedMediaType(_) => "unsupported_media_type",
            ApiError::BodyTooLarge { .. } => "body_too_large",
            ApiError::BodyRead(_) => "body_read_failed",
            ApiError::BodyTimeout { .. } => "request_timeout",
            ApiError::ImageTooLarge { .. } => "image_too_large",
            ApiError::ImageDimensionsTooLarge { .. } => "image_dimensions_too_large",
            ApiError::InvalidBase64 { .. } => "invalid_base64",
            ApiError::UnsupportedImageFormat { .. } => "unsupported_image_format",
            ApiError::CameraMissing { .. } => "camera_missing",
            ApiError::InstructionTooLong { .. } => "instruction_too_long",
            ApiError::ImageDecode { .. } => "image_decode_failed",
            ApiError::StateLength { .. } => "state_length_mismatch",
            ApiError::InvalidValue { .. } => "invalid_value",
            ApiError::ModelNotFound(_) => "model_not_found",
            ApiError::ModelVersionNotFound { .. } => "model_version_not_found",
            ApiError::InvalidTensor { .. } => "invalid_tensor",
            ApiError::InferenceHeader(_) => "invalid_inference_header",
            ApiError::ModelLoad { .. } => "model_load_failed",
            ApiError::Unauthorized(_) => "unauthorized",
            ApiError::Forbidden(_) => "forbidden",
            ApiError::RobotNotFound(_) => "robot_not_found",
            ApiError::Conflict(_) => "conflict",
            ApiError::RouteNotFound(_) => "not_found",
            ApiError::MethodNotAllowed(_) => "method_not_allowed",
            ApiError::QueueFull { .. } => "queue_full",
            ApiError::ShuttingDown => "shutting_down",
            ApiError::Overloaded => "overloaded",
            ApiError::TooManyInFlight { .. } => "too_many_in_flight",
            ApiError::ModelChanged(_) => "model_changed",
            ApiError::Unavailable => "unavailable",
            ApiError::DeadlineExceeded { .. } => "deadline_exceeded",
            ApiError::Inference { .. } => "inference_failed",
            ApiError::PolicyRefused(r) if r.failed => "policy_error",
            ApiError::PolicyRefused(r) if r.rate_limit.is_some() => "rate_limited",
            ApiError::PolicyRefused(_) => "policy_rejected",
            ApiError::ActionOutOfEnvelope { .. } => "action_out_of_envelope",
            ApiError::PolicyInvalid(_) => "policy_invalid",
            ApiError::PolicyNotFound(_) => "policy_not_found",
            ApiError::QuotaUnavailable(_) => "quota_unavailable",
            ApiError::StoreUnavailable(_) => "store_unavailable",
            ApiError::Internal(_) => "internal",
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::MalformedJson(_)
            | ApiError::MalformedMessage(_)
            | ApiError::InvalidField { .. }
            | ApiError::BodyRead(_)
            | ApiError::InvalidTensor { .. }
            | ApiError::InferenceHeader(_)
            | ApiError::ModelLoad { .. }
            | ApiError::PolicyInvalid(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::TooManyInFlight { .. }
            | ApiError::TooManySessions { .. }
            | ApiError::TooManyMessages { .. }
            | ApiError::SessionBusy => StatusCode::TOO_MANY_REQUESTS,
            ApiError::PolicyRefused(r) if r.rate_limit.is_some() && !r.failed => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::BodyTimeout { .. } => StatusCode::REQUEST_TIMEOUT,
            ApiError::BodyTooLarge { .. } | ApiError::ImageTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::ImageDimensionsTooLarge { .. }
            | ApiError::InvalidBase64 { .. }
            | ApiError::UnsupportedImageFormat { .. }
            | ApiError::ImageDecode { .. }
            | ApiError::CameraMissing { .. }
            | ApiError::InstructionTooLong { .. }
            | ApiError::StateLength { .. }
            | ApiError::InvalidValue { .. }
            | ApiError::PolicyRefused(_)
            | ApiError::ActionOutOfEnvelope { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::ModelNotFound(_)
            | ApiError::ModelVersionNotFound { .. }
            | ApiError::RobotNotFound(_)
            | ApiError::PolicyNotFound(_)
            | ApiError::RouteNotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::QueueFull { .. }
            | ApiError::ShuttingDown
            | ApiError::Overloaded
            | ApiError::Unavailable
            | ApiError::ModelChanged(_)
            | ApiError::QuotaUnavailable(_)
            | ApiError::StoreUnavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::DeadlineExceeded { .. } => StatusCode::GATEWAY_TIMEOUT,
            ApiError::Inference { .. } | ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl ApiError {
    /// The `status` label of `vla_inference_requests_total`, as the cell's alert rules read it:
    /// `rate_limited` (429); `rejected` (a policy denied: 422 `policy_rejected`); `invalid` (any
    /// other client mistake, 4xx); `error` (the appliance failed: 5xx, or a policy failed).
    /// Success is `success`. The error's own code is in `vla_errors_total{code}`.
    pub fn request_status(&self) -> &'static str {
        match self {
            ApiError::PolicyRefused(r) if r.failed => "error",
            ApiError::PolicyRefused(r) if r.rate_limit.is_some() => "rate_limited",
            ApiError::PolicyRefused(_) | ApiError::ActionOutOfEnvelope { .. } => "rejected",
            ApiError::TooManyInFlight { .. }
            | ApiError::TooManySessions { .. }
            | ApiError::TooManyMessages { .. }
            | ApiError::SessionBusy => "rate_limited",
            _ if self.status().is_client_error() => "invalid",
            _ => "error",
        }
    }

    /// The request itself was invalid (`vla_validation_failures_total`).
    pub fn is_validation(&self) -> bool {
        matches!(
            self,
            ApiError::MalformedJson(_)
                | ApiError::MalformedMessage(_)
                | ApiError::InvalidField { .. }
                | ApiError::UnsupportedMediaType(_)
                | ApiError::BodyTooLarge { .. }
                | ApiError::StateLength { .. }
                | ApiError::InvalidValue { .. }
                | ApiError::InvalidTensor { .. }
                | ApiError::InferenceHeader(_)
                | ApiError::CameraMissing { .. }
                | ApiError::InstructionTooLong { .. }
        ) || self.is_image()
    }

    /// A camera image was refused (`vla_image_processing_errors_total`).
    pub fn is_image(&self) -> bool {
        matches!(
            self,
            ApiError::ImageTooLarge { .. }
                | ApiError::ImageDimensionsTooLarge { .. }
                | ApiError::InvalidBase64 { .. }
                | ApiError::UnsupportedImageFormat { .. }
                | ApiError::ImageDecode { .. }
        )
    }

    /// What the metrics count this answer as.
    pub fn counts(&self) -> ErrorCount {
        ErrorCount {
            code: self.code(),
            validation: self.is_validation(),
            image: self.is_image(),
            exception: matches!(self, ApiError::Internal(_)),
        }
    }

    /// A frame's problem, named by the field it came in (`image`, `images.wrist`, an OIP input).
    pub fn from_frame(field: &str, e: FrameError) -> ApiError {
        let field = field.to_string();
        match e {
            FrameError::TooLarge { bytes, limit } => ApiError::ImageTooLarge { field, bytes, limit },
            FrameError::TooManyPixels { width, height, limit } => {
                ApiError::ImageDimensionsTooLarge { field, width, height, limit }
            }
            FrameError::Base64(reason) => ApiError::InvalidBase64 { field, reason },
            FrameError::Format => ApiError::UnsupportedImageFormat { field },
            e @ (FrameError::Decode { .. } | FrameError::Raw(_)) => {
                ApiError::ImageDecode { field, reason: e.to_string() }
            }
        }
    }

    /// An instruction that has no tokens, named by its field.
    pub fn from_text(field: &str, e: TextError) -> ApiError {
        match e {
            TextError::TooLong { .. } => ApiError::InstructionTooLong { field: field.into(), reason: e.to_string() },
            TextError::Tokenizer(reason) => ApiError::InvalidValue { field: field.into(), problem: reason },
        }
    }

    /// A batcher's answer for a request to `model` with a deadline of `deadline_ms`.
    pub fn from_job(e: JobError, model: &str, deadline_ms: u64) -> ApiError {
        match e {
            JobError::QueueFull { capacity } => ApiError::QueueFull { model: model.into(), capacity, retry_after_s: 1 },
            JobError::ShuttingDown => ApiError::ShuttingDown,
            JobError::ExecutorGone => ApiError::Internal(format!("model `{model}`: executor stopped")),
            JobError::DeadlineExceeded => ApiError::DeadlineExceeded { deadline_ms },
            JobError::Inference(reason) | JobError::OutputShape(reason) => {
                ApiError::Inference { model: model.into(), reason }
            }
        }
    }
}

/// `RateLimit-Limit`, `RateLimit-Remaining` and `RateLimit-Reset` (seconds until the bucket
/// is full again or its period starts over) for `status`.
pub fn rate_limit_headers(headers: &mut HeaderMap, status: &Status) {
    let reset_s = status.reset_ms.saturating_sub(crate::clock::now_ms()).div_ceil(1000);
    headers.insert("ratelimit-limit", status.limit.into());
    headers.insert("ratelimit-remaining", status.remaining.into());
    headers.insert("ratelimit-reset", reset_s.into());
}

impl From<Box<Refusal>> for ApiError {
    fn from(r: Box<Refusal>) -> ApiError {
        ApiError::PolicyRefused(r)
    }
}

impl From<QuotaError> for ApiError {
    fn from(e: QuotaError) -> ApiError {
        match e {
            QuotaError::NotDurable(m) => ApiError::QuotaUnavailable(m),
            QuotaError::Store(e) => ApiError::from(e),
            e => ApiError::Internal(e.to_string()),
        }
    }
}

impl From<ChangeError> for ApiError {
    fn from(e: ChangeError) -> ApiError {
        match e {
            ChangeError::Invalid(m) => ApiError::PolicyInvalid(m),
            ChangeError::Forbidden(m) => ApiError::Forbidden(m),
            ChangeError::NotFound(name) => ApiError::PolicyNotFound(crate::names::clip(&name, 80)),
            ChangeError::Conflict(m) => ApiError::Conflict(m),
            e @ (ChangeError::Store(_) | ChangeError::Io(_)) => ApiError::Internal(e.to_string()),
        }
    }
}

impl From<ResolveError> for ApiError {
    fn from(e: ResolveError) -> ApiError {
        match e {
            ResolveError::NotFound(name) => ApiError::ModelNotFound(name),
            ResolveError::VersionNotFound { model, version, serving } => {
                ApiError::ModelVersionNotFound { model, version, serving }
            }
            ResolveError::NoDefault => ApiError::InvalidField {
                field: "model".into(),
                problem: "required: several models are loaded and none is the default".into(),
            },
        }
    }
}

impl From<RegistryError> for ApiError {
    fn from(e: RegistryError) -> ApiError {
        match e {
            RegistryError::InvalidName { field, problem } => ApiError::InvalidValue { field: field.into(), problem },
            RegistryError::NotFound(id) => ApiError::RobotNotFound(id),
            RegistryError::Conflict(why) => ApiError::Conflict(why),
            e => ApiError::Internal(e.to_string()),
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> ApiError {
        match e {
            // A write the disk refused, or the store being reopened after one: temporary.
            StoreError::Unavailable | StoreError::Sled(sled::Error::Io(_)) => ApiError::StoreUnavailable(e.to_string()),
            e => ApiError::Internal(e.to_string()),
        }
    }
}

/// Overload answers (queue full, deadline passed, shutting down) come by the thousand exactly
/// when an operator needs the log readable; every one is counted in `vla_errors_total{code}`.
static OVERLOAD_LOG: Throttle = Throttle::new();

impl ApiError {
    fn log(&self) {
        if matches!(
            self,
            ApiError::QueueFull { .. }
                | ApiError::DeadlineExceeded { .. }
                | ApiError::ShuttingDown
                | ApiError::Overloaded
        ) {
            if let Some(skipped) = OVERLOAD_LOG.admit(crate::clock::now_ms()) {
                tracing::warn!(code = self.code(), skipped, "{self} (overload: logged at most once a second)");
            }
        } else if self.status().is_server_error() {
            tracing::error!(code = self.code(), "{self}");
        } else {
            tracing::debug!(code = self.code(), "{self}");
        }
    }

    /// When to come back, in whole seconds, for errors that pass.
    fn retry_after_s(&self) -> Option<u64> {
        match self {
            ApiError::PolicyRefused(r) if self.status() == StatusCode::TOO_MANY_REQUESTS => {
                // Rounded up: a robot that waits this long fits.
                r.rate_limit.map(|s| s.retry_after_ms.div_ceil(1000).max(1))
            }
            ApiError::QueueFull { retry_after_s, .. } => Some(*retry_after_s),
            ApiError::ModelChanged(_)
            | ApiError::Overloaded
            | ApiError::TooManyInFlight { .. }
            | ApiError::TooManySessions { .. }
            | ApiError::TooManyMessages { .. }
            | ApiError::SessionBusy => Some(1),
            ApiError::ShuttingDown
            | ApiError::Unavailable
            | ApiError::QuotaUnavailable(_)
            | ApiError::StoreUnavailable(_) => Some(5),
            _ => None,
        }
    }

    /// The gRPC status code of the HTTP status (a policy's denial: `PERMISSION_DENIED`; an
    /// unknown call: `UNIMPLEMENTED`).
    pub fn grpc_code(&self) -> tonic::Code {
        use tonic::Code;
        match self {
            ApiError::PolicyRefused(_) if self.status() != StatusCode::TOO_MANY_REQUESTS => {
                return Code::PermissionDenied;
            }
            ApiError::ActionOutOfEnvelope { .. } => return Code::PermissionDenied,
            // A call the service does not have.
            ApiError::RouteNotFound(_) => return Code::Unimplemented,
            _ => {}
        }
        match self.status().as_u16() {
            400 | 415 | 422 => Code::InvalidArgument,
            401 => Code::Unauthenticated,
            403 => Code::PermissionDenied,
            404 => Code::NotFound,
            405 => Code::Unimplemented,
            408 | 504 => Code::DeadlineExceeded,
            409 => Code::Aborted,
            413 | 429 => Code::ResourceExhausted,
            503 => Code::Unavailable,
            500 => Code::Internal,
            _ => Code::Unknown,
        }
    }

    /// A gRPC answer for a request refused before its service ran (auth guard, caps, 404),
    /// counted by the HTTP metrics layer like any error answer.
    pub fn into_grpc_response(self) -> Response {
        let counts = self.counts();
        let mut response = tonic::Status::from(self).into_http::<axum::body::Body>();
        response.extensions_mut().insert(counts);
        response
    }
}

/// A gRPC error's message: the HTTP API's code, then its message (`rate_limited: policy …`).
pub fn grpc_message(e: &ApiError) -> String {
    format!("{}: {e}", e.code())
}

/// Errors of the gRPC service: the code and message as [`grpc_message`], `vla-code` and
/// `retry-after` metadata (and the quota's `RateLimit-*` when a rate limit refused).
impl From<ApiError> for tonic::Status {
    fn from(e: ApiError) -> tonic::Status {
        e.log();
        let mut headers = HeaderMap::new();
        headers.insert("vla-code", HeaderValue::from_static(e.code()));
        if let Some(seconds) = e.retry_after_s() {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        if let ApiError::PolicyRefused(r) = &e
            && let Some(s) = r.rate_limit.filter(|_| e.status() == StatusCode::TOO_MANY_REQUESTS)
        {
            rate_limit_headers(&mut headers, &s);
        }
        tonic::Status::with_metadata(
            e.grpc_code(),
            grpc_message(&e),
            tonic::metadata::MetadataMap::from_headers(headers),
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        self.log();
        let mut response = match &self {
            ApiError::PolicyRefused(r) => {
                let body = vla_api::PolicyRefusalBody {
                    error: self.to_string(),
                    code: self.code().to_string(),
                    denied_by: vla_api::PolicyDenial {
                        name: r.policy.clone(),
                        version: r.version,
                        code: r.code.clone(),
                        reason: r.reason.clone(),
                    },
                    policy: r.trace.clone(),
                };
                (status, axum::Json(body)).into_response()
            }
            _ => (status, axum::Json(ErrorBody { error: self.to_string(), code: self.code().to_string() }))
                .into_response(),
        };
        if let ApiError::PolicyRefused(r) = &self
            && let Some(s) = r.rate_limit.filter(|_| status == StatusCode::TOO_MANY_REQUESTS)
        {
            rate_limit_headers(response.headers_mut(), &s);
        }
        let retry_after = self.retry_after_s();
        if let Some(seconds) = retry_after {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        // For the HTTP metrics layer, which counts errors by code and category.
        response.extensions_mut().insert(self.counts());
        if matches!(self, ApiError::Unauthorized(_)) {
            response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn categories_come_from_the_variant() {
        let image = ApiError::UnsupportedImageFormat { field: "image".into() };
        assert!(image.is_image() && image.is_validation());
        assert_eq!(image.request_status(), "invalid");
        let full = ApiError::QueueFull { model: "m".into(), capacity: 1, retry_after_s: 1 };
        assert!(!full.is_validation());
        assert_eq!(full.request_status(), "error");
        assert_eq!(ApiError::Unauthorized("x".into()).request_status(), "invalid");
    }
}
