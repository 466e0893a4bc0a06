//! A robot's buckets as the admin API and the metrics show them: each bucket with a limit
//! from the admin API or the configuration, or charged before under the policy's limit.

use vla_api::{QuotaBucket, RobotQuota};

use super::bucket::{self, Bucket, Limit, Scope, State};
use super::quotas::Quotas;
use crate::store::RobotRecord;

/// The robot's and its group's buckets at `now_ms`.
pub fn robot_view(quotas: &Quotas, robot: &RobotRecord, now_ms: u64) -> RobotQuota {
    let mut buckets = Vec::new();
    for (scope, key) in [(Scope::Robot, &robot.robot_id), (Scope::Group, &robot.group)] {
        let admin = quotas.override_of(scope, key).unwrap_or_default();
        let configured = quotas.configured(scope, key);
        let stored = quotas.stored(scope, key);
        for b in Bucket::ALL {
            let from_state = stored.get(&b).map(|s| match *s {
                State::Rate { rate, .. } => Limit::Rate(rate),
                State::Count { limit, .. } => Limit::Count(limit),
            });
            let (limit, source) = match (admin.get(b), configured.get(b), from_state) {
                (Some(l), _, _) => (l, "admin"),
                (None, Some(l), _) => (l, "config"),
                (None, None, Some(l)) => (l, "policy"),
                (None, None, None) => continue,
            };
            let status = bucket::peek(b, limit, stored.get(&b).copied(), now_ms);
            buckets.push(QuotaBucket {
                scope: scope.as_str().into(),
                bucket: b.as_str().into(),
                limit: status.limit,
                used: status.limit.saturating_sub(status.remaining),
                remaining: status.remaining,
                reset_unix_ms: status.reset_ms,
                source: source.into(),
            });
        }
    }
    RobotQuota {
        robot_id: robot.robot_id.clone(),
        robot_type: robot.robot_type.clone(),
        group: robot.group.clone(),
        overrides: quotas.override_of(Scope::Robot, &robot.robot_id).unwrap_or_default().wire(),
        configured: quotas.configured(Scope::Robot, &robot.robot_id).wire(),
        buckets,
    }
}
