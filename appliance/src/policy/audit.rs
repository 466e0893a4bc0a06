//! The decision log: every deny, modify and failure (enforced or shadow) in sled tree `audit`,
//! with tree `audit_robot` (`<robot>\0<seq>`) indexing each robot's records.
//!
//! Keys are sled-generated ids (big-endian, so the tree is in time order). Bounds:
//! - **retention**: at most `policy.audit_retention` records, the oldest dropped beyond it;
//! - **per robot**: at most `policy.audit_retention_per_robot` of them are one robot's (its own
//!   oldest dropped beyond it), so one robot's flood cannot evict the others' history;
//! - **folding**: a denial or failure identical to the robot's previous record (same policy,
//!   version, mode, decision and code) within `policy.audit_fold_ms` of that record's first is
//!   folded into it: its `count` goes up and `last_unix_ms` moves; nothing new is kept.
//!
//! Records are written as requests finish, without a flush each: sled's own periodic flush
//! (every 500 ms) makes them durable. Appends are serialised by one lock (they are short sled
//! writes), which keeps the counts, the index and the tree in step.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use vla_api::AuditRecord;

use crate::store::{Store, StoreError};

/// Most records one query returns.
pub const MAX_LIMIT: usize = 1000;
pub const DEFAULT_LIMIT: usize = 100;

/// The log's bounds (see the module header).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounds {
    pub retention: u64,
    pub per_robot: u64,
    pub fold_ms: u64,
}

#[derive(Debug)]
pub struct Audit {
    /// Trees are asked of it for each operation, never kept (see [`crate::store`], faults).
    store: Arc<Store>,
    bounds: Bounds,
    state: Mutex<State>,
}

/// What appends need to know without reading the trees: counted at open, and again when the
/// store was reopened after a fault (records written before it may be lost).
#[derive(Debug, Default)]
struct State {
    generation: u64,
    len: u64,
    robots: HashMap<String, RobotLog>,
}

#[derive(Debug, Default)]
struct RobotLog {
    records: u64,
    /// The robot's newest record, when it may take folds.
    last: Option<Last>,
}

#[derive(Debug, Clone)]
struct Last {
    seq: u64,
    fingerprint: String,
    first_ms: u64,
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

/// What makes two decisions of one robot the same, for folding.
fn fingerprint(r: &AuditRecord) -> Option<String> {
    matches!(r.decision.as_str(), "deny" | "error").then(|| {
        format!(
            "{}\0{}\0{}\0{}\0{}\0{}",
            r.policy,
            r.version,
            r.world,
            r.mode,
            r.decision,
            r.code.as_deref().unwrap_or("")
        )
    })
}

/// One append's trees, asked of the store once for all its records.
struct Trees<'a> {
    tree: &'a sled::Tree,
    index: &'a sled::Tree,
    db: &'a sled::Db,
    store: &'a Store,
}

fn index_key(robot: &str, seq: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(robot.len() + 9);
    k.extend_from_slice(robot.as_bytes());
    k.push(0);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

fn decode(key: &[u8], value: &[u8]) -> Result<AuditRecord, StoreError> {
    serde_json::from_slice(value).map_err(|e| StoreError::Corrupt {
        key: format!("audit/{}", u64::from_be_bytes(key.try_into().unwrap_or_default())),
        problem: e.to_string(),
    })
}

fn encode(record: &AuditRecord) -> Vec<u8> {
    // Strings and numbers (non-finite ones as strings: `vla_api::floats`) always serialise.
    serde_json::to_vec(record).unwrap_or_default()
}

impl Audit {
    /// Opens the trees; rebuilds the robot index when it does not match the log (a store
    /// written before the index existed).
    pub fn open(store: Arc<Store>, bounds: Bounds) -> Result<Audit, StoreError> {
        let state = Self::count(&store)?;
        Ok(Audit { store, bounds, state: Mutex::new(state) })
    }

    fn count(store: &Store) -> Result<State, StoreError> {
        let generation = store.generation();
        let (tree, index) = (store.tree("audit")?, store.tree("audit_robot")?);
        if index.len() != tree.len() {
            index.clear().map_err(|e| store.fault(e))?;
            for kv in tree.iter() {
                let (k, v) = kv?;
                let record = decode(&k, &v)?;
                index.insert(index_key(&record.robot_id, record.seq), &[]).map_err(|e| store.fault(e))?;
            }
        }
        let mut state = State { generation, len: tree.len() as u64, robots: HashMap::new() };
        for kv in index.iter() {
            let (k, _) = kv?;
            let robot = k.split(|&b| b == 0).next().unwrap_or_default();
            state.robots.entry(String::from_utf8_lossy(robot).into_owned()).or_default().records += 1;
        }
        Ok(state)
    }

    /// Appends `records` (folding and dropping as the module header says). Errors are logged,
    /// not returned: a full disk must not turn a robot's answer into a 500.
    pub fn append(&self, records: Vec<AuditRecord>) {
        if records.is_empty() {
            return;
        }
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if state.generation != self.store.generation() {
            match Self::count(&self.store) {
                Ok(counted) => *state = counted,
                Err(e) => tracing::error!("audit log: cannot recount after the store was reopened: {e}"),
            }
        }
        let trees = self.store.db().and_then(|db| Ok((db.open_tree("audit")?, db.open_tree("audit_robot")?, db)));
        let (tree, index, db) = match trees {
            Ok(trees) => trees,
            Err(e) => {
                tracing::error!(records = records.len(), "audit records lost: {e}");
                return;
            }
        };
        let trees = Trees { tree: &tree, index: &index, db: &db, store: &self.store };
        for mut record in records {
            if let Err(e) = self.append_one(&trees, &mut state, &mut record) {
                tracing::error!(policy = %record.policy, robot_id = %record.robot_id, "audit record lost: {e}");
            }
        }
    }

    fn append_one(&self, t: &Trees<'_>, state: &mut State, record: &mut AuditRecord) -> Result<(), StoreError> {
        let fp = fingerprint(record);
        let log = state.robots.entry(record.robot_id.clone()).or_default();
        // Folded into the robot's previous record when it is the same decision, soon enough.
        if let (Some(fp), Some(last)) = (&fp, &log.last)
            && *fp == last.fingerprint
            && record.time_unix_ms.saturating_sub(last.first_ms) <= self.bounds.fold_ms
            && let Some(bytes) = t.tree.get(last.seq.to_be_bytes())?
        {
            let mut folded = decode(&last.seq.to_be_bytes(), &bytes)?;
            folded.count += record.count.max(1);
            folded.last_unix_ms = Some(record.time_unix_ms.max(folded.last_unix_ms.unwrap_or(0)));
            t.tree.insert(last.seq.to_be_bytes(), encode(&folded)).map_err(|e| t.store.fault(e))?;
            return Ok(());
        }
        record.seq = t.db.generate_id().map_err(|e| t.store.fault(e))?;
        record.count = record.count.max(1);
        t.tree.insert(record.seq.to_be_bytes(), encode(record)).map_err(|e| t.store.fault(e))?;
        t.index.insert(index_key(&record.robot_id, record.seq), &[]).map_err(|e| t.store.fault(e))?;
        log.records += 1;
        log.last = fp.map(|fingerprint| Last { seq: record.seq, fingerprint, first_ms: record.time_unix_ms });
        let over_share = log.records > self.bounds.per_robot;
        state.len += 1;
        if over_share {
            Self::drop_oldest_of(t, state, &record.robot_id)?;
        }
        while state.len > self.bounds.retention {
            let Some((k, v)) = t.tree.pop_min().map_err(|e| t.store.fault(e))? else { break };
            state.len -= 1;
            // The record names its robot; an unreadable one has no index entry to remove.
            if let Ok(gone) = decode(&k, &v) {
                t.index.remove(index_key(&gone.robot_id, gone.seq)).map_err(|e| t.store.fault(e))?;
                Self::forget(state, &gone.robot_id, gone.seq);
            }
        }
        Ok(())
    }

    /// Drops `robot`'s oldest record.
    fn drop_oldest_of(t: &Trees<'_>, state: &mut State, robot: &str) -> Result<(), StoreError> {
        let mut prefix = robot.as_bytes().to_vec();
        prefix.push(0);
        let Some(first) = t.index.scan_prefix(&prefix).next() else { return Ok(()) };
        let (k, _) = first?;
        let seq = u64::from_be_bytes(k[prefix.len()..].try_into().unwrap_or_default());
        t.index.remove(&k).map_err(|e| t.store.fault(e))?;
        if t.tree.remove(seq.to_be_bytes()).map_err(|e| t.store.fault(e))?.is_some() {
            state.len -= 1;
        }
        Self::forget(state, robot, seq);
        Ok(())
    }

    fn forget(state: &mut State, robot: &str, seq: u64) {
        if let Some(log) = state.robots.get_mut(robot) {
            log.records = log.records.saturating_sub(1);
            if log.last.as_ref().is_some_and(|l| l.seq == seq) {
                log.last = None;
            }
            if log.records == 0 {
                state.robots.remove(robot);
            }
        }
    }

    /// Matching records, newest first.
    pub fn query(&self, q: &Query) -> Result<Vec<AuditRecord>, StoreError> {
        let mut out = Vec::new();
        for kv in self.store.tree("audit")?.iter().rev() {
            let (key, value) = kv?;
            let record = decode(&key, &value)?;
            // Keys are in write order, `time_unix_ms` is the request's arrival: a slow request's
            // record can follow newer ones, so an old record does not end the scan.
            if q.since_unix_ms.is_some_and(|since| record.time_unix_ms.max(record.last_unix_ms.unwrap_or(0)) < since) {
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

    /// Records kept now.
    pub fn len(&self) -> u64 {
        self.state.lock().unwrap_or_else(PoisonError::into_inner).len
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
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
            count: 1,
            ..AuditRecord::default()
        }
    }

    fn all(audit: &Audit) -> Vec<AuditRecord> {
        audit.query(&Query { limit: 1000, ..Query::default() }).unwrap()
    }

    const NO_FOLD: u64 = 0;

    #[test]
    fn retention_drops_the_oldest_and_queries_filter_newest_first() {
        let dir = tempfile::tempdir().unwrap();
        let db = Arc::new(Store::open(dir.path()).unwrap());
        let bounds = Bounds { retention: 3, per_robot: 3, fold_ms: NO_FOLD };
        let audit = Audit::open(db.clone(), bounds).unwrap();
        for t in 1..=5 {
            audit.append(vec![record(if t % 2 == 0 { "a" } else { "b" }, "modify", t)]);
        }
        assert_eq!(all(&audit).iter().map(|r| r.time_unix_ms).collect::<Vec<_>>(), vec![5, 4, 3]);
        let b = audit.query(&Query { robot_id: Some("b".into()), limit: 10, ..Query::default() }).unwrap();
        assert_eq!(b.iter().map(|r| r.time_unix_ms).collect::<Vec<_>>(), vec![5, 3]);
        let since = audit.query(&Query { since_unix_ms: Some(4), limit: 10, ..Query::default() }).unwrap();
        assert_eq!(since.len(), 2);
        let one = audit.query(&Query { limit: 1, ..Query::default() }).unwrap();
        assert_eq!(one[0].time_unix_ms, 5);
        drop(audit);
        let reopened = Audit::open(db.clone(), bounds).unwrap();
        assert_eq!(all(&reopened).len(), 3);
    }

    #[test]
    fn one_robot_cannot_evict_the_others_history() {
        let dir = tempfile::tempdir().unwrap();
        let db = Arc::new(Store::open(dir.path()).unwrap());
        let audit = Audit::open(db.clone(), Bounds { retention: 100, per_robot: 10, fold_ms: NO_FOLD }).unwrap();
        audit.append(vec![record("victim", "modify", 1), record("victim", "deny", 2)]);
        for t in 0..500 {
            audit.append(vec![record("flood", "modify", 10 + t)]);
        }
        let records = all(&audit);
        assert_eq!(records.iter().filter(|r| r.robot_id == "flood").count(), 10);
        assert_eq!(records.iter().filter(|r| r.robot_id == "victim").count(), 2, "the victim's history is kept");
        // The index and the counts survive a restart.
        drop(audit);
        let audit = Audit::open(db.clone(), Bounds { retention: 100, per_robot: 10, fold_ms: NO_FOLD }).unwrap();
        assert_eq!(audit.len(), 12);
        audit.append(vec![record("flood", "modify", 1_000)]);
        assert_eq!(all(&audit).iter().filter(|r| r.robot_id == "flood").count(), 10);
    }

    #[test]
    fn a_burst_of_identical_denials_is_one_record_with_a_count() {
        let dir = tempfile::tempdir().unwrap();
        let db = Arc::new(Store::open(dir.path()).unwrap());
        let audit = Audit::open(db.clone(), Bounds { retention: 100, per_robot: 100, fold_ms: 1_000 }).unwrap();
        for t in 0..2_000 {
            audit.append(vec![record("flood", "deny", 10_000 + t / 2)]);
        }
        let records = all(&audit);
        // 1000 ms of denials at two per ms: folded into records of at most a second each.
        assert!(records.len() <= 2, "{}", records.len());
        assert_eq!(records.iter().map(|r| r.count).sum::<u64>(), 2_000);
        assert_eq!(records[0].last_unix_ms, Some(10_999));
        // Another decision breaks the run; modifications are never folded.
        audit.append(vec![record("flood", "modify", 20_000), record("flood", "modify", 20_000)]);
        assert_eq!(all(&audit).len(), records.len() + 2);
    }

    #[test]
    fn a_record_with_non_finite_values_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let db = Arc::new(Store::open(dir.path()).unwrap());
        let audit = Audit::open(db.clone(), Bounds { retention: 10, per_robot: 10, fold_ms: NO_FOLD }).unwrap();
        let mut r = record("arm", "error", 1);
        r.original_action = Some(vec![f32::NAN, f32::INFINITY, 0.25]);
        audit.append(vec![r]);
        let back = all(&audit);
        assert!(back[0].original_action.as_ref().unwrap()[0].is_nan());
        assert_eq!(back[0].original_action.as_ref().unwrap()[1], f32::INFINITY);
    }
}
