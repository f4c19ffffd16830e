"""Fixtures of the Dask executor tests: one real cluster for the session, and helpers.

The cluster is ``dask scheduler`` and two ``dask worker --nthreads 1`` programs on 127.0.0.1
(:class:`dask_support.DaskPrograms`), not children of any client. Executors under test
connect to it by address, so they must never close it.
"""

from __future__ import annotations

import pytest
import valent
from dask_support import (
    DaskPrograms,
    Runner,
    cluster_pids,
    descendants,
    is_resource_tracker,
    local_pool_pids,
    new_processes,
    wait_until,
)


@pytest.fixture(scope="session")
def dask_cluster(tmp_path_factory):
    """A cluster valent does not own: ``dask scheduler`` and two ``dask worker --nthreads 1``
    programs, as a user starts them; ended by PID, and checked gone, at the end."""
    before = set(descendants())
    cluster = DaskPrograms(str(tmp_path_factory.mktemp("dask-cluster")), n_workers=2)
    try:
        yield cluster
    finally:
        cluster.stop()
    def left() -> list:
        # the cluster's processes only: a process pool some other test's executor still holds
        # (shut down at the end of the session) is checked by conftest's no_processes_left
        return [p for p in new_processes(before) if not _is_pool_process(p)]

    assert wait_until(lambda: not left(), 20, 0.1), (
        "the test cluster left processes behind: "
        + "; ".join(_describe(p) for p in left())
    )


@pytest.fixture(scope="session")
def dask_client(dask_cluster):
    """The test's own client of the cluster (for PIDs and scheduler facts)."""
    import distributed

    client = distributed.Client(dask_cluster.address, set_as_default=False, timeout=60)
    yield client
    client.close()


@pytest.fixture(autouse=True)
def no_stray_processes(request):
    """After each test, every descendant is the cluster's (workers, warm pools) or is gone."""
    before = set(descendants())
    yield
    if "dask_client" not in request.fixturenames:
        return
    client = request.getfixturevalue("dask_client")
    # the session cluster's own programs (started during this test if it was the first); not
    # their descendants: what a task leaves behind under a worker is a stray
    cluster = request.getfixturevalue("dask_cluster")
    programs = {p.pid for p in [cluster.scheduler, *cluster.workers]}

    def strays() -> list[str]:
        known = cluster_pids(client) | before | local_pool_pids() | programs
        return [
            f"{pid} {' '.join(p.cmdline()[:4])}"
            for pid, p in descendants().items()
            if pid not in known and not is_resource_tracker(p)
        ]

    assert wait_until(lambda: not strays(), 15, 0.1), f"processes left behind: {strays()}"


@pytest.fixture(scope="session")
def kill_executor(dask_cluster):
    """A kill-mode DaskExecutor on the session cluster (by address)."""
    ex = valent.executors.DaskExecutor(
        scheduler_address=dask_cluster.scheduler_address, cancel_mode="kill", grace=0.5
    )
    yield ex
    ex.shutdown()


@pytest.fixture(scope="session")
def finish_executor(dask_cluster):
    """A finish-mode DaskExecutor on the session cluster (by address)."""
    ex = valent.executors.DaskExecutor(
        scheduler_address=dask_cluster.scheduler_address, cancel_mode="finish"
    )
    yield ex
    ex.shutdown()


@pytest.fixture
def kill_runner(kill_executor, dask_client):
    return Runner(kill_executor)


@pytest.fixture
def finish_runner(finish_executor, dask_client):
    return Runner(finish_executor)


@pytest.fixture
def allowed_failures(dask_client):
    """Set the scheduler's allowed-failures for a test; restore it and the workers after."""

    def get(dask_scheduler):
        return dask_scheduler.allowed_failures

    def set_(n, dask_scheduler):
        dask_scheduler.allowed_failures = n

    old = dask_client.run_on_scheduler(get)
    yield lambda n: dask_client.run_on_scheduler(set_, n)
    dask_client.run_on_scheduler(set_, old)
    dask_client.wait_for_workers(2, timeout=60)


@pytest.fixture
def dask_config(dask_cluster, tmp_path, monkeypatch):
    """A config file whose ``[executors.dask]`` points at the session cluster."""
    cfg = tmp_path / "config.toml"
    cfg.write_text(
        f'[executors.dask]\nscheduler_address = "{dask_cluster.scheduler_address}"\n'
        'cancel_mode = "kill"\ngrace = 0.5\n'
    )
    monkeypatch.setenv("VALENT_CONFIG", str(cfg))
    yield cfg
    from valent.api import get_dispatcher

    named = get_dispatcher().named_executor("dask")
    if named is not None:
        named.shutdown()  # releases its client; it reconnects if used again


def _describe(proc) -> str:
    """A process's pid and command line, for a failure message (it may be gone by now)."""
    try:
        return f"{proc.pid} {' '.join(proc.cmdline()[:6])}"
    except Exception:
        return f"{proc.pid} (gone)"


def _is_pool_process(proc) -> bool:
    """A worker or watcher of a valent process pool (not a Dask program)."""
    try:
        return "valent._pool" in " ".join(proc.cmdline()) or "_pool/watch.py" in " ".join(
            proc.cmdline()
        )
    except Exception:
        return False
