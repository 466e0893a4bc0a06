//! The `[quota]` section of the configuration, and its checks.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::limits::{Durability, Limits};

/// Rate limits and quotas ([`crate::quota`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QuotaConfig {
    /// `sync`: a charge is on disk before the response that acknowledges it is sent (group
    /// commit). `interval:<ms>`: flushed every `<ms>`; a crash loses at most that window.
    pub durability: String,
    /// Limits per robot id; they win over the rate-limit policy's defaults, and the admin API's
    /// overrides win over them. Each: `rate` (`10/min`), `burst`, `day`, `month`.
    pub robots: BTreeMap<String, vla_api::QuotaLimits>,
    /// Limits per robot group, as for `robots`.
    pub groups: BTreeMap<String, vla_api::QuotaLimits>,
}

impl Default for QuotaConfig {
    fn default() -> Self {
        QuotaConfig { durability: "sync".into(), robots: BTreeMap::new(), groups: BTreeMap::new() }
    }
}

/// Checks the section; an error is `(key under quota., problem)`.
pub fn check(c: &QuotaConfig) -> Result<(), (String, String)> {
    if let Err(problem) = c.durability.parse::<Durability>() {
        return Err(("durability".into(), problem));
    }
    for (table, limits) in [("robots", &c.robots), ("groups", &c.groups)] {
        for (key, wire) in limits {
            if let Err(problem) = crate::names::check_robot_id(key) {
                return Err((format!("{table}.\"{key}\""), problem));
            }
            if let Err((field, problem)) = Limits::parse(wire) {
                return Err((format!("{table}.\"{key}\".{field}"), problem));
            }
        }
    }
    Ok(())
}
