//! Joining a cluster: the request a node sends to any member's `POST /join`, the
//! leader's policy for it (`policy`), and the node's side that asks until it is in
//! (`client`).

pub mod client;
pub mod policy;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::types::{NodeId, Role};

/// A node's request to become a member. The module hash and the settings digest let the
/// leader refuse a node that would compute a different state; the cluster id and member uid
/// let it refuse a member of another cluster and a process that would take a member's id.
///
/// A node not yet bound to a cluster asks without `cluster_id`: once every check passes it
/// is told the cluster id (202) and nothing else changes. It records the id in `node.json`
/// and asks again with it; only then is it added, so no entry reaches a node that could
/// still forget which cluster it belongs to.
#[derive(Debug, Serialize, Deserialize, Clone)]
pub struct JoinRequest {
    pub id: NodeId,
    pub raft_addr: String,
    pub admin_addr: String,
    pub client_addr: String,
    pub fsm_sha256: String,
    pub fsm_config_sha256: String,
    #[serde(default)]
    pub learner: bool,
    /// 0 from a release before versioned joins.
    #[serde(default)]
    pub protocol_version: u32,
    #[serde(default)]
    pub member_uid: String,
    #[serde(default)]
    pub cluster_id: Option<String>,
    /// The joiner has no log: it cannot take the place of a voter, whose acknowledged
    /// entries it would not hold.
    #[serde(default)]
    pub empty_log: bool,
    /// `--fuel-per-entry` and `--guest-memory-mb`; absent from releases before they were
    /// compared.
    #[serde(flatten)]
    pub limits: Option<crate::identity::GuestLimits>,
    /// A logger has no guest to compare and is never promoted; replicas from releases
    /// before roles send none.
    #[serde(default)]
    pub role: Role,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct JoinReply {
    pub ok: bool,
    #[serde(default)]
    pub message: String,
    /// With 421: the leader's admin address, to retry there.
    #[serde(default)]
    pub leader_admin: Option<String>,
    /// With 200 and 202: the cluster the joiner belongs to.
    #[serde(default)]
    pub cluster_id: Option<String>,
}

/// Digest of the guest settings, order included (the guest sees them in order).
pub fn config_sha256(config: &[(String, String)]) -> String {
    let mut h = Sha256::new();
    for (k, v) in config {
        h.update((k.len() as u64).to_be_bytes());
        h.update(k.as_bytes());
        h.update((v.len() as u64).to_be_bytes());
        h.update(v.as_bytes());
    }
    hex::encode(h.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_digest_depends_on_order_and_boundaries() {
        let a = config_sha256(&[("a".into(), "1".into()), ("b".into(), "2".into())]);
        let b = config_sha256(&[("b".into(), "2".into()), ("a".into(), "1".into())]);
        let c = config_sha256(&[("a".into(), "1b".into()), ("".into(), "2".into())]);
        assert_ne!(a, b);
        assert_ne!(a, c);
        assert_eq!(a, config_sha256(&[("a".into(), "1".into()), ("b".into(), "2".into())]));
    }
}
