//! The archive file `<dir>/<id>.log`: one record per committed entry, in index order, in
//! the host's record format (`[len u32 BE][crc32 u32 BE][bincode body]`, see
//! `host::store::log::record`).
//!
//! Every committed index has a record: entries without commands (blank, membership,
//! checkpoint) have an empty command list, so "no gap" is checkable by counting. A
//! membership entry carries its membership, so the archive alone says what the logger's
//! state machine had applied when it restarts. A snapshot the cluster sent (its log was
//! compacted past what the logger holds) is kept beside the file as `<id>.snap-<index>`
//! and marked by a [`Record::Snapshot`]; the entries after it start at its index + 1.
//!
//! A record is durable once [`Archive::append`] returns: it writes the batch openraft
//! applies at once and `fdatasync`s it before reporting it applied. A crash loses no
//! appended batch; a batch cut short leaves a torn last record, which start-up cuts off,
//! and the entries it held are applied again from the logger's Raft log (fsynced before
//! it acknowledged them to the leader), so the archive resumes with no gap or duplicate.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use crate::store::files::{read_small, sync_dir, write_small};
use crate::store::log::record::{encode_record, read_record, Next, RECORD_HEADER};
use crate::types::{LogId, Member, NodeId, StoredMembership};
use serde::{Deserialize, Serialize};

/// A record's body is at most this long: an entry is at most a few MiB of commands (the
/// host's batch bound plus one command), so a larger length is corruption, not data.
pub const MAX_RECORD: usize = 64 << 20;

/// One record of the archive.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub enum Record {
    /// A committed entry: its log id and its commands, in order.
    Entry {
        log_id: LogId,
        commands: Vec<serde_bytes::ByteBuf>,
        /// Set for membership entries.
        membership: Option<openraft::Membership<NodeId, Member>>,
    },
    /// The cluster's state up to `log_id`, in the file `file` beside the archive
    /// (`bytes` long, the host's snapshot format).
    Snapshot { log_id: LogId, file: String, bytes: u64, membership: StoredMembership },
}

impl Record {
    /// The record of a committed entry: its commands (none for blank and membership
    /// entries, so every index has a record) and its membership, if it is one. Loggers,
    /// `--log-commands` and the replicas' `recover` all make records with this.
    pub fn of_entry(entry: crate::types::Entry) -> Record {
        let (cmds, membership) = match entry.payload {
            openraft::EntryPayload::Blank => (Vec::new(), None),
            openraft::EntryPayload::Normal(req) => (req.commands, None),
            openraft::EntryPayload::Membership(m) => (Vec::new(), Some(m)),
        };
        Record::Entry {
            log_id: entry.log_id,
            commands: cmds.into_iter().map(serde_bytes::ByteBuf::from).collect(),
            membership,
        }
    }

    /// Client commands in the record (a snapshot mark has none).
    pub fn commands(&self) -> usize {
        match self {
            Record::Entry { commands, .. } => commands.len(),
            Record::Snapshot { .. } => 0,
        }
    }

    pub fn index(&self) -> u64 {
        match self {
            Record::Entry { log_id, .. } | Record::Snapshot { log_id, .. } => log_id.index,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error("{path}: corrupt record at byte {offset}: {why}")]
    Corrupt { path: PathBuf, offset: u64, why: String },
    #[error("{path}: torn last record at byte {offset} ({why}); the logger cuts it off when it starts")]
    Torn { path: PathBuf, offset: u64, why: String },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{0}")]
    Refused(String),
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> ArchiveError + '_ {
    move |source| ArchiveError::Io { path: path.to_path_buf(), source }
}

/// What `logger inspect` prints.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Summary {
    /// Archived entries (snapshot marks are not entries).
    pub records: u64,
    /// Client commands in them.
    pub commands: u64,
    pub first_index: Option<u64>,
    pub last_index: Option<u64>,
    pub bytes: u64,
}

/// A stretch of consecutive entries, possibly after a snapshot: what `recover` can serve
/// without reading the file from its start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Run {
    /// Byte offset of the snapshot mark, or of the first entry when there is none.
    pub offset: u64,
    /// The snapshot this run starts from: its index, file and size.
    pub snapshot: Option<(u64, String, u64)>,
    /// Entries `first..=last` follow (`last < first`: none yet).
    pub first: u64,
    pub last: u64,
}

/// What a scan of the file found.
#[derive(Debug, Default)]
struct Scanned {
    summary: Summary,
    last: Option<LogId>,
    membership: StoredMembership,
    runs: Vec<Run>,
    /// Bytes of whole, valid records.
    valid: u64,
    /// A torn last record: where it starts and why it is taken for one.
    torn: Option<(u64, String)>,
}

/// Reads every record of `path` in order, checking checksums and index order, without
/// holding more than one record in memory.
fn scan(path: &Path, mut each: impl FnMut(u64, &Record)) -> Result<Scanned, ArchiveError> {
    let file = File::open(path).map_err(io_at(path))?;
    let size = file.metadata().map_err(io_at(path))?.len();
    let mut r = BufReader::with_capacity(1 << 20, file);
    let mut s = Scanned::default();
    let mut body = Vec::new();
    let mut offset = 0u64;
    let corrupt = |offset: u64, why: String| ArchiveError::Corrupt { path: path.to_path_buf(), offset, why };
    loop {
        match read_record(&mut r, &mut body, MAX_RECORD).map_err(io_at(path))? {
            Next::End => break,
            Next::Short { have } => {
                s.torn = Some((offset, format!("{have} bytes of a record at the end of the file")));
                break;
            }
            Next::Bad { len } => {
                // The last record of the file, garbled or zero-filled by a crash mid-write,
                // is torn; a bad record with whole records after it is corruption.
                let end = offset + (RECORD_HEADER + len) as u64;
                if end >= size || (len == 0 && rest_is_zero(&mut r).map_err(io_at(path))?) {
                    s.torn = Some((offset, "the last record's checksum does not match".to_string()));
                    break;
                }
                return Err(corrupt(offset, format!("checksum mismatch (length {len}) with records after it")));
            }
            Next::Record { len } => {
                let rec: Record = bincode::deserialize(&body).map_err(|e| {
                    corrupt(offset, format!("intact but undecodable ({e}): written by another version?"))
                })?;
                let expected = s.last.map_or(0, |l| l.index) + 1;
                match &rec {
                    Record::Entry { log_id, commands, membership } => {
                        if s.last.is_some() && log_id.index != expected {
                            return Err(corrupt(
                                offset,
                                format!("entry {} where entry {expected} was due", log_id.index),
                            ));
                        }
                        if s.runs.is_empty() {
                            s.runs.push(Run { offset, snapshot: None, first: log_id.index, last: log_id.index });
                        }
                        if let Some(run) = s.runs.last_mut() {
                            run.last = log_id.index;
                        }
                        s.summary.records += 1;
                        s.summary.commands += commands.len() as u64;
                        s.summary.first_index.get_or_insert(log_id.index);
                        s.summary.last_index = Some(log_id.index);
                        if let Some(m) = membership {
                            s.membership = StoredMembership::new(Some(*log_id), m.clone());
                        }
                        s.last = Some(*log_id);
                    }
                    Record::Snapshot { log_id, file, bytes, membership } => {
                        if s.last.is_some_and(|l| log_id.index < l.index) {
                            return Err(corrupt(
                                offset,
                                format!("snapshot at {} after entry {}", log_id.index, expected - 1),
                            ));
                        }
                        s.runs.push(Run {
                            offset,
                            snapshot: Some((log_id.index, file.clone(), *bytes)),
                            first: log_id.index + 1,
                            last: log_id.index,
                        });
                        s.membership = membership.clone();
                        s.last = Some(*log_id);
                    }
                }
                each(offset, &rec);
                offset += (RECORD_HEADER + len) as u64;
            }
        }
    }
    s.valid = offset;
    s.summary.bytes = offset;
    Ok(s)
}

fn rest_is_zero(r: &mut impl Read) -> io::Result<bool> {
    let mut buf = [0u8; 64 * 1024];
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            return Ok(true);
        }
        if buf[..n].iter().any(|b| *b != 0) {
            return Ok(false);
        }
    }
}

/// `logger inspect FILE`: the summary of a whole, valid archive, or the first problem.
pub fn inspect(path: &Path) -> Result<Summary, ArchiveError> {
    let s = scan(path, |_, _| {})?;
    if let Some((offset, why)) = s.torn {
        return Err(ArchiveError::Torn { path: path.to_path_buf(), offset, why });
    }
    Ok(s.summary)
}

/// Every record of `path`, for tests and tools (the whole file in memory).
pub fn read_all(path: &Path) -> Result<Vec<Record>, ArchiveError> {
    let mut out = Vec::new();
    scan(path, |_, r| out.push(r.clone()))?;
    Ok(out)
}

/// The open archive of one cluster.
pub struct Archive {
    path: PathBuf,
    dir: PathBuf,
    name: String,
    file: File,
    fsync: bool,
    pub summary: Summary,
    /// The last entry or snapshot archived: the state machine's last applied.
    pub last: Option<LogId>,
    pub membership: StoredMembership,
    pub runs: Vec<Run>,
}

impl Archive {
    /// Opens `<dir>/<name>.log`, creating it if needed. A torn last record is cut off (and
    /// logged); corruption anywhere else is an error naming its offset.
    pub fn open(dir: &Path, name: &str, fsync: bool) -> Result<Self, ArchiveError> {
        fs::create_dir_all(dir).map_err(io_at(dir))?;
        let path = dir.join(format!("{name}.log"));
        let file =
            OpenOptions::new().create(true).truncate(false).read(true).write(true).open(&path).map_err(io_at(&path))?;
        let mut s = scan(&path, |_, _| {})?;
        // A truncation may have dropped the record of the membership in force: it was
        // kept beside the archive (see `truncate_below`).
        let kept = dir.join(format!("{name}.membership"));
        if let Some(m) = read_small::<StoredMembership>(&kept).map_err(io_at(&kept))? {
            if m.log_id() > s.membership.log_id() {
                s.membership = m;
            }
        }
        if let Some((offset, why)) = &s.torn {
            tracing::warn!(path = %path.display(), offset, %why, "cutting off a torn last record");
            file.set_len(s.valid).map_err(io_at(&path))?;
        }
        file.sync_all().map_err(io_at(&path))?;
        sync_dir(dir).map_err(io_at(dir))?;
        let mut file = file;
        file.seek(SeekFrom::Start(s.valid)).map_err(io_at(&path))?;
        Ok(Archive {
            path,
            dir: dir.to_path_buf(),
            name: name.to_string(),
            file,
            fsync,
            summary: s.summary,
            last: s.last,
            membership: s.membership,
            runs: s.runs,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends `records` (entries following the last one, in order) and makes them durable.
    pub fn append(&mut self, records: &[Record]) -> Result<(), ArchiveError> {
        let mut buf = Vec::new();
        let mut expected = self.last.map_or(0, |l| l.index) + 1;
        for rec in records {
            let Record::Entry { log_id, commands, .. } = rec else {
                return Err(ArchiveError::Refused("append takes entries; snapshots go through install".into()));
            };
            if self.last.is_some() && log_id.index != expected {
                return Err(ArchiveError::Refused(format!(
                    "entry {} does not follow the archive's last entry {}",
                    log_id.index,
                    expected - 1
                )));
            }
            expected = log_id.index + 1;
            encode_record(rec, &mut buf).map_err(|e| ArchiveError::Refused(format!("encoding entry: {e}")))?;
            self.summary.records += 1;
            self.summary.commands += commands.len() as u64;
            self.summary.first_index.get_or_insert(log_id.index);
            self.summary.last_index = Some(log_id.index);
            if self.runs.is_empty() {
                self.runs.push(Run {
                    offset: self.summary.bytes,
                    snapshot: None,
                    first: log_id.index,
                    last: log_id.index,
                });
            }
            if let Some(run) = self.runs.last_mut() {
                run.last = log_id.index;
            }
            if let Record::Entry { membership: Some(m), .. } = rec {
                self.membership = StoredMembership::new(Some(*log_id), m.clone());
            }
            self.last = Some(*log_id);
        }
        self.write(&buf)
    }

    fn write(&mut self, buf: &[u8]) -> Result<(), ArchiveError> {
        self.file.write_all(buf).map_err(io_at(&self.path))?;
        if self.fsync {
            self.file.sync_data().map_err(io_at(&self.path))?;
        }
        self.summary.bytes += buf.len() as u64;
        Ok(())
    }

    /// Keeps the snapshot at `received` (a file in the archive's directory) as
    /// `<name>.snap-<index>` and marks it in the archive; entries resume after it.
    pub fn install_snapshot(
        &mut self,
        received: &Path,
        log_id: LogId,
        membership: StoredMembership,
    ) -> Result<(), ArchiveError> {
        let file_name = format!("{}.snap-{}", self.name, log_id.index);
        let kept = self.dir.join(&file_name);
        let f = File::open(received).map_err(io_at(received))?;
        f.sync_all().map_err(io_at(received))?;
        let bytes = f.metadata().map_err(io_at(received))?.len();
        fs::rename(received, &kept).map_err(io_at(&kept))?;
        sync_dir(&self.dir).map_err(io_at(&self.dir))?;
        let rec = Record::Snapshot { log_id, file: file_name.clone(), bytes, membership: membership.clone() };
        let mut buf = Vec::new();
        encode_record(&rec, &mut buf).map_err(|e| ArchiveError::Refused(format!("encoding snapshot mark: {e}")))?;
        self.runs.push(Run {
            offset: self.summary.bytes,
            snapshot: Some((log_id.index, file_name, bytes)),
            first: log_id.index + 1,
            last: log_id.index,
        });
        self.last = Some(log_id);
        self.membership = membership;
        self.write(&buf)
    }

    /// Drops every record below index `below` (and the snapshots only they refer to):
    /// the rest is copied to a new file that replaces the archive atomically.
    pub fn truncate_below(&mut self, below: u64) -> Result<u64, ArchiveError> {
        let tmp = self.dir.join(format!("{}.log.truncating", self.name));
        let mut out = io::BufWriter::new(File::create(&tmp).map_err(io_at(&tmp))?);
        let mut dropped_snaps = Vec::new();
        let mut kept = 0u64;
        let mut err = None;
        let mut buf = Vec::new();
        scan(&self.path, |_, rec| {
            if err.is_some() {
                return;
            }
            let keep = match rec {
                Record::Entry { log_id, .. } => log_id.index >= below,
                // A snapshot is only needed while entries before `below` would have been
                // served with it; once they are gone the entries that follow start the
                // archive.
                Record::Snapshot { log_id, file, .. } => {
                    let keep = log_id.index + 1 >= below;
                    if !keep {
                        dropped_snaps.push(file.clone());
                    }
                    keep
                }
            };
            if keep {
                buf.clear();
                if let Err(e) = encode_record(rec, &mut buf) {
                    err = Some(ArchiveError::Refused(format!("re-encoding: {e}")));
                    return;
                }
                if let Err(e) = out.write_all(&buf) {
                    err = Some(ArchiveError::Io { path: tmp.clone(), source: e });
                }
                kept += 1;
            }
        })?;
        if let Some(e) = err {
            return Err(e);
        }
        let f = out.into_inner().map_err(|e| ArchiveError::Io { path: tmp.clone(), source: e.into_error() })?;
        f.sync_all().map_err(io_at(&tmp))?;
        // The membership in force may be in a dropped record; a logger restarted on the
        // truncated archive must still know its cluster's members. Kept before the rename,
        // so no crash leaves an archive that lost it.
        let kept_membership = self.dir.join(format!("{}.membership", self.name));
        write_small(&kept_membership, &self.membership).map_err(io_at(&kept_membership))?;
        fs::rename(&tmp, &self.path).map_err(io_at(&self.path))?;
        sync_dir(&self.dir).map_err(io_at(&self.dir))?;
        for snap in dropped_snaps {
            let _ = fs::remove_file(self.dir.join(snap));
        }
        let reopened = Archive::open(&self.dir, &self.name, self.fsync)?;
        *self = reopened;
        Ok(kept)
    }

    /// Where `recover(from, to)` starts reading, and the snapshot it sends first, if any;
    /// or why the archive cannot serve the range.
    pub fn plan(&self, from: u64, to: u64) -> Result<Plan, String> {
        let held = || {
            let parts: Vec<String> = self
                .runs
                .iter()
                .map(|r| match &r.snapshot {
                    Some((s, _, _)) if r.last < r.first => format!("snapshot at {s}"),
                    Some((s, _, _)) => format!("snapshot at {s} then entries {}..{}", r.first, r.last),
                    None => format!("entries {}..{}", r.first, r.last),
                })
                .collect();
            if parts.is_empty() {
                "nothing yet".to_string()
            } else {
                parts.join(", ")
            }
        };
        for run in &self.runs {
            if run.first <= from && to <= run.last {
                return Ok(Plan {
                    offset: run.offset,
                    snapshot: None,
                    skip_snapshot_mark: run.snapshot.is_some(),
                    from,
                    to,
                });
            }
        }
        // Not all there as entries: the latest snapshot at or after `from - 1` whose run
        // reaches `to` stands in for what precedes its entries.
        for run in self.runs.iter().rev() {
            if let Some((s, file, bytes)) = &run.snapshot {
                if *s + 1 >= from && *s <= to && to <= run.last.max(*s) {
                    return Ok(Plan {
                        offset: run.offset,
                        snapshot: Some((self.dir.join(file), *bytes)),
                        skip_snapshot_mark: false,
                        from: *s + 1,
                        to,
                    });
                }
            }
        }
        Err(format!("the archive cannot serve entries {from}..{to}: it holds {}", held()))
    }
}

/// How to serve a recover request (see [`Archive::plan`] and [`stream`]).
#[derive(Debug)]
pub struct Plan {
    offset: u64,
    snapshot: Option<(PathBuf, u64)>,
    skip_snapshot_mark: bool,
    from: u64,
    to: u64,
}

/// Entry records gathered before they go to `out` in one chunk: one chunk per record
/// (a few hundred bytes to a few KiB each) cost more in hand-offs than in reading.
const STREAM_CHUNK: usize = 1 << 20;

/// Writes the answer to `recover`: with a snapshot, its mark record then the snapshot's
/// bytes (as many as the mark says); then the entry records `from..=to`, copied as they
/// are in the archive, gathered into chunks of about [`STREAM_CHUNK`]. Reads one record
/// at a time from `file` (opened with the plan, so a truncation meanwhile does not move
/// it).
pub fn stream(file: File, plan: Plan, out: &mut impl FnMut(Vec<u8>) -> bool) -> io::Result<()> {
    let mut pending = Vec::new();
    let mut gather = |chunk: Vec<u8>| {
        if pending.is_empty() && chunk.len() >= STREAM_CHUNK {
            return out(chunk);
        }
        pending.extend_from_slice(&chunk);
        pending.len() < STREAM_CHUNK || out(std::mem::take(&mut pending))
    };
    // The closure's borrows end with this call (non-lexical lifetimes).
    let res = stream_records(file, plan, &mut gather);
    match res {
        // Whatever was gathered goes out only after a clean end: a failed read cuts the
        // answer off, and the last whole records are not worth a later error.
        Ok(true) if !pending.is_empty() => {
            out(pending);
            Ok(())
        }
        Ok(_) => Ok(()),
        Err(e) => Err(e),
    }
}

/// [`stream`] one record at a time; `Ok(false)` when `out` asked to stop.
fn stream_records(mut file: File, plan: Plan, out: &mut impl FnMut(Vec<u8>) -> bool) -> io::Result<bool> {
    file.seek(SeekFrom::Start(plan.offset))?;
    let mut r = BufReader::with_capacity(1 << 20, file);
    let mut body = Vec::new();
    let mut first = true;
    loop {
        let Next::Record { len } = read_record(&mut r, &mut body, MAX_RECORD)? else {
            return Err(io::Error::other("the archive ended before the range"));
        };
        let rec: Record = bincode::deserialize(&body).map_err(io::Error::other)?;
        // Sent as it is in the file (its checksum was just verified): decoding it was only
        // to know what it is.
        let mut framed = Vec::with_capacity(RECORD_HEADER + len);
        framed.extend_from_slice(&(len as u32).to_be_bytes());
        framed.extend_from_slice(&crc32fast::hash(&body).to_be_bytes());
        framed.extend_from_slice(&body);
        let first_rec = std::mem::replace(&mut first, false);
        match &rec {
            Record::Snapshot { .. } if first_rec && plan.skip_snapshot_mark => {}
            Record::Snapshot { .. } if first_rec => {
                if !out(framed) {
                    return Ok(false);
                }
                if let Some((path, bytes)) = &plan.snapshot {
                    let mut snap = File::open(path)?.take(*bytes);
                    let mut chunk = vec![0u8; 1 << 20];
                    loop {
                        let n = snap.read(&mut chunk)?;
                        if n == 0 {
                            break;
                        }
                        if !out(chunk[..n].to_vec()) {
                            return Ok(false);
                        }
                    }
                }
            }
            Record::Snapshot { .. } => return Err(io::Error::other("a snapshot mark inside the range")),
            Record::Entry { log_id, .. } => {
                if log_id.index > plan.to {
                    return Ok(true);
                }
                if log_id.index >= plan.from && !out(framed) {
                    return Ok(false);
                }
                if log_id.index == plan.to {
                    return Ok(true);
                }
            }
        }
        if plan.to < plan.from {
            // A snapshot alone.
            return Ok(true);
        }
    }
}

impl Archive {
    /// The file and the plan for `recover(from, to)`, taken together.
    pub fn open_range(&self, from: u64, to: u64) -> Result<(File, Plan), String> {
        let plan = self.plan(from, to)?;
        let file = File::open(&self.path).map_err(|e| format!("{}: {e}", self.path.display()))?;
        Ok((file, plan))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::CommittedLeaderId;

    fn lid(term: u64, index: u64) -> LogId {
        LogId::new(CommittedLeaderId::new(term, 1), index)
    }

    fn entry(index: u64, cmds: &[&str]) -> Record {
        Record::Entry {
            log_id: lid(1, index),
            commands: cmds.iter().map(|c| serde_bytes::ByteBuf::from(c.as_bytes().to_vec())).collect(),
            membership: None,
        }
    }

    #[test]
    fn appends_survive_reopening_and_a_gap_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut a = Archive::open(dir.path(), "c", true).expect("open");
        a.append(&[entry(1, &["a"]), entry(2, &[]), entry(3, &["b", "c"])]).expect("append");
        assert!(a.append(&[entry(5, &["x"])]).is_err(), "a gap");
        let a = Archive::open(dir.path(), "c", true).expect("reopen");
        assert_eq!(
            a.summary,
            Summary { records: 3, commands: 3, first_index: Some(1), last_index: Some(3), bytes: a.summary.bytes }
        );
        assert_eq!(inspect(a.path()).expect("inspect"), a.summary);
    }

    #[test]
    fn a_torn_tail_is_cut_and_a_corrupt_middle_refused_with_its_offset() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut a = Archive::open(dir.path(), "c", true).expect("open");
        a.append(&[entry(1, &["a"]), entry(2, &["b"]), entry(3, &["c"])]).expect("append");
        let path = a.path().to_path_buf();
        let full = fs::read(&path).expect("read");
        let second = {
            let mut v = Vec::new();
            encode_record(&entry(1, &["a"]), &mut v).expect("encode");
            v.len()
        };
        drop(a);
        fs::write(&path, &full[..full.len() - 2]).expect("tear");
        assert!(matches!(inspect(&path), Err(ArchiveError::Torn { .. })));
        let a = Archive::open(dir.path(), "c", true).expect("cut");
        assert_eq!(a.summary.last_index, Some(2));
        drop(a);

        let mut bad = full.clone();
        bad[second + RECORD_HEADER + 2] ^= 0xff;
        fs::write(&path, &bad).expect("corrupt");
        match Archive::open(dir.path(), "c", true) {
            Err(ArchiveError::Corrupt { offset, .. }) => assert_eq!(offset, second as u64),
            other => panic!("expected corruption, got {:?}", other.map(|a| a.summary)),
        }
        assert!(matches!(inspect(&path), Err(ArchiveError::Corrupt { .. })));
    }

    #[test]
    fn truncation_keeps_the_membership_in_force() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut a = Archive::open(dir.path(), "c", true).expect("open");
        let members = openraft::Membership::new(vec![std::collections::BTreeSet::from([1, 2, 3])], None);
        let with_members = Record::Entry { log_id: lid(1, 1), commands: Vec::new(), membership: Some(members.clone()) };
        a.append(&[with_members, entry(2, &["a"]), entry(3, &["b"]), entry(4, &["c"])]).expect("append");
        let before = a.membership.clone();
        assert_eq!(before.log_id(), &Some(lid(1, 1)));
        a.truncate_below(3).expect("truncate");
        assert_eq!(a.summary.first_index, Some(3), "the membership's record is gone");
        assert_eq!(a.membership, before, "but not the membership");
        let a = Archive::open(dir.path(), "c", true).expect("reopen");
        assert_eq!(a.membership, before, "nor after a restart");
    }

    #[test]
    fn recover_plans_and_truncation() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut a = Archive::open(dir.path(), "c", true).expect("open");
        a.append(&[entry(1, &["a"]), entry(2, &["b"])]).expect("append");
        let snap = dir.path().join("incoming");
        fs::write(&snap, b"state").expect("snap");
        a.install_snapshot(&snap, lid(1, 10), StoredMembership::default()).expect("install");
        a.append(&[entry(11, &["k"]), entry(12, &["l"])]).expect("append");
        assert!(a.plan(1, 2).expect("in run").snapshot.is_none());
        assert!(a.plan(1, 11).expect("across the gap").snapshot.is_some(), "3..10 come as the snapshot");
        let why = a.plan(3, 5).expect_err("inside the snapshot only");
        assert!(why.contains("entries 1..2") && why.contains("snapshot at 10"), "{why}");
        let p = a.plan(5, 12).expect("snapshot then entries");
        assert!(p.snapshot.is_some());
        let (file, plan) = a.open_range(5, 12).expect("open");
        let mut got = Vec::new();
        stream(file, plan, &mut |b| {
            got.extend_from_slice(&b);
            true
        })
        .expect("stream");
        let mut r = &got[..];
        let mut body = Vec::new();
        assert!(matches!(read_record(&mut r, &mut body, MAX_RECORD).expect("mark"), Next::Record { .. }));
        let mut state = [0u8; 5];
        r.read_exact(&mut state).expect("snapshot bytes");
        assert_eq!(&state, b"state");
        let mut n = 0;
        while let Next::Record { .. } = read_record(&mut r, &mut body, MAX_RECORD).expect("entry") {
            n += 1;
        }
        assert_eq!(n, 2);

        a.truncate_below(12).expect("truncate");
        assert_eq!(a.summary.first_index, Some(12));
        assert_eq!(a.summary.records, 1);
        assert!(!dir.path().join("c.snap-10").exists(), "the snapshot before the cut is dropped");
    }
}
