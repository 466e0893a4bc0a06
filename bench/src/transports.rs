//! `bench transports`: the three ways a robot program calls the appliance, side by side in one
//! run on the same model (tiny-pi: two 224×224 cameras, 50×14 chunks) and the same shipped
//! appliance: `/v1/inference` through the project's Python client, OIP over gRPC through
//! `tritonclient.grpc`, and openpi's WebSocket protocol through `openpi-client`. Each robot is
//! its own process with its own client (`bench/transports.py`, in `.venv-clients`), closed
//! loop; the figures include each client's own encoding, as a robot program sees them.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};

use crate::machine::{self, Machine, Versions};
use crate::server::{Appliance, Variant};

#[derive(Debug, Clone)]
pub struct Options {
    pub out: PathBuf,
    pub counts: Vec<usize>,
    pub seconds: f64,
    pub device: String,
}

/// One transport at one robot count.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Point {
    pub transport: String,
    pub robots: usize,
    pub requests: usize,
    pub errors: usize,
    pub first_error: Option<String>,
    pub rps: f64,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub machine: Machine,
    pub versions: Versions,
    pub started_utc: String,
    pub model: String,
    pub seconds: f64,
    pub points: Vec<Point>,
}

#[derive(Debug, Deserialize)]
struct Output {
    points: Vec<Point>,
}

pub fn run(o: &Options) -> anyhow::Result<Report> {
    std::fs::create_dir_all(&o.out)?;
    let root = std::env::current_dir()?;
    let model_dir = root.join("models/build/tiny-pi");
    let python = root.join(".venv-clients/bin/python");
    for needed in [&model_dir, &python] {
        if !needed.exists() {
            bail!("{} is missing: run scripts/setup.sh from the repository root", needed.display());
        }
    }
    let exe = std::env::current_exe()?;
    let robots = o.counts.iter().copied().max().unwrap_or(1);
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let log = o.out.join("transports-appliance.log");
    let machine = Machine::read(o.device.clone());
    let started_utc = machine::now_utc();
    let app = runtime.block_on(Appliance::start(&exe, &Variant::standard(), &model_dir, &o.device, robots, &log))?;
    let tmp = tempfile::tempdir()?;
    let config = tmp.path().join("transports.json");
    std::fs::write(
        &config,
        serde_json::to_vec(&serde_json::json!({
            "host": "localhost",
            "port": app.addr.port(),
            "ca": app.ca,
            "model": "tiny-pi",
            "robots": app.robots,
            "counts": o.counts,
            "seconds": o.seconds,
            "warmup_s": 2.0,
            "reference": model_dir.join("reference.json"),
        }))?,
    )?;
    let output = std::process::Command::new(&python)
        .arg(root.join("bench/transports.py"))
        .arg(&config)
        .env("PYTHONPATH", root.join("clients/python"))
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("running bench/transports.py")?;
    app.stop()?;
    if !output.status.success() {
        bail!("bench/transports.py failed (exit {:?})", output.status.code());
    }
    let parsed: Output = serde_json::from_slice(&output.stdout).context("bench/transports.py's output")?;
    let report = Report {
        machine,
        versions: Versions::current(),
        started_utc,
        model: "tiny-pi".into(),
        seconds: o.seconds,
        points: parsed.points,
    };
    write(&o.out, &report)?;
    Ok(report)
}

fn write(out: &Path, report: &Report) -> anyhow::Result<()> {
    std::fs::write(out.join("transports.json"), serde_json::to_string_pretty(report)?)?;
    std::fs::write(out.join("transports.md"), report.markdown())?;
    Ok(())
}

impl Report {
    pub fn markdown(&self) -> String {
        let ms = |v: Option<f64>| v.map_or("–".to_string(), |v| format!("{v:.1}"));
        let mut md = format!(
            "# Transports: the robots' own clients side by side\n\n{} · {} · {} · {} build\n\n\
             Model {}; each robot its own process and client, closed loop, {} s per point, the \
             shipped appliance (batching, the four shipped policies). Latency is what the client \
             measured around its call (its own encoding and decoding included).\n\n\
             | transport | client | robots | req/s | p50 ms | p99 ms | errors |\n|---|---|---|---|---|---|---|\n",
            self.started_utc,
            self.machine.line(),
            format_args!("libtorch {}", self.versions.libtorch),
            self.versions.profile,
            self.model,
            self.seconds,
        );
        for p in &self.points {
            let client = match p.transport.as_str() {
                "https" => "clients/python (`/v1/inference`, JSON)",
                "grpc" => "tritonclient.grpc (OIP `ModelInfer`)",
                "openpi" => "openpi-client (WebSocket, MessagePack)",
                other => other,
            };
            md.push_str(&format!(
                "| {} | {client} | {} | {:.1} | {} | {} | {}{} |\n",
                p.transport,
                p.robots,
                p.rps,
                ms(p.p50_ms),
                ms(p.p99_ms),
                p.errors,
                p.first_error.as_deref().map(|e| format!(" (first: {})", one_line(e))).unwrap_or_default()
            ));
        }
        md
    }
}

/// An error message fit for a table cell: one line, no pipes, at most 160 characters.
fn one_line(e: &str) -> String {
    let flat: String = e.chars().map(|c| if c == '\n' || c == '|' { ' ' } else { c }).collect();
    match flat.char_indices().nth(160) {
        Some((i, _)) => format!("{}…", &flat[..i]),
        None => flat,
    }
}
