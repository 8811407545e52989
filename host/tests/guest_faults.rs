//! Guest faults, in process: traps and error results must give the same results and state
//! whatever the batching, leave the state as it was before the faulty entry, and survive
//! snapshots and restarts; fuel or memory exhaustion and a reported environment failure
//! stop the member instead (a storage error), also during a rebuild, and again after a
//! restart. Uses the `faulty` test guest.

mod common;

use common::guest;
use std::path::Path;
use std::sync::Arc;

use host::fsm::{GuestModule, Limits, LoadError};
use host::metrics::Metrics;
use host::store::{GuestSpec, LogStore, StateMachine};
use host::types::{Entry, LogId, Request};
use openraft::storage::{RaftSnapshotBuilder, RaftStateMachine};
use openraft::{CommittedLeaderId, EntryPayload};

fn limits() -> Limits {
    Limits { fuel_per_entry: 20_000_000, fuel_per_query: 2_000_000, memory_bytes: 64 << 20 }
}

struct Replica {
    _dir: tempfile::TempDir,
    log: LogStore,
    sm: StateMachine,
}

fn open(
    module: &Arc<GuestModule>,
    dir: &Path,
    config: Vec<(String, String)>,
) -> anyhow::Result<(LogStore, StateMachine)> {
    let log = LogStore::open(&dir.join("log"), true)?;
    let sm = StateMachine::open(
        &dir.join("snapshots"),
        GuestSpec { module: module.clone(), config, guest_dir: dir.join("guest"), node: 1 },
        &log,
        Arc::new(Metrics::default()),
    )?;
    Ok((log, sm))
}

impl Replica {
    fn new(module: &Arc<GuestModule>) -> Replica {
        let dir = tempfile::tempdir().expect("tempdir");
        let (log, sm) = open(module, dir.path(), Vec::new()).expect("open");
        Replica { _dir: dir, log, sm }
    }

    /// Commit and apply entries as one batch; they are put in the log first, as openraft
    /// does, so that a rebuild can replay them.
    async fn apply(&mut self, entries: &[Entry]) -> Vec<Result<String, String>> {
        self.try_apply(entries).await.unwrap_or_else(|e| panic!("apply stopped the member: {e}"))
    }

    /// `Err` is the storage error that stops Raft on this member.
    async fn try_apply(&mut self, entries: &[Entry]) -> Result<Vec<Result<String, String>>, String> {
        {
            let shared = self.log.shared();
            let mut mem = shared.lock().expect("log lock");
            for e in entries {
                mem.entries.insert(e.log_id.index, e.clone());
            }
        }
        let responses = self.sm.apply(entries.to_vec()).await.map_err(|e| e.to_string())?;
        Ok(responses
            .into_iter()
            .flat_map(|r| r.results)
            .map(|r| r.map(|v| String::from_utf8_lossy(&v).into_owned()))
            .collect())
    }

    async fn counter(&self) -> String {
        let v = self.sm.query(b"get".to_vec()).await.expect("query");
        String::from_utf8(v).expect("utf8")
    }

    async fn digest(&self) -> (u64, Vec<u8>) {
        let a = self.sm.applied().await.expect("digest");
        (a.last_applied.map_or(0, |l| l.index), a.digest)
    }
}

fn entries(commands: &[&str]) -> Vec<Entry> {
    commands
        .iter()
        .enumerate()
        .map(|(i, c)| Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), i as u64 + 1),
            payload: EntryPayload::Normal(Request::commands(vec![c.as_bytes().to_vec()])),
        })
        .collect()
}

const HISTORY: [&str; 7] = ["add-5", "add-then-trap-3", "add-1", "fail", "add-then-trap-100", "add-2", "bogus"];

fn module() -> Arc<GuestModule> {
    Arc::new(GuestModule::load(&guest("faulty"), limits()).expect("load faulty"))
}

#[tokio::test]
async fn t10_faults_give_error_results_and_no_effect() {
    let module = module();
    let mut r = Replica::new(&module);
    let mut results = Vec::new();
    for e in entries(&HISTORY) {
        results.extend(r.apply(&[e]).await);
    }
    assert_eq!(results[0], Ok("5".to_string()));
    for i in [1, 4] {
        let err = results[i].clone().expect_err("fault must be an error result");
        assert!(err.contains("trapped"), "entry {}: {err}", i + 1);
        assert!(err.contains("no effect"), "{err}");
    }
    assert_eq!(results[2], Ok("6".to_string()), "the trapped add-3 left no trace");
    assert_eq!(results[3], Err("requested failure".to_string()));
    assert_eq!(results[5], Ok("8".to_string()));
    assert!(results[6].is_err());
    assert_eq!(r.counter().await, "8");
    assert_eq!(r.digest().await, (7, 8i64.to_le_bytes().to_vec()));
}

/// Running out of fuel or memory depends on this instance's history, not only on the
/// state and the command: the member stops (a storage error) instead of replicating an
/// error, and a restarted member meets the command again rather than skipping it.
#[tokio::test]
async fn t15_fuel_and_memory_exhaustion_stop_the_member() {
    let module = module();
    for (command, why) in [("spin", "ran out of fuel"), ("grow", "memory could not grow"), ("try-grow", "memory")] {
        let dir = tempfile::tempdir().expect("tempdir");
        let (log, sm) = open(&module, dir.path(), Vec::new()).expect("open");
        let mut r = Replica { _dir: tempfile::tempdir().expect("tempdir"), log, sm };
        let all = entries(&["add-1", command, "add-2"]);
        assert_eq!(r.apply(&all[..1]).await, vec![Ok("1".to_string())]);
        let err = r.try_apply(&all[1..]).await.expect_err("the member must stop");
        assert!(err.contains(why), "{command}: {err}");
        let err = r.sm.query(b"get".to_vec()).await.expect_err("a stopped member answers nothing");
        assert!(err.contains("stopped"), "{err}");

        // The same log after a restart: the same stop, never a skipped command.
        drop(r);
        let (log, sm) = open(&module, dir.path(), Vec::new()).expect("reopen");
        let mut r = Replica { _dir: tempfile::tempdir().expect("tempdir"), log, sm };
        let err = r.try_apply(&all).await.expect_err("the member must stop again");
        assert!(err.contains(why), "{command} after a restart: {err}");
    }
}

/// A rebuild after a trap replays the log; a member failure met there stops the member
/// too, and is not taken for a trap of the command it met it on.
#[tokio::test]
async fn t17_environment_failure_during_a_rebuild_stops_the_member() {
    let module = module();
    let mut r = Replica::new(&module);
    let all = entries(&["add-1", "env-check", "add-then-trap-5", "add-2"]);
    assert_eq!(r.apply(&all[..2]).await, vec![Ok("1".to_string()), Ok("ok".to_string())]);
    // Each instance has a directory of its own, numbered from 0: the marker goes where the
    // rebuilt instance will find it.
    let next = r._dir.path().join("guest").join("1");
    std::fs::create_dir_all(&next).expect("mkdir");
    std::fs::write(next.join("broken-disk"), b"").expect("marker");
    let err = r.try_apply(&all[2..]).await.expect_err("the rebuild meets the failure");
    assert!(err.contains("broken-disk") && err.contains("entry 2"), "{err}");
}

#[tokio::test]
async fn t20_batching_does_not_change_results_or_state() {
    let module = module();
    let all = entries(&HISTORY);
    let mut one_by_one = Replica::new(&module);
    let mut a = Vec::new();
    for e in &all {
        a.extend(one_by_one.apply(std::slice::from_ref(e)).await);
    }
    let mut batched = Replica::new(&module);
    let mut b = batched.apply(&all[..4]).await;
    b.extend(batched.apply(&all[4..]).await);
    assert_eq!(a, b);
    assert_eq!(one_by_one.digest().await, batched.digest().await);
}

/// Proposals batched into one entry: a trap in the middle must undo only its own command,
/// not the ones before it in the same entry.
#[tokio::test]
async fn t25_trap_inside_a_batched_entry() {
    let module = module();
    let mut separate = Replica::new(&module);
    let mut expected = Vec::new();
    for e in entries(&HISTORY) {
        expected.extend(separate.apply(&[e]).await);
    }
    let mut together = Replica::new(&module);
    let one = Entry {
        log_id: LogId::new(CommittedLeaderId::new(1, 1), 1),
        payload: EntryPayload::Normal(Request::commands(HISTORY.iter().map(|c| c.as_bytes().to_vec()).collect())),
    };
    let got = together.apply(&[one]).await;
    assert_eq!(got.len(), HISTORY.len());
    for (i, (g, e)) in got.iter().zip(&expected).enumerate() {
        assert_eq!(g.is_ok(), e.is_ok(), "command {i}: {g:?} vs {e:?}");
        if let (Ok(g), Ok(e)) = (g, e) {
            assert_eq!(g, e, "command {i}");
        }
    }
    assert_eq!(together.counter().await, "8");
    assert_eq!(together.digest().await.1, separate.digest().await.1);
}

#[tokio::test]
async fn t30_trap_after_snapshot_rebuilds_from_snapshot_and_log() {
    let module = module();
    let dir = tempfile::tempdir().expect("tempdir");
    let (log, mut sm) = open(&module, dir.path(), Vec::new()).expect("open");
    let mut r = Replica { _dir: tempfile::tempdir().expect("tempdir"), log, sm: sm.clone() };
    let all = entries(&["add-10", "add-1", "add-then-trap-7", "add-100", "fail", "add-1000"]);
    r.apply(&all[..2]).await;
    let snap = sm.get_snapshot_builder().await.build_snapshot().await.expect("snapshot");
    assert_eq!(snap.meta.last_log_id.map(|l| l.index), Some(2));
    let res = r.apply(&all[2..]).await;
    assert!(res[0].is_err() && res[2].is_err(), "{res:?}");
    assert_eq!(res[1], Ok("111".to_string()));
    assert_eq!(res[3], Ok("1111".to_string()));
    assert_eq!(r.counter().await, "1111");

    // A restart restores the snapshot (11); openraft then re-applies the log after it.
    drop(r);
    drop(sm);
    let (_log2, sm2) = open(&module, dir.path(), Vec::new()).expect("reopen");
    assert_eq!(sm2.query(b"get".to_vec()).await.expect("query"), b"11");
    let applied = sm2.applied().await.expect("applied");
    assert_eq!(applied.last_applied.map(|l| l.index), Some(2));
}

#[tokio::test]
async fn t40_guest_refusing_its_settings_stops_start_up() {
    let module = module();
    let dir = tempfile::tempdir().expect("tempdir");
    let err = open(&module, dir.path(), vec![("fail-init".into(), "1".into())])
        .err()
        .expect("init refusal must fail start-up");
    assert!(format!("{err:#}").contains("init refused"), "{err:#}");
}

#[test]
fn t50_loading_rejects_what_is_not_a_state_machine() {
    let dir = tempfile::tempdir().expect("tempdir");
    let missing = dir.path().join("nope.wasm");
    assert!(matches!(GuestModule::load(&missing, limits()), Err(LoadError::Missing { .. })));

    let text = dir.path().join("text.wasm");
    std::fs::write(&text, "not wasm at all").expect("write");
    let e = GuestModule::load(&text, limits()).err().expect("must fail");
    assert!(matches!(e, LoadError::NotComponent { .. }), "{e}");
    assert!(e.to_string().contains("text.wasm"), "{e}");

    let core = dir.path().join("core.wasm");
    std::fs::write(&core, b"\0asm\x01\0\0\0").expect("write");
    let e = GuestModule::load(&core, limits()).err().expect("must fail");
    assert!(e.to_string().contains("core module"), "{e}");

    let truncated = dir.path().join("truncated.wasm");
    let bytes = std::fs::read(guest("kvstore")).expect("read kvstore");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).expect("write");
    assert!(matches!(GuestModule::load(&truncated, limits()), Err(LoadError::NotComponent { .. })));

    let e = GuestModule::load(&guest("notfsm"), limits()).err().expect("must fail");
    assert!(matches!(e, LoadError::WrongContract { .. }), "{e}");
    assert!(e.to_string().contains("state-machine"), "{e}");
}

/// The guest sees only its own directory: paths outside it, `..`, and symlinks leading out
/// (made by the guest or placed by the host) give error results, never data.
#[tokio::test]
async fn t60_guest_cannot_leave_its_directory() {
    let module = module();
    let mut r = Replica::new(&module);
    let guest_dir = r._dir.path().join("guest").join("current");
    std::os::unix::fs::symlink("/etc", guest_dir.join("escape")).expect("host-side symlink");
    let probes = [
        "write-/data/ok-hello",
        "read-/data/ok",
        "read-/etc/passwd",
        "read-/data/../../etc/passwd",
        "read-../etc/passwd",
        "read-/data/escape/passwd",
        "symlink-/etc-/data/link",
        "read-/data/link/passwd",
        "symlink-../../..-/data/up",
        "read-/data/up/etc/passwd",
    ];
    let got = r.apply(&entries(&probes)).await;
    assert_eq!(got[0], Ok(String::new()), "writing inside /data works");
    assert_eq!(got[1], Ok("5".to_string()), "and reads back");
    assert_eq!(std::fs::read(guest_dir.join("ok")).expect("the file is in the guest dir"), b"hello");
    for (i, probe) in probes.iter().enumerate().skip(2) {
        if probe.starts_with("read-") {
            assert!(got[i].is_err(), "{probe} must fail, got {:?}", got[i]);
        }
    }
}
