//! One guest instance: a wasmtime `Store` and the typed exports. Not `Send`-shared: it
//! lives on the state-machine worker thread (sync WASI calls must not run on a tokio
//! runtime thread).

use std::io::{Read, Write};
use std::path::Path;

use wasmtime::Store;

use super::bindings::exports::wasm_raft::fsm::state_machine as sm;
use super::bindings::Fsm;
use super::{wasi_ctx, EnvironmentFailure, GuestModule, HostState, Limiter};

/// Fuel for the calls that are not commands, in multiples of the per-command budget: each
/// bounded, so that a guest looping in one of them fails with a clear error instead of
/// hanging the member's state-machine thread. `init` may preload a large state; each
/// snapshot `read` and restore `write` handles one chunk (1 MiB); `finish` may index the
/// whole state; `digest` must be O(1) (it runs on every `/status`).
const INIT_FUEL: u64 = 1000;
const CHUNK_FUEL: u64 = 10;
const FINISH_FUEL: u64 = 100;
const DIGEST_FUEL: u64 = 1;

/// The outcome of applying one entry.
#[derive(Debug)]
pub enum ApplyOutcome {
    /// The guest's own result (ok or err), replicated as is.
    Result(Result<Vec<u8>, String>),
    /// The guest trapped for a reason every member shares (a panic, `unreachable`, a bad
    /// memory access): the instance is unusable and must be rebuilt; the entry's result
    /// is an error on every member.
    Trap(String),
    /// Something of this member's own failed: the guest reported its environment failing,
    /// ran out of fuel, overflowed its stack, or was refused memory (whether it then
    /// trapped or returned a result). Fuel, stack and memory depend on this instance's
    /// history and the compiled code, not only on the state and the command, so no result
    /// may be replicated: this member must stop. The instance is unusable.
    MemberFailure(String),
}

/// A command's result as the guest gives it: ok bytes or its error text.
pub type CommandResult = Result<Vec<u8>, String>;

pub struct Instance {
    store: Store<HostState>,
    fsm: Fsm,
    fuel_per_entry: u64,
    fuel_per_query: u64,
}

/// A failure of a whole-instance operation (init, snapshot, restore, query): the text of
/// the guest's error or trap.
#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    #[error("guest returned an error: {0}")]
    Guest(String),
    #[error("guest trapped: {0}")]
    Trap(String),
    /// The guest called `environment-failure`: this member must stop.
    #[error("{0}")]
    MemberFailure(String),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

impl GuestError {
    /// Whether the instance trapped and can no longer be used.
    pub fn is_trap(&self) -> bool {
        matches!(self, GuestError::Trap(_) | GuestError::MemberFailure(_))
    }

    pub fn is_member_failure(&self) -> bool {
        matches!(self, GuestError::MemberFailure(_))
    }
}

/// Outside `apply` only the guest's own report is a member failure: running out of fuel
/// or memory there fails the call, and nothing of it is replicated.
fn trap(e: &wasmtime::Error) -> GuestError {
    match e.downcast_ref::<EnvironmentFailure>() {
        Some(failure) => GuestError::MemberFailure(failure.to_string()),
        None => GuestError::Trap(describe_trap(e)),
    }
}

fn refuel(store: &mut Store<HostState>, per_entry: u64, times: u64) -> Result<(), GuestError> {
    store.set_fuel(per_entry.saturating_mul(times)).map_err(|e| trap(&e))
}

/// A trap in one of the calls that are not commands, naming the call.
fn in_call(call: &str, e: &wasmtime::Error) -> GuestError {
    match trap(e) {
        GuestError::Trap(why) => GuestError::Trap(format!("in `{call}`: {why}")),
        other => other,
    }
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
        let mut store = Store::new(
            module.engine(),
            HostState {
                wasi,
                table: wasmtime::component::ResourceTable::new(),
                limiter: Limiter::new(module.limits.memory_bytes),
                paths: Default::default(),
                node,
            },
        );
        store.limiter(|s| &mut s.limiter);
        let fuel = module.limits.fuel_per_entry;
        store.set_fuel(fuel.saturating_mul(INIT_FUEL)).map_err(|e| trap(&e))?;
        let fsm = module.pre.instantiate(&mut store).map_err(|e| trap(&e))?;
        let mut inst = Instance { store, fsm, fuel_per_entry: fuel, fuel_per_query: module.limits.fuel_per_query };
        inst.fsm
            .wasm_raft_fsm_state_machine()
            .call_init(&mut inst.store, config)
            .map_err(|e| in_call("init", &e))?
            .map_err(GuestError::Guest)?;
        Ok(inst)
    }

    /// Apply one entry under its own fuel budget.
    pub fn apply(&mut self, index: u64, term: u64, command: &[u8]) -> ApplyOutcome {
        if let Err(e) = self.store.set_fuel(self.fuel_per_entry) {
            return ApplyOutcome::Trap(describe_trap(&e));
        }
        self.store.data_mut().limiter.refused = None;
        let entry = sm::Entry { index, term, command: command.to_vec() };
        let called = self.fsm.wasm_raft_fsm_state_machine().call_apply(&mut self.store, &[entry]);
        // Checked first: whatever the guest made of a refusal (a trap, an error result,
        // a smaller buffer), it may not have done the same on another member.
        if let Some(refused) = self.store.data_mut().limiter.refused.take() {
            let then = match &called {
                Ok(_) => "returned a result".to_string(),
                Err(e) => format!("trapped: {}", describe_trap(e)),
            };
            return ApplyOutcome::MemberFailure(format!("the guest ran out of memory: {refused}; it then {then}"));
        }
        match called {
            Ok(mut results) if results.len() == 1 => ApplyOutcome::Result(results.remove(0)),
            Ok(results) => {
                ApplyOutcome::Trap(format!("contract violation: apply returned {} results for 1 entry", results.len()))
            }
            Err(e) => match (e.downcast_ref::<EnvironmentFailure>(), e.downcast_ref::<wasmtime::Trap>()) {
                (Some(failure), _) => ApplyOutcome::MemberFailure(failure.to_string()),
                (_, Some(wasmtime::Trap::OutOfFuel)) => ApplyOutcome::MemberFailure(format!(
                    "the guest ran out of fuel ({} per command, --fuel-per-entry)",
                    self.fuel_per_entry
                )),
                (_, Some(wasmtime::Trap::StackOverflow)) => ApplyOutcome::MemberFailure(
                    "the guest overflowed its stack (how deep it may go depends on the compiled code)".to_string(),
                ),
                _ => ApplyOutcome::Trap(describe_trap(&e)),
            },
        }
    }

    /// Applies `commands` as entries `first..` in one `apply` call, as a host batching
    /// entries would, with the per-command budget for each; returns the guest's results
    /// (however many it gave: the caller checks the count) and the fuel the call used.
    /// For `host check`: members apply one entry per call (see [`Instance::apply`]).
    pub fn apply_batch(
        &mut self,
        first: u64,
        term: u64,
        commands: &[Vec<u8>],
    ) -> Result<(Vec<CommandResult>, u64), GuestError> {
        let budget = self.fuel_per_entry.saturating_mul(commands.len().max(1) as u64);
        self.store.set_fuel(budget).map_err(|e| trap(&e))?;
        self.store.data_mut().limiter.refused = None;
        let entries: Vec<sm::Entry> = (first..)
            .zip(commands)
            .map(|(index, command)| sm::Entry { index, term, command: command.clone() })
            .collect();
        let called = self.fsm.wasm_raft_fsm_state_machine().call_apply(&mut self.store, &entries);
        if let Some(refused) = self.store.data_mut().limiter.refused.take() {
            return Err(GuestError::MemberFailure(format!("the guest ran out of memory: {refused}")));
        }
        let results = called.map_err(|e| in_call("apply", &e))?;
        let left = self.store.get_fuel().map_err(|e| trap(&e))?;
        Ok((results, budget - left))
    }

    /// Fuel the last call left unused (for `host check`'s cost measurements).
    pub fn fuel_left(&self) -> u64 {
        self.store.get_fuel().unwrap_or(0)
    }

    /// A read-only query, under the per-query fuel budget: any client can send one, so it
    /// must not be able to stall the member with an expensive read.
    pub fn query(&mut self, request: &[u8]) -> Result<Result<Vec<u8>, String>, GuestError> {
        self.store.set_fuel(self.fuel_per_query).map_err(|e| trap(&e))?;
        self.fsm.wasm_raft_fsm_state_machine().call_query(&mut self.store, request).map_err(|e| {
            match e.downcast_ref::<wasmtime::Trap>() {
                Some(wasmtime::Trap::OutOfFuel) => {
                    GuestError::Trap(format!("ran out of fuel ({} per query, --fuel-per-query)", self.fuel_per_query))
                }
                _ => trap(&e),
            }
        })
    }

    pub fn digest(&mut self) -> Result<Vec<u8>, GuestError> {
        self.refuel(DIGEST_FUEL)?;
        let d =
            self.fsm.wasm_raft_fsm_state_machine().call_digest(&mut self.store).map_err(|e| in_call("digest", &e))?;
        if d.len() > 64 {
            return Err(GuestError::Trap(format!("contract violation: digest of {} bytes (at most 64)", d.len())));
        }
        Ok(d)
    }

    /// Stream the guest's snapshot into `out`; returns the number of bytes written.
    pub fn snapshot_to(&mut self, out: &mut impl Write, chunk: u32) -> Result<u64, GuestError> {
        self.refuel(CHUNK_FUEL)?;
        let snap = self.fsm.wasm_raft_fsm_state_machine().snapshot();
        let res = snap.call_constructor(&mut self.store).map_err(|e| in_call("snapshot", &e))?;
        let mut total = 0u64;
        let outcome = loop {
            if let Err(e) = refuel(&mut self.store, self.fuel_per_entry, CHUNK_FUEL) {
                break Err(e);
            }
            match snap.call_read(&mut self.store, res, chunk) {
                Err(e) => break Err(in_call("snapshot.read", &e)),
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
        self.refuel(CHUNK_FUEL)?;
        let rest = self.fsm.wasm_raft_fsm_state_machine().restore();
        let res = rest.call_constructor(&mut self.store).map_err(|e| in_call("restore", &e))?;
        let mut buf = vec![0u8; chunk];
        let outcome = loop {
            let n = match input.read(&mut buf) {
                Ok(0) => {
                    refuel(&mut self.store, self.fuel_per_entry, FINISH_FUEL)?;
                    break rest.call_finish(&mut self.store, res).map_err(|e| ("restore.finish", e));
                }
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    let _ = res.resource_drop(&mut self.store);
                    return Err(e.into());
                }
            };
            refuel(&mut self.store, self.fuel_per_entry, CHUNK_FUEL)?;
            match rest.call_write(&mut self.store, res, &buf[..n]) {
                Ok(Ok(())) => {}
                other => break other.map_err(|e| ("restore.write", e)),
            }
        };
        let _ = res.resource_drop(&mut self.store);
        outcome.map_err(|(call, e)| in_call(call, &e))?.map_err(GuestError::Guest)
    }

    /// Sets the fuel for the next call to `times` the per-command budget.
    fn refuel(&mut self, times: u64) -> Result<(), GuestError> {
        refuel(&mut self.store, self.fuel_per_entry, times)
    }
}
