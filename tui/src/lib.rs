//! The operator console (`vla-console`): a ratatui terminal app that watches an appliance live
//! and manages its policies, over the appliance's HTTPS API with the admin token.
//!
//! - [`client`]: the HTTPS connection (CA file or pinned certificate), the polled snapshot and
//!   the policy actions;
//! - [`poller`]: the background thread that polls and runs actions;
//! - [`app`]: state and keys, no I/O;
//! - [`ui`]: drawing, a pure function of the state;
//! - [`prom`]: reading the appliance's `/metrics`.

pub mod app;
pub mod client;
pub mod poller;
pub mod prom;
pub mod ui;
