//! `--cpuprofile` and `--memprofile`: a member run under load and stopped with SIGTERM
//! leaves a flame graph of where its CPU went and a pprof profile of its live heap.
//!
//! Needs the release binaries and guests from `scripts/build.sh`.

mod common;

use common::*;

/// Runs one member with `args` under two seconds of load, then stops it gracefully.
fn profiled_run(dir: &std::path::Path, args: &[String]) -> Node {
    let mut node = Node::start(1, dir, &guest("kvstore"), args, None);
    wait_for(|| try_status(&node.admin_addr).is_ok_and(|s| s["state"] == "Leader"), "node 1 to lead");
    let mut load = clean_command(&loadgen_exe());
    load.args(["--cluster", &node.client_addr, "--clients", "16", "--duration", "2s", "--value-size", "256"]);
    let out = run_with_timeout(load, std::time::Duration::from_secs(60)).unwrap_or_else(|e| panic!("{e}"));
    assert!(out.status.success(), "loadgen: {}", stderr_of(&out));
    assert!(node.terminate().success(), "{}", node.log_tail());
    node
}

/// The parts of pprof's `Profile` message this test looks at.
#[derive(Clone, PartialEq, prost::Message)]
struct Profile {
    #[prost(message, repeated, tag = "2")]
    sample: Vec<Sample>,
    #[prost(string, repeated, tag = "6")]
    string_table: Vec<String>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct Sample {
    #[prost(uint64, repeated, tag = "1")]
    location_id: Vec<u64>,
    #[prost(int64, repeated, tag = "2")]
    value: Vec<i64>,
}

#[test]
fn t20_memprofile_is_a_pprof_heap_profile() {
    use std::io::Read;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("heap.pb.gz");
    let node = profiled_run(dir.path(), &["--memprofile".to_string(), path.display().to_string()]);
    let gz = std::fs::read(&path).unwrap_or_else(|e| panic!("no heap profile ({e})\n{}", node.log_tail()));
    let mut raw = Vec::new();
    flate2::read::GzDecoder::new(gz.as_slice()).read_to_end(&mut raw).expect("the profile is gzipped");
    let profile = <Profile as prost::Message>::decode(raw.as_slice()).expect("the profile is a pprof protobuf");
    assert!(profile.string_table.iter().any(|s| s == "inuse_space"), "not a heap profile: {:?}", profile.string_table);
    // The in-memory log alone holds megabytes after the load, so sampling one allocation
    // per 512 KiB must have caught some, each with a stack and a size.
    assert!(!profile.sample.is_empty(), "no samples");
    assert!(profile.sample.iter().all(|s| !s.location_id.is_empty() && s.value.iter().any(|v| *v > 0)));
}

#[test]
fn t10_cpuprofile_is_written_on_shutdown() {
    let dir = tempfile::tempdir().expect("tempdir");
    let profile = dir.path().join("cpu.svg");
    // Two seconds of load: enough work for a 99 Hz CPU-time sampler to catch.
    let node = profiled_run(dir.path(), &["--cpuprofile".to_string(), profile.display().to_string()]);
    let svg = std::fs::read_to_string(&profile).unwrap_or_else(|e| panic!("no profile ({e})\n{}", node.log_tail()));
    assert!(svg.contains("<svg"), "not an SVG flame graph: {}", &svg[..svg.len().min(200)]);
    // Samples landed in our own code, not just in the runtime.
    assert!(svg.contains("host::"), "no host frames in the profile");
}
