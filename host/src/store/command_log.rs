//! `--log-commands DIR`: the replica itself keeps every applied entry in `DIR/<node id>.log`,
//! in the archive format of the logger (`crate::archive`), so `logger inspect` reads it and
//! the two designs (each replica logging, or a learner logging for all) can be compared.
//!
//! The file is named by node id alone, so the members of one cluster can share a
//! directory (a mounted volume); members of different clusters need different ones.
//!
//! # When a batch is durable
//!
//! [`CommandLog::append`] writes the records of a batch openraft applies and
//! `fdatasync`s them (one write and one sync per batch) *before* the batch goes to the
//! guest, so a client's answer always follows its command's record on disk, and the file
//! is never behind the state: whatever the state machine holds (or a snapshot of it
//! holds), the file holds too, or a snapshot mark stands for it.
//!
//! # Restarts
//!
//! A restarted member restores its snapshot and applies the log after it again: entries
//! at or below the file's last index are already in it and are skipped, so the file
//! resumes with no gap and no duplicate. A torn last record (a crash mid-write) is cut off
//! when the file is opened, and its entries are applied again, hence written again.
//!
//! # Snapshots
//!
//! A member that catches up through a snapshot (or starts from one past the file's end,
//! e.g. after a crash between installing it and marking it, or when the flag was off
//! meanwhile) never applies the commands the snapshot covers. The file then gets a
//! snapshot mark, as a logger's archive does: the snapshot file is hard-linked beside the
//! log as `<node id>.snap-<index>` (copied if DIR is on another file system), so the
//! command log plus its snapshots always describe the whole state, even after the member
//! replaces its own snapshot. Entries resume at the snapshot's index + 1.
//!
//! # Failures
//!
//! A write or sync that fails is returned as an error, which the state machine turns into
//! a storage error: Raft stops and the member exits. A command is never applied without
//! its record, and after a failure every later call fails too.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::archive::{Archive, ArchiveError, Record};
use crate::store::snapfile::SnapReader;
use crate::types::{Entry, NodeId, SnapshotMeta};

/// Handle to one member's command log; cheap to clone.
#[derive(Clone)]
pub struct CommandLog {
    inner: Arc<Mutex<Inner>>,
}

struct Inner {
    archive: Archive,
    /// Why this log stopped taking records: a failed write leaves the file's end unknown.
    failed: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum CommandLogError {
    #[error("--log-commands {path}: {source}")]
    Archive { path: PathBuf, source: ArchiveError },
    #[error("--log-commands {path}: {why}")]
    Snapshot { path: PathBuf, why: String },
    #[error("the command log stopped after an earlier failure: {0}")]
    Stopped(String),
    #[error("the command log's writer thread failed: {0}")]
    Thread(String),
}

impl CommandLog {
    /// Opens (or creates) `dir/<node>.log`. A directory that cannot be created or written,
    /// or a file whose middle is corrupt, is an error naming the path.
    pub fn open(dir: &Path, node: NodeId, fsync: bool) -> Result<Self, CommandLogError> {
        let name = node.to_string();
        let archive = Archive::open(dir, &name, fsync)
            .map_err(|source| CommandLogError::Archive { path: dir.join(format!("{name}.log")), source })?;
        // Links left by a crash between linking a snapshot and marking it.
        if let Ok(entries) = fs::read_dir(dir) {
            for e in entries.flatten() {
                let file = e.file_name().to_string_lossy().to_string();
                if file.starts_with(&format!("{name}.snap-")) && file.ends_with(".incoming") {
                    let _ = fs::remove_file(e.path());
                }
            }
        }
        tracing::info!(path = %archive.path().display(), last = ?archive.last.map(|l| l.index), "command log open");
        Ok(CommandLog { inner: Arc::new(Mutex::new(Inner { archive, failed: None })) })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Every operation below leaves `failed` set or the archive consistent.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The last index the file holds (an entry or a snapshot mark).
    pub fn last_index(&self) -> Option<u64> {
        self.lock().archive.last.map(|l| l.index)
    }

    pub fn path(&self) -> PathBuf {
        self.lock().archive.path().to_path_buf()
    }

    /// Writes the entries of `batch` that the file does not hold yet and makes them
    /// durable; returns once they are. Runs on a blocking thread.
    pub async fn append(&self, batch: &[Entry]) -> Result<(), CommandLogError> {
        let last = self.lock().archive.last.map(|l| l.index);
        let records: Vec<Record> = batch
            .iter()
            .filter(|e| last.is_none_or(|l| e.log_id.index > l))
            .map(|e| Record::of_entry(e.clone()))
            .collect();
        if records.is_empty() {
            return Ok(());
        }
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.append_now(&records))
            .await
            .map_err(|e| CommandLogError::Thread(e.to_string()))?
    }

    fn append_now(&self, records: &[Record]) -> Result<(), CommandLogError> {
        let mut inner = self.lock();
        if let Some(why) = &inner.failed {
            return Err(CommandLogError::Stopped(why.clone()));
        }
        let path = inner.archive.path().to_path_buf();
        let res = inner.archive.append(records);
        res.map_err(|source| inner.fail(CommandLogError::Archive { path, source }))
    }

    /// The state machine holds the snapshot `meta`, whose file is `file`: if it reaches
    /// past the file's end, keep it beside the log and mark it (see the module doc).
    /// Blocking; call it from a blocking thread or at start-up.
    pub fn snapshot_held(&self, meta: &SnapshotMeta, file: &Path) -> Result<(), CommandLogError> {
        let Some(log_id) = meta.last_log_id else { return Ok(()) };
        let mut inner = self.lock();
        if let Some(why) = &inner.failed {
            return Err(CommandLogError::Stopped(why.clone()));
        }
        if inner.archive.last.is_some_and(|l| l.index >= log_id.index) {
            // Every command the snapshot covers is in the file already.
            return Ok(());
        }
        let res = inner.mark(meta, log_id, file);
        res.map_err(|e| inner.fail(e))
    }

    /// [`CommandLog::snapshot_held`] on a blocking thread.
    pub async fn snapshot_installed(&self, meta: &SnapshotMeta, file: &Path) -> Result<(), CommandLogError> {
        let (this, meta, file) = (self.clone(), meta.clone(), file.to_path_buf());
        tokio::task::spawn_blocking(move || this.snapshot_held(&meta, &file))
            .await
            .map_err(|e| CommandLogError::Thread(e.to_string()))?
    }
}

impl Inner {
    fn fail(&mut self, e: CommandLogError) -> CommandLogError {
        tracing::error!(error = %e, "the command log failed; this member stops");
        self.failed = Some(e.to_string());
        e
    }

    fn mark(&mut self, meta: &SnapshotMeta, log_id: crate::types::LogId, file: &Path) -> Result<(), CommandLogError> {
        let dir = self.archive.path().parent().map(Path::to_path_buf).unwrap_or_default();
        let name = self.archive.path().file_stem().map(|s| s.to_string_lossy().to_string()).unwrap_or_default();
        let snap_err = |why: String| CommandLogError::Snapshot { path: dir.clone(), why };
        let incoming = dir.join(format!("{name}.snap-{}.incoming", log_id.index));
        let _ = fs::remove_file(&incoming);
        // A hard link costs nothing and stays valid when the member later replaces its
        // snapshot file (it renames a new file over the name; this inode is never written).
        if let Err(e) = fs::hard_link(file, &incoming) {
            tracing::info!(error = %e, "cannot link the snapshot into the command log's directory; copying it");
            fs::copy(file, &incoming).map_err(|e| snap_err(format!("copying {}: {e}", file.display())))?;
        }
        // The file must be the snapshot being marked, not one built after it.
        let inside = SnapReader::open(&incoming).map(|r| r.meta.last_log_id);
        match inside {
            Ok(l) if l == Some(log_id) => {}
            other => {
                let _ = fs::remove_file(&incoming);
                let found = other.map_or_else(|e: io::Error| e.to_string(), |l| format!("a snapshot at {l:?}"));
                return Err(snap_err(format!(
                    "{} should hold the snapshot at {log_id}: found {found}",
                    file.display()
                )));
            }
        }
        self.archive
            .install_snapshot(&incoming, log_id, meta.last_membership.clone())
            .map_err(|source| CommandLogError::Archive { path: self.archive.path().to_path_buf(), source })?;
        tracing::info!(index = log_id.index, "command log: snapshot marked; entries resume after it");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::snapfile::SnapWriter;
    use crate::types::{LogId, Request, StoredMembership};
    use openraft::{CommittedLeaderId, EntryPayload};

    fn lid(index: u64) -> LogId {
        LogId::new(CommittedLeaderId::new(1, 1), index)
    }

    fn entry(index: u64, cmd: &str) -> Entry {
        Entry { log_id: lid(index), payload: EntryPayload::Normal(Request::commands(vec![cmd.as_bytes().to_vec()])) }
    }

    fn indexes(path: &Path) -> Vec<(u64, bool)> {
        crate::archive::read_all(path)
            .expect("read")
            .iter()
            .map(|r| (r.index(), matches!(r, Record::Snapshot { .. })))
            .collect()
    }

    /// Writes a snapshot at `index` to `path` as the state machine does: a new file renamed
    /// over the old name.
    fn snapshot_file(path: &Path, index: u64) -> SnapshotMeta {
        let meta = SnapshotMeta {
            last_log_id: Some(lid(index)),
            last_membership: StoredMembership::default(),
            snapshot_id: format!("1-{index}"),
        };
        let tmp = path.with_extension("building");
        let mut w = SnapWriter::create(fs::File::create(&tmp).expect("create"), &meta).expect("header");
        std::io::Write::write_all(w.stream(), format!("state at {index}").as_bytes()).expect("stream");
        w.finish(b"digest").expect("trailer").sync_all().expect("sync");
        fs::rename(&tmp, path).expect("rename");
        meta
    }

    #[tokio::test]
    async fn entries_applied_again_after_a_restart_are_not_logged_twice() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = CommandLog::open(dir.path(), 7, true).expect("open");
        log.append(&[entry(0, "a"), entry(1, "b")]).await.expect("append");
        drop(log);
        // A restart applies 0..=3 again: 0 and 1 are in the file already.
        let log = CommandLog::open(dir.path(), 7, true).expect("reopen");
        assert_eq!(log.last_index(), Some(1));
        log.append(&[entry(0, "a"), entry(1, "b"), entry(2, "c")]).await.expect("append");
        log.append(&[entry(3, "d")]).await.expect("append");
        assert_eq!(indexes(&dir.path().join("7.log")), vec![(0, false), (1, false), (2, false), (3, false)]);
    }

    #[tokio::test]
    async fn a_gap_stops_the_log_for_good() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = CommandLog::open(dir.path(), 1, true).expect("open");
        log.append(&[entry(0, "a")]).await.expect("append");
        let why = log.append(&[entry(5, "x")]).await.expect_err("a gap").to_string();
        assert!(why.contains("does not follow"), "{why}");
        let why = log.append(&[entry(1, "b")]).await.expect_err("stopped").to_string();
        assert!(why.contains("stopped after an earlier failure"), "{why}");
    }

    #[tokio::test]
    async fn a_snapshot_past_the_end_is_kept_and_marked_and_one_behind_it_is_not() {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = tempfile::tempdir().expect("data dir");
        let log = CommandLog::open(dir.path(), 2, true).expect("open");
        log.append(&[entry(0, "a"), entry(1, "b")]).await.expect("append");
        let current = data.path().join("current.snap");
        let behind = snapshot_file(&current, 1);
        log.snapshot_installed(&behind, &current).await.expect("behind the log");
        assert_eq!(indexes(&dir.path().join("2.log")).len(), 2, "nothing to mark");

        let ahead = snapshot_file(&current, 10);
        log.snapshot_installed(&ahead, &current).await.expect("mark");
        // The member replaces its snapshot later: the kept one must not change.
        let kept = dir.path().join("2.snap-10");
        let before = fs::read(&kept).expect("kept beside the log");
        snapshot_file(&current, 20);
        assert_eq!(fs::read(&kept).expect("kept"), before);
        log.append(&[entry(10, "old"), entry(11, "k")]).await.expect("resumes after the mark");
        assert_eq!(indexes(&dir.path().join("2.log")), vec![(0, false), (1, false), (10, true), (11, false)]);

        // A file that is not the snapshot named is refused, and nothing is marked.
        let wrong = snapshot_file(&current, 30);
        let mut named = wrong.clone();
        named.last_log_id = Some(lid(40));
        let why = log.snapshot_installed(&named, &current).await.expect_err("wrong file").to_string();
        assert!(why.contains("should hold the snapshot"), "{why}");
    }
}
