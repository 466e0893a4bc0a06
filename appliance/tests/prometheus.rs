//! The monitoring stack (`monitoring/prometheus`) against a real Prometheus (Debian's
//! `prometheus` package, installed by `scripts/setup.sh`): `promtool` checks the shipped
//! configuration and rules and runs the alert unit tests, lints a live scrape, and an on-cell
//! Prometheus scraping the appliance over HTTPS is federated by a central one, which must see
//! the cell's requests with its `cell` label. A fleet of two cells pushes to a central receiver
//! by remote_write, which must keep the cells apart and, after an outage of its own, receive
//! the samples it missed.

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
    for file in ["prometheus.yml", "central.yml", "federation.yml"] {
        std::fs::copy(shipped().join(file), dir.path().join(file)).unwrap();
    }
    std::fs::create_dir(dir.path().join("rules")).unwrap();
    for file in ["recording.yml", "alerts.yml"] {
        std::fs::copy(shipped().join("rules").join(file), dir.path().join("rules").join(file)).unwrap();
    }
    std::fs::write(dir.path().join("ca.pem"), ca).unwrap();
    std::fs::write(dir.path().join("metrics.token"), token).unwrap();
    // The on-cell configuration reads them from the appliance's data directory.
    let mut on_cell = std::fs::read_to_string(dir.path().join("prometheus.yml")).unwrap();
    for (shipped, here) in
        [("/var/lib/vla-appliance/metrics.token", "metrics.token"), ("/var/lib/vla-appliance/tls/cert.pem", "ca.pem")]
    {
        assert!(on_cell.contains(shipped), "prometheus.yml no longer reads {shipped}");
        on_cell = on_cell.replace(shipped, here);
    }
    std::fs::write(dir.path().join("prometheus.yml"), on_cell).unwrap();
    dir
}

#[test]
fn promtool_accepts_the_shipped_configuration_and_every_alert_passes_its_unit_test() {
    let dir = config_dir(b"", "token");
    let out = promtool(&["check", "config", "prometheus.yml"], dir.path());
    assert!(out.contains("SUCCESS: 2 rule files found"), "{out}");
    promtool(&["check", "config", "central.yml"], dir.path());
    promtool(&["check", "config", "federation.yml"], dir.path());
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
    data: tempfile::TempDir,
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
    start_prometheus_on(config, tempfile::tempdir().unwrap(), free_port(), &[]).await
}

/// A Prometheus on `port` keeping its TSDB in `data` (so that it can be restarted on both).
async fn start_prometheus_on(config: &Path, data: tempfile::TempDir, port: u16, flags: &[&str]) -> Prometheus {
    let child = Command::new("prometheus")
        .arg(format!("--config.file={}", config.display()))
        .arg(format!("--storage.tsdb.path={}", data.path().display()))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .args(flags)
        .current_dir(config.parent().unwrap())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("prometheus (scripts/setup.sh installs Debian's prometheus)");
    let prometheus = Prometheus { child, url: format!("http://127.0.0.1:{port}"), data };
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

impl Prometheus {
    /// Stops it as `systemctl stop` would (SIGTERM, then waits): gives back its data directory.
    fn stop(mut self) -> tempfile::TempDir {
        let pid = self.child.id().to_string();
        assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
        self.child.wait().unwrap();
        let data = std::mem::replace(&mut self.data, tempfile::tempdir().unwrap());
        drop(self);
        data
    }
}

/// Prometheus' answer to an instant `query` (`/api/v1/query`), checked to be a success.
async fn query(prometheus: &Prometheus, query: &str) -> Value {
    query_at(prometheus, query, None).await
}

/// `query` evaluated at `time` (Unix seconds), or now.
async fn query_at(prometheus: &Prometheus, query: &str, time: Option<f64>) -> Value {
    let url = format!("{}/api/v1/query", prometheus.url);
    let mut params = vec![("query", query.to_string())];
    if let Some(t) = time {
        params.push(("time", format!("{t:.3}")));
    }
    let r: Value = reqwest::Client::new().get(url).query(&params).send().await.unwrap().json().await.unwrap();
    assert_eq!(r["status"], "success", "{query}: {r}");
    r
}

fn unix_now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64()
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

    // The shipped federation configuration, federating that one cell.
    let central = std::fs::read_to_string(dir.path().join("federation.yml"))
        .unwrap()
        .replace("scrape_interval: 30s", "scrape_interval: 1s")
        .replace(
            "          - cell-01.example:9090\n          - cell-02.example:9090",
            &format!("          - {}", cell.url.trim_start_matches("http://")),
        );
    let central_path = dir.path().join("federation.yml");
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

/// An on-cell Prometheus for `app`, from the shipped `prometheus.yml`: named `cell`, scraping
/// every second and pushing to the central receiver at `central`.
async fn on_cell_prometheus(app: &TestAppliance, cell: &str, central: &str) -> (Prometheus, tempfile::TempDir) {
    let token = std::fs::read_to_string(app.data.path().join("metrics.token")).unwrap();
    let ca = std::fs::read(app.data.path().join("tls/cert.pem")).unwrap();
    let dir = config_dir(&ca, token.trim());
    let shipped = std::fs::read_to_string(dir.path().join("prometheus.yml")).unwrap();
    for needle in ["cell: cell-01", "localhost:8443", "https://central.example:9090/api/v1/write", "max_backoff: 5s"] {
        assert!(shipped.contains(needle), "prometheus.yml no longer has `{needle}`");
    }
    let config = shipped
        .replace("cell: cell-01", &format!("cell: {cell}"))
        .replace("localhost:8443", &format!("127.0.0.1:{}", app.addr.port()))
        .replace("https://central.example:9090/api/v1/write", &format!("{central}/api/v1/write"))
        // Sent within a second of being scraped, and retried every second at most.
        .replace("max_backoff: 5s", "max_backoff: 1s\n      batch_send_deadline: 1s")
        .replace("scrape_interval: 15s", "scrape_interval: 1s")
        .replace("evaluation_interval: 15s", "evaluation_interval: 1s");
    std::fs::write(dir.path().join("prometheus.yml"), config).unwrap();
    (start_prometheus(&dir.path().join("prometheus.yml")).await, dir)
}

/// Requests per cell at the centre: `sum by (cell) (vla_inference_requests_total)` at `time`.
async fn requests_by_cell(centre: &Prometheus, time: Option<f64>) -> std::collections::BTreeMap<String, String> {
    let r = query_at(centre, "sum by (cell) (vla_inference_requests_total)", time).await;
    r["data"]["result"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["metric"]["cell"].as_str().unwrap_or("").to_string(), s["value"][1].as_str().unwrap().to_string()))
        .collect()
}

#[tokio::test]
async fn a_fleet_pushes_to_a_central_receiver_which_keeps_cells_apart_and_catches_up_after_an_outage() {
    let cells = [TestAppliance::start(|_, _| {}).await, TestAppliance::start(|_, _| {}).await];
    for (app, requests) in cells.iter().zip([2, 3]) {
        app.robot_key("arm-1").await;
        for seed in 0..requests {
            assert_eq!(app.infer(robot_request(seed)).await.status(), StatusCode::OK);
        }
    }

    // The shipped central configuration, with the remote-write receiver on.
    let central_dir = config_dir(b"", "token");
    let central_config = central_dir.path().join("central.yml");
    let port = free_port();
    let receiver = ["--web.enable-remote-write-receiver"];
    let centre = start_prometheus_on(&central_config, tempfile::tempdir().unwrap(), port, &receiver).await;
    let mut on_cell = Vec::new();
    for (app, cell) in cells.iter().zip(["cell-01", "cell-02"]) {
        on_cell.push(on_cell_prometheus(app, cell, &centre.url).await);
    }

    // Both cells' series arrive, apart.
    let expected: std::collections::BTreeMap<String, String> =
        [("cell-01".to_string(), "2".to_string()), ("cell-02".to_string(), "3".to_string())].into();
    let started = Instant::now();
    while requests_by_cell(&centre, None).await != expected {
        assert!(started.elapsed() < Duration::from_secs(60), "{:?}", requests_by_cell(&centre, None).await);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // Recorded series are pushed too.
    query_until_found(&centre, r#"job:vla_inference_requests:rate5m{cell="cell-02"}"#).await;

    // Some history at the centre before it stops: 10 scrapes of each cell.
    let started = Instant::now();
    loop {
        let r = query(&centre, r#"count_over_time(up{job="vla-appliance"}[1m]) >= 10"#).await;
        if r["data"]["result"].as_array().unwrap().len() == 2 {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "no history at the centre: {r}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // The centre stops for 30 s; cell-01 serves 4 more requests meanwhile.
    let down_at = unix_now();
    let data = centre.stop();
    for seed in 10..14 {
        assert_eq!(cells[0].infer(robot_request(seed)).await.status(), StatusCode::OK);
    }
    tokio::time::sleep(Duration::from_secs(30)).await;
    let up_at = unix_now();
    let centre = start_prometheus_on(&central_config, data, port, &receiver).await;

    // Caught up: both cells' samples reach past the restart.
    let started = Instant::now();
    loop {
        let r = query(&centre, r#"timestamp(up{job="vla-appliance"})"#).await;
        let latest: Vec<f64> = r["data"]["result"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["value"][1].as_str().unwrap().parse().unwrap())
            .collect();
        if latest.len() == 2 && latest.iter().all(|t| *t > up_at + 2.0) {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "not caught up: {r}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // What cell-01 counted while the centre was down is there, at the time it happened.
    let during = requests_by_cell(&centre, Some(up_at - 1.0)).await;
    assert_eq!(during.get("cell-01").map(String::as_str), Some("6"), "{during:?}");
    assert_eq!(during.get("cell-02").map(String::as_str), Some("3"), "{during:?}");
    // No gap: every cell's scrapes, one a second, from before the outage to after it.
    let from = down_at - 5.0;
    let to = up_at + 2.0;
    let window = format!(r#"up{{job="vla-appliance"}}[{}s]"#, (to - from).ceil() as u64);
    let r = query_at(&centre, &window, Some(to)).await;
    let series = r["data"]["result"].as_array().unwrap();
    assert_eq!(series.len(), 2, "{r}");
    for s in series {
        let times: Vec<f64> = s["values"].as_array().unwrap().iter().map(|v| v[0].as_f64().unwrap()).collect();
        let cell = &s["metric"]["cell"];
        assert!(times[0] < down_at - 3.0 && *times.last().unwrap() > up_at, "{cell}: {times:?}");
        let gap = times.windows(2).map(|w| w[1] - w[0]).fold(0.0, f64::max);
        assert!(gap < 3.0, "{cell}: a {gap:.1} s gap in {times:?}");
    }
    drop(on_cell);
}
