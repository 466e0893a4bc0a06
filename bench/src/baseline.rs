//! The model's own limits on this machine, measured in-process through libtorch with no
//! server: what the appliance's throughput is measured against.
//!
//! - [`forward`]: the forward alone at each batch size (preprocessed tensors, as OIP binary
//!   requests bring them);
//! - [`pipeline`]: what a robot's request needs done without the server: JPEG decode,
//!   resize and normalisation of every camera (spread over every core, as the appliance
//!   does), instruction tokens, state normalisation, noise, batch assembly, the forward and
//!   the split of the outputs.
//!
//! Both warm up and run on the calling thread (libtorch's threads stay the same team).

use std::time::Instant;

use appliance::model::{LoadedModel, TensorData};
use serde::{Deserialize, Serialize};

use crate::fixtures::Workload;

/// One batch size's figures.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Row {
    pub batch_size: usize,
    /// Median time of one batch, milliseconds.
    pub median_ms: f64,
    pub p90_ms: f64,
    /// `batch_size / median`: samples per second.
    pub samples_per_s: f64,
    pub iterations: usize,
}

/// The best samples/s over `rows`, and its batch size.
pub fn best(rows: &[Row]) -> Option<&Row> {
    rows.iter().max_by(|a, b| a.samples_per_s.total_cmp(&b.samples_per_s))
}

/// Times `run` (one batch of `n`) for at least `seconds` (and 5 runs) after 3 warm-up runs.
fn time(n: usize, seconds: f64, mut run: impl FnMut() -> anyhow::Result<()>) -> anyhow::Result<Row> {
    for _ in 0..3 {
        run()?;
    }
    let mut times = Vec::new();
    let start = Instant::now();
    while start.elapsed().as_secs_f64() < seconds || times.len() < 5 {
        let t = Instant::now();
        run()?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    let median = crate::stats::quantile(&times, 0.5);
    Ok(Row {
        batch_size: n,
        median_ms: median,
        p90_ms: crate::stats::quantile(&times, 0.9),
        samples_per_s: n as f64 / median * 1e3,
        iterations: times.len(),
    })
}

/// The forward alone, batch by batch: inputs stacked once, then the forward and the copy of
/// the actions back to the host (which waits for a GPU to finish).
pub fn forward(model: &LoadedModel, work: &Workload, batch_sizes: &[usize], seconds: f64) -> anyhow::Result<Vec<Row>> {
    let sample = work.sample(0);
    batch_sizes
        .iter()
        .map(|&n| {
            let samples: Vec<&[TensorData]> = (0..n).map(|_| sample.as_slice()).collect();
            let inputs = model.stack(&samples)?;
            time(n, seconds, || {
                model.forward_outputs(&inputs, n)?;
                Ok(())
            })
        })
        .collect()
}

/// The whole robot pipeline without the server, batch by batch, from JPEG bytes (one per
/// camera) to each robot's action.
pub fn pipeline(
    model: &LoadedModel,
    work: &Workload,
    frames: &[Vec<u8>],
    batch_sizes: &[usize],
    seconds: f64,
) -> anyhow::Result<Vec<Row>> {
    let limits = appliance::config::LimitsConfig::default();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let cams = work.cameras();
    let preprocess = |i: usize| -> anyhow::Result<Vec<TensorData>> {
        let jpegs: Vec<&[u8]> = (0..cams).map(|c| frames[(i * cams + c) % frames.len()].as_slice()).collect();
        work.robot_sample(&jpegs, i as u32, &limits)
    };
    batch_sizes
        .iter()
        .map(|&n| {
            time(n, seconds, || {
                // Decode and preprocess spread over the cores, as the appliance's blocking pool does.
                let chunk = n.div_ceil(threads);
                let samples: Vec<Vec<TensorData>> = std::thread::scope(|s| {
                    let parts: Vec<_> = (0..n)
                        .step_by(chunk)
                        .map(|first| {
                            s.spawn(move || {
                                (first..(first + chunk).min(n)).map(preprocess).collect::<anyhow::Result<Vec<_>>>()
                            })
                        })
                        .collect();
                    parts
                        .into_iter()
                        .map(|p| p.join().map_err(|_| anyhow::anyhow!("a decode thread panicked"))?)
                        .collect::<anyhow::Result<Vec<_>>>()
                })?
                .into_iter()
                .flatten()
                .collect();
                let refs: Vec<&[TensorData]> = samples.iter().map(Vec::as_slice).collect();
                let inputs = model.stack(&refs)?;
                let outputs = model.forward_outputs(&inputs, n)?;
                std::hint::black_box(outputs);
                Ok(())
            })
        })
        .collect()
}
