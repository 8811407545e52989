//! Peer RPC: openraft's AppendEntries, Vote and InstallSnapshot over TCP.
//!
//! One connection per (local replication stream, target), reused for every call and
//! re-dialled after any failure. openraft drives each stream with `&mut self`, so calls on a
//! connection are strictly one at a time: request frame, response frame.
//! The first frame proves membership when a cluster token is set.

use std::time::Duration;

use openraft::error::{InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Timeout, Unreachable};
use openraft::network::{RPCOption, RPCTypes, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest,
    VoteResponse,
};
use serde::{de::DeserializeOwned, Serialize};
use tokio::io::BufStream;
use tokio::net::{TcpListener, TcpStream};

use crate::codec::{read_frame, write_frame, FrameError};
use crate::proto::{PeerHello, PeerKind, PeerRequest, PeerResponse};
use crate::types::{Member, NodeId, Raft, TypeConfig};

type RpcErr<E = openraft::error::Infallible> = RPCError<NodeId, Member, RaftError<NodeId, E>>;

/// Creates a [`PeerClient`] per target; openraft calls it for every replication stream.
#[derive(Clone)]
pub struct Network {
    pub id: NodeId,
    pub token: String,
}

/// Frame limits on the peer port. Before the hello is accepted the other side is a
/// stranger, so its frame must be tiny; after it, frames carry up to `max_payload_entries`
/// batches of about 1 MiB each, or a 1 MiB snapshot chunk.
const HELLO_MAX_FRAME: usize = 64 * 1024;
const PEER_MAX_FRAME: usize = 256 * 1024 * 1024;

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = PeerClient;

    async fn new_client(&mut self, target: NodeId, node: &Member) -> PeerClient {
        PeerClient {
            id: self.id,
            target,
            addr: node.raft_addr.clone(),
            token: self.token.clone(),
            conn: None,
            buf: Vec::new(),
        }
    }
}

pub struct PeerClient {
    id: NodeId,
    target: NodeId,
    addr: String,
    token: String,
    conn: Option<BufStream<TcpStream>>,
    buf: Vec<u8>,
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
    async fn connect(&mut self) -> Result<&mut BufStream<TcpStream>, Transport> {
        if self.conn.is_none() {
            let stream = TcpStream::connect(&self.addr)
                .await
                .map_err(|e| Transport::Unreachable(format!("connect {}: {e}", self.addr)))?;
            let _ = stream.set_nodelay(true);
            let mut stream = BufStream::new(stream);
            let hello = PeerHello { token: self.token.clone(), from: self.id };
            let req = PeerRequest { kind: PeerKind::Hello as i32, payload: prost::Message::encode_to_vec(&hello) };
            write_frame(&mut stream, &req)
                .await
                .map_err(|e| Transport::Unreachable(format!("hello to {}: {e}", self.addr)))?;
            let resp: PeerResponse = read_frame(&mut stream, HELLO_MAX_FRAME, &mut self.buf)
                .await
                .map_err(|e| Transport::Unreachable(format!("hello to {}: {e}", self.addr)))?;
            if !resp.refused.is_empty() {
                return Err(Transport::Unreachable(format!("{} refused us: {}", self.addr, resp.refused)));
            }
            self.conn = Some(stream);
        }
        self.conn.as_mut().ok_or_else(|| Transport::Unreachable("no connection".into()))
    }

    async fn roundtrip(&mut self, kind: PeerKind, payload: Vec<u8>) -> Result<Vec<u8>, Transport> {
        let max = PEER_MAX_FRAME;
        let mut buf = std::mem::take(&mut self.buf);
        let res = async {
            let conn = self.connect().await?;
            let req = PeerRequest { kind: kind as i32, payload };
            write_frame(conn, &req).await.map_err(|e| Transport::Broken(e.to_string()))?;
            let resp: PeerResponse =
                read_frame(conn, max, &mut buf).await.map_err(|e| Transport::Broken(e.to_string()))?;
            if resp.refused.is_empty() {
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
        let res = match tokio::time::timeout(ttl, self.roundtrip(kind, payload)).await {
            Ok(r) => r,
            Err(_) => Err(Transport::Timeout),
        };
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
        self.call(PeerKind::AppendEntries, RPCTypes::AppendEntries, &rpc, option.hard_ttl()).await
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

/// Accept peer connections until the listener is dropped with the task.
pub async fn serve(listener: TcpListener, raft: Raft, token: String) {
    accept_loop(listener, "raft", move |stream| {
        let raft = raft.clone();
        let token = token.clone();
        async move {
            if let Err(e) = serve_conn(stream, &raft, &token).await {
                tracing::debug!(error = %e, "peer connection closed");
            }
        }
    })
    .await;
}

/// Accept connections for ever, each served by its own task. A failed accept (out of
/// file descriptors, say) is logged and retried after a pause rather than ending the
/// server.
pub(crate) async fn accept_loop<F, Fut>(listener: TcpListener, what: &'static str, serve: F)
where
    F: Fn(TcpStream) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let _ = stream.set_nodelay(true);
                tokio::spawn(serve(stream));
            }
            Err(e) => {
                tracing::warn!(error = %e, what, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn serve_conn(stream: TcpStream, raft: &Raft, token: &str) -> Result<(), FrameError> {
    let mut stream = BufStream::new(stream);
    let mut buf = Vec::new();
    let hello: PeerRequest = read_frame(&mut stream, HELLO_MAX_FRAME, &mut buf).await?;
    let ok = hello.kind == PeerKind::Hello as i32
        && <PeerHello as prost::Message>::decode(hello.payload.as_slice()).is_ok_and(|h| h.token == token);
    if !ok {
        let refused =
            if hello.kind == PeerKind::Hello as i32 { "wrong cluster token" } else { "expected a hello frame first" };
        tracing::warn!(refused, "refused a peer connection");
        write_frame(&mut stream, &PeerResponse { payload: Vec::new(), refused: refused.into() }).await?;
        return Ok(());
    }
    write_frame(&mut stream, &PeerResponse::default()).await?;
    loop {
        let req: PeerRequest = read_frame(&mut stream, PEER_MAX_FRAME, &mut buf).await?;
        let resp = match dispatch(raft, &req).await {
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

async fn dispatch(raft: &Raft, req: &PeerRequest) -> Result<Vec<u8>, String> {
    match PeerKind::try_from(req.kind) {
        Ok(PeerKind::AppendEntries) => encode(&raft.append_entries(decode(&req.payload)?).await),
        Ok(PeerKind::Vote) => encode(&raft.vote(decode(&req.payload)?).await),
        Ok(PeerKind::InstallSnapshot) => encode(&raft.install_snapshot(decode(&req.payload)?).await),
        Ok(PeerKind::Hello) | Err(_) => Err(format!("unexpected request kind {}", req.kind)),
    }
}
