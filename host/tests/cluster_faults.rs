//! Clusters of real `host` processes where something is wrong: a guest that traps (every
//! member must answer the same and stay identical), runs out of fuel or memory, or finds
//! one member's environment failing (that member stops, never replicates a result), nodes
//! that must not join (another guest, other settings, a wrong cluster token), and a
//! leader that is paused while the others move on.
//!
//! Needs the release binaries and guests from `scripts/build.sh`.

mod common;

use std::path::Path;

use common::*;

const FAULTY_LIMITS: [&str; 4] = ["--fuel-per-entry", "20000000", "--guest-memory-mb", "64"];

fn propose(c: &Cluster, command: &str) -> Result<String, String> {
    let out = c.kv(&["propose", command]);
    if out.status.success() {
        Ok(stdout_of(&out))
    } else {
        Err(stderr_of(&out))
    }
}

/// Waits for a node that should refuse to run to exit, and returns its status.
/// What a node logged since it was last (re)started by the test.
fn log_since_start(node: &Node) -> String {
    let log = std::fs::read_to_string(&node.log_path).unwrap_or_else(|e| panic!("{}: {e}", node.log_path.display()));
    log.rsplit("======== restarted by the test ========").next().unwrap_or_default().to_string()
}

/// Waits for a node to stop on its own, checks that it failed saying `why`, and forgets
/// its process so that the cluster no longer counts it as running.
fn assert_stops(node: &mut Node, why: &str) {
    let status = node.wait_exit();
    assert!(
        !status.success(),
        "node {} exited cleanly
{}",
        node.id,
        node.log_tail()
    );
    let log = log_since_start(node);
    let stop = log.lines().find(|l| l.contains("raft stopped; this member exits"));
    assert!(
        stop.is_some_and(|l| l.contains(why)),
        "node {} did not stop saying {why:?}
{}",
        node.id,
        node.log_tail()
    );
}

#[test]
fn t10_guest_faults_give_the_same_errors_on_every_member() {
    let mut c = Cluster::start(3, "faulty", &FAULTY_LIMITS);
    assert_eq!(propose(&c, "add-5"), Ok("5".to_string()));
    for (cmd, why) in [("add-then-trap-3", "trapped"), ("fail", "requested failure")] {
        let err = propose(&c, cmd).expect_err(cmd);
        assert!(err.contains(why), "{cmd}: {err}");
    }
    assert_eq!(propose(&c, "add-1"), Ok("6".to_string()), "faults left no trace");
    c.wait_converged();
    for i in 0..3 {
        let out = kv(&c.nodes[i].client_addr, &["query", "--stale", "get"]);
        assert_eq!(stdout_of(&out), "6", "node {}: {}", i + 1, stderr_of(&out));
    }

    // A restarted member replays the same log, traps included, and lands on the same state.
    let status = c.nodes[1].terminate();
    assert!(status.success(), "{}", c.nodes[1].log_tail());
    c.nodes[1].restart();
    c.wait_voters(3);
    assert_eq!(propose(&c, "add-10"), Ok("16".to_string()));
    c.wait_converged();
    let out = kv(&c.nodes[1].client_addr, &["query", "--stale", "get"]);
    assert_eq!(stdout_of(&out), "16", "{}", stderr_of(&out));
}

/// Fuel use and memory growth depend on each instance's history, so running out of
/// either is never a replicated error: the member stops, saying why, and restarted on the
/// same data it meets the command again and stops again, never skipping it.
#[test]
fn t12_fuel_or_memory_exhaustion_stops_the_member() {
    for (cmd, why) in [("spin", "ran out of fuel"), ("grow", "memory could not grow")] {
        let mut c = Cluster::start(1, "faulty", &FAULTY_LIMITS);
        assert_eq!(propose(&c, "add-5"), Ok("5".to_string()));
        let err = propose(&c, cmd).expect_err(cmd);
        assert!(!err.contains("trapped"), "{cmd} came back as a result: {err}");
        let node = &mut c.nodes[0];
        assert_stops(node, why);
        node.restart();
        assert_stops(node, why);
    }
}

/// One member whose environment fails (here: a marker file in its guest directory that
/// the guest takes for a broken disk) stops; the others answer the client and go on, and
/// the member, repaired and restarted, catches up to the same state.
#[test]
fn t15_one_members_environment_failure_stops_only_that_member() {
    let mut c = Cluster::start(3, "faulty", &FAULTY_LIMITS);
    assert_eq!(propose(&c, "add-5"), Ok("5".to_string()));
    // A follower, so that the client's answer comes from a member that applied it.
    let leader = c.leader();
    let broken = if leader == 1 { 2 } else { 1 };
    let marker = c.nodes[broken].data_dir.join("guest").join("current").join("broken-disk");
    touch(&marker);

    assert_eq!(propose(&c, "env-check"), Ok("ok".to_string()), "a majority applied it");
    assert_stops(&mut c.nodes[broken], "broken-disk");
    assert_eq!(propose(&c, "add-1"), Ok("6".to_string()));

    std::fs::remove_file(&marker).expect("repair the disk");
    c.nodes[broken].restart();
    c.wait_voters(3);
    assert_eq!(propose(&c, "add-10"), Ok("16".to_string()));
    c.wait_converged();
    let out = kv(&c.nodes[broken].client_addr, &["query", "--stale", "get"]);
    assert_eq!(stdout_of(&out), "16", "{}", stderr_of(&out));
}

/// A member whose state silently differs from the others' (its guest read something of
/// its own: no error anywhere) is found out by the leader's next checkpoint and stops,
/// saying so; the others go on. Without checkpoints it would serve its state for ever.
#[test]
fn t16_a_member_whose_state_diverged_stops_at_the_next_checkpoint() {
    let mut c = Cluster::start(3, "faulty", &FAULTY_LIMITS);
    let leader = c.leader();
    let skewed = if leader == 1 { 2 } else { 1 };
    touch(&c.nodes[skewed].data_dir.join("guest").join("current").join("skewed"));
    // The leader has no marker: its counter stays 0; the skewed member's becomes 1.
    assert_eq!(propose(&c, "skew"), Ok("0".to_string()));
    // Entries go on until a checkpoint index is passed and the leader commits its digest
    // there (every 128 entries, looked for every 2 s).
    let clients = format!("{},{}", c.nodes[leader].client_addr, c.nodes[3 - leader - skewed].client_addr);
    let stopped = poll_until(TIMEOUT, || {
        let out = kv(&clients, &["propose", "add-0"]);
        assert!(out.status.success(), "{}", stderr_of(&out));
        c.nodes[skewed].exited().ok_or_else(|| "still running".to_string())
    });
    assert!(stopped.is_ok(), "the diverged member is still serving\n{}", c.nodes[skewed].log_tail());
    assert_stops(&mut c.nodes[skewed], "state diverged");
    assert_eq!(propose(&c, "add-1"), Ok("1".to_string()), "the others go on");
    let (_, metrics) = http_get(&c.nodes[leader].admin_addr, "/metrics").expect("metrics");
    assert!(metrics.contains("wasm_raft_checkpoints_verified_total"), "{metrics}");
}

fn touch(path: &Path) {
    std::fs::write(path, b"").unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
}

#[test]
fn t20_node_with_another_guest_or_settings_is_refused() {
    let c = Cluster::start(1, "kvstore", &[]);
    let join = c.nodes[0].admin_addr.clone();
    let dir = tempfile::tempdir().expect("tempdir");

    let mut other = Node::start(2, dir.path(), &guest("faulty"), &[], Some(&join));
    let status = other.wait_exit();
    assert_eq!(status.code(), Some(2), "{}", other.log_tail());
    assert!(other.log_tail().contains("guest module mismatch"), "{}", other.log_tail());

    let settings = vec!["--fsm-config".to_string(), "preload-keys=3".to_string()];
    let mut other = Node::start(3, dir.path(), &guest("kvstore"), &settings, Some(&join));
    let status = other.wait_exit();
    assert_eq!(status.code(), Some(2), "{}", other.log_tail());
    assert!(other.log_tail().contains("settings mismatch"), "{}", other.log_tail());

    let s = c.nodes[0].status();
    assert_eq!(voter_ids(&s), vec![1], "nobody was added: {s}");
    assert_eq!(members(&s).len(), 1, "not even as a learner: {s}");
}

#[test]
fn t30_cluster_token_keeps_strangers_out() {
    let token = ["--cluster-token", "s3cret"];
    let mut c = Cluster::start(2, "kvstore", &token);
    let join = c.nodes[0].admin_addr.clone();
    let dir = tempfile::tempdir().expect("tempdir");
    let wrong = vec!["--cluster-token".to_string(), "guess".to_string()];
    let mut stranger = Node::start(9, dir.path(), &guest("kvstore"), &wrong, Some(&join));
    let status = stranger.wait_exit();
    assert_eq!(status.code(), Some(2), "{}", stranger.log_tail());
    assert!(stranger.log_tail().contains("cluster token"), "{}", stranger.log_tail());
    assert_eq!(voter_ids(&c.nodes[0].status()), vec![1, 2]);

    // The members themselves, holding the token, still replicate.
    set_many(&c.client_addrs(), 0..20, 2);
    c.wait_converged();
}

#[test]
fn t40_data_dir_keeps_its_guest() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut node = Node::start(1, dir.path(), &guest("kvstore"), &[], None);
    wait_for(|| try_status(&node.admin_addr).is_ok(), "node 1 to serve /status");
    assert!(node.terminate().success());
    let mut again = Node::start(1, dir.path(), &guest("faulty"), &[], None);
    let status = again.wait_exit();
    assert_eq!(status.code(), Some(2), "{}", again.log_tail());
    assert!(again.log_tail().contains("cannot change its guest"), "{}", again.log_tail());
}

fn signal(node: &Node, sig: &str) {
    let ok = std::process::Command::new("kill").arg(format!("-{sig}")).arg(node.pid().to_string()).status();
    assert!(ok.is_ok_and(|s| s.success()), "kill -{sig} node {}", node.id);
}

/// `wasm_raft_lease_reads_total` from a member's /metrics.
fn lease_reads(node: &Node) -> u64 {
    let (_, body) = http_get(&node.admin_addr, "/metrics").expect("GET /metrics");
    body.lines()
        .find_map(|l| l.strip_prefix("wasm_raft_lease_reads_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no lease_reads_total in /metrics:\n{body}"))
}

/// Reads under the leader lease must stay linearizable: a leader that was paused (think
/// of a long GC pause or a stalled VM) while the others elected a new leader and took a
/// write must not answer a read from its old state when it wakes up.
#[test]
fn t60_a_paused_leader_serves_no_stale_read() {
    let mut c = Cluster::start(3, "kvstore", &[]);
    let old = c.leader();
    set_acknowledged(&c.client_addrs(), "k", "before");
    for _ in 0..3 {
        let out = kv(&c.nodes[old].client_addr, &["get", "k"]);
        assert_eq!(stdout_of(&out), "before", "{}", stderr_of(&out));
    }
    assert!(lease_reads(&c.nodes[old]) > 0, "the leader answered reads without its lease");

    signal(&c.nodes[old], "STOP");
    let others: Vec<usize> = (0..3).filter(|&i| i != old).collect();
    let old_id = c.nodes[old].id;
    c.wait_until("a new leader among the others", |c| {
        for &i in &others {
            let s = try_status(&c.nodes[i].admin_addr)?;
            if s["state"] == "Leader" {
                return Ok(());
            }
            if s["leader_id"].as_u64() == Some(old_id) {
                return Err(format!("node {} still follows the paused leader", i + 1));
            }
        }
        Err("no leader yet".into())
    });
    let others_addrs = others.iter().map(|&i| c.nodes[i].client_addr.clone()).collect::<Vec<_>>().join(",");
    set_acknowledged(&others_addrs, "k", "after");

    // Straight to the old leader, the moment it runs again: it either learns it was
    // deposed or confirms nothing, and must never say "before".
    signal(&c.nodes[old], "CONT");
    let out = kv(&c.nodes[old].client_addr, &["get", "k"]);
    assert_eq!(stdout_of(&out), "after", "stale read from the resumed old leader: {}", stderr_of(&out));
    c.wait_converged();
}

/// Resumes a paused member when dropped, so a failing test leaves no stopped process.
struct Paused<'a>(&'a Node);

impl<'a> Paused<'a> {
    fn new(node: &'a Node) -> Self {
        signal(node, "STOP");
        Paused(node)
    }
}

impl Drop for Paused<'_> {
    fn drop(&mut self) {
        signal(self.0, "CONT");
    }
}

/// `kv --timeout N` and the exit code, and how long it took. Killed, and the test
/// failed, if it is still running long after its timeout.
fn kv_timed(cluster_addrs: &str, timeout_s: u64, args: &[&str]) -> (Option<i32>, String, std::time::Duration) {
    let mut cmd = clean_command(&kv_exe());
    cmd.arg("--cluster").arg(cluster_addrs).arg("--timeout").arg(timeout_s.to_string()).args(args);
    let start = std::time::Instant::now();
    let out = run_with_timeout(cmd, std::time::Duration::from_secs(timeout_s + 20))
        .unwrap_or_else(|e| panic!("kv outlived its --timeout {timeout_s}: {e}"));
    (out.status.code(), stderr_of(&out), start.elapsed())
}

/// A paused member (SIGSTOP: its kernel still accepts connections and takes requests,
/// nothing answers) must not hang a client past its deadline: a write to it ends as an
/// unknown outcome, a read as unavailable, and a read given the other members too is
/// answered by them.
#[test]
fn t70_a_paused_member_does_not_hang_a_client_past_its_timeout() {
    const TIMEOUT_S: u64 = 3;
    let slack = std::time::Duration::from_millis(1500);
    let mut c = Cluster::start(3, "kvstore", &[]);
    let leader = c.leader();
    set_acknowledged(&c.client_addrs(), "k", "before");
    let paused_addr = c.nodes[leader].client_addr.clone();
    let others: Vec<String> = (0..3).filter(|&i| i != leader).map(|i| c.nodes[i].client_addr.clone()).collect();
    {
        let _paused = Paused::new(&c.nodes[leader]);

        let (code, err, took) = kv_timed(&paused_addr, TIMEOUT_S, &["set", "k", "maybe"]);
        assert_eq!(code, Some(3), "a write to a paused member may have been applied: {err}");
        assert!(err.contains("unknown outcome"), "{err}");
        assert!(took < std::time::Duration::from_secs(TIMEOUT_S) + slack, "took {took:?}");

        let (code, err, took) = kv_timed(&paused_addr, TIMEOUT_S, &["get", "k"]);
        assert_eq!(code, Some(1), "{err}");
        assert!(err.contains("unavailable"), "{err}");
        assert!(took < std::time::Duration::from_secs(TIMEOUT_S) + slack, "took {took:?}");

        // The paused member first: the read moves on to the others, who elect a leader.
        let all = format!("{paused_addr},{}", others.join(","));
        let out = kv(&all, &["--timeout", "8", "get", "k"]);
        assert!(out.status.success(), "{}", stderr_of(&out));
        assert_eq!(stdout_of(&out), "before", "{}", stderr_of(&out));
    }
    c.wait_converged();
}
