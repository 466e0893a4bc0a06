//! `workspace-bounds`: a safety policy that denies end-effector-delta actions whose intermediate
//! targets leave an axis-aligned box (see README.md for the schema).
//!
//! The decision logic is [`decide`], a plain function over the config text and the generated
//! types, so it is unit-tested natively with `cargo test`.

use serde::Deserialize;

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

use bindings::vla::policy::types::{ActionKind, Denial, Severity};

struct WorkspaceBounds;

impl Guest for WorkspaceBounds {
    fn evaluate(ctx: RequestContext, action: Action) -> Decision {
        decide(&bindings::vla::policy::host::config(), &ctx, &action)
    }
}

bindings::export!(WorkspaceBounds with_types_in bindings);

/// The box (in the robot's base frame, metres) and where the end-effector position is in the
/// robot's state.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub min: [f64; 3],
    pub max: [f64; 3],
    #[serde(default = "default_indices")]
    pub position_state_indices: [usize; 3],
}

fn default_indices() -> [usize; 3] {
    [0, 1, 2]
}

const AXES: [&str; 3] = ["x", "y", "z"];

/// Slack (metres) on the bounds, so a target exactly on a bound is not denied because the
/// deltas are `f32` and their sum picks up rounding error.
const TOLERANCE: f64 = 1e-6;

/// Parses and checks the config text, reporting the JSON path of the first problem.
pub fn parse_config(json: &str) -> Result<Config, String> {
    let config: Config = guest_util::from_config(json)?;
    for (axis, name) in AXES.iter().enumerate() {
        let (lo, hi) = (config.min[axis], config.max[axis]);
        if !lo.is_finite() || !hi.is_finite() {
            return Err(format!("min/max for {name} must be finite numbers"));
        }
        if lo > hi {
            return Err(format!("min[{axis}] ({lo}) is above max[{axis}] ({hi})"));
        }
    }
    Ok(config)
}

/// The policy: see the crate docs and README.md.
pub fn decide(config_json: &str, ctx: &RequestContext, action: &Action) -> Decision {
    let config = match parse_config(config_json) {
        Ok(config) => config,
        Err(problem) => return deny("bad_config", format!("invalid workspace-bounds config: {problem}")),
    };
    if action.kind != ActionKind::EndEffectorDelta {
        return Decision::Allow;
    }
    if let Some(i) = action.values.iter().position(|v| !v.is_finite()) {
        return deny("non_finite", format!("action value {i} is not a finite number ({})", action.values[i]));
    }
    let dof = action.dof as usize;
    if dof < 3 {
        return deny("bad_action", format!("end-effector-delta action has dof {dof}, need at least 3 (x, y, z)"));
    }
    if dof.checked_mul(action.horizon as usize) != Some(action.values.len()) {
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
    let mut position = [0.0f64; 3];
    for (axis, &index) in config.position_state_indices.iter().enumerate() {
        match ctx.state.get(index) {
            Some(v) if v.is_finite() => position[axis] = *v as f64,
            Some(v) => {
                return deny(
                    "bad_state",
                    format!("state[{index}] ({} position) is not a finite number ({v})", AXES[axis]),
                );
            }
            None => {
                return deny(
                    "bad_state",
                    format!(
                        "state has {} values, but the {} position is configured at index {index}",
                        ctx.state.len(),
                        AXES[axis]
                    ),
                );
            }
        }
    }
    for (step, delta) in action.values.chunks_exact(dof).enumerate() {
        for (p, d) in position.iter_mut().zip(delta) {
            *p += *d as f64;
        }
        for (axis, name) in AXES.iter().enumerate() {
            let (v, lo, hi) = (position[axis], config.min[axis], config.max[axis]);
            let side = if v < lo - TOLERANCE {
                Some(("below the workspace minimum", lo))
            } else if v > hi + TOLERANCE {
                Some(("above the workspace maximum", hi))
            } else {
                None
            };
            if let Some((side, bound)) = side {
                return deny("outside_workspace", format!("step {step}: target {name} = {v:.4} is {side} {bound}"));
            }
        }
    }
    Decision::Allow
}

fn deny(code: &str, reason: String) -> Decision {
    // A non-finite target is the worst a robot could be sent; one outside the workspace or
    // malformed next; a gap in the configuration least.
    let severity = match code {
        "non_finite" => Severity::Critical,
        "outside_workspace" | "bad_action" => Severity::High,
        _ => Severity::Medium,
    };
    Decision::Deny(Denial { code: code.to_string(), reason: truncate_reason(reason), severity: Some(severity) })
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOX: &str = r#"{"min": [-0.5, -0.5, 0.0], "max": [0.5, 0.5, 0.8]}"#;

    fn ctx(state: Vec<f32>) -> RequestContext {
        RequestContext {
            request_id: "r1".into(),
            robot_id: "arm-1".into(),
            robot_type: "demo".into(),
            model: "m".into(),
            instruction: "pick up the cube".into(),
            state,
            time_ms: 0,
        }
    }

    /// An end-effector-delta action with dof 7 (x, y, z, three rotations, gripper).
    fn ee(steps: &[[f32; 3]]) -> Action {
        let values = steps.iter().flat_map(|s| [s[0], s[1], s[2], 0.0, 0.0, 0.0, 1.0]).collect();
        Action { kind: ActionKind::EndEffectorDelta, dof: 7, horizon: steps.len() as u32, values }
    }

    fn denied(d: Decision) -> (String, String) {
        match d {
            Decision::Deny(Denial { code, reason, .. }) => (code, reason),
            other => panic!("expected deny, got {other:?}"),
        }
    }

    #[test]
    fn inside_allows() {
        let a = ee(&[[0.1, 0.0, 0.1], [0.1, 0.1, 0.1], [-0.1, 0.0, 0.0]]);
        assert!(matches!(decide(BOX, &ctx(vec![0.0, 0.0, 0.4]), &a), Decision::Allow));
    }

    #[test]
    fn accumulated_delta_leaving_the_box_denies_naming_step_and_axis() {
        // z: 0.5 → 0.65 → 0.8 (on the bound, fine) → 0.95 (outside).
        let a = ee(&[[0.0, 0.0, 0.15], [0.0, 0.0, 0.15], [0.0, 0.0, 0.15], [0.0, 0.0, -0.5]]);
        let (code, reason) = denied(decide(BOX, &ctx(vec![0.0, 0.0, 0.5]), &a));
        assert_eq!(code, "outside_workspace");
        assert!(reason.starts_with("step 2: target z = 0.9500 is above the workspace maximum 0.8"), "{reason}");
    }

    #[test]
    fn below_minimum_denies() {
        let a = ee(&[[-0.7, 0.0, 0.0]]);
        let (code, reason) = denied(decide(BOX, &ctx(vec![0.0, 0.0, 0.4]), &a));
        assert_eq!(code, "outside_workspace");
        assert!(reason.contains("step 0: target x = -0.7000 is below the workspace minimum -0.5"), "{reason}");
    }

    #[test]
    fn custom_state_indices() {
        let cfg = r#"{"min": [-0.5, -0.5, 0.0], "max": [0.5, 0.5, 0.8], "position_state_indices": [7, 8, 9]}"#;
        let mut state = vec![9.0; 7];
        state.extend([0.0, 0.0, 0.4]);
        assert!(matches!(decide(cfg, &ctx(state), &ee(&[[0.1, 0.1, 0.1]])), Decision::Allow));
        let (code, reason) = denied(decide(cfg, &ctx(vec![0.0; 7]), &ee(&[[0.1, 0.1, 0.1]])));
        assert_eq!(code, "bad_state");
        assert!(reason.contains("index 7"), "{reason}");
    }

    #[test]
    fn short_or_non_finite_state_denies() {
        assert_eq!(denied(decide(BOX, &ctx(vec![0.0, 0.0]), &ee(&[[0.0; 3]]))).0, "bad_state");
        assert_eq!(denied(decide(BOX, &ctx(vec![0.0, f32::NAN, 0.0]), &ee(&[[0.0; 3]]))).0, "bad_state");
    }

    #[test]
    fn non_finite_action_denies() {
        let (code, reason) =
            denied(decide(BOX, &ctx(vec![0.0, 0.0, 0.4]), &ee(&[[0.0, 0.0, 0.0], [0.0, f32::NAN, 0.0]])));
        assert_eq!(code, "non_finite");
        assert!(reason.contains("value 8"), "{reason}");
    }

    #[test]
    fn other_kinds_allow() {
        let a = Action { kind: ActionKind::JointVelocity, dof: 7, horizon: 1, values: vec![100.0; 7] };
        assert!(matches!(decide(BOX, &ctx(vec![]), &a), Decision::Allow));
        let a = Action { kind: ActionKind::JointPosition, dof: 7, horizon: 1, values: vec![100.0; 7] };
        assert!(matches!(decide(BOX, &ctx(vec![]), &a), Decision::Allow));
    }

    #[test]
    fn bad_action_shapes_deny() {
        let a = Action { kind: ActionKind::EndEffectorDelta, dof: 2, horizon: 1, values: vec![0.0; 2] };
        assert_eq!(denied(decide(BOX, &ctx(vec![0.0; 3]), &a)).0, "bad_action");
        let a = Action { kind: ActionKind::EndEffectorDelta, dof: 3, horizon: 2, values: vec![0.0; 3] };
        assert_eq!(denied(decide(BOX, &ctx(vec![0.0; 3]), &a)).0, "bad_action");
    }

    #[test]
    fn bad_config_denies_with_the_path() {
        let cases = [
            ("{}", "missing field `min`"),
            (r#"{"min": [0, 0], "max": [1, 1, 1]}"#, "min"),
            (r#"{"min": [0, 0, "a"], "max": [1, 1, 1]}"#, "min[2]"),
            (r#"{"min": [0, 0, 2], "max": [1, 1, 1]}"#, "min[2] (2) is above max[2] (1)"),
            (r#"{"min": [0, 0, 0], "max": [1, 1, 1], "extra": 1}"#, "unknown field `extra`"),
            (
                r#"{"min": [0, 0, 0], "max": [1, 1, 1], "position_state_indices": [-1, 0, 0]}"#,
                "position_state_indices[0]",
            ),
        ];
        for (cfg, needle) in cases {
            // Bad config denies whatever the action.
            let a = Action { kind: ActionKind::JointVelocity, dof: 1, horizon: 1, values: vec![0.0] };
            let (code, reason) = denied(decide(cfg, &ctx(vec![0.0; 3]), &a));
            assert_eq!(code, "bad_config", "{cfg}");
            assert!(reason.contains(needle), "{cfg}: {reason}");
        }
    }
}
