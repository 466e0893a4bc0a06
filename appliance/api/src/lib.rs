//! Wire types of the appliance's HTTP API.
//!
//! The server (`appliance`), the operator console (`tui`) and the load generator (`bench`)
//! all speak these types, so a field renamed here is renamed everywhere at once.

use serde::{Deserialize, Serialize};

/// Scheduling class of a request. `high` is always served before `normal`, `normal` before
/// `low`; within a class requests are served in arrival order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    High,
    #[default]
    Normal,
    Low,
}

impl Priority {
    /// All classes, in the order they are served.
    pub const ALL: [Priority; 3] = [Priority::High, Priority::Normal, Priority::Low];

    pub fn as_str(self) -> &'static str {
        match self {
            Priority::High => "high",
            Priority::Normal => "normal",
            Priority::Low => "low",
        }
    }
}

/// `POST /v1/inference`: one robot asks for its next action.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InferenceRequest {
    /// Who is asking; used for per-robot settings (priority) and, later, identity and quotas.
    pub robot_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub robot_type: Option<String>,
    /// Model to run; the appliance's default model when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Natural-language instruction, UTF-8.
    pub instruction: String,
    /// Camera image: base64 of a JPEG or PNG file (a `data:image/...;base64,` prefix is accepted).
    pub image: String,
    /// Joint state; its length must match the model's state input.
    pub state: Vec<f32>,
    /// Time budget from arrival until the batch starts computing, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<Priority>,
}

/// Answer to [`InferenceRequest`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InferenceResponse {
    pub request_id: String,
    pub model: String,
    pub model_version: String,
    pub action: Vec<f32>,
    pub timing: Timing,
}

/// Where the time of one request went, as measured by the appliance.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Timing {
    /// From the arrival of the request body to the response being ready.
    pub total_ms: f64,
    /// From entering the model's queue to its batch starting.
    pub queue_ms: f64,
    /// Image decode, resize and normalisation, and instruction encoding.
    pub preprocess_ms: f64,
    /// The batch's compute: tensor assembly, forward and split.
    pub inference_ms: f64,
    /// How many requests shared the forward call.
    pub batch_size: usize,
}

/// The one error shape of every endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// For a person: what was wrong, naming the field or value.
    pub error: String,
    /// Stable, machine-readable code (e.g. `state_length_mismatch`).
    pub code: String,
}

/// `GET /health`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Health {
    /// `ok`, `degraded` (some models failed to load), `unavailable` or `shutting_down`.
    pub status: String,
    pub models: Vec<ModelHealth>,
}

/// One model as `/health` reports it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelHealth {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// `serving`, `failed` (the load failed; see `error`) or `unloaded`.
    pub state: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// `GET /v1/models`: what each model is and how its queue has fared since start.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelList {
    pub default_model: Option<String>,
    pub models: Vec<ModelInfo>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelInfo {
    pub name: String,
    pub version: String,
    pub device: String,
    pub max_batch_size: usize,
    pub batching: bool,
    pub state_dim: usize,
    pub action_dof: usize,
    pub action_horizon: usize,
    pub action_kind: String,
    pub stats: ModelStats,
}

/// Counters since the model was loaded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct ModelStats {
    pub queue_depth: usize,
    pub queue_capacity: usize,
    /// Requests that ran through a forward call.
    pub computed: u64,
    /// Forward calls.
    pub batches: u64,
    /// Requests refused because the queue was full.
    pub rejected_queue_full: u64,
    /// Requests whose deadline passed before their batch started; never computed.
    pub dropped_deadline: u64,
    /// Requests whose client went away before their batch started; never computed.
    pub dropped_disconnect: u64,
    /// Requests whose batch failed in the model.
    pub failed: u64,
}

/// `POST /admin/robots`: register a robot. Its API key is in the answer, and only there.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegisterRobot {
    pub robot_id: String,
    /// Used for requests that send no `robot_type`; requests that send another are refused.
    pub robot_type: String,
    #[serde(default = "default_group")]
    pub group: String,
    /// The robot's priority class: its requests' default and their ceiling.
    #[serde(default)]
    pub priority: Priority,
}

fn default_group() -> String {
    "default".into()
}

/// A registered robot as the admin API shows it (never with key material).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Robot {
    pub robot_id: String,
    pub robot_type: String,
    pub group: String,
    pub priority: Priority,
    pub created_unix_ms: u64,
    /// When the current key was issued; absent once revoked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_created_unix_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_unix_ms: Option<u64>,
}

/// Answer to a registration or a key rotation: the key is shown this once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RobotKey {
    pub robot: Robot,
    pub api_key: String,
}

/// `GET /admin/robots`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RobotList {
    pub robots: Vec<Robot>,
}
