"""`valent cancel` from another process: time until the tasks are confirmed dead.

An owner process dispatches a workflow of sleeping Local tasks (each also starts a
``sleep`` subprocess) and waits; for each repeat this script, once every task wrote its
pids, launches ``valent cancel ID`` as a subprocess (a user in another terminal) and
measures, from that launch:

- until every task process and its subprocess is dead (psutil; zombies count as dead),
- until the ``valent cancel`` command returned (it waits for the owner's confirmation and
  prints per-node outcomes).

Both include the CLI's start-up (a fresh interpreter importing valent) and the owner's
store poll for cancel requests (every 0.2 s), so expect a few hundred ms.

    python benchmarks/bench_cli_cancel.py --repeats 20 [--json out.json]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time

import psutil

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import compile_valent, report, row  # noqa: E402

TASKS = 2
OWNER = textwrap.dedent(
    """
    import os, subprocess, sys, time
    import valent as ct

    piddir, repeats, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])

    @ct.electron(executor=ct.executors.LocalExecutor(workers=n))
    def sleeper(path):
        child = subprocess.Popen(["sleep", "120"])
        with open(path + ".tmp", "w") as f:
            f.write(f"{os.getpid()} {child.pid}")
        os.replace(path + ".tmp", path)
        time.sleep(120)

    @ct.lattice
    def sleepers(paths):
        return [sleeper(p) for p in paths]

    for r in range(repeats):
        paths = [os.path.join(piddir, f"{r}-{k}") for k in range(n)]
        did = ct.dispatch(sleepers)(paths)
        print(did, flush=True)
        print(ct.get_result(did, wait=True).status, flush=True)
    """
)


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _pcts(values: list[float]) -> tuple[float, float]:
    values = sorted(values)
    p95 = values[min(len(values) - 1, int(round(0.95 * (len(values) - 1))))]
    return statistics.median(values), p95


def measure(repeats: int, tasks: int = TASKS) -> dict[str, list[float]]:
    """Raw seconds per repeat: ``dead`` (tasks gone), ``returned`` (CLI exited), ``startup``."""
    out: dict[str, list[float]] = {"dead": [], "returned": [], "startup": []}
    cli = [sys.executable, "-m", "valent.cli"]
    compile_valent()
    with tempfile.TemporaryDirectory(prefix="valent-bench-cli-") as tmp:
        env = {**os.environ, "VALENT_RESULTS_DIR": os.path.join(tmp, "results")}
        script = os.path.join(tmp, "owner.py")
        with open(script, "w") as f:
            f.write(OWNER)
        owner = subprocess.Popen(
            [sys.executable, script, tmp, str(repeats), str(tasks)],
            stdout=subprocess.PIPE, text=True, env=env,
        )
        try:
            for r in range(repeats):
                did = owner.stdout.readline().strip()
                paths = [os.path.join(tmp, f"{r}-{k}") for k in range(tasks)]
                deadline = time.monotonic() + 60
                while not all(os.path.exists(p) for p in paths):
                    if time.monotonic() > deadline or owner.poll() is not None:
                        raise RuntimeError("the owner's tasks did not start")
                    time.sleep(0.005)
                pids = [int(x) for p in paths for x in open(p).read().split()]
                t0 = time.perf_counter()
                proc = subprocess.Popen(
                    [*cli, "cancel", did], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                    text=True, env=env,
                )
                dead = None
                while dead is None or proc.poll() is None:
                    if dead is None and not any(_alive(p) for p in pids):
                        dead = time.perf_counter() - t0
                    if time.perf_counter() - t0 > 60:
                        raise RuntimeError("cancel did not finish within 60 s")
                    time.sleep(0.001)
                returned = time.perf_counter() - t0
                stdout, stderr = proc.communicate()
                if proc.returncode != 0 or f"({tasks} killed)" not in stdout:
                    raise RuntimeError(f"valent cancel failed: {stdout}{stderr}")
                status = owner.stdout.readline().strip()
                if status != "CANCELLED":
                    raise RuntimeError(f"dispatch ended {status}, not CANCELLED")
                out["dead"].append(dead)
                out["returned"].append(returned)
                t1 = time.perf_counter()
                subprocess.run([*cli, "--version"], capture_output=True, env=env, check=True)
                out["startup"].append(time.perf_counter() - t1)
            owner.wait(timeout=60)
        finally:
            if owner.poll() is None:
                owner.kill()
                owner.wait()
    return out


def run(repeats: int = 20) -> list[dict]:
    """Rows (benchmarks/common.py format): p50 and p95 of each measure, in ms."""
    raw = measure(repeats)
    rows = []
    for key, case, goal in (
        ("dead", "valent cancel (other process) -> tasks dead", 1000),
        ("returned", "valent cancel (other process) -> command returned", 1000),
        ("startup", "CLI start-up alone (valent --version)", None),
    ):
        p50, p95 = _pcts(raw[key])
        rows.append(row(f"{case} p50", p50 * 1e3, "ms", goal_abs=goal))
        rows.append(row(f"{case} p95", p95 * 1e3, "ms", goal_abs=goal, note=f"{repeats} runs"))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args()
    rows = run(args.repeats)
    report(rows, args.json)


if __name__ == "__main__":
    main()
