//! Open Inference Protocol v2 over real HTTPS: metadata, JSON and binary tensors, every client
//! error, statistics, the repository extension, and Triton's own Python client.

#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use vla_api::InferenceResponse;

const MODEL: &str = "/v2/models/tiny-vla";

/// The demo model's inputs for `robot_request(seed)`, preprocessed exactly as `/v1` does.
fn tensors(seed: u8) -> (Vec<f32>, Vec<i64>, Vec<f32>) {
    use appliance::preprocess::*;
    let spec = appliance::spec::ModelSpec::parse(appliance::demo::MODEL_TOML, "tiny-vla").unwrap();
    let r = robot_request(seed);
    let limits = Default::default();
    let bytes = base64_file(r.image.as_deref().unwrap(), &limits).unwrap();
    let image = image_tensor(&decode_image_bytes(&bytes, &limits).unwrap(), &spec.cameras[0]);
    match image {
        appliance::model::TensorData::F32(pixels) => {
            (pixels, instruction_tokens(&r.instruction, 32), normalise_state(&spec, &r.state))
        }
        other => panic!("unexpected image tensor {other:?}"),
    }
}

fn le<T: Copy, const N: usize>(values: &[T], f: impl Fn(T) -> [u8; N]) -> Vec<u8> {
    values.iter().flat_map(|&v| f(v)).collect()
}

/// A binary-extension body: JSON header, then the raw tensors in input order.
fn binary_body(header: &Value, blobs: &[&[u8]]) -> (Vec<u8>, usize) {
    let mut body = serde_json::to_vec(header).unwrap();
    let len = body.len();
    for b in blobs {
        body.extend_from_slice(b);
    }
    (body, len)
}

async fn v1_action(app: &TestAppliance, seed: u8) -> Vec<f32> {
    let response = app.infer(robot_request(seed)).await;
    assert_eq!(response.status(), StatusCode::OK);
    response.json::<InferenceResponse>().await.unwrap().action
}

fn assert_close(a: &[f32], b: &[f32]) {
    assert_eq!(a.len(), b.len(), "{a:?} vs {b:?}");
    for (x, y) in a.iter().zip(b) {
        assert!((x - y).abs() < 1e-5, "{a:?} vs {b:?}");
    }
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_health_and_readiness_follow_the_protocol() {
    let app = TestAppliance::start(|_, _| {}).await;
    for path in ["/v2/health/live", "/v2/health/ready"] {
        assert_eq!(app.client.get(app.url(path)).send().await.unwrap().status(), StatusCode::OK, "{path} is public");
    }
    let key = app.robot_key("arm-1").await;
    let get = |path: &str| app.client.get(app.url(path)).header("x-api-key", &key);
    let server: Value = get("/v2").send().await.unwrap().json().await.unwrap();
    assert_eq!(server["name"], "vla-appliance");
    assert!(server["extensions"].as_array().unwrap().contains(&json!("binary_tensor_data")));

    let meta: Value = get(MODEL).send().await.unwrap().json().await.unwrap();
    assert_eq!(meta["name"], "tiny-vla");
    assert_eq!(meta["versions"], json!(["1"]));
    assert_eq!(meta["platform"], "pytorch_torchscript");
    assert_eq!(meta["inputs"][0], json!({"name": "image", "datatype": "FP32", "shape": [-1, 3, 224, 224]}));
    assert_eq!(meta["inputs"][1], json!({"name": "instruction", "datatype": "INT64", "shape": [-1, 32]}));
    assert_eq!(meta["outputs"][0], json!({"name": "action", "datatype": "FP32", "shape": [-1, 7]}));
    let versioned: Value = get("/v2/models/tiny-vla/versions/1").send().await.unwrap().json().await.unwrap();
    assert_eq!(versioned, meta);

    for path in [MODEL.to_string() + "/ready", "/v2/models/tiny-vla/versions/1/ready".into()] {
        assert_eq!(get(&path).send().await.unwrap().status(), StatusCode::OK);
    }
    for (path, code) in [
        ("/v2/models/nope", "model_not_found"),
        ("/v2/models/nope/ready", "model_not_found"),
        ("/v2/models/tiny-vla/versions/9", "model_version_not_found"),
        ("/v2/models/tiny-vla/versions/9/ready", "model_version_not_found"),
    ] {
        let response = get(path).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::NOT_FOUND, "{path}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["code"], code, "{path}");
        assert!(body["error"].as_str().unwrap().contains("tiny-vla") || path.contains("nope"), "{body}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_and_binary_tensors_give_the_robot_endpoints_action() {
    let app = TestAppliance::start(|_, _| {}).await;
    let expected = v1_action(&app, 5).await;
    let (image, tokens, state) = tensors(5);
    let key = app.robot_key("arm-5").await;
    let infer = |body: Vec<u8>, header_len: Option<usize>| {
        let mut request = app.client.post(app.url(&format!("{MODEL}/infer"))).header("x-api-key", &key).body(body);
        if let Some(n) = header_len {
            request = request.header("inference-header-content-length", n);
        }
        async move { request.send().await.unwrap() }
    };

    // JSON: the image flat, the state nested, the instruction as INT64 tokens.
    let nested_state: Vec<Vec<f32>> = vec![state.clone()];
    let request = json!({
        "id": "req-1",
        "inputs": [
            {"name": "image", "datatype": "FP32", "shape": [1, 3, 224, 224], "data": image},
            {"name": "instruction", "datatype": "INT64", "shape": [1, 32], "data": tokens},
            {"name": "state", "datatype": "FP32", "shape": [1, 7], "data": nested_state},
        ],
        "outputs": [{"name": "action"}],
    });
    let response = infer(serde_json::to_vec(&request).unwrap(), None).await;
    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["id"], "req-1");
    assert_eq!(body["model_name"], "tiny-vla");
    assert_eq!(body["model_version"], "1");
    assert_eq!(body["outputs"][0]["shape"], json!([1, 7]));
    assert_eq!(body["outputs"][0]["datatype"], "FP32");
    assert_close(&floats(&body["outputs"][0]["data"]), &expected);

    // Binary in, binary out.
    let header = json!({
        "inputs": [
            {"name": "image", "datatype": "FP32", "shape": [1, 3, 224, 224], "parameters": {"binary_data_size": image.len() * 4}},
            {"name": "instruction", "datatype": "INT64", "shape": [1, 32], "parameters": {"binary_data_size": 32 * 8}},
            {"name": "state", "datatype": "FP32", "shape": [1, 7], "parameters": {"binary_data_size": 28}},
        ],
        "parameters": {"binary_data_output": true},
    });
    let blobs = [le(&image, f32::to_le_bytes), le(&tokens, i64::to_le_bytes), le(&state, f32::to_le_bytes)];
    let (body, len) = binary_body(&header, &[&blobs[0], &blobs[1], &blobs[2]]);
    let response = infer(body, Some(len)).await;
    assert_eq!(response.status(), StatusCode::OK);
    let header_len: usize = response.headers()["inference-header-content-length"].to_str().unwrap().parse().unwrap();
    let bytes = response.bytes().await.unwrap();
    let head: Value = serde_json::from_slice(&bytes[..header_len]).unwrap();
    assert_eq!(head["outputs"][0]["parameters"]["binary_data_size"], 28);
    assert!(head["outputs"][0].get("data").is_none());
    assert_close(&appliance::model::f32s(&bytes[header_len..]), &expected);
    // Where the time went, as `/v1/inference`'s `timing`.
    let timing: vla_api::Timing = serde_json::from_value(head["parameters"].clone()).unwrap();
    assert_eq!(timing.batch_size, 1);
    assert!(timing.inference_ms > 0.0 && timing.total_ms >= timing.inference_ms + timing.queue_ms, "{timing:?}");

    // BYTES: the encoded JPEG (binary) and the instruction text (JSON), preprocessed by the appliance.
    let r = robot_request(5);
    let jpeg = jpeg(320, 240, 5);
    let mut image_bytes = (jpeg.len() as u32).to_le_bytes().to_vec();
    image_bytes.extend(&jpeg);
    let header = json!({
        "inputs": [
            {"name": "image", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": image_bytes.len()}},
            {"name": "instruction", "datatype": "BYTES", "shape": [1, 1], "data": [r.instruction]},
            {"name": "state", "datatype": "FP32", "shape": [1, 7], "data": r.state},
        ],
    });
    let (body, len) = binary_body(&header, &[&image_bytes]);
    let response = infer(body, Some(len)).await;
    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = response.json().await.unwrap();
    assert_close(&floats(&body["outputs"][0]["data"]), &expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_of_rows_in_one_request_gives_each_rows_action() {
    // A policy that allows everything: each row's decision chain is reported.
    let app = TestAppliance::start(|config, _| {
        let limits = serde_json::json!({"robot_types": {"ur5e": {"velocity": 10.0}}});
        config.policy.preload = vec![common::preload("joint-limits", "safety", 10, limits)];
    })
    .await;
    let (a, b) = (v1_action(&app, 1).await, v1_action(&app, 2).await);
    let ((i1, t1, s1), (i2, t2, s2)) = (tensors(1), tensors(2));
    let cat = |x: &[f32], y: &[f32]| [x, y].concat();
    let request = json!({
        "inputs": [
            {"name": "image", "datatype": "FP32", "shape": [2, 3, 224, 224], "data": cat(&i1, &i2)},
            {"name": "instruction", "datatype": "INT64", "shape": [2, 32], "data": [t1, t2]},
            {"name": "state", "datatype": "FP32", "shape": [2, 7], "data": cat(&s1, &s2)},
        ],
        "parameters": {"priority": 1, "timeout": 2_000_000},
    });
    let response =
        app.as_robot("arm-1", Method::POST, &format!("{MODEL}/infer")).await.json(&request).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["outputs"][0]["shape"], json!([2, 7]));
    let actions = floats(&body["outputs"][0]["data"]);
    assert_close(&actions[..7], &a);
    assert_close(&actions[7..], &b);
    assert_eq!(body["policy"]["policies"].as_array().unwrap().len(), 2, "{body}");
    let rows = body["policy_rows"].as_array().unwrap();
    assert_eq!(rows.len(), 2);
    assert!(rows.iter().all(|r| r["decision"] == "allow" && r["policies"][0]["name"] == "joint-limits"), "{body}");

    let stats: Value = app.admin(Method::GET, &format!("{MODEL}/stats")).send().await.unwrap().json().await.unwrap();
    let s = &stats["model_stats"][0];
    assert_eq!(s["name"], "tiny-vla");
    assert_eq!(s["inference_count"], 4);
    assert_eq!(s["inference_stats"]["success"]["count"], 4);
    assert!(s["inference_stats"]["compute_infer"]["ns"].as_u64().unwrap() > 0, "{s}");
    assert!(s["inference_stats"]["queue"]["ns"].as_u64().unwrap() > 0, "{s}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_client_mistake_gets_a_4xx_with_an_error_naming_it() {
    let app = TestAppliance::start(|_, _| {}).await;
    let key = app.robot_key("arm-1").await;
    let (image, tokens, state) = tensors(1);
    let good = json!([
        {"name": "image", "datatype": "FP32", "shape": [1, 3, 224, 224], "data": image},
        {"name": "instruction", "datatype": "INT64", "shape": [1, 32], "data": tokens},
        {"name": "state", "datatype": "FP32", "shape": [1, 7], "data": state},
    ]);
    let with_inputs = |f: &dyn Fn(&mut Value)| {
        let mut inputs = good.clone();
        f(&mut inputs);
        serde_json::to_vec(&json!({"inputs": inputs})).unwrap()
    };
    let send = |path: String, body: Vec<u8>, header_len: Option<usize>| {
        let mut r = app.client.post(app.url(&path)).header("x-api-key", &key).body(body);
        if let Some(n) = header_len {
            r = r.header("inference-header-content-length", n);
        }
        r.send()
    };
    let infer = format!("{MODEL}/infer");
    let state_binary = {
        let mut inputs = good.clone();
        inputs[2] =
            json!({"name": "state", "datatype": "FP32", "shape": [1, 7], "parameters": {"binary_data_size": 28}});
        json!({"inputs": inputs})
    };
    // (what, path, body, Inference-Header-Content-Length, status, code, part of the message)
    type Case<'a> = (&'a str, String, Vec<u8>, Option<usize>, StatusCode, &'a str, &'a str);
    let cases: Vec<Case> = vec![
        (
            "unknown model",
            "/v2/models/nope/infer".into(),
            with_inputs(&|_| {}),
            None,
            StatusCode::NOT_FOUND,
            "model_not_found",
            "nope",
        ),
        (
            "unknown version",
            "/v2/models/tiny-vla/versions/7/infer".into(),
            with_inputs(&|_| {}),
            None,
            StatusCode::NOT_FOUND,
            "model_version_not_found",
            "version `7`",
        ),
        (
            "missing input",
            infer.clone(),
            with_inputs(&|i| {
                i.as_array_mut().unwrap().pop();
            }),
            None,
            StatusCode::BAD_REQUEST,
            "invalid_tensor",
            "input `state`: is missing",
        ),
        (
            "unknown input",
            infer.clone(),
            with_inputs(&|i| i[2]["name"] = json!("joints")),
            None,
            StatusCode::BAD_REQUEST,
            "invalid_tensor",
            "input `joints`: is not an input",
        ),
        (
            "wrong datatype",
            infer.clone(),
            with_inputs(&|i| i[2]["datatype"] = json!("INT32")),
            None,
            StatusCode::BAD_REQUEST,
            "invalid_tensor",
            "datatype `INT32` does not match the model's `FP32`",
        ),
        (
            "shape mismatch",
            infer.clone(),
            with_inputs(&|i| i[2]["shape"] = json!([1, 6])),
            None,
            StatusCode::BAD_REQUEST,
            "invalid_tensor",
            "shape [1, 6] does not match the model's [-1, 7]",
        ),
        (
            "element count",
            infer.clone(),
            with_inputs(&|i| i[2]["data"] = json!([1, 2, 3])),
            None,
            StatusCode::BAD_REQUEST,
            "invalid_tensor",
            "has 3 elements; shape [1, 7] needs 7",
        ),
        (
            "not a number",
            infer.clone(),
            with_inputs(&|i| i[2]["data"][6] = json!("x")),
            None,
            StatusCode::BAD_REQUEST,
            "invalid_tensor",
            "element 6 is not a number",
        ),
        (
            "batch sizes differ",
            infer.clone(),
            with_inputs(&|i| i[2]["shape"] = json!([2, 7])),
            None,
            StatusCode::BAD_REQUEST,
            "invalid_tensor",
            "differs",
        ),
        (
            "unknown output",
            infer.clone(),
            serde_json::to_vec(&json!({"inputs": good, "outputs": [{"name": "torque"}]})).unwrap(),
            None,
            StatusCode::BAD_REQUEST,
            "invalid_field",
            "`torque` is not an output",
        ),
        (
            "malformed JSON",
            infer.clone(),
            b"{\"inputs\": [".to_vec(),
            None,
            StatusCode::BAD_REQUEST,
            "malformed_json",
            "not valid JSON",
        ),
        (
            "token out of range",
            infer.clone(),
            with_inputs(&|i| i[1]["data"][0] = json!(1000)),
            None,
            StatusCode::BAD_REQUEST,
            "invalid_tensor",
            "element 0 is 1000; token ids are 0-255",
        ),
        (
            "binary data without its header length",
            infer.clone(),
            binary_body(&state_binary, &[&[0u8; 28]]).0,
            None,
            StatusCode::BAD_REQUEST,
            "malformed_json",
            "trailing characters",
        ),
        (
            "undecodable path",
            "/v2/models/%FF/infer".into(),
            with_inputs(&|_| {}),
            None,
            StatusCode::BAD_REQUEST,
            "invalid_field",
            "path",
        ),
        (
            "bad priority",
            infer.clone(),
            serde_json::to_vec(&json!({"inputs": good, "parameters": {"priority": "urgent"}})).unwrap(),
            None,
            StatusCode::BAD_REQUEST,
            "invalid_field",
            "parameters.priority",
        ),
        (
            "header length beyond the body",
            infer.clone(),
            with_inputs(&|_| {}),
            Some(10_000_000),
            StatusCode::BAD_REQUEST,
            "invalid_inference_header",
            "Inference-Header-Content-Length is 10000000",
        ),
        (
            "header length not a number",
            infer.clone(),
            with_inputs(&|_| {}),
            None,
            StatusCode::BAD_REQUEST,
            "invalid_inference_header",
            "byte count",
        ),
        {
            let (body, len) = binary_body(&state_binary, &[&[0u8; 20]]);
            (
                "binary size beyond the data",
                infer.clone(),
                body,
                Some(len),
                StatusCode::BAD_REQUEST,
                "invalid_tensor",
                "binary_data_size is 28 bytes but only 20",
            )
        },
        {
            let mut h = state_binary.clone();
            h["inputs"][2]["parameters"]["binary_data_size"] = json!(24);
            let (body, len) = binary_body(&h, &[&[0u8; 24]]);
            (
                "binary size not matching the shape",
                infer.clone(),
                body,
                Some(len),
                StatusCode::BAD_REQUEST,
                "invalid_tensor",
                "binary_data_size is 24 bytes but shape [1, 7] needs 28",
            )
        },
        {
            let (body, len) = binary_body(&state_binary, &[&[0u8; 32]]);
            (
                "unclaimed binary data",
                infer.clone(),
                body,
                Some(len),
                StatusCode::BAD_REQUEST,
                "invalid_inference_header",
                "4 bytes of binary data",
            )
        },
    ];
    for (what, path, body, header_len, status, code, message) in cases {
        let response = if what == "header length not a number" {
            app.client
                .post(app.url(&path))
                .header("x-api-key", &key)
                .header("inference-header-content-length", "many")
                .body(body)
                .send()
                .await
                .unwrap()
        } else {
            send(path, body, header_len).await.unwrap()
        };
        assert_eq!(response.status(), status, "{what}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["code"], code, "{what}: {body}");
        assert!(body["error"].as_str().unwrap().contains(message), "{what}: {body}");
    }
    // None of it reached a batch, and the model still serves.
    assert_eq!(app.stats("tiny-vla").await.computed, 0);
    assert_eq!(send(infer, with_inputs(&|_| {}), None).await.unwrap().status(), StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_repository_extension_loads_warm_keeps_the_old_version_on_failure_and_unloads() {
    let app = TestAppliance::start(|_, _| {}).await;
    let repo = app.data.path().join("models");
    let admin = |path: &str| app.admin(Method::POST, path).send();
    let index: Value = admin("/v2/repository/index").await.unwrap().json().await.unwrap();
    assert_eq!(index, json!([{"name": "tiny-vla", "version": "1", "state": "READY"}]));

    // A broken model.toml: the load fails, version 1 keeps serving.
    let toml_path = repo.join("tiny-vla/model.toml");
    let good = std::fs::read_to_string(&toml_path).unwrap();
    std::fs::write(&toml_path, good.replace("max_batch_size = 32", "max_batch_size = 0")).unwrap();
    let response = admin("/v2/repository/models/tiny-vla/load").await.unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let body: Value = response.json().await.unwrap();
    assert!(body["error"].as_str().unwrap().contains("max_batch_size"), "{body}");
    assert_eq!(app.infer(robot_request(1)).await.status(), StatusCode::OK);

    // Version 2: loaded and warmed up, then it takes the traffic.
    std::fs::write(&toml_path, good.replace("version = \"1\"", "version = \"2\"")).unwrap();
    assert_eq!(admin("/v2/repository/models/tiny-vla/load").await.unwrap().status(), StatusCode::OK);
    let meta: Value = app.admin(Method::GET, MODEL).send().await.unwrap().json().await.unwrap();
    assert_eq!(meta["versions"], json!(["2"]));
    let response = app.infer(robot_request(1)).await;
    assert_eq!(response.json::<InferenceResponse>().await.unwrap().model_version, "2");

    assert_eq!(admin("/v2/repository/models/tiny-vla/unload").await.unwrap().status(), StatusCode::OK);
    assert_eq!(app.admin(Method::GET, &format!("{MODEL}/ready")).send().await.unwrap().status(), StatusCode::NOT_FOUND);
    assert_eq!(app.infer(robot_request(1)).await.status(), StatusCode::SERVICE_UNAVAILABLE);
    let index: Value = admin("/v2/repository/index").await.unwrap().json().await.unwrap();
    assert_eq!(index[0]["state"], "UNAVAILABLE");
    assert_eq!(admin("/v2/repository/models/tiny-vla/load").await.unwrap().status(), StatusCode::OK);
    assert_eq!(app.infer(robot_request(1)).await.status(), StatusCode::OK);
    assert_eq!(admin("/v2/repository/models/nope/load").await.unwrap().status(), StatusCode::BAD_REQUEST);
}

/// The Python interpreter of the project's venv (set up by scripts/setup.sh).
fn python() -> std::path::PathBuf {
    match std::env::var_os("VIRTUAL_ENV") {
        Some(venv) => std::path::Path::new(&venv).join("bin/python"),
        None => std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tritonclient_drives_the_appliance_over_https() {
    let app = TestAppliance::start(|_, _| {}).await;
    let expected = v1_action(&app, 4).await;
    let key = app.robot_key("arm-4").await;
    let dir = tempfile::tempdir().unwrap();
    let (image, tokens, state) = tensors(4);
    std::fs::write(dir.path().join("image.f32"), le(&image, f32::to_le_bytes)).unwrap();
    std::fs::write(dir.path().join("instruction.i64"), le(&tokens, i64::to_le_bytes)).unwrap();
    std::fs::write(dir.path().join("state.f32"), le(&state, f32::to_le_bytes)).unwrap();
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/tritonclient_check.py");
    let url = format!("127.0.0.1:{}", app.addr.port());
    let ca = app.data.path().join("tls/cert.pem");
    let tensors = dir.path().to_path_buf();
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new(python())
            .arg(script)
            .args([url.as_str(), ca.to_str().unwrap(), key.as_str(), "tiny-vla", tensors.to_str().unwrap()])
            .output()
    })
    .await
    .unwrap()
    .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "tritonclient failed: {stderr}");
    let seen: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(seen["live"], true);
    assert_eq!(seen["ready"], true);
    assert_eq!(seen["model_ready"], true);
    assert_eq!(seen["unknown_model_ready"], false);
    assert_eq!(seen["metadata"]["platform"], "pytorch_torchscript");
    assert_eq!(seen["id"], "triton-42");
    assert_close(&floats(&seen["binary_action"]), &expected);
    assert_close(&floats(&seen["json_action"]), &expected);
    assert!(seen["without_key"].as_str().unwrap().contains("credentials required"), "{seen}");
}
