//! `logger --id ID[,ID] --raft-addr A[,A] --join ADMIN[,ADMIN] --dir DIR`: archive every
//! committed command of each cluster. `logger inspect FILE`: summarise an archive.

use clap::Parser;
use logger::config::{Command, Opts};

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
    host::daemon::init_tracing(host::daemon::MEMBER_LOGS);
    host::daemon::run("logger", |shutdown| async move {
        let cpuprofile = opts.cpuprofile.clone();
        let profiles = host::profiling::Profiles::start(cpuprofile.as_deref(), None)
            .await
            .map_err(|e| logger::LoggerError::Input(e.to_string()))?;
        let result = logger::run(opts, shutdown).await;
        profiles.finish().await;
        result
    })
}
