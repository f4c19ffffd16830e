"""Cancel at any moment on Dask: random workflows mixing Local and Dask (kill and finish
mode) electrons, cancelled at random times, whole or in part; checked as the Local ones are
(tests/chaos.py). ``VALENT_CHAOS_DASK_RUNS`` sets the number of runs (default 50)."""

from __future__ import annotations

import os

import chaos
import cloudpickle
import pytest
import valent as ct
from chaos import draw, run_and_check

# the cluster's workers are programs of their own that cannot import the tests' modules
cloudpickle.register_pickle_by_value(chaos)

RUNS = int(os.environ.get("VALENT_CHAOS_DASK_RUNS", "50"))


@pytest.fixture
def executors(dask_cluster, dask_client):  # noqa: ARG001 - dask_client arms the stray check
    from valent_dask import DaskExecutor

    made = {
        "dask-kill": DaskExecutor(scheduler_address=dask_cluster.scheduler_address,
                                  cancel_mode="kill", grace=0.5),
        "dask-finish": DaskExecutor(scheduler_address=dask_cluster.scheduler_address,
                                    cancel_mode="finish"),
        "local": ct.executors.LocalExecutor(workers=2, grace=0.5),
    }
    yield made
    for ex in made.values():
        ex.shutdown()


def test_cancel_at_any_moment_dask(executors, tmp_path):
    outcomes: dict[str, int] = {}
    for seed in range(RUNS):
        folder = tmp_path / f"run{seed}"
        folder.mkdir()
        plan = draw(10_000 + seed, list(executors), max_tasks=5)
        result = run_and_check(plan, str(folder), executors)
        for n in result.get_all_node_results():
            if n["cancel_outcome"]:
                key = f"{n['executor']}:{n['cancel_outcome']}"
                outcomes[key] = outcomes.get(key, 0) + 1
    print(f"\n{RUNS} Dask runs: outcomes {outcomes}")
    if RUNS >= 30:
        assert any(k.endswith(":killed") and k.startswith("dask") for k in outcomes), outcomes
