//! Ports, child processes with timeouts, and polling instead of sleeping.

use std::io::Read;
use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// How long a cluster may take to reach any awaited condition. Generous because two
/// cores may be shared by a cluster test, the bad-input tests and their kv processes.
pub const TIMEOUT: Duration = Duration::from_secs(60);
pub const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// Test ports come from here, below Linux's ephemeral range (32768-60999): a port from
/// that range can be taken, while its member is down for a restart, as the local port of
/// another process's outgoing connection (a pooled peer connection lives for minutes),
/// and the member could not bind it again.
const TEST_PORTS: std::ops::Range<u16> = 16_000..32_000;

/// `n` distinct ports that were free a moment ago. All listeners are held until every
/// port is chosen, so one call never hands out the same port twice; the start point is
/// random, so that tests running at once rarely try the same ones.
pub fn free_ports(n: usize) -> Vec<u16> {
    let span = u32::from(TEST_PORTS.end - TEST_PORTS.start);
    let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos())
        ^ std::process::id().wrapping_mul(2_654_435_761);
    let mut listeners: Vec<TcpListener> = Vec::with_capacity(n);
    let mut offset = seed % span;
    for _ in 0..span {
        if listeners.len() == n {
            break;
        }
        let port = TEST_PORTS.start + (offset % span) as u16;
        offset += 7919;
        if let Ok(l) = TcpListener::bind(("127.0.0.1", port)) {
            listeners.push(l);
        }
    }
    assert_eq!(listeners.len(), n, "{n} free ports in {TEST_PORTS:?}");
    listeners.iter().map(|l| l.local_addr().expect("local address of a bound listener").port()).collect()
}

/// A command that does not inherit `HOST_*`, `KV_*`, `LOADGEN_*` or `LOGGER_*` variables: `host`,
/// `kv` and `loadgen` read their flags from them, and a developer's shell must not
/// change what a test starts.
pub fn clean_command(program: &Path) -> Command {
    let mut cmd = Command::new(program);
    for (key, _) in std::env::vars_os() {
        let key_text = key.to_string_lossy();
        if ["HOST_", "KV_", "LOADGEN_", "LOGGER_"].iter().any(|prefix| key_text.starts_with(prefix)) {
            cmd.env_remove(key);
        }
    }
    if std::env::var_os("RUST_LOG").is_none() {
        cmd.env("RUST_LOG", "info");
    }
    cmd.env("RUST_BACKTRACE", "1");
    cmd
}

/// Runs a command to completion with its output captured, killing it after `timeout`.
/// `Err` carries what it printed before it was killed.
pub fn run_with_timeout(mut cmd: Command, timeout: Duration) -> Result<Output, String> {
    let what = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
    // Drained on threads so a chatty process never blocks on a full pipe.
    let stdout = drain(child.stdout.take().expect("stdout is piped"));
    let stderr = drain(child.stderr.take().expect("stderr is piped"));
    let deadline = Instant::now() + timeout;
    // Most runs are kv calls of a few milliseconds, and a test makes a thousand of them:
    // start polling fast, then back off.
    let mut pause = Duration::from_millis(1);
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            Ok(None) => {
                thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(20));
            }
            Err(e) => panic!("waiting for {what}: {e}"),
        }
    };
    let stdout = stdout.join().expect("stdout reader thread");
    let stderr = stderr.join().expect("stderr reader thread");
    match status {
        Some(status) => Ok(Output { status, stdout, stderr }),
        None => Err(format!(
            "{what} did not exit within {timeout:?}\n-- stdout:\n{}\n-- stderr:\n{}",
            String::from_utf8_lossy(&stdout),
            String::from_utf8_lossy(&stderr)
        )),
    }
}

fn drain(mut pipe: impl Read + Send + 'static) -> thread::JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = pipe.read_to_end(&mut buf);
        buf
    })
}

pub fn stdout_of(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

pub fn stderr_of(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).trim().to_string()
}

/// The last `lines` lines of a file, or a note saying why there are none.
pub fn file_tail(path: &Path, lines: usize) -> String {
    match std::fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let all: Vec<&str> = text.lines().collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        }
        Err(e) => format!("(cannot read {}: {e})", path.display()),
    }
}

/// Calls `check` until it returns `Ok`, or returns its last `Err` once `timeout` passed.
pub fn poll_until<T>(timeout: Duration, mut check: impl FnMut() -> Result<T, String>) -> Result<T, String> {
    let deadline = Instant::now() + timeout;
    loop {
        match check() {
            Ok(value) => return Ok(value),
            Err(last) if Instant::now() >= deadline => return Err(last),
            Err(_) => thread::sleep(POLL_INTERVAL),
        }
    }
}

/// Waits until `cond` holds, for at most [`TIMEOUT`].
pub fn wait_for(mut cond: impl FnMut() -> bool, why: &str) {
    let met = poll_until(TIMEOUT, || if cond() { Ok(()) } else { Err(String::new()) });
    assert!(met.is_ok(), "timed out after {TIMEOUT:?} waiting for {why}");
}
