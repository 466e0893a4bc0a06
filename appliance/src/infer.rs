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
//! | 5 | output check and safety | the host refuses a non-finite output; each row's proposed action through the safety policies of the same snapshot; then the model's action envelope on the final action (`envelope.rs`: deny or clamp) | 500 `inference_failed`, 422 (`action_out_of_envelope`) |
//! | 6 | timing | where the time went, for the answer | |
//!
//! Every wait is bounded: for a policy slot, a CPU slot or the queue, by the request's deadline;
//! after the batch, for the quota flush and the safety slots, by the deadline's length again.
//!
//! Refused or failed before its forward, a request's charges are given back (its admission
//! outcome is dropped unkept); once its forward ran, they are kept, whatever the answer (an
//! output of the wrong shape, a non-finite or denied action). So a request refused at admission
//! has decoded nothing and one refused before stage 3 has cost no forward. [`Pipeline::count`] counts every answered request,
//! whatever stage answered it.
//!
//! The pipeline knows no HTTP: the endpoints shape its [`Answer`] into their own responses.
//! Two bends of the layout's rules, on purpose: its errors are [`ApiError`] (each stage's
//! refusal already is one status and code, converted from the domain errors in `error.rs`; a
//! pipeline error type would repeat its variants one for one), and an OIP request's tensors
//! are parsed before the pipeline, within the model's default deadline, since the request's own
//! deadline (`timeout` parameter) is known only once it is parsed.

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
use crate::policy::{Action, Policies, Provenance, Refusal, action_kind};
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
    /// As the robot sent it (the model's input is normalised).
    pub state: Vec<f32>,
    pub inputs: Vec<Input>,
    /// The noise seed the robot asked for; else the pipeline picks one.
    pub seed: Option<u64>,
}

/// One input of a row: a tensor ready for the batch, a camera frame to decode, or noise the
/// host makes from the row's seed.
#[derive(Debug)]
pub enum Input {
    Ready(TensorData),
    Frame { camera: usize, field: String, frame: Frame },
    Noise,
}

/// A camera frame as it arrived.
#[derive(Debug)]
pub enum Frame {
    /// An encoded JPEG or PNG as base64 text, optionally a `data:image/…;base64,` URL (JSON).
    Base64(String),
    /// An encoded file's bytes (binary OIP tensors): a slice of the request body, not a copy.
    File(Bytes),
    /// Raw RGB pixels, base64 text (`"encoding": "rgb8"`).
    Rgb8 { width: u32, height: u32, base64: String },
    /// Raw RGB pixels, row-major `height × width × 3` bytes (an openpi `uint8` array).
    Pixels { width: u32, height: u32, data: Bytes },
}

impl Frame {
    /// The frame a robot's JSON sent (`"<base64>"` or `{"encoding": "rgb8", …}`).
    pub fn from_wire(wire: vla_api::FrameWire, field: &str) -> Result<Frame, ApiError> {
        match wire {
            vla_api::FrameWire::Encoded(text) => Ok(Frame::Base64(text)),
            vla_api::FrameWire::Raw { encoding, width, height, data } if encoding == "rgb8" => {
                Ok(Frame::Rgb8 { width, height, base64: data })
            }
            vla_api::FrameWire::Raw { encoding, .. } => Err(ApiError::InvalidField {
                field: format!("{field}.encoding"),
                problem: format!(
                    "`{}` is not served; send `rgb8`, or the JPEG/PNG file as base64",
                    crate::names::clip(&encoding, 40)
                ),
            }),
        }
    }
}

/// What a robot sent for one row, before it is checked against the model.
#[derive(Debug)]
pub struct RobotRow {
    /// `image` (the one-camera models' field), if sent.
    pub image: Option<Frame>,
    /// `images`, by camera name.
    pub images: std::collections::BTreeMap<String, Frame>,
    pub instruction: String,
    pub state: Vec<f32>,
    /// `extra`, by extra input name.
    pub extra: std::collections::BTreeMap<String, serde_json::Value>,
    pub seed: Option<u64>,
}

impl Row {
    /// A robot's row, checked against `model` (cameras, instruction tokens, state, extra
    /// inputs), every input but the frames and the noise ready for the batch. Cheap: nothing
    /// is decoded.
    pub fn robot(model: &Model, sent: RobotRow) -> Result<Row, ApiError> {
        use crate::spec::Feed;
        let spec = &model.spec;
        let RobotRow { image, mut images, instruction, state, mut extra, seed } = sent;
        if let Some(image) = image {
            let camera = match spec.cameras.len() {
                1 => &spec.cameras[0],
                _ => {
                    return Err(ApiError::InvalidField {
                        field: "image".into(),
                        problem: format!(
                            "model `{}` has {} cameras ({}): send `images` by camera name",
                            spec.name,
                            spec.cameras.len(),
                            camera_names(spec)
                        ),
                    });
                }
            };
            if images.contains_key(&camera.name) {
                return Err(ApiError::InvalidField {
                    field: "image".into(),
                    problem: format!("camera `{}` is also in `images`: send it once", camera.name),
                });
            }
            images.insert(camera.name.clone(), image);
        }
        if let Some(unknown) = images.keys().find(|n| !spec.cameras.iter().any(|c| &&c.name == n)) {
            return Err(ApiError::InvalidField {
                field: format!("images.{}", crate::names::clip(unknown, 40)),
                problem: format!("not a camera of model `{}` (cameras: {})", spec.name, camera_names(spec)),
            });
        }
        if let Some(unknown) = extra.keys().find(|n| !spec.extra_inputs.iter().any(|e| &&e.name == n)) {
            return Err(ApiError::InvalidField {
                field: format!("extra.{}", crate::names::clip(unknown, 40)),
                problem: format!("not an extra input of model `{}`", spec.name),
            });
        }
        let tokens = model.text.encode(&instruction).map_err(|e| ApiError::from_text("instruction", e))?;
        let mut inputs = Vec::with_capacity(spec.inputs.len());
        for (i, feed) in spec.feeds.iter().enumerate() {
            let t = &spec.inputs[i];
            inputs.push(match *feed {
                Feed::Camera(c) => {
                    let camera = &spec.cameras[c];
                    let field = if spec.cameras.len() == 1 && !images.contains_key(&camera.name) {
                        "image".to_string()
                    } else {
                        format!("images.{}", camera.name)
                    };
                    match images.remove(&camera.name) {
                        Some(frame) => Input::Frame { camera: c, frame, field },
                        None if camera.required => {
                            return Err(ApiError::CameraMissing {
                                field,
                                model: spec.name.clone(),
                                camera: camera.name.clone(),
                            });
                        }
                        None => Input::Ready(crate::preprocess::blank_frame(camera)),
                    }
                }
                Feed::TokenIds => Input::Ready(TensorData::ints(t.dtype, tokens.ids.clone())),
                Feed::TokenMask => Input::Ready(TensorData::ints(t.dtype, tokens.mask.clone())),
                Feed::State => Input::Ready(TensorData::F32(crate::preprocess::normalise_state(spec, &state))),
                Feed::Noise(_) => Input::Noise,
                Feed::Extra(e) => {
                    let x = &spec.extra_inputs[e];
                    match extra.remove(&x.name) {
                        Some(value) => Input::Ready(extra_tensor(&format!("extra.{}", x.name), t, &value)?),
                        None if x.required => {
                            return Err(ApiError::InvalidValue {
                                field: format!("extra.{}", x.name),
                                problem: format!(
                                    "required by model `{}` ({} {:?})",
                                    spec.name,
                                    t.dtype.as_str(),
                                    &t.dims[1..]
                                ),
                            });
                        }
                        None => Input::Ready(TensorData::zeros(t.dtype, t.sample_len())),
                    }
                }
            });
        }
        Ok(Row { instruction, state, inputs, seed })
    }
}

fn camera_names(spec: &ModelSpec) -> String {
    spec.cameras.iter().map(|c| c.name.as_str()).collect::<Vec<_>>().join(", ")
}

/// A robot-supplied extra input (a number, or nested lists of them) as tensor `t`'s sample.
fn extra_tensor(field: &str, t: &crate::spec::TensorSpec, value: &serde_json::Value) -> Result<TensorData, ApiError> {
    use crate::spec::DataType;
    let mut flat = Vec::new();
    let mut stack = vec![value];
    while let Some(v) = stack.pop() {
        match v {
            serde_json::Value::Array(items) => stack.extend(items.iter().rev()),
            serde_json::Value::Bool(b) if t.dtype == DataType::Bool => flat.push(f64::from(u8::from(*b))),
            serde_json::Value::Number(n) => flat.push(n.as_f64().unwrap_or(f64::NAN)),
            _ => {
                return Err(ApiError::InvalidValue {
                    field: field.into(),
                    problem: format!(
                        "must be numbers ({} {:?}), got {}",
                        t.dtype.as_str(),
                        &t.dims[1..],
                        crate::names::clip(&v.to_string(), 40)
                    ),
                });
            }
        }
        if flat.len() > t.sample_len() {
            break;
        }
    }
    if flat.len() != t.sample_len() {
        return Err(ApiError::InvalidValue {
            field: field.into(),
            problem: format!(
                "needs {} values ({:?}), got {}",
                t.sample_len(),
                &t.dims[1..],
                if flat.len() > t.sample_len() { "more".to_string() } else { flat.len().to_string() }
            ),
        });
    }
    let bad = |i: usize, what: &str| ApiError::InvalidValue { field: format!("{field}[{i}]"), problem: what.into() };
    Ok(match t.dtype {
        DataType::Fp32 => TensorData::F32(
            flat.iter()
                .enumerate()
                .map(|(i, &x)| {
                    if (x as f32).is_finite() {
                        Ok(x as f32)
                    } else {
                        Err(bad(i, "must be a finite number within f32 range"))
                    }
                })
                .collect::<Result<_, _>>()?,
        ),
        DataType::Bool => TensorData::Bool(flat.iter().map(|&x| x != 0.0).collect()),
        dtype => {
            let (lo, hi) = match dtype {
                DataType::Uint8 => (0.0, 255.0),
                DataType::Int32 => (f64::from(i32::MIN), f64::from(i32::MAX)),
                _ => (-(2f64.powi(53)), 2f64.powi(53)),
            };
            let ints = flat
                .iter()
                .enumerate()
                .map(|(i, &x)| {
                    if x.fract() == 0.0 && (lo..=hi).contains(&x) {
                        Ok(x as i64)
                    } else {
                        Err(bad(i, &format!("must be a whole number in {lo}..={hi}")))
                    }
                })
                .collect::<Result<Vec<_>, _>>()?;
            TensorData::ints(dtype, ints)
        }
    })
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
    /// The noise seed the row ran with (models with `[[noise]]` inputs).
    pub seed: Option<u64>,
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
        // Each row's noise seed: the robot's, else a fresh one (it goes into the audit record,
        // so that the decision can be replayed).
        let noisy = !model.spec.noise.is_empty();
        let seeds: Vec<u64> = rows.iter().map(|r| r.seed.unwrap_or_else(crate::noise::fresh_seed)).collect();
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
            let provenance =
                Provenance { seed: noisy.then_some(seeds[i]), model_version: Some(model.spec.version.clone()) };
            // Waiting for a policy slot ends at the deadline, like everything before the batch.
            let admit = self.policies.admit(&set, &ctx, &robot.group, provenance);
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
        let pending = if pending.iter().flatten().any(|i| matches!(i, Input::Frame { .. })) {
            let (spec, limits) = (model.spec.clone(), self.limits.clone());
            let budget = PixelBudget {
                pixels: self.pixels.clone(),
                runtime: tokio::runtime::Handle::current(),
                deadline,
                deadline_ms,
            };
            let decode = move || decode_rows(&spec, pending, &limits, &budget);
            let decoded = self.on_cpu(&robot.robot_id, deadline, deadline_ms, decode).await?;
            model.metrics.image_decode.observe(decode_started.elapsed().as_secs_f64());
            decoded
        } else {
            pending
        };
        let samples: Vec<Vec<TensorData>> =
            pending.into_iter().zip(&seeds).map(|(inputs, &seed)| fill_noise(&model.spec, inputs, seed)).collect();
        let preprocess = parsed_in + decode_started.elapsed();

        // 3. Submit and wait.
        let (model, done) = match self.compute(model, samples, priority, urgent, deadline, deadline_ms).await {
            Ok(computed) => computed,
            Err(Uncomputed::Refused(e)) => return Err(e),
            Err(Uncomputed::Shape { model, row, problem }) => {
                self.output_rejected(&model, &admitted[row].0, None, &problem, noisy.then_some(seeds[row]));
                // Its forward ran (its input made the model misbehave): what it cost stays
                // charged, as for an action refused as non-finite. Best effort: the answer is
                // an error either way.
                let after = Instant::now() + Duration::from_millis(deadline_ms);
                for (_, passed) in &admitted {
                    let _ = tokio::time::timeout_at(after.into(), passed.keep_charges()).await;
                }
                return Err(ApiError::Inference { model: model.spec.name.clone(), reason: problem.to_string() });
            }
        };

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
        let action_output = spec.action_output;
        let expected = spec.action.dof * spec.action.horizon;
        let timing = Timing {
            total_ms: 0.0,
            queue_ms: ms(done.iter().map(|d| d.queued).max().unwrap_or_default()),
            preprocess_ms: ms(preprocess),
            inference_ms: ms(done.first().map(|d| d.inference).unwrap_or_default()),
            batch_size: done.first().map_or(0, |d| d.batch_size),
        };
        let mut answers = Vec::with_capacity(n);
        for (r, ((ctx, passed), Done { mut outputs, .. })) in admitted.into_iter().zip(done).enumerate() {
            let seed = noisy.then_some(seeds[r]);
            // The action in the robot's units: the shipped statistics undone, every step.
            if let (Some(mean), Some(std)) = (&spec.action.mean, &spec.action.std) {
                let mut values = crate::model::f32s(&outputs[action_output]);
                for (k, v) in values.iter_mut().enumerate() {
                    let d = k % spec.action.dof;
                    *v = *v * std[d] + mean[d];
                }
                outputs[action_output] = values.iter().flat_map(|v| v.to_le_bytes()).collect();
            }
            // The host checks the model's output before any policy sees it: a non-finite value
            // is never shown to a policy nor sent to a robot.
            if let Err(problem) = check_outputs(spec, &outputs) {
                self.output_rejected(&model, &ctx, Some(&outputs), &problem, seed);
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
            // Kept for the envelope's memory and audit once the context went to the chain.
            let who = ctx.clone();
            let provenance = Provenance { seed, model_version: Some(spec.version.clone()) };
            let safety = self.policies.check_action(&set, ctx, &passed, proposed, provenance);
            let checked = tokio::time::timeout_at(after.into(), safety)
                .await
                .map_err(|_| ApiError::DeadlineExceeded { deadline_ms })?;
            let (mut action, mut policy) = checked.inspect_err(|_| self.metrics.safety_outcome(false))?;
            // 5b. The envelope, on the final action: no policy gets past it.
            if let Some(envelope) = &spec.action.envelope {
                let dof = spec.action.dof;
                let previous = model.last_actions.previous(&who.robot_id);
                let before = action.clone();
                match crate::envelope::apply(envelope, dof, &mut action, previous.as_deref()) {
                    Ok(None) => {}
                    Ok(Some(first)) => {
                        self.envelope_violated(&model, &who, "clamp", &first, before, Some(action.clone()), seed);
                        policy.decision = "modify".into();
                        policy.policies.push(vla_api::PolicyEval {
                            name: "envelope".into(),
                            version: 0,
                            world: "host".into(),
                            mode: "enforce".into(),
                            decision: "modify".into(),
                            code: Some(format!("out_of_envelope_{}", first.kind())),
                            reason: Some(format!("clamped into [action.envelope]; first: {first}")),
                            severity: None,
                            eval_us: 0,
                        });
                    }
                    Err(violation) => {
                        self.metrics.safety_outcome(false);
                        self.envelope_violated(&model, &who, "deny", &violation, before, None, seed);
                        return Err(ApiError::ActionOutOfEnvelope {
                            model: spec.name.clone(),
                            violation: violation.to_string(),
                        });
                    }
                }
                model.last_actions.remember(&who.robot_id, &action[..dof.min(action.len())]);
            }
            self.metrics.safety_outcome(policy.decision == "allow");
            outputs[action_output] = action.iter().flat_map(|v| v.to_le_bytes()).collect();
            answers.push(RowAnswer { outputs, action, policy, seed });
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
    ) -> Result<(Arc<Model>, Vec<Done>), Uncomputed> {
        let mut model = model;
        if model.batcher.is_closed() && !self.is_shutting_down() {
            let current = self.models.resolve(Some(&model.spec.name)).map_err(ApiError::from)?;
            if !current.spec.same_inputs(&model.spec) {
                return Err(ApiError::ModelChanged(model.spec.name.clone()).into());
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
        for (row, ticket) in tickets.into_iter().enumerate() {
            match ticket.wait().await {
                Ok(d) => done.push(d),
                Err(crate::batcher::JobError::OutputShape(reason)) => {
                    return Err(Uncomputed::Shape {
                        model: model.clone(),
                        row,
                        problem: OutputProblem::Shape { reason },
                    });
                }
                Err(e) => return Err(job_error(e).into()),
            }
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
            m.rate_limited(&robot.robot_id, status.bucket.as_str());
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
            count: 1,
            ..vla_api::AuditRecord::default()
        }]);
    }

    /// Counts and audits a final action outside the model's envelope (`action`: `deny` or
    /// `clamp`).
    #[allow(clippy::too_many_arguments)]
    fn envelope_violated(
        &self,
        model: &Model,
        who: &crate::policy::RequestContext,
        action: &str,
        violation: &crate::envelope::Violation,
        original: Vec<f32>,
        clamped: Option<Vec<f32>>,
        seed: Option<u64>,
    ) {
        self.metrics.envelope_violations.with_label_values(&[&model.spec.name, action, violation.kind()]).inc();
        if action == "deny" {
            self.metrics.incident("high", &format!("out_of_envelope_{}", violation.kind()));
        }
        self.policies.audit().append(vec![vla_api::AuditRecord {
            seq: 0,
            time_unix_ms: who.time_ms,
            request_id: who.request_id.clone(),
            robot_id: who.robot_id.clone(),
            robot_type: who.robot_type.clone(),
            model: who.model.clone(),
            policy: "envelope".into(),
            version: 0,
            world: "host".into(),
            mode: "enforce".into(),
            decision: if action == "deny" { "deny" } else { "modify" }.into(),
            applied: true,
            code: Some(format!("out_of_envelope_{}", violation.kind())),
            reason: Some(violation.to_string()),
            severity: (action == "deny").then(|| "high".into()),
            model_version: Some(model.spec.version.clone()),
            instruction: Some(who.instruction.clone()),
            state: Some(who.state.clone()),
            original_action: Some(original),
            final_action: clamped,
            count: 1,
            seed,
            ..vla_api::AuditRecord::default()
        }]);
    }

    /// Counts and audits a row whose output the host refused.
    fn output_rejected(
        &self,
        model: &Model,
        ctx: &crate::policy::RequestContext,
        outputs: Option<&SampleOutputs>,
        problem: &OutputProblem,
        seed: Option<u64>,
    ) {
        // Shapes are counted by the batcher, which saw every row of the batch.
        if !matches!(problem, OutputProblem::Shape { .. }) {
            self.metrics.output_rejected.with_label_values(&[&model.spec.name, problem.kind()]).inc();
        }
        let action_output = model.spec.action_output;
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
            model_version: Some(model.spec.version.clone()),
            instruction: Some(ctx.instruction.clone()),
            state: Some(ctx.state.clone()),
            original_action: outputs.map(|o| crate::model::f32s(&o[action_output])),
            count: 1,
            seed,
            ..vla_api::AuditRecord::default()
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

/// Why [`Pipeline::compute`] has no outputs for a request.
enum Uncomputed {
    Refused(ApiError),
    /// Row `row`'s outputs were not the model's declared shapes (audited by the caller).
    Shape {
        model: Arc<Model>,
        row: usize,
        problem: OutputProblem,
    },
}

impl From<ApiError> for Uncomputed {
    fn from(e: ApiError) -> Uncomputed {
        Uncomputed::Refused(e)
    }
}

/// Why the host refused a model's output.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum OutputProblem {
    #[error("output `{output}` has a non-finite value ({value}) at element {index}{at}; nothing was sent")]
    NonFinite { output: String, index: usize, value: f32, at: String },
    #[error("{reason}; nothing was sent")]
    Shape { reason: String },
}

impl OutputProblem {
    /// The label of `vla_model_output_rejected_total` and the audit record's code.
    pub fn kind(&self) -> &'static str {
        match self {
            OutputProblem::NonFinite { .. } => "non_finite_output",
            OutputProblem::Shape { .. } => "shape",
        }
    }
}

/// Every floating-point output finite (the shapes were checked when the batch was split).
pub fn check_outputs(spec: &ModelSpec, outputs: &SampleOutputs) -> Result<(), OutputProblem> {
    use crate::spec::DataType;
    let action_output = spec.action_output;
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

/// Decodes every row's frames into their cameras' tensors, each frame holding its pixels from
/// the budget while it is decoded. Blocking.
fn decode_rows(
    spec: &ModelSpec,
    rows: Vec<Vec<Input>>,
    limits: &LimitsConfig,
    budget: &PixelBudget,
) -> Result<Vec<Vec<Input>>, ApiError> {
    rows.into_iter()
        .map(|inputs| {
            inputs
                .into_iter()
                .map(|input| match input {
                    Input::Frame { camera, field, frame } => {
                        let cam = &spec.cameras[camera];
                        decode_frame(frame, cam, limits, budget).map(Input::Ready).map_err(|e| e.named(&field))
                    }
                    other => Ok(other),
                })
                .collect()
        })
        .collect()
}

/// Why a frame was not decoded: the frame's own problem (named by its field), or a wait.
enum Decode {
    Frame(crate::preprocess::FrameError),
    Wait(ApiError),
}

impl Decode {
    fn named(self, field: &str) -> ApiError {
        match self {
            Decode::Frame(e) => ApiError::from_frame(field, e),
            Decode::Wait(e) => e,
        }
    }
}

fn decode_frame(
    frame: Frame,
    cam: &crate::spec::CameraSpec,
    limits: &LimitsConfig,
    budget: &PixelBudget,
) -> Result<TensorData, Decode> {
    use crate::preprocess as pre;
    let frame_err = Decode::Frame;
    match frame {
        Frame::Rgb8 { width, height, base64 } => {
            let _pixels = budget.take(u64::from(width) * u64::from(height)).map_err(Decode::Wait)?;
            // Raw pixels are three bytes each, not a compressed file: bounded by the pixels.
            let raw_limits = LimitsConfig {
                max_image_bytes: (limits.max_image_pixels as usize).saturating_mul(3),
                ..limits.clone()
            };
            let data = pre::base64_file(&base64, &raw_limits).map_err(frame_err)?;
            let rgb = pre::rgb8(width, height, data, limits).map_err(frame_err)?;
            Ok(pre::frame_tensor(&rgb, cam))
        }
        Frame::Pixels { width, height, data } => {
            let _pixels = budget.take(u64::from(width) * u64::from(height)).map_err(Decode::Wait)?;
            let rgb = pre::rgb8(width, height, data.to_vec(), limits).map_err(frame_err)?;
            Ok(pre::frame_tensor(&rgb, cam))
        }
        Frame::Base64(text) => {
            let bytes = pre::base64_file(&text, limits).map_err(frame_err)?;
            let probe = pre::probe(&bytes, limits).map_err(frame_err)?;
            let _pixels = budget.take(probe.pixels()).map_err(Decode::Wait)?;
            pre::camera_input(&bytes, &probe, cam).map_err(frame_err)
        }
        Frame::File(bytes) => {
            let probe = pre::probe(&bytes, limits).map_err(frame_err)?;
            let _pixels = budget.take(probe.pixels()).map_err(Decode::Wait)?;
            pre::camera_input(&bytes, &probe, cam).map_err(frame_err)
        }
    }
}

/// Each noise input of a row, from its seed (see [`crate::noise`]): the values continue
/// across the row's noise inputs, in input order.
fn fill_noise(spec: &ModelSpec, inputs: Vec<Input>, seed: u64) -> Vec<TensorData> {
    let count: usize = inputs
        .iter()
        .enumerate()
        .filter(|(_, i)| matches!(i, Input::Noise))
        .map(|(k, _)| spec.inputs[k].sample_len())
        .sum();
    let mut noise = crate::noise::normal(seed, count).into_iter();
    inputs
        .into_iter()
        .enumerate()
        .map(|(k, input)| match input {
            Input::Ready(t) => t,
            Input::Noise => TensorData::F32(noise.by_ref().take(spec.inputs[k].sample_len()).collect()),
            // Decoded before this runs: a frame left here is an empty tensor the batch refuses.
            Input::Frame { .. } => TensorData::F32(Vec::new()),
        })
        .collect()
}
