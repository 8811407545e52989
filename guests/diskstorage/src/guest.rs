//! The component glue: the `fsm` world's exports over one global [`Store`] on a WASI file.

use std::cell::RefCell;

use wasip2::filesystem::types::Descriptor;

use crate::disk::Disk;
use crate::settings::Settings;
use crate::snapshot::{Restorer, SnapshotReader};
use crate::store::{Digest, EnvironmentFailure, Store};
use crate::wasi_disk::{data_dir, WasiDisk, DIR, FILE, RESTORE_FILE};

wit_bindgen::generate!({ world: "fsm", path: "../../wit" });

use exports::wasm_raft::fsm::state_machine::{Entry, Guest, GuestRestore, GuestSnapshot};
use wasm_raft::fsm::host::{environment_failure, log, Level};

struct State {
    /// The `/data` preopen, kept for staging and swapping in a restored file.
    dir: Descriptor,
    store: Store<WasiDisk>,
}

thread_local! {
    // Global rather than owned by a resource: snapshots and restores are separate
    // resources that must all see (or replace) the same state.
    static STATE: RefCell<Option<State>> = const { RefCell::new(None) };
}

fn not_initialised() -> String {
    "diskstorage is not initialised: init failed or was not called".to_string()
}

fn with_state<T>(f: impl FnOnce(&State) -> Result<T, String>) -> Result<T, String> {
    STATE.with_borrow(|state| f(state.as_ref().ok_or_else(not_initialised)?))
}

fn with_state_mut<T>(f: impl FnOnce(&mut State) -> Result<T, String>) -> Result<T, String> {
    STATE.with_borrow_mut(|state| f(state.as_mut().ok_or_else(not_initialised)?))
}

struct DiskStorage;

impl Guest for DiskStorage {
    type Snapshot = Snapshot;
    type Restore = Restore;

    fn init(config: Vec<(String, String)>) -> Result<(), String> {
        let settings = Settings::parse(&config)?;
        let dir = data_dir()?;
        // A restore that never finished leaves its staging file behind; it holds nothing
        // this instance needs. Its absence is the usual case, so the error is moot.
        let _ = dir.unlink_file_at(RESTORE_FILE);
        let store = Store::create(settings, WasiDisk::open(&dir, FILE, true)?)
            .map_err(|e| format!("cannot create {DIR}/{FILE}: {e}"))?;
        log(
            Level::Info,
            &format!(
                "diskstorage: {DIR}/{FILE} of {} bytes, value-size {} ({} values), sync {}",
                settings.file_size,
                settings.value_size,
                settings.slots(),
                settings.sync
            ),
        );
        STATE.with_borrow_mut(|state| *state = Some(State { dir, store }));
        Ok(())
    }

    fn apply(entries: Vec<Entry>) -> Vec<Result<Vec<u8>, String>> {
        entries
            .iter()
            .map(|e| {
                with_state_mut(|state| match state.store.apply(&e.command) {
                    Ok(result) => result,
                    Err(EnvironmentFailure(why)) => stop_member(&why),
                })
            })
            .collect()
    }

    fn query(request: Vec<u8>) -> Result<Vec<u8>, String> {
        with_state(|state| state.store.query(&request))
    }

    fn digest() -> Vec<u8> {
        let digest = STATE.with_borrow(|state| state.as_ref().map_or_else(Digest::default, |s| s.store.digest()));
        digest.to_bytes().to_vec()
    }
}

/// `Err` if there was no state to snapshot when it was created.
struct Snapshot(RefCell<Result<SnapshotReader, String>>);

impl GuestSnapshot for Snapshot {
    fn new() -> Self {
        Snapshot(RefCell::new(with_state(|state| Ok(SnapshotReader::new(&state.store)))))
    }

    fn read(&self, max_bytes: u32) -> Result<Vec<u8>, String> {
        let mut reader = self.0.borrow_mut();
        let reader = reader.as_mut().map_err(|e| e.clone())?;
        with_state(|state| reader.read(&state.store, max_bytes as usize))
    }
}

enum RestoreState {
    Open(Box<Restorer<WasiDisk>>),
    /// The staging file could not be created; every call reports why.
    Failed(String),
    Finished,
}

struct Restore(RefCell<RestoreState>);

impl GuestRestore for Restore {
    fn new() -> Self {
        let restorer = with_state(|state| {
            let settings = *state.store.settings();
            let mut staging = WasiDisk::open(&state.dir, RESTORE_FILE, true)?;
            staging.set_len(settings.file_size).map_err(|e| format!("cannot size {DIR}/{RESTORE_FILE}: {e}"))?;
            Restorer::new(settings, staging)
        });
        Restore(RefCell::new(match restorer {
            Ok(restorer) => RestoreState::Open(Box::new(restorer)),
            Err(err) => RestoreState::Failed(err),
        }))
    }

    fn write(&self, chunk: Vec<u8>) -> Result<(), String> {
        match &mut *self.0.borrow_mut() {
            RestoreState::Open(restorer) => restorer.write(&chunk),
            RestoreState::Failed(err) => Err(err.clone()),
            RestoreState::Finished => Err(finished()),
        }
    }

    fn finish(&self) -> Result<(), String> {
        let restorer = match std::mem::replace(&mut *self.0.borrow_mut(), RestoreState::Finished) {
            RestoreState::Open(restorer) => restorer,
            RestoreState::Failed(err) => return Err(err),
            RestoreState::Finished => return Err(finished()),
        };
        let (staged, dirty) = restorer.finish()?;
        with_state_mut(|state| {
            let dir = &state.dir;
            state.store.replace_disk(staged, dirty, |staged| {
                // Renaming swaps the whole file at once: the old one stays complete until
                // the new one replaces it.
                drop(staged);
                dir.rename_at(RESTORE_FILE, dir, FILE)
                    .map_err(|e| format!("cannot move {RESTORE_FILE} over {FILE}: wasi error {}", e.name()))?;
                WasiDisk::open(dir, FILE, false)
            })
        })
    }
}

impl Drop for Restore {
    /// An abandoned or failed restore would otherwise leave a file as large as the store
    /// (sparse, but still) until the next init; after a successful one there is nothing
    /// left to remove.
    fn drop(&mut self) {
        let _ = with_state(|state| state.dir.unlink_file_at(RESTORE_FILE).map_err(|e| e.name().to_string()));
    }
}

/// This member's file failed: the host stops the member rather than replicate a result
/// that the other members, whose files work, would not have.
fn stop_member(why: &str) -> ! {
    environment_failure(&format!("diskstorage: {why}"));
    unreachable!("the host never returns from environment-failure");
}

fn finished() -> String {
    "this restore has already finished".to_string()
}

// The generated export shims are the only unsafe code in this crate.
#[allow(unsafe_code)]
mod export_shims {
    use super::*;
    export!(DiskStorage with_types_in super);
}
