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

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::ops::RangeBounds;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use openraft::storage::{LogFlushed, LogState, RaftLogReader, RaftLogStorage};
use openraft::{ErrorSubject, ErrorVerb, OptionalSend, RaftLogId, StorageIOError};
use serde::{de::DeserializeOwned, Serialize};

use super::covered::SnapshotCover;
use super::durable::Durable;
use crate::types::{Entry, LogId, NodeId, StorageError, TypeConfig, Vote};

/// Segment size at which the writer starts a new file.
pub const SEGMENT_BYTES: u64 = 16 * 1024 * 1024;
const SPARE: &str = "spare.tmp";
/// How often the committed hint is rewritten at most: it is recorded on every commit,
/// on the path of every write.
const COMMITTED_HINT_EVERY: std::time::Duration = std::time::Duration::from_millis(50);
const RECORD_HEADER: usize = 8;

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
}

fn io_err(subject: ErrorSubject<u64>, verb: ErrorVerb, e: &impl ToString) -> StorageError {
    StorageIOError::new(subject, verb, openraft::AnyError::error(e.to_string())).into()
}

impl LogStore {
    /// Open (or create) the log in `dir`, replaying its segments into memory.
    /// `fsync: false` is for experiments comparing against an in-memory log: a crash may
    /// then lose acknowledged writes.
    pub fn open(dir: &Path, fsync: bool) -> io::Result<Self> {
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

fn encode_record<T: Serialize>(value: &T, out: &mut Vec<u8>) -> Result<(), bincode::Error> {
    let start = out.len();
    out.extend_from_slice(&[0u8; RECORD_HEADER]);
    bincode::serialize_into(&mut *out, value)?;
    let len = (out.len() - start - RECORD_HEADER) as u32;
    let crc = crc32fast::hash(&out[start + RECORD_HEADER..]);
    out[start..start + 4].copy_from_slice(&len.to_be_bytes());
    out[start + 4..start + 8].copy_from_slice(&crc.to_be_bytes());
    Ok(())
}

/// Decode the records in `data`; returns them with their offsets and the length of the
/// valid prefix (shorter than `data` when the tail is torn or corrupt). A record whose
/// checksum matches but which does not decode is no torn write, and is an error: treating
/// it as one would zero the rest of the log (written by another version, or a bug).
fn decode_records<T: DeserializeOwned>(data: &[u8]) -> io::Result<(Vec<(u64, T)>, usize)> {
    let mut out = Vec::new();
    let mut pos = 0usize;
    while data.len() - pos >= RECORD_HEADER {
        let len = u32::from_be_bytes([data[pos], data[pos + 1], data[pos + 2], data[pos + 3]]) as usize;
        let crc = u32::from_be_bytes([data[pos + 4], data[pos + 5], data[pos + 6], data[pos + 7]]);
        let body = pos + RECORD_HEADER;
        // A zero length is the preallocated (zeroed) rest of a segment, not a record.
        if len == 0 || data.len() - body < len || crc32fast::hash(&data[body..body + len]) != crc {
            break;
        }
        match bincode::deserialize(&data[body..body + len]) {
            Ok(v) => out.push((pos as u64, v)),
            Err(e) => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "the record at byte {pos} is intact but cannot be decoded ({e}): written by another version?"
                    ),
                ))
            }
        }
        pos = body + len;
    }
    Ok((out, pos))
}

/// Small state files: one record, replaced atomically.
fn read_small<T: DeserializeOwned>(path: &Path) -> io::Result<Option<T>> {
    let data = match fs::read(path) {
        Ok(d) => d,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let (mut records, _) =
        decode_records::<T>(&data).map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
    match records.pop() {
        Some((_, v)) => Ok(Some(v)),
        None => Err(io::Error::new(io::ErrorKind::InvalidData, format!("{} is corrupt", path.display()))),
    }
}

fn write_small<T: Serialize>(path: &Path, value: &T) -> io::Result<()> {
    let mut data = Vec::new();
    encode_record(value, &mut data).map_err(io::Error::other)?;
    write_file_durably(path, &data)
}

/// Replace `path` with `data` so that a crash leaves either the old or the new content.
pub fn write_file_durably(path: &Path, data: &[u8]) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    {
        let mut f = File::create(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, path)?;
    sync_dir(path.parent().unwrap_or(Path::new(".")))
}

pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

fn segment_name(first: u64) -> String {
    format!("{first:020}.seg")
}

struct Segment {
    first: u64,
    /// One past the index of its last record: the only index an append may continue it at.
    next: u64,
    /// Shared with the `log-sync` thread, which syncs it.
    file: Arc<File>,
    len: u64,
}

/// Sync the log through `upto`, which `file` holds (earlier segments were synced
/// before `file` was started).
struct SyncJob {
    file: Option<Arc<File>>,
    upto: LogId,
    generation: u64,
}

/// One `fdatasync` for all the jobs that queued up while the last one ran.
fn run_syncer(rx: &std::sync::mpsc::Receiver<SyncJob>, durable: &Durable) {
    while let Ok(mut job) = rx.recv() {
        while let Ok(later) = rx.try_recv() {
            job = later;
        }
        match job.file.as_deref().map_or(Ok(()), File::sync_data) {
            Ok(()) => durable.advance(job.upto, job.generation),
            Err(e) => {
                tracing::error!(error = %e, "log fsync failed; this member stops applying");
                durable.fail();
                return;
            }
        }
    }
}

type Loaded = (Vec<Segment>, BTreeMap<u64, Entry>, BTreeMap<u64, (u64, u64)>);

fn load_segments(dir: &Path, last_purged: Option<LogId>) -> io::Result<Loaded> {
    let mut firsts: Vec<u64> = fs::read_dir(dir)?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            name.strip_suffix(".seg")?.parse().ok()
        })
        .collect();
    firsts.sort_unstable();
    let mut segments = Vec::new();
    let mut entries = BTreeMap::new();
    let mut offsets = BTreeMap::new();
    for (i, &first) in firsts.iter().enumerate() {
        let path = dir.join(segment_name(first));
        let mut file = OpenOptions::new().read(true).write(true).open(&path)?;
        let mut data = Vec::new();
        file.read_to_end(&mut data)?;
        let (mut records, mut valid) =
            decode_records::<Entry>(&data).map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
        // Records left from a recycled file's earlier use have other (lower) indices.
        if let Some(stale) = records.iter().zip(first..).position(|((_, e), want)| e.get_log_id().index != want) {
            valid = records[stale].0 as usize;
            records.truncate(stale);
        }
        let next = first + records.len() as u64;
        match firsts.get(i + 1) {
            Some(&want) if next == want => {}
            // A gap is where a purge went past the end of the log (a snapshot installed
            // ahead of it) and the next append started a segment of its own: everything
            // missing is purged, so nothing before the gap is read. Any other gap or
            // overlap is corruption.
            Some(&want) if next < want && last_purged.is_some_and(|p| want - 1 <= p.index) => {}
            Some(&want) => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "{}: records end at index {next}, the next segment starts at {want}{}",
                        path.display(),
                        match last_purged {
                            Some(p) => format!(" (purged up to {})", p.index),
                            None => " (nothing purged)".to_string(),
                        }
                    ),
                ));
            }
            // The last segment's valid records end where a crash stopped a write, or
            // where a recycled file's old content starts. Zero the rest, keeping the file
            // written in full: past a torn record there may be later records of this
            // use that were never synced, and once new records are written over the torn
            // one, one of those could line up as their successor.
            None if data[valid..].iter().any(|b| *b != 0) => {
                tracing::info!(segment = %path.display(), from = valid, "zeroing the tail of the log's last segment");
                file.write_all_at(&vec![0u8; data.len() - valid], valid as u64)?;
                file.sync_data()?;
            }
            None => {}
        }
        for (offset, entry) in records {
            let index = entry.get_log_id().index;
            offsets.insert(index, (first, offset));
            // Index 0 exists (openraft's initial membership), so "nothing purged" is
            // `None`, not 0.
            if last_purged.is_none_or(|p| index > p.index) {
                entries.insert(index, entry);
            }
        }
        segments.push(Segment { first, next, file: Arc::new(file), len: valid as u64 });
    }
    Ok((segments, entries, offsets))
}

/// Owns the files.
struct Writer {
    dir: PathBuf,
    segments: Vec<Segment>,
    /// index -> (segment first index, byte offset), for truncation.
    offsets: BTreeMap<u64, (u64, u64)>,
    fsync: bool,
    /// Kept open, with its length: the hint is rewritten up to every
    /// [`COMMITTED_HINT_EVERY`] under load.
    committed_file: Option<(File, u64)>,
    /// When the hint was last written.
    committed_written: Option<std::time::Instant>,
    /// The next segment: a purged one, or one a helper thread zero-fills once the current
    /// one is half full.
    spare: Option<Spare>,
    /// To the `log-sync` thread, when the leader writes ahead of its fsync.
    syncer: Option<std::sync::mpsc::Sender<SyncJob>>,
}

enum Spare {
    Zeroing(std::thread::JoinHandle<io::Result<File>>),
    Recycled(Arc<File>),
}

/// Creates `dir/spare.tmp` filled with zeros, durably.
fn make_spare(dir: &Path) -> io::Result<File> {
    let path = dir.join(SPARE);
    let file = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path)?;
    // Bypassing the page cache: copying 16 MiB of zeros into it, then writing it back,
    // took as much CPU as a tenth of all operations under load. Where O_DIRECT is
    // refused (tmpfs, some overlay setups), the ordinary way.
    if zero_fill_direct(&path).is_err() {
        let zeros = vec![0u8; 1 << 20];
        for i in 0..SEGMENT_BYTES / zeros.len() as u64 {
            file.write_all_at(&zeros, i * zeros.len() as u64)?;
        }
    }
    file.sync_all()?;
    Ok(file)
}

fn zero_fill_direct(path: &Path) -> io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    const CHUNK: usize = 1 << 20;
    const ALIGN: usize = 4096;
    // O_DIRECT wants the buffer aligned to the device's block size; a page is enough.
    let buf = vec![0u8; CHUNK + ALIGN];
    let start = buf.as_ptr().align_offset(ALIGN);
    let zeros = buf.get(start..start + CHUNK).ok_or_else(|| io::Error::other("cannot align a buffer"))?;
    let file = OpenOptions::new().write(true).custom_flags(libc::O_DIRECT).open(path)?;
    for i in 0..SEGMENT_BYTES / CHUNK as u64 {
        file.write_all_at(zeros, i * CHUNK as u64)?;
    }
    Ok(())
}

impl Writer {
    fn new(dir: &Path, segments: Vec<Segment>, offsets: BTreeMap<u64, (u64, u64)>, fsync: bool) -> Self {
        Writer {
            dir: dir.to_path_buf(),
            segments,
            offsets,
            fsync,
            committed_file: None,
            committed_written: None,
            spare: None,
            syncer: None,
        }
    }

    /// Make everything written durable.
    fn sync(&self) -> io::Result<()> {
        match self.segments.last() {
            Some(seg) if self.fsync => seg.file.sync_data(),
            _ => Ok(()),
        }
    }

    /// The file for a segment starting at `first`: the spare if one was made, else a new
    /// empty file.
    fn new_segment_file(&mut self, first: u64) -> io::Result<Arc<File>> {
        let path = self.dir.join(segment_name(first));
        let spare = match self.spare.take() {
            Some(Spare::Recycled(file)) => Some(file),
            Some(Spare::Zeroing(thread)) => match thread.join() {
                Ok(Ok(file)) => Some(Arc::new(file)),
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "could not preallocate a log segment");
                    None
                }
                Err(_) => {
                    tracing::warn!("the log segment preallocation thread panicked");
                    None
                }
            },
            None => None,
        };
        if let Some(file) = spare {
            fs::rename(self.dir.join(SPARE), &path)?;
            return Ok(file);
        }
        Ok(Arc::new(OpenOptions::new().read(true).write(true).create(true).truncate(true).open(path)?))
    }

    fn append(&mut self, records: &[u8], first: u64, last: u64) -> io::Result<()> {
        if self.spare.is_none() && self.segments.last().is_some_and(|s| s.len >= SEGMENT_BYTES / 2) {
            let dir = self.dir.clone();
            self.spare = std::thread::Builder::new()
                .name("log-prealloc".into())
                .spawn(move || make_spare(&dir))
                .ok()
                .map(Spare::Zeroing);
        }
        // A segment's records follow each other from the index in its name, and start-up
        // reads nothing past the first one that does not: an append that does not continue
        // the last segment (the first after a purge past the end of the log, when a
        // snapshot was installed ahead of it) starts a segment of its own.
        let continues = match self.segments.last() {
            Some(s) if s.next == first => true,
            Some(s) if s.next > first => {
                // openraft truncates before it overwrites; writing here would hide the
                // records after `first` from start-up.
                return Err(io::Error::other(format!(
                    "append at index {first} overlaps the log, which ends at {}",
                    s.next - 1
                )));
            }
            _ => false,
        };
        let need_new = !continues || self.segments.last().is_none_or(|s| s.len >= SEGMENT_BYTES);
        if need_new {
            // The previous segment must be durable before a later one can exist.
            if let Some(seg) = self.segments.last() {
                seg.file.sync_data()?;
            }
            let file = self.new_segment_file(first)?;
            sync_dir(&self.dir)?;
            self.segments.push(Segment { first, next: first, file, len: 0 });
        }
        let Some(seg) = self.segments.last_mut() else {
            return Err(io::Error::other("no segment"));
        };
        seg.file.write_all_at(records, seg.len)?;
        // Offsets are recomputed from the records' own lengths: cheaper than having the
        // caller send them along.
        let mut pos = 0usize;
        let mut index = first;
        while pos < records.len() {
            let len = u32::from_be_bytes([records[pos], records[pos + 1], records[pos + 2], records[pos + 3]]) as usize;
            self.offsets.insert(index, (seg.first, seg.len + pos as u64));
            pos += RECORD_HEADER + len;
            index += 1;
        }
        debug_assert_eq!(index, last + 1);
        seg.len += records.len() as u64;
        seg.next = last + 1;
        Ok(())
    }

    fn truncate(&mut self, since: u64) -> io::Result<()> {
        let Some(&(seg_first, offset)) = self.offsets.get(&since) else {
            // Nothing to cut, but the caller counts everything left as synced.
            return self.sync();
        };
        self.offsets.split_off(&since);
        let mut removed = false;
        while let Some(seg) = self.segments.last() {
            if seg.first > seg_first {
                fs::remove_file(self.dir.join(segment_name(seg.first)))?;
                self.segments.pop();
                removed = true;
            } else {
                break;
            }
        }
        // Before the cut segment changes: a removed later segment that came back after a
        // crash would hold entries the cut one no longer leads up to.
        if removed {
            sync_dir(&self.dir)?;
        }
        if let Some(seg) = self.segments.last_mut() {
            seg.file.set_len(offset)?;
            seg.file.sync_all()?;
            seg.len = offset;
            seg.next = since;
        }
        Ok(())
    }

    fn purge(&mut self, upto: LogId) -> io::Result<()> {
        // Record the purge first: if we crash between the two steps, start-up skips the
        // purged entries still on disk instead of finding a hole.
        write_small(&self.dir.join("purged"), &upto)?;
        // A segment can go once all its entries are purged, the last one too: a purge can
        // go past the end of the log (a snapshot installed ahead of it), and the next
        // append then starts a segment of its own.
        while self.segments.first().is_some_and(|s| s.next <= upto.index + 1) {
            let seg = self.segments.remove(0);
            let path = self.dir.join(segment_name(seg.first));
            // A full segment is written in full: keep it as the next one.
            if self.spare.is_none() && seg.len >= SEGMENT_BYTES {
                fs::rename(&path, self.dir.join(SPARE))?;
                self.spare = Some(Spare::Recycled(seg.file));
            } else {
                fs::remove_file(path)?;
            }
        }
        let keep = self.offsets.split_off(&(upto.index + 1));
        self.offsets = keep;
        Ok(())
    }

    /// Record `committed` as the hint, unless one was written less than
    /// [`COMMITTED_HINT_EVERY`] ago.
    fn write_committed(&mut self, committed: Option<LogId>) -> io::Result<()> {
        if self.committed_written.is_some_and(|t| t.elapsed() < COMMITTED_HINT_EVERY) {
            return Ok(());
        }
        self.committed_written = Some(std::time::Instant::now());
        let mut data = Vec::new();
        encode_record(&committed, &mut data).map_err(io::Error::other)?;
        let (f, len) = match &mut self.committed_file {
            Some(f) => f,
            None => self.committed_file.insert((
                OpenOptions::new().write(true).create(true).truncate(false).open(self.dir.join("committed"))?,
                u64::MAX,
            )),
        };
        f.write_all_at(&data, 0)?;
        // The record has one size once a commit is known: cut only when it changes.
        if *len != data.len() as u64 {
            f.set_len(data.len() as u64)?;
            *len = data.len() as u64;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::Request;
    use openraft::{CommittedLeaderId, EntryPayload};
    use std::collections::BTreeSet;

    fn entry(term: u64, index: u64, cmd: &str) -> Entry {
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(term, 1), index),
            payload: EntryPayload::Normal(Request::commands(vec![cmd.as_bytes().to_vec()])),
        }
    }

    #[tokio::test]
    async fn records_survive_reopen_and_torn_tail_is_zeroed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut data = Vec::new();
        // From index 0: openraft's first entry (the initial membership) has index 0.
        for i in 0..5 {
            encode_record(&entry(1, i, &format!("set-{i}-x")), &mut data).expect("encode");
        }
        let full = data.len();
        // A torn tail: half of a sixth record.
        let mut sixth = Vec::new();
        encode_record(&entry(1, 5, "set-5-x"), &mut sixth).expect("encode");
        data.extend_from_slice(&sixth[..sixth.len() / 2]);
        fs::write(dir.path().join(segment_name(0)), &data).expect("write");

        let mut store = LogStore::open(dir.path(), true).expect("open");
        let got = store.try_get_log_entries(..).await.expect("read");
        assert_eq!(got.len(), 5);
        assert_eq!(got[0], entry(1, 0, "set-0-x"));
        assert_eq!(got[4], entry(1, 4, "set-4-x"));
        let data = fs::read(dir.path().join(segment_name(0))).expect("read");
        assert!(data[full..].iter().all(|b| *b == 0), "the torn record was zeroed");
    }

    #[tokio::test]
    async fn corruption_in_an_older_segment_fails_start_up() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut a = Vec::new();
        encode_record(&entry(1, 1, "a"), &mut a).expect("encode");
        let last = a.len() - 1;
        a[last] ^= 0xff;
        fs::write(dir.path().join(segment_name(1)), &a).expect("write");
        let mut b = Vec::new();
        encode_record(&entry(1, 2, "b"), &mut b).expect("encode");
        fs::write(dir.path().join(segment_name(2)), &b).expect("write");
        let err = LogStore::open(dir.path(), true).err().expect("must fail");
        assert!(err.to_string().contains("records end at index 1, the next segment starts at 2"), "{err}");
    }

    #[tokio::test]
    async fn truncate_and_purge_persist() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let mut w = Writer::new(dir.path(), Vec::new(), BTreeMap::new(), true);
            // Three segments of 10 entries each, written through the writer itself.
            for seg in 0..3u64 {
                let mut records = Vec::new();
                for i in 1..=10 {
                    encode_record(&entry(1, seg * 10 + i, "x"), &mut records).expect("encode");
                }
                w.append(&records, seg * 10 + 1, seg * 10 + 10).expect("append");
                w.segments.last_mut().expect("segment").len = SEGMENT_BYTES;
            }
            w.truncate(25).expect("truncate");
            w.purge(LogId::new(CommittedLeaderId::new(1, 1), 12)).expect("purge");
            assert_eq!(w.segments.len(), 2, "segment 1..10 is gone");
        }
        let mut store = LogStore::open(dir.path(), true).expect("reopen");
        let state = store.get_log_state().await.expect("state");
        assert_eq!(state.last_purged_log_id.map(|l| l.index), Some(12));
        assert_eq!(state.last_log_id.map(|l| l.index), Some(24));
        let got = store.try_get_log_entries(..).await.expect("read");
        assert_eq!(got.first().map(|e| e.log_id.index), Some(13));
        assert_eq!(got.len(), 12);
    }

    fn records(range: std::ops::RangeInclusive<u64>) -> Vec<u8> {
        let mut out = Vec::new();
        for i in range {
            encode_record(&entry(1, i, &format!("set-{i}-x")), &mut out).expect("encode");
        }
        out
    }

    #[tokio::test]
    async fn preallocated_segments_hold_records_and_zero_torn_ones() {
        let dir = tempfile::tempdir().expect("tempdir");
        let second = dir.path().join(segment_name(11));
        {
            let mut w = Writer::new(dir.path(), Vec::new(), BTreeMap::new(), true);
            w.append(&records(1..=10), 1, 10).expect("append");
            // As if the first segment were full: the next append starts the spare and
            // moves on to it.
            w.segments.last_mut().expect("segment").len = SEGMENT_BYTES;
            w.append(&records(11..=20), 11, 20).expect("append");
            assert_eq!(fs::metadata(&second).expect("meta").len(), SEGMENT_BYTES, "the spare became segment 11");
        }
        let valid = records(11..=20).len();
        {
            let mut store = LogStore::open(dir.path(), true).expect("reopen");
            let got = store.try_get_log_entries(..).await.expect("read");
            assert_eq!(got.len(), 20);
            assert_eq!(got[19], entry(1, 20, "set-20-x"));
            assert_eq!(fs::metadata(&second).expect("meta").len(), SEGMENT_BYTES, "zeros are not a torn tail");
        }
        // A crash in the middle of writing record 21 into the zeroed space.
        let torn = records(21..=21);
        let f = OpenOptions::new().write(true).open(&second).expect("open");
        f.write_all_at(&torn[..torn.len() / 2], valid as u64).expect("write");
        drop(f);
        let mut store = LogStore::open(dir.path(), true).expect("reopen after the torn write");
        let got = store.try_get_log_entries(..).await.expect("read");
        assert_eq!(got.len(), 20, "the torn record is gone");
        let data = fs::read(&second).expect("read");
        assert_eq!(data.len() as u64, SEGMENT_BYTES, "still written in full");
        assert!(data[valid..].iter().all(|b| *b == 0), "the torn record was zeroed");
    }

    #[tokio::test]
    async fn purged_segments_are_reused_and_their_old_records_never_read() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = dir.path().join(segment_name(1));
        let third = dir.path().join(segment_name(21));
        {
            let mut w = Writer::new(dir.path(), Vec::new(), BTreeMap::new(), true);
            // Segment 1..=10 is written in full (records, then filler a full segment
            // would have), so it can be reused.
            w.append(&records(1..=10), 1, 10).expect("append");
            let seg = w.segments.last_mut().expect("segment");
            seg.file.write_all_at(&[7u8; 64], seg.len).expect("filler");
            seg.len = SEGMENT_BYTES;
            w.append(&records(11..=20), 11, 20).expect("append");
            w.segments.last_mut().expect("segment").len = SEGMENT_BYTES;
            w.purge(LogId::new(CommittedLeaderId::new(1, 1), 10)).expect("purge");
            assert!(!first.exists() && matches!(w.spare, Some(Spare::Recycled(_))), "kept as the spare");
            // Fewer bytes than segment 1 held: its records 4..=10 are still in the file.
            w.append(&records(21..=23), 21, 23).expect("append");
            assert!(third.exists());
        }
        let old = records(1..=10);
        let data = fs::read(&third).expect("read");
        assert!(data.len() >= old.len() && data[records(21..=23).len()..old.len()].iter().any(|b| *b != 0));
        let mut store = LogStore::open(dir.path(), true).expect("reopen");
        let got = store.try_get_log_entries(..).await.expect("read");
        let indices: Vec<u64> = got.iter().map(|e| e.log_id.index).collect();
        assert_eq!(indices, (11..=23).collect::<Vec<_>>(), "no record of the file's earlier use");
        let data = fs::read(&third).expect("read");
        assert!(data[records(21..=23).len()..].iter().all(|b| *b == 0), "the old records were zeroed");
    }

    /// An intact record that does not decode is not a torn tail: zeroing from there would
    /// throw away every entry after it.
    #[tokio::test]
    async fn an_intact_record_that_does_not_decode_fails_start_up() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut data = records(1..=3);
        // A record of another format: valid length and checksum, not an `Entry`.
        encode_record(&"not an entry", &mut data).expect("encode");
        data.extend_from_slice(&records(5..=6));
        fs::write(dir.path().join(segment_name(1)), &data).expect("write");
        let err = LogStore::open(dir.path(), true).err().expect("must fail");
        assert!(err.to_string().contains("intact but cannot be decoded"), "{err}");
        assert_eq!(fs::read(dir.path().join(segment_name(1))).expect("read"), data, "nothing was zeroed");
    }

    fn log_id(index: u64) -> LogId {
        LogId::new(CommittedLeaderId::new(1, 1), index)
    }

    async fn indices(dir: &Path) -> (Option<u64>, Vec<u64>) {
        let mut store = LogStore::open(dir, true).expect("reopen");
        let state = store.get_log_state().await.expect("state");
        let got = store.try_get_log_entries(..).await.expect("read");
        (state.last_purged_log_id.map(|l| l.index), got.iter().map(|e| e.log_id.index).collect())
    }

    /// A follower that installs a snapshot ahead of its log purges past its last entry,
    /// then appends from the snapshot on: those entries must survive a restart.
    #[tokio::test]
    async fn entries_appended_after_a_purge_past_the_end_survive_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let mut store = LogStore::open(dir.path(), true).expect("open");
            store.write_entries((1..=10).map(|i| entry(1, i, "x")).collect()).expect("append");
            store.purge(log_id(20)).await.expect("purge");
            store.write_entries((21..=25).map(|i| entry(1, i, "y")).collect()).expect("append");
        }
        assert_eq!(indices(dir.path()).await, (Some(20), (21..=25).collect()));
        // And again after more appends and a second restart, through a reused segment.
        {
            let mut store = LogStore::open(dir.path(), true).expect("open");
            store.write_entries((26..=30).map(|i| entry(1, i, "z")).collect()).expect("append");
            store.purge(log_id(40)).await.expect("purge");
            store.write_entries((41..=42).map(|i| entry(1, i, "w")).collect()).expect("append");
        }
        assert_eq!(indices(dir.path()).await, (Some(40), vec![41, 42]));
    }

    /// A purge past the end recorded, then a crash before the old segment was removed:
    /// the gap before the new segment is all purged, so start-up accepts it. A gap with
    /// entries missing that were never purged is corruption.
    #[tokio::test]
    async fn start_up_accepts_a_gap_exactly_when_it_is_purged() {
        let dir = tempfile::tempdir().expect("tempdir");
        fs::write(dir.path().join(segment_name(1)), records(1..=10)).expect("write");
        fs::write(dir.path().join(segment_name(21)), records(21..=25)).expect("write");
        write_small(&dir.path().join("purged"), &log_id(20)).expect("purged");
        assert_eq!(indices(dir.path()).await, (Some(20), (21..=25).collect()));

        write_small(&dir.path().join("purged"), &log_id(19)).expect("purged");
        let err = LogStore::open(dir.path(), true).err().expect("entry 20 is missing and not purged");
        assert!(err.to_string().contains("records end at index 11, the next segment starts at 21"), "{err}");
    }

    /// Every segment a purge covers goes, the last one too, and an append that does not
    /// follow the last segment starts a new one; an append into the log is refused.
    #[tokio::test]
    async fn appends_that_do_not_follow_on_start_a_segment() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut w = Writer::new(dir.path(), Vec::new(), BTreeMap::new(), true);
        w.append(&records(1..=10), 1, 10).expect("append");
        w.purge(log_id(20)).expect("purge");
        assert!(w.segments.is_empty(), "segment 1..=10 is entirely purged");
        assert!(!dir.path().join(segment_name(1)).exists());
        w.append(&records(21..=22), 21, 22).expect("append");
        // What start-up relies on after a crash between recording a purge and removing the
        // segments it covers (openraft's storage suite also appends with gaps).
        w.append(&records(30..=31), 30, 31).expect("append");
        let firsts: Vec<u64> = w.segments.iter().map(|s| s.first).collect();
        assert_eq!(firsts, vec![21, 30]);
        let err = w.append(&records(31..=31), 31, 31).expect_err("31 is already there");
        assert!(err.to_string().contains("overlaps"), "{err}");
    }

    /// openraft purges for an installed snapshot while the install still runs: the purge
    /// must not reach the disk before the snapshot does, nor at all if the install fails.
    #[tokio::test]
    async fn purge_waits_for_a_snapshot_on_disk_that_covers_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = LogStore::open(dir.path(), true).expect("open").purge_behind_snapshots();
        let cover = store.snapshot_cover().expect("purges wait for snapshots");
        store.write_entries((0..=10).map(|i| entry(1, i, "x")).collect()).expect("append");
        cover.advance(Some(4));
        store.clone().purge(log_id(4)).await.expect("covered already");

        let purge = tokio::spawn({
            let mut store = store.clone();
            async move { store.purge(log_id(30)).await }
        });
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(!purge.is_finished(), "no snapshot covers 30 yet");
        assert_eq!(read_small::<LogId>(&dir.path().join("purged")).expect("read"), Some(log_id(4)));
        assert_eq!(indices(dir.path()).await, (Some(4), (5..=10).collect()), "the log is intact on disk");
        cover.advance(Some(30));
        purge.await.expect("join").expect("purged once covered");
        assert_eq!(read_small::<LogId>(&dir.path().join("purged")).expect("read"), Some(log_id(30)));

        let purge = tokio::spawn({
            let mut store = store.clone();
            async move { store.purge(log_id(50)).await }
        });
        cover.fail("guest restore failed".into());
        assert!(purge.await.expect("join").is_err(), "the install failed: nothing to purge behind");
        assert_eq!(read_small::<LogId>(&dir.path().join("purged")).expect("read"), Some(log_id(30)));
    }

    /// A store that takes `entries` as openraft's append does, without its callback.
    fn store_with_vote(dir: &Path, vote: Vote) -> LogStore {
        let store = LogStore::open(dir, true).expect("open").leader_writes_ahead(1).expect("writes ahead");
        *store.vote.lock().expect("vote") = Some(vote);
        store
    }

    fn leader_entry(term: u64, node: u64, index: u64) -> Entry {
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(term, node), index),
            payload: EntryPayload::Normal(Request::commands(vec![b"x".to_vec()])),
        }
    }

    #[tokio::test]
    async fn only_the_leaders_own_entries_are_reported_before_their_sync() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut leading = Vote::new(2, 1);
        leading.commit();
        let store = store_with_vote(dir.path(), leading);
        let durable = store.durable();

        // Node 1 leads term 2: its entries are written ahead and synced by the thread.
        store.write_entries(vec![leader_entry(2, 1, 1), leader_entry(2, 1, 2)]).expect("write");
        assert_eq!(durable.written_ahead(), Some(2));
        durable.wait_for(2).await.expect("synced");
        assert_eq!(durable.upto().map(|l| l.index), Some(2));

        // A membership change is synced before it is reported.
        let membership = Entry {
            log_id: LogId::new(CommittedLeaderId::new(2, 1), 3),
            payload: EntryPayload::Membership(openraft::Membership::new(vec![BTreeSet::from([1])], None)),
        };
        store.write_entries(vec![membership]).expect("write");
        assert_eq!(durable.upto().map(|l| l.index), Some(3));
        assert_eq!(durable.written_ahead(), Some(2));

        // Entries of an earlier term of its own, received as a follower of node 2.
        let mut following = Vote::new(3, 2);
        following.commit();
        let store = store_with_vote(dir.path(), following);
        let durable = store.durable();
        store.write_entries(vec![leader_entry(2, 1, 4)]).expect("write");
        assert_eq!(durable.written_ahead(), None);
        assert_eq!(durable.upto().map(|l| l.index), Some(4), "synced before it was reported");

        // A vote that is not committed yet (a candidate) never writes ahead either.
        let store = store_with_vote(dir.path(), Vote::new(4, 1));
        store.write_entries(vec![leader_entry(4, 1, 5)]).expect("write");
        assert_eq!(store.durable().written_ahead(), None);
    }

    #[tokio::test]
    async fn committed_hint_survives_reopen_unless_its_entry_is_gone() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut data = Vec::new();
        for i in 60..=66 {
            encode_record(&entry(3, i, "x"), &mut data).expect("encode");
        }
        fs::write(dir.path().join(segment_name(60)), &data).expect("write");
        let mut w = Writer::new(dir.path(), Vec::new(), BTreeMap::new(), true);
        let c = LogId::new(CommittedLeaderId::new(3, 1), 66);
        w.write_committed(Some(c)).expect("write");
        let mut store = LogStore::open(dir.path(), true).expect("open");
        assert_eq!(store.read_committed().await.expect("read"), Some(c));

        // The hint names an entry the log no longer has (a crash took it before its
        // sync): replaying up to it would fail.
        let mut w = Writer::new(dir.path(), Vec::new(), BTreeMap::new(), true);
        w.write_committed(Some(LogId::new(CommittedLeaderId::new(3, 1), 67))).expect("write");
        let mut store = LogStore::open(dir.path(), true).expect("open");
        assert_eq!(store.read_committed().await.expect("read"), None);
    }

    #[tokio::test]
    async fn vote_is_durable_and_comes_back_uncommitted() {
        let dir = tempfile::tempdir().expect("tempdir");
        let vote = Vote::new(3, 2);
        {
            let mut store = LogStore::open(dir.path(), true).expect("open");
            store.save_vote(&vote).await.expect("save");
        }
        let mut store = LogStore::open(dir.path(), true).expect("reopen");
        assert_eq!(store.read_vote().await.expect("read"), Some(vote));

        // A leadership restored as committed would lead again without a new term.
        let mut leading = Vote::new(4, 2);
        leading.commit();
        store.save_vote(&leading).await.expect("save");
        assert_eq!(store.read_vote().await.expect("read"), Some(leading));
        let mut store = LogStore::open(dir.path(), true).expect("reopen");
        let back = store.read_vote().await.expect("read").expect("a vote");
        assert_eq!((back.leader_id, back.committed), (leading.leader_id, false));
    }
}
