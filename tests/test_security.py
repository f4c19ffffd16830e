"""Security defaults: a private results dir and output files, no executor settings (keys,
hosts, passwords) in the store, and docs that say what unpickling results trusts."""

from __future__ import annotations

import stat
from pathlib import Path

import valent as ct


def _big(n):
    return b"s" * n


def test_results_dir_is_private_and_big_outputs_too(results_dir, local_executor):
    big = ct.electron(_big, executor=local_executor)

    @ct.lattice
    def wf(n):
        return big(n)

    assert ct.dispatch_sync(wf)(2 * 2**20).status == ct.Status.COMPLETED
    assert stat.S_IMODE(results_dir.stat().st_mode) == 0o700
    files = list((results_dir / "outputs").rglob("*"))
    assert files
    for f in files:
        mode = stat.S_IMODE(f.stat().st_mode)
        assert mode & 0o077 == 0, f"{f} is readable by others: {oct(mode)}"


def test_executor_settings_never_reach_the_store(results_dir):
    secret = "s3cr3t-key-path-for-the-test"
    ex = ct.executors.LocalExecutor(workers=1)
    ex.ssh_key_file = secret  # a setting a real executor would hold (like SSH's key path)
    e = ct.electron(_big, executor=ex)

    @ct.lattice
    def wf(n):
        return e(n)

    try:
        assert ct.dispatch_sync(wf)(3).status == ct.Status.COMPLETED
    finally:
        ex.shutdown()
    for f in results_dir.rglob("*"):
        if f.is_file():
            assert secret.encode() not in f.read_bytes(), f"{f} holds an executor setting"


def test_docs_say_results_are_pickles_and_whom_that_trusts():
    text = (Path(__file__).parent.parent / "docs" / "security.md").read_text()
    assert "pickle" in text.lower() and "trust" in text.lower()
    assert "0700" in text


# ---------------------------------------------------------------------- the store's modes

def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


_CHECK_MODES = r"""
import json, os, sys
from pathlib import Path
import valent as ct
from valent._store import INLINE_LIMIT

@ct.electron
def big():
    return b"b" * (INLINE_LIMIT + 10)

@ct.lattice
def wf():
    return big()

r = ct.dispatch_sync(wf)()
assert r.status == ct.Status.COMPLETED, r
top = Path(sys.argv[1])
d = Path(os.environ["VALENT_RESULTS_DIR"])
paths = [p for p in d.rglob("*")] + [d] + [p for p in d.parents if top in p.parents or p == top]
print(json.dumps({str(p): os.stat(p).st_mode & 0o777 for p in paths}))
"""


def test_with_umask_000_every_dir_and_file_valent_makes_is_private(tmp_path):
    """The results dir, the parents valent creates for it, the store (db, -wal, -shm),
    its reserve, output folders and files: 0700 / 0600 whatever the umask."""
    import json
    import os
    import subprocess
    import sys

    top = tmp_path / "made"
    env = dict(os.environ, VALENT_RESULTS_DIR=str(top / "a" / "b" / "results"))
    res = subprocess.run(
        [sys.executable, "-c", _CHECK_MODES, str(top)], capture_output=True, text=True,
        env=env, timeout=120, preexec_fn=lambda: os.umask(0),
    )
    assert res.returncode == 0, res.stderr
    modes = json.loads(res.stdout)
    names = {Path(p).name for p in modes}
    assert {"made", "a", "b", "results", "valent.db", "valent.db-wal", "valent.db-shm",
            "valent.reserve", "outputs", "node-0.pkl"} <= names, names
    for p, mode in modes.items():
        want = 0o700 if Path(p).is_dir() else 0o600
        assert mode == want, f"{p} is {oct(mode)}, not {oct(want)}"


def test_an_existing_open_results_dir_and_store_are_made_private(tmp_path):
    import os
    import sqlite3

    from valent._store import Store

    d = tmp_path / "shared"
    d.mkdir()
    os.chmod(d, 0o755)
    conn = sqlite3.connect(d / "valent.db")
    conn.execute("CREATE TABLE t (x)")
    conn.commit()
    conn.close()
    os.chmod(d / "valent.db", 0o644)
    (d / "outputs").mkdir(mode=0o755)
    os.chmod(d / "outputs", 0o755)
    store = Store(d)
    assert store.dispatch_status("x") is None
    assert _mode(d) == 0o700 and _mode(d / "outputs") == 0o700
    for name in ("valent.db", "valent.db-wal", "valent.db-shm"):
        assert _mode(d / name) == 0o600, name
    store.close()


def _dispatch_with_big_output(results_dir):
    from valent._store import INLINE_LIMIT, get_store

    big = ct.electron(_big)

    @ct.lattice
    def wf(n):
        return big(n)

    result = ct.dispatch_sync(wf)(INLINE_LIMIT + 10)
    assert result.status == ct.Status.COMPLETED
    get_store().close()
    out = results_dir / "outputs" / result.dispatch_id / "node-0.pkl"
    assert out.exists()
    return result.dispatch_id, out


def _fresh_result(dispatch_id):
    """What another process (or `valent show`) would read."""
    from valent._store import Store, get_store
    from valent.result import Result

    store = Store(get_store().dir)
    try:
        return Result(store.dispatch_row(dispatch_id), store.node_rows(dispatch_id),
                      str(store.dir))
    finally:
        store.close()


def test_a_store_others_can_write_is_never_unpickled(results_dir):
    import os
    import subprocess
    import sys

    import pytest
    from valent._store import StoreTrustError

    did, out = _dispatch_with_big_output(results_dir)
    inline = ct.get_result(did)
    os.chmod(results_dir / "valent.db", 0o664)  # group-writable: someone may have edited it
    with pytest.raises(StoreTrustError, match=r"writable by other users.*chmod 600"):
        inline.inputs  # noqa: B018 - inline pickles come from the db
    with pytest.raises(StoreTrustError, match="writable by other users"):
        _fresh_result(did)  # a new reader refuses to open it at all
    res = subprocess.run(
        [sys.executable, "-m", "valent.cli", "show", did], capture_output=True, text=True,
        timeout=60,
    )
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert "writable by other users" in res.stderr and "chmod 600" in res.stderr
    os.chmod(results_dir / "valent.db", 0o600)
    assert _fresh_result(did).result[:1] == b"s"  # once fixed, it loads
    os.chmod(out, 0o666)  # an output file anyone can write
    with pytest.raises(StoreTrustError, match="output file .*node-0.pkl is writable"):
        _fresh_result(did).get_node_result(0)


def test_a_store_or_output_owned_by_another_user_is_refused(results_dir):
    import os

    import pytest
    from valent._store import StoreTrustError

    if os.geteuid() != 0:
        pytest.skip("giving a file to another user needs root")
    did, out = _dispatch_with_big_output(results_dir)
    os.chown(out, 65534, 65534)  # nobody
    with pytest.raises(StoreTrustError, match=r"node-0.pkl is owned by .*nobody.*not by you"):
        _fresh_result(did).get_node_result(0)
    os.chown(out, 0, 0)
    assert _fresh_result(did).get_node_result(0)["output"][:1] == b"s"
    os.chown(results_dir / "valent.db", 65534, 65534)
    with pytest.raises(StoreTrustError, match=r"valent.db is owned by .*nobody"):
        _fresh_result(did)


def test_a_results_dir_owned_by_another_user_is_refused(tmp_path):
    import os

    import pytest
    from valent._store import Store, StoreTrustError

    if os.geteuid() != 0:
        pytest.skip("giving a folder to another user needs root")
    d = tmp_path / "theirs"
    d.mkdir(mode=0o755)
    os.chown(d, 65534, 65534)  # nobody's folder, which root could still write into
    with pytest.raises(StoreTrustError, match=r"results folder .*theirs is owned by .*nobody"):
        Store(d).dispatch_status("x")
    assert not (d / "valent.db").exists()  # nothing was written there
