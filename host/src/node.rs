//! Start-up and shutdown of a member: check the inputs, open storage, start Raft and the
//! servers, bootstrap or join, then wait for the shutdown signal.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use openraft::{Config, SnapshotPolicy};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;

use crate::admin::{self, config_sha256, JoinReply, JoinRequest};
use crate::api::{self, App};
use crate::config::Opts;
use crate::fsm::{GuestModule, Limits, LoadError};
use crate::lease::Lease;
use crate::metrics::Metrics;
use crate::net::{self, Network};
use crate::store::{GuestSpec, LogStore, StateMachine};
use crate::types::{Member, Raft};

/// Why a member could not start. `Input` errors are the operator's to fix (exit code 2).
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Guest(#[from] LoadError),
    #[error("{0}")]
    Input(String),
    #[error("{0:#}")]
    Other(#[from] anyhow::Error),
    /// Raft stopped under a running member (a storage error, a failed guest install):
    /// serving on would answer from a state that no longer follows the log.
    #[error("raft stopped: {0}; exiting so that the member restarts from its snapshot and log")]
    RaftStopped(String),
}

impl StartError {
    pub fn exit_code(&self) -> i32 {
        match self {
            StartError::Guest(_) | StartError::Input(_) => 2,
            StartError::Other(_) | StartError::RaftStopped(_) => 1,
        }
    }
}

/// What a data dir was created for: a restart with another id or guest would silently
/// become a different member.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
struct Identity {
    id: u64,
    fsm_sha256: String,
    fsm_config_sha256: String,
}

fn check_identity(dir: &Path, ours: &Identity) -> Result<bool, StartError> {
    let path = dir.join("node.json");
    match std::fs::read(&path) {
        Ok(bytes) => {
            let theirs: Identity = serde_json::from_slice(&bytes)
                .map_err(|e| StartError::Input(format!("{}: unreadable: {e}", path.display())))?;
            if theirs.id != ours.id {
                return Err(StartError::Input(format!(
                    "{} belongs to node {}, not node {}",
                    dir.display(),
                    theirs.id,
                    ours.id
                )));
            }
            if theirs.fsm_sha256 != ours.fsm_sha256 {
                return Err(StartError::Input(format!(
                    "{} holds state of guest sha256 {}; --fsm is sha256 {} (a member cannot change its guest)",
                    dir.display(),
                    theirs.fsm_sha256,
                    ours.fsm_sha256
                )));
            }
            if theirs.fsm_config_sha256 != ours.fsm_config_sha256 {
                return Err(StartError::Input(format!(
                    "{} was created with other --fsm-config settings; a member cannot change them",
                    dir.display()
                )));
            }
            Ok(true)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(dir)
                .map_err(|e| StartError::Input(format!("cannot create {}: {e}", dir.display())))?;
            let json = serde_json::to_vec_pretty(ours).map_err(anyhow::Error::from)?;
            crate::store::log::write_file_durably(&path, &json)
                .map_err(|e| StartError::Input(format!("cannot write {}: {e}", path.display())))?;
            Ok(false)
        }
        Err(e) => Err(StartError::Input(format!("cannot read {}: {e}", path.display()))),
    }
}

async fn bind(addr: &str, what: &str) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr).await.map_err(|e| StartError::Input(format!("cannot listen on {addr} ({what}): {e}")))
}

/// How long a stopping member waits for proposals in flight to be answered.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Run a member until `shutdown` completes.
pub async fn run(opts: Opts, shutdown: impl Future<Output = ()>) -> Result<(), StartError> {
    let limits =
        Limits { fuel_per_entry: opts.fuel_per_entry, memory_bytes: opts.guest_memory_mb.saturating_mul(1 << 20) };
    let token = opts.token().map_err(StartError::Input)?;
    let module = Arc::new(GuestModule::load(&opts.fsm, limits)?);
    let data_dir = opts.data_dir();
    let identity = Identity {
        id: opts.id,
        fsm_sha256: module.sha256().to_string(),
        fsm_config_sha256: config_sha256(&opts.fsm_config),
    };
    let existing = check_identity(&data_dir, &identity)?;

    // Ports before anything slow, so a clash is reported at once.
    let raft_l = bind(&opts.raft_addr, "raft").await?;
    let client_l = bind(&opts.client_addr, "client").await?;
    let admin_l = bind(&opts.admin_addr, "admin").await?;
    let text_l = match &opts.text_addr {
        Some(a) => Some(bind(a, "text").await?),
        None => None,
    };

    let profiler = match &opts.cpuprofile {
        Some(path) => Some((
            pprof::ProfilerGuardBuilder::default()
                .frequency(99)
                // Sampling inside these would deadlock or crash the unwinder.
                .blocklist(&["libc", "libgcc", "pthread", "vdso"])
                .build()
                .map_err(|e| StartError::Input(format!("--cpuprofile {}: {e}", path.display())))?,
            path.clone(),
        )),
        None => None,
    };
    if let Some(path) = &opts.memprofile {
        crate::memprof::start()
            .await
            .map_err(|e| StartError::Input(format!("--memprofile {}: {e}", path.display())))?;
    }
    let metrics = Arc::new(Metrics::default());
    let _monitor = match &opts.monitor {
        Some(path) => Some(
            crate::monitor::start(path, Duration::from_secs(1), metrics.clone())
                .map_err(|e| StartError::Input(format!("--monitor {}: {e}", path.display())))?,
        ),
        None => None,
    };
    let log = LogStore::open(&data_dir.join("log"), !opts.no_fsync)
        .and_then(|log| log.leader_writes_ahead(opts.id))
        .map(LogStore::purge_behind_snapshots)
        .map_err(|e| anyhow::anyhow!("opening the log in {}: {e}", data_dir.display()))?;
    let sm = StateMachine::open(
        &data_dir.join("snapshots"),
        GuestSpec {
            module: module.clone(),
            config: opts.fsm_config.clone(),
            guest_dir: data_dir.join("guest"),
            node: opts.id,
        },
        &log,
        metrics.clone(),
    )
    .map_err(|e| StartError::Input(format!("{e:#}")))?;

    let hb = opts.heartbeat_ms.max(10);
    let config = Config {
        cluster_name: "wasm-raft".into(),
        heartbeat_interval: hb,
        election_timeout_min: hb * 5,
        election_timeout_max: hb * 10,
        install_snapshot_timeout: 10_000,
        snapshot_policy: SnapshotPolicy::LogsSinceLast(opts.snapshot_every.max(1)),
        max_in_snapshot_log_to_keep: opts.keep_logs,
        snapshot_max_chunk_size: 1 << 20,
        purge_batch_size: 64,
        // Entries are batches of up to ~1 MiB: keep one AppendEntries frame bounded.
        max_payload_entries: 64,
        ..Default::default()
    }
    .validate()
    .map_err(|e| StartError::Input(format!("raft settings: {e}")))?;

    let lease = Arc::new(Lease::for_timeouts(
        Duration::from_millis(config.election_timeout_min),
        Duration::from_millis(config.election_timeout_max),
    ));
    let network = Network::new(opts.id, token.clone(), lease.clone(), log.durable());
    let raft = Raft::new(opts.id, Arc::new(config), network, log, sm.clone())
        .await
        .map_err(|e| anyhow::anyhow!("starting raft: {e}"))?;
    // Until the vote hold ends, this member may still be bound by a promise, made before
    // a restart, not to help elect anyone but the leader it followed: that includes
    // itself. (A bootstrap still elects at once: it is not timer-driven.)
    let hold = lease.hold_left();
    let mut tasks = Vec::new();
    if !hold.is_zero() {
        raft.runtime_config().elect(false);
        let raft = raft.clone();
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep(hold).await;
            raft.runtime_config().elect(true);
        }));
    }

    let me = Member {
        raft_addr: opts.advertised(&opts.raft_addr),
        admin_addr: opts.advertised(&opts.admin_addr),
        client_addr: opts.advertised(&opts.client_addr),
        uid: String::new(),
    };
    let app = Arc::new(
        App::new(
            opts.id,
            raft.clone(),
            sm,
            metrics,
            Duration::from_millis(opts.proposal_timeout_ms),
            opts.max_frame_bytes,
            token,
            module.sha256().to_string(),
            opts.fsm_config.clone(),
            opts.max_inflight_batches,
            lease.clone(),
        )
        .with_client_limits(opts.max_client_connections, opts.client_request_budget_mb.saturating_mul(1 << 20)),
    );

    tasks.extend([
        tokio::spawn(net::serve(raft_l, raft.clone(), app.token.clone(), lease)),
        tokio::spawn(api::binary::serve(client_l, app.clone())),
        tokio::spawn(admin::serve(admin_l, app.clone())),
    ]);
    if let Some(l) = text_l {
        tasks.push(tokio::spawn(api::text::serve(l, app.clone())));
    }

    let initialized = raft.is_initialized().await.map_err(|e| anyhow::anyhow!("{e}"))?;
    if !initialized && opts.join.is_empty() {
        if existing {
            // A node that bootstraps records its membership at once, so this one was
            // started to join and never got in: bootstrapping now would split the cluster.
            raft.shutdown().await.ok();
            return Err(StartError::Input(format!(
                "{} belongs to a node that has not joined a cluster yet; start it with --join",
                data_dir.display()
            )));
        }
        tracing::info!(id = opts.id, "bootstrapping a one-node cluster");
        raft.initialize(BTreeMap::from([(opts.id, me.clone())]))
            .await
            .map_err(|e| anyhow::anyhow!("bootstrap: {e}"))?;
    }
    let (fatal_tx, mut fatal_rx) = tokio::sync::mpsc::channel::<String>(1);
    if !opts.join.is_empty() {
        let req = JoinRequest {
            id: opts.id,
            raft_addr: me.raft_addr.clone(),
            admin_addr: me.admin_addr.clone(),
            client_addr: me.client_addr.clone(),
            fsm_sha256: module.sha256().to_string(),
            fsm_config_sha256: identity.fsm_config_sha256.clone(),
            learner: opts.learner,
        };
        let token = app.token.clone();
        let seeds = opts.join.clone();
        tasks.push(tokio::spawn(async move {
            if let Err(why) = join_cluster(&seeds, &req, &token).await {
                let _ = fatal_tx.send(why).await;
            }
        }));
    }
    tracing::info!(
        id = opts.id,
        client = %opts.client_addr,
        raft = %opts.raft_addr,
        admin = %opts.admin_addr,
        guest = %module.path().display(),
        sha256 = %module.sha256(),
        "member started"
    );

    let outcome = tokio::select! {
        () = shutdown => Ok(()),
        Some(why) = fatal_rx.recv() => Err(StartError::Input(why)),
        why = raft_stopped(&raft) => {
            tracing::error!(%why, "raft stopped; this member exits");
            Err(StartError::RaftStopped(why))
        }
    };
    tracing::info!("shutting down");
    for t in &tasks {
        t.abort();
    }
    // Connections already open keep their tasks: what they proposed is answered if it
    // commits soon, while new proposals are refused.
    if outcome.is_ok() {
        app.drain(DRAIN_TIMEOUT).await;
    }
    if let Err(e) = raft.shutdown().await {
        tracing::warn!(error = %e, "raft shutdown");
    }
    if let Some((guard, path)) = profiler {
        write_flamegraph(&guard, &path);
    }
    if let Some(path) = &opts.memprofile {
        match crate::memprof::write(path).await {
            Ok(()) => tracing::info!(path = %path.display(), "heap profile written"),
            Err(e) => tracing::error!(error = %e, "no heap profile"),
        }
    }
    outcome
}

/// Completes when Raft's core stops on its own (openraft shuts down on any storage or state
/// machine error), with the reason.
async fn raft_stopped(raft: &Raft) -> String {
    let mut metrics = raft.metrics();
    loop {
        if let Err(fatal) = &metrics.borrow_and_update().running_state {
            return fatal.to_string();
        }
        if metrics.changed().await.is_err() {
            return "the raft core exited".to_string();
        }
    }
}

/// Ask the seeds to add us until one (or the leader it points to) accepts. A refusal that
/// retrying cannot fix (another guest, wrong token) is returned as an error.
async fn join_cluster(seeds: &[String], req: &JoinRequest, token: &str) -> Result<(), String> {
    let body = serde_json::to_string(req).map_err(|e| e.to_string())?;
    let mut backoff = Duration::from_millis(100);
    let mut next: Option<String> = None;
    let mut i = 0usize;
    loop {
        let addr = next.take().unwrap_or_else(|| {
            i += 1;
            seeds[(i - 1) % seeds.len()].clone()
        });
        match admin::post_json(&addr, "/join", token, &body, Duration::from_secs(150)).await {
            Ok((200, _)) => {
                tracing::info!(via = %addr, "joined the cluster");
                return Ok(());
            }
            Ok((code, text)) => {
                let r: Option<JoinReply> = serde_json::from_str(&text).ok();
                let msg = r.as_ref().map_or(text.clone(), |r| r.message.clone());
                match code {
                    401 | 409 | 400 => return Err(format!("{addr} refused to add this node: {msg}")),
                    421 => next = r.and_then(|r| r.leader_admin),
                    _ => tracing::info!(via = %addr, code, %msg, "join not done yet; retrying"),
                }
            }
            Err(e) => tracing::info!(via = %addr, error = %e, "join attempt failed; retrying"),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

fn write_flamegraph(guard: &pprof::ProfilerGuard<'_>, path: &Path) {
    let written = guard.report().build().map_err(|e| e.to_string()).and_then(|report| {
        if report.data.is_empty() {
            // A flame graph of nothing cannot be drawn; an empty file would only mislead.
            return Err("no samples (the member used almost no CPU)".to_string());
        }
        let file = std::fs::File::create(path).map_err(|e| e.to_string())?;
        report.flamegraph(file).map_err(|e| e.to_string())
    });
    match written {
        Ok(()) => tracing::info!(path = %path.display(), "CPU profile written"),
        Err(e) => tracing::warn!(path = %path.display(), error = %e, "CPU profile not written"),
    }
}
