//! Latency percentiles and distributions.

use serde::{Deserialize, Serialize};

/// A latency distribution, in milliseconds.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct Latency {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
    pub mean: f64,
}

/// The `q` quantile (0–1) of sorted samples, nearest rank: the smallest sample with at least
/// `q` of all samples at or below it. NaN when there are none.
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

impl Latency {
    /// Summarises samples (sorted in place).
    pub fn of(samples: &mut [f64]) -> Latency {
        samples.sort_by(f64::total_cmp);
        let mean = if samples.is_empty() { f64::NAN } else { samples.iter().sum::<f64>() / samples.len() as f64 };
        Latency {
            p50: quantile(samples, 0.5),
            p90: quantile(samples, 0.9),
            p99: quantile(samples, 0.99),
            p999: quantile(samples, 0.999),
            max: samples.last().copied().unwrap_or(f64::NAN),
            mean,
        }
    }
}

/// The empirical CDF of sorted samples at (at most) `points` evenly spaced fractions, plus the
/// tail (p99, p99.9, max) so that a chart shows it: `(latency, fraction at or below)`.
pub fn cdf(sorted: &[f64], points: usize) -> Vec<(f64, f64)> {
    if sorted.is_empty() || points == 0 {
        return Vec::new();
    }
    let mut fractions: Vec<f64> = (1..=points).map(|i| i as f64 / points as f64).collect();
    fractions.extend([0.99, 0.995, 0.999]);
    fractions.sort_by(f64::total_cmp);
    fractions.dedup();
    fractions.into_iter().map(|f| (quantile(sorted, f), f)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_quantiles() {
        let mut samples: Vec<f64> = (1..=1000).rev().map(f64::from).collect();
        let l = Latency::of(&mut samples);
        assert_eq!((l.p50, l.p90, l.p99, l.p999, l.max), (500.0, 900.0, 990.0, 999.0, 1000.0));
        assert_eq!(l.mean, 500.5);
        assert_eq!(quantile(&[7.0], 0.999), 7.0);
        assert_eq!(quantile(&[1.0, 2.0], 0.0), 1.0);
        assert!(quantile(&[], 0.5).is_nan());
    }

    #[test]
    fn cdf_ends_at_the_maximum() {
        let sorted: Vec<f64> = (1..=100).map(f64::from).collect();
        let c = cdf(&sorted, 10);
        assert_eq!(c.first(), Some(&(10.0, 0.1)));
        assert_eq!(c.last(), Some(&(100.0, 1.0)));
        assert!(c.windows(2).all(|w| w[0].0 <= w[1].0 && w[0].1 < w[1].1));
        assert!(cdf(&[], 10).is_empty());
    }
}
