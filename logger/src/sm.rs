//! openraft's state machine for a logger: applying an entry appends it to the archive.
//!
//! openraft applies only committed entries, so the archive never holds an entry the
//! cluster could still drop. The logger never leads, so its own snapshots are never sent
//! anywhere: one is only a mark (meta, empty data) that lets openraft purge the logger's
//! Raft log behind the archive, which holds everything it purges.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use host::store::covered::SnapshotCover;
use host::store::files::{read_small, write_small};
use host::types::{Entry, LogId, Response, Snapshot, SnapshotMeta, StorageError, StoredMembership, TypeConfig};
use openraft::storage::{RaftSnapshotBuilder, RaftStateMachine};
use openraft::{ErrorSubject, ErrorVerb, OptionalSend, StorageIOError};

use crate::archive::{Archive, Record};
use crate::stats::Stats;

fn sm_err(verb: ErrorVerb, e: &impl ToString) -> StorageError {
    StorageIOError::new(ErrorSubject::StateMachine, verb, openraft::AnyError::error(e.to_string())).into()
}

/// The archive behind a lock: the state machine appends, the admin server reads plans
/// and truncates.
pub type SharedArchive = Arc<Mutex<Archive>>;

pub fn lock(a: &SharedArchive) -> MutexGuard<'_, Archive> {
    // Every archive operation leaves the file and its summary consistent or fails first.
    a.lock().unwrap_or_else(|p| p.into_inner())
}

#[derive(Clone)]
pub struct ArchiveSm {
    archive: SharedArchive,
    /// The logger's Raft files (`<dir>/<id>.raft`): its own snapshot marks live here.
    raft_dir: PathBuf,
    cover: Option<SnapshotCover>,
    stats: Arc<Stats>,
    seq: Arc<AtomicU64>,
    /// Snapshot files being received, oldest first.
    receiving: Arc<Mutex<Vec<PathBuf>>>,
}

impl ArchiveSm {
    pub fn new(archive: SharedArchive, raft_dir: &Path, cover: Option<SnapshotCover>, stats: Arc<Stats>) -> Self {
        let last = lock(&archive).last.map(|l| l.index);
        // Everything archived is durable, so the Raft log may be purged up to it.
        if let Some(c) = &cover {
            c.advance(last);
        }
        ArchiveSm {
            archive,
            raft_dir: raft_dir.to_path_buf(),
            cover,
            stats,
            seq: Arc::default(),
            receiving: Arc::default(),
        }
    }

    fn meta_path(&self) -> PathBuf {
        self.raft_dir.join("snapshot.meta")
    }

    fn empty_data(&self) -> PathBuf {
        self.raft_dir.join("snapshot.empty")
    }

    async fn snapshot_of(&self, meta: SnapshotMeta) -> Result<Snapshot, StorageError> {
        let path = self.empty_data();
        let file = tokio::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .await
            .map_err(|e| sm_err(ErrorVerb::Read, &e))?;
        Ok(Snapshot { meta, snapshot: Box::new(file) })
    }

    async fn blocking<T: Send + 'static>(
        &self,
        verb: ErrorVerb,
        f: impl FnOnce(&mut Archive) -> Result<T, crate::archive::ArchiveError> + Send + 'static,
    ) -> Result<T, StorageError> {
        let archive = self.archive.clone();
        tokio::task::spawn_blocking(move || f(&mut lock(&archive)))
            .await
            .map_err(|e| sm_err(verb, &e))?
            .map_err(|e| sm_err(verb, &e))
    }
}

impl RaftSnapshotBuilder<TypeConfig> for ArchiveSm {
    async fn build_snapshot(&mut self) -> Result<Snapshot, StorageError> {
        let (last, membership) = {
            let a = lock(&self.archive);
            (a.last, a.membership.clone())
        };
        let meta = SnapshotMeta {
            last_log_id: last,
            last_membership: membership,
            snapshot_id: format!(
                "archive-{}-{}",
                last.map_or(0, |l| l.index),
                self.seq.fetch_add(1, Ordering::Relaxed)
            ),
        };
        let path = self.meta_path();
        let m = meta.clone();
        tokio::task::spawn_blocking(move || write_small(&path, &m))
            .await
            .map_err(|e| sm_err(ErrorVerb::Write, &e))?
            .map_err(|e| sm_err(ErrorVerb::Write, &e))?;
        if let Some(c) = &self.cover {
            c.advance(last.map(|l| l.index));
        }
        self.snapshot_of(meta).await
    }
}

impl RaftStateMachine<TypeConfig> for ArchiveSm {
    type SnapshotBuilder = Self;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), StorageError> {
        let a = lock(&self.archive);
        Ok((a.last, a.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Response>, StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let records: Vec<Record> = entries.into_iter().map(Record::of_entry).collect();
        let commands = records.iter().map(|r| r.commands() as u64).sum();
        let n = records.len();
        let last = self
            .blocking(ErrorVerb::Write, move |a| {
                a.append(&records)?;
                Ok(a.last.map(|l| l.index))
            })
            .await?;
        self.stats.archived(last.unwrap_or(0), n as u64, commands);
        Ok(vec![Response::default(); n])
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<tokio::fs::File>, StorageError> {
        // Beside the archive, so that keeping it is a rename in the same directory.
        let archive = lock(&self.archive).path().display().to_string();
        let path = PathBuf::from(format!("{archive}.receiving-{}", self.seq.fetch_add(1, Ordering::Relaxed)));
        let file = tokio::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .await
            .map_err(|e| sm_err(ErrorVerb::Write, &e))?;
        self.receiving().push(path);
        Ok(Box::new(file))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: Box<tokio::fs::File>,
    ) -> Result<(), StorageError> {
        drop(snapshot);
        // openraft hands back the file it got from `begin_receiving_snapshot`: the oldest
        // one not installed yet (it receives one snapshot at a time).
        let path = {
            let mut r = self.receiving();
            if r.is_empty() {
                return Err(sm_err(ErrorVerb::Write, &"a snapshot to install that was never received"));
            }
            r.remove(0)
        };
        let (log_id, membership) = match meta.last_log_id {
            Some(l) => (l, meta.last_membership.clone()),
            None => return Err(sm_err(ErrorVerb::Write, &"a snapshot with no last log id")),
        };
        let res = self.blocking(ErrorVerb::Write, move |a| a.install_snapshot(&path, log_id, membership)).await;
        if let Err(e) = &res {
            if let Some(c) = &self.cover {
                c.fail(e.to_string());
            }
            return res;
        }
        tracing::info!(index = log_id.index, "archived a snapshot from the cluster; entries resume after it");
        let p = self.meta_path();
        let m = meta.clone();
        tokio::task::spawn_blocking(move || write_small(&p, &m))
            .await
            .map_err(|e| sm_err(ErrorVerb::Write, &e))?
            .map_err(|e| sm_err(ErrorVerb::Write, &e))?;
        if let Some(c) = &self.cover {
            c.advance(Some(log_id.index));
        }
        self.stats.archived(log_id.index, 0, 0);
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, StorageError> {
        let path = self.meta_path();
        let meta: Option<SnapshotMeta> = tokio::task::spawn_blocking(move || read_small(&path))
            .await
            .map_err(|e| sm_err(ErrorVerb::Read, &e))?
            .map_err(|e: io::Error| sm_err(ErrorVerb::Read, &e))?;
        match meta {
            Some(meta) => Ok(Some(self.snapshot_of(meta).await?)),
            None => Ok(None),
        }
    }
}

impl ArchiveSm {
    fn receiving(&self) -> MutexGuard<'_, Vec<PathBuf>> {
        self.receiving.lock().unwrap_or_else(|p| p.into_inner())
    }
}
