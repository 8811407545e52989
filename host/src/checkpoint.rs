//! Divergence detection: the leader commits a checkpoint of its state (the guest's digest
//! after an entry at a known index) every few seconds while entries are being applied, and
//! every member compares it with its own digest after the same entry when it applies the
//! checkpoint (see `store::sm`). Members that differ stop with the reason, whatever made
//! them differ: a guest that is not deterministic, something member-specific a guest
//! read, a bug in the host.

use std::time::Duration;

use crate::store::StateMachine;
use crate::types::{NodeId, Raft, Request};

/// How often the leader looks for a new recorded digest to commit.
pub const EVERY: Duration = Duration::from_secs(2);

/// Runs for the member's life; only does anything while this member leads.
pub async fn run(me: NodeId, raft: Raft, sm: StateMachine, every: Duration) {
    let mut last: Option<u64> = None;
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let leads = {
            let m = raft.metrics();
            let m = m.borrow();
            m.state == openraft::ServerState::Leader && m.vote.is_committed() && m.vote.leader_id().node_id == me
        };
        if !leads {
            continue;
        }
        let Some(checkpoint) = sm.latest_checkpoint().await else {
            continue;
        };
        if last.is_some_and(|l| l >= checkpoint.index) {
            continue;
        }
        let index = checkpoint.index;
        match raft.client_write(Request { commands: Vec::new(), checkpoint: Some(checkpoint) }).await {
            Ok(_) => last = Some(index),
            Err(e) => tracing::debug!(error = %e, "checkpoint not committed"),
        }
    }
}
