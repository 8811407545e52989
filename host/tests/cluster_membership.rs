//! Membership operations with real `host` processes: removing a member under load (it is
//! told and stops, and stays stopped), replacing a dead one, demoting and promoting,
//! handing leadership over on request and on SIGTERM, and a joiner that stopped as a
//! learner finishing its join; with the clients' history checked where they run.
//!
//! Needs the release binaries and guests from `scripts/build.sh`.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::workload::{collect, final_values, start_clients};
use common::*;
use serde_json::Value;

/// `kv --admin ... <args>` against the given admin addresses.
fn kv_admin(admins: &str, token: Option<&str>, args: &[&str]) -> std::process::Output {
    let mut cmd = clean_command(&kv_exe());
    cmd.args(["--admin", admins, "--timeout", "30"]);
    if let Some(t) = token {
        cmd.args(["--cluster-token", t]);
    }
    cmd.args(args);
    run_with_timeout(cmd, KV_TIMEOUT * 2).unwrap_or_else(|e| panic!("kv {args:?}: {e}"))
}

fn admins(c: &Cluster, indexes: &[usize]) -> String {
    indexes.iter().map(|&i| c.nodes[i].admin_addr.clone()).collect::<Vec<_>>().join(",")
}

fn member_ids(status: &Value) -> Vec<u64> {
    members(status).iter().map(|m| field_u64(m, "id")).collect()
}

fn wait_exit(node: &mut Node) -> std::process::ExitStatus {
    let status = poll_until(TIMEOUT, || node.exited().ok_or_else(|| "still running".to_string()))
        .unwrap_or_else(|e| panic!("node {} did not exit: {e}\n{}", node.id, node.log_tail()));
    node.kill9();
    status
}

/// Clients run while a follower is removed: it hears of it and exits (0, saying so),
/// refuses to start again on its data dir, the others keep committing as two voters,
/// and the history holds.
#[test]
fn t10_a_removed_member_is_told_and_stops_and_the_rest_serve_on() {
    let mut c = Cluster::start(3, "kvstore", &[]);
    let leader = c.leader();
    let victim = (0..3).find(|&i| i != leader).expect("a follower");
    let victim_id = c.nodes[victim].id;
    let addrs: Vec<String> = c.nodes.iter().map(|n| n.client_addr.clone()).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let clients = start_clients(&rt, &addrs, &stop);
    std::thread::sleep(Duration::from_secs(1));

    // Through a follower: the request is sent on to the leader.
    let via = (0..3).find(|&i| i != leader && i != victim).expect("another follower");
    let out = kv_admin(&admins(&c, &[via]), None, &["remove", &victim_id.to_string()]);
    assert!(out.status.success(), "remove: {}\n{}", stderr_of(&out), c.logs());

    let status = wait_exit(&mut c.nodes[victim]);
    assert_eq!(status.code(), Some(0), "a removed member stops as asked\n{}", c.nodes[victim].log_tail());
    assert!(c.nodes[victim].log_tail().contains("removed from cluster"), "{}", c.nodes[victim].log_tail());

    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, Ordering::Relaxed);
    let history = rt.block_on(collect(clients));
    let rest: Vec<String> = (0..3).filter(|&i| i != victim).map(|i| c.nodes[i].client_addr.clone()).collect();
    let finals = rt.block_on(final_values(&rest));
    let violations = history.violations(&finals);
    assert!(
        violations.is_empty(),
        "{} violations: {:?}\n{}",
        violations.len(),
        &violations[..violations.len().min(10)],
        c.logs()
    );
    assert!(history.acknowledged_writes() > 50, "clients hardly got through: {}", history.acknowledged_writes());

    let listed: Value = serde_json::from_slice(&kv_admin(&admins(&c, &[leader]), None, &["members"]).stdout)
        .expect("kv members prints JSON");
    let rest_ids: Vec<u64> = [1u64, 2, 3].into_iter().filter(|&i| i != victim_id).collect();
    assert_eq!(listed["voter_sets"], serde_json::json!([rest_ids]));
    assert_eq!(listed["joint"], false);
    assert!(!member_ids(&c.nodes[leader].status()).contains(&victim_id));
    set_many(&rest.join(","), 0..20, 2);

    // Its data dir remembers: started again, it refuses, naming what to do.
    c.nodes[victim].restart();
    let status = wait_exit(&mut c.nodes[victim]);
    assert_eq!(status.code(), Some(2));
    assert!(c.nodes[victim].log_tail().contains("was removed from cluster"), "{}", c.nodes[victim].log_tail());
}

/// A member dies with its disk. While it is a voter, a fresh process with its id is
/// refused; once it is removed, the same id joins afresh, catches up and votes, and
/// every member holds the same state.
#[test]
fn t20_a_dead_member_is_replaced_by_removal_and_a_fresh_join() {
    let mut c = Cluster::start(3, "kvstore", &[]);
    set_many(&c.client_addrs(), 0..100, 4);
    let leader = c.leader();
    let dead = (0..3).find(|&i| i != leader).expect("a follower");
    let dead_id = c.nodes[dead].id;
    c.nodes[dead].kill9();
    std::fs::remove_dir_all(&c.nodes[dead].data_dir).expect("wipe its data dir");

    let seeds = admins(&c, &[leader]);
    c.nodes[dead].restart_joining(&seeds);
    wait_exit(&mut c.nodes[dead]);
    assert!(c.nodes[dead].log_tail().contains("empty log"), "{}", c.nodes[dead].log_tail());

    let out = kv_admin(&seeds, None, &["remove", &dead_id.to_string()]);
    assert!(out.status.success(), "remove: {}", stderr_of(&out));
    std::fs::remove_dir_all(&c.nodes[dead].data_dir).ok();
    c.nodes[dead].restart_joining(&seeds);
    c.wait_voters(3);
    set_many(&c.client_addrs(), 100..150, 4);
    c.wait_converged();
    assert_all_readable(&c.client_addrs(), 0..150, 4);
}

/// Demote and promote a follower; the checks that keep an operator from hurting the
/// cluster: no change without the token, none to the leader itself, none to the last
/// voter, none to a stranger.
#[test]
fn t30_demote_promote_and_what_is_refused() {
    let token = "membership-secret";
    let mut c = Cluster::start(3, "kvstore", &["--cluster-token", token]);
    let leader = c.leader();
    let follower = (0..3).find(|&i| i != leader).expect("a follower");
    let fid = c.nodes[follower].id.to_string();
    let lid = c.nodes[leader].id.to_string();
    let all = admins(&c, &[0, 1, 2]);

    let out = kv_admin(&all, None, &["demote", &fid]);
    assert!(!out.status.success() && stderr_of(&out).contains("token"), "no token: {}", stderr_of(&out));
    for (args, why) in [
        (vec!["remove", lid.as_str()], "leads"),
        (vec!["demote", lid.as_str()], "leads"),
        (vec!["remove", "42"], "not a member"),
        (vec!["promote", fid.as_str()], ""),
    ] {
        let out = kv_admin(&all, Some(token), &args);
        if why.is_empty() {
            assert!(out.status.success(), "{args:?}: {}", stderr_of(&out));
            assert!(stdout_of(&out).contains("already a voter"), "{args:?}: {}", stdout_of(&out));
        } else {
            assert!(!out.status.success() && stderr_of(&out).contains(why), "{args:?}: {}", stderr_of(&out));
        }
    }

    let out = kv_admin(&all, Some(token), &["demote", &fid]);
    assert!(out.status.success(), "demote: {}", stderr_of(&out));
    let voters = voter_ids(&c.nodes[leader].status());
    assert_eq!(voters.len(), 2, "{voters:?}");
    assert!(!voters.contains(&c.nodes[follower].id));
    assert_eq!(field_str(&c.nodes[follower].status(), "state"), "Learner");
    set_many(&c.client_addrs(), 0..20, 2);

    let out = kv_admin(&all, Some(token), &["promote", &fid]);
    assert!(out.status.success(), "promote: {}", stderr_of(&out));
    c.wait_voters(3);
    c.wait_converged();
}

/// Leadership handed to a chosen member while clients run, then a leader stopped with
/// SIGTERM hands over on its own; no acknowledged write is lost either way.
#[test]
fn t40_leadership_is_handed_over_on_request_and_on_sigterm() {
    let mut c = Cluster::start(3, "kvstore", &[]);
    let addrs: Vec<String> = c.nodes.iter().map(|n| n.client_addr.clone()).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let clients = start_clients(&rt, &addrs, &stop);
    std::thread::sleep(Duration::from_secs(1));

    let leader = c.leader();
    let chosen = (0..3).find(|&i| i != leader).expect("a follower");
    let out = kv_admin(&admins(&c, &[0, 1, 2]), None, &["transfer-leader", &c.nodes[chosen].id.to_string()]);
    assert!(out.status.success(), "transfer: {}\n{}", stderr_of(&out), c.logs());
    let now_leading = c.leader();
    assert_ne!(now_leading, leader, "{}", stdout_of(&out));
    std::thread::sleep(Duration::from_secs(1));

    let started = Instant::now();
    let status = c.nodes[now_leading].terminate();
    assert!(status.success(), "{}", c.nodes[now_leading].log_tail());
    assert!(c.nodes[now_leading].log_tail().contains("leadership handed over"), "{}", c.nodes[now_leading].log_tail());
    let next = c.leader();
    eprintln!("a new leader {} within {:?} of SIGTERM", next + 1, started.elapsed());
    std::thread::sleep(Duration::from_secs(1));
    c.nodes[now_leading].restart();

    stop.store(true, Ordering::Relaxed);
    let history = rt.block_on(collect(clients));
    let finals = rt.block_on(final_values(&addrs));
    let violations = history.violations(&finals);
    assert!(
        violations.is_empty(),
        "{} violations: {:?}\n{}",
        violations.len(),
        &violations[..violations.len().min(10)],
        c.logs()
    );
    c.wait_converged();
}

/// A joiner that stopped after it became a learner, before it was promoted, finishes its
/// join when it starts again without `--join` (what it left in its data dir says it asked
/// to vote).
#[test]
fn t50_a_joiner_stopped_as_a_learner_finishes_its_join_on_restart() {
    let mut c = Cluster::start(3, "kvstore", &[]);
    set_many(&c.client_addrs(), 0..20, 2);
    // A learner (on purpose), then the mark a voter's join leaves until it is made one.
    let i = c.add_node_with(&["--learner"]);
    c.wait_caught_up(i);
    let id = c.nodes[i].id;
    assert!(!voter_ids(&c.nodes[0].status()).contains(&id));
    c.nodes[i].terminate();
    c.nodes[i].forget_flag("--learner");
    std::fs::write(c.nodes[i].data_dir.join("wants-voter"), b"").expect("mark");
    c.nodes[i].restart();
    c.wait_voters(4);
    assert!(!c.nodes[i].data_dir.join("wants-voter").exists(), "the mark goes once it votes");
}

/// A majority is lost for good: the survivor, started with `--force-new-cluster` and its
/// cluster's id, goes on alone as a new cluster with everything acknowledged; a lost
/// member that comes back is refused by it (another cluster) until it is wiped and joins;
/// the flag left on for a later start is refused.
#[test]
fn t60_a_survivor_forces_a_new_cluster_after_losing_the_majority() {
    let mut c = Cluster::start(3, "kvstore", &[]);
    set_many(&c.client_addrs(), 0..100, 4);
    let old_id = field_str(&c.nodes[0].status(), "cluster_id").to_string();
    let survivor = 0;
    c.wait_caught_up(survivor);
    c.nodes[1].kill9();
    c.nodes[2].kill9();
    c.nodes[survivor].terminate();

    c.nodes[survivor].add_flags(&["--force-new-cluster", &old_id]);
    c.nodes[survivor].restart();
    let alone = c.nodes[survivor].client_addr.clone();
    c.wait_until("the survivor to lead alone", |c| {
        let s = try_status(&c.nodes[survivor].admin_addr)?;
        if s["state"] == "Leader" && voter_ids(&s) == vec![1] {
            Ok(())
        } else {
            Err(format!("{s}"))
        }
    });
    let new_id = field_str(&c.nodes[survivor].status(), "cluster_id").to_string();
    assert_ne!(new_id, old_id, "a forced cluster is a new cluster");
    assert_all_readable(&alone, 0..100, 4);
    set_many(&alone, 100..120, 2);

    // Left on, the flag names a cluster this member no longer belongs to.
    c.nodes[survivor].terminate();
    c.nodes[survivor].restart();
    let status = wait_exit(&mut c.nodes[survivor]);
    assert_eq!(status.code(), Some(2));
    assert!(c.nodes[survivor].log_tail().contains("remove the flag"), "{}", c.nodes[survivor].log_tail());
    c.nodes[survivor].forget_flag("--force-new-cluster");
    c.nodes[survivor].forget_flag(&old_id);
    c.nodes[survivor].restart();

    // An old member back with its data belongs to the old cluster: refused.
    let seeds = c.nodes[survivor].admin_addr.clone();
    c.nodes[1].restart_joining(&seeds);
    wait_exit(&mut c.nodes[1]);
    assert!(c.nodes[1].log_tail().contains("cluster id mismatch"), "{}", c.nodes[1].log_tail());
    std::fs::remove_dir_all(&c.nodes[1].data_dir).expect("wipe");
    c.nodes[1].restart_joining(&seeds);
    c.wait_until("the wiped member to vote", |c| {
        let s = try_status(&c.nodes[survivor].admin_addr)?;
        if voter_ids(&s).len() == 2 {
            Ok(())
        } else {
            Err(format!("{s}"))
        }
    });
    assert_all_readable(&c.nodes[1].client_addr, 0..120, 4);
}
