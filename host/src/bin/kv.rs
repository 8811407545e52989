//! `kv --cluster A,B,C set K V | get K | delete K`: talk to the kvstore guest through any
//! member. Prints the value (get) or `OK`; exits non-zero with a message on error
//! (3 when the command may have been applied). `propose`/`query` send raw bytes, for
//! any guest. Every flag can also be set as an environment variable `KV_<FLAG>` (e.g.
//! `KV_CLUSTER`, `KV_TIMEOUT`, `KV_STALE`).

use clap::{Parser, Subcommand};
use host::client::{Client, ClientError};
use kvcommand::proto::{encode, Op};

#[derive(Parser)]
#[command(name = "kv", version, about = "Client for a cluster running the kvstore guest")]
struct Args {
    /// Client addresses of members (any subset; the leader is found automatically).
    #[arg(long, env = "KV_CLUSTER", value_delimiter = ',', default_value = "127.0.0.1:11000")]
    cluster: Vec<String>,
    /// Give up after this many seconds of retrying (elections, unreachable members).
    #[arg(long, env = "KV_TIMEOUT", default_value_t = 20)]
    timeout: u64,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Set a key.
    Set { key: String, value: String },
    /// Read a key (linearizable unless --stale).
    Get {
        key: String,
        /// Answer from the contacted member's state, without confirming leadership.
        #[arg(long, env = "KV_STALE")]
        stale: bool,
    },
    /// Delete a key.
    Delete { key: String },
    /// Propose raw command bytes (any guest), e.g. `propose set-1-a`.
    Propose { command: String },
    /// Send a raw read-only query (any guest).
    Query {
        request: String,
        /// Answer from the contacted member's state, without confirming leadership.
        #[arg(long, env = "KV_STALE")]
        stale: bool,
    },
}

fn main() {
    let args = Args::parse();
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("kv: {e}");
            std::process::exit(1);
        }
    };
    let mut client = Client::new(args.cluster);
    client.deadline = std::time::Duration::from_secs(args.timeout);
    let res = rt.block_on(async {
        match &args.cmd {
            Cmd::Set { key, value } => client.propose(encode(Op::Set, key, value.as_bytes())).await.map(|_| None),
            Cmd::Delete { key } => client.propose(encode(Op::Delete, key, b"")).await.map(|_| None),
            Cmd::Get { key, stale } => client.query(encode(Op::Get, key, b""), *stale).await.map(Some),
            Cmd::Propose { command } => client.propose(command.clone().into_bytes()).await.map(Some),
            Cmd::Query { request, stale } => client.query(request.clone().into_bytes(), *stale).await.map(Some),
        }
    });
    match res {
        Ok(Some(v)) => println!("{}", String::from_utf8_lossy(&v)),
        Ok(None) => println!("OK"),
        Err(e) => {
            eprintln!("kv: {e}");
            // 3 tells "may have been applied" apart from a definite failure (1).
            std::process::exit(if matches!(e, ClientError::UnknownOutcome(_)) { 3 } else { 1 });
        }
    }
}
