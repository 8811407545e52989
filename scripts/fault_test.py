#!/usr/bin/env python3
"""Fault tests across containers (run by scripts/fault-test.sh, which owns the clean-up).

The cluster is deploys/compose.yaml: three members on the compose network `raft`, where
they reach each other by name. Each member is also attached, without any name, to a
control network created here; clients on the Docker host reach every member through it,
so a member cut off from `raft` is still reachable by clients (and by this script's
/status polls) while it cannot reach its peers.

Clients run the whole time, over the text protocol (`set-K-V`, `get-K`; a member
forwards to the leader), and record every operation for scripts/history_check.py.
Scenarios, in order:
  1. kill the leader's container (SIGKILL): a new leader, acknowledged writes readable;
     the old member restarts over its volume and catches up;
  2. disconnect a follower from `raft`: the others keep committing; reconnect: it
     catches up;
  3. disconnect the leader: the other two elect a leader, the old one commits nothing
     alone; reconnect: one history.
At the end every member is stopped with SIGTERM and must exit 0.
"Caught up" and "one history": with clients paused, every member reaches the same
`last_applied` and reports the same `state_digest` there.
"""

import argparse
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SERVICES = ["n1", "n2", "n3"]
ADMIN, TEXT = 13000, 15000
REGISTER_KEYS = [str(k) for k in range(1, 6)]
WAIT = 60.0  # longest wait for any one condition


class Failed(Exception):
    pass


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run(*cmd, check=True):
    r = subprocess.run(cmd, capture_output=True, text=True)
    if check and r.returncode != 0:
        raise Failed(f"{' '.join(cmd)}: exit {r.returncode}: {r.stderr.strip()}")
    return r.stdout.strip()


class Cluster:
    def __init__(self, project):
        self.project = project
        self.raft_net = f"{project}_raft"
        self.ctl_net = f"{project}_ctl"
        self.compose = ["docker-compose", "-p", project, "-f", os.path.join(ROOT, "deploys/compose.yaml")]
        self.ids = {}  # service -> container id
        self.addrs = {}  # service -> control-network IP
        self.lock = threading.Lock()

    def up(self):
        run(*self.compose, "up", "-d", "n1", "n2", "n3")
        run("docker", "network", "create", self.ctl_net)
        for s in SERVICES:
            self.ids[s] = run(*self.compose, "ps", "-q", s)
            run("docker", "network", "connect", self.ctl_net, self.ids[s])
        self.refresh()

    def refresh(self):
        """Control addresses change when a container restarts."""
        for s in SERVICES:
            ip = run(
                "docker", "inspect", "-f",
                f'{{{{(index .NetworkSettings.Networks "{self.ctl_net}").IPAddress}}}}', self.ids[s],
            )
            with self.lock:
                self.addrs[s] = ip

    def addr(self, s):
        with self.lock:
            return self.addrs.get(s)

    def status(self, s, timeout=1.0):
        ip = self.addr(s)
        if not ip:
            return None
        try:
            with urllib.request.urlopen(f"http://{ip}:{ADMIN}/status", timeout=timeout) as r:
                return json.load(r)
        except (OSError, ValueError):
            return None

    def statuses(self, services=SERVICES):
        return {s: self.status(s) for s in services}

    def wait(self, what, cond, timeout=WAIT, every=0.2):
        deadline = time.monotonic() + timeout
        while True:
            v = cond()
            if v:
                return v
            if time.monotonic() > deadline:
                raise Failed(f"timed out after {timeout:.0f}s waiting for: {what}")
            time.sleep(every)

    def leader(self, among=SERVICES):
        """The service all reachable members of `among` agree leads, in the highest term."""
        st = {s: v for s, v in self.statuses(among).items() if v}
        leaders = [s for s, v in st.items() if v["state"] == "Leader"]
        if len(leaders) != 1:
            return None
        s = leaders[0]
        term = st[s]["term"]
        lid = st[s]["id"]
        if all(v["leader_id"] == lid and v["term"] == term for v in st.values()) and len(st) >= 2:
            return s
        return None

    def kill(self, s):
        run("docker", "kill", "-s", "KILL", self.ids[s])

    def start(self, s):
        run("docker", "start", self.ids[s])
        self.refresh()

    def cut(self, s):
        run("docker", "network", "disconnect", self.raft_net, self.ids[s])

    def heal(self, s):
        # The service name is an alias on the compose network: it goes with the
        # disconnection and has to be given back.
        run("docker", "network", "connect", "--alias", s, self.raft_net, self.ids[s])


class TextConn:
    def __init__(self, ip, timeout):
        self.sock = socket.create_connection((ip, TEXT), timeout=2.0)
        self.sock.settimeout(timeout)
        self.buf = b""

    def ask(self, line):
        """Returns the answer line; raises OSError (sent or not: `sent` tells)."""
        self.sent = False
        self.sock.sendall(line.encode() + b"\n")
        self.sent = True
        while b"\n" not in self.buf:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError("connection closed")
            self.buf += chunk
        answer, self.buf = self.buf.split(b"\n", 1)
        return answer.decode().rstrip("\r")

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


def classify(kind, answer):
    """(result, value) from a text answer."""
    if answer.startswith("OK:"):
        v = answer[3:].lstrip(" ")
        return "ok", (v if kind == "read" else None)
    why = answer[4:].lstrip(" ") if answer.startswith("ERR:") else answer
    if kind == "write" and why.startswith("unknown outcome"):
        return "unknown", None
    if kind == "read" and why.startswith("key not found"):
        return "ok", None
    return "fail", None


class Recorder:
    def __init__(self, path):
        self.f = open(path, "w")
        self.lock = threading.Lock()
        self.t0 = time.monotonic()
        self.counts = {}

    def now(self):
        return time.monotonic() - self.t0

    def record(self, op):
        with self.lock:
            self.f.write(json.dumps(op) + "\n")
            self.f.flush()
            k = (op["type"], op["result"])
            self.counts[k] = self.counts.get(k, 0) + 1

    def acked_writes(self):
        with self.lock:
            return self.counts.get(("write", "ok"), 0)


class Client(threading.Thread):
    """One process of the history: one operation at a time, sticks to a member until it
    answers with an error or stops answering, then tries the next one."""

    def __init__(self, name, cluster, rec, stop, paused, seed):
        super().__init__(daemon=True)
        self.name, self.cluster, self.rec = name, cluster, rec
        self.stop, self.paused = stop, paused
        self.rng = random.Random(seed)
        self.target = self.rng.randrange(len(SERVICES))
        self.conn = None
        self.seq = 0
        self.fresh = []  # (key, value) of write-once keys this client wrote
        self.idle = threading.Event()

    def next_member(self):
        if self.conn:
            self.conn.close()
        self.conn = None
        self.target = (self.target + 1) % len(SERVICES)

    def op(self, kind, key, value=None, timeout=15.0):
        invoke = self.rec.now()
        result, got, answer = "fail", None, None
        try:
            if self.conn is None:
                ip = self.cluster.addr(SERVICES[self.target])
                self.conn = TextConn(ip, timeout)
            self.conn.sent = False
            line = f"set-{key}-{value}" if kind == "write" else f"get-{key}"
            answer = self.conn.ask(line)
            result, got = classify(kind, answer)
        except OSError as e:
            answer = f"{type(e).__name__}: {e}"
            # A write that reached the member may have been applied.
            result = "unknown" if (kind == "write" and self.conn and self.conn.sent) else "fail"
            self.next_member()
        if result != "ok" and self.conn is not None:
            self.next_member()
        self.rec.record({
            "process": self.name, "type": kind, "key": key,
            "value": value if kind == "write" else got,
            "invoke": invoke, "complete": self.rec.now(), "result": result,
            "member": SERVICES[self.target], "answer": answer,
        })
        return result, got

    def run(self):
        while not self.stop.is_set():
            if self.paused.is_set():
                self.idle.set()
                time.sleep(0.05)
                continue
            self.idle.clear()
            self.seq += 1
            r = self.rng.random()
            if r < 0.15:
                key, value = f"{self.name}x{self.seq}", f"{self.name}n{self.seq}"
                if self.op("write", key, value)[0] != "fail":
                    self.fresh.append((key, value))
            elif r < 0.55:
                self.op("write", self.rng.choice(REGISTER_KEYS), f"{self.name}n{self.seq}")
            else:
                self.op("read", self.rng.choice(REGISTER_KEYS))
            time.sleep(self.rng.uniform(0.005, 0.03))
        self.idle.set()


class Test:
    def __init__(self, args):
        self.cluster = Cluster(args.project)
        os.makedirs(args.out, exist_ok=True)
        self.history = os.path.join(args.out, "history.jsonl")
        self.rec = Recorder(self.history)
        self.stop = threading.Event()
        self.paused = threading.Event()
        self.clients = [
            Client(f"c{i}", self.cluster, self.rec, self.stop, self.paused, seed=args.seed + i)
            for i in range(args.clients)
        ]
        self.checker = Client("check", self.cluster, self.rec, self.stop, self.paused, seed=args.seed)

    # --- conditions -------------------------------------------------------------------

    def converged(self, services=SERVICES):
        """Every member at the same last_applied with the same digest (clients paused)."""
        st = self.cluster.statuses(services)
        if not all(st.values()):
            return None
        applied = {v["last_applied"] for v in st.values()}
        if len(applied) != 1:
            return None
        digests = {v["state_digest"] for v in st.values()}
        if len(digests) != 1:
            raise Failed(f"members diverged at last_applied {applied}: {json.dumps(st)}")
        return applied.pop()

    def pause_clients(self):
        self.paused.set()
        for c in self.clients:
            self.cluster.wait(f"client {c.name} to finish its operation", c.idle.is_set, timeout=30)

    def one_history(self, why):
        self.pause_clients()
        try:
            index = self.cluster.wait(f"{why}: all members at one last_applied and digest", self.converged)
            log(f"{why}: all three at last_applied {index} with equal state digests")
        finally:
            self.paused.clear()

    def committing(self, leader, what, entries=20, acked=10, hold=0.0):
        """The cluster under `leader` commits and acknowledges writes (for at least `hold`
        seconds: a fault has to outlast election timeouts to mean anything)."""
        c0 = self.cluster.status(leader)["committed"]
        a0 = self.rec.acked_writes()
        t0 = time.monotonic()
        self.cluster.wait(
            what,
            lambda: (st := self.cluster.status(leader)) and st["committed"] >= c0 + entries
            and self.rec.acked_writes() >= a0 + acked and time.monotonic() - t0 >= hold,
        )
        log(f"{what}: committed {c0} -> {self.cluster.status(leader)['committed']}")

    def read_back(self, why):
        """Every acknowledged write-once key reads back its value (linearizable reads)."""
        self.pause_clients()
        try:
            acked = []
            with open(self.history) as f:
                for line in f:
                    op = json.loads(line)
                    if op["type"] == "write" and op["result"] == "ok" and "x" in op["key"]:
                        acked.append((op["key"], op["value"]))
            for key, value in acked:
                for _ in range(5):
                    result, got = self.checker.op("read", key)
                    if result == "ok":
                        break
                else:
                    raise Failed(f"{why}: cannot read {key}")
                if got != value:
                    raise Failed(f"{why}: acknowledged write {key}={value} reads back {got!r}")
            log(f"{why}: {len(acked)} acknowledged write-once keys read back")
        finally:
            self.paused.clear()

    # --- scenarios --------------------------------------------------------------------

    def kill_leader(self):
        c = self.cluster
        old = c.wait("a leader", c.leader)
        log(f"scenario 1: kill the leader's container ({old})")
        c.kill(old)
        rest = [s for s in SERVICES if s != old]
        new = c.wait("a new leader among the other two", lambda: c.leader(rest))
        log(f"scenario 1: {new} leads")
        self.committing(new, "scenario 1: two members commit")
        self.read_back("scenario 1: after the leader's loss")
        c.start(old)
        log(f"scenario 1: {old} restarted over its volume")
        c.wait(f"{old} back as a follower", lambda: (st := c.status(old)) and st["state"] == "Follower")
        self.one_history(f"scenario 1: {old} caught up")

    def cut_follower(self):
        c = self.cluster
        leader = c.wait("a leader", c.leader)
        victim = next(s for s in SERVICES if s != leader)
        log(f"scenario 2: disconnect follower {victim} from the raft network")
        c.cut(victim)
        self.committing(leader, f"scenario 2: the others commit without {victim}", entries=50, acked=30, hold=3.0)
        c.heal(victim)
        log(f"scenario 2: {victim} reconnected")
        self.one_history(f"scenario 2: {victim} caught up")

    def cut_leader(self):
        c = self.cluster
        old = c.wait("a leader", c.leader)
        log(f"scenario 3: disconnect the leader {old} from the raft network")
        c.cut(old)
        rest = [s for s in SERVICES if s != old]
        new = c.wait("the majority to elect a new leader", lambda: c.leader(rest))
        st = c.wait(f"{old}'s status over the control network", lambda: c.status(old))
        alone_committed = st["committed"]
        log(f"scenario 3: {new} leads; {old} is {st['state']} in term {st['term']}, committed {alone_committed}")
        self.committing(new, "scenario 3: the majority commits", entries=50, acked=30, hold=3.0)
        st = c.wait(f"{old}'s status", lambda: c.status(old))
        if st["committed"] != alone_committed or st["last_applied"] > alone_committed:
            raise Failed(f"{old} committed alone: committed {alone_committed} -> {st['committed']}, "
                         f"last_applied {st['last_applied']}")
        log(f"scenario 3: {old} alone still at committed {st['committed']} "
            f"(last_log_index {st['last_log_index']})")
        c.heal(old)
        log(f"scenario 3: {old} reconnected")
        c.wait(f"{old} to follow", lambda: (st := c.status(old)) and st["state"] == "Follower")
        self.one_history("scenario 3: one history after healing")

    def run(self):
        c = self.cluster
        t0 = time.monotonic()
        c.up()
        c.wait("three voters and a leader", lambda: (l := c.leader()) and len(
            [m for m in c.status(l)["members"] if m["voter"]]) == 3 and all(c.statuses().values()))
        log(f"cluster up in {time.monotonic() - t0:.1f}s: {c.addrs}")
        for cl in self.clients:
            cl.start()
        c.wait("first acknowledged writes", lambda: self.rec.acked_writes() >= 20)
        self.kill_leader()
        self.cut_follower()
        self.cut_leader()
        self.committing(c.wait("a leader", c.leader), "after all faults: the cluster commits")
        self.stop.set()
        for cl in self.clients:
            cl.join(timeout=30)
        # Final reads of every key, after every write: all acknowledged writes show.
        for key in REGISTER_KEYS:
            for _ in range(5):
                if self.checker.op("read", key)[0] == "ok":
                    break
        self.read_back("final")
        self.one_history("final")
        t1 = time.monotonic()
        run(*c.compose, "stop", "-t", "15")
        codes = {s: run("docker", "inspect", "-f", "{{.State.ExitCode}}", c.ids[s]) for s in SERVICES}
        if any(code != "0" for code in codes.values()):
            raise Failed(f"members did not stop cleanly on SIGTERM: exit codes {codes}")
        log(f"SIGTERM: all three stopped with exit code 0 in {time.monotonic() - t1:.1f}s")
        log(f"faults done in {time.monotonic() - t0:.1f}s; operations: "
            + ", ".join(f"{k[0]}:{k[1]}={v}" for k, v in sorted(self.rec.counts.items())))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--project", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--seed", type=int, default=int(time.time()))
    args = ap.parse_args()
    log(f"seed {args.seed}")
    test = Test(args)
    try:
        test.run()
    except Failed as e:
        log(f"FAILED: {e}")
        return 1
    finally:
        test.stop.set()
    r = subprocess.run([sys.executable, os.path.join(ROOT, "scripts/history_check.py"), test.history])
    return r.returncode


if __name__ == "__main__":
    sys.exit(main())
