//! Wire messages (prost). Only `api`, `net` and `client` speak them; everything else uses
//! the types in `types`.

/// A request on the client port. Many may be in flight on one connection; responses
/// carry the same `id` and may arrive in any order.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ClientRequest {
    #[prost(uint64, tag = "1")]
    pub id: u64,
    /// A [`RequestKind`].
    #[prost(enumeration = "RequestKind", tag = "2")]
    pub kind: i32,
    /// The command (propose) or the read request (query), opaque to the host.
    #[prost(bytes = "vec", tag = "3")]
    pub payload: Vec<u8>,
    /// Query only: answer from this member's state without confirming leadership
    /// (may be stale).
    #[prost(bool, tag = "4")]
    pub stale_ok: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum RequestKind {
    /// Write through the log; answered once committed and applied.
    Propose = 0,
    /// Read-only `query` on the guest.
    Query = 1,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ClientResponse {
    #[prost(uint64, tag = "1")]
    pub id: u64,
    /// A [`Code`].
    #[prost(enumeration = "Code", tag = "2")]
    pub code: i32,
    #[prost(bytes = "vec", tag = "3")]
    pub value: Vec<u8>,
    #[prost(string, tag = "4")]
    pub error: String,
    /// With `NotLeader`: the leader's client address, empty while unknown.
    #[prost(string, tag = "5")]
    pub leader: String,
}

/// What a response means for the command's fate. The distinction between `Rejected`
/// and `UnknownOutcome` is what lets clients and history checkers stay honest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum Code {
    /// Committed and applied (propose) or answered (query); `value` is the guest's result.
    Ok = 0,
    /// Committed and applied, and the guest returned an error result (`error`). Every
    /// member recorded the same error.
    GuestError = 1,
    /// Definitely not applied: refused before it reached the log (`error` says why).
    Rejected = 2,
    /// May or may not have been applied (timeout, leadership lost after appending).
    UnknownOutcome = 3,
    /// This member is not the leader; retry at `leader`. Nothing was appended.
    NotLeader = 4,
    /// The request itself is malformed; retrying will not help.
    BadRequest = 5,
}

/// First frame on a peer connection: proves membership when `--cluster-token` is set, and
/// says which cluster and member the caller is and which member it means to reach. The
/// answer to an accepted hello carries the answering member's own (without the token), so
/// both ends know they reached the member they meant.
#[derive(Clone, PartialEq, prost::Message)]
pub struct PeerHello {
    #[prost(string, tag = "1")]
    pub token: String,
    #[prost(uint64, tag = "2")]
    pub from: u64,
    /// 0 from a release before versioned hellos.
    #[prost(uint32, tag = "3")]
    pub version: u32,
    #[prost(string, tag = "4")]
    pub cluster_id: String,
    #[prost(string, tag = "5")]
    pub from_uid: String,
    #[prost(uint64, tag = "6")]
    pub to: u64,
    /// The addressee's member uid as the sender has it on record; empty if none.
    #[prost(string, tag = "7")]
    pub to_uid: String,
}

/// A peer RPC: `payload` is the bincode of the openraft request (AppendEntries, Vote,
/// InstallSnapshot), whose types are openraft's own and change with it; the envelope is
/// ours and stable.
#[derive(Clone, PartialEq, prost::Message)]
pub struct PeerRequest {
    #[prost(enumeration = "PeerKind", tag = "1")]
    pub kind: i32,
    /// `Bytes`, so a retry on a new connection shares the encoded request, not copies it.
    #[prost(bytes = "bytes", tag = "2")]
    pub payload: bytes::Bytes,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum PeerKind {
    Hello = 0,
    AppendEntries = 1,
    Vote = 2,
    InstallSnapshot = 3,
}

/// The answer to a `PeerRequest`: either the bincode of openraft's `Result<Resp, RaftError>`
/// or a transport-level refusal (bad token, undecodable request).
#[derive(Clone, PartialEq, prost::Message)]
pub struct PeerResponse {
    #[prost(bytes = "vec", tag = "1")]
    pub payload: Vec<u8>,
    #[prost(string, tag = "2")]
    pub refused: String,
}
