#!/usr/bin/env python3
"""Runs the experiment matrix against fresh local 3-node clusters.

    python3 scripts/experiments.py            # the full default matrix
    python3 scripts/experiments.py --quick    # a tiny matrix, about half a minute
    python3 scripts/experiments.py --help

Matrix: configuration x guest x clients x value size x get ratio. Every (configuration,
guest) pair gets a fresh cluster (diskstorage: one per value size too, because the slot
size is part of the guest's settings), and every cell of the rest runs one loadgen against
it. Results go to RUN_DIR/results.csv; RUN_DIR also keeps each run's per-second series,
each member's --monitor file and log, and runs.jsonl (everything loadgen printed, plus
the wall-clock window of each run, which plot.py uses to cut the monitor files).

Members are started here rather than through scripts/cluster.sh because cluster.sh gives
every host the same flags, and each member needs its own --monitor file.
"""

import argparse
import csv
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

# Named cluster configurations, as in the original's experiments: extra flags given to
# every host, and how many `logger` processes follow the cluster. Add new ones here; a
# "{run}" in a flag becomes the member's own directory under the run directory, so
# per-member paths stay apart.
#   notlog   no command logging
#   applog   every replica writes each applied entry to its own file (--log-commands),
#            fsynced before it answers (the original's -logfolder)
#   logger1  one logger process (a learner) archives every committed entry
#   logger2  two of them, each on its own ports and directory
CONFIGS = [
    {"name": "notlog", "host_flags": []},
    {"name": "applog", "host_flags": ["--log-commands", "{run}/commands"]},
    {"name": "logger1", "host_flags": [], "loggers": 1},
    {"name": "logger2", "host_flags": [], "loggers": 2},
]

NODES = 3
ROOT = Path(__file__).resolve().parent.parent
HOST = ROOT / "target/release/host"
LOADGEN = ROOT / "target/release/loadgen"
LOGGER = ROOT / "target/release/logger"
WASM_DIR = ROOT / "target/wasm32-wasip2/release"
START_TIMEOUT_S = 30
STOP_TIMEOUT_S = 15
DISK_FILE_SIZE = 256 << 20
CLK_TCK = os.sysconf("SC_CLK_TCK")

RESULT_COLUMNS = [
    "config", "guest", "clients", "value_size", "get_ratio", "ops", "ops_per_s",
    "p50_us", "p90_us", "p99_us", "errors", "unknown_outcomes", "cpu_us_per_op",
]


def guest_config(guest, value_size, keys):
    """--fsm-config settings of a guest; they must match on every member."""
    if guest == "diskstorage":
        # Every key must have a slot in the file; the file is sparse, so growing it
        # beyond 256M for large keys x value sizes costs no disk.
        size = max(DISK_FILE_SIZE, keys * value_size)
        return [f"file-size={size}", f"value-size={value_size}"]
    if guest == "kvstore":
        # Every key exists from the start, so gets read real values rather than "not
        # found" (the guest fills the same keys, 0..keys, that loadgen draws).
        return [f"preload-keys={keys}", f"preload-value-size={value_size}"]
    return []


def client_addr(i):
    return f"127.0.0.1:{11000 + i - 1}"


def raft_addr(i):
    return f"127.0.0.1:{12000 + i - 1}"


def admin_addr(i):
    return f"127.0.0.1:{13000 + i - 1}"


def text_addr(i):
    return f"127.0.0.1:{15000 + i - 1}"


def logger_raft_addr(k):
    return f"127.0.0.1:{12100 + k}"


def logger_admin_addr(k):
    return f"127.0.0.1:{14000 + k}"


def port_in_use(addr):
    host, port = addr.rsplit(":", 1)
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, int(port))) == 0


def get_json(addr, path="/status"):
    try:
        with urllib.request.urlopen(f"http://{addr}{path}", timeout=2) as r:
            return json.load(r)
    except (OSError, ValueError):
        return None


def status(i):
    return get_json(admin_addr(i))


def cpu_seconds(pid):
    """utime + stime of a process, in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        # The command name may contain spaces; fields after it are fixed.
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


class Cluster:
    def __init__(self, directory, wasm, flags, loggers=0):
        self.dir = directory
        self.wasm = wasm
        self.flags = flags
        self.loggers = loggers
        self.procs = {}
        self.logger_procs = {}

    def node_dir(self, i):
        return self.dir / f"node-{i}"

    def _spawn(self, i, extra):
        nd = self.node_dir(i)
        nd.mkdir(parents=True, exist_ok=True)
        flags = [f.replace("{run}", str(nd)) for f in self.flags]
        cmd = [
            str(HOST), "--fsm", str(self.wasm), "--id", str(i),
            "--client-addr", client_addr(i), "--raft-addr", raft_addr(i),
            "--admin-addr", admin_addr(i), "--text-addr", text_addr(i),
            "--data-dir", str(nd / "data"),
            "--monitor", str(self.dir / f"monitor-node{i}.jsonl"),
            *extra, *flags,
        ]
        log = open(self.dir / f"node-{i}.log", "ab")
        self.procs[i] = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,  # a Ctrl-C at the terminal reaches us, not them
        )
        log.close()

    def logger_dir(self, k):
        return self.dir / f"logger-{k}"

    def _spawn_logger(self, k):
        """Logger k follows the cluster as `log<k>`, on its own ports and directory."""
        cmd = [
            str(LOGGER), "--id", f"log{k}", "--raft-addr", logger_raft_addr(k),
            "--join", admin_addr(1), "--dir", str(self.logger_dir(k)),
            "--admin-addr", logger_admin_addr(k),
        ]
        log = open(self.dir / f"logger-{k}.log", "ab")
        self.logger_procs[k] = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()

    def logger_lags(self):
        """Each logger's lag (committed entries not archived yet), as it reports it."""
        lags = {}
        for k in self.logger_procs:
            s = get_json(logger_admin_addr(k)) or {}
            for c in s.get("clusters", []):
                lags[f"log{k}"] = c.get("lag")
        return lags

    def _wait(self, why, check):
        deadline = time.monotonic() + START_TIMEOUT_S
        while not check():
            for i, p in list(self.procs.items()) + list(self.logger_procs.items()):
                if p.poll() is not None:
                    what = "node" if self.procs.get(i) is p else "logger"
                    raise RuntimeError(
                        f"{what} {i} exited ({p.returncode}) while waiting for {why}; "
                        f"see {self.dir / f'{what}-{i}.log'}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out after {START_TIMEOUT_S}s waiting for {why}")
            time.sleep(0.2)

    def start(self):
        # Fixed ports: another cluster holding them would answer our /status checks.
        addrs = [a for i in range(1, NODES + 1)
                 for a in (client_addr(i), raft_addr(i), admin_addr(i), text_addr(i))]
        addrs += [a for k in range(self.loggers)
                  for a in (logger_raft_addr(k), logger_admin_addr(k))]
        for addr in addrs:
            if port_in_use(addr):
                raise RuntimeError(f"{addr} is in use (another cluster? scripts/cluster.sh stop)")
        self.dir.mkdir(parents=True, exist_ok=True)
        self._spawn(1, [])
        self._wait("node 1 to become leader",
                   lambda: (status(1) or {}).get("state") == "Leader")
        for i in range(2, NODES + 1):
            self._spawn(i, ["--join", admin_addr(1)])
        self._wait(f"{NODES} voters", lambda: sum(
            1 for m in (status(1) or {}).get("members", []) if m.get("voter")) == NODES)
        # Loggers after the members, as an operator would attach them.
        for k in range(self.loggers):
            self._spawn_logger(k)
        if self.loggers:
            self._wait(f"{self.loggers} logger(s) to be members", lambda: sum(
                1 for m in (status(1) or {}).get("members", [])
                if m.get("role") == "logger") == self.loggers)

    def cpu_total(self):
        """Server CPU: the members' and the loggers' (logging is part of the cost)."""
        procs = list(self.procs.values()) + list(self.logger_procs.values())
        return sum(cpu_seconds(p.pid) for p in procs)

    def stop(self):
        procs = list(self.procs.values()) + list(self.logger_procs.values())
        live = [p for p in procs if p.poll() is None]
        for p in live:
            p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for p in live:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                print(f"  pid {p.pid} ignored SIGTERM for {STOP_TIMEOUT_S}s, SIGKILL",
                      file=sys.stderr)
                p.kill()
                p.wait()


def run_loadgen(cluster, args, clients, value_size, get_ratio, series):
    cmd = [
        str(LOADGEN), "--cluster", ",".join(client_addr(i) for i in range(1, NODES + 1)),
        "--clients", str(clients), "--duration", f"{args.duration}s",
        "--warmup", f"{args.warmup}s", "--keys", str(args.keys),
        "--value-size", str(value_size), "--get-ratio", str(get_ratio),
        "--series-out", str(series),
    ] + args.loadgen_flag
    t0 = time.time()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # The CPU window matches loadgen's measured period: warm-up excluded.
        time.sleep(args.warmup)
        cpu0, t_measure = cluster.cpu_total(), time.time()
        out, err = p.communicate(timeout=args.duration + 60)
        cpu1, t1 = cluster.cpu_total(), time.time()
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    if p.returncode != 0:
        raise RuntimeError(f"loadgen failed ({p.returncode}): {err.strip()}")
    line = next((l for l in reversed(out.splitlines()) if l.startswith("{")), None)
    if line is None:
        raise RuntimeError(f"no JSON from loadgen: {out!r} {err!r}")
    summary = json.loads(line)
    ops = summary.get("ops", 0)
    cpu_us = (cpu1 - cpu0) * 1e6
    lags = cluster.logger_lags()
    return summary, {
        "logger_lag_at_end": lags,
        "cpu_s": round(cpu1 - cpu0, 3),
        "cpu_us_per_op": round(cpu_us / ops, 1) if ops else "",
        "t_start_ms": int(t0 * 1000),
        "t_measure_ms": int(t_measure * 1000),
        "t_end_ms": int(t1 * 1000),
    }


def parse_list(kind):
    return lambda s: [kind(x) for x in s.split(",") if x.strip()]


def main():
    names = [c["name"] for c in CONFIGS]
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", type=parse_list(str), default=names,
                    help=f"comma-separated, of {','.join(names)} (default: all)")
    ap.add_argument("--guests", type=parse_list(str),
                    help="default kvstore,diskstorage (--quick: kvstore)")
    ap.add_argument("--clients", type=parse_list(int), help="default 1,8,32")
    ap.add_argument("--value-sizes", type=parse_list(int), help="default 1024")
    ap.add_argument("--get-ratios", type=parse_list(float), help="default 0.0,0.5")
    ap.add_argument("--duration", type=float,
                    help="seconds per run, warm-up included (default 5)")
    ap.add_argument("--warmup", type=float, default=1.0, help="seconds not measured (default 1)")
    ap.add_argument("--keys", type=int, default=100000, help="default 100000")
    ap.add_argument("--pause", type=float, default=1.0,
                    help="seconds between runs, so one run's backlog does not leak into the next (default 1)")
    ap.add_argument("--out", type=Path, default=None,
                    help="run directory (default run/experiments/<UTC timestamp>)")
    ap.add_argument("--quick", action="store_true",
                    help="guest kvstore; clients 1,8; value size 1024; get ratio 0.5; 3 s runs")
    ap.add_argument("--loadgen-flag", action="append", default=[], metavar="FLAG",
                    help="extra loadgen flag, repeatable (e.g. --loadgen-flag=--connections "
                         "--loadgen-flag=8)")
    ap.add_argument("--host-flag", action="append", default=[], metavar="FLAG",
                    help="one more flag for every host, repeatable; {run} is the member's "
                         "directory (e.g. --host-flag=--cpuprofile --host-flag={run}/cpu.svg)")
    ap.add_argument("--keep-data", action="store_true",
                    help="keep the members' data directories afterwards")
    args = ap.parse_args()
    # --quick changes only what was not given explicitly.
    defaults = ({"guests": ["kvstore"], "clients": [1, 8], "value_sizes": [1024],
                 "get_ratios": [0.5], "duration": 3.0}
                if args.quick else
                {"guests": ["kvstore", "diskstorage"], "clients": [1, 8, 32],
                 "value_sizes": [1024], "get_ratios": [0.0, 0.5], "duration": 5.0})
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.warmup >= args.duration:
        ap.error("--warmup must be shorter than --duration")
    by_name = {c["name"]: c for c in CONFIGS}
    for c in args.configs:
        if c not in by_name:
            ap.error(f"unknown configuration {c!r} (known: {', '.join(names)})")
    for g in args.guests:
        if not (WASM_DIR / f"{g}.wasm").is_file():
            ap.error(f"{WASM_DIR / f'{g}.wasm'} not found: run scripts/build.sh")
    exes = [HOST, LOADGEN] + ([LOGGER] if any(by_name[c].get("loggers") for c in args.configs) else [])
    for exe in exes:
        if not exe.is_file():
            ap.error(f"{exe} not found: run scripts/build.sh")

    # One cluster per (config, guest, guest settings).
    clusters = []
    for c in args.configs:
        for g in args.guests:
            per_vs = bool(guest_config(g, 1, args.keys))
            for vs_group in ([[v] for v in args.value_sizes] if per_vs else [args.value_sizes]):
                clusters.append((by_name[c], g, vs_group))
    cells = len(args.clients) * len(args.get_ratios)
    n_runs = sum(len(vs) * cells for _, _, vs in clusters)
    est = n_runs * (args.duration + args.pause + 0.5) + len(clusters) * 8
    print(f"{n_runs} runs on {len(clusters)} clusters, about {est / 60:.1f} min "
          f"({args.duration:g}s each)", flush=True)

    run_dir = args.out or ROOT / "run/experiments" / datetime.now(timezone.utc).strftime(
        "%Y%m%dT%H%M%SZ")
    run_dir.mkdir(parents=True, exist_ok=True)
    print(f"results in {run_dir}", flush=True)

    # SIGTERM (e.g. from a CI timeout) must still stop the members.
    def on_term(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_term)

    results_path = run_dir / "results.csv"
    done = 0
    failed = 0
    with open(results_path, "w", newline="") as rf, open(run_dir / "runs.jsonl", "w") as jf:
        writer = csv.DictWriter(rf, fieldnames=RESULT_COLUMNS)
        writer.writeheader()
        for config, guest, vs_group in clusters:
            name = f"{config['name']}-{guest}"
            if len(vs_group) == 1 and guest_config(guest, 1, args.keys):
                name += f"-vs{vs_group[0]}"
            cdir = run_dir / name
            flags = list(config["host_flags"]) + args.host_flag
            for kv in guest_config(guest, vs_group[0], args.keys):
                flags += ["--fsm-config", kv]
            cluster = Cluster(cdir, WASM_DIR / f"{guest}.wasm", flags, config.get("loggers", 0))
            loggers = config.get("loggers", 0)
            print(f"== {name}: starting {NODES} members"
                  + (f" and {loggers} logger(s)" if loggers else ""), flush=True)
            try:
                cluster.start()
                for vs in vs_group:
                    for gr in args.get_ratios:
                        for n in args.clients:
                            done += 1
                            tag = f"c{n}-vs{vs}-gr{gr:g}"
                            series = cdir / f"series-{tag}.csv"
                            try:
                                summary, extra = run_loadgen(cluster, args, n, vs, gr, series)
                            except RuntimeError as e:
                                failed += 1
                                print(f"  [{done}/{n_runs}] {tag}: FAILED: {e}", flush=True)
                                continue
                            row = {
                                "config": config["name"], "guest": guest, "clients": n,
                                "value_size": vs, "get_ratio": gr,
                                **{k: summary.get(k, "") for k in RESULT_COLUMNS[5:-1]},
                                "ops_per_s": round(summary.get("ops_per_s", 0), 1),
                                "cpu_us_per_op": extra["cpu_us_per_op"],
                            }
                            writer.writerow(row)
                            rf.flush()
                            jf.write(json.dumps({
                                **row, "cluster_dir": name,
                                "series": str(series.relative_to(run_dir)),
                                "duration_s": args.duration, "warmup_s": args.warmup,
                                **extra, "loadgen": summary,
                            }) + "\n")
                            jf.flush()
                            print(f"  [{done}/{n_runs}] {tag}: {summary.get('ops_per_s', 0):,.0f} "
                                  f"ops/s, p90 {summary.get('p90_us', 0) / 1000:.2f} ms, "
                                  f"{extra['cpu_us_per_op']} CPU µs/op, "
                                  f"errors {summary.get('errors', 0)}", flush=True)
                            time.sleep(args.pause)
            except RuntimeError as e:
                failed += 1
                print(f"  cluster {name} failed: {e}", flush=True)
            except KeyboardInterrupt:
                print("interrupted: stopping the members", file=sys.stderr)
                return 130
            finally:
                cluster.stop()
                if not args.keep_data:
                    for i in range(1, NODES + 1):
                        shutil.rmtree(cluster.node_dir(i), ignore_errors=True)
                    for k in range(cluster.loggers):
                        shutil.rmtree(cluster.logger_dir(k), ignore_errors=True)
    print(f"wrote {results_path}" + (f" ({failed} failures)" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
