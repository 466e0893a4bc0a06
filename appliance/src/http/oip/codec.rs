//! The Open Inference Protocol's tensor codec: an infer request's JSON header (and the binary
//! tensor data after it, with `Inference-Header-Content-Length`) into one pipeline row per
//! batch row, checked against the model's `model.toml`; and the pipeline's answer back into
//! OIP outputs, JSON or binary.
//!
//! Parsing checks every tensor's name, datatype, shape and size but decodes no image: an
//! encoded `BYTES` image stays a slice of the body (binary) or base64 text (JSON) until the
//! pipeline has admitted the request.

use axum::body::Bytes;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Map, Value, json};
use vla_api::{PolicyTrace, Priority, Timing};

use crate::config::LimitsConfig;
use crate::error::ApiError;
use crate::infer::{Frame, Input, Row, RowAnswer};
use crate::model::TensorData;
use crate::names::clip;
use crate::spec::{DataType, Feed, ModelSpec};
use crate::text::TextEncoder;

/// The binary tensor extension's header: the length of the JSON part of a body.
pub const HEADER_LENGTH: &str = "inference-header-content-length";

/// An infer request as a protocol carries it: from a JSON body (with binary tensor data after
/// it) or from a gRPC `ModelInferRequest` ([`super::grpc`]). Every tensor's data is either JSON
/// (`data`) or little-endian bytes (`raw`; `BYTES` elements each with a 4-byte length).
#[derive(Debug, Deserialize)]
pub struct InferRequest {
    #[serde(default)]
    pub id: Option<String>,
    #[serde(default)]
    pub parameters: Map<String, Value>,
    pub inputs: Vec<InputTensor>,
    #[serde(default)]
    pub outputs: Option<Vec<RequestedOutput>>,
}

#[derive(Debug, Deserialize)]
pub struct InputTensor {
    pub name: String,
    pub shape: Vec<i64>,
    pub datatype: String,
    #[serde(default)]
    pub parameters: Map<String, Value>,
    #[serde(default)]
    pub data: Option<Value>,
    #[serde(skip)]
    pub raw: Option<Bytes>,
}

#[derive(Debug, Deserialize)]
pub struct RequestedOutput {
    pub name: String,
    #[serde(default)]
    pub parameters: Map<String, Value>,
}

/// An infer request checked against the model: one row per batch row.
#[derive(Debug)]
pub struct Parsed {
    pub id: Option<String>,
    pub priority: Option<Priority>,
    /// `parameters.timeout`, in microseconds.
    pub timeout_us: Option<u64>,
    pub rows: Vec<Row>,
    /// Outputs to answer with, by index into the model's outputs, and whether each is binary.
    pub outputs: Vec<(usize, bool)>,
}

/// One input tensor of `n` rows, converted: each row's input, for a `BYTES` instruction each
/// row's text, and for the state each row's values as sent (what the policies see).
struct Column {
    inputs: Vec<Input>,
    texts: Option<Vec<String>>,
    states: Option<Vec<Vec<f32>>>,
}

fn invalid(name: &str, problem: impl Into<String>) -> ApiError {
    ApiError::InvalidTensor { name: clip(name, 80), problem: problem.into() }
}

fn bad_parameter(name: &str, problem: &str) -> ApiError {
    ApiError::InvalidField { field: format!("parameters.{name}"), problem: problem.into() }
}

/// OIP's priority: 1 is the highest; 0 or absent means the robot's class. Names also work.
fn parse_priority(v: &Value) -> Result<Priority, ApiError> {
    match v {
        Value::Number(n) => match n.as_u64() {
            Some(1) => Ok(Priority::High),
            Some(2) => Ok(Priority::Normal),
            Some(3..) => Ok(Priority::Low),
            _ => Err(bad_parameter("priority", "must be 1 (high), 2 (normal) or 3 (low)")),
        },
        Value::String(s) => match s.as_str() {
            "high" => Ok(Priority::High),
            "normal" => Ok(Priority::Normal),
            "low" => Ok(Priority::Low),
            _ => Err(bad_parameter("priority", "must be high, normal or low")),
        },
        _ => Err(bad_parameter("priority", "must be a number or a string")),
    }
}

/// The length of the JSON part from `Inference-Header-Content-Length`, checked against a body
/// of `body_len` bytes.
pub fn header_length(value: Option<&HeaderValue>, body_len: usize) -> Result<Option<usize>, ApiError> {
    let Some(v) = value else { return Ok(None) };
    let n = v
        .to_str()
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .ok_or_else(|| ApiError::InferenceHeader("Inference-Header-Content-Length must be a byte count".into()))?;
    if n > body_len {
        return Err(ApiError::InferenceHeader(format!(
            "Inference-Header-Content-Length is {n} but the body has only {body_len} bytes"
        )));
    }
    Ok(Some(n))
}

/// Parses and checks an infer request body. Blocking (JSON of any size): run it on the pool.
pub fn parse(
    body: &Bytes,
    header_len: Option<usize>,
    spec: &ModelSpec,
    text: &TextEncoder,
    limits: &LimitsConfig,
) -> Result<Parsed, ApiError> {
    let split = header_len.map_or(body.len(), |n| n.min(body.len()));
    let json_part = &body[..split];
    let mut binary = body.slice(split..);
    let mut request: InferRequest = crate::validate::parse_json(json_part)?;
    for input in &mut request.inputs {
        let name = input.name.as_str();
        let Some(v) = input.parameters.get("binary_data_size") else { continue };
        let size =
            v.as_u64().ok_or_else(|| invalid(name, "parameters.binary_data_size must be a byte count"))? as usize;
        if input.data.is_some() {
            return Err(invalid(name, "has both `data` and parameters.binary_data_size"));
        }
        if size > binary.len() {
            return Err(invalid(
                name,
                format!("binary_data_size is {size} bytes but only {} bytes of binary data are left", binary.len()),
            ));
        }
        input.raw = Some(binary.split_to(size));
    }
    if !binary.is_empty() {
        return Err(ApiError::InferenceHeader(format!(
            "{} bytes of binary data follow the JSON header but no input claims them",
            binary.len()
        )));
    }
    check(request, spec, text, limits)
}

/// Checks an infer request against the model: one row per batch row, no image decoded.
pub fn check(
    request: InferRequest,
    spec: &ModelSpec,
    text: &TextEncoder,
    limits: &LimitsConfig,
) -> Result<Parsed, ApiError> {
    let priority = match request.parameters.get("priority") {
        None => None,
        Some(Value::Number(n)) if n.as_u64() == Some(0) => None,
        Some(v) => Some(parse_priority(v)?),
    };
    let timeout_us = match request.parameters.get("timeout") {
        None => None,
        Some(v) => Some(v.as_u64().ok_or_else(|| bad_parameter("timeout", "must be a whole number of microseconds"))?),
    };
    let seed = match request.parameters.get("seed") {
        None => None,
        Some(v) => Some(v.as_u64().ok_or_else(|| bad_parameter("seed", "must be a whole number (the noise seed)"))?),
    };
    let binary_default = match request.parameters.get("binary_data_output") {
        None => false,
        Some(v) => v.as_bool().ok_or_else(|| bad_parameter("binary_data_output", "must be true or false"))?,
    };

    if request.inputs.is_empty() {
        return Err(ApiError::InvalidField { field: "inputs".into(), problem: "must list the model's inputs".into() });
    }
    let mut columns: Vec<Option<Column>> = (0..spec.inputs.len()).map(|_| None).collect();
    let mut batch: Option<usize> = None;
    for input in &request.inputs {
        let name = input.name.as_str();
        let Some(idx) = spec.inputs.iter().position(|t| t.name == name) else {
            let names: Vec<&str> = spec.inputs.iter().map(|t| t.name.as_str()).collect();
            return Err(invalid(
                name,
                format!("is not an input of model `{}` (inputs: {})", spec.name, names.join(", ")),
            ));
        };
        if columns[idx].is_some() {
            return Err(invalid(name, "appears twice"));
        }
        if input.raw.is_none() && input.data.is_none() {
            return Err(invalid(name, "has neither `data` nor parameters.binary_data_size"));
        }
        let n = match input.shape.first() {
            Some(&n) if n >= 1 => n as usize,
            _ => {
                return Err(invalid(
                    name,
                    format!("shape {:?} must start with a batch size of at least 1", input.shape),
                ));
            }
        };
        let limit = spec.max_batch_size.min(spec.batching.queue_capacity);
        if n > limit {
            return Err(invalid(
                name,
                format!(
                    "batch of {n} is more than the model takes in one request ({limit}: max_batch_size, queue_capacity)"
                ),
            ));
        }
        match batch {
            Some(b) if b != n => {
                return Err(invalid(name, format!("batch size {n} differs from the other inputs' {b}")));
            }
            _ => batch = Some(n),
        }
        columns[idx] = Some(convert(input, spec, text, idx, n, limits)?);
    }
    let n = batch.unwrap_or(1);
    let rows = assemble(spec, text, columns, n, seed)?;

    let outputs = match &request.outputs {
        None => (0..spec.outputs.len()).map(|i| (i, binary_default)).collect(),
        Some(requested) => {
            // Each output at most once: the answer's size is bounded by the model's outputs.
            if requested.len() > spec.outputs.len() {
                return Err(ApiError::InvalidField {
                    field: "outputs".into(),
                    problem: format!(
                        "{} outputs requested; model `{}` has {}",
                        requested.len(),
                        spec.name,
                        spec.outputs.len()
                    ),
                });
            }
            let mut chosen: Vec<(usize, bool)> = Vec::with_capacity(requested.len());
            for o in requested {
                let idx = spec.outputs.iter().position(|t| t.name == o.name).ok_or_else(|| ApiError::InvalidField {
                    field: "outputs".into(),
                    problem: format!("`{}` is not an output of model `{}`", clip(&o.name, 80), spec.name),
                })?;
                let binary = match o.parameters.get("binary_data") {
                    None => binary_default,
                    Some(v) => v.as_bool().ok_or_else(|| ApiError::InvalidField {
                        field: format!("outputs.{}.parameters.binary_data", o.name),
                        problem: "must be true or false".into(),
                    })?,
                };
                if chosen.iter().any(|&(i, _)| i == idx) {
                    return Err(ApiError::InvalidField {
                        field: "outputs".into(),
                        problem: format!("`{}` is requested more than once", clip(&o.name, 80)),
                    });
                }
                chosen.push((idx, binary));
            }
            chosen
        }
    };
    Ok(Parsed { id: request.id, priority, timeout_us, rows, outputs })
}

/// The rows from the inputs' columns: what the client did not send is made the way the
/// robot endpoint makes it (tokens and mask from `BYTES` text, noise, black frames for
/// optional cameras, zeros for optional extra inputs), or refused as missing.
fn assemble(
    spec: &ModelSpec,
    text: &TextEncoder,
    mut columns: Vec<Option<Column>>,
    n: usize,
    seed: Option<u64>,
) -> Result<Vec<Row>, ApiError> {
    let ids = spec.input_of(Feed::TokenIds);
    let mask = spec.input_of(Feed::TokenMask);
    // Text sent as BYTES: its tokens feed the ids and the mask.
    let texts = ids.and_then(|i| columns[i].as_mut().and_then(|c| c.texts.take()));
    if let (Some(texts), Some(m)) = (&texts, mask) {
        if columns[m].is_some() {
            return Err(invalid(
                &spec.inputs[m].name,
                "is made from the instruction when it comes as BYTES text: send one or the other",
            ));
        }
        let dtype = spec.inputs[m].dtype;
        let masks = texts
            .iter()
            .map(|t| text.encode(t).map(|tokens| Input::Ready(TensorData::ints(dtype, tokens.mask))))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| ApiError::from_text(&spec.inputs[m].name, e))?;
        columns[m] = Some(Column { inputs: masks, texts: None, states: None });
    }
    let mut states = None;
    let mut per_input: Vec<Vec<Input>> = Vec::with_capacity(columns.len());
    for (i, column) in columns.into_iter().enumerate() {
        let t = &spec.inputs[i];
        let column = match (column, spec.feeds[i]) {
            (Some(c), Feed::State) => {
                states = c.states.clone();
                c.inputs
            }
            (Some(c), _) => c.inputs,
            (None, Feed::Camera(c)) if !spec.cameras[c].required => {
                (0..n).map(|_| Input::Ready(crate::preprocess::blank_frame(&spec.cameras[c]))).collect()
            }
            (None, Feed::Noise(_)) => (0..n).map(|_| Input::Noise).collect(),
            (None, Feed::Extra(e)) if !spec.extra_inputs[e].required => {
                (0..n).map(|_| Input::Ready(TensorData::zeros(t.dtype, t.sample_len()))).collect()
            }
            (None, _) => return Err(invalid(&t.name, "is missing")),
        };
        per_input.push(column);
    }
    let mut rows: Vec<Row> = (0..n)
        .map(|r| Row {
            instruction: String::new(),
            state: Vec::new(),
            inputs: Vec::new(),
            seed: seed.map(|s| s.wrapping_add(r as u64)),
        })
        .collect();
    for column in per_input {
        for (row, input) in rows.iter_mut().zip(column) {
            row.inputs.push(input);
        }
    }
    for (r, row) in rows.iter_mut().enumerate() {
        // What the policies see: the instruction as sent (`BYTES`), or its tokens decoded.
        row.instruction = match (&texts, ids.map(|i| &row.inputs[i])) {
            (Some(texts), _) => texts[r].clone(),
            (None, Some(Input::Ready(t))) => text.decode(&token_ids(t)),
            _ => String::new(),
        };
        row.state = states.as_ref().map(|s| s[r].clone()).unwrap_or_default();
    }
    Ok(rows)
}

fn token_ids(t: &TensorData) -> Vec<i64> {
    match t {
        TensorData::I64(v) => v.clone(),
        TensorData::I32(v) => v.iter().map(|&x| i64::from(x)).collect(),
        _ => Vec::new(),
    }
}

/// One input tensor of `n` rows → one [`Input`] per row.
fn convert(
    input: &InputTensor,
    spec: &ModelSpec,
    text: &TextEncoder,
    idx: usize,
    n: usize,
    limits: &LimitsConfig,
) -> Result<Column, ApiError> {
    let name = input.name.as_str();
    let raw = &input.raw;
    let declared = &spec.inputs[idx];
    let feed = spec.feeds[idx];
    let bytes_ok = matches!(feed, Feed::Camera(_) | Feed::TokenIds);
    if input.datatype == "BYTES" && bytes_ok {
        if !(input.shape == [n as i64] || input.shape == [n as i64, 1]) {
            return Err(invalid(name, format!("BYTES shape {:?} must be [{n}] or [{n}, 1]", input.shape)));
        }
        let elements = match raw {
            Some(raw) => split_bytes(name, raw)?,
            None => json_strings(name, input.data.as_ref())?,
        };
        if elements.len() != n {
            return Err(invalid(name, format!("has {} elements; shape {:?} needs {n}", elements.len(), input.shape)));
        }
        if let Feed::Camera(camera) = feed {
            // Left encoded: decoded by the pipeline once the request is admitted. In JSON, an
            // encoded image travels as base64 text.
            let inputs = elements
                .into_iter()
                .map(|e| Input::Frame {
                    camera,
                    field: format!("input `{name}`"),
                    frame: match raw {
                        Some(_) => Frame::File(e),
                        None => Frame::Base64(String::from_utf8_lossy(&e).into_owned()),
                    },
                })
                .collect();
            return Ok(Column { inputs, texts: None, states: None });
        }
        let mut inputs = Vec::with_capacity(n);
        let mut texts = Vec::with_capacity(n);
        for e in elements {
            let instruction = std::str::from_utf8(&e).map_err(|_| invalid(name, "is not UTF-8 text"))?;
            if instruction.len() > limits.max_instruction_bytes {
                return Err(invalid(
                    name,
                    format!("{} bytes, more than the limit of {}", instruction.len(), limits.max_instruction_bytes),
                ));
            }
            let tokens = text.encode(instruction).map_err(|e| ApiError::from_text(&format!("input `{name}`"), e))?;
            inputs.push(Input::Ready(TensorData::ints(declared.dtype, tokens.ids)));
            texts.push(instruction.to_string());
        }
        return Ok(Column { inputs, texts: Some(texts), states: None });
    }
    if let Feed::Camera(camera) = feed
        && input.datatype == "UINT8"
        && (declared.dtype != DataType::Uint8 || input.shape.get(1..) != declared.dims.get(1..))
    {
        return pixel_frames(input, camera, n, limits);
    }
    if input.datatype != declared.dtype.as_str() {
        let hint = match feed {
            Feed::Camera(_) => " (or BYTES, or UINT8 frames)",
            Feed::TokenIds => " (or BYTES)",
            _ => "",
        };
        return Err(invalid(
            name,
            format!(
                "datatype `{}` does not match the model's `{}`{hint}",
                clip(&input.datatype, 20),
                declared.dtype.as_str()
            ),
        ));
    }
    if input.shape.len() != declared.dims.len() || input.shape[1..] != declared.dims[1..] {
        return Err(invalid(name, format!("shape {:?} does not match the model's {:?}", input.shape, declared.dims)));
    }
    let per_row = declared.sample_len();
    let count = n * per_row;
    let elt = declared.dtype.size();
    if let Some(raw) = raw {
        check_binary_size(name, raw, count, elt, &input.shape)?;
    }
    let rows: Vec<TensorData> = match declared.dtype {
        DataType::Fp32 => {
            let v: Vec<f32> = match raw {
                Some(raw) => raw.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
                None => {
                    let finite_f32 = |v: &Value| v.as_f64().map(|x| x as f32).filter(|x| x.is_finite());
                    flatten(name, input.data.as_ref(), count, &input.shape, finite_f32, "a number in FP32 range")?
                }
            };
            if let Some(i) = v.iter().position(|x| !x.is_finite()) {
                return Err(invalid(name, format!("element {i} is not a finite number")));
            }
            v.chunks(per_row).map(|c| TensorData::F32(c.to_vec())).collect()
        }
        DataType::Bool => {
            let v: Vec<bool> = match raw {
                Some(raw) => raw.iter().map(|&b| b != 0).collect(),
                None => flatten(name, input.data.as_ref(), count, &input.shape, |v| v.as_bool(), "true or false")?,
            };
            v.chunks(per_row).map(|c| TensorData::Bool(c.to_vec())).collect()
        }
        dtype => {
            let v: Vec<i64> = match raw {
                Some(raw) => match dtype {
                    DataType::Int64 => {
                        raw.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap_or([0; 8]))).collect()
                    }
                    DataType::Int32 => {
                        raw.chunks_exact(4).map(|c| i64::from(i32::from_le_bytes([c[0], c[1], c[2], c[3]]))).collect()
                    }
                    _ => raw.iter().map(|&b| i64::from(b)).collect(),
                },
                None => {
                    let (lo, hi) = match dtype {
                        DataType::Uint8 => (0, 255),
                        DataType::Int32 => (i64::from(i32::MIN), i64::from(i32::MAX)),
                        _ => (i64::MIN, i64::MAX),
                    };
                    let get = |v: &Value| v.as_i64().filter(|x| (lo..=hi).contains(x));
                    flatten(name, input.data.as_ref(), count, &input.shape, get, &format!("an integer in {lo}..={hi}"))?
                }
            };
            if feed == Feed::TokenIds {
                check_tokens(name, &v, text.vocab())?;
            }
            v.chunks(per_row).map(|c| TensorData::ints(dtype, c.to_vec())).collect()
        }
    };
    let states = (feed == Feed::State).then(|| {
        rows.iter().map(|t| if let TensorData::F32(v) = t { v.clone() } else { Vec::new() }).collect::<Vec<_>>()
    });
    let inputs = rows
        .into_iter()
        .map(|t| match (feed, t) {
            // The state comes in the robot's units, as on the robot endpoint.
            (Feed::State, TensorData::F32(v)) => {
                Input::Ready(TensorData::F32(crate::preprocess::normalise_state(spec, &v)))
            }
            (_, t) => Input::Ready(t),
        })
        .collect();
    Ok(Column { inputs, texts: None, states })
}

/// A camera's frames as raw pixels, `UINT8 [n, height, width, 3]` (RGB, row-major), when the
/// model takes that camera in another form (`FP32`, normalised in the model's way, or another
/// size): each row becomes a frame the pipeline resizes and normalises as it does a decoded file.
fn pixel_frames(input: &InputTensor, camera: usize, n: usize, limits: &LimitsConfig) -> Result<Column, ApiError> {
    let name = input.name.as_str();
    let (height, width) = match input.shape[..] {
        [rows, h, w, 3]
            if rows == n as i64 && h > 0 && w > 0 && h <= i64::from(u32::MAX) && w <= i64::from(u32::MAX) =>
        {
            (h as u32, w as u32)
        }
        _ => {
            return Err(invalid(
                name,
                format!("UINT8 frames must have shape [{n}, height, width, 3] (RGB), not {:?}", input.shape),
            ));
        }
    };
    let pixels = u64::from(width) * u64::from(height);
    if pixels > limits.max_image_pixels {
        return Err(ApiError::from_frame(
            &format!("input `{name}`"),
            crate::preprocess::FrameError::TooManyPixels { width, height, limit: limits.max_image_pixels },
        ));
    }
    let per_row = pixels as usize * 3;
    let data: Bytes = match &input.raw {
        Some(raw) => {
            check_binary_size(name, raw, n * per_row, 1, &input.shape)?;
            raw.clone()
        }
        None => {
            let get = |v: &Value| v.as_u64().filter(|x| *x <= 255).map(|x| x as u8);
            flatten(name, input.data.as_ref(), n * per_row, &input.shape, get, "an integer in 0..=255")?.into()
        }
    };
    let inputs = (0..n)
        .map(|r| Input::Frame {
            camera,
            field: format!("input `{name}`"),
            frame: Frame::Pixels { width, height, data: data.slice(r * per_row..(r + 1) * per_row) },
        })
        .collect();
    Ok(Column { inputs, texts: None, states: None })
}

/// Token ids outside the model's vocabulary would index past its embedding and fail the whole
/// batch (on CUDA, the device): refused here.
fn check_tokens(name: &str, tokens: &[i64], vocab: usize) -> Result<(), ApiError> {
    match tokens.iter().position(|t| !(0..vocab as i64).contains(t)) {
        Some(i) => Err(invalid(name, format!("element {i} is {}; token ids are 0-{}", tokens[i], vocab - 1))),
        None => Ok(()),
    }
}

fn check_binary_size(name: &str, raw: &[u8], count: usize, elt: usize, shape: &[i64]) -> Result<(), ApiError> {
    if raw.len() != count * elt {
        return Err(invalid(
            name,
            format!("binary_data_size is {} bytes but shape {shape:?} needs {}", raw.len(), count * elt),
        ));
    }
    Ok(())
}

/// `data` flat or nested, as `count` values.
fn flatten<T>(
    name: &str,
    data: Option<&Value>,
    count: usize,
    shape: &[i64],
    get: impl Fn(&Value) -> Option<T>,
    what: &str,
) -> Result<Vec<T>, ApiError> {
    // `count` comes from the client's shape: allocate as the data arrives, not up front.
    let mut out = Vec::with_capacity(count.min(1 << 16));
    let mut stack = vec![data.unwrap_or(&Value::Null)];
    let mut seen = 0usize;
    while let Some(v) = stack.pop() {
        match v {
            Value::Array(items) => stack.extend(items.iter().rev()),
            other => {
                if out.len() >= count {
                    seen += 1;
                    continue;
                }
                out.push(get(other).ok_or_else(|| invalid(name, format!("element {} is not {what}", out.len())))?);
            }
        }
    }
    if out.len() != count || seen > 0 {
        return Err(invalid(name, format!("has {} elements; shape {shape:?} needs {count}", out.len() + seen)));
    }
    Ok(out)
}

/// Binary `BYTES`: each element a 4-byte little-endian length and that many bytes; each
/// element a slice of `raw`, not a copy.
fn split_bytes(name: &str, raw: &Bytes) -> Result<Vec<Bytes>, ApiError> {
    let mut out = Vec::new();
    let mut rest = raw.clone();
    while !rest.is_empty() {
        let Some((len, _)) = rest.split_first_chunk::<4>() else {
            return Err(invalid(name, "BYTES data ends inside an element's 4-byte length"));
        };
        let len = u32::from_le_bytes(*len) as usize;
        if len > rest.len() - 4 {
            return Err(invalid(name, format!("BYTES element of {len} bytes runs past the end of its data")));
        }
        let _ = rest.split_to(4);
        out.push(rest.split_to(len));
    }
    Ok(out)
}

fn json_strings(name: &str, data: Option<&Value>) -> Result<Vec<Bytes>, ApiError> {
    let mut out = Vec::new();
    let mut stack = vec![data.unwrap_or(&Value::Null)];
    while let Some(v) = stack.pop() {
        match v {
            Value::Array(items) => stack.extend(items.iter().rev()),
            Value::String(s) => out.push(Bytes::copy_from_slice(s.as_bytes())),
            _ => return Err(invalid(name, format!("element {} of a BYTES tensor is not a string", out.len()))),
        }
    }
    Ok(out)
}

/// Values of `dtype` from little-endian bytes, as JSON numbers (booleans for `BOOL`).
fn json_values(dtype: DataType, bytes: &[u8]) -> Vec<Value> {
    fn each<const N: usize>(bytes: &[u8], f: impl Fn([u8; N]) -> Value) -> Vec<Value> {
        bytes.chunks_exact(N).map(|c| f(c.try_into().unwrap_or([0; N]))).collect()
    }
    match dtype {
        DataType::Bool => bytes.iter().map(|&b| Value::Bool(b != 0)).collect(),
        DataType::Uint8 => bytes.iter().map(|&b| Value::from(b)).collect(),
        DataType::Int8 => bytes.iter().map(|&b| Value::from(b as i8)).collect(),
        DataType::Int16 => each(bytes, |b| Value::from(i16::from_le_bytes(b))),
        DataType::Int32 => each(bytes, |b| Value::from(i32::from_le_bytes(b))),
        DataType::Int64 => each(bytes, |b| Value::from(i64::from_le_bytes(b))),
        DataType::Fp16 => each(bytes, |b| Value::from(f64::from(half::f16::from_le_bytes(b).to_f32()))),
        DataType::Fp32 => each(bytes, |b| Value::from(f64::from(f32::from_le_bytes(b)))),
        DataType::Fp64 => each(bytes, |b| Value::from(f64::from_le_bytes(b))),
    }
}

/// Output `idx` of every row, concatenated in row order (little-endian bytes).
pub fn output_bytes(rows: &[RowAnswer], idx: usize) -> Vec<u8> {
    rows.iter().flat_map(|r| r.outputs[idx].iter().copied()).collect()
}

/// The request's decision chain (every row's policies, in row order; `modify` if any row's
/// action was changed), and with more than one row each row's own.
pub fn decisions(rows: &[RowAnswer]) -> (Value, Option<Value>) {
    let traces: Vec<&PolicyTrace> = rows.iter().map(|r| &r.policy).collect();
    let modified = traces.iter().any(|t| t.decision == "modify");
    let chain = json!({
        "decision": if modified { "modify" } else { "allow" },
        "policies": traces.iter().flat_map(|t| &t.policies).collect::<Vec<_>>(),
    });
    (chain, (traces.len() > 1).then(|| json!(traces)))
}

/// The infer response: JSON, or a JSON header followed by binary outputs.
///
/// `policy` is the request's decision chain (every row's, in row order; the decision is
/// `modify` if any row's action was changed); with more than one row, `policy_rows` has each
/// row's own. `parameters` says where the time went, as `timing` does on `/v1/inference`
/// (`preprocess_ms` is the parsing of the body and the decoding of its images; rows in more
/// than one batch: the longest wait is `queue_ms`, the first batch gives `inference_ms` and
/// `batch_size`).
pub fn respond(
    spec: &ModelSpec,
    id: Option<String>,
    outputs: &[(usize, bool)],
    rows: &[RowAnswer],
    timing: &Timing,
) -> Response {
    let n = rows.len();
    let any_binary = outputs.iter().any(|&(_, binary)| binary);
    let mut tail: Vec<u8> = Vec::new();
    let outputs: Vec<Value> = outputs
        .iter()
        .map(|&(idx, binary)| {
            let declared = &spec.outputs[idx];
            let mut shape = vec![n as i64];
            shape.extend(&declared.dims[1..]);
            let bytes = output_bytes(rows, idx);
            let mut out = json!({"name": declared.name, "datatype": declared.dtype.as_str(), "shape": shape});
            if binary {
                out["parameters"] = json!({"binary_data_size": bytes.len()});
                tail.extend_from_slice(&bytes);
            } else {
                out["data"] = Value::Array(json_values(declared.dtype, &bytes));
            }
            out
        })
        .collect();
    let mut body = json!({"model_name": spec.name, "model_version": spec.version, "outputs": outputs});
    if let Some(id) = id {
        body["id"] = Value::String(id);
    }
    let (policy, policy_rows) = decisions(rows);
    body["policy"] = policy;
    if let Some(per_row) = policy_rows {
        body["policy_rows"] = per_row;
    }
    body["parameters"] = json!(timing);
    let header = serde_json::to_vec(&body).unwrap_or_default();
    if !any_binary {
        return ([(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))], header).into_response();
    }
    let header_len = header.len();
    let mut all = header;
    all.extend_from_slice(&tail);
    let mut response =
        ([(header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"))], all).into_response();
    response.headers_mut().insert(HEADER_LENGTH, HeaderValue::from(header_len));
    response
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn spec() -> ModelSpec {
        ModelSpec::parse(crate::demo::MODEL_TOML, "tiny-vla").unwrap()
    }

    fn text() -> TextEncoder {
        TextEncoder::Utf8Bytes { len: 32, truncation: crate::spec::Truncation::Truncate }
    }

    fn parse_demo(body: &Bytes) -> Result<Parsed, ApiError> {
        parse(body, None, &spec(), &text(), &LimitsConfig::default())
    }

    fn state_only(data: Value) -> Bytes {
        Bytes::from(
            serde_json::to_vec(&json!({"inputs": [
                {"name": "image", "datatype": "FP32", "shape": [1, 3, 224, 224], "data": vec![0.0; 3 * 224 * 224]},
                {"name": "instruction", "datatype": "BYTES", "shape": [1], "data": ["pick"]},
                {"name": "state", "datatype": "FP32", "shape": [1, 7], "data": data},
            ]}))
            .unwrap(),
        )
    }

    fn ready(input: &Input) -> &TensorData {
        match input {
            Input::Ready(t) => t,
            other => panic!("not ready: {other:?}"),
        }
    }

    #[test]
    fn nested_and_flat_data_give_the_same_row() {
        let flat = parse_demo(&state_only(json!([0, 1, 2, 3, 4, 5, 6]))).unwrap();
        let nested = parse_demo(&state_only(json!([[0, 1, 2, 3, 4, 5, 6]]))).unwrap();
        assert_eq!(ready(&flat.rows[0].inputs[2]), ready(&nested.rows[0].inputs[2]));
        assert_eq!(ready(&flat.rows[0].inputs[2]), &TensorData::F32(vec![0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0]));
        let mut tokens = vec![0i64; 32];
        tokens[..4].copy_from_slice(&[112, 105, 99, 107]);
        assert_eq!(ready(&flat.rows[0].inputs[1]), &TensorData::I64(tokens));
        assert_eq!(flat.rows[0].instruction, "pick");
        assert_eq!(flat.rows[0].state, vec![0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    }

    #[test]
    fn an_encoded_image_is_left_for_the_pipeline_to_decode() {
        let body = Bytes::from(
            serde_json::to_vec(&json!({"inputs": [
                {"name": "image", "datatype": "BYTES", "shape": [1], "data": ["bm90IGFuIGltYWdl"]},
                {"name": "instruction", "datatype": "BYTES", "shape": [1], "data": ["pick"]},
                {"name": "state", "datatype": "FP32", "shape": [1, 7], "data": [0, 0, 0, 0, 0, 0, 0]},
            ]}))
            .unwrap(),
        );
        // Not an image at all, yet parsing succeeds: nothing was decoded.
        let parsed = parse_demo(&body).unwrap();
        assert!(
            matches!(&parsed.rows[0].inputs[0], Input::Frame { frame: Frame::Base64(t), .. } if t == "bm90IGFuIGltYWdl")
        );
    }

    #[test]
    fn an_element_count_mismatch_names_the_input() {
        let err = parse_demo(&state_only(json!([0, 1, 2]))).unwrap_err();
        assert_eq!(err.to_string(), "input `state`: has 3 elements; shape [1, 7] needs 7");
        let err = parse_demo(&state_only(json!([0, 1, 2, 3, 4, 5, "x"]))).unwrap_err();
        assert!(err.to_string().contains("element 6 is not a number"), "{err}");
    }

    #[test]
    fn an_output_requested_twice_is_refused() {
        let mut request: Value = serde_json::from_slice(&state_only(json!([0, 1, 2, 3, 4, 5, 6]))).unwrap();
        request["outputs"] = json!([{"name": "action"}, {"name": "action"}]);
        let body = Bytes::from(serde_json::to_vec(&request).unwrap());
        let err = parse_demo(&body).unwrap_err();
        assert_eq!(err.code(), "invalid_field");
        assert!(err.to_string().contains("outputs"), "{err}");
    }

    #[test]
    fn token_ids_outside_the_vocabulary_are_refused() {
        let body = Bytes::from(
            serde_json::to_vec(&json!({"inputs": [
                {"name": "image", "datatype": "FP32", "shape": [1, 3, 224, 224], "data": vec![0.0; 3 * 224 * 224]},
                {"name": "instruction", "datatype": "INT64", "shape": [1, 32], "data": vec![300; 32]},
                {"name": "state", "datatype": "FP32", "shape": [1, 7], "data": [0, 0, 0, 0, 0, 0, 0]},
            ]}))
            .unwrap(),
        );
        let err = parse_demo(&body).unwrap_err();
        assert!(err.to_string().contains("token ids are 0-255"), "{err}");
    }

    #[test]
    fn bytes_elements_are_length_prefixed() {
        let mut raw = Vec::new();
        for s in ["ab", "", "xyz"] {
            raw.extend((s.len() as u32).to_le_bytes());
            raw.extend(s.as_bytes());
        }
        let raw = Bytes::from(raw);
        assert_eq!(split_bytes("t", &raw).unwrap(), vec![Bytes::from("ab"), Bytes::new(), Bytes::from("xyz")]);
        assert!(split_bytes("t", &raw.slice(..raw.len() - 1)).is_err());
        assert!(split_bytes("t", &Bytes::from_static(&[1, 0])).is_err());
    }

    #[test]
    fn values_convert_from_little_endian_bytes() {
        assert_eq!(json_values(DataType::Fp32, &1.5f32.to_le_bytes()), vec![json!(1.5)]);
        assert_eq!(json_values(DataType::Int64, &(-3i64).to_le_bytes()), vec![json!(-3)]);
        assert_eq!(json_values(DataType::Fp16, &half::f16::from_f32(0.5).to_le_bytes()), vec![json!(0.5)]);
        assert_eq!(json_values(DataType::Bool, &[0, 1]), vec![json!(false), json!(true)]);
    }

    #[test]
    fn priorities_follow_oip_numbers_and_names() {
        assert_eq!(parse_priority(&json!(1)).unwrap(), Priority::High);
        assert_eq!(parse_priority(&json!(7)).unwrap(), Priority::Low);
        assert_eq!(parse_priority(&json!("normal")).unwrap(), Priority::Normal);
        assert!(parse_priority(&json!(-1)).is_err());
    }
}
