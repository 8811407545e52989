#!/usr/bin/env bash
# Builds every native binary and every guest in release mode; the tests and
# scripts/cluster.sh run these outputs, never debug builds.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=scripts/lib.sh
source scripts/lib.sh

# --bins over the default members builds the host together with its companion
# binaries (kv, and the logger, recovery and loadgen as they appear).
cargo build --release --bins

ensure_wasm_target
mapfile -t packages < <(guest_package_args)
cargo build --release --target "$WASM_TARGET" "${packages[@]}"

missing=0
for g in "${GUESTS[@]}"; do
  if [[ ! -f "$WASM_OUT/$g.wasm" ]]; then
    echo "build.sh: expected $WASM_OUT/$g.wasm after the build, it is missing" >&2
    missing=1
  fi
done
for b in host kv; do
  if [[ ! -x "target/release/$b" ]]; then
    echo "build.sh: expected target/release/$b after the build, it is missing" >&2
    missing=1
  fi
done
exit "$missing"
