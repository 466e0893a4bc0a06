//! Offline maintenance of the quota trees, for `appliance quota export|import|reset` (the
//! appliance stopped: sled allows one process per store).

use serde_json::{Value, json};

use super::bucket::State;
use super::limits::decode_limits;
use super::quotas::{split_limits_key, split_state_key};
use crate::store::hex;

const TREES: [&str; 2] = ["quota_state", "quota_limits"];

/// Every record that decodes, as JSON (raw values in hex, and readable); the keys of those
/// that do not, for the operator.
pub fn export(db: &sled::Db) -> Result<(Value, Vec<String>), sled::Error> {
    let mut out = serde_json::Map::new();
    let mut skipped = Vec::new();
    for name in TREES {
        let mut records = Vec::new();
        for kv in db.open_tree(name)?.iter() {
            let (k, v) = kv?;
            let key = String::from_utf8_lossy(&k).replace('\0', "/");
            match check(name, &k, &v) {
                Ok(readable) => records.push(json!({"key": key, "value": hex(&v), "readable": readable})),
                Err(problem) => skipped.push(format!("{name} `{key}`: {problem}")),
            }
        }
        out.insert(name.into(), Value::Array(records));
    }
    out.insert("version".into(), json!(1));
    Ok((Value::Object(out), skipped))
}

/// Replaces both trees with `exported`; every record is checked first, and nothing is
/// written unless all are good. Returns how many records were written.
pub fn import(db: &sled::Db, exported: &Value) -> Result<usize, String> {
    if exported["version"] != 1 {
        return Err("not a quota export (version 1)".into());
    }
    let mut batches = Vec::new();
    let mut n = 0;
    for name in TREES {
        let mut batch = sled::Batch::default();
        for (i, r) in exported[name].as_array().ok_or(format!("`{name}` is not a list"))?.iter().enumerate() {
            let at = || format!("{name}[{i}]");
            let key = r["key"].as_str().ok_or_else(|| format!("{}: no `key`", at()))?.replace('/', "\0");
            let value = unhex(r["value"].as_str().unwrap_or_default())
                .ok_or_else(|| format!("{}: `value` is not hex", at()))?;
            check(name, key.as_bytes(), &value).map_err(|p| format!("{}: {p}", at()))?;
            batch.insert(key.as_bytes(), value);
            n += 1;
        }
        batches.push((name, batch));
    }
    reset(db, false).map_err(|e| e.to_string())?;
    for (name, batch) in batches {
        db.open_tree(name).and_then(|t| t.apply_batch(batch)).map_err(|e| e.to_string())?;
    }
    db.flush().map_err(|e| e.to_string())?;
    Ok(n)
}

/// Forgets all usage and (unless `keep_limits`) the admin API's overrides.
pub fn reset(db: &sled::Db, keep_limits: bool) -> Result<(), sled::Error> {
    db.open_tree("quota_state")?.clear()?;
    if !keep_limits {
        db.open_tree("quota_limits")?.clear()?;
    }
    db.flush()?;
    Ok(())
}

fn check(tree: &str, k: &[u8], v: &[u8]) -> Result<String, String> {
    if tree == "quota_state" {
        split_state_key(k).ok_or("malformed key")?;
        State::decode(v).map(|s| format!("{s:?}"))
    } else {
        split_limits_key(k).ok_or("malformed key")?;
        decode_limits(v).map(|l| format!("{l:?}"))
    }
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::quota::bucket::Bucket;
    use crate::quota::bucket::Scope;
    use crate::quota::config::QuotaConfig;
    use crate::quota::quotas::Quotas;

    #[test]
    fn an_unreadable_record_stops_the_open_and_export_reset_import_recover() {
        let dir = tempfile::tempdir().unwrap();
        let store = std::sync::Arc::new(crate::store::Store::open(dir.path()).unwrap());
        let db = store.db().unwrap();
        let config = QuotaConfig::default();
        let good = State::Count { period: 1, count: 3, limit: 9 };
        db.open_tree("quota_state").unwrap().insert(b"robot\0r2\0day", good.encode()).unwrap();
        db.open_tree("quota_state").unwrap().insert(b"robot\0r1\0rate", &b"garbage"[..]).unwrap();
        let err = Quotas::open(store.clone(), &config).unwrap_err().to_string();
        assert!(err.contains("robot/r1/rate") && err.contains("appliance quota reset"), "{err}");

        let (exported, skipped) = export(&db).unwrap();
        assert_eq!(skipped.len(), 1, "{skipped:?}");
        assert!(
            import(
                &db,
                &serde_json::json!({"version": 1, "quota_state": [{"key": "x", "value": "00"}], "quota_limits": []})
            )
            .is_err()
        );
        assert_eq!(import(&db, &exported), Ok(1));
        let quotas = Quotas::open(store.clone(), &config).unwrap();
        assert_eq!(quotas.stored(Scope::Robot, "r2")[&Bucket::Day], good);
    }
}
