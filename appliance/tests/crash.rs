//! Quota durability against a real crash: the real `appliance` binary, under load from
//! concurrent robots over HTTPS, killed with SIGKILL and started again on the same sled store.
//!
//! - `sync`: every acknowledged request's charge is on disk (persisted ≥ acknowledged), and a
//!   rate-limited robot's bucket comes back exactly as it was.
//! - `interval:<ms>`: what was acknowledged before the last window is on disk.
//! - A store with an unreadable quota record refuses to start, naming the recovery command,
//!   which then works.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::{ChildAppliance, appliance_binary};
use reqwest::{Method, StatusCode};
use serde_json::json;

fn write_config(data: &Path, durability: &str) -> PathBuf {
    let repo = data.join("models");
    common::add_model(&repo, "tiny-vla", appliance::demo::MODEL_TOML);
    let config = format!(
        r#"
[server]
listen = "127.0.0.1:0"
shutdown_grace_ms = 1000
[data]
dir = "{data}"
[models]
cpu_threads = 1
[auth]
demo_robot = false
[quota]
durability = "{durability}"
[quota.robots.load-1]
day = 1000000
[[policy.preload]]
name = "rate-limit"
world = "admission"
path = "{policy}"
order = 0
config = {{ robot = {{ rate = "100000/s" }} }}
"#,
        data = data.display(),
        policy = common::policy_path("rate-limit").display(),
    );
    let path = data.join("appliance.toml");
    std::fs::write(&path, config).unwrap();
    path
}

/// Acknowledged requests, with when each was acknowledged.
struct Load {
    sent: AtomicU64,
    acked: std::sync::Mutex<Vec<Instant>>,
    stop: AtomicBool,
}

/// Runs 8 robots' worth of concurrent requests (one identity, `load-1`) for `duration`, then
/// kills the appliance while they are in flight. Returns the load and when the kill happened.
async fn load_then_kill(app: ChildAppliance, key: String, duration: Duration) -> (Arc<Load>, Instant) {
    let load = Arc::new(Load { sent: AtomicU64::new(0), acked: Default::default(), stop: AtomicBool::new(false) });
    let pid = app.child.id();
    let app = Arc::new(app);
    let workers: Vec<_> = (0..8)
        .map(|_| {
            let (app, load, key) = (app.clone(), load.clone(), key.clone());
            tokio::spawn(async move {
                while !load.stop.load(Ordering::Relaxed) {
                    load.sent.fetch_add(1, Ordering::Relaxed);
                    match app.infer("load-1", &key).await {
                        Ok(r) if r.status() == StatusCode::OK => load.acked.lock().unwrap().push(Instant::now()),
                        Ok(r) => panic!("unexpected {}", r.status()),
                        Err(_) => break,
                    }
                }
            })
        })
        .collect();
    tokio::time::sleep(duration).await;
    // SIGKILL while requests are in flight (`Child::kill` would need the `Arc` back first).
    Command::new("kill").args(["-9", &pid.to_string()]).status().unwrap();
    let killed = Instant::now();
    load.stop.store(true, Ordering::Relaxed);
    for w in workers {
        let _ = w.await;
    }
    let mut app = Arc::try_unwrap(app).ok().unwrap();
    app.child.wait().unwrap();
    (load, killed)
}

#[tokio::test]
async fn sync_durability_keeps_every_acknowledged_charge_across_kill_9() {
    let data = tempfile::tempdir().unwrap();
    let config = write_config(data.path(), "sync");
    let app = ChildAppliance::start(&config, data.path());
    let key = app.register("load-1").await;

    // A robot limited to 10 per minute uses them up.
    let limited = app.register("limit-1").await;
    let r = app.admin(Method::PUT, "/admin/quotas/limit-1").json(&json!({"rate": "10/min"})).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    for _ in 0..10 {
        assert_eq!(app.infer("limit-1", &limited).await.unwrap().status(), StatusCode::OK);
    }
    assert_eq!(app.infer("limit-1", &limited).await.unwrap().status(), StatusCode::TOO_MANY_REQUESTS);
    let before = app.quota("limit-1").await;
    let rate_before = before.buckets.iter().find(|b| b.bucket == "rate").unwrap().clone();
    assert_eq!(rate_before.remaining, 0);

    let (load, killed) = load_then_kill(app, key, Duration::from_secs(3)).await;
    let acked = load.acked.lock().unwrap().len() as u64;
    let sent = load.sent.load(Ordering::Relaxed);
    assert!(acked > 20, "the load must have been served: {acked} acknowledged");

    let app = ChildAppliance::start(&config, data.path());
    let restarted = killed.elapsed();
    let used = app.quota("load-1").await.buckets.iter().find(|b| b.bucket == "day").unwrap().used;
    eprintln!("sync: sent {sent}, acknowledged {acked}, persisted {used}");
    assert!(used >= acked, "persisted {used} < acknowledged {acked}: an acknowledged charge was lost");
    assert!(used <= sent, "persisted {used} > sent {sent}");

    // The limited robot's bucket is exactly as it was: same point in time when it is full.
    let rate_after = app.quota("limit-1").await.buckets.into_iter().find(|b| b.bucket == "rate").unwrap();
    assert_eq!(rate_after.reset_unix_ms, rate_before.reset_unix_ms);
    assert!(rate_after.remaining <= (restarted.as_secs() / 6) + 1, "{rate_after:?} after {restarted:?}");
    app.kill();
}

#[tokio::test]
async fn interval_durability_loses_at_most_the_last_window_and_a_corrupt_store_refuses_to_start() {
    let data = tempfile::tempdir().unwrap();
    let config = write_config(data.path(), "interval:200");
    let app = ChildAppliance::start(&config, data.path());
    let key = app.register("load-1").await;
    let (load, killed) = load_then_kill(app, key, Duration::from_secs(4)).await;
    // The promise: a charge acknowledged more than one interval (plus a flush) before the
    // crash is on disk. One second covers the interval and a flush on a loaded machine.
    let cutoff = killed - Duration::from_millis(200 + 1000);
    let acked_before_window = load.acked.lock().unwrap().iter().filter(|t| **t < cutoff).count() as u64;
    let sent = load.sent.load(Ordering::Relaxed);
    assert!(acked_before_window > 10, "the load must have run past the window: {acked_before_window}");

    let app = ChildAppliance::start(&config, data.path());
    let used = app.quota("load-1").await.buckets.iter().find(|b| b.bucket == "day").unwrap().used;
    let acked = load.acked.lock().unwrap().len();
    eprintln!(
        "interval: sent {sent}, acknowledged {acked} ({acked_before_window} before the window), persisted {used}"
    );
    assert!(used >= acked_before_window, "persisted {used} < {acked_before_window} acknowledged before the window");
    assert!(used <= sent);
    app.kill();

    // An unreadable quota record: the appliance refuses to start and says how to recover.
    {
        let db = sled::Config::new().path(data.path().join("store")).open().unwrap();
        db.open_tree("quota_state").unwrap().insert(b"robot\0load-1\0rate", &b"\x07garbage"[..]).unwrap();
        db.flush().unwrap();
    }
    let out = appliance_binary(&config).output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("robot/load-1/rate") && stderr.contains("appliance quota reset"), "{stderr}");

    let out = appliance_binary(&config).args(["quota", "export"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("robot/load-1/rate"));
    let export = data.path().join("quota.json");
    std::fs::write(&export, &out.stdout).unwrap();
    let out = appliance_binary(&config).args(["quota", "reset", "--keep-limits"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = appliance_binary(&config).args(["quota", "import"]).arg(&export).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    // The readable usage came back; the unreadable record is gone.
    let app = ChildAppliance::start(&config, data.path());
    let day = app.quota("load-1").await.buckets.into_iter().find(|b| b.bucket == "day").unwrap();
    assert_eq!(day.used, used);
    app.kill();
}
