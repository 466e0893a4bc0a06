//! Just enough of Prometheus' text exposition format to read the appliance's own `/metrics`:
//! samples with labels, sums over label filters, and `histogram_quantile` over bucket deltas.

use std::collections::BTreeMap;

/// One sample line: `name{labels} value`.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

impl Sample {
    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }
}

/// A parsed scrape.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Scrape {
    pub samples: Vec<Sample>,
}

impl Scrape {
    /// Parses the text format; lines that do not parse are skipped (comments, timestamps and
    /// unknown syntax never stop the console).
    pub fn parse(text: &str) -> Scrape {
        Scrape { samples: text.lines().filter_map(parse_line).collect() }
    }

    /// Samples named `name` whose labels pass `keep`.
    pub fn series<'a>(
        &'a self,
        name: &'a str,
        keep: impl Fn(&Sample) -> bool + 'a,
    ) -> impl Iterator<Item = &'a Sample> {
        self.samples.iter().filter(move |s| s.name == name && keep(s))
    }

    /// The sum of the samples named `name` whose labels pass `keep` (0 when none).
    pub fn sum(&self, name: &str, keep: impl Fn(&Sample) -> bool) -> f64 {
        self.series(name, keep).map(|s| s.value).sum()
    }

    /// A histogram's cumulative buckets `(le, count)` summed over the series that pass `keep`,
    /// in ascending `le` (`+Inf` last).
    pub fn buckets(&self, histogram: &str, keep: impl Fn(&Sample) -> bool) -> Vec<(f64, f64)> {
        let name = format!("{histogram}_bucket");
        let mut by_le: BTreeMap<OrdF64, f64> = BTreeMap::new();
        for s in self.series(&name, keep) {
            let Some(le) = s.label("le").and_then(parse_value) else { continue };
            *by_le.entry(OrdF64(le)).or_default() += s.value;
        }
        by_le.into_iter().map(|(le, c)| (le.0, c)).collect()
    }
}

/// Per-bucket increase from `before` to `after` (both as [`Scrape::buckets`] returns them). A
/// counter that went down (the appliance restarted) counts from zero, as Prometheus' `rate`.
pub fn bucket_delta(before: &[(f64, f64)], after: &[(f64, f64)]) -> Vec<(f64, f64)> {
    after
        .iter()
        .map(|&(le, now)| {
            let then = before.iter().find(|(l, _)| *l == le).map_or(0.0, |(_, c)| *c);
            (le, counter_delta(then, now))
        })
        .collect()
}

/// The increase of a counter from `then` to `now`, resets included.
pub fn counter_delta(then: f64, now: f64) -> f64 {
    if now >= then { now - then } else { now }
}

/// `histogram_quantile(q, …)` over cumulative buckets: linear interpolation within the bucket
/// that holds the rank; the highest finite bound when it falls in `+Inf`. `None` without
/// observations.
pub fn quantile(q: f64, buckets: &[(f64, f64)]) -> Option<f64> {
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let mut prev_le = 0.0;
    let mut prev_count = 0.0;
    for &(le, count) in buckets {
        if count >= rank {
            if le.is_infinite() {
                return Some(prev_le);
            }
            let in_bucket = count - prev_count;
            let fraction = if in_bucket > 0.0 { (rank - prev_count) / in_bucket } else { 1.0 };
            return Some(prev_le + (le - prev_le) * fraction);
        }
        prev_le = le;
        prev_count = count;
    }
    Some(prev_le)
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct OrdF64(f64);
impl Eq for OrdF64 {}
impl PartialOrd for OrdF64 {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for OrdF64 {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.total_cmp(&other.0)
    }
}

fn parse_value(v: &str) -> Option<f64> {
    match v {
        "+Inf" | "Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        _ => v.parse().ok(),
    }
}

fn parse_line(line: &str) -> Option<Sample> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let name_end = line.find(|c: char| c == '{' || c.is_whitespace())?;
    let name = line[..name_end].to_string();
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(inner) = rest.strip_prefix('{') {
        let mut chars = inner.char_indices().peekable();
        let end = loop {
            // Skip separators, then read `key="value"` or the closing brace.
            while let Some(&(_, c)) = chars.peek() {
                if c == ',' || c.is_whitespace() {
                    chars.next();
                } else {
                    break;
                }
            }
            let &(start, c) = chars.peek()?;
            if c == '}' {
                break start + 1;
            }
            let eq = inner[start..].find('=')? + start;
            let key = inner[start..eq].trim().to_string();
            while chars.peek().is_some_and(|&(i, _)| i <= eq) {
                chars.next();
            }
            if chars.next()?.1 != '"' {
                return None;
            }
            let mut value = String::new();
            loop {
                let (_, c) = chars.next()?;
                match c {
                    '"' => break,
                    '\\' => match chars.next()?.1 {
                        'n' => value.push('\n'),
                        other => value.push(other),
                    },
                    c => value.push(c),
                }
            }
            labels.push((key, value));
        };
        rest = &inner[end..];
    }
    let value = parse_value(rest.split_whitespace().next()?)?;
    Some(Sample { name, labels, value })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const TEXT: &str = r#"# HELP vla_inference_requests_total Answered requests.
# TYPE vla_inference_requests_total counter
vla_inference_requests_total{model="tiny-vla",robot_type="ur5e",status="success"} 7
vla_inference_requests_total{model="tiny-vla",robot_type="ur5e",status="rejected"} 2
vla_robot_requests_total{robot_id="odd \"one\", with\\comma",status="success"} 3
vla_inference_duration_seconds_bucket{model="tiny-vla",le="0.01"} 2
vla_inference_duration_seconds_bucket{model="tiny-vla",le="0.1"} 6
vla_inference_duration_seconds_bucket{model="tiny-vla",le="+Inf"} 8
vla_application_uptime_seconds 12.5
"#;

    #[test]
    fn parses_names_labels_escapes_and_values() {
        let s = Scrape::parse(TEXT);
        assert_eq!(s.samples.len(), 7);
        assert_eq!(s.sum("vla_inference_requests_total", |_| true), 9.0);
        assert_eq!(s.sum("vla_inference_requests_total", |s| s.label("status") == Some("success")), 7.0);
        let odd = s.series("vla_robot_requests_total", |_| true).next().unwrap();
        assert_eq!(odd.label("robot_id"), Some("odd \"one\", with\\comma"));
        assert_eq!(s.sum("vla_application_uptime_seconds", |_| true), 12.5);
        assert_eq!(Scrape::parse("garbage{\nnot a sample\n").samples, vec![]);
    }

    #[test]
    fn quantiles_interpolate_like_prometheus() {
        let b = Scrape::parse(TEXT).buckets("vla_inference_duration_seconds", |_| true);
        assert_eq!(b, vec![(0.01, 2.0), (0.1, 6.0), (f64::INFINITY, 8.0)]);
        // Rank 4 of 8 lies half way through (0.01, 0.1].
        assert!((quantile(0.5, &b).unwrap() - 0.055).abs() < 1e-9);
        // Rank 7.92 lies in +Inf: the highest finite bound.
        assert_eq!(quantile(0.99, &b), Some(0.1));
        assert_eq!(quantile(0.5, &[(0.1, 0.0), (f64::INFINITY, 0.0)]), None);
    }

    #[test]
    fn deltas_survive_a_restart() {
        assert_eq!(counter_delta(5.0, 8.0), 3.0);
        assert_eq!(counter_delta(50.0, 4.0), 4.0);
        let d = bucket_delta(&[(0.1, 5.0), (f64::INFINITY, 6.0)], &[(0.1, 7.0), (f64::INFINITY, 9.0)]);
        assert_eq!(d, vec![(0.1, 2.0), (f64::INFINITY, 3.0)]);
    }
}
