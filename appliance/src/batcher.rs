//! Batcher stage: the executor threads of one model and the hand-off between them and the
//! request handlers.
//!
//! A handler [`Batcher::submit`]s preprocessed inputs and gets a [`Ticket`] to await. Executor
//! threads (`batching.instances`, dedicated OS threads, never async workers) each own one
//! [`LoadedModel`], take batches from the shared [`BatchQueue`] under a mutex, run them and
//! reply through each request's oneshot channel.
//!
//! Every request is in exactly one of three states, changed only by compare-and-swap:
//! `QUEUED` → `STARTED` (an executor put it in a batch) or `QUEUED` → `ABANDONED` (its deadline
//! passed or its client went away before that). Whoever wins the swap decides: a request that
//! is `ABANDONED` is never computed, and one that is `STARTED` is always answered with its result.

use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tch::Device;
use tokio::sync::oneshot;
use vla_api::{ModelStats, Priority};

use crate::cuda_memory::PeakProbe;
use crate::metrics::ModelMetrics;
use crate::model::{LoadedModel, ModelError, TensorData};
use crate::queue::{BatchQueue, Next, Policy, Queued, Waiting};
use crate::spec::ModelSpec;

const QUEUED: u8 = 0;
const STARTED: u8 = 1;
const ABANDONED: u8 = 2;

/// The result of one request's trip through a batch.
#[derive(Debug, Clone)]
pub struct Done {
    /// Every output of the model for this request, as little-endian bytes of its datatype.
    pub outputs: Vec<Vec<u8>>,
    pub queued: Duration,
    pub inference: Duration,
    pub batch_size: usize,
}

/// Why a request got no action.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JobError {
    #[error("deadline passed before the batch started")]
    DeadlineExceeded,
    #[error("queue is full ({capacity} requests)")]
    QueueFull { capacity: usize },
    #[error("the model is shutting down")]
    ShuttingDown,
    #[error("the model's executor stopped without answering")]
    ExecutorGone,
    #[error("{0}")]
    Inference(String),
    /// The model's outputs were not the declared shapes (counted here; audited by the pipeline).
    #[error("{0}")]
    OutputShape(String),
}

struct Job {
    inputs: Vec<TensorData>,
    state: Arc<AtomicU8>,
    reply: oneshot::Sender<Result<Done, JobError>>,
}

impl Waiting for Job {
    fn is_abandoned(&self) -> bool {
        self.state.load(Ordering::Acquire) == ABANDONED || self.reply.is_closed()
    }
}

/// Counters read by `/v1/models`; updated with relaxed atomics, read as a snapshot.
#[derive(Debug, Default)]
struct Counters {
    computed: AtomicU64,
    batches: AtomicU64,
    rejected_queue_full: AtomicU64,
    /// Requests evicted from a full queue by a more urgent one (answered 503 `queue_full`).
    evicted: AtomicU64,
    dropped_deadline: AtomicU64,
    dropped_disconnect: AtomicU64,
    failed: AtomicU64,
    /// Sums over computed requests, for the OIP statistics extension.
    queue_ns: AtomicU64,
    compute_ns: AtomicU64,
    last_inference_unix_ms: AtomicU64,
}

/// Cumulative counts and times since start, for `GET /v2/models/{m}/stats`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Totals {
    /// Requests computed.
    pub success: u64,
    /// Requests refused or dropped by the queue, or whose batch failed.
    pub fail: u64,
    /// Forward calls.
    pub executions: u64,
    /// Time computed requests waited in the queue.
    pub queue_ns: u64,
    /// Time of the batches computed requests were in, counted once per request.
    pub compute_ns: u64,
    pub last_inference_unix_ms: u64,
}

struct State {
    queue: BatchQueue<Job>,
    /// Set at shutdown: no new requests; executors drain what is queued, then exit.
    closed: bool,
}

/// How a CPU model's executors got their libtorch thread count.
#[derive(Debug, Clone, PartialEq)]
pub struct CpuThreads {
    pub threads: usize,
    /// Measured at warm-up (`models.cpu_threads = 0`, see [`crate::threads`]); `None` when
    /// the configuration set it.
    pub measured: Option<Measured>,
}

/// What the first executor measured at warm-up (see [`crate::threads`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Measured {
    /// Every forward timed: each candidate count at every size of
    /// [`crate::threads::batch_ladder`].
    pub timings: Vec<crate::threads::Timing>,
    /// The largest batch the executors form: [`crate::threads::chosen_largest_batch`].
    pub largest_batch: usize,
}

struct Shared {
    state: Mutex<State>,
    /// Signalled on every push and on close; executors wait on it when there is nothing to run.
    wake: Condvar,
    counters: Counters,
    /// The model's metric handles (atomics only; see [`crate::metrics::ModelMetrics`]).
    metrics: ModelMetrics,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic never happens while the lock is held (model runs happen outside it), but
        // should one, the queue's state is still consistent: keep serving.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The queue and executors of one model.
pub struct Batcher {
    shared: Arc<Shared>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    capacity: usize,
    /// CPU models only.
    cpu_threads: Option<CpuThreads>,
}

impl std::fmt::Debug for Batcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batcher").field("capacity", &self.capacity).finish_non_exhaustive()
    }
}

impl Batcher {
    /// Starts `spec.batching.instances` executor threads, each loading `<dir>/model.pt` onto
    /// `device` and warming it up on its own thread; returns once all are ready, or the first
    /// error after stopping the others. On the CPU, `cpu_threads` libtorch threads each, or (0)
    /// as many as the first executor measures to be fastest ([`crate::threads`]): the others
    /// load once it has chosen, so that nothing else runs while it measures.
    pub fn start(
        dir: &Path,
        spec: &ModelSpec,
        device: Device,
        cpu_threads: usize,
        metrics: ModelMetrics,
    ) -> Result<Batcher, ModelError> {
        let policy = Policy {
            max_batch_size: spec.effective_max_batch(),
            max_queue_delay: Duration::from_micros(spec.batching.max_queue_delay_us),
            preferred_batch_sizes: spec.batching.preferred_batch_sizes.clone(),
            capacity: spec.batching.queue_capacity,
        };
        let shared = Arc::new(Shared {
            state: Mutex::new(State { queue: BatchQueue::new(policy), closed: false }),
            wake: Condvar::new(),
            counters: Counters::default(),
            metrics,
        });
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let mut threads = Vec::new();
        let instances = spec.batching.instances;
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let measure = device == Device::Cpu && cpu_threads == 0;
        // The first executor's choice, for the others (and the report).
        let (chosen_tx, chosen_rx) = std::sync::mpsc::channel::<CpuThreads>();
        let (mut followers, mut waits) = (Vec::new(), vec![None]);
        for _ in 1..instances {
            let (tx, rx) = std::sync::mpsc::channel::<usize>();
            followers.push(tx);
            waits.push(Some(rx));
        }
        let mut followers = Some(followers);
        for (i, wait) in waits.into_iter().enumerate() {
            let shared = shared.clone();
            let memory = shared.metrics.memory.clone();
            let ready = ready_tx.clone();
            let dir = dir.to_path_buf();
            let thread_spec = spec.clone();
            let warmup = spec.warmup_batch_sizes();
            let max_batch = spec.effective_max_batch();
            let measure_sizes = crate::threads::batch_ladder(max_batch);
            // Executor 0 tells the others (and `start`) its count; they wait for it.
            let tell = followers.take().map(|f| (chosen_tx.clone(), f));
            let spawned = std::thread::Builder::new().name(format!("exec-{}-{i}", spec.name)).spawn(move || {
                let mut threads =
                    if cpu_threads == 0 { crate::threads::leave_one_core(cores, instances) } else { cpu_threads };
                if let Some(wait) = wait {
                    // Executor 0 failed when this closes: `start` then stops everything.
                    let Ok(n) = wait.recv() else { return };
                    threads = n;
                }
                if device == Device::Cpu {
                    tch::set_num_threads(threads as i32);
                }
                // A libtorch panic (out of memory at the largest warm-up batch, say) must fail
                // the load, not leave a model that looks ready with no executor.
                let loaded = std::panic::catch_unwind(AssertUnwindSafe(|| {
                    let m = LoadedModel::load(&dir, &thread_spec, device)?;
                    m.warm_up(&warmup, 2)?;
                    let mut measured = None;
                    if measure && tell.is_some() {
                        let choice = crate::threads::choose(cores, instances, &measure_sizes, |n, batch| {
                            tch::set_num_threads(n as i32);
                            m.time_forward(batch, 3)
                        })?;
                        threads = choice.threads;
                        tch::set_num_threads(threads as i32);
                        let largest = crate::threads::chosen_largest_batch(&choice);
                        m.warm_up(&[1, largest], 1)?;
                        let timings = choice.timings;
                        shared.lock().queue.limit_batch(largest);
                        measured = Some(Measured { timings, largest_batch: largest });
                    }
                    Ok((m, measured))
                }))
                .unwrap_or_else(|panic| Err(ModelError::Forward(panic_message(&panic))));
                match loaded {
                    Ok((model, measured)) => {
                        if let Some((chosen, followers)) = tell {
                            for f in &followers {
                                let _ = f.send(threads);
                            }
                            let _ = chosen.send(CpuThreads { threads, measured });
                        }
                        memory.add(model.weight_bytes(&dir) as i64);
                        let _ = ready.send(Ok(()));
                        drop(ready);
                        executor_loop(&shared, &model);
                    }
                    Err(e) => {
                        let _ = ready.send(Err(e));
                    }
                }
            });
            match spawned {
                Ok(handle) => threads.push(handle),
                Err(e) => {
                    let _ = ready_tx
                        .send(Err(ModelError::Device(spec.device, format!("cannot start executor thread: {e}"))));
                }
            }
        }
        drop(ready_tx);
        drop(chosen_tx);
        let mut batcher =
            Batcher { shared, threads: Mutex::new(threads), capacity: spec.batching.queue_capacity, cpu_threads: None };
        let mut ready = 0;
        for result in ready_rx.iter() {
            match result {
                Ok(()) => ready += 1,
                Err(e) => {
                    batcher.shutdown();
                    return Err(e);
                }
            }
        }
        if ready != spec.batching.instances {
            batcher.shutdown();
            return Err(ModelError::Forward(format!("only {ready} of {} executors started", spec.batching.instances)));
        }
        if device == Device::Cpu {
            let chosen = chosen_rx.try_recv().ok();
            if let Some(c) = &chosen {
                let timings: Vec<String> = c
                    .measured
                    .iter()
                    .flat_map(|m| &m.timings)
                    .map(|t| format!("{}×b{}: {:.2} ms", t.threads, t.batch_size, t.forward.as_secs_f64() * 1e3))
                    .collect();
                let how = if c.measured.is_some() { "measured at warm-up" } else { "models.cpu_threads" };
                let largest_batch = c.measured.as_ref().map_or(spec.effective_max_batch(), |m| m.largest_batch);
                tracing::info!(model = %spec.name, instances, threads = c.threads, largest_batch, how, timings = %timings.join(", "), "libtorch threads per executor");
            }
            batcher.cpu_threads = chosen;
        }
        Ok(batcher)
    }

    /// True once the batcher takes no more requests (shutdown, or its model was reloaded or
    /// unloaded).
    pub fn is_closed(&self) -> bool {
        self.shared.lock().closed
    }

    /// Queues a request. Never blocks: a full queue is refused at once, unless a less urgent
    /// entry may be evicted for it (see [`crate::queue`]); `urgent` (a robot's stop) is never
    /// refused.
    pub fn submit(
        &self,
        inputs: Vec<TensorData>,
        priority: Priority,
        deadline: Instant,
        urgent: bool,
    ) -> Result<Ticket, JobError> {
        let state = Arc::new(AtomicU8::new(QUEUED));
        let (reply, rx) = oneshot::channel();
        let job = Job { inputs, state: state.clone(), reply };
        let pushed = {
            let mut st = self.shared.lock();
            if st.closed {
                return Err(JobError::ShuttingDown);
            }
            st.queue.push(job, priority, deadline, Instant::now(), urgent)
        };
        let counters = &self.shared.counters;
        answer_expired(counters, pushed.expired);
        if let Some(evicted) = pushed.evicted
            && evicted.item.state.compare_exchange(QUEUED, ABANDONED, Ordering::AcqRel, Ordering::Acquire).is_ok()
        {
            counters.evicted.fetch_add(1, Ordering::Relaxed);
            let _ = evicted.item.reply.send(Err(JobError::QueueFull { capacity: self.capacity }));
        }
        if pushed.refused.is_some() {
            counters.rejected_queue_full.fetch_add(1, Ordering::Relaxed);
            return Err(JobError::QueueFull { capacity: self.capacity });
        }
        self.shared.wake.notify_one();
        Ok(Ticket { rx, state, deadline, shared: self.shared.clone() })
    }

    /// The libtorch threads of each executor (CPU models).
    pub fn cpu_threads(&self) -> Option<&CpuThreads> {
        self.cpu_threads.as_ref()
    }

    pub fn stats(&self) -> ModelStats {
        let c = &self.shared.counters;
        ModelStats {
            queue_depth: self.shared.lock().queue.len(),
            queue_capacity: self.capacity,
            computed: c.computed.load(Ordering::Relaxed),
            batches: c.batches.load(Ordering::Relaxed),
            rejected_queue_full: c.rejected_queue_full.load(Ordering::Relaxed),
            evicted: c.evicted.load(Ordering::Relaxed),
            dropped_deadline: c.dropped_deadline.load(Ordering::Relaxed),
            dropped_disconnect: c.dropped_disconnect.load(Ordering::Relaxed),
            failed: c.failed.load(Ordering::Relaxed),
        }
    }

    pub fn totals(&self) -> Totals {
        let c = &self.shared.counters;
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Totals {
            success: load(&c.computed),
            fail: load(&c.failed) + load(&c.rejected_queue_full) + load(&c.evicted) + load(&c.dropped_deadline),
            executions: load(&c.batches),
            queue_ns: load(&c.queue_ns),
            compute_ns: load(&c.compute_ns),
            last_inference_unix_ms: load(&c.last_inference_unix_ms),
        }
    }

    /// Stops taking requests, lets the executors finish what is queued, and joins them.
    /// Blocks: call from a blocking context.
    pub fn shutdown(&self) {
        self.shared.lock().closed = true;
        self.shared.wake.notify_all();
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(PoisonError::into_inner));
        for t in threads {
            let _ = t.join();
        }
    }
}

impl Drop for Batcher {
    /// Without [`Batcher::shutdown`] (a cancelled `run`, say), executors are still told to
    /// drain and exit instead of waiting on the condition variable forever.
    fn drop(&mut self) {
        self.shared.lock().closed = true;
        self.shared.wake.notify_all();
    }
}

/// Tells clients whose deadline passed in the queue; each counted once, by whoever abandons it.
fn answer_expired(counters: &Counters, expired: Vec<Queued<Job>>) {
    for e in expired {
        if e.item.state.compare_exchange(QUEUED, ABANDONED, Ordering::AcqRel, Ordering::Acquire).is_ok() {
            counters.dropped_deadline.fetch_add(1, Ordering::Relaxed);
            let _ = e.item.reply.send(Err(JobError::DeadlineExceeded));
        }
    }
}

/// One executor: take a batch, run it, reply; until closed and drained.
fn executor_loop(shared: &Shared, model: &LoadedModel) {
    loop {
        let batch = {
            let mut st = shared.lock();
            loop {
                let now = Instant::now();
                let (next, expired) = st.queue.next(now);
                answer_expired(&shared.counters, expired);
                match next {
                    Next::Batch(batch) => {
                        // More work left: another idle executor may take it meanwhile.
                        if !st.queue.is_empty() {
                            shared.wake.notify_one();
                        }
                        break batch;
                    }
                    Next::WaitUntil(at) => {
                        st = shared
                            .wake
                            .wait_timeout(st, at.saturating_duration_since(now))
                            .unwrap_or_else(PoisonError::into_inner)
                            .0;
                    }
                    Next::Idle if st.closed => return,
                    Next::Idle => st = shared.wake.wait(st).unwrap_or_else(PoisonError::into_inner),
                }
            }
        };
        let started = Instant::now();
        // Claim each request; one abandoned since it was taken is simply left out.
        let batch: Vec<Queued<Job>> = batch
            .into_iter()
            .filter(|q| q.item.state.compare_exchange(QUEUED, STARTED, Ordering::AcqRel, Ordering::Acquire).is_ok())
            .collect();
        if batch.is_empty() {
            continue;
        }
        run_batch(shared, model, batch, started);
    }
}

fn run_batch(shared: &Shared, model: &LoadedModel, batch: Vec<Queued<Job>>, started: Instant) {
    let n = batch.len();
    let samples: Vec<&[TensorData]> = batch.iter().map(|q| q.item.inputs.as_slice()).collect();
    let m = &shared.metrics;
    m.batch_size.observe(n as f64);
    // The batch waited as long as its oldest request.
    if let Some(oldest) = batch.iter().map(|q| q.enqueued).min() {
        m.batch_wait.observe(started.saturating_duration_since(oldest).as_secs_f64());
    }
    m.in_flight.inc();
    let memory = m.gpu_memory_delta.as_ref().and_then(|_| PeakProbe::start(model.device()));
    let result = std::panic::catch_unwind(AssertUnwindSafe(|| model.run(&samples))).unwrap_or_else(|panic| {
        m.panics.inc();
        Err(ModelError::Forward(panic_message(&panic)))
    });
    m.in_flight.dec();
    if let (Some(histogram), Some(delta)) = (&m.gpu_memory_delta, memory.and_then(PeakProbe::finish)) {
        histogram.observe(delta as f64);
    }
    let task = started.elapsed();
    m.busy_ns.fetch_add(task.as_nanos() as u64, Ordering::Relaxed);
    m.task_duration.observe(task.as_secs_f64());
    shared.counters.batches.fetch_add(1, Ordering::Relaxed);
    match result {
        Ok((outputs, inference)) => {
            let c = &shared.counters;
            c.computed.fetch_add(n as u64, Ordering::Relaxed);
            c.compute_ns.fetch_add(inference.as_nanos() as u64 * n as u64, Ordering::Relaxed);
            let now_ms = crate::clock::now_ms();
            c.last_inference_unix_ms.store(now_ms, Ordering::Relaxed);
            m.compute.observe(inference.as_secs_f64());
            for (q, outputs) in batch.into_iter().zip(outputs) {
                let queued = started.saturating_duration_since(q.enqueued);
                c.queue_ns.fetch_add(queued.as_nanos() as u64, Ordering::Relaxed);
                m.queue_wait.observe(queued.as_secs_f64());
                let _ = q.item.reply.send(Ok(Done { outputs, queued, inference, batch_size: n }));
            }
        }
        Err(e) if n > 1 && matches!(e, ModelError::Forward(_) | ModelError::Output(_)) => {
            // One row can fail a whole batch (a value the model cannot take, an output of
            // another shape): each row runs alone, so only the rows that fail by themselves
            // get the error.
            tracing::warn!(batch_size = n, "model forward failed for a batch, running its rows one by one: {e}");
            for q in batch {
                let started = Instant::now();
                run_batch(shared, model, vec![q], started);
            }
        }
        Err(e) => {
            tracing::error!(batch_size = n, "model forward failed: {e}");
            if matches!(e, ModelError::Forward(_)) {
                m.forward_errors.inc();
            }
            let shape = matches!(e, ModelError::Output(_));
            if shape {
                m.output_shape_rejected.inc_by(n as u64);
            }
            shared.counters.failed.fetch_add(n as u64, Ordering::Relaxed);
            for q in batch {
                let e = e.to_string();
                let _ = q.item.reply.send(Err(if shape { JobError::OutputShape(e) } else { JobError::Inference(e) }));
            }
        }
    }
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    let msg = panic
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| panic.downcast_ref::<&str>().copied())
        .unwrap_or("unknown panic");
    format!("panicked: {}", crate::model::first_line(msg))
}

/// A queued request's claim on its result.
///
/// Dropping it before the result arrives (the client disconnected) abandons the request: if
/// its batch has not started, it is never computed.
pub struct Ticket {
    rx: oneshot::Receiver<Result<Done, JobError>>,
    state: Arc<AtomicU8>,
    deadline: Instant,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Ticket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ticket").field("deadline", &self.deadline).finish_non_exhaustive()
    }
}

/// How long past its deadline a queued request's client still waits: an executor that woke
/// late for a batch due before the deadline still runs it (see `queue.rs`), and the client must
/// still be there to take the answer. A request that expires in the queue is told by the queue
/// when the executor next looks, or by this timer.
pub const LATE_WAKE_GRACE: Duration = Duration::from_millis(20);

impl Ticket {
    /// Waits for the result. If the deadline (and [`LATE_WAKE_GRACE`]) passes while the
    /// request is still queued, it is abandoned and `DeadlineExceeded` returned; once its batch
    /// has started, the result is awaited whatever the deadline.
    pub async fn wait(mut self) -> Result<Done, JobError> {
        let deadline = tokio::time::Instant::from_std(self.deadline + LATE_WAKE_GRACE);
        tokio::select! {
            result = &mut self.rx => return flatten(result),
            () = tokio::time::sleep_until(deadline) => {}
        }
        if self.state.compare_exchange(QUEUED, ABANDONED, Ordering::AcqRel, Ordering::Acquire).is_ok() {
            self.shared.counters.dropped_deadline.fetch_add(1, Ordering::Relaxed);
            return Err(JobError::DeadlineExceeded);
        }
        flatten((&mut self.rx).await)
    }
}

fn flatten(r: Result<Result<Done, JobError>, oneshot::error::RecvError>) -> Result<Done, JobError> {
    // The executor drops a reply channel unanswered only when it stops mid-way.
    r.unwrap_or(Err(JobError::ExecutorGone))
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if self.state.compare_exchange(QUEUED, ABANDONED, Ordering::AcqRel, Ordering::Acquire).is_ok() {
            self.shared.counters.dropped_disconnect.fetch_add(1, Ordering::Relaxed);
        }
    }
}
