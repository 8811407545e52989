//! `GET /status`: where this member stands, as JSON (see the README for the fields).

use std::collections::BTreeSet;
use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use openraft::ServerState;
use serde::{Deserialize, Serialize};

use crate::api::App;
use crate::identity::PROTOCOL_VERSION;
use crate::types::NodeId;

#[derive(Debug, Serialize, Deserialize, Clone, PartialEq, Eq)]
pub struct MemberStatus {
    pub id: NodeId,
    pub raft_addr: String,
    pub admin_addr: String,
    pub client_addr: String,
    pub voter: bool,
    /// The member uid on record; empty for a member that joined before uids existed.
    pub uid: String,
    /// `replica` or `logger` (a logger is a learner that is never promoted).
    #[serde(default)]
    pub role: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Status {
    pub id: NodeId,
    /// `None` until this member has bootstrapped or been accepted into a cluster.
    pub cluster_id: Option<String>,
    pub member_uid: String,
    pub protocol_version: u32,
    pub state: String,
    pub term: u64,
    pub leader_id: Option<NodeId>,
    pub last_log_index: u64,
    pub last_applied: u64,
    pub committed: u64,
    pub snapshot_index: Option<u64>,
    pub members: Vec<MemberStatus>,
    /// A membership change is in joint consensus (two voter sets in force).
    pub joint: bool,
    pub fsm_sha256: String,
    pub fsm_config: Vec<(String, String)>,
    pub state_digest: String,
}

fn state_name(s: ServerState) -> &'static str {
    match s {
        ServerState::Leader => "Leader",
        ServerState::Follower => "Follower",
        ServerState::Learner => "Learner",
        ServerState::Candidate => "Candidate",
        ServerState::Shutdown => "Shutdown",
    }
}

pub(super) fn members(app: &App) -> Vec<MemberStatus> {
    let m = app.raft.metrics().borrow().membership_config.clone();
    let voters: BTreeSet<NodeId> = m.membership().voter_ids().collect();
    m.membership()
        .nodes()
        .map(|(id, n)| MemberStatus {
            id: *id,
            raft_addr: n.raft_addr.clone(),
            admin_addr: n.admin_addr.clone(),
            client_addr: n.client_addr.clone(),
            voter: voters.contains(id),
            uid: n.uid.clone(),
            role: n.role.as_str().to_string(),
        })
        .collect()
}

pub async fn current_status(app: &App) -> Result<Status, String> {
    // The digest and its index come from the state machine together, so they match.
    let applied = app.sm.applied().await?;
    let m = app.raft.metrics().borrow().clone();
    Ok(Status {
        id: app.id,
        cluster_id: app.identity.cluster().map(str::to_string),
        member_uid: app.identity.uid.clone(),
        protocol_version: PROTOCOL_VERSION,
        state: state_name(m.state).to_string(),
        term: m.current_term,
        leader_id: m.current_leader,
        last_log_index: m.last_log_index.unwrap_or(0),
        last_applied: applied.last_applied.map_or(0, |l| l.index),
        committed: m.last_applied.map_or(0, |l| l.index).max(applied.last_applied.map_or(0, |l| l.index)),
        snapshot_index: m.snapshot.map(|l| l.index),
        members: members(app),
        joint: m.membership_config.membership().get_joint_config().len() > 1,
        fsm_sha256: app.fsm_sha256.clone(),
        fsm_config: app.fsm_config.clone(),
        state_digest: hex::encode(applied.digest),
    })
}

pub(super) async fn handle(State(app): State<Arc<App>>) -> Response {
    match current_status(&app).await {
        Ok(s) => Json(s).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e).into_response(),
    }
}
