//! The shared state of a running member ([`App`]) and what every client request goes
//! through: proposals into the batcher, reads through the lease or the read barrier,
//! and forwarding for the text protocol.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, Semaphore};

use super::batcher::{self, Proposal, RaftLog, MAX_BATCH_COMMANDS};
use super::outcome::{Outcome, Reply};
use super::reads::{self, ReadWaiter};
use crate::client::Client;
use crate::identity::Identity;
use crate::lease::Lease;
use crate::metrics::Metrics;
use crate::store::StateMachine;
use crate::types::{Member, NodeId, Raft, MAX_COMMAND_BYTES};

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
    /// Set while this leader hands its leadership over: proposals are answered "not the
    /// leader" (nothing appended), so clients retry with the next one.
    pub handing_over: std::sync::atomic::AtomicBool,
    /// Set once the leader has told this member that it was removed from the cluster.
    pub removed: tokio::sync::watch::Sender<bool>,
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
        let log = RaftLog { me: id, raft: raft.clone() };
        tokio::spawn(batcher::run(log, rx, proposal_timeout, max_inflight_batches, metrics.clone()));
        let (reads, rx) = mpsc::channel(4 * MAX_BATCH_COMMANDS);
        tokio::spawn(reads::barrier(raft.clone(), rx, proposal_timeout));
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
            handing_over: std::sync::atomic::AtomicBool::new(false),
            removed: tokio::sync::watch::Sender::new(false),
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
        if self.handing_over.load(Ordering::Relaxed) {
            reply.answer(Outcome::NotLeader(None), &self.metrics);
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
