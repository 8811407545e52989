//! Start-up and shutdown of a member: check the inputs, open storage, start Raft and the
//! servers, bootstrap or join, then wait for the shutdown signal.
//!
//! [`run`] reads as that sequence; each step is a function below it.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;

use openraft::storage::RaftLogStorage;
use openraft::{Config, SnapshotPolicy};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::api::{self, App};
use crate::config::{DiscoveryMode, Opts};
use crate::discovery::{Discovery, DiscoveryError, Plan};
use crate::fsm::{GuestModule, Limits, LoadError};
use crate::identity::{self, Identity, NodeFile, PROTOCOL_VERSION};
use crate::join::client::{join_cluster, JoinError};
use crate::join::{config_sha256, JoinRequest};
use crate::lease::Lease;
use crate::metrics::Metrics;
use crate::net::{self, Network};
use crate::profiling::{ProfileError, Profiles};
use crate::store::command_log::CommandLog;
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
    /// `node.json` unreadable, or made for another node, guest or cluster.
    #[error(transparent)]
    Identity(#[from] identity::IdentityError),
    #[error(transparent)]
    Profile(#[from] ProfileError),
    #[error(transparent)]
    Join(#[from] JoinError),
    #[error(transparent)]
    Discovery(#[from] DiscoveryError),
    /// The log, vote or state files could not be read or written.
    #[error("{0}")]
    Storage(String),
    /// openraft refused to start or to bootstrap.
    #[error("{0}")]
    Raft(String),
    /// The leader removed this member from its cluster: it stops, and will not start on
    /// this data dir again.
    #[error("removed from cluster {0} by its leader; this member stops")]
    Removed(String),
    /// Raft stopped under a running member (a storage error, a failed guest install):
    /// serving on would answer from a state that no longer follows the log.
    #[error("raft stopped: {0}; exiting so that the member restarts from its snapshot and log")]
    RaftStopped(String),
}

impl crate::daemon::ExitCode for StartError {
    fn exit_code(&self) -> i32 {
        match self {
            StartError::Guest(_)
            | StartError::Input(_)
            | StartError::Identity(_)
            | StartError::Profile(_)
            | StartError::Join(_)
            | StartError::Discovery(_) => 2,
            StartError::Storage(_) | StartError::Raft(_) | StartError::RaftStopped(_) => 1,
            // Done as asked: a supervisor that restarts only on failure leaves it stopped.
            StartError::Removed(_) => 0,
        }
    }
}

/// How long a stopping member waits for proposals in flight to be answered.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a stopping leader tries to hand its leadership over first.
const HAND_OVER_TIMEOUT: Duration = Duration::from_secs(5);
/// In the data dir once this member was removed from its cluster (holds the cluster id).
const REMOVED_MARK: &str = "removed";
/// In the data dir while this member has asked to be a voter and is not one yet: a
/// restart without `--join` finishes the join.
const WANTS_VOTER_MARK: &str = "wants-voter";

/// Run a member until `shutdown` completes.
pub async fn run(opts: Opts, shutdown: impl Future<Output = ()>) -> Result<(), StartError> {
    let mut inputs = Inputs::check(&opts)?;
    let discovery = match opts.discovery {
        DiscoveryMode::Kubernetes => Some(Discovery::from_opts(&opts).await?),
        DiscoveryMode::None => None,
    };
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
    let (mut log, has_log) = open_log(&opts, &inputs.data_dir).await?;
    let member = Member {
        raft_addr: opts.advertised(&opts.raft_addr),
        admin_addr: opts.advertised(&opts.admin_addr),
        client_addr: opts.advertised(&opts.client_addr),
        uid: String::new(),
        role: crate::types::Role::Replica,
    };
    if let Some(cluster) = &opts.force_new_cluster {
        force_new_cluster(&opts, &mut inputs, &mut log, cluster, member.clone()).await?;
    }
    let me = resolve_identity(&opts, &inputs, has_log)?;
    let member = Member { uid: me.uid.clone(), ..member };
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
    .map_err(|e| StartError::Input(e.to_string()))?;
    let sm = match &opts.log_commands {
        Some(dir) => {
            let commands =
                CommandLog::open(dir, opts.id, !opts.no_fsync).map_err(|e| StartError::Input(e.to_string()))?;
            sm.with_command_log(commands).map_err(|e| StartError::Input(e.to_string()))?
        }
        None => sm,
    };

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

    tasks.push(Some(tokio::spawn(crate::admin::members::finish_joint_changes(app.clone()))));

    let (fatal_tx, mut fatal_rx) = tokio::sync::mpsc::channel::<StartError>(1);
    if let (Some(discovery), false) = (discovery, has_log) {
        let start =
            discover_then_start(discovery, opts.clone(), inputs.clone(), me.clone(), raft.clone(), member, fatal_tx);
        tasks.push(Some(tokio::spawn(start)));
    } else if !has_log && opts.join.is_empty() {
        bootstrap(&opts, &inputs, &me, &raft, member).await?;
    } else {
        let seeds = join_seeds(&opts, &inputs, &raft, &member).await;
        if !seeds.is_empty() {
            tasks.push(Some(tokio::spawn(join(&opts, &inputs, seeds, me.clone(), member, has_log, fatal_tx))));
        }
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

    let mut removed = app.removed.subscribe();
    let outcome = tokio::select! {
        () = shutdown => Ok(()),
        Some(e) = fatal_rx.recv() => Err(e),
        Ok(()) = removed.wait_for(|r| *r).map(|r| r.map(|_| ())) => {
            let cluster = me.cluster().unwrap_or_default().to_string();
            if let Err(e) = crate::store::files::write_file_durably(&inputs.data_dir.join(REMOVED_MARK), cluster.as_bytes()) {
                tracing::error!(error = %e, "could not record the removal in the data dir");
            }
            Err(StartError::Removed(cluster))
        }
        why = raft_stopped(&raft) => {
            tracing::error!(%why, "raft stopped; this member exits");
            Err(StartError::RaftStopped(why))
        }
    };
    tracing::info!("shutting down");
    // A leader stopped on purpose hands over first, so that the cluster does not wait
    // out an election timeout (and the successor is one that holds the whole log).
    if outcome.is_ok() && raft.metrics().borrow().state == openraft::ServerState::Leader {
        let _ = crate::admin::members::hand_over(&app, None, HAND_OVER_TIMEOUT).await;
    }
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
#[derive(Clone)]
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
        // Nothing is written here: a start that fails before it bootstraps or joins must
        // leave the data dir as fresh as it found it.
        if let Ok(cluster) = std::fs::read_to_string(data_dir.join(REMOVED_MARK)) {
            return Err(StartError::Input(format!(
                "{} was removed from cluster {cluster}: to take part again, clear the data dir and join as a \
                 new member",
                data_dir.display()
            )));
        }
        opts.check_advertised().map_err(StartError::Input)?;
        let found = identity::read(&data_dir)?;
        if let Some(f) = &found {
            identity::check_same_node(&data_dir, f, &node_file)?;
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
    let resolved = identity::resolve(inputs.found.as_ref(), has_log, data_dir)?;
    if resolved.rewrite {
        tracing::info!(cluster = ?resolved.cluster_id, uid = %resolved.member_uid,
            "node.json predates cluster ids, member uids or pinned guest limits; recording them");
        let file = NodeFile {
            cluster_id: resolved.cluster_id.clone(),
            member_uid: Some(resolved.member_uid.clone()),
            ..inputs.node_file.clone()
        };
        identity::write(data_dir, &file)?;
    }
    // (Discovery finds members to finish the join through, as `--join` would.)
    if !has_log && opts.join.is_empty() && opts.discovery == DiscoveryMode::None {
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

/// `--force-new-cluster ID`: makes this member the only voter of a new cluster, in a term
/// above any it has seen, with its log and state; the new cluster id goes to `node.json`.
/// Naming the old cluster's id makes the flag one-shot: left on for a later start, it
/// names a cluster this member no longer belongs to, and start-up refuses.
async fn force_new_cluster(
    opts: &Opts,
    inputs: &mut Inputs,
    log: &mut LogStore,
    cluster: &str,
    member: Member,
) -> Result<(), StartError> {
    let found = inputs.found.clone().filter(|f| f.cluster_id.is_some());
    let Some(file) = found else {
        return Err(StartError::Input(format!(
            "--force-new-cluster: {} holds no member of a cluster to recover",
            inputs.data_dir.display()
        )));
    };
    let (Some(ours), Some(uid)) = (file.cluster_id.clone(), file.member_uid.clone()) else {
        return Err(StartError::Input("--force-new-cluster: node.json has no cluster id or member uid".into()));
    };
    if ours != cluster {
        return Err(StartError::Input(format!(
            "--force-new-cluster {cluster}: this member belongs to cluster {ours} (a cluster recovered earlier \
             gets a new id: remove the flag)"
        )));
    }
    let storage = |e: &dyn std::fmt::Display| StartError::Storage(format!("--force-new-cluster: {e}"));
    let state = log.get_log_state().await.map_err(|e| storage(&e))?;
    let vote = log.read_vote().await.map_err(|e| storage(&e))?.unwrap_or_default();
    let last = state.last_log_id;
    let term = vote.leader_id().term.max(last.map_or(0, |l| l.leader_id.term)) + 1;
    let me = Member { uid, ..member };
    let membership =
        openraft::Membership::new(vec![std::collections::BTreeSet::from([opts.id])], BTreeMap::from([(opts.id, me)]));
    let entry = crate::types::Entry {
        log_id: openraft::LogId::new(openraft::CommittedLeaderId::new(term, opts.id), last.map_or(0, |l| l.index + 1)),
        payload: openraft::EntryPayload::Membership(membership),
    };
    log.append_before_start(entry).map_err(|e| storage(&e))?;
    log.save_vote(&openraft::Vote::new(term, opts.id)).await.map_err(|e| storage(&e))?;
    let new_id = identity::random_id();
    let file = NodeFile { cluster_id: Some(new_id.clone()), ..file };
    identity::write(&inputs.data_dir, &file)?;
    tracing::warn!(old = %cluster, new = %new_id, term, "forced a new cluster: this member is its only voter; \
        wipe the other members before they join it");
    inputs.found = Some(file);
    Ok(())
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
        return Err(why.into());
    }
    raft.initialize(BTreeMap::from([(opts.id, member)])).await.map_err(|e| StartError::Raft(format!("bootstrap: {e}")))
}

/// `--discovery kubernetes` with an empty log: waits until discovery says how to start,
/// then founds the cluster or joins it; a refusal retrying cannot fix goes to `fatal`.
async fn discover_then_start(
    discovery: Discovery,
    opts: Opts,
    inputs: Inputs,
    me: Arc<Identity>,
    raft: Raft,
    member: Member,
    fatal: tokio::sync::mpsc::Sender<StartError>,
) {
    let bound = me.cluster().map(str::to_string);
    match discovery.plan(bound.as_deref()).await {
        Plan::Bootstrap => {
            if let Err(e) = bootstrap(&opts, &inputs, &me, &raft, member).await {
                let _ = fatal.send(e).await;
            }
        }
        Plan::Join(seeds) => join(&opts, &inputs, seeds, me, member, false, fatal).await,
    }
}

/// Whom to ask to add this member: the `--join` seeds, or the members it knows when it
/// asked to be a voter and stopped before it was made one, or (with discovery) when it
/// comes back with other addresses than the membership records, as a pod with a new IP
/// does: the leader then updates them (`join::policy`), since the member uid is the same.
async fn join_seeds(opts: &Opts, inputs: &Inputs, raft: &Raft, member: &Member) -> Vec<String> {
    if !opts.join.is_empty() {
        return opts.join.clone();
    }
    let wants_voter = inputs.data_dir.join(WANTS_VOTER_MARK).exists();
    if !wants_voter && opts.discovery == DiscoveryMode::None {
        return Vec::new();
    }
    // Raft publishes the membership it loaded from the log only once its core has
    // started, a moment after `Raft::new` returns.
    let loaded = raft
        .wait(Some(Duration::from_secs(10)))
        .metrics(|m| m.membership_config.log_id().is_some(), "the membership from the log")
        .await;
    let Ok(metrics) = loaded else {
        tracing::warn!("no membership in the log; cannot finish the join without --join");
        return Vec::new();
    };
    let m = metrics.membership_config.clone();
    let others =
        || m.membership().nodes().filter(|(id, _)| **id != opts.id).map(|(_, n)| n.admin_addr.clone()).collect();
    let is_voter = m.membership().voter_ids().any(|v| v == opts.id);
    if wants_voter && is_voter {
        let _ = std::fs::remove_file(inputs.data_dir.join(WANTS_VOTER_MARK));
    } else if wants_voter {
        tracing::info!("this member asked to be a voter and is not one yet; asking again");
        return others();
    }
    let recorded = m.membership().get_node(&opts.id);
    let moved = |r: &Member| {
        (&r.raft_addr, &r.admin_addr, &r.client_addr) != (&member.raft_addr, &member.admin_addr, &member.client_addr)
    };
    if opts.discovery != DiscoveryMode::None && recorded.is_some_and(moved) {
        tracing::info!(recorded = ?recorded, now = %member,
            "this member's addresses changed since the membership recorded them; asking the cluster to take the new ones");
        return others();
    }
    Vec::new()
}

/// Asks `seeds` to add this member; a refusal retrying cannot fix goes to `fatal`.
fn join(
    opts: &Opts,
    inputs: &Inputs,
    seeds: Vec<String>,
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
        limits: inputs.node_file.limits,
        role: crate::types::Role::Replica,
    };
    let (token, dir, node_file) = (inputs.token.clone(), inputs.data_dir.clone(), inputs.node_file.clone());
    let wants_voter = dir.join(WANTS_VOTER_MARK);
    if !opts.learner {
        if let Err(e) = crate::store::files::write_file_durably(&wants_voter, b"") {
            tracing::warn!(error = %e, "could not record that this member asks to be a voter");
        }
    }
    async move {
        // Binds this member to the cluster that accepted it, durably, before it asks to
        // be added (see `join::JoinRequest`).
        let bind = |cluster: &str| identity::bind(&dir, &node_file, &me, cluster);
        match join_cluster(&seeds, req, &token, bind).await {
            Ok(()) => {
                let _ = std::fs::remove_file(&wants_voter);
            }
            Err(e) => {
                let _ = fatal.send(e.into()).await;
            }
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
