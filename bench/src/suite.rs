//! The standard suite: the model's own limits, then the appliance (in its own process) under
//! closed- and open-loop load, then the comparisons; the report, its markdown and its charts
//! are written into one directory.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use appliance::model::LoadedModel;

use crate::load::{self, Body, Endpoint, Robot};
use crate::machine::{self, Machine, Versions};
use crate::report::{Point, Report, Settings};
use crate::server::{Appliance, Variant};
use crate::{baseline, charts, fixtures};

/// What the suite runs.
#[derive(Debug, Clone)]
pub struct Options {
    /// Where the report and charts go.
    pub out: PathBuf,
    /// Closed-loop client counts for the standard appliance, on both endpoints.
    pub sweep: Vec<usize>,
    /// Closed-loop client counts for the comparisons (batching off, no policies, `interval`
    /// quotas).
    pub compare_at: Vec<usize>,
    /// Open-loop loads: `(robots, hz)`.
    pub open: Vec<(usize, f64)>,
    /// Seconds measured per load point, after `warmup` seconds.
    pub seconds: f64,
    pub warmup: f64,
    /// Open-loop points run this long (a longer window gives a steadier p99).
    pub open_seconds: f64,
    /// Batch sizes of the in-process baselines, and seconds per size.
    pub batch_sizes: Vec<usize>,
    pub baseline_seconds: f64,
    /// Camera frames for `/v1/inference`.
    pub image: (u32, u32),
    /// `auto` (CUDA when usable), `cpu` or `cuda:N`, for the appliance and the baselines.
    pub device: String,
    /// The model directory to serve, or `conv-vla` for the generated compute-bound stand-in
    /// ([`crate::standin`]); the generated demo (`tiny-vla`) when absent.
    pub model: Option<PathBuf>,
    pub smoke: bool,
}

impl Options {
    /// The standard suite: a few minutes on the 2-core development machine.
    pub fn standard(out: PathBuf) -> Options {
        Options {
            out,
            sweep: vec![1, 2, 4, 8, 16, 32, 64, 128],
            compare_at: vec![1, 8, 32],
            open: vec![(16, 10.0), (8, 30.0)],
            seconds: 3.0,
            warmup: 1.0,
            open_seconds: 10.0,
            batch_sizes: vec![1, 2, 4, 8, 16, 32],
            baseline_seconds: 1.0,
            image: (320, 240),
            device: "auto".into(),
            model: None,
            smoke: false,
        }
    }

    /// Every part of the suite, briefly (seconds): keeps the tool from rotting.
    pub fn smoke(out: PathBuf) -> Options {
        Options {
            sweep: vec![1, 4],
            compare_at: vec![1, 4],
            open: vec![(4, 10.0)],
            seconds: 0.4,
            warmup: 0.1,
            open_seconds: 0.5,
            batch_sizes: vec![1, 8],
            baseline_seconds: 0.05,
            smoke: true,
            ..Options::standard(out)
        }
    }
}

/// A variant of the appliance, and what the suite runs against it.
struct Plan {
    variant: Variant,
    /// Runs with the threads and the batch cap the first plan's instance measured (see
    /// [`Variant::pinned`]): a comparison with it then differs only in what the variant says.
    pinned: bool,
    endpoints: Vec<Endpoint>,
    closed: Vec<usize>,
    open: Vec<(usize, f64)>,
}

fn plans(o: &Options) -> Vec<Plan> {
    let standard = Variant::standard();
    vec![
        Plan {
            variant: standard.clone(),
            pinned: false,
            endpoints: vec![Endpoint::V1, Endpoint::Oip],
            closed: o.sweep.clone(),
            open: o.open.clone(),
        },
        Plan {
            variant: Variant { name: "batching-off".into(), batching: false, ..standard.clone() },
            pinned: false,
            endpoints: vec![Endpoint::V1, Endpoint::Oip],
            closed: o.compare_at.clone(),
            open: Vec::new(),
        },
        Plan {
            variant: Variant { name: "no-policies".into(), policies: false, ..standard.clone() },
            pinned: true,
            endpoints: vec![Endpoint::V1],
            closed: o.compare_at.clone(),
            open: Vec::new(),
        },
        Plan {
            variant: Variant { name: "interval-quotas".into(), durability: "interval:100".into(), ..standard },
            pinned: true,
            endpoints: vec![Endpoint::V1],
            closed: o.compare_at.clone(),
            open: Vec::new(),
        },
    ]
}

/// Runs the suite and writes `report.json`, `report.md`, the charts and the appliance's logs
/// (`appliance-<variant>.log`) into `o.out`.
pub fn run(o: &Options) -> anyhow::Result<Report> {
    std::fs::create_dir_all(&o.out).with_context(|| format!("creating {}", o.out.display()))?;
    let exe = std::env::current_exe().context("finding the bench binary (it serves the appliance too)")?;
    let tmp = tempfile::tempdir()?;
    let model_dir = match &o.model {
        Some(name) if name.as_os_str() == crate::standin::NAME => crate::standin::generate(tmp.path())?,
        Some(dir) => dir.clone(),
        None => fixtures::demo_model(tmp.path())?,
    };
    let work = fixtures::Workload::load(&model_dir)?;
    let device_spec: appliance::spec::DeviceSpec = o.device.parse().map_err(anyhow::Error::msg)?;
    let device = appliance::model::resolve_device(device_spec)?;
    let (w, h) = o.image;
    let cams = work.cameras().max(1);
    let frames: Vec<Vec<u8>> = (0..16 * cams as u32).map(|i| fixtures::jpeg(w, h, i)).collect();

    // The model's own limits first, on this thread, with nothing else running.
    eprintln!(
        "baselines: {} alone at batch sizes {:?} on {}",
        work.name(),
        o.batch_sizes,
        appliance::model::device_name(device)
    );
    let (forward, pipeline) = {
        let model = LoadedModel::load(&model_dir, &work.spec, device)?;
        model.warm_up(&o.batch_sizes, 2)?;
        let forward = baseline::forward(&model, &work, &o.batch_sizes, o.baseline_seconds)?;
        let pipeline = baseline::pipeline(&model, &work, &frames, &o.batch_sizes, o.baseline_seconds)?;
        (forward, pipeline)
    };

    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().thread_name("loadgen").build()?;
    let plans = plans(o);
    let robots =
        plans.iter().flat_map(|p| p.closed.iter().copied().chain(p.open.iter().map(|&(n, _)| n))).max().unwrap_or(1);
    let oip_bodies: Arc<[Body]> =
        (0..4).map(|i| work.oip_body(i)).map(|(bytes, n)| Body { bytes, header_len: Some(n) }).collect();
    let mut points = Vec::new();
    let mut first_measured = None;
    let mut variants = Vec::with_capacity(plans.len());
    for (p, plan) in plans.iter().enumerate() {
        variants.push(Variant { pinned: if plan.pinned { first_measured } else { None }, ..plan.variant.clone() });
        let v = &variants[p];
        eprintln!("appliance: {} ({})", v.name, v.describe());
        let log = o.out.join(format!("appliance-{}.log", v.name));
        let appliance = runtime
            .block_on(Appliance::start(&exe, v, &model_dir, &o.device, robots, &log))
            .with_context(|| format!("starting the appliance ({}); its log: {}", v.name, log.display()))?;
        if p == 0 {
            first_measured =
                runtime.block_on(appliance.cpu_threads(work.name())).as_ref().and_then(crate::server::Pinned::measured);
        }
        let result = runtime.block_on(async {
            let ca = appliance.certificate()?;
            for &endpoint in &plan.endpoints {
                let fleet = appliance
                    .robots
                    .iter()
                    .enumerate()
                    .map(|(i, (id, key))| {
                        let bodies: Arc<[Body]> = match endpoint {
                            Endpoint::V1 => {
                                let mine: Vec<Vec<u8>> =
                                    (0..4 * cams).map(|j| frames[(i * 4 * cams + j) % frames.len()].clone()).collect();
                                work.v1_bodies(id, &mine)
                                    .into_iter()
                                    .map(|bytes| Body { bytes, header_len: None })
                                    .collect()
                            }
                            Endpoint::Oip => oip_bodies.clone(),
                        };
                        Robot::new(id, key, &ca, appliance.addr, (endpoint, work.name()), bodies)
                    })
                    .collect::<anyhow::Result<Vec<_>>>()?;
                let warmup = Duration::from_secs_f64(o.warmup);
                for &clients in &plan.closed {
                    let measure = Duration::from_secs_f64(o.seconds);
                    let point = measured(
                        &appliance,
                        || load::closed_loop(&fleet[..clients], clients, warmup, measure),
                        |r| Point::new(&v.name, endpoint, "closed", clients, None, r),
                    )
                    .await;
                    progress(&point);
                    points.push(point);
                }
                if endpoint == Endpoint::V1 {
                    for &(n, hz) in &plan.open {
                        let measure = Duration::from_secs_f64(o.open_seconds);
                        let point = measured(
                            &appliance,
                            || load::open_loop(&fleet[..n], n, hz, warmup, measure),
                            |r| Point::new(&v.name, endpoint, "open", n, Some(hz), r),
                        )
                        .await;
                        progress(&point);
                        points.push(point);
                    }
                }
            }
            anyhow::Ok(())
        });
        let stopped = appliance.stop();
        result?;
        stopped?;
    }

    let jpeg_bytes = frames.iter().map(Vec::len).sum::<usize>() / frames.len();
    let mut report = Report {
        date: machine::now_utc(),
        machine: Machine::read(appliance::model::device_name(device)),
        versions: Versions::current(),
        settings: Settings {
            model: work.name().to_string(),
            cameras: work.cameras(),
            image: format!("{w}x{h}"),
            oip_bytes: oip_bodies.first().map_or(0, |b| b.bytes.len()),
            jpeg_bytes,
            seconds_per_point: o.seconds,
            warmup_s: o.warmup,
            smoke: o.smoke,
        },
        forward,
        pipeline,
        variants,
        points,
        targets: Vec::new(),
    };
    report.judge();
    let charts = charts::write_all(&report, &o.out)?;
    std::fs::write(o.out.join("report.json"), serde_json::to_string_pretty(&report)?)?;
    std::fs::write(o.out.join("report.md"), report.markdown(&charts))?;
    Ok(report)
}

/// Runs one load point, with the CPU time the load generator (this process) and the appliance
/// spent on it.
async fn measured<F, L>(appliance: &Appliance, load: L, point: impl FnOnce(load::Recorded) -> Point) -> Point
where
    L: FnOnce() -> F,
    F: Future<Output = load::Recorded>,
{
    let (own, theirs, started) = (machine::cpu_seconds(None), appliance.cpu_seconds(), Instant::now());
    let recorded = load().await;
    let wall = started.elapsed().as_secs_f64();
    let mut p = point(recorded);
    p.loadgen_cores = own.zip(machine::cpu_seconds(None)).map(|(a, b)| (b - a) / wall);
    p.appliance_cores = theirs.zip(appliance.cpu_seconds()).map(|(a, b)| (b - a) / wall);
    p
}

fn progress(p: &Point) {
    let load = match p.hz {
        Some(hz) => format!("{} robots at {hz} Hz", p.clients),
        None => format!("{} clients", p.clients),
    };
    eprintln!(
        "  {:<14} {:<13} {:<20} {:>7.1} req/s  p50 {:>7.2} ms  p99 {:>7.2} ms  batch {:>5.2}  errors {}",
        p.variant,
        p.endpoint.label(),
        load,
        p.throughput_rps,
        p.latency_ms.p50,
        p.latency_ms.p99,
        p.mean_batch,
        p.error_count()
    );
}
