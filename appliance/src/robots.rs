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
//! Robots can also be declared in a file (`auth.robots_file`, [`read_robots_file`] and
//! [`declare`]): ids, types and key hashes, applied at start, for a fleet provisioned by
//! GitOps. The file holds only hashes (`appliance robot-key` makes a key and its line); only
//! the file changes a robot declared in it, but the admin API may still revoke one at once (a
//! robot compromised). A key rotated away or revoked is retired for good: no robots file can
//! bring it back, under its robot or another.
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
    #[error("robots file {}: {problem}", path.display())]
    RobotsFile { path: PathBuf, problem: String },
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
        declared: r.declared,
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
        declared: false,
    };
    written(store.register(record.clone(), &key.key_id, key.record), &record.robot_id)?;
    tracing::info!(robot_id = %record.robot_id, robot_type = %record.robot_type, "robot registered");
    Ok(RobotKey { robot: view(&record), api_key: key.api_key })
}

/// Gives `robot_id` a new key; the old one stops working at once.
pub fn rotate(store: &Store, data_dir: &Path, robot_id: &str) -> Result<RobotKey, RegistryError> {
    not_declared(store, robot_id)?;
    let key = issue_key(robot_id)?;
    let robot = written(store.rotate(robot_id, &key.key_id, key.record, now_ms()), robot_id)?;
    tracing::info!(robot_id = %robot_id, "robot key rotated");
    forget_demo_key(data_dir, robot_id);
    Ok(RobotKey { robot: view(&robot), api_key: key.api_key })
}

/// Revokes `robot_id`: its next request is refused. Declared robots too (an emergency): the
/// file can give it back only with a new key.
pub fn revoke(store: &Store, data_dir: &Path, robot_id: &str) -> Result<Robot, RegistryError> {
    let robot = written(store.revoke(robot_id, now_ms()), robot_id)?;
    tracing::info!(robot_id = %robot_id, "robot revoked");
    forget_demo_key(data_dir, robot_id);
    Ok(view(&robot))
}

/// The admin API leaves declared robots' keys to the robots file.
fn not_declared(store: &Store, robot_id: &str) -> Result<(), RegistryError> {
    match store.robot(robot_id)? {
        Some(r) if r.declared && r.revoked_unix_ms.is_none() => Err(RegistryError::Conflict(format!(
            "robot `{robot_id}` is declared in the robots file (auth.robots_file): give it a new key there"
        ))),
        _ => Ok(()),
    }
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

/// One robot of the robots file:
///
/// ```toml
/// [[robot]]
/// id = "arm-1"
/// type = "ur5e"
/// group = "cell-07"        # "default" when absent
/// priority = "normal"      # high | normal | low
/// key_hash = "sha256:<key id>:<salt>:<hash>"   # `appliance robot-key arm-1` prints it
/// ```
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeclaredRobot {
    pub id: String,
    #[serde(rename = "type")]
    pub robot_type: String,
    #[serde(default = "default_group")]
    pub group: String,
    #[serde(default)]
    pub priority: Priority,
    pub key_hash: String,
}

fn default_group() -> String {
    "default".into()
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RobotsFile {
    #[serde(default)]
    robot: Vec<DeclaredRobot>,
}

/// What applying the robots file did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Declared {
    pub added: usize,
    pub updated: usize,
    pub unchanged: usize,
    pub revoked: usize,
    /// Entries whose key was retired (rotated away or revoked): left revoked, logged.
    pub refused: usize,
}

const KEY_HASH_PREFIX: &str = "sha256:";

/// The robots file's line for an issued key: `sha256:<key id>:<salt hex>:<hash hex>`.
pub fn key_hash(key: &IssuedKey) -> String {
    let (salt, hash) = (crate::store::hex(&key.record.salt), crate::store::hex(&key.record.hash));
    format!("{KEY_HASH_PREFIX}{}:{salt}:{hash}", key.key_id)
}

fn parse_key_hash(robot_id: &str, line: &str) -> Option<(String, KeyRecord)> {
    let mut parts = line.strip_prefix(KEY_HASH_PREFIX)?.split(':');
    let (id, salt, hash) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || id.len() != KEY_ID_HEX || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let key = KeyRecord { robot_id: robot_id.into(), salt: unhex(salt)?, hash: unhex(hash)? };
    // An all-zero salt or hash is a placeholder, not a key anyone made.
    if key.salt == [0; 16] || key.hash == [0; 32] {
        return None;
    }
    Some((id.to_ascii_lowercase(), key))
}

fn unhex<const N: usize>(s: &str) -> Option<[u8; N]> {
    if s.len() != 2 * N {
        return None;
    }
    let mut out = [0u8; N];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// A new key for a declared robot and the robots file's entry for it, which holds only the
/// key's hash: `(key, entry)`. The key goes to the robot and nowhere else.
pub fn declared_entry(
    robot_id: &str,
    robot_type: &str,
    group: &str,
    priority: Priority,
) -> Result<(String, String), RegistryError> {
    check_name("robot_id", robot_id)?;
    check_name("robot_type", robot_type)?;
    check_name("group", group)?;
    let key = issue_key(robot_id)?;
    let priority = match priority {
        Priority::High => "high",
        Priority::Normal => "normal",
        Priority::Low => "low",
    };
    let entry = format!(
        "[[robot]]\nid = \"{robot_id}\"\ntype = \"{robot_type}\"\ngroup = \"{group}\"\npriority = \"{priority}\"\n\
         key_hash = \"{}\"\n",
        key_hash(&key)
    );
    Ok((key.api_key, entry))
}

/// Reads and checks the robots file: every entry's names and key hash, no id or key twice.
pub fn read_robots_file(path: &Path) -> Result<Vec<DeclaredRobot>, RegistryError> {
    let err = |problem: String| RegistryError::RobotsFile { path: path.into(), problem };
    let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    let file: RobotsFile = toml::from_str(&text).map_err(|e| err(e.to_string()))?;
    let mut ids = std::collections::HashSet::new();
    let mut keys = std::collections::HashSet::new();
    for (i, r) in file.robot.iter().enumerate() {
        let at = |field: &str| format!("robot[{i}].{field} (`{}`)", crate::names::clip(&r.id, 80));
        for (field, value) in [("id", &r.id), ("type", &r.robot_type), ("group", &r.group)] {
            crate::names::check_name(value).map_err(|problem| err(format!("{}: {problem}", at(field))))?;
        }
        let Some((key_id, _)) = parse_key_hash(&r.id, &r.key_hash) else {
            return Err(err(format!(
                "{}: expected `sha256:<16 hex>:<32 hex>:<64 hex>`, as `appliance robot-key` prints it",
                at("key_hash")
            )));
        };
        if !ids.insert(r.id.clone()) {
            return Err(err(format!("{}: declared twice", at("id"))));
        }
        if !keys.insert(key_id) {
            return Err(err(format!("{}: the same key as another robot", at("key_hash"))));
        }
    }
    Ok(file.robot)
}

/// Makes the registry hold `robots` as declared: adds the new ones, gives changed ones their
/// declared type, group, priority and key (the old key stops working), and revokes robots
/// declared before that are no longer there. Robots registered through the admin API are left
/// alone unless the file names them, in which case the file takes them over.
pub fn declare(store: &Store, robots: &[DeclaredRobot]) -> Result<Declared, RegistryError> {
    let existing = store.robots()?;
    let now = now_ms();
    let mut done = Declared::default();
    // Dropped robots first: their keys are retired before any entry is looked at.
    for r in existing.iter().filter(|r| r.declared && r.revoked_unix_ms.is_none()) {
        if !robots.iter().any(|d| d.id == r.robot_id) {
            written(store.revoke(&r.robot_id, now), &r.robot_id)?;
            tracing::info!(robot_id = %r.robot_id, "robot revoked: no longer in the robots file");
            done.revoked += 1;
        }
    }
    for d in robots {
        let Some((key_id, key)) = parse_key_hash(&d.id, &d.key_hash) else {
            return Err(RegistryError::Conflict(format!("robot `{}`: malformed key hash", d.id)));
        };
        if store.retired(&key_id)? {
            tracing::warn!(
                robot_id = %d.id,
                "the robots file gives this robot a key that was rotated away or revoked: it stays without one; \
                 make it a new key (`appliance robot-key`)"
            );
            done.refused += 1;
            continue;
        }
        if let Some(other) = store.key(&key_id)?
            && other.robot_id != d.id
        {
            return Err(RegistryError::Conflict(format!(
                "robot `{}`: its key is robot `{}`'s; make it a key of its own (`appliance robot-key`)",
                d.id, other.robot_id
            )));
        }
        let live = existing.iter().find(|r| r.robot_id == d.id && r.revoked_unix_ms.is_none());
        let same_key = live.is_some_and(|r| r.key_id.as_deref() == Some(key_id.as_str()));
        let record = RobotRecord {
            robot_id: d.id.clone(),
            robot_type: d.robot_type.clone(),
            group: d.group.clone(),
            priority: d.priority,
            created_unix_ms: now,
            key_id: Some(key_id.clone()),
            key_created_unix_ms: if same_key { live.and_then(|r| r.key_created_unix_ms) } else { Some(now) },
            revoked_unix_ms: None,
            declared: true,
        };
        match live {
            Some(r) if same_key && store.key(&key_id)?.as_ref() == Some(&key) => {
                let same = RobotRecord { created_unix_ms: r.created_unix_ms, ..record.clone() };
                if *r == same {
                    done.unchanged += 1;
                    continue;
                }
                done.updated += 1;
            }
            Some(_) => done.updated += 1,
            None => done.added += 1,
        }
        store.declare(record, &key_id, key)?;
        tracing::info!(robot_id = %d.id, robot_type = %d.robot_type, "robot declared in the robots file");
    }
    Ok(done)
}

/// With no robots file configured, robots declared by an earlier one are the admin API's.
pub fn undeclare_all(store: &Store) -> Result<usize, RegistryError> {
    let declared: Vec<RobotRecord> = store.robots()?.into_iter().filter(|r| r.declared).collect();
    for r in &declared {
        store.undeclare(&r.robot_id)?;
    }
    Ok(declared.len())
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

/// Reads a bearer token (the admin or metrics token) from `path`, generating it with `mode` on
/// first start (0600; 0640 for the metrics token, which the cell's Prometheus reads as a member
/// of the appliance's group). Refuses a file anyone but its owner and group can read, one its
/// group may write, or a token too short to be a secret. Returns the token's SHA-256 (all that
/// is kept in memory) and whether it was generated now.
pub fn token_file(path: &Path, mode: u32) -> Result<([u8; 32], bool), RegistryError> {
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
            .mode(mode)
            .open(path)
            .map_err(|e| err(e.to_string()))?;
        // Whatever the umask took away from `mode`.
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(|e| err(e.to_string()))?;
        std::io::Write::write_all(&mut file, format!("{token}\n").as_bytes()).map_err(|e| err(e.to_string()))?;
    }
    let meta = std::fs::metadata(path).map_err(|e| err(e.to_string()))?;
    let found = meta.permissions().mode() & 0o777;
    if found & 0o027 != 0 {
        return Err(err(format!(
            "is readable by others or writable by its group (mode {found:o}); `chmod 600` it (640 to share it with its group)"
        )));
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
        let (hash, generated) = token_file(&path, 0o600).unwrap();
        assert!(generated);
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(token_file(&path, 0o600).unwrap(), (hash, false));
        // Its group may read it (the cell's Prometheus, for the metrics token)...
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        assert_eq!(token_file(&path, 0o600).unwrap(), (hash, false));
        // ...but neither write it nor let anyone else read it.
        for mode in [0o644, 0o660, 0o604] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            assert!(token_file(&path, 0o600).unwrap_err().to_string().contains("chmod 600"), "{mode:o}");
        }
        let shared = dir.path().join("metrics.token");
        token_file(&shared, 0o640).unwrap();
        assert_eq!(std::fs::metadata(&shared).unwrap().permissions().mode() & 0o777, 0o640);
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

    fn declared(id: &str, key: &IssuedKey) -> DeclaredRobot {
        DeclaredRobot {
            id: id.into(),
            robot_type: "ur5e".into(),
            group: "cell-07".into(),
            priority: Priority::Normal,
            key_hash: key_hash(key),
        }
    }

    #[test]
    fn the_robots_file_adds_updates_and_revokes_and_only_it_changes_its_robots() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let (k1, k2) = (issue_key("arm-1").unwrap(), issue_key("arm-2").unwrap());
        // arm-2 was registered through the admin API before the file named it.
        let api = RegisterRobot {
            robot_id: "arm-2".into(),
            robot_type: "old".into(),
            group: "default".into(),
            priority: Priority::Low,
        };
        let api_key = register(&store, &api).unwrap().api_key;
        let file = vec![declared("arm-1", &k1), declared("arm-2", &k2)];
        assert_eq!(declare(&store, &file).unwrap(), Declared { added: 1, updated: 1, ..Declared::default() });
        assert_eq!(verify_key(&store, &k1.api_key).unwrap().unwrap().robot_id, "arm-1");
        let arm2 = verify_key(&store, &k2.api_key).unwrap().unwrap();
        assert_eq!((arm2.robot_type.as_str(), arm2.declared), ("ur5e", true));
        assert!(verify_key(&store, &api_key).unwrap().is_none(), "the file's key replaces the API's");
        // Applied again (a restart): nothing changes.
        assert_eq!(declare(&store, &file).unwrap(), Declared { unchanged: 2, ..Declared::default() });
        // The admin API leaves declared robots' keys to the file.
        let refused = rotate(&store, dir.path(), "arm-1");
        assert!(matches!(&refused, Err(RegistryError::Conflict(why)) if why.contains("robots file")), "{refused:?}");
        // A new key in the file: the old one stops working. arm-2 dropped from it: revoked.
        let k1b = issue_key("arm-1").unwrap();
        let done = declare(&store, &[declared("arm-1", &k1b)]).unwrap();
        assert_eq!(done, Declared { updated: 1, revoked: 1, ..Declared::default() });
        assert!(verify_key(&store, &k1.api_key).unwrap().is_none());
        assert!(verify_key(&store, &k1b.api_key).unwrap().is_some());
        assert!(verify_key(&store, &k2.api_key).unwrap().is_none());
        // Its retired key never comes back (a `git revert`, a copied line): only a new one.
        let done = declare(&store, &[declared("arm-1", &k1b), declared("arm-2", &k2)]).unwrap();
        assert_eq!(done, Declared { unchanged: 1, refused: 1, ..Declared::default() });
        assert!(verify_key(&store, &k2.api_key).unwrap().is_none());
        let k2b = issue_key("arm-2").unwrap();
        declare(&store, &[declared("arm-1", &k1b), declared("arm-2", &k2b)]).unwrap();
        assert!(verify_key(&store, &k2b.api_key).unwrap().is_some());
        // Nor under another robot.
        let done =
            declare(&store, &[declared("arm-1", &k1b), declared("arm-2", &k2b), declared("arm-3", &k1)]).unwrap();
        assert_eq!(done.refused, 1);
        // The admin API may revoke a declared robot at once (compromised): the file cannot undo it.
        revoke(&store, dir.path(), "arm-2").unwrap();
        assert!(verify_key(&store, &k2b.api_key).unwrap().is_none());
        let done = declare(&store, &[declared("arm-1", &k1b), declared("arm-2", &k2b)]).unwrap();
        assert_eq!((done.refused, done.unchanged), (1, 1));
        assert!(verify_key(&store, &k2b.api_key).unwrap().is_none());
        // One live key for two robots is refused.
        let stolen = [declared("arm-1", &k1b), declared("arm-3", &k1b)];
        assert!(matches!(declare(&store, &stolen), Err(RegistryError::Conflict(why)) if why.contains("arm-1")));
        // Without a robots file, its robots are the admin API's.
        assert_eq!(undeclare_all(&store).unwrap(), 2);
        assert!(rotate(&store, dir.path(), "arm-1").is_ok());
    }

    #[test]
    fn a_bad_robots_file_is_refused_naming_the_entry_and_field() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("robots.toml");
        let (key, toml) = declared_entry("arm-1", "ur5e", "cell-07", Priority::High).unwrap();
        let (key, toml) = (key.as_str(), toml.as_str());
        assert!(!toml.contains(split_key(key).unwrap().1), "the file holds no secret: {toml}");
        std::fs::write(&path, toml).unwrap();
        let robots = read_robots_file(&path).unwrap();
        assert_eq!((robots[0].id.as_str(), robots[0].priority), ("arm-1", Priority::High));
        let store = Store::open(dir.path()).unwrap();
        declare(&store, &robots).unwrap();
        assert_eq!(verify_key(&store, key).unwrap().unwrap().robot_id, "arm-1");

        for (text, expected) in [
            (format!("{toml}{toml}"), "robot[1].id (`arm-1`): declared twice"),
            (toml.replace("id = \"arm-1\"", "id = \"arm 1\""), "robot[0].id (`arm 1`)"),
            (toml.replace("key_hash = \"sha256:", "key_hash = \"md5:"), "robot[0].key_hash (`arm-1`): expected"),
            (
                format!(
                    "{}key_hash = \"sha256:0000000000000000:00000000000000000000000000000000:0000000000000000000000000000000000000000000000000000000000000000\"\n",
                    toml.split("key_hash").next().unwrap()
                ),
                "robot[0].key_hash (`arm-1`): expected",
            ),
            (toml.replace("[[robot]]", "[[robot]]\nkey = \"x\""), "unknown field `key`"),
            (toml.replace("type = ", "kind = "), "unknown field `kind`"),
        ] {
            std::fs::write(&path, text).unwrap();
            let e = read_robots_file(&path).unwrap_err().to_string();
            assert!(e.contains(expected) && e.contains("robots.toml"), "{expected}: {e}");
        }
    }
}
