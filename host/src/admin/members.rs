//! Membership operations on the admin API: list the members, remove one (it is told and
//! stops), demote a voter to learner, promote a learner, and hand leadership over (also
//! what a leader does when it is stopped gracefully).
//!
//! Replacing a dead member is removal followed by a fresh join with the same id (its
//! uid is then new). Every change but the list needs the cluster token, when there is
//! one, and is made by the leader: other members answer 421 with its admin address.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use openraft::{ChangeMembers, ServerState};
use serde::{Deserialize, Serialize};

use super::guard::{authorized, membership_error, must_lead, reply};
use super::status::MemberStatus;
use super::TOKEN_HEADER;
use crate::api::App;
use crate::http_client::HttpClient;
use crate::join::policy::caught_up;
use crate::types::NodeId;

/// `GET /members`.
#[derive(Debug, Serialize, Deserialize)]
pub struct Members {
    pub cluster_id: Option<String>,
    pub leader_id: Option<NodeId>,
    /// The voter sets in force: one, or two while a change is in joint consensus.
    pub voter_sets: Vec<Vec<NodeId>>,
    pub joint: bool,
    pub members: Vec<MemberStatus>,
}

/// The body of every change: the member it is about (`to` for a handover; none lets
/// the leader choose).
#[derive(Debug, Serialize, Deserialize, Default)]
pub struct Target {
    #[serde(default)]
    pub id: Option<NodeId>,
}

/// What the leader tells a member it removed, so that it stops.
#[derive(Debug, Serialize, Deserialize)]
pub struct Removed {
    pub cluster_id: String,
    pub id: NodeId,
    pub member_uid: String,
}

pub fn members(app: &App) -> Members {
    let m = app.raft.metrics().borrow().clone();
    let voter_sets: Vec<Vec<NodeId>> =
        m.membership_config.membership().get_joint_config().iter().map(|s| s.iter().copied().collect()).collect();
    Members {
        cluster_id: app.identity.cluster().map(str::to_string),
        leader_id: m.current_leader,
        joint: voter_sets.len() > 1,
        voter_sets,
        members: super::status::members(app),
    }
}

pub(super) async fn list(State(app): State<Arc<App>>) -> Response {
    Json(members(&app)).into_response()
}

/// The target of a change, which must be named and be a member.
fn target(app: &App, body: &[u8]) -> Result<NodeId, Response> {
    let t: Target = serde_json::from_slice(body)
        .map_err(|e| reply(StatusCode::BAD_REQUEST, format!("malformed request: {e}; expected {{\"id\": N}}"), None))?;
    let id = t.id.ok_or_else(|| reply(StatusCode::BAD_REQUEST, "malformed request: no id", None))?;
    if app.member(id).is_none() {
        return Err(reply(StatusCode::NOT_FOUND, format!("node {id} is not a member"), None));
    }
    Ok(id)
}

/// Checks shared by every change: token, leadership, a settled membership.
fn may_change(app: &App, headers: &HeaderMap) -> Result<(), Response> {
    authorized(app, headers)?;
    must_lead(app)?;
    if members(app).joint {
        return Err(reply(StatusCode::SERVICE_UNAVAILABLE, "a membership change is still in progress; retry", None));
    }
    Ok(())
}

fn voters(app: &App) -> BTreeSet<NodeId> {
    app.raft.metrics().borrow().membership_config.membership().voter_ids().collect()
}

/// `POST /members/remove {"id": N}`.
pub(super) async fn remove(State(app): State<Arc<App>>, headers: HeaderMap, body: axum::body::Bytes) -> Response {
    let id = match may_change(&app, &headers).and_then(|()| target(&app, &body)) {
        Ok(id) => id,
        Err(r) => return r,
    };
    let voters = voters(&app);
    if id == app.id {
        return reply(
            StatusCode::CONFLICT,
            "this member leads: hand leadership over first (POST /leader/transfer), then remove it through the new leader",
            None,
        );
    }
    if voters.contains(&id) && voters.len() == 1 {
        return reply(StatusCode::CONFLICT, format!("node {id} is the last voter"), None);
    }
    let Some(node) = app.member(id) else {
        return reply(StatusCode::NOT_FOUND, format!("node {id} is not a member"), None);
    };
    let change = if voters.contains(&id) {
        ChangeMembers::RemoveVoters(BTreeSet::from([id]))
    } else {
        ChangeMembers::RemoveNodes(BTreeSet::from([id]))
    };
    tracing::info!(node = id, "removing a member");
    if let Err(e) = app.raft.change_membership(change, false).await {
        return membership_error(&app, &e);
    }
    // Told after the change is committed: a removed member no longer hears from the
    // leader, and would otherwise go on serving what it last had.
    if let Some(cluster_id) = app.identity.cluster().map(str::to_string) {
        let notice = Removed { cluster_id, id, member_uid: node.uid.clone() };
        tokio::spawn(tell_removed(node.admin_addr.clone(), app.token.clone(), notice));
    }
    reply(StatusCode::OK, format!("node {id} removed"), None)
}

/// Best effort: a dead member is not there to be told, and a live one is told again by
/// an operator's retry of the removal's notice if this fails.
async fn tell_removed(admin_addr: String, token: String, notice: Removed) {
    let http = HttpClient::new(Duration::from_secs(5)).with_max_body(64 * 1024);
    let body = serde_json::to_vec(&notice).unwrap_or_default();
    let headers: Vec<(&str, &str)> = if token.is_empty() { vec![] } else { vec![(TOKEN_HEADER, token.as_str())] };
    for _ in 0..3 {
        match http.post_json(&admin_addr, "/removed", &body, &headers).await {
            Ok(a) if a.status == 200 => return,
            Ok(a) => {
                tracing::info!(node = notice.id, status = a.status, answer = %a.text(), "removed member refused the notice")
            }
            Err(e) => tracing::info!(node = notice.id, error = %e, "could not tell a removed member"),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// `POST /removed`, from the leader: this member was removed and stops.
pub(super) async fn removed(State(app): State<Arc<App>>, headers: HeaderMap, body: axum::body::Bytes) -> Response {
    if let Err(r) = authorized(&app, &headers) {
        return r;
    }
    let notice: Removed = match serde_json::from_slice(&body) {
        Ok(n) => n,
        Err(e) => return reply(StatusCode::BAD_REQUEST, format!("malformed notice: {e}"), None),
    };
    // Meant for this very member: another cluster's, or one for the process that held
    // this id before, must not stop it.
    if app.identity.cluster() != Some(notice.cluster_id.as_str())
        || notice.id != app.id
        || notice.member_uid != app.identity.uid
    {
        return reply(StatusCode::CONFLICT, "this notice is for another member", None);
    }
    tracing::warn!(cluster = %notice.cluster_id, "the leader removed this member from the cluster; stopping");
    app.removed.send_replace(true);
    reply(StatusCode::OK, "stopping", None)
}

/// `POST /members/demote {"id": N}`: a voter becomes a learner.
pub(super) async fn demote(State(app): State<Arc<App>>, headers: HeaderMap, body: axum::body::Bytes) -> Response {
    let id = match may_change(&app, &headers).and_then(|()| target(&app, &body)) {
        Ok(id) => id,
        Err(r) => return r,
    };
    let voters = voters(&app);
    if !voters.contains(&id) {
        return reply(StatusCode::CONFLICT, format!("node {id} is not a voter"), None);
    }
    if id == app.id {
        return reply(StatusCode::CONFLICT, "this member leads: hand leadership over first", None);
    }
    if voters.len() == 1 {
        return reply(StatusCode::CONFLICT, format!("node {id} is the last voter"), None);
    }
    tracing::info!(node = id, "demoting a voter to learner");
    match app.raft.change_membership(ChangeMembers::RemoveVoters(BTreeSet::from([id])), true).await {
        Ok(_) => reply(StatusCode::OK, format!("node {id} is a learner"), None),
        Err(e) => membership_error(&app, &e),
    }
}

/// `POST /members/promote {"id": N}`: a learner becomes a voter once it has caught up.
pub(super) async fn promote(State(app): State<Arc<App>>, headers: HeaderMap, body: axum::body::Bytes) -> Response {
    let id = match may_change(&app, &headers).and_then(|()| target(&app, &body)) {
        Ok(id) => id,
        Err(r) => return r,
    };
    if voters(&app).contains(&id) {
        return reply(StatusCode::OK, format!("node {id} is already a voter"), None);
    }
    if let Err(r) = caught_up(&app, id, Duration::from_secs(30)).await {
        return r;
    }
    tracing::info!(node = id, "promoting a learner to voter");
    match app.raft.change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([id])), false).await {
        Ok(_) => reply(StatusCode::OK, format!("node {id} is a voter"), None),
        Err(e) => membership_error(&app, &e),
    }
}

/// `POST /leader/transfer {"id": N}` (or `{}`: the most caught-up voter).
pub(super) async fn transfer(State(app): State<Arc<App>>, headers: HeaderMap, body: axum::body::Bytes) -> Response {
    if let Err(r) = authorized(&app, &headers).and_then(|()| must_lead(&app)) {
        return r;
    }
    let wanted = match serde_json::from_slice::<Target>(&body) {
        Ok(t) => t.id,
        Err(e) => return reply(StatusCode::BAD_REQUEST, format!("malformed request: {e}"), None),
    };
    match hand_over(&app, wanted, Duration::from_secs(10)).await {
        Ok(to) => reply(StatusCode::OK, format!("node {to} leads"), None),
        Err(HandOver::Refused(why)) => reply(StatusCode::CONFLICT, why, None),
        Err(HandOver::Failed(why)) => reply(StatusCode::SERVICE_UNAVAILABLE, why, None),
    }
}

/// `POST /leader/elect`, from the leader handing over: stand for election now.
pub(super) async fn elect(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    if let Err(r) = authorized(&app, &headers) {
        return r;
    }
    if !voters(&app).contains(&app.id) {
        return reply(StatusCode::CONFLICT, "this member is not a voter", None);
    }
    match app.raft.trigger().elect().await {
        Ok(()) => reply(StatusCode::OK, "standing for election", None),
        Err(e) => reply(StatusCode::SERVICE_UNAVAILABLE, e.to_string(), None),
    }
}

/// Why a handover did not happen.
#[derive(Debug, thiserror::Error)]
pub enum HandOver {
    /// Nothing to hand over to, or not to that member.
    #[error("{0}")]
    Refused(String),
    /// Tried, and this member still leads (or nobody does yet).
    #[error("{0}")]
    Failed(String),
}

/// Hands this leader's leadership to `to` (or the voter that has replicated the most),
/// within `within`; returns who leads then.
///
/// openraft 0.9 has no leadership transfer, and its voters refuse to vote while they have
/// heard from a leader within the election timeout. So the leader stops taking proposals
/// (they are answered "not the leader"; nothing is appended) and stops its heartbeats,
/// waits until the target holds its whole log, waits out the voters' lease, and then
/// asks the target to stand: with the longest log it wins (another voter whose timer
/// fired first may win instead, which is as good). On failure this member goes back to
/// leading normally.
pub async fn hand_over(app: &App, to: Option<NodeId>, within: Duration) -> Result<NodeId, HandOver> {
    let deadline = Instant::now() + within;
    let m = app.raft.metrics().borrow().clone();
    if m.state != ServerState::Leader {
        return Err(HandOver::Refused("not the leader".into()));
    }
    let matched: BTreeMap<NodeId, u64> = m
        .replication
        .as_ref()
        .map(|r| r.iter().map(|(id, l)| (*id, l.map_or(0, |l| l.index))).collect())
        .unwrap_or_default();
    let others: Vec<NodeId> = voters(app).into_iter().filter(|v| *v != app.id).collect();
    let to = match to {
        Some(id) if id == app.id => return Err(HandOver::Refused(format!("node {id} already leads"))),
        Some(id) if !others.contains(&id) => return Err(HandOver::Refused(format!("node {id} is not a voter"))),
        Some(id) => id,
        None => *others
            .iter()
            .max_by_key(|id| matched.get(id).copied().unwrap_or(0))
            .ok_or_else(|| HandOver::Refused("no other voter to hand leadership to".into()))?,
    };
    let Some(target) = app.member(to) else {
        return Err(HandOver::Refused(format!("node {to} is not a member")));
    };
    tracing::info!(to, "handing leadership over");
    app.handing_over.store(true, Ordering::Relaxed);
    app.raft.runtime_config().heartbeat(false);
    let outcome = async {
        let last = app.raft.metrics().borrow().last_log_index.unwrap_or(0);
        let holds_all = app
            .raft
            .wait(Some(deadline.saturating_duration_since(Instant::now())))
            .metrics(
                |m| {
                    m.replication
                        .as_ref()
                        .and_then(|r| r.get(&to))
                        .and_then(|l| l.as_ref())
                        .is_some_and(|l| l.index >= last)
                },
                "target to hold the whole log",
            )
            .await;
        if holds_all.is_err() {
            return Err(HandOver::Failed(format!("node {to} did not catch up in time")));
        }
        // The voters' lease on this leader runs for the longest election timeout after
        // they last heard from it.
        let lease =
            Duration::from_millis(app.raft.config().election_timeout_max + app.raft.config().heartbeat_interval);
        tokio::time::sleep(lease.min(deadline.saturating_duration_since(Instant::now()))).await;
        let http = HttpClient::new(Duration::from_secs(2));
        let headers: Vec<(&str, &str)> =
            if app.token.is_empty() { vec![] } else { vec![(TOKEN_HEADER, app.token.as_str())] };
        match http.post_json(&target.admin_addr, "/leader/elect", b"{}", &headers).await {
            Ok(a) if a.status == 200 => {}
            Ok(a) => tracing::info!(to, status = a.status, answer = %a.text(), "target did not stand"),
            Err(e) => tracing::info!(to, error = %e, "could not ask the target to stand"),
        }
        let me = app.id;
        let moved = app
            .raft
            .wait(Some(deadline.saturating_duration_since(Instant::now())))
            .metrics(|m| m.current_leader.is_some_and(|l| l != me), "another leader")
            .await;
        match moved {
            Ok(m) => Ok(m.current_leader.unwrap_or(to)),
            Err(_) => Err(HandOver::Failed("no other member took over in time; this member still leads".into())),
        }
    }
    .await;
    app.raft.runtime_config().heartbeat(true);
    app.handing_over.store(false, Ordering::Relaxed);
    match &outcome {
        Ok(leader) => tracing::info!(leader, "leadership handed over"),
        Err(e) => tracing::warn!(error = %e, "leadership not handed over"),
    }
    outcome
}

/// How often the leader looks for a membership change left in joint consensus.
const JOINT_CHECK_EVERY: Duration = Duration::from_secs(2);

/// A leadership change between openraft's two membership steps leaves the cluster in
/// joint consensus, and nothing else finishes it (a retried join sees itself in the
/// union): the leader finishes such a change towards the newer voter set, keeping any
/// voter it leaves out as a learner.
pub async fn finish_joint_changes(app: Arc<App>) {
    // A change in progress passes through joint consensus for a moment: only one found
    // at two checks in a row is taken as left behind.
    let mut seen = None;
    loop {
        tokio::time::sleep(JOINT_CHECK_EVERY).await;
        let m = app.raft.metrics().borrow().clone();
        let sets = m.membership_config.membership().get_joint_config().clone();
        if m.state != ServerState::Leader || sets.len() < 2 {
            seen = None;
            continue;
        }
        if seen.as_ref() != Some(&sets) {
            seen = Some(sets);
            continue;
        }
        let Some(newer) = sets.last().cloned() else { continue };
        tracing::warn!(?sets, "finishing a membership change left in joint consensus");
        if let Err(e) = app.raft.change_membership(ChangeMembers::ReplaceAllVoters(newer), true).await {
            tracing::warn!(error = %e, "could not finish the joint membership change yet");
        }
    }
}
