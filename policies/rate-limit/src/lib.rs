//! `rate-limit`: an admission policy that charges each request to its robot's and its robot's
//! group's buckets in the host's durable quota store (`vla:policy/quota`) and denies when one
//! is used up. See README.md for the configuration.
//!
//! The limits given here are defaults: where an operator set limits for a robot or group (the
//! appliance's `quota.*` configuration or `PUT /admin/quotas/{robot}`), the host applies those.
//! The decision logic is [`decide`], a plain function over the config text, the context and a
//! charging function, so it is unit-tested natively with `cargo test`.

use std::collections::BTreeMap;

use serde::Deserialize;

/// The generated bindings for the `admission` world of `vla:policy` (../wit).
mod bindings {
    #![allow(clippy::too_many_arguments)]
    wit_bindgen::generate!({ world: "admission", path: "../../wit", additional_derives: [PartialEq] });
}

/// Each call's heap in its own memory (see `guest_util::heap`).
#[cfg(target_arch = "wasm32")]
#[global_allocator]
static HEAP: guest_util::heap::CallHeap = guest_util::heap::CallHeap::new();

use bindings::vla::policy::quota::{self, Bucket, Limits, RateLimit, Scope, Status};
use bindings::vla::policy::types::{Denial, Severity};
use bindings::{Decision, Guest, RequestContext};
use guest_util::truncate_reason;

struct RateLimiter;

impl Guest for RateLimiter {
    fn admit(ctx: RequestContext) -> Decision {
        decide(&bindings::vla::policy::host::config(), &ctx, |scope, limits| quota::try_consume(scope, limits, 1))
    }
}

bindings::export!(RateLimiter with_types_in bindings);

/// One scope's limits as written in the config.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScopeLimits {
    /// `<requests>/<period>`, e.g. `10/min`.
    pub rate: Option<String>,
    pub burst: Option<u64>,
    pub day: Option<u64>,
    pub month: Option<u64>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TypeLimits {
    #[serde(default)]
    pub robot: ScopeLimits,
    #[serde(default)]
    pub group: ScopeLimits,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Instructions never refused (a stop must always get through), though charged like any
    /// other while the buckets have room: whole instructions only, case-insensitive, surrounding
    /// spaces ignored. No wildcards: a prefix would let "stop and pick up the red block" past
    /// every limit.
    #[serde(default)]
    pub exempt_instructions: Vec<String>,
    /// Limits of every robot, and of every group.
    #[serde(default)]
    pub robot: ScopeLimits,
    #[serde(default)]
    pub group: ScopeLimits,
    /// Per robot type: replaces the defaults above bucket by bucket.
    #[serde(default)]
    pub robot_types: BTreeMap<String, TypeLimits>,
}

/// Parses and checks the config text, reporting the JSON path of the first problem.
pub fn parse_config(json: &str) -> Result<Config, String> {
    let config: Config = guest_util::from_config(json)?;
    if let Some(i) = config.exempt_instructions.iter().position(|p| p.trim().is_empty()) {
        return Err(format!("exempt_instructions[{i}] is empty"));
    }
    if let Some(i) = config.exempt_instructions.iter().position(|p| p.contains('*')) {
        return Err(format!(
            "exempt_instructions[{i}] contains `*`: exemptions match whole instructions only (a pattern would let any \
             instruction that starts like a stop past the limits)"
        ));
    }
    let mut scopes = vec![("robot".to_string(), &config.robot), ("group".to_string(), &config.group)];
    for (t, l) in &config.robot_types {
        scopes.push((format!("robot_types.{t}.robot"), &l.robot));
        scopes.push((format!("robot_types.{t}.group"), &l.group));
    }
    for (path, l) in scopes {
        limits(l).map_err(|p| format!("{path}.{p}"))?;
    }
    Ok(config)
}

/// `<requests>/<period>` → (requests, period in ms); the appliance's own syntax (`10/min`,
/// `5/s`, `300/15m`; units ms, s, min or m, h, d).
pub fn parse_rate(text: &str) -> Result<(u64, u64), String> {
    let bad = || format!("`{text}` is not a rate; write `<requests>/<period>`, e.g. `10/min`");
    let (n, period) = text.trim().split_once('/').ok_or_else(bad)?;
    let requests: u64 = n.trim().parse().map_err(|_| bad())?;
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
    match count.checked_mul(unit_ms) {
        Some(ms) if requests > 0 && ms > 0 => Ok((requests, ms)),
        _ => Err(format!("`{text}` needs at least 1 request per at least 1 ms")),
    }
}

fn limits(l: &ScopeLimits) -> Result<Limits, String> {
    let rate = match &l.rate {
        None if l.burst.is_some() => return Err("burst: needs `rate`".into()),
        None => None,
        Some(text) => {
            let (requests, period_ms) = parse_rate(text).map_err(|p| format!("rate: {p}"))?;
            let burst = l.burst.unwrap_or(requests);
            if burst == 0 {
                return Err("burst: must be at least 1".into());
            }
            Some(RateLimit { requests, period_ms, burst })
        }
    };
    Ok(Limits { rate, day: l.day, month: l.month })
}

/// Each field from `over` where set, else from `under`.
fn merge(over: &ScopeLimits, under: &ScopeLimits) -> ScopeLimits {
    let rate_from_over = over.rate.is_some();
    ScopeLimits {
        rate: over.rate.clone().or_else(|| under.rate.clone()),
        burst: if rate_from_over { over.burst } else { under.burst },
        day: over.day.or(under.day),
        month: over.month.or(under.month),
    }
}

/// Whether `instruction` is one of `exempt`: whole, ignoring case and surrounding spaces.
pub fn is_exempt(instruction: &str, exempt: &[String]) -> bool {
    let instruction = instruction.trim();
    exempt.iter().any(|e| e.trim().eq_ignore_ascii_case(instruction))
}

/// The policy: see the crate docs and README.md. `charge` is `quota.try-consume` for one
/// request.
pub fn decide(
    config_json: &str,
    ctx: &RequestContext,
    mut charge: impl FnMut(Scope, Limits) -> Result<Vec<Status>, Status>,
) -> Decision {
    let config = match parse_config(config_json) {
        Ok(config) => config,
        Err(problem) => return deny("bad_config", format!("invalid rate-limit config: {problem}")),
    };
    let exempt = is_exempt(&ctx.instruction, &config.exempt_instructions);
    let by_type = config.robot_types.get(&ctx.robot_type).cloned().unwrap_or_default();
    for (scope, mine, default, whose) in [
        (Scope::Robot, &by_type.robot, &config.robot, format!("robot `{}`", ctx.robot_id)),
        (Scope::Group, &by_type.group, &config.group, "the robot's group".to_string()),
    ] {
        // Checked by `parse_config`.
        let Ok(defaults) = limits(&merge(mine, default)) else { continue };
        if let Err(status) = charge(scope, defaults) {
            if exempt {
                // Charged while there was room; past the limit, a stop still gets through.
                bindings_log(&format!("stop instruction let through although {whose} is over its limits"));
                continue;
            }
            return refused(&whose, &status);
        }
    }
    Decision::Allow
}

fn refused(whose: &str, s: &Status) -> Decision {
    let wait = seconds(s.retry_after_ms);
    match s.bucket {
        Bucket::Rate => {
            deny("rate_limited", format!("{whose} is over its rate limit (burst of {}); retry in {wait}", s.limit))
        }
        Bucket::Day => {
            deny("quota_exhausted", format!("{whose} used its {} requests for today (UTC); resets in {wait}", s.limit))
        }
        Bucket::Month => deny(
            "quota_exhausted",
            format!("{whose} used its {} requests for this month (UTC); resets in {wait}", s.limit),
        ),
    }
}

fn seconds(ms: u64) -> String {
    let s = ms.div_ceil(1000);
    if s < 120 {
        format!("{s} s")
    } else if s < 7200 {
        format!("{} min", s.div_ceil(60))
    } else {
        format!("{} h", s.div_ceil(3600))
    }
}

fn deny(code: &str, reason: String) -> Decision {
    // A robot over its limits is a capacity matter, not a safety one.
    let severity = match code {
        "bad_config" => Severity::Medium,
        _ => Severity::Low,
    };
    Decision::Deny(Denial { code: code.to_string(), reason: truncate_reason(reason), severity: Some(severity) })
}

#[cfg(target_arch = "wasm32")]
fn bindings_log(message: &str) {
    bindings::vla::policy::host::log(bindings::vla::policy::host::LogLevel::Debug, message);
}

#[cfg(not(target_arch = "wasm32"))]
fn bindings_log(_message: &str) {}

#[cfg(test)]
mod tests {
    use super::*;

    const CFG: &str = r#"{
        "exempt_instructions": ["stop", "emergency stop"],
        "robot": {"rate": "10/min", "day": 1000},
        "group": {"rate": "100/min"},
        "robot_types": {"mobile": {"robot": {"rate": "2/s", "burst": 4}}}
    }"#;

    fn ctx(robot_type: &str, instruction: &str) -> RequestContext {
        RequestContext {
            request_id: "r1".into(),
            robot_id: "arm-1".into(),
            robot_type: robot_type.into(),
            model: "m".into(),
            instruction: instruction.into(),
            state: vec![],
            time_ms: 0,
        }
    }

    fn status(bucket: Bucket, retry_after_ms: u64) -> Status {
        Status { bucket, limit: 10, remaining: 0, reset_ms: 0, retry_after_ms }
    }

    #[test]
    fn charges_the_robot_then_its_group_with_the_configured_defaults() {
        let mut seen = Vec::new();
        let d = decide(CFG, &ctx("arm", "pick"), |scope, limits| {
            seen.push((scope, limits));
            Ok(vec![])
        });
        assert!(matches!(d, Decision::Allow));
        assert_eq!(seen.len(), 2);
        assert_eq!(seen[0].0, Scope::Robot);
        assert_eq!(seen[0].1.rate, Some(RateLimit { requests: 10, period_ms: 60_000, burst: 10 }));
        assert_eq!(seen[0].1.day, Some(1000));
        assert_eq!(seen[1].1.rate, Some(RateLimit { requests: 100, period_ms: 60_000, burst: 100 }));
    }

    #[test]
    fn robot_types_replace_the_defaults_bucket_by_bucket() {
        let mut robot = None;
        decide(CFG, &ctx("mobile", "go"), |scope, limits| {
            if scope == Scope::Robot {
                robot = Some(limits);
            }
            Ok(vec![])
        });
        let robot = robot.expect("charged");
        assert_eq!(robot.rate, Some(RateLimit { requests: 2, period_ms: 1_000, burst: 4 }));
        assert_eq!(robot.day, Some(1000));
    }

    #[test]
    fn an_exhausted_bucket_denies_with_when_to_retry() {
        let d = decide(CFG, &ctx("arm", "pick"), |_, _| Err(status(Bucket::Rate, 5_001)));
        match d {
            Decision::Deny(Denial { code, reason, .. }) => {
                assert_eq!(code, "rate_limited");
                assert!(reason.contains("robot `arm-1`") && reason.contains("retry in 6 s"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        let mut calls = 0;
        let d = decide(CFG, &ctx("arm", "pick"), |scope, _| {
            calls += 1;
            if scope == Scope::Group { Err(status(Bucket::Day, 3_600_000)) } else { Ok(vec![]) }
        });
        assert!(
            matches!(d, Decision::Deny(Denial { ref code, ref reason, .. }) if code == "quota_exhausted" && reason.contains("group"))
        );
        assert_eq!(calls, 2);
    }

    #[test]
    fn exempt_instructions_are_charged_but_never_refused() {
        for instruction in ["stop", "  STOP ", "Emergency Stop"] {
            let mut charged = 0;
            let d = decide(CFG, &ctx("arm", instruction), |_, _| {
                charged += 1;
                Err(status(Bucket::Day, 1_000))
            });
            assert!(matches!(d, Decision::Allow), "`{instruction}` refused");
            assert_eq!(charged, 2, "`{instruction}` is charged like any request");
        }
        // Whole instructions only: one that merely starts like a stop is refused at quota 0.
        for instruction in ["stop and pick up the red block", "emergency stop now", "do not stop"] {
            let d = decide(CFG, &ctx("arm", instruction), |_, _| Err(status(Bucket::Day, 1_000)));
            assert!(matches!(d, Decision::Deny(Denial { ref code, .. }) if code == "quota_exhausted"), "{instruction}");
        }
    }

    #[test]
    fn bad_config_is_named_and_denies() {
        assert!(parse_config(r#"{"robot": {"rate": "10 per minute"}}"#).unwrap_err().contains("robot.rate"));
        assert!(
            parse_config(r#"{"robot_types": {"x": {"group": {"burst": 3}}}}"#)
                .unwrap_err()
                .contains("robot_types.x.group.burst")
        );
        assert!(parse_config(r#"{"exempt_instructions": ["*"]}"#).is_err());
        assert!(parse_config(r#"{"exempt_instructions": ["stop *"]}"#).unwrap_err().contains("exempt_instructions[0]"));
        assert!(parse_config(r#"{"exempt_instructions": [" "]}"#).is_err());
        assert!(parse_config(r#"{"robot": {"day": -1}}"#).unwrap_err().contains("robot.day"));
        let d = decide(r#"{"robots": {}}"#, &ctx("arm", "x"), |_, _| Ok(vec![]));
        assert!(matches!(d, Decision::Deny(Denial { ref code, .. }) if code == "bad_config"));
    }

    #[test]
    fn rates_parse() {
        assert_eq!(parse_rate("10/min"), Ok((10, 60_000)));
        assert_eq!(parse_rate("300/15m"), Ok((300, 900_000)));
        assert!(parse_rate("0/min").is_err());
        assert!(parse_rate("10/week").is_err());
    }
}
