//! The read barrier: linearizable reads that cannot use the lease confirm leadership with
//! a quorum, one round for every read waiting.

use std::time::Duration;

use openraft::error::{CheckIsLeaderError, RaftError};
use tokio::sync::{mpsc, oneshot};

use super::outcome::Outcome;
use crate::types::Raft;

/// Where a read waiting for the barrier hears whether it may proceed.
pub(crate) type ReadWaiter = oneshot::Sender<Result<(), Outcome>>;

/// Linearizable reads without a quorum round each: every read waiting when a round starts
/// is answered by that round. Safe because the round starts after each of those reads
/// arrived, so its read index covers every write acknowledged before any of them.
pub(crate) async fn barrier(raft: Raft, mut rx: mpsc::Receiver<ReadWaiter>, timeout: Duration) {
    while let Some(first) = rx.recv().await {
        let mut waiters = vec![first];
        while let Ok(w) = rx.try_recv() {
            waiters.push(w);
        }
        let res = match tokio::time::timeout(timeout, raft.ensure_linearizable()).await {
            Err(_) => Err(Outcome::Rejected("could not confirm leadership in time".into())),
            Ok(Ok(_)) => Ok(()),
            Ok(Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f)))) => {
                Err(Outcome::NotLeader(f.leader_id.and_then(|id| super::leader_addr(&raft, id))))
            }
            Ok(Err(e)) => Err(Outcome::Rejected(format!("could not confirm leadership: {e}"))),
        };
        for w in waiters {
            let _ = w.send(res.clone());
        }
    }
}
