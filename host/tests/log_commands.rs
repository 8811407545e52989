//! `--log-commands DIR`: every member writes each applied entry to `DIR/<id>.log`, in the
//! logger's archive format. Real `host` and `kv` processes on loopback; tests wait on
//! `/status`, never on fixed sleeps.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::thread;

use common::*;
use host::archive::{self, Record};

/// Writes keys `range` from `threads` writers; returns how many attempts were retried (a
/// retried set may reach the log twice).
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

/// What a member's command log holds, checked record by record: entries in index order
/// with no gap or duplicate (a snapshot mark may stand for a compacted range), every
/// command a `set key-i value-i`.
struct Logged {
    records: Vec<Record>,
    /// Writes seen per key.
    keys: BTreeMap<String, usize>,
    commands: u64,
    last: u64,
}

fn check(path: &Path) -> Logged {
    let records = archive::read_all(path).unwrap_or_else(|e| panic!("{e}"));
    let mut next: Option<u64> = None;
    let mut keys = BTreeMap::new();
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
                            *keys.entry(key).or_insert(0) += 1;
                        }
                        other => panic!("unexpected command {other:?} in {}", path.display()),
                    }
                }
            }
            Record::Snapshot { log_id, .. } => {
                assert!(next.is_none_or(|n| log_id.index >= n), "a snapshot mark behind the entries");
                next = Some(log_id.index + 1);
            }
        }
    }
    Logged { records, keys, commands, last: next.map_or(0, |n| n - 1) }
}

fn log_of(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("{id}.log"))
}

/// The entries of `a` from index `from` up to `upto`.
fn entries(l: &Logged, from: u64, upto: u64) -> Vec<&Record> {
    l.records.iter().filter(|r| matches!(r, Record::Entry { .. }) && r.index() >= from && r.index() <= upto).collect()
}

/// Waits until every running member has applied the whole log and its command log holds
/// everything it applied; returns each member's command log.
fn settled(c: &mut Cluster, dir: &Path) -> Vec<Logged> {
    let st = c.wait_converged();
    let applied = field_u64(&st, "last_applied");
    let ids: Vec<u64> = c.running().map(|i| c.nodes[i].id).collect();
    ids.iter()
        .map(|&id| {
            let l = check(&log_of(dir, id));
            assert!(l.last >= applied, "member {id}'s command log ends at {}, it applied {applied}", l.last);
            l
        })
        .collect()
}

#[test]
fn t01_every_member_logs_exactly_the_committed_commands_in_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    let logs = dir.path().join("commands");
    let flag = logs.display().to_string();
    let mut c = Cluster::start(3, "kvstore", &["--log-commands", &flag]);
    let retried = write(&c.client_addrs(), 0..1000, 8);
    let all = settled(&mut c, &logs);
    let upto = all.iter().map(|l| l.last).min().expect("three logs");
    for (i, l) in all.iter().enumerate() {
        assert_eq!(l.keys.len(), 1000, "member {}: every acknowledged write is logged", i + 1);
        assert!(
            l.commands >= 1000 && l.commands <= 1000 + retried as u64,
            "member {}: {} commands for 1000 writes and {retried} retries",
            i + 1,
            l.commands
        );
        // Nothing compacted: the log starts with openraft's first entry, one record per index.
        assert!(matches!(l.records.first(), Some(Record::Entry { log_id, .. }) if log_id.index == 0));
        // The same entries, in the same order, on every member.
        assert_eq!(entries(l, 0, upto), entries(&all[0], 0, upto), "member {} differs from member 1", i + 1);
        // What `logger inspect` prints agrees.
        // (Checkpoint entries keep coming: a read may meet a record being written.)
        let s = poll_until(TIMEOUT, || archive::inspect(&log_of(&logs, i as u64 + 1)).map_err(|e| e.to_string()))
            .expect("inspect");
        assert_eq!(s.commands, l.commands, "{s:?}");
        assert_eq!(s.first_index, Some(0), "{s:?}");
    }
}

#[test]
fn t02_a_member_killed_under_load_resumes_its_log_with_no_gap_or_duplicate() {
    let dir = tempfile::tempdir().expect("tempdir");
    let logs = dir.path().join("commands");
    let flag = logs.display().to_string();
    let mut c = Cluster::start(3, "kvstore", &["--log-commands", &flag]);
    let addrs = c.client_addrs();
    let leader = c.leader();
    let victim_log = log_of(&logs, c.nodes[leader].id);
    let retried = thread::scope(|s| {
        let writer = s.spawn(|| write(&addrs, 0..800, 4));
        // The leader dies mid-stream, with batches being written and synced.
        wait_for(|| archive::read_all(&victim_log).is_ok_and(|r| r.len() > 200), "the leader to log 200 entries");
        c.nodes[leader].kill9();
        c.nodes[leader].restart();
        writer.join().expect("writer")
    });
    let all = settled(&mut c, &logs);
    let upto = all.iter().map(|l| l.last).min().expect("three logs");
    for l in &all {
        assert_eq!(l.keys.len(), 800, "every acknowledged write is logged");
        assert!(l.commands <= 800 + retried as u64, "{} commands for 800 writes and {retried} retries", l.commands);
        assert_eq!(entries(l, 0, upto), entries(&all[0], 0, upto), "every member logged the same entries");
    }
}

#[test]
fn t03_a_member_catching_up_by_snapshot_marks_it_and_resumes_after_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let logs = dir.path().join("commands");
    let flag = logs.display().to_string();
    let mut c = Cluster::start(3, "kvstore", &["--log-commands", &flag, "--snapshot-every", "50", "--keep-logs", "0"]);
    c.nodes[2].kill9();
    write(&c.client_addrs(), 0..300, 4);
    c.wait_until("the leader to compact its log", |c| {
        let s = try_status(&c.nodes[0].admin_addr)?;
        match s["snapshot_index"].as_u64() {
            Some(i) if i >= 100 => Ok(()),
            other => Err(format!("snapshot_index {other:?}")),
        }
    });
    let before = check(&log_of(&logs, 3)).last;
    c.nodes[2].restart();
    write(&c.client_addrs(), 300..350, 2);
    let all = settled(&mut c, &logs);
    let third = &all[2];
    let mark = third.records.iter().find_map(|r| match r {
        Record::Snapshot { log_id, file, bytes, .. } if log_id.index > before => Some((log_id.index, file, *bytes)),
        _ => None,
    });
    let Some((at, file, bytes)) = mark else {
        panic!("member 3 caught up by snapshot past {before}, and its log has no mark for it");
    };
    let kept = logs.join(file);
    assert_eq!(std::fs::metadata(&kept).expect("the snapshot is kept beside the log").len(), bytes);
    // Its entries after the snapshot are the others' entries, and include every write made
    // after it came back.
    let upto = all.iter().map(|l| l.last).min().expect("three logs");
    assert_eq!(entries(third, at + 1, upto), entries(&all[0], at + 1, upto));
    assert!((300..350).all(|i| third.keys.contains_key(&key(i))), "the writes after the snapshot are logged");

    // A restart right after the install neither repeats nor loses anything.
    assert!(c.nodes[2].terminate().success());
    c.nodes[2].restart();
    write(&c.client_addrs(), 350..360, 2);
    let all = settled(&mut c, &logs);
    assert!((350..360).all(|i| all[2].keys.contains_key(&key(i))));
}

#[test]
fn t04_an_unusable_directory_is_a_clear_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("a-file");
    std::fs::write(&file, b"not a directory").expect("write");
    let ports = free_ports(3);
    let bad = file.join("commands");
    let mut cmd = clean_command(&host_exe());
    cmd.arg("--fsm").arg(guest("kvstore")).arg("--log-commands").arg(&bad);
    cmd.arg("--data-dir").arg(dir.path().join("data"));
    for (flag, port) in ["--client-addr", "--raft-addr", "--admin-addr"].iter().zip(&ports) {
        cmd.arg(flag).arg(format!("127.0.0.1:{port}"));
    }
    let out = run_with_timeout(cmd, KV_TIMEOUT).expect("host exits");
    let err = stderr_of(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("--log-commands") && err.contains(&bad.display().to_string()), "{err}");
}
