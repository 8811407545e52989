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

bash scripts/build-guests.sh

missing=0
for b in host kv logger recovery; do
  if [[ ! -x "target/release/$b" ]]; then
    echo "build.sh: expected target/release/$b after the build, it is missing" >&2
    missing=1
  fi
done
exit "$missing"
