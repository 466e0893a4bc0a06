//! openpi's WebSocket protocol (`GET /openpi/{model}`) driven by openpi's own client
//! (`openpi-client` from PyPI, in `.venv-clients`, which `scripts/setup.sh` installs) over real
//! TLS: `tiny-pi`'s chunks equal PyTorch's on the same observation (uint8 `[H,W,3]` and
//! `[3,H,W]` frames, PNG bytes), `tiny-vla` answers one step; a bad observation, a policy
//! denial and a 429 come back as error frames on a session that keeps working; a third
//! observation in flight is answered at once, not computed; an observation
//! whose session closes while it is queued is never computed.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;

use common::*;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openpi_client_works_unchanged() {
    let app = TestAppliance::start(|config, repo| {
        config.policy.preload = vec![
            preload("instruction-filter", "admission", 0, json!({"deny": ["disable safety"]})),
            preload("rate-limit", "admission", 1, json!({"robot": {"rate": "1000/s", "burst": 1000}})),
        ];
        add_model(repo, "tiny-vla", appliance::demo::MODEL_TOML);
        // A lone observation waits 0.5 s for company here (within the 1 s deadline): long enough to
        // close its session meanwhile.
        let slow = appliance::demo::model_toml_with_batching("slow-vla", "max_queue_delay_us = 500000\n");
        add_model(repo, "slow-vla", &slow);
        add_built_model(repo, "tiny-pi");
    })
    .await;
    let key = app.robot_key("openpi-arm").await;
    let spent = app.robot_key("openpi-spent").await;
    let put = app.admin(Method::PUT, "/admin/quotas/openpi-spent").json(&json!({"day": 0})).send().await.unwrap();
    assert_eq!(put.status(), StatusCode::OK);

    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/openpi_check.py");
    let port = app.addr.port().to_string();
    let ca = app.data.path().join("tls/cert.pem");
    let reference = built_model("tiny-pi").join("reference.json");
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new(client_python())
            .arg(script)
            .args([port.as_str(), key.as_str(), spent.as_str(), reference.to_str().unwrap()])
            .env("SSL_CERT_FILE", ca)
            .output()
    })
    .await
    .unwrap()
    .unwrap();
    assert!(output.status.success(), "openpi_check.py: {}", String::from_utf8_lossy(&output.stderr));
    let seen: Value = serde_json::from_slice(&output.stdout).unwrap();
    let worst = seen["tiny-pi max_abs_diff"].as_f64().unwrap();
    assert!(worst < 1e-4, "tiny-pi through openpi-client: max |Δ| {worst}; {seen}");
    assert_eq!(seen["tiny-vla shape"], json!([1, 7]));
    assert_eq!(seen["no key"], json!(401));
    assert_eq!(seen["metadata"]["observation_keys"]["state"], json!(["observation/state"]));

    // The closed session's observation was dropped from the queue, never computed.
    let slow = app.stats("slow-vla").await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let mut slow_now = slow;
    while slow_now.dropped_disconnect == 0 && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        slow_now = app.stats("slow-vla").await;
    }
    // Two computed by the busy session; the closed session's one dropped.
    assert_eq!((slow_now.dropped_disconnect, slow_now.computed), (1, 2), "{slow_now:?}");

    // Each observation counted under the route.
    let metrics = app.admin(Method::GET, "/metrics").send().await.unwrap().text().await.unwrap();
    assert!(
        metrics.lines().any(|l| l.starts_with("vla_http_requests_total")
            && l.contains("endpoint=\"/openpi/{model}\"")
            && l.contains("status_code=\"429\"")),
        "no openpi 429 in the HTTP metrics"
    );
    app.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_upgrade_is_refused_for_an_unknown_model_and_beyond_a_robots_sessions() {
    let app = TestAppliance::start(|config, _| config.server.websocket_sessions_per_robot = 1).await;
    let key = app.robot_key("arm-1").await;
    // WebSocket upgrades are HTTP/1.1's (openpi's client speaks nothing else).
    let pem = std::fs::read(app.data.path().join("tls/cert.pem")).unwrap();
    let h1 = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&pem).unwrap())
        .resolve("localhost", app.addr)
        .http1_only()
        .build()
        .unwrap();
    let upgrade = |model: &'static str| {
        h1.get(app.url(&format!("/openpi/{model}")))
            .header("authorization", format!("Api-Key {key}"))
            .header("connection", "upgrade")
            .header("upgrade", "websocket")
            .header("sec-websocket-version", "13")
            .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
    };
    let r = upgrade("no-such-model").send().await.unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    assert_eq!(r.json::<Value>().await.unwrap()["code"], "model_not_found");
    let first = upgrade("tiny-vla").send().await.unwrap();
    assert_eq!(first.status(), StatusCode::SWITCHING_PROTOCOLS);
    let _open = first.upgrade().await.unwrap();
    let second = upgrade("tiny-vla").send().await.unwrap();
    assert_eq!(second.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(second.json::<Value>().await.unwrap()["code"], "too_many_sessions");
    app.stop().await.unwrap();
}
