//! Command-line options of `host`. Every flag can also come from an environment variable
//! (`HOST_<FLAG>`), which is how Kubernetes deploys set them.

use std::path::PathBuf;

use clap::Parser;

#[derive(Parser, Debug, Clone)]
#[command(
    name = "host",
    version,
    about = "Raft node running a WebAssembly state-machine guest",
    after_help = "Check a guest before it reaches a cluster: host check --fsm GUEST.wasm --commands FILE \
                  (host check --help)"
)]
pub struct Opts {
    /// The guest component (.wasm) implementing wit/fsm.wit.
    #[arg(long, env = "HOST_FSM")]
    pub fsm: PathBuf,

    /// Node id, unique in the cluster.
    #[arg(long, env = "HOST_ID", default_value_t = 1)]
    pub id: u64,

    /// Binary client protocol (kv, loadgen, the client library).
    #[arg(long, env = "HOST_CLIENT_ADDR", default_value = "127.0.0.1:11000")]
    pub client_addr: String,

    /// Peer RPC between members.
    #[arg(long, env = "HOST_RAFT_ADDR", default_value = "127.0.0.1:12000")]
    pub raft_addr: String,

    /// HTTP: GET /status, GET /metrics, POST /join.
    #[arg(long, env = "HOST_ADMIN_ADDR", default_value = "127.0.0.1:13000")]
    pub admin_addr: String,

    /// The original text protocol (`set-K-V`, `get-K`, `delete-K`, one per line); off
    /// unless given.
    #[arg(long, env = "HOST_TEXT_ADDR")]
    pub text_addr: Option<String>,

    /// Address others should use to reach this node's ports, when it differs from the
    /// bind address (e.g. bound to 0.0.0.0 in a container). Host name or IP only; ports
    /// are taken from the bind addresses.
    #[arg(long, env = "HOST_ADVERTISE_HOST")]
    pub advertise_host: Option<String>,

    /// Log, vote, snapshots and the guest's private directory. Default: ./data/node-<id>.
    #[arg(long, env = "HOST_DATA_DIR")]
    pub data_dir: Option<PathBuf>,

    /// Admin addresses of existing members to join through. Without it, a node with an
    /// empty data dir bootstraps a one-node cluster.
    #[arg(long, env = "HOST_JOIN", value_delimiter = ',')]
    pub join: Vec<String>,

    /// How a member with an empty data dir finds its cluster: `none` (`--join`, or
    /// bootstrap without it) or `kubernetes` (the pods matching `--discovery-selector`:
    /// ordinal 0 founds the cluster when no member answers, the others join; see README).
    #[arg(long, env = "HOST_DISCOVERY", value_enum, default_value_t = DiscoveryMode::None, conflicts_with = "join")]
    pub discovery: DiscoveryMode,

    /// Label selector of this application's pods, e.g. `app.kubernetes.io/instance=kv`.
    #[arg(long, env = "HOST_DISCOVERY_SELECTOR", required_if_eq("discovery", "kubernetes"))]
    pub discovery_selector: Option<String>,

    /// Namespace of the pods. Default: `POD_NAMESPACE`, else the service account's.
    #[arg(long, env = "HOST_DISCOVERY_NAMESPACE")]
    pub discovery_namespace: Option<String>,

    /// This pod's name (`name-N`, N the StatefulSet ordinal). Default: the host name.
    #[arg(long, env = "POD_NAME")]
    pub pod_name: Option<String>,

    /// Admin port of a peer pod that has no container port named `admin`. Default: the
    /// port of `--admin-addr`.
    #[arg(long, env = "HOST_DISCOVERY_ADMIN_PORT")]
    pub discovery_admin_port: Option<u16>,

    /// The API server's URL (plain http allowed), instead of the in-cluster settings or a
    /// kubeconfig: for tests against a stand-in server.
    #[arg(long, env = "HOST_DISCOVERY_API_URL")]
    pub discovery_api_url: Option<String>,

    /// Join as a non-voting learner only.
    #[arg(long, env = "HOST_LEARNER")]
    pub learner: bool,

    /// Recovery after losing a majority: this member, of the cluster with this id, goes
    /// on alone as a new cluster (a new id) with its log and state. Entries only the lost
    /// members held are lost, and entries only this member held are committed; the other
    /// members must be wiped and join again. See the README before using it.
    #[arg(long, env = "HOST_FORCE_NEW_CLUSTER", value_name = "CLUSTER_ID")]
    pub force_new_cluster: Option<String>,

    /// Guest settings, `K=V`, handed to the guest's `init` in order. Part of the guest's
    /// identity: every member must use the same.
    #[arg(long = "fsm-config", env = "HOST_FSM_CONFIG", value_delimiter = ';', value_parser = parse_kv)]
    pub fsm_config: Vec<(String, String)>,

    /// Shared secret peers and joining nodes must present. Without it, anyone who can
    /// reach the raft and admin ports can join the cluster.
    /// (A flag's value shows in `ps`; prefer `--cluster-token-file` or the environment.)
    #[arg(long, env = "HOST_CLUSTER_TOKEN", hide_env_values = true, conflicts_with = "cluster_token_file")]
    pub cluster_token: Option<String>,

    /// File holding the cluster token (surrounding whitespace ignored), for example a
    /// mounted Kubernetes Secret.
    #[arg(long, env = "HOST_CLUSTER_TOKEN_FILE")]
    pub cluster_token_file: Option<PathBuf>,

    /// Build a snapshot (and compact the log) after this many entries.
    #[arg(long, env = "HOST_SNAPSHOT_EVERY", default_value_t = 10_000)]
    pub snapshot_every: u64,

    /// Entries kept in the log behind a snapshot, so a briefly lagging follower catches
    /// up from the log rather than a full snapshot.
    #[arg(long, env = "HOST_KEEP_LOGS", default_value_t = 1_000)]
    pub keep_logs: u64,

    /// Fuel (roughly, WebAssembly instructions) one command may use. A command that runs
    /// out stops this member (never a replicated error): set it wide.
    #[arg(long, env = "HOST_FUEL_PER_ENTRY", default_value_t = 100_000_000)]
    pub fuel_per_entry: u64,

    /// Fuel one query may use. A query that runs out fails (the member goes on, rebuilding
    /// its guest instance); never replicated, so not part of the guest's identity.
    #[arg(long, env = "HOST_FUEL_PER_QUERY", default_value_t = 10_000_000)]
    pub fuel_per_query: u64,

    /// Linear memory limit of the guest instance. A refused allocation while applying a
    /// command stops this member (never a replicated error): set it wide.
    #[arg(long, env = "HOST_GUEST_MEMORY_MB", default_value_t = 4096)]
    pub guest_memory_mb: usize,

    /// Leader heartbeat period; election timeouts are 5-10 times this.
    #[arg(long, env = "HOST_HEARTBEAT_MS", default_value_t = 100)]
    pub heartbeat_ms: u64,

    /// How long a client write may wait for commit before its outcome is reported unknown.
    #[arg(long, env = "HOST_PROPOSAL_TIMEOUT_MS", default_value_t = 10_000)]
    pub proposal_timeout_ms: u64,

    /// Write one JSON line of resource samples (applied/s, CPU, RSS, disk and network
    /// bytes) per second to this file.
    #[arg(long, env = "HOST_MONITOR")]
    pub monitor: Option<PathBuf>,

    /// Sample this process's CPU (99 Hz) and write a flame graph (SVG, opens in a browser)
    /// here on shutdown.
    #[arg(long, env = "HOST_CPUPROFILE")]
    pub cpuprofile: Option<PathBuf>,

    /// Sample heap allocations (jemalloc; one sample per 512 KiB allocated on average) and
    /// write the live heap here on shutdown as a pprof profile (gzipped protobuf).
    #[arg(long, env = "HOST_MEMPROFILE")]
    pub memprofile: Option<PathBuf>,

    /// Proposal batches in flight (handed to Raft, not yet applied). New proposals
    /// gather into the next batch meanwhile: 1 maximises batching, more overlaps the
    /// leader's fsync with replication.
    #[arg(long, env = "HOST_MAX_INFLIGHT_BATCHES", default_value_t = 1)]
    pub max_inflight_batches: usize,

    /// Largest frame accepted on the client port.
    #[arg(long, env = "HOST_MAX_FRAME_BYTES", default_value_t = crate::codec::DEFAULT_MAX_FRAME)]
    pub max_frame_bytes: usize,

    /// Connections served at once on each client-facing port (binary and text); more are
    /// closed as soon as they are accepted.
    #[arg(long, env = "HOST_MAX_CLIENT_CONNECTIONS", default_value_t = crate::api::DEFAULT_MAX_CONNECTIONS)]
    pub max_client_connections: usize,

    /// Client request bytes this member holds at once across all connections, from a
    /// request's first byte until its answer is written; past it, reading waits.
    #[arg(long, env = "HOST_CLIENT_REQUEST_BUDGET_MB", default_value_t = crate::api::DEFAULT_REQUEST_BUDGET >> 20)]
    pub client_request_budget_mb: usize,

    /// Application-level command log: every applied entry is also written to
    /// `<DIR>/<id>.log` (the logger's archive format, `logger inspect` reads it) and
    /// fsynced before its result is answered. Off unless given.
    #[arg(long, env = "HOST_LOG_COMMANDS", value_name = "DIR")]
    pub log_commands: Option<PathBuf>,

    /// Do not fsync the log. Only for experiments: a crash can lose acknowledged writes.
    #[arg(long, env = "HOST_NO_FSYNC")]
    pub no_fsync: bool,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum DiscoveryMode {
    None,
    Kubernetes,
}

pub fn parse_kv(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("expected KEY=VALUE, got {s:?}")),
    }
}

impl Opts {
    pub fn data_dir(&self) -> PathBuf {
        self.data_dir.clone().unwrap_or_else(|| PathBuf::from(format!("./data/node-{}", self.id)))
    }

    /// The cluster token, or "" for none (see [`read_token`]).
    pub fn token(&self) -> Result<String, String> {
        read_token(self.cluster_token.as_deref(), self.cluster_token_file.as_deref())
    }

    /// The address peers and clients should use for a bound address. An IPv6 host is
    /// bracketed, as `host:port` needs.
    pub fn advertised(&self, bind: &str) -> String {
        match (&self.advertise_host, bind.rsplit_once(':')) {
            (Some(h), Some((_, port))) if h.contains(':') && !h.starts_with('[') => format!("[{h}]:{port}"),
            (Some(h), Some((_, port))) => format!("{h}:{port}"),
            _ => bind.to_string(),
        }
    }

    /// Refuses to advertise an address nobody can reach: a member bound to all
    /// interfaces must say which name or address the others should use.
    pub fn check_advertised(&self) -> Result<(), String> {
        for (flag, bind) in
            [("--raft-addr", &self.raft_addr), ("--admin-addr", &self.admin_addr), ("--client-addr", &self.client_addr)]
        {
            let addr = self.advertised(bind);
            let host = addr.rsplit_once(':').map_or(addr.as_str(), |(h, _)| h);
            let host = host.trim_start_matches('[').trim_end_matches(']');
            if host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_unspecified()) {
                return Err(format!(
                    "{flag} {bind} binds every interface, and {addr} cannot be reached by other members: \
                     set --advertise-host to this member's name or address"
                ));
            }
        }
        Ok(())
    }
}

/// The cluster token from `--cluster-token` or `--cluster-token-file` (also the logger's),
/// or "" for none. An empty one is refused rather than taken to mean "no authentication",
/// which is what it would silently do.
pub fn read_token(token: Option<&str>, file: Option<&std::path::Path>) -> Result<String, String> {
    let token = match (token, file) {
        (Some(t), _) => t.to_string(),
        (None, Some(path)) => std::fs::read_to_string(path)
            .map_err(|e| format!("--cluster-token-file {}: {e}", path.display()))?
            .trim()
            .to_string(),
        (None, None) => return Ok(String::new()),
    };
    if token.is_empty() {
        return Err("the cluster token is empty, which would turn authentication off; \
                    leave the token out to run without one"
            .to_string());
    }
    Ok(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_kv_settings() {
        let o = Opts::try_parse_from(["host", "--fsm", "x.wasm", "--fsm-config", "a=1", "--fsm-config", "b=x=y"])
            .expect("parse");
        assert_eq!(o.id, 1);
        assert_eq!(o.data_dir(), PathBuf::from("./data/node-1"));
        assert_eq!(o.fsm_config, vec![("a".into(), "1".into()), ("b".into(), "x=y".into())]);
        assert!(Opts::try_parse_from(["host", "--fsm", "x.wasm", "--fsm-config", "novalue"]).is_err());
        assert!(Opts::try_parse_from(["host", "--fsm", "x.wasm", "--bogus"]).is_err());
    }

    #[test]
    fn kubernetes_discovery_needs_a_selector_and_excludes_join() {
        let k = ["host", "--fsm", "x", "--discovery", "kubernetes"];
        assert!(Opts::try_parse_from(k).is_err(), "no selector");
        let o = Opts::try_parse_from([&k[..], &["--discovery-selector", "app=kv"]].concat()).expect("parse");
        assert_eq!(o.discovery, DiscoveryMode::Kubernetes);
        assert!(Opts::try_parse_from([&k[..], &["--discovery-selector", "a=b", "--join", "x:1"]].concat()).is_err());
        assert_eq!(Opts::try_parse_from(["host", "--fsm", "x"]).expect("parse").discovery, DiscoveryMode::None);
        assert!(Opts::try_parse_from(["host", "--fsm", "x", "--discovery", "consul"]).is_err());
    }

    #[test]
    fn an_empty_token_is_refused_and_a_token_file_is_read() {
        let o = Opts::try_parse_from(["host", "--fsm", "x", "--cluster-token", ""]).expect("parse");
        assert!(o.token().is_err());
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("token");
        std::fs::write(&file, "s3cret\n").expect("write");
        let path = file.display().to_string();
        let o = Opts::try_parse_from(["host", "--fsm", "x", "--cluster-token-file", &path]).expect("parse");
        assert_eq!(o.token(), Ok("s3cret".to_string()));
        std::fs::write(&file, " \n").expect("write");
        assert!(o.token().is_err(), "a blank file is an empty token");
        assert!(Opts::try_parse_from(["host", "--fsm", "x", "--cluster-token", "a", "--cluster-token-file", &path])
            .is_err());
        let o = Opts::try_parse_from(["host", "--fsm", "x"]).expect("parse");
        assert_eq!(o.token(), Ok(String::new()));
    }

    #[test]
    fn advertise_keeps_the_port() {
        let o = Opts::try_parse_from(["host", "--fsm", "x", "--advertise-host", "node2"]).expect("parse");
        assert_eq!(o.advertised("0.0.0.0:12000"), "node2:12000");
        assert!(o.check_advertised().is_ok());
        let v6 = Opts::try_parse_from(["host", "--fsm", "x", "--advertise-host", "fd00::2"]).expect("parse");
        assert_eq!(v6.advertised("[::]:12000"), "[fd00::2]:12000");
        let bracketed = Opts::try_parse_from(["host", "--fsm", "x", "--advertise-host", "[fd00::2]"]).expect("parse");
        assert_eq!(bracketed.advertised("[::]:12000"), "[fd00::2]:12000");
    }

    #[test]
    fn binding_every_interface_needs_an_advertised_host() {
        let o = Opts::try_parse_from(["host", "--fsm", "x", "--raft-addr", "0.0.0.0:12000"]).expect("parse");
        let why = o.check_advertised().expect_err("0.0.0.0 advertised");
        assert!(why.contains("--raft-addr") && why.contains("--advertise-host"), "{why}");
        let o = Opts::try_parse_from(["host", "--fsm", "x", "--admin-addr", "[::]:13000"]).expect("parse");
        assert!(o.check_advertised().expect_err("[::] advertised").contains("--admin-addr"));
        assert!(Opts::try_parse_from(["host", "--fsm", "x"]).expect("parse").check_advertised().is_ok());
    }
}
