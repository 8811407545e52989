#!/usr/bin/env bash
# The project's whole test suite: the guests' native unit tests, then the host's unit and
# cluster tests. Cargo builds the host's binaries for its tests; the guests are built
# here first, since the host's own unit tests load one (integration tests would build
# them on first use anyway, see host/tests/common/build.rs).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=scripts/lib.sh
source scripts/lib.sh

bash scripts/build-guests.sh

# Guests are cdylibs for wasm32-wasip2, but their logic is plain Rust that also tests
# natively, which is quicker than going through a host.
cargo test --release -p kvstore -p diskstorage

# --release so the test binaries reuse the release dependencies a build compiled and run
# against release binaries and guests. nextest reads .config/nextest.toml (timeouts, and
# the group that serialises multi-process tests).
mapfile -t excludes < <(guest_exclude_args)
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --release --workspace "${excludes[@]}"
else
  echo "test.sh: cargo-nextest not found, falling back to cargo test" >&2
  cargo test --release --workspace "${excludes[@]}"
fi
