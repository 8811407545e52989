//! `--monitor FILE`: one JSON line per interval (one second) describing this member's
//! resource use, the successor of the original project's psutil script.
//!
//! Each line: `{"ts_ms", "elapsed_s", "applied_per_s", "applied_total", "cpu_percent",
//! "rss_bytes", "disk_read_bytes", "disk_write_bytes", "net_rx_bytes", "net_tx_bytes"}`.
//! Rates and byte counts cover the interval just ended. CPU is this process's share of one
//! core (200 = two cores busy). Disk bytes are this process's (Linux `/proc/<pid>/io`:
//! what reached the block layer, fsync'd log included). Network bytes are the whole
//! machine's (or container's) interfaces, loopback included: per-process network
//! counters do not exist.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use sysinfo::{Networks, Pid, ProcessRefreshKind, ProcessesToUpdate, System};

use crate::metrics::Metrics;

#[derive(Debug, Serialize, serde::Deserialize, PartialEq)]
pub struct Sample {
    pub ts_ms: u64,
    pub elapsed_s: f64,
    pub applied_per_s: f64,
    pub applied_total: u64,
    pub cpu_percent: f32,
    pub rss_bytes: u64,
    pub disk_read_bytes: u64,
    pub disk_write_bytes: u64,
    pub net_rx_bytes: u64,
    pub net_tx_bytes: u64,
}

/// Stops the sampler (and flushes its file) when dropped.
pub struct Monitor {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Monitor {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Start sampling into `path` every `interval`.
pub fn start(path: &Path, interval: Duration, metrics: Arc<Metrics>) -> std::io::Result<Monitor> {
    let file = File::create(path)?;
    let pid = sysinfo::get_current_pid().map_err(std::io::Error::other)?;
    let mut sys = System::new().map_err(std::io::Error::other)?;
    let mut nets = Networks::new_with_refreshed_list().map_err(std::io::Error::other)?;
    refresh(&mut sys, pid);
    let mut last_applied = metrics.applied_commands();
    let (tx, rx) = mpsc::channel::<()>();
    let thread = std::thread::Builder::new().name("monitor".into()).spawn(move || {
        let mut out = BufWriter::new(file);
        let started = Instant::now();
        let mut last = Instant::now();
        let mut next = started + interval;
        // Anything but a timeout means "stop": whatever was written is flushed below.
        while let Err(mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(next.saturating_duration_since(Instant::now()))
        {
            next += interval;
            refresh(&mut sys, pid);
            nets.refresh(true);
            let now = Instant::now();
            let secs = now.duration_since(last).as_secs_f64().max(1e-9);
            last = now;
            let applied = metrics.applied_commands();
            let (cpu, rss, disk) =
                sys.process(pid).map_or((0.0, 0, Default::default()), |p| (p.cpu_usage(), p.memory(), p.disk_usage()));
            let (rx_bytes, tx_bytes) =
                nets.iter().fold((0, 0), |(r, t), (_, n)| (r + n.received(), t + n.transmitted()));
            let sample = Sample {
                ts_ms: SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64),
                elapsed_s: started.elapsed().as_secs_f64(),
                applied_per_s: (applied - last_applied) as f64 / secs,
                applied_total: applied,
                cpu_percent: cpu,
                rss_bytes: rss,
                disk_read_bytes: disk.read_bytes,
                disk_write_bytes: disk.written_bytes,
                net_rx_bytes: rx_bytes,
                net_tx_bytes: tx_bytes,
            };
            last_applied = applied;
            let line = serde_json::to_string(&sample).unwrap_or_default();
            // Flushed each time so that a killed member still leaves its samples behind.
            if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
                tracing::warn!("monitor file write failed; sampling stops");
                break;
            }
        }
        let _ = out.flush();
    })?;
    Ok(Monitor { stop: Some(tx), thread: Some(thread) })
}

fn refresh(sys: &mut System, pid: Pid) {
    sys.refresh_processes_specifics(
        ProcessesToUpdate::Some(&[pid]),
        true,
        ProcessRefreshKind::nothing().with_cpu().with_memory().with_disk_usage(),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_well_formed_samples() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("monitor.jsonl");
        let metrics = Arc::new(Metrics::default());
        let m = start(&path, Duration::from_millis(50), metrics.clone()).expect("start");
        // Some work for the counters and the CPU figure to see.
        for _ in 0..500 {
            metrics.observe_apply(Duration::from_micros(3));
        }
        let data = std::fs::write(dir.path().join("junk"), vec![7u8; 1 << 20]);
        assert!(data.is_ok());
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::fs::read_to_string(&path).map_or(0, |s| s.lines().count()) < 3 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        drop(m);
        let text = std::fs::read_to_string(&path).expect("read");
        let samples: Vec<Sample> =
            text.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"))).collect();
        assert!(samples.len() >= 3, "{text}");
        assert!(samples.windows(2).all(|w| w[1].elapsed_s > w[0].elapsed_s), "{text}");
        assert_eq!(samples.iter().map(|s| s.applied_total).max(), Some(500));
        assert!(samples.iter().any(|s| s.applied_per_s > 0.0), "the applies show up as a rate: {text}");
        assert!(samples.last().is_some_and(|s| s.applied_per_s == 0.0), "and stop when they stop: {text}");
        assert!(samples.iter().all(|s| s.rss_bytes > 0), "{text}");
    }
}
