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
/// under its own fuel budget, and gets its own result. A leader's entry may instead carry
/// a checkpoint of its state for every member to compare with its own.
#[derive(Clone, PartialEq, Eq, Serialize)]
pub struct Request {
    #[serde(with = "byte_strings")]
    pub commands: Vec<Vec<u8>>,
    pub checkpoint: Option<Checkpoint>,
}

impl Request {
    pub fn commands(commands: Vec<Vec<u8>>) -> Self {
        Request { commands, checkpoint: None }
    }
}

/// The guest's digest on the proposing leader once it had applied the entry at `index`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub index: u64,
    #[serde(with = "serde_bytes")]
    pub digest: Vec<u8>,
}

/// Entries written before checkpoints existed end after their commands: they decode with
/// none, rather than being taken for corrupt records.
impl<'de> Deserialize<'de> for Request {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Fields;
        impl<'de> serde::de::Visitor<'de> for Fields {
            type Value = Request;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a log entry's commands and checkpoint")
            }

            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Request, A::Error> {
                let commands: Vec<serde_bytes::ByteBuf> =
                    seq.next_element()?.ok_or_else(|| serde::de::Error::invalid_length(0, &self))?;
                let checkpoint = seq.next_element::<Option<Checkpoint>>().ok().flatten().flatten();
                Ok(Request { commands: commands.into_iter().map(serde_bytes::ByteBuf::into_vec).collect(), checkpoint })
            }
        }
        d.deserialize_struct("Request", &["commands", "checkpoint"], Fields)
    }
}

/// Commands as byte strings: serde's default for `Vec<u8>` is a sequence of numbers,
/// which bincode writes and reads one byte at a time (it was a sixth of the leader's CPU).
mod byte_strings {
    use serde::Serializer;
    use serde_bytes::Bytes;

    pub fn serialize<S: Serializer>(commands: &[Vec<u8>], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(commands.iter().map(|c| Bytes::new(c)))
    }
}

impl fmt::Debug for Request {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let bytes: usize = self.commands.iter().map(Vec::len).sum();
        write!(f, "Request({} commands, {bytes} bytes", self.commands.len())?;
        if let Some(c) = &self.checkpoint {
            write!(f, ", checkpoint at {}", c.index)?;
        }
        write!(f, ")")
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Entries written before checkpoints existed still decode, with none.
    #[test]
    fn entries_of_the_earlier_format_decode_without_a_checkpoint() {
        #[derive(Serialize)]
        struct Earlier {
            #[serde(with = "byte_strings")]
            commands: Vec<Vec<u8>>,
        }
        let old = bincode::serialize(&Earlier { commands: vec![b"set-a-1".to_vec()] }).expect("encode");
        let req: Request = bincode::deserialize(&old).expect("decode");
        assert_eq!(req, Request::commands(vec![b"set-a-1".to_vec()]));

        let new = Request {
            commands: vec![b"x".to_vec()],
            checkpoint: Some(Checkpoint { index: 128, digest: vec![1, 2, 3] }),
        };
        let back: Request = bincode::deserialize(&bincode::serialize(&new).expect("encode")).expect("decode");
        assert_eq!(back, new);
    }
}
