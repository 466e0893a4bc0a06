//! The sandbox: wasmtime's engine, compilation of uploaded components into ready-to-instantiate
//! policies, and one bounded call of a policy.
//!
//! Every call gets a fresh instance from the pooling allocator (no state survives between
//! calls) and runs under all of these at once: fuel (the policy's own instructions), a budget
//! of the calling thread's CPU time (its instructions and the host calls it makes), a
//! wall-clock backstop of ten times that budget, a linear-memory cap, a WebAssembly stack cap
//! and a bound on what the policy may log. Both time limits are checked at epoch interruptions,
//! ticked every millisecond by a background thread while a call runs; counting CPU time rather
//! than wall time means a call descheduled on a busy machine is not failed for the machine's
//! load. Calls block: callers run them on the blocking pool, holding one of `max_concurrent`
//! slots, which is also the pool's instance count.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use wasmtime::component::types::ComponentItem;
use wasmtime::component::{Component, HasSelf, Linker};
use wasmtime::{
    Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, ResourceLimiter, Store, Trap, UpdateDeadline,
};

use super::bindings::{
    ADMISSION_IMPORTS, Action, Admission, AdmissionPre, Decision, LogLevel, PACKAGE_VERSIONS, RequestContext,
    SAFETY_IMPORTS, SafetyPre, host, quota, types, v0_1,
};
use super::config::PolicyConfig;
use super::types::World;
use crate::quota::{Limits, Rate, Scope, Session, Status};

/// How many log lines one call may write, and how long each may be.
const LOG_LINES_PER_CALL: u32 = 16;
const LOG_LINE_BYTES: usize = 512;
/// Epoch tick: how often a running call's time is checked.
const TICK: Duration = Duration::from_millis(1);
/// Linear memory kept resident in a slot between calls (see `Runtime::new`).
const KEEP_RESIDENT: usize = 2 << 20;
/// The wall-clock backstop, in multiples of the CPU-time budget: it frees the slot of a call
/// that is stuck rather than busy.
const WALL_FACTOR: u64 = 10;

/// A compiled policy, ready to instantiate, built against `vla:policy@0.2.0` or (`…V0_1`)
/// `@0.1.0`.
#[derive(Clone)]
pub enum Compiled {
    Admission(AdmissionPre<HostState>),
    Safety(SafetyPre<HostState>),
    AdmissionV0_1(v0_1::AdmissionPre<HostState>),
    SafetyV0_1(v0_1::SafetyPre<HostState>),
}

impl Compiled {
    /// The WIT package version the component was built against.
    pub fn package_version(&self) -> &'static str {
        match self {
            Compiled::Admission(_) | Compiled::Safety(_) => "0.2.0",
            Compiled::AdmissionV0_1(_) | Compiled::SafetyV0_1(_) => "0.1.0",
        }
    }
}

impl std::fmt::Debug for Compiled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Compiled::Admission(_) => "Compiled::Admission",
            Compiled::Safety(_) => "Compiled::Safety",
            Compiled::AdmissionV0_1(_) => "Compiled::AdmissionV0_1",
            Compiled::SafetyV0_1(_) => "Compiled::SafetyV0_1",
        })
    }
}

/// Why a call produced no decision. Every one of these denies the request (fail closed).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Failure {
    #[error("ran past its time budget of {0} ms of CPU time")]
    Timeout(u64),
    #[error("was still running after {0} ms (its wall-clock limit)")]
    WallClock(u64),
    #[error("ran out of fuel ({0} units)")]
    OutOfFuel(u64),
    #[error("tried to grow its memory past the limit of {0} bytes")]
    MemoryLimit(usize),
    #[error("overflowed its stack")]
    StackOverflow,
    #[error("trapped: {0}")]
    Trap(String),
    #[error("returned an invalid decision: {0}")]
    InvalidOutput(String),
    #[error("could not be instantiated: {0}")]
    Instantiate(String),
}

impl Failure {
    /// Stable tag, for the audit log and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Failure::Timeout(_) | Failure::WallClock(_) => "timeout",
            Failure::OutOfFuel(_) => "out_of_fuel",
            Failure::MemoryLimit(_) => "memory_limit",
            Failure::StackOverflow => "stack_overflow",
            Failure::Trap(_) => "trap",
            Failure::InvalidOutput(_) => "invalid_output",
            Failure::Instantiate(_) => "instantiate",
        }
    }
}

/// What a policy is asked.
#[derive(Debug, Clone, Copy)]
pub enum Input<'a> {
    Admit(&'a RequestContext),
    Evaluate(&'a RequestContext, &'a Action),
}

/// A store's data: what the host imports see during one call.
pub struct HostState {
    limiter: Limiter,
    policy: Arc<str>,
    config: Arc<str>,
    logs_left: u32,
    logs_dropped: u32,
    /// The request's quota session (admission chains); `None` elsewhere.
    quota: Option<Session>,
    /// Which time limit stopped the call, if one did.
    stopped: Option<Stop>,
}

/// The time limit a call ran past.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    Cpu,
    Wall,
}

/// One call's time limits, checked at each epoch interruption. Pure: it is handed the clocks.
#[derive(Debug, Clone, Copy)]
struct Budget {
    cpu_start: Duration,
    wall_start: Instant,
    cpu: Duration,
    wall: Duration,
}

impl Budget {
    fn check(&self, cpu_now: Duration, wall_now: Instant) -> Option<Stop> {
        if cpu_now.saturating_sub(self.cpu_start) >= self.cpu {
            Some(Stop::Cpu)
        } else if wall_now.saturating_duration_since(self.wall_start) >= self.wall {
            Some(Stop::Wall)
        } else {
            None
        }
    }
}

/// The calling thread's CPU time.
fn thread_cpu_time() -> Duration {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    Duration::new(u64::try_from(t.tv_sec).unwrap_or(0), u32::try_from(t.tv_nsec).unwrap_or(0))
}

/// Calls running now, and the ticker to wake when the first starts: an idle sandbox ticks
/// nothing, so it costs the model's cores no wake-ups.
struct Ticker {
    calls: Arc<AtomicUsize>,
    thread: std::thread::Thread,
}

/// Counts one running call for the ticker, until dropped.
struct Ticking<'a>(&'a Ticker);

impl<'a> Ticking<'a> {
    fn start(ticker: &'a Ticker) -> Ticking<'a> {
        if ticker.calls.fetch_add(1, Ordering::AcqRel) == 0 {
            ticker.thread.unpark();
        }
        Ticking(ticker)
    }
}

impl Drop for Ticking<'_> {
    fn drop(&mut self) {
        self.0.calls.fetch_sub(1, Ordering::AcqRel);
    }
}

impl std::fmt::Debug for HostState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostState").field("policy", &self.policy).finish_non_exhaustive()
    }
}

impl types::Host for HostState {}

impl host::Host for HostState {
    fn log(&mut self, level: LogLevel, message: String) {
        if self.logs_left == 0 {
            self.logs_dropped += 1;
            return;
        }
        self.logs_left -= 1;
        let message = truncate(&message, LOG_LINE_BYTES);
        let policy = &*self.policy;
        match level {
            LogLevel::Debug => tracing::debug!(policy, "{message}"),
            LogLevel::Info => tracing::info!(policy, "{message}"),
            LogLevel::Warn => tracing::warn!(policy, "{message}"),
            LogLevel::Error => tracing::error!(policy, "{message}"),
        }
    }

    fn config(&mut self) -> String {
        self.config.to_string()
    }
}

impl quota::Host for HostState {
    fn peek(&mut self, scope: quota::Scope, defaults: quota::Limits) -> wasmtime::Result<Vec<quota::Status>> {
        let session = self.quota.as_ref().ok_or_else(no_quota)?;
        let statuses = session.peek(scope_of(scope), limits_of(&defaults)?);
        Ok(statuses.iter().map(status_to_wit).collect())
    }

    fn try_consume(
        &mut self,
        scope: quota::Scope,
        defaults: quota::Limits,
        amount: u32,
    ) -> wasmtime::Result<Result<Vec<quota::Status>, quota::Status>> {
        let session = self.quota.as_mut().ok_or_else(no_quota)?;
        Ok(match session.try_consume(scope_of(scope), limits_of(&defaults)?, u64::from(amount)) {
            Ok(statuses) => Ok(statuses.iter().map(status_to_wit).collect()),
            Err(refused) => Err(status_to_wit(&refused)),
        })
    }
}

// `vla:policy@0.1.0`'s imports: the same host, its values converted.
impl v0_1::types::Host for HostState {}

impl v0_1::host::Host for HostState {
    fn log(&mut self, level: v0_1::host::LogLevel, message: String) {
        let level = match level {
            v0_1::host::LogLevel::Debug => LogLevel::Debug,
            v0_1::host::LogLevel::Info => LogLevel::Info,
            v0_1::host::LogLevel::Warn => LogLevel::Warn,
            v0_1::host::LogLevel::Error => LogLevel::Error,
        };
        host::Host::log(self, level, message)
    }

    fn config(&mut self) -> String {
        host::Host::config(self)
    }
}

impl v0_1::quota::Host for HostState {
    fn peek(
        &mut self,
        scope: v0_1::quota::Scope,
        defaults: v0_1::quota::Limits,
    ) -> wasmtime::Result<Vec<v0_1::quota::Status>> {
        let statuses = quota::Host::peek(self, scope_now(scope), limits_now(defaults))?;
        Ok(statuses.iter().map(status_v0_1).collect())
    }

    fn try_consume(
        &mut self,
        scope: v0_1::quota::Scope,
        defaults: v0_1::quota::Limits,
        amount: u32,
    ) -> wasmtime::Result<Result<Vec<v0_1::quota::Status>, v0_1::quota::Status>> {
        Ok(match quota::Host::try_consume(self, scope_now(scope), limits_now(defaults), amount)? {
            Ok(statuses) => Ok(statuses.iter().map(status_v0_1).collect()),
            Err(refused) => Err(status_v0_1(&refused)),
        })
    }
}

fn scope_now(s: v0_1::quota::Scope) -> quota::Scope {
    match s {
        v0_1::quota::Scope::Robot => quota::Scope::Robot,
        v0_1::quota::Scope::Group => quota::Scope::Group,
    }
}

fn limits_now(l: v0_1::quota::Limits) -> quota::Limits {
    quota::Limits {
        rate: l.rate.map(|r| quota::RateLimit { requests: r.requests, period_ms: r.period_ms, burst: r.burst }),
        day: l.day,
        month: l.month,
    }
}

fn status_v0_1(s: &quota::Status) -> v0_1::quota::Status {
    v0_1::quota::Status {
        bucket: match s.bucket {
            quota::Bucket::Rate => v0_1::quota::Bucket::Rate,
            quota::Bucket::Day => v0_1::quota::Bucket::Day,
            quota::Bucket::Month => v0_1::quota::Bucket::Month,
        },
        limit: s.limit,
        remaining: s.remaining,
        reset_ms: s.reset_ms,
        retry_after_ms: s.retry_after_ms,
    }
}

fn no_quota() -> wasmtime::Error {
    wasmtime::format_err!("the quota store is only available to admission policies serving a request")
}

fn scope_of(s: quota::Scope) -> Scope {
    match s {
        quota::Scope::Robot => Scope::Robot,
        quota::Scope::Group => Scope::Group,
    }
}

/// The policy's defaults, checked like an operator's limits (a zero rate traps the policy).
fn limits_of(l: &quota::Limits) -> wasmtime::Result<Limits> {
    let rate = match l.rate {
        None => None,
        Some(r) if r.requests == 0 || r.period_ms == 0 || r.burst == 0 => {
            wasmtime::bail!("quota: a rate needs requests, period-ms and burst of at least 1, got {r:?}")
        }
        Some(r) => Some(Rate { requests: r.requests, period_ms: r.period_ms, burst: r.burst }),
    };
    Ok(Limits { rate, day: l.day, month: l.month })
}

fn status_to_wit(s: &Status) -> quota::Status {
    quota::Status {
        bucket: match s.bucket {
            crate::quota::Bucket::Rate => quota::Bucket::Rate,
            crate::quota::Bucket::Day => quota::Bucket::Day,
            crate::quota::Bucket::Month => quota::Bucket::Month,
        },
        limit: s.limit,
        remaining: s.remaining,
        reset_ms: s.reset_ms,
        retry_after_ms: s.retry_after_ms,
    }
}

/// Caps linear memory and remembers that the cap was hit, so the trap it causes is reported
/// as what it is.
#[derive(Debug)]
struct Limiter {
    memory_limit: usize,
    hit: bool,
}

impl ResourceLimiter for Limiter {
    fn memory_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        if desired > self.memory_limit {
            self.hit = true;
            return Err(wasmtime::format_err!("memory limit of {} bytes reached", self.memory_limit));
        }
        Ok(true)
    }

    fn table_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        Ok(desired <= 100_000)
    }
}

/// The engine and what every call shares.
pub struct Runtime {
    engine: Engine,
    linker: Linker<HostState>,
    ticker: Arc<Ticker>,
    timeout_ms: u64,
    fuel: u64,
    memory_limit: usize,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime").field("timeout_ms", &self.timeout_ms).field("fuel", &self.fuel).finish()
    }
}

impl Runtime {
    /// Builds the engine: pooling allocator sized to `max_concurrent` calls, compiled
    /// artifacts cached under `cache_dir` (an absolute path), and the epoch ticker.
    pub fn new(config: &PolicyConfig, cache_dir: &Path) -> Result<Runtime, String> {
        let mut wasm = Config::new();
        wasm.wasm_component_model(true)
            .consume_fuel(true)
            .epoch_interruption(true)
            .max_wasm_stack(config.max_stack_bytes);
        // One instance more than the calls requests may run at once: the upload dry run (one at
        // a time, under the registry's write lock) never takes a request's instance.
        let n = config.max_concurrent + 1;
        let mut pool = PoolingAllocationConfig::default();
        pool.total_component_instances(n)
            .total_core_instances(n * 8)
            .max_core_instances_per_component(8)
            .total_memories(n * 2)
            .max_memories_per_component(2)
            .total_tables(n * 8)
            .max_memory_size(config.memory_limit_bytes)
            // A slot given back is zeroed with memset, not madvise, up to this much: no page
            // faults on its next call, and no TLB shootdown interrupting the model's threads on
            // the other cores. A shipped policy's memory is about 1 MiB.
            .linear_memory_keep_resident(KEEP_RESIDENT)
            .table_keep_resident(64 << 10);
        wasm.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        std::fs::create_dir_all(cache_dir).map_err(|e| format!("{}: {e}", cache_dir.display()))?;
        let mut cache = wasmtime::CacheConfig::new();
        cache.with_directory(cache_dir);
        wasm.cache(Some(wasmtime::Cache::new(cache).map_err(|e| format!("compilation cache: {e}"))?));
        let engine = Engine::new(&wasm).map_err(|e| format!("WebAssembly engine: {e}"))?;

        let mut linker = Linker::new(&engine);
        // Both worlds import the same interfaces; one linker serves both, at both versions.
        Admission::add_to_linker::<_, HasSelf<_>>(&mut linker, |s| s).map_err(|e| format!("linker: {e}"))?;
        v0_1::Admission::add_to_linker::<_, HasSelf<_>>(&mut linker, |s| s).map_err(|e| format!("linker: {e}"))?;

        // The ticker parks while no call runs; a call starting unparks it (an unpark before the
        // park makes the park return at once, so none is missed). It notices the engine gone
        // within a second.
        let weak = engine.weak();
        let calls = Arc::new(AtomicUsize::new(0));
        let running = calls.clone();
        let thread = std::thread::Builder::new()
            .name("policy-epoch".into())
            .spawn(move || {
                while let Some(engine) = weak.upgrade() {
                    if running.load(Ordering::Acquire) == 0 {
                        drop(engine);
                        std::thread::park_timeout(Duration::from_secs(1));
                        continue;
                    }
                    engine.increment_epoch();
                    drop(engine);
                    std::thread::sleep(TICK);
                }
            })
            .map_err(|e| format!("epoch thread: {e}"))?
            .thread()
            .clone();
        let ticker = Arc::new(Ticker { calls, thread });
        Ok(Runtime {
            engine,
            linker,
            ticker,
            timeout_ms: config.timeout_ms,
            fuel: config.fuel,
            memory_limit: config.memory_limit_bytes,
        })
    }

    /// Compiles `bytes` as a policy for `world` (from the cache when it was compiled before)
    /// and checks that it imports nothing but the world's imports and exports the world's
    /// function. Blocking; the error is for the operator who uploaded it.
    pub fn compile(&self, bytes: &[u8], world: World) -> Result<Compiled, String> {
        if !wasmparser_is_component(bytes) {
            return Err(if bytes.starts_with(b"\0asm") {
                "this is a core WebAssembly module, not a component; build it into a component (see wit/README.md)"
                    .into()
            } else {
                "not a WebAssembly component (bad magic number)".into()
            });
        }
        let component = Component::new(&self.engine, bytes).map_err(|e| format!("invalid component: {e:#}"))?;
        let ty = component.component_type();
        let offending: Vec<String> = ty
            .imports(&self.engine)
            // `use types.{..}` in a world also imports the used types by name; a type grants
            // nothing, so only instances and functions are checked.
            .filter(|(_, item)| !matches!(item.ty, ComponentItem::Type(_)))
            .map(|(name, _)| name.to_string())
            .filter(|name| !allowed_import(world, name))
            .collect();
        if !offending.is_empty() {
            return Err(format!(
                "imports {} beyond the {world} world's {}; policies get no WASI or other capabilities",
                offending.iter().map(|n| format!("`{n}`")).collect::<Vec<_>>().join(", "),
                imports_of(world)
                    .iter()
                    .map(|i| format!("`{i}@{}`", PACKAGE_VERSIONS[0]))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        let exports: Vec<String> = ty.exports(&self.engine).map(|(name, _)| name.to_string()).collect();
        let wanted = world.export();
        if !exports.iter().any(|e| e == wanted) {
            let other = match world {
                World::Admission => World::Safety,
                World::Safety => World::Admission,
            };
            let hint = if exports.iter().any(|e| e == other.export()) {
                format!(" (it exports `{}`: it implements the {other} world)", other.export())
            } else {
                String::new()
            };
            return Err(format!("does not implement the {world} world: no export `{wanted}`{hint}"));
        }
        let pre = self.linker.instantiate_pre(&component).map_err(|e| format!("cannot be linked: {e:#}"))?;
        // The export's types say which version it was built against.
        let v0_1 = ty.imports(&self.engine).any(|(name, _)| name.starts_with("vla:policy/") && name.contains("@0.1."));
        match (world, v0_1) {
            (World::Admission, false) => AdmissionPre::new(pre).map(Compiled::Admission),
            (World::Safety, false) => SafetyPre::new(pre).map(Compiled::Safety),
            (World::Admission, true) => v0_1::AdmissionPre::new(pre).map(Compiled::AdmissionV0_1),
            (World::Safety, true) => v0_1::SafetyPre::new(pre).map(Compiled::SafetyV0_1),
        }
        .map_err(|e| format!("does not implement the {world} world: {e:#}"))
    }

    /// One call, instantiation included, within every limit. Blocking.
    pub fn call(
        &self,
        compiled: &Compiled,
        policy: &Arc<str>,
        config: &Arc<str>,
        input: Input<'_>,
    ) -> Result<Decision, Failure> {
        self.call_with(compiled, policy, config, input, None).0
    }

    /// [`Runtime::call`] with the request's quota session, handed back after the call.
    pub fn call_with(
        &self,
        compiled: &Compiled,
        policy: &Arc<str>,
        config: &Arc<str>,
        input: Input<'_>,
        quota: Option<Session>,
    ) -> (Result<Decision, Failure>, Option<Session>) {
        let state = HostState {
            limiter: Limiter { memory_limit: self.memory_limit, hit: false },
            policy: policy.clone(),
            config: config.clone(),
            logs_left: LOG_LINES_PER_CALL,
            logs_dropped: 0,
            quota,
            stopped: None,
        };
        let mut store = Store::new(&self.engine, state);
        store.limiter(|s| &mut s.limiter);
        if let Err(e) = store.set_fuel(self.fuel) {
            return (Err(Failure::Instantiate(e.to_string())), store.into_data().quota);
        }
        let _ticking = Ticking::start(&self.ticker);
        let budget = Budget {
            cpu_start: thread_cpu_time(),
            wall_start: Instant::now(),
            cpu: Duration::from_millis(self.timeout_ms),
            wall: Duration::from_millis(self.timeout_ms.saturating_mul(WALL_FACTOR)),
        };
        // Every tick, the call's time so far against its budget. The call runs on this thread
        // from start to end (the callback runs inside it), so the thread's CPU clock is the
        // call's.
        store.set_epoch_deadline(1);
        store.epoch_deadline_callback(move |mut ctx| match budget.check(thread_cpu_time(), Instant::now()) {
            None => Ok(UpdateDeadline::Continue(1)),
            Some(stop) => {
                ctx.data_mut().stopped = Some(stop);
                Ok(UpdateDeadline::Interrupt)
            }
        });
        let result = match (compiled, input) {
            (Compiled::Admission(pre), Input::Admit(ctx)) => match pre.instantiate(&mut store) {
                Ok(bindings) => bindings.call_admit(&mut store, ctx),
                Err(e) => {
                    let failure = self.classify(e, &store, true);
                    return (Err(failure), store.into_data().quota);
                }
            },
            (Compiled::Safety(pre), Input::Evaluate(ctx, action)) => match pre.instantiate(&mut store) {
                Ok(bindings) => bindings.call_evaluate(&mut store, ctx, action),
                Err(e) => {
                    let failure = self.classify(e, &store, true);
                    return (Err(failure), store.into_data().quota);
                }
            },
            (Compiled::AdmissionV0_1(pre), Input::Admit(ctx)) => match pre.instantiate(&mut store) {
                Ok(bindings) => bindings.call_admit(&mut store, &v0_1::context(ctx)).map(v0_1::decision),
                Err(e) => {
                    let failure = self.classify(e, &store, true);
                    return (Err(failure), store.into_data().quota);
                }
            },
            (Compiled::SafetyV0_1(pre), Input::Evaluate(ctx, action)) => match pre.instantiate(&mut store) {
                Ok(bindings) => {
                    bindings.call_evaluate(&mut store, &v0_1::context(ctx), &v0_1::action(action)).map(v0_1::decision)
                }
                Err(e) => {
                    let failure = self.classify(e, &store, true);
                    return (Err(failure), store.into_data().quota);
                }
            },
            _ => {
                let failure = Failure::Instantiate("policy called with the other world's input".into());
                return (Err(failure), store.into_data().quota);
            }
        };
        let dropped = store.data().logs_dropped;
        if dropped > 0 {
            tracing::warn!(policy = &**policy, "dropped {dropped} log lines beyond {LOG_LINES_PER_CALL} per call");
        }
        let result = result.map_err(|e| self.classify(e, &store, false));
        (result, store.into_data().quota)
    }

    fn classify(&self, e: wasmtime::Error, store: &Store<HostState>, instantiating: bool) -> Failure {
        if store.data().limiter.hit {
            return Failure::MemoryLimit(self.memory_limit);
        }
        match e.downcast_ref::<Trap>() {
            Some(Trap::Interrupt) if store.data().stopped == Some(Stop::Wall) => {
                Failure::WallClock(self.timeout_ms.saturating_mul(WALL_FACTOR))
            }
            Some(Trap::Interrupt) => Failure::Timeout(self.timeout_ms),
            Some(Trap::OutOfFuel) => Failure::OutOfFuel(self.fuel),
            Some(Trap::StackOverflow) => Failure::StackOverflow,
            Some(trap) => Failure::Trap(trap.to_string()),
            None if instantiating => Failure::Instantiate(truncate(&format!("{e:#}"), 300).into_owned()),
            None => Failure::Trap(truncate(&format!("{e:#}"), 300).into_owned()),
        }
    }
}

fn imports_of(world: World) -> &'static [&'static str] {
    match world {
        World::Admission => &ADMISSION_IMPORTS,
        World::Safety => &SAFETY_IMPORTS,
    }
}

fn allowed_import(world: World, name: &str) -> bool {
    let (interface, version) = name.split_once('@').unwrap_or((name, ""));
    // A patch release of either version the host implements.
    let compatible = ["0.2.", "0.1."].iter().any(|minor| {
        version.strip_prefix(minor).is_some_and(|patch| !patch.is_empty() && patch.chars().all(|c| c.is_ascii_digit()))
    });
    imports_of(world).contains(&interface) && compatible
}

/// Whether `bytes` start like a component (layer 1) rather than a core module or junk.
fn wasmparser_is_component(bytes: &[u8]) -> bool {
    bytes.len() >= 8 && bytes[..4] == *b"\0asm" && bytes[6..8] == [1, 0]
}

/// At most `max` bytes of `s`, cut on a character boundary, marked when cut.
pub fn truncate(s: &str, max: usize) -> std::borrow::Cow<'_, str> {
    if s.len() <= max {
        return s.into();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} bytes)", &s[..end], s.len()).into()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn only_the_package_interfaces_at_a_compatible_version_may_be_imported() {
        let a = World::Admission;
        assert!(allowed_import(a, "vla:policy/host@0.1.0"));
        assert!(allowed_import(a, "vla:policy/types@0.1.3"));
        assert!(allowed_import(a, "vla:policy/quota@0.1.0"));
        assert!(!allowed_import(World::Safety, "vla:policy/quota@0.1.0"));
        assert!(allowed_import(a, "vla:policy/host@0.2.0"));
        assert!(allowed_import(World::Safety, "vla:policy/types@0.2.1"));
        assert!(!allowed_import(a, "vla:policy/host@0.3.0"));
        assert!(!allowed_import(a, "vla:policy/host"));
        assert!(!allowed_import(a, "wasi:filesystem/types@0.2.0"));
        assert!(!allowed_import(a, "wasi:cli/environment@0.2.0"));
    }

    #[test]
    fn a_call_is_stopped_by_its_cpu_time_not_by_time_it_spent_descheduled() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let budget = Budget { cpu_start: ms(500), wall_start: t0, cpu: ms(20), wall: ms(200) };
        // 60 ms of wall time, 5 ms of it on a core: the machine was busy, not the policy.
        assert_eq!(budget.check(ms(505), t0 + ms(60)), None);
        assert_eq!(budget.check(ms(520), t0 + ms(60)), Some(Stop::Cpu));
        // Stuck off the core for ten budgets: the backstop frees its slot.
        assert_eq!(budget.check(ms(505), t0 + ms(200)), Some(Stop::Wall));
    }

    #[test]
    fn truncation_keeps_characters_whole() {
        assert_eq!(truncate("abc", 5), "abc");
        let cut = truncate("ééé", 3);
        assert!(cut.starts_with("é…"), "{cut}");
    }
}
