//! Installed policies: what runs ([`PolicySet`], swapped atomically), what is kept (component
//! files `<data.dir>/policies/<sha256>.wasm`, records in sled tree `policies`), and the
//! operations that change them (upload, patch, delete, preload at start).
//!
//! Every change is validated before it is kept: the component compiles, implements the declared
//! world, imports nothing else, and passes a dry run on a sample input within its limits. A
//! change that fails leaves the previous version serving. Changes are serialised by one lock
//! and persisted (file fsynced and renamed into place, record flushed) before the new set is
//! swapped in; a request holds the set it started with until it finishes.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;
use vla_api::{DecisionRecord, DecisionStep, PolicyInfo, PolicyPatch, PolicyTrace};

use super::audit::Audit;
use super::bindings::{Action, ActionKind, RequestContext};
use super::chain::{Env, check_decision, run_chain};
use super::config::PolicyConfig;
use super::installed::{Installed, PolicyRecord, PolicySet, action_kind, info};
use super::runtime::{Compiled, Input, Runtime};
use super::types::{Health, Mode, Passed, Provenance, Refusal, World, check_name, parse_public_key, trace};
use crate::metrics::Metrics;
use crate::quota::{Quotas, Session};
use crate::spec::ModelSpec;
use crate::store::{Store, StoreError, hex};

/// Why a policy change was refused.
#[derive(Debug, thiserror::Error)]
pub enum ChangeError {
    /// The component or its metadata is unusable (400 `policy_invalid`).
    #[error("{0}")]
    Invalid(String),
    /// Not allowed: unsigned or not signed by a trusted key while `policy.trusted_keys` is
    /// set, or weakening a policy in `policy.required` (403 `forbidden`).
    #[error("{0}")]
    Forbidden(String),
    #[error("policy `{0}` is not installed")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("policy files: {0}")]
    Io(String),
}

/// A component and its metadata, as uploaded.
#[derive(Debug, Clone, Default)]
pub struct Upload {
    pub name: String,
    pub world: Option<World>,
    pub bytes: Vec<u8>,
    /// A JSON object; `None` keeps the previous version's (or `{}`).
    pub config: Option<serde_json::Value>,
    pub order: Option<i64>,
    pub mode: Option<Mode>,
    pub enabled: Option<bool>,
    /// Detached ed25519 signature over the change's description ([`change_description`]), or
    /// over `bytes` alone for an upload that sets no `config`, `mode`, `order` or `enabled`.
    pub signature: Option<Vec<u8>>,
    /// SHA-256 (hex) of the `config` field as sent, for the change's description.
    pub config_sha256: Option<String>,
}

/// What authorises a patch or a delete when `policy.trusted_keys` is set.
#[derive(Debug, Clone, Default)]
pub struct Proof {
    /// Detached ed25519 signature over the change's description ([`change_description`]).
    pub signature: Option<Vec<u8>>,
    /// SHA-256 (hex) of the patch's body as sent.
    pub body_sha256: String,
}

/// A change made: the policy after it (`None` when deleted) and before it, for the admin
/// change trail.
#[derive(Debug, Clone)]
pub struct Changed {
    pub info: Option<PolicyInfo>,
    pub before: Option<PolicyInfo>,
    /// The change's sequence number: the policy's new revision.
    pub revision: u64,
    /// The trusted key (base64) whose signature authorised it.
    pub signed_by: Option<String>,
}

/// The text a trusted key signs to authorise a change to a policy: one `key=value` per line,
/// each line ending in `\n`, in this order:
///
/// ```text
/// vla-policy-change/1
/// action=upload|patch|delete
/// policy=<name>
/// revision=<the policy's revision now; 0 when it is not installed>
/// <the action's fields>
/// ```
///
/// An upload's fields are `component-sha256`, `world`, `mode`, `order`, `enabled` and
/// `config-sha256` (of the `config` field as sent), `-` for one not sent; a patch's is
/// `body-sha256` (of the body as sent); a delete has none. The revision changes with every
/// change, so a signed change applies once, to the state it was signed for.
pub fn change_description(action: &str, policy: &str, revision: u64, fields: &[(&str, String)]) -> String {
    let mut text = format!("vla-policy-change/1\naction={action}\npolicy={policy}\nrevision={revision}\n");
    for (key, value) in fields {
        text.push_str(&format!("{key}={value}\n"));
    }
    text
}

/// What dry runs are shown: a request to the default model as it is configured.
#[derive(Debug, Clone)]
struct Sample {
    ctx: RequestContext,
    action: Action,
}

impl Sample {
    fn new(model: Option<&ModelSpec>) -> Sample {
        let (name, state_dim, kind, dof, horizon) = match model {
            Some(m) => (m.name.clone(), m.state_dim(), action_kind(m.action.kind), m.action.dof, m.action.horizon),
            None => ("sample".into(), 7, ActionKind::JointVelocity, 7, 1),
        };
        Sample {
            ctx: RequestContext {
                request_id: "dry-run".into(),
                robot_id: "dry-run".into(),
                robot_type: "dry-run".into(),
                model: name,
                instruction: "pick up the red block".into(),
                state: vec![0.0; state_dim],
                time_ms: crate::clock::now_ms(),
            },
            action: Action { kind, dof: dof as u32, horizon: horizon as u32, values: vec![0.0; dof * horizon] },
        }
    }
}

/// The policy stage: installed policies, the sandbox that runs them, and the audit log.
#[derive(Debug)]
pub struct Policies {
    runtime: Arc<Runtime>,
    config: PolicyConfig,
    /// Each trusted key, parsed and as configured (base64).
    trusted_keys: Vec<([u8; 32], String)>,
    dir: PathBuf,
    /// Tree `policies` is asked of it for each change, never kept (see [`crate::store`]).
    store: Arc<Store>,
    audit: Audit,
    /// The replay ring of recent requests.
    ring: super::replay::Ring,
    /// One replay at a time.
    replaying: Mutex<()>,
    set: RwLock<Arc<PolicySet>>,
    /// Counters and breaker per name, kept across versions.
    health: Mutex<HashMap<String, Arc<Health>>>,
    /// Serialises changes (uploads, patches, deletes).
    write: Mutex<()>,
    /// Bounds calls running at once to the pooling allocator's size.
    slots: Arc<Semaphore>,
    sample: Sample,
    /// The quota store admission policies charge.
    quotas: Arc<Quotas>,
    metrics: Arc<Metrics>,
}

impl Policies {
    /// Builds the sandbox, restores the stored policies (one that cannot be restored stays
    /// installed as broken and denies; it is never dropped silently) and installs or updates
    /// the configured ones. Blocking.
    pub fn open(
        config: &PolicyConfig,
        data_dir: &Path,
        store: &Arc<Store>,
        quotas: Arc<Quotas>,
        metrics: Arc<Metrics>,
        model: Option<&ModelSpec>,
    ) -> Result<Policies, String> {
        let data_dir = std::path::absolute(data_dir).map_err(|e| format!("{}: {e}", data_dir.display()))?;
        let runtime = Runtime::new(config, &data_dir.join("policy-cache"))?;
        let dir = data_dir.join("policies");
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let trusted_keys =
            config.trusted_keys.iter().map(|k| Ok((parse_public_key(k)?, k.clone()))).collect::<Result<_, String>>()?;
        store.tree("policies").map_err(|e| e.to_string())?;
        let bounds = super::audit::Bounds {
            retention: config.audit_retention,
            per_robot: config.audit_retention_per_robot,
            fold_ms: config.audit_fold_ms,
        };
        let audit = Audit::open(store.clone(), bounds).map_err(|e| e.to_string())?;
        let ring = super::replay::Ring::open(store.clone(), config.replay_ring).map_err(|e| e.to_string())?;
        let policies = Policies {
            runtime: Arc::new(runtime),
            config: config.clone(),
            trusted_keys,
            dir,
            store: store.clone(),
            audit,
            ring,
            replaying: Mutex::new(()),
            set: RwLock::new(Arc::new(PolicySet::default())),
            health: Mutex::new(HashMap::new()),
            write: Mutex::new(()),
            slots: Arc::new(Semaphore::new(config.max_concurrent as usize)),
            sample: Sample::new(model),
            quotas,
            metrics,
        };
        policies.restore()?;
        policies.preload()?;
        policies.check_required()?;
        Ok(policies)
    }

    pub fn runtime(&self) -> &Runtime {
        &self.runtime
    }

    pub fn quotas(&self) -> &Arc<Quotas> {
        &self.quotas
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// What a chain's run needs of the stage.
    fn env(&self) -> Env<'_> {
        Env {
            runtime: &self.runtime,
            metrics: &self.metrics,
            breaker_failures: u64::from(self.config.breaker_failures),
        }
    }

    pub fn audit(&self) -> &Audit {
        &self.audit
    }

    /// The policies in force now; a request keeps this snapshot for both of its chains.
    pub fn snapshot(&self) -> Arc<PolicySet> {
        self.set.read().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Runs `chain` off the async workers, holding one of the sandbox's slots, and records what
    /// it decided in the audit log (with the request's `provenance`, to replay it). The request
    /// goes into the replay ring once its policy stage is over: after its safety chain (with
    /// the admission chain's steps, `prior`), or when admission refused it.
    #[allow(clippy::too_many_arguments)]
    pub async fn run(
        self: &Arc<Self>,
        set: &Arc<PolicySet>,
        world: World,
        ctx: RequestContext,
        group: String,
        action: Option<Action>,
        provenance: Provenance,
        prior: Vec<DecisionStep>,
    ) -> Result<Passed, Box<Refusal>> {
        let chain = match world {
            World::Admission => &set.admission,
            World::Safety => &set.safety,
        };
        if chain.iter().all(|p| !p.record.enabled) && prior.is_empty() {
            return Ok(Passed { evals: Vec::new(), action, modified: false, charged: None, steps: Vec::new() });
        }
        let refusal = |reason: String| {
            Box::new(Refusal {
                policy: "(appliance)".into(),
                version: 0,
                code: "unavailable".into(),
                reason,
                failed: true,
                rate_limit: None,
                trace: vla_api::PolicyTrace { decision: "deny".into(), policies: Vec::new() },
            })
        };
        // Closed only at shutdown; fail closed.
        let Ok(slot) = self.slots.clone().acquire_owned().await else {
            return Err(refusal("the policy sandbox is shutting down".into()));
        };
        let policies = self.clone();
        let set = set.clone();
        let joined = tokio::task::spawn_blocking(move || {
            let _slot = slot;
            let chain = match world {
                World::Admission => &set.admission,
                World::Safety => &set.safety,
            };
            let session = (world == World::Admission)
                .then(|| Session::new(policies.quotas.clone(), &ctx.robot_id, &group, ctx.time_ms));
            let proposed = action.clone();
            let (outcome, mut audit, steps) = run_chain(policies.env(), chain, &ctx, action, session);
            for record in &mut audit {
                record.seed = provenance.seed;
                record.model_version.clone_from(&provenance.model_version);
            }
            policies.audit.append(audit);
            let mut all = prior;
            all.extend(steps);
            if world == World::Admission && outcome.is_ok() {
                return outcome.map(|passed| Passed { steps: all, ..passed }).map_err(Box::new);
            }
            let (decision, final_action) = match &outcome {
                Ok(passed) => (if passed.modified { "modify" } else { "allow" }, passed.action.as_ref()),
                Err(refusal) => (if refusal.failed { "error" } else { "deny" }, None),
            };
            policies.ring.append(DecisionRecord {
                seq: 0,
                time_unix_ms: ctx.time_ms,
                request_id: ctx.request_id.clone(),
                robot_id: ctx.robot_id.clone(),
                robot_type: ctx.robot_type.clone(),
                model: ctx.model.clone(),
                model_version: provenance.model_version.clone(),
                instruction: ctx.instruction.clone(),
                state: Some(ctx.state.clone()),
                seed: provenance.seed,
                decision: decision.into(),
                action_kind: proposed.as_ref().map(|a| kind_name(a.kind).into()),
                dof: proposed.as_ref().map_or(0, |a| a.dof),
                horizon: proposed.as_ref().map_or(0, |a| a.horizon),
                final_action: final_action.map(|a| a.values.clone()),
                proposed_action: proposed.map(|a| a.values),
                policies: all,
            });
            outcome.map_err(Box::new)
        })
        .await;
        joined.unwrap_or_else(|e| {
            self.metrics.cached(crate::metrics::Family::Exceptions, &["panic"]).inc();
            Err(refusal(format!("policy task failed: {e}")))
        })
    }

    /// The admission chain for one request from a robot of `group`; a refusal is the robot's
    /// 422 (or 429 when a quota ran out).
    pub async fn admit(
        self: &Arc<Self>,
        set: &Arc<PolicySet>,
        ctx: &RequestContext,
        group: &str,
        provenance: Provenance,
    ) -> Result<Passed, Box<Refusal>> {
        self.run(set, World::Admission, ctx.clone(), group.into(), None, provenance, Vec::new()).await
    }

    /// The safety chain on `proposed` (the model's action, checked by the host: its shape is
    /// the model's and every value finite); returns the action to send and the request's whole
    /// decision chain. A refusal's chain includes the admission decisions.
    pub async fn check_action(
        self: &Arc<Self>,
        set: &Arc<PolicySet>,
        ctx: RequestContext,
        admitted: &Passed,
        proposed: Action,
        provenance: Provenance,
    ) -> Result<(Vec<f32>, PolicyTrace), Box<Refusal>> {
        match self.run(set, World::Safety, ctx, String::new(), Some(proposed), provenance, admitted.steps.clone()).await
        {
            Ok(passed) => {
                let trace = trace(admitted, &passed);
                Ok((passed.action.map(|a| a.values).unwrap_or_default(), trace))
            }
            Err(mut refusal) => {
                let mut policies = admitted.evals.clone();
                policies.append(&mut refusal.trace.policies);
                refusal.trace.policies = policies;
                Err(refusal)
            }
        }
    }

    /// Replays a candidate against the ring (see [`super::replay`]): the installed policy
    /// `name` (with `request.config` when given) or, with `upload`, an uploaded component
    /// standing in for `name`. Off the request path: one replay at a time, holding one sandbox
    /// slot, each call within the usual limits.
    pub async fn replay(
        self: &Arc<Self>,
        name: &str,
        upload: Option<Upload>,
        request: vla_api::ReplayRequest,
    ) -> Result<vla_api::ReplayReport, ChangeError> {
        let limit = request.limit.unwrap_or(super::replay::DEFAULT_LIMIT);
        if limit == 0 || limit > super::replay::MAX_LIMIT {
            return Err(ChangeError::Invalid(format!("field `limit`: must be 1-{}", super::replay::MAX_LIMIT)));
        }
        let Ok(slot) = self.slots.clone().acquire_owned().await else {
            return Err(ChangeError::Conflict("the policy sandbox is shutting down".into()));
        };
        let policies = self.clone();
        let name = name.to_string();
        tokio::task::spawn_blocking(move || {
            let _slot = slot;
            let Ok(_one) = policies.replaying.try_lock() else {
                return Err(ChangeError::Conflict("another replay is running; try again when it is done".into()));
            };
            let candidate = policies.candidate(&name, upload, &request)?;
            let records = policies.ring.recent(request.since_unix_ms, limit)?;
            Ok(super::replay::replay(&policies.runtime, &policies.quotas, &candidate, &records))
        })
        .await
        .map_err(|e| ChangeError::Io(format!("replay task failed: {e}")))?
    }

    /// The candidate of a replay (see [`Policies::replay`]).
    fn candidate(
        &self,
        name: &str,
        upload: Option<Upload>,
        request: &vla_api::ReplayRequest,
    ) -> Result<super::replay::Candidate, ChangeError> {
        let installed = self.snapshot().get(name).cloned();
        let config_text = |config: &serde_json::Value| -> Result<Arc<str>, ChangeError> {
            check_config(config)?;
            Ok(serde_json::to_string(config).unwrap_or_default().into())
        };
        let replaces = request.replaces.clone().unwrap_or_else(|| name.to_string());
        match upload {
            Some(upload) => {
                let world = upload
                    .world
                    .or(installed.as_ref().map(|p| p.record.world))
                    .ok_or_else(|| ChangeError::Invalid("field `world`: required (`admission` or `safety`)".into()))?;
                if upload.bytes.len() > self.config.max_component_bytes {
                    return Err(ChangeError::Invalid(format!(
                        "field `component`: {} bytes, more than policy.max_component_bytes ({})",
                        upload.bytes.len(),
                        self.config.max_component_bytes
                    )));
                }
                let compiled = self
                    .runtime
                    .compile(&upload.bytes, world)
                    .map_err(|p| ChangeError::Invalid(format!("field `component`: {p}")))?;
                let config = match upload.config.as_ref().or(request.config.as_ref()) {
                    Some(c) => config_text(c)?,
                    None => installed.as_ref().map_or_else(|| "{}".into(), |p| p.config.clone()),
                };
                Ok(super::replay::Candidate {
                    name: name.into(),
                    world,
                    compiled,
                    config_sha256: hex(&Sha256::digest(config.as_bytes())),
                    config,
                    sha256: hex(&Sha256::digest(&upload.bytes)),
                    replaces,
                })
            }
            None => {
                let installed = installed.ok_or_else(|| ChangeError::NotFound(name.into()))?;
                let compiled = installed.compiled.clone().map_err(|p| {
                    ChangeError::Invalid(format!("policy `{name}` cannot run ({p}); upload a candidate instead"))
                })?;
                let config = match &request.config {
                    Some(c) => config_text(c)?,
                    None => installed.config.clone(),
                };
                Ok(super::replay::Candidate {
                    name: installed.name.clone(),
                    world: installed.record.world,
                    compiled,
                    config_sha256: hex(&Sha256::digest(config.as_bytes())),
                    config,
                    sha256: installed.record.sha256.clone(),
                    replaces,
                })
            }
        }
    }

    /// Every installed policy, in run order (admission first).
    pub fn list(&self) -> Vec<PolicyInfo> {
        self.snapshot().all().map(|p| self.info(p)).collect()
    }

    pub fn get(&self, name: &str) -> Option<PolicyInfo> {
        self.snapshot().get(name).map(|p| self.info(p))
    }

    /// Installs `upload` as a new policy or a new version of one. Blocking (compiles).
    pub fn upload(&self, upload: Upload) -> Result<Changed, ChangeError> {
        let _w = self.write.lock().unwrap_or_else(PoisonError::into_inner);
        check_name(&upload.name).map_err(|p| ChangeError::Invalid(format!("field `name`: {p}")))?;
        let previous = self.snapshot().get(&upload.name).cloned();
        let signed_by = self.verify_upload(&upload, previous.as_ref().map_or(0, |p| p.record.revision))?;
        if self.is_required(&upload.name) && (upload.mode == Some(Mode::Shadow) || upload.enabled == Some(false)) {
            return Err(self.required_refusal(&upload.name, "shadowed or disabled"));
        }
        let world = match (upload.world, &previous) {
            (Some(w), Some(p)) if w != p.record.world => {
                return Err(ChangeError::Conflict(format!(
                    "policy `{}` is a {} policy; delete it before installing a {w} policy under that name",
                    upload.name, p.record.world
                )));
            }
            (Some(w), _) => w,
            (None, Some(p)) => p.record.world,
            (None, None) => {
                return Err(ChangeError::Invalid("field `world`: required (`admission` or `safety`)".into()));
            }
        };
        let config = match upload.config {
            Some(c) => c,
            None => previous.as_ref().map_or_else(|| serde_json::json!({}), |p| p.record.config.clone()),
        };
        let now = crate::clock::now_ms();
        let record = PolicyRecord {
            name: upload.name.clone(),
            world,
            revision: self.next_revision()?,
            version: previous.as_ref().map_or(1, |p| p.record.version + 1),
            order: upload.order.or(previous.as_ref().map(|p| p.record.order)).unwrap_or(100),
            mode: upload.mode.or(previous.as_ref().map(|p| p.record.mode)).unwrap_or(Mode::Enforce),
            enabled: upload.enabled.or(previous.as_ref().map(|p| p.record.enabled)).unwrap_or(true),
            sha256: hex(&Sha256::digest(&upload.bytes)),
            size_bytes: upload.bytes.len() as u64,
            signed: signed_by.is_some(),
            config,
            created_unix_ms: previous.as_ref().map_or(now, |p| p.record.created_unix_ms),
            updated_unix_ms: now,
            from_config: false,
        };
        let installed = self.validate(record, &upload.bytes)?;
        self.write_component(&installed.record.sha256, &upload.bytes)?;
        self.commit(Some(installed.clone()), None)?;
        tracing::info!(
            policy = %installed.record.name,
            version = installed.record.version,
            world = %world,
            mode = installed.record.mode.as_str(),
            sha256 = %installed.record.sha256,
            "policy installed"
        );
        Ok(Changed {
            revision: installed.record.revision,
            info: Some(self.info(&installed)),
            before: previous.map(|p| self.info(&p)),
            signed_by,
        })
    }

    /// Applies `patch` to the policy `name`. Any patch also closes its circuit breaker.
    pub fn patch(&self, name: &str, patch: PolicyPatch, proof: &Proof) -> Result<Changed, ChangeError> {
        let _w = self.write.lock().unwrap_or_else(PoisonError::into_inner);
        let set = self.snapshot();
        let current = set.get(name).ok_or_else(|| ChangeError::NotFound(name.into()))?;
        let description =
            change_description("patch", name, current.record.revision, &[("body-sha256", proof.body_sha256.clone())]);
        let signed_by = self.authorise(&description, proof.signature.as_deref())?;
        let mode = patch
            .mode
            .as_deref()
            .map(|m| m.parse::<Mode>().map_err(|p| ChangeError::Invalid(format!("field `mode`: {p}"))))
            .transpose()?;
        let replaced = match &patch.replace {
            None => None,
            Some(_) if mode.unwrap_or(current.record.mode) != Mode::Enforce => {
                return Err(ChangeError::Invalid(
                    "field `replace`: only an enforcing policy can replace another; add `\"mode\": \"enforce\"`".into(),
                ));
            }
            Some(_) if !patch.enabled.unwrap_or(current.record.enabled) => {
                return Err(ChangeError::Invalid(
                    "field `replace`: a disabled policy cannot replace another; add `\"enabled\": true`".into(),
                ));
            }
            Some(other) if other == name => {
                return Err(ChangeError::Invalid("field `replace`: a policy cannot replace itself".into()));
            }
            Some(other) if self.is_required(other) => return Err(self.required_refusal(other, "replaced")),
            Some(other) => {
                let other = set.get(other).ok_or_else(|| ChangeError::NotFound(other.clone()))?;
                if other.record.world != current.record.world {
                    return Err(ChangeError::Conflict(format!(
                        "policy `{}` is a {} policy and cannot replace the {} policy `{}`",
                        name, current.record.world, other.record.world, other.record.name
                    )));
                }
                Some(other.record.name.clone())
            }
        };
        if self.is_required(name) && (patch.enabled == Some(false) || mode == Some(Mode::Shadow)) {
            return Err(self.required_refusal(name, "shadowed or disabled"));
        }
        let mut record = current.record.clone();
        record.revision = self.next_revision()?;
        record.enabled = patch.enabled.unwrap_or(record.enabled);
        record.mode = mode.unwrap_or(record.mode);
        record.order = patch.order.unwrap_or(record.order);
        record.updated_unix_ms = crate::clock::now_ms();
        record.from_config = false;
        let installed = match patch.config {
            Some(config) if config != record.config => {
                check_config(&config)?;
                let compiled = current.compiled.clone().map_err(|p| {
                    ChangeError::Invalid(format!("policy `{name}` cannot run ({p}); upload a new component instead"))
                })?;
                record.config = config;
                record.version += 1;
                let installed = self.installed(record, Ok(compiled));
                self.dry_run(&installed)?;
                installed
            }
            Some(_) | None => Arc::new(Installed {
                record,
                name: current.name.clone(),
                config: current.config.clone(),
                config_sha256: current.config_sha256.clone(),
                compiled: current.compiled.clone(),
                health: current.health.clone(),
                duration: current.duration.clone(),
                superseded: Default::default(),
            }),
        };
        self.commit(Some(installed.clone()), replaced.as_deref())?;
        tracing::info!(policy = name, version = installed.record.version, ?replaced, "policy changed");
        Ok(Changed {
            revision: installed.record.revision,
            info: Some(self.info(&installed)),
            before: Some(self.info(current)),
            signed_by,
        })
    }

    /// Removes the policy `name`; requests already past it finish with it.
    pub fn delete(&self, name: &str, proof: &Proof) -> Result<Changed, ChangeError> {
        let _w = self.write.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(current) = self.snapshot().get(name).cloned() else {
            return Err(ChangeError::NotFound(name.into()));
        };
        let description = change_description("delete", name, current.record.revision, &[]);
        let signed_by = self.authorise(&description, proof.signature.as_deref())?;
        if self.is_required(name) {
            return Err(self.required_refusal(name, "deleted"));
        }
        let revision = self.next_revision()?;
        self.commit(None, Some(name))?;
        tracing::info!(policy = name, "policy deleted");
        Ok(Changed { info: None, before: Some(self.info(&current)), revision, signed_by })
    }

    /// A policy as the admin API shows it.
    fn info(&self, p: &Installed) -> PolicyInfo {
        PolicyInfo { required: self.is_required(&p.record.name), ..info(p) }
    }

    fn is_required(&self, name: &str) -> bool {
        self.config.required.iter().any(|r| r == name)
    }

    fn required_refusal(&self, name: &str, what: &str) -> ChangeError {
        ChangeError::Forbidden(format!(
            "policy `{name}` is in policy.required: it cannot be {what} through the admin API (change the configuration and restart to remove it from the list)"
        ))
    }

    /// The next change's sequence number (shared with the admin change trail).
    fn next_revision(&self) -> Result<u64, ChangeError> {
        let db = self.store.db()?;
        // sled's ids start at 0, which means "not installed" in a signed change.
        Ok(db.generate_id().map_err(|e| self.store.fault(e))? + 1)
    }

    /// Every `policy.required` policy is installed, enabled and enforcing: the start stops
    /// otherwise.
    fn check_required(&self) -> Result<(), String> {
        let set = self.snapshot();
        for name in &self.config.required {
            match set.get(name) {
                None => {
                    return Err(format!(
                        "policy.required names `{name}`, which is not installed (add it to policy.preload)"
                    ));
                }
                Some(p) if !p.record.enabled || p.record.mode != Mode::Enforce => {
                    return Err(format!(
                        "policy.required names `{name}`, which is {} (enable it in enforce mode before requiring it)",
                        if p.record.enabled { "in shadow mode" } else { "disabled" }
                    ));
                }
                Some(_) => {}
            }
        }
        Ok(())
    }

    /// Persists `install` (replacing its name) and removes `remove`, then swaps the set.
    fn commit(&self, install: Option<Arc<Installed>>, remove: Option<&str>) -> Result<(), ChangeError> {
        let mut batch = sled::Batch::default();
        if let Some(p) = &install {
            batch.insert(p.record.name.as_bytes(), serde_json::to_vec(&p.record).unwrap_or_default());
        }
        if let Some(name) = remove {
            batch.remove(name.as_bytes());
        }
        let tree = self.store.tree("policies")?;
        tree.apply_batch(batch).map_err(|e| self.store.fault(e))?;
        tree.flush().map_err(|e| self.store.fault(e))?;

        let current = self.snapshot();
        let replaced = install.as_ref().map(|p| p.record.name.as_str());
        let kept = current
            .all()
            .filter(|p| Some(p.record.name.as_str()) != replaced && Some(p.record.name.as_str()) != remove)
            .cloned();
        let next = Arc::new(PolicySet::build(kept.chain(install.clone())));
        if let Some(p) = &install {
            p.health.reset();
        }
        if let Some(name) = remove {
            self.health.lock().unwrap_or_else(PoisonError::into_inner).remove(name);
        }
        for gone in
            current.all().filter(|p| Some(p.record.name.as_str()) == replaced || Some(p.record.name.as_str()) == remove)
        {
            gone.superseded.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        *self.set.write().unwrap_or_else(PoisonError::into_inner) = next.clone();
        self.collect_files(&next);
        Ok(())
    }

    /// Compiles `bytes` for `record` and dry-runs it.
    fn validate(&self, record: PolicyRecord, bytes: &[u8]) -> Result<Arc<Installed>, ChangeError> {
        if bytes.len() > self.config.max_component_bytes {
            return Err(ChangeError::Invalid(format!(
                "field `component`: {} bytes, more than policy.max_component_bytes ({})",
                bytes.len(),
                self.config.max_component_bytes
            )));
        }
        check_config(&record.config)?;
        let compiled = self
            .runtime
            .compile(bytes, record.world)
            .map_err(|p| ChangeError::Invalid(format!("field `component`: {p}")))?;
        let installed = self.installed(record, Ok(compiled));
        self.dry_run(&installed)?;
        Ok(installed)
    }

    fn dry_run(&self, installed: &Installed) -> Result<(), ChangeError> {
        let Ok(compiled) = &installed.compiled else { return Ok(()) };
        let input = match installed.record.world {
            World::Admission => Input::Admit(&self.sample.ctx),
            World::Safety => Input::Evaluate(&self.sample.ctx, &self.sample.action),
        };
        let shown = (installed.record.world == World::Safety).then_some(&self.sample.action);
        // Admission policies may charge quotas: the dry run's charges are computed, not written.
        let session = (installed.record.world == World::Admission).then(|| {
            let mut s = Session::new(self.quotas.clone(), "dry-run", "dry-run", crate::clock::now_ms());
            s.apply = false;
            s
        });
        self.runtime
            .call_with(compiled, &installed.name, &installed.config, input, session)
            .0
            .and_then(|d| check_decision(installed.record.world, d, shown))
            .map(drop)
            .map_err(|f| ChangeError::Invalid(format!("the dry run on a sample request failed: the policy {f}")))
    }

    fn installed(&self, record: PolicyRecord, compiled: Result<Compiled, String>) -> Arc<Installed> {
        let health =
            self.health.lock().unwrap_or_else(PoisonError::into_inner).entry(record.name.clone()).or_default().clone();
        let config = serde_json::to_string(&record.config).unwrap_or_default();
        Arc::new(Installed {
            duration: self.metrics.safety_duration.with_label_values(&[&record.name]),
            name: record.name.as_str().into(),
            config_sha256: hex(&Sha256::digest(&config)),
            config: config.into(),
            record,
            compiled,
            health,
            superseded: Default::default(),
        })
    }

    /// Checks an upload's signature: over its description, or (an upload setting no metadata)
    /// over the component alone. Returns the key that signed it.
    fn verify_upload(&self, upload: &Upload, revision: u64) -> Result<Option<String>, ChangeError> {
        let or_dash = |v: Option<String>| v.unwrap_or_else(|| "-".into());
        let fields = [
            ("component-sha256", hex(&Sha256::digest(&upload.bytes))),
            ("world", or_dash(upload.world.map(|w| w.to_string()))),
            ("mode", or_dash(upload.mode.map(|m| m.as_str().to_string()))),
            ("order", or_dash(upload.order.map(|o| o.to_string()))),
            ("enabled", or_dash(upload.enabled.map(|e| e.to_string()))),
            ("config-sha256", or_dash(upload.config_sha256.clone())),
        ];
        let description = change_description("upload", &upload.name, revision, &fields);
        let metadata =
            upload.config.is_some() || upload.mode.is_some() || upload.order.is_some() || upload.enabled.is_some();
        if !metadata
            && let Some(signature) = &upload.signature
            && let Some(key) = self.signed_by(&upload.bytes, signature)
        {
            return Ok(Some(key));
        }
        self.authorise(&description, upload.signature.as_deref())
    }

    /// Checks that `signature` signs `description` by a trusted key, when any is configured.
    fn authorise(&self, description: &str, signature: Option<&[u8]>) -> Result<Option<String>, ChangeError> {
        match (signature, self.trusted_keys.is_empty()) {
            (None, true) => Ok(None),
            (None, false) => Err(ChangeError::Forbidden(format!(
                "policy.trusted_keys is set: this change must be signed by a trusted key; sign exactly this text (README, Policies): {description:?}"
            ))),
            (Some(_), true) => Err(ChangeError::Invalid(
                "field `signature`: cannot be verified, no policy.trusted_keys are configured".into(),
            )),
            (Some(signature), false) => self.signed_by(description.as_bytes(), signature).map(Some).ok_or_else(|| {
                ChangeError::Forbidden(format!(
                    "the signature is not a valid ed25519 signature by a trusted key of this change: {description:?}"
                ))
            }),
        }
    }

    /// The trusted key (base64) that signed `message`, if one did.
    fn signed_by(&self, message: &[u8], signature: &[u8]) -> Option<String> {
        use ring::signature::{ED25519, UnparsedPublicKey};
        self.trusted_keys
            .iter()
            .find(|(k, _)| UnparsedPublicKey::new(&ED25519, k).verify(message, signature).is_ok())
            .map(|(_, b64)| b64.clone())
    }

    fn component_path(&self, sha256: &str) -> PathBuf {
        self.dir.join(format!("{sha256}.wasm"))
    }

    /// Writes the component durably (temporary file, fsync, rename) unless it is there already.
    fn write_component(&self, sha256: &str, bytes: &[u8]) -> Result<(), ChangeError> {
        use std::io::Write;
        let path = self.component_path(sha256);
        if path.exists() {
            return Ok(());
        }
        let io = |e: std::io::Error| ChangeError::Io(format!("{}: {e}", path.display()));
        let tmp = self.dir.join(format!(".{sha256}.tmp"));
        let mut file = std::fs::File::create(&tmp).map_err(io)?;
        file.write_all(bytes).map_err(io)?;
        file.sync_all().map_err(io)?;
        std::fs::rename(&tmp, &path).map_err(io)?;
        if let Ok(dir) = std::fs::File::open(&self.dir) {
            let _ = dir.sync_all();
        }
        Ok(())
    }

    /// Deletes component files no installed policy uses.
    fn collect_files(&self, set: &PolicySet) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else { return };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(sha) = name.strip_suffix(".wasm") else { continue };
            if !set.all().any(|p| p.record.sha256 == sha) {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }

    /// Loads every stored policy. A policy whose file is missing, altered or no longer
    /// compiles is installed broken: it fails closed until an operator replaces or deletes it.
    fn restore(&self) -> Result<(), String> {
        let mut installed = Vec::new();
        for kv in self.store.tree("policies").map_err(|e| e.to_string())?.iter() {
            let (key, value) = kv.map_err(|e| format!("store: {e}"))?;
            let record: PolicyRecord = serde_json::from_slice(&value)
                .map_err(|e| format!("store: corrupt policy record `{}`: {e}", String::from_utf8_lossy(&key)))?;
            let compiled = self.load_file(&record);
            match &compiled {
                Ok(_) => tracing::info!(policy = %record.name, version = record.version, "policy restored"),
                Err(problem) => tracing::error!(
                    policy = %record.name,
                    version = record.version,
                    "policy cannot run and denies every request it sees until replaced or deleted: {problem}"
                ),
            }
            installed.push(self.installed(record, compiled));
        }
        *self.set.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(PolicySet::build(installed));
        Ok(())
    }

    fn load_file(&self, record: &PolicyRecord) -> Result<Compiled, String> {
        let path = self.component_path(&record.sha256);
        let bytes = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        if hex(&Sha256::digest(&bytes)) != record.sha256 {
            return Err(format!("{}: contents do not match the recorded SHA-256", path.display()));
        }
        self.runtime.compile(&bytes, record.world)
    }

    /// Installs each `policy.preload` entry that no operator has taken over, when it is new or
    /// its file or settings changed. A file that is missing or fails validation stops the start.
    fn preload(&self) -> Result<(), String> {
        for item in &self.config.preload {
            let bytes = std::fs::read(&item.path).map_err(|e| {
                format!(
                    "policy.preload `{}`: {}: {e} (build the shipped policies with scripts/setup.sh)",
                    item.name,
                    item.path.display()
                )
            })?;
            let sha256 = hex(&Sha256::digest(&bytes));
            let current = self.snapshot().get(&item.name).cloned();
            let world: World = item.world.parse().map_err(|p| format!("policy.preload `{}`: world {p}", item.name))?;
            let mode: Mode = item.mode.parse().map_err(|p| format!("policy.preload `{}`: mode {p}", item.name))?;
            let config = serde_json::Value::Object(item.config.clone());
            if let Some(current) = &current {
                let r = &current.record;
                if !r.from_config {
                    tracing::info!(policy = %item.name, "policy.preload entry skipped: changed through the admin API since");
                    continue;
                }
                if r.sha256 == sha256
                    && r.world == world
                    && r.mode == mode
                    && r.order == item.order
                    && r.config == config
                    && current.compiled.is_ok()
                {
                    continue;
                }
            }
            let _w = self.write.lock().unwrap_or_else(PoisonError::into_inner);
            let now = crate::clock::now_ms();
            let record = PolicyRecord {
                name: item.name.clone(),
                world,
                revision: self.next_revision().map_err(|e| e.to_string())?,
                version: current.as_ref().map_or(1, |p| p.record.version + 1),
                order: item.order,
                mode,
                enabled: current.as_ref().is_none_or(|p| p.record.enabled),
                sha256,
                size_bytes: bytes.len() as u64,
                signed: false,
                config,
                created_unix_ms: current.as_ref().map_or(now, |p| p.record.created_unix_ms),
                updated_unix_ms: now,
                from_config: true,
            };
            let installed = self
                .validate(record, &bytes)
                .map_err(|e| format!("policy.preload `{}` ({}): {e}", item.name, item.path.display()))?;
            self.write_component(&installed.record.sha256, &bytes).map_err(|e| e.to_string())?;
            self.commit(Some(installed.clone()), None).map_err(|e| e.to_string())?;
            tracing::info!(policy = %item.name, version = installed.record.version, "policy installed from the configuration");
        }
        Ok(())
    }
}

/// An action kind as the WIT names it.
fn kind_name(kind: ActionKind) -> &'static str {
    match kind {
        ActionKind::JointVelocity => "joint-velocity",
        ActionKind::JointPosition => "joint-position",
        ActionKind::EndEffectorDelta => "end-effector-delta",
    }
}

fn check_config(config: &serde_json::Value) -> Result<(), ChangeError> {
    if config.is_object() {
        Ok(())
    } else {
        Err(ChangeError::Invalid("field `config`: must be a JSON object (or a TOML table)".into()))
    }
}
