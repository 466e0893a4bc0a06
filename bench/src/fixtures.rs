//! What the benchmarks send and run: synthetic camera images, robot requests, OIP binary
//! tensors and policy inputs, the same for the load generator, the baselines and criterion.

use std::path::{Path, PathBuf};

use appliance::config::LimitsConfig;
use appliance::model::TensorData;
use appliance::spec::{Feed, ModelSpec};
use appliance::text::TextEncoder;
use base64::Engine;
use serde_json::json;
use vla_api::{FrameWire, InferenceRequest};

/// The instruction every simulated robot sends (realistic length; no policy matches it).
pub const INSTRUCTION: &str = "pick up the red block and place it in the left bin";

/// A synthetic camera frame: a JPEG of `width`×`height` with gradients and texture, different
/// for each `seed` (a camera never sends the same frame twice).
pub fn jpeg(width: u32, height: u32, seed: u32) -> Vec<u8> {
    let img = image::RgbImage::from_fn(width, height, |x, y| {
        let noise = (x.wrapping_mul(2_654_435_761) ^ y.wrapping_mul(40_503) ^ seed.wrapping_mul(97)) >> 27;
        image::Rgb([(x + seed * 13) as u8, (y + seed * 7) as u8, (((x ^ y) + seed) as u8).wrapping_add(noise as u8)])
    });
    let mut bytes = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut bytes), image::ImageFormat::Jpeg).expect("encoding a JPEG in memory");
    bytes
}

/// A state of `dim` joints that differs per `seed`.
pub fn state(seed: u32, dim: usize) -> Vec<f32> {
    (0..dim as u32).map(|j| ((seed + j) % 20) as f32 * 0.05 - 0.5).collect()
}

/// A model the benchmarks drive: its spec and tokenizer, and what its robots send it.
#[derive(Debug)]
pub struct Workload {
    pub dir: PathBuf,
    pub spec: ModelSpec,
    pub text: TextEncoder,
}

impl Workload {
    /// The model in `dir` (a directory with `model.toml`).
    pub fn load(dir: &Path) -> anyhow::Result<Workload> {
        let spec = ModelSpec::load(dir)?;
        let text = TextEncoder::load(dir, &spec).map_err(anyhow::Error::msg)?;
        Ok(Workload { dir: dir.to_path_buf(), spec, text })
    }

    /// The model's name.
    pub fn name(&self) -> &str {
        &self.spec.name
    }

    /// Camera frames each request carries.
    pub fn cameras(&self) -> usize {
        self.spec.cameras.len()
    }

    /// `/v1/inference` bodies for `robot_id`: body `j` takes `cameras()` frames in turn from
    /// `frames` (one body per `cameras()` frames, at least one).
    pub fn v1_bodies(&self, robot_id: &str, frames: &[Vec<u8>]) -> Vec<bytes::Bytes> {
        let cams = self.cameras().max(1);
        let encode = |f: &Vec<u8>| base64::engine::general_purpose::STANDARD.encode(f);
        (0..(frames.len() / cams).max(1))
            .map(|j| {
                let frame = |c: usize| &frames[(j * cams + c) % frames.len()];
                let mut request = InferenceRequest {
                    robot_id: robot_id.into(),
                    model: Some(self.spec.name.clone()),
                    instruction: INSTRUCTION.into(),
                    state: state(j as u32, self.spec.state_dim()),
                    deadline_ms: Some(30_000),
                    ..InferenceRequest::default()
                };
                match self.spec.cameras.as_slice() {
                    [_] => request.image = Some(encode(frame(0))),
                    cams => {
                        request.images = cams
                            .iter()
                            .enumerate()
                            .map(|(c, cam)| (cam.name.clone(), FrameWire::Encoded(encode(frame(c)))))
                            .collect();
                    }
                }
                serde_json::to_vec(&request).expect("serialising a request").into()
            })
            .collect()
    }

    /// One row of inputs ready for the forward, every camera a synthetic frame already
    /// preprocessed (as OIP binary requests bring them), the noise from `seed`.
    pub fn sample(&self, seed: u32) -> Vec<TensorData> {
        let frames: Vec<TensorData> = self
            .spec
            .cameras
            .iter()
            .enumerate()
            .map(|(c, cam)| {
                appliance::preprocess::frame_tensor(&raw_frame(cam.width, cam.height, seed + c as u32), cam)
            })
            .collect();
        self.row(frames, seed, true)
    }

    /// What a robot's request needs done without the server: each camera's JPEG decoded,
    /// resized and normalised, the instruction tokenized, the state normalised, the noise made.
    pub fn robot_sample(&self, jpegs: &[&[u8]], seed: u32, limits: &LimitsConfig) -> anyhow::Result<Vec<TensorData>> {
        let frames = self
            .spec
            .cameras
            .iter()
            .zip(jpegs)
            .map(|(cam, jpeg)| {
                let probe = appliance::preprocess::probe(jpeg, limits)?;
                Ok(appliance::preprocess::camera_input(jpeg, &probe, cam)?)
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(self.row(frames, seed, true))
    }

    /// The row from its camera tensors; noise made when `noise`, else left out.
    fn row(&self, mut frames: Vec<TensorData>, seed: u32, noise: bool) -> Vec<TensorData> {
        let spec = &self.spec;
        let tokens = self.text.encode(INSTRUCTION).expect("the bench instruction fits every model");
        let mut noise_values = appliance::noise::normal(
            u64::from(seed),
            spec.feeds
                .iter()
                .zip(&spec.inputs)
                .filter(|(f, _)| matches!(f, Feed::Noise(_)))
                .map(|(_, t)| t.sample_len())
                .sum(),
        )
        .into_iter();
        let mut row = Vec::with_capacity(spec.inputs.len());
        for (feed, t) in spec.feeds.iter().zip(&spec.inputs) {
            row.push(match *feed {
                Feed::Camera(c) => std::mem::replace(&mut frames[c], TensorData::F32(Vec::new())),
                Feed::TokenIds => TensorData::ints(t.dtype, tokens.ids.clone()),
                Feed::TokenMask => TensorData::ints(t.dtype, tokens.mask.clone()),
                Feed::State => {
                    TensorData::F32(appliance::preprocess::normalise_state(spec, &state(seed, spec.state_dim())))
                }
                Feed::Noise(_) if noise => TensorData::F32(noise_values.by_ref().take(t.sample_len()).collect()),
                Feed::Noise(_) => continue,
                Feed::Extra(_) => TensorData::zeros(t.dtype, t.sample_len()),
            });
        }
        row
    }

    /// An OIP v2 infer body with binary tensors (the binary tensor extension): the JSON
    /// header, then every input but the noise (the host makes it) as little-endian bytes,
    /// cameras preprocessed as the model takes them; outputs come back binary too. Returns the
    /// body and the header's length (`Inference-Header-Content-Length`).
    pub fn oip_body(&self, seed: u32) -> (bytes::Bytes, usize) {
        let spec = &self.spec;
        let frames: Vec<TensorData> = spec
            .cameras
            .iter()
            .enumerate()
            .map(|(c, cam)| {
                appliance::preprocess::frame_tensor(&raw_frame(cam.width, cam.height, seed + c as u32), cam)
            })
            .collect();
        let row = self.row(frames, seed, false);
        let sent = spec.feeds.iter().zip(&spec.inputs).filter(|(f, _)| !matches!(f, Feed::Noise(_)));
        let blobs: Vec<Vec<u8>> = row.iter().map(TensorData::le_bytes).collect();
        let inputs: Vec<serde_json::Value> = sent
            .zip(&blobs)
            .map(|((_, t), blob)| {
                let mut shape = t.dims.clone();
                shape[0] = 1;
                json!({"name": t.name, "datatype": t.dtype.as_str(), "shape": shape, "parameters": {"binary_data_size": blob.len()}})
            })
            .collect();
        let header = json!({"inputs": inputs, "parameters": {"binary_data_output": true}});
        let mut body = serde_json::to_vec(&header).expect("serialising a header");
        let header_len = body.len();
        for blob in blobs {
            body.extend(blob);
        }
        (body.into(), header_len)
    }
}

/// A synthetic raw frame of `width`×`height`, different per `seed`.
fn raw_frame(width: u32, height: u32, seed: u32) -> image::RgbImage {
    image::RgbImage::from_fn(width, height, |x, y| {
        image::Rgb([(x + seed * 13) as u8, (y + seed * 7) as u8, ((x ^ y) + seed) as u8])
    })
}

/// Generates the demo model (`tiny-vla`) into `dir` and returns its directory.
pub fn demo_model(dir: &Path) -> anyhow::Result<PathBuf> {
    appliance::demo::generate(dir)?;
    Ok(dir.join(appliance::demo::NAME))
}

/// The request context the policy benchmarks show their policies: a robot asking for a pick.
pub fn policy_context() -> appliance::policy::bindings::RequestContext {
    appliance::policy::bindings::RequestContext {
        request_id: "8d3c6f1e-2b4a-4c7e-9f10-5a6b7c8d9e0f".into(),
        robot_id: "arm-1".into(),
        robot_type: "demo".into(),
        model: "tiny-vla".into(),
        instruction: INSTRUCTION.into(),
        state: vec![0.1, 0.2, 0.3, 0.0, 0.0, 0.0, 0.0],
        time_ms: 1_795_000_000_000,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_decode_and_differ() {
        let (a, b) = (jpeg(64, 48, 1), jpeg(64, 48, 2));
        assert_ne!(a, b);
        let img = image::load_from_memory(&a).expect("decodes");
        assert_eq!((img.width(), img.height()), (64, 48));
    }

    #[test]
    fn oip_body_sizes_match_its_header() {
        let tmp = tempfile::tempdir().expect("temp dir");
        let work = Workload::load(&demo_model(tmp.path()).expect("demo model")).expect("loads");
        let (body, header_len) = work.oip_body(3);
        let header: serde_json::Value = serde_json::from_slice(&body[..header_len]).expect("JSON header");
        let declared: u64 = header["inputs"]
            .as_array()
            .expect("inputs")
            .iter()
            .map(|i| i["parameters"]["binary_data_size"].as_u64().expect("size"))
            .sum();
        assert_eq!(declared as usize, body.len() - header_len);
    }
}
