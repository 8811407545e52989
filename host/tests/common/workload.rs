//! Clients that write and read while members fail, recording everything for the history
//! check (`history`): each owns some keys and writes 1, 2, 3, ... to them in turn,
//! reading other clients' keys in between.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use host::client::{Client, ClientError};
use kvcommand::proto::{encode, Op as KvOp};
use tokio::runtime::Runtime;
use tokio::task::JoinHandle;

use super::history::{History, Op, Outcome};

pub const CLIENTS: usize = 4;
pub const KEYS_PER_CLIENT: usize = 5;

/// Starts [`CLIENTS`] clients on `rt` against `addrs`, until `stop`.
pub fn start_clients(rt: &Runtime, addrs: &[String], stop: &Arc<AtomicBool>) -> Vec<JoinHandle<History>> {
    (0..CLIENTS).map(|me| rt.spawn(client_loop(addrs.to_vec(), me, KEYS_PER_CLIENT, stop.clone()))).collect()
}

/// Every client's history, once they have stopped.
pub async fn collect(clients: Vec<JoinHandle<History>>) -> History {
    let mut history = History::default();
    for h in clients {
        history.merge(h.await.expect("client task"));
    }
    history
}

/// Every key's value at the end, read linearizably (0: none).
pub async fn final_values(addrs: &[String]) -> BTreeMap<String, u64> {
    let mut reader = Client::new(addrs.to_vec());
    reader.deadline = Duration::from_secs(20);
    let mut finals = BTreeMap::new();
    for me in 0..CLIENTS {
        for k in 0..KEYS_PER_CLIENT {
            let key = format!("c{me}-k{k}");
            let value = match reader.query(encode(KvOp::Get, &key, b""), false).await {
                Ok(v) => String::from_utf8_lossy(&v).parse().expect("a number"),
                Err(ClientError::Guest(e)) if e.contains("not found") => 0,
                Err(e) => panic!("final read of {key}: {e}"),
            };
            finals.insert(key, value);
        }
    }
    finals
}

/// Each client owns some keys and writes 1, 2, 3, ... to them in turn, reading other
/// keys in between; everything is recorded for the history check.
pub async fn client_loop(addrs: Vec<String>, me: usize, keys: usize, stop: Arc<AtomicBool>) -> History {
    let mut history = History::default();
    let make = || {
        let mut c = Client::new(addrs.clone());
        c.deadline = Duration::from_secs(5);
        c
    };
    let mut client = make();
    let mut next = vec![1u64; keys];
    let mut round = 0usize;
    while !stop.load(Ordering::Relaxed) {
        round += 1;
        let k = round % keys;
        let key = format!("c{me}-k{k}");
        let start = Instant::now();
        if round.is_multiple_of(3) {
            // A read of another client's key, linearizable.
            let other = format!("c{}-k{k}", (me + 1) % CLIENTS);
            let read =
                tokio::time::timeout(Duration::from_secs(10), client.query(encode(KvOp::Get, &other, b""), false));
            match read.await {
                Ok(Ok(v)) => {
                    let value = String::from_utf8_lossy(&v).parse().expect("values are numbers");
                    history.record(&other, Op::Read { value }, start, Instant::now());
                }
                Ok(Err(ClientError::Guest(e))) if e.contains("not found") => {
                    history.record(&other, Op::Read { value: 0 }, start, Instant::now());
                }
                Ok(Err(_)) => {}
                Err(_) => client = make(),
            }
            continue;
        }
        let value = next[k];
        next[k] += 1;
        let write = tokio::time::timeout(
            Duration::from_secs(10),
            client.propose(encode(KvOp::Set, &key, value.to_string().as_bytes())),
        );
        let outcome = match write.await {
            Ok(Ok(_)) => Outcome::Ok,
            Ok(Err(ClientError::Rejected(_) | ClientError::Unavailable(_) | ClientError::BadRequest(_))) => {
                Outcome::Failed
            }
            Ok(Err(ClientError::Guest(e))) => panic!("kvstore refused a set: {e}"),
            Ok(Err(ClientError::UnknownOutcome(_))) => Outcome::Unknown,
            Err(_) => {
                client = make();
                Outcome::Unknown
            }
        };
        history.record(&key, Op::Write { value, outcome }, start, Instant::now());
    }
    history
}
