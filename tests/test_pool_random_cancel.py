"""Cancel at any moment inside deep batches: a pool of two workers gets a burst of quick jobs
(sent ahead in batches), and a random subset of them is cancelled at a random moment, one by
one or in one ``cancel_many``. Each job writes ``s<i>`` as its body's first act and ``e<i>``
as its last, so after each round every final state is checked against what really ran.

``VALENT_POOL_CHAOS_ROUNDS`` sets the number of rounds (default 60); round ``r`` uses seed
``r``, named on failure (``VALENT_POOL_CHAOS_SEED=N`` runs just that one).
"""

from __future__ import annotations

import os
import random
import time

import valent as ct
from core_support import wait_gone
from valent._pool.pool import ProcessPool

ROUNDS = int(os.environ.get("VALENT_POOL_CHAOS_ROUNDS", "60"))
ONLY = os.environ.get("VALENT_POOL_CHAOS_SEED")


def work(folder: str, i: int, seconds: float) -> int:
    open(f"{folder}/s{i}", "a").close()
    if seconds:
        time.sleep(seconds)
    open(f"{folder}/e{i}", "a").close()
    return i


def wrong(state: ct.TaskState, chosen: bool, started: bool, ended: bool) -> str | None:
    """What is untrue about ``state``, given what ran; None if nothing."""
    if isinstance(state, ct.Completed):
        return None if ended else "completed, but its body never finished"
    if not isinstance(state, ct.Cancelled):
        return f"ended {type(state).__name__}: only a cancel may stop it"
    if not chosen:
        return "cancelled, but it was not chosen"
    if state.outcome == ct.CancelOutcome.DEQUEUED and (started or state.started_at):
        return "dequeued, but its body had started"
    if state.outcome == ct.CancelOutcome.KILLED and not (started and state.started_at):
        return "killed, but its body never started"
    if state.outcome not in (ct.CancelOutcome.DEQUEUED, ct.CancelOutcome.KILLED):
        return f"cancelled with outcome {state.outcome}"
    return None


def test_cancel_inside_batches_at_any_moment_tells_the_truth(tmp_path):
    seeds = [int(ONLY)] if ONLY else range(ROUNDS)
    seen: dict[str, int] = {}
    with ProcessPool(workers=2, grace=0.3, name="test") as pool:
        warm = tmp_path / "warm"
        warm.mkdir()
        for _ in range(20):  # the pool learns the function is quick: batches from now on
            pool.submit(work, (str(warm), 0, 0.0)).wait(30)
        for seed in seeds:
            rnd = random.Random(seed)
            folder = tmp_path / f"r{seed}"
            folder.mkdir()
            n = rnd.randint(20, 120)
            jobs = [pool.submit(work, (str(folder), i, rnd.choice([0, 0, 0.001, 0.003])))
                    for i in range(n)]
            time.sleep(rnd.uniform(0, 0.05))
            chosen = sorted(rnd.sample(range(n), rnd.randint(1, n)))
            if rnd.random() < 0.5:
                for i in chosen:
                    pool.cancel(jobs[i])
            else:
                pool.cancel_many([jobs[i] for i in chosen])
            picked = set(chosen)
            for i, job in enumerate(jobs):
                state = job.wait(60)
                assert state.final, f"seed {seed}: job {i} not final: {state!r}"
                problem = wrong(state, i in picked, (folder / f"s{i}").exists(),
                                (folder / f"e{i}").exists())
                assert problem is None, f"seed {seed}: job {i}: {problem}: {state!r}"
                name = type(state).__name__
                if isinstance(state, ct.Cancelled):
                    name += f" {state.outcome.value}"
                seen[name] = seen.get(name, 0) + 1
        pids = pool.worker_pids()
    assert wait_gone(pids) == []
    print(f"\n{len(seeds)} rounds: {seen}")
    if not ONLY and ROUNDS >= 30:  # the rounds did reach every kind of end
        assert {"Completed", "Cancelled dequeued", "Cancelled killed"} <= set(seen), seen
