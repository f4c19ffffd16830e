"""Scale: big lattices, each in a fresh interpreter so that its peak memory is its own.

- ``layered``: a 100,000-node layered lattice (layers of 100; each node takes two of the layer
  above) run to completion on the Local executor, against the same number of no-op calls on
  a warm ``ProcessPoolExecutor(2)`` (fork), interleaved repeats, medians; peak RSS growth of
  each. Goals: <= 1.2x the pool, <= 300 MB.
- ``fan``: a 100,000-node fan-out (50,000 electrons with a parameter each), run to completion
  (for reference, same baseline).
- ``huge`` (opt-in, ``--huge`` here or ``--only scale,scale-1m`` in run.py): a
  1,000,000-node fan-out built and dispatched, then cancelled: build+dispatch seconds and peak
  memory (goals <= 20 s, <= 2 GB), cancel completion time (``cancel()`` to the dispatch final
  in the store; goal <= 5 s), a check that every node in the store is final, and (apart)
  the time ``get_result`` then takes, and reading the million nodes' statuses from it.

    python benchmarks/bench_scale.py [--repeats 5] [--huge] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
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

shape, nodes, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
lat, arg = (fan, nodes // 2) if shape == "fan" else (layered, nodes)
rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter(); g = lat.build_graph(arg); build = time.perf_counter() - t
count = len(g.nodes); electrons = sum(1 for n in g.nodes if n.kind == "electron"); del g
t = time.perf_counter(); did = ct.dispatch(lat)(arg); disp = time.perf_counter() - t
out = {"nodes": count, "electrons": electrons, "build": build, "dispatch": disp}
if mode == "run":
    r = ct.get_result(did, wait=True)
    assert r.status == "COMPLETED", r.status
    out["total"] = time.perf_counter() - t
else:
    from valent._store import get_store
    from valent.status import FINAL_VALUES
    store = get_store()
    t1 = time.perf_counter()
    ct.cancel(did)
    while store.dispatch_status(did) not in FINAL_VALUES:  # final in the store: done
        time.sleep(0.005)
    out["cancel"] = time.perf_counter() - t1
    t2 = time.perf_counter()
    r = ct.get_result(did, wait=True)
    out["get_result"] = time.perf_counter() - t2
    out["status"] = str(r.status)
    (left,) = store._read(
        "SELECT COUNT(*) FROM nodes WHERE dispatch_id = ? "
        "AND status NOT IN ('COMPLETED', 'FAILED', 'CANCELLED')", (did,))[0]
    out["not_final"] = left
out["rss_mb"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
if mode != "run":  # after the peak memory: the rows take most of it
    t3 = time.perf_counter()
    out["nodes_read"] = len(r.node_statuses())
    out["all_nodes"] = time.perf_counter() - t3
print(json.dumps(out))
"""

POOL = r"""
import concurrent.futures as cf, json, multiprocessing as mp, resource, sys, time

def noop(*a):
    return 0

n = int(sys.argv[1])
rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
with cf.ProcessPoolExecutor(2, mp_context=mp.get_context("fork")) as pool:
    list(pool.map(noop, range(8)))
    t = time.perf_counter()
    futures = [pool.submit(noop, i) for i in range(n)]
    for f in futures:
        f.result()
    total = time.perf_counter() - t
rss = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
print(json.dumps({"total": total, "rss_mb": rss}))
"""


def _child(code: str, *args: str) -> dict:
    env = dict(os.environ)
    env["VALENT_RESULTS_DIR"] = tempfile.mkdtemp(prefix="valent-scale-")
    out = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, env=env
    )
    if out.returncode != 0:
        raise RuntimeError(f"scale child {args} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure(shape: str, nodes: int, mode: str = "run") -> dict:
    """One valent run in a fresh interpreter: ``mode`` "run" (to completion) or "cancel"."""
    return _child(CHILD, shape, str(nodes), mode)


def pool_calls(n: int) -> dict:
    """``n`` no-op calls on a warm ``ProcessPoolExecutor(2)`` in a fresh interpreter."""
    return _child(POOL, str(n))


def run_to_completion(repeats: int, nodes: int = 100_000) -> list[dict]:
    rows = []
    for shape in ("layered", "fan"):
        ours, base = [], []
        for _ in range(repeats):  # interleaved: valent, then the pool, each repeat
            m = measure(shape, nodes)
            ours.append(m)
            base.append(pool_calls(m["electrons"]))
        n, calls = ours[0]["nodes"], ours[0]["electrons"]
        total = statistics.median(m["total"] for m in ours)
        btotal = statistics.median(b["total"] for b in base)
        label = f"{shape} {n:,} nodes"
        goal = 1.2 if shape == "layered" else None
        rows.append(row(f"{label}: run to completion", total, "s", baseline=btotal,
                        baseline_name=f"{calls:,} no-op calls, ProcessPoolExecutor(2)",
                        goal_ratio=goal, note=f"{total / calls * 1e6:.0f} us/electron"))
        rows.append(row(f"{label}: peak memory", statistics.median(m["rss_mb"] for m in ours),
                        "MB", baseline=statistics.median(b["rss_mb"] for b in base),
                        baseline_name="the pool's peak memory",
                        goal_abs=300 if shape == "layered" else None))
        rows.append(row(f"{label}: build + dispatch() call",
                        statistics.median(m["build"] + m["dispatch"] for m in ours), "s"))
    return rows


def huge(nodes: int = 1_000_000) -> list[dict]:
    """A 1,000,000-node fan-out: built, dispatched, cancelled (one run: it is big)."""
    m = measure("fan", nodes, "cancel")
    n = m["nodes"]
    ok = m["status"] == "CANCELLED" and m["not_final"] == 0
    return [
        row(f"fan {n:,} nodes: build + dispatch() call", m["build"] + m["dispatch"], "s",
            goal_abs=20, note=f"build {m['build']:.1f} s"),
        row(f"fan {n:,} nodes: peak memory", m["rss_mb"], "MB", goal_abs=2000),
        row(f"fan {n:,} nodes: cancel() to final", m["cancel"], "s", goal_abs=5,
            note=f"{m['status']}, {m['not_final']} nodes not final"
                 + ("" if ok else " (NOT ALL FINAL)")),
        row(f"fan {n:,} nodes: get_result() of it", m["get_result"], "s",
            note="its row: a final dispatch's nodes are read on first use"),
        row(f"fan {n:,} nodes: then every node's status", m["all_nodes"], "s",
            note=f"Result.node_statuses(): {m['nodes_read']:,} rows read"),
    ]


def run(repeats: int = 5, huge_too: bool = False) -> list[dict]:
    rows = run_to_completion(repeats)
    if huge_too:
        rows += huge()
    return rows


def run_huge(repeats: int = 1) -> list[dict]:
    """run.py's ``scale-1m`` family."""
    return huge()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--huge", action="store_true", help="also the 1,000,000-node fan-out")
    ap.add_argument("--only-huge", action="store_true", help="only the 1,000,000-node case")
    ap.add_argument("--json")
    args = ap.parse_args()
    rows = huge() if args.only_huge else run(args.repeats, args.huge)
    report(rows, args.json)


if __name__ == "__main__":
    main()
