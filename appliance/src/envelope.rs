//! The action envelope (`[action.envelope]` in `model.toml`): what the robot can physically
//! take, held by the host on the **final** action, after every safety policy, so no policy
//! (however it was written, uploaded or configured) can hand the robot more.
//!
//! Every step of a chunk is checked, dof by dof: first `min`/`max`, then `max_delta` against
//! the step before it (for the first step: the first step of the robot's previous answer from
//! this model, kept in [`Memory`] until `forget_after_ms` passes without one). With
//! `on_violation = "deny"` the first violation refuses the answer; with `"clamp"` every value
//! is brought into the envelope (bounds, then the change from the step before, which is itself
//! already within the envelope).

use std::collections::HashMap;
use std::fmt;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::spec::{EnvelopeSpec, OnViolation};

/// The limit a value broke.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Limit {
    Min(f32),
    Max(f32),
    /// Changed by more than `max_delta` from `previous` (the step before, or the robot's
    /// previous action).
    MaxDelta {
        max_delta: f32,
        previous: f32,
    },
}

/// One value outside the envelope: where, what, and which limit.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Violation {
    pub step: usize,
    pub dof: usize,
    pub value: f32,
    pub limit: Limit,
}

impl Violation {
    /// `min`, `max` or `max_delta`: the metric label.
    pub fn kind(&self) -> &'static str {
        match self.limit {
            Limit::Min(_) => "min",
            Limit::Max(_) => "max",
            Limit::MaxDelta { .. } => "max_delta",
        }
    }
}

/// A value as a person reads it: `0.5`, `1e30`.
fn num(x: f32) -> String {
    if x != 0.0 && !(1e-4..1e6).contains(&x.abs()) { format!("{x:e}") } else { format!("{x}") }
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (step, dof, v) = (self.step, self.dof, num(self.value));
        match self.limit {
            Limit::Min(min) => write!(f, "step {step}, dof {dof}: {v} is below the envelope's min {}", num(min)),
            Limit::Max(max) => write!(f, "step {step}, dof {dof}: {v} is above the envelope's max {}", num(max)),
            Limit::MaxDelta { max_delta, previous } => write!(
                f,
                "step {step}, dof {dof}: {v} moves {} from {}, more than the envelope's max_delta {}",
                num((self.value - previous).abs()),
                num(previous),
                num(max_delta)
            ),
        }
    }
}

/// Holds `values` (`horizon × dof`, step-major) to the envelope. `previous` is the first step
/// of the robot's previous answer, if remembered. Returns the first violation: with `deny` as
/// an error (values untouched), with `clamp` as `Ok(Some(..))` after clamping every value.
pub fn apply(
    envelope: &EnvelopeSpec,
    dof: usize,
    values: &mut [f32],
    previous: Option<&[f32]>,
) -> Result<Option<Violation>, Violation> {
    let clamp = envelope.on_violation == OnViolation::Clamp;
    let mut first = None;
    let steps = values.len() / dof.max(1);
    for step in 0..steps {
        for d in 0..dof {
            let i = step * dof + d;
            let before = if step == 0 { previous.and_then(|p| p.get(d).copied()) } else { Some(values[i - dof]) };
            let (min, max) = (envelope.min[d], envelope.max[d]);
            let mut v = values[i];
            let mut broke = None;
            if v < min {
                broke = Some(Limit::Min(min));
                v = min;
            } else if v > max {
                broke = Some(Limit::Max(max));
                v = max;
            }
            if let (Some(deltas), Some(p)) = (&envelope.max_delta, before) {
                let md = deltas[d];
                if (values[i] - p).abs() > md && broke.is_none() {
                    broke = Some(Limit::MaxDelta { max_delta: md, previous: p });
                }
                // `p` is within the bounds, so is anything within `md` of it, clamped again.
                v = v.clamp(p - md, p + md).clamp(min, max);
            }
            if let Some(limit) = broke {
                let violation = Violation { step, dof: d, value: values[i], limit };
                if !clamp {
                    return Err(violation);
                }
                first.get_or_insert(violation);
            }
            if clamp {
                values[i] = v;
            }
        }
    }
    Ok(first)
}

/// Entries kept before stale ones are swept.
const SWEEP_ABOVE: usize = 1024;

/// Each robot's previous answer (its first step) from one model, forgotten after
/// `forget_after_ms` without an answer. Bounded by the registered robots: stale entries are
/// swept once there are more than a thousand.
#[derive(Debug)]
pub struct Memory {
    forget: Duration,
    last: Mutex<HashMap<String, (Vec<f32>, Instant)>>,
}

impl Memory {
    pub fn new(forget_after_ms: u64) -> Memory {
        Memory { forget: Duration::from_millis(forget_after_ms), last: Mutex::new(HashMap::new()) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (Vec<f32>, Instant)>> {
        self.last.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The robot's previous first step, unless forgotten.
    pub fn previous(&self, robot: &str) -> Option<Vec<f32>> {
        self.lock().get(robot).filter(|(_, at)| at.elapsed() < self.forget).map(|(v, _)| v.clone())
    }

    /// Remembers the first step of what the robot was just given.
    pub fn remember(&self, robot: &str, first_step: &[f32]) {
        let mut last = self.lock();
        if last.len() > SWEEP_ABOVE {
            let forget = self.forget;
            last.retain(|_, (_, at)| at.elapsed() < forget);
        }
        last.insert(robot.to_string(), (first_step.to_vec(), Instant::now()));
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn envelope(on_violation: OnViolation, max_delta: Option<Vec<f32>>) -> EnvelopeSpec {
        EnvelopeSpec { min: vec![-1.0, 0.0], max: vec![1.0, 2.0], max_delta, on_violation, forget_after_ms: 1000 }
    }

    #[test]
    fn values_within_pass_untouched() {
        let mut v = vec![0.5, 1.0, -0.5, 1.5];
        assert_eq!(apply(&envelope(OnViolation::Deny, Some(vec![1.0, 1.0])), 2, &mut v, None), Ok(None));
        assert_eq!(v, vec![0.5, 1.0, -0.5, 1.5]);
    }

    #[test]
    fn deny_names_the_first_violation_on_any_step() {
        let mut v = vec![0.0, 1.0, 0.0, 1e30];
        let e = apply(&envelope(OnViolation::Deny, None), 2, &mut v, None).unwrap_err();
        assert_eq!((e.step, e.dof, e.limit), (1, 1, Limit::Max(2.0)));
        assert_eq!(e.to_string(), "step 1, dof 1: 1e30 is above the envelope's max 2");
        assert_eq!(v[3], 1e30, "a denied action is left as it was");
    }

    #[test]
    fn clamp_brings_every_value_in() {
        let mut v = vec![-5.0, 9.0, 0.3, -1.0];
        let first = apply(&envelope(OnViolation::Clamp, None), 2, &mut v, None).unwrap().unwrap();
        assert_eq!((first.step, first.dof, first.limit), (0, 0, Limit::Min(-1.0)));
        assert_eq!(v, vec![-1.0, 2.0, 0.3, 0.0]);
    }

    #[test]
    fn max_delta_holds_within_the_chunk_and_from_the_previous_answer() {
        let deltas = Some(vec![0.25, 0.5]);
        // From the previous answer's first step.
        let mut v = vec![0.5, 1.0];
        let e = apply(&envelope(OnViolation::Deny, deltas.clone()), 2, &mut v, Some(&[0.0, 1.0])).unwrap_err();
        assert_eq!((e.step, e.dof), (0, 0));
        assert!(matches!(e.limit, Limit::MaxDelta { max_delta, previous } if max_delta == 0.25 && previous == 0.0));
        // Within the chunk: step 1 against step 0.
        let mut v = vec![0.0, 1.0, 0.1, 1.8];
        let e = apply(&envelope(OnViolation::Deny, deltas.clone()), 2, &mut v, None).unwrap_err();
        assert_eq!((e.step, e.dof, e.kind()), (1, 1, "max_delta"));
        // Clamped: each step moves at most max_delta from the clamped step before it.
        let mut v = vec![1.0, 2.0, -1.0, 0.0];
        apply(&envelope(OnViolation::Clamp, deltas), 2, &mut v, Some(&[0.0, 1.0])).unwrap();
        assert_eq!(v, vec![0.25, 1.5, 0.0, 1.0]);
    }

    #[test]
    fn memory_forgets_after_its_time() {
        let memory = Memory::new(50);
        memory.remember("arm-1", &[1.0, 2.0]);
        assert_eq!(memory.previous("arm-1"), Some(vec![1.0, 2.0]));
        assert_eq!(memory.previous("arm-2"), None);
        std::thread::sleep(Duration::from_millis(80));
        assert_eq!(memory.previous("arm-1"), None);
    }
}
