//! The inference pipeline every endpoint shares (`POST /v1/inference` and OIP infer).
//!
//! An endpoint reads, parses and checks its request — cheap work: the body, the robot's
//! identity, the model, every field's type, size and range, and no image decoded — and hands
//! the pipeline a [`Request`] of one or more rows. Every request then passes the same stages,
//! in this order:
//!
//! | # | stage | what happens | refused with |
//! |---|---|---|---|
//! | 1 | admission | each row's admission policies (rate limits and quotas are charged); one refused row refuses the request | 429 `rate_limited`, 422 `policy_rejected` / `policy_error` |
//! | 2 | bounded decode | the rows' camera images are decoded and normalised on the blocking pool, holding one of the CPU slots; waiting for a slot ends at the request's deadline | 4xx image errors, 504 `deadline_exceeded` |
//! | 3 | submit and wait | every row is queued to the model's batcher and waited for; a model reloaded meanwhile with the same inputs takes them | 503 `queue_full` / `model_changed`, 504, 500 `inference_failed` |
//! | 4 | keep charges | the admission charges are kept, on disk before the answer with `quota.durability = "sync"` | 503 `quota_unavailable` |
//! | 5 | output check and safety | the host refuses a non-finite output; each row's proposed action through the safety policies of the same snapshot | 500 `inference_failed`, 422 |
//! | 6 | timing | where the time went, for the answer | |
//!
//! Every wait is bounded: for a policy slot, a CPU slot or the queue, by the request's deadline;
//! after the batch, for the quota flush and the safety slots, by the deadline's length again.
//!
//! Refused or failed at any stage, a request's charges are given back (its admission outcome
//! is dropped unkept). So a request refused at admission has decoded nothing and one refused
//! before stage 3 has cost no forward. [`Pipeline::count`] counts every answered request,
//! whatever stage answered it.
//!
//! The pipeline knows no HTTP: the endpoints shape its [`Answer`] into their own responses.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::Semaphore;

use crate::fair::FairSlots;
use vla_api::{PolicyTrace, Priority, Timing};

use crate::batcher::Done;
use crate::clock::ms;
use crate::config::LimitsConfig;
use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::model::{SampleOutputs, TensorData};
use crate::policy::{Action, Policies, Refusal, action_kind};
use crate::quota::Status;
use crate::repository::{Model, Models};
use crate::spec::ModelSpec;
use crate::store::RobotRecord;

/// What every request's stages share.
#[derive(Debug)]
pub struct Pipeline {
    models: Arc<Models>,
    policies: Arc<Policies>,
    metrics: Arc<Metrics>,
    limits: Arc<LimitsConfig>,
    /// Bounds CPU-heavy request work (body parsing, image decoding, large answers) running at
    /// once on the blocking pool, so a burst of large requests queues here instead of starving
    /// the machine of threads; shared fairly by robot.
    cpu_slots: Arc<FairSlots>,
    /// Pixels being decoded at once (`limits.max_decode_pixels`): what bounds the memory of
    /// decoded frames, whatever their size.
    pixels: Arc<Semaphore>,
    /// Set when shutdown begins: a closed batcher then means shutdown, not a reload.
    shutting_down: Arc<AtomicBool>,
    /// Robots refused by a quota bucket, until it refills.
    refusals: Refusals,
}

/// One request, parsed and checked by its endpoint.
#[derive(Debug)]
pub struct Request {
    /// The robot asking (from its credentials).
    pub robot: RobotRecord,
    pub model: Arc<Model>,
    /// One per batch row (a `/v1` request has one).
    pub rows: Vec<Row>,
    pub priority: Priority,
    /// From `received` until the request's batch must have started.
    pub deadline_ms: u64,
    pub received: Instant,
    /// Time the endpoint spent parsing the body (part of the answer's `preprocess_ms`).
    pub parsed_in: Duration,
}

/// One row: what its policies see, and the model's inputs in argument order.
#[derive(Debug)]
pub struct Row {
    pub instruction: String,
    pub state: Vec<f32>,
    pub inputs: Vec<Input>,
}

/// One input of a row: a tensor ready for the batch, or an encoded camera image to decode.
#[derive(Debug)]
pub enum Input {
    Ready(TensorData),
    Image(Encoded),
}

/// An encoded JPEG or PNG as it arrived.
#[derive(Debug)]
pub enum Encoded {
    /// Base64 text, optionally a `data:image/…;base64,` URL (JSON bodies).
    Base64(String),
    /// The file's bytes (binary OIP tensors): a slice of the request body, not a copy.
    Raw(Bytes),
}

impl Row {
    /// A robot endpoint row: the image to decode, the instruction as the model's tokens, the
    /// state as sent.
    pub fn robot(spec: &ModelSpec, image: String, instruction: String, state: Vec<f32>) -> Row {
        let pos = spec.robot_inputs();
        let mut inputs: Vec<Input> =
            (0..spec.inputs.len()).map(|_| Input::Ready(TensorData::F32(Vec::new()))).collect();
        inputs[pos.image] = Input::Image(Encoded::Base64(image));
        inputs[pos.instruction] =
            Input::Ready(TensorData::I64(crate::preprocess::instruction_tokens(&instruction, spec.instruction_len())));
        inputs[pos.state] = Input::Ready(TensorData::F32(state.clone()));
        Row { instruction, state, inputs }
    }
}

/// The pipeline's answer.
#[derive(Debug)]
pub struct Answer {
    pub request_id: String,
    /// The model that computed (a reload may have swapped it in since the request named it).
    pub model: Arc<Model>,
    /// In row order.
    pub rows: Vec<RowAnswer>,
    /// The tightest quota bucket after the request's charges, for `RateLimit-*` headers.
    pub quota: Option<Status>,
    pub timing: Timing,
}

/// One row's result.
#[derive(Debug)]
pub struct RowAnswer {
    /// Every output of the model for the row (little-endian bytes of each output's datatype),
    /// the action output holding the final action.
    pub outputs: SampleOutputs,
    /// The final action, after the safety policies.
    pub action: Vec<f32>,
    /// The row's decision chain: admission and safety.
    pub policy: PolicyTrace,
}

impl Pipeline {
    pub fn new(
        models: Arc<Models>,
        policies: Arc<Policies>,
        metrics: Arc<Metrics>,
        limits: LimitsConfig,
        shutting_down: Arc<AtomicBool>,
    ) -> Pipeline {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        let (slots, per_robot) = limits.cpu_slots(cores);
        let pixels = limits.max_decode_pixels.min(u64::from(u32::MAX)) as usize;
        Pipeline {
            models,
            policies,
            metrics,
            limits: Arc::new(limits),
            cpu_slots: FairSlots::new(slots, per_robot),
            pixels: Arc::new(Semaphore::new(pixels)),
            shutting_down,
            refusals: Refusals::default(),
        }
    }

    fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Relaxed)
    }

    /// Runs `work` for `robot` on the blocking pool holding one of the CPU slots (within the
    /// robot's fair share), waiting for a slot until `deadline` at most (then 504 with
    /// `deadline_ms`).
    pub async fn on_cpu<T: Send + 'static>(
        &self,
        robot: &str,
        deadline: Instant,
        deadline_ms: u64,
        work: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
    ) -> Result<T, ApiError> {
        // The slot moves into the blocking task: it bounds the work running, even when the
        // client goes away and the handler is dropped mid-way.
        let slot = self.cpu_slots.acquire(robot, deadline).await.ok_or(ApiError::DeadlineExceeded { deadline_ms })?;
        tokio::task::spawn_blocking(move || {
            let _slot = slot;
            work()
        })
        .await
        .map_err(|e| ApiError::Internal(format!("request task failed: {e}")))?
    }

    /// Stages 1-6 of the module header.
    pub async fn run(&self, request: Request) -> Result<Answer, ApiError> {
        let Request { robot, model, rows, priority, deadline_ms, received, parsed_in } = request;
        let deadline = received + Duration::from_millis(deadline_ms);

        // 1. Admission. The request keeps this snapshot for its safety chain too, whatever an
        // operator changes meanwhile.
        let set = self.policies.snapshot();
        let request_id = uuid::Uuid::new_v4().to_string();
        let now = crate::clock::now_ms();
        let n = rows.len();
        let mut admitted = Vec::with_capacity(n);
        let mut pending = Vec::with_capacity(n);
        // A request with a stop in any row is never refused by a full queue.
        let urgent = rows.iter().any(|r| self.limits.is_stop(&r.instruction));
        // A robot its quota refused is refused again, without running the chain, until the
        // bucket refills (a stop still runs it).
        let memo = Memo { set: Arc::as_ptr(&set) as usize, quota_changes: self.policies.quotas().changes() };
        if !urgent && let Some(refusal) = self.refusals.check(&robot.robot_id, now, memo) {
            self.refused_again(&robot, &model.spec.name, &request_id, now, &refusal);
            return Err(ApiError::PolicyRefused(refusal));
        }
        for (i, row) in rows.into_iter().enumerate() {
            let id = if n == 1 { request_id.clone() } else { format!("{request_id}/{i}") };
            let ctx = crate::policy::context(&id, &robot, &model.spec.name, row.instruction, row.state, now);
            // Waiting for a policy slot ends at the deadline, like everything before the batch.
            let admit = self.policies.admit(&set, &ctx, &robot.group);
            let passed = match tokio::time::timeout_at(deadline.into(), admit).await {
                Err(_) => return Err(ApiError::DeadlineExceeded { deadline_ms }),
                Ok(Ok(passed)) => passed,
                Ok(Err(refusal)) => {
                    if !urgent {
                        self.refusals.remember(&robot.robot_id, now, memo, &refusal);
                    }
                    return Err(ApiError::PolicyRefused(refusal));
                }
            };
            admitted.push((ctx, passed));
            pending.push(row.inputs);
        }

        // 2. Bounded decode.
        let decode_started = Instant::now();
        let samples = if pending.iter().flatten().any(|i| matches!(i, Input::Image(_))) {
            let (spec, limits) = (model.spec.clone(), self.limits.clone());
            let budget = PixelBudget {
                pixels: self.pixels.clone(),
                runtime: tokio::runtime::Handle::current(),
                deadline,
                deadline_ms,
            };
            let decode = move || decode_rows(&spec, pending, &limits, &budget);
            let samples = self.on_cpu(&robot.robot_id, deadline, deadline_ms, decode).await?;
            model.metrics.image_decode.observe(decode_started.elapsed().as_secs_f64());
            samples
        } else {
            pending.into_iter().map(|inputs| inputs.into_iter().map(Input::into_ready).collect()).collect()
        };
        let preprocess = parsed_in + decode_started.elapsed();

        // 3. Submit and wait.
        let (model, done) = self.compute(model, samples, priority, urgent, deadline, deadline_ms).await?;

        // 4. Computed: each row's charge is kept (and on disk before the answer, in sync mode).
        // After its batch, a request waits for its flush and its safety slots at most its
        // deadline's length again.
        let after = Instant::now() + Duration::from_millis(deadline_ms);
        for (_, passed) in &admitted {
            tokio::time::timeout_at(after.into(), passed.keep_charges()).await.map_err(|_| {
                ApiError::QuotaUnavailable(format!("the charge was not on disk within {deadline_ms} ms"))
            })??;
        }
        // The tightest bucket after the last row's charge goes in the `RateLimit-*` headers.
        let quota = admitted.iter().filter_map(|(_, p)| p.quota_status()).min_by_key(|s| (s.remaining, s.reset_ms));

        // 5. Safety, on the outputs of the model that computed.
        let spec = &model.spec;
        let action_output = spec.robot_inputs().action_output;
        let expected = spec.action.dof * spec.action.horizon;
        let timing = Timing {
            total_ms: 0.0,
            queue_ms: ms(done.iter().map(|d| d.queued).max().unwrap_or_default()),
            preprocess_ms: ms(preprocess),
            inference_ms: ms(done.first().map(|d| d.inference).unwrap_or_default()),
            batch_size: done.first().map_or(0, |d| d.batch_size),
        };
        let mut answers = Vec::with_capacity(n);
        for ((ctx, passed), Done { mut outputs, .. }) in admitted.into_iter().zip(done) {
            // The host checks the model's output before any policy sees it: a non-finite value
            // is never shown to a policy nor sent to a robot.
            if let Err(problem) = check_outputs(spec, &outputs) {
                self.output_rejected(&model, &ctx, &outputs, &problem);
                return Err(ApiError::Inference { model: spec.name.clone(), reason: problem.to_string() });
            }
            let values = crate::model::f32s(&outputs[action_output]);
            if values.len() != expected {
                return Err(ApiError::Internal(format!(
                    "model `{}` returned {} action values, not dof × horizon = {expected}; nothing was sent",
                    spec.name,
                    values.len()
                )));
            }
            let proposed = Action {
                kind: action_kind(spec.action.kind),
                dof: spec.action.dof as u32,
                horizon: spec.action.horizon as u32,
                values,
            };
            let safety = self.policies.check_action(&set, ctx, &passed, proposed);
            let (action, policy) = tokio::time::timeout_at(after.into(), safety)
                .await
                .map_err(|_| ApiError::DeadlineExceeded { deadline_ms })??;
            outputs[action_output] = action.iter().flat_map(|v| v.to_le_bytes()).collect();
            answers.push(RowAnswer { outputs, action, policy });
        }

        // 6. Timing.
        let timing = Timing { total_ms: ms(received.elapsed()), ..timing };
        Ok(Answer { request_id, model, rows: answers, quota, timing })
    }

    /// Queues every sample (one per row) and waits for all their results. A sample refused by
    /// the queue drops the others' tickets, which abandons them if their batch has not started.
    ///
    /// If `model` was reloaded while the request was being prepared, its samples go to the new
    /// version when that takes the same inputs; otherwise the client is told to retry. Returns
    /// the model that computed them.
    async fn compute(
        &self,
        model: Arc<Model>,
        samples: Vec<Vec<TensorData>>,
        priority: Priority,
        urgent: bool,
        deadline: Instant,
        deadline_ms: u64,
    ) -> Result<(Arc<Model>, Vec<Done>), ApiError> {
        let mut model = model;
        if model.batcher.is_closed() && !self.is_shutting_down() {
            let current = self.models.resolve(Some(&model.spec.name))?;
            if current.spec.inputs != model.spec.inputs || current.spec.preprocess != model.spec.preprocess {
                return Err(ApiError::ModelChanged(model.spec.name.clone()));
            }
            model = current;
        }
        let job_error = |e| match e {
            // Closed between the check above and the submit: a reload or unload, not a shutdown.
            crate::batcher::JobError::ShuttingDown if !self.is_shutting_down() => {
                ApiError::ModelChanged(model.spec.name.clone())
            }
            e => ApiError::from_job(e, &model.spec.name, deadline_ms),
        };
        let tickets = samples
            .into_iter()
            .map(|s| model.batcher.submit(s, priority, deadline, urgent))
            .collect::<Result<Vec<_>, _>>()
            .map_err(job_error)?;
        let mut done = Vec::with_capacity(tickets.len());
        for ticket in tickets {
            done.push(ticket.wait().await.map_err(job_error)?);
        }
        Ok((model, done))
    }

    /// Counts and audits a request refused from the memo, as the chain would have: its
    /// identical denial folds into the robot's audit record.
    fn refused_again(&self, robot: &RobotRecord, model: &str, request_id: &str, now: u64, refusal: &Refusal) {
        use crate::metrics::Family;
        let m = &self.metrics;
        m.cached(Family::SafetyChecks, &["deny"]).inc();
        if let Some(status) = &refusal.rate_limit {
            m.cached(Family::RateLimitHits, &[&robot.robot_id, status.bucket.as_str()]).inc();
        }
        self.policies.audit().append(vec![vla_api::AuditRecord {
            seq: 0,
            time_unix_ms: now,
            request_id: request_id.into(),
            robot_id: robot.robot_id.clone(),
            robot_type: robot.robot_type.clone(),
            model: model.into(),
            policy: refusal.policy.clone(),
            version: refusal.version,
            world: "admission".into(),
            mode: "enforce".into(),
            decision: "deny".into(),
            applied: true,
            code: Some(refusal.code.clone()),
            reason: Some(refusal.reason.clone()),
            original_action: None,
            final_action: None,
            count: 1,
            last_unix_ms: None,
        }]);
    }

    /// Counts and audits a row whose output the host refused.
    fn output_rejected(
        &self,
        model: &Model,
        ctx: &crate::policy::RequestContext,
        outputs: &SampleOutputs,
        problem: &OutputProblem,
    ) {
        self.metrics.output_rejected.with_label_values(&[&model.spec.name, problem.kind()]).inc();
        let action_output = model.spec.robot_inputs().action_output;
        self.policies.audit().append(vec![vla_api::AuditRecord {
            seq: 0,
            time_unix_ms: ctx.time_ms,
            request_id: ctx.request_id.clone(),
            robot_id: ctx.robot_id.clone(),
            robot_type: ctx.robot_type.clone(),
            model: ctx.model.clone(),
            policy: "(host)".into(),
            version: 0,
            world: "output".into(),
            mode: "enforce".into(),
            decision: "error".into(),
            applied: true,
            code: Some(problem.kind().into()),
            reason: Some(problem.to_string()),
            original_action: Some(crate::model::f32s(&outputs[action_output])),
            final_action: None,
            count: 1,
            last_unix_ms: None,
        }]);
    }

    /// Counts one answered inference request, whichever stage answered it (`status` is
    /// `success` or [`ApiError::request_status`]): `vla_inference_requests_total` by model
    /// (`none` when the request named no serving model), robot type and status, the robot's
    /// own series, and the model's `vla_inference_duration_seconds`.
    pub fn count(&self, robot: Option<&RobotRecord>, model: Option<&Model>, status: &str, received: Instant) {
        let robot_type = robot.map_or("none", |r| r.robot_type.as_str());
        if let Some(robot) = robot {
            self.metrics.robot_request(&robot.robot_id, status);
        }
        match model {
            Some(m) => {
                self.metrics.request(&m.spec.name, robot_type, status);
                m.metrics.duration.observe(received.elapsed().as_secs_f64());
            }
            None => self.metrics.request("none", robot_type, status),
        }
    }
}

impl Input {
    /// The tensor of an input that needs no decoding (an image input here is a bug upstream:
    /// [`Pipeline::run`] decodes whenever a row has one).
    fn into_ready(self) -> TensorData {
        match self {
            Input::Ready(t) => t,
            Input::Image(_) => TensorData::F32(Vec::new()),
        }
    }
}

/// What a remembered refusal was decided under: the policy set in force and the operator's
/// quota changes; either changed, it no longer holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Memo {
    set: usize,
    quota_changes: u64,
}

/// Robots a quota bucket refused, with the refusal, until the bucket refills. Bounded by the
/// registered robots (only they reach admission).
#[derive(Debug, Default)]
struct Refusals {
    by_robot: std::sync::Mutex<std::collections::HashMap<String, Remembered>>,
}

/// A refusal, until when it holds, and under what.
type Remembered = (u64, Memo, Box<Refusal>);

impl Refusals {
    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, Remembered>> {
        self.by_robot.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Remembers `refusal` when a quota bucket made it (a denial on content, or a failure, is
    /// decided anew each time).
    fn remember(&self, robot: &str, now_ms: u64, memo: Memo, refusal: &Refusal) {
        if refusal.failed {
            return;
        }
        let Some(status) = refusal.rate_limit else { return };
        if status.retry_after_ms == 0 {
            return;
        }
        self.lock().insert(robot.to_string(), (now_ms + status.retry_after_ms, memo, Box::new(refusal.clone())));
    }

    /// The refusal `robot` still has at `now_ms` under `memo`, with its wait brought up to date.
    fn check(&self, robot: &str, now_ms: u64, memo: Memo) -> Option<Box<Refusal>> {
        let mut by_robot = self.lock();
        let (until, seen, refusal) = by_robot.get(robot)?;
        if *until <= now_ms || *seen != memo {
            by_robot.remove(robot);
            return None;
        }
        let mut refusal = refusal.clone();
        if let Some(status) = &mut refusal.rate_limit {
            status.retry_after_ms = until - now_ms;
        }
        Some(refusal)
    }
}

/// Why the host refused a model's output.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum OutputProblem {
    #[error("output `{output}` has a non-finite value ({value}) at element {index}{at}; nothing was sent")]
    NonFinite { output: String, index: usize, value: f32, at: String },
}

impl OutputProblem {
    /// The label of `vla_model_output_rejected_total` and the audit record's code.
    pub fn kind(&self) -> &'static str {
        match self {
            OutputProblem::NonFinite { .. } => "non_finite_output",
        }
    }
}

/// Every floating-point output finite (the shapes were checked when the batch was split).
pub fn check_outputs(spec: &ModelSpec, outputs: &SampleOutputs) -> Result<(), OutputProblem> {
    use crate::spec::DataType;
    let action_output = spec.robot_inputs().action_output;
    for (i, (t, bytes)) in spec.outputs.iter().zip(outputs).enumerate() {
        let bad = match t.dtype {
            DataType::Fp32 => bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .enumerate()
                .find(|(_, v)| !v.is_finite()),
            DataType::Fp64 => bytes
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().unwrap_or([0; 8])) as f32)
                .enumerate()
                .find(|(_, v)| !v.is_finite()),
            DataType::Fp16 => bytes
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .enumerate()
                .find(|(_, v)| !v.is_finite()),
            _ => None,
        };
        if let Some((index, value)) = bad {
            let at = if i == action_output {
                format!(" (action step {}, dof {})", index / spec.action.dof, index % spec.action.dof)
            } else {
                String::new()
            };
            return Err(OutputProblem::NonFinite { output: t.name.clone(), index, value, at });
        }
    }
    Ok(())
}

/// The pixel budget as a decode on the blocking pool takes from it.
struct PixelBudget {
    pixels: Arc<Semaphore>,
    runtime: tokio::runtime::Handle,
    deadline: Instant,
    deadline_ms: u64,
}

impl PixelBudget {
    /// Takes `n` pixels, waiting until the deadline at most. Blocking (a blocking-pool thread).
    fn take(&self, n: u64) -> Result<tokio::sync::OwnedSemaphorePermit, ApiError> {
        let n = u32::try_from(n).map_err(|_| ApiError::DeadlineExceeded { deadline_ms: self.deadline_ms })?;
        let wait = tokio::time::timeout_at(self.deadline.into(), self.pixels.clone().acquire_many_owned(n));
        match self.runtime.block_on(wait) {
            Ok(Ok(permit)) => Ok(permit),
            Ok(Err(_)) => Err(ApiError::ShuttingDown),
            Err(_) => Err(ApiError::DeadlineExceeded { deadline_ms: self.deadline_ms }),
        }
    }
}

/// Decodes every row's images into the model's image tensor, each frame holding its pixels
/// from the budget while it is decoded. Blocking.
fn decode_rows(
    spec: &ModelSpec,
    rows: Vec<Vec<Input>>,
    limits: &LimitsConfig,
    budget: &PixelBudget,
) -> Result<Vec<Vec<TensorData>>, ApiError> {
    rows.into_iter()
        .map(|inputs| {
            inputs
                .into_iter()
                .map(|input| match input {
                    Input::Ready(t) => Ok(t),
                    Input::Image(encoded) => {
                        let decoded;
                        let bytes: &[u8] = match &encoded {
                            Encoded::Base64(text) => {
                                decoded = crate::preprocess::base64_file(text, limits)?;
                                &decoded
                            }
                            Encoded::Raw(bytes) => bytes,
                        };
                        let probe = crate::preprocess::probe(bytes, limits)?;
                        let _pixels = budget.take(probe.pixels())?;
                        let image = crate::preprocess::decode_probed(bytes, &probe)?;
                        Ok(TensorData::F32(crate::preprocess::image_tensor(&image, &spec.preprocess.image)))
                    }
                })
                .collect()
        })
        .collect()
}
