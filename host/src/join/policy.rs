//! The leader's side of `POST /join`: which nodes may become members, in which role, and
//! when a learner is promoted.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use openraft::{ChangeMembers, ServerState};

use super::{config_sha256, JoinReply, JoinRequest};
use crate::admin::guard::{authorized, membership_error, must_lead, not_the_leader, reply};
use crate::api::App;
use crate::identity::PROTOCOL_VERSION;
use crate::types::{Member, NodeId, Role};

fn accepted(code: StatusCode, message: String, cluster_id: &str) -> Response {
    let r = JoinReply { ok: true, message, leader_admin: None, cluster_id: Some(cluster_id.to_string()) };
    (code, Json(r)).into_response()
}

/// Why node `req.id` may not take its place in `membership`, if it may not.
fn refuse_existing(req: &JoinRequest, existing: &Member, node: &Member, is_voter: bool) -> Option<String> {
    let mut why = Vec::new();
    if existing.role != req.role {
        why.push(format!(
            "node id {} is held by a {} and this node joins as a {}: pick another id",
            req.id,
            existing.role.as_str(),
            req.role.as_str()
        ));
    } else if !existing.uid.is_empty() && existing.uid != req.member_uid {
        why.push(format!(
            "node {} is already a member with member uid {}, and this process has member uid {}: \
             another process holds that id, or this one lost the data dir it joined with",
            req.id, existing.uid, req.member_uid
        ));
    } else if existing.uid.is_empty() && existing != &(Member { uid: String::new(), ..node.clone() }) {
        why.push(format!(
            "node {} joined before member uids existed and this join changes its addresses: \
             join once from its recorded addresses ({existing}) to record its uid",
            req.id
        ));
    }
    if is_voter && req.empty_log {
        why.push(format!(
            "node {} is a voter and this process has an empty log: a voter that lost its data must be \
             removed from the cluster before it joins again (removal is not available through the admin \
             API yet), or its acknowledged entries could be lost",
            req.id
        ));
    }
    if is_voter && req.learner {
        why.push(format!("node {} is a voter; --learner cannot demote it (demotion is not available yet)", req.id));
    }
    (!why.is_empty()).then(|| why.join("; "))
}

pub(crate) async fn handle(State(app): State<Arc<App>>, headers: HeaderMap, body: axum::body::Bytes) -> Response {
    let req: JoinRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return reply(StatusCode::BAD_REQUEST, format!("malformed join request: {e}"), None),
    };
    if req.protocol_version != PROTOCOL_VERSION {
        return reply(
            StatusCode::CONFLICT,
            format!(
                "protocol version mismatch: node {} speaks version {}, this cluster speaks version {PROTOCOL_VERSION} \
                 (members must run the same release)",
                req.id, req.protocol_version
            ),
            None,
        );
    }
    if req.member_uid.is_empty() {
        return reply(StatusCode::BAD_REQUEST, "malformed join request: no member_uid", None);
    }
    if let Err(refused) = authorized(&app, &headers) {
        tracing::warn!(node = req.id, "join refused: wrong cluster token");
        return refused;
    }
    // A logger runs no guest: it archives the commands, it does not compute the state.
    if req.role == Role::Replica && req.fsm_sha256 != app.fsm_sha256 {
        return reply(
            StatusCode::CONFLICT,
            format!(
                "guest module mismatch: node {} runs sha256 {}, the cluster runs {}",
                req.id, req.fsm_sha256, app.fsm_sha256
            ),
            None,
        );
    }
    let ours = config_sha256(&app.fsm_config);
    if req.role == Role::Replica && req.fsm_config_sha256 != ours {
        return reply(
            StatusCode::CONFLICT,
            format!(
                "guest settings mismatch: node {} was started with different --fsm-config values than the cluster ({:?})",
                req.id, app.fsm_config
            ),
            None,
        );
    }
    let limits = app.sm.limits().pinned();
    let refused_limits = || crate::identity::refuse_limits(req.id, req.limits.as_ref(), &limits);
    if let Some(why) = (req.role == Role::Replica).then(refused_limits).flatten() {
        return reply(StatusCode::CONFLICT, why, None);
    }
    let Some(cluster_id) = app.identity.cluster().map(str::to_string) else {
        return reply(StatusCode::SERVICE_UNAVAILABLE, "this node is not a member of a cluster yet", None);
    };
    if let Some(theirs) = req.cluster_id.as_deref().filter(|c| *c != cluster_id) {
        tracing::warn!(node = req.id, theirs, "join refused: another cluster");
        return reply(
            StatusCode::CONFLICT,
            format!(
                "cluster id mismatch: node {} belongs to cluster {theirs}, this is cluster {cluster_id}; \
                 a member of one cluster cannot join another",
                req.id
            ),
            None,
        );
    }
    let m = app.raft.metrics().borrow().clone();
    if let Err(not_leader) = must_lead(&app) {
        return not_leader;
    }
    let node = Member {
        raft_addr: req.raft_addr.clone(),
        admin_addr: req.admin_addr.clone(),
        client_addr: req.client_addr.clone(),
        uid: req.member_uid.clone(),
        role: req.role,
    };
    let membership = m.membership_config.membership().clone();
    let is_voter = membership.voter_ids().any(|v| v == req.id);
    let existing = membership.get_node(&req.id);
    if let Some(why) = existing.and_then(|e| refuse_existing(&req, e, &node, is_voter)) {
        tracing::warn!(node = req.id, uid = %req.member_uid, %why, "join refused");
        return reply(StatusCode::CONFLICT, why, None);
    }
    if req.cluster_id.is_none() {
        // Bound to this cluster from now on; it asks again, and is added then.
        tracing::info!(node = req.id, uid = %req.member_uid, "join accepted; telling the node its cluster id");
        return accepted(
            StatusCode::ACCEPTED,
            format!("node {} may join cluster {cluster_id}; ask again with the cluster id", req.id),
            &cluster_id,
        );
    }
    match existing {
        Some(existing) if *existing == node => {}
        Some(_) => {
            tracing::info!(node = req.id, %node, "member changed its addresses or recorded its uid");
            let change = ChangeMembers::SetNodes(BTreeMap::from([(req.id, node.clone())]));
            if let Err(e) = app.raft.change_membership(change, false).await {
                return membership_error(&app, &e);
            }
        }
        None => {
            tracing::info!(node = req.id, %node, "adding learner");
            if let Err(e) = app.raft.add_learner(req.id, node.clone(), false).await {
                return membership_error(&app, &e);
            }
        }
    }
    // A logger stays a learner: it must never count towards a quorum, so that losing
    // every logger never stops the cluster from committing.
    if !req.learner && !is_voter && req.role == Role::Replica {
        // Promoting a learner that lags would stall commits behind it; it is checked on
        // every join, since a retried or concurrent one may find the learner already added.
        if let Err(r) = caught_up(&app, req.id, Duration::from_secs(120)).await {
            return r;
        }
        tracing::info!(node = req.id, "promoting to voter");
        let change = ChangeMembers::AddVoterIds(BTreeSet::from([req.id]));
        if let Err(e) = app.raft.change_membership(change, false).await {
            return membership_error(&app, &e);
        }
    }
    accepted(StatusCode::OK, format!("node {} is a member of cluster {cluster_id}", req.id), &cluster_id)
}

/// Waits until this leader has replicated to `id` within openraft's replication lag
/// threshold of its last log index (openraft's own test before it calls a learner caught up).
pub(crate) async fn caught_up(app: &App, id: NodeId, within: Duration) -> Result<(), Response> {
    let threshold = app.raft.config().replication_lag_threshold;
    let done_when = |m: &openraft::RaftMetrics<NodeId, Member>| {
        // Nothing matched yet: the learner has not answered once, it may not be reachable.
        let matched = m.replication.as_ref().and_then(|r| r.get(&id)).and_then(|l| l.as_ref()).map(|l| l.index);
        m.state != ServerState::Leader || matched.is_some_and(|i| i + threshold >= m.last_log_index.unwrap_or(0))
    };
    let done = app.raft.wait(Some(within)).metrics(done_when, "learner to catch up").await;
    match done {
        Ok(m) if m.state == ServerState::Leader => Ok(()),
        Ok(m) => Err(not_the_leader(app, m.current_leader)),
        Err(_) => Err(reply(StatusCode::SERVICE_UNAVAILABLE, "learner still catching up; retry", None)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn joiner(uid: &str, empty_log: bool, learner: bool) -> (JoinRequest, Member) {
        let req = JoinRequest {
            id: 3,
            raft_addr: "r3".into(),
            admin_addr: "a3".into(),
            client_addr: "c3".into(),
            fsm_sha256: String::new(),
            fsm_config_sha256: String::new(),
            learner,
            protocol_version: PROTOCOL_VERSION,
            member_uid: uid.into(),
            cluster_id: None,
            empty_log,
            limits: None,
            role: Role::Replica,
        };
        let node = Member {
            raft_addr: req.raft_addr.clone(),
            admin_addr: req.admin_addr.clone(),
            client_addr: req.client_addr.clone(),
            uid: uid.into(),
            role: Role::Replica,
        };
        (req, node)
    }

    #[test]
    fn a_members_id_is_kept_from_other_processes_and_a_voter_from_an_empty_log() {
        let (req, node) = joiner("u1", false, false);
        let on_record = node.clone();
        assert_eq!(refuse_existing(&req, &on_record, &node, true), None, "the member itself");
        let moved = Member { raft_addr: "elsewhere".into(), ..node.clone() };
        assert_eq!(refuse_existing(&req, &moved, &node, true), None, "same uid: new addresses are taken");

        let (other, other_node) = joiner("u2", false, false);
        let why = refuse_existing(&other, &on_record, &other_node, false).expect("another process");
        assert!(why.contains("member uid u1") && why.contains("member uid u2"), "{why}");

        let (empty, empty_node) = joiner("u1", true, false);
        let why = refuse_existing(&empty, &on_record, &empty_node, true).expect("an empty voter");
        assert!(why.contains("empty log") && why.contains("removed"), "{why}");
        assert_eq!(refuse_existing(&empty, &on_record, &empty_node, false), None, "a learner catching up");

        let (learner, learner_node) = joiner("u1", false, true);
        let why = refuse_existing(&learner, &on_record, &learner_node, true).expect("--learner for a voter");
        assert!(why.contains("cannot demote"), "{why}");

        // On record from before uids: its uid is recorded from its own addresses only.
        let legacy = Member { uid: String::new(), ..node.clone() };
        assert_eq!(refuse_existing(&req, &legacy, &node, true), None);
        let legacy_moved = Member { raft_addr: "elsewhere".into(), ..legacy };
        let why = refuse_existing(&req, &legacy_moved, &node, true).expect("legacy, other addresses");
        assert!(why.contains("before member uids"), "{why}");

        // A logger cannot take a replica's id, nor a replica a logger's.
        let (mut logger, logger_node) = joiner("u1", false, true);
        logger.role = Role::Logger;
        let why = refuse_existing(&logger, &on_record, &logger_node, false).expect("a logger on a replica's id");
        assert!(why.contains("held by a replica") && why.contains("as a logger"), "{why}");
        let on_record_logger = Member { role: Role::Logger, ..node.clone() };
        assert!(refuse_existing(&req, &on_record_logger, &node, false).is_some(), "a replica on a logger's id");
        assert_eq!(refuse_existing(&logger, &on_record_logger, &Member { role: Role::Logger, ..node }, false), None);
    }
}
