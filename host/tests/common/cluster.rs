//! A cluster of [`Node`]s in one temporary directory, and waiting on its `/status`.

use std::path::PathBuf;
use std::process::Output;
use std::thread;
use std::time::Instant;

use serde_json::Value;

use super::http::{field_str, field_u64, try_status, voter_ids};
use super::kv_ops::{key, kv, value};
use super::node::Node;
use super::paths::guest;
use super::process::{stderr_of, stdout_of, POLL_INTERVAL, TIMEOUT};

pub struct Cluster {
    /// `nodes[i]` has id `i + 1`.
    pub nodes: Vec<Node>,
    fsm: PathBuf,
    extra: Vec<String>,
    // Declared after `nodes`, so the processes are gone before their files are removed.
    dir: tempfile::TempDir,
}

impl Cluster {
    /// Node 1 bootstraps; the others start together and join through node 1; returns once
    /// all `n` are voters and every node knows the leader.
    pub fn start(n: usize, guest_name: &str, extra_args: &[&str]) -> Cluster {
        assert!(n >= 1, "a cluster has at least one node");
        let dir = tempfile::Builder::new()
            .prefix("host-cluster-")
            .tempdir()
            .expect("create a temporary directory for the cluster");
        let mut cluster = Cluster {
            nodes: Vec::new(),
            fsm: guest(guest_name),
            extra: extra_args.iter().map(|s| s.to_string()).collect(),
            dir,
        };
        cluster.nodes.push(Node::start(1, cluster.dir.path(), &cluster.fsm, &cluster.extra, None));
        cluster.wait_until("node 1 to bootstrap and become leader", |c| {
            let status = try_status(&c.nodes[0].admin_addr)?;
            match status["state"].as_str() {
                Some("Leader") => Ok(()),
                _ => Err(format!("node 1: {status}")),
            }
        });
        let join = cluster.nodes[0].admin_addr.clone();
        for id in 2..=n as u64 {
            let node = Node::start(id, cluster.dir.path(), &cluster.fsm, &cluster.extra, Some(&join));
            cluster.nodes.push(node);
        }
        cluster.wait_voters(n);
        cluster
    }

    /// Starts one more node that joins through every running member's admin address (the
    /// comma-separated form of `--join`). Returns its index; it is not waited for.
    pub fn add_node(&mut self) -> usize {
        self.add_node_with(&[])
    }

    /// [`Cluster::add_node`] with flags of its own besides the cluster's.
    pub fn add_node_with(&mut self, flags: &[&str]) -> usize {
        let join = self.running().map(|i| self.nodes[i].admin_addr.clone()).collect::<Vec<_>>().join(",");
        let id = self.nodes.len() as u64 + 1;
        let mut extra = self.extra.clone();
        extra.extend(flags.iter().map(|f| f.to_string()));
        let node = Node::start(id, self.dir.path(), &self.fsm, &extra, Some(&join));
        self.nodes.push(node);
        self.nodes.len() - 1
    }

    /// Indexes of the nodes the test has not stopped.
    pub fn running(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.nodes.len()).filter(|&i| self.nodes[i].is_up())
    }

    /// Client addresses of the running nodes, as `kv --cluster` takes them.
    pub fn client_addrs(&self) -> String {
        self.running().map(|i| self.nodes[i].client_addr.clone()).collect::<Vec<_>>().join(",")
    }

    pub fn kv(&self, args: &[&str]) -> Output {
        kv(&self.client_addrs(), args)
    }

    /// The tail of every node's log, for failure messages.
    pub fn logs(&self) -> String {
        self.nodes.iter().map(Node::log_tail).collect::<Vec<_>>().join("\n")
    }

    /// Polls `check` until it returns `Ok` or [`TIMEOUT`] passes; then panics with `why`,
    /// the last error and the logs. Fails at once if a node the test started has died.
    pub fn wait_until<T>(&mut self, why: &str, mut check: impl FnMut(&Cluster) -> Result<T, String>) -> T {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let last = match check(self) {
                Ok(value) => return value,
                Err(last) => last,
            };
            let died: Vec<String> = self
                .nodes
                .iter_mut()
                .filter_map(|n| n.exited().map(|s| format!("node {} exited ({s})", n.id)))
                .collect();
            if !died.is_empty() || Instant::now() >= deadline {
                let reason = if died.is_empty() { format!("timed out after {TIMEOUT:?}") } else { died.join(", ") };
                panic!("{reason} while waiting for {why}\nlast seen: {last}\n{}", self.logs());
            }
            thread::sleep(POLL_INTERVAL);
        }
    }

    /// The statuses of the running nodes, or the first one that does not answer.
    pub fn statuses(&self) -> Result<Vec<(usize, Value)>, String> {
        self.running()
            .map(|i| {
                try_status(&self.nodes[i].admin_addr)
                    .map(|s| (i, s))
                    .map_err(|e| format!("node {}: {e}", self.nodes[i].id))
            })
            .collect()
    }

    /// The index of the node that is leader in the newest term among those that answer.
    /// An isolated or stale leader of an older term does not count.
    pub fn find_leader(&self) -> Result<usize, String> {
        let answering: Vec<(usize, Value)> =
            self.running().filter_map(|i| try_status(&self.nodes[i].admin_addr).ok().map(|s| (i, s))).collect();
        let newest_term =
            answering.iter().filter_map(|(_, s)| s["term"].as_u64()).max().ok_or("no node answers /status")?;
        answering
            .iter()
            .find(|(_, s)| s["state"] == "Leader" && s["term"].as_u64() == Some(newest_term))
            .map(|(i, _)| *i)
            .ok_or_else(|| {
                let states: Vec<String> = answering
                    .iter()
                    .map(|(i, s)| format!("node {}: {} term {}", i + 1, s["state"], s["term"]))
                    .collect();
                format!("no leader in term {newest_term}: {}", states.join("; "))
            })
    }

    /// Waits for a leader and returns its index.
    pub fn leader(&mut self) -> usize {
        self.wait_until("a leader", Cluster::find_leader)
    }

    /// Waits until the leader lists exactly `n` voters and every running node reports
    /// that leader, so a client can start from any of them.
    pub fn wait_voters(&mut self, n: usize) {
        self.wait_until(&format!("{n} voters that all know the leader"), |c| {
            let leader = c.find_leader()?;
            let leader_status = try_status(&c.nodes[leader].admin_addr)?;
            let voters = voter_ids(&leader_status);
            if voters.len() != n {
                return Err(format!("leader lists voters {voters:?}"));
            }
            let leader_id = c.nodes[leader].id;
            for (i, status) in c.statuses()? {
                if status["leader_id"].as_u64() != Some(leader_id) {
                    return Err(format!(
                        "node {} reports leader_id {} instead of {leader_id}",
                        i + 1,
                        status["leader_id"]
                    ));
                }
            }
            Ok(())
        });
    }

    /// Waits until every running node has applied the whole log and reports the same
    /// `state_digest` at the same `last_applied`; returns one of the statuses.
    pub fn wait_converged(&mut self) -> Value {
        let all: Vec<usize> = self.running().collect();
        self.wait_converged_among(&all)
    }

    /// [`Cluster::wait_converged`] for the nodes at `indexes` only (others may run apart).
    pub fn wait_converged_among(&mut self, indexes: &[usize]) -> Value {
        self.wait_until("all nodes to converge on one state", |c| {
            let statuses = indexes
                .iter()
                .map(|&i| {
                    try_status(&c.nodes[i].admin_addr)
                        .map(|s| (i, s))
                        .map_err(|e| format!("node {}: {e}", c.nodes[i].id))
                })
                .collect::<Result<Vec<_>, String>>()?;
            let end = statuses.iter().map(|(_, s)| field_u64(s, "last_log_index")).max().ok_or("no running node")?;
            for (i, s) in &statuses {
                let applied = field_u64(s, "last_applied");
                if applied != end {
                    return Err(format!("node {} applied {applied} of {end}", i + 1));
                }
            }
            let digests: Vec<&str> = statuses.iter().map(|(_, s)| field_str(s, "state_digest")).collect();
            if digests.iter().any(|d| *d != digests[0]) {
                // Kept as a retryable error only because two statuses are not read at the
                // same instant; a real divergence persists and fails at the deadline.
                return Err(format!("different state_digest at last_applied {end}: {digests:?}"));
            }
            Ok(statuses[0].1.clone())
        })
    }

    /// Waits until node `i` has applied at least everything the leader had applied when
    /// this was called, so a stale read on it sees every earlier acknowledged write.
    pub fn wait_caught_up(&mut self, i: usize) {
        let leader = self.leader();
        let target = field_u64(&self.nodes[leader].status(), "last_applied");
        let id = self.nodes[i].id;
        self.wait_until(&format!("node {id} to apply index {target}"), |c| {
            let applied = field_u64(&try_status(&c.nodes[i].admin_addr)?, "last_applied");
            if applied >= target {
                Ok(())
            } else {
                Err(format!("node {id} applied {applied}"))
            }
        });
    }

    /// `kv get --stale` against node `i` alone: what that node's own state holds.
    pub fn stale_get(&self, i: usize, key: &str) -> Output {
        kv(&self.nodes[i].client_addr, &["get", "--stale", key])
    }

    /// Checks, node by node, that each running node's own state holds `key(i) = value(i)`
    /// for the sampled `i`.
    pub fn assert_every_node_has(&mut self, sample: &[usize]) {
        let nodes: Vec<usize> = self.running().collect();
        for n in nodes {
            self.wait_caught_up(n);
            for &i in sample {
                let out = self.stale_get(n, &key(i));
                assert!(
                    out.status.success(),
                    "node {} lacks acknowledged write {}: {}",
                    n + 1,
                    key(i),
                    stderr_of(&out)
                );
                assert_eq!(stdout_of(&out), value(i), "value of {} on node {}", key(i), n + 1);
            }
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if thread::panicking() {
            self.dir.disable_cleanup(true);
            eprintln!("cluster files kept in {}", self.dir.path().display());
        }
    }
}
