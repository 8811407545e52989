//! `host --fsm guest.wasm [...]`: run one member. See `host --help` and the README.

use clap::Parser;
use host::config::Opts;

/// jemalloc: `--memprofile` needs its sampling heap profiler, and it allocates the many
/// small, short-lived buffers of the request path at least as fast as the system's.
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read from this symbol when it starts: profiling compiled in and
/// ready, sampling off until `--memprofile` turns it on.
#[allow(unsafe_code, non_upper_case_globals)]
#[export_name = "malloc_conf"]
pub static malloc_conf: &[u8] = b"prof:true,prof_active:false,lg_prof_sample:19\0";

fn main() {
    // `host check ...` checks a guest; anything else runs a member (`host --fsm ...`).
    if std::env::args_os().nth(1).is_some_and(|a| a == "check") {
        std::process::exit(host::check::main(std::env::args_os().skip(1)));
    }
    let opts = Opts::parse();
    host::daemon::init_tracing(host::daemon::MEMBER_LOGS);
    host::daemon::run("host", |shutdown| host::node::run(opts, shutdown))
}
