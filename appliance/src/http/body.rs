//! Request bodies: read whole within a byte limit and a time limit, or drained after a refusal
//! so an HTTP/1.1 client still sending reads the answer instead of a reset. Takes its limits,
//! not the appliance's state.

use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, header};
use http_body_util::{BodyExt, LengthLimitError, Limited};

use crate::error::ApiError;

/// How much of a body is read, and for how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BodyLimits {
    pub max_bytes: usize,
    pub timeout: Duration,
}

impl BodyLimits {
    /// The same read timeout with another byte limit (policy uploads have their own).
    pub fn with_max_bytes(self, max_bytes: usize) -> BodyLimits {
        BodyLimits { max_bytes, ..self }
    }
}

/// The whole body, refusing more than `limits.max_bytes` (at once by `Content-Length`, or as
/// soon as a streamed body passes the limit) and a body slower than `limits.timeout` (408).
pub async fn read(headers: &HeaderMap, body: Body, limits: BodyLimits) -> Result<Bytes, ApiError> {
    tokio::time::timeout(limits.timeout, read_within(body, headers, limits.max_bytes))
        .await
        .map_err(|_| ApiError::BodyTimeout { timeout_ms: limits.timeout.as_millis() as u64 })?
}

async fn read_within(body: Body, headers: &HeaderMap, limit: usize) -> Result<Bytes, ApiError> {
    let declared =
        headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > limit as u64) {
        return Err(ApiError::BodyTooLarge { limit });
    }
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => Err(ApiError::BodyTooLarge { limit }),
        Err(e) => Err(ApiError::BodyRead(e.to_string())),
    }
}

/// How long a refused request's small body may take to arrive before the answer goes out.
const REFUSED_BODY_WAIT: Duration = Duration::from_secs(1);

/// Reads and discards a refused request's body when it is small (`max_bytes` at most, declared
/// or seen, arriving within a second), so an HTTP/1.1 client still sending it reads the answer
/// instead of a reset; nothing of it is kept. Returns `false` when the body was left unread:
/// the caller then closes the connection after answering (see [`close_after`]); on HTTP/2
/// only the stream is reset.
pub async fn discard(headers: &HeaderMap, body: Body, max_bytes: usize) -> bool {
    let declared =
        headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > max_bytes as u64) {
        return false;
    }
    let read = async {
        let mut body = body;
        let mut seen = 0usize;
        while let Some(frame) = body.frame().await {
            let Ok(frame) = frame else { return false };
            if let Some(data) = frame.data_ref() {
                seen += data.len();
                if seen > max_bytes {
                    return false;
                }
            }
        }
        true
    };
    tokio::time::timeout(REFUSED_BODY_WAIT, read).await.unwrap_or(false)
}

/// Marks an HTTP/1.1 answer as the connection's last (`Connection: close`); HTTP/2 needs nothing
/// (an unread request body resets only its stream).
pub fn close_after(version: axum::http::Version, response: &mut axum::response::Response) {
    if version <= axum::http::Version::HTTP_11 {
        response.headers_mut().insert(header::CONNECTION, axum::http::HeaderValue::from_static("close"));
    }
}

/// JSON bodies only; a missing content type is taken as JSON (robots sending with `curl -d`
/// forget it more often than they send something else).
pub fn check_json_content_type(headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(value) = headers.get(header::CONTENT_TYPE) else { return Ok(()) };
    let value = value.to_str().unwrap_or("");
    let mime = value.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    if mime == "application/json" || mime.ends_with("+json") {
        Ok(())
    } else {
        Err(ApiError::UnsupportedMediaType(crate::names::clip(value, 100)))
    }
}
