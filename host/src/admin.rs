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
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Status {
    pub id: NodeId,
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
        })
        .collect()
}

pub async fn current_status(app: &App) -> Result<Status, String> {
    // The digest and its index come from the state machine together, so they match.
    let applied = app.sm.applied().await?;
    let m = app.raft.metrics().borrow().clone();
    Ok(Status {
        id: app.id,
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
/// leader refuse a node that would compute a different state.
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
}

#[derive(Debug, Serialize, Deserialize)]
pub struct JoinReply {
    pub ok: bool,
    #[serde(default)]
    pub message: String,
    /// With 421: the leader's admin address, to retry there.
    #[serde(default)]
    pub leader_admin: Option<String>,
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
    (code, Json(JoinReply { ok, message: message.into(), leader_admin })).into_response()
}

async fn join(State(app): State<Arc<App>>, headers: HeaderMap, body: axum::body::Bytes) -> Response {
    let req: JoinRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return reply(StatusCode::BAD_REQUEST, format!("malformed join request: {e}"), None),
    };
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
    let m = app.raft.metrics().borrow().clone();
    if m.current_leader != Some(app.id) {
        let leader_admin = m.current_leader.and_then(|l| app.member(l)).map(|n| n.admin_addr);
        return reply(StatusCode::MISDIRECTED_REQUEST, "not the leader", leader_admin);
    }
    let node = Member {
        raft_addr: req.raft_addr.clone(),
        admin_addr: req.admin_addr.clone(),
        client_addr: req.client_addr.clone(),
        uid: String::new(),
    };
    let membership = m.membership_config.membership().clone();
    let is_voter = membership.voter_ids().any(|v| v == req.id);
    match membership.get_node(&req.id) {
        Some(existing) if *existing == node => {}
        Some(_) => {
            tracing::info!(node = req.id, %node, "member changed its addresses");
            let change = ChangeMembers::SetNodes(BTreeMap::from([(req.id, node.clone())]));
            if let Err(e) = app.raft.change_membership(change, false).await {
                return membership_error(&app, &e);
            }
        }
        None => {
            tracing::info!(node = req.id, %node, "adding learner");
            // Blocking: returns once the learner has caught up, so promoting it next does
            // not stall commits behind a slow new voter.
            match tokio::time::timeout(Duration::from_secs(120), app.raft.add_learner(req.id, node.clone(), true)).await
            {
                Err(_) => return reply(StatusCode::SERVICE_UNAVAILABLE, "learner still catching up; retry", None),
                Ok(Err(e)) => return membership_error(&app, &e),
                Ok(Ok(_)) => {}
            }
        }
    }
    if !req.learner && !is_voter {
        tracing::info!(node = req.id, "promoting to voter");
        let change = ChangeMembers::AddVoterIds(BTreeSet::from([req.id]));
        if let Err(e) = app.raft.change_membership(change, false).await {
            return membership_error(&app, &e);
        }
    }
    reply(StatusCode::OK, format!("node {} is a member", req.id), None)
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
