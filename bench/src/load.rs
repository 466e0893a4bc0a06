//! The load generator: simulated robots calling the appliance over HTTPS with keep-alive.
//!
//! Each robot has its own identity, key and connection (HTTP/2 when the appliance offers it,
//! as it does). Two ways to load the appliance:
//! - [`closed_loop`]: each client sends its next request when the previous answer arrives, the
//!   way to find the appliance's throughput at a given concurrency;
//! - [`open_loop`]: each robot sends at its control rate whatever the answers do, as real robots
//!   do. Latency is measured from when a request was *due*, not from when it went out, so a
//!   stalled appliance (or load generator) shows as latency instead of hiding as fewer requests
//!   (no coordinated omission).

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::task::JoinSet;
use vla_api::{ErrorBody, InferenceResponse, PolicyTrace, Timing};

/// The OIP binary tensor extension's header (the length of the JSON part of a body).
const HEADER_LENGTH: &str = "inference-header-content-length";

/// Which API the robots call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Endpoint {
    /// `POST /v1/inference`: JSON with a base64 camera JPEG, decoded and preprocessed by the
    /// appliance.
    #[serde(rename = "v1")]
    V1,
    /// `POST /v2/models/{model}/infer` with binary tensors, already preprocessed.
    #[serde(rename = "oip")]
    Oip,
}

impl Endpoint {
    pub fn label(self) -> &'static str {
        match self {
            Endpoint::V1 => "/v1/inference",
            Endpoint::Oip => "OIP binary",
        }
    }

    /// The path the robots call for `model` (`/v1` names the model in the body).
    pub fn path(self, model: &str) -> String {
        match self {
            Endpoint::V1 => "/v1/inference".into(),
            Endpoint::Oip => format!("/v2/models/{model}/infer"),
        }
    }
}

/// An open-loop request that goes out later than this after it was due counts as late: the
/// timer's own granularity is 1 ms.
const LATE: Duration = Duration::from_millis(5);

/// One request body; `header_len` for OIP binary bodies.
#[derive(Debug, Clone)]
pub struct Body {
    pub bytes: Bytes,
    pub header_len: Option<usize>,
}

/// A simulated robot.
#[derive(Debug, Clone)]
pub struct Robot {
    pub id: String,
    key: String,
    client: reqwest::Client,
    url: String,
    bodies: Arc<[Body]>,
}

impl Robot {
    /// A robot with its own connection to the appliance at `addr`, trusting `ca`, sending
    /// `bodies` round-robin to `endpoint` for `model`.
    pub fn new(
        id: &str,
        key: &str,
        ca: &reqwest::Certificate,
        addr: std::net::SocketAddr,
        (endpoint, model): (Endpoint, &str),
        bodies: Arc<[Body]>,
    ) -> anyhow::Result<Robot> {
        let client = reqwest::Client::builder()
            .add_root_certificate(ca.clone())
            .resolve("localhost", addr)
            .timeout(Duration::from_secs(30))
            .pool_idle_timeout(None)
            .build()?;
        Ok(Robot {
            id: id.into(),
            key: key.into(),
            client,
            url: format!("https://localhost:{}{}", addr.port(), endpoint.path(model)),
            bodies,
        })
    }

    /// Sends the robot's `k`-th request and waits for the whole answer.
    pub async fn call(&self, k: usize) -> Result<ServerTiming, Failure> {
        let body = &self.bodies[k % self.bodies.len()];
        let mut request = self.client.post(&self.url).header("x-api-key", &self.key).body(body.bytes.clone());
        request = match body.header_len {
            Some(n) => request.header("content-type", "application/octet-stream").header(HEADER_LENGTH, n),
            None => request.header("content-type", "application/json"),
        };
        let response = request.send().await.map_err(Failure::transport)?;
        let status = response.status();
        let header_len = response.headers().get(HEADER_LENGTH).and_then(|v| v.to_str().ok()?.parse::<usize>().ok());
        let bytes = response.bytes().await.map_err(Failure::transport)?;
        if !status.is_success() {
            let (code, message) = match serde_json::from_slice::<ErrorBody>(&bytes) {
                Ok(e) => (e.code, e.error),
                Err(_) => ("unreadable".into(), String::from_utf8_lossy(&bytes).chars().take(200).collect()),
            };
            return Err(Failure { key: format!("{} {code}", status.as_u16()), message });
        }
        match body.header_len {
            None => {
                let r: InferenceResponse = serde_json::from_slice(&bytes).map_err(|e| Failure::answer(&e))?;
                Ok(ServerTiming::new(&r.timing, &r.policy))
            }
            Some(_) => {
                #[derive(serde::Deserialize)]
                struct Head {
                    parameters: Timing,
                    policy: PolicyTrace,
                }
                let json = header_len.map_or(&bytes[..], |n| &bytes[..n.min(bytes.len())]);
                let head: Head = serde_json::from_slice(json).map_err(|e| Failure::answer(&e))?;
                Ok(ServerTiming::new(&head.parameters, &head.policy))
            }
        }
    }
}

/// Why a request got no action: `key` groups failures in the report (`429 rate_limited`,
/// `transport timeout`), `message` is the first one's detail.
#[derive(Debug, Clone)]
pub struct Failure {
    pub key: String,
    pub message: String,
}

impl Failure {
    fn transport(e: reqwest::Error) -> Failure {
        let kind = if e.is_timeout() {
            "timeout"
        } else if e.is_connect() {
            "connect"
        } else {
            "error"
        };
        Failure { key: format!("transport {kind}"), message: format!("{e:?}") }
    }

    fn answer(e: &serde_json::Error) -> Failure {
        Failure { key: "unreadable answer".into(), message: e.to_string() }
    }
}

/// Where the time of one request went, as the appliance reported it.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct ServerTiming {
    pub total_ms: f64,
    pub queue_ms: f64,
    pub preprocess_ms: f64,
    pub inference_ms: f64,
    /// Every policy call of the request, instantiation included.
    pub policy_ms: f64,
    pub batch_size: usize,
}

impl ServerTiming {
    fn new(t: &Timing, policy: &PolicyTrace) -> ServerTiming {
        ServerTiming {
            total_ms: t.total_ms,
            queue_ms: t.queue_ms,
            preprocess_ms: t.preprocess_ms,
            inference_ms: t.inference_ms,
            policy_ms: policy.policies.iter().map(|p| p.eval_us as f64 / 1e3).sum(),
            batch_size: t.batch_size,
        }
    }
}

/// One request as the load generator saw it.
#[derive(Debug, Clone)]
pub struct Sample {
    /// From when it was due (open loop) or sent (closed loop) to the end of the answer.
    pub latency_ms: f64,
    pub result: Result<ServerTiming, Failure>,
}

/// What a run of load produced: the samples of requests sent within the measured window.
#[derive(Debug, Default)]
pub struct Recorded {
    pub samples: Vec<Sample>,
    /// Length of the measured window.
    pub window: Duration,
    /// Open loop: requests that went out more than 5 ms after they were due (the load
    /// generator could not keep up; their latency still counts from when they were due).
    pub late_sends: usize,
}

/// `clients` clients, client `i` being `robots[i % robots.len()]`, each sending its next
/// request as soon as the previous answer arrives. Requests sent during `warmup` are not
/// recorded; those sent during the next `measure` are, whenever they finish.
pub async fn closed_loop(robots: &[Robot], clients: usize, warmup: Duration, measure: Duration) -> Recorded {
    let start = Instant::now();
    let (from, until) = (start + warmup, start + warmup + measure);
    let mut tasks = JoinSet::new();
    for i in 0..clients {
        let robot = robots[i % robots.len()].clone();
        tasks.spawn(async move {
            let mut samples = Vec::new();
            let mut k = i;
            loop {
                let sent = Instant::now();
                if sent >= until {
                    break samples;
                }
                let result = robot.call(k).await;
                k += 1;
                if sent >= from {
                    samples.push(Sample { latency_ms: sent.elapsed().as_secs_f64() * 1e3, result });
                }
            }
        });
    }
    let mut recorded = Recorded { window: measure, ..Recorded::default() };
    while let Some(done) = tasks.join_next().await {
        recorded.samples.extend(done.unwrap_or_default());
    }
    recorded
}

/// `n` robots (robot `i` is `robots[i % robots.len()]`), each sending at `hz` whatever the
/// answers do; their phases are spread evenly over one period. Latency counts from when each
/// request was due. Requests due during `warmup` are not recorded.
pub async fn open_loop(robots: &[Robot], n: usize, hz: f64, warmup: Duration, measure: Duration) -> Recorded {
    let period = Duration::from_secs_f64(1.0 / hz);
    // A short lead so that every robot's task is running before the first request is due.
    let start = Instant::now() + Duration::from_millis(20);
    let (from, until) = (start + warmup, start + warmup + measure);
    let mut robots_tasks = JoinSet::new();
    for i in 0..n {
        let robot = robots[i % robots.len()].clone();
        let phase = period.mul_f64(i as f64 / n as f64);
        robots_tasks.spawn(async move {
            let mut requests = JoinSet::new();
            let mut late = 0;
            for k in 0.. {
                let due = start + phase + period * k;
                if due >= until {
                    break;
                }
                tokio::time::sleep_until(due.into()).await;
                if due.elapsed() > LATE && due >= from {
                    late += 1;
                }
                let robot = robot.clone();
                requests.spawn(async move {
                    let result = robot.call(k as usize + i).await;
                    (due >= from).then(|| Sample { latency_ms: due.elapsed().as_secs_f64() * 1e3, result })
                });
            }
            let mut samples = Vec::new();
            while let Some(done) = requests.join_next().await {
                samples.extend(done.ok().flatten());
            }
            (samples, late)
        });
    }
    let mut recorded = Recorded { window: measure, ..Recorded::default() };
    while let Some(done) = robots_tasks.join_next().await {
        if let Ok((samples, late)) = done {
            recorded.samples.extend(samples);
            recorded.late_sends += late;
        }
    }
    recorded
}
