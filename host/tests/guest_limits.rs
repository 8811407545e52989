//! The guest limits (`--fuel-per-entry`, `--guest-memory-mb`) are part of the guest's
//! identity, with real `host` processes: a member restarted with another budget is
//! refused, naming the flag; a joiner with another memory limit is refused by the leader,
//! naming the flag; a `node.json` written before the limits were pinned adopts the
//! current ones once, and they hold from then on.
//!
//! Needs the release binaries and guests from `scripts/build.sh`.

mod common;

use common::*;

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

fn node_json(node: &Node) -> serde_json::Value {
    let path = node.data_dir.join("node.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A member pins the limits it was first started with; a restart with another fuel
/// budget is refused with exit code 2 and a message naming the flag, and the recorded
/// budget still starts.
#[test]
fn t10_a_restart_with_another_fuel_budget_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fsm = guest("kvstore");
    let mut node = Node::start(1, dir.path(), &fsm, &args(&["--fuel-per-entry", "50000000"]), None);
    wait_for(|| try_status(&node.admin_addr).is_ok_and(|s| s["state"] == "Leader"), "node 1 to lead");
    let out = kv(&node.client_addr, &["set", "k", "v"]);
    assert!(out.status.success(), "{}", stderr_of(&out));
    let pinned = node_json(&node);
    assert_eq!(pinned["fuel_per_entry"], 50_000_000, "{pinned}");
    assert_eq!(pinned["guest_memory_mb"], 4096, "{pinned}");
    assert!(node.terminate().success());

    let mut other = Node::start(1, dir.path(), &fsm, &args(&["--fuel-per-entry", "60000000"]), None);
    let status = other.wait_exit();
    assert_eq!(status.code(), Some(2), "{}", other.log_tail());
    let log = other.log();
    assert!(log.contains("--fuel-per-entry 50000000") && log.contains("60000000"), "{}", other.log_tail());

    let mut same = Node::start(1, dir.path(), &fsm, &args(&["--fuel-per-entry", "50000000"]), None);
    wait_for(|| try_status(&same.admin_addr).is_ok_and(|s| s["state"] == "Leader"), "node 1 to lead again");
    let out = kv(&same.client_addr, &["get", "k"]);
    assert_eq!(stdout_of(&out).trim(), "v", "{}", stderr_of(&out));
    same.terminate();
}

/// The leader compares a joiner's limits with its own: another `--guest-memory-mb` is
/// refused (the joiner exits with code 2, naming the flag) and the cluster does not
/// change; the same limits join.
#[test]
fn t20_a_joiner_with_another_memory_limit_is_refused() {
    let mut c = Cluster::start(1, "kvstore", &[]);
    let join = c.nodes[0].admin_addr.clone();
    let dir = tempfile::tempdir().expect("tempdir");
    let fsm = guest("kvstore");
    let mut joiner = Node::start(2, dir.path(), &fsm, &args(&["--guest-memory-mb", "512"]), Some(&join));
    let status = joiner.wait_exit();
    assert_eq!(status.code(), Some(2), "{}", joiner.log_tail());
    let log = joiner.log();
    assert!(
        log.contains("guest limits mismatch") && log.contains("--guest-memory-mb 512 (node 2's) differs from 4096"),
        "{}",
        joiner.log_tail()
    );
    assert_eq!(voter_ids(&c.nodes[0].status()), vec![1], "the cluster did not change");
    assert!(!joiner.data_dir.join("node.json").exists(), "a refused joiner is bound to nothing");

    c.add_node();
    c.wait_voters(2);
}

/// A `node.json` from before the limits were pinned: the member starts, says it adopts
/// the current limits, records them, and refuses other ones from then on.
#[test]
fn t30_an_old_node_json_adopts_the_current_limits_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fsm = guest("kvstore");
    let mut node = Node::start(1, dir.path(), &fsm, &[], None);
    wait_for(|| try_status(&node.admin_addr).is_ok_and(|s| s["state"] == "Leader"), "node 1 to lead");
    assert!(kv(&node.client_addr, &["set", "k", "v"]).status.success());
    assert!(node.terminate().success());

    let mut file = node_json(&node);
    let map = file.as_object_mut().expect("an object");
    assert!(map.remove("fuel_per_entry").is_some() && map.remove("guest_memory_mb").is_some());
    std::fs::write(node.data_dir.join("node.json"), serde_json::to_vec(&file).expect("json")).expect("write");

    let mut node = Node::start(1, dir.path(), &fsm, &args(&["--guest-memory-mb", "1024"]), None);
    wait_for(|| try_status(&node.admin_addr).is_ok_and(|s| s["state"] == "Leader"), "node 1 to lead");
    assert!(node.log().contains("node.json predates pinned guest limits"), "{}", node.log_tail());
    let pinned = node_json(&node);
    assert_eq!(
        (pinned["fuel_per_entry"].as_u64(), pinned["guest_memory_mb"].as_u64()),
        (Some(100_000_000), Some(1024))
    );
    assert_eq!(pinned["cluster_id"], file["cluster_id"], "the rest of the file stays");
    assert!(node.terminate().success());

    let mut other = Node::start(1, dir.path(), &fsm, &[], None);
    assert_eq!(other.wait_exit().code(), Some(2), "{}", other.log_tail());
    assert!(other.log().contains("--guest-memory-mb 1024"), "{}", other.log_tail());
}
