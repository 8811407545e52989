//! The openraft type configuration: what a log entry carries and what applying it returns.

use std::fmt;
use std::io::Cursor;

use serde::{Deserialize, Serialize};

/// Node ids are plain integers, as given by `--id`.
pub type NodeId = u64;

/// What a member is for. Recorded in the membership, so that every member (and
/// `/status`) knows it, and the leader never promotes a logger.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// A replica running the guest: a voter, or a learner on its way to being one.
    #[default]
    Replica,
    /// An archive of the committed commands (`logger`): a learner, never promoted.
    Logger,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Replica => "replica",
            Role::Logger => "logger",
        }
    }
}

/// What the cluster knows about a member: the addresses others use to reach it, the
/// uid of the process (data dir) that holds the id, so that no other can take its place,
/// and its role.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Member {
    pub raft_addr: String,
    pub admin_addr: String,
    pub client_addr: String,
    /// Empty for a member that joined before member uids existed: not checked.
    pub uid: String,
    pub role: Role,
}

impl fmt::Display for Member {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "raft={} admin={} client={}", self.raft_addr, self.admin_addr, self.client_addr)?;
        if !self.uid.is_empty() {
            write!(f, " uid={}", self.uid)?;
        }
        if self.role != Role::Replica {
            write!(f, " role={}", self.role.as_str())?;
        }
        Ok(())
    }
}

/// `Member` travels and is stored in bincode (log entries, snapshot metas, AppendEntries),
/// which has no field names and no way to skip a missing field: a `#[serde(default)]` field
/// would misread every membership written before it. Members written before uids were
/// three strings, each a u64 length then its bytes; now the record starts with a length no
/// string can have ([`member_serde::TAGGED`]), then the four fields. A member whose role
/// is not the default starts with another such length ([`member_serde::TAGGED_ROLE`]) and
/// has the role after them, so a replica is still written as before (a member of an older
/// release reads it) and records of either older form decode as replicas. Self-describing
/// formats get a plain struct whose `uid` and `role` default.
mod member_serde {
    use std::fmt;

    use serde::de::{self, DeserializeSeed, SeqAccess, Visitor};
    use serde::ser::SerializeTuple;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    use super::{Member, Role};

    pub(super) const TAGGED: u64 = u64::MAX;
    pub(super) const TAGGED_ROLE: u64 = u64::MAX - 1;

    #[derive(Serialize, Deserialize)]
    struct Named {
        raft_addr: String,
        admin_addr: String,
        client_addr: String,
        #[serde(default)]
        uid: String,
        #[serde(default)]
        role: Role,
    }

    impl Serialize for Member {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            if s.is_human_readable() {
                return Named {
                    raft_addr: self.raft_addr.clone(),
                    admin_addr: self.admin_addr.clone(),
                    client_addr: self.client_addr.clone(),
                    uid: self.uid.clone(),
                    role: self.role,
                }
                .serialize(s);
            }
            let with_role = self.role != Role::Replica;
            let mut t = s.serialize_tuple(if with_role { 6 } else { 5 })?;
            t.serialize_element(if with_role { &TAGGED_ROLE } else { &TAGGED })?;
            t.serialize_element(&self.raft_addr)?;
            t.serialize_element(&self.admin_addr)?;
            t.serialize_element(&self.client_addr)?;
            t.serialize_element(&self.uid)?;
            if with_role {
                t.serialize_element(&self.role)?;
            }
            t.end()
        }
    }

    impl<'de> Deserialize<'de> for Member {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            if d.is_human_readable() {
                let n = Named::deserialize(d)?;
                return Ok(Member {
                    raft_addr: n.raft_addr,
                    admin_addr: n.admin_addr,
                    client_addr: n.client_addr,
                    uid: n.uid,
                    role: n.role,
                });
            }
            // The longest form; bincode reads only as many elements as the visitor asks for.
            d.deserialize_tuple(6, Compact)
        }
    }

    struct Compact;

    impl<'de> Visitor<'de> for Compact {
        type Value = Member;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a member")
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Member, A::Error> {
            let missing = || de::Error::custom("truncated member");
            let head: u64 = seq.next_element()?.ok_or_else(missing)?;
            let tagged = head == TAGGED || head == TAGGED_ROLE;
            let raft_addr = if tagged {
                seq.next_element()?.ok_or_else(missing)?
            } else {
                // `head` was the length of the first address of an old record.
                let len = usize::try_from(head).map_err(|_| de::Error::custom("address too long"))?;
                let bytes = seq.next_element_seed(RawBytes(len))?.ok_or_else(missing)?;
                String::from_utf8(bytes).map_err(de::Error::custom)?
            };
            let admin_addr = seq.next_element()?.ok_or_else(missing)?;
            let client_addr = seq.next_element()?.ok_or_else(missing)?;
            let uid = if tagged { seq.next_element()?.ok_or_else(missing)? } else { String::new() };
            let role = if head == TAGGED_ROLE { seq.next_element()?.ok_or_else(missing)? } else { Role::Replica };
            Ok(Member { raft_addr, admin_addr, client_addr, uid, role })
        }
    }

    /// `len` bytes with no length in front (bincode writes a tuple's elements back to back).
    struct RawBytes(usize);

    impl<'de> DeserializeSeed<'de> for RawBytes {
        type Value = Vec<u8>;

        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Vec<u8>, D::Error> {
            struct Bytes(usize);
            impl<'de> Visitor<'de> for Bytes {
                type Value = Vec<u8>;

                fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                    write!(f, "{} bytes", self.0)
                }

                fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u8>, A::Error> {
                    // Grown as bytes arrive: a corrupt length must not reserve memory.
                    let mut out = Vec::new();
                    for _ in 0..self.0 {
                        out.push(seq.next_element()?.ok_or_else(|| de::Error::custom("truncated address"))?);
                    }
                    Ok(out)
                }
            }
            d.deserialize_tuple(self.0, Bytes(self.0))
        }
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
    use std::collections::BTreeMap;

    use super::*;

    /// `Member` as it was encoded before member uids.
    #[derive(Serialize)]
    struct OldMember {
        raft_addr: String,
        admin_addr: String,
        client_addr: String,
    }

    fn member(i: u64, uid: &str) -> Member {
        Member {
            raft_addr: format!("10.0.0.{i}:12000"),
            admin_addr: format!("10.0.0.{i}:13000"),
            client_addr: format!("10.0.0.{i}:11000"),
            uid: uid.to_string(),
            role: Role::Replica,
        }
    }

    /// A replica is written exactly as before roles (older releases read it); a logger
    /// round-trips with its role, next to members of either older form.
    #[test]
    fn roles_round_trip_and_replicas_keep_the_earlier_encoding() {
        #[derive(Serialize)]
        struct WithUid {
            tag: u64,
            raft_addr: String,
            admin_addr: String,
            client_addr: String,
            uid: String,
        }
        let m = member(1, "ab");
        let earlier = WithUid {
            tag: member_serde::TAGGED,
            raft_addr: m.raft_addr.clone(),
            admin_addr: m.admin_addr.clone(),
            client_addr: m.client_addr.clone(),
            uid: m.uid.clone(),
        };
        assert_eq!(bincode::serialize(&m).expect("encode"), bincode::serialize(&earlier).expect("encode"));

        let logger = Member { role: Role::Logger, ..member(9, "cd") };
        let all: BTreeMap<u64, Member> = BTreeMap::from([(1, m), (2, member(2, "")), (9, logger.clone())]);
        let bytes = bincode::serialize(&(all.clone(), 7u64)).expect("encode");
        assert_eq!(bincode::deserialize::<(BTreeMap<u64, Member>, u64)>(&bytes).expect("decode"), (all, 7));
        let json = serde_json::to_string(&logger).expect("json");
        assert!(json.contains(r#""role":"logger""#), "{json}");
        assert_eq!(serde_json::from_str::<Member>(&json).expect("json"), logger);
        let cut = bincode::serialize(&logger).expect("encode");
        assert!(bincode::deserialize::<Member>(&cut[..cut.len() - 1]).is_err(), "a truncated role");
    }

    #[test]
    fn members_written_before_uids_still_decode() {
        let old: BTreeMap<u64, OldMember> = (1..=3)
            .map(|i| {
                let m = member(i, "");
                (i, OldMember { raft_addr: m.raft_addr, admin_addr: m.admin_addr, client_addr: m.client_addr })
            })
            .collect();
        let bytes = bincode::serialize(&(old, 7u64)).expect("encode");
        let (read, after): (BTreeMap<u64, Member>, u64) = bincode::deserialize(&bytes).expect("decode");
        assert_eq!(read, (1..=3).map(|i| (i, member(i, ""))).collect());
        assert_eq!(after, 7, "what follows a membership is read in step");
    }

    #[test]
    fn members_round_trip_in_bincode_and_json() {
        let m: BTreeMap<u64, Member> = BTreeMap::from([(1, member(1, "ab")), (2, member(2, ""))]);
        let bytes = bincode::serialize(&(m.clone(), 7u64)).expect("encode");
        assert_eq!(bincode::deserialize::<(BTreeMap<u64, Member>, u64)>(&bytes).expect("decode"), (m, 7));

        let json = serde_json::to_string(&member(1, "ab")).expect("json");
        assert!(json.contains(r#""uid":"ab""#), "{json}");
        assert_eq!(serde_json::from_str::<Member>(&json).expect("json"), member(1, "ab"));
        let old = r#"{"raft_addr":"10.0.0.1:12000","admin_addr":"10.0.0.1:13000","client_addr":"10.0.0.1:11000"}"#;
        assert_eq!(serde_json::from_str::<Member>(old).expect("old json"), member(1, ""));
    }

    #[test]
    fn a_truncated_member_is_an_error() {
        let bytes = bincode::serialize(&member(1, "ab")).expect("encode");
        for cut in [4, 8, 20, bytes.len() - 1] {
            assert!(bincode::deserialize::<Member>(&bytes[..cut]).is_err(), "cut at {cut}");
        }
    }

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
