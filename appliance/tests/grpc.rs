//! The Open Inference Protocol over gRPC, driven by Triton's own client (`tritonclient[grpc]`
//! from PyPI, in the project's venv) over real TLS on the appliance's one listener: the proto's
//! field numbers equal tritonclient's; tiny-pi's 50-step chunks through unary and streaming
//! calls equal PyTorch's; typed contents work beside raw ones; errors are gRPC statuses naming
//! the HTTP API's code (no key, a bad tensor, an unknown model, the admin token asking for
//! actions, a spent quota), and a bad request in a stream is answered in-stream while the
//! stream goes on; statistics and the repository calls (admin token only) work.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;

use common::*;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

#[test]
fn the_proto_has_tritonclients_field_numbers() {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    let output = std::process::Command::new(venv_python())
        .arg(here.join("tests/grpc_proto_check.py"))
        .arg(here.join("proto/grpc_service.proto"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}{}", String::from_utf8_lossy(&output.stderr));
    assert!(stdout.contains("0 problems"), "{stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tritonclient_grpc_works_unchanged() {
    let app = TestAppliance::start(|config, repo| {
        config.policy.preload =
            vec![preload("rate-limit", "admission", 0, json!({"robot": {"rate": "1000/s", "burst": 1000}}))];
        add_model(repo, "tiny-vla", appliance::demo::MODEL_TOML);
        add_built_model(repo, "tiny-pi");
    })
    .await;
    let key = app.robot_key("grpc-arm").await;
    let spent = app.robot_key("grpc-spent").await;
    let put = app.admin(Method::PUT, "/admin/quotas/grpc-spent").json(&json!({"day": 0})).send().await.unwrap();
    assert_eq!(put.status(), StatusCode::OK);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/grpc_check.py");
    let url = format!("localhost:{}", app.addr.port());
    let ca = app.data.path().join("tls/cert.pem");
    let reference = built_model("tiny-pi").join("reference.json");
    let admin = app.admin_token.clone();
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new(venv_python())
            .arg(script)
            .args([url.as_str(), ca.to_str().unwrap(), key.as_str(), spent.as_str(), admin.as_str()])
            .arg(reference)
            .output()
    })
    .await
    .unwrap()
    .unwrap();
    assert!(output.status.success(), "grpc_check.py: {}", String::from_utf8_lossy(&output.stderr));
    let seen: Value = serde_json::from_slice(&output.stdout).unwrap();

    assert_eq!(seen["live"], true, "{seen}");
    assert_eq!(seen["ready"], true);
    assert_eq!(seen["model_ready"], true);
    assert_eq!(seen["unknown_model_ready"], false);
    assert_eq!(seen["server_metadata"]["name"], "vla-appliance");
    assert_eq!(seen["metadata"]["platform"], "pytorch_aoti");
    assert_eq!(seen["metadata"]["inputs"].as_array().unwrap().len(), 7, "{}", seen["metadata"]);

    let unary = &seen["unary"];
    assert_eq!(unary["shape"], json!([3, 50, 14]));
    assert!(unary["max_abs_diff"].as_f64().unwrap() < 1e-4, "{unary}");
    assert_eq!(unary["id"], "grpc-7");
    assert_eq!(unary["policy"]["decision"], "allow");
    assert_eq!(unary["policy"]["policies"][0]["name"], "rate-limit", "{unary}");
    for k in ["batch_size", "inference_ms", "policy", "preprocess_ms", "queue_ms", "total_ms"] {
        assert!(unary["timing"].as_array().unwrap().contains(&json!(k)), "{k} missing: {unary}");
    }

    let status = |k: &str| (seen[k]["status"].as_str().unwrap_or("").to_string(), seen[k]["message"].to_string());
    let (code, message) = status("without_key");
    assert_eq!(code, "StatusCode.UNAUTHENTICATED", "{message}");
    assert!(message.contains("unauthorized: credentials required"), "{message}");
    let (code, message) = status("bad_state");
    assert_eq!(code, "StatusCode.INVALID_ARGUMENT", "{message}");
    assert!(message.contains("invalid_tensor") && message.contains("state"), "{message}");
    let (code, message) = status("unknown_model");
    assert_eq!(code, "StatusCode.NOT_FOUND", "{message}");
    assert!(message.contains("model_not_found"), "{message}");
    let (code, message) = status("admin_infer");
    assert_eq!(code, "StatusCode.PERMISSION_DENIED", "{message}");
    let (code, message) = status("spent");
    assert_eq!(code, "StatusCode.RESOURCE_EXHAUSTED", "{message}");
    assert!(message.contains("rate_limited"), "{message}");

    let stream = seen["stream"].as_array().unwrap();
    assert_eq!(stream.len(), 3, "{stream:?}");
    assert_eq!(stream[0]["id"], "s-1");
    assert!(stream[0]["max_abs_diff"].as_f64().unwrap() < 1e-4, "{stream:?}");
    assert!(stream[1]["error"].as_str().unwrap().starts_with("invalid_tensor"), "{stream:?}");
    assert_eq!(stream[2]["id"], "s-3");
    assert!(stream[2]["max_abs_diff"].as_f64().unwrap() < 1e-4, "{stream:?}");

    assert_eq!(seen["typed"]["id"], "typed");
    assert_eq!(seen["typed"]["shape"], json!([1, 7]));
    // Typed contents give what the same tensors give raw.
    assert_eq!(seen["typed"]["action"], seen["raw"], "{seen}");
    assert_eq!(seen["raw"].as_array().unwrap().len(), 7);
    assert_eq!(seen["typed_and_raw"]["status"], "StatusCode.INVALID_ARGUMENT", "{seen}");
    assert_eq!(seen["model_config"]["status"], "StatusCode.UNIMPLEMENTED", "{seen}");

    assert!(seen["inference_count"].as_u64().unwrap() >= 3 * 3, "{seen}");
    let names: Vec<&str> =
        seen["index"]["models"].as_array().unwrap().iter().map(|m| m["name"].as_str().unwrap()).collect();
    assert!(names.contains(&"tiny-pi") && names.contains(&"tiny-vla"), "{names:?}");
    assert_eq!(seen["index_as_robot"]["status"], "StatusCode.PERMISSION_DENIED", "{seen}");
    assert_eq!(seen["ready_after_unload"], false);
    assert_eq!(seen["ready_after_load"], true);

    // Counted per call, under the route.
    let metrics = app.admin(Method::GET, "/metrics").send().await.unwrap().text().await.unwrap();
    assert!(
        metrics.lines().any(|l| l.starts_with("vla_http_requests_total")
            && l.contains("endpoint=\"/inference.GRPCInferenceService/ModelInfer\"")),
        "no gRPC ModelInfer in the HTTP metrics"
    );
    app.stop().await.unwrap();
}
