//! Policy stage: operator-supplied WebAssembly components that decide on each request.
//!
//! Admission policies run after validation, before a request is queued; safety policies run on
//! the action the model proposed, before it is returned. Each chain runs in configured order
//! (`order`, then name). The chain fails closed:
//!
//! - an enforcing `deny` stops the chain and the robot gets 422 `policy_rejected`;
//! - an enforcing policy that fails (trap, timeout, fuel, memory, invalid output, cannot be
//!   loaded, circuit breaker open) stops the chain and the robot gets 422 `policy_error`;
//! - an enforcing `modify` replaces the action after the host checked it (same kind, dof and
//!   horizon, every value finite) and the next policy sees the replacement;
//! - `shadow` policies are evaluated and recorded, never applied;
//! - a policy that keeps failing opens its circuit breaker ([`Health`]): it is no longer
//!   called and, enforcing, denies every request until an operator acts. Time-outs do not
//!   count: fuel bounds a policy's own work, so a time-out with fuel left is a busy machine.
//!
//! Swaps are atomic: a request takes a snapshot ([`PolicySet`]) before admission and uses it for
//! safety too, so it finishes on the versions it started with.
//!
//! Files, leaves first: [`bindings`] (the WIT bindings), [`types`] (worlds, modes, what a chain
//! answers), [`config`] (the `[policy]` section), [`runtime`] (the sandbox), [`installed`] (a
//! policy as it runs, the set in force), [`chain`] (one chain's run), [`audit`] (the decision
//! log) and [`registry`] (installed policies, persistence, uploads, the chains of a request).
//! The admin endpoints are the edge's (`http/policies.rs`).

pub mod audit;
pub mod bindings;
pub mod chain;
pub mod config;
pub mod installed;
pub mod registry;
pub mod replay;
pub mod runtime;
pub mod types;

pub use bindings::{Action, ActionKind, Decision, RequestContext};
pub use config::{PolicyConfig, PreloadPolicy};
pub use installed::{Installed, PolicyRecord, PolicySet, action_kind};
pub use registry::{ChangeError, Changed, Policies, Proof, Upload, change_description};
pub use types::{
    Health, MAX_CODE_BYTES, MAX_REASON_BYTES, Mode, Passed, Provenance, Refusal, World, check_name, context,
    parse_public_key, trace,
};
