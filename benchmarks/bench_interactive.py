"""Interactive feel: ``dispatch_sync`` of a one-node lattice, and ``valent list`` on a big store.

- ``dispatch_sync`` of a one-node lattice on a warm Local executor, p50 and p95 of
  ``--runs`` calls (goal p95 <= 2 ms). The baseline is one ``ProcessPoolExecutor(2)``
  submit-and-wait round trip of the same no-op on the same machine.
- ``valent list`` (a fresh ``python -m valent.cli list`` process, as a user types it) on a
  store holding 10,000 finished dispatches made by real ``ct.dispatch`` calls, p50 and p95
  wall time of ``--runs`` invocations (goal <= 200 ms). The baseline is the start-up of a bare
  ``python -c pass`` (what no Python CLI can go below).

    python benchmarks/bench_interactive.py [--runs 50] [--dispatches 10000] [--sync-only]
                                           [--json out.json]
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import textwrap
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import compile_valent, report, row  # noqa: E402

FILL = textwrap.dedent(
    """
    import sys
    import valent as ct

    def one(x):
        return x

    e = ct.electron(one, executor=ct.executors.LocalExecutor(workers=2))

    @ct.lattice
    def single(x):
        return e(x)

    n = int(sys.argv[1])
    ids = []
    for i in range(n):
        ids.append(ct.dispatch(single)(i))
        if len(ids) >= 500:  # keep the owner's queue short; every dispatch ends COMPLETED
            for d in ids:
                assert ct.get_result(d, wait=True).status == "COMPLETED"
            ids = []
    for d in ids:
        assert ct.get_result(d, wait=True).status == "COMPLETED"
    """
)


def noop(x=None):
    return x


def _pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[max(0, min(len(values) - 1, round(q * (len(values) - 1))))]


def dispatch_sync_latency(runs: int) -> list[dict]:
    """p50/p95 of ``dispatch_sync`` of a one-node lattice, each next to a pool round trip."""
    import valent as ct

    e = ct.electron(noop, executor=ct.executors.LocalExecutor(workers=2))

    @ct.lattice
    def single(x):
        return e(x)

    ours, base = [], []
    with cf.ProcessPoolExecutor(2, mp_context=mp.get_context("fork")) as pool:
        list(pool.map(noop, range(4)))
        for i in range(20):  # warm: workers, store connection, code paths
            ct.dispatch_sync(single)(i)
        for i in range(runs):
            t = time.perf_counter()
            r = ct.dispatch_sync(single)(i)
            ours.append(time.perf_counter() - t)
            assert r.status == ct.Status.COMPLETED, r.status
            t = time.perf_counter()
            pool.submit(noop, i).result()
            base.append(time.perf_counter() - t)
    return [
        row("dispatch_sync one-node p50", _pct(ours, 0.5) * 1e3, "ms",
            baseline=_pct(base, 0.5) * 1e3, baseline_name="pool submit().result() p50"),
        row("dispatch_sync one-node p95", _pct(ours, 0.95) * 1e3, "ms",
            baseline=_pct(base, 0.95) * 1e3, baseline_name="pool submit().result() p95",
            goal_abs=2, note=f"{runs} runs"),
    ]


def fill_store(results: str, dispatches: int) -> float:
    """Make ``dispatches`` real one-node dispatches in ``results``; seconds it took."""
    env = {**os.environ, "VALENT_RESULTS_DIR": results}
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", FILL, str(dispatches)], env=env, check=True)
    return time.perf_counter() - t


def list_latency(runs: int, dispatches: int) -> list[dict]:
    """Wall time of ``valent list`` as a fresh process on a store of ``dispatches``."""
    compile_valent()
    with tempfile.TemporaryDirectory(prefix="valent-bench-list-") as tmp:
        results = os.path.join(tmp, "results")
        fill = fill_store(results, dispatches)
        env = {**os.environ, "VALENT_RESULTS_DIR": results}
        cli = [sys.executable, "-m", "valent.cli", "list"]
        out = subprocess.run(cli, env=env, capture_output=True, text=True, check=True).stdout
        assert out.count("COMPLETED") == 20, out
        ours, base = [], []
        for _ in range(runs):
            t = time.perf_counter()
            subprocess.run(cli, env=env, capture_output=True, check=True)
            ours.append(time.perf_counter() - t)
            t = time.perf_counter()
            subprocess.run([sys.executable, "-c", "pass"], env=env, capture_output=True,
                           check=True)
            base.append(time.perf_counter() - t)
    note = f"{runs} runs; store of {dispatches:,} dispatches filled in {fill:.0f} s"
    return [
        row(f"valent list, {dispatches:,} dispatches p50", _pct(ours, 0.5) * 1e3, "ms",
            baseline=_pct(base, 0.5) * 1e3, baseline_name="python -c pass p50"),
        row(f"valent list, {dispatches:,} dispatches p95", _pct(ours, 0.95) * 1e3, "ms",
            baseline=_pct(base, 0.95) * 1e3, baseline_name="python -c pass p95",
            goal_abs=200, note=note),
    ]


def run(repeats: int = 5, runs: int | None = None, dispatches: int = 10_000) -> list[dict]:
    runs = runs or max(50, 10 * repeats)
    return dispatch_sync_latency(max(100, runs)) + list_latency(runs, dispatches)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--dispatches", type=int, default=10_000)
    ap.add_argument("--sync-only", action="store_true",
                    help="only dispatch_sync (skips filling a store for `valent list`)")
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args()
    os.environ.setdefault("VALENT_RESULTS_DIR", tempfile.mkdtemp(prefix="valent-bench-"))
    if args.sync_only:
        report(dispatch_sync_latency(max(100, args.runs)), args.json)
    else:
        report(run(runs=args.runs, dispatches=args.dispatches), args.json)


if __name__ == "__main__":
    main()
