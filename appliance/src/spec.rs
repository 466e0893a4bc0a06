//! `model.toml`: what a model in the repository is, how robots' requests are turned into its
//! inputs, how it is batched and where it runs. Parsed and checked before the model loads;
//! every problem names the file, the field and what is wrong.

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
    /// How long the oldest queued request may wait for others to join its batch.
    pub max_queue_delay_us: u64,
    /// Batch sizes dispatched as soon as that many requests are queued.
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
            max_queue_delay_us: 2_000,
            preferred_batch_sizes: Vec::new(),
            queue_capacity: 256,
            instances: 1,
            default_deadline_ms: 1_000,
        }
    }
}

/// How the robot endpoint fills the model's inputs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PreprocessSpec {
    pub image: ImagePreprocess,
    pub instruction: InstructionPreprocess,
    pub state: StatePreprocess,
}

/// Camera image → `FP32 [N, 3, height, width]`, RGB, `(pixel / 255 - mean) / std`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImagePreprocess {
    pub input: String,
    pub height: u32,
    pub width: u32,
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum InstructionEncoding {
    /// UTF-8 bytes as `INT64` tokens, zero-padded or truncated to the input's length.
    Utf8Bytes,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstructionPreprocess {
    pub input: String,
    pub encoding: InstructionEncoding,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatePreprocess {
    pub input: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ActionSpec {
    /// The output holding the action, `FP32 [N, dof * horizon]`.
    pub output: String,
    pub dof: usize,
    #[serde(default = "one")]
    pub horizon: usize,
    pub kind: ActionKind,
}

fn one() -> usize {
    1
}

fn default_version() -> String {
    "1".into()
}

fn default_platform() -> String {
    PLATFORM.into()
}

/// The only platform served.
pub const PLATFORM: &str = "pytorch_torchscript";

/// A parsed `model.toml`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    /// Defaults to the model's directory name; must equal it when given.
    #[serde(default)]
    pub name: String,
    #[serde(default = "default_version")]
    pub version: String,
    #[serde(default = "default_platform")]
    pub platform: String,
    pub device: DeviceSpec,
    pub max_batch_size: usize,
    #[serde(default)]
    pub batching: BatchingSpec,
    pub inputs: Vec<TensorSpec>,
    pub outputs: Vec<TensorSpec>,
    pub preprocess: PreprocessSpec,
    pub action: ActionSpec,
}

/// A `model.toml` that cannot be served, with the file, field and problem.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: field `{field}`: {problem}", file.display())]
pub struct SpecError {
    pub file: PathBuf,
    pub field: String,
    pub problem: String,
}

/// Positions of the robot endpoint's inputs in the model's argument list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RobotInputs {
    pub image: usize,
    pub instruction: usize,
    pub state: usize,
    pub action_output: usize,
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
        let mut spec: ModelSpec = serde_path_to_error::deserialize(de).map_err(|e| {
            let field = e.path().to_string();
            let inner = e.into_inner();
            let field = if field == "." { "-".to_string() } else { field };
            (field, inner.message().trim().to_string())
        })?;
        if spec.name.is_empty() {
            spec.name = dir_name.to_string();
        } else if spec.name != dir_name {
            return Err((
                "name".into(),
                format!("`{}` differs from the model's directory name `{dir_name}`", spec.name),
            ));
        }
        spec.check().map_err(|(f, p)| (f.to_string(), p))?;
        Ok(spec)
    }

    /// Where each robot-endpoint tensor sits; valid after [`ModelSpec::parse`].
    pub fn robot_inputs(&self) -> RobotInputs {
        let pos = |name: &str| self.inputs.iter().position(|t| t.name == name).unwrap_or(0);
        RobotInputs {
            image: pos(&self.preprocess.image.input),
            instruction: pos(&self.preprocess.instruction.input),
            state: pos(&self.preprocess.state.input),
            action_output: self.outputs.iter().position(|t| t.name == self.action.output).unwrap_or(0),
        }
    }

    /// Length of the state vector robots send.
    pub fn state_dim(&self) -> usize {
        self.inputs[self.robot_inputs().state].sample_len()
    }

    /// Number of instruction tokens.
    pub fn instruction_len(&self) -> usize {
        self.inputs[self.robot_inputs().instruction].sample_len()
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

    fn check(&self) -> Result<(), (&'static str, String)> {
        if !crate::names::is_valid_name(&self.name) {
            return Err(("name", format!("`{}` must be 1-64 of [A-Za-z0-9._-]", self.name)));
        }
        if self.version.is_empty() || !crate::names::is_valid_name(&self.version) {
            return Err(("version", format!("`{}` must be 1-64 of [A-Za-z0-9._-]", self.version)));
        }
        if self.platform != PLATFORM {
            return Err(("platform", format!("`{}` is not supported; use `{PLATFORM}`", self.platform)));
        }
        if !(1..=1024).contains(&self.max_batch_size) {
            return Err(("max_batch_size", format!("must be 1-1024, got {}", self.max_batch_size)));
        }
        let b = &self.batching;
        if b.max_queue_delay_us > 1_000_000 {
            return Err((
                "batching.max_queue_delay_us",
                format!("must be at most 1000000, got {}", b.max_queue_delay_us),
            ));
        }
        if let Some(&p) = b.preferred_batch_sizes.iter().find(|&&p| p == 0 || p > self.max_batch_size) {
            return Err((
                "batching.preferred_batch_sizes",
                format!("{p} is not between 1 and max_batch_size ({})", self.max_batch_size),
            ));
        }
        if !(1..=1_000_000).contains(&b.queue_capacity) {
            return Err(("batching.queue_capacity", format!("must be 1-1000000, got {}", b.queue_capacity)));
        }
        if !(1..=64).contains(&b.instances) {
            return Err(("batching.instances", format!("must be 1-64, got {}", b.instances)));
        }
        if !(1..=600_000).contains(&b.default_deadline_ms) {
            return Err(("batching.default_deadline_ms", format!("must be 1-600000, got {}", b.default_deadline_ms)));
        }
        for (field, tensors) in [("inputs", &self.inputs), ("outputs", &self.outputs)] {
            if tensors.is_empty() {
                return Err((field, "must declare at least one tensor".into()));
            }
            for (i, t) in tensors.iter().enumerate() {
                if t.name.is_empty() {
                    return Err((field, format!("tensor {i} has an empty name")));
                }
                if tensors[..i].iter().any(|o| o.name == t.name) {
                    return Err((field, format!("tensor name `{}` appears twice", t.name)));
                }
                if t.dims.first() != Some(&-1) {
                    return Err((
                        field,
                        format!("`{}`: dims must start with -1 (the batch dimension), got {:?}", t.name, t.dims),
                    ));
                }
                if let Some(d) = t.dims[1..].iter().find(|&&d| d <= 0) {
                    return Err((
                        field,
                        format!("`{}`: dims after the batch dimension must be positive, got {d}", t.name),
                    ));
                }
            }
        }
        let input = |field: &'static str, name: &str| {
            self.inputs
                .iter()
                .find(|t| t.name == name)
                .ok_or_else(|| (field, format!("`{name}` is not one of the declared inputs")))
        };
        let p = &self.preprocess;
        let image = input("preprocess.image.input", &p.image.input)?;
        let expected = vec![-1, 3, i64::from(p.image.height), i64::from(p.image.width)];
        if image.dtype != DataType::Fp32 || image.dims != expected {
            return Err((
                "preprocess.image.input",
                format!(
                    "input `{}` must be FP32 {expected:?} to match preprocess.image, got {} {:?}",
                    image.name,
                    image.dtype.as_str(),
                    image.dims
                ),
            ));
        }
        if !(8..=4096).contains(&p.image.height) || !(8..=4096).contains(&p.image.width) {
            return Err(("preprocess.image", "height and width must be 8-4096".into()));
        }
        if let Some(s) = p.image.std.iter().find(|s| !(s.is_finite() && **s > 0.0)) {
            return Err(("preprocess.image.std", format!("values must be positive, got {s}")));
        }
        if let Some(m) = p.image.mean.iter().find(|m| !m.is_finite()) {
            return Err(("preprocess.image.mean", format!("values must be finite, got {m}")));
        }
        let instruction = input("preprocess.instruction.input", &p.instruction.input)?;
        if instruction.dtype != DataType::Int64 || instruction.dims.len() != 2 {
            return Err((
                "preprocess.instruction.input",
                format!(
                    "input `{}` must be INT64 [-1, length] for utf8-bytes, got {} {:?}",
                    instruction.name,
                    instruction.dtype.as_str(),
                    instruction.dims
                ),
            ));
        }
        let state = input("preprocess.state.input", &p.state.input)?;
        if state.dtype != DataType::Fp32 || state.dims.len() != 2 {
            return Err((
                "preprocess.state.input",
                format!("input `{}` must be FP32 [-1, dim], got {} {:?}", state.name, state.dtype.as_str(), state.dims),
            ));
        }
        let used = [&p.image.input, &p.instruction.input, &p.state.input];
        if used[0] == used[1] || used[0] == used[2] || used[1] == used[2] {
            return Err(("preprocess", "image, instruction and state must feed different inputs".into()));
        }
        if let Some(t) = self.inputs.iter().find(|t| !used.contains(&&t.name)) {
            return Err(("inputs", format!("`{}` is not fed by preprocess.image, .instruction or .state", t.name)));
        }
        let a = &self.action;
        let output = self
            .outputs
            .iter()
            .find(|t| t.name == a.output)
            .ok_or_else(|| ("action.output", format!("`{}` is not one of the declared outputs", a.output)))?;
        if !(1..=64).contains(&a.dof) {
            return Err(("action.dof", format!("must be 1-64, got {}", a.dof)));
        }
        if !(1..=1024).contains(&a.horizon) {
            return Err(("action.horizon", format!("must be 1-1024, got {}", a.horizon)));
        }
        let expected = vec![-1, (a.dof * a.horizon) as i64];
        if output.dtype != DataType::Fp32 || output.dims != expected {
            return Err((
                "action.output",
                format!(
                    "output `{}` must be FP32 {expected:?} (dof × horizon), got {} {:?}",
                    output.name,
                    output.dtype.as_str(),
                    output.dims
                ),
            ));
        }
        Ok(())
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
    fn demo_model_toml_is_valid() {
        let spec = ModelSpec::parse(DEMO, "tiny-vla").expect("demo spec parses");
        assert_eq!(spec.name, "tiny-vla");
        assert_eq!(spec.state_dim(), 7);
        assert_eq!(spec.instruction_len(), 32);
        assert_eq!(spec.robot_inputs(), RobotInputs { image: 0, instruction: 1, state: 2, action_output: 0 });
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
    fn image_input_must_match_image_size() {
        let (field, _) = parse_with("height = 224", "height = 112").expect_err("rejected");
        assert_eq!(field, "preprocess.image.input");
    }

    #[test]
    fn action_output_must_be_dof_times_horizon() {
        let (field, _) = parse_with("dof = 7", "dof = 6").expect_err("rejected");
        assert_eq!(field, "action.output");
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
