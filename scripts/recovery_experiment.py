#!/usr/bin/env python3
"""Recovery experiment: load a 3-node kvstore cluster with a logger, then measure how long
`recovery` takes to rebuild the state from a replica and from the logger.

    python3 scripts/recovery_experiment.py                    # 1 minute of load
    python3 scripts/recovery_experiment.py --duration 5       # minutes
    python3 scripts/recovery_experiment.py --requests 200000  # a fixed number of writes

Prints a table like the original's (transfer time, install time, bytes, commands) plus the
rates and the peak memory of both sides, writes results.json (and recovery.png when
matplotlib is installed) into the run directory (run/recovery/<UTC timestamp>/, or
--out). Needs the release binaries and guests (bash scripts/build.sh). Stdlib only.

Memory: recovery's peak is its VmHWM (ru_maxrss from wait4); the source's is its VmRSS
sampled every 20 ms during the transfer, against its RSS just before.
"""

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = ROOT / "target" / "release"
WASM = ROOT / "target" / "wasm32-wasip2" / "release" / "kvstore.wasm"
START_TIMEOUT_S = 60


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(addr, path="/status"):
    try:
        with urllib.request.urlopen(f"http://{addr}{path}", timeout=2) as r:
            return json.loads(r.read())
    except Exception:
        return None


def wait(why, check, procs):
    deadline = time.monotonic() + START_TIMEOUT_S
    while not check():
        for name, p in procs.items():
            if p.poll() is not None:
                raise RuntimeError(f"{name} exited ({p.returncode}) while waiting for {why}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {why}")
        time.sleep(0.2)


def rss_kb(pid, field="VmRSS"):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class Run:
    def __init__(self, out, host_flags):
        self.out = out
        self.procs = {}
        self.nodes = {}
        self.host_flags = host_flags

    def spawn(self, name, cmd):
        log = open(self.out / f"{name}.log", "ab")
        self.procs[name] = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        return self.procs[name]

    def start_cluster(self, n=3):
        for i in range(1, n + 1):
            addrs = {k: f"127.0.0.1:{free_port()}" for k in ("client", "raft", "admin")}
            self.nodes[i] = addrs
            cmd = [str(BIN / "host"), "--fsm", str(WASM), "--id", str(i),
                   "--client-addr", addrs["client"], "--raft-addr", addrs["raft"],
                   "--admin-addr", addrs["admin"], "--data-dir", str(self.out / f"node-{i}"),
                   *self.host_flags]
            if i > 1:
                cmd += ["--join", self.nodes[1]["admin"]]
            self.spawn(f"node-{i}", cmd)
            if i == 1:
                wait("node 1 to lead", lambda: (get_json(addrs["admin"]) or {}).get("state") == "Leader",
                     self.procs)
        wait(f"{n} voters", lambda: sum(1 for m in (get_json(self.nodes[1]["admin"]) or {}).get("members", [])
                                         if m.get("voter")) == n, self.procs)
        self.logger_admin = f"127.0.0.1:{free_port()}"
        self.spawn("logger", [str(BIN / "logger"), "--id", "log1", "--raft-addr", f"127.0.0.1:{free_port()}",
                              "--join", self.nodes[1]["admin"], "--dir", str(self.out / "archive"),
                              "--admin-addr", self.logger_admin])
        wait("the logger", lambda: get_json(self.logger_admin) is not None, self.procs)

    def stop(self):
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs.values():
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def recover_measured(args, source_pid):
    """Runs recovery; its JSON report with both sides' memory added (its own from wait4)."""
    cmd = [str(BIN / "recovery"), "--fsm", str(WASM), "--json", *args]
    base = rss_kb(source_pid)
    peak = [base]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss_kb(source_pid))
            time.sleep(0.02)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out = p.stdout.read()
    err = p.stderr.read()
    _, status, usage = os.wait4(p.pid, 0)
    done.set()
    t.join()
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise RuntimeError(f"recovery {args} failed ({code}): {err.decode().strip()}")
    report = json.loads(out)
    report["recovery_peak_rss_mb"] = usage.ru_maxrss / 1024
    report["source_rss_before_mb"] = base / 1024
    report["source_rss_peak_mb"] = peak[0] / 1024
    return report


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=1.0, help="minutes of load (default 1)")
    ap.add_argument("--requests", type=int, help="a fixed number of writes instead of --duration")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--value-size", type=int, default=1024)
    ap.add_argument("--keys", type=int, default=100000)
    ap.add_argument("--host-flag", action="append", default=[], help="extra flag for every member (repeat)")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    for f in (BIN / "host", BIN / "logger", BIN / "recovery", BIN / "loadgen", WASM):
        if not f.exists():
            sys.exit(f"{f} is missing: run bash scripts/build.sh first")
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = a.out or ROOT / "run" / "recovery" / stamp
    out.mkdir(parents=True, exist_ok=True)
    run = Run(out, a.host_flag)

    def on_term(signum, frame):
        run.stop()
        sys.exit(1)

    signal.signal(signal.SIGTERM, on_term)
    try:
        run.start_cluster()
        clients = ",".join(n["client"] for n in run.nodes.values())
        load = [str(BIN / "loadgen"), "--cluster", clients, "--clients", str(a.clients),
                "--value-size", str(a.value_size), "--keys", str(a.keys), "--get-ratio", "0"]
        if a.requests:
            load += ["--requests", str(max(1, a.requests // a.clients))]
            print(f"loading: {a.requests} writes of {a.value_size} B", flush=True)
        else:
            load += ["--duration", f"{a.duration * 60}s"]
            print(f"loading: {a.duration} min of writes of {a.value_size} B", flush=True)
        lg = subprocess.run(load, capture_output=True, text=True, check=True)
        print("loadgen:", lg.stdout.strip(), flush=True)
        leader = next(i for i in run.nodes if (get_json(run.nodes[i]["admin"]) or {}).get("state") == "Leader")
        follower = next(i for i in run.nodes if i != leader)
        # The load has stopped: once the follower has applied what the leader had committed,
        # its digest stays (checkpoints carry no commands) and is the one to compare with.
        committed = get_json(run.nodes[leader]["admin"])["committed"]
        wait("the follower to apply the load",
             lambda: (get_json(run.nodes[follower]["admin"]) or {}).get("last_applied", 0) >= committed, run.procs)
        settled = get_json(run.nodes[follower]["admin"])
        applied, digest = settled["last_applied"], settled["state_digest"]
        wait("the logger to archive the load",
             lambda: (get_json(run.logger_admin) or {"clusters": [{}]})["clusters"][0].get("archived_index", 0)
             >= applied, run.procs)
        results = {}
        results["replica"] = recover_measured(
            ["--from", run.nodes[follower]["admin"], "--last-index", str(applied)],
            run.procs[f"node-{follower}"].pid)
        results["logger"] = recover_measured(
            ["--from", run.logger_admin, "--last-index", str(applied)], run.procs["logger"].pid)
        # The transfer alone (records checked, nothing installed): what the sources and
        # the connection can do when the guest is not the bottleneck.
        results["replica transfer only"] = recover_measured(
            ["--from", run.nodes[follower]["admin"], "--last-index", str(applied), "--transfer-only"],
            run.procs[f"node-{follower}"].pid)
        results["logger transfer only"] = recover_measured(
            ["--from", run.logger_admin, "--last-index", str(applied), "--transfer-only"],
            run.procs["logger"].pid)
        for r in results.values():
            r["digest_matches"] = r["digest"] == digest if r["digest"] else None
    finally:
        run.stop()

    rows = [("source", "transfer s", "install s", "MB", "commands", "MB/s", "commands/s",
             "recovery MB", "source +MB", "digest ok")]
    for name, r in results.items():
        rows.append((name, f"{r['transfer_ms'] / 1000:.2f}", f"{r['install_ms'] / 1000:.2f}",
                     f"{r['bytes'] / 1e6:.0f}", f"{r['commands']:,}", f"{r['transfer_mb_per_s']:.0f}",
                     f"{r['install_commands_per_s']:,.0f}", f"{r['recovery_peak_rss_mb']:.0f}",
                     f"{r['source_rss_peak_mb'] - r['source_rss_before_mb']:.0f}", str(r["digest_matches"])))
    rows.append(("original (logger)", "7.9", "4.3", "533", "1,040,000", "67", "242,000", "", "", ""))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.rjust(w) for c, w in zip(r, widths)))
    (out / "results.json").write_text(json.dumps(results, indent=2))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        names = list(results) + ["original"]
        transfer = [results[n]["transfer_ms"] / 1000 for n in results] + [7.9]
        install = [results[n]["install_ms"] / 1000 for n in results] + [4.3]
        fig, ax = plt.subplots(figsize=(7.5, 4))
        xs = range(len(names))
        ax.bar([x - 0.2 for x in xs], transfer, 0.4, label="transfer")
        ax.bar([x + 0.2 for x in xs], install, 0.4, label="install")
        ax.set_xticks(list(xs), [n.replace(" ", "\n", 1) for n in names])
        ax.set_ylabel("seconds")
        ax.set_title("recovery: transfer and install")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "recovery.png", dpi=120)
        print(f"chart: {out / 'recovery.png'}")
    except ImportError:
        print("matplotlib not installed: no chart (pip install -r scripts/requirements.txt)")
    print(f"results: {out / 'results.json'}")
    if any(r["digest_matches"] is False for r in results.values()):
        sys.exit("a recovered digest differs from the cluster's")


if __name__ == "__main__":
    main()
