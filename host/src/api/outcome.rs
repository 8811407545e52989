//! What becomes of a client request ([`Outcome`]) and where it goes ([`Reply`]): the types
//! the batcher, the reads and both wire protocols share.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit};

use super::binary;
use crate::metrics::Metrics;
use crate::proto::{ClientResponse, Code};

/// What a binary-protocol request holds until its answer is written: its slot in the
/// connection's in-flight limit and its bytes in the member's request budget.
pub struct Held {
    pub _slot: OwnedSemaphorePermit,
    /// None for a request refused before its body was read.
    pub _bytes: Option<OwnedSemaphorePermit>,
    /// The connection's answers not yet written, which its answer joins.
    pub backlog: Arc<binary::Backlog>,
    /// Its answer's bytes counted in `backlog`, uncounted once written.
    pub queued: usize,
}

/// Where a request's outcome goes. Failed outcomes are counted as proposal errors
/// (queries sent here come from the local state: they succeed or fail in the guest).
pub enum Reply {
    /// To a caller awaiting it.
    Wait(oneshot::Sender<Outcome>),
    /// Straight into a binary connection's response queue as the response to request
    /// `id`: a batch's responses then reach the connection's writer together and leave
    /// in one write, and no task per request waits in between. The writer releases
    /// `held` once the answer is written.
    Frame { id: u64, to: mpsc::Sender<binary::Answer>, held: Held },
}

impl Reply {
    /// The answer to a proposal: counted, so that a stopping member knows when it has
    /// answered everything it took.
    pub(crate) fn answer(self, outcome: Outcome, metrics: &Metrics) {
        self.send(outcome, metrics);
        metrics.proposals_answered.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn send(self, outcome: Outcome, metrics: &Metrics) {
        match &outcome {
            Outcome::Ok(_) | Outcome::GuestError(_) => {}
            Outcome::NotLeader(_) => {
                metrics.redirects.fetch_add(1, Ordering::Relaxed);
            }
            _ => {
                metrics.proposal_errors.fetch_add(1, Ordering::Relaxed);
            }
        }
        match self {
            Reply::Wait(tx) => {
                let _ = tx.send(outcome);
            }
            Reply::Frame { id, to, held } => {
                // Cannot be full: it holds at most one answer per in-flight slot, and a
                // slot is freed only once its answer is written. A closed queue means the
                // client has gone.
                let resp = outcome.into_response(id);
                let mut held = held;
                held.queued = held.backlog.add(&resp);
                let _ = to.try_send((resp, Some(held)));
            }
        }
    }
}

/// What became of a request. Tells the caller whether the command may have taken effect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Ok(Vec<u8>),
    /// Committed; the guest's error result.
    GuestError(String),
    /// Definitely not applied.
    Rejected(String),
    /// May have been applied.
    Unknown(String),
    /// Not the leader; its client address when known. Nothing was appended.
    NotLeader(Option<String>),
}

impl Outcome {
    pub fn into_response(self, id: u64) -> ClientResponse {
        let mut r = ClientResponse { id, ..Default::default() };
        match self {
            Outcome::Ok(v) => r.value = v,
            Outcome::GuestError(e) => (r.code, r.error) = (Code::GuestError as i32, e),
            Outcome::Rejected(e) => (r.code, r.error) = (Code::Rejected as i32, e),
            Outcome::Unknown(e) => (r.code, r.error) = (Code::UnknownOutcome as i32, e),
            Outcome::NotLeader(l) => {
                r.code = Code::NotLeader as i32;
                r.error = "not the leader".into();
                r.leader = l.unwrap_or_default();
            }
        }
        r
    }
}
