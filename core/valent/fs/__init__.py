"""File transfers around a task: ``ct.fs.File``, ``Folder``, ``FileTransfer``,
``TransferFromRemote``, ``TransferToRemote``, with ``@ct.electron(files=[...])``.

Each transfer runs in the task's own process, on the task's executor, before the body
(``Order.BEFORE``, the default) or after it returned (``Order.AFTER``); the task receives
``files=[(from_path, to_path), ...]``. A cancel that stops the task stops a transfer in
progress too (an ``rsync`` is in the task's process group). Strategies
(:mod:`valent.fs.strategies`, also ``ct.fs_strategies``): ``Shutil`` (a local copy),
``Rsync`` (local, or over SSH with the SSH executor's host-key checks) and ``HTTP``. Cloud
strategies (S3, Azure Blob, Google Cloud Storage) may come later as plugins.
"""

from .._hooked import FileTransferError
from . import strategies
from .file import File, FileSchemes, FileTransferSetupError, Folder
from .transfer import (
    FileTransfer,
    Order,
    TransferFromRemote,
    TransferToRemote,
    guess_transfer_strategy,
)

__all__ = [
    "File",
    "FileSchemes",
    "FileTransfer",
    "FileTransferError",
    "FileTransferSetupError",
    "Folder",
    "Order",
    "TransferFromRemote",
    "TransferToRemote",
    "guess_transfer_strategy",
    "strategies",
]
