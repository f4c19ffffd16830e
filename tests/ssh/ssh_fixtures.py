"""Fixtures of the SSH executor tests: one real sshd on 127.0.0.1 for the session.

A plugin module, not a ``conftest.py``: the test modules load it with
``pytest_plugins = ["ssh_fixtures"]``, so it never becomes ``sys.modules["conftest"]``
(the top-level tests import helpers with ``from conftest import ...``).

See ``rig.py``. After each test every SSH connection is closed and the login user must have
no process left (the remote agent exits when its connection closes; tasks must be gone).
"""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

import rig as rigmod  # noqa: E402
from ssh_support import Submitted, wait_until  # noqa: E402


@pytest.fixture(scope="session")
def rig():
    """The session's sshd (started once; a test that stops it must start it again)."""
    if not os.path.exists(rigmod.SSHD):
        pytest.skip(f"{rigmod.SSHD} is missing (tests/run installs openssh-server)")
    r = rigmod.SSHRig()
    r.start()
    yield r
    from valent_ssh import registry

    registry.close_all()
    r.stop()


@pytest.fixture
def ssh(rig):
    """Make SSHExecutors for the rig; afterwards close connections, check nothing is left."""
    from valent_ssh import SSHExecutor, registry

    made = []

    def make(**overrides):
        ex = SSHExecutor(**rig.settings(**overrides))
        made.append(ex)
        return ex

    yield make
    for ex in made:
        ex.shutdown()
    registry.close_all()
    if rig.proc is None:
        rig.start()
    left = wait_until(lambda: not rig.processes(), 10)
    assert left, "processes left on the SSH host: " + ", ".join(
        f"{p.pid} {' '.join(p.cmdline()[:5])}" for p in rig.processes()
    )


@pytest.fixture
def submit():
    return Submitted
