//! The WebAssembly runtime: loads a guest component once, checks it implements the
//! contract in `wit/`, and makes deterministic instances of it.
//!
//! Determinism is enforced here and nowhere else: NaN canonicalisation, fuel (never
//! epochs or timers), a memory limit, no threads or relaxed SIMD nondeterminism, and a
//! WASI context with a frozen clock, a fixed random stream, no network, and file metadata,
//! directory order and timers that are the same on every member (`wasi_det`).

mod instance;
mod wasi_det;

use std::path::{Path, PathBuf};
use std::time::Duration;

use sha2::{Digest, Sha256};
use wasmtime::component::{Component, HasSelf, Linker, ResourceTable};
use wasmtime::{Config, Engine, ResourceLimiter, StoreLimits};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

pub use instance::{ApplyOutcome, GuestError, Instance};

pub(crate) mod bindings {
    wasmtime::component::bindgen!({
        world: "fsm",
        path: "../wit",
        imports: { "wasm-raft:fsm/host.environment-failure": trappable },
    });
}

use bindings::wasm_raft::fsm::host::Level;

/// Why a guest could not be loaded. Each names the file, for the operator.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{path}: no such file")]
    Missing { path: PathBuf },
    #[error("{path}: cannot read: {source}")]
    Unreadable { path: PathBuf, source: std::io::Error },
    #[error("{path}: not a WebAssembly component ({why}); build guests with `cargo build --target wasm32-wasip2`")]
    NotComponent { path: PathBuf, why: String },
    #[error("{path}: does not implement the wasm-raft:fsm state-machine contract: {why}")]
    WrongContract { path: PathBuf, why: String },
    #[error("cannot configure the WebAssembly engine: {0}")]
    Engine(String),
}

/// Guest execution limits, meant to be identical on every member. Exceeding one in `apply`
/// stops the member (it is never a command's result), so a member with a smaller budget
/// stops where the others go on: a safety margin, to be set wide.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Fuel for one `apply`d entry.
    pub fuel_per_entry: u64,
    /// Fuel for one `query`: a query's answer is never replicated, so its budget is this
    /// member's own business (not part of the identity); any client can send one, and
    /// running out only fails it, so it is smaller.
    pub fuel_per_query: u64,
    /// Linear memory cap per instance.
    pub memory_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { fuel_per_entry: 100_000_000, fuel_per_query: 10_000_000, memory_bytes: 4 << 30 }
    }
}

impl Limits {
    /// The limits that change replicated behaviour, as the flags give them: pinned in
    /// `node.json` and compared on every join.
    pub fn pinned(&self) -> crate::identity::GuestLimits {
        crate::identity::GuestLimits {
            fuel_per_entry: self.fuel_per_entry,
            guest_memory_mb: (self.memory_bytes >> 20) as u64,
        }
    }
}

/// A compiled guest, ready to be instantiated any number of times.
pub struct GuestModule {
    engine: Engine,
    pre: bindings::FsmPre<HostState>,
    sha256: String,
    path: PathBuf,
    pub limits: Limits,
}

impl GuestModule {
    pub fn load(path: &Path, limits: Limits) -> Result<Self, LoadError> {
        let bytes = std::fs::read(path).map_err(|source| match source.kind() {
            std::io::ErrorKind::NotFound => LoadError::Missing { path: path.to_path_buf() },
            _ => LoadError::Unreadable { path: path.to_path_buf(), source },
        })?;
        Self::from_bytes(path, &bytes, limits)
    }

    pub fn from_bytes(path: &Path, bytes: &[u8], limits: Limits) -> Result<Self, LoadError> {
        let path = path.to_path_buf();
        if !bytes.starts_with(b"\0asm") {
            return Err(LoadError::NotComponent { path, why: "no WebAssembly header".into() });
        }
        if wasmparser_is_core_module(bytes) {
            return Err(LoadError::NotComponent { path, why: "it is a core module, not a component".into() });
        }
        let engine = engine().map_err(|e| LoadError::Engine(e.to_string()))?;
        let component = Component::new(&engine, bytes)
            .map_err(|e| LoadError::NotComponent { path: path.clone(), why: format!("{e:#}") })?;
        let mut linker = Linker::<HostState>::new(&engine);
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker)
            .and_then(|()| wasi_det::shadow(&mut linker))
            .and_then(|()| bindings::Fsm::add_to_linker::<_, HasSelf<_>>(&mut linker, |s| s))
            .map_err(|e| LoadError::Engine(format!("{e:#}")))?;
        let pre = linker
            .instantiate_pre(&component)
            .map_err(|e| LoadError::WrongContract { path: path.clone(), why: format!("{e:#}") })?;
        let pre = bindings::FsmPre::new(pre)
            .map_err(|e| LoadError::WrongContract { path: path.clone(), why: format!("{e:#}") })?;
        Ok(GuestModule { engine, pre, sha256: hex::encode(Sha256::digest(bytes)), path, limits })
    }

    /// Hex sha256 of the module bytes: the guest's identity across the cluster.
    pub fn sha256(&self) -> &str {
        &self.sha256
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }
}

/// A core module starts with the same magic as a component; the version/layer word
/// differs (components have layer 1).
fn wasmparser_is_core_module(bytes: &[u8]) -> bool {
    bytes.len() >= 8 && bytes[6..8] == [0, 0]
}

fn engine() -> wasmtime::Result<Engine> {
    let mut config = Config::new();
    config
        .wasm_component_model(true)
        .consume_fuel(true)
        .cranelift_nan_canonicalization(true)
        .relaxed_simd_deterministic(true)
        .epoch_interruption(false);
    Engine::new(&config)
}

/// Store data of one guest instance.
pub struct HostState {
    wasi: WasiCtx,
    table: ResourceTable,
    limiter: Limiter,
    paths: wasi_det::DescriptorPaths,
    node: u64,
}

/// The guest reported that this member's environment failed (`environment-failure`): the
/// error the call traps with, so that the caller can tell it from a trap of the guest's
/// own making.
#[derive(Debug, thiserror::Error)]
#[error("the guest reported that this member's environment failed: {0}")]
pub struct EnvironmentFailure(pub String);

/// The memory limit, remembering whether it refused anything: whether a `memory.grow`
/// succeeds depends on this instance's heap history, so the caller must know when one
/// failed, even if the guest then went on (a Rust guest turns the failure into an abort,
/// which looks like any other `unreachable`; another may return an error).
struct Limiter {
    limits: StoreLimits,
    memory_bytes: usize,
    refused: Option<String>,
}

impl Limiter {
    fn new(memory_bytes: usize) -> Self {
        let limits = wasmtime::StoreLimitsBuilder::new().memory_size(memory_bytes).build();
        Limiter { limits, memory_bytes, refused: None }
    }

    fn refuse(&mut self, why: String) {
        self.refused.get_or_insert(why);
    }
}

impl ResourceLimiter for Limiter {
    fn memory_growing(&mut self, current: usize, desired: usize, maximum: Option<usize>) -> wasmtime::Result<bool> {
        let allowed = self.limits.memory_growing(current, desired, maximum)?;
        if !allowed {
            self.refuse(format!(
                "its memory could not grow from {} to {} MiB (the limit is {} MiB, --guest-memory-mb)",
                current >> 20,
                desired >> 20,
                self.memory_bytes >> 20
            ));
        }
        Ok(allowed)
    }

    fn memory_grow_failed(&mut self, error: wasmtime::Error) -> wasmtime::Result<()> {
        self.refuse(format!("its memory could not grow: {error:#}"));
        Ok(())
    }

    fn table_growing(&mut self, current: usize, desired: usize, maximum: Option<usize>) -> wasmtime::Result<bool> {
        let allowed = self.limits.table_growing(current, desired, maximum)?;
        if !allowed {
            self.refuse(format!("a table could not grow from {current} to {desired} elements"));
        }
        Ok(allowed)
    }

    fn table_grow_failed(&mut self, error: wasmtime::Error) -> wasmtime::Result<()> {
        self.refuse(format!("a table could not grow: {error:#}"));
        Ok(())
    }

    fn instances(&self) -> usize {
        self.limits.instances()
    }

    fn tables(&self) -> usize {
        self.limits.tables()
    }

    fn memories(&self) -> usize {
        self.limits.memories()
    }
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}

/// Guests log through the member's own tracing output; a line is capped so a guest
/// cannot flood the log with one call.
impl bindings::wasm_raft::fsm::host::Host for HostState {
    fn log(&mut self, level: Level, message: String) {
        let msg = capped(message);
        let node = self.node;
        match level {
            Level::Trace => tracing::trace!(target: "guest", node, "{msg}"),
            Level::Debug => tracing::debug!(target: "guest", node, "{msg}"),
            Level::Info => tracing::info!(target: "guest", node, "{msg}"),
            Level::Warn => tracing::warn!(target: "guest", node, "{msg}"),
            Level::Error => tracing::error!(target: "guest", node, "{msg}"),
        }
    }

    /// Never returns to the guest: the trap unwinds it, and `Instance` turns the error
    /// into a failure of this member.
    fn environment_failure(&mut self, reason: String) -> wasmtime::Result<()> {
        Err(wasmtime::Error::new(EnvironmentFailure(capped(reason))))
    }
}

fn capped(mut msg: String) -> String {
    const MAX: usize = 4096;
    if msg.len() > MAX {
        let mut cut = MAX;
        while !msg.is_char_boundary(cut) {
            cut -= 1;
        }
        msg.truncate(cut);
        msg.push('…');
    }
    msg
}

/// A wall clock stuck at the Unix epoch: what a guest reads must be the same on every
/// member.
struct FrozenClock;

impl wasmtime_wasi::HostWallClock for FrozenClock {
    fn resolution(&self) -> Duration {
        Duration::from_nanos(1)
    }
    fn now(&self) -> Duration {
        Duration::ZERO
    }
}

impl wasmtime_wasi::HostMonotonicClock for FrozenClock {
    fn resolution(&self) -> u64 {
        1
    }
    fn now(&self) -> u64 {
        0
    }
}

fn wasi_ctx(guest_dir: Option<&Path>) -> wasmtime::Result<WasiCtx> {
    let mut b = WasiCtx::builder();
    b.wall_clock(FrozenClock)
        .monotonic_clock(FrozenClock)
        .secure_random(wasmtime_wasi::Deterministic::new(b"wasm-raft".to_vec()))
        .insecure_random(wasmtime_wasi::Deterministic::new(b"wasm-raft".to_vec()))
        .insecure_random_seed(0)
        .allow_tcp(false)
        .allow_udp(false)
        .allow_ip_name_lookup(false)
        // Guests run on the state-machine worker, a plain thread of their own: file calls
        // can block it directly instead of hopping to a blocking pool (about 4x cheaper).
        .allow_blocking_current_thread(true);
    if let Some(dir) = guest_dir {
        b.preopened_dir(dir, "/data", wasmtime_wasi::FsPerms::ReadWrite)?;
    }
    Ok(b.build())
}
