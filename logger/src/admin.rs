//! The logger's admin HTTP: `GET /status`, `GET /metrics`, `GET /recover`, `POST /truncate`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::Uri;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use host::store::files::{read_small, write_small};
use host::types::NodeId;
use serde::Serialize;
use tokio::net::TcpListener;

use crate::follow::Cluster;
use crate::sm::lock;

pub struct Admin {
    pub clusters: Vec<Arc<Cluster>>,
    pub token: String,
}

pub async fn serve(listener: TcpListener, admin: Arc<Admin>) {
    let router = Router::new()
        .route("/status", get(status))
        .route("/metrics", get(metrics))
        .route("/recover", get(recover))
        .route("/truncate", post(truncate))
        .layer(axum::extract::DefaultBodyLimit::max(64 * 1024))
        .with_state(admin);
    host::admin::serve_router(listener, router).await;
}

#[derive(Debug, Serialize)]
pub struct ClusterStatus {
    /// The logger id (`--id`), which names the archive.
    pub id: String,
    pub node_id: NodeId,
    pub cluster_id: Option<String>,
    pub state: String,
    pub leader_id: Option<NodeId>,
    /// The last index in the archive (entry or snapshot).
    pub archived_index: u64,
    /// The cluster's commit index, as its leader last reported it.
    pub committed: u64,
    /// Committed entries not archived yet.
    pub lag: u64,
    pub records: u64,
    pub commands: u64,
    pub first_index: Option<u64>,
    pub last_index: Option<u64>,
    pub bytes: u64,
}

fn cluster_status(c: &Cluster) -> ClusterStatus {
    let m = c.raft.metrics().borrow().clone();
    let a = lock(&c.archive);
    ClusterStatus {
        id: c.name.clone(),
        node_id: c.node_id,
        cluster_id: c.identity.cluster().map(str::to_string),
        state: format!("{:?}", m.state),
        leader_id: m.current_leader,
        archived_index: a.last.map_or(0, |l| l.index),
        committed: c.stats.cluster_committed.load(Ordering::Relaxed),
        lag: c.stats.lag(),
        records: a.summary.records,
        commands: a.summary.commands,
        first_index: a.summary.first_index,
        last_index: a.summary.last_index,
        bytes: a.summary.bytes,
    }
}

async fn status(State(admin): State<Arc<Admin>>) -> Response {
    let clusters: Vec<ClusterStatus> = admin.clusters.iter().map(|c| cluster_status(c)).collect();
    Json(serde_json::json!({ "clusters": clusters })).into_response()
}

/// A gauge of `/metrics`: name, help, and its value in a cluster's status.
type Gauge = (&'static str, &'static str, fn(&ClusterStatus) -> u64);

async fn metrics(State(admin): State<Arc<Admin>>) -> Response {
    let mut page = String::new();
    let gauges: [Gauge; 6] = [
        ("logger_archived_index", "last index in the archive", |s| s.archived_index),
        ("logger_cluster_committed_index", "the cluster's commit index as last heard", |s| s.committed),
        ("logger_lag_entries", "committed entries not archived yet", |s| s.lag),
        ("logger_archived_entries", "entries in the archive", |s| s.records),
        ("logger_archived_commands", "commands in the archive", |s| s.commands),
        ("logger_archive_bytes", "size of the archive file", |s| s.bytes),
    ];
    let all: Vec<ClusterStatus> = admin.clusters.iter().map(|c| cluster_status(c)).collect();
    for (name, help, f) in gauges {
        let _ = writeln!(page, "# HELP {name} {help}\n# TYPE {name} gauge");
        for s in &all {
            let _ = writeln!(page, "{name}{{cluster=\"{}\"}} {}", s.id, f(s));
        }
    }
    let _ = writeln!(page, "# HELP logger_truncations_total truncations done\n# TYPE logger_truncations_total counter");
    for c in &admin.clusters {
        let _ = writeln!(
            page,
            "logger_truncations_total{{cluster=\"{}\"}} {}",
            c.name,
            c.stats.truncations.load(Ordering::Relaxed)
        );
    }
    ([("content-type", "text/plain; version=0.0.4")], page).into_response()
}

/// The query's `key=value` pairs. Values here are ids and numbers, so they are taken as
/// they come: a percent-encoded one fails to parse and is refused as such.
fn query(uri: &Uri) -> HashMap<String, String> {
    uri.query()
        .unwrap_or("")
        .split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| match kv.split_once('=') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None => (kv.to_string(), String::new()),
        })
        .collect()
}

fn refuse(code: StatusCode, why: impl Into<String>) -> Response {
    (code, Json(serde_json::json!({ "error": why.into() }))).into_response()
}

fn find<'a>(admin: &'a Admin, q: &HashMap<String, String>) -> Result<&'a Arc<Cluster>, Response> {
    let Some(name) = q.get("cluster") else {
        return Err(refuse(StatusCode::BAD_REQUEST, "missing ?cluster=<logger id>"));
    };
    admin.clusters.iter().find(|c| c.name == *name).ok_or_else(|| {
        let known: Vec<&str> = admin.clusters.iter().map(|c| c.name.as_str()).collect();
        refuse(StatusCode::NOT_FOUND, format!("unknown cluster id {name:?}; this logger follows {}", known.join(", ")))
    })
}

fn index(q: &HashMap<String, String>, key: &str) -> Result<u64, Response> {
    let v = q.get(key).ok_or_else(|| refuse(StatusCode::BAD_REQUEST, format!("missing ?{key}=<log index>")))?;
    match v.parse::<u64>() {
        Ok(i) => Ok(i),
        Err(e) => Err(refuse(StatusCode::BAD_REQUEST, format!("{key}={v:?} is not a log index: {e}"))),
    }
}

/// Refuses a request without the cluster token, when there is one.
fn authorized(admin: &Admin, headers: &HeaderMap) -> Result<(), Response> {
    if admin.token.is_empty() {
        return Ok(());
    }
    let given = headers.get(host::admin::TOKEN_HEADER).and_then(|v| v.to_str().ok()).unwrap_or("");
    if host::net::same_secret(given.as_bytes(), admin.token.as_bytes()) {
        Ok(())
    } else {
        Err(refuse(StatusCode::UNAUTHORIZED, "wrong or missing cluster token"))
    }
}

/// `GET /recover?cluster=ID&from=I&to=N`: the records `I..=N` (see `archive::stream` for
/// the body), read from the file as they are sent.
/// The archive holds every command the cluster ran: with a cluster token, only its holders
/// may read it.
async fn recover(State(admin): State<Arc<Admin>>, headers: HeaderMap, uri: Uri) -> Response {
    if let Err(r) = authorized(&admin, &headers) {
        return r;
    }
    let q = query(&uri);
    let c = match find(&admin, &q) {
        Ok(c) => c,
        Err(r) => return r,
    };
    let (from, to) = match (index(&q, "from"), index(&q, "to")) {
        (Ok(f), Ok(t)) => (f, t),
        (Err(r), _) | (_, Err(r)) => return r,
    };
    if to < from {
        return refuse(StatusCode::BAD_REQUEST, format!("from={from} is past to={to}"));
    }
    let opened = {
        let a = lock(&c.archive);
        let last = a.last.map_or(0, |l| l.index);
        if to > last {
            return refuse(
                StatusCode::RANGE_NOT_SATISFIABLE,
                format!("to={to} is past the archive's last index {last}"),
            );
        }
        a.open_range(from, to)
    };
    let (file, plan) = match opened {
        Ok(x) => x,
        Err(why) => return refuse(StatusCode::RANGE_NOT_SATISFIABLE, why),
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(4);
    tokio::task::spawn_blocking(move || {
        let mut send = |chunk: Vec<u8>| tx.blocking_send(Ok(Bytes::from(chunk))).is_ok();
        if let Err(e) = crate::archive::stream(file, plan, &mut send) {
            // Ends the body with an error: the client sees a cut answer, never a short one
            // that looks whole.
            let _ = tx.blocking_send(Err(e));
        }
    });
    let body = futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|b| (b, rx)) });
    ([("content-type", "application/octet-stream")], Body::from_stream(body)).into_response()
}

/// `POST /truncate?cluster=ID&voter=N&below=T`: voter N agrees that records below T may
/// be discarded. Nothing is discarded until a majority of the cluster's voters agree, and
/// then only below the smallest T among them. Requests are kept in `<dir>/<id>.truncate`
/// (see [`record_ask`]), so a restart forgets none.
async fn truncate(State(admin): State<Arc<Admin>>, headers: HeaderMap, uri: Uri) -> Response {
    if let Err(r) = authorized(&admin, &headers) {
        return r;
    }
    let q = query(&uri);
    let c = match find(&admin, &q) {
        Ok(c) => c.clone(),
        Err(r) => return r,
    };
    let voter = match q.get("voter").map(|v| v.parse::<NodeId>()) {
        Some(Ok(v)) => v,
        Some(Err(e)) => return refuse(StatusCode::BAD_REQUEST, format!("voter is not a node id: {e}")),
        None => return refuse(StatusCode::BAD_REQUEST, "missing ?voter=<node id>"),
    };
    let below = match index(&q, "below") {
        Ok(b) => b,
        Err(r) => return r,
    };
    let voters: BTreeSet<NodeId> = c.raft.metrics().borrow().membership_config.membership().voter_ids().collect();
    if voters.is_empty() {
        // Just started: its Raft node has not loaded or heard the membership yet.
        return refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            "this logger does not know the cluster's voters yet (just started?); ask again shortly",
        );
    }
    if !voters.contains(&voter) {
        return refuse(
            StatusCode::FORBIDDEN,
            format!("node {voter} is not a voter of this cluster (voters: {voters:?}); only voters decide truncation"),
        );
    }
    let path = lock(&c.archive).path().with_extension("truncate");
    let asks = {
        let c = c.clone();
        tokio::task::spawn_blocking(move || record_ask(&c, &path, voter, below)).await
    };
    let asks = match asks {
        Ok(Ok(asks)) => asks,
        Ok(Err(e)) => return refuse(StatusCode::INTERNAL_SERVER_ERROR, e),
        Err(e) => return refuse(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    };
    let agreed: Vec<u64> = asks.iter().filter(|(v, _)| voters.contains(v)).map(|(_, t)| *t).collect();
    let (agreed, smallest) = (agreed.len(), agreed.iter().copied().min().unwrap_or(0));
    let majority = voters.len() / 2 + 1;
    if agreed < majority {
        return refuse(
            StatusCode::CONFLICT,
            format!(
                "not truncated: {agreed} of {} voters asked; a majority ({majority}) must ask, and then records \
                 are discarded only below the smallest index asked",
                voters.len()
            ),
        );
    }
    let last = lock(&c.archive).last.map_or(0, |l| l.index);
    // The last record stays: it is where the logger resumes after a restart, and its Raft
    // log may already be purged up to it.
    if smallest > last {
        return refuse(
            StatusCode::CONFLICT,
            format!(
                "not truncated: the smallest index asked ({smallest}) is past the archive's last record ({last}), \
                 which is always kept"
            ),
        );
    }
    let archive = c.archive.clone();
    let done = tokio::task::spawn_blocking(move || {
        let mut a = lock(&archive);
        if a.summary.first_index.is_none_or(|f| f >= smallest) {
            return Ok(a.summary.records);
        }
        a.truncate_below(smallest).map(|_| a.summary.records)
    })
    .await;
    match done {
        Ok(Ok(records)) => {
            c.stats.truncations.fetch_add(1, Ordering::Relaxed);
            tracing::info!(cluster = %c.name, below = smallest, "archive truncated");
            Json(serde_json::json!({ "truncated_below": smallest, "records": records })).into_response()
        }
        Ok(Err(e)) => refuse(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        Err(e) => refuse(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// Records that `voter` asks to discard below `below`, durably, in `path` (`<dir>/<id>.truncate`,
/// beside the archive) before anyone is told: a restarted logger remembers the requests
/// made before, so a majority can be reached across restarts. Returns every request on
/// record. The file holds the whole map, replaced atomically.
fn record_ask(c: &Cluster, path: &Path, voter: NodeId, below: u64) -> Result<BTreeMap<NodeId, u64>, String> {
    let mut asks = c.truncate_asks.lock().unwrap_or_else(|p| p.into_inner());
    if asks.is_empty() {
        // First request since the logger started: the ones recorded before count too.
        let recorded: Option<BTreeMap<NodeId, u64>> = read_small(path).map_err(|e| e.to_string())?;
        asks.extend(recorded.unwrap_or_default());
    }
    let mut next = asks.clone();
    next.insert(voter, below);
    write_small(path, &next).map_err(|e| format!("recording the request in {}: {e}", path.display()))?;
    *asks = next.clone();
    Ok(next)
}
