//! The policy stage's vocabulary: worlds and modes, names and trusted keys, a policy's health
//! (counters and circuit breaker), and what a chain hands back (a request let through, or
//! refused and why).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use serde::{Deserialize, Serialize};
use vla_api::{PolicyEval, PolicyTrace};

use super::bindings::{Action, RequestContext};
use crate::names::clip;

/// Longest denial code and reason a policy may return, in bytes.
pub const MAX_CODE_BYTES: usize = 64;
pub const MAX_REASON_BYTES: usize = 1024;

/// Which world a policy implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum World {
    Admission,
    Safety,
}

impl World {
    pub fn as_str(self) -> &'static str {
        match self {
            World::Admission => "admission",
            World::Safety => "safety",
        }
    }

    /// The function the world exports.
    pub fn export(self) -> &'static str {
        match self {
            World::Admission => "admit",
            World::Safety => "evaluate",
        }
    }
}

impl std::fmt::Display for World {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for World {
    type Err = String;
    fn from_str(s: &str) -> Result<World, String> {
        match s {
            "admission" => Ok(World::Admission),
            "safety" => Ok(World::Safety),
            other => Err(format!("must be `admission` or `safety`, got `{}`", clip(other, 40))),
        }
    }
}

/// Whether a policy's decisions are applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Enforce,
    Shadow,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Enforce => "enforce",
            Mode::Shadow => "shadow",
        }
    }
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Mode, String> {
        match s {
            "enforce" => Ok(Mode::Enforce),
            "shadow" => Ok(Mode::Shadow),
            other => Err(format!("must be `enforce` or `shadow`, got `{}`", clip(other, 40))),
        }
    }
}

/// Policy names: the model repository's names ([`crate::names::is_valid_name`]), starting with
/// a letter or digit.
pub fn check_name(name: &str) -> Result<(), String> {
    if crate::names::is_valid_name(name) && name.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        Ok(())
    } else {
        Err("must be 1-64 of [A-Za-z0-9._-], starting with a letter or digit".into())
    }
}

/// Parses a trusted key: base64 of a 32-byte ed25519 public key.
pub fn parse_public_key(key: &str) -> Result<[u8; 32], String> {
    use base64::Engine;
    let bytes = base64::engine::general_purpose::STANDARD.decode(key.trim()).map_err(|e| format!("not base64: {e}"))?;
    bytes.try_into().map_err(|b: Vec<u8>| format!("an ed25519 public key is 32 bytes, got {}", b.len()))
}

/// Counters and the circuit breaker of one policy name; shared by its versions.
#[derive(Debug, Default)]
pub struct Health {
    pub evaluations: AtomicU64,
    pub allows: AtomicU64,
    pub denials: AtomicU64,
    pub modifications: AtomicU64,
    pub failures: AtomicU64,
    pub consecutive_failures: AtomicU64,
    pub eval_us_total: AtomicU64,
    /// Open: the policy is not called and (enforcing) every request it would see is denied,
    /// until an operator changes the policy (any PATCH or a new upload).
    pub open: AtomicBool,
    /// The denial codes this policy's metrics name, at most [`MAX_CODE_LABELS`].
    pub codes: std::sync::Mutex<Vec<String>>,
}

/// Denial codes one policy may give its own metric series; further codes count as `other`,
/// so a policy (or a robot provoking it) cannot create series without end.
pub const MAX_CODE_LABELS: usize = 16;

impl Health {
    /// The `violation_type` label for `code`: itself while the policy has used fewer than
    /// [`MAX_CODE_LABELS`] codes (or used it before), else `other`.
    pub fn code_label(&self, code: &str) -> String {
        let mut codes = self.codes.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if codes.iter().any(|c| c == code) {
            return code.to_string();
        }
        if codes.len() < MAX_CODE_LABELS {
            codes.push(code.to_string());
            return code.to_string();
        }
        "other".into()
    }

    pub fn stats(&self) -> vla_api::PolicyStats {
        let evaluations = self.evaluations.load(Ordering::Relaxed);
        vla_api::PolicyStats {
            evaluations,
            allows: self.allows.load(Ordering::Relaxed),
            denials: self.denials.load(Ordering::Relaxed),
            modifications: self.modifications.load(Ordering::Relaxed),
            failures: self.failures.load(Ordering::Relaxed),
            consecutive_failures: self.consecutive_failures.load(Ordering::Relaxed),
            mean_eval_us: if evaluations == 0 {
                0.0
            } else {
                self.eval_us_total.load(Ordering::Relaxed) as f64 / evaluations as f64
            },
        }
    }

    /// Closes the breaker (an operator acted).
    pub fn reset(&self) {
        self.open.store(false, Ordering::Relaxed);
        self.consecutive_failures.store(0, Ordering::Relaxed);
    }
}

/// Why a request was refused by its policies: the enforcing policy that denied or failed.
#[derive(Debug, Clone, PartialEq)]
pub struct Refusal {
    pub policy: String,
    pub version: u64,
    /// The policy's denial code, or the failure's kind.
    pub code: String,
    pub reason: String,
    /// The policy failed (`policy_error`) rather than denied (`policy_rejected`).
    pub failed: bool,
    /// The policy denied after a quota bucket refused a charge: the robot gets 429 with this
    /// bucket's `Retry-After` and `RateLimit-*` headers.
    pub rate_limit: Option<crate::quota::Status>,
    pub trace: PolicyTrace,
}

/// The outcome of a chain that let the request through.
#[derive(Debug, Clone)]
pub struct Passed {
    pub evals: Vec<PolicyEval>,
    /// The final action (safety chains), after any enforced `modify`.
    pub action: Option<Action>,
    pub modified: bool,
    /// What the admission chain charged to the robot's quotas; given back unless the request
    /// [keeps](Passed::keep_charges) it.
    pub charged: Option<Arc<crate::quota::Charged>>,
    /// The admission chain's steps, carried to the safety chain for the replay ring.
    pub steps: Vec<vla_api::DecisionStep>,
}

impl Passed {
    /// The request got its action: keep what admission charged and wait until the charge is on
    /// disk (`quota.durability = "sync"`). A charge that cannot be made durable fails the
    /// request (503), so nothing is acknowledged that a crash could forget.
    pub async fn keep_charges(&self) -> Result<(), crate::quota::QuotaError> {
        match &self.charged {
            Some(c) => c.keep().await,
            None => Ok(()),
        }
    }

    /// The tightest quota bucket after this request's charges, for the `RateLimit-*` headers.
    pub fn quota_status(&self) -> Option<crate::quota::Status> {
        self.charged.as_ref().and_then(|c| c.tightest)
    }
}

/// What a request's two chains decided, for the response.
pub fn trace(admission: &Passed, safety: &Passed) -> PolicyTrace {
    let mut policies = admission.evals.clone();
    policies.extend(safety.evals.iter().cloned());
    let decision = if admission.modified || safety.modified { "modify" } else { "allow" };
    PolicyTrace { decision: decision.into(), policies }
}

/// What a request's audit records carry beside its context, to replay it: the noise seed it
/// ran with and the serving model's version.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Provenance {
    pub seed: Option<u64>,
    pub model_version: Option<String>,
}

/// What a request's policies see of it. `time_ms` is the host's clock at arrival, so a
/// decision can be replayed from the audit log.
pub fn context(
    request_id: &str,
    robot: &crate::store::RobotRecord,
    model: &str,
    instruction: String,
    state: Vec<f32>,
    time_ms: u64,
) -> RequestContext {
    RequestContext {
        request_id: request_id.into(),
        robot_id: robot.robot_id.clone(),
        robot_type: robot.robot_type.clone(),
        model: model.into(),
        instruction,
        state,
        time_ms,
    }
}
