//! `bench soak`: the shipped appliance (its own process) under open-loop load at a share of its
//! measured saturation, for many minutes: every minute's requests, errors, latency and the
//! appliance's resident memory. What a long run must show: no errors and a flat RSS.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use serde::Serialize;

use crate::fixtures;
use crate::load::{self, Body, Endpoint, Robot};
use crate::machine::{self, Machine, Versions};
use crate::server::{Appliance, Variant};

#[derive(Debug, Clone)]
pub struct Options {
    pub out: PathBuf,
    pub minutes: u64,
    /// Share of the measured saturation throughput to run at.
    pub share: f64,
    pub robots: usize,
    pub device: String,
}

/// One minute of the run.
#[derive(Debug, Clone, Serialize)]
pub struct Minute {
    pub minute: u64,
    pub requests: usize,
    pub errors: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub rss_mb: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub machine: Machine,
    pub versions: Versions,
    pub started_utc: String,
    pub saturation_rps: f64,
    pub robots: usize,
    pub hz: f64,
    pub rss_idle_mb: f64,
    pub minutes: Vec<Minute>,
    /// Error codes seen, with counts.
    pub errors: std::collections::BTreeMap<String, usize>,
}

fn mb(bytes: u64) -> f64 {
    (bytes as f64 / 1048576.0 * 10.0).round() / 10.0
}

pub fn run(o: &Options) -> anyhow::Result<Report> {
    std::fs::create_dir_all(&o.out)?;
    let exe = std::env::current_exe()?;
    let tmp = tempfile::tempdir()?;
    let model_dir = fixtures::demo_model(tmp.path())?;
    let work = fixtures::Workload::load(&model_dir)?;
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let log = o.out.join("soak-appliance.log");
    let machine = Machine::read(o.device.clone());
    let started_utc = machine::now_utc();
    runtime
        .block_on(async {
            let app = Appliance::start(&exe, &Variant::standard(), &model_dir, &o.device, o.robots, &log).await?;
            let ca = app.certificate()?;
            let frames: Vec<Vec<u8>> = (0..16).map(|i| fixtures::jpeg(320, 240, i)).collect();
            let fleet = app
                .robots
                .iter()
                .enumerate()
                .map(|(i, (id, key))| {
                    let mine: Vec<Vec<u8>> = (0..4).map(|j| frames[(i * 4 + j) % frames.len()].clone()).collect();
                    let bodies: Arc<[Body]> =
                        work.v1_bodies(id, &mine).into_iter().map(|bytes| Body { bytes, header_len: None }).collect();
                    Robot::new(id, key, &ca, app.addr, (Endpoint::V1, work.name()), bodies)
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            let saturation = load::closed_loop(&fleet, 32, Duration::from_secs(3), Duration::from_secs(10)).await;
            let saturation_rps = saturation.samples.len() as f64 / saturation.window.as_secs_f64();
            let hz = saturation_rps * o.share / o.robots as f64;
            let rss_idle = vla_hostile::rss_bytes(app.pid()).unwrap_or(0);
            eprintln!("saturation {saturation_rps:.1} req/s: {} robots at {hz:.2} Hz for {} min", o.robots, o.minutes);
            let mut minutes = Vec::new();
            let mut errors = std::collections::BTreeMap::new();
            for minute in 1..=o.minutes {
                let recorded = load::open_loop(&fleet, o.robots, hz, Duration::ZERO, Duration::from_secs(60)).await;
                let mut latencies: Vec<f64> = recorded.samples.iter().map(|s| s.latency_ms).collect();
                latencies.sort_by(f64::total_cmp);
                let failed: Vec<String> =
                    recorded.samples.iter().filter_map(|s| s.result.as_ref().err().map(|f| f.key.clone())).collect();
                for f in &failed {
                    *errors.entry(f.clone()).or_insert(0) += 1;
                }
                let row = Minute {
                    minute,
                    requests: recorded.samples.len(),
                    errors: failed.len(),
                    p50_ms: crate::stats::quantile(&latencies, 0.5),
                    p99_ms: crate::stats::quantile(&latencies, 0.99),
                    rss_mb: mb(vla_hostile::rss_bytes(app.pid()).unwrap_or(0)),
                };
                eprintln!(
                    "minute {minute}: {} requests, {} errors, p50 {:.1} ms, p99 {:.1} ms, RSS {} MB",
                    row.requests, row.errors, row.p50_ms, row.p99_ms, row.rss_mb
                );
                minutes.push(row);
            }
            app.stop()?;
            let report = Report {
                machine,
                versions: Versions::current(),
                started_utc,
                saturation_rps,
                robots: o.robots,
                hz,
                rss_idle_mb: mb(rss_idle),
                minutes,
                errors,
            };
            std::fs::write(o.out.join("soak.json"), serde_json::to_string_pretty(&report)?)?;
            std::fs::write(o.out.join("soak.md"), report.markdown())?;
            anyhow::Ok(report)
        })
        .context("the soak run")
}

impl Report {
    pub fn markdown(&self) -> String {
        let total: usize = self.minutes.iter().map(|m| m.requests).sum();
        let errors: usize = self.minutes.iter().map(|m| m.errors).sum();
        let rss: Vec<f64> = self.minutes.iter().map(|m| m.rss_mb).collect();
        let (min, max) = rss.iter().fold((f64::MAX, 0f64), |(lo, hi), &r| (lo.min(r), hi.max(r)));
        let mut md = format!(
            "# Soak: {} minutes at {:.0} % of saturation\n\n{} · {}\n\nSaturation (32 clients, closed loop): {:.1} req/s. \
             Load: {} robots at {:.2} Hz, open loop ({:.1} req/s). {total} requests, {errors} errors{}. \
             RSS: {} MB idle; {:.1}–{:.1} MB during the run (first minute {:.1}, last {:.1}).\n\n\
             | minute | requests | errors | p50 ms | p99 ms | RSS MB |\n|---:|---:|---:|---:|---:|---:|\n",
            self.minutes.len(),
            self.hz * self.robots as f64 / self.saturation_rps.max(1e-9) * 100.0,
            self.started_utc,
            self.machine.line(),
            self.saturation_rps,
            self.robots,
            self.hz,
            self.hz * self.robots as f64,
            if self.errors.is_empty() { String::new() } else { format!(" ({:?})", self.errors) },
            self.rss_idle_mb,
            min,
            max,
            rss.first().copied().unwrap_or(0.0),
            rss.last().copied().unwrap_or(0.0),
        );
        for m in &self.minutes {
            md.push_str(&format!(
                "| {} | {} | {} | {:.1} | {:.1} | {} |\n",
                m.minute, m.requests, m.errors, m.p50_ms, m.p99_ms, m.rss_mb
            ));
        }
        md
    }
}
