//! The one place that calls `bindgen!`: host-side types and glue for the `vla:policy` WIT
//! package in `wit/`. Both worlds share the `types` and `host` interfaces: the safety world's
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
    self, Action, ActionKind, Decision, Denial, Modification, RequestContext,
};
pub use admission_world::{Admission, AdmissionPre};
pub use safety_world::{Safety, SafetyPre};

/// The interfaces a policy of each world may import, without their `@version` suffix; the
/// version must be compatible with [`PACKAGE_VERSION`].
pub const ADMISSION_IMPORTS: [&str; 3] = ["vla:policy/host", "vla:policy/types", "vla:policy/quota"];
pub const SAFETY_IMPORTS: [&str; 2] = ["vla:policy/host", "vla:policy/types"];
/// The WIT package's version the host implements.
pub const PACKAGE_VERSION: &str = "0.1.0";
