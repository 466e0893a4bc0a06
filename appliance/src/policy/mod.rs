//! Policy stage: operator-supplied WebAssembly components that decide on each request.
//!
//! Admission policies run after validation, before a request is queued; safety policies run on
//! the action the model proposed, before it is returned. Each chain runs in configured order
//! (`order`, then name). The chain fails closed:
//!
//! - an enforcing `deny` stops the chain and the robot gets 422 `policy_rejected`;
//! - an enforcing policy that fails (trap, timeout, fuel, memory, invalid output, cannot be
//!   loaded, circuit breaker open) stops the chain and the robot gets 422 `policy_error`;
//! - an enforcing `modify` replaces the action after the host checked it (same kind, dof and
//!   horizon, every value finite) and the next policy sees the replacement;
//! - `shadow` policies are evaluated and recorded, never applied;
//! - a policy that keeps failing opens its circuit breaker ([`Health`]): it is no longer
//!   called and, enforcing, denies every request until an operator acts. Time-outs do not
//!   count: fuel bounds a policy's own work, so a time-out with fuel left is a busy machine.
//!
//! Swaps are atomic: a request takes a snapshot ([`PolicySet`]) before admission and uses it for
//! safety too, so it finishes on the versions it started with.
//!
//! Modules: [`bindings`] (the WIT bindings), [`runtime`] (the sandbox), [`registry`] (installed
//! policies, persistence, uploads), [`audit`] (the decision log) and [`api`] (admin endpoints).

pub mod api;
pub mod audit;
pub mod bindings;
pub mod registry;
pub mod runtime;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use vla_api::{AuditRecord, PolicyEval, PolicyTrace};

use crate::error::ApiError;
use crate::metrics::Family;

pub use bindings::{Action, ActionKind, Decision, RequestContext};
pub use registry::{Installed, Policies, PolicySet};
use runtime::{Failure, Input};

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
            other => Err(format!("must be `admission` or `safety`, got `{}`", runtime::truncate(other, 40))),
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
            other => Err(format!("must be `enforce` or `shadow`, got `{}`", runtime::truncate(other, 40))),
        }
    }
}

/// Policy names: the model repository's names ([`crate::spec::is_valid_name`]), starting with
/// a letter or digit.
pub fn check_name(name: &str) -> Result<(), String> {
    if crate::spec::is_valid_name(name) && name.starts_with(|c: char| c.is_ascii_alphanumeric()) {
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
}

impl Health {
    fn stats(&self) -> vla_api::PolicyStats {
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
    fn reset(&self) {
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
}

impl Passed {
    /// The request got its action: keep what admission charged and wait until the charge is on
    /// disk (`quota.durability = "sync"`). A charge that cannot be made durable fails the
    /// request (503), so nothing is acknowledged that a crash could forget.
    pub async fn keep_charges(&self) -> Result<(), ApiError> {
        match &self.charged {
            Some(c) => c.keep().await.map_err(ApiError::from),
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

impl Policies {
    /// The admission chain for one request from a robot of `group`; a refusal is the robot's
    /// 422 (or 429 when a quota ran out).
    pub async fn admit(
        self: &Arc<Self>,
        set: &Arc<PolicySet>,
        ctx: &RequestContext,
        group: &str,
    ) -> Result<Passed, ApiError> {
        self.run(set, World::Admission, ctx.clone(), group.into(), None).await.map_err(ApiError::PolicyRefused)
    }

    /// The safety chain on the model's proposed `values`; returns the action to send and the
    /// request's whole decision chain. A refusal's chain includes the admission decisions.
    pub async fn check_action(
        self: &Arc<Self>,
        set: &Arc<PolicySet>,
        ctx: RequestContext,
        admitted: &Passed,
        spec: &crate::spec::ModelSpec,
        values: Vec<f32>,
    ) -> Result<(Vec<f32>, PolicyTrace), ApiError> {
        if values.len() != spec.action.dof * spec.action.horizon {
            return Err(ApiError::Internal(format!(
                "model `{}` returned {} action values, not dof × horizon = {}; nothing was sent",
                spec.name,
                values.len(),
                spec.action.dof * spec.action.horizon
            )));
        }
        let action = Action {
            kind: registry::action_kind(spec.action.kind),
            dof: spec.action.dof as u32,
            horizon: spec.action.horizon as u32,
            values,
        };
        match self.run(set, World::Safety, ctx, String::new(), Some(action)).await {
            Ok(passed) => {
                let trace = trace(admitted, &passed);
                Ok((passed.action.map(|a| a.values).unwrap_or_default(), trace))
            }
            Err(mut refusal) => {
                let mut policies = admitted.evals.clone();
                policies.append(&mut refusal.trace.policies);
                refusal.trace.policies = policies;
                Err(ApiError::PolicyRefused(refusal))
            }
        }
    }
}

/// Checks a policy's decision against what it was shown. An `Ok` decision can be applied.
fn check_decision(world: World, decision: Decision, shown: Option<&Action>) -> Result<Decision, Failure> {
    let bounded = |what: &str, s: &str, max: usize| {
        if s.len() > max {
            Err(Failure::InvalidOutput(format!("{what} is {} bytes, more than {max}", s.len())))
        } else {
            Ok(())
        }
    };
    match &decision {
        Decision::Allow => {}
        Decision::Deny(d) => {
            bounded("denial code", &d.code, MAX_CODE_BYTES)?;
            bounded("denial reason", &d.reason, MAX_REASON_BYTES)?;
        }
        Decision::Modify(m) => {
            bounded("modification reason", &m.reason, MAX_REASON_BYTES)?;
            let Some(shown) = shown.filter(|_| world == World::Safety) else {
                return Err(Failure::InvalidOutput("`modify` is only for safety policies".into()));
            };
            let a = &m.action;
            if a.kind != shown.kind || a.dof != shown.dof || a.horizon != shown.horizon {
                return Err(Failure::InvalidOutput(format!(
                    "`modify` changed the action's shape: {:?} {}×{} → {:?} {}×{}",
                    shown.kind, shown.horizon, shown.dof, a.kind, a.horizon, a.dof
                )));
            }
            if a.values.len() != shown.values.len() {
                return Err(Failure::InvalidOutput(format!(
                    "`modify` returned {} values; the action has {}",
                    a.values.len(),
                    shown.values.len()
                )));
            }
            if let Some(i) = a.values.iter().position(|v| !v.is_finite()) {
                return Err(Failure::InvalidOutput(format!("`modify` returned a non-finite value at index {i}")));
            }
        }
    }
    Ok(decision)
}

/// Runs `policies` (one world's chain, in order) on `ctx` and `action`. Blocking.
///
/// Returns the chain's outcome and the audit records it produced (written by the caller).
///
/// An admission chain gets the request's quota `session`: enforcing policies charge it, shadow
/// ones only see what a charge would do. If the chain refuses, its charges are given back.
pub fn run_chain(
    policies: &Policies,
    chain: &[Arc<Installed>],
    ctx: &RequestContext,
    action: Option<Action>,
    mut session: Option<crate::quota::Session>,
) -> (Result<Passed, Refusal>, Vec<AuditRecord>) {
    let mut evals = Vec::with_capacity(chain.len());
    let mut audit = Vec::new();
    let mut current = action;
    let mut modified = false;
    for policy in chain.iter().filter(|p| p.record.enabled) {
        let record = &policy.record;
        if let Some(s) = &mut session {
            s.apply = record.mode == Mode::Enforce;
            s.refused = None;
        }
        let started = Instant::now();
        let outcome = policy.call(policies, ctx, current.as_ref(), &mut session);
        let elapsed = started.elapsed();
        policy.duration.observe(elapsed.as_secs_f64());
        let eval_us = elapsed.as_micros() as u64;
        let (decision, code, reason) = match &outcome {
            Ok(Decision::Allow) => ("allow", None, None),
            Ok(Decision::Deny(d)) => ("deny", Some(d.code.clone()), Some(d.reason.clone())),
            Ok(Decision::Modify(m)) => ("modify", None, Some(m.reason.clone())),
            Err(f) => ("error", Some(f.kind().to_string()), Some(f.to_string())),
        };
        evals.push(PolicyEval {
            name: record.name.clone(),
            version: record.version,
            world: record.world.as_str().into(),
            mode: record.mode.as_str().into(),
            decision: decision.into(),
            code: code.clone(),
            reason: reason.clone(),
            eval_us,
        });
        let enforce = record.mode == Mode::Enforce;
        let m = policies.metrics();
        match &outcome {
            Ok(Decision::Deny(d)) if enforce => m.cached(Family::Rejections, &[&record.name, &d.code]).inc(),
            Ok(Decision::Modify(_)) if enforce => m.cached(Family::Modifications, &[&record.name]).inc(),
            Err(f) => m.cached(Family::PolicyFailures, &[&record.name, f.kind()]).inc(),
            _ => {}
        }
        if decision != "allow" {
            let replacement = match &outcome {
                Ok(Decision::Modify(m)) => Some(m.action.values.clone()),
                _ => None,
            };
            audit.push(AuditRecord {
                seq: 0,
                time_unix_ms: ctx.time_ms,
                request_id: ctx.request_id.clone(),
                robot_id: ctx.robot_id.clone(),
                robot_type: ctx.robot_type.clone(),
                model: ctx.model.clone(),
                policy: record.name.clone(),
                version: record.version,
                world: record.world.as_str().into(),
                mode: record.mode.as_str().into(),
                decision: decision.into(),
                applied: enforce,
                code: code.clone(),
                reason: reason.clone(),
                original_action: current.as_ref().map(|a| a.values.clone()),
                final_action: replacement,
            });
        }
        if !enforce {
            continue;
        }
        match outcome {
            Ok(Decision::Allow) => {}
            Ok(Decision::Modify(m)) => {
                current = Some(m.action);
                modified = true;
            }
            Ok(Decision::Deny(_)) | Err(_) => {
                let failed = outcome.is_err();
                let rate_limit = session.as_ref().and_then(|s| s.refused).filter(|_| !failed);
                let m = policies.metrics();
                m.cached(Family::SafetyChecks, &[if failed { "error" } else { "deny" }]).inc();
                if let Some(status) = &rate_limit {
                    m.cached(Family::RateLimitHits, &[&ctx.robot_id, status.bucket.as_str()]).inc();
                }
                // Dropping the charges unkept gives them back.
                drop(session.and_then(crate::quota::Session::finish));
                let refusal = Refusal {
                    policy: record.name.clone(),
                    version: record.version,
                    code: code.unwrap_or_default(),
                    reason: reason.unwrap_or_default(),
                    failed,
                    rate_limit,
                    trace: PolicyTrace { decision: "deny".into(), policies: evals },
                };
                return (Err(refusal), audit);
            }
        }
    }
    if !evals.is_empty() {
        policies.metrics().cached(Family::SafetyChecks, &[if modified { "modify" } else { "allow" }]).inc();
    }
    let charged = session.and_then(crate::quota::Session::finish);
    (Ok(Passed { evals, action: current, modified, charged }), audit)
}

impl Installed {
    /// One evaluation with breaker and counters. Fails closed on every path.
    fn call(
        &self,
        policies: &Policies,
        ctx: &RequestContext,
        action: Option<&Action>,
        session: &mut Option<crate::quota::Session>,
    ) -> Result<Decision, Failure> {
        let health = &self.health;
        let outcome = if health.open.load(Ordering::Relaxed) {
            Err(Failure::Instantiate(format!(
                "circuit breaker open after {} consecutive failures; an operator must PATCH or replace the policy",
                health.consecutive_failures.load(Ordering::Relaxed)
            )))
        } else {
            match &self.compiled {
                Err(problem) => Err(Failure::Instantiate(format!("policy cannot run: {problem}"))),
                Ok(compiled) => {
                    let started = Instant::now();
                    let input = match (self.record.world, action) {
                        (World::Admission, _) => Input::Admit(ctx),
                        (World::Safety, Some(action)) => Input::Evaluate(ctx, action),
                        (World::Safety, None) => {
                            return Err(Failure::Instantiate("safety policy called without an action".into()));
                        }
                    };
                    let (result, back) =
                        policies.runtime().call_with(compiled, &self.name, &self.config, input, session.take());
                    *session = back;
                    let result = result.and_then(|d| check_decision(self.record.world, d, action));
                    health.evaluations.fetch_add(1, Ordering::Relaxed);
                    health.eval_us_total.fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
                    result
                }
            }
        };
        match &outcome {
            Ok(d) => {
                health.consecutive_failures.store(0, Ordering::Relaxed);
                let counter = match d {
                    Decision::Allow => &health.allows,
                    Decision::Deny(_) => &health.denials,
                    Decision::Modify(_) => &health.modifications,
                };
                counter.fetch_add(1, Ordering::Relaxed);
            }
            // A timeout with fuel to spare means the call sat descheduled on a busy machine:
            // the request is denied, but the policy is not to blame, so the breaker ignores it.
            Err(Failure::Timeout(_)) => {
                health.failures.fetch_add(1, Ordering::Relaxed);
            }
            // An older version, still serving requests that started before an upload, does not
            // trip the breaker its replacement now shares.
            Err(_) if !policies.is_current(self) => {
                health.failures.fetch_add(1, Ordering::Relaxed);
            }
            Err(failure) => {
                if !health.open.load(Ordering::Relaxed) && self.compiled.is_ok() {
                    health.failures.fetch_add(1, Ordering::Relaxed);
                    let n = health.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
                    if n >= policies.breaker_failures() && !health.open.swap(true, Ordering::Relaxed) {
                        tracing::error!(
                            policy = %self.record.name,
                            "circuit breaker opened after {n} consecutive failures (last: {failure}); \
                             the policy is no longer called{}",
                            if self.record.mode == Mode::Enforce { " and denies every request" } else { "" }
                        );
                    }
                }
            }
        }
        outcome
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use bindings::{Denial, Modification};

    fn action(values: Vec<f32>) -> Action {
        Action { kind: ActionKind::JointVelocity, dof: values.len() as u32, horizon: 1, values }
    }

    #[test]
    fn a_modification_must_keep_the_shape_and_stay_finite() {
        let shown = action(vec![0.0; 3]);
        let modify = |a: Action| Decision::Modify(Modification { action: a, reason: "r".into() });
        assert!(check_decision(World::Safety, modify(action(vec![0.1; 3])), Some(&shown)).is_ok());
        let longer = check_decision(World::Safety, modify(action(vec![0.1; 4])), Some(&shown));
        assert!(matches!(longer, Err(Failure::InvalidOutput(_))), "{longer:?}");
        let nan = check_decision(World::Safety, modify(action(vec![0.1, f32::NAN, 0.1])), Some(&shown));
        assert!(matches!(nan, Err(Failure::InvalidOutput(m)) if m.contains("index 1")));
        let mut other_kind = action(vec![0.1; 3]);
        other_kind.kind = ActionKind::JointPosition;
        assert!(check_decision(World::Safety, modify(other_kind), Some(&shown)).is_err());
        let admission = check_decision(World::Admission, modify(action(vec![0.1; 3])), None);
        assert!(matches!(admission, Err(Failure::InvalidOutput(m)) if m.contains("only for safety")));
    }

    #[test]
    fn denials_are_bounded() {
        let deny = |code: &str, reason: &str| Decision::Deny(Denial { code: code.into(), reason: reason.into() });
        assert!(check_decision(World::Admission, deny("c", "r"), None).is_ok());
        assert!(check_decision(World::Admission, deny(&"c".repeat(65), "r"), None).is_err());
        assert!(check_decision(World::Admission, deny("c", &"r".repeat(1025)), None).is_err());
    }

    #[test]
    fn names_worlds_and_modes_are_checked() {
        assert!(check_name("joint-limits.v2").is_ok());
        assert!(check_name("-x").is_err());
        assert!(check_name("a/b").is_err());
        assert!(check_name(&"a".repeat(65)).is_err());
        assert_eq!("safety".parse::<World>(), Ok(World::Safety));
        assert!("Safety".parse::<World>().is_err());
        assert_eq!("shadow".parse::<Mode>(), Ok(Mode::Shadow));
    }

    #[test]
    fn trusted_keys_are_32_bytes_of_base64() {
        assert!(parse_public_key("AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=").is_ok());
        assert!(parse_public_key("AAAA").unwrap_err().contains("32 bytes"));
        assert!(parse_public_key("not base64!").is_err());
    }
}
