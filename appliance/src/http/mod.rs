//! The edge: everything that knows HTTP requests and the appliance's shared state.
//!
//! | file | what |
//! |---|---|
//! | [`listener`] | accept loop, TLS handshake, HTTP/1.1 and HTTP/2, graceful shutdown |
//! | [`routes`] | the route table (the only file naming every handler), 404/405, the auth and HTTP-metrics layers |
//! | [`auth`] | who is calling: robot key, client certificate, admin or metrics token; access by path |
//! | [`body`] | bounded body reading and draining |
//! | [`state`] | [`AppState`], path parameters, blocking work |
//! | [`v1`] | `POST /v1/inference`, `GET /v1/models`, `GET /health` |
//! | [`oip`] | the Open Inference Protocol v2 over REST (handlers; [`oip::codec`] the tensor codec, shared with gRPC) |
//! | [`grpc`] | the Open Inference Protocol over gRPC (`inference.GRPCInferenceService`, tonic) |
//! | [`openpi`] | openpi's WebSocket protocol (`GET /openpi/{model}`; [`openpi::codec`] MessagePack) |
//! | [`sessions`] | streaming sessions (openpi, gRPC streams) in all and per robot, messages a second |
//! | [`admin`] | robots and the OIP model repository |
//! | [`policies`] | policies and the audit log |
//! | [`quotas`] | quotas |
//! | [`monitoring`] | `/metrics` and the stats endpoints |
//!
//! Inference handlers parse and check their request, then run the shared pipeline
//! ([`crate::infer`]); errors become answers in [`crate::error`].

pub mod admin;
pub mod auth;
pub mod body;
pub mod grpc;
pub mod listener;
pub mod monitoring;
pub mod oip;
pub mod openpi;
pub mod policies;
pub mod quotas;
pub mod routes;
pub mod sessions;
pub mod state;
pub mod v1;

pub use listener::{ListenerLimits, serve, serve_plain};
pub use routes::{plain_metrics_router, router, routes};
pub use state::AppState;
