//! What every long-running binary of the project (`host`, `logger`) does around its
//! work: logs on stderr, a runtime, SIGTERM and SIGINT watched before anything is served
//! (a signal that arrives while it starts must stop it gracefully, not kill it), and an
//! exit code from the error it stopped with.

use std::fmt::Display;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use tracing_subscriber::EnvFilter;

/// Resolves on the first SIGTERM or SIGINT.
pub type Shutdown = Pin<Box<dyn Future<Output = ()> + Send>>;

/// An error a binary stops with, and the exit code it stands for.
pub trait ExitCode: Display {
    fn exit_code(&self) -> i32;
}

/// The filter of a long-running member: info, and openraft's warnings.
pub const MEMBER_LOGS: &str = "info,openraft=warn";

/// Logs to stderr, filtered by `RUST_LOG`, else by `default`.
pub fn init_tracing(default: &str) {
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default)))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

/// Runs `work` on a new runtime with the shutdown signal, then exits the process: 0 when
/// it returns `Ok`, else its error's code, the error printed as `name: error`.
pub fn run<F, Fut, E>(name: &str, work: F) -> !
where
    F: FnOnce(Shutdown) -> Fut,
    Fut: Future<Output = Result<(), E>>,
    E: ExitCode,
{
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("{name}: cannot start the async runtime: {e}");
            std::process::exit(1);
        }
    };
    let code = rt.block_on(async {
        let shutdown = match shutdown_signal() {
            Ok(s) => s,
            Err(e) => {
                eprintln!("{name}: cannot watch signals: {e}");
                return 1;
            }
        };
        match work(shutdown).await {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("{name}: {e}");
                e.exit_code()
            }
        }
    });
    // Do not wait for blocked worker threads (a guest stuck in a long call, a disk
    // write): everything acknowledged is already on disk.
    rt.shutdown_timeout(Duration::from_secs(2));
    std::process::exit(code);
}

fn shutdown_signal() -> std::io::Result<Shutdown> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(Box::pin(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    }))
}
