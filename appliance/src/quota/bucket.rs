//! The arithmetic of one bucket, pure (no clock, no store): a GCRA token bucket for rates and
//! UTC calendar counters for days and months, with their explicit on-disk encoding.
//!
//! A rate bucket stores a single number, its *theoretical arrival time* (TAT, nanoseconds
//! since the Unix epoch): the bucket is full at and after TAT, each request pushes TAT one
//! emission interval `T = period / requests` later, and a request is refused when it would
//! push TAT more than `burst × T` past now. This is exactly a token bucket of `burst` tokens
//! refilled at `requests` per `period`, without floating point or a refill timer.

use serde::{Deserialize, Serialize};

const NS_PER_MS: u64 = 1_000_000;
const MS_PER_DAY: u64 = 86_400_000;

/// Whose bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    Robot,
    Group,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Robot => "robot",
            Scope::Group => "group",
        }
    }
}

/// Which bucket of a scope.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Bucket {
    Rate,
    Day,
    Month,
}

impl Bucket {
    pub const ALL: [Bucket; 3] = [Bucket::Rate, Bucket::Day, Bucket::Month];

    pub fn as_str(self) -> &'static str {
        match self {
            Bucket::Rate => "rate",
            Bucket::Day => "day",
            Bucket::Month => "month",
        }
    }

    fn tag(self) -> u8 {
        match self {
            Bucket::Rate => 1,
            Bucket::Day => 2,
            Bucket::Month => 3,
        }
    }
}

/// `requests` per `period_ms`, up to `burst` at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rate {
    pub requests: u64,
    pub period_ms: u64,
    pub burst: u64,
}

impl Rate {
    /// The emission interval in nanoseconds (at least 1).
    fn interval_ns(&self) -> u64 {
        let ns = u128::from(self.period_ms) * u128::from(NS_PER_MS) / u128::from(self.requests.max(1));
        u64::try_from(ns).unwrap_or(u64::MAX).max(1)
    }

    /// The bucket's capacity as time: `burst × T`.
    fn tolerance_ns(&self) -> u64 {
        self.interval_ns().saturating_mul(self.burst)
    }
}

/// The limit of one bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    Rate(Rate),
    /// At most this many per UTC day or month (which one is the bucket's).
    Count(u64),
}

/// A bucket as a request sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    pub bucket: Bucket,
    /// `burst` for a rate; the period's maximum for a counter.
    pub limit: u64,
    pub remaining: u64,
    /// Unix ms when the rate bucket is full again, or the counter's period starts over.
    pub reset_ms: u64,
    /// When refused: ms until the amount would fit (rounded up); else 0.
    pub retry_after_ms: u64,
}

/// A bucket's stored state. Encoded as a version byte, a bucket tag, then big-endian
/// integers; see [`State::encode`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Theoretical arrival time, ns since the epoch, and the rate it was charged under.
    Rate { tat_ns: u64, rate: Rate },
    /// `count` used in `period` (days or months since the epoch), under `limit`.
    Count { period: u64, count: u64, limit: u64 },
}

const VERSION: u8 = 1;

impl State {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(34);
        out.push(VERSION);
        match self {
            State::Rate { tat_ns, rate } => {
                out.push(Bucket::Rate.tag());
                for n in [*tat_ns, rate.requests, rate.period_ms, rate.burst] {
                    out.extend_from_slice(&n.to_be_bytes());
                }
            }
            State::Count { period, count, limit } => {
                out.push(0);
                for n in [*period, *count, *limit] {
                    out.extend_from_slice(&n.to_be_bytes());
                }
            }
        }
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<State, String> {
        let (&version, rest) = bytes.split_first().ok_or("empty value")?;
        if version != VERSION {
            return Err(format!("unknown record version {version} (this appliance writes {VERSION})"));
        }
        let (&tag, rest) = rest.split_first().ok_or("no bucket tag")?;
        let numbers: Vec<u64> = rest
            .chunks(8)
            .map(|c| <[u8; 8]>::try_from(c).map(u64::from_be_bytes).map_err(|_| "truncated integer".to_string()))
            .collect::<Result<_, _>>()?;
        match (tag, numbers.as_slice()) {
            (1, &[tat_ns, requests, period_ms, burst]) => {
                Ok(State::Rate { tat_ns, rate: Rate { requests, period_ms, burst } })
            }
            (0, &[period, count, limit]) => Ok(State::Count { period, count, limit }),
            (tag, n) => Err(format!("bucket tag {tag} with {} integers", n.len())),
        }
    }
}

/// The outcome of charging one bucket: the state to store and the status to report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Charged {
    pub state: State,
    pub status: Status,
}

/// Charges `amount` to `bucket` under `limit` at `now_ms`, from its stored `state` (if any).
/// `Err` is the refused bucket's status; nothing is to be stored then.
pub fn charge(bucket: Bucket, limit: Limit, state: Option<State>, now_ms: u64, amount: u64) -> Result<Charged, Status> {
    match limit {
        Limit::Rate(rate) => {
            let now = now_ms.saturating_mul(NS_PER_MS);
            let t = rate.interval_ns();
            let tolerance = rate.tolerance_ns();
            let tat = match state {
                // Charged under another rate (an operator or a new policy version changed it):
                // what was used carries over as requests, not as time.
                Some(State::Rate { tat_ns, rate: old }) if old != rate && tat_ns > now => {
                    let used = u128::from(tat_ns - now) * u128::from(t) / u128::from(old.interval_ns());
                    now.saturating_add(u64::try_from(used).unwrap_or(u64::MAX))
                }
                Some(State::Rate { tat_ns, .. }) => tat_ns.max(now),
                _ => now,
            };
            let new_tat = tat.saturating_add(t.saturating_mul(amount));
            let backlog = new_tat - now;
            if backlog > tolerance || rate.burst == 0 {
                let wait_ns = if t.saturating_mul(amount) > tolerance {
                    // Never fits, however long the robot waits: it asked for more than the burst.
                    rate.period_ms.saturating_mul(NS_PER_MS)
                } else {
                    backlog - tolerance
                };
                return Err(Status {
                    bucket,
                    limit: rate.burst,
                    remaining: (tolerance - (tat - now).min(tolerance)) / t,
                    reset_ms: ceil_ms(tat),
                    retry_after_ms: ceil_ms(wait_ns).max(1),
                });
            }
            Ok(Charged {
                state: State::Rate { tat_ns: new_tat, rate },
                status: Status {
                    bucket,
                    limit: rate.burst,
                    remaining: (tolerance - backlog) / t,
                    reset_ms: ceil_ms(new_tat),
                    retry_after_ms: 0,
                },
            })
        }
        Limit::Count(max) => {
            let (period, reset_ms) = period_of(bucket, now_ms);
            let used = match state {
                Some(State::Count { period: p, count, .. }) if p == period => count,
                _ => 0,
            };
            let count = used.saturating_add(amount);
            if count > max {
                return Err(Status {
                    bucket,
                    limit: max,
                    remaining: max.saturating_sub(used),
                    reset_ms,
                    retry_after_ms: reset_ms.saturating_sub(now_ms).max(1),
                });
            }
            Ok(Charged {
                state: State::Count { period, count, limit: max },
                status: Status { bucket, limit: max, remaining: max - count, reset_ms, retry_after_ms: 0 },
            })
        }
    }
}

/// The bucket's status without charging.
pub fn peek(bucket: Bucket, limit: Limit, state: Option<State>, now_ms: u64) -> Status {
    match charge(bucket, limit, state, now_ms, 0) {
        Ok(c) => c.status,
        Err(s) => Status { retry_after_ms: 0, ..s },
    }
}

/// Gives back `amount` charged earlier (a refused or failed request). Returns the state to
/// store, or `None` when there is nothing to give back (the period has passed).
pub fn refund(state: State, now_ms: u64, amount: u64) -> Option<State> {
    match state {
        State::Rate { tat_ns, rate } => {
            let back = rate.interval_ns().saturating_mul(amount);
            let floor = now_ms.saturating_mul(NS_PER_MS);
            (tat_ns > floor).then(|| State::Rate { tat_ns: tat_ns.saturating_sub(back).max(floor), rate })
        }
        State::Count { period, count, limit } => {
            Some(State::Count { period, count: count.saturating_sub(amount), limit }).filter(|_| count > 0)
        }
    }
}

/// Which period a counter bucket is in at `now_ms`, and when the next one starts (Unix ms).
pub fn period_of(bucket: Bucket, now_ms: u64) -> (u64, u64) {
    let day = now_ms / MS_PER_DAY;
    match bucket {
        Bucket::Month => {
            let (y, m, _) = civil_from_days(day as i64);
            let index = (y * 12 + i64::from(m) - 1) as u64;
            let (ny, nm) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
            (index, days_from_civil(ny, nm, 1) as u64 * MS_PER_DAY)
        }
        _ => (day, (day + 1) * MS_PER_DAY),
    }
}

/// Whether `state` was stored for `bucket`.
pub fn fits(bucket: Bucket, state: &State) -> bool {
    matches!((bucket, state), (Bucket::Rate, State::Rate { .. }) | (Bucket::Day | Bucket::Month, State::Count { .. }))
}

fn ceil_ms(ns: u64) -> u64 {
    ns.div_ceil(NS_PER_MS)
}

/// Howard Hinnant's `civil_from_days`: days since 1970-01-01 → (year, month 1-12, day 1-31).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// The inverse: (year, month, day) → days since 1970-01-01.
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const PER_MIN: Rate = Rate { requests: 10, period_ms: 60_000, burst: 10 };

    fn run(limit: Limit, bucket: Bucket, times: &[u64]) -> Vec<Result<Status, Status>> {
        let mut state = None;
        times
            .iter()
            .map(|&t| {
                charge(bucket, limit, state, t, 1).map(|c| {
                    state = Some(c.state);
                    c.status
                })
            })
            .collect()
    }

    #[test]
    fn ten_per_minute_admits_a_burst_of_ten_then_says_when_the_next_fits() {
        let t0 = 1_700_000_000_000;
        let results = run(Limit::Rate(PER_MIN), Bucket::Rate, &[t0; 11]);
        for (i, r) in results[..10].iter().enumerate() {
            assert_eq!(r.unwrap().remaining, 9 - i as u64);
        }
        let refused = results[10].unwrap_err();
        assert_eq!(refused.remaining, 0);
        // One token comes back every 6 s; the bucket is full 60 s after the burst.
        assert_eq!(refused.retry_after_ms, 6_000);
        assert_eq!(refused.reset_ms, t0 + 60_000);
    }

    #[test]
    fn a_rate_bucket_refills_at_its_rate() {
        let t0 = 1_700_000_000_000;
        let mut times = vec![t0; 10];
        times.extend([t0 + 5_999, t0 + 6_000, t0 + 6_001]);
        let results = run(Limit::Rate(PER_MIN), Bucket::Rate, &times);
        assert_eq!(results[10].unwrap_err().retry_after_ms, 1);
        assert_eq!(results[11].unwrap().remaining, 0);
        assert!(results[12].is_err());
    }

    #[test]
    fn a_new_rate_carries_over_the_requests_used_not_the_time() {
        let t0 = 1_700_000_000_000;
        let mut state = None;
        for _ in 0..10 {
            state = Some(charge(Bucket::Rate, Limit::Rate(PER_MIN), state, t0, 1).unwrap().state);
        }
        let faster = Rate { requests: 100, period_ms: 60_000, burst: 100 };
        assert_eq!(charge(Bucket::Rate, Limit::Rate(faster), state, t0, 1).unwrap().status.remaining, 89);
    }

    #[test]
    fn asking_for_more_than_the_burst_never_fits() {
        let r = charge(Bucket::Rate, Limit::Rate(PER_MIN), None, 1_000, 11).unwrap_err();
        assert_eq!(r.retry_after_ms, 60_000);
        assert_eq!(r.remaining, 10);
    }

    #[test]
    fn counters_reset_at_the_utc_day_and_month() {
        // 2026-11-30T23:59:59.999Z and one millisecond later.
        let before = days_from_civil(2026, 12, 1) as u64 * MS_PER_DAY - 1;
        let results = run(Limit::Count(2), Bucket::Month, &[before, before, before, before + 1]);
        assert!(results[2].is_err());
        assert_eq!(results[2].unwrap_err().retry_after_ms, 1);
        assert_eq!(results[3].unwrap().remaining, 1);
        assert_eq!(period_of(Bucket::Day, before).1, before + 1);
        assert_eq!(civil_from_days(days_from_civil(2028, 2, 29)), (2028, 2, 29));
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        let (_, reset) = period_of(Bucket::Month, days_from_civil(2026, 2, 10) as u64 * MS_PER_DAY);
        assert_eq!(reset, days_from_civil(2026, 3, 1) as u64 * MS_PER_DAY);
    }

    #[test]
    fn a_zero_limit_refuses_everything() {
        assert!(charge(Bucket::Day, Limit::Count(0), None, 5, 1).is_err());
    }

    #[test]
    fn refunds_give_back_what_was_charged() {
        let t0 = 1_700_000_000_000;
        let c = charge(Bucket::Rate, Limit::Rate(PER_MIN), None, t0, 1).unwrap();
        let back = refund(c.state, t0, 1).unwrap();
        assert_eq!(peek(Bucket::Rate, Limit::Rate(PER_MIN), Some(back), t0).remaining, 10);
        let c = charge(Bucket::Day, Limit::Count(5), None, t0, 2).unwrap();
        assert_eq!(refund(c.state, t0, 1), Some(State::Count { period: t0 / MS_PER_DAY, count: 1, limit: 5 }));
    }

    #[test]
    fn states_round_trip_and_garbage_is_refused() {
        for s in [State::Rate { tat_ns: 42, rate: PER_MIN }, State::Count { period: 20_000, count: 7, limit: u64::MAX }]
        {
            assert_eq!(State::decode(&s.encode()), Ok(s));
        }
        assert!(State::decode(b"").is_err());
        assert!(State::decode(&[2, 1]).unwrap_err().contains("version 2"));
        assert!(State::decode(&[1, 1, 0, 0]).is_err());
        assert!(State::decode(&[1, 9]).is_err());
    }
}
