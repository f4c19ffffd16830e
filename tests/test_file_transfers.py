"""File transfers (ct.fs) around a task: the local how-to, folders, Rsync on this machine,
HTTP against a server on 127.0.0.1, errors that say what to fix, and cancels during a
transfer (the transfer's processes are gone, the outcome is killed)."""

from __future__ import annotations

import http.server
import os
import shutil
import threading
import time
from pathlib import Path

import psutil
import pytest
import valent as ct
from core_support import read_pid, wait_gone, wait_until
from valent.fs.strategies import HTTP, Rsync, Shutil

needs_rsync = pytest.mark.skipif(
    shutil.which("rsync") is None, reason="rsync is not installed (tests/run installs it)"
)


def _run(workflow, *args, timeout=120):
    return ct.get_result(ct.dispatch(workflow)(*args), wait=True, timeout=timeout)


def test_file_transfers_for_workflows_local_howto(tmp_path, monkeypatch, local_executor):
    """The how-to: a FileTransfer before the task; the task gets files=[(from, to)], copies
    the lines, returns the destination, which then holds the source's text."""
    monkeypatch.chdir(tmp_path)
    source_filepath = Path("./my_source_file").resolve()
    dest_filepath = Path("./my_dest_file").resolve()
    file_content = "Mares eat oats and does eat oats\nAnd little lambs eat ivy ...\n"
    source_filepath.write_text(file_content)

    xfer = ct.fs.FileTransfer(str(source_filepath), str(dest_filepath))
    ft_list = [xfer]

    @ct.electron(files=ft_list, executor=local_executor)
    def my_file_transfer_task(files):
        from_file, to_file = files[0]
        with open(to_file, "w") as f:
            for line in open(from_file):
                f.write(line)
        return to_file

    @ct.lattice()
    def my_workflow():
        return my_file_transfer_task()

    result = _run(my_workflow)
    assert result.status == ct.Status.COMPLETED, result.error
    assert result.result == str(dest_filepath)
    assert Path(result.result).read_text() == file_content
    assert isinstance(xfer.strategy, Shutil)
    source_filepath.unlink()
    dest_filepath.unlink()


def test_files_kwarg_order_after_and_temp_files(tmp_path, local_executor):
    """An AFTER transfer runs once the body returned (it copies what the body wrote); a
    File() without a path is a temporary file made before the task."""
    out = tmp_path / "out.txt"
    kept = tmp_path / "kept" / "copy.txt"

    @ct.electron(
        executor=local_executor,
        files=[ct.fs.FileTransfer(ct.fs.File(), str(out), order=ct.fs.Order.AFTER),
               ct.fs.FileTransfer(str(out), str(kept), order=ct.fs.Order.AFTER)],
    )
    def write(files=None):
        (tmp, dest), _second = files
        assert os.path.exists(tmp), "the temporary source was not created"
        Path(tmp).write_text("written by the body")
        return tmp

    @ct.lattice
    def flow():
        return write()

    r = _run(flow)
    assert r.status == ct.Status.COMPLETED, r.error
    assert out.read_text() == "written by the body"
    assert kept.read_text() == "written by the body"
    os.unlink(r.result)


def test_relative_paths_are_taken_from_the_current_directory(
    tmp_path, monkeypatch, local_executor
):
    """The worker runs outside the user's directory: a relative path is made absolute when
    the transfer is defined, so it names the same file there; a copy into a directory keeps
    the file's name."""
    monkeypatch.chdir(tmp_path)
    Path("rel.txt").write_text("relative")
    Path("into").mkdir()
    xfer = ct.fs.FileTransfer("rel.txt", "into")
    assert xfer.from_file.filepath == str(tmp_path / "rel.txt")

    @ct.electron(executor=local_executor, files=[xfer])
    def where(files=None):
        return os.getcwd(), files[0]

    @ct.lattice
    def flow():
        return where()

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the task runs in another directory than the definition's
    r = _run(flow)
    assert r.status == ct.Status.COMPLETED, r.error
    cwd, pair = r.result
    assert cwd != str(tmp_path)
    assert pair == (str(tmp_path / "rel.txt"), str(tmp_path / "into"))
    assert (tmp_path / "into" / "rel.txt").read_text() == "relative"


def test_folder_contents_and_folder_itself(tmp_path, local_executor):
    src = tmp_path / "data"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("a")
    (src / "sub" / "b.txt").write_text("b")

    @ct.electron(
        executor=local_executor,
        files=[
            ct.fs.FileTransfer(ct.fs.Folder(str(src)), ct.fs.Folder(str(tmp_path / "c1"))),
            ct.fs.FileTransfer(ct.fs.Folder(str(src), include_folder=True),
                               ct.fs.Folder(str(tmp_path / "c2"))),
        ],
    )
    def listing(files=None):
        return sorted(os.listdir(files[0][1]))

    @ct.lattice
    def flow():
        return listing()

    r = _run(flow)
    assert r.status == ct.Status.COMPLETED, r.error
    assert r.result == ["a.txt", "sub"]
    assert (tmp_path / "c1" / "sub" / "b.txt").read_text() == "b"
    assert (tmp_path / "c2" / "data" / "a.txt").read_text() == "a"


@needs_rsync
def test_rsync_local(tmp_path, local_executor):
    src = tmp_path / "src"
    src.mkdir()
    (src / "x.bin").write_bytes(os.urandom(1000))
    dest = tmp_path / "dest"

    @ct.electron(
        executor=local_executor,
        files=[ct.fs.FileTransfer(ct.fs.Folder(str(src)), ct.fs.Folder(str(dest)),
                                  strategy=Rsync())],
    )
    def size(files=None):
        return os.path.getsize(os.path.join(files[0][1], "x.bin"))

    @ct.lattice
    def flow():
        return size()

    r = _run(flow)
    assert r.status == ct.Status.COMPLETED, r.error
    assert r.result == 1000
    assert (dest / "x.bin").read_bytes() == (src / "x.bin").read_bytes()


@needs_rsync
def test_rsync_failure_is_a_clear_error(tmp_path, local_executor):
    @ct.electron(
        executor=local_executor,
        files=[ct.fs.FileTransfer(str(tmp_path / "missing"), str(tmp_path / "d"),
                                  strategy=Rsync())],
    )
    def never(files=None):
        return "ran"

    @ct.lattice
    def flow():
        return never()

    r = _run(flow)
    assert r.status == ct.Status.FAILED
    err = r.get_node_result(0)["error"]
    assert "FileTransferError" in err and "rsync exited with status" in err
    assert "missing" in err


@needs_rsync
def test_cancel_during_a_long_rsync_kills_it(tmp_path, local_executor):
    """An rsync limited to 1 KiB/s runs in the task's process group: the cancel kills it
    (every rsync process gone), the node ends killed, the body never ran."""
    src = tmp_path / "big-source.bin"
    src.write_bytes(os.urandom(4 << 20))
    ran = tmp_path / "body-ran"
    pid_file = tmp_path / "worker.pid"

    @ct.electron(
        executor=local_executor,
        deps_bash=[f"echo $PPID > {pid_file}"],
        files=[ct.fs.FileTransfer(str(src), str(tmp_path / "copy.bin"),
                                  strategy=Rsync(args=["--bwlimit=1"]))],
    )
    def body(files=None):
        Path(ran).write_text("yes")

    @ct.lattice
    def flow():
        return body()

    did = ct.dispatch(flow)()
    worker = read_pid(pid_file, timeout=60)

    def rsyncs():
        found = []
        for p in psutil.process_iter(["cmdline"]):
            if str(src) in " ".join(p.info["cmdline"] or []) and "rsync" in p.info["cmdline"][0]:
                found.append(p.pid)
        return found

    pids = wait_until(rsyncs, 30)
    assert pids, "the rsync never started"
    time.sleep(0.3)
    ct.cancel(did)
    r = ct.get_result(did, wait=True, timeout=60)
    node = r.get_node_result(0)
    assert r.status == ct.Status.CANCELLED
    assert node["status"] == ct.Status.CANCELLED and node["cancel_outcome"] == "killed"
    assert wait_gone(pids + rsyncs() + [worker]) == [], "an rsync outlived the cancel"
    assert not ran.exists()


# ---------------------------------------------------------------------- HTTP


class _Handler(http.server.BaseHTTPRequestHandler):
    files: dict[str, bytes] = {}
    slow: set[str] = set()
    stop = threading.Event()
    uploads: dict[str, bytes] = {}

    def do_GET(self):  # noqa: N802
        body = self.files.get(self.path)
        if body is None:
            self.send_error(404, "no such file")
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.path in self.slow:
            for i in range(len(body)):
                if self.stop.is_set():
                    return
                try:
                    self.wfile.write(body[i:i + 1])
                    self.wfile.flush()
                except OSError:
                    return
                time.sleep(0.05)
        else:
            self.wfile.write(body)

    def do_PUT(self):  # noqa: N802
        n = int(self.headers["Content-Length"])
        self.uploads[self.path] = self.rfile.read(n)
        self.send_response(201)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def http_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    _Handler.stop.clear()
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", _Handler
    _Handler.stop.set()
    server.shutdown()
    server.server_close()
    _Handler.files.clear()
    _Handler.slow.clear()
    _Handler.uploads.clear()


def test_http_download_and_upload(tmp_path, http_server, local_executor):
    base, handler = http_server
    handler.files["/data.csv"] = b"a,b\n1,2\n"
    local = tmp_path / "dl" / "data.csv"
    result_file = tmp_path / "result.txt"

    @ct.electron(
        executor=local_executor,
        files=[ct.fs.TransferFromRemote(f"{base}/data.csv", str(local)),
               ct.fs.TransferToRemote(f"{base}/up/result.txt", str(result_file))],
    )
    def process(files=None):
        (src, dst), (out, _url) = files
        text = Path(dst).read_text()
        Path(out).write_text(text.upper())
        return text

    @ct.lattice
    def flow():
        return process()

    r = _run(flow)
    assert r.status == ct.Status.COMPLETED, r.error
    assert r.result == "a,b\n1,2\n"
    assert handler.uploads["/up/result.txt"] == b"A,B\n1,2\n"
    assert isinstance(ct.fs.TransferFromRemote(f"{base}/x", "y").strategy, HTTP)


def test_http_error_names_the_status(tmp_path, http_server, local_executor):
    base, _ = http_server

    @ct.electron(
        executor=local_executor,
        files=[ct.fs.TransferFromRemote(f"{base}/nope.txt", str(tmp_path / "n.txt"))],
    )
    def never(files=None):
        return 1

    @ct.lattice
    def flow():
        return never()

    r = _run(flow)
    assert r.status == ct.Status.FAILED
    err = r.get_node_result(0)["error"]
    assert "404" in err and f"{base}/nope.txt" in err


def test_cancel_during_a_slow_download_kills_it(tmp_path, http_server, local_executor):
    base, handler = http_server
    handler.files["/slow.bin"] = b"x" * 2000
    handler.slow.add("/slow.bin")
    pid_file = tmp_path / "worker.pid"
    ran = tmp_path / "ran"

    @ct.electron(
        executor=local_executor,
        deps_bash=[f"echo $PPID > {pid_file}"],
        files=[ct.fs.TransferFromRemote(f"{base}/slow.bin", str(tmp_path / "slow.bin"))],
    )
    def body(files=None):
        Path(ran).write_text("yes")

    @ct.lattice
    def flow():
        return body()

    did = ct.dispatch(flow)()
    worker = read_pid(pid_file, timeout=60)
    assert wait_until(lambda: list(tmp_path.glob("slow.bin.part-*")), 30), "no download began"
    ct.cancel(did)
    r = ct.get_result(did, wait=True, timeout=60)
    node = r.get_node_result(0)
    assert node["status"] == ct.Status.CANCELLED and node["cancel_outcome"] == "killed"
    assert wait_gone([worker]) == [], "the process doing the download still runs"
    assert not ran.exists() and not (tmp_path / "slow.bin").exists()


# ---------------------------------------------------------------------- declaring


def test_bad_declarations_are_clear_errors(tmp_path):
    err = ct.fs.FileTransferSetupError
    with pytest.raises(err, match="scheme 'sftp' is not supported"):
        ct.fs.File("sftp://host/x")
    with pytest.raises(err, match="may come later as plugins"):
        ct.fs.TransferFromRemote("s3://bucket/key", str(tmp_path / "k"))
    with pytest.raises(err, match="both sides are remote"):
        ct.fs.FileTransfer("https://a/x", "https://b/y")
    with pytest.raises(err, match="give strategy=ct.fs_strategies.Rsync"):
        ct.fs.TransferFromRemote("/remote/path", str(tmp_path / "p"))
    with pytest.raises(err, match="does not exist"):
        Rsync(host="h", private_key_path=str(tmp_path / "no-key"))
    with pytest.raises(err, match="known_hosts=None"):
        Rsync(host="h", known_hosts=None)
    with pytest.raises(err, match="destination too"):
        ct.fs.TransferFromRemote("https://a/dir/", str(tmp_path / "d"))
    with pytest.raises(ct.ValentError, match="files takes a list of ct.fs.FileTransfer"):
        ct.electron(files=["/a/b"])(lambda files=None: 1)
    assert issubclass(err, ct.ValentError)
    assert ct.fs_strategies.Rsync is Rsync
