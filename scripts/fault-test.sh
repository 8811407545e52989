#!/usr/bin/env bash
# Fault tests across containers: a three-member compose cluster (deploys/compose.yaml)
# loses its leader's container, has a follower and then the leader cut off the network,
# while clients record a history that scripts/history_check.py checks afterwards. The
# scenarios are described in scripts/fault_test.py.
#
#   bash scripts/fault-test.sh      # needs the images (scripts/images.sh) and the kvstore guest
#
# Exit 0 only when every scenario and the history check hold. Bounded in time
# (FAULT_TEST_TIMEOUT seconds, default 600); its containers, networks and volumes are
# removed however it ends. The history and, on failure, each member's log are kept in
# target/fault-test/.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PROJECT=wasmraft-fault-$$
OUT=target/fault-test
TIMEOUT=${FAULT_TEST_TIMEOUT:-600}
COMPOSE=(docker-compose -p "$PROJECT" -f deploys/compose.yaml)

for image in host; do
  if ! docker image inspect "wasm-raft/$image:latest" >/dev/null 2>&1; then
    echo "fault-test.sh: image wasm-raft/$image is missing: run scripts/images.sh" >&2
    exit 1
  fi
done
if [[ ! -f target/wasm32-wasip2/release/kvstore.wasm ]]; then
  echo "fault-test.sh: target/wasm32-wasip2/release/kvstore.wasm is missing: run scripts/build.sh" >&2
  exit 1
fi

cleanup() {
  local rc=$?
  if ((rc != 0)); then
    mkdir -p "$OUT/logs"
    local s
    for s in n1 n2 n3; do
      "${COMPOSE[@]}" logs --no-color --timestamps "$s" >"$OUT/logs/$s.log" 2>&1 || true
    done
    echo "fault-test.sh: failed; member logs in $OUT/logs/" >&2
  fi
  "${COMPOSE[@]}" down -v --remove-orphans -t 5 >/dev/null 2>&1 || true
  docker network rm "${PROJECT}_ctl" >/dev/null 2>&1 || true
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# The checker first: it has to find the violations it claims to find.
python3 -m unittest -q scripts/test_history_check.py 2>&1 | tail -n 1

rm -rf "$OUT"
mkdir -p "$OUT"
start=$SECONDS
# timeout sends SIGTERM, then SIGKILL 10 s later if the test is stuck in a call.
timeout -k 10 "$TIMEOUT" python3 scripts/fault_test.py --project "$PROJECT" --out "$OUT"
echo "fault-test.sh: passed in $((SECONDS - start))s"
