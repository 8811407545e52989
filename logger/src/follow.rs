//! Following one cluster: the logger's Raft node (the host's log store and peer network,
//! the archive as state machine), its join as a logger, and the commit index it hears.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use host::http_client::HttpClient;
use host::identity::{self, Identity, NodeFile, PROTOCOL_VERSION};
use host::join::client::join_cluster;
use host::join::JoinRequest;
use host::lease::Lease;
use host::net::{self, Network};
use host::store::LogStore;
use host::types::{NodeId, Raft, Role};
use openraft::storage::RaftLogStorage;
use openraft::{Config, SnapshotPolicy};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::archive::Archive;
use crate::config::{Follow, Opts};
use crate::sm::{ArchiveSm, SharedArchive};
use crate::stats::Stats;
use crate::LoggerError;

/// What `fsm_sha256` says in a logger's `node.json`: it runs no guest.
const NO_GUEST: &str = "logger";

/// One followed cluster, as the admin server sees it.
pub struct Cluster {
    pub name: String,
    pub node_id: NodeId,
    pub raft: Raft,
    pub archive: SharedArchive,
    pub stats: Arc<Stats>,
    pub identity: Arc<Identity>,
    /// Truncation requests by voter: discard below this index.
    pub truncate_asks: Mutex<BTreeMap<NodeId, u64>>,
}

/// Opens the archive and the Raft files of `f`, starts its Raft node and peer server, and
/// asks the cluster to add it as a logger. A join the cluster refuses goes to `fatal`.
pub async fn start(
    f: &Follow,
    opts: &Opts,
    token: &str,
    admin_addr: &str,
    fatal: tokio::sync::mpsc::Sender<LoggerError>,
) -> Result<(Arc<Cluster>, Vec<JoinHandle<()>>), LoggerError> {
    let input = |e: String| LoggerError::Input(format!("{}: {e}", f.name));
    let storage = |e: &dyn std::fmt::Display| LoggerError::Storage(format!("{}: {e}", f.name));
    let raft_dir = opts.dir.join(format!("{}.raft", f.name));
    let listener = TcpListener::bind(&f.raft_addr)
        .await
        .map_err(|e| input(format!("cannot listen on {} (--raft-addr): {e}", f.raft_addr)))?;
    let archive = Archive::open(&opts.dir, &f.name, !opts.no_fsync).map_err(|e| LoggerError::Archive(e.to_string()))?;
    let log = LogStore::open(&raft_dir.join("log"), !opts.no_fsync).map_err(|e| storage(&e))?.purge_behind_snapshots();
    let mut probe = log.clone();
    let has_log = probe.get_log_state().await.map_err(|e| storage(&e))?.last_log_id.is_some();

    let found = identity::read(&raft_dir).map_err(|e| input(e.to_string()))?;
    if let Some(found) = &found {
        if found.id != f.node_id || found.fsm_sha256 != NO_GUEST {
            return Err(input(format!(
                "{} belongs to node {} ({}), not to logger {} (node {})",
                raft_dir.display(),
                found.id,
                found.fsm_sha256,
                f.name,
                f.node_id
            )));
        }
    }
    let resolved = identity::resolve(found.as_ref(), has_log, &raft_dir).map_err(|e| input(e.to_string()))?;
    let node_file = NodeFile {
        id: f.node_id,
        fsm_sha256: NO_GUEST.into(),
        fsm_config_sha256: String::new(),
        cluster_id: resolved.cluster_id.clone(),
        member_uid: Some(resolved.member_uid.clone()),
        // A logger runs no guest: no limits to pin.
        limits: None,
    };
    if resolved.rewrite {
        identity::write(&raft_dir, &node_file).map_err(|e| input(e.to_string()))?;
    }
    let me = Arc::new(Identity::new(f.node_id, resolved.member_uid.clone(), resolved.cluster_id.clone()));

    let stats = Arc::new(Stats::default());
    {
        let a = archive_summary(&archive);
        stats.archived_index.store(a, Ordering::Relaxed);
    }
    let archive: SharedArchive = Arc::new(Mutex::new(archive));
    let sm = ArchiveSm::new(archive.clone(), &raft_dir, log.snapshot_cover(), stats.clone());
    let config = Config {
        cluster_name: "wasm-raft".into(),
        heartbeat_interval: 100,
        election_timeout_min: 500,
        election_timeout_max: 1000,
        install_snapshot_timeout: 10_000,
        snapshot_policy: SnapshotPolicy::LogsSinceLast(opts.purge_every.max(1)),
        max_in_snapshot_log_to_keep: 0,
        purge_batch_size: 64,
        ..Default::default()
    }
    .validate()
    .map_err(|e| input(format!("raft settings: {e}")))?;
    let lease = Arc::new(Lease::for_timeouts(
        Duration::from_millis(config.election_timeout_min),
        Duration::from_millis(config.election_timeout_max),
    ));
    let network = Network::new(me.clone(), token.to_string(), lease.clone(), log.durable());
    let raft = Raft::new(f.node_id, Arc::new(config), network, log, sm)
        .await
        .map_err(|e| LoggerError::Raft(format!("{}: starting raft: {e}", f.name)))?;
    // A learner never campaigns; this keeps it so should the membership ever say otherwise.
    raft.runtime_config().elect(false);

    let cluster = Arc::new(Cluster {
        name: f.name.clone(),
        node_id: f.node_id,
        raft: raft.clone(),
        archive,
        stats: stats.clone(),
        identity: me.clone(),
        truncate_asks: Mutex::new(BTreeMap::new()),
    });
    let mut tasks = vec![tokio::spawn(net::serve(listener, raft.clone(), token.to_string(), lease, me.clone()))];

    let req = JoinRequest {
        id: f.node_id,
        raft_addr: opts.advertised(&f.raft_addr),
        admin_addr: admin_addr.to_string(),
        client_addr: String::new(),
        fsm_sha256: String::new(),
        fsm_config_sha256: String::new(),
        learner: true,
        protocol_version: PROTOCOL_VERSION,
        member_uid: me.uid.clone(),
        cluster_id: me.cluster().map(str::to_string),
        empty_log: !has_log,
        limits: None,
        role: Role::Logger,
    };
    let (seeds, token_s, name) = (vec![f.join.clone()], token.to_string(), f.name.clone());
    let me_join = me.clone();
    tasks.push(tokio::spawn(async move {
        // Bound to the cluster that accepted it, durably, before it is added.
        let bind = |cluster: &str| identity::bind(&raft_dir, &node_file, &me_join, cluster);
        match join_cluster(&seeds, req, &token_s, bind).await {
            Ok(()) => tracing::info!(cluster = %name, "following the cluster as a logger"),
            Err(e) => {
                let _ = fatal.send(LoggerError::Join(format!("{name}: {e}"))).await;
            }
        }
    }));
    tasks.push(tokio::spawn(hear_commits(raft, stats.clone(), f.join.clone())));
    let out = opts.dir.join(format!("{}-throughput.out", f.name));
    tasks.push(tokio::spawn(async move {
        if let Err(e) = crate::stats::throughput(&out, stats).await {
            tracing::warn!(error = %e, path = %out.display(), "cannot write the throughput file");
        }
    }));
    Ok((cluster, tasks))
}

fn archive_summary(a: &Archive) -> u64 {
    a.last.map_or(0, |l| l.index)
}

/// Asks the cluster's leader (or the seed, while no leader is known) for its commit index
/// twice a second: the figure the lag is measured against.
async fn hear_commits(raft: Raft, stats: Arc<Stats>, seed: String) {
    let http = HttpClient::new(Duration::from_secs(2));
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let addr = {
            let m = raft.metrics().borrow().clone();
            m.current_leader
                .and_then(|l| m.membership_config.membership().get_node(&l).map(|n| n.admin_addr.clone()))
                .unwrap_or_else(|| seed.clone())
        };
        let Ok(resp) = http.get(&addr, "/status").await else { continue };
        if resp.status != 200 {
            continue;
        }
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&resp.text()) else { continue };
        if let Some(c) = v.get("committed").and_then(serde_json::Value::as_u64) {
            stats.cluster_committed.fetch_max(c, Ordering::Relaxed);
        }
    }
}
