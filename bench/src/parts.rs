//! Component benchmarks with their own distributions (p50/p99/p99.9 per call), for the
//! targets of the policy, quota and metrics work: `bench policy`, `bench quota`,
//! `bench metrics`. Each prints a markdown table with the date and machine and returns the
//! figures as JSON. (Criterion's `benches/micro.rs` times the same pieces for regressions.)

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::json;

use crate::fixtures;
use crate::machine::now_utc;

/// The CPU and its cores, for the tables' headings.
fn machine() -> String {
    let m = crate::machine::Machine::read(String::new());
    format!("{}, {} cores", m.cpu, m.cores)
}

/// Per-call latency of the shipped policies: every call instantiates the component from its
/// `InstancePre` in a fresh store with all limits set, calls it and checks nothing else (the
/// host's decision checks are microseconds of plain Rust). One thread, as one request's chain
/// runs.
pub fn policy(calls: usize, dist: &Path) -> anyhow::Result<serde_json::Value> {
    use appliance::policy::World;
    use appliance::policy::bindings::{Action, ActionKind};
    use appliance::policy::runtime::{Input, Runtime};

    let config = appliance::config::PolicyConfig::default();
    let cache = tempfile::tempdir()?;
    let runtime = Runtime::new(&config, cache.path()).map_err(anyhow::Error::msg)?;
    let ctx = fixtures::policy_context();
    let velocity = |values: Vec<f32>| Action { kind: ActionKind::JointVelocity, dof: 7, horizon: 1, values };
    let ee = Action {
        kind: ActionKind::EndEffectorDelta,
        dof: 7,
        horizon: 1,
        values: vec![0.01, -0.02, 0.01, 0.0, 0.0, 0.0, 1.0],
    };
    let limits = r#"{"robot_types": {"demo": {"velocity": 0.25}}, "default": {"velocity": 0.5, "position": {"min": -3.1, "max": 3.1}}}"#;
    let bounds = r#"{"min": [-0.5, -0.5, 0.0], "max": [0.5, 0.5, 0.8]}"#;
    let filter = r#"{"deny": ["disable safety", "ignore * limits"]}"#;
    let cases: Vec<(&str, &str, World, &str, Option<Action>)> = vec![
        ("joint-limits", "allow (within limits)", World::Safety, limits, Some(velocity(vec![0.1; 7]))),
        (
            "joint-limits",
            "modify (clamps 3 of 7)",
            World::Safety,
            limits,
            Some(velocity(vec![0.3, -0.4, 0.1, 0.27, 0.0, 0.1, 0.2])),
        ),
        ("workspace-bounds", "allow (inside the box)", World::Safety, bounds, Some(ee)),
        ("instruction-filter", "allow (no pattern matches)", World::Admission, filter, None),
    ];

    println!("## Policy call, instantiation included ({}; {})\n", machine(), now_utc());
    println!("| policy | case | p50 µs | p99 µs | p99.9 µs | mean µs | calls |");
    println!("|---|---|---:|---:|---:|---:|---:|");
    let mut rows = Vec::new();
    for (name, case, world, config, action) in cases {
        let path = dist.join(format!("{name}.wasm"));
        let bytes = std::fs::read(&path).with_context(|| format!("{} (run policies/build.sh)", path.display()))?;
        let compiled = runtime.compile(&bytes, world).map_err(anyhow::Error::msg)?;
        let policy_name: Arc<str> = name.into();
        let config: Arc<str> = config.into();
        let input = match &action {
            Some(a) => Input::Evaluate(&ctx, a),
            None => Input::Admit(&ctx),
        };
        let call = || runtime.call(&compiled, &policy_name, &config, input).map_err(|f| anyhow::anyhow!("{name}: {f}"));
        for _ in 0..1000 {
            call()?;
        }
        let mut times = Vec::with_capacity(calls);
        for _ in 0..calls {
            let t = Instant::now();
            call()?;
            times.push(t.elapsed().as_secs_f64() * 1e6);
        }
        times.sort_by(f64::total_cmp);
        let at = |q: f64| times[((times.len() as f64 * q) as usize).min(times.len() - 1)];
        let mean = times.iter().sum::<f64>() / times.len() as f64;
        println!("| {name} | {case} | {:.1} | {:.1} | {:.1} | {mean:.1} | {calls} |", at(0.5), at(0.99), at(0.999));
        rows.push(json!({"policy": name, "case": case, "p50_us": at(0.5), "p99_us": at(0.99), "p999_us": at(0.999), "mean_us": mean, "calls": calls}));
    }
    Ok(json!({"benchmark": "policy", "machine": machine(), "date": now_utc(), "rows": rows}))
}

/// Quota decisions as requests make them: each robot (a task on a 2-worker runtime, as the
/// server's) charges its own and its group's buckets in the real sled store, then, in `sync`
/// mode, waits until the charge is on disk (group commit). Latency is per decision, wait
/// included; robots share 4 groups.
pub fn quota(concurrency: &[usize], seconds: f64, dist: &Path) -> anyhow::Result<serde_json::Value> {
    use appliance::quota::{Limits, Quotas, Rate, Scope, Session};

    let unlimited = Limits {
        rate: Some(Rate { requests: 1_000_000_000, period_ms: 1_000, burst: 1_000_000_000 }),
        day: Some(u64::MAX / 2),
        month: None,
    };
    println!("## Quota decisions, robot + group charged ({}; {})\n", machine(), now_utc());
    println!("| durability | robots | decisions/s | p50 µs | p99 µs | p99.9 µs | flushes/s |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    let mut rows = Vec::new();
    for durability in ["interval:100", "sync"] {
        for &robots in concurrency {
            let dir = tempfile::tempdir()?;
            let store = Arc::new(appliance::store::Store::open(dir.path())?);
            let config = appliance::config::QuotaConfig {
                durability: durability.into(),
                ..appliance::config::QuotaConfig::default()
            };
            let quotas = Arc::new(Quotas::open(store.clone(), &config)?);
            let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
            let flushes_before = quotas.flushes();
            let started = Instant::now();
            let until = started + Duration::from_secs_f64(seconds);
            let mut times: Vec<f64> = runtime.block_on(async {
                let tasks: Vec<_> = (0..robots)
                    .map(|i| {
                        let quotas = quotas.clone();
                        tokio::spawn(async move {
                            let (robot, group) = (format!("robot-{i}"), format!("group-{}", i % 4));
                            let mut times = Vec::new();
                            while Instant::now() < until {
                                let t = Instant::now();
                                let now = appliance::clock::now_ms();
                                let mut seq = 0;
                                for (scope, key) in [(Scope::Robot, &robot), (Scope::Group, &group)] {
                                    let consumed = quotas.try_consume(scope, key, unlimited, 1, true, now);
                                    seq = seq.max(consumed.map_err(|s| anyhow::anyhow!("refused: {s:?}"))?.seq);
                                }
                                quotas.persisted(seq).await?;
                                times.push(t.elapsed().as_secs_f64() * 1e6);
                            }
                            anyhow::Ok(times)
                        })
                    })
                    .collect();
                let mut all = Vec::new();
                for t in tasks {
                    all.extend(t.await??);
                }
                anyhow::Ok(all)
            })?;
            let elapsed = started.elapsed().as_secs_f64();
            let flushes = (quotas.flushes() - flushes_before) as f64 / elapsed;
            times.sort_by(f64::total_cmp);
            let at = |q: f64| times[((times.len() as f64 * q) as usize).min(times.len() - 1)];
            let rate = times.len() as f64 / elapsed;
            println!(
                "| {durability} | {robots} | {rate:.0} | {:.1} | {:.1} | {:.1} | {flushes:.0} |",
                at(0.5),
                at(0.99),
                at(0.999)
            );
            rows.push(json!({"durability": durability, "robots": robots, "decisions_per_s": rate, "p50_us": at(0.5), "p99_us": at(0.99), "p999_us": at(0.999), "flushes_per_s": flushes}));
        }
    }

    // The rate-limit policy's whole call: instantiation, its config parsed, two charges.
    use appliance::policy::World;
    use appliance::policy::runtime::{Input, Runtime};
    let dir = tempfile::tempdir()?;
    let store = Arc::new(appliance::store::Store::open(dir.path())?);
    let config = appliance::config::QuotaConfig { durability: "interval:100".into(), ..Default::default() };
    let quotas = Arc::new(Quotas::open(store.clone(), &config)?);
    let runtime = Runtime::new(&appliance::config::PolicyConfig::default(), dir.path()).map_err(anyhow::Error::msg)?;
    let keeper = tokio::runtime::Builder::new_current_thread().build()?;
    let path = dist.join("rate-limit.wasm");
    let bytes = std::fs::read(&path).with_context(|| format!("{} (run policies/build.sh)", path.display()))?;
    let compiled = runtime.compile(&bytes, World::Admission).map_err(anyhow::Error::msg)?;
    let ctx = fixtures::policy_context();
    let (name, cfg): (Arc<str>, Arc<str>) = (
        "rate-limit".into(),
        r#"{"exempt_instructions": ["stop", "halt"], "robot": {"rate": "1000000/s"}, "group": {"rate": "1000000/s", "day": 1000000000}}"#.into(),
    );
    let mut times = Vec::new();
    for i in 0..21_000 {
        let session = Session::new(quotas.clone(), "arm-1", "line-a", appliance::clock::now_ms());
        let t = Instant::now();
        let (decision, session) = runtime.call_with(&compiled, &name, &cfg, Input::Admit(&ctx), Some(session));
        let elapsed = t.elapsed().as_secs_f64() * 1e6;
        decision.map_err(|f| anyhow::anyhow!("rate-limit: {f}"))?;
        // Keep the charges (dropping them unkept would give them back, timed outside).
        if let Some(charged) = session.and_then(Session::finish) {
            keeper.block_on(charged.keep())?;
        }
        if i >= 1_000 {
            times.push(elapsed);
        }
    }
    times.sort_by(f64::total_cmp);
    let at = |q: f64| times[((times.len() as f64 * q) as usize).min(times.len() - 1)];
    println!(
        "\nrate-limit policy call (instantiation, 2 charges, interval mode): p50 {:.1} µs, p99 {:.1} µs",
        at(0.5),
        at(0.99)
    );
    Ok(json!({"benchmark": "quota", "machine": machine(), "date": now_utc(), "rows": rows,
              "rate_limit_policy_call": {"p50_us": at(0.5), "p99_us": at(0.99), "calls": times.len()}}))
}

/// What one request records, as the appliance does it: the request counter and latency, the
/// HTTP counter and latency, four policy calls and the chain outcome, and its share of a batch
/// of 8 (queue wait, forward, batch size and wait). Then `/metrics` rendered from a registry
/// holding 3 models, 50 robots (5 types) and their quota series.
pub fn metrics(requests: usize) -> anyhow::Result<serde_json::Value> {
    use appliance::metrics::{Family, Metrics};

    let m = Arc::new(Metrics::new());
    let models = ["tiny-vla", "pick-place-v2", "mobile-nav"];
    let policies = ["rate-limit", "instruction-filter", "joint-limits", "workspace-bounds"];
    let per_model: Vec<_> = models.iter().map(|name| m.for_model(name)).collect();
    let policy_duration: Vec<_> = policies.iter().map(|p| m.safety_duration.with_label_values(&[p])).collect();
    let record = |i: usize| {
        let model = &per_model[i % 3];
        let d = Duration::from_micros(3_000 + (i % 5_000) as u64);
        m.request(models[i % 3], ["ur5e", "franka", "demo", "mobile", "scara"][i % 5], "success");
        model.duration.observe(d.as_secs_f64());
        m.http("POST", "/v1/inference", 200, d, None);
        for h in &policy_duration {
            h.observe(0.00004);
        }
        m.cached(Family::SafetyChecks, &["allow"]).inc();
        model.queue_wait.observe(0.002);
        model.image_decode.observe(0.0008);
        if i.is_multiple_of(8) {
            model.compute.observe(0.009);
            model.batch_size.observe(8.0);
            model.batch_wait.observe(0.002);
        }
    };
    println!("## Metrics ({}; {})\n", machine(), now_utc());
    println!("| threads | ns per request recorded | requests |");
    println!("|---:|---:|---:|");
    let mut rows = Vec::new();
    for threads in [1usize, 2] {
        let started = Instant::now();
        std::thread::scope(|s| {
            for t in 0..threads {
                s.spawn(move || {
                    for i in 0..requests {
                        record(i + t);
                    }
                });
            }
        });
        let ns = started.elapsed().as_nanos() as f64 / requests as f64;
        println!("| {threads} | {ns:.0} | {requests} |");
        rows.push(json!({"threads": threads, "ns_per_request": ns, "requests": requests}));
    }
    // 50 robots' series, as the scrape refreshes them, plus error codes and routes.
    for r in 0..50 {
        let id = format!("arm-{r:02}");
        m.rate_limit_remaining.with_label_values(&[&id, "rate"]).set(40);
        m.rate_limit_remaining.with_label_values(&[&id, "day"]).set(900);
        m.quota_usage.with_label_values(&[&id, "day"]).set(10.0);
        m.cached(Family::RateLimitHits, &[&id, "rate"]).inc();
        for status in ["success", "rate_limited", "rejected", "invalid", "error"] {
            m.request(models[r % 3], ["ur5e", "franka", "demo", "mobile", "scara"][r % 5], status);
        }
    }
    for (model, name) in per_model.iter().zip(models) {
        m.queue_depth.with_label_values(&[name]).set(3);
        m.queue_capacity.with_label_values(&[name]).set(256);
        m.model_info.with_label_values(&[name, "1", "cpu"]).set(1);
        model.in_flight.set(0);
    }
    let mut times = Vec::new();
    let mut bytes = 0;
    for _ in 0..300 {
        let t = Instant::now();
        bytes = m.render().map_err(anyhow::Error::msg)?.len();
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    let at = |q: f64| times[((times.len() as f64 * q) as usize).min(times.len() - 1)];
    println!("\n/metrics render (3 models, 50 robots, {bytes} bytes): p50 {:.2} ms, p99 {:.2} ms", at(0.5), at(0.99));
    Ok(json!({"benchmark": "metrics", "machine": machine(), "date": now_utc(), "rows": rows,
              "render": {"p50_ms": at(0.5), "p99_ms": at(0.99), "bytes": bytes}}))
}
