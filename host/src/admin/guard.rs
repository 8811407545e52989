//! What every admin operation that changes the cluster checks first, and how the admin
//! port answers: the cluster token, that this member leads (or where the leader is), and
//! openraft's membership errors as HTTP statuses. Used by `POST /join` (`join::policy`)
//! and the membership operations (`members`).

use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use openraft::error::{ChangeMembershipError, ClientWriteError, RaftError};
use openraft::ServerState;
use serde::{Deserialize, Serialize};

use super::TOKEN_HEADER;
use crate::api::App;
use crate::types::{Member, NodeId};

/// The admin port's answer to an operation (a join's answer adds the cluster id, see
/// `join::JoinReply`, whose fields start with these).
#[derive(Debug, Serialize, Deserialize)]
pub struct AdminReply {
    pub ok: bool,
    #[serde(default)]
    pub message: String,
    /// With 421: the leader's admin address, to retry there.
    #[serde(default)]
    pub leader_admin: Option<String>,
}

pub fn reply(code: StatusCode, message: impl Into<String>, leader_admin: Option<String>) -> Response {
    let ok = code.is_success();
    (code, Json(AdminReply { ok, message: message.into(), leader_admin })).into_response()
}

/// Refuses a request without the cluster token, when the cluster has one: joins and
/// membership changes are the cluster's own business.
pub fn authorized(app: &App, headers: &HeaderMap) -> Result<(), Response> {
    if app.token.is_empty() {
        return Ok(());
    }
    let given = headers.get(TOKEN_HEADER).and_then(|v| v.to_str().ok()).unwrap_or("");
    if crate::net::same_secret(given.as_bytes(), app.token.as_bytes()) {
        Ok(())
    } else {
        Err(reply(StatusCode::UNAUTHORIZED, "wrong or missing cluster token", None))
    }
}

/// Answers 421 with the leader's admin address (when known) unless this member leads.
pub fn must_lead(app: &App) -> Result<(), Response> {
    let m = app.raft.metrics().borrow().clone();
    if m.current_leader == Some(app.id) && m.state == ServerState::Leader {
        return Ok(());
    }
    Err(not_the_leader(app, m.current_leader))
}

/// 421, with the admin address of `leader` when it is known.
pub fn not_the_leader(app: &App, leader: Option<NodeId>) -> Response {
    let leader_admin = leader.and_then(|l| app.member(l)).map(|n| n.admin_addr);
    reply(StatusCode::MISDIRECTED_REQUEST, "not the leader", leader_admin)
}

pub fn membership_error(app: &App, e: &RaftError<NodeId, ClientWriteError<NodeId, Member>>) -> Response {
    match e {
        RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => not_the_leader(app, f.leader_id),
        RaftError::APIError(ClientWriteError::ChangeMembershipError(ChangeMembershipError::InProgress(_))) => {
            reply(StatusCode::SERVICE_UNAVAILABLE, "another membership change is in progress; retry", None)
        }
        other => reply(StatusCode::SERVICE_UNAVAILABLE, other.to_string(), None),
    }
}
