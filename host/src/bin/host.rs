//! `host --fsm guest.wasm [...]`: run one member. See `host --help` and the README.

use clap::Parser;
use host::config::Opts;
use tracing_subscriber::EnvFilter;

/// jemalloc: `--memprofile` needs its sampling heap profiler, and it allocates the many
/// small, short-lived buffers of the request path at least as fast as the system's.
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read from this symbol when it starts: profiling compiled in and
/// ready, sampling off until `--memprofile` turns it on.
#[allow(unsafe_code, non_upper_case_globals)]
#[export_name = "malloc_conf"]
pub static malloc_conf: &[u8] = b"prof:true,prof_active:false,lg_prof_sample:19\0";

fn main() {
    let opts = Opts::parse();
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,openraft=warn")))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("host: cannot start the async runtime: {e}");
            std::process::exit(1);
        }
    };
    let code = rt.block_on(async {
        // Handlers are installed before anything is served: a signal that arrives while
        // the member starts must stop it gracefully, not kill it.
        let shutdown = match shutdown_signal() {
            Ok(s) => s,
            Err(e) => {
                eprintln!("host: cannot watch signals: {e}");
                return 1;
            }
        };
        match host::node::run(opts, shutdown).await {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("host: {e}");
                e.exit_code()
            }
        }
    });
    // Do not wait for blocked worker threads (a guest stuck in a long call): everything
    // acknowledged is already on disk.
    rt.shutdown_timeout(std::time::Duration::from_secs(2));
    std::process::exit(code);
}

fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    })
}
