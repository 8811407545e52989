//! `loadgen`: closed-loop clients against a cluster running a key/value guest. Prints one
//! JSON line: `{ops, ops_per_s, p50_us, p90_us, p99_us, errors, ...}`. The flags and what
//! they mean are in `host::loadgen::Config`, the run in `host::loadgen`.

use clap::Parser;
use host::loadgen::{self, Config};

// One thread: the load generator shares the cores with the members it measures (see
// `loadgen::run`).
#[tokio::main(flavor = "current_thread")]
async fn main() {
    let config = Config::parse();
    let run = match loadgen::run(&config).await {
        Ok(run) => run,
        Err(why) => {
            eprintln!("loadgen: {why}");
            std::process::exit(2);
        }
    };
    for failure in &run.client_failures {
        eprintln!("loadgen: {failure}");
    }
    let mut failed = false;
    for e in run.write_outputs(&config) {
        eprintln!("loadgen: {e}");
        failed = true;
    }
    match serde_json::to_string(&run.summary) {
        Ok(s) => println!("{s}"),
        Err(e) => {
            eprintln!("loadgen: {e}");
            failed = true;
        }
    }
    if failed {
        std::process::exit(1);
    }
}
