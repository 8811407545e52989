//! Bad input gets a clear error, never a crash: wrong modules and flags stop the host
//! with exit code 2 and a message; malformed traffic on a running node is answered or
//! dropped while the node keeps serving.
//!
//! Needs the release binaries and guests from `scripts/build.sh`.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::Output;
use std::time::Duration;

use common::*;

/// A host refusing its input must do so at start-up, long before this.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(60);

/// Runs `host` with its own data directory and free ports (so that a host that wrongly
/// starts up disturbs nothing), plus `args`; expects it to exit on its own.
fn run_host(dir: &Path, args: &[&str]) -> Output {
    let ports = free_ports(4);
    let mut cmd = clean_command(&host_exe());
    cmd.arg("--data-dir").arg(dir.join("data"));
    for (flag, port) in ["--client-addr", "--raft-addr", "--admin-addr", "--text-addr"].iter().zip(&ports) {
        if !args.contains(flag) {
            cmd.arg(flag).arg(format!("127.0.0.1:{port}"));
        }
    }
    cmd.args(args);
    run_with_timeout(cmd, STARTUP_TIMEOUT).unwrap_or_else(|e| panic!("the host should have refused to start: {e}"))
}

fn temp_dir() -> tempfile::TempDir {
    tempfile::Builder::new().prefix("host-bad-input-").tempdir().expect("create a temporary directory")
}

fn assert_exit_2_naming(out: &Output, file: &Path) -> String {
    let stderr = stderr_of(out);
    assert_eq!(out.status.code(), Some(2), "expected exit code 2, got {}; stderr: {stderr}", out.status);
    let name = file.file_name().expect("a file name").to_string_lossy().into_owned();
    assert!(stderr.contains(&name), "stderr should name {name}: {stderr}");
    stderr.to_lowercase()
}

#[test]
fn t10_missing_wasm_exits_2_naming_the_file() {
    let dir = temp_dir();
    let missing = dir.path().join("no-such-guest.wasm");
    let out = run_host(dir.path(), &["--fsm", &missing.display().to_string()]);
    assert_exit_2_naming(&out, &missing);
}

#[test]
fn t11_random_bytes_are_not_a_module() {
    let dir = temp_dir();
    let file = dir.path().join("noise.wasm");
    std::fs::write(&file, noise(4096, 11)).expect("write noise.wasm");
    let out = run_host(dir.path(), &["--fsm", &file.display().to_string()]);
    assert_exit_2_naming(&out, &file);
}

#[test]
fn t12_core_module_is_not_a_component() {
    let dir = temp_dir();
    let file = dir.path().join("core-module.wasm");
    // The smallest valid core module: magic and version 1, no sections.
    std::fs::write(&file, b"\0asm\x01\0\0\0").expect("write core-module.wasm");
    let out = run_host(dir.path(), &["--fsm", &file.display().to_string()]);
    let stderr = assert_exit_2_naming(&out, &file);
    assert!(
        stderr.contains("component") && (stderr.contains("not a") || stderr.contains("core")),
        "stderr should say the file is a core module, not a component: {stderr}"
    );
}

#[test]
fn t13_component_without_the_contract_is_refused() {
    let dir = temp_dir();
    let file = guest("notfsm");
    let out = run_host(dir.path(), &["--fsm", &file.display().to_string()]);
    let stderr = assert_exit_2_naming(&out, &file);
    assert!(
        stderr.contains("implement") || stderr.contains("export") || stderr.contains("state-machine"),
        "stderr should say the component lacks the state-machine contract: {stderr}"
    );
}

fn assert_port_in_use_is_named(flag: &str) {
    let dir = temp_dir();
    let taken = TcpListener::bind("127.0.0.1:0").expect("bind a port to hold");
    let addr = taken.local_addr().expect("local address").to_string();
    let fsm = guest("kvstore").display().to_string();
    let out = run_host(dir.path(), &["--fsm", &fsm, flag, &addr]);
    assert!(!out.status.success(), "host started although {addr} ({flag}) is taken");
    let printed = format!("{}\n{}", stdout_of(&out), stderr_of(&out));
    assert!(printed.contains(&addr), "the error should name {addr}: {printed}");
    drop(taken);
}

#[test]
fn t20_admin_port_in_use_is_named() {
    assert_port_in_use_is_named("--admin-addr");
}

#[test]
fn t21_client_port_in_use_is_named() {
    assert_port_in_use_is_named("--client-addr");
}

#[test]
fn t22_unknown_flag_exits_2() {
    let dir = temp_dir();
    let fsm = guest("kvstore").display().to_string();
    let out = run_host(dir.path(), &["--fsm", &fsm, "--no-such-flag"]);
    assert_eq!(out.status.code(), Some(2), "stderr: {}", stderr_of(&out));
    assert!(stderr_of(&out).contains("--no-such-flag"), "stderr should name the flag: {}", stderr_of(&out));
}

/// Sends one line on the text port and reads the one-line answer.
fn text_round_trip(reader: &mut BufReader<TcpStream>, line: &str) -> String {
    let mut stream = reader.get_ref();
    stream.write_all(format!("{line}\n").as_bytes()).unwrap_or_else(|e| panic!("send {line:?}: {e}"));
    let mut answer = String::new();
    let read = reader.read_line(&mut answer).unwrap_or_else(|e| panic!("answer to {line:?}: {e}"));
    assert!(read > 0, "connection closed after {line:?}");
    answer.trim_end_matches(['\r', '\n']).to_string()
}

#[test]
fn t30_text_protocol_answers_bad_lines_and_keeps_the_connection() {
    let c = Cluster::start(1, "kvstore", &[]);
    let stream = TcpStream::connect(&c.nodes[0].text_addr).expect("connect to the text port");
    stream.set_read_timeout(Some(Duration::from_secs(15))).expect("set read timeout");
    let mut reader = BufReader::new(stream);

    for bad in ["hello", "set-", "get", "frobnicate-1-2"] {
        let answer = text_round_trip(&mut reader, bad);
        assert!(answer.starts_with("ERR:"), "{bad:?} -> {answer:?}");
    }
    let answer = text_round_trip(&mut reader, "set-1-a");
    assert!(answer.starts_with("OK:"), "set-1-a -> {answer:?}");
    assert_eq!(text_round_trip(&mut reader, "get-1"), "OK: a");
    let answer = text_round_trip(&mut reader, "delete-1");
    assert!(answer.starts_with("OK:"), "delete-1 -> {answer:?}");
    let answer = text_round_trip(&mut reader, "get-1");
    assert!(answer.starts_with("ERR:"), "get-1 after delete -> {answer:?}");
}

/// Sends `bytes` on a fresh connection to the client port and hangs up after at most a
/// short wait for whatever the node answers (an error frame or a close).
fn send_and_hang_up(addr: &str, bytes: &[u8]) {
    let mut stream = TcpStream::connect(addr).expect("connect to the client port");
    stream.set_read_timeout(Some(Duration::from_millis(500))).expect("set read timeout");
    // The node may close the connection mid-write; that is a fine answer too.
    let _ = stream.write_all(bytes);
    let mut sink = [0u8; 1024];
    let _ = stream.read(&mut sink);
}

fn assert_still_serving(c: &mut Cluster, what: &str) {
    if let Some(status) = c.nodes[0].exited() {
        panic!("node exited ({status}) after {what}\n{}", c.logs());
    }
    let out = c.kv(&["set", "after", what]);
    assert!(out.status.success(), "kv set after {what}: {}\n{}", stderr_of(&out), c.logs());
    let out = c.kv(&["get", "after"]);
    assert_eq!(stdout_of(&out), what, "kv get after {what}");
}

#[test]
fn t40_client_port_survives_garbage() {
    let mut c = Cluster::start(1, "kvstore", &[]);
    let addr = c.nodes[0].client_addr.clone();
    for seed in 1..=5 {
        send_and_hang_up(&addr, &noise(4096, seed));
    }
    // A frame cut short, then the connection dropped.
    send_and_hang_up(&addr, &[0, 0, 0, 16, 1, 2]);
    send_and_hang_up(&addr, &[16, 1, 2]);
    assert_still_serving(&mut c, "garbage");
}

/// The peer port: strangers' garbage, a hello with a huge frame, and a valid hello
/// followed by an undecodable request must not disturb a 2-node cluster.
#[test]
fn t43_raft_port_survives_garbage() {
    let mut c = Cluster::start(2, "kvstore", &[]);
    for node in 0..2 {
        let addr = c.nodes[node].raft_addr.clone();
        for seed in 1..=3 {
            send_and_hang_up(&addr, &noise(4096, seed));
        }
        send_and_hang_up(&addr, &[0x7f, 0xff, 0xff, 0xff, 1, 2, 3]);
        // A well-formed hello (kind 0, empty token), then a frame of garbage.
        let hello = [0u8, 0, 0, 2, 0x08, 0x00];
        let junk = [0u8, 0, 0, 4, 0x08, 0x01, 0x12, 0x7f];
        let mut both = hello.to_vec();
        both.extend_from_slice(&junk);
        send_and_hang_up(&addr, &both);
    }
    assert_still_serving(&mut c, "peer-garbage");
    c.wait_converged();
}

#[test]
fn t41_client_port_survives_oversized_length_prefix() {
    let mut c = Cluster::start(1, "kvstore", &[]);
    let addr = c.nodes[0].client_addr.clone();
    // The largest prefix in the common framings: a 32-bit big-endian length and a
    // 64-bit varint. Neither may make the node allocate that much or wait for it.
    send_and_hang_up(&addr, &[0xff, 0xff, 0xff, 0xff, 1, 2, 3]);
    send_and_hang_up(&addr, &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01, 1, 2, 3]);
    // A varint that never ends.
    send_and_hang_up(&addr, &[0x80; 64]);
    assert_still_serving(&mut c, "oversized");
}

#[test]
fn t42_join_with_garbage_body_is_rejected() {
    let mut c = Cluster::start(1, "kvstore", &[]);
    let admin = c.nodes[0].admin_addr.clone();
    let (code, body) = http_request(&admin, "POST", "/join", Some(b"{not json")).expect("POST /join");
    assert!((400..500).contains(&code), "a malformed join request is the caller's error (4xx), got {code}: {body}");
    let (code, _) = http_get(&admin, "/no-such-page").expect("GET /no-such-page");
    assert_eq!(code, 404);
    c.wait_voters(1);
    assert_still_serving(&mut c, "join-garbage");
}

#[test]
fn t50_kv_get_of_missing_key_says_not_found() {
    let c = Cluster::start(1, "kvstore", &[]);
    let out = c.kv(&["get", "never-set"]);
    assert!(!out.status.success(), "get of a missing key succeeded");
    assert!(stderr_of(&out).to_lowercase().contains("not found"), "stderr should say not found: {}", stderr_of(&out));
}

#[test]
fn t51_kv_without_a_reachable_member_fails_with_a_message() {
    // Nothing listens there once the probe listener is gone.
    let port = free_ports(1)[0];
    // A short retry budget: the point is that kv gives up with a message, not how long it
    // keeps trying.
    let out = kv(&format!("127.0.0.1:{port}"), &["--timeout", "3", "get", "k"]);
    assert!(!out.status.success(), "kv succeeded with no cluster");
    assert!(!stderr_of(&out).is_empty(), "kv failed without a message");
}
