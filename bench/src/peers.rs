//! `bench peers`: the appliance beside the Python servers a user would pick instead, all
//! serving the same TorchScript file with the same preprocessing under the same HTTPS load,
//! measured in one run with the model's own speed (the raw pipeline, in-process):
//!
//! - models: the weight-bound demo (`tiny-vla`) and the compute-bound stand-in (`conv-vla`,
//!   [`crate::standin`]);
//! - frames: 224×224 (the model's size: no resize) and 640×480 JPEGs, one per request;
//! - servers: the appliance as shipped (its own process, the shipped policies, `sync` quotas);
//!   the appliance without policies at the largest client count (what the policies cost: it
//!   runs with the threads and the batch cap the shipped instance measured at warm-up); a
//!   FastAPI server with an asyncio batcher and LitServe 0.2.19 with its batching
//!   (`bench/peers/`, run from `.venv`, torch's default threads, batching up to 32 with the
//!   `--peer-batch-timeout-ms` window);
//! - the raw pipeline: [`crate::baseline::pipeline`] (decode, resize, normalise, tokens, stack,
//!   forward) on this thread at batch sizes 1–32, with each thread count the appliance could
//!   choose; its batch-1 median and its best samples/s are what the appliance is held to.
//!
//! Every figure of the report is a ratio measured in this run (see the targets in
//! `bench/README.md`); none is asserted in a test.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use appliance::model::LoadedModel;
use serde::{Deserialize, Serialize};

use crate::baseline;
use crate::fixtures::{self, Workload};
use crate::load::{self, Body, Endpoint, Robot};
use crate::machine::{self, Machine, Versions};
use crate::report::Point;
use crate::server::{Appliance, Pinned, Variant};

#[derive(Debug, Clone)]
pub struct Options {
    pub out: PathBuf,
    pub clients: Vec<usize>,
    pub images: Vec<(u32, u32)>,
    pub seconds: f64,
    pub warmup: f64,
    pub baseline_seconds: f64,
    /// The peers' batch window (ms); 0: whatever is queued when the model is free.
    pub peer_batch_timeout_ms: f64,
    /// The Python that runs the peers (the project's `.venv`).
    pub python: PathBuf,
    pub smoke: bool,
    /// Only these models and servers (`None`: all), for a quicker partial run.
    pub models: Option<Vec<String>>,
    pub servers: Option<Vec<String>>,
}

impl Options {
    fn runs(&self, server: &str) -> bool {
        self.servers.as_ref().is_none_or(|s| s.iter().any(|n| n == server))
    }
}

impl Options {
    pub fn standard(out: PathBuf) -> Options {
        Options {
            out,
            clients: vec![1, 32, 64],
            images: vec![(224, 224), (640, 480)],
            seconds: 4.0,
            warmup: 1.5,
            baseline_seconds: 1.0,
            peer_batch_timeout_ms: 2.0,
            python: PathBuf::from(".venv/bin/python"),
            smoke: false,
            models: None,
            servers: None,
        }
    }

    pub fn smoke(out: PathBuf) -> Options {
        Options {
            clients: vec![1, 4],
            images: vec![(224, 224)],
            seconds: 0.4,
            warmup: 0.2,
            baseline_seconds: 0.05,
            smoke: true,
            ..Options::standard(out)
        }
    }
}

/// The raw pipeline at one frame size: the best over thread counts and batch sizes.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Raw {
    /// Batch 1: median ms and the thread count it was best with.
    pub batch1_ms: f64,
    pub batch1_threads: usize,
    pub best_samples_per_s: f64,
    pub best_batch: usize,
    pub best_threads: usize,
    pub rows: Vec<(usize, baseline::Row)>,
}

/// The ratios the targets are about, at one model and frame size.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Ratios {
    /// The appliance's p50 for one robot − the raw pipeline's batch-1 median, ms.
    pub one_robot_over_raw_ms: Option<f64>,
    /// The appliance's best throughput ÷ the better peer's best.
    pub throughput_vs_best_peer: Option<f64>,
    /// The appliance's best throughput ÷ the raw pipeline's best samples/s.
    pub throughput_vs_raw: Option<f64>,
    /// The appliance's p99 ÷ the better peer's p99, at 32 clients (or the nearest count).
    pub p99_vs_best_peer: Option<f64>,
    /// Throughput with the shipped policies ÷ without, at the largest client count.
    pub policies_share: Option<f64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Frame {
    pub image: String,
    pub jpeg_bytes: usize,
    pub raw: Raw,
    pub points: Vec<Point>,
    pub ratios: Ratios,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModelResult {
    pub model: String,
    /// The appliance's libtorch threads for it (as `/v1/models` says).
    pub appliance_threads: Option<vla_api::CpuThreads>,
    /// The threads and batch cap the instance without policies was given (absent from runs
    /// before it was given any: it measured its own).
    #[serde(default)]
    pub twin_pinned: Option<Pinned>,
    pub frames: Vec<Frame>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct PeersReport {
    pub date: String,
    pub machine: Machine,
    pub versions: Versions,
    pub seconds_per_point: f64,
    pub peer_batch_timeout_ms: f64,
    pub smoke: bool,
    pub models: Vec<ModelResult>,
}

/// Every server a run can measure, in the order of the charts' colours.
pub const SERVERS: [&str; 4] = ["appliance", "fastapi", "litserve", "appliance-no-policies"];

const PEERS: [(&str, &str); 2] =
    [("fastapi", "bench/peers/fastapi_peer.py"), ("litserve", "bench/peers/litserve_peer.py")];

pub fn run(o: &Options) -> anyhow::Result<PeersReport> {
    std::fs::create_dir_all(&o.out).with_context(|| format!("creating {}", o.out.display()))?;
    if let Some(unknown) = o.servers.iter().flatten().find(|s| !SERVERS.contains(&s.as_str())) {
        bail!("--servers: `{unknown}` is none of {}", SERVERS.join(", "));
    }
    if let Some(unknown) = o.models.iter().flatten().find(|m| !["tiny-vla", "conv-vla"].contains(&m.as_str())) {
        bail!("--models: `{unknown}` is none of tiny-vla, conv-vla");
    }
    if !o.python.exists() {
        bail!("{} is missing: run ./scripts/setup.sh (it installs the peers into .venv)", o.python.display());
    }
    let exe = std::env::current_exe().context("finding the bench binary (it serves the appliance too)")?;
    let tmp = tempfile::tempdir()?;
    let tls = PeerTls::generate(tmp.path())?;
    let models = vec![fixtures::demo_model(tmp.path())?, crate::standin::generate(tmp.path())?];
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().thread_name("loadgen").build()?;
    let robots = o.clients.iter().copied().max().unwrap_or(1);
    let mut results = Vec::new();
    for dir in &models {
        let work = Workload::load(dir)?;
        if o.models.as_ref().is_some_and(|m| !m.iter().any(|n| n == work.name())) {
            continue;
        }
        eprintln!("{}: the raw pipeline", work.name());
        let frames: Vec<(String, Vec<Vec<u8>>)> = o
            .images
            .iter()
            .map(|&(w, h)| (format!("{w}x{h}"), (0..16).map(|i| fixtures::jpeg(w, h, i)).collect()))
            .collect();
        let raws = frames.iter().map(|(_, f)| raw(&work, f, o.baseline_seconds)).collect::<anyhow::Result<Vec<_>>>()?;
        let mut points: Vec<Vec<Point>> = vec![Vec::new(); frames.len()];
        let (mut appliance_threads, mut twin_pinned) = (None, None);
        let largest = [robots];
        let variants = [
            (Variant::standard(), &o.clients[..]),
            (Variant { name: "no-policies".into(), policies: false, ..Variant::standard() }, &largest[..]),
        ];
        for (variant, clients) in variants {
            // The twin without policies runs with the threads and the batch cap the shipped
            // instance measured: measured again, they can come out otherwise (the forward
            // cannot tell sizes a few per cent apart), and the share would compare caps.
            let variant = &Variant { pinned: appliance_threads.as_ref().and_then(Pinned::measured), ..variant };
            let name = if variant.policies { "appliance" } else { "appliance-no-policies" };
            if !o.runs(name) {
                continue;
            }
            if !variant.policies {
                twin_pinned = variant.pinned;
            }
            let log = o.out.join(format!("appliance-{}-{}.log", work.name(), variant.name));
            let appliance = runtime
                .block_on(Appliance::start(&exe, variant, dir, "cpu", robots, &log))
                .with_context(|| format!("starting the appliance; its log: {}", log.display()))?;
            let ca = appliance.certificate()?;
            if variant.policies {
                appliance_threads = runtime.block_on(appliance.cpu_threads(work.name()));
            }
            for (f, (_, jpegs)) in frames.iter().enumerate() {
                let fleet = fleet(&work, jpegs, &appliance.robots, &ca, appliance.addr)?;
                points[f].extend(runtime.block_on(sweep(name, &fleet, clients, o)));
            }
            appliance.stop()?;
        }
        for (peer, script) in PEERS {
            if !o.runs(peer) {
                continue;
            }
            let name = format!("{peer}-{}", work.name());
            let mut server = Peer::start(&o.python, script, dir, &tls, o.peer_batch_timeout_ms, &o.out, &name)?;
            runtime.block_on(server.wait_ready(&tls))?;
            let keys: Vec<(String, String)> =
                (0..robots).map(|i| (crate::server::robot_id(i), "not-checked".to_string())).collect();
            for (f, (_, jpegs)) in frames.iter().enumerate() {
                let fleet = fleet(&work, jpegs, &keys, &tls.certificate()?, server.addr)?;
                points[f].extend(runtime.block_on(sweep(peer, &fleet, &o.clients, o)));
            }
            server.stop();
        }
        let frames = frames
            .into_iter()
            .zip(raws)
            .zip(points)
            .map(|(((image, jpegs), raw), points)| {
                let ratios = ratios(&raw, &points);
                Frame {
                    image,
                    jpeg_bytes: jpegs.iter().map(Vec::len).sum::<usize>() / jpegs.len(),
                    raw,
                    points,
                    ratios,
                }
            })
            .collect();
        results.push(ModelResult { model: work.name().to_string(), appliance_threads, twin_pinned, frames });
    }
    let report = PeersReport {
        date: machine::now_utc(),
        machine: Machine::read("cpu".into()),
        versions: Versions::current(),
        seconds_per_point: o.seconds,
        peer_batch_timeout_ms: o.peer_batch_timeout_ms,
        smoke: o.smoke,
        models: results,
    };
    std::fs::write(o.out.join("peers.json"), serde_json::to_string_pretty(&report)?)?;
    write_report(&report, &o.out)?;
    Ok(report)
}

/// Writes `peers.md` and its charts into `dir` (`bench peers --from` re-renders them from a
/// `peers.json`).
pub fn write_report(report: &PeersReport, dir: &Path) -> anyhow::Result<()> {
    let charts = crate::charts::write_peers(report, dir)?;
    std::fs::write(dir.join("peers.md"), markdown(report, &charts))?;
    Ok(())
}

/// Reads a `peers.json` written by [`run`].
pub fn read(path: &Path) -> anyhow::Result<PeersReport> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_slice(&bytes).with_context(|| format!("{} is not a bench peers report", path.display()))
}

/// The raw pipeline on this thread with every thread count the appliance could choose.
fn raw(work: &Workload, jpegs: &[Vec<u8>], seconds: f64) -> anyhow::Result<Raw> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let model = LoadedModel::load(&work.dir, &work.spec, tch::Device::Cpu)?;
    let sizes = [1, 4, 8, 16, 32];
    let mut rows = Vec::new();
    for threads in appliance::threads::candidates(cores, 1) {
        tch::set_num_threads(threads as i32);
        model.warm_up(&sizes, 1)?;
        for row in baseline::pipeline(&model, work, jpegs, &sizes, seconds)? {
            rows.push((threads, row));
        }
    }
    let b1 = rows.iter().filter(|(_, r)| r.batch_size == 1).min_by(|a, b| a.1.median_ms.total_cmp(&b.1.median_ms));
    let best = rows.iter().max_by(|a, b| a.1.samples_per_s.total_cmp(&b.1.samples_per_s));
    let ((t1, b1), (tb, best)) = (b1.context("no batch-1 timing")?, best.context("no timing")?);
    Ok(Raw {
        batch1_ms: b1.median_ms,
        batch1_threads: *t1,
        best_samples_per_s: best.samples_per_s,
        best_batch: best.batch_size,
        best_threads: *tb,
        rows: rows.clone(),
    })
}

fn fleet(
    work: &Workload,
    jpegs: &[Vec<u8>],
    keys: &[(String, String)],
    ca: &reqwest::Certificate,
    addr: SocketAddr,
) -> anyhow::Result<Vec<Robot>> {
    keys.iter()
        .enumerate()
        .map(|(i, (id, key))| {
            let mine: Vec<Vec<u8>> = (0..4).map(|j| jpegs[(i * 4 + j) % jpegs.len()].clone()).collect();
            let bodies: Arc<[Body]> =
                work.v1_bodies(id, &mine).into_iter().map(|bytes| Body { bytes, header_len: None }).collect();
            Robot::new(id, key, ca, addr, (Endpoint::V1, work.name()), bodies)
        })
        .collect()
}

async fn sweep(server: &str, fleet: &[Robot], clients: &[usize], o: &Options) -> Vec<Point> {
    let mut points = Vec::new();
    for &n in clients {
        let recorded = load::closed_loop(&fleet[..n.min(fleet.len())], n, secs(o.warmup), secs(o.seconds)).await;
        let p = Point::new(server, Endpoint::V1, "closed", n, None, recorded);
        eprintln!(
            "  {server:<22} {n:>3} clients {:>7.1} req/s  p50 {:>7.2} ms  p99 {:>7.2} ms  batch {:>5.2}  errors {}",
            p.throughput_rps,
            p.latency_ms.p50,
            p.latency_ms.p99,
            p.mean_batch,
            p.error_count()
        );
        points.push(p);
    }
    points
}

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s)
}

/// The successful points of `server`.
fn of<'a>(points: &'a [Point], server: &'a str) -> impl Iterator<Item = &'a Point> {
    points.iter().filter(move |p| p.variant == server && p.ok > 0)
}

fn max(values: impl Iterator<Item = f64>) -> Option<f64> {
    values.reduce(f64::max)
}

fn ratios(raw: &Raw, points: &[Point]) -> Ratios {
    let best = |server: &str| max(of(points, server).map(|p| p.throughput_rps));
    let at = |server: &str, n: usize| of(points, server).min_by_key(|p| p.clients.abs_diff(n)).cloned();
    let peers = ["fastapi", "litserve"];
    let appliance = best("appliance");
    let best_peer = max(peers.iter().filter_map(|p| best(p)));
    let p99 = |server: &str| at(server, 32).map(|p| p.latency_ms.p99);
    let best_peer_p99 = peers.iter().filter_map(|p| p99(p)).reduce(f64::min);
    let largest = of(points, "appliance-no-policies").map(|p| p.clients).max();
    let throughput = |server: &str, n: usize| of(points, server).find(|p| p.clients == n).map(|p| p.throughput_rps);
    Ratios {
        one_robot_over_raw_ms: at("appliance", 1).filter(|p| p.clients == 1).map(|p| p.latency_ms.p50 - raw.batch1_ms),
        throughput_vs_best_peer: appliance.zip(best_peer).map(|(a, b)| a / b),
        throughput_vs_raw: appliance.map(|a| a / raw.best_samples_per_s),
        p99_vs_best_peer: p99("appliance").zip(best_peer_p99).map(|(a, b)| a / b),
        policies_share: largest
            .and_then(|n| Some(throughput("appliance", n)? / throughput("appliance-no-policies", n)?)),
    }
}

fn markdown(r: &PeersReport, charts: &[(&str, &str)]) -> String {
    let mut s = format!(
        "# The appliance beside the Python peers\n\n{} · {} · {} cores · libtorch {} · {} s per point{}\n\n\
         Closed loop over HTTPS (keep-alive; HTTP/2 to the appliance, HTTP/1.1 to the peers, which \
         offer nothing else), `/v1/inference` with one JPEG per request. Peers: FastAPI + asyncio \
         batcher and LitServe 0.2.19, batch window {} ms, up to 32. Raw: the pipeline in-process \
         (decode, resize, normalise, tokens, stack, forward), best thread count.\n",
        r.date,
        r.machine.cpu,
        r.machine.cores,
        r.versions.libtorch,
        r.seconds_per_point,
        if r.smoke { " · **smoke run: figures meaningless**" } else { "" },
        r.peer_batch_timeout_ms,
    );
    for (file, title) in charts {
        s += &format!("\n![{title}]({file})\n");
    }
    let fmt = |v: Option<f64>, d: usize| v.map_or("—".into(), |v| format!("{v:.d$}"));
    for m in &r.models {
        let threads = m.appliance_threads.as_ref().map_or("?".into(), |t| match t.largest_batch {
            Some(b) => format!("{} ({}); largest batch {b} (measured)", t.threads, t.chosen_by),
            None => format!("{} ({})", t.threads, t.chosen_by),
        });
        let twin = if m.twin_pinned.is_some() { "; the instance without policies was given the same" } else { "" };
        s += &format!("\n## {}\n\nAppliance libtorch threads: {threads}{twin}.\n", m.model);
        for f in &m.frames {
            s += &format!(
                "\n### {} JPEG ({} B)\n\nRaw pipeline: batch 1 {:.2} ms ({} threads); best {:.1} samples/s (batch {}, {} threads).\n\n",
                f.image,
                f.jpeg_bytes,
                f.raw.batch1_ms,
                f.raw.batch1_threads,
                f.raw.best_samples_per_s,
                f.raw.best_batch,
                f.raw.best_threads
            );
            s +=
                "| server | clients | req/s | p50 ms | p99 ms | mean batch | errors |\n|---|---|---|---|---|---|---|\n";
            for p in &f.points {
                s += &format!(
                    "| {} | {} | {:.1} | {:.2} | {:.2} | {:.2} | {} |\n",
                    p.variant,
                    p.clients,
                    p.throughput_rps,
                    p.latency_ms.p50,
                    p.latency_ms.p99,
                    p.mean_batch,
                    p.error_count()
                );
            }
            let q = &f.ratios;
            s += &format!(
                "\n| ratio | measured | target |\n|---|---|---|\n\
                 | one robot p50 − raw batch 1 | {} ms | ≤ 0.5 ms |\n\
                 | throughput ÷ better peer | {} | ≥ {} |\n\
                 | throughput ÷ raw best | {} | ≥ 0.9 |\n\
                 | p99 at 32 clients ÷ better peer | {} | ≤ 0.7 |\n\
                 | shipped policies ÷ none (throughput) | {} | ≥ 0.95 |\n",
                fmt(q.one_robot_over_raw_ms, 2),
                fmt(q.throughput_vs_best_peer, 2),
                if f.image == "224x224" { "1.2" } else { "1.5" },
                fmt(q.throughput_vs_raw, 2),
                fmt(q.p99_vs_best_peer, 2),
                fmt(q.policies_share, 3),
            );
        }
    }
    s
}

/// A self-signed certificate for the peers (`localhost`).
struct PeerTls {
    cert: PathBuf,
    key: PathBuf,
}

impl PeerTls {
    fn generate(dir: &Path) -> anyhow::Result<PeerTls> {
        let certified = rcgen::generate_simple_self_signed(vec!["localhost".into()])?;
        let (cert, key) = (dir.join("peer-cert.pem"), dir.join("peer-key.pem"));
        std::fs::write(&cert, certified.cert.pem())?;
        std::fs::write(&key, certified.key_pair.serialize_pem())?;
        Ok(PeerTls { cert, key })
    }

    fn certificate(&self) -> anyhow::Result<reqwest::Certificate> {
        Ok(reqwest::Certificate::from_pem(&std::fs::read(&self.cert)?)?)
    }
}

/// A peer server in its own process group (LitServe starts processes of its own).
struct Peer {
    child: Child,
    addr: SocketAddr,
}

impl Peer {
    fn start(
        python: &Path,
        script: &str,
        model: &Path,
        tls: &PeerTls,
        batch_timeout_ms: f64,
        out: &Path,
        name: &str,
    ) -> anyhow::Result<Peer> {
        use std::os::unix::process::CommandExt;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let log = out.join(format!("peer-{name}.log"));
        let log = std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let child = std::process::Command::new(python)
            .arg(script)
            .arg("--model-dir")
            .arg(model)
            .args(["--port", &port.to_string(), "--batch-timeout-ms", &batch_timeout_ms.to_string()])
            .arg("--cert")
            .arg(&tls.cert)
            .arg("--key")
            .arg(&tls.key)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0)
            .spawn()
            .with_context(|| format!("starting {} {script}", python.display()))?;
        Ok(Peer { child, addr: SocketAddr::from(([127, 0, 0, 1], port)) })
    }

    async fn wait_ready(&mut self, tls: &PeerTls) -> anyhow::Result<()> {
        let client = reqwest::Client::builder()
            .add_root_certificate(tls.certificate()?)
            .resolve("localhost", self.addr)
            .timeout(Duration::from_secs(5))
            .build()?;
        let url = format!("https://localhost:{}/health", self.addr.port());
        let started = Instant::now();
        loop {
            if let Ok(r) = client.get(&url).send().await
                && r.status().is_success()
            {
                return Ok(());
            }
            if let Some(status) = self.child.try_wait()? {
                bail!("the peer exited ({status}) before it answered /health");
            }
            if started.elapsed() > Duration::from_secs(180) {
                bail!("the peer did not answer /health within 180 s");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    fn stop(mut self) {
        let group = format!("-{}", self.child.id());
        let _ = std::process::Command::new("kill").args(["-TERM", "--", &group]).status();
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(10) {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = std::process::Command::new("kill").args(["-KILL", "--", &group]).status();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// The committed report (`bench/results/peers.json`) still reads, and its page and charts
    /// are what it renders to: the figures in `peers.md` are the measured ones.
    #[test]
    fn the_committed_report_renders_to_the_committed_page_and_charts() {
        let results = Path::new(env!("CARGO_MANIFEST_DIR")).join("results");
        let report = read(&results.join("peers.json")).unwrap();
        let out = tempfile::tempdir().unwrap();
        write_report(&report, out.path()).unwrap();
        let page = std::fs::read_to_string(out.path().join("peers.md")).unwrap();
        assert_eq!(page, std::fs::read_to_string(results.join("peers.md")).unwrap(), "rerun `bench peers --from`");
        for chart in ["peers-throughput.svg", "peers-p99.svg"] {
            let svg = std::fs::read_to_string(out.path().join(chart)).unwrap();
            assert_eq!(
                svg,
                std::fs::read_to_string(results.join(chart)).unwrap(),
                "{chart}: rerun `bench peers --from`"
            );
            for name in ["appliance", "fastapi", "litserve", "conv-vla, 640x480 JPEG"] {
                assert!(svg.contains(name), "{chart} does not show {name}");
            }
        }
    }
}
