//! A Raft learner that archives every committed command of one or several clusters.
//!
//! # Layout
//!
//! - [`config`]: flags, the list of followed clusters, logger ids to Raft node ids.
//! - [`archive`] (re-exported from the host library): the archive file (format, torn
//!   tails, corruption, recover plans, truncation) and `logger inspect`.
//! - [`sm`]: openraft's state machine: applying a committed entry archives it.
//! - [`follow`]: one followed cluster: Raft node, peer server, join, commit index heard.
//! - [`admin`]: `/status`, `/metrics`, `/recover`, `/truncate`.
//! - [`stats`]: per-cluster figures and the throughput file.
//! - [`recovery`]: the `recovery` binary's logic: state transfer from a logger or a
//!   replica into a fresh guest instance.

pub mod admin;
// The archive format lives in the host library: replicas write it too (`--log-commands`)
// and serve it to `recovery`.
pub use host::archive;
pub mod config;
pub mod follow;
pub mod recovery;
pub mod sm;
pub mod stats;

use std::future::Future;
use std::sync::Arc;

use tokio::net::TcpListener;

use crate::config::Opts;

/// Why the logger could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum LoggerError {
    #[error("{0}")]
    Input(String),
    #[error("{0}")]
    Archive(String),
    #[error("{0}")]
    Storage(String),
    #[error("{0}")]
    Raft(String),
    #[error("{0}")]
    Join(String),
}

impl host::daemon::ExitCode for LoggerError {
    /// 2: the operator's to fix (flags, a refused join, a corrupt archive); 1: otherwise.
    fn exit_code(&self) -> i32 {
        match self {
            LoggerError::Input(_) | LoggerError::Join(_) | LoggerError::Archive(_) => 2,
            LoggerError::Storage(_) | LoggerError::Raft(_) => 1,
        }
    }
}

/// Follows every cluster of `opts` until `shutdown` completes.
pub async fn run(opts: Opts, shutdown: impl Future<Output = ()>) -> Result<(), LoggerError> {
    let follows = opts.follows().map_err(LoggerError::Input)?;
    let token = opts.token().map_err(LoggerError::Input)?;
    let admin_listener = TcpListener::bind(&opts.admin_addr)
        .await
        .map_err(|e| LoggerError::Input(format!("cannot listen on {} (--admin-addr): {e}", opts.admin_addr)))?;
    let admin_addr = opts.advertised(&opts.admin_addr);
    let (fatal_tx, mut fatal_rx) = tokio::sync::mpsc::channel::<LoggerError>(follows.len());
    let mut clusters = Vec::new();
    let mut tasks = Vec::new();
    for f in &follows {
        let (c, t) = follow::start(f, &opts, &token, &admin_addr, fatal_tx.clone()).await?;
        tracing::info!(id = %f.name, node = f.node_id, raft = %f.raft_addr, join = %f.join, "following");
        clusters.push(c);
        tasks.extend(t);
    }
    let admin = Arc::new(admin::Admin { clusters: clusters.clone(), token });
    tasks.push(tokio::spawn(admin::serve(admin_listener, admin)));
    let outcome = tokio::select! {
        () = shutdown => Ok(()),
        Some(e) = fatal_rx.recv() => Err(e),
        why = any_stopped(&clusters) => Err(LoggerError::Raft(why)),
    };
    for t in &tasks {
        t.abort();
    }
    for c in &clusters {
        if let Err(e) = c.raft.shutdown().await {
            tracing::warn!(cluster = %c.name, error = %e, "raft shutdown");
        }
    }
    outcome
}

/// Completes when the Raft node of any cluster stops on its own (an archive write failed):
/// the logger exits rather than fall behind silently.
async fn any_stopped(clusters: &[Arc<follow::Cluster>]) -> String {
    let waits = clusters.iter().map(|c| {
        let mut m = c.raft.metrics();
        let name = c.name.clone();
        Box::pin(async move {
            loop {
                if let Err(fatal) = &m.borrow_and_update().running_state {
                    return format!("{name}: raft stopped: {fatal}");
                }
                if m.changed().await.is_err() {
                    return format!("{name}: the raft core exited");
                }
            }
        })
    });
    futures::future::select_all(waits).await.0
}
