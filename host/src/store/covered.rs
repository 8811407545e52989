//! How far the snapshot on disk covers the log, so that the log is never purged past it.
//!
//! openraft 0.9 installs a received snapshot on its state-machine task and, without
//! waiting for it, purges the log up to the snapshot's last entry on its core task. If
//! the purge reached the disk first and the member then crashed, `purged` would name the
//! new snapshot while `current.snap` was still the old one: the entries in between would
//! be in neither, so the member could neither replay nor start. The log store therefore
//! waits here, in `purge`, until a snapshot at least as far as the purge is renamed into
//! place and its directory synced, and fails the purge (which stops Raft) if the install
//! failed.
//!
//! The wait stalls openraft's core task for the rest of the install, which openraft would
//! otherwise spend answering the leader that sent the snapshot: nothing it could append
//! meanwhile may reach the disk before the snapshot does anyway.

use std::sync::Arc;

use tokio::sync::watch;

#[derive(Debug, Clone, Default)]
struct State {
    /// The last log index the durable snapshot includes.
    upto: Option<u64>,
    /// Why installing a snapshot failed: a purge waiting for it would wait forever.
    failed: Option<String>,
}

/// Shared by the state machine (which advances it) and the log store (which waits on it).
#[derive(Clone, Default)]
pub struct SnapshotCover(Arc<watch::Sender<State>>);

impl SnapshotCover {
    /// A snapshot including the log up to `index` is on disk.
    pub fn advance(&self, index: Option<u64>) {
        self.0.send_if_modified(|s| {
            let further = index > s.upto;
            if further {
                s.upto = index;
            }
            further
        });
    }

    /// Installing a snapshot failed: purges that wait for it fail with `why`.
    pub fn fail(&self, why: String) {
        self.0.send_modify(|s| s.failed = Some(why));
    }

    /// Wait until a durable snapshot includes the entry at `index`.
    pub async fn wait_covers(&self, index: u64) -> Result<(), String> {
        let covered = |s: &State| s.upto.is_some_and(|u| u >= index);
        let mut rx = self.0.subscribe();
        let s = rx
            .wait_for(|s| covered(s) || s.failed.is_some())
            .await
            .map_err(|_| "the state machine is gone".to_string())?;
        if covered(&s) {
            return Ok(());
        }
        Err(format!(
            "not purging the log up to {index}: the snapshot covering it was not installed ({})",
            s.failed.clone().unwrap_or_default()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn waits_for_a_snapshot_that_covers_the_index_or_for_a_failure() {
        let cover = SnapshotCover::default();
        let waiter = tokio::spawn({
            let cover = cover.clone();
            async move { cover.wait_covers(10).await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        cover.advance(Some(9));
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished(), "a snapshot up to 9 does not cover 10");
        cover.advance(Some(12));
        waiter.await.expect("join").expect("covered");
        cover.advance(Some(3));
        cover.wait_covers(12).await.expect("never goes back");

        let waiter = tokio::spawn({
            let cover = cover.clone();
            async move { cover.wait_covers(20).await }
        });
        cover.fail("guest restore failed".into());
        let err = waiter.await.expect("join").expect_err("the install failed");
        assert!(err.contains("guest restore failed"), "{err}");
    }
}
