//! Where the binaries and guests the tests run are. Cargo builds the binaries with the
//! tests; the guests are built on first use ([`super::build`]).

use std::path::{Path, PathBuf};

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the host crate lives one level below the workspace root")
        .to_path_buf()
}

pub fn target_dir() -> PathBuf {
    // `join` keeps an absolute CARGO_TARGET_DIR as it is.
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => workspace_root().join(dir),
        None => workspace_root().join("target"),
    }
}

/// Cargo builds this package's binaries before its integration tests and names them;
/// fall back to the release build for a test binary compiled before a binary existed.
fn binary(built_with_tests: Option<&str>, name: &str) -> PathBuf {
    let path = built_with_tests.map(PathBuf::from).unwrap_or_else(|| target_dir().join("release").join(name));
    assert!(path.is_file(), "{name} binary not found at {}: run scripts/build.sh", path.display());
    path
}

pub fn host_exe() -> PathBuf {
    binary(option_env!("CARGO_BIN_EXE_host"), "host")
}

pub fn kv_exe() -> PathBuf {
    binary(option_env!("CARGO_BIN_EXE_kv"), "kv")
}

pub fn loadgen_exe() -> PathBuf {
    binary(option_env!("CARGO_BIN_EXE_loadgen"), "loadgen")
}

/// A guest component, e.g. `guest("kvstore")`, built first if this run has not yet.
pub fn guest(name: &str) -> PathBuf {
    super::build::ensure_guests();
    let path = target_dir().join("wasm32-wasip2").join("release").join(format!("{name}.wasm"));
    assert!(path.is_file(), "guest {name} not found at {} after building the guests", path.display());
    path
}
