//! `loadgen` end to end: a few seconds against a real 3-node cluster, over the binary
//! and the text protocol, must do work without errors, and what it reports must agree
//! with what the cluster applied.
//!
//! Needs the release binaries and guests from `scripts/build.sh`.

mod common;

use std::time::Duration;

use common::*;

fn loadgen(args: &[&str]) -> serde_json::Value {
    let mut cmd = clean_command(&loadgen_exe());
    cmd.args(args);
    let out = run_with_timeout(cmd, Duration::from_secs(60)).unwrap_or_else(|e| panic!("{e}"));
    assert!(out.status.success(), "loadgen {args:?}: {}", stderr_of(&out));
    serde_json::from_str(&stdout_of(&out)).unwrap_or_else(|e| panic!("not one JSON line ({e}): {}", stdout_of(&out)))
}

#[test]
fn t10_loadgen_binary_and_text_smoke() {
    let mut c = Cluster::start(3, "kvstore", &[]);
    let before = field_u64(&c.wait_converged(), "last_applied");
    let addrs = c.client_addrs();
    let summary = loadgen(&[
        "--cluster",
        &addrs,
        "--clients",
        "4",
        "--duration",
        "2s",
        "--keys",
        "1000",
        "--value-size",
        "128",
        "--get-ratio",
        "0.3",
    ]);
    let ops = field_u64(&summary, "ops");
    assert!(ops > 0, "{summary}");
    assert_eq!(field_u64(&summary, "errors"), 0, "{summary}");
    assert_eq!(field_u64(&summary, "unknown_outcomes"), 0, "{summary}");
    let p50 = field_u64(&summary, "p50_us");
    assert!(p50 > 0 && p50 <= field_u64(&summary, "p99_us"), "{summary}");

    let text: Vec<String> = c.nodes.iter().map(|n| n.text_addr.clone()).collect();
    let summary = loadgen(&["--text", "--cluster", &text.join(","), "--clients", "3", "--requests", "50"]);
    assert_eq!(field_u64(&summary, "ops"), 150, "every request answered: {summary}");
    assert_eq!(field_u64(&summary, "errors"), 0, "{summary}");

    // The writes went through the log (batched into entries, so not counted one by one).
    let after = field_u64(&c.wait_converged(), "last_applied");
    assert!(after > before, "nothing was applied: {before} -> {after}");
}
