//! Fault injection for tests, armed only by the `HOST_TEST_FAILPOINT` environment
//! variable, read once when the log is opened. Unset (every normal run) the store holds
//! `None`, and its append path pays one branch on it.
//!
//! - `crash-before-final-membership`: the leader aborts the process at the moment it
//!   would append the final (uniform) membership entry that follows a joint one. The joint
//!   entry is committed by then (openraft appends the second step only after the first
//!   commits), so the cluster is left in joint consensus, which a leadership change
//!   between the two steps causes in real life. The membership tests use it to show that
//!   the next leader finishes the change (`admin::members::finish_joint_changes`).

use std::collections::BTreeMap;
use std::env::VarError;
use std::io;

use openraft::{EntryPayload, RaftLogId};

use crate::types::{Entry, NodeId};

/// The environment variable that arms a failpoint.
pub const VAR: &str = "HOST_TEST_FAILPOINT";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failpoint {
    CrashBeforeFinalMembership,
}

impl Failpoint {
    const NAMES: [(&'static str, Failpoint); 1] =
        [("crash-before-final-membership", Failpoint::CrashBeforeFinalMembership)];

    /// The failpoint armed in this process's environment, if any. An unknown name is an
    /// error rather than nothing armed: a misspelt name would otherwise let a test pass
    /// without its fault.
    pub fn from_env() -> io::Result<Option<Failpoint>> {
        match std::env::var(VAR) {
            Err(VarError::NotPresent) => Ok(None),
            Err(VarError::NotUnicode(v)) => Err(Self::unknown(&v.to_string_lossy())),
            Ok(v) => Self::parse(&v),
        }
    }

    /// `""` arms nothing (an orchestrator may set the variable empty).
    pub fn parse(name: &str) -> io::Result<Option<Failpoint>> {
        if name.is_empty() {
            return Ok(None);
        }
        Self::NAMES.iter().find(|(n, _)| *n == name).map(|(_, f)| Some(*f)).ok_or_else(|| Self::unknown(name))
    }

    fn unknown(name: &str) -> io::Error {
        let known: Vec<&str> = Self::NAMES.iter().map(|(n, _)| *n).collect();
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{VAR}={name:?} names no failpoint (known: {}); it is for tests only", known.join(", ")),
        )
    }

    /// Whether appending `entries` on member `me` reaches this failpoint; `log` holds the
    /// entries before them.
    pub fn reached(self, me: NodeId, entries: &[Entry], log: &BTreeMap<u64, Entry>) -> bool {
        match self {
            Failpoint::CrashBeforeFinalMembership => final_after_joint(me, entries, log),
        }
    }

    /// Stops the process the way a crash does: no destructor runs, nothing buffered is
    /// flushed, no goodbye to the peers.
    pub fn fire(self) -> ! {
        tracing::error!(failpoint = ?self, "{VAR}: aborting the process here, as a test asked");
        std::process::abort()
    }
}

/// One of `entries` is a uniform membership that `me` made as leader, and the membership
/// before it (earlier in `entries`, else in `log`) is joint: the second step of a change.
/// A follower receiving the same entry does not match (the entry names another leader).
fn final_after_joint(me: NodeId, entries: &[Entry], log: &BTreeMap<u64, Entry>) -> bool {
    let joint = |e: &Entry| match &e.payload {
        EntryPayload::Membership(m) => Some(m.get_joint_config().len() > 1),
        _ => None,
    };
    entries.iter().enumerate().any(|(i, e)| {
        let own_final = e.get_log_id().leader_id.node_id == me && joint(e) == Some(false);
        own_final
            && entries[..i].iter().rev().chain(log.range(..e.get_log_id().index).rev().map(|(_, e)| e)).find_map(joint)
                == Some(true)
    })
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use openraft::{CommittedLeaderId, EntryPayload, Membership};

    use super::*;
    use crate::types::{LogId, Request};

    fn membership(leader: NodeId, index: u64, configs: &[&[NodeId]]) -> Entry {
        let configs: Vec<BTreeSet<NodeId>> = configs.iter().map(|c| c.iter().copied().collect()).collect();
        let nodes: BTreeSet<NodeId> = configs.iter().flatten().copied().collect();
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(2, leader), index),
            payload: EntryPayload::Membership(Membership::new(configs, nodes)),
        }
    }

    fn normal(leader: NodeId, index: u64) -> Entry {
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(2, leader), index),
            payload: EntryPayload::Normal(Request::commands(vec![b"x".to_vec()])),
        }
    }

    fn log(entries: Vec<Entry>) -> BTreeMap<u64, Entry> {
        entries.into_iter().map(|e| (e.log_id.index, e)).collect()
    }

    #[test]
    fn names_parse_and_unknown_ones_are_refused() {
        assert_eq!(Failpoint::parse("").expect("empty"), None);
        assert_eq!(
            Failpoint::parse("crash-before-final-membership").expect("known"),
            Some(Failpoint::CrashBeforeFinalMembership)
        );
        let err = Failpoint::parse("crash-before-final-membrship").expect_err("misspelt");
        assert!(err.to_string().contains("crash-before-final-membership"), "{err}");
    }

    #[test]
    fn only_the_leaders_final_step_after_a_joint_one_is_reached() {
        let fp = Failpoint::CrashBeforeFinalMembership;
        let joint = membership(1, 5, &[&[1, 2, 3], &[1, 2, 3, 4]]);
        let before = log(vec![membership(1, 0, &[&[1, 2, 3]]), normal(1, 4), joint.clone(), normal(1, 6)]);
        let last = membership(1, 7, &[&[1, 2, 3, 4]]);

        assert!(fp.reached(1, std::slice::from_ref(&last), &before), "the leader's second step");
        assert!(!fp.reached(2, std::slice::from_ref(&last), &before), "a follower receiving it");
        assert!(
            fp.reached(1, &[joint.clone(), normal(1, 6), last.clone()], &log(vec![normal(1, 4)])),
            "both steps in one append"
        );
        assert!(!fp.reached(1, std::slice::from_ref(&joint), &log(vec![normal(1, 4)])), "the first step");
        let settled = log(vec![membership(1, 0, &[&[1, 2, 3]]), normal(1, 6)]);
        assert!(!fp.reached(1, std::slice::from_ref(&last), &settled), "a uniform change after a uniform one");
        assert!(!fp.reached(1, &[normal(1, 8)], &before), "no membership at all");
    }
}
