"""valent's SSH executor plugin: run electrons on a remote host over SSH (paramiko).

Registered through the ``valent`` entry-point group (``ssh = "valent_ssh"``). Importing it
is cheap: paramiko is imported only when a connection is first opened.
"""

from __future__ import annotations

import valent

from .errors import (
    RemotePythonError,
    RemoteTaskLostError,
    SSHAuthenticationError,
    SSHError,
    SSHHostKeyError,
    SSHUnreachableError,
)
from .executor import SSHExecutor


@valent.hookimpl
def valent_executors() -> list[type[valent.Executor]]:
    """The SSH executor."""
    return [SSHExecutor]


__all__ = [
    "SSHExecutor",
    "SSHError",
    "SSHUnreachableError",
    "SSHAuthenticationError",
    "SSHHostKeyError",
    "RemotePythonError",
    "RemoteTaskLostError",
    "valent_executors",
]
