//! Admin HTTP: `GET /status`, `GET /metrics`, `POST /join`, and the small HTTP client a
//! joining node uses to call `/join`.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use openraft::error::{ChangeMembershipError, ClientWriteError, RaftError};
use openraft::{ChangeMembers, ServerState};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::api::App;
use crate::identity::PROTOCOL_VERSION;
use crate::types::{Member, NodeId};

pub const TOKEN_HEADER: &str = "x-cluster-token";

/// Admin connections served at once: operators, probes and joining members.
pub const MAX_ADMIN_CONNECTIONS: usize = 64;
/// A request's head must arrive within this, or the connection is closed (slowloris).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest request body: a join request is a few hundred bytes.
const MAX_BODY: usize = 64 * 1024;

pub async fn serve(listener: TcpListener, app: Arc<App>) {
    let router = Router::new()
        .route("/status", get(status))
        .route("/metrics", get(metrics))
        .route("/join", post(join))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .with_state(app);
    crate::net::accept_loop(listener, "admin", MAX_ADMIN_CONNECTIONS, move |stream| {
        let service = hyper_util::service::TowerToHyperService::new(router.clone());
        async move {
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "admin connection closed");
            }
        }
    })
    .await;
}

#[derive(Debug, Serialize, Deserialize, Clone, PartialEq, Eq)]
pub struct MemberStatus {
    pub id: NodeId,
    pub raft_addr: String,
    pub admin_addr: String,
    pub client_addr: String,
    pub voter: bool,
    /// The member uid on record; empty for a member that joined before uids existed.
    pub uid: String,
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

fn members(app: &App) -> Vec<MemberStatus> {
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
        fsm_sha256: app.fsm_sha256.clone(),
        fsm_config: app.fsm_config.clone(),
        state_digest: hex::encode(applied.digest),
    })
}

async fn status(State(app): State<Arc<App>>) -> Response {
    match current_status(&app).await {
        Ok(s) => Json(s).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e).into_response(),
    }
}

async fn metrics(State(app): State<Arc<App>>) -> Response {
    let m = app.raft.metrics().borrow().clone();
    let mut out = String::new();
    let gauges: [(&str, &str, u64); 6] = [
        ("term", "Current Raft term", m.current_term),
        ("last_log_index", "Index of the last log entry", m.last_log_index.unwrap_or(0)),
        ("applied_index", "Index of the last applied entry", m.last_applied.map_or(0, |l| l.index)),
        ("snapshot_index", "Last index in the current snapshot", m.snapshot.map_or(0, |l| l.index)),
        ("is_leader", "1 on the leader", u64::from(m.state == ServerState::Leader)),
        ("members", "Members in the current configuration", m.membership_config.membership().nodes().count() as u64),
    ];
    for (name, help, v) in gauges {
        let _ = writeln!(out, "# HELP wasm_raft_{name} {help}\n# TYPE wasm_raft_{name} gauge\nwasm_raft_{name} {v}");
    }
    app.metrics.render(&mut out);
    ([("content-type", "text/plain; version=0.0.4")], out).into_response()
}

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

fn reply(code: StatusCode, message: impl Into<String>, leader_admin: Option<String>) -> Response {
    let ok = code.is_success();
    (code, Json(JoinReply { ok, message: message.into(), leader_admin, cluster_id: None })).into_response()
}

fn accepted(code: StatusCode, message: String, cluster_id: &str) -> Response {
    let r = JoinReply { ok: true, message, leader_admin: None, cluster_id: Some(cluster_id.to_string()) };
    (code, Json(r)).into_response()
}

/// Why node `req.id` may not take its place in `membership`, if it may not.
fn refuse_existing(req: &JoinRequest, existing: &Member, node: &Member, is_voter: bool) -> Option<String> {
    let mut why = Vec::new();
    if !existing.uid.is_empty() && existing.uid != req.member_uid {
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

async fn join(State(app): State<Arc<App>>, headers: HeaderMap, body: axum::body::Bytes) -> Response {
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
    if !app.token.is_empty() {
        let given = headers.get(TOKEN_HEADER).and_then(|v| v.to_str().ok()).unwrap_or("");
        if !crate::net::same_secret(given.as_bytes(), app.token.as_bytes()) {
            tracing::warn!(node = req.id, "join refused: wrong cluster token");
            return reply(StatusCode::UNAUTHORIZED, "wrong or missing cluster token", None);
        }
    }
    if req.fsm_sha256 != app.fsm_sha256 {
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
    if req.fsm_config_sha256 != ours {
        return reply(
            StatusCode::CONFLICT,
            format!(
                "guest settings mismatch: node {} was started with different --fsm-config values than the cluster ({:?})",
                req.id, app.fsm_config
            ),
            None,
        );
    }
    if let Some(why) = crate::identity::refuse_limits(req.id, req.limits.as_ref(), &app.sm.limits().pinned()) {
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
    if m.current_leader != Some(app.id) {
        let leader_admin = m.current_leader.and_then(|l| app.member(l)).map(|n| n.admin_addr);
        return reply(StatusCode::MISDIRECTED_REQUEST, "not the leader", leader_admin);
    }
    let node = Member {
        raft_addr: req.raft_addr.clone(),
        admin_addr: req.admin_addr.clone(),
        client_addr: req.client_addr.clone(),
        uid: req.member_uid.clone(),
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
    if !req.learner && !is_voter {
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
async fn caught_up(app: &App, id: NodeId, within: Duration) -> Result<(), Response> {
    let threshold = app.raft.config().replication_lag_threshold;
    let done = app
        .raft
        .wait(Some(within))
        .metrics(
            |m| {
                // Nothing matched yet: the learner has not answered once, it may not be reachable.
                let matched = m.replication.as_ref().and_then(|r| r.get(&id)).and_then(|l| l.as_ref()).map(|l| l.index);
                m.state != ServerState::Leader
                    || matched.is_some_and(|i| i + threshold >= m.last_log_index.unwrap_or(0))
            },
            "learner to catch up",
        )
        .await;
    match done {
        Ok(m) if m.state == ServerState::Leader => Ok(()),
        Ok(m) => {
            let leader_admin = m.current_leader.and_then(|l| app.member(l)).map(|n| n.admin_addr);
            Err(reply(StatusCode::MISDIRECTED_REQUEST, "not the leader", leader_admin))
        }
        Err(_) => Err(reply(StatusCode::SERVICE_UNAVAILABLE, "learner still catching up; retry", None)),
    }
}

fn membership_error(app: &App, e: &RaftError<NodeId, ClientWriteError<NodeId, Member>>) -> Response {
    match e {
        RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => {
            let leader_admin = f.leader_id.and_then(|l| app.member(l)).map(|n| n.admin_addr);
            reply(StatusCode::MISDIRECTED_REQUEST, "not the leader", leader_admin)
        }
        RaftError::APIError(ClientWriteError::ChangeMembershipError(ChangeMembershipError::InProgress(_))) => {
            reply(StatusCode::SERVICE_UNAVAILABLE, "another membership change is in progress; retry", None)
        }
        other => reply(StatusCode::SERVICE_UNAVAILABLE, other.to_string(), None),
    }
}

/// A minimal HTTP/1.1 POST (the only client call the host makes is `/join` on a peer).
pub async fn post_json(
    addr: &str,
    path: &str,
    token: &str,
    body: &str,
    timeout: Duration,
) -> std::io::Result<(u16, String)> {
    let fut = async {
        let mut s = TcpStream::connect(addr).await?;
        let mut req = format!(
            "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n",
            body.len()
        );
        if !token.is_empty() {
            req.push_str(&format!("{TOKEN_HEADER}: {token}\r\n"));
        }
        req.push_str("\r\n");
        req.push_str(body);
        s.write_all(req.as_bytes()).await?;
        // A join answer is small; a seed that sends more is not one of ours.
        let mut resp = Vec::new();
        (&mut s).take(1 << 20).read_to_end(&mut resp).await?;
        parse_response(&resp)
    };
    tokio::time::timeout(timeout, fut)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, format!("{addr}{path} timed out")))?
}

fn parse_response(resp: &[u8]) -> std::io::Result<(u16, String)> {
    let text = String::from_utf8_lossy(resp);
    let bad = || std::io::Error::new(std::io::ErrorKind::InvalidData, "malformed HTTP response");
    let (head, body) = text.split_once("\r\n\r\n").ok_or_else(bad)?;
    let code = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).ok_or_else(bad)?;
    let chunked = head.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    let body = if chunked { dechunk(body) } else { body.to_string() };
    Ok((code, body))
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_plain_and_chunked_responses() {
        let plain = b"HTTP/1.1 409 Conflict\r\ncontent-length: 5\r\n\r\nhello";
        assert_eq!(parse_response(plain).expect("parse"), (409, "hello".to_string()));
        let chunked = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n";
        assert_eq!(parse_response(chunked).expect("parse"), (200, "abcde".to_string()));
        assert!(parse_response(b"garbage").is_err());
    }

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
        };
        let node = Member {
            raft_addr: req.raft_addr.clone(),
            admin_addr: req.admin_addr.clone(),
            client_addr: req.client_addr.clone(),
            uid: uid.into(),
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
    }

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
