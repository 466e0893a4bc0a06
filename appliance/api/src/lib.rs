//! Wire types of the appliance's HTTP API.
//!
//! The server (`appliance`), the operator console (`tui`) and the load generator (`bench`)
//! all speak these types, so a field renamed here is renamed everywhere at once.

use serde::{Deserialize, Serialize};

#[cfg(feature = "pin")]
pub mod pin;

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
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InferenceRequest {
    /// Who is asking; must be the robot of the credentials.
    pub robot_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub robot_type: Option<String>,
    /// Model to run; the appliance's default model when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Natural-language instruction, UTF-8.
    pub instruction: String,
    /// The frame of a one-camera model: base64 of a JPEG or PNG file (a
    /// `data:image/...;base64,` prefix is accepted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Frames by camera name (`base`, `wrist`, …), for models with several cameras.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub images: std::collections::BTreeMap<String, FrameWire>,
    /// Joint state; its length must match the model's state input.
    pub state: Vec<f32>,
    /// The model's extra inputs by name (a number or nested lists of numbers each).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub extra: std::collections::BTreeMap<String, serde_json::Value>,
    /// The noise seed (models with noise inputs): the same seed, the same decision.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// Time budget from arrival until the batch starts computing, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<Priority>,
}

/// One camera frame: base64 of a JPEG or PNG file, or raw pixels.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum FrameWire {
    Encoded(String),
    /// `{"encoding": "rgb8", "width": W, "height": H, "data": "<base64 of W×H×3 bytes>"}`.
    Raw {
        encoding: String,
        width: u32,
        height: u32,
        data: String,
    },
}

/// Answer to [`InferenceRequest`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InferenceResponse {
    pub request_id: String,
    pub model: String,
    pub model_version: String,
    /// The first step of the action chunk (`dof` values).
    pub action: Vec<f32>,
    /// The whole chunk: `horizon` steps of `dof` values, in the robot's units.
    #[serde(default)]
    pub actions: Vec<Vec<f32>>,
    /// The control period of one step, ms (when the model declares it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dt_ms: Option<f64>,
    /// The model's other outputs, by name.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub outputs: std::collections::BTreeMap<String, Vec<f64>>,
    /// The noise seed the request ran with (models with noise inputs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    pub timing: Timing,
    /// What the policies decided; `actions` are the final ones, after any `modify`.
    #[serde(default)]
    pub policy: PolicyTrace,
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
    /// A serving model's action envelope: `deny`, `clamp`, or `none` (no `[action.envelope]`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub envelope: Option<String>,
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
    /// `pytorch_torchscript` or `pytorch_aoti`.
    #[serde(default)]
    pub platform: String,
    /// The cameras robots send frames of, by name.
    #[serde(default)]
    pub cameras: Vec<String>,
    /// `utf8-bytes`, or the tokenizer file.
    #[serde(default)]
    pub tokenizer: String,
    /// The control period of an action step, ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dt_ms: Option<f64>,
    /// On the CPU: each executor's libtorch threads and how they were chosen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_threads: Option<CpuThreads>,
    pub stats: ModelStats,
}

/// A CPU model's libtorch intra-op threads per executor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CpuThreads {
    pub threads: usize,
    /// `measured` (at warm-up: `models.cpu_threads = 0`) or `config` (`models.cpu_threads`).
    pub chosen_by: String,
    /// Measured only: the largest batch the executors form, the size whose forward cost the
    /// least per sample (at most `max_batch_size`, which is otherwise the largest).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub largest_batch: Option<usize>,
    /// The warm-up forwards they were chosen from.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub measured: Vec<ThreadTiming>,
}

/// One forward timed at warm-up: with `threads` threads at `batch_size`, the median ms.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ThreadTiming {
    pub threads: usize,
    pub batch_size: usize,
    pub forward_ms: f64,
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
    /// Requests evicted from a full queue by a more urgent one (a higher class, or a stop).
    #[serde(default)]
    pub evicted: u64,
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
    /// Declared in the appliance's robots file: changed and revoked there, not through the API.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub declared: bool,
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

/// The decision chain of one request: every policy evaluated, in order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PolicyTrace {
    /// `allow` (action unchanged), `modify` (an enforcing policy changed it) or `deny`.
    pub decision: String,
    pub policies: Vec<PolicyEval>,
}

impl Default for PolicyTrace {
    fn default() -> Self {
        PolicyTrace { decision: "allow".into(), policies: Vec::new() }
    }
}

/// One policy's part in a [`PolicyTrace`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PolicyEval {
    pub name: String,
    pub version: u64,
    /// `admission` or `safety`.
    pub world: String,
    /// `enforce` or `shadow` (shadow decisions are recorded, not applied).
    pub mode: String,
    /// `allow`, `deny`, `modify`, or `error` (the policy failed; enforcing, that denies).
    pub decision: String,
    /// The policy's denial code, or the failure's kind (`timeout`, `trap`, …).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// A denial's severity (`low`, `medium`, `high`, `critical`), when the policy gave one
    /// (`vla:policy@0.2.0`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub severity: Option<String>,
    /// Time of the call, instantiation included, in microseconds.
    pub eval_us: u64,
}

/// An installed policy (`GET /admin/policies`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PolicyInfo {
    pub name: String,
    /// `admission` or `safety`.
    pub world: String,
    /// Counts up with every new component or configuration under this name.
    pub version: u64,
    /// Lower runs first; ties by name.
    pub order: i64,
    /// `enforce` or `shadow`.
    pub mode: String,
    pub enabled: bool,
    /// SHA-256 of the component, hex.
    pub sha256: String,
    pub size_bytes: u64,
    /// Whether the upload carried a valid signature of a trusted key.
    pub signed: bool,
    /// Changes with every change of any kind to this policy (the admin change trail's
    /// sequence number of the last one): a signed change names the revision it applies to.
    #[serde(default)]
    pub revision: u64,
    /// In `policy.required`: it cannot be disabled, shadowed or deleted through the API.
    #[serde(default)]
    pub required: bool,
    /// The `vla:policy` version the component was built against (`0.2.0`, `0.1.0`); none when
    /// it cannot run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wit: Option<String>,
    /// The configuration handed to the policy (JSON).
    pub config: serde_json::Value,
    pub created_unix_ms: u64,
    pub updated_unix_ms: u64,
    /// `ready`, `broken` (cannot run: every request it sees is denied) or `circuit_open`.
    pub state: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
    pub stats: PolicyStats,
}

/// Counters since the appliance started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct PolicyStats {
    pub evaluations: u64,
    pub allows: u64,
    pub denials: u64,
    pub modifications: u64,
    pub failures: u64,
    pub consecutive_failures: u64,
    /// Mean call time, microseconds.
    pub mean_eval_us: f64,
}

/// `GET /admin/policies`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PolicyList {
    pub policies: Vec<PolicyInfo>,
}

/// `PATCH /admin/policies/{name}`: any subset. Every PATCH also closes an open circuit breaker.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyPatch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub order: Option<i64>,
    /// A new configuration (a JSON object); bumps the version after a dry run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<serde_json::Value>,
    /// Roll forward: with `"mode": "enforce"`, atomically removes the named policy, so a
    /// version trialled in shadow mode takes over from the one it replaces with no gap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replace: Option<String>,
}

/// The body of a 422 `policy_rejected` (a policy denied) or `policy_error` (a policy failed).
/// No action is returned.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PolicyRefusalBody {
    pub error: String,
    pub code: String,
    pub denied_by: PolicyDenial,
    /// The chain up to and including the refusing policy.
    pub policy: PolicyTrace,
}

/// Which policy refused a request, and why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PolicyDenial {
    pub name: String,
    pub version: u64,
    /// The policy's own denial code, or the failure's kind (`timeout`, `trap`, …).
    pub code: String,
    pub reason: String,
}

/// One audited decision (`GET /admin/audit`), with everything it depended on: the request's
/// context and the policy's exact component and configuration, so it can be replayed.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AuditRecord {
    pub seq: u64,
    pub time_unix_ms: u64,
    pub request_id: String,
    pub robot_id: String,
    pub robot_type: String,
    pub model: String,
    pub policy: String,
    pub version: u64,
    pub world: String,
    pub mode: String,
    /// `deny`, `modify` or `error`.
    pub decision: String,
    /// Whether it changed what the robot got (enforce mode) or was only recorded (shadow).
    pub applied: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// A denial's severity, when the policy gave one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub severity: Option<String>,
    /// The serving model's version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_version: Option<String>,
    /// The robot's instruction and joint state, as sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instruction: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none", with = "floats")]
    pub state: Option<Vec<f32>>,
    /// SHA-256 (hex) of the policy's component and of its configuration (the JSON it reads).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_sha256: Option<String>,
    /// The action the policy was shown (safety policies). Non-finite values (which the host
    /// never lets a policy or a robot see, but a record must survive) are the strings `NaN`,
    /// `Infinity`, `-Infinity`.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "floats")]
    pub original_action: Option<Vec<f32>>,
    /// The action after this policy: the replacement for `modify`, none for `deny`.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "floats")]
    pub final_action: Option<Vec<f32>>,
    /// How many identical decisions of this robot (policy, version, decision, code) this record
    /// stands for: a burst of denials is folded into one record.
    #[serde(default = "one")]
    pub count: u64,
    /// When the last of those was decided (with `count` > 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_unix_ms: Option<u64>,
    /// The noise seed the request ran with (models with noise inputs), to replay it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
}

fn one() -> u64 {
    1
}

/// Float lists whose non-finite values survive JSON: as the strings `NaN`, `Infinity` and
/// `-Infinity` (JSON numbers cannot hold them).
pub mod floats {
    use serde::de::Error;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    #[derive(Serialize, Deserialize)]
    #[serde(untagged)]
    enum Value {
        Number(f32),
        Text(String),
    }

    fn to_value(v: f32) -> Value {
        if v.is_finite() {
            Value::Number(v)
        } else if v.is_nan() {
            Value::Text("NaN".into())
        } else if v > 0.0 {
            Value::Text("Infinity".into())
        } else {
            Value::Text("-Infinity".into())
        }
    }

    pub fn serialize<S: Serializer>(values: &Option<Vec<f32>>, s: S) -> Result<S::Ok, S::Error> {
        values.as_ref().map(|v| v.iter().map(|&x| to_value(x)).collect::<Vec<_>>()).serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<f32>>, D::Error> {
        let values: Option<Vec<Option<Value>>> = Option::deserialize(d)?;
        values
            .map(|v| {
                v.into_iter()
                    .map(|x| match x {
                        Some(Value::Number(n)) => Ok(n),
                        // Older records wrote non-finite values as `null`.
                        None => Ok(f32::NAN),
                        Some(Value::Text(t)) => match t.as_str() {
                            "NaN" => Ok(f32::NAN),
                            "Infinity" => Ok(f32::INFINITY),
                            "-Infinity" => Ok(f32::NEG_INFINITY),
                            other => Err(D::Error::custom(format!("`{other}` is not a number"))),
                        },
                    })
                    .collect()
            })
            .transpose()
    }
}

/// `GET /admin/audit`, newest first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditList {
    pub records: Vec<AuditRecord>,
}

/// One request's policy decisions with everything they depended on, as the replay ring keeps
/// it (`policy.replay_ring`): the context, the model's proposed action, each policy's exact
/// component, configuration and decision, and the final action.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DecisionRecord {
    pub seq: u64,
    pub time_unix_ms: u64,
    pub request_id: String,
    pub robot_id: String,
    pub robot_type: String,
    pub model: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_version: Option<String>,
    pub instruction: String,
    #[serde(default, with = "floats")]
    pub state: Option<Vec<f32>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// The request's outcome at the policy stage: `allow`, `modify`, `deny` (or `error`: an
    /// enforcing policy failed).
    pub decision: String,
    /// The action's shape as the policies saw it: `joint-velocity`, `joint-position` or
    /// `end-effector-delta`, dof and horizon (none when admission refused the request).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action_kind: Option<String>,
    #[serde(default)]
    pub dof: u32,
    #[serde(default)]
    pub horizon: u32,
    /// The model's action before any safety policy; none when admission refused the request.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "floats")]
    pub proposed_action: Option<Vec<f32>>,
    /// The action after the safety policies (before the host's action envelope).
    #[serde(default, skip_serializing_if = "Option::is_none", with = "floats")]
    pub final_action: Option<Vec<f32>>,
    /// Each policy that ran, in order (admission, then safety).
    pub policies: Vec<DecisionStep>,
}

/// One policy's part in a [`DecisionRecord`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DecisionStep {
    pub name: String,
    pub version: u64,
    pub world: String,
    pub mode: String,
    /// `allow`, `deny`, `modify` or `error`.
    pub decision: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub severity: Option<String>,
    /// SHA-256 (hex) of its component and of its configuration.
    pub sha256: String,
    pub config_sha256: String,
    /// Its replacement action, when it returned `modify`.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "floats")]
    pub action: Option<Vec<f32>>,
}

/// `POST /admin/policies/{name}/replay` (JSON body; a multipart body uploads a candidate
/// component instead, with the upload's fields plus these).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplayRequest {
    /// The candidate's configuration; the installed policy's when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<serde_json::Value>,
    /// Only requests recorded at or after this time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since_unix_ms: Option<u64>,
    /// Most recorded requests to replay, newest first (default 1000, at most 10,000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<usize>,
    /// The installed policy the candidate stands in for (the name in the path by default): it
    /// is shown what that policy was shown and compared with what it decided.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replaces: Option<String>,
}

/// What a candidate policy would have decided on recorded requests.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ReplayReport {
    /// The candidate: name, world, the `vla:policy` version, component and config SHA-256.
    pub policy: String,
    pub world: String,
    pub sha256: String,
    pub config_sha256: String,
    /// The installed policy it was compared with.
    pub replaces: String,
    /// Requests replayed, those it decided as recorded, those it would decide otherwise.
    pub replayed: u64,
    pub unchanged: u64,
    /// Requests it could not be shown (a safety candidate on a request admission refused).
    pub skipped: u64,
    pub changed: Vec<ReplayChange>,
}

/// One recorded request a candidate would decide otherwise.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ReplayChange {
    pub seq: u64,
    pub request_id: String,
    pub robot_id: String,
    pub time_unix_ms: u64,
    pub recorded: ReplayOutcome,
    pub candidate: ReplayOutcome,
}

/// A decision in a replay: `allow`, `modify` (with the action), `deny` (with the code) or
/// `error` (the candidate failed: it would have denied, fail closed).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ReplayOutcome {
    pub decision: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none", with = "floats")]
    pub action: Option<Vec<f32>>,
}

/// One change made through the admin API (`GET /admin/changes`), newest first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdminChange {
    pub seq: u64,
    pub time_unix_ms: u64,
    /// Who: `admin-token:<first 8 hex of the token's SHA-256>`, with the client certificate's
    /// names when the connection presented one.
    pub who: String,
    /// The peer address the change came from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer: Option<String>,
    /// What: `policy.upload`, `policy.patch`, `policy.delete`, `robot.register`,
    /// `robot.revoke`, `robot.rotate_key`, `quota.set`, `quota.reset`, `model.load`,
    /// `model.unload`.
    pub action: String,
    /// The policy, robot or model changed.
    pub target: String,
    /// The base64 public key whose signature authorised the change, when one did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signed_by: Option<String>,
    /// The target before and after (secrets left out); `null` where it did not exist.
    pub before: serde_json::Value,
    pub after: serde_json::Value,
}

/// `GET /admin/changes`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdminChangeList {
    pub changes: Vec<AdminChange>,
}

/// Limits of one robot or group: `PUT /admin/quotas/{robot}`, and `quota.robots.<id>` /
/// `quota.groups.<group>` in the configuration. A field left out falls through to the next
/// source (configuration, then the rate-limit policy's own defaults).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuotaLimits {
    /// `<requests>/<period>`, e.g. `10/min`, `5/s`, `300/15m` (units ms, s, min or m, h, d).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate: Option<String>,
    /// Requests allowed at once, at most; defaults to the rate's request count.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<u64>,
    /// Requests per UTC day.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub day: Option<u64>,
    /// Requests per UTC calendar month.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub month: Option<u64>,
}

/// One bucket of a robot or group as it stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuotaBucket {
    /// `robot` or `group`.
    pub scope: String,
    /// `rate`, `day` or `month`.
    pub bucket: String,
    /// The burst (rate) or the period's maximum (day, month).
    pub limit: u64,
    pub used: u64,
    pub remaining: u64,
    /// When the rate bucket is full again, or the period starts over.
    pub reset_unix_ms: u64,
    /// Where the limit comes from: `admin` (this API), `config`, or `policy` (the limit the
    /// rate-limit policy last charged under).
    pub source: String,
}

/// `GET /admin/quotas/{robot}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RobotQuota {
    pub robot_id: String,
    pub robot_type: String,
    pub group: String,
    /// The operator's limits for this robot set through this API (empty when none).
    pub overrides: QuotaLimits,
    /// The limits the configuration sets for this robot.
    pub configured: QuotaLimits,
    /// The robot's and its group's buckets that have a limit or have been charged.
    pub buckets: Vec<QuotaBucket>,
}

/// `GET /admin/quotas`: every registered robot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuotaList {
    pub robots: Vec<RobotQuota>,
}

/// `GET /gpu/stats`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GpuStats {
    pub available: bool,
    /// Why not, when not available.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub devices: Vec<GpuDevice>,
    /// When the reading was taken (Unix ms); 0 before the first.
    pub updated_unix_ms: u64,
}

/// One device as `/gpu/stats` shows it: GB and percent, rounded for people. A field the device
/// does not report is absent, never 0.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GpuDevice {
    pub index: u32,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub utilization_percent: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_used_gb: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_total_gb: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_utilization_percent: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature_celsius: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub power_watts: Option<f64>,
    #[serde(default)]
    pub throttle_reasons: Vec<String>,
}

/// `GET /queue/stats`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QueueStats {
    pub models: Vec<QueueModel>,
}

/// One serving model's queue and batching, counters since it was loaded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QueueModel {
    pub model: String,
    pub queue_depth: usize,
    pub queue_capacity: usize,
    pub queue_utilization_percent: f64,
    pub max_batch_size: usize,
    pub workers: usize,
    pub device: String,
    pub batching: bool,
    pub computed: u64,
    pub batches: u64,
    pub mean_batch_size: f64,
    pub rejected_queue_full: u64,
    pub dropped_deadline: u64,
    pub dropped_disconnect: u64,
    pub failed: u64,
}

/// `GET /models/stats`: the serving models, and every model's health.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelsStats {
    pub models: Vec<ModelInfo>,
    pub health: Vec<ModelHealth>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn audit_records_with_non_finite_actions_round_trip() {
        let record = AuditRecord {
            seq: 1,
            time_unix_ms: 2,
            request_id: "r".into(),
            robot_id: "arm".into(),
            robot_type: "t".into(),
            model: "m".into(),
            policy: "p".into(),
            version: 1,
            world: "safety".into(),
            mode: "enforce".into(),
            decision: "deny".into(),
            applied: true,
            code: None,
            reason: None,
            original_action: Some(vec![0.5, f32::NAN, f32::INFINITY, f32::NEG_INFINITY]),
            final_action: None,
            count: 3,
            last_unix_ms: Some(9),
            seed: Some(5),
            state: Some(vec![0.1, f32::NAN]),
            ..AuditRecord::default()
        };
        let json = serde_json::to_string(&record).expect("serialises");
        assert!(json.contains(r#"[0.5,"NaN","Infinity","-Infinity"]"#), "{json}");
        let back: AuditRecord = serde_json::from_str(&json).expect("reads back");
        let values = back.original_action.clone().expect("kept");
        assert!(values[1].is_nan() && values[2] == f32::INFINITY && values[3] == f32::NEG_INFINITY);
        assert_eq!((back.count, back.last_unix_ms), (3, Some(9)));
        // What older appliances wrote (non-finite as null, no count) still reads.
        let old = json
            .replace(r#""NaN","Infinity","-Infinity""#, "null,null,null")
            .replace(r#","count":3,"last_unix_ms":9"#, "");
        let back: AuditRecord = serde_json::from_str(&old).expect("reads old records");
        assert_eq!(back.count, 1);
        assert!(back.original_action.expect("kept")[1].is_nan());
    }
}
