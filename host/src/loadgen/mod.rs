//! Closed-loop load against a cluster running a key/value guest: what the `loadgen`
//! binary runs, as a library so tests and experiments can run it too.
//!
//! Each client waits for its answer (and an optional think time) before sending the next
//! request. Every request ends as exactly one of:
//! - an answer: counted in `ops` with its latency; the guest's error result (a get of a
//!   key never written) is an answer too, also counted in `guest_errors`;
//! - `errors`: a request that got no answer and cannot have taken effect (rejected,
//!   cluster unreachable, a read on a broken connection);
//! - `unknown_outcomes`: a write that may or may not have been applied.
//!
//! Requests that complete during `--warmup` appear only in `warmup_ops` and
//! `warmup_errors` (errors and unknown outcomes), so nothing is dropped unseen.
//!
//! # Layout
//!
//! - [`workload`]: the generator, keys and get/set mix, think times;
//! - [`driver`]: one request over the binary or the text protocol, and how it ended;
//! - [`recorder`]: counts, HDR histograms, the per-second series, latency samples;
//! - [`run`](mod@run): the clients' loop, the [`Summary`] and the files it writes.

pub mod driver;
pub mod recorder;
pub mod run;
pub mod workload;

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

pub use run::{run, Run, Summary};

/// `loadgen`'s settings. Every flag can also be set as an environment variable
/// `LOADGEN_<FLAG>` (e.g. `LOADGEN_CLIENTS=32`).
#[derive(Parser, Debug, Clone)]
#[command(name = "loadgen", version, about = "Closed-loop load against a kvstore cluster")]
pub struct Config {
    /// Client addresses of members (text protocol addresses with --text).
    #[arg(long, env = "LOADGEN_CLUSTER", value_delimiter = ',', default_value = "127.0.0.1:11000")]
    pub cluster: Vec<String>,
    /// Concurrent closed-loop clients.
    #[arg(long, env = "LOADGEN_CLIENTS", default_value_t = 8)]
    pub clients: usize,
    /// How long to run, warm-up included (e.g. 10s, 500ms, 2m, 1.5s; a bare number is
    /// seconds). Defaults to 10s unless --requests is given; with both, each client
    /// stops at whichever comes first.
    #[arg(long, env = "LOADGEN_DURATION", value_parser = parse_duration)]
    pub duration: Option<Duration>,
    /// Each client stops after this many requests.
    #[arg(long, env = "LOADGEN_REQUESTS", value_name = "N")]
    pub requests: Option<u64>,
    /// Each client pauses a uniform 0..=MAX ms between requests.
    #[arg(long, env = "LOADGEN_THINK_MS", value_name = "MAX", default_value_t = 0)]
    pub think_ms: u64,
    /// Keys are drawn uniformly from 0..keys.
    #[arg(long, env = "LOADGEN_KEYS", default_value_t = 100_000)]
    pub keys: u64,
    /// Bytes per value written.
    #[arg(long, env = "LOADGEN_VALUE_SIZE", default_value_t = 1024)]
    pub value_size: usize,
    /// Fraction of requests that are reads (linearizable gets).
    #[arg(long, env = "LOADGEN_GET_RATIO", default_value_t = 0.0)]
    pub get_ratio: f64,
    /// Connections shared by the clients (requests are pipelined on each); binary only,
    /// with --text every client has its own connection. One, as an application shares
    /// one `Client` among its threads: requests and answers of many clients then travel
    /// together (at 32 clients, 1 connection gave about 15 % more than 4).
    #[arg(long, env = "LOADGEN_CONNECTIONS", default_value_t = 1)]
    pub connections: usize,
    /// Write measured latencies (µs, one per line) to this file.
    #[arg(long, env = "LOADGEN_LATENCY_OUT")]
    pub latency_out: Option<PathBuf>,
    /// Write only 1 in K latencies to --latency-out; the summary always uses all.
    #[arg(long, env = "LOADGEN_SAMPLE", value_name = "K", default_value_t = 1)]
    pub sample: u64,
    /// Requests completed during this first part of the run are not measured.
    #[arg(long, env = "LOADGEN_WARMUP", default_value = "0s", value_parser = parse_duration)]
    pub warmup: Duration,
    /// Write one CSV line per second of the measured period: second,ops,errors,p50_us,p99_us.
    #[arg(long, env = "LOADGEN_SERIES_OUT")]
    pub series_out: Option<PathBuf>,
    /// Speak the text protocol (`set-K-V` / `get-K` lines) instead of the binary one.
    #[arg(long, env = "LOADGEN_TEXT")]
    pub text: bool,
}

/// Run length when neither --duration nor --requests is given.
pub const DEFAULT_DURATION: Duration = Duration::from_secs(10);

/// Settings that cannot make a run.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ConfigError {
    #[error("--get-ratio must be in 0..=1, got {0}")]
    GetRatio(f64),
    #[error("--clients, --keys and --sample must be above 0")]
    Zero,
    #[error("--requests must be above 0")]
    ZeroRequests,
    #[error("--cluster has an empty address: {0:?}")]
    EmptyAddress(String),
    #[error("--duration ({duration:?}) must be longer than --warmup ({warmup:?})")]
    WarmupTooLong { duration: Duration, warmup: Duration },
}

impl Config {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(0.0..=1.0).contains(&self.get_ratio) {
            return Err(ConfigError::GetRatio(self.get_ratio));
        }
        if self.clients == 0 || self.keys == 0 || self.sample == 0 {
            return Err(ConfigError::Zero);
        }
        if self.requests == Some(0) {
            return Err(ConfigError::ZeroRequests);
        }
        if self.cluster.is_empty() || self.cluster.iter().any(|a| a.trim().is_empty()) {
            return Err(ConfigError::EmptyAddress(self.cluster.join(",")));
        }
        if let Some(duration) = self.duration {
            if duration <= self.warmup {
                return Err(ConfigError::WarmupTooLong { duration, warmup: self.warmup });
            }
        }
        Ok(())
    }

    /// How long the clients run; `None` when only --requests bounds them.
    pub fn run_limit(&self) -> Option<Duration> {
        match (self.duration, self.requests) {
            (None, None) => Some(DEFAULT_DURATION),
            (d, _) => d,
        }
    }

    /// `"text"` or `"binary"`, as the summary names it.
    pub fn protocol(&self) -> &'static str {
        if self.text {
            "text"
        } else {
            "binary"
        }
    }
}

/// A duration as `humantime` reads it (`10s`, `500ms`, `2m`, `1.5s`, `1m 30s`, ...), or a
/// bare number of seconds (`3`, `0.5`), which the flags have always taken.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let bare_number = !s.is_empty() && s.chars().all(|c| c.is_ascii_digit() || c == '.');
    if bare_number {
        s.parse::<f64>()
            .ok()
            .and_then(|secs| Duration::try_from_secs_f64(secs).ok())
            .ok_or_else(|| format!("bad duration {s:?}"))
    } else {
        humantime::parse_duration(s).map_err(|e| format!("bad duration {s:?}: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        let ok = |s: &str| parse_duration(s).unwrap_or_else(|e| panic!("{s}: {e}"));
        assert_eq!(ok("10s"), Duration::from_secs(10));
        assert_eq!(ok("500ms"), Duration::from_millis(500));
        assert_eq!(ok("2m"), Duration::from_secs(120));
        assert_eq!(ok("1.5m"), Duration::from_secs(90));
        assert_eq!(ok("3"), Duration::from_secs(3));
        assert_eq!(ok("0.5"), Duration::from_millis(500));
        assert_eq!(ok("1.5s"), Duration::from_millis(1500));
        assert_eq!(ok("0s"), Duration::ZERO);
        assert_eq!(ok("1h"), Duration::from_secs(3600));
        assert_eq!(ok("1m 30s"), Duration::from_secs(90));
        for bad in ["x", "", "-1s", "1.2.3", "99999999999999999999999m", "5 parsecs"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} accepted");
        }
    }

    fn config(extra: &[&str]) -> Result<Config, String> {
        let config = Config::try_parse_from(["loadgen"].iter().chain(extra)).map_err(|e| e.to_string())?;
        config.validate().map(|()| config).map_err(|e| e.to_string())
    }

    #[test]
    fn flag_validation() {
        assert!(config(&[]).is_ok());
        for bad in [
            &["--get-ratio", "1.5"][..],
            &["--get-ratio", "-0.1"],
            &["--get-ratio", "NaN"],
            &["--clients", "0"],
            &["--keys", "0"],
            &["--sample", "0"],
            &["--requests", "0"],
            &["--cluster", ""],
            &["--duration", "1s", "--warmup", "1s"],
        ] {
            assert!(config(bad).is_err(), "{bad:?} accepted");
        }
        let c = config(&["--get-ratio", "1", "--sample", "100", "--warmup", "1s"]).expect("valid");
        assert_eq!(c.run_limit(), Some(DEFAULT_DURATION));
        let c = config(&["--requests", "10"]).expect("valid");
        assert_eq!(c.run_limit(), None);
        let c = config(&["--requests", "10", "--duration", "2s"]).expect("valid");
        assert_eq!(c.run_limit(), Some(Duration::from_secs(2)));
        assert_eq!(
            config(&["--duration", "1s", "--warmup", "2s"]).expect_err("warm-up too long"),
            "--duration (1s) must be longer than --warmup (2s)"
        );
    }
}
