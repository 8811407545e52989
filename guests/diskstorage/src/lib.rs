//! diskstorage: a key/value state machine for the wasm-raft host that keeps its whole
//! state in one preallocated file of fixed-size slots, `/data/diskstorage.dat`.
//!
//! `set-K-V` writes V at offset `K * value-size`, `get-K` reads it back and `delete-K`
//! blanks the slot. Everything but the WASI glue is plain Rust over the [`disk::Disk`]
//! trait, so that it can be tested natively.

pub use kvcommand::{command, proto};
pub mod dirty;
pub mod disk;
pub mod settings;
pub mod snapshot;
pub mod store;

// Its export shims only link as a wasm component: a native cdylib rejects their symbol names.
#[cfg(target_arch = "wasm32")]
mod guest;
#[cfg(target_arch = "wasm32")]
mod wasi_disk;
