//! Validation stage: the raw body of `POST /v1/inference` becomes a checked request, or an
//! error that names the field and the problem. Nothing invalid gets past here into a batch.

use vla_api::{InferenceRequest, Priority};

use crate::config::LimitsConfig;
use crate::error::ApiError;
use crate::spec::ModelSpec;

/// Parses the robot endpoint's JSON body.
pub fn parse_request(body: &[u8]) -> Result<InferenceRequest, ApiError> {
    parse_json(body)
}

/// Parses a JSON body, telling malformed JSON from a well-formed body with a bad field.
pub fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let mut de = serde_json::Deserializer::from_slice(body);
    let request: T = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let field = e.path().to_string();
        let inner = e.into_inner();
        match inner.classify() {
            serde_json::error::Category::Syntax
            | serde_json::error::Category::Eof
            | serde_json::error::Category::Io => ApiError::MalformedJson(inner.to_string()),
            serde_json::error::Category::Data => ApiError::InvalidField {
                field: if field == "." { "body".into() } else { field },
                problem: strip_position(&inner.to_string()),
            },
        }
    })?;
    // Bytes after the JSON value (a binary tensor body sent without its header length, say).
    de.end().map_err(|e| ApiError::MalformedJson(e.to_string()))?;
    Ok(request)
}

/// serde_json appends " at line 1 column 57"; the field name says more than the column.
fn strip_position(msg: &str) -> String {
    match msg.rfind(" at line ") {
        Some(i) => msg[..i].to_string(),
        None => msg.to_string(),
    }
}

/// The scheduling facts of a request after its fields are checked against `spec`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Checked {
    pub deadline_ms: u64,
    pub priority: Priority,
}

/// A request's priority: the one it asks for, else the robot's class; never above the class.
pub fn effective_priority(requested: Option<Priority>, class: Priority) -> Result<Priority, ApiError> {
    match requested {
        // `Priority` orders high < normal < low.
        Some(p) if p < class => Err(ApiError::Forbidden(format!(
            "priority `{}` is above this robot's class `{}`",
            p.as_str(),
            class.as_str()
        ))),
        Some(p) => Ok(p),
        None => Ok(class),
    }
}

/// Checks the fields that need the model or the limits to judge; `class` is the robot's
/// registered priority class.
pub fn check_request(
    request: &InferenceRequest,
    spec: &ModelSpec,
    limits: &LimitsConfig,
    class: Priority,
) -> Result<Checked, ApiError> {
    crate::names::check_robot_id(&request.robot_id)
        .map_err(|problem| ApiError::InvalidValue { field: "robot_id".into(), problem })?;
    if let Some(t) = &request.robot_type
        && !crate::names::is_valid_name(t)
    {
        return Err(ApiError::InvalidValue {
            field: "robot_type".into(),
            problem: format!("`{}` must be 1-64 of [A-Za-z0-9._-]", crate::names::truncate(t, 80)),
        });
    }
    if request.instruction.len() > limits.max_instruction_bytes {
        return Err(ApiError::InvalidValue {
            field: "instruction".into(),
            problem: format!(
                "{} bytes, more than the limit of {}",
                request.instruction.len(),
                limits.max_instruction_bytes
            ),
        });
    }
    let expected = spec.state_dim();
    if request.state.len() != expected {
        return Err(ApiError::StateLength { model: spec.name.clone(), expected, got: request.state.len() });
    }
    if let Some(i) = request.state.iter().position(|v| !v.is_finite()) {
        return Err(ApiError::InvalidValue {
            field: format!("state[{i}]"),
            problem: "must be a finite number within f32 range".into(),
        });
    }
    let deadline_ms = match request.deadline_ms {
        None => spec.batching.default_deadline_ms,
        Some(0) => {
            return Err(ApiError::InvalidValue { field: "deadline_ms".into(), problem: "must be at least 1".into() });
        }
        Some(ms) if ms > limits.max_deadline_ms => {
            return Err(ApiError::InvalidValue {
                field: "deadline_ms".into(),
                problem: format!("{ms} is more than the limit of {}", limits.max_deadline_ms),
            });
        }
        Some(ms) => ms,
    };
    let priority = effective_priority(request.priority, class)?;
    Ok(Checked { deadline_ms, priority })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> InferenceRequest {
        InferenceRequest {
            robot_id: "arm-1".into(),
            robot_type: None,
            model: None,
            instruction: "go".into(),
            image: None,
            images: Default::default(),
            state: vec![0.0; 7],
            extra: Default::default(),
            seed: None,
            deadline_ms: None,
            priority: None,
        }
    }

    fn demo_spec() -> ModelSpec {
        ModelSpec::parse(crate::demo::MODEL_TOML, "tiny-vla").expect("demo spec")
    }

    #[test]
    fn priority_comes_from_the_request_then_the_robot_class_and_never_exceeds_the_class() {
        let (spec, limits) = (demo_spec(), LimitsConfig::default());
        let mut r = request();
        assert_eq!(check_request(&r, &spec, &limits, Priority::Normal).expect("ok").priority, Priority::Normal);
        assert_eq!(check_request(&r, &spec, &limits, Priority::Low).expect("ok").priority, Priority::Low);
        r.priority = Some(Priority::Low);
        assert_eq!(check_request(&r, &spec, &limits, Priority::High).expect("ok").priority, Priority::Low);
        r.priority = Some(Priority::High);
        let err = check_request(&r, &spec, &limits, Priority::Normal).expect_err("above the class");
        assert_eq!(err.code(), "forbidden");
    }

    #[test]
    fn the_deadline_defaults_to_the_model_and_is_bounded_by_the_limit() {
        let (spec, limits) = (demo_spec(), LimitsConfig::default());
        let mut r = request();
        assert_eq!(check_request(&r, &spec, &limits, Priority::Normal).expect("ok").deadline_ms, 1_000);
        r.deadline_ms = Some(limits.max_deadline_ms + 1);
        let err = check_request(&r, &spec, &limits, Priority::Normal).expect_err("refused");
        assert!(err.to_string().starts_with("field `deadline_ms`"), "{err}");
    }

    #[test]
    fn syntax_errors_are_malformed_json() {
        let err = parse_request(b"{\"robot_id\": ").expect_err("refused");
        assert_eq!(err.code(), "malformed_json");
    }

    #[test]
    fn a_missing_field_is_named() {
        let err = parse_request(br#"{"robot_id":"a","image":"x","state":[]}"#).expect_err("refused");
        assert_eq!(err.code(), "invalid_field");
        assert!(err.to_string().contains("instruction"), "{err}");
    }

    #[test]
    fn a_wrongly_typed_field_is_named_with_its_path() {
        let err = parse_request(br#"{"robot_id":"a","instruction":"go","image":"x","state":[1,"two"]}"#)
            .expect_err("refused");
        assert_eq!(err.code(), "invalid_field");
        assert!(err.to_string().starts_with("field `state[1]`"), "{err}");
    }

    #[test]
    fn an_unknown_field_is_refused() {
        let err = parse_request(br#"{"robot_id":"a","instruction":"go","image":"x","state":[],"deadline":5}"#)
            .expect_err("refused");
        assert!(err.to_string().contains("deadline"), "{err}");
    }
}
