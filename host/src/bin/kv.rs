//! `kv --cluster A,B,C set K V | get K | delete K`: talk to the kvstore guest through any
//! member. Prints the value (get) or `OK`; exits non-zero with a message on error
//! (3 when the command may have been applied). `propose`/`query` send raw bytes, for
//! any guest. `members`, `remove`, `demote`, `promote` and `transfer-leader` change the
//! membership through the admin API (`--admin`). Every flag can also be set as an
//! environment variable `KV_<FLAG>` (e.g. `KV_CLUSTER`, `KV_TIMEOUT`, `KV_STALE`).

use clap::{Parser, Subcommand};
use host::admin::operator::{self, OperatorError};
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
    /// Admin addresses of members, for the membership commands.
    #[arg(long, env = "KV_ADMIN", value_delimiter = ',', default_value = "127.0.0.1:13000")]
    admin: Vec<String>,
    /// The cluster token, for the membership commands of a cluster that has one.
    #[arg(long, env = "KV_CLUSTER_TOKEN", hide_env_values = true)]
    cluster_token: Option<String>,
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
    /// List the members (JSON), through any of --admin.
    Members,
    /// Remove a member (not the leader: transfer leadership first). It is told, and stops.
    Remove { id: u64 },
    /// Make a voter a learner.
    Demote { id: u64 },
    /// Make a learner a voter, once it has caught up.
    Promote { id: u64 },
    /// Hand leadership to another voter (by default the most caught-up one).
    TransferLeader { id: Option<u64> },
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
    if let Some(res) = rt.block_on(membership(&args)) {
        match res {
            Ok(out) => println!("{out}"),
            Err(e) => {
                eprintln!("kv: {e}");
                std::process::exit(1);
            }
        }
        return;
    }
    let mut client = Client::new(args.cluster);
    client.deadline = std::time::Duration::from_secs(args.timeout);
    let res = rt.block_on(async {
        match &args.cmd {
            Cmd::Set { key, value } => client.propose(encode(Op::Set, key, value.as_bytes())).await.map(|_| None),
            Cmd::Delete { key } => client.propose(encode(Op::Delete, key, b"")).await.map(|_| None),
            Cmd::Get { key, stale } => client.query(encode(Op::Get, key, b""), *stale).await.map(Some),
            Cmd::Propose { command } => client.propose(command.clone().into_bytes()).await.map(Some),
            Cmd::Query { request, stale } => client.query(request.clone().into_bytes(), *stale).await.map(Some),
            _ => unreachable!("membership commands are answered above"),
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

/// The membership commands, through the admin API; `None` for the others.
async fn membership(args: &Args) -> Option<Result<String, OperatorError>> {
    let timeout = std::time::Duration::from_secs(args.timeout);
    let token = args.cluster_token.as_deref().unwrap_or("");
    let change = |path: &'static str, id: Option<u64>| async move {
        operator::post(&args.admin, path, &serde_json::json!({ "id": id }), token, timeout).await
    };
    Some(match &args.cmd {
        Cmd::Members => operator::get(&args.admin, "/members", timeout).await,
        Cmd::Remove { id } => change("/members/remove", Some(*id)).await,
        Cmd::Demote { id } => change("/members/demote", Some(*id)).await,
        Cmd::Promote { id } => change("/members/promote", Some(*id)).await,
        Cmd::TransferLeader { id } => change("/leader/transfer", *id).await,
        _ => return None,
    })
}
