//! How far this member's log is on disk, for a leader that replicates its entries while
//! its own `fdatasync` runs.
//!
//! openraft 0.9 sends a leader's new entries to the followers only once the leader's log
//! store reports them flushed, so every write waited for two fsyncs in a row: the
//! leader's, then a follower's. Raft allows the leader to write its log in parallel with
//! replication, provided that nothing acts on an entry's commitment before a majority
//! *including the leader's own disk, if it is counted* holds the entry (Raft thesis
//! §10.2.1). The log store therefore reports a leader's own entries flushed as soon as
//! they are written, hands the fsync to a thread, and records here how far it has got.
//! openraft may then count the leader towards a commit early, so every effect of a commit
//! waits for this record:
//!
//! - the state machine applies an entry reported flushed this way only once it is
//!   durable ([`Durable::wait_for`]), so no client hears of it and no read sees it before;
//! - an AppendEntries tells followers a commit index no higher than this
//!   ([`Durable::clamp`]), so no follower applies it before.
//!
//! If the leader crashes before its fsync, an entry it counted may be on one follower's
//! disk only; nobody has applied or acknowledged it, so losing it breaks no promise.
//! Followers still report entries flushed only after their fsync, and so does a leader for
//! membership entries, whose commitment openraft acts on internally.

use std::sync::Arc;

use tokio::sync::watch;

use crate::types::LogId;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct State {
    /// The last entry known to be on disk.
    upto: Option<LogId>,
    /// The last entry reported flushed before its sync. Entries after `upto` up to this
    /// one are the ones to wait for; any other entry was synced before it was reported.
    ahead: Option<u64>,
    /// Bumped whenever the log is cut back, so that a sync that started before the cut
    /// cannot report entries that are gone.
    generation: u64,
    /// A sync failed: what was reported flushed may not be on disk, so nothing more is
    /// applied.
    failed: bool,
}

/// Shared between the log store (which advances it), the state machine and the network.
#[derive(Clone)]
pub struct Durable(Arc<watch::Sender<State>>);

impl Durable {
    pub fn new(upto: Option<LogId>) -> Self {
        Durable(Arc::new(watch::Sender::new(State { upto, ..State::default() })))
    }

    /// The last entry known to be on disk.
    pub fn upto(&self) -> Option<LogId> {
        self.0.borrow().upto
    }

    pub(crate) fn generation(&self) -> u64 {
        self.0.borrow().generation
    }

    /// Entries up to `index` are about to be reported flushed before their sync.
    pub(crate) fn ahead(&self, index: u64) {
        self.0.send_if_modified(|s| {
            let further = s.ahead.is_none_or(|a| index > a);
            if further {
                s.ahead = Some(index);
            }
            further
        });
    }

    /// Everything up to `upto` is on disk, as of a sync started in `generation`.
    pub(crate) fn advance(&self, upto: LogId, generation: u64) {
        self.0.send_if_modified(|s| {
            let further = s.upto.is_none_or(|u| upto.index > u.index);
            if s.generation == generation && further {
                s.upto = Some(upto);
                true
            } else {
                false
            }
        });
    }

    /// The log was cut back (and synced) to end at `upto`.
    pub(crate) fn cut(&self, upto: Option<LogId>) {
        self.0.send_modify(|s| {
            s.generation += 1;
            s.upto = upto;
            s.ahead = None;
        });
    }

    #[cfg(test)]
    pub(crate) fn written_ahead(&self) -> Option<u64> {
        self.0.borrow().ahead
    }

    pub(crate) fn fail(&self) {
        self.0.send_modify(|s| s.failed = true);
    }

    /// Wait until the entry at `index` is on disk, if it was reported flushed before its
    /// sync. Errs once a sync has failed.
    pub async fn wait_for(&self, index: u64) -> Result<(), String> {
        let now = *self.0.borrow();
        if !now.failed && !now.pending(index) {
            return Ok(());
        }
        let done = |s: &State| s.failed || !s.pending(index);
        let mut rx = self.0.subscribe();
        let s = *rx.wait_for(done).await.map_err(|_| "the log is closed".to_string())?;
        if s.failed {
            return Err("a log fsync failed; what this member wrote since may not be on disk".into());
        }
        Ok(())
    }

    /// The commit index a leader may tell its followers: `committed`, or the last durable
    /// entry if that is lower (both are entries of this leader's log).
    pub fn clamp(&self, committed: Option<LogId>) -> Option<LogId> {
        let s = self.0.borrow();
        match committed {
            // Nothing reported flushed since the failure can be trusted; followers keep
            // the higher commit index they already have.
            _ if s.failed => None,
            Some(c) if s.pending(c.index) => s.upto,
            c => c,
        }
    }
}

impl State {
    /// Whether the entry at `index` was reported flushed ahead of its sync and is not on
    /// disk yet.
    fn pending(&self, index: u64) -> bool {
        self.ahead.is_some_and(|a| index <= a) && self.upto.is_none_or(|u| index > u.index)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::CommittedLeaderId;
    use std::time::Duration;

    fn id(term: u64, index: u64) -> LogId {
        LogId::new(CommittedLeaderId::new(term, 1), index)
    }

    #[test]
    fn advances_only_forward_and_only_within_its_generation() {
        let d = Durable::new(Some(id(1, 5)));
        d.advance(id(1, 4), 0);
        assert_eq!(d.upto(), Some(id(1, 5)));
        d.advance(id(1, 9), 0);
        assert_eq!(d.upto(), Some(id(1, 9)));
        let g = d.generation();
        d.cut(Some(id(1, 6)));
        // A sync that started before the cut covered entries 7..=9, which are gone.
        d.advance(id(1, 9), g);
        assert_eq!(d.upto(), Some(id(1, 6)));
        d.advance(id(2, 8), d.generation());
        assert_eq!(d.upto(), Some(id(2, 8)));
    }

    #[test]
    fn clamps_the_commit_index_to_what_is_on_disk() {
        let d = Durable::new(Some(id(1, 5)));
        // Nothing written ahead: every entry was synced before it was reported.
        assert_eq!(d.clamp(Some(id(1, 7))), Some(id(1, 7)));
        d.ahead(7);
        assert_eq!(d.clamp(Some(id(1, 7))), Some(id(1, 5)));
        assert_eq!(d.clamp(Some(id(1, 6))), Some(id(1, 5)));
        assert_eq!(d.clamp(Some(id(1, 3))), Some(id(1, 3)));
        assert_eq!(d.clamp(Some(id(1, 8))), Some(id(1, 8)));
        assert_eq!(d.clamp(None), None);
        let fresh = Durable::new(None);
        fresh.ahead(0);
        assert_eq!(fresh.clamp(Some(id(1, 0))), None);
        d.advance(id(1, 7), d.generation());
        assert_eq!(d.clamp(Some(id(1, 7))), Some(id(1, 7)));
        d.fail();
        assert_eq!(d.clamp(Some(id(1, 3))), None);
    }

    #[tokio::test]
    async fn waiting_ends_when_the_entry_is_durable_or_a_sync_failed() {
        let d = Durable::new(Some(id(1, 5)));
        d.wait_for(5).await.expect("already durable");
        // Entries that were never written ahead were synced before anyone saw them.
        d.wait_for(100).await.expect("not written ahead");
        d.ahead(9);
        let waiter = tokio::spawn({
            let d = d.clone();
            async move { d.wait_for(8).await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished(), "entry 8 is not durable yet");
        d.advance(id(1, 8), d.generation());
        waiter.await.expect("join").expect("durable");

        let waiter = tokio::spawn({
            let d = d.clone();
            async move { d.wait_for(9).await }
        });
        d.fail();
        assert!(waiter.await.expect("join").is_err());
    }
}
