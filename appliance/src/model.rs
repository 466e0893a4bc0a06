//! The model stage: a TorchScript module (`model.pt`) or an AOTInductor package
//! (`model.pt2`, through [`crate::aoti`]) loaded with libtorch, run on stacked batches.
//!
//! A [`LoadedModel`] is created, warmed up and used on one executor thread only: libtorch's
//! CPU thread pool (OpenMP) belongs to the thread that first ran it, and a module served from a
//! different thread than it was warmed on ran ~50 % slower here.

use std::cell::RefCell;
use std::path::Path;
use std::time::Instant;

use tch::{CModule, Device, IValue, Kind, Tensor};

use crate::spec::{DataType, DeviceSpec, ModelSpec, Platform};

/// The libtorch the appliance is built against (tch 0.24 pins it; see the root Cargo.toml).
pub const LIBTORCH_VERSION: &str = "2.11.0";

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("device {0}: {1}")]
    Device(DeviceSpec, String),
    #[error("{}: cannot be loaded as {platform}: {reason}", path.display())]
    Load { path: std::path::PathBuf, platform: &'static str, reason: String },
    #[error("forward failed: {0}")]
    Forward(String),
    #[error("output: {0}")]
    Output(String),
}

/// Resolves `auto` to the first CUDA device when libtorch can use one, else the CPU; refuses a
/// named CUDA device that is not there.
pub fn resolve_device(spec: DeviceSpec) -> Result<Device, ModelError> {
    match spec {
        DeviceSpec::Cpu => Ok(Device::Cpu),
        DeviceSpec::Auto => Ok(if tch::Cuda::is_available() { Device::Cuda(0) } else { Device::Cpu }),
        DeviceSpec::Cuda(n) => {
            let count = tch::Cuda::device_count();
            if (n as i64) < count {
                Ok(Device::Cuda(n))
            } else {
                Err(ModelError::Device(spec, format!("not available ({count} CUDA devices usable)")))
            }
        }
    }
}

/// How the appliance names a device in responses, logs and metrics.
pub fn device_name(device: Device) -> String {
    match device {
        Device::Cpu => "cpu".into(),
        Device::Cuda(n) => format!("cuda:{n}"),
        other => format!("{other:?}").to_lowercase(),
    }
}

/// One sample's input, flattened, in the dtype the model declares for that input.
#[derive(Debug, Clone, PartialEq)]
pub enum TensorData {
    F32(Vec<f32>),
    I64(Vec<i64>),
    I32(Vec<i32>),
    U8(Vec<u8>),
    Bool(Vec<bool>),
}

impl TensorData {
    /// Zeros of `dtype`, `len` of them (an optional input nobody sent).
    pub fn zeros(dtype: DataType, len: usize) -> TensorData {
        match dtype {
            DataType::Int64 => TensorData::I64(vec![0; len]),
            DataType::Int32 => TensorData::I32(vec![0; len]),
            DataType::Uint8 => TensorData::U8(vec![0; len]),
            DataType::Bool => TensorData::Bool(vec![false; len]),
            _ => TensorData::F32(vec![0.0; len]),
        }
    }

    /// The values as little-endian bytes (OIP's binary tensors).
    pub fn le_bytes(&self) -> Vec<u8> {
        match self {
            TensorData::F32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            TensorData::I64(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            TensorData::I32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            TensorData::U8(v) => v.clone(),
            TensorData::Bool(v) => v.iter().map(|&b| u8::from(b)).collect(),
        }
    }

    /// Integer values as `INT64` or `INT32` (token ids, masks).
    pub fn ints(dtype: DataType, values: Vec<i64>) -> TensorData {
        match dtype {
            DataType::Int32 => TensorData::I32(values.into_iter().map(|v| v as i32).collect()),
            DataType::Bool => TensorData::Bool(values.into_iter().map(|v| v != 0).collect()),
            DataType::Uint8 => TensorData::U8(values.into_iter().map(|v| v as u8).collect()),
            DataType::Fp32 => TensorData::F32(values.into_iter().map(|v| v as f32).collect()),
            _ => TensorData::I64(values),
        }
    }
}

/// One sample's outputs, in the model's output order: each output's values as little-endian
/// bytes of its declared datatype.
pub type SampleOutputs = Vec<Vec<u8>>;

/// What runs the forward.
enum Backend {
    TorchScript(CModule),
    Aoti(crate::aoti::AotiModel),
}

impl std::fmt::Debug for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Backend::TorchScript(_) => "TorchScript",
            Backend::Aoti(_) => "AOTInductor",
        })
    }
}

/// A loaded model and what it needs to run a batch.
#[derive(Debug)]
pub struct LoadedModel {
    backend: Backend,
    device: Device,
    /// Per input: the dims after the batch dimension.
    input_dims: Vec<Vec<i64>>,
    /// Per input: the element type.
    input_kinds: Vec<Kind>,
    /// Per output: element type and the dims after the batch dimension.
    outputs: Vec<(Kind, Vec<i64>)>,
}

impl LoadedModel {
    /// Loads `<dir>/model.pt` (TorchScript) or `<dir>/model.pt2` (AOTInductor) onto `device`
    /// in inference mode.
    pub fn load(dir: &Path, spec: &ModelSpec, device: Device) -> Result<Self, ModelError> {
        let path = dir.join(spec.platform.file());
        let backend = match spec.platform {
            Platform::TorchScript => {
                let mut module = CModule::load_on_device(&path, device).map_err(|e| ModelError::Load {
                    path: path.clone(),
                    platform: "TorchScript",
                    reason: first_line(&e.to_string()),
                })?;
                module.set_eval();
                Backend::TorchScript(module)
            }
            Platform::Aoti => Backend::Aoti(crate::aoti::AotiModel::load(&path, device).map_err(|reason| {
                ModelError::Load { path: path.clone(), platform: "an AOTInductor package", reason }
            })?),
        };
        Ok(LoadedModel {
            backend,
            device,
            input_dims: spec.inputs.iter().map(|t| t.dims[1..].to_vec()).collect(),
            input_kinds: spec.inputs.iter().map(|t| kind_of(t.dtype)).collect(),
            outputs: spec.outputs.iter().map(|t| (kind_of(t.dtype), t.dims[1..].to_vec())).collect(),
        })
    }

    pub fn device(&self) -> Device {
        self.device
    }

    /// Bytes of the module's parameters (what one loaded copy holds on its device). A frozen
    /// TorchScript module keeps its weights as constants, which libtorch does not enumerate,
    /// and an AOTInductor package embeds them: then the size of the weights file.
    pub fn weight_bytes(&self, dir: &Path) -> u64 {
        let bytes: u64 = match &self.backend {
            Backend::TorchScript(module) => {
                let params = module.named_parameters().unwrap_or_default();
                params.iter().map(|(_, t)| t.numel() as u64 * t.kind().elt_size_in_bytes() as u64).sum()
            }
            Backend::Aoti(_) => 0,
        };
        let file = match &self.backend {
            Backend::TorchScript(_) => "model.pt",
            Backend::Aoti(_) => "model.pt2",
        };
        if bytes > 0 { bytes } else { std::fs::metadata(dir.join(file)).map_or(0, |m| m.len()) }
    }

    /// Runs zero-filled batches at each size, checking the action output's shape, so that the
    /// first robot request meets a warm model (allocator pools, cuDNN/oneDNN kernel choice).
    pub fn warm_up(&self, batch_sizes: &[usize], rounds: usize) -> Result<(), ModelError> {
        for &n in batch_sizes {
            let inputs = self.zeros(n);
            for _ in 0..rounds {
                // Checks every output's shape against the spec.
                self.forward_outputs(&inputs, n)?;
            }
        }
        Ok(())
    }

    /// The median of `rounds` forwards at batch size `n` (after one untimed), from zeros; one
    /// timed forward when a single one takes over 200 ms (the measurement stays short).
    pub fn time_forward(&self, n: usize, rounds: usize) -> Result<std::time::Duration, ModelError> {
        let inputs = self.zeros(n);
        let timed = || -> Result<std::time::Duration, ModelError> {
            let started = std::time::Instant::now();
            self.forward_outputs(&inputs, n)?;
            Ok(started.elapsed())
        };
        let first = timed()?;
        let rounds = if first > std::time::Duration::from_millis(200) { 1 } else { rounds.max(1) };
        let mut times = (0..rounds).map(|_| timed()).collect::<Result<Vec<_>, _>>()?;
        times.sort_unstable();
        Ok(times[times.len() / 2])
    }

    fn zeros(&self, n: usize) -> Vec<Tensor> {
        self.input_dims
            .iter()
            .zip(self.input_kinds.iter().copied())
            .map(|(dims, kind)| {
                let mut shape = vec![n as i64];
                shape.extend(dims);
                Tensor::zeros(&shape, (kind, self.device))
            })
            .collect()
    }

    /// Stacks `samples` (each in input order) into batch tensors on the model's device.
    /// A sample whose inputs do not match the model's count, types or sizes is refused; callers
    /// validate requests before they reach a batch, so that would be the appliance's own bug.
    pub fn stack(&self, samples: &[&[TensorData]]) -> Result<Vec<Tensor>, ModelError> {
        let n = samples.len() as i64;
        let mismatch =
            |i: usize| ModelError::Forward(format!("input {i}: a sample is not of the declared type and size"));
        if samples.iter().any(|s| s.len() != self.input_dims.len()) {
            return Err(ModelError::Forward("a sample has the wrong number of inputs".into()));
        }
        (0..self.input_dims.len())
            .map(|i| {
                let mut shape = vec![n];
                shape.extend(&self.input_dims[i]);
                let len: usize = self.input_dims[i].iter().map(|&d| d as usize).product();
                macro_rules! flat {
                    ($variant:ident) => {
                        Tensor::from_slice(
                            &concat(samples, i, len, |d| match d {
                                TensorData::$variant(v) => Some(v),
                                _ => None,
                            })
                            .ok_or_else(|| mismatch(i))?,
                        )
                    };
                }
                let tensor = match self.input_kinds[i] {
                    Kind::Int64 => flat!(I64),
                    Kind::Int => flat!(I32),
                    Kind::Uint8 => flat!(U8),
                    Kind::Bool => flat!(Bool),
                    // Frames: the large inputs, staged in the executor's own buffer.
                    _ => STAGING.with_borrow_mut(|staging| {
                        staging.clear();
                        for sample in samples {
                            match &sample[i] {
                                TensorData::F32(v) if v.len() == len => staging.extend_from_slice(v),
                                _ => return Err(mismatch(i)),
                            }
                        }
                        Ok(Tensor::from_slice(staging))
                    })?,
                };
                tensor
                    .f_view(shape.as_slice())
                    .and_then(|t| t.f_to_device(self.device))
                    .map_err(|e| ModelError::Forward(format!("input {i}: {}", first_line(&e.to_string()))))
            })
            .collect()
    }

    /// Runs one forward on a stacked batch of `n` and splits every output per sample: for each
    /// sample, each output's values as little-endian bytes of the output's declared datatype.
    pub fn forward_outputs(&self, inputs: &[Tensor], n: usize) -> Result<Vec<SampleOutputs>, ModelError> {
        let _guard = tch::no_grad_guard();
        let tensors = match &self.backend {
            Backend::Aoti(model) => {
                let outs = model.run(inputs).map_err(ModelError::Forward)?;
                if outs.len() != self.outputs.len() {
                    return Err(ModelError::Output(format!(
                        "expected {} outputs, the package returned {}",
                        self.outputs.len(),
                        outs.len()
                    )));
                }
                outs
            }
            Backend::TorchScript(module) if self.outputs.len() == 1 => {
                vec![module.forward_ts(inputs).map_err(|e| ModelError::Forward(first_line(&e.to_string())))?]
            }
            Backend::TorchScript(module) => {
                let ivalues: Vec<IValue> = inputs.iter().map(|t| IValue::Tensor(t.shallow_clone())).collect();
                match module.forward_is(&ivalues) {
                    Ok(IValue::Tuple(outs)) if outs.len() == self.outputs.len() => outs
                        .into_iter()
                        .enumerate()
                        .map(|(i, v)| match v {
                            IValue::Tensor(t) => Ok(t),
                            other => {
                                Err(ModelError::Output(format!("output {i} is not a tensor: {}", ivalue_kind(&other))))
                            }
                        })
                        .collect::<Result<Vec<_>, _>>()?,
                    Ok(other) => {
                        return Err(ModelError::Output(format!(
                            "expected a tuple of {} tensors, got {}",
                            self.outputs.len(),
                            ivalue_kind(&other)
                        )));
                    }
                    Err(e) => return Err(ModelError::Forward(first_line(&e.to_string()))),
                }
            }
        };
        self.split(&tensors, n)
    }

    /// Splits a batch's outputs (in output order) per sample: for each sample, each output's
    /// values as little-endian bytes of its declared datatype. Copies them to the host first.
    pub fn split(&self, tensors: &[Tensor], n: usize) -> Result<Vec<SampleOutputs>, ModelError> {
        let mut per_sample: Vec<SampleOutputs> = (0..n).map(|_| Vec::with_capacity(tensors.len())).collect();
        for (t, (kind, dims)) in tensors.iter().zip(&self.outputs) {
            let mut expected = vec![n as i64];
            expected.extend(dims);
            if t.size() != expected {
                return Err(ModelError::Output(format!("an output has shape {:?}, expected {expected:?}", t.size())));
            }
            let numel = expected.iter().product::<i64>() as usize;
            let flat = t.to_device(Device::Cpu).to_kind(*kind).contiguous();
            let mut bytes = vec![0u8; numel * kind.elt_size_in_bytes()];
            flat.f_copy_data_u8(&mut bytes, numel).map_err(|e| ModelError::Output(first_line(&e.to_string())))?;
            for (sample, chunk) in per_sample.iter_mut().zip(bytes.chunks(bytes.len() / n.max(1))) {
                sample.push(chunk.to_vec());
            }
        }
        Ok(per_sample)
    }

    /// Stack, forward and split in one call, timing the whole of it.
    pub fn run(&self, samples: &[&[TensorData]]) -> Result<(Vec<SampleOutputs>, std::time::Duration), ModelError> {
        let start = Instant::now();
        let inputs = self.stack(samples)?;
        // The copy of the outputs to the host waits for the device, so the time is the batch's.
        let outputs = self.forward_outputs(&inputs, samples.len())?;
        Ok((outputs, start.elapsed()))
    }
}

/// Little-endian bytes of `dtype` as numbers (booleans as 0 and 1).
pub fn values(dtype: DataType, bytes: &[u8]) -> Vec<f64> {
    fn each<const N: usize>(bytes: &[u8], f: impl Fn([u8; N]) -> f64) -> Vec<f64> {
        bytes.chunks_exact(N).map(|c| f(c.try_into().unwrap_or([0; N]))).collect()
    }
    match dtype {
        DataType::Bool | DataType::Uint8 => bytes.iter().map(|&b| f64::from(b)).collect(),
        DataType::Int8 => bytes.iter().map(|&b| f64::from(b as i8)).collect(),
        DataType::Int16 => each(bytes, |b| f64::from(i16::from_le_bytes(b))),
        DataType::Int32 => each(bytes, |b| f64::from(i32::from_le_bytes(b))),
        DataType::Int64 => each(bytes, |b| i64::from_le_bytes(b) as f64),
        DataType::Fp16 => each(bytes, |b| f64::from(half::f16::from_le_bytes(b).to_f32())),
        DataType::Fp32 => each(bytes, |b| f64::from(f32::from_le_bytes(b))),
        DataType::Fp64 => each(bytes, f64::from_le_bytes),
    }
}

/// Little-endian `FP32` bytes as values (the action output's datatype).
pub fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

thread_local! {
    /// An executor's staging buffer for its batches' `FP32` inputs (the frames), reused batch
    /// after batch: a batch is copied into memory already resident, where a fresh allocation of
    /// this size (megabytes) is mapped and faulted in page by page every time. One per executor
    /// thread, as large as its largest batch.
    static STAGING: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Input `i` of every sample, end to end; `None` if one has another type or length.
fn concat<T: Copy>(
    samples: &[&[TensorData]],
    i: usize,
    len: usize,
    pick: impl Fn(&TensorData) -> Option<&Vec<T>>,
) -> Option<Vec<T>> {
    let mut flat = Vec::with_capacity(samples.len() * len);
    for sample in samples {
        let values = pick(&sample[i]).filter(|v| v.len() == len)?;
        flat.extend_from_slice(values);
    }
    Some(flat)
}

/// The libtorch element type of an OIP datatype.
pub fn kind_of(dtype: DataType) -> Kind {
    match dtype {
        DataType::Bool => Kind::Bool,
        DataType::Uint8 => Kind::Uint8,
        DataType::Int8 => Kind::Int8,
        DataType::Int16 => Kind::Int16,
        DataType::Int32 => Kind::Int,
        DataType::Int64 => Kind::Int64,
        DataType::Fp16 => Kind::Half,
        DataType::Fp32 => Kind::Float,
        DataType::Fp64 => Kind::Double,
    }
}

fn ivalue_kind(v: &IValue) -> &'static str {
    match v {
        IValue::Tensor(_) => "a tensor",
        IValue::Tuple(_) => "a tuple of another length",
        IValue::GenericList(_) | IValue::TensorList(_) => "a list",
        IValue::GenericDict(_) => "a dict",
        _ => "another value",
    }
}

/// libtorch errors carry a C++ backtrace; the first line is the message.
pub fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or(s).trim().to_string()
}
