//! Who a member is: the cluster it belongs to and its own member uid, both random and
//! kept in `<data-dir>/node.json`, and the checks that keep one cluster's members from
//! being taken for another's.
//!
//! Node ids are chosen by operators and reused (a pod restarting on an empty volume keeps
//! its id and its addresses), so they cannot say whether two processes belong together:
//! a member that starts over on an empty data dir would found a cluster whose log ids
//! collide with the old one's, and a new process given a live member's id would take over
//! its slot. The cluster id (made at bootstrap, learned by a joiner before it takes any
//! entry) and the member uid (made by each process for its data dir) can.
//!
//! `node.json` is written once the member is bound to a cluster: by a founder just before
//! it bootstraps, by a joiner once a member of the cluster has accepted its join and told
//! it the cluster id (before the member adds it, so before any entry reaches it). A start
//! that fails earlier (a port in use, say) leaves the data dir as it found it.

use std::path::Path;
use std::sync::OnceLock;

use serde::{Deserialize, Serialize};

use crate::types::NodeId;

/// Version of the peer hello and the join request. Members refuse peers and joiners that
/// speak another version, by name, rather than misread them.
pub const PROTOCOL_VERSION: u32 = 1;

/// The cluster id given to data dirs written before cluster ids existed. Every member of
/// such a cluster takes the same one, so they go on talking to each other; a member that
/// starts over on an empty dir gets a random id and is refused by them.
pub const LEGACY_CLUSTER_ID: &str = "00000000000000000000000000000000";

/// The contents of `node.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct NodeFile {
    pub id: NodeId,
    pub fsm_sha256: String,
    pub fsm_config_sha256: String,
    /// Absent in files written before cluster ids: see [`resolve`].
    #[serde(default)]
    pub cluster_id: Option<String>,
    #[serde(default)]
    pub member_uid: Option<String>,
    /// `--fuel-per-entry` and `--guest-memory-mb`: they decide where a command stops the
    /// member, so they belong to the guest's identity like its sha256 and settings. Absent
    /// in files written before they were pinned: see [`check_same_node`].
    #[serde(flatten)]
    pub limits: Option<GuestLimits>,
}

/// The guest limits a member pins in `node.json` and a joiner sends to the leader.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct GuestLimits {
    pub fuel_per_entry: u64,
    pub guest_memory_mb: u64,
}

impl GuestLimits {
    /// Why `theirs` (a data dir's or a joiner's) may not run beside `ours`, naming the flag
    /// that differs.
    pub fn differ(theirs: &GuestLimits, ours: &GuestLimits, theirs_are: &str, ours_are: &str) -> Option<String> {
        let mut why = Vec::new();
        if theirs.fuel_per_entry != ours.fuel_per_entry {
            why.push(format!(
                "--fuel-per-entry {} ({theirs_are}) differs from {} ({ours_are})",
                theirs.fuel_per_entry, ours.fuel_per_entry
            ));
        }
        if theirs.guest_memory_mb != ours.guest_memory_mb {
            why.push(format!(
                "--guest-memory-mb {} ({theirs_are}) differs from {} ({ours_are})",
                theirs.guest_memory_mb, ours.guest_memory_mb
            ));
        }
        (!why.is_empty()).then(|| why.join("; "))
    }
}

const FILE_NAME: &str = "node.json";

/// Why an identity check failed: the data dir's `node.json`, or a peer's hello.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    /// `node.json` cannot be read, parsed or written.
    #[error("{0}")]
    File(String),
    /// The data dir belongs to another node, guest, settings or limits, or its cluster is
    /// unknown: starting on it would make this process a different member.
    #[error("{0}")]
    DataDir(String),
    #[error(
        "protocol version mismatch: node {from} speaks version {theirs}, node {node} speaks version \
         {PROTOCOL_VERSION} (members must run the same release)"
    )]
    Version { from: NodeId, theirs: u32, node: NodeId },
    #[error("cluster id mismatch: node {from} belongs to cluster {theirs}, node {node} to cluster {ours}")]
    OtherCluster { from: NodeId, theirs: String, node: NodeId, ours: String },
    /// The hello reached, or came from, another member than the one meant.
    #[error("wrong member: {0}")]
    WrongMember(String),
    #[error("node {0} has not been admitted to a cluster yet")]
    NotAdmitted(NodeId),
    #[error("this member belongs to cluster {bound}, not {asked}")]
    Rebind { bound: String, asked: String },
}

/// `node.json` of `dir`, if there is one.
pub fn read(dir: &Path) -> Result<Option<NodeFile>, IdentityError> {
    let path = dir.join(FILE_NAME);
    match std::fs::read(&path) {
        Ok(bytes) => {
            let file: NodeFile = serde_json::from_slice(&bytes)
                .map_err(|e| file_error(format!("{}: unreadable: {e}", path.display())))?;
            for (what, v) in [("cluster_id", &file.cluster_id), ("member_uid", &file.member_uid)] {
                if let Some(v) = v.as_deref().filter(|v| !is_id(v)) {
                    return Err(file_error(format!("{}: {what} {v:?} is not 32 hex digits", path.display())));
                }
            }
            Ok(Some(file))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(file_error(format!("cannot read {}: {e}", path.display()))),
    }
}

/// Replaces `node.json` of `dir` durably (creating `dir` if needed).
pub fn write(dir: &Path, file: &NodeFile) -> Result<(), IdentityError> {
    std::fs::create_dir_all(dir).map_err(|e| file_error(format!("cannot create {}: {e}", dir.display())))?;
    let path = dir.join(FILE_NAME);
    let json = serde_json::to_vec_pretty(file).map_err(|e| file_error(e.to_string()))?;
    crate::store::files::write_file_durably(&path, &json)
        .map_err(|e| file_error(format!("cannot write {}: {e}", path.display())))
}

fn file_error(why: String) -> IdentityError {
    IdentityError::File(why)
}

/// Binds a member to the cluster that accepted its join, durably (`node.json` with the
/// cluster id), then in memory: a joiner does this before it asks to be added, so before
/// any entry reaches it.
pub fn bind(dir: &Path, file: &NodeFile, me: &Identity, cluster: &str) -> Result<(), IdentityError> {
    write(dir, &NodeFile { cluster_id: Some(cluster.to_string()), member_uid: Some(me.uid.clone()), ..file.clone() })?;
    me.set_cluster(cluster)
}

/// Refuses a data dir made for another node id, guest or guest settings: started on it, the
/// process would silently become a different member.
pub fn check_same_node(dir: &Path, found: &NodeFile, ours: &NodeFile) -> Result<(), IdentityError> {
    if found.id != ours.id {
        return Err(IdentityError::DataDir(format!(
            "{} belongs to node {}, not node {}",
            dir.display(),
            found.id,
            ours.id
        )));
    }
    if found.fsm_sha256 != ours.fsm_sha256 {
        return Err(IdentityError::DataDir(format!(
            "{} holds state of guest sha256 {}; --fsm is sha256 {} (a member cannot change its guest)",
            dir.display(),
            found.fsm_sha256,
            ours.fsm_sha256
        )));
    }
    if found.fsm_config_sha256 != ours.fsm_config_sha256 {
        return Err(IdentityError::DataDir(format!(
            "{} was created with other --fsm-config settings; a member cannot change them",
            dir.display()
        )));
    }
    match (&found.limits, &ours.limits) {
        (Some(theirs), Some(ours)) => {
            if let Some(why) = GuestLimits::differ(theirs, ours, "this data dir's", "this start's") {
                return Err(IdentityError::DataDir(format!(
                    "{}: {why}; the guest limits decide where a command stops a member, so every member \
                     keeps the ones the cluster was started with (start with the recorded values)",
                    dir.display()
                )));
            }
        }
        // Written before the limits were pinned: `resolve` has the file rewritten with
        // this start's limits, once.
        (None, Some(ours)) => tracing::info!(
            fuel_per_entry = ours.fuel_per_entry,
            guest_memory_mb = ours.guest_memory_mb,
            "node.json predates pinned guest limits; adopting this start's --fuel-per-entry and \
             --guest-memory-mb, which every later start must repeat"
        ),
        (_, None) => {}
    }
    Ok(())
}

/// Why the leader refuses joiner `id` for its guest limits, if it does: they must equal
/// the cluster's, and a joiner that does not say them (a release before they were
/// compared) cannot be checked.
pub fn refuse_limits(id: NodeId, theirs: Option<&GuestLimits>, ours: &GuestLimits) -> Option<String> {
    let Some(theirs) = theirs else {
        return Some(format!(
            "guest limits unknown: node {id} does not send its --fuel-per-entry and --guest-memory-mb \
             (an older release); members must run the same release"
        ));
    };
    GuestLimits::differ(theirs, ours, &format!("node {id}'s"), "the cluster's").map(|why| {
        format!(
            "guest limits mismatch: {why}; the limits decide where a command stops a member, so every \
             member must use the cluster's"
        )
    })
}

/// What a starting member knows about itself, from `node.json` and whether its log is empty.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    /// `None`: not bound to any cluster yet (it may bootstrap or join).
    pub cluster_id: Option<String>,
    pub member_uid: String,
    /// `node.json` must be rewritten (an upgraded file, or ids made just now for it).
    pub rewrite: bool,
}

/// Decides a starting member's identity. The rule for files written before cluster ids
/// and member uids: a member with a log keeps running as a member of
/// [`LEGACY_CLUSTER_ID`] with a new member uid, and its file is rewritten with both (and
/// with the guest limits, if it predates them too); a
/// file without a cluster id over an empty log binds the dir to nothing (it was written
/// before the start that would have bootstrapped or joined got that far).
pub fn resolve(found: Option<&NodeFile>, has_log: bool, dir: &Path) -> Result<Resolved, IdentityError> {
    match found {
        Some(f) if f.cluster_id.is_some() || has_log => Ok(Resolved {
            cluster_id: Some(f.cluster_id.clone().unwrap_or_else(|| LEGACY_CLUSTER_ID.to_string())),
            member_uid: f.member_uid.clone().unwrap_or_else(random_id),
            rewrite: f.cluster_id.is_none() || f.member_uid.is_none() || f.limits.is_none(),
        }),
        Some(_) | None if has_log => Err(IdentityError::DataDir(format!(
            "{} holds a Raft log but no {FILE_NAME}: which cluster it belongs to is unknown, so it cannot \
             start; restore {FILE_NAME} or start over on an empty data dir",
            dir.display()
        ))),
        _ => Ok(Resolved { cluster_id: None, member_uid: random_id(), rewrite: false }),
    }
}

/// A new random id: 128 bits from the operating system, as 32 hex digits.
pub fn random_id() -> String {
    let mut bytes = [0u8; 16];
    // Without the OS's randomness two members could draw the same id: no way to go on.
    getrandom::fill(&mut bytes).expect("the operating system's random source failed");
    hex::encode(bytes)
}

fn is_id(s: &str) -> bool {
    s.len() == 32 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// A running member's identity, shared by the peer server and clients, `/join` and `/status`.
#[derive(Debug)]
pub struct Identity {
    pub node: NodeId,
    pub uid: String,
    /// Set once: at start for a member bound to a cluster, else when it bootstraps or its
    /// join is accepted. Until then it refuses every peer.
    cluster: OnceLock<String>,
}

/// One side of a peer hello, as far as identity goes: who says it, which cluster it is in,
/// and whom it believes it is talking to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    pub version: u32,
    pub cluster_id: String,
    pub from: NodeId,
    pub from_uid: String,
    pub to: NodeId,
    /// Empty when the sender has no uid on record for us (we joined before uids existed).
    pub to_uid: String,
}

impl Identity {
    pub fn new(node: NodeId, uid: String, cluster: Option<String>) -> Self {
        let cell = OnceLock::new();
        if let Some(c) = cluster {
            let _ = cell.set(c);
        }
        Identity { node, uid, cluster: cell }
    }

    pub fn cluster(&self) -> Option<&str> {
        self.cluster.get().map(String::as_str)
    }

    /// Binds this member to `cluster`; refuses to rebind it to another.
    pub fn set_cluster(&self, cluster: &str) -> Result<(), IdentityError> {
        let set = self.cluster.get_or_init(|| cluster.to_string());
        if set != cluster {
            return Err(IdentityError::Rebind { bound: set.clone(), asked: cluster.to_string() });
        }
        Ok(())
    }

    /// Our hello to node `to`, whose uid we believe is `to_uid`.
    pub fn hello_to(&self, to: NodeId, to_uid: &str) -> Result<Hello, IdentityError> {
        let cluster = self.cluster().ok_or(IdentityError::NotAdmitted(self.node))?;
        Ok(Hello {
            version: PROTOCOL_VERSION,
            cluster_id: cluster.to_string(),
            from: self.node,
            from_uid: self.uid.clone(),
            to,
            to_uid: to_uid.to_string(),
        })
    }

    /// Checks a hello addressed to us; with `expected`, also that it comes from that node
    /// and uid (an answer to our own hello: the address reached the member we meant).
    pub fn admit(&self, h: &Hello, expected: Option<(NodeId, &str)>) -> Result<(), IdentityError> {
        if h.version != PROTOCOL_VERSION {
            return Err(IdentityError::Version { from: h.from, theirs: h.version, node: self.node });
        }
        let ours = self.cluster().ok_or(IdentityError::NotAdmitted(self.node))?;
        if h.cluster_id != ours {
            return Err(IdentityError::OtherCluster {
                from: h.from,
                theirs: h.cluster_id.clone(),
                node: self.node,
                ours: ours.to_string(),
            });
        }
        if h.to != self.node {
            return Err(IdentityError::WrongMember(format!(
                "node {} meant node {}, this is node {}",
                h.from, h.to, self.node
            )));
        }
        if !h.to_uid.is_empty() && h.to_uid != self.uid {
            return Err(IdentityError::WrongMember(format!(
                "node {} meant node {} with member uid {}, this is node {} with member uid {} \
                 (another process holds that id or address)",
                h.from, h.to, h.to_uid, self.node, self.uid
            )));
        }
        if let Some((node, uid)) = expected {
            if h.from != node || (!uid.is_empty() && h.from_uid != uid) {
                return Err(IdentityError::WrongMember(format!(
                    "expected node {node} with member uid {uid}, reached node {} with member uid {}",
                    h.from, h.from_uid
                )));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(cluster: Option<&str>, uid: Option<&str>) -> NodeFile {
        NodeFile {
            id: 3,
            fsm_sha256: "aa".into(),
            fsm_config_sha256: "bb".into(),
            cluster_id: cluster.map(str::to_string),
            member_uid: uid.map(str::to_string),
            limits: None,
        }
    }

    const LIMITS: GuestLimits = GuestLimits { fuel_per_entry: 100, guest_memory_mb: 64 };

    #[test]
    fn limits_are_pinned_and_a_file_without_them_adopts_the_current_ones() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = NodeFile { limits: Some(LIMITS), ..file(Some(C), Some(U)) };
        write(dir.path(), &f).expect("write");
        let json = std::fs::read_to_string(dir.path().join(FILE_NAME)).expect("read");
        assert!(json.contains("\"fuel_per_entry\": 100") && json.contains("\"guest_memory_mb\": 64"), "{json}");
        assert_eq!(read(dir.path()), Ok(Some(f.clone())));
        assert_eq!(check_same_node(dir.path(), &f, &f), Ok(()));

        let other = NodeFile { limits: Some(GuestLimits { fuel_per_entry: 200, ..LIMITS }), ..f.clone() };
        let e = check_same_node(dir.path(), &f, &other).expect_err("another fuel budget").to_string();
        assert!(e.contains("--fuel-per-entry 100") && e.contains("200") && !e.contains("--guest-memory-mb"), "{e}");
        let other = NodeFile { limits: Some(GuestLimits { guest_memory_mb: 32, ..LIMITS }), ..f.clone() };
        let e = check_same_node(dir.path(), &f, &other).expect_err("another memory limit").to_string();
        assert!(e.contains("--guest-memory-mb 64") && e.contains("32"), "{e}");

        // A file from before the limits were pinned: accepted, and rewritten with ours.
        let old = file(Some(C), Some(U));
        std::fs::write(
            dir.path().join(FILE_NAME),
            format!(r#"{{"id":3,"fsm_sha256":"aa","fsm_config_sha256":"bb","cluster_id":"{C}","member_uid":"{U}"}}"#),
        )
        .expect("write");
        assert_eq!(read(dir.path()), Ok(Some(old.clone())));
        assert_eq!(check_same_node(dir.path(), &old, &f), Ok(()));
        let r = resolve(Some(&old), true, dir.path()).expect("resolve");
        assert!(r.rewrite, "the limits must be recorded");
        assert_eq!((r.cluster_id.as_deref(), r.member_uid.as_str()), (Some(C), U), "the ids stay");
    }

    #[test]
    fn a_joiner_with_other_or_unknown_limits_is_refused() {
        assert_eq!(refuse_limits(4, Some(&LIMITS), &LIMITS), None);
        let theirs = GuestLimits { guest_memory_mb: 128, ..LIMITS };
        let e = refuse_limits(4, Some(&theirs), &LIMITS).expect("refused");
        assert!(e.contains("--guest-memory-mb 128 (node 4's) differs from 64 (the cluster's)"), "{e}");
        let theirs = GuestLimits { fuel_per_entry: 1, ..LIMITS };
        assert!(refuse_limits(4, Some(&theirs), &LIMITS).expect("refused").contains("--fuel-per-entry 1"));
        assert!(refuse_limits(4, None, &LIMITS).expect("refused").contains("older release"));
    }

    const C: &str = "0123456789abcdef0123456789abcdef";
    const U: &str = "fedcba9876543210fedcba9876543210";

    #[test]
    fn node_file_round_trips_and_is_absent_in_an_empty_dir() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sub = dir.path().join("node-3");
        assert_eq!(read(&sub), Ok(None));
        let f = file(Some(C), Some(U));
        write(&sub, &f).expect("write");
        assert_eq!(read(&sub), Ok(Some(f)));
    }

    #[test]
    fn a_file_from_before_ids_reads_without_them_and_bad_ids_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join(FILE_NAME), br#"{"id":3,"fsm_sha256":"aa","fsm_config_sha256":"bb"}"#)
            .expect("write");
        assert_eq!(read(dir.path()), Ok(Some(file(None, None))));
        std::fs::write(
            dir.path().join(FILE_NAME),
            br#"{"id":3,"fsm_sha256":"aa","fsm_config_sha256":"bb","cluster_id":"nope"}"#,
        )
        .expect("write");
        assert!(read(dir.path()).expect_err("bad id").to_string().contains("cluster_id"));
        std::fs::write(dir.path().join(FILE_NAME), b"{").expect("write");
        assert!(read(dir.path()).expect_err("bad json").to_string().contains("unreadable"));
    }

    #[test]
    fn another_node_guest_or_settings_is_refused() {
        let dir = Path::new("d");
        let ours = file(None, None);
        assert!(check_same_node(dir, &file(Some(C), Some(U)), &ours).is_ok(), "ids do not matter here");
        let other = NodeFile { id: 4, ..ours.clone() };
        assert!(check_same_node(dir, &other, &ours).expect_err("id").to_string().contains("belongs to node 4"));
        let other = NodeFile { fsm_sha256: "cc".into(), ..ours.clone() };
        assert!(check_same_node(dir, &other, &ours)
            .expect_err("guest")
            .to_string()
            .contains("cannot change its guest"));
        let other = NodeFile { fsm_config_sha256: "cc".into(), ..ours.clone() };
        assert!(check_same_node(dir, &other, &ours).expect_err("settings").to_string().contains("--fsm-config"));
    }

    #[test]
    fn resolve_binds_only_what_was_bound_and_upgrades_old_files() {
        let dir = Path::new("d");
        // A fresh dir, or a first start that failed before it bootstrapped or joined.
        for found in [None, Some(file(None, None))] {
            let r = resolve(found.as_ref(), false, dir).expect("fresh");
            assert_eq!(r.cluster_id, None);
            assert!(is_id(&r.member_uid));
            assert!(!r.rewrite, "nothing to write until it is bound to a cluster");
        }
        // A current file: as it is, with or without a log (a joiner accepted, no entry yet).
        for has_log in [false, true] {
            let current = NodeFile { limits: Some(LIMITS), ..file(Some(C), Some(U)) };
            let r = resolve(Some(&current), has_log, dir).expect("current");
            assert_eq!(r, Resolved { cluster_id: Some(C.into()), member_uid: U.into(), rewrite: false });
        }
        // A member from before ids: the shared legacy cluster id, a new uid, written down.
        let r = resolve(Some(&file(None, None)), true, dir).expect("legacy");
        assert_eq!(r.cluster_id.as_deref(), Some(LEGACY_CLUSTER_ID));
        assert!(is_id(&r.member_uid) && r.member_uid != LEGACY_CLUSTER_ID);
        assert!(r.rewrite);
        // A log nobody can place.
        assert!(resolve(None, true, dir).expect_err("no file").to_string().contains("no node.json"));
    }

    #[test]
    fn random_ids_differ() {
        let (a, b) = (random_id(), random_id());
        assert!(is_id(&a) && is_id(&b));
        assert_ne!(a, b);
    }

    fn hello(me: &Identity, to: &Identity) -> Hello {
        me.hello_to(to.node, &to.uid).expect("admitted")
    }

    #[test]
    fn hellos_are_refused_across_clusters_members_and_versions() {
        let a = Identity::new(1, random_id(), Some(C.into()));
        let b = Identity::new(2, random_id(), Some(C.into()));
        assert_eq!(b.admit(&hello(&a, &b), None), Ok(()));
        // The answer, checked by the caller against whom it meant to reach.
        assert_eq!(a.admit(&hello(&b, &a), Some((2, &b.uid))), Ok(()));
        assert_eq!(a.admit(&hello(&b, &a), Some((2, ""))), Ok(()), "no uid on record: not checked");

        // A member that started over bootstrapped a cluster of its own, on the same id.
        let impostor = Identity::new(2, random_id(), Some(random_id()));
        let e = impostor.admit(&hello(&a, &b), None).expect_err("other cluster").to_string();
        assert!(e.contains("cluster id mismatch") && e.contains(C), "{e}");
        let e = a.admit(&hello(&impostor, &a), Some((2, &b.uid))).expect_err("other cluster").to_string();
        assert!(e.contains("cluster id mismatch"), "{e}");

        // Same cluster, another process holding node 2's address or id.
        let other = Identity::new(2, random_id(), Some(C.into()));
        let e = other.admit(&hello(&a, &b), None).expect_err("other uid").to_string();
        assert!(e.contains(&b.uid) && e.contains(&other.uid), "{e}");
        let e = a.admit(&hello(&other, &a), Some((2, &b.uid))).expect_err("other uid").to_string();
        assert!(e.contains("wrong member"), "{e}");
        let three = Identity::new(3, random_id(), Some(C.into()));
        let e = three.admit(&hello(&a, &b), None).expect_err("other node").to_string();
        assert!(e.contains("meant node 2, this is node 3"), "{e}");

        let mut old = hello(&a, &b);
        old.version = 0;
        assert!(b.admit(&old, None).expect_err("version").to_string().contains("protocol version mismatch"));

        // Not yet admitted: neither says hello nor listens to one.
        let joiner = Identity::new(4, random_id(), None);
        assert!(joiner.hello_to(1, "").is_err());
        assert!(joiner.admit(&a.hello_to(4, &joiner.uid).expect("hello"), None).is_err());
        joiner.set_cluster(C).expect("bind");
        assert_eq!(joiner.admit(&a.hello_to(4, &joiner.uid).expect("hello"), None), Ok(()));
        assert!(joiner.set_cluster(&random_id()).is_err(), "bound for good");
        assert_eq!(joiner.set_cluster(C), Ok(()));
    }
}
