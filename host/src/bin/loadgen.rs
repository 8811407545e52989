//! `loadgen`: closed-loop clients against a cluster running the kvstore guest. Each
//! client waits for its answer before sending the next request. Prints one JSON line:
//! `{ops, ops_per_s, p50_us, p90_us, p99_us, errors, ...}`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use host::client::{Client, ClientError};
use kvcommand::proto::{encode, Op};
use serde::Serialize;

#[derive(Parser, Debug)]
#[command(name = "loadgen", version, about = "Closed-loop load against a kvstore cluster")]
struct Args {
    /// Client addresses of members.
    #[arg(long, value_delimiter = ',', default_value = "127.0.0.1:11000")]
    cluster: Vec<String>,
    /// Concurrent closed-loop clients.
    #[arg(long, default_value_t = 8)]
    clients: usize,
    /// How long to run (e.g. 10s, 500ms, 2m).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    duration: Duration,
    /// Keys are drawn uniformly from 0..keys.
    #[arg(long, default_value_t = 100_000)]
    keys: u64,
    /// Bytes per value written.
    #[arg(long, default_value_t = 1024)]
    value_size: usize,
    /// Fraction of requests that are reads (linearizable gets).
    #[arg(long, default_value_t = 0.0)]
    get_ratio: f64,
    /// Connections shared by the clients (requests are pipelined on each).
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Write every latency (µs, one per line) to this file.
    #[arg(long)]
    latency_out: Option<std::path::PathBuf>,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let (num, unit) = s.find(|c: char| !c.is_ascii_digit() && c != '.').map_or((s, "s"), |i| s.split_at(i));
    let n: f64 = num.parse().map_err(|_| format!("bad duration {s:?}"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        _ => return Err(format!("bad duration unit in {s:?} (ms, s, m)")),
    };
    Ok(Duration::from_secs_f64(secs))
}

#[derive(Serialize)]
struct Summary {
    ops: u64,
    ops_per_s: f64,
    p50_us: u64,
    p90_us: u64,
    p99_us: u64,
    max_us: u64,
    errors: u64,
    unknown_outcomes: u64,
    clients: usize,
    value_size: usize,
    get_ratio: f64,
    seconds: f64,
}

/// A small deterministic generator (xorshift): the workload must not depend on a crate
/// the host does not otherwise need.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    if !(0.0..=1.0).contains(&args.get_ratio) || args.clients == 0 || args.keys == 0 {
        eprintln!("loadgen: --get-ratio must be in 0..=1, --clients and --keys above 0");
        std::process::exit(2);
    }
    let conns: Vec<Arc<Client>> =
        (0..args.connections.max(1)).map(|_| Arc::new(Client::new(args.cluster.clone()))).collect();
    let value = vec![b'v'; args.value_size];
    let start = Instant::now();
    let deadline = start + args.duration;
    let mut tasks = Vec::new();
    for c in 0..args.clients {
        let client = conns[c % conns.len()].clone();
        let value = value.clone();
        let (keys, get_ratio) = (args.keys, args.get_ratio);
        tasks.push(tokio::spawn(async move {
            let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ (c as u64 + 1).wrapping_mul(0x2545_F491_4F6C_DD1D));
            let mut lat = Vec::new();
            let (mut errors, mut unknown) = (0u64, 0u64);
            while Instant::now() < deadline {
                let key = (rng.next() % keys).to_string();
                let t = Instant::now();
                let res = if rng.unit() < get_ratio {
                    client.query(encode(Op::Get, &key, b""), false).await
                } else {
                    client.propose(encode(Op::Set, &key, &value)).await
                };
                match res {
                    // A get of a key never written is a normal answer of the guest.
                    Ok(_) | Err(ClientError::Guest(_)) => lat.push(t.elapsed().as_micros() as u64),
                    Err(ClientError::UnknownOutcome(_)) => unknown += 1,
                    Err(_) => errors += 1,
                }
            }
            (lat, errors, unknown)
        }));
    }
    let mut all = Vec::new();
    let (mut errors, mut unknown) = (0, 0);
    for t in tasks {
        match t.await {
            Ok((lat, e, u)) => {
                all.extend(lat);
                errors += e;
                unknown += u;
            }
            Err(e) => {
                eprintln!("loadgen: client task failed: {e}");
                errors += 1;
            }
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    if let Some(path) = &args.latency_out {
        let text: String = all.iter().map(|l| format!("{l}\n")).collect();
        if let Err(e) = std::fs::write(path, text) {
            eprintln!("loadgen: cannot write {}: {e}", path.display());
        }
    }
    all.sort_unstable();
    let summary = Summary {
        ops: all.len() as u64,
        ops_per_s: all.len() as f64 / seconds,
        p50_us: percentile(&all, 50.0),
        p90_us: percentile(&all, 90.0),
        p99_us: percentile(&all, 99.0),
        max_us: all.last().copied().unwrap_or(0),
        errors,
        unknown_outcomes: unknown,
        clients: args.clients,
        value_size: args.value_size,
        get_ratio: args.get_ratio,
        seconds,
    };
    match serde_json::to_string(&summary) {
        Ok(s) => println!("{s}"),
        Err(e) => eprintln!("loadgen: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_on_known_data() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&v, 50.0), 50);
        assert_eq!(percentile(&v, 90.0), 90);
        assert_eq!(percentile(&v, 99.0), 99);
        assert_eq!(percentile(&v, 100.0), 100);
        assert_eq!(percentile(&[], 50.0), 0);
        assert_eq!(percentile(&[7], 99.0), 7);
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert!(parse_duration("x").is_err());
        assert!(parse_duration("5h").is_err());
    }
}
