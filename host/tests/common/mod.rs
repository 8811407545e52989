//! Harness for tests that run real `host` and `kv` processes on loopback.
//!
//! Every cluster gets its own temporary directory and its own free ports, so tests run
//! in parallel. Tests synchronise by polling `GET /status` until a condition holds or a
//! deadline passes, never by sleeping for a fixed time; a timeout panics with what was
//! last seen and the tail of every node's log.

// Each test binary uses its own subset of these helpers.
#![allow(dead_code)]

pub mod history;

use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

/// How long a cluster may take to reach any awaited condition. Generous because two
/// cores may be shared by a cluster test, the bad-input tests and their kv processes.
pub const TIMEOUT: Duration = Duration::from_secs(60);
const POLL_INTERVAL: Duration = Duration::from_millis(50);
/// A single `kv` invocation; it retries internally while it looks for the leader.
pub const KV_TIMEOUT: Duration = Duration::from_secs(30);
/// Graceful shutdown has to finish well inside a Kubernetes termination grace period.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(30);
const LOG_TAIL_LINES: usize = 40;

// ---------------------------------------------------------------------------------------
// Locating what scripts/build.sh produced

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the host crate lives one level below the workspace root")
        .to_path_buf()
}

fn target_dir() -> PathBuf {
    // `join` keeps an absolute CARGO_TARGET_DIR as it is.
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => workspace_root().join(dir),
        None => workspace_root().join("target"),
    }
}

/// Cargo names the binaries of this package it built alongside the tests; fall back to
/// the release build for a test binary compiled before a binary existed.
fn binary(built_with_tests: Option<&str>, name: &str) -> PathBuf {
    let path = built_with_tests.map(PathBuf::from).unwrap_or_else(|| target_dir().join("release").join(name));
    assert!(path.is_file(), "{name} binary not found at {}: run scripts/build.sh first", path.display());
    path
}

pub fn host_exe() -> PathBuf {
    binary(option_env!("CARGO_BIN_EXE_host"), "host")
}

pub fn kv_exe() -> PathBuf {
    binary(option_env!("CARGO_BIN_EXE_kv"), "kv")
}

pub fn loadgen_exe() -> PathBuf {
    binary(option_env!("CARGO_BIN_EXE_loadgen"), "loadgen")
}

/// A guest component, e.g. `guest("kvstore")`.
pub fn guest(name: &str) -> PathBuf {
    let path = target_dir().join("wasm32-wasip2").join("release").join(format!("{name}.wasm"));
    assert!(path.is_file(), "guest {name} not found at {}: run scripts/build.sh first", path.display());
    path
}

// ---------------------------------------------------------------------------------------
// Ports and processes

/// `n` distinct ports that were free a moment ago. All listeners are held until every
/// port is chosen, so one call never hands out the same port twice.
pub fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> =
        (0..n).map(|_| TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port on 127.0.0.1")).collect();
    listeners.iter().map(|l| l.local_addr().expect("local address of a bound listener").port()).collect()
}

/// A command that does not inherit `HOST_*` variables: the host reads its flags from
/// them, and a developer's shell must not change what a test starts.
pub fn clean_command(program: &Path) -> Command {
    let mut cmd = Command::new(program);
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("HOST_") {
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

// ---------------------------------------------------------------------------------------
// Waiting

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

// ---------------------------------------------------------------------------------------
// HTTP, just enough for the admin port

/// One HTTP/1.1 request with `Connection: close`; returns the status code and body.
pub fn http_request(addr: &str, method: &str, path: &str, body: Option<&[u8]>) -> Result<(u16, String), String> {
    let sock: SocketAddr = addr.parse().map_err(|e| format!("bad address {addr}: {e}"))?;
    let mut stream =
        TcpStream::connect_timeout(&sock, Duration::from_secs(2)).map_err(|e| format!("connect {addr}: {e}"))?;
    let io_timeout = Some(Duration::from_secs(10));
    stream
        .set_read_timeout(io_timeout)
        .and_then(|()| stream.set_write_timeout(io_timeout))
        .map_err(|e| format!("set timeouts on {addr}: {e}"))?;
    let mut request =
        format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nAccept: application/json\r\n")
            .into_bytes();
    if let Some(body) = body {
        request.extend_from_slice(
            format!("Content-Type: application/json\r\nContent-Length: {}\r\n", body.len()).as_bytes(),
        );
    }
    request.extend_from_slice(b"\r\n");
    if let Some(body) = body {
        request.extend_from_slice(body);
    }
    stream.write_all(&request).map_err(|e| format!("send to {addr}: {e}"))?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).map_err(|e| format!("read from {addr}: {e}"))?;
    parse_http_response(&response).map_err(|e| format!("{method} {path} on {addr}: {e}"))
}

pub fn http_get(addr: &str, path: &str) -> Result<(u16, String), String> {
    http_request(addr, "GET", path, None)
}

fn parse_http_response(response: &[u8]) -> Result<(u16, String), String> {
    let split = response.windows(4).position(|w| w == b"\r\n\r\n").ok_or("response has no end of headers")?;
    let head = String::from_utf8_lossy(&response[..split]);
    let body = &response[split + 4..];
    let mut lines = head.lines();
    let status_line = lines.next().ok_or("empty response")?;
    let code = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse::<u16>().ok())
        .ok_or_else(|| format!("bad status line {status_line:?}"))?;
    let chunked = lines.any(|line| {
        let line = line.to_ascii_lowercase();
        line.starts_with("transfer-encoding:") && line.contains("chunked")
    });
    let body = if chunked { dechunk(body)? } else { body.to_vec() };
    Ok((code, String::from_utf8_lossy(&body).into_owned()))
}

fn dechunk(mut data: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    loop {
        let line_end = data.windows(2).position(|w| w == b"\r\n").ok_or("chunk size line not terminated")?;
        let size_text = String::from_utf8_lossy(&data[..line_end]);
        let size_text = size_text.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_text, 16).map_err(|e| format!("bad chunk size {size_text:?}: {e}"))?;
        data = &data[line_end + 2..];
        if size == 0 {
            return Ok(out);
        }
        if data.len() < size + 2 {
            return Err("chunk shorter than its size".into());
        }
        out.extend_from_slice(&data[..size]);
        data = &data[size + 2..];
    }
}

/// `GET /status` of the node whose admin port is `admin_addr`.
pub fn try_status(admin_addr: &str) -> Result<Value, String> {
    let (code, body) = http_get(admin_addr, "/status")?;
    if code != 200 {
        return Err(format!("GET /status on {admin_addr}: HTTP {code}: {body}"));
    }
    serde_json::from_str(&body).map_err(|e| format!("GET /status on {admin_addr}: not JSON ({e}): {body}"))
}

/// An integer field of a `/status` document.
pub fn field_u64(status: &Value, field: &str) -> u64 {
    status[field].as_u64().unwrap_or_else(|| panic!("/status field {field:?} is not an unsigned integer: {status}"))
}

pub fn field_str<'a>(status: &'a Value, field: &str) -> &'a str {
    status[field].as_str().unwrap_or_else(|| panic!("/status field {field:?} is not a string: {status}"))
}

pub fn members(status: &Value) -> &Vec<Value> {
    status["members"].as_array().unwrap_or_else(|| panic!("/status field \"members\" is not a list: {status}"))
}

pub fn voter_ids(status: &Value) -> Vec<u64> {
    let mut ids: Vec<u64> =
        members(status).iter().filter(|m| m["voter"].as_bool() == Some(true)).map(|m| field_u64(m, "id")).collect();
    ids.sort_unstable();
    ids
}

// ---------------------------------------------------------------------------------------
// kv

/// Runs the real `kv` binary: `kv --cluster <cluster_addrs> <args...>`.
pub fn kv(cluster_addrs: &str, args: &[&str]) -> Output {
    let mut cmd = clean_command(&kv_exe());
    cmd.arg("--cluster").arg(cluster_addrs).args(args);
    run_with_timeout(cmd, KV_TIMEOUT).unwrap_or_else(|e| panic!("{e}"))
}

pub fn key(i: usize) -> String {
    format!("key-{i}")
}

pub fn value(i: usize) -> String {
    format!("value-{i}")
}

/// Sets `key` to `value`, retrying while the cluster answers with an error (an election
/// in progress, a leader still unknown, an outcome it cannot vouch for). Setting the same
/// value again is harmless, and the write counts as acknowledged only once `kv` says OK.
/// Returns how many attempts failed.
pub fn set_acknowledged(cluster_addrs: &str, key: &str, value: &str) -> usize {
    let mut failures = Vec::new();
    let result = poll_until(TIMEOUT, || {
        let out = kv(cluster_addrs, &["set", key, value]);
        if out.status.success() {
            Ok(())
        } else {
            failures.push(stderr_of(&out));
            Err(String::new())
        }
    });
    if result.is_err() {
        panic!(
            "kv set {key} {value} never succeeded on {cluster_addrs} within {TIMEOUT:?}; \
             last errors: {:?}",
            &failures[failures.len().saturating_sub(3)..]
        );
    }
    failures.len()
}

/// Writes `key(i) = value(i)` for every `i` in `range`, from `threads` concurrent
/// writers, each running one `kv` process per write.
pub fn set_many(cluster_addrs: &str, range: Range<usize>, threads: usize) {
    let threads = threads.max(1);
    let retried: usize = thread::scope(|s| {
        let writers: Vec<_> = (0..threads)
            .map(|t| {
                let range = range.clone();
                s.spawn(move || {
                    range
                        .skip(t)
                        .step_by(threads)
                        .map(|i| set_acknowledged(cluster_addrs, &key(i), &value(i)))
                        .sum::<usize>()
                })
            })
            .collect();
        writers.into_iter().map(|w| w.join().expect("writer thread panicked")).sum()
    });
    if retried > 0 {
        eprintln!("set_many {range:?}: {retried} kv attempts failed and were retried");
    }
}

/// Checks through the cluster (a linearizable read) that `key(i) = value(i)` for every
/// `i` in `range`.
pub fn assert_all_readable(cluster_addrs: &str, range: Range<usize>, threads: usize) {
    let threads = threads.max(1);
    thread::scope(|s| {
        for t in 0..threads {
            let range = range.clone();
            s.spawn(move || {
                for i in range.skip(t).step_by(threads) {
                    let out = kv(cluster_addrs, &["get", &key(i)]);
                    assert!(
                        out.status.success(),
                        "acknowledged write {} is not readable on {cluster_addrs}: {}",
                        key(i),
                        stderr_of(&out)
                    );
                    assert_eq!(stdout_of(&out), value(i), "value of {}", key(i));
                }
            });
        }
    });
}

// ---------------------------------------------------------------------------------------
// Nodes

/// One `host` process and everything needed to start it again.
pub struct Node {
    pub id: u64,
    pub client_addr: String,
    pub raft_addr: String,
    pub admin_addr: String,
    pub text_addr: String,
    pub data_dir: PathBuf,
    pub log_path: PathBuf,
    /// Every flag but `--join`.
    args: Vec<String>,
    join: Option<String>,
    child: Option<Child>,
}

impl Node {
    /// Starts node `id` with its data and log under `dir`. Waits only until it serves
    /// `/status` or exits: a free port found by binding port 0 can be taken by another
    /// test (or an outgoing connection) before the node binds it, so a node that exits
    /// because an address is in use is started again on other ports.
    pub fn start(id: u64, dir: &Path, fsm: &Path, extra: &[String], join: Option<&str>) -> Node {
        const ATTEMPTS: usize = 5;
        let mut attempt = 1;
        loop {
            let mut node = Node::launch_on_free_ports(id, dir, fsm, extra, join);
            if !node.exited_on_a_port_clash() || attempt == ATTEMPTS {
                return node;
            }
            attempt += 1;
            node.child = None;
        }
    }

    /// Waits until the node serves `/status` or exits; whether it exited because an
    /// address was in use.
    fn exited_on_a_port_clash(&mut self) -> bool {
        let settled = poll_until(TIMEOUT, || match self.exited() {
            Some(status) => Ok(Some(status)),
            None if try_status(&self.admin_addr).is_ok() => Ok(None),
            None => Err("neither serving nor exited".to_string()),
        });
        matches!(settled, Ok(Some(_))) && file_tail(&self.log_path, 5).contains("Address already in use")
    }

    fn launch_on_free_ports(id: u64, dir: &Path, fsm: &Path, extra: &[String], join: Option<&str>) -> Node {
        let ports = free_ports(4);
        let addr = |port: u16| format!("127.0.0.1:{port}");
        let data_dir = dir.join(format!("node-{id}"));
        let mut args: Vec<String> = vec![
            "--fsm".into(),
            fsm.display().to_string(),
            "--id".into(),
            id.to_string(),
            "--client-addr".into(),
            addr(ports[0]),
            "--raft-addr".into(),
            addr(ports[1]),
            "--admin-addr".into(),
            addr(ports[2]),
            "--text-addr".into(),
            addr(ports[3]),
            "--data-dir".into(),
            data_dir.display().to_string(),
        ];
        args.extend(extra.iter().cloned());
        let mut node = Node {
            id,
            client_addr: addr(ports[0]),
            raft_addr: addr(ports[1]),
            admin_addr: addr(ports[2]),
            text_addr: addr(ports[3]),
            data_dir,
            log_path: dir.join(format!("node-{id}.log")),
            args,
            join: join.map(str::to_string),
            child: None,
        };
        node.launch(true);
        node
    }

    fn launch(&mut self, with_join: bool) {
        assert!(self.child.is_none(), "node {} is already running", self.id);
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .unwrap_or_else(|e| panic!("open {}: {e}", self.log_path.display()));
        let log_err = log.try_clone().unwrap_or_else(|e| panic!("clone handle of {}: {e}", self.log_path.display()));
        let mut cmd = clean_command(&host_exe());
        cmd.args(&self.args);
        if let (true, Some(join)) = (with_join, &self.join) {
            cmd.arg("--join").arg(join);
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start node {}: {e}", self.id));
        self.child = Some(child);
    }

    /// Whether this node was started and not stopped by the test (it may have crashed).
    pub fn is_up(&self) -> bool {
        self.child.is_some()
    }

    /// `Some(status)` if the process has exited on its own.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.as_mut().and_then(|c| c.try_wait().expect("try_wait on a host process"))
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap_or_else(|| panic!("node {} is not running", self.id)).id()
    }

    /// SIGKILL: no chance to flush or say goodbye.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, then waits for the process to exit on its own.
    pub fn terminate(&mut self) -> ExitStatus {
        let pid = self.pid().to_string();
        let sent = Command::new("kill").args(["-TERM", &pid]).status().expect("run kill");
        assert!(sent.success(), "kill -TERM {pid} failed");
        let child = self.child.as_mut().expect("checked by pid()");
        let exited = poll_until(SHUTDOWN_TIMEOUT, || {
            child.try_wait().expect("try_wait on a host process").ok_or_else(String::new)
        });
        match exited {
            Ok(status) => {
                self.child = None;
                status
            }
            Err(_) => {
                self.kill9();
                panic!("node {} did not exit within {SHUTDOWN_TIMEOUT:?} of SIGTERM\n{}", self.id, self.log_tail());
            }
        }
    }

    /// Starts the process again on the same data directory and ports. `--join` is left
    /// out: a node with data resumes as the member it was. The ports are in the
    /// membership, so they cannot change; while one is briefly the local port of some
    /// other process's outgoing connection, the node is started again after a pause.
    pub fn restart(&mut self) {
        self.relaunch(false);
    }

    /// Like [`Node::restart`], but with `--join join` (kept for later restarts that join).
    pub fn restart_joining(&mut self, join: &str) {
        self.join = Some(join.to_string());
        self.relaunch(true);
    }

    fn relaunch(&mut self, with_join: bool) {
        const ATTEMPTS: usize = 20;
        for attempt in 1..=ATTEMPTS {
            let mut log = OpenOptions::new()
                .append(true)
                .open(&self.log_path)
                .unwrap_or_else(|e| panic!("open {}: {e}", self.log_path.display()));
            let _ = writeln!(log, "======== restarted by the test ========");
            drop(log);
            self.launch(with_join);
            if !self.exited_on_a_port_clash() || attempt == ATTEMPTS {
                return;
            }
            self.child = None;
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    pub fn status(&self) -> Value {
        try_status(&self.admin_addr).unwrap_or_else(|e| panic!("node {}: {e}", self.id))
    }

    pub fn log_tail(&self) -> String {
        format!(
            "---- node {} log {} (last {LOG_TAIL_LINES} lines) ----\n{}",
            self.id,
            self.log_path.display(),
            file_tail(&self.log_path, LOG_TAIL_LINES)
        )
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill9();
    }
}

// ---------------------------------------------------------------------------------------
// Clusters

pub struct Cluster {
    /// `nodes[i]` has id `i + 1`.
    pub nodes: Vec<Node>,
    fsm: PathBuf,
    extra: Vec<String>,
    // Declared after `nodes`, so the processes are gone before their files are removed.
    dir: tempfile::TempDir,
}

impl Cluster {
    /// Node 1 bootstraps; the others start together and join through node 1; returns once
    /// all `n` are voters and every node knows the leader.
    pub fn start(n: usize, guest_name: &str, extra_args: &[&str]) -> Cluster {
        assert!(n >= 1, "a cluster has at least one node");
        let dir = tempfile::Builder::new()
            .prefix("host-cluster-")
            .tempdir()
            .expect("create a temporary directory for the cluster");
        let mut cluster = Cluster {
            nodes: Vec::new(),
            fsm: guest(guest_name),
            extra: extra_args.iter().map(|s| s.to_string()).collect(),
            dir,
        };
        cluster.nodes.push(Node::start(1, cluster.dir.path(), &cluster.fsm, &cluster.extra, None));
        cluster.wait_until("node 1 to bootstrap and become leader", |c| {
            let status = try_status(&c.nodes[0].admin_addr)?;
            match status["state"].as_str() {
                Some("Leader") => Ok(()),
                _ => Err(format!("node 1: {status}")),
            }
        });
        let join = cluster.nodes[0].admin_addr.clone();
        for id in 2..=n as u64 {
            let node = Node::start(id, cluster.dir.path(), &cluster.fsm, &cluster.extra, Some(&join));
            cluster.nodes.push(node);
        }
        cluster.wait_voters(n);
        cluster
    }

    /// Starts one more node that joins through every running member's admin address (the
    /// comma-separated form of `--join`). Returns its index; it is not waited for.
    pub fn add_node(&mut self) -> usize {
        let join = self.running().map(|i| self.nodes[i].admin_addr.clone()).collect::<Vec<_>>().join(",");
        let id = self.nodes.len() as u64 + 1;
        let node = Node::start(id, self.dir.path(), &self.fsm, &self.extra, Some(&join));
        self.nodes.push(node);
        self.nodes.len() - 1
    }

    /// Indexes of the nodes the test has not stopped.
    pub fn running(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.nodes.len()).filter(|&i| self.nodes[i].is_up())
    }

    /// Client addresses of the running nodes, as `kv --cluster` takes them.
    pub fn client_addrs(&self) -> String {
        self.running().map(|i| self.nodes[i].client_addr.clone()).collect::<Vec<_>>().join(",")
    }

    pub fn kv(&self, args: &[&str]) -> Output {
        kv(&self.client_addrs(), args)
    }

    /// The tail of every node's log, for failure messages.
    pub fn logs(&self) -> String {
        self.nodes.iter().map(Node::log_tail).collect::<Vec<_>>().join("\n")
    }

    /// Polls `check` until it returns `Ok` or [`TIMEOUT`] passes; then panics with `why`,
    /// the last error and the logs. Fails at once if a node the test started has died.
    pub fn wait_until<T>(&mut self, why: &str, mut check: impl FnMut(&Cluster) -> Result<T, String>) -> T {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let last = match check(self) {
                Ok(value) => return value,
                Err(last) => last,
            };
            let died: Vec<String> = self
                .nodes
                .iter_mut()
                .filter_map(|n| n.exited().map(|s| format!("node {} exited ({s})", n.id)))
                .collect();
            if !died.is_empty() || Instant::now() >= deadline {
                let reason = if died.is_empty() { format!("timed out after {TIMEOUT:?}") } else { died.join(", ") };
                panic!("{reason} while waiting for {why}\nlast seen: {last}\n{}", self.logs());
            }
            thread::sleep(POLL_INTERVAL);
        }
    }

    /// The statuses of the running nodes, or the first one that does not answer.
    pub fn statuses(&self) -> Result<Vec<(usize, Value)>, String> {
        self.running()
            .map(|i| {
                try_status(&self.nodes[i].admin_addr)
                    .map(|s| (i, s))
                    .map_err(|e| format!("node {}: {e}", self.nodes[i].id))
            })
            .collect()
    }

    /// The index of the node that is leader in the newest term among those that answer.
    /// An isolated or stale leader of an older term does not count.
    pub fn find_leader(&self) -> Result<usize, String> {
        let answering: Vec<(usize, Value)> =
            self.running().filter_map(|i| try_status(&self.nodes[i].admin_addr).ok().map(|s| (i, s))).collect();
        let newest_term =
            answering.iter().filter_map(|(_, s)| s["term"].as_u64()).max().ok_or("no node answers /status")?;
        answering
            .iter()
            .find(|(_, s)| s["state"] == "Leader" && s["term"].as_u64() == Some(newest_term))
            .map(|(i, _)| *i)
            .ok_or_else(|| {
                let states: Vec<String> = answering
                    .iter()
                    .map(|(i, s)| format!("node {}: {} term {}", i + 1, s["state"], s["term"]))
                    .collect();
                format!("no leader in term {newest_term}: {}", states.join("; "))
            })
    }

    /// Waits for a leader and returns its index.
    pub fn leader(&mut self) -> usize {
        self.wait_until("a leader", Cluster::find_leader)
    }

    /// Waits until the leader lists exactly `n` voters and every running node reports
    /// that leader, so a client can start from any of them.
    pub fn wait_voters(&mut self, n: usize) {
        self.wait_until(&format!("{n} voters that all know the leader"), |c| {
            let leader = c.find_leader()?;
            let leader_status = try_status(&c.nodes[leader].admin_addr)?;
            let voters = voter_ids(&leader_status);
            if voters.len() != n {
                return Err(format!("leader lists voters {voters:?}"));
            }
            let leader_id = c.nodes[leader].id;
            for (i, status) in c.statuses()? {
                if status["leader_id"].as_u64() != Some(leader_id) {
                    return Err(format!(
                        "node {} reports leader_id {} instead of {leader_id}",
                        i + 1,
                        status["leader_id"]
                    ));
                }
            }
            Ok(())
        });
    }

    /// Waits until every running node has applied the whole log and reports the same
    /// `state_digest` at the same `last_applied`; returns one of the statuses.
    pub fn wait_converged(&mut self) -> Value {
        let all: Vec<usize> = self.running().collect();
        self.wait_converged_among(&all)
    }

    /// [`Cluster::wait_converged`] for the nodes at `indexes` only (others may run apart).
    pub fn wait_converged_among(&mut self, indexes: &[usize]) -> Value {
        self.wait_until("all nodes to converge on one state", |c| {
            let statuses = indexes
                .iter()
                .map(|&i| {
                    try_status(&c.nodes[i].admin_addr)
                        .map(|s| (i, s))
                        .map_err(|e| format!("node {}: {e}", c.nodes[i].id))
                })
                .collect::<Result<Vec<_>, String>>()?;
            let end = statuses.iter().map(|(_, s)| field_u64(s, "last_log_index")).max().ok_or("no running node")?;
            for (i, s) in &statuses {
                let applied = field_u64(s, "last_applied");
                if applied != end {
                    return Err(format!("node {} applied {applied} of {end}", i + 1));
                }
            }
            let digests: Vec<&str> = statuses.iter().map(|(_, s)| field_str(s, "state_digest")).collect();
            if digests.iter().any(|d| *d != digests[0]) {
                // Kept as a retryable error only because two statuses are not read at the
                // same instant; a real divergence persists and fails at the deadline.
                return Err(format!("different state_digest at last_applied {end}: {digests:?}"));
            }
            Ok(statuses[0].1.clone())
        })
    }

    /// Waits until node `i` has applied at least everything the leader had applied when
    /// this was called, so a stale read on it sees every earlier acknowledged write.
    pub fn wait_caught_up(&mut self, i: usize) {
        let leader = self.leader();
        let target = field_u64(&self.nodes[leader].status(), "last_applied");
        let id = self.nodes[i].id;
        self.wait_until(&format!("node {id} to apply index {target}"), |c| {
            let applied = field_u64(&try_status(&c.nodes[i].admin_addr)?, "last_applied");
            if applied >= target {
                Ok(())
            } else {
                Err(format!("node {id} applied {applied}"))
            }
        });
    }

    /// `kv get --stale` against node `i` alone: what that node's own state holds.
    pub fn stale_get(&self, i: usize, key: &str) -> Output {
        kv(&self.nodes[i].client_addr, &["get", "--stale", key])
    }

    /// Checks, node by node, that each running node's own state holds `key(i) = value(i)`
    /// for the sampled `i`.
    pub fn assert_every_node_has(&mut self, sample: &[usize]) {
        let nodes: Vec<usize> = self.running().collect();
        for n in nodes {
            self.wait_caught_up(n);
            for &i in sample {
                let out = self.stale_get(n, &key(i));
                assert!(
                    out.status.success(),
                    "node {} lacks acknowledged write {}: {}",
                    n + 1,
                    key(i),
                    stderr_of(&out)
                );
                assert_eq!(stdout_of(&out), value(i), "value of {} on node {}", key(i), n + 1);
            }
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if thread::panicking() {
            self.dir.disable_cleanup(true);
            eprintln!("cluster files kept in {}", self.dir.path().display());
        }
    }
}

/// `len` reproducible pseudo-random bytes (xorshift).
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 24) as u8
        })
        .collect()
}
