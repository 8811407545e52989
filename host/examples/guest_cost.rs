//! Cost of running commands through a guest, without Raft: how many microseconds one
//! `apply` of a 1 KiB set and one `query` take on this machine.
//!
//!     cargo run --release --example guest_cost -- target/wasm32-wasip2/release/kvstore.wasm
use std::path::PathBuf;
use std::time::Instant;

use host::fsm::{GuestModule, Instance, Limits};

fn main() -> anyhow::Result<()> {
    let path: PathBuf = std::env::args().nth(1).unwrap_or("target/wasm32-wasip2/release/kvstore.wasm".into()).into();
    let n: u64 = std::env::args().nth(2).and_then(|s| s.parse().ok()).unwrap_or(200_000);
    let keys = 100_000u64;
    let module = GuestModule::load(&path, Limits::default())?;
    let dir = tempfile::tempdir()?;
    let mut inst = Instance::new(&module, &[], Some(dir.path()), 1).map_err(|e| anyhow::anyhow!("{e}"))?;
    let value = vec![b'v'; 1024];
    let sets: Vec<Vec<u8>> = (0..n)
        .map(|i| kvcommand::proto::encode(kvcommand::proto::Op::Set, &((i * 7919) % keys).to_string(), &value))
        .collect();
    let t = Instant::now();
    for (i, c) in sets.iter().enumerate() {
        inst.apply(i as u64 + 1, 1, c);
    }
    let per = t.elapsed().as_secs_f64() * 1e6 / n as f64;
    println!("apply (1 KiB set, {keys} keys): {per:.2} µs/command");
    let gets: Vec<Vec<u8>> = (0..n)
        .map(|i| kvcommand::proto::encode(kvcommand::proto::Op::Get, &((i * 7919) % keys).to_string(), &[]))
        .collect();
    let t = Instant::now();
    for c in &gets {
        let _ = inst.query(c);
    }
    let per = t.elapsed().as_secs_f64() * 1e6 / n as f64;
    println!("query (get of 1 KiB): {per:.2} µs/query");
    Ok(())
}
