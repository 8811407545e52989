//! Membership operations with real `host` processes: removing a member under load (it is
//! told and stops, and stays stopped; the leader too, once it has handed over), replacing
//! a dead one (also under load), demoting and promoting, handing leadership over on
//! request and on SIGTERM, a joiner that stopped as a learner finishing its join, and a
//! change left in joint consensus by a leader's crash finished by the next leader; with
//! the clients' history checked where they run.
//!
//! Needs the release binaries and guests from `scripts/build.sh`.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::history::History;
use common::workload::{collect, final_values, start_clients};
use common::*;
use host::store::log::failpoint::VAR as FAILPOINT;
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

    let status = c.nodes[victim].wait_exit();
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
    let status = c.nodes[victim].wait_exit();
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
    c.nodes[dead].wait_exit();
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
    let status = c.nodes[survivor].wait_exit();
    assert_eq!(status.code(), Some(2));
    assert!(c.nodes[survivor].log_tail().contains("remove the flag"), "{}", c.nodes[survivor].log_tail());
    c.nodes[survivor].forget_flag("--force-new-cluster");
    c.nodes[survivor].forget_flag(&old_id);
    c.nodes[survivor].restart();

    // An old member back with its data belongs to the old cluster: refused.
    let seeds = c.nodes[survivor].admin_addr.clone();
    c.nodes[1].restart_joining(&seeds);
    c.nodes[1].wait_exit();
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

/// Entries the clients get applied between two steps of a test under load.
const LOAD_STEP: u64 = 100;

/// Waits until the leader has applied `entries` more entries than when called: the
/// clients are getting through (each of their writes is an entry or part of one).
fn wait_progress(c: &mut Cluster, entries: u64) {
    let leader = c.leader();
    let from = field_u64(&c.nodes[leader].status(), "last_applied");
    c.wait_until(&format!("{entries} more entries applied"), |c| {
        let applied = field_u64(&try_status(&c.nodes[c.find_leader()?].admin_addr)?, "last_applied");
        if applied >= from + entries {
            Ok(())
        } else {
            Err(format!("applied {applied}, from {from}"))
        }
    });
}

/// The clients' history against the final values read from `finals_from`: no violation,
/// and enough acknowledged writes to mean something.
fn assert_history_holds(c: &Cluster, rt: &tokio::runtime::Runtime, history: &History, finals_from: &[String]) {
    let finals = rt.block_on(final_values(finals_from));
    let violations = history.violations(&finals);
    assert!(
        violations.is_empty(),
        "{} violations: {:?}\n{}",
        violations.len(),
        &violations[..violations.len().min(10)],
        c.logs()
    );
    assert!(history.acknowledged_writes() > 50, "clients hardly got through: {}", history.acknowledged_writes());
    eprintln!("history: {} acknowledged writes, {} reads", history.acknowledged_writes(), history.reads());
}

/// A leader dies between openraft's two membership steps: the joint configuration is
/// committed, the final one was never appended, and openraft itself never finishes such
/// a change. A test failpoint (`HOST_TEST_FAILPOINT`) aborts the leader at the moment it
/// would append the final voter set. The next leader finishes the change towards the
/// newer set (the promoted learner votes), writes commit, and every member agrees.
#[test]
fn t70_a_change_left_in_joint_consensus_is_finished_by_the_next_leader() {
    let mut c = Cluster::start(3, "kvstore", &[]);
    set_many(&c.client_addrs(), 0..50, 4);
    let learner = c.add_node_with(&["--learner"]);
    c.wait_caught_up(learner);
    let learner_id = c.nodes[learner].id;

    // Node 1 restarted with the failpoint armed (SIGTERM hands its leadership over), then
    // made leader again. A restarted member holds back from elections for a while, so a
    // handover to it can fail at first: it is asked again.
    let armed = 0;
    c.nodes[armed].set_env(FAILPOINT, "crash-before-final-membership");
    c.nodes[armed].terminate();
    c.nodes[armed].restart();
    c.wait_caught_up(armed);
    c.wait_until("the armed node 1 to lead", |c| {
        let s = try_status(&c.nodes[armed].admin_addr)?;
        if s["state"] == "Leader" {
            return Ok(());
        }
        let out = kv_admin(&admins(c, &[0, 1, 2]), None, &["transfer-leader", "1"]);
        Err(format!("node 1 is {}; transfer: {} {}", s["state"], stdout_of(&out), stderr_of(&out)))
    });

    // Through node 1 alone: it dies while the operator waits for the second step.
    let out = kv_admin(&admins(&c, &[armed]), None, &["promote", &learner_id.to_string()]);
    assert!(!out.status.success(), "the leader died mid-change: {}", stdout_of(&out));
    let status = c.nodes[armed].wait_exit();
    assert!(!status.success(), "{status}");
    let died = std::fs::read_to_string(&c.nodes[armed].log_path).expect("node 1's log");
    assert!(died.contains(FAILPOINT), "node 1 died of something else:\n{}", c.nodes[armed].log_tail());
    let crashed = Instant::now();

    // The joint entry was committed, so a majority of the survivors hold it: voters
    // {1, 2, 3} and {1, 2, 3, 4}; node 1 is down, so a leader needs 2, 3 and 4.
    let survivors: Vec<usize> = c.running().collect();
    c.wait_until("a majority of the survivors to be in joint consensus", |c| {
        let joint = survivors
            .iter()
            .map(|&i| try_status(&c.nodes[i].admin_addr))
            .collect::<Result<Vec<_>, _>>()?
            .iter()
            .filter(|s| s["joint"] == true)
            .count();
        if joint >= 2 {
            Ok(())
        } else {
            Err(format!("{joint} of the survivors in joint consensus"))
        }
    });

    let leader = c.wait_until("the next leader to finish the change", |c| {
        let leader = c.find_leader()?;
        let s = try_status(&c.nodes[leader].admin_addr)?;
        if s["joint"] == false && voter_ids(&s) == vec![1, 2, 3, 4] {
            Ok(leader)
        } else {
            Err(format!("leader {}: joint {}, voters {:?}", leader + 1, s["joint"], voter_ids(&s)))
        }
    });
    eprintln!("joint consensus finished {:?} after the leader died", crashed.elapsed());
    let log = std::fs::read_to_string(&c.nodes[leader].log_path).expect("the leader's log");
    assert!(
        log.contains("finishing a membership change left in joint consensus"),
        "the finish came from elsewhere:\n{}",
        c.nodes[leader].log_tail()
    );

    set_many(&c.client_addrs(), 50..100, 4);
    c.wait_converged();

    // Back without the failpoint, node 1 is a voter of the final configuration.
    c.nodes[armed].forget_env(FAILPOINT);
    c.nodes[armed].restart();
    c.wait_voters(4);
    let agreed = c.wait_converged();
    assert_eq!(agreed["joint"], false);
    assert_all_readable(&c.client_addrs(), 0..100, 4);
}

/// Clients run throughout while a follower dies with its disk, is removed with
/// `kv --admin remove`, and a fresh process with the same id (the operator's usual
/// replacement: new data dir, hence a new member uid) joins and becomes a voter. No
/// acknowledged write is lost, no read goes back in time, and every member converges.
#[test]
fn t80_a_dead_member_is_replaced_under_load() {
    let mut c = Cluster::start(3, "kvstore", &[]);
    let leader = c.leader();
    let dead = (0..3).find(|&i| i != leader).expect("a follower");
    let dead_id = c.nodes[dead].id;
    let old_uid = field_str(&c.nodes[dead].status(), "member_uid").to_string();
    let addrs: Vec<String> = c.nodes.iter().map(|n| n.client_addr.clone()).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let clients = start_clients(&rt, &addrs, &stop);
    wait_progress(&mut c, LOAD_STEP);

    c.nodes[dead].kill9();
    std::fs::remove_dir_all(&c.nodes[dead].data_dir).expect("wipe its data dir");
    wait_progress(&mut c, LOAD_STEP);
    let alive: Vec<usize> = c.running().collect();
    let out = kv_admin(&admins(&c, &alive), None, &["remove", &dead_id.to_string()]);
    assert!(out.status.success(), "remove: {}\n{}", stderr_of(&out), c.logs());
    let listed: Value = serde_json::from_slice(&kv_admin(&admins(&c, &alive), None, &["members"]).stdout)
        .expect("kv members prints JSON");
    assert!(!listed["voter_sets"][0].as_array().expect("a voter set").contains(&dead_id.into()), "{listed}");
    wait_progress(&mut c, LOAD_STEP);

    let seeds = admins(&c, &alive);
    c.nodes[dead].restart_joining(&seeds);
    c.wait_voters(3);
    let new_uid = field_str(&c.nodes[dead].status(), "member_uid").to_string();
    assert_ne!(new_uid, old_uid, "a fresh data dir makes a new member");
    let leader = c.leader();
    let recorded = members(&c.nodes[leader].status()).iter().find(|m| field_u64(m, "id") == dead_id).cloned();
    assert_eq!(recorded.as_ref().map(|m| field_str(m, "uid")), Some(new_uid.as_str()), "{recorded:?}");
    wait_progress(&mut c, LOAD_STEP);

    stop.store(true, Ordering::Relaxed);
    let history = rt.block_on(collect(clients));
    assert_history_holds(&c, &rt, &history, &addrs);
    let leader = c.leader();
    assert_eq!(voter_ids(&c.nodes[leader].status()), vec![1, 2, 3]);
    c.wait_converged();
}

/// The leader is removed while clients run: it refuses to remove itself, hands its
/// leadership over on request, is removed through the new leader, is told and stops;
/// the two left serve on and the history holds.
#[test]
fn t90_the_leader_is_removed_under_load_after_handing_over() {
    let mut c = Cluster::start(3, "kvstore", &[]);
    let addrs: Vec<String> = c.nodes.iter().map(|n| n.client_addr.clone()).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let clients = start_clients(&rt, &addrs, &stop);
    wait_progress(&mut c, LOAD_STEP);

    let old = c.leader();
    let old_id = c.nodes[old].id.to_string();
    let all = admins(&c, &[0, 1, 2]);
    let out = kv_admin(&all, None, &["remove", &old_id]);
    assert!(!out.status.success() && stderr_of(&out).contains("hand leadership over first"), "{}", stderr_of(&out));

    let out = kv_admin(&all, None, &["transfer-leader"]);
    assert!(out.status.success(), "transfer: {}\n{}", stderr_of(&out), c.logs());
    let new = c.leader();
    assert_ne!(new, old, "{}", stdout_of(&out));
    let out = kv_admin(&all, None, &["remove", &old_id]);
    assert!(out.status.success(), "remove: {}\n{}", stderr_of(&out), c.logs());
    let status = c.nodes[old].wait_exit();
    assert_eq!(status.code(), Some(0), "a removed member stops as asked\n{}", c.nodes[old].log_tail());
    wait_progress(&mut c, LOAD_STEP);

    stop.store(true, Ordering::Relaxed);
    let history = rt.block_on(collect(clients));
    let rest: Vec<String> = (0..3).filter(|&i| i != old).map(|i| c.nodes[i].client_addr.clone()).collect();
    assert_history_holds(&c, &rt, &history, &rest);
    let rest_ids: Vec<u64> = (0..3).filter(|&i| i != old).map(|i| c.nodes[i].id).collect();
    let listed: Value = serde_json::from_slice(&kv_admin(&admins(&c, &[new]), None, &["members"]).stdout)
        .expect("kv members prints JSON");
    assert_eq!(listed["voter_sets"], serde_json::json!([rest_ids]));
    assert_eq!(listed["joint"], false);
    c.wait_converged();
}
