//! Clusters of real `host` processes running the kvstore guest: forming by join,
//! replication, leader loss, full restarts and catching up through a snapshot.
//!
//! Needs the release binaries and guests from `scripts/build.sh`.

mod common;

use std::process::Command;

use common::*;

/// Sampled keys for node-by-node checks: reading every key on every node would cost a
/// `kv` process each.
fn sample(range: std::ops::Range<usize>, count: usize) -> Vec<usize> {
    let step = (range.len() / count).max(1);
    let mut keys: Vec<usize> = range.clone().step_by(step).collect();
    if let Some(last) = range.clone().last() {
        keys.push(last);
    }
    keys.dedup();
    keys
}

fn sha256_of(path: &std::path::Path) -> Option<String> {
    let out = Command::new("sha256sum").arg(path).output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace().next().map(str::to_string)
}

#[test]
fn t10_three_nodes_form_by_join() {
    let mut c = Cluster::start(3, "kvstore", &[]);
    // One consistent view: exactly one leader, which everyone else follows.
    let (leader, statuses) = c.wait_until("one leader and two followers", |c| {
        let leader = c.find_leader()?;
        let statuses = c.statuses()?;
        let followers = statuses.iter().filter(|(_, s)| s["state"] == "Follower").count();
        if followers == 2 {
            Ok((leader, statuses))
        } else {
            Err(format!("{followers} followers"))
        }
    });
    let leader_id = c.nodes[leader].id;

    let fsm_sha = field_str(&statuses[0].1, "fsm_sha256").to_string();
    if let Some(expected) = sha256_of(&guest("kvstore")) {
        assert_eq!(fsm_sha.to_ascii_lowercase(), expected, "fsm_sha256 is the sha256 of the module");
    }
    for (i, status) in &statuses {
        let node = &c.nodes[*i];
        assert_eq!(field_u64(status, "id"), node.id);
        let expected_state = if *i == leader { "Leader" } else { "Follower" };
        assert_eq!(field_str(status, "state"), expected_state, "node {}", node.id);
        assert_eq!(status["leader_id"].as_u64(), Some(leader_id), "node {}", node.id);
        assert_eq!(field_str(status, "fsm_sha256"), fsm_sha);
        assert_eq!(voter_ids(status), vec![1, 2, 3], "node {}: {status}", node.id);
        let digest = field_str(status, "state_digest");
        assert!(
            !digest.is_empty() && digest.chars().all(|ch| ch.is_ascii_hexdigit()),
            "state_digest is hex: {digest:?}"
        );
        for member in members(status) {
            let id = field_u64(member, "id");
            let m = &c.nodes[id as usize - 1];
            assert_eq!(member["raft_addr"], m.raft_addr.as_str(), "{member}");
            assert_eq!(member["admin_addr"], m.admin_addr.as_str(), "{member}");
            assert_eq!(member["client_addr"], m.client_addr.as_str(), "{member}");
        }
    }

    // The cluster serves a write from any member's client port.
    for i in 0..3 {
        let addr = c.nodes[i].client_addr.clone();
        let out = kv(&addr, &["set", &key(i), &value(i)]);
        assert!(out.status.success(), "set via node {}: {}", i + 1, stderr_of(&out));
        assert_eq!(stdout_of(&out), "OK");
    }
    assert_all_readable(&c.client_addrs(), 0..3, 1);
    c.wait_converged();
}

#[test]
fn t20_thousand_writes_reach_every_node() {
    const WRITES: usize = 1000;
    let mut c = Cluster::start(3, "kvstore", &[]);
    set_many(&c.client_addrs(), 0..WRITES, 8);

    // Every acknowledged write through the cluster, a sample on each node's own state.
    assert_all_readable(&c.client_addrs(), 0..WRITES, 8);
    c.assert_every_node_has(&sample(0..WRITES, 25));
    c.wait_converged();

    // Deleting is replicated as well.
    let out = c.kv(&["delete", &key(0)]);
    assert!(out.status.success(), "delete: {}", stderr_of(&out));
    let out = c.kv(&["get", &key(0)]);
    assert!(!out.status.success(), "deleted key still readable");
    c.wait_converged();
}

/// A member's request counters from /metrics, in the order of `COUNTERS`.
const COUNTERS: [&str; 5] = ["proposals", "proposal_errors", "queries", "redirects", "lease_reads"];

fn counters(node: &Node) -> [u64; 5] {
    let (_, body) = http_get(&node.admin_addr, "/metrics").expect("GET /metrics");
    COUNTERS.map(|name| {
        let prefix = format!("wasm_raft_{name}_total ");
        body.lines()
            .find_map(|l| l.strip_prefix(prefix.as_str()))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {name}_total in /metrics:\n{body}"))
    })
}

/// Requests are counted where they arrive, whichever way their answer takes (the leader
/// answers proposals and lease reads straight from the batch and the guest thread).
#[test]
fn t25_requests_are_counted_where_they_arrive() {
    const EACH: u64 = 6;
    let mut c = Cluster::start(3, "kvstore", &[]);
    let leader = c.wait_until("a leader", |c| c.find_leader());
    let before: Vec<[u64; 5]> = c.nodes.iter().map(counters).collect();
    // Through each member on its own: a follower redirects, then the client asks the leader.
    for (n, node) in c.nodes.iter().enumerate() {
        for i in 0..EACH {
            let k = format!("counted-{n}-{i}");
            let out = kv(&node.client_addr, &["set", &k, "v"]);
            assert!(out.status.success(), "set via node {}: {}", n + 1, stderr_of(&out));
            let out = kv(&node.client_addr, &["get", &k]);
            assert_eq!(stdout_of(&out).trim(), "v", "get via node {}: {}", n + 1, stderr_of(&out));
        }
    }
    for (n, node) in c.nodes.iter().enumerate() {
        let after = counters(node);
        let delta: Vec<u64> = after.iter().zip(before[n]).map(|(a, b)| a - b).collect();
        let (requests, redirects) = if n == leader { (3 * EACH, 0) } else { (EACH, 2 * EACH) };
        let want = [requests, 0, requests, redirects, delta[4]];
        assert_eq!(delta, want, "node {} ({COUNTERS:?})", n + 1);
        assert!(delta[4] <= requests, "node {}: more lease reads than reads", n + 1);
        if n != leader {
            assert_eq!(delta[4], 0, "a follower answered a read under a lease");
        }
    }
}

#[test]
fn t30_leader_killed_new_leader_keeps_acknowledged_writes() {
    let mut c = Cluster::start(3, "kvstore", &[]);
    set_many(&c.client_addrs(), 0..60, 3);

    let old = c.leader();
    let old_term = field_u64(&c.nodes[old].status(), "term");
    c.nodes[old].kill9();

    let new = c.wait_until("a new leader among the survivors", |c| {
        let leader = c.find_leader()?;
        let term = field_u64(&try_status(&c.nodes[leader].admin_addr)?, "term");
        if term > old_term {
            Ok(leader)
        } else {
            Err(format!("node {} leads in term {term}", leader + 1))
        }
    });
    assert_ne!(new, old);

    assert_all_readable(&c.client_addrs(), 0..60, 3);
    set_many(&c.client_addrs(), 60..90, 3);

    c.nodes[old].restart();
    c.wait_voters(3);
    c.wait_converged();
    c.assert_every_node_has(&sample(0..90, 10));
}

#[test]
fn t40_full_restart_keeps_acknowledged_writes() {
    const WRITES: usize = 100;
    let mut c = Cluster::start(3, "kvstore", &[]);
    set_many(&c.client_addrs(), 0..WRITES, 4);
    let before = c.wait_converged();

    for node in &mut c.nodes {
        let status = node.terminate();
        assert!(
            status.success(),
            "node {} should shut down cleanly on SIGTERM, exited with {status}\n{}",
            node.id,
            node.log_tail()
        );
    }
    for node in &mut c.nodes {
        node.restart();
    }
    c.wait_voters(3);

    assert_all_readable(&c.client_addrs(), 0..WRITES, 4);
    let after = c.wait_converged();
    assert!(
        field_u64(&after, "last_applied") >= field_u64(&before, "last_applied"),
        "restart lost applied entries: before {before}, after {after}"
    );
}

#[test]
fn t50_new_node_catches_up_through_snapshot() {
    const WRITES: usize = 300;
    // Logs are purged to 10 entries past each snapshot, so a node joining after 300
    // writes cannot be sent the log from the start: only a snapshot gets it there.
    let mut c = Cluster::start(3, "kvstore", &["--snapshot-every", "50", "--keep-logs", "10"]);
    set_many(&c.client_addrs(), 0..WRITES, 4);

    let new = c.add_node();
    c.wait_voters(4);
    c.wait_converged();
    let (code, metrics) = http_get(&c.nodes[new].admin_addr, "/metrics").expect("GET /metrics");
    assert_eq!(code, 200);
    let installed: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("wasm_raft_snapshots_installed_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no snapshot counter in /metrics:\n{metrics}"));
    assert!(installed >= 1, "the new node caught up without a snapshot:\n{metrics}");
    c.assert_every_node_has(&sample(0..WRITES, 10));

    // And it follows the log after the snapshot.
    set_many(&c.client_addrs(), WRITES..WRITES + 20, 2);
    c.wait_converged();
    c.wait_caught_up(new);
    let out = c.stale_get(new, &key(WRITES + 19));
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert_eq!(stdout_of(&out), value(WRITES + 19));
}

/// A follower that missed more large commands than one peer frame can carry catches up
/// from the log. openraft sends up to 64 entries per AppendEntries; 36 entries of one
/// command of almost 8 MiB (the cap) are 288 MiB, over the 256 MiB peer frame limit, and
/// 24 MiB already take longer than the 100 ms openraft allows one AppendEntries here, so
/// the leader has to send them one at a time. The log is never compacted meanwhile, so no
/// snapshot can stand in for it. What it moves: 288 MiB from the client to the leader and
/// from the leader to each follower (about 860 MiB over loopback, plus retries), as much
/// written to the three logs; the guest keeps 4 keys (32 MiB).
#[test]
fn t60_follower_behind_on_large_commands_catches_up() {
    use host::client::Client;
    use host::types::MAX_COMMAND_BYTES;
    use kvcommand::proto::{encode, Op};

    const COMMANDS: usize = 36;
    const KEYS: usize = 4;
    // Room for the key and the protobuf around the value.
    const VALUE: usize = MAX_COMMAND_BYTES - 64;
    let max_value = format!("max-value-size={VALUE}");
    let mut c = Cluster::start(3, "kvstore", &["--snapshot-every", "100000", "--fsm-config", &max_value]);
    let leader = c.leader();
    let away = (0..3).find(|&i| i != leader).expect("a follower");
    c.nodes[away].kill9();

    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let addrs: Vec<String> = c.client_addrs().split(',').map(str::to_string).collect();
    let client = Client::new(addrs);
    rt.block_on(async {
        for i in 0..COMMANDS {
            let command = encode(Op::Set, &format!("big-{}", i % KEYS), &noise(VALUE, i as u64));
            client.propose(command).await.unwrap_or_else(|e| panic!("large set {i}: {e}"));
        }
    });

    c.nodes[away].restart();
    c.wait_converged();
    // Its own state, read locally: the last value written to each key.
    let local = Client::new(vec![c.nodes[away].client_addr.clone()]);
    rt.block_on(async {
        for i in COMMANDS - KEYS..COMMANDS {
            let value = local
                .query(encode(Op::Get, &format!("big-{}", i % KEYS), b""), true)
                .await
                .unwrap_or_else(|e| panic!("stale get on the member that was away: {e}"));
            assert!(value == noise(VALUE, i as u64), "big-{} differs on the member that was away", i % KEYS);
        }
    });
}

/// A command over the cap never reaches the log: the member refuses it as a definite
/// failure and keeps serving the connection, and the client library does not even send it.
#[test]
fn t65_a_command_over_the_cap_never_reaches_the_log() {
    use std::io::{Read, Write};

    use host::client::{Client, ClientError};
    use host::proto::{ClientRequest, ClientResponse, Code, RequestKind};
    use host::types::MAX_COMMAND_BYTES;
    use prost::Message;

    let mut c = Cluster::start(1, "kvstore", &[]);
    let addr = c.nodes[0].client_addr.clone();
    let last_index = |c: &Cluster| field_u64(&c.nodes[0].status(), "last_log_index");
    let before = last_index(&c);

    let mut conn = std::net::TcpStream::connect(&addr).expect("connect");
    conn.set_read_timeout(Some(KV_TIMEOUT)).expect("read timeout");
    let mut roundtrip = |id: u64, payload: Vec<u8>| {
        let req = ClientRequest { id, kind: RequestKind::Propose as i32, payload, stale_ok: false };
        let mut out = Vec::new();
        host::codec::encode_frame(&req, &mut out);
        conn.write_all(&out).expect("send");
        let mut len = [0u8; 4];
        conn.read_exact(&mut len).expect("response length");
        let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
        conn.read_exact(&mut body).expect("response");
        ClientResponse::decode(body.as_slice()).expect("a response")
    };
    let resp = roundtrip(7, vec![b'x'; MAX_COMMAND_BYTES + 1]);
    assert_eq!((resp.id, resp.code), (7, Code::Rejected as i32), "{resp:?}");
    assert!(resp.error.contains("exceeds the limit"), "{}", resp.error);
    let resp = roundtrip(8, kvcommand::proto::encode(kvcommand::proto::Op::Set, "k", b"v"));
    assert_eq!((resp.id, resp.code), (8, Code::Ok as i32), "the connection still serves: {resp:?}");
    assert_eq!(last_index(&c), before + 1, "only the small command reached the log");

    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let client = Client::new(vec![addr]);
    let err = rt.block_on(client.propose(vec![b'x'; MAX_COMMAND_BYTES + 1])).expect_err("over the cap");
    assert!(matches!(err, ClientError::BadRequest(_)), "{err}");
    assert_eq!(last_index(&c), before + 1);
    c.wait_converged();
}
