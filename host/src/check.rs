//! `host check --fsm GUEST.wasm --commands FILE`: runs a guest in-process through the
//! host's own runtime and checks the promises of `wit/fsm.wit` that replication relies on,
//! as openraft's storage suite does for storage. One line per check, `PASS`, `FAIL` (with
//! the command index and what differed) or `WARN` (a cost that would hurt a cluster but
//! breaks no promise); a non-zero exit on any failure.
//!
//! What it cannot check, and why: that a command which traps or runs out of fuel leaves
//! the state as it was is the host's doing (it rebuilds the instance from its snapshot
//! and log), not the guest's; and it runs the commands it is given, so it proves the
//! promises for those histories only. Instances get different node ids and directories,
//! so a guest that reads anything member-specific shows up as nondeterministic.

use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::time::Instant;

use clap::Parser;

use crate::fsm::{GuestError, Instance};
use crate::fsm::{GuestModule, Limits, LoadError};

#[derive(Parser, Debug, Clone)]
#[command(
    name = "host check",
    about = "Check a guest against the state-machine contract (wit/fsm.wit) before it reaches a cluster"
)]
pub struct CheckOpts {
    /// The guest component (.wasm).
    #[arg(long)]
    pub fsm: PathBuf,

    /// Setting handed to the guest's `init`, repeated (as for `host`).
    #[arg(long = "fsm-config", value_name = "KEY=VALUE", value_parser = crate::config::parse_kv)]
    pub fsm_config: Vec<(String, String)>,

    /// The commands to run: one per line (empty lines and lines starting with `#` are
    /// skipped), or with `--binary` a sequence of `[u32 big-endian length][bytes]`.
    #[arg(long)]
    pub commands: PathBuf,

    /// `--commands` holds length-prefixed binary commands rather than lines.
    #[arg(long)]
    pub binary: bool,

    /// As for `host`: the budget of one command, and the guest's memory.
    #[arg(long, default_value_t = 100_000_000)]
    pub fuel_per_entry: u64,
    #[arg(long, default_value_t = 4096)]
    pub guest_memory_mb: usize,
}

/// Why the checks could not run at all (exit 2), as opposed to a check failing (exit 1).
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error("{path}: {why}")]
    Commands { path: PathBuf, why: String },
    #[error("the guest does not start: {0}")]
    Init(GuestError),
    #[error("cannot make a directory for the guest: {0}")]
    Dir(std::io::Error),
}

impl crate::daemon::ExitCode for CheckError {
    fn exit_code(&self) -> i32 {
        2
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    Warn(String),
    Fail(String),
}

#[derive(Debug, Clone)]
pub struct Outcome {
    pub check: &'static str,
    pub verdict: Verdict,
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.verdict {
            Verdict::Pass => write!(f, "PASS {}", self.check),
            Verdict::Warn(why) => write!(f, "WARN {}: {why}", self.check),
            Verdict::Fail(why) => write!(f, "FAIL {}: {why}", self.check),
        }
    }
}

/// Reads a commands file in either form.
pub fn read_commands(path: &Path, binary: bool) -> Result<Vec<Vec<u8>>, CheckError> {
    let bad = |why: String| CheckError::Commands { path: path.to_path_buf(), why };
    let bytes = std::fs::read(path).map_err(|e| bad(format!("cannot read: {e}")))?;
    let mut commands = Vec::new();
    if binary {
        let mut rest = &bytes[..];
        while !rest.is_empty() {
            let (len, tail) = rest
                .split_first_chunk::<4>()
                .ok_or_else(|| bad(format!("a length prefix cut short at byte {}", bytes.len() - rest.len())))?;
            let len = u32::from_be_bytes(*len) as usize;
            if tail.len() < len {
                return Err(bad(format!("command {} claims {len} bytes, {} remain", commands.len(), tail.len())));
            }
            commands.push(tail[..len].to_vec());
            rest = &tail[len..];
        }
    } else {
        for line in bytes.split(|&b| b == b'\n') {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            if !line.is_empty() && !line.starts_with(b"#") {
                commands.push(line.to_vec());
            }
        }
    }
    if commands.len() < 2 {
        return Err(bad("fewer than 2 commands: nothing to compare".to_string()));
    }
    Ok(commands)
}

/// Fresh instances, each with its own `/data` directory and node id, removed on drop.
struct Lab {
    module: GuestModule,
    config: Vec<(String, String)>,
    root: PathBuf,
    made: u64,
}

impl Lab {
    fn new(opts: &CheckOpts) -> Result<Lab, CheckError> {
        let limits = Limits {
            fuel_per_entry: opts.fuel_per_entry,
            memory_bytes: opts.guest_memory_mb << 20,
            ..Limits::default()
        };
        let module = GuestModule::load(&opts.fsm, limits)?;
        let root = std::env::temp_dir().join(format!("host-check-{}", crate::identity::random_id()));
        std::fs::create_dir_all(&root).map_err(CheckError::Dir)?;
        Ok(Lab { module, config: opts.fsm_config.clone(), root, made: 0 })
    }

    fn instance_with(&mut self, config: &[(String, String)]) -> Result<Instance, CheckError> {
        self.made += 1;
        let dir = self.root.join(self.made.to_string());
        std::fs::create_dir_all(&dir).map_err(CheckError::Dir)?;
        Instance::new(&self.module, config, Some(&dir), self.made).map_err(CheckError::Init)
    }

    fn instance(&mut self) -> Result<Instance, CheckError> {
        let config = self.config.clone();
        self.instance_with(&config)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

type Results = Vec<Result<Vec<u8>, String>>;
/// The digest after a command, by the command's index.
type Digests = Vec<(u64, Vec<u8>)>;

/// Applies `commands` (entries `first..`) in batches of `batch`, checking one result per
/// command; the digest after each batch is kept by the index of its last command.
fn run(inst: &mut Instance, first: u64, commands: &[Vec<u8>], batch: usize) -> Result<(Results, Digests), String> {
    let mut results = Vec::with_capacity(commands.len());
    let mut digests = Vec::new();
    for (n, chunk) in commands.chunks(batch).enumerate() {
        let at = first + (n * batch) as u64;
        let (got, _) = inst.apply_batch(at, 1, chunk).map_err(|e| format!("commands {at}..: {e}"))?;
        if got.len() != chunk.len() {
            return Err(format!("apply of commands {at}..{} returned {} results", at + chunk.len() as u64, got.len()));
        }
        results.extend(got);
        let last = at + chunk.len() as u64 - 1;
        digests.push((last, inst.digest().map_err(|e| format!("digest after command {last}: {e}"))?));
    }
    Ok((results, digests))
}

/// The first command whose results differ, described.
fn first_difference(first: u64, a: &Results, b: &Results) -> Option<String> {
    let at = a.iter().zip(b).position(|(x, y)| x != y)?;
    Some(format!("command {} gave {} and {}", first + at as u64, show(&a[at]), show(&b[at])))
}

fn show(r: &Result<Vec<u8>, String>) -> String {
    match r {
        Ok(v) => format!("ok {:?}", String::from_utf8_lossy(&v[..v.len().min(40)])),
        Err(e) => format!("err {e:?}"),
    }
}

fn snapshot(inst: &mut Instance) -> Result<Vec<u8>, GuestError> {
    let mut out = Vec::new();
    inst.snapshot_to(&mut out, 64 * 1024)?;
    Ok(out)
}

fn verdict(result: Result<(), String>) -> Verdict {
    result.map_or_else(Verdict::Fail, |()| Verdict::Pass)
}

/// Runs every check; `Err` only when they cannot run at all.
pub fn check(opts: &CheckOpts) -> Result<Vec<Outcome>, CheckError> {
    let commands = read_commands(&opts.commands, opts.binary)?;
    let mut lab = Lab::new(opts)?;
    let mut out = Vec::new();
    let mut push = |check: &'static str, verdict: Verdict| out.push(Outcome { check, verdict });

    // 1 and 2: one result per command, and the same results and digests whatever the
    // batch sizes (a member applies one entry per call; a batching host would not).
    let mut one = lab.instance()?;
    let reference = run(&mut one, 1, &commands, 1);
    push("apply returns one result per command", verdict(reference.as_ref().map(|_| ()).map_err(Clone::clone)));
    let Ok((expected, digests)) = reference else { return Ok(out) };
    let final_digest = digests.last().map(|(_, d)| d.clone()).unwrap_or_default();
    let batches = [7usize, commands.len()];
    let mut same = Ok(());
    for batch in batches {
        let mut other = lab.instance()?;
        let got = run(&mut other, 1, &commands, batch);
        same = same.and_then(|()| {
            let (results, got_digests) = got?;
            if let Some(diff) = first_difference(1, &expected, &results) {
                return Err(format!("batches of {batch}: {diff}"));
            }
            for (at, d) in &got_digests {
                let ours = &digests[(*at - 1) as usize].1;
                if d != ours {
                    return Err(format!("batches of {batch}: digests differ after command {at}"));
                }
            }
            Ok(())
        });
    }
    push("deterministic: same results and digests in another instance, whatever the batch sizes", verdict(same));

    // 3: query, digest and snapshot change nothing.
    let mut busy = lab.instance()?;
    let mut observed: Results = Vec::new();
    let mut unchanged = Ok(());
    for (i, command) in commands.iter().enumerate() {
        let index = i as u64 + 1;
        match busy.apply_batch(index, 1, std::slice::from_ref(command)) {
            Ok((mut r, _)) if r.len() == 1 => observed.push(r.remove(0)),
            Ok(_) | Err(_) => {
                unchanged = Err(format!("command {index} failed between reads"));
                break;
            }
        }
        // Every read the host makes between commands: a query (the command's own bytes,
        // whatever the guest makes of them), the digest, a whole snapshot.
        let _ = busy.query(command);
        let _ = busy.digest();
        if let Err(e) = snapshot(&mut busy) {
            unchanged = Err(format!("snapshot after command {index}: {e}"));
            break;
        }
    }
    let unchanged = unchanged.and_then(|()| {
        if let Some(diff) = first_difference(1, &expected, &observed) {
            return Err(format!("with reads in between, {diff}"));
        }
        match busy.digest() {
            Ok(d) if d == final_digest => Ok(()),
            Ok(_) => Err("with reads in between, the final digest differs".to_string()),
            Err(e) => Err(format!("digest: {e}")),
        }
    });
    push("query, digest and snapshot change nothing", verdict(unchanged));

    // 4: snapshot then restore gives the same state, and both stay equal after.
    let half = commands.len() / 2;
    let mut source = lab.instance()?;
    let restored = (|| -> Result<(Vec<u8>, Instance, Instance), String> {
        let (_, d) = run(&mut source, 1, &commands[..half], 1)?;
        let stream = snapshot(&mut source).map_err(|e| format!("snapshot after command {half}: {e}"))?;
        let mut copy = lab.instance().map_err(|e| e.to_string())?;
        copy.restore_from(&mut Cursor::new(&stream), 64 * 1024).map_err(|e| format!("restore: {e}"))?;
        let copied = copy.digest().map_err(|e| format!("digest: {e}"))?;
        if Some(&copied) != d.last().map(|(_, d)| d) {
            return Err(format!("restored at command {half}: the digest differs from the source's"));
        }
        Ok((stream, source, copy))
    })();
    let (stream, mut source, mut copy) = match restored {
        Ok(r) => r,
        Err(why) => {
            push("snapshot and restore give the same state", Verdict::Fail(why));
            return Ok(out);
        }
    };
    let first = half as u64 + 1;
    let later = (|| -> Result<Vec<(u64, u64, u64)>, String> {
        let mut fuel = Vec::new();
        for (i, command) in commands[half..].iter().enumerate() {
            let index = first + i as u64;
            let (a, fa) = source.apply_batch(index, 1, std::slice::from_ref(command)).map_err(|e| e.to_string())?;
            let (b, fb) = copy.apply_batch(index, 1, std::slice::from_ref(command)).map_err(|e| e.to_string())?;
            if a != b {
                return Err(format!("after the restore, command {index} gave {a:?} and {b:?}"));
            }
            if source.digest().ok() != copy.digest().ok() {
                return Err(format!("after the restore, digests differ after command {index}"));
            }
            fuel.push((index, fa, fb));
        }
        Ok(fuel)
    })();
    push(
        "snapshot and restore give the same state, and both stay equal as commands follow",
        verdict(later.as_ref().map(|_| ()).map_err(Clone::clone)),
    );

    // 5: a damaged stream is refused, never restored into another state.
    let mut damaged = Vec::new();
    for cut in [0, stream.len() / 3, stream.len() / 2, stream.len().saturating_sub(1)] {
        if cut < stream.len() {
            damaged.push((format!("cut to {cut} of {} bytes", stream.len()), stream[..cut].to_vec()));
        }
    }
    for at in [stream.len() / 2, stream.len().saturating_sub(1)] {
        if at < stream.len() {
            let mut flipped = stream.clone();
            flipped[at] ^= 0x10;
            damaged.push((format!("byte {at} of {} flipped", stream.len()), flipped));
        }
    }
    let mut refusals = Ok(());
    for (what, bytes) in damaged {
        let mut target = lab.instance()?;
        if target.restore_from(&mut Cursor::new(&bytes), 64 * 1024).is_ok() {
            // Restored: acceptable only if it is the very state the whole stream holds.
            let whole_digest = {
                let mut t = lab.instance()?;
                t.restore_from(&mut Cursor::new(&stream), 64 * 1024).ok().and_then(|()| t.digest().ok())
            };
            if target.digest().ok() != whole_digest {
                refusals = Err(format!("a stream with {what} was restored into a different state"));
                break;
            }
        }
    }
    push("restore refuses a truncated or corrupted stream", verdict(refusals));

    // 6: init rejects a setting it does not know (a typo must not pass silently).
    let mut config = lab.config.clone();
    config.push(("host-check-unknown-setting".to_string(), "1".to_string()));
    let unknown = match lab.instance_with(&config) {
        Err(CheckError::Init(GuestError::Guest(_))) => Verdict::Pass,
        Err(e) => Verdict::Fail(format!("init failed in another way than an error result: {e}")),
        Ok(_) => Verdict::Fail("init accepted the setting host-check-unknown-setting=1".to_string()),
    };
    push("init rejects an unknown setting", unknown);

    // 7: the digest stays cheap as the state grows (it runs on every /status).
    let mut growing = lab.instance()?;
    let mut samples = Vec::new();
    let steps = [commands.len() / 10, commands.len() / 2, commands.len()];
    let mut done = 0;
    for step in steps.into_iter().filter(|&s| s > 0) {
        let _ = run(&mut growing, done as u64 + 1, &commands[done..step], 1);
        done = step;
        let state = snapshot(&mut growing).map(|s| s.len()).unwrap_or(0);
        let started = Instant::now();
        let _ = growing.digest();
        let took = started.elapsed();
        let fuel = opts.fuel_per_entry - growing.fuel_left();
        samples.push((state, fuel, took));
    }
    let cheap = match (samples.first(), samples.last()) {
        (Some(&(s0, f0, _)), Some(&(s1, f1, t1))) if s1 >= 4 * s0.max(1) && f1 > 2 * f0.max(1) => {
            Verdict::Warn(format!(
            "the digest's cost grows with the state: {f0} fuel at {s0} bytes of state, {f1} fuel ({t1:?}) at {s1}; \
             keep it incremental"
        ))
        }
        _ => Verdict::Pass,
    };
    push("digest is cheap", cheap);

    // 8: fuel used per command does not depend on the instance's history (issue of
    // resource verdicts: a command near the budget could stop one member and not another).
    let history = match &later {
        Ok(fuel) => {
            let worst = fuel
                .iter()
                .map(|&(i, a, b)| (i, a, b, a.abs_diff(b) as f64 / a.max(b).max(1) as f64))
                .max_by(|x, y| x.3.total_cmp(&y.3));
            match worst {
                Some((i, a, b, ratio)) if ratio > 0.25 && a.abs_diff(b) > 10_000 => Verdict::Warn(format!(
                    "fuel use depends on the instance's history: command {i} used {a} fuel in the instance built \
                     command by command and {b} in the one restored from a snapshot; keep commands far below \
                     --fuel-per-entry ({})",
                    opts.fuel_per_entry
                )),
                _ => Verdict::Pass,
            }
        }
        Err(_) => Verdict::Warn("not measured (the restore check failed)".to_string()),
    };
    push("fuel use does not depend on the instance's history", history);
    Ok(out)
}

/// `host check ...` as a command: prints one line per check; 0 when none failed.
pub fn main(args: impl IntoIterator<Item = std::ffi::OsString>) -> i32 {
    let opts = match CheckOpts::try_parse_from(args) {
        Ok(o) => o,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { 2 } else { 0 };
        }
    };
    match check(&opts) {
        Ok(outcomes) => {
            for o in &outcomes {
                println!("{o}");
            }
            let failed = outcomes.iter().filter(|o| matches!(o.verdict, Verdict::Fail(_))).count();
            println!(
                "{}: {} checks, {failed} failed ({})",
                opts.fsm.display(),
                outcomes.len(),
                if failed == 0 { "ok" } else { "not safe to replicate" }
            );
            i32::from(failed > 0)
        }
        Err(e) => {
            eprintln!("host check: {e}");
            2
        }
    }
}
