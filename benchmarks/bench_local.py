"""Local executor vs a warm ``ProcessPoolExecutor(2)`` (fork), interleaved in one run.

Cases: fan-out of 1,000 and 5,000 no-op electrons (goal <= 1.0x the pool per task); a
1,000-long chain (vs submit-wait-submit on the pool, goal <= 1.0x); cancel latency p95 over
50 runs (``cancel()`` returning -> every started task process and its child dead, goal
<= 10 ms).

    python benchmarks/bench_local.py --repeats 5
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time

import psutil

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import valent as ct  # noqa: E402
from common import report, row  # noqa: E402


def noop_fn(x):
    return x


def sleeper_fn(path, seconds):
    import subprocess

    child = subprocess.Popen(["sleep", str(seconds)])
    with open(path, "w") as f:
        f.write(f"{os.getpid()} {child.pid}")
    time.sleep(seconds)
    return seconds


def _lattices(executor):
    noop = ct.electron(noop_fn, executor=executor)

    @ct.lattice
    def fan(n):
        return [noop(i) for i in range(n)]

    @ct.lattice
    def chain(n):
        x = noop(0)
        for _ in range(n - 1):
            x = noop(x)
        return x

    return fan, chain


def _time(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _valent_run(lat, n):
    r = ct.dispatch_sync(lat)(n)
    assert r.status == ct.Status.COMPLETED, r
    return r


def throughput(repeats: int) -> list[dict]:
    """Fan-out and chain, each valent run paired with a pool run right after it."""
    executor = ct.executors.LocalExecutor(workers=2)
    fan, chain = _lattices(executor)
    _valent_run(fan, 20)  # warm the workers
    samples: dict[str, list[tuple[float, float]]] = {}
    with cf.ProcessPoolExecutor(2, mp_context=mp.get_context("fork")) as pool:
        list(pool.map(noop_fn, range(8)))
        for _ in range(repeats):
            for n in (1000, 5000):
                v = _time(lambda n=n: _valent_run(fan, n)) / n
                b = _time(lambda n=n: [f.result() for f in [pool.submit(noop_fn, i)
                                                           for i in range(n)]]) / n
                samples.setdefault(f"local fan-out {n}", []).append((v, b))

            def pool_chain(n=1000):
                x = 0
                for _ in range(n):
                    x = pool.submit(noop_fn, x).result()

            v = _time(lambda: _valent_run(chain, 1000)) / 1000
            b = _time(pool_chain) / 1000
            samples.setdefault("local chain 1000", []).append((v, b))
    executor.shutdown()
    goals = {"local fan-out 1000": 1.0, "local fan-out 5000": 1.0, "local chain 1000": 1.0}
    out = []
    for case, pairs in samples.items():
        v = statistics.median(p[0] for p in pairs)
        b = statistics.median(p[1] for p in pairs)
        out.append(row(case, v * 1e6, "us/task", baseline=b * 1e6,
                       baseline_name="ProcessPoolExecutor(2) fork", goal_ratio=goals[case]))
    return out


def cancel_latency(runs: int) -> list[dict]:
    """From calling ``ct.cancel`` to every started task process (and its child) dead."""
    executor = ct.executors.LocalExecutor(workers=4, grace=1.0)
    sleeper = ct.electron(sleeper_fn, executor=executor)

    @ct.lattice
    def wf(paths):
        return [sleeper(p, 30) for p in paths]

    lat: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(runs):
            paths = [os.path.join(tmp, f"{i}-{k}") for k in range(2)]
            did = ct.dispatch(wf)(paths)
            deadline = time.monotonic() + 30
            while not all(os.path.exists(p) and os.path.getsize(p) for p in paths):
                if time.monotonic() > deadline:
                    raise RuntimeError("tasks did not start")
                time.sleep(0.005)
            pids = [int(x) for p in paths for x in open(p).read().split()]
            t0 = time.perf_counter()
            ct.cancel(did)
            while any(_alive(pid) for pid in pids):
                time.sleep(0.0005)
            lat.append(time.perf_counter() - t0)
            assert ct.get_result(did, wait=True, timeout=30).status == ct.Status.CANCELLED
    executor.shutdown()
    lat.sort()
    p50 = statistics.median(lat)
    p95 = lat[min(len(lat) - 1, int(round(0.95 * (len(lat) - 1))))]
    return [
        row("local cancel latency p50", p50 * 1e3, "ms"),
        row("local cancel latency p95", p95 * 1e3, "ms", goal_abs=10,
            note=f"{runs} runs; cancel() to every started process gone"),
    ]


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def run(repeats: int = 5, cancel_runs: int = 50) -> list[dict]:
    return throughput(repeats) + cancel_latency(cancel_runs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--cancel-runs", type=int, default=50)
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args()
    os.environ.setdefault("VALENT_RESULTS_DIR", tempfile.mkdtemp(prefix="valent-bench-"))
    rows = run(args.repeats, args.cancel_runs)
    report(rows, args.json)


if __name__ == "__main__":
    main()
