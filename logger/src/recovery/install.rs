//! The installer: a thread of its own (guest calls must not run on a tokio thread) that
//! reads the `recover` answer as it arrives, record by record, and builds the state in a
//! fresh guest instance exactly as a member does: a snapshot record is restored (checked
//! like a member checks a snapshot file, then the restored digest against the recorded
//! one), and each command goes through `host::store::sm::apply_command`, under the same
//! per-command fuel, in log order. Entries must follow each other with no gap.
//!
//! A connection that breaks off leaves the state at the last whole record; the driver
//! asks again from the next index and the installer goes on. A snapshot that was cut
//! off is discarded whole (the instance in use stays as it was). What cannot be resumed
//! stops the recovery: a corrupt record (named by index and byte offset in the answer), a
//! failure of the guest's limits. A command that traps is what members answer with an
//! error while their state stays as before it (they rebuild from their snapshot and log):
//! recovery keeps none of what it streamed, so it drops its state and asks again from the
//! first index, skipping the commands known to trap, which leaves the same state.

use std::collections::BTreeSet;
use std::fs::{self, File};
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use host::archive::{Record, MAX_RECORD};
use host::fsm::{ApplyOutcome, GuestModule, Instance};
use host::store::files::sync_dir;
use host::store::log::record::{read_record, Next};
use host::store::sm::{apply_command, check_restored, CHUNK};
use host::store::snapfile::{SnapStream, SnapWriter};
use host::types::{LogId, SnapshotMeta, StoredMembership};
use tokio::sync::mpsc;

use super::{Progress, RecoveryError, CHANNEL_CHUNKS};

/// What goes from the connection to the installer.
enum Msg {
    Chunk(Bytes),
    /// The answer ended: cleanly (`None`) or cut off, and why.
    End(Option<String>),
}

/// How a connection's answer ended, for the driver.
pub enum Outcome {
    /// Everything up to the last index is installed (and written, with `--data-dir`).
    Done(Done),
    /// Cut off: ask again from `next`.
    Cut {
        next: u64,
        why: String,
    },
    /// A command trapped: the state was dropped; ask again from the first index, and the
    /// installer skips the commands known to trap, as members do when they rebuild.
    Replay {
        from: u64,
        why: String,
    },
    Fatal(RecoveryError),
}

/// The installed state.
#[derive(Debug, Clone)]
pub struct Done {
    pub first_index: u64,
    pub last_index: u64,
    pub entries: u64,
    pub commands: u64,
    pub guest_errors: u64,
    pub snapshot_index: Option<u64>,
    pub snapshot_bytes: u64,
    pub digest: String,
    /// Time spent restoring and applying, waits for bytes excluded.
    pub install: Duration,
}

/// The driver's handle on the installer thread.
pub struct Installer {
    tx: mpsc::Sender<Msg>,
    outcomes: tokio::sync::Mutex<mpsc::Receiver<Outcome>>,
}

/// Refuses a data dir that holds anything: a member's dir has its own identity and log,
/// which a recovered snapshot must never be mixed into.
pub fn check_data_dir(dir: &Path) -> Result<(), RecoveryError> {
    match fs::read_dir(dir) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                return Err(RecoveryError::Input(format!(
                    "--data-dir {} is not empty: recovery writes only into an empty or new directory",
                    dir.display()
                )));
            }
            Ok(())
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(RecoveryError::Input(format!("--data-dir {}: {e}", dir.display()))),
    }
}

impl Installer {
    /// Starts the thread that installs `from..=to`.
    pub fn start(
        module: Arc<GuestModule>,
        config: Vec<(String, String)>,
        from: u64,
        to: u64,
        data_dir: Option<PathBuf>,
        transfer_only: bool,
        progress: Arc<Progress>,
    ) -> Result<Installer, RecoveryError> {
        let guest_root = match &data_dir {
            // The host empties `<data-dir>/guest` when it starts: a good place for the
            // recovering instance's files.
            Some(d) => d.join("guest"),
            None => std::env::temp_dir().join(format!("recovery-{}", std::process::id())),
        };
        let (tx, rx) = mpsc::channel(CHANNEL_CHUNKS);
        let (out_tx, out_rx) = mpsc::channel(1);
        let mut w = Worker {
            module,
            config,
            from,
            to,
            data_dir,
            transfer_only,
            progress,
            guest_root,
            generation: 0,
            inst: None,
            last: None,
            membership: StoredMembership::default(),
            first_index: None,
            entries: 0,
            commands: 0,
            guest_errors: 0,
            snapshot: None,
            busy: Duration::ZERO,
            trapped: BTreeSet::new(),
        };
        std::thread::Builder::new()
            .name("recovery-install".into())
            .spawn(move || w.run(rx, out_tx))
            .map_err(|e| RecoveryError::Failed(format!("cannot start the installer thread: {e}")))?;
        Ok(Installer { tx, outcomes: tokio::sync::Mutex::new(out_rx) })
    }

    /// Passes a chunk of the answer on; false once the installer has stopped.
    pub async fn feed(&self, chunk: Bytes) -> bool {
        self.tx.send(Msg::Chunk(chunk)).await.is_ok()
    }

    /// The current answer ended (`cut`: why it broke off); what the installer made of it.
    pub async fn connection_ended(&self, cut: Option<String>) -> Outcome {
        let _ = self.tx.send(Msg::End(cut)).await;
        match self.outcomes.lock().await.recv().await {
            Some(o) => o,
            None => Outcome::Fatal(RecoveryError::Failed("the installer thread stopped".into())),
        }
    }

    /// Stops the installer (its thread ends when the channel closes).
    pub fn abandon(self) {
        drop(self.tx);
    }
}

/// Reads the answer out of the channel: `Read` for the record and snapshot parsers.
struct ChannelReader<'a> {
    rx: &'a mut mpsc::Receiver<Msg>,
    chunk: Bytes,
    /// Bytes of this answer consumed so far: offsets in errors.
    offset: u64,
    /// The answer ended (cleanly or not); nothing more comes for it.
    ended: bool,
    /// Why the answer was cut off, once it was.
    cut: Option<String>,
    waited: Duration,
    progress: &'a Progress,
}

impl Read for ChannelReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.chunk.is_empty() {
            if self.ended {
                return match &self.cut {
                    Some(why) => Err(io::Error::new(io::ErrorKind::ConnectionAborted, why.clone())),
                    None => Ok(0),
                };
            }
            let t = Instant::now();
            let msg = self.rx.blocking_recv();
            self.waited += t.elapsed();
            match msg {
                Some(Msg::Chunk(c)) => {
                    self.progress.bytes.fetch_add(c.len() as u64, Ordering::Relaxed);
                    self.chunk = c;
                }
                Some(Msg::End(cut)) => {
                    self.ended = true;
                    self.cut = cut;
                }
                None => {
                    self.ended = true;
                    self.cut = Some("recovery stopped".into());
                }
            }
        }
        let n = buf.len().min(self.chunk.len());
        buf[..n].copy_from_slice(&self.chunk[..n]);
        let _ = self.chunk.split_to(n);
        self.offset += n as u64;
        Ok(n)
    }
}

impl ChannelReader<'_> {
    /// Reads the rest of this answer away (after a failure), so the driver's last send
    /// does not wait on a thread that stopped reading.
    fn drain(&mut self) {
        let mut sink = [0u8; 64 << 10];
        while let Ok(n) = self.read(&mut sink) {
            if n == 0 {
                break;
            }
        }
    }
}

/// What went wrong inside one answer.
enum Stop {
    /// The connection broke off: resumable.
    Cut(String),
    /// A command trapped: start over, skipping it.
    Replay(String),
    Fatal(RecoveryError),
}

struct Worker {
    module: Arc<GuestModule>,
    config: Vec<(String, String)>,
    from: u64,
    to: u64,
    data_dir: Option<PathBuf>,
    transfer_only: bool,
    progress: Arc<Progress>,
    guest_root: PathBuf,
    generation: u64,
    inst: Option<(Instance, PathBuf)>,
    /// The last entry or snapshot installed.
    last: Option<LogId>,
    membership: StoredMembership,
    first_index: Option<u64>,
    entries: u64,
    commands: u64,
    guest_errors: u64,
    /// The snapshot the state started from: index and bytes.
    snapshot: Option<(u64, u64)>,
    busy: Duration,
    /// Commands (index, position) that trapped: skipped on the next pass.
    trapped: BTreeSet<(u64, usize)>,
}

/// Commands that may trap before recovery gives up: each one costs a transfer from the
/// first index.
const MAX_TRAPS: usize = 16;

fn fatal(why: String) -> Stop {
    Stop::Fatal(RecoveryError::Failed(why))
}

impl Worker {
    fn run(&mut self, mut rx: mpsc::Receiver<Msg>, out: mpsc::Sender<Outcome>) {
        let progress = self.progress.clone();
        let outcome = loop {
            let mut reader = ChannelReader {
                rx: &mut rx,
                chunk: Bytes::new(),
                offset: 0,
                ended: false,
                cut: None,
                waited: Duration::ZERO,
                progress: &progress,
            };
            let started = Instant::now();
            let res = self.consume(&mut reader);
            reader.drain();
            // Busy time: this answer's time minus the waits for its bytes (and the wait
            // for its end once the last record was read).
            self.busy += started.elapsed().saturating_sub(reader.waited);
            let next = self.next_index();
            let outcome = match res {
                Ok(()) if self.last.is_some_and(|l| l.index >= self.to) => match self.finish() {
                    Ok(done) => Outcome::Done(done),
                    Err(e) => Outcome::Fatal(e),
                },
                Ok(()) => Outcome::Cut {
                    next,
                    why: format!("the answer ended before index {} (at byte {})", self.to, reader.offset),
                },
                Err(Stop::Cut(why)) => Outcome::Cut { next, why },
                Err(Stop::Replay(why)) => {
                    self.start_over();
                    Outcome::Replay { from: self.from, why }
                }
                Err(Stop::Fatal(e)) => Outcome::Fatal(e),
            };
            match outcome {
                Outcome::Cut { .. } | Outcome::Replay { .. } => {
                    if out.blocking_send(outcome).is_err() {
                        return;
                    }
                }
                o => break o,
            }
        };
        let _ = out.blocking_send(outcome);
        if self.data_dir.is_none() {
            let _ = fs::remove_dir_all(&self.guest_root);
        }
    }

    fn next_index(&self) -> u64 {
        self.last.map_or(self.from, |l| l.index + 1)
    }

    /// An I/O error while reading the answer: the connection's (resumable) or the data's.
    fn io_stop(reader: &ChannelReader, what: String, e: io::Error) -> Stop {
        match &reader.cut {
            Some(why) => Stop::Cut(format!("{what}: {why}")),
            None => fatal(format!("{what}: {e}")),
        }
    }

    fn consume(&mut self, reader: &mut ChannelReader) -> Result<(), Stop> {
        let mut body = Vec::new();
        loop {
            let offset = reader.offset;
            let due = self.next_index();
            let next = read_record(reader, &mut body, MAX_RECORD)
                .map_err(|e| Self::io_stop(reader, format!("reading the record for index {due}"), e))?;
            let rec = match next {
                Next::End => return Ok(()),
                Next::Short { have } => {
                    return Err(Stop::Cut(format!(
                        "the answer ended inside the record for index {due} at byte {offset} ({have} bytes of it)"
                    )))
                }
                Next::Bad { len } => {
                    return Err(fatal(format!(
                        "corrupt record for index {due} at byte {offset} of the answer from the source: checksum \
                         mismatch or impossible length ({len})"
                    )))
                }
                Next::Record { .. } => bincode::deserialize::<Record>(&body).map_err(|e| {
                    fatal(format!("corrupt record for index {due} at byte {offset}: intact but undecodable ({e})"))
                })?,
            };
            match rec {
                Record::Snapshot { log_id, bytes, membership, .. } => {
                    self.snapshot_record(reader, log_id, bytes, membership)?;
                }
                Record::Entry { log_id, commands, membership } => {
                    // The first entry of a fresh state is the first index asked for (or
                    // the one after the snapshot); then every index follows the last.
                    if log_id.index != due {
                        return Err(fatal(format!(
                            "the source sent entry {} at byte {offset} where entry {due} was due",
                            log_id.index
                        )));
                    }
                    if !self.transfer_only {
                        for (pos, command) in commands.iter().enumerate() {
                            self.apply(&log_id, pos, command)?;
                        }
                    }
                    if let Some(m) = membership {
                        self.membership = StoredMembership::new(Some(log_id), m);
                    }
                    self.first_index.get_or_insert(log_id.index);
                    self.commands += commands.len() as u64;
                    self.entries += 1;
                    self.last = Some(log_id);
                    self.progress.index.store(log_id.index, Ordering::Relaxed);
                }
            }
        }
    }

    /// Drops the state built so far (a command trapped); what is known to trap stays.
    fn start_over(&mut self) {
        if let Some((_, dir)) = self.inst.take() {
            let _ = fs::remove_dir_all(dir);
        }
        self.last = None;
        self.membership = StoredMembership::default();
        self.first_index = None;
        self.entries = 0;
        self.commands = 0;
        self.guest_errors = 0;
        self.snapshot = None;
    }

    /// A new, empty directory for an instance (its `/data`).
    fn fresh_dir(&mut self) -> Result<PathBuf, Stop> {
        let dir = self.guest_root.join(self.generation.to_string());
        self.generation += 1;
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).map_err(|e| fatal(format!("{}: {e}", dir.display())))?;
        Ok(dir)
    }

    fn fresh(&mut self) -> Result<(Instance, PathBuf), Stop> {
        let dir = self.fresh_dir()?;
        match Instance::new(&self.module, &self.config, Some(&dir), 0) {
            Ok(i) => Ok((i, dir)),
            Err(e) => Err(Stop::Fatal(RecoveryError::Input(format!(
                "the guest {} refused to start with these settings: {e}",
                self.module.path().display()
            )))),
        }
    }

    /// Replaces the state by the snapshot that follows the mark; the instance in use
    /// stays until the new one is complete.
    fn snapshot_record(
        &mut self,
        reader: &mut ChannelReader,
        log_id: LogId,
        bytes: u64,
        membership: StoredMembership,
    ) -> Result<(), Stop> {
        let what = format!("the snapshot at index {}", log_id.index);
        if self.transfer_only {
            let got = io::copy(&mut (&mut *reader).take(bytes), &mut io::sink())
                .map_err(|e| Self::io_stop(reader, what.clone(), e))?;
            if got < bytes {
                return Err(Stop::Cut(format!("{what} ended after {got} of {bytes} bytes")));
            }
        } else {
            let (mut inst, dir) = self.fresh()?;
            let res = restore(&mut inst, reader, bytes, log_id, &what);
            if let Err(e) = res {
                let _ = fs::remove_dir_all(&dir);
                return Err(e);
            }
            if let Some((_, old)) = self.inst.replace((inst, dir)) {
                let _ = fs::remove_dir_all(old);
            }
        }
        self.first_index.get_or_insert(log_id.index);
        self.snapshot = Some((log_id.index, bytes));
        self.membership = membership;
        self.last = Some(log_id);
        self.progress.index.store(log_id.index, Ordering::Relaxed);
        Ok(())
    }

    fn apply(&mut self, log_id: &LogId, pos: usize, command: &[u8]) -> Result<(), Stop> {
        if self.trapped.contains(&(log_id.index, pos)) {
            // The error result every member answered; no effect on the state.
            self.guest_errors += 1;
            return Ok(());
        }
        if self.inst.is_none() {
            let made = self.fresh()?;
            self.inst = Some(made);
        }
        let Some((inst, _)) = self.inst.as_mut() else { return Err(fatal("no guest instance".into())) };
        match apply_command(inst, log_id, command) {
            ApplyOutcome::Result(Ok(_)) => Ok(()),
            // An error result is part of the state, as on every member.
            ApplyOutcome::Result(Err(_)) => {
                self.guest_errors += 1;
                Ok(())
            }
            // Members answer an error, rebuild their instance from their snapshot and the log
            // before the command, skipping the commands known to trap, and go on. Recovery
            // keeps none of what it streamed, so it starts over from the first index with
            // the command marked, which leaves the same state.
            ApplyOutcome::Trap(why) => {
                if self.trapped.len() >= MAX_TRAPS {
                    return Err(fatal(format!(
                        "the guest trapped on entry {} (command {pos}): {why}; {MAX_TRAPS} commands trapped already, \
                         each costing a transfer from the start: recover from a replica's snapshot past them",
                        log_id.index
                    )));
                }
                self.trapped.insert((log_id.index, pos));
                Err(Stop::Replay(format!("the guest trapped on entry {} (command {pos}): {why}", log_id.index)))
            }
            ApplyOutcome::MemberFailure(why) => {
                Err(fatal(format!("entry {} (command {pos}) could not be applied here: {why}", log_id.index)))
            }
        }
    }

    /// The state is complete: its digest, and the data dir's snapshot if asked for.
    fn finish(&mut self) -> Result<Done, RecoveryError> {
        let started = Instant::now();
        let last = self.last.ok_or_else(|| RecoveryError::Failed("nothing was received".into()))?;
        let digest = if self.transfer_only {
            String::new()
        } else {
            if self.inst.is_none() {
                let made = self.fresh().map_err(stop_error)?;
                self.inst = Some(made);
            }
            let Some((inst, _)) = self.inst.as_mut() else {
                return Err(RecoveryError::Failed("no guest instance".into()));
            };
            let digest = inst.digest().map_err(|e| RecoveryError::Failed(format!("the guest's digest: {e}")))?;
            if let Some(dir) = self.data_dir.clone() {
                self.write_data_dir(&dir, last)?;
            }
            hex::encode(digest)
        };
        self.busy += started.elapsed();
        Ok(Done {
            first_index: self.first_index.unwrap_or(last.index),
            last_index: last.index,
            entries: self.entries,
            commands: self.commands,
            guest_errors: self.guest_errors,
            snapshot_index: self.snapshot.map(|s| s.0),
            snapshot_bytes: self.snapshot.map_or(0, |s| s.1),
            digest,
            install: self.busy,
        })
    }

    /// Writes the state as `DIR/snapshots/current.snap`, in the host's snapshot format,
    /// the way a member writes its own: a `host --join` started on DIR restores it and
    /// takes only the entries after it from the leader.
    fn write_data_dir(&mut self, dir: &Path, last: LogId) -> Result<(), RecoveryError> {
        let failed = |what: &str, e: &dyn std::fmt::Display| RecoveryError::Failed(format!("--data-dir: {what}: {e}"));
        let snaps = dir.join("snapshots");
        fs::create_dir_all(&snaps).map_err(|e| failed(&snaps.display().to_string(), &e))?;
        let meta = SnapshotMeta {
            last_log_id: Some(last),
            last_membership: self.membership.clone(),
            snapshot_id: format!("{}-{}", last.leader_id.term, last.index),
        };
        let tmp = snaps.join("building.snap");
        let file = File::create(&tmp).map_err(|e| failed("creating the snapshot", &e))?;
        let mut w = SnapWriter::create(file, &meta).map_err(|e| failed("writing the snapshot", &e))?;
        let Some((inst, _)) = self.inst.as_mut() else {
            return Err(RecoveryError::Failed("no guest instance".into()));
        };
        inst.snapshot_to(w.stream(), CHUNK).map_err(|e| failed("the guest's snapshot", &e))?;
        let digest = inst.digest().map_err(|e| failed("the guest's digest", &e))?;
        let f = w.finish(&digest).map_err(|e| failed("writing the snapshot", &e))?;
        f.sync_all().map_err(|e| failed("syncing the snapshot", &e))?;
        fs::rename(&tmp, snaps.join("current.snap")).map_err(|e| failed("renaming the snapshot", &e))?;
        sync_dir(&snaps).map_err(|e| failed("syncing its directory", &e))?;
        sync_dir(dir).map_err(|e| failed("syncing the data dir", &e))?;
        Ok(())
    }
}

fn stop_error(s: Stop) -> RecoveryError {
    match s {
        Stop::Cut(why) | Stop::Replay(why) => RecoveryError::Failed(why),
        Stop::Fatal(e) => e,
    }
}

/// Restores `inst` from the snapshot file that follows in `reader` (`bytes` long), checked
/// as a member checks one: header, checksum before `finish`, then the restored digest
/// against the recorded one, and the file must be the snapshot its mark announced.
fn restore(inst: &mut Instance, reader: &mut ChannelReader, bytes: u64, log_id: LogId, what: &str) -> Result<(), Stop> {
    let mut stream = match SnapStream::open(&mut *reader, bytes) {
        Ok(s) => s,
        Err(e) => return Err(Worker::io_stop(reader, what.to_string(), e)),
    };
    if stream.meta.last_log_id != Some(log_id) {
        return Err(fatal(format!("{what}: the file describes {:?}", stream.meta.last_log_id)));
    }
    let restored = inst.restore_from(&mut stream, CHUNK as usize);
    let recorded = stream.digest().map(<[u8]>::to_vec);
    drop(stream);
    if let Err(e) = restored {
        return Err(match &reader.cut {
            Some(why) => Stop::Cut(format!("{what}: {why}")),
            None => fatal(format!("{what}: the guest's restore failed: {e}")),
        });
    }
    check_restored(inst, recorded.as_deref()).map_err(|e| fatal(format!("{what}: {e}")))
}
