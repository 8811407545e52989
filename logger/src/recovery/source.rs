//! The source of a recovery: a logger or a replica, told apart by their `/status`, and
//! the streamed answer of its `GET /recover`.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, HOST};
use hyper::Request;
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::TcpStream;

use super::install::Installer;
use super::RecoveryError;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// A logger, and the id of the followed cluster's archive (`?cluster=`).
    Logger(String),
    Replica,
}

impl Kind {
    pub fn as_str(&self) -> &'static str {
        match self {
            Kind::Logger(_) => "logger",
            Kind::Replica => "replica",
        }
    }
}

/// A source that answered `/status`.
#[derive(Debug, Clone)]
pub struct Source {
    pub addr: String,
    pub kind: Kind,
    /// What it has archived (logger) or applied (replica) when asked.
    pub last_index: u64,
    /// A replica's guest and settings, which the recovery must match.
    pub fsm_sha256: Option<String>,
    pub fsm_config: Option<Vec<(String, String)>>,
    token: String,
}

/// A `/recover` answer whose head has arrived; its body is read by [`Answer::pump`].
pub struct Answer {
    body: Incoming,
    /// The replica's guest limits, which the installing guest takes unless told otherwise.
    pub fuel_per_entry: Option<u64>,
    pub guest_memory_mb: Option<u64>,
}

fn field_u64(v: &Value, key: &str) -> Option<u64> {
    v.get(key).and_then(Value::as_u64)
}

impl Source {
    /// Asks `addr` for its `/status`: which kind of source it is, which cluster, how far.
    pub async fn probe(
        addr: &str,
        cluster: Option<&str>,
        token: &str,
        timeout: Duration,
    ) -> Result<Source, RecoveryError> {
        let http = host::http_client::HttpClient::new(timeout);
        let resp = http
            .get(addr, "/status")
            .await
            .map_err(|e| RecoveryError::Failed(format!("{addr} does not answer: {e}")))?;
        if resp.status != 200 {
            return Err(RecoveryError::Failed(format!("{addr}/status answered {}: {}", resp.status, resp.text())));
        }
        let v: Value = serde_json::from_slice(&resp.body).map_err(|e| {
            RecoveryError::Failed(format!("{addr}/status is not JSON ({e}): not a member or a logger?"))
        })?;
        let base = |kind, last_index| Source {
            addr: addr.to_string(),
            kind,
            last_index,
            fsm_sha256: None,
            fsm_config: None,
            token: token.to_string(),
        };
        if let Some(clusters) = v.get("clusters").and_then(Value::as_array) {
            let name = |c: &Value| c.get("id").and_then(Value::as_str).unwrap_or("").to_string();
            let chosen = match cluster {
                Some(want) => clusters
                    .iter()
                    .find(|c| name(c) == want || c.get("cluster_id").and_then(Value::as_str) == Some(want)),
                None if clusters.len() == 1 => clusters.first(),
                None => {
                    let names: Vec<String> = clusters.iter().map(name).collect();
                    return Err(RecoveryError::Input(format!(
                        "the logger at {addr} follows {} clusters ({}): say which with --cluster",
                        names.len(),
                        names.join(", ")
                    )));
                }
            };
            let Some(c) = chosen else {
                let names: Vec<String> = clusters.iter().map(name).collect();
                return Err(RecoveryError::Input(format!(
                    "unknown cluster id {:?}: the logger at {addr} follows {}",
                    cluster.unwrap_or(""),
                    if names.is_empty() { "none".to_string() } else { names.join(", ") }
                )));
            };
            return Ok(base(Kind::Logger(name(c)), field_u64(c, "archived_index").unwrap_or(0)));
        }
        let Some(applied) = field_u64(&v, "last_applied") else {
            return Err(RecoveryError::Failed(format!("{addr}/status is neither a member's nor a logger's")));
        };
        let theirs = v.get("cluster_id").and_then(Value::as_str);
        if let Some(want) = cluster {
            if theirs != Some(want) {
                return Err(RecoveryError::Input(format!(
                    "unknown cluster id {want:?}: the replica at {addr} belongs to cluster {}",
                    theirs.unwrap_or("(none yet)")
                )));
            }
        }
        let config = v.get("fsm_config").and_then(Value::as_array).map(|pairs| {
            pairs
                .iter()
                .filter_map(|p| {
                    let p = p.as_array()?;
                    Some((p.first()?.as_str()?.to_string(), p.get(1)?.as_str()?.to_string()))
                })
                .collect()
        });
        Ok(Source {
            fsm_sha256: v.get("fsm_sha256").and_then(Value::as_str).map(str::to_string),
            fsm_config: config,
            ..base(Kind::Replica, applied)
        })
    }

    /// `GET /recover` for `from..=to`; the answer's head, or why there is none. A range
    /// the source does not hold, an unknown cluster, a refused token are the operator's
    /// to fix; a source that does not answer is a failure.
    pub async fn recover(&self, from: u64, to: u64, timeout: Duration) -> Result<Answer, RecoveryError> {
        let path = match &self.kind {
            Kind::Logger(name) => format!("/recover?cluster={name}&from={from}&to={to}"),
            Kind::Replica => format!("/recover?from={from}&to={to}"),
        };
        let what = format!("GET {path} on {}", self.addr);
        let failed = |why: String| RecoveryError::Failed(format!("{what}: {why}"));
        let exchange = async {
            let stream = TcpStream::connect(&self.addr).await.map_err(|e| failed(format!("cannot connect: {e}")))?;
            let _ = stream.set_nodelay(true);
            let (mut sender, conn) =
                hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(|e| failed(e.to_string()))?;
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    tracing::debug!(error = %e, "recover connection ended");
                }
            });
            let mut req = Request::get(&path)
                .header(HOST, HeaderValue::from_str(&self.addr).map_err(|e| failed(e.to_string()))?)
                .body(Empty::<Bytes>::new())
                .map_err(|e| failed(e.to_string()))?;
            if !self.token.is_empty() {
                let v = HeaderValue::from_str(&self.token).map_err(|e| failed(format!("the cluster token: {e}")))?;
                req.headers_mut().insert(host::admin::TOKEN_HEADER, v);
            }
            sender.send_request(req).await.map_err(|e| failed(e.to_string()))
        };
        let resp = tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| failed(format!("no answer within {timeout:?}")))??;
        let status = resp.status().as_u16();
        let header = |k: &str| resp.headers().get(k).and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok());
        let (fuel_per_entry, guest_memory_mb) = (header("x-fuel-per-entry"), header("x-guest-memory-mb"));
        if status != 200 {
            let body = tokio::time::timeout(timeout, resp.into_body().collect())
                .await
                .ok()
                .and_then(Result::ok)
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            let text = String::from_utf8_lossy(&body[..body.len().min(4096)]).into_owned();
            let why = serde_json::from_str::<Value>(&text)
                .ok()
                .and_then(|v| v.get("error").and_then(Value::as_str).map(str::to_string))
                .unwrap_or(text);
            return Err(match status {
                400 | 401 | 403 | 404 | 416 => RecoveryError::Input(format!("{what}: {status}: {why}")),
                _ => failed(format!("{status}: {why}")),
            });
        }
        Ok(Answer { body: resp.into_body(), fuel_per_entry, guest_memory_mb })
    }
}

impl Answer {
    /// Hands the body to the installer as it arrives. `Ok(bytes)` when it ended cleanly;
    /// `Err((bytes, why))` when it was cut off, stalled past `timeout`, or the installer
    /// stopped taking it.
    pub async fn pump(&mut self, installer: &Installer, timeout: Duration) -> Result<u64, (u64, String)> {
        let mut bytes = 0u64;
        loop {
            let frame = match tokio::time::timeout(timeout, self.body.frame()).await {
                Err(_) => return Err((bytes, format!("no bytes for {timeout:?}"))),
                Ok(None) => return Ok(bytes),
                Ok(Some(Err(e))) => return Err((bytes, format!("the answer broke off: {e}"))),
                Ok(Some(Ok(f))) => f,
            };
            if let Ok(data) = frame.into_data() {
                bytes += data.len() as u64;
                if !installer.feed(data).await {
                    return Err((bytes, "the installer stopped".into()));
                }
            }
        }
    }
}
