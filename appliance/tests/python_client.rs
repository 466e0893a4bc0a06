//! The project's Python client (`clients/python`, installed into `.venv-clients` by
//! `scripts/setup.sh`) against a real appliance over TLS: its own tests
//! (`clients/python/tests`) run here, with tiny-pi (two cameras, 50-step chunks) compared with
//! PyTorch, a CA file and a pinned fingerprint, typed errors, `Retry-After` within its bound and
//! the openpi-style adapter.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;

use common::*;
use reqwest::{Method, StatusCode};
use serde_json::json;
use sha2::Digest;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_clients_own_tests_pass_against_the_appliance() {
    let app = TestAppliance::start(|config, repo| {
        config.policy.preload =
            vec![preload("rate-limit", "admission", 0, json!({"robot": {"rate": "1000/s", "burst": 1000}}))];
        add_built_model(repo, "tiny-pi");
    })
    .await;
    let key = app.robot_key("py-arm").await;
    let spent = app.robot_key("py-spent").await;
    let slow = app.robot_key("py-slow").await;
    for (robot, quota) in [("py-spent", json!({"day": 0})), ("py-slow", json!({"rate": "1/s", "burst": 1}))] {
        let put = app.admin(Method::PUT, &format!("/admin/quotas/{robot}")).json(&quota).send().await.unwrap();
        assert_eq!(put.status(), StatusCode::OK);
    }
    let cert = app.data.path().join("tls/cert.pem");
    let pem = std::fs::read(&cert).unwrap();
    let der = rustls_pemfile::certs(&mut pem.as_slice()).next().unwrap().unwrap();
    let fingerprint: String = sha2::Sha256::digest(&der).iter().map(|b| format!("{b:02X}")).collect();

    let client = Path::new(env!("CARGO_MANIFEST_DIR")).join("../clients/python");
    let reference = built_model("tiny-pi").join("reference.json");
    let url = format!("https://localhost:{}", app.addr.port());
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new(client_python())
            .args(["-m", "unittest", "discover", "-v", "-s"])
            .arg(client.join("tests"))
            // The working tree's client, not the copy setup installed.
            .env("PYTHONPATH", &client)
            .env("VLA_URL", url)
            .env("VLA_CA", cert)
            .env("VLA_FINGERPRINT", fingerprint)
            .env("VLA_ROBOT", "py-arm")
            .env("VLA_KEY", key)
            .env("VLA_SPENT_ROBOT", "py-spent")
            .env("VLA_SPENT_KEY", spent)
            .env("VLA_SLOW_ROBOT", "py-slow")
            .env("VLA_SLOW_KEY", slow)
            .env("VLA_REFERENCE", reference)
            // The system trust store must not know the appliance (the unverified-TLS test).
            .env_remove("SSL_CERT_FILE")
            .env_remove("REQUESTS_CA_BUNDLE")
            .env_remove("CURL_CA_BUNDLE")
            .output()
    })
    .await
    .unwrap()
    .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    eprintln!("{stderr}");
    assert!(output.status.success(), "clients/python tests failed:\n{stderr}");
    assert!(stderr.contains("OK") && !stderr.contains("skipped"), "{stderr}");
    app.stop().await.unwrap();
}
