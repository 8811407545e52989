//! Guest instances and their directories, in process: each instance has a `/data` of its
//! own, so a snapshot install that fails leaves the instance in use and its files as they
//! were (the diskstorage guest keeps its whole state in its file); a rebuilt instance
//! starts from the snapshot and the log, without the files of the trapped one; a query
//! that traps costs one rebuild, under its own fuel budget, and a long rebuild is followed
//! by a snapshot so that the next one replays little.
//!
//! Uses the guests the test kit builds on first use.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use host::fsm::{GuestModule, Limits};
use host::metrics::Metrics;
use host::store::{GuestSpec, LogStore, StateMachine};
use host::types::{Entry, LogId, Request};
use openraft::storage::{RaftSnapshotBuilder, RaftStateMachine};
use openraft::{CommittedLeaderId, EntryPayload};
use tokio::io::AsyncWriteExt;

fn module(name: &str) -> Arc<GuestModule> {
    let limits = Limits { fuel_per_entry: 20_000_000, fuel_per_query: 2_000_000, memory_bytes: 256 << 20 };
    Arc::new(GuestModule::load(&common::guest(name), limits).expect("load guest"))
}

const DISK: [(&str, &str); 3] = [("file-size", "1M"), ("value-size", "64"), ("sync", "none")];

struct Replica {
    dir: tempfile::TempDir,
    log: LogStore,
    sm: StateMachine,
    metrics: Arc<Metrics>,
    next: u64,
}

impl Replica {
    fn new(module: &Arc<GuestModule>, config: &[(&str, &str)]) -> Replica {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = LogStore::open(&dir.path().join("log"), true).expect("log");
        let metrics = Arc::new(Metrics::default());
        let config = config.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let spec = GuestSpec { module: module.clone(), config, guest_dir: dir.path().join("guest"), node: 1 };
        let sm = StateMachine::open(&dir.path().join("snapshots"), spec, &log, metrics.clone()).expect("open");
        Replica { dir, log, sm, metrics, next: 1 }
    }

    /// Appends one entry per command to the log (a rebuild replays from there) and
    /// applies them.
    async fn apply(&mut self, commands: &[&str]) -> Vec<Result<String, String>> {
        let entries: Vec<Entry> = commands
            .iter()
            .map(|c| {
                let e = Entry {
                    log_id: LogId::new(CommittedLeaderId::new(1, 1), self.next),
                    payload: EntryPayload::Normal(Request::commands(vec![c.as_bytes().to_vec()])),
                };
                self.next += 1;
                e
            })
            .collect();
        {
            let shared = self.log.shared();
            let mut mem = shared.lock().expect("log lock");
            for e in &entries {
                mem.entries.insert(e.log_id.index, e.clone());
            }
        }
        let responses = self.sm.apply(entries).await.unwrap_or_else(|e| panic!("apply stopped the member: {e}"));
        responses
            .into_iter()
            .flat_map(|r| r.results)
            .map(|r| r.map(|v| String::from_utf8_lossy(&v).into_owned()))
            .collect()
    }

    async fn query(&self, q: &str) -> Result<String, String> {
        self.sm.query(q.as_bytes().to_vec()).await.map(|v| String::from_utf8_lossy(&v).into_owned())
    }

    async fn digest(&self) -> Vec<u8> {
        self.sm.applied().await.expect("digest").digest
    }

    fn guest_dir(&self) -> PathBuf {
        self.dir.path().join("guest")
    }

    /// The instance directories under the guest directory.
    fn generations(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(self.guest_dir())
            .expect("read guest dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .filter(|n| n != "current")
            .collect();
        names.sort();
        names
    }

    fn current(&self) -> String {
        std::fs::read_link(self.guest_dir().join("current")).expect("current").display().to_string()
    }
}

/// A received snapshot whose stream is damaged fails its install before the guest's
/// `finish`; the instance in use must keep serving its own state from its own file. Before
/// instances had directories of their own, the new instance's `init` emptied the file the
/// old one was serving from, and every value read back blank.
#[tokio::test]
async fn t10_a_failed_install_leaves_the_diskstorage_instance_in_use_intact() {
    let disk = module("diskstorage");
    let mut leader = Replica::new(&disk, &DISK);
    leader.apply(&["set-1-new", "set-2-new", "set-3-new"]).await;
    let snap = leader.sm.build_snapshot().await.expect("build");
    let meta = snap.meta.clone();
    let mut bytes = std::fs::read(leader.dir.path().join("snapshots").join("current.snap")).expect("read snapshot");

    let mut member = Replica::new(&disk, &DISK);
    member.apply(&["set-1-old", "set-2-old"]).await;
    let before = member.digest().await;
    assert_eq!(member.generations(), vec!["0"]);

    // One flipped byte in the middle of the guest's stream: the checksum fails at its end.
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x55;
    let mut file = member.sm.begin_receiving_snapshot().await.expect("receive");
    file.write_all(&bytes).await.expect("write");
    file.flush().await.expect("flush");
    let err = member.sm.install_snapshot(&meta, file).await.expect_err("a damaged snapshot must not install");
    assert!(err.to_string().contains("checksum") || err.to_string().contains("snapshot"), "{err}");

    assert_eq!(member.query("get-1").await, Ok("old".to_string()), "the instance in use kept its file");
    assert_eq!(member.query("get-2").await, Ok("old".to_string()));
    assert_eq!(member.digest().await, before);
    assert_eq!(member.generations(), vec!["0"], "the failed instance's directory is gone");
    assert_eq!(member.current(), "0");

    // The undamaged snapshot installs, in a new directory, and the old one goes.
    let bytes = std::fs::read(leader.dir.path().join("snapshots").join("current.snap")).expect("read snapshot");
    let mut file = member.sm.begin_receiving_snapshot().await.expect("receive");
    file.write_all(&bytes).await.expect("write");
    file.flush().await.expect("flush");
    member.sm.install_snapshot(&meta, file).await.expect("install");
    assert_eq!(member.query("get-3").await, Ok("new".to_string()));
    assert_eq!(member.digest().await, leader.digest().await);
    assert_eq!(member.generations(), vec!["2"]);
    assert_eq!(member.current(), "2");
}

/// A rebuilt instance is the snapshot plus the log: files the trapped instance wrote
/// (here, by the command that trapped and by the commands before it) are not in its
/// directory unless the replay writes them again.
#[tokio::test]
async fn t20_a_rebuilt_instance_has_a_directory_of_its_own() {
    let faulty = module("faulty");
    let mut r = Replica::new(&faulty, &[]);
    assert_eq!(r.apply(&["write-/data/kept-1", "add-1"]).await, vec![Ok(String::new()), Ok("1".to_string())]);
    std::fs::write(r.guest_dir().join("current").join("stray"), b"not from the log").expect("stray file");
    let got = r.apply(&["add-then-trap-5"]).await;
    assert!(got[0].as_ref().is_err_and(|e| e.contains("trapped")), "{got:?}");
    assert_eq!(r.query("get").await, Ok("1".to_string()));
    assert_eq!(r.generations(), vec!["1"]);
    let dir = r.guest_dir().join("current");
    assert_eq!(std::fs::read(dir.join("kept")).expect("replayed"), b"1");
    assert!(!dir.join("stray").exists(), "the old instance's directory is gone");
}

/// A query that traps (any client can send one) fails with a clear error under the
/// smaller query budget; the member keeps serving, the rebuild shows in the metrics, and
/// a rebuild that replayed a long log is followed by a snapshot, so that the next trap
/// replays nothing. Prints the cost of each trap.
#[tokio::test]
async fn t30_a_query_that_traps_costs_one_bounded_rebuild() {
    let faulty = module("faulty");
    let mut r = Replica::new(&faulty, &[]);
    const N: usize = 5000;
    let adds = vec!["add-1"; N];
    for chunk in adds.chunks(500) {
        r.apply(chunk).await;
    }
    let mut costs = Vec::new();
    for round in 0..3 {
        let started = Instant::now();
        let err = r.query("spin").await.expect_err("a looping query must fail");
        assert!(err.contains("ran out of fuel (2000000 per query, --fuel-per-query)"), "{err}");
        assert_eq!(r.query("get").await, Ok(N.to_string()), "round {round}: the member keeps serving");
        costs.push(started.elapsed());
        assert_eq!(r.metrics.guest_rebuilds.load(std::sync::atomic::Ordering::Relaxed), round + 1);
    }
    eprintln!("query trap + rebuild with {N} entries since the snapshot: {costs:?}");
    let snapshots = r.metrics.snapshots_built.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(snapshots, 1, "one snapshot after the first, long rebuild; none after the short ones");
    let meta = r.sm.get_current_snapshot().await.expect("snapshot").expect("one").meta;
    assert_eq!(meta.last_log_id.map(|l| l.index), Some(N as u64));
    let mut metrics = String::new();
    r.metrics.render(&mut metrics);
    assert!(metrics.contains("wasm_raft_guest_rebuilds_total 3"), "{metrics}");
    // Applying goes on after the snapshot.
    assert_eq!(r.apply(&["add-2"]).await, vec![Ok((N + 2).to_string())]);
}

/// A snapshot asked for while the instance awaits its rebuild (after a query's trap): the
/// build rebuilds it (a long replay) and writes one snapshot, not a second one from
/// inside the first.
#[tokio::test]
async fn t35_a_snapshot_right_after_a_trap_is_built_once() {
    let faulty = module("faulty");
    let mut r = Replica::new(&faulty, &[]);
    let adds = vec!["add-1"; 2000];
    r.apply(&adds).await;
    r.query("spin").await.expect_err("a looping query must fail");
    let snap = r.sm.build_snapshot().await.expect("build");
    assert_eq!(snap.meta.last_log_id.map(|l| l.index), Some(2000));
    assert_eq!(r.metrics.snapshots_built.load(std::sync::atomic::Ordering::Relaxed), 1);
    assert_eq!(r.query("get").await, Ok("2000".to_string()));
    assert_eq!(r.metrics.snapshots_built.load(std::sync::atomic::Ordering::Relaxed), 1);
    let reopened = reopen(&faulty, r.dir.path());
    assert_eq!(reopened.query("get").await, Ok("2000".to_string()), "the snapshot restores");
}

/// The directory of a stopped process's instance (a crash, a trap) is not the next
/// process's: a restart empties the guest directory and starts from the snapshot.
#[tokio::test]
async fn t40_a_restart_starts_from_an_empty_guest_directory() {
    let faulty = module("faulty");
    let r = Replica::new(&faulty, &[]);
    let root = r.guest_dir();
    std::fs::create_dir_all(root.join("7")).expect("mkdir");
    std::fs::write(root.join("7").join("half-made"), b"x").expect("write");
    std::fs::write(root.join("diskstorage.dat"), b"from before instance directories").expect("write");
    let Replica { dir, log, sm, .. } = r;
    drop(sm);
    drop(log);
    let reopened = reopen(&faulty, dir.path());
    assert_eq!(reopened.generations(), vec!["0"]);
    drop(dir);
}

fn reopen(module: &Arc<GuestModule>, path: &Path) -> Replica {
    let dir = tempfile::tempdir().expect("tempdir");
    copy_dir(path, dir.path());
    let log = LogStore::open(&dir.path().join("log"), true).expect("log");
    let metrics = Arc::new(Metrics::default());
    let spec = GuestSpec { module: module.clone(), config: Vec::new(), guest_dir: dir.path().join("guest"), node: 1 };
    let sm = StateMachine::open(&dir.path().join("snapshots"), spec, &log, metrics.clone()).expect("reopen");
    Replica { dir, log, sm, metrics, next: 1 }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for e in std::fs::read_dir(from).expect("read dir") {
        let e = e.expect("entry");
        let (src, dst) = (e.path(), to.join(e.file_name()));
        let kind = e.file_type().expect("file type");
        if kind.is_symlink() {
            std::os::unix::fs::symlink(std::fs::read_link(&src).expect("link"), &dst).expect("symlink");
        } else if kind.is_dir() {
            copy_dir(&src, &dst);
        } else {
            std::fs::copy(&src, &dst).expect("copy");
        }
    }
}
