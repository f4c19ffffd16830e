"""The SSH executor against valent's executor conformance suite (``valent.testing``).

The suite's tasks write marker files under pytest's ``tmp_path`` and import
``valent.testing.tasks``, so here the executor logs in to the rig's sshd as root with this
very interpreter ("SSH to localhost"); the other SSH tests use an ordinary user without
valent.
"""

from __future__ import annotations

import os

import pytest
from valent.testing import ExecutorConformance
from valent_ssh import SSHExecutor

pytest_plugins = ["ssh_fixtures"]


@pytest.mark.skipif(os.geteuid() != 0, reason="logs in as root (the rig's sshd runs as root)")
class TestSSHConformance(ExecutorConformance):
    """Two slots, so the pending-cancel test can fill them."""

    @pytest.fixture(autouse=True)
    def _sshd_first(self, rig):
        """Start the session's sshd before the suite snapshots this process's children."""

    @pytest.fixture
    def executor(self, rig) -> SSHExecutor:
        return SSHExecutor(**rig.root_settings(max_parallel=2, grace=0.5))
