"""The SSH executor's errors: each names the host and port and says how to fix the problem."""

from __future__ import annotations

from valent.plugin import ExecutorError


class SSHError(ExecutorError):
    """Root of the SSH executor's errors; ``host`` and ``port`` say which server."""

    def __init__(self, message: str, host: str = "", port: int = 0):
        super().__init__(message)
        self.host = host
        self.port = port


class SSHUnreachableError(SSHError):
    """The host cannot be reached (refused, timed out, dropped and not back in time)."""


class SSHAuthenticationError(SSHError):
    """The server refused the login (wrong user or key, key file missing or unreadable)."""


class SSHHostKeyError(SSHError):
    """The server's host key is unknown (not in known_hosts) or differs from the known one."""


class RemotePythonError(SSHError):
    """The remote Python is missing, of another minor version, or lacks cloudpickle."""


class RemoteTaskLostError(SSHError):
    """The remote runner ended without writing a result (killed from outside, out of memory,
    its directory removed)."""


def where(host: str, port: int) -> str:
    """``host:port`` as the messages print it."""
    return f"{host}:{port}"


__all__ = [
    "SSHError",
    "SSHUnreachableError",
    "SSHAuthenticationError",
    "SSHHostKeyError",
    "RemotePythonError",
    "RemoteTaskLostError",
]
