//! The HTTP boundary's one error type: every variant maps to a status and a stable code here,
//! and nowhere else.
//!
//! Client mistakes are 4xx and name what was wrong; 5xx means the appliance itself failed.

use std::sync::atomic::{AtomicU64, Ordering};

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use vla_api::ErrorBody;

/// The stable code of an error answer, attached to the response for the metrics layer.
#[derive(Debug, Clone, Copy)]
pub struct ErrorCode(pub &'static str);

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("request body is not valid JSON: {0}")]
    MalformedJson(String),
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
    #[error("field `image`: the image is {bytes} bytes, more than the limit of {limit} bytes")]
    ImageTooLarge { bytes: usize, limit: usize },
    #[error("field `image`: the image is {width}x{height} pixels, more than the limit of {limit} pixels")]
    ImageDimensionsTooLarge { width: u32, height: u32, limit: u64 },
    #[error("field `image`: not valid base64: {0}")]
    InvalidBase64(String),
    #[error("field `image`: not a JPEG or PNG image")]
    UnsupportedImageFormat,
    #[error("field `image`: the {format} image could not be decoded: {reason}")]
    ImageDecode { format: &'static str, reason: String },
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
    #[error("model `{0}` was reloaded or unloaded while the request waited; retry")]
    ModelChanged(String),
    #[error("no model is serving")]
    Unavailable,
    #[error("deadline of {deadline_ms} ms passed before the request's batch started")]
    DeadlineExceeded { deadline_ms: u64 },
    #[error("inference failed in model `{model}`: {reason}")]
    Inference { model: String, reason: String },
    #[error("{}", refusal_message(.0))]
    PolicyRefused(Box<crate::policy::Refusal>),
    #[error("{0}")]
    PolicyInvalid(String),
    #[error("{0}")]
    SignatureInvalid(String),
    #[error("policy `{0}` is not installed")]
    PolicyNotFound(String),
    #[error("quota state could not be written to disk, so the request is not acknowledged: {0}")]
    QuotaUnavailable(String),
    #[error("internal error: {0}")]
    Internal(String),
}

fn refusal_message(r: &crate::policy::Refusal) -> String {
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
            ApiError::InvalidField { .. } => "invalid_field",
            ApiError::UnsupportedMediaType(_) => "unsupported_media_type",
            ApiError::BodyTooLarge { .. } => "body_too_large",
            ApiError::BodyRead(_) => "body_read_failed",
            ApiError::BodyTimeout { .. } => "request_timeout",
            ApiError::ImageTooLarge { .. } => "image_too_large",
            ApiError::ImageDimensionsTooLarge { .. } => "image_dimensions_too_large",
            ApiError::InvalidBase64(_) => "invalid_base64",
            ApiError::UnsupportedImageFormat => "unsupported_image_format",
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
            ApiError::ModelChanged(_) => "model_changed",
            ApiError::Unavailable => "unavailable",
            ApiError::DeadlineExceeded { .. } => "deadline_exceeded",
            ApiError::Inference { .. } => "inference_failed",
            ApiError::PolicyRefused(r) if r.failed => "policy_error",
            ApiError::PolicyRefused(r) if r.rate_limit.is_some() => "rate_limited",
            ApiError::PolicyRefused(_) => "policy_rejected",
            ApiError::PolicyInvalid(_) => "policy_invalid",
            ApiError::SignatureInvalid(_) => "signature_invalid",
            ApiError::PolicyNotFound(_) => "policy_not_found",
            ApiError::QuotaUnavailable(_) => "quota_unavailable",
            ApiError::Internal(_) => "internal",
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::MalformedJson(_)
            | ApiError::InvalidField { .. }
            | ApiError::BodyRead(_)
            | ApiError::InvalidTensor { .. }
            | ApiError::InferenceHeader(_)
            | ApiError::ModelLoad { .. }
            | ApiError::PolicyInvalid(_)
            | ApiError::SignatureInvalid(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::PolicyRefused(r) if r.rate_limit.is_some() && !r.failed => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::BodyTimeout { .. } => StatusCode::REQUEST_TIMEOUT,
            ApiError::BodyTooLarge { .. } | ApiError::ImageTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::ImageDimensionsTooLarge { .. }
            | ApiError::InvalidBase64(_)
            | ApiError::UnsupportedImageFormat
            | ApiError::ImageDecode { .. }
            | ApiError::StateLength { .. }
            | ApiError::InvalidValue { .. }
            | ApiError::PolicyRefused(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::ModelNotFound(_)
            | ApiError::ModelVersionNotFound { .. }
            | ApiError::RobotNotFound(_)
            | ApiError::PolicyNotFound(_)
            | ApiError::RouteNotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::QueueFull { .. }
            | ApiError::ShuttingDown
            | ApiError::Unavailable
            | ApiError::ModelChanged(_)
            | ApiError::QuotaUnavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::DeadlineExceeded { .. } => StatusCode::GATEWAY_TIMEOUT,
            ApiError::Inference { .. } | ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

/// At most one log line a second for a kind of answer that comes in floods, with how many
/// were left out since the last line.
#[derive(Debug)]
struct Throttle {
    last_ms: AtomicU64,
    skipped: AtomicU64,
}

impl Throttle {
    const fn new() -> Throttle {
        Throttle { last_ms: AtomicU64::new(0), skipped: AtomicU64::new(0) }
    }

    /// `Some(left out since the last line)` when this one is to be logged.
    fn admit(&self, now_ms: u64) -> Option<u64> {
        let last = self.last_ms.load(Ordering::Relaxed);
        if now_ms.saturating_sub(last) >= 1_000
            && self.last_ms.compare_exchange(last, now_ms, Ordering::Relaxed, Ordering::Relaxed).is_ok()
        {
            return Some(self.skipped.swap(0, Ordering::Relaxed));
        }
        self.skipped.fetch_add(1, Ordering::Relaxed);
        None
    }
}

/// Overload answers (queue full, deadline passed, shutting down) come by the thousand exactly
/// when an operator needs the log readable; every one is counted in `vla_errors_total{code}`.
static OVERLOAD_LOG: Throttle = Throttle::new();

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        if matches!(self, ApiError::QueueFull { .. } | ApiError::DeadlineExceeded { .. } | ApiError::ShuttingDown) {
            if let Some(skipped) = OVERLOAD_LOG.admit(crate::admin::now_ms()) {
                tracing::warn!(code = self.code(), skipped, "{self} (overload: logged at most once a second)");
            }
        } else if status.is_server_error() {
            tracing::error!(code = self.code(), "{self}");
        } else {
            tracing::debug!(code = self.code(), "{self}");
        }
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
        let retry_after = match &self {
            ApiError::PolicyRefused(r) if self.status() == StatusCode::TOO_MANY_REQUESTS => {
                r.rate_limit.map(|s| {
                    crate::server::rate_limit_headers(response.headers_mut(), &s);
                    // Whole seconds, rounded up: a robot that waits this long fits.
                    s.retry_after_ms.div_ceil(1000).max(1)
                })
            }
            ApiError::QueueFull { retry_after_s, .. } => Some(*retry_after_s),
            ApiError::ModelChanged(_) => Some(1),
            ApiError::ShuttingDown | ApiError::Unavailable | ApiError::QuotaUnavailable(_) => Some(5),
            _ => None,
        };
        if let Some(seconds) = retry_after {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        // For the HTTP metrics layer, which counts errors by code.
        response.extensions_mut().insert(ErrorCode(self.code()));
        if matches!(self, ApiError::Unauthorized(_)) {
            response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::Throttle;

    #[test]
    fn a_flood_is_logged_once_a_second_with_what_was_left_out() {
        let t = Throttle::new();
        assert_eq!(t.admit(10_000), Some(0));
        for ms in 10_001..10_999 {
            assert_eq!(t.admit(ms), None);
        }
        assert_eq!(t.admit(11_000), Some(998));
        assert_eq!(t.admit(11_001), None);
        assert_eq!(t.admit(20_000), Some(1));
    }
}
