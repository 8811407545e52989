//! faulty: a state machine that misbehaves on request, so host tests can exercise trap
//! rollback, fuel exhaustion, memory limits, error results and the filesystem sandbox.
//! Not for deployment.
//!
//! Commands (text):
//! - `add-N`, `add-then-trap-N` (adds, then panics), `fail` (an error result);
//! - `skew`: adds 1 only where `/data/skewed` exists, a bug that makes one member's state
//!   differ from the others' without any error;
//! - what must stop a member rather than give a result: `spin` (runs out of fuel), `grow`
//!   (allocates until the memory limit aborts it), `try-grow` (the same, but returns an
//!   error result when an allocation fails), `recurse` (overflows the stack), `env-check`
//!   (`ok`, or reports an environment failure where `/data/broken-disk` exists, so one
//!   member can be made to fail);
//! - sandbox probes: `read-PATH`, `write-PATH-DATA` and `symlink-TARGET-LINK` (a write's
//!   PATH and a symlink's TARGET end at the first `-`);
//! - determinism probes: `stat-PATH` and `fstat-PATH` (the three file times, through
//!   `stat-at` and through `stat` on an opened descriptor), `hash-PATH` and `fhash-PATH`
//!   (the metadata hash, likewise), `list` (the names in `/data`, in the order read) and
//!   `sleep` (waits on 10 s timers, by duration and by instant). PATHs are under `/data/`.
//!
//! Queries: `get`, and `spin` and `env-check` as above. State: one `i64`.
//!
//! The files the probes touch are not part of the replicated state: they are in neither
//! the snapshot nor the digest, and a rebuilt instance does not redo them. That breaks the
//! state-machine contract, which a test-only guest may do.

use std::cell::{Cell, RefCell};

wit_bindgen::generate!({ world: "fsm", path: "../../wit" });

use exports::wasm_raft::fsm::state_machine::{Entry, Guest, GuestRestore, GuestSnapshot};
use wasip2::filesystem::types::{Descriptor, DescriptorFlags, OpenFlags, PathFlags};

thread_local! {
    static COUNTER: Cell<i64> = const { Cell::new(0) };
}

struct Faulty;

impl Guest for Faulty {
    type Snapshot = Snapshot;
    type Restore = Restore;

    fn init(config: Vec<(String, String)>) -> Result<(), String> {
        if config.iter().any(|(k, v)| k == "fail-init" && v == "1") {
            return Err("init refused".to_string());
        }
        COUNTER.set(0);
        Ok(())
    }

    fn apply(entries: Vec<Entry>) -> Vec<Result<Vec<u8>, String>> {
        entries.iter().map(|e| apply(&e.command)).collect()
    }

    fn query(request: Vec<u8>) -> Result<Vec<u8>, String> {
        match request.as_slice() {
            b"get" => Ok(COUNTER.get().to_string().into_bytes()),
            b"spin" => spin(),
            b"env-check" => env_check(),
            _ => Err("unknown query".to_string()),
        }
    }

    fn digest() -> Vec<u8> {
        COUNTER.get().to_le_bytes().to_vec()
    }
}

fn apply(command: &[u8]) -> Result<Vec<u8>, String> {
    let text = std::str::from_utf8(command).map_err(|_| "unknown command".to_string())?;
    // Checked before `add-`, which is its prefix.
    if let Some(n) = text.strip_prefix("add-then-trap-") {
        add(n)?;
        panic!("add-then-trap: trapping after the counter changed");
    }
    if let Some(n) = text.strip_prefix("add-") {
        return add(n).map(|value| value.to_string().into_bytes());
    }
    if let Some(path) = text.strip_prefix("read-") {
        return std::fs::read(path).map(|bytes| bytes.len().to_string().into_bytes()).map_err(|e| e.to_string());
    }
    if let Some(rest) = text.strip_prefix("write-") {
        let (path, data) = rest.split_once('-').ok_or_else(|| "expected write-PATH-DATA".to_string())?;
        return std::fs::write(path, data).map(|()| Vec::new()).map_err(|e| e.to_string());
    }
    if let Some(rest) = text.strip_prefix("symlink-") {
        let (target, link) = rest.split_once('-').ok_or_else(|| "expected symlink-TARGET-LINK".to_string())?;
        return symlink(target, link).map(|()| Vec::new());
    }
    if let Some(path) = text.strip_prefix("stat-") {
        let (dir, name) = data_path(path)?;
        return dir.stat_at(PathFlags::empty(), name).map(|s| times(&s)).map_err(|e| format!("stat-at {path:?}: {e}"));
    }
    if let Some(path) = text.strip_prefix("fstat-") {
        return open(path)?.stat().map(|s| times(&s)).map_err(|e| format!("stat {path:?}: {e}"));
    }
    if let Some(path) = text.strip_prefix("hash-") {
        let (dir, name) = data_path(path)?;
        return dir
            .metadata_hash_at(PathFlags::empty(), name)
            .map(|h| format!("{:016x}{:016x}", h.upper, h.lower).into_bytes())
            .map_err(|e| format!("metadata-hash-at {path:?}: {e}"));
    }
    if let Some(path) = text.strip_prefix("fhash-") {
        return open(path)?
            .metadata_hash()
            .map(|h| format!("{:016x}{:016x}", h.upper, h.lower).into_bytes())
            .map_err(|e| format!("metadata-hash {path:?}: {e}"));
    }
    match text {
        "spin" => spin(),
        "grow" => grow(),
        "try-grow" => try_grow(),
        "recurse" => Ok(recurse(u64::MAX).to_string().into_bytes()),
        "env-check" => env_check(),
        "skew" => {
            let by = if std::fs::metadata("/data/skewed").is_ok() { "1" } else { "0" };
            add(by).map(|value| value.to_string().into_bytes())
        }
        "list" => list(),
        "sleep" => sleep(),
        "fail" => Err("requested failure".to_string()),
        _ => Err("unknown command".to_string()),
    }
}

fn add(n: &str) -> Result<i64, String> {
    let n: i64 = n.parse().map_err(|e| format!("add needs an integer, got {n:?}: {e}"))?;
    let value = COUNTER.get().checked_add(n).ok_or_else(|| "counter overflow".to_string())?;
    COUNTER.set(value);
    Ok(value)
}

/// Creates `link` (a path under `/data`) pointing at `target`, which is stored as given:
/// whether the sandbox refuses it here or when it is followed is up to the host.
fn symlink(target: &str, link: &str) -> Result<(), String> {
    let (dir, name) = data_path(link)?;
    dir.symlink_at(target, name).map_err(|e| format!("symlink {link:?} -> {target:?}: {e}"))
}

fn data_dir() -> Result<Descriptor, String> {
    wasip2::filesystem::preopens::get_directories()
        .into_iter()
        .find(|(_, path)| path == "/data")
        .map(|(dir, _)| dir)
        .ok_or_else(|| "no /data directory".to_string())
}

/// The `/data` directory and `path`'s name relative to it.
fn data_path(path: &str) -> Result<(Descriptor, &str), String> {
    let name = path.strip_prefix("/data/").ok_or_else(|| format!("{path:?} must be under /data/"))?;
    Ok((data_dir()?, name))
}

fn open(path: &str) -> Result<Descriptor, String> {
    let (dir, name) = data_path(path)?;
    dir.open_at(PathFlags::empty(), name, OpenFlags::empty(), DescriptorFlags::READ)
        .map_err(|e| format!("open {path:?}: {e}"))
}

/// `access modify change`, each as `SECONDS.NANOS` or `none`.
fn times(stat: &wasip2::filesystem::types::DescriptorStat) -> Vec<u8> {
    let time = |t: Option<wasip2::clocks::wall_clock::Datetime>| {
        t.map_or_else(|| "none".to_string(), |t| format!("{}.{:09}", t.seconds, t.nanoseconds))
    };
    format!(
        "{} {} {}",
        time(stat.data_access_timestamp),
        time(stat.data_modification_timestamp),
        time(stat.status_change_timestamp)
    )
    .into_bytes()
}

/// The names in `/data`, comma-separated, in the order the host gave them.
fn list() -> Result<Vec<u8>, String> {
    let entries = data_dir()?.read_directory().map_err(|e| format!("read-directory: {e}"))?;
    let mut names = Vec::new();
    while let Some(entry) = entries.read_directory_entry().map_err(|e| format!("read-directory-entry: {e}"))? {
        names.push(entry.name);
    }
    Ok(names.join(",").into_bytes())
}

/// Waits on 10-second timers three ways; with a frozen clock each is ready at once.
fn sleep() -> Result<Vec<u8>, String> {
    use wasip2::clocks::monotonic_clock;
    const TEN_SECONDS: u64 = 10_000_000_000;
    monotonic_clock::subscribe_duration(TEN_SECONDS).block();
    monotonic_clock::subscribe_instant(monotonic_clock::now() + TEN_SECONDS).block();
    let timer = monotonic_clock::subscribe_duration(TEN_SECONDS);
    let ready = wasip2::io::poll::poll(&[&timer]);
    Ok(format!("slept, ready {ready:?}").into_bytes())
}

/// A member whose disk is marked broken says so instead of answering: the others go on.
fn env_check() -> Result<Vec<u8>, String> {
    if std::fs::metadata("/data/broken-disk").is_ok() {
        wasm_raft::fsm::host::environment_failure("/data/broken-disk exists: this member's disk is marked broken");
        unreachable!("the host never returns from environment-failure");
    }
    Ok(b"ok".to_vec())
}

/// Runs until the host's fuel budget stops it; `black_box` keeps the loop doing work the
/// optimiser cannot remove.
fn spin() -> ! {
    let mut i = 0u64;
    loop {
        i = std::hint::black_box(i.wrapping_add(1));
    }
}

/// Reserves (without touching, so it burns little fuel) ever more memory until an
/// allocation fails, which aborts: a trap that only the host's record of the refused
/// `memory.grow` tells apart from any other abort.
fn grow() -> ! {
    let mut blocks: Vec<Vec<u8>> = Vec::new();
    loop {
        blocks.push(Vec::with_capacity(16 << 20));
        std::hint::black_box(&mut blocks);
    }
}

/// Like `grow`, but survives the failed allocation and returns an error result, which
/// depends on this member's memory as much as the trap does.
fn try_grow() -> Result<Vec<u8>, String> {
    let mut blocks: Vec<Vec<u8>> = Vec::new();
    loop {
        let mut block = Vec::new();
        if let Err(e) = block.try_reserve_exact(16 << 20) {
            return Err(format!("out of memory after {} blocks: {e}", blocks.len()));
        }
        blocks.push(block);
        std::hint::black_box(&mut blocks);
    }
}

/// Recurses until the stack runs out; `black_box` keeps it from becoming a loop.
fn recurse(n: u64) -> u64 {
    if n == 0 {
        return 0;
    }
    1 + recurse(std::hint::black_box(n - 1))
}

/// The counter as it was when the snapshot was created; a read may take part of it.
struct Snapshot(RefCell<Vec<u8>>);

impl GuestSnapshot for Snapshot {
    fn new() -> Self {
        Snapshot(RefCell::new(COUNTER.get().to_le_bytes().to_vec()))
    }

    fn read(&self, max_bytes: u32) -> Result<Vec<u8>, String> {
        let mut rest = self.0.borrow_mut();
        let take = rest.len().min(max_bytes as usize);
        Ok(rest.drain(..take).collect())
    }
}

struct Restore(RefCell<Vec<u8>>);

impl GuestRestore for Restore {
    fn new() -> Self {
        Restore(RefCell::new(Vec::new()))
    }

    fn write(&self, chunk: Vec<u8>) -> Result<(), String> {
        let mut buf = self.0.borrow_mut();
        if buf.len() + chunk.len() > 8 {
            return Err("faulty snapshot is longer than 8 bytes".to_string());
        }
        buf.extend_from_slice(&chunk);
        Ok(())
    }

    fn finish(&self) -> Result<(), String> {
        let bytes: [u8; 8] = self
            .0
            .borrow()
            .as_slice()
            .try_into()
            .map_err(|_| format!("faulty snapshot must be exactly 8 bytes, got {}", self.0.borrow().len()))?;
        COUNTER.set(i64::from_le_bytes(bytes));
        Ok(())
    }
}

// The generated export shims are the only unsafe code in this crate.
#[allow(unsafe_code)]
mod export_shims {
    use super::*;
    export!(Faulty with_types_in super);
}
