//! `recovery --from ADMIN_ADDR --fsm FILE.wasm [--json] [--data-dir DIR]`: rebuild a
//! cluster's state from a logger or a replica in a fresh guest, and report the transfer,
//! the install and the guest's digest. Exit codes: 0 recovered, 1 failed, 2 bad input.

use clap::Parser;
use logger::recovery::{self, Opts};
use tracing_subscriber::EnvFilter;

fn main() {
    // Bad flags exit 2 (clap's own code for usage errors).
    let opts = Opts::parse();
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn")))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("recovery: cannot start the async runtime: {e}");
            std::process::exit(1);
        }
    };
    let json = opts.json;
    let code = match rt.block_on(recovery::run(opts)) {
        Ok(report) => {
            if json {
                match serde_json::to_string(&report) {
                    Ok(line) => println!("{line}"),
                    Err(e) => {
                        eprintln!("recovery: {e}");
                        std::process::exit(1);
                    }
                }
            } else {
                println!("{}", recovery::summary(&report));
            }
            0
        }
        Err(e) => {
            eprintln!("recovery: {e}");
            e.exit_code()
        }
    };
    rt.shutdown_timeout(std::time::Duration::from_secs(1));
    std::process::exit(code);
}
