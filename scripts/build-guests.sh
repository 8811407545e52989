#!/usr/bin/env bash
# Builds every guest for wasm32-wasip2 in release mode (installing the target if
# missing). scripts/build.sh runs it, and so do the tests when they first need a guest
# (host/tests/common/build.rs), so `cargo nextest run` works on a clean tree.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=scripts/lib.sh
source scripts/lib.sh

ensure_wasm_target
mapfile -t packages < <(guest_package_args)
"${CARGO:-cargo}" build --release --target "$WASM_TARGET" "${packages[@]}"

missing=0
for g in "${GUESTS[@]}"; do
  if [[ ! -f "$WASM_OUT/$g.wasm" ]]; then
    echo "build-guests.sh: expected $WASM_OUT/$g.wasm after the build, it is missing" >&2
    missing=1
  fi
done
exit "$missing"
