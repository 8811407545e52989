//! One `host` process of a test: started on free ports, restarted, stopped.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use serde_json::Value;

use super::http::try_status;
use super::paths::host_exe;
use super::process::{clean_command, file_tail, free_ports, poll_until, TIMEOUT};

/// Graceful shutdown has to finish well inside a Kubernetes termination grace period.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(30);
const LOG_TAIL_LINES: usize = 40;

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
    /// Environment variables set on later (re)starts, beyond the clean environment.
    envs: Vec<(String, String)>,
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
            envs: Vec::new(),
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
        cmd.envs(self.envs.iter().map(|(k, v)| (k, v)));
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

    /// Waits for the process to exit on its own (a refusal at start, a fatal error, a
    /// removal) and reaps it; panics with its log if it does not within `TIMEOUT`.
    pub fn wait_exit(&mut self) -> ExitStatus {
        let status = poll_until(TIMEOUT, || self.exited().ok_or_else(|| "still running".to_string()))
            .unwrap_or_else(|e| panic!("node {} did not exit: {e}\n{}", self.id, self.log_tail()));
        self.kill9();
        status
    }

    /// Everything the process logged, over all its starts.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_else(|e| panic!("{}: {e}", self.log_path.display()))
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

    /// Adds flags for later restarts.
    pub fn add_flags(&mut self, flags: &[&str]) {
        self.args.extend(flags.iter().map(|f| f.to_string()));
    }

    /// Sets an environment variable for later restarts (e.g. a test failpoint).
    pub fn set_env(&mut self, key: &str, value: &str) {
        self.forget_env(key);
        self.envs.push((key.to_string(), value.to_string()));
    }

    /// Drops a variable [`Node::set_env`] set, for later restarts.
    pub fn forget_env(&mut self, key: &str) {
        self.envs.retain(|(k, _)| k != key);
    }

    /// Drops `flag` from the flags later restarts use (e.g. `--learner`).
    pub fn forget_flag(&mut self, flag: &str) {
        self.args.retain(|a| a != flag);
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
