//! Replayable decisions: the ring of recent requests (sled tree `replay_ring`, the newest
//! `policy.replay_ring` [`DecisionRecord`]s, keyed by the store's generated ids so the tree is
//! in time order) and the replay of a candidate policy against it.
//!
//! A request is recorded once its policy stage is over: after its safety chain, or when its
//! admission chain refused it. The record holds everything the decisions depended on (the
//! request's context, the model's proposed action, each policy's component and configuration
//! hashes, decision and replacement action), so a policy with the same component and
//! configuration decides the same way on it (`wit/policy.wit` promises that).
//!
//! A replay shows a candidate what the policy it stands in for (`replaces`, its own name by
//! default) was shown on each recorded request: for a safety candidate, the model's proposed
//! action after the enforced modifications of the policies before it (or, when that policy
//! did not run, the action after the whole recorded chain); for an admission candidate, the
//! context. It reports every request on which it would decide otherwise than that policy did
//! (a policy that did not run counts as `allow`). Admission candidates see the quota store as
//! it is now and charge nothing; the host's action envelope is not part of a replay.

use std::sync::{Arc, Mutex, PoisonError};

use vla_api::{DecisionRecord, DecisionStep, ReplayChange, ReplayOutcome, ReplayReport};

use super::bindings::{Action, ActionKind, Decision, RequestContext};
use super::chain::check_decision;
use super::runtime::{Compiled, Input, Runtime};
use super::types::World;
use crate::quota::{Quotas, Session};
use crate::store::{Store, StoreError};

const TREE: &str = "replay_ring";

/// Most records one replay goes through.
pub const MAX_LIMIT: usize = 10_000;
pub const DEFAULT_LIMIT: usize = 1_000;

/// The ring of recent requests.
#[derive(Debug)]
pub struct Ring {
    store: Arc<Store>,
    capacity: u64,
    /// Records kept, counted at open (sled's `len` walks the tree).
    len: Mutex<u64>,
}

impl Ring {
    pub fn open(store: Arc<Store>, capacity: u64) -> Result<Ring, StoreError> {
        let len = store.tree(TREE)?.len() as u64;
        Ok(Ring { store, capacity, len: Mutex::new(len) })
    }

    /// Keeps `record`, dropping the oldest beyond the ring's capacity. Errors are logged: a
    /// full disk must not fail the robot's request. Blocking (short sled writes).
    pub fn append(&self, mut record: DecisionRecord) {
        if self.capacity == 0 {
            return;
        }
        let mut len = self.len.lock().unwrap_or_else(PoisonError::into_inner);
        let result = (|| {
            let db = self.store.db()?;
            let tree = db.open_tree(TREE)?;
            record.seq = db.generate_id().map_err(|e| self.store.fault(e))?;
            tree.insert(record.seq.to_be_bytes(), serde_json::to_vec(&record).unwrap_or_default())
                .map_err(|e| self.store.fault(e))?;
            *len += 1;
            while *len > self.capacity {
                if tree.pop_min().map_err(|e| self.store.fault(e))?.is_none() {
                    break;
                }
                *len -= 1;
            }
            Ok::<_, StoreError>(())
        })();
        if let Err(e) = result {
            tracing::error!(request_id = %record.request_id, "replay ring record lost: {e}");
        }
    }

    /// The newest records (at or after `since_unix_ms`), newest first. Blocking.
    pub fn recent(&self, since_unix_ms: Option<u64>, limit: usize) -> Result<Vec<DecisionRecord>, StoreError> {
        let mut out = Vec::new();
        for kv in self.store.tree(TREE)?.iter().rev() {
            let (key, value) = kv?;
            let record: DecisionRecord = serde_json::from_slice(&value).map_err(|e| StoreError::Corrupt {
                key: format!("{TREE}/{}", u64::from_be_bytes(key.as_ref().try_into().unwrap_or_default())),
                problem: e.to_string(),
            })?;
            if since_unix_ms.is_some_and(|since| record.time_unix_ms < since) {
                break;
            }
            out.push(record);
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }
}

/// A policy to replay: its component compiled, its name, world and configuration.
#[derive(Debug)]
pub struct Candidate {
    pub name: Arc<str>,
    pub world: World,
    pub compiled: Compiled,
    /// The JSON text it reads through `host.config()`.
    pub config: Arc<str>,
    pub sha256: String,
    pub config_sha256: String,
    /// The installed policy it stands in for.
    pub replaces: String,
}

/// Replays `candidate` on `records` (see the module header). Blocking: each call runs in the
/// sandbox within the usual limits, one after another.
pub fn replay(
    runtime: &Runtime,
    quotas: &Arc<Quotas>,
    candidate: &Candidate,
    records: &[DecisionRecord],
) -> ReplayReport {
    let mut report = ReplayReport {
        policy: candidate.name.to_string(),
        world: candidate.world.as_str().into(),
        sha256: candidate.sha256.clone(),
        config_sha256: candidate.config_sha256.clone(),
        replaces: candidate.replaces.clone(),
        ..ReplayReport::default()
    };
    for record in records {
        let Some(shown) = shown(record, candidate) else {
            report.skipped += 1;
            continue;
        };
        let ctx = context(record);
        let recorded = recorded(record, &candidate.replaces);
        let input = match (&shown, candidate.world) {
            (Some(action), World::Safety) => Input::Evaluate(&ctx, action),
            _ => Input::Admit(&ctx),
        };
        let session = (candidate.world == World::Admission).then(|| {
            let mut s = Session::new(quotas.clone(), &record.robot_id, "replay", crate::clock::now_ms());
            s.apply = false;
            s
        });
        let decided = runtime
            .call_with(&candidate.compiled, &candidate.name, &candidate.config, input, session)
            .0
            .and_then(|d| check_decision(candidate.world, d, shown.as_ref()));
        let now = match decided {
            Ok(Decision::Allow) => ReplayOutcome { decision: "allow".into(), ..ReplayOutcome::default() },
            Ok(Decision::Deny(d)) => {
                ReplayOutcome { decision: "deny".into(), code: Some(d.code), reason: Some(d.reason), action: None }
            }
            Ok(Decision::Modify(m)) => ReplayOutcome {
                decision: "modify".into(),
                code: None,
                reason: Some(m.reason),
                action: Some(m.action.values),
            },
            Err(f) => ReplayOutcome {
                decision: "error".into(),
                code: Some(f.kind().into()),
                reason: Some(f.to_string()),
                action: None,
            },
        };
        report.replayed += 1;
        if same(&recorded, &now) {
            report.unchanged += 1;
        } else {
            report.changed.push(ReplayChange {
                seq: record.seq,
                request_id: record.request_id.clone(),
                robot_id: record.robot_id.clone(),
                time_unix_ms: record.time_unix_ms,
                recorded,
                candidate: now,
            });
        }
    }
    report
}

/// What the candidate is shown on `record`: `Some(None)` for an admission candidate (the
/// context only), `Some(Some(action))` for a safety one, `None` when it cannot be shown it.
fn shown(record: &DecisionRecord, candidate: &Candidate) -> Option<Option<Action>> {
    if candidate.world == World::Admission {
        return Some(None);
    }
    let proposed = record.proposed_action.as_ref()?;
    let safety = record.policies.iter().filter(|s| s.world == "safety");
    let mut current = proposed.clone();
    let mut found = false;
    for step in safety {
        if step.name == candidate.replaces {
            found = true;
            break;
        }
        if step.mode == "enforce"
            && step.decision == "modify"
            && let Some(action) = &step.action
        {
            current = action.clone();
        }
    }
    if !found {
        current = record.final_action.clone().unwrap_or(current);
    }
    Some(Some(action_of(current, record)))
}

/// The action as the policies saw it: the recorded values in the recorded shape.
fn action_of(values: Vec<f32>, record: &DecisionRecord) -> Action {
    let kind = match record.action_kind.as_deref() {
        Some("joint-position") => ActionKind::JointPosition,
        Some("end-effector-delta") => ActionKind::EndEffectorDelta,
        _ => ActionKind::JointVelocity,
    };
    Action { kind, dof: record.dof, horizon: record.horizon, values }
}

fn context(record: &DecisionRecord) -> RequestContext {
    RequestContext {
        request_id: record.request_id.clone(),
        robot_id: record.robot_id.clone(),
        robot_type: record.robot_type.clone(),
        model: record.model.clone(),
        instruction: record.instruction.clone(),
        state: record.state.clone().unwrap_or_default(),
        time_ms: record.time_unix_ms,
    }
}

/// What the policy `name` decided on `record` (`allow` when it did not run).
fn recorded(record: &DecisionRecord, name: &str) -> ReplayOutcome {
    match record.policies.iter().find(|s: &&DecisionStep| s.name == name) {
        None => ReplayOutcome { decision: "allow".into(), ..ReplayOutcome::default() },
        Some(step) => ReplayOutcome {
            decision: step.decision.clone(),
            code: step.code.clone(),
            reason: None,
            action: step.action.clone(),
        },
    }
}

/// Whether two outcomes are the same decision: the same kind, the same denial code, the same
/// replacement action.
fn same(a: &ReplayOutcome, b: &ReplayOutcome) -> bool {
    a.decision == b.decision
        && match a.decision.as_str() {
            "deny" | "error" => a.code == b.code,
            "modify" => a.action == b.action,
            _ => true,
        }
}

/// `appliance replay`: replays the component `bytes` (world `world`, configuration `config`)
/// standing in for the policy `replaces` against the store's ring, offline (the appliance must
/// be stopped: the store is opened here). Blocking.
#[allow(clippy::too_many_arguments)]
pub fn offline(
    data_dir: &std::path::Path,
    policy: &super::config::PolicyConfig,
    quota: &crate::quota::QuotaConfig,
    bytes: &[u8],
    world: World,
    policy_config: &serde_json::Value,
    replaces: &str,
    since_unix_ms: Option<u64>,
    limit: usize,
) -> Result<ReplayReport, String> {
    use sha2::{Digest, Sha256};
    let store = Arc::new(Store::open(data_dir).map_err(|e| {
        format!("opening the store under {} (is the appliance still running?): {e}", data_dir.display())
    })?);
    let quotas = Arc::new(Quotas::open(store.clone(), quota).map_err(|e| e.to_string())?);
    let data_dir = std::path::absolute(data_dir).map_err(|e| e.to_string())?;
    let runtime = Runtime::new(policy, &data_dir.join("policy-cache"))?;
    let compiled = runtime.compile(bytes, world)?;
    if !policy_config.is_object() {
        return Err("the policy configuration must be a JSON object (or a TOML table)".into());
    }
    let text = serde_json::to_string(policy_config).unwrap_or_default();
    let candidate = Candidate {
        name: replaces.into(),
        world,
        compiled,
        config_sha256: crate::store::hex(&Sha256::digest(text.as_bytes())),
        config: text.into(),
        sha256: crate::store::hex(&Sha256::digest(bytes)),
        replaces: replaces.into(),
    };
    let ring = Ring::open(store, u64::MAX).map_err(|e| e.to_string())?;
    let records = ring.recent(since_unix_ms, limit.clamp(1, MAX_LIMIT)).map_err(|e| e.to_string())?;
    Ok(replay(&runtime, &quotas, &candidate, &records))
}
