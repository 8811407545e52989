//! The component glue: the `fsm` world's exports over one global [`Store`].

use std::cell::RefCell;

use crate::settings::Settings;
use crate::snapshot::{Restorer, SnapshotReader};
use crate::store::Store;

wit_bindgen::generate!({ world: "fsm", path: "../../wit" });

use exports::wasm_raft::fsm::state_machine::{Entry, Guest, GuestRestore, GuestSnapshot};
use wasm_raft::fsm::host::{log, Level};

thread_local! {
    // Global rather than owned by a resource: snapshots and restores are separate
    // resources that must all see (or replace) the same state.
    static STORE: RefCell<Store> = RefCell::new(Store::default());
}

struct KvStore;

impl Guest for KvStore {
    type Snapshot = Snapshot;
    type Restore = Restore;

    fn init(config: Vec<(String, String)>) -> Result<(), String> {
        let settings = Settings::parse(&config)?;
        let store = Store::new(&settings);
        log(
            Level::Info,
            &format!(
                "kvstore: preloaded {} keys of {} bytes, max-value-size {}",
                settings.preload_keys, settings.preload_value_size, settings.max_value_size
            ),
        );
        STORE.with_borrow_mut(|s| *s = store);
        Ok(())
    }

    fn apply(entries: Vec<Entry>) -> Vec<Result<Vec<u8>, String>> {
        STORE.with_borrow_mut(|s| entries.iter().map(|e| s.apply(&e.command)).collect())
    }

    fn query(request: Vec<u8>) -> Result<Vec<u8>, String> {
        STORE.with_borrow(|s| s.query(&request))
    }

    fn digest() -> Vec<u8> {
        STORE.with_borrow(|s| s.digest().to_vec())
    }
}

struct Snapshot(RefCell<SnapshotReader>);

impl GuestSnapshot for Snapshot {
    fn new() -> Self {
        STORE.with_borrow(|s| Snapshot(RefCell::new(SnapshotReader::new(s))))
    }

    fn read(&self, max_bytes: u32) -> Result<Vec<u8>, String> {
        STORE.with_borrow(|s| self.0.borrow_mut().read(s, max_bytes as usize))
    }
}

/// `None` once `finish` has consumed the parsed table.
struct Restore(RefCell<Option<Restorer>>);

impl GuestRestore for Restore {
    fn new() -> Self {
        Restore(RefCell::new(Some(Restorer::default())))
    }

    fn write(&self, chunk: Vec<u8>) -> Result<(), String> {
        match self.0.borrow_mut().as_mut() {
            Some(restorer) => restorer.write(&chunk),
            None => Err(finished()),
        }
    }

    fn finish(&self) -> Result<(), String> {
        let restorer = self.0.borrow_mut().take().ok_or_else(finished)?;
        let table = restorer.finish()?;
        STORE.with_borrow_mut(|s| s.replace_table(table));
        Ok(())
    }
}

fn finished() -> String {
    "this restore has already finished".to_string()
}

// The generated export shims are the only unsafe code in this crate.
#[allow(unsafe_code)]
mod export_shims {
    use super::*;
    export!(KvStore with_types_in super);
}
