//! `recovery` against real processes: `host` members, a `logger`, `loadgen` writers, and a
//! proxy in the test that stands between recovery and a member, so that the member can be
//! killed while its answer is under way. Tests wait on `/status`, never on fixed sleeps.

#[path = "../../host/tests/common/mod.rs"]
mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use common::*;
use serde_json::Value;

fn recovery_exe() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_recovery"))
}

fn logger_exe() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_logger"))
}

/// A `logger` following one cluster; killed on drop.
struct Logger {
    admin: String,
    child: Child,
    log_path: PathBuf,
}

impl Logger {
    fn start(dir: &Path, id: &str, join: &str) -> Logger {
        let ports = free_ports(2);
        let admin = format!("127.0.0.1:{}", ports[0]);
        std::fs::create_dir_all(dir).expect("logger dir");
        let log_path = dir.join("logger.out");
        let log = std::fs::File::create(&log_path).expect("logger log");
        let err = log.try_clone().expect("clone");
        let child = clean_command(&logger_exe())
            .args(["--id", id, "--raft-addr", &format!("127.0.0.1:{}", ports[1]), "--join", join])
            .args(["--dir", &dir.display().to_string(), "--admin-addr", &admin])
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
            .expect("start logger");
        let l = Logger { admin, child, log_path };
        poll_until(TIMEOUT, || try_status(&l.admin).map(|_| ()))
            .unwrap_or_else(|e| panic!("logger did not start: {e}\n{}", file_tail(&l.log_path, 30)));
        l
    }

    fn archived(&self) -> u64 {
        try_status(&self.admin).map(|s| s["clusters"][0]["archived_index"].as_u64().unwrap_or(0)).unwrap_or(0)
    }
}

impl Drop for Logger {
    fn drop(&mut self) {
        self.child.kill().ok();
        self.child.wait().ok();
    }
}

fn recovery(args: &[&str]) -> Output {
    let mut cmd = clean_command(&recovery_exe());
    if !args.contains(&"--fsm") {
        cmd.args(["--fsm", &guest("kvstore").display().to_string()]);
    }
    cmd.args(args);
    run_with_timeout(cmd, TIMEOUT).expect("run recovery")
}

/// Runs recovery with `--json`; its report, or a panic with its stderr.
fn recover_json(args: &[&str]) -> Value {
    let mut all = args.to_vec();
    all.push("--json");
    let out = recovery(&all);
    assert!(out.status.success(), "recovery {args:?} failed: {}", stderr_of(&out));
    serde_json::from_str(stdout_of(&out).trim()).unwrap_or_else(|e| panic!("{e}: {}", stdout_of(&out)))
}

/// `n` writes (128-byte values) from 8 loadgen clients; returns once all are answered.
fn load(c: &Cluster, n: u64) {
    let addrs: Vec<String> = c.running().map(|i| c.nodes[i].client_addr.clone()).collect();
    let mut cmd = clean_command(&loadgen_exe());
    cmd.args(["--cluster", &addrs.join(","), "--clients", "8", "--requests", &(n / 8).to_string()]).args([
        "--keys",
        "5000",
        "--value-size",
        "128",
        "--get-ratio",
        "0",
    ]);
    let out = run_with_timeout(cmd, Duration::from_secs(120)).expect("loadgen");
    assert!(out.status.success(), "loadgen: {}", stderr_of(&out));
    let summary: Value = serde_json::from_str(stdout_of(&out).trim()).expect("loadgen summary");
    assert_eq!(summary["errors"].as_u64(), Some(0), "{summary}");
}

/// Waits until every member has applied the leader's commit index as it stood when the
/// wait began, and returns (last_applied, state_digest) of member `i` then. Checkpoint
/// entries keep coming, but they carry no commands: the digest stays.
fn settled(c: &mut Cluster, i: usize) -> (u64, String) {
    c.wait_converged();
    let s = try_status(&c.nodes[i].admin_addr).expect("status");
    (field_u64(&s, "last_applied"), field_str(&s, "state_digest").to_string())
}

#[test]
fn t01_recovery_from_a_logger_and_from_a_replica_rebuilds_the_clusters_state() {
    // Snapshots every 500 entries (10,000 writes make about 1,300 batched entries): the
    // replica serves its snapshot plus its log.
    let mut c = Cluster::start(3, "kvstore", &["--snapshot-every", "500", "--keep-logs", "100"]);
    let dir = tempfile::tempdir().expect("tempdir");
    let leader = c.leader();
    let logger = Logger::start(&dir.path().join("logger"), "log1", &c.nodes[leader].admin_addr);
    load(&c, 10_000);
    let (applied, digest) = settled(&mut c, 1);
    wait_for(|| logger.archived() >= applied, "the logger to archive what the members applied");
    let last = applied.to_string();

    let from_logger = recover_json(&["--from", &logger.admin, "--last-index", &last]);
    assert_eq!(from_logger["digest"], digest.as_str(), "{from_logger}");
    assert_eq!(from_logger["last_index"].as_u64(), Some(applied), "{from_logger}");
    assert_eq!(from_logger["kind"], "logger");
    assert!(from_logger["commands"].as_u64().unwrap_or(0) >= 10_000, "{from_logger}");
    assert_eq!(from_logger["first_index"].as_u64(), Some(0), "the logger holds the log from its start");

    let replica = c.nodes[1].admin_addr.clone();
    let from_replica = recover_json(&["--from", &replica, "--last-index", &last]);
    assert_eq!(from_replica["digest"], digest.as_str(), "{from_replica}");
    assert_eq!(from_replica["kind"], "replica");
    assert!(from_replica["snapshot_index"].as_u64().is_some(), "the replica's log is compacted: {from_replica}");
    assert!(from_replica["bytes"].as_u64().unwrap_or(0) > 0);

    // Without --last-index: as far as the replica had applied when asked, which only
    // checkpoints (no commands) can have moved past `applied`.
    let latest = recover_json(&["--from", &replica]);
    assert!(latest["last_index"].as_u64().unwrap_or(0) >= applied, "{latest}");
    assert_eq!(latest["digest"], digest.as_str(), "{latest}");

    // The readable summary names the digest too.
    let out = recovery(&["--from", &replica, "--last-index", &last]);
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert!(stdout_of(&out).contains(&digest), "{}", stdout_of(&out));
}

/// A TCP proxy to `upstream` that, on a connection whose answer passes `cut_after`
/// bytes, stops forwarding and waits for `release`; then it closes the client's side
/// without passing on what the upstream had buffered: what a client sees of a source that
/// died mid-answer.
struct Proxy {
    addr: String,
    release: Arc<AtomicBool>,
    held: Arc<AtomicU64>,
}

impl Proxy {
    fn start(upstream: String, cut_after: u64) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let addr = listener.local_addr().expect("addr").to_string();
        let release = Arc::new(AtomicBool::new(false));
        let held = Arc::new(AtomicU64::new(0));
        let (r, h) = (release.clone(), held.clone());
        thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                let (upstream, r, h) = (upstream.clone(), r.clone(), h.clone());
                thread::spawn(move || proxy_one(client, &upstream, cut_after, &r, &h));
            }
        });
        Proxy { addr, release, held }
    }
}

fn proxy_one(mut client: TcpStream, upstream: &str, cut_after: u64, release: &AtomicBool, held: &AtomicU64) {
    let Ok(mut up) = TcpStream::connect(upstream) else {
        let _ = client.shutdown(Shutdown::Both);
        return;
    };
    let (mut c2, mut u2) = (client.try_clone().expect("clone"), up.try_clone().expect("clone"));
    thread::spawn(move || {
        let _ = std::io::copy(&mut c2, &mut u2);
        let _ = u2.shutdown(Shutdown::Write);
    });
    let mut buf = vec![0u8; 64 << 10];
    let mut sent = 0u64;
    loop {
        let n = match up.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if sent + n as u64 > cut_after {
            held.fetch_add(1, Ordering::SeqCst);
            while !release.load(Ordering::SeqCst) {
                thread::sleep(Duration::from_millis(10));
            }
            break;
        }
        if client.write_all(&buf[..n]).is_err() {
            break;
        }
        sent += n as u64;
    }
    let _ = client.shutdown(Shutdown::Both);
}

#[test]
fn t02_a_source_killed_mid_transfer_ends_in_a_resumed_transfer_or_a_clear_error() {
    let mut c = Cluster::start(3, "kvstore", &[]);
    load(&c, 10_000);
    let (applied, digest) = settled(&mut c, 0);
    let last = applied.to_string();

    // Through the proxy to member 2, which is killed once 200 KB of its answer passed;
    // the transfer resumes from member 3 where it stopped.
    let proxy = Proxy::start(c.nodes[1].admin_addr.clone(), 200_000);
    let from = format!("{},{}", proxy.addr, c.nodes[2].admin_addr);
    let mut cmd = clean_command(&recovery_exe());
    cmd.args(["--fsm", &guest("kvstore").display().to_string(), "--from", &from, "--last-index", &last, "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = cmd.spawn().expect("recovery");
    wait_for(|| proxy.held.load(Ordering::SeqCst) > 0, "the answer to pass 200 KB");
    c.nodes[1].kill9();
    proxy.release.store(true, Ordering::SeqCst);
    let out = child.wait_with_output().expect("recovery");
    assert!(out.status.success(), "{}", stderr_of(&out));
    let r: Value = serde_json::from_str(stdout_of(&out).trim()).expect("report");
    assert_eq!(r["digest"], digest.as_str(), "{r}");
    assert!(r["resumed"].as_u64().unwrap_or(0) >= 1, "the transfer was resumed: {r}");
    assert_eq!(r["source"], c.nodes[2].admin_addr.as_str(), "{r}");

    // With only the killed member to ask: a clear error and exit 1, nothing on stdout.
    let proxy = Proxy::start(c.nodes[2].admin_addr.clone(), 200_000);
    let mut cmd = clean_command(&recovery_exe());
    cmd.args(["--fsm", &guest("kvstore").display().to_string(), "--from", &proxy.addr, "--last-index", &last])
        .args(["--json", "--retries", "2", "--timeout", "3s"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = cmd.spawn().expect("recovery");
    wait_for(|| proxy.held.load(Ordering::SeqCst) > 0, "the answer to pass 200 KB");
    c.nodes[2].kill9();
    proxy.release.store(true, Ordering::SeqCst);
    let out = child.wait_with_output().expect("recovery");
    let err = stderr_of(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(stdout_of(&out).trim().is_empty(), "no report of a partial state: {}", stdout_of(&out));
    assert!(err.contains("cut off") && err.contains("could not be resumed"), "{err}");
}

#[test]
fn t03_a_member_seeded_from_a_loggers_archive_joins_and_agrees() {
    // No snapshots on the members: the joiner can only be sent the entries after its own.
    let mut c = Cluster::start(3, "kvstore", &["--snapshot-every", "1000000"]);
    let dir = tempfile::tempdir().expect("tempdir");
    let leader = c.leader();
    let logger = Logger::start(&dir.path().join("logger"), "log1", &c.nodes[leader].admin_addr);
    load(&c, 5_000);
    let (applied, _) = settled(&mut c, 0);
    wait_for(|| logger.archived() >= applied, "the logger to archive what the members applied");

    let data_dir = dir.path().join("node-4");
    let r = recover_json(&["--from", &logger.admin, "--data-dir", &data_dir.display().to_string()]);
    let seeded = r["last_index"].as_u64().expect("last_index");
    assert!(data_dir.join("snapshots/current.snap").exists());
    assert!(!data_dir.join("node.json").exists(), "recovery writes no identity");

    // More writes while the new member is down: it must take them from the leader.
    load(&c, 1_000);
    let leader = c.leader();
    let join = c.nodes[leader].admin_addr.clone();
    let flags = ["--snapshot-every".to_string(), "1000000".to_string()];
    let mut n4 = Node::start(4, dir.path(), &guest("kvstore"), &flags, Some(&join));
    let agreed = poll_until(TIMEOUT, || {
        let mine = try_status(&n4.admin_addr)?;
        let theirs = try_status(&c.nodes[0].admin_addr)?;
        let key = |s: &Value| (field_u64(s, "last_applied"), field_str(s, "state_digest").to_string());
        if voter_ids(&theirs).contains(&4) && key(&mine) == key(&theirs) && key(&mine).0 > seeded {
            Ok(mine)
        } else {
            Err(format!("node 4 {mine}\nnode 1 {theirs}"))
        }
    })
    .unwrap_or_else(|e| panic!("node 4 never agreed: {e}\n{}", n4.log_tail()));
    assert_eq!(agreed["snapshot_index"].as_u64(), Some(seeded), "it started from the recovered snapshot: {agreed}");
    let (_, metrics) = http_get(&n4.admin_addr, "/metrics").expect("metrics");
    let installed = metrics
        .lines()
        .find(|l| l.contains("snapshots_installed_total") && !l.starts_with('#'))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse::<f64>().ok());
    assert_eq!(installed, Some(0.0), "the leader sent no snapshot:\n{metrics}");
    n4.kill9();
}

/// A source that answers `/status` like a replica and `/recover` with `body`.
fn fake_source(body: Vec<u8>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") && conn.read(&mut byte).is_ok_and(|n| n == 1) {
                head.push(byte[0]);
            }
            let head = String::from_utf8_lossy(&head).to_string();
            let (ctype, payload) = if head.starts_with("GET /status") {
                ("application/json", br#"{"id":1,"cluster_id":"c","last_applied":3}"#.to_vec())
            } else {
                ("application/octet-stream", body.clone())
            };
            let _ =
                write!(conn, "HTTP/1.1 200 OK\r\ncontent-type: {ctype}\r\ncontent-length: {}\r\n\r\n", payload.len());
            let _ = conn.write_all(&payload);
        }
    });
    addr
}

#[test]
fn t04_bad_input_gets_a_clear_error_and_its_exit_code() {
    let c = Cluster::start(1, "kvstore", &[]);
    let dir = tempfile::tempdir().expect("tempdir");
    let logger = Logger::start(&dir.path().join("logger"), "log1", &c.nodes[0].admin_addr);
    load(&c, 80);
    wait_for(|| logger.archived() > 0, "the logger to archive");
    let check = |args: &[&str], code: i32, says: &str| {
        let out = recovery(args);
        let err = stderr_of(&out);
        assert_eq!(out.status.code(), Some(code), "{args:?}: {err}");
        assert!(err.contains(says), "{args:?}: expected {says:?} in: {err}");
        assert!(stdout_of(&out).trim().is_empty(), "{args:?}: nothing reported: {}", stdout_of(&out));
    };
    // An address that does not answer.
    let dead = format!("127.0.0.1:{}", free_ports(1)[0]);
    check(&["--from", &dead, "--timeout", "2s"], 1, "does not answer");
    // Bad flags.
    check(&["--from", &logger.admin, "--after", "soon"], 2, "bad duration");
    check(&["--from", &logger.admin, "--fsm-config", "novalue"], 2, "KEY=VALUE");
    check(&["--fsm", "/nonexistent.wasm", "--from", &logger.admin], 2, "no such file");
    // Unknown cluster id, of a logger and of a replica.
    check(&["--from", &logger.admin, "--cluster", "nope"], 2, "unknown cluster id \"nope\"");
    check(&["--from", &c.nodes[0].admin_addr, "--cluster", "nope"], 2, "unknown cluster id \"nope\"");
    // A range the source does not hold.
    check(&["--from", &logger.admin, "--last-index", "999999999"], 2, "past the archive's last index");
    check(&["--from", &c.nodes[0].admin_addr, "--last-index", "999999999"], 2, "past this member's last applied");
    // A data dir in use.
    check(&["--from", &logger.admin, "--data-dir", &c.nodes[0].data_dir.display().to_string()], 2, "not empty");

    // A corrupt record is named by index and byte offset; nothing is reported.
    let mut body = Vec::new();
    for i in 0..4u64 {
        let rec = logger::archive::Record::Entry {
            log_id: host::types::LogId::new(openraft::CommittedLeaderId::new(1, 1), i),
            commands: vec![serde_bytes::ByteBuf::from(format!("set k{i} v").into_bytes())],
            membership: None,
        };
        host::store::log::record::encode_record(&rec, &mut body).expect("encode");
    }
    let second = body.len() / 4;
    body[second + 10] ^= 0x40;
    let fake = fake_source(body);
    check(&["--from", &fake], 1, &format!("corrupt record for index 1 at byte {second}"));
}

#[test]
fn t05_error_results_are_state_and_a_trapping_command_is_skipped_as_members_do() {
    let c = Cluster::start(1, "faulty", &[]);
    let faulty = guest("faulty").display().to_string();
    let admin = c.nodes[0].admin_addr.clone();
    for cmd in ["add-3", "fail", "add-4"] {
        c.kv(&["propose", cmd]);
    }
    let before = poll_until(TIMEOUT, || {
        let s = try_status(&admin)?;
        let counter = stdout_of(&c.kv(&["query", "get"]));
        if counter.trim() == "7" {
            Ok(s)
        } else {
            Err(format!("counter {counter}: {s}"))
        }
    })
    .expect("the writes applied");
    let (applied, digest) = (field_u64(&before, "last_applied"), field_str(&before, "state_digest").to_string());
    // The error result of `fail` is part of the state, as on the member.
    let r = recover_json(&["--fsm", &faulty, "--from", &admin, "--last-index", &applied.to_string()]);
    assert_eq!(r["digest"], digest.as_str(), "{r}");
    assert_eq!(r["guest_errors"].as_u64(), Some(1), "{r}");

    // A command that traps (it adds, then panics): the member answers an error and its
    // state stays as before it; then more. Recovery meets the trap, starts over skipping
    // that command, and ends with the member's digest. `kv` returns once an entry is
    // applied, so the status read then is at or past it.
    c.kv(&["propose", "add-then-trap-5"]);
    c.kv(&["propose", "add-1"]);
    let after = try_status(&admin).expect("status");
    assert_eq!(stdout_of(&c.kv(&["query", "get"])).trim(), "8", "the trapped add had no effect");
    let r = recover_json(&[
        "--fsm",
        &faulty,
        "--from",
        &admin,
        "--last-index",
        &field_u64(&after, "last_applied").to_string(),
    ]);
    assert_eq!(r["digest"], field_str(&after, "state_digest"), "{r}");
    assert_eq!(r["replays"].as_u64(), Some(1), "{r}");
    assert_eq!(r["guest_errors"].as_u64(), Some(2), "`fail` and the trapped command: {r}");
}
