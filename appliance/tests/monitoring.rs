//! Observability end to end: `/metrics` on the real HTTPS listener after real inferences
//! (libtorch forwards, policies in wasmtime, quotas in sled), its token, and the JSON stats
//! endpoints.

#![allow(clippy::unwrap_used)]

mod common;

use common::{TestAppliance, preload, robot_request};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

fn metrics_token(app: &TestAppliance) -> String {
    std::fs::read_to_string(app.data.path().join("metrics.token")).unwrap().trim().to_string()
}

async fn scrape(app: &TestAppliance) -> String {
    let r = app.client.get(app.url("/metrics")).bearer_auth(metrics_token(app)).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert!(r.headers()["content-type"].to_str().unwrap().starts_with("text/plain; version=0.0.4"));
    r.text().await.unwrap()
}

/// The value of the series `name{labels}` (labels as rendered, sorted by name).
fn value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')).map(|v| v.parse().unwrap()))
}

#[tokio::test]
async fn metrics_show_live_requests_queues_batches_policies_and_quotas_behind_a_token() {
    let app = TestAppliance::start(|config, _| {
        config.policy.preload = vec![
            preload("rate-limit", "admission", 0, json!({"robot": {"rate": "3/min"}})),
            preload("joint-limits", "safety", 10, json!({"robot_types": {"ur5e": {"velocity": 0.05}}})),
        ];
    })
    .await;
    app.robot_key("arm-1").await;
    for _ in 0..3 {
        assert_eq!(app.infer(robot_request(1)).await.status(), StatusCode::OK);
    }
    assert_eq!(app.infer(robot_request(1)).await.status(), StatusCode::TOO_MANY_REQUESTS);
    let bad = app.as_robot("arm-1", Method::POST, "/v1/inference").await.body("{not json").send().await.unwrap();
    assert_eq!(bad.status(), StatusCode::BAD_REQUEST);

    // Closed without the metrics token; the admin token works too.
    assert_eq!(app.client.get(app.url("/metrics")).send().await.unwrap().status(), StatusCode::UNAUTHORIZED);
    let r = app.client.get(app.url("/metrics")).bearer_auth("vlaadm_wrong-wrong-wrong-wrong-wrong-wrong").send().await;
    assert_eq!(r.unwrap().status(), StatusCode::UNAUTHORIZED);
    let r = app.admin(Method::GET, "/monitoring/metrics").send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);

    let text = scrape(&app).await;
    let ok = r#"vla_inference_requests_total{model="tiny-vla",robot_type="ur5e",status="success"}"#;
    assert_eq!(value(&text, ok), Some(3.0), "{text}");
    let limited = r#"vla_inference_requests_total{model="tiny-vla",robot_type="ur5e",status="rate_limited"}"#;
    assert_eq!(value(&text, limited), Some(1.0));
    // Per registered robot, for the console's robot view.
    assert_eq!(value(&text, r#"vla_robot_requests_total{robot_id="arm-1",status="success"}"#), Some(3.0));
    assert_eq!(value(&text, r#"vla_robot_requests_total{robot_id="arm-1",status="rate_limited"}"#), Some(1.0));
    let seen = value(&text, r#"vla_robot_last_request_timestamp_seconds{robot_id="arm-1"}"#).unwrap();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
    assert!((now - 60.0..=now).contains(&seen), "{seen} vs {now}");
    assert_eq!(value(&text, r#"vla_inference_duration_seconds_count{model="tiny-vla"}"#), Some(4.0));
    assert_eq!(value(&text, r#"vla_inference_gpu_compute_seconds_count{model="tiny-vla"}"#), Some(3.0));
    assert_eq!(value(&text, r#"vla_inference_queue_wait_seconds_count{model="tiny-vla"}"#), Some(3.0));
    assert_eq!(value(&text, r#"vla_inference_batch_size_sum{model="tiny-vla"}"#), Some(3.0));
    assert_eq!(value(&text, r#"vla_inference_queue_capacity{model="tiny-vla"}"#), Some(256.0));
    assert_eq!(value(&text, r#"vla_inference_queue_depth{model="tiny-vla"}"#), Some(0.0));
    assert_eq!(value(&text, r#"vla_inference_batches_in_flight{model="tiny-vla"}"#), Some(0.0));
    assert_eq!(
        value(&text, r#"vla_http_requests_total{endpoint="/v1/inference",method="POST",status_code="200"}"#),
        Some(3.0)
    );
    assert_eq!(value(&text, r#"vla_errors_total{code="malformed_json"}"#), Some(1.0));
    assert_eq!(value(&text, r#"vla_validation_failures_total{code="malformed_json"}"#), Some(1.0));
    assert_eq!(value(&text, r#"vla_rate_limit_hits_total{limit_type="rate",robot_id="arm-1"}"#), Some(1.0));
    assert_eq!(value(&text, r#"vla_rate_limit_tokens_remaining{limit_type="rate",robot_id="arm-1"}"#), Some(0.0));
    assert_eq!(value(&text, r#"vla_safety_modifications_total{policy="joint-limits"}"#), Some(3.0));
    assert_eq!(value(&text, r#"vla_safety_checks_total{result="deny"}"#), Some(1.0));
    // The rate limit is an admission denial, not a safety rejection nor a safety incident.
    assert_eq!(value(&text, r#"vla_admission_rejections_total{code="rate_limited",policy="rate-limit"}"#), Some(1.0));
    assert_eq!(value(&text, r#"vla_rate_limit_exceeded_total{limit_type="rate"}"#), Some(1.0));
    assert!(!text.contains("vla_safety_rejections_total{"), "{text}");
    assert!(!text.contains("vla_safety_incidents_total{"), "{text}");
    // joint-limits modified all three actions.
    assert_eq!(value(&text, "vla_safety_score"), Some(0.0));
    assert_eq!(value(&text, "vla_worker_total"), Some(1.0));
    assert_eq!(value(&text, "vla_worker_active"), Some(0.0));
    assert_eq!(value(&text, r#"vla_worker_task_duration_seconds_count{model="tiny-vla"}"#), Some(3.0));
    assert_eq!(value(&text, r#"vla_safety_check_duration_seconds_count{policy="rate-limit"}"#), Some(4.0));
    assert_eq!(value(&text, "vla_models_loaded"), Some(1.0));
    // The demo model holds about 9 M float parameters.
    assert!(value(&text, r#"vla_model_memory_bytes{model="tiny-vla"}"#).unwrap() > 10e6, "{text}");
    assert_eq!(value(&text, r#"vla_inference_workers_active{model="tiny-vla"}"#), Some(1.0));
    assert!(text.contains(r#"vla_model_info{device="cpu",model="tiny-vla",version="1"} 1"#), "{text}");
    // The memory a batch needed is measured on CUDA devices only.
    assert!(!text.contains("vla_inference_gpu_memory_delta_bytes"), "{text}");
    assert!(text.contains("vla_application_info{libtorch=\"2.11.0\",version=\""));
    assert_eq!(value(&text, r#"vla_application_health{component="models"}"#), Some(1.0));
    assert!(value(&text, "vla_application_uptime_seconds").unwrap() > 0.0);
    assert!(value(&text, "vla_http_connections_active").unwrap() >= 1.0);
    assert!(value(&text, "vla_store_size_bytes").unwrap() > 0.0);
    assert!(value(&text, "vla_store_flushes_total").unwrap() >= 1.0);
    // No GPU telemetry on this machine; on a GPU machine this says 1 and the device series follow.
    let gpu: Value = app.admin(Method::GET, "/gpu/stats").send().await.unwrap().json().await.unwrap();
    let available = gpu["available"].as_bool().unwrap();
    assert_eq!(value(&text, "vla_gpu_available"), Some(f64::from(u8::from(available))));
    // Bounded labels only: no request id ever appears.
    assert!(!text.contains("request_id"));
}

async fn admin_json(app: &TestAppliance, path: &str) -> Value {
    let r = app.admin(Method::GET, path).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK, "{path}");
    r.json().await.unwrap()
}

#[tokio::test]
async fn stats_endpoints_answer_json_to_the_admin_only_and_metrics_can_be_public() {
    // A free loopback port for the plain-HTTP listener.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let app = TestAppliance::start(|config, _| {
        config.metrics.public = true;
        config.metrics.listen_http = Some(([127, 0, 0, 1], port).into());
    })
    .await;
    assert_eq!(app.client.get(app.url("/metrics")).send().await.unwrap().status(), StatusCode::OK);
    let plain = reqwest::get(format!("http://127.0.0.1:{port}/metrics")).await.unwrap();
    assert_eq!(plain.status(), StatusCode::OK);
    assert!(plain.text().await.unwrap().contains("vla_models_loaded 1"));
    let other = reqwest::get(format!("http://127.0.0.1:{port}/admin/robots")).await.unwrap();
    assert_eq!(other.status(), StatusCode::NOT_FOUND, "only /metrics is served in plain HTTP");
    assert!(!app.data.path().join("metrics.token").exists());
    app.robot_key("arm-2").await;
    assert_eq!(app.infer(robot_request(2)).await.status(), StatusCode::OK);

    for path in ["/health/detailed", "/gpu/stats", "/queue/stats", "/models/stats"] {
        assert_eq!(app.client.get(app.url(path)).send().await.unwrap().status(), StatusCode::UNAUTHORIZED, "{path}");
        let r = app.as_robot("arm-2", Method::GET, path).await.send().await.unwrap();
        assert_eq!(r.status(), StatusCode::FORBIDDEN, "{path}");
    }
    let health = admin_json(&app, "/health/detailed").await;
    assert_eq!(health["status"], "ok");
    assert_eq!(health["components"]["models"]["status"], "ok");
    assert_eq!(health["components"]["store"]["status"], "ok");
    assert!(health["components"]["gpu"]["available"].is_boolean());
    let gpu = admin_json(&app, "/gpu/stats").await;
    if gpu["available"] == false {
        assert!(gpu["reason"].as_str().unwrap().contains("NVML"), "{gpu}");
        assert_eq!(gpu["devices"], json!([]));
    }
    let queue = admin_json(&app, "/queue/stats").await;
    let tiny = &queue["models"][0];
    assert_eq!(tiny["workers"], 1);
    assert_eq!(
        (tiny["model"].as_str(), tiny["queue_capacity"].as_u64(), tiny["computed"].as_u64()),
        (Some("tiny-vla"), Some(256), Some(1))
    );
    let models = admin_json(&app, "/models/stats").await;
    assert_eq!(models["models"][0]["device"], "cpu");
    assert_eq!(models["models"][0]["version"], "1");
}
