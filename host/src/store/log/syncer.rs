//! The `log-sync` thread: syncs a leader's own entries while openraft replicates them
//! (see `durable`), one `fdatasync` for everything written since its last one.

use std::fs::File;
use std::sync::Arc;

use crate::store::durable::Durable;
use crate::types::LogId;

/// Sync the log through `upto`, which `file` holds (earlier segments were synced
/// before `file` was started).
pub(super) struct SyncJob {
    pub(super) file: Option<Arc<File>>,
    pub(super) upto: LogId,
    pub(super) generation: u64,
}

/// One `fdatasync` for all the jobs that queued up while the last one ran.
pub(super) fn run_syncer(rx: &std::sync::mpsc::Receiver<SyncJob>, durable: &Durable) {
    while let Ok(mut job) = rx.recv() {
        while let Ok(later) = rx.try_recv() {
            job = later;
        }
        match job.file.as_deref().map_or(Ok(()), File::sync_data) {
            Ok(()) => durable.advance(job.upto, job.generation),
            Err(e) => {
                tracing::error!(error = %e, "log fsync failed; this member stops applying");
                durable.fail();
                return;
            }
        }
    }
}
