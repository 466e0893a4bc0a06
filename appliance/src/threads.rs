//! How many libtorch intra-op threads a CPU executor runs its forwards with, and the largest
//! batch it forms.
//!
//! `models.cpu_threads` sets the count. Left at 0, the first executor of each model measures at
//! warm-up, on its own thread (the thread that will run the forwards: a second OpenMP team
//! made forwards ~50 % slower here): it times the forward at every size of [`batch_ladder`]
//! (1, 2, 4, … the model's largest batch) with each candidate count, in [`PASSES`] passes in
//! alternating order, keeping each pair's fastest (a machine whose speed drifts or stalls
//! during the measurement then favours no count), and the model's other executors use the
//! count it chose. The rule, [`choose`]:
//!
//! - the candidates are 1, 2, 4, 8, … up to the cores shared between the executors, plus that
//!   share and the share less one core;
//! - a candidate's score is the mean of two ratios to the best candidate: its forward at batch
//!   1 (what a lone robot waits for) and its lowest time per sample at any size of the ladder
//!   (what a full queue runs at, with batches capped at that size); the fewest threads within
//!   [`NEAR`] of the lowest score win;
//! - using every core of the share pays only when it makes the forward at least
//!   [`ALL_CORES_GAIN`] faster than the best count that leaves a core to the server (TLS,
//!   JSON, image decoding and policies run beside the forward: an OpenMP team that wants every
//!   core stalls at each barrier whenever the server takes one; on the 2-core bench machine a
//!   weight-bound model ran 2–3× slower under load with two threads than with one, while a
//!   compute-bound one ran twice as fast with two).
//!
//! With the count chosen, the executors cap the batches they form at [`largest_batch`] of that
//! count's timings: the largest size whose time per sample is within [`BATCH_NEAR`] of the
//! lowest. On a CPU a batch stops paying once its activations outgrow the caches:
//! the bench's compute-bound conv encoder ran 418 samples/s at batch 8 and 218 at batch 32 with
//! two threads, so a full queue of 32 runs faster as four batches of 8. Scoring a count at its
//! own best size matters for the same reason: timed only at batch 32, two threads looked no
//! better than one for that model, though they ran its batches of 8 1.8× faster. Near the
//! lowest, the larger size wins: timed alone, the forward cannot tell sizes a few per cent
//! apart (warm-up after warm-up, conv-vla's 4 and 8 and tiny-vla's 16 and 32 swapped places),
//! while a batch costs more than its forward (the hand-off to the executor, stacking, splitting
//! the outputs, waking each request's task), which the larger one pays for fewer samples (two
//! instances of one bench run, with and without the policies, measured 4 and 8 for conv-vla
//! and served 227 and 310 req/s at 32 clients).
//! `max_batch_size` stays the most a batch may hold (and what the model accepts).

use std::time::Duration;

/// How much faster the forward must be with every core of the share than with one left to
/// the server for the appliance to take it.
pub const ALL_CORES_GAIN: f64 = 1.25;

/// Scores within this factor of the best count as the same: the fewer threads win.
pub const NEAR: f64 = 1.05;

/// Passes over the candidates; the second runs them in reverse order.
pub const PASSES: usize = 2;

/// Per-sample times within this factor of the lowest count as the same: the larger batch wins
/// (it pays a batch's own costs for fewer samples).
pub const BATCH_NEAR: f64 = 1.03;

/// The cores each of `instances` executors may use, at least one.
pub fn share(cores: usize, instances: usize) -> usize {
    (cores / instances.max(1)).max(1)
}

/// The count that leaves one core to the server (when there is more than one), shared between
/// the executors, at least one each: what the appliance used before measuring.
pub fn leave_one_core(cores: usize, instances: usize) -> usize {
    (cores.saturating_sub(1) / instances.max(1)).max(1)
}

/// One timed forward of the measurement.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Timing {
    pub threads: usize,
    pub batch_size: usize,
    pub forward: Duration,
}

/// The count chosen and what it was chosen from.
#[derive(Debug, Clone, PartialEq)]
pub struct Choice {
    pub threads: usize,
    pub timings: Vec<Timing>,
}

/// The candidate counts for one executor's share of `cores`, ascending.
pub fn candidates(cores: usize, instances: usize) -> Vec<usize> {
    let share = share(cores, instances);
    let mut c: Vec<usize> =
        std::iter::successors(Some(1usize), |n| n.checked_mul(2)).take_while(|&n| n <= share).collect();
    c.extend([share, leave_one_core(cores, instances).min(share)]);
    c.sort_unstable();
    c.dedup();
    c
}

/// Times the forward with every candidate at every size (`time(threads, batch_size)` sets the
/// thread count and times one forward, typically a median of a few) and picks by the rule in
/// the module header. `sizes` should hold 1 (a size-1 forward stands in for it otherwise: the
/// smallest timed). The first error stops the measurement.
pub fn choose<E>(
    cores: usize,
    instances: usize,
    sizes: &[usize],
    mut time: impl FnMut(usize, usize) -> Result<Duration, E>,
) -> Result<Choice, E> {
    let candidates = candidates(cores, instances);
    let mut timings: Vec<Timing> = Vec::new();
    for pass in 0..PASSES {
        let order: Vec<usize> =
            if pass % 2 == 0 { candidates.clone() } else { candidates.iter().rev().copied().collect() };
        for &threads in &order {
            for &batch_size in sizes {
                let forward = time(threads, batch_size)?;
                match timings.iter_mut().find(|t| t.threads == threads && t.batch_size == batch_size) {
                    Some(t) => t.forward = t.forward.min(forward),
                    None => timings.push(Timing { threads, batch_size, forward }),
                }
            }
        }
    }
    timings.sort_by_key(|t| (t.threads, t.batch_size));
    let smallest = sizes.iter().copied().min().unwrap_or(1);
    // One count's (forward at the smallest size, lowest time per sample), in seconds.
    let figures = |threads: usize| {
        let of = || timings.iter().filter(move |t| t.threads == threads);
        let alone =
            of().filter(|t| t.batch_size == smallest).map(|t| t.forward.as_secs_f64()).fold(f64::INFINITY, f64::min);
        let per_sample =
            of().map(|t| t.forward.as_secs_f64() / t.batch_size.max(1) as f64).fold(f64::INFINITY, f64::min);
        (alone, per_sample)
    };
    let (best_alone, best_per_sample) = candidates
        .iter()
        .map(|&t| figures(t))
        .fold((f64::INFINITY, f64::INFINITY), |(a, p), (ta, tp)| (a.min(ta), p.min(tp)));
    let score = |threads: usize| {
        let (alone, per_sample) = figures(threads);
        (alone / best_alone.max(f64::MIN_POSITIVE) + per_sample / best_per_sample.max(f64::MIN_POSITIVE)) / 2.0
    };
    // The fewest threads within NEAR of the lowest score among `among`.
    let fewest_near = |among: &[usize]| {
        let best = among.iter().map(|&t| score(t)).fold(f64::INFINITY, f64::min);
        among.iter().copied().find(|&t| score(t) <= best * NEAR).map(|t| (t, best))
    };
    let share = share(cores, instances);
    let Some((mut threads, best)) = fewest_near(&candidates) else {
        return Ok(Choice { threads: 1, timings });
    };
    let fewer: Vec<usize> = candidates.iter().copied().filter(|&t| t < share).collect();
    if threads == share
        && let Some((t, best_fewer)) = fewest_near(&fewer)
        && best_fewer < best * ALL_CORES_GAIN
    {
        threads = t;
    }
    Ok(Choice { threads, timings })
}

/// The largest batch worth forming with the chosen count: [`largest_batch`] of its timings.
pub fn chosen_largest_batch(choice: &Choice) -> usize {
    let timed: Vec<(usize, Duration)> =
        choice.timings.iter().filter(|t| t.threads == choice.threads).map(|t| (t.batch_size, t.forward)).collect();
    largest_batch(&timed)
}

/// The batch sizes [`choose`] times: 1, 2, 4, 8, … below `max`, then `max`.
pub fn batch_ladder(max: usize) -> Vec<usize> {
    let max = max.max(1);
    let mut sizes: Vec<usize> =
        std::iter::successors(Some(1usize), |n| n.checked_mul(2)).take_while(|&n| n < max).collect();
    sizes.push(max);
    sizes
}

/// The largest batch worth forming, from one forward time per batch size: the size with the
/// lowest time per sample, or the largest within [`BATCH_NEAR`] of it. 1 when nothing was
/// timed.
pub fn largest_batch(timed: &[(usize, Duration)]) -> usize {
    let per_sample = |&(n, t): &(usize, Duration)| t.as_secs_f64() / n.max(1) as f64;
    let best = timed.iter().map(per_sample).fold(f64::INFINITY, f64::min);
    timed.iter().filter(|t| per_sample(t) <= best * BATCH_NEAR).map(|t| t.0).max().unwrap_or(1).max(1)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_old_rule_and_the_shares() {
        assert_eq!(leave_one_core(2, 1), 1);
        assert_eq!(leave_one_core(16, 1), 15);
        assert_eq!(leave_one_core(16, 3), 5);
        assert_eq!(leave_one_core(1, 1), 1);
        assert_eq!(leave_one_core(4, 8), 1);
        assert_eq!(leave_one_core(0, 0), 1);
        assert_eq!(share(2, 1), 2);
        assert_eq!(share(16, 3), 5);
        assert_eq!(candidates(2, 1), vec![1, 2]);
        assert_eq!(candidates(16, 1), vec![1, 2, 4, 8, 15, 16]);
        assert_eq!(candidates(16, 3), vec![1, 2, 4, 5]);
        assert_eq!(candidates(1, 1), vec![1]);
    }

    /// A forward that takes `work / threads^scaling` plus a fixed part.
    fn model(work_ms: f64, scaling: f64) -> impl FnMut(usize, usize) -> Result<Duration, ()> {
        move |threads, batch| {
            Ok(Duration::from_secs_f64((0.2 + work_ms * batch as f64 / (threads as f64).powf(scaling)) / 1000.0))
        }
    }

    #[test]
    fn a_compute_bound_forward_takes_every_core() {
        let choice = choose(2, 1, &[1, 32], model(4.0, 0.95)).unwrap();
        assert_eq!(choice.threads, 2);
        assert_eq!(choice.timings.len(), 4);
    }

    #[test]
    fn a_forward_that_barely_scales_leaves_a_core_to_the_server() {
        // 1.15× faster with two threads: not worth the stalls under load.
        assert_eq!(choose(2, 1, &[1, 32], model(4.0, 0.2)).unwrap().threads, 1);
        // Within 5 % of the fastest: the fewest threads that are.
        assert_eq!(choose(16, 1, &[1, 8], model(4.0, 0.03)).unwrap().threads, 4);
    }

    #[test]
    fn more_threads_that_run_slower_are_not_taken() {
        let slower = |threads: usize, _batch: usize| Ok::<_, ()>(Duration::from_millis(threads as u64));
        assert_eq!(choose(8, 1, &[1, 4], slower).unwrap().threads, 1);
    }

    #[test]
    fn a_stall_during_one_pass_does_not_decide() {
        // Two threads are twice as fast, but the machine stalled while the first pass timed
        // them at batch 32.
        let mut calls = 0;
        let stalled = |threads: usize, batch: usize| {
            calls += 1;
            let stall = if calls == 4 { 3.0 } else { 1.0 };
            Ok::<_, ()>(Duration::from_secs_f64(batch as f64 * stall / threads as f64 / 1000.0))
        };
        let choice = choose(2, 1, &[1, 32], stalled).unwrap();
        assert_eq!(choice.threads, 2);
        assert_eq!(choice.timings.len(), 4);
    }

    #[test]
    fn the_ladder_ends_at_the_largest_batch() {
        assert_eq!(batch_ladder(32), vec![1, 2, 4, 8, 16, 32]);
        assert_eq!(batch_ladder(12), vec![1, 2, 4, 8, 12]);
        assert_eq!(batch_ladder(1), vec![1]);
        assert_eq!(batch_ladder(0), vec![1]);
    }

    fn ms(sizes_ms: &[(usize, f64)]) -> Vec<(usize, Duration)> {
        sizes_ms.iter().map(|&(n, t)| (n, Duration::from_secs_f64(t / 1000.0))).collect()
    }

    #[test]
    fn batches_stop_growing_where_a_sample_costs_the_least() {
        // conv-vla on the 2-core bench machine, two threads: batch 8 is the most efficient,
        // 16 and 32 outgrow the caches.
        let conv = ms(&[(1, 3.6), (2, 6.5), (4, 11.9), (8, 19.1), (16, 58.0), (32, 146.5)]);
        assert_eq!(largest_batch(&conv), 8);
        // Still cheaper per sample at the largest batch: no cap.
        let weights = ms(&[(1, 3.0), (2, 4.0), (4, 5.5), (8, 8.0), (16, 13.0), (32, 22.0)]);
        assert_eq!(largest_batch(&weights), 32);
        // 16 saves under 3 % a sample over 32: the measurement cannot tell them apart, and 32
        // pays a batch's own costs for fewer samples.
        let flat = ms(&[(1, 3.0), (4, 7.8), (8, 10.2), (16, 16.0), (32, 32.6)]);
        assert_eq!(largest_batch(&flat), 32);
        // Nor beyond the near band: 16 costs 8 % more a sample than 8.
        let past = ms(&[(1, 3.0), (4, 8.1), (8, 16.0), (16, 34.6)]);
        assert_eq!(largest_batch(&past), 8);
        // A forward that costs more per sample in a batch runs its requests one by one; one
        // that costs the same still batches (the batch's own costs are paid once).
        assert_eq!(largest_batch(&ms(&[(1, 2.0), (2, 4.4), (4, 8.8)])), 1);
        assert_eq!(largest_batch(&ms(&[(1, 2.0), (2, 4.0), (4, 8.1)])), 4);
        assert_eq!(largest_batch(&[]), 1);
    }

    #[test]
    fn a_count_is_judged_at_its_best_batch_size() {
        // conv-vla on the 2-core bench machine: two threads run batch 8 1.6× faster per sample
        // than one, but both outgrow the caches at 32, where one thread is even a little
        // faster.
        let table = |threads: usize, batch: usize| {
            let ms = match (threads, batch) {
                (1, 1) => 3.9,
                (1, 2) => 7.6,
                (1, 4) => 15.0,
                (1, 8) => 30.5,
                (1, 16) => 64.0,
                (1, 32) => 120.0,
                (2, 1) => 2.2,
                (2, 2) => 4.2,
                (2, 4) => 8.0,
                (2, 8) => 15.3,
                (2, 16) => 58.0,
                (2, 32) => 146.0,
                _ => unreachable!(),
            };
            Ok::<_, ()>(Duration::from_secs_f64(ms / 1000.0))
        };
        let choice = choose(2, 1, &batch_ladder(32), table).unwrap();
        assert_eq!(choice.threads, 2);
        assert_eq!(choice.timings.len(), 12);
        assert_eq!(chosen_largest_batch(&choice), 8);
    }

    #[test]
    fn a_failed_forward_stops_the_measurement() {
        let mut calls = 0;
        let failing = |_: usize, _: usize| {
            calls += 1;
            Err::<Duration, _>("out of memory")
        };
        assert_eq!(choose(4, 1, &[1, 8], failing), Err("out of memory"));
        assert_eq!(calls, 1);
    }
}
