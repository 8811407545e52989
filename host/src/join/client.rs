//! The joining node's side: ask the seeds to add this node until one of them (or the
//! leader it points to) does.

use std::time::Duration;

use super::{JoinReply, JoinRequest};
use crate::admin::TOKEN_HEADER;
use crate::backoff::Backoff;
use crate::http_client::HttpClient;

/// A leader may hold a join until the learner has caught up (see `policy`).
const CALL_TIMEOUT: Duration = Duration::from_secs(150);
/// A join answer is small; a seed that sends more is not one of ours.
const MAX_ANSWER: usize = 1 << 20;

/// Why a join ended without this node in the cluster: nothing that retrying could fix.
#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    /// Another guest, another cluster, a member's id, a wrong token...
    #[error("{addr} refused to add this node: {why}")]
    Refused { addr: String, why: String },
    #[error("{addr} answered for cluster {given}, not {ours}")]
    OtherCluster { addr: String, given: String, ours: String },
    #[error("cannot record cluster id {cluster}: {why}")]
    Bind { cluster: String, why: crate::identity::IdentityError },
}

/// Ask the seeds to add us until one (or the leader it points to) accepts. `bind` records
/// the cluster id the leader gives a node that has none, before it asks to be added.
pub async fn join_cluster(
    seeds: &[String],
    mut req: JoinRequest,
    token: &str,
    bind: impl Fn(&str) -> Result<(), crate::identity::IdentityError>,
) -> Result<(), JoinError> {
    let http = HttpClient::new(CALL_TIMEOUT).with_max_body(MAX_ANSWER);
    let headers: Vec<(&str, &str)> = if token.is_empty() { vec![] } else { vec![(TOKEN_HEADER, token)] };
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
    let mut next: Option<String> = None;
    let mut i = 0usize;
    loop {
        let addr = next.take().unwrap_or_else(|| {
            i += 1;
            seeds[(i - 1) % seeds.len()].clone()
        });
        let body = serde_json::to_string(&req).unwrap_or_default();
        match http.post_json(&addr, "/join", body.as_bytes(), &headers).await {
            Ok(answer) => {
                let (code, text) = (answer.status, answer.text());
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
