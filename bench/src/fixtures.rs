//! What the benchmarks send and run: synthetic camera images, robot requests, OIP binary
//! tensors and policy inputs, the same for the load generator, the baselines and criterion.

use std::path::{Path, PathBuf};

use base64::Engine;
use serde_json::json;
use vla_api::InferenceRequest;

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

/// A 7-joint state that differs per `seed`.
pub fn state(seed: u32) -> Vec<f32> {
    (0..7).map(|j| ((seed + j) % 20) as f32 * 0.05 - 0.5).collect()
}

/// `/v1/inference` bodies for `robot_id`, one per frame.
pub fn v1_bodies(robot_id: &str, frames: &[Vec<u8>]) -> Vec<bytes::Bytes> {
    frames
        .iter()
        .enumerate()
        .map(|(i, frame)| {
            let request = InferenceRequest {
                robot_id: robot_id.into(),
                robot_type: None,
                model: None,
                instruction: INSTRUCTION.into(),
                image: base64::engine::general_purpose::STANDARD.encode(frame),
                state: state(i as u32),
                deadline_ms: Some(30_000),
                priority: None,
            };
            serde_json::to_vec(&request).expect("serialising a request").into()
        })
        .collect()
}

/// A preprocessed image input as the model takes it: FP32 `[3, 224, 224]`, normalised.
pub fn image_tensor(seed: u32) -> Vec<f32> {
    (0..3 * 224 * 224).map(|i| ((i as u32 + seed * 31) % 255) as f32 / 127.0 - 1.0).collect()
}

/// An OIP v2 infer body with binary tensors (the binary tensor extension): the JSON header,
/// then the image (FP32 `[1,3,224,224]`), instruction tokens (INT64 `[1,32]`) and state (FP32
/// `[1,7]`) as little-endian bytes; the action comes back binary too. Returns the body and the
/// header's length (`Inference-Header-Content-Length`).
pub fn oip_body(seed: u32) -> (bytes::Bytes, usize) {
    let image: Vec<u8> = image_tensor(seed).iter().flat_map(|v| v.to_le_bytes()).collect();
    let tokens: Vec<u8> =
        appliance::preprocess::instruction_tokens(INSTRUCTION, 32).iter().flat_map(|v| v.to_le_bytes()).collect();
    let state: Vec<u8> = state(seed).iter().flat_map(|v| v.to_le_bytes()).collect();
    let header = json!({
        "inputs": [
            {"name": "image", "datatype": "FP32", "shape": [1, 3, 224, 224], "parameters": {"binary_data_size": image.len()}},
            {"name": "instruction", "datatype": "INT64", "shape": [1, 32], "parameters": {"binary_data_size": tokens.len()}},
            {"name": "state", "datatype": "FP32", "shape": [1, 7], "parameters": {"binary_data_size": state.len()}},
        ],
        "parameters": {"binary_data_output": true},
    });
    let mut body = serde_json::to_vec(&header).expect("serialising a header");
    let header_len = body.len();
    for part in [image, tokens, state] {
        body.extend(part);
    }
    (body.into(), header_len)
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
        let (body, header_len) = oip_body(3);
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
