"""``File`` and ``Folder``: a path or URL that a file transfer reads or writes."""

from __future__ import annotations

import enum
import os
import posixpath
import uuid
from urllib.parse import urlsplit

from ..errors import ValentError


class FileTransferSetupError(ValentError):
    """A file transfer was declared wrongly (a bad path, an unsupported scheme, no strategy
    for the pair of locations); raised when the electron is defined, before anything runs."""


class FileSchemes(enum.StrEnum):
    """The URL schemes a :class:`File` understands."""

    File = "file"
    S3 = "s3"
    Blob = "blob"
    GCloud = "gs"
    Globus = "globus"
    HTTP = "http"
    HTTPS = "https"
    FTP = "ftp"


REMOTE_SCHEMES = {"s3", "blob", "gs", "globus", "http", "https", "ftp"}


class File:
    """A file to transfer: a local path, a ``file://`` URL, or a remote URL (``https://``).

    :param filepath: the path or URL; None makes a temporary file path (``/tmp/<uuid>``),
        created empty before the task runs. A relative local path is taken from the current
        directory now (the task may run in another); a remote one is left as it is.
    :param is_remote: the path is on another host (Rsync over SSH), though it has no scheme.
    :param is_dir: a directory (also implied by a trailing ``/``).
    :param include_folder: transfer the directory itself, not only its contents.
    """

    def __init__(
        self,
        filepath: str | os.PathLike | None = None,
        is_remote: bool = False,
        is_dir: bool = False,
        include_folder: bool = False,
    ):
        if isinstance(filepath, os.PathLike):
            filepath = os.fspath(filepath)
        if filepath is not None and not isinstance(filepath, str):
            raise FileTransferSetupError(
                f"File: the path must be a string (or a pathlib.Path), got {filepath!r}"
            )
        self.id = str(uuid.uuid4())
        self._temp = filepath is None
        if filepath is None:
            filepath = self.get_temp_filepath()
        if not filepath:
            raise FileTransferSetupError("File: the path is empty; give a path or a URL")
        parts = urlsplit(filepath)
        scheme = parts.scheme.lower()
        if len(scheme) == 1:  # a Windows drive letter is not a scheme
            scheme = ""
        if scheme and scheme != "file" and scheme not in REMOTE_SCHEMES:
            raise FileTransferSetupError(
                f"File {filepath!r}: the scheme {scheme!r} is not supported; use a local path, "
                f"file://, http:// or https:// (or one of {', '.join(sorted(REMOTE_SCHEMES))})"
            )
        self.scheme = scheme or "file"
        self._is_remote = bool(is_remote)
        self._is_dir = bool(is_dir) or filepath.endswith("/")
        self._include_folder = bool(include_folder)
        if self.scheme == "file":
            path = parts.path if scheme else filepath
            if not self._is_remote and not os.path.isabs(path):
                # the task runs elsewhere (a worker starts outside this directory): a relative
                # path means the same file here and there only if made absolute now
                path = os.path.abspath(path)
            self._path = posixpath.normpath(path) if path else path
            self.uri = "file://" + self._path
        else:
            self._path = parts.path
            self.uri = filepath

    def get_temp_filepath(self) -> str:
        """The path a File made without one uses."""
        return f"/tmp/{self.id}"

    @property
    def is_temp_file(self) -> bool:
        """Made without a path: created empty before the task runs."""
        return self._temp

    @property
    def is_remote(self) -> bool:
        """On another host (a remote scheme, or marked ``is_remote``)."""
        return self._is_remote or self.scheme in REMOTE_SCHEMES

    @property
    def is_dir(self) -> bool:
        return self._is_dir

    @property
    def filepath(self) -> str:
        """The path; a directory whose contents (not itself) transfer ends with ``/``."""
        path = self._path
        if self.is_dir and not self._include_folder:
            return path.rstrip("/") + "/"
        return path.rstrip("/") if self.is_dir and path != "/" else path

    def touch(self) -> None:
        """Create the (local) file if it does not exist."""
        open(self.filepath, "a").close()

    def __repr__(self) -> str:
        kind = "Folder" if self.is_dir else "File"
        return f"{kind}({self.uri!r}{', remote' if self.is_remote else ''})"


class Folder(File):
    """A directory to transfer (:class:`File` with ``is_dir=True``)."""

    def __init__(
        self,
        filepath: str | os.PathLike | None = None,
        is_remote: bool = False,
        is_dir: bool = True,
        include_folder: bool = False,
    ):
        super().__init__(filepath, is_remote, is_dir, include_folder)
