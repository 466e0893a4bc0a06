//! `bench`: measures the appliance on this machine against the model's own limits.
//!
//! - `bench suite` — the standard suite (a few minutes): the model alone in-process at each
//!   batch size, then the appliance (its own process, real HTTPS on 127.0.0.1) under a
//!   closed-loop concurrency sweep on `/v1/inference` and OIP binary tensors, robots at a
//!   fixed control rate (open loop), and the comparisons (batching off, no policies,
//!   `interval` quotas). Writes `report.json`, `report.md` and SVG charts. `--smoke` runs every
//!   part for a moment (the test suite does).
//! - `bench policy`, `bench quota`, `bench metrics` — per-call distributions of the policy
//!   sandbox, quota decisions and metric recording (see `src/parts.rs`).
//! - `bench peers` — the appliance beside a FastAPI batcher and LitServe serving the same
//!   model, on the demo and a compute-bound stand-in, with the raw pipeline: ratios (see
//!   `src/peers.rs`).
//! - `bench soak` — a long run at a share of saturation: errors and memory over time.
//! - `bench attacks` — each hostile-client attack beside a 10 Hz victim robot (see
//!   `src/attacks.rs`).
//! - `bench serve` — the appliance itself, as the suite starts it (not for people).

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};

/// The appliance's allocator, so that `bench serve` runs it as the `appliance` binary does.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Debug, Parser)]
#[command(about = "Benchmarks of the appliance on this machine")]
struct Args {
    #[command(subcommand)]
    command: Command,
    /// `policy`, `quota`, `metrics`: also write the figures as JSON to this file.
    #[arg(long, global = true)]
    json: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// The standard suite: baselines, load sweeps, open loop, comparisons; report and charts.
    Suite {
        /// Directory for report.json, report.md and the charts.
        #[arg(long, default_value = "bench/results")]
        out: PathBuf,
        /// Run every part for a moment only (figures meaningless; checks the tool works).
        #[arg(long)]
        smoke: bool,
        /// Closed-loop client counts (standard appliance, both endpoints).
        #[arg(long, value_delimiter = ',')]
        sweep: Option<Vec<usize>>,
        /// Client counts of the comparisons.
        #[arg(long, value_delimiter = ',')]
        compare_at: Option<Vec<usize>>,
        /// Open-loop loads, ROBOTS@HZ (e.g. `16@10,16@30`).
        #[arg(long, value_delimiter = ',', value_parser = parse_open)]
        open: Option<Vec<(usize, f64)>>,
        /// Seconds measured per closed-loop point.
        #[arg(long)]
        seconds: Option<f64>,
        /// `auto` (CUDA when usable), `cpu` or `cuda:N`.
        #[arg(long)]
        device: Option<String>,
        /// Camera frames for `/v1/inference`, WIDTHxHEIGHT.
        #[arg(long, value_parser = parse_image)]
        image: Option<(u32, u32)>,
        /// The model directory to serve (e.g. `models/build/tiny-pi`), or `conv-vla` for the
        /// generated compute-bound stand-in; the generated `tiny-vla` when absent.
        #[arg(long)]
        model: Option<PathBuf>,
    },
    /// The appliance beside the Python servers a user would pick instead (FastAPI + asyncio
    /// batcher, LitServe), same model file and preprocessing, on the demo model and the
    /// compute-bound stand-in, both frame sizes, with the raw pipeline; writes peers.json,
    /// peers.md and its two charts.
    Peers {
        #[arg(long, default_value = "bench/results")]
        out: PathBuf,
        #[arg(long)]
        smoke: bool,
        /// Closed-loop client counts.
        #[arg(long, value_delimiter = ',')]
        clients: Option<Vec<usize>>,
        /// Seconds measured per point.
        #[arg(long)]
        seconds: Option<f64>,
        /// The peers' batch window, ms (0: whatever is queued when the model is free).
        #[arg(long)]
        peer_batch_timeout_ms: Option<f64>,
        /// Only these models (`tiny-vla`, `conv-vla`); the report then covers only them.
        #[arg(long, value_delimiter = ',')]
        models: Option<Vec<String>>,
        /// Only these servers (`appliance`, `appliance-no-policies`, `fastapi`, `litserve`).
        #[arg(long, value_delimiter = ',')]
        servers: Option<Vec<String>>,
        /// Measure nothing: re-render peers.md and the charts into `--out` from this
        /// peers.json.
        #[arg(long, conflicts_with_all = ["smoke", "clients", "seconds", "peer_batch_timeout_ms", "models", "servers"])]
        from: Option<PathBuf>,
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
    /// Quota decisions in both durability modes with 1, 8 and 64 concurrent robots, and the
    /// rate-limit policy's whole call.
    Quota {
        #[arg(long, value_delimiter = ',', default_value = "1,8,64")]
        concurrency: Vec<usize>,
        /// Seconds of load per point.
        #[arg(long, default_value = "3")]
        seconds: f64,
        #[arg(long, default_value = "policies/dist")]
        dist: PathBuf,
    },
    /// Each hostile-client attack for a few seconds beside a 10 Hz victim robot: the victim's
    /// and `/health`'s p99, errors and the appliance's memory; writes attacks.json and
    /// attacks.md.
    Attacks {
        #[arg(long, default_value = "bench/results")]
        out: PathBuf,
        /// Seconds each attack runs.
        #[arg(long, default_value = "4")]
        seconds: f64,
        /// Seconds of quiet after the last attack before the memory is read again.
        #[arg(long, default_value = "60")]
        settle: f64,
        #[arg(long, default_value = "auto")]
        device: String,
    },
    /// The shipped appliance at a share of its measured saturation for many minutes, open loop:
    /// errors, latency and resident memory every minute; writes soak.json and soak.md.
    Soak {
        #[arg(long, default_value = "bench/results")]
        out: PathBuf,
        #[arg(long, default_value = "30")]
        minutes: u64,
        /// Share of the saturation throughput.
        #[arg(long, default_value = "0.8")]
        share: f64,
        #[arg(long, default_value = "16")]
        robots: usize,
        #[arg(long, default_value = "auto")]
        device: String,
    },
    /// The robots' three transports side by side (the project's Python client over HTTPS,
    /// tritonclient.grpc, openpi-client) on tiny-pi; writes transports.json and transports.md.
    Transports {
        #[arg(long, default_value = "bench/results")]
        out: PathBuf,
        /// Robot counts (each robot its own process and client).
        #[arg(long, value_delimiter = ',', default_value = "1,32")]
        robots: Vec<usize>,
        /// Seconds measured per point.
        #[arg(long, default_value = "15")]
        seconds: f64,
        #[arg(long, default_value = "auto")]
        device: String,
    },
    /// Runs the appliance with this configuration; prints `listening ADDR`, stops when stdin
    /// closes.
    #[command(hide = true)]
    Serve {
        #[arg(long)]
        config: PathBuf,
    },
}

fn parse_open(s: &str) -> Result<(usize, f64), String> {
    let (n, hz) = s.split_once('@').ok_or("expected ROBOTS@HZ, e.g. 16@10")?;
    let n: usize = n.parse().map_err(|_| format!("{n:?} is not a robot count"))?;
    let hz: f64 = hz.parse().map_err(|_| format!("{hz:?} is not a rate in Hz"))?;
    if n == 0 || !(hz > 0.0 && hz <= 1000.0) {
        return Err("robots must be at least 1 and the rate in (0, 1000] Hz".into());
    }
    Ok((n, hz))
}

fn parse_image(s: &str) -> Result<(u32, u32), String> {
    let (w, h) = s.split_once('x').ok_or("expected WIDTHxHEIGHT, e.g. 320x240")?;
    match (w.parse(), h.parse()) {
        (Ok(w @ 1..=8192), Ok(h @ 1..=8192)) => Ok((w, h)),
        _ => Err(format!("{s:?}: width and height must be 1–8192")),
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let report = match args.command {
        Command::Suite { out, smoke, sweep, compare_at, open, seconds, device, image, model } => {
            let base = if smoke { bench::suite::Options::smoke(out) } else { bench::suite::Options::standard(out) };
            let options = bench::suite::Options {
                sweep: sweep.unwrap_or(base.sweep.clone()),
                compare_at: compare_at.unwrap_or(base.compare_at.clone()),
                open: open.unwrap_or(base.open.clone()),
                seconds: seconds.unwrap_or(base.seconds),
                device: device.unwrap_or(base.device.clone()),
                image: image.unwrap_or(base.image),
                model,
                ..base
            };
            let report = bench::suite::run(&options)?;
            println!("{}", report.markdown(&[]));
            eprintln!("wrote {}/report.md, report.json and charts", options.out.display());
            return Ok(());
        }
        Command::Serve { config } => return serve(&config),
        Command::Peers { out, smoke, clients, seconds, peer_batch_timeout_ms, models, servers, from } => {
            if let Some(from) = from {
                std::fs::create_dir_all(&out)?;
                bench::peers::write_report(&bench::peers::read(&from)?, &out)?;
                eprintln!("wrote {}/peers.md and its charts from {}", out.display(), from.display());
                return Ok(());
            }
            let base = if smoke { bench::peers::Options::smoke(out) } else { bench::peers::Options::standard(out) };
            let options = bench::peers::Options {
                clients: clients.unwrap_or(base.clients.clone()),
                seconds: seconds.unwrap_or(base.seconds),
                peer_batch_timeout_ms: peer_batch_timeout_ms.unwrap_or(base.peer_batch_timeout_ms),
                models,
                servers,
                ..base
            };
            bench::peers::run(&options)?;
            println!("{}", std::fs::read_to_string(options.out.join("peers.md"))?);
            return Ok(());
        }
        Command::Soak { out, minutes, share, robots, device } => {
            let report = bench::soak::run(&bench::soak::Options { out, minutes, share, robots, device })?;
            println!("{}", report.markdown());
            return Ok(());
        }
        Command::Transports { out, robots, seconds, device } => {
            let options = bench::transports::Options { out, counts: robots, seconds, device };
            let report = bench::transports::run(&options)?;
            println!("{}", report.markdown());
            return Ok(());
        }
        Command::Attacks { out, seconds, settle, device } => {
            let report = bench::attacks::run(&bench::attacks::Options { out, seconds, settle, device })?;
            println!("{}", report.markdown());
            return Ok(());
        }
        Command::Policy { calls, dist } => bench::parts::policy(calls, &dist)?,
        Command::Quota { concurrency, seconds, dist } => bench::parts::quota(&concurrency, seconds, &dist)?,
        Command::Metrics { requests } => bench::parts::metrics(requests)?,
    };
    if let Some(path) = args.json {
        std::fs::write(&path, serde_json::to_string_pretty(&report)?).with_context(|| format!("{}", path.display()))?;
    }
    Ok(())
}

/// The appliance as `appliance` runs it, on the configured address; its address on stdout.
fn serve(config: &std::path::Path) -> anyhow::Result<()> {
    use std::io::{Read, Write};
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("APPLIANCE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    let config = appliance::Config::from_figment(&appliance::Config::figment(Some(config)))?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().thread_name("appliance-rt").build()?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(config.server.listen).await?;
        let mut stdout = std::io::stdout();
        writeln!(stdout, "listening {}", listener.local_addr()?)?;
        stdout.flush()?;
        let stdin_closed = async {
            let _ = tokio::task::spawn_blocking(|| std::io::stdin().read_to_end(&mut Vec::new())).await;
        };
        appliance::run(config, listener, stdin_closed).await?;
        anyhow::Ok(())
    })
}
