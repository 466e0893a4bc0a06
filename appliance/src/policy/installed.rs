//! Installed policies as they run: the record kept at rest, the compiled component with its
//! health, and the set of chains in force (immutable, replaced as a whole).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use serde::{Deserialize, Serialize};
use vla_api::PolicyInfo;

use super::bindings::ActionKind;
use super::runtime::Compiled;
use super::types::{Health, Mode, World};

/// A policy at rest: everything but the component bytes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PolicyRecord {
    pub name: String,
    pub world: World,
    pub version: u64,
    /// The sequence number of the last change to it (see [`vla_api::PolicyInfo::revision`]).
    #[serde(default)]
    pub revision: u64,
    pub order: i64,
    pub mode: Mode,
    pub enabled: bool,
    pub sha256: String,
    pub size_bytes: u64,
    pub signed: bool,
    /// A JSON object.
    pub config: serde_json::Value,
    pub created_unix_ms: u64,
    pub updated_unix_ms: u64,
    /// Installed from `policy.preload` and not changed through the admin API since: the
    /// configuration keeps it current. Once an operator changes it, the operator's version wins.
    #[serde(default)]
    pub from_config: bool,
}

/// One policy as it runs.
#[derive(Debug)]
pub struct Installed {
    pub record: PolicyRecord,
    pub name: Arc<str>,
    /// `record.config` as the JSON text the policy reads, and its SHA-256 (hex).
    pub config: Arc<str>,
    pub config_sha256: String,
    /// `Err`: the policy cannot run (its file is missing or no longer compiles); enforcing, it
    /// denies every request it sees.
    pub compiled: Result<Compiled, String>,
    pub health: Arc<Health>,
    /// `vla_safety_check_duration_seconds{policy}`, resolved once.
    pub duration: prometheus::Histogram,
    /// Set when a newer version (or a removal) took this one's place: requests still running on
    /// an older snapshot call it, and its failures no longer trip the breaker its replacement
    /// shares.
    pub superseded: AtomicBool,
}

impl Installed {
    /// Whether this is still the version of its name in force.
    pub fn is_current(&self) -> bool {
        !self.superseded.load(Ordering::Relaxed)
    }
}

/// The policies in force: each chain in run order. Immutable; replaced as a whole.
#[derive(Debug, Default)]
pub struct PolicySet {
    pub admission: Vec<Arc<Installed>>,
    pub safety: Vec<Arc<Installed>>,
}

impl PolicySet {
    pub fn build(installed: impl IntoIterator<Item = Arc<Installed>>) -> PolicySet {
        let mut set = PolicySet::default();
        for p in installed {
            match p.record.world {
                World::Admission => set.admission.push(p),
                World::Safety => set.safety.push(p),
            }
        }
        for chain in [&mut set.admission, &mut set.safety] {
            chain.sort_by(|a, b| (a.record.order, &a.record.name).cmp(&(b.record.order, &b.record.name)));
        }
        set
    }

    pub fn all(&self) -> impl Iterator<Item = &Arc<Installed>> {
        self.admission.iter().chain(&self.safety)
    }

    pub fn get(&self, name: &str) -> Option<&Arc<Installed>> {
        self.all().find(|p| p.record.name == name)
    }
}

/// The model's action kind in the WIT package's terms.
pub fn action_kind(kind: crate::spec::ActionKind) -> ActionKind {
    match kind {
        crate::spec::ActionKind::JointVelocity => ActionKind::JointVelocity,
        crate::spec::ActionKind::JointPosition => ActionKind::JointPosition,
        crate::spec::ActionKind::EndEffectorDelta => ActionKind::EndEffectorDelta,
    }
}

pub fn info(p: &Installed) -> PolicyInfo {
    let r = &p.record;
    let (state, problem) = match &p.compiled {
        Err(problem) => ("broken", Some(problem.clone())),
        Ok(_) if p.health.open.load(std::sync::atomic::Ordering::Relaxed) => {
            ("circuit_open", Some("circuit breaker open; PATCH the policy to close it".to_string()))
        }
        Ok(_) => ("ready", None),
    };
    PolicyInfo {
        name: r.name.clone(),
        world: r.world.as_str().into(),
        version: r.version,
        order: r.order,
        mode: r.mode.as_str().into(),
        enabled: r.enabled,
        sha256: r.sha256.clone(),
        size_bytes: r.size_bytes,
        signed: r.signed,
        revision: r.revision,
        required: false,
        wit: p.compiled.as_ref().ok().map(|c| c.package_version().to_string()),
        config: r.config.clone(),
        created_unix_ms: r.created_unix_ms,
        updated_unix_ms: r.updated_unix_ms,
        state: state.into(),
        problem,
        stats: p.health.stats(),
    }
}
