//! The joining node's side: ask the seeds to add this node until one of them (or the
//! leader it points to) does.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::{JoinReply, JoinRequest};
use crate::admin::TOKEN_HEADER;
use crate::backoff::Backoff;

/// A leader may hold a join until the learner has caught up (see `policy`).
const CALL_TIMEOUT: Duration = Duration::from_secs(150);

/// Why a join ended without this node in the cluster: nothing that retrying could fix.
#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    /// Another guest, another cluster, a member's id, a wrong token...
    #[error("{addr} refused to add this node: {why}")]
    Refused { addr: String, why: String },
    #[error("{addr} answered for cluster {given}, not {ours}")]
    OtherCluster { addr: String, given: String, ours: String },
    #[error("cannot record cluster id {cluster}: {why}")]
    Bind { cluster: String, why: String },
}

/// Ask the seeds to add us until one (or the leader it points to) accepts. `bind` records
/// the cluster id the leader gives a node that has none, before it asks to be added.
pub async fn join_cluster(
    seeds: &[String],
    mut req: JoinRequest,
    token: &str,
    bind: impl Fn(&str) -> Result<(), String>,
) -> Result<(), JoinError> {
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
    let mut next: Option<String> = None;
    let mut i = 0usize;
    loop {
        let addr = next.take().unwrap_or_else(|| {
            i += 1;
            seeds[(i - 1) % seeds.len()].clone()
        });
        let body = serde_json::to_string(&req).unwrap_or_default();
        match post_json(&addr, "/join", token, &body, CALL_TIMEOUT).await {
            Ok((code, text)) => {
                let r: Option<JoinReply> = serde_json::from_str(&text).ok();
                let msg = r.as_ref().map_or(text.clone(), |r| r.message.clone());
                let given = r.as_ref().and_then(|r| r.cluster_id.clone());
                match (code, given) {
                    (200, given) => {
                        if let (Some(given), Some(ours)) = (given, &req.cluster_id) {
                            if given != *ours {
                                return Err(JoinError::OtherCluster { addr, given, ours: ours.clone() });
                            }
                        }
                        tracing::info!(via = %addr, cluster = ?req.cluster_id, "joined the cluster");
                        return Ok(());
                    }
                    (202, Some(cluster)) if req.cluster_id.is_none() => {
                        bind(&cluster).map_err(|why| JoinError::Bind { cluster: cluster.clone(), why })?;
                        tracing::info!(via = %addr, %cluster, "accepted into the cluster; asking to be added");
                        req.cluster_id = Some(cluster);
                        next = Some(addr);
                        continue;
                    }
                    (401 | 409 | 400, _) => return Err(JoinError::Refused { addr, why: msg }),
                    (421, _) => next = r.and_then(|r| r.leader_admin),
                    _ => tracing::info!(via = %addr, code, %msg, "join not done yet; retrying"),
                }
            }
            Err(e) => tracing::info!(via = %addr, error = %e, "join attempt failed; retrying"),
        }
        backoff.sleep().await;
    }
}

/// A minimal HTTP/1.1 POST (the only client call the host makes is `/join` on a peer).
async fn post_json(
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
}
