//! kvstore: an in-memory key/value state machine for the wasm-raft host.
//!
//! Everything but the `guest` glue is plain Rust so that it can be tested natively.

pub use kvcommand::{command, proto};
pub mod settings;
pub mod snapshot;
pub mod store;

// Its export shims only link as a wasm component: a native cdylib rejects their symbol names.
#[cfg(target_arch = "wasm32")]
mod guest;
