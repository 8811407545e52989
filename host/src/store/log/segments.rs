//! The segment files: reading them back at start-up, and the writer that appends,
//! truncates and purges them and records the committed hint.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use openraft::RaftLogId;

use super::record::{body_len, decode_records, encode_record, RECORD_HEADER};
use super::spare::{make_spare, Spare, SPARE};
use super::syncer::SyncJob;
use crate::store::files::{sync_dir, write_small};
use crate::types::{Entry, LogId};

/// Segment size at which the writer starts a new file.
pub const SEGMENT_BYTES: u64 = 16 * 1024 * 1024;
/// How often the committed hint is rewritten at most: it is recorded on every commit,
/// on the path of every write.
const COMMITTED_HINT_EVERY: std::time::Duration = std::time::Duration::from_millis(50);

pub(super) fn segment_name(first: u64) -> String {
    format!("{first:020}.seg")
}

pub(super) struct Segment {
    pub(super) first: u64,
    /// One past the index of its last record: the only index an append may continue it at.
    pub(super) next: u64,
    /// Shared with the `log-sync` thread, which syncs it.
    pub(super) file: Arc<File>,
    pub(super) len: u64,
}

pub(super) type Loaded = (Vec<Segment>, BTreeMap<u64, Entry>, BTreeMap<u64, (u64, u64)>);

pub(super) fn load_segments(dir: &Path, last_purged: Option<LogId>) -> io::Result<Loaded> {
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
pub(super) struct Writer {
    dir: PathBuf,
    pub(super) segments: Vec<Segment>,
    /// index -> (segment first index, byte offset), for truncation.
    offsets: BTreeMap<u64, (u64, u64)>,
    pub(super) fsync: bool,
    /// Kept open, with its length: the hint is rewritten up to every
    /// [`COMMITTED_HINT_EVERY`] under load.
    committed_file: Option<(File, u64)>,
    /// When the hint was last written.
    committed_written: Option<std::time::Instant>,
    /// The next segment: a purged one, or one a helper thread zero-fills once the current
    /// one is half full.
    pub(super) spare: Option<Spare>,
    /// To the `log-sync` thread, when the leader writes ahead of its fsync.
    pub(super) syncer: Option<std::sync::mpsc::Sender<SyncJob>>,
}

impl Writer {
    pub(super) fn new(dir: &Path, segments: Vec<Segment>, offsets: BTreeMap<u64, (u64, u64)>, fsync: bool) -> Self {
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
    pub(super) fn sync(&self) -> io::Result<()> {
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

    pub(super) fn append(&mut self, records: &[u8], first: u64, last: u64) -> io::Result<()> {
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
            let len = body_len(&records[pos..]);
            self.offsets.insert(index, (seg.first, seg.len + pos as u64));
            pos += RECORD_HEADER + len;
            index += 1;
        }
        debug_assert_eq!(index, last + 1);
        seg.len += records.len() as u64;
        seg.next = last + 1;
        Ok(())
    }

    pub(super) fn truncate(&mut self, since: u64) -> io::Result<()> {
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

    pub(super) fn purge(&mut self, upto: LogId) -> io::Result<()> {
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
    pub(super) fn write_committed(&mut self, committed: Option<LogId>) -> io::Result<()> {
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
