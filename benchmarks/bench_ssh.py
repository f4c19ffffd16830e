"""The SSH executor on loopback: per-task overhead and cancel latency.

Starts its own sshd on 127.0.0.1 with the test rig (``tests/ssh/rig.py``: generated keys,
an ordinary login user with its own Python 3.x venv), so run it as root on a machine with
``/usr/sbin/sshd``. Measures, after one warm-up task has opened the connection:

- 50 no-op tasks submitted at once to ``SSHExecutor`` (executor level: run / wake / poll),
  wall time per task; and the same 50 as electrons of one ``ct.dispatch``ed lattice;
- one no-op task at a time, per-task latency (p50), against what starting a remote Python
  with cloudpickle per task would cost on the already open connection (paramiko exec; the
  agent forks runners instead, with cloudpickle already imported);
- cancel latency: a running task that spawned a ``sleep`` subprocess; from ``cancel()`` to
  the executor reporting ``Cancelled(KILLED)``, which it does only once the remote group
  is confirmed gone (checked again here: no process carries the task's token). Goal <= 1 s.
  Also from ``ct.cancel(id)`` to ``ct.get_result(id, wait=True)`` returning CANCELLED.

    python benchmarks/bench_ssh.py --repeats 3 --cancel-runs 20 [--json out.json]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "tests", "ssh"))

import rig as rigmod  # noqa: E402
import valent as ct  # noqa: E402
from common import report, row  # noqa: E402
from ssh_support import Submitted, task_processes  # noqa: E402

N_TASKS = 50


def noop():
    return None


def spawn_sleep():
    import subprocess

    subprocess.run(["sleep", "300"])


def _pct(values: list[float], q: float) -> float:
    values = sorted(values)
    k = max(0, min(len(values) - 1, round(q * (len(values) - 1))))
    return values[k]


def _executor_batch(ex) -> float:
    t0 = time.perf_counter()
    jobs = [Submitted(ex, noop) for _ in range(N_TASKS)]
    for j in jobs:
        assert isinstance(j.wait(120), ct.Completed)
    return (time.perf_counter() - t0) / N_TASKS


def _dispatch_batch(ex) -> float:
    @ct.electron(executor=ex)
    def nothing(i):
        return i

    @ct.lattice
    def many(n):
        return [nothing(i) for i in range(n)]

    t0 = time.perf_counter()
    result = ct.get_result(ct.dispatch(many)(N_TASKS), wait=True, timeout=300)
    elapsed = time.perf_counter() - t0
    assert result.status == ct.Status.COMPLETED, result.status
    return elapsed / N_TASKS


def _sequential(ex, n: int) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        assert isinstance(Submitted(ex, noop).wait(60), ct.Completed)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _python_floor(ex, n: int) -> float:
    """Starting the remote Python with cloudpickle over an open connection: the floor."""
    from valent_ssh.registry import get_worker

    conn = get_worker(ex.target, ex.max_parallel, ex.reconnect_timeout)._conn
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        rc, _, err = conn.exec(f"{ex.python_path} -c 'import cloudpickle'")
        assert rc == 0, err
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _cancel_runs(ex, runs: int) -> list[float]:
    out = []
    for _ in range(runs):
        job = Submitted(ex, spawn_sleep)
        job.wait_running()
        deadline = time.monotonic() + 30
        while len(task_processes(job.handle)) < 2:  # the runner and its sleep
            assert time.monotonic() < deadline, "the task did not start its subprocess"
            time.sleep(0.005)
        t0 = time.perf_counter()
        assert ex.cancel(job.handle) == ct.CancelOutcome.KILLED
        st = job.wait(30)
        out.append(time.perf_counter() - t0)
        assert st.outcome == ct.CancelOutcome.KILLED
        assert task_processes(job.handle) == [], "reported killed while processes live"
    return out


def _dispatch_cancel_runs(ex, runs: int) -> list[float]:
    @ct.electron(executor=ex)
    def sleeper(path):
        import subprocess

        child = subprocess.Popen(["sleep", "300"])
        with open(path, "w") as f:
            f.write(str(child.pid))
        child.wait()

    @ct.lattice
    def flow(path):
        return sleeper(path)

    out = []
    for i in range(runs):
        marker = f"/tmp/valent-bench-ssh-{os.getpid()}-{i}"
        did = ct.dispatch(flow)(marker)
        deadline = time.monotonic() + 60
        while not (os.path.exists(marker) and open(marker).read()):
            assert time.monotonic() < deadline, "the electron did not start"
            time.sleep(0.005)
        t0 = time.perf_counter()
        ct.cancel(did)
        result = ct.get_result(did, wait=True, timeout=60)
        out.append(time.perf_counter() - t0)
        os.unlink(marker)
        assert result.status == ct.Status.CANCELLED, result.status
    return out


def run(repeats: int = 3, cancel_runs: int = 50) -> list[dict]:
    """Start the rig, measure, stop it; return the rows."""
    import tempfile

    from valent_ssh import SSHExecutor, registry

    os.environ.setdefault("VALENT_RESULTS_DIR", tempfile.mkdtemp(prefix="valent-bench-ssh-"))
    rig = rigmod.SSHRig()
    rig.start()
    rows = []
    try:
        ex = SSHExecutor(**rig.settings(grace=1.0, max_parallel=16))
        assert isinstance(Submitted(ex, noop).wait(60), ct.Completed)  # connect, warm up
        batch = statistics.median(_executor_batch(ex) for _ in range(repeats))
        rows.append(
            row(
                f"{N_TASKS} no-op tasks at once, executor level (max_parallel=16)",
                batch * 1000,
                "ms/task",
                note="wall time / tasks; each task is a fresh process forked by the remote agent",
            )
        )
        disp = statistics.median(_dispatch_batch(ex) for _ in range(repeats))
        rows.append(row(f"{N_TASKS} no-op SSH electrons, one ct.dispatch", disp * 1000, "ms/task"))
        floor = _python_floor(ex, 10)
        seq = _sequential(ex, 10 * repeats)
        rows.append(
            row(
                "one no-op task at a time, latency p50",
                seq * 1000,
                "ms",
                baseline=floor * 1000,
                baseline_name="exec 'python -c import cloudpickle' on the open connection",
            )
        )
        lat = _cancel_runs(ex, cancel_runs)
        for q, name, goal in ((0.5, "p50", None), (0.95, "p95", 100)):
            rows.append(
                row(
                    f"ssh cancel latency {name} of {len(lat)}",
                    _pct(lat, q) * 1000,
                    "ms",
                    goal_abs=goal,
                    note="cancel() to the remote group confirmed dead (loopback)",
                )
            )
        dl = _dispatch_cancel_runs(ex, max(10, cancel_runs // 2))
        rows.append(
            row(
                f"ct.cancel(id) to get_result(wait=True) CANCELLED, p50 of {len(dl)}",
                _pct(dl, 0.5) * 1000,
                "ms",
                goal_abs=1000,
            )
        )
        ex.shutdown()
    finally:
        from valent import api

        if api._dispatcher is not None:
            api._dispatcher.shutdown_executors()
        registry.close_all()
        rig.stop()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3, help="repeats of the throughput cases")
    ap.add_argument("--cancel-runs", type=int, default=50, help="cancels measured (>= 50)")
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args()
    rows = run(args.repeats, args.cancel_runs)
    report(rows, args.json)


if __name__ == "__main__":
    main()
