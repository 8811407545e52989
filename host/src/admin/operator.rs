//! The operator's side of the admin API (`kv members`, `kv remove`, ...): call any
//! member, follow the leader it names, and say what happened.

use std::time::Duration;

use super::guard::AdminReply;
use super::TOKEN_HEADER;
use crate::http_client::HttpClient;

#[derive(Debug, thiserror::Error)]
pub enum OperatorError {
    #[error("{0}")]
    Refused(String),
    #[error("no member answered: {0}")]
    Unreachable(String),
}

/// `GET path` from the first member that answers.
pub async fn get(admins: &[String], path: &str, timeout: Duration) -> Result<String, OperatorError> {
    let http = HttpClient::new(timeout);
    let mut last = String::from("no admin address given");
    for addr in admins {
        match http.get(addr, path).await {
            Ok(a) if a.status == 200 => return Ok(a.text()),
            Ok(a) => return Err(OperatorError::Refused(format!("{addr}: {} {}", a.status, a.text()))),
            Err(e) => last = e.to_string(),
        }
    }
    Err(OperatorError::Unreachable(last))
}

/// `POST path` with a JSON body to the leader, found through any member; returns the
/// leader's message.
pub async fn post(
    admins: &[String],
    path: &str,
    body: &serde_json::Value,
    token: &str,
    timeout: Duration,
) -> Result<String, OperatorError> {
    let http = HttpClient::new(timeout);
    let body = body.to_string();
    let headers: Vec<(&str, &str)> = if token.is_empty() { vec![] } else { vec![(TOKEN_HEADER, token)] };
    let mut last = String::from("no admin address given");
    let mut queue: Vec<String> = admins.iter().rev().cloned().collect();
    // Redirects are followed a few times at most: leadership may move while we ask.
    let mut hops = 0;
    while let Some(addr) = queue.pop() {
        match http.post_json(&addr, path, body.as_bytes(), &headers).await {
            Ok(a) => {
                let reply: Option<AdminReply> = serde_json::from_slice(&a.body).ok();
                let message = reply.as_ref().map_or_else(|| a.text(), |r| r.message.clone());
                match a.status {
                    200 => return Ok(message),
                    421 if hops < 5 => {
                        hops += 1;
                        if let Some(leader) = reply.and_then(|r| r.leader_admin) {
                            queue.push(leader);
                        }
                        last = format!("{addr}: not the leader");
                    }
                    code => return Err(OperatorError::Refused(format!("{addr}: {code} {message}"))),
                }
            }
            Err(e) => last = e.to_string(),
        }
    }
    Err(OperatorError::Unreachable(last))
}
