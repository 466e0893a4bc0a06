//! The appliance's benchmarks: a load generator that drives a real appliance over HTTPS, the
//! model's own limits measured in-process through libtorch, and the report (JSON, markdown,
//! SVG charts) that puts the two side by side. `src/main.rs` is the command line;
//! `benches/micro.rs` holds the criterion micro-benchmarks.

pub mod attacks;
pub mod baseline;
pub mod charts;
pub mod fixtures;
pub mod load;
pub mod machine;
pub mod parts;
pub mod peers;
pub mod report;
pub mod server;
pub mod soak;
pub mod standin;
pub mod stats;
pub mod suite;
pub mod transports;
