//! `--memprofile FILE`: a profile of the live heap, sampled by jemalloc (one sample per
//! 512 KiB allocated, on average) and written on shutdown in pprof format (gzipped
//! protobuf), for `go tool pprof -http=: target/release/host FILE` or any pprof viewer.
//!
//! Only the `host` binary runs on jemalloc with profiling compiled in (see its `main`);
//! sampling costs nothing until this flag turns it on.

use std::path::Path;

use jemalloc_pprof::PROF_CTL;

/// Start sampling allocations.
pub async fn start() -> Result<(), String> {
    let ctl = PROF_CTL.as_ref().ok_or("heap profiling needs the host binary's allocator (jemalloc with profiling)")?;
    ctl.lock().await.activate().map_err(|e| format!("cannot start heap profiling: {e}"))
}

/// Write the live heap as sampled since [`start`] to `path`.
pub async fn write(path: &Path) -> Result<(), String> {
    let ctl = PROF_CTL.as_ref().ok_or("heap profiling is not available")?;
    let profile = ctl.lock().await.dump_pprof().map_err(|e| format!("heap profile: {e}"))?;
    std::fs::write(path, profile).map_err(|e| format!("writing {}: {e}", path.display()))
}
