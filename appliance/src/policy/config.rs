//! The `[policy]` section of the configuration (the sandbox's limits, trusted keys and the
//! policies installed at start), and its checks.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::types::{Mode, World, check_name, parse_public_key};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PolicyConfig {
    /// CPU-time budget of one policy call: the calling thread's CPU time, host calls included;
    /// past it the call is interrupted and the request denied. A wall-clock backstop of 10×
    /// frees the slot of a call that is stuck; time spent descheduled does not count. The
    /// policy's own instructions are bounded by `fuel`.
    pub timeout_ms: u64,
    /// Fuel (roughly, WebAssembly instructions) one policy call may burn: the deterministic
    /// bound on its work (10 M ≈ 1.3 ms of compute on this development machine; a shipped
    /// policy's call takes about 35 µs).
    pub fuel: u64,
    /// Largest linear memory a policy instance may grow to, in bytes.
    pub memory_limit_bytes: usize,
    /// Largest WebAssembly stack a policy call may use, in bytes (at most 1 MiB: calls run on
    /// threads with 2 MiB stacks).
    pub max_stack_bytes: usize,
    /// Policy calls running at once (sizes the pooling allocator); more wait for a slot.
    pub max_concurrent: u32,
    /// Largest component accepted at upload, in bytes.
    pub max_component_bytes: usize,
    /// Consecutive failures after which a policy's circuit breaker opens: it is no longer
    /// called and (in enforce mode) denies every request until an operator acts.
    pub breaker_failures: u32,
    /// Audit records kept; the oldest are dropped beyond this.
    pub audit_retention: u64,
    /// Of those, the most one robot's records take; its own oldest are dropped beyond this.
    pub audit_retention_per_robot: u64,
    /// A denial (or failure) identical to the robot's previous record within this many ms of
    /// that record's first is folded into it (its `count` goes up); 0 folds nothing.
    pub audit_fold_ms: u64,
    /// Recent requests kept with their whole context for replays (every outcome); 0 keeps
    /// none.
    pub replay_ring: u64,
    /// Base64 ed25519 public keys; when any is set, every change to a policy (upload, patch,
    /// delete) must carry a valid signature of its description by one of them.
    pub trusted_keys: Vec<String>,
    /// Policies that cannot be disabled, shadowed, replaced or deleted through the API, signed
    /// or not; each must be installed, enabled and enforcing once the start is done.
    pub required: Vec<String>,
    /// Policies installed at start when none of that name is stored yet (an operator's later
    /// changes through the admin API win). A missing file stops the start.
    pub preload: Vec<PreloadPolicy>,
}

/// A policy the configuration installs; see [`PolicyConfig::preload`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PreloadPolicy {
    pub name: String,
    /// `admission` or `safety`.
    pub world: String,
    /// The component file; relative paths are taken from the working directory.
    pub path: PathBuf,
    #[serde(default = "default_order")]
    pub order: i64,
    /// `enforce` or `shadow`.
    #[serde(default = "default_mode")]
    pub mode: String,
    /// The policy's configuration (handed to it as JSON).
    #[serde(default)]
    pub config: serde_json::Map<String, serde_json::Value>,
}

fn default_order() -> i64 {
    100
}

fn default_mode() -> String {
    "enforce".into()
}

impl Default for PolicyConfig {
    fn default() -> Self {
        fn shipped(name: &str, world: &str, order: i64, config: serde_json::Value) -> PreloadPolicy {
            PreloadPolicy {
                name: name.into(),
                world: world.into(),
                path: PathBuf::from(format!("policies/dist/{name}.wasm")),
                order,
                mode: "enforce".into(),
                config: match config {
                    serde_json::Value::Object(map) => map,
                    _ => serde_json::Map::new(),
                },
            }
        }
        PolicyConfig {
            timeout_ms: 20,
            fuel: 10_000_000,
            memory_limit_bytes: 16 * 1024 * 1024,
            max_stack_bytes: 256 * 1024,
            max_concurrent: 16,
            max_component_bytes: 8 * 1024 * 1024,
            breaker_failures: 5,
            audit_retention: 100_000,
            audit_retention_per_robot: 10_000,
            audit_fold_ms: 60_000,
            replay_ring: 10_000,
            trusted_keys: Vec::new(),
            required: Vec::new(),
            preload: vec![
                // First: a flood is refused before any other policy spends time on it.
                shipped(
                    "rate-limit",
                    "admission",
                    0,
                    serde_json::json!({
                        "exempt_instructions": ["stop", "halt", "emergency stop"],
                        "robot": {"rate": "50/s", "burst": 50}
                    }),
                ),
                shipped(
                    "instruction-filter",
                    "admission",
                    10,
                    serde_json::json!({"deny": ["disable safety", "ignore * limits"]}),
                ),
                shipped(
                    "joint-limits",
                    "safety",
                    10,
                    // The demo model's joint velocities reach about 0.3: the demo robot sees a clamp.
                    serde_json::json!({
                        "robot_types": {"demo": {"velocity": 0.25}},
                        "default": {"velocity": 0.5, "position": {"min": -3.1, "max": 3.1}}
                    }),
                ),
                shipped(
                    "workspace-bounds",
                    "safety",
                    20,
                    serde_json::json!({"min": [-0.5, -0.5, 0.0], "max": [0.5, 0.5, 0.8]}),
                ),
            ],
        }
    }
}

/// Checks the section; an error is `(key under policy., problem)`.
pub fn check(p: &PolicyConfig) -> Result<(), (String, String)> {
    let invalid = |key: &str, problem: &str| Err((key.to_string(), problem.to_string()));
    if !(1..=60_000).contains(&p.timeout_ms) {
        return invalid("timeout_ms", "must be 1-60000");
    }
    if p.fuel == 0 {
        return invalid("fuel", "must be greater than 0");
    }
    if !(64 * 1024..=4 << 30).contains(&p.memory_limit_bytes) {
        return invalid("memory_limit_bytes", "must be 64 KiB-4 GiB");
    }
    // Policies run on the blocking pool's threads (2 MiB native stacks): the WebAssembly
    // stack must stay well inside, so a deep recursion traps instead of overflowing the host.
    if !(16 * 1024..=1 << 20).contains(&p.max_stack_bytes) {
        return invalid("max_stack_bytes", "must be 16 KiB-1 MiB");
    }
    if !(1..=1024).contains(&p.max_concurrent) {
        return invalid("max_concurrent", "must be 1-1024");
    }
    if p.max_component_bytes < 1024 {
        return invalid("max_component_bytes", "must be at least 1024");
    }
    if p.breaker_failures == 0 {
        return invalid("breaker_failures", "must be greater than 0");
    }
    if p.audit_retention == 0 {
        return invalid("audit_retention", "must be greater than 0");
    }
    if !(1..=p.audit_retention).contains(&p.audit_retention_per_robot) {
        return invalid("audit_retention_per_robot", "must be 1 to policy.audit_retention");
    }
    if p.replay_ring > 1_000_000 {
        return invalid("replay_ring", "must be at most 1000000");
    }
    if p.audit_fold_ms > 3_600_000 {
        return invalid("audit_fold_ms", "must be at most 3600000 (an hour)");
    }
    for (i, key) in p.trusted_keys.iter().enumerate() {
        if let Err(problem) = parse_public_key(key) {
            return Err((format!("trusted_keys[{i}]"), problem));
        }
    }
    for (i, name) in p.required.iter().enumerate() {
        if let Err(problem) = check_name(name) {
            return Err((format!("required[{i}]"), problem));
        }
    }
    for (i, item) in p.preload.iter().enumerate() {
        let key = |field: &str| format!("preload[{i}].{field}");
        if let Err(problem) = check_name(&item.name) {
            return Err((key("name"), problem));
        }
        if let Err(problem) = item.world.parse::<World>() {
            return Err((key("world"), problem));
        }
        if let Err(problem) = item.mode.parse::<Mode>() {
            return Err((key("mode"), problem));
        }
        if p.preload[..i].iter().any(|other| other.name == item.name) {
            return Err((key("name"), format!("`{}` is preloaded twice", item.name)));
        }
    }
    Ok(())
}
