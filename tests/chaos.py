"""Random workflows cancelled at random moments, and the checks every run must pass.

Shared by the Local, Dask and SSH "cancel at any moment" tests. A schedule is drawn from a
seeded ``random.Random``, so a failing run is reproduced by its seed (printed on failure).

Each task writes ``<dir>/<tag>.start`` (its pid and its child's pid) when it starts, spawns a
``sleep`` child, sleeps, reaps the child, writes ``<tag>.end`` and returns its tag plus the
sum of its inputs. So after a run we know which tasks started and which finished, and which
processes must be gone.
"""

from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass, field
from typing import Any

import valent as ct
from valent._engine.rules import lattice_status
from valent.testing.procs import alive


def chaos_task(tag: str, folder: str, seconds: float, *inputs: int) -> int:
    """Start a child, sleep, reap the child, return 1 + the sum of the inputs."""
    import subprocess

    child = subprocess.Popen(["sleep", "60"])
    with open(os.path.join(folder, f"{tag}.start"), "w") as f:
        f.write(f"{os.getpid()} {child.pid}")
    time.sleep(seconds)
    child.kill()
    child.wait()
    with open(os.path.join(folder, f"{tag}.end"), "w") as f:
        f.write("done")
    return 1 + sum(inputs)


@dataclass
class Plan:
    """A drawn workflow: shape, sleeps, executors, and when and what to cancel."""

    seed: int
    shape: str
    sleeps: list[float]
    deps: list[list[int]]
    executors: list[str]
    cancel_after: float
    cancel_ids: list[int] | None
    notes: dict[str, Any] = field(default_factory=dict)


def draw(seed: int, executors: list[str], max_tasks: int = 6) -> Plan:
    """A random plan: fan-out, chain, diamond or mixed, over the given executor names."""
    rnd = random.Random(seed)
    shape = rnd.choice(["fan", "chain", "diamond", "mixed"])
    n = rnd.randint(2, max_tasks)
    deps: list[list[int]] = []
    for i in range(n):
        if shape == "fan" or i == 0:
            deps.append([])
        elif shape == "chain":
            deps.append([i - 1])
        elif shape == "diamond":
            deps.append([0] if i < n - 1 else list(range(1, n - 1)) or [0])
        else:
            deps.append(sorted(rnd.sample(range(i), k=rnd.randint(0, min(2, i)))))
    sleeps = [rnd.choice([0.0, 0.02, 0.1, 0.3, 1.0]) for _ in range(n)]
    execs = [rnd.choice(executors) for _ in range(n)]
    cancel_after = rnd.choice([0.0, 0.01, 0.05, 0.15, 0.4, 0.8])
    cancel_ids = None
    if rnd.random() < 0.3:
        cancel_ids = sorted(rnd.sample(range(n), k=rnd.randint(1, max(1, n // 2))))
    return Plan(seed, shape, sleeps, deps, execs, cancel_after, cancel_ids)


def build(plan: Plan, folder: str, executor_objs: dict[str, Any]):
    """The plan as a lattice; returns (lattice, {task index: node id})."""
    electrons = {
        name: ct.electron(chaos_task, executor=ex) for name, ex in executor_objs.items()
    }
    index_to_node: dict[int, int] = {}

    @ct.lattice
    def chaos():
        outs = []
        for i, parents in enumerate(plan.deps):
            e = electrons[plan.executors[i]]
            out = e(f"t{i}", folder, plan.sleeps[i], *[outs[p] for p in parents])
            index_to_node[i] = out._node_id
            outs.append(out)
        return outs

    return chaos, index_to_node


def run_and_check(plan: Plan, folder: str, executor_objs: dict[str, Any],
                  wait_timeout: float = 60) -> ct.Result:
    """Dispatch the plan, cancel as drawn, and check every invariant; return the Result."""
    lattice, index_to_node = build(plan, folder, executor_objs)
    did = ct.dispatch(lattice)()
    time.sleep(plan.cancel_after)
    node_ids = None
    if plan.cancel_ids is not None:
        node_ids = [index_to_node[i] for i in plan.cancel_ids]
    ct.cancel(did, node_ids)
    result = ct.get_result(did, wait=True, timeout=wait_timeout)
    check(plan, folder, result, index_to_node)
    return result


def check(plan: Plan, folder: str, result: ct.Result, index_to_node: dict[int, int]) -> None:
    """Every node final; the dispatch status follows the rule; outcomes match reality."""
    where = f"seed {plan.seed} ({plan.shape}, cancel {plan.cancel_ids} after {plan.cancel_after}s)"
    if os.environ.get("VALENT_CHAOS_DEBUG"):
        t0 = result.start_time.timestamp()
        for n in result.get_all_node_results():
            if n["node_name"] == "chaos_task":
                print(n["node_id"], n["status"], n["cancel_outcome"], n["reason"],
                      n["start_time"] and n["start_time"].timestamp() - t0,
                      n["end_time"] and n["end_time"].timestamp() - t0,
                      n["cancel_requested_at"] and n["cancel_requested_at"].timestamp() - t0)
        for name in sorted(os.listdir(folder)):
            print(name, os.path.getmtime(os.path.join(folder, name)) - t0)
    nodes = result.get_all_node_results()
    statuses = [n["status"] for n in nodes]
    outcomes = [ct.CancelOutcome(n["cancel_outcome"]) if n["cancel_outcome"] else None
                for n in nodes]
    assert all(s in (ct.Status.COMPLETED, ct.Status.FAILED, ct.Status.CANCELLED)
               for s in statuses), f"{where}: non-final node {statuses}"
    assert result.status == lattice_status(statuses, outcomes), f"{where}: lattice {result.status}"
    assert result.status != ct.Status.FAILED, f"{where}: nothing should fail: {result.error}"
    # a partial cancel touches only the chosen nodes and what depends on them
    if plan.cancel_ids is not None:
        touched = set(plan.cancel_ids)
        for i, parents in enumerate(plan.deps):
            if any(p in touched for p in parents):
                touched.add(i)
        for i in range(len(plan.deps)):
            if i not in touched:
                n = nodes[index_to_node[i]]
                assert n["status"] == ct.Status.COMPLETED, f"{where}: untouched t{i} {n}"
    left: list[str] = []
    for i in range(len(plan.deps)):
        n = nodes[index_to_node[i]]
        tag = os.path.join(folder, f"t{i}")
        started = os.path.exists(tag + ".start")
        ended = os.path.exists(tag + ".end")
        pids: list[int] = []
        if started:
            text = open(tag + ".start").read().split()
            pids = [int(x) for x in text]
        outcome = n["cancel_outcome"]
        if n["status"] == ct.Status.COMPLETED:
            assert ended, f"{where}: t{i} COMPLETED but never finished"
            expect = 1 + sum(nodes[index_to_node[p]]["output"] for p in plan.deps[i])
            assert n["output"] == expect, f"{where}: t{i} output {n['output']} != {expect}"
            assert outcome in (None, "too_late", "runs_to_completion"), f"{where}: t{i} {outcome}"
        else:
            assert n["status"] == ct.Status.CANCELLED, f"{where}: t{i} {n['status']}"
            if outcome == "dequeued" or n["reason"] == "upstream":
                # never started (a start file may exist only if the executor said so wrongly)
                assert not started, f"{where}: t{i} {outcome}/{n['reason']} but it had started"
            else:
                assert outcome == "killed", f"{where}: t{i} CANCELLED with outcome {outcome}"
                if ended:
                    # it may have written its end file and been killed before returning, but
                    # not have finished long before the cancel was asked for (that is too_late)
                    asked = n["cancel_requested_at"].timestamp()
                    finished = os.path.getmtime(tag + ".end")
                    assert finished >= asked - 0.005, (
                        f"{where}: t{i} reported killed but it had finished "
                        f"{asked - finished:.3f}s before the cancel"
                    )
        # the task's child is gone in every case; a killed task's own process too
        check_pids = pids if outcome == "killed" else pids[1:]
        left += [f"t{i}:{p}" for p in check_pids if alive(p)]
    assert not left, f"{where}: processes left when get_result returned: {left}"
