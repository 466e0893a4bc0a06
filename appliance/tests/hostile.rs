//! Hostile clients against the real `appliance` binary (README *Limits and isolation*): every
//! class of attack is refused or contained while a victim robot at 10 Hz keeps getting its
//! actions, and `/health` keeps answering. Attacks come from 127.0.0.2, the victim from
//! 127.0.0.1 (`vla-hostile`, shared with the bench's attack runs).
//!
//! No timings are asserted beyond "closed at all within a generous bound": the latency targets
//! are the bench's (`bench attacks`).

#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::ChildAppliance;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use vla_hostile::{ATTACKER, SteadyClient, Target, VICTIM, closed_within};

/// Tight bounds, so each attack shows its refusal in a second or two.
fn write_config(data: &Path) -> PathBuf {
    common::add_model(&data.join("models"), "tiny-vla", appliance::demo::MODEL_TOML);
    let config = format!(
        r#"
[server]
listen = "127.0.0.1:0"
shutdown_grace_ms = 1000
tls_handshake_timeout_ms = 1500
idle_timeout_ms = 2000
max_connections_per_peer = 40
[data]
dir = "{data}"
[models]
cpu_threads = 1
[auth]
demo_robot = false
[limits]
max_in_flight_per_robot = 4
[quota]
durability = "interval:100"
[policy]
audit_retention = 1000
audit_retention_per_robot = 50
[[policy.preload]]
name = "rate-limit"
world = "admission"
path = "{rate_limit}"
order = 0
config = {{ exempt_instructions = ["stop", "halt", "emergency stop"], robot = {{ rate = "100000/s" }} }}
[[policy.preload]]
name = "instruction-filter"
world = "admission"
path = "{filter}"
order = 10
config = {{ deny = ["disable safety"] }}
"#,
        data = data.display(),
        rate_limit = common::policy_path("rate-limit").display(),
        filter = common::policy_path("instruction-filter").display(),
    );
    let path = data.join("appliance.toml");
    std::fs::write(&path, config).unwrap();
    path
}

struct Cell {
    app: ChildAppliance,
    target: Target,
    victim_key: String,
}

impl Cell {
    async fn start(data: &Path) -> Cell {
        let config = write_config(data);
        let app = ChildAppliance::start(&config, data);
        let target = Target::new(app.addr, std::fs::read(data.join("tls/cert.pem")).unwrap()).unwrap();
        let victim_key = app.register("victim").await;
        Cell { app, target, victim_key }
    }

    async fn metrics(&self) -> String {
        self.app.admin(Method::GET, "/metrics").send().await.unwrap().text().await.unwrap()
    }

    async fn metric(&self, series: &str) -> f64 {
        let text = self.metrics().await;
        text.lines().find_map(|l| l.strip_prefix(series).map(|v| v.trim().parse().unwrap())).unwrap_or(0.0)
    }

    /// The victim robot at 10 Hz, its own connection, from 127.0.0.1.
    fn victim(&self) -> SteadyClient {
        let client = self.target.client(VICTIM);
        let (url, key) = (self.target.url("/v1/inference"), self.victim_key.clone());
        let body =
            vla_hostile::robot_request("victim", "pick up the red block", [0.1; 7], &vla_hostile::jpeg(320, 240, 1));
        SteadyClient::start(10.0, move || client.post(&url).header("x-api-key", &key).json(&body))
    }

    /// `/health` at 20 Hz from 127.0.0.1.
    fn health(&self) -> SteadyClient {
        let client = self.target.client(VICTIM);
        let url = self.target.url("/health");
        SteadyClient::start(20.0, move || client.get(&url))
    }

    async fn robot(&self, id: &str) -> String {
        self.app.register(id).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_attack_is_refused_or_contained_while_a_victim_robot_keeps_its_actions() {
    let data = tempfile::tempdir().unwrap();
    let cell = Cell::start(data.path()).await;
    let t = &cell.target;
    let attacker = t.client(ATTACKER);
    // The victim's own history, before any flood: one denial.
    let denied = vla_hostile::robot_request("victim", "disable safety", [0.1; 7], &vla_hostile::jpeg(8, 8, 0));
    let r = cell.target.client(VICTIM).post(t.url("/v1/inference")).header("x-api-key", &cell.victim_key).json(&denied);
    assert_eq!(r.send().await.unwrap().status(), StatusCode::UNPROCESSABLE_ENTITY);
    let victim = cell.victim();
    let health = cell.health();

    // 1. Made-up methods create no series: all count as `other` (after the first ones have
    //    made that series, three hundred more add nothing to /metrics but digits).
    let made_up = |from: usize, n: usize| {
        let (attacker, url) = (attacker.clone(), t.url("/v1/inference"));
        async move {
            for i in from..from + n {
                let method = Method::from_bytes(format!("XQ{i}").as_bytes()).unwrap();
                let _ = attacker.request(method, &url).send().await;
            }
        }
    };
    made_up(0, 20).await;
    // The first scrape and the victim's first answers make series of their own.
    tokio::time::sleep(Duration::from_millis(500)).await;
    cell.metrics().await;
    let before = cell.metrics().await.len();
    made_up(20, 300).await;
    let text = cell.metrics().await;
    assert!(text.contains(r#"method="other""#), "made-up methods count as other");
    assert!(!text.contains(r#"method="XQ1""#));
    assert!(text.len() < before + 512, "/metrics grew from {before} to {} bytes", text.len());

    // 2. Connections that say nothing, or half an HTTP/2 preface, or only PINGs, are closed
    //    once the first-request bound (1.5 s, TLS included) passes.
    let mut silent = Vec::new();
    for _ in 0..10 {
        silent.push(t.tcp(ATTACKER).await.unwrap());
    }
    let mut half = Vec::new();
    for _ in 0..5 {
        half.push(t.half_preface(ATTACKER).await.unwrap());
    }
    let mut pinging = t.ping_only(ATTACKER).await.unwrap();
    for s in &mut silent {
        assert!(closed_within(s, Duration::from_secs(10), false).await.is_some(), "a silent connection stayed open");
    }
    for s in &mut half {
        assert!(closed_within(s, Duration::from_secs(10), false).await.is_some(), "half a preface stayed open");
    }
    assert!(
        closed_within(&mut pinging, Duration::from_secs(10), true).await.is_some(),
        "a PING-only connection stayed open"
    );
    let closed = cell.metric(r#"vla_http_connections_closed_total{reason="first_request_timeout"}"#).await;
    assert!(closed >= 16.0, "{closed} connections closed for their first request's bound");

    // 3. A connection that asked once and then idles is closed after the idle bound (2 s).
    let idle = t.client(ATTACKER);
    assert_eq!(idle.get(t.url("/health")).send().await.unwrap().status(), StatusCode::OK);
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(cell.metric(r#"vla_http_connections_closed_total{reason="idle"}"#).await >= 1.0);
    drop(idle);

    // 4. More connections from one address than its share are closed at once.
    let (many, refused) = vla_hostile::connection_flood(t, ATTACKER, 60).await;
    assert!(refused >= 20, "{refused} of 60 connections were refused; the share is 40");
    assert!(cell.metric(r#"vla_http_connections_refused_total{reason="max_connections_per_peer"}"#).await >= 20.0);
    drop(many);

    // 5. Requests refused for missing credentials are answered without reading their bodies.
    let started = Instant::now();
    let huge = vec![b'A'; 7 * 1024 * 1024];
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (client, url, body) = (t.client(ATTACKER), t.url("/v1/inference"), huge.clone());
        tasks.push(tokio::spawn(async move { client.post(url).body(body).send().await.map(|r| r.status()) }));
    }
    for task in tasks {
        // A 401, or the connection cut while the client was still sending: never a 200 or 413.
        if let Ok(status) = task.await.unwrap() {
            assert_eq!(status, StatusCode::UNAUTHORIZED);
        }
    }
    assert!(started.elapsed() < Duration::from_secs(8), "refused bodies were read: {:?}", started.elapsed());

    // 6. With a robot's key: 8 MiB JSON bodies (parsed off the async workers) and OIP requests
    //    with large frames from a robot over its quota (refused before any decoding).
    let flood_key = cell.robot("flood").await;
    let big = vla_hostile::big_json(8 * 1024 * 1024 - 4096);
    let (client, url, key) = (t.client(ATTACKER), t.url("/v1/inference"), flood_key.clone());
    let big_bodies = vla_hostile::flood(4, Duration::from_secs(3), move || {
        client.post(&url).header("x-api-key", &key).header("content-type", "application/json").body(big.clone())
    })
    .await;
    assert_eq!(big_bodies.get("200"), 0, "{big_bodies}");
    let spent_key = cell.robot("spent").await;
    let r = cell.app.admin(Method::PUT, "/admin/quotas/spent").json(&json!({"day": 0})).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let (body, len) = vla_hostile::oip_frames(8, &vla_hostile::jpeg(1600, 1200, 3), 0);
    let (client, url, key) = (t.client(ATTACKER), t.url("/v2/models/tiny-vla/infer"), spent_key.clone());
    let oip = vla_hostile::flood(4, Duration::from_secs(3), move || {
        client.post(&url).header("x-api-key", &key).header("inference-header-content-length", len).body(body.clone())
    })
    .await;
    assert!(oip.total() > 0 && oip.get("429 rate_limited") == oip.total(), "{oip}");

    // 7. Repeated OIP outputs are refused; the answer cannot be multiplied.
    let (body, len) = vla_hostile::oip_frames(1, &vla_hostile::jpeg(64, 48, 1), 10);
    let r = t
        .client(ATTACKER)
        .post(t.url("/v2/models/tiny-vla/infer"))
        .header("x-api-key", &flood_key)
        .header("inference-header-content-length", len)
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert_eq!(r.json::<Value>().await.unwrap()["code"], "invalid_field");

    // 8. A robot denied thousands of times cannot evict the others' audit history: its
    //    identical denials fold into a few records.
    let denier = cell.robot("denier").await;
    let denied = vla_hostile::robot_request("denier", "disable safety", [0.1; 7], &vla_hostile::jpeg(8, 8, 0));
    let (client, url) = (t.client(ATTACKER), t.url("/v1/inference"));
    let denials = vla_hostile::flood(4, Duration::from_secs(3), move || {
        client.post(&url).header("x-api-key", &denier).json(&denied)
    })
    .await;
    let n = denials.get("422 policy_rejected");
    assert!(n > 100, "{denials}");
    let log: vla_api::AuditList = cell
        .app
        .admin(Method::GET, "/admin/audit?robot_id=denier&limit=1000")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(log.records.len() <= 50, "{} records for one robot", log.records.len());
    assert_eq!(log.records.iter().map(|r| r.count).sum::<u64>(), n);
    let mine: vla_api::AuditList =
        cell.app.admin(Method::GET, "/admin/audit?robot_id=victim").send().await.unwrap().json().await.unwrap();
    assert_eq!(mine.records.len(), 1, "the victim's own record survived the flood");

    // 9. An instruction that merely starts like a stop is charged and refused at quota 0; a
    //    whole stop gets through.
    let r = t
        .client(ATTACKER)
        .post(t.url("/v1/inference"))
        .header("x-api-key", &spent_key)
        .json(&vla_hostile::robot_request(
            "spent",
            "stop and pick up the red block",
            [0.0; 7],
            &vla_hostile::jpeg(8, 8, 0),
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    let r = t
        .client(ATTACKER)
        .post(t.url("/v1/inference"))
        .header("x-api-key", &spent_key)
        .json(&vla_hostile::robot_request("spent", "Stop", [0.0; 7], &vla_hostile::jpeg(8, 8, 0)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);

    // 10. Extreme but finite state drives the model to non-finite output: the host refuses it,
    //     audits it, and the audit log still reads.
    let r = t
        .client(ATTACKER)
        .post(t.url("/v1/inference"))
        .header("x-api-key", &flood_key)
        .json(&vla_hostile::robot_request("flood", "pick", [3.0e38; 7], &vla_hostile::jpeg(8, 8, 0)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::INTERNAL_SERVER_ERROR);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["code"], "inference_failed");
    assert!(body["error"].as_str().unwrap().contains("non-finite"), "{body}");
    let r = cell.app.admin(Method::GET, "/admin/audit?robot_id=flood").send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let log: vla_api::AuditList = r.json().await.unwrap();
    assert!(log.records.iter().any(|r| r.policy == "(host)" && r.code.as_deref() == Some("non_finite_output")));
    assert!(
        cell.metric(r#"vla_model_output_rejected_total{model="tiny-vla",problem="non_finite_output"}"#).await >= 1.0
    );

    // 11. One robot's requests in flight are bounded (4 here): the rest are refused at once.
    let request = vla_hostile::robot_request("flood", "pick", [0.1; 7], &vla_hostile::jpeg(640, 480, 2));
    let (client, url) = (t.client(ATTACKER), t.url("/v1/inference"));
    let bounded = vla_hostile::flood(16, Duration::from_secs(2), move || {
        client.post(&url).header("x-api-key", &flood_key).json(&request)
    })
    .await;
    assert!(bounded.get("429 too_many_in_flight") > 0 && bounded.get("200") > 0, "{bounded}");

    // Throughout: the victim got every action, and /health always answered.
    let victim = victim.finish().await;
    let health = health.finish().await;
    eprintln!(
        "victim: {} ({} ok, p50 {:?}, p99 {:?}); /health: p99 {:?}",
        victim.tally,
        victim.ok(),
        victim.quantile(0.5),
        victim.quantile(0.99),
        health.quantile(0.99)
    );
    assert!(victim.ok() > 100, "{}", victim.tally);
    assert_eq!(victim.failures(), 0, "the victim was refused: {}", victim.tally);
    assert_eq!(health.failures(), 0, "/health failed: {}", health.tally);
    cell.app.kill();
}

/// `prlimit` (util-linux) sets the child's file-size limit from outside.
fn prlimit(pid: u32, fsize: &str) {
    let status = std::process::Command::new("prlimit")
        .args(["--pid", &pid.to_string(), &format!("--fsize={fsize}")])
        .status()
        .unwrap();
    assert!(status.success(), "prlimit --fsize={fsize}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_cannot_write_fails_closed_says_so_and_recovers_without_a_restart() {
    let data = tempfile::tempdir().unwrap();
    let config = write_config(data.path());
    let toml =
        std::fs::read_to_string(&config).unwrap().replace(r#"durability = "interval:100""#, r#"durability = "sync""#);
    std::fs::write(&config, toml).unwrap();
    let app = ChildAppliance::start(&config, data.path());
    let key = app.register("arm-1").await;
    assert_eq!(app.infer("arm-1", &key).await.unwrap().status(), StatusCode::OK);
    let health = |app: &ChildAppliance| {
        let r = app.admin(Method::GET, "/health/detailed");
        async move { r.send().await.unwrap().json::<Value>().await.unwrap() }
    };
    assert_eq!(health(&app).await["components"]["store"]["status"], "ok");

    // The store's files may not grow any more: sled's next write fails.
    let largest = std::fs::read_dir(data.path().join("store"))
        .unwrap()
        .flatten()
        .map(|e| e.metadata().unwrap().len())
        .max()
        .unwrap();
    prlimit(app.child.id(), &format!("{}:unlimited", largest + 4096));
    let mut refused = None;
    for _ in 0..200 {
        let r = app.infer("arm-1", &key).await.unwrap();
        if r.status() != StatusCode::OK {
            refused = Some((r.status(), r.json::<Value>().await.unwrap()));
            break;
        }
    }
    let (status, body) = refused.expect("a charge that cannot be written is refused");
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["code"], "quota_unavailable", "sync quotas fail closed: {body}");
    let detailed = health(&app).await;
    assert_eq!(detailed["components"]["store"]["status"], "failing", "{detailed}");
    let metrics = app.admin(Method::GET, "/metrics").send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains(r#"vla_application_health{component="store"} 0"#));

    // Writes may succeed again: the store is reopened within seconds, no restart.
    prlimit(app.child.id(), "unlimited:unlimited");
    let started = Instant::now();
    loop {
        if health(&app).await["components"]["store"]["status"] == "ok"
            && app.infer("arm-1", &key).await.unwrap().status() == StatusCode::OK
        {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "the store did not recover: {}", health(&app).await);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let detailed = health(&app).await;
    assert!(detailed["components"]["store"]["reopened_after_faults"].as_u64().unwrap() >= 1, "{detailed}");
    // What was acknowledged before the fault is still there.
    let robots: vla_api::RobotList =
        app.admin(Method::GET, "/admin/robots").send().await.unwrap().json().await.unwrap();
    assert!(robots.robots.iter().any(|r| r.robot_id == "arm-1"));
    app.kill();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_bodies_time_out_and_the_global_caps_refuse_cheaply_then_give_their_places_back() {
    let data = tempfile::tempdir().unwrap();
    let config = write_config(data.path());
    let toml = std::fs::read_to_string(&config).unwrap().replace(
        "max_connections_per_peer = 40",
        "max_connections_per_peer = 40\nmax_connections = 30\nmax_in_flight = 4\nread_timeout_ms = 1500",
    );
    std::fs::write(&config, toml).unwrap();
    let app = ChildAppliance::start(&config, data.path());
    let t = Target::new(app.addr, std::fs::read(data.path().join("tls/cert.pem")).unwrap()).unwrap();
    let key = app.register("arm-1").await;
    let token = std::fs::read_to_string(data.path().join("admin.token")).unwrap().trim().to_string();
    let host = "Host: localhost";

    // 1. An admin JSON body and a policy upload (multipart) that stop half-way: 408
    //    `request_timeout` once the read timeout (1.5 s) passes.
    let admin = format!(
        "POST /admin/robots HTTP/1.1\r\n{host}\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nContent-Length: 100"
    );
    let upload = format!(
        "POST /admin/policies HTTP/1.1\r\n{host}\r\nAuthorization: Bearer {token}\r\nContent-Type: multipart/form-data; boundary=XX\r\nContent-Length: 100000"
    );
    let part = b"--XX\r\nContent-Disposition: form-data; name=\"component\"; filename=\"p.wasm\"\r\n\r\n\0asm";
    for (head, sent) in [(admin, &b"{\"robot_id\":"[..]), (upload, &part[..])] {
        let started = Instant::now();
        let mut stalled = t.stalled_body(ATTACKER, &head, sent).await.unwrap();
        let (status, text) =
            vla_hostile::response_status(&mut stalled, Duration::from_secs(10)).await.expect("an answer");
        assert_eq!(status, 408, "{text}");
        assert!(text.contains("request_timeout"), "{text}");
        assert!(started.elapsed() >= Duration::from_millis(1400), "answered in {:?}", started.elapsed());
    }

    // 2. Requests in flight are capped in all (4): four stalled robot requests hold the places,
    //    a fifth request, whoever sends it, gets 503 `overloaded` at once; once the stalled
    //    ones have timed out, requests are served again.
    let stalled_infer = format!(
        "POST /v1/inference HTTP/1.1\r\n{host}\r\nX-API-Key: {key}\r\nContent-Type: application/json\r\nContent-Length: 5000"
    );
    let mut stalled = Vec::new();
    for _ in 0..4 {
        stalled.push(t.stalled_body(ATTACKER, &stalled_infer, b"{\"robot_id\":").await.unwrap());
    }
    // Once the four heads are in (within the read timeout, before their 408s), the fifth is
    // refused, at once.
    let waiting = Instant::now();
    let (r, took) = loop {
        let started = Instant::now();
        let r = app.infer("arm-1", &key).await.unwrap();
        if r.status() == StatusCode::SERVICE_UNAVAILABLE {
            break (r, started.elapsed());
        }
        assert!(waiting.elapsed() < Duration::from_millis(1400), "never refused while four requests were held");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(r.json::<Value>().await.unwrap()["code"], "overloaded");
    assert!(took < Duration::from_secs(1), "refused in {took:?}");
    for s in &mut stalled {
        let (status, text) = vla_hostile::response_status(s, Duration::from_secs(10)).await.expect("an answer");
        assert_eq!(status, 408, "{text}");
    }
    drop(stalled);
    assert_eq!(app.infer("arm-1", &key).await.unwrap().status(), StatusCode::OK);

    // 3. Open connections are capped in all (30, under the per-peer share of 40): the ones over
    //    it are closed at accept, counted, and the places come back once they are gone.
    let (many, refused) = vla_hostile::connection_flood(&t, ATTACKER, 40).await;
    assert!(refused >= 10, "{refused} of 40 connections were refused; the cap is 30");
    drop(many);
    let metrics = app.admin(Method::GET, "/metrics").send().await.unwrap().text().await.unwrap();
    let counted = metrics
        .lines()
        .find_map(|l| l.strip_prefix(r#"vla_http_connections_refused_total{reason="max_connections"} "#))
        .map_or(0.0, |v| v.trim().parse::<f64>().unwrap());
    assert!(counted >= 10.0, "{counted} refusals counted");
    // Their places come back once they are closed: a new connection is served.
    let started = Instant::now();
    loop {
        let fresh = t.client(VICTIM);
        if fresh.get(t.url("/health")).send().await.is_ok_and(|r| r.status() == StatusCode::OK) {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "no connection was served after the flood");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    app.kill();
}
