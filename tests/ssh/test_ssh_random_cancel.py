"""Cancel at any moment over SSH: random workflows mixing Local and SSH electrons, cancelled
at random times, whole or in part; checked as the Local ones are (tests/chaos.py: the SSH
"remote" is this machine, so the task's processes are visible here).
``VALENT_CHAOS_SSH_RUNS`` sets the number of runs (default 20)."""

from __future__ import annotations

import os
import shutil
import tempfile

import chaos
import cloudpickle
import pytest
import valent as ct

pytest_plugins = ["ssh_fixtures"]

RUNS = int(os.environ.get("VALENT_CHAOS_SSH_RUNS", "20"))


@pytest.fixture
def shared_dir():
    """A folder both this process and the SSH login user can write (tmp_path is 0700)."""
    d = tempfile.mkdtemp(prefix="valent-chaos-")
    os.chmod(d, 0o777)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_cancel_at_any_moment_ssh(ssh, shared_dir):
    # the remote has no tests/ on its path: ship the task function by value
    cloudpickle.register_pickle_by_value(chaos)
    local = ct.executors.LocalExecutor(workers=2, grace=0.5)
    executors = {"ssh": ssh(grace=0.5), "local": local}
    outcomes: dict[str, int] = {}
    try:
        for seed in range(RUNS):
            folder = os.path.join(shared_dir, f"run{seed}")
            os.mkdir(folder)
            os.chmod(folder, 0o777)
            plan = chaos.draw(20_000 + seed, list(executors), max_tasks=4)
            result = chaos.run_and_check(plan, folder, executors)
            for n in result.get_all_node_results():
                if n["cancel_outcome"]:
                    key = f"{n['executor']}:{n['cancel_outcome']}"
                    outcomes[key] = outcomes.get(key, 0) + 1
    finally:
        cloudpickle.unregister_pickle_by_value(chaos)
        local.shutdown()
    print(f"\n{RUNS} SSH runs: outcomes {outcomes}")
