//! `logger --id ID[,ID] --raft-addr A[,A] --join ADMIN[,ADMIN] --dir DIR`: archive every
//! committed command of each cluster. `logger inspect FILE`: summarise an archive.

use clap::Parser;
use logger::config::{Command, Opts};
use tracing_subscriber::EnvFilter;

fn main() {
    let opts = Opts::parse();
    if let Some(Command::Inspect { file }) = &opts.command {
        match logger::archive::inspect(file) {
            Ok(s) => match serde_json::to_string(&s) {
                Ok(line) => println!("{line}"),
                Err(e) => {
                    eprintln!("logger inspect: {e}");
                    std::process::exit(1);
                }
            },
            Err(e) => {
                eprintln!("logger inspect: {e}");
                std::process::exit(1);
            }
        }
        return;
    }
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,openraft=warn")))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("logger: cannot start the async runtime: {e}");
            std::process::exit(1);
        }
    };
    let code = rt.block_on(async {
        let shutdown = match shutdown_signal() {
            Ok(s) => s,
            Err(e) => {
                eprintln!("logger: cannot watch signals: {e}");
                return 1;
            }
        };
        let profiles = match host::profiling::Profiles::start(opts.cpuprofile.as_deref(), None).await {
            Ok(p) => p,
            Err(e) => {
                eprintln!("logger: {e}");
                return 2;
            }
        };
        let code = match logger::run(opts, shutdown).await {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("logger: {e}");
                e.exit_code()
            }
        };
        profiles.finish().await;
        code
    });
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
