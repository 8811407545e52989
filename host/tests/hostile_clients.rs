//! What strangers and careless clients can do to a member: connections that say nothing,
//! frames announced and never sent, a slow HTTP head, a client that never reads its
//! answers. The member's memory must stay bounded and everyone else must still be served.
//!
//! Needs the release binaries and guests from `scripts/build.sh`.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::*;
use host::client::Client;
use host::codec::encode_frame;
use host::proto::{ClientRequest, ClientResponse, RequestKind};
use kvcommand::proto::{encode, Op};

/// Resident memory of a process, in bytes.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc/PID/status");
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/PID/status");
    kb * 1024
}

/// The highest resident memory seen over `d`, sampled every 50 ms: what the member
/// allocated for the traffic just sent, once it has read it.
fn peak_rss(pid: u32, d: Duration) -> u64 {
    let end = Instant::now() + d;
    let mut peak = rss(pid);
    while Instant::now() < end {
        std::thread::sleep(Duration::from_millis(50));
        peak = peak.max(rss(pid));
    }
    peak
}

fn connect(addr: &str) -> TcpStream {
    let s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(30))).expect("read timeout");
    s
}

fn kv_ok(addrs: &str, args: &[&str]) -> String {
    let out = kv(addrs, args);
    assert!(out.status.success(), "kv {args:?}: {}", stderr_of(&out));
    stdout_of(&out)
}

/// Reads until the server closes the connection; panics if it has not within `within`.
fn assert_closed_within(s: &mut TcpStream, within: Duration, what: &str) {
    s.set_read_timeout(Some(within)).expect("read timeout");
    let started = Instant::now();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return,
            Ok(_) => continue,
            Err(e) if matches!(e.kind(), std::io::ErrorKind::ConnectionReset) => return,
            Err(e) => panic!("{what}: still open after {:?} ({e})", started.elapsed()),
        }
    }
}

/// 200 client connections that each announce a frame of almost 16 MiB and send 10 bytes
/// of it, 100 raft connections that never say hello, 50 text connections with half a
/// line: the member must hold far less than what was announced (about 3.2 GB), keep
/// serving, and close connections past its limit at once.
#[test]
fn t10_silent_connections_and_announced_frames_hold_little_memory() {
    let c = Cluster::start(1, "kvstore", &["--max-client-connections", "260"]);
    let node = &c.nodes[0];
    kv_ok(&node.client_addr, &["set", "k", "v"]);
    let before = peak_rss(node.pid(), Duration::from_millis(200));

    let mut held = Vec::new();
    for _ in 0..200 {
        let mut s = connect(&node.client_addr);
        s.write_all(&[0x00, 0xff, 0xff, 0x00]).expect("length");
        s.write_all(&[0x08; 10]).expect("a little of the body");
        held.push(s);
    }
    for _ in 0..100 {
        held.push(connect(&node.raft_addr));
    }
    for _ in 0..50 {
        let mut s = connect(&node.text_addr);
        s.write_all(b"set-k-").expect("half a line");
        s.write_all(&[b'a'; 1000]).expect("half a line");
        held.push(s);
    }
    let during = peak_rss(node.pid(), Duration::from_secs(2));
    let grown = during.saturating_sub(before);
    eprintln!("resident before {} MB, with the connections {} MB", before >> 20, during >> 20);
    assert!(grown < 64 << 20, "the member grew by {} MB for connections that sent almost nothing", grown >> 20);

    // Others are still served.
    kv_ok(&node.client_addr, &["set", "k", "w"]);
    assert_eq!(kv_ok(&node.client_addr, &["get", "k"]), "w");

    // Fill the client port to its limit: the next connection is closed at once, not
    // left hanging.
    let mut extra: Vec<TcpStream> = (0..60).map(|_| connect(&node.client_addr)).collect();
    std::thread::sleep(Duration::from_millis(200));
    let mut over = connect(&node.client_addr);
    assert_closed_within(&mut over, Duration::from_secs(5), "a connection over the limit");
    extra.clear();
    held.clear();
    // With the slots free again, clients get in.
    let out = poll_until(TIMEOUT, || {
        let out = kv(&node.client_addr, &["get", "k"]);
        if out.status.success() {
            Ok(stdout_of(&out))
        } else {
            Err(stderr_of(&out))
        }
    });
    assert_eq!(out.as_deref(), Ok("w"));
}

/// An HTTP head sent a few bytes at a time, never finished: the admin port cuts it off.
#[test]
fn t20_a_slow_http_head_is_cut_off() {
    let c = Cluster::start(1, "kvstore", &[]);
    let mut s = connect(&c.nodes[0].admin_addr);
    s.write_all(b"GET /status HTTP/1.1\r\nHost: x\r\n").expect("partial head");
    assert_closed_within(&mut s, Duration::from_secs(30), "a connection with an unfinished head");
    // The port still answers whole requests.
    try_status(&c.nodes[0].admin_addr).expect("status");
}

fn query_frame(id: u64, key: &str) -> Vec<u8> {
    let req =
        ClientRequest { id, kind: RequestKind::Query as i32, payload: encode(Op::Get, key, b""), stale_ok: false };
    let mut out = Vec::new();
    encode_frame(&req, &mut out);
    out
}

/// A client pipelines 3,000 reads of a 256 KiB value and does not read the answers
/// (750 MB of them): the member stops reading from it, hangs up on it once 64 MiB of
/// answers wait for it instead of queueing them all, and serves other clients meanwhile.
/// The answers the greedy client does get are whole and correct.
#[test]
fn t30_a_client_that_never_reads_is_bounded_and_others_are_served() {
    const READS: u64 = 3000;
    let c = Cluster::start(1, "kvstore", &[]);
    let node = &c.nodes[0];
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let client = Client::new(vec![node.client_addr.clone()]);
    let big = vec![b'x'; 256 * 1024];
    rt.block_on(client.propose(encode(Op::Set, "big", &big))).expect("set big");
    let before = peak_rss(node.pid(), Duration::from_millis(200));

    let mut greedy = connect(&node.client_addr);
    let writer = {
        let mut w = greedy.try_clone().expect("clone");
        std::thread::spawn(move || {
            // Blocks once the member stops reading; fails once it hangs up.
            for id in 1..=READS {
                if w.write_all(&query_frame(id, "big")).is_err() {
                    return;
                }
            }
        })
    };
    let during = peak_rss(node.pid(), Duration::from_secs(3));
    let grown = during.saturating_sub(before);
    eprintln!("resident before {} MB, with the greedy client {} MB", before >> 20, during >> 20);
    assert!(grown < 160 << 20, "the member grew by {} MB for one client's unread answers", grown >> 20);

    // Everyone else is served meanwhile.
    for i in 0..20 {
        let key = format!("other-{i}");
        let started = Instant::now();
        rt.block_on(client.propose(encode(Op::Set, &key, b"v"))).expect("set");
        assert_eq!(rt.block_on(client.query(encode(Op::Get, &key, b""), false)).expect("get"), b"v");
        assert!(started.elapsed() < Duration::from_secs(5), "another client waited {:?}", started.elapsed());
    }

    // Whatever reached the greedy client is whole, then the connection ends.
    greedy.set_read_timeout(Some(Duration::from_secs(30))).expect("timeout");
    let mut answers = 0u64;
    let mut len = [0u8; 4];
    let mut body = Vec::new();
    while greedy.read_exact(&mut len).is_ok() {
        body.resize(u32::from_be_bytes(len) as usize, 0);
        if greedy.read_exact(&mut body).is_err() {
            break;
        }
        let resp: ClientResponse = prost::Message::decode(body.as_slice()).expect("an answer");
        assert_eq!(resp.value.len(), big.len(), "answer {}: {}", resp.id, resp.error);
        answers += 1;
    }
    eprintln!("the greedy client got {answers} of {READS} answers before the member hung up");
    assert!(answers < READS, "the member queued every answer for a client that did not read");
    writer.join().expect("writer");
}
