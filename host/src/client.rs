//! Client library for the binary protocol: used by `kv`, the tests, the text protocol's
//! forwarding and the load generator.
//!
//! One connection at a time, shared by concurrent callers (requests are pipelined and
//! matched by id). The client starts with the leader it last heard of, tries the next
//! address when a member does not answer, and follows `NotLeader` redirects. A proposal
//! whose connection broke after it was sent is reported as [`ClientError::UnknownOutcome`],
//! never retried: it may have been applied.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};

use crate::api::Outcome;
use crate::codec::{encode_frame, read_frame, DEFAULT_MAX_FRAME};
use crate::proto::{ClientRequest, ClientResponse, Code, RequestKind};
use crate::types::MAX_COMMAND_BYTES;

/// What a request adds to its payload on the wire: the frame length, id, kind and flag.
const REQUEST_OVERHEAD: usize = 32;

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
    /// No member could be reached (or none led) before the deadline; nothing was sent.
    #[error("cluster unavailable: {0}")]
    Unavailable(String),
    #[error("bad request: {0}")]
    BadRequest(String),
}

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<ClientResponse>>>>;

struct Conn {
    addr: String,
    tx: mpsc::UnboundedSender<ClientRequest>,
    pending: Pending,
    alive: Arc<AtomicBool>,
}

/// Why a request on a connection got no answer.
enum Lost {
    /// It never left: safe to retry anywhere.
    NotSent,
    /// It was sent; the connection died before the answer.
    Sent,
}

impl Conn {
    async fn open(addr: &str, max_frame: usize) -> std::io::Result<Conn> {
        let stream = tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(addr))
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))??;
        let _ = stream.set_nodelay(true);
        let (rd, mut wr) = stream.into_split();
        let (tx, mut rx) = mpsc::unbounded_channel::<ClientRequest>();
        let pending: Pending = Arc::default();
        let alive = Arc::new(AtomicBool::new(true));
        {
            let alive = alive.clone();
            tokio::spawn(async move {
                let mut out = Vec::new();
                while let Some(req) = rx.recv().await {
                    out.clear();
                    encode_frame(&req, &mut out);
                    while let Ok(more) = rx.try_recv() {
                        encode_frame(&more, &mut out);
                    }
                    if wr.write_all(&out).await.is_err() {
                        break;
                    }
                }
                alive.store(false, Ordering::SeqCst);
            });
        }
        {
            let pending = pending.clone();
            let alive = alive.clone();
            tokio::spawn(async move {
                let mut rd = BufReader::new(rd);
                let mut buf = Vec::new();
                while let Ok(resp) = read_frame::<ClientResponse, _>(&mut rd, max_frame, &mut buf).await {
                    let waiter = pending.lock().unwrap_or_else(|p| p.into_inner()).remove(&resp.id);
                    if let Some(w) = waiter {
                        let _ = w.send(resp);
                    }
                }
                alive.store(false, Ordering::SeqCst);
                // Dropping the senders wakes every waiter with "connection lost".
                pending.lock().unwrap_or_else(|p| p.into_inner()).clear();
            });
        }
        Ok(Conn { addr: addr.to_string(), tx, pending, alive })
    }

    async fn request(&self, req: ClientRequest) -> Result<ClientResponse, Lost> {
        if !self.alive.load(Ordering::SeqCst) {
            return Err(Lost::NotSent);
        }
        let (tx, rx) = oneshot::channel();
        let id = req.id;
        self.pending.lock().unwrap_or_else(|p| p.into_inner()).insert(id, tx);
        if self.tx.send(req).is_err() {
            self.pending.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
            return Err(Lost::NotSent);
        }
        rx.await.map_err(|_| Lost::Sent)
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

    async fn connection(&self) -> Result<Arc<Conn>, String> {
        let mut st = self.state.lock().await;
        if let Some(c) = &st.conn {
            if c.alive.load(Ordering::SeqCst) {
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
            st.next = (st.next + 1) % self.addrs.len().max(1);
            match Conn::open(&addr, self.max_frame).await {
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
        let start = Instant::now();
        let mut backoff = Duration::from_millis(20);
        let mut last_error = String::from("no member answered");
        while start.elapsed() < self.deadline {
            let conn = match self.connection().await {
                Ok(c) => c,
                Err(e) => {
                    last_error = e;
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_millis(500));
                    continue;
                }
            };
            let req = ClientRequest {
                id: self.next_id.fetch_add(1, Ordering::Relaxed),
                kind: kind as i32,
                payload: payload.clone(),
                stale_ok,
            };
            let resp = match conn.request(req).await {
                Ok(r) => r,
                Err(lost) => {
                    self.forget(&conn, None).await;
                    if matches!(lost, Lost::Sent) && kind == RequestKind::Propose {
                        return Err(ClientError::UnknownOutcome(format!(
                            "connection to {} lost after sending",
                            conn.addr
                        )));
                    }
                    last_error = format!("connection to {} lost", conn.addr);
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
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_millis(500));
                    }
                    last_error = format!("{} is not the leader", conn.addr);
                    self.forget(&conn, leader).await;
                }
                // Definite failures that a later attempt may not hit (a member stopping,
                // leadership not confirmable during an election): safe to retry.
                Ok(Code::Rejected) => {
                    last_error = resp.error;
                    self.forget(&conn, None).await;
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_millis(500));
                }
                Err(_) => return Err(ClientError::BadRequest(format!("unknown response code {}", resp.code))),
            }
        }
        Err(ClientError::Unavailable(last_error))
    }
}
