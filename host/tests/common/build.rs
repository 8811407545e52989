//! The guests (`wasm32-wasip2` components) the tests load, built on first use, so that
//! `cargo nextest run` or `cargo test` works on a clean tree without `scripts/build.sh`.
//!
//! Cargo builds the host's binaries for its integration tests, but not other packages
//! for another target. So the first test that asks for a guest runs
//! `scripts/build-guests.sh` (the same list and cargo command as `scripts/build.sh`;
//! cargo itself decides what is stale). nextest runs every test in its own process, many
//! at once: a file lock makes one of them build while the others wait, and a marker per
//! run (`NEXTEST_RUN_ID`) makes the rest of the run skip even cargo's no-op check. Under
//! `cargo test` every test binary checks once.

use std::fs::{self, File};
use std::process::Command;
use std::sync::OnceLock;

use super::paths::{target_dir, workspace_root};

pub fn ensure_guests() {
    static BUILT: OnceLock<Result<(), String>> = OnceLock::new();
    if let Err(why) = BUILT.get_or_init(build_once_per_run) {
        panic!("{why}");
    }
}

fn build_once_per_run() -> Result<(), String> {
    let dir = target_dir().join("test-kit");
    fs::create_dir_all(&dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
    let lock_path = dir.join("build.lock");
    let lock = File::create(&lock_path).map_err(|e| format!("create {}: {e}", lock_path.display()))?;
    // Released when `lock` is dropped (or the process dies): never left held.
    lock.lock().map_err(|e| format!("lock {}: {e}", lock_path.display()))?;
    let marker = std::env::var("NEXTEST_RUN_ID").ok().map(|run| dir.join(format!("guests-built-{run}")));
    if marker.as_ref().is_some_and(|m| m.exists()) {
        return Ok(());
    }
    let script = workspace_root().join("scripts").join("build-guests.sh");
    let out = Command::new("bash")
        .arg(&script)
        .current_dir(workspace_root())
        .output()
        .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
    if !out.status.success() {
        return Err(format!(
            "{} failed ({}):\n{}{}",
            script.display(),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    if let Some(marker) = marker {
        // Markers of earlier runs are of no more use.
        if let Ok(entries) = fs::read_dir(&dir) {
            for e in entries.flatten() {
                if e.file_name().to_string_lossy().starts_with("guests-built-") {
                    let _ = fs::remove_file(e.path());
                }
            }
        }
        fs::write(&marker, b"").map_err(|e| format!("write {}: {e}", marker.display()))?;
    }
    Ok(())
}
