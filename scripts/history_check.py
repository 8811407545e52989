#!/usr/bin/env python3
"""Checks a recorded key/value history, one JSON operation a line:

    {"process": "c1", "type": "write"|"read", "key": "3", "value": "c1n17" | null,
     "invoke": 12.3, "complete": 12.4, "result": "ok"|"fail"|"unknown"}

`value` is what a write wrote or what a read returned (null: key not found). `result` is
"ok" when the cluster acknowledged the operation, "fail" when it definitely did not take
effect, "unknown" when it may have (timeouts, lost connections, `ERR: unknown outcome`).
Times are one monotonic clock on the recording machine. Keys are never deleted and every
written value is unique.

Each key is a register. A read that completed ("ok") must return:
  - a value some write of that key (acknowledged or of unknown outcome) wrote, and that
    write must have been invoked before the read completed;
  - not a value that a later acknowledged write had replaced before the read began: if
    W wrote v and was acknowledged, no acknowledged write W' of the key may have been
    invoked after W completed and completed before the read was invoked;
  - "not found" only if no write of the key was acknowledged before the read began.
Writes of unknown outcome may take effect at any time after their invocation, so they
never make a read stale. Every acknowledged write is therefore readable until a later
write replaces it, and a read after all writes (the final reads) shows the last one.

A read must not return the value of a write that definitely failed.

What this does not check: full linearizability. There is no search over the orders of
concurrent operations, so two reads that see two concurrent writes in opposite orders
pass, as do anomalies across keys; the check is per key and per read.

Usage: history_check.py HISTORY.jsonl   (exit 0 when it holds, 1 with the violations)
"""

import bisect
import json
import sys
from collections import defaultdict


def check(ops):
    writes = defaultdict(dict)  # key -> value -> op
    acked = defaultdict(list)  # key -> [(complete, invoke)] of acknowledged writes
    problems = []
    for op in ops:
        if op["type"] == "write":
            if op["value"] in writes[op["key"]]:
                problems.append(f"value written twice (the checker needs unique values): {op}")
            writes[op["key"]][op["value"]] = op
            if op["result"] == "ok":
                acked[op["key"]].append((op["complete"], op["invoke"]))
    # For each key: acknowledged writes by completion time, with the latest invocation
    # among those completed so far, to find "a write that began after W ended and ended
    # before the read began" with one binary search.
    index = {}
    for key, ws in acked.items():
        ws.sort()
        completes = [c for c, _ in ws]
        max_invoke = []
        m = float("-inf")
        for _, inv in ws:
            m = max(m, inv)
            max_invoke.append(m)
        index[key] = (completes, max_invoke)

    reads = 0
    for op in ops:
        if op["type"] != "read" or op["result"] != "ok":
            continue
        reads += 1
        key, value = op["key"], op["value"]
        completes, max_invoke = index.get(key, ([], []))
        # acknowledged writes completed before this read was invoked
        n = bisect.bisect_left(completes, op["invoke"])
        if value is None:
            if n:
                problems.append(f"read of {key} found nothing after an acknowledged write: {op}")
            continue
        w = writes[key].get(value)
        if w is None:
            problems.append(f"read of {key} returned {value!r}, which no write wrote: {op}")
            continue
        if w["result"] == "fail":
            problems.append(f"read of {key} returned {value!r}, from a write that failed: {op} {w}")
            continue
        if w["invoke"] > op["complete"]:
            problems.append(f"read of {key} returned {value!r} before its write began: {op} {w}")
            continue
        if w["result"] == "ok" and n and max_invoke[n - 1] > w["complete"]:
            problems.append(
                f"stale read of {key}: {value!r} had been replaced by an acknowledged write "
                f"before the read began: {op} {w}"
            )
    return reads, problems


def main():
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    with open(sys.argv[1]) as f:
        ops = [json.loads(line) for line in f if line.strip()]
    reads, problems = check(ops)
    counts = defaultdict(int)
    for op in ops:
        counts[f'{op["type"]}:{op["result"]}'] += 1
    summary = " ".join(f"{k}={v}" for k, v in sorted(counts.items()))
    for p in problems[:50]:
        print("VIOLATION", p)
    print(f"history: {len(ops)} operations ({summary}), {reads} reads checked, {len(problems)} violations")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
