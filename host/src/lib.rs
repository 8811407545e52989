//! A Raft member whose state machine is a WebAssembly component.
//!
//! # Layout
//!
//! - [`node`]: start-up (inputs, storage, Raft, servers, bootstrap or join) and shutdown.
//! - [`types`]: the openraft type configuration (what an entry carries).
//! - [`identity`]: cluster id and member uid (`node.json`), and the checks on peer hellos.
//! - [`store`]: the durable log (`store::log`) and the guest-backed state machine
//!   (`store::sm`, a worker thread owning the guest instance and the snapshots).
//! - [`fsm`]: the wasmtime engine, deterministic configuration, and guest instances.
//! - [`net`]: peer RPC (AppendEntries, Vote, InstallSnapshot) over TCP.
//! - [`api`]: what a proposal or query becomes, and the binary and text client protocols.
//! - [`admin`]: HTTP `/status`, `/metrics` (served), `/join` (routed to [`join`]).
//! - [`join`]: the join request, the leader's policy for it, the joining node's client.
//! - [`client`]: the client library (`kv`, tests, forwarding).
//! - [`http_client`]: a small HTTP/1.1 client (joins, the tests' admin calls).
//! - [`loadgen`]: closed-loop load, measured (the `loadgen` binary, tests, experiments).
//! - [`codec`], [`proto`]: frames and wire messages.
//! - [`metrics`]: everything `/metrics` shows.
//! - [`profiling`]: `--cpuprofile`, `--memprofile`; [`backoff`]: pauses between retries.
//! - [`checkpoint`], [`lease`]: divergence detection; the leader lease and vote hold.
//! - [`monitor`]: `--monitor FILE`, resource samples once a second.
//! - [`check`]: `host check`, a guest checked against `wit/fsm.wit` in-process.
//! - [`daemon`]: what `host` and `logger` share around their work: logs, runtime, signals,
//!   exit codes.
//! - [`archive`]: the command archive format (loggers, `--log-commands`, recovery streams).

pub mod admin;
pub mod api;
pub mod archive;
pub mod backoff;
pub mod check;
pub mod checkpoint;
pub mod client;
pub mod codec;
pub mod config;
pub mod daemon;
pub mod discovery;
pub mod fsm;
pub mod http_client;
pub mod identity;
pub mod join;
pub mod lease;
pub mod loadgen;
pub mod metrics;
pub mod monitor;
pub mod net;
pub mod node;
pub mod profiling;
pub mod proto;
pub mod store;
pub mod types;
