//! The decision log: every deny, modify and failure (enforced or shadow) in sled tree `audit`.
//!
//! Keys are sled-generated ids (big-endian, so the tree is in time order); the oldest records
//! are dropped beyond `policy.audit_retention`. Records are written as requests finish, without
//! a flush each: sled's own periodic flush (every 500 ms) makes them durable.

use std::sync::atomic::{AtomicU64, Ordering};

use vla_api::AuditRecord;

use crate::store::StoreError;

/// Most records one query returns.
pub const MAX_LIMIT: usize = 1000;
pub const DEFAULT_LIMIT: usize = 100;

#[derive(Debug)]
pub struct Audit {
    db: sled::Db,
    tree: sled::Tree,
    retention: u64,
    len: AtomicU64,
}

/// `GET /admin/audit` filters; all optional, combined with AND.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Query {
    pub robot_id: Option<String>,
    pub policy: Option<String>,
    pub decision: Option<String>,
    /// Only records at or after this time.
    pub since_unix_ms: Option<u64>,
    pub limit: usize,
}

impl Audit {
    pub fn open(db: &sled::Db, retention: u64) -> Result<Audit, StoreError> {
        let tree = db.open_tree("audit")?;
        let len = tree.len() as u64;
        Ok(Audit { db: db.clone(), tree, retention, len: AtomicU64::new(len) })
    }

    /// Appends `records`, dropping the oldest beyond the retention. Errors are logged, not
    /// returned: a full disk must not turn a robot's answer into a 500.
    pub fn append(&self, records: Vec<AuditRecord>) {
        for mut record in records {
            if let Err(e) = self.append_one(&mut record) {
                tracing::error!(policy = %record.policy, robot_id = %record.robot_id, "audit record lost: {e}");
            }
        }
    }

    fn append_one(&self, record: &mut AuditRecord) -> Result<(), StoreError> {
        record.seq = self.db.generate_id()?;
        let bytes = serde_json::to_vec(record).unwrap_or_default();
        self.tree.insert(record.seq.to_be_bytes(), bytes)?;
        self.len.fetch_add(1, Ordering::Relaxed);
        // Each pop first claims one record over the retention, so appenders running at once
        // never drop more than their surplus.
        let retention = self.retention;
        while self.len.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |l| (l > retention).then(|| l - 1)).is_ok() {
            if self.tree.pop_min()?.is_none() {
                break;
            }
        }
        Ok(())
    }

    /// Matching records, newest first.
    pub fn query(&self, q: &Query) -> Result<Vec<AuditRecord>, StoreError> {
        let mut out = Vec::new();
        for kv in self.tree.iter().rev() {
            let (key, value) = kv?;
            let record: AuditRecord = serde_json::from_slice(&value).map_err(|e| StoreError::Corrupt {
                key: format!("audit/{}", u64::from_be_bytes(key.as_ref().try_into().unwrap_or_default())),
                problem: e.to_string(),
            })?;
            // Keys are in write order, `time_unix_ms` is the request's arrival: a slow request's
            // record can follow newer ones, so an old record does not end the scan.
            if q.since_unix_ms.is_some_and(|since| record.time_unix_ms < since) {
                continue;
            }
            let matches = q.robot_id.as_ref().is_none_or(|r| *r == record.robot_id)
                && q.policy.as_ref().is_none_or(|p| *p == record.policy)
                && q.decision.as_ref().is_none_or(|d| *d == record.decision);
            if matches {
                out.push(record);
                if out.len() >= q.limit {
                    break;
                }
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn record(robot: &str, decision: &str, time: u64) -> AuditRecord {
        AuditRecord {
            seq: 0,
            time_unix_ms: time,
            request_id: "r".into(),
            robot_id: robot.into(),
            robot_type: "demo".into(),
            model: "m".into(),
            policy: "p".into(),
            version: 1,
            world: "safety".into(),
            mode: "enforce".into(),
            decision: decision.into(),
            applied: true,
            code: None,
            reason: None,
            original_action: Some(vec![1.0]),
            final_action: None,
        }
    }

    #[test]
    fn retention_drops_the_oldest_and_queries_filter_newest_first() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        let audit = Audit::open(&db, 3).unwrap();
        for t in 1..=5 {
            audit.append(vec![record(if t % 2 == 0 { "a" } else { "b" }, "deny", t)]);
        }
        let all = audit.query(&Query { limit: 10, ..Query::default() }).unwrap();
        assert_eq!(all.iter().map(|r| r.time_unix_ms).collect::<Vec<_>>(), vec![5, 4, 3]);
        let b = audit.query(&Query { robot_id: Some("b".into()), limit: 10, ..Query::default() }).unwrap();
        assert_eq!(b.iter().map(|r| r.time_unix_ms).collect::<Vec<_>>(), vec![5, 3]);
        let since = audit.query(&Query { since_unix_ms: Some(4), limit: 10, ..Query::default() }).unwrap();
        assert_eq!(since.len(), 2);
        let one = audit.query(&Query { limit: 1, ..Query::default() }).unwrap();
        assert_eq!(one[0].time_unix_ms, 5);
        drop(audit);
        let reopened = Audit::open(&db, 3).unwrap();
        assert_eq!(reopened.query(&Query { limit: 10, ..Query::default() }).unwrap().len(), 3);
    }
}
