//! `joint-limits`: a safety policy that clamps joint-velocity and joint-position actions to
//! per-robot-type limits taken from its config (see README.md for the schema).
//!
//! The decision logic is [`decide`], a plain function over the config text and the generated
//! types, so it is unit-tested natively with `cargo test`.

use std::collections::BTreeMap;
use std::fmt;

use serde::Deserialize;
use serde::de::{self, Deserializer, SeqAccess, Visitor};

/// The generated bindings for the `safety` world of `vla:policy` (../wit).
mod bindings {
    #![allow(clippy::too_many_arguments)]
    wit_bindgen::generate!({ world: "safety", path: "../../wit" });
}

/// Each call's heap in its own memory (see `guest_util::heap`).
#[cfg(target_arch = "wasm32")]
#[global_allocator]
static HEAP: guest_util::heap::CallHeap = guest_util::heap::CallHeap::new();

use bindings::{Action, Decision, Guest, RequestContext};
use guest_util::truncate_reason;

use bindings::vla::policy::types::{ActionKind, Denial, Modification, Severity};

struct JointLimits;

impl Guest for JointLimits {
    fn evaluate(ctx: RequestContext, action: Action) -> Decision {
        decide(&bindings::vla::policy::host::config(), &ctx, &action)
    }
}

bindings::export!(JointLimits with_types_in bindings);

/// The policy's config: limits per robot type, and optionally for every other robot type.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub robot_types: BTreeMap<String, Limits>,
    #[serde(default)]
    pub default: Option<Limits>,
}

/// The limits of one robot type. A missing limit is not enforced.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Absolute maximum joint velocity (rad/s or m/s), for `joint-velocity` actions.
    #[serde(default)]
    pub velocity: Option<PerJoint>,
    /// Joint position range, for `joint-position` actions.
    #[serde(default)]
    pub position: Option<Range>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Range {
    pub min: PerJoint,
    pub max: PerJoint,
}

/// One number for every joint, or one number per joint.
#[derive(Debug, Clone, PartialEq)]
pub enum PerJoint {
    All(f64),
    Each(Vec<f64>),
}

impl<'de> Deserialize<'de> for PerJoint {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct PerJointVisitor;
        impl<'de> Visitor<'de> for PerJointVisitor {
            type Value = PerJoint;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a number or an array of numbers (one per joint)")
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<PerJoint, E> {
                Ok(PerJoint::All(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<PerJoint, E> {
                Ok(PerJoint::All(v as f64))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<PerJoint, E> {
                Ok(PerJoint::All(v as f64))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<PerJoint, A::Error> {
                let mut values = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(256));
                while let Some(v) = seq.next_element::<f64>()? {
                    values.push(v);
                }
                Ok(PerJoint::Each(values))
            }
        }
        deserializer.deserialize_any(PerJointVisitor)
    }
}

impl PerJoint {
    /// The value for each of `dof` joints, or why the config does not fit the action.
    fn resolve(&self, dof: usize, what: &str) -> Result<Vec<f64>, String> {
        let values = match self {
            PerJoint::All(v) => vec![*v; dof],
            PerJoint::Each(values) if values.len() == dof => values.clone(),
            PerJoint::Each(values) => {
                return Err(format!("{what} has {} values but the action has {dof} joints", values.len()));
            }
        };
        match values.iter().position(|v| !v.is_finite()) {
            Some(j) => Err(format!("{what} for joint {j} is not a finite number")),
            None => Ok(values),
        }
    }
}

/// Parses the config text, reporting the JSON path of the first problem.
pub fn parse_config(json: &str) -> Result<Config, String> {
    let config: Config = guest_util::from_config(json)?;
    for (name, limits) in config
        .robot_types
        .iter()
        .map(|(k, v)| (format!("robot_types.{k}"), v))
        .chain(config.default.as_ref().map(|v| ("default".to_string(), v)))
    {
        limits.check(&name)?;
    }
    Ok(config)
}

impl Limits {
    /// Checks what can be checked without knowing the action's dof.
    fn check(&self, name: &str) -> Result<(), String> {
        let values = |p: &PerJoint| match p {
            PerJoint::All(v) => vec![*v],
            PerJoint::Each(v) => v.clone(),
        };
        if let Some(velocity) = &self.velocity
            && let Some(v) = values(velocity).into_iter().find(|v| !v.is_finite() || *v < 0.0)
        {
            return Err(format!("{name}.velocity: {v} is not a finite non-negative number"));
        }
        if let Some(position) = &self.position {
            for (field, p) in [("min", &position.min), ("max", &position.max)] {
                if let Some(v) = values(p).into_iter().find(|v| !v.is_finite()) {
                    return Err(format!("{name}.position.{field}: {v} is not a finite number"));
                }
            }
            if let (PerJoint::Each(min), PerJoint::Each(max)) = (&position.min, &position.max)
                && min.len() != max.len()
            {
                return Err(format!("{name}.position: min has {} values but max has {}", min.len(), max.len()));
            }
        }
        Ok(())
    }
}

/// The policy: see the crate docs and README.md.
pub fn decide(config_json: &str, ctx: &RequestContext, action: &Action) -> Decision {
    let config = match parse_config(config_json) {
        Ok(config) => config,
        Err(problem) => return deny("bad_config", format!("invalid joint-limits config: {problem}")),
    };
    if let Some(i) = action.values.iter().position(|v| !v.is_finite()) {
        return deny("non_finite", format!("action value {i} is not a finite number ({})", action.values[i]));
    }
    let (noun, is_velocity) = match action.kind {
        ActionKind::JointVelocity => ("velocities", true),
        ActionKind::JointPosition => ("positions", false),
        ActionKind::EndEffectorDelta => return Decision::Allow,
    };
    let (limits, whose) = match config.robot_types.get(&ctx.robot_type) {
        Some(limits) => (limits, format!("the limits of robot type `{}`", ctx.robot_type)),
        None => match &config.default {
            Some(limits) => {
                (limits, format!("the default limits (robot type `{}` has none of its own)", ctx.robot_type))
            }
            None => {
                return deny("no_limits", format!("no joint limits configured for robot type `{}`", ctx.robot_type));
            }
        },
    };
    let dof = action.dof as usize;
    let expected = dof.checked_mul(action.horizon as usize);
    if expected != Some(action.values.len()) {
        return deny(
            "bad_action",
            format!(
                "action has {} values, expected dof × horizon = {} × {}",
                action.values.len(),
                action.dof,
                action.horizon
            ),
        );
    }
    // Per-joint bounds [lo, hi]; a missing limit means there is nothing to clamp.
    let bounds = if is_velocity {
        let Some(velocity) = &limits.velocity else { return Decision::Allow };
        velocity.resolve(dof, "velocity limit").map(|max| max.iter().map(|m| (-m, *m)).collect::<Vec<_>>())
    } else {
        let Some(position) = &limits.position else { return Decision::Allow };
        position.min.resolve(dof, "position.min").and_then(|min| {
            let max = position.max.resolve(dof, "position.max")?;
            match min.iter().zip(&max).position(|(lo, hi)| lo > hi) {
                Some(j) => Err(format!("position.min for joint {j} ({}) is above position.max ({})", min[j], max[j])),
                None => Ok(min.into_iter().zip(max).collect()),
            }
        })
    };
    let bounds = match bounds {
        Ok(bounds) => bounds,
        Err(problem) => return deny("bad_config", format!("invalid joint-limits config ({whose}): {problem}")),
    };
    if dof == 0 {
        return Decision::Allow;
    }
    let mut clamped = 0usize;
    let values: Vec<f32> = action
        .values
        .iter()
        .enumerate()
        .map(|(i, &v)| {
            let (lo, hi) = bounds[i % dof];
            let c = (v as f64).max(lo).min(hi) as f32;
            if c != v {
                clamped += 1;
            }
            c
        })
        .collect();
    if clamped == 0 {
        return Decision::Allow;
    }
    Decision::Modify(Modification {
        action: Action { kind: action.kind, dof: action.dof, horizon: action.horizon, values },
        reason: truncate_reason(format!("clamped {clamped} of {} joint {noun} to {whose}", action.values.len())),
    })
}

fn deny(code: &str, reason: String) -> Decision {
    // A non-finite action is the worst a robot could be sent; a malformed one next; a gap in
    // the configuration (which denies every action of the robot type) least.
    let severity = match code {
        "non_finite" => Severity::Critical,
        "bad_action" => Severity::High,
        _ => Severity::Medium,
    };
    Decision::Deny(Denial { code: code.to_string(), reason: truncate_reason(reason), severity: Some(severity) })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(robot_type: &str) -> RequestContext {
        RequestContext {
            request_id: "r1".into(),
            robot_id: "arm-1".into(),
            robot_type: robot_type.into(),
            model: "m".into(),
            instruction: "pick up the cube".into(),
            state: vec![0.0; 7],
            time_ms: 0,
        }
    }

    fn action(kind: ActionKind, dof: u32, values: Vec<f32>) -> Action {
        let horizon = (values.len() as u32).checked_div(dof).unwrap_or(0);
        Action { kind, dof, horizon, values }
    }

    fn vel(values: Vec<f32>) -> Action {
        action(ActionKind::JointVelocity, 7, values)
    }

    const DEMO: &str = r#"{"robot_types": {"demo": {"velocity": 0.5}}}"#;

    fn denied(d: Decision) -> (String, String) {
        match d {
            Decision::Deny(Denial { code, reason, .. }) => (code, reason),
            other => panic!("expected deny, got {other:?}"),
        }
    }

    fn modified(d: Decision) -> (Action, String) {
        match d {
            Decision::Modify(Modification { action, reason }) => (action, reason),
            other => panic!("expected modify, got {other:?}"),
        }
    }

    #[test]
    fn within_limits_allows() {
        let d = decide(DEMO, &ctx("demo"), &vel(vec![0.1, -0.2, 0.5, -0.5, 0.0, 0.3, 0.4]));
        assert!(matches!(d, Decision::Allow), "{d:?}");
    }

    #[test]
    fn clamps_velocities_with_scalar_limit() {
        let a = vel(vec![0.1, 0.9, -0.7, 0.0, 0.6, 0.2, 0.3]);
        let (out, reason) = modified(decide(DEMO, &ctx("demo"), &a));
        assert_eq!(out.values, vec![0.1, 0.5, -0.5, 0.0, 0.5, 0.2, 0.3]);
        assert_eq!((out.kind, out.dof, out.horizon), (a.kind, a.dof, a.horizon));
        assert_eq!(reason, "clamped 3 of 7 joint velocities to the limits of robot type `demo`");
    }

    #[test]
    fn clamps_every_step_with_per_joint_limits() {
        let cfg = r#"{"robot_types": {"two": {"velocity": [1.0, 0.1]}}}"#;
        let a = action(ActionKind::JointVelocity, 2, vec![2.0, 0.05, -2.0, -0.2, 0.5, 0.1]);
        let (out, reason) = modified(decide(cfg, &ctx("two"), &a));
        assert_eq!(out.values, vec![1.0, 0.05, -1.0, -0.1, 0.5, 0.1]);
        assert_eq!(out.horizon, 3);
        assert!(reason.starts_with("clamped 3 of 6 joint velocities"), "{reason}");
    }

    #[test]
    fn clamps_positions_into_range() {
        let cfg = r#"{"robot_types": {"two": {"position": {"min": [-1, 0], "max": 1}}}}"#;
        let a = action(ActionKind::JointPosition, 2, vec![-1.5, -0.5, 0.5, 2.0]);
        let (out, reason) = modified(decide(cfg, &ctx("two"), &a));
        assert_eq!(out.values, vec![-1.0, 0.0, 0.5, 1.0]);
        assert!(reason.contains("joint positions"), "{reason}");
        let inside = action(ActionKind::JointPosition, 2, vec![0.0, 0.5]);
        assert!(matches!(decide(cfg, &ctx("two"), &inside), Decision::Allow));
    }

    #[test]
    fn missing_limit_for_the_kind_allows() {
        // Velocity limits only: a position action has nothing to clamp, and vice versa.
        let pos = action(ActionKind::JointPosition, 7, vec![9.0; 7]);
        assert!(matches!(decide(DEMO, &ctx("demo"), &pos), Decision::Allow));
        let cfg = r#"{"robot_types": {"demo": {"position": {"min": -1, "max": 1}}}}"#;
        assert!(matches!(decide(cfg, &ctx("demo"), &vel(vec![9.0; 7])), Decision::Allow));
    }

    #[test]
    fn end_effector_delta_allows() {
        let a = action(ActionKind::EndEffectorDelta, 7, vec![9.0; 7]);
        assert!(matches!(decide(DEMO, &ctx("demo"), &a), Decision::Allow));
        assert!(matches!(decide(DEMO, &ctx("unknown"), &a), Decision::Allow));
    }

    #[test]
    fn unknown_robot_type_without_default_denies() {
        let (code, reason) = denied(decide(DEMO, &ctx("other"), &vel(vec![0.0; 7])));
        assert_eq!(code, "no_limits");
        assert_eq!(reason, "no joint limits configured for robot type `other`");
    }

    #[test]
    fn unknown_robot_type_uses_default() {
        let cfg = r#"{"robot_types": {}, "default": {"velocity": 0.25}}"#;
        let (out, reason) = modified(decide(cfg, &ctx("other"), &vel(vec![1.0; 7])));
        assert_eq!(out.values, vec![0.25; 7]);
        assert_eq!(
            reason,
            "clamped 7 of 7 joint velocities to the default limits (robot type `other` has none of its own)"
        );
    }

    #[test]
    fn non_finite_denies_naming_the_index() {
        let (code, reason) = denied(decide(DEMO, &ctx("demo"), &vel(vec![0.0, 0.0, f32::NAN, 0.0, 0.0, 0.0, 0.0])));
        assert_eq!(code, "non_finite");
        assert!(reason.contains("value 2"), "{reason}");
        let a = action(ActionKind::EndEffectorDelta, 3, vec![0.0, f32::INFINITY, 0.0]);
        assert_eq!(denied(decide(DEMO, &ctx("demo"), &a)).0, "non_finite");
    }

    #[test]
    fn denials_carry_a_severity() {
        let severity = |d: Decision| match d {
            Decision::Deny(Denial { severity, .. }) => severity,
            other => panic!("expected deny, got {other:?}"),
        };
        let nan = vel(vec![0.0, 0.0, f32::NAN, 0.0, 0.0, 0.0, 0.0]);
        assert_eq!(severity(decide(DEMO, &ctx("demo"), &nan)), Some(Severity::Critical));
        assert_eq!(severity(decide(DEMO, &ctx("other"), &vel(vec![0.0; 7]))), Some(Severity::Medium));
    }

    #[test]
    fn array_length_mismatch_is_bad_config() {
        let cfg = r#"{"robot_types": {"demo": {"velocity": [0.5, 0.5, 0.5]}}}"#;
        let (code, reason) = denied(decide(cfg, &ctx("demo"), &vel(vec![0.0; 7])));
        assert_eq!(code, "bad_config");
        assert!(reason.contains("3 values but the action has 7 joints"), "{reason}");
    }

    #[test]
    fn bad_config_denies_with_the_path() {
        let cases = [
            ("not json", "expected"),
            (r#"{"robot_types": {"demo": {"velocity": "fast"}}}"#, "robot_types.demo.velocity"),
            (r#"{"robot_types": {"demo": {"velocty": 0.5}}}"#, "unknown field `velocty`"),
            (r#"{"robot_types": {"demo": {"velocity": -1}}}"#, "not a finite non-negative number"),
            (r#"{"robot_types": {"demo": {"position": {"min": 0}}}}"#, "missing field `max`"),
            (r#"{"robot_types": {"demo": {"position": {"min": 1, "max": 0}}}}"#, "above position.max"),
            (r#"{"robot_types": {"demo": {"velocity": 0.5}}} trailing"#, "trailing"),
        ];
        for (cfg, needle) in cases {
            let pos_cfg = cfg.contains("position");
            let a = if pos_cfg { action(ActionKind::JointPosition, 7, vec![0.0; 7]) } else { vel(vec![0.0; 7]) };
            let (code, reason) = denied(decide(cfg, &ctx("demo"), &a));
            assert_eq!(code, "bad_config", "{cfg}");
            assert!(reason.contains(needle), "{cfg}: {reason}");
        }
    }

    #[test]
    fn shape_mismatch_denies() {
        let a = Action { kind: ActionKind::JointVelocity, dof: 7, horizon: 2, values: vec![0.0; 7] };
        assert_eq!(denied(decide(DEMO, &ctx("demo"), &a)).0, "bad_action");
    }

    #[test]
    fn empty_config_denies_no_limits() {
        assert_eq!(denied(decide("{}", &ctx("demo"), &vel(vec![0.0; 7]))).0, "no_limits");
    }

    #[test]
    fn long_reasons_are_truncated() {
        let name = "x".repeat(2000);
        let (_, reason) = denied(decide(DEMO, &ctx(&name), &vel(vec![0.0; 7])));
        assert!(reason.len() <= 1024);
    }
}
