//! `--cpuprofile`: a member run under load and stopped with SIGTERM leaves a flame graph
//! of where its CPU went.
//!
//! Needs the release binaries and guests from `scripts/build.sh`.

mod common;

use common::*;

#[test]
fn t10_cpuprofile_is_written_on_shutdown() {
    let dir = tempfile::tempdir().expect("tempdir");
    let profile = dir.path().join("cpu.svg");
    let args = vec!["--cpuprofile".to_string(), profile.display().to_string()];
    let mut node = Node::start(1, dir.path(), &guest("kvstore"), &args, None);
    wait_for(|| try_status(&node.admin_addr).is_ok_and(|s| s["state"] == "Leader"), "node 1 to lead");
    // Enough work for a 99 Hz CPU-time sampler to catch: a couple of seconds of load.
    let mut load = clean_command(&loadgen_exe());
    load.args(["--cluster", &node.client_addr, "--clients", "16", "--duration", "2s", "--value-size", "256"]);
    let out = run_with_timeout(load, std::time::Duration::from_secs(60)).unwrap_or_else(|e| panic!("{e}"));
    assert!(out.status.success(), "loadgen: {}", stderr_of(&out));
    assert!(node.terminate().success(), "{}", node.log_tail());
    let svg = std::fs::read_to_string(&profile).unwrap_or_else(|e| panic!("no profile ({e})\n{}", node.log_tail()));
    assert!(svg.contains("<svg"), "not an SVG flame graph: {}", &svg[..svg.len().min(200)]);
    // Samples landed in our own code, not just in the runtime.
    assert!(svg.contains("host::"), "no host frames in the profile");
}
