//! The monitoring stack (`monitoring/prometheus`) against a real Prometheus (Debian's
//! `prometheus` package, installed by `scripts/setup.sh`): `promtool` checks the shipped
//! configuration and rules and runs the alert unit tests, lints a live scrape, and an on-cell
//! Prometheus scraping the appliance over HTTPS is federated by a central one, which must see
//! the cell's requests with its `cell` label.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{TestAppliance, robot_request};
use reqwest::StatusCode;
use serde_json::Value;

fn shipped() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../monitoring/prometheus")
}

fn promtool(args: &[&str], dir: &Path) -> String {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("promtool (scripts/setup.sh installs Debian's prometheus)");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "promtool {args:?}: {text}");
    text
}

/// The shipped configuration with its rules, next to stand-ins for the files it names.
fn config_dir(ca: &[u8], token: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for file in ["prometheus.yml", "central.yml"] {
        std::fs::copy(shipped().join(file), dir.path().join(file)).unwrap();
    }
    std::fs::create_dir(dir.path().join("rules")).unwrap();
    for file in ["recording.yml", "alerts.yml"] {
        std::fs::copy(shipped().join("rules").join(file), dir.path().join("rules").join(file)).unwrap();
    }
    std::fs::write(dir.path().join("ca.pem"), ca).unwrap();
    std::fs::write(dir.path().join("metrics.token"), token).unwrap();
    dir
}

#[test]
fn promtool_accepts_the_shipped_configuration_and_every_alert_passes_its_unit_test() {
    let dir = config_dir(b"", "token");
    let out = promtool(&["check", "config", "prometheus.yml"], dir.path());
    assert!(out.contains("SUCCESS: 2 rule files found"), "{out}");
    promtool(&["check", "config", "central.yml"], dir.path());
    promtool(&["check", "rules", "rules/recording.yml", "rules/alerts.yml"], &shipped());
    let out = promtool(&["test", "rules", "tests/alerts_test.yml"], &shipped());
    assert!(out.contains("SUCCESS"), "{out}");

    // Every alert has a unit test, and the reference system's names (what Alertmanager
    // routes match on) are all there.
    let alerts = std::fs::read_to_string(shipped().join("rules/alerts.yml")).unwrap();
    let tests = std::fs::read_to_string(shipped().join("tests/alerts_test.yml")).unwrap();
    let names: Vec<&str> = alerts.lines().filter_map(|l| l.trim().strip_prefix("- alert: ")).collect();
    for name in &names {
        assert!(tests.contains(&format!("alertname: {name}\n")), "alert {name} has no promtool test");
    }
    for reference in [
        "HighErrorRate",
        "GPUOverheating",
        "SafetyIncidentSurge",
        "CriticalSafetyIncident",
        "ServiceDown",
        "ModelInferenceFailure",
        "HighLatency",
        "GPUMemoryHigh",
        "HighQueueDepth",
        "HighValidationFailureRate",
        "QuotaExceeded",
        "WorkerOverloaded",
        "RateLimitHitRate",
    ] {
        assert!(names.contains(&reference), "the reference alert {reference} is missing: {names:?}");
    }
}

/// A Prometheus server as a child process, killed on drop.
struct Prometheus {
    child: Child,
    url: String,
    _data: tempfile::TempDir,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

async fn start_prometheus(config: &Path) -> Prometheus {
    let data = tempfile::tempdir().unwrap();
    let port = free_port();
    let child = Command::new("prometheus")
        .arg(format!("--config.file={}", config.display()))
        .arg(format!("--storage.tsdb.path={}", data.path().display()))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .current_dir(config.parent().unwrap())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("prometheus (scripts/setup.sh installs Debian's prometheus)");
    let prometheus = Prometheus { child, url: format!("http://127.0.0.1:{port}"), _data: data };
    let started = Instant::now();
    loop {
        if let Ok(r) = reqwest::get(format!("{}/-/ready", prometheus.url)).await
            && r.status() == StatusCode::OK
        {
            return prometheus;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "prometheus did not get ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Prometheus' answer to an instant `query` (`/api/v1/query`), checked to be a success.
async fn query(prometheus: &Prometheus, query: &str) -> Value {
    let url = format!("{}/api/v1/query", prometheus.url);
    let r: Value =
        reqwest::Client::new().get(url).query(&[("query", query)]).send().await.unwrap().json().await.unwrap();
    assert_eq!(r["status"], "success", "{query}: {r}");
    r
}

/// Runs `query` on `prometheus` until it returns a non-empty vector (or 60 s pass).
async fn query_until_found(prometheus: &Prometheus, q: &str) -> Vec<Value> {
    let started = Instant::now();
    loop {
        let r = query(prometheus, q).await;
        if let Some(result) = r["data"]["result"].as_array()
            && !result.is_empty()
        {
            return result.clone();
        }
        assert!(started.elapsed() < Duration::from_secs(60), "{q}: nothing after 60 s");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test]
async fn a_central_prometheus_federating_the_cell_sees_its_requests_with_the_cell_label() {
    let app = TestAppliance::start(|config, _| {
        config.policy.preload = vec![
            common::preload(
                "rate-limit",
                "admission",
                0,
                serde_json::json!({"robot": {"rate": "10/min", "day": 1000}}),
            ),
            common::preload("joint-limits", "safety", 10, serde_json::json!({"default": {"velocity": 0.05}})),
        ];
    })
    .await;
    let token = std::fs::read_to_string(app.data.path().join("metrics.token")).unwrap();
    let ca = std::fs::read(app.data.path().join("tls/cert.pem")).unwrap();
    app.robot_key("arm-1").await;
    for seed in 0..3 {
        assert_eq!(app.infer(robot_request(seed)).await.status(), StatusCode::OK);
    }

    // A live scrape passes promtool's lint.
    let scrape = app.client.get(app.url("/metrics")).bearer_auth(token.trim()).send().await.unwrap();
    let text = scrape.text().await.unwrap();
    let mut lint = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut lint.stdin.take().unwrap(), text.as_bytes()).unwrap();
    let lint = lint.wait_with_output().unwrap();
    let problems = format!("{}{}", String::from_utf8_lossy(&lint.stdout), String::from_utf8_lossy(&lint.stderr));
    // `vla_worker_total` is a gauge named by the reference catalogue, kept for its users.
    let problems: Vec<&str> =
        problems.lines().filter(|l| !l.trim().is_empty() && !l.starts_with("vla_worker_total ")).collect();
    assert!(problems.is_empty(), "promtool check metrics: {problems:?}");

    // The shipped on-cell configuration, pointed at this appliance and scraping every second.
    let dir = config_dir(&ca, token.trim());
    let on_cell = std::fs::read_to_string(dir.path().join("prometheus.yml"))
        .unwrap()
        .replace("localhost:8443", &format!("127.0.0.1:{}", app.addr.port()))
        .replace("scrape_interval: 15s", "scrape_interval: 1s")
        .replace("evaluation_interval: 15s", "evaluation_interval: 1s");
    std::fs::write(dir.path().join("prometheus.yml"), on_cell).unwrap();
    let cell = start_prometheus(&dir.path().join("prometheus.yml")).await;
    let up = query_until_found(&cell, r#"up{job="vla-appliance"} == 1"#).await;
    assert_eq!(up.len(), 1, "{up:?}");

    // The shipped central configuration, federating that one cell.
    let central = std::fs::read_to_string(dir.path().join("central.yml"))
        .unwrap()
        .replace("scrape_interval: 30s", "scrape_interval: 1s")
        .replace(
            "          - cell-01.example:9090\n          - cell-02.example:9090",
            &format!("          - {}", cell.url.trim_start_matches("http://")),
        );
    let central_path = dir.path().join("central.yml");
    std::fs::write(&central_path, central).unwrap();
    let centre = start_prometheus(&central_path).await;

    let found = query_until_found(
        &centre,
        r#"vla_inference_requests_total{cell="cell-01",job="vla-appliance",model="tiny-vla",status="success"}"#,
    )
    .await;
    assert_eq!(found[0]["value"][1], "3", "{found:?}");
    // The operators' usual query works on the federated series.
    query_until_found(
        &centre,
        r#"histogram_quantile(0.95, rate(vla_inference_duration_seconds_bucket{cell="cell-01"}[5m]))"#,
    )
    .await;
    // Queue, batching, safety and quota series arrive too.
    for series in [
        r#"vla_gpu_available{cell="cell-01"}"#,
        r#"vla_inference_queue_capacity{cell="cell-01",model="tiny-vla"}"#,
        r#"vla_inference_batch_size_count{cell="cell-01",model="tiny-vla"}"#,
        r#"vla_safety_modifications_total{cell="cell-01",policy="joint-limits"}"#,
        r#"vla_rate_limit_tokens_remaining{cell="cell-01",robot_id="arm-1",limit_type="rate"}"#,
        r#"vla_quota_usage_percent{cell="cell-01",robot_id="arm-1",period="day"}"#,
        r#"vla_quota_used{cell="cell-01",robot_id="arm-1",period="day"}"#,
        r#"vla_quota_limit{cell="cell-01",robot_id="arm-1",period="day"}"#,
        r#"vla_safety_score{cell="cell-01"}"#,
        r#"vla_worker_total{cell="cell-01"}"#,
        r#"vla_worker_active{cell="cell-01"}"#,
        r#"vla_worker_task_duration_seconds_count{cell="cell-01",model="tiny-vla"}"#,
    ] {
        query_until_found(&centre, series).await;
    }
    query_until_found(&centre, r#"job:vla_inference_requests:rate5m{cell="cell-01"}"#).await;

    // Every query of the shipped Grafana dashboards is valid PromQL for this Prometheus.
    let dashboards = Path::new(env!("CARGO_MANIFEST_DIR")).join("../monitoring/grafana/dashboards");
    let mut checked = 0;
    for name in ["operations", "gpu", "safety"] {
        let dashboard: Value =
            serde_json::from_str(&std::fs::read_to_string(dashboards.join(format!("{name}.json"))).unwrap()).unwrap();
        for panel in dashboard["panels"].as_array().unwrap() {
            for target in panel["targets"].as_array().unwrap() {
                let expr = target["expr"].as_str().unwrap().replace("$cell", ".*");
                query(&centre, &expr).await;
                checked += 1;
            }
        }
    }
    assert!(checked >= 25, "{checked} dashboard queries");
}
