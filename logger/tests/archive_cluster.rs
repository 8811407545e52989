//! The logger against real clusters: `host` members, `kv` writers and `logger` processes
//! on loopback. Tests wait on `/status`, never on fixed sleeps.

#[path = "../../host/tests/common/mod.rs"]
mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;

use common::*;
use logger::archive::{self, Record};
use serde_json::Value;

fn logger_exe() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_logger"))
}

/// One `logger` process following one or several clusters.
struct Logger {
    admin: String,
    dir: PathBuf,
    log_path: PathBuf,
    args: Vec<String>,
    child: Option<Child>,
}

impl Logger {
    fn start(dir: &Path, ids: &[&str], joins: &[&str]) -> Logger {
        let ports = free_ports(ids.len() + 1);
        let raft: Vec<String> = ports[1..].iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let admin = format!("127.0.0.1:{}", ports[0]);
        let args = vec![
            "--id".into(),
            ids.join(","),
            "--raft-addr".into(),
            raft.join(","),
            "--join".into(),
            joins.join(","),
            "--dir".into(),
            dir.display().to_string(),
            "--admin-addr".into(),
            admin.clone(),
        ];
        let mut l = Logger {
            admin,
            dir: dir.to_path_buf(),
            log_path: dir.join(format!("logger-{}.out", ids.join("-"))),
            args,
            child: None,
        };
        l.launch();
        l
    }

    fn launch(&mut self) {
        std::fs::create_dir_all(&self.dir).expect("logger dir");
        let log = OpenOptions::new().create(true).append(true).open(&self.log_path).expect("logger log");
        let err = log.try_clone().expect("clone");
        let mut cmd = clean_command(&logger_exe());
        cmd.args(&self.args).stdin(Stdio::null()).stdout(log).stderr(err);
        self.child = Some(cmd.spawn().expect("start logger"));
        let up = poll_until(TIMEOUT, || {
            if let Some(s) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                return Ok(Err(format!("logger exited: {s}")));
            }
            self.status().map(|_| Ok(()))
        });
        match up {
            Ok(Ok(())) => {}
            Ok(Err(e)) | Err(e) => panic!("logger did not start: {e}\n{}", file_tail(&self.log_path, 30)),
        }
    }

    fn status(&self) -> Result<Value, String> {
        let (code, body) = http_get(&self.admin, "/status")?;
        if code != 200 {
            return Err(format!("HTTP {code}: {body}"));
        }
        serde_json::from_str(&body).map_err(|e| e.to_string())
    }

    fn cluster(&self, id: &str) -> Result<Value, String> {
        let s = self.status()?;
        s["clusters"]
            .as_array()
            .and_then(|cs| cs.iter().find(|c| c["id"] == id).cloned())
            .ok_or_else(|| format!("no cluster {id} in {s}"))
    }

    fn archive(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.log"))
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().ok();
            c.wait().ok();
        }
    }

    fn terminate(&mut self) {
        if let Some(mut c) = self.child.take() {
            Command::new("kill").args(["-TERM", &c.id().to_string()]).status().expect("kill");
            c.wait().ok();
        }
    }

    /// Waits until the archive of `id` holds the cluster's commit index as it stood
    /// when the wait began (checkpoints keep committing meanwhile).
    fn wait_archived(&self, id: &str, leader_admin: &str) -> Value {
        let target = field_u64(&try_status(leader_admin).expect("leader status"), "committed");
        let got = poll_until(TIMEOUT, || {
            let c = self.cluster(id)?;
            if c["archived_index"].as_u64().unwrap_or(0) >= target {
                Ok(c)
            } else {
                Err(format!("{c}"))
            }
        });
        got.unwrap_or_else(|e| panic!("{id} never archived index {target}: {e}\n{}", file_tail(&self.log_path, 30)))
    }
}

impl Drop for Logger {
    fn drop(&mut self) {
        self.kill9();
    }
}

fn inspect(path: &Path) -> Result<Value, String> {
    let out = Command::new(logger_exe()).arg("inspect").arg(path).output().expect("run logger inspect");
    if out.status.success() {
        serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).to_string())
    }
}

/// Checks an archive record by record: entries in index order from `first` with no gap
/// or duplicate, every command a `set key-i value-i`; returns the keys written and how
/// many commands there were.
fn check_archive(path: &Path) -> (BTreeMap<String, usize>, u64) {
    let records = archive::read_all(path).unwrap_or_else(|e| panic!("{e}"));
    let mut next: Option<u64> = None;
    let mut seen = BTreeMap::new();
    let mut commands = 0;
    for r in &records {
        match r {
            Record::Entry { log_id, commands: cmds, .. } => {
                if let Some(n) = next {
                    assert_eq!(log_id.index, n, "gap or duplicate in {}", path.display());
                }
                next = Some(log_id.index + 1);
                for c in cmds {
                    commands += 1;
                    match kvcommand::command::parse(c) {
                        Ok(kvcommand::command::Command::Set { key, value }) => {
                            let i: usize = key.trim_start_matches("key-").parse().expect("a test key");
                            assert_eq!(String::from_utf8_lossy(&value), common::value(i), "value of {key}");
                            *seen.entry(key).or_insert(0) += 1;
                        }
                        other => panic!("unexpected command {other:?}"),
                    }
                }
            }
            Record::Snapshot { log_id, .. } => next = Some(log_id.index + 1),
        }
    }
    let summary = inspect(path).expect("inspect");
    assert_eq!(summary["commands"].as_u64(), Some(commands), "inspect agrees on commands");
    assert_eq!(
        summary["records"].as_u64(),
        Some(records.iter().filter(|r| matches!(r, Record::Entry { .. })).count() as u64)
    );
    (seen, commands)
}

/// Writes keys `range` from `threads` writers; returns how many attempts were retried
/// (a retried set may reach the log twice).
fn write(addrs: &str, range: std::ops::Range<usize>, threads: usize) -> usize {
    thread::scope(|s| {
        let ws: Vec<_> = (0..threads)
            .map(|t| {
                let range = range.clone();
                s.spawn(move || {
                    range.skip(t).step_by(threads).map(|i| set_acknowledged(addrs, &key(i), &value(i))).sum::<usize>()
                })
            })
            .collect();
        ws.into_iter().map(|w| w.join().expect("writer")).sum()
    })
}

fn leader_admin(c: &mut Cluster) -> String {
    let l = c.leader();
    c.nodes[l].admin_addr.clone()
}

#[test]
fn t01_two_loggers_archive_exactly_the_committed_commands_and_never_vote() {
    let mut c = Cluster::start(3, "kvstore", &[]);
    let dir = tempfile::tempdir().expect("tempdir");
    let admin = leader_admin(&mut c);
    let l1 = Logger::start(&dir.path().join("a"), &["log1"], &[&admin]);
    let l2 = Logger::start(&dir.path().join("b"), &["log2"], &[&c.nodes[1].admin_addr]);
    c.wait_until("both loggers to be members", |c| {
        let s = try_status(&c.nodes[0].admin_addr)?;
        let loggers = members(&s).iter().filter(|m| m["role"] == "logger").count();
        if loggers == 2 {
            Ok(())
        } else {
            Err(format!("{s}"))
        }
    });

    let retried = write(&c.client_addrs(), 0..1000, 8);
    let admin = leader_admin(&mut c);
    for (l, id) in [(&l1, "log1"), (&l2, "log2")] {
        l.wait_archived(id, &admin);
        let (seen, commands) = check_archive(&l.archive(id));
        assert_eq!(seen.len(), 1000, "every key written is archived");
        assert!(commands >= 1000 && commands <= 1000 + retried as u64, "{commands} commands, {retried} retries");
        let s = inspect(&l.archive(id)).expect("inspect");
        // openraft's first entry (the founding membership) is at index 0.
        assert_eq!(s["first_index"].as_u64(), Some(0), "{s}");
        assert_eq!(s["records"].as_u64(), s["last_index"].as_u64().map(|l| l + 1), "one record per index: {s}");
    }

    // Loggers are members with their role, never voters, in every member's view.
    for (i, s) in c.statuses().expect("statuses") {
        let voters = voter_ids(&s);
        assert_eq!(voters, vec![1, 2, 3], "node {}: {s}", i + 1);
        for m in members(&s).iter().filter(|m| m["role"] == "logger") {
            assert_eq!(m["voter"], false, "{m}");
        }
    }

    // With every logger down the cluster keeps committing.
    drop(l1);
    drop(l2);
    let before = field_u64(&try_status(&admin).expect("status"), "committed");
    write(&c.client_addrs(), 1000..1050, 4);
    assert!(field_u64(&try_status(&admin).expect("status"), "committed") > before);
}

#[test]
fn t02_one_logger_follows_two_clusters() {
    let mut a = Cluster::start(1, "kvstore", &[]);
    let mut b = Cluster::start(1, "kvstore", &[]);
    let dir = tempfile::tempdir().expect("tempdir");
    let l = Logger::start(dir.path(), &["log0", "log1"], &[&a.nodes[0].admin_addr, &b.nodes[0].admin_addr]);
    write(&a.client_addrs(), 0..100, 4);
    write(&b.client_addrs(), 100..250, 4);
    l.wait_archived("log0", &leader_admin(&mut a));
    l.wait_archived("log1", &leader_admin(&mut b));
    let (seen_a, _) = check_archive(&l.archive("log0"));
    let (seen_b, _) = check_archive(&l.archive("log1"));
    assert_eq!(seen_a.keys().cloned().collect::<BTreeSet<_>>(), (0..100).map(key).collect());
    assert_eq!(seen_b.keys().cloned().collect::<BTreeSet<_>>(), (100..250).map(key).collect());
    assert!(dir.path().join("log0-throughput.out").exists() && dir.path().join("log1-throughput.out").exists());

    // Lists of unequal length are refused, naming the flags.
    let out = Command::new(logger_exe())
        .args(["--id", "x,y", "--raft-addr", "127.0.0.1:1", "--join", "127.0.0.1:2,127.0.0.1:3"])
        .args(["--dir", &dir.path().display().to_string()])
        .output()
        .expect("run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("--id, --raft-addr and --join"), "{err}");
}

#[test]
fn t03_a_logger_killed_under_load_resumes_with_no_gap_or_duplicate() {
    let mut c = Cluster::start(3, "kvstore", &[]);
    let dir = tempfile::tempdir().expect("tempdir");
    let mut l = Logger::start(dir.path(), &["log1"], &[&c.nodes[0].admin_addr]);
    let addrs = c.client_addrs();
    let retried = thread::scope(|s| {
        let writer = s.spawn(|| write(&addrs, 0..600, 4));
        wait_for(|| l.cluster("log1").is_ok_and(|c| c["archived_index"].as_u64().unwrap_or(0) > 50), "archiving");
        l.kill9();
        l.launch();
        writer.join().expect("writer")
    });
    l.wait_archived("log1", &leader_admin(&mut c));
    let (seen, commands) = check_archive(&l.archive("log1"));
    assert_eq!(seen.len(), 600);
    assert!(commands <= 600 + retried as u64, "{commands} commands for 600 writes and {retried} retries");
}

#[test]
fn t04_a_logger_joining_after_compaction_starts_from_the_snapshot() {
    let mut c = Cluster::start(1, "kvstore", &["--snapshot-every", "50", "--keep-logs", "0"]);
    write(&c.client_addrs(), 0..300, 4);
    let admin = leader_admin(&mut c);
    c.wait_until("a snapshot past the first entries", |c| {
        let s = try_status(&c.nodes[0].admin_addr)?;
        if s["snapshot_index"].as_u64().unwrap_or(0) > 50 {
            Ok(())
        } else {
            Err(format!("{s}"))
        }
    });
    let dir = tempfile::tempdir().expect("tempdir");
    let l = Logger::start(dir.path(), &["late"], &[&admin]);
    write(&c.client_addrs(), 300..350, 2);
    l.wait_archived("late", &admin);
    let records = archive::read_all(&l.archive("late")).expect("read");
    let Some(Record::Snapshot { log_id, file, bytes, .. }) = records.first() else {
        panic!("the archive starts with a snapshot mark: {:?}", records.first());
    };
    assert!(log_id.index > 50, "{log_id}");
    let kept = dir.path().join(file);
    assert_eq!(std::fs::metadata(&kept).expect("snapshot kept beside the archive").len(), *bytes);
    let (seen, _) = check_archive(&l.archive("late"));
    assert!((300..350).all(|i| seen.contains_key(&key(i))), "the writes after the snapshot are archived");

    // recover from below the first entry comes with the snapshot first.
    let last = l.cluster("late").expect("status")["archived_index"].as_u64().expect("index");
    let (code, _) = http_get(&l.admin, &format!("/recover?cluster=late&from=1&to={last}")).expect("recover");
    assert_eq!(code, 200);
}

#[test]
fn t05_a_torn_tail_is_cut_and_a_corrupt_middle_refused() {
    let mut c = Cluster::start(1, "kvstore", &[]);
    let dir = tempfile::tempdir().expect("tempdir");
    let mut l = Logger::start(dir.path(), &["log1"], &[&c.nodes[0].admin_addr]);
    write(&c.client_addrs(), 0..100, 2);
    let admin = leader_admin(&mut c);
    l.wait_archived("log1", &admin);
    l.terminate();
    let path = l.archive("log1");
    let whole = std::fs::read(&path).expect("read");

    // A record cut short at the end: inspect names it, start-up cuts it and resumes.
    let mut torn = whole.clone();
    torn.extend_from_slice(&[0, 0, 0, 40, 1, 2, 3, 4, 5, 6]);
    std::fs::write(&path, &torn).expect("tear");
    let why = inspect(&path).expect_err("a torn tail");
    assert!(why.contains(&format!("byte {}", whole.len())), "{why}");
    l.launch();
    write(&c.client_addrs(), 100..120, 2);
    l.wait_archived("log1", &admin);
    l.terminate();
    let (seen, _) = check_archive(&path);
    assert_eq!(seen.len(), 120);

    // A flipped byte inside the first record, with records after it: start-up refuses,
    // naming the offset.
    let mut bad = std::fs::read(&path).expect("read");
    bad[10] ^= 0xff;
    std::fs::write(&path, &bad).expect("corrupt");
    let why = inspect(&path).expect_err("corrupt");
    assert!(why.contains("corrupt record at byte 0"), "{why}");
    let out = Command::new(logger_exe()).args(&l.args).output().expect("run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("corrupt record at byte 0"), "{err}");
}

#[test]
fn t06_truncate_needs_a_majority_and_bad_admin_input_gets_clear_errors() {
    let mut c = Cluster::start(3, "kvstore", &[]);
    let dir = tempfile::tempdir().expect("tempdir");
    let l = Logger::start(dir.path(), &["log1"], &[&c.nodes[0].admin_addr]);
    write(&c.client_addrs(), 0..200, 4);
    let admin = leader_admin(&mut c);
    let st = l.wait_archived("log1", &admin);
    let last = st["archived_index"].as_u64().expect("index");
    let post = |q: &str| http_request(&l.admin, "POST", &format!("/truncate?{q}"), None).expect("truncate");

    let (code, body) = post("cluster=log1&voter=1&below=150");
    assert_eq!(code, 409, "one voter of three is no majority: {body}");
    assert!(body.contains("1 of 3 voters"), "{body}");
    assert_eq!(inspect(&l.archive("log1")).expect("inspect")["first_index"].as_u64(), Some(0), "nothing dropped");
    let (code, body) = post("cluster=log1&voter=99&below=150");
    assert_eq!(code, 403, "{body}");
    let (code, body) = post("cluster=log1&voter=2&below=100");
    assert_eq!(code, 200, "{body}");
    let s = inspect(&l.archive("log1")).expect("inspect");
    assert_eq!(s["first_index"].as_u64(), Some(100), "only below the smallest index asked: {s}");

    // recover of what was dropped, or past the end, is a clear error; a held range streams.
    let (code, body) = http_get(&l.admin, "/recover?cluster=log1&from=10&to=20").expect("recover");
    assert_eq!(code, 416, "{body}");
    assert!(body.contains("entries 100.."), "{body}");
    let (code, body) =
        http_get(&l.admin, &format!("/recover?cluster=log1&from=100&to={}", last + 1_000_000)).expect("r");
    assert_eq!(code, 416, "{body}");
    let (code, _) = http_get(&l.admin, "/recover?cluster=log1&from=100&to=110").expect("recover");
    assert_eq!(code, 200);

    for (q, want) in [
        ("cluster=nope&from=1&to=2", 404),
        ("cluster=log1&from=abc&to=2", 400),
        ("cluster=log1&from=5&to=2", 400),
        ("cluster=log1&from=1&to=99999999999999999999999", 400),
        ("cluster=log1&from=1", 400),
        ("from=1&to=2", 400),
    ] {
        let (code, body) = http_get(&l.admin, &format!("/recover?{q}")).expect("recover");
        assert_eq!(code, want, "{q}: {body}");
        assert!(body.contains("error"), "{q}: {body}");
    }
    let (code, body) = http_get(&l.admin, &format!("/recover?cluster=log1&from=1&to={}", u64::MAX)).expect("r");
    assert_eq!(code, 416, "{body}");
    let (code, body) = post("cluster=log1&voter=x&below=1");
    assert_eq!(code, 400, "{body}");
    let (code, body) = http_get(&l.admin, "/metrics").expect("metrics");
    assert_eq!(code, 200);
    assert!(body.contains("logger_archived_index{cluster=\"log1\"}"), "{body}");
}

#[test]
fn t07_truncate_requests_survive_a_logger_restart() {
    let mut c = Cluster::start(3, "kvstore", &[]);
    let dir = tempfile::tempdir().expect("tempdir");
    let mut l = Logger::start(dir.path(), &["log1"], &[&c.nodes[0].admin_addr]);
    write(&c.client_addrs(), 0..200, 4);
    let admin = leader_admin(&mut c);
    l.wait_archived("log1", &admin);
    let post = |l: &Logger, q: &str| http_request(&l.admin, "POST", &format!("/truncate?{q}"), None).expect("truncate");
    // A logger that has just started may not know the voters yet (503): wait until it does.
    let following = |l: &Logger| {
        wait_for(
            || l.cluster("log1").is_ok_and(|c| c["state"] == "Learner" && c["leader_id"].is_u64()),
            "the logger to follow the cluster again",
        )
    };

    let (code, body) = post(&l, "cluster=log1&voter=1&below=150");
    assert_eq!(code, 409, "{body}");
    assert!(dir.path().join("log1.truncate").exists(), "the request is recorded beside the archive");
    // Killed at once: the request was on disk before it was answered.
    l.kill9();
    l.launch();
    following(&l);
    let (code, body) = post(&l, "cluster=log1&voter=2&below=100");
    assert_eq!(code, 200, "voter 1's request from before the restart counts: {body}");
    assert_eq!(inspect(&l.archive("log1")).expect("inspect")["first_index"].as_u64(), Some(100));

    // Both requests are on record, the one made before the restart included.
    let asks: BTreeMap<u64, u64> =
        host::store::files::read_small(&dir.path().join("log1.truncate")).expect("read").expect("recorded");
    assert_eq!(asks, BTreeMap::from([(1, 150), (2, 100)]));
}
