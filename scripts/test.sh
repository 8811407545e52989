#!/usr/bin/env bash
# The project's whole test suite: builds the release binaries and guests the tests run,
# then the guest's native unit tests and the host's unit and cluster tests.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=scripts/lib.sh
source scripts/lib.sh

bash scripts/build.sh

# Guests are cdylibs for wasm32-wasip2, but their logic is plain Rust that also tests
# natively, which is quicker than going through a host.
cargo test --release -p kvstore -p diskstorage

# --release so the test binaries reuse the release dependencies build.sh compiled and run
# against the release host, kv and guests it produced.
mapfile -t excludes < <(guest_exclude_args)
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --release --workspace "${excludes[@]}" \
    --config-file scripts/nextest.toml
else
  echo "test.sh: cargo-nextest not found, falling back to cargo test" >&2
  cargo test --release --workspace "${excludes[@]}"
fi
