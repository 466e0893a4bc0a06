//! The robot registry's operations: registering, rotating and revoking robots (each robot's API
//! key is answered once and kept only as a salted hash, in [`crate::store`]), checking a
//! presented key, the admin and metrics token files, and the demo robot of a first start.
//!
//! Robot keys look like `vlak_<key id>_<secret>`. Only `SHA-256(salt ‖ secret)` is stored; the
//! secret carries 256 random bits, so a fast hash is enough (a slow password hash would only
//! add latency to every robot request). [`verify_key`] does the same work whether or not the
//! key exists: an unknown key id is hashed against a dummy record, so neither the answer nor
//! its timing tells whether a key or a robot exists.
//!
//! Store writes flush to disk: callers on an async runtime run these on the blocking pool.

use std::path::{Path, PathBuf};

use base64::Engine;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use vla_api::{Priority, RegisterRobot, Robot, RobotKey};

use crate::clock::now_ms;
use crate::store::{KeyRecord, RobotRecord, Store, StoreError, WriteOutcome};

const KEY_PREFIX: &str = "vlak_";
const TOKEN_PREFIX: &str = "vlaadm_";
const KEY_ID_HEX: usize = 16;

/// The robot registered on a first start with the embedded defaults.
pub const DEMO_ROBOT: &str = "demo-arm";
/// Where the demo robot's key is written, under `data.dir`.
pub const DEMO_KEY_FILE: &str = "demo-robot.key";

/// Why a registry operation did not happen.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("field `{field}`: {problem}")]
    InvalidName { field: &'static str, problem: String },
    #[error("robot `{0}` is not registered")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    Random(String),
    #[error("token file {}: {problem}", path.display())]
    TokenFile { path: PathBuf, problem: String },
    #[error("demo robot: {0}")]
    Demo(String),
}

/// A freshly issued API key: the full key (shown once) and what is stored of it.
#[derive(Debug)]
pub struct IssuedKey {
    pub api_key: String,
    pub key_id: String,
    pub record: KeyRecord,
}

/// A robot as the admin API shows it (never key material).
pub fn view(r: &RobotRecord) -> Robot {
    Robot {
        robot_id: r.robot_id.clone(),
        robot_type: r.robot_type.clone(),
        group: r.group.clone(),
        priority: r.priority,
        created_unix_ms: r.created_unix_ms,
        key_created_unix_ms: r.key_created_unix_ms,
        revoked_unix_ms: r.revoked_unix_ms,
    }
}

fn check_name(field: &'static str, value: &str) -> Result<(), RegistryError> {
    crate::names::check_name(value).map_err(|problem| RegistryError::InvalidName { field, problem })
}

/// Registers `request`; the new key is returned once.
pub fn register(store: &Store, request: &RegisterRobot) -> Result<RobotKey, RegistryError> {
    check_name("robot_id", &request.robot_id)?;
    check_name("robot_type", &request.robot_type)?;
    check_name("group", &request.group)?;
    let key = issue_key(&request.robot_id)?;
    let now = now_ms();
    let record = RobotRecord {
        robot_id: request.robot_id.clone(),
        robot_type: request.robot_type.clone(),
        group: request.group.clone(),
        priority: request.priority,
        created_unix_ms: now,
        key_id: Some(key.key_id.clone()),
        key_created_unix_ms: Some(now),
        revoked_unix_ms: None,
    };
    written(store.register(record.clone(), &key.key_id, key.record), &record.robot_id)?;
    tracing::info!(robot_id = %record.robot_id, robot_type = %record.robot_type, "robot registered");
    Ok(RobotKey { robot: view(&record), api_key: key.api_key })
}

/// Gives `robot_id` a new key; the old one stops working at once.
pub fn rotate(store: &Store, data_dir: &Path, robot_id: &str) -> Result<RobotKey, RegistryError> {
    let key = issue_key(robot_id)?;
    let robot = written(store.rotate(robot_id, &key.key_id, key.record, now_ms()), robot_id)?;
    tracing::info!(robot_id = %robot_id, "robot key rotated");
    forget_demo_key(data_dir, robot_id);
    Ok(RobotKey { robot: view(&robot), api_key: key.api_key })
}

/// Revokes `robot_id`: its next request is refused.
pub fn revoke(store: &Store, data_dir: &Path, robot_id: &str) -> Result<Robot, RegistryError> {
    let robot = written(store.revoke(robot_id, now_ms()), robot_id)?;
    tracing::info!(robot_id = %robot_id, "robot revoked");
    forget_demo_key(data_dir, robot_id);
    Ok(view(&robot))
}

/// A store write's outcome as a registry answer.
fn written<T>(outcome: Result<WriteOutcome<T>, StoreError>, robot_id: &str) -> Result<T, RegistryError> {
    match outcome? {
        WriteOutcome::Done(value) => Ok(value),
        WriteOutcome::NotFound => Err(RegistryError::NotFound(crate::names::clip(robot_id, 80))),
        WriteOutcome::Conflict(why) => Err(RegistryError::Conflict(why)),
    }
}

/// The demo key file must not outlive the key in it.
fn forget_demo_key(data_dir: &Path, robot_id: &str) {
    if robot_id == DEMO_ROBOT {
        let _ = std::fs::remove_file(data_dir.join(DEMO_KEY_FILE));
    }
}

/// On a first start (no robot ever registered), registers [`DEMO_ROBOT`] and writes its key
/// to `<data_dir>/demo-robot.key` (mode 0600). Returns the key file when it did.
pub fn register_demo_robot(store: &Store, data_dir: &Path) -> Result<Option<PathBuf>, RegistryError> {
    if !store.robots()?.is_empty() {
        return Ok(None);
    }
    let request = RegisterRobot {
        robot_id: DEMO_ROBOT.into(),
        robot_type: "demo".into(),
        group: "demo".into(),
        priority: Priority::Normal,
    };
    let key = register(store, &request)?;
    let path = data_dir.join(DEMO_KEY_FILE);
    let write = || -> std::io::Result<()> {
        use std::os::unix::fs::OpenOptionsExt;
        // A file left from before keeps its mode when rewritten: replace it instead.
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&path)?;
        std::io::Write::write_all(&mut f, format!("{}\n", key.api_key).as_bytes())
    };
    write().map_err(|e| RegistryError::Demo(format!("{}: {e}", path.display())))?;
    Ok(Some(path))
}

/// The robot whose key `token` is, if it is one: always hashes once, found or not.
pub fn verify_key(store: &Store, token: &str) -> Result<Option<RobotRecord>, StoreError> {
    let (key_id, secret) = split_key(token).unwrap_or(("", token));
    let stored = if key_id.is_empty() { None } else { store.key(key_id)? };
    let (salt, expected) = match &stored {
        Some(k) => (k.salt, k.hash),
        None => ([0u8; 16], [0xffu8; 32]),
    };
    let matches = bool::from(hash_secret(&salt, secret).ct_eq(&expected));
    let Some(key) = stored.filter(|_| matches) else { return Ok(None) };
    let robot = store.robot(&key.robot_id)?;
    Ok(robot.filter(|r| r.revoked_unix_ms.is_none() && r.key_id.as_deref() == Some(key_id)))
}

/// `vlak_<16 hex>_<secret>` → (key id, secret).
fn split_key(key: &str) -> Option<(&str, &str)> {
    let rest = key.strip_prefix(KEY_PREFIX)?;
    let (id, secret) = (rest.get(..KEY_ID_HEX)?, rest.get(KEY_ID_HEX..)?.strip_prefix('_')?);
    (id.bytes().all(|b| b.is_ascii_hexdigit()) && !secret.is_empty()).then_some((id, secret))
}

fn hash_secret(salt: &[u8; 16], secret: &str) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(salt);
    h.update(secret.as_bytes());
    h.finalize().into()
}

fn random<const N: usize>() -> Result<[u8; N], RegistryError> {
    let mut bytes = [0u8; N];
    getrandom::getrandom(&mut bytes).map_err(|e| RegistryError::Random(format!("no system randomness: {e}")))?;
    Ok(bytes)
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// A new key for `robot_id`: 64 random bits of id, 256 of secret, 128 of salt.
pub fn issue_key(robot_id: &str) -> Result<IssuedKey, RegistryError> {
    let key_id = crate::store::hex(&random::<8>()?);
    let secret = b64(&random::<32>()?);
    let salt = random::<16>()?;
    let hash = hash_secret(&salt, &secret);
    Ok(IssuedKey {
        api_key: format!("{KEY_PREFIX}{key_id}_{secret}"),
        key_id,
        record: KeyRecord { robot_id: robot_id.into(), salt, hash },
    })
}

/// Reads a bearer token (the admin or metrics token) from `path`, generating it (mode 0600) on
/// first start. Refuses a file others can read, or a token too short to be a secret. Returns
/// the token's SHA-256 (all that is kept in memory) and whether it was generated now.
pub fn token_file(path: &Path) -> Result<([u8; 32], bool), RegistryError> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let err = |problem: String| RegistryError::TokenFile { path: path.into(), problem };
    let generated = !path.exists();
    if generated {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| err(e.to_string()))?;
        }
        let token = format!("{TOKEN_PREFIX}{}", b64(&random::<32>()?));
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| err(e.to_string()))?;
        std::io::Write::write_all(&mut file, format!("{token}\n").as_bytes()).map_err(|e| err(e.to_string()))?;
    }
    let meta = std::fs::metadata(path).map_err(|e| err(e.to_string()))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(err(format!("is readable by others (mode {mode:o}); `chmod 600` it")));
    }
    let token = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    let token = token.trim();
    if token.len() < 32 {
        return Err(err("the token must be at least 32 characters".into()));
    }
    Ok((Sha256::digest(token.as_bytes()).into(), generated))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn issued_keys_verify_only_with_their_own_secret() {
        let issued = issue_key("arm-1").unwrap();
        let (id, secret) = split_key(&issued.api_key).unwrap();
        assert_eq!(id, issued.key_id);
        assert_eq!(hash_secret(&issued.record.salt, secret), issued.record.hash);
        assert_ne!(hash_secret(&issued.record.salt, "other"), issued.record.hash);
        // What is stored holds no trace of the secret.
        let stored = serde_json::to_string(&issued.record).unwrap();
        assert!(!stored.contains(secret), "{stored}");
    }

    #[test]
    fn malformed_keys_do_not_split() {
        assert_eq!(split_key("vlak_0123456789abcdef_s3cret"), Some(("0123456789abcdef", "s3cret")));
        assert_eq!(split_key("vlak_0123456789abcdef_"), None);
        assert_eq!(split_key("vlak_0123456789abcdeg_x"), None);
        assert_eq!(split_key("vlak_short"), None);
        assert_eq!(split_key("bearer-token"), None);
        assert_eq!(split_key("vlak_é123456789abcdef_x"), None);
    }

    #[test]
    fn the_admin_token_is_generated_private_and_refused_when_world_readable() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("admin.token");
        let (hash, generated) = token_file(&path).unwrap();
        assert!(generated);
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(token_file(&path).unwrap(), (hash, false));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(token_file(&path).unwrap_err().to_string().contains("chmod 600"));
    }

    #[test]
    fn a_key_verifies_as_its_robot_until_rotated() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let request = RegisterRobot {
            robot_id: "arm-1".into(),
            robot_type: "ur5e".into(),
            group: "cell".into(),
            priority: Priority::Normal,
        };
        let key = register(&store, &request).unwrap();
        assert_eq!(verify_key(&store, &key.api_key).unwrap().unwrap().robot_id, "arm-1");
        assert!(verify_key(&store, "vlak_0123456789abcdef_nope").unwrap().is_none());
        rotate(&store, dir.path(), "arm-1").unwrap();
        assert!(verify_key(&store, &key.api_key).unwrap().is_none());
        assert!(matches!(register(&store, &request), Err(RegistryError::Conflict(_))));
    }
}
