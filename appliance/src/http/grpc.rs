//! The Open Inference Protocol over gRPC (`inference.GRPCInferenceService`, as Triton and KServe
//! serve it), so `tritonclient.grpc` and other KServe v2 gRPC clients work unchanged.
//!
//! tonic generates the service from `proto/grpc_service.proto` (written for this project from
//! the published field names and numbers; a test compares them with tritonclient's own). It is
//! mounted on the same HTTPS listener and router as every other route ([`super::routes`]),
//! one route per call, so the same layers run first: the in-flight cap, the auth guard (keys as
//! `x-api-key` or `authorization` metadata, client certificates, the admin token for the
//! repository calls; refusals answered as gRPC statuses) and the HTTP metrics.
//!
//! `ModelInfer` converts the request into the REST codec's form ([`codec::InferRequest`], every
//! tensor as little-endian bytes: `raw_input_contents` as sent, typed `contents` converted) and
//! runs [`super::oip::run_checked`], exactly as `POST /v2/models/{model}/infer` does. The answer
//! carries every output in `raw_output_contents`, the decision chain as the `policy` parameter
//! (JSON text) and the timing as numeric parameters. Errors are statuses whose message starts
//! with the HTTP API's code (`rate_limited: …`), with `vla-code` and `retry-after` metadata.
//!
//! `ModelStreamInfer` answers one request at a time, in order, each with a response or an
//! `error_message` (the stream stays open); a stream counts as a streaming session
//! (`server.websocket_max_sessions`, `server.websocket_sessions_per_robot`), takes at most
//! `server.websocket_messages_per_s` requests a second, is closed after `server.idle_timeout_ms`
//! without one, and a request whose client has gone is dropped, never computed.

use std::collections::HashMap;
use std::pin::Pin;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use serde_json::{Map, Value};
use tokio_stream::Stream;
use tonic::{Request as GrpcRequest, Response as GrpcResponse, Status};

use super::auth::Caller;
use super::oip::codec::{self, InferRequest, InputTensor, RequestedOutput};
use super::oip::{Done, run_checked};
use super::sessions::Rate;
use super::state::{AppState, blocking};
use crate::error::ApiError;
use crate::names::clip;
use crate::store::RobotRecord;

/// The code tonic generates from `proto/grpc_service.proto`.
#[allow(
    clippy::all,
    clippy::pedantic,
    clippy::unwrap_used,
    missing_debug_implementations,
    unreachable_pub,
    missing_docs
)]
pub mod pb {
    tonic::include_proto!("inference");
}

use pb::grpc_inference_service_server::{GrpcInferenceService, GrpcInferenceServiceServer};

/// The service's path prefix: each call is `/inference.GRPCInferenceService/<call>`.
pub const PATH: &str = "/inference.GRPCInferenceService";

/// The calls answered (the route table mounts one route per call; others get UNIMPLEMENTED).
pub const CALLS: [&str; 11] = [
    "ServerLive",
    "ServerReady",
    "ModelReady",
    "ServerMetadata",
    "ModelMetadata",
    "ModelInfer",
    "ModelStreamInfer",
    "ModelStatistics",
    "RepositoryIndex",
    "RepositoryModelLoad",
    "RepositoryModelUnload",
];

/// The service over the appliance's state, messages bounded by `server.body_limit_bytes`.
pub fn service(app: AppState) -> GrpcInferenceServiceServer<Service> {
    let limit = app.config.server.body_limit_bytes;
    GrpcInferenceServiceServer::new(Service { app }).max_decoding_message_size(limit)
}

/// The `GRPCInferenceService` implementation.
#[derive(Debug, Clone)]
pub struct Service {
    app: AppState,
}

fn caller<T>(request: &GrpcRequest<T>) -> Result<Caller, ApiError> {
    // The auth guard put it there before the service ran.
    request.extensions().get::<Caller>().cloned().ok_or_else(|| ApiError::Unauthorized("credentials required".into()))
}

fn version(v: &str) -> Option<&str> {
    Some(v).filter(|v| !v.is_empty())
}

/// A gRPC parameter as the JSON value the REST codec reads.
fn parameter(p: pb::InferParameter) -> Value {
    use pb::infer_parameter::ParameterChoice as P;
    match p.parameter_choice {
        Some(P::BoolParam(b)) => Value::Bool(b),
        Some(P::Int64Param(i)) => Value::from(i),
        Some(P::Uint64Param(u)) => Value::from(u),
        Some(P::DoubleParam(d)) => serde_json::Number::from_f64(d).map_or(Value::Null, Value::Number),
        Some(P::StringParam(s)) => Value::String(s),
        None => Value::Null,
    }
}

fn parameters(map: HashMap<String, pb::InferParameter>) -> Map<String, Value> {
    map.into_iter().map(|(k, v)| (k, parameter(v))).collect()
}

fn invalid(name: &str, problem: impl Into<String>) -> ApiError {
    ApiError::InvalidTensor { name: clip(name, 80), problem: problem.into() }
}

/// Typed `contents` as the little-endian bytes `raw_input_contents` would carry.
fn contents_bytes(name: &str, datatype: &str, contents: pb::InferTensorContents) -> Result<Bytes, ApiError> {
    fn narrow<T: TryFrom<i64>, const N: usize>(
        name: &str,
        values: impl Iterator<Item = i64>,
        to_le: impl Fn(T) -> [u8; N],
    ) -> Result<Vec<u8>, ApiError> {
        let mut out = Vec::new();
        for (i, v) in values.enumerate() {
            let t = T::try_from(v)
                .map_err(|_| invalid(name, format!("element {i} ({v}) is out of the datatype's range")))?;
            out.extend(to_le(t));
        }
        Ok(out)
    }
    let c = contents;
    let bytes: Vec<u8> = match datatype {
        "BOOL" => c.bool_contents.iter().map(|&b| u8::from(b)).collect(),
        "UINT8" => narrow::<u8, 1>(name, c.uint_contents.iter().map(|&v| i64::from(v)), |v| [v])?,
        "UINT16" => narrow::<u16, 2>(name, c.uint_contents.iter().map(|&v| i64::from(v)), u16::to_le_bytes)?,
        "UINT32" => c.uint_contents.iter().flat_map(|v| v.to_le_bytes()).collect(),
        "UINT64" => c.uint64_contents.iter().flat_map(|v| v.to_le_bytes()).collect(),
        "INT8" => narrow::<i8, 1>(name, c.int_contents.iter().map(|&v| i64::from(v)), i8::to_le_bytes)?,
        "INT16" => narrow::<i16, 2>(name, c.int_contents.iter().map(|&v| i64::from(v)), i16::to_le_bytes)?,
        "INT32" => c.int_contents.iter().flat_map(|v| v.to_le_bytes()).collect(),
        "INT64" => c.int64_contents.iter().flat_map(|v| v.to_le_bytes()).collect(),
        "FP32" => c.fp32_contents.iter().flat_map(|v| v.to_le_bytes()).collect(),
        "FP64" => c.fp64_contents.iter().flat_map(|v| v.to_le_bytes()).collect(),
        "BYTES" => {
            let mut out = Vec::new();
            for e in &c.bytes_contents {
                let len = u32::try_from(e.len()).map_err(|_| invalid(name, "a BYTES element is over 4 GiB"))?;
                out.extend(len.to_le_bytes());
                out.extend_from_slice(e);
            }
            out
        }
        other => {
            return Err(invalid(
                name,
                format!("datatype `{}` has no typed contents: send it in raw_input_contents", clip(other, 20)),
            ));
        }
    };
    Ok(Bytes::from(bytes))
}

/// A `ModelInferRequest` in the REST codec's form, which then checks it against the model.
fn to_request(request: pb::ModelInferRequest) -> Result<InferRequest, ApiError> {
    let pb::ModelInferRequest { id, parameters: params, inputs, outputs, raw_input_contents, .. } = request;
    if !raw_input_contents.is_empty() && raw_input_contents.len() != inputs.len() {
        return Err(ApiError::InvalidField {
            field: "raw_input_contents".into(),
            problem: format!(
                "has {} entries for {} inputs: one per input, in the inputs' order",
                raw_input_contents.len(),
                inputs.len()
            ),
        });
    }
    let mut raw = raw_input_contents.into_iter();
    let inputs = inputs
        .into_iter()
        .map(|t| {
            let data = match (raw.next(), t.contents) {
                (Some(_), Some(_)) => return Err(invalid(&t.name, "has both contents and raw_input_contents")),
                (Some(bytes), None) => bytes,
                (None, Some(contents)) => contents_bytes(&t.name, &t.datatype, contents)?,
                (None, None) => return Err(invalid(&t.name, "has neither contents nor raw_input_contents")),
            };
            Ok(InputTensor {
                name: t.name,
                shape: t.shape,
                datatype: t.datatype,
                parameters: parameters(t.parameters),
                data: None,
                raw: Some(data),
            })
        })
        .collect::<Result<Vec<_>, ApiError>>()?;
    let outputs = (!outputs.is_empty()).then(|| {
        outputs.into_iter().map(|o| RequestedOutput { name: o.name, parameters: parameters(o.parameters) }).collect()
    });
    Ok(InferRequest { id: Some(id).filter(|id| !id.is_empty()), parameters: parameters(params), inputs, outputs })
}

fn string_param(s: String) -> pb::InferParameter {
    pb::InferParameter { parameter_choice: Some(pb::infer_parameter::ParameterChoice::StringParam(s)) }
}

fn double_param(d: f64) -> pb::InferParameter {
    pb::InferParameter { parameter_choice: Some(pb::infer_parameter::ParameterChoice::DoubleParam(d)) }
}

/// The pipeline's answer as a `ModelInferResponse`: every output raw, in the order asked for.
fn to_response(done: Done) -> pb::ModelInferResponse {
    let Done { id, outputs, answer } = done;
    let spec = &answer.model.spec;
    let n = answer.rows.len() as i64;
    let mut tensors = Vec::with_capacity(outputs.len());
    let mut raw = Vec::with_capacity(outputs.len());
    for &(idx, _) in &outputs {
        let declared = &spec.outputs[idx];
        let mut shape = vec![n];
        shape.extend(&declared.dims[1..]);
        tensors.push(pb::model_infer_response::InferOutputTensor {
            name: declared.name.clone(),
            datatype: declared.dtype.as_str().to_string(),
            shape,
            parameters: HashMap::new(),
            contents: None,
        });
        raw.push(Bytes::from(codec::output_bytes(&answer.rows, idx)));
    }
    let (policy, policy_rows) = codec::decisions(&answer.rows);
    let t = &answer.timing;
    let mut parameters = HashMap::from([
        ("policy".to_string(), string_param(policy.to_string())),
        ("total_ms".to_string(), double_param(t.total_ms)),
        ("queue_ms".to_string(), double_param(t.queue_ms)),
        ("preprocess_ms".to_string(), double_param(t.preprocess_ms)),
        ("inference_ms".to_string(), double_param(t.inference_ms)),
        (
            "batch_size".to_string(),
            pb::InferParameter {
                parameter_choice: Some(pb::infer_parameter::ParameterChoice::Int64Param(t.batch_size as i64)),
            },
        ),
    ]);
    if let Some(rows) = policy_rows {
        parameters.insert("policy_rows".to_string(), string_param(rows.to_string()));
    }
    pb::ModelInferResponse {
        model_name: spec.name.clone(),
        model_version: spec.version.clone(),
        id: id.unwrap_or_default(),
        parameters,
        outputs: tensors,
        raw_output_contents: raw,
    }
}

/// One infer request for `robot`, counted as the REST endpoint counts it.
async fn infer(
    app: &AppState,
    robot: &RobotRecord,
    request: pb::ModelInferRequest,
) -> Result<GrpcResponse<pb::ModelInferResponse>, ApiError> {
    let received = Instant::now();
    let mut resolved = None;
    let result = async {
        app.check_accepting()?;
        let model = app.models.resolve_version(&request.model_name, version(&request.model_version))?;
        resolved = Some(model.clone());
        run_checked(app, robot.clone(), model, received, move |spec, text, limits| {
            codec::check(to_request(request)?, spec, text, limits)
        })
        .await
    }
    .await;
    let status = result.as_ref().map_or_else(ApiError::request_status, |_| "success");
    app.pipeline.count(Some(robot), resolved.as_deref(), status, received);
    let done = result?;
    let mut headers = axum::http::HeaderMap::new();
    if let Some(status) = done.answer.quota {
        crate::error::rate_limit_headers(&mut headers, &status);
    }
    Ok(GrpcResponse::from_parts(
        tonic::metadata::MetadataMap::from_headers(headers),
        to_response(done),
        tonic::Extensions::default(),
    ))
}

type Answer<T> = Result<GrpcResponse<T>, Status>;

#[tonic::async_trait]
impl GrpcInferenceService for Service {
    async fn server_live(&self, _: GrpcRequest<pb::ServerLiveRequest>) -> Answer<pb::ServerLiveResponse> {
        Ok(GrpcResponse::new(pb::ServerLiveResponse { live: true }))
    }

    async fn server_ready(&self, _: GrpcRequest<pb::ServerReadyRequest>) -> Answer<pb::ServerReadyResponse> {
        let ready = self.app.models.is_serving() && !self.app.is_shutting_down();
        Ok(GrpcResponse::new(pb::ServerReadyResponse { ready }))
    }

    async fn model_ready(&self, request: GrpcRequest<pb::ModelReadyRequest>) -> Answer<pb::ModelReadyResponse> {
        let r = request.into_inner();
        let ready = self.app.models.resolve_version(&r.name, version(&r.version)).is_ok();
        Ok(GrpcResponse::new(pb::ModelReadyResponse { ready }))
    }

    async fn server_metadata(&self, _: GrpcRequest<pb::ServerMetadataRequest>) -> Answer<pb::ServerMetadataResponse> {
        Ok(GrpcResponse::new(pb::ServerMetadataResponse {
            name: "vla-appliance".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            extensions: ["binary_tensor_data", "model_repository", "statistics", "parameters"].map(String::from).into(),
        }))
    }

    async fn model_metadata(
        &self,
        request: GrpcRequest<pb::ModelMetadataRequest>,
    ) -> Answer<pb::ModelMetadataResponse> {
        let r = request.into_inner();
        let model = self.app.models.resolve_version(&r.name, version(&r.version)).map_err(ApiError::from)?;
        let spec = &model.spec;
        let tensors = |ts: &[crate::spec::TensorSpec]| {
            ts.iter()
                .map(|t| pb::model_metadata_response::TensorMetadata {
                    name: t.name.clone(),
                    datatype: t.dtype.as_str().into(),
                    shape: t.dims.clone(),
                })
                .collect()
        };
        Ok(GrpcResponse::new(pb::ModelMetadataResponse {
            name: spec.name.clone(),
            versions: vec![spec.version.clone()],
            platform: spec.platform.as_str().into(),
            inputs: tensors(&spec.inputs),
            outputs: tensors(&spec.outputs),
        }))
    }

    async fn model_infer(&self, request: GrpcRequest<pb::ModelInferRequest>) -> Answer<pb::ModelInferResponse> {
        let caller = caller(&request)?;
        let robot = caller.robot()?.clone();
        Ok(infer(&self.app, &robot, request.into_inner()).await?)
    }

    type ModelStreamInferStream =
        Pin<Box<dyn Stream<Item = Result<pb::ModelStreamInferResponse, Status>> + Send + 'static>>;

    async fn model_stream_infer(
        &self,
        request: GrpcRequest<tonic::Streaming<pb::ModelInferRequest>>,
    ) -> Answer<Self::ModelStreamInferStream> {
        let caller = caller(&request)?;
        let robot = caller.robot()?.clone();
        self.app.check_accepting()?;
        let permit = self.app.streams.acquire(&robot.robot_id)?;
        let inbound = request.into_inner();
        // One answer waits at most: the client reads it before the next request is taken.
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        tokio::spawn(stream(self.app.clone(), robot, inbound, tx, permit));
        Ok(GrpcResponse::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }

    async fn model_statistics(
        &self,
        request: GrpcRequest<pb::ModelStatisticsRequest>,
    ) -> Answer<pb::ModelStatisticsResponse> {
        let r = request.into_inner();
        let models = if r.name.is_empty() {
            self.app.models.serving()
        } else {
            vec![self.app.models.resolve_version(&r.name, version(&r.version)).map_err(ApiError::from)?]
        };
        let model_stats = models
            .iter()
            .map(|m| {
                // The REST extension's figures (`super::oip::stats_of`), field for field.
                let t = m.batcher.totals();
                let d = |count: u64, ns: u64| Some(pb::StatisticDuration { count, ns });
                pb::ModelStatistics {
                    name: m.spec.name.clone(),
                    version: m.spec.version.clone(),
                    last_inference: t.last_inference_unix_ms,
                    inference_count: t.success,
                    execution_count: t.executions,
                    inference_stats: Some(pb::InferStatistics {
                        success: d(t.success, t.queue_ns + t.compute_ns),
                        fail: d(t.fail, 0),
                        queue: d(t.success, t.queue_ns),
                        compute_input: d(0, 0),
                        compute_infer: d(t.success, t.compute_ns),
                        compute_output: d(0, 0),
                    }),
                }
            })
            .collect();
        Ok(GrpcResponse::new(pb::ModelStatisticsResponse { model_stats }))
    }

    async fn repository_index(
        &self,
        request: GrpcRequest<pb::RepositoryIndexRequest>,
    ) -> Answer<pb::RepositoryIndexResponse> {
        let ready_only = request.into_inner().ready;
        let models = self.app.models.clone();
        let index = blocking(move || models.index().map_err(|e| ApiError::Internal(e.to_string()))).await?;
        let models = index
            .into_iter()
            .filter(|e| e.ready || !ready_only)
            .map(|e| pb::repository_index_response::ModelIndex {
                name: e.name,
                version: e.version.unwrap_or_default(),
                state: if e.ready { "READY" } else { "UNAVAILABLE" }.into(),
                reason: e.reason.unwrap_or_default(),
            })
            .collect();
        Ok(GrpcResponse::new(pb::RepositoryIndexResponse { models }))
    }

    async fn repository_model_load(
        &self,
        request: GrpcRequest<pb::RepositoryModelLoadRequest>,
    ) -> Answer<pb::RepositoryModelLoadResponse> {
        let name = request.into_inner().model_name;
        let models = self.app.models.clone();
        let loading = name.clone();
        let loaded = blocking(move || Ok(models.load_model(&loading))).await?;
        match loaded {
            Ok(_) => Ok(GrpcResponse::new(pb::RepositoryModelLoadResponse {})),
            Err(reason) => Err(ApiError::ModelLoad { model: clip(&name, 80), reason }.into()),
        }
    }

    async fn repository_model_unload(
        &self,
        request: GrpcRequest<pb::RepositoryModelUnloadRequest>,
    ) -> Answer<pb::RepositoryModelUnloadResponse> {
        let name = request.into_inner().model_name;
        let models = self.app.models.clone();
        blocking(move || Ok(models.unload_model(&name)?)).await?;
        Ok(GrpcResponse::new(pb::RepositoryModelUnloadResponse {}))
    }
}

fn stream_error(e: &ApiError) -> pb::ModelStreamInferResponse {
    pb::ModelStreamInferResponse { error_message: crate::error::grpc_message(e), infer_response: None }
}

/// One `ModelStreamInfer` stream: its requests in order, each answered before the next is
/// read (see the module header).
async fn stream(
    app: AppState,
    robot: RobotRecord,
    mut inbound: tonic::Streaming<pb::ModelInferRequest>,
    tx: tokio::sync::mpsc::Sender<Result<pb::ModelStreamInferResponse, Status>>,
    _permit: super::sessions::SessionPermit,
) {
    let idle = Duration::from_millis(app.config.server.idle_timeout_ms);
    let mut rate = Rate::new(app.config.server.websocket_messages_per_s);
    let opened = Instant::now();
    loop {
        let next = tokio::select! {
            next = tokio::time::timeout(idle, inbound.message()) => next,
            () = tx.closed() => return,
        };
        let request = match next {
            Ok(Ok(Some(request))) => request,
            // Finished, or reset by the client.
            Ok(Ok(None) | Err(_)) => return,
            Err(_) => {
                let idle_ms = idle.as_millis();
                let _ = tx.send(Err(Status::cancelled(format!("no request for {idle_ms} ms: stream closed")))).await;
                return;
            }
        };
        let reply = if !rate.admit(opened) {
            stream_error(&ApiError::TooManyMessages { per_s: rate.per_s() })
        } else {
            tokio::select! {
                answer = infer(&app, &robot, request) => match answer {
                    Ok(response) => pb::ModelStreamInferResponse {
                        error_message: String::new(),
                        infer_response: Some(response.into_inner()),
                    },
                    Err(e) => stream_error(&e),
                },
                // The client went away: its request is dropped (never computed if still queued).
                () = tx.closed() => return,
            }
        };
        if tx.send(Ok(reply)).await.is_err() {
            return;
        }
    }
}
