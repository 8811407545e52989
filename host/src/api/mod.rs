//! The client-facing side of a member: how a proposal or a query becomes an [`Outcome`],
//! and the two wire protocols that carry them (`binary`, `text`).
//!
//! Only this module and `client` know the client wire format.

pub mod binary;
pub mod text;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use openraft::error::{CheckIsLeaderError, ClientWriteError, ForwardToLeader, RaftError};
use openraft::raft::ClientWriteResponse;
use tokio::time::error::Elapsed;

use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};

use crate::client::Client;
use crate::identity::Identity;
use crate::lease::Lease;
use crate::metrics::Metrics;
use crate::proto::{ClientResponse, Code};
use crate::store::StateMachine;
use crate::types::{Member, NodeId, Raft, Request, TypeConfig, MAX_COMMAND_BYTES};

/// Shared state of a running member, handed to every server.
pub struct App {
    pub id: NodeId,
    /// The cluster this member belongs to (once it does) and its member uid.
    pub identity: Arc<Identity>,
    pub raft: Raft,
    pub sm: StateMachine,
    pub metrics: Arc<Metrics>,
    pub max_frame: usize,
    pub token: String,
    pub fsm_sha256: String,
    pub fsm_config: Vec<(String, String)>,
    /// Used by the text protocol to forward commands from a follower to the leader.
    forwarder: tokio::sync::OnceCell<Client>,
    /// Into the batcher, which turns concurrent proposals into one log entry.
    proposals: mpsc::Sender<Proposal>,
    /// Into the read barrier, which confirms leadership once for all reads waiting.
    reads: mpsc::Sender<ReadWaiter>,
    /// Lets reads skip the read barrier while no other leader can exist.
    lease: Arc<Lease>,
    /// Set when the member stops: new proposals are refused.
    stopping: std::sync::atomic::AtomicBool,
    /// Connections served at once on each client-facing port (binary and text).
    pub max_connections: usize,
    /// Bytes of client requests (in KiB) this member holds at once, across connections:
    /// a request counts from its first byte until its answer is written.
    pub request_budget: Arc<Semaphore>,
}

/// Connections per client-facing port, unless set otherwise.
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;
/// Client request bytes in flight across connections, unless set otherwise.
pub const DEFAULT_REQUEST_BUDGET: usize = 256 << 20;

/// What a binary-protocol request holds until its answer is written: its slot in the
/// connection's in-flight limit and its bytes in the member's request budget.
pub struct Held {
    pub _slot: OwnedSemaphorePermit,
    pub _bytes: OwnedSemaphorePermit,
    /// The connection's answers not yet written, which its answer joins.
    pub backlog: Arc<binary::Backlog>,
}

type ReadWaiter = oneshot::Sender<Result<(), Outcome>>;

type Proposal = (Vec<u8>, Reply);

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
    fn answer(self, outcome: Outcome, metrics: &Metrics) {
        self.send(outcome, metrics);
        metrics.proposals_answered.fetch_add(1, Ordering::Relaxed);
    }

    fn send(self, outcome: Outcome, metrics: &Metrics) {
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
                held.backlog.add(&resp);
                let _ = to.try_send((resp, Some(held)));
            }
        }
    }
}

/// Bounds of one batch: small enough that an AppendEntries of many batches stays a
/// reasonable frame, large enough to amortise an fsync over many commands.
pub(crate) const MAX_BATCH_COMMANDS: usize = 1024;
pub(crate) const MAX_BATCH_BYTES: usize = 1 << 20;

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

impl App {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        identity: Arc<Identity>,
        raft: Raft,
        sm: StateMachine,
        metrics: Arc<Metrics>,
        proposal_timeout: Duration,
        max_frame: usize,
        token: String,
        fsm_sha256: String,
        fsm_config: Vec<(String, String)>,
        max_inflight_batches: usize,
        lease: Arc<Lease>,
    ) -> Self {
        let id = identity.node;
        let (proposals, rx) = mpsc::channel(4 * MAX_BATCH_COMMANDS);
        tokio::spawn(batcher(id, raft.clone(), rx, proposal_timeout, max_inflight_batches, metrics.clone()));
        let (reads, rx) = mpsc::channel(4 * MAX_BATCH_COMMANDS);
        tokio::spawn(read_barrier(raft.clone(), rx, proposal_timeout));
        App {
            id,
            identity,
            proposals,
            reads,
            raft,
            sm,
            metrics,
            max_frame,
            token,
            fsm_sha256,
            fsm_config,
            forwarder: tokio::sync::OnceCell::new(),
            lease,
            stopping: std::sync::atomic::AtomicBool::new(false),
            max_connections: DEFAULT_MAX_CONNECTIONS,
            request_budget: Arc::new(Semaphore::new(budget_units(DEFAULT_REQUEST_BUDGET, max_frame))),
        }
    }

    /// Limits for what clients may hold on this member: connections per port, and request
    /// bytes in flight across them (never below one largest frame, which must fit).
    pub fn with_client_limits(mut self, max_connections: usize, request_budget: usize) -> Self {
        self.max_connections = max_connections.max(1);
        self.request_budget = Arc::new(Semaphore::new(budget_units(request_budget, self.max_frame)));
        self
    }

    /// Whether a linearizable read may be answered from the local state machine at once:
    /// this member leads, holds the lease (see `lease`), and has applied an entry of its
    /// own leadership, hence everything earlier leaders committed.
    fn may_read_locally(&self) -> bool {
        let metrics = self.raft.metrics();
        let m = metrics.borrow();
        if m.state != openraft::ServerState::Leader || !m.vote.is_committed() {
            return false;
        }
        let leadership = m.vote.leader_id();
        if m.last_applied.as_ref().is_none_or(|a| a.leader_id != *leadership) {
            return false;
        }
        let voter_sets = m.membership_config.membership().get_joint_config();
        self.lease.holds(self.id, leadership, voter_sets, std::time::Instant::now())
    }

    /// A member's entry in the current membership, if it has one.
    pub fn member(&self, id: NodeId) -> Option<Member> {
        let m = self.raft.metrics();
        let m = m.borrow();
        m.membership_config.membership().get_node(&id).cloned()
    }

    /// Write through the log: answered once committed on a majority and applied here.
    pub async fn propose(&self, command: Vec<u8>) -> Outcome {
        let (tx, rx) = oneshot::channel();
        self.submit(command, Reply::Wait(tx)).await;
        rx.await.unwrap_or_else(|_| {
            self.metrics.proposal_errors.fetch_add(1, Ordering::Relaxed);
            Outcome::Unknown("the member stopped before the command was applied".into())
        })
    }

    /// Hand a command to the batcher; its outcome goes to `reply`.
    pub async fn submit(&self, command: Vec<u8>, reply: Reply) {
        self.metrics.proposals.fetch_add(1, Ordering::Relaxed);
        if self.stopping.load(Ordering::Relaxed) {
            reply.answer(Outcome::Rejected("member is stopping".into()), &self.metrics);
            return;
        }
        if command.len() > MAX_COMMAND_BYTES {
            let why = format!("command of {} bytes exceeds the limit of {MAX_COMMAND_BYTES} bytes", command.len());
            reply.answer(Outcome::Rejected(why), &self.metrics);
            return;
        }
        if let Err(mpsc::error::SendError((_, reply))) = self.proposals.send((command, reply)).await {
            reply.answer(Outcome::Rejected("member is stopping".into()), &self.metrics);
        }
    }

    /// Stop taking proposals (they are refused, definitely, so clients go elsewhere) and
    /// wait up to `within` for those already taken to be answered: a graceful stop then
    /// reports unknown outcomes only for what could not finish in time.
    pub async fn drain(&self, within: Duration) {
        self.stopping.store(true, Ordering::Relaxed);
        let deadline = tokio::time::Instant::now() + within;
        let pending = || {
            let taken = self.metrics.proposals.load(Ordering::Relaxed);
            taken.saturating_sub(self.metrics.proposals_answered.load(Ordering::Relaxed))
        };
        while pending() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if pending() > 0 {
            tracing::warn!(unanswered = pending(), "stopping with proposals in flight; their outcome is unknown");
        }
    }

    /// Whether a query may be answered from the local state at once: a stale one always,
    /// a linearizable one under the lease.
    pub fn may_answer_now(&self, stale_ok: bool) -> bool {
        if stale_ok {
            return true;
        }
        let lease = self.may_read_locally();
        if lease {
            self.metrics.lease_reads.fetch_add(1, Ordering::Relaxed);
        }
        lease
    }

    /// Answer a query that [`App::may_answer_now`] allowed; the outcome goes to `reply`
    /// from the state-machine thread.
    pub fn answer_now(&self, request: Vec<u8>, reply: Reply) {
        self.metrics.queries.fetch_add(1, Ordering::Relaxed);
        let metrics = self.metrics.clone();
        self.sm.query_then(request, move |r| {
            let outcome = match r {
                Ok(v) => Outcome::Ok(v),
                Err(e) => Outcome::GuestError(e),
            };
            reply.send(outcome, &metrics);
        });
    }

    /// A read. Linearizable unless `stale_ok`: leadership is confirmed with a quorum and the
    /// read waits until the state machine has applied the read index.
    pub async fn query(&self, request: Vec<u8>, stale_ok: bool) -> Outcome {
        self.metrics.queries.fetch_add(1, Ordering::Relaxed);
        if !self.may_answer_now(stale_ok) {
            let (tx, rx) = oneshot::channel();
            let confirmed = match self.reads.send(tx).await {
                Ok(()) => rx.await.unwrap_or_else(|_| Err(Outcome::Rejected("member is stopping".into()))),
                Err(_) => Err(Outcome::Rejected("member is stopping".into())),
            };
            match confirmed {
                Ok(()) => {}
                Err(o @ Outcome::NotLeader(_)) => {
                    self.metrics.redirects.fetch_add(1, Ordering::Relaxed);
                    return o;
                }
                Err(o) => {
                    self.metrics.query_errors.fetch_add(1, Ordering::Relaxed);
                    return o;
                }
            }
        }
        match self.sm.query(request).await {
            Ok(v) => Outcome::Ok(v),
            Err(e) => Outcome::GuestError(e),
        }
    }

    /// Propose, and if this member is not the leader, pass the command on to the leader
    /// through the client library (the text protocol has no way to redirect a client).
    pub async fn propose_or_forward(&self, command: Vec<u8>) -> Outcome {
        match self.propose(command.clone()).await {
            Outcome::NotLeader(Some(leader)) => {
                let client = self
                    .forwarder
                    .get_or_init(|| async {
                        // The leader first; the others let the client follow a later one.
                        let mut addrs = vec![leader];
                        let m = self.raft.metrics().borrow().membership_config.clone();
                        addrs.extend(
                            m.membership()
                                .nodes()
                                .filter(|(id, _)| **id != self.id)
                                .map(|(_, n)| n.client_addr.clone()),
                        );
                        addrs.dedup();
                        Client::new(addrs)
                    })
                    .await;
                client.propose_outcome(command).await
            }
            other => other,
        }
    }
}

/// The request budget in its units (KiB), large enough for one largest frame.
fn budget_units(bytes: usize, max_frame: usize) -> usize {
    bytes.max(max_frame + 64 * 1024).div_ceil(1024).min(Semaphore::MAX_PERMITS)
}

/// Whether this member leads in a committed vote, so that a proposal handed to Raft now is
/// appended by it (unless leadership is lost in between).
fn leads(me: NodeId, raft: &Raft) -> Result<(), Option<NodeId>> {
    let metrics = raft.metrics();
    let m = metrics.borrow();
    if m.state == openraft::ServerState::Leader && m.vote.is_committed() && m.vote.leader_id().node_id == me {
        Ok(())
    } else {
        Err(m.current_leader)
    }
}

/// Group commit. openraft 0.9 appends (and fsyncs) each proposal on its own before it
/// looks at the next one, so proposals are gathered here into one entry per batch. At
/// most `max_inflight` batches are between "handed to Raft" and "applied"; while they
/// are, new proposals accumulate into the next batch, so batches grow with load and an
/// idle cluster still answers a lone proposal at once.
async fn batcher(
    me: NodeId,
    raft: Raft,
    mut rx: mpsc::Receiver<Proposal>,
    timeout: Duration,
    max_inflight: usize,
    metrics: Arc<Metrics>,
) {
    let inflight = Arc::new(Semaphore::new(max_inflight.max(1)));
    loop {
        let Ok(permit) = inflight.clone().acquire_owned().await else {
            return;
        };
        let Some(first) = rx.recv().await else {
            return;
        };
        let mut bytes = first.0.len();
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH_COMMANDS && bytes < MAX_BATCH_BYTES {
            match rx.try_recv() {
                Ok(p) => {
                    bytes += p.0.len();
                    batch.push(p);
                }
                Err(_) => break,
            }
        }
        let (commands, waiters): (Vec<Vec<u8>>, Vec<Reply>) = batch.into_iter().unzip();
        // Checked here, before Raft sees the batch: once it has, a `ForwardToLeader` can
        // also mean the entry was appended and then truncated by a newer leader, and a
        // truncated entry can still be committed from a copy on another member, so it
        // must not be reported as "not applied" (a client would send it again).
        if let Err(leader) = leads(me, &raft) {
            let to = leader.and_then(|id| leader_addr(&raft, id));
            for w in waiters {
                w.answer(Outcome::NotLeader(to.clone()), &metrics);
            }
            continue;
        }
        let responder = match raft.client_write_ff(Request::commands(commands)).await {
            Ok(rx) => rx,
            Err(e) => {
                for w in waiters {
                    w.answer(Outcome::Rejected(format!("member is stopping: {e}")), &metrics);
                }
                continue;
            }
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let outcome = batch_outcome(tokio::time::timeout(timeout, responder).await, timeout);
            drop(permit);
            match outcome {
                Ok(results) => {
                    let mut results = results.into_iter();
                    for w in waiters {
                        let o = match results.next() {
                            Some(Ok(v)) => Outcome::Ok(v),
                            Some(Err(e)) => Outcome::GuestError(e),
                            None => Outcome::Unknown("no result for the command".into()),
                        };
                        w.answer(o, &metrics);
                    }
                }
                Err(o) => {
                    for w in waiters {
                        w.answer(o.clone(), &metrics);
                    }
                }
            }
        });
    }
}

/// Raft's answer to a batch: its response or why not, unless the responder was dropped.
type RaftAnswer<E> = Result<Result<ClientWriteResponse<TypeConfig>, ClientWriteError<NodeId, Member>>, E>;

/// What the answer Raft gave a batch (or its absence within `timeout`) means for each
/// command in it.
fn batch_outcome<E>(
    answer: Result<RaftAnswer<E>, Elapsed>,
    timeout: Duration,
) -> Result<Vec<Result<Vec<u8>, String>>, Outcome> {
    match answer {
        Err(_) => Err(Outcome::Unknown(format!("not committed within {} ms", timeout.as_millis()))),
        Ok(Err(_)) => Err(Outcome::Unknown("the member stopped before the entry was applied".into())),
        Ok(Ok(Ok(resp))) => Ok(resp.data.results),
        // Leadership was lost after the batch reached Raft: either before it was appended
        // or after (then a newer leader truncated it here, but it may survive on another
        // member and be committed there): not knowable here, so never "not applied".
        Ok(Ok(Err(ClientWriteError::ForwardToLeader(f)))) => Err(Outcome::Unknown(format!(
            "leadership moved to {:?} while the command was being committed",
            f.leader_id
        ))),
        Ok(Ok(Err(ClientWriteError::ChangeMembershipError(e)))) => Err(Outcome::Rejected(e.to_string())),
    }
}

/// The client address of the leader a `ForwardToLeader` points at, if known.
fn leader_client_addr<N: openraft::Node>(raft: &Raft, f: &ForwardToLeader<NodeId, N>) -> Option<String> {
    leader_addr(raft, f.leader_id?)
}

fn leader_addr(raft: &Raft, id: NodeId) -> Option<String> {
    raft.metrics().borrow().membership_config.membership().get_node(&id).map(|m| m.client_addr.clone())
}

/// Linearizable reads without a quorum round each: every read waiting when a round starts
/// is answered by that round. Safe because the round starts after each of those reads
/// arrived, so its read index covers every write acknowledged before any of them.
async fn read_barrier(raft: Raft, mut rx: mpsc::Receiver<ReadWaiter>, timeout: Duration) {
    while let Some(first) = rx.recv().await {
        let mut waiters = vec![first];
        while let Ok(w) = rx.try_recv() {
            waiters.push(w);
        }
        let res = match tokio::time::timeout(timeout, raft.ensure_linearizable()).await {
            Err(_) => Err(Outcome::Rejected("could not confirm leadership in time".into())),
            Ok(Ok(_)) => Ok(()),
            Ok(Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f)))) => {
                Err(Outcome::NotLeader(leader_client_addr(&raft, &f)))
            }
            Ok(Err(e)) => Err(Outcome::Rejected(format!("could not confirm leadership: {e}"))),
        };
        for w in waiters {
            let _ = w.send(res.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `ForwardToLeader` after the batch reached Raft may follow an append that a newer
    /// leader truncated here and that still commits from another member's copy: a client
    /// told "not applied" would send it again and apply it twice.
    #[test]
    fn leadership_lost_after_proposing_is_an_unknown_outcome() {
        let t = Duration::from_secs(1);
        let lost: ClientWriteError<NodeId, Member> =
            ClientWriteError::ForwardToLeader(ForwardToLeader { leader_id: Some(2), leader_node: None });
        let outcome = batch_outcome::<()>(Ok(Ok(Err(lost))), t);
        assert!(matches!(outcome, Err(Outcome::Unknown(_))), "{outcome:?}");
        let gone = batch_outcome::<()>(Ok(Err(())), t);
        assert!(matches!(gone, Err(Outcome::Unknown(_))), "{gone:?}");
    }
}
