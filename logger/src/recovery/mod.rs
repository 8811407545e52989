//! `recovery`: rebuilds a cluster's state from a logger's archive or a replica's snapshot
//! and log, in a fresh instance of the guest, and proves it with the guest's digest.
//!
//! # Layout
//!
//! - this module: the flags (`RECOVERY_*`), the errors and their exit codes, and [`run`],
//!   which waits `--after`, asks the source, and drives the transfer (resuming a cut one
//!   from the last index installed) while the installer applies what arrives.
//! - [`source`]: the source's `/status` (logger or replica, which cluster, how far) and
//!   the streamed `GET /recover` answer.
//! - [`install`]: the installer thread: reads records as they arrive through a bounded
//!   channel, restores snapshots and applies commands through the host's own apply path
//!   (`host::store::sm::apply_command`), and writes `--data-dir`.
//!
//! Transfer and install overlap: the connection's task hands each chunk of the answer to
//! the installer through a channel of [`CHANNEL_CHUNKS`] chunks, so neither side holds
//! more than some MiB, whatever the size of the log or the state.

pub mod install;
pub mod source;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use host::fsm::{GuestModule, Limits};
use serde::Serialize;

use self::install::{Installer, Outcome};
use self::source::{Answer, Source};

/// Chunks of the answer between the connection and the installer. Sources send chunks
/// of up to about 1 MiB, so at most about 16 MiB wait here, however large the transfer.
pub const CHANNEL_CHUNKS: usize = 16;

#[derive(Debug, Clone, Parser)]
#[command(
    name = "recovery",
    about = "Rebuild a cluster's state from a logger or a replica, in a fresh guest, and report the transfer and \
             install",
    version
)]
pub struct Opts {
    /// Admin address of a logger or of a replica (`host:port`); several, comma-separated,
    /// are tried in turn, and a transfer cut off resumes from the next one.
    #[arg(long, env = "RECOVERY_FROM", value_delimiter = ',', required = true)]
    pub from: Vec<String>,
    /// The guest component to install into (the cluster's, by sha256).
    #[arg(long, env = "RECOVERY_FSM")]
    pub fsm: PathBuf,
    /// The guest's settings, as the members were given them (repeated, in order). From a
    /// replica, its own settings are taken when none are given.
    #[arg(long = "fsm-config", env = "RECOVERY_FSM_CONFIG", value_delimiter = ';', value_parser = parse_kv)]
    pub fsm_config: Vec<(String, String)>,
    /// Which cluster: a logger id (or the cluster id) when the logger follows several; a
    /// replica's cluster id, checked.
    #[arg(long, env = "RECOVERY_CLUSTER")]
    pub cluster: Option<String>,
    /// Wait this long before asking (the original's timeout before recovery).
    #[arg(long, env = "RECOVERY_AFTER", default_value = "0s", value_parser = host::loadgen::parse_duration)]
    pub after: Duration,
    /// First index to ask for; 0 (the default) asks for everything, from the source's
    /// snapshot when its log no longer starts at 0.
    #[arg(long, env = "RECOVERY_FIRST_INDEX", default_value_t = 0)]
    pub first_index: u64,
    /// Last index to ask for; default: what the source has applied (or archived) when
    /// asked.
    #[arg(long, env = "RECOVERY_LAST_INDEX")]
    pub last_index: Option<u64>,
    /// One JSON line instead of the readable summary.
    #[arg(long, env = "RECOVERY_JSON")]
    pub json: bool,
    /// Also write the recovered state as a snapshot a new member starts from
    /// (`DIR/snapshots/current.snap`); DIR must be empty or absent.
    #[arg(long, env = "RECOVERY_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Fuel per command; default: the source replica's, else the host's default.
    #[arg(long, env = "RECOVERY_FUEL_PER_ENTRY")]
    pub fuel_per_entry: Option<u64>,
    /// The guest's memory limit; default: the source replica's, else the host's default.
    #[arg(long, env = "RECOVERY_GUEST_MEMORY_MB")]
    pub guest_memory_mb: Option<u64>,
    /// The cluster token, when the replicas have one (`/recover` needs it).
    #[arg(long, env = "RECOVERY_CLUSTER_TOKEN", hide_env_values = true, conflicts_with = "cluster_token_file")]
    pub cluster_token: Option<String>,
    #[arg(long, env = "RECOVERY_CLUSTER_TOKEN_FILE")]
    pub cluster_token_file: Option<PathBuf>,
    /// How many times a cut transfer is resumed before recovery gives up.
    #[arg(long, env = "RECOVERY_RETRIES", default_value_t = 3)]
    pub retries: u32,
    /// Bound on connecting and on each wait for the source's next bytes.
    #[arg(long, env = "RECOVERY_TIMEOUT", default_value = "10s", value_parser = host::loadgen::parse_duration)]
    pub timeout: Duration,
    /// Transfer and check the records without installing them (measures the transfer
    /// alone; no digest).
    #[arg(long, env = "RECOVERY_TRANSFER_ONLY", conflicts_with = "data_dir")]
    pub transfer_only: bool,
}

fn parse_kv(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("expected KEY=VALUE, got {s:?}")),
    }
}

/// Why recovery failed.
#[derive(Debug, thiserror::Error)]
pub enum RecoveryError {
    /// The operator's to fix: flags, the guest file, an unknown cluster, a range the
    /// source does not hold, a data dir in use.
    #[error("{0}")]
    Input(String),
    /// Everything else: a source that does not answer, a transfer cut for good, a
    /// corrupt record, a guest that trapped or failed.
    #[error("{0}")]
    Failed(String),
}

impl host::daemon::ExitCode for RecoveryError {
    fn exit_code(&self) -> i32 {
        match self {
            RecoveryError::Input(_) => 2,
            RecoveryError::Failed(_) => 1,
        }
    }
}

/// What recovery did: the `--json` line.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The source that served the transfer (the last one, after a resume).
    pub source: String,
    /// `logger` or `replica`.
    pub kind: String,
    /// From the first byte read to the last (transfer and install overlap).
    pub transfer_ms: u64,
    /// Time the installer spent restoring and applying (waiting for bytes excluded).
    pub install_ms: u64,
    /// From the first byte asked for until the state was complete (and written, with
    /// `--data-dir`).
    pub total_ms: u64,
    /// Compiling the guest, before the transfer starts (not counted in the others).
    pub guest_load_ms: u64,
    pub bytes: u64,
    /// Client commands applied (those in the snapshot not counted).
    pub commands: u64,
    /// Entries received (each index once).
    pub entries: u64,
    /// The snapshot the state started from, if any: its index and bytes.
    pub snapshot_index: Option<u64>,
    pub snapshot_bytes: u64,
    pub first_index: u64,
    pub last_index: u64,
    /// Hex of the guest's digest at `last_index` (empty with `--transfer-only`).
    pub digest: String,
    pub transfer_mb_per_s: f64,
    pub install_commands_per_s: f64,
    /// Guest error results among the commands (part of the state, like any result).
    pub guest_errors: u64,
    /// Times a cut transfer was resumed.
    pub resumed: u32,
    /// Times the transfer started over because a command trapped (the bytes of every pass
    /// are counted).
    pub replays: u32,
    pub data_dir: Option<String>,
}

/// Progress the installer publishes for the terminal's progress line.
#[derive(Debug, Default)]
pub struct Progress {
    pub bytes: AtomicU64,
    pub index: AtomicU64,
}

/// Waits `--after`, then recovers as `opts` say.
pub async fn run(opts: Opts) -> Result<Report, RecoveryError> {
    let token = host::config::read_token(opts.cluster_token.as_deref(), opts.cluster_token_file.as_deref())
        .map_err(RecoveryError::Input)?;
    if let Some(dir) = &opts.data_dir {
        install::check_data_dir(dir)?;
    }
    if !opts.fsm.exists() {
        return Err(RecoveryError::Input(format!("{}: no such file (--fsm)", opts.fsm.display())));
    }
    if !opts.after.is_zero() {
        tokio::time::sleep(opts.after).await;
    }
    let (mut src, mut which) = first_source(&opts, &token).await?;
    let to = match opts.last_index {
        Some(n) => n,
        None => src.last_index,
    };
    if to < opts.first_index {
        return Err(RecoveryError::Input(format!(
            "--first-index {} is past the last index {to} ({})",
            opts.first_index,
            if opts.last_index.is_some() { "--last-index" } else { "what the source holds" }
        )));
    }
    let config = match (&src.fsm_config, opts.fsm_config.is_empty()) {
        (Some(theirs), true) => theirs.clone(),
        (Some(theirs), false) if *theirs != opts.fsm_config => {
            return Err(RecoveryError::Input(format!(
                "--fsm-config {:?} differs from the replica's settings {theirs:?}: the state would not be the \
                 cluster's",
                opts.fsm_config
            )))
        }
        _ => opts.fsm_config.clone(),
    };
    let progress = Arc::new(Progress::default());
    let mut answer = src.recover(opts.first_index, to, opts.timeout).await?;
    let limits = limits(&opts, &answer);
    // Compiling the guest takes a while; its time is reported on its own, not as
    // transfer (the answer waits in the connection meanwhile).
    let loading = Instant::now();
    let module =
        Arc::new(GuestModule::load(&opts.fsm, limits).map_err(|e| RecoveryError::Input(format!("--fsm: {e}")))?);
    let guest_load = loading.elapsed();
    if let Some(theirs) = &src.fsm_sha256 {
        if theirs != module.sha256() {
            return Err(RecoveryError::Input(format!(
                "{} has sha256 {}, the replica runs {theirs}: the state would not be the cluster's",
                opts.fsm.display(),
                module.sha256()
            )));
        }
    }
    let installer = Installer::start(
        module,
        config,
        opts.first_index,
        to,
        opts.data_dir.clone(),
        opts.transfer_only,
        progress.clone(),
    )?;
    let progress_line = (!opts.json && std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .then(|| tokio::spawn(show_progress(progress.clone(), to)));
    let started = Instant::now();
    let mut resumed = 0u32;
    let mut replays = 0u32;
    let mut bytes = 0u64;
    let mut last_byte;
    let outcome = loop {
        let cut = match answer.pump(&installer, opts.timeout).await {
            Ok(n) => {
                bytes += n;
                None
            }
            Err((n, why)) => {
                bytes += n;
                Some(why)
            }
        };
        last_byte = Instant::now();
        match installer.connection_ended(cut).await {
            Outcome::Done(done) => break Ok(done),
            Outcome::Fatal(e) => break Err(e),
            Outcome::Replay { from, why } => {
                replays += 1;
                tracing::warn!(%why, "a command trapped; transferring again from {from}, skipping it");
                match resume(&opts, &token, &mut src, &mut which, from, to).await {
                    Ok(a) => answer = a,
                    Err(e) => {
                        break Err(RecoveryError::Failed(format!("{why}; transferring again failed: {e}")));
                    }
                }
            }
            Outcome::Cut { next, why } => {
                if resumed >= opts.retries {
                    break Err(RecoveryError::Failed(format!(
                        "the transfer was cut off {} times; the last time at index {next} ({why}); nothing was \
                         reported as recovered",
                        resumed + 1
                    )));
                }
                resumed += 1;
                tracing::warn!(next, %why, "transfer cut off; resuming");
                match resume(&opts, &token, &mut src, &mut which, next, to).await {
                    Ok(a) => answer = a,
                    Err(e) => {
                        break Err(RecoveryError::Failed(format!(
                            "the transfer was cut off at index {next} ({why}) and could not be resumed: {e}"
                        )))
                    }
                }
            }
        }
    };
    if let Some(p) = progress_line {
        p.abort();
        eprintln!();
    }
    let done = match outcome {
        Ok(d) => d,
        Err(e) => {
            installer.abandon();
            return Err(e);
        }
    };
    let total = started.elapsed();
    let transfer = last_byte - started;
    let secs = |d: Duration| d.as_secs_f64().max(1e-9);
    Ok(Report {
        source: src.addr.clone(),
        kind: src.kind.as_str().to_string(),
        transfer_ms: transfer.as_millis() as u64,
        install_ms: done.install.as_millis() as u64,
        total_ms: total.as_millis() as u64,
        guest_load_ms: guest_load.as_millis() as u64,
        bytes,
        commands: done.commands,
        entries: done.entries,
        snapshot_index: done.snapshot_index,
        snapshot_bytes: done.snapshot_bytes,
        first_index: done.first_index,
        last_index: done.last_index,
        digest: done.digest,
        transfer_mb_per_s: bytes as f64 / 1e6 / secs(transfer),
        install_commands_per_s: if done.install.is_zero() { 0.0 } else { done.commands as f64 / secs(done.install) },
        guest_errors: done.guest_errors,
        resumed,
        replays,
        data_dir: opts.data_dir.as_ref().map(|d| d.display().to_string()),
    })
}

/// The first source in `--from` that answers `/status` for the cluster asked for.
async fn first_source(opts: &Opts, token: &str) -> Result<(Source, usize), RecoveryError> {
    let mut why = Vec::new();
    for (i, addr) in opts.from.iter().enumerate() {
        match Source::probe(addr, opts.cluster.as_deref(), token, opts.timeout).await {
            Ok(s) => return Ok((s, i)),
            // A source that answers but refuses (unknown cluster) is the operator's to fix.
            Err(e @ RecoveryError::Input(_)) if opts.from.len() == 1 => return Err(e),
            Err(e) => why.push(e.to_string()),
        }
    }
    Err(RecoveryError::Failed(format!("no source answered: {}", why.join("; "))))
}

/// Asks again from `next`, this source first, then the others in turn.
async fn resume(
    opts: &Opts,
    token: &str,
    src: &mut Source,
    which: &mut usize,
    next: u64,
    to: u64,
) -> Result<Answer, String> {
    let mut why = Vec::new();
    for k in 0..opts.from.len() {
        let i = (*which + k) % opts.from.len();
        if i != *which {
            match Source::probe(&opts.from[i], opts.cluster.as_deref(), token, opts.timeout).await {
                Ok(s) => {
                    *src = s;
                    *which = i;
                }
                Err(e) => {
                    why.push(e.to_string());
                    continue;
                }
            }
        }
        match src.recover(next, to, opts.timeout).await {
            Ok(a) => return Ok(a),
            Err(e) => why.push(e.to_string()),
        }
    }
    Err(why.join("; "))
}

fn limits(opts: &Opts, answer: &Answer) -> Limits {
    let d = Limits::default();
    Limits {
        fuel_per_entry: opts.fuel_per_entry.or(answer.fuel_per_entry).unwrap_or(d.fuel_per_entry),
        fuel_per_query: d.fuel_per_query,
        memory_bytes: opts
            .guest_memory_mb
            .or(answer.guest_memory_mb)
            .map_or(d.memory_bytes, |mb| mb.saturating_mul(1 << 20) as usize),
    }
}

async fn show_progress(progress: Arc<Progress>, to: u64) {
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let b = progress.bytes.load(Ordering::Relaxed);
        let i = progress.index.load(Ordering::Relaxed);
        eprint!("\rrecovery: {:.1} MB received, index {i} of {to}   ", b as f64 / 1e6);
    }
}

/// The readable summary (without `--json`).
pub fn summary(r: &Report) -> String {
    let snap = match r.snapshot_index {
        Some(i) => format!("from a snapshot at {i} ({:.1} MB) and ", r.snapshot_bytes as f64 / 1e6),
        None => String::new(),
    };
    format!(
        "recovered {snap}{} entries ({} commands) from {} {}: indexes {}..{}\n\
         transfer {} ms, {:.1} MB ({:.1} MB/s)\n\
         install  {} ms ({:.0} commands/s), total {} ms\n\
         digest {}{}{}",
        r.entries,
        r.commands,
        r.kind,
        r.source,
        r.first_index,
        r.last_index,
        r.transfer_ms,
        r.bytes as f64 / 1e6,
        r.transfer_mb_per_s,
        r.install_ms,
        r.install_commands_per_s,
        r.total_ms,
        if r.digest.is_empty() { "(not installed)" } else { &r.digest },
        if r.resumed > 0 { format!("\nresumed {} times", r.resumed) } else { String::new() },
        r.data_dir.as_ref().map(|d| format!("\nstate written to {d}")).unwrap_or_default(),
    )
}
