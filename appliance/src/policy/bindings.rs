//! The one place that calls `bindgen!`: host-side types and glue for the `vla:policy` WIT
//! package in `wit/`, at both versions the host runs:
//!
//! - **0.2.0** (`wit/policy.wit`), the current one: the host's own types ([`Action`],
//!   [`Decision`], …) are this version's;
//! - **0.1.0** (`wit/v0.1.0/policy.wit`, frozen): components built against it keep working. Its
//!   values are converted to and from 0.2.0's at the call ([`v0_1`]); a 0.1.0 denial has no
//!   severity.
//!
//! In each version both worlds share the `types` and `host` interfaces: the safety world's
//! bindings reuse the admission world's, so one host implementation serves both.

#![allow(missing_debug_implementations)]

mod admission_world {
    wasmtime::component::bindgen!({
        world: "admission",
        path: "../wit",
        // A quota call with invalid limits (a zero rate) traps the policy: it fails closed
        // instead of being given an answer it did not ask for.
        imports: { "vla:policy/quota": trappable },
    });
}

mod safety_world {
    wasmtime::component::bindgen!({
        world: "safety",
        path: "../wit",
        with: {
            "vla:policy/types": super::admission_world::vla::policy::types,
            "vla:policy/host": super::admission_world::vla::policy::host,
        },
    });
}

pub use admission_world::vla::policy::host::{self, LogLevel};
pub use admission_world::vla::policy::quota;
pub use admission_world::vla::policy::types::{
    self, Action, ActionKind, Decision, Denial, Modification, RequestContext, Severity,
};
pub use admission_world::{Admission, AdmissionPre};
pub use safety_world::{Safety, SafetyPre};

/// `vla:policy@0.1.0`, and its conversions to and from the host's (0.2.0) types.
pub mod v0_1 {
    mod admission_world {
        wasmtime::component::bindgen!({
            world: "admission",
            path: "../wit/v0.1.0",
            imports: { "vla:policy/quota": trappable },
        });
    }

    mod safety_world {
        wasmtime::component::bindgen!({
            world: "safety",
            path: "../wit/v0.1.0",
            with: {
                "vla:policy/types": super::admission_world::vla::policy::types,
                "vla:policy/host": super::admission_world::vla::policy::host,
            },
        });
    }

    pub use admission_world::vla::policy::{host, quota, types};
    pub use admission_world::{Admission, AdmissionPre};
    pub use safety_world::{Safety, SafetyPre};

    use super::types as now;

    pub fn action_kind(k: now::ActionKind) -> types::ActionKind {
        match k {
            now::ActionKind::JointVelocity => types::ActionKind::JointVelocity,
            now::ActionKind::JointPosition => types::ActionKind::JointPosition,
            now::ActionKind::EndEffectorDelta => types::ActionKind::EndEffectorDelta,
        }
    }

    fn action_kind_now(k: types::ActionKind) -> now::ActionKind {
        match k {
            types::ActionKind::JointVelocity => now::ActionKind::JointVelocity,
            types::ActionKind::JointPosition => now::ActionKind::JointPosition,
            types::ActionKind::EndEffectorDelta => now::ActionKind::EndEffectorDelta,
        }
    }

    pub fn context(c: &now::RequestContext) -> types::RequestContext {
        types::RequestContext {
            request_id: c.request_id.clone(),
            robot_id: c.robot_id.clone(),
            robot_type: c.robot_type.clone(),
            model: c.model.clone(),
            instruction: c.instruction.clone(),
            state: c.state.clone(),
            time_ms: c.time_ms,
        }
    }

    pub fn action(a: &now::Action) -> types::Action {
        types::Action { kind: action_kind(a.kind), dof: a.dof, horizon: a.horizon, values: a.values.clone() }
    }

    /// A 0.1.0 decision as the host's; its denial has no severity.
    pub fn decision(d: types::Decision) -> now::Decision {
        match d {
            types::Decision::Allow => now::Decision::Allow,
            types::Decision::Deny(d) => {
                now::Decision::Deny(now::Denial { code: d.code, reason: d.reason, severity: None })
            }
            types::Decision::Modify(m) => now::Decision::Modify(now::Modification {
                action: now::Action {
                    kind: action_kind_now(m.action.kind),
                    dof: m.action.dof,
                    horizon: m.action.horizon,
                    values: m.action.values,
                },
                reason: m.reason,
            }),
        }
    }
}

/// The interfaces a policy of each world may import, without their `@version` suffix; the
/// version must be a patch release of one of [`PACKAGE_VERSIONS`].
pub const ADMISSION_IMPORTS: [&str; 3] = ["vla:policy/host", "vla:policy/types", "vla:policy/quota"];
pub const SAFETY_IMPORTS: [&str; 2] = ["vla:policy/host", "vla:policy/types"];
/// The WIT package's versions the host implements: the current one first.
pub const PACKAGE_VERSIONS: [&str; 2] = ["0.2.0", "0.1.0"];
