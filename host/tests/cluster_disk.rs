//! Clusters running the diskstorage guest: writes spread over the file, a fourth node that
//! can only catch up by snapshot, and byte-identical data files everywhere afterwards.
//!
//! Needs the release binaries and guests from `scripts/build.sh`.

mod common;

use std::io::Read;

use common::*;

const SETTINGS: [&str; 8] =
    ["--fsm-config", "file-size=16M", "--fsm-config", "value-size=1024", "--snapshot-every", "50", "--keep-logs", "10"];
const SLOTS: usize = 16 * 1024;

fn data_file_digest(node: &Node) -> String {
    let path = node.data_dir.join("guest").join("current").join("diskstorage.dat");
    let mut f = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    // FNV-1a over the whole file: enough to tell files apart, no dependency needed.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut buf = vec![0u8; 1 << 16];
    let mut len = 0u64;
    loop {
        let n = f.read(&mut buf).expect("read data file");
        if n == 0 {
            break;
        }
        len += n as u64;
        for b in &buf[..n] {
            h = (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
        }
    }
    format!("{len}:{h:016x}")
}

fn spread(i: usize) -> usize {
    (i * 7919) % SLOTS
}

#[test]
fn t10_disk_cluster_new_node_catches_up_by_snapshot_byte_identical() {
    let mut c = Cluster::start(3, "diskstorage", &SETTINGS);
    let addrs = c.client_addrs();
    for i in 0..200 {
        set_acknowledged(&addrs, &spread(i).to_string(), &value(i));
    }
    let new = c.add_node();
    c.wait_voters(4);
    c.wait_converged();
    let (code, metrics) = http_get(&c.nodes[new].admin_addr, "/metrics").expect("GET /metrics");
    assert_eq!(code, 200);
    assert!(
        metrics.lines().any(|l| l.starts_with("wasm_raft_snapshots_installed_total ") && !l.ends_with(" 0")),
        "the new node caught up without a snapshot:\n{metrics}"
    );
    for i in 200..230 {
        set_acknowledged(&addrs, &spread(i).to_string(), &value(i));
    }
    c.wait_converged();
    let digests: Vec<String> = c.nodes.iter().map(data_file_digest).collect();
    assert!(digests.iter().all(|d| d == &digests[0]), "data files differ: {digests:?}");
    assert!(digests[0].starts_with(&format!("{}:", 16 << 20)), "file keeps its size: {}", digests[0]);
    for i in [0, 57, 199, 229] {
        let out = c.stale_get(new, &spread(i).to_string());
        assert_eq!(stdout_of(&out), value(i), "key {}: {}", spread(i), stderr_of(&out));
    }
}

#[test]
fn t20_disk_bad_keys_and_values_are_error_results() {
    let mut c = Cluster::start(1, "diskstorage", &SETTINGS);
    for (args, why) in [
        (vec!["set", "16384", "x"], "out of range"),
        (vec!["set", "abc", "x"], "integer"),
        (vec!["set", "1", &"y".repeat(1025)], "too large"),
    ] {
        let out = c.kv(&args);
        assert!(!out.status.success(), "{args:?} must fail");
        assert!(stderr_of(&out).contains(why), "{args:?}: {}", stderr_of(&out));
    }
    let out = c.kv(&["set", "16383", "last"]);
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert_eq!(stdout_of(&c.kv(&["get", "16383"])), "last");
    c.wait_converged();
}
