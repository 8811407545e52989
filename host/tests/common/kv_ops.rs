//! Writes and reads through the real `kv` binary, with the keys and values tests use.

use std::ops::Range;
use std::process::Output;
use std::thread;
use std::time::Duration;

use super::paths::kv_exe;
use super::process::{clean_command, poll_until, run_with_timeout, stderr_of, stdout_of, TIMEOUT};

/// A single `kv` invocation; it retries internally while it looks for the leader.
pub const KV_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs the real `kv` binary: `kv --cluster <cluster_addrs> <args...>`.
pub fn kv(cluster_addrs: &str, args: &[&str]) -> Output {
    let mut cmd = clean_command(&kv_exe());
    cmd.arg("--cluster").arg(cluster_addrs).args(args);
    run_with_timeout(cmd, KV_TIMEOUT).unwrap_or_else(|e| panic!("{e}"))
}

pub fn key(i: usize) -> String {
    format!("key-{i}")
}

pub fn value(i: usize) -> String {
    format!("value-{i}")
}

/// Sets `key` to `value`, retrying while the cluster answers with an error (an election
/// in progress, a leader still unknown, an outcome it cannot vouch for). Setting the same
/// value again is harmless, and the write counts as acknowledged only once `kv` says OK.
/// Returns how many attempts failed.
pub fn set_acknowledged(cluster_addrs: &str, key: &str, value: &str) -> usize {
    let mut failures = Vec::new();
    let result = poll_until(TIMEOUT, || {
        let out = kv(cluster_addrs, &["set", key, value]);
        if out.status.success() {
            Ok(())
        } else {
            failures.push(stderr_of(&out));
            Err(String::new())
        }
    });
    if result.is_err() {
        panic!(
            "kv set {key} {value} never succeeded on {cluster_addrs} within {TIMEOUT:?}; \
             last errors: {:?}",
            &failures[failures.len().saturating_sub(3)..]
        );
    }
    failures.len()
}

/// Writes `key(i) = value(i)` for every `i` in `range`, from `threads` concurrent
/// writers, each running one `kv` process per write.
pub fn set_many(cluster_addrs: &str, range: Range<usize>, threads: usize) {
    let threads = threads.max(1);
    let retried: usize = thread::scope(|s| {
        let writers: Vec<_> = (0..threads)
            .map(|t| {
                let range = range.clone();
                s.spawn(move || {
                    range
                        .skip(t)
                        .step_by(threads)
                        .map(|i| set_acknowledged(cluster_addrs, &key(i), &value(i)))
                        .sum::<usize>()
                })
            })
            .collect();
        writers.into_iter().map(|w| w.join().expect("writer thread panicked")).sum()
    });
    if retried > 0 {
        eprintln!("set_many {range:?}: {retried} kv attempts failed and were retried");
    }
}

/// Checks through the cluster (a linearizable read) that `key(i) = value(i)` for every
/// `i` in `range`.
pub fn assert_all_readable(cluster_addrs: &str, range: Range<usize>, threads: usize) {
    let threads = threads.max(1);
    thread::scope(|s| {
        for t in 0..threads {
            let range = range.clone();
            s.spawn(move || {
                for i in range.skip(t).step_by(threads) {
                    let out = kv(cluster_addrs, &["get", &key(i)]);
                    assert!(
                        out.status.success(),
                        "acknowledged write {} is not readable on {cluster_addrs}: {}",
                        key(i),
                        stderr_of(&out)
                    );
                    assert_eq!(stdout_of(&out), value(i), "value of {}", key(i));
                }
            });
        }
    });
}

/// `len` reproducible pseudo-random bytes (xorshift).
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 24) as u8
        })
        .collect()
}
