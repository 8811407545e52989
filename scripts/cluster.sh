#!/usr/bin/env bash
# A local cluster of real host processes, for trying the system by hand.
#
#   scripts/cluster.sh start [N] [HOST FLAGS...]   N nodes (default 3); flags go to every host
#   scripts/cluster.sh stop                        SIGTERM, then SIGKILL after a grace period
#   scripts/cluster.sh status                      each node's GET /status
#   scripts/cluster.sh clean                       delete run/data and run/logs (when stopped)
#
# Node i (1-based) listens on fixed ports, so commands can be typed from memory:
#   client 11000+i-1   raft 12000+i-1   admin 13000+i-1   text 15000+i-1
# (14000 is left to the logger's admin port.)
#
# Everything lives under run/ at the repository root: logs in run/logs/node-<i>.log,
# PIDs in run/pids/node-<i>.pid, data in run/data/node-<i>. A start over existing data
# resumes that cluster instead of forming a new one.
#
# Environment: FSM=path/to/guest.wasm replaces the kvstore guest; BUILD=0 starts the
# binaries as they are instead of running scripts/build.sh first.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd)
RUN_DIR=$ROOT/run
EXE=$ROOT/target/release/host
KV_EXE=$ROOT/target/release/kv
FSM=${FSM:-$ROOT/target/wasm32-wasip2/release/kvstore.wasm}
START_TIMEOUT_S=30
STOP_TIMEOUT_S=15

client_addr() { echo "127.0.0.1:$((11000 + $1 - 1))"; }
raft_addr() { echo "127.0.0.1:$((12000 + $1 - 1))"; }
admin_addr() { echo "127.0.0.1:$((13000 + $1 - 1))"; }
text_addr() { echo "127.0.0.1:$((15000 + $1 - 1))"; }
pid_file() { echo "$RUN_DIR/pids/node-$1.pid"; }
log_file() { echo "$RUN_DIR/logs/node-$1.log"; }
data_dir() { echo "$RUN_DIR/data/node-$1"; }

die() {
  echo "cluster.sh: $*" >&2
  exit 1
}

# Node numbers that have a PID file, in order.
recorded_nodes() {
  local f
  shopt -s nullglob
  for f in "$RUN_DIR"/pids/node-*.pid; do
    f=${f##*/node-}
    echo "${f%.pid}"
  done | sort -n
  shopt -u nullglob
}

# True if PID is alive and is one of our host processes; a PID file outliving a reboot
# must not make us signal an unrelated process that reused the number.
is_our_host() {
  local pid=$1
  [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null || return 1
  local args
  args=$(ps -o args= -p "$pid" 2>/dev/null) || return 1
  [[ "$args" == *"$EXE"* ]]
}

recorded_pid() { cat "$(pid_file "$1")" 2>/dev/null || true; }

# GET /status of node i, or nothing (and failure) if it does not answer.
status_json() {
  curl -fsS --max-time 2 "http://$(admin_addr "$1")/status" 2>/dev/null
}

# Reads /status JSON on stdin and prints one field; `voters` counts voting members.
status_field() {
  python3 -c '
import json, sys
field = sys.argv[1]
try:
    s = json.load(sys.stdin)
except ValueError:
    sys.exit(1)
if field == "voters":
    print(sum(1 for m in s.get("members", []) if m.get("voter")))
else:
    v = s.get(field)
    print("" if v is None else v)
' "$1"
}

log_tail() {
  local i=$1
  echo "---- last lines of $(log_file "$i") ----" >&2
  tail -n 30 "$(log_file "$i")" >&2 || true
}

# Polls CHECK (a shell function taking no arguments) until it succeeds, at most
# START_TIMEOUT_S seconds. Fails early if a node we started has died.
wait_until() {
  local why=$1 check=$2 nodes=$3
  local deadline=$((SECONDS + START_TIMEOUT_S)) i
  until "$check"; do
    for i in $nodes; do
      if ! is_our_host "$(recorded_pid "$i")"; then
        log_tail "$i"
        die "node $i exited while waiting for $why"
      fi
    done
    if ((SECONDS >= deadline)); then
      for i in $nodes; do log_tail "$i"; done
      die "timed out after ${START_TIMEOUT_S}s waiting for $why"
    fi
    sleep 0.2
  done
}

start_node() {
  local i=$1
  shift
  mkdir -p "$RUN_DIR/logs" "$RUN_DIR/pids"
  echo "==== start $(date -u +%FT%TZ): node $i ====" >>"$(log_file "$i")"
  nohup "$EXE" --fsm "$FSM" --id "$i" \
    --client-addr "$(client_addr "$i")" --raft-addr "$(raft_addr "$i")" \
    --admin-addr "$(admin_addr "$i")" --text-addr "$(text_addr "$i")" \
    --data-dir "$(data_dir "$i")" "$@" \
    </dev/null >>"$(log_file "$i")" 2>&1 &
  echo $! >"$(pid_file "$i")"
}

port_in_use() {
  local addr=$1
  (exec 3<>"/dev/tcp/${addr%:*}/${addr##*:}") 2>/dev/null
}

has_data() { [[ -d "$1" && -n "$(ls -A "$1" 2>/dev/null)" ]]; }

node1_is_leader() { [[ "$(status_json 1 | status_field state)" == "Leader" ]]; }
any_leader() {
  local i
  for ((i = 1; i <= N; i++)); do
    [[ "$(status_json "$i" | status_field state)" == "Leader" ]] && return 0
  done
  return 1
}
all_voters() { [[ "$(status_json 1 | status_field voters)" == "$N" ]]; }

RESUMING=0

stop_on_failure() {
  local rc=$?
  if ((rc != 0)); then
    echo "cluster.sh: start failed, stopping the nodes it started" >&2
    if ((RESUMING)); then
      echo "cluster.sh: (if $RUN_DIR/data holds an unwanted older cluster: scripts/cluster.sh clean)" >&2
    fi
    cmd_stop >/dev/null || true
  fi
}

cmd_start() {
  N=3
  if [[ $# -gt 0 && "$1" =~ ^[0-9]+$ ]]; then
    N=$1
    shift
  fi
  ((N >= 1)) || die "the cluster needs at least one node"
  local extra=("$@")

  command -v curl >/dev/null || die "curl is needed to watch the nodes' /status"
  command -v python3 >/dev/null || die "python3 is needed to read the nodes' /status"

  local i pid
  for i in $(recorded_nodes); do
    pid=$(recorded_pid "$i")
    if is_our_host "$pid"; then
      die "node $i is still running (pid $pid): run scripts/cluster.sh stop first"
    fi
    rm -f "$(pid_file "$i")"
  done

  # Up to date, this costs a second or two, and it saves wondering which code is running.
  if [[ "${BUILD:-1}" != 0 ]]; then
    bash scripts/build.sh
  fi
  [[ -x "$EXE" ]] || die "$EXE not found: run scripts/build.sh first"
  [[ -f "$FSM" ]] || die "guest $FSM not found: run scripts/build.sh first (or set FSM)"

  # The ports are fixed, so another cluster (or another checkout's) may hold them; the
  # checks below would then read that cluster's /status and report success.
  local addr
  for ((i = 1; i <= N; i++)); do
    for addr in "$(client_addr "$i")" "$(raft_addr "$i")" "$(admin_addr "$i")" "$(text_addr "$i")"; do
      if port_in_use "$addr"; then
        die "$addr (node $i) is already in use by another process"
      fi
    done
  done

  local all=""
  for ((i = 1; i <= N; i++)); do all+="$i "; done
  # A half-started cluster would block the next start; take it down again.
  trap stop_on_failure EXIT

  if ! has_data "$(data_dir 1)"; then
    # A fresh cluster: node 1 bootstraps alone, the rest join it.
    start_node 1 "${extra[@]}"
    wait_until "node 1 to become leader" node1_is_leader "1"
    for ((i = 2; i <= N; i++)); do
      if has_data "$(data_dir "$i")"; then
        die "$(data_dir "$i") holds data of an older cluster: run scripts/cluster.sh clean"
      fi
      start_node "$i" --join "$(admin_addr 1)" "${extra[@]}"
    done
  else
    # Resuming: no node can win an election alone, so start them all, and only a node
    # without data (a cluster grown since) needs to join.
    for ((i = 1; i <= N; i++)); do
      if has_data "$(data_dir "$i")"; then
        start_node "$i" "${extra[@]}"
      else
        start_node "$i" --join "$(admin_addr 1)" "${extra[@]}"
      fi
    done
    RESUMING=1
    wait_until "a leader" any_leader "$all"
  fi
  wait_until "node 1 to list $N voters" all_voters "$all"
  trap - EXIT

  local clients="" texts=""
  for ((i = 1; i <= N; i++)); do
    clients+="${clients:+,}$(client_addr "$i")"
  done
  texts=$(text_addr 1)
  cat <<EOF
A $N-node cluster is up ($FSM).
  write and read:  $KV_EXE --cluster $clients set k v
                   $KV_EXE --cluster $clients get k
  text protocol:   nc ${texts%:*} ${texts##*:}     (or telnet) then type lines: set-k-v, get-k, delete-k
  status:          curl -s http://$(admin_addr 1)/status     (or scripts/cluster.sh status)
  logs:            $RUN_DIR/logs/node-<i>.log
  stop:            scripts/cluster.sh stop
EOF
}

cmd_stop() {
  local i pid live=()
  for i in $(recorded_nodes); do
    pid=$(recorded_pid "$i")
    if is_our_host "$pid"; then
      kill -TERM "$pid"
      live+=("$i:$pid")
    fi
  done
  local deadline=$((SECONDS + STOP_TIMEOUT_S)) entry still
  while ((${#live[@]} > 0)); do
    still=()
    for entry in "${live[@]}"; do
      is_our_host "${entry#*:}" && still+=("$entry")
    done
    live=("${still[@]}")
    ((${#live[@]} == 0)) && break
    if ((SECONDS >= deadline)); then
      for entry in "${live[@]}"; do
        echo "cluster.sh: node ${entry%%:*} ignored SIGTERM for ${STOP_TIMEOUT_S}s, sending SIGKILL" >&2
        kill -KILL "${entry#*:}" 2>/dev/null || true
      done
      break
    fi
    sleep 0.2
  done
  for i in $(recorded_nodes); do
    rm -f "$(pid_file "$i")"
    echo "node $i stopped"
  done
}

cmd_status() {
  local i nodes json
  nodes=$(recorded_nodes)
  [[ -n "$nodes" ]] || die "no cluster recorded under $RUN_DIR/pids"
  for i in $nodes; do
    echo "node $i (admin $(admin_addr "$i"), pid $(recorded_pid "$i")):"
    if json=$(status_json "$i"); then
      python3 -m json.tool <<<"$json" 2>/dev/null || echo "$json"
    else
      echo "  not answering"
    fi
  done
}

cmd_clean() {
  local i
  for i in $(recorded_nodes); do
    if is_our_host "$(recorded_pid "$i")"; then
      die "node $i is still running: run scripts/cluster.sh stop first"
    fi
  done
  rm -rf "$RUN_DIR/data" "$RUN_DIR/logs" "$RUN_DIR/pids"
  echo "removed $RUN_DIR/{data,logs,pids}"
}

case "${1:-}" in
  start) shift; cmd_start "$@" ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  clean) cmd_clean ;;
  *)
    sed -n '2,7p' "$ROOT/scripts/cluster.sh" | sed 's/^# \{0,1\}//' >&2
    exit 2
    ;;
esac
