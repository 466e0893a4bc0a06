//! The action envelope (`[action.envelope]`) with a real hostile safety component: the
//! `oversized-output` fixture answers `modify` with every value `1e30` (the right kind, dof and
//! horizon, finite) after the shipped policies. The host denies it on both endpoints (or clamps
//! it, per `on_violation`), `max_delta` denies a jump from the robot's previous action, every
//! violation is counted and audited, and `/health` says which models have an envelope.

#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

const DEMO_ENVELOPE: &str = "[action.envelope]\nmin = [-1.0, -1.0, -1.0, -1.0, -1.0, -1.0, -1.0]\nmax = [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]\non_violation = \"deny\"\n";

/// The demo model with `envelope` as its `[action.envelope]` (none when empty), named `name`.
fn with_envelope(name: &str, envelope: &str) -> String {
    let toml = appliance::demo::MODEL_TOML.replace("name = \"tiny-vla\"", &format!("name = \"{name}\""));
    assert!(toml.contains(DEMO_ENVELOPE), "the demo model declares its envelope");
    toml.replace(DEMO_ENVELOPE, envelope)
}

/// The fixture turns every action of a request whose instruction says `attack` into 1e30s.
fn hostile() -> appliance::config::PreloadPolicy {
    preload("oversized-output", "safety", 100, json!({"huge": true}))
}

fn request(model: &str, instruction: &str) -> vla_api::InferenceRequest {
    vla_api::InferenceRequest { model: Some(model.into()), instruction: instruction.into(), ..robot_request(1) }
}

async fn metric(app: &TestAppliance, series: &str) -> f64 {
    let text = app.admin(Method::GET, "/metrics").send().await.unwrap().text().await.unwrap();
    text.lines().find(|l| l.starts_with(series)).and_then(|l| l.rsplit(' ').next()?.parse().ok()).unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_policy_gets_an_action_past_the_envelope() {
    let app = TestAppliance::start(|config, repo| {
        config.policy.preload = vec![hostile()];
        add_model(repo, "tiny-vla", appliance::demo::MODEL_TOML);
        add_model(repo, "clamped", &with_envelope("clamped", &DEMO_ENVELOPE.replace("\"deny\"", "\"clamp\"")));
        let jumpy = "[action.envelope]\nmin = [-1e31, -1e31, -1e31, -1e31, -1e31, -1e31, -1e31]\nmax = [1e31, 1e31, 1e31, 1e31, 1e31, 1e31, 1e31]\nmax_delta = [0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5]\nforget_after_ms = 60000\n";
        add_model(repo, "jumpy", &with_envelope("jumpy", jumpy));
        add_model(repo, "bare", &with_envelope("bare", ""));
    })
    .await;

    // An ordinary request passes untouched.
    let ok = app.infer(request("tiny-vla", "pick up the red block")).await;
    assert_eq!(ok.status(), StatusCode::OK);

    // Deny: the 1e30 modify never leaves the box, on /v1 ...
    let denied = app.infer(request("tiny-vla", "attack the red block")).await;
    assert_eq!(denied.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let body: Value = denied.json().await.unwrap();
    assert_eq!(body["code"], "action_out_of_envelope", "{body}");
    let error = body["error"].as_str().unwrap();
    assert!(error.contains("step 0, dof 0: 1e30 is above the envelope's max 1"), "{error}");
    // ... and on OIP.
    let key = app.robot_key("arm-1").await;
    let oip = json!({"inputs": [
        {"name": "image", "datatype": "BYTES", "shape": [1], "data": [b64(&jpeg(64, 48, 3))]},
        {"name": "instruction", "datatype": "BYTES", "shape": [1], "data": ["attack now"]},
        {"name": "state", "datatype": "FP32", "shape": [1, 7], "data": [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6]},
    ]});
    let response = app
        .client
        .post(app.url("/v2/models/tiny-vla/infer"))
        .header("x-api-key", &key)
        .json(&oip)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(response.json::<Value>().await.unwrap()["code"], "action_out_of_envelope");
    let series = r#"vla_action_envelope_violations_total{action="deny",limit="max",model="tiny-vla"}"#;
    assert_eq!(metric(&app, series).await, 2.0);

    // Clamp: the action brought into the envelope, the decision `modify`, the envelope named.
    let clamped = app.infer(request("clamped", "attack the red block")).await;
    assert_eq!(clamped.status(), StatusCode::OK);
    let body: vla_api::InferenceResponse = clamped.json().await.unwrap();
    assert_eq!(body.action, vec![1.0; 7]);
    assert_eq!(body.policy.decision, "modify");
    let last = body.policy.policies.last().unwrap();
    assert_eq!((last.name.as_str(), last.decision.as_str()), ("envelope", "modify"), "{:?}", body.policy);

    // max_delta: a jump from the robot's previous action is denied; that denial is not
    // remembered, so the robot's next ordinary request passes.
    assert_eq!(app.infer(request("jumpy", "pick up the red block")).await.status(), StatusCode::OK);
    let jump = app.infer(request("jumpy", "attack the red block")).await;
    assert_eq!(jump.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let error = jump.json::<Value>().await.unwrap()["error"].as_str().unwrap().to_string();
    assert!(error.contains("more than the envelope's max_delta 0.5"), "{error}");
    assert_eq!(app.infer(request("jumpy", "pick up the red block")).await.status(), StatusCode::OK);
    // Each denial is a safety incident (what the safety alerts count); the clamp is not.
    let incidents = r#"vla_safety_incidents_total{severity="high",violation_type="out_of_envelope_"#;
    assert_eq!(metric(&app, &format!(r#"{incidents}max"}}"#)).await, 2.0);
    assert_eq!(metric(&app, &format!(r#"{incidents}max_delta"}}"#)).await, 1.0);
    let score = metric(&app, "vla_safety_score").await;
    assert!(score > 0.0 && score < 1.0, "{score}");

    // A model without an envelope is served as before (the fixture's 1e30 gets through: this
    // is what the envelope is for), and /health says it has none.
    let bare = app.infer(request("bare", "attack the red block")).await;
    assert_eq!(bare.status(), StatusCode::OK);
    assert_eq!(bare.json::<vla_api::InferenceResponse>().await.unwrap().action, vec![1e30; 7]);
    let health: Value = app.client.get(app.url("/health")).send().await.unwrap().json().await.unwrap();
    let envelope = |name: &str| {
        health["models"].as_array().unwrap().iter().find(|m| m["name"] == name).unwrap()["envelope"].clone()
    };
    assert_eq!(envelope("tiny-vla"), "deny");
    assert_eq!(envelope("clamped"), "clamp");
    assert_eq!(envelope("bare"), "none");

    // Every violation audited under the envelope's name, with what was proposed.
    let audit: Value =
        app.admin(Method::GET, "/admin/audit?policy=envelope").send().await.unwrap().json().await.unwrap();
    let records = audit["records"].as_array().unwrap();
    // (Identical denials of one robot fold into one record with a count.)
    let counted = |decision: &str| -> u64 {
        records.iter().filter(|r| r["decision"] == decision).map(|r| r["count"].as_u64().unwrap()).sum()
    };
    assert_eq!(counted("deny"), 3, "{audit}");
    assert_eq!(counted("modify"), 1, "{audit}");
    assert!(records.iter().all(|r| r["original_action"][0] == json!(1e30)), "{audit}");
    app.stop().await.unwrap();
}

#[test]
fn a_bad_envelope_is_refused_naming_its_field() {
    let bad = with_envelope("bad", &DEMO_ENVELOPE.replace("max = [1.0, 1.0", "max = [-2.0, 1.0"));
    let err = appliance::spec::ModelSpec::parse(&bad, "bad").unwrap_err();
    let err = format!("{err:?}");
    assert!(err.contains("action.envelope.max") && err.contains("dof 0"), "{err}");
    let short = with_envelope("short", &DEMO_ENVELOPE.replace("min = [-1.0, -1.0, ", "min = ["));
    let err = appliance::spec::ModelSpec::parse(&short, "short").unwrap_err();
    let err = format!("{err:?}");
    assert!(err.contains("action.envelope.min") && err.contains("5 values"), "{err}");
}
