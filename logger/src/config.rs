//! Command-line options of `logger`. Every flag can also come from an environment
//! variable (`LOGGER_<FLAG>`).

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use host::types::NodeId;
use sha2::{Digest, Sha256};

#[derive(Parser, Debug, Clone)]
#[command(name = "logger", version, about = "Raft learner that archives every committed command")]
pub struct Opts {
    #[command(subcommand)]
    pub command: Option<Command>,

    /// Logger id per followed cluster, comma-separated (`log0,log1`): the archive is
    /// `<dir>/<id>.log`, and the Raft node id is derived from it (see `node_id`).
    #[arg(long, env = "LOGGER_ID", value_delimiter = ',')]
    pub id: Vec<String>,

    /// Peer RPC address per cluster, in the order of `--id`.
    #[arg(long, env = "LOGGER_RAFT_ADDR", value_delimiter = ',')]
    pub raft_addr: Vec<String>,

    /// Admin address of a member of each cluster, in the order of `--id`.
    #[arg(long, env = "LOGGER_JOIN", value_delimiter = ',')]
    pub join: Vec<String>,

    /// Directory of the archives, their snapshots and the logger's Raft files.
    #[arg(long, env = "LOGGER_DIR", default_value = "./archive")]
    pub dir: PathBuf,

    /// HTTP: GET /status, GET /metrics, GET /recover, POST /truncate (one per process).
    #[arg(long, env = "LOGGER_ADMIN_ADDR", default_value = "127.0.0.1:14000")]
    pub admin_addr: String,

    /// Host name or IP the clusters should use to reach this process, when it differs
    /// from the bind addresses (containers).
    #[arg(long, env = "LOGGER_ADVERTISE_HOST")]
    pub advertise_host: Option<String>,

    /// The clusters' token (the same for all followed clusters); shows in `ps`.
    #[arg(long, env = "LOGGER_CLUSTER_TOKEN", conflicts_with = "cluster_token_file")]
    pub cluster_token: Option<String>,

    /// File holding the clusters' token.
    #[arg(long, env = "LOGGER_CLUSTER_TOKEN_FILE")]
    pub cluster_token_file: Option<PathBuf>,

    /// Do not fsync the archive (experiments only: a crash may then lose archived entries
    /// that the cluster has already compacted away).
    #[arg(long, env = "LOGGER_NO_FSYNC")]
    pub no_fsync: bool,

    /// Sample this process's CPU (99 Hz) and write a flame graph (SVG) here when it stops.
    #[arg(long, env = "LOGGER_CPUPROFILE")]
    pub cpuprofile: Option<PathBuf>,

    /// Entries archived between the logger's own snapshot marks, which let its Raft log
    /// be purged (the archive holds everything purged).
    #[arg(long, env = "LOGGER_PURGE_EVERY", default_value_t = 10_000)]
    pub purge_every: u64,
}

#[derive(Subcommand, Debug, Clone)]
pub enum Command {
    /// Print `{records, commands, first_index, last_index, bytes}` of an archive as one
    /// JSON line; exit non-zero naming the offset of the first bad record.
    Inspect { file: PathBuf },
}

/// One followed cluster, from the lists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Follow {
    pub name: String,
    pub node_id: NodeId,
    pub raft_addr: String,
    pub join: String,
}

impl Opts {
    /// The clusters to follow; lists of unequal length, repeated ids or an id that is no
    /// file name are errors naming the flags.
    pub fn follows(&self) -> Result<Vec<Follow>, String> {
        let (i, r, j) = (self.id.len(), self.raft_addr.len(), self.join.len());
        if i == 0 {
            return Err("--id is required (one per cluster, comma-separated)".into());
        }
        if i != r || i != j {
            return Err(format!(
                "--id, --raft-addr and --join must list one value per cluster, in the same order: \
                 got {i} ids, {r} raft addresses and {j} join addresses"
            ));
        }
        let mut out: Vec<Follow> = Vec::new();
        for ((name, raft_addr), join) in self.id.iter().zip(&self.raft_addr).zip(&self.join) {
            let name = name.trim().to_string();
            if name.is_empty()
                || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
                || name.starts_with('.')
            {
                return Err(format!("--id {name:?}: use letters, digits, '-', '_' or '.' (it names a file)"));
            }
            if out.iter().any(|f| f.name == name) {
                return Err(format!("--id {name} is given twice"));
            }
            if out.iter().any(|f| f.raft_addr == *raft_addr) {
                return Err(format!("--raft-addr {raft_addr} is given twice"));
            }
            out.push(Follow { node_id: node_id(&name), name, raft_addr: raft_addr.clone(), join: join.clone() });
        }
        Ok(out)
    }

    pub fn token(&self) -> Result<String, String> {
        host::config::read_token(self.cluster_token.as_deref(), self.cluster_token_file.as_deref())
    }

    pub fn advertised(&self, bind: &str) -> String {
        match (&self.advertise_host, bind.rsplit_once(':')) {
            (Some(h), Some((_, port))) => format!("{h}:{port}"),
            _ => bind.to_string(),
        }
    }
}

/// The Raft node id of logger `name`: the first 8 bytes of sha256("wasm-raft logger
/// <name>") with the top bit set. Stable across restarts and machines, and far from the
/// small ids replicas use; a clash with a member of another role is refused by the
/// leader, naming the id.
pub fn node_id(name: &str) -> NodeId {
    let h = Sha256::digest(format!("wasm-raft logger {name}").as_bytes());
    let mut b = [0u8; 8];
    b.copy_from_slice(&h[..8]);
    u64::from_be_bytes(b) | (1 << 63)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_must_match_and_ids_map_stably() {
        let o = Opts::try_parse_from(["logger", "--id", "log0,log1", "--raft-addr", "a:1,a:2", "--join", "b:1,b:2"])
            .expect("parse");
        let f = o.follows().expect("follows");
        assert_eq!(f.len(), 2);
        assert_eq!(f[1].node_id, node_id("log1"));
        assert_ne!(f[0].node_id, f[1].node_id);
        assert!(f[0].node_id >= 1 << 63);

        let o = Opts::try_parse_from(["logger", "--id", "log0,log1", "--raft-addr", "a:1", "--join", "b:1,b:2"])
            .expect("parse");
        let why = o.follows().expect_err("unequal");
        assert!(why.contains("--id, --raft-addr and --join") && why.contains("2 ids, 1 raft"), "{why}");
        let o = Opts::try_parse_from(["logger", "--id", "../x", "--raft-addr", "a:1", "--join", "b:1"]).expect("parse");
        assert!(o.follows().is_err());
    }
}
