"""``FileTransfer``: move one file before or after a task, as part of the task."""

from __future__ import annotations

import enum
import os
from typing import Any

from .file import File, FileTransferSetupError
from .strategies import HTTP, FileTransferStrategy, Shutil


class Order(enum.StrEnum):
    """When a transfer runs: before the task's body or after it returned."""

    BEFORE = "before"
    AFTER = "after"


def guess_transfer_strategy(from_file: File, to_file: File) -> FileTransferStrategy:
    """The built-in strategy for a pair of locations: local to local, ``Shutil``; from or to
    ``http(s)://``, ``HTTP``. Anything else needs ``strategy=`` (``Rsync(host=...)`` for a
    path on another host)."""
    if not from_file.is_remote and not to_file.is_remote:
        return Shutil()
    remote = from_file if from_file.is_remote else to_file
    if remote.scheme in ("http", "https") and not (from_file.is_remote and to_file.is_remote):
        return HTTP()
    if remote.scheme == "file":
        raise FileTransferSetupError(
            f"{remote.filepath!r} is marked remote: give strategy=ct.fs_strategies.Rsync("
            "user=..., host=..., private_key_path=...) (or Rsync(ssh_executor=...))"
        )
    raise FileTransferSetupError(
        f"no built-in transfer strategy for {remote.scheme}:// ({remote.uri}); valent has "
        "local copies, Rsync (local and over SSH) and HTTP; cloud stores (S3, Azure Blob, "
        "Google Cloud Storage) may come later as plugins, or pass strategy= an object with "
        "cp/download/upload methods"
    )


def _as_file(value: Any, what: str) -> File:
    if value is None or isinstance(value, str | os.PathLike):
        return File(value)
    if isinstance(value, File):
        return value
    raise FileTransferSetupError(
        f"FileTransfer: {what} must be a path, a URL, a ct.fs.File or None, got {value!r}"
    )


class FileTransfer:
    """Copy ``from_file`` to ``to_file`` before (default) or after the task.

    :param from_file: a path, URL or :class:`File` (None: a new temporary file).
    :param to_file: likewise.
    :param order: ``Order.BEFORE`` or ``Order.AFTER`` (Covalent's ``ct.fs.Order``).
    :param strategy: how to move it; default: guessed from the two locations.

    Given to ``@ct.electron(files=[...])``, the transfer runs in the task's process, on the
    task's executor, and the task receives ``files=[(from_path, to_path), ...]``.
    """

    def __init__(
        self,
        from_file: File | str | None = None,
        to_file: File | str | None = None,
        order: Order | str = Order.BEFORE,
        strategy: FileTransferStrategy | None = None,
    ):
        self.from_file = _as_file(from_file, "from_file")
        self.to_file = _as_file(to_file, "to_file")
        try:
            self.order = Order(order)
        except ValueError:
            raise FileTransferSetupError(
                f"FileTransfer: order must be ct.fs.Order.BEFORE or AFTER, got {order!r}"
            ) from None
        if self.from_file.is_remote and self.to_file.is_remote:
            raise FileTransferSetupError(
                f"FileTransfer {self.from_file.uri} -> {self.to_file.uri}: both sides are "
                "remote; one of them must be a path where the task runs"
            )
        self.strategy = strategy if strategy is not None else guess_transfer_strategy(
            self.from_file, self.to_file
        )
        for method in ("cp", "download", "upload"):
            if not callable(getattr(self.strategy, method, None)):
                raise FileTransferSetupError(
                    f"FileTransfer: strategy {self.strategy!r} has no {method}() method"
                )

    def cp(self) -> tuple[Any, Any]:
        """(the pre-hook part, the transfer callable) as Covalent's ``cp`` returns them."""
        return (self.files_entry(), self.transfer())

    def transfer(self) -> Any:
        """The callable (usually a :class:`~valent.fs.strategies.TransferCall`) that moves it."""
        if self.to_file.is_remote:
            return self.strategy.upload(self.from_file, self.to_file)
        if self.from_file.is_remote:
            return self.strategy.download(self.from_file, self.to_file)
        return self.strategy.cp(self.from_file, self.to_file)

    def files_entry(self) -> tuple[str, str, bool, bool]:
        """What the task's ``files`` list gets, and which sides are temporary files."""
        return (
            self.from_file.filepath, self.to_file.filepath,
            self.from_file.is_temp_file and not self.from_file.is_remote,
            self.to_file.is_temp_file and not self.to_file.is_remote,
        )

    def __repr__(self) -> str:
        return (
            f"FileTransfer({self.from_file.uri!r} -> {self.to_file.uri!r}, "
            f"{self.order.value}, {self.strategy!r})"
        )


def TransferFromRemote(  # noqa: N802 - Covalent's name
    from_filepath: str,
    to_filepath: str | None = None,
    strategy: FileTransferStrategy | None = None,
    order: Order | str = Order.BEFORE,
) -> FileTransfer:
    """A transfer from a remote path or URL to a local one, before the task (by default;
    unlike Covalent's, ``order`` is honoured)."""
    is_dir = str(from_filepath).endswith("/")
    if is_dir and not str(to_filepath or "").endswith("/"):
        raise FileTransferSetupError(
            f"TransferFromRemote: {from_filepath!r} is a directory (ends with '/'); give a "
            "directory path ending with '/' as the destination too"
        )
    return FileTransfer(
        File(from_filepath, is_remote=True, is_dir=is_dir), File(to_filepath, is_dir=is_dir),
        order=order, strategy=strategy,
    )


def TransferToRemote(  # noqa: N802 - Covalent's name
    to_filepath: str,
    from_filepath: str | None = None,
    strategy: FileTransferStrategy | None = None,
    order: Order | str = Order.AFTER,
) -> FileTransfer:
    """A transfer from a local path to a remote path or URL, after the task (by default;
    unlike Covalent's, ``order`` is honoured)."""
    is_dir = bool(from_filepath) and str(from_filepath).endswith("/")
    if is_dir and not str(to_filepath).endswith("/"):
        raise FileTransferSetupError(
            f"TransferToRemote: {from_filepath!r} is a directory (ends with '/'); give a "
            "directory path ending with '/' as the destination too"
        )
    return FileTransfer(
        File(from_filepath, is_dir=is_dir), File(to_filepath, is_remote=True, is_dir=is_dir),
        order=order, strategy=strategy,
    )


# ---------------------------------------------------------------------- on the electron


class _FilesStep:
    """Makes temporary files and gives the task ``files=[(from, to), ...]``."""

    retval_keyword = ""

    def __init__(self, entries: list[tuple[str, str, bool, bool]]):
        self.entries = entries

    def part(self) -> tuple:
        return ("files", list(self.entries))


class _TransferStep:
    retval_keyword = ""

    def __init__(self, call: Any):
        self.call = call

    def part(self) -> tuple:
        spec = getattr(self.call, "spec", None)
        if isinstance(spec, dict):
            return ("xfer", spec)
        return ("call", self.call, (), {}, "")


def attach(name: str, hooks: Any, files: Any) -> Any:
    """``hooks`` (a :class:`valent.deps.Hooks` or None) with the transfers of ``files`` added:
    before ones after the dependencies and before ``call_before``, after ones first after
    the body."""
    from ..deps import DepsCall, Hooks
    from ..errors import ValentError

    items = list(files) if isinstance(files, list | tuple) else [files]
    for ft in items:
        if not isinstance(ft, FileTransfer):
            raise ValentError(
                f"@electron {name}: files takes a list of ct.fs.FileTransfer objects (or "
                f"ct.fs.TransferFromRemote / TransferToRemote), got {ft!r}"
            )
    if hooks is None:
        hooks = Hooks([], [])
    before = [_FilesStep([ft.files_entry() for ft in items])]
    before += [_TransferStep(ft.transfer()) for ft in items if ft.order == Order.BEFORE]
    after = [_TransferStep(ft.transfer()) for ft in items if ft.order == Order.AFTER]
    at = next((i for i, s in enumerate(hooks.before) if isinstance(s, DepsCall)),
              len(hooks.before))
    hooks.before[at:at] = before
    hooks.after[0:0] = after
    hooks.retval_keywords.add("files")
    return hooks
