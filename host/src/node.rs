//! Start-up and shutdown of a member: check the inputs, open storage, start Raft and the
//! servers, bootstrap or join, then wait for the shutdown signal.
//!
//! [`run`] reads as that sequence; each step is a function below it.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use openraft::storage::RaftLogStorage;
use openraft::{Config, SnapshotPolicy};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::api::{self, App};
use crate::config::Opts;
use crate::fsm::{GuestModule, Limits, LoadError};
use crate::identity::{self, Identity, NodeFile, PROTOCOL_VERSION};
use crate::join::client::{join_cluster, JoinError};
use crate::join::{config_sha256, JoinRequest};
use crate::lease::Lease;
use crate::metrics::Metrics;
use crate::net::{self, Network};
use crate::profiling::{ProfileError, Profiles};
use crate::store::{GuestSpec, LogStore, StateMachine};
use crate::types::{Member, Raft};

/// Why a member could not start, or stopped. The operator's to fix (exit code 2): the
/// inputs, a profile that cannot start, a join the cluster refused.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Guest(#[from] LoadError),
    #[error("{0}")]
    Input(String),
    #[error(transparent)]
    Profile(#[from] ProfileError),
    #[error(transparent)]
    Join(#[from] JoinError),
    /// The log, vote or state files could not be read or written.
    #[error("{0}")]
    Storage(String),
    /// openraft refused to start or to bootstrap.
    #[error("{0}")]
    Raft(String),
    /// Raft stopped under a running member (a storage error, a failed guest install):
    /// serving on would answer from a state that no longer follows the log.
    #[error("raft stopped: {0}; exiting so that the member restarts from its snapshot and log")]
    RaftStopped(String),
}

impl StartError {
    pub fn exit_code(&self) -> i32 {
        match self {
            StartError::Guest(_) | StartError::Input(_) | StartError::Profile(_) | StartError::Join(_) => 2,
            StartError::Storage(_) | StartError::Raft(_) | StartError::RaftStopped(_) => 1,
        }
    }
}

/// How long a stopping member waits for proposals in flight to be answered.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Run a member until `shutdown` completes.
pub async fn run(opts: Opts, shutdown: impl Future<Output = ()>) -> Result<(), StartError> {
    let inputs = Inputs::check(&opts)?;
    // Ports before anything slow, so a clash is reported at once.
    let ports = Ports::bind(&opts).await?;
    let profiles = Profiles::start(opts.cpuprofile.as_deref(), opts.memprofile.as_deref()).await?;
    let metrics = Arc::new(Metrics::default());
    let _monitor = match &opts.monitor {
        Some(path) => Some(
            crate::monitor::start(path, Duration::from_secs(1), metrics.clone())
                .map_err(|e| StartError::Input(format!("--monitor {}: {e}", path.display())))?,
        ),
        None => None,
    };
    let (log, has_log) = open_log(&opts, &inputs.data_dir).await?;
    let me = resolve_identity(&opts, &inputs, has_log)?;
    let sm = StateMachine::open(
        &inputs.data_dir.join("snapshots"),
        GuestSpec {
            module: inputs.module.clone(),
            config: opts.fsm_config.clone(),
            guest_dir: inputs.data_dir.join("guest"),
            node: opts.id,
        },
        &log,
        metrics.clone(),
    )
    .map_err(|e| StartError::Input(format!("{e:#}")))?;

    let config = raft_config(&opts)?;
    let lease = Arc::new(Lease::for_timeouts(
        Duration::from_millis(config.election_timeout_min),
        Duration::from_millis(config.election_timeout_max),
    ));
    let network = Network::new(me.clone(), inputs.token.clone(), lease.clone(), log.durable());
    let raft = Raft::new(opts.id, Arc::new(config), network, log, sm.clone())
        .await
        .map_err(|e| StartError::Raft(format!("starting raft: {e}")))?;
    let mut tasks = vec![hold_candidacy(&raft, &lease)];

    let member = Member {
        raft_addr: opts.advertised(&opts.raft_addr),
        admin_addr: opts.advertised(&opts.admin_addr),
        client_addr: opts.advertised(&opts.client_addr),
        uid: me.uid.clone(),
        role: crate::types::Role::Replica,
    };
    let app = Arc::new(
        App::new(
            me.clone(),
            raft.clone(),
            sm,
            metrics,
            Duration::from_millis(opts.proposal_timeout_ms),
            opts.max_frame_bytes,
            inputs.token.clone(),
            inputs.module.sha256().to_string(),
            opts.fsm_config.clone(),
            opts.max_inflight_batches,
            lease.clone(),
        )
        .with_client_limits(opts.max_client_connections, opts.client_request_budget_mb.saturating_mul(1 << 20)),
    );
    tasks.extend(serve(ports, &app, lease));

    let (fatal_tx, mut fatal_rx) = tokio::sync::mpsc::channel::<StartError>(1);
    if !has_log && opts.join.is_empty() {
        bootstrap(&opts, &inputs, &me, &raft, member).await?;
    } else if !opts.join.is_empty() {
        tasks.push(Some(tokio::spawn(join(&opts, &inputs, me.clone(), member, has_log, fatal_tx))));
    }
    tracing::info!(
        id = opts.id,
        client = %opts.client_addr,
        raft = %opts.raft_addr,
        admin = %opts.admin_addr,
        guest = %inputs.module.path().display(),
        sha256 = %inputs.module.sha256(),
        "member started"
    );

    let outcome = tokio::select! {
        () = shutdown => Ok(()),
        Some(e) = fatal_rx.recv() => Err(e),
        why = raft_stopped(&raft) => {
            tracing::error!(%why, "raft stopped; this member exits");
            Err(StartError::RaftStopped(why))
        }
    };
    tracing::info!("shutting down");
    for t in tasks.iter().flatten() {
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
    profiles.finish().await;
    outcome
}

/// What start-up checks before it binds or writes anything.
struct Inputs {
    token: String,
    module: Arc<GuestModule>,
    data_dir: PathBuf,
    /// What this member's `node.json` says, or will say, of its id and guest.
    node_file: NodeFile,
    /// The `node.json` found in the data dir, if any.
    found: Option<NodeFile>,
}

impl Inputs {
    fn check(opts: &Opts) -> Result<Self, StartError> {
        let limits =
            Limits { fuel_per_entry: opts.fuel_per_entry, memory_bytes: opts.guest_memory_mb.saturating_mul(1 << 20) };
        let token = opts.token().map_err(StartError::Input)?;
        let module = Arc::new(GuestModule::load(&opts.fsm, limits)?);
        let data_dir = opts.data_dir();
        let node_file = NodeFile {
            id: opts.id,
            fsm_sha256: module.sha256().to_string(),
            fsm_config_sha256: config_sha256(&opts.fsm_config),
            cluster_id: None,
            member_uid: None,
        };
        // Nothing is written here: a start that fails before it bootstraps or joins must
        // leave the data dir as fresh as it found it.
        let found = identity::read(&data_dir).map_err(StartError::Input)?;
        if let Some(f) = &found {
            identity::check_same_node(&data_dir, f, &node_file).map_err(StartError::Input)?;
        }
        Ok(Inputs { token, module, data_dir, node_file, found })
    }

    /// `node.json` binding this member to `cluster`.
    fn bound_to(&self, cluster: &str, me: &Identity) -> NodeFile {
        NodeFile { cluster_id: Some(cluster.to_string()), member_uid: Some(me.uid.clone()), ..self.node_file.clone() }
    }
}

struct Ports {
    raft: TcpListener,
    client: TcpListener,
    admin: TcpListener,
    text: Option<TcpListener>,
}

impl Ports {
    async fn bind(opts: &Opts) -> Result<Self, StartError> {
        async fn bind(addr: &str, what: &str) -> Result<TcpListener, StartError> {
            TcpListener::bind(addr)
                .await
                .map_err(|e| StartError::Input(format!("cannot listen on {addr} ({what}): {e}")))
        }
        Ok(Ports {
            raft: bind(&opts.raft_addr, "raft").await?,
            client: bind(&opts.client_addr, "client").await?,
            admin: bind(&opts.admin_addr, "admin").await?,
            text: match &opts.text_addr {
                Some(a) => Some(bind(a, "text").await?),
                None => None,
            },
        })
    }
}

/// The log, and whether this member has one in openraft's sense: any entry (purged ones
/// included) or a vote.
async fn open_log(opts: &Opts, data_dir: &std::path::Path) -> Result<(LogStore, bool), StartError> {
    let storage =
        |e: &dyn std::fmt::Display| StartError::Storage(format!("opening the log in {}: {e}", data_dir.display()));
    let mut log = LogStore::open(&data_dir.join("log"), !opts.no_fsync)
        .and_then(|log| log.leader_writes_ahead(opts.id))
        .map(LogStore::purge_behind_snapshots)
        .map_err(|e| storage(&e))?;
    let has_log = log.get_log_state().await.map_err(|e| storage(&e))?.last_log_id.is_some()
        || log.read_vote().await.map_err(|e| storage(&e))?.is_some_and(|v| v != Default::default());
    Ok((log, has_log))
}

/// This member's identity: from `node.json`, recorded there if it predates ids, or new.
fn resolve_identity(opts: &Opts, inputs: &Inputs, has_log: bool) -> Result<Arc<Identity>, StartError> {
    let data_dir = &inputs.data_dir;
    let resolved = identity::resolve(inputs.found.as_ref(), has_log, data_dir).map_err(StartError::Input)?;
    if resolved.rewrite {
        tracing::info!(cluster = ?resolved.cluster_id, uid = %resolved.member_uid,
            "node.json predates cluster ids and member uids; recording them");
        let file = NodeFile {
            cluster_id: resolved.cluster_id.clone(),
            member_uid: Some(resolved.member_uid.clone()),
            ..inputs.node_file.clone()
        };
        identity::write(data_dir, &file).map_err(StartError::Input)?;
    }
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
    Ok(Arc::new(Identity::new(opts.id, resolved.member_uid, resolved.cluster_id)))
}

fn raft_config(opts: &Opts) -> Result<Config, StartError> {
    let hb = opts.heartbeat_ms.max(10);
    Config {
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
    .map_err(|e| StartError::Input(format!("raft settings: {e}")))
}

/// Until the vote hold ends, this member may still be bound by a promise, made before a
/// restart, not to help elect anyone but the leader it followed: that includes itself.
/// (A bootstrap still elects at once: it is not timer-driven.)
fn hold_candidacy(raft: &Raft, lease: &Lease) -> Option<JoinHandle<()>> {
    let hold = lease.hold_left();
    if hold.is_zero() {
        return None;
    }
    raft.runtime_config().elect(false);
    let raft = raft.clone();
    Some(tokio::spawn(async move {
        tokio::time::sleep(hold).await;
        raft.runtime_config().elect(true);
    }))
}

/// Serves peers, clients and operators, and runs the leader's checkpoints.
fn serve(ports: Ports, app: &Arc<App>, lease: Arc<Lease>) -> Vec<Option<JoinHandle<()>>> {
    let raft = &app.raft;
    let mut tasks = vec![
        tokio::spawn(net::serve(ports.raft, raft.clone(), app.token.clone(), lease, app.identity.clone())),
        tokio::spawn(api::binary::serve(ports.client, app.clone())),
        tokio::spawn(crate::admin::serve(ports.admin, app.clone())),
        tokio::spawn(crate::checkpoint::run(app.id, raft.clone(), app.sm.clone(), crate::checkpoint::EVERY)),
    ];
    if let Some(l) = ports.text {
        tasks.push(tokio::spawn(api::text::serve(l, app.clone())));
    }
    tasks.into_iter().map(Some).collect()
}

/// Founds a one-member cluster: a new cluster id, recorded before the first entry.
async fn bootstrap(opts: &Opts, inputs: &Inputs, me: &Identity, raft: &Raft, member: Member) -> Result<(), StartError> {
    let cluster = identity::random_id();
    tracing::info!(id = opts.id, %cluster, uid = %me.uid, "bootstrapping a one-node cluster");
    let bound =
        identity::write(&inputs.data_dir, &inputs.bound_to(&cluster, me)).and_then(|()| me.set_cluster(&cluster));
    if let Err(why) = bound {
        raft.shutdown().await.ok();
        return Err(StartError::Input(why));
    }
    raft.initialize(BTreeMap::from([(opts.id, member)])).await.map_err(|e| StartError::Raft(format!("bootstrap: {e}")))
}

/// Asks the `--join` seeds to add this member; a refusal retrying cannot fix goes to
/// `fatal`.
fn join(
    opts: &Opts,
    inputs: &Inputs,
    me: Arc<Identity>,
    member: Member,
    has_log: bool,
    fatal: tokio::sync::mpsc::Sender<StartError>,
) -> impl Future<Output = ()> + Send + 'static {
    let req = JoinRequest {
        id: opts.id,
        raft_addr: member.raft_addr,
        admin_addr: member.admin_addr,
        client_addr: member.client_addr,
        fsm_sha256: inputs.node_file.fsm_sha256.clone(),
        fsm_config_sha256: inputs.node_file.fsm_config_sha256.clone(),
        learner: opts.learner,
        protocol_version: PROTOCOL_VERSION,
        member_uid: me.uid.clone(),
        cluster_id: me.cluster().map(str::to_string),
        empty_log: !has_log,
        role: crate::types::Role::Replica,
    };
    let (seeds, token, dir, node_file) =
        (opts.join.clone(), inputs.token.clone(), inputs.data_dir.clone(), inputs.node_file.clone());
    async move {
        // Binds this member to the cluster that accepted it, durably, before it asks to
        // be added (see `join::JoinRequest`).
        let bind = |cluster: &str| {
            let file = NodeFile {
                cluster_id: Some(cluster.to_string()),
                member_uid: Some(me.uid.clone()),
                ..node_file.clone()
            };
            identity::write(&dir, &file)?;
            me.set_cluster(cluster)
        };
        if let Err(e) = join_cluster(&seeds, req, &token, bind).await {
            let _ = fatal.send(e.into()).await;
        }
    }
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
