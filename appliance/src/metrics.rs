//! Metrics: the `vla_*` catalogue the cell's operators already query (names, types, help
//! texts, label sets and bucket layouts all live here, and only here), and its rendering in
//! Prometheus' text format for `/metrics`.
//!
//! Labels come from bounded sets only: model names, registered robots' ids and types, status
//! and reason codes, policy names, route templates, GPU indices. Never request ids or free text.
//!
//! Two kinds of series: those recorded where they happen (counters and histograms), and gauges
//! that describe state (queues, models, quotas, the GPU), which the `/metrics` endpoint sets from
//! the live state when it is scraped, so nothing on the request path maintains them.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use prometheus::{
    Encoder, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

/// Request latency: 0.01–30 s as the catalogue has it, plus finer buckets below 10 ms (a
/// forward of the demo model takes a few ms on a CPU).
pub const DURATION_BUCKETS: [f64; 18] =
    [0.001, 0.0025, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 30.0];
/// Queue waits, forwards, decodes and policy calls: 50 µs – 10 s.
pub const STAGE_BUCKETS: [f64; 16] =
    [0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0];
/// Batch sizes.
pub const BATCH_BUCKETS: [f64; 8] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0];

/// Device memory one batch needed: 64 KiB – 16 GiB, by fours.
pub const MEMORY_BUCKETS: [f64; 10] = [
    65536.0,
    262144.0,
    1048576.0,
    4194304.0,
    16777216.0,
    67108864.0,
    268435456.0,
    1073741824.0,
    4294967296.0,
    17179869184.0,
];

/// Model loads: 100 ms – 5 min.
pub const LOAD_BUCKETS: [f64; 9] = [0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 300.0];

/// Every metric family of the appliance.
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Registry,
    /// Tells this registry's cached handles from another's (tests run several appliances).
    id: u64,
    // Requests.
    pub requests: IntCounterVec,
    pub duration: HistogramVec,
    pub queue_wait: HistogramVec,
    pub compute: HistogramVec,
    pub gpu_memory_delta: HistogramVec,
    // Queue and batching.
    pub queue_depth: IntGaugeVec,
    pub queue_capacity: IntGaugeVec,
    pub queue_utilization: GaugeVec,
    pub batch_size: HistogramVec,
    pub batch_wait: HistogramVec,
    pub batches_in_flight: IntGaugeVec,
    pub dropped: IntCounterVec,
    // GPU, per device.
    pub gpu_available: IntGauge,
    pub gpu_utilization: GaugeVec,
    pub gpu_memory_used: GaugeVec,
    pub gpu_memory_total: GaugeVec,
    pub gpu_memory_utilization: GaugeVec,
    pub gpu_temperature: GaugeVec,
    pub gpu_power: GaugeVec,
    pub gpu_energy: prometheus::CounterVec,
    pub gpu_clock: GaugeVec,
    pub gpu_throttle: IntGaugeVec,
    pub gpu_xid_errors: IntCounterVec,
    pub gpu_compute_mode: IntGaugeVec,
    // Safety and policies.
    pub safety_checks: IntCounterVec,
    pub safety_rejections: IntCounterVec,
    pub admission_rejections: IntCounterVec,
    pub safety_incidents: IntCounterVec,
    pub safety_score: prometheus::Gauge,
    /// Actions that reached the safety stage, and those of them passed unmodified (for
    /// `vla_safety_score`, set at scrape).
    pub safety_seen: std::sync::Arc<AtomicU64>,
    pub safety_unmodified: std::sync::Arc<AtomicU64>,
    pub safety_modifications: IntCounterVec,
    pub safety_duration: HistogramVec,
    pub policy_failures: IntCounterVec,
    // Validation and errors.
    pub validation_failures: IntCounterVec,
    pub errors: IntCounterVec,
    // Rate limiting and quotas.
    pub rate_limit_hits: IntCounterVec,
    pub rate_limit_exceeded: IntCounterVec,
    pub rate_limit_remaining: IntGaugeVec,
    pub quota_usage: GaugeVec,
    pub quota_used: IntGaugeVec,
    pub quota_limit: IntGaugeVec,
    // Per registered robot (the console's robot view).
    pub robot_requests: IntCounterVec,
    pub robot_last_request: GaugeVec,
    // Models and workers.
    pub models_loaded: IntGauge,
    pub model_load_duration: HistogramVec,
    pub model_memory: IntGaugeVec,
    pub worker_utilization: GaugeVec,
    pub worker_active: IntGauge,
    pub worker_total: IntGauge,
    pub worker_task_duration: HistogramVec,
    pub exceptions: IntCounterVec,
    pub image_errors: IntCounter,
    pub output_rejected: IntCounterVec,
    pub envelope_violations: IntCounterVec,
    pub image_decode: HistogramVec,
    // HTTP connections.
    pub connections_active: IntGauge,
    pub connections_refused: IntCounterVec,
    pub connections_closed: IntCounterVec,
    pub tls_handshake_failures: IntCounter,
    // Store.
    pub store_size: IntGauge,
    pub store_flushes: IntCounter,
    pub store_flush_duration: Histogram,
    pub model_info: IntGaugeVec,
    pub workers_active: IntGaugeVec,
    // HTTP.
    pub http_requests: IntCounterVec,
    pub http_duration: HistogramVec,
    // System.
    pub application_info: IntGaugeVec,
    pub uptime: prometheus::Gauge,
    pub health: IntGaugeVec,
    pub scrapes: IntCounter,
}

fn counter(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let m = IntCounterVec::new(Opts::new(name, help), labels).unwrap_or_else(|e| panic!("metric {name}: {e}"));
    r.register(Box::new(m.clone())).unwrap_or_else(|e| panic!("metric {name}: {e}"));
    m
}

fn gauge(r: &Registry, name: &str, help: &str, labels: &[&str]) -> GaugeVec {
    let m = GaugeVec::new(Opts::new(name, help), labels).unwrap_or_else(|e| panic!("metric {name}: {e}"));
    r.register(Box::new(m.clone())).unwrap_or_else(|e| panic!("metric {name}: {e}"));
    m
}

fn int_gauge(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let m = IntGaugeVec::new(Opts::new(name, help), labels).unwrap_or_else(|e| panic!("metric {name}: {e}"));
    r.register(Box::new(m.clone())).unwrap_or_else(|e| panic!("metric {name}: {e}"));
    m
}

fn histogram(r: &Registry, name: &str, help: &str, labels: &[&str], buckets: &[f64]) -> HistogramVec {
    let m = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets.to_vec()), labels)
        .unwrap_or_else(|e| panic!("metric {name}: {e}"));
    r.register(Box::new(m.clone())).unwrap_or_else(|e| panic!("metric {name}: {e}"));
    m
}

const GPU: [&str; 2] = ["device", "device_name"];

impl Metrics {
    /// The catalogue, registered in a registry of its own (several appliances in one test
    /// process do not mix). Panics only on a programming error in the names above, which the
    /// unit test catches.
    pub fn new() -> Metrics {
        let r = Registry::new();
        let single_gauge = |name: &str, help: &str| {
            let m = IntGauge::new(name, help).unwrap_or_else(|e| panic!("metric {name}: {e}"));
            r.register(Box::new(m.clone())).unwrap_or_else(|e| panic!("metric {name}: {e}"));
            m
        };
        let gpu_available = single_gauge("vla_gpu_available", "1 when GPU telemetry (NVML) is available, else 0.");
        let models_loaded = single_gauge("vla_models_loaded", "Models serving.");
        let uptime = prometheus::Gauge::new("vla_application_uptime_seconds", "Seconds since the appliance started.")
            .unwrap_or_else(|e| panic!("uptime: {e}"));
        r.register(Box::new(uptime.clone())).unwrap_or_else(|e| panic!("uptime: {e}"));
        let single_counter = |name: &str, help: &str| {
            let m = IntCounter::new(name, help).unwrap_or_else(|e| panic!("metric {name}: {e}"));
            r.register(Box::new(m.clone())).unwrap_or_else(|e| panic!("metric {name}: {e}"));
            m
        };
        let scrapes = single_counter("vla_metrics_scrapes_total", "Scrapes of /metrics served.");
        let image_errors =
            single_counter("vla_image_processing_errors_total", "Camera images refused: not decodable or too large.");
        let tls_handshake_failures =
            single_counter("vla_tls_handshake_failures_total", "TLS handshakes that failed or timed out.");
        let worker_active =
            single_gauge("vla_worker_active", "Executor threads computing a batch now, all models together.");
        let worker_total = single_gauge("vla_worker_total", "Executor threads serving models, all models together.");
        let safety_score = prometheus::Gauge::new(
            "vla_safety_score",
            "Share of actions since start that passed the safety stage (policies and action envelope) unmodified, 0-1; 1 before any.",
        )
        .unwrap_or_else(|e| panic!("safety score: {e}"));
        r.register(Box::new(safety_score.clone())).unwrap_or_else(|e| panic!("safety score: {e}"));
        let connections_active = single_gauge("vla_http_connections_active", "Open client connections.");
        let store_size = single_gauge("vla_store_size_bytes", "Size of the sled store on disk, bytes.");
        let store_flushes =
            single_counter("vla_store_flushes_total", "Quota flushes of the sled store (batch write and fsync).");
        let store_flush_duration = Histogram::with_opts(
            HistogramOpts::new("vla_store_flush_duration_seconds", "One quota flush: batch write and fsync, seconds.")
                .buckets(STAGE_BUCKETS.to_vec()),
        )
        .unwrap_or_else(|e| panic!("flush: {e}"));
        r.register(Box::new(store_flush_duration.clone())).unwrap_or_else(|e| panic!("flush: {e}"));
        Metrics {
            requests: counter(
                &r,
                "vla_inference_requests_total",
                "Inference requests answered, by model, robot type and status (success, rate_limited, rejected, invalid, error).",
                &["model", "robot_type", "status"],
            ),
            duration: histogram(
                &r,
                "vla_inference_duration_seconds",
                "Inference request latency, body read to response, in seconds.",
                &["model"],
                &DURATION_BUCKETS,
            ),
            queue_wait: histogram(
                &r,
                "vla_inference_queue_wait_seconds",
                "Time a request waited in its model's queue before its batch started, in seconds.",
                &["model"],
                &STAGE_BUCKETS,
            ),
            compute: histogram(
                &r,
                "vla_inference_gpu_compute_seconds",
                "Model forward time of a batch, whatever the device, in seconds.",
                &["model"],
                &STAGE_BUCKETS,
            ),
            gpu_memory_delta: histogram(
                &r,
                "vla_inference_gpu_memory_delta_bytes",
                "CUDA memory a batch needed: the caching allocator's peak during stack, forward and copy-back above what was allocated before, bytes. CUDA models only.",
                &["model"],
                &MEMORY_BUCKETS,
            ),
            queue_depth: int_gauge(
                &r,
                "vla_inference_queue_depth",
                "Requests waiting in the model's queue.",
                &["model"],
            ),
            queue_capacity: int_gauge(
                &r,
                "vla_inference_queue_capacity",
                "Requests the model's queue holds at most.",
                &["model"],
            ),
            queue_utilization: gauge(
                &r,
                "vla_inference_queue_utilization",
                "Queue depth as a percentage of capacity.",
                &["model"],
            ),
            batch_size: histogram(
                &r,
                "vla_inference_batch_size",
                "Requests per forward call.",
                &["model"],
                &BATCH_BUCKETS,
            ),
            batch_wait: histogram(
                &r,
                "vla_inference_batch_wait_seconds",
                "Time a batch's oldest request waited for the batch to fill, in seconds.",
                &["model"],
                &STAGE_BUCKETS,
            ),
            batches_in_flight: int_gauge(
                &r,
                "vla_inference_batches_in_flight",
                "Batches being computed now.",
                &["model"],
            ),
            dropped: counter(
                &r,
                "vla_inference_requests_dropped_total",
                "Requests never computed since the model loaded, by reason (deadline, disconnect, queue_full, evicted: by a more urgent request in a full queue).",
                &["model", "reason"],
            ),
            gpu_available,
            gpu_utilization: gauge(&r, "vla_gpu_utilization_percent", "GPU compute utilization, percent.", &GPU),
            gpu_memory_used: gauge(&r, "vla_gpu_memory_used_bytes", "GPU memory in use, bytes.", &GPU),
            gpu_memory_total: gauge(&r, "vla_gpu_memory_total_bytes", "GPU memory, bytes.", &GPU),
            gpu_memory_utilization: gauge(
                &r,
                "vla_gpu_memory_utilization_percent",
                "GPU memory in use, percent of total.",
                &GPU,
            ),
            gpu_temperature: gauge(&r, "vla_gpu_temperature_celsius", "GPU core temperature, °C.", &GPU),
            gpu_power: gauge(&r, "vla_gpu_power_watts", "GPU power draw, watts.", &GPU),
            gpu_energy: {
                let m = prometheus::CounterVec::new(
                    Opts::new("vla_gpu_energy_joules_total", "GPU energy consumed since the driver loaded, joules."),
                    &GPU,
                )
                .unwrap_or_else(|e| panic!("energy: {e}"));
                r.register(Box::new(m.clone())).unwrap_or_else(|e| panic!("energy: {e}"));
                m
            },
            gpu_clock: gauge(
                &r,
                "vla_gpu_clock_hertz",
                "GPU clock, hertz, by clock (graphics, sm, memory).",
                &["device", "device_name", "clock"],
            ),
            gpu_throttle: int_gauge(
                &r,
                "vla_gpu_throttle_active",
                "1 while the GPU is throttled for this reason.",
                &["device", "device_name", "reason"],
            ),
            gpu_xid_errors: counter(
                &r,
                "vla_gpu_xid_errors_total",
                "Critical XID errors the driver reported, by device and XID code (unknown: no code).",
                &["device", "device_name", "xid"],
            ),
            gpu_compute_mode: int_gauge(
                &r,
                "vla_gpu_compute_mode",
                "The GPU's NVML compute mode: 0 default, 1 exclusive thread, 2 prohibited, 3 exclusive process.",
                &GPU,
            ),
            safety_checks: counter(
                &r,
                "vla_safety_checks_total",
                "Policy chain outcomes, by result (allow, modify, deny, error).",
                &["result"],
            ),
            safety_rejections: counter(
                &r,
                "vla_safety_rejections_total",
                "Actions denied by an enforcing safety policy (the safety world only), by policy, denial code and severity (low, medium, high, critical; unspecified: a vla:policy@0.1.0 component).",
                &["policy", "violation_type", "severity"],
            ),
            admission_rejections: counter(
                &r,
                "vla_admission_rejections_total",
                "Requests refused by an enforcing admission policy (rate limits, quotas, instruction filters), by policy and denial code.",
                &["policy", "code"],
            ),
            safety_incidents: counter(
                &r,
                "vla_safety_incidents_total",
                "Actions stopped before they reached the robot: enforced safety-policy denials (by their severity) and action-envelope denials (high), by severity and violation type (the denial code).",
                &["severity", "violation_type"],
            ),
            safety_score,
            safety_seen: Default::default(),
            safety_unmodified: Default::default(),
            safety_modifications: counter(
                &r,
                "vla_safety_modifications_total",
                "Actions modified by an enforcing policy.",
                &["policy"],
            ),
            safety_duration: histogram(
                &r,
                "vla_safety_check_duration_seconds",
                "One policy call, instantiation included, in seconds.",
                &["policy"],
                &STAGE_BUCKETS,
            ),
            policy_failures: counter(
                &r,
                "vla_policy_failures_total",
                "Policy calls that failed, by policy and kind (timeout, out_of_fuel, trap, …).",
                &["policy", "kind"],
            ),
            validation_failures: counter(
                &r,
                "vla_validation_failures_total",
                "Requests refused as invalid, by error code.",
                &["code"],
            ),
            errors: counter(&r, "vla_errors_total", "Error answers, by error code.", &["code"]),
            rate_limit_hits: counter(
                &r,
                "vla_rate_limit_hits_total",
                "Requests refused by a rate limit or quota, by robot and bucket (rate, day, month).",
                &["robot_id", "limit_type"],
            ),
            rate_limit_exceeded: counter(
                &r,
                "vla_rate_limit_exceeded_total",
                "Requests refused by a rate limit or quota, all robots together, by bucket (rate, day, month).",
                &["limit_type"],
            ),
            robot_requests: counter(
                &r,
                "vla_robot_requests_total",
                "Answered inference requests of each registered robot, by status (as vla_inference_requests_total).",
                &["robot_id", "status"],
            ),
            robot_last_request: gauge(
                &r,
                "vla_robot_last_request_timestamp_seconds",
                "When each registered robot's latest inference request was answered (Unix seconds).",
                &["robot_id"],
            ),
            rate_limit_remaining: int_gauge(
                &r,
                "vla_rate_limit_tokens_remaining",
                "Requests the robot may still send now, by bucket.",
                &["robot_id", "limit_type"],
            ),
            quota_usage: gauge(
                &r,
                "vla_quota_usage_percent",
                "Share of the robot's quota used in the current period (day, month), percent.",
                &["robot_id", "period"],
            ),
            quota_used: int_gauge(
                &r,
                "vla_quota_used",
                "Requests the robot used of its quota in the current period (day, month).",
                &["robot_id", "period"],
            ),
            quota_limit: int_gauge(
                &r,
                "vla_quota_limit",
                "The robot's quota for the period (day, month); absent when it has none.",
                &["robot_id", "period"],
            ),
            models_loaded,
            model_load_duration: histogram(
                &r,
                "vla_model_load_duration_seconds",
                "Loading and warming up a model, seconds.",
                &["model"],
                &LOAD_BUCKETS,
            ),
            model_memory: int_gauge(
                &r,
                "vla_model_memory_bytes",
                "Bytes of a model's weights (its parameters; for a frozen TorchScript module, model.pt), times its executor instances.",
                &["model"],
            ),
            worker_utilization: gauge(
                &r,
                "vla_inference_worker_utilization_percent",
                "Share of the model's executor time spent in forwards since it loaded, percent.",
                &["model"],
            ),
            worker_active,
            worker_total,
            worker_task_duration: histogram(
                &r,
                "vla_worker_task_duration_seconds",
                "One executor task: a batch from its start to its replies (stack, forward, copy back), in seconds.",
                &["model"],
                &STAGE_BUCKETS,
            ),
            exceptions: counter(
                &r,
                "vla_exceptions_total",
                "Faults caught and answered as errors, by type (panic: a Rust panic caught in a model's executor or a task; model_forward: libtorch raised in a forward; internal: a 500 internal answer).",
                &["type"],
            ),
            image_errors,
            output_rejected: counter(
                &r,
                "vla_model_output_rejected_total",
                "Model outputs the host refused before any policy saw them, by model and problem (non_finite_output, shape).",
                &["model", "problem"],
            ),
            envelope_violations: counter(
                &r,
                "vla_action_envelope_violations_total",
                "Final actions outside their model's [action.envelope], by model, what was done (deny, clamp) and the first limit broken (min, max, max_delta).",
                &["model", "action", "limit"],
            ),
            image_decode: histogram(
                &r,
                "vla_image_decode_duration_seconds",
                "Decoding and preprocessing a camera image (blocking pool), seconds.",
                &["model"],
                &STAGE_BUCKETS,
            ),
            connections_active,
            connections_refused: counter(
                &r,
                "vla_http_connections_refused_total",
                "Connections closed at accept, by the bound reached (max_connections, max_connections_per_peer).",
                &["reason"],
            ),
            connections_closed: counter(
                &r,
                "vla_http_connections_closed_total",
                "Connections the appliance closed, by reason (first_request_timeout: no complete request headers in time, TLS handshake included; idle).",
                &["reason"],
            ),
            tls_handshake_failures,
            store_size,
            store_flushes,
            store_flush_duration,
            model_info: int_gauge(
                &r,
                "vla_model_info",
                "1 for each serving model, with its version and device.",
                &["model", "version", "device"],
            ),
            workers_active: int_gauge(
                &r,
                "vla_inference_workers_active",
                "Executor threads serving the model.",
                &["model"],
            ),
            http_requests: counter(
                &r,
                "vla_http_requests_total",
                "HTTP requests, by method, route template and status code.",
                &["method", "endpoint", "status_code"],
            ),
            http_duration: histogram(
                &r,
                "vla_http_request_duration_seconds",
                "HTTP request latency by method and route template, in seconds.",
                &["method", "endpoint"],
                &DURATION_BUCKETS,
            ),
            application_info: int_gauge(
                &r,
                "vla_application_info",
                "1, with the appliance's version and the libtorch version it is built against.",
                &["version", "libtorch"],
            ),
            uptime,
            health: int_gauge(
                &r,
                "vla_application_health",
                "1 while the component is healthy (store, models, policy_engine, gpu).",
                &["component"],
            ),
            scrapes,
            registry: r,
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
        }
    }

    /// The handles one model's stages record into, resolved once at load so that recording
    /// is only atomic operations.
    pub fn for_model(&self, model: &str) -> ModelMetrics {
        ModelMetrics {
            duration: self.duration.with_label_values(&[model]),
            queue_wait: self.queue_wait.with_label_values(&[model]),
            compute: self.compute.with_label_values(&[model]),
            batch_size: self.batch_size.with_label_values(&[model]),
            batch_wait: self.batch_wait.with_label_values(&[model]),
            in_flight: self.batches_in_flight.with_label_values(&[model]),
            image_decode: self.image_decode.with_label_values(&[model]),
            busy_ns: std::sync::Arc::new(AtomicU64::new(0)),
            memory: self.model_memory.with_label_values(&[model]),
            output_shape_rejected: self.output_rejected.with_label_values(&[model, "shape"]),
            task_duration: self.worker_task_duration.with_label_values(&[model]),
            panics: self.exceptions.with_label_values(&["panic"]),
            forward_errors: self.exceptions.with_label_values(&["model_forward"]),
            gpu_memory_delta: None,
        }
    }

    /// The handles of a model that runs on a CUDA device: with its per-batch memory delta.
    pub fn for_cuda_model(&self, model: &str) -> ModelMetrics {
        ModelMetrics {
            gpu_memory_delta: Some(self.gpu_memory_delta.with_label_values(&[model])),
            ..self.for_model(model)
        }
    }

    /// Counts one answered inference request.
    pub fn request(&self, model: &str, robot_type: &str, status: &str) {
        self.cached(Family::Requests, &[model, robot_type, status]).inc();
    }

    /// Counts one answered inference request of a registered robot and marks it seen now.
    pub fn robot_request(&self, robot_id: &str, status: &str) {
        self.cached(Family::RobotRequests, &[robot_id, status]).inc();
        let key = CacheKey { registry: self.id, family: Family::RobotRequests, labels: robot_id.to_string() };
        let seen = GAUGES.with(|c| {
            if let Some(g) = c.borrow().get(&key) {
                return g.clone();
            }
            let g = self.robot_last_request.with_label_values(&[robot_id]);
            c.borrow_mut().insert(key, g.clone());
            g
        });
        seen.set(crate::clock::now_secs_f64());
    }

    /// Counts one HTTP request and its latency; an error answer also counts under its code and
    /// categories.
    pub fn http(&self, method: &str, endpoint: &str, status: u16, elapsed: Duration, error: Option<ErrorCount>) {
        let status = status.to_string();
        self.cached(Family::Http, &[method, endpoint, &status]).inc();
        self.http_duration_handle(method, endpoint).observe(elapsed.as_secs_f64());
        if let Some(e) = error {
            self.cached(Family::Errors, &[e.code]).inc();
            if e.validation {
                self.cached(Family::Validation, &[e.code]).inc();
            }
            if e.image {
                self.image_errors.inc();
            }
            if e.exception {
                self.cached(Family::Exceptions, &[e.code]).inc();
            }
        }
    }

    /// Counts one request refused by a rate limit or quota bucket (`rate`, `day`, `month`).
    pub fn rate_limited(&self, robot_id: &str, bucket: &str) {
        self.cached(Family::RateLimitHits, &[robot_id, bucket]).inc();
        self.cached(Family::RateLimitExceeded, &[bucket]).inc();
    }

    /// Counts an action stopped before it reached the robot (`vla_safety_incidents_total`).
    pub fn incident(&self, severity: &str, violation_type: &str) {
        self.cached(Family::Incidents, &[severity, violation_type]).inc();
    }

    /// Counts one action through the safety stage, and whether it passed unmodified.
    pub fn safety_outcome(&self, unmodified: bool) {
        self.safety_seen.fetch_add(1, Ordering::Relaxed);
        if unmodified {
            self.safety_unmodified.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// `vla_safety_score` from the counts of [`Metrics::safety_outcome`].
    pub fn refresh_safety_score(&self) {
        let seen = self.safety_seen.load(Ordering::Relaxed);
        let passed = self.safety_unmodified.load(Ordering::Relaxed);
        self.safety_score.set(if seen == 0 { 1.0 } else { passed as f64 / seen as f64 });
    }

    /// A counter of `family` with `labels`, from this thread's cache: the shared label map is
    /// read only the first time a thread sees a label set, so recording takes no lock shared
    /// by all requests.
    pub fn cached(&self, family: Family, labels: &[&str]) -> IntCounter {
        let key = CacheKey { registry: self.id, family, labels: labels.join("\u{1f}") };
        COUNTERS.with(|c| {
            if let Some(h) = c.borrow().get(&key) {
                return h.clone();
            }
            let vec = match family {
                Family::Requests => &self.requests,
                Family::Http => &self.http_requests,
                Family::Errors => &self.errors,
                Family::Validation => &self.validation_failures,
                Family::SafetyChecks => &self.safety_checks,
                Family::Rejections => &self.safety_rejections,
                Family::AdmissionRejections => &self.admission_rejections,
                Family::Incidents => &self.safety_incidents,
                Family::RateLimitExceeded => &self.rate_limit_exceeded,
                Family::Exceptions => &self.exceptions,
                Family::Modifications => &self.safety_modifications,
                Family::PolicyFailures => &self.policy_failures,
                Family::RateLimitHits => &self.rate_limit_hits,
                Family::RobotRequests => &self.robot_requests,
            };
            let h = vec.with_label_values(labels);
            c.borrow_mut().insert(key, h.clone());
            h
        })
    }

    fn http_duration_handle(&self, method: &str, endpoint: &str) -> Histogram {
        let key = CacheKey { registry: self.id, family: Family::Http, labels: format!("{method}\u{1f}{endpoint}") };
        HISTOGRAMS.with(|c| {
            if let Some(h) = c.borrow().get(&key) {
                return h.clone();
            }
            let h = self.http_duration.with_label_values(&[method, endpoint]);
            c.borrow_mut().insert(key, h.clone());
            h
        })
    }

    /// The whole registry in Prometheus' text exposition format.
    pub fn render(&self) -> Result<String, String> {
        self.scrapes.inc();
        let mut out = Vec::with_capacity(64 * 1024);
        TextEncoder::new().encode(&self.registry.gather(), &mut out).map_err(|e| e.to_string())?;
        String::from_utf8(out).map_err(|e| e.to_string())
    }
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Family {
    Requests,
    Http,
    Errors,
    Validation,
    SafetyChecks,
    Rejections,
    AdmissionRejections,
    Incidents,
    RateLimitExceeded,
    Exceptions,
    Modifications,
    PolicyFailures,
    RateLimitHits,
    RobotRequests,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct CacheKey {
    registry: u64,
    family: Family,
    labels: String,
}

thread_local! {
    /// Per thread (the runtime's few workers), bounded by the label sets seen: models × robot
    /// types × status codes, routes × methods × status codes.
    static COUNTERS: RefCell<HashMap<CacheKey, IntCounter>> = RefCell::new(HashMap::new());
    static HISTOGRAMS: RefCell<HashMap<CacheKey, Histogram>> = RefCell::new(HashMap::new());
    static GAUGES: RefCell<HashMap<CacheKey, prometheus::Gauge>> = RefCell::new(HashMap::new());
}

/// The `method` label of a request: the standard methods by name, anything else `other` (a
/// client must not be able to create series).
pub fn method_label(method: &str) -> &'static str {
    const STANDARD: [&str; 9] = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS", "CONNECT", "TRACE"];
    STANDARD.into_iter().find(|m| *m == method).unwrap_or("other")
}

/// How an error answer is counted: its stable code, and whether the request itself was
/// invalid (`vla_validation_failures_total`), its image was refused
/// (`vla_image_processing_errors_total`) or the appliance itself failed
/// (`vla_exceptions_total`). The HTTP boundary derives it from its error type and
/// attaches it to the response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ErrorCount {
    pub code: &'static str,
    pub validation: bool,
    pub image: bool,
    pub exception: bool,
}

/// One model's pre-resolved handles (see [`Metrics::for_model`]).
#[derive(Debug, Clone)]
pub struct ModelMetrics {
    pub duration: Histogram,
    pub queue_wait: Histogram,
    pub compute: Histogram,
    pub batch_size: Histogram,
    pub batch_wait: Histogram,
    pub in_flight: IntGauge,
    pub image_decode: Histogram,
    /// Executor time spent in forwards, for the worker utilization gauge.
    pub busy_ns: std::sync::Arc<AtomicU64>,
    /// `vla_model_memory_bytes`: each executor adds its copy's bytes once loaded.
    pub memory: IntGauge,
    /// `vla_model_output_rejected_total{problem="shape"}`: rows of batches whose outputs were
    /// not the declared shape.
    pub output_shape_rejected: IntCounter,
    /// `vla_worker_task_duration_seconds`: one batch, start to replies.
    pub task_duration: Histogram,
    /// `vla_exceptions_total{type="panic"}` and `{type="model_forward"}`.
    pub panics: IntCounter,
    pub forward_errors: IntCounter,
    /// `vla_inference_gpu_memory_delta_bytes`, for a model on a CUDA device only.
    pub gpu_memory_delta: Option<Histogram>,
}

/// Brings counter `c` up to `total`, a monotonic count kept elsewhere (a model's statistics,
/// the driver's energy counter). A total that went down (the model was reloaded) is ignored.
pub fn catch_up(c: &IntCounter, total: u64) {
    let seen = c.get();
    if total > seen {
        c.inc_by(total - seen);
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_catalogue_registers_and_renders_with_help_and_types() {
        let m = Metrics::new();
        m.requests.with_label_values(&["tiny-vla", "ur5e", "success"]).inc();
        m.duration.with_label_values(&["tiny-vla"]).observe(0.004);
        m.gpu_available.set(0);
        let text = m.render().unwrap();
        assert!(text.contains("# TYPE vla_inference_requests_total counter"), "{text}");
        assert!(
            text.contains(r#"vla_inference_requests_total{model="tiny-vla",robot_type="ur5e",status="success"} 1"#)
        );
        assert!(text.contains(r#"vla_inference_duration_seconds_bucket{model="tiny-vla",le="0.005"} 1"#));
        assert!(text.contains("vla_gpu_available 0"));
        assert!(text.contains("# HELP vla_inference_duration_seconds "));
    }

    #[test]
    fn only_cuda_models_have_a_memory_delta_series() {
        let m = Metrics::new();
        let cpu = m.for_model("tiny-vla");
        assert!(cpu.gpu_memory_delta.is_none());
        assert!(!m.render().unwrap().contains("vla_inference_gpu_memory_delta_bytes"));

        let cuda = m.for_cuda_model("big-vla");
        cuda.gpu_memory_delta.as_ref().unwrap().observe(3.0 * 1048576.0);
        let text = m.render().unwrap();
        assert!(text.contains("# TYPE vla_inference_gpu_memory_delta_bytes histogram"), "{text}");
        assert!(text.contains(r#"vla_inference_gpu_memory_delta_bytes_bucket{model="big-vla",le="1048576"} 0"#));
        assert!(text.contains(r#"vla_inference_gpu_memory_delta_bytes_bucket{model="big-vla",le="4194304"} 1"#));
        assert!(!text.contains(r#"vla_inference_gpu_memory_delta_bytes_count{model="tiny-vla"}"#));
    }

    #[test]
    fn latency_buckets_span_the_catalogue_and_below_ten_ms() {
        assert_eq!(DURATION_BUCKETS.last(), Some(&30.0));
        assert!(DURATION_BUCKETS.contains(&0.01));
        assert!(DURATION_BUCKETS.iter().filter(|b| **b < 0.01).count() >= 4);
        assert!(DURATION_BUCKETS.windows(2).all(|w| w[0] < w[1]));
    }
}
