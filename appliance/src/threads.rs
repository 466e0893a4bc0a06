//! How many libtorch intra-op threads a CPU executor runs its forwards with.
//!
//! `models.cpu_threads` sets it. Left at 0, the first executor of each model measures at
//! warm-up, on its own thread (the thread that will run the forwards: a second OpenMP team
//! made forwards ~50 % slower here): it times the forward at batch size 1 and at the model's
//! largest batch with each candidate count, in [`PASSES`] passes in alternating order, keeping
//! each pair's fastest (a machine whose speed drifts or stalls during the measurement then
//! favours no count), and the model's other executors use the count it chose. The rule,
//! [`choose`]:
//!
//! - the candidates are 1, 2, 4, 8, … up to the cores shared between the executors, plus that
//!   share and the share less one core;
//! - a candidate's score is its mean, over the two sizes, of its time ÷ the best time at that
//!   size; the fewest threads within [`NEAR`] of the lowest score win;
//! - using every core of the share pays only when it makes the forward at least
//!   [`ALL_CORES_GAIN`] faster than the best count that leaves a core to the server (TLS,
//!   JSON, image decoding and policies run beside the forward: an OpenMP team that wants every
//!   core stalls at each barrier whenever the server takes one; on the 2-core bench machine a
//!   weight-bound model ran 2–3× slower under load with two threads than with one, while a
//!   compute-bound one ran twice as fast with two).

use std::time::Duration;

/// How much faster the forward must be with every core of the share than with one left to
/// the server for the appliance to take it.
pub const ALL_CORES_GAIN: f64 = 1.25;

/// Scores within this factor of the best count as the same: the fewer threads win.
pub const NEAR: f64 = 1.05;

/// Passes over the candidates; the second runs them in reverse order.
pub const PASSES: usize = 2;

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
/// the module header. The first error stops the measurement.
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
    let best_at = |size: usize| {
        timings.iter().filter(|t| t.batch_size == size).map(|t| t.forward.as_secs_f64()).fold(f64::INFINITY, f64::min)
    };
    let score = |threads: usize| {
        let ratios: Vec<f64> = timings
            .iter()
            .filter(|t| t.threads == threads)
            .map(|t| t.forward.as_secs_f64() / best_at(t.batch_size).max(f64::MIN_POSITIVE))
            .collect();
        ratios.iter().sum::<f64>() / ratios.len().max(1) as f64
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
