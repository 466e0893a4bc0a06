//! Real VLA shapes served side by side over real HTTPS: `tiny-vla` (one camera, byte tokens,
//! one step), `tiny-pi` as an AOTInductor package and `tiny-pi-ts` as TorchScript (two UINT8
//! cameras, a BPE tokenizer with its mask, a normalised 14-dim state, noise, 50 × 14 action
//! chunks, an extra input and an extra output), as `scripts/setup.sh` exports them into
//! `models/build` (`models/export.py`). Their answers equal PyTorch's own forward on the same
//! inputs (`reference.json`, written by the export), on the robot endpoint, on OIP and through
//! Triton's Python client; every bad input is refused naming its field while another robot
//! keeps being served; an output of another shape than the declared one is never returned.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};

use common::*;
use reqwest::StatusCode;
use serde_json::{Value, json};
use vla_api::{ErrorBody, InferenceRequest, InferenceResponse};

const PI: [&str; 2] = ["tiny-pi", "tiny-pi-ts"];

fn reference() -> Value {
    let text = std::fs::read_to_string(built_model("tiny-pi").join("reference.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// The three models in one repository.
async fn start() -> TestAppliance {
    TestAppliance::start(|_, repo| {
        add_model(repo, "tiny-vla", appliance::demo::MODEL_TOML);
        for name in PI {
            add_built_model(repo, name);
        }
    })
    .await
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect()
}

fn assert_close(what: &str, got: &[f64], want: &[f64], tolerance: f64) {
    assert_eq!(got.len(), want.len(), "{what}: {} values, PyTorch has {}", got.len(), want.len());
    let worst = got.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
    assert!(worst < tolerance, "{what}: max |Δ| {worst} ≥ {tolerance}");
}

/// A reference request as a robot sends it: `base` as a PNG file (lossless, so the pixels are
/// PyTorch's), `wrist` as raw rgb8.
fn robot_request(robot: &str, model: &str, r: &Value) -> InferenceRequest {
    let mut body = r.clone();
    let base = &r["images"]["base"];
    let pixels =
        base64::Engine::decode(&base64::engine::general_purpose::STANDARD, base["data"].as_str().unwrap()).unwrap();
    let (w, h) = (base["width"].as_u64().unwrap() as u32, base["height"].as_u64().unwrap() as u32);
    let image = image::RgbImage::from_raw(w, h, pixels).unwrap();
    let mut png = Vec::new();
    image.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png).unwrap();
    body["images"]["base"] = json!(b64(&png));
    body["robot_id"] = json!(robot);
    body["model"] = json!(model);
    serde_json::from_value(body).unwrap()
}

fn check_answer(what: &str, answer: &InferenceResponse, want: &Value, seed: u64, tolerance: f64) {
    assert_eq!(answer.actions.len(), 50, "{what}: a chunk of 50 steps");
    assert!(answer.actions.iter().all(|s| s.len() == 14), "{what}: 14 dofs a step");
    assert_eq!(answer.action, answer.actions[0], "{what}: `action` is the first step");
    assert_eq!(answer.dt_ms, Some(20.0));
    assert_eq!(answer.seed, Some(seed), "{what}: the seed it ran with");
    let got: Vec<f64> = answer.actions.iter().flatten().map(|&v| f64::from(v)).collect();
    assert_close(&format!("{what}: actions"), &got, &floats(&want["actions"]), tolerance);
    assert_close(&format!("{what}: progress"), &answer.outputs["progress"], &floats(&want["progress"]), tolerance);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_robot_endpoint_answers_as_pytorch_does_for_both_exports() {
    let app = start().await;
    let reference = reference();
    let tolerance = reference["tolerance"].as_f64().unwrap();
    for model in PI {
        for case in reference["cases"].as_array().unwrap() {
            let requests = case["requests"].as_array().unwrap();
            // Sent together, so that the rows of the 3-row case can share a batch.
            let answers = futures::future::join_all(requests.iter().enumerate().map(|(r, request)| {
                let request = robot_request(&format!("arm-{r}"), model, request);
                async { app.infer(request).await }
            }))
            .await;
            for (r, response) in answers.into_iter().enumerate() {
                let what = format!("{model}, row {r} of {}", requests.len());
                assert_eq!(response.status(), StatusCode::OK, "{what}: {}", response.text().await.unwrap());
                let answer: InferenceResponse = response.json().await.unwrap();
                assert_eq!(answer.model, model);
                let seed = requests[r]["seed"].as_u64().unwrap();
                check_answer(&what, &answer, &case["outputs"][r], seed, tolerance);
            }
        }
    }

    // The same seed, the same decision; another seed, another one.
    let request = &reference["cases"][0]["requests"][0];
    let again: InferenceResponse = app.infer(robot_request("arm-0", "tiny-pi", request)).await.json().await.unwrap();
    check_answer(
        "repeated",
        &again,
        &reference["cases"][0]["outputs"][0],
        request["seed"].as_u64().unwrap(),
        tolerance,
    );
    let mut other = robot_request("arm-0", "tiny-pi", request);
    other.seed = Some(7);
    let other: InferenceResponse = app.infer(other).await.json().await.unwrap();
    assert_ne!(other.actions, again.actions);
    // No seed: the appliance picks one and says which, so the decision can be replayed.
    let mut unseeded = robot_request("arm-0", "tiny-pi", request);
    unseeded.seed = None;
    let unseeded: InferenceResponse = app.infer(unseeded).await.json().await.unwrap();
    let mut replay = robot_request("arm-0", "tiny-pi", request);
    replay.seed = unseeded.seed;
    let replay: InferenceResponse = app.infer(replay).await.json().await.unwrap();
    assert_eq!(replay.actions, unseeded.actions);

    // Frames of another size are resized; the extra input is optional (zeros).
    let mut sized = robot_request("arm-0", "tiny-pi", request);
    sized.images.insert("wrist".into(), vla_api::FrameWire::Encoded(b64(&jpeg(320, 240, 3))));
    sized.extra.clear();
    let response = app.infer(sized).await;
    assert_eq!(response.status(), StatusCode::OK);

    // The one-camera demo beside it, unchanged: one step, `image`.
    let response = app.infer(common::robot_request(1)).await;
    assert_eq!(response.status(), StatusCode::OK);
    let answer: InferenceResponse = response.json().await.unwrap();
    assert_eq!((answer.model.as_str(), answer.actions.len(), answer.action.len()), ("tiny-vla", 1, 7));
    app.stop().await.unwrap();
}

/// An OIP infer body for `rows` of the reference: cameras as binary UINT8 tensors, the
/// instruction as BYTES text (the appliance tokenizes it and makes the mask), state and goal
/// as JSON, no noise (the `seed` parameter makes it, row r from seed + r).
fn oip_body(rows: &[Value], seed: u64) -> (Vec<u8>, usize) {
    let n = rows.len();
    let mut blobs = Vec::new();
    let mut inputs = Vec::new();
    for camera in ["base", "wrist"] {
        let mut blob = Vec::new();
        for r in rows {
            let data = r["images"][camera]["data"].as_str().unwrap();
            blob.extend(base64::Engine::decode(&base64::engine::general_purpose::STANDARD, data).unwrap());
        }
        inputs.push(json!({"name": camera, "datatype": "UINT8", "shape": [n, 224, 224, 3], "parameters": {"binary_data_size": blob.len()}}));
        blobs.push(blob);
    }
    let texts: Vec<&Value> = rows.iter().map(|r| &r["instruction"]).collect();
    inputs.push(json!({"name": "tokens", "datatype": "BYTES", "shape": [n], "data": texts}));
    let states: Vec<f64> = rows.iter().flat_map(|r| floats(&r["state"])).collect();
    inputs.push(json!({"name": "state", "datatype": "FP32", "shape": [n, 14], "data": states}));
    let goals: Vec<f64> = rows.iter().flat_map(|r| floats(&r["extra"]["goal"])).collect();
    inputs.push(json!({"name": "goal", "datatype": "FP32", "shape": [n, 3], "data": goals}));
    let header = json!({"id": "pi", "inputs": inputs, "parameters": {"seed": seed}});
    let mut body = serde_json::to_vec(&header).unwrap();
    let header_len = body.len();
    for blob in blobs {
        body.extend(blob);
    }
    (body, header_len)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oip_answers_as_pytorch_does_for_one_row_and_a_batch() {
    let app = start().await;
    let reference = reference();
    let tolerance = reference["tolerance"].as_f64().unwrap();
    for model in PI {
        // Metadata: every input and output with its real datatype, and the platform.
        let meta: Value = app
            .as_robot("oip", reqwest::Method::GET, &format!("/v2/models/{model}"))
            .await
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let platform = if model == "tiny-pi" { "pytorch_aoti" } else { "pytorch_torchscript" };
        assert_eq!(meta["platform"], platform, "{meta}");
        let inputs: Vec<(&str, &str)> = meta["inputs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| (i["name"].as_str().unwrap(), i["datatype"].as_str().unwrap()))
            .collect();
        assert_eq!(
            inputs,
            [
                ("base", "UINT8"),
                ("wrist", "UINT8"),
                ("tokens", "INT64"),
                ("mask", "INT64"),
                ("state", "FP32"),
                ("goal", "FP32"),
                ("noise", "FP32")
            ],
            "{meta}"
        );
        let outputs: Vec<(&str, &str)> = meta["outputs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|o| (o["name"].as_str().unwrap(), o["datatype"].as_str().unwrap()))
            .collect();
        assert_eq!(outputs, [("actions", "FP32"), ("progress", "FP32")], "{meta}");

        for case in reference["cases"].as_array().unwrap() {
            let rows = case["requests"].as_array().unwrap();
            let seed = rows[0]["seed"].as_u64().unwrap();
            let (body, header_len) = oip_body(rows, seed);
            let response = app
                .as_robot("oip", reqwest::Method::POST, &format!("/v2/models/{model}/infer"))
                .await
                .header("content-type", "application/octet-stream")
                .header("inference-header-content-length", header_len.to_string())
                .body(body)
                .send()
                .await
                .unwrap();
            let what = format!("{model}, {} rows", rows.len());
            assert_eq!(response.status(), StatusCode::OK, "{what}: {}", response.text().await.unwrap());
            let answer: Value = response.json().await.unwrap();
            let output =
                |name: &str| answer["outputs"].as_array().unwrap().iter().find(|o| o["name"] == name).unwrap().clone();
            let (actions, progress) = (output("actions"), output("progress"));
            assert_eq!(actions["shape"], json!([rows.len(), 50, 14]), "{what}");
            assert_eq!(actions["datatype"], "FP32");
            let want_actions: Vec<f64> = (0..rows.len()).flat_map(|r| floats(&case["outputs"][r]["actions"])).collect();
            let want_progress: Vec<f64> =
                (0..rows.len()).flat_map(|r| floats(&case["outputs"][r]["progress"])).collect();
            assert_close(&format!("{what}: actions"), &floats(&actions["data"]), &want_actions, tolerance);
            assert_close(&format!("{what}: progress"), &floats(&progress["data"]), &want_progress, tolerance);
        }

        // A camera as BYTES: the base frame sent as a PNG file (lossless), decoded by the host.
        let rows = reference["cases"][0]["requests"].as_array().unwrap();
        let seed = rows[0]["seed"].as_u64().unwrap();
        let (body, header_len) = oip_body(rows, seed);
        let mut header: Value = serde_json::from_slice(&body[..header_len]).unwrap();
        let base_len = header["inputs"][0]["parameters"]["binary_data_size"].as_u64().unwrap() as usize;
        let png = robot_request("oip", model, &rows[0]).images["base"].clone();
        let vla_api::FrameWire::Encoded(png) = png else { panic!("the base frame is a PNG") };
        header["inputs"][0] = json!({"name": "base", "datatype": "BYTES", "shape": [1], "data": [png]});
        let mut bytes_body = serde_json::to_vec(&header).unwrap();
        let bytes_header_len = bytes_body.len();
        bytes_body.extend_from_slice(&body[header_len + base_len..]);
        let response = app
            .as_robot("oip", reqwest::Method::POST, &format!("/v2/models/{model}/infer"))
            .await
            .header("inference-header-content-length", bytes_header_len.to_string())
            .body(bytes_body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{model}, BYTES camera: {}", response.text().await.unwrap());
        let answer: Value = response.json().await.unwrap();
        let actions = answer["outputs"].as_array().unwrap().iter().find(|o| o["name"] == "actions").unwrap().clone();
        let want = floats(&reference["cases"][0]["outputs"][0]["actions"]);
        assert_close(&format!("{model}, BYTES camera: actions"), &floats(&actions["data"]), &want, tolerance);
    }
    app.stop().await.unwrap();
}

/// PyTorch's own forward of the demo model (`torch.jit.load` of the same `model.pt`) on
/// `frames` (224 × 224 RGB, row-major), normalised as its `model.toml` says, the instructions
/// as zero-padded UTF-8 bytes and the states as they are.
fn tiny_vla_in_pytorch(frames: &[Vec<u8>], instructions: &[&str], states: &[[f32; 7]]) -> Vec<Vec<f64>> {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("frames.bin"), frames.concat()).unwrap();
    let request = json!({"instructions": instructions, "states": states});
    std::fs::write(dir.path().join("request.json"), request.to_string()).unwrap();
    let script = r#"
import json, sys, torch
model, frames, request = torch.jit.load(sys.argv[1]), sys.argv[2], json.load(open(sys.argv[3]))
n = len(request["states"])
pixels = torch.frombuffer(bytearray(open(frames, "rb").read()), dtype=torch.uint8).view(n, 224, 224, 3)
mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
image = (pixels.permute(0, 3, 1, 2).float() / 255.0 - mean) / std
tokens = torch.zeros(n, 32, dtype=torch.int64)
for r, text in enumerate(request["instructions"]):
    ids = list(text.encode("utf-8"))[:32]
    tokens[r, : len(ids)] = torch.tensor(ids)
state = torch.tensor(request["states"], dtype=torch.float32)
with torch.no_grad():
    print(json.dumps(model(image, tokens, state).tolist()))
"#;
    let out = std::process::Command::new(venv_python())
        .args(["-c", script])
        .arg(demo_model_pt())
        .arg(dir.path().join("frames.bin"))
        .arg(dir.path().join("request.json"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tiny_vla_answers_as_pytorch_does_for_one_row_and_a_batch() {
    let app = start().await;
    let frames: Vec<Vec<u8>> =
        (0..2usize).map(|r| (0..224 * 224 * 3).map(|i| ((i * 7 + r * 61) % 251) as u8).collect()).collect();
    let instructions = ["pick up the red block", "place it in the blue bin"];
    let states = [[0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6], [0.6, -0.5, 0.4, -0.3, 0.2, -0.1, 0.0]];
    let want = tiny_vla_in_pytorch(&frames, &instructions, &states);

    // The robot endpoint, one row a request, the frame as raw rgb8.
    for r in 0..2 {
        let request = InferenceRequest {
            robot_id: "vla-ref".into(),
            model: Some("tiny-vla".into()),
            instruction: instructions[r].into(),
            images: [(
                "image".to_string(),
                vla_api::FrameWire::Raw { encoding: "rgb8".into(), width: 224, height: 224, data: b64(&frames[r]) },
            )]
            .into(),
            state: states[r].to_vec(),
            ..InferenceRequest::default()
        };
        let response = app.infer(request).await;
        assert_eq!(response.status(), StatusCode::OK);
        let answer: InferenceResponse = response.json().await.unwrap();
        let got: Vec<f64> = answer.action.iter().map(|&v| f64::from(v)).collect();
        assert_close(&format!("/v1 row {r}"), &got, &want[r], 1e-4);
    }

    // OIP, both rows in one request: the frames as a binary UINT8 [2, 224, 224, 3] tensor
    // (normalised by the host for this FP32 camera), the instructions as BYTES.
    let oip = |frames: Vec<u8>, width: usize| {
        let header = json!({"inputs": [
            {"name": "image", "datatype": "UINT8", "shape": [2, frames.len() / 2 / 3 / width, width, 3], "parameters": {"binary_data_size": frames.len()}},
            {"name": "instruction", "datatype": "BYTES", "shape": [2], "data": instructions},
            {"name": "state", "datatype": "FP32", "shape": [2, 7], "data": states.concat()},
        ]});
        let mut body = serde_json::to_vec(&header).unwrap();
        let len = body.len();
        body.extend(frames);
        (body, len)
    };
    let client = &app;
    let post = |(body, len): (Vec<u8>, usize)| async move {
        let response = client
            .as_robot("vla-ref", reqwest::Method::POST, "/v2/models/tiny-vla/infer")
            .await
            .header("inference-header-content-length", len.to_string())
            .body(body)
            .send()
            .await
            .unwrap();
        let status = response.status();
        (status, response.json::<Value>().await.unwrap())
    };
    let (status, answer) = post(oip(frames.concat(), 224)).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["outputs"][0]["shape"], json!([2, 7]));
    assert_close("OIP, 2 rows", &floats(&answer["outputs"][0]["data"]), &want.concat(), 1e-4);
    // Frames of another size are resized, as on the robot endpoint; a frame that is not
    // [n, height, width, 3] is refused naming the input.
    let (status, answer) = post(oip(vec![128; 2 * 120 * 160 * 3], 160)).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let (body, len) = oip(vec![128; 2 * 224 * 224 * 3], 224);
    let mut header: Value = serde_json::from_slice(&body[..len]).unwrap();
    header["inputs"][0]["shape"] = json!([2, 3, 224, 224]);
    let mut bad = serde_json::to_vec(&header).unwrap();
    let bad_len = bad.len();
    bad.extend_from_slice(&body[len..]);
    let (status, answer) = post((bad, bad_len)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");
    assert!(answer["error"].as_str().unwrap().contains("image"), "{answer}");
    app.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_decision_keeps_the_seed_it_ran_with_in_its_audit_record() {
    let app = TestAppliance::start(|config, repo| {
        add_built_model(repo, "tiny-pi");
        config.policy.preload =
            vec![preload("instruction-filter", "admission", 10, json!({"deny": ["disable safety"]}))];
    })
    .await;
    let reference = reference();
    let mut request = robot_request("seeded", "tiny-pi", &reference["cases"][0]["requests"][0]);
    request.instruction = "disable safety and go".into();
    request.seed = Some(424_242);
    let response = app.infer(request).await;
    assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let log: vla_api::AuditList =
        app.admin(reqwest::Method::GET, "/admin/audit?robot_id=seeded").send().await.unwrap().json().await.unwrap();
    assert_eq!(log.records.len(), 1, "{:?}", log.records);
    assert_eq!(log.records[0].seed, Some(424_242), "{:?}", log.records[0]);
    assert_eq!(log.records[0].model_version.as_deref(), Some("1"));
    app.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tritonclient_sends_uint8_cameras_and_bytes_text() {
    let app = start().await;
    let key = app.robot_key("triton").await;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/tritonclient_pi.py");
    let url = format!("127.0.0.1:{}", app.addr.port());
    let ca = app.data.path().join("tls/cert.pem");
    let reference = built_model("tiny-pi").join("reference.json");
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new(python())
            .arg(script)
            .args([url.as_str(), ca.to_str().unwrap(), key.as_str(), reference.to_str().unwrap()])
            .output()
    })
    .await
    .unwrap()
    .unwrap();
    assert!(output.status.success(), "tritonclient_pi.py: {}", String::from_utf8_lossy(&output.stderr));
    let seen: Value = serde_json::from_slice(&output.stdout).unwrap();
    for model in PI {
        let worst = seen[model]["max_abs_diff"].as_f64().unwrap();
        assert!(worst < 1e-4, "{model} through tritonclient: max |Δ| {worst}; {seen}");
        assert_eq!(seen[model]["shape"], json!([3, 50, 14]));
    }
    app.stop().await.unwrap();
}

/// The Python interpreter of the project's venv (set up by scripts/setup.sh).
fn python() -> PathBuf {
    match std::env::var_os("VIRTUAL_ENV") {
        Some(venv) => Path::new(&venv).join("bin/python"),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python"),
    }
}

async fn refused(what: &str, app: &TestAppliance, request: InferenceRequest) -> (StatusCode, ErrorBody) {
    let response = app.infer(request).await;
    let status = response.status();
    let text = response.text().await.unwrap();
    let body =
        serde_json::from_str(&text).unwrap_or_else(|_| panic!("{what}: {status} {}", &text[..text.len().min(300)]));
    (status, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_inputs_are_refused_naming_the_field_while_another_robot_is_served() {
    let app = start().await;
    let reference = reference();
    let good = robot_request("arm-bad", "tiny-pi", &reference["cases"][0]["requests"][0]);

    // A neighbour at 10 Hz through all of it.
    let neighbour = robot_request("arm-good", "tiny-pi", &reference["cases"][0]["requests"][0]);
    let served = {
        let key = app.robot_key("arm-good").await;
        let (client, url) = (app.client.clone(), app.url("/v1/inference"));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let task = tokio::spawn(async move {
            let mut statuses = Vec::new();
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                let r = client.post(&url).header("x-api-key", &key).json(&neighbour).send().await.unwrap();
                statuses.push(r.status());
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            statuses
        });
        (stop, task)
    };

    let mut cases: Vec<(&str, InferenceRequest, StatusCode, &str, &str)> = Vec::new();
    let mut r = good.clone();
    r.images.remove("wrist");
    cases.push(("missing camera", r, StatusCode::UNPROCESSABLE_ENTITY, "camera_missing", "wrist"));
    let mut r = good.clone();
    r.images.insert("left".into(), vla_api::FrameWire::Encoded(b64(&png(8, 8))));
    cases.push(("unknown camera", r, StatusCode::BAD_REQUEST, "invalid_field", "images.left"));
    let mut r = good.clone();
    r.images.insert("base".into(), vla_api::FrameWire::Encoded(b64(b"not an image at all")));
    cases.push(("undecodable frame", r, StatusCode::UNPROCESSABLE_ENTITY, "unsupported_image_format", "images.base"));
    let mut r = good.clone();
    r.images.insert(
        "wrist".into(),
        vla_api::FrameWire::Raw { encoding: "rgb8".into(), width: 4, height: 4, data: b64(&[0; 47]) },
    );
    cases.push(("short raw frame", r, StatusCode::UNPROCESSABLE_ENTITY, "image_decode_failed", "images.wrist"));
    let mut r = good.clone();
    r.image = Some(b64(&png(8, 8)));
    r.images.clear();
    cases.push(("`image` on two cameras", r, StatusCode::BAD_REQUEST, "invalid_field", "images"));
    let mut r = good.clone();
    // 48 tokens of the model's BPE vocabulary (whole words), more than its 32.
    r.instruction = "pick up the red block and place it in the left bin ".repeat(4);
    cases.push(("over-long prompt", r, StatusCode::UNPROCESSABLE_ENTITY, "instruction_too_long", "instruction"));
    let mut r = good.clone();
    r.state.truncate(7);
    cases.push(("wrong state length", r, StatusCode::UNPROCESSABLE_ENTITY, "state_length_mismatch", "state"));
    let mut r = good.clone();
    r.extra.insert("goal".into(), json!([0.1, 0.2]));
    cases.push(("wrong extra shape", r, StatusCode::UNPROCESSABLE_ENTITY, "invalid_value", "extra.goal"));
    let mut r = good.clone();
    r.extra.insert("goal".into(), json!([0.1, "up", 0.3]));
    cases.push(("extra not numbers", r, StatusCode::UNPROCESSABLE_ENTITY, "invalid_value", "extra.goal"));
    let mut r = good.clone();
    r.extra.insert("task".into(), json!(3));
    cases.push(("unknown extra", r, StatusCode::BAD_REQUEST, "invalid_field", "extra.task"));
    for (what, request, status, code, field) in cases {
        let (got, body) = refused(what, &app, request).await;
        assert_eq!(got, status, "{what}: {body:?}");
        if !code.is_empty() {
            assert_eq!(body.code, code, "{what}: {body:?}");
        }
        assert!(body.error.contains(field), "{what}: the error names `{field}`: {}", body.error);
    }
    // The refused robot itself is served at once.
    let response = app.infer(good).await;
    assert_eq!(response.status(), StatusCode::OK);

    served.0.store(true, std::sync::atomic::Ordering::Relaxed);
    let statuses = served.1.await.unwrap();
    assert!(!statuses.is_empty() && statuses.iter().all(|s| *s == StatusCode::OK), "the neighbour saw {statuses:?}");
    app.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_model_list_shows_cameras_tokenizer_horizon_and_platform() {
    let app = start().await;
    let list: vla_api::ModelList =
        app.admin(reqwest::Method::GET, "/v1/models").send().await.unwrap().json().await.unwrap();
    let find = |name: &str| list.models.iter().find(|m| m.name == name).unwrap();
    let pi = find("tiny-pi");
    assert_eq!(pi.platform, "pytorch_aoti");
    assert_eq!(pi.cameras, ["base", "wrist"]);
    assert_eq!(pi.tokenizer, "tokenizer.json");
    assert_eq!((pi.state_dim, pi.action_dof, pi.action_horizon, pi.dt_ms), (14, 14, 50, Some(20.0)));
    assert_eq!(find("tiny-pi-ts").platform, "pytorch_torchscript");
    let vla = find("tiny-vla");
    assert_eq!(
        (vla.cameras.as_slice(), vla.tokenizer.as_str(), vla.action_horizon),
        (["image".to_string()].as_slice(), "utf8-bytes", 1)
    );
    // The tests set `models.cpu_threads = 1`: the configuration's count, nothing measured.
    let threads = vla.cpu_threads.as_ref().unwrap();
    assert_eq!((threads.threads, threads.chosen_by.as_str(), threads.measured.len()), (1, "config", 0));
    app.stop().await.unwrap();
}

/// `models.cpu_threads = 0`: the first executor times the forward at 1, 2, 4, … the largest
/// batch with each candidate thread count, and shows the count and the batch cap it chose
/// with the timings.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn left_to_the_appliance_the_libtorch_threads_and_the_batch_cap_are_measured_at_warm_up() {
    let app = TestAppliance::start(|config, _| config.models.cpu_threads = 0).await;
    let list: vla_api::ModelList =
        app.admin(reqwest::Method::GET, "/v1/models").send().await.unwrap().json().await.unwrap();
    let threads = list.models[0].cpu_threads.clone().unwrap();
    assert_eq!(threads.chosen_by, "measured");
    let cores = std::thread::available_parallelism().unwrap().get();
    let candidates = appliance::threads::candidates(cores, 1);
    assert!(candidates.contains(&threads.threads), "{threads:?}");
    let timed: Vec<(usize, usize)> = threads.measured.iter().map(|t| (t.threads, t.batch_size)).collect();
    let expected: Vec<(usize, usize)> = candidates.iter().flat_map(|&t| [1, 2, 4, 8, 16, 32].map(|b| (t, b))).collect();
    assert_eq!(timed, expected);
    assert!(threads.measured.iter().all(|t| t.forward_ms > 0.0), "{threads:?}");
    // The cap is the ladder's size with the lowest time per sample, or a larger one near it
    // (the timings shown are rounded to the µs, hence the slack).
    let per_sample: Vec<(usize, f64)> = threads
        .measured
        .iter()
        .filter(|t| t.threads == threads.threads)
        .map(|t| (t.batch_size, t.forward_ms / t.batch_size as f64))
        .collect();
    let best = per_sample.iter().map(|p| p.1).fold(f64::INFINITY, f64::min);
    let cap = threads.largest_batch.expect("a measured cap");
    let at_cap = per_sample.iter().find(|p| p.0 == cap).expect("the cap is a timed size").1;
    assert!(at_cap <= best * appliance::threads::BATCH_NEAR * 1.001, "{threads:?}");
    // The measurement does not change what the model answers.
    assert_eq!(app.infer(common::robot_request(1)).await.status(), StatusCode::OK);
    app.stop().await.unwrap();
}

/// A TorchScript model with a task-id extra input that indexes an embedding of 4 tasks: a
/// robot sending task 9 makes the forward fail (index out of range), for its whole batch.
fn task_model(repo: &Path) {
    let dir = repo.join("task-vla");
    std::fs::create_dir_all(&dir).unwrap();
    let script = r#"
import sys, torch
class TaskVla(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.tasks = torch.nn.Embedding(4, 7)
    def forward(self, image, instruction, state, task):
        return torch.tanh(self.tasks(task[:, 0]) + state + 0.0 * image.mean(dim=(1, 2, 3)).unsqueeze(1))
torch.manual_seed(1)
example = (torch.zeros(2, 3, 224, 224), torch.zeros(2, 32, dtype=torch.long), torch.zeros(2, 7), torch.zeros(2, 1, dtype=torch.long))
torch.jit.trace(TaskVla().eval(), example).save(sys.argv[1])
"#;
    let out = std::process::Command::new(python()).args(["-c", script]).arg(dir.join("model.pt")).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // Two requests 200 ms apart at most share a batch.
    let toml = appliance::demo::model_toml_with_batching(
        "task-vla",
        "enabled = true\nmax_queue_delay_us = 200000\npreferred_batch_sizes = [2]\n",
    )
    .replace("[[outputs]]", "[[inputs]]\nname = \"task\"\ndtype = \"INT64\"\ndims = [-1, 1]\n\n[[outputs]]")
        + "\n[[extra_inputs]]\nname = \"task\"\ninput = \"task\"\n";
    std::fs::write(dir.join("model.toml"), toml).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_that_fails_the_forward_fails_alone_not_its_batch() {
    let app = TestAppliance::start(|_, repo| task_model(repo)).await;
    let request = |robot: &str, task: i64| {
        let mut r = common::robot_request(1);
        r.robot_id = robot.into();
        r.model = Some("task-vla".into());
        r.extra.insert("task".into(), json!([task]));
        r
    };
    // Keys first, so that both requests reach the queue together.
    app.robot_key("arm-good").await;
    app.robot_key("arm-bad").await;
    let (good, bad) = tokio::join!(app.infer(request("arm-good", 2)), app.infer(request("arm-bad", 9)));
    assert_eq!(bad.status(), StatusCode::INTERNAL_SERVER_ERROR);
    let body: ErrorBody = bad.json().await.unwrap();
    assert_eq!(body.code, "inference_failed", "{body:?}");
    assert_eq!(good.status(), StatusCode::OK, "{}", good.text().await.unwrap());
    let answer: InferenceResponse = good.json().await.unwrap();
    assert_eq!(answer.action.len(), 7);
    // They did share a batch: the failed one, then each row alone.
    let stats = app.stats("task-vla").await;
    assert_eq!((stats.batches, stats.failed), (3, 1), "{stats:?}");
    app.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_of_another_shape_exported_by_the_tool_answers_as_pytorch_does() {
    // act-like (models/act_like.py): a host-normalised FP32 camera, UTF-8 bytes, no
    // statistics, no noise, 10 x 6 chunks; exported here by the project's tool.
    let out = tempfile::tempdir().unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let export = std::process::Command::new(python())
        .arg(root.join("models/export.py"))
        .arg(root.join("models/act_like.py"))
        .arg(out.path())
        .args(["--formats", "torchscript"])
        .output()
        .unwrap();
    assert!(export.status.success(), "export.py: {}", String::from_utf8_lossy(&export.stderr));
    let dir = out.path().join("act-like-ts");
    let reference: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap()).unwrap();
    let app = TestAppliance::start(|_, repo| {
        let to = repo.join("act-like-ts");
        std::fs::create_dir_all(&to).unwrap();
        for file in ["model.pt", "model.toml"] {
            std::fs::copy(dir.join(file), to.join(file)).unwrap();
        }
    })
    .await;
    let tolerance = reference["tolerance"].as_f64().unwrap();
    for case in reference["cases"].as_array().unwrap() {
        for (r, request) in case["requests"].as_array().unwrap().iter().enumerate() {
            let mut body = request.clone();
            body["robot_id"] = json!("act");
            body["model"] = json!("act-like-ts");
            let response = app.infer(serde_json::from_value(body).unwrap()).await;
            assert_eq!(response.status(), StatusCode::OK);
            let answer: InferenceResponse = response.json().await.unwrap();
            assert_eq!((answer.actions.len(), answer.actions[0].len(), answer.dt_ms), (10, 6, Some(50.0)));
            assert_eq!(answer.seed, None, "no noise, no seed");
            let got: Vec<f64> = answer.actions.iter().flatten().map(|&v| f64::from(v)).collect();
            assert_close(&format!("act-like row {r}"), &got, &floats(&case["outputs"][r]["chunk"]), tolerance);
        }
    }
    app.stop().await.unwrap();
}

/// A TorchScript model with the demo's inputs whose action has 6 values instead of the
/// declared 7 when any state value exceeds 100 (the venv's torch scripts it).
fn add_shape_shifting_model(repo: &std::path::Path, name: &str) {
    let dir = repo.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    let script = r#"
import sys, torch
class M(torch.nn.Module):
    def forward(self, image: torch.Tensor, instruction: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        a = torch.tanh(state * 0.1) + image.mean() * 0.0 + instruction.sum().float() * 0.0
        if bool((state > 100.0).any()):
            return a[:, :6]
        return a
torch.jit.script(M()).save(sys.argv[1])
"#;
    // From a file: TorchScript reads the module's source.
    let source = dir.join("make_model.py");
    std::fs::write(&source, script).unwrap();
    let out = std::process::Command::new(python()).arg(&source).arg(dir.join("model.pt")).output().unwrap();
    std::fs::remove_file(&source).unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let toml = appliance::demo::MODEL_TOML.replacen("name = \"tiny-vla\"", &format!("name = \"{name}\""), 1);
    std::fs::write(dir.join("model.toml"), toml).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_output_of_another_shape_is_refused_counted_and_audited_and_its_batch_mates_are_served() {
    let app = TestAppliance::start(|config, repo| {
        add_shape_shifting_model(repo, "shifty");
        let quota = json!({"robot": {"day": 1000}});
        config.policy.preload = vec![common::preload("rate-limit", "admission", 0, quota)];
    })
    .await;
    let request = |robot: &str, state: f32| {
        let mut r = common::robot_request(3);
        r.robot_id = robot.into();
        r.model = Some("shifty".into());
        r.state = vec![state; 7];
        r
    };
    // Culprit and neighbour together, so some of their requests share a batch: the batch is
    // rerun row by row and only the culprit's row fails.
    for _ in 0..5 {
        let (culprit, neighbour) =
            tokio::join!(app.infer(request("culprit", 1000.0)), app.infer(request("neighbour", 0.5)));
        assert_eq!(culprit.status(), StatusCode::INTERNAL_SERVER_ERROR);
        let body: Value = culprit.json().await.unwrap();
        assert_eq!(body["code"], "inference_failed", "{body}");
        assert!(body["error"].as_str().unwrap().contains("shape"), "{body}");
        assert!(body.get("action").is_none(), "{body}");
        assert_eq!(neighbour.status(), StatusCode::OK, "{}", neighbour.text().await.unwrap());
    }
    let text = app.admin(reqwest::Method::GET, "/metrics").send().await.unwrap().text().await.unwrap();
    let rejected = text
        .lines()
        .find_map(|l| l.strip_prefix(r#"vla_model_output_rejected_total{model="shifty",problem="shape"} "#))
        .map(|v| v.trim().parse::<f64>().unwrap());
    assert!(rejected.is_some_and(|v| v >= 5.0), "{rejected:?}");
    let r = app.admin(reqwest::Method::GET, "/admin/audit?robot_id=culprit").send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let log: vla_api::AuditList = r.json().await.unwrap();
    let host: Vec<_> = log.records.iter().filter(|r| r.policy == "(host)").collect();
    assert!(!host.is_empty() && host.iter().all(|r| r.code.as_deref() == Some("shape")), "{:?}", log.records);
    assert!(host[0].reason.as_deref().unwrap().contains("expected"), "{:?}", host[0]);
    let r = app.admin(reqwest::Method::GET, "/admin/audit?robot_id=neighbour").send().await.unwrap();
    let log: vla_api::AuditList = r.json().await.unwrap();
    assert!(log.records.iter().all(|r| r.policy != "(host)"), "{:?}", log.records);
    // The culprit's forwards ran: each stays charged to it.
    let r = app.admin(reqwest::Method::GET, "/admin/quotas/culprit").send().await.unwrap();
    let q: vla_api::RobotQuota = r.json().await.unwrap();
    let day = q.buckets.iter().find(|b| b.bucket == "day").unwrap();
    assert_eq!(day.used, 5, "{q:?}");
}
