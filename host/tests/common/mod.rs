//! Harness for tests that run real `host` and `kv` processes on loopback.
//!
//! Every cluster gets its own temporary directory and its own free ports, so tests run
//! in parallel. Tests synchronise by polling `GET /status` until a condition holds or a
//! deadline passes, never by sleeping for a fixed time; a timeout panics with what was
//! last seen and the tail of every node's log.
//!
//! # Layout
//!
//! - [`paths`]: where the binaries and guests are; [`build`]: the guests built on first
//!   use, once per run;
//! - [`process`]: free ports, child processes with timeouts, polling;
//! - [`http`]: admin calls (through `host::http_client`) and `/status` fields;
//! - [`kv_ops`]: writes and reads through the `kv` binary;
//! - [`node`]: one `host` process; [`cluster`]: several, and waiting on their status;
//! - [`history`]: recorded client operations and their checker; [`workload`]: the clients
//!   that record them.
//!
//! Everything is re-exported here, so a test file says `use common::*;`.

// Each test binary uses its own subset of these helpers.
#![allow(dead_code, unused_imports)]

pub mod build;
pub mod cluster;
pub mod history;
pub mod http;
pub mod kv_ops;
pub mod node;
pub mod paths;
pub mod process;
pub mod workload;

pub use cluster::*;
pub use http::*;
pub use kv_ops::*;
pub use node::*;
pub use paths::*;
pub use process::*;
