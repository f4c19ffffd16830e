"""Scale: build and dispatch lattices of 10,000 and 100,000 nodes (fan-out and layered).

Each case runs in a fresh interpreter so its peak memory is its own. Reported: tracing time,
``dispatch()`` call time (tracing + storing every node + starting), time to run every node
to completion on the Local executor, and peak RSS growth. Linear cost shows as a flat
per-node time from 10k to 100k.

    python benchmarks/bench_scale.py
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import report, row  # noqa: E402

CHILD = r"""
import json, resource, sys, time
import valent as ct

def noop(*a):
    return 0

e = ct.electron(noop, executor=ct.executors.LocalExecutor(workers=2))

@ct.lattice
def fan(n):                       # n electrons, each with one parameter node
    return [e(i) for i in range(n)]

@ct.lattice
def layered(n, width=100):        # layers of `width`; each node takes two of the layer above
    prev = [e(i) for i in range(width)]
    made = 2 * width
    while made < n:
        prev = [e(prev[i], prev[(i + 1) % width]) for i in range(width)]
        made += width
    return prev[0]

shape, nodes, run = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
lat, arg = (fan, nodes // 2) if shape == "fan" else (layered, nodes)
rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter(); g = lat.build_graph(arg); build = time.perf_counter() - t
count = len(g.nodes); del g
t = time.perf_counter(); did = ct.dispatch(lat)(arg); disp = time.perf_counter() - t
total = None
if run:
    r = ct.get_result(did, wait=True)
    assert r.status == "COMPLETED", r.status
    total = time.perf_counter() - t
else:
    ct.cancel(did); ct.get_result(did, wait=True)
rss = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
print(json.dumps({"nodes": count, "build": build, "dispatch": disp, "total": total, "rss_mb": rss}))
"""


def measure(shape: str, nodes: int, run_all: bool) -> dict:
    env = dict(os.environ)
    env.setdefault("VALENT_RESULTS_DIR", tempfile.mkdtemp(prefix="valent-scale-"))
    out = subprocess.run(
        [sys.executable, "-c", CHILD, shape, str(nodes), "1" if run_all else "0"],
        capture_output=True, text=True, env=env, check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(repeats: int = 1, run_all: bool = True) -> list[dict]:
    rows = []
    for shape in ("fan", "layered"):
        per_node = {}
        for nodes in (10_000, 100_000):
            m = min((measure(shape, nodes, run_all) for _ in range(repeats)),
                    key=lambda x: x["dispatch"])
            n = m["nodes"]
            per_node[nodes] = m["dispatch"] / n
            label = f"{shape} {n:,} nodes"
            goal = 2.0 if nodes == 100_000 else None
            rows.append(row(f"{label}: build", m["build"], "s", goal_abs=goal))
            rows.append(row(f"{label}: dispatch() call", m["dispatch"], "s"))
            if m["total"] is not None:
                rows.append(row(f"{label}: run to completion", m["total"], "s",
                                note=f"{m['total'] / n * 1e6:.0f} us/node"))
            rows.append(row(f"{label}: peak memory", m["rss_mb"], "MB",
                            goal_abs=300 if nodes == 100_000 else None))
        growth = per_node[100_000] / per_node[10_000]
        rows.append(row(f"{shape}: per-node dispatch cost 100k / 10k", growth, "x",
                        goal_abs=1.5, note="1.0 = linear"))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--no-run", action="store_true", help="dispatch and cancel, do not run")
    ap.add_argument("--json")
    args = ap.parse_args()
    rows = run(args.repeats, not args.no_run)
    report(rows, args.json)


if __name__ == "__main__":
    main()
