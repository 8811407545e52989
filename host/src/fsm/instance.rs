//! One guest instance: a wasmtime `Store` and the typed exports. Not `Send`-shared: it
//! lives on the state-machine worker thread (sync WASI calls must not run on a tokio
//! runtime thread).

use std::io::{Read, Write};
use std::path::Path;

use wasmtime::{Store, StoreLimitsBuilder};

use super::bindings::exports::wasm_raft::fsm::state_machine as sm;
use super::bindings::Fsm;
use super::{wasi_ctx, GuestModule, HostState};

/// Fuel for calls that are not per-entry (init with a large preload, snapshot, restore,
/// digest): bounded so a broken guest cannot hang the member forever, but generous.
const BULK_FUEL: u64 = u64::MAX / 4;

/// The outcome of applying one entry.
#[derive(Debug)]
pub enum ApplyOutcome {
    /// The guest's own result (ok or err), replicated as is.
    Result(Result<Vec<u8>, String>),
    /// The guest trapped or ran out of fuel: the instance is unusable and must be
    /// rebuilt; the entry's result is an error on every member.
    Trap(String),
}

pub struct Instance {
    store: Store<HostState>,
    fsm: Fsm,
    fuel_per_entry: u64,
}

/// A failure of a whole-instance operation (init, snapshot, restore, query): the text of
/// the guest's error or trap.
#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    #[error("guest returned an error: {0}")]
    Guest(String),
    #[error("guest trapped: {0}")]
    Trap(String),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

impl GuestError {
    pub fn is_trap(&self) -> bool {
        matches!(self, GuestError::Trap(_))
    }
}

fn trap(e: &wasmtime::Error) -> GuestError {
    GuestError::Trap(describe_trap(e))
}

fn describe_trap(e: &wasmtime::Error) -> String {
    match e.downcast_ref::<wasmtime::Trap>() {
        Some(wasmtime::Trap::OutOfFuel) => "ran out of fuel".to_string(),
        Some(t) => format!("{t}"),
        None => format!("{e:#}"),
    }
}

impl Instance {
    /// Instantiate and `init` a fresh instance. `guest_dir` is preopened as `/data`.
    pub fn new(
        module: &GuestModule,
        config: &[(String, String)],
        guest_dir: Option<&Path>,
        node: u64,
    ) -> Result<Self, GuestError> {
        let wasi = wasi_ctx(guest_dir).map_err(|e| GuestError::Io(std::io::Error::other(format!("{e:#}"))))?;
        let limits =
            StoreLimitsBuilder::new().memory_size(module.limits.memory_bytes).trap_on_grow_failure(true).build();
        let mut store = Store::new(
            module.engine(),
            HostState { wasi, table: wasmtime::component::ResourceTable::new(), limits, node },
        );
        store.limiter(|s| &mut s.limits);
        store.set_fuel(BULK_FUEL).map_err(|e| trap(&e))?;
        let fsm = module.pre.instantiate(&mut store).map_err(|e| trap(&e))?;
        let mut inst = Instance { store, fsm, fuel_per_entry: module.limits.fuel_per_entry };
        inst.fsm
            .wasm_raft_fsm_state_machine()
            .call_init(&mut inst.store, config)
            .map_err(|e| trap(&e))?
            .map_err(GuestError::Guest)?;
        Ok(inst)
    }

    /// Apply one entry under its own fuel budget.
    pub fn apply(&mut self, index: u64, term: u64, command: &[u8]) -> ApplyOutcome {
        if let Err(e) = self.store.set_fuel(self.fuel_per_entry) {
            return ApplyOutcome::Trap(describe_trap(&e));
        }
        let entry = sm::Entry { index, term, command: command.to_vec() };
        match self.fsm.wasm_raft_fsm_state_machine().call_apply(&mut self.store, &[entry]) {
            Ok(mut results) if results.len() == 1 => ApplyOutcome::Result(results.remove(0)),
            Ok(results) => {
                ApplyOutcome::Trap(format!("contract violation: apply returned {} results for 1 entry", results.len()))
            }
            Err(e) => ApplyOutcome::Trap(describe_trap(&e)),
        }
    }

    /// A read-only query, under the per-entry fuel budget (a client must not be able to
    /// stall the member with an expensive read).
    pub fn query(&mut self, request: &[u8]) -> Result<Result<Vec<u8>, String>, GuestError> {
        self.store.set_fuel(self.fuel_per_entry).map_err(|e| trap(&e))?;
        self.fsm.wasm_raft_fsm_state_machine().call_query(&mut self.store, request).map_err(|e| trap(&e))
    }

    pub fn digest(&mut self) -> Result<Vec<u8>, GuestError> {
        self.store.set_fuel(BULK_FUEL).map_err(|e| trap(&e))?;
        let d = self.fsm.wasm_raft_fsm_state_machine().call_digest(&mut self.store).map_err(|e| trap(&e))?;
        if d.len() > 64 {
            return Err(GuestError::Trap(format!("contract violation: digest of {} bytes (at most 64)", d.len())));
        }
        Ok(d)
    }

    /// Stream the guest's snapshot into `out`; returns the number of bytes written.
    pub fn snapshot_to(&mut self, out: &mut impl Write, chunk: u32) -> Result<u64, GuestError> {
        self.store.set_fuel(BULK_FUEL).map_err(|e| trap(&e))?;
        let snap = self.fsm.wasm_raft_fsm_state_machine().snapshot();
        let res = snap.call_constructor(&mut self.store).map_err(|e| trap(&e))?;
        let mut total = 0u64;
        let outcome = loop {
            match snap.call_read(&mut self.store, res, chunk) {
                Err(e) => break Err(trap(&e)),
                Ok(Err(msg)) => break Err(GuestError::Guest(msg)),
                Ok(Ok(bytes)) if bytes.is_empty() => break Ok(total),
                Ok(Ok(bytes)) => {
                    if let Err(e) = out.write_all(&bytes) {
                        break Err(e.into());
                    }
                    total += bytes.len() as u64;
                }
            }
        };
        // Dropping a resource of a trapped instance fails too; the trap is what matters.
        let _ = res.resource_drop(&mut self.store);
        outcome
    }

    /// Replace the guest's state with a stream produced by `snapshot_to`.
    pub fn restore_from(&mut self, input: &mut impl Read, chunk: usize) -> Result<(), GuestError> {
        self.store.set_fuel(BULK_FUEL).map_err(|e| trap(&e))?;
        let rest = self.fsm.wasm_raft_fsm_state_machine().restore();
        let res = rest.call_constructor(&mut self.store).map_err(|e| trap(&e))?;
        let mut buf = vec![0u8; chunk];
        let outcome = loop {
            let n = match input.read(&mut buf) {
                Ok(0) => break rest.call_finish(&mut self.store, res),
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    let _ = res.resource_drop(&mut self.store);
                    return Err(e.into());
                }
            };
            match rest.call_write(&mut self.store, res, &buf[..n]) {
                Ok(Ok(())) => {}
                other => break other,
            }
        };
        let _ = res.resource_drop(&mut self.store);
        outcome.map_err(|e| trap(&e))?.map_err(GuestError::Guest)
    }
}
