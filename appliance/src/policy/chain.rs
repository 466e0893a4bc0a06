//! One chain's run: each enabled policy in order, with its breaker and counters, the host's
//! check of every decision, the audit records it produced, and the quota session of an
//! admission chain. Blocking: the registry runs it on the blocking pool.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use vla_api::{AuditRecord, DecisionStep, PolicyEval, PolicyTrace};

use super::bindings::{Action, Decision, RequestContext};
use super::installed::Installed;
use super::runtime::{Failure, Input, Runtime};
use super::types::{MAX_CODE_BYTES, MAX_REASON_BYTES, Mode, Passed, Refusal, World};
use crate::metrics::{Family, Metrics};

/// What a chain's run needs from the stage around it.
#[derive(Debug, Clone, Copy)]
pub struct Env<'a> {
    pub runtime: &'a Runtime,
    pub metrics: &'a Metrics,
    /// Consecutive failures that open a policy's breaker.
    pub breaker_failures: u64,
}

/// Checks a policy's decision against what it was shown. An `Ok` decision can be applied.
pub fn check_decision(world: World, decision: Decision, shown: Option<&Action>) -> Result<Decision, Failure> {
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

/// The `severity` label of a denial: the policy's, or `unspecified` (a `vla:policy@0.1.0`
/// component's denials, or a 0.2.0 one that gave none).
pub fn severity_label(denial: &super::bindings::Denial) -> &'static str {
    use super::bindings::Severity;
    match denial.severity {
        None => "unspecified",
        Some(Severity::Low) => "low",
        Some(Severity::Medium) => "medium",
        Some(Severity::High) => "high",
        Some(Severity::Critical) => "critical",
    }
}

/// Runs `policies` (one world's chain, in order) on `ctx` and `action`. Blocking.
///
/// Returns the chain's outcome, the audit records it produced (written by the caller) and each
/// policy's step for the replay ring.
///
/// An admission chain gets the request's quota `session`: enforcing policies charge it, shadow
/// ones only see what a charge would do. If the chain refuses, its charges are given back.
pub fn run_chain(
    env: Env<'_>,
    chain: &[Arc<Installed>],
    ctx: &RequestContext,
    action: Option<Action>,
    mut session: Option<crate::quota::Session>,
) -> (Result<Passed, Refusal>, Vec<AuditRecord>, Vec<DecisionStep>) {
    let mut evals = Vec::with_capacity(chain.len());
    let mut steps = Vec::with_capacity(chain.len());
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
        let outcome = policy.call(env, ctx, current.as_ref(), &mut session);
        let elapsed = started.elapsed();
        policy.duration.observe(elapsed.as_secs_f64());
        let eval_us = elapsed.as_micros() as u64;
        let (decision, code, reason) = match &outcome {
            Ok(Decision::Allow) => ("allow", None, None),
            Ok(Decision::Deny(d)) => ("deny", Some(d.code.clone()), Some(d.reason.clone())),
            Ok(Decision::Modify(m)) => ("modify", None, Some(m.reason.clone())),
            Err(f) => ("error", Some(f.kind().to_string()), Some(f.to_string())),
        };
        let severity = match &outcome {
            Ok(Decision::Deny(d)) if d.severity.is_some() => Some(severity_label(d).to_string()),
            _ => None,
        };
        evals.push(PolicyEval {
            name: record.name.clone(),
            version: record.version,
            world: record.world.as_str().into(),
            mode: record.mode.as_str().into(),
            decision: decision.into(),
            code: code.clone(),
            reason: reason.clone(),
            severity: severity.clone(),
            eval_us,
        });
        let replacement = match &outcome {
            Ok(Decision::Modify(m)) => Some(m.action.values.clone()),
            _ => None,
        };
        steps.push(DecisionStep {
            name: record.name.clone(),
            version: record.version,
            world: record.world.as_str().into(),
            mode: record.mode.as_str().into(),
            decision: decision.into(),
            code: code.clone(),
            severity: severity.clone(),
            sha256: record.sha256.clone(),
            config_sha256: policy.config_sha256.clone(),
            action: replacement.clone(),
        });
        let enforce = record.mode == Mode::Enforce;
        let m = env.metrics;
        match &outcome {
            Ok(Decision::Deny(d)) if enforce => {
                let code = policy.health.code_label(&d.code);
                match record.world {
                    World::Admission => m.cached(Family::AdmissionRejections, &[&record.name, &code]).inc(),
                    World::Safety => {
                        let severity = severity_label(d);
                        m.cached(Family::Rejections, &[&record.name, &code, severity]).inc();
                        m.incident(severity, &code);
                    }
                }
            }
            Ok(Decision::Modify(_)) if enforce => m.cached(Family::Modifications, &[&record.name]).inc(),
            Err(f) => m.cached(Family::PolicyFailures, &[&record.name, f.kind()]).inc(),
            _ => {}
        }
        if decision != "allow" {
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
                severity,
                instruction: Some(ctx.instruction.clone()),
                state: Some(ctx.state.clone()),
                sha256: Some(record.sha256.clone()),
                config_sha256: Some(policy.config_sha256.clone()),
                original_action: current.as_ref().map(|a| a.values.clone()),
                final_action: replacement,
                count: 1,
                ..AuditRecord::default()
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
                let m = env.metrics;
                m.cached(Family::SafetyChecks, &[if failed { "error" } else { "deny" }]).inc();
                if let Some(status) = &rate_limit {
                    m.rate_limited(&ctx.robot_id, status.bucket.as_str());
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
                return (Err(refusal), audit, steps);
            }
        }
    }
    if !evals.is_empty() {
        env.metrics.cached(Family::SafetyChecks, &[if modified { "modify" } else { "allow" }]).inc();
    }
    let charged = session.and_then(crate::quota::Session::finish);
    (Ok(Passed { evals, action: current, modified, charged, steps: Vec::new() }), audit, steps)
}

impl Installed {
    /// One evaluation with breaker and counters. Fails closed on every path.
    fn call(
        &self,
        env: Env<'_>,
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
                        env.runtime.call_with(compiled, &self.name, &self.config, input, session.take());
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
            // Time-outs deny the request but do not trip the breaker: fuel bounds the policy's
            // own instructions, so a call past its CPU-time budget spent it in host calls, and
            // one past the wall-clock backstop sat descheduled or stalled on the machine.
            Err(Failure::Timeout(_) | Failure::WallClock(_)) => {
                health.failures.fetch_add(1, Ordering::Relaxed);
            }
            // An older version, still serving requests that started before an upload, does not
            // trip the breaker its replacement now shares.
            Err(_) if !self.is_current() => {
                health.failures.fetch_add(1, Ordering::Relaxed);
            }
            Err(failure) => {
                if !health.open.load(Ordering::Relaxed) && self.compiled.is_ok() {
                    health.failures.fetch_add(1, Ordering::Relaxed);
                    let n = health.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
                    if n >= env.breaker_failures && !health.open.swap(true, Ordering::Relaxed) {
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
    use crate::policy::bindings::{ActionKind, Denial, Modification};
    use crate::policy::types::{check_name, parse_public_key};

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
    fn a_policy_names_at_most_sixteen_denial_codes_in_its_metrics() {
        let health = crate::policy::types::Health::default();
        for i in 0..16 {
            assert_eq!(health.code_label(&format!("code-{i}")), format!("code-{i}"));
        }
        assert_eq!(health.code_label("code-99"), "other");
        assert_eq!(health.code_label("code-3"), "code-3", "a code already named keeps its series");
    }

    #[test]
    fn denials_are_bounded() {
        let deny = |code: &str, reason: &str| {
            Decision::Deny(Denial { code: code.into(), reason: reason.into(), severity: None })
        };
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
