//! openraft's storage conformance suite against our durable log and guest-backed state
//! machine (with the kvstore guest).

mod common;

use common::guest;

use std::sync::Arc;

use host::fsm::{GuestModule, Limits};
use host::metrics::Metrics;
use host::store::{GuestSpec, LogStore, StateMachine};
use host::types::{StorageError, TypeConfig};
use openraft::testing::{StoreBuilder, Suite};
use openraft::{ErrorSubject, ErrorVerb, StorageIOError};

struct Builder {
    module: Arc<GuestModule>,
}

fn io(e: impl ToString) -> StorageError {
    StorageIOError::new(ErrorSubject::Store, ErrorVerb::Write, openraft::AnyError::error(e.to_string())).into()
}

impl StoreBuilder<TypeConfig, LogStore, StateMachine, tempfile::TempDir> for Builder {
    async fn build(&self) -> Result<(tempfile::TempDir, LogStore, StateMachine), StorageError> {
        let dir = tempfile::tempdir().map_err(io)?;
        // As a member runs it: its own entries as leader are written ahead of their sync.
        let log = LogStore::open(&dir.path().join("log"), true).and_then(|l| l.leader_writes_ahead(0)).map_err(io)?;
        let sm = StateMachine::open(
            &dir.path().join("snapshots"),
            GuestSpec { module: self.module.clone(), config: Vec::new(), guest_dir: dir.path().join("guest"), node: 0 },
            &log,
            Arc::new(Metrics::default()),
        )
        .map_err(io)?;
        Ok((dir, log, sm))
    }
}

#[test]
fn t10_openraft_storage_suite() {
    let module = Arc::new(GuestModule::load(&guest("kvstore"), Limits::default()).expect("load kvstore"));
    Suite::test_all(Builder { module }).expect("storage suite");
}
