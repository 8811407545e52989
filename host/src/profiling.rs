//! `--cpuprofile FILE` and `--memprofile FILE`, started with a member and written when it
//! stops.
//!
//! - CPU: a sampling profiler (99 Hz), written as a flame graph (SVG).
//! - Heap: the live heap as sampled by jemalloc (one sample per 512 KiB allocated, on
//!   average), in pprof format (gzipped protobuf), for `go tool pprof -http=:
//!   target/release/host FILE` or any pprof viewer. Only the `host` binary runs on
//!   jemalloc with profiling compiled in (its `main` sets the allocator and its options);
//!   sampling costs nothing until this flag turns it on.

use std::path::{Path, PathBuf};

use jemalloc_pprof::PROF_CTL;

#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    #[error("--cpuprofile {path}: {why}")]
    Cpu { path: PathBuf, why: String },
    #[error("--memprofile {path}: {why}")]
    Heap { path: PathBuf, why: String },
}

/// The profiles a member was asked for, running.
pub struct Profiles {
    cpu: Option<(pprof::ProfilerGuard<'static>, PathBuf)>,
    heap: Option<PathBuf>,
}

impl Profiles {
    pub async fn start(cpu: Option<&Path>, heap: Option<&Path>) -> Result<Self, ProfileError> {
        let cpu = match cpu {
            Some(path) => Some((
                pprof::ProfilerGuardBuilder::default()
                    .frequency(99)
                    // Sampling inside these would deadlock or crash the unwinder.
                    .blocklist(&["libc", "libgcc", "pthread", "vdso"])
                    .build()
                    .map_err(|e| ProfileError::Cpu { path: path.to_path_buf(), why: e.to_string() })?,
                path.to_path_buf(),
            )),
            None => None,
        };
        if let Some(path) = heap {
            start_heap().await.map_err(|why| ProfileError::Heap { path: path.to_path_buf(), why })?;
        }
        Ok(Profiles { cpu, heap: heap.map(Path::to_path_buf) })
    }

    /// Writes the profiles; a profile that cannot be written is logged, not fatal.
    pub async fn finish(self) {
        if let Some((guard, path)) = self.cpu {
            match write_flamegraph(&guard, &path) {
                Ok(()) => tracing::info!(path = %path.display(), "CPU profile written"),
                Err(e) => tracing::warn!(path = %path.display(), error = %e, "CPU profile not written"),
            }
        }
        if let Some(path) = self.heap {
            match write_heap(&path).await {
                Ok(()) => tracing::info!(path = %path.display(), "heap profile written"),
                Err(e) => tracing::error!(error = %e, "no heap profile"),
            }
        }
    }
}

/// Start sampling allocations.
async fn start_heap() -> Result<(), String> {
    let ctl = PROF_CTL.as_ref().ok_or("heap profiling needs the host binary's allocator (jemalloc with profiling)")?;
    ctl.lock().await.activate().map_err(|e| format!("cannot start heap profiling: {e}"))
}

/// Write the live heap as sampled since [`start_heap`] to `path`.
async fn write_heap(path: &Path) -> Result<(), String> {
    let ctl = PROF_CTL.as_ref().ok_or("heap profiling is not available")?;
    let profile = ctl.lock().await.dump_pprof().map_err(|e| format!("heap profile: {e}"))?;
    std::fs::write(path, profile).map_err(|e| format!("writing {}: {e}", path.display()))
}

fn write_flamegraph(guard: &pprof::ProfilerGuard<'_>, path: &Path) -> Result<(), String> {
    let report = guard.report().build().map_err(|e| e.to_string())?;
    if report.data.is_empty() {
        // A flame graph of nothing cannot be drawn; an empty file would only mislead.
        return Err("no samples (the member used almost no CPU)".to_string());
    }
    let file = std::fs::File::create(path).map_err(|e| e.to_string())?;
    report.flamegraph(file).map_err(|e| e.to_string())
}
