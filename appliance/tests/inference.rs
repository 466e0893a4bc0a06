//! The robot endpoint end to end: real HTTPS on an ephemeral port, real libtorch forwards of
//! the demo model, real batching.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use reqwest::StatusCode;
use vla_api::{ErrorBody, Health, InferenceResponse};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_robot_gets_an_action_with_its_timing_over_https_and_http2() {
    let app = TestAppliance::start(|_, _| {}).await;
    let response = app.infer(robot_request(1)).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.version(), reqwest::Version::HTTP_2, "ALPN negotiates HTTP/2");
    let body: InferenceResponse = response.json().await.unwrap();
    assert_eq!(body.model, "tiny-vla");
    assert_eq!(body.model_version, "1");
    assert_eq!(body.action.len(), 7);
    assert!(body.action.iter().all(|v| v.is_finite() && v.abs() <= 1.0), "{:?}", body.action);
    assert!(!body.request_id.is_empty());
    let t = body.timing;
    assert!(t.batch_size >= 1);
    assert!(t.inference_ms > 0.0 && t.preprocess_ms > 0.0);
    assert!(t.total_ms >= t.queue_ms + t.inference_ms, "{t:?}");
    app.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_reports_each_model_and_its_device() {
    let app = TestAppliance::start(|_, _| {}).await;
    let response = app.client.get(app.url("/health")).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let health: Health = response.json().await.unwrap();
    assert_eq!(health.status, "ok");
    assert_eq!(health.models.len(), 1);
    assert_eq!(health.models[0].state, "serving");
    let expected = appliance::model::resolve_device(appliance::spec::DeviceSpec::Auto).unwrap();
    assert_eq!(health.models[0].device, Some(appliance::model::device_name(expected)), "CUDA when usable, else CPU");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_robot_gets_the_same_action_alone_as_in_a_shared_batch() {
    // A long queue delay makes the 8 concurrent requests share one forward call.
    let app = TestAppliance::start(|_, repo| {
        add_model(
            repo,
            "tiny-vla",
            &appliance::demo::model_toml_with_batching("tiny-vla", "max_queue_delay_us = 300000\n"),
        );
    })
    .await;
    let mut alone = Vec::new();
    for seed in 0..8 {
        let mut r = robot_request(seed);
        r.priority = Some(vla_api::Priority::High);
        alone.push(app.infer(r).await.json::<InferenceResponse>().await.unwrap());
    }
    assert!(alone.iter().all(|r| r.timing.batch_size == 1));
    let together = futures::future::join_all((0..8).map(|seed| {
        let app = &app;
        async move { app.infer(robot_request(seed)).await.json::<InferenceResponse>().await.unwrap() }
    }))
    .await;
    let max_batch = together.iter().map(|r| r.timing.batch_size).max().unwrap();
    assert!(max_batch > 1, "concurrent requests were batched: {max_batch}");
    for (a, t) in alone.iter().zip(&together) {
        for (x, y) in a.action.iter().zip(&t.action) {
            assert!((x - y).abs() < 1e-4, "alone {:?} vs batched {:?}", a.action, t.action);
        }
    }
    // Different robots got different actions: the split did not mix them up.
    assert_ne!(together[0].action, together[1].action);
    let stats = app.stats("tiny-vla").await;
    assert_eq!(stats.computed, 16);
    assert!(stats.batches < 16, "{stats:?}");
}

async fn expect_error(response: reqwest::Response, status: StatusCode, code: &str) -> String {
    assert_eq!(response.status(), status, "for code {code}");
    let body: ErrorBody = response.json().await.unwrap();
    assert_eq!(body.code, code, "{}", body.error);
    body.error
}

/// A PNG whose header claims 60000 × 60000 pixels (a decompression bomb) but holds one pixel.
fn png_bomb() -> Vec<u8> {
    let mut bytes = png(1, 1);
    bytes[16..20].copy_from_slice(&60_000u32.to_be_bytes());
    bytes[20..24].copy_from_slice(&60_000u32.to_be_bytes());
    let crc = crc32(&bytes[12..29]);
    bytes[29..33].copy_from_slice(&crc.to_be_bytes());
    bytes
}

fn crc32(data: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFFu32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
        }
    }
    !crc
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_a_4xx_naming_the_problem_and_other_robots_are_unaffected() {
    let app = TestAppliance::start(|config, _| {
        config.server.body_limit_bytes = 256 * 1024;
        config.limits.max_image_bytes = 64 * 1024;
    })
    .await;
    let key = app.robot_key("arm-3").await;
    let post = |body: Vec<u8>, content_type: &'static str| {
        app.client
            .post(app.url("/v1/inference"))
            .header("x-api-key", &key)
            .header("content-type", content_type)
            .body(body)
            .send()
    };
    let with = |f: &dyn Fn(&mut serde_json::Value)| {
        let mut v = serde_json::to_value(robot_request(3)).unwrap();
        f(&mut v);
        serde_json::to_vec(&v).unwrap()
    };
    // A good robot keeps asking while the bad ones do.
    let good = async {
        let mut statuses = Vec::new();
        for seed in 0..6 {
            statuses.push(app.infer(robot_request(seed)).await.status());
        }
        statuses
    };
    let bad = async {
        let json = "application/json";
        let msg = expect_error(
            post(b"{\"robot_id\": ".to_vec(), json).await.unwrap(),
            StatusCode::BAD_REQUEST,
            "malformed_json",
        )
        .await;
        assert!(msg.contains("not valid JSON"), "{msg}");
        let msg = expect_error(
            post(
                with(&|v| {
                    v.as_object_mut().unwrap().remove("instruction");
                }),
                json,
            )
            .await
            .unwrap(),
            StatusCode::BAD_REQUEST,
            "invalid_field",
        )
        .await;
        assert!(msg.contains("instruction"), "{msg}");
        let msg = expect_error(
            post(with(&|v| v["state"] = serde_json::json!("fast")), json).await.unwrap(),
            StatusCode::BAD_REQUEST,
            "invalid_field",
        )
        .await;
        assert!(msg.starts_with("field `state`"), "{msg}");
        let msg = expect_error(
            post(with(&|v| v["state"] = serde_json::json!([1.0, 2.0])), json).await.unwrap(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "state_length_mismatch",
        )
        .await;
        assert!(msg.contains("expects 7 values, got 2"), "{msg}");
        let msg = expect_error(
            post(with(&|v| v["state"][0] = serde_json::json!(1e39)), json).await.unwrap(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_value",
        )
        .await;
        assert!(msg.contains("state[0]"), "{msg}");
        expect_error(
            post(with(&|v| v["image"] = serde_json::json!("%%% not base64 %%%")), json).await.unwrap(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_base64",
        )
        .await;
        expect_error(
            post(with(&|v| v["image"] = serde_json::json!(b64(b"GIF89a not supported"))), json).await.unwrap(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "unsupported_image_format",
        )
        .await;
        let mut corrupt = vec![0xFF, 0xD8, 0xFF, 0xE0];
        corrupt.extend([0u8; 200]);
        expect_error(
            post(with(&|v| v["image"] = serde_json::json!(b64(&corrupt))), json).await.unwrap(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "image_decode_failed",
        )
        .await;
        let msg = expect_error(
            post(with(&|v| v["image"] = serde_json::json!(b64(&png_bomb()))), json).await.unwrap(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "image_dimensions_too_large",
        )
        .await;
        assert!(msg.contains("60000x60000"), "{msg}");
        let big = vec![0xAB; 100 * 1024];
        expect_error(
            post(with(&|v| v["image"] = serde_json::json!(b64(&big))), json).await.unwrap(),
            StatusCode::PAYLOAD_TOO_LARGE,
            "image_too_large",
        )
        .await;
        expect_error(
            post(vec![b' '; 300 * 1024], json).await.unwrap(),
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
        )
        .await;
        let msg = expect_error(
            post(with(&|v| v["model"] = serde_json::json!("gpt-9")), json).await.unwrap(),
            StatusCode::NOT_FOUND,
            "model_not_found",
        )
        .await;
        assert!(msg.contains("gpt-9"), "{msg}");
        expect_error(
            post(with(&|_| {}), "text/plain").await.unwrap(),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
        )
        .await;
        expect_error(
            post(with(&|v| v["deadline_ms"] = serde_json::json!(0)), json).await.unwrap(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_value",
        )
        .await;
        // Another robot's id, existing or not (and this one is not even valid): refused alike.
        expect_error(
            post(with(&|v| v["robot_id"] = serde_json::json!("../etc")), json).await.unwrap(),
            StatusCode::FORBIDDEN,
            "forbidden",
        )
        .await;
        expect_error(
            post(with(&|v| v["priority"] = serde_json::json!("urgent")), json).await.unwrap(),
            StatusCode::BAD_REQUEST,
            "invalid_field",
        )
        .await;
        expect_error(
            app.client.get(app.url("/v1/nothing")).header("x-api-key", &key).send().await.unwrap(),
            StatusCode::NOT_FOUND,
            "not_found",
        )
        .await;
        expect_error(
            app.client.get(app.url("/v1/inference")).header("x-api-key", &key).send().await.unwrap(),
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
        )
        .await;
    };
    let (statuses, ()) = tokio::join!(good, bad);
    assert!(statuses.iter().all(|s| *s == StatusCode::OK), "{statuses:?}");
    let stats = app.stats("tiny-vla").await;
    assert_eq!(stats.failed, 0);
    assert_eq!(stats.computed, 6, "only the good requests reached the model");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_answers_503_with_retry_after_at_once() {
    let app = TestAppliance::start(|_, repo| {
        add_model(
            repo,
            "tiny-vla",
            &appliance::demo::model_toml_with_batching(
                "tiny-vla",
                "max_queue_delay_us = 1000000\nqueue_capacity = 2\ndefault_deadline_ms = 10000\n",
            ),
        );
    })
    .await;
    let waiting = async { tokio::join!(app.infer(robot_request(1)), app.infer(robot_request(2))) };
    let overflow = async {
        // Let the first two reach the queue, where they wait for the 1 s batch window.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let start = Instant::now();
        let response = app.infer(robot_request(3)).await;
        (response, start.elapsed())
    };
    let ((a, b), (response, took)) = tokio::join!(waiting, overflow);
    assert_eq!(response.headers().get("retry-after").unwrap(), "1");
    let msg = expect_error(response, StatusCode::SERVICE_UNAVAILABLE, "queue_full").await;
    assert!(msg.contains("queue is full"), "{msg}");
    // Waiting for room would take until the window closes, 0.8 s from now.
    assert!(took < Duration::from_millis(700), "refused at once, not after waiting: {took:?}");
    assert_eq!(a.status(), StatusCode::OK);
    assert_eq!(b.status(), StatusCode::OK);
    assert_eq!(app.stats("tiny-vla").await.rejected_queue_full, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deadline_that_passes_in_the_queue_gets_504_and_is_never_computed() {
    let app = TestAppliance::start(|_, repo| {
        add_model(
            repo,
            "tiny-vla",
            &appliance::demo::model_toml_with_batching("tiny-vla", "max_queue_delay_us = 1000000\n"),
        );
    })
    .await;
    // Decoding and resizing a 1280×960 camera image alone takes longer than 1 ms, so the
    // deadline has passed by the time the request reaches the queue.
    let mut request = robot_request(1);
    request.image = Some(b64(&jpeg(1280, 960, 1)));
    request.deadline_ms = Some(1);
    let msg = expect_error(app.infer(request.clone()).await, StatusCode::GATEWAY_TIMEOUT, "deadline_exceeded").await;
    assert!(msg.contains("1 ms"), "{msg}");
    let stats = app.stats("tiny-vla").await;
    assert_eq!((stats.dropped_deadline, stats.computed), (1, 0), "{stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_robot_that_disconnects_is_dropped_from_the_queue_and_never_computed() {
    let app = TestAppliance::start(|_, repo| {
        add_model(
            repo,
            "tiny-vla",
            &appliance::demo::model_toml_with_batching(
                "tiny-vla",
                "max_queue_delay_us = 1000000\ndefault_deadline_ms = 5000\n",
            ),
        );
    })
    .await;
    let impatient = app
        .as_robot("arm-1", reqwest::Method::POST, "/v1/inference")
        .await
        .json(&robot_request(1))
        .timeout(Duration::from_millis(300))
        .send()
        .await;
    assert!(impatient.unwrap_err().is_timeout());
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let stats = app.stats("tiny-vla").await;
    assert_eq!((stats.dropped_disconnect, stats.computed, stats.queue_depth), (1, 0, 0), "{stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_in_flight_requests_finish() {
    let app = TestAppliance::start(|_, repo| {
        add_model(
            repo,
            "tiny-vla",
            &appliance::demo::model_toml_with_batching("tiny-vla", "max_queue_delay_us = 500000\n"),
        );
    })
    .await;
    let in_flight = app.infer(robot_request(1));
    let (response, ()) = tokio::join!(in_flight, async {
        tokio::time::sleep(Duration::from_millis(150)).await;
        app.signal_shutdown();
    });
    assert_eq!(response.status(), StatusCode::OK);
    app.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_model_toml_is_refused_by_file_and_field_while_other_models_serve() {
    let app = TestAppliance::start(|_, repo| {
        add_model(repo, "tiny-vla", appliance::demo::MODEL_TOML);
        let broken = appliance::demo::MODEL_TOML
            .replace("name = \"tiny-vla\"", "name = \"broken\"")
            .replace("max_batch_size = 32", "max_batch_size = 0");
        add_model(repo, "broken", &broken);
    })
    .await;
    let response = app.client.get(app.url("/health")).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let health: Health = response.json().await.unwrap();
    assert_eq!(health.status, "degraded");
    let broken = health.models.iter().find(|m| m.name == "broken").unwrap();
    assert_eq!(broken.state, "failed");
    let error = broken.error.as_deref().unwrap();
    assert!(
        error.contains("broken/model.toml") && error.contains("field `max_batch_size`") && error.contains("1-1024"),
        "{error}"
    );
    let mut request = robot_request(1);
    request.model = Some("tiny-vla".into());
    assert_eq!(app.infer(request.clone()).await.status(), StatusCode::OK);
    request.model = Some("broken".into());
    assert_eq!(app.infer(request.clone()).await.status(), StatusCode::NOT_FOUND);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_no_model_serving_health_and_inference_answer_503() {
    let data = tempfile::tempdir().unwrap();
    let config = test_config(data.path());
    let broken = appliance::demo::MODEL_TOML.replace("device = \"auto\"", "device = \"cuda:7\"");
    add_model(&config.model_repository(), "tiny-vla", &broken);
    let (app, status, body) = TestAppliance::launch(config, tempfile::tempdir().unwrap()).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    let health: Health = serde_json::from_str(&body).unwrap();
    assert_eq!(health.status, "unavailable");
    assert!(health.models[0].error.as_deref().unwrap().contains("cuda:7"), "{body}");
    let response = app.infer(robot_request(1)).await;
    assert!(response.headers().contains_key("retry-after"));
    expect_error(response, StatusCode::SERVICE_UNAVAILABLE, "unavailable").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_with_a_deadline_shorter_than_the_batch_window_still_runs() {
    let app = TestAppliance::start(|_, repo| {
        add_model(
            repo,
            "tiny-vla",
            &appliance::demo::model_toml_with_batching("tiny-vla", "max_queue_delay_us = 1000000\n"),
        );
    })
    .await;
    // Alone in the queue, it is dispatched just before its deadline instead of expiring.
    let mut request = robot_request(1);
    request.deadline_ms = Some(300);
    let response = app.infer(request).await;
    assert_eq!(response.status(), StatusCode::OK);
    let body: InferenceResponse = response.json().await.unwrap();
    assert!(body.timing.queue_ms < 300.0, "{:?}", body.timing);
}
