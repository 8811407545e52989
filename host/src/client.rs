//! Client library for the binary protocol: used by `kv`, the tests, the text protocol's
//! forwarding and the load generator.
//!
//! One connection at a time, shared by concurrent callers (requests are pipelined and
//! matched by id). The client starts with the leader it last heard of, tries the next
//! address when a member does not answer, and follows `NotLeader` redirects. A proposal
//! whose connection broke after it was sent, or whose answer did not come before the
//! deadline, is reported as [`ClientError::UnknownOutcome`], never retried: it may have
//! been applied. A query that gets no answer is asked again, of another member if need
//! be, until the deadline.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio::task::AbortHandle;

use crate::api::Outcome;
use crate::backoff::Backoff;
use crate::codec::{encode_frame, gather, read_frame, DEFAULT_MAX_FRAME};
use crate::proto::{ClientRequest, ClientResponse, Code, RequestKind};
use crate::types::MAX_COMMAND_BYTES;

/// Requests gathered into one write at most: the writer writes and starts again rather
/// than copying everything queued meanwhile into one buffer.
const MAX_WRITE: usize = 1 << 20;
/// What a request adds to its payload on the wire: the frame length, id, kind and flag.
const REQUEST_OVERHEAD: usize = 32;

/// Longest wait for one TCP connect; less when the call's deadline is nearer.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Kernel keepalive on client connections, so that an idle connection to a member that
/// vanished (a partition, a machine gone) is found dead before a request is put on it:
/// probes after 10 s of silence, every 5 s, 3 unanswered ones end it. Data sent and never
/// acknowledged ends it after `UNACKED_TIMEOUT`. A paused process's kernel still answers
/// both: only the per-request timeouts notice that.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(10);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
const KEEPALIVE_PROBES: u32 = 3;
const UNACKED_TIMEOUT: Duration = Duration::from_secs(30);

/// A query waits for its answer at most half the time left before the deadline (so there
/// is time to ask another member), and not less than this unless less is left.
const MIN_QUERY_WAIT: Duration = Duration::from_millis(500);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClientError {
    /// The command was committed and the guest returned this error result.
    #[error("{0}")]
    Guest(String),
    /// The command definitely did not take effect.
    #[error("rejected: {0}")]
    Rejected(String),
    /// The command may or may not have taken effect.
    #[error("unknown outcome: {0}")]
    UnknownOutcome(String),
    /// No member could be reached (or none led, or none answered a query) before the
    /// deadline; no proposal was sent.
    #[error("cluster unavailable: {0}")]
    Unavailable(String),
    #[error("bad request: {0}")]
    BadRequest(String),
}

/// The requests on a connection that await their answers, and whether it still takes
/// new ones. One lock for both: a request is registered only while the connection lives,
/// and its end fails every request registered, so none can wait on a connection that is
/// gone (checked first and registered after, one could slip in after the last was failed).
#[derive(Default)]
struct Inflight {
    waiting: HashMap<u64, oneshot::Sender<ClientResponse>>,
    closed: bool,
}

type SharedInflight = Arc<Mutex<Inflight>>;

fn lock(inflight: &Mutex<Inflight>) -> MutexGuard<'_, Inflight> {
    inflight.lock().unwrap_or_else(|p| p.into_inner())
}

/// Marks the connection closed and wakes every waiting request with "connection lost"
/// (dropping their senders).
fn close(inflight: &Mutex<Inflight>) {
    let mut i = lock(inflight);
    i.closed = true;
    i.waiting.clear();
}

struct Conn {
    addr: String,
    tx: mpsc::UnboundedSender<ClientRequest>,
    inflight: SharedInflight,
    /// Answers read so far: tells a member that went silent from one that is only slow
    /// to answer one request.
    answers: Arc<AtomicU64>,
    /// The reader and writer tasks: aborted to drop the socket.
    tasks: [AbortHandle; 2],
}

/// Why a request on a connection got no answer.
#[derive(Debug, PartialEq, Eq)]
enum Lost {
    /// It never left: safe to retry anywhere.
    NotSent,
    /// It was sent; the connection ended before the answer.
    Sent,
    /// It was sent and no answer came in time.
    TimedOut,
}

impl Conn {
    async fn open(addr: &str, max_frame: usize, connect_timeout: Duration) -> std::io::Result<Conn> {
        let stream = tokio::time::timeout(connect_timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))??;
        let _ = stream.set_nodelay(true);
        keepalive(&stream);
        let (rd, mut wr) = stream.into_split();
        let (tx, mut rx) = mpsc::unbounded_channel::<ClientRequest>();
        let inflight = SharedInflight::default();
        let answers = Arc::new(AtomicU64::new(0));
        let writer = {
            let inflight = inflight.clone();
            tokio::spawn(async move {
                let mut out = Vec::new();
                while let Some(req) = rx.recv().await {
                    out.clear();
                    gather(req, || rx.try_recv().ok(), MAX_WRITE, &mut out, |r, out| encode_frame(&r, out));
                    if wr.write_all(&out).await.is_err() {
                        break;
                    }
                }
                close(&inflight);
            })
        };
        let reader = {
            let inflight = inflight.clone();
            let answers = answers.clone();
            tokio::spawn(async move {
                let mut rd = BufReader::new(rd);
                let mut buf = Vec::new();
                while let Ok(resp) = read_frame::<ClientResponse, _>(&mut rd, max_frame, &mut buf).await {
                    answers.fetch_add(1, Ordering::SeqCst);
                    let waiter = lock(&inflight).waiting.remove(&resp.id);
                    if let Some(w) = waiter {
                        let _ = w.send(resp);
                    }
                }
                close(&inflight);
            })
        };
        Ok(Conn {
            addr: addr.to_string(),
            tx,
            inflight,
            answers,
            tasks: [writer.abort_handle(), reader.abort_handle()],
        })
    }

    fn is_open(&self) -> bool {
        !lock(&self.inflight).closed
    }

    /// Ends the connection: every waiting request fails at once, and the socket is dropped.
    fn close(&self) {
        close(&self.inflight);
        for task in &self.tasks {
            task.abort();
        }
    }

    /// Where the answer to request `id` will arrive; `None` once the connection is closed.
    fn register(&self, id: u64) -> Option<oneshot::Receiver<ClientResponse>> {
        let mut inflight = lock(&self.inflight);
        if inflight.closed {
            return None;
        }
        let (tx, rx) = oneshot::channel();
        inflight.waiting.insert(id, tx);
        Some(rx)
    }

    /// Sends `req` and waits at most `wait` for its answer. A request that times out while
    /// nothing at all came back on the connection closes it: the member is paused, cut off
    /// or gone, and every other request on it fails as if the connection had broken. If
    /// other answers came meanwhile, the member is alive and only this request was slow
    /// (a proposal waiting for its commit, say): the connection stays.
    async fn request(&self, req: ClientRequest, wait: Duration) -> Result<ClientResponse, Lost> {
        let id = req.id;
        let Some(rx) = self.register(id) else {
            return Err(Lost::NotSent);
        };
        let heard = self.answers.load(Ordering::SeqCst);
        if self.tx.send(req).is_err() {
            lock(&self.inflight).waiting.remove(&id);
            return Err(Lost::NotSent);
        }
        match tokio::time::timeout(wait, rx).await {
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(_)) => Err(Lost::Sent),
            Err(_) => {
                lock(&self.inflight).waiting.remove(&id);
                if self.answers.load(Ordering::SeqCst) == heard {
                    self.close();
                }
                Err(Lost::TimedOut)
            }
        }
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

fn keepalive(stream: &TcpStream) {
    let sock = socket2::SockRef::from(stream);
    let params = socket2::TcpKeepalive::new()
        .with_time(KEEPALIVE_IDLE)
        .with_interval(KEEPALIVE_INTERVAL)
        .with_retries(KEEPALIVE_PROBES);
    if let Err(e) = sock.set_tcp_keepalive(&params).and_then(|()| sock.set_tcp_user_timeout(Some(UNACKED_TIMEOUT))) {
        tracing::debug!(error = %e, "cannot set TCP keepalive on a client connection");
    }
}

pub struct Client {
    addrs: Vec<String>,
    state: tokio::sync::Mutex<State>,
    next_id: AtomicU64,
    /// How long one call may keep retrying (redirects, elections, unreachable members).
    pub deadline: Duration,
    /// Largest frame sent or accepted.
    pub max_frame: usize,
}

#[derive(Default)]
struct State {
    conn: Option<Arc<Conn>>,
    /// Index in `addrs` of the member to try next when there is no connection.
    next: usize,
    /// Where the last redirect pointed.
    leader: Option<String>,
}

impl Client {
    pub fn new(addrs: Vec<String>) -> Client {
        Client {
            addrs,
            state: tokio::sync::Mutex::new(State::default()),
            next_id: AtomicU64::new(1),
            deadline: Duration::from_secs(20),
            max_frame: DEFAULT_MAX_FRAME,
        }
    }

    /// Propose a command; `Ok` carries the guest's result for it.
    pub async fn propose(&self, command: Vec<u8>) -> Result<Vec<u8>, ClientError> {
        self.call(RequestKind::Propose, command, false).await
    }

    /// A linearizable read (or, with `stale_ok`, one from whichever member answers).
    pub async fn query(&self, request: Vec<u8>, stale_ok: bool) -> Result<Vec<u8>, ClientError> {
        self.call(RequestKind::Query, request, stale_ok).await
    }

    /// `propose`, as the [`Outcome`] the text protocol renders.
    pub async fn propose_outcome(&self, command: Vec<u8>) -> Outcome {
        match self.propose(command).await {
            Ok(v) => Outcome::Ok(v),
            Err(ClientError::Guest(e)) => Outcome::GuestError(e),
            Err(ClientError::UnknownOutcome(e)) => Outcome::Unknown(e),
            Err(e) => Outcome::Rejected(e.to_string()),
        }
    }

    /// Refuses, before anything is sent, what a member would refuse: a command over the
    /// cap, and a frame over the limit, on which the member hangs up and every request
    /// pipelined on the connection ends in doubt. It also keeps frame lengths within the
    /// 4 bytes that carry them.
    fn check_size(&self, kind: RequestKind, payload: &[u8]) -> Result<(), ClientError> {
        if kind == RequestKind::Propose && payload.len() > MAX_COMMAND_BYTES {
            return Err(ClientError::BadRequest(format!(
                "command of {} bytes exceeds the limit of {MAX_COMMAND_BYTES} bytes",
                payload.len()
            )));
        }
        let limit = self.max_frame.min(u32::MAX as usize);
        if payload.len().saturating_add(REQUEST_OVERHEAD) > limit {
            return Err(ClientError::BadRequest(format!(
                "request of {} bytes exceeds the frame limit of {limit} bytes",
                payload.len()
            )));
        }
        Ok(())
    }

    /// The shared connection, or a new one to the first candidate that accepts before
    /// `deadline`.
    async fn connection(&self, deadline: Instant) -> Result<Arc<Conn>, String> {
        let mut st = self.state.lock().await;
        if let Some(c) = &st.conn {
            if c.is_open() {
                return Ok(c.clone());
            }
            st.conn = None;
        }
        let mut errors = Vec::new();
        let mut candidates: Vec<String> = st.leader.take().into_iter().collect();
        for i in 0..self.addrs.len() {
            candidates.push(self.addrs[(st.next + i) % self.addrs.len()].clone());
        }
        for addr in candidates {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                errors.push("deadline passed".to_string());
                break;
            }
            st.next = (st.next + 1) % self.addrs.len().max(1);
            match Conn::open(&addr, self.max_frame, left.min(CONNECT_TIMEOUT)).await {
                Ok(c) => {
                    let c = Arc::new(c);
                    st.conn = Some(c.clone());
                    return Ok(c);
                }
                Err(e) => errors.push(format!("{addr}: {e}")),
            }
        }
        Err(errors.join("; "))
    }

    async fn forget(&self, conn: &Arc<Conn>, leader: Option<String>) {
        let mut st = self.state.lock().await;
        if st.conn.as_ref().is_some_and(|c| Arc::ptr_eq(c, conn)) {
            st.conn = None;
        }
        if leader.is_some() {
            st.leader = leader;
        }
    }

    async fn call(&self, kind: RequestKind, payload: Vec<u8>, stale_ok: bool) -> Result<Vec<u8>, ClientError> {
        self.check_size(kind, &payload)?;
        let deadline = Instant::now() + self.deadline;
        let mut backoff = Backoff::new(Duration::from_millis(20), Duration::from_millis(500));
        let mut last_error = String::from("no member answered");
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            // Bounded as a whole: another caller may hold the state while it connects.
            let conn = match tokio::time::timeout(left, self.connection(deadline)).await {
                Ok(Ok(c)) => c,
                Ok(Err(e)) => {
                    last_error = e;
                    backoff.sleep_within(deadline).await;
                    continue;
                }
                Err(_) => break,
            };
            let req = ClientRequest {
                id: self.next_id.fetch_add(1, Ordering::Relaxed),
                kind: kind as i32,
                payload: payload.clone(),
                stale_ok,
            };
            // A proposal cannot be sent twice, so it may take all the time left; a query
            // leaves time to ask another member.
            let left = deadline.saturating_duration_since(Instant::now());
            let wait = match kind {
                RequestKind::Propose => left,
                RequestKind::Query => (left / 2).max(left.min(MIN_QUERY_WAIT)),
            };
            let resp = match conn.request(req, wait).await {
                Ok(r) => r,
                Err(lost) => {
                    let why = match lost {
                        Lost::NotSent | Lost::Sent => format!("connection to {} lost", conn.addr),
                        Lost::TimedOut => format!("no answer from {} within {} ms", conn.addr, wait.as_millis()),
                    };
                    if lost != Lost::NotSent && kind == RequestKind::Propose {
                        // A connection still open answers other requests: others may use it.
                        return Err(ClientError::UnknownOutcome(format!("{why} after sending")));
                    }
                    self.forget(&conn, None).await;
                    last_error = why;
                    continue;
                }
            };
            match Code::try_from(resp.code) {
                Ok(Code::Ok) => return Ok(resp.value),
                Ok(Code::GuestError) => return Err(ClientError::Guest(resp.error)),
                Ok(Code::UnknownOutcome) => return Err(ClientError::UnknownOutcome(resp.error)),
                Ok(Code::BadRequest) => return Err(ClientError::BadRequest(resp.error)),
                Ok(Code::NotLeader) => {
                    let leader = (!resp.leader.is_empty() && resp.leader != conn.addr).then_some(resp.leader);
                    if leader.is_none() {
                        // An election is under way (or we were sent to ourselves): wait.
                        backoff.sleep_within(deadline).await;
                    }
                    last_error = format!("{} is not the leader", conn.addr);
                    self.forget(&conn, leader).await;
                }
                // Definite failures that a later attempt may not hit (a member stopping,
                // leadership not confirmable during an election): safe to retry.
                Ok(Code::Rejected) => {
                    last_error = resp.error;
                    self.forget(&conn, None).await;
                    backoff.sleep_within(deadline).await;
                }
                Err(_) => return Err(ClientError::BadRequest(format!("unknown response code {}", resp.code))),
            }
        }
        Err(ClientError::Unavailable(last_error))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;

    use super::*;

    const DEADLINE: Duration = Duration::from_secs(1);
    /// Scheduling slack on a busy machine.
    const SLACK: Duration = Duration::from_millis(500);

    /// Connections a fake member accepted, and how many of them the client has closed.
    #[derive(Default)]
    struct Seen {
        accepted: AtomicUsize,
        closed: AtomicUsize,
    }

    /// A member that answers queries with "q" and never answers a proposal (or, with
    /// `answer_queries` false, never answers anything). Returns its address.
    async fn member(answer_queries: bool) -> (String, Arc<Seen>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        let seen = Arc::new(Seen::default());
        let counts = seen.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                counts.accepted.fetch_add(1, Ordering::SeqCst);
                let counts = counts.clone();
                tokio::spawn(async move {
                    let (rd, mut wr) = stream.into_split();
                    let mut rd = BufReader::new(rd);
                    let mut buf = Vec::new();
                    if answer_queries {
                        while let Ok(req) = read_frame::<ClientRequest, _>(&mut rd, DEFAULT_MAX_FRAME, &mut buf).await {
                            if req.kind == RequestKind::Query as i32 {
                                let mut out = Vec::new();
                                let resp = ClientResponse { id: req.id, value: b"q".to_vec(), ..Default::default() };
                                encode_frame(&resp, &mut out);
                                let _ = wr.write_all(&out).await;
                            }
                        }
                    } else {
                        let mut sink = [0u8; 4096];
                        while rd.read(&mut sink).await.is_ok_and(|n| n > 0) {}
                    }
                    counts.closed.fetch_add(1, Ordering::SeqCst);
                });
            }
        });
        (addr, seen)
    }

    fn client(addr: &str) -> Client {
        let mut c = Client::new(vec![addr.to_string()]);
        c.deadline = DEADLINE;
        c
    }

    async fn wait_until(what: &str, cond: impl Fn() -> bool) {
        let give_up = Instant::now() + Duration::from_secs(5);
        while !cond() {
            assert!(Instant::now() < give_up, "timed out waiting until {what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn a_silent_member_leaves_proposals_unknown_and_queries_unavailable_by_the_deadline() {
        let (addr, seen) = member(false).await;
        let c = client(&addr);

        let start = Instant::now();
        let (a, b) = tokio::join!(c.propose(b"a".to_vec()), c.propose(b"b".to_vec()));
        let took = start.elapsed();
        // One times out and closes the connection; the other was on it.
        assert!([&a, &b].iter().any(|r| matches!(r, Err(ClientError::UnknownOutcome(e)) if e.contains("no answer"))));
        for r in [a, b] {
            assert!(matches!(&r, Err(ClientError::UnknownOutcome(_))), "{r:?}");
        }
        assert!(took >= DEADLINE - Duration::from_millis(50) && took < DEADLINE + SLACK, "took {took:?}");
        // The connection that went silent is closed, not kept for later calls.
        wait_until("the silent connection is closed", || seen.closed.load(Ordering::SeqCst) == 1).await;

        let start = Instant::now();
        let r = c.query(b"get".to_vec(), false).await;
        let took = start.elapsed();
        assert!(matches!(&r, Err(ClientError::Unavailable(e)) if e.contains("no answer")), "{r:?}");
        assert!(took < DEADLINE + SLACK, "took {took:?}");
        // Asked again on a new connection before giving up.
        assert!(seen.accepted.load(Ordering::SeqCst) >= 3, "{} connections", seen.accepted.load(Ordering::SeqCst));
    }

    #[tokio::test]
    async fn a_slow_answer_on_a_connection_that_answers_others_keeps_it() {
        let (addr, seen) = member(true).await;
        let c = Arc::new(client(&addr));
        let proposal = tokio::spawn({
            let c = c.clone();
            async move { c.propose(b"never answered".to_vec()).await }
        });
        // Queries keep being answered on the same connection meanwhile.
        while !proposal.is_finished() {
            assert_eq!(c.query(b"get".to_vec(), false).await, Ok(b"q".to_vec()));
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let r = proposal.await.expect("proposal task");
        assert!(matches!(r, Err(ClientError::UnknownOutcome(_))), "{r:?}");
        assert_eq!(c.query(b"get".to_vec(), false).await, Ok(b"q".to_vec()));
        assert_eq!(seen.accepted.load(Ordering::SeqCst), 1, "one connection throughout");
        assert_eq!(seen.closed.load(Ordering::SeqCst), 0);
    }

    fn request(id: u64) -> ClientRequest {
        ClientRequest { id, kind: RequestKind::Query as i32, payload: b"get".to_vec(), stale_ok: true }
    }

    /// A request and the end of its connection, in either order: the request never waits
    /// for an answer that cannot come.
    #[tokio::test]
    async fn a_request_never_waits_on_a_closed_connection() {
        let (addr, _) = member(false).await;
        let long = Duration::from_secs(30);

        // Registered, then the connection ends: the waiter wakes at once.
        let conn = Conn::open(&addr, DEFAULT_MAX_FRAME, CONNECT_TIMEOUT).await.expect("connect");
        let waiter = conn.register(1).expect("an open connection");
        conn.close();
        assert!(tokio::time::timeout(SLACK, waiter).await.expect("woken").is_err());

        // The connection ended first: nothing is registered or sent.
        let start = Instant::now();
        assert_eq!(conn.request(request(2), long).await.err(), Some(Lost::NotSent));
        assert!(start.elapsed() < SLACK);
        assert!(lock(&conn.inflight).waiting.is_empty());

        // The same when it is the member that hangs up and the reader that notices.
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                drop(stream);
            }
        });
        let conn = Conn::open(&addr, DEFAULT_MAX_FRAME, CONNECT_TIMEOUT).await.expect("connect");
        wait_until("the reader sees the connection end", || !conn.is_open()).await;
        let start = Instant::now();
        assert_eq!(conn.request(request(3), long).await.err(), Some(Lost::NotSent));
        assert!(start.elapsed() < SLACK);
    }
}
