//! The limits of a scope (rate, day, month), their text form (`10/min`) and their on-disk
//! encoding, and how soon a charge is on disk ([`Durability`]). Pure values: no store, no clock.

use serde::{Deserialize, Serialize};
use vla_api::QuotaLimits;

use super::bucket::{Bucket, Limit, Rate};

/// How soon a charge is on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// On disk before the response that acknowledges it is sent (group commit).
    Sync,
    /// Flushed every this many ms: a crash loses at most the charges of the last interval
    /// (plus one flush's duration).
    Interval(u64),
}

impl std::str::FromStr for Durability {
    type Err = String;
    fn from_str(s: &str) -> Result<Durability, String> {
        match s.split_once(':') {
            None if s == "sync" => Ok(Durability::Sync),
            Some(("interval", ms)) => match ms.parse::<u64>() {
                Ok(ms) if (1..=60_000).contains(&ms) => Ok(Durability::Interval(ms)),
                _ => Err(format!("`interval:<ms>` needs 1-60000 ms, got `{}`", truncate(ms, 40))),
            },
            _ => Err(format!("must be `sync` or `interval:<ms>`, got `{}`", truncate(s, 40))),
        }
    }
}

impl std::fmt::Display for Durability {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Durability::Sync => f.write_str("sync"),
            Durability::Interval(ms) => write!(f, "interval:{ms}"),
        }
    }
}

/// The limits of one scope, each bucket optional.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    pub rate: Option<Rate>,
    pub day: Option<u64>,
    pub month: Option<u64>,
}

impl Limits {
    pub fn get(&self, bucket: Bucket) -> Option<Limit> {
        match bucket {
            Bucket::Rate => self.rate.map(Limit::Rate),
            Bucket::Day => self.day.map(Limit::Count),
            Bucket::Month => self.month.map(Limit::Count),
        }
    }

    pub fn is_empty(&self) -> bool {
        *self == Limits::default()
    }

    /// Each bucket from `self` where set, else from `below`.
    pub fn over(self, below: Limits) -> Limits {
        Limits { rate: self.rate.or(below.rate), day: self.day.or(below.day), month: self.month.or(below.month) }
    }

    /// Parses the wire form; the error names the field.
    pub fn parse(wire: &QuotaLimits) -> Result<Limits, (&'static str, String)> {
        let rate = match &wire.rate {
            None => {
                if wire.burst.is_some() {
                    return Err(("burst", "needs `rate`".into()));
                }
                None
            }
            Some(text) => {
                let (requests, period_ms) = parse_rate(text).map_err(|p| ("rate", p))?;
                let burst = wire.burst.unwrap_or(requests);
                if burst == 0 {
                    return Err(("burst", "must be at least 1".into()));
                }
                Some(Rate { requests, period_ms, burst })
            }
        };
        Ok(Limits { rate, day: wire.day, month: wire.month })
    }

    /// The wire form.
    pub fn wire(&self) -> QuotaLimits {
        QuotaLimits {
            rate: self.rate.map(|r| format_rate(r.requests, r.period_ms)),
            burst: self.rate.map(|r| r.burst),
            day: self.day,
            month: self.month,
        }
    }
}

/// `<requests>/<period>` → (requests, period in ms). Periods: `[<n>]<unit>` with units `ms`,
/// `s`/`sec`/`second`, `m`/`min`/`minute`, `h`/`hour`, `d`/`day`.
pub fn parse_rate(text: &str) -> Result<(u64, u64), String> {
    let bad = || {
        format!(
            "`{}` is not a rate; write `<requests>/<period>`, e.g. `10/min`, `5/s` or `300/15m`",
            truncate(text, 40)
        )
    };
    let (n, period) = text.trim().split_once('/').ok_or_else(bad)?;
    let requests: u64 = n.trim().parse().map_err(|_| bad())?;
    if requests == 0 {
        return Err("the request count must be at least 1 (to refuse every request, set `day = 0`)".into());
    }
    let period = period.trim();
    let digits = period.find(|c: char| !c.is_ascii_digit()).unwrap_or(period.len());
    let count: u64 = if digits == 0 { 1 } else { period[..digits].parse().map_err(|_| bad())? };
    let unit_ms = match &period[digits..] {
        "ms" => 1,
        "s" | "sec" | "second" | "seconds" => 1_000,
        "m" | "min" | "minute" | "minutes" => 60_000,
        "h" | "hour" | "hours" => 3_600_000,
        "d" | "day" | "days" => 86_400_000,
        _ => return Err(bad()),
    };
    let period_ms = count.checked_mul(unit_ms).filter(|ms| (1..=31 * 86_400_000).contains(ms));
    Ok((requests, period_ms.ok_or_else(|| format!("the period of `{}` must be 1 ms-31 days", truncate(text, 40)))?))
}

fn format_rate(requests: u64, period_ms: u64) -> String {
    for (unit, ms) in [("d", 86_400_000), ("h", 3_600_000), ("min", 60_000), ("s", 1_000)] {
        if period_ms.is_multiple_of(ms) {
            let n = period_ms / ms;
            return if n == 1 { format!("{requests}/{unit}") } else { format!("{requests}/{n}{unit}") };
        }
    }
    format!("{requests}/{period_ms}ms")
}

const LIMITS_VERSION: u8 = 1;

/// `[version][flags: rate, day, month present][requests][period_ms][burst][day][month]`, the
/// integers big-endian.
pub fn encode_limits(l: &Limits) -> Vec<u8> {
    let flags = u8::from(l.rate.is_some()) | u8::from(l.day.is_some()) << 1 | u8::from(l.month.is_some()) << 2;
    let rate = l.rate.unwrap_or(Rate { requests: 0, period_ms: 0, burst: 0 });
    let mut out = vec![LIMITS_VERSION, flags];
    for n in [rate.requests, rate.period_ms, rate.burst, l.day.unwrap_or(0), l.month.unwrap_or(0)] {
        out.extend_from_slice(&n.to_be_bytes());
    }
    out
}

pub fn decode_limits(bytes: &[u8]) -> Result<Limits, String> {
    if bytes.len() != 2 + 5 * 8 {
        return Err(format!("{} bytes, expected 42", bytes.len()));
    }
    if bytes[0] != LIMITS_VERSION {
        return Err(format!("unknown record version {}", bytes[0]));
    }
    let flags = bytes[1];
    if flags > 7 {
        return Err(format!("unknown flags {flags:#x}"));
    }
    let n = |i: usize| u64::from_be_bytes(bytes[2 + i * 8..10 + i * 8].try_into().unwrap_or_default());
    let rate = Rate { requests: n(0), period_ms: n(1), burst: n(2) };
    if flags & 1 == 1 && (rate.requests == 0 || rate.period_ms == 0 || rate.burst == 0) {
        return Err("a rate with a zero field".into());
    }
    Ok(Limits {
        rate: (flags & 1 == 1).then_some(rate),
        day: (flags & 2 == 2).then_some(n(3)),
        month: (flags & 4 == 4).then_some(n(4)),
    })
}

fn truncate(s: &str, max: usize) -> String {
    s.chars().take(max).collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn rates_parse_with_units_and_name_the_problem() {
        assert_eq!(parse_rate("10/min"), Ok((10, 60_000)));
        assert_eq!(parse_rate("5/s"), Ok((5, 1_000)));
        assert_eq!(parse_rate("300/15m"), Ok((300, 900_000)));
        assert_eq!(parse_rate(" 1 / 250ms "), Ok((1, 250)));
        assert!(parse_rate("10").unwrap_err().contains("<requests>/<period>"));
        assert!(parse_rate("10/fortnight").is_err());
        assert!(parse_rate("-1/min").is_err());
        assert!(parse_rate("0/min").unwrap_err().contains("at least 1"));
        assert!(parse_rate("1/0s").unwrap_err().contains("period"));
        assert_eq!(format_rate(10, 60_000), "10/min");
        assert_eq!(format_rate(300, 900_000), "300/15min");
    }

    #[test]
    fn durability_parses() {
        assert_eq!("sync".parse(), Ok(Durability::Sync));
        assert_eq!("interval:100".parse(), Ok(Durability::Interval(100)));
        assert!("interval:0".parse::<Durability>().is_err());
        assert!("interval:soon".parse::<Durability>().is_err());
        assert!("fast".parse::<Durability>().is_err());
    }

    #[test]
    fn limits_round_trip_and_merge_per_bucket() {
        let l = Limits { rate: Some(Rate { requests: 10, period_ms: 60_000, burst: 3 }), day: Some(0), month: None };
        assert_eq!(decode_limits(&encode_limits(&l)), Ok(l));
        assert!(decode_limits(&[1, 0]).is_err());
        let below = Limits { rate: None, day: Some(5), month: Some(9) };
        assert_eq!(l.over(below), Limits { rate: l.rate, day: Some(0), month: Some(9) });
        let wire = QuotaLimits { rate: None, burst: Some(3), day: None, month: None };
        assert_eq!(Limits::parse(&wire).unwrap_err().0, "burst");
    }
}
