//! The durable Raft log and vote.
//!
//! # On disk (`<data-dir>/log/`)
//!
//! - `<first-index>.seg`: segment files of records `[len u32 BE][crc32 u32 BE][bincode entry]`,
//!   appended in index order. A new segment starts once the current one passes
//!   [`SEGMENT_BYTES`], so purging drops whole files. A segment's records are the ones
//!   that follow each other from the index in its name: they end at the first zero
//!   header, torn record, or record of another index (left from the file's earlier use).
//! - `spare.tmp`: the next segment, written in full before it is used. On ext4,
//!   `fdatasync` after overwriting written blocks skips the journal commit that growing a
//!   file needs: measured here, 116 µs instead of 170 µs per 20 KB append, and every write
//!   waits for one on the leader and one on a follower. The spare is a purged segment
//!   when there is one (its old records are never read again: their indices are below
//!   the new name's), else a file a helper thread fills with zeros, bypassing the page
//!   cache (through it, zero-filling took about a tenth of all CPU time under load: 16 MiB
//!   per member every 1.4 s).
//! - `vote`, `purged`: small files replaced atomically (write, fsync, rename, fsync dir).
//! - `committed`: a recent committed log id, a hint for replay at restart, written without
//!   fsync and at most every [`COMMITTED_HINT_EVERY`] (a stale or lost hint only delays
//!   re-applying until the leader reports the commit index again).
//!
//! # Writing
//!
//! `append` keeps entries in memory (readable at once, as openraft requires) and writes
//! the encoded records on the calling task. Then:
//!
//! - entries a follower receives, and a leader's membership entries, are synced with
//!   `fdatasync` before they are reported flushed: the follower's answer is what the
//!   leader counts;
//! - a leader's own other entries are reported flushed at once, and the `log-sync` thread
//!   syncs them while openraft replicates them; see `durable` for why that is safe and
//!   what waits for the sync. The thread syncs once for everything written since its last
//!   sync, so it also groups a leader's appends.
//!
//! Group commit also happens one level up: the client API gathers concurrent proposals
//! into one entry (see `api`).
//!
//! A torn record at the tail of the last segment (a crash mid-write) was never reported
//! durable, so at start-up the segment's tail after its valid records is zeroed (the file
//! stays written in full). In an older segment, records that stop before the next
//! segment's first index are corruption and start-up fails.

//!
//! # Code
//!
//! - `record`: the record format, shared with the small state files (`store::files`);
//! - `segments`: reading segments back at start-up, and the writer that owns the files;
//! - `spare`: preallocating the next segment;
//! - `syncer`: the `log-sync` thread;
//! - `failpoint`: fault injection for tests (`HOST_TEST_FAILPOINT`), off unless set;
//! - this module: the in-memory log and openraft's `RaftLogStorage`.

pub mod failpoint;
pub mod record;
mod segments;
mod spare;
mod syncer;

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::fs;
use std::io;
use std::ops::RangeBounds;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use openraft::storage::{LogFlushed, LogState, RaftLogReader, RaftLogStorage};
use openraft::{ErrorSubject, ErrorVerb, OptionalSend, RaftLogId, StorageIOError};

use self::failpoint::Failpoint;
use self::record::encode_record;
pub use self::segments::SEGMENT_BYTES;
use self::segments::{load_segments, Writer};
use self::syncer::{run_syncer, SyncJob};
use super::covered::SnapshotCover;
use super::durable::Durable;
use super::files::{read_small, sync_dir, write_small};
use crate::types::{Entry, LogId, NodeId, StorageError, TypeConfig, Vote};

/// Entries kept in memory, shared by the store, its readers and the state machine
/// (which replays from it when it rebuilds a guest instance).
#[derive(Default)]
pub struct LogMem {
    pub entries: BTreeMap<u64, Entry>,
    pub last_purged: Option<LogId>,
}

pub type SharedLog = Arc<Mutex<LogMem>>;

fn lock(mem: &SharedLog) -> std::sync::MutexGuard<'_, LogMem> {
    // A panic while holding the lock cannot leave the map half-updated (every update is
    // a single insert/split), so a poisoned lock is still consistent.
    mem.lock().unwrap_or_else(|p| p.into_inner())
}

#[derive(Clone)]
pub struct LogStore {
    mem: SharedLog,
    vote: Arc<Mutex<Option<Vote>>>,
    committed: Arc<Mutex<Option<LogId>>>,
    /// The files. Every write goes through here, one at a time: openraft calls the log
    /// store from its core task only, so the lock is never contended.
    writer: Arc<Mutex<Writer>>,
    dir: PathBuf,
    durable: Durable,
    /// Set by [`LogStore::leader_writes_ahead`]: this member's id, whose own entries are
    /// reported flushed before their fsync.
    me: Option<NodeId>,
    /// Set by [`LogStore::purge_behind_snapshots`]: purges wait for a durable snapshot
    /// that covers them.
    cover: Option<SnapshotCover>,
    /// Armed only by a test, through the environment (see `failpoint`).
    failpoint: Option<Failpoint>,
}

fn io_err(subject: ErrorSubject<u64>, verb: ErrorVerb, e: &impl ToString) -> StorageError {
    StorageIOError::new(subject, verb, openraft::AnyError::error(e.to_string())).into()
}

impl LogStore {
    /// Open (or create) the log in `dir`, replaying its segments into memory.
    /// `fsync: false` is for experiments comparing against an in-memory log: a crash may
    /// then lose acknowledged writes.
    pub fn open(dir: &Path, fsync: bool) -> io::Result<Self> {
        let failpoint = Failpoint::from_env()?;
        fs::create_dir_all(dir)?;
        // Read back as not committed. openraft 0.9 makes a member whose saved vote is its
        // own committed leadership leader again at once, in the same term and without a
        // new entry; its read index is then only the committed index it recovered (the
        // hint), so entries committed and acknowledged before the restart but not yet
        // re-committed could be missing from its reads, and the lease would count its
        // old entries as "applied in its own term". Not committed, the vote still keeps
        // this member from voting twice in the term, and leadership needs a new election,
        // whose first entry commits everything before it.
        let vote: Option<Vote> = read_small::<Vote>(&dir.join("vote"))?.map(|mut v| {
            v.committed = false;
            v
        });
        let last_purged: Option<LogId> = read_small(&dir.join("purged"))?;
        // Written as `Option<LogId>`; a missing or unreadable hint just means "replay
        // nothing until the next commit".
        let committed: Option<LogId> = read_small::<Option<LogId>>(&dir.join("committed")).ok().flatten().flatten();
        let (segments, entries, offsets) = load_segments(dir, last_purged)?;
        // What an earlier process wrote may still be only in the page cache; from here on
        // it counts as durable: the last segment's data, and the directory, which may
        // hold a segment created or a file renamed by a process killed before it synced
        // the directory.
        if let Some(seg) = segments.last() {
            seg.file.sync_data()?;
        }
        sync_dir(dir)?;
        let last = entries.last_key_value().map(|(_, e)| *e.get_log_id()).or(last_purged);
        // A hint is written no further than the durable log, but an entry it names can
        // still be gone if the log was cut back since (a conflicting leader's entries).
        let committed = committed.filter(|c| {
            last_purged.is_some_and(|p| c.index <= p.index)
                || entries.get(&c.index).is_some_and(|e| e.get_log_id() == c)
        });
        let mem = Arc::new(Mutex::new(LogMem { entries, last_purged }));
        let writer = Arc::new(Mutex::new(Writer::new(dir, segments, offsets, fsync)));
        Ok(LogStore {
            mem,
            vote: Arc::new(Mutex::new(vote)),
            committed: Arc::new(Mutex::new(committed)),
            writer,
            dir: dir.to_path_buf(),
            durable: Durable::new(last),
            me: None,
            cover: None,
            failpoint,
        })
    }

    /// Report this member's own entries, as leader, flushed before their fsync, which a
    /// `log-sync` thread then runs (see `durable`). Without fsync there is nothing to
    /// overlap.
    pub fn leader_writes_ahead(mut self, me: NodeId) -> io::Result<Self> {
        let mut w = self.writer();
        if w.fsync && w.syncer.is_none() {
            let (tx, rx) = std::sync::mpsc::channel::<SyncJob>();
            let durable = self.durable.clone();
            std::thread::Builder::new().name("log-sync".into()).spawn(move || run_syncer(&rx, &durable))?;
            w.syncer = Some(tx);
        }
        drop(w);
        self.me = Some(me);
        Ok(self)
    }

    /// Purge only what a snapshot on disk covers (see `covered`), as a member must. Off,
    /// the log purges whatever it is asked to (openraft's storage suite purges without
    /// any snapshot).
    pub fn purge_behind_snapshots(mut self) -> Self {
        self.cover = Some(SnapshotCover::default());
        self
    }

    /// What the state machine reports its durable snapshots to, if purges wait for them.
    pub fn snapshot_cover(&self) -> Option<SnapshotCover> {
        self.cover.clone()
    }

    /// How far the log is on disk.
    pub fn durable(&self) -> Durable {
        self.durable.clone()
    }

    /// Whether `entries` may be reported flushed before their fsync: they are this
    /// member's own, made as the leader of the current (committed) vote, and none is a
    /// membership change.
    fn may_write_ahead(&self, entries: &[Entry]) -> bool {
        let Some(me) = self.me else {
            return false;
        };
        let Some(vote) = *self.vote.lock().unwrap_or_else(|p| p.into_inner()) else {
            return false;
        };
        vote.is_committed()
            && vote.leader_id().node_id == me
            && entries.iter().all(|e| {
                e.get_log_id().leader_id == *vote.leader_id()
                    && !matches!(e.payload, openraft::EntryPayload::Membership(_))
            })
    }

    /// `append` without openraft's callback: `Ok` once the entries may be reported flushed.
    fn write_entries(&self, entries: Vec<Entry>) -> io::Result<()> {
        let (Some(first), Some(last)) = (entries.first(), entries.last()) else {
            return Ok(());
        };
        let (first, last) = (first.get_log_id().index, *last.get_log_id());
        if let (Some(failpoint), Some(me)) = (self.failpoint, self.me) {
            if failpoint.reached(me, &entries, &lock(&self.mem).entries) {
                failpoint.fire();
            }
        }
        let ahead = self.may_write_ahead(&entries);
        let mut records = Vec::new();
        for entry in &entries {
            encode_record(entry, &mut records).map_err(io::Error::other)?;
        }
        lock(&self.mem).entries.extend(entries.into_iter().map(|e| (e.get_log_id().index, e)));
        let mut w = self.writer();
        let generation = self.durable.generation();
        w.append(&records, first, last.index)?;
        match &w.syncer {
            Some(syncer) if ahead => {
                // Before openraft hears of them, so nothing applies them early.
                self.durable.ahead(last.index);
                let file = w.segments.last().map(|s| s.file.clone());
                let job = SyncJob { file, upto: last, generation };
                syncer.send(job).map_err(|_| io::Error::other("the log-sync thread stopped"))
            }
            _ => {
                w.sync()?;
                self.durable.advance(last, generation);
                Ok(())
            }
        }
    }

    /// Appends `entry` durably outside openraft, before Raft starts on this log: for the
    /// membership entry of a forced new cluster (`node::force_new_cluster`).
    pub fn append_before_start(&self, entry: Entry) -> io::Result<()> {
        self.write_entries(vec![entry])
    }

    pub fn shared(&self) -> SharedLog {
        self.mem.clone()
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn writer(&self) -> MutexGuard<'_, Writer> {
        // Every operation leaves the files consistent or returns an error first.
        self.writer.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn entries_in<RB: RangeBounds<u64>>(mem: &SharedLog, range: RB) -> Vec<Entry> {
    lock(mem).entries.range(range).map(|(_, e)| e.clone()).collect()
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        Ok(entries_in(&self.mem, range))
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let mem = lock(&self.mem);
        let last_purged_log_id = mem.last_purged;
        let last_log_id = mem.entries.last_key_value().map(|(_, e)| *e.get_log_id()).or(last_purged_log_id);
        Ok(LogState { last_purged_log_id, last_log_id })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), StorageError> {
        let v = *vote;
        let path = self.dir.join("vote");
        write_small(&path, &v).map_err(|e| io_err(ErrorSubject::Vote, ErrorVerb::Write, &e))?;
        *self.vote.lock().unwrap_or_else(|p| p.into_inner()) = Some(v);
        Ok(())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, StorageError> {
        Ok(*self.vote.lock().unwrap_or_else(|p| p.into_inner()))
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        *self.committed.lock().unwrap_or_else(|p| p.into_inner()) = committed;
        // Only a hint for replay at restart: a failure to record it is not the log's. It
        // must not name an entry that a crash could take from the log.
        if let Err(e) = self.writer().write_committed(self.durable.clamp(committed)) {
            tracing::warn!(error = %e, "could not record the committed index");
        }
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        Ok(*self.committed.lock().unwrap_or_else(|p| p.into_inner()))
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let res = self.write_entries(entries.into_iter().collect());
        callback.log_io_completed(res);
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let last = {
            let mut mem = lock(&self.mem);
            mem.entries.split_off(&log_id.index);
            mem.entries.last_key_value().map(|(_, e)| *e.get_log_id()).or(mem.last_purged)
        };
        let mut w = self.writer();
        w.truncate(log_id.index).map_err(|e| io_err(ErrorSubject::Logs, ErrorVerb::Write, &e))?;
        // The cut was synced, and with it everything before it.
        self.durable.cut(last);
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        if let Some(cover) = &self.cover {
            cover.wait_covers(log_id.index).await.map_err(|e| io_err(ErrorSubject::Logs, ErrorVerb::Delete, &e))?;
        }
        {
            let mut mem = lock(&self.mem);
            let keep = mem.entries.split_off(&(log_id.index + 1));
            mem.entries = keep;
            mem.last_purged = Some(log_id);
        }
        self.writer().purge(log_id).map_err(|e| io_err(ErrorSubject::Logs, ErrorVerb::Write, &e))
    }
}

#[cfg(test)]
mod tests;
