//! Quotas: the host-owned, durable rate limits and quotas that admission policies charge
//! through the WIT `quota` import (see `wit/policy.wit`), and the admin endpoints over them.
//!
//! State lives in the store's sled database, in two trees of its own:
//!
//! - `quota_state`: one record per bucket, key `<scope>\0<robot or group>\0<bucket>`, value a
//!   versioned big-endian encoding ([`bucket::State`]);
//! - `quota_limits`: the operator's overrides set through the admin API, key
//!   `<scope>\0<robot or group>`, value a versioned big-endian encoding ([`encode_limits`]).
//!
//! **Decisions in memory.** Every bucket is loaded at start and kept in one of [`STRIPES`]
//! stripes chosen by its scope and key. A charge reads, checks and changes all buckets of one
//! scope under that stripe's mutex: two requests of the same robot never both spend its last
//! token, and a charge is all or nothing across the robot's rate, day and month buckets. No
//! disk I/O happens on the request path (a policy's call stays within its time budget).
//!
//! **Durability** ([`Durability`]). Every change is marked dirty and numbered. One flusher
//! thread takes every stripe's dirty buckets, writes them as one sled batch, flushes the
//! database (one fsync) and publishes the highest number that flush covers. In `sync` mode a
//! request waits for its charge's number before its response is sent, and the flusher runs
//! whenever there is something to flush, so the charges made while one flush is under way
//! share the next (group commit). In `interval:<ms>` mode nobody waits; the flusher runs every
//! `<ms>`. A clean stop flushes in both modes.
//!
//! **Start.** Every record of both trees is decoded at open; one that does not decode stops
//! the start with the key and the recovery commands (`appliance quota export|import|reset`).
//!
//! Files: [`bucket`] (one bucket's arithmetic), [`limits`] (limits, rates, durability),
//! [`config`] (the `[quota]` configuration section), [`quotas`] (the store and the charges a
//! request holds), [`view`] (a robot's buckets as the admin API and metrics show them) and
//! [`offline`] (export, import and reset with the appliance stopped).

pub mod bucket;
pub mod config;
pub mod limits;
pub mod offline;
pub mod quotas;
pub mod view;

pub use bucket::{Bucket, Limit, Rate, Scope, State, Status};
pub use config::QuotaConfig;
pub use limits::{Durability, Limits, decode_limits, encode_limits, parse_rate};
pub use quotas::{Charge, Charged, Consumed, QuotaError, Quotas, STRIPES, Session};
pub use view::robot_view;
