"""Cancel at any moment: random Local workflows cancelled at random times, whole or in part.

``VALENT_CHAOS_RUNS`` sets how many runs (default 200); each run's seed is its index, so a
failure names the seed that reproduces it (``VALENT_CHAOS_SEED=N`` runs just that one).
"""

from __future__ import annotations

import os

import pytest
import valent as ct
from chaos import draw, run_and_check

RUNS = int(os.environ.get("VALENT_CHAOS_RUNS", "200"))
ONLY = os.environ.get("VALENT_CHAOS_SEED")


@pytest.fixture(scope="module")
def executors():
    ex = ct.executors.LocalExecutor(workers=4, grace=0.5)
    yield {"local": ex}
    ex.shutdown()


def test_cancel_at_any_moment_local(executors, tmp_path):
    seeds = [int(ONLY)] if ONLY else range(RUNS)
    outcomes: dict[str, int] = {}
    statuses: dict[str, int] = {}
    for seed in seeds:
        folder = tmp_path / f"run{seed}"
        folder.mkdir()
        plan = draw(seed, ["local"])
        result = run_and_check(plan, str(folder), executors)
        statuses[result.status] = statuses.get(result.status, 0) + 1
        for n in result.get_all_node_results():
            if n["cancel_outcome"]:
                outcomes[n["cancel_outcome"]] = outcomes.get(n["cancel_outcome"], 0) + 1
    print(f"\n{len(seeds)} runs: {statuses}; outcomes {outcomes}")
    if not ONLY and RUNS >= 50:
        # the schedule must really exercise both kinds of stop and both ends
        assert outcomes.get("killed", 0) > 0 and outcomes.get("dequeued", 0) > 0, outcomes
        assert statuses.get("CANCELLED", 0) > 0 and statuses.get("COMPLETED", 0) > 0, statuses
