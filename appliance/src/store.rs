//! Store: the appliance's durable state in one sled database under `<data.dir>/store`.
//!
//! Holds the robot registry (below) and, in their own trees, the installed policies and the
//! audit log ([`crate::policy`]). The robot registry is one record per robot (`robot/<id>`)
//! and one per API key (`key/<key id>`), the latter with only a salt and a salted hash of the
//! key's secret. Writes
//! go through one mutex (read-modify-write of a robot and its key must not interleave with
//! another admin call) and are applied as one atomic sled batch, then flushed before the caller
//! is answered: a key the admin API handed out survives a power cut, and a revocation is never
//! undone by one. Reads take no lock; a revocation is visible to the very next request.

use std::path::Path;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use vla_api::Priority;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "store {path}: {source}. Is another appliance running on this data directory? If the store is \
         damaged, the appliance will not start on it or replace it: stop, move {path} aside (the robot \
         registry, policies, audit log and quota state are in it) and restore it from a backup; see \
         README.md, Rate limits and quotas, Recovery"
    )]
    Open { path: String, source: sled::Error },
    #[error("store: {0}")]
    Sled(#[from] sled::Error),
    #[error("store: corrupt record `{key}`: {problem}")]
    Corrupt { key: String, problem: String },
}

/// A registered robot. Never holds key material.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RobotRecord {
    pub robot_id: String,
    pub robot_type: String,
    pub group: String,
    pub priority: Priority,
    pub created_unix_ms: u64,
    /// The id of the robot's current key; `None` once revoked.
    pub key_id: Option<String>,
    pub key_created_unix_ms: Option<u64>,
    pub revoked_unix_ms: Option<u64>,
}

/// One API key at rest: whose it is and `SHA-256(salt ‖ secret)`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyRecord {
    pub robot_id: String,
    #[serde(with = "hex32")]
    pub salt: [u8; 16],
    #[serde(with = "hex32")]
    pub hash: [u8; 32],
}

/// The one sled database of the process.
#[derive(Debug)]
pub struct Store {
    db: sled::Db,
    robots: sled::Tree,
    /// Serialises writers; see the module header.
    write: Mutex<()>,
}

/// What a write found that stops it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteOutcome<T> {
    Done(T),
    NotFound,
    Conflict(String),
}

impl Store {
    /// Opens (creating) `<dir>/store`. sled locks the directory: a second process fails here.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        let path = dir.join("store");
        let db = sled::Config::new()
            .path(&path)
            .mode(sled::Mode::LowSpace)
            .open()
            .map_err(|source| StoreError::Open { path: path.display().to_string(), source })?;
        let robots = db.open_tree("robots")?;
        Ok(Store { db, robots, write: Mutex::new(()) })
    }

    /// Waits, at most `limit`, until nothing of this process holds the store in `dir` open.
    ///
    /// sled releases its lock on `<dir>/store/db` when its last handle drops. When the server
    /// stops, that can be a moment later: a quota flush or a blocking task still finishing
    /// holds a handle. Whoever opens the same directory next in this process (a restart in
    /// tests, an embedding program) would be refused. The lock is a `flock`, as std's
    /// `File::try_lock` takes it, so probing it tells when sled let go. `false` if still held.
    pub fn wait_closed(dir: &Path, limit: Duration) -> bool {
        let path = dir.join("store").join("db");
        let deadline = std::time::Instant::now() + limit;
        loop {
            match std::fs::File::open(&path).map(|f| f.try_lock()) {
                // Unlocked when the probe drops.
                Ok(Ok(())) | Err(_) => return true,
                Ok(Err(_)) if std::time::Instant::now() >= deadline => return false,
                Ok(Err(_)) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    }

    /// The database, for the stages that keep their own trees (policies, audit).
    pub fn db(&self) -> &sled::Db {
        &self.db
    }

    pub fn robot(&self, robot_id: &str) -> Result<Option<RobotRecord>, StoreError> {
        self.get(&robot_key(robot_id))
    }

    pub fn key(&self, key_id: &str) -> Result<Option<KeyRecord>, StoreError> {
        self.get(&key_key(key_id))
    }

    pub fn robots(&self) -> Result<Vec<RobotRecord>, StoreError> {
        self.robots
            .scan_prefix(b"robot/")
            .map(|kv| {
                let (k, v) = kv?;
                decode(&String::from_utf8_lossy(&k), &v)
            })
            .collect()
    }

    /// Registers `robot` with `key` (robot ids are unique among robots not revoked; a revoked
    /// robot may be registered again).
    pub fn register(&self, robot: RobotRecord, key_id: &str, key: KeyRecord) -> Result<WriteOutcome<()>, StoreError> {
        let _w = self.write.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(existing) = self.robot(&robot.robot_id)?
            && existing.revoked_unix_ms.is_none()
        {
            return Ok(WriteOutcome::Conflict(format!("robot `{}` is already registered", robot.robot_id)));
        }
        let mut batch = sled::Batch::default();
        batch.insert(robot_key(&robot.robot_id).as_bytes(), encode(&robot));
        batch.insert(key_key(key_id).as_bytes(), encode(&key));
        self.commit(batch)?;
        Ok(WriteOutcome::Done(()))
    }

    /// Replaces the robot's key; the old key stops working at once.
    pub fn rotate(
        &self,
        robot_id: &str,
        key_id: &str,
        key: KeyRecord,
        now_ms: u64,
    ) -> Result<WriteOutcome<RobotRecord>, StoreError> {
        let _w = self.write.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(mut robot) = self.robot(robot_id)? else { return Ok(WriteOutcome::NotFound) };
        if robot.revoked_unix_ms.is_some() {
            return Ok(WriteOutcome::Conflict(format!(
                "robot `{robot_id}` is revoked; register it again to give it a key"
            )));
        }
        let mut batch = sled::Batch::default();
        if let Some(old) = &robot.key_id {
            batch.remove(key_key(old).as_bytes());
        }
        robot.key_id = Some(key_id.to_string());
        robot.key_created_unix_ms = Some(now_ms);
        batch.insert(robot_key(robot_id).as_bytes(), encode(&robot));
        batch.insert(key_key(key_id).as_bytes(), encode(&key));
        self.commit(batch)?;
        Ok(WriteOutcome::Done(robot))
    }

    /// Revokes the robot: its key is deleted and the record kept, marked, for the audit trail.
    pub fn revoke(&self, robot_id: &str, now_ms: u64) -> Result<WriteOutcome<RobotRecord>, StoreError> {
        let _w = self.write.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(mut robot) = self.robot(robot_id)? else { return Ok(WriteOutcome::NotFound) };
        if robot.revoked_unix_ms.is_some() {
            return Ok(WriteOutcome::Done(robot));
        }
        let mut batch = sled::Batch::default();
        if let Some(old) = robot.key_id.take() {
            batch.remove(key_key(&old).as_bytes());
        }
        robot.key_created_unix_ms = None;
        robot.revoked_unix_ms = Some(now_ms);
        batch.insert(robot_key(robot_id).as_bytes(), encode(&robot));
        self.commit(batch)?;
        Ok(WriteOutcome::Done(robot))
    }

    fn commit(&self, batch: sled::Batch) -> Result<(), StoreError> {
        self.robots.apply_batch(batch)?;
        self.db.flush()?;
        Ok(())
    }

    fn get<T: for<'de> Deserialize<'de>>(&self, key: &str) -> Result<Option<T>, StoreError> {
        self.robots.get(key.as_bytes())?.map(|v| decode(key, &v)).transpose()
    }
}

fn robot_key(robot_id: &str) -> String {
    format!("robot/{robot_id}")
}

fn key_key(key_id: &str) -> String {
    format!("key/{key_id}")
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    // Plain structs of strings and numbers always serialise.
    serde_json::to_vec(value).unwrap_or_default()
}

fn decode<T: for<'de> Deserialize<'de>>(key: &str, bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt { key: key.into(), problem: e.to_string() })
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Fixed-size byte arrays as lower-case hex.
mod hex32 {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer, const N: usize>(bytes: &[u8; N], s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&super::hex(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>, const N: usize>(d: D) -> Result<[u8; N], D::Error> {
        let s = String::deserialize(d)?;
        let bytes: Result<Vec<u8>, _> = (0..s.len())
            .step_by(2)
            .map(|i| s.get(i..i + 2).and_then(|h| u8::from_str_radix(h, 16).ok()).ok_or(()))
            .collect();
        bytes
            .ok()
            .and_then(|b| <[u8; N]>::try_from(b).ok())
            .ok_or_else(|| serde::de::Error::custom(format!("expected {N} bytes of hex")))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn wait_closed_returns_once_the_last_handle_is_gone() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        assert!(!Store::wait_closed(dir.path(), Duration::from_millis(50)), "sled holds its lock");
        // A handle still held elsewhere (a flush finishing on another thread) keeps it.
        let late = store.db().clone();
        drop(store);
        let holder = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            drop(late);
        });
        assert!(Store::wait_closed(dir.path(), Duration::from_secs(10)));
        holder.join().unwrap();
        Store::open(dir.path()).unwrap();
    }

    fn robot(id: &str, key_id: &str) -> RobotRecord {
        RobotRecord {
            robot_id: id.into(),
            robot_type: "ur5e".into(),
            group: "cell-1".into(),
            priority: Priority::Normal,
            created_unix_ms: 1,
            key_id: Some(key_id.into()),
            key_created_unix_ms: Some(1),
            revoked_unix_ms: None,
        }
    }

    fn key(id: &str) -> KeyRecord {
        KeyRecord { robot_id: id.into(), salt: [7; 16], hash: [9; 32] }
    }

    #[test]
    fn registration_survives_reopening() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            assert_eq!(store.register(robot("arm-1", "k1"), "k1", key("arm-1")).unwrap(), WriteOutcome::Done(()));
        }
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.robot("arm-1").unwrap().unwrap().robot_type, "ur5e");
        assert_eq!(store.key("k1").unwrap().unwrap(), key("arm-1"));
        assert_eq!(store.robots().unwrap().len(), 1);
    }

    #[test]
    fn a_registered_robot_cannot_be_registered_twice_but_a_revoked_one_can() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store.register(robot("arm-1", "k1"), "k1", key("arm-1")).unwrap();
        assert!(matches!(store.register(robot("arm-1", "k2"), "k2", key("arm-1")).unwrap(), WriteOutcome::Conflict(_)));
        let revoked = store.revoke("arm-1", 5).unwrap();
        assert!(matches!(revoked, WriteOutcome::Done(RobotRecord { revoked_unix_ms: Some(5), key_id: None, .. })));
        assert_eq!(store.key("k1").unwrap(), None);
        assert_eq!(store.register(robot("arm-1", "k3"), "k3", key("arm-1")).unwrap(), WriteOutcome::Done(()));
    }

    #[test]
    fn rotation_removes_the_old_key() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store.register(robot("arm-1", "k1"), "k1", key("arm-1")).unwrap();
        let WriteOutcome::Done(r) = store.rotate("arm-1", "k2", key("arm-1"), 9).unwrap() else { panic!() };
        assert_eq!(r.key_id.as_deref(), Some("k2"));
        assert_eq!(store.key("k1").unwrap(), None);
        assert!(store.key("k2").unwrap().is_some());
        assert_eq!(store.rotate("arm-9", "k3", key("arm-9"), 9).unwrap(), WriteOutcome::NotFound);
    }
}
