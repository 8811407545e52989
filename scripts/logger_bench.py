#!/usr/bin/env python3
"""How fast one logger process follows many clusters, as in the original's experiment
(a logger following 9 applications at 14,000 commands/s with 0.91 % lag).

    python3 scripts/logger_bench.py                        # 9 clusters, clients 1,2,4,8 each
    python3 scripts/logger_bench.py --clients 4 --duration 20 --cpuprofile run/logger.svg

Starts N single-member clusters (one `host` each, kvstore, bootstrapping itself) and one
`logger --id l0,...,l<N-1>` following all of them, then for each step of --clients runs
one `loadgen` per cluster at once (writes only). Over the measured window (warm-up
excluded) it compares what the clusters committed with what the logger archived:

  committed/s  commands the members applied (their wasm_raft_apply_seconds_count), all
               clusters together; on a one-member cluster applied = committed
  archived/s   commands the logger archived (the `commands` of its /status)
  behind %     100 x (1 - archived / committed) over the window
  lag          the logger's own lag (committed - archived index, entries), sampled
               every 0.5 s: mean and max over all clusters together

The highest committed/s with behind under 1 % is the answer. Results go to
RUN_DIR/results.jsonl (one line per step); members, logger and loadgens are stopped at
the end or on Ctrl-C. Stdlib only.
"""

import argparse
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

ROOT = Path(__file__).resolve().parent.parent
HOST = ROOT / "target/release/host"
LOADGEN = ROOT / "target/release/loadgen"
LOGGER = ROOT / "target/release/logger"
KVSTORE = ROOT / "target/wasm32-wasip2/release/kvstore.wasm"
CLK_TCK = os.sysconf("SC_CLK_TCK")
START_TIMEOUT_S = 60
STOP_TIMEOUT_S = 15
# Ports of their own, away from scripts/cluster.sh and experiments.py.
BASE = 21000


def client_addr(i):
    return f"127.0.0.1:{BASE + i}"


def raft_addr(i):
    return f"127.0.0.1:{BASE + 100 + i}"


def admin_addr(i):
    return f"127.0.0.1:{BASE + 200 + i}"


def logger_raft_addr(i):
    return f"127.0.0.1:{BASE + 300 + i}"


LOGGER_ADMIN = f"127.0.0.1:{BASE + 400}"


def get(addr, path):
    try:
        with urllib.request.urlopen(f"http://{addr}{path}", timeout=2) as r:
            return r.read().decode()
    except OSError:
        return None


def get_json(addr, path="/status"):
    body = get(addr, path)
    try:
        return json.loads(body) if body else None
    except ValueError:
        return None


def applied_commands(i):
    """Commands member i has applied (its apply histogram's count)."""
    body = get(admin_addr(i), "/metrics") or ""
    for line in body.splitlines():
        if line.startswith("wasm_raft_apply_seconds_count"):
            return int(float(line.split()[-1]))
    raise RuntimeError(f"member {i}: no wasm_raft_apply_seconds_count in /metrics")


def port_in_use(addr):
    host, port = addr.rsplit(":", 1)
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, int(port))) == 0


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


class Bench:
    def __init__(self, args, run_dir):
        self.args = args
        self.dir = run_dir
        self.hosts = {}
        self.logger = None

    def spawn(self, name, cmd):
        log = open(self.dir / f"{name}.log", "ab")
        p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                             start_new_session=True)
        log.close()
        return p

    def wait(self, why, check):
        deadline = time.monotonic() + START_TIMEOUT_S
        while not check():
            for name, p in self.procs():
                if p.poll() is not None:
                    raise RuntimeError(f"{name} exited ({p.returncode}) while waiting for {why}; "
                                       f"see {self.dir / (name + '.log')}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out after {START_TIMEOUT_S}s waiting for {why}")
            time.sleep(0.2)

    def procs(self):
        out = [(f"host-{i}", p) for i, p in self.hosts.items()]
        if self.logger:
            out.append(("logger", self.logger))
        return out

    def start(self):
        n = self.args.clusters
        addrs = [a for i in range(n) for a in (client_addr(i), raft_addr(i), admin_addr(i),
                                                logger_raft_addr(i))] + [LOGGER_ADMIN]
        for a in addrs:
            if port_in_use(a):
                raise RuntimeError(f"{a} is in use (an earlier run still going?)")
        for i in range(n):
            d = self.dir / f"host-{i}"
            self.hosts[i] = self.spawn(f"host-{i}", [
                str(HOST), "--fsm", str(KVSTORE), "--id", "1",
                "--client-addr", client_addr(i), "--raft-addr", raft_addr(i),
                "--admin-addr", admin_addr(i), "--data-dir", str(d),
            ] + self.args.host_flag)
        self.wait(f"{n} one-member clusters to lead", lambda: all(
            (get_json(admin_addr(i)) or {}).get("state") == "Leader" for i in range(n)))
        cmd = [
            str(LOGGER), "--id", ",".join(f"l{i}" for i in range(n)),
            "--raft-addr", ",".join(logger_raft_addr(i) for i in range(n)),
            "--join", ",".join(admin_addr(i) for i in range(n)),
            "--dir", str(self.dir / "archive"), "--admin-addr", LOGGER_ADMIN,
        ]
        if self.args.cpuprofile:
            cmd += ["--cpuprofile", str(self.args.cpuprofile)]
        self.logger = self.spawn("logger", cmd)

        def following():
            s = get_json(LOGGER_ADMIN) or {}
            cs = s.get("clusters", [])
            return len(cs) == n and all(c.get("state") == "Learner" for c in cs)
        self.wait("the logger to follow every cluster", following)

    def logger_status(self):
        s = get_json(LOGGER_ADMIN)
        if s is None:
            raise RuntimeError("the logger does not answer /status")
        return s["clusters"]

    def sample(self):
        """Commands applied by all members, archived by the logger, and the logger's lag."""
        # The members are read between two reads of the logger, and the logger's figure is
        # the mean of both: reading nine members takes a while on a loaded machine, and
        # either order alone would skew the ratio by what was committed meanwhile.
        before = self.logger_status()
        t = time.monotonic()
        applied = sum(applied_commands(i) for i in self.hosts)
        t = (t + time.monotonic()) / 2
        after = self.logger_status()
        return {
            "t": t,
            "applied": applied,
            "archived": (sum(c["commands"] for c in before) + sum(c["commands"] for c in after)) / 2,
            "lag": sum(c["lag"] for c in after),
            "cpu_logger": cpu_seconds(self.logger.pid),
            "cpu_hosts": sum(cpu_seconds(p.pid) for p in self.hosts.values()),
        }

    def step(self, clients):
        a = self.args
        loadgens = []
        for i in self.hosts:
            cmd = [str(LOADGEN), "--cluster", client_addr(i), "--clients", str(clients),
                   "--duration", f"{a.duration}s", "--warmup", f"{a.warmup}s",
                   "--value-size", str(a.value_size), "--keys", str(a.keys),
                   "--get-ratio", "0"]
            loadgens.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                             text=True))
        try:
            time.sleep(a.warmup)
            first = self.sample()
            lags = []
            # Stop measuring a little before the loadgens do, so the window is all load.
            end = first["t"] + (a.duration - a.warmup) - 0.5
            while time.monotonic() < end:
                time.sleep(0.5)
                lags.append(self.logger_status())
            last = self.sample()
            outs = [p.communicate(timeout=a.duration + 60) for p in loadgens]
        finally:
            for p in loadgens:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        summaries = []
        for p, (out, err) in zip(loadgens, outs):
            if p.returncode != 0:
                raise RuntimeError(f"loadgen failed ({p.returncode}): {err.strip()}")
            line = next(l for l in reversed(out.splitlines()) if l.startswith("{"))
            summaries.append(json.loads(line))
        # Once the load stops, how long the logger takes to hold everything committed.
        t0 = time.monotonic()
        self.wait_caught_up()
        catch_up = time.monotonic() - t0
        dt = last["t"] - first["t"]
        committed = (last["applied"] - first["applied"]) / dt
        archived = (last["archived"] - first["archived"]) / dt
        lag_sums = [sum(c["lag"] for c in s) for s in lags] or [0]
        return {
            "clusters": len(self.hosts),
            "clients_per_cluster": clients,
            "window_s": round(dt, 2),
            "committed_per_s": round(committed, 1),
            "archived_per_s": round(archived, 1),
            "behind_pct": round(100 * (1 - archived / committed), 2) if committed else None,
            "lag_entries_mean": round(sum(lag_sums) / len(lag_sums), 1),
            "lag_entries_max": max(lag_sums),
            "catch_up_s": round(catch_up, 2),
            "logger_cpu_pct": round(100 * (last["cpu_logger"] - first["cpu_logger"]) / dt, 1),
            "hosts_cpu_pct": round(100 * (last["cpu_hosts"] - first["cpu_hosts"]) / dt, 1),
            "logger_cpu_us_per_command": round(
                1e6 * (last["cpu_logger"] - first["cpu_logger"]) / max(1, last["archived"] - first["archived"]), 2),
            "loadgen_ops_per_s": round(sum(s.get("ops_per_s", 0) for s in summaries), 1),
            "loadgen_p99_us_max": max(s.get("p99_us", 0) for s in summaries),
            "loadgen_errors": sum(s.get("errors", 0) for s in summaries),
        }

    def wait_caught_up(self):
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            cs = self.logger_status()
            done = all(c["archived_index"] >= c["committed"] for c in cs)
            if done or time.monotonic() > deadline:
                return
            time.sleep(0.1)

    def stop(self):
        live = [p for _, p in self.procs() if p.poll() is None]
        for p in live:
            p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for p in live:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clusters", type=int, default=9, help="one-member clusters (default 9)")
    ap.add_argument("--clients", default="1,2,4,8",
                    help="clients per cluster, one step each (default 1,2,4,8)")
    ap.add_argument("--duration", type=float, default=15, help="seconds per step (default 15)")
    ap.add_argument("--warmup", type=float, default=3, help="seconds not measured (default 3)")
    ap.add_argument("--value-size", type=int, default=1024, help="default 1024")
    ap.add_argument("--keys", type=int, default=100000, help="default 100000")
    ap.add_argument("--cpuprofile", type=Path, help="the logger's CPU flame graph (SVG), written at the end")
    ap.add_argument("--host-flag", action="append", default=[], metavar="FLAG",
                    help="one more flag for every host, repeatable")
    ap.add_argument("--out", type=Path, help="run directory (default run/logger-bench/<UTC timestamp>)")
    ap.add_argument("--keep-data", action="store_true", help="keep the members' and logger's files")
    args = ap.parse_args()
    steps = [int(c) for c in args.clients.split(",") if c.strip()]
    if args.warmup + 1 >= args.duration:
        ap.error("--duration must exceed --warmup by more than a second")
    for exe in (HOST, LOADGEN, LOGGER, KVSTORE):
        if not exe.is_file():
            ap.error(f"{exe} not found: run scripts/build.sh")
    if args.cpuprofile:
        args.cpuprofile = args.cpuprofile.resolve()
    run_dir = args.out or ROOT / "run/logger-bench" / datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    run_dir.mkdir(parents=True, exist_ok=True)
    print(f"{args.clusters} clusters, steps of {steps} clients each, {args.duration:g}s each; "
          f"results in {run_dir}", flush=True)

    def on_term(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_term)

    bench = Bench(args, run_dir)
    best = None
    try:
        bench.start()
        with open(run_dir / "results.jsonl", "w") as out:
            for c in steps:
                r = bench.step(c)
                out.write(json.dumps(r) + "\n")
                out.flush()
                print(f"  {c} clients x {r['clusters']}: committed {r['committed_per_s']:,.0f}/s, "
                      f"archived {r['archived_per_s']:,.0f}/s, behind {r['behind_pct']} %, "
                      f"lag mean {r['lag_entries_mean']} max {r['lag_entries_max']} entries, "
                      f"logger CPU {r['logger_cpu_pct']} % ({r['logger_cpu_us_per_command']} us/command), "
                      f"p99 {r['loadgen_p99_us_max'] / 1000:.1f} ms", flush=True)
                if r["behind_pct"] is not None and r["behind_pct"] < 1 and (
                        best is None or r["committed_per_s"] > best["committed_per_s"]):
                    best = r
    except KeyboardInterrupt:
        print("interrupted: stopping", file=sys.stderr)
        return 130
    except RuntimeError as e:
        print(f"failed: {e}", file=sys.stderr)
        return 1
    finally:
        bench.stop()
        if not args.keep_data:
            for i in range(args.clusters):
                shutil.rmtree(run_dir / f"host-{i}", ignore_errors=True)
            shutil.rmtree(run_dir / "archive", ignore_errors=True)
    if best:
        print(f"highest rate under 1 % behind: {best['committed_per_s']:,.0f} commands/s "
              f"({best['clusters']} clusters x {best['clients_per_cluster']} clients, "
              f"behind {best['behind_pct']} %)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
