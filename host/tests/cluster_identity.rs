//! One cluster, one identity, with real `host` processes: a member that lost its data dir
//! and bootstraps again is a cluster of its own that its old cluster refuses; a process
//! given a live member's id cannot take its place; a voter cannot rejoin with an empty
//! log; a start that failed before it bootstrapped does not block the next; a member that
//! lost its log does not found another cluster; a data dir from before cluster ids keeps
//! working.
//!
//! Needs the release binaries and guests from `scripts/build.sh`.

mod common;

use std::path::Path;

use common::*;
use serde_json::Value;

/// Waits for a node that should refuse to run to exit, and forgets its process.
fn cluster_id(status: &Value) -> String {
    field_str(status, "cluster_id").to_string()
}

fn member_ids(status: &Value) -> Vec<u64> {
    members(status).iter().map(|m| field_u64(m, "id")).collect()
}

fn client_addrs_of(c: &Cluster, indexes: &[usize]) -> String {
    indexes.iter().map(|&i| c.nodes[i].client_addr.clone()).collect::<Vec<_>>().join(",")
}

fn remove(path: &Path) {
    std::fs::remove_dir_all(path).unwrap_or_else(|e| panic!("remove {}: {e}", path.display()));
}

/// The first member loses its data dir and is started again with the same flags and no
/// `--join`, as the first pod of a StatefulSet would be on a new volume. It founds a new
/// cluster (that is how clusters start); its old cluster must refuse it, keep every write
/// it acknowledged and stay identical, and refuse it again when it asks to join.
#[test]
fn t10_a_member_that_lost_its_data_dir_is_refused_by_its_old_cluster() {
    let mut c = Cluster::start(3, "kvstore", &[]);
    let id = cluster_id(&c.nodes[0].status());
    assert_eq!(id.len(), 32, "a 128-bit cluster id: {id}");
    for i in 1..3 {
        assert_eq!(cluster_id(&c.nodes[i].status()), id, "node {} learned the cluster id when it joined", i + 1);
    }
    set_many(&c.client_addrs(), 0..40, 4);

    c.nodes[0].kill9();
    remove(&c.nodes[0].data_dir);
    let originals = [1, 2];
    let addrs = client_addrs_of(&c, &originals);
    set_many(&addrs, 40..80, 4);

    c.nodes[0].restart();
    let impostor = c.wait_until("node 1 to lead a cluster of its own", |c| {
        let s = try_status(&c.nodes[0].admin_addr)?;
        if s["state"] == "Leader" {
            Ok(s)
        } else {
            Err(format!("node 1: {s}"))
        }
    });
    let new_id = cluster_id(&impostor);
    assert_ne!(new_id, id, "a new cluster, a new id");
    let out = kv(&c.nodes[0].client_addr, &["set", "impostor-only", "x"]);
    assert!(out.status.success(), "its own cluster serves it: {}", stderr_of(&out));

    // The old cluster's leader still sends to node 1's address, and is turned away there.
    c.wait_until("node 1 to refuse its old cluster's hello", |c| {
        let log = c.nodes[0].log();
        if log.contains("refused a peer connection") && log.contains(&format!("belongs to cluster {id}")) {
            Ok(())
        } else {
            Err("no refusal logged yet".into())
        }
    });
    c.wait_until("the old leader to log the refusal", |c| {
        let leader = originals.iter().copied().find(|&i| c.nodes[i].log().contains("cluster id mismatch"));
        leader.ok_or_else(|| "not logged yet".to_string())
    });
    set_many(&addrs, 80..120, 4);

    c.wait_converged_among(&originals);
    assert_all_readable(&addrs, 0..120, 4);
    let out = kv(&addrs, &["get", "impostor-only"]);
    assert!(!out.status.success(), "the other cluster's write is not here: {}", stdout_of(&out));
    for &i in &originals {
        let s = c.nodes[i].status();
        assert_eq!(cluster_id(&s), id);
        assert_eq!(voter_ids(&s), vec![1, 2, 3], "node 1 is still on record, as it was");
    }
    let s = c.nodes[0].status();
    assert_eq!((member_ids(&s), s["leader_id"].as_u64()), (vec![1], Some(1)), "never absorbed: {s}");
    assert_eq!(cluster_id(&s), new_id);

    // Asked to join the old cluster, the new one's member is refused, by cluster id.
    assert!(c.nodes[0].terminate().success(), "{}", c.nodes[0].log_tail());
    let join = c.nodes[1].admin_addr.clone();
    c.nodes[0].restart_joining(&join);
    let status = c.nodes[0].wait_exit();
    assert_eq!(status.code(), Some(2), "{}", c.nodes[0].log_tail());
    let tail = c.nodes[0].log_tail();
    assert!(
        tail.contains("cluster id mismatch") && tail.contains(&id) && tail.contains(&new_id),
        "the refusal names both clusters:\n{tail}"
    );
    c.wait_converged_among(&originals);
}

/// A fresh process started with a live member's id, on other ports, asks to join: it is
/// refused, and the member keeps its place, its addresses and its replication.
#[test]
fn t20_a_process_with_a_live_members_id_cannot_take_its_place() {
    let mut c = Cluster::start(3, "kvstore", &[]);
    set_many(&c.client_addrs(), 0..20, 4);
    let leader = c.leader();
    let record = |s: &Value| members(s).iter().find(|m| m["id"] == 3).cloned().expect("node 3 on record");
    let before = record(&c.nodes[leader].status());
    let uid = field_str(&c.nodes[2].status(), "member_uid").to_string();
    assert_eq!(before["uid"], uid.as_str(), "the leader has node 3's uid on record");

    let dir = tempfile::tempdir().expect("tempdir");
    let join = c.running().map(|i| c.nodes[i].admin_addr.clone()).collect::<Vec<_>>().join(",");
    let mut hijacker = Node::start(3, dir.path(), &guest("kvstore"), &[], Some(&join));
    assert_ne!(hijacker.raft_addr, c.nodes[2].raft_addr);
    let status = hijacker.wait_exit();
    assert_eq!(status.code(), Some(2), "{}", hijacker.log_tail());
    let tail = hijacker.log_tail();
    assert!(
        tail.contains(&format!("already a member with member uid {uid}"))
            && tail.contains("this process has member uid"),
        "the refusal names both uids:\n{tail}"
    );
    assert!(!dir.path().join("node-3").join("node.json").exists(), "a refused joiner is bound to nothing");

    set_many(&c.client_addrs(), 20..60, 4);
    let leader = c.leader();
    assert_eq!(record(&c.nodes[leader].status()), before, "node 3 keeps its addresses");
    c.wait_converged();
    c.assert_every_node_has(&[0, 30, 59]);
}

/// A voter that lost its data dir and comes back with `--join` has an empty log: it must
/// not be taken back as a voter (it would count towards commits without the entries).
#[test]
fn t30_a_voter_cannot_rejoin_with_an_empty_log() {
    let mut c = Cluster::start(3, "kvstore", &[]);
    set_many(&c.client_addrs(), 0..20, 4);
    c.nodes[2].kill9();
    remove(&c.nodes[2].data_dir);
    let join = c.nodes[0].admin_addr.clone();
    c.nodes[2].restart_joining(&join);
    let status = c.nodes[2].wait_exit();
    assert_eq!(status.code(), Some(2), "{}", c.nodes[2].log_tail());
    let tail = c.nodes[2].log_tail();
    assert!(tail.contains("is a voter and this process has an empty log") && tail.contains("removed"), "{tail}");

    let survivors = [0, 1];
    let addrs = client_addrs_of(&c, &survivors);
    set_many(&addrs, 20..40, 4);
    c.wait_converged_among(&survivors);
    assert_all_readable(&addrs, 0..40, 4);
}

/// A first start that fails (here: its admin port is taken) leaves the data dir fresh, so
/// the next start bootstraps.
#[test]
fn t40_a_failed_first_start_does_not_block_bootstrap() {
    let dir = tempfile::tempdir().expect("tempdir");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let taken_addr = taken.local_addr().expect("addr").to_string();
    let ports = free_ports(3);
    let data_dir = dir.path().join("node-1");
    let mut cmd = clean_command(&host_exe());
    cmd.arg("--fsm").arg(guest("kvstore")).arg("--data-dir").arg(&data_dir);
    for (flag, port) in ["--client-addr", "--raft-addr", "--text-addr"].iter().zip(&ports) {
        cmd.arg(flag).arg(format!("127.0.0.1:{port}"));
    }
    cmd.arg("--admin-addr").arg(&taken_addr);
    let out = run_with_timeout(cmd, TIMEOUT).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(out.status.code(), Some(2), "{}", stderr_of(&out));
    assert!(stderr_of(&out).contains("admin"), "{}", stderr_of(&out));
    assert!(!data_dir.join("node.json").exists(), "nothing binds the dir before it bootstraps or joins");
    drop(taken);

    let node = Node::start(1, dir.path(), &guest("kvstore"), &[], None);
    let s = poll_until(TIMEOUT, || {
        let s = try_status(&node.admin_addr)?;
        if s["state"] == "Leader" {
            Ok(s)
        } else {
            Err(format!("{s}"))
        }
    })
    .unwrap_or_else(|e| panic!("node 1 did not bootstrap: {e}\n{}", node.log_tail()));
    assert_eq!(cluster_id(&s).len(), 32);
    let file: Value =
        serde_json::from_slice(&std::fs::read(data_dir.join("node.json")).expect("node.json")).expect("json");
    assert_eq!(file["cluster_id"], s["cluster_id"]);
    assert_eq!(file["member_uid"], s["member_uid"]);
}

/// A member whose log was lost but whose `node.json` survived is still bound to its
/// cluster: it must not found another one under the same cluster id, and as a voter it
/// cannot rejoin empty either.
#[test]
fn t50_a_member_that_lost_its_log_does_not_bootstrap() {
    let mut c = Cluster::start(3, "kvstore", &[]);
    set_many(&c.client_addrs(), 0..10, 2);
    assert!(c.nodes[2].terminate().success(), "{}", c.nodes[2].log_tail());
    remove(&c.nodes[2].data_dir.join("log"));
    remove(&c.nodes[2].data_dir.join("snapshots"));
    c.nodes[2].restart();
    let status = c.nodes[2].wait_exit();
    assert_eq!(status.code(), Some(2), "{}", c.nodes[2].log_tail());
    assert!(c.nodes[2].log_tail().contains("holds no log"), "{}", c.nodes[2].log_tail());

    let join = c.nodes[0].admin_addr.clone();
    c.nodes[2].restart_joining(&join);
    let status = c.nodes[2].wait_exit();
    assert_eq!(status.code(), Some(2), "{}", c.nodes[2].log_tail());
    assert!(
        c.nodes[2].log_tail().contains("is a voter and this process has an empty log"),
        "{}",
        c.nodes[2].log_tail()
    );
    c.wait_converged_among(&[0, 1]);
}

/// `node.json` as written before cluster ids and member uids: the member keeps its data,
/// takes the legacy cluster id and a member uid, and records both.
#[test]
fn t60_a_data_dir_from_before_cluster_ids_keeps_working() {
    let mut c = Cluster::start(1, "kvstore", &[]);
    set_many(&c.client_addrs(), 0..10, 2);
    assert!(c.nodes[0].terminate().success(), "{}", c.nodes[0].log_tail());
    let path = c.nodes[0].data_dir.join("node.json");
    let mut file: Value = serde_json::from_slice(&std::fs::read(&path).expect("node.json")).expect("json");
    let map = file.as_object_mut().expect("an object");
    map.remove("cluster_id");
    map.remove("member_uid");
    std::fs::write(&path, serde_json::to_vec(&file).expect("json")).expect("write node.json");

    c.nodes[0].restart();
    c.wait_voters(1);
    let s = c.nodes[0].status();
    assert_eq!(cluster_id(&s), "0".repeat(32), "{s}");
    let file: Value = serde_json::from_slice(&std::fs::read(&path).expect("node.json")).expect("json");
    assert_eq!(file["cluster_id"], s["cluster_id"]);
    assert_eq!(file["member_uid"], s["member_uid"]);
    assert_all_readable(&c.client_addrs(), 0..10, 2);
}
