//! The quota store: every bucket in memory, charged under striped locks, written to sled by
//! one flusher thread (see the folder's header in `mod.rs` for the design).

use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock, Weak};
use std::time::Duration;

use tokio::sync::watch;

use super::bucket::{self, Bucket, Scope, State, Status};
use super::config::QuotaConfig;
use super::limits::{Durability, Limits, decode_limits, encode_limits};
use crate::store::{Store, StoreError};

/// Mutexes serialising charges; a scope's key picks one.
pub const STRIPES: usize = 64;

/// Why the quota store cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum QuotaError {
    #[error("quota store: {0}")]
    Sled(#[from] sled::Error),
    #[error(
        "quota store: record `{key}` in tree `{tree}` is unreadable ({problem}). The appliance will not \
         start on quota state it cannot trust. Recover with `appliance quota export` (what can be read) and \
         `appliance quota import`, or `appliance quota reset` (forgets all usage; limits set through the \
         admin API are kept with `--keep-limits`); see README.md, Quotas"
    )]
    Corrupt { tree: &'static str, key: String, problem: String },
    #[error("quota state could not be written to disk: {0}")]
    NotDurable(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What the flusher publishes: every write up to `seq` is on disk; `error` while flushing fails.
#[derive(Debug, Clone, Default)]
struct Durable {
    seq: u64,
    error: Option<Arc<str>>,
}

/// One stripe of the in-memory state: the buckets whose keys hash here, and those changed
/// since the flusher last took them (`None`: removed).
#[derive(Debug, Default)]
struct Stripe {
    states: HashMap<Vec<u8>, State>,
    dirty: HashMap<Vec<u8>, Option<State>>,
}

/// What the flusher thread shares with the store, held weakly by the thread so that dropping
/// the store closes the database.
#[derive(Debug)]
struct Shared {
    /// Trees are asked of it for each flush, never kept (see [`crate::store`], faults).
    store: Arc<Store>,
    stripes: Vec<Mutex<Stripe>>,
    /// Sequence number of the last change made in memory.
    written: AtomicU64,
    durable: watch::Sender<Durable>,
    flushes: AtomicU64,
    /// `vla_store_flush_duration_seconds`, once the appliance's metrics are attached.
    flush_duration: std::sync::OnceLock<prometheus::Histogram>,
}

impl Shared {
    /// Writes every dirty bucket in one sled batch and flushes the database (one fsync);
    /// returns the sequence number now durable. `retry` holds a failed batch's changes, which
    /// go first so that newer ones win.
    fn flush(&self, retry: &mut Vec<(Vec<u8>, Option<State>)>) -> Result<u64, QuotaError> {
        // Every change numbered up to `target` was made in its stripe, under the stripe's lock,
        // before it was numbered: taking each stripe's dirty set after this load sees it.
        let target = self.written.load(Ordering::Acquire);
        for stripe in &self.stripes {
            let dirty = std::mem::take(&mut stripe.lock().unwrap_or_else(PoisonError::into_inner).dirty);
            retry.extend(dirty);
        }
        let mut batch = sled::Batch::default();
        for (k, v) in retry.iter() {
            match v {
                Some(state) => batch.insert(k.as_slice(), state.encode()),
                None => batch.remove(k.as_slice()),
            }
        }
        let started = std::time::Instant::now();
        let db = self.store.db()?;
        db.open_tree("quota_state")?.apply_batch(batch).map_err(|e| self.store.fault(e))?;
        db.flush().map_err(|e| self.store.fault(e))?;
        retry.clear();
        self.flushes.fetch_add(1, Ordering::Relaxed);
        if let Some(h) = self.flush_duration.get() {
            h.observe(started.elapsed().as_secs_f64());
        }
        Ok(target)
    }
}

/// The quota store.
#[derive(Debug)]
pub struct Quotas {
    shared: Arc<Shared>,
    /// The admin API's overrides, as in `quota_limits` (read on every charge, so kept here).
    overrides: RwLock<HashMap<(Scope, String), Limits>>,
    /// Serialises override writes (memory and disk in the same order).
    override_write: Mutex<()>,
    configured: HashMap<(Scope, String), Limits>,
    durability: Durability,
    flusher: std::thread::Thread,
    /// Counts operator changes (overrides set, usage reset): what was refused before one may
    /// not be refused after it.
    changes: AtomicU64,
}

/// A charge made for one request, to give back if the request is refused or fails.
#[derive(Debug, Clone)]
pub struct Charge {
    scope: Scope,
    key: String,
    buckets: Vec<Bucket>,
    amount: u64,
}

/// A charge that went through.
#[derive(Debug)]
pub struct Consumed {
    /// Each limited bucket after the charge.
    pub statuses: Vec<Status>,
    /// What was changed (`None` when nothing was: no limit, or not applied).
    pub charge: Option<Charge>,
    /// The change's sequence number, for [`Quotas::persisted`] (0: nothing changed).
    pub seq: u64,
}

impl Quotas {
    /// Reads and checks every record of both trees into memory, and starts the flusher.
    pub fn open(store: Arc<Store>, config: &QuotaConfig) -> Result<Quotas, QuotaError> {
        let state = store.tree("quota_state")?;
        let limits = store.tree("quota_limits")?;
        let stripes: Vec<Mutex<Stripe>> = (0..STRIPES).map(|_| Mutex::new(Stripe::default())).collect();
        for kv in state.iter() {
            let (k, v) = kv?;
            let key = String::from_utf8_lossy(&k).replace('\0', "/");
            let corrupt = |problem: String| QuotaError::Corrupt { tree: "quota_state", key: key.clone(), problem };
            let (scope, name, bucket) = split_state_key(&k).ok_or_else(|| corrupt("malformed key".into()))?;
            let decoded = State::decode(&v).map_err(corrupt)?;
            if !bucket::fits(bucket, &decoded) {
                return Err(corrupt(format!("a {} bucket holding {decoded:?}", bucket.as_str())));
            }
            let mut stripe = stripes[stripe_of(scope, &name)].lock().unwrap_or_else(PoisonError::into_inner);
            stripe.states.insert(k.to_vec(), decoded);
        }
        let mut overrides = HashMap::new();
        for kv in limits.iter() {
            let (k, v) = kv?;
            let key = String::from_utf8_lossy(&k).replace('\0', "/");
            let (scope, name) = split_limits_key(&k).ok_or_else(|| QuotaError::Corrupt {
                tree: "quota_limits",
                key: key.clone(),
                problem: "malformed key".into(),
            })?;
            let l = decode_limits(&v).map_err(|problem| QuotaError::Corrupt { tree: "quota_limits", key, problem })?;
            overrides.insert((scope, name), l);
        }
        let mut configured = HashMap::new();
        for (scope, table) in [(Scope::Robot, &config.robots), (Scope::Group, &config.groups)] {
            for (key, wire) in table {
                // Checked by `Config::validate`.
                if let Ok(l) = Limits::parse(wire) {
                    configured.insert((scope, key.clone()), l);
                }
            }
        }
        let durability = config.durability.parse().unwrap_or(Durability::Sync);
        let (durable, _) = watch::channel(Durable::default());
        drop((state, limits));
        let shared = Arc::new(Shared {
            store,
            stripes,
            written: AtomicU64::new(0),
            durable,
            flushes: AtomicU64::new(0),
            flush_duration: std::sync::OnceLock::new(),
        });
        let flusher = spawn_flusher(Arc::downgrade(&shared), durability)?;
        Ok(Quotas {
            shared,
            overrides: RwLock::new(overrides),
            override_write: Mutex::new(()),
            configured,
            durability,
            flusher,
            changes: AtomicU64::new(0),
        })
    }

    pub fn durability(&self) -> Durability {
        self.durability
    }

    /// Operator changes so far (see the field).
    pub fn changes(&self) -> u64 {
        self.changes.load(Ordering::Relaxed)
    }

    /// Observes every flush's duration into `histogram` from now on.
    pub fn observe_flushes(&self, histogram: prometheus::Histogram) {
        let _ = self.shared.flush_duration.set(histogram);
    }

    /// Flushes done so far (for the benchmark's report).
    pub fn flushes(&self) -> u64 {
        self.shared.flushes.load(Ordering::Relaxed)
    }

    /// The limits in force for `scope`/`key`: per bucket, the admin API's override, else the
    /// configuration's, else `defaults` (the policy's).
    pub fn effective(&self, scope: Scope, key: &str, defaults: Limits) -> Limits {
        self.override_of(scope, key).unwrap_or_default().over(self.configured(scope, key)).over(defaults)
    }

    /// Charges `amount` to every limited bucket of `scope`/`key`, all or nothing. With
    /// `apply = false` nothing is changed (shadow mode, dry runs): the answer is what a charge
    /// would have been. In memory, under the key's stripe lock; the flusher writes it to disk.
    pub fn try_consume(
        &self,
        scope: Scope,
        key: &str,
        defaults: Limits,
        amount: u64,
        apply: bool,
        now_ms: u64,
    ) -> Result<Consumed, Status> {
        let limits = self.effective(scope, key, defaults);
        let mut stripe = self.lock(scope, key);
        let mut changes = Vec::new();
        let mut statuses = Vec::new();
        for bucket in Bucket::ALL {
            let Some(limit) = limits.get(bucket) else { continue };
            let k = state_key(scope, key, bucket);
            let stored = stripe.states.get(&k).copied();
            match bucket::charge(bucket, limit, stored, now_ms, amount) {
                Ok(charged) => {
                    changes.push((k, bucket, charged.state));
                    statuses.push(charged.status);
                }
                Err(refused) => return Err(refused),
            }
        }
        if !apply || changes.is_empty() || amount == 0 {
            return Ok(Consumed { statuses, charge: None, seq: 0 });
        }
        let buckets = changes.iter().map(|(_, b, _)| *b).collect();
        for (k, _, state) in changes {
            stripe.dirty.insert(k.clone(), Some(state));
            stripe.states.insert(k, state);
        }
        let seq = self.wrote(false);
        drop(stripe);
        Ok(Consumed { statuses, charge: Some(Charge { scope, key: key.into(), buckets, amount }), seq })
    }

    /// The buckets of `scope`/`key` under the limits in force, without charging.
    pub fn peek(&self, scope: Scope, key: &str, defaults: Limits, now_ms: u64) -> Vec<Status> {
        let limits = self.effective(scope, key, defaults);
        let stripe = self.lock(scope, key);
        let mut out = Vec::new();
        for bucket in Bucket::ALL {
            if let Some(limit) = limits.get(bucket) {
                let stored = stripe.states.get(&state_key(scope, key, bucket)).copied();
                out.push(bucket::peek(bucket, limit, stored, now_ms));
            }
        }
        out
    }

    /// Gives back `charge`. Not waited for (a refund only lowers what is on disk).
    pub fn refund(&self, charge: &Charge, now_ms: u64) {
        let mut stripe = self.lock(charge.scope, &charge.key);
        let mut changed = false;
        for &bucket in &charge.buckets {
            let k = state_key(charge.scope, &charge.key, bucket);
            if let Some(back) = stripe.states.get(&k).and_then(|s| bucket::refund(*s, now_ms, charge.amount)) {
                stripe.dirty.insert(k.clone(), Some(back));
                stripe.states.insert(k, back);
                changed = true;
            }
        }
        if changed {
            self.wrote(false);
        }
    }

    /// Waits until change `seq` is on disk (sync mode); at once in interval mode.
    pub async fn persisted(&self, seq: u64) -> Result<(), QuotaError> {
        if self.durability != Durability::Sync || seq == 0 {
            return Ok(());
        }
        let mut rx = self.shared.durable.subscribe();
        let durable = rx
            .wait_for(|d| d.seq >= seq || d.error.is_some())
            .await
            .map_err(|_| QuotaError::NotDurable("the flusher stopped".into()))?;
        match &durable.error {
            Some(e) if durable.seq < seq => Err(QuotaError::NotDurable(e.to_string())),
            _ => Ok(()),
        }
    }

    /// Blocking: waits until change `seq` is on disk, whatever the mode (admin changes, the
    /// benchmark).
    pub fn persisted_blocking(&self, seq: u64) -> Result<(), QuotaError> {
        let mut rx = self.shared.durable.subscribe();
        loop {
            {
                let d = rx.borrow_and_update();
                if d.seq >= seq {
                    return Ok(());
                }
                if let Some(e) = &d.error {
                    return Err(QuotaError::NotDurable(e.to_string()));
                }
            }
            self.flusher.unpark();
            // No runtime here: poll the channel (a flush takes milliseconds).
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    /// The admin API's override for `scope`/`key`.
    pub fn override_of(&self, scope: Scope, key: &str) -> Option<Limits> {
        self.overrides.read().unwrap_or_else(PoisonError::into_inner).get(&(scope, key.to_string())).copied()
    }

    /// The configuration's limits for `scope`/`key`.
    pub fn configured(&self, scope: Scope, key: &str) -> Limits {
        self.configured.get(&(scope, key.to_string())).copied().unwrap_or_default()
    }

    /// Sets (or with `None` or empty limits, clears) the admin override; on disk before return.
    pub fn set_override(&self, scope: Scope, key: &str, limits: Option<Limits>) -> Result<(), QuotaError> {
        let _w = self.override_write.lock().unwrap_or_else(PoisonError::into_inner);
        self.changes.fetch_add(1, Ordering::Relaxed);
        let limits = limits.filter(|l| !l.is_empty());
        let store = &self.shared.store;
        let db = store.db()?;
        let tree = db.open_tree("quota_limits")?;
        match &limits {
            Some(l) => tree.insert(limits_key(scope, key), encode_limits(l)),
            None => tree.remove(limits_key(scope, key)),
        }
        .map_err(|e| store.fault(e))?;
        db.flush().map_err(|e| store.fault(e))?;
        let mut overrides = self.overrides.write().unwrap_or_else(PoisonError::into_inner);
        match limits {
            Some(l) => overrides.insert((scope, key.to_string()), l),
            None => overrides.remove(&(scope, key.to_string())),
        };
        Ok(())
    }

    /// Forgets the usage of `scope`/`key` (every bucket full); on disk before return.
    pub fn reset(&self, scope: Scope, key: &str) -> Result<(), QuotaError> {
        self.changes.fetch_add(1, Ordering::Relaxed);
        let seq = {
            let mut stripe = self.lock(scope, key);
            for bucket in Bucket::ALL {
                let k = state_key(scope, key, bucket);
                stripe.states.remove(&k);
                stripe.dirty.insert(k, None);
            }
            self.wrote(true)
        };
        self.persisted_blocking(seq)
    }

    /// The state of each bucket of `scope`/`key` that has been charged.
    pub fn stored(&self, scope: Scope, key: &str) -> BTreeMap<Bucket, State> {
        let stripe = self.lock(scope, key);
        Bucket::ALL.into_iter().filter_map(|b| stripe.states.get(&state_key(scope, key, b)).map(|s| (b, *s))).collect()
    }

    fn lock(&self, scope: Scope, key: &str) -> std::sync::MutexGuard<'_, Stripe> {
        self.shared.stripes[stripe_of(scope, key)].lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Numbers a change just made (call with its stripe locked); in sync mode, or when
    /// `urgent`, wakes the flusher.
    fn wrote(&self, urgent: bool) -> u64 {
        let seq = self.shared.written.fetch_add(1, Ordering::AcqRel) + 1;
        if urgent || self.durability == Durability::Sync {
            self.flusher.unpark();
        }
        seq
    }
}

impl Drop for Quotas {
    /// A clean stop loses nothing, whatever the mode.
    fn drop(&mut self) {
        if let Err(e) = self.shared.flush(&mut Vec::new()) {
            tracing::error!("quota store: final flush failed: {e}");
        }
    }
}

fn stripe_of(scope: Scope, key: &str) -> usize {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (scope, key).hash(&mut h);
    (h.finish() % STRIPES as u64) as usize
}

/// The flusher. It holds the store only while flushing, so dropping the store stops it.
fn spawn_flusher(shared: Weak<Shared>, durability: Durability) -> Result<std::thread::Thread, QuotaError> {
    let idle = match durability {
        Durability::Sync => Duration::from_millis(50),
        Durability::Interval(ms) => Duration::from_millis(ms),
    };
    let handle = std::thread::Builder::new()
        .name("quota-flush".into())
        .spawn(move || {
            let mut retry = Vec::new();
            loop {
                let Some(s) = shared.upgrade() else { return };
                if s.written.load(Ordering::Acquire) > s.durable.borrow().seq {
                    match s.flush(&mut retry) {
                        Ok(target) => {
                            s.durable.send_replace(Durable { seq: target, error: None });
                        }
                        Err(e) => {
                            tracing::error!("quota store: flush failed: {e}");
                            s.durable.send_modify(|d| d.error = Some(e.to_string().into()));
                            drop(s);
                            std::thread::sleep(Duration::from_millis(100));
                            continue;
                        }
                    }
                    if durability == Durability::Sync {
                        // Changes made while flushing wait for the next flush: go at once.
                        continue;
                    }
                }
                drop(s);
                // Woken early by sync-mode changes and by admin changes (`wrote`).
                std::thread::park_timeout(idle);
            }
        })
        .map_err(|e| QuotaError::NotDurable(format!("cannot start the flusher: {e}")))?;
    Ok(handle.thread().clone())
}

fn state_key(scope: Scope, key: &str, bucket: Bucket) -> Vec<u8> {
    format!("{}\0{key}\0{}", scope.as_str(), bucket.as_str()).into_bytes()
}

fn limits_key(scope: Scope, key: &str) -> Vec<u8> {
    format!("{}\0{key}", scope.as_str()).into_bytes()
}

fn parse_scope(s: &str) -> Option<Scope> {
    match s {
        "robot" => Some(Scope::Robot),
        "group" => Some(Scope::Group),
        _ => None,
    }
}

pub(super) fn split_state_key(k: &[u8]) -> Option<(Scope, String, Bucket)> {
    let text = std::str::from_utf8(k).ok()?;
    let mut parts = text.split('\0');
    let scope = parse_scope(parts.next()?)?;
    let key = parts.next()?.to_string();
    let bucket = match parts.next()? {
        "rate" => Bucket::Rate,
        "day" => Bucket::Day,
        "month" => Bucket::Month,
        _ => return None,
    };
    parts.next().is_none().then_some((scope, key, bucket))
}

pub(super) fn split_limits_key(k: &[u8]) -> Option<(Scope, String)> {
    let (scope, key) = std::str::from_utf8(k).ok()?.split_once('\0')?;
    Some((parse_scope(scope)?, key.to_string())).filter(|(_, k)| !k.contains('\0'))
}

/// What one admission chain charged: given back when dropped unless [`Charged::keep`] was
/// called, so a request refused or failed before it got an action is not charged.
#[derive(Debug)]
pub struct Charged {
    quotas: Arc<Quotas>,
    charges: Vec<Charge>,
    /// The highest write sequence number among the charges.
    pub seq: u64,
    /// The most restrictive bucket after the charges, for the `RateLimit-*` headers.
    pub tightest: Option<Status>,
    kept: AtomicBool,
}

impl Charged {
    /// Keeps the charges and waits until they are on disk (sync mode).
    pub async fn keep(&self) -> Result<(), QuotaError> {
        self.kept.store(true, Ordering::Relaxed);
        self.quotas.persisted(self.seq).await
    }
}

impl Drop for Charged {
    fn drop(&mut self) {
        if self.kept.load(Ordering::Relaxed) {
            return;
        }
        let now = crate::clock::now_ms();
        for charge in &self.charges {
            self.quotas.refund(charge, now);
        }
    }
}

/// One admission chain's access to the quota store: what the `quota` import sees. The robot
/// and group are the request's, from its credentials.
#[derive(Debug)]
pub struct Session {
    pub quotas: Arc<Quotas>,
    pub robot: String,
    pub group: String,
    /// Whether charges are written: false for shadow policies and dry runs.
    pub apply: bool,
    /// Set when a charge was refused during the current policy call.
    pub refused: Option<Status>,
    pub now_ms: u64,
    charges: Vec<Charge>,
    seq: u64,
    tightest: Option<Status>,
}

impl Session {
    pub fn new(quotas: Arc<Quotas>, robot: &str, group: &str, now_ms: u64) -> Session {
        Session {
            quotas,
            robot: robot.into(),
            group: group.into(),
            apply: true,
            refused: None,
            now_ms,
            charges: Vec::new(),
            seq: 0,
            tightest: None,
        }
    }

    fn key(&self, scope: Scope) -> &str {
        match scope {
            Scope::Robot => &self.robot,
            Scope::Group => &self.group,
        }
    }

    /// `try-consume` for the current policy.
    pub fn try_consume(&mut self, scope: Scope, defaults: Limits, amount: u64) -> Result<Vec<Status>, Status> {
        let key = self.key(scope).to_string();
        match self.quotas.try_consume(scope, &key, defaults, amount, self.apply, self.now_ms) {
            Ok(Consumed { statuses, charge, seq }) => {
                if let Some(charge) = charge {
                    self.charges.push(charge);
                    self.seq = self.seq.max(seq);
                }
                if self.apply {
                    for s in &statuses {
                        if self.tightest.is_none_or(|t| (s.remaining, s.reset_ms) < (t.remaining, t.reset_ms)) {
                            self.tightest = Some(*s);
                        }
                    }
                }
                Ok(statuses)
            }
            Err(refused) => {
                self.refused = Some(refused);
                Err(refused)
            }
        }
    }

    pub fn peek(&self, scope: Scope, defaults: Limits) -> Vec<Status> {
        self.quotas.peek(scope, self.key(scope), defaults, self.now_ms)
    }

    /// The chain is over: what it charged, to keep or give back.
    pub fn finish(self) -> Option<Arc<Charged>> {
        (!self.charges.is_empty() || self.tightest.is_some()).then(|| {
            Arc::new(Charged {
                quotas: self.quotas,
                charges: self.charges,
                seq: self.seq,
                tightest: self.tightest,
                kept: AtomicBool::new(false),
            })
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::quota::bucket::Rate;

    fn open(durability: &str) -> (tempfile::TempDir, Arc<Quotas>) {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path()).unwrap());
        let config = QuotaConfig { durability: durability.into(), ..Default::default() };
        (dir, Arc::new(Quotas::open(store, &config).unwrap()))
    }

    #[test]
    fn sixty_four_concurrent_charges_never_spend_a_token_twice() {
        let (_dir, quotas) = open("sync");
        let defaults =
            Limits { rate: Some(Rate { requests: 1, period_ms: 3_600_000, burst: 20 }), ..Limits::default() };
        let now = 1_700_000_000_000;
        let admitted = AtomicU64::new(0);
        std::thread::scope(|s| {
            for _ in 0..64 {
                s.spawn(|| {
                    if let Ok(consumed) = quotas.try_consume(Scope::Robot, "r1", defaults, 1, true, now) {
                        quotas.persisted_blocking(consumed.seq).unwrap();
                        admitted.fetch_add(1, Ordering::Relaxed);
                    }
                });
            }
        });
        assert_eq!(admitted.load(Ordering::Relaxed), 20);
        assert_eq!(quotas.peek(Scope::Robot, "r1", defaults, now)[0].remaining, 0);
        assert!(quotas.flushes() >= 1);
    }

    #[test]
    fn a_charge_is_all_or_nothing_across_buckets_and_can_be_given_back() {
        let (_dir, quotas) = open("interval:50");
        let defaults =
            Limits { rate: Some(Rate { requests: 100, period_ms: 1_000, burst: 100 }), day: Some(1), month: None };
        let now = 1_700_000_000_000;
        let consumed = quotas.try_consume(Scope::Group, "g", defaults, 1, true, now).unwrap();
        assert_eq!(consumed.statuses.len(), 2);
        let refused = quotas.try_consume(Scope::Group, "g", defaults, 1, true, now).unwrap_err();
        assert_eq!(refused.bucket, Bucket::Day);
        // The refused charge left the rate bucket as it was.
        assert_eq!(quotas.peek(Scope::Group, "g", defaults, now)[0].remaining, 99);
        quotas.refund(&consumed.charge.unwrap(), now);
        assert!(quotas.try_consume(Scope::Group, "g", defaults, 1, false, now).is_ok());
    }

    #[test]
    fn operator_overrides_win_over_the_policy_defaults() {
        let (_dir, quotas) = open("sync");
        let defaults = Limits { day: Some(100), ..Limits::default() };
        quotas.set_override(Scope::Robot, "r", Some(Limits { day: Some(1), ..Limits::default() })).unwrap();
        let now = 1_700_000_000_000;
        assert!(quotas.try_consume(Scope::Robot, "r", defaults, 1, true, now).is_ok());
        assert!(quotas.try_consume(Scope::Robot, "r", defaults, 1, true, now).is_err());
        quotas.reset(Scope::Robot, "r").unwrap();
        assert!(quotas.try_consume(Scope::Robot, "r", defaults, 1, true, now).is_ok());
    }
}
