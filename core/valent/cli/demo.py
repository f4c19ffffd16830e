"""``valent demo``: Covalent's "cancel a running workflow" example, on valent, with a check.

The same workflow as Covalent's how-to (sleeps multiplied by ``scale``): dispatch, look at it
running, cancel, wait, and show per node what happened, then prove no task process is left.
"""

from __future__ import annotations

import time

import psutil

import valent as ct
from valent.api import get_dispatcher


@ct.electron
def task_1(x):
    time.sleep(x)
    print("Task 1")
    return x


@ct.electron
def task_2(a, b):
    c = a + b
    time.sleep(c)
    print("Task 2")
    return c


@ct.electron
def task_3(a, pause=2):
    time.sleep(pause)
    print("Task 3")
    return a**2


@ct.lattice
def workflow(x, scale=1.0):
    res_2 = task_2(task_1(10 * scale), x)
    for _ in range(10):
        task_1(10 * scale)
    task_3(res_2, 2 * scale)


def run_demo(scale: float = 0.2) -> None:
    """Dispatch, wait ``3 * scale`` s, print, cancel, wait, print; then check for leftovers."""
    wait = 3 * scale
    tasks = sum(n.kind == "electron" for n in workflow.build_graph(5 * scale, scale).nodes)
    print(
        f"valent demo: dispatching Covalent's \"cancel a running workflow\" example "
        f"({tasks} tasks, sleeps x{scale:g})"
    )
    print(
        f"on the local executor, cancelling it after {wait:g} s, then showing what happened "
        "to each task."
    )
    dispatch_id = ct.dispatch(workflow)(5 * scale, scale)
    time.sleep(wait)
    print(f"\n== {wait:g} s after dispatch: ct.get_result(id)")
    print(str(ct.get_result(dispatch_id)).strip("\n"))
    local = get_dispatcher().named_executor("local")
    busy = local.pool.busy_pids() if local is not None else []
    t0 = time.perf_counter()
    print("\n== ct.cancel(id)")
    print(ct.cancel(dispatch_id))
    result = ct.get_result(dispatch_id, wait=True)
    took = time.perf_counter() - t0
    print("\n== ct.get_result(id, wait=True): each task says how it was stopped")
    print(str(result).strip("\n"))
    outcomes: dict[str, int] = {}
    for node in result.get_all_node_results():
        if node["cancel_outcome"]:
            outcomes[node["cancel_outcome"]] = outcomes.get(node["cancel_outcome"], 0) + 1
    left = [pid for pid in busy if _alive(pid)]
    print(
        f"\nstatus {result.status}: cancel() to get_result(wait=True) took {took * 1000:.0f} ms; "
        f"outcomes: {', '.join(f'{n} {k}' for k, n in sorted(outcomes.items())) or 'none'}"
    )
    print(
        f"task processes running at cancel: {len(busy)}; still alive after get_result: "
        f"{len(left)}"
    )


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


if __name__ == "__main__":
    run_demo()
