//! Peer RPC: openraft's AppendEntries, Vote and InstallSnapshot over TCP.
//!
//! openraft drives each client with `&mut self`, so calls on a connection are strictly one
//! at a time: request frame, response frame. A client keeps its connection for its whole
//! life and re-dials after any failure. openraft 0.9 also makes a short-lived client for
//! every leadership check (each linearizable read round) and election, so connections are
//! returned to a per-member pool when a client is dropped: without it every read round
//! cost a TCP connect, a hello and an accept per follower.
//! The first frame proves membership when a cluster token is set, and names the cluster
//! and the members at both ends (see `identity`): a member of another cluster, or another
//! process at a member's address, is refused by whichever end notices first, and both log it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::error::{
    InstallSnapshotError, NetworkError, PayloadTooLarge, RPCError, RaftError, RemoteError, Timeout, Unreachable,
};
use openraft::network::{RPCOption, RPCTypes, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest,
    VoteResponse,
};
use serde::{de::DeserializeOwned, Serialize};
use tokio::io::BufStream;
use tokio::net::{TcpListener, TcpStream};

use crate::api::{MAX_BATCH_BYTES, MAX_BATCH_COMMANDS};
use crate::codec::{read_frame, read_frame_within, write_frame, FrameError, Timeouts};
use crate::identity::{Hello, Identity, IdentityError};
use crate::lease::Lease;
use crate::proto::{PeerHello, PeerKind, PeerRequest, PeerResponse};
use crate::store::Durable;
use crate::types::{Member, NodeId, Raft, TypeConfig, MAX_COMMAND_BYTES};

type RpcErr<E = openraft::error::Infallible> = RPCError<NodeId, Member, RaftError<NodeId, E>>;

/// Creates a [`PeerClient`] per target; openraft calls it for every replication stream,
/// leadership check and election.
#[derive(Clone)]
pub struct Network {
    id: NodeId,
    token: String,
    me: Arc<Identity>,
    idle: Pool,
    lease: Arc<Lease>,
    /// Bounds the commit index sent to followers (see `store::durable`).
    durable: Durable,
}

impl Network {
    pub fn new(me: Arc<Identity>, token: String, lease: Arc<Lease>, durable: Durable) -> Self {
        Network { id: me.node, token, me, idle: Pool::default(), lease, durable }
    }
}

/// Idle, hello'd connections by the member they were opened to: node id, member uid and
/// address. A hello proves the process at the far end is that member; keyed by address
/// alone, a connection to a removed member would be handed to whoever replaced it at the
/// same address (or a member that moved would get another's connection), skipping that
/// check.
type PoolKey = (NodeId, String, String);
type Pool = Arc<Mutex<HashMap<PoolKey, Vec<BufStream<TcpStream>>>>>;

/// Idle connections kept per peer: enough for the replication stream plus a few
/// concurrent leadership checks; more are closed.
const MAX_IDLE_PER_PEER: usize = 4;

/// Frame limits on the peer port. Before the hello is accepted the other side is a
/// stranger, so its frame must be tiny; after it, frames carry an AppendEntries of at most
/// [`APPEND_ENTRIES_MAX_BYTES`] or a 1 MiB snapshot chunk.
const HELLO_MAX_FRAME: usize = 64 * 1024;
const PEER_MAX_FRAME: usize = 256 * 1024 * 1024;
/// A stranger must prove membership at once; a member's connection may sit in the pool.
const HELLO_TIMEOUTS: Timeouts = Timeouts { idle: Duration::from_secs(5), body: Duration::from_secs(5) };
const PEER_TIMEOUTS: Timeouts = Timeouts { idle: Duration::from_secs(300), body: Duration::from_secs(60) };
/// Peer connections accepted at once: members keep a replication stream and a few pooled
/// connections each, so this is far above what a cluster uses.
pub const MAX_PEER_CONNECTIONS: usize = 256;

/// What one AppendEntries may carry. openraft sends up to `max_payload_entries` (64)
/// entries at once, and entries are batches of up to about 1 MiB plus one command, so
/// without a bound a follower that fell behind is sent more than the peer frame limit
/// and refuses it on every retry. A request over the budget is refused here, before it is
/// encoded, with `PayloadTooLarge`, whose entries hint makes openraft send fewer.
///
/// The bound is set by time: openraft gives an AppendEntries one heartbeat interval
/// (100 ms by default) and drops the call after it, and a frame cut off mid-write is lost.
/// On loopback on a busy two-core machine one 8 MiB entry took about 70 ms from encoding
/// to the follower's fsync; 24 MiB took 110-130 ms and mostly timed out, and 56 MiB never
/// arrived whole, so a lagging follower stayed behind for good. Over gigabit, 10 MiB is
/// about 90 ms of transfer. Every entry fits (`MAX_ENTRY_BYTES`), so none goes alone
/// over the budget.
const APPEND_ENTRIES_MAX_BYTES: u64 = 10 * 1024 * 1024;

/// Bytes a peer request adds around its payload: the frame length and the envelope's tags
/// and length varint.
const ENVELOPE_BYTES: u64 = 32;

/// The largest entry the batcher makes: it closes a batch once it holds `MAX_BATCH_BYTES`,
/// so the last command can take it over by up to `MAX_COMMAND_BYTES`; bincode adds a
/// length per command and a few dozen bytes per entry (membership entries are small).
const MAX_ENTRY_BYTES: u64 = (MAX_BATCH_BYTES + MAX_COMMAND_BYTES + 8 * MAX_BATCH_COMMANDS + 1024) as u64;
const _: () = assert!(MAX_ENTRY_BYTES + ENVELOPE_BYTES <= APPEND_ENTRIES_MAX_BYTES);
const _: () = assert!(APPEND_ENTRIES_MAX_BYTES <= PEER_MAX_FRAME as u64);

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = PeerClient;

    async fn new_client(&mut self, target: NodeId, node: &Member) -> PeerClient {
        PeerClient {
            id: self.id,
            target,
            addr: node.raft_addr.clone(),
            target_uid: node.uid.clone(),
            token: self.token.clone(),
            me: self.me.clone(),
            conn: None,
            reused: false,
            in_call: false,
            buf: Vec::new(),
            idle: self.idle.clone(),
            lease: self.lease.clone(),
            durable: self.durable.clone(),
        }
    }
}

pub struct PeerClient {
    id: NodeId,
    target: NodeId,
    addr: String,
    /// The target's member uid on record: the hello asks for that process and no other.
    target_uid: String,
    token: String,
    me: Arc<Identity>,
    conn: Option<BufStream<TcpStream>>,
    /// `conn` came from the pool or has carried a call: the peer may have closed it since.
    reused: bool,
    /// A request is written and its response not yet read. If the call's future is
    /// dropped (a timeout, a replication stream shut down) the connection is out of step
    /// and must never carry another call.
    in_call: bool,
    buf: Vec<u8>,
    idle: Pool,
    lease: Arc<Lease>,
    durable: Durable,
}

impl Drop for PeerClient {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take().filter(|_| !self.in_call) {
            let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
            let list = idle.entry(self.pool_key()).or_default();
            if list.len() < MAX_IDLE_PER_PEER {
                list.push(conn);
            }
        }
    }
}

/// Transport failures, mapped to what openraft should do about them.
#[derive(Debug, thiserror::Error)]
enum Transport {
    /// Cannot connect or was refused: openraft backs off before retrying.
    #[error("{0}")]
    Unreachable(String),
    /// The connection broke mid-call: retry at once on a new connection.
    #[error("{0}")]
    Broken(String),
    #[error("timed out")]
    Timeout,
}

impl PeerClient {
    fn pool_key(&self) -> PoolKey {
        (self.target, self.target_uid.clone(), self.addr.clone())
    }

    async fn connect(&mut self) -> Result<&mut BufStream<TcpStream>, Transport> {
        if self.conn.is_none() {
            let key = self.pool_key();
            let pooled = self.idle.lock().unwrap_or_else(|e| e.into_inner()).get_mut(&key).and_then(Vec::pop);
            self.reused = pooled.is_some();
            self.conn = pooled;
        }
        if self.conn.is_none() {
            let stream = TcpStream::connect(&self.addr)
                .await
                .map_err(|e| Transport::Unreachable(format!("connect {}: {e}", self.addr)))?;
            let _ = stream.set_nodelay(true);
            let mut stream = BufStream::new(stream);
            let hello =
                self.me.hello_to(self.target, &self.target_uid).map_err(|e| Transport::Unreachable(e.to_string()))?;
            let hello = PeerHello { token: self.token.clone(), ..to_proto(&hello) };
            let req =
                PeerRequest { kind: PeerKind::Hello as i32, payload: prost::Message::encode_to_vec(&hello).into() };
            write_frame(&mut stream, &req)
                .await
                .map_err(|e| Transport::Unreachable(format!("hello to {}: {e}", self.addr)))?;
            let resp: PeerResponse = read_frame(&mut stream, HELLO_MAX_FRAME, &mut self.buf)
                .await
                .map_err(|e| Transport::Unreachable(format!("hello to {}: {e}", self.addr)))?;
            let answer = if resp.refused.is_empty() {
                <PeerHello as prost::Message>::decode(resp.payload.as_slice())
                    .map_err(|e| format!("malformed answer to our hello: {e}"))
                    .and_then(|h| {
                        self.me.admit(&from_proto(&h), Some((self.target, &self.target_uid))).map_err(|e| e.to_string())
                    })
                    .map_err(|why| format!("refused {} at {}: {why}", self.target, self.addr))
            } else {
                Err(format!("node {} at {} refused us: {}", self.target, self.addr, resp.refused))
            };
            if let Err(why) = answer {
                if REFUSED_BY_PEERS.ready() {
                    tracing::warn!(target = self.target, addr = %self.addr, %why,
                        "peer connection refused (further refusals for 10 s are not logged)");
                }
                return Err(Transport::Unreachable(why));
            }
            self.conn = Some(stream);
            self.reused = false;
        }
        self.conn.as_mut().ok_or_else(|| Transport::Unreachable("no connection".into()))
    }

    async fn roundtrip(&mut self, kind: PeerKind, payload: bytes::Bytes) -> Result<Vec<u8>, Transport> {
        let max = PEER_MAX_FRAME;
        let mut buf = std::mem::take(&mut self.buf);
        let res = async {
            // The previous call's future was dropped (openraft's own timeout) between its
            // request and its response: that response would be read as this call's.
            if std::mem::replace(&mut self.in_call, true) {
                self.conn = None;
            }
            let conn = self.connect().await?;
            let req = PeerRequest { kind: kind as i32, payload };
            write_frame(conn, &req).await.map_err(|e| Transport::Broken(e.to_string()))?;
            let resp: PeerResponse =
                read_frame(conn, max, &mut buf).await.map_err(|e| Transport::Broken(e.to_string()))?;
            self.in_call = false;
            if resp.refused.is_empty() {
                // From now on a break is worth one retry on a fresh connection.
                self.reused = true;
                Ok(resp.payload)
            } else {
                Err(Transport::Unreachable(resp.refused))
            }
        }
        .await;
        self.buf = buf;
        res
    }

    async fn call<Req, Resp, E>(
        &mut self,
        kind: PeerKind,
        action: RPCTypes,
        req: &Req,
        ttl: Duration,
    ) -> Result<Resp, RpcErr<E>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let payload = bincode::serialize(req).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        if payload.len() as u64 + ENVELOPE_BYTES > PEER_MAX_FRAME as u64 {
            // The peer would drop the connection on it (and past 4 GiB its length would
            // wrap): never sent. Cannot happen while entries respect the command cap.
            let e = Transport::Unreachable(format!(
                "a {action:?} request of {} bytes exceeds the peer frame limit of {PEER_MAX_FRAME} bytes",
                payload.len()
            ));
            tracing::error!(target = self.target, error = %e, "request not sent");
            return Err(RPCError::Unreachable(Unreachable::new(&e)));
        }
        let payload = bytes::Bytes::from(payload);
        let res = tokio::time::timeout(ttl, async {
            match self.roundtrip(kind, payload.clone()).await {
                // A connection that sat idle may have been closed by the peer (say, it
                // restarted): once more on a fresh one. Every peer RPC may be repeated.
                Err(Transport::Broken(_)) if self.reused => {
                    self.conn = None;
                    self.roundtrip(kind, payload).await
                }
                other => other,
            }
        })
        .await
        .unwrap_or(Err(Transport::Timeout));
        let bytes = match res {
            Ok(b) => b,
            Err(e) => {
                // Whatever state the stream is in, it is no longer in step with the peer.
                self.conn = None;
                return Err(match e {
                    Transport::Unreachable(_) => RPCError::Unreachable(Unreachable::new(&e)),
                    Transport::Broken(_) => RPCError::Network(NetworkError::new(&e)),
                    Transport::Timeout => {
                        RPCError::Timeout(Timeout { action, id: self.id, target: self.target, timeout: ttl })
                    }
                });
            }
        };
        let resp: Result<Resp, RaftError<NodeId, E>> = bincode::deserialize(&bytes).map_err(|e| {
            self.conn = None;
            RPCError::Network(NetworkError::new(&e))
        })?;
        resp.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

impl RaftNetwork<TypeConfig> for PeerClient {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RpcErr> {
        // openraft may count this leader's own entries committed before they are on its
        // disk; followers must not hear of a commit before they are.
        let mut rpc = rpc;
        rpc.leader_commit = self.durable.clamp(rpc.leader_commit);
        if let Some(fit) = entries_that_fit(&rpc, APPEND_ENTRIES_MAX_BYTES) {
            tracing::debug!(target = self.target, entries = rpc.entries.len(), fit, "AppendEntries over budget");
            return Err(RPCError::PayloadTooLarge(PayloadTooLarge::new_entries_hint(fit)));
        }
        let sent = std::time::Instant::now();
        let res = self.call(PeerKind::AppendEntries, RPCTypes::AppendEntries, &rpc, option.hard_ttl()).await;
        // Anything but HigherVote means the follower accepted this leadership (a conflict
        // is about the log, not the vote) and now refuses other candidates for a while.
        if rpc.vote.is_committed() && matches!(&res, Ok(r) if !matches!(r, AppendEntriesResponse::HigherVote(_))) {
            self.lease.acked(rpc.vote.leader_id(), self.target, sent);
        }
        res
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<InstallSnapshotResponse<NodeId>, RpcErr<InstallSnapshotError>> {
        self.call(PeerKind::InstallSnapshot, RPCTypes::InstallSnapshot, &rpc, option.hard_ttl()).await
    }

    async fn vote(&mut self, rpc: VoteRequest<NodeId>, option: RPCOption) -> Result<VoteResponse<NodeId>, RpcErr> {
        self.call(PeerKind::Vote, RPCTypes::Vote, &rpc, option.hard_ttl()).await
    }
}

/// `Some(n)` when `rpc` would be more than `budget` bytes on the wire and only its first
/// `n` entries should go; at least one, since a lone entry is sent whatever its size (up
/// to the peer frame limit, which `call` enforces). bincode counts sizes exactly without
/// encoding anything, in one pass over the commands (a second only when over).
fn entries_that_fit(rpc: &AppendEntriesRequest<TypeConfig>, budget: u64) -> Option<u64> {
    if rpc.entries.len() <= 1 {
        return None;
    }
    let total = bincode::serialized_size(rpc).unwrap_or(u64::MAX).saturating_add(ENVELOPE_BYTES);
    if total <= budget {
        return None;
    }
    let sizes: Vec<u64> = rpc.entries.iter().map(|e| bincode::serialized_size(e).unwrap_or(u64::MAX)).collect();
    let header = total.saturating_sub(sizes.iter().fold(0u64, |sum, s| sum.saturating_add(*s)));
    let fit = prefix_within(header, &sizes, budget).max(1);
    (fit < sizes.len()).then_some(fit as u64)
}

/// How many of the leading items of `sizes` fit in `budget` together with `header`.
fn prefix_within(header: u64, sizes: &[u64], budget: u64) -> usize {
    let mut used = header;
    sizes
        .iter()
        .take_while(|&&s| {
            used = used.saturating_add(s);
            used <= budget
        })
        .count()
}

/// Accept peer connections until the listener is dropped with the task.
pub async fn serve(listener: TcpListener, raft: Raft, token: String, lease: Arc<Lease>, me: Arc<Identity>) {
    accept_loop(listener, "raft", MAX_PEER_CONNECTIONS, move |stream| {
        let raft = raft.clone();
        let token = token.clone();
        let lease = lease.clone();
        let me = me.clone();
        async move {
            if let Err(e) = serve_conn(stream, &raft, &token, &lease, &me).await {
                tracing::debug!(error = %e, "peer connection closed");
            }
        }
    })
    .await;
}

/// Accept connections for ever, each served by its own task, at most `max` at once: a
/// connection over the limit is closed as soon as it is accepted (rather than left in the
/// kernel's backlog, where it would hold a slot of its own), and the port keeps serving
/// those it has. A failed accept (out of file descriptors, say) is logged and retried
/// after a pause rather than ending the server.
pub async fn accept_loop<F, Fut>(listener: TcpListener, what: &'static str, max: usize, serve: F)
where
    F: Fn(TcpStream) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let slots = Arc::new(tokio::sync::Semaphore::new(max));
    let refusals = Every::new(Duration::from_secs(10));
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let Ok(slot) = slots.clone().try_acquire_owned() else {
                    if refusals.ready() {
                        tracing::warn!(what, %peer, max, "connection limit reached; closing new connections");
                    }
                    drop(stream);
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let conn = serve(stream);
                tokio::spawn(async move {
                    conn.await;
                    drop(slot);
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, what, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Lets a log line through at most once per period: what strangers cause must not flood
/// the member's log.
pub(crate) struct Every {
    period: Duration,
    last: Mutex<Option<std::time::Instant>>,
}

impl Every {
    pub(crate) fn new(period: Duration) -> Self {
        Every { period, last: Mutex::new(None) }
    }

    pub(crate) fn ready(&self) -> bool {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        let now = std::time::Instant::now();
        if last.is_some_and(|t| now.duration_since(t) < self.period) {
            return false;
        }
        *last = Some(now);
        true
    }
}

/// Compares secrets in time that does not depend on where they first differ.
pub fn same_secret(a: &[u8], b: &[u8]) -> bool {
    let mut diff = a.len() ^ b.len();
    for (i, x) in a.iter().enumerate() {
        diff |= usize::from(x ^ b.get(i).copied().unwrap_or(!x));
    }
    diff == 0
}

static REFUSED_PEERS: std::sync::LazyLock<Every> = std::sync::LazyLock::new(|| Every::new(Duration::from_secs(10)));
static REFUSED_BY_PEERS: std::sync::LazyLock<Every> = std::sync::LazyLock::new(|| Every::new(Duration::from_secs(10)));

fn to_proto(h: &Hello) -> PeerHello {
    PeerHello {
        token: String::new(),
        from: h.from,
        version: h.version,
        cluster_id: h.cluster_id.clone(),
        from_uid: h.from_uid.clone(),
        to: h.to,
        to_uid: h.to_uid.clone(),
    }
}

fn from_proto(h: &PeerHello) -> Hello {
    Hello {
        version: h.version,
        cluster_id: h.cluster_id.clone(),
        from: h.from,
        from_uid: h.from_uid.clone(),
        to: h.to,
        to_uid: h.to_uid.clone(),
    }
}

/// Why a peer's first frame is refused (sent back to it as text, and logged).
#[derive(Debug, thiserror::Error)]
enum HelloRefused {
    #[error("expected a hello frame first")]
    NotAHello,
    #[error("malformed hello: {0}")]
    Malformed(#[from] prost::DecodeError),
    #[error("wrong cluster token")]
    Token,
    #[error(transparent)]
    Identity(#[from] IdentityError),
}

/// The answer to a peer's hello: ours, addressed to it, or why it is refused.
fn answer_hello(req: &PeerRequest, token: &str, me: &Identity) -> Result<PeerHello, HelloRefused> {
    if req.kind != PeerKind::Hello as i32 {
        return Err(HelloRefused::NotAHello);
    }
    let hello = <PeerHello as prost::Message>::decode(req.payload.as_ref())?;
    if !same_secret(hello.token.as_bytes(), token.as_bytes()) {
        return Err(HelloRefused::Token);
    }
    let theirs = from_proto(&hello);
    me.admit(&theirs, None)?;
    Ok(to_proto(&me.hello_to(theirs.from, &theirs.from_uid)?))
}

async fn serve_conn(
    stream: TcpStream,
    raft: &Raft,
    token: &str,
    lease: &Lease,
    me: &Identity,
) -> Result<(), FrameError> {
    let peer = stream.peer_addr().ok();
    let mut stream = BufStream::new(stream);
    let mut buf = Vec::new();
    let hello: PeerRequest = read_frame_within(&mut stream, HELLO_MAX_FRAME, &mut buf, HELLO_TIMEOUTS).await?;
    let ours = match answer_hello(&hello, token, me) {
        Ok(ours) => ours,
        Err(refused) => {
            if REFUSED_PEERS.ready() {
                tracing::warn!(%refused, ?peer, "refused a peer connection (further refusals for 10 s are not logged)");
            }
            write_frame(&mut stream, &PeerResponse { payload: Vec::new(), refused: refused.to_string() }).await?;
            return Ok(());
        }
    };
    write_frame(&mut stream, &PeerResponse { payload: prost::Message::encode_to_vec(&ours), refused: String::new() })
        .await?;
    loop {
        let req: PeerRequest = read_frame_within(&mut stream, PEER_MAX_FRAME, &mut buf, PEER_TIMEOUTS).await?;
        let resp = match dispatch(raft, lease, &req).await {
            Ok(payload) => PeerResponse { payload, refused: String::new() },
            Err(why) => PeerResponse { payload: Vec::new(), refused: why },
        };
        write_frame(&mut stream, &resp).await?;
    }
}

fn decode<T: DeserializeOwned>(payload: &[u8]) -> Result<T, String> {
    bincode::deserialize(payload).map_err(|e| format!("malformed request: {e}"))
}

fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>, String> {
    bincode::serialize(v).map_err(|e| format!("cannot encode response: {e}"))
}

async fn dispatch(raft: &Raft, lease: &Lease, req: &PeerRequest) -> Result<Vec<u8>, String> {
    // Another member campaigning or leading: this member's lease, if it holds one, must
    // not be relied on from now on (see `lease`). Revoked before openraft sees the request.
    lease.revoke();
    if req.kind == PeerKind::Vote as i32 && !lease.may_vote() {
        return Err("started moments ago: not voting until promises made before a restart expire".into());
    }
    match PeerKind::try_from(req.kind) {
        Ok(PeerKind::AppendEntries) => encode(&raft.append_entries(decode(&req.payload)?).await),
        Ok(PeerKind::Vote) => encode(&raft.vote(decode(&req.payload)?).await),
        Ok(PeerKind::InstallSnapshot) => encode(&raft.install_snapshot(decode(&req.payload)?).await),
        Ok(PeerKind::Hello) | Err(_) => Err(format!("unexpected request kind {}", req.kind)),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use openraft::Vote;

    use super::*;

    /// A peer that answers hellos and votes, except that it answers the first request on
    /// its first connection only after `LATE`, when the caller has given up on it. Returns
    /// its address and its count of connections.
    async fn peer() -> (String, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let first_conn = count.fetch_add(1, Ordering::SeqCst) == 0;
                tokio::spawn(async move {
                    let mut stream = BufStream::new(stream);
                    let mut buf = Vec::new();
                    let hello: PeerRequest = read_frame(&mut stream, HELLO_MAX_FRAME, &mut buf).await?;
                    let ours = match answer_hello(&hello, "", &identity(2)) {
                        Ok(ours) => ours,
                        Err(refused) => {
                            let refused = refused.to_string();
                            return write_frame(&mut stream, &PeerResponse { payload: Vec::new(), refused }).await;
                        }
                    };
                    let payload = prost::Message::encode_to_vec(&ours);
                    write_frame(&mut stream, &PeerResponse { payload, refused: String::new() }).await?;
                    let mut first_req = true;
                    loop {
                        let req: PeerRequest = read_frame(&mut stream, PEER_MAX_FRAME, &mut buf).await?;
                        if std::mem::take(&mut first_req) && first_conn {
                            // Whoever reads this answer next on this connection takes it
                            // for the answer to its own request.
                            tokio::time::sleep(LATE).await;
                        }
                        let vote: VoteRequest<NodeId> = bincode::deserialize(&req.payload).expect("a vote request");
                        let answer: Result<VoteResponse<NodeId>, RaftError<NodeId>> =
                            Ok(VoteResponse::new(vote.vote, None, true));
                        let payload = bincode::serialize(&answer).expect("encode");
                        write_frame(&mut stream, &PeerResponse { payload, refused: String::new() }).await?;
                    }
                    #[allow(unreachable_code)]
                    Ok::<(), FrameError>(())
                });
            }
        });
        (addr, accepted)
    }

    const LATE: Duration = Duration::from_millis(400);
    const GIVE_UP: Duration = Duration::from_millis(200);
    const CLUSTER: &str = "0123456789abcdef0123456789abcdef";

    fn identity(node: NodeId) -> Identity {
        Identity::new(node, format!("{node:032x}"), Some(CLUSTER.into()))
    }

    fn vote(term: u64) -> VoteRequest<NodeId> {
        VoteRequest::new(Vote::new(term, 1), None)
    }

    fn hello_request(from: &Identity, to: &Identity, token: &str) -> PeerRequest {
        let hello = PeerHello { token: token.into(), ..to_proto(&from.hello_to(to.node, &to.uid).expect("admitted")) };
        PeerRequest { kind: PeerKind::Hello as i32, payload: prost::Message::encode_to_vec(&hello).into() }
    }

    #[test]
    fn a_hello_is_answered_only_for_our_cluster_member_and_token() {
        let (one, two) = (identity(1), identity(2));
        let answer = answer_hello(&hello_request(&one, &two, "t"), "t", &two).expect("accepted");
        assert_eq!((answer.from, answer.to, answer.token.as_str()), (2, 1, ""), "addressed back, no token");
        assert_eq!(one.admit(&from_proto(&answer), Some((2, &two.uid))), Ok(()));

        let refused = |req: &PeerRequest, me: &Identity| answer_hello(req, "t", me).expect_err("refused").to_string();
        assert!(refused(&hello_request(&one, &two, "x"), &two).contains("token"));
        let impostor = Identity::new(2, two.uid.clone(), Some(crate::identity::random_id()));
        assert!(refused(&hello_request(&one, &two, "t"), &impostor).contains("cluster id mismatch"));
        let other = identity(3);
        assert!(refused(&hello_request(&one, &two, "t"), &other).contains("wrong member"));
        let vote = PeerRequest { kind: PeerKind::Vote as i32, payload: Default::default() };
        assert!(refused(&vote, &two).contains("hello frame first"));
    }

    #[tokio::test]
    async fn a_connection_cut_off_mid_call_is_never_reused_and_a_healthy_one_is() {
        let (addr, accepted) = peer().await;
        let lease = Arc::new(Lease::new(Duration::from_secs(1), Duration::ZERO));
        let mut network = Network::new(Arc::new(identity(1)), String::new(), lease, Durable::new(None));
        let member = Member { raft_addr: addr, uid: identity(2).uid, ..Default::default() };
        let option = RPCOption::new(Duration::from_secs(5));

        // The caller gives up while the response is outstanding (openraft drops the
        // future); the client, dropped afterwards, must not pool that connection.
        let mut client = network.new_client(2, &member).await;
        let gave_up = tokio::time::timeout(GIVE_UP, client.vote(vote(1), option.clone())).await;
        assert!(gave_up.is_err(), "the peer was told to answer late");
        drop(client);

        // A fresh connection, and the answer to this very request (term 2), not a stale one.
        let mut client = network.new_client(2, &member).await;
        let resp = client.vote(vote(2), option.clone()).await.expect("vote on a new connection");
        assert_eq!(resp.vote, Vote::new(2, 1));
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
        drop(client);

        // That connection was in step when its client went away: the next client reuses it.
        let mut client = network.new_client(2, &member).await;
        let resp = client.vote(vote(3), option).await.expect("vote on the pooled connection");
        assert_eq!(resp.vote, Vote::new(3, 1));
        assert_eq!(accepted.load(Ordering::SeqCst), 2, "no new connection for a pooled one");
    }

    /// A member replaced at the same address (another uid) must get its own hello: a
    /// connection pooled for the old member proves nothing about the new one.
    #[tokio::test]
    async fn a_pooled_connection_is_never_lent_to_another_member_at_the_same_address() {
        let (addr, accepted) = peer().await;
        let lease = Arc::new(Lease::new(Duration::from_secs(1), Duration::ZERO));
        let mut network = Network::new(Arc::new(identity(1)), String::new(), lease, Durable::new(None));
        let option = RPCOption::new(Duration::from_secs(5));
        let old = Member { raft_addr: addr.clone(), uid: identity(2).uid, ..Default::default() };
        // The peer's first request on its first connection is answered late: spend it.
        let mut client = network.new_client(2, &old).await;
        let _ = tokio::time::timeout(GIVE_UP, client.vote(vote(1), option.clone())).await;
        drop(client);
        let mut client = network.new_client(2, &old).await;
        client.vote(vote(2), option.clone()).await.expect("vote to the member on record");
        drop(client);
        assert_eq!(accepted.load(Ordering::SeqCst), 2);

        // The process at that address is still the old member: asked for another uid, it
        // is refused on a new connection rather than reached through the pooled one.
        let replaced = Member { raft_addr: addr, uid: "f".repeat(32), ..Default::default() };
        let mut client = network.new_client(2, &replaced).await;
        let err = client.vote(vote(3), option).await.expect_err("the old member is not the new one");
        assert!(err.to_string().contains("refused"), "{err}");
        assert_eq!(accepted.load(Ordering::SeqCst), 3, "a new connection and hello for the new member");
    }

    /// openraft times out a call by dropping its future (before our own timeout of the same
    /// length fires) and goes on with the same client, as a replication stream does: the
    /// next call must not read the answer the dropped one left on the connection.
    #[tokio::test]
    async fn a_call_dropped_mid_flight_leaves_no_answer_for_the_next_call() {
        let (addr, accepted) = peer().await;
        let lease = Arc::new(Lease::new(Duration::from_secs(1), Duration::ZERO));
        let mut network = Network::new(Arc::new(identity(1)), String::new(), lease, Durable::new(None));
        let member = Member { raft_addr: addr, ..Default::default() };
        let option = RPCOption::new(Duration::from_secs(5));

        let mut client = network.new_client(2, &member).await;
        let gave_up = tokio::time::timeout(GIVE_UP, client.vote(vote(1), option.clone())).await;
        assert!(gave_up.is_err(), "the peer was told to answer late");
        let resp = client.vote(vote(2), option).await.expect("vote after a dropped call");
        assert_eq!(resp.vote, Vote::new(2, 1), "the answer to the dropped call");
        assert_eq!(accepted.load(Ordering::SeqCst), 2, "a fresh connection after the dropped call");
    }

    fn append(sizes: &[usize]) -> AppendEntriesRequest<TypeConfig> {
        let leader = openraft::CommittedLeaderId::new(1, 1);
        let entries = sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| crate::types::Entry {
                log_id: openraft::LogId::new(leader, i as u64 + 1),
                payload: openraft::EntryPayload::Normal(crate::types::Request::commands(vec![vec![7; n]; 3])),
            })
            .collect();
        AppendEntriesRequest {
            vote: Vote::new_committed(1, 1),
            prev_log_id: None,
            entries,
            leader_commit: Some(openraft::LogId::new(leader, 1)),
        }
    }

    /// The frame this request becomes on the wire.
    fn frame_len(rpc: &AppendEntriesRequest<TypeConfig>) -> u64 {
        let payload = bincode::serialize(rpc).expect("encode").into();
        let mut out = Vec::new();
        crate::codec::encode_frame(&PeerRequest { kind: PeerKind::AppendEntries as i32, payload }, &mut out);
        out.len() as u64
    }

    #[test]
    fn append_entries_over_the_budget_are_cut_to_a_prefix_that_fits() {
        const KIB: usize = 1024;
        // Each entry carries three commands of the given size.
        let budget = 1024 * KIB as u64;
        assert_eq!(entries_that_fit(&append(&[]), budget), None, "a heartbeat");
        assert_eq!(entries_that_fit(&append(&[10 * KIB; 30]), budget), None, "900 KiB in all");

        for sizes in [vec![100 * KIB; 8], vec![10 * KIB, 300 * KIB, 20 * KIB, 50 * KIB, 1], vec![333 * KIB; 2]] {
            let mut rpc = append(&sizes);
            assert!(frame_len(&rpc) > budget);
            let fit = entries_that_fit(&rpc, budget).expect("over the budget") as usize;
            assert!(fit >= 1 && fit < sizes.len(), "{fit} of {}", sizes.len());
            // The hint is the longest prefix whose frame is within the budget.
            rpc.entries.truncate(fit + 1);
            assert!(frame_len(&rpc) > budget, "{} entries would have fit", fit + 1);
            rpc.entries.truncate(fit);
            assert!(frame_len(&rpc) <= budget, "{fit} entries make a frame of {}", frame_len(&rpc));
            assert_eq!(entries_that_fit(&rpc, budget), None);
        }

        // An entry over the budget on its own goes alone: a hint of 1, then sent as it is,
        // never a hint of 0 or a refusal openraft would retry for ever.
        assert_eq!(entries_that_fit(&append(&[400 * KIB, 1]), budget), Some(1));
        assert_eq!(entries_that_fit(&append(&[400 * KIB]), budget), None);
    }
}
