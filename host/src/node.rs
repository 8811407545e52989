//! Start-up and shutdown of a member: check the inputs, open storage, start Raft and the
//! servers, bootstrap or join, then wait for the shutdown signal.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use openraft::storage::RaftLogStorage;
use openraft::{Config, SnapshotPolicy};
use tokio::net::TcpListener;

use crate::admin::{self, config_sha256, JoinReply, JoinRequest};
use crate::api::{self, App};
use crate::config::Opts;
use crate::fsm::{GuestModule, Limits, LoadError};
use crate::identity::{self, Identity, NodeFile, PROTOCOL_VERSION};
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

async fn bind(addr: &str, what: &str) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr).await.map_err(|e| StartError::Input(format!("cannot listen on {addr} ({what}): {e}")))
}

/// How long a stopping member waits for proposals in flight to be answered.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Run a member until `shutdown` completes.
pub async fn run(opts: Opts, shutdown: impl Future<Output = ()>) -> Result<(), StartError> {
    let limits = Limits {
        fuel_per_entry: opts.fuel_per_entry,
        fuel_per_query: opts.fuel_per_query,
        memory_bytes: opts.guest_memory_mb.saturating_mul(1 << 20),
    };
    let token = opts.token().map_err(StartError::Input)?;
    let module = Arc::new(GuestModule::load(&opts.fsm, limits)?);
    let data_dir = opts.data_dir();
    let node_file = NodeFile {
        id: opts.id,
        fsm_sha256: module.sha256().to_string(),
        fsm_config_sha256: config_sha256(&opts.fsm_config),
        cluster_id: None,
        member_uid: None,
        limits: Some(module.limits.pinned()),
    };
    // Nothing is written here: a start that fails before it bootstraps or joins must leave
    // the data dir as fresh as it found it.
    let found = identity::read(&data_dir).map_err(StartError::Input)?;
    if let Some(f) = &found {
        identity::check_same_node(&data_dir, f, &node_file).map_err(StartError::Input)?;
    }

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
    let mut log = LogStore::open(&data_dir.join("log"), !opts.no_fsync)
        .and_then(|log| log.leader_writes_ahead(opts.id))
        .map(LogStore::purge_behind_snapshots)
        .map_err(|e| anyhow::anyhow!("opening the log in {}: {e}", data_dir.display()))?;
    // What openraft counts as initialized: any entry (purged ones included) or a vote.
    let has_log = log.get_log_state().await.map_err(|e| anyhow::anyhow!("{e}"))?.last_log_id.is_some()
        || log.read_vote().await.map_err(|e| anyhow::anyhow!("{e}"))?.is_some_and(|v| v != Default::default());
    let resolved = identity::resolve(found.as_ref(), has_log, &data_dir).map_err(StartError::Input)?;
    if resolved.rewrite {
        tracing::info!(cluster = ?resolved.cluster_id, uid = %resolved.member_uid,
            "node.json predates cluster ids, member uids or pinned guest limits; recording them");
        let file = NodeFile {
            cluster_id: resolved.cluster_id.clone(),
            member_uid: Some(resolved.member_uid.clone()),
            ..node_file.clone()
        };
        identity::write(&data_dir, &file).map_err(StartError::Input)?;
    }
    let me = Arc::new(Identity::new(opts.id, resolved.member_uid.clone(), resolved.cluster_id.clone()));
    if !has_log && opts.join.is_empty() {
        if let Some(cluster) = &resolved.cluster_id {
            // Bound to a cluster, with nothing of it: founding another would take its
            // id; only the cluster can give this member its log.
            return Err(StartError::Input(format!(
                "{} belongs to cluster {cluster} but holds no log: it was accepted into the cluster and \
                 stopped before receiving anything (start it with --join to finish joining), or its log \
                 was lost (then it must be removed and replaced); if it was founding the cluster when it \
                 stopped, remove the data dir and start again",
                data_dir.display()
            )));
        }
    }
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
        // At most this many entries per AppendEntries; `net` bounds their bytes.
        max_payload_entries: 64,
        ..Default::default()
    }
    .validate()
    .map_err(|e| StartError::Input(format!("raft settings: {e}")))?;

    let lease = Arc::new(Lease::for_timeouts(
        Duration::from_millis(config.election_timeout_min),
        Duration::from_millis(config.election_timeout_max),
    ));
    let network = Network::new(me.clone(), token.clone(), lease.clone(), log.durable());
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

    let member = Member {
        raft_addr: opts.advertised(&opts.raft_addr),
        admin_addr: opts.advertised(&opts.admin_addr),
        client_addr: opts.advertised(&opts.client_addr),
        uid: me.uid.clone(),
    };
    let app = Arc::new(
        App::new(
            me.clone(),
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
        tokio::spawn(net::serve(raft_l, raft.clone(), app.token.clone(), lease, me.clone())),
        tokio::spawn(api::binary::serve(client_l, app.clone())),
        tokio::spawn(admin::serve(admin_l, app.clone())),
    ]);
    tasks.push(tokio::spawn(crate::checkpoint::run(opts.id, raft.clone(), app.sm.clone(), crate::checkpoint::EVERY)));
    if let Some(l) = text_l {
        tasks.push(tokio::spawn(api::text::serve(l, app.clone())));
    }

    if !has_log && opts.join.is_empty() {
        let cluster = identity::random_id();
        tracing::info!(id = opts.id, %cluster, uid = %me.uid, "bootstrapping a one-node cluster");
        let file =
            NodeFile { cluster_id: Some(cluster.clone()), member_uid: Some(me.uid.clone()), ..node_file.clone() };
        let bound = identity::write(&data_dir, &file).and_then(|()| me.set_cluster(&cluster));
        if let Err(why) = bound {
            raft.shutdown().await.ok();
            return Err(StartError::Input(why));
        }
        raft.initialize(BTreeMap::from([(opts.id, member.clone())]))
            .await
            .map_err(|e| anyhow::anyhow!("bootstrap: {e}"))?;
    }
    let (fatal_tx, mut fatal_rx) = tokio::sync::mpsc::channel::<String>(1);
    if !opts.join.is_empty() {
        let req = JoinRequest {
            id: opts.id,
            raft_addr: member.raft_addr.clone(),
            admin_addr: member.admin_addr.clone(),
            client_addr: member.client_addr.clone(),
            fsm_sha256: node_file.fsm_sha256.clone(),
            fsm_config_sha256: node_file.fsm_config_sha256.clone(),
            learner: opts.learner,
            protocol_version: PROTOCOL_VERSION,
            member_uid: me.uid.clone(),
            cluster_id: me.cluster().map(str::to_string),
            empty_log: !has_log,
            limits: node_file.limits,
        };
        let token = app.token.clone();
        let seeds = opts.join.clone();
        let (me, dir) = (me.clone(), data_dir.clone());
        tasks.push(tokio::spawn(async move {
            // Binds this member to the cluster that accepted it, durably, before it asks
            // to be added (see `admin::JoinRequest`).
            let bind = |cluster: &str| {
                let file = NodeFile {
                    cluster_id: Some(cluster.to_string()),
                    member_uid: Some(me.uid.clone()),
                    ..node_file.clone()
                };
                identity::write(&dir, &file)?;
                me.set_cluster(cluster)
            };
            if let Err(why) = join_cluster(&seeds, req, &token, bind).await {
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
/// retrying cannot fix (another guest, another cluster, a member's id, wrong token) is
/// returned as an error. `bind` records the cluster id the leader gives a node that has
/// none, before it asks to be added.
async fn join_cluster(
    seeds: &[String],
    mut req: JoinRequest,
    token: &str,
    bind: impl Fn(&str) -> Result<(), String>,
) -> Result<(), String> {
    let mut body = serde_json::to_string(&req).map_err(|e| e.to_string())?;
    let mut backoff = Duration::from_millis(100);
    let mut next: Option<String> = None;
    let mut i = 0usize;
    loop {
        let addr = next.take().unwrap_or_else(|| {
            i += 1;
            seeds[(i - 1) % seeds.len()].clone()
        });
        match admin::post_json(&addr, "/join", token, &body, Duration::from_secs(150)).await {
            Ok((code, text)) => {
                let r: Option<JoinReply> = serde_json::from_str(&text).ok();
                let msg = r.as_ref().map_or(text.clone(), |r| r.message.clone());
                let given = r.as_ref().and_then(|r| r.cluster_id.clone());
                match (code, given) {
                    (200, given) => {
                        if let (Some(given), Some(ours)) = (given, &req.cluster_id) {
                            if given != *ours {
                                return Err(format!("{addr} answered for cluster {given}, not {ours}"));
                            }
                        }
                        tracing::info!(via = %addr, cluster = ?req.cluster_id, "joined the cluster");
                        return Ok(());
                    }
                    (202, Some(cluster)) if req.cluster_id.is_none() => {
                        bind(&cluster).map_err(|why| format!("cannot record cluster id {cluster}: {why}"))?;
                        tracing::info!(via = %addr, %cluster, "accepted into the cluster; asking to be added");
                        req.cluster_id = Some(cluster);
                        body = serde_json::to_string(&req).map_err(|e| e.to_string())?;
                        next = Some(addr);
                        continue;
                    }
                    (401 | 409 | 400, _) => return Err(format!("{addr} refused to add this node: {msg}")),
                    (421, _) => next = r.and_then(|r| r.leader_admin),
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
