"""How a file moves: a local copy (``Shutil``), ``Rsync`` (locally or over SSH) and ``HTTP``.

A strategy's ``cp`` / ``download`` / ``upload`` return a :class:`TransferCall`: a callable
that performs the transfer, carrying a plain description (``spec``) that the task runs with
the standard library only (:func:`valent._hooked.run_transfer`), in the task's own process,
so that valent need not be installed where the task runs and a cancel stops the transfer
with the task. A strategy of your own may return any callable instead (as in Covalent).

Cloud strategies (S3, Azure Blob, Google Cloud Storage) are not built in; they may come later
as plugins.
"""

from __future__ import annotations

import abc
import os
import shlex
from collections.abc import Callable
from typing import Any

from .. import _hooked
from .file import File, FileTransferSetupError


class TransferCall:
    """One transfer, ready to run: call it, or let the electron run it (``spec`` travels)."""

    def __init__(self, spec: dict[str, Any]):
        self.spec = spec

    def __call__(self) -> None:
        _hooked.run_transfer(self.spec)

    def __repr__(self) -> str:
        return f"<transfer {self.spec.get('what', self.spec['op'])}>"


class FileTransferStrategy(abc.ABC):
    """Base of the strategies: each returns a callable that moves one file."""

    @abc.abstractmethod
    def cp(self, from_file: File, to_file: File) -> Callable[[], Any]:
        """Both files on this side (or both remote): copy."""

    @abc.abstractmethod
    def download(self, from_file: File, to_file: File) -> Callable[[], Any]:
        """``from_file`` is remote: fetch it to ``to_file``."""

    @abc.abstractmethod
    def upload(self, from_file: File, to_file: File) -> Callable[[], Any]:
        """``to_file`` is remote: send ``from_file`` there."""

    def _refuse(self, what: str) -> FileTransferSetupError:
        return FileTransferSetupError(f"{type(self).__name__} cannot {what}")


class Shutil(FileTransferStrategy):
    """Copies within this machine's file system (a directory: its contents, recursively)."""

    def cp(self, from_file: File, to_file: File) -> TransferCall:
        return TransferCall({
            "op": "copy", "src": from_file.filepath, "dst": to_file.filepath,
            "what": f"copy {from_file.filepath} -> {to_file.filepath}",
        })

    def download(self, from_file: File, to_file: File) -> TransferCall:
        raise self._refuse(
            f"download {from_file.uri}: it copies local files only; use Rsync or HTTP"
        )

    def upload(self, from_file: File, to_file: File) -> TransferCall:
        raise self._refuse(f"upload to {to_file.uri}: it copies local files only; use Rsync")

    def __repr__(self) -> str:
        return "Shutil()"


Local = Shutil


class Rsync(FileTransferStrategy):
    """``rsync -a``, locally, or over SSH for a file marked remote.

    :param user: the login name on ``host`` (default: ssh's).
    :param host: the remote host.
    :param private_key_path: the SSH key to log in with (checked to exist now).
    :param port: the SSH port (valent's addition, as the SSH executor's settings below).
    :param known_hosts: the known_hosts file that must hold the host's key (ssh refuses an
        unknown or changed key: ``StrictHostKeyChecking=yes``); None: no file (then
        ``accept_unknown_host_key`` must be True).
    :param accept_unknown_host_key: trust a host not in ``known_hosts`` on first use (a
        changed key is still refused).
    :param connect_timeout: seconds ssh waits for the connection.
    :param ssh_executor: take host, user, key, port and host-key settings from this
        ``SSHExecutor`` (the ones given here win).
    :param args: more rsync options (``["--bwlimit=1000", "-z"]``), valent's addition.

    The host's key is checked as the SSH executor checks it; the transfer runs where the task
    runs (with ``rsync`` and ``ssh`` installed there).
    """

    def __init__(
        self,
        user: str | None = "",
        host: str | None = "",
        private_key_path: str | None = None,
        *,
        port: int | None = None,
        known_hosts: str | None = "~/.ssh/known_hosts",
        accept_unknown_host_key: bool | None = None,
        connect_timeout: float = 10.0,
        ssh_executor: Any = None,
        args: list[str] | tuple[str, ...] = (),
    ):
        if isinstance(args, str) or not all(isinstance(a, str) for a in args):
            raise FileTransferSetupError(
                f"Rsync: args must be a list of option strings, got {args!r}"
            )
        self.args = list(args)
        if ssh_executor is not None:
            inner = getattr(ssh_executor, "inner", ssh_executor)
            host = host or getattr(inner, "hostname", "") or ""
            user = user or getattr(inner, "username", "") or ""
            private_key_path = private_key_path or getattr(inner, "ssh_key_file", None)
            port = port or getattr(inner, "port", None)
            if known_hosts == "~/.ssh/known_hosts":
                known_hosts = getattr(inner, "known_hosts", known_hosts)
            if accept_unknown_host_key is None:
                accept_unknown_host_key = getattr(inner, "accept_unknown_host_key", False)
        self.user = user or ""
        self.host = host or ""
        self.private_key_path = private_key_path
        self.port = int(port) if port else 22
        self.known_hosts = known_hosts
        self.accept_unknown_host_key = bool(accept_unknown_host_key)
        self.connect_timeout = connect_timeout
        if not 1 <= self.port <= 65535:
            raise FileTransferSetupError(f"Rsync: port must be 1..65535, got {port!r}")
        if self.private_key_path and not os.path.exists(
            os.path.expanduser(self.private_key_path)
        ):
            raise FileTransferSetupError(
                f"Rsync: the private key {self.private_key_path!r} does not exist; give the "
                "path of the SSH key to log in with"
            )
        if self.known_hosts is None and not self.accept_unknown_host_key:
            raise FileTransferSetupError(
                "Rsync: known_hosts=None leaves no way to check the host's key; give a "
                "known_hosts file, or accept_unknown_host_key=True to trust it on first use"
            )

    @classmethod
    def from_executor(cls, ssh_executor: Any, **overrides: Any) -> Rsync:
        """An Rsync that logs in as ``ssh_executor`` (an ``SSHExecutor``) does."""
        return cls(ssh_executor=ssh_executor, **overrides)

    def ssh_command(self) -> list[str]:
        """The ``ssh`` command rsync runs (``-e``), with the host-key and key settings."""
        cmd = ["ssh", "-p", str(self.port), "-o", "BatchMode=yes",
               "-o", f"ConnectTimeout={max(1, round(self.connect_timeout))}"]
        if self.accept_unknown_host_key:
            cmd += ["-o", "StrictHostKeyChecking=accept-new"]
        else:
            cmd += ["-o", "StrictHostKeyChecking=yes"]
        cmd += ["-o", f"UserKnownHostsFile={self.known_hosts or '/dev/null'}"]
        if self.private_key_path:
            cmd += ["-i", self.private_key_path, "-o", "IdentitiesOnly=yes"]
        return cmd

    def _remote(self, path: str) -> str:
        if not self.host:
            raise FileTransferSetupError(
                f"Rsync: {path!r} is marked remote but no host is set; give "
                "Rsync(user=..., host=..., private_key_path=...) or Rsync(ssh_executor=...)"
            )
        return f"{self.user + '@' if self.user else ''}{self.host}:{path}"

    def _spec(self, src: str, dst: str, remote: bool) -> TransferCall:
        argv = ["rsync", "-a", *self.args]
        if remote:
            # -s: the remote shell does not split or expand the paths
            argv += ["-s", "-e", " ".join(shlex.quote(a) for a in self.ssh_command())]
        return TransferCall({
            "op": "rsync", "argv": [*argv, src, dst], "what": f"rsync {src} -> {dst}",
            "known_hosts": self.known_hosts, "host": self.host, "port": self.port,
        })

    def cp(self, from_file: File, to_file: File) -> TransferCall:
        return self._spec(from_file.filepath, to_file.filepath, remote=False)

    def download(self, from_file: File, to_file: File) -> TransferCall:
        return self._spec(self._remote(from_file.filepath), to_file.filepath, remote=True)

    def upload(self, from_file: File, to_file: File) -> TransferCall:
        return self._spec(from_file.filepath, self._remote(to_file.filepath), remote=True)

    def __repr__(self) -> str:
        where = f"{self.user + '@' if self.user else ''}{self.host}" if self.host else "local"
        return f"Rsync({where})"


class HTTP(FileTransferStrategy):
    """Downloads from an ``http(s)://`` URL (GET), or uploads to one (PUT).

    :param timeout: seconds without data before the transfer fails.
    """

    def __init__(self, timeout: float = 60.0):
        self.timeout = timeout

    def download(self, from_file: File, to_file: File) -> TransferCall:
        return TransferCall({
            "op": "http_get", "url": from_file.uri, "dst": to_file.filepath,
            "timeout": self.timeout, "what": f"download {from_file.uri} -> {to_file.filepath}",
        })

    def upload(self, from_file: File, to_file: File) -> TransferCall:
        return TransferCall({
            "op": "http_put", "src": from_file.filepath, "url": to_file.uri,
            "timeout": self.timeout, "what": f"upload {from_file.filepath} -> {to_file.uri}",
        })

    def cp(self, from_file: File, to_file: File) -> TransferCall:
        raise self._refuse(f"copy {from_file.uri} to {to_file.uri}: one side must be local")

    def __repr__(self) -> str:
        return "HTTP()"


__all__ = ["HTTP", "FileTransferStrategy", "Local", "Rsync", "Shutil", "TransferCall"]
