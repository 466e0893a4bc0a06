//! `bench`: measures the demo model and the appliance on this machine.
//!
//! - `bench curve` — the model's own limit: `tiny-vla`'s forward alone at each batch size,
//!   in-process through libtorch (warmed up and timed on the same thread).
//! - `bench batching` — the appliance itself, started in-process on 127.0.0.1 with real TLS,
//!   driven by N concurrent robots in a closed loop over HTTPS, once with batching on and once
//!   with it off; reports throughput, latency percentiles and the mean batch size the
//!   appliance reported.
//! - `bench policy` — one policy call (fresh instance included) for each shipped policy, through
//!   the appliance's sandbox; p50/p99/p99.9 per call (target: p99 under 100 µs).
//!
//! All print a markdown table with the date and machine; `--json FILE` also writes the figures.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use appliance::model::{LoadedModel, TensorData};
use appliance::spec::ModelSpec;
use base64::Engine;
use clap::{Parser, Subcommand};
use serde_json::json;
use vla_api::{InferenceRequest, InferenceResponse};

#[derive(Debug, Parser)]
#[command(about = "Benchmarks of the appliance on this machine")]
struct Args {
    #[command(subcommand)]
    command: Command,
    /// Also write the figures as JSON to this file.
    #[arg(long, global = true)]
    json: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Forward time of the demo model at each batch size, without the server.
    Curve {
        #[arg(long, value_delimiter = ',', default_value = "1,2,4,8,16,32")]
        batch_sizes: Vec<usize>,
        /// Minimum time measured per batch size.
        #[arg(long, default_value = "2")]
        seconds: f64,
        /// libtorch intra-op threads (0: libtorch's default, one per core).
        #[arg(long, default_value = "0")]
        threads: usize,
        /// `auto` (CUDA when usable), `cpu` or `cuda:N`.
        #[arg(long, default_value = "cpu")]
        device: String,
    },
    /// The appliance under concurrent robots, batching on vs off.
    Batching {
        #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
        concurrency: Vec<usize>,
        /// Seconds of load per point.
        #[arg(long, default_value = "10")]
        seconds: f64,
        /// Camera image size sent by each robot, WIDTHxHEIGHT (JPEG).
        #[arg(long, default_value = "320x240")]
        image: String,
        /// Serve without the default policies (for an A/B of their cost).
        #[arg(long)]
        no_policies: bool,
    },
    /// One policy call (fresh instance included) for each shipped policy, through the
    /// appliance's sandbox; p50/p99 per call.
    Policy {
        /// Calls timed per case (after 1000 warm-up calls).
        #[arg(long, default_value = "20000")]
        calls: usize,
        /// Where the built components are (policies/build.sh).
        #[arg(long, default_value = "policies/dist")]
        dist: PathBuf,
    },
    /// The cost of instrumentation on the request path, and of rendering `/metrics` with 50
    /// robots and 3 models.
    Metrics {
        /// Requests recorded per thread.
        #[arg(long, default_value = "1000000")]
        requests: usize,
    },
    /// Quota decisions (charge the robot's and its group's buckets, as the rate-limit policy
    /// does) in both durability modes with 1, 8 and 64 concurrent robots, and the rate-limit
    /// policy's whole call.
    Quota {
        #[arg(long, value_delimiter = ',', default_value = "1,8,64")]
        concurrency: Vec<usize>,
        /// Seconds of load per point.
        #[arg(long, default_value = "3")]
        seconds: f64,
        #[arg(long, default_value = "policies/dist")]
        dist: PathBuf,
    },
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let report = match args.command {
        Command::Curve { batch_sizes, seconds, threads, device } => curve(&batch_sizes, seconds, threads, &device)?,
        Command::Batching { concurrency, seconds, image, no_policies } => {
            batching(&concurrency, seconds, &image, no_policies)?
        }
        Command::Policy { calls, dist } => policy(calls, &dist)?,
        Command::Quota { concurrency, seconds, dist } => quota(&concurrency, seconds, &dist)?,
        Command::Metrics { requests } => metrics(requests)?,
    };
    if let Some(path) = args.json {
        std::fs::write(&path, serde_json::to_string_pretty(&report)?).with_context(|| format!("{}", path.display()))?;
    }
    Ok(())
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!("{cpu}, {cores} cores")
}

fn now_utc() -> String {
    let out = std::process::Command::new("date").args(["-u", "+%Y-%m-%d %H:%M UTC"]).output();
    out.ok().map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string()).unwrap_or_default()
}

/// Generates the demo model into `dir` and returns its directory.
fn demo_model(dir: &Path) -> anyhow::Result<PathBuf> {
    appliance::demo::generate(dir)?;
    Ok(dir.join(appliance::demo::NAME))
}

fn curve(batch_sizes: &[usize], seconds: f64, threads: usize, device: &str) -> anyhow::Result<serde_json::Value> {
    let device_spec: appliance::spec::DeviceSpec = device.parse().map_err(anyhow::Error::msg)?;
    let device = appliance::model::resolve_device(device_spec)?;
    let tmp = tempfile::tempdir()?;
    let dir = demo_model(tmp.path())?;
    let spec = ModelSpec::load(&dir)?;
    if threads > 0 {
        tch::set_num_threads(threads as i32);
    }
    let model = LoadedModel::load(&dir, &spec, device)?;
    let pos = spec.robot_inputs();
    let mut sample = vec![TensorData::F32(Vec::new()); spec.inputs.len()];
    sample[pos.image] = TensorData::F32((0..3 * 224 * 224).map(|i| ((i % 255) as f32 / 255.0) - 0.5).collect());
    sample[pos.instruction] = TensorData::I64(appliance::preprocess::instruction_tokens("pick up the red block", 32));
    sample[pos.state] = TensorData::F32(vec![0.1; spec.state_dim()]);

    let device = appliance::model::device_name(device);
    println!("## tiny-vla forward alone on {device} ({}; {})\n", machine(), now_utc());
    println!("| batch | ms / forward (median) | ms / sample | samples/s |");
    println!("|---:|---:|---:|---:|");
    let mut rows = Vec::new();
    for &n in batch_sizes {
        let samples: Vec<&[TensorData]> = (0..n).map(|_| sample.as_slice()).collect();
        let inputs = model.stack(&samples)?;
        for _ in 0..3 {
            model.forward_outputs(&inputs, n)?;
        }
        let mut times = Vec::new();
        let start = Instant::now();
        while start.elapsed().as_secs_f64() < seconds || times.len() < 5 {
            let t = Instant::now();
            // Includes the copy of the actions back to the host, which waits for the GPU.
            model.forward_outputs(&inputs, n)?;
            times.push(t.elapsed().as_secs_f64() * 1e3);
        }
        times.sort_by(f64::total_cmp);
        let median = times[times.len() / 2];
        let per_sample = median / n as f64;
        println!("| {n} | {median:.2} | {per_sample:.2} | {:.0} |", 1e3 / per_sample);
        rows.push(json!({"batch_size": n, "forward_ms_median": median, "ms_per_sample": per_sample, "samples_per_s": 1e3 / per_sample, "iterations": times.len()}));
    }
    Ok(json!({"benchmark": "curve", "device": device, "machine": machine(), "date": now_utc(), "rows": rows}))
}

fn jpeg_b64(width: u32, height: u32, seed: u32) -> String {
    let img = image::RgbImage::from_fn(width, height, |x, y| {
        image::Rgb([(x + seed * 13) as u8, (y + seed * 7) as u8, ((x ^ y) + seed) as u8])
    });
    let mut bytes = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut bytes), image::ImageFormat::Jpeg).expect("encode JPEG");
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

#[derive(Debug, Default)]
struct Point {
    latencies_ms: Vec<f64>,
    batch_sizes: Vec<usize>,
    errors: usize,
    elapsed: f64,
}

fn batching(concurrency: &[usize], seconds: f64, image: &str, no_policies: bool) -> anyhow::Result<serde_json::Value> {
    let (w, h) = image.split_once('x').context("--image must be WIDTHxHEIGHT")?;
    let (w, h): (u32, u32) = (w.parse()?, h.parse()?);
    let bodies: Arc<Vec<Vec<u8>>> = Arc::new(
        (0..16u32)
            .map(|i| {
                // Every simulated robot uses the demo robot's identity and key.
                serde_json::to_vec(&InferenceRequest {
                    robot_id: appliance::admin::DEMO_ROBOT.into(),
                    robot_type: None,
                    model: None,
                    instruction: "pick up the red block and place it in the bin".into(),
                    image: jpeg_b64(w, h, i),
                    state: (0..7).map(|j| (i + j) as f32 * 0.05).collect(),
                    deadline_ms: Some(30_000),
                    priority: None,
                })
                .expect("serialise")
            })
            .collect(),
    );
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let models = tempfile::tempdir()?;
    let model_dir = demo_model(models.path())?;

    println!("## appliance under concurrent robots, {w}x{h} JPEG ({}; {})\n", machine(), now_utc());
    println!("| batching | robots | req/s | p50 ms | p90 ms | p99 ms | mean batch | errors |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    let mut rows = Vec::new();
    for (label, batching_toml) in [("on", "enabled = true\nmax_queue_delay_us = 2000\n"), ("off", "enabled = false\n")]
    {
        let data = tempfile::tempdir()?;
        let mut config = appliance::Config::default();
        config.server.listen = "127.0.0.1:0".parse()?;
        config.data.dir = data.path().to_path_buf();
        config.server.shutdown_grace_ms = 2_000;
        if no_policies {
            config.policy.preload.clear();
        }
        // Every simulated robot shares the demo robot's identity: its rate limit must not be
        // what is measured (the quota path itself still runs).
        config.quota.robots.insert(
            appliance::admin::DEMO_ROBOT.into(),
            vla_api::QuotaLimits { rate: Some("1000000/s".into()), ..Default::default() },
        );
        let repo = config.model_repository().join(appliance::demo::NAME);
        std::fs::create_dir_all(&repo)?;
        std::fs::copy(model_dir.join("model.pt"), repo.join("model.pt"))?;
        let batching = format!("{batching_toml}queue_capacity = 1024\n");
        std::fs::write(
            repo.join("model.toml"),
            appliance::demo::model_toml_with_batching(appliance::demo::NAME, &batching),
        )?;
        runtime.block_on(async {
            let listener = tokio::net::TcpListener::bind(config.server.listen).await?;
            let addr = listener.local_addr()?;
            let cert = config.data.dir.join("tls/cert.pem");
            let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
            let server = tokio::spawn(appliance::run(config, listener, async {
                let _ = stop_rx.await;
            }));
            let client = loop {
                if cert.exists()
                    && let Ok(client) = client(&cert, addr)
                    && client.get(format!("https://localhost:{}/health", addr.port())).send().await.is_ok_and(|r| r.status().is_success())
                {
                    break client;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            };
            let url = format!("https://localhost:{}/v1/inference", addr.port());
            let key_file = data.path().join(appliance::admin::DEMO_KEY_FILE);
            let key = std::fs::read_to_string(&key_file).with_context(|| format!("reading {}", key_file.display()))?;
            let key = key.trim().to_string();
            for &c in concurrency {
                let p = closed_loop(&client, &url, &key, &bodies, c, seconds).await;
                let mut lat = p.latencies_ms.clone();
                lat.sort_by(f64::total_cmp);
                let pct = |q: f64| lat.get(((lat.len() as f64 * q) as usize).min(lat.len().saturating_sub(1))).copied().unwrap_or(f64::NAN);
                let mean_batch = p.batch_sizes.iter().sum::<usize>() as f64 / p.batch_sizes.len().max(1) as f64;
                let rps = lat.len() as f64 / p.elapsed;
                println!(
                    "| {label} | {c} | {rps:.1} | {:.1} | {:.1} | {:.1} | {mean_batch:.2} | {} |",
                    pct(0.5),
                    pct(0.9),
                    pct(0.99),
                    p.errors
                );
                rows.push(json!({"batching": label, "robots": c, "requests_per_s": rps, "p50_ms": pct(0.5), "p90_ms": pct(0.9), "p99_ms": pct(0.99), "mean_batch_size": mean_batch, "errors": p.errors, "requests": lat.len()}));
            }
            let _ = stop_tx.send(());
            server.await??;
            anyhow::Ok(())
        })?;
    }
    Ok(json!({"benchmark": "batching", "machine": machine(), "date": now_utc(), "image": image, "rows": rows}))
}

fn client(cert: &Path, addr: std::net::SocketAddr) -> anyhow::Result<reqwest::Client> {
    let pem = std::fs::read(cert)?;
    Ok(reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&pem)?)
        .resolve("localhost", addr)
        .timeout(Duration::from_secs(60))
        .build()?)
}

/// `c` robots, each sending its next request as soon as the previous answer arrives.
async fn closed_loop(
    client: &reqwest::Client,
    url: &str,
    key: &str,
    bodies: &Arc<Vec<Vec<u8>>>,
    c: usize,
    seconds: f64,
) -> Point {
    let end = Instant::now() + Duration::from_secs_f64(seconds);
    let start = Instant::now();
    let tasks: Vec<_> = (0..c)
        .map(|i| {
            let client = client.clone();
            let url = url.to_string();
            let key = key.to_string();
            let bodies = bodies.clone();
            tokio::spawn(async move {
                let mut p = Point::default();
                let mut k = i;
                while Instant::now() < end {
                    let body = bodies[k % bodies.len()].clone();
                    k += 1;
                    let t = Instant::now();
                    let sent = client
                        .post(&url)
                        .header("content-type", "application/json")
                        .header("x-api-key", &key)
                        .body(body)
                        .send()
                        .await;
                    match sent {
                        Ok(r) if r.status().is_success() => match r.json::<InferenceResponse>().await {
                            Ok(resp) => {
                                p.latencies_ms.push(t.elapsed().as_secs_f64() * 1e3);
                                p.batch_sizes.push(resp.timing.batch_size);
                            }
                            Err(_) => p.errors += 1,
                        },
                        Ok(r) => {
                            p.errors += 1;
                            if p.errors == 1 {
                                let status = r.status();
                                eprintln!("first error: {status} {}", r.text().await.unwrap_or_default());
                            }
                        }
                        Err(e) => {
                            p.errors += 1;
                            if p.errors == 1 {
                                eprintln!("first error: {e}");
                            }
                        }
                    }
                }
                p
            })
        })
        .collect();
    let mut total = Point::default();
    for t in tasks {
        if let Ok(p) = t.await {
            total.latencies_ms.extend(p.latencies_ms);
            total.batch_sizes.extend(p.batch_sizes);
            total.errors += p.errors;
        }
    }
    total.elapsed = start.elapsed().as_secs_f64();
    total
}

/// Per-call latency of the shipped policies: every call instantiates the component from its
/// `InstancePre` in a fresh store with all limits set, calls it and checks nothing else (the
/// host's decision checks are microseconds of plain Rust). One thread, as one request's chain
/// runs.
fn policy(calls: usize, dist: &Path) -> anyhow::Result<serde_json::Value> {
    use appliance::policy::World;
    use appliance::policy::bindings::{Action, ActionKind};
    use appliance::policy::runtime::{Input, Runtime};

    let config = appliance::config::PolicyConfig::default();
    let cache = tempfile::tempdir()?;
    let runtime = Runtime::new(&config, cache.path()).map_err(anyhow::Error::msg)?;
    let ctx = sample_context();
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
fn quota(concurrency: &[usize], seconds: f64, dist: &Path) -> anyhow::Result<serde_json::Value> {
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
            let db = sled::Config::new().path(dir.path().join("store")).mode(sled::Mode::LowSpace).open()?;
            let config = appliance::config::QuotaConfig {
                durability: durability.into(),
                ..appliance::config::QuotaConfig::default()
            };
            let quotas = Arc::new(Quotas::open(&db, &config)?);
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
                                let now = appliance::admin::now_ms();
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
    let db = sled::Config::new().path(dir.path().join("store")).open()?;
    let config = appliance::config::QuotaConfig { durability: "interval:100".into(), ..Default::default() };
    let quotas = Arc::new(Quotas::open(&db, &config)?);
    let runtime = Runtime::new(&appliance::config::PolicyConfig::default(), dir.path()).map_err(anyhow::Error::msg)?;
    let keeper = tokio::runtime::Builder::new_current_thread().build()?;
    let path = dist.join("rate-limit.wasm");
    let bytes = std::fs::read(&path).with_context(|| format!("{} (run policies/build.sh)", path.display()))?;
    let compiled = runtime.compile(&bytes, World::Admission).map_err(anyhow::Error::msg)?;
    let ctx = sample_context();
    let (name, cfg): (Arc<str>, Arc<str>) = (
        "rate-limit".into(),
        r#"{"exempt_instructions": ["stop", "halt"], "robot": {"rate": "1000000/s"}, "group": {"rate": "1000000/s", "day": 1000000000}}"#.into(),
    );
    let mut times = Vec::new();
    for i in 0..21_000 {
        let session = Session::new(quotas.clone(), "arm-1", "line-a", appliance::admin::now_ms());
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

/// The request the policy benchmarks show their policies: a demo robot asking for a pick.
fn sample_context() -> appliance::policy::bindings::RequestContext {
    appliance::policy::bindings::RequestContext {
        request_id: "8d3c6f1e-2b4a-4c7e-9f10-5a6b7c8d9e0f".into(),
        robot_id: "arm-1".into(),
        robot_type: "demo".into(),
        model: "tiny-vla".into(),
        instruction: "pick up the red block and place it in the left bin".into(),
        state: vec![0.1, 0.2, 0.3, 0.0, 0.0, 0.0, 0.0],
        time_ms: 1_795_000_000_000,
    }
}

/// What one request records, as the appliance does it: the request counter and latency, the
/// HTTP counter and latency, four policy calls and the chain outcome, and its share of a batch
/// of 8 (queue wait, forward, batch size and wait). Then `/metrics` rendered from a registry
/// holding 3 models, 50 robots (5 types) and their quota series.
fn metrics(requests: usize) -> anyhow::Result<serde_json::Value> {
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
