//! The openraft type configuration: what a log entry carries and what applying it returns.

use std::fmt;
use std::io::Cursor;

use serde::{Deserialize, Serialize};

/// Node ids are plain integers, as given by `--id`.
pub type NodeId = u64;

/// What the cluster knows about a member: the addresses others use to reach it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub raft_addr: String,
    pub admin_addr: String,
    pub client_addr: String,
}

impl fmt::Display for Member {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "raft={} admin={} client={}", self.raft_addr, self.admin_addr, self.client_addr)
    }
}

/// Largest command a client may propose; a larger one is refused before it reaches the
/// log, whatever `--max-frame-bytes` allows. Its entry has to reach a follower within one
/// heartbeat interval (see `net`): one 8 MiB entry took about 70 ms on loopback on a
/// two-core machine, while 16 MiB entries timed out on most tries and the members kept
/// holding elections.
pub const MAX_COMMAND_BYTES: usize = 8 * 1024 * 1024;

/// The payload of one log entry: client commands proposed together (group commit: one
/// entry, one fsync, many commands). Each command reaches the guest separately, in order,
/// under its own fuel budget, and gets its own result.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    #[serde(with = "byte_strings")]
    pub commands: Vec<Vec<u8>>,
}

/// Commands as byte strings: serde's default for `Vec<u8>` is a sequence of numbers,
/// which bincode writes and reads one byte at a time (it was a sixth of the leader's CPU).
mod byte_strings {
    use serde::{Deserialize, Deserializer, Serializer};
    use serde_bytes::{ByteBuf, Bytes};

    pub fn serialize<S: Serializer>(commands: &[Vec<u8>], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(commands.iter().map(|c| Bytes::new(c)))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Vec<u8>>, D::Error> {
        let commands = Vec::<ByteBuf>::deserialize(d)?;
        Ok(commands.into_iter().map(ByteBuf::into_vec).collect())
    }
}

impl fmt::Debug for Request {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let bytes: usize = self.commands.iter().map(Vec::len).sum();
        write!(f, "Request({} commands, {bytes} bytes)", self.commands.len())
    }
}

impl fmt::Display for Request {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// The guest's results for the commands of one entry, in order. An `Err` is a
/// replicated, deterministic outcome (the command is committed), not a failure of the node.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    pub results: Vec<Result<Vec<u8>, String>>,
}

// `declare_raft_types!` names `Cursor` in its defaults even when they are overridden.
#[allow(unused_imports)]
use Cursor as _;

openraft::declare_raft_types!(
    pub TypeConfig:
        D = Request,
        R = Response,
        NodeId = NodeId,
        Node = Member,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = tokio::fs::File,
        AsyncRuntime = openraft::TokioRuntime,
);

pub type Raft = openraft::Raft<TypeConfig>;
pub type Entry = openraft::Entry<TypeConfig>;
pub type LogId = openraft::LogId<NodeId>;
pub type Vote = openraft::Vote<NodeId>;
pub type StorageError = openraft::StorageError<NodeId>;
pub type StoredMembership = openraft::StoredMembership<NodeId, Member>;
pub type SnapshotMeta = openraft::SnapshotMeta<NodeId, Member>;
pub type Snapshot = openraft::Snapshot<TypeConfig>;
