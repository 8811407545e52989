//! Group commit. openraft 0.9 appends (and fsyncs) each proposal on its own before it
//! looks at the next one, so proposals are gathered here into one entry per batch. At
//! most `max_inflight` batches are between "handed to Raft" and "applied"; while they
//! are, new proposals accumulate into the next batch, so batches grow with load and an
//! idle cluster still answers a lone proposal at once.
//!
//! The batcher sees Raft through [`Log`], so that its batching, ordering and error
//! mapping are tested without a cluster.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use openraft::error::{ClientWriteError, ForwardToLeader};
use openraft::raft::ClientWriteResponse;
use tokio::sync::{mpsc, Semaphore};
use tokio::time::error::Elapsed;

use super::outcome::{Outcome, Reply};
use crate::metrics::Metrics;
use crate::types::{Member, NodeId, Raft, Request, TypeConfig};

/// Bounds of one batch: small enough that an AppendEntries of many batches stays a
/// reasonable frame, large enough to amortise an fsync over many commands.
pub(crate) const MAX_BATCH_COMMANDS: usize = 1024;
pub(crate) const MAX_BATCH_BYTES: usize = 1 << 20;

/// A command and where its outcome goes.
pub(crate) type Proposal = (Vec<u8>, Reply);

/// One result per command of a batch, in order: the guest's value or its error.
pub(crate) type Results = Vec<Result<Vec<u8>, String>>;

/// What the batcher needs of Raft.
pub(crate) trait Log: Send + Sync + 'static {
    /// The batch's results once it is applied, or what became of it otherwise.
    type Applied: Future<Output = Result<Results, Outcome>> + Send + 'static;

    /// `Ok` when a batch handed over now is appended by this member (unless leadership is
    /// lost in between); otherwise the leader's client address, when known.
    fn leads(&self) -> Result<(), Option<String>>;

    /// Hands a batch to Raft. An error means it was not taken (the member is stopping).
    fn append(&self, commands: Vec<Vec<u8>>) -> impl Future<Output = Result<Self::Applied, String>> + Send;
}

/// Gathers proposals from `rx` into batches until the channel closes.
pub(crate) async fn run(
    log: impl Log,
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
        if let Err(to) = log.leads() {
            for w in waiters {
                w.answer(Outcome::NotLeader(to.clone()), &metrics);
            }
            continue;
        }
        let applied = match log.append(commands).await {
            Ok(applied) => applied,
            Err(e) => {
                for w in waiters {
                    w.answer(Outcome::Rejected(format!("member is stopping: {e}")), &metrics);
                }
                continue;
            }
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let outcome = match tokio::time::timeout(timeout, applied).await {
                Ok(outcome) => outcome,
                Err(Elapsed { .. }) => {
                    Err(Outcome::Unknown(format!("not committed within {} ms", timeout.as_millis())))
                }
            };
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

/// The log of a running member.
pub(crate) struct RaftLog {
    pub me: NodeId,
    pub raft: Raft,
}

/// Raft's answer to a batch, unless the responder was dropped.
type RaftAnswer<E> = Result<Result<ClientWriteResponse<TypeConfig>, ClientWriteError<NodeId, Member>>, E>;

impl Log for RaftLog {
    type Applied = std::pin::Pin<Box<dyn Future<Output = Result<Results, Outcome>> + Send>>;

    fn leads(&self) -> Result<(), Option<String>> {
        let metrics = self.raft.metrics();
        let m = metrics.borrow();
        if m.state == openraft::ServerState::Leader && m.vote.is_committed() && m.vote.leader_id().node_id == self.me {
            Ok(())
        } else {
            let leader = m.current_leader;
            drop(m);
            Err(leader.and_then(|id| super::leader_addr(&self.raft, id)))
        }
    }

    async fn append(&self, commands: Vec<Vec<u8>>) -> Result<Self::Applied, String> {
        let responder = self.raft.client_write_ff(Request::commands(commands)).await.map_err(|e| e.to_string())?;
        Ok(Box::pin(async move { raft_outcome(responder.await) }))
    }
}

/// What the answer Raft gave a batch means for each command in it.
fn raft_outcome<E>(answer: RaftAnswer<E>) -> Result<Results, Outcome> {
    match answer {
        Err(_) => Err(Outcome::Unknown("the member stopped before the entry was applied".into())),
        Ok(Ok(resp)) => Ok(resp.data.results),
        // Leadership was lost after the batch reached Raft: either before it was appended
        // or after (then a newer leader truncated it here, but it may survive on another
        // member and be committed there): not knowable here, so never "not applied".
        Ok(Err(ClientWriteError::ForwardToLeader(ForwardToLeader { leader_id, .. }))) => {
            Err(Outcome::Unknown(format!("leadership moved to {leader_id:?} while the command was being committed")))
        }
        Ok(Err(ClientWriteError::ChangeMembershipError(e))) => Err(Outcome::Rejected(e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use tokio::sync::oneshot;

    use super::*;

    /// Where a test answers a batch.
    type Answerer = oneshot::Sender<Result<Results, Outcome>>;

    /// A log whose leadership and answers the test sets, recording the batches it takes.
    #[derive(Clone)]
    struct FakeLog {
        batches: Arc<Mutex<Vec<Vec<Vec<u8>>>>>,
        /// Where the test answers each batch, in order.
        pending: Arc<Mutex<Vec<Answerer>>>,
        leader: Arc<Mutex<Result<(), Option<String>>>>,
        refuse: Arc<std::sync::atomic::AtomicBool>,
    }

    impl Log for FakeLog {
        type Applied = std::pin::Pin<Box<dyn Future<Output = Result<Results, Outcome>> + Send>>;

        fn leads(&self) -> Result<(), Option<String>> {
            self.leader.lock().expect("lock").clone()
        }

        async fn append(&self, commands: Vec<Vec<u8>>) -> Result<Self::Applied, String> {
            if self.refuse.load(std::sync::atomic::Ordering::Relaxed) {
                return Err("raft stopped".into());
            }
            self.batches.lock().expect("lock").push(commands);
            let (tx, rx) = oneshot::channel();
            self.pending.lock().expect("lock").push(tx);
            Ok(Box::pin(async move { rx.await.unwrap_or_else(|_| Err(Outcome::Unknown("dropped".into()))) }))
        }
    }

    impl FakeLog {
        fn batch_sizes(&self) -> Vec<usize> {
            self.batches.lock().expect("lock").iter().map(Vec::len).collect()
        }

        /// Answers batch `i` by echoing its commands back, as a guest would.
        fn echo(&self, i: usize) {
            let commands = self.batches.lock().expect("lock")[i].clone();
            let tx = std::mem::replace(&mut self.pending.lock().expect("lock")[i], oneshot::channel().0);
            let _ = tx.send(Ok(commands.into_iter().map(Ok).collect()));
        }

        fn answer(&self, i: usize, answer: Result<Results, Outcome>) {
            let tx = std::mem::replace(&mut self.pending.lock().expect("lock")[i], oneshot::channel().0);
            let _ = tx.send(answer);
        }
    }

    struct Harness {
        log: FakeLog,
        tx: mpsc::Sender<Proposal>,
        metrics: Arc<Metrics>,
    }

    fn start(max_inflight: usize, timeout: Duration) -> Harness {
        let log = FakeLog {
            batches: Arc::default(),
            pending: Arc::default(),
            leader: Arc::new(Mutex::new(Ok(()))),
            refuse: Arc::default(),
        };
        let (tx, rx) = mpsc::channel(4 * MAX_BATCH_COMMANDS);
        let metrics = Arc::new(Metrics::default());
        tokio::spawn(run(log.clone(), rx, timeout, max_inflight, metrics.clone()));
        Harness { log, tx, metrics }
    }

    impl Harness {
        async fn propose(&self, command: &[u8]) -> oneshot::Receiver<Outcome> {
            let (tx, rx) = oneshot::channel();
            self.tx.send((command.to_vec(), Reply::Wait(tx))).await.expect("batcher running");
            rx
        }

        async fn wait_for_batches(&self, n: usize) {
            while self.log.batch_sizes().len() < n {
                tokio::task::yield_now().await;
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
    }

    const LONG: Duration = Duration::from_secs(30);

    #[tokio::test]
    async fn a_lone_proposal_is_a_batch_of_its_own_and_gets_its_result() {
        let h = start(1, LONG);
        let rx = h.propose(b"set-a-1").await;
        h.wait_for_batches(1).await;
        h.log.echo(0);
        assert_eq!(rx.await.expect("answered"), Outcome::Ok(b"set-a-1".to_vec()));
        assert_eq!(h.log.batch_sizes(), vec![1]);
        assert_eq!(h.metrics.proposals_answered.load(std::sync::atomic::Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn proposals_made_while_a_batch_is_in_flight_form_the_next_batch_in_order() {
        let h = start(1, LONG);
        let first = h.propose(b"c0").await;
        h.wait_for_batches(1).await;
        let mut rest = Vec::new();
        for i in 1..=100 {
            rest.push(h.propose(format!("c{i}").as_bytes()).await);
        }
        // The in-flight limit holds the next batch back until the first is answered.
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(h.log.batch_sizes(), vec![1]);
        h.log.echo(0);
        assert_eq!(first.await.expect("answered"), Outcome::Ok(b"c0".to_vec()));
        h.wait_for_batches(2).await;
        assert_eq!(h.log.batch_sizes(), vec![1, 100]);
        h.log.echo(1);
        for (i, rx) in rest.into_iter().enumerate() {
            assert_eq!(rx.await.expect("answered"), Outcome::Ok(format!("c{}", i + 1).into_bytes()));
        }
    }

    #[tokio::test]
    async fn batches_are_bounded_in_commands_and_bytes() {
        let h = start(1, LONG);
        let hold = h.propose(b"hold").await;
        h.wait_for_batches(1).await;
        let mut waiting = Vec::new();
        for _ in 0..MAX_BATCH_COMMANDS + 10 {
            waiting.push(h.propose(b"x").await);
        }
        h.log.echo(0);
        hold.await.expect("answered");
        h.wait_for_batches(2).await;
        assert_eq!(h.log.batch_sizes()[1], MAX_BATCH_COMMANDS);
        h.log.echo(1);
        h.wait_for_batches(3).await;
        assert_eq!(h.log.batch_sizes()[2], 10);
        h.log.echo(2);
        for rx in waiting {
            assert!(matches!(rx.await.expect("answered"), Outcome::Ok(_)));
        }

        // Bytes: each command a quarter of the bound; a batch stops once it reaches it.
        let big = vec![7u8; MAX_BATCH_BYTES / 4];
        let hold = h.propose(b"hold").await;
        h.wait_for_batches(4).await;
        let mut waiting = Vec::new();
        for _ in 0..6 {
            waiting.push(h.propose(&big).await);
        }
        h.log.echo(3);
        hold.await.expect("answered");
        h.wait_for_batches(5).await;
        assert_eq!(h.log.batch_sizes()[4], 4);
        h.log.echo(4);
        h.wait_for_batches(6).await;
        assert_eq!(h.log.batch_sizes()[5], 2);
    }

    #[tokio::test]
    async fn a_member_that_does_not_lead_appends_nothing_and_names_the_leader() {
        let h = start(1, LONG);
        *h.log.leader.lock().expect("lock") = Err(Some("10.0.0.2:11000".into()));
        let rx = h.propose(b"set-a-1").await;
        assert_eq!(rx.await.expect("answered"), Outcome::NotLeader(Some("10.0.0.2:11000".into())));
        assert!(h.log.batch_sizes().is_empty());
        assert_eq!(h.metrics.redirects.load(std::sync::atomic::Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn results_go_to_their_commands_and_missing_ones_are_unknown() {
        let h = start(1, LONG);
        let hold = h.propose(b"hold").await;
        h.wait_for_batches(1).await;
        let a = h.propose(b"a").await;
        let b = h.propose(b"b").await;
        let c = h.propose(b"c").await;
        h.log.echo(0);
        hold.await.expect("answered");
        h.wait_for_batches(2).await;
        h.log.answer(1, Ok(vec![Ok(b"A".to_vec()), Err("no such key".into())]));
        assert_eq!(a.await.expect("a"), Outcome::Ok(b"A".to_vec()));
        assert_eq!(b.await.expect("b"), Outcome::GuestError("no such key".into()));
        assert!(matches!(c.await.expect("c"), Outcome::Unknown(_)));
    }

    #[tokio::test]
    async fn a_batch_not_applied_in_time_or_refused_is_answered_for_every_command() {
        let h = start(2, Duration::from_millis(50));
        let a = h.propose(b"a").await;
        let b = h.propose(b"b").await;
        let outcome = a.await.expect("a");
        assert!(matches!(&outcome, Outcome::Unknown(why) if why.contains("not committed within")), "{outcome:?}");
        assert!(matches!(b.await.expect("b"), Outcome::Unknown(_)));

        h.log.refuse.store(true, std::sync::atomic::Ordering::Relaxed);
        let c = h.propose(b"c").await;
        assert!(matches!(c.await.expect("c"), Outcome::Rejected(why) if why.contains("raft stopped")));

        h.log.refuse.store(false, std::sync::atomic::Ordering::Relaxed);
        let n = h.log.batch_sizes().len();
        let d = h.propose(b"d").await;
        h.wait_for_batches(n + 1).await;
        h.log.answer(n, Err(Outcome::Rejected("membership".into())));
        assert_eq!(d.await.expect("d"), Outcome::Rejected("membership".into()));
    }

    /// A `ForwardToLeader` after the batch reached Raft may follow an append that a newer
    /// leader truncated here and that still commits from another member's copy: a client
    /// told "not applied" would send it again and apply it twice.
    #[test]
    fn leadership_lost_after_proposing_is_an_unknown_outcome() {
        let lost: ClientWriteError<NodeId, Member> =
            ClientWriteError::ForwardToLeader(ForwardToLeader { leader_id: Some(2), leader_node: None });
        let outcome = raft_outcome::<()>(Ok(Err(lost)));
        assert!(matches!(outcome, Err(Outcome::Unknown(_))), "{outcome:?}");
        let gone = raft_outcome::<()>(Err(()));
        assert!(matches!(gone, Err(Outcome::Unknown(_))), "{gone:?}");
    }
}
