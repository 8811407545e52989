//! `GET /recover?from=I&to=N`: this member's committed entries `I..=N`, in the byte format
//! of the logger's `recover` (`archive::stream`), so that one client (`recovery`) reads
//! both. When `I` is no longer in the log (or precedes the snapshot), the answer starts
//! with a snapshot record for `current.snap` followed by the file's bytes, then the
//! entries after the snapshot.
//!
//! Nothing is held whole: the snapshot is copied from the file in chunks (from a handle
//! opened before the answer starts, so a newer snapshot renamed into place meanwhile does
//! not change what is sent), and entries are cloned out of the in-memory log a slice (about 1 MiB) at a
//! time, encoded and sent while the next slice waits. An entry purged while the answer is
//! under way (a newer snapshot let the log go) cuts the body off rather than ending it
//! cleanly: the client sees a broken answer, never a short one that looks whole, and asks
//! again from where it got to. At most [`MAX_RECOVERIES`] answers are served at once.

use std::fs::File;
use std::io::{self, Read};
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Json;
use tokio::sync::Semaphore;

use super::TOKEN_HEADER;
use crate::api::App;
use crate::archive::Record;
use crate::store::log::record::encode_record;
use crate::store::snapfile::SnapStream;
use crate::store::SharedLog;
use crate::types::LogId;

/// Answers served at once: each reads the log and a snapshot file as fast as the client
/// takes them, which a member under load can afford for a few recoveries, not for any
/// number of strangers.
pub const MAX_RECOVERIES: usize = 2;
/// Entries cloned out of the log per lock: few enough not to stall appends behind it,
/// and about this many bytes of commands (at least one entry), so a slice of large
/// batched entries does not hold tens of MiB.
const ENTRIES_PER_SLICE: usize = 1024;
const SLICE_BYTES: usize = 1 << 20;
/// Bytes gathered before a chunk goes to the connection.
const CHUNK: usize = 1 << 20;

static SERVING: Semaphore = Semaphore::const_new(MAX_RECOVERIES);

fn refuse(code: StatusCode, why: impl Into<String>) -> Response {
    (code, Json(serde_json::json!({ "error": why.into() }))).into_response()
}

fn index(uri: &Uri, key: &str) -> Result<u64, Response> {
    let found = uri.query().unwrap_or("").split('&').find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='));
    let v = found.ok_or_else(|| refuse(StatusCode::BAD_REQUEST, format!("missing ?{key}=<log index>")))?;
    v.parse::<u64>().map_err(|e| refuse(StatusCode::BAD_REQUEST, format!("{key}={v:?} is not a log index: {e}")))
}

/// What the answer sends: maybe a snapshot first, then entries `from..=to` from the log.
struct Plan {
    snapshot: Option<(File, u64, Record)>,
    from: u64,
    to: u64,
}

pub async fn handle(State(app): State<Arc<App>>, headers: HeaderMap, uri: Uri) -> Response {
    // The whole state and every command: as much a cluster secret as a membership change.
    if !app.token.is_empty() {
        let given = headers.get(TOKEN_HEADER).and_then(|v| v.to_str().ok()).unwrap_or("");
        if !crate::net::same_secret(given.as_bytes(), app.token.as_bytes()) {
            return refuse(StatusCode::UNAUTHORIZED, "wrong or missing cluster token");
        }
    }
    let (from, to) = match (index(&uri, "from"), index(&uri, "to")) {
        (Ok(f), Ok(t)) => (f, t),
        (Err(r), _) | (_, Err(r)) => return r,
    };
    if to < from {
        return refuse(StatusCode::BAD_REQUEST, format!("from={from} is past to={to}"));
    }
    // Only what this member has applied is committed for sure.
    let applied = match app.sm.applied().await {
        Ok(a) => a.last_applied.map(|l| l.index),
        Err(e) => return refuse(StatusCode::SERVICE_UNAVAILABLE, format!("the state machine is not serving: {e}")),
    };
    if applied.is_none_or(|a| to > a) {
        return refuse(
            StatusCode::RANGE_NOT_SATISFIABLE,
            format!("to={to} is past this member's last applied entry {applied:?}"),
        );
    }
    let Ok(permit) = SERVING.try_acquire() else {
        return refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("this member already serves {MAX_RECOVERIES} recoveries; ask another member or later"),
        );
    };
    let log = app.sm.log().clone();
    let snap_path = app.sm.snapshot_path();
    let planned = tokio::task::spawn_blocking(move || plan(&log, &snap_path, from, to).map(|p| (p, log))).await;
    let (plan, log) = match planned {
        Ok(Ok(p)) => p,
        Ok(Err(why)) => return refuse(StatusCode::RANGE_NOT_SATISFIABLE, why),
        Err(e) => return refuse(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, io::Error>>(4);
    tokio::task::spawn_blocking(move || {
        let _permit = permit;
        let mut send = |chunk: Vec<u8>| tx.blocking_send(Ok(Bytes::from(chunk))).is_ok();
        if let Err(e) = stream(&log, plan, &mut send) {
            tracing::warn!(error = %e, "recover answer cut off");
            let _ = tx.blocking_send(Err(e));
        }
    });
    let body = futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|b| (b, rx)) });
    let limits = app.sm.limits();
    (
        [
            ("content-type", "application/octet-stream".to_string()),
            ("x-fuel-per-entry", limits.fuel_per_entry.to_string()),
            ("x-guest-memory-mb", (limits.memory_bytes >> 20).to_string()),
        ],
        Body::from_stream(body),
    )
        .into_response()
}

fn held(log: &SharedLog) -> (Option<u64>, Option<u64>) {
    let mem = log.lock().unwrap_or_else(|p| p.into_inner());
    (mem.entries.first_key_value().map(|(i, _)| *i), mem.entries.last_key_value().map(|(i, _)| *i))
}

fn plan(log: &SharedLog, snap_path: &std::path::Path, from: u64, to: u64) -> Result<Plan, String> {
    let (first, last) = held(log);
    if first.is_some_and(|f| f <= from) && last.is_some_and(|l| to <= l) {
        return Ok(Plan { snapshot: None, from, to });
    }
    let describe = |snap: Option<u64>| {
        let entries = match (first, last) {
            (Some(f), Some(l)) => format!("entries {f}..{l}"),
            _ => "no entries".to_string(),
        };
        match snap {
            Some(s) => format!("a snapshot at {s} and {entries}"),
            None => format!("no snapshot and {entries}"),
        }
    };
    let file = match File::open(snap_path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(format!("this member cannot serve entries {from}..{to}: it holds {}", describe(None)))
        }
        Err(e) => return Err(format!("{}: {e}", snap_path.display())),
    };
    let bytes = file.metadata().map_err(|e| e.to_string())?.len();
    let meta = SnapStream::open(&file, bytes).map_err(|e| format!("{}: {e}", snap_path.display()))?.meta;
    let Some(at) = meta.last_log_id else {
        return Err(format!("this member cannot serve entries {from}..{to}: it holds {}", describe(None)));
    };
    // The snapshot stands in for everything up to its index; the log must go on from it.
    let continues = at.index >= to || first.is_some_and(|f| f <= at.index + 1) && last.is_some_and(|l| to <= l);
    if at.index + 1 < from || at.index > to || !continues {
        return Err(format!("this member cannot serve entries {from}..{to}: it holds {}", describe(Some(at.index))));
    }
    let mark = Record::Snapshot { log_id: at, file: "current.snap".into(), bytes, membership: meta.last_membership };
    Ok(Plan { snapshot: Some((file, bytes, mark)), from: at.index + 1, to })
}

fn entry_bytes(e: &crate::types::Entry) -> usize {
    match &e.payload {
        openraft::EntryPayload::Normal(r) => r.commands.iter().map(|c| c.len() + 8).sum(),
        _ => 64,
    }
}

/// Sends `plan`'s answer through `out` (false: the client went away, stop quietly).
fn stream(log: &SharedLog, plan: Plan, out: &mut impl FnMut(Vec<u8>) -> bool) -> io::Result<()> {
    let mut buf = Vec::with_capacity(CHUNK + (64 << 10));
    if let Some((file, bytes, mark)) = plan.snapshot {
        encode_record(&mark, &mut buf).map_err(io::Error::other)?;
        if !out(std::mem::take(&mut buf)) {
            return Ok(());
        }
        use std::io::Seek;
        let mut file = file;
        file.seek(io::SeekFrom::Start(0))?;
        let mut snap = file.take(bytes);
        loop {
            let mut chunk = vec![0u8; CHUNK];
            let n = snap.read(&mut chunk)?;
            if n == 0 {
                break;
            }
            chunk.truncate(n);
            if !out(chunk) {
                return Ok(());
            }
        }
        if snap.limit() > 0 {
            return Err(io::Error::other("the snapshot file is shorter than when the answer began"));
        }
    }
    let mut next = plan.from;
    let mut last: Option<LogId> = None;
    while next <= plan.to {
        let slice: Vec<crate::types::Entry> = {
            let mem = log.lock().unwrap_or_else(|p| p.into_inner());
            let mut bytes = 0usize;
            mem.entries
                .range(next..=plan.to)
                .take(ENTRIES_PER_SLICE)
                .take_while(|(_, e)| {
                    let more = bytes < SLICE_BYTES;
                    bytes += entry_bytes(e);
                    more
                })
                .map(|(_, e)| e.clone())
                .collect()
        };
        if slice.first().is_none_or(|e| e.log_id.index != next) {
            return Err(io::Error::other(format!(
                "entry {next} is no longer in this member's log (purged behind a newer snapshot); ask again"
            )));
        }
        for entry in slice {
            if entry.log_id.index != next {
                return Err(io::Error::other(format!("the log has entry {} where {next} was due", entry.log_id.index)));
            }
            last = Some(entry.log_id);
            next += 1;
            encode_record(&Record::of_entry(entry), &mut buf).map_err(io::Error::other)?;
            if buf.len() >= CHUNK && !out(std::mem::replace(&mut buf, Vec::with_capacity(CHUNK + (64 << 10)))) {
                return Ok(());
            }
        }
    }
    if !buf.is_empty() {
        out(buf);
    }
    tracing::debug!(from = plan.from, to = plan.to, last = ?last, "recover answer sent");
    Ok(())
}
