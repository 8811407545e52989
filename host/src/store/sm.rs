//! The state machine: openraft's `RaftStateMachine` on one side, a guest instance on a
//! dedicated worker thread on the other.
//!
//! The worker owns everything the state consists of (the instance, the last applied log
//! id, the last membership, the current snapshot), so a snapshot always describes exactly
//! the state it was cut from, whatever openraft does concurrently.
//!
//! # Snapshot files (`<data-dir>/snapshots/`)
//!
//! `current.snap` is a header with openraft's `SnapshotMeta`, the guest's own stream and a
//! trailer with its length, a checksum and the guest's digest (see `snapfile`). The same
//! bytes travel to followers, so a received snapshot is verified, restored and then
//! installed by renaming it. Every restore (start-up, install, rebuild) checks the file
//! and then the restored guest's digest against the recorded one.
//!
//! # Traps
//!
//! A trap leaves an instance unusable. The worker records the entry's index as trapped,
//! rebuilds a fresh instance from the current snapshot plus the log up to the entry
//! before, skipping entries already known to trap, and answers the entry with an error.
//! Every member does the same, so they stay identical. Every command after the snapshot
//! was applied by this process (a restart re-applies them), so the set of trapped ones is
//! complete: a command that traps on replay although it succeeded when it was applied is
//! a guest that does not behave the same twice, and the member stops rather than skip it
//! (skipping would make its state differ from every other member's).
//!
//! # Instance directories (`<data-dir>/guest/<n>`)
//!
//! Each instance gets a new directory as its `/data`, so that making one (its `init`
//! empties its files, its restore rewrites them) never touches the files of the instance
//! in use: an install or a rebuild that fails leaves the instance in use as it was. The
//! new instance replaces the old one only once complete; the old directory is removed
//! then. A start empties the guest directory: the guest's files are never state across
//! restarts, only the snapshot and the log are.
//!
//! A failure of this member's own (the guest reports its environment failing, runs out of
//! fuel, memory or stack) is no result: apply returns a `StorageError`, openraft stops, and the
//! process exits. Until then the worker refuses every call. Nothing marks the command as
//! trapped or applied, so a restarted member meets it again rather than skipping it.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Instant;

use openraft::storage::{RaftSnapshotBuilder, RaftStateMachine};
use openraft::{EntryPayload, ErrorSubject, ErrorVerb, OptionalSend, StorageIOError};
use tokio::io::AsyncSeekExt;
use tokio::sync::oneshot;

use super::command_log::CommandLog;
use super::covered::SnapshotCover;
use super::durable::Durable;
use super::files::sync_dir;
use super::log::{LogStore, SharedLog};
use super::snapfile::{SnapReader, SnapWriter};
use crate::fsm::{ApplyOutcome, GuestModule, Instance, Limits};
use crate::metrics::Metrics;
use crate::types::{
    Checkpoint, Entry, LogId, NodeId, Response, Snapshot, SnapshotMeta, StorageError, StoredMembership, TypeConfig,
};

pub const CHUNK: u32 = 1 << 20;
/// Entries whose index is a multiple of this get their digest recorded, for checkpoints.
pub const CHECKPOINT_EVERY: u64 = 128;
/// Recorded digests kept: a checkpoint refers to an index the leader applied moments ago.
const KEPT_CHECKPOINTS: usize = 64;
/// A rebuild that replays more commands than this is followed by a snapshot, so that the
/// next trap (a query's, which any client can cause) replays at most about this many:
/// repeated traps cost one restore each instead of a restore plus the whole log since the
/// last scheduled snapshot.
const REBUILD_REPLAY_BOUND: u64 = 1024;

/// Handle to the worker; cheap to clone.
#[derive(Clone)]
pub struct StateMachine {
    tx: mpsc::Sender<Op>,
    /// Entries are applied only once they are on this member's disk (see `durable`).
    durable: Durable,
    dir: PathBuf,
    receiving: Arc<Mutex<Vec<PathBuf>>>,
    seq: Arc<AtomicU64>,
    /// Told when an install fails, so that the log's purge waiting for it gives up.
    cover: Option<SnapshotCover>,
    limits: Limits,
    /// The log in memory, which `recover` serves entries from.
    log: SharedLog,
    /// `--log-commands`: each batch is recorded there before it is applied.
    commands: Option<CommandLog>,
}

/// What `/status` shows of the state: the digest at `last_applied`, read together.
#[derive(Debug, Clone)]
pub struct Applied {
    pub last_applied: Option<LogId>,
    pub digest: Vec<u8>,
}

/// Takes a query's result on the state-machine thread.
type QueryDone = Box<dyn FnOnce(Result<Vec<u8>, String>) + Send>;

enum Op {
    Apply(Vec<Entry>, oneshot::Sender<Result<Vec<Response>, StorageError>>),
    Query(Vec<u8>, QueryDone),
    Digest(oneshot::Sender<Result<Applied, String>>),
    AppliedState(oneshot::Sender<(Option<LogId>, StoredMembership)>),
    LatestCheckpoint(oneshot::Sender<Option<Checkpoint>>),
    Build(oneshot::Sender<Result<SnapshotMeta, StorageError>>),
    Install(SnapshotMeta, PathBuf, oneshot::Sender<Result<(), StorageError>>),
}

fn sm_err(verb: ErrorVerb, e: &impl ToString) -> StorageError {
    StorageIOError::new(ErrorSubject::StateMachine, verb, openraft::AnyError::error(e.to_string())).into()
}

fn snap_err(verb: ErrorVerb, e: &impl ToString) -> StorageError {
    StorageIOError::new(ErrorSubject::Snapshot(None), verb, openraft::AnyError::error(e.to_string())).into()
}

/// Everything the worker needs to make instances.
pub struct GuestSpec {
    pub module: Arc<GuestModule>,
    pub config: Vec<(String, String)>,
    /// Under which each instance gets a directory of its own (`<guest_dir>/<generation>`),
    /// preopened as its `/data`.
    pub guest_dir: PathBuf,
    pub node: NodeId,
}

/// Why the state machine could not start.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("guest {path} refused to start: {why}")]
    GuestRefused { path: PathBuf, why: crate::fsm::GuestError },
    #[error("restoring {path}: {why}")]
    Restore { path: PathBuf, why: String },
    #[error("the state-machine thread died while starting")]
    ThreadDied,
    #[error("--log-commands: {0}")]
    CommandLog(String),
}

impl StateMachine {
    /// Start the worker: restore the current snapshot if there is one, else a fresh
    /// instance. Fails if the guest refuses its settings.
    pub fn open(dir: &Path, spec: GuestSpec, log: &LogStore, metrics: Arc<Metrics>) -> Result<Self, OpenError> {
        let durable = log.durable();
        let cover = log.snapshot_cover();
        let limits = spec.module.limits.clone();
        let log = log.shared();
        let shared = log.clone();
        fs::create_dir_all(dir)?;
        clear_dir(&spec.guest_dir)?;
        // Leftovers of interrupted transfers or builds.
        for e in fs::read_dir(dir)?.flatten() {
            if e.file_name() != "current.snap" {
                let _ = fs::remove_file(e.path());
            }
        }
        // A snapshot renamed into place by a process killed before it synced the
        // directory counts as durable from here on (the log may be purged behind it).
        sync_dir(dir)?;
        let mut worker = Worker {
            spec,
            inst: None,
            last_applied: None,
            membership: StoredMembership::default(),
            snapshot: None,
            dir: dir.to_path_buf(),
            log,
            trapped: BTreeSet::new(),
            failed: None,
            metrics,
            cover: cover.clone(),
            checkpoints: BTreeMap::new(),
            generation: None,
            next_generation: 0,
            snapshot_due: false,
        };
        let (tx, rx) = mpsc::channel();
        // The first instance is made on the worker thread too: guest file calls block the
        // calling thread, which must not be a tokio one.
        let (started_tx, started_rx) = mpsc::channel();
        std::thread::Builder::new().name("state-machine".into()).spawn(move || match worker.start() {
            Ok(()) => {
                let _ = started_tx.send(Ok(()));
                worker.run(&rx);
            }
            Err(e) => {
                let _ = started_tx.send(Err(e));
            }
        })?;
        started_rx.recv().map_err(|_| OpenError::ThreadDied)??;
        Ok(StateMachine {
            tx,
            durable,
            dir: dir.to_path_buf(),
            receiving: Arc::default(),
            seq: Arc::default(),
            cover,
            limits,
            log: shared,
            commands: None,
        })
    }

    /// The log entries in memory (what `recover` serves after the snapshot).
    pub fn log(&self) -> &SharedLog {
        &self.log
    }

    /// The snapshot file this member restarts from and sends to lagging members.
    pub fn snapshot_path(&self) -> PathBuf {
        self.dir.join("current.snap")
    }

    /// Records every batch in `log` before applying it (`--log-commands`). A snapshot the
    /// state machine starts from that reaches past the log's end is marked there first.
    pub fn with_command_log(mut self, log: CommandLog) -> Result<Self, OpenError> {
        let current = self.dir.join("current.snap");
        if current.exists() {
            let meta = SnapReader::open(&current)
                .map_err(|e| OpenError::CommandLog(format!("{}: {e}", current.display())))?
                .meta;
            log.snapshot_held(&meta, &current).map_err(|e| OpenError::CommandLog(e.to_string()))?;
        }
        self.commands = Some(log);
        Ok(self)
    }

    /// The guest's execution limits on this member.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    async fn call<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Op) -> Result<T, StorageError> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(make(tx)).map_err(|_| sm_err(ErrorVerb::Write, &"state-machine thread stopped"))?;
        rx.await.map_err(|_| sm_err(ErrorVerb::Write, &"state-machine thread stopped"))
    }

    /// Run a read-only query on the local state. `Err` is the guest's error (or trap).
    pub async fn query(&self, request: Vec<u8>) -> Result<Vec<u8>, String> {
        let (tx, rx) = oneshot::channel();
        self.query_then(request, move |r| {
            let _ = tx.send(r);
        });
        rx.await.unwrap_or_else(|_| Err("state-machine thread stopped".into()))
    }

    /// Run a read-only query and hand its result to `done` on the state-machine thread,
    /// which saves waking a task just to pass the result on.
    pub fn query_then(&self, request: Vec<u8>, done: impl FnOnce(Result<Vec<u8>, String>) + Send + 'static) {
        if let Err(mpsc::SendError(Op::Query(_, done))) = self.tx.send(Op::Query(request, Box::new(done))) {
            done(Err("state-machine thread stopped".into()));
        }
    }

    /// The last digest recorded at a checkpoint index (see [`CHECKPOINT_EVERY`]).
    pub async fn latest_checkpoint(&self) -> Option<Checkpoint> {
        self.call(Op::LatestCheckpoint).await.ok().flatten()
    }

    pub async fn applied(&self) -> Result<Applied, String> {
        match self.call(Op::Digest).await {
            Ok(r) => r,
            Err(e) => Err(e.to_string()),
        }
    }

    /// Put a received snapshot in place and restore the guest from it.
    async fn install_received(
        &mut self,
        meta: &SnapshotMeta,
        mut snapshot: Box<tokio::fs::File>,
    ) -> Result<(), StorageError> {
        snapshot.sync_all().await.map_err(|e| snap_err(ErrorVerb::Write, &e))?;
        let ino = snapshot.metadata().await.map_err(|e| snap_err(ErrorVerb::Read, &e))?.ino();
        // The file handle does not carry its path; find it among the files we created.
        let received = {
            let mut receiving = self.receiving.lock().unwrap_or_else(|p| p.into_inner());
            let pos = receiving.iter().position(|p| fs::metadata(p).map(|m| m.ino() == ino).unwrap_or(false));
            pos.map(|i| receiving.remove(i))
        };
        let path = match received {
            Some(p) => p,
            // A handle we did not hand out (e.g. one of our own snapshots): copy it.
            None => {
                let mut copy = self.begin_receiving_snapshot().await?;
                snapshot.rewind().await.map_err(|e| snap_err(ErrorVerb::Read, &e))?;
                tokio::io::copy(&mut *snapshot, &mut *copy).await.map_err(|e| snap_err(ErrorVerb::Write, &e))?;
                copy.sync_all().await.map_err(|e| snap_err(ErrorVerb::Write, &e))?;
                self.receiving
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .pop()
                    .ok_or_else(|| snap_err(ErrorVerb::Write, &"snapshot copy vanished"))?
            }
        };
        drop(snapshot);
        let meta = meta.clone();
        self.call(|tx| Op::Install(meta, path, tx)).await?
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot, StorageError> {
        let meta = self.call(Op::Build).await??;
        let file =
            tokio::fs::File::open(self.dir.join("current.snap")).await.map_err(|e| snap_err(ErrorVerb::Read, &e))?;
        Ok(Snapshot { meta, snapshot: Box::new(file) })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = StateMachine;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), StorageError> {
        self.call(Op::AppliedState).await
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Response>, StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries: Vec<Entry> = entries.into_iter().collect();
        if let Some(last) = entries.last() {
            self.durable.wait_for(last.log_id.index).await.map_err(|e| sm_err(ErrorVerb::Write, &e))?;
        }
        if let Some(log) = &self.commands {
            log.append(&entries).await.map_err(|e| sm_err(ErrorVerb::Write, &e))?;
        }
        self.call(|tx| Op::Apply(entries, tx)).await?
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<tokio::fs::File>, StorageError> {
        let path = self.dir.join(format!("receiving-{}.snap", self.seq.fetch_add(1, Ordering::Relaxed)));
        let file = tokio::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .await
            .map_err(|e| snap_err(ErrorVerb::Write, &e))?;
        self.receiving.lock().unwrap_or_else(|p| p.into_inner()).push(path);
        Ok(Box::new(file))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: Box<tokio::fs::File>,
    ) -> Result<(), StorageError> {
        let res = self.install_received(meta, snapshot).await;
        if let (Err(e), Some(cover)) = (&res, &self.cover) {
            cover.fail(e.to_string());
        }
        if let (Ok(()), Some(log)) = (&res, &self.commands) {
            log.snapshot_installed(meta, &self.dir.join("current.snap"))
                .await
                .map_err(|e| snap_err(ErrorVerb::Write, &e))?;
        }
        res
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, StorageError> {
        let path = self.dir.join("current.snap");
        let file = match tokio::fs::File::open(&path).await {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(snap_err(ErrorVerb::Read, &e)),
        };
        // The header and trailer only (the stream was verified when the file was made or
        // installed, and is again by whoever installs it).
        let meta = tokio::task::spawn_blocking(move || SnapReader::open(&path).map(|r| r.meta))
            .await
            .map_err(|e| snap_err(ErrorVerb::Read, &e))?
            .map_err(|e| snap_err(ErrorVerb::Read, &e))?;
        Ok(Some(Snapshot { meta, snapshot: Box::new(file) }))
    }
}

struct Worker {
    spec: GuestSpec,
    inst: Option<Instance>,
    last_applied: Option<LogId>,
    membership: StoredMembership,
    snapshot: Option<SnapshotMeta>,
    dir: PathBuf,
    log: SharedLog,
    /// Commands (log index, position) after the current snapshot whose application trapped.
    trapped: BTreeSet<(u64, usize)>,
    /// Why this member stopped applying, once something of its own failed.
    failed: Option<String>,
    metrics: Arc<Metrics>,
    cover: Option<SnapshotCover>,
    /// The guest's digest after each recent entry whose index is a multiple of
    /// [`CHECKPOINT_EVERY`], for comparing with the leader's checkpoints.
    checkpoints: BTreeMap<u64, Vec<u8>>,
    /// The directory generation of the instance in use (or last in use), under
    /// `spec.guest_dir`.
    generation: Option<u64>,
    next_generation: u64,
    /// A rebuild replayed more than [`REBUILD_REPLAY_BOUND`] commands: snapshot as soon as
    /// the state is at an entry boundary.
    snapshot_due: bool,
}

/// Empties `dir` (creating it if needed). The guest's files are never state across
/// restarts (a starting member restores its snapshot into a new instance, whose `init`
/// starts from nothing), so whatever an earlier process left there, a complete or a
/// half-made instance directory, is removed rather than looked for.
fn clear_dir(dir: &Path) -> io::Result<()> {
    fs::create_dir_all(dir)?;
    for e in fs::read_dir(dir)? {
        let path = e?.path();
        if path.is_dir() && !path.is_symlink() {
            fs::remove_dir_all(&path)?;
        } else {
            fs::remove_file(&path)?;
        }
    }
    Ok(())
}

impl Worker {
    fn current(&self) -> PathBuf {
        self.dir.join("current.snap")
    }

    fn start(&mut self) -> Result<(), OpenError> {
        let current = self.current();
        if current.exists() {
            let ((inst, meta), generation) = self
                .staged(|e| e.to_string(), |w, dir| w.restore(&current, dir))
                .map_err(|why| OpenError::Restore { path: current.clone(), why })?;
            self.last_applied = meta.last_log_id;
            self.membership = meta.last_membership.clone();
            self.covered(&meta);
            self.snapshot = Some(meta);
            self.adopt(inst, generation);
        } else {
            let (inst, generation) = self.staged(OpenError::from, |w, dir| w.fresh(dir))?;
            self.adopt(inst, generation);
        }
        Ok(())
    }

    /// Runs `make` with a new, empty directory for an instance: its own, so that making it
    /// (its `init` may empty its files, its restore rewrite them) cannot touch the files of
    /// the instance still in use. On failure the directory goes; on success the caller
    /// passes the instance and its generation to [`Worker::adopt`].
    fn staged<T, E>(
        &mut self,
        io_err: impl FnOnce(io::Error) -> E,
        make: impl FnOnce(&Self, &Path) -> Result<T, E>,
    ) -> Result<(T, u64), E> {
        let generation = self.next_generation;
        self.next_generation += 1;
        let dir = self.spec.guest_dir.join(generation.to_string());
        fs::create_dir_all(&dir).map_err(io_err)?;
        match make(self, &dir) {
            Ok(made) => Ok((made, generation)),
            Err(e) => {
                let _ = fs::remove_dir_all(&dir);
                Err(e)
            }
        }
    }

    /// Puts a complete instance in use and removes the directory of the one it replaces.
    fn adopt(&mut self, inst: Instance, generation: u64) {
        // Dropped first: its files are closed before they are removed.
        self.inst = None;
        self.inst = Some(inst);
        // `current` names the directory in use, for operators and tests; nothing reads it
        // back (a restart starts over), so it need not survive a crash.
        let root = &self.spec.guest_dir;
        let tmp = root.join("current.tmp");
        let _ = fs::remove_file(&tmp);
        if let Err(e) = std::os::unix::fs::symlink(generation.to_string(), &tmp)
            .and_then(|()| fs::rename(&tmp, root.join("current")))
        {
            tracing::warn!(error = %e, "cannot point {}/current at the guest instance's directory", root.display());
        }
        if let Some(old) = self.generation.replace(generation) {
            let dir = self.spec.guest_dir.join(old.to_string());
            if let Err(e) = fs::remove_dir_all(&dir) {
                tracing::warn!(dir = %dir.display(), error = %e, "cannot remove a replaced guest instance's directory");
            }
        }
    }

    /// A fresh instance with `dir` as its `/data`, restored from the snapshot file at
    /// `path`, verified: the file's checksum before the guest's `finish`, then the guest's
    /// digest against the one recorded when the snapshot was made.
    fn restore(&self, path: &Path, dir: &Path) -> Result<(Instance, SnapshotMeta), String> {
        let mut r = SnapReader::open(path).map_err(|e| e.to_string())?;
        let mut inst = self.fresh(dir).map_err(|e| e.to_string())?;
        inst.restore_from(&mut r, CHUNK as usize).map_err(|e| format!("guest restore failed: {e}"))?;
        check_restored(&mut inst, r.digest())?;
        Ok((inst, r.meta))
    }

    /// `meta`'s snapshot is on disk: the log may be purged up to it.
    fn covered(&self, meta: &SnapshotMeta) {
        if let Some(cover) = &self.cover {
            cover.advance(meta.last_log_id.map(|l| l.index));
        }
    }

    fn fresh(&self, dir: &Path) -> Result<Instance, OpenError> {
        Instance::new(&self.spec.module, &self.spec.config, Some(dir), self.spec.node)
            .map_err(|why| OpenError::GuestRefused { path: self.spec.module.path().to_path_buf(), why })
    }

    fn run(mut self, rx: &mpsc::Receiver<Op>) {
        while let Ok(op) = rx.recv() {
            match op {
                Op::Apply(entries, tx) => {
                    let _ = tx.send(self.apply(entries));
                }
                Op::Query(req, done) => done(self.query(&req)),
                Op::Digest(tx) => {
                    let _ = tx.send(self.digest());
                }
                Op::LatestCheckpoint(tx) => {
                    let latest = self.checkpoints.last_key_value();
                    let _ = tx.send(latest.map(|(&index, digest)| Checkpoint { index, digest: digest.clone() }));
                }
                Op::AppliedState(tx) => {
                    let _ = tx.send((self.last_applied, self.membership.clone()));
                }
                Op::Build(tx) => {
                    let _ = tx.send(self.build());
                }
                Op::Install(meta, path, tx) => {
                    let _ = tx.send(self.install(meta, &path));
                }
            }
            // Between two operations the state is exactly at `last_applied`, and no
            // snapshot is being written: a snapshot a long rebuild asked for is built here.
            self.snapshot_if_due();
        }
    }

    fn instance(&mut self) -> Result<&mut Instance, StorageError> {
        if let Some(why) = &self.failed {
            return Err(sm_err(ErrorVerb::Write, &format!("this member has stopped applying: {why}")));
        }
        if self.inst.is_none() {
            let next = self.last_applied.map_or(0, |l| l.index + 1);
            self.rebuild((next, 0))?;
        }
        self.inst.as_mut().ok_or_else(|| sm_err(ErrorVerb::Write, &"no guest instance"))
    }

    fn apply(&mut self, entries: Vec<Entry>) -> Result<Vec<Response>, StorageError> {
        let mut out = Vec::with_capacity(entries.len());
        for entry in entries {
            let log_id = entry.log_id;
            let resp = match entry.payload {
                EntryPayload::Blank => Response::default(),
                EntryPayload::Membership(m) => {
                    self.membership = StoredMembership::new(Some(log_id), m);
                    Response::default()
                }
                EntryPayload::Normal(req) => {
                    if let Some(c) = &req.checkpoint {
                        self.compare(c)?;
                    }
                    let mut results = Vec::with_capacity(req.commands.len());
                    for (pos, command) in req.commands.iter().enumerate() {
                        results.push(self.apply_one(log_id, pos, command)?);
                    }
                    Response { results }
                }
            };
            self.last_applied = Some(log_id);
            if log_id.index.is_multiple_of(CHECKPOINT_EVERY) {
                self.record_checkpoint(log_id.index)?;
            }
            self.snapshot_if_due();
            out.push(resp);
        }
        Ok(out)
    }

    fn apply_one(
        &mut self,
        log_id: LogId,
        pos: usize,
        command: &[u8],
    ) -> Result<Result<Vec<u8>, String>, StorageError> {
        let started = Instant::now();
        let outcome = apply_command(self.instance()?, &log_id, command);
        self.metrics.observe_apply(started.elapsed());
        Ok(match outcome {
            ApplyOutcome::Result(r) => {
                if r.is_err() {
                    self.metrics.guest_errors.fetch_add(1, Ordering::Relaxed);
                }
                r
            }
            ApplyOutcome::MemberFailure(why) => return Err(self.member_failure(log_id.index, pos, &why)),
            ApplyOutcome::Trap(why) => {
                self.metrics.guest_traps.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(index = log_id.index, pos, %why, "guest trapped; rebuilding its instance");
                self.trapped.insert((log_id.index, pos));
                self.inst = None;
                self.rebuild((log_id.index, pos))?;
                Err(format!(
                    "guest trapped on entry {} (command {pos}): {why} (the command had no effect)",
                    log_id.index
                ))
            }
        })
    }

    /// Make a fresh instance holding the state just before command `upto` (log index,
    /// position in the entry): the current snapshot plus the log after it, skipping
    /// commands known to trap.
    fn rebuild(&mut self, upto: (u64, usize)) -> Result<(), StorageError> {
        let started = Instant::now();
        let made = self.staged(|e| Replay::Failed(sm_err(ErrorVerb::Write, &e)), |w, dir| w.replay(upto, dir));
        let ((inst, replayed), generation) = match made {
            Ok(made) => made,
            Err(Replay::Failed(e)) => return Err(e),
            Err(Replay::Member(index, pos, why)) => return Err(self.member_failure(index, pos, &why)),
        };
        self.adopt(inst, generation);
        self.metrics.guest_rebuilds.fetch_add(1, Ordering::Relaxed);
        tracing::info!(replayed, ms = started.elapsed().as_millis() as u64, "guest instance rebuilt");
        if replayed > REBUILD_REPLAY_BOUND {
            self.snapshot_due = true;
        }
        Ok(())
    }

    /// Builds a snapshot if a long rebuild asked for one; the state must be at
    /// `last_applied` and no other snapshot being built (never from inside `build`, whose
    /// own rebuild may ask). A failure is not this member's end: the next rebuild is only
    /// slower.
    fn snapshot_if_due(&mut self) {
        if !std::mem::take(&mut self.snapshot_due) || self.inst.is_none() {
            return;
        }
        if let Err(e) = self.build() {
            tracing::warn!(error = %e, "the snapshot after a long rebuild failed");
        }
    }

    /// A fresh instance in `dir` holding the state just before command `upto`, and how
    /// many commands it replayed.
    fn replay(&self, upto: (u64, usize), dir: &Path) -> Result<(Instance, u64), Replay> {
        let mut from = 0;
        let mut replayed = 0u64;
        let mut inst = match &self.snapshot {
            Some(meta) => {
                from = meta.last_log_id.map_or(0, |l| l.index + 1);
                self.restore(&self.current(), dir).map_err(|e| Replay::Failed(snap_err(ErrorVerb::Read, &e)))?.0
            }
            None => self.fresh(dir).map_err(|e| Replay::Failed(sm_err(ErrorVerb::Write, &e)))?,
        };
        let entries: Vec<Entry> = {
            let mem = self.log.lock().unwrap_or_else(|p| p.into_inner());
            // Empty when the command to stop at is in the first entry after the snapshot.
            mem.entries.range(from..=upto.0.max(from)).map(|(_, e)| e.clone()).collect()
        };
        let mut want = from;
        for e in entries {
            let idx = e.log_id.index;
            // Every entry from the snapshot on must be there: a hole would leave out
            // commands every other member applied.
            if idx != want && !(want == 0 && self.snapshot.is_none()) {
                return Err(Replay::Failed(sm_err(
                    ErrorVerb::Read,
                    &format!("cannot rebuild the guest: the log has entry {idx} where {want} should be"),
                )));
            }
            want = idx + 1;
            let EntryPayload::Normal(req) = &e.payload else { continue };
            for (pos, command) in req.commands.iter().enumerate() {
                if (idx, pos) >= upto {
                    break;
                }
                if self.trapped.contains(&(idx, pos)) {
                    continue;
                }
                replayed += 1;
                match apply_command(&mut inst, &e.log_id, command) {
                    ApplyOutcome::Result(_) => {}
                    ApplyOutcome::Trap(why) => {
                        let why = format!("it trapped on replay after succeeding when first applied: {why}");
                        return Err(Replay::Member(idx, pos, why));
                    }
                    ApplyOutcome::MemberFailure(why) => return Err(Replay::Member(idx, pos, why)),
                }
            }
        }
        Ok((inst, replayed))
    }

    /// Records the digest after the entry at `index`, keeping the most recent ones.
    fn record_checkpoint(&mut self, index: u64) -> Result<(), StorageError> {
        let digest = self.instance()?.digest().map_err(|e| sm_err(ErrorVerb::Read, &format!("digest: {e}")))?;
        self.checkpoints.insert(index, digest);
        while self.checkpoints.len() > KEPT_CHECKPOINTS {
            self.checkpoints.pop_first();
        }
        Ok(())
    }

    /// Compares a leader's checkpoint with this member's digest at the same index, if it
    /// still has it (a snapshot installed past it, or a restart, leaves none to compare).
    /// A difference means the states diverged, for whatever reason (a guest that is not
    /// deterministic, an import that differs between members, a bug): this member stops
    /// rather than serve or replicate a state the others do not have.
    fn compare(&mut self, c: &Checkpoint) -> Result<(), StorageError> {
        let Some(mine) = self.checkpoints.get(&c.index) else {
            return Ok(());
        };
        if *mine == c.digest {
            self.metrics.checkpoints_verified.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        let why = format!(
            "state diverged: after entry {} this member's guest digest is {}, the leader's {}; \
             this member stops (its state must be replaced from a healthy member's snapshot)",
            c.index,
            hex::encode(mine),
            hex::encode(&c.digest)
        );
        tracing::error!(index = c.index, "{why}");
        self.inst = None;
        self.failed = Some(why.clone());
        Err(sm_err(ErrorVerb::Read, &why))
    }

    /// Stops this member from applying anything more and returns the error that stops
    /// Raft.
    fn member_failure(&mut self, index: u64, pos: usize, why: &str) -> StorageError {
        tracing::error!(index, pos, %why, "this member failed applying a command; it stops");
        let why = format!("entry {index} (command {pos}) could not be applied on this member: {why}");
        self.inst = None;
        self.failed = Some(why.clone());
        sm_err(ErrorVerb::Write, &why)
    }

    fn query(&mut self, req: &[u8]) -> Result<Vec<u8>, String> {
        let inst = self.instance().map_err(|e| e.to_string())?;
        match inst.query(req) {
            Ok(r) => r,
            Err(e) => {
                if e.is_member_failure() {
                    tracing::error!(error = %e, "the guest reported its environment failing; this member stops applying");
                    self.failed = Some(e.to_string());
                }
                if e.is_trap() {
                    self.metrics.guest_traps.fetch_add(1, Ordering::Relaxed);
                    self.inst = None;
                }
                Err(format!("query failed: {e}"))
            }
        }
    }

    fn digest(&mut self) -> Result<Applied, String> {
        let last_applied = self.last_applied;
        let inst = self.instance().map_err(|e| e.to_string())?;
        match inst.digest() {
            Ok(digest) => Ok(Applied { last_applied, digest }),
            Err(e) => {
                if e.is_member_failure() {
                    self.failed = Some(e.to_string());
                }
                self.inst = None;
                Err(format!("digest failed: {e}"))
            }
        }
    }

    fn build(&mut self) -> Result<SnapshotMeta, StorageError> {
        let id = format!(
            "{}-{}",
            self.last_applied.map_or(0, |l| l.leader_id.term),
            self.last_applied.map_or(0, |l| l.index)
        );
        let meta =
            SnapshotMeta { last_log_id: self.last_applied, last_membership: self.membership.clone(), snapshot_id: id };
        let tmp = self.dir.join("building.snap");
        let started = Instant::now();
        let mut streamed = started;
        let res = (|| -> Result<u64, StorageError> {
            let file = File::create(&tmp).map_err(|e| snap_err(ErrorVerb::Write, &e))?;
            let mut w = SnapWriter::create(file, &meta).map_err(|e| snap_err(ErrorVerb::Write, &e))?;
            let inst = self.instance()?;
            let written = inst.snapshot_to(w.stream(), CHUNK).and_then(|n| Ok((n, inst.digest()?)));
            let (n, digest) = written.map_err(|e| {
                if e.is_trap() {
                    self.inst = None;
                }
                snap_err(ErrorVerb::Write, &format!("guest snapshot failed: {e}"))
            })?;
            let f = w.finish(&digest).map_err(|e| snap_err(ErrorVerb::Write, &e))?;
            streamed = Instant::now();
            // Here rather than on another thread while applies go on: a concurrent sync of
            // 100 MB made every log fsync behind it slower, and cost more than the pause.
            f.sync_all().map_err(|e| snap_err(ErrorVerb::Write, &e))?;
            Ok(n)
        })();
        let bytes = match res {
            Ok(n) => n,
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                return Err(e);
            }
        };
        fs::rename(&tmp, self.current()).map_err(|e| snap_err(ErrorVerb::Write, &e))?;
        sync_dir(&self.dir).map_err(|e| snap_err(ErrorVerb::Write, &e))?;
        let upto = self.last_applied.map_or(0, |l| l.index);
        self.trapped = self.trapped.split_off(&(upto + 1, 0));
        // Apply waits for all of it.
        let stream_ms = (streamed - started).as_millis();
        let sync_ms = streamed.elapsed().as_millis();
        tracing::info!(snapshot = %meta.snapshot_id, bytes, stream_ms, sync_ms, "snapshot built");
        self.metrics.snapshots_built.fetch_add(1, Ordering::Relaxed);
        self.snapshot_due = false;
        self.covered(&meta);
        self.snapshot = Some(meta.clone());
        Ok(meta)
    }

    fn install(&mut self, meta: SnapshotMeta, path: &Path) -> Result<(), StorageError> {
        // In a directory of its own: until it is complete, the instance in use keeps its
        // files as they were (the contract: the old state stays until `finish` succeeds).
        let (inst, generation) = self.staged(
            |e| snap_err(ErrorVerb::Write, &e),
            |w, dir| {
                let (inst, inside) = w.restore(path, dir).map_err(|e| snap_err(ErrorVerb::Read, &e))?;
                // The file must describe the snapshot openraft thinks it received.
                if inside != meta {
                    return Err(snap_err(
                        ErrorVerb::Read,
                        &format!("the received snapshot's file says {inside:?}, the leader sent {meta:?}"),
                    ));
                }
                Ok(inst)
            },
        )?;
        fs::rename(path, self.current()).map_err(|e| snap_err(ErrorVerb::Write, &e))?;
        sync_dir(&self.dir).map_err(|e| snap_err(ErrorVerb::Write, &e))?;
        tracing::info!(snapshot = %meta.snapshot_id, "snapshot installed");
        self.metrics.snapshots_installed.fetch_add(1, Ordering::Relaxed);
        self.covered(&meta);
        self.adopt(inst, generation);
        self.last_applied = meta.last_log_id;
        self.membership = meta.last_membership.clone();
        self.snapshot = Some(meta);
        self.trapped.clear();
        Ok(())
    }
}

/// The guest call one committed command makes: the index and term of the entry that
/// carried it and its bytes, under the per-command fuel budget (`Instance::apply`). Every
/// path that feeds the log to a guest goes through here (a member's apply and its
/// rebuilds, `recovery`'s install), so all of them make exactly the same calls and reach
/// the same digest. Entries without commands (blank, membership, checkpoint-only) make
/// none.
pub fn apply_command(inst: &mut Instance, log_id: &LogId, command: &[u8]) -> ApplyOutcome {
    inst.apply(log_id.index, log_id.leader_id.term, command)
}

/// Compares a restored instance's digest with the one recorded with its snapshot (none
/// for first-format files): a guest whose restore does not rebuild what its snapshot
/// wrote is refused rather than trusted.
pub fn check_restored(inst: &mut Instance, recorded: Option<&[u8]>) -> Result<(), String> {
    let Some(recorded) = recorded else { return Ok(()) };
    let restored = inst.digest().map_err(|e| format!("digest after restore: {e}"))?;
    if restored != recorded {
        return Err(format!(
            "the restored guest's digest {} differs from the one recorded with the snapshot {}: \
             its restore does not rebuild what its snapshot wrote",
            hex::encode(&restored),
            hex::encode(recorded)
        ));
    }
    Ok(())
}

/// Why a replay could not make an instance: a storage error, or a failure of this member
/// met at a command (which stops it, see [`Worker::member_failure`]).
enum Replay {
    Failed(StorageError),
    Member(u64, usize, String),
}
