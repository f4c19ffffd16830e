"""Dask executor benchmarks: valent's DaskExecutor against raw Dask on the same cluster.

One ``distributed.LocalCluster(processes=True, n_workers=2, threads_per_worker=1)`` on
127.0.0.1 serves every case; within a repeat the raw and valent variants run back to back
(the order rotates between repeats), so both see the same machine state.

Cases (``N`` = 1,000 by default):

- ``fanout``: N independent no-op tasks. Raw: ``client.submit`` each, then ``gather``.
  valent: ``DaskExecutor.run`` each, wait for every ``wake``/``poll`` to be final
  (executor level), and a lattice of N electrons through ``ct.dispatch`` / ``get_result``.
- ``chain``: N dependent no-op tasks. Raw: each ``submit`` gets the previous future (Dask
  passes values worker to worker), and "raw client-driven": ``submit(...).result()`` in a
  loop, the way a dispatcher that needs each value before the next task would drive Dask.
  valent: each task is given the previous one's handle as a ``valent.Upstream`` marker (what
  the dispatcher does on a chaining executor) and every value still comes back to the
  client (executor level), and a lattice whose electrons form a chain.
- ``cancel``: kill mode, a running task (and so its child process) is cancelled; the time
  from ``cancel()`` to the state ``Cancelled(killed)`` (the pool has confirmed the child's
  process group gone), p50 and p95.

Run: ``python benchmarks/bench_dask.py --repeats 3 [--n 1000] [--only fanout,chain,cancel]
[--json out.json]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
import uuid

import cloudpickle


def noop(x=None):
    return x


def inc(x):
    return x + 1


def sleeper(pid_file: str, seconds: float = 60.0) -> None:
    with open(pid_file + ".tmp", "w") as f:
        f.write(str(os.getpid()))
    os.replace(pid_file + ".tmp", pid_file)
    time.sleep(seconds)


cloudpickle.register_pickle_by_value(sys.modules[__name__])


class _Waiter:
    """Collects wakes; ``wait_all`` polls each woken handle until every one is final."""

    def __init__(self, executor):
        self.executor = executor
        self.cv = threading.Condition()
        self.woken: list[list] = []

    def run(self, task):
        slot: list = [None]

        def wake() -> None:
            with self.cv:
                self.woken.append(slot)
                self.cv.notify()

        slot[0] = self.executor.run(task, wake)
        return slot[0]

    def wait_all(self, handles, timeout: float = 600.0) -> None:
        """Wait until every handle is final (slots are filled: run() returned for all)."""
        left = {id(h) for h in handles if not self.executor.poll(h).final}
        deadline = time.monotonic() + timeout
        while left:
            with self.cv:
                while not self.woken:
                    if not self.cv.wait(max(0.0, deadline - time.monotonic())):
                        raise TimeoutError(f"{len(left)} tasks not final")
                woken, self.woken = self.woken, []
            for slot in woken:
                h = slot[0]
                if id(h) in left and self.executor.poll(h).final:
                    left.discard(id(h))


def _task(fn, args, n, did):
    import valent

    return valent.Task(dispatch_id=did, node_id=n, name=fn.__name__, fn=fn, args=args)


# ---------------------------------------------------------------------- the cases


def raw_fanout(client, n: int) -> float:
    t0 = time.perf_counter()
    futs = [client.submit(noop, i, pure=False) for i in range(n)]
    client.gather(futs)
    return time.perf_counter() - t0


def raw_chain(client, n: int) -> float:
    t0 = time.perf_counter()
    f = client.submit(inc, 0, pure=False)
    for _ in range(n - 1):
        f = client.submit(inc, f, pure=False)
    assert f.result() == n
    return time.perf_counter() - t0


def raw_chain_client_driven(client, n: int) -> float:
    """The chain as a dispatcher drives it: each value back to the client, then the next."""
    t0 = time.perf_counter()
    v = 0
    for _ in range(n):
        v = client.submit(inc, v, pure=False).result()
    assert v == n
    return time.perf_counter() - t0


def exec_fanout(ex, n: int) -> float:
    did = uuid.uuid4().hex[:12]
    w = _Waiter(ex)
    t0 = time.perf_counter()
    handles = [w.run(_task(noop, (i,), i, did)) for i in range(n)]
    w.wait_all(handles)
    dt = time.perf_counter() - t0
    bad = [ex.poll(h) for h in handles if type(ex.poll(h)).__name__ != "Completed"]
    assert not bad, bad[:3]
    return dt


def exec_chain(ex, n: int) -> float:
    import valent

    did = uuid.uuid4().hex[:12]
    w = _Waiter(ex)
    t0 = time.perf_counter()
    handles: list = []
    for i in range(n):
        arg = valent.Upstream(handles[-1], i - 1) if handles else 0
        handles.append(w.run(_task(inc, (arg,), i, did)))
    w.wait_all(handles)  # every value back here, as the dispatcher needs them for the store
    dt = time.perf_counter() - t0
    assert ex.poll(handles[-1]).get_value() == n
    return dt


def dispatch_fanout(ex, n: int) -> float:
    import valent as ct

    e_noop = ct.electron(noop, executor=ex)

    @ct.lattice
    def fan(k):
        return [e_noop(i) for i in range(k)]

    t0 = time.perf_counter()
    r = ct.dispatch_sync(fan)(n)
    dt = time.perf_counter() - t0
    assert r.status == "COMPLETED", r.status
    return dt


def dispatch_chain(ex, n: int) -> float:
    import valent as ct

    e_inc = ct.electron(inc, executor=ex)

    @ct.lattice
    def chain(k):
        v = 0
        for _ in range(k):
            v = e_inc(v)
        return v

    t0 = time.perf_counter()
    r = ct.dispatch_sync(chain)(n)
    dt = time.perf_counter() - t0
    assert r.status == "COMPLETED" and r.result == n, (r.status, r.result)
    return dt


def cancel_latency(ex, runs: int) -> list[float]:
    """Seconds from ``cancel()`` to ``Cancelled(killed)`` of a running task, ``runs`` times."""
    import psutil

    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(runs):
            pid_file = os.path.join(tmp, f"p{i}")
            ev = threading.Event()
            h = ex.run(_task(sleeper, (pid_file,), i, uuid.uuid4().hex[:12]), ev.set)
            deadline = time.monotonic() + 30
            while not os.path.exists(pid_file):
                if time.monotonic() > deadline:
                    raise TimeoutError("the sleeper never started")
                time.sleep(0.002)
            with open(pid_file) as f:
                pid = int(f.read())
            t0 = time.perf_counter()
            outcome = ex.cancel(h)
            while not (state := ex.poll(h)).final:
                ev.wait(1.0)
                ev.clear()
            dt = time.perf_counter() - t0
            assert str(outcome) == "killed" and str(state.outcome) == "killed", (outcome, state)
            try:
                gone = psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
            except psutil.NoSuchProcess:
                gone = True
            assert gone, f"pid {pid} alive after Cancelled(killed)"
            out.append(dt)
    return out


# ---------------------------------------------------------------------- driver


def _pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    k = min(len(xs) - 1, max(0, round(p / 100 * (len(xs) - 1))))
    return xs[k]


CASES = ("fanout", "chain", "cancel")
GOALS = {("fanout", "finish"): 1.0, ("fanout", "kill"): 1.15,
         ("chain", "finish"): 1.2, ("chain", "kill"): 1.5}
"""Ratios to raw Dask (issue 17: fan-out <= 1.0x finish mode, <= 1.15x kill mode)."""


def run(
    repeats: int = 5, n: int = 1000, cancel_runs: int = 50, dispatch: bool = True,
    cases: tuple[str, ...] = CASES,
) -> list[dict]:
    """Run the ``cases`` ``repeats`` times; return one row per (case, variant)."""
    import distributed
    import valent as ct

    cluster = distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
        dashboard_address=None, scheduler_kwargs={"dashboard_address": "127.0.0.1:0"},
    )
    client = distributed.Client(cluster, set_as_default=False)
    execs = {
        m: ct.executors.DaskExecutor(scheduler_address=cluster.scheduler_address, cancel_mode=m)
        for m in ("finish", "kill")
    }
    times: dict[tuple[str, str], list[float]] = {}
    lat: list[float] = []
    try:
        for ex in execs.values():  # warm: connection, pools, function caches
            exec_fanout(ex, 50)
            exec_chain(ex, 10)
        raw_fanout(client, 50)
        for rep in range(repeats):
            variants = [("raw", None)] + [(m, ex) for m, ex in execs.items()]
            variants = variants[rep % 3:] + variants[: rep % 3]
            for case, raw_fn, ex_fn, disp_fn in (
                ("fanout", raw_fanout, exec_fanout, dispatch_fanout),
                ("chain", raw_chain, exec_chain, dispatch_chain),
            ):
                if case not in cases:
                    continue
                for name, ex in variants:
                    if ex is None:
                        times.setdefault((case, "raw dask"), []).append(raw_fn(client, n))
                        if case == "chain":
                            times.setdefault((case, "raw client-driven"), []).append(
                                raw_chain_client_driven(client, n)
                            )
                        continue
                    times.setdefault((case, f"executor {name}"), []).append(ex_fn(ex, n))
                    if dispatch:
                        times.setdefault((case, f"dispatch {name}"), []).append(disp_fn(ex, n))
        if "cancel" in cases:
            lat = cancel_latency(execs["kill"], cancel_runs)
    finally:
        for ex in execs.values():
            ex.shutdown()
        client.close()
        cluster.close()
    rows = []
    for (case, variant), ts in times.items():
        raw = statistics.median(times[(case, "raw dask")])
        med = statistics.median(ts)
        rows.append({
            "case": case, "variant": variant, "n": n, "repeats": len(ts),
            "median_s": round(med, 4), "per_task_ms": round(1000 * med / n, 3),
            "vs_raw": round(med / raw, 2),
        })
    if lat:
        rows.append({
            "case": "cancel", "variant": "kill mode", "n": len(lat), "repeats": 1,
            "p50_ms": round(1000 * _pct(lat, 50), 1), "p95_ms": round(1000 * _pct(lat, 95), 1),
            "max_ms": round(1000 * max(lat), 1),
        })
    return rows


def table_rows(rows: list[dict]) -> list[dict]:
    """The rows in benchmarks/common.py's format (for benchmarks/run.py's one table)."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from common import row

    out = []
    raw = {r["case"]: r for r in rows if r.get("variant") == "raw dask"}
    for r in rows:
        if r["case"] == "cancel":
            out.append(row("dask kill cancel latency p50", r["p50_ms"], "ms"))
            out.append(row("dask kill cancel latency p95", r["p95_ms"], "ms", goal_abs=50,
                           note=f"{r['n']} runs; cancel() to the child group confirmed gone"))
            continue
        if r["variant"] == "raw dask":
            continue
        goal = GOALS.get((r["case"], r["variant"].split()[-1]))
        if "raw" in r["variant"]:
            goal = None
        base = raw[r["case"]]["per_task_ms"]
        out.append(row(f"dask {r['case']} {r['n']}: {r['variant']}", r["per_task_ms"], "ms/task",
                       baseline=base, baseline_name="raw client.submit/gather", goal_ratio=goal))
    return out


def _print(rows: list[dict]) -> None:
    print(f"{'case':<8} {'variant':<18} {'n':>6} {'median s':>9} {'ms/task':>8} {'vs raw':>7}")
    for r in rows:
        if r["case"] == "cancel":
            continue
        print(
            f"{r['case']:<8} {r['variant']:<18} {r['n']:>6} {r['median_s']:>9.3f} "
            f"{r['per_task_ms']:>8.3f} {r['vs_raw']:>6.2f}x"
        )
    for r in rows:
        if r["case"] == "cancel":
            print(
                f"cancel latency (kill mode, cancel() -> child group confirmed dead), "
                f"{r['n']} runs: p50 {r['p50_ms']} ms, p95 {r['p95_ms']} ms, max {r['max_ms']} ms"
            )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--n", type=int, default=1000, help="tasks per fan-out / chain")
    ap.add_argument("--cancel-runs", type=int, default=50)
    ap.add_argument("--no-dispatch", action="store_true", help="executor level only")
    ap.add_argument("--only", default=",".join(CASES),
                    help=f"comma-separated cases of {', '.join(CASES)}")
    ap.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as results:
        os.environ.setdefault("VALENT_RESULTS_DIR", results)
        cases = tuple(c.strip() for c in args.only.split(","))
        bad = [c for c in cases if c not in CASES]
        if bad:
            ap.error(f"unknown case(s) {', '.join(bad)}; choose from {', '.join(CASES)}")
        rows = run(args.repeats, args.n, args.cancel_runs, not args.no_dispatch, cases)
    _print(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
