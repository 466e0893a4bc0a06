//! `model.toml`: what a model in the repository is, how robots' requests are turned into its
//! inputs, how it is batched and where it runs. Parsed and checked before the model loads;
//! every problem names the file, the field and what is wrong.
//!
//! Every input of the forward is fed by exactly one declared source: a camera (`[[cameras]]`),
//! the tokenizer's ids or attention mask (`[tokenizer]`), the robot's state (`[state]`), host
//! noise (`[[noise]]`) or a robot-supplied extra input (`[[extra_inputs]]`). The action is one
//! output (`[action]`, `horizon` steps of `dof` values, step-major, at `dt_ms`); the other
//! outputs are returned under their names. The first version's `[preprocess]` section (one
//! image, byte tokens, the state) is still read, as the equivalent camera, tokenizer and state.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Tensor element types, named as the Open Inference Protocol names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DataType {
    #[serde(rename = "BOOL")]
    Bool,
    #[serde(rename = "UINT8")]
    Uint8,
    #[serde(rename = "INT8")]
    Int8,
    #[serde(rename = "INT16")]
    Int16,
    #[serde(rename = "INT32")]
    Int32,
    #[serde(rename = "INT64")]
    Int64,
    #[serde(rename = "FP16")]
    Fp16,
    #[serde(rename = "FP32")]
    Fp32,
    #[serde(rename = "FP64")]
    Fp64,
}

impl DataType {
    /// Bytes of one element.
    pub fn size(self) -> usize {
        match self {
            DataType::Bool | DataType::Uint8 | DataType::Int8 => 1,
            DataType::Int16 | DataType::Fp16 => 2,
            DataType::Int32 | DataType::Fp32 => 4,
            DataType::Int64 | DataType::Fp64 => 8,
        }
    }

    pub fn is_float(self) -> bool {
        matches!(self, DataType::Fp16 | DataType::Fp32 | DataType::Fp64)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            DataType::Bool => "BOOL",
            DataType::Uint8 => "UINT8",
            DataType::Int8 => "INT8",
            DataType::Int16 => "INT16",
            DataType::Int32 => "INT32",
            DataType::Int64 => "INT64",
            DataType::Fp16 => "FP16",
            DataType::Fp32 => "FP32",
            DataType::Fp64 => "FP64",
        }
    }
}

/// One input or output of the TorchScript `forward`, in argument order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TensorSpec {
    pub name: String,
    pub dtype: DataType,
    /// Shape including the batch dimension, which must be first and `-1`.
    pub dims: Vec<i64>,
}

impl TensorSpec {
    /// Elements of one sample (the product of the dims after the batch dimension).
    pub fn sample_len(&self) -> usize {
        self.dims[1..].iter().map(|&d| d as usize).product()
    }
}

/// Where the model runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceSpec {
    /// CUDA device 0 when one is usable, else CPU.
    Auto,
    Cpu,
    Cuda(usize),
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSpec::Auto => f.write_str("auto"),
            DeviceSpec::Cpu => f.write_str("cpu"),
            DeviceSpec::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl std::str::FromStr for DeviceSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(DeviceSpec::Auto),
            "cpu" => Ok(DeviceSpec::Cpu),
            "cuda" => Ok(DeviceSpec::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(DeviceSpec::Cuda)
                .ok_or_else(|| format!("`{s}` is not one of auto, cpu, cuda:N")),
        }
    }
}

impl Serialize for DeviceSpec {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for DeviceSpec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// What the action values mean to the robot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ActionKind {
    JointVelocity,
    JointPosition,
    EndEffectorDelta,
}

impl ActionKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ActionKind::JointVelocity => "joint_velocity",
            ActionKind::JointPosition => "joint_position",
            ActionKind::EndEffectorDelta => "end_effector_delta",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BatchingSpec {
    /// Off: every request runs alone (batch size 1).
    pub enabled: bool,
    /// How long the oldest queued request may wait for others to join its batch. 0 (the
    /// default): never; an idle executor takes whatever is queued at once, and requests that
    /// arrive while every executor is busy go together in its next batch.
    pub max_queue_delay_us: u64,
    /// Batch sizes dispatched as soon as that many requests are queued, when the batch waits
    /// (`max_queue_delay_us` > 0); with no delay everything queued goes at once.
    pub preferred_batch_sizes: Vec<usize>,
    /// Requests that may wait in the queue; beyond it requests get 503 at once.
    pub queue_capacity: usize,
    /// Executor threads, each with its own copy of the model.
    pub instances: usize,
    /// Deadline of a request that sets no `deadline_ms`.
    pub default_deadline_ms: u64,
}

impl Default for BatchingSpec {
    fn default() -> Self {
        BatchingSpec {
            enabled: true,
            max_queue_delay_us: 0,
            preferred_batch_sizes: Vec::new(),
            queue_capacity: 256,
            instances: 1,
            default_deadline_ms: 1_000,
        }
    }
}

/// How a model is packaged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Platform {
    /// `model.pt`: a TorchScript module (`torch.jit.trace` / `script`).
    #[serde(rename = "pytorch_torchscript")]
    TorchScript,
    /// `model.pt2`: a `torch.export` program compiled by AOTInductor
    /// (`torch._inductor.aoti_compile_and_package`), for the device it was compiled for.
    #[serde(rename = "pytorch_aoti")]
    Aoti,
}

impl Platform {
    pub fn as_str(self) -> &'static str {
        match self {
            Platform::TorchScript => "pytorch_torchscript",
            Platform::Aoti => "pytorch_aoti",
        }
    }

    /// The weights file in the model's directory.
    pub fn file(self) -> &'static str {
        match self {
            Platform::TorchScript => "model.pt",
            Platform::Aoti => "model.pt2",
        }
    }
}

/// How a camera frame is laid out in its input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Layout {
    /// `[N, 3, height, width]`.
    Nchw,
    /// `[N, height, width, 3]`.
    Nhwc,
}

/// One camera: which input its frames feed and how.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CameraSpec {
    /// What robots call it (`"images": {"<name>": …}`).
    pub name: String,
    pub input: String,
    pub height: u32,
    pub width: u32,
    #[serde(default = "nchw")]
    pub layout: Layout,
    /// `FP32`: RGB normalised, `(pixel / 255 - mean) / std`; `UINT8`: raw RGB pixels (the model
    /// normalises them).
    #[serde(default = "fp32")]
    pub dtype: DataType,
    #[serde(default = "imagenet_mean")]
    pub mean: [f32; 3],
    #[serde(default = "imagenet_std")]
    pub std: [f32; 3],
    /// A missing required camera is refused (422); a missing optional one is a black frame.
    #[serde(default = "yes")]
    pub required: bool,
}

fn nchw() -> Layout {
    Layout::Nchw
}
fn fp32() -> DataType {
    DataType::Fp32
}
fn imagenet_mean() -> [f32; 3] {
    [0.485, 0.456, 0.406]
}
fn imagenet_std() -> [f32; 3] {
    [0.229, 0.224, 0.225]
}
fn yes() -> bool {
    true
}

/// What an instruction longer than the tokenizer's `max_length` gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Truncation {
    /// 422 `instruction_too_long`.
    #[default]
    Error,
    /// Cut to `max_length` tokens.
    Truncate,
}

/// How instructions become tokens.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenizerSpec {
    /// A Hugging Face `tokenizer.json` in the model's directory; absent with
    /// `encoding = "utf8-bytes"` (the UTF-8 bytes as token ids, no mask).
    #[serde(default)]
    pub file: Option<String>,
    #[serde(default)]
    pub encoding: Option<String>,
    pub ids_input: String,
    /// `1` for each real token, `0` for padding; same length as the ids.
    #[serde(default)]
    pub mask_input: Option<String>,
    /// Tokens at most; default: the ids input's length (padded to it, always).
    #[serde(default)]
    pub max_length: Option<usize>,
    /// `max_length` (the only padding: batches need one length).
    #[serde(default = "max_length")]
    pub padding: String,
    #[serde(default)]
    pub truncation: Truncation,
    /// The id padding uses; default: the tokenizer's `[PAD]` (or `<pad>`) token, else 0.
    #[serde(default)]
    pub pad_id: Option<u32>,
}

fn max_length() -> String {
    "max_length".into()
}

/// The robot's state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateSpec {
    pub input: String,
    /// Per-dimension statistics: the model sees `(state - mean) / std`; policies and the audit
    /// log see the state as the robot sent it.
    #[serde(default)]
    pub mean: Option<Vec<f32>>,
    #[serde(default)]
    pub std: Option<Vec<f32>>,
}

/// An input the host fills with noise (diffusion and flow-matching policies start from it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NoiseSpec {
    pub input: String,
    /// `normal`: standard normal, from the request's seed (see `noise.rs`), so a decision can be
    /// replayed.
    pub distribution: String,
}

/// An input the robot supplies itself (`"extra": {"<name>": …}`), e.g. a task id.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExtraInputSpec {
    pub name: String,
    pub input: String,
    /// A missing required input is refused (422); a missing optional one is zeros.
    #[serde(default = "yes")]
    pub required: bool,
}

/// `[openpi]`: which keys of an openpi observation (`GET /openpi/{model}`, the
/// `openpi-client` WebSocket protocol) feed which source. A key with `/` also walks nested
/// maps (`{"observation": {"image": …}}` is `observation/image`). Unset keys take the layout
/// openpi's LIBERO and DROID examples use: the first camera `observation/image`, the second
/// `observation/wrist_image`, others `observation/<camera>_image`; the state
/// `observation/state`; the prompt `prompt`; an extra input `observation/<name>`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OpenpiSpec {
    /// Camera name → observation key.
    pub cameras: std::collections::BTreeMap<String, String>,
    /// The state's key, or several whose vectors are concatenated in order (DROID sends
    /// `observation/joint_position` and `observation/gripper_position`).
    pub state: Option<OneOrMany>,
    pub prompt: Option<String>,
    /// The instruction when an observation carries no prompt; without one, a missing prompt is
    /// refused.
    pub default_prompt: Option<String>,
    /// Extra input name → observation key.
    pub extra: std::collections::BTreeMap<String, String>,
}

/// A key, or a list of them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

/// The observation keys of every source, resolved from `[openpi]` and the defaults.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct OpenpiKeys {
    /// Per camera, in [`ModelSpec::cameras`] order.
    pub cameras: Vec<String>,
    pub state: Vec<String>,
    pub prompt: String,
    pub default_prompt: Option<String>,
    /// Per extra input, in [`ModelSpec::extra_inputs`] order.
    pub extra: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ActionSpec {
    /// The output holding the action: FP32, `horizon × dof` values per sample (`[N, horizon *
    /// dof]` or `[N, horizon, dof]`), step-major.
    pub output: String,
    pub dof: usize,
    #[serde(default = "one")]
    pub horizon: usize,
    pub kind: ActionKind,
    /// The control period of one step, ms.
    #[serde(default)]
    pub dt_ms: Option<f64>,
    /// Per-dof statistics: the robot gets `value * std + mean` (every step).
    #[serde(default)]
    pub mean: Option<Vec<f32>>,
    #[serde(default)]
    pub std: Option<Vec<f32>>,
    /// What the robot can physically take (`[action.envelope]`): the host holds the final
    /// action to it, after every safety policy (see `envelope.rs`).
    #[serde(default)]
    pub envelope: Option<EnvelopeSpec>,
}

/// `[action.envelope]`: per-dof bounds on every step of the final action (robot units), an
/// optional largest change between consecutive steps, and what a violation does.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnvelopeSpec {
    pub min: Vec<f32>,
    pub max: Vec<f32>,
    /// Per dof, the largest change from one step to the next: within a chunk, and from the
    /// first step of the robot's previous answer to the first step of this one.
    #[serde(default)]
    pub max_delta: Option<Vec<f32>>,
    #[serde(default)]
    pub on_violation: OnViolation,
    /// A robot's previous action is forgotten after this long without an answer (its next
    /// action is then checked against the bounds only).
    #[serde(default = "default_forget_after_ms")]
    pub forget_after_ms: u64,
}

fn default_forget_after_ms() -> u64 {
    2_000
}

/// What a violation of the envelope does: refuse the request (422), or clamp the action into
/// the envelope (the answer's decision is then `modify`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnViolation {
    #[default]
    Deny,
    Clamp,
}

impl OnViolation {
    pub fn as_str(self) -> &'static str {
        match self {
            OnViolation::Deny => "deny",
            OnViolation::Clamp => "clamp",
        }
    }
}

fn one() -> usize {
    1
}

fn default_version() -> String {
    "1".into()
}

/// The first version's `[preprocess]` section (read as the equivalent camera, tokenizer and
/// state).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct LegacyPreprocess {
    image: LegacyImage,
    instruction: LegacyInstruction,
    state: LegacyState,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct LegacyImage {
    input: String,
    height: u32,
    width: u32,
    mean: [f32; 3],
    std: [f32; 3],
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct LegacyInstruction {
    input: String,
    encoding: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct LegacyState {
    input: String,
}

/// `model.toml` as written.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSpec {
    #[serde(default)]
    name: String,
    #[serde(default = "default_version")]
    version: String,
    #[serde(default = "default_platform")]
    platform: Platform,
    device: DeviceSpec,
    max_batch_size: usize,
    #[serde(default)]
    batching: BatchingSpec,
    inputs: Vec<TensorSpec>,
    outputs: Vec<TensorSpec>,
    #[serde(default)]
    cameras: Vec<CameraSpec>,
    #[serde(default)]
    tokenizer: Option<TokenizerSpec>,
    #[serde(default)]
    state: Option<StateSpec>,
    #[serde(default)]
    noise: Vec<NoiseSpec>,
    #[serde(default)]
    extra_inputs: Vec<ExtraInputSpec>,
    #[serde(default)]
    preprocess: Option<LegacyPreprocess>,
    action: ActionSpec,
    #[serde(default)]
    openpi: OpenpiSpec,
}

fn default_platform() -> Platform {
    Platform::TorchScript
}

/// What feeds one input of the forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Feed {
    /// Camera `i` of [`ModelSpec::cameras`].
    Camera(usize),
    TokenIds,
    TokenMask,
    State,
    /// Noise input `i` of [`ModelSpec::noise`].
    Noise(usize),
    /// Extra input `i` of [`ModelSpec::extra_inputs`].
    Extra(usize),
}

/// A checked `model.toml`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelSpec {
    /// Defaults to the model's directory name; must equal it when given.
    pub name: String,
    pub version: String,
    pub platform: Platform,
    pub device: DeviceSpec,
    pub max_batch_size: usize,
    pub batching: BatchingSpec,
    pub inputs: Vec<TensorSpec>,
    pub outputs: Vec<TensorSpec>,
    pub cameras: Vec<CameraSpec>,
    pub tokenizer: TokenizerSpec,
    pub state: StateSpec,
    pub noise: Vec<NoiseSpec>,
    pub extra_inputs: Vec<ExtraInputSpec>,
    pub action: ActionSpec,
    /// Per input, what feeds it (derived).
    pub feeds: Vec<Feed>,
    /// The action output's index (derived).
    pub action_output: usize,
    /// Which observation keys feed which source on the openpi endpoint (derived from
    /// `[openpi]`).
    pub openpi: OpenpiKeys,
}

/// A `model.toml` that cannot be served, with the file, field and problem.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: field `{field}`: {problem}", file.display())]
pub struct SpecError {
    pub file: PathBuf,
    pub field: String,
    pub problem: String,
}

type Problem = (String, String);

fn problem(field: impl Into<String>, problem: impl Into<String>) -> Problem {
    (field.into(), problem.into())
}

impl ModelSpec {
    /// Reads and checks `<dir>/model.toml`; the model's name defaults to `dir`'s name.
    pub fn load(dir: &Path) -> Result<ModelSpec, SpecError> {
        let file = dir.join("model.toml");
        let text = std::fs::read_to_string(&file).map_err(|e| SpecError {
            file: file.clone(),
            field: "-".into(),
            problem: format!("cannot be read: {e}"),
        })?;
        let dir_name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        ModelSpec::parse(&text, &dir_name).map_err(|(field, problem)| SpecError { file, field, problem })
    }

    /// Parses and checks `text`; errors are `(field, problem)`.
    pub fn parse(text: &str, dir_name: &str) -> Result<ModelSpec, (String, String)> {
        let de = toml::Deserializer::new(text);
        let mut raw: RawSpec = serde_path_to_error::deserialize(de).map_err(|e| {
            let field = e.path().to_string();
            let inner = e.into_inner();
            let field = if field == "." { "-".to_string() } else { field };
            (field, inner.message().trim().to_string())
        })?;
        if raw.name.is_empty() {
            raw.name = dir_name.to_string();
        } else if raw.name != dir_name {
            return Err(problem(
                "name",
                format!("`{}` differs from the model's directory name `{dir_name}`", raw.name),
            ));
        }
        // The first version's section, as its equivalent.
        if let Some(legacy) = raw.preprocess.take() {
            if !raw.cameras.is_empty() || raw.tokenizer.is_some() || raw.state.is_some() {
                return Err(problem(
                    "preprocess",
                    "is the older form of [[cameras]], [tokenizer] and [state]: give one or the other",
                ));
            }
            let i = legacy.image;
            raw.cameras.push(CameraSpec {
                name: "image".into(),
                input: i.input,
                height: i.height,
                width: i.width,
                layout: Layout::Nchw,
                dtype: DataType::Fp32,
                mean: i.mean,
                std: i.std,
                required: true,
            });
            raw.tokenizer = Some(TokenizerSpec {
                file: None,
                encoding: Some(legacy.instruction.encoding),
                ids_input: legacy.instruction.input,
                mask_input: None,
                max_length: None,
                padding: max_length(),
                truncation: Truncation::Truncate,
                pad_id: None,
            });
            raw.state = Some(StateSpec { input: legacy.state.input, mean: None, std: None });
        }
        let tokenizer =
            raw.tokenizer.take().ok_or_else(|| problem("tokenizer", "missing: how instructions become tokens"))?;
        let state = raw.state.take().ok_or_else(|| problem("state", "missing: which input the robot's state feeds"))?;
        let mut spec = ModelSpec {
            name: raw.name,
            version: raw.version,
            platform: raw.platform,
            device: raw.device,
            max_batch_size: raw.max_batch_size,
            batching: raw.batching,
            inputs: raw.inputs,
            outputs: raw.outputs,
            cameras: raw.cameras,
            tokenizer,
            state,
            noise: raw.noise,
            extra_inputs: raw.extra_inputs,
            action: raw.action,
            feeds: Vec::new(),
            action_output: 0,
            openpi: OpenpiKeys::default(),
        };
        spec.check()?;
        spec.openpi = spec.openpi_keys(raw.openpi)?;
        Ok(spec)
    }

    /// The index of input `name`.
    pub fn input(&self, name: &str) -> Option<usize> {
        self.inputs.iter().position(|t| t.name == name)
    }

    /// The input camera `c` feeds.
    pub fn camera_input(&self, c: usize) -> usize {
        self.feeds.iter().position(|f| *f == Feed::Camera(c)).unwrap_or(0)
    }

    /// The input of `feed`, if the model has one.
    pub fn input_of(&self, feed: Feed) -> Option<usize> {
        self.feeds.iter().position(|f| *f == feed)
    }

    /// Length of the state vector robots send.
    pub fn state_dim(&self) -> usize {
        self.input_of(Feed::State).map_or(0, |i| self.inputs[i].sample_len())
    }

    /// Number of instruction tokens the model takes.
    pub fn instruction_len(&self) -> usize {
        self.input_of(Feed::TokenIds).map_or(0, |i| self.inputs[i].sample_len())
    }

    /// The camera of the single-`image` field: the only one, or the first required.
    pub fn default_camera(&self) -> Option<usize> {
        match self.cameras.len() {
            0 => None,
            1 => Some(0),
            _ => self.cameras.iter().position(|c| c.required),
        }
    }

    /// Whether `other` takes exactly the same inputs from robots (a reload that keeps them can
    /// take requests prepared for this one).
    pub fn same_inputs(&self, other: &ModelSpec) -> bool {
        self.inputs == other.inputs
            && self.cameras == other.cameras
            && self.tokenizer == other.tokenizer
            && self.state == other.state
            && self.noise == other.noise
            && self.extra_inputs == other.extra_inputs
    }

    /// Batch sizes to warm up: 1, each preferred size and the maximum.
    pub fn warmup_batch_sizes(&self) -> Vec<usize> {
        let mut sizes = vec![1, self.effective_max_batch()];
        sizes.extend(self.batching.preferred_batch_sizes.iter().copied());
        sizes.sort_unstable();
        sizes.dedup();
        sizes
    }

    /// The largest batch actually formed: 1 with batching off.
    pub fn effective_max_batch(&self) -> usize {
        if self.batching.enabled { self.max_batch_size } else { 1 }
    }

    /// What the console and `/v1/models` say of the tokenizer.
    pub fn tokenizer_label(&self) -> String {
        match &self.tokenizer.file {
            Some(file) => file.clone(),
            None => "utf8-bytes".into(),
        }
    }

    /// `[openpi]` checked against the model's sources, with the defaults filled in.
    fn openpi_keys(&self, o: OpenpiSpec) -> Result<OpenpiKeys, Problem> {
        if let Some(name) = o.cameras.keys().find(|n| !self.cameras.iter().any(|c| &&c.name == n)) {
            return Err(problem(format!("openpi.cameras.{name}"), "not one of the model's [[cameras]]"));
        }
        if let Some(name) = o.extra.keys().find(|n| !self.extra_inputs.iter().any(|e| &&e.name == n)) {
            return Err(problem(format!("openpi.extra.{name}"), "not one of the model's [[extra_inputs]]"));
        }
        let cameras: Vec<String> = self
            .cameras
            .iter()
            .enumerate()
            .map(|(i, c)| match (o.cameras.get(&c.name), i) {
                (Some(key), _) => key.clone(),
                (None, 0) => "observation/image".into(),
                (None, 1) => "observation/wrist_image".into(),
                (None, _) => format!("observation/{}_image", c.name),
            })
            .collect();
        let state = match o.state {
            None => vec!["observation/state".to_string()],
            Some(OneOrMany::One(key)) => vec![key],
            Some(OneOrMany::Many(keys)) => keys,
        };
        let extra: Vec<String> = self
            .extra_inputs
            .iter()
            .map(|e| o.extra.get(&e.name).cloned().unwrap_or_else(|| format!("observation/{}", e.name)))
            .collect();
        let prompt = o.prompt.unwrap_or_else(|| "prompt".into());
        let mut seen = std::collections::BTreeSet::new();
        for key in cameras.iter().chain(&state).chain(&extra).chain([&prompt]) {
            if key.is_empty() || key.len() > 128 || key.split('/').any(str::is_empty) {
                return Err(problem("openpi", format!("key `{key}` must be 1-128 bytes with no empty `/` part")));
            }
            if !seen.insert(key.as_str()) {
                return Err(problem("openpi", format!("key `{key}` feeds two sources")));
            }
        }
        if state.is_empty() {
            return Err(problem("openpi.state", "needs at least one key"));
        }
        Ok(OpenpiKeys { cameras, state, prompt, default_prompt: o.default_prompt, extra })
    }

    fn check(&mut self) -> Result<(), Problem> {
        if !crate::names::is_valid_name(&self.name) {
            return Err(problem("name", format!("`{}` must be 1-64 of [A-Za-z0-9._-]", self.name)));
        }
        if self.version.is_empty() || !crate::names::is_valid_name(&self.version) {
            return Err(problem("version", format!("`{}` must be 1-64 of [A-Za-z0-9._-]", self.version)));
        }
        if !(1..=1024).contains(&self.max_batch_size) {
            return Err(problem("max_batch_size", format!("must be 1-1024, got {}", self.max_batch_size)));
        }
        let b = &self.batching;
        if b.max_queue_delay_us > 1_000_000 {
            return Err(problem(
                "batching.max_queue_delay_us",
                format!("must be at most 1000000, got {}", b.max_queue_delay_us),
            ));
        }
        if let Some(&p) = b.preferred_batch_sizes.iter().find(|&&p| p == 0 || p > self.max_batch_size) {
            return Err(problem(
                "batching.preferred_batch_sizes",
                format!("{p} is not between 1 and max_batch_size ({})", self.max_batch_size),
            ));
        }
        if !(1..=1_000_000).contains(&b.queue_capacity) {
            return Err(problem("batching.queue_capacity", format!("must be 1-1000000, got {}", b.queue_capacity)));
        }
        if !(1..=64).contains(&b.instances) {
            return Err(problem("batching.instances", format!("must be 1-64, got {}", b.instances)));
        }
        if !(1..=600_000).contains(&b.default_deadline_ms) {
            return Err(problem(
                "batching.default_deadline_ms",
                format!("must be 1-600000, got {}", b.default_deadline_ms),
            ));
        }
        for (field, tensors) in [("inputs", &self.inputs), ("outputs", &self.outputs)] {
            if tensors.is_empty() {
                return Err(problem(field, "must declare at least one tensor"));
            }
            for (i, t) in tensors.iter().enumerate() {
                if t.name.is_empty() {
                    return Err(problem(field, format!("tensor {i} has an empty name")));
                }
                if tensors[..i].iter().any(|o| o.name == t.name) {
                    return Err(problem(field, format!("tensor name `{}` appears twice", t.name)));
                }
                if t.dims.first() != Some(&-1) {
                    return Err(problem(
                        field,
                        format!("`{}`: dims must start with -1 (the batch dimension), got {:?}", t.name, t.dims),
                    ));
                }
                if let Some(d) = t.dims[1..].iter().find(|&&d| d <= 0) {
                    return Err(problem(
                        field,
                        format!("`{}`: dims after the batch dimension must be positive, got {d}", t.name),
                    ));
                }
            }
        }
        for (i, t) in self.inputs.iter().enumerate() {
            if !matches!(t.dtype, DataType::Fp32 | DataType::Int64 | DataType::Int32 | DataType::Uint8 | DataType::Bool)
            {
                return Err(problem(
                    format!("inputs[{i}]"),
                    format!(
                        "`{}`: {} inputs are not served; use FP32, INT64, INT32, UINT8 or BOOL",
                        t.name,
                        t.dtype.as_str()
                    ),
                ));
            }
        }
        let mut feeds: Vec<Option<Feed>> = vec![None; self.inputs.len()];
        let inputs = self.inputs.clone();
        let mut feed = |field: &str, name: &str, what: Feed| -> Result<usize, Problem> {
            let i = inputs
                .iter()
                .position(|t| t.name == name)
                .ok_or_else(|| problem(field, format!("`{name}` is not one of the declared inputs")))?;
            if let Some(other) = feeds[i] {
                return Err(problem(field, format!("input `{name}` is fed twice ({other:?} and {what:?})")));
            }
            feeds[i] = Some(what);
            Ok(i)
        };

        // Cameras.
        for (c, cam) in self.cameras.iter().enumerate() {
            let f = |k: &str| format!("cameras[{c}].{k}");
            if !crate::names::is_valid_name(&cam.name) {
                return Err(problem(f("name"), format!("`{}` must be 1-64 of [A-Za-z0-9._-]", cam.name)));
            }
            if self.cameras[..c].iter().any(|o| o.name == cam.name) {
                return Err(problem(f("name"), format!("camera `{}` appears twice", cam.name)));
            }
            if !(8..=4096).contains(&cam.height) || !(8..=4096).contains(&cam.width) {
                return Err(problem(f("height"), "height and width must be 8-4096"));
            }
            if !matches!(cam.dtype, DataType::Fp32 | DataType::Uint8) {
                return Err(problem(f("dtype"), format!("must be FP32 or UINT8, got {}", cam.dtype.as_str())));
            }
            if let Some(s) = cam.std.iter().find(|s| !(s.is_finite() && **s > 0.0)) {
                return Err(problem(f("std"), format!("values must be positive, got {s}")));
            }
            if let Some(m) = cam.mean.iter().find(|m| !m.is_finite()) {
                return Err(problem(f("mean"), format!("values must be finite, got {m}")));
            }
            let i = feed(&f("input"), &cam.input, Feed::Camera(c))?;
            let (h, w) = (i64::from(cam.height), i64::from(cam.width));
            let expected = match cam.layout {
                Layout::Nchw => vec![-1, 3, h, w],
                Layout::Nhwc => vec![-1, h, w, 3],
            };
            let t = &self.inputs[i];
            if t.dtype != cam.dtype || t.dims != expected {
                return Err(problem(
                    f("input"),
                    format!(
                        "input `{}` must be {} {expected:?} for this camera, got {} {:?}",
                        t.name,
                        cam.dtype.as_str(),
                        t.dtype.as_str(),
                        t.dims
                    ),
                ));
            }
        }
        if self.cameras.is_empty() {
            return Err(problem("cameras", "declare at least one camera"));
        }

        // Tokenizer.
        let tk = &self.tokenizer;
        match (&tk.file, tk.encoding.as_deref()) {
            (Some(_), Some(e)) if e != "tokenizer.json" => {
                return Err(problem(
                    "tokenizer.encoding",
                    "give `file` (a tokenizer.json) or `encoding = \"utf8-bytes\"`, not both",
                ));
            }
            (None, Some("utf8-bytes")) | (Some(_), None) => {}
            (None, Some(other)) => {
                return Err(problem(
                    "tokenizer.encoding",
                    format!("`{other}` is not known; use `utf8-bytes` or a tokenizer `file`"),
                ));
            }
            (None, None) => {
                return Err(problem("tokenizer.file", "missing: a tokenizer.json, or `encoding = \"utf8-bytes\"`"));
            }
            _ => {}
        }
        if let Some(file) = &tk.file
            && (file.contains('/') || file.contains("..") || file.is_empty())
        {
            return Err(problem("tokenizer.file", format!("`{file}` must be a file name in the model's directory")));
        }
        if tk.padding != "max_length" {
            return Err(problem("tokenizer.padding", format!("`{}`: only `max_length` is served", tk.padding)));
        }
        let ids = feed("tokenizer.ids_input", &tk.ids_input, Feed::TokenIds)?;
        let id_tensor = &self.inputs[ids];
        if !matches!(id_tensor.dtype, DataType::Int64 | DataType::Int32) || id_tensor.dims.len() != 2 {
            return Err(problem(
                "tokenizer.ids_input",
                format!(
                    "input `{}` must be INT64 or INT32 [-1, length], got {} {:?}",
                    id_tensor.name,
                    id_tensor.dtype.as_str(),
                    id_tensor.dims
                ),
            ));
        }
        let length = id_tensor.sample_len();
        if let Some(max) = tk.max_length
            && max != length
        {
            return Err(problem(
                "tokenizer.max_length",
                format!("{max} differs from input `{}`'s length {length}", id_tensor.name),
            ));
        }
        if tk.file.is_none() && tk.mask_input.is_some() {
            return Err(problem("tokenizer.mask_input", "utf8-bytes has no mask"));
        }
        if let Some(mask) = &tk.mask_input {
            let m = feed("tokenizer.mask_input", mask, Feed::TokenMask)?;
            let t = &self.inputs[m];
            if t.dims != id_tensor.dims {
                return Err(problem(
                    "tokenizer.mask_input",
                    format!("input `{}` must have the ids' dims {:?}, got {:?}", t.name, id_tensor.dims, t.dims),
                ));
            }
        }

        // State.
        let s = feed("state.input", &self.state.input, Feed::State)?;
        let st = &self.inputs[s];
        if st.dtype != DataType::Fp32 || st.dims.len() != 2 {
            return Err(problem(
                "state.input",
                format!("input `{}` must be FP32 [-1, dim], got {} {:?}", st.name, st.dtype.as_str(), st.dims),
            ));
        }
        check_stats("state", st.sample_len(), self.state.mean.as_deref(), self.state.std.as_deref())?;

        // Noise.
        for (n, noise) in self.noise.iter().enumerate() {
            if noise.distribution != "normal" {
                return Err(problem(
                    format!("noise[{n}].distribution"),
                    format!("`{}`: only `normal` is served", noise.distribution),
                ));
            }
            let i = feed(&format!("noise[{n}].input"), &noise.input, Feed::Noise(n))?;
            if self.inputs[i].dtype != DataType::Fp32 {
                return Err(problem(
                    format!("noise[{n}].input"),
                    format!("input `{}` must be FP32", self.inputs[i].name),
                ));
            }
        }

        // Extra inputs.
        for (e, extra) in self.extra_inputs.iter().enumerate() {
            let f = |k: &str| format!("extra_inputs[{e}].{k}");
            if !crate::names::is_valid_name(&extra.name) {
                return Err(problem(f("name"), format!("`{}` must be 1-64 of [A-Za-z0-9._-]", extra.name)));
            }
            if self.extra_inputs[..e].iter().any(|o| o.name == extra.name) {
                return Err(problem(f("name"), format!("`{}` appears twice", extra.name)));
            }
            feed(&f("input"), &extra.input, Feed::Extra(e))?;
        }
        if let Some(i) = feeds.iter().position(Option::is_none) {
            return Err(problem(
                "inputs",
                format!(
                    "`{}` is fed by nothing: name it in [[cameras]], [tokenizer], [state], [[noise]] or [[extra_inputs]]",
                    self.inputs[i].name
                ),
            ));
        }
        self.feeds = feeds.into_iter().flatten().collect();

        // Action.
        let a = &self.action;
        let out =
            self.outputs.iter().position(|t| t.name == a.output).ok_or_else(|| {
                problem("action.output", format!("`{}` is not one of the declared outputs", a.output))
            })?;
        if !(1..=64).contains(&a.dof) {
            return Err(problem("action.dof", format!("must be 1-64, got {}", a.dof)));
        }
        if !(1..=1024).contains(&a.horizon) {
            return Err(problem("action.horizon", format!("must be 1-1024, got {}", a.horizon)));
        }
        let output = &self.outputs[out];
        let flat = vec![-1, (a.dof * a.horizon) as i64];
        let chunk = vec![-1, a.horizon as i64, a.dof as i64];
        if output.dtype != DataType::Fp32 || (output.dims != flat && output.dims != chunk) {
            return Err(problem(
                "action.output",
                format!(
                    "output `{}` must be FP32 {flat:?} or {chunk:?} (horizon × dof), got {} {:?}",
                    output.name,
                    output.dtype.as_str(),
                    output.dims
                ),
            ));
        }
        if let Some(dt) = a.dt_ms
            && !(dt.is_finite() && dt > 0.0 && dt <= 60_000.0)
        {
            return Err(problem("action.dt_ms", format!("must be a positive number of ms up to 60000, got {dt}")));
        }
        check_stats("action", a.dof, a.mean.as_deref(), a.std.as_deref())?;
        if let Some(e) = &a.envelope {
            check_envelope(e, a.dof)?;
        }
        self.action_output = out;
        Ok(())
    }
}

/// The envelope: one finite value per dof, `min <= max`, `max_delta` positive.
fn check_envelope(e: &EnvelopeSpec, dof: usize) -> Result<(), Problem> {
    let lists = [("min", Some(&e.min)), ("max", Some(&e.max)), ("max_delta", e.max_delta.as_ref())];
    for (k, values) in lists {
        let Some(values) = values else { continue };
        let field = format!("action.envelope.{k}");
        if values.len() != dof {
            return Err(problem(field, format!("has {} values; the action has {dof} dof", values.len())));
        }
        if let Some(x) = values.iter().find(|x| !x.is_finite()) {
            return Err(problem(field, format!("values must be finite, got {x}")));
        }
    }
    if let Some(d) = (0..dof).find(|&d| e.min[d] > e.max[d]) {
        return Err(problem("action.envelope.max", format!("dof {d}: max {} is below min {}", e.max[d], e.min[d])));
    }
    if let Some(x) = e.max_delta.iter().flatten().find(|x| **x <= 0.0) {
        return Err(problem("action.envelope.max_delta", format!("values must be positive, got {x}")));
    }
    if !(1..=3_600_000).contains(&e.forget_after_ms) {
        return Err(problem(
            "action.envelope.forget_after_ms",
            format!("must be 1-3600000, got {}", e.forget_after_ms),
        ));
    }
    Ok(())
}

/// Normalisation statistics: both or neither, one value per dimension, finite, std positive.
fn check_stats(section: &str, dim: usize, mean: Option<&[f32]>, std: Option<&[f32]>) -> Result<(), Problem> {
    match (mean, std) {
        (None, None) => Ok(()),
        (Some(_), None) => Err(problem(format!("{section}.std"), "needed with `mean`")),
        (None, Some(_)) => Err(problem(format!("{section}.mean"), "needed with `std`")),
        (Some(m), Some(s)) => {
            for (k, v) in [("mean", m), ("std", s)] {
                if v.len() != dim {
                    return Err(problem(
                        format!("{section}.{k}"),
                        format!("has {} values; the model's {section} has {dim}", v.len()),
                    ));
                }
            }
            if let Some(x) = m.iter().find(|x| !x.is_finite()) {
                return Err(problem(format!("{section}.mean"), format!("values must be finite, got {x}")));
            }
            if let Some(x) = s.iter().find(|x| !(x.is_finite() && **x > 0.0)) {
                return Err(problem(format!("{section}.std"), format!("values must be positive, got {x}")));
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEMO: &str = include_str!("demo/model.toml");

    fn parse_with(replace: &str, with: &str) -> Result<ModelSpec, (String, String)> {
        assert!(DEMO.contains(replace), "fixture has {replace:?}");
        ModelSpec::parse(&DEMO.replacen(replace, with, 1), "tiny-vla")
    }

    #[test]
    fn openpi_keys_default_to_the_libero_layout_and_are_checked() {
        let spec = ModelSpec::parse(DEMO, "tiny-vla").expect("demo spec parses");
        assert_eq!(spec.openpi.cameras, ["observation/image"]);
        assert_eq!(
            (spec.openpi.state.as_slice(), spec.openpi.prompt.as_str()),
            (&["observation/state".to_string()][..], "prompt")
        );
        let spec = parse_with(
            "[batching]",
            "[openpi]\ncameras = { image = \"observation/images/top\" }\nstate = [\"observation/joints\", \"observation/gripper\"]\n\n[batching]",
        )
        .expect("parses");
        assert_eq!(spec.openpi.cameras, ["observation/images/top"]);
        assert_eq!(spec.openpi.state, ["observation/joints", "observation/gripper"]);
        for (table, field, says) in [
            ("cameras = { wrist = \"w\" }", "openpi.cameras.wrist", "not one of the model's"),
            ("prompt = \"observation/state\"", "openpi", "feeds two sources"),
            ("prompt = \"a//b\"", "openpi", "no empty"),
            ("state = []", "openpi.state", "at least one"),
            ("camera = \"x\"", "openpi", "unknown field"),
        ] {
            let (f, problem) = parse_with("[batching]", &format!("[openpi]\n{table}\n\n[batching]")).expect_err(table);
            assert!(f.starts_with(field) && problem.contains(says), "{table}: {f}: {problem}");
        }
    }

    #[test]
    fn demo_model_toml_is_valid() {
        let spec = ModelSpec::parse(DEMO, "tiny-vla").expect("demo spec parses");
        assert_eq!(spec.name, "tiny-vla");
        assert_eq!(spec.platform, Platform::TorchScript);
        assert_eq!(spec.state_dim(), 7);
        assert_eq!(spec.instruction_len(), 32);
        assert_eq!(spec.feeds, vec![Feed::Camera(0), Feed::TokenIds, Feed::State]);
        assert_eq!(spec.action_output, 0);
        assert_eq!(spec.default_camera(), Some(0));
    }

    #[test]
    fn the_first_versions_preprocess_section_is_read_as_its_equivalent() {
        let legacy = r#"
name = "old"
device = "cpu"
max_batch_size = 8
[[inputs]]
name = "image"
dtype = "FP32"
dims = [-1, 3, 224, 224]
[[inputs]]
name = "instruction"
dtype = "INT64"
dims = [-1, 32]
[[inputs]]
name = "state"
dtype = "FP32"
dims = [-1, 7]
[[outputs]]
name = "action"
dtype = "FP32"
dims = [-1, 7]
[preprocess.image]
input = "image"
height = 224
width = 224
mean = [0.485, 0.456, 0.406]
std = [0.229, 0.224, 0.225]
[preprocess.instruction]
input = "instruction"
encoding = "utf8-bytes"
[preprocess.state]
input = "state"
[action]
output = "action"
dof = 7
kind = "joint_velocity"
"#;
        let spec = ModelSpec::parse(legacy, "old").expect("the old form parses");
        let demo = ModelSpec::parse(DEMO, "tiny-vla").expect("demo");
        assert!(spec.same_inputs(&demo), "the same inputs as the demo's new form");
    }

    #[test]
    fn wrongly_typed_field_is_named() {
        let (field, problem) = parse_with("max_batch_size = 32", "max_batch_size = \"many\"").expect_err("rejected");
        assert_eq!(field, "max_batch_size");
        assert!(problem.contains("invalid type"), "{problem}");
    }

    #[test]
    fn unknown_field_is_named() {
        let (field, problem) = parse_with("[batching]", "[batching]\nmax_delay = 5").expect_err("rejected");
        assert_eq!(field, "batching.max_delay");
        assert!(problem.contains("unknown field"), "{problem}");
    }

    #[test]
    fn unknown_device_is_named() {
        let (field, problem) = parse_with("device = \"auto\"", "device = \"tpu\"").expect_err("rejected");
        assert_eq!(field, "device");
        assert!(problem.contains("auto, cpu, cuda:N"), "{problem}");
    }

    #[test]
    fn preferred_batch_size_above_max_is_rejected() {
        let (field, _) =
            parse_with("preferred_batch_sizes = [4, 8, 16]", "preferred_batch_sizes = [64]").expect_err("rejected");
        assert_eq!(field, "batching.preferred_batch_sizes");
    }

    #[test]
    fn batch_dimension_must_be_variable() {
        let (field, problem) = parse_with("dims = [-1, 7]", "dims = [1, 7]").expect_err("rejected");
        assert_eq!(field, "inputs");
        assert!(problem.contains("batch dimension"), "{problem}");
    }

    #[test]
    fn a_camera_must_match_its_input() {
        let (field, problem) = parse_with("height = 224", "height = 112").expect_err("rejected");
        assert_eq!(field, "cameras[0].input");
        assert!(problem.contains("FP32 [-1, 3, 112, 224]"), "{problem}");
        let (field, _) = parse_with("layout = \"nchw\"", "layout = \"nhwc\"").expect_err("rejected");
        assert_eq!(field, "cameras[0].input");
        let (field, _) = parse_with("dtype = \"FP32\"\nmean", "dtype = \"UINT8\"\nmean").expect_err("rejected");
        assert_eq!(field, "cameras[0].input");
    }

    #[test]
    fn every_input_is_fed_once() {
        let (field, problem) = parse_with("input = \"state\"", "input = \"instruction\"").expect_err("rejected");
        assert_eq!(field, "state.input");
        assert!(problem.contains("fed twice"), "{problem}");
        let extra = DEMO
            .replace("[[outputs]]", "[[inputs]]\nname = \"task\"\ndtype = \"INT64\"\ndims = [-1, 1]\n\n[[outputs]]");
        let (field, problem) = ModelSpec::parse(&extra, "tiny-vla").expect_err("rejected");
        assert_eq!(field, "inputs");
        assert!(problem.contains("`task` is fed by nothing"), "{problem}");
        let fed = format!("{extra}\n[[extra_inputs]]\nname = \"task_id\"\ninput = \"task\"\nrequired = false\n");
        let spec = ModelSpec::parse(&fed, "tiny-vla").expect("an extra input feeds it");
        assert_eq!(spec.feeds[3], Feed::Extra(0));
    }

    #[test]
    fn action_output_must_be_dof_times_horizon() {
        let (field, _) = parse_with("dof = 7", "dof = 6").expect_err("rejected");
        assert_eq!(field, "action.output");
        let chunk = DEMO.replace("dims = [-1, 7]\n\n# The one camera", "dims = [-1, 1, 7]\n\n# The one camera");
        assert!(ModelSpec::parse(&chunk, "tiny-vla").is_ok(), "[N, horizon, dof] is an action too");
    }

    #[test]
    fn statistics_have_one_value_per_dimension() {
        let (field, problem) =
            parse_with("[state]\ninput = \"state\"", "[state]\ninput = \"state\"\nmean = [0.0]\nstd = [1.0]")
                .expect_err("rejected");
        assert_eq!(field, "state.mean");
        assert!(problem.contains("has 1 values"), "{problem}");
        let (field, _) = parse_with(
            "kind = \"joint_velocity\"",
            "kind = \"joint_velocity\"\nstd = [1, 1, 1, 1, 1, 1, 0]\nmean = [0, 0, 0, 0, 0, 0, 0]",
        )
        .expect_err("rejected");
        assert_eq!(field, "action.std");
    }

    #[test]
    fn aoti_packages_are_a_platform() {
        let spec = parse_with("platform = \"pytorch_torchscript\"", "platform = \"pytorch_aoti\"").expect("parses");
        assert_eq!(spec.platform.file(), "model.pt2");
        let (field, _) = parse_with("platform = \"pytorch_torchscript\"", "platform = \"onnx\"").expect_err("rejected");
        assert_eq!(field, "platform");
    }

    #[test]
    fn name_must_match_directory() {
        let err = ModelSpec::parse(DEMO, "other").expect_err("rejected");
        assert_eq!(err.0, "name");
    }

    #[test]
    fn device_strings_round_trip() {
        for s in ["auto", "cpu", "cuda:0", "cuda:3"] {
            assert_eq!(s.parse::<DeviceSpec>().expect("parses").to_string(), s);
        }
        assert_eq!("cuda".parse::<DeviceSpec>(), Ok(DeviceSpec::Cuda(0)));
        assert!("cuda:x".parse::<DeviceSpec>().is_err());
    }
}
