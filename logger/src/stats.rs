//! Figures of one followed cluster: what `/status` and `/metrics` show and the
//! per-second throughput file.

use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, Default)]
pub struct Stats {
    /// The last index in the archive (entry or snapshot).
    pub archived_index: AtomicU64,
    pub archived_entries: AtomicU64,
    pub archived_commands: AtomicU64,
    /// The cluster's commit index, as its leader last reported it (0: not heard yet).
    pub cluster_committed: AtomicU64,
    pub truncations: AtomicU64,
}

impl Stats {
    pub fn archived(&self, last: u64, entries: u64, commands: u64) {
        self.archived_index.fetch_max(last, Ordering::Relaxed);
        self.archived_entries.fetch_add(entries, Ordering::Relaxed);
        self.archived_commands.fetch_add(commands, Ordering::Relaxed);
    }

    /// Committed entries not archived yet, as far as this logger knows.
    pub fn lag(&self) -> u64 {
        self.cluster_committed.load(Ordering::Relaxed).saturating_sub(self.archived_index.load(Ordering::Relaxed))
    }
}

/// Appends one line a second to `path`: seconds since start, and the commands archived
/// in that second (the original logger's throughput file).
pub async fn throughput(path: &Path, stats: Arc<Stats>) -> std::io::Result<()> {
    let mut file = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    let mut before = stats.archived_commands.load(Ordering::Relaxed);
    let mut second = 0u64;
    loop {
        tick.tick().await;
        second += 1;
        let now = stats.archived_commands.load(Ordering::Relaxed);
        // A failed write (full disk) costs a line of figures, never the archive.
        if let Err(e) = writeln!(file, "{second} {}", now - before) {
            tracing::warn!(error = %e, path = %path.display(), "throughput file");
        }
        before = now;
    }
}
