//! The suite's report: every figure as JSON, and the same as a markdown page.

use std::collections::BTreeMap;
use std::fmt::Write;

use serde::{Deserialize, Serialize};

use crate::baseline::{self, Row};
use crate::load::{Endpoint, Recorded};
use crate::machine::{Machine, Versions};
use crate::server::Variant;
use crate::stats::{self, Latency};

/// Failures of one kind at one point.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Errors {
    pub count: usize,
    /// The first one's detail.
    pub example: String,
}

/// Means of what the appliance reported for the successful requests, milliseconds.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct Breakdown {
    pub total: f64,
    pub queue: f64,
    pub preprocess: f64,
    pub inference: f64,
    pub policy: f64,
}

/// One load point: a variant of the appliance, an endpoint, and a load.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Point {
    pub variant: String,
    pub endpoint: Endpoint,
    /// `closed` (clients send on answer) or `open` (robots send at `hz`).
    pub mode: String,
    /// Concurrent clients (closed) or robots (open).
    pub clients: usize,
    pub hz: Option<f64>,
    pub window_s: f64,
    /// Requests sent (closed) or due (open) in the window.
    pub requests: usize,
    pub ok: usize,
    /// Successful answers per second.
    pub throughput_rps: f64,
    /// Successful requests' latency as the robots saw it.
    pub latency_ms: Latency,
    pub errors: BTreeMap<String, Errors>,
    /// Mean number of requests in the forward that served a request (per request).
    pub mean_batch: f64,
    /// Requests by the size of the batch that served them.
    pub batch_sizes: BTreeMap<usize, usize>,
    pub server_ms: Breakdown,
    /// Open loop: requests that went out over 5 ms late (their latency counts from when due).
    pub late_sends: usize,
    /// CPU time of the load generator and of the appliance during the point, in cores
    /// (CPU seconds / wall seconds).
    pub loadgen_cores: Option<f64>,
    pub appliance_cores: Option<f64>,
    /// `(latency ms, fraction at or below)`.
    pub cdf: Vec<(f64, f64)>,
}

impl Point {
    pub fn new(
        variant: &str,
        endpoint: Endpoint,
        mode: &str,
        clients: usize,
        hz: Option<f64>,
        recorded: Recorded,
    ) -> Point {
        let mut latencies = Vec::new();
        let mut errors: BTreeMap<String, Errors> = BTreeMap::new();
        let mut batch_sizes = BTreeMap::new();
        let mut sum = Breakdown::default();
        for s in &recorded.samples {
            match &s.result {
                Ok(t) => {
                    latencies.push(s.latency_ms);
                    *batch_sizes.entry(t.batch_size).or_insert(0) += 1;
                    sum.total += t.total_ms;
                    sum.queue += t.queue_ms;
                    sum.preprocess += t.preprocess_ms;
                    sum.inference += t.inference_ms;
                    sum.policy += t.policy_ms;
                }
                Err(f) => {
                    errors
                        .entry(f.key.clone())
                        .or_insert_with(|| Errors { count: 0, example: f.message.clone() })
                        .count += 1;
                }
            }
        }
        let ok = latencies.len();
        let per = |v: f64| if ok == 0 { f64::NAN } else { v / ok as f64 };
        let latency = Latency::of(&mut latencies);
        let window_s = recorded.window.as_secs_f64();
        Point {
            variant: variant.into(),
            endpoint,
            mode: mode.into(),
            clients,
            hz,
            window_s,
            requests: recorded.samples.len(),
            ok,
            throughput_rps: ok as f64 / window_s,
            latency_ms: latency,
            errors,
            mean_batch: per(batch_sizes.iter().map(|(size, n)| (size * n) as f64).sum()),
            batch_sizes,
            server_ms: Breakdown {
                total: per(sum.total),
                queue: per(sum.queue),
                preprocess: per(sum.preprocess),
                inference: per(sum.inference),
                policy: per(sum.policy),
            },
            late_sends: recorded.late_sends,
            loadgen_cores: None,
            appliance_cores: None,
            cdf: stats::cdf(&latencies, 100),
        }
    }

    pub fn error_count(&self) -> usize {
        self.errors.values().map(|e| e.count).sum()
    }
}

/// How the suite ran.
#[derive(Debug, Clone, Serialize)]
pub struct Settings {
    /// The model served.
    pub model: String,
    /// Camera frames per request.
    pub cameras: usize,
    /// Camera frames sent to `/v1/inference`, `WIDTHxHEIGHT` JPEG.
    pub image: String,
    /// Bytes of one OIP binary request (preprocessed tensors).
    pub oip_bytes: usize,
    pub jpeg_bytes: usize,
    pub seconds_per_point: f64,
    pub warmup_s: f64,
    pub smoke: bool,
}

/// A target of the issue, and whether the run met it.
#[derive(Debug, Clone, Serialize)]
pub struct Target {
    pub what: String,
    pub target: String,
    pub measured: String,
    pub met: bool,
    /// How the figure was obtained, or why it missed.
    pub note: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub date: String,
    pub machine: Machine,
    pub versions: Versions,
    pub settings: Settings,
    /// The model's forward alone, per batch size.
    pub forward: Vec<Row>,
    /// JPEG decode + preprocess + forward, per batch size, without the server.
    pub pipeline: Vec<Row>,
    pub variants: Vec<Variant>,
    pub points: Vec<Point>,
    pub targets: Vec<Target>,
}

impl Report {
    pub fn points<'a>(
        &'a self,
        variant: &'a str,
        endpoint: Endpoint,
        mode: &'a str,
    ) -> impl Iterator<Item = &'a Point> + 'a {
        self.points.iter().filter(move |p| p.variant == variant && p.endpoint == endpoint && p.mode == mode)
    }

    /// Works out the targets from the figures.
    pub fn judge(&mut self) {
        let standard = Variant::standard().name;
        let mut targets = Vec::new();
        for (endpoint, rows, raw, goal) in [
            (Endpoint::Oip, &self.forward, "forward alone", 0.85),
            (Endpoint::V1, &self.pipeline, "decode + preprocess + forward", 0.8),
        ] {
            let best_point =
                self.points(&standard, endpoint, "closed").max_by(|a, b| a.throughput_rps.total_cmp(&b.throughput_rps));
            if let (Some(p), Some(b)) = (best_point, baseline::best(rows)) {
                let e = p.throughput_rps / b.samples_per_s;
                targets.push(Target {
                    what: format!("batching efficiency, {}", endpoint.label()),
                    target: format!("≥ {goal}"),
                    measured: format!("{e:.2}"),
                    met: e >= goal,
                    note: format!(
                        "{:.0} req/s at {} clients (mean batch {:.1}) / {raw} {:.0} samples/s at batch {}",
                        p.throughput_rps, p.clients, p.mean_batch, b.samples_per_s, b.batch_size
                    ),
                });
            }
        }
        for variant in &self.variants {
            for (endpoint, rows, raw) in [
                (Endpoint::Oip, &self.forward, "forward alone"),
                (Endpoint::V1, &self.pipeline, "decode + preprocess + forward"),
            ] {
                let one = self.points(&variant.name, endpoint, "closed").find(|p| p.clients == 1);
                let raw1 = rows.iter().find(|r| r.batch_size == 1);
                if let (Some(p), Some(r)) = (one, raw1) {
                    let overhead_us = (p.latency_ms.p50 - r.median_ms) * 1e3;
                    targets.push(Target {
                        what: format!("overhead at 1 client, {}, {}", endpoint.label(), variant.name),
                        target: "≤ 300 µs p50".into(),
                        measured: format!("{overhead_us:.0} µs"),
                        met: overhead_us <= 300.0,
                        note: format!(
                            "client p50 {:.2} ms − {raw} at batch 1 {:.2} ms; appliance's own account: queue {:.2}, preprocess {:.2}, inference {:.2}, policies {:.2} ms",
                            p.latency_ms.p50, r.median_ms, p.server_ms.queue, p.server_ms.preprocess, p.server_ms.inference, p.server_ms.policy
                        ),
                    });
                }
            }
        }
        let batch8 = self.forward.iter().find(|r| r.batch_size == 8).map(|r| r.median_ms);
        // The target is set for robots at 10 Hz; other rates are reported, not judged.
        for p in self.points(&standard, Endpoint::V1, "open").filter(|p| p.hz == Some(10.0)) {
            let Some(f8) = batch8 else { break };
            let bound = f8 + 10.0;
            let errors = p.error_count();
            targets.push(Target {
                what: format!(
                    "open loop, {} robots at {} Hz, {}",
                    p.clients,
                    p.hz.unwrap_or_default(),
                    p.endpoint.label()
                ),
                target: format!("p99 < batch-8 forward + 10 ms = {bound:.1} ms, 0 errors"),
                measured: format!("p99 {:.1} ms, {errors} errors", p.latency_ms.p99),
                met: p.latency_ms.p99 < bound && errors == 0 && p.ok > 0,
                note: format!(
                    "{} requests, {} sent over 5 ms late, mean batch {:.1}",
                    p.requests, p.late_sends, p.mean_batch
                ),
            });
        }
        self.targets = targets;
    }

    /// The report as a markdown page; `charts` are file names beside it.
    pub fn markdown(&self, charts: &[(&str, &str)]) -> String {
        let mut md = String::new();
        let v = &self.versions;
        let s = &self.settings;
        let _ = writeln!(md, "# Benchmark report, {}\n", self.date);
        let _ = writeln!(md, "- Machine: {} (kernel {}).", self.machine.line(), self.machine.kernel);
        let _ = writeln!(
            md,
            "- Versions: appliance {}, libtorch {}, tch {}, wasmtime {}; {} build.",
            v.appliance, v.libtorch, v.tch, v.wasmtime, v.profile
        );
        let _ = writeln!(
            md,
            "- Model `{}`, {} camera(s) per request. Load: {} s per point after {} s of warm-up; `/v1/inference` sends {} camera JPEGs ({} bytes each); OIP sends preprocessed binary tensors ({} KB). The load generator and the appliance share the machine.{}\n",
            s.model,
            s.cameras,
            s.seconds_per_point,
            s.warmup_s,
            s.image,
            s.jpeg_bytes,
            s.oip_bytes / 1000,
            if s.smoke { " **Smoke run: too short for its figures to mean anything.**" } else { "" }
        );

        let _ = writeln!(md, "## Targets\n\n| what | target | measured | met | how |\n|---|---|---|---|---|");
        for t in &self.targets {
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} |",
                t.what,
                t.target,
                t.measured,
                if t.met { "yes" } else { "**no**" },
                t.note
            );
        }

        let _ = writeln!(
            md,
            "\n## The model alone (in-process, no server)\n\n| batch | forward ms | forward samples/s | decode + preprocess + forward ms | its samples/s |\n|---:|---:|---:|---:|---:|"
        );
        for f in &self.forward {
            let p = self.pipeline.iter().find(|p| p.batch_size == f.batch_size);
            let _ = writeln!(
                md,
                "| {} | {:.2} | {:.0} | {} | {} |",
                f.batch_size,
                f.median_ms,
                f.samples_per_s,
                p.map_or("–".into(), |p| format!("{:.2}", p.median_ms)),
                p.map_or("–".into(), |p| format!("{:.0}", p.samples_per_s))
            );
        }

        let standard = Variant::standard();
        for endpoint in [Endpoint::V1, Endpoint::Oip] {
            let points: Vec<&Point> = self.points(&standard.name, endpoint, "closed").collect();
            if points.is_empty() {
                continue;
            }
            let _ = writeln!(md, "\n## Closed loop, {} ({})\n", endpoint.label(), standard.describe());
            point_table(&mut md, &points);
        }
        let open: Vec<&Point> = self.points.iter().filter(|p| p.mode == "open").collect();
        if !open.is_empty() {
            let _ = writeln!(md, "\n## Open loop: robots at a fixed control rate ({})\n", standard.describe());
            let _ = writeln!(
                md,
                "Latency counts from when each request was due, so queueing shows (no coordinated omission).\n"
            );
            point_table(&mut md, &open);
        }
        let _ = writeln!(
            md,
            "\n## Comparisons\n\n| variant | endpoint | clients | req/s | p50 ms | p99 ms | mean batch | policies ms | errors |\n|---|---|---:|---:|---:|---:|---:|---:|---:|"
        );
        // The standard appliance's points where some other variant has one to compare with.
        let compared: std::collections::BTreeSet<(Endpoint, usize)> = self
            .points
            .iter()
            .filter(|p| p.variant != standard.name && p.mode == "closed")
            .map(|p| (p.endpoint, p.clients))
            .collect();
        for variant in &self.variants {
            for p in self.points.iter().filter(|p| p.variant == variant.name && p.mode == "closed") {
                if variant.name == standard.name && !compared.contains(&(p.endpoint, p.clients)) {
                    continue;
                }
                let _ = writeln!(
                    md,
                    "| {} | {} | {} | {:.1} | {:.2} | {:.2} | {:.2} | {:.2} | {} |",
                    variant.describe(),
                    p.endpoint.label(),
                    p.clients,
                    p.throughput_rps,
                    p.latency_ms.p50,
                    p.latency_ms.p99,
                    p.mean_batch,
                    p.server_ms.policy,
                    p.error_count()
                );
            }
        }
        let errors: Vec<(&Point, &String, &Errors)> =
            self.points.iter().flat_map(|p| p.errors.iter().map(move |(k, e)| (p, k, e))).collect();
        if !errors.is_empty() {
            let _ = writeln!(
                md,
                "\n## Errors\n\n| variant | endpoint | load | error | count | first |\n|---|---|---|---|---:|---|"
            );
            for (p, key, e) in errors {
                let _ = writeln!(
                    md,
                    "| {} | {} | {} | {key} | {} | {} |",
                    p.variant,
                    p.endpoint.label(),
                    load(p),
                    e.count,
                    e.example.replace('|', "/")
                );
            }
        }
        if !charts.is_empty() {
            let _ = writeln!(md, "\n## Charts\n");
            for (file, title) in charts {
                let _ = writeln!(md, "![{title}]({file})\n");
            }
        }
        md
    }
}

fn load(p: &Point) -> String {
    match p.hz {
        Some(hz) => format!("{} robots at {hz} Hz", p.clients),
        None => format!("{} clients", p.clients),
    }
}

fn point_table(md: &mut String, points: &[&Point]) {
    let _ = writeln!(
        md,
        "| load | req/s | p50 ms | p90 ms | p99 ms | p99.9 ms | max ms | errors | mean batch | server: queue / preprocess / inference / policies ms | load gen cores | appliance cores |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|"
    );
    let cores = |c: Option<f64>| c.map_or("–".into(), |c| format!("{c:.2}"));
    for p in points {
        let l = &p.latency_ms;
        let b = &p.server_ms;
        let _ = writeln!(
            md,
            "| {} | {:.1} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {} | {:.2} | {:.2} / {:.2} / {:.2} / {:.2} | {} | {} |",
            load(p),
            p.throughput_rps,
            l.p50,
            l.p90,
            l.p99,
            l.p999,
            l.max,
            p.error_count(),
            p.mean_batch,
            b.queue,
            b.preprocess,
            b.inference,
            b.policy,
            cores(p.loadgen_cores),
            cores(p.appliance_cores)
        );
    }
}
