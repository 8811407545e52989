//! `recovery --from ADMIN_ADDR --fsm FILE.wasm [--json] [--data-dir DIR]`: rebuild a
//! cluster's state from a logger or a replica in a fresh guest, and report the transfer,
//! the install and the guest's digest. Exit codes: 0 recovered, 1 failed, 2 bad input.

use clap::Parser;
use logger::recovery::{self, Opts, RecoveryError};

fn main() {
    // Bad flags exit 2 (clap's own code for usage errors).
    let opts = Opts::parse();
    host::daemon::init_tracing("warn");
    let json = opts.json;
    host::daemon::run("recovery", |shutdown| async move {
        // SIGTERM or SIGINT ends a recovery without a report: a partial state is never
        // reported as one.
        let report = tokio::select! {
            r = recovery::run(opts) => r?,
            () = shutdown => return Err(RecoveryError::Failed("interrupted".to_string())),
        };
        if json {
            let line = serde_json::to_string(&report).map_err(|e| RecoveryError::Failed(e.to_string()))?;
            println!("{line}");
        } else {
            println!("{}", recovery::summary(&report));
        }
        Ok(())
    })
}
