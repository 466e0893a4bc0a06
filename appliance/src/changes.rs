//! The admin change trail: every change made through the admin API — who made it, what, and
//! the target before and after — in sled tree `admin_changes`, keyed by the store's generated
//! ids (big-endian, so the tree is in time order). At most `auth.changes_retention` are kept,
//! the oldest dropped beyond it.
//!
//! A change's sequence number is taken before the change is made ([`Changes::next_seq`]):
//! policies carry it as their `revision`, which signed changes name. Records are written once
//! the change is made; a store fault loses the record (logged), never the change.

use std::sync::{Arc, Mutex, PoisonError};

use vla_api::AdminChange;

use crate::store::{Store, StoreError};

const TREE: &str = "admin_changes";

/// Most records one query returns.
pub const MAX_LIMIT: usize = 1000;

#[derive(Debug)]
pub struct Changes {
    store: Arc<Store>,
    retention: u64,
    /// Serialises appends and their trimming.
    write: Mutex<()>,
}

/// `GET /admin/changes` filters; all optional, combined with AND.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Query {
    pub target: Option<String>,
    /// `policy`, `robot`, `quota`, `model` (the action's prefix) or a whole action.
    pub action: Option<String>,
    pub since_unix_ms: Option<u64>,
    pub limit: usize,
}

impl Changes {
    pub fn open(store: Arc<Store>, retention: u64) -> Result<Changes, StoreError> {
        store.tree(TREE)?;
        Ok(Changes { store, retention, write: Mutex::new(()) })
    }

    /// The sequence number of a change about to be made.
    pub fn next_seq(&self) -> Result<u64, StoreError> {
        let db = self.store.db()?;
        // Shared with the policies' revisions, where 0 means "not installed".
        Ok(db.generate_id().map_err(|e| self.store.fault(e))? + 1)
    }

    /// Keeps `change` (its `seq` from [`Changes::next_seq`], or a new one when 0). Blocking.
    pub fn record(&self, mut change: AdminChange) {
        let _w = self.write.lock().unwrap_or_else(PoisonError::into_inner);
        let result = (|| {
            if change.seq == 0 {
                change.seq = self.next_seq()?;
            }
            let tree = self.store.tree(TREE)?;
            let bytes = serde_json::to_vec(&change).unwrap_or_default();
            tree.insert(change.seq.to_be_bytes(), bytes).map_err(|e| self.store.fault(e))?;
            while tree.len() as u64 > self.retention {
                if tree.pop_min().map_err(|e| self.store.fault(e))?.is_none() {
                    break;
                }
            }
            tree.flush().map_err(|e| self.store.fault(e))?;
            Ok::<_, StoreError>(())
        })();
        match result {
            Ok(()) => tracing::info!(
                action = %change.action,
                target = %change.target,
                who = %change.who,
                signed_by = change.signed_by.as_deref().unwrap_or("-"),
                "admin change"
            ),
            Err(e) => {
                tracing::error!(action = %change.action, target = %change.target, "admin change not recorded: {e}")
            }
        }
    }

    /// Matching changes, newest first. Blocking.
    pub fn query(&self, q: &Query) -> Result<Vec<AdminChange>, StoreError> {
        let mut out = Vec::new();
        for kv in self.store.tree(TREE)?.iter().rev() {
            let (key, value) = kv?;
            let change: AdminChange = serde_json::from_slice(&value).map_err(|e| StoreError::Corrupt {
                key: format!("{TREE}/{}", u64::from_be_bytes(key.as_ref().try_into().unwrap_or_default())),
                problem: e.to_string(),
            })?;
            if q.since_unix_ms.is_some_and(|since| change.time_unix_ms < since) {
                break;
            }
            let action = q
                .action
                .as_ref()
                .is_none_or(|a| change.action == *a || change.action.split('.').next() == Some(a.as_str()));
            if action && q.target.as_ref().is_none_or(|t| *t == change.target) {
                out.push(change);
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

    fn change(action: &str, target: &str, time: u64) -> AdminChange {
        AdminChange {
            seq: 0,
            time_unix_ms: time,
            who: "admin-token:0000".into(),
            peer: None,
            action: action.into(),
            target: target.into(),
            signed_by: None,
            before: serde_json::Value::Null,
            after: serde_json::json!({"n": time}),
        }
    }

    #[test]
    fn the_trail_keeps_the_newest_and_filters() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path()).unwrap());
        let changes = Changes::open(store.clone(), 3).unwrap();
        for t in 1..=5 {
            changes.record(change(if t % 2 == 0 { "robot.register" } else { "policy.patch" }, "x", t));
        }
        let all = changes.query(&Query { limit: 10, ..Query::default() }).unwrap();
        assert_eq!(all.iter().map(|c| c.time_unix_ms).collect::<Vec<_>>(), vec![5, 4, 3]);
        let policy = changes.query(&Query { action: Some("policy".into()), limit: 10, ..Query::default() }).unwrap();
        assert_eq!(policy.len(), 2);
        let seq = changes.next_seq().unwrap();
        let mut c = change("policy.delete", "y", 6);
        c.seq = seq;
        changes.record(c);
        let y = changes.query(&Query { target: Some("y".into()), limit: 10, ..Query::default() }).unwrap();
        assert_eq!(y[0].seq, seq);
        drop(changes);
        let reopened = Changes::open(store, 3).unwrap();
        assert_eq!(reopened.query(&Query { limit: 10, ..Query::default() }).unwrap().len(), 3);
    }
}
