//! A whole run: start the clients, let each loop until its deadline or request count,
//! merge what they measured into the [`Summary`] (the JSON line `loadgen` prints) and
//! write the files asked for.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;

use super::driver::{Answer, Driver, TextDriver};
use super::recorder::{histogram, merge, percentile, Counts, Recorded, Recorder, Sampler, Series};
use super::workload::{client_seed, Workload};
use super::{Config, ConfigError};
use crate::client::Client;

/// Pause after a failed request: a down member or a leaderless cluster must not turn
/// every client into a busy loop that steals CPU from the members it is measuring.
const ERROR_PAUSE: Duration = Duration::from_millis(100);

/// The JSON line `loadgen` prints; the field order is part of its output.
#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct Summary {
    pub ops: u64,
    pub ops_per_s: f64,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub max_us: u64,
    pub errors: u64,
    pub unknown_outcomes: u64,
    pub guest_errors: u64,
    pub warmup_ops: u64,
    pub warmup_errors: u64,
    pub clients: usize,
    pub value_size: usize,
    pub get_ratio: f64,
    pub protocol: &'static str,
    /// The measured period (warm-up excluded).
    pub seconds: f64,
}

impl Summary {
    fn new(config: &Config, counts: &Counts, hist: &Histogram<u64>, seconds: f64) -> Summary {
        Summary {
            ops: counts.ops,
            ops_per_s: if seconds > 0.0 { counts.ops as f64 / seconds } else { 0.0 },
            p50_us: percentile(hist, 50.0),
            p90_us: percentile(hist, 90.0),
            p99_us: percentile(hist, 99.0),
            max_us: hist.max(),
            errors: counts.errors,
            unknown_outcomes: counts.unknown_outcomes,
            guest_errors: counts.guest_errors,
            warmup_ops: counts.warmup_ops,
            warmup_errors: counts.warmup_errors,
            clients: config.clients,
            value_size: config.value_size,
            get_ratio: config.get_ratio,
            protocol: config.protocol(),
            seconds,
        }
    }
}

/// Everything a run measured.
pub struct Run {
    pub summary: Summary,
    /// The sampled latencies (µs) in completion order per client; empty unless
    /// `--latency-out` was given.
    pub latencies: Vec<u64>,
    pub series: Series,
    /// Client tasks that ended abnormally (a panic); each also counts as one error.
    pub client_failures: Vec<String>,
}

/// A file the run could not write.
#[derive(Debug, thiserror::Error)]
#[error("cannot write {}: {source}", path.display())]
pub struct OutputError {
    pub path: PathBuf,
    pub source: std::io::Error,
}

impl Run {
    /// The `--series-out` file's text.
    pub fn series_csv(&self) -> String {
        self.series.csv(self.summary.seconds)
    }

    /// Writes the `--latency-out` and `--series-out` files the config asks for; tries
    /// each one and returns the failures.
    pub fn write_outputs(&self, config: &Config) -> Vec<OutputError> {
        let write = |path: &Path, text: String| {
            std::fs::write(path, text).map_err(|source| OutputError { path: path.to_path_buf(), source })
        };
        let mut failures = Vec::new();
        if let Some(path) = &config.latency_out {
            failures.extend(write(path, self.latencies.iter().map(|l| format!("{l}\n")).collect()).err());
        }
        if let Some(path) = &config.series_out {
            failures.extend(write(path, self.series_csv()).err());
        }
        failures
    }
}

/// When the clients stop, and how long they think between requests.
pub(super) struct Plan {
    pub start: Instant,
    pub deadline: Option<Instant>,
    pub requests: Option<u64>,
    pub think_ms: u64,
}

impl Plan {
    fn more(&self, sent: u64) -> bool {
        self.deadline.is_none_or(|d| Instant::now() < d) && self.requests.is_none_or(|n| sent < n)
    }

    async fn pause(&self, d: Duration) {
        let d = match self.deadline {
            Some(dl) => d.min(dl.saturating_duration_since(Instant::now())),
            None => d,
        };
        if !d.is_zero() {
            tokio::time::sleep(d).await;
        }
    }
}

pub(super) async fn run_client(
    mut driver: Driver,
    mut workload: Workload,
    mut rec: Recorder,
    plan: Arc<Plan>,
) -> Recorded {
    let mut sent = 0u64;
    while plan.more(sent) {
        let req = workload.next_request();
        let t = Instant::now();
        let answer = driver.call(req).await;
        let latency_us = u64::try_from(t.elapsed().as_micros()).unwrap_or(u64::MAX);
        sent += 1;
        rec.record(plan.start.elapsed(), latency_us, answer);
        if !plan.more(sent) {
            break;
        }
        match answer {
            Answer::Error | Answer::Unknown => plan.pause(ERROR_PAUSE).await,
            Answer::Ok | Answer::GuestError => plan.pause(workload.think(plan.think_ms)).await,
        }
    }
    rec.finish()
}

/// Runs the clients `config` describes against its cluster and merges what they
/// measured. Call it on a current-thread runtime, as `loadgen` does: the load generator
/// shares the cores with the members it measures, and at 32 clients it used 0.17 cores
/// (5 µs per operation) on one thread against 0.32 with a worker per core, whose
/// cross-thread wake-ups cost more than the work.
pub async fn run(config: &Config) -> Result<Run, ConfigError> {
    config.validate()?;
    let conns: Vec<Arc<Client>> = if config.text {
        Vec::new()
    } else {
        (0..config.connections.max(1)).map(|_| Arc::new(Client::new(config.cluster.clone()))).collect()
    };
    let value: Arc<[u8]> = vec![b'v'; config.value_size].into();
    let series = Arc::new(Mutex::new(Series::default()));
    let sampler = Arc::new(Sampler::new(config.sample));
    let start = Instant::now();
    let plan = Arc::new(Plan {
        start,
        deadline: config.run_limit().map(|d| start + d),
        requests: config.requests,
        think_ms: config.think_ms,
    });
    let mut tasks = Vec::new();
    for c in 0..config.clients {
        let driver = if config.text {
            Driver::Text(TextDriver::new(config.cluster.clone(), c, config.value_size))
        } else {
            Driver::Binary { client: conns[c % conns.len()].clone(), value: value.clone() }
        };
        let workload = Workload::new(client_seed(c), config.keys, config.get_ratio);
        let rec = Recorder::new(config.warmup, series.clone(), sampler.clone(), config.latency_out.is_some());
        tasks.push(tokio::spawn(run_client(driver, workload, rec, plan.clone())));
    }
    let mut counts = Counts::default();
    let mut hist = histogram();
    let mut latencies = Vec::new();
    let mut client_failures = Vec::new();
    for t in tasks {
        match t.await {
            Ok(r) => {
                counts.add(&r.counts);
                merge(&mut hist, &r.hist);
                latencies.extend(r.samples);
            }
            Err(e) => {
                client_failures.push(format!("client task failed: {e}"));
                counts.errors += 1;
            }
        }
    }
    let seconds = start.elapsed().saturating_sub(config.warmup).as_secs_f64();
    // Every client has finished, so this is the last reference.
    let series = Arc::try_unwrap(series)
        .map(|m| m.into_inner().unwrap_or_else(|p| p.into_inner()))
        .unwrap_or_else(|shared| std::mem::take(&mut *shared.lock().unwrap_or_else(|p| p.into_inner())));
    Ok(Run { summary: Summary::new(config, &counts, &hist, seconds), latencies, series, client_failures })
}

#[cfg(test)]
mod tests {
    use super::super::driver::tests::{closed_port, fake_text_server};
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[tokio::test]
    async fn clients_stop_after_their_requests() {
        let addr = fake_text_server().await;
        let series = Arc::new(Mutex::new(Series::default()));
        let plan = Arc::new(Plan { start: Instant::now(), deadline: None, requests: Some(25), think_ms: 1 });
        let rec = Recorder::new(Duration::ZERO, series, Arc::new(Sampler::new(1)), true);
        let done =
            run_client(Driver::Text(TextDriver::new(vec![addr], 0, 8)), Workload::new(1, 100, 0.0), rec, plan).await;
        assert_eq!(done.counts, Counts { ops: 25, ..Counts::default() });
        assert_eq!(done.samples.len(), 25);
        assert_eq!(done.hist.len(), 25);
    }

    #[tokio::test]
    async fn failing_clients_pause_instead_of_spinning() {
        let dead = closed_port().await;
        let series = Arc::new(Mutex::new(Series::default()));
        let start = Instant::now();
        let plan = Arc::new(Plan { start, deadline: Some(start + ms(350)), requests: None, think_ms: 0 });
        let rec = Recorder::new(Duration::ZERO, series, Arc::new(Sampler::new(1)), false);
        let done =
            run_client(Driver::Text(TextDriver::new(vec![dead], 0, 8)), Workload::new(1, 100, 0.0), rec, plan).await;
        assert_eq!(done.counts.ops, 0);
        // Requests at 0 ms and after each 100 ms pause: at most 4 before the deadline.
        assert!((1..=4).contains(&done.counts.errors), "{} errors in 350 ms", done.counts.errors);
    }

    fn config(args: &[&str]) -> Config {
        use clap::Parser;
        Config::try_parse_from(["loadgen"].iter().chain(args)).expect("valid flags")
    }

    #[tokio::test]
    async fn a_whole_run_summarises_and_writes_its_files() {
        let addr = fake_text_server().await;
        let dir = tempfile::tempdir().expect("tempdir");
        let (lat, series) = (dir.path().join("lat.txt"), dir.path().join("series.csv"));
        let mut c = config(&["--text", "--clients", "3", "--requests", "20", "--keys", "10", "--value-size", "5"]);
        c.cluster = vec![addr];
        c.latency_out = Some(lat.clone());
        c.series_out = Some(series.clone());
        c.sample = 2;
        let run = run(&c).await.expect("valid config");
        let s = &run.summary;
        assert_eq!((s.ops, s.errors, s.unknown_outcomes, s.guest_errors), (60, 0, 0, 0));
        assert_eq!((s.clients, s.value_size, s.protocol), (3, 5, "text"));
        assert!(s.p50_us <= s.p90_us && s.p90_us <= s.p99_us && s.p99_us <= s.max_us, "{s:?}");
        assert!(s.ops_per_s > 0.0 && s.seconds > 0.0, "{s:?}");
        assert!(run.client_failures.is_empty());
        assert!(run.write_outputs(&c).is_empty());
        assert_eq!(std::fs::read_to_string(&lat).expect("latencies").lines().count(), 30);
        let csv = std::fs::read_to_string(&series).expect("series");
        assert!(csv.starts_with("second,ops,errors,p50_us,p99_us\n0,"), "{csv}");
        let json = serde_json::to_value(s).expect("serialises");
        let fields: Vec<&str> = json.as_object().expect("an object").keys().map(String::as_str).collect();
        for field in ["ops", "ops_per_s", "p50_us", "p90_us", "p99_us", "errors", "unknown_outcomes", "protocol"] {
            assert!(fields.contains(&field), "{field} missing from {json}");
        }
    }

    #[tokio::test]
    async fn summary_fields_keep_their_order() {
        let run = run(&config(&["--text", "--cluster", &closed_port().await, "--duration", "50ms"])).await;
        let line = serde_json::to_string(&run.expect("valid config").summary).expect("serialises");
        let order = [
            "ops",
            "ops_per_s",
            "p50_us",
            "p90_us",
            "p99_us",
            "max_us",
            "errors",
            "unknown_outcomes",
            "guest_errors",
            "warmup_ops",
            "warmup_errors",
            "clients",
            "value_size",
            "get_ratio",
            "protocol",
            "seconds",
        ];
        let at: Vec<usize> =
            order.iter().map(|f| line.find(&format!("\"{f}\":")).unwrap_or_else(|| panic!("{f} in {line}"))).collect();
        assert!(at.windows(2).all(|w| w[0] < w[1]), "{line}");
    }

    #[tokio::test]
    async fn a_bad_config_runs_nothing() {
        let mut c = config(&[]);
        c.clients = 0;
        assert!(matches!(run(&c).await, Err(ConfigError::Zero)));
    }
}
