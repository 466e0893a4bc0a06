//! The one request pipeline both inference endpoints share (`src/infer.rs`): admission runs
//! before any image is decoded, on `/v1/inference` and on OIP infer alike, so a request the
//! robot's quota refuses costs no decoding.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

/// `vla_image_decode_duration_seconds_count` of the demo model: how many decodes ran.
async fn decodes(app: &TestAppliance) -> u64 {
    let text = app.admin(Method::GET, "/metrics").send().await.unwrap().text().await.unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(r#"vla_image_decode_duration_seconds_count{model="tiny-vla"} "#))
        .map_or(0, |v| v.trim().parse().unwrap())
}

/// An OIP binary request of `rows` rows, each a large encoded camera frame (`BYTES`).
fn oip_body(rows: usize) -> (Vec<u8>, usize) {
    let frames: Vec<Vec<u8>> = (0..rows).map(|i| jpeg(1600, 1200, i as u8)).collect();
    let mut images = Vec::new();
    for f in &frames {
        images.extend((f.len() as u32).to_le_bytes());
        images.extend(f);
    }
    let mut texts = Vec::new();
    for _ in 0..rows {
        texts.extend(4u32.to_le_bytes());
        texts.extend(b"pick");
    }
    let state: Vec<u8> = (0..rows * 7).flat_map(|i| (i as f32 * 0.01).to_le_bytes()).collect();
    let header = json!({"inputs": [
        {"name": "image", "datatype": "BYTES", "shape": [rows], "parameters": {"binary_data_size": images.len()}},
        {"name": "instruction", "datatype": "BYTES", "shape": [rows], "parameters": {"binary_data_size": texts.len()}},
        {"name": "state", "datatype": "FP32", "shape": [rows, 7], "parameters": {"binary_data_size": state.len()}},
    ]});
    let mut body = serde_json::to_vec(&header).unwrap();
    let len = body.len();
    for part in [&images, &texts, &state] {
        body.extend_from_slice(part);
    }
    (body, len)
}

async fn oip(app: &TestAppliance, robot: &str, body: &(Vec<u8>, usize)) -> (StatusCode, Value, Duration) {
    let started = Instant::now();
    let response = app
        .as_robot(robot, Method::POST, "/v2/models/tiny-vla/infer")
        .await
        .header("inference-header-content-length", body.1)
        .body(body.0.clone())
        .send()
        .await
        .unwrap();
    let status = response.status();
    let bytes = response.bytes().await.unwrap();
    let elapsed = started.elapsed();
    let text = match std::str::from_utf8(&bytes) {
        Ok(t) => t.to_string(),
        Err(e) => String::from_utf8_lossy(&bytes[..e.valid_up_to()]).into_owned(),
    };
    let json: Value =
        serde_json::Deserializer::from_str(&text).into_iter().next().and_then(Result::ok).unwrap_or_default();
    (status, json, elapsed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_refused_by_its_quota_decodes_no_image_on_either_endpoint() {
    let app = TestAppliance::start(|config, _| {
        config.policy.preload =
            vec![preload("rate-limit", "admission", 0, json!({"robot": {"rate": "1000/s", "burst": 1000}}))];
    })
    .await;
    app.robot_key("spent").await;
    app.robot_key("allowed").await;
    let put = app.admin(Method::PUT, "/admin/quotas/spent").json(&json!({"day": 0})).send().await.unwrap();
    assert_eq!(put.status(), StatusCode::OK);

    // Identical OIP requests, eight large frames each: the robot over its quota is refused
    // before any frame is decoded; the other's eight frames are decoded and computed.
    let body = oip_body(8);
    let before = decodes(&app).await;
    let (status, refused, refused_in) = oip(&app, "spent", &body).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{refused}");
    assert_eq!(refused["code"], "rate_limited");
    assert_eq!(refused["denied_by"]["code"], "quota_exhausted");
    assert_eq!(decodes(&app).await, before, "the refused request decoded an image");

    let (status, allowed, allowed_in) = oip(&app, "allowed", &body).await;
    assert_eq!(status, StatusCode::OK, "{allowed}");
    assert_eq!(allowed["outputs"][0]["shape"], json!([8, 7]));
    assert_eq!(decodes(&app).await, before + 1, "the allowed request's frames are decoded in one task");
    assert!(allowed["parameters"]["preprocess_ms"].as_f64().unwrap() > 0.0);
    assert!(
        refused_in < allowed_in,
        "refused in {refused_in:?}, allowed (with decoding and a forward) in {allowed_in:?}"
    );

    // The same on the robot endpoint: a frame the refused robot sends is never decoded, even
    // one that would not decode at all.
    let mut request = robot_request(1);
    request.robot_id = "spent".into();
    request.robot_type = None;
    request.image = Some(b64(b"not an image at all"));
    let r = app.infer(request).await;
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    let mut request = robot_request(2);
    request.robot_id = "allowed".into();
    request.robot_type = None;
    let r = app.infer(request.clone()).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(decodes(&app).await, before + 2);
    // An admitted robot's undecodable frame is refused by the decoder, and its charge given back.
    request.image = Some(b64(b"not an image at all"));
    let r = app.infer(request).await;
    assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(r.json::<Value>().await.unwrap()["code"], "unsupported_image_format");
}
