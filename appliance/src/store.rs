//! Store: the appliance's durable state in one sled database under `<data.dir>/store`.
//!
//! Holds the robot registry (below) and, in their own trees, the installed policies and the
//! audit log ([`crate::policy`]) and the quota state ([`crate::quota`]). The robot registry is
//! one record per robot (`robot/<id>`) and one per API key (`key/<key id>`), the latter with
//! only a salt and a salted hash of the key's secret, and a marker per retired key
//! (`retired/<key id>`: rotated away or revoked, never to work again). Writes go through one mutex
//! (read-modify-write of a robot and its key must not interleave with another admin call) and
//! are applied as one atomic sled batch, then flushed before the caller is answered: a key the
//! admin API handed out survives a power cut, and a revocation is never undone by one. Reads
//! take no lock; a revocation is visible to the very next request.
//!
//! **Faults.** After an I/O error (a full disk, a file-size limit) sled fails every later write
//! until the database is opened again; reads keep working. Whoever sees a write fail reports it
//! ([`Store::fault`]); the store then says it is failing (`/health/detailed`,
//! `vla_application_health{component="store"}`), and [`watch`] reopens it as soon as a probe
//! shows that a write would succeed again: no restart. That is why nobody keeps a
//! [`sled::Tree`] or [`sled::Db`] beyond one operation: every user asks [`Store::tree`] each
//! time, so the old database's last handle is gone when it is reopened. During the reopen
//! itself (milliseconds) the store answers [`StoreError::Unavailable`].

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock, Weak};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use vla_api::Priority;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store: being reopened after a write failure; retry")]
    Unavailable,
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
    /// Declared in the robots file: only that file changes its key (the admin API may still
    /// revoke it).
    #[serde(default)]
    pub declared: bool,
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

/// The one sled database of the process; see the module header for faults.
#[derive(Debug)]
pub struct Store {
    path: PathBuf,
    /// `None` only while it is being reopened.
    db: RwLock<Option<sled::Db>>,
    /// Serialises writers; see the module header.
    write: Mutex<()>,
    /// The write failure that made the store unhealthy, until it is reopened.
    fault: Mutex<Option<String>>,
    /// Times the database was reopened after a fault; readers of derived state (the audit
    /// log's counts) compare it to notice.
    generation: AtomicU64,
}

/// What `/health/detailed` says of the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreHealth {
    pub ok: bool,
    pub problem: Option<String>,
    pub reopened: u64,
}

/// What a write found that stops it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteOutcome<T> {
    Done(T),
    NotFound,
    Conflict(String),
}

fn open_db(path: &Path) -> Result<sled::Db, sled::Error> {
    sled::Config::new().path(path).mode(sled::Mode::LowSpace).open()
}

impl Store {
    /// Opens (creating) `<dir>/store`. sled locks the directory: a second process fails here.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        let path = dir.join("store");
        let db = open_db(&path).map_err(|source| StoreError::Open { path: path.display().to_string(), source })?;
        db.open_tree("robots")?;
        Ok(Store {
            path,
            db: RwLock::new(Some(db)),
            write: Mutex::new(()),
            fault: Mutex::new(None),
            generation: AtomicU64::new(0),
        })
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

    /// The database, for one operation (never kept: see the module header).
    pub fn db(&self) -> Result<sled::Db, StoreError> {
        self.db.read().unwrap_or_else(PoisonError::into_inner).clone().ok_or(StoreError::Unavailable)
    }

    /// Tree `name`, for one operation.
    pub fn tree(&self, name: &str) -> Result<sled::Tree, StoreError> {
        Ok(self.db()?.open_tree(name)?)
    }

    /// Records that a write failed with `e`: an I/O error makes the store unhealthy until it
    /// is reopened. Returns `e` as the store's error.
    pub fn fault(&self, e: sled::Error) -> StoreError {
        if matches!(e, sled::Error::Io(_)) {
            let mut fault = self.fault.lock().unwrap_or_else(PoisonError::into_inner);
            if fault.is_none() {
                tracing::error!("store: a write failed ({e}); writes are refused until it can be reopened");
            }
            *fault = Some(e.to_string());
        }
        StoreError::Sled(e)
    }

    pub fn health(&self) -> StoreHealth {
        let problem = self.fault.lock().unwrap_or_else(PoisonError::into_inner).clone();
        StoreHealth { ok: problem.is_none(), problem, reopened: self.generation.load(Ordering::Relaxed) }
    }

    /// Times the database was reopened after a fault.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Relaxed)
    }

    /// Whether a write of the size sled's files have now could succeed: a byte written at that
    /// offset of a sparse probe file (a file-size limit refuses it, a full disk too).
    fn probe(&self) -> bool {
        use std::io::{Seek, Write};
        let largest = std::fs::read_dir(&self.path)
            .map(|d| d.flatten().filter_map(|e| e.metadata().ok()).map(|m| m.len()).max().unwrap_or(0))
            .unwrap_or(0);
        let probe = self.path.with_extension("probe");
        let wrote = std::fs::File::create(&probe)
            .and_then(|mut f| {
                f.seek(std::io::SeekFrom::Start(largest + 64 * 1024))?;
                f.write_all(&[0])?;
                f.sync_all()
            })
            .is_ok();
        let _ = std::fs::remove_file(&probe);
        wrote
    }

    /// One check: a healthy store's pending writes are flushed (which is how a fault that no
    /// write of ours saw yet shows); a failing store is reopened once the probe passes.
    /// Blocking.
    pub fn check(&self) {
        if self.health().ok {
            if let Ok(db) = self.db()
                && let Err(e) = db.flush()
            {
                self.fault(e);
            }
            return;
        }
        if !self.probe() {
            return;
        }
        let _w = self.write.lock().unwrap_or_else(PoisonError::into_inner);
        let old = self.db.write().unwrap_or_else(PoisonError::into_inner).take();
        drop(old);
        // Operations already under way finish with their own handles; sled lets its lock go
        // with the last one.
        let dir = self.path.parent().unwrap_or(Path::new("."));
        if !Store::wait_closed(dir, Duration::from_secs(5)) {
            tracing::warn!("store: still held 5 s after its reopen began; trying anyway");
        }
        match open_db(&self.path) {
            Ok(db) => {
                *self.db.write().unwrap_or_else(PoisonError::into_inner) = Some(db);
                self.generation.fetch_add(1, Ordering::Relaxed);
                *self.fault.lock().unwrap_or_else(PoisonError::into_inner) = None;
                tracing::info!("store: reopened; writes succeed again");
            }
            Err(e) => tracing::error!("store: reopening failed ({e}); trying again"),
        }
    }

    pub fn robot(&self, robot_id: &str) -> Result<Option<RobotRecord>, StoreError> {
        self.get(&robot_key(robot_id))
    }

    pub fn key(&self, key_id: &str) -> Result<Option<KeyRecord>, StoreError> {
        self.get(&key_key(key_id))
    }

    pub fn robots(&self) -> Result<Vec<RobotRecord>, StoreError> {
        self.tree("robots")?
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
            retire(&mut batch, old);
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
            retire(&mut batch, &old);
        }
        robot.key_created_unix_ms = None;
        robot.revoked_unix_ms = Some(now_ms);
        batch.insert(robot_key(robot_id).as_bytes(), encode(&robot));
        self.commit(batch)?;
        Ok(WriteOutcome::Done(robot))
    }

    /// Whether `key_id` was a key once and was rotated away or revoked: it never works again.
    pub fn retired(&self, key_id: &str) -> Result<bool, StoreError> {
        Ok(self.tree("robots")?.contains_key(retired_key(key_id).as_bytes())?)
    }

    /// Marks a robot declared in the robots file as no longer declared (the file was dropped
    /// from the configuration): the admin API manages it from now on.
    pub fn undeclare(&self, robot_id: &str) -> Result<(), StoreError> {
        let _w = self.write.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(mut robot) = self.robot(robot_id)? else { return Ok(()) };
        robot.declared = false;
        let mut batch = sled::Batch::default();
        batch.insert(robot_key(robot_id).as_bytes(), encode(&robot));
        self.commit(batch)
    }

    /// Writes a robot declared in the robots file with its key, replacing whatever key it had
    /// (and reviving it if it was revoked); keeps the record's first registration time.
    pub fn declare(&self, mut robot: RobotRecord, key_id: &str, key: KeyRecord) -> Result<(), StoreError> {
        let _w = self.write.lock().unwrap_or_else(PoisonError::into_inner);
        let mut batch = sled::Batch::default();
        if let Some(existing) = self.robot(&robot.robot_id)? {
            if let Some(old) = existing.key_id.filter(|old| old != key_id) {
                retire(&mut batch, &old);
            }
            if existing.revoked_unix_ms.is_none() {
                robot.created_unix_ms = existing.created_unix_ms;
            }
        }
        batch.insert(robot_key(&robot.robot_id).as_bytes(), encode(&robot));
        batch.insert(key_key(key_id).as_bytes(), encode(&key));
        self.commit(batch)
    }

    fn commit(&self, batch: sled::Batch) -> Result<(), StoreError> {
        let db = self.db()?;
        db.open_tree("robots")?.apply_batch(batch).map_err(|e| self.fault(e))?;
        db.flush().map_err(|e| self.fault(e))?;
        Ok(())
    }

    fn get<T: for<'de> Deserialize<'de>>(&self, key: &str) -> Result<Option<T>, StoreError> {
        self.tree("robots")?.get(key.as_bytes())?.map(|v| decode(key, &v)).transpose()
    }
}

fn robot_key(robot_id: &str) -> String {
    format!("robot/{robot_id}")
}

fn key_key(key_id: &str) -> String {
    format!("key/{key_id}")
}

fn retired_key(key_id: &str) -> String {
    format!("retired/{key_id}")
}

/// Deletes a key and remembers its id, so that no robots file can bring it back.
fn retire(batch: &mut sled::Batch, key_id: &str) {
    batch.remove(key_key(key_id).as_bytes());
    batch.insert(retired_key(key_id).as_bytes(), b"".as_slice());
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    // Plain structs of strings and numbers always serialise.
    serde_json::to_vec(value).unwrap_or_default()
}

fn decode<T: for<'de> Deserialize<'de>>(key: &str, bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt { key: key.into(), problem: e.to_string() })
}

/// Checks the store every `interval` (see [`Store::check`]) until it is dropped: holds it
/// only while checking, so it never keeps the database open.
pub fn watch(store: &Arc<Store>, interval: Duration) -> std::io::Result<()> {
    let store: Weak<Store> = Arc::downgrade(store);
    std::thread::Builder::new().name("store-watch".into()).spawn(move || {
        loop {
            std::thread::sleep(interval);
            let Some(store) = store.upgrade() else { return };
            store.check();
        }
    })?;
    Ok(())
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
        let late = store.db().unwrap();
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
            declared: false,
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
